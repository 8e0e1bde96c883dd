//! Hybrid logical clock readings.
//!
//! The namespace never reads a clock: every operation takes the caller's [`Hlc`] reading, and
//! [`HlcClock`] is a pure helper that drivers feed with wall time.

use std::fmt;

/// A hybrid-logical-clock reading: milliseconds since the Unix epoch in the high 48 bits and a
/// logical counter in the low 16 bits, so that readings order like `(physical, logical)`.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(u64);

impl Hlc {
    /// The zero reading, older than every real one.
    pub const ZERO: Hlc = Hlc(0);
    /// Bits given to the logical counter.
    pub const LOGICAL_BITS: u32 = 16;

    /// A reading from physical milliseconds and a logical counter. Milliseconds beyond 48 bits
    /// (the year 10889) saturate.
    pub fn new(physical_ms: u64, logical: u16) -> Hlc {
        let physical = physical_ms.min((1 << (64 - Self::LOGICAL_BITS)) - 1);
        Hlc((physical << Self::LOGICAL_BITS) | u64::from(logical))
    }

    /// The reading from its raw 64-bit form.
    pub const fn from_raw(raw: u64) -> Hlc {
        Hlc(raw)
    }

    /// The raw 64-bit form.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Milliseconds since the Unix epoch.
    pub const fn physical_ms(self) -> u64 {
        self.0 >> Self::LOGICAL_BITS
    }

    /// The logical counter.
    pub const fn logical(self) -> u16 {
        (self.0 & 0xffff) as u16
    }

    /// The smallest reading after this one.
    pub const fn successor(self) -> Hlc {
        Hlc(self.0.saturating_add(1))
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({}+{})", self.physical_ms(), self.logical())
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.physical_ms(), self.logical())
    }
}

/// A pure hybrid logical clock: the driver passes the wall time in, the clock never reads it.
#[derive(Clone, Debug, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that has seen nothing.
    pub fn new() -> HlcClock {
        HlcClock::default()
    }

    /// A reading for a local event at wall time `now_ms`: never smaller than or equal to any
    /// reading issued or observed before, even if the wall clock went back.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        let wall = Hlc::new(now_ms, 0);
        self.last = wall.max(self.last.successor());
        self.last
    }

    /// Takes note of a reading made elsewhere, so that later local readings are larger.
    pub fn observe(&mut self, remote: Hlc) {
        self.last = self.last.max(remote);
    }

    /// The largest reading issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_monotonic_when_wall_time_goes_back() {
        let mut clock = HlcClock::new();
        let a = clock.tick(1_000);
        let b = clock.tick(900);
        assert!(b > a);
        assert_eq!(b.physical_ms(), 1_000);
        assert_eq!(b.logical(), 1);
        clock.observe(Hlc::new(5_000, 7));
        let c = clock.tick(1_001);
        assert_eq!((c.physical_ms(), c.logical()), (5_000, 8));
    }
}

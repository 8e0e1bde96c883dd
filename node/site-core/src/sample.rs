//! Deterministic sample data for the demo, the benchmarks and the tests: BLAKE3 in XOF mode, so
//! the bytes are incompressible (they dedupe and chunk like real media) and the same seed gives
//! the same bytes everywhere.

use std::io::Read;

/// An endless stream of pseudo-random bytes for `seed`.
pub fn reader(seed: u64) -> blake3::OutputReader {
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof()
}

/// `len` pseudo-random bytes for `seed`.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    reader(seed).fill(&mut out);
    out
}

/// Writes `len` pseudo-random bytes for `seed` to `out` without holding them in memory.
pub fn write_to(seed: u64, len: u64, out: &mut dyn std::io::Write) -> std::io::Result<u64> {
    std::io::copy(&mut reader(seed).take(len), out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_give_their_own_bytes_every_time() {
        assert_eq!(super::pseudo_random(1, 1000), super::pseudo_random(1, 1000));
        assert_ne!(super::pseudo_random(1, 1000), super::pseudo_random(2, 1000));
        let mut streamed = Vec::new();
        super::write_to(1, 1000, &mut streamed).unwrap();
        assert_eq!(streamed, super::pseudo_random(1, 1000));
    }
}

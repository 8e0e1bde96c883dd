//! Fault rates: what the network and the bucket of a [`World`](crate::world::World) do wrong by
//! themselves (drop, duplicate, delay, corrupt, misbehave at the bucket) and how often the
//! simulator's fault driver strikes (partitions, held links, link resets, crashes, clock jumps).

use crate::Rng;

/// Fault rates.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Probability that a message is dropped.
    pub drop: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Extra random delay (reordering), in milliseconds.
    pub jitter_ms: u64,
    /// Probability per fault step that a partition is made or healed.
    pub partition: f64,
    /// Probability per fault step that a link starts or stops holding its messages.
    pub hold: f64,
    /// Probability per fault step that a link drops and is back a moment later (as when two
    /// sites dial each other at once and the duplicate connection is closed).
    pub reset: f64,
    /// Probability per fault step that a site crashes (and restarts later).
    pub crash: f64,
    /// Probability per fault step that a site's clock jumps.
    pub clock: f64,
    /// Probability that a chunk in flight is corrupted.
    pub corrupt: f64,
    /// Probability that a request to the staging bucket misbehaves: answered late (503
    /// SlowDown, retried), timed out, or — for a chunk read — finds its pack lost or corrupt.
    pub staging: f64,
    /// Probability that a client stops taking a read's data for 0.5–5 s (a paused reader,
    /// `cat big | less`) before it takes the next piece.
    pub pause: f64,
    /// Probability per fault step that a member turns byzantine for one message: it sends a
    /// peer a push with a change in another member's name, signed with its own key.
    pub forge: f64,
    /// Probability per fault step that a member turns byzantine for a moment in another way: it
    /// floods a peer with what nobody asked for (announcements, staging requests for a region it
    /// is not of, chunk requests and chunks), replays its own earlier messages, or relays a
    /// member's changes stamped at the extremes of the clock (0 and `u64::MAX - 1`).
    pub byzantine: f64,
}

impl Faults {
    /// All faults at the given rates' defaults, restricted to the names in `list`
    /// (`drop,duplicate,jitter,partition,hold,reset,crash,clock,corrupt,staging,pause,forge,
    /// byzantine`,
    /// or `none`, or `all`).
    pub fn parse(list: &str) -> Result<Faults, String> {
        let all = Faults {
            drop: 0.02,
            duplicate: 0.02,
            jitter_ms: 40,
            partition: 0.05,
            hold: 0.03,
            reset: 0.5,
            crash: 0.02,
            clock: 0.03,
            corrupt: 0.01,
            staging: 0.05,
            pause: 0.02,
            forge: 0.02,
            byzantine: 0.03,
        };
        let mut f = Faults::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "none" => {}
                "all" => f = all,
                "drop" => f.drop = all.drop,
                "duplicate" => f.duplicate = all.duplicate,
                "jitter" => f.jitter_ms = all.jitter_ms,
                "partition" => f.partition = all.partition,
                "hold" => f.hold = all.hold,
                "reset" => f.reset = all.reset,
                "crash" => f.crash = all.crash,
                "clock" => f.clock = all.clock,
                "corrupt" => f.corrupt = all.corrupt,
                "staging" => f.staging = all.staging,
                "pause" => f.pause = all.pause,
                "forge" => f.forge = all.forge,
                "byzantine" => f.byzantine = all.byzantine,
                other => return Err(format!("unknown fault {other:?}")),
            }
        }
        Ok(f)
    }

    /// Swarm testing: each seed picks its own mix, some faults off.
    pub(crate) fn swarm(rng: &mut Rng) -> Faults {
        let on = |rng: &mut Rng, rate: f64| {
            if rng.chance(0.6) { rate * (0.5 + rng.below(100) as f64 / 100.0) } else { 0.0 }
        };
        Faults {
            drop: on(rng, 0.03),
            duplicate: on(rng, 0.03),
            jitter_ms: if rng.chance(0.6) { rng.below(80) } else { 0 },
            partition: on(rng, 0.06),
            hold: on(rng, 0.04),
            crash: on(rng, 0.03),
            clock: on(rng, 0.04),
            corrupt: on(rng, 0.02),
            staging: on(rng, 0.08),
            reset: on(rng, 0.5),
            pause: on(rng, 0.03),
            forge: on(rng, 0.03),
            // Drawn by `byzantine_rate`, from a generator of its own.
            byzantine: 0.0,
        }
    }

    /// Swarm testing's rate of byzantine strikes, drawn from `rng` (a generator apart from the
    /// one of [`Faults::swarm`], so that each seed's other draws stay what they were before this
    /// fault existed, and its regression seeds with them).
    pub(crate) fn byzantine_rate(rng: &mut Rng) -> f64 {
        if rng.chance(0.6) { 0.04 * (0.5 + rng.below(100) as f64 / 100.0) } else { 0.0 }
    }
}

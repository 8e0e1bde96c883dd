//! Sim: deterministic simulation of a meridian mesh.
//!
//! Many `site_core::Site` cores — the code production runs — live in one process on a simulated
//! network, disk and clock, all driven by one seed ([`world`]). Faults (dropped, duplicated,
//! reordered, held and corrupted messages, partitions, crashes that lose unsynced writes and tear
//! files, wall clocks stepped up to an hour either way, byzantine members that forge, flood,
//! replay and relay changes stamped at the clock's extremes) are injected during a fault phase;
//! then everything heals and the mesh must converge. Checkers outside the code under test watch it: the tree invariant at every
//! site after every step, every completed read returns the bytes of a version of that file, no
//! chunk with a wrong hash is ever stored, and after healing every site shows the same namespace,
//! every live file is readable everywhere and no acknowledged write is lost.
//! Models: TigerBeetle's VOPR, FoundationDB's simulation.
//!
//! The [`world`] (network, bucket, disks, clocks and the executor of the cores' outputs) is
//! shared with the scenario tests, which run it with faults off; the random workload and fault
//! driver of [`run`] is the simulator's own.

pub mod faults;
pub mod rng;
mod simulation;
pub mod world;

pub use faults::Faults;
pub use rng::Rng;

/// What a run may override; everything else the seed picks.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Number of sites (2–6 by default).
    pub sites: Option<usize>,
    /// Number of client operations in the fault phase.
    pub ops: Option<usize>,
    /// Fault rates.
    pub faults: Option<Faults>,
}

/// A successful run.
#[derive(Clone, Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Sites simulated.
    pub sites: usize,
    /// Client operations issued.
    pub ops: usize,
    /// Events processed until the mesh converged.
    pub events: u64,
    /// Bytes the sites read from the staging bucket (zero for seeds with one region).
    pub bytes_from_staging: u64,
    /// Bytes of garbage the sites collected (since their last start).
    pub bytes_collected: u64,
    /// Bytes of cache copies the sites evicted (since their last start).
    pub bytes_evicted: u64,
    /// Hash of the whole event trace.
    pub trace: [u8; 32],
}

/// A failed run: what a checker saw (or what panicked).
#[derive(Clone, Debug)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// What went wrong.
    pub message: String,
}

/// Runs one simulation. Panics in the code under test are failures too.
pub fn run(seed: u64, options: &Options) -> Result<Report, Failure> {
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| simulation::simulate(seed, options)));
    match outcome {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(message)) => Err(Failure { seed, message }),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Err(Failure { seed, message: format!("panic: {message}") })
        }
    }
}

impl Report {
    /// The trace hash in hexadecimal.
    pub fn trace_hex(&self) -> String {
        self.trace.iter().map(|b| format!("{b:02x}")).collect()
    }
}

//! The core of a meridian site, pure: what production runs and the simulator drives.
//!
//! - [`Site`] (`site.rs`, and `site/staging.rs` for reads across regions through the bucket):
//!   the sans-IO state machine that makes every decision of a site. Inputs come in through
//!   `handle_*` methods, effects go out through [`Site::poll_output`].
//! - [`content`]: FastCDC chunking, BLAKE3 hashing and manifests.
//! - [`sample`]: deterministic incompressible sample data for the demo, benchmarks and tests.
//!
//! This crate must never do I/O, read a clock or draw randomness, and its dependency tree holds
//! no async runtime, network stack, database or S3 client (CI checks the simulator's tree,
//! which is this crate's plus the wire protocol's).

pub mod content;
pub mod sample;
mod site;

pub use site::*;

/// Deliberate breakage of a staging or space rule, for testing the testers. Without the `sabotage`
/// feature nothing can be switched on.
pub mod sabotage {
    #[cfg(feature = "sabotage")]
    static STAGE_TWICE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Makes a holder stage a version again while the pack it is in goes up (the rule: one
    /// upload per version and region pair). For tests of the simulator only.
    #[cfg(feature = "sabotage")]
    pub fn set_stage_twice(on: bool) {
        STAGE_TWICE.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    #[cfg(feature = "sabotage")]
    static COLLECT_UNSTABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Makes sites collect garbage without waiting for causal stability: as soon as a version
    /// is unreferenced here (the rule: once every member has integrated what unreferenced it,
    /// and this site everything concurrent with that). For tests of the simulator only.
    #[cfg(feature = "sabotage")]
    pub fn set_collect_unstable(on: bool) {
        COLLECT_UNSTABLE.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether sites collect before stability.
    pub(crate) fn collect_unstable() -> bool {
        #[cfg(feature = "sabotage")]
        {
            COLLECT_UNSTABLE.load(std::sync::atomic::Ordering::Relaxed)
        }
        #[cfg(not(feature = "sabotage"))]
        {
            false
        }
    }

    /// Whether holders stage versions twice.
    pub(crate) fn stage_twice() -> bool {
        #[cfg(feature = "sabotage")]
        {
            STAGE_TWICE.load(std::sync::atomic::Ordering::Relaxed)
        }
        #[cfg(not(feature = "sabotage"))]
        {
            false
        }
    }
}

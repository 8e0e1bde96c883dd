//! meridian's replicated namespace.
//!
//! Every site holds a [`Namespace`] replica and edits it without coordinating with anyone;
//! replicas exchange automerge changes (exports, or a [`SyncSession`] per peer) and, once they
//! hold the same changes, show byte for byte the same tree. Concurrent operations resolve by the
//! rules of the namespace contract in `DESIGN.md`: directories made twice merge, a directory
//! wins a name over a file, the older of two files keeps a name, concurrent writes keep both
//! versions, a write beats a concurrent delete, moves are last-writer-wins and never make a
//! cycle, tags are last-writer-wins and inherited.
//!
//! How: the automerge document is a grow-only set of immutable operations, and the tree is what
//! applying them in the order of their ids (HLC, then site) gives — maintained incrementally,
//! with undo and redo when an operation arrives late (see `tree`).
//!
//! This crate is pure: it never does I/O, never reads a clock and never draws randomness. Time
//! comes in as an [`Hlc`] reading with every operation; identity as a [`SiteId`].

mod codec;
mod error;
mod frontier;
mod hlc;
mod ids;
mod name;
mod namespace;
mod query;
mod tree;
mod trust;
pub mod wire;

/// Deliberate breakage of a contract rule, for testing the testers. Without the `sabotage`
/// feature nothing can be switched on.
pub mod sabotage {
    #[cfg(feature = "sabotage")]
    static SKIP_CYCLE_CHECK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Makes moves skip the cycle check (the contract says a move that would create a cycle is
    /// skipped). For tests of the simulator only.
    #[cfg(feature = "sabotage")]
    pub fn set_skip_cycle_check(on: bool) {
        SKIP_CYCLE_CHECK.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether moves skip the cycle check.
    pub(crate) fn skip_cycle_check() -> bool {
        #[cfg(feature = "sabotage")]
        {
            SKIP_CYCLE_CHECK.load(std::sync::atomic::Ordering::Relaxed)
        }
        #[cfg(not(feature = "sabotage"))]
        {
            false
        }
    }
}

pub use automerge::ChangeHash;
pub use error::{DecodeError, ExchangeError, NameError, OpError, Result};
pub use frontier::Frontier;
pub use hlc::{Hlc, HlcClock};
pub use ids::{ContentId, SITE_ID_MAX_BYTES, SiteId};
pub use name::{
    NAME_MAX_BYTES, PATH_DEPTH_MAX, SYMLINK_TARGET_MAX_BYTES, TAG_KEY_MAX_BYTES, TAG_VALUE_MAX_BYTES,
    check_name, split_path,
};
pub use namespace::{
    DirEntry, EffectiveTag, FindHit, IMPORT_MAX_BYTES, ImportReport, LOAD_MAX_BYTES, Namespace, NewVersion,
    SYNC_MESSAGE_MAX_BYTES, Stat, SyncSession, VersionInfo, WalkEntry,
};
pub use query::{Glob, Query, TagPredicate};
pub use trust::{Keys, PublicKey, SigningKey};

/// The kind of an entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file, with content versions.
    File,
    /// A symbolic link, whose target is stored, never resolved.
    Symlink,
}

/// An entry's own definition of a tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TagValue {
    /// The tag has this value here and below, unless redefined.
    Set(Box<str>),
    /// The tag is explicitly not set here and below, blocking inheritance.
    Unset,
}

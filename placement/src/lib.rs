//! Placement: meridian's objectives language and its evaluation.
//!
//! This crate will hold the parser and checker of objectives (rules such as "files under
//! `/projects/*/flame/*.clip` are kept at every site", "entries tagged `residency=eu` are never
//! placed outside EU sites") and the engine that evaluates them against the namespace
//! ([`crdt_namespace::Namespace`]) to decide which versions each site wants, may hold, or must
//! not hold.
//!
//! Like the namespace it is pure: it never does I/O, never reads a clock and never draws
//! randomness. Evaluating a checked objective cannot fail.
//!
//! Today it only re-exports the namespace types objectives will be written against.

pub use crdt_namespace::{EntryKind, TagValue};

//! Node: one meridian site.
//!
//! - [`content`]: FastCDC chunking, BLAKE3 hashing and manifests.
//! - [`store`]: the durable store — a redb database and a content-addressed chunk directory —
//!   and the put path that streams a file into it.
//!
//! - [`core`]: the sans-IO [`core::Site`], the state machine that makes every decision.
//!
//! To come: the tokio runtime that drives the core, the local control API and the `meridian`
//! command-line tool.

pub mod content;
pub mod core;
pub mod store;
mod varint;

pub use crdt_namespace::{Hlc, Namespace, SiteId};

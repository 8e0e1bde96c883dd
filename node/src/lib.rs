//! Node: one meridian site.
//!
//! - [`content`]: FastCDC chunking, BLAKE3 hashing and manifests.
//! - [`store`]: the durable store — a redb database and a content-addressed chunk directory —
//!   and the put path that streams a file into it.
//!
//! To come: `core` (the sans-IO `Site` state machine that makes every decision), the tokio
//! runtime that drives it, the local control API and the `meridian` command-line tool.

pub mod content;
pub mod store;
mod varint;

pub use crdt_namespace::{Hlc, Namespace, SiteId};

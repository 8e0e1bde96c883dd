//! Node: one meridian site.
//!
//! - [`content`]: FastCDC chunking, BLAKE3 hashing and manifests.
//! - [`store`]: the durable store — a redb database and a content-addressed chunk directory —
//!   and the put path that streams a file into it.
//!
//! - [`core`]: the sans-IO [`core::Site`], the state machine that makes every decision.
//!
//! - [`runtime`]: the daemon — opens the store, drives the core on its own thread, serves the
//!   local control API ([`api`]) on a Unix socket. [`config`] is `meridian.toml`.
//! - `src/main.rs`: the `meridian` binary, daemon and CLI.
//!
//! To come: the network binding (libp2p), so that sites meet.

pub mod api;
pub mod config;
pub mod content;
pub mod core;
pub mod runtime;
pub mod store;

pub use crdt_namespace::{Hlc, Namespace, SiteId};

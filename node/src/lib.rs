//! Node: one meridian site.
//!
//! This crate will hold `core` (the sans-IO `Site` state machine that makes every decision),
//! `store` (one redb database and a content-addressed chunk directory), the tokio runtime that
//! drives the core, the local control API, and the `meridian` command-line tool.
//!
//! Today it holds the namespace a site owns; the rest arrives with issue 3.

pub use crdt_namespace::{Hlc, Namespace, SiteId};

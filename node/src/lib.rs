//! Node: one meridian site.
//!
//! The site's core — the sans-IO `Site`, the content model and sample data — is the crate
//! `site_core` (`node/site-core`), pure, so that the simulator drives exactly what runs here.
//!
//! - [`store`]: the durable store — a redb database and a content-addressed chunk directory —
//!   and the put path that streams a file into it.
//!
//! - [`runtime`]: the daemon — opens the store, drives the core on its own thread, serves the
//!   local control API ([`api`], typed requests, answers and errors; served by `control.rs`)
//!   on a Unix socket. [`config`] is `meridian.toml`.
//!   It meets the other sites through `transport::p2p`, and other regions' payload through the
//!   staging bucket ([`staged`] carries out the core's staging outputs with `transport::staging`).
//! - [`client`]: a blocking client of the control API, for the demo, the testbed and tests.
//!
//! The `meridian` binary (its command line and `meridian demo`) is the crate `meridian`
//! (`node/meridian`); the harness that runs real sites as processes is `cluster`
//! (`testbed/cluster`). Neither is part of this library.

pub mod api;
pub mod client;
pub mod config;
mod control;
pub mod membership;
pub mod runtime;
pub mod staged;
pub mod store;

pub use crdt_namespace::{Hlc, Namespace, SiteId};

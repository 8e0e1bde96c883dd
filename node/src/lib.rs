//! Node: one meridian site.
//!
//! The site's core — the sans-IO `Site`, the content model and sample data — is the crate
//! `site_core` (`node/site-core`), pure, so that the simulator drives exactly what runs here.
//!
//! - [`store`]: the durable store — a redb database and a content-addressed chunk directory —
//!   and the put path that streams a file into it.
//!
//! - [`runtime`]: the daemon — opens the store, drives the core on its own thread, serves the
//!   local control API ([`api`]) on a Unix socket. [`config`] is `meridian.toml`.
//!   It meets the other sites through `transport::p2p`, and other regions' payload through the
//!   staging bucket ([`staged`] carries out the core's staging outputs with `transport::staging`).
//! - [`cli`]: the `meridian` command line (daemon, client, `mesh`, `demo`); `src/main.rs` only
//!   calls it, so the testbed can run the same code as a child process of its own binary.
//! - [`cluster`]: starts several real `meridian` processes on loopback and talks to them
//!   ([`client`]) — the demo and the testbed are built on it. [`demo`] is `meridian demo`.

pub mod api;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod runtime;
pub mod staged;
pub mod store;

pub use crdt_namespace::{Hlc, Namespace, SiteId};

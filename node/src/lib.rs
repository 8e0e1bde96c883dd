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
//!   It meets the other sites through `transport::p2p`, and other regions' payload through the
//!   staging bucket ([`staged`] carries out the core's staging outputs with `transport::staging`).
//! - [`cli`]: the `meridian` command line (daemon, client, `mesh`, `demo`); `src/main.rs` only
//!   calls it, so the testbed can run the same code as a child process of its own binary.
//! - [`cluster`]: starts several real `meridian` processes on loopback and talks to them
//!   ([`client`]) — the demo and the testbed are built on it. [`demo`] is `meridian demo`.
//! - [`sample`]: deterministic incompressible sample data for the demo, benchmarks and tests.

pub mod api;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod content;
pub mod core;
pub mod demo;
pub mod runtime;
pub mod sample;
pub mod staged;
pub mod store;

pub use crdt_namespace::{Hlc, Namespace, SiteId};

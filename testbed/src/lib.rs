//! Testbed: real meridian meshes on one machine.
//!
//! This crate will start real `meridian` processes on loopback (and a real S3 server), run
//! scenarios and benchmarks against them, optionally behind an emulated WAN relay, and report
//! figures.
//!
//! Today it only names the node crate it will launch.

pub use node::SiteId;

//! Sim: deterministic simulation of a meridian mesh.
//!
//! This crate will run many `node::core::Site` instances — the code production runs — in one
//! process on a simulated network, disk, clock and object store, all driven by one seed, with
//! faults injected and invariant checkers outside the code under test.
//!
//! Today it only names the site type it will drive.

pub use node::Namespace;

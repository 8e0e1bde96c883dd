//! `meridian`, the product: the command line of a site ([`cli`]: the daemon, the client
//! commands, `mesh`) and `meridian demo` ([`demo`]). The daemon itself is the `node` library;
//! the demo's mesh of real processes and its staging bucket come from `cluster`.

pub mod cli;
pub mod demo;

//! Testbed: real meridian meshes on one machine.
//!
//! The `testbed` binary runs `meridian` itself (`testbed meridian ARGS…` is `meridian ARGS…`, the
//! same `meridian::cli` code), so a mesh needs no other build product: [`program`] tells
//! [`cluster::Cluster`] to start every site as a child process of this binary. The
//! integration tests (`tests/`) and the benchmarks (`testbed bench`, [`bench`]) are built on it.

pub mod bench;
pub mod rogue;

use std::ffi::OsString;
use std::path::PathBuf;

use cluster::{Cluster, Program};

/// How to run `meridian` through the testbed binary at `exe`.
pub fn program_at(exe: impl Into<PathBuf>) -> Program {
    Program::new(exe, vec![OsString::from("meridian")])
}

/// How to run `meridian` through the running testbed binary.
pub fn program() -> anyhow::Result<Program> {
    Ok(program_at(std::env::current_exe()?))
}

/// A cluster of `n` sites of region `local` named `a`, `b`, `c`, … in a temporary directory.
pub fn cluster(program: Program, n: usize) -> anyhow::Result<Cluster> {
    let names: Vec<String> = (0..n).map(|i| ((b'a' + i as u8) as char).to_string()).collect();
    let specs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "local")).collect();
    Cluster::create(program, None, &specs)
}

/// Bytes of the chunk files in site `i`'s data directory.
pub fn chunk_file_bytes(cluster: &Cluster, i: usize) -> u64 {
    fn walk(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => walk(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&cluster.site(i).dir.join("data").join("chunks"))
}

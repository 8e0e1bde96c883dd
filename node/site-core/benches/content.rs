//! Content benchmarks: chunk + hash throughput on one core (FastCDC cut points and the BLAKE3
//! hash of every chunk) for several FastCDC configurations, the same with the whole-file hash,
//! each part alone, and how many bytes a 1 MiB edit inside a 256 MiB file changes under each
//! configuration.
//!
//! `cargo bench -p site-core --bench content`

use std::collections::HashSet;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use site_core::content::{ChunkHash, ChunkerConfig, Manifest, cut};

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    site_core::sample::pseudo_random(seed, len)
}

fn configs() -> Vec<(&'static str, ChunkerConfig)> {
    let c = |min: u32, avg: u32, max: u32| ChunkerConfig { min_bytes: min, avg_bytes: avg, max_bytes: max };
    vec![
        ("64K", c(16 << 10, 64 << 10, 256 << 10)),
        ("256K", c(64 << 10, 256 << 10, 1 << 20)),
        ("1M (default)", ChunkerConfig::default()),
        ("4M", c(1 << 20, 4 << 20, 16 << 20)),
    ]
}

fn chunk_and_hash(c: &mut Criterion) {
    let data = random_bytes(64 << 20, 42);
    let mut group = c.benchmark_group("chunk+hash, one core");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(10);
    for (name, config) in configs() {
        group.bench_function(name, |b| {
            b.iter(|| cut(&data, config).map(|r| ChunkHash::of(&data[r])).collect::<Vec<ChunkHash>>())
        });
    }
    group.bench_function("1M (default) + whole-file hash", |b| {
        b.iter(|| {
            let chunks: Vec<ChunkHash> =
                cut(&data, ChunkerConfig::default()).map(|r| ChunkHash::of(&data[r])).collect();
            (blake3::hash(&data), chunks)
        })
    });
    group.bench_function("parts: FastCDC cut points only (default)", |b| {
        b.iter(|| cut(&data, ChunkerConfig::default()).count())
    });
    group.bench_function("parts: one BLAKE3 pass only", |b| b.iter(|| blake3::hash(&data)));
    group.finish();
    // Not a timing: the share of a 256 MiB file that a 1 MiB edit in its middle changes.
    let big = random_bytes(256 << 20, 7);
    let mut edited = big.clone();
    let middle = big.len() / 2;
    edited[middle..middle + (1 << 20)].copy_from_slice(&random_bytes(1 << 20, 99));
    for (name, config) in configs() {
        let before = Manifest::of_bytes(&big, config);
        let after = Manifest::of_bytes(&edited, config);
        let old: HashSet<ChunkHash> = before.chunks.iter().map(|c| c.hash).collect();
        let changed: u64 =
            after.chunks.iter().filter(|c| !old.contains(&c.hash)).map(|c| u64::from(c.len)).sum();
        println!(
            "edit-delta {name}: {} chunks, manifest {} bytes, 1 MiB edit changes {} bytes ({:.3}% of the file)",
            after.chunks.len(),
            after.encode().len(),
            changed,
            changed as f64 * 100.0 / big.len() as f64
        );
    }
}

criterion_group!(benches, chunk_and_hash);
criterion_main!(benches);

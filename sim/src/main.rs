//! `sim`: run seeded simulations of a meridian mesh.
//!
//! `sim --seed N` runs one; `sim --seeds A..B` runs many, stopping at the first failure with the
//! command that reproduces it; the last line of a `--seeds` run is one JSON object.

use std::process::ExitCode;
use std::time::Instant;

use sim::{Faults, Options, run};

fn usage() -> ! {
    eprintln!(
        "usage: sim (--seed N | --seeds A..B) [--sites K] [--ops M] [--faults LIST] [--check-determinism]\n\
         LIST: none, all, or a list of drop,duplicate,jitter,partition,hold,reset,crash,clock,\n\
         \x20     corrupt,staging,pause,forge,byzantine"
    );
    std::process::exit(2)
}

fn main() -> ExitCode {
    let mut seeds: Option<(u64, u64)> = None;
    let mut single = false;
    let mut options = Options::default();
    let mut check_determinism = false;
    let mut args = std::env::args().skip(1);
    let mut reproduce = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--seed" => {
                let n: u64 = value().parse().unwrap_or_else(|_| usage());
                seeds = Some((n, n + 1));
                single = true;
            }
            "--seeds" => {
                let v = value();
                let (a, b) = v.split_once("..").unwrap_or_else(|| usage());
                seeds = Some((a.parse().unwrap_or_else(|_| usage()), b.parse().unwrap_or_else(|_| usage())));
            }
            "--sites" => {
                let v = value();
                reproduce.push(format!("--sites {v}"));
                options.sites = Some(v.parse().unwrap_or_else(|_| usage()));
            }
            "--ops" => {
                let v = value();
                reproduce.push(format!("--ops {v}"));
                options.ops = Some(v.parse().unwrap_or_else(|_| usage()));
            }
            "--faults" => {
                let v = value();
                reproduce.push(format!("--faults {v}"));
                options.faults = Some(Faults::parse(&v).unwrap_or_else(|e| {
                    eprintln!("{e}");
                    usage()
                }));
            }
            "--check-determinism" => check_determinism = true,
            _ => usage(),
        }
    }
    let Some((first, end)) = seeds else { usage() };
    let started = Instant::now();
    let (mut ran, mut events, mut staged_seeds, mut staged_bytes) = (0u64, 0u64, 0u64, 0u64);
    let (mut collected_seeds, mut collected_bytes, mut evicted_seeds) = (0u64, 0u64, 0u64);
    let mut failures = 0u64;
    for seed in first..end {
        let outcome = run(seed, &options).and_then(|report| {
            if check_determinism {
                let again = run(seed, &options)?;
                if again.trace != report.trace {
                    return Err(sim::Failure {
                        seed,
                        message: format!(
                            "nondeterminism: traces {} and {}",
                            report.trace_hex(),
                            again.trace_hex()
                        ),
                    });
                }
            }
            Ok(report)
        });
        ran += 1;
        match outcome {
            Ok(report) => {
                events += report.events;
                staged_seeds += u64::from(report.bytes_from_staging > 0);
                staged_bytes += report.bytes_from_staging;
                collected_seeds += u64::from(report.bytes_collected > 0);
                collected_bytes += report.bytes_collected;
                evicted_seeds += u64::from(report.bytes_evicted > 0);
                if single {
                    println!(
                        "seed {seed}: ok — {} sites, {} ops, {} events, {} bytes through staging, trace {}",
                        report.sites,
                        report.ops,
                        report.events,
                        report.bytes_from_staging,
                        report.trace_hex()
                    );
                }
            }
            Err(failure) => {
                failures += 1;
                eprintln!("seed {seed} FAILED: {}", failure.message);
                let extra =
                    if reproduce.is_empty() { String::new() } else { format!(" {}", reproduce.join(" ")) };
                eprintln!("reproduce: cargo run --release -p sim -- --seed {seed}{extra}");
                break;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    if !single {
        println!(
            "{{\"seeds\":{ran},\"failures\":{failures},\"seconds\":{seconds:.2},\"events\":{events},\"seeds_with_staged_reads\":{staged_seeds},\"bytes_from_staging\":{staged_bytes},\"seeds_with_garbage_collected\":{collected_seeds},\"bytes_collected\":{collected_bytes},\"seeds_with_evictions\":{evicted_seeds},\"seeds_per_second\":{:.2}}}",
            ran as f64 / seconds
        );
    }
    if failures > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

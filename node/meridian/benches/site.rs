//! One site, end to end through the daemon: put and get of a 1 GiB file compared with `cp` of
//! the same file in the same run, and putting 10,000 files of 4 KiB.
//!
//! `cargo bench -p meridian --bench site`
//!
//! Each sample runs against a fresh site (a new `meridian node` process), so deduplication never
//! turns a put into a no-op. Put is compared with `cp` followed by `sync` of the copy (a put makes
//! every chunk durable before it answers); get with a plain `cp` (neither syncs).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use node::api::{self, ApiRequest};

const MERIDIAN: &str = env!("CARGO_BIN_EXE_meridian");
const BIG_BYTES: usize = 1 << 30;
const SMALL_FILES: usize = 10_000;
const SMALL_BYTES: usize = 4 << 10;

struct Site {
    dir: tempfile::TempDir,
    config: PathBuf,
    node: Child,
}

impl Site {
    fn start(root: &Path) -> Site {
        let dir = tempfile::tempdir_in(root).unwrap();
        let status = Command::new(MERIDIAN)
            .args(["init", "--site", "bench", "--region", "local", "--dir"])
            .arg(dir.path().join("site"))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let config = dir.path().join("site").join("meridian.toml");
        let node = Command::new(MERIDIAN)
            .arg("--config")
            .arg(&config)
            .arg("node")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let site = Site { dir, config, node };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !site.cli(&["status"]) {
            assert!(Instant::now() < deadline, "the node did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        site
    }

    fn cli(&self, args: &[&str]) -> bool {
        Command::new(MERIDIAN)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    fn socket(&self) -> PathBuf {
        self.config.with_file_name("control.sock")
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.node.kill();
        let _ = self.node.wait();
        let _ = &self.dir;
    }
}

fn random_file(path: &Path, len: usize) {
    let mut file = std::fs::File::create(path).unwrap();
    site_core::sample::write_to(0x9e37_79b9_7f4a_7c15, len as u64, &mut file).unwrap();
}

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap();
    assert!(status.success(), "{cmd:?} failed");
}

fn median(samples: &RefCell<Vec<Duration>>) -> Duration {
    let mut v = samples.borrow().clone();
    v.sort();
    v[v.len() / 2]
}

fn big_file(c: &mut Criterion) {
    let root =
        tempfile::tempdir_in(std::env::var("MERIDIAN_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let source = root.path().join("source.bin");
    random_file(&source, BIG_BYTES);
    let (put_t, cp_sync_t, get_t, cp_t) = Default::default();
    let samples: [&RefCell<Vec<Duration>>; 4] = [&put_t, &cp_sync_t, &get_t, &cp_t];
    let mut group = c.benchmark_group("1 GiB through one site");
    group.throughput(Throughput::Bytes(BIG_BYTES as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));
    // Each sample: `setup` (untimed) gives what the timed `work` needs; `cleanup` undoes it.
    let sampled =
        |samples: &RefCell<Vec<Duration>>, iters: u64, work: &mut dyn FnMut() -> Box<dyn FnOnce()>| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let cleanup = work();
                let took = started.elapsed();
                samples.borrow_mut().push(took);
                total += took;
                cleanup();
            }
            total
        };
    group.bench_function("meridian put", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let site = Site::start(root.path());
                total += sampled(samples[0], 1, &mut || {
                    assert!(site.cli(&["put", source.to_str().unwrap(), "/big.bin"]));
                    Box::new(|| {})
                });
            }
            total
        })
    });
    let copy = root.path().join("copy.bin");
    group.bench_function("cp + sync", |b| {
        b.iter_custom(|iters| {
            sampled(samples[1], iters, &mut || {
                run(Command::new("cp").arg(&source).arg(&copy));
                run(Command::new("sync").arg(&copy));
                let copy = copy.clone();
                Box::new(move || std::fs::remove_file(copy).unwrap())
            })
        })
    });
    let site = Site::start(root.path());
    assert!(site.cli(&["put", source.to_str().unwrap(), "/big.bin"]));
    group.bench_function("meridian get", |b| {
        b.iter_custom(|iters| {
            sampled(samples[2], iters, &mut || {
                assert!(site.cli(&["get", "/big.bin", copy.to_str().unwrap()]));
                let copy = copy.clone();
                Box::new(move || std::fs::remove_file(copy).unwrap())
            })
        })
    });
    group.bench_function("cp", |b| {
        b.iter_custom(|iters| {
            sampled(samples[3], iters, &mut || {
                run(Command::new("cp").arg(&source).arg(&copy));
                let copy = copy.clone();
                Box::new(move || std::fs::remove_file(copy).unwrap())
            })
        })
    });
    group.finish();
    let rate = |d: Duration| BIG_BYTES as f64 / d.as_secs_f64() / (1 << 20) as f64;
    let [put, cp_sync, get, cp] = samples.map(median);
    println!(
        "site-bench put: {:.0} MiB/s vs cp+sync {:.0} MiB/s (ratio {:.2}); get: {:.0} MiB/s vs cp {:.0} MiB/s (ratio {:.2})",
        rate(put),
        rate(cp_sync),
        cp_sync.as_secs_f64() / put.as_secs_f64(),
        rate(get),
        rate(cp),
        cp.as_secs_f64() / get.as_secs_f64()
    );
}

fn small_files(c: &mut Criterion) {
    let root =
        tempfile::tempdir_in(std::env::var("MERIDIAN_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut group = c.benchmark_group("small files through one site");
    group.throughput(Throughput::Elements(SMALL_FILES as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(60));
    group.bench_function("put 10,000 files of 4 KiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let site = Site::start(root.path());
                assert!(site.cli(&["mkdir", "/small"]));
                let socket = site.socket();
                let started = Instant::now();
                runtime.block_on(async {
                    for i in 0..SMALL_FILES {
                        let mut data = vec![0u8; SMALL_BYTES];
                        data[..8].copy_from_slice(&(i as u64).to_le_bytes());
                        let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
                        let request =
                            ApiRequest::Put { path: format!("/small/f{i:05}"), mode: 0o644, mtime_ns: None };
                        api::write_frame(&mut stream, &api::encode_request(&request)).await.unwrap();
                        api::read_answer::<()>(&mut stream).await.unwrap();
                        api::write_frame(&mut stream, &data).await.unwrap();
                        api::write_frame(&mut stream, &[]).await.unwrap();
                        api::read_answer::<api::PutAnswer>(&mut stream).await.unwrap();
                    }
                });
                total += started.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, big_file, small_files);
criterion_main!(benches);

//! `testbed bench`: the mesh benchmarks, each a JSON line on stdout.
//!
//! - `propagation`: creates at one site, time until visible at another (p50, p99 ms);
//! - `pull_1gib`: a 1 GiB file of random data pulled between two sites, against the rate at
//!   which the same disk takes the same bytes (write + fsync) in the same run;
//! - `delta`: bytes moved after a 1 MiB edit inside that file;
//! - `small_files`: 10,000 files of 4 KiB written at one site until all are read at another;
//! - `staged_pull_1gib`: the 1 GiB file read in another region through the staging bucket (a
//!   real S3 server in this process), against a direct pull within the writer's region in the
//!   same run, with the bytes uploaded per version;
//! - `staged_small_files`: the 10,000 small files read in another region through the bucket;
//! - `gc`: 100,000 files of 4 KiB written at one site, then removed (`rm -r`): the time until
//!   their space is reclaimed, and the latency of other requests (`stat`) meanwhile, against
//!   the same requests on the idle site just before.
//!
//! Sites are real processes on loopback in a temporary directory (under `$TMPDIR` if set), and
//! the disk reference writes into that directory, so both measure the same disk.

use std::ffi::OsString;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cluster::Cluster;
use cluster::{StagingStore, use_staging, wait_until};
use node::api::ApiRequest;
use node::client::Client;
use serde_json::json;
use site_core::sample::pseudo_random;

const ALL: [&str; 7] =
    ["propagation", "pull_1gib", "delta", "small_files", "staged_pull_1gib", "staged_small_files", "gc"];
/// How long anything may take to become visible before the benchmark fails.
const VISIBLE_TIMEOUT: Duration = Duration::from_secs(60);

struct Options {
    only: Vec<String>,
    creates: usize,
    pull_mib: usize,
    small_files: usize,
    small_file_bytes: usize,
    parallel: usize,
    gc_files: usize,
}

fn parse(args: &[OsString]) -> anyhow::Result<Options> {
    let mut options = Options {
        only: ALL.iter().map(|s| s.to_string()).collect(),
        creates: 1_000,
        pull_mib: 1_024,
        small_files: 10_000,
        small_file_bytes: 4_096,
        parallel: 16,
        gc_files: 100_000,
    };
    let mut args = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} takes a value"));
        match arg.as_str() {
            "--only" => {
                options.only = value("--only")?.split(',').map(str::to_owned).collect();
                if let Some(bad) = options.only.iter().find(|o| !ALL.contains(&o.as_str())) {
                    bail!("unknown benchmark {bad:?}; the benchmarks are {}", ALL.join(", "));
                }
            }
            "--creates" => options.creates = value("--creates")?.parse()?,
            "--pull-mib" => options.pull_mib = value("--pull-mib")?.parse()?,
            "--small-files" => options.small_files = value("--small-files")?.parse()?,
            "--parallel" => options.parallel = value("--parallel")?.parse::<usize>()?.max(1),
            "--gc-files" => options.gc_files = value("--gc-files")?.parse()?,
            other => bail!(
                "unknown option {other:?} (options: --only, --creates, --pull-mib, --small-files, --parallel, --gc-files)"
            ),
        }
    }
    Ok(options)
}

fn new_cluster() -> anyhow::Result<Cluster> {
    let mut cluster = crate::cluster(crate::program()?, 2)?;
    cluster.start_all()?;
    Ok(cluster)
}

/// Runs the benchmarks named by the arguments (all by default).
pub fn main(args: &[OsString]) -> anyhow::Result<()> {
    let options = parse(args)?;
    let wants = |name: &str| options.only.iter().any(|o| o == name);
    if wants("propagation") {
        propagation(&options)?;
    }
    if wants("pull_1gib") || wants("delta") {
        pull_and_delta(&options, wants("pull_1gib"), wants("delta"))?;
    }
    if wants("small_files") {
        small_files(&options)?;
    }
    if wants("staged_pull_1gib") {
        staged_pull(&options)?;
    }
    if wants("staged_small_files") {
        staged_small_files(&options)?;
    }
    if wants("gc") {
        gc(&options)?;
    }
    Ok(())
}

/// Seconds the disk under `dir` takes to delete `n` files of `size` bytes spread over 256
/// directories (as the chunk store keeps them), written and synced first: what reclaiming
/// them costs at the least.
fn delete_reference(dir: &std::path::Path, n: usize, size: usize) -> anyhow::Result<f64> {
    let root = dir.join("unlink-reference");
    for d in 0..256 {
        std::fs::create_dir_all(root.join(format!("{d:02x}")))?;
    }
    let path = |i: usize| root.join(format!("{:02x}", i % 256)).join(format!("{i:064x}"));
    let data = vec![7u8; size];
    for i in 0..n {
        std::fs::write(path(i), &data)?;
    }
    std::fs::File::open(&root)?.sync_all()?;
    std::process::Command::new("sync").status()?;
    let started = Instant::now();
    for i in 0..n {
        std::fs::remove_file(path(i))?;
    }
    let took = started.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&root)?;
    Ok(took)
}

/// Latencies of `stat` at `client`, in milliseconds, sorted: `n` of them, or as many as come
/// before `stop` says so.
fn stat_latencies(
    client: &Client,
    n: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Vec<f64>> {
    let mut took = Vec::new();
    while took.len() < n && !stop.load(Ordering::Relaxed) {
        let asked = Instant::now();
        client.stat("/kept")?;
        took.push(asked.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(2));
    }
    took.sort_by(f64::total_cmp);
    Ok(took)
}

fn gc(options: &Options) -> anyhow::Result<()> {
    let mut cluster = crate::cluster(crate::program()?, 2)?;
    for i in 0..2 {
        cluster.configure(i, |c| c.gc_grace_secs = 0)?;
    }
    cluster.start_all()?;
    cluster.wait_connected(VISIBLE_TIMEOUT)?;
    let (a, b) = (cluster.site(0).client.clone(), cluster.site(1).client.clone());
    a.mkdir_p("/kept")?;
    a.mkdir_p("/gc")?;
    let n = options.gc_files;
    let size = options.small_file_bytes;
    let path = |i: usize| format!("/gc/f{i:06}");
    let written = Instant::now();
    for_each_parallel(n, options.parallel, |i| {
        a.put(&path(i), &pseudo_random(2_000_000 + i as u64, size))?;
        Ok(())
    })?;
    let written = written.elapsed();
    wait_until(Duration::from_secs(600), || b.exists(&path(n - 1)))?;
    let stored = a.status()?.core.space.store_bytes;
    let never = std::sync::atomic::AtomicBool::new(false);
    let idle = stat_latencies(&a, 2_000, &never)?;
    let done = std::sync::atomic::AtomicBool::new(false);
    let removed = Instant::now();
    a.call::<()>(&ApiRequest::Rm { path: "/gc".into(), recursive: true })?;
    let rm_s = removed.elapsed().as_secs_f64();
    let (during, stable_s, reclaimed_s) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let stats = scope.spawn(|| stat_latencies(&a, usize::MAX, &done));
        let watched = (|| -> anyhow::Result<(f64, f64)> {
            let mut stable = None;
            loop {
                let space = a.status()?.core.space;
                if stable.is_none() && space.held_back_by.is_empty() {
                    stable = Some(removed.elapsed().as_secs_f64());
                }
                if space.store_bytes == 0
                    && space.garbage_versions == 0
                    && crate::chunk_file_bytes(&cluster, 0) == 0
                {
                    return Ok((stable.unwrap_or_default(), removed.elapsed().as_secs_f64()));
                }
                if removed.elapsed() > Duration::from_secs(600) {
                    bail!("{n} removed files not reclaimed within 600 s: {space:?}");
                }
                // The status walks the garbage waiting: asked now and then, it weighs little.
                std::thread::sleep(Duration::from_millis(250));
            }
        })();
        done.store(true, Ordering::Relaxed);
        let during = stats.join().map_err(|_| anyhow::anyhow!("the stat thread panicked"))??;
        let (stable, reclaimed) = watched?;
        Ok((during, stable, reclaimed))
    })?;
    let reference = delete_reference(cluster.root(), n, size)?;
    println!(
        "{}",
        json!({
            "bench": "gc",
            "files": n,
            "file_bytes": size,
            "stored_bytes": stored,
            "written_s": round3(written.as_secs_f64()),
            "rm_s": round3(rm_s),
            "stable_after_s": round3(stable_s),
            "reclaimed_after_s": round3(reclaimed_s),
            "collect_s": round3(reclaimed_s - stable_s),
            "reference_unlink_s": round3(reference),
            "stat_idle_p50_ms": round3(percentile(&idle, 0.5)),
            "stat_idle_p99_ms": round3(percentile(&idle, 0.99)),
            "stat_during_p50_ms": round3(percentile(&during, 0.5)),
            "stat_during_p99_ms": round3(percentile(&during, 0.99)),
            "stat_during_max_ms": round3(percentile(&during, 1.0)),
            "stats_during": during.len(),
        })
    );
    Ok(())
}

/// Runs `job(i)` for every `i` below `n` on `threads` threads; the first error wins.
fn for_each_parallel(
    n: usize,
    threads: usize,
    job: impl Fn(usize) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        job(i)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))?)
    })
}

/// Sites a, b in region eu and c, d in us, all pointed at a staging bucket that `store` runs.
fn regions_cluster() -> anyhow::Result<(Cluster, StagingStore)> {
    let program = crate::program()?;
    let mut cluster = Cluster::create(program, None, &[("a", "eu"), ("b", "eu"), ("c", "us"), ("d", "us")])?;
    let store = StagingStore::start(&cluster.root().join("staging-store"))?;
    use_staging(&cluster, &store)?;
    cluster.start_all()?;
    Ok((cluster, store))
}

fn staged_pull(options: &Options) -> anyhow::Result<()> {
    let (cluster, _store) = regions_cluster()?;
    let clients: Vec<&Client> = (0..4).map(|i| &cluster.site(i).client).collect();
    let size = options.pull_mib << 20;
    let data = pseudo_random(3, size);
    clients[0].put("/big.bin", &data)?;
    for client in &clients[1..] {
        wait_until(VISIBLE_TIMEOUT, || client.exists("/big.bin"))?;
    }
    let want = blake3::hash(&data);
    let timed_read = |client: &Client| -> anyhow::Result<Duration> {
        let started = Instant::now();
        let read = client.read("/big.bin", None)?;
        if blake3::hash(&read) != want {
            bail!("a pulled copy differs");
        }
        Ok(started.elapsed())
    };
    // The reference: b pulls directly from a, within eu.
    let direct = timed_read(clients[1])?;
    // c and d, in us, read at once: one upload serves both.
    let (c, d) = std::thread::scope(|scope| {
        let c = scope.spawn(|| timed_read(clients[2]));
        let d = scope.spawn(|| timed_read(clients[3]));
        (c.join(), d.join())
    });
    let c = c.map_err(|_| anyhow::anyhow!("a reader panicked"))??;
    let d = d.map_err(|_| anyhow::anyhow!("a reader panicked"))??;
    let uploaded = clients[0].status()?.core.bytes_to_staging + clients[1].status()?.core.bytes_to_staging;
    let across_directly = clients[2].status()?.core.bytes_fetched + clients[3].status()?.core.bytes_fetched;
    let staged = size as f64 / 1e6 / c.max(d).as_secs_f64();
    let direct_rate = size as f64 / 1e6 / direct.as_secs_f64();
    println!(
        "{}",
        json!({
            "bench": "staged_pull_1gib",
            "bytes": size,
            "staged_mb_s": staged.round(),
            "direct_mb_s": direct_rate.round(),
            "ratio": round3(staged / direct_rate),
            "readers_in_region": 2,
            "bytes_uploaded": uploaded,
            "uploads_per_version": round3(uploaded as f64 / size as f64),
            "bytes_from_staging": clients[2].status()?.core.bytes_from_staging + clients[3].status()?.core.bytes_from_staging,
            "bytes_read_directly_across_regions": across_directly,
            "target_uploads_per_version": 1,
        })
    );
    Ok(())
}

fn staged_small_files(options: &Options) -> anyhow::Result<()> {
    let (cluster, _store) = regions_cluster()?;
    let (a, c) = (&cluster.site(0).client, &cluster.site(2).client);
    a.mkdir_p("/small")?;
    let n = options.small_files;
    let content = |i: usize| pseudo_random(2_000_000 + i as u64, options.small_file_bytes);
    let path = |i: usize| format!("/small/f{i:05}");
    for_each_parallel(n, options.parallel, |i| a.put(&path(i), &content(i)).map(drop))?;
    wait_until(VISIBLE_TIMEOUT, || c.exists(&path(n - 1)))?;
    let started = Instant::now();
    for_each_parallel(n, options.parallel, |i| {
        if c.read(&path(i), None)? != content(i) {
            bail!("{} read in the other region differs", path(i));
        }
        Ok(())
    })?;
    let took = started.elapsed();
    println!(
        "{}",
        json!({
            "bench": "staged_small_files",
            "files": n,
            "file_bytes": options.small_file_bytes,
            "parallel_readers": options.parallel,
            "read_in_other_region_s": round3(took.as_secs_f64()),
            "files_per_s": (n as f64 / took.as_secs_f64()).round(),
            "bytes_uploaded": a.status()?.core.bytes_to_staging,
            "bytes_from_staging": c.status()?.core.bytes_from_staging,
            "target_files_per_s": 1000,
        })
    );
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn propagation(options: &Options) -> anyhow::Result<()> {
    let cluster = new_cluster()?;
    let (a, b) = (&cluster.site(0).client, &cluster.site(1).client);
    a.mkdir_p("/p")?;
    wait_until(VISIBLE_TIMEOUT, || b.exists("/p"))?;
    let mut from_commit = Vec::with_capacity(options.creates);
    let mut from_request = Vec::with_capacity(options.creates);
    for i in 0..options.creates {
        let path = format!("/p/d{i}");
        let asked = Instant::now();
        a.call::<()>(&ApiRequest::Mkdir { path: path.clone(), parents: false, mode: None })?;
        let committed = Instant::now();
        wait_for(b, &path, Duration::ZERO)?;
        from_commit.push(committed.elapsed().as_secs_f64() * 1e3);
        from_request.push(asked.elapsed().as_secs_f64() * 1e3);
    }
    from_commit.sort_by(f64::total_cmp);
    from_request.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "bench": "propagation",
            "creates": options.creates,
            "p50_ms": round3(percentile(&from_commit, 0.5)),
            "p99_ms": round3(percentile(&from_commit, 0.99)),
            "max_ms": round3(percentile(&from_commit, 1.0)),
            "from_request_p50_ms": round3(percentile(&from_request, 0.5)),
            "from_request_p99_ms": round3(percentile(&from_request, 0.99)),
            "target_p50_ms": 10, "target_p99_ms": 50,
        })
    );
    Ok(())
}

/// Polls `client` until `path` exists, `gap` apart (zero: without sleeping, for the finest
/// timing).
fn wait_for(client: &Client, path: &str, gap: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while !client.exists(path)? {
        if start.elapsed() > VISIBLE_TIMEOUT {
            bail!("{path} did not appear within {VISIBLE_TIMEOUT:?}");
        }
        std::thread::sleep(gap);
    }
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn fetched(client: &Client) -> anyhow::Result<u64> {
    Ok(client.status()?.core.bytes_fetched)
}

/// MB/s at which the disk under `dir` takes `data` (1 MiB writes, then fsync).
fn disk_rate(dir: &std::path::Path, data: &[u8]) -> anyhow::Result<f64> {
    let path = dir.join("reference.bin");
    let started = Instant::now();
    let mut file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    for piece in data.chunks(1 << 20) {
        file.write_all(piece)?;
    }
    file.sync_all()?;
    let took = started.elapsed();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(data.len() as f64 / 1e6 / took.as_secs_f64())
}

fn pull_and_delta(options: &Options, report_pull: bool, report_delta: bool) -> anyhow::Result<()> {
    let cluster = new_cluster()?;
    let (a, b) = (&cluster.site(0).client, &cluster.site(1).client);
    let size = options.pull_mib << 20;
    let mut data = pseudo_random(1, size);
    a.mkdir_p("/big")?;
    a.put("/big/file.bin", &data)?;
    wait_until(VISIBLE_TIMEOUT, || b.exists("/big/file.bin"))?;
    let before = fetched(b)?;
    let started = Instant::now();
    let mut first_byte = None;
    let read = b.read_with("/big/file.bin", None, &mut |_| {
        first_byte.get_or_insert_with(|| started.elapsed());
    })?;
    let took = started.elapsed();
    // The reader has every byte; the site makes its copy durable (synced and indexed) once the
    // transfer is over. The disk reference runs after that, on a quiet disk.
    wait_until(VISIBLE_TIMEOUT, || Ok(b.status()?.fetched_chunks_not_yet_durable == 0))?;
    let durable = started.elapsed();
    let moved = fetched(b)? - before;
    if read != size as u64 || moved != size as u64 {
        bail!("pulled {read} bytes ({moved} over the network) of {size}");
    }
    let pull = size as f64 / 1e6 / took.as_secs_f64();
    let disk = disk_rate(cluster.root(), &data)?;
    if report_pull {
        println!(
            "{}",
            json!({
                "bench": "pull_1gib",
                "bytes": size,
                "pull_mb_s": pull.round(),
                "first_byte_ms": round3(first_byte.unwrap_or_default().as_secs_f64() * 1e3),
                "durable_at_reader_mb_s": (size as f64 / 1e6 / durable.as_secs_f64()).round(),
                "disk_write_fsync_mb_s": disk.round(),
                "ratio": round3(pull / disk),
                "target_ratio": 0.8, "target_mb_s": 300,
            })
        );
    }
    if report_delta {
        let at = size / 2;
        data[at..at + (1 << 20)].copy_from_slice(&pseudo_random(2, 1 << 20));
        let answer = a.put("/big/file.bin", &data)?;
        let want = a.version_id("/big/file.bin")?;
        wait_until(VISIBLE_TIMEOUT, || Ok(b.version_id("/big/file.bin")? == want))?;
        let before = fetched(b)?;
        let read = b.read("/big/file.bin", None)?;
        let moved = fetched(b)? - before;
        if blake3::hash(&read) != blake3::hash(&data) {
            bail!("the edited file read at the other site differs");
        }
        println!(
            "{}",
            json!({
                "bench": "delta",
                "file_bytes": size,
                "edit_bytes": 1 << 20,
                "new_bytes_at_writer": answer.new_bytes,
                "moved_bytes": moved,
                "fraction": moved as f64 / size as f64,
                "target_fraction": 0.02,
            })
        );
    }
    Ok(())
}

fn small_files(options: &Options) -> anyhow::Result<()> {
    let cluster = new_cluster()?;
    let (a, b) = (cluster.site(0).client.clone(), cluster.site(1).client.clone());
    a.mkdir_p("/small")?;
    wait_until(VISIBLE_TIMEOUT, || b.exists("/small"))?;
    let n = options.small_files;
    let size = options.small_file_bytes;
    let content = |i: usize| pseudo_random(1_000_000 + i as u64, size);
    let path = |i: usize| format!("/small/f{i:05}");
    let next_write = AtomicUsize::new(0);
    let next_read = AtomicUsize::new(0);
    let started = Instant::now();
    let written_at = std::sync::Mutex::new(Duration::ZERO);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut workers = Vec::new();
        for _ in 0..options.parallel {
            workers.push(scope.spawn(|| -> anyhow::Result<()> {
                loop {
                    let i = next_write.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        let mut w = written_at.lock().unwrap_or_else(|e| e.into_inner());
                        *w = (*w).max(started.elapsed());
                        return Ok(());
                    }
                    a.put(&path(i), &content(i))?;
                }
            }));
            workers.push(scope.spawn(|| -> anyhow::Result<()> {
                loop {
                    let i = next_read.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok(());
                    }
                    // Sixteen readers polling without a pause would load the site they measure.
                    wait_for(&b, &path(i), Duration::from_millis(5))?;
                    if b.read(&path(i), None)? != content(i) {
                        bail!("{} read at the other site differs", path(i));
                    }
                }
            }));
        }
        for worker in workers {
            worker.join().map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))??;
        }
        Ok(())
    })?;
    let took = started.elapsed();
    let written = *written_at.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "{}",
        json!({
            "bench": "small_files",
            "files": n,
            "file_bytes": size,
            "parallel_clients": options.parallel,
            "written_s": round3(written.as_secs_f64()),
            "all_readable_at_other_s": round3(took.as_secs_f64()),
            "files_per_s": (n as f64 / took.as_secs_f64()).round(),
            "target_s": 5,
        })
    );
    Ok(())
}

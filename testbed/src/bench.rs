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
//!   the same requests on the idle site just before;
//! - `mount_read`: a 1 GiB file (`--pull-mib`) read through the mount (`meridian mount`, FUSE)
//!   at the other site with `dd` into /dev/null, cold (its bytes not held at the reading site)
//!   and warm (held), each against `meridian get` (a child process, writing its copy into the
//!   temporary directory) in the same state in the same run. Cold, the mount reads one file
//!   and `get` another of the same size with different bytes, so each fetches every byte of
//!   its own and neither gains from the other (checked: the bytes the site fetched during each
//!   cold read are the file's size). Warm, both read the file the mount read cold, which the
//!   site now holds (the bytes fetched meanwhile are reported: none). The mount keeps the
//!   kernel's page cache of a file whose version did not change, so a warm read could come
//!   from memory: before every timed read the dirty pages are written back (`sync`) and the
//!   kernel's caches dropped (`3` to `/proc/sys/vm/drop_caches`, which takes root;
//!   `caches_dropped` says whether it could), and each read opens the file afresh. The copies
//!   are checked (BLAKE3) after the timed reads;
//! - `mount_tree`: a real source tree (the crate with the most files among a few well-known
//!   ones in the cargo registry, `$CARGO_HOME/registry/src`; without a registry, a generated
//!   tree of 1,000 files of source-like sizes), first copied into the temporary directory,
//!   then copied with `cp -a` into the mount against the same `cp -a` to a directory on the
//!   same disk, and against `rsync -a --fsync` to another (each file on disk once closed, as
//!   the mount's `close` makes it); once every file is at the other site, the whole tree read there through its
//!   mount (a walk that `lstat`s every entry and reads every file, in this process) against
//!   the same walk of the local copy;
//! - `mount_meta`: 100,000 empty files (`--meta-entries`; 100 per directory) made through the
//!   node API at one site, then, once all are at the other site, listed through that site's
//!   mount (metadata is local at every site) with `ls -lR` (its lines counted to check that
//!   every entry was listed) and with a walk that `lstat`s every entry, against the same over
//!   a local tree of the same shape on the same disk.
//!
//! Sites are real processes on loopback in a temporary directory (under `$TMPDIR` if set), and
//! the disk reference writes into that directory, so both measure the same disk. The mounts
//! (which take root and FUSE) and the local copies they are measured against are in that
//! directory too; the caches are dropped before each timed step of the `mount_*` benchmarks,
//! the reference's as well as the mount's (for the whole machine).

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cluster::Cluster;
use cluster::{StagingStore, use_staging, wait_until};
use node::api::{ApiError, ApiRequest, ErrorKind};
use node::client::Client;
use serde_json::json;
use site_core::sample::pseudo_random;

const ALL: [&str; 10] = [
    "propagation",
    "pull_1gib",
    "delta",
    "small_files",
    "staged_pull_1gib",
    "staged_small_files",
    "gc",
    "mount_read",
    "mount_tree",
    "mount_meta",
];
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
    meta_entries: usize,
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
        meta_entries: 100_000,
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
            "--meta-entries" => options.meta_entries = value("--meta-entries")?.parse::<usize>()?.max(1),
            other => bail!(
                "unknown option {other:?} (options: --only, --creates, --pull-mib, --small-files, --parallel, --gc-files, --meta-entries)"
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
    if wants("mount_read") {
        mount_read(&options)?;
    }
    if wants("mount_tree") {
        mount_tree()?;
    }
    if wants("mount_meta") {
        mount_meta(&options)?;
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

/// How long the bulk of a `mount_*` benchmark (100,000 entries, a whole tree) may take to reach
/// the other site before the benchmark fails.
const BULK_TIMEOUT: Duration = Duration::from_secs(600);

/// Two sites, each with its namespace mounted (FUSE) in the cluster's directory; unmounted when
/// dropped, before the sites stop and the directory, with everything a benchmark put there, is
/// removed.
struct MountedSites {
    mounts: Vec<mount::Mounted>,
    cluster: Cluster,
}

impl MountedSites {
    fn start() -> anyhow::Result<MountedSites> {
        let cluster = new_cluster()?;
        cluster.wait_connected(VISIBLE_TIMEOUT)?;
        let mut sites = MountedSites { mounts: Vec::new(), cluster };
        for site in sites.cluster.sites() {
            let dir = sites.cluster.root().join(format!("mnt-{}", site.name));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut options = mount::MountOptions::new(site.dir.join("mount-scratch"));
            options.read_timeout = VISIBLE_TIMEOUT;
            let mounted = mount::mount(site.client.socket(), &dir, &options).with_context(|| {
                format!("mounting site {} at {} (this takes root)", site.name, dir.display())
            })?;
            sites.mounts.push(mounted);
        }
        Ok(sites)
    }

    /// Where site `i` is mounted.
    fn dir(&self, i: usize) -> &Path {
        self.mounts[i].dir()
    }

    fn client(&self, i: usize) -> &Client {
        &self.cluster.site(i).client
    }

    /// The cluster's directory.
    fn root(&self) -> &Path {
        self.cluster.root()
    }
}

impl Drop for MountedSites {
    fn drop(&mut self) {
        for mounted in self.mounts.drain(..) {
            let dir = mounted.dir().display().to_string();
            if let Err(e) = mounted.unmount() {
                eprintln!("unmounting {dir}: {e:#}");
            }
        }
    }
}

/// Writes the dirty pages back (`sync`), then drops the kernel's page, dentry and inode caches
/// (`3` to `/proc/sys/vm/drop_caches`, which takes root): whether it could.
fn drop_caches() -> bool {
    let synced = Command::new("sync").status().is_ok_and(|s| s.success());
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Runs `program ARGS…` to completion in the C locale: its output, or its stderr as the error.
fn run(program: &str, args: &[&OsStr]) -> anyhow::Result<std::process::Output> {
    let shown = || {
        let args: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        format!("{program} {}", args.join(" "))
    };
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", shown()))?;
    if !out.status.success() {
        bail!("{} failed ({}): {}", shown(), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// What `f` returns, and the seconds it took.
fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let started = Instant::now();
    let value = f()?;
    Ok((value, started.elapsed().as_secs_f64()))
}

fn mb_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

/// Reads the file at `path` with `dd` (1 MiB reads) into /dev/null; fails unless `dd` read
/// `size` bytes.
fn dd_read(path: &Path, size: u64) -> anyhow::Result<()> {
    let mut input = OsString::from("if=");
    input.push(path);
    let out = run("dd", &[input.as_os_str(), OsStr::new("of=/dev/null"), OsStr::new("bs=1M")])?;
    let said = String::from_utf8_lossy(&out.stderr);
    let read = said
        .lines()
        .filter(|l| l.contains(" bytes"))
        .find_map(|l| l.split_whitespace().next()?.parse::<u64>().ok());
    if read != Some(size) {
        bail!("dd read {read:?} bytes of {} ({size} bytes): {}", path.display(), said.trim());
    }
    Ok(())
}

/// BLAKE3 of the file at `path`.
fn hash_file(path: &Path) -> anyhow::Result<blake3::Hash> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut std::io::BufReader::with_capacity(1 << 20, file), &mut hasher)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(hasher.finalize())
}

/// Runs `read`, a read at the site of `client`: the seconds it took, and the bytes the site
/// fetched from others meanwhile (counted once what it fetched is durable, which is not timed).
fn read_fetching(client: &Client, read: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<(f64, u64)> {
    let before = fetched(client)?;
    let ((), took) = timed(read)?;
    wait_until(VISIBLE_TIMEOUT, || Ok(client.status()?.fetched_chunks_not_yet_durable == 0))?;
    Ok((took, fetched(client)? - before))
}

fn mount_read(options: &Options) -> anyhow::Result<()> {
    let sites = MountedSites::start()?;
    let (a, b) = (sites.client(0), sites.client(1));
    let size = (options.pull_mib as u64) << 20;
    // The same size, other bytes: the cold read through the mount fetches the one, the cold
    // get the other; the warm reads are both of the first.
    let (for_mount, for_get) = ("/read/mount.bin", "/read/get.bin");
    a.mkdir_p("/read")?;
    for (path, seed) in [(for_mount, 11), (for_get, 12)] {
        a.put_from(path, &mut site_core::sample::reader(seed).take(size))
            .with_context(|| format!("writing {path} at a"))?;
    }
    let want = {
        let mut hasher = blake3::Hasher::new();
        site_core::sample::write_to(11, size, &mut hasher)?;
        hasher.finalize()
    };
    for path in [for_mount, for_get] {
        wait_until(VISIBLE_TIMEOUT, || b.exists(path))?;
    }
    let mounted = sites.dir(1).join(for_mount.trim_start_matches('/'));
    wait_until(VISIBLE_TIMEOUT, || Ok(mounted.metadata().is_ok_and(|m| m.len() == size)))?;
    let copy = sites.root().join("got.bin");
    let copy_arg = copy.to_str().context("a UTF-8 temporary directory")?;
    let get = |path: &str| -> anyhow::Result<()> {
        sites.cluster.meridian(1, &["get", path, copy_arg])?;
        Ok(())
    };
    let mut dropped = drop_caches();
    let (mount_cold, mount_cold_fetched) = read_fetching(b, || dd_read(&mounted, size))?;
    dropped &= drop_caches();
    let (get_cold, get_cold_fetched) = read_fetching(b, || get(for_get))?;
    std::fs::remove_file(&copy).with_context(|| format!("removing {}", copy.display()))?;
    if mount_cold_fetched < size || get_cold_fetched < size {
        bail!(
            "a cold read was not: the reading site fetched {mount_cold_fetched} bytes for the mount's and \
             {get_cold_fetched} for get's, of {size}"
        );
    }
    dropped &= drop_caches();
    let (mount_warm, mount_warm_fetched) = read_fetching(b, || dd_read(&mounted, size))?;
    dropped &= drop_caches();
    let (get_warm, get_warm_fetched) = read_fetching(b, || get(for_mount))?;
    if hash_file(&copy)? != want {
        bail!("the copy get made of {for_mount} differs");
    }
    std::fs::remove_file(&copy).with_context(|| format!("removing {}", copy.display()))?;
    if hash_file(&mounted)? != want {
        bail!("{for_mount} read through the mount differs");
    }
    let rates = [mount_cold, get_cold, mount_warm, get_warm].map(|secs| mb_s(size, secs));
    println!(
        "{}",
        json!({
            "bench": "mount_read",
            "bytes": size,
            "mount_cold_mb_s": rates[0].round(),
            "get_cold_mb_s": rates[1].round(),
            "cold_ratio": round3(rates[0] / rates[1]),
            "mount_warm_mb_s": rates[2].round(),
            "get_warm_mb_s": rates[3].round(),
            "warm_ratio": round3(rates[2] / rates[3]),
            "mount_cold_bytes_fetched": mount_cold_fetched,
            "get_cold_bytes_fetched": get_cold_fetched,
            "mount_warm_bytes_fetched": mount_warm_fetched,
            "get_warm_bytes_fetched": get_warm_fetched,
            "caches_dropped": dropped,
            "target_ratio": 0.8,
        })
    );
    Ok(())
}

/// The crates whose source `mount_tree` copies: of those in the registry, the one with the most
/// files (the first by path of equals).
const TREE_CRATES: [&str; 6] = ["aws-sdk-s3", "tokio", "libc", "automerge", "syn", "regex-syntax"];

/// Files of the tree `mount_tree` makes when there is no registry.
const GENERATED_FILES: usize = 1_000;

/// The directory in the cargo registry whose tree `mount_tree` copies, if there is one.
fn registry_tree() -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))?;
    let sorted = |dir: &Path| -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> =
            std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
        paths.sort();
        paths
    };
    let is_known = |name: &str| {
        TREE_CRATES.iter().any(|known| {
            name.strip_prefix(known)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|version| version.starts_with(|c: char| c.is_ascii_digit()))
        })
    };
    let mut best: Option<(usize, PathBuf)> = None;
    for index in sorted(&cargo_home.join("registry").join("src")) {
        for krate in sorted(&index) {
            if !krate.file_name().and_then(OsStr::to_str).is_some_and(is_known) {
                continue;
            }
            let Ok(tree) = Tree::scan(&krate) else { continue };
            if best.as_ref().is_none_or(|(files, _)| tree.files.len() > *files) {
                best = Some((tree.files.len(), krate));
            }
        }
    }
    best.map(|(_, krate)| krate)
}

/// Writes a tree of [`GENERATED_FILES`] files of pseudo-random bytes in 40 directories at
/// `root`, their sizes drawn like source files' (log-uniform between 100 B and 64 KiB).
fn generate_tree(root: &Path) -> anyhow::Result<()> {
    let draws = pseudo_random(4, 4 * GENERATED_FILES);
    let (low, high) = (100f64.ln(), 65_536f64.ln());
    for (i, draw) in draws.chunks_exact(4).enumerate() {
        let u = f64::from(u32::from_le_bytes(<[u8; 4]>::try_from(draw)?)) / (f64::from(u32::MAX) + 1.0);
        let size = (low + u * (high - low)).exp() as usize;
        let dir = root.join("src").join(format!("m{:02}", i % 40));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("f{i:04}.rs"));
        std::fs::write(&path, pseudo_random(5_000_000 + i as u64, size))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// What a tree holds: its files (paths relative to it, and sizes), sorted, and how many
/// directories and other entries (symlinks).
struct Tree {
    files: Vec<(String, u64)>,
    dirs: usize,
    others: usize,
}

impl Tree {
    fn scan(root: &Path) -> anyhow::Result<Tree> {
        let mut tree = Tree { files: Vec::new(), dirs: 0, others: 0 };
        tree.walk(root, "")?;
        tree.files.sort();
        Ok(tree)
    }

    fn walk(&mut self, dir: &Path, prefix: &str) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(OsStr::to_str)
                .with_context(|| format!("{} is not a UTF-8 name (the namespace's are)", path.display()))?;
            let rel = format!("{prefix}{name}");
            let meta = path.symlink_metadata().with_context(|| format!("stat {}", path.display()))?;
            if meta.is_dir() {
                self.dirs += 1;
                self.walk(&path, &format!("{rel}/"))?;
            } else if meta.is_file() {
                self.files.push((rel, meta.len()));
            } else {
                self.others += 1;
            }
        }
        Ok(())
    }

    fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, size)| size).sum()
    }
}

/// Walks the tree at `dir`, `lstat`ing every entry and reading every file through: how many
/// files and bytes.
fn read_tree(dir: &Path) -> anyhow::Result<(usize, u64)> {
    fn walk(dir: &Path, buf: &mut [u8], files: &mut usize, bytes: &mut u64) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            let meta = path.symlink_metadata().with_context(|| format!("stat {}", path.display()))?;
            if meta.is_dir() {
                walk(&path, buf, files, bytes)?;
            } else if meta.is_file() {
                let mut file =
                    std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                loop {
                    let n = file.read(buf).with_context(|| format!("reading {}", path.display()))?;
                    if n == 0 {
                        break;
                    }
                    *bytes += n as u64;
                }
                *files += 1;
            }
        }
        Ok(())
    }
    let mut buf = vec![0u8; 1 << 20];
    let (mut files, mut bytes) = (0, 0);
    walk(dir, &mut buf, &mut files, &mut bytes)?;
    Ok((files, bytes))
}

/// Polls `client` until the file at `path` is there with `size` bytes; fails once
/// [`BULK_TIMEOUT`] has passed since `since`.
fn wait_for_size(client: &Client, path: &str, size: u64, since: Instant) -> anyhow::Result<()> {
    loop {
        match client.stat(path) {
            Ok(stat) if stat.size == size => return Ok(()),
            Ok(_) => {}
            Err(e) if ApiError::kind_of(&e) == Some(ErrorKind::NotFound) => {}
            Err(e) => return Err(e),
        }
        if since.elapsed() > BULK_TIMEOUT {
            bail!("{path} did not reach the other site with its {size} bytes within {BULK_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn mount_tree() -> anyhow::Result<()> {
    let sites = MountedSites::start()?;
    let root = sites.root();
    let source = root.join("tree-source");
    let origin = match registry_tree() {
        Some(krate) => {
            run("cp", &[OsStr::new("-R"), krate.as_os_str(), source.as_os_str()])?;
            krate.file_name().unwrap_or_default().to_string_lossy().into_owned()
        }
        None => {
            generate_tree(&source)?;
            format!("generated ({GENERATED_FILES} files)")
        }
    };
    let tree = Tree::scan(&source)?;
    let (files, bytes) = (tree.files.len(), tree.bytes());
    let local = root.join("tree-local");
    let into_mount = sites.dir(0).join("tree");
    let cp = |to: &Path| run("cp", &[OsStr::new("-a"), source.as_os_str(), to.as_os_str()]).map(drop);
    let mut dropped = drop_caches();
    let ((), cp_local) = timed(|| cp(&local))?;
    dropped &= drop_caches();
    let ((), cp_mount) = timed(|| cp(&into_mount))?;
    let copied = Instant::now();
    // A reference as durable as the mount's copy (each file on disk when it is closed):
    // `rsync -a --fsync` into a local directory, when rsync is there.
    dropped &= drop_caches();
    let durable = root.join("tree-local-fsync");
    let synced = Command::new("rsync").arg("--version").output().is_ok_and(|o| o.status.success());
    let cp_local_fsync = if synced {
        let mut from = source.clone().into_os_string();
        from.push("/");
        Some(
            timed(|| run("rsync", &[OsStr::new("-a"), OsStr::new("--fsync"), &from, durable.as_os_str()]))?.1,
        )
    } else {
        None
    };
    let b = sites.client(1);
    for (rel, size) in &tree.files {
        wait_for_size(b, &format!("/tree/{rel}"), *size, copied)?;
    }
    let at_other = copied.elapsed().as_secs_f64();
    let check = |(read_files, read_bytes): (usize, u64), at: &Path| -> anyhow::Result<()> {
        if (read_files, read_bytes) != (files, bytes) {
            bail!(
                "read {read_files} files, {read_bytes} bytes at {}; the tree has {files}, {bytes}",
                at.display()
            );
        }
        Ok(())
    };
    let at_b = sites.dir(1).join("tree");
    dropped &= drop_caches();
    let (read, read_b) = timed(|| read_tree(&at_b))?;
    check(read, &at_b)?;
    dropped &= drop_caches();
    let (read, read_local) = timed(|| read_tree(&local))?;
    check(read, &local)?;
    println!(
        "{}",
        json!({
            "bench": "mount_tree",
            "tree": origin,
            "files": files,
            "dirs": tree.dirs,
            "other_entries": tree.others,
            "bytes": bytes,
            "cp_into_mount_s": round3(cp_mount),
            "cp_local_s": round3(cp_local),
            "cp_ratio": round3(cp_mount / cp_local),
            "rsync_fsync_local_s": cp_local_fsync.map(round3),
            "cp_ratio_to_rsync_fsync": cp_local_fsync.map(|t| round3(cp_mount / t)),
            "all_at_other_after_s": round3(at_other),
            "read_at_other_s": round3(read_b),
            "read_at_other_files_per_s": (files as f64 / read_b).round(),
            "read_at_other_mb_s": round3(mb_s(bytes, read_b)),
            "read_local_files_per_s": (files as f64 / read_local).round(),
            "read_local_mb_s": round3(mb_s(bytes, read_local)),
            "caches_dropped": dropped,
            "target_cp_ratio": 3,
        })
    );
    Ok(())
}

/// Files per directory in `mount_meta`'s tree.
const META_FILES_PER_DIR: usize = 100;

/// Polls `client` until directory `path` lists `want` entries; fails once [`BULK_TIMEOUT`] has
/// passed since `since`.
fn wait_listed(client: &Client, path: &str, want: usize, since: Instant) -> anyhow::Result<()> {
    loop {
        match client.list(path) {
            Ok(names) if names.len() == want => return Ok(()),
            Ok(_) => {}
            Err(e) if ApiError::kind_of(&e) == Some(ErrorKind::NotFound) => {}
            Err(e) => return Err(e),
        }
        if since.elapsed() > BULK_TIMEOUT {
            bail!("{path} did not list its {want} entries at the other site within {BULK_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `ls -lR` over the tree at `dir`, checking that it listed `dirs` directories and `files`
/// files: the seconds it took.
fn ls_lr(dir: &Path, dirs: usize, files: usize) -> anyhow::Result<f64> {
    let (out, took) = timed(|| run("ls", &[OsStr::new("-lR"), dir.as_os_str()]))?;
    let listed =
        |kind: u8| out.stdout.split(|&c| c == b'\n').filter(|line| line.first() == Some(&kind)).count();
    let (listed_dirs, listed_files) = (listed(b'd'), listed(b'-'));
    if (listed_dirs, listed_files) != (dirs, files) {
        bail!(
            "ls -lR {} listed {listed_dirs} directories and {listed_files} files, not {dirs} and {files}",
            dir.display()
        );
    }
    Ok(took)
}

/// Walks the tree at `dir`, `lstat`ing every entry below it: how many there are.
fn lstat_tree(dir: &Path) -> anyhow::Result<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let meta = std::fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
        count += 1;
        if meta.is_dir() {
            count += lstat_tree(&path)?;
        }
    }
    Ok(count)
}

fn mount_meta(options: &Options) -> anyhow::Result<()> {
    let sites = MountedSites::start()?;
    let (a, b) = (sites.client(0), sites.client(1));
    let files = options.meta_entries;
    let dirs = files.div_ceil(META_FILES_PER_DIR);
    let entries = dirs + files;
    let dir = |d: usize| format!("d{d:04}");
    let file = |i: usize| format!("{}/f{:03}", dir(i / META_FILES_PER_DIR), i % META_FILES_PER_DIR);
    a.mkdir_p("/meta")?;
    let ((), created) = timed(|| {
        for_each_parallel(dirs, options.parallel, |d| {
            a.call::<()>(&ApiRequest::Mkdir { path: format!("/meta/{}", dir(d)), parents: false, mode: None })
        })?;
        for_each_parallel(files, options.parallel, |i| a.put(&format!("/meta/{}", file(i)), &[]).map(drop))
    })?;
    let made = Instant::now();
    wait_listed(b, "/meta", dirs, made)?;
    for d in 0..dirs {
        let want = META_FILES_PER_DIR.min(files - d * META_FILES_PER_DIR);
        wait_listed(b, &format!("/meta/{}", dir(d)), want, made)?;
    }
    let at_other = made.elapsed().as_secs_f64();
    // The local tree of the same shape, on the same disk.
    let local = sites.root().join("meta-local");
    for d in 0..dirs {
        let path = local.join(dir(d));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    }
    for i in 0..files {
        let path = local.join(file(i));
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    }
    let walk = |tree: &Path| -> anyhow::Result<f64> {
        let (walked, took) = timed(|| lstat_tree(tree))?;
        if walked != entries {
            bail!("walking {} found {walked} entries of {entries}", tree.display());
        }
        Ok(took)
    };
    // Measured at the other site's mount: every entry is there, and its metadata is local.
    let mounted = sites.dir(1).join("meta");
    let mut dropped = drop_caches();
    let ls_mount = ls_lr(&mounted, dirs, files)?;
    dropped &= drop_caches();
    let walk_mount = walk(&mounted)?;
    dropped &= drop_caches();
    let ls_local = ls_lr(&local, dirs, files)?;
    dropped &= drop_caches();
    let walk_local = walk(&local)?;
    let rate = |secs: f64| (entries as f64 / secs).round();
    println!(
        "{}",
        json!({
            "bench": "mount_meta",
            "entries": entries,
            "dirs": dirs,
            "files": files,
            "measured_at": "the other site's mount",
            "created_s": round3(created),
            "all_at_other_after_s": round3(at_other),
            "ls_lr_s": round3(ls_mount),
            "ls_lr_entries_per_s": rate(ls_mount),
            "walk_lstat_s": round3(walk_mount),
            "walk_lstat_entries_per_s": rate(walk_mount),
            "local_ls_lr_entries_per_s": rate(ls_local),
            "local_walk_lstat_entries_per_s": rate(walk_local),
            "ls_lr_ratio": round3(ls_local / ls_mount),
            "walk_lstat_ratio": round3(walk_local / walk_mount),
            "caches_dropped": dropped,
        })
    );
    Ok(())
}

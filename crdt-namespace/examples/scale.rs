//! The namespace at scale: builds a namespace of N entries (about 1,000 directories with files
//! spread across them), saves and loads it, resolves paths, lists a directory, applies remote
//! changes one at a time, and syncs one change between two replicas that are otherwise in sync.
//!
//! `cargo run --release -p crdt-namespace --example scale -- --entries 1000000`
//!
//! The last line is one JSON object with the figures. Memory is the growth of this process's
//! resident set (from /proc/self/statm) while the namespace is built, divided by the entries.

use std::time::{Duration, Instant};

use crdt_namespace::{ContentId, Hlc, Keys, Namespace, NewVersion, SigningKey, SiteId, SyncSession};

/// Local operations per automerge change while building, as a bulk import would commit.
const BUILD_BATCH_OPS: usize = 1_000;
const TOP_DIRS: usize = 10;
const SUB_DIRS: usize = 100;
const LOOKUPS: usize = 200_000;
const LISTS: usize = 200;
const REMOTE_CHANGES: usize = 2_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("reading /proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("statm format");
    pages * 4096
}

/// A small deterministic generator for picking paths (xorshift64*).
struct Picker(u64);

impl Picker {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % below as u64) as usize
    }
}

fn dir_path(d: usize) -> String {
    format!("/show{:02}/shot{:03}", d / SUB_DIRS, d % SUB_DIRS)
}

fn file_path(d: usize, f: usize) -> String {
    format!("{}/frame_{f:06}.exr", dir_path(d))
}

fn version(n: u64) -> NewVersion {
    let mut content = [0u8; 32];
    content[..8].copy_from_slice(&n.to_le_bytes());
    content[8..16].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    NewVersion {
        content: ContentId(content),
        size: 4 << 20,
        mode: 0o644,
        mtime_ns: 1_700_000_000_000_000_000,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1).min(sorted.len() - 1)]
}

/// `--entries N`, or the default.
fn entries_arg() -> usize {
    let mut entries: usize = 1_000_000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--entries" => {
                entries = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                    eprintln!("--entries needs a number");
                    std::process::exit(2)
                })
            }
            other => {
                eprintln!("unknown argument {other:?}; usage: scale [--entries N]");
                std::process::exit(2);
            }
        }
    }
    entries
}

/// The writing site's clock: one millisecond per operation.
struct Clock(u64);

impl Clock {
    fn tick(&mut self) -> Hlc {
        self.0 += 1;
        Hlc::new(self.0, 0)
    }
}

/// The signing key of `site` (derived from its name: an example, not a deployment).
fn key(site: &SiteId) -> SigningKey {
    SigningKey::from_secret(blake3::hash(site.as_str().as_bytes()).as_bytes())
}

/// West's and east's keys: each checks the other's changes with them.
fn keys() -> Keys {
    let mut keys = Keys::new();
    for name in ["west", "east"] {
        let site = SiteId::new(name).unwrap();
        keys.allow(&site, key(&site).public());
    }
    keys
}

/// Builds a namespace of `entries` entries at `west`: the time it took and the bytes of
/// memory per entry.
fn build(west: SiteId, entries: usize, files_per_dir: usize, clock: &mut Clock) -> (Namespace, f64, f64) {
    let dirs = TOP_DIRS * SUB_DIRS;
    let rss_before = rss_bytes();
    let started = Instant::now();
    let mut ns = Namespace::new(west.clone(), key(&west));
    ns.set_keys(keys());
    let mut ops = 0usize;
    for d in 0..dirs {
        ns.mkdir(&dir_path(d), true, 0o755, 0, clock.tick()).unwrap();
    }
    ns.commit();
    'build: for f in 0..files_per_dir {
        for d in 0..dirs {
            if ns.len() >= entries {
                break 'build;
            }
            ns.write_file(&file_path(d, f), version(ops as u64), clock.tick()).unwrap();
            ops += 1;
            if ops.is_multiple_of(BUILD_BATCH_OPS) {
                ns.commit();
            }
        }
    }
    ns.commit();
    let build_s = started.elapsed().as_secs_f64();
    let bytes_per_entry = rss_bytes().saturating_sub(rss_before) as f64 / ns.len() as f64;
    (ns, build_s, bytes_per_entry)
}

/// Runs sync sessions between two replicas until neither has anything to say: the bytes sent
/// and the round trips.
fn settle(
    a: &mut Namespace,
    sa: &mut SyncSession,
    b: &mut Namespace,
    sb: &mut SyncSession,
) -> (usize, usize) {
    let (mut bytes, mut round_trips) = (0usize, 0usize);
    loop {
        let mut spoke = false;
        if let Some(m) = a.generate_sync_message(sa) {
            bytes += m.len();
            b.receive_sync_message(sb, &m).unwrap();
            spoke = true;
        }
        if let Some(m) = b.generate_sync_message(sb) {
            bytes += m.len();
            a.receive_sync_message(sa, &m).unwrap();
            spoke = true;
        }
        if !spoke {
            return (bytes, round_trips);
        }
        round_trips += 1;
        assert!(round_trips < 100, "sync did not settle");
    }
}

/// Remote changes applied one at a time at `ns`: creates, new versions, renames and tags made
/// at `east`, each its own change. The p50 and p99 time to apply one, in milliseconds.
fn apply_remote_changes(
    ns: &mut Namespace,
    east: &mut Namespace,
    picker: &mut Picker,
    clock: &mut Clock,
) -> (f64, f64) {
    let dirs = TOP_DIRS * SUB_DIRS;
    let mut heads = east.heads();
    let mut exports = Vec::with_capacity(REMOTE_CHANGES);
    for i in 0..REMOTE_CHANGES {
        let d = picker.next(dirs);
        match i % 4 {
            0 | 1 => east.write_file(
                &format!("{}/remote_{i:06}.exr", dir_path(d)),
                version(i as u64),
                clock.tick(),
            ),
            2 => east.write_file(&file_path(d, 0), version(i as u64), clock.tick()),
            _ => east.set_tag(&dir_path(d), "stage", &format!("review-{i}"), clock.tick()),
        }
        .unwrap();
        exports.push(east.export_since(&heads));
        heads = east.heads();
    }
    let mut applied: Vec<Duration> = Vec::with_capacity(REMOTE_CHANGES);
    for export in &exports {
        let started = Instant::now();
        let report = ns.import(export).unwrap();
        applied.push(started.elapsed());
        assert_eq!(report.ops, 1);
    }
    applied.sort();
    (percentile(&applied, 0.5).as_secs_f64() * 1e3, percentile(&applied, 0.99).as_secs_f64() * 1e3)
}

fn main() {
    let entries = entries_arg();
    let dirs = TOP_DIRS * SUB_DIRS;
    let files_per_dir = entries.saturating_sub(dirs + TOP_DIRS).div_ceil(dirs).max(1);
    let west = SiteId::new("west").unwrap();
    let mut clock = Clock(1_700_000_000_000);

    let (mut ns, build_s, bytes_per_entry) = build(west, entries, files_per_dir, &mut clock);
    let built = ns.len();
    eprintln!("built {built} entries in {build_s:.2} s, {bytes_per_entry:.0} B/entry");

    // Save and load.
    let started = Instant::now();
    let saved = ns.save();
    let save_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let east_id = SiteId::new("east").unwrap();
    let mut east = Namespace::load(east_id.clone(), key(&east_id), &saved).unwrap();
    east.set_keys(keys());
    let load_s = started.elapsed().as_secs_f64();
    assert_eq!(east.len(), built);
    eprintln!("saved {} bytes in {save_s:.2} s, loaded in {load_s:.2} s", saved.len());

    // Path lookups.
    let mut picker = Picker(0x1234_5678_9abc_def1);
    let paths: Vec<String> = (0..4096)
        .map(|_| file_path(picker.next(dirs), picker.next(files_per_dir.min(built / dirs).max(1))))
        .collect();
    let started = Instant::now();
    let mut found = 0usize;
    for i in 0..LOOKUPS {
        found += usize::from(ns.exists(&paths[i % paths.len()]));
    }
    let lookup_ns = started.elapsed().as_nanos() as f64 / LOOKUPS as f64;
    assert!(found > 0);

    // Listing a directory of about 1,000 entries, with stats.
    let started = Instant::now();
    let mut listed = 0;
    for i in 0..LISTS {
        listed = ns.list(&dir_path(i % dirs)).unwrap().len();
    }
    let list_1000_us = started.elapsed().as_secs_f64() * 1e6 / LISTS as f64;
    eprintln!("lookup {lookup_ns:.0} ns, list of {listed} entries {list_1000_us:.0} us");

    // Sync sessions between the two replicas, already in sync; then one change.
    let (mut s_west, mut s_east) = (SyncSession::new(), SyncSession::new());
    let started = Instant::now();
    let (first_bytes, first_round_trips) = settle(&mut east, &mut s_east, &mut ns, &mut s_west);
    eprintln!(
        "first sync of replicas in sync: {first_bytes} bytes, {first_round_trips} round trips, {:.2} s",
        started.elapsed().as_secs_f64()
    );
    east.write_file("/show00/shot000/one-change.exr", version(u64::MAX), clock.tick()).unwrap();
    let (sync_one_change_bytes, sync_one_change_round_trips) =
        settle(&mut east, &mut s_east, &mut ns, &mut s_west);
    assert!(ns.exists("/show00/shot000/one-change.exr"));

    let (apply_remote_ms_p50, apply_remote_ms_p99) =
        apply_remote_changes(&mut ns, &mut east, &mut picker, &mut clock);
    eprintln!("apply one remote change: p50 {apply_remote_ms_p50:.3} ms, p99 {apply_remote_ms_p99:.3} ms");
    assert_eq!(ns.len(), east.len());

    println!(
        "{{\"entries\":{built},\"build_s\":{build_s:.3},\"bytes_per_entry\":{bytes_per_entry:.0},\"save_bytes\":{},\
         \"save_s\":{save_s:.3},\"load_s\":{load_s:.3},\"lookup_ns\":{lookup_ns:.0},\"list_1000_us\":{list_1000_us:.1},\
         \"apply_remote_ms_p50\":{apply_remote_ms_p50:.3},\"apply_remote_ms_p99\":{apply_remote_ms_p99:.3},\
         \"sync_one_change_bytes\":{sync_one_change_bytes},\"sync_one_change_round_trips\":{sync_one_change_round_trips},\
         \"first_sync_in_sync_bytes\":{first_bytes},\"first_sync_in_sync_round_trips\":{first_round_trips}}}",
        saved.len()
    );
}

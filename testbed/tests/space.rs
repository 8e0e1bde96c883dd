//! Space at real `meridian` processes: removing a file frees its space at every site once
//! every site has seen the removal, a member that stays away holds that back until it leaves
//! the mesh, the cache of copies stays under its bound, and (on a data directory that is a
//! small file system: a size-limited tmpfs, mounted by the test, which runs as root) a full
//! disk fails what needs the space, with a clear error, and nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cluster::{Cluster, wait_until};
use node::api::StatusAnswer;
use site_core::sample::pseudo_random;
use testbed::chunk_file_bytes;

const TIMEOUT: Duration = Duration::from_secs(60);
/// The small file system, and what the chunk store leaves free on it.
const DISK: u64 = 48 << 20;
const RESERVE: u64 = 8 << 20;

/// A tmpfs of a given size, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting a tmpfs at {} (the test must run as root)", dir.display());
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `n` sites, site `small`'s data directory on a tmpfs of [`DISK`] bytes with [`RESERVE`] kept
/// free. The cluster is dropped (its sites stopped) before the tmpfs is unmounted and its
/// directory removed.
fn with_small_disk(n: usize, small: usize, test: impl FnOnce(&mut Cluster, &Path)) {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("small-disk");
    let _disk = Tmpfs::mount(&data, DISK);
    let mut cluster = testbed::cluster(testbed::program_at(env!("CARGO_BIN_EXE_testbed")), n).unwrap();
    cluster
        .configure(small, |c| {
            c.data_dir = data.clone();
            c.reserve_bytes = RESERVE;
            // A cache bound beyond the disk: the disk fills before the bound evicts anything.
            c.cache_max_bytes = Some(1 << 40);
        })
        .unwrap();
    cluster.start_all().unwrap();
    test(&mut cluster, &data);
}

#[test]
fn a_put_that_finds_the_disk_full_fails_clearly_and_the_site_goes_on() {
    with_small_disk(1, 0, |cluster, data| {
        let a = cluster.site(0).client.clone();
        let small = pseudo_random(1, 8 << 20);
        a.put("/small.bin", &small).unwrap();
        // 64 MiB do not fit in 48: the put fails, saying where, through the client library and
        // through the CLI.
        let full = format!("no space left on {}", data.display());
        let error = a.put("/big.bin", &pseudo_random(2, 64 << 20)).unwrap_err();
        assert!(format!("{error:#}").contains(&full), "{error:#}");
        let local = cluster.root().join("big-local.bin");
        std::fs::write(&local, pseudo_random(3, 64 << 20)).unwrap();
        let error = cluster.meridian(0, &["put", local.to_str().unwrap(), "/big2.bin"]).unwrap_err();
        assert!(format!("{error:#}").contains(&full), "{error:#}");
        // Nothing of them is recorded, their chunks are given back, and the site goes on.
        assert!(!a.exists("/big.bin").unwrap() && !a.exists("/big2.bin").unwrap());
        let after = pseudo_random(4, 4 << 20);
        a.put("/after.bin", &after).unwrap();
        a.mkdir_p("/dir").unwrap();
        assert!(a.read("/small.bin", None).unwrap() == small);
        // What was committed outlives a restart.
        cluster.stop(0).unwrap();
        cluster.start(0).unwrap();
        let a = cluster.site(0).client.clone();
        assert!(a.read("/small.bin", None).unwrap() == small);
        assert!(a.read("/after.bin", None).unwrap() == after);
        assert!(a.exists("/dir").unwrap());
    });
}

#[test]
fn a_read_at_a_site_whose_disk_is_full_is_served_and_the_copy_not_kept() {
    with_small_disk(2, 1, |cluster, data| {
        let (a, b) = (cluster.site(0).client.clone(), cluster.site(1).client.clone());
        cluster.wait_connected(TIMEOUT).unwrap();
        let big = pseudo_random(5, 64 << 20);
        a.put("/big.bin", &big).unwrap();
        wait_until(TIMEOUT, || b.exists("/big.bin")).unwrap();
        // b cannot keep a copy of 64 MiB on 48: the read is served all the same.
        assert!(b.read("/big.bin", None).unwrap() == big, "b read other bytes");
        let log = std::fs::read_to_string(cluster.site(1).log()).unwrap();
        let full = format!("no space left on {}", data.display());
        assert!(log.contains(&full) && log.contains("were read but not kept"), "{log}");
        let status = b.status().unwrap().core;
        assert_eq!(status.versions_held, 0, "b counts a version it could not keep as held");
        // b goes on: its own changes, and reading the file again.
        b.mkdir_p("/from-b").unwrap();
        wait_until(TIMEOUT, || a.exists("/from-b")).unwrap();
        assert!(b.read("/big.bin", None).unwrap() == big);
        cluster.stop(1).unwrap();
        cluster.start(1).unwrap();
        cluster.wait_connected(TIMEOUT).unwrap();
        let b = cluster.site(1).client.clone();
        assert!(b.read("/big.bin", None).unwrap() == big, "b read other bytes after a restart");
    });
}

/// Site `i`'s status, through `meridian status --json`.
fn status_json(cluster: &Cluster, i: usize) -> StatusAnswer {
    let out = cluster.meridian(i, &["status", "--json"]).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

/// A cluster of `n` sites whose garbage goes a second after it is stable, started and linked.
fn quick_to_collect(n: usize, edit: impl Fn(usize, &mut node::config::Config)) -> Cluster {
    let mut cluster = testbed::cluster(testbed::program_at(env!("CARGO_BIN_EXE_testbed")), n).unwrap();
    for i in 0..n {
        cluster
            .configure(i, |c| {
                c.gc_grace_secs = 1;
                edit(i, c);
            })
            .unwrap();
    }
    cluster.start_all().unwrap();
    cluster.wait_connected(TIMEOUT).unwrap();
    cluster
}

#[test]
fn removing_a_file_frees_its_space_at_every_site_once_every_site_has_seen_it() {
    const SIZE: u64 = 200 << 20;
    let cluster = quick_to_collect(2, |_, _| {});
    let (a, b) = (cluster.site(0).client.clone(), cluster.site(1).client.clone());
    let big = pseudo_random(11, SIZE as usize);
    a.put("/big.bin", &big).unwrap();
    wait_until(TIMEOUT, || b.exists("/big.bin")).unwrap();
    assert!(b.read("/big.bin", None).unwrap() == big, "b read other bytes");
    // Both hold it: a as its own version, b as a copy (cache).
    wait_until(TIMEOUT, || Ok(chunk_file_bytes(&cluster, 1) >= SIZE)).unwrap();
    let (sa, sb) = (status_json(&cluster, 0).core.space, status_json(&cluster, 1).core.space);
    assert_eq!((sa.store_bytes, sa.cache_bytes), (SIZE, 0), "{sa:?}");
    assert_eq!((sb.store_bytes, sb.cache_bytes), (SIZE, SIZE), "{sb:?}");
    let before = [chunk_file_bytes(&cluster, 0), chunk_file_bytes(&cluster, 1)];
    // b removes it (the CLI); both sites free the space.
    cluster.meridian(1, &["rm", "/big.bin"]).unwrap();
    for (i, before) in before.into_iter().enumerate() {
        wait_until(TIMEOUT, || Ok(chunk_file_bytes(&cluster, i) + SIZE <= before)).unwrap();
        let space = status_json(&cluster, i).core.space;
        assert_eq!((space.store_bytes, space.garbage_bytes, space.garbage_versions), (0, 0, 0), "{space:?}");
        assert_eq!(space.collected_bytes, SIZE);
        let human = cluster.meridian(i, &["status"]).unwrap();
        assert!(human.contains("reclaimed:     200.00 MiB of garbage"), "{human}");
    }
    // The sites go on: a new file of the same bytes is stored and read again.
    a.put("/again.bin", &big).unwrap();
    wait_until(TIMEOUT, || b.exists("/again.bin")).unwrap();
    assert!(b.read("/again.bin", None).unwrap() == big);
}

/// A source that gives `first`, then waits for `go` before giving `rest` (or failing, without
/// a `rest`); it says on `reached` when it has given `first`.
struct Stalling {
    first: std::io::Cursor<Vec<u8>>,
    rest: Option<std::io::Cursor<Vec<u8>>>,
    reached: Option<std::sync::mpsc::Sender<()>>,
    go: std::sync::mpsc::Receiver<()>,
}

impl std::io::Read for Stalling {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.first.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        if let Some(reached) = self.reached.take() {
            let _ = reached.send(());
            self.go.recv().map_err(|_| std::io::Error::other("the test ended"))?;
        }
        match &mut self.rest {
            Some(rest) => rest.read(buf),
            None => Err(std::io::Error::other("the source broke")),
        }
    }
}

/// Starts a put of `first` then `rest` at `path` whose source stalls in between (and fails
/// there if `rest` is `None`): the put's thread, a receiver told when the source stalls, and the
/// sender that lets it go on.
fn stalled_put(
    client: &node::client::Client,
    path: &str,
    first: &[u8],
    rest: Option<&[u8]>,
) -> (
    std::thread::JoinHandle<anyhow::Result<node::api::PutAnswer>>,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (reached_tx, reached) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let mut source = Stalling {
        first: std::io::Cursor::new(first.to_vec()),
        rest: rest.map(|r| std::io::Cursor::new(r.to_vec())),
        reached: Some(reached_tx),
        go: go_rx,
    };
    let (client, path) = (client.clone(), path.to_owned());
    (std::thread::spawn(move || client.put_from(&path, &mut source)), reached, go)
}

#[test]
fn a_stalled_put_holds_up_neither_other_puts_nor_collection_and_keeps_what_it_found() {
    const HALF: usize = 16 << 20;
    let cluster = quick_to_collect(1, |_, _| {});
    let a = cluster.site(0).client.clone();
    let old = pseudo_random(13, 2 * HALF);
    a.put("/old.bin", &old).unwrap();
    // A put whose client stalls after the first half of /old.bin's bytes: it finds their
    // chunks stored and relies on them.
    let slow: Vec<u8> = [&old[..HALF], &pseudo_random(14, 4 << 20)[..]].concat();
    let (stalled, reached, go) = stalled_put(&a, "/slow.bin", &slow[..HALF], Some(&slow[HALF..]));
    reached.recv_timeout(TIMEOUT).unwrap();
    // /old.bin goes: its garbage is collected while the put waits, and another put goes
    // through meanwhile.
    cluster.meridian(0, &["rm", "/old.bin"]).unwrap();
    wait_until(TIMEOUT, || Ok(status_json(&cluster, 0).core.space.collected_bytes > 0)).unwrap();
    let other = pseudo_random(15, 4 << 20);
    let (done_tx, done) = std::sync::mpsc::channel();
    {
        let (a, other) = (a.clone(), other.clone());
        std::thread::spawn(move || done_tx.send(a.put("/other.bin", &other).map(|_| ())));
    }
    let finished = done.recv_timeout(TIMEOUT);
    assert!(matches!(finished, Ok(Ok(()))), "another put waited behind the stalled one: {finished:?}");
    // The stalled put goes on: the chunks it found stored were left to it.
    go.send(()).unwrap();
    stalled.join().unwrap().unwrap();
    assert!(a.read("/slow.bin", None).unwrap() == slow, "the stalled put's file lost bytes");
    assert!(a.read("/other.bin", None).unwrap() == other);
    // Only /old.bin's second half went; what the core counts is what the disk holds.
    wait_until(TIMEOUT, || {
        let space = status_json(&cluster, 0).core.space;
        Ok(space.garbage_versions == 0 && space.store_bytes == chunk_file_bytes(&cluster, 0))
    })
    .unwrap();
    let stored = chunk_file_bytes(&cluster, 0);
    assert!(stored < (HALF as u64) + (12 << 20), "{stored} bytes stored");
}

#[test]
fn a_failed_put_gives_back_its_chunks_but_not_those_another_put_committed_meanwhile() {
    const SIZE: usize = 16 << 20;
    let cluster = quick_to_collect(1, |_, _| {});
    let a = cluster.site(0).client.clone();
    let data = pseudo_random(16, SIZE);
    // A put writes the chunks of `data`, then its source stalls; another put of the same bytes
    // finds them stored and commits; then the first put's source fails.
    let (failing, reached, go) = stalled_put(&a, "/failing.bin", &data, None);
    reached.recv_timeout(TIMEOUT).unwrap();
    a.put("/same.bin", &data).unwrap();
    go.send(()).unwrap();
    assert!(failing.join().unwrap().is_err(), "the put whose source broke failed");
    assert!(!a.exists("/failing.bin").unwrap());
    assert!(a.read("/same.bin", None).unwrap() == data, "the committed file lost chunks");
    let space = status_json(&cluster, 0).core.space;
    assert_eq!((space.store_bytes, chunk_file_bytes(&cluster, 0)), (SIZE as u64, SIZE as u64));
    // A put that fails alone leaves nothing behind.
    let (failing, reached, go) = stalled_put(&a, "/alone.bin", &pseudo_random(17, SIZE), None);
    reached.recv_timeout(TIMEOUT).unwrap();
    go.send(()).unwrap();
    assert!(failing.join().unwrap().is_err());
    // Its client went away: the node gives its chunks back after it noticed.
    wait_until(TIMEOUT, || Ok(chunk_file_bytes(&cluster, 0) == SIZE as u64)).unwrap();
}

#[test]
fn a_member_that_stays_away_holds_collection_back_until_it_leaves_the_mesh() {
    const SIZE: u64 = 8 << 20;
    let mut cluster = quick_to_collect(3, |_, _| {});
    let a = cluster.site(0).client.clone();
    a.put("/f.bin", &pseudo_random(12, SIZE as usize)).unwrap();
    let c = cluster.site(2).client.clone();
    wait_until(TIMEOUT, || c.exists("/f.bin")).unwrap();
    cluster.stop(2).unwrap();
    cluster.meridian(0, &["rm", "/f.bin"]).unwrap();
    // b sees the removal; c cannot: a keeps the version and says why.
    std::thread::sleep(Duration::from_secs(12));
    let space = status_json(&cluster, 0).core.space;
    assert_eq!(
        (space.store_bytes, space.garbage_bytes, space.garbage_versions),
        (SIZE, SIZE, 1),
        "{space:?}"
    );
    let held: Vec<(&str, u64)> = space.held_back_by.iter().map(|h| (h.site.as_str(), h.bytes)).collect();
    assert_eq!(held, [("c", SIZE)]);
    let human = cluster.meridian(0, &["status"]).unwrap();
    assert!(human.contains("held back by c: 8.00 MiB in 1 versions since"), "{human}");
    assert!(human.contains("meridian mesh rm c"), "{human}");
    // c leaves the mesh: a frees the space.
    cluster.meridian(0, &["mesh", "rm", "c"]).unwrap();
    wait_until(TIMEOUT, || Ok(chunk_file_bytes(&cluster, 0) == 0)).unwrap();
    let space = status_json(&cluster, 0).core.space;
    assert!(space.held_back_by.is_empty() && space.garbage_versions == 0, "{space:?}");
}

#[test]
fn the_cache_stays_under_its_bound_and_every_file_stays_readable() {
    const MAX: u64 = 8 << 20;
    let cluster = quick_to_collect(2, |i, c| {
        if i == 1 {
            c.cache_max_bytes = Some(MAX);
        }
    });
    let (a, b) = (cluster.site(0).client.clone(), cluster.site(1).client.clone());
    // b reads three times its cache's bound.
    let files: Vec<Vec<u8>> = (0..6).map(|i| pseudo_random(20 + i, 4 << 20)).collect();
    for (i, data) in files.iter().enumerate() {
        a.put(&format!("/f{i}.bin"), data).unwrap();
    }
    wait_until(TIMEOUT, || b.exists("/f5.bin")).unwrap();
    for (i, data) in files.iter().enumerate() {
        assert!(b.read(&format!("/f{i}.bin"), None).unwrap() == *data, "b read other bytes of f{i}");
        let space = status_json(&cluster, 1).core.space;
        assert!(space.cache_bytes <= MAX, "b's cache holds {} after f{i}", space.cache_bytes);
        assert_eq!(space.cache_max_bytes, Some(MAX));
    }
    wait_until(TIMEOUT, || Ok(chunk_file_bytes(&cluster, 1) <= MAX)).unwrap();
    assert!(status_json(&cluster, 1).core.space.evicted_bytes >= 16 << 20);
    // Every file is still readable at b, and a kept every one of its own.
    for (i, data) in files.iter().enumerate() {
        assert!(b.read(&format!("/f{i}.bin"), None).unwrap() == *data, "b read other bytes of f{i}");
    }
    assert_eq!(status_json(&cluster, 0).core.space.store_bytes, 6 * (4 << 20));
}

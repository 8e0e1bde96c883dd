//! Real `meridian` processes whose data directory is a small file system (a size-limited
//! tmpfs, mounted by the test: it runs as root): a full disk fails what needs the space, with a
//! clear error, and nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cluster::{Cluster, wait_until};
use site_core::sample::pseudo_random;

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

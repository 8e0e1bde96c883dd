//! The mount at real `meridian` processes: each site's namespace mounted (FUSE) in this test
//! process, which runs as root. A file written through one mount is read, byte for byte,
//! through the other; directories, renames, removals, symlinks, modes and tags made through
//! one show in the other.

use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cluster::{Cluster, wait_until};
use site_core::sample::pseudo_random;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Two sites, each mounted under a temporary directory; unmounted (before the sites stop)
/// when dropped.
struct Mounts {
    mounts: Vec<mount::Mounted>,
    cluster: Cluster,
    _root: tempfile::TempDir,
}

impl Mounts {
    fn start(n: usize) -> Mounts {
        Mounts::start_with(n, Duration::from_secs(30))
    }

    fn start_with(n: usize, read_timeout: Duration) -> Mounts {
        Mounts::start_configured(n, |_| {}, |options| options.read_timeout = read_timeout)
    }

    /// `n` sites, their configuration edited by `site`, mounted with options edited by `mount`.
    fn start_configured(
        n: usize,
        site: impl Fn(&mut node::config::Config),
        mount: impl Fn(&mut mount::MountOptions),
    ) -> Mounts {
        let root = tempfile::tempdir().unwrap();
        let mut cluster = testbed::cluster(testbed::program_at(env!("CARGO_BIN_EXE_testbed")), n).unwrap();
        for i in 0..n {
            cluster.configure(i, &site).unwrap();
        }
        cluster.start_all().unwrap();
        cluster.wait_connected(TIMEOUT).unwrap();
        let mounts = (0..n)
            .map(|i| {
                let dir = root.path().join(format!("mnt{i}"));
                std::fs::create_dir_all(&dir).unwrap();
                let mut options = mount::MountOptions::new(root.path().join(format!("scratch{i}")));
                mount(&mut options);
                mount::mount(cluster.site(i).client.socket(), &dir, &options).unwrap()
            })
            .collect();
        Mounts { mounts, cluster, _root: root }
    }

    fn dir(&self, i: usize) -> PathBuf {
        self.mounts[i].dir().to_owned()
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for mounted in self.mounts.drain(..) {
            let _ = mounted.unmount();
        }
    }
}

fn exists(path: &Path) -> anyhow::Result<bool> {
    Ok(path.symlink_metadata().is_ok())
}

#[test]
fn a_file_written_through_one_mount_is_read_through_the_other() {
    let mounts = Mounts::start(2);
    let (a, b) = (mounts.dir(0), mounts.dir(1));
    let data = pseudo_random(21, 12 << 20);
    std::fs::create_dir(a.join("shots")).unwrap();
    std::fs::write(a.join("shots/f1.exr"), &data).unwrap();
    // Written, closed: the new version is durable at a and its entry reaches b.
    assert_eq!(std::fs::read(a.join("shots/f1.exr")).unwrap(), data);
    let at_b = b.join("shots/f1.exr");
    wait_until(TIMEOUT, || Ok(at_b.metadata().is_ok_and(|m| m.len() == data.len() as u64))).unwrap();
    assert!(std::fs::read(&at_b).unwrap() == data, "b read other bytes");
    // The node's API sees what the mount wrote.
    let client = mounts.cluster.site(1).client.clone();
    assert_eq!(client.stat("/shots/f1.exr").unwrap().size, data.len() as u64);
    // A range in the middle: only what is asked for.
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(&at_b).unwrap();
    file.seek(SeekFrom::Start(9 << 20)).unwrap();
    let mut buf = vec![0u8; 4096];
    file.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..], &data[9 << 20..(9 << 20) + 4096]);
}

#[test]
fn changes_through_one_mount_show_in_the_other() {
    let mounts = Mounts::start(2);
    let (a, b) = (mounts.dir(0), mounts.dir(1));
    std::fs::create_dir_all(a.join("proj/scenes")).unwrap();
    std::fs::write(a.join("proj/scenes/s.txt"), b"scene one").unwrap();
    wait_until(TIMEOUT, || exists(&b.join("proj/scenes/s.txt"))).unwrap();
    // Rename across directories, and over an existing file.
    std::fs::create_dir(b.join("proj/done")).unwrap();
    std::fs::rename(b.join("proj/scenes/s.txt"), b.join("proj/done/s.txt")).unwrap();
    std::fs::write(b.join("proj/done/t.txt"), b"two").unwrap();
    std::fs::rename(b.join("proj/done/t.txt"), b.join("proj/done/s.txt")).unwrap();
    wait_until(TIMEOUT, || Ok(std::fs::read(a.join("proj/done/s.txt")).is_ok_and(|d| d == b"two"))).unwrap();
    // The old names go when a's follower of the change log tells its kernel (it may not have
    // yet when the new name, never looked up at a, was found).
    wait_until(
        TIMEOUT,
        || Ok(!exists(&a.join("proj/scenes/s.txt"))? && !exists(&a.join("proj/done/t.txt"))?),
    )
    .unwrap();
    // Listing, modes, symlinks.
    let mut names: Vec<String> = std::fs::read_dir(a.join("proj"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["done", "scenes"]);
    std::fs::set_permissions(a.join("proj/done/s.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("done/s.txt", a.join("proj/link")).unwrap();
    wait_until(TIMEOUT, || Ok(b.join("proj/done/s.txt").metadata()?.mode() & 0o777 == 0o600)).unwrap();
    wait_until(TIMEOUT, || exists(&b.join("proj/link"))).unwrap();
    assert_eq!(std::fs::read_link(b.join("proj/link")).unwrap(), Path::new("done/s.txt"));
    assert_eq!(std::fs::read(b.join("proj/link")).unwrap(), b"two");
    // Errors a program understands.
    let e = std::fs::remove_dir(a.join("proj")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_enotempty()), "{e}");
    let e = std::fs::hard_link(a.join("proj/done/s.txt"), a.join("proj/hard")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(1), "hard links are refused with EPERM: {e}");
    // A time set before close (`cp -a`, `tar`) is the committed version's.
    let when = std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    {
        let mut file = std::fs::File::create(a.join("proj/dated.txt")).unwrap();
        std::io::Write::write_all(&mut file, b"dated").unwrap();
        file.set_modified(when).unwrap();
    }
    assert_eq!(a.join("proj/dated.txt").metadata().unwrap().modified().unwrap(), when);
    // (Absent at b until a's close made the entry and it arrived.)
    let dated_at_b = || b.join("proj/dated.txt").metadata().and_then(|m| m.modified()).ok();
    wait_until(TIMEOUT, || Ok(dated_at_b() == Some(when))).unwrap();
    // Removal shows at the other site.
    std::fs::remove_dir_all(b.join("proj/done")).unwrap();
    wait_until(TIMEOUT, || Ok(!exists(&a.join("proj/done"))?)).unwrap();
}

#[test]
fn tags_are_extended_attributes() {
    let mounts = Mounts::start(2);
    let (a, b) = (mounts.dir(0), mounts.dir(1));
    std::fs::create_dir(a.join("show")).unwrap();
    std::fs::write(a.join("show/plate.exr"), b"plate").unwrap();
    let set = Command::new("setfattr")
        .args(["-n", "user.meridian.stage", "-v", "comp"])
        .arg(a.join("show"))
        .status()
        .expect("running setfattr (apt-get install attr)");
    assert!(set.success());
    // Inherited below, and seen at the other site.
    let client = mounts.cluster.site(1).client.clone();
    wait_until(TIMEOUT, || {
        let tags: Vec<node::api::TagAnswer> =
            client.call(&node::api::ApiRequest::TagGet { path: "/show/plate.exr".into() })?;
        Ok(tags.iter().any(|t| t.key == "stage" && t.value == "comp"))
    })
    .unwrap();
    let got = Command::new("getfattr")
        .args(["-n", "user.meridian.stage", "--only-values"])
        .arg(b.join("show/plate.exr"))
        .output()
        .unwrap();
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    assert_eq!(got.stdout, b"comp");
    let removed =
        Command::new("setfattr").args(["-x", "user.meridian.stage"]).arg(a.join("show")).status().unwrap();
    assert!(removed.success());
    let got = Command::new("getfattr")
        .args(["-n", "user.meridian.stage"])
        .arg(a.join("show/plate.exr"))
        .output()
        .unwrap();
    assert!(!got.status.success(), "the tag is gone");
}

/// A site's process stopped with SIGSTOP (its links stay up, it answers nothing), continued
/// when dropped.
struct Paused(u32);

impl Paused {
    fn pause(pid: u32) -> Paused {
        assert!(Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

#[test]
fn a_read_waiting_for_a_paused_site_holds_up_nothing_else_and_fails_with_eio() {
    let mounts = Mounts::start_with(2, Duration::from_secs(15));
    let (a, b) = (mounts.dir(0), mounts.dir(1));
    let data = pseudo_random(22, 8 << 20);
    std::fs::write(a.join("remote.bin"), &data).unwrap();
    std::fs::write(a.join("note.txt"), b"here").unwrap();
    std::fs::write(a.join("old.bin"), pseudo_random(23, 4 << 20)).unwrap();
    wait_until(TIMEOUT, || exists(&b.join("note.txt"))).unwrap();
    wait_until(TIMEOUT, || exists(&b.join("old.bin"))).unwrap();
    // b holds note.txt's bytes once it read them; then a stops answering.
    assert_eq!(std::fs::read(b.join("note.txt")).unwrap(), b"here");
    let paused = Paused::pause(mounts.cluster.site(0).pid().expect("a is running"));
    let reader = {
        let path = b.join("remote.bin");
        std::thread::spawn(move || std::fs::read(path))
    };
    // While the read waits for a, everything else at b goes on.
    for _ in 0..20 {
        let names: Vec<_> = std::fs::read_dir(&b).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 3);
        assert_eq!(std::fs::read(b.join("note.txt")).unwrap(), b"here");
        std::fs::write(b.join("mine.txt"), b"b's own").unwrap();
        std::fs::remove_file(b.join("mine.txt")).unwrap();
    }
    // Overwriting a file whose bytes only the paused site holds needs none of them.
    let (done, overwritten) = std::sync::mpsc::channel();
    {
        let path = b.join("old.bin");
        std::thread::spawn(move || done.send(std::fs::write(path, b"new bytes").map_err(|e| e.to_string())));
    }
    let overwrite = overwritten.recv_timeout(TIMEOUT);
    assert!(matches!(overwrite, Ok(Ok(()))), "overwriting waited for the old bytes: {overwrite:?}");
    assert_eq!(std::fs::read(b.join("old.bin")).unwrap(), b"new bytes");
    assert!(!reader.is_finished(), "the read did not wait for the paused site");
    let failed = reader.join().unwrap().unwrap_err();
    assert_eq!(failed.raw_os_error(), Some(5), "EIO after the read timeout: {failed}");
    // a answers again: the read goes through.
    drop(paused);
    wait_until(TIMEOUT, || Ok(std::fs::read(b.join("remote.bin")).is_ok_and(|d| d == data))).unwrap();
}

fn libc_enotempty() -> i32 {
    39
}

#[test]
fn concurrent_writes_through_two_mounts_leave_the_same_conflict_copy_at_both() {
    let mounts = Mounts::start(2);
    let (a, b) = (mounts.dir(0), mounts.dir(1));
    std::fs::create_dir(a.join("shots")).unwrap();
    std::fs::write(a.join("shots/comp.nk"), b"v1").unwrap();
    wait_until(TIMEOUT, || exists(&b.join("shots/comp.nk"))).unwrap();
    // Cut apart (a blocks b, and has seen the last of the link), both write the same file.
    mounts.cluster.meridian(0, &["mesh", "block", "b"]).unwrap();
    let client = mounts.cluster.site(0).client.clone();
    wait_until(TIMEOUT, || Ok(client.status()?.core.peers.is_empty())).unwrap();
    std::fs::write(a.join("shots/comp.nk"), b"v2 written at a").unwrap();
    std::fs::write(b.join("shots/comp.nk"), b"v2 written at b").unwrap();
    mounts.cluster.meridian(0, &["mesh", "unblock", "b"]).unwrap();
    // Each mount shows one file and one conflict copy beside it, the same at both.
    let listing = |dir: &Path| -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir.join("shots"))? {
            let name = entry?.file_name().into_string().unwrap();
            files.push((name.clone(), std::fs::read(dir.join("shots").join(&name))?));
        }
        files.sort();
        Ok(files)
    };
    wait_until(TIMEOUT, || {
        let (at_a, at_b) = (listing(&a)?, listing(&b)?);
        Ok(at_a.len() == 2 && at_a == at_b)
    })
    .unwrap();
    let files = listing(&a).unwrap();
    let copy = files.iter().find(|(name, _)| name.starts_with("comp.conflict-")).expect("a conflict copy");
    let kept = files.iter().find(|(name, _)| name == "comp.nk").expect("the file");
    let mut contents = [copy.1.clone(), kept.1.clone()];
    contents.sort();
    assert_eq!(contents, [b"v2 written at a".to_vec(), b"v2 written at b".to_vec()], "{files:?}");
}

#[test]
fn a_read_at_an_offset_fetches_only_the_chunks_covering_it() {
    // Small chunks (16..256 KiB), so that what a read fetches shows.
    let small = |c: &mut node::config::Config| {
        c.chunking = node::config::Chunking { min_bytes: 16 << 10, avg_bytes: 64 << 10, max_bytes: 256 << 10 }
    };
    let mounts = Mounts::start_configured(2, small, |_| {});
    let data = pseudo_random(24, 64 << 20);
    mounts.cluster.site(0).client.put("/big.bin", &data).unwrap();
    let b = mounts.cluster.site(1).client.clone();
    let at_b = mounts.dir(1).join("big.bin");
    wait_until(TIMEOUT, || Ok(at_b.metadata().is_ok_and(|m| m.len() == data.len() as u64))).unwrap();
    let before = b.status().unwrap().core.bytes_fetched;
    let offset = 40 << 20;
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(&at_b).unwrap().read_exact_at(&mut buf, offset).unwrap();
    assert!(buf[..] == data[offset as usize..offset as usize + 4096]);
    let fetched = b.status().unwrap().core.bytes_fetched - before;
    // At most what the kernel asked for (its readahead: 1 MiB at most) and a chunk on either
    // side; the whole file is 64 MiB.
    assert!(
        fetched > 0 && fetched <= (1 << 20) + 2 * (256 << 10),
        "fetched {fetched} bytes for a read of 4 KiB"
    );
}

#[test]
fn another_sites_changes_reach_the_kernel_before_its_attributes_expire() {
    // The kernel may keep names and attributes for ten minutes: only the change log can tell it.
    let mounts = Mounts::start_configured(2, |_| {}, |options| options.attr_ttl = Duration::from_secs(600));
    let (a, b) = (mounts.dir(0), mounts.dir(1));
    std::fs::write(a.join("clip.mov"), b"old").unwrap();
    std::fs::write(a.join("gone.txt"), b"soon gone").unwrap();
    wait_until(TIMEOUT, || exists(&b.join("gone.txt"))).unwrap();
    // b's kernel holds both names and the first version's size and pages.
    assert_eq!(std::fs::read(b.join("clip.mov")).unwrap(), b"old");
    assert!(exists(&b.join("gone.txt")).unwrap());
    std::fs::write(a.join("clip.mov"), b"a newer, longer version").unwrap();
    std::fs::rename(a.join("gone.txt"), a.join("moved.txt")).unwrap();
    wait_until(TIMEOUT, || Ok(std::fs::read(b.join("clip.mov"))? == b"a newer, longer version")).unwrap();
    wait_until(TIMEOUT, || Ok(!exists(&b.join("gone.txt"))? && exists(&b.join("moved.txt"))?)).unwrap();
    // A file b created (its inode given before the entry existed) and a then replaced.
    std::fs::write(b.join("made-at-b.txt"), b"b's").unwrap();
    assert_eq!(std::fs::read(b.join("made-at-b.txt")).unwrap(), b"b's");
    wait_until(TIMEOUT, || Ok(std::fs::read(a.join("made-at-b.txt")).is_ok_and(|d| d == b"b's"))).unwrap();
    std::fs::write(a.join("made-at-b.txt"), b"a's, longer").unwrap();
    wait_until(TIMEOUT, || Ok(std::fs::read(b.join("made-at-b.txt"))? == b"a's, longer")).unwrap();
}

#[test]
fn the_node_mounts_the_configured_path_and_unmounts_it_when_it_stops() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let mut cluster = testbed::cluster(testbed::program_at(env!("CARGO_BIN_EXE_testbed")), 1).unwrap();
    cluster.configure(0, |c| c.mount.path = Some(dir.clone())).unwrap();
    cluster.start_all().unwrap();
    let mounted =
        || Ok(std::fs::read_to_string("/proc/self/mountinfo")?.contains(&format!(" {} ", dir.display())));
    wait_until(TIMEOUT, mounted).unwrap();
    std::fs::write(dir.join("hello.txt"), b"through the node's own mount").unwrap();
    assert_eq!(cluster.site(0).client.read("/hello.txt", None).unwrap(), b"through the node's own mount");
    cluster.stop(0).unwrap();
    assert!(!mounted().unwrap(), "stopping the node unmounts");
}

#[test]
fn a_truncation_by_path_of_a_file_held_open_for_reading_is_committed_at_once() {
    use std::io::Write;
    let mounts = Mounts::start(1);
    let a = mounts.dir(0);
    let client = mounts.cluster.site(0).client.clone();
    // A truncation by path while the file is open only for reading through a scratch file
    // (a writer opened and closed it meanwhile) is committed at once.
    std::fs::write(a.join("g.txt"), b"").unwrap();
    let mut writer = std::fs::OpenOptions::new().write(true).open(a.join("g.txt")).unwrap();
    let reader = std::fs::File::open(a.join("g.txt")).unwrap();
    writer.write_all(b"sixteen bytes...").unwrap();
    drop(writer);
    assert_eq!(client.read("/g.txt", None).unwrap(), b"sixteen bytes...");
    let truncated = Command::new("truncate").args(["-s", "3"]).arg(a.join("g.txt")).status().unwrap();
    assert!(truncated.success());
    assert_eq!(client.read("/g.txt", None).unwrap(), b"six", "the truncation reached the node");
    drop(reader);
    assert_eq!(std::fs::read(a.join("g.txt")).unwrap(), b"six");
}

#[test]
fn a_file_created_through_the_mount_becomes_an_entry_at_its_close() {
    use std::io::{Read, Write};
    use std::os::unix::fs::DirEntryExt;
    let mounts = Mounts::start(2);
    let (a, b) = (mounts.dir(0), mounts.dir(1));
    let (client_a, client_b) = (mounts.cluster.site(0).client.clone(), mounts.cluster.site(1).client.clone());
    std::fs::create_dir(a.join("d")).unwrap();
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).open(a.join("d/new.txt")).unwrap();
    file.write_all(b"hello").unwrap();
    // Open and not closed: this mount shows it (stat, listing, another handle), the node does
    // not have it yet, and its name is taken.
    let ino = a.join("d/new.txt").metadata().unwrap().ino();
    assert_eq!(a.join("d/new.txt").metadata().unwrap().len(), 5);
    let listed: Vec<(String, u64)> = std::fs::read_dir(a.join("d"))
        .unwrap()
        .map(|e| e.map(|e| (e.file_name().into_string().unwrap(), e.ino())).unwrap())
        .collect();
    assert_eq!(listed, [("new.txt".to_owned(), ino)]);
    let mut read = String::new();
    std::fs::File::open(a.join("d/new.txt")).unwrap().read_to_string(&mut read).unwrap();
    assert_eq!(read, "hello");
    assert!(client_a.stat("/d/new.txt").is_err(), "the node has no entry before the close");
    let e = std::fs::create_dir(a.join("d/new.txt")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    let e = std::fs::OpenOptions::new().write(true).create_new(true).open(a.join("d/new.txt")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    let e = std::fs::remove_dir(a.join("d")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_enotempty()), "a directory holding it is not empty: {e}");
    // The close makes the entry, with its bytes (the rmdir above did already: a directory
    // with it is not empty at any site). In this mount it keeps the number it was created
    // with, also once the kernel forgot it; the other site gives the entry its own.
    drop(file);
    assert_eq!(client_a.read("/d/new.txt", None).unwrap(), b"hello");
    wait_until(TIMEOUT, || Ok(client_b.read("/d/new.txt", None).is_ok_and(|d| d == b"hello"))).unwrap();
    assert_eq!(std::fs::read(b.join("d/new.txt")).unwrap(), b"hello");
    assert_eq!(a.join("d/new.txt").metadata().unwrap().ino(), ino);
    let drop_caches = || std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    drop_caches(); // the kernel forgets the names and inodes it does not use
    std::thread::sleep(Duration::from_millis(1_100)); // and the names expire: looked up again
    assert_eq!(a.join("d/new.txt").metadata().unwrap().ino(), ino);
    let listed: Vec<u64> = std::fs::read_dir(a.join("d")).unwrap().map(|e| e.unwrap().ino()).collect();
    assert_eq!(listed, [ino]);
    // Unlinked before its close: never an entry.
    let mut gone = std::fs::File::create(a.join("d/gone.txt")).unwrap();
    gone.write_all(b"nobody sees this").unwrap();
    std::fs::remove_file(a.join("d/gone.txt")).unwrap();
    assert!(!exists(&a.join("d/gone.txt")).unwrap());
    drop(gone);
    assert!(!exists(&a.join("d/gone.txt")).unwrap());
    assert!(client_a.stat("/d/gone.txt").is_err());
    // Renamed before its close: committed first, then moved; later writes follow it.
    let mut moved = std::fs::File::create(a.join("d/tmp.txt")).unwrap();
    moved.write_all(b"first ").unwrap();
    std::fs::rename(a.join("d/tmp.txt"), a.join("d/final.txt")).unwrap();
    moved.write_all(b"second").unwrap();
    drop(moved);
    assert!(!exists(&a.join("d/tmp.txt")).unwrap());
    assert_eq!(std::fs::read(a.join("d/final.txt")).unwrap(), b"first second");
    assert_eq!(client_a.read("/d/final.txt", None).unwrap(), b"first second");
    // Created empty and closed: an empty file, at every site.
    std::fs::File::create(a.join("d/empty")).unwrap();
    wait_until(TIMEOUT, || Ok(client_b.stat("/d/empty").is_ok_and(|s| s.size == 0))).unwrap();
}

#[test]
fn a_commit_in_flight_never_lands_on_a_file_renamed_over_or_removed() {
    use std::io::Write;
    let mounts = Mounts::start(1);
    let a = mounts.dir(0);
    let client = mounts.cluster.site(0).client.clone();
    // Big enough that its commit is still going when the rename or removal comes.
    let big = pseudo_random(5, 16 << 20);
    std::fs::write(a.join("x"), b"first").unwrap();
    for round in 0..3u64 {
        std::fs::write(a.join("y"), b"the renamed file").unwrap();
        let mut writer = std::fs::File::create(a.join("x")).unwrap();
        writer.write_all(&big).unwrap();
        std::thread::scope(|s| {
            s.spawn(move || drop(writer));
            std::thread::sleep(Duration::from_millis(2 + 5 * round));
            std::fs::rename(a.join("y"), a.join("x")).unwrap();
        });
        // (Not assert_eq!: a failure would print 16 MiB.)
        let at_node = client.read("/x", None).unwrap();
        assert!(at_node == b"the renamed file", "round {round}: {} bytes at /x", at_node.len());
        assert!(std::fs::read(a.join("x")).unwrap() == b"the renamed file", "round {round}");
    }
    // Removed while its close commits it: an existing file, and one created by that writer.
    for (round, existing) in [(0u64, true), (1, false), (2, true), (3, false)] {
        let path = a.join(format!("z{round}"));
        if existing {
            std::fs::write(&path, b"before").unwrap();
        }
        let mut writer = std::fs::File::create(&path).unwrap();
        writer.write_all(&big).unwrap();
        std::thread::scope(|s| {
            s.spawn(move || drop(writer));
            std::thread::sleep(Duration::from_millis(2 + 3 * round));
            std::fs::remove_file(&path).unwrap();
        });
        assert!(client.stat(&format!("/z{round}")).is_err(), "round {round}: the file came back");
        assert!(!exists(&path).unwrap());
    }
}

#[test]
fn an_edit_of_a_few_bytes_commits_a_version_sharing_every_unchanged_chunk() {
    // Small chunks (16..256 KiB), so that what moves shows.
    let small = |c: &mut node::config::Config| {
        c.chunking = node::config::Chunking { min_bytes: 16 << 10, avg_bytes: 64 << 10, max_bytes: 256 << 10 }
    };
    let mounts = Mounts::start_configured(2, small, |_| {});
    let (a, b) = (mounts.cluster.site(0).client.clone(), mounts.cluster.site(1).client.clone());
    let mut data = pseudo_random(25, 16 << 20);
    a.put("/big.bin", &data).unwrap();
    let at_b = mounts.dir(1).join("big.bin");
    wait_until(TIMEOUT, || Ok(at_b.metadata().is_ok_and(|m| m.len() == data.len() as u64))).unwrap();
    // Edited at b, which does not hold it: b fetches it once (the site that writes a version
    // holds all of it) and commits a version whose chunks are the old ones but around the edit.
    let fetched_b = b.status().unwrap().core.bytes_fetched;
    let offset = 10 << 20;
    let file = std::fs::OpenOptions::new().write(true).open(&at_b).unwrap();
    file.write_all_at(b"an edit!", offset).unwrap();
    drop(file);
    data[offset as usize..offset as usize + 8].copy_from_slice(b"an edit!");
    let fetched_b = b.status().unwrap().core.bytes_fetched - fetched_b;
    assert!(fetched_b <= data.len() as u64, "b fetched {fetched_b} bytes to edit a file of {}", data.len());
    // a, which holds the old version, fetches only the chunks around the edit to read the new.
    let new_version = b.stat("/big.bin").unwrap().version.unwrap().id;
    wait_until(TIMEOUT, || Ok(a.stat("/big.bin")?.version.is_some_and(|v| v.id == new_version))).unwrap();
    let fetched_a = a.status().unwrap().core.bytes_fetched;
    assert!(a.read("/big.bin", None).unwrap() == data, "the edit is in the version a reads");
    let fetched_a = a.status().unwrap().core.bytes_fetched - fetched_a;
    assert!(
        fetched_a > 0 && fetched_a <= 3 * (256 << 10),
        "a fetched {fetched_a} bytes of a new version differing by 8 bytes"
    );
}

#[test]
fn an_open_file_reads_the_version_it_opened() {
    let mounts = Mounts::start(2);
    let (a, b) = (mounts.dir(0), mounts.dir(1));
    let client_b = mounts.cluster.site(1).client.clone();
    let (old, new) = (pseudo_random(26, 32 << 20), pseudo_random(27, 32 << 20));
    std::fs::write(a.join("frame.exr"), &old).unwrap();
    wait_until(TIMEOUT, || Ok(b.join("frame.exr").metadata().is_ok_and(|m| m.len() == old.len() as u64)))
        .unwrap();
    let reader = std::fs::File::open(b.join("frame.exr")).unwrap();
    let mut head = vec![0u8; 1 << 20];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert!(head[..] == old[..1 << 20]);
    // A new version written at a while b's program has the file open: that program goes on
    // reading the version it opened, to its end (never a mix of the two).
    let opened = client_b.stat("/frame.exr").unwrap().version.unwrap().id;
    std::fs::write(a.join("frame.exr"), &new).unwrap();
    wait_until(TIMEOUT, || Ok(client_b.stat("/frame.exr")?.version.is_some_and(|v| v.id != opened))).unwrap();
    let mut tail = vec![0u8; 8 << 20];
    reader.read_exact_at(&mut tail, 24 << 20).unwrap();
    assert!(tail[..] == old[24 << 20..], "the open file read bytes of the new version");
    // Opened again: the new version.
    wait_until(TIMEOUT, || Ok(std::fs::read(b.join("frame.exr"))? == new)).unwrap();
    // Moved at a while open at b: still read.
    let reader = std::fs::File::open(b.join("frame.exr")).unwrap();
    std::fs::rename(a.join("frame.exr"), a.join("moved.exr")).unwrap();
    wait_until(TIMEOUT, || Ok(client_b.stat("/moved.exr").is_ok())).unwrap();
    reader.read_exact_at(&mut tail, 16 << 20).unwrap();
    assert!(tail[..] == new[16 << 20..24 << 20], "the open file, moved, read other bytes");
}

#[test]
fn a_file_removed_while_an_open_copies_it_stays_removed() {
    let mounts = Mounts::start(2);
    let b = mounts.dir(1);
    let client_b = mounts.cluster.site(1).client.clone();
    // At a only: b's open for writing copies it from a, which takes a while.
    mounts.cluster.site(0).client.put("/big.bin", &pseudo_random(28, 48 << 20)).unwrap();
    wait_until(TIMEOUT, || Ok(client_b.stat("/big.bin").is_ok())).unwrap();
    let path = b.join("big.bin");
    let opened = std::thread::scope(|s| {
        let open = s.spawn(|| std::fs::OpenOptions::new().write(true).open(&path));
        std::thread::sleep(Duration::from_millis(20));
        std::fs::remove_file(&path).unwrap();
        open.join().unwrap()
    });
    // (Opened before the removal, or refused after it.)
    if let Ok(file) = opened {
        file.write_all_at(b"late", 0).unwrap();
        drop(file);
    }
    assert!(client_b.stat("/big.bin").is_err(), "the removed file came back");
    assert!(!exists(&path).unwrap());
}

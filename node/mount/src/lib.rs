//! `meridian mount`: the local site's namespace as a POSIX file system (FUSE, `fuser`), a client
//! of the node's control socket. The file system itself is [`fs::MeridianFs`]; its module doc
//! says how each operation is served. `docs/posix.md` lists what differs from POSIX.

pub mod follow;
pub mod fs;
pub mod inodes;
pub mod remote;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use fuser::{Config, MountOption, SessionACL};

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// How long a read waits for bytes no reachable site or bucket supplies before it fails
    /// with EIO.
    pub read_timeout: Duration,
    /// Where files open for writing are kept until they are committed.
    pub scratch_dir: PathBuf,
    /// Let other users than the mount's use it (their permissions checked against the modes).
    pub allow_other: bool,
    /// How long the kernel keeps names and attributes without asking (another site's changes
    /// make it forget them sooner: [`follow`]).
    pub attr_ttl: Duration,
}

impl MountOptions {
    /// The defaults, with files open for writing kept in `scratch_dir`.
    pub fn new(scratch_dir: PathBuf) -> MountOptions {
        MountOptions {
            read_timeout: DEFAULT_READ_TIMEOUT,
            scratch_dir,
            allow_other: false,
            attr_ttl: fs::TTL,
        }
    }
}

/// How long a read waits for its bytes by default.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A mounted namespace: unmounted when dropped or by [`Mounted::unmount`].
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    runtime: Option<tokio::runtime::Runtime>,
    /// The thread following the node's changes, and what stops it.
    follower: Option<(std::thread::JoinHandle<()>, Arc<AtomicBool>)>,
    dir: PathBuf,
}

/// Mounts the namespace of the node listening on `socket` at `dir`.
pub fn mount(socket: &Path, dir: &Path, options: &MountOptions) -> anyhow::Result<Mounted> {
    std::fs::create_dir_all(&options.scratch_dir)
        .with_context(|| format!("making the scratch directory {}", options.scratch_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("meridian-mount")
        .enable_all()
        .build()
        .context("starting the mount's runtime")?;
    let remote = remote::Remote::new(socket.to_owned(), options.read_timeout);
    let fs =
        fs::MeridianFs::new(remote, runtime.handle().clone(), options.scratch_dir.clone(), options.attr_ttl)
            .with_context(|| format!("asking the node at {} for its namespace", socket.display()))?;
    let follower = fs.follower();
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("meridian".into()),
        MountOption::Subtype("meridian".into()),
        MountOption::DefaultPermissions,
    ];
    if options.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(4);
    config.clone_fd = true;
    // fuser mounts directly as root and through the setuid fusermount3 otherwise; both open
    // /dev/fuse as this user, which some systems (containers) allow root only.
    if !rustix::process::geteuid().is_root()
        && let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse")
        && e.kind() == std::io::ErrorKind::PermissionDenied
    {
        bail!(
            "cannot open /dev/fuse as this user ({e}): a mount by an ordinary user needs it open to everyone, \
             as fuse3's udev rule makes it (`chmod 666 /dev/fuse`), or mount as root"
        );
    }
    let session = fuser::Session::new(fs, dir, &config);
    let session = session
        .with_context(|| format!("mounting at {} (is fuse3 installed, and /dev/fuse there?)", dir.display()))?
        .spawn()
        .context("starting the mount's threads")?;
    raise_readahead(dir);
    let stop = Arc::new(AtomicBool::new(false));
    let notifier = session.notifier();
    let following = std::thread::Builder::new()
        .name("meridian-follow".into())
        .spawn({
            let stop = stop.clone();
            move || follower.run(notifier, stop)
        })
        .context("starting the thread that follows the node's changes")?;
    Ok(Mounted {
        session: Some(session),
        runtime: Some(runtime),
        follower: Some((following, stop)),
        dir: dir.to_owned(),
    })
}

/// Bytes the kernel reads ahead of a sequential reader of the mount (its default for FUSE is
/// 128 KiB: small requests, one round trip each).
pub const READ_AHEAD: u64 = 4 << 20;

/// Raises the kernel's read-ahead for the mount at `dir` to [`READ_AHEAD`] (its
/// `/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`; root only: otherwise it stays as it is).
fn raise_readahead(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else { return };
    let dev = meta.dev();
    let knob = format!("/sys/class/bdi/{}:{}/read_ahead_kb", rustix::fs::major(dev), rustix::fs::minor(dev));
    if let Err(e) = std::fs::write(&knob, (READ_AHEAD >> 10).to_string()) {
        tracing::debug!("raising the read-ahead of {} ({knob}): {e}", dir.display());
    }
}

impl Mounted {
    /// Where it is mounted.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts and waits for the mount's threads.
    pub fn unmount(mut self) -> anyhow::Result<()> {
        self.stop()
    }

    /// Waits until the file system is unmounted from outside (`fusermount3 -u`, `umount`).
    pub fn wait(mut self) -> anyhow::Result<()> {
        if let Some(session) = self.session.take() {
            session.join().context("the mount's threads")?;
        }
        self.stop()
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some((thread, stop)) = self.follower.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
        if let Some(session) = self.session.take()
            && let Err(e) = session.umount_and_join()
        {
            // Busy (a program has a file open there): detached now, gone once it lets go.
            tracing::info!("unmounting {}: {e}; detaching it", self.dir.display());
            detach(&self.dir)?;
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
        Ok(())
    }
}

/// Unmounts `dir` lazily: `fusermount3 -u -z`, else `umount -l`.
fn detach(dir: &Path) -> anyhow::Result<()> {
    let tried = [("fusermount3", ["-u", "-z"]), ("umount", ["-l", ""])];
    for (program, args) in tried {
        let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
        let status = std::process::Command::new(program)
            .args(args)
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status();
        if status.is_ok_and(|s| s.success()) {
            return Ok(());
        }
    }
    anyhow::bail!("could not unmount {} (try `fusermount3 -u -z {}`)", dir.display(), dir.display())
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("{e:#}");
        }
    }
}

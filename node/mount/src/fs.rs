//! The FUSE file system: every operation of the contract's list, answered from the node's
//! local replica (metadata) or by tasks that reply when the bytes are there (reads, commits).
//!
//! - Metadata (`lookup`, `getattr`, `readdir`) is one call to the node, answered by the local
//!   replica without the network, on the FUSE thread that asked.
//! - Reads run as tasks on the mount's runtime and reply when their bytes arrive, so a read
//!   waiting for a remote chunk holds up no other operation. A read fetches what the kernel
//!   asked for (so a read at some offset of a remote file fetches only the chunks covering
//!   it); reads that continue where the last fetch ended fetch twice as much each time, up to
//!   [`READ_WINDOW`], so a sequential read costs one call to the node per window. Each open file
//!   keeps its last few windows, fetched or in flight, and a read inside one waits for it
//!   instead of fetching again.
//! - Another site's changes reach the kernel's caches through [`crate::follow`], on a thread
//!   of its own: it follows the node's log of changed entries and tells the kernel to forget
//!   their names, attributes and pages.
//! - Writes are close-to-open: a file open for writing is a scratch file (the current content
//!   copied in first, unless it is truncated); `flush` (each `close`) and `fsync` make it the
//!   file's new version through the ordinary put path, durable before they return.
//! - Tags are the extended attributes `user.meridian.<key>`.
//! - Hard links are refused with EPERM; ownership is the mount's user's and cannot change.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use node::api::{ApiRequest, Kind, ListEntry, StatAnswer, TagAnswer};

use crate::follow::Follower;
use crate::inodes::{Inodes, ROOT, child_path, moved_path};
use crate::remote::{Remote, errno};

/// How long the kernel may keep names and attributes before asking again, by default: the
/// change log ([`crate::follow`]) tells it sooner when another site changes them.
pub const TTL: Duration = Duration::from_secs(1);

/// Windows an open file keeps, fetched or in flight.
const WINDOWS_KEPT: usize = 4;

/// Bytes one call to the node reads for an open file (its kernel reads are smaller).
pub const READ_WINDOW: u64 = 4 << 20;

/// The prefix of the extended attributes that are tags.
const TAG_PREFIX: &str = "user.meridian.";

/// Reads the kernel may have in flight at once.
const MAX_BACKGROUND: u16 = 64;

/// The file system.
pub struct MeridianFs {
    remote: Remote,
    runtime: tokio::runtime::Handle,
    inodes: Arc<Mutex<Inodes>>,
    ttl: Duration,
    /// Open files and directories, shared with the tasks that open files for writing.
    h: Arc<Handles>,
    /// The version each file had when it was last opened: its pages stay cached while it is
    /// the same.
    opened_versions: Mutex<HashMap<u64, String>>,
    uid: u32,
    gid: u32,
}

/// Open files and directories.
struct Handles {
    open: Mutex<HashMap<u64, Open>>,
    /// Files open for writing, by inode: every handle of one file shares its scratch file.
    writing: Mutex<HashMap<u64, Arc<Mutex<Scratch>>>>,
    next_fh: AtomicU64,
    scratch_dir: PathBuf,
}

/// An open file or directory.
enum Open {
    Read(Arc<ReadFile>),
    /// A handle on the scratch file of the inode; `true` if it may write (only those commit).
    Write(u64, bool),
    Dir(Vec<Listed>),
}

/// An entry of a directory listing: its inode number, kind and name, and its stat (`.` and
/// `..` have none).
struct Listed {
    ino: u64,
    kind: FileType,
    name: String,
    stat: Option<Box<StatAnswer>>,
}

/// A file open for reading: its path and size at open, and its recent windows.
struct ReadFile {
    path: String,
    size: u64,
    windows: Mutex<Windows>,
}

/// The bytes of a window once fetched, or why they could not be.
type Fetched = Option<Result<Arc<Vec<u8>>, Errno>>;

/// Windows of an open file: fetched, or in flight.
#[derive(Default)]
struct Windows {
    /// The most recent, newest last.
    recent: VecDeque<Window>,
    /// Where the last window fetched ended, and its length: a read starting there continues a
    /// sequential read.
    next: u64,
    len: u64,
}

/// Bytes `start..end` of a file, there once the receiver holds `Some`.
struct Window {
    start: u64,
    end: u64,
    fetched: tokio::sync::watch::Receiver<Fetched>,
}

/// A file open for writing.
struct Scratch {
    path: String,
    /// Shared, so that a commit reads it without holding the scratch's lock (writes and
    /// attributes go on meanwhile).
    file: Arc<File>,
    mode: u32,
    /// A modification time set while it was open (`futimens` before `close`, as `cp -a` and
    /// `tar` do): given to the version it commits. A later write forgets it.
    mtime_ns: Option<i64>,
    /// Changes made to it: a write or resize adds one.
    changes: u64,
    /// `changes` when it was last committed (or made): it is dirty when they differ.
    committed: u64,
    /// Handles open on it.
    handles: usize,
}

/// Reads a file from the start by position, leaving its offset alone (another handle may use
/// it).
struct PositionedReader<'a> {
    file: &'a File,
    at: u64,
}

impl std::io::Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

impl Scratch {
    fn dirty(&self) -> bool {
        self.changes != self.committed
    }

    fn changed(&mut self) {
        self.changes += 1;
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn kind_of(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
    }
}

fn time_of(ns: i64) -> SystemTime {
    if ns >= 0 { UNIX_EPOCH + Duration::from_nanos(ns as u64) } else { UNIX_EPOCH }
}

fn ns_of(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// A name the namespace can take, or the errno for it.
fn name_of(name: &OsStr) -> Result<&str, Errno> {
    let name = name.to_str().ok_or(Errno::EINVAL)?;
    if name.len() > 255 {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(name)
}

impl MeridianFs {
    /// The file system of the node behind `remote`; data calls run on `runtime`; files open for
    /// writing are kept under `scratch_dir`; the kernel keeps names and attributes for `ttl`.
    pub fn new(
        remote: Remote,
        runtime: tokio::runtime::Handle,
        scratch_dir: PathBuf,
        ttl: Duration,
    ) -> anyhow::Result<MeridianFs> {
        let root: StatAnswer = remote.call(&ApiRequest::Stat { path: "/".into() })?;
        Ok(MeridianFs {
            remote,
            runtime,
            inodes: Arc::new(Mutex::new(Inodes::new(root.id))),
            ttl,
            h: Arc::new(Handles {
                open: Mutex::new(HashMap::new()),
                writing: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                scratch_dir,
            }),
            opened_versions: Mutex::new(HashMap::new()),
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
        })
    }

    /// What follows the node's changes for the kernel ([`crate::follow`]).
    pub fn follower(&self) -> Follower {
        Follower { remote: self.remote.clone(), inodes: self.inodes.clone() }
    }

    fn path_of(&self, ino: INodeNo) -> Result<String, Errno> {
        lock(&self.inodes).get(ino.0).map(|n| n.path.clone()).ok_or(Errno::ENOENT)
    }

    /// The entry behind `ino`, checked to still be the one at its path.
    fn stat_ino(&self, ino: INodeNo) -> Result<(String, StatAnswer), Errno> {
        let (id, path) = {
            let inodes = lock(&self.inodes);
            let node = inodes.get(ino.0).ok_or(Errno::ENOENT)?;
            (node.id.clone(), node.path.clone())
        };
        let stat = self.stat(&path)?;
        if stat.id != id {
            // Moved or replaced at another site, and the kernel's name for it is older than
            // the news: ESTALE makes a call by path (chmod, open, ...) look the name up again
            // and act on the entry there now.
            return Err(Errno::ESTALE);
        }
        Ok((path, stat))
    }

    fn stat(&self, path: &str) -> Result<StatAnswer, Errno> {
        self.remote.call(&ApiRequest::Stat { path: path.to_owned() }).map_err(|e| errno(&e))
    }

    fn call(&self, request: ApiRequest) -> Result<(), Errno> {
        self.remote.call::<()>(&request).map_err(|e| errno(&e))
    }

    fn attr(&self, ino: u64, stat: &StatAnswer) -> FileAttr {
        let kind = kind_of(stat.kind);
        let mut size = match stat.kind {
            Kind::Symlink => stat.symlink_target.as_ref().map_or(0, |t| t.len() as u64),
            _ => stat.size,
        };
        let mut mtime = time_of(stat.mtime_ns);
        let mut mode = stat.mode;
        let scratch = lock(&self.h.writing).get(&ino).cloned();
        if let Some(scratch) = scratch {
            // What this mount is writing shows before it is committed.
            let file = {
                let s = lock(&scratch);
                s.dirty().then(|| (s.file.clone(), s.mode))
            };
            if let Some((file, scratch_mode)) = file
                && let Ok(meta) = file.metadata()
            {
                size = meta.len();
                mtime = meta.modified().unwrap_or(mtime);
                mode = scratch_mode;
            }
        }
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (mode & 0o7777) as u16,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 128 << 10,
            flags: 0,
        }
    }

    /// Attributes for `.` and `..` in a listing (the kernel does not keep them).
    fn dir_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(ROOT),
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 128 << 10,
            flags: 0,
        }
    }

    /// Replies with the entry now at `path` in directory `parent`, counting a lookup.
    fn reply_entry(&self, parent: INodeNo, path: &str, reply: ReplyEntry) {
        match self.stat(path) {
            Ok(stat) => {
                let ino = lock(&self.inodes).learn(&stat.id, parent.0, path);
                reply.entry(&self.ttl, &self.attr(ino, &stat), Generation(0));
            }
            Err(e) => reply.error(e),
        }
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<String, Errno> {
        Ok(child_path(&self.path_of(parent)?, name_of(name)?))
    }

    /// Makes what was written to `scratch` the file's new version, if anything was. The
    /// scratch's lock is not held while the bytes go to the node: writes, attributes and other
    /// handles of the file go on meanwhile (a write made during the commit leaves the file
    /// dirty, for the next one).
    fn commit(remote: &Remote, scratch: &Mutex<Scratch>) -> Result<(), Errno> {
        let (path, mode, mtime_ns, file, changes) = {
            let mut s = lock(scratch);
            if s.path.is_empty() {
                // Replaced by a rename: nothing to commit to.
                s.committed = s.changes;
            }
            if !s.dirty() {
                return Ok(());
            }
            (s.path.clone(), s.mode, s.mtime_ns, s.file.clone(), s.changes)
        };
        let mut source = PositionedReader { file: &file, at: 0 };
        remote.put(&path, mode, mtime_ns, &mut source).map_err(|e| {
            tracing::warn!("committing {path}: {e:#}");
            errno(&e)
        })?;
        let mut s = lock(scratch);
        s.committed = s.committed.max(changes);
        Ok(())
    }

    /// Commits the scratch file of `fh` on a blocking task and replies when it is durable.
    fn commit_then(&self, fh: FileHandle, reply: ReplyEmpty) {
        // A reader of a file this mount writes never publishes the writer's unfinished bytes.
        if !self.h.writes(fh) {
            return reply.ok();
        }
        let Some(scratch) = self.h.scratch_of(fh) else { return reply.ok() };
        let remote = self.remote.clone();
        self.runtime.spawn_blocking(move || match Self::commit(&remote, &scratch) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    /// Changes the size of the file at `path` (`ino`) outside any open handle.
    fn truncate(&self, ino: u64, path: &str, mode: u32, size: u64) -> Result<(), Errno> {
        let scratch = self.h.start_writing(&self.remote, &self.runtime, ino, path, mode, size == 0)?;
        let resized = {
            let mut s = lock(&scratch);
            s.changed();
            s.file.set_len(size).map_err(|_| Errno::EIO)
        };
        let result = resized.and_then(|()| Self::commit(&self.remote, &scratch));
        self.h.stop_writing(ino);
        result
    }

    fn read_window(&self, file: Arc<ReadFile>, offset: u64, size: u32, reply: ReplyData) {
        let end = (offset + u64::from(size)).min(file.size);
        if offset >= end {
            return reply.data(&[]);
        }
        let (start, mut fetched) = {
            let mut windows = lock(&file.windows);
            // A window whose fetch failed is fetched again.
            let usable = |w: &&Window| {
                w.start <= offset && end <= w.end && w.fetched.borrow().as_ref().is_none_or(Result::is_ok)
            };
            match windows.recent.iter().find(usable) {
                Some(w) => (w.start, w.fetched.clone()),
                None => {
                    // A read where the last fetch ended continues a sequential read: fetch
                    // twice as much as then. Any other fetches what was asked.
                    let asked = end - offset;
                    let len = if offset == windows.next {
                        (windows.len * 2).clamp(asked, READ_WINDOW.max(asked))
                    } else {
                        asked
                    };
                    let fetch_end = (offset + len).min(file.size);
                    let (sender, receiver) = tokio::sync::watch::channel(None);
                    if windows.recent.len() == WINDOWS_KEPT {
                        windows.recent.pop_front();
                    }
                    windows.recent.push_back(Window {
                        start: offset,
                        end: fetch_end,
                        fetched: receiver.clone(),
                    });
                    windows.next = fetch_end;
                    windows.len = fetch_end - offset;
                    let remote = self.remote.clone();
                    let path = file.path.clone();
                    self.runtime.spawn(async move {
                        let result = remote.read(&path, offset, fetch_end).await.map(Arc::new).map_err(|e| {
                            tracing::error!("{e:#}");
                            errno(&e)
                        });
                        let _ = sender.send(Some(result));
                    });
                    (offset, receiver)
                }
            }
        };
        self.runtime.spawn(async move {
            let result = match fetched.wait_for(Option::is_some).await {
                Ok(fetched) => fetched.clone().expect("waited for it"),
                // The fetching task is gone (the mount is stopping).
                Err(_) => Err(Errno::EIO),
            };
            match result {
                Ok(data) => {
                    let from = ((offset - start) as usize).min(data.len());
                    let to = ((end - start) as usize).min(data.len());
                    reply.data(&data[from..to]);
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn tag_key(name: &OsStr) -> Option<&str> {
        name.to_str()?.strip_prefix(TAG_PREFIX)
    }
}

impl Handles {
    fn new_fh(&self, open: Open) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.open).insert(fh, open);
        fh
    }

    /// The scratch file of `ino` open for writing (one more handle on it), made from the
    /// file's current content unless `truncate` (copied through `runtime`, failing with EIO if
    /// no bytes come for the read timeout: not on a FUSE thread when it can be long).
    fn start_writing(
        &self,
        remote: &Remote,
        runtime: &tokio::runtime::Handle,
        ino: u64,
        path: &str,
        mode: u32,
        truncate: bool,
    ) -> Result<Arc<Mutex<Scratch>>, Errno> {
        {
            // One more handle while `writing` is held: a release racing this open cannot
            // take the scratch file away in between.
            let writing = lock(&self.writing);
            if let Some(scratch) = writing.get(&ino).cloned() {
                return Handles::one_more_handle(scratch, truncate);
            }
        }
        let file = tempfile::tempfile_in(&self.scratch_dir).map_err(|e| {
            tracing::error!("making a scratch file in {}: {e}", self.scratch_dir.display());
            Errno::EIO
        })?;
        if !truncate {
            runtime.block_on(remote.copy_into(path, &file)).map_err(|e| {
                tracing::warn!("opening {path} for writing: {e:#}");
                match e.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error) {
                    Some(libc::ENOSPC) => Errno::ENOSPC,
                    _ => errno(&e),
                }
            })?;
        }
        let mut writing = lock(&self.writing);
        if let Some(scratch) = writing.get(&ino).cloned() {
            // Another open made one meanwhile, of the same content: that one it is.
            return Handles::one_more_handle(scratch, truncate);
        }
        let scratch = Arc::new(Mutex::new(Scratch {
            path: path.to_owned(),
            file: Arc::new(file),
            mode,
            mtime_ns: None,
            changes: u64::from(truncate),
            committed: 0,
            handles: 1,
        }));
        writing.insert(ino, scratch.clone());
        Ok(scratch)
    }

    fn one_more_handle(scratch: Arc<Mutex<Scratch>>, truncate: bool) -> Result<Arc<Mutex<Scratch>>, Errno> {
        let mut s = lock(&scratch);
        if truncate {
            s.file.set_len(0).map_err(|_| Errno::EIO)?;
            s.changed();
        }
        s.handles += 1;
        drop(s);
        Ok(scratch)
    }

    fn scratch_of(&self, fh: FileHandle) -> Option<Arc<Mutex<Scratch>>> {
        let ino = match lock(&self.open).get(&fh.0) {
            Some(Open::Write(ino, _)) => *ino,
            _ => return None,
        };
        lock(&self.writing).get(&ino).cloned()
    }

    /// Whether `fh` may write.
    fn writes(&self, fh: FileHandle) -> bool {
        matches!(lock(&self.open).get(&fh.0), Some(Open::Write(_, true)))
    }

    /// Keeps the bytes of a file closed with writes that could not be committed (the node was
    /// down, the disk full) in the scratch directory's `unsaved/`, and says where.
    fn keep_unsaved(&self, s: &Scratch) {
        let dir = self.scratch_dir.join("unsaved");
        let name = s.path.trim_start_matches('/').replace('/', "%");
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let kept = dir.join(format!("{stamp}-{name}"));
        let copied = std::fs::create_dir_all(&dir).and_then(|()| {
            let mut out = File::create(&kept)?;
            std::io::copy(&mut PositionedReader { file: &s.file, at: 0 }, &mut out)?;
            out.sync_all()
        });
        match copied {
            Ok(()) => tracing::error!(
                "{}: closed with writes that could not be committed; its bytes are kept in {}",
                s.path,
                kept.display()
            ),
            Err(e) => tracing::error!(
                "{}: closed with writes that could not be committed, and keeping them in {} failed: {e}",
                s.path,
                kept.display()
            ),
        }
    }

    /// One handle fewer on the scratch file of `ino`; the last one removes it.
    fn stop_writing(&self, ino: u64) {
        let mut writing = lock(&self.writing);
        let Some(scratch) = writing.get(&ino).cloned() else { return };
        let mut s = lock(&scratch);
        s.handles = s.handles.saturating_sub(1);
        if s.handles == 0 {
            if s.dirty() && !s.path.is_empty() {
                self.keep_unsaved(&s);
            }
            drop(s);
            writing.remove(&ino);
        }
    }
}

impl Filesystem for MeridianFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_background(MAX_BACKGROUND);
        // open(O_TRUNC) arrives as such, rather than as an open then a truncation: a file
        // overwritten is never copied into the scratch space first.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ATOMIC_O_TRUNC);
        let _ = config.set_max_readahead(1 << 20);
        // Listings carry attributes (readdirplus).
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name) {
            Ok(path) => self.reply_entry(parent, &path, reply),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        lock(&self.inodes).forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.stat_ino(ino) {
            Ok((_, stat)) => reply.attr(&self.ttl, &self.attr(ino.0, &stat)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = (|| {
            if uid.is_some_and(|u| u != self.uid) || gid.is_some_and(|g| g != self.gid) {
                return Err(Errno::EPERM);
            }
            let (path, stat) = self.stat_ino(ino)?;
            if let Some(size) = size {
                if stat.kind == Kind::Dir {
                    return Err(Errno::EISDIR);
                }
                let through_writer = fh.is_some_and(|fh| self.h.writes(fh));
                match fh
                    .and_then(|fh| self.h.scratch_of(fh))
                    .or_else(|| lock(&self.h.writing).get(&ino.0).cloned())
                {
                    Some(scratch) => {
                        {
                            let mut s = lock(&scratch);
                            s.file.set_len(size).map_err(|_| Errno::EIO)?;
                            s.changed();
                        }
                        // `truncate` by path (or through a read-only handle): done now, as
                        // no close of a writer may come to commit it.
                        if !through_writer {
                            Self::commit(&self.remote, &scratch)?;
                        }
                    }
                    None => self.truncate(ino.0, &path, stat.mode, size)?,
                }
            }
            let mtime_ns = mtime.map(|t| match t {
                TimeOrNow::SpecificTime(t) => ns_of(t),
                TimeOrNow::Now => ns_of(SystemTime::now()),
            });
            if mode.is_some() || mtime_ns.is_some() {
                let mode = mode.map(|m| m & 0o7777);
                let scratch = lock(&self.h.writing).get(&ino.0).cloned();
                // A file written and not yet committed takes them with its commit (one
                // change, as `cp -a` sets both before closing): decided and kept under the
                // scratch's lock, and counted as a change, so that a commit in flight leaves
                // them for the next one. Any other file: now.
                let deferred = scratch.is_some_and(|scratch| {
                    let mut s = lock(&scratch);
                    if let Some(mode) = mode {
                        s.mode = mode;
                    }
                    if !s.dirty() {
                        return false;
                    }
                    if let Some(mtime_ns) = mtime_ns {
                        s.mtime_ns = Some(mtime_ns);
                        let _ = s.file.set_modified(time_of(mtime_ns));
                    }
                    s.changed();
                    true
                });
                if !deferred {
                    self.call(ApiRequest::SetAttr { path: path.clone(), mode, mtime_ns })?;
                }
            }
            let stat = self.stat(&path)?;
            Ok(self.attr(ino.0, &stat))
        })();
        match result {
            Ok(attr) => reply.attr(&self.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.stat_ino(ino) {
            Ok((_, stat)) => match stat.symlink_target {
                Some(target) => reply.data(target.as_bytes()),
                None => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            // Only regular files, directories and symlinks exist in the namespace.
            return reply.error(Errno::EPERM);
        }
        let _ = req;
        match self.child(parent, name) {
            Ok(path) => match self.remote.put(&path, mode & !umask & 0o7777, None, &mut std::io::empty()) {
                Ok(()) => self.reply_entry(parent, &path, reply),
                Err(e) => reply.error(errno(&e)),
            },
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        match self.child(parent, name) {
            Ok(path) => {
                let request = ApiRequest::Mkdir {
                    path: path.clone(),
                    parents: false,
                    mode: Some(mode & !umask & 0o7777),
                };
                match self.call(request) {
                    Ok(()) => self.reply_entry(parent, &path, reply),
                    Err(e) => reply.error(e),
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.child(parent, name).and_then(|path| {
            if self.stat(&path)?.kind == Kind::Dir {
                return Err(Errno::EISDIR);
            }
            self.call(ApiRequest::Rm { path, recursive: false })
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.child(parent, name).and_then(|path| {
            if self.stat(&path)?.kind != Kind::Dir {
                return Err(Errno::ENOTDIR);
            }
            self.call(ApiRequest::Rm { path, recursive: false })
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let result = self.child(parent, link_name).and_then(|path| {
            let target = target.to_str().ok_or(Errno::EINVAL)?.to_owned();
            self.call(ApiRequest::Symlink { path: path.clone(), target })?;
            Ok(path)
        });
        match result {
            Ok(path) => self.reply_entry(parent, &path, reply),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                return Err(Errno::EINVAL);
            }
            let from = self.child(parent, name)?;
            let to = self.child(newparent, newname)?;
            if flags.contains(RenameFlags::RENAME_NOREPLACE) && self.stat(&to).is_ok() {
                return Err(Errno::EEXIST);
            }
            // Over an existing entry: replaced in the same change (POSIX's checks in the node).
            self.call(ApiRequest::Mv { from: from.clone(), to: to.clone(), replace: true })?;
            lock(&self.inodes).moved(&from, &to, newparent.0);
            for scratch in lock(&self.h.writing).values() {
                let mut s = lock(scratch);
                if s.path == to && to != from {
                    // The file it was writing is gone (replaced): like writes to an unlinked
                    // file, its bytes go nowhere, and never over the file now there.
                    s.path.clear();
                } else if let Some(path) = moved_path(&s.path, &from, &to) {
                    s.path = path;
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        // Hard links do not exist in the namespace (docs/posix.md).
        reply.error(Errno::EPERM);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (path, stat) = match self.stat_ino(ino) {
            Ok(found) => found,
            Err(e) => return reply.error(e),
        };
        if stat.kind == Kind::Dir {
            return reply.error(Errno::EISDIR);
        }
        let writes = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if writes || lock(&self.h.writing).contains_key(&ino.0) {
            // A file this mount writes is read from its scratch file, whatever the handle.
            let truncate = writes && flags.0 & libc::O_TRUNC != 0;
            let (h, remote, runtime) = (self.h.clone(), self.remote.clone(), self.runtime.clone());
            let open = move || match h.start_writing(&remote, &runtime, ino.0, &path, stat.mode, truncate) {
                Ok(_) => reply
                    .opened(FileHandle(h.new_fh(Open::Write(ino.0, writes))), FopenFlags::FOPEN_DIRECT_IO),
                Err(e) => reply.error(e),
            };
            if truncate || lock(&self.h.writing).contains_key(&ino.0) {
                open();
            } else {
                // The file's current content is copied in first, which may take long: on a
                // task, so that this thread serves other requests meanwhile.
                self.runtime.spawn_blocking(open);
            }
            return;
        }
        let version = stat.version.as_ref().map(|v| v.id.clone()).unwrap_or_default();
        let same = lock(&self.opened_versions).insert(ino.0, version.clone()).as_ref() == Some(&version);
        let file = ReadFile { path, size: stat.size, windows: Mutex::new(Windows::default()) };
        let flags = if same { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
        reply.opened(FileHandle(self.h.new_fh(Open::Read(Arc::new(file)))), flags);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let reading = match lock(&self.h.open).get(&fh.0) {
            Some(Open::Read(file)) => Some(file.clone()),
            Some(Open::Write(..)) => None,
            _ => return reply.error(Errno::EBADF),
        };
        if let Some(file) = reading {
            return self.read_window(file, offset, size, reply);
        }
        let Some(scratch) = self.h.scratch_of(fh) else { return reply.error(Errno::EBADF) };
        let mut buf = vec![0u8; size as usize];
        let read = lock(&scratch).file.read_at(&mut buf, offset);
        match read {
            Ok(n) => reply.data(&buf[..n]),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(scratch) = self.h.scratch_of(fh) else { return reply.error(Errno::EBADF) };
        let mut s = lock(&scratch);
        match s.file.write_all_at(data, offset) {
            Ok(()) => {
                s.changed();
                s.mtime_ns = None;
                reply.written(data.len() as u32);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => reply.error(Errno::ENOSPC),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.commit_then(fh, reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let closed = lock(&self.h.open).remove(&fh.0);
        if let Some(Open::Write(ino, _)) = closed {
            self.h.stop_writing(ino);
        }
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.commit_then(fh, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = (|| {
            let (path, stat) = self.stat_ino(ino)?;
            if stat.kind != Kind::Dir {
                return Err(Errno::ENOTDIR);
            }
            let entries: Vec<ListEntry> =
                self.remote.call(&ApiRequest::Ls { path: path.clone() }).map_err(|e| errno(&e))?;
            let parent = lock(&self.inodes).get(ino.0).map_or(ROOT, |n| n.parent);
            let dot = |ino: u64, name: &str| Listed {
                ino,
                kind: FileType::Directory,
                name: name.to_owned(),
                stat: None,
            };
            let mut listing = vec![dot(ino.0, "."), dot(parent, "..")];
            let inodes = lock(&self.inodes);
            for entry in entries {
                listing.push(Listed {
                    ino: inodes.listed_ino(&entry.stat.id),
                    kind: kind_of(entry.stat.kind),
                    name: entry.name,
                    stat: Some(Box::new(entry.stat)),
                });
            }
            Ok(listing)
        })();
        match result {
            Ok(listing) => reply.opened(FileHandle(self.h.new_fh(Open::Dir(listing))), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let open = lock(&self.h.open);
        let Some(Open::Dir(listing)) = open.get(&fh.0) else { return reply.error(Errno::EBADF) };
        for (i, entry) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(entry.ino), (i + 1) as u64, entry.kind, &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    /// A listing with each entry's attributes, from the same call to the node: `ls -l`, `find`
    /// and `du` need no lookup per entry. Each entry given counts as a lookup, as the kernel
    /// counts it.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let open = lock(&self.h.open);
        let Some(Open::Dir(listing)) = open.get(&fh.0) else { return reply.error(Errno::EBADF) };
        let dir = lock(&self.inodes).get(ino.0).map(|n| n.path.clone());
        let Some(dir) = dir else { return reply.error(Errno::ENOENT) };
        for (i, entry) in listing.iter().enumerate().skip(offset as usize) {
            let next = (i + 1) as u64;
            let Some(stat) = &entry.stat else {
                // `.` and `..`: the kernel takes no entry for them.
                let attr = FileAttr { ino: INodeNo(entry.ino), kind: FileType::Directory, ..self.dir_attr() };
                if reply.add(INodeNo(entry.ino), next, &entry.name, &Duration::ZERO, &attr, Generation(0)) {
                    break;
                }
                continue;
            };
            let path = child_path(&dir, &entry.name);
            let ino = lock(&self.inodes).learn(&stat.id, ino.0, &path);
            let attr = self.attr(ino, stat);
            if reply.add(INodeNo(ino), next, &entry.name, &self.ttl, &attr, Generation(0)) {
                // Full: not given, not counted.
                lock(&self.inodes).forget(ino, 1);
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.h.open).remove(&fh.0);
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctls: ENOTTY, what a program asking whether a file is a terminal expects (and,
        // unlike fuser's default, without a log line for each).
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The scratch space's file system: what a write through the mount can use.
        match rustix::fs::statvfs(&self.h.scratch_dir) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            let key = Self::tag_key(name).ok_or(Errno::ENOTSUP)?.to_owned();
            let value = std::str::from_utf8(value).map_err(|_| Errno::EINVAL)?.to_owned();
            let (path, _) = self.stat_ino(ino)?;
            if flags & (libc::XATTR_CREATE | libc::XATTR_REPLACE) != 0 {
                let tags: Vec<TagAnswer> =
                    self.remote.call(&ApiRequest::TagGet { path: path.clone() }).map_err(|e| errno(&e))?;
                let exists = tags.iter().any(|t| t.key == key);
                if exists && flags & libc::XATTR_CREATE != 0 {
                    return Err(Errno::EEXIST);
                }
                if !exists && flags & libc::XATTR_REPLACE != 0 {
                    return Err(Errno::ENODATA);
                }
            }
            self.call(ApiRequest::TagSet { path, key, value })
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let result = (|| {
            let key = Self::tag_key(name).ok_or(Errno::ENODATA)?;
            let (path, _) = self.stat_ino(ino)?;
            let tags: Vec<TagAnswer> =
                self.remote.call(&ApiRequest::TagGet { path }).map_err(|e| errno(&e))?;
            tags.into_iter().find(|t| t.key == key).map(|t| t.value.into_bytes()).ok_or(Errno::ENODATA)
        })();
        match result {
            Ok(value) if size == 0 => reply.size(value.len() as u32),
            Ok(value) if value.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(value) => reply.data(&value),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let result = (|| {
            let (path, _) = self.stat_ino(ino)?;
            let tags: Vec<TagAnswer> =
                self.remote.call(&ApiRequest::TagGet { path }).map_err(|e| errno(&e))?;
            let mut names = Vec::new();
            for tag in tags {
                names.extend_from_slice(TAG_PREFIX.as_bytes());
                names.extend_from_slice(tag.key.as_bytes());
                names.push(0);
            }
            Ok(names)
        })();
        match result {
            Ok(names) if size == 0 => reply.size(names.len() as u32),
            Ok(names) if names.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(names) => reply.data(&names),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = (|| {
            let key = Self::tag_key(name).ok_or(Errno::ENODATA)?.to_owned();
            let (path, stat) = self.stat_ino(ino)?;
            if !stat.tags.iter().any(|t| t.key == key) {
                return Err(Errno::ENODATA);
            }
            self.call(ApiRequest::TagClear { path, key })
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = (|| {
            let path = self.child(parent, name)?;
            let mode = mode & !umask & 0o7777;
            let (truncate, created) = match self.stat(&path) {
                Ok(_) if flags & libc::O_EXCL != 0 => return Err(Errno::EEXIST),
                Ok(stat) if stat.kind == Kind::Dir => return Err(Errno::EISDIR),
                Ok(_) => (flags & libc::O_TRUNC != 0, false),
                Err(e) if e == Errno::ENOENT => {
                    // The file exists from now on, empty, at every site; its bytes follow at
                    // close.
                    self.remote.put(&path, mode, None, &mut std::io::empty()).map_err(|e| errno(&e))?;
                    (true, true)
                }
                Err(e) => return Err(e),
            };
            let stat = self.stat(&path)?;
            let ino = lock(&self.inodes).learn(&stat.id, parent.0, &path);
            let scratch =
                self.h.start_writing(&self.remote, &self.runtime, ino, &path, stat.mode, truncate)?;
            if created {
                // Empty, as committed: nothing to commit until something is written.
                let mut s = lock(&scratch);
                s.committed = s.changes;
            }
            let fh = self.h.new_fh(Open::Write(ino, true));
            Ok((self.attr(ino, &stat), fh))
        })();
        match result {
            Ok((attr, fh)) => {
                reply.created(&self.ttl, &attr, Generation(0), FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
            }
            Err(e) => reply.error(e),
        }
    }
}

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
use node::api::{ApiRequest, Kind, ListEntry, ReadVersion, StatAnswer, TagAnswer};

use crate::follow::Follower;
use crate::inodes::{Inodes, ROOT, child_path, is_pending, moved_path, within};
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
    /// The file system's inode table: where an inode's file is now.
    inodes: Arc<Mutex<Inodes>>,
    /// Renames and removals through the mount so far: an open that copied a file's content
    /// while one happened takes the file's path anew before it makes its scratch file.
    moves: AtomicU64,
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

/// A file open for reading: its path, version and size at open, and its recent windows. It
/// reads that version until it is opened again, whatever is written meanwhile (never a mix
/// of two versions), also once moved or removed while the version is still held somewhere.
struct ReadFile {
    path: String,
    version: Option<ReadVersion>,
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
    /// Its inode.
    ino: u64,
    path: String,
    /// Created through the mount and not committed yet: the entry is made by its first commit
    /// (its `close`), with its bytes, in one change. Until then only this mount knows it.
    pending: bool,
    /// Shared, so that a commit reads it without holding the scratch's lock (writes and
    /// attributes go on meanwhile).
    file: Arc<File>,
    mode: u32,
    /// A modification time set while it was open (`futimens` before `close`, as `cp -a` and
    /// `tar` do): given to the version it commits. A later write forgets it.
    mtime_ns: Option<i64>,
    /// When its bytes or size last changed (or it was made), by the system's fine clock (file
    /// systems keep a coarser one: two changes a millisecond apart get different times).
    modified_ns: i64,
    /// Changes made to it: a write or resize adds one.
    changes: u64,
    /// `changes` when it was last committed (or made): it is dirty when they differ.
    committed: u64,
    /// Handles open on it.
    handles: usize,
    /// Held by a commit while its bytes go to the node, and by a rename or removal of the file
    /// while it changes where the file is: a commit that read the path before never puts its
    /// bytes there after.
    commit_lock: Arc<Mutex<()>>,
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

    /// Its bytes or size changed now.
    fn touched(&mut self) {
        self.changed();
        self.modified_ns = ns_of(SystemTime::now());
    }

    /// Its modification time: the one set while open, or that of its last write.
    fn mtime_ns(&self) -> i64 {
        self.mtime_ns.unwrap_or(self.modified_ns)
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
        let inodes = Arc::new(Mutex::new(Inodes::new(root.id)));
        Ok(MeridianFs {
            remote,
            runtime,
            inodes: inodes.clone(),
            ttl,
            h: Arc::new(Handles {
                open: Mutex::new(HashMap::new()),
                writing: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                scratch_dir,
                inodes,
                moves: AtomicU64::new(0),
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
        // An empty path: removed through the mount.
        lock(&self.inodes).get(ino.0).map(|n| n.path.clone()).filter(|p| !p.is_empty()).ok_or(Errno::ENOENT)
    }

    /// The entry behind `ino`, checked to still be the one at its path.
    fn stat_ino(&self, ino: INodeNo) -> Result<(String, StatAnswer), Errno> {
        let (id, path) = {
            let inodes = lock(&self.inodes);
            let node = inodes.get(ino.0).filter(|n| !n.path.is_empty()).ok_or(Errno::ENOENT)?;
            (node.id.clone(), node.path.clone())
        };
        if is_pending(&id) {
            return self.pending_stat(ino.0).map(|stat| (path, stat)).ok_or(Errno::ENOENT);
        }
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
                s.dirty().then(|| (s.file.clone(), s.mode, s.mtime_ns()))
            };
            if let Some((file, scratch_mode, scratch_mtime)) = file
                && let Ok(meta) = file.metadata()
            {
                size = meta.len();
                mtime = time_of(scratch_mtime);
                mode = scratch_mode;
            }
        }
        self.attr_of(ino, kind, size, mtime, mode, if kind == FileType::Directory { 2 } else { 1 })
    }

    /// Attributes: the mount's user and group; atime and ctime are the mtime.
    fn attr_of(
        &self,
        ino: u64,
        kind: FileType,
        size: u64,
        mtime: SystemTime,
        mode: u32,
        nlink: u32,
    ) -> FileAttr {
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
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 128 << 10,
            flags: 0,
        }
    }

    /// Attributes of a file this mount has open for writing and that was removed (or renamed
    /// over) meanwhile: what its descriptors show (no links), as long as they are open.
    fn unlinked_attr(&self, ino: u64) -> Option<FileAttr> {
        let scratch = lock(&self.h.writing).get(&ino).cloned()?;
        let (file, mode, mtime_ns) = {
            let s = lock(&scratch);
            if !s.path.is_empty() {
                return None;
            }
            (s.file.clone(), s.mode, s.mtime_ns())
        };
        let size = file.metadata().ok()?.len();
        Some(self.attr_of(ino, FileType::RegularFile, size, time_of(mtime_ns), mode, 0))
    }

    /// Attributes for `.` and `..` in a listing (the kernel does not keep them).
    fn dir_attr(&self) -> FileAttr {
        self.attr_of(ROOT, FileType::Directory, 0, UNIX_EPOCH, 0o755, 2)
    }

    /// What a file created through the mount and not yet committed looks like (only this
    /// mount knows it).
    fn pending_stat(&self, ino: u64) -> Option<StatAnswer> {
        let scratch = lock(&self.h.writing).get(&ino).cloned()?;
        let s = lock(&scratch);
        if !s.pending {
            return None;
        }
        let meta = s.file.metadata().ok()?;
        let mtime_ns = s.mtime_ns();
        let id = lock(&self.inodes).get(ino)?.id.clone();
        Some(StatAnswer {
            id,
            kind: Kind::File,
            size: meta.len(),
            mode: s.mode,
            mtime_ns,
            version: None,
            symlink_target: None,
            tags: Vec::new(),
        })
    }

    /// Commits the files created through the mount at `path` or below it that are not
    /// committed yet: before an operation the node must see them for (a rename, a `rmdir`).
    fn settle(&self, path: &str) -> Result<(), Errno> {
        for scratch in self.h.pending_under(path) {
            Self::commit(&self.remote, &self.inodes, &scratch)?;
        }
        Ok(())
    }

    /// Commits the file of `ino` if it was created through the mount and not committed yet.
    fn settle_ino(&self, ino: INodeNo) -> Result<(), Errno> {
        let scratch = lock(&self.h.writing).get(&ino.0).cloned();
        match scratch {
            Some(scratch) if lock(&scratch).pending => Self::commit(&self.remote, &self.inodes, &scratch),
            _ => Ok(()),
        }
    }

    /// Creates the file at `path` (there is none) for this mount only: the entry is made when
    /// it is first committed (its `close`), with its bytes and attributes, in one change,
    /// instead of an empty version first. Other sites see it from then on.
    fn create_pending(&self, parent: INodeNo, path: &str, mode: u32) -> Result<(FileAttr, u64), Errno> {
        let ino = lock(&self.inodes).pending(parent.0, path);
        let made =
            self.h.start_writing(&self.remote, &self.runtime, ino, path, mode, true).and_then(|scratch| {
                lock(&scratch).pending = true;
                self.pending_stat(ino).ok_or(Errno::EIO)
            });
        match made {
            Ok(stat) => Ok((self.attr(ino, &stat), self.h.new_fh(Open::Write(ino, true)))),
            Err(e) => {
                self.h.stop_writing(ino);
                lock(&self.inodes).forget(ino, 1);
                Err(e)
            }
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

    /// `path`, unless a file created through the mount and not committed yet is there (the
    /// node would not know it is taken).
    fn vacant(&self, path: String) -> Result<String, Errno> {
        match self.h.pending_at(&path) {
            Some(_) => Err(Errno::EEXIST),
            None => Ok(path),
        }
    }

    /// Makes what was written to `scratch` the file's new version, if anything was. The
    /// scratch's lock is not held while the bytes go to the node: writes, attributes and other
    /// handles of the file go on meanwhile (a write made during the commit leaves the file
    /// dirty, for the next one).
    fn commit(remote: &Remote, inodes: &Mutex<Inodes>, scratch: &Mutex<Scratch>) -> Result<(), Errno> {
        let commit_lock = lock(scratch).commit_lock.clone();
        let _committing = lock(&commit_lock);
        let (path, mode, mtime_ns, file, changes, pending, ino) = {
            let mut s = lock(scratch);
            if s.path.is_empty() {
                // Replaced by a rename: nothing to commit to.
                s.committed = s.changes;
            }
            if !s.dirty() {
                return Ok(());
            }
            // The time of the last write, as the file showed while open (not the commit's).
            let mtime_ns = Some(s.mtime_ns());
            (s.path.clone(), s.mode, mtime_ns, s.file.clone(), s.changes, s.pending, s.ino)
        };
        let mut source = PositionedReader { file: &file, at: 0 };
        let put = remote.client.put_with(&path, mode, mtime_ns, &mut source).map_err(|e| {
            tracing::warn!("committing {path}: {e:#}");
            errno(&e)
        })?;
        if pending {
            // Its first commit made the entry: the inode the kernel has stands for it now.
            let id = match put.id {
                Some(id) => Ok(id),
                None => remote.call::<StatAnswer>(&ApiRequest::Stat { path: path.clone() }).map(|s| s.id),
            };
            match id {
                Ok(id) => lock(inodes).bind(ino, &id),
                Err(e) => tracing::warn!("{path}: committed, then not found: {e:#}"),
            }
        }
        let mut s = lock(scratch);
        s.committed = s.committed.max(changes);
        s.pending = false;
        Ok(())
    }

    /// Commits the scratch file of `fh` on a blocking task and replies when it is durable.
    fn commit_then(&self, fh: FileHandle, reply: ReplyEmpty) {
        // A reader of a file this mount writes never publishes the writer's unfinished bytes.
        if !self.h.writes(fh) {
            return reply.ok();
        }
        let Some(scratch) = self.h.scratch_of(fh) else { return reply.ok() };
        let (remote, inodes) = (self.remote.clone(), self.inodes.clone());
        self.runtime.spawn_blocking(move || match Self::commit(&remote, &inodes, &scratch) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    /// Changes the size of the file at `path` (`ino`) outside any open handle.
    fn truncate(&self, ino: u64, path: &str, mode: u32, size: u64) -> Result<(), Errno> {
        let scratch = self.h.start_writing(&self.remote, &self.runtime, ino, path, mode, size == 0)?;
        let resized = {
            let mut s = lock(&scratch);
            s.touched();
            s.file.set_len(size).map_err(|_| Errno::EIO)
        };
        let result = resized.and_then(|()| Self::commit(&self.remote, &self.inodes, &scratch));
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
                    let (path, version) = (file.path.clone(), file.version.clone());
                    self.runtime.spawn(async move {
                        let result =
                            remote.read(&path, version, offset, fetch_end).await.map(Arc::new).map_err(|e| {
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
        let moves = self.moves.load(Ordering::SeqCst);
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
        // Renamed or removed through the mount meanwhile (their changes to the scratch files
        // come after the table's, under `writing`): where it is now, or nowhere ("").
        let path = if self.moves.load(Ordering::SeqCst) == moves {
            path.to_owned()
        } else {
            lock(&self.inodes).get(ino).map(|n| n.path.clone()).unwrap_or_default()
        };
        let scratch = Arc::new(Mutex::new(Scratch {
            ino,
            path,
            pending: false,
            file: Arc::new(file),
            mode,
            mtime_ns: None,
            modified_ns: ns_of(SystemTime::now()),
            changes: u64::from(truncate),
            committed: 0,
            handles: 1,
            commit_lock: Arc::new(Mutex::new(())),
        }));
        writing.insert(ino, scratch.clone());
        Ok(scratch)
    }

    fn one_more_handle(scratch: Arc<Mutex<Scratch>>, truncate: bool) -> Result<Arc<Mutex<Scratch>>, Errno> {
        let mut s = lock(&scratch);
        if truncate {
            s.file.set_len(0).map_err(|_| Errno::EIO)?;
            s.touched();
        }
        s.handles += 1;
        drop(s);
        Ok(scratch)
    }

    /// The inode of the file created through the mount at `path` and not committed yet.
    fn pending_at(&self, path: &str) -> Option<u64> {
        let writing = lock(&self.writing);
        writing
            .iter()
            .find(|(_, s)| {
                let s = lock(s);
                s.pending && s.path == path
            })
            .map(|(ino, _)| *ino)
    }

    /// The files created through the mount at `path` or below it and not committed yet.
    fn pending_under(&self, path: &str) -> Vec<Arc<Mutex<Scratch>>> {
        let writing = lock(&self.writing);
        writing
            .values()
            .filter(|s| {
                let s = lock(s);
                s.pending && within(&s.path, path)
            })
            .cloned()
            .collect()
    }

    /// The files created through the mount in the directory at `dir` and not committed yet:
    /// inode and name.
    fn pending_in(&self, dir: &str) -> Vec<(u64, String)> {
        let writing = lock(&self.writing);
        writing
            .iter()
            .filter_map(|(ino, s)| {
                let s = lock(s);
                let (parent, name) = s.path.rsplit_once('/')?;
                let parent = if parent.is_empty() { "/" } else { parent };
                (s.pending && parent == dir).then(|| (*ino, name.to_owned()))
            })
            .collect()
    }

    /// The commit locks of the files open for writing at or below any of `paths`, in inode
    /// order: while they are held, no commit of those files is in flight or starts.
    fn commit_locks(&self, paths: &[&str]) -> Vec<Arc<Mutex<()>>> {
        let writing = lock(&self.writing);
        let mut found: Vec<(u64, Arc<Mutex<()>>)> = writing
            .iter()
            .filter_map(|(ino, s)| {
                let s = lock(s);
                paths.iter().any(|p| within(&s.path, p)).then(|| (*ino, s.commit_lock.clone()))
            })
            .collect();
        found.sort_by_key(|(ino, _)| *ino);
        found.into_iter().map(|(_, l)| l).collect()
    }

    /// The file at `path` was removed (or, created here, never committed): what this mount has
    /// open for writing there goes nowhere at its close.
    fn detach(&self, path: &str) {
        for s in lock(&self.writing).values() {
            let mut s = lock(s);
            if s.path == path {
                s.path.clear();
                s.pending = false;
            }
        }
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
        let path = match self.child(parent, name) {
            Ok(path) => path,
            Err(e) => return reply.error(e),
        };
        if let Some(ino) = self.h.pending_at(&path) {
            // Created here and not committed yet: only this mount knows it.
            return match self.stat_ino(INodeNo(ino)) {
                Ok((_, stat)) => {
                    lock(&self.inodes).looked_up(ino);
                    reply.entry(&self.ttl, &self.attr(ino, &stat), Generation(0));
                }
                Err(e) => reply.error(e),
            };
        }
        self.reply_entry(parent, &path, reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        lock(&self.inodes).forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.stat_ino(ino) {
            Ok((_, stat)) => reply.attr(&self.ttl, &self.attr(ino.0, &stat)),
            Err(e) => match self.unlinked_attr(ino.0) {
                Some(attr) => reply.attr(&Duration::ZERO, &attr),
                None => reply.error(e),
            },
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
            // Whether the node was told anything: if not, the attributes are the ones just
            // read, with what the scratch file holds.
            let mut sent = false;
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
                            s.touched();
                        }
                        // `truncate` by path (or through a read-only handle): done now, as
                        // no close of a writer may come to commit it.
                        if !through_writer {
                            Self::commit(&self.remote, &self.inodes, &scratch)?;
                            sent = true;
                        }
                    }
                    None => {
                        self.truncate(ino.0, &path, stat.mode, size)?;
                        sent = true;
                    }
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
                    }
                    s.changed();
                    true
                });
                if !deferred {
                    self.call(ApiRequest::SetAttr { path: path.clone(), mode, mtime_ns })?;
                    sent = true;
                }
            }
            let stat = if sent { self.stat_ino(ino)?.1 } else { stat };
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
        match self.child(parent, name).and_then(|path| self.vacant(path)) {
            Ok(path) => {
                match self.remote.client.put_with(&path, mode & !umask & 0o7777, None, &mut std::io::empty())
                {
                    Ok(_) => self.reply_entry(parent, &path, reply),
                    Err(e) => reply.error(errno(&e)),
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|path| self.vacant(path)) {
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
            // A commit of it in flight finishes first; none starts until it is detached.
            let locks = self.h.commit_locks(&[&path]);
            let _held: Vec<_> = locks.iter().map(|l| lock(l)).collect();
            // One created here and not committed yet: the node has nothing to remove.
            if self.h.pending_at(&path).is_none() {
                if self.stat(&path)?.kind == Kind::Dir {
                    return Err(Errno::EISDIR);
                }
                self.call(ApiRequest::Rm { path: path.clone(), recursive: false })?;
            }
            lock(&self.inodes).removed(&path);
            self.h.moves.fetch_add(1, Ordering::SeqCst);
            self.h.detach(&path);
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.child(parent, name).and_then(|path| {
            if self.h.pending_at(&path).is_some() {
                return Err(Errno::ENOTDIR);
            }
            // Files created in it through the mount make it not empty.
            self.settle(&path)?;
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
        let result = self.child(parent, link_name).and_then(|path| self.vacant(path)).and_then(|path| {
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
            // The node moves only what it knows.
            self.settle(&from)?;
            self.settle(&to)?;
            if flags.contains(RenameFlags::RENAME_NOREPLACE) && self.stat(&to).is_ok() {
                return Err(Errno::EEXIST);
            }
            // Commits in flight of what moves or is replaced finish first, and none starts
            // until the files open for writing know where they are now.
            let locks = self.h.commit_locks(&[&from, &to]);
            let _held: Vec<_> = locks.iter().map(|l| lock(l)).collect();
            // Over an existing entry: replaced in the same change (POSIX's checks in the node).
            self.call(ApiRequest::Mv { from: from.clone(), to: to.clone(), replace: true })?;
            {
                let mut inodes = lock(&self.inodes);
                if to != from {
                    inodes.removed(&to);
                }
                inodes.moved(&from, &to, newparent.0);
            }
            self.h.moves.fetch_add(1, Ordering::SeqCst);
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
        let pinned = stat.version.as_ref().map(|v| ReadVersion { content: v.content.clone(), size: v.size });
        let file =
            ReadFile { path, version: pinned, size: stat.size, windows: Mutex::new(Windows::default()) };
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
                s.touched();
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
            // Files created here through the mount and not committed yet: only this mount
            // knows them (and one shadows an entry of the same name another site made).
            let pending: Vec<Listed> = self
                .h
                .pending_in(&path)
                .into_iter()
                .filter_map(|(ino, name)| {
                    let stat = self.pending_stat(ino)?;
                    Some(Listed { ino, kind: FileType::RegularFile, name, stat: Some(Box::new(stat)) })
                })
                .collect();
            let inodes = lock(&self.inodes);
            for entry in entries {
                if pending.iter().any(|p| p.name == entry.name) {
                    continue;
                }
                listing.push(Listed {
                    ino: inodes.listed_ino(&entry.stat.id),
                    kind: kind_of(entry.stat.kind),
                    name: entry.name,
                    stat: Some(Box::new(entry.stat)),
                });
            }
            listing.extend(pending);
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
            let ino = if is_pending(&stat.id) {
                // Its inode, still known (or, committed meanwhile, the entry it stands for).
                let mut inodes = lock(&self.inodes);
                if inodes.get(entry.ino).is_none() {
                    continue;
                }
                inodes.looked_up(entry.ino);
                entry.ino
            } else {
                lock(&self.inodes).learn(&stat.id, ino.0, &path)
            };
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
            // A tag needs the entry.
            self.settle_ino(ino)?;
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
            let (path, stat) = self.stat_ino(ino)?;
            if is_pending(&stat.id) {
                return Err(Errno::ENODATA);
            }
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
            let (path, stat) = self.stat_ino(ino)?;
            let tags: Vec<TagAnswer> = if is_pending(&stat.id) {
                Vec::new()
            } else {
                self.remote.call(&ApiRequest::TagGet { path }).map_err(|e| errno(&e))?
            };
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
            let truncate = flags & libc::O_TRUNC != 0;
            if let Some(ino) = self.h.pending_at(&path) {
                // Created here before and not committed yet: opened again.
                if flags & libc::O_EXCL != 0 {
                    return Err(Errno::EEXIST);
                }
                let (_, stat) = self.stat_ino(INodeNo(ino))?;
                self.h.start_writing(&self.remote, &self.runtime, ino, &path, stat.mode, truncate)?;
                lock(&self.inodes).looked_up(ino);
                let fh = self.h.new_fh(Open::Write(ino, true));
                return Ok((self.attr(ino, &stat), fh));
            }
            let stat = match self.stat(&path) {
                Ok(_) if flags & libc::O_EXCL != 0 => return Err(Errno::EEXIST),
                Ok(stat) if stat.kind == Kind::Dir => return Err(Errno::EISDIR),
                Ok(stat) => stat,
                Err(e) if e == Errno::ENOENT => return self.create_pending(parent, &path, mode),
                Err(e) => return Err(e),
            };
            let ino = lock(&self.inodes).learn(&stat.id, parent.0, &path);
            if let Err(e) = self.h.start_writing(&self.remote, &self.runtime, ino, &path, stat.mode, truncate)
            {
                lock(&self.inodes).forget(ino, 1);
                return Err(e);
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

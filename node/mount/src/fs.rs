//! The FUSE file system: every operation of the contract's list, answered from the node's
//! local replica (metadata) or by tasks that reply when the bytes are there (reads, commits).
//!
//! - Metadata (`lookup`, `getattr`, `readdir`) is one call to the node, answered by the local
//!   replica without the network, on the FUSE thread that asked.
//! - Reads run as tasks on the mount's runtime and reply when their bytes arrive, so a read
//!   waiting for a remote chunk holds up no other operation. Each open file keeps the last
//!   window it read ([`READ_WINDOW`]), so the kernel's sequential reads cost one call per window.
//! - Writes are close-to-open: a file open for writing is a scratch file (the current content
//!   copied in first, unless it is truncated); `flush` (each `close`) and `fsync` make it the
//!   file's new version through the ordinary put path, durable before they return.
//! - Tags are the extended attributes `user.meridian.<key>`.
//! - Hard links are refused with EPERM; ownership is the mount's user's and cannot change.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Seek, SeekFrom};
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

use crate::inodes::{Inodes, ROOT, child_path};
use crate::remote::{Remote, errno};

/// How long the kernel may keep names and attributes before asking again.
const TTL: Duration = Duration::from_secs(1);

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
    inodes: Mutex<Inodes>,
    open: Mutex<HashMap<u64, Open>>,
    /// Files open for writing, by inode: every handle of one file shares its scratch file.
    writing: Mutex<HashMap<u64, Arc<Mutex<Scratch>>>>,
    /// The version each file had when it was last opened: its pages stay cached while it is
    /// the same.
    opened_versions: Mutex<HashMap<u64, String>>,
    next_fh: AtomicU64,
    scratch_dir: PathBuf,
    uid: u32,
    gid: u32,
}

/// An open file or directory.
enum Open {
    Read(Arc<ReadFile>),
    /// A handle on the scratch file of the inode; `true` if it may write (only those commit).
    Write(u64, bool),
    Dir(Vec<(u64, FileType, String)>),
}

/// A file open for reading: its path and size at open, and the last window read.
struct ReadFile {
    path: String,
    size: u64,
    window: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

/// A file open for writing.
struct Scratch {
    path: String,
    file: File,
    mode: u32,
    /// Written since the last commit.
    dirty: bool,
    /// Handles open on it.
    handles: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
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
    /// writing are kept under `scratch_dir`.
    pub fn new(
        remote: Remote,
        runtime: tokio::runtime::Handle,
        scratch_dir: PathBuf,
    ) -> anyhow::Result<MeridianFs> {
        let root: StatAnswer = remote.call(&ApiRequest::Stat { path: "/".into() })?;
        Ok(MeridianFs {
            remote,
            runtime,
            inodes: Mutex::new(Inodes::new(root.id)),
            open: Mutex::new(HashMap::new()),
            writing: Mutex::new(HashMap::new()),
            opened_versions: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            scratch_dir,
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
        })
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
            // Moved or replaced at another site: this inode no longer has a path.
            return Err(Errno::ENOENT);
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
        let scratch = lock(&self.writing).get(&ino).cloned();
        if let Some(scratch) = scratch {
            // What this mount is writing shows before it is committed.
            let s = lock(&scratch);
            if s.dirty
                && let Ok(meta) = s.file.metadata()
            {
                size = meta.len();
                mtime = meta.modified().unwrap_or(mtime);
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
            perm: (stat.mode & 0o7777) as u16,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 128 << 10,
            flags: 0,
        }
    }

    /// Replies with the entry now at `path`, counting a lookup.
    fn reply_entry(&self, path: &str, reply: ReplyEntry) {
        match self.stat(path) {
            Ok(stat) => {
                let ino = lock(&self.inodes).learn(&stat.id, path);
                reply.entry(&TTL, &self.attr(ino, &stat), Generation(0));
            }
            Err(e) => reply.error(e),
        }
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<String, Errno> {
        Ok(child_path(&self.path_of(parent)?, name_of(name)?))
    }

    fn new_fh(&self, open: Open) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.open).insert(fh, open);
        fh
    }

    /// The scratch file of `ino` open for writing (one more handle on it), made from the
    /// file's current content unless `truncate`.
    fn start_writing(
        &self,
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
                return Self::one_more_handle(scratch, truncate);
            }
        }
        let mut file = tempfile::tempfile_in(&self.scratch_dir).map_err(|e| {
            tracing::error!("making a scratch file in {}: {e}", self.scratch_dir.display());
            Errno::EIO
        })?;
        if !truncate {
            let mut copied = Ok(());
            let mut sink = |data: &[u8]| {
                if copied.is_ok() {
                    copied = std::io::Write::write_all(&mut file, data);
                }
            };
            let client = node::client::Client::new(self.remote.socket());
            client.read_with(path, None, &mut sink).map_err(|e| {
                tracing::warn!("opening {path} for writing: {e:#}");
                errno(&e)
            })?;
            copied.map_err(|e| {
                tracing::error!("copying {path} into the scratch space: {e}");
                if e.raw_os_error() == Some(libc::ENOSPC) { Errno::ENOSPC } else { Errno::EIO }
            })?;
        }
        let mut writing = lock(&self.writing);
        if let Some(scratch) = writing.get(&ino).cloned() {
            // Another open made one meanwhile, of the same content: that one it is.
            return Self::one_more_handle(scratch, truncate);
        }
        let scratch =
            Arc::new(Mutex::new(Scratch { path: path.to_owned(), file, mode, dirty: truncate, handles: 1 }));
        writing.insert(ino, scratch.clone());
        Ok(scratch)
    }

    fn one_more_handle(scratch: Arc<Mutex<Scratch>>, truncate: bool) -> Result<Arc<Mutex<Scratch>>, Errno> {
        let mut s = lock(&scratch);
        if truncate {
            s.file.set_len(0).map_err(|_| Errno::EIO)?;
            s.dirty = true;
        }
        s.handles += 1;
        drop(s);
        Ok(scratch)
    }

    /// Makes what was written to `scratch` the file's new version, if anything was.
    fn commit(remote: &Remote, scratch: &Mutex<Scratch>) -> Result<(), Errno> {
        let mut s = lock(scratch);
        if !s.dirty {
            return Ok(());
        }
        s.file.seek(SeekFrom::Start(0)).map_err(|_| Errno::EIO)?;
        let (path, mode) = (s.path.clone(), s.mode);
        let mut source = &s.file;
        remote.put(&path, mode, &mut source).map_err(|e| {
            tracing::warn!("committing {path}: {e:#}");
            errno(&e)
        })?;
        s.dirty = false;
        Ok(())
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

    /// Commits the scratch file of `fh` on a blocking task and replies when it is durable.
    fn commit_then(&self, fh: FileHandle, reply: ReplyEmpty) {
        // A reader of a file this mount writes never publishes the writer's unfinished bytes.
        if !self.writes(fh) {
            return reply.ok();
        }
        let Some(scratch) = self.scratch_of(fh) else { return reply.ok() };
        let remote = self.remote.clone();
        self.runtime.spawn_blocking(move || match Self::commit(&remote, &scratch) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    /// Changes the size of the file at `path` (`ino`) outside any open handle.
    fn truncate(&self, ino: u64, path: &str, mode: u32, size: u64) -> Result<(), Errno> {
        let scratch = self.start_writing(ino, path, mode, size == 0)?;
        let resized = {
            let mut s = lock(&scratch);
            s.dirty = true;
            s.file.set_len(size).map_err(|_| Errno::EIO)
        };
        let result = resized.and_then(|()| Self::commit(&self.remote, &scratch));
        self.stop_writing(ino);
        result
    }

    /// One handle fewer on the scratch file of `ino`; the last one removes it.
    fn stop_writing(&self, ino: u64) {
        let mut writing = lock(&self.writing);
        let Some(scratch) = writing.get(&ino).cloned() else { return };
        let mut s = lock(&scratch);
        s.handles = s.handles.saturating_sub(1);
        if s.handles == 0 {
            if s.dirty {
                tracing::warn!("{}: closed with writes that could not be committed; they are lost", s.path);
            }
            drop(s);
            writing.remove(&ino);
        }
    }

    fn read_window(&self, file: Arc<ReadFile>, offset: u64, size: u32, reply: ReplyData) {
        let end = (offset + u64::from(size)).min(file.size);
        if offset >= end {
            return reply.data(&[]);
        }
        if let Some((start, data)) = lock(&file.window).clone()
            && start <= offset
            && end <= start + data.len() as u64
        {
            return reply.data(&data[(offset - start) as usize..(end - start) as usize]);
        }
        let remote = self.remote.clone();
        self.runtime.spawn(async move {
            let fetch_end = (offset + READ_WINDOW.max(u64::from(size))).min(file.size);
            match remote.read(&file.path, offset, fetch_end).await {
                Ok(data) => {
                    let data = Arc::new(data);
                    let got = (end - offset).min(data.len() as u64) as usize;
                    reply.data(&data[..got]);
                    *lock(&file.window) = Some((offset, data));
                }
                Err(e) => {
                    tracing::error!("{e:#}");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn tag_key(name: &OsStr) -> Option<&str> {
        name.to_str()?.strip_prefix(TAG_PREFIX)
    }
}

impl Filesystem for MeridianFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_background(MAX_BACKGROUND);
        // open(O_TRUNC) arrives as such, rather than as an open then a truncation: a file
        // overwritten is never copied into the scratch space first.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ATOMIC_O_TRUNC);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name) {
            Ok(path) => self.reply_entry(&path, reply),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        lock(&self.inodes).forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.stat_ino(ino) {
            Ok((_, stat)) => reply.attr(&TTL, &self.attr(ino.0, &stat)),
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
                match fh
                    .and_then(|fh| self.scratch_of(fh))
                    .or_else(|| lock(&self.writing).get(&ino.0).cloned())
                {
                    Some(scratch) => {
                        let mut s = lock(&scratch);
                        s.file.set_len(size).map_err(|_| Errno::EIO)?;
                        s.dirty = true;
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
                self.call(ApiRequest::SetAttr { path: path.clone(), mode, mtime_ns })?;
                let scratch = lock(&self.writing).get(&ino.0).cloned();
                if let (Some(mode), Some(scratch)) = (mode, scratch) {
                    lock(&scratch).mode = mode;
                }
            }
            let stat = self.stat(&path)?;
            Ok(self.attr(ino.0, &stat))
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
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
            Ok(path) => match self.remote.put(&path, mode & !umask & 0o7777, &mut std::io::empty()) {
                Ok(()) => self.reply_entry(&path, reply),
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
                    Ok(()) => self.reply_entry(&path, reply),
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
            Ok(path) => self.reply_entry(&path, reply),
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
            let source = self.stat(&from)?;
            match self.stat(&to) {
                Ok(_) if flags.contains(RenameFlags::RENAME_NOREPLACE) => return Err(Errno::EEXIST),
                Ok(target) if target.id == source.id => return Ok(()),
                Ok(target) => {
                    // POSIX replaces the target: a directory only by a directory, and only an
                    // empty one; anything else only by a non-directory.
                    match (source.kind == Kind::Dir, target.kind == Kind::Dir) {
                        (true, false) => return Err(Errno::ENOTDIR),
                        (false, true) => return Err(Errno::EISDIR),
                        _ => {}
                    }
                    self.call(ApiRequest::Rm { path: to.clone(), recursive: false })?;
                }
                Err(e) if e == Errno::ENOENT => {}
                Err(e) => return Err(e),
            }
            self.call(ApiRequest::Mv { from: from.clone(), to: to.clone() })?;
            lock(&self.inodes).moved(&from, &to);
            for scratch in lock(&self.writing).values() {
                let mut s = lock(scratch);
                if s.path == from {
                    s.path = to.clone();
                } else if let Some(rest) = s.path.strip_prefix(&format!("{from}/")) {
                    s.path = format!("{to}/{rest}");
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
        let result = (|| {
            let (path, stat) = self.stat_ino(ino)?;
            if stat.kind == Kind::Dir {
                return Err(Errno::EISDIR);
            }
            let writes = flags.acc_mode() != OpenAccMode::O_RDONLY;
            if writes || lock(&self.writing).contains_key(&ino.0) {
                // A file this mount writes is read from its scratch file, whatever the handle.
                let truncate = writes && flags.0 & libc::O_TRUNC != 0;
                self.start_writing(ino.0, &path, stat.mode, truncate)?;
                return Ok((self.new_fh(Open::Write(ino.0, writes)), FopenFlags::FOPEN_DIRECT_IO));
            }
            let version = stat.version.as_ref().map(|v| v.id.clone()).unwrap_or_default();
            let same = lock(&self.opened_versions).insert(ino.0, version.clone()).as_ref() == Some(&version);
            let file = ReadFile { path, size: stat.size, window: Mutex::new(None) };
            let flags = if same { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
            Ok((self.new_fh(Open::Read(Arc::new(file))), flags))
        })();
        match result {
            Ok((fh, flags)) => reply.opened(FileHandle(fh), flags),
            Err(e) => reply.error(e),
        }
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
        let reading = match lock(&self.open).get(&fh.0) {
            Some(Open::Read(file)) => Some(file.clone()),
            Some(Open::Write(..)) => None,
            _ => return reply.error(Errno::EBADF),
        };
        if let Some(file) = reading {
            return self.read_window(file, offset, size, reply);
        }
        let Some(scratch) = self.scratch_of(fh) else { return reply.error(Errno::EBADF) };
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
        let Some(scratch) = self.scratch_of(fh) else { return reply.error(Errno::EBADF) };
        let mut s = lock(&scratch);
        match s.file.write_all_at(data, offset) {
            Ok(()) => {
                s.dirty = true;
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
        let closed = lock(&self.open).remove(&fh.0);
        if let Some(Open::Write(ino, _)) = closed {
            self.stop_writing(ino);
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
            let parent = match path.rsplit_once('/') {
                Some(("", _)) | None => ROOT,
                Some((up, _)) => {
                    let up = self.stat(up).ok();
                    up.and_then(|s| lock(&self.inodes).ino_of(&s.id)).unwrap_or(ROOT)
                }
            };
            let mut listing = vec![
                (ino.0, FileType::Directory, ".".to_owned()),
                (parent, FileType::Directory, "..".to_owned()),
            ];
            let inodes = lock(&self.inodes);
            for entry in entries {
                // Entries the kernel does not know yet get their inode at lookup; until then
                // the listing names them by a number no inode has.
                let ino = inodes.ino_of(&entry.stat.id).unwrap_or(u64::MAX);
                listing.push((ino, kind_of(entry.stat.kind), entry.name));
            }
            Ok(listing)
        })();
        match result {
            Ok(listing) => reply.opened(FileHandle(self.new_fh(Open::Dir(listing))), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let open = lock(&self.open);
        let Some(Open::Dir(listing)) = open.get(&fh.0) else { return reply.error(Errno::EBADF) };
        for (i, (ino, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
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
        lock(&self.open).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The scratch space's file system: what a write through the mount can use.
        match rustix::fs::statvfs(&self.scratch_dir) {
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
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            let key = Self::tag_key(name).ok_or(Errno::ENOTSUP)?.to_owned();
            let value = std::str::from_utf8(value).map_err(|_| Errno::EINVAL)?.to_owned();
            let (path, _) = self.stat_ino(ino)?;
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
                    self.remote.put(&path, mode, &mut std::io::empty()).map_err(|e| errno(&e))?;
                    (true, true)
                }
                Err(e) => return Err(e),
            };
            let stat = self.stat(&path)?;
            let ino = lock(&self.inodes).learn(&stat.id, &path);
            let scratch = self.start_writing(ino, &path, stat.mode, truncate)?;
            if created {
                // Empty, as committed: nothing to commit until something is written.
                lock(&scratch).dirty = false;
            }
            let fh = self.new_fh(Open::Write(ino, true));
            Ok((self.attr(ino, &stat), fh))
        })();
        match result {
            Ok((attr, fh)) => {
                reply.created(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
            }
            Err(e) => reply.error(e),
        }
    }
}

//! The chunk store: one file per chunk, named by its BLAKE3 hash, in 256 fan-out directories
//! made when the store opens (a directory per chunk would cost an inode allocation — the most
//! expensive file-system operation of a small put — for most of the first hundred thousand
//! chunks).
//!
//! A chunk is written to a temporary file beside its final name and renamed into place (a rename
//! within one directory: concurrent puts do not queue on the file system's lock for renames
//! across directories); [`ChunkStore::sync`] then makes
//! every chunk written so far durable with one `syncfs` (one flush per group commit, instead of
//! two fsyncs per chunk). Callers sync before the database refers to a chunk;
//! a chunk file that no committed transaction refers to may be incomplete after a crash, and is
//! removed when the store opens (`Db::recover`). Every read is verified against the hash: a
//! corrupt chunk is reported and never served. The store must never be handed data whose hash it
//! has not checked. Writers that rely on a chunk file until something records it, and deleting,
//! go through the claims (`claims.rs`).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::claims::Claims;

use site_core::content::ChunkHash;

/// Errors of the chunk store.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The chunk is not in the store.
    #[error("chunk {0} is not stored here")]
    Missing(ChunkHash),
    /// The chunk's bytes do not match its hash.
    #[error("chunk {hash} at {path} is corrupt: its bytes hash to {actual}")]
    Corrupt {
        /// The hash it is stored under.
        hash: ChunkHash,
        /// Its file.
        path: PathBuf,
        /// What its bytes hash to.
        actual: ChunkHash,
    },
    /// Data offered for storage does not match the hash it was offered under.
    #[error("refusing chunk offered as {expected}: its bytes hash to {actual}")]
    Mismatch {
        /// The hash claimed.
        expected: ChunkHash,
        /// The hash of the bytes.
        actual: ChunkHash,
    },
    /// There is no room for the chunk: the file system is full, or the chunk would eat into
    /// the space kept free for the database and the namespace's log.
    #[error("no space left on {path}")]
    NoSpace {
        /// The data directory.
        path: PathBuf,
    },
    /// The file system failed.
    #[error("chunk store {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ChunkError + '_ {
    move |source| ChunkError::Io { path: path.to_owned(), source }
}

/// Names of temporary files start with this (chunk file names are hexadecimal).
const TMP_PREFIX: &str = ".tmp";

/// Chunk files under one directory.
#[derive(Debug)]
pub struct ChunkStore {
    /// The data directory (named in errors).
    dir: PathBuf,
    chunks: PathBuf,
    next_tmp: AtomicU64,
    /// Bytes of the file system left free for the database and the namespace's log: a chunk
    /// that would leave less is refused ([`ChunkError::NoSpace`]).
    reserve: u64,
    /// Who relies on which chunk, and what is being deleted (see [`super::claims`]).
    pub(super) claims: Claims,
}

impl ChunkStore {
    /// Opens (creating) the store under `dir`, leaving `reserve` bytes of its file system free
    /// (see [`ChunkError::NoSpace`]). Temporary files a crash left behind are removed by
    /// [`ChunkStore::list`], which recovery runs at every start.
    pub fn open(dir: &Path, reserve: u64) -> Result<ChunkStore, ChunkError> {
        let chunks = dir.join("chunks");
        for byte in 0..=255u8 {
            let fan_out = chunks.join(format!("{byte:02x}"));
            fs::create_dir_all(&fan_out).map_err(io_at(&fan_out))?;
        }
        Ok(ChunkStore {
            dir: dir.to_owned(),
            chunks,
            next_tmp: AtomicU64::new(0),
            reserve,
            claims: Claims::default(),
        })
    }

    /// Where chunk `hash` lives: `chunks/ab/abcd…`.
    pub fn path(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.chunks.join(&hex[..2]).join(hex)
    }

    /// Whether the chunk's file exists (its content is checked when read).
    pub fn has(&self, hash: &ChunkHash) -> bool {
        self.path(hash).exists()
    }

    /// Stores `data` as chunk `hash` (durable after the next [`ChunkStore::sync`]). Returns
    /// whether it was new. Refuses data that does not hash to `hash`.
    pub fn put(&self, hash: &ChunkHash, data: &[u8]) -> Result<bool, ChunkError> {
        let actual = ChunkHash::of(data);
        if actual != *hash {
            return Err(ChunkError::Mismatch { expected: *hash, actual });
        }
        self.put_verified(hash, data)
    }

    /// Stores `data`, whose hash the caller has just computed as `hash`: whether this call wrote
    /// it (false: it was stored already). Of two concurrent writes of one chunk, one only is
    /// told it wrote it. Nothing stays behind when it cannot be stored. A writer that relies on
    /// the file until something records it goes through a [`super::Claim`].
    pub(crate) fn put_verified(&self, hash: &ChunkHash, data: &[u8]) -> Result<bool, ChunkError> {
        let path = self.path(hash);
        if path.exists() {
            return Ok(false);
        }
        if self.reserve > 0 && self.available()? < data.len() as u64 + self.reserve {
            return Err(ChunkError::NoSpace { path: self.dir.clone() });
        }
        let dir = path.parent().expect("chunk paths have a directory");
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{TMP_PREFIX}{n}"));
        let written = File::create(&tmp).and_then(|mut file| file.write_all(data));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(self.io_error(&tmp, e));
        }
        let cwd = rustix::fs::CWD;
        match rustix::fs::renameat_with(cwd, &tmp, cwd, &path, rustix::fs::RenameFlags::NOREPLACE) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::EXIST) => {
                // Another write stored it first.
                let _ = fs::remove_file(&tmp);
                Ok(false)
            }
            // A file system without RENAME_NOREPLACE: a plain rename (two concurrent writers
            // of one chunk may then both be told they wrote it).
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                fs::rename(&tmp, &path).map_err(|e| {
                    let _ = fs::remove_file(&tmp);
                    self.io_error(&path, e)
                })?;
                Ok(true)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(self.io_error(&path, e.into()))
            }
        }
    }

    /// Bytes an unprivileged writer may still use on the store's file system.
    pub fn available(&self) -> Result<u64, ChunkError> {
        let stat = rustix::fs::statvfs(&self.chunks)
            .map_err(|e| ChunkError::Io { path: self.chunks.clone(), source: e.into() })?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// The size of the store's file system.
    pub fn capacity(&self) -> Result<u64, ChunkError> {
        let stat = rustix::fs::statvfs(&self.chunks)
            .map_err(|e| ChunkError::Io { path: self.chunks.clone(), source: e.into() })?;
        Ok(stat.f_blocks.saturating_mul(stat.f_frsize))
    }

    /// `e`, met at `path`: a full file system is [`ChunkError::NoSpace`].
    fn io_error(&self, path: &Path, e: io::Error) -> ChunkError {
        match e.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                ChunkError::NoSpace { path: self.dir.clone() }
            }
            _ => ChunkError::Io { path: path.to_owned(), source: e },
        }
    }

    /// Makes every chunk written so far durable, with their directories: one `syncfs` of the
    /// file system that holds the store.
    pub fn sync(&self) -> Result<(), ChunkError> {
        let dir = File::open(&self.chunks).map_err(io_at(&self.chunks))?;
        rustix::fs::syncfs(&dir).map_err(|e| ChunkError::Io { path: self.chunks.clone(), source: e.into() })
    }

    /// Reads chunk `hash`, verified.
    pub fn get(&self, hash: &ChunkHash) -> Result<Vec<u8>, ChunkError> {
        let path = self.path(hash);
        let data = match fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ChunkError::Missing(*hash)),
            Err(e) => return Err(ChunkError::Io { path, source: e }),
        };
        let actual = ChunkHash::of(&data);
        if actual != *hash {
            return Err(ChunkError::Corrupt { hash: *hash, path, actual });
        }
        Ok(data)
    }

    /// Removes chunk `hash`, if stored.
    pub fn remove(&self, hash: &ChunkHash) -> Result<(), ChunkError> {
        let path = self.path(hash);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ChunkError::Io { path, source: e }),
        }
    }

    /// Every chunk file present, by hash. Temporary files of interrupted writes are removed on
    /// the way, and chunks of the earlier two-level layout (`chunks/ab/cd/abcd…`) are moved to
    /// theirs (call it only while nothing writes: at start); other files are skipped.
    pub fn list(&self) -> Result<Vec<ChunkHash>, ChunkError> {
        let mut out = Vec::new();
        for fan_out in read_dir(&self.chunks)? {
            for entry in read_dir(&fan_out)? {
                let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
                if let Some(hash) = parse_hex32(&name) {
                    out.push(ChunkHash(hash));
                } else if name.starts_with(TMP_PREFIX) {
                    fs::remove_file(&entry).map_err(io_at(&entry))?;
                } else if name.len() == 2 && entry.is_dir() {
                    out.extend(self.move_up(&entry)?);
                }
            }
        }
        Ok(out)
    }

    /// Moves the chunk files of an old second-level directory to their place, removes the
    /// directory if that empties it, and returns their hashes.
    fn move_up(&self, old: &Path) -> Result<Vec<ChunkHash>, ChunkError> {
        let mut moved = Vec::new();
        for file in read_dir(old)? {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if let Some(hash) = parse_hex32(name) {
                let hash = ChunkHash(hash);
                let to = self.path(&hash);
                fs::rename(&file, &to).map_err(io_at(&to))?;
                moved.push(hash);
            } else if name.starts_with(TMP_PREFIX) {
                fs::remove_file(&file).map_err(io_at(&file))?;
            }
        }
        if fs::read_dir(old).map_err(io_at(old))?.next().is_none() {
            fs::remove_dir(old).map_err(io_at(old))?;
        }
        Ok(moved)
    }
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, ChunkError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_at(dir))? {
        out.push(entry.map_err(io_at(dir))?.path());
    }
    Ok(out)
}

/// Parses 64 lowercase hexadecimal digits.
pub(crate) fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_stored_once_and_verified_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 0).unwrap();
        let data = b"some chunk".to_vec();
        let hash = ChunkHash::of(&data);
        assert!(store.put(&hash, &data).unwrap());
        assert!(!store.put(&hash, &data).unwrap());
        assert_eq!(store.get(&hash).unwrap(), data);
        assert_eq!(store.list().unwrap(), vec![hash]);
        assert!(matches!(store.put(&hash, b"other"), Err(ChunkError::Mismatch { .. })));
        // Corrupt it on disk: it is reported, never served.
        fs::write(store.path(&hash), b"rotten").unwrap();
        assert!(matches!(store.get(&hash), Err(ChunkError::Corrupt { .. })));
        store.remove(&hash).unwrap();
        assert!(matches!(store.get(&hash), Err(ChunkError::Missing(_))));
    }

    #[test]
    fn a_chunk_that_would_eat_into_the_reserve_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let free = ChunkStore::open(dir.path(), 0).unwrap().available().unwrap();
        // A reserve larger than what is free: no chunk fits.
        let store = ChunkStore::open(dir.path(), free + (1 << 30)).unwrap();
        let hash = ChunkHash::of(b"no room");
        let refused = store.put(&hash, b"no room").unwrap_err();
        assert_eq!(refused.to_string(), format!("no space left on {}", dir.path().display()));
        assert!(store.list().unwrap().is_empty());
        let fan_out = store.path(&hash).parent().unwrap().to_owned();
        assert_eq!(fs::read_dir(&fan_out).unwrap().count(), 0, "a temporary file stayed behind");
    }

    #[test]
    fn leftover_temporary_files_are_removed_by_the_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 0).unwrap();
        let hash = ChunkHash::of(b"whole");
        store.put(&hash, b"whole").unwrap();
        let fan_out = store.path(&hash).parent().unwrap().to_owned();
        fs::write(fan_out.join(format!("{TMP_PREFIX}7")), b"half-writ").unwrap();
        fs::write(fan_out.join("notes.txt"), b"not ours").unwrap();
        assert_eq!(store.list().unwrap(), vec![hash]);
        let mut left: Vec<_> = fs::read_dir(&fan_out).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, vec![std::ffi::OsString::from(hash.to_hex()), "notes.txt".into()]);
    }

    #[test]
    fn chunks_of_the_two_level_layout_are_moved_to_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 0).unwrap();
        let hash = ChunkHash::of(b"kept from before");
        let hex = hash.to_hex();
        let old = dir.path().join("chunks").join(&hex[..2]).join(&hex[2..4]);
        fs::create_dir_all(&old).unwrap();
        fs::write(old.join(&hex), b"kept from before").unwrap();
        assert_eq!(store.list().unwrap(), vec![hash]);
        assert_eq!(store.get(&hash).unwrap(), b"kept from before");
        assert!(!old.exists());
        assert_eq!(store.list().unwrap(), vec![hash]);
    }
}

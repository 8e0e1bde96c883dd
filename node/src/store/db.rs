//! The site's redb database: namespace changes, chunk index, held versions, peer sync states.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crdt_namespace::ContentId;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::store::chunks::{ChunkError, ChunkStore};
use site_core::content::{ChunkHash, ChunkRef, Manifest};

/// The namespace as saved: a whole save under key 0, then incremental saves in order.
const NAMESPACE: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("namespace");
/// Versions this site holds: content id → manifest.
const VERSIONS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("versions");
/// Versions held that are copies of what other sites wrote (the rest this site wrote): content
/// id → nothing. A store from before this table holds no copies: every version counts as the
/// site's own, which is only more cautious.
const COPIES: TableDefinition<'_, &[u8], ()> = TableDefinition::new("copies");
/// Chunks this site holds durably: hash → length.
const CHUNKS: TableDefinition<'_, &[u8], u32> = TableDefinition::new("chunks");
/// Sync session state per peer site.
const PEERS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("peers");

/// Errors of the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// redb failed.
    #[error("database {what}: {reason}")]
    Redb {
        /// What was being done.
        what: &'static str,
        /// redb's error.
        reason: String,
    },
    /// A stored value does not decode.
    #[error("database holds a bad {what}: {reason}")]
    Corrupt {
        /// What was read.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The chunk store failed.
    #[error(transparent)]
    Chunks(#[from] ChunkError),
}

fn redb_error<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> DbError {
    move |e| DbError::Redb { what, reason: e.to_string() }
}

/// A key that is a 32-byte hash.
fn hash_key(key: &[u8], what: &'static str) -> Result<[u8; 32], DbError> {
    key.try_into().map_err(|_| DbError::Corrupt { what, reason: "not 32 bytes".into() })
}

/// What opening the store found and mended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Chunk files that no committed transaction referred to (an interrupted put), removed.
    pub leftover_chunks_removed: usize,
    /// Indexed chunks whose files were missing; their entries and the versions needing them
    /// were dropped from what this site holds.
    pub missing_chunks: usize,
}

/// One redb database.
pub struct Db {
    db: Database,
}

impl Db {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let db = Database::create(path).map_err(redb_error("open"))?;
        let tx = db.begin_write().map_err(redb_error("open"))?;
        tx.open_table(NAMESPACE).map_err(redb_error("open"))?;
        tx.open_table(VERSIONS).map_err(redb_error("open"))?;
        tx.open_table(COPIES).map_err(redb_error("open"))?;
        tx.open_table(CHUNKS).map_err(redb_error("open"))?;
        tx.open_table(PEERS).map_err(redb_error("open"))?;
        tx.commit().map_err(redb_error("open"))?;
        Ok(Db { db })
    }

    /// The saved namespace: the whole save followed by the incremental ones, ready for
    /// `Namespace::load`. Empty if nothing was saved.
    pub fn namespace_bytes(&self) -> Result<Vec<u8>, DbError> {
        let tx = self.db.begin_read().map_err(redb_error("read namespace"))?;
        let table = tx.open_table(NAMESPACE).map_err(redb_error("read namespace"))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(redb_error("read namespace"))? {
            let (_, value) = item.map_err(redb_error("read namespace"))?;
            out.extend_from_slice(value.value());
        }
        Ok(out)
    }

    /// Number of saves in the namespace log (1 after a compaction).
    pub fn namespace_saves(&self) -> Result<u64, DbError> {
        let tx = self.db.begin_read().map_err(redb_error("read namespace"))?;
        let table = tx.open_table(NAMESPACE).map_err(redb_error("read namespace"))?;
        table.len().map_err(redb_error("read namespace"))
    }

    /// Records, atomically and durably: an incremental namespace save, versions now held with
    /// their manifests — `own` ones this site wrote, `copies` of what others wrote (a version
    /// already held stays as it is) — and chunks now durable. Call only after those chunks
    /// were synced.
    pub fn commit(
        &self,
        namespace: &[u8],
        own: &[&Manifest],
        copies: &[&Manifest],
        chunks: &[ChunkRef],
    ) -> Result<(), DbError> {
        const WHAT: &str = "commit";
        let tx = self.db.begin_write().map_err(redb_error(WHAT))?;
        {
            if !namespace.is_empty() {
                let mut table = tx.open_table(NAMESPACE).map_err(redb_error(WHAT))?;
                let next = table.last().map_err(redb_error(WHAT))?.map_or(0, |(k, _)| k.value() + 1);
                table.insert(next, namespace).map_err(redb_error(WHAT))?;
            }
            let mut table = tx.open_table(CHUNKS).map_err(redb_error(WHAT))?;
            for c in chunks {
                table.insert(c.hash.0.as_slice(), c.len).map_err(redb_error(WHAT))?;
            }
            let mut table = tx.open_table(VERSIONS).map_err(redb_error(WHAT))?;
            let mut copied = tx.open_table(COPIES).map_err(redb_error(WHAT))?;
            for m in own {
                let id = m.content_id();
                table.insert(id.0.as_slice(), m.encode().as_slice()).map_err(redb_error(WHAT))?;
                copied.remove(id.0.as_slice()).map_err(redb_error(WHAT))?;
            }
            for m in copies {
                let id = m.content_id();
                if table.get(id.0.as_slice()).map_err(redb_error(WHAT))?.is_none() {
                    table.insert(id.0.as_slice(), m.encode().as_slice()).map_err(redb_error(WHAT))?;
                    copied.insert(id.0.as_slice(), ()).map_err(redb_error(WHAT))?;
                }
            }
        }
        tx.commit().map_err(redb_error(WHAT))
    }

    /// Forgets, atomically and durably, versions no longer held and chunks about to be deleted
    /// (delete the chunk files after: a crash between leaves files no record refers to, which
    /// [`Db::recover`] removes).
    pub fn forget(&self, versions: &[ContentId], chunks: &[ChunkHash]) -> Result<(), DbError> {
        const WHAT: &str = "forget";
        let tx = self.db.begin_write().map_err(redb_error(WHAT))?;
        {
            let mut table = tx.open_table(VERSIONS).map_err(redb_error(WHAT))?;
            let mut copied = tx.open_table(COPIES).map_err(redb_error(WHAT))?;
            for id in versions {
                table.remove(id.0.as_slice()).map_err(redb_error(WHAT))?;
                copied.remove(id.0.as_slice()).map_err(redb_error(WHAT))?;
            }
            let mut table = tx.open_table(CHUNKS).map_err(redb_error(WHAT))?;
            for hash in chunks {
                table.remove(hash.0.as_slice()).map_err(redb_error(WHAT))?;
            }
        }
        tx.commit().map_err(redb_error(WHAT))
    }

    /// The versions held that are copies of what other sites wrote.
    pub fn copies(&self) -> Result<HashSet<ContentId>, DbError> {
        let tx = self.db.begin_read().map_err(redb_error("read copies"))?;
        let table = tx.open_table(COPIES).map_err(redb_error("read copies"))?;
        let mut out = HashSet::new();
        for item in table.iter().map_err(redb_error("read copies"))? {
            let (key, _) = item.map_err(redb_error("read copies"))?;
            out.insert(ContentId(hash_key(key.value(), "copy key")?));
        }
        Ok(out)
    }

    /// Replaces the namespace log by one whole save.
    pub fn compact_namespace(&self, whole: &[u8]) -> Result<(), DbError> {
        const WHAT: &str = "compact namespace";
        let tx = self.db.begin_write().map_err(redb_error(WHAT))?;
        {
            let mut table = tx.open_table(NAMESPACE).map_err(redb_error(WHAT))?;
            table.retain(|_, _| false).map_err(redb_error(WHAT))?;
            table.insert(0, whole).map_err(redb_error(WHAT))?;
        }
        tx.commit().map_err(redb_error(WHAT))
    }

    /// The manifest of a version this site holds.
    pub fn manifest(&self, id: &ContentId) -> Result<Option<Manifest>, DbError> {
        let tx = self.db.begin_read().map_err(redb_error("read versions"))?;
        let table = tx.open_table(VERSIONS).map_err(redb_error("read versions"))?;
        let Some(bytes) = table.get(id.0.as_slice()).map_err(redb_error("read versions"))? else {
            return Ok(None);
        };
        Manifest::decode(bytes.value())
            .map(Some)
            .map_err(|e| DbError::Corrupt { what: "manifest", reason: e.to_string() })
    }

    /// Every version this site holds.
    pub fn versions(&self) -> Result<Vec<Manifest>, DbError> {
        let tx = self.db.begin_read().map_err(redb_error("read versions"))?;
        let table = tx.open_table(VERSIONS).map_err(redb_error("read versions"))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(redb_error("read versions"))? {
            let (_, value) = item.map_err(redb_error("read versions"))?;
            let manifest = Manifest::decode(value.value())
                .map_err(|e| DbError::Corrupt { what: "manifest", reason: e.to_string() })?;
            out.push(manifest);
        }
        Ok(out)
    }

    /// Every chunk recorded as durable, with its length.
    pub fn chunk_index(&self) -> Result<HashMap<ChunkHash, u32>, DbError> {
        let tx = self.db.begin_read().map_err(redb_error("read chunks"))?;
        let table = tx.open_table(CHUNKS).map_err(redb_error("read chunks"))?;
        let mut out = HashMap::new();
        for item in table.iter().map_err(redb_error("read chunks"))? {
            let (key, len) = item.map_err(redb_error("read chunks"))?;
            out.insert(ChunkHash(hash_key(key.value(), "chunk key")?), len.value());
        }
        Ok(out)
    }

    /// The saved sync session state with `peer`.
    pub fn peer_state(&self, peer: &str) -> Result<Option<Vec<u8>>, DbError> {
        let tx = self.db.begin_read().map_err(redb_error("read peers"))?;
        let table = tx.open_table(PEERS).map_err(redb_error("read peers"))?;
        Ok(table.get(peer).map_err(redb_error("read peers"))?.map(|v| v.value().to_vec()))
    }

    /// Saves the sync session state with `peer`.
    pub fn set_peer_state(&self, peer: &str, state: &[u8]) -> Result<(), DbError> {
        let tx = self.db.begin_write().map_err(redb_error("write peers"))?;
        tx.open_table(PEERS)
            .map_err(redb_error("write peers"))?
            .insert(peer, state)
            .map_err(redb_error("write peers"))?;
        tx.commit().map_err(redb_error("write peers"))
    }

    /// Brings the chunk directory and the index into agreement after a crash: removes chunk files
    /// no transaction recorded, and forgets indexed chunks (and the versions needing them) whose
    /// files are gone.
    pub fn recover(&self, chunks: &ChunkStore) -> Result<Recovery, DbError> {
        const WHAT: &str = "recover";
        let index: HashSet<ChunkHash> = self.chunk_index()?.into_keys().collect();
        let mut recovery = Recovery::default();
        let on_disk: HashSet<ChunkHash> = chunks.list()?.into_iter().collect();
        for hash in on_disk.difference(&index) {
            chunks.remove(hash)?;
            recovery.leftover_chunks_removed += 1;
        }
        let missing: HashSet<ChunkHash> = index.difference(&on_disk).copied().collect();
        if !missing.is_empty() {
            recovery.missing_chunks = missing.len();
            let tx = self.db.begin_write().map_err(redb_error(WHAT))?;
            {
                let mut table = tx.open_table(CHUNKS).map_err(redb_error(WHAT))?;
                for hash in &missing {
                    table.remove(hash.0.as_slice()).map_err(redb_error(WHAT))?;
                }
                let mut table = tx.open_table(VERSIONS).map_err(redb_error(WHAT))?;
                table
                    .retain(|_, manifest| {
                        Manifest::decode(manifest)
                            .is_ok_and(|m| m.chunks.iter().all(|c| !missing.contains(&c.hash)))
                    })
                    .map_err(redb_error(WHAT))?;
                // A version no longer held is no copy either.
                let mut copied = tx.open_table(COPIES).map_err(redb_error(WHAT))?;
                let mut dropped = Vec::new();
                for row in copied.iter().map_err(redb_error(WHAT))? {
                    let (id, _) = row.map_err(redb_error(WHAT))?;
                    if table.get(id.value()).map_err(redb_error(WHAT))?.is_none() {
                        dropped.push(id.value().to_vec());
                    }
                }
                for id in dropped {
                    copied.remove(id.as_slice()).map_err(redb_error(WHAT))?;
                }
            }
            tx.commit().map_err(redb_error(WHAT))?;
        }
        Ok(recovery)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use site_core::content::ChunkerConfig;

    #[test]
    fn commits_are_read_back_and_recovery_removes_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = ChunkStore::open(dir.path(), 0).unwrap();
        let db = Db::open(&dir.path().join("meta.redb")).unwrap();
        let data = vec![7u8; 100_000];
        let config = ChunkerConfig { min_bytes: 1024, avg_bytes: 4096, max_bytes: 16384 };
        let m = Manifest::of_bytes(&data, config);
        for (i, c) in m.chunks.iter().enumerate() {
            let r = m.chunk_range(i);
            chunks.put(&c.hash, &data[r.start as usize..r.end as usize]).unwrap();
        }
        db.commit(b"save-1", &[&m], &[], &m.chunks).unwrap();
        db.commit(b"save-2", &[], &[], &[]).unwrap();
        assert_eq!(db.namespace_bytes().unwrap(), b"save-1save-2");
        assert_eq!(db.manifest(&m.content_id()).unwrap(), Some(m.clone()));
        assert_eq!(db.versions().unwrap(), vec![m.clone()]);
        db.compact_namespace(b"whole").unwrap();
        assert_eq!(db.namespace_bytes().unwrap(), b"whole");
        assert_eq!(db.namespace_saves().unwrap(), 1);
        // A chunk written but never committed is a leftover.
        let stray = b"stray".to_vec();
        chunks.put(&ChunkHash::of(&stray), &stray).unwrap();
        assert_eq!(db.recover(&chunks).unwrap(), Recovery { leftover_chunks_removed: 1, missing_chunks: 0 });
        // A chunk the index lists but the disk lost: the version is no longer held.
        chunks.remove(&m.chunks[0].hash).unwrap();
        assert_eq!(db.recover(&chunks).unwrap().missing_chunks, 1);
        assert!(db.versions().unwrap().is_empty());
        db.set_peer_state("east", b"state").unwrap();
        assert_eq!(db.peer_state("east").unwrap().as_deref(), Some(&b"state"[..]));
    }

    #[test]
    fn copies_are_told_from_own_versions_and_forgotten_with_their_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("meta.redb")).unwrap();
        let config = ChunkerConfig { min_bytes: 1024, avg_bytes: 4096, max_bytes: 16384 };
        let own = Manifest::of_bytes(&[1u8; 20_000], config);
        let copy = Manifest::of_bytes(&[2u8; 20_000], config);
        db.commit(b"", &[&own], &[&copy], &[own.chunks.clone(), copy.chunks.clone()].concat()).unwrap();
        assert_eq!(db.copies().unwrap(), HashSet::from([copy.content_id()]));
        // A copy of a version held as own stays own; writing a copy here makes it own.
        db.commit(b"", &[&copy], &[&own], &[]).unwrap();
        assert!(db.copies().unwrap().is_empty());
        assert_eq!(db.chunk_index().unwrap()[&own.chunks[0].hash], own.chunks[0].len);
        db.forget(&[own.content_id()], &[own.chunks[0].hash]).unwrap();
        assert_eq!(db.versions().unwrap(), vec![copy.clone()]);
        assert!(!db.chunk_index().unwrap().contains_key(&own.chunks[0].hash));
    }

    #[test]
    fn a_copy_that_recovery_drops_is_no_copy_any_more() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = ChunkStore::open(dir.path(), 0).unwrap();
        let db = Db::open(&dir.path().join("meta.redb")).unwrap();
        let data = vec![3u8; 30_000];
        let config = ChunkerConfig { min_bytes: 1024, avg_bytes: 4096, max_bytes: 16384 };
        let copy = Manifest::of_bytes(&data, config);
        for (i, c) in copy.chunks.iter().enumerate() {
            let r = copy.chunk_range(i);
            chunks.put(&c.hash, &data[r.start as usize..r.end as usize]).unwrap();
        }
        db.commit(b"", &[], &[&copy], &copy.chunks).unwrap();
        assert_eq!(db.copies().unwrap(), HashSet::from([copy.content_id()]));
        chunks.remove(&copy.chunks[0].hash).unwrap();
        assert_eq!(db.recover(&chunks).unwrap().missing_chunks, 1);
        assert!(db.versions().unwrap().is_empty());
        assert!(db.copies().unwrap().is_empty(), "the dropped version's row of copies stayed");
    }
}

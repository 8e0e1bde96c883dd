//! The simulated disk of a site: chunk files (durable once synced) and committed database
//! records, as the store keeps them; a crash loses what was not synced and may tear the last
//! chunk file written.

use std::collections::{BTreeSet, HashMap, HashSet};

use crdt_namespace::{ContentId, Namespace, SiteId};
use site_core::Holdings;
use site_core::content::{ChunkHash, ChunkRef, Manifest};

use super::{Driver, World};
use crate::Rng;

/// Records written but not yet committed: chunks to index, versions, a namespace save, and
/// whether the versions are the site's own (else copies).
type Pending = (Vec<ChunkRef>, Vec<Manifest>, Vec<u8>, bool);

/// A site's disk.
#[derive(Default, Clone)]
pub(super) struct Disk {
    pub(super) chunk_files: HashMap<ChunkHash, Vec<u8>>,
    pub(super) unsynced_chunks: BTreeSet<ChunkHash>,
    namespace: Vec<Vec<u8>>,
    versions: Vec<Manifest>,
    /// Versions recorded as copies of what others wrote.
    copies: HashSet<ContentId>,
    index: HashSet<ChunkHash>,
    /// Records written but not yet committed.
    pub(super) pending: Vec<Pending>,
}

impl Disk {
    /// Makes the pending writes durable.
    pub(super) fn commit(&mut self) {
        self.unsynced_chunks.clear();
        for (refs, versions, namespace, own) in std::mem::take(&mut self.pending) {
            self.index.extend(refs.iter().map(|r| r.hash));
            for manifest in versions {
                let content = manifest.content_id();
                if own {
                    self.copies.remove(&content);
                } else if self.versions.iter().all(|m| m.content_id() != content) {
                    self.copies.insert(content);
                }
                self.versions.retain(|m| m.content_id() != content);
                self.versions.push(manifest);
            }
            if !namespace.is_empty() {
                self.namespace.push(namespace);
            }
        }
    }

    /// Forgets versions and chunks, records first, as the runtime does: durably at once (one
    /// database transaction), then the chunk files.
    pub(super) fn forget(&mut self, versions: &[ContentId], chunks: &[ChunkHash]) {
        let gone: HashSet<&ContentId> = versions.iter().collect();
        self.versions.retain(|m| !gone.contains(&m.content_id()));
        self.copies.retain(|c| !gone.contains(c));
        for hash in chunks {
            self.index.remove(hash);
            self.chunk_files.remove(hash);
            self.unsynced_chunks.remove(hash);
        }
    }

    /// A chunk's bytes, checked against its hash.
    pub(super) fn load(&self, hash: &ChunkHash) -> Result<Vec<u8>, String> {
        match self.chunk_files.get(hash) {
            Some(data) if ChunkHash::of(data) == *hash => Ok(data.clone()),
            Some(_) => Err("corrupt".to_string()),
            None => Err("missing".to_string()),
        }
    }

    /// Loses what was not committed; the last unsynced chunk file may be torn, the others may
    /// be gone.
    pub(super) fn crash(&mut self, rng: &mut Rng) {
        self.pending.clear();
        let unsynced: Vec<ChunkHash> = std::mem::take(&mut self.unsynced_chunks).into_iter().collect();
        for (i, hash) in unsynced.iter().enumerate() {
            if i + 1 == unsynced.len() && rng.chance(0.5) {
                let file = self.chunk_files.get_mut(hash).expect("written");
                let keep = rng.index(file.len().max(1));
                file.truncate(keep);
            } else if rng.chance(0.5) {
                self.chunk_files.remove(hash);
            }
        }
    }

    /// Recovery, as `runtime::open` does it: chunk files no commit recorded are removed; the
    /// namespace, the versions held in full and the chunks held are what the site starts from.
    pub(super) fn recover(&mut self, site: &SiteId) -> Result<(Namespace, Holdings), String> {
        let index = &self.index;
        self.chunk_files.retain(|h, _| index.contains(h));
        let saved: Vec<u8> = self.namespace.concat();
        let ns = if saved.is_empty() {
            Namespace::new(site.clone(), super::signing_key(site))
        } else {
            Namespace::load(site.clone(), super::signing_key(site), &saved)
                .map_err(|e| format!("{site} cannot load its namespace: {e}"))?
        };
        let chunks: HashMap<ChunkHash, u32> =
            self.index.iter().filter_map(|h| Some((*h, self.chunk_files.get(h)?.len() as u32))).collect();
        let versions = self
            .versions
            .iter()
            .filter(|m| m.chunks.iter().all(|c| chunks.contains_key(&c.hash)))
            .cloned()
            .collect();
        Ok((ns, Holdings { versions, copies: self.copies.clone(), chunks }))
    }
}

impl<D: Driver> World<D> {
    /// Writes the chunks of `data` (whose manifest is `manifest`) at site `s`, durably, as the
    /// put path does before the core commits the version. A chunk file already there is kept.
    pub fn store_chunks(&mut self, s: usize, manifest: &Manifest, data: &[u8]) {
        let disk = &mut self.sites[s].disk;
        for (i, c) in manifest.chunks.iter().enumerate() {
            let r = manifest.chunk_range(i);
            disk.chunk_files.entry(c.hash).or_insert_with(|| data[r.start as usize..r.end as usize].to_vec());
        }
    }

    /// The chunk files on site `s`'s disk.
    pub fn chunks(&self, s: usize) -> &HashMap<ChunkHash, Vec<u8>> {
        &self.sites[s].disk.chunk_files
    }
}

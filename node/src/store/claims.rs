//! Who relies on which chunk files, so that deleting one never pulls it from under a writer.
//!
//! A put stores its chunks before its version is committed, and one that finds a chunk already
//! stored relies on that file: until the commit, the core does not count the put's version, and
//! may decide to delete the file (its old version became garbage, or its copy was evicted). So
//! each put holds a [`Claim`] on every chunk it stores or finds, from before it looks at the
//! file until its commit is answered (or it failed). Deleting goes through the same table:
//! - the core, confirming a reclaim, *dooms* the chunks ([`ChunkStore::doom`]): those a put
//!   claims are left alone and *deferred* (looked at again once no put claims them,
//!   [`ChunkStore::take_undeferred`]), the others are marked as being deleted;
//! - a put that needs a chunk being deleted waits until its file is gone, then writes it anew;
//! - a copy the core caches is not kept if its chunk is being deleted (it is fetched again when
//!   needed).
//!
//! A put that fails lets go of its claims and hands the chunks it wrote to the reclaimer
//! ([`Claim::into_written`]), like chunks the core reclaims: they go only if the core does not
//! hold them (another put of the same bytes may have committed, or a fetch cached a copy) and
//! no put claims them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use site_core::content::ChunkHash;

use super::chunks::{ChunkError, ChunkStore};

/// The table of claims (one per chunk store).
#[derive(Debug, Default)]
pub(super) struct Claims {
    state: Mutex<State>,
    /// Signalled each time a chunk being deleted is gone.
    gone: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Chunks puts claim, by how many claims (a put that stores one chunk twice counts twice).
    claimed: HashMap<ChunkHash, u32>,
    /// Chunks whose files are being deleted.
    deleting: HashSet<ChunkHash>,
    /// Chunks a reclaim left because a put claimed them.
    deferred: HashSet<ChunkHash>,
    /// Deferred chunks no put claims any more.
    undeferred: Vec<ChunkHash>,
}

impl Claims {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every statement that can panic: a poisoned lock is
        // only a thread that died elsewhere.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Claims `hash` for a put, once it is not being deleted.
    fn claim(&self, hash: ChunkHash) {
        let mut state = self.lock();
        while state.deleting.contains(&hash) {
            state = self.gone.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        *state.claimed.entry(hash).or_insert(0) += 1;
    }

    /// Lets go of `count` claims of each chunk.
    fn release(&self, claims: &HashMap<ChunkHash, u32>) {
        let mut state = self.lock();
        for (hash, count) in claims {
            let Some(left) = state.claimed.get_mut(hash) else { continue };
            *left = left.saturating_sub(*count);
            if *left == 0 {
                state.claimed.remove(hash);
                if state.deferred.remove(hash) {
                    state.undeferred.push(*hash);
                }
            }
        }
    }
}

impl ChunkStore {
    /// The core is about to delete `chunks` (none of which it holds): the chunks a put claims
    /// are deferred, the others are marked as being deleted and returned. Delete each of those
    /// with [`ChunkStore::remove_doomed`].
    pub fn doom(&self, chunks: Vec<ChunkHash>) -> Vec<ChunkHash> {
        let mut state = self.claims.lock();
        let mut doomed = Vec::with_capacity(chunks.len());
        for hash in chunks {
            if state.claimed.contains_key(&hash) {
                state.deferred.insert(hash);
            } else if state.deleting.insert(hash) {
                doomed.push(hash);
            }
        }
        doomed
    }

    /// Deletes a chunk [`ChunkStore::doom`] returned, and lets puts waiting for it go on.
    pub fn remove_doomed(&self, hash: &ChunkHash) -> Result<(), ChunkError> {
        let removed = self.remove(hash);
        self.claims.lock().deleting.remove(hash);
        self.claims.gone.notify_all();
        removed
    }

    /// Chunks deferred by [`ChunkStore::doom`] that no put claims any more: for the core to
    /// look at again (a put that committed holds them again; one that failed does not).
    pub fn take_undeferred(&self) -> Vec<ChunkHash> {
        std::mem::take(&mut self.claims.lock().undeferred)
    }

    /// The deletions doomed chunks wait for will not happen (the node is stopping): puts
    /// waiting for one go on.
    pub fn abandon_deleting(&self) {
        self.claims.lock().deleting.clear();
        self.claims.gone.notify_all();
    }

    /// Stores a copy the core caches (its hash checked): `None` if the chunk is being deleted
    /// (the copy is not kept), otherwise whether this wrote it. The core deletes only chunks
    /// it does not hold, so it needs no claim.
    pub(crate) fn put_copy(&self, hash: &ChunkHash, data: &[u8]) -> Result<Option<bool>, ChunkError> {
        if self.claims.lock().deleting.contains(hash) {
            return Ok(None);
        }
        self.put_verified(hash, data).map(Some)
    }
}

/// The chunks one put stores or finds stored, claimed until it is dropped (after the put's
/// commit is answered, or [`Claim::into_written`] if it failed).
pub struct Claim {
    store: Arc<ChunkStore>,
    mine: Mutex<Mine>,
}

#[derive(Default)]
struct Mine {
    /// Claims held, by chunk.
    claims: HashMap<ChunkHash, u32>,
    /// Chunks this put wrote (they were not stored before).
    written: Vec<ChunkHash>,
}

impl Claim {
    /// A put's claim on `store`, holding nothing yet.
    pub fn new(store: Arc<ChunkStore>) -> Claim {
        Claim { store, mine: Mutex::new(Mine::default()) }
    }

    fn mine(&self) -> MutexGuard<'_, Mine> {
        self.mine.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The store claimed on.
    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

    /// Claims chunk `hash` (waiting while it is being deleted) and stores `data`, whose hash the
    /// caller has just computed, as it: whether this wrote it (false: it was stored already).
    pub fn put(&self, hash: &ChunkHash, data: &[u8]) -> Result<bool, ChunkError> {
        self.store.claims.claim(*hash);
        *self.mine().claims.entry(*hash).or_insert(0) += 1;
        let new = self.store.put_verified(hash, data)?;
        if new {
            self.mine().written.push(*hash);
        }
        Ok(new)
    }

    /// The put failed: lets go of every claim and returns the chunks it wrote (each once),
    /// which nothing records. Hand them to the reclaimer, which deletes those the core does
    /// not hold and no put claims.
    pub fn into_written(self) -> Vec<ChunkHash> {
        let written = std::mem::take(&mut self.mine().written);
        drop(self);
        let unique: HashSet<ChunkHash> = written.into_iter().collect();
        unique.into_iter().collect()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mine = std::mem::take(&mut *self.mine());
        self.store.claims.release(&mine.claims);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Arc<ChunkStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ChunkStore::open(dir.path(), 0).unwrap());
        (dir, store)
    }

    /// Chunk `x`, stored and then doomed.
    fn stored_and_doomed(store: &ChunkStore) -> ChunkHash {
        let x = ChunkHash::of(b"x");
        store.put(&x, b"x").unwrap();
        assert_eq!(store.doom(vec![x]), vec![x]);
        x
    }

    #[test]
    fn a_chunk_a_put_claims_is_deferred_not_deleted_and_comes_back_when_the_put_ends() {
        let (_dir, store) = store();
        let x = ChunkHash::of(b"x");
        store.put(&x, b"x").unwrap();
        // A put finds x stored and relies on it; the core then reclaims x (its old version
        // was garbage).
        let put = Claim::new(store.clone());
        assert!(!put.put(&x, b"x").unwrap());
        assert!(store.doom(vec![x]).is_empty(), "a claimed chunk is not doomed");
        assert_eq!(store.get(&x).unwrap(), b"x");
        assert!(store.take_undeferred().is_empty());
        drop(put);
        assert_eq!(store.take_undeferred(), vec![x], "looked at again once the put is done");
        assert_eq!(store.doom(vec![x]), vec![x]);
        store.remove_doomed(&x).unwrap();
        assert!(matches!(store.get(&x), Err(ChunkError::Missing(_))));
    }

    #[test]
    fn a_put_that_needs_a_chunk_being_deleted_waits_and_writes_it_anew() {
        let (_dir, store) = store();
        let x = stored_and_doomed(&store);
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                let put = Claim::new(store);
                put.put(&x, b"x").unwrap()
            })
        };
        // The deletion goes ahead whenever the writer got to the chunk: it waits for it.
        std::thread::sleep(std::time::Duration::from_millis(50));
        store.remove_doomed(&x).unwrap();
        assert!(writer.join().unwrap(), "the put wrote the chunk after its deletion");
        assert_eq!(store.get(&x).unwrap(), b"x");
    }

    #[test]
    fn a_copy_of_a_chunk_being_deleted_is_not_kept() {
        let (_dir, store) = store();
        let x = stored_and_doomed(&store);
        assert_eq!(store.put_copy(&x, b"x").unwrap(), None);
        store.remove_doomed(&x).unwrap();
        assert_eq!(store.put_copy(&x, b"x").unwrap(), Some(true), "kept once the deletion is done");
    }

    #[test]
    fn a_failed_put_hands_back_what_it_wrote_and_lets_go_of_everything() {
        let (_dir, store) = store();
        let [x, y] = [b"x", b"y"].map(|d| ChunkHash::of(d));
        store.put(&x, b"x").unwrap();
        let failed = Claim::new(store.clone());
        assert!(!failed.put(&x, b"x").unwrap());
        assert!(failed.put(&y, b"y").unwrap());
        assert!(!failed.put(&y, b"y").unwrap(), "a chunk twice in one file");
        assert_eq!(failed.into_written(), vec![y], "only what it wrote, once");
        // Nothing is claimed any more: both may be doomed.
        let mut doomed = store.doom(vec![x, y]);
        doomed.sort_by_key(|h| h.0);
        let mut both = vec![x, y];
        both.sort_by_key(|h| h.0);
        assert_eq!(doomed, both);
    }

    #[test]
    fn puts_waiting_for_a_deletion_that_never_comes_go_on_when_it_is_abandoned() {
        let (_dir, store) = store();
        let x = stored_and_doomed(&store);
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || Claim::new(store).put(&x, b"x").unwrap())
        };
        store.abandon_deleting();
        assert!(!writer.join().unwrap(), "the file was never deleted: found stored");
    }
}

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
//!   needed); one that a put claims is marked as kept, so that the put, if it fails, leaves it.
//!
//! A put that fails gives back the chunks it wrote that no other put claims and the core keeps
//! no copy of ([`Claim::give_back`]).

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
    /// Claimed chunks the core also keeps a copy of.
    kept: HashSet<ChunkHash>,
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
                state.kept.remove(hash);
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

    /// Stores a copy the core caches (its hash checked): `None` if the chunk is being deleted
    /// (the copy is not kept), otherwise whether this wrote it.
    pub(crate) fn put_copy(&self, hash: &ChunkHash, data: &[u8]) -> Result<Option<bool>, ChunkError> {
        {
            let mut state = self.claims.lock();
            if state.deleting.contains(hash) {
                return Ok(None);
            }
            if state.claimed.contains_key(hash) {
                state.kept.insert(*hash);
            }
        }
        self.put_verified(hash, data).map(Some)
    }
}

/// The chunks one put stores or finds stored, claimed until it is dropped (after the put's
/// commit is answered, or after [`Claim::give_back`]).
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

    /// The put failed: deletes the chunks it wrote that no other put claims and the core keeps
    /// no copy of (what stays is removed at the next start if nothing records it).
    pub fn give_back(&self) {
        let doomed: Vec<ChunkHash> = {
            let mine = self.mine();
            let mut state = self.store.claims.lock();
            mine.written
                .iter()
                .filter(|hash| {
                    state.claimed.get(*hash) == mine.claims.get(*hash)
                        && !state.kept.contains(*hash)
                        && !state.deleting.contains(*hash)
                })
                .copied()
                .collect::<HashSet<_>>()
                .into_iter()
                .inspect(|hash| {
                    state.deleting.insert(*hash);
                })
                .collect()
        };
        for hash in &doomed {
            if let Err(e) = self.store.remove_doomed(hash) {
                tracing::warn!("giving back a failed put's chunk: {e}");
            }
        }
        self.mine().written.clear();
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
        let x = ChunkHash::of(b"x");
        store.put(&x, b"x").unwrap();
        assert_eq!(store.doom(vec![x]), vec![x]);
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
        let x = ChunkHash::of(b"x");
        store.put(&x, b"x").unwrap();
        assert_eq!(store.doom(vec![x]), vec![x]);
        assert_eq!(store.put_copy(&x, b"x").unwrap(), None);
        store.remove_doomed(&x).unwrap();
        assert_eq!(store.put_copy(&x, b"x").unwrap(), Some(true), "kept once the deletion is done");
    }

    #[test]
    fn a_failed_put_gives_back_only_what_it_wrote_and_nobody_else_relies_on() {
        let (_dir, store) = store();
        let [x, y, z, w] = [b"x", b"y", b"z", b"w"].map(|d| ChunkHash::of(d));
        store.put(&x, b"x").unwrap();
        let failed = Claim::new(store.clone());
        // It found x, wrote y, z and w; another put found y; the core cached a copy of z.
        assert!(!failed.put(&x, b"x").unwrap());
        for (hash, data) in [(y, b"y"), (z, b"z"), (w, b"w")] {
            assert!(failed.put(&hash, data).unwrap());
        }
        let other = Claim::new(store.clone());
        assert!(!other.put(&y, b"y").unwrap());
        assert_eq!(store.put_copy(&z, b"z").unwrap(), Some(false));
        failed.give_back();
        drop(failed);
        assert!(matches!(store.get(&w), Err(ChunkError::Missing(_))), "only the failed put needed w");
        for (hash, data) in [(x, b"x"), (y, b"y"), (z, b"z")] {
            assert_eq!(store.get(&hash).unwrap(), data);
        }
    }
}

//! The put path: read, chunk, hash and store a file's bytes as a pipeline across cores, with
//! memory bounded whatever the file size.
//!
//! The calling thread reads and cuts chunks (FastCDC) and hashes the whole file; worker threads
//! hash each chunk and write new ones to the chunk store. A bounded channel between them holds at
//! most [`PUT_QUEUE_CHUNKS_PER_WORKER`] chunks per worker, so at most about
//! `(2 × workers + 1) × max chunk size` bytes are in memory at once.

use std::io::Read;
use std::sync::Mutex;

use crate::store::chunks::ChunkError;
use crate::store::claims::Claim;
use site_core::content::{ChunkHash, ChunkRef, ChunkerConfig, Manifest};

/// Chunks queued per worker: enough to keep every worker busy while the reader cuts the next.
pub const PUT_QUEUE_CHUNKS_PER_WORKER: usize = 2;

/// What a put produced.
#[derive(Debug, Clone)]
pub struct PutOutcome {
    /// The version's manifest.
    pub manifest: Manifest,
    /// Chunks that were not stored before.
    pub new_chunks: usize,
    /// Bytes of those chunks.
    pub new_bytes: u64,
}

/// Errors of the put path.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// Reading the source failed.
    #[error("reading the source: {0}")]
    Read(std::io::Error),
    /// Storing a chunk failed.
    #[error(transparent)]
    Store(#[from] ChunkError),
}

/// Reads `source` to its end and stores it as chunks through `claim` (which holds them until it
/// is dropped: keep it until the version is committed); `progress` is called with the bytes read
/// so far after each chunk. The chunks are written but not yet durable: sync the store
/// ([`crate::store::ChunkStore::sync`]) before anything durable refers to the manifest — one
/// sync can then serve many puts.
///
/// Nothing records the chunks of a put that fails: hand them to the reclaimer
/// ([`Claim::into_written`]); what stays is removed at the next start (`Db::recover`).
pub fn put_stream<R: Read>(
    mut source: R,
    config: ChunkerConfig,
    claim: &Claim,
    workers: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<PutOutcome, PutError> {
    // A source shorter than the smallest chunk is one chunk (or none): stored here, without the
    // chunker's buffer of the largest chunk size or the worker threads.
    let mut head = Vec::new();
    (&mut source).take(u64::from(config.min_bytes)).read_to_end(&mut head).map_err(PutError::Read)?;
    if head.len() < config.min_bytes as usize {
        return put_small(&head, claim, progress);
    }
    let source = std::io::Cursor::new(head).chain(source);
    let workers = workers.max(1);
    let (chunk_tx, chunk_rx) =
        crossbeam_channel::bounded::<(usize, Vec<u8>)>(workers * PUT_QUEUE_CHUNKS_PER_WORKER);
    let results: Mutex<Vec<(usize, ChunkRef, bool)>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<ChunkError>> = Mutex::new(None);
    let mut file_hasher = blake3::Hasher::new();
    let chunker = fastcdc::v2020::StreamCDC::new(
        source,
        config.min_bytes as usize,
        config.avg_bytes as usize,
        config.max_bytes as usize,
    );
    let read_result = std::thread::scope(|scope| {
        for _ in 0..workers {
            let chunk_rx = chunk_rx.clone();
            let (results, failure) = (&results, &failure);
            scope.spawn(move || {
                for (index, data) in chunk_rx {
                    let hash = ChunkHash::of(&data);
                    match claim.put(&hash, &data) {
                        Ok(new) => results.lock().expect("results lock").push((
                            index,
                            ChunkRef { hash, len: data.len() as u32 },
                            new,
                        )),
                        Err(e) => {
                            failure.lock().expect("failure lock").get_or_insert(e);
                        }
                    }
                }
            });
        }
        drop(chunk_rx);
        let mut read = 0u64;
        for (index, chunk) in chunker.enumerate() {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(fastcdc::v2020::Error::IoError(e)) => return Err(PutError::Read(e)),
                Err(e) => return Err(PutError::Read(std::io::Error::other(e.to_string()))),
            };
            file_hasher.update(&chunk.data);
            read += chunk.length as u64;
            if chunk_tx.send((index, chunk.data)).is_err() {
                break;
            }
            progress(read);
            if failure.lock().expect("failure lock").is_some() {
                break;
            }
        }
        drop(chunk_tx);
        Ok(())
    });
    let mut results = results.into_inner().expect("results lock");
    let failed_with = match (read_result, failure.into_inner().expect("failure lock")) {
        (Err(e), _) => Some(e),
        (Ok(()), Some(e)) => Some(e.into()),
        (Ok(()), None) => None,
    };
    if let Some(e) = failed_with {
        return Err(e);
    }
    results.sort_by_key(|(i, _, _)| *i);
    let new_chunks = results.iter().filter(|(_, _, new)| *new).count();
    let new_bytes = results.iter().filter(|(_, _, new)| *new).map(|(_, c, _)| u64::from(c.len)).sum();
    let manifest =
        Manifest::new(*file_hasher.finalize().as_bytes(), results.into_iter().map(|(_, c, _)| c).collect());
    Ok(PutOutcome { manifest, new_chunks, new_bytes })
}

/// Stores `data`, shorter than the smallest chunk, as a version of at most one chunk.
fn put_small(data: &[u8], claim: &Claim, progress: &mut dyn FnMut(u64)) -> Result<PutOutcome, PutError> {
    let mut chunks = Vec::new();
    let mut new_chunks = 0;
    if !data.is_empty() {
        let hash = ChunkHash::of(data);
        if claim.put(&hash, data)? {
            new_chunks = 1;
        }
        chunks.push(ChunkRef { hash, len: data.len() as u32 });
    }
    progress(data.len() as u64);
    let new_bytes = if new_chunks == 1 { data.len() as u64 } else { 0 };
    let manifest = Manifest::new(*blake3::hash(data).as_bytes(), chunks);
    Ok(PutOutcome { manifest, new_chunks, new_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_put_matches_the_in_memory_manifest_and_dedupes() {
        let (_dir, store, config) = small_chunks_store();
        let claim = Claim::new(store.clone());
        let data = bytes(1, 300_000);
        let mut last = 0;
        let first = put_stream(&data[..], config, &claim, 3, &mut |n| last = n).unwrap();
        assert_eq!(last, data.len() as u64);
        assert_eq!(first.manifest, Manifest::of_bytes(&data, config));
        assert_eq!(first.new_chunks, first.manifest.chunks.len());
        let again = put_stream(&data[..], config, &claim, 2, &mut |_| {}).unwrap();
        assert_eq!(again.new_chunks, 0);
        for (i, c) in first.manifest.chunks.iter().enumerate() {
            let r = first.manifest.chunk_range(i);
            assert_eq!(store.get(&c.hash).unwrap(), &data[r.start as usize..r.end as usize]);
        }
        let empty = put_stream(&[][..], config, &claim, 2, &mut |_| {}).unwrap();
        assert_eq!(empty.manifest.size, 0);
        assert!(empty.manifest.chunks.is_empty());
        assert_eq!(empty.manifest, Manifest::of_bytes(&[], config));
        // Shorter than the smallest chunk, exactly that long, and one byte longer.
        for len in [1, 1023, 1024, 1025] {
            let small = put_stream(&data[..len], config, &claim, 2, &mut |_| {}).unwrap();
            assert_eq!(small.manifest, Manifest::of_bytes(&data[..len], config), "{len} bytes");
            assert_eq!(store.get(&small.manifest.chunks[0].hash).unwrap(), &data[..len]);
        }
    }

    #[test]
    fn a_failed_put_hands_back_the_chunks_it_wrote_and_only_those() {
        let (_dir, store, config) = small_chunks_store();
        let data = bytes(7, 150_000);
        // The stream's first chunk is stored before: another put's, which the failed one finds
        // there and does not write.
        let whole = Manifest::of_bytes(&data, config);
        let first = whole.chunks[0].hash;
        store.put(&first, &data[..whole.chunk_range(0).end as usize]).unwrap();
        // The source fails after 150,000 bytes.
        struct Failing<'a>(&'a [u8]);
        impl Read for Failing<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0.is_empty() {
                    return Err(std::io::Error::other("the source broke"));
                }
                let n = buf.len().min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let claim = Claim::new(store.clone());
        let failed = put_stream(Failing(&data), config, &claim, 2, &mut |_| {});
        assert!(matches!(failed, Err(PutError::Read(_))));
        let mut written = claim.into_written();
        assert!(!written.contains(&first), "a chunk it found stored is not its own");
        let mut stored: Vec<ChunkHash> = store.list().unwrap();
        stored.retain(|h| *h != first);
        stored.sort_by_key(|h| h.0);
        written.sort_by_key(|h| h.0);
        assert!(!written.is_empty());
        assert_eq!(stored, written, "exactly the chunks it wrote are handed back");
    }

    /// A store in a temporary directory, and chunking in a few KiB.
    fn small_chunks_store() -> (tempfile::TempDir, std::sync::Arc<crate::store::ChunkStore>, ChunkerConfig) {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(crate::store::ChunkStore::open(dir.path(), 0).unwrap());
        (dir, store, ChunkerConfig { min_bytes: 1024, avg_bytes: 4096, max_bytes: 16384 })
    }

    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect()
    }
}

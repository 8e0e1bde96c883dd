//! The simulated staging bucket: packs by name, shared by the sites of every region. A request
//! takes the world's [`Latency`]; with the bucket's fault rate on, one is answered 0.2–1 s late
//! (503 SlowDown, retried) or meets a [`BucketFault`]. A test may instead give every request one
//! fault, and hold uploads until it lets them finish.

use std::collections::HashMap;

use proto::FetchId;
use site_core::content::{ChunkHash, ChunkRef};
use site_core::{BucketError, PackName, StagingEvent};

use super::{Driver, Event, Latency, World};

/// What a request to the bucket may meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketFault {
    /// It times out (as every request to an unreachable bucket does).
    TimedOut,
    /// The pack is lost (or was swept) before it: an upload reports success but nothing is
    /// kept, an open or a read finds nothing.
    Lost,
    /// A chunk read returns altered bytes.
    Corrupt,
}

/// Why the bucket answered with an error, as the sites see it.
const TIMED_OUT: &str = "the bucket timed out";

/// A request to the simulated bucket.
pub(super) enum BucketOp {
    Open { name: PackName },
    Read { request: FetchId, name: PackName, chunk: ChunkHash, index: u32 },
    Upload { name: PackName, pack: Vec<(ChunkHash, Vec<u8>)> },
}

/// An upload kept from the bucket until [`World::finish_uploads`].
#[derive(Clone, Debug)]
pub struct HeldUpload {
    /// The uploading site.
    pub site: usize,
    /// The pack's name.
    pub name: PackName,
    /// Its chunks, in order.
    pub chunks: Vec<(ChunkHash, Vec<u8>)>,
}

/// The bucket's contents and how it misbehaves.
#[derive(Default)]
pub(super) struct Bucket {
    /// Packs by name, each its chunks in order.
    packs: HashMap<PackName, Vec<(ChunkHash, Vec<u8>)>>,
    /// A fault every request meets (tests).
    fault: Option<BucketFault>,
    /// A fault was set once: a site in `auto` mode may rightly have read across regions
    /// directly.
    pub(super) faulty: bool,
    /// Uploads kept from the bucket, while uploads are held.
    held: Option<Vec<HeldUpload>>,
}

impl<D: Driver> World<D> {
    /// The packs in the bucket, by name.
    pub fn packs(&self) -> &HashMap<PackName, Vec<(ChunkHash, Vec<u8>)>> {
        &self.bucket.packs
    }

    /// Makes every request to the bucket meet `fault` from now on (`None`: none does).
    pub fn set_bucket_fault(&mut self, fault: Option<BucketFault>) {
        self.bucket.faulty |= fault.is_some();
        self.bucket.fault = fault;
    }

    /// Keeps every upload from the bucket (in flight, unanswered) until
    /// [`World::finish_uploads`].
    pub fn hold_uploads(&mut self) {
        self.bucket.held.get_or_insert_with(Vec::new);
    }

    /// The uploads held so far.
    pub fn held_uploads(&self) -> &[HeldUpload] {
        self.bucket.held.as_deref().unwrap_or_default()
    }

    /// Lets the uploads held so far reach the bucket (later ones are held again), and runs the
    /// world until nothing moves.
    pub fn finish_uploads(&mut self) -> Result<(), String> {
        let held = self.bucket.held.as_mut().map(std::mem::take).unwrap_or_default();
        for HeldUpload { site, name, chunks } in held {
            self.send_to_bucket(site, BucketOp::Upload { name, pack: chunks });
        }
        self.run()
    }

    /// Uploads what site `s` holds of `chunks` as the pack `name`.
    pub(super) fn upload(&mut self, s: usize, name: PackName, chunks: &[ChunkRef]) {
        let disk = &self.sites[s].disk;
        let mut pack = Vec::new();
        for c in chunks {
            match disk.chunk_files.get(&c.hash) {
                Some(data) => pack.push((c.hash, data.clone())),
                None => {
                    panic!("checker: {} was asked to upload a version it does not hold", self.sites[s].name)
                }
            }
        }
        match &mut self.bucket.held {
            Some(held) => held.push(HeldUpload { site: s, name, chunks: pack }),
            None => self.send_to_bucket(s, BucketOp::Upload { name, pack }),
        }
    }

    /// Deletes the pack `name` (at once: nobody waits for a delete).
    pub(super) fn delete_pack(&mut self, name: PackName) {
        self.bucket.packs.remove(&name);
        if let Some(log) = &mut self.log {
            log.deletes.push(name);
        }
    }

    /// Sends a request to the bucket: it arrives after a few milliseconds, or much later when
    /// the bucket said "slow down" and the client retried.
    pub(super) fn send_to_bucket(&mut self, site: usize, op: BucketOp) {
        let at = match self.latency {
            Latency::Drawn => {
                let mut at = self.now + 5 + self.rng.below(45);
                if !self.healed && self.rng.chance(self.faults.staging) {
                    at += 200 + self.rng.below(800);
                }
                at
            }
            Latency::InOrder => self.now + 1,
        };
        self.schedule(at, Event::Staging { site, op });
    }

    /// Carries out a request at the bucket, with the fault it may meet there.
    pub(super) fn bucket_op(&mut self, op: BucketOp) -> StagingEvent {
        let drawn = !self.healed && self.rng.chance(self.faults.staging);
        let set = self.bucket.fault;
        match op {
            BucketOp::Open { name } => {
                let fault = set.or(drawn.then_some(BucketFault::TimedOut));
                if fault == Some(BucketFault::Lost) {
                    self.bucket.packs.remove(&name);
                }
                let opened = if fault == Some(BucketFault::TimedOut) {
                    Err(BucketError::failed(TIMED_OUT))
                } else {
                    Ok(self.bucket.packs.get(&name).map(|pack| pack.iter().map(|(h, _)| *h).collect()))
                };
                StagingEvent::Opened { name, opened }
            }
            BucketOp::Read { request, name, chunk, index } => {
                // A drawn fault is one of: the request times out, the object is lost before
                // this read, or its bytes come back altered.
                let fault = match set {
                    None if drawn => Some(
                        [BucketFault::TimedOut, BucketFault::Lost, BucketFault::Corrupt][self.rng.index(3)],
                    ),
                    set => set,
                };
                StagingEvent::Chunk { request, chunk, read: self.read_chunk(&name, index, fault) }
            }
            BucketOp::Upload { name, pack } => {
                let uploaded = match set.or(drawn.then_some(BucketFault::TimedOut)) {
                    Some(BucketFault::TimedOut) => Err(TIMED_OUT.to_string()),
                    fault => {
                        let bytes = pack.iter().map(|(_, d)| d.len() as u64).sum();
                        if fault != Some(BucketFault::Lost) {
                            self.bucket.packs.insert(name.clone(), pack);
                        }
                        if let Some(log) = &mut self.log {
                            log.uploads.push(name.clone());
                        }
                        Ok(bytes)
                    }
                };
                StagingEvent::Uploaded { name, uploaded }
            }
        }
    }

    /// Reads chunk `index` of the pack `name`, meeting `fault`.
    fn read_chunk(
        &mut self,
        name: &PackName,
        index: u32,
        fault: Option<BucketFault>,
    ) -> Result<Vec<u8>, BucketError> {
        if fault == Some(BucketFault::Lost) {
            self.bucket.packs.remove(name);
        }
        match self.bucket.packs.get(name).and_then(|pack| pack.get(index as usize)) {
            _ if fault == Some(BucketFault::TimedOut) => Err(BucketError::failed(TIMED_OUT)),
            None => Err(BucketError::spoiled("the staged object is gone")),
            Some((_, data)) if fault == Some(BucketFault::Corrupt) => {
                let mut data = data.clone();
                if let Some(first) = data.first_mut() {
                    *first ^= 1;
                }
                Ok(data)
            }
            Some((_, data)) => Ok(data.clone()),
        }
    }
}

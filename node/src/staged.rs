//! Carries out the core's staging outputs against the bucket (`transport::staging`) on tokio
//! tasks and hands the results back to the core as [`StagingEvent`]s; sweeps stale packs.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use transport::staging::{StagedPack, Staging, StagingError};

use crate::store::ChunkStore;
use site_core::content::ChunkHash;
use site_core::{BucketError, Output, PackName, StagingEvent};

/// How often stale packs are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

/// Packs kept open per site, for the reads of their chunks.
const PACKS_OPEN_MAX: usize = 32;

/// Bytes of open packs kept in memory (a small pack is read whole when opened).
const PACKS_OPEN_BYTES_MAX: usize = 64 << 20;

/// Packs opened, by name, oldest first out.
#[derive(Default)]
struct OpenPacks {
    packs: HashMap<PackName, StagedPack>,
    order: VecDeque<PackName>,
    bytes: usize,
}

impl OpenPacks {
    fn insert(&mut self, name: PackName, pack: StagedPack) {
        self.bytes += pack.resident_bytes();
        if let Some(old) = self.packs.insert(name.clone(), pack) {
            self.bytes -= old.resident_bytes();
            self.order.retain(|n| *n != name);
        }
        self.order.push_back(name);
        // The newest stays, whatever its size.
        while self.order.len() > 1 && (self.order.len() > PACKS_OPEN_MAX || self.bytes > PACKS_OPEN_BYTES_MAX)
        {
            if let Some(oldest) = self.order.pop_front() {
                self.take(&oldest);
            }
        }
    }

    fn take(&mut self, name: &[u8]) {
        if let Some(pack) = self.packs.remove(name) {
            self.bytes -= pack.resident_bytes();
        }
    }

    fn remove(&mut self, name: &[u8]) {
        if self.packs.contains_key(name) {
            self.take(name);
            self.order.retain(|n| &**n != name);
        }
    }
}

/// Runs staging outputs; without a bucket configured, every output fails with that reason.
#[derive(Clone)]
pub struct StagingDriver {
    staging: Option<Staging>,
    /// Packs opened, by name, for the reads of their chunks.
    packs: Arc<Mutex<OpenPacks>>,
    chunks: Arc<ChunkStore>,
    events: mpsc::UnboundedSender<StagingEvent>,
    runtime: tokio::runtime::Handle,
}

/// Logs a failure and says, for the core, whether the object itself is bad.
fn reported(what: &str, e: StagingError) -> BucketError {
    tracing::warn!("staging: {what}: {e}");
    match e {
        StagingError::Missing { .. } | StagingError::Tampered { .. } | StagingError::Truncated { .. } => {
            BucketError::spoiled(e.to_string())
        }
        StagingError::Config(_) | StagingError::S3 { .. } | StagingError::Chunk { .. } => {
            BucketError::failed(e.to_string())
        }
    }
}

impl StagingDriver {
    /// A driver for `staging` (if configured) whose results arrive on the returned channel.
    pub fn new(
        staging: Option<Staging>,
        chunks: Arc<ChunkStore>,
        runtime: tokio::runtime::Handle,
    ) -> (StagingDriver, mpsc::UnboundedReceiver<StagingEvent>) {
        let (events, receiver) = mpsc::unbounded_channel();
        let driver = StagingDriver { staging, packs: Arc::default(), chunks, events, runtime };
        (driver, receiver)
    }

    fn send(&self, event: StagingEvent) {
        // The core stopped: nobody wants the result.
        let _ = self.events.send(event);
    }

    /// Starts carrying out a staging output (others are ignored).
    pub fn execute(&self, output: Output) {
        let Some(staging) = self.staging.clone() else {
            let why = "no staging bucket is configured at this site";
            return match output {
                Output::StageOpen { name } => {
                    self.send(StagingEvent::Opened { name, opened: Err(BucketError::failed(why)) })
                }
                Output::StageRead { request, chunk, .. } => {
                    self.send(StagingEvent::Chunk { request, chunk, read: Err(BucketError::failed(why)) })
                }
                Output::StageUpload { name, .. } => {
                    self.send(StagingEvent::Uploaded { name, uploaded: Err(why.to_owned()) })
                }
                _ => {}
            };
        };
        let this = self.clone();
        match output {
            Output::StageOpen { name } => {
                self.runtime.spawn(async move {
                    let opened = match staging.open(&name).await {
                        Ok(Some(pack)) => {
                            let chunks = pack.entries.iter().map(|e| ChunkHash(e.hash)).collect();
                            this.packs.lock().expect("packs lock").insert(name.clone(), pack);
                            Ok(Some(chunks))
                        }
                        Ok(None) => Ok(None),
                        Err(e) => Err(reported("opening a pack", e)),
                    };
                    this.send(StagingEvent::Opened { name, opened });
                });
            }
            Output::StageRead { request, name, chunk, index } => {
                self.runtime.spawn(async move {
                    let pack = this.packs.lock().expect("packs lock").packs.get(&name).cloned();
                    let read = match pack {
                        Some(pack) => staging.read_chunk(&pack, index as usize).await,
                        None => match staging.open(&name).await {
                            Ok(Some(pack)) => {
                                let read = staging.read_chunk(&pack, index as usize).await;
                                this.packs.lock().expect("packs lock").insert(name, pack);
                                read
                            }
                            Ok(None) => Err(StagingError::Missing { key: staging.key_of(&name) }),
                            Err(e) => Err(e),
                        },
                    };
                    let read = read.map_err(|e| reported("reading a chunk", e));
                    this.send(StagingEvent::Chunk { request, chunk, read });
                });
            }
            Output::StageUpload { name, region, chunks } => {
                self.runtime.spawn(async move {
                    let specs: Vec<_> = chunks.iter().map(|c| (c.hash.0, c.len)).collect();
                    let store = this.chunks.clone();
                    // A disk read per chunk: the runtime's other tasks go on meanwhile.
                    let mut load = |i: usize| {
                        tokio::task::block_in_place(|| store.get(&chunks[i].hash)).map_err(|e| e.to_string())
                    };
                    let started = std::time::Instant::now();
                    let uploaded = match staging.upload(&name, &specs, &mut load).await {
                        Ok(pack) => {
                            let ms = started.elapsed().as_millis() as u64;
                            let key = pack.key.as_str();
                            tracing::info!(region = %region, key, chunks = specs.len(), bytes = pack.size, ms, "staged");
                            Ok(pack.size)
                        }
                        Err(e) => Err(reported("uploading a pack", e).reason),
                    };
                    this.send(StagingEvent::Uploaded { name, uploaded });
                });
            }
            Output::StageDelete { name } => {
                self.packs.lock().expect("packs lock").remove(&name);
                self.runtime.spawn(async move {
                    if let Err(e) = staging.delete(&name).await {
                        reported("deleting a pack", e);
                    }
                });
            }
            _ => {}
        }
    }

    /// Deletes packs older than `ttl` now and then, for as long as the runtime runs.
    pub fn start_sweeper(&self, ttl: Duration) {
        let Some(staging) = self.staging.clone() else { return };
        self.runtime.spawn(async move {
            let mut every = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                every.tick().await;
                match staging.sweep(ttl).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("staging: swept {n} packs older than {ttl:?}"),
                    Err(e) => {
                        reported("sweeping stale packs", e);
                    }
                }
            }
        });
    }
}

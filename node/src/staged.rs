//! Carries out the core's staging outputs against the bucket (`transport::staging`) on tokio
//! tasks and hands the results back to the core as [`StagingEvent`]s; sweeps stale packs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crdt_namespace::ContentId;
use tokio::sync::mpsc;
use transport::staging::{StagedPack, Staging, StagingError};

use crate::content::ChunkHash;
use crate::core::{Output, Site};
use crate::store::ChunkStore;

/// How often stale packs are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

/// The result of a staging output, for the core.
#[derive(Debug)]
pub enum StagingEvent {
    /// A pack was looked for.
    Opened {
        /// The version.
        content: ContentId,
        /// Its chunks, `None` if not staged, or why it could not be opened.
        opened: Result<Option<Vec<ChunkHash>>, String>,
    },
    /// A chunk was read.
    Chunk {
        /// The fetch's request id.
        request: u64,
        /// The chunk.
        chunk: ChunkHash,
        /// Its bytes, or why not.
        read: Result<Vec<u8>, String>,
    },
    /// A version was uploaded.
    Uploaded {
        /// The version.
        content: ContentId,
        /// For which region.
        region: String,
        /// Bytes uploaded, or why not.
        uploaded: Result<u64, String>,
    },
}

impl StagingEvent {
    /// Hands the result to the core.
    pub fn deliver(self, site: &mut Site, now_ms: u64) {
        match self {
            StagingEvent::Opened { content, opened } => site.handle_stage_opened(now_ms, content, opened),
            StagingEvent::Chunk { request, chunk, read } => {
                site.handle_stage_chunk(now_ms, request, chunk, read)
            }
            StagingEvent::Uploaded { content, region, uploaded } => {
                site.handle_stage_uploaded(now_ms, content, region, uploaded)
            }
        }
    }
}

/// Runs staging outputs; without a bucket configured, every output fails with that reason.
#[derive(Clone)]
pub struct StagingDriver {
    staging: Option<Staging>,
    /// Packs opened, by name, for the reads of their chunks.
    packs: Arc<Mutex<HashMap<Vec<u8>, StagedPack>>>,
    chunks: Arc<ChunkStore>,
    events: mpsc::UnboundedSender<StagingEvent>,
    runtime: tokio::runtime::Handle,
}

fn reported(what: &str, e: StagingError) -> String {
    tracing::warn!("staging: {what}: {e}");
    e.to_string()
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
            let why = "no staging bucket is configured at this site".to_owned();
            return match output {
                Output::StageOpen { content, .. } => {
                    self.send(StagingEvent::Opened { content, opened: Err(why) })
                }
                Output::StageRead { request, chunk, .. } => {
                    self.send(StagingEvent::Chunk { request, chunk, read: Err(why) })
                }
                Output::StageUpload { content, region, .. } => {
                    self.send(StagingEvent::Uploaded { content, region, uploaded: Err(why) })
                }
                _ => {}
            };
        };
        let this = self.clone();
        match output {
            Output::StageOpen { content, name } => {
                self.runtime.spawn(async move {
                    let opened = match staging.open(&name).await {
                        Ok(Some(pack)) => {
                            let chunks = pack.entries.iter().map(|e| ChunkHash(e.hash)).collect();
                            this.packs.lock().expect("packs lock").insert(name, pack);
                            Ok(Some(chunks))
                        }
                        Ok(None) => Ok(None),
                        Err(e) => Err(reported("opening a pack", e)),
                    };
                    this.send(StagingEvent::Opened { content, opened });
                });
            }
            Output::StageRead { request, name, chunk, index } => {
                self.runtime.spawn(async move {
                    let pack = this.packs.lock().expect("packs lock").get(&name).cloned();
                    let read = match pack {
                        Some(pack) => staging.read_chunk(&pack, index as usize).await,
                        None => match staging.open(&name).await {
                            Ok(Some(pack)) => staging.read_chunk(&pack, index as usize).await,
                            Ok(None) => Err(StagingError::Missing { key: staging.key_of(&name) }),
                            Err(e) => Err(e),
                        },
                    };
                    let read = read.map_err(|e| reported("reading a chunk", e));
                    this.send(StagingEvent::Chunk { request, chunk, read });
                });
            }
            Output::StageUpload { content, region, name, manifest } => {
                self.runtime.spawn(async move {
                    let specs: Vec<_> = manifest.chunks.iter().map(|c| (c.hash.0, c.len)).collect();
                    let chunks = this.chunks.clone();
                    // A disk read per chunk: the runtime's other tasks go on meanwhile.
                    let mut load = |i: usize| {
                        tokio::task::block_in_place(|| chunks.get(&manifest.chunks[i].hash))
                            .map_err(|e| e.to_string())
                    };
                    // Once per version and region pair: a pack already there (asked for by two
                    // readers at once, or staged before a restart) is not uploaded again.
                    if let Ok(Some(_)) = staging.open(&name).await {
                        return this.send(StagingEvent::Uploaded { content, region, uploaded: Ok(0) });
                    }
                    let started = std::time::Instant::now();
                    let uploaded = match staging.upload(&name, &specs, &mut load).await {
                        Ok(pack) => {
                            let ms = started.elapsed().as_millis() as u64;
                            tracing::info!(version = %content, region = %region, bytes = pack.size, ms, "staged");
                            Ok(pack.size)
                        }
                        Err(e) => Err(reported("uploading a version", e)),
                    };
                    this.send(StagingEvent::Uploaded { content, region, uploaded });
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

//! Sim: deterministic simulation of a meridian mesh.
//!
//! Many `site_core::Site` cores — the code production runs — live in one process on a simulated
//! network, disk and clock, all driven by one seed. Faults (dropped, duplicated, reordered, held
//! and corrupted messages, partitions, crashes that lose unsynced writes and tear files, clock
//! skew and jumps) are injected during a fault phase; then everything heals and the mesh must
//! converge. Checkers outside the code under test watch it: the tree invariant at every site
//! after every step, every completed read returns the bytes of a version of that file, no chunk
//! with a wrong hash is ever stored, and after healing every site shows the same namespace,
//! every live file is readable everywhere and no acknowledged write is lost.
//! Models: TigerBeetle's VOPR, FoundationDB's simulation.

pub mod rng;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};

use crdt_namespace::{ContentId, EntryKind, Namespace, SiteId};
use proto::{FetchId, Message, Region};
use site_core::content::{ChunkHash, ChunkRef, ChunkerConfig, Manifest};
use site_core::{
    BucketError, Output, PackName, Reply, Request, RequestId, Site, SiteConfig, StagingEvent, Transfer,
};

pub use rng::Rng;

/// Small chunks, so that small simulated files still have many.
const CHUNKS: ChunkerConfig = ChunkerConfig { min_bytes: 256, avg_bytes: 1024, max_bytes: 4096 };
/// Simulated milliseconds between timeouts of a site.
const TICK_MS: u64 = 200;
/// Simulated milliseconds between two client operations of the workload.
const OP_INTERVAL_MS: u64 = 40;
/// After healing, the mesh must converge within this much simulated time.
const LIVENESS_MS: u64 = 300_000;
/// A simulation that processes more events than this has run away.
const EVENTS_MAX: u64 = 5_000_000;

const DIRS: [&str; 6] = ["/a", "/b", "/a/c", "/b/d", "/a/c/e", "/shots"];
const NAMES: [&str; 4] = ["f1", "f2", "shot.clip", "c"];
const SITE_NAMES: [&str; 6] = ["ams", "bos", "cdg", "dub", "ewr", "fra"];

/// Fault rates.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Probability that a message is dropped.
    pub drop: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Extra random delay (reordering), in milliseconds.
    pub jitter_ms: u64,
    /// Probability per fault step that a partition is made or healed.
    pub partition: f64,
    /// Probability per fault step that a link starts or stops holding its messages.
    pub hold: f64,
    /// Probability per fault step that a link drops and is back a moment later (as when two
    /// sites dial each other at once and the duplicate connection is closed).
    pub reset: f64,
    /// Probability per fault step that a site crashes (and restarts later).
    pub crash: f64,
    /// Probability per fault step that a site's clock jumps.
    pub clock: f64,
    /// Probability that a chunk in flight is corrupted.
    pub corrupt: f64,
    /// Probability that a request to the staging bucket misbehaves: answered late (503
    /// SlowDown, retried), timed out, or — for a chunk read — finds its pack lost or corrupt.
    pub staging: f64,
}

impl Faults {
    /// All faults at the given rates' defaults, restricted to the names in `list`
    /// (`drop,duplicate,jitter,partition,hold,reset,crash,clock,corrupt,staging`, or `none`, or
    /// `all`).
    pub fn parse(list: &str) -> Result<Faults, String> {
        let all = Faults {
            drop: 0.02,
            duplicate: 0.02,
            jitter_ms: 40,
            partition: 0.05,
            hold: 0.03,
            reset: 0.5,
            crash: 0.02,
            clock: 0.03,
            corrupt: 0.01,
            staging: 0.05,
        };
        let mut f = Faults::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "none" => {}
                "all" => f = all,
                "drop" => f.drop = all.drop,
                "duplicate" => f.duplicate = all.duplicate,
                "jitter" => f.jitter_ms = all.jitter_ms,
                "partition" => f.partition = all.partition,
                "hold" => f.hold = all.hold,
                "reset" => f.reset = all.reset,
                "crash" => f.crash = all.crash,
                "clock" => f.clock = all.clock,
                "corrupt" => f.corrupt = all.corrupt,
                "staging" => f.staging = all.staging,
                other => return Err(format!("unknown fault {other:?}")),
            }
        }
        Ok(f)
    }

    /// Swarm testing: each seed picks its own mix, some faults off.
    fn swarm(rng: &mut Rng) -> Faults {
        let on = |rng: &mut Rng, rate: f64| {
            if rng.chance(0.6) { rate * (0.5 + rng.below(100) as f64 / 100.0) } else { 0.0 }
        };
        Faults {
            drop: on(rng, 0.03),
            duplicate: on(rng, 0.03),
            jitter_ms: if rng.chance(0.6) { rng.below(80) } else { 0 },
            partition: on(rng, 0.06),
            hold: on(rng, 0.04),
            crash: on(rng, 0.03),
            clock: on(rng, 0.04),
            corrupt: on(rng, 0.02),
            staging: on(rng, 0.08),
            reset: on(rng, 0.5),
        }
    }
}

/// What a run may override; everything else the seed picks.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Number of sites (2–6 by default).
    pub sites: Option<usize>,
    /// Number of client operations in the fault phase.
    pub ops: Option<usize>,
    /// Fault rates.
    pub faults: Option<Faults>,
}

/// A successful run.
#[derive(Clone, Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Sites simulated.
    pub sites: usize,
    /// Client operations issued.
    pub ops: usize,
    /// Events processed.
    pub events: u64,
    /// Bytes the sites read from the staging bucket (zero for seeds with one region).
    pub bytes_from_staging: u64,
    /// Hash of the whole event trace.
    pub trace: [u8; 32],
}

/// A failed run: what a checker saw (or what panicked).
#[derive(Clone, Debug)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// What went wrong.
    pub message: String,
}

/// Runs one simulation. Panics in the code under test are failures too.
pub fn run(seed: u64, options: &Options) -> Result<Report, Failure> {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| World::new(seed, options).run()));
    match outcome {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(message)) => Err(Failure { seed, message }),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Err(Failure { seed, message: format!("panic: {message}") })
        }
    }
}

/// A simulated disk: chunk files (durable once synced) and committed database records.
#[derive(Default, Clone)]
struct Disk {
    chunk_files: HashMap<ChunkHash, Vec<u8>>,
    unsynced_chunks: BTreeSet<ChunkHash>,
    namespace: Vec<Vec<u8>>,
    versions: Vec<Manifest>,
    index: HashSet<ChunkHash>,
    /// Records written but not yet committed.
    pending: Vec<(Vec<ChunkRef>, Vec<Manifest>, Vec<u8>)>,
}

struct SimSite {
    name: SiteId,
    config: SiteConfig,
    core: Option<Site>,
    disk: Disk,
    skew_ms: i64,
}

enum Event {
    Deliver {
        from: usize,
        to: usize,
        bytes: Vec<u8>,
    },
    Tick {
        site: usize,
    },
    Op,
    Fault,
    Restart {
        site: usize,
    },
    Reconnect {
        a: usize,
        b: usize,
    },
    /// A request of `site` to the staging bucket arrives there.
    Staging {
        site: usize,
        op: BucketOp,
    },
}

/// A request to the simulated staging bucket.
enum BucketOp {
    Open { name: PackName },
    Read { request: FetchId, name: PackName, chunk: ChunkHash, index: u32 },
    Upload { name: PackName, pack: Vec<(ChunkHash, Vec<u8>)> },
}

#[derive(Default)]
struct ReadState {
    path: String,
    size: u64,
    range: std::ops::Range<u64>,
    data: Vec<u8>,
}

struct World {
    seed: u64,
    rng: Rng,
    now: u64,
    faults: Faults,
    healed: bool,
    sites: Vec<SimSite>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    next_event: u64,
    processed: u64,
    trace: blake3::Hasher,
    /// Links that are up (both directions), by ordered pair.
    up: BTreeSet<(usize, usize)>,
    partitioned: BTreeSet<(usize, usize)>,
    held: BTreeMap<(usize, usize), Vec<Vec<u8>>>,
    ops_left: usize,
    ops_total: usize,
    next_request: u64,
    requests: HashMap<u64, (usize, Pending)>,
    reads: HashMap<u64, ReadState>,
    /// Bytes of every version ever written.
    contents: HashMap<ContentId, Vec<u8>>,
    /// Reads that ended in an error, with it.
    failed_reads: HashMap<u64, String>,
    /// The staging bucket: packs by name (sites of several regions share it).
    bucket: HashMap<PackName, Vec<(ChunkHash, Vec<u8>)>>,
    /// Versions whose write was acknowledged.
    acknowledged: BTreeSet<ContentId>,
    /// Versions a later write at the same site replaced, or a remove had seen.
    discarded: BTreeSet<ContentId>,
}

enum Pending {
    Write { content: ContentId, replaced: Option<ContentId> },
    Remove { seen: Vec<ContentId> },
    Read,
    Other,
}

fn key(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl World {
    fn new(seed: u64, options: &Options) -> World {
        let mut rng = Rng::new(seed);
        let n = options.sites.unwrap_or_else(|| 2 + rng.index(5)).clamp(1, SITE_NAMES.len());
        let ops = options.ops.unwrap_or_else(|| 40 + rng.index(160));
        let faults = options.faults.unwrap_or_else(|| Faults::swarm(&mut rng));
        // Half the seeds split the sites into two regions joined by the staging bucket.
        let regions = if n >= 2 && rng.chance(0.5) { 2 } else { 1 };
        let transfer = if rng.chance(0.25) { Transfer::Staged } else { Transfer::Auto };
        let names: Vec<SiteId> =
            (0..n).map(|i| SiteId::new(SITE_NAMES[i]).expect("valid site names")).collect();
        let region_of = |i: usize| Region::new(format!("r{}", i % regions)).expect("a valid region");
        let configs: Vec<SiteConfig> = (0..n)
            .map(|i| {
                let mut config = SiteConfig::new(names[i].clone());
                config.region = region_of(i);
                config.regions =
                    (0..n).filter(|j| *j != i).map(|j| (names[j].clone(), region_of(j))).collect();
                config.staging = (regions > 1).then_some(transfer);
                config
            })
            .collect();
        let sites = (0..n)
            .map(|i| {
                let name = names[i].clone();
                let skew_ms = rng.below(2_000) as i64 - 1_000;
                let core =
                    Site::new(configs[i].clone(), Namespace::new(name.clone()), Vec::new(), HashSet::new());
                SimSite { name, config: configs[i].clone(), core: Some(core), disk: Disk::default(), skew_ms }
            })
            .collect();
        let mut world = World {
            seed,
            rng,
            now: 1_700_000_000_000,
            faults,
            healed: false,
            sites,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_event: 0,
            processed: 0,
            trace: blake3::Hasher::new(),
            up: BTreeSet::new(),
            partitioned: BTreeSet::new(),
            held: BTreeMap::new(),
            ops_left: ops,
            ops_total: ops,
            next_request: 1,
            requests: HashMap::new(),
            reads: HashMap::new(),
            contents: HashMap::new(),
            bucket: HashMap::new(),
            failed_reads: HashMap::new(),
            acknowledged: BTreeSet::new(),
            discarded: BTreeSet::new(),
        };
        for s in 0..n {
            let at = world.now + world.rng.below(TICK_MS);
            world.schedule(at, Event::Tick { site: s });
        }
        for a in 0..n {
            for b in a + 1..n {
                world.connect(a, b);
            }
        }
        world.schedule(world.now + 1, Event::Op);
        world.schedule(world.now + 5, Event::Fault);
        world
    }

    fn schedule(&mut self, at: u64, event: Event) {
        let seq = self.next_event;
        self.next_event += 1;
        self.events.insert(seq, event);
        self.queue.push(Reverse((at, seq)));
    }

    fn site_now(&self, s: usize) -> u64 {
        (self.now as i64 + self.sites[s].skew_ms).max(0) as u64
    }

    fn connect(&mut self, a: usize, b: usize) {
        if self.sites[a].core.is_none() || self.sites[b].core.is_none() || !self.up.insert(key(a, b)) {
            return;
        }
        let (na, nb) = (self.sites[a].name.clone(), self.sites[b].name.clone());
        let (ta, tb) = (self.now, self.now);
        self.sites[a].core.as_mut().expect("up").handle_peer_up(ta, nb);
        self.sites[b].core.as_mut().expect("up").handle_peer_up(tb, na);
        self.drain(a);
        self.drain(b);
    }

    fn disconnect(&mut self, a: usize, b: usize) {
        if !self.up.remove(&key(a, b)) {
            return;
        }
        for (me, other) in [(a, b), (b, a)] {
            let name = self.sites[other].name.clone();
            let t = self.now;
            if let Some(core) = self.sites[me].core.as_mut() {
                core.handle_peer_down(t, &name);
            }
            self.drain(me);
        }
    }

    // ---------------------------------------------------------------------------------------
    // Running

    fn run(mut self) -> Result<Report, String> {
        let mut heal_at = None;
        while let Some(Reverse((at, seq))) = self.queue.pop() {
            self.processed += 1;
            if self.processed > EVENTS_MAX {
                return Err(format!("more than {EVENTS_MAX} events: the simulation ran away"));
            }
            self.now = self.now.max(at);
            let event = self.events.remove(&seq).expect("scheduled");
            self.step(event)?;
            if self.ops_left == 0 && !self.healed && self.requests.is_empty() {
                self.heal();
                heal_at = Some(self.now);
            }
            if let Some(start) = heal_at {
                if self.converged() {
                    break;
                }
                if self.now > start + LIVENESS_MS {
                    return Err(format!("no convergence {} s after healing", LIVENESS_MS / 1000));
                }
            }
        }
        self.check_liveness()?;
        self.check_staging_settles()?;
        Ok(Report {
            seed: self.seed,
            sites: self.sites.len(),
            ops: self.ops_total,
            events: self.processed,
            bytes_from_staging: self
                .sites
                .iter_mut()
                .filter_map(|s| s.core.as_mut())
                .map(|c| c.status().bytes_from_staging)
                .sum(),
            trace: *self.trace.finalize().as_bytes(),
        })
    }

    fn step(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::Deliver { from, to, bytes } => {
                self.trace.update(&[0]);
                self.trace.update(&self.now.to_le_bytes());
                self.trace.update(&[from as u8, to as u8]);
                self.trace.update(blake3::hash(&bytes).as_bytes());
                if !self.up.contains(&key(from, to)) || self.sites[to].core.is_none() {
                    return Ok(());
                }
                let message =
                    Message::decode(&bytes).map_err(|e| format!("undecodable message in flight: {e}"))?;
                if matches!(message, Message::Chunk { .. })
                    && self.sites[from].config.region != self.sites[to].config.region
                {
                    self.check_regions_use_the_bucket(from, to)?;
                }
                let name = self.sites[from].name.clone();
                let t = self.now;
                self.sites[to].core.as_mut().expect("up").handle_message(t, &name, message);
                self.drain(to);
                self.check_site(to)?;
            }
            Event::Tick { site } => {
                self.trace.update(&[1, site as u8]);
                let t = self.now;
                if let Some(core) = self.sites[site].core.as_mut() {
                    core.handle_timeout(t);
                    self.drain(site);
                    self.commit(site);
                    self.check_site(site)?;
                }
                self.schedule(self.now + TICK_MS, Event::Tick { site });
            }
            Event::Op => {
                if self.ops_left > 0 {
                    self.ops_left -= 1;
                    self.client_op()?;
                    let at = self.now + 1 + self.rng.below(2 * OP_INTERVAL_MS);
                    self.schedule(at, Event::Op);
                }
            }
            Event::Fault => {
                if !self.healed {
                    self.fault();
                    let at = self.now + 100 + self.rng.below(400);
                    self.schedule(at, Event::Fault);
                }
            }
            Event::Restart { site } => {
                self.trace.update(&[2, site as u8]);
                self.restart(site)?;
            }
            Event::Reconnect { a, b } => {
                if !self.partitioned.contains(&key(a, b)) {
                    self.connect(a, b);
                }
            }
            Event::Staging { site, op } => {
                self.trace.update(&[5, site as u8]);
                let event = self.bucket_op(op);
                let t = self.now;
                if let Some(core) = self.sites[site].core.as_mut() {
                    event.deliver(core, t);
                    self.drain(site);
                    self.check_site(site)?;
                }
            }
        }
        Ok(())
    }

    /// Sends a request to the bucket: it arrives after a few milliseconds, or much later when
    /// the bucket said "slow down" and the client retried.
    fn send_to_bucket(&mut self, site: usize, op: BucketOp) {
        let mut at = self.now + 5 + self.rng.below(45);
        if !self.healed && self.rng.chance(self.faults.staging) {
            at += 200 + self.rng.below(800);
        }
        self.schedule(at, Event::Staging { site, op });
    }

    /// Carries out a request at the bucket, with the faults it may meet there.
    fn bucket_op(&mut self, op: BucketOp) -> StagingEvent {
        let fault = !self.healed && self.rng.chance(self.faults.staging);
        let timed_out = "the bucket timed out";
        match op {
            BucketOp::Open { name } => {
                let opened = if fault {
                    Err(BucketError::failed(timed_out))
                } else {
                    Ok(self.bucket.get(&name).map(|pack| pack.iter().map(|(h, _)| *h).collect()))
                };
                StagingEvent::Opened { name, opened }
            }
            BucketOp::Read { request, name, chunk, index } => {
                // A fault is one of: the request times out, the object is lost (or was swept)
                // before this read, or its bytes come back altered.
                let kind = if fault { 1 + self.rng.below(3) } else { 0 };
                if kind == 2 {
                    self.bucket.remove(&name);
                }
                let read = match self.bucket.get(&name).and_then(|pack| pack.get(index as usize)) {
                    _ if kind == 1 => Err(BucketError::failed(timed_out)),
                    None => Err(BucketError::spoiled("the staged object is gone")),
                    Some((_, data)) if kind == 3 => {
                        let mut data = data.clone();
                        if let Some(first) = data.first_mut() {
                            *first ^= 1;
                        }
                        Ok(data)
                    }
                    Some((_, data)) => Ok(data.clone()),
                };
                StagingEvent::Chunk { request, chunk, read }
            }
            BucketOp::Upload { name, pack } => {
                let uploaded = if fault {
                    Err(timed_out.to_string())
                } else {
                    let bytes = pack.iter().map(|(_, d)| d.len() as u64).sum();
                    self.bucket.insert(name.clone(), pack);
                    Ok(bytes)
                };
                StagingEvent::Uploaded { name, uploaded }
            }
        }
    }

    /// Carries out a site's outputs.
    fn drain(&mut self, s: usize) {
        while let Some(output) = self.sites[s].core.as_mut().and_then(Site::poll_output) {
            self.execute(s, output);
        }
    }

    /// Carries out one output of site `s`.
    fn execute(&mut self, s: usize, output: Output) {
        match output {
            Output::Send { to, message } => {
                let to = self.sites.iter().position(|x| x.name == to).expect("a known site");
                self.send(s, to, message);
            }
            Output::Broadcast { to, message } => {
                for to in to {
                    let to = self.sites.iter().position(|x| x.name == to).expect("a known site");
                    self.send(s, to, message.clone());
                }
            }
            Output::Durable { store, then } => {
                // Made durable with the next commit, which comes before anything waits for it.
                self.sites[s].disk.pending.push((store.index, store.versions, store.namespace));
                if !then.is_empty() {
                    self.commit(s);
                    for output in then {
                        self.execute(s, output);
                    }
                }
            }
            Output::Cache { chunks, versions } => {
                // Made durable with the next commit, or lost in a crash before it.
                let mut refs = Vec::new();
                for (hash, data) in chunks {
                    if ChunkHash::of(&data) != hash {
                        panic!(
                            "checker: {} stored chunk {hash} whose bytes do not match it",
                            self.sites[s].name
                        );
                    }
                    refs.push(ChunkRef { hash, len: data.len() as u32 });
                    let disk = &mut self.sites[s].disk;
                    disk.unsynced_chunks.insert(hash);
                    disk.chunk_files.insert(hash, data);
                }
                self.sites[s].disk.pending.push((refs, versions, Vec::new()));
            }
            Output::LoadChunk { hash, purpose } => {
                let disk = &self.sites[s].disk;
                let loaded = match disk.chunk_files.get(&hash) {
                    Some(data) if ChunkHash::of(data) == hash => Ok(data.clone()),
                    Some(_) => Err("corrupt".to_string()),
                    None => Err("missing".to_string()),
                };
                self.sites[s].core.as_mut().expect("up").handle_chunk_loaded(hash, purpose, loaded);
            }
            Output::Reply { id: RequestId(id), reply } => self.on_reply(s, id, reply),
            Output::ReadData { id: RequestId(id), offset, data } => {
                if let Some(read) = self.reads.get_mut(&id) {
                    if offset != read.range.start + read.data.len() as u64 {
                        panic!("checker: read {id} at {} got bytes at {offset} out of order", read.path);
                    }
                    read.data.extend_from_slice(&data);
                }
            }
            Output::ReadDone { id: RequestId(id), result } => {
                self.requests.remove(&id);
                match (self.reads.remove(&id), result) {
                    (Some(read), Ok(())) => self.check_read(s, &read),
                    (_, Err(e)) => {
                        self.failed_reads.insert(id, e.to_string());
                    }
                    (None, Ok(())) => {}
                }
            }
            Output::StageOpen { name } => self.send_to_bucket(s, BucketOp::Open { name }),
            Output::StageRead { request, name, chunk, index } => {
                self.send_to_bucket(s, BucketOp::Read { request, name, chunk, index })
            }
            Output::StageUpload { name, chunks, .. } => {
                let disk = &self.sites[s].disk;
                let mut pack = Vec::new();
                for c in &chunks {
                    match disk.chunk_files.get(&c.hash) {
                        Some(data) => pack.push((c.hash, data.clone())),
                        None => panic!(
                            "checker: {} was asked to upload a version it does not hold",
                            self.sites[s].name
                        ),
                    }
                }
                self.send_to_bucket(s, BucketOp::Upload { name, pack });
            }
            Output::StageDelete { name } => {
                self.bucket.remove(&name);
            }
            Output::Disconnect { peer, .. } => {
                let p = self.sites.iter().position(|x| x.name == peer).expect("a known site");
                self.disconnect(s, p);
                let at = self.now + 500 + self.rng.below(2_000);
                self.schedule(at, Event::Reconnect { a: s, b: p });
            }
        }
    }

    /// Makes a site's pending writes durable, as the runtime does before acknowledging.
    fn commit(&mut self, s: usize) {
        let disk = &mut self.sites[s].disk;
        disk.unsynced_chunks.clear();
        for (refs, versions, namespace) in std::mem::take(&mut disk.pending) {
            disk.index.extend(refs.iter().map(|r| r.hash));
            disk.versions.extend(versions);
            if !namespace.is_empty() {
                disk.namespace.push(namespace);
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, message: Message) {
        let mut bytes = message.encode();
        if !self.up.contains(&key(from, to)) {
            return;
        }
        let f = if self.healed { Faults::default() } else { self.faults };
        if self.rng.chance(f.drop) {
            return;
        }
        if let Message::Chunk { request, chunk, mut data } = message
            && !data.is_empty()
            && self.rng.chance(f.corrupt)
        {
            let at = self.rng.index(data.len());
            data[at] ^= 0x5a;
            bytes = Message::Chunk { request, chunk, data }.encode();
        }
        if let Some(held) = self.held.get_mut(&(from, to)) {
            held.push(bytes);
            return;
        }
        let copies = if self.rng.chance(f.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let at = self.now
                + 1
                + self.rng.below(5)
                + if f.jitter_ms > 0 { self.rng.below(f.jitter_ms) } else { 0 };
            self.schedule(at, Event::Deliver { from, to, bytes: bytes.clone() });
        }
    }

    // ---------------------------------------------------------------------------------------
    // Faults

    fn fault(&mut self) {
        let n = self.sites.len();
        let f = self.faults;
        if n >= 2 && self.rng.chance(f.partition) {
            let (a, b) = (self.rng.index(n), self.rng.index(n));
            if a != b {
                let k = key(a, b);
                if self.partitioned.remove(&k) {
                    self.connect(a, b);
                } else {
                    self.partitioned.insert(k);
                    self.disconnect(a, b);
                }
            }
        }
        if n >= 2 && self.rng.chance(f.hold) {
            let (a, b) = (self.rng.index(n), self.rng.index(n));
            if a != b {
                match self.held.remove(&(a, b)) {
                    Some(held) => {
                        for bytes in held {
                            let at = self.now + 1 + self.rng.below(20);
                            self.schedule(at, Event::Deliver { from: a, to: b, bytes });
                        }
                    }
                    None => {
                        self.held.insert((a, b), Vec::new());
                    }
                }
            }
        }
        if n >= 2 && self.rng.chance(f.reset) {
            let (a, b) = (self.rng.index(n), self.rng.index(n));
            if a != b && self.up.contains(&key(a, b)) {
                self.disconnect(a, b);
                let at = self.now + 1 + self.rng.below(50);
                self.schedule(at, Event::Reconnect { a, b });
            }
        }
        if self.rng.chance(f.crash) {
            let s = self.rng.index(n);
            if self.sites[s].core.is_some() {
                self.crash(s);
                let at = self.now + 500 + self.rng.below(5_000);
                self.schedule(at, Event::Restart { site: s });
            }
        }
        if self.rng.chance(f.clock) {
            let s = self.rng.index(n);
            self.sites[s].skew_ms += self.rng.below(20_000) as i64 - 10_000;
        }
    }

    /// Kills a site: what it had not synced is lost, and an unsynced chunk file may be torn.
    fn crash(&mut self, s: usize) {
        self.trace.update(&[3, s as u8]);
        self.debug(format_args!("crash {}", self.sites[s].name));
        for other in 0..self.sites.len() {
            if other != s {
                self.disconnect(s, other);
            }
        }
        let disk = &mut self.sites[s].disk;
        disk.pending.clear();
        let unsynced: Vec<ChunkHash> = std::mem::take(&mut disk.unsynced_chunks).into_iter().collect();
        for (i, hash) in unsynced.iter().enumerate() {
            if i + 1 == unsynced.len() && self.rng.chance(0.5) {
                let file = disk.chunk_files.get_mut(hash).expect("written");
                let keep = self.rng.index(file.len().max(1));
                file.truncate(keep);
            } else if self.rng.chance(0.5) {
                disk.chunk_files.remove(hash);
            }
        }
        self.sites[s].core = None;
        // Requests in flight at the crashed site get no answer.
        self.requests.retain(|_, (site, _)| *site != s);
        self.reads.retain(|id, _| self.requests.contains_key(id));
    }

    /// Restarts a crashed site from its disk, as `runtime::open` does.
    fn restart(&mut self, s: usize) -> Result<(), String> {
        if self.sites[s].core.is_some() {
            return Ok(());
        }
        let site = &mut self.sites[s];
        let disk = &mut site.disk;
        // Recovery: chunk files no commit recorded are removed.
        disk.chunk_files.retain(|h, _| disk.index.contains(h));
        let saved: Vec<u8> = disk.namespace.concat();
        let ns = if saved.is_empty() {
            Namespace::new(site.name.clone())
        } else {
            Namespace::load(site.name.clone(), &saved)
                .map_err(|e| format!("{} cannot load its namespace: {e}", site.name))?
        };
        let chunks: HashSet<ChunkHash> =
            disk.index.iter().copied().filter(|h| disk.chunk_files.contains_key(h)).collect();
        let versions = disk
            .versions
            .iter()
            .filter(|m| m.chunks.iter().all(|c| chunks.contains(&c.hash)))
            .cloned()
            .collect();
        site.core = Some(Site::new(site.config.clone(), ns, versions, chunks));
        self.check_site(s)?;
        for other in 0..self.sites.len() {
            if other != s && !self.partitioned.contains(&key(s, other)) {
                self.connect(s, other);
            }
        }
        Ok(())
    }

    fn heal(&mut self) {
        self.healed = true;
        self.trace.update(&[4]);
        self.partitioned.clear();
        for ((a, b), held) in std::mem::take(&mut self.held) {
            for bytes in held {
                self.schedule(self.now + 1, Event::Deliver { from: a, to: b, bytes });
            }
        }
        for s in 0..self.sites.len() {
            self.sites[s].skew_ms = self.sites[s].skew_ms.clamp(-1_000, 1_000);
            if self.sites[s].core.is_none() {
                let _ = self.restart(s);
            }
        }
        // A fresh connection (and sync session) on every link, as a transport reconnecting.
        let n = self.sites.len();
        for a in 0..n {
            for b in a + 1..n {
                self.disconnect(a, b);
                self.connect(a, b);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Workload

    fn request(&mut self, s: usize, request: Request, pending: Pending) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        self.requests.insert(id, (s, pending));
        let t = self.site_now(s);
        self.sites[s].core.as_mut().expect("up").handle_local(self.now, t, RequestId(id), request);
        id
    }

    fn debug(&self, what: std::fmt::Arguments<'_>) {
        if std::env::var_os("SIM_DEBUG").is_some() {
            eprintln!("[{}] {what}", self.now - 1_700_000_000_000);
        }
    }

    fn client_op(&mut self) -> Result<(), String> {
        let live: Vec<usize> = (0..self.sites.len()).filter(|s| self.sites[*s].core.is_some()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let s = *self.rng.pick(&live);
        let dir = *self.rng.pick(&DIRS);
        let path = format!("{dir}/{}", self.rng.pick(&NAMES));
        self.trace.update(&[5, s as u8]);
        self.trace.update(path.as_bytes());
        self.debug(format_args!("op at {} on {path} / {dir}", self.sites[s].name));
        match self.rng.below(100) {
            0..=14 => {
                let _ = self.request(
                    s,
                    Request::Mkdir { path: dir.into(), parents: true, mode: 0o755 },
                    Pending::Other,
                );
            }
            15..=49 => self.put(s, &path),
            50..=64 => {
                let to_dir = *self.rng.pick(&DIRS);
                let to = format!("{to_dir}/{}", self.rng.pick(&NAMES));
                let from = if self.rng.chance(0.5) { dir.to_string() } else { path };
                self.debug(format_args!("rename {from} -> {to} at {}", self.sites[s].name));
                let _ = self.request(s, Request::Rename { from, to }, Pending::Other);
            }
            65..=74 => {
                let target = if self.rng.chance(0.5) { dir.to_string() } else { path };
                let seen = self.versions_below(s, &target);
                self.debug(format_args!("remove {target} at {}", self.sites[s].name));
                if std::env::var_os("SIM_DEBUG").is_some() {
                    let ns = self.sites[s].core.as_ref().expect("up").namespace();
                    for e in ns.walk("/").unwrap_or_default() {
                        eprintln!(
                            "    {} {:?} {} {:?}",
                            &e.stat.id[..8],
                            e.stat.kind,
                            e.path,
                            e.stat.version.map(|v| v.content)
                        );
                    }
                }
                let _ = self.request(
                    s,
                    Request::Remove { path: target, recursive: true },
                    Pending::Remove { seen },
                );
            }
            75..=79 => {
                let value = format!("v{}", self.rng.below(3));
                let _ = self.request(
                    s,
                    Request::SetTag { path: dir.into(), key: "stage".into(), value },
                    Pending::Other,
                );
            }
            _ => {
                let range = if self.rng.chance(0.5) {
                    let start = self.rng.below(20_000);
                    Some(start..start + 1 + self.rng.below(20_000))
                } else {
                    None
                };
                let id = self.request(s, Request::Read { path: path.clone(), range }, Pending::Read);
                self.reads.insert(id, ReadState { path, ..ReadState::default() });
            }
        }
        self.drain(s);
        self.check_site(s)
    }

    fn versions_below(&self, s: usize, path: &str) -> Vec<ContentId> {
        let ns = self.sites[s].core.as_ref().expect("up").namespace();
        ns.walk(path)
            .map(|w| w.iter().filter_map(|e| e.stat.version.as_ref().map(|v| v.content)).collect())
            .unwrap_or_default()
    }

    /// Writes a new version: a fresh file, or an edit of part of the current one.
    fn put(&mut self, s: usize, path: &str) {
        let ns = self.sites[s].core.as_ref().expect("up").namespace();
        let current = ns.stat(path).ok().and_then(|st| st.version).map(|v| v.content);
        let mut data = match current.and_then(|c| self.contents.get(&c)) {
            Some(old) if self.rng.chance(0.6) && !old.is_empty() => {
                let mut data = old.clone();
                let at = self.rng.index(data.len());
                let len = (1 + self.rng.index(2_000)).min(data.len() - at);
                let patch = self.rng.bytes(len);
                data[at..at + len].copy_from_slice(&patch);
                data
            }
            _ => {
                let len = if self.rng.chance(0.2) {
                    20_000 + self.rng.index(60_000)
                } else {
                    self.rng.index(6_000)
                };
                self.rng.bytes(len)
            }
        };
        // A marker keeps every version distinct, so that reads identify what they got.
        data.extend_from_slice(&self.next_request.to_le_bytes());
        let manifest = Manifest::of_bytes(&data, CHUNKS);
        let content = manifest.content_id();
        // The put path makes the chunks durable before the core commits the version.
        let disk = &mut self.sites[s].disk;
        for (i, c) in manifest.chunks.iter().enumerate() {
            let r = manifest.chunk_range(i);
            disk.chunk_files.entry(c.hash).or_insert_with(|| data[r.start as usize..r.end as usize].to_vec());
        }
        self.contents.insert(content, data);
        let request = Request::CommitVersion { path: path.into(), manifest, mode: 0o644, mtime_ns: 0 };
        self.debug(format_args!("put {path} at {} -> {content} (replaces {current:?})", self.sites[s].name));
        let _ = self.request(s, request, Pending::Write { content, replaced: current });
    }

    fn on_reply(&mut self, s: usize, id: u64, reply: Result<Reply, site_core::SiteError>) {
        if let Ok(Reply::ReadStarted { size, range }) = &reply {
            if let Some(read) = self.reads.get_mut(&id) {
                read.size = *size;
                read.range = range.clone();
            }
            return;
        }
        let Some((_, pending)) = self.requests.remove(&id) else { return };
        self.reads.remove(&id);
        self.debug(format_args!(
            "reply {id} at {}: {:?}",
            self.sites[s].name,
            reply.as_ref().map(|_| ()).map_err(|e| e.to_string())
        ));
        match (pending, reply) {
            (Pending::Write { content, replaced }, Ok(Reply::Done)) => {
                self.acknowledged.insert(content);
                self.discarded.extend(replaced);
            }
            (Pending::Remove { seen }, Ok(Reply::Done)) => {
                self.debug(format_args!("remove at {} discards {seen:?}", self.sites[s].name));
                self.discarded.extend(seen)
            }
            _ => {}
        }
    }

    // ---------------------------------------------------------------------------------------
    // Checkers

    fn check_site(&self, s: usize) -> Result<(), String> {
        if let Some(core) = &self.sites[s].core {
            core.namespace()
                .check_invariants()
                .map_err(|e| format!("tree invariant broken at {}: {e}", self.sites[s].name))?;
            core.check_invariants()
                .map_err(|e| format!("site invariant broken at {}: {e}", self.sites[s].name))?;
        }
        Ok(())
    }

    fn check_read(&self, s: usize, read: &ReadState) {
        let ok = self.contents.values().any(|v| {
            v.len() as u64 == read.size
                && v.get(read.range.start as usize..read.range.end as usize) == Some(&read.data[..])
        });
        if !ok {
            panic!(
                "checker: a read of {} at {} returned {} bytes that are no version of it",
                read.path,
                self.sites[s].name,
                read.data.len()
            );
        }
    }

    fn converged(&mut self) -> bool {
        if !self.requests.is_empty() || self.sites.iter().any(|s| s.core.is_none()) {
            return false;
        }
        let first = self.sites[0].core.as_ref().expect("up").namespace().walk("/");
        self.sites[1..].iter().all(|s| s.core.as_ref().expect("up").namespace().walk("/") == first)
            && self
                .queue
                .iter()
                .all(|Reverse((_, seq))| !matches!(self.events.get(seq), Some(Event::Deliver { .. })))
    }

    fn check_liveness(&mut self) -> Result<(), String> {
        let walk =
            self.sites[0].core.as_ref().expect("up").namespace().walk("/").map_err(|e| e.to_string())?;
        // Every acknowledged write is preserved, unless its own site replaced it or removed it.
        let live: BTreeSet<ContentId> =
            walk.iter().filter_map(|e| e.stat.version.as_ref().map(|v| v.content)).collect();
        for content in self.acknowledged.difference(&self.discarded) {
            if !live.contains(content) {
                if std::env::var_os("SIM_DEBUG").is_some() {
                    for e in &walk {
                        eprintln!(
                            "    {} {:?} {} {:?}",
                            &e.stat.id[..8],
                            e.stat.kind,
                            e.path,
                            e.stat.version.as_ref().map(|v| (v.content, v.site.clone(), v.hlc))
                        );
                    }
                }
                return Err(format!("acknowledged version {content} was lost"));
            }
        }
        // Every live file is readable at every site.
        let files: Vec<String> =
            walk.iter().filter(|e| e.stat.kind == EntryKind::File).map(|e| e.path.clone()).collect();
        for s in 0..self.sites.len() {
            for path in &files {
                // A read may fail while a way it needs is still marked failed from the fault
                // phase (a staged pack, for 30 s): it must succeed once that has passed.
                let mut failure = None;
                for _attempt in 0..2 {
                    let id =
                        self.request(s, Request::Read { path: path.clone(), range: None }, Pending::Read);
                    self.reads.insert(id, ReadState { path: path.clone(), ..ReadState::default() });
                    self.drain(s);
                    let deadline = self.now + 60_000;
                    self.run_until(deadline, |w| !w.requests.contains_key(&id))?;
                    if self.requests.contains_key(&id) {
                        return Err(format!(
                            "{path} is not readable at {} after healing",
                            self.sites[s].name
                        ));
                    }
                    failure = self.failed_reads.remove(&id);
                    if failure.is_none() {
                        break;
                    }
                    // 30 s of the site's own time, which may run ahead after clock jumps.
                    let site_now = self.site_now(s);
                    let ahead =
                        self.sites[s].core.as_ref().map_or(0, |c| c.now_ms().saturating_sub(site_now));
                    let later = self.now + ahead + 31_000;
                    self.run_until(later, |_| false)?;
                }
                if let Some(e) = failure {
                    return Err(format!(
                        "{path} cannot be read at {} after healing: {e}",
                        self.sites[s].name
                    ));
                }
            }
        }
        Ok(())
    }

    /// A chunk went from `from` to `to`, of another region. In `staged` mode that never
    /// happens; in `auto` mode only when the bucket failed, or a holder asked to stage did not
    /// answer in time (lost or held messages, a clock jump) — not because links went down and
    /// came back, or sites crashed.
    fn check_regions_use_the_bucket(&self, from: usize, to: usize) -> Result<(), String> {
        let f = &self.faults;
        let may_fall_back = f.staging > 0.0 || f.drop > 0.0 || f.hold > 0.0 || f.clock > 0.0;
        let transfer = self.sites[to].config.staging.unwrap_or(Transfer::Direct);
        match transfer {
            Transfer::Staged => {}
            Transfer::Auto if !may_fall_back => {}
            _ => return Ok(()),
        }
        Err(format!(
            "a chunk went directly from {} to {} across regions ({transfer:?} mode)",
            self.sites[from].name, self.sites[to].name
        ))
    }

    /// A while after the last read, no site still tracks a version read (or read ahead)
    /// through the bucket, nor a pack to read from.
    fn check_staging_settles(&mut self) -> Result<(), String> {
        // 65 s of every site's own time, which may run ahead after clock jumps.
        let ahead = (0..self.sites.len())
            .map(|s| {
                let site_now = self.site_now(s);
                self.sites[s].core.as_ref().map_or(0, |c| c.now_ms().saturating_sub(site_now))
            })
            .max()
            .unwrap_or(0);
        let later = self.now + ahead + 65_000;
        self.run_until(later, |_| false)?;
        for site in &self.sites {
            if let Some(core) = &site.core {
                let (reads, packs) = core.staged_reads();
                if reads + packs > 0 {
                    return Err(format!(
                        "{} still tracks {reads} staged reads and {packs} packs a minute after the last read",
                        site.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// Runs events until `done` holds or the next event is after `deadline`.
    fn run_until(&mut self, deadline: u64, done: impl Fn(&World) -> bool) -> Result<(), String> {
        while !done(self) {
            let Some(Reverse((at, seq))) = self.queue.peek().copied() else { break };
            if at > deadline {
                self.now = self.now.max(deadline);
                break;
            }
            self.queue.pop();
            self.now = self.now.max(at);
            let event = self.events.remove(&seq).expect("scheduled");
            self.step(event)?;
        }
        Ok(())
    }
}

impl Report {
    /// The trace hash in hexadecimal.
    pub fn trace_hex(&self) -> String {
        self.trace.iter().map(|b| format!("{b:02x}")).collect()
    }
}

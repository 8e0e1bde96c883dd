//! The simulated world: `Site` cores with their disks and clocks, the network between them and
//! the staging bucket, in simulated time on one event queue, and the one executor of the cores'
//! outputs.
//!
//! The simulator's random workload and fault driver ([`crate::run`]) and the scenario tests
//! (`sim/tests/scenarios.rs`) both run on it, so they check the same driver code: one network
//! model (links up or down, partitions, held and cut links, a [`Latency`], the per-message
//! faults), one bucket model ([`BucketFault`]) and one executor, which carries out each
//! `Output` as its contract says (a `Durable`'s store, and every `Cache` before it, is durable
//! before its `then` is carried out; a `Cache` alone at the next commit or flush). A site's
//! inputs carry the simulated monotonic time; only its local changes see its own wall clock
//! (the simulated time plus an offset that faults step). When timers run, a site's timeout
//! comes exactly when its [`Site::poll_timeout`] says, and its disk is flushed every
//! [`FLUSH_MS`], as the daemon's housekeeping does. A client takes each piece of a read it is
//! handed at once, or after a pause of seconds (the `pause` fault), and its site hears so
//! ([`Site::handle_read_taken`]). With faults
//! off, messages in order and no timers ([`World::with_faults_off`]) it is a deterministic
//! in-memory mesh whose hooks let a test reach a state (drop, cut or restore a link, hold
//! uploads, make the bucket misbehave, make a peer lie, send a site requests, fire its
//! timeouts, let time pass) and see what happened ([`Log`]: the messages sent, the packs
//! uploaded and deleted, the peers disconnected).
//!
//! It never reads a real clock, never draws randomness but from its seeded [`Rng`], never does
//! I/O: a run is a function of its [`Setup`] and its driver. What the sites are asked, and when
//! a site crashes or a link fails, is its [`Driver`]'s business. Its own checkers hold in every
//! world: the tree and site invariants at the touched site after every event, every chunk a
//! site stores matches its hash, a site uploads only what it holds, and no chunk crosses
//! regions directly when the bucket should have carried it.

mod answers;
mod bucket;
mod disk;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};

use crdt_namespace::{ContentId, Namespace, SiteId};
use proto::Message;
use site_core::content::{ChunkHash, ChunkRef, Manifest};
use site_core::{Holdings, Output, Reply, Request, RequestId, Site, SiteConfig, SiteError, Transfer};

pub use answers::{Answers, ReadResult, SCENARIO_CHUNKS};
pub use bucket::{BucketFault, HeldUpload};

use crate::{Faults, Rng};
use bucket::{Bucket, BucketOp};
use disk::Disk;

/// Simulated milliseconds between two flushes of a site's disk, when timers run
/// ([`World::start_timers`]): what may be made durable late (copies of what peers hold, stores
/// nothing waits for) is, as the daemon's housekeeping does.
pub const FLUSH_MS: u64 = 200;
/// The world's clock when it is made (November 2023, in milliseconds since the epoch): a
/// plausible wall clock for the hybrid logical clocks.
pub const START_MS: u64 = 1_700_000_000_000;
/// A world that carries out more events than this has run away (a run of the simulator takes a
/// few thousand).
pub const EVENTS_MAX: u64 = 5_000_000;

/// What a world is made of.
pub struct Setup {
    /// Each site's configuration, in site order (a site is its index from then on).
    pub configs: Vec<SiteConfig>,
    /// Each site's clock offset from the world's, in milliseconds.
    pub skews_ms: Vec<i64>,
    /// How often the network and the bucket misbehave, until [`World::heal`].
    pub faults: Faults,
    /// How long messages and bucket requests take.
    pub latency: Latency,
    /// The world's only source of randomness.
    pub rng: Rng,
    /// Keep a [`Log`] of what happened (the simulator's runs do not: it would only grow).
    pub record: bool,
}

/// How long messages and requests to the bucket take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Latency {
    /// Drawn for each: a message 1–5 ms (plus the faults' jitter), a bucket request 5–50 ms
    /// (plus 0.2–1 s when the bucket says "slow down"); messages overtake each other. The
    /// simulator's.
    Drawn,
    /// 1 ms each, so that everything arrives in the order it was sent, as on one connection
    /// (the faults' jitter and slow bucket answers do not apply). For tests that reason about
    /// who hears what first.
    InOrder,
}

/// Whoever drives a world: sends its sites requests, takes their answers, and is woken at the
/// times it asks for (the simulator's workload and fault steps).
pub trait Driver: Sized {
    /// What the driver is woken for.
    type Wake;
    /// Site `at` answered local request `id`.
    fn reply(&mut self, at: At<'_>, id: RequestId, reply: Result<Reply, SiteError>);
    /// Bytes of read `id`, at `offset` of the file.
    fn read_data(&mut self, at: At<'_>, id: RequestId, offset: u64, data: Vec<u8>);
    /// Read `id` is over.
    fn read_done(&mut self, at: At<'_>, id: RequestId, result: Result<(), SiteError>);
    /// A wake-up asked for with [`World::wake_at`] is due.
    fn wake(world: &mut World<Self>, wake: Self::Wake) -> Result<(), String>;
}

/// The site an answer comes from, and the world's time.
#[derive(Clone, Copy, Debug)]
pub struct At<'a> {
    /// Its index.
    pub site: usize,
    /// Its name.
    pub name: &'a SiteId,
    /// The world's clock.
    pub now: u64,
}

/// What happened in a recording world, for tests to look at.
#[derive(Debug, Default)]
pub struct Log {
    /// Every message a site sent, as it sent it (before the network could lose or alter it).
    pub messages: Vec<Sent>,
    /// Packs uploaded (kept by the bucket, or lost by it), in order.
    pub uploads: Vec<site_core::PackName>,
    /// Packs deleted, in order.
    pub deletes: Vec<site_core::PackName>,
    /// Peers a site disconnected: the site, the peer, why.
    pub disconnects: Vec<(usize, SiteId, String)>,
}

/// A message a site sent.
#[derive(Clone, Debug)]
pub struct Sent {
    /// The sender.
    pub from: usize,
    /// The receiver.
    pub to: usize,
    /// The message.
    pub message: Message,
}

struct SimSite {
    name: SiteId,
    config: SiteConfig,
    core: Option<Site>,
    disk: Disk,
    /// Offset of its wall clock: only local changes see it.
    skew_ms: i64,
    /// When its next timeout is scheduled ([`Site::poll_timeout`]), if timers run.
    timer_at: Option<u64>,
}

enum Event<W> {
    Deliver {
        from: usize,
        to: usize,
        bytes: Vec<u8>,
    },
    /// The driver syncs the site's disk.
    Flush {
        site: usize,
    },
    /// The site's timeout due at `at` (ignored if the site has since asked for another).
    Timer {
        site: usize,
        at: u64,
    },
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
    /// The client of read `id` at `site` took a piece of it.
    Taken {
        site: usize,
        id: RequestId,
    },
    Wake(W),
}

/// Sites, network, disks, bucket and clock, driven by `D`.
pub struct World<D: Driver> {
    /// The driver: its state is the test's or the workload's.
    pub driver: D,
    pub(crate) rng: Rng,
    pub(crate) now: u64,
    pub(crate) faults: Faults,
    latency: Latency,
    pub(crate) healed: bool,
    sites: Vec<SimSite>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event<D::Wake>>,
    next_event: u64,
    processed: u64,
    trace: blake3::Hasher,
    /// Links that are up (both directions), by ordered pair.
    up: BTreeSet<(usize, usize)>,
    /// Links kept down (a reconnect waits for [`World::rejoin`]).
    partitioned: BTreeSet<(usize, usize)>,
    /// Links (one direction) holding their messages until released.
    held: BTreeMap<(usize, usize), Vec<Vec<u8>>>,
    /// Links that lose every message, both ways, while both ends believe them up.
    cut: BTreeSet<(usize, usize)>,
    /// Sites whose chunks arrive corrupted.
    liars: BTreeSet<usize>,
    /// The ghost member's namespace ([`ghost`]).
    ghost: Namespace,
    /// The manifest of every version a site wrote, for the checkers.
    manifests: HashMap<ContentId, Manifest>,
    /// The last messages sent on each link (one direction), for byzantine replays.
    sent: BTreeMap<(usize, usize), VecDeque<Vec<u8>>>,
    bucket: Bucket,
    next_request: u64,
    log: Option<Log>,
    /// Whether sites' timers run ([`World::start_timers`]).
    timers: bool,
}

/// The key that signs `site`'s changes in a simulated world (derived from its name).
pub fn signing_key(site: &SiteId) -> crdt_namespace::SigningKey {
    let secret = blake3::derive_key("meridian sim site key", site.as_str().as_bytes());
    crdt_namespace::SigningKey::from_secret(&secret)
}

/// The ghost: a former member every site knows the key of, that runs no site. Byzantine strikes
/// relay changes in its name ([`World::ghost_change`]), so that they can carry any stamp
/// without clashing with a real site's sequence of changes.
pub fn ghost() -> SiteId {
    SiteId::new("ghost").expect("a valid site name")
}

/// The request a byzantine flood's chunks and chunk requests claim to answer or make (and
/// below it, one per request).
const FLOOD_REQUEST: proto::FetchId = proto::FetchId(u64::MAX);

/// Messages kept per link for a byzantine member to replay.
const REPLAYABLE: usize = 8;

/// A link's key: its ends, in order.
fn key(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl<D: Driver> World<D> {
    /// A world of the sites in `setup`, none linked yet, no event scheduled.
    pub fn new(setup: Setup, driver: D) -> World<D> {
        assert_eq!(setup.configs.len(), setup.skews_ms.len(), "one clock offset per site");
        // Every site knows every member's key.
        let mut keys = crdt_namespace::Keys::new();
        for config in &setup.configs {
            keys.allow(&config.site, signing_key(&config.site).public());
        }
        // A former member's key that may sign any of its changes: they are accepted, but it is
        // not a member now, so it holds no garbage back.
        keys.allow_until(&ghost(), signing_key(&ghost()).public(), u64::MAX);
        let sites = setup
            .configs
            .into_iter()
            .zip(setup.skews_ms)
            .map(|(mut config, skew_ms)| {
                let name = config.site.clone();
                config.keys = keys.clone();
                let ns = Namespace::new(name.clone(), signing_key(&name));
                let core = Site::new(config.clone(), ns, Holdings::default());
                SimSite { name, config, core: Some(core), disk: Disk::default(), skew_ms, timer_at: None }
            })
            .collect();
        let mut world = World {
            driver,
            rng: setup.rng,
            now: START_MS,
            faults: setup.faults,
            latency: setup.latency,
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
            cut: BTreeSet::new(),
            liars: BTreeSet::new(),
            ghost: Namespace::new(ghost(), signing_key(&ghost())),
            manifests: HashMap::new(),
            sent: BTreeMap::new(),
            bucket: Bucket::default(),
            next_request: 1,
            log: setup.record.then(Log::default),
            timers: false,
        };
        for s in 0..world.sites.len() {
            world.tell_wall_clock(s);
        }
        world
    }

    // ---------------------------------------------------------------------------------------
    // Looking at it

    /// The world's clock, in milliseconds.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Number of sites.
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    /// Whether the world has no site.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Site `s`'s name.
    pub fn name(&self, s: usize) -> &SiteId {
        &self.sites[s].name
    }

    /// The index of the site named `name`.
    pub fn index(&self, name: &SiteId) -> usize {
        self.sites.iter().position(|x| x.name == *name).expect("a known site")
    }

    /// Site `s`'s core, or `None` while it is crashed.
    pub fn core(&self, s: usize) -> Option<&Site> {
        self.sites[s].core.as_ref()
    }

    /// Site `s`'s core, or `None` while it is crashed, to change it (its outputs wait for
    /// [`World::drain`]).
    pub fn core_mut(&mut self, s: usize) -> Option<&mut Site> {
        self.sites[s].core.as_mut()
    }

    /// Site `s`'s core, which must be up.
    pub fn site(&self, s: usize) -> &Site {
        self.core(s).expect("the site is up")
    }

    /// Site `s`'s core, which must be up, to change it (its outputs wait for
    /// [`World::drain`]).
    pub fn site_mut(&mut self, s: usize) -> &mut Site {
        self.sites[s].core.as_mut().expect("the site is up")
    }

    /// Tells site `s` its wall clock, as drivers do when they start a site and now and then.
    fn tell_wall_clock(&mut self, s: usize) {
        let (now, wall) = (self.now, self.site_now(s));
        if let Some(core) = self.sites[s].core.as_mut() {
            core.handle_wall_clock(now, wall);
        }
    }

    /// Site `s`'s clock: the world's plus its offset.
    pub fn site_now(&self, s: usize) -> u64 {
        (self.now as i64 + self.sites[s].skew_ms).max(0) as u64
    }

    /// Events carried out so far.
    pub fn processed(&self) -> u64 {
        self.processed
    }

    /// The hash of every event so far: two runs with one seed must give the same.
    pub fn trace(&self) -> [u8; 32] {
        *self.trace.finalize().as_bytes()
    }

    /// Adds `bytes` to the trace (the driver's own events).
    pub fn record_in_trace(&mut self, bytes: &[u8]) {
        self.trace.update(bytes);
    }

    /// What happened so far; the world must be recording ([`Setup::record`]).
    pub fn log(&self) -> &Log {
        self.log.as_ref().expect("a recording world")
    }

    /// Whether a message is on its way (sent and due for delivery; held ones are not).
    pub fn in_flight(&self) -> bool {
        self.queue.iter().any(|Reverse((_, seq))| matches!(self.events.get(seq), Some(Event::Deliver { .. })))
    }

    /// Prints what happens when `SIM_DEBUG` is set.
    pub(crate) fn debug(&self, what: std::fmt::Arguments<'_>) {
        debug(self.now, what);
    }

    // ---------------------------------------------------------------------------------------
    // Running

    fn schedule(&mut self, at: u64, event: Event<D::Wake>) {
        let seq = self.next_event;
        self.next_event += 1;
        self.events.insert(seq, event);
        self.queue.push(Reverse((at, seq)));
    }

    /// Wakes the driver at `at` with `wake`.
    pub fn wake_at(&mut self, at: u64, wake: D::Wake) {
        self.schedule(at, Event::Wake(wake));
    }

    /// Starts every site's timers: its timeouts come when [`Site::poll_timeout`] says, and its
    /// disk is flushed every [`FLUSH_MS`] (the first within that). Without it a site's
    /// timeouts fire only when [`World::timeout`] says.
    pub fn start_timers(&mut self) {
        self.timers = true;
        for s in 0..self.sites.len() {
            let at = self.now + self.rng.below(FLUSH_MS);
            self.schedule(at, Event::Flush { site: s });
            self.arm_timer(s);
        }
    }

    /// Schedules site `s`'s next timeout where its core says, if timers run and it moved.
    fn arm_timer(&mut self, s: usize) {
        if !self.timers {
            return;
        }
        let due = self.sites[s].core.as_ref().and_then(Site::poll_timeout);
        if due == self.sites[s].timer_at {
            return;
        }
        self.sites[s].timer_at = due;
        if let Some(at) = due {
            self.schedule(at.max(self.now), Event::Timer { site: s, at });
        }
    }

    /// Carries out the next event, whenever it is due; false if nothing is left to happen.
    pub fn step(&mut self) -> Result<bool, String> {
        let Some(Reverse((at, seq))) = self.queue.pop() else { return Ok(false) };
        self.processed += 1;
        if self.processed > EVENTS_MAX {
            return Err(format!("more than {EVENTS_MAX} events: the simulation ran away"));
        }
        self.now = self.now.max(at);
        let event = self.events.remove(&seq).expect("scheduled");
        self.carry_out(event)?;
        Ok(true)
    }

    /// Carries out events until nothing is left to happen (a world whose timers run never
    /// stops).
    pub fn run(&mut self) -> Result<(), String> {
        while self.step()? {}
        Ok(())
    }

    /// Carries out events until `done` holds or the next event is after `deadline`.
    pub fn run_until(&mut self, deadline: u64, done: impl Fn(&World<D>) -> bool) -> Result<(), String> {
        while !done(self) {
            let Some(Reverse((at, _))) = self.queue.peek().copied() else { break };
            if at > deadline {
                self.now = self.now.max(deadline);
                break;
            }
            self.step()?;
        }
        Ok(())
    }

    /// Lets `ms` pass, carrying out what happens meanwhile.
    pub fn advance(&mut self, ms: u64) -> Result<(), String> {
        let deadline = self.now + ms;
        self.run_until(deadline, |_| false)?;
        self.now = self.now.max(deadline);
        Ok(())
    }

    fn carry_out(&mut self, event: Event<D::Wake>) -> Result<(), String> {
        match event {
            Event::Deliver { from, to, bytes } => self.deliver(from, to, bytes)?,
            Event::Flush { site } => {
                if self.sites[site].core.is_some() {
                    self.commit(site);
                    // The driver's housekeeping also tells the site its wall clock.
                    self.tell_wall_clock(site);
                    self.drain(site);
                    self.check_site(site)?;
                }
                self.schedule(self.now + FLUSH_MS, Event::Flush { site });
            }
            Event::Timer { site, at } => {
                if self.sites[site].timer_at == Some(at) {
                    self.trace.update(&[1, site as u8]);
                    self.sites[site].timer_at = None;
                    self.timeout(site)?;
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
            Event::Taken { site, id } => {
                self.trace.update(&[6, site as u8]);
                let t = self.now;
                if let Some(core) = self.sites[site].core.as_mut() {
                    core.handle_read_taken(t, id);
                    self.drain(site);
                    self.check_site(site)?;
                }
            }
            Event::Wake(wake) => D::wake(self, wake)?,
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // The sites' clients and timers

    /// Hands site `s` a local request and returns its id; its outputs wait for
    /// [`World::drain`] (or the next event at `s`).
    pub fn submit(&mut self, s: usize, request: Request) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let (now, wall) = (self.now, self.site_now(s));
        self.site_mut(s).handle_local(now, wall, id, request);
        id
    }

    /// The id the next request will have.
    pub fn next_request_id(&self) -> RequestId {
        RequestId(self.next_request)
    }

    /// Hands site `s` a local request and carries out what it does at once, without running
    /// the world; returns its id.
    pub fn start(&mut self, s: usize, request: Request) -> RequestId {
        let id = self.submit(s, request);
        self.drain(s);
        id
    }

    /// Fires site `s`'s timeouts now (a crashed site has none).
    pub fn timeout(&mut self, s: usize) -> Result<(), String> {
        let t = self.now;
        if let Some(core) = self.sites[s].core.as_mut() {
            core.handle_timeout(t);
            self.drain(s);
            self.commit(s);
            self.check_site(s)?;
        }
        Ok(())
    }

    /// Moves site `s`'s wall clock by `ms` (a clock step: only its local changes see it).
    pub fn jump_clock(&mut self, s: usize, ms: i64) {
        self.sites[s].skew_ms += ms;
    }

    /// How far site `s`'s wall clock is from the true time, in milliseconds.
    pub fn clock_skew(&self, s: usize) -> i64 {
        self.sites[s].skew_ms
    }

    // ---------------------------------------------------------------------------------------
    // The executor

    /// Carries out site `s`'s outputs.
    pub fn drain(&mut self, s: usize) {
        while let Some(output) = self.sites[s].core.as_mut().and_then(Site::poll_output) {
            self.execute(s, output);
        }
        self.arm_timer(s);
    }

    /// Carries out one output of site `s`.
    fn execute(&mut self, s: usize, output: Output) {
        match output {
            Output::Send { to, message } => {
                let to = self.index(&to);
                self.send(s, to, message);
            }
            Output::Broadcast { to, message } => {
                for to in to {
                    let to = self.index(&to);
                    self.send(s, to, message.clone());
                }
            }
            Output::Durable { store, then } => {
                // Made durable with the next commit, which comes before anything waits for it.
                for manifest in &store.versions {
                    self.manifests.entry(manifest.content_id()).or_insert_with(|| manifest.clone());
                }
                self.sites[s].disk.pending.push((store.index, store.versions, store.namespace, true));
                if !then.is_empty() {
                    self.commit(s);
                    for output in then {
                        self.execute(s, output);
                    }
                }
            }
            Output::Cache { chunks, versions } => self.cache(s, chunks, versions),
            Output::Reclaim { versions, chunks } => self.reclaim(s, &versions, &chunks),
            Output::LoadChunk { hash, purpose } => {
                let loaded = self.sites[s].disk.load(&hash);
                self.site_mut(s).handle_chunk_loaded(hash, purpose, loaded);
            }
            Output::Reply { id, reply } => {
                let at = At { site: s, name: &self.sites[s].name, now: self.now };
                self.driver.reply(at, id, reply);
            }
            Output::ReadData { id, offset, data } => {
                let at = At { site: s, name: &self.sites[s].name, now: self.now };
                self.driver.read_data(at, id, offset, data);
                // Clients take what they read at once, or now and then after a pause.
                let rate = if self.healed { 0.0 } else { self.faults.pause };
                let pause = if rate > 0.0 && self.rng.chance(rate) { 500 + self.rng.below(4_500) } else { 0 };
                self.schedule(self.now + pause, Event::Taken { site: s, id });
            }
            Output::ReadDone { id, result } => {
                let at = At { site: s, name: &self.sites[s].name, now: self.now };
                self.driver.read_done(at, id, result);
            }
            Output::StageOpen { name } => self.send_to_bucket(s, BucketOp::Open { name }),
            Output::StageRead { request, name, chunk, index } => {
                self.send_to_bucket(s, BucketOp::Read { request, name, chunk, index })
            }
            Output::StageUpload { name, chunks, .. } => self.upload(s, name, &chunks),
            Output::StageDelete { name } => self.delete_pack(name),
            Output::Disconnect { peer, reason } => {
                let p = self.index(&peer);
                if let Some(log) = &mut self.log {
                    log.disconnects.push((s, peer, reason));
                }
                self.disconnect(s, p);
                let at = self.now + 500 + self.rng.below(2_000);
                self.schedule(at, Event::Reconnect { a: s, b: p });
            }
        }
    }

    /// Writes copies of what peers hold: made durable with the next commit, or lost in a crash
    /// before it.
    fn cache(&mut self, s: usize, chunks: Vec<(ChunkHash, Vec<u8>)>, versions: Vec<Manifest>) {
        let mut refs = Vec::new();
        for (hash, data) in chunks {
            if ChunkHash::of(&data) != hash {
                panic!("checker: {} stored chunk {hash} whose bytes do not match it", self.sites[s].name);
            }
            refs.push(ChunkRef { hash, len: data.len() as u32 });
            let disk = &mut self.sites[s].disk;
            disk.unsynced_chunks.insert(hash);
            disk.chunk_files.insert(hash, data);
        }
        self.sites[s].disk.pending.push((refs, versions, Vec::new(), false));
    }

    /// Forgets versions and deletes chunk files, as the runtime does: the records at once,
    /// then each chunk file the core still does not hold. Checks that no live version loses
    /// its last copy: every version a site's namespace shows that used a deleted chunk is
    /// still held in full on some site's disk.
    fn reclaim(&mut self, s: usize, versions: &[ContentId], chunks: &[ChunkHash]) {
        let core = self.sites[s].core.as_ref().expect("a site that is up reclaims");
        let deleted: Vec<ChunkHash> = chunks.iter().copied().filter(|h| !core.holds_chunk(h)).collect();
        self.sites[s].disk.forget(versions, &deleted);
        if let Err(e) = self.check_live_versions_kept(&deleted) {
            panic!("checker: {} reclaimed {e}", self.sites[s].name);
        }
    }

    /// Every version a site's namespace shows that uses one of `deleted` is held in full on
    /// some site's disk.
    fn check_live_versions_kept(&self, deleted: &[ChunkHash]) -> Result<(), String> {
        let deleted: HashSet<&ChunkHash> = deleted.iter().collect();
        if deleted.is_empty() {
            return Ok(());
        }
        for site in &self.sites {
            let Some(core) = &site.core else { continue };
            let walk = core.namespace().walk("/").map_err(|e| e.to_string())?;
            for entry in walk {
                let Some(version) = entry.stat.version else { continue };
                let Some(manifest) = self.manifests.get(&version.content) else { continue };
                if !manifest.chunks.iter().any(|c| deleted.contains(&c.hash)) {
                    continue;
                }
                let kept = self
                    .sites
                    .iter()
                    .any(|t| manifest.chunks.iter().all(|c| t.disk.chunk_files.contains_key(&c.hash)));
                if !kept {
                    return Err(format!(
                        "the last copy of {} ({}), which {} shows",
                        entry.path, version.content, site.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// Makes a site's pending writes durable, as the runtime does before acknowledging.
    fn commit(&mut self, s: usize) {
        self.sites[s].disk.commit();
    }

    // ---------------------------------------------------------------------------------------
    // The network

    /// Brings the link between `a` and `b` up (if both are up and it is not): each is told the
    /// other is there.
    pub fn connect(&mut self, a: usize, b: usize) {
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

    /// Links every pair of sites, in site order.
    pub fn connect_all(&mut self) {
        let n = self.sites.len();
        for a in 0..n {
            for b in a + 1..n {
                self.connect(a, b);
            }
        }
    }

    /// Drops the link between `a` and `b`: each is told the other is gone, and what is in
    /// flight on it is lost.
    pub fn disconnect(&mut self, a: usize, b: usize) {
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

    /// Whether the link between `a` and `b` is up.
    pub fn is_up(&self, a: usize, b: usize) -> bool {
        self.up.contains(&key(a, b))
    }

    /// Drops the link between `a` and `b` and has it back a moment later (1–50 ms).
    pub fn reset(&mut self, a: usize, b: usize) {
        self.disconnect(a, b);
        let at = self.now + 1 + self.rng.below(50);
        self.schedule(at, Event::Reconnect { a, b });
    }

    /// Drops the link between `a` and `b` until [`World::rejoin`].
    pub fn partition(&mut self, a: usize, b: usize) {
        self.partitioned.insert(key(a, b));
        self.disconnect(a, b);
    }

    /// Whether `a` and `b` are partitioned.
    pub fn is_partitioned(&self, a: usize, b: usize) -> bool {
        self.partitioned.contains(&key(a, b))
    }

    /// Ends the partition of `a` and `b`: the link comes back up.
    pub fn rejoin(&mut self, a: usize, b: usize) {
        self.partitioned.remove(&key(a, b));
        self.connect(a, b);
    }

    /// Makes the link between `a` and `b` lose every message, both ways, while both ends
    /// believe it up (until [`World::mend`]).
    pub fn cut(&mut self, a: usize, b: usize) {
        self.cut.insert(key(a, b));
    }

    /// Ends a [`World::cut`]: messages go through again (those lost stay lost).
    pub fn mend(&mut self, a: usize, b: usize) {
        self.cut.remove(&key(a, b));
    }

    /// Makes the link from `from` to `to` hold its messages until [`World::release`].
    pub fn hold(&mut self, from: usize, to: usize) {
        self.held.insert((from, to), Vec::new());
    }

    /// Whether the link from `from` to `to` holds its messages.
    pub fn is_held(&self, from: usize, to: usize) -> bool {
        self.held.contains_key(&(from, to))
    }

    /// Delivers what the link from `from` to `to` held, within 20 ms, and stops holding.
    pub fn release(&mut self, from: usize, to: usize) {
        for bytes in self.held.remove(&(from, to)).unwrap_or_default() {
            let at = self.now + 1 + self.rng.below(20);
            self.schedule(at, Event::Deliver { from, to, bytes });
        }
    }

    /// Site `from` turns byzantine for one message: it sends `to` a push with a change made in
    /// `victim`'s name (a directory at `path`), signed with its own key.
    pub fn forge(&mut self, from: usize, to: usize, victim: usize, path: &str) {
        let key = signing_key(&self.sites[from].name);
        let mut forger = crdt_namespace::Namespace::new(self.sites[victim].name.clone(), key);
        let hlc = crdt_namespace::Hlc::new(self.site_now(from), 0);
        if forger.mkdir(path, false, 0o755, 0, hlc).is_ok() {
            let changes = forger.export_since(&[]);
            self.send(from, to, Message::Push { changes });
        }
    }

    /// Site `from` turns byzantine for a moment: it sends `to` what nobody asked for —
    /// announcements of versions nobody wrote (with their well-formed manifests, and one with
    /// junk), staging requests for them (for a region it is not of), requests for chunks nobody
    /// has, a chunk for a request never made. The versions it named.
    pub fn flood(&mut self, from: usize, to: usize) -> Vec<crdt_namespace::ContentId> {
        use site_core::content::{ChunkHash, ChunkRef, Manifest};
        let mut junk = Vec::new();
        for _ in 0..8 {
            let chunks =
                (0..3).map(|_| ChunkRef { hash: ChunkHash(self.rng.bytes32()), len: 1 << 20 }).collect();
            let manifest = Manifest::new(self.rng.bytes32(), chunks);
            let content = manifest.content_id();
            self.send(from, to, Message::Holds { content, manifest: Some(manifest.encode()) });
            junk.push(content);
        }
        let content = crdt_namespace::ContentId(self.rng.bytes32());
        let manifest = Some(self.rng.bytes(200));
        self.send(from, to, Message::Holds { content, manifest });
        junk.push(content);
        let nowhere = proto::Region::new("nowhere").expect("a valid region");
        self.send(from, to, Message::Stage { region: nowhere, contents: junk.clone(), spoiled: None });
        for i in 0..4 {
            let chunk = self.rng.bytes32();
            let request = proto::FetchId(FLOOD_REQUEST.0 - 1 - i);
            self.send(from, to, Message::GetChunk { request, chunk, priority: proto::Priority::Urgent });
        }
        let data = self.rng.bytes(64);
        let chunk = ChunkHash::of(&data).0;
        self.send(from, to, Message::Chunk { request: FLOOD_REQUEST, chunk, data });
        self.send(from, to, Message::WhoHas { content: junk[0] });
        junk
    }

    /// Site `from` sends `to` again one of the messages it sent it lately.
    pub fn replay(&mut self, from: usize, to: usize) {
        let Some(sent) = self.sent.get(&(from, to)).filter(|s| !s.is_empty()) else { return };
        let bytes = sent[self.rng.index(sent.len())].clone();
        if let Ok(message) = Message::decode(&bytes) {
            self.send(from, to, message);
        }
    }

    /// Site `from` relays to `to` every change of the ghost member ([`ghost`]) after making one
    /// more, a directory at `path` stamped `hlc`; false if the ghost's namespace refused it.
    pub fn ghost_change(&mut self, from: usize, to: usize, path: &str, hlc: crdt_namespace::Hlc) -> bool {
        if self.ghost.mkdir(path, false, 0o755, 0, hlc).is_err() {
            return false;
        }
        let changes = self.ghost.export_since(&[]);
        self.send(from, to, Message::Push { changes });
        true
    }

    /// Makes every chunk site `s` sends arrive corrupted (a peer that lies).
    pub fn lie(&mut self, s: usize) {
        self.liars.insert(s);
    }

    fn send(&mut self, from: usize, to: usize, message: Message) {
        if let Some(log) = &mut self.log {
            log.messages.push(Sent { from, to, message: message.clone() });
        }
        let mut bytes = message.encode();
        if !self.up.contains(&key(from, to)) || self.cut.contains(&key(from, to)) {
            return;
        }
        if self.faults.byzantine > 0.0 {
            let sent = self.sent.entry((from, to)).or_default();
            if sent.len() == REPLAYABLE {
                sent.pop_front();
            }
            sent.push_back(bytes.clone());
        }
        let f = if self.healed { Faults::default() } else { self.faults };
        if self.rng.chance(f.drop) {
            return;
        }
        if let Message::Chunk { request, chunk, mut data } = message
            && !data.is_empty()
            && (self.liars.contains(&from) || self.rng.chance(f.corrupt))
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
                + match self.latency {
                    Latency::Drawn => {
                        1 + self.rng.below(5) + if f.jitter_ms > 0 { self.rng.below(f.jitter_ms) } else { 0 }
                    }
                    Latency::InOrder => 1,
                };
            self.schedule(at, Event::Deliver { from, to, bytes: bytes.clone() });
        }
    }

    fn deliver(&mut self, from: usize, to: usize, bytes: Vec<u8>) -> Result<(), String> {
        self.trace.update(&[0]);
        self.trace.update(&self.now.to_le_bytes());
        self.trace.update(&[from as u8, to as u8]);
        self.trace.update(blake3::hash(&bytes).as_bytes());
        if !self.up.contains(&key(from, to)) || self.sites[to].core.is_none() {
            return Ok(());
        }
        let message = Message::decode(&bytes).map_err(|e| format!("undecodable message in flight: {e}"))?;
        // (A byzantine flood's chunk answers no request: it is no transfer.)
        if matches!(message, Message::Chunk { request, .. } if request != FLOOD_REQUEST)
            && self.sites[from].config.region != self.sites[to].config.region
        {
            self.check_regions_use_the_bucket(from, to)?;
        }
        let name = self.sites[from].name.clone();
        let t = self.now;
        self.sites[to].core.as_mut().expect("up").handle_message(t, &name, message);
        self.drain(to);
        self.check_site(to)
    }

    // ---------------------------------------------------------------------------------------
    // Crashes and healing

    /// Kills site `s`: its links drop, what it had not synced is lost, and an unsynced chunk
    /// file may be torn. It stays down until [`World::restart`] (or [`World::restart_at`]).
    pub fn crash(&mut self, s: usize) {
        self.trace.update(&[3, s as u8]);
        self.debug(format_args!("crash {}", self.sites[s].name));
        for other in 0..self.sites.len() {
            if other != s {
                self.disconnect(s, other);
            }
        }
        self.sites[s].disk.crash(&mut self.rng);
        self.sites[s].core = None;
    }

    /// Restarts site `s` at `at`.
    pub fn restart_at(&mut self, at: u64, s: usize) {
        self.schedule(at, Event::Restart { site: s });
    }

    /// Restarts a crashed site from its disk, as `runtime::open` does, and links it to every
    /// site it is not partitioned from.
    pub fn restart(&mut self, s: usize) -> Result<(), String> {
        if self.sites[s].core.is_some() {
            return Ok(());
        }
        let site = &mut self.sites[s];
        let (ns, holdings) = site.disk.recover(&site.name)?;
        site.core = Some(Site::new(site.config.clone(), ns, holdings));
        site.timer_at = None;
        self.tell_wall_clock(s);
        self.check_site(s)?;
        self.arm_timer(s);
        for other in 0..self.sites.len() {
            if other != s && !self.partitioned.contains(&key(s, other)) {
                self.connect(s, other);
            }
        }
        Ok(())
    }

    /// Ends every fault: the network and the bucket behave from now on, partitions end, held
    /// messages are delivered, clocks come back within a second, crashed sites restart, and
    /// every link starts afresh (a new connection and sync session, as a transport
    /// reconnecting).
    pub fn heal(&mut self) {
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
        let n = self.sites.len();
        for a in 0..n {
            for b in a + 1..n {
                self.disconnect(a, b);
                self.connect(a, b);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Checkers

    /// The tree invariant and the site's own invariants, at site `s` (if it is up).
    pub fn check_site(&self, s: usize) -> Result<(), String> {
        if let Some(core) = &self.sites[s].core {
            core.namespace()
                .check_invariants()
                .map_err(|e| format!("tree invariant broken at {}: {e}", self.sites[s].name))?;
            core.check_invariants()
                .map_err(|e| format!("site invariant broken at {}: {e}", self.sites[s].name))?;
        }
        Ok(())
    }

    /// A chunk went from `from` to `to`, of another region. In `staged` mode that never
    /// happens; in `auto` mode only when the bucket failed, or a holder asked to stage did not
    /// answer in time (lost or held messages, a clock jump) — not because links went down and
    /// came back, or sites crashed.
    fn check_regions_use_the_bucket(&self, from: usize, to: usize) -> Result<(), String> {
        let f = &self.faults;
        let may_fall_back =
            f.staging > 0.0 || f.drop > 0.0 || f.hold > 0.0 || f.clock > 0.0 || self.bucket.faulty;
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
}

/// Prints `what` at simulated time `now` when `SIM_DEBUG` is set.
pub(crate) fn debug(now: u64, what: std::fmt::Arguments<'_>) {
    if std::env::var_os("SIM_DEBUG").is_some() {
        eprintln!("[{}] {what}", now - START_MS);
    }
}

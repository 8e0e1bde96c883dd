//! The simulator's driver of a [`World`]: a random workload of client operations (mkdir, put,
//! rename, remove, tag, read) and a random fault step (partitions, held links, link resets,
//! crashes, wall-clock steps of up to an hour either way) on top of the network's and the bucket's own faults; then everything
//! heals and the mesh must converge. Its checkers see what only a driver knows: every completed
//! read returns the bytes of a version of that file, and after healing every site shows the
//! same namespace, every live file is readable everywhere, no acknowledged write is lost, and no
//! site still tracks a staged read a minute after the last one.

use std::collections::{BTreeSet, HashMap};

use crdt_namespace::{ContentId, EntryKind, Hlc, SiteId};
use proto::Region;
use site_core::content::{ChunkerConfig, Manifest};
use site_core::{Reply, Request, RequestId, SiteConfig, SiteError, Transfer};

use crate::world::{At, Driver, Latency, Setup, World, debug};
use crate::{Faults, Options, Report, Rng};

/// Small chunks, so that small simulated files still have many.
const CHUNKS: ChunkerConfig = ChunkerConfig { min_bytes: 256, avg_bytes: 1024, max_bytes: 4096 };
/// Simulated milliseconds between two client operations of the workload.
const OP_INTERVAL_MS: u64 = 40;
/// After healing, the mesh must converge within this much simulated time.
const LIVENESS_MS: u64 = 300_000;

const DIRS: [&str; 6] = ["/a", "/b", "/a/c", "/b/d", "/a/c/e", "/shots"];
const NAMES: [&str; 4] = ["f1", "f2", "shot.clip", "c"];
const SITE_NAMES: [&str; 6] = ["ams", "bos", "cdg", "dub", "ewr", "fra"];

/// What the workload is woken for.
pub(crate) enum Wake {
    /// A client operation.
    Op,
    /// A fault step.
    Fault,
}

/// The workload's state: what it asked, and what it must find afterwards.
pub(crate) struct Workload {
    ops_left: usize,
    ops_total: usize,
    requests: HashMap<RequestId, (usize, Pending)>,
    reads: HashMap<RequestId, ReadState>,
    /// Bytes of every version ever written.
    contents: HashMap<ContentId, Vec<u8>>,
    /// Reads that ended in an error, with it.
    failed_reads: HashMap<RequestId, String>,
    /// Versions whose write was acknowledged.
    acknowledged: BTreeSet<ContentId>,
    /// Versions a later write at the same site replaced, or a remove had seen.
    discarded: BTreeSet<ContentId>,
    /// Paths of the directories byzantine members forged in other members' names.
    forged: Vec<String>,
    /// Versions byzantine members announced, asked to stage or fetched that nobody wrote.
    junk: BTreeSet<ContentId>,
    /// Directories of the ghost member (see [`World::ghost_change`]) made, and whether each
    /// lies beyond every clock bound (stamped `u64::MAX - 1`, or made after such a one).
    ghost: Vec<(String, bool)>,
}

enum Pending {
    Write { content: ContentId, replaced: Option<ContentId> },
    Remove { seen: Vec<ContentId> },
    Read,
    Other,
}

#[derive(Default)]
struct ReadState {
    path: String,
    size: u64,
    range: std::ops::Range<u64>,
    data: Vec<u8>,
}

/// Runs the simulation of `seed`: the workload and the faults, healing, then the checks that
/// everything converged.
pub(crate) fn simulate(seed: u64, options: &Options) -> Result<Report, String> {
    let mut world = build(seed, options);
    let mut heal_at = None;
    while world.step()? {
        if world.driver.ops_left == 0 && !world.healed && world.driver.requests.is_empty() {
            world.heal();
            heal_at = Some(world.now);
        }
        if let Some(start) = heal_at {
            if world.converged() {
                break;
            }
            if world.now > start + LIVENESS_MS {
                return Err(format!(
                    "no convergence {} s after healing: {}",
                    LIVENESS_MS / 1000,
                    world.why_not_converged()
                ));
            }
        }
    }
    let events = world.processed();
    world.check_liveness()?;
    world.check_staging_settles()?;
    Ok(Report {
        seed,
        sites: world.len(),
        ops: world.driver.ops_total,
        events,
        bytes_from_staging: (0..world.len())
            .filter_map(|s| world.core_mut(s).map(|c| c.status().bytes_from_staging))
            .sum(),
        bytes_collected: (0..world.len())
            .filter_map(|s| world.core_mut(s).map(|c| c.status().space.collected_bytes))
            .sum(),
        bytes_evicted: (0..world.len())
            .filter_map(|s| world.core_mut(s).map(|c| c.status().space.evicted_bytes))
            .sum(),
        trace: world.trace(),
    })
}

/// The world of `seed`: 2–6 sites (unless `options` says), in one or two regions, with the
/// seed's own mix of faults; timers started, every pair linked, the workload and the faults
/// about to start.
fn build(seed: u64, options: &Options) -> World<Workload> {
    let mut rng = Rng::new(seed);
    let n = options.sites.unwrap_or_else(|| 2 + rng.index(5)).clamp(1, SITE_NAMES.len());
    let ops = options.ops.unwrap_or_else(|| 40 + rng.index(160));
    let faults = options.faults.unwrap_or_else(|| Faults {
        byzantine: Faults::byzantine_rate(&mut Rng::new(!seed)),
        ..Faults::swarm(&mut rng)
    });
    // Half the seeds split the sites into two regions joined by the staging bucket.
    let regions = if n >= 2 && rng.chance(0.5) { 2 } else { 1 };
    let transfer = if rng.chance(0.25) { Transfer::Staged } else { Transfer::Auto };
    let names: Vec<SiteId> = (0..n).map(|i| SiteId::new(SITE_NAMES[i]).expect("valid site names")).collect();
    let region_of = |i: usize| Region::new(format!("r{}", i % regions)).expect("a valid region");
    let configs: Vec<SiteConfig> = (0..n)
        .map(|i| {
            let mut config = SiteConfig::new(names[i].clone());
            config.region = region_of(i);
            config.regions = (0..n).filter(|j| *j != i).map(|j| (names[j].clone(), region_of(j))).collect();
            config.staging = (regions > 1).then_some(transfer);
            // Clock faults step a site's wall clock up to an hour either way: an honest
            // site's changes are not held for that (the bound itself has tests of its own).
            config.max_clock_ahead_ms = 2 * 3_600_000;
            config
        })
        .collect();
    // Space: a short grace period, and for half the seeds a cache bound a few files make
    // sites go over (drawn apart, so that the other draws of a seed stay what they were).
    let mut space = Rng::new(seed ^ 0x5ace_5ace_5ace_5ace);
    let grace_ms = space.below(3_000);
    let cache_max_bytes = space.chance(0.5).then(|| 20_000 + space.below(200_000));
    let configs: Vec<SiteConfig> = configs
        .into_iter()
        .map(|mut config| {
            config.collect_grace_ms = grace_ms;
            config.cache_max_bytes = cache_max_bytes;
            config
        })
        .collect();
    let skews_ms = (0..n).map(|_| rng.below(2_000) as i64 - 1_000).collect();
    let workload = Workload {
        ops_left: ops,
        ops_total: ops,
        requests: HashMap::new(),
        reads: HashMap::new(),
        contents: HashMap::new(),
        failed_reads: HashMap::new(),
        acknowledged: BTreeSet::new(),
        discarded: BTreeSet::new(),
        forged: Vec::new(),
        junk: BTreeSet::new(),
        ghost: Vec::new(),
    };
    let mut world = World::new(
        Setup { configs, skews_ms, faults, latency: Latency::Drawn, rng, record: false },
        workload,
    );
    world.start_timers();
    world.connect_all();
    world.wake_at(world.now + 1, Wake::Op);
    world.wake_at(world.now + 5, Wake::Fault);
    world
}

impl Driver for Workload {
    type Wake = Wake;

    fn reply(&mut self, at: At<'_>, id: RequestId, reply: Result<Reply, SiteError>) {
        if let Ok(Reply::ReadStarted { size, range }) = &reply {
            if let Some(read) = self.reads.get_mut(&id) {
                read.size = *size;
                read.range = range.clone();
            }
            return;
        }
        let Some((_, pending)) = self.requests.remove(&id) else { return };
        self.reads.remove(&id);
        let answer = reply.as_ref().map(|_| ()).map_err(|e| e.to_string());
        debug(at.now, format_args!("reply {id} at {}: {answer:?}", at.name));
        match (pending, reply) {
            (Pending::Write { content, replaced }, Ok(Reply::Done)) => {
                self.acknowledged.insert(content);
                self.discarded.extend(replaced);
            }
            (Pending::Remove { seen }, Ok(Reply::Done)) => {
                debug(at.now, format_args!("remove at {} discards {seen:?}", at.name));
                self.discarded.extend(seen)
            }
            _ => {}
        }
    }

    fn read_data(&mut self, _: At<'_>, id: RequestId, offset: u64, data: Vec<u8>) {
        if let Some(read) = self.reads.get_mut(&id) {
            if offset != read.range.start + read.data.len() as u64 {
                panic!("checker: read {id} at {} got bytes at {offset} out of order", read.path);
            }
            read.data.extend_from_slice(&data);
        }
    }

    fn read_done(&mut self, at: At<'_>, id: RequestId, result: Result<(), SiteError>) {
        self.requests.remove(&id);
        match (self.reads.remove(&id), result) {
            (Some(read), Ok(())) => self.check_read(at.name, &read),
            (_, Err(e)) => {
                self.failed_reads.insert(id, e.to_string());
            }
            (None, Ok(())) => {}
        }
    }

    fn wake(world: &mut World<Workload>, wake: Wake) -> Result<(), String> {
        match wake {
            Wake::Op => {
                if world.driver.ops_left > 0 {
                    world.driver.ops_left -= 1;
                    world.client_op()?;
                    let at = world.now + 1 + world.rng.below(2 * OP_INTERVAL_MS);
                    world.wake_at(at, Wake::Op);
                }
            }
            Wake::Fault => {
                if !world.healed {
                    world.fault();
                    let at = world.now + 100 + world.rng.below(400);
                    world.wake_at(at, Wake::Fault);
                }
            }
        }
        Ok(())
    }
}

impl Workload {
    /// Every completed read returns the bytes of some version of the file.
    fn check_read(&self, site: &SiteId, read: &ReadState) {
        let ok = self.contents.values().any(|v| {
            v.len() as u64 == read.size
                && v.get(read.range.start as usize..read.range.end as usize) == Some(&read.data[..])
        });
        if !ok {
            panic!(
                "checker: a read of {} at {site} returned {} bytes that are no version of it",
                read.path,
                read.data.len()
            );
        }
    }
}

/// Prints a site's whole namespace when `SIM_DEBUG` is set.
fn debug_walk(world: &World<Workload>, s: usize) {
    if std::env::var_os("SIM_DEBUG").is_none() {
        return;
    }
    for e in world.site(s).namespace().walk("/").unwrap_or_default() {
        eprintln!(
            "    {} {:?} {} {:?}",
            &e.stat.id[..8],
            e.stat.kind,
            e.path,
            e.stat.version.as_ref().map(|v| (v.content, v.site.clone(), v.hlc))
        );
    }
}

impl World<Workload> {
    // ---------------------------------------------------------------------------------------
    // Faults

    fn fault(&mut self) {
        let n = self.len();
        let f = self.faults;
        if n >= 2 && self.rng.chance(f.partition) {
            let (a, b) = (self.rng.index(n), self.rng.index(n));
            if a != b {
                if self.is_partitioned(a, b) {
                    self.rejoin(a, b);
                } else {
                    self.partition(a, b);
                }
            }
        }
        if n >= 2 && self.rng.chance(f.hold) {
            let (a, b) = (self.rng.index(n), self.rng.index(n));
            if a != b {
                if self.is_held(a, b) {
                    self.release(a, b);
                } else {
                    self.hold(a, b);
                }
            }
        }
        if n >= 2 && self.rng.chance(f.reset) {
            let (a, b) = (self.rng.index(n), self.rng.index(n));
            if a != b && self.is_up(a, b) {
                self.reset(a, b);
            }
        }
        if self.rng.chance(f.crash) {
            let s = self.rng.index(n);
            if self.core(s).is_some() {
                self.crash(s);
                // Requests in flight at the crashed site get no answer.
                let workload = &mut self.driver;
                workload.requests.retain(|_, (site, _)| *site != s);
                workload.reads.retain(|id, _| workload.requests.contains_key(id));
                let at = self.now + 500 + self.rng.below(5_000);
                self.restart_at(at, s);
            }
        }
        if n >= 2 && self.rng.chance(f.forge) {
            let (from, to, victim) = (self.rng.index(n), self.rng.index(n), self.rng.index(n));
            if from != to && from != victim {
                let path = format!("/forged-{}", self.driver.forged.len());
                self.forge(from, to, victim, &path);
                self.driver.forged.push(path);
            }
        }
        // Tested first, so that a world without this fault draws nothing more than before.
        if n >= 2 && f.byzantine > 0.0 && self.rng.chance(f.byzantine) {
            let (from, to) = (self.rng.index(n), self.rng.index(n));
            if from != to {
                self.byzantine(from, to);
            }
        }
        if self.rng.chance(f.clock) {
            let s = self.rng.index(n);
            // The clock steps to anywhere within 50 minutes of the true time (or to the epoch,
            // below); healing brings it back within a second. Only local changes
            // and the bound on peers' clocks see the wall clock, so this steps their stamps and
            // mtimes, never a timer. Two clocks stay within 100 minutes of each other, inside
            // the bound of 2 hours, so no honest change is still held when the checks run (the
            // jumps add up: seed 7288 once had one site over 2 hours ahead, its changes held for
            // longer than the checks wait; holding is the scenario tests' business).
            let draw = self.rng.below(6_000_000);
            // One step in 16 (told by the same draw, so that the seeds' other draws stay as they
            // were) sets the clock to the epoch, as a lost real-time clock does: the site holds
            // every peer's change until its clock is right again, and its own changes still
            // follow its last ones.
            let target = if draw.is_multiple_of(16) { -(self.now as i64) } else { draw as i64 - 3_000_000 };
            let jump = target - self.clock_skew(s);
            self.jump_clock(s, jump);
        }
    }

    /// Member `from` misbehaves towards `to` once, in one of the ways of [`Faults::byzantine`].
    fn byzantine(&mut self, from: usize, to: usize) {
        match self.rng.below(3) {
            0 => {
                let junk = self.flood(from, to);
                self.driver.junk.extend(junk);
            }
            1 => self.replay(from, to),
            _ => {
                let beyond = self.driver.ghost.last().is_some_and(|(_, beyond)| *beyond);
                let (hlc, far) = match self.rng.below(3) {
                    0 => (Hlc::ZERO, false),
                    1 => (Hlc::from_raw(u64::MAX - 1), true),
                    _ => (Hlc::new(self.site_now(from), 0), false),
                };
                let path = format!("/ghost-{}", self.driver.ghost.len());
                if self.ghost_change(from, to, &path, hlc) {
                    self.driver.ghost.push((path, beyond || far));
                }
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Workload

    fn request(&mut self, s: usize, request: Request, pending: Pending) -> RequestId {
        let id = self.submit(s, request);
        self.driver.requests.insert(id, (s, pending));
        id
    }

    fn client_op(&mut self) -> Result<(), String> {
        let live: Vec<usize> = (0..self.len()).filter(|s| self.core(*s).is_some()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let s = *self.rng.pick(&live);
        let dir = *self.rng.pick(&DIRS);
        let path = format!("{dir}/{}", self.rng.pick(&NAMES));
        self.record_in_trace(&[5, s as u8]);
        self.record_in_trace(path.as_bytes());
        self.debug(format_args!("op at {} on {path} / {dir}", self.name(s)));
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
                self.debug(format_args!("rename {from} -> {to} at {}", self.name(s)));
                let _ = self.request(s, Request::Rename { from, to }, Pending::Other);
            }
            65..=74 => {
                let target = if self.rng.chance(0.5) { dir.to_string() } else { path };
                let seen = self.versions_below(s, &target);
                self.debug(format_args!("remove {target} at {}", self.name(s)));
                debug_walk(self, s);
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
                self.driver.reads.insert(id, ReadState { path, ..ReadState::default() });
            }
        }
        self.drain(s);
        self.check_site(s)
    }

    fn versions_below(&self, s: usize, path: &str) -> Vec<ContentId> {
        let ns = self.site(s).namespace();
        ns.walk(path)
            .map(|w| w.iter().filter_map(|e| e.stat.version.as_ref().map(|v| v.content)).collect())
            .unwrap_or_default()
    }

    /// Writes a new version: a fresh file, or an edit of part of the current one.
    fn put(&mut self, s: usize, path: &str) {
        let ns = self.site(s).namespace();
        let current = ns.stat(path).ok().and_then(|st| st.version).map(|v| v.content);
        let mut data = match current.and_then(|c| self.driver.contents.get(&c)) {
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
        data.extend_from_slice(&self.next_request_id().0.to_le_bytes());
        let manifest = Manifest::of_bytes(&data, CHUNKS);
        let content = manifest.content_id();
        // The put path makes the chunks durable before the core commits the version.
        self.store_chunks(s, &manifest, &data);
        self.driver.contents.insert(content, data);
        let request = Request::CommitVersion { path: path.into(), manifest, mode: 0o644, mtime_ns: 0 };
        self.debug(format_args!("put {path} at {} -> {content} (replaces {current:?})", self.name(s)));
        let _ = self.request(s, request, Pending::Write { content, replaced: current });
    }

    // ---------------------------------------------------------------------------------------
    // Checkers

    fn converged(&self) -> bool {
        if !self.driver.requests.is_empty() || (0..self.len()).any(|s| self.core(s).is_none()) {
            return false;
        }
        let first = self.site(0).namespace().walk("/");
        (1..self.len()).all(|s| self.site(s).namespace().walk("/") == first) && !self.in_flight()
    }

    /// What keeps the sites from having converged, for the failure message.
    fn why_not_converged(&self) -> String {
        let mut why = Vec::new();
        if !self.driver.requests.is_empty() {
            why.push(format!("{} requests unanswered", self.driver.requests.len()));
        }
        for s in (0..self.len()).filter(|s| self.core(*s).is_none()) {
            why.push(format!("{} is down", self.name(s)));
        }
        if self.in_flight() {
            why.push("messages still in flight".to_owned());
        }
        if (0..self.len()).all(|s| self.core(s).is_some()) {
            let first = self.site(0).namespace().walk("/");
            for s in (1..self.len()).filter(|s| self.site(*s).namespace().walk("/") != first) {
                why.push(format!("{} and {} differ", self.name(0), self.name(s)));
            }
            for s in 0..self.len() {
                let held = self.site(s).namespace().held_changes();
                if !held.is_empty() {
                    why.push(format!("{} holds changes {held:?}", self.name(s)));
                }
            }
        }
        why.join("; ")
    }

    fn check_liveness(&mut self) -> Result<(), String> {
        // A byzantine member's forgeries are refused everywhere.
        for s in 0..self.len() {
            if let Some(path) = self.driver.forged.iter().find(|p| self.site(s).namespace().stat(p).is_ok()) {
                return Err(format!("{} applied the forged change that made {path}", self.name(s)));
            }
        }
        // A byzantine member's harm stays its own: nothing it pushed beyond every clock bound is
        // integrated, no site's clock was pulled past the bound, and no site remembers a version
        // only the flood named.
        for s in 0..self.len() {
            let (site, name) = (self.site(s), self.name(s));
            if let Some((path, _)) =
                self.driver.ghost.iter().find(|(p, beyond)| *beyond && site.namespace().stat(p).is_ok())
            {
                return Err(format!("{name} integrated {path}, stamped beyond every clock bound"));
            }
            let last = site.namespace().last_hlc();
            if last.physical_ms() > self.site_now(s) + site.config().max_clock_ahead_ms {
                return Err(format!("{name}'s clock was pulled to {last}, past its bound"));
            }
            if let Some(junk) = self.driver.junk.iter().find(|c| site.knows_version(c)) {
                return Err(format!("{name} remembers version {junk}, which only a flood named"));
            }
        }
        let walk = self.site(0).namespace().walk("/").map_err(|e| e.to_string())?;
        // Every acknowledged write is preserved, unless its own site replaced it or removed it.
        let live: BTreeSet<ContentId> =
            walk.iter().filter_map(|e| e.stat.version.as_ref().map(|v| v.content)).collect();
        let workload = &self.driver;
        if let Some(content) =
            workload.acknowledged.difference(&workload.discarded).find(|c| !live.contains(c))
        {
            debug_walk(self, 0);
            return Err(format!("acknowledged version {content} was lost"));
        }
        // Every live file is readable at every site.
        let files: Vec<String> =
            walk.iter().filter(|e| e.stat.kind == EntryKind::File).map(|e| e.path.clone()).collect();
        for s in 0..self.len() {
            for path in &files {
                self.check_readable(s, path)?;
            }
        }
        Ok(())
    }

    /// `path` can be read at site `s`. A read may fail while a way it needs is still marked
    /// failed from the fault phase (a staged pack, for 30 s): it must succeed once that has
    /// passed.
    fn check_readable(&mut self, s: usize, path: &str) -> Result<(), String> {
        let mut failure = None;
        for _attempt in 0..2 {
            let id = self.request(s, Request::Read { path: path.into(), range: None }, Pending::Read);
            self.driver.reads.insert(id, ReadState { path: path.into(), ..ReadState::default() });
            self.drain(s);
            let deadline = self.now + 60_000;
            self.run_until(deadline, |w| !w.driver.requests.contains_key(&id))?;
            if self.driver.requests.contains_key(&id) {
                return Err(format!("{path} is not readable at {} after healing", self.name(s)));
            }
            failure = self.driver.failed_reads.remove(&id);
            if failure.is_none() {
                break;
            }
            // The way marked failed is tried again 30 s later.
            let later = self.now + 31_000;
            self.run_until(later, |_| false)?;
        }
        match failure {
            Some(e) => Err(format!("{path} cannot be read at {} after healing: {e}", self.name(s))),
            None => Ok(()),
        }
    }

    /// A while after the last read, no site still tracks a version read (or read ahead)
    /// through the bucket, nor a pack to read from.
    fn check_staging_settles(&mut self) -> Result<(), String> {
        // Timers run on the monotonic clock: wall-clock steps do not delay them.
        let later = self.now + 65_000;
        self.run_until(later, |_| false)?;
        for s in 0..self.len() {
            if let Some(core) = self.core(s) {
                let (reads, packs) = core.staged_reads();
                if reads + packs > 0 {
                    return Err(format!(
                        "{} still tracks {reads} staged reads and {packs} packs a minute after the last read",
                        self.name(s)
                    ));
                }
            }
        }
        Ok(())
    }
}

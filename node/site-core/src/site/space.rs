//! Space: which chunks a site deletes, and when.
//!
//! **Garbage.** A version held here that no live entry shows (no file's current version, no
//! conflict copy) becomes garbage once the operation that unreferenced it is causally stable,
//! and is collected `collect_grace_ms` later. After every change of the namespace, the versions
//! that gained or lost a reference are looked at (`Namespace::take_touched_versions`); a held
//! one found without any joins an *epoch*: this site's frontier at that moment (the last change
//! of each site integrated here), which includes whatever unreferenced it. Every site reports
//! its frontier to its peers ([`Message::Seen`], at each sync round, once it is durable). An
//! epoch is stable when every member has reported a frontier that covers the epoch's and that
//! this site's own covers. Then:
//! 1. every member has integrated the operation that unreferenced the version, so anything any
//!    of them writes from then on follows it causally, and is not concurrent with it;
//! 2. everything a member wrote before its report is here, so every operation concurrent with
//!    the unreferencing one has been applied here, and the version is still unreferenced (a
//!    version that gains a reference leaves its epoch; one that loses it again joins a new
//!    one).
//!
//! Only an operation concurrent with a remove (a move, a write) brings a deleted entry back, so
//! nothing will show the version again, except a new write of the same bytes, which brings its
//! chunks with it. A member that does not report holds collection back — it may hold the
//! operation that revives a version, so nothing is guessed — and `status` says who holds how
//! much back since when; removing it from the mesh releases what it held back.
//!
//! Membership is per node: `mesh add` of a new site must reach every node before the new site
//! writes. A node it has not reached yet does not know the site, refuses its changes, and would
//! not wait for its reports. So a change by a site this node does not know, passed on by a
//! member (and refused), or a member's report naming such a site, holds back all collection
//! here, even of stable epochs still in their grace period, until the site is added here
//! (`status` names it and a member that has its changes; a site added and removed elsewhere is
//! released by adding and removing it here too: a former member holds nothing back). A new
//! site's write that reaches no member before this node collects is still not waited for.
//!
//! Epochs are kept in order and their frontiers only grow, so stability is looked at from the
//! oldest until one is not stable. A version that becomes unreferenced less than
//! [`EPOCH_MERGE_MS`] after the newest epoch began joins it, with the newer frontier (only more
//! cautious), so a stream of single removals makes few epochs.
//!
//! **Cache.** The chunks of versions this site wrote are pinned: this site is where they are
//! (until objectives place copies elsewhere). Every other chunk held is a copy fetched from
//! others: the cache, bounded by `cache_max_bytes`. Above the bound the least recently used
//! copies (loaded for a read, served to a peer, or fetched) go, down to 15/16 of it; chunks a
//! read in progress needs, and those of packs going up to the staging bucket, stay.
//!
//! A member is trusted with its reports as with its writes: one that reports changes it does
//! not hold can make others collect what a change of its own then brings back (as it could
//! remove the file outright).
//!
//! What is deleted leaves the core's tables at once and goes to the driver as
//! [`Output::Reclaim`]. A put stores its chunks before it commits its version, and one that
//! found a chunk already stored relies on it; so the driver deletes a chunk file only if no put
//! in progress relies on it, and only if [`Site::holds_chunk`] still says no (a commit since may
//! have brought the chunk back).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use crdt_namespace::{ContentId, Frontier, SiteId};
use proto::Message;

use super::{Output, Site};
use crate::content::{ChunkHash, Manifest};

/// A version unreferenced this soon after the newest epoch began joins it.
const EPOCH_MERGE_MS: u64 = 1_000;
/// Versions collected in one turn of the core at most: other requests wait little meanwhile.
const COLLECT_BATCH_VERSIONS: usize = 4_096;
/// How often stability is looked at while garbage waits (sooner when a batch was cut short).
const COLLECT_CHECK_MS: u64 = 1_000;

/// Reports of one member kept while this site does not yet hold everything they name.
const REPORTS_PENDING_MAX: usize = 8;

/// Sites not known here that hold collection back, at most (one is enough to hold it all).
const STRANGERS_MAX: usize = 64;

/// A chunk held here.
#[derive(Clone, Copy, Debug)]
pub(super) struct ChunkInfo {
    pub(super) len: u32,
    /// Held versions it is part of.
    versions: u32,
    /// Versions this site wrote that it is part of: while any, it is not cache.
    pins: u32,
    /// When it was last fetched, loaded or served (monotonic ms): the cache's order.
    used_ms: u64,
}

/// The collector's and the cache's state.
#[derive(Default)]
pub(super) struct Space {
    /// What each member reported having integrated.
    reports: BTreeMap<SiteId, Report>,
    /// Sites not known here whose changes a member has (see [`Site::note_stranger`]), each
    /// with the first member that showed it, and when (monotonic ms).
    strangers: BTreeMap<String, (SiteId, u64)>,
    /// Held versions no live entry shows, and the epoch each joined.
    unreferenced: HashMap<ContentId, u64>,
    epochs: BTreeMap<u64, Epoch>,
    next_epoch: u64,
    /// When stability was last looked at.
    checked_ms: Option<u64>,
    /// Bytes of the chunks held.
    bytes: u64,
    /// Bytes of the chunks pinned (part of a version this site wrote).
    pinned_bytes: u64,
    /// Bytes deleted as garbage since the site started.
    collected_bytes: u64,
    /// Bytes of copies evicted from the cache since the site started.
    evicted_bytes: u64,
    /// Versions this site wrote that it no longer holds in full because a chunk of them could
    /// not be read (perhaps for a moment): their other chunks are never evicted, and the
    /// version is its own again once whole.
    lost_own: HashMap<ContentId, Manifest>,
}

struct Report {
    /// Its reports newer than `covered`, oldest first, that this site's own frontier does not
    /// cover yet (at most [`REPORTS_PENDING_MAX`]).
    pending: VecDeque<Frontier>,
    /// Its latest report that this site's own frontier covers.
    covered: Option<Frontier>,
}

struct Epoch {
    frontier: Frontier,
    /// When it began (monotonic ms).
    since_ms: u64,
    /// When it was first found stable.
    stable_since_ms: Option<u64>,
    /// Versions that joined it (some may have left since: `unreferenced` says; one that left
    /// and joined again is here once).
    versions: BTreeSet<ContentId>,
}

/// A member that holds garbage back (part of [`super::Status`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GarbageHeldBack {
    /// The member.
    pub site: String,
    /// Bytes of the versions waiting for it (their sizes).
    pub bytes: u64,
    /// Versions waiting for it.
    pub versions: usize,
    /// Since when, in milliseconds since the Unix epoch (this site's wall clock).
    pub since_unix_ms: u64,
    /// Whether it ever reported what it integrated (an old node, or one never connected since
    /// this site started, has not).
    pub reported: bool,
    /// Set when it is not a member here: a member that has its changes (it was added at some
    /// nodes and not yet at this one). It holds back all collection until it is added here
    /// (and, if it is not wanted, removed again: a former member holds nothing back).
    #[serde(default)]
    pub named_by: Option<String>,
}

/// What the space of a site holds (part of [`super::Status`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpaceStatus {
    /// Bytes of every chunk held here.
    pub store_bytes: u64,
    /// The part of them that is cache: copies of versions other sites wrote.
    pub cache_bytes: u64,
    /// The bound on the cache (`None`: unbounded).
    pub cache_max_bytes: Option<u64>,
    /// Bytes of chunks that only garbage (versions nothing refers to) still uses, waiting for
    /// stability or the grace period.
    pub garbage_bytes: u64,
    /// Garbage versions waiting.
    pub garbage_versions: usize,
    /// Members that hold garbage back: it waits until they report that they integrated the
    /// change that made it garbage.
    pub held_back_by: Vec<GarbageHeldBack>,
    /// Bytes deleted as garbage since the site started.
    pub collected_bytes: u64,
    /// Bytes of copies evicted from the cache since the site started.
    pub evicted_bytes: u64,
}

/// Each chunk of a manifest once, in order.
fn unique_chunks(manifest: &Manifest) -> impl Iterator<Item = (ChunkHash, u32)> + '_ {
    let mut seen = HashSet::new();
    manifest.chunks.iter().filter(move |c| seen.insert(c.hash)).map(|c| (c.hash, c.len))
}

impl Site {
    /// Whether chunk `hash` is held here. A driver asks just before it deletes a chunk file
    /// ([`Output::Reclaim`]): a commit since the decision may have brought it back.
    pub fn holds_chunk(&self, hash: &ChunkHash) -> bool {
        self.chunks.contains_key(hash)
    }

    /// Records a chunk as held (a new one is counted as just used).
    pub(super) fn add_chunk(&mut self, hash: ChunkHash, len: u32) {
        let now = self.now_ms;
        let info = self.chunks.entry(hash).or_insert_with(|| {
            self.space.bytes += u64::from(len);
            ChunkInfo { len, versions: 0, pins: 0, used_ms: now }
        });
        info.used_ms = now;
    }

    /// Chunk `hash` was used (loaded or served): the cache keeps it longer.
    pub(super) fn use_chunk(&mut self, hash: &ChunkHash) {
        if let Some(info) = self.chunks.get_mut(hash) {
            info.used_ms = self.now_ms;
        }
    }

    fn drop_chunk(&mut self, hash: &ChunkHash) -> u64 {
        let Some(info) = self.chunks.remove(hash) else { return 0 };
        self.space.bytes -= u64::from(info.len);
        if info.pins > 0 {
            self.space.pinned_bytes -= u64::from(info.len);
        }
        u64::from(info.len)
    }

    /// Records a version whose chunks are all here ([`Site::add_chunk`]) as held, and as this
    /// site's own if it wrote it (a copy held before becomes its own).
    pub(super) fn hold(&mut self, manifest: Manifest, own: bool) {
        if manifest.chunks.iter().any(|c| !self.chunks.contains_key(&c.hash)) {
            // A store that lists a version without its chunks: it is not held.
            tracing::warn!("version {} lacks chunks here; not counted as held", manifest.content_id());
            return;
        }
        let content = manifest.content_id();
        let own = self.space.lost_own.remove(&content).is_some() || own;
        let newly_held = !self.held.contains_key(&content);
        let newly_own = own && self.own.insert(content);
        for (hash, _) in unique_chunks(&manifest) {
            let Some(info) = self.chunks.get_mut(&hash) else { continue };
            info.versions += u32::from(newly_held);
            if newly_own {
                // The chunk's own length: a manifest may claim another.
                if info.pins == 0 {
                    self.space.pinned_bytes += u64::from(info.len);
                }
                info.pins += 1;
            }
        }
        if newly_held {
            self.held.insert(content, manifest);
            self.manifests.remove(&content);
            if !self.ns.refers_to(&content) {
                self.note_unreferenced(vec![content]);
            }
        }
    }

    /// Forgets a held version (its chunks stay, counted for one version fewer).
    pub(super) fn unhold(&mut self, content: &ContentId) -> Option<Manifest> {
        let manifest = self.held.remove(content)?;
        let own = self.own.remove(content);
        self.space.unreferenced.remove(content);
        for (hash, _) in unique_chunks(&manifest) {
            let Some(info) = self.chunks.get_mut(&hash) else { continue };
            info.versions -= 1;
            if own {
                info.pins -= 1;
                if info.pins == 0 {
                    self.space.pinned_bytes -= u64::from(info.len);
                }
            }
        }
        Some(manifest)
    }

    /// Chunk `hash` is not here after all (gone, corrupt, or not kept): neither are the
    /// versions it is part of.
    pub(super) fn forget_chunk(&mut self, hash: ChunkHash) {
        let mut needing: Vec<ContentId> = self
            .held
            .iter()
            .filter(|(_, m)| m.chunks.iter().any(|c| c.hash == hash))
            .map(|(id, _)| *id)
            .collect();
        needing.sort();
        for content in needing {
            let own = self.own.contains(&content);
            if let Some(manifest) = self.unhold(&content)
                && own
            {
                self.space.lost_own.insert(content, manifest);
            }
        }
        self.drop_chunk(&hash);
    }

    /// After a change of the namespace: held versions that lost their last reference join an
    /// epoch, those that gained one leave theirs; reports this site now covers are noted; the
    /// entries it changed go into the change log.
    pub(super) fn note_references(&mut self) {
        let changed = self.ns.take_changed_entries();
        self.changes.note(changed);
        let mut lost = Vec::new();
        for content in self.ns.take_touched_versions() {
            if !self.held.contains_key(&content) {
                continue;
            }
            if self.ns.refers_to(&content) {
                self.space.unreferenced.remove(&content);
            } else {
                lost.push(content);
            }
        }
        self.note_unreferenced(lost);
        self.cover_reports();
    }

    /// Puts held versions that no live entry shows in the newest epoch (a new one if it is
    /// stable or older than [`EPOCH_MERGE_MS`]), with this site's frontier now.
    pub(super) fn note_unreferenced(&mut self, mut versions: Vec<ContentId>) {
        if versions.is_empty() {
            return;
        }
        versions.sort();
        let frontier = self.ns.frontier();
        let now = self.now_ms;
        let space = &mut self.space;
        let joinable = space.epochs.last_key_value().and_then(|(id, epoch)| {
            (epoch.stable_since_ms.is_none() && now.saturating_sub(epoch.since_ms) < EPOCH_MERGE_MS)
                .then_some(*id)
        });
        let id = joinable.unwrap_or_else(|| {
            let id = space.next_epoch;
            space.next_epoch += 1;
            let epoch = Epoch {
                frontier: Frontier::new(),
                since_ms: now,
                stable_since_ms: None,
                versions: BTreeSet::new(),
            };
            space.epochs.insert(id, epoch);
            id
        });
        let epoch = space.epochs.get_mut(&id).expect("made above");
        epoch.frontier = frontier;
        for content in versions {
            space.unreferenced.insert(content, id);
            epoch.versions.insert(content);
        }
    }

    /// A member reported the changes it integrated.
    pub(super) fn on_seen(&mut self, from: &SiteId, frontier: Frontier) {
        if !self.config.keys.members().any(|m| m == from.as_str()) {
            return;
        }
        let report = self
            .space
            .reports
            .entry(from.clone())
            .or_insert(Report { pending: VecDeque::new(), covered: None });
        if report.pending.len() >= REPORTS_PENDING_MAX {
            // The oldest stay (this site covers them first) and the newest.
            report.pending.pop_back();
        }
        let named: Vec<SiteId> = frontier.iter().map(|(site, _)| site.clone()).collect();
        report.pending.push_back(frontier);
        for site in named {
            self.note_stranger(site.as_str(), from);
        }
        self.cover_reports();
    }

    /// Notes, for each member, its latest report that this site now holds everything in.
    fn cover_reports(&mut self) {
        if self.space.reports.values().all(|r| r.pending.is_empty()) {
            return;
        }
        let own = self.ns.frontier();
        for report in self.space.reports.values_mut() {
            // The newest report covered, and the older ones with it (a member's frontier only
            // grows; one that does not is only more cautious).
            if let Some(newest) = report.pending.iter().rposition(|f| own.covers(f)) {
                report.covered = report.pending.drain(..=newest).next_back();
            }
        }
    }

    /// A member passed on a change by `site`, or reported having one, and `site` is not a member
    /// here, nor was: it was added at some nodes and not yet at this one. Until this site knows
    /// it, it cannot integrate its changes, nor tell whether one revives what it would collect:
    /// it holds every collection back.
    pub(super) fn note_stranger(&mut self, site: &str, named_by: &SiteId) {
        if site == self.config.site.as_str()
            || self.config.keys.knows(site)
            || self.space.strangers.len() >= STRANGERS_MAX
        {
            return;
        }
        let now = self.now_ms;
        self.space.strangers.entry(site.to_owned()).or_insert_with(|| (named_by.clone(), now));
    }

    /// Tells `peer` what this site has integrated, once that is durable (a site that lost a
    /// change in a crash must not have said it had it).
    pub(super) fn report_frontier(&mut self, peer: &SiteId) {
        let frontier = self.ns.frontier();
        self.emit_after_durable(Output::Send { to: peer.clone(), message: Message::Seen { frontier } });
    }

    /// The membership changed: reports of former members no longer count.
    pub(super) fn space_membership_changed(&mut self) {
        let members: HashSet<&str> = self.config.keys.members().collect();
        self.space.reports.retain(|site, _| members.contains(site.as_str()));
        let keys = &self.config.keys;
        self.space.strangers.retain(|site, _| !keys.knows(site));
    }

    /// The sites not known here that hold every epoch back ([`Site::note_stranger`]), with a
    /// member that showed each and since when; none under the sabotage that collects early.
    fn strangers(&self) -> impl Iterator<Item = (&str, &str, u64)> {
        let sabotaged = crate::sabotage::collect_unstable();
        let strangers = self.space.strangers.iter().filter(move |_| !sabotaged);
        strangers.map(|(site, (by, since))| (site.as_str(), by.as_str(), *since))
    }

    /// Members (this site aside) whose reports do not show `frontier` integrated everywhere.
    /// (The strangers hold every epoch back besides.)
    fn holding_back<'a>(&'a self, frontier: &'a Frontier) -> impl Iterator<Item = &'a str> + 'a {
        self.config.keys.members().filter(move |member| {
            *member != self.config.site.as_str()
                && !crate::sabotage::collect_unstable()
                && !SiteId::new(member)
                    .ok()
                    .and_then(|m| self.space.reports.get(&m))
                    .and_then(|r| r.covered.as_ref())
                    .is_some_and(|c| c.covers(frontier))
        })
    }

    /// When [`Site::collect`] has work: the next look at stability while garbage waits.
    pub(super) fn space_deadline(&self) -> Option<u64> {
        if self.space.epochs.is_empty() {
            return None;
        }
        Some(self.space.checked_ms.map_or(self.now_ms, |at| at + COLLECT_CHECK_MS))
    }

    /// Collects the garbage that is stable and past its grace period, up to
    /// [`COLLECT_BATCH_VERSIONS`] versions (the rest at the next turn).
    pub(super) fn collect(&mut self) {
        if self.space_deadline().is_none_or(|due| due > self.now_ms) {
            return;
        }
        let now = self.now_ms;
        self.space.checked_ms = Some(now);
        // Versions a read or a pack going up is reading wait.
        let mut reading: HashSet<ContentId> = self.reads.values().map(|r| r.content).collect();
        reading.extend(self.stage_out.uploading_contents());
        let mut due = Vec::new();
        let mut cut_short = false;
        let ids: Vec<u64> = self.space.epochs.keys().copied().collect();
        let strangers = self.strangers().next().is_some();
        for id in ids {
            let epoch = &self.space.epochs[&id];
            // Strangers hold back even the stable epochs, while in their grace period: one of
            // them may have revived what they hold.
            if strangers
                || (epoch.stable_since_ms.is_none() && self.holding_back(&epoch.frontier).next().is_some())
            {
                break;
            }
            let epoch = self.space.epochs.get_mut(&id).expect("listed above");
            let stable_since = *epoch.stable_since_ms.get_or_insert(now);
            if stable_since.saturating_add(self.config.collect_grace_ms) > now {
                break;
            }
            let mut kept = BTreeSet::new();
            for content in std::mem::take(&mut epoch.versions) {
                if self.space.unreferenced.get(&content) != Some(&id) {
                    continue;
                }
                if reading.contains(&content) || due.len() >= COLLECT_BATCH_VERSIONS {
                    cut_short |= due.len() >= COLLECT_BATCH_VERSIONS;
                    kept.insert(content);
                } else {
                    due.push(content);
                }
            }
            if kept.is_empty() {
                self.space.epochs.remove(&id);
            } else {
                self.space.epochs.get_mut(&id).expect("listed above").versions = kept;
            }
        }
        if cut_short {
            // More is due: look again at the next turn.
            self.space.checked_ms = Some(now.saturating_sub(COLLECT_CHECK_MS));
        }
        if due.is_empty() {
            return;
        }
        let freed = self.reclaim(due, Vec::new());
        self.space.collected_bytes += freed;
    }

    /// Chunks a read in progress will deliver, or a pack going up holds.
    fn needed_by_reads(&self) -> HashSet<ChunkHash> {
        let mut needed = HashSet::new();
        for read in self.reads.values() {
            if let Some(manifest) = &read.manifest {
                needed.extend(manifest.chunks[read.next.min(read.end)..read.end].iter().map(|c| c.hash));
            }
        }
        for content in self.stage_out.uploading_contents() {
            if let Some(manifest) = self.held.get(content) {
                needed.extend(manifest.chunks.iter().map(|c| c.hash));
            }
        }
        needed
    }

    /// Forgets `versions`, deletes their chunks that no other held version uses and no read in
    /// progress needs, and `chunks` (cache copies chosen by eviction), and tells the driver.
    /// Returns the bytes of the chunks deleted.
    fn reclaim(&mut self, versions: Vec<ContentId>, chunks: Vec<ChunkHash>) -> u64 {
        let mut candidates: BTreeSet<ChunkHash> = chunks.into_iter().collect();
        for content in &versions {
            if let Some(manifest) = self.unhold(content) {
                candidates.extend(manifest.chunks.iter().map(|c| c.hash));
            }
        }
        let needed = self.needed_by_reads();
        let chunks: Vec<ChunkHash> = candidates
            .into_iter()
            .filter(|h| self.chunks.get(h).is_some_and(|i| i.versions == 0) && !needed.contains(h))
            .collect();
        let freed = chunks.iter().map(|h| self.drop_chunk(h)).sum();
        if !versions.is_empty() || !chunks.is_empty() {
            self.emit(Output::Reclaim { versions, chunks });
        }
        freed
    }

    /// Keeps the cache under `cache_max_bytes`: evicts the least recently used copies (and the
    /// versions they are part of) down to 15/16 of it.
    pub(super) fn bound_cache(&mut self) {
        let Some(max) = self.config.cache_max_bytes else { return };
        let cache = self.space.bytes - self.space.pinned_bytes;
        if cache <= max {
            return;
        }
        let target = max - max / 16;
        let mut needed = self.needed_by_reads();
        needed.extend(self.space.lost_own.values().flat_map(|m| m.chunks.iter().map(|c| c.hash)));
        let mut candidates: Vec<(u64, ChunkHash, u32)> = self
            .chunks
            .iter()
            .filter(|(h, i)| i.pins == 0 && !needed.contains(*h))
            .map(|(h, i)| (i.used_ms, *h, i.len))
            .collect();
        candidates.sort_unstable();
        let mut left = cache;
        let mut evict = HashSet::new();
        for (_, hash, len) in candidates {
            if left <= target {
                break;
            }
            left -= u64::from(len);
            evict.insert(hash);
        }
        if evict.is_empty() {
            return;
        }
        let mut versions: Vec<ContentId> = self
            .held
            .iter()
            .filter(|(_, m)| m.chunks.iter().any(|c| evict.contains(&c.hash)))
            .map(|(id, _)| *id)
            .collect();
        versions.sort();
        let mut chunks: Vec<ChunkHash> = evict.into_iter().collect();
        chunks.sort();
        // The versions are copies (a version this site wrote pins every chunk of it); their
        // other chunks stay, as cache, unless evicted too.
        for content in &versions {
            self.unhold(content);
        }
        let freed = chunks.iter().map(|h| self.drop_chunk(h)).sum::<u64>();
        self.space.evicted_bytes += freed;
        self.emit(Output::Reclaim { versions, chunks });
    }

    /// What the space of the site holds, for its status. `wall` turns monotonic times into
    /// wall-clock ones.
    pub(super) fn space_status(&self, wall: impl Fn(u64) -> u64) -> SpaceStatus {
        // Chunks only garbage uses: every held version they are part of is unreferenced.
        let mut garbage_uses: HashMap<ChunkHash, u32> = HashMap::new();
        for content in self.space.unreferenced.keys() {
            if let Some(manifest) = self.held.get(content) {
                for (hash, _) in unique_chunks(manifest) {
                    *garbage_uses.entry(hash).or_insert(0) += 1;
                }
            }
        }
        let garbage_bytes = garbage_uses
            .iter()
            .filter_map(|(hash, uses)| self.chunks.get(hash).filter(|i| i.versions == *uses))
            .map(|i| u64::from(i.len))
            .sum();
        let mut held_back: BTreeMap<&str, GarbageHeldBack> = BTreeMap::new();
        let strangers: Vec<(&str, Option<&str>, u64)> =
            self.strangers().map(|(site, by, since)| (site, Some(by), since)).collect();
        for (id, epoch) in &self.space.epochs {
            let mut holding = strangers.clone();
            if epoch.stable_since_ms.is_none() {
                holding
                    .extend(self.holding_back(&epoch.frontier).map(|member| (member, None, epoch.since_ms)));
            }
            if holding.is_empty() {
                continue;
            }
            let waiting: Vec<&ContentId> =
                epoch.versions.iter().filter(|c| self.space.unreferenced.get(c) == Some(id)).collect();
            let bytes: u64 = waiting.iter().filter_map(|c| self.held.get(c)).map(|m| m.size).sum();
            for (site, named_by, since) in holding {
                let entry = held_back.entry(site).or_insert_with(|| GarbageHeldBack {
                    site: site.to_owned(),
                    bytes: 0,
                    versions: 0,
                    since_unix_ms: wall(since.max(epoch.since_ms)),
                    reported: SiteId::new(site).is_ok_and(|m| self.space.reports.contains_key(&m)),
                    named_by: named_by.map(str::to_owned),
                });
                entry.bytes += bytes;
                entry.versions += waiting.len();
            }
        }
        SpaceStatus {
            store_bytes: self.space.bytes,
            cache_bytes: self.space.bytes - self.space.pinned_bytes,
            cache_max_bytes: self.config.cache_max_bytes,
            garbage_bytes,
            garbage_versions: self.space.unreferenced.len(),
            held_back_by: held_back.into_values().collect(),
            collected_bytes: self.space.collected_bytes,
            evicted_bytes: self.space.evicted_bytes,
        }
    }

    /// The space invariants: the byte counts and every chunk's counts of held versions and pins
    /// match the tables; every unreferenced version is held, shown by no live entry, and in
    /// the epoch it joined.
    pub(super) fn check_space_invariants(&self) -> Result<(), String> {
        let mut versions: HashMap<ChunkHash, (u32, u32)> = HashMap::new();
        for (content, manifest) in &self.held {
            let own = self.own.contains(content);
            for (hash, _) in unique_chunks(manifest) {
                let counts = versions.entry(hash).or_insert((0, 0));
                counts.0 += 1;
                counts.1 += u32::from(own);
            }
        }
        let (mut bytes, mut pinned) = (0u64, 0u64);
        for (hash, info) in &self.chunks {
            let (v, p) = versions.get(hash).copied().unwrap_or((0, 0));
            if (info.versions, info.pins) != (v, p) {
                return Err(format!(
                    "chunk {hash} counted in {} versions ({} own), is in {v} ({p} own)",
                    info.versions, info.pins
                ));
            }
            bytes += u64::from(info.len);
            pinned += if p > 0 { u64::from(info.len) } else { 0 };
        }
        if (bytes, pinned) != (self.space.bytes, self.space.pinned_bytes) {
            return Err(format!(
                "{bytes} bytes held ({pinned} pinned), counted {} ({})",
                self.space.bytes, self.space.pinned_bytes
            ));
        }
        if let Some(content) = self.own.iter().find(|c| !self.held.contains_key(c)) {
            return Err(format!("version {content} is own but not held"));
        }
        for (content, id) in &self.space.unreferenced {
            if !self.held.contains_key(content) || self.ns.refers_to(content) {
                return Err(format!(
                    "version {content} is counted as garbage but is not held or is referred to"
                ));
            }
            if !self.space.epochs.contains_key(id) {
                return Err(format!("version {content} is in epoch {id}, which is gone"));
            }
        }
        if let Some(content) =
            self.held.keys().find(|c| !self.ns.refers_to(c) && !self.space.unreferenced.contains_key(c))
        {
            return Err(format!("version {content} is held, shown by no entry, and not counted as garbage"));
        }
        Ok(())
    }
}

//! Reads across regions through the staging bucket, on both sides.
//!
//! **Reader** (a site of region R that reads a version only sites of region S hold): asks a
//! holder of S — the same one every site of R picks, the first connected in site order — where
//! the version is staged for R ([`Message::Stage`]). The answer names a *pack*; the reader opens
//! it once (one bucket request reads the header, and every chunk of a small pack) and reads the
//! version's chunks from it. Once the version is held here, the reader tells the sites of S
//! ([`Message::Unstage`]). A pack that turns out missing, tampered with or truncated is reported
//! to the holder on the next ask, which stages the version again.
//!
//! **Holder**: versions asked for by a region are queued, and up to
//! [`SiteConfig::stage_uploads_in_flight`] packs per region go up at once; the versions asked
//! for while those are in flight make up the next pack. One version is in one pack per region
//! pair at a time, shared by every site of that region: an upload per version and region pair,
//! and a bucket request per batch on each side rather than per file. A pack is deleted when
//! every site of its region confirmed every version in it, when all its versions were confirmed
//! by some site and [`UNSTAGE_GRACE_MS`] passed since the last confirmation (the other sites
//! of the region fetch from those that hold it), or after [`PACK_IDLE_MS`] without a request.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use crdt_namespace::{ContentId, SiteId};
use transport::proto::Message;

use super::{Output, Site, SiteError, Transfer};
use crate::content::{ChunkHash, ChunkRef};

/// A staged pack the reader found unusable is not tried again for this long (in `auto` mode the
/// reads go direct meanwhile; in `staged` mode they fail).
pub(super) const STAGE_RETRY_MS: u64 = 30_000;

/// Once some site of the receiving region holds each version of a pack, the others can fetch
/// them from those sites: the pack is deleted this long after the last confirmation.
pub(super) const UNSTAGE_GRACE_MS: u64 = 60_000;

/// An uploaded pack nobody asked about or confirmed for this long is deleted (its readers
/// died); a later read stages its versions again.
pub(super) const PACK_IDLE_MS: u64 = 3_600_000;

/// Most versions in one pack.
const PACK_VERSIONS_MAX: usize = 1_024;

/// Bytes of versions batched into one pack; a larger version goes alone.
const PACK_BYTES_MAX: u64 = 64 << 20;

/// The name of the pack `serial` that `site` stages from `from_region` to `to_region` with the
/// given versions: unique per upload while the site runs, and the same batch after a restart
/// names the same (identical) object.
pub fn pack_name(
    site: &SiteId,
    serial: u64,
    from_region: &str,
    to_region: &str,
    contents: &[ContentId],
) -> Vec<u8> {
    let mut hasher = blake3::Hasher::new();
    for part in [site.as_str().as_bytes(), from_region.as_bytes(), to_region.as_bytes()] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.update(&serial.to_le_bytes());
    for content in contents {
        hasher.update(&content.0);
    }
    [b"meridian pack v2\0".as_slice(), hasher.finalize().as_bytes()].concat()
}

/// Why the bucket did not give what was asked for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct BucketError {
    /// What happened.
    pub reason: String,
    /// The object is missing, tampered with or truncated (as opposed to a request that failed):
    /// it must be staged again.
    pub spoiled: bool,
}

impl BucketError {
    /// A request that failed; the object may be fine.
    pub fn failed(reason: impl Into<String>) -> BucketError {
        BucketError { reason: reason.into(), spoiled: false }
    }

    /// The object is unusable.
    pub fn spoiled(reason: impl Into<String>) -> BucketError {
        BucketError { reason: reason.into(), spoiled: true }
    }
}

/// Where a read through the bucket stands, per version.
#[derive(Debug)]
enum Stage {
    /// Holder `from` was asked where the version is staged (and asked again every
    /// `who_has_retry_ms`, as a question lost on the way is only a delay); `tried` are the
    /// holders asked before it that could not stage it.
    Requested {
        from: SiteId,
        since_ms: u64,
        last_ask_ms: u64,
        spoiled: Option<Vec<u8>>,
        tried: BTreeSet<SiteId>,
    },
    /// In this pack (an entry of `packs_in`); `restaged` if the holder was told the pack it
    /// named before was spoiled.
    InPack { name: Vec<u8>, restaged: bool },
    /// Unusable (why, since when, and the pack found spoiled, reported when asking again).
    Failed { reason: String, since_ms: u64, spoiled: Option<Vec<u8>> },
}

/// A version read through the bucket.
#[derive(Debug)]
struct StagedRead {
    /// The region it is staged from.
    from_region: String,
    /// The holder that last named a pack for it: the one to tell once it is held here.
    stager: Option<SiteId>,
    state: Stage,
}

/// A pack this site reads from.
struct PackIn {
    /// Each chunk's index in the pack, once opened.
    index: Option<HashMap<ChunkHash, u32>>,
    /// The versions read from it.
    contents: BTreeSet<ContentId>,
}

/// A pack this site uploaded, or is uploading.
struct PackOut {
    region: String,
    contents: Vec<ContentId>,
    uploaded: bool,
    /// The sites of `region` that hold each version since (confirmed it).
    confirmed: HashMap<ContentId, BTreeSet<SiteId>>,
    /// Versions every site of `region` confirmed.
    complete: usize,
    /// When it was last asked about or confirmed.
    last_ms: u64,
}

/// The staging state of a site.
#[derive(Default)]
pub(super) struct StageState {
    /// Versions being read through the bucket.
    reads: HashMap<ContentId, StagedRead>,
    /// Packs being read from, by name.
    packs_in: HashMap<Vec<u8>, PackIn>,
    /// Packs uploaded or uploading, by name.
    packs_out: HashMap<Vec<u8>, PackOut>,
    /// The pack that holds (or will hold) a version for a region.
    staged_out: HashMap<(ContentId, String), Vec<u8>>,
    /// Versions asked for and not in a pack yet, per region, in order.
    queue: BTreeMap<String, VecDeque<ContentId>>,
    /// Sites waiting for a version queued or uploading for their region.
    waiting: HashMap<(ContentId, String), Vec<SiteId>>,
    /// Packs uploading, per region.
    uploading: BTreeMap<String, usize>,
    /// Packs started since the site started (part of their names).
    serial: u64,
    pub(super) bytes_from_staging: u64,
    pub(super) bytes_to_staging: u64,
}

impl StageState {
    /// Packs read from or uploaded that are still tracked (for the status).
    pub(super) fn packs(&self) -> usize {
        self.packs_in.len() + self.packs_out.len()
    }
}

impl Site {
    /// The region to read `content` from through the bucket, if that is how it is read now:
    /// staging is on, holders are connected, none of them in this region.
    fn staging_region(&self, content: &ContentId) -> Option<String> {
        if !self.config.staging || self.config.transfer == Transfer::Direct {
            return None;
        }
        let connected: Vec<&SiteId> =
            self.holders.get(content)?.iter().filter(|h| self.peers.contains_key(*h)).collect();
        if connected.iter().any(|h| self.region_of(h) == self.config.region) {
            return None;
        }
        connected.iter().map(|h| self.region_of(h)).min().map(str::to_owned)
    }

    /// Routes a fetch through the bucket when that is how its version is read: reads the chunk
    /// from the open pack, or waits while the pack is asked for or opened. Returns whether the
    /// fetch was dealt with; `false` sends it to a holder directly.
    pub(super) fn fetch_through_staging(&mut self, hash: ChunkHash) -> bool {
        let Some(fetch) = self.fetches.get(&hash) else { return true };
        let content = fetch.content;
        let Some(from_region) = self.staging_region(&content) else { return false };
        let now = self.now_ms;
        let ask = match self.stage.reads.get(&content) {
            None => Some(None),
            Some(StagedRead { state: Stage::Failed { since_ms, spoiled, .. }, .. })
                if now.saturating_sub(*since_ms) >= STAGE_RETRY_MS =>
            {
                Some(spoiled.clone())
            }
            Some(_) => None,
        };
        if let Some(spoiled) = ask {
            // New, or failed long enough ago to try again.
            self.ask_to_stage(content, from_region, spoiled, BTreeSet::new());
        }
        let read = self.stage.reads.get(&content).expect("asked above");
        let (name, reason) = match &read.state {
            Stage::InPack { name, .. } => match self.stage.packs_in.get(name).map(|p| &p.index) {
                Some(Some(index)) => match index.get(&hash) {
                    Some(&index) => {
                        let name = name.clone();
                        let request = self.next_request;
                        self.next_request += 1;
                        let site = self.config.site.clone();
                        let fetch = self.fetches.get_mut(&hash).expect("checked above");
                        fetch.request = request;
                        fetch.from = site;
                        fetch.attempts += 1;
                        fetch.parked_since_ms = None;
                        fetch.sent_ms = now;
                        self.emit(Output::StageRead { request, name, chunk: hash, index });
                        return true;
                    }
                    None => (name.clone(), format!("the staged pack lacks chunk {hash}")),
                },
                Some(None) => return self.park(hash),
                None => {
                    let reason = "the pack it is in was forgotten".to_owned();
                    return self.staging_failed(content, reason, hash);
                }
            },
            Stage::Requested { .. } => return self.park(hash),
            Stage::Failed { reason, .. } => {
                let reason = reason.clone();
                return self.staging_failed(content, reason, hash);
            }
        };
        // Not the pack the holder said: asked again (or failed), the fetch goes where that leads.
        self.fail_pack(&name, BucketError::spoiled(reason));
        self.fetch_through_staging(hash)
    }

    fn park(&mut self, hash: ChunkHash) -> bool {
        let now = self.now_ms;
        let fetch = self.fetches.get_mut(&hash).expect("a fetch being routed");
        fetch.parked_since_ms.get_or_insert(now);
        true
    }

    /// Asks a connected holder of `from_region` not in `tried` where `content` is staged for
    /// this region. Every reader asks the same one, so the version goes up once: the site that
    /// wrote it (which keeps what it wrote), else the first holder in site order.
    fn ask_to_stage(
        &mut self,
        content: ContentId,
        from_region: String,
        spoiled: Option<Vec<u8>>,
        tried: BTreeSet<SiteId>,
    ) {
        let writer = self.reads.values().find(|r| r.content == content).and_then(|r| r.writer.clone());
        let holder = writer
            .iter()
            .chain(self.holders.get(&content).into_iter().flatten())
            .find(|h| self.peers.contains_key(*h) && self.region_of(h) == from_region && !tried.contains(*h))
            .cloned();
        let now = self.now_ms;
        let state = match holder {
            Some(from) => {
                let region = self.config.region.clone();
                let message = Message::Stage { content, region, spoiled: spoiled.clone() };
                self.emit(Output::Send { to: from.clone(), message });
                Stage::Requested { from, since_ms: now, last_ask_ms: now, spoiled, tried }
            }
            None => Stage::Failed {
                reason: format!("no site of region {from_region} is connected to stage it"),
                since_ms: now,
                spoiled,
            },
        };
        self.leave_pack(content);
        let stager = self.stage.reads.get(&content).and_then(|r| r.stager.clone());
        self.stage.reads.insert(content, StagedRead { from_region, stager, state });
    }

    /// Staging does not work for `content` right now: in `auto` mode the fetch goes direct
    /// (returns `false`), in `staged` mode its readers fail.
    fn staging_failed(&mut self, content: ContentId, reason: String, hash: ChunkHash) -> bool {
        if let Some(read) = self.stage.reads.get_mut(&content)
            && !matches!(read.state, Stage::Failed { .. })
        {
            read.state = Stage::Failed { reason: reason.clone(), since_ms: self.now_ms, spoiled: None };
        }
        if self.config.transfer != Transfer::Staged {
            return false;
        }
        let fetch = self.fetches.remove(&hash).expect("a fetch being routed");
        for (id, _) in fetch.waiters {
            if let Some(r) = self.reads.get(&id) {
                let error = SiteError::Staging { path: r.path.clone(), reason: reason.clone() };
                self.fail_read(id, error);
            }
        }
        true
    }

    /// `content` no longer reads from the pack it was in.
    fn leave_pack(&mut self, content: ContentId) {
        let Some(StagedRead { state: Stage::InPack { name, .. }, .. }) = self.stage.reads.get(&content)
        else {
            return;
        };
        if let Some(pack) = self.stage.packs_in.get_mut(name) {
            pack.contents.remove(&content);
            if pack.contents.is_empty() {
                let name = name.clone();
                self.stage.packs_in.remove(&name);
            }
        }
    }

    /// A pack is unusable. A spoiled one is reported to its holder at once, which stages its
    /// versions again (once: if that pack is spoiled too, or the bucket failed, the versions are
    /// read another way for now, and the holder is asked again after [`STAGE_RETRY_MS`]).
    fn fail_pack(&mut self, name: &[u8], error: BucketError) {
        let Some(pack) = self.stage.packs_in.remove(name) else { return };
        for content in &pack.contents {
            let Some(read) = self.stage.reads.get_mut(content) else { continue };
            let spoiled = error.spoiled.then(|| name.to_vec());
            if error.spoiled && matches!(read.state, Stage::InPack { restaged: false, .. }) {
                let from_region = read.from_region.clone();
                self.ask_to_stage(*content, from_region, spoiled, BTreeSet::new());
            } else {
                read.state = Stage::Failed { reason: error.reason.clone(), since_ms: self.now_ms, spoiled };
            }
        }
        for content in pack.contents {
            self.resend_parked(Some(content));
        }
    }

    /// The answer of a holder asked where `content` is staged.
    pub(super) fn on_staged(
        &mut self,
        from: &SiteId,
        content: ContentId,
        region: String,
        pack: Result<Vec<u8>, String>,
    ) {
        if region != self.config.region {
            return;
        }
        let Some(read) = self.stage.reads.get_mut(&content) else { return };
        let Stage::Requested { from: asked, tried, spoiled, .. } = &mut read.state else { return };
        if asked != from {
            return;
        }
        match pack {
            Ok(name) => {
                read.state = Stage::InPack { name: name.clone(), restaged: spoiled.is_some() };
                read.stager = Some(from.clone());
                match self.stage.packs_in.entry(name.clone()) {
                    Entry::Occupied(mut pack) => {
                        pack.get_mut().contents.insert(content);
                    }
                    Entry::Vacant(pack) => {
                        pack.insert(PackIn { index: None, contents: BTreeSet::from([content]) });
                        self.emit(Output::StageOpen { name });
                    }
                }
            }
            Err(reason) => {
                // Another holder may do it (the writer may no longer hold what it wrote); with
                // none left, the refusal is the reason.
                let mut tried = std::mem::take(tried);
                tried.insert(from.clone());
                let (from_region, spoiled) = (read.from_region.clone(), spoiled.take());
                self.ask_to_stage(content, from_region, spoiled, tried);
                if let Some(StagedRead { state: Stage::Failed { reason: why, .. }, .. }) =
                    self.stage.reads.get_mut(&content)
                {
                    *why = format!("{from} could not stage it: {reason}");
                }
            }
        }
        self.resend_parked(Some(content));
    }

    /// The result of an [`Output::StageOpen`]: the pack's chunks, `None` if it is not in the
    /// bucket, or why it could not be opened.
    pub fn handle_stage_opened(
        &mut self,
        now_ms: u64,
        name: Vec<u8>,
        opened: Result<Option<Vec<ChunkHash>>, BucketError>,
    ) {
        self.now_ms = self.now_ms.max(now_ms);
        let Some(pack) = self.stage.packs_in.get_mut(&name) else { return };
        if pack.index.is_some() {
            return;
        }
        match opened {
            Ok(Some(chunks)) => {
                pack.index = Some(chunks.into_iter().enumerate().map(|(i, h)| (h, i as u32)).collect());
                let contents: Vec<ContentId> = pack.contents.iter().copied().collect();
                for content in contents {
                    self.resend_parked(Some(content));
                }
            }
            Ok(None) => {
                let error = BucketError::spoiled("its holder staged it, but the bucket does not have it");
                self.fail_pack(&name, error);
            }
            Err(error) => self.fail_pack(&name, error),
        }
    }

    /// The result of an [`Output::StageRead`]: the chunk's bytes, or why they could not be had.
    /// A chunk that does not match its hash spoils the pack.
    pub fn handle_stage_chunk(
        &mut self,
        now_ms: u64,
        request: u64,
        hash: ChunkHash,
        read: Result<Vec<u8>, BucketError>,
    ) {
        self.now_ms = self.now_ms.max(now_ms);
        let Some(fetch) = self.fetches.get(&hash) else { return };
        if fetch.request != request || fetch.from != self.config.site {
            return;
        }
        let content = fetch.content;
        let error = match read {
            Ok(data) if data.len() == fetch.len as usize && ChunkHash::of(&data) == hash => {
                self.stage.bytes_from_staging += data.len() as u64;
                return self.accept_chunk(hash, data);
            }
            Ok(_) => {
                BucketError::spoiled(format!("chunk {hash} read from the bucket does not match its hash"))
            }
            Err(error) => error,
        };
        // The pack is not used again for now, and the chunk is fetched another way, as the
        // configuration allows.
        if let Some(StagedRead { state: Stage::InPack { name, .. }, .. }) = self.stage.reads.get(&content) {
            let name = name.clone();
            self.fail_pack(&name, error);
        }
        self.send_fetch(hash);
    }

    /// A version read through the bucket is held here now: tell the holder that staged it (or,
    /// if none did or it is gone, every site of its region).
    pub(super) fn confirm_staged(&mut self, content: ContentId) {
        self.leave_pack(content);
        let Some(read) = self.stage.reads.remove(&content) else { return };
        let region = self.config.region.clone();
        let to: Vec<SiteId> = match read.stager.filter(|s| self.peers.contains_key(s)) {
            Some(stager) => vec![stager],
            None => self.peers.keys().filter(|p| self.region_of(p) == read.from_region).cloned().collect(),
        };
        for to in to {
            self.emit(Output::Send { to, message: Message::Unstage { content, region: region.clone() } });
        }
    }

    /// A site of another region asks where version `content` is staged for it.
    pub(super) fn stage_for(
        &mut self,
        from: &SiteId,
        content: ContentId,
        region: String,
        spoiled: Option<Vec<u8>>,
    ) {
        let refuse = |reason: String| Output::Send {
            to: from.clone(),
            message: Message::Staged { content, region: region.clone(), pack: Err(reason) },
        };
        if !self.config.staging {
            return self.emit(refuse(format!("site {} has no staging bucket", self.config.site)));
        }
        if !self.held.contains_key(&content) {
            return self.emit(refuse(format!("site {} does not hold version {content}", self.config.site)));
        }
        let key = (content, region.clone());
        if let Some(bad) = spoiled
            && self.stage.staged_out.get(&key) == Some(&bad)
            && self.stage.packs_out.get(&bad).is_some_and(|p| p.uploaded)
        {
            tracing::warn!(site = %from, "a staged pack was found spoiled: staging its versions again");
            self.drop_pack(&bad);
        }
        let in_pack = match self.stage.staged_out.get(&key) {
            Some(name) => {
                let pack = self.stage.packs_out.get_mut(name).expect("a staged version is in a pack");
                if pack.uploaded {
                    pack.last_ms = self.now_ms;
                    let message = Message::Staged { content, region, pack: Ok(name.clone()) };
                    return self.emit(Output::Send { to: from.clone(), message });
                }
                true
            }
            None => false,
        };
        let waiting = self.stage.waiting.entry(key).or_default();
        if waiting.is_empty() && !in_pack {
            self.stage.queue.entry(region.clone()).or_default().push_back(content);
        }
        if !waiting.contains(from) {
            waiting.push(from.clone());
        }
        self.start_uploads(&region);
    }

    /// Starts uploading the versions queued for `region`, in packs, up to the bound of uploads
    /// in flight.
    fn start_uploads(&mut self, region: &str) {
        let Some(mut queue) = self.stage.queue.remove(region) else { return };
        while self.stage.uploading.get(region).copied().unwrap_or(0) < self.config.stage_uploads_in_flight {
            let mut contents = Vec::new();
            let mut chunks: Vec<ChunkRef> = Vec::new();
            let mut seen = HashSet::new();
            let mut bytes = 0;
            while let Some(&content) = queue.front() {
                let Some(manifest) = self.held.get(&content) else {
                    queue.pop_front();
                    let reason = format!("site {} no longer holds version {content}", self.config.site);
                    for to in self.stage.waiting.remove(&(content, region.to_owned())).unwrap_or_default() {
                        let message =
                            Message::Staged { content, region: region.to_owned(), pack: Err(reason.clone()) };
                        self.emit(Output::Send { to, message });
                    }
                    continue;
                };
                if !contents.is_empty()
                    && (contents.len() >= PACK_VERSIONS_MAX || bytes + manifest.size > PACK_BYTES_MAX)
                {
                    break;
                }
                queue.pop_front();
                contents.push(content);
                bytes += manifest.size;
                chunks.extend(manifest.chunks.iter().filter(|c| seen.insert(c.hash)).copied());
            }
            if contents.is_empty() {
                break;
            }
            let serial = self.stage.serial;
            self.stage.serial += 1;
            let name = pack_name(&self.config.site, serial, &self.config.region, region, &contents);
            for content in &contents {
                self.stage.staged_out.insert((*content, region.to_owned()), name.clone());
            }
            let pack = PackOut {
                region: region.to_owned(),
                contents,
                uploaded: false,
                confirmed: HashMap::new(),
                complete: 0,
                last_ms: self.now_ms,
            };
            self.stage.packs_out.insert(name.clone(), pack);
            *self.stage.uploading.entry(region.to_owned()).or_default() += 1;
            self.emit(Output::StageUpload { name, region: region.to_owned(), chunks });
        }
        if !queue.is_empty() {
            self.stage.queue.insert(region.to_owned(), queue);
        }
    }

    /// The result of an [`Output::StageUpload`]: the bytes uploaded, or why it failed.
    pub fn handle_stage_uploaded(&mut self, now_ms: u64, name: Vec<u8>, uploaded: Result<u64, String>) {
        self.now_ms = self.now_ms.max(now_ms);
        let Some(pack) = self.stage.packs_out.get_mut(&name) else { return };
        if pack.uploaded {
            return;
        }
        let region = pack.region.clone();
        if let Some(n) = self.stage.uploading.get_mut(&region) {
            *n = n.saturating_sub(1);
        }
        let contents = match uploaded {
            Ok(bytes) => {
                self.stage.bytes_to_staging += bytes;
                pack.uploaded = true;
                pack.last_ms = self.now_ms;
                pack.contents.clone()
            }
            Err(_) => {
                let pack = self.stage.packs_out.remove(&name).expect("checked above");
                for content in &pack.contents {
                    self.stage.staged_out.remove(&(*content, region.clone()));
                }
                pack.contents
            }
        };
        let answer = uploaded.map(|_| name);
        for content in contents {
            for to in self.stage.waiting.remove(&(content, region.clone())).unwrap_or_default() {
                let message = Message::Staged { content, region: region.clone(), pack: answer.clone() };
                self.emit(Output::Send { to, message });
            }
        }
        self.start_uploads(&region);
    }

    /// A site of `region` holds `content` now, read from the bucket.
    pub(super) fn on_unstage(&mut self, from: &SiteId, content: ContentId, region: String) {
        if self.config.regions.get(from) != Some(&region) {
            return;
        }
        let Some(name) = self.stage.staged_out.get(&(content, region.clone())).cloned() else { return };
        let pack = self.stage.packs_out.get_mut(&name).expect("a staged version is in a pack");
        if !pack.uploaded {
            return;
        }
        pack.last_ms = self.now_ms;
        let confirmed = pack.confirmed.entry(content).or_default();
        if confirmed.insert(from.clone())
            && self.config.regions.iter().filter(|(_, r)| **r == region).all(|(s, _)| confirmed.contains(s))
        {
            pack.complete += 1;
        }
        if pack.complete == pack.contents.len() {
            self.drop_pack(&name);
        }
    }

    /// Deletes a pack this site uploaded.
    fn drop_pack(&mut self, name: &[u8]) {
        let Some(pack) = self.stage.packs_out.remove(name) else { return };
        for content in pack.contents {
            let key = (content, pack.region.clone());
            if self.stage.staged_out.get(&key).is_some_and(|n| n == name) {
                self.stage.staged_out.remove(&key);
            }
        }
        self.emit(Output::StageDelete { name: name.to_vec() });
    }

    /// A peer is gone: the versions it was asked to stage are asked of another holder.
    pub(super) fn staging_peer_down(&mut self, peer: &SiteId) {
        let asked: Vec<(ContentId, String, Option<Vec<u8>>)> = self
            .stage
            .reads
            .iter()
            .filter_map(|(content, read)| match &read.state {
                Stage::Requested { from, spoiled, .. } if from == peer => {
                    Some((*content, read.from_region.clone(), spoiled.clone()))
                }
                _ => None,
            })
            .collect();
        for (content, from_region, spoiled) in asked {
            self.ask_to_stage(content, from_region, spoiled, BTreeSet::new());
            self.resend_parked(Some(content));
        }
    }

    /// Time passes: ask again, give up on holders that do not answer, delete packs no longer
    /// needed.
    pub(super) fn staging_timeout(&mut self, now_ms: u64) {
        let done: Vec<Vec<u8>> = self
            .stage
            .packs_out
            .iter()
            .filter(|(_, p)| {
                let idle = now_ms.saturating_sub(p.last_ms);
                let all_confirmed = p.contents.iter().all(|c| p.confirmed.contains_key(c));
                p.uploaded && ((all_confirmed && idle >= UNSTAGE_GRACE_MS) || idle >= PACK_IDLE_MS)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in done {
            self.drop_pack(&name);
        }
        let retry = self.config.who_has_retry_ms;
        let mut ask_again = Vec::new();
        let mut stalled = Vec::new();
        for (content, read) in &mut self.stage.reads {
            if let Stage::Requested { from, since_ms, last_ask_ms, spoiled, .. } = &mut read.state {
                if now_ms.saturating_sub(*since_ms) >= self.config.stage_timeout_ms {
                    stalled.push(*content);
                } else if now_ms.saturating_sub(*last_ask_ms) >= retry {
                    *last_ask_ms = now_ms;
                    ask_again.push((from.clone(), *content, spoiled.clone()));
                }
            }
        }
        for (to, content, spoiled) in ask_again {
            let region = self.config.region.clone();
            self.emit(Output::Send { to, message: Message::Stage { content, region, spoiled } });
        }
        for content in stalled {
            let read = self.stage.reads.get_mut(&content).expect("listed above");
            read.state = Stage::Failed {
                reason: "the holder asked to stage it did not answer in time".into(),
                since_ms: now_ms,
                spoiled: None,
            };
            self.resend_parked(Some(content));
        }
    }
}

//! Reads across regions through the staging bucket, on both sides.
//!
//! **Reader** (a site of region R that reads a version only sites of region S hold): asks a
//! holder of S — the same one every site of R picks, the first connected in site order — where
//! the version is staged for R ([`Message::Stage`]). The answer names a *pack*; the reader opens
//! it once (one bucket request reads the header, and every chunk of a small pack) and reads the
//! version's chunks from it. Once the version is held here, the reader tells the holder
//! ([`Message::Unstage`], batched). A pack that turns out missing, tampered with or truncated is
//! reported to the holder on the next ask, which stages the version again.
//!
//! **Read-ahead**: a read of a file that asks for its version also asks for up to
//! [`SiteConfig::stage_read_ahead`] small files that follow it in its directory (what a reader
//! going through the directory reads next), in the same message; the holder stages them in the
//! same pack and sends their manifests with the answer, so reading them costs neither a "who
//! holds" round nor another upload. When a read reaches the middle of what was read ahead, the
//! next files are asked for. Files read ahead and not read within [`READ_AHEAD_IDLE_MS`] are
//! let go (and the holder told).
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

use crdt_namespace::EntryKind;
use crdt_namespace::{ContentId, SiteId};
use proto::{Message, STAGE_VERSIONS_MAX, StagedVersion};

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

/// Largest file read ahead, and largest version whose manifest goes with the answer to a
/// [`Message::Stage`].
const READ_AHEAD_FILE_BYTES_MAX: u64 = 1 << 20;

/// Bytes read ahead by one ask.
const READ_AHEAD_BYTES_MAX: u64 = 16 << 20;

/// A version read ahead that no read wanted for this long is let go.
pub(super) const READ_AHEAD_IDLE_MS: u64 = 60_000;

/// Confirmations ([`Message::Unstage`]) wait to go together while reads through the bucket go
/// on, up to this many per holder (and at most until the next tick).
const UNSTAGE_BATCH_MAX: usize = 256;

/// The name of the pack `serial` that `site` stages from `from_region` to `to_region` with the
/// given versions: unique per upload while the site runs, and the same batch after a restart
/// names the same (identical) object.
pub fn pack_name(
    site: &SiteId,
    serial: u64,
    from_region: &str,
    to_region: &str,
    contents: &[ContentId],
) -> PackName {
    let mut hasher = blake3::Hasher::new();
    for part in [site.as_str().as_bytes(), from_region.as_bytes(), to_region.as_bytes()] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.update(&serial.to_le_bytes());
    for content in contents {
        hasher.update(&content.0);
    }
    PackName([b"meridian pack v2\0".as_slice(), hasher.finalize().as_bytes()].concat())
}

/// The name of a staged pack ([`pack_name`]): the bucket's object key is derived from it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackName(Vec<u8>);

impl PackName {
    /// A name as it travels in a message or comes back from a driver.
    pub fn from_bytes(bytes: Vec<u8>) -> PackName {
        PackName(bytes)
    }

    /// The name's bytes, for a message.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl std::ops::Deref for PackName {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::borrow::Borrow<[u8]> for PackName {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for PackName {
    /// The last four bytes in hexadecimal: enough to tell packs apart in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pack ..")?;
        self.0.iter().rev().take(4).rev().try_for_each(|b| write!(f, "{b:02x}"))
    }
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

/// The result of a staging output, for the core.
#[derive(Debug)]
pub enum StagingEvent {
    /// A pack was looked for.
    Opened {
        /// The pack.
        name: PackName,
        /// Its chunks, `None` if not in the bucket, or why it could not be opened.
        opened: Result<Option<Vec<ChunkHash>>, BucketError>,
    },
    /// A chunk was read.
    Chunk {
        /// The fetch's request id.
        request: u64,
        /// The chunk.
        chunk: ChunkHash,
        /// Its bytes, or why not.
        read: Result<Vec<u8>, BucketError>,
    },
    /// A pack was uploaded.
    Uploaded {
        /// The pack.
        name: PackName,
        /// Bytes uploaded, or why not.
        uploaded: Result<u64, String>,
    },
}

impl StagingEvent {
    /// Hands the result to the core.
    pub fn deliver(self, site: &mut Site, now_ms: u64) {
        match self {
            StagingEvent::Opened { name, opened } => site.handle_stage_opened(now_ms, name, opened),
            StagingEvent::Chunk { request, chunk, read } => {
                site.handle_stage_chunk(now_ms, request, chunk, read)
            }
            StagingEvent::Uploaded { name, uploaded } => site.handle_stage_uploaded(now_ms, name, uploaded),
        }
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
        spoiled: Option<PackName>,
        tried: BTreeSet<SiteId>,
    },
    /// In this pack (an entry of `packs_in`); `restaged` if the holder was told the pack it
    /// named before was spoiled.
    InPack { name: PackName, restaged: bool },
    /// Unusable (why, since when, and the pack found spoiled, reported when asking again).
    Failed { reason: String, since_ms: u64, spoiled: Option<PackName> },
}

/// A version read through the bucket.
#[derive(Debug)]
struct StagedRead {
    /// The region it is staged from.
    from_region: String,
    /// The holder that last named a pack for it: the one to tell once it is held here.
    stager: Option<SiteId>,
    state: Stage,
    /// Asked for ahead of any read, since then; `None` once a read wants it.
    ahead_since_ms: Option<u64>,
    /// The first read that wants it asks for the next files ahead.
    trigger: bool,
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
    packs_in: HashMap<PackName, PackIn>,
    /// Packs uploaded or uploading, by name.
    packs_out: HashMap<PackName, PackOut>,
    /// The pack that holds (or will hold) a version for a region.
    staged_out: HashMap<(ContentId, String), PackName>,
    /// Versions asked for and not in a pack yet, per region, in order.
    queue: BTreeMap<String, VecDeque<ContentId>>,
    /// Sites waiting for a version queued or uploading for their region.
    waiting: HashMap<(ContentId, String), Vec<SiteId>>,
    /// Packs uploading, per region.
    uploading: BTreeMap<String, usize>,
    /// Packs started since the site started (part of their names).
    serial: u64,
    /// Confirmations not sent yet, per holder.
    unstage: BTreeMap<SiteId, Vec<ContentId>>,
    pub(super) bytes_from_staging: u64,
    pub(super) bytes_to_staging: u64,
}

impl StageState {
    /// Packs read from or uploaded that are still tracked (for the status).
    pub(super) fn packs(&self) -> usize {
        self.packs_in.len() + self.packs_out.len()
    }

    /// Versions read through the bucket and packs read from, still tracked.
    pub(super) fn read_backlog(&self) -> (usize, usize) {
        (self.reads.len(), self.packs_in.len())
    }
}

impl Site {
    /// The region to read `content` from through the bucket, if that is how it is read now:
    /// staging is on, holders are connected, none of them in this region.
    fn staging_region(&self, content: &ContentId) -> Option<String> {
        if !matches!(self.config.staging, Some(Transfer::Auto | Transfer::Staged)) {
            return None;
        }
        let nearest = self.nearest_holders(content);
        let region = nearest.iter().map(|h| self.region_of(h)).min()?;
        (region != self.config.region).then(|| region.to_owned())
    }

    /// Routes a fetch through the bucket when that is how its version is read: reads the chunk
    /// from the open pack, or waits while the pack is asked for or opened. Returns whether the
    /// fetch was dealt with; `false` sends it to a holder directly.
    pub(super) fn fetch_through_staging(&mut self, hash: ChunkHash) -> bool {
        let Some(fetch) = self.fetches.get(&hash) else { return true };
        let content = fetch.content;
        let Some(from_region) = self.staging_region(&content) else { return false };
        let now = self.now_ms;
        // New (then the files that follow it are asked for too), or failed long enough ago to
        // try again: (the pack found spoiled, whether to read ahead).
        let ask = match self.stage.reads.get(&content) {
            None => Some((None, true)),
            Some(StagedRead { state: Stage::Failed { since_ms, spoiled, .. }, .. })
                if now.saturating_sub(*since_ms) >= STAGE_RETRY_MS =>
            {
                Some((spoiled.clone(), false))
            }
            Some(_) => None,
        };
        if let Some((spoiled, read_ahead)) = ask {
            self.ask_to_stage(content, from_region, spoiled, BTreeSet::new(), read_ahead);
        } else {
            self.wanted(content, hash);
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

    /// A read wants `content`, already asked for: if it was read ahead, it no longer is, and
    /// the first read to want the one marked so asks for the next files ahead.
    fn wanted(&mut self, content: ContentId, hash: ChunkHash) {
        let Some(read) = self.stage.reads.get_mut(&content) else { return };
        if read.ahead_since_ms.take().is_none() {
            return;
        }
        let now = self.now_ms;
        if let Stage::Requested { since_ms, last_ask_ms, .. } = &mut read.state {
            // The wait for the answer counts from now, for this read.
            (*since_ms, *last_ask_ms) = (now, now);
        }
        if !read.trigger {
            return;
        }
        let holder = match &read.state {
            Stage::Requested { from, .. } => Some(from.clone()),
            Stage::InPack { .. } => read.stager.clone(),
            Stage::Failed { .. } => None,
        };
        let from_region = read.from_region.clone();
        let path =
            self.fetches.get(&hash).and_then(|f| f.waiters.first()).and_then(|(id, _)| self.reads.get(id));
        let (Some(holder), Some(path)) = (holder, path.map(|r| r.path.clone())) else { return };
        if !self.peers.contains_key(&holder) {
            return;
        }
        if let Some(read) = self.stage.reads.get_mut(&content) {
            read.trigger = false;
        }
        let contents = self.read_ahead(&path, &holder, &from_region);
        if !contents.is_empty() {
            let message = Message::Stage { region: self.config.region.clone(), contents, spoiled: None };
            self.emit(Output::Send { to: holder, message });
        }
    }

    /// Registers, as asked of `holder`, up to [`SiteConfig::stage_read_ahead`] small files that
    /// follow `path` in its directory, written in `from_region`, neither held here nor asked
    /// for yet; returns their versions.
    fn read_ahead(&mut self, path: &str, holder: &SiteId, from_region: &str) -> Vec<ContentId> {
        let limit = self.config.stage_read_ahead;
        if limit == 0 {
            return Vec::new();
        }
        // Versions asked for already are passed over, up to as many again.
        let next = self.ns.next_siblings(path, limit * 2).unwrap_or_default();
        let mut contents = Vec::new();
        let mut bytes = 0;
        for entry in next {
            let Some(version) = entry.stat.version.filter(|_| entry.stat.kind == EntryKind::File) else {
                continue;
            };
            let written_there = SiteId::new(&version.site).is_ok_and(|w| self.region_of(&w) == from_region);
            if version.size == 0
                || version.size > READ_AHEAD_FILE_BYTES_MAX
                || !written_there
                || self.held.contains_key(&version.content)
                || self.stage.reads.contains_key(&version.content)
                || contents.contains(&version.content)
            {
                continue;
            }
            if bytes + version.size > READ_AHEAD_BYTES_MAX {
                break;
            }
            bytes += version.size;
            contents.push(version.content);
            if contents.len() == limit {
                break;
            }
        }
        let now = self.now_ms;
        let middle = contents.len() / 2;
        for (i, content) in contents.iter().enumerate() {
            let state = Stage::Requested {
                from: holder.clone(),
                since_ms: now,
                last_ask_ms: now,
                spoiled: None,
                tried: BTreeSet::new(),
            };
            let read = StagedRead {
                from_region: from_region.to_owned(),
                stager: None,
                state,
                ahead_since_ms: Some(now),
                trigger: i == middle,
            };
            self.stage.reads.insert(*content, read);
        }
        contents
    }

    fn park(&mut self, hash: ChunkHash) -> bool {
        let now = self.now_ms;
        let fetch = self.fetches.get_mut(&hash).expect("a fetch being routed");
        fetch.parked_since_ms.get_or_insert(now);
        true
    }

    /// The connected holder of `from_region` not in `tried` to ask to stage `content`: the
    /// site that wrote it (which keeps what it wrote), else the first holder in site order.
    fn stage_holder(
        &self,
        content: ContentId,
        from_region: &str,
        tried: &BTreeSet<SiteId>,
    ) -> Option<SiteId> {
        let writer = self.reads.values().find(|r| r.content == content).and_then(|r| r.writer.as_ref());
        writer
            .into_iter()
            .chain(self.holders.get(&content).into_iter().flatten())
            .find(|h| self.peers.contains_key(*h) && self.region_of(h) == from_region && !tried.contains(*h))
            .cloned()
    }

    /// Asks a connected holder of `from_region` not in `tried` where `content` is staged for
    /// this region (with the files read ahead of it, if `read_ahead`). Every reader asks the
    /// same one ([`Site::stage_holder`]), so the version goes up once.
    fn ask_to_stage(
        &mut self,
        content: ContentId,
        from_region: String,
        spoiled: Option<PackName>,
        tried: BTreeSet<SiteId>,
        read_ahead: bool,
    ) {
        let path = self.reads.values().find(|r| r.content == content).map(|r| r.path.clone());
        let holder = self.stage_holder(content, &from_region, &tried);
        let now = self.now_ms;
        self.leave_pack(content);
        let stager = self.stage.reads.get(&content).and_then(|r| r.stager.clone());
        let state = match &holder {
            Some(from) => Stage::Requested {
                from: from.clone(),
                since_ms: now,
                last_ask_ms: now,
                spoiled: spoiled.clone(),
                tried,
            },
            None => Stage::Failed {
                reason: format!("no site of region {from_region} is connected to stage it"),
                since_ms: now,
                spoiled: spoiled.clone(),
            },
        };
        let read = StagedRead {
            from_region: from_region.clone(),
            stager,
            state,
            ahead_since_ms: None,
            trigger: false,
        };
        self.stage.reads.insert(content, read);
        let Some(from) = holder else { return };
        let mut contents = vec![content];
        if read_ahead && let Some(path) = path {
            contents.extend(self.read_ahead(&path, &from, &from_region));
        }
        let spoiled = spoiled.map(PackName::into_bytes);
        let message = Message::Stage { region: self.config.region.clone(), contents, spoiled };
        self.emit(Output::Send { to: from, message });
    }

    /// Staging does not work for `content` right now: in `auto` mode the fetch goes direct
    /// (returns `false`), in `staged` mode its readers fail.
    fn staging_failed(&mut self, content: ContentId, reason: String, hash: ChunkHash) -> bool {
        if let Some(read) = self.stage.reads.get_mut(&content)
            && !matches!(read.state, Stage::Failed { .. })
        {
            read.state = Stage::Failed { reason: reason.clone(), since_ms: self.now_ms, spoiled: None };
        }
        if self.config.staging != Some(Transfer::Staged) {
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

    /// Forgets a version read ahead (or no longer read) that no read wants: its pack, its
    /// manifest, and the holder asked or that staged it is told this site no longer needs it.
    fn let_go(&mut self, content: ContentId) {
        self.leave_pack(content);
        let Some(read) = self.stage.reads.remove(&content) else { return };
        if !self.reads.values().any(|r| r.content == content) {
            self.manifests.remove(&content);
        }
        let holder = match read.state {
            Stage::InPack { .. } => read.stager,
            Stage::Requested { from, .. } => Some(from),
            Stage::Failed { .. } => None,
        };
        if let Some(holder) = holder {
            self.queue_unstage(holder, content);
        }
    }

    /// A pack is unusable. A spoiled one is reported to its holder at once, which stages its
    /// versions again (once: if that pack is spoiled too, or the bucket failed, the versions are
    /// read another way for now, and the holder is asked again after [`STAGE_RETRY_MS`]).
    /// Versions in it only read ahead are let go.
    fn fail_pack(&mut self, name: &PackName, error: BucketError) {
        let Some(pack) = self.stage.packs_in.remove(name) else { return };
        for content in &pack.contents {
            let Some(read) = self.stage.reads.get_mut(content) else { continue };
            if read.ahead_since_ms.is_some() {
                self.let_go(*content);
                continue;
            }
            let spoiled = error.spoiled.then(|| name.clone());
            if error.spoiled && matches!(read.state, Stage::InPack { restaged: false, .. }) {
                let from_region = read.from_region.clone();
                self.ask_to_stage(*content, from_region, spoiled, BTreeSet::new(), false);
            } else {
                read.state = Stage::Failed { reason: error.reason.clone(), since_ms: self.now_ms, spoiled };
            }
        }
        self.resend_parked_if(|c| pack.contents.contains(c));
    }

    /// The answer of a holder asked where versions are staged.
    pub(super) fn on_staged(
        &mut self,
        from: &SiteId,
        region: String,
        pack: Result<PackName, String>,
        versions: Vec<StagedVersion>,
    ) {
        if region != self.config.region {
            return;
        }
        let mut answered = BTreeSet::new();
        for StagedVersion { content, manifest } in versions {
            let Some(read) = self.stage.reads.get_mut(&content) else { continue };
            let Stage::Requested { from: asked, tried, spoiled, .. } = &mut read.state else { continue };
            if asked != from {
                continue;
            }
            answered.insert(content);
            match &pack {
                Ok(name) => {
                    read.state = Stage::InPack { name: name.clone(), restaged: spoiled.is_some() };
                    read.stager = Some(from.clone());
                    match self.stage.packs_in.entry(name.clone()) {
                        Entry::Occupied(mut pack) => {
                            pack.get_mut().contents.insert(content);
                        }
                        Entry::Vacant(pack) => {
                            pack.insert(PackIn { index: None, contents: BTreeSet::from([content]) });
                            self.emit(Output::StageOpen { name: name.clone() });
                        }
                    }
                    if let Some(bytes) = manifest
                        && !self.held.contains_key(&content)
                    {
                        self.learn_holder(from, content, &bytes);
                        if !self.peers.contains_key(from) {
                            // Disconnected for a bad manifest.
                            return;
                        }
                    }
                }
                Err(_) if read.ahead_since_ms.is_some() => {
                    self.stage.reads.remove(&content);
                }
                Err(reason) => {
                    // Another holder may do it (the writer may no longer hold what it wrote);
                    // with none left, the refusal is the reason.
                    let mut tried = std::mem::take(tried);
                    tried.insert(from.clone());
                    let (from_region, spoiled) = (read.from_region.clone(), spoiled.take());
                    self.ask_to_stage(content, from_region, spoiled, tried, false);
                    if let Some(StagedRead { state: Stage::Failed { reason: why, .. }, .. }) =
                        self.stage.reads.get_mut(&content)
                    {
                        *why = format!("{from} could not stage it: {reason}");
                    }
                }
            }
        }
        self.resend_parked_if(|c| answered.contains(c));
    }

    /// The result of an [`Output::StageOpen`]: the pack's chunks, `None` if it is not in the
    /// bucket, or why it could not be opened.
    pub fn handle_stage_opened(
        &mut self,
        now_ms: u64,
        name: PackName,
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
                let contents = pack.contents.clone();
                self.resend_parked_if(|c| contents.contains(c));
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
        let to = match read.stager {
            Some(stager) => vec![stager],
            None => self.connected_in(&read.from_region),
        };
        for to in to {
            self.queue_unstage(to, content);
        }
        // Confirmations go together while reads through the bucket go on, at once after the last.
        if !self.stage.reads.values().any(|r| r.ahead_since_ms.is_none()) {
            self.send_unstaged();
        }
    }

    /// Queues a confirmation for `to`; a full batch goes at once.
    fn queue_unstage(&mut self, to: SiteId, content: ContentId) {
        let queued = self.stage.unstage.entry(to.clone()).or_default();
        queued.push(content);
        if queued.len() >= UNSTAGE_BATCH_MAX {
            let contents = self.stage.unstage.remove(&to).expect("just queued");
            self.send_unstage(to, contents);
        }
    }

    /// Sends all the confirmations queued.
    fn send_unstaged(&mut self) {
        for (to, contents) in std::mem::take(&mut self.stage.unstage) {
            self.send_unstage(to, contents);
        }
    }

    /// Sends confirmations for `to` — to every connected site of its region if it is gone.
    fn send_unstage(&mut self, to: SiteId, contents: Vec<ContentId>) {
        let to = if self.peers.contains_key(&to) {
            vec![to]
        } else {
            let region = self.region_of(&to).to_owned();
            self.connected_in(&region)
        };
        for to in to {
            let message = Message::Unstage { region: self.config.region.clone(), contents: contents.clone() };
            self.emit(Output::Send { to, message });
        }
    }

    /// The connected sites of `region`.
    fn connected_in(&self, region: &str) -> Vec<SiteId> {
        self.peers.keys().filter(|p| self.region_of(p) == region).cloned().collect()
    }

    /// The answers naming `pack` for `contents` (as many messages as the bound per message
    /// needs), with the manifests of the small versions, to `to`.
    fn send_staged(
        &mut self,
        to: &SiteId,
        region: &str,
        pack: Result<PackName, String>,
        contents: &[ContentId],
    ) {
        let with_manifests = pack.is_ok();
        for part in contents.chunks(STAGE_VERSIONS_MAX) {
            let versions = part
                .iter()
                .map(|content| StagedVersion {
                    content: *content,
                    manifest: self
                        .held
                        .get(content)
                        .filter(|m| with_manifests && m.size <= READ_AHEAD_FILE_BYTES_MAX)
                        .map(|m| m.encode()),
                })
                .collect();
            let pack = pack.clone().map(PackName::into_bytes);
            let message = Message::Staged { region: region.to_owned(), pack, versions };
            self.emit(Output::Send { to: to.clone(), message });
        }
    }

    /// A site of another region asks where versions are staged for it.
    pub(super) fn stage_for(
        &mut self,
        from: &SiteId,
        region: String,
        contents: Vec<ContentId>,
        spoiled: Option<PackName>,
    ) {
        if self.config.staging.is_none() {
            let why = format!("site {} has no staging bucket", self.config.site);
            return self.send_staged(from, &region, Err(why), &contents);
        }
        if let Some(bad) = spoiled
            && contents.iter().any(|c| self.stage.staged_out.get(&(*c, region.clone())) == Some(&bad))
            && self.stage.packs_out.get(&bad).is_some_and(|p| p.uploaded)
        {
            tracing::warn!(site = %from, "a staged pack was found spoiled: staging its versions again");
            self.drop_pack(&bad);
        }
        let mut refused = Vec::new();
        let mut ready: BTreeMap<PackName, Vec<ContentId>> = BTreeMap::new();
        let mut seen = HashSet::new();
        for content in contents {
            if !seen.insert(content) {
                continue;
            }
            if !self.held.contains_key(&content) {
                refused.push(content);
                continue;
            }
            let key = (content, region.clone());
            let in_pack = match self.stage.staged_out.get(&key) {
                Some(name) => {
                    let pack = self.stage.packs_out.get_mut(name).expect("a staged version is in a pack");
                    if pack.uploaded {
                        pack.last_ms = self.now_ms;
                        ready.entry(name.clone()).or_default().push(content);
                        continue;
                    }
                    true
                }
                None => false,
            };
            // Sabotage: a version asked for again while its pack goes up goes up again.
            let again = in_pack
                && crate::sabotage::stage_twice()
                && !self.stage.queue.get(&region).is_some_and(|q| q.contains(&content));
            let waiting = self.stage.waiting.entry(key).or_default();
            if (waiting.is_empty() && !in_pack) || again {
                self.stage.queue.entry(region.clone()).or_default().push_back(content);
            }
            if !waiting.contains(from) {
                waiting.push(from.clone());
            }
        }
        if !refused.is_empty() {
            let why = format!("site {} does not hold this version", self.config.site);
            self.send_staged(from, &region, Err(why), &refused);
        }
        for (name, contents) in ready {
            self.send_staged(from, &region, Ok(name), &contents);
        }
        self.start_uploads(&region);
    }

    /// Tells the sites waiting for `contents` (staged for `region`) the answer.
    fn answer_waiting(&mut self, region: &str, answer: Result<PackName, String>, contents: &[ContentId]) {
        let mut to_site: BTreeMap<SiteId, Vec<ContentId>> = BTreeMap::new();
        for content in contents {
            for to in self.stage.waiting.remove(&(*content, region.to_owned())).unwrap_or_default() {
                to_site.entry(to).or_default().push(*content);
            }
        }
        for (to, contents) in to_site {
            self.send_staged(&to, region, answer.clone(), &contents);
        }
    }

    /// Starts uploading the versions queued for `region`, in packs, up to the bound of uploads
    /// in flight.
    fn start_uploads(&mut self, region: &str) {
        let Some(mut queue) = self.stage.queue.remove(region) else { return };
        let mut gone = Vec::new();
        while self.stage.uploading.get(region).copied().unwrap_or(0) < self.config.stage_uploads_in_flight {
            let mut contents = Vec::new();
            let mut chunks: Vec<ChunkRef> = Vec::new();
            let mut seen = HashSet::new();
            let mut bytes = 0;
            while let Some(&content) = queue.front() {
                let Some(manifest) = self.held.get(&content) else {
                    queue.pop_front();
                    gone.push(content);
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
        if !gone.is_empty() {
            let reason = format!("site {} no longer holds this version", self.config.site);
            self.answer_waiting(region, Err(reason), &gone);
        }
    }

    /// The result of an [`Output::StageUpload`]: the bytes uploaded, or why it failed.
    pub fn handle_stage_uploaded(&mut self, now_ms: u64, name: PackName, uploaded: Result<u64, String>) {
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
        let done = self.stage.packs_out.get(&name).is_some_and(|p| p.complete == p.contents.len());
        self.answer_waiting(&region, uploaded.map(|_| name.clone()), &contents);
        if done {
            // Every site of the region said it no longer needs any of it while it went up.
            self.drop_pack(&name);
        }
        self.start_uploads(&region);
    }

    /// A site of `region` holds these versions now, read from the bucket, or no longer needs
    /// them: it stops waiting for them, and a pack every site of the region is done with is
    /// deleted (once uploaded).
    pub(super) fn on_unstage(&mut self, from: &SiteId, region: String, contents: Vec<ContentId>) {
        if self.config.regions.get(from) != Some(&region) {
            return;
        }
        let mut unqueue = HashSet::new();
        for content in contents {
            let key = (content, region.clone());
            if let Some(waiting) = self.stage.waiting.get_mut(&key) {
                waiting.retain(|s| s != from);
                if waiting.is_empty() {
                    self.stage.waiting.remove(&key);
                    unqueue.insert(content);
                }
            }
            let Some(name) = self.stage.staged_out.get(&key).cloned() else { continue };
            let pack = self.stage.packs_out.get_mut(&name).expect("a staged version is in a pack");
            pack.last_ms = self.now_ms;
            let confirmed = pack.confirmed.entry(content).or_default();
            if confirmed.insert(from.clone())
                && self
                    .config
                    .regions
                    .iter()
                    .filter(|(_, r)| **r == region)
                    .all(|(s, _)| confirmed.contains(s))
            {
                pack.complete += 1;
            }
            if pack.uploaded && pack.complete == pack.contents.len() {
                self.drop_pack(&name);
            }
        }
        // Versions nobody waits for any more are not staged.
        if !unqueue.is_empty()
            && let Some(queue) = self.stage.queue.get_mut(&region)
        {
            queue.retain(|c| !unqueue.contains(c));
        }
    }

    /// Deletes a pack this site uploaded.
    fn drop_pack(&mut self, name: &PackName) {
        let Some(pack) = self.stage.packs_out.remove(name) else { return };
        for content in pack.contents {
            let key = (content, pack.region.clone());
            if self.stage.staged_out.get(&key).is_some_and(|n| n == name) {
                self.stage.staged_out.remove(&key);
            }
        }
        self.emit(Output::StageDelete { name: name.clone() });
    }

    /// A peer is gone: the versions it was asked to stage are asked of another holder (those
    /// only read ahead are let go).
    pub(super) fn staging_peer_down(&mut self, peer: &SiteId) {
        let asked: Vec<(ContentId, String, Option<PackName>, bool)> = self
            .stage
            .reads
            .iter()
            .filter_map(|(content, read)| match &read.state {
                Stage::Requested { from, spoiled, .. } if from == peer => {
                    Some((*content, read.from_region.clone(), spoiled.clone(), read.ahead_since_ms.is_some()))
                }
                _ => None,
            })
            .collect();
        for (content, from_region, spoiled, ahead) in asked {
            if ahead {
                self.stage.reads.remove(&content);
                continue;
            }
            if self.stage_holder(content, &from_region, &BTreeSet::new()).is_none() {
                // No one else to ask: a lost link is not a failure of staging (it is often
                // reset and back at once). The read starts over when a holder is connected,
                // and fails as any read does if none comes back.
                self.stage.reads.remove(&content);
            } else {
                self.ask_to_stage(content, from_region, spoiled, BTreeSet::new(), false);
            }
            self.resend_parked(Some(content));
        }
    }

    /// The staging rules that must hold after every input. Holder: each version is in at most
    /// one pack per region (the pack `staged_out` names, which lists it), so it goes up once per
    /// region pair; the uploads in flight per region are those of the packs not yet uploaded,
    /// within the bound; a pack's confirmed versions are among its versions; a queued version
    /// is waited for and in no pack; a site waits only for a version queued or going up.
    /// Reader: a version read from a pack is listed by that pack, and a pack lists only
    /// versions read from it; confirmations wait below the batch size.
    pub(super) fn check_staging_invariants(&self) -> Result<(), String> {
        let stage = &self.stage;
        for ((content, region), name) in &stage.staged_out {
            match stage.packs_out.get(name) {
                Some(pack) if pack.region == *region && pack.contents.contains(content) => {}
                _ => {
                    return Err(format!(
                        "version {content} for {region} is staged in {:?} that does not list it",
                        name
                    ));
                }
            }
        }
        let mut uploading: BTreeMap<&str, usize> = BTreeMap::new();
        for (name, pack) in &stage.packs_out {
            for content in &pack.contents {
                if stage.staged_out.get(&(*content, pack.region.clone())) != Some(name) {
                    return Err(format!(
                        "version {content} is in {:?} for {} and staged elsewhere: it goes up twice",
                        name, pack.region
                    ));
                }
            }
            if pack.complete > pack.contents.len()
                || pack.confirmed.keys().any(|c| !pack.contents.contains(c))
            {
                return Err(format!("{:?} counts confirmations of versions it lacks", name));
            }
            if !pack.uploaded {
                *uploading.entry(pack.region.as_str()).or_default() += 1;
            }
        }
        for (region, n) in &stage.uploading {
            let going_up = uploading.get(region.as_str()).copied().unwrap_or(0);
            if *n != going_up || *n > self.config.stage_uploads_in_flight {
                return Err(format!("{n} uploads counted for {region}, {going_up} packs going up"));
            }
        }
        for (region, queue) in &stage.queue {
            for content in queue {
                let key = (*content, region.clone());
                if stage.waiting.get(&key).is_none_or(Vec::is_empty) || stage.staged_out.contains_key(&key) {
                    return Err(format!(
                        "version {content} is queued for {region} with nobody waiting, or in a pack"
                    ));
                }
            }
        }
        for (key, sites) in &stage.waiting {
            let queued = stage.queue.get(&key.1).is_some_and(|q| q.contains(&key.0));
            let going_up =
                stage.staged_out.get(key).and_then(|n| stage.packs_out.get(n)).is_some_and(|p| !p.uploaded);
            if sites.is_empty() || !(queued || going_up) {
                return Err(format!(
                    "sites wait for version {} for {} that is neither queued nor going up",
                    key.0, key.1
                ));
            }
        }
        for (content, read) in &stage.reads {
            if let Stage::InPack { name, .. } = &read.state
                && !stage.packs_in.get(name).is_some_and(|p| p.contents.contains(content))
            {
                return Err(format!("version {content} reads from {:?} that does not list it", name));
            }
        }
        for (name, pack) in &stage.packs_in {
            for content in &pack.contents {
                if !matches!(stage.reads.get(content), Some(StagedRead { state: Stage::InPack { name: n, .. }, .. }) if n == name)
                {
                    return Err(format!("{:?} lists version {content}, which does not read from it", name));
                }
            }
        }
        if stage.unstage.values().any(|c| c.len() >= UNSTAGE_BATCH_MAX) {
            return Err("a full batch of confirmations was not sent".into());
        }
        Ok(())
    }

    /// Time passes: send confirmations, ask again, give up on holders that do not answer, let
    /// go of what was read ahead and not read, delete packs no longer needed.
    pub(super) fn staging_timeout(&mut self, now_ms: u64) {
        let done: Vec<PackName> = self
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
        let mut ask_again: BTreeMap<(SiteId, Option<PackName>), Vec<ContentId>> = BTreeMap::new();
        let mut stalled = Vec::new();
        let mut idle = Vec::new();
        let wanted: HashSet<ContentId> =
            self.reads.values().map(|r| r.content).chain(self.fetches.values().map(|f| f.content)).collect();
        for (content, read) in &mut self.stage.reads {
            if read.ahead_since_ms.is_none() && !wanted.contains(content) {
                // The reads that wanted it ended without holding it (a byte range, a failure):
                // kept like a version read ahead, for a while.
                read.ahead_since_ms = Some(now_ms);
            }
            if read.ahead_since_ms.is_some_and(|since| now_ms.saturating_sub(since) >= READ_AHEAD_IDLE_MS) {
                idle.push(*content);
            } else if let Stage::Requested { from, since_ms, last_ask_ms, spoiled, .. } = &mut read.state {
                if now_ms.saturating_sub(*since_ms) >= self.config.stage_timeout_ms {
                    stalled.push(*content);
                } else if now_ms.saturating_sub(*last_ask_ms) >= retry {
                    *last_ask_ms = now_ms;
                    ask_again.entry((from.clone(), spoiled.clone())).or_default().push(*content);
                }
            }
        }
        for content in idle {
            self.let_go(content);
        }
        for ((to, spoiled), contents) in ask_again {
            for contents in contents.chunks(STAGE_VERSIONS_MAX) {
                let region = self.config.region.clone();
                let message = Message::Stage {
                    region,
                    contents: contents.to_vec(),
                    spoiled: spoiled.clone().map(PackName::into_bytes),
                };
                self.emit(Output::Send { to: to.clone(), message });
            }
        }
        for content in stalled {
            let read = self.stage.reads.get_mut(&content).expect("listed above");
            if read.ahead_since_ms.is_some() {
                self.stage.reads.remove(&content);
                continue;
            }
            read.state = Stage::Failed {
                reason: "the holder asked to stage it did not answer in time".into(),
                since_ms: now_ms,
                spoiled: None,
            };
            self.resend_parked(Some(content));
        }
        self.send_unstaged();
    }
}

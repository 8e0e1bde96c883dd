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
//!
//! **Failures**: a pack found missing, tampered with or truncated ([`BucketError::spoiled`]) is
//! reported at once in a new ask, and the holder stages its versions again — once: a second bad
//! pack, a bucket that fails ([`BucketError::failed`]) or a holder that does not answer in
//! `stage_timeout_ms` marks the version failed for [`STAGE_RETRY_MS`]; meanwhile `auto` reads
//! it directly and `staged` fails the read ([`SiteError::Staging`]). A holder that refuses is
//! replaced by the next untried one of its region. When the holder asked goes away the ask goes
//! to another; with none connected the read waits like any read for a holder to come back (a
//! reset link is not a staging failure). Confirmations wait together, up to
//! [`UNSTAGE_BATCH_MAX`] per holder, for at most [`UNSTAGE_WAIT_MS`].
//!
//! **Shape**: the two sides are state machines of their own, [`Reader`] (`staging/reader.rs`)
//! and [`Holder`] (`staging/holder.rs`). Each sees the site through a read-only view and writes
//! only to the outbox; neither touches the fetch table or the reads. What the reader decides for
//! a fetch comes back as a [`Route`], and what the site must do after (fetches to send again,
//! manifests to forget) as an [`Aftermath`]; the `impl Site` at the end of this file carries
//! those out.

mod holder;
mod reader;

use std::collections::{BTreeSet, HashSet};

use crdt_namespace::{ContentId, SiteId};
use proto::{FetchId, Region, StagedVersion};

pub(super) use holder::{Holder, HolderView};
pub(super) use reader::{Aftermath, Reader, ReaderView, Route};

use super::{Output, Site, SiteError};
use crate::content::ChunkHash;

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
/// on, up to this many per holder, and at most [`UNSTAGE_WAIT_MS`].
const UNSTAGE_BATCH_MAX: usize = 256;

/// The longest a confirmation waits for others to go with it.
const UNSTAGE_WAIT_MS: u64 = 200;

/// The name of the pack `serial` that `site` stages from `from_region` to `to_region` with the
/// given versions: unique per upload while the site runs, and the same batch after a restart
/// names the same (identical) object.
pub fn pack_name(
    site: &SiteId,
    serial: u64,
    from_region: &Region,
    to_region: &Region,
    contents: &[ContentId],
) -> PackName {
    let mut hasher = blake3::Hasher::new();
    for part in [site.as_str().as_bytes(), from_region.as_str().as_bytes(), to_region.as_str().as_bytes()] {
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
        request: FetchId,
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

/// The reader's view of a site (a macro, so that the borrow is of the fields it names only,
/// and the reader and the outbox can be borrowed mutably beside it).
macro_rules! reader_view {
    ($site:expr) => {
        ReaderView {
            config: &$site.config,
            now_ms: $site.now_ms,
            peers: &$site.peers,
            holders: &$site.holders,
            held: &$site.held,
            ns: &$site.ns,
            reads: &$site.reads,
        }
    };
}

/// The holder's view of a site.
macro_rules! holder_view {
    ($site:expr) => {
        HolderView { config: &$site.config, held: &$site.held, now_ms: $site.now_ms }
    };
}

/// The site's side of staging: it hands the reader and the holder their views, and carries out
/// on its own maps (fetches, reads, manifests) what they decide.
impl Site {
    /// The reader's view of this site, for what only looks.
    pub(super) fn view(&self) -> ReaderView<'_> {
        reader_view!(self)
    }

    /// Routes a fetch through the bucket when that is how its version is read ([`Reader::route`]).
    /// Returns whether the fetch was dealt with; `false` sends it to a holder directly.
    pub(super) fn fetch_through_staging(&mut self, hash: ChunkHash) -> bool {
        let Some(fetch) = self.fetches.get(&hash) else { return true };
        let content = fetch.content;
        let waiter = fetch.waiters.first().and_then(|(id, _)| self.reads.get(id)).map(|r| r.path.clone());
        let route =
            self.stage_in.route(&reader_view!(self), &mut self.outputs, content, hash, waiter.as_deref());
        match route {
            Route::Direct => false,
            Route::Park => {
                let now = self.now_ms;
                let fetch = self.fetches.get_mut(&hash).expect("a fetch being routed");
                fetch.parked_since_ms.get_or_insert(now);
                fetch.parked_on_stage = true;
                true
            }
            Route::Read { name, index } => {
                let request = self.next_fetch_id();
                let fetch = self.fetches.get_mut(&hash).expect("a fetch being routed");
                fetch.request = request;
                fetch.from = self.config.site.clone();
                fetch.attempts += 1;
                fetch.parked_since_ms = None;
                fetch.parked_on_stage = false;
                fetch.sent_ms = self.now_ms;
                self.emit(Output::StageRead { request, name, chunk: hash, index });
                true
            }
            Route::Fail { reason } => {
                let fetch = self.fetches.remove(&hash).expect("a fetch being routed");
                for (id, _) in fetch.waiters {
                    if let Some(r) = self.reads.get(&id) {
                        let error = SiteError::Staging { path: r.path.clone(), reason: reason.clone() };
                        self.fail_read(id, error);
                    }
                }
                true
            }
            Route::Again { then } => {
                self.carry_out(then);
                self.fetch_through_staging(hash)
            }
        }
    }

    /// Does what the reader left to the site: forget manifests, send waiting fetches again.
    fn carry_out(&mut self, then: Aftermath) {
        for content in then.forget {
            self.manifests.remove(&content);
        }
        if !then.resend.is_empty() {
            self.resend_parked_if(|c| then.resend.contains(c));
        }
    }

    /// The answer of a holder asked where versions are staged.
    pub(super) fn on_staged(
        &mut self,
        from: &SiteId,
        region: Region,
        pack: Result<PackName, String>,
        versions: Vec<StagedVersion>,
    ) {
        if region != self.config.region {
            return;
        }
        let mut answered = BTreeSet::new();
        for StagedVersion { content, manifest } in versions {
            let view = reader_view!(self);
            let Some(in_pack) = self.stage_in.on_staged(&view, &mut self.outputs, from, &pack, content)
            else {
                continue;
            };
            answered.insert(content);
            if in_pack
                && let Some(bytes) = manifest
                && !self.held.contains_key(&content)
            {
                self.learn_holder(from, content, &bytes);
                if !self.peers.contains_key(from) {
                    // Disconnected for a bad manifest.
                    return;
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
        let then = self.stage_in.opened(&reader_view!(self), &mut self.outputs, name, opened);
        self.carry_out(then);
    }

    /// The result of an [`Output::StageRead`]: the chunk's bytes, or why they could not be had.
    /// A chunk that does not match its hash spoils the pack.
    pub fn handle_stage_chunk(
        &mut self,
        now_ms: u64,
        request: FetchId,
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
                self.stage_in.bytes_from_staging += data.len() as u64;
                return self.accept_chunk(hash, data);
            }
            Ok(_) => {
                BucketError::spoiled(format!("chunk {hash} read from the bucket does not match its hash"))
            }
            Err(error) => error,
        };
        // The pack is not used again for now, and the chunk is fetched another way, as the
        // configuration allows.
        let then = self.stage_in.fail_pack_of(&reader_view!(self), &mut self.outputs, content, error);
        self.carry_out(then);
        self.send_fetch(hash);
    }

    /// A version read through the bucket is held here now: tell the holder that staged it.
    pub(super) fn confirm_staged(&mut self, content: ContentId) {
        self.stage_in.confirm(&reader_view!(self), &mut self.outputs, content);
    }

    /// A site of another region asks where versions are staged for it.
    pub(super) fn stage_for(
        &mut self,
        from: &SiteId,
        region: Region,
        contents: Vec<ContentId>,
        spoiled: Option<PackName>,
    ) {
        self.stage_out.stage_for(&holder_view!(self), &mut self.outputs, from, region, contents, spoiled);
    }

    /// The result of an [`Output::StageUpload`]: the bytes uploaded, or why it failed.
    pub fn handle_stage_uploaded(&mut self, now_ms: u64, name: PackName, uploaded: Result<u64, String>) {
        self.now_ms = self.now_ms.max(now_ms);
        self.stage_out.uploaded(&holder_view!(self), &mut self.outputs, name, uploaded);
    }

    /// A site of `region` holds these versions now, or no longer needs them.
    pub(super) fn on_unstage(&mut self, from: &SiteId, region: Region, contents: Vec<ContentId>) {
        self.stage_out.on_unstage(&holder_view!(self), &mut self.outputs, from, region, contents);
    }

    /// A peer is gone: the versions it was asked to stage are asked of another holder (those
    /// only read ahead are let go).
    pub(super) fn staging_peer_down(&mut self, peer: &SiteId) {
        for asked in self.stage_in.asked_of(peer) {
            let content = asked.0;
            if self.stage_in.ask_another(&reader_view!(self), &mut self.outputs, asked) {
                self.resend_parked(Some(content));
            }
        }
    }

    /// The staging rules that must hold after every input: the holder's
    /// ([`Holder::check_invariants`]) and the reader's ([`Reader::check_invariants`]).
    pub(super) fn check_staging_invariants(&self) -> Result<(), String> {
        self.stage_out.check_invariants(&self.config)?;
        self.stage_in.check_invariants()
    }

    /// The versions the site's reads and fetches want (none if nothing is read through the
    /// bucket: then nobody asks).
    fn wanted_contents(&self) -> HashSet<ContentId> {
        if self.stage_in.backlog().0 == 0 {
            return HashSet::new();
        }
        self.reads.values().map(|r| r.content).chain(self.fetches.values().map(|f| f.content)).collect()
    }

    /// When staging's next timer is due: the holder's packs to delete, the reader's
    /// confirmations to send, questions to ask again, holders to give up on, versions to let go.
    pub(super) fn staging_deadline(&self) -> Option<u64> {
        let wanted = self.wanted_contents();
        let reader = self.stage_in.deadline(&self.config, self.now_ms, |c| wanted.contains(c));
        reader.into_iter().chain(self.stage_out.deadline()).min()
    }

    /// Time passes: delete packs no longer needed, send confirmations, ask again, give up on
    /// holders that do not answer, let go of what was read ahead and not read.
    pub(super) fn staging_timeout(&mut self, now_ms: u64) {
        self.stage_out.timeout(&mut self.outputs, now_ms);
        let wanted = self.wanted_contents();
        let (stalled, forget) = self.stage_in.timeout(&reader_view!(self), &mut self.outputs, &wanted);
        self.carry_out(Aftermath { forget, resend: BTreeSet::new() });
        for content in stalled {
            if self.stage_in.give_up(content, now_ms) {
                self.resend_parked(Some(content));
            }
        }
        self.stage_in.send_unstaged(&reader_view!(self), &mut self.outputs);
    }
}

//! The reader's half of staging: versions this site reads through the bucket, the packs it
//! reads them from, what it reads ahead, and the confirmations it owes the holders.
//!
//! The reader never touches the site's fetch table or its reads: it sees them through a
//! [`ReaderView`], and what it decides for a fetch comes back as a [`Route`]; what the site must
//! do afterwards (fetches to send again, manifests to forget) comes back as [`Aftermath`].

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use crdt_namespace::{ContentId, EntryKind, Namespace, SiteId};
use proto::{Message, Region, STAGE_VERSIONS_MAX};

use super::{
    BucketError, PackName, READ_AHEAD_BYTES_MAX, READ_AHEAD_FILE_BYTES_MAX, READ_AHEAD_IDLE_MS,
    STAGE_RETRY_MS, UNSTAGE_BATCH_MAX, UNSTAGE_WAIT_MS,
};
use crate::content::{ChunkHash, Manifest};
use crate::site::{Output, Peer, Read, RequestId, SiteConfig, Transfer};

/// What the reader sees of the site, read-only.
pub(in crate::site) struct ReaderView<'a> {
    pub config: &'a SiteConfig,
    pub now_ms: u64,
    pub peers: &'a BTreeMap<SiteId, Peer>,
    pub holders: &'a HashMap<ContentId, BTreeSet<SiteId>>,
    pub held: &'a HashMap<ContentId, Manifest>,
    pub ns: &'a Namespace,
    pub reads: &'a BTreeMap<RequestId, Read>,
}

impl ReaderView<'_> {
    /// The region of `site`.
    pub fn region_of(&self, site: &SiteId) -> &Region {
        self.config.regions.get(site).unwrap_or(&self.config.region)
    }

    /// The connected holders of `content` nearest to this site: those of its region if any is
    /// connected, else all. A holder of another region is then asked directly only when
    /// staging does not carry the version (off, `direct`, or failed in `auto` mode).
    pub fn nearest_holders(&self, content: &ContentId) -> Vec<SiteId> {
        let connected =
            self.holders.get(content).into_iter().flatten().filter(|h| self.peers.contains_key(*h));
        let (near, far): (Vec<&SiteId>, Vec<&SiteId>) =
            connected.partition(|h| *self.region_of(h) == self.config.region);
        let nearest = if near.is_empty() { far } else { near };
        nearest.into_iter().cloned().collect()
    }

    /// The region to read `content` from through the bucket, if that is how it is read now:
    /// staging is on, holders are connected, none of them in this region.
    fn staging_region(&self, content: &ContentId) -> Option<Region> {
        if !matches!(self.config.staging, Some(Transfer::Auto | Transfer::Staged)) {
            return None;
        }
        let nearest = self.nearest_holders(content);
        let region = nearest.iter().map(|h| self.region_of(h)).min()?;
        (*region != self.config.region).then(|| region.clone())
    }

    /// The connected sites of `region`.
    fn connected_in(&self, region: &Region) -> Vec<SiteId> {
        self.peers.keys().filter(|p| self.region_of(p) == region).cloned().collect()
    }

    /// The connected holder of `from_region` not in `tried` to ask to stage `content`: the
    /// site that wrote it (which keeps what it wrote), else the first holder in site order.
    fn stage_holder(
        &self,
        content: ContentId,
        from_region: &Region,
        tried: &BTreeSet<SiteId>,
    ) -> Option<SiteId> {
        let writer = self.reads.values().find(|r| r.content == content).and_then(|r| r.writer.as_ref());
        writer
            .into_iter()
            .chain(self.holders.get(&content).into_iter().flatten())
            .find(|h| self.peers.contains_key(*h) && self.region_of(h) == from_region && !tried.contains(*h))
            .cloned()
    }
}

/// Where a fetch goes, as the reader decides.
pub(in crate::site) enum Route {
    /// To a holder, directly: the version is not read through the bucket.
    Direct,
    /// It waits: the pack is being asked for or opened.
    Park,
    /// Read the chunk from the open pack, at this index.
    Read { name: PackName, index: u32 },
    /// Its readers fail: staging is the only way (`staged` mode) and it does not work.
    Fail { reason: String },
    /// The pack the holder named was not right: after the site does `then`, route it again.
    Again { then: Aftermath },
}

/// What the site does after the reader changed its mind about versions.
#[derive(Default)]
#[must_use]
pub(in crate::site) struct Aftermath {
    /// Versions no longer read through the bucket nor by any read: their manifests go.
    pub forget: Vec<ContentId>,
    /// Fetches of these versions that wait are sent again.
    pub resend: BTreeSet<ContentId>,
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
    from_region: Region,
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

/// The versions a site reads through the bucket.
#[derive(Default)]
pub(in crate::site) struct Reader {
    /// Versions being read through the bucket.
    reads: BTreeMap<ContentId, StagedRead>,
    /// Packs being read from, by name.
    packs_in: HashMap<PackName, PackIn>,
    /// Confirmations not sent yet, per holder.
    unstage: BTreeMap<SiteId, Vec<ContentId>>,
    /// Since when confirmations wait (the oldest not sent).
    unstage_since_ms: Option<u64>,
    /// Bytes read from the bucket.
    pub bytes_from_staging: u64,
}

impl Reader {
    /// Packs read from that are still tracked.
    pub fn packs(&self) -> usize {
        self.packs_in.len()
    }

    /// Versions read through the bucket and packs read from, still tracked.
    pub fn backlog(&self) -> (usize, usize) {
        (self.reads.len(), self.packs_in.len())
    }

    /// Routes a fetch of `hash` (of version `content`) through the bucket when that is how the
    /// version is read: from the open pack, or it waits while the pack is asked for or opened.
    /// `waiter` is the path of the fetch's first read.
    pub fn route(
        &mut self,
        view: &ReaderView<'_>,
        out: &mut VecDeque<Output>,
        content: ContentId,
        hash: ChunkHash,
        waiter: Option<&str>,
    ) -> Route {
        let Some(from_region) = view.staging_region(&content) else { return Route::Direct };
        // New (then the files that follow it are asked for too), or failed long enough ago to
        // try again: (the pack found spoiled, whether to read ahead).
        let ask = match self.reads.get(&content) {
            None => Some((None, true)),
            Some(StagedRead { state: Stage::Failed { since_ms, spoiled, .. }, .. })
                if view.now_ms.saturating_sub(*since_ms) >= STAGE_RETRY_MS =>
            {
                Some((spoiled.clone(), false))
            }
            Some(_) => None,
        };
        if let Some((spoiled, read_ahead)) = ask {
            self.ask_to_stage(view, out, content, from_region, spoiled, BTreeSet::new(), read_ahead);
        } else {
            self.wanted(view, out, content, waiter);
        }
        let read = self.reads.get(&content).expect("asked above");
        let (name, reason) = match &read.state {
            Stage::InPack { name, .. } => match self.packs_in.get(name).map(|p| &p.index) {
                Some(Some(index)) => match index.get(&hash) {
                    Some(&index) => return Route::Read { name: name.clone(), index },
                    None => (name.clone(), format!("the staged pack lacks chunk {hash}")),
                },
                Some(None) => return Route::Park,
                None => return self.failed(view, content, "the pack it is in was forgotten".to_owned()),
            },
            Stage::Requested { .. } => return Route::Park,
            Stage::Failed { reason, .. } => {
                let reason = reason.clone();
                return self.failed(view, content, reason);
            }
        };
        // Not the pack the holder said: asked again (or failed), the fetch goes where that leads.
        Route::Again { then: self.fail_pack(view, out, &name, BucketError::spoiled(reason)) }
    }

    /// A read wants `content`, already asked for: if it was read ahead, it no longer is, and
    /// the first read to want the one marked so asks for the next files ahead.
    fn wanted(
        &mut self,
        view: &ReaderView<'_>,
        out: &mut VecDeque<Output>,
        content: ContentId,
        waiter: Option<&str>,
    ) {
        let Some(read) = self.reads.get_mut(&content) else { return };
        if read.ahead_since_ms.take().is_none() {
            return;
        }
        if let Stage::Requested { since_ms, last_ask_ms, .. } = &mut read.state {
            // The wait for the answer counts from now, for this read.
            (*since_ms, *last_ask_ms) = (view.now_ms, view.now_ms);
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
        let (Some(holder), Some(path)) = (holder, waiter) else { return };
        if !view.peers.contains_key(&holder) {
            return;
        }
        read.trigger = false;
        let contents = self.read_ahead(view, path, &holder, &from_region);
        if !contents.is_empty() {
            let message = Message::Stage { region: view.config.region.clone(), contents, spoiled: None };
            out.push_back(Output::Send { to: holder, message });
        }
    }

    /// Registers, as asked of `holder`, up to [`SiteConfig::stage_read_ahead`] small files that
    /// follow `path` in its directory, written in `from_region`, neither held here nor asked
    /// for yet; returns their versions.
    fn read_ahead(
        &mut self,
        view: &ReaderView<'_>,
        path: &str,
        holder: &SiteId,
        from_region: &Region,
    ) -> Vec<ContentId> {
        let limit = view.config.stage_read_ahead;
        if limit == 0 {
            return Vec::new();
        }
        // Versions asked for already are passed over, up to as many again.
        let next = view.ns.next_siblings(path, limit * 2).unwrap_or_default();
        let mut contents = Vec::new();
        let mut bytes = 0;
        for entry in next {
            let Some(version) = entry.stat.version.filter(|_| entry.stat.kind == EntryKind::File) else {
                continue;
            };
            let written_there = SiteId::new(&version.site).is_ok_and(|w| view.region_of(&w) == from_region);
            if version.size == 0
                || version.size > READ_AHEAD_FILE_BYTES_MAX
                || !written_there
                || view.held.contains_key(&version.content)
                || self.reads.contains_key(&version.content)
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
        let now = view.now_ms;
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
                from_region: from_region.clone(),
                stager: None,
                state,
                ahead_since_ms: Some(now),
                trigger: i == middle,
            };
            self.reads.insert(*content, read);
        }
        contents
    }

    /// Asks a connected holder of `from_region` not in `tried` where `content` is staged for
    /// this region (with the files read ahead of it, if `read_ahead`). Every reader asks the
    /// same one ([`ReaderView::stage_holder`]), so the version goes up once.
    #[expect(clippy::too_many_arguments, reason = "the view and the outbox, then what to ask")]
    fn ask_to_stage(
        &mut self,
        view: &ReaderView<'_>,
        out: &mut VecDeque<Output>,
        content: ContentId,
        from_region: Region,
        spoiled: Option<PackName>,
        tried: BTreeSet<SiteId>,
        read_ahead: bool,
    ) {
        let path = view.reads.values().find(|r| r.content == content).map(|r| r.path.clone());
        let holder = view.stage_holder(content, &from_region, &tried);
        let now = view.now_ms;
        self.leave_pack(content);
        let stager = self.reads.get(&content).and_then(|r| r.stager.clone());
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
        self.reads.insert(content, read);
        let Some(from) = holder else { return };
        let mut contents = vec![content];
        if read_ahead && let Some(path) = path {
            contents.extend(self.read_ahead(view, &path, &from, &from_region));
        }
        let spoiled = spoiled.map(PackName::into_bytes);
        let message = Message::Stage { region: view.config.region.clone(), contents, spoiled };
        out.push_back(Output::Send { to: from, message });
    }

    /// Staging does not work for `content` right now: in `auto` mode the fetch goes direct,
    /// in `staged` mode its readers fail.
    fn failed(&mut self, view: &ReaderView<'_>, content: ContentId, reason: String) -> Route {
        if let Some(read) = self.reads.get_mut(&content)
            && !matches!(read.state, Stage::Failed { .. })
        {
            read.state = Stage::Failed { reason: reason.clone(), since_ms: view.now_ms, spoiled: None };
        }
        if view.config.staging == Some(Transfer::Staged) { Route::Fail { reason } } else { Route::Direct }
    }

    /// `content` no longer reads from the pack it was in.
    fn leave_pack(&mut self, content: ContentId) {
        let Some(StagedRead { state: Stage::InPack { name, .. }, .. }) = self.reads.get(&content) else {
            return;
        };
        if let Some(pack) = self.packs_in.get_mut(name) {
            pack.contents.remove(&content);
            if pack.contents.is_empty() {
                let name = name.clone();
                self.packs_in.remove(&name);
            }
        }
    }

    /// Forgets a version read ahead (or no longer read) that no read wants: its pack, and the
    /// holder asked or that staged it is told this site no longer needs it. Returns the
    /// version if no read of the site wants its manifest either.
    fn let_go(
        &mut self,
        view: &ReaderView<'_>,
        out: &mut VecDeque<Output>,
        content: ContentId,
    ) -> Option<ContentId> {
        self.leave_pack(content);
        let read = self.reads.remove(&content)?;
        let holder = match read.state {
            Stage::InPack { .. } => read.stager,
            Stage::Requested { from, .. } => Some(from),
            Stage::Failed { .. } => None,
        };
        if let Some(holder) = holder {
            self.queue_unstage(view, out, holder, content);
        }
        (!view.reads.values().any(|r| r.content == content)).then_some(content)
    }

    /// A pack is unusable. A spoiled one is reported to its holder at once, which stages its
    /// versions again (once: if that pack is spoiled too, or the bucket failed, the versions are
    /// read another way for now, and the holder is asked again after [`STAGE_RETRY_MS`]).
    /// Versions in it only read ahead are let go.
    fn fail_pack(
        &mut self,
        view: &ReaderView<'_>,
        out: &mut VecDeque<Output>,
        name: &PackName,
        error: BucketError,
    ) -> Aftermath {
        let mut then = Aftermath::default();
        let Some(pack) = self.packs_in.remove(name) else { return then };
        for content in &pack.contents {
            let Some(read) = self.reads.get_mut(content) else { continue };
            if read.ahead_since_ms.is_some() {
                then.forget.extend(self.let_go(view, out, *content));
                continue;
            }
            let spoiled = error.spoiled.then(|| name.clone());
            if error.spoiled && matches!(read.state, Stage::InPack { restaged: false, .. }) {
                let from_region = read.from_region.clone();
                self.ask_to_stage(view, out, *content, from_region, spoiled, BTreeSet::new(), false);
            } else {
                read.state = Stage::Failed { reason: error.reason.clone(), since_ms: view.now_ms, spoiled };
            }
        }
        then.resend = pack.contents;
        then
    }

    /// The pack `content` reads from is unusable (a chunk read from it failed or was wrong).
    pub fn fail_pack_of(
        &mut self,
        view: &ReaderView<'_>,
        out: &mut VecDeque<Output>,
        content: ContentId,
        error: BucketError,
    ) -> Aftermath {
        match self.reads.get(&content) {
            Some(StagedRead { state: Stage::InPack { name, .. }, .. }) => {
                let name = name.clone();
                self.fail_pack(view, out, &name, error)
            }
            _ => Aftermath::default(),
        }
    }

    /// The answer of holder `from` about `content`, asked where it is staged: `None` if it was
    /// not asked of `from`, else whether the answer named a pack (then the manifest that came
    /// with it is the site's to learn).
    pub fn on_staged(
        &mut self,
        view: &ReaderView<'_>,
        out: &mut VecDeque<Output>,
        from: &SiteId,
        pack: &Result<PackName, String>,
        content: ContentId,
    ) -> Option<bool> {
        let read = self.reads.get_mut(&content)?;
        let Stage::Requested { from: asked, tried, spoiled, .. } = &mut read.state else { return None };
        if asked != from {
            return None;
        }
        match pack {
            Ok(name) => {
                read.state = Stage::InPack { name: name.clone(), restaged: spoiled.is_some() };
                read.stager = Some(from.clone());
                match self.packs_in.entry(name.clone()) {
                    Entry::Occupied(mut pack) => {
                        pack.get_mut().contents.insert(content);
                    }
                    Entry::Vacant(pack) => {
                        pack.insert(PackIn { index: None, contents: BTreeSet::from([content]) });
                        out.push_back(Output::StageOpen { name: name.clone() });
                    }
                }
                return Some(true);
            }
            Err(_) if read.ahead_since_ms.is_some() => {
                self.reads.remove(&content);
            }
            Err(reason) => {
                // Another holder may do it (the writer may no longer hold what it wrote);
                // with none left, the refusal is the reason.
                let mut tried = std::mem::take(tried);
                tried.insert(from.clone());
                let (from_region, spoiled) = (read.from_region.clone(), spoiled.take());
                self.ask_to_stage(view, out, content, from_region, spoiled, tried, false);
                if let Some(StagedRead { state: Stage::Failed { reason: why, .. }, .. }) =
                    self.reads.get_mut(&content)
                {
                    *why = format!("{from} could not stage it: {reason}");
                }
            }
        }
        Some(false)
    }

    /// The result of an [`Output::StageOpen`]: the pack's chunks, `None` if it is not in the
    /// bucket, or why it could not be opened.
    pub fn opened(
        &mut self,
        view: &ReaderView<'_>,
        out: &mut VecDeque<Output>,
        name: PackName,
        opened: Result<Option<Vec<ChunkHash>>, BucketError>,
    ) -> Aftermath {
        let Some(pack) = self.packs_in.get_mut(&name) else { return Aftermath::default() };
        if pack.index.is_some() {
            return Aftermath::default();
        }
        match opened {
            Ok(Some(chunks)) => {
                pack.index = Some(chunks.into_iter().enumerate().map(|(i, h)| (h, i as u32)).collect());
                Aftermath { forget: Vec::new(), resend: pack.contents.clone() }
            }
            Ok(None) => {
                let error = BucketError::spoiled("its holder staged it, but the bucket does not have it");
                self.fail_pack(view, out, &name, error)
            }
            Err(error) => self.fail_pack(view, out, &name, error),
        }
    }

    /// A version read through the bucket is held here now: tell the holder that staged it (or,
    /// if none did or it is gone, every site of its region).
    pub fn confirm(&mut self, view: &ReaderView<'_>, out: &mut VecDeque<Output>, content: ContentId) {
        self.leave_pack(content);
        let Some(read) = self.reads.remove(&content) else { return };
        let to = match read.stager {
            Some(stager) => vec![stager],
            None => view.connected_in(&read.from_region),
        };
        for to in to {
            self.queue_unstage(view, out, to, content);
        }
        // Confirmations go together while reads through the bucket go on, at once after the last.
        if !self.reads.values().any(|r| r.ahead_since_ms.is_none()) {
            self.send_unstaged(view, out);
        }
    }

    /// Queues a confirmation for `to`; a full batch goes at once.
    fn queue_unstage(
        &mut self,
        view: &ReaderView<'_>,
        out: &mut VecDeque<Output>,
        to: SiteId,
        content: ContentId,
    ) {
        self.unstage_since_ms.get_or_insert(view.now_ms);
        let queued = self.unstage.entry(to.clone()).or_default();
        queued.push(content);
        if queued.len() >= UNSTAGE_BATCH_MAX {
            let contents = self.unstage.remove(&to).expect("just queued");
            send_unstage(view, out, to, contents);
        }
    }

    /// Sends all the confirmations queued.
    pub fn send_unstaged(&mut self, view: &ReaderView<'_>, out: &mut VecDeque<Output>) {
        self.unstage_since_ms = None;
        for (to, contents) in std::mem::take(&mut self.unstage) {
            send_unstage(view, out, to, contents);
        }
    }

    /// The versions asked of `peer`, which is gone: (version, its region, the pack found
    /// spoiled, whether only read ahead).
    pub fn asked_of(&self, peer: &SiteId) -> Vec<(ContentId, Region, Option<PackName>, bool)> {
        self.reads
            .iter()
            .filter_map(|(content, read)| match &read.state {
                Stage::Requested { from, spoiled, .. } if from == peer => {
                    Some((*content, read.from_region.clone(), spoiled.clone(), read.ahead_since_ms.is_some()))
                }
                _ => None,
            })
            .collect()
    }

    /// A version asked of a holder that is gone is asked of another, if one is connected; one
    /// only read ahead is let go. Returns whether its fetches are to be sent again.
    pub fn ask_another(
        &mut self,
        view: &ReaderView<'_>,
        out: &mut VecDeque<Output>,
        (content, from_region, spoiled, ahead): (ContentId, Region, Option<PackName>, bool),
    ) -> bool {
        if ahead {
            self.reads.remove(&content);
            return false;
        }
        if view.stage_holder(content, &from_region, &BTreeSet::new()).is_none() {
            // No one else to ask: a lost link is not a failure of staging (it is often
            // reset and back at once). The read starts over when a holder is connected,
            // and fails as any read does if none comes back.
            self.reads.remove(&content);
        } else {
            self.ask_to_stage(view, out, content, from_region, spoiled, BTreeSet::new(), false);
        }
        true
    }

    /// Time passes: let go of what was read ahead and not read, ask again, and return the
    /// versions whose holder did not answer in time (for [`Reader::give_up`]), with the
    /// manifests to forget. `wanted` are the versions the site's reads and fetches want.
    pub fn timeout(
        &mut self,
        view: &ReaderView<'_>,
        out: &mut VecDeque<Output>,
        wanted: &HashSet<ContentId>,
    ) -> (Vec<ContentId>, Vec<ContentId>) {
        let now_ms = view.now_ms;
        let retry = view.config.who_has_retry_ms;
        let mut ask_again: BTreeMap<(SiteId, Option<PackName>), Vec<ContentId>> = BTreeMap::new();
        let mut stalled = Vec::new();
        let mut idle = Vec::new();
        for (content, read) in &mut self.reads {
            if read.ahead_since_ms.is_none() && !wanted.contains(content) {
                // The reads that wanted it ended without holding it (a byte range, a failure):
                // kept like a version read ahead, for a while.
                read.ahead_since_ms = Some(now_ms);
            }
            if read.ahead_since_ms.is_some_and(|since| now_ms.saturating_sub(since) >= READ_AHEAD_IDLE_MS) {
                idle.push(*content);
            } else if let Stage::Requested { from, since_ms, last_ask_ms, spoiled, .. } = &mut read.state {
                if now_ms.saturating_sub(*since_ms) >= view.config.stage_timeout_ms {
                    stalled.push(*content);
                } else if now_ms.saturating_sub(*last_ask_ms) >= retry {
                    *last_ask_ms = now_ms;
                    ask_again.entry((from.clone(), spoiled.clone())).or_default().push(*content);
                }
            }
        }
        let forget = idle.into_iter().filter_map(|content| self.let_go(view, out, content)).collect();
        for ((to, spoiled), contents) in ask_again {
            for contents in contents.chunks(STAGE_VERSIONS_MAX) {
                let message = Message::Stage {
                    region: view.config.region.clone(),
                    contents: contents.to_vec(),
                    spoiled: spoiled.clone().map(PackName::into_bytes),
                };
                out.push_back(Output::Send { to: to.clone(), message });
            }
        }
        (stalled, forget)
    }

    /// When [`Reader::timeout`] is next due (`now_ms` if a version no longer `wanted` by any
    /// read or fetch of the site is still held as wanted).
    pub fn deadline(
        &self,
        config: &SiteConfig,
        now_ms: u64,
        wanted: impl Fn(&ContentId) -> bool,
    ) -> Option<u64> {
        let confirmations = self.unstage_since_ms.map(|since| since + UNSTAGE_WAIT_MS);
        let reads = self.reads.iter().flat_map(|(content, read)| {
            let idle = match read.ahead_since_ms {
                None if !wanted(content) => Some(now_ms),
                None => None,
                Some(since) => Some(since + READ_AHEAD_IDLE_MS),
            };
            let asked = match &read.state {
                Stage::Requested { since_ms, last_ask_ms, .. } => {
                    Some((since_ms + config.stage_timeout_ms).min(last_ask_ms + config.who_has_retry_ms))
                }
                _ => None,
            };
            idle.into_iter().chain(asked)
        });
        confirmations.into_iter().chain(reads).min()
    }

    /// The holder asked to stage `content` did not answer in time: the version is failed for
    /// now (one only read ahead is dropped). Returns whether its fetches are to be sent again.
    pub fn give_up(&mut self, content: ContentId, now_ms: u64) -> bool {
        let Some(read) = self.reads.get_mut(&content) else { return false };
        if read.ahead_since_ms.is_some() {
            self.reads.remove(&content);
            return false;
        }
        read.state = Stage::Failed {
            reason: "the holder asked to stage it did not answer in time".into(),
            since_ms: now_ms,
            spoiled: None,
        };
        true
    }

    /// The reader's rules: a version read from a pack is listed by that pack, and a pack lists
    /// only versions read from it; confirmations wait below the batch size.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (content, read) in &self.reads {
            if let Stage::InPack { name, .. } = &read.state
                && !self.packs_in.get(name).is_some_and(|p| p.contents.contains(content))
            {
                return Err(format!("version {content} reads from {name:?} that does not list it"));
            }
        }
        for (name, pack) in &self.packs_in {
            for content in &pack.contents {
                if !matches!(self.reads.get(content), Some(StagedRead { state: Stage::InPack { name: n, .. }, .. }) if n == name)
                {
                    return Err(format!("{name:?} lists version {content}, which does not read from it"));
                }
            }
        }
        if self.unstage.values().any(|c| c.len() >= UNSTAGE_BATCH_MAX) {
            return Err("a full batch of confirmations was not sent".into());
        }
        Ok(())
    }
}

/// Sends confirmations for `to` — to every connected site of its region if it is gone.
fn send_unstage(view: &ReaderView<'_>, out: &mut VecDeque<Output>, to: SiteId, contents: Vec<ContentId>) {
    let to = if view.peers.contains_key(&to) {
        vec![to]
    } else {
        let region = view.region_of(&to).clone();
        view.connected_in(&region)
    };
    for to in to {
        let message = Message::Unstage { region: view.config.region.clone(), contents: contents.clone() };
        out.push_back(Output::Send { to, message });
    }
}

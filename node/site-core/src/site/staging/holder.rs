//! The holder's half of staging: versions that sites of other regions asked for, batched into
//! packs and uploaded, and each pack deleted once its region is done with it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use crdt_namespace::{ContentId, SiteId};
use proto::{Message, Region, STAGE_VERSIONS_MAX, StagedVersion};

use super::{
    PACK_BYTES_MAX, PACK_IDLE_MS, PACK_VERSIONS_MAX, PackName, READ_AHEAD_FILE_BYTES_MAX, UNSTAGE_GRACE_MS,
    pack_name,
};
use crate::content::{ChunkRef, Manifest};
use crate::site::{Output, SiteConfig};

/// What the holder sees of the site: its configuration, the versions it holds and the time.
pub(in crate::site) struct HolderView<'a> {
    pub config: &'a SiteConfig,
    pub held: &'a HashMap<ContentId, Manifest>,
    pub now_ms: u64,
}

/// A pack this site uploaded, or is uploading.
struct PackOut {
    region: Region,
    contents: Vec<ContentId>,
    uploaded: bool,
    /// The sites of `region` that hold each version since (confirmed it).
    confirmed: HashMap<ContentId, BTreeSet<SiteId>>,
    /// Versions every site of `region` confirmed.
    complete: usize,
    /// When it was last asked about or confirmed.
    last_ms: u64,
}

/// The packs a site stages for other regions, and the versions waiting to go up.
#[derive(Default)]
pub(in crate::site) struct Holder {
    /// Packs uploaded or uploading, by name.
    packs_out: BTreeMap<PackName, PackOut>,
    /// The pack that holds (or will hold) a version for a region.
    staged_out: HashMap<(ContentId, Region), PackName>,
    /// Versions asked for and not in a pack yet, per region, in order.
    queue: BTreeMap<Region, VecDeque<ContentId>>,
    /// Sites waiting for a version queued or uploading for their region.
    waiting: HashMap<(ContentId, Region), Vec<SiteId>>,
    /// Packs uploading, per region.
    uploading: BTreeMap<Region, usize>,
    /// Packs started since the site started (part of their names).
    serial: u64,
    /// Bytes uploaded.
    pub bytes_to_staging: u64,
}

impl Holder {
    /// Packs uploaded or uploading that are still tracked.
    pub fn packs(&self) -> usize {
        self.packs_out.len()
    }

    /// The versions of the packs going up: their chunks are read for the upload.
    pub fn uploading_contents(&self) -> impl Iterator<Item = &ContentId> {
        self.packs_out.values().filter(|p| !p.uploaded).flat_map(|p| p.contents.iter())
    }

    /// The answers naming `pack` for `contents` (as many messages as the bound per message
    /// needs), with the manifests of the small versions, to `to`.
    fn send_staged(
        view: &HolderView<'_>,
        out: &mut VecDeque<Output>,
        to: &SiteId,
        region: &Region,
        pack: Result<PackName, String>,
        contents: &[ContentId],
    ) {
        let with_manifests = pack.is_ok();
        for part in contents.chunks(STAGE_VERSIONS_MAX) {
            let versions = part
                .iter()
                .map(|content| StagedVersion {
                    content: *content,
                    manifest: view
                        .held
                        .get(content)
                        .filter(|m| with_manifests && m.size <= READ_AHEAD_FILE_BYTES_MAX)
                        .map(|m| m.encode()),
                })
                .collect();
            let pack = pack.clone().map(PackName::into_bytes);
            let message = Message::Staged { region: region.clone(), pack, versions };
            out.push_back(Output::Send { to: to.clone(), message });
        }
    }

    /// A site of another region asks where versions are staged for it.
    pub fn stage_for(
        &mut self,
        view: &HolderView<'_>,
        out: &mut VecDeque<Output>,
        from: &SiteId,
        region: Region,
        contents: Vec<ContentId>,
        spoiled: Option<PackName>,
    ) {
        if view.config.staging.is_none() {
            let why = format!("site {} has no staging bucket", view.config.site);
            return Self::send_staged(view, out, from, &region, Err(why), &contents);
        }
        // A site asks only for its own region, never this one's: anything else would make this
        // site upload a copy of the version per region named, for a member that has no use
        // for it.
        if view.config.regions.get(from) != Some(&region) || region == view.config.region {
            tracing::warn!(site = %from, %region, "refusing to stage for a region the asking site is not of");
            let why = format!("site {from} is not of region {region}: a site asks to stage only for its own");
            return Self::send_staged(view, out, from, &region, Err(why), &contents);
        }
        if let Some(bad) = spoiled
            && contents.iter().any(|c| self.staged_out.get(&(*c, region.clone())) == Some(&bad))
            && self.packs_out.get(&bad).is_some_and(|p| p.uploaded)
        {
            tracing::warn!(site = %from, "a staged pack was found spoiled: staging its versions again");
            self.drop_pack(out, &bad);
        }
        let mut refused = Vec::new();
        let mut ready: BTreeMap<PackName, Vec<ContentId>> = BTreeMap::new();
        let mut seen = HashSet::new();
        for content in contents {
            if !seen.insert(content) {
                continue;
            }
            if !view.held.contains_key(&content) {
                refused.push(content);
                continue;
            }
            if let Some(name) = self.wait_for(view, from, content, &region) {
                ready.entry(name).or_default().push(content);
            }
        }
        if !refused.is_empty() {
            let why = format!("site {} does not hold this version", view.config.site);
            Self::send_staged(view, out, from, &region, Err(why), &refused);
        }
        for (name, contents) in ready {
            Self::send_staged(view, out, from, &region, Ok(name), &contents);
        }
        self.start_uploads(view, out, &region);
    }

    /// `from` asks for `content` (held here) for `region`: the pack it is in if uploaded, else
    /// `from` waits for it, queued to go up unless its pack is going up already.
    fn wait_for(
        &mut self,
        view: &HolderView<'_>,
        from: &SiteId,
        content: ContentId,
        region: &Region,
    ) -> Option<PackName> {
        let key = (content, region.clone());
        let in_pack = match self.staged_out.get(&key) {
            Some(name) => {
                let pack = self.packs_out.get_mut(name).expect("a staged version is in a pack");
                if pack.uploaded {
                    pack.last_ms = view.now_ms;
                    return Some(name.clone());
                }
                true
            }
            None => false,
        };
        // Sabotage: a version asked for again while its pack goes up goes up again.
        let again = in_pack
            && crate::sabotage::stage_twice()
            && !self.queue.get(region).is_some_and(|q| q.contains(&content));
        let waiting = self.waiting.entry(key).or_default();
        if (waiting.is_empty() && !in_pack) || again {
            self.queue.entry(region.clone()).or_default().push_back(content);
        }
        if !waiting.contains(from) {
            waiting.push(from.clone());
        }
        None
    }

    /// Tells the sites waiting for `contents` (staged for `region`) the answer.
    fn answer_waiting(
        &mut self,
        view: &HolderView<'_>,
        out: &mut VecDeque<Output>,
        region: &Region,
        answer: Result<PackName, String>,
        contents: &[ContentId],
    ) {
        let mut to_site: BTreeMap<SiteId, Vec<ContentId>> = BTreeMap::new();
        for content in contents {
            for to in self.waiting.remove(&(*content, region.clone())).unwrap_or_default() {
                to_site.entry(to).or_default().push(*content);
            }
        }
        for (to, contents) in to_site {
            Self::send_staged(view, out, &to, region, answer.clone(), &contents);
        }
    }

    /// Starts uploading the versions queued for `region`, in packs, up to the bound of uploads
    /// in flight.
    fn start_uploads(&mut self, view: &HolderView<'_>, out: &mut VecDeque<Output>, region: &Region) {
        let Some(mut queue) = self.queue.remove(region) else { return };
        let mut gone = Vec::new();
        while self.uploading.get(region).copied().unwrap_or(0) < view.config.stage_uploads_in_flight {
            let (contents, chunks) = next_pack(view.held, &mut queue, &mut gone);
            if contents.is_empty() {
                break;
            }
            let serial = self.serial;
            self.serial += 1;
            let name = pack_name(&view.config.site, serial, &view.config.region, region, &contents);
            for content in &contents {
                self.staged_out.insert((*content, region.clone()), name.clone());
            }
            let pack = PackOut {
                region: region.clone(),
                contents,
                uploaded: false,
                confirmed: HashMap::new(),
                complete: 0,
                last_ms: view.now_ms,
            };
            self.packs_out.insert(name.clone(), pack);
            *self.uploading.entry(region.clone()).or_default() += 1;
            out.push_back(Output::StageUpload { name, region: region.clone(), chunks });
        }
        if !queue.is_empty() {
            self.queue.insert(region.clone(), queue);
        }
        if !gone.is_empty() {
            let reason = format!("site {} no longer holds this version", view.config.site);
            self.answer_waiting(view, out, region, Err(reason), &gone);
        }
    }

    /// The result of an [`Output::StageUpload`]: the bytes uploaded, or why it failed.
    pub fn uploaded(
        &mut self,
        view: &HolderView<'_>,
        out: &mut VecDeque<Output>,
        name: PackName,
        uploaded: Result<u64, String>,
    ) {
        let Some(pack) = self.packs_out.get_mut(&name) else { return };
        if pack.uploaded {
            return;
        }
        let region = pack.region.clone();
        if let Some(n) = self.uploading.get_mut(&region) {
            *n = n.saturating_sub(1);
        }
        let contents = match uploaded {
            Ok(bytes) => {
                self.bytes_to_staging += bytes;
                pack.uploaded = true;
                pack.last_ms = view.now_ms;
                pack.contents.clone()
            }
            Err(_) => {
                let pack = self.packs_out.remove(&name).expect("checked above");
                for content in &pack.contents {
                    self.staged_out.remove(&(*content, region.clone()));
                }
                pack.contents
            }
        };
        let done = self.packs_out.get(&name).is_some_and(|p| p.complete == p.contents.len());
        self.answer_waiting(view, out, &region, uploaded.map(|_| name.clone()), &contents);
        if done {
            // Every site of the region said it no longer needs any of it while it went up.
            self.drop_pack(out, &name);
        }
        self.start_uploads(view, out, &region);
    }

    /// A site of `region` holds these versions now, read from the bucket, or no longer needs
    /// them: it stops waiting for them, and a pack every site of the region is done with is
    /// deleted (once uploaded).
    pub fn on_unstage(
        &mut self,
        view: &HolderView<'_>,
        out: &mut VecDeque<Output>,
        from: &SiteId,
        region: Region,
        contents: Vec<ContentId>,
    ) {
        if view.config.regions.get(from) != Some(&region) {
            return;
        }
        let mut unqueue = HashSet::new();
        for content in contents {
            let key = (content, region.clone());
            if let Some(waiting) = self.waiting.get_mut(&key) {
                waiting.retain(|s| s != from);
                if waiting.is_empty() {
                    self.waiting.remove(&key);
                    unqueue.insert(content);
                }
            }
            let Some(name) = self.staged_out.get(&key).cloned() else { continue };
            let pack = self.packs_out.get_mut(&name).expect("a staged version is in a pack");
            pack.last_ms = view.now_ms;
            let confirmed = pack.confirmed.entry(content).or_default();
            if confirmed.insert(from.clone())
                && view
                    .config
                    .regions
                    .iter()
                    .filter(|(_, r)| **r == region)
                    .all(|(s, _)| confirmed.contains(s))
            {
                pack.complete += 1;
            }
            if pack.uploaded && pack.complete == pack.contents.len() {
                self.drop_pack(out, &name);
            }
        }
        // Versions nobody waits for any more are not staged.
        if !unqueue.is_empty()
            && let Some(queue) = self.queue.get_mut(&region)
        {
            queue.retain(|c| !unqueue.contains(c));
        }
    }

    /// Deletes a pack this site uploaded.
    fn drop_pack(&mut self, out: &mut VecDeque<Output>, name: &PackName) {
        let Some(pack) = self.packs_out.remove(name) else { return };
        for content in pack.contents {
            let key = (content, pack.region.clone());
            if self.staged_out.get(&key).is_some_and(|n| n == name) {
                self.staged_out.remove(&key);
            }
        }
        out.push_back(Output::StageDelete { name: name.clone() });
    }

    /// Time passes: packs every version of which was confirmed a while ago, or nobody asked
    /// about for long, are deleted.
    pub fn timeout(&mut self, out: &mut VecDeque<Output>, now_ms: u64) {
        let done: Vec<PackName> = self
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
            self.drop_pack(out, &name);
        }
    }

    /// When [`Holder::timeout`] next has a pack to delete.
    pub fn deadline(&self) -> Option<u64> {
        self.packs_out
            .values()
            .filter(|p| p.uploaded)
            .map(|p| {
                let all_confirmed = p.contents.iter().all(|c| p.confirmed.contains_key(c));
                p.last_ms + if all_confirmed { UNSTAGE_GRACE_MS } else { PACK_IDLE_MS }
            })
            .min()
    }

    /// The holder's rules: each version is in at most one pack per region (the pack
    /// `staged_out` names, which lists it), so it goes up once per region pair; the uploads in
    /// flight per region are those of the packs not yet uploaded, within the bound; a pack's
    /// confirmed versions are among its versions; a queued version is waited for and in no
    /// pack; a site waits only for a version queued or going up.
    pub fn check_invariants(&self, config: &SiteConfig) -> Result<(), String> {
        for ((content, region), name) in &self.staged_out {
            match self.packs_out.get(name) {
                Some(pack) if pack.region == *region && pack.contents.contains(content) => {}
                _ => {
                    return Err(format!(
                        "version {content} for {region} is staged in {name:?} that does not list it"
                    ));
                }
            }
        }
        let mut uploading: BTreeMap<&Region, usize> = BTreeMap::new();
        for (name, pack) in &self.packs_out {
            for content in &pack.contents {
                if self.staged_out.get(&(*content, pack.region.clone())) != Some(name) {
                    return Err(format!(
                        "version {content} is in {name:?} for {} and staged elsewhere: it goes up twice",
                        pack.region
                    ));
                }
            }
            if pack.complete > pack.contents.len()
                || pack.confirmed.keys().any(|c| !pack.contents.contains(c))
            {
                return Err(format!("{name:?} counts confirmations of versions it lacks"));
            }
            if !pack.uploaded {
                *uploading.entry(&pack.region).or_default() += 1;
            }
        }
        for (region, n) in &self.uploading {
            let going_up = uploading.get(region).copied().unwrap_or(0);
            if *n != going_up || *n > config.stage_uploads_in_flight {
                return Err(format!("{n} uploads counted for {region}, {going_up} packs going up"));
            }
        }
        for (region, queue) in &self.queue {
            for content in queue {
                let key = (*content, region.clone());
                if self.waiting.get(&key).is_none_or(Vec::is_empty) || self.staged_out.contains_key(&key) {
                    return Err(format!(
                        "version {content} is queued for {region} with nobody waiting, or in a pack"
                    ));
                }
            }
        }
        for (key, sites) in &self.waiting {
            let queued = self.queue.get(&key.1).is_some_and(|q| q.contains(&key.0));
            let going_up =
                self.staged_out.get(key).and_then(|n| self.packs_out.get(n)).is_some_and(|p| !p.uploaded);
            if sites.is_empty() || !(queued || going_up) {
                return Err(format!(
                    "sites wait for version {} for {} that is neither queued nor going up",
                    key.0, key.1
                ));
            }
        }
        Ok(())
    }
}

/// Takes the next pack's versions off `queue` (at least one, then up to the bounds of versions
/// and bytes per pack) with their chunks, each once; versions no longer held go to `gone`.
fn next_pack(
    held: &HashMap<ContentId, Manifest>,
    queue: &mut VecDeque<ContentId>,
    gone: &mut Vec<ContentId>,
) -> (Vec<ContentId>, Vec<ChunkRef>) {
    let mut contents = Vec::new();
    let mut chunks: Vec<ChunkRef> = Vec::new();
    let mut seen = HashSet::new();
    let mut bytes = 0;
    while let Some(&content) = queue.front() {
        let Some(manifest) = held.get(&content) else {
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
    (contents, chunks)
}

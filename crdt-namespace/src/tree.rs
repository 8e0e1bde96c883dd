//! The materialised tree: the result of applying every operation in the total order of their
//! ids (HLC, then site), maintained incrementally.
//!
//! An operation that arrives later than operations ordered after it is put in place by undoing
//! those, applying it, and redoing them (Kleppmann et al., "A highly-available move operation for
//! replicated trees", 2021). Every change of state is recorded on an undo stack, so undo is exact.
//! The tree never reads a clock, never does I/O and never allocates without a bound set by the
//! operations it is given.
//!
//! The collision rules of the contract live in the `apply_*` methods and [`Tree::claim_name`]:
//! - directories created at one path merge (the later becomes an alias of the earlier);
//! - a directory takes a name from a file; otherwise the entry already there keeps the name and
//!   the arriving one gets `<stem>.conflict-<site>-<id8><.ext>`;
//! - a write whose base is not the current version moves the current version to a sibling
//!   conflict copy;
//! - a remove carries the version vector of what its site had seen, so whatever it had not seen
//!   (a concurrent create, write or move) survives with the path to it; it also lists the
//!   entries its site saw in the subtree, and only those can be deleted (the final order of
//!   operations may place there entries the remover saw elsewhere);
//! - writes and moves bring deleted entries back; a move that would make a cycle is skipped.
//!
//! The tree holds entries (live and deleted), a name index per directory, the aliases of merged
//! directories, the log of applied operations and the undo stack. Applying an operation in order
//! touches only the entries it names.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::codec::{CreateBody, FileMeta, Op, TagChange};
use crate::ids::{EntryId, OpId, SiteIdx, Sites};
use crate::{ContentId, EntryKind, Hlc, NAME_MAX_BYTES, TagValue};

/// The version a file entry currently shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileVersion {
    /// The operation that wrote it; for the first version, the create operation.
    pub(crate) op: OpId,
    pub(crate) content: ContentId,
    pub(crate) size: u64,
}

/// What an entry holds besides its place and attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Data {
    Dir,
    File(FileVersion),
    Symlink(Box<str>),
}

pub(crate) type Tags = BTreeMap<Box<str>, TagValue>;

/// One entry, live or deleted (a deleted entry keeps its place so that a concurrent write can
/// bring it back).
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) id: EntryId,
    pub(crate) parent: EntryId,
    pub(crate) name: Box<str>,
    pub(crate) alive: bool,
    pub(crate) mode: u32,
    pub(crate) mtime_ns: i64,
    /// The last move applied to the entry, if any.
    pub(crate) moved: Option<OpId>,
    pub(crate) data: Data,
    pub(crate) tags: Option<Box<Tags>>,
}

impl Entry {
    pub(crate) fn kind(&self) -> EntryKind {
        match self.data {
            Data::Dir => EntryKind::Dir,
            Data::File(_) => EntryKind::File,
            Data::Symlink(_) => EntryKind::Symlink,
        }
    }

    /// The operation that created the entry (for a conflict copy: the version it preserves).
    pub(crate) fn created(&self) -> OpId {
        self.id.op
    }
}

enum Undo {
    /// The entry was created: remove it (it is the last one in `entries`).
    Created(EntryId),
    /// The entry was changed: put back its former state.
    Changed(Box<Entry>),
    /// A directory was merged into another: forget the alias.
    Aliased(EntryId),
}

/// A directory created where another already was, merged into it.
struct Alias {
    into: EntryId,
}

/// One applied operation in the log, with where its undo records start.
#[derive(Clone, Copy)]
struct Applied {
    hlc: Hlc,
    site: SiteIdx,
    undo_start: u32,
}

impl Applied {
    fn op(self) -> OpId {
        OpId { hlc: self.hlc, site: self.site }
    }
}

/// The materialised namespace.
pub(crate) struct Tree {
    entries: Vec<Entry>,
    index: HashMap<EntryId, u32>,
    /// Live children of each directory by name.
    children: HashMap<EntryId, BTreeMap<Box<str>, EntryId>>,
    /// Directories created concurrently at the same path, merged into the one applied first.
    aliases: HashMap<EntryId, Alias>,
    log: Vec<Applied>,
    undo: Vec<Undo>,
    /// Number of live entries, the root included.
    live: usize,
    /// Live file entries showing each version, by [`ref_key`]: what refers to it.
    refs: HashMap<u64, u32>,
    /// Versions whose count in `refs` changed since [`Tree::take_touched`] was last called,
    /// if anyone asks ([`Tree::track_touched`]).
    touched: Option<HashSet<ContentId>>,
    /// Entries changed (renamed, removed, written, re-tagged, ...) since
    /// [`Tree::take_changed`] was last called, if anyone asks ([`Tree::track_changed`]).
    changed: Option<Vec<EntryId>>,
}

impl Tree {
    pub(crate) fn new() -> Tree {
        let root = Entry {
            id: EntryId::ROOT,
            parent: EntryId::ROOT,
            name: "".into(),
            alive: true,
            mode: 0o755,
            mtime_ns: 0,
            moved: None,
            data: Data::Dir,
            tags: None,
        };
        let mut tree = Tree {
            entries: vec![root],
            index: HashMap::new(),
            children: HashMap::new(),
            aliases: HashMap::new(),
            log: Vec::new(),
            undo: Vec::new(),
            live: 1,
            refs: HashMap::new(),
            touched: None,
            changed: None,
        };
        tree.index.insert(EntryId::ROOT, 0);
        tree
    }

    // ---- reads ----

    pub(crate) fn get(&self, id: EntryId) -> Option<&Entry> {
        self.index.get(&id).map(|i| &self.entries[*i as usize])
    }

    pub(crate) fn entry(&self, id: EntryId) -> &Entry {
        self.get(id).expect("entry ids handed out by the tree exist")
    }

    pub(crate) fn is_alive(&self, id: EntryId) -> bool {
        self.get(id).is_some_and(|e| e.alive)
    }

    pub(crate) fn child(&self, dir: EntryId, name: &str) -> Option<EntryId> {
        self.children.get(&dir).and_then(|c| c.get(name)).copied()
    }

    pub(crate) fn children(&self, dir: EntryId) -> impl Iterator<Item = (&str, EntryId)> {
        self.children.get(&dir).into_iter().flat_map(|c| c.iter().map(|(n, id)| (&**n, *id)))
    }

    /// The children of `dir` named after `name`, in name order.
    pub(crate) fn children_after<'a>(
        &'a self,
        dir: EntryId,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a str, EntryId)> + 'a {
        use std::ops::Bound;
        self.children.get(&dir).into_iter().flat_map(move |c| {
            c.range::<str, _>((Bound::Excluded(name), Bound::Unbounded)).map(|(n, id)| (&**n, *id))
        })
    }

    pub(crate) fn has_children(&self, dir: EntryId) -> bool {
        self.children.get(&dir).is_some_and(|c| !c.is_empty())
    }

    /// Whether a live entry shows version `content`.
    pub(crate) fn refers_to(&self, content: &ContentId) -> bool {
        self.refs.contains_key(&ref_key(content))
    }

    /// The versions whose references changed since the last call (gained or lost one, even if
    /// they are back where they were).
    pub(crate) fn take_touched(&mut self) -> HashSet<ContentId> {
        self.touched.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Starts noting the versions whose references change, for [`Tree::take_touched`].
    pub(crate) fn track_touched(&mut self) {
        self.touched.get_or_insert_with(HashSet::new);
    }

    /// The entries changed since the last call (some may be back as they were, and one may
    /// be named more than once).
    pub(crate) fn take_changed(&mut self) -> Vec<EntryId> {
        self.changed.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Starts noting the entries that change, for [`Tree::take_changed`].
    pub(crate) fn track_changed(&mut self) {
        self.changed.get_or_insert_with(Vec::new);
    }

    pub(crate) fn live_count(&self) -> usize {
        self.live
    }

    pub(crate) fn log_len(&self) -> usize {
        self.log.len()
    }

    /// The live entries of the subtree at `root`, `root` included.
    pub(crate) fn subtree(&self, root: EntryId) -> Vec<EntryId> {
        let mut out = Vec::new();
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            out.push(id);
            stack.extend(self.children(id).map(|(_, c)| c));
        }
        out
    }

    /// Follows the merges of concurrently created directories.
    pub(crate) fn canonical(&self, mut id: EntryId) -> EntryId {
        // Each alias points at a directory applied earlier, so chains end; the bound guards
        // against a bug turning into a hang.
        for _ in 0..=self.aliases.len() {
            match self.aliases.get(&id) {
                Some(alias) => id = alias.into,
                None => return id,
            }
        }
        panic!("alias cycle at {id:?}");
    }

    /// Whether `ancestor` is `id` or one of its ancestors, following parents of live and deleted
    /// entries alike.
    fn is_ancestor_or_self(&self, ancestor: EntryId, mut id: EntryId) -> bool {
        for _ in 0..=self.entries.len() + 1 {
            if id == ancestor {
                return true;
            }
            if id == EntryId::ROOT {
                return false;
            }
            id = self.entry(id).parent;
        }
        panic!("parent cycle above {id:?}");
    }

    // ---- the log ----

    /// Where `op` is or would be in the log.
    pub(crate) fn log_position(&self, op: OpId, sites: &Sites) -> Result<usize, usize> {
        if let Some(last) = self.log.last()
            && last.op().cmp(op, sites).is_lt()
        {
            return Err(self.log.len());
        }
        self.log.binary_search_by(|a| a.op().cmp(op, sites))
    }

    /// Undoes the last applied operation and returns its id.
    pub(crate) fn undo_last(&mut self) -> Option<OpId> {
        let applied = self.log.pop()?;
        while self.undo.len() > applied.undo_start as usize {
            match self.undo.pop().expect("undo records above the start") {
                Undo::Created(id) => {
                    self.unindex(id);
                    let entry = self.entries.pop().expect("a created entry");
                    assert_eq!(entry.id, id, "entries are created and undone in stack order");
                    self.index.remove(&id);
                }
                Undo::Changed(prior) => {
                    let id = prior.id;
                    self.unindex(id);
                    let i = self.index[&id] as usize;
                    self.entries[i] = *prior;
                    self.reindex(id);
                }
                Undo::Aliased(id) => {
                    self.aliases.remove(&id);
                }
            }
        }
        Some(applied.op())
    }

    // ---- changing entries: every change goes through these, so it can be undone ----

    fn unindex(&mut self, id: EntryId) {
        let e = self.entry(id);
        if e.alive && id != EntryId::ROOT {
            let (parent, name) = (e.parent, e.name.clone());
            let dir = self.children.get_mut(&parent).expect("a live entry's parent has children");
            let removed = dir.remove(&name);
            assert_eq!(removed, Some(id), "index of {name:?}");
            self.live -= 1;
            if dir.is_empty() {
                self.children.remove(&parent);
            }
            self.count_reference(id, false);
        }
    }

    /// Counts the version a live file entry shows in (or out of) `refs`.
    fn count_reference(&mut self, id: EntryId, live: bool) {
        let Data::File(version) = &self.entry(id).data else { return };
        let content = version.content;
        if let Some(touched) = &mut self.touched {
            touched.insert(content);
        }
        if live {
            *self.refs.entry(ref_key(&content)).or_insert(0) += 1;
        } else if let std::collections::hash_map::Entry::Occupied(mut count) =
            self.refs.entry(ref_key(&content))
        {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
    }

    fn reindex(&mut self, id: EntryId) {
        let e = self.entry(id);
        if e.alive && id != EntryId::ROOT {
            let (parent, name) = (e.parent, e.name.clone());
            let previous = self.children.entry(parent).or_default().insert(name, id);
            assert!(previous.is_none(), "two live entries under one name");
            self.live += 1;
            self.count_reference(id, true);
        }
    }

    fn create(&mut self, entry: Entry) {
        let id = entry.id;
        let i = u32::try_from(self.entries.len()).expect("fewer than 2^32 entries");
        self.entries.push(entry);
        self.index.insert(id, i);
        self.undo.push(Undo::Created(id));
        self.reindex(id);
    }

    fn update(&mut self, id: EntryId, change: impl FnOnce(&mut Entry)) {
        self.unindex(id);
        let i = self.index[&id] as usize;
        self.undo.push(Undo::Changed(Box::new(self.entries[i].clone())));
        if let Some(changed) = &mut self.changed {
            changed.push(id);
        }
        change(&mut self.entries[i]);
        self.reindex(id);
    }

    // ---- applying operations ----

    /// Applies `op` after every operation already in the log. The caller guarantees that `id`
    /// orders after the last applied one.
    pub(crate) fn apply(&mut self, id: OpId, op: &Op, sites: &Sites) {
        let undo_start = u32::try_from(self.undo.len()).expect("fewer than 2^32 undo records");
        self.log.push(Applied { hlc: id.hlc, site: id.site, undo_start });
        match op {
            Op::Create { parent, name, body } => self.apply_create(id, *parent, name, body, sites),
            Op::Write { target, base, meta } => self.apply_write(id, *target, *base, meta, sites),
            Op::Move { target, parent, name } => self.apply_move(id, *target, *parent, name, sites),
            Op::Remove { target, seen, entries } => self.apply_remove(*target, seen, entries),
            Op::SetTag { target, key, change } => {
                let target = self.canonical(*target);
                if self.get(target).is_some() {
                    self.update(target, |e| {
                        let tags = e.tags.get_or_insert_with(Default::default);
                        match change {
                            TagChange::Define(value) => {
                                tags.insert(key.clone(), value.clone());
                            }
                            TagChange::Clear => {
                                tags.remove(key);
                            }
                        }
                        if tags.is_empty() {
                            e.tags = None;
                        }
                    });
                }
            }
            Op::SetAttr { target, mode, mtime_ns } => {
                let target = self.canonical(*target);
                if target != EntryId::ROOT && self.get(target).is_some() {
                    self.update(target, |e| {
                        if let Some(mode) = mode {
                            e.mode = *mode;
                        }
                        if let Some(mtime) = mtime_ns {
                            e.mtime_ns = *mtime;
                        }
                    });
                }
            }
        }
    }

    fn is_dir(&self, id: EntryId) -> bool {
        self.get(id).is_some_and(|e| e.data == Data::Dir)
    }

    fn apply_create(&mut self, op: OpId, parent: EntryId, name: &str, body: &CreateBody, sites: &Sites) {
        let id = EntryId::created_by(op);
        let parent = self.canonical(parent);
        if self.get(id).is_some() || self.aliases.contains_key(&id) || !self.is_dir(parent) {
            return;
        }
        self.revive_path(parent, sites);
        if matches!(body, CreateBody::Dir { .. })
            && let Some(existing) = self.child(parent, name).filter(|c| self.is_dir(*c))
        {
            // Both sites made this directory: one directory, the union of both contents.
            self.aliases.insert(id, Alias { into: existing });
            self.undo.push(Undo::Aliased(id));
            return;
        }
        let (data, mode, mtime_ns) = match body {
            CreateBody::Dir { mode, mtime_ns } => (Data::Dir, *mode, *mtime_ns),
            CreateBody::File(FileMeta { content, size, mode, mtime_ns }) => {
                (Data::File(FileVersion { op, content: *content, size: *size }), *mode, *mtime_ns)
            }
            CreateBody::Symlink { target, mtime_ns } => (Data::Symlink(target.clone()), 0o777, *mtime_ns),
        };
        let is_dir = data == Data::Dir;
        let name = self.claim_name(parent, name, id, is_dir, sites);
        self.create(Entry { id, parent, name, alive: true, mode, mtime_ns, moved: None, data, tags: None });
    }

    fn apply_write(&mut self, op: OpId, target: EntryId, base: OpId, meta: &FileMeta, sites: &Sites) {
        let target = self.canonical(target);
        let Some(Data::File(current)) = self.get(target).map(|e| e.data.clone()) else { return };
        // A write wins over a concurrent delete: bring the file and the path to it back.
        self.revive_path(target, sites);
        if current.op != base {
            // The writer did not see the current version: both are kept, the later (this one)
            // as the file, the earlier as a sibling conflict copy.
            let copy = EntryId::copy_of(current.op);
            if self.get(copy).is_none() {
                let e = self.entry(target);
                let (parent, base_name, mode, mtime_ns) = (e.parent, e.name.clone(), e.mode, e.mtime_ns);
                let name = self.conflict_name(parent, &base_name, copy, sites);
                self.create(Entry {
                    id: copy,
                    parent,
                    name,
                    alive: true,
                    mode,
                    mtime_ns,
                    moved: None,
                    data: Data::File(current),
                    tags: None,
                });
            }
        }
        self.update(target, |e| {
            e.data = Data::File(FileVersion { op, content: meta.content, size: meta.size });
            e.mode = meta.mode;
            e.mtime_ns = meta.mtime_ns;
        });
    }

    fn apply_move(&mut self, op: OpId, target: EntryId, parent: EntryId, name: &str, sites: &Sites) {
        let target = self.canonical(target);
        let parent = self.canonical(parent);
        if target == EntryId::ROOT || self.get(target).is_none() || !self.is_dir(parent) {
            return;
        }
        if self.is_ancestor_or_self(target, parent) && !crate::sabotage::skip_cycle_check() {
            // The move would make a cycle: it is skipped, at every site alike.
            return;
        }
        self.revive_path(parent, sites);
        let is_dir = self.is_dir(target);
        let name = self.claim_name(parent, name, target, is_dir, sites);
        self.update(target, |e| {
            e.parent = parent;
            e.name = name;
            e.alive = true;
            e.moved = Some(op);
        });
    }

    fn apply_remove(&mut self, target: EntryId, seen: &[(SiteIdx, Hlc)], listed: &[EntryId]) {
        // Only entries the remover saw in the subtree can go: an entry that the final order of
        // operations puts there but the remover saw elsewhere (a directory merged into one made
        // concurrently, a move skipped for a cycle) stays (found by the simulator: seeds 682 and
        // 1587 with all faults).
        let listed: HashSet<EntryId> = listed.iter().copied().collect();
        let target = self.canonical(target);
        if target == EntryId::ROOT || !self.is_alive(target) {
            return;
        }
        let seen: HashMap<SiteIdx, Hlc> = seen.iter().copied().collect();
        let was_seen = |op: OpId| seen.get(&op.site).is_some_and(|h| op.hlc <= *h);
        // The remover meant to delete what it saw below the target. An entry it had not seen
        // placed there — created, or moved in, by an operation it had not seen — survives with
        // everything below it, and so does a file with a version it had not seen; the path to
        // a survivor survives too. The target's own unseen move protects only the target.
        struct Visit {
            id: EntryId,
            parent: Option<usize>,
            survives: bool,
        }
        let mut visits: Vec<Visit> = Vec::new();
        let mut stack: Vec<(EntryId, Option<usize>, bool)> = vec![(target, None, false)];
        // Each entry once: the tree has no cycles, and should one ever form (the simulator's
        // sabotage makes them) the walk still ends and the tree's checker reports it.
        let mut visited: HashSet<EntryId> = HashSet::new();
        while let Some((id, parent, inherited)) = stack.pop() {
            if !visited.insert(id) {
                continue;
            }
            let e = self.entry(id);
            let placed_unseen = !was_seen(e.created()) || e.moved.is_some_and(|m| !was_seen(m));
            let written_unseen = matches!(&e.data, Data::File(v) if !was_seen(v.op));
            let protected = inherited || (placed_unseen && parent.is_some());
            let index = visits.len();
            let unlisted = !listed.contains(&id);
            visits.push(Visit {
                id,
                parent,
                survives: protected || placed_unseen || written_unseen || unlisted,
            });
            stack.extend(self.children(id).map(|(_, c)| (c, Some(index), protected)));
        }
        // Children come after their parents: walking backwards settles children first.
        for i in (0..visits.len()).rev() {
            if visits[i].survives
                && let Some(parent) = visits[i].parent
            {
                visits[parent].survives = true;
            }
        }
        for visit in visits.iter().rev().filter(|v| !v.survives) {
            self.update(visit.id, |e| e.alive = false);
        }
    }

    /// Brings `id` and its deleted ancestors back, each under its former name (or a conflict
    /// name, if that was taken meanwhile).
    fn revive_path(&mut self, id: EntryId, sites: &Sites) {
        let mut dead = Vec::new();
        let mut cur = id;
        while !self.entry(cur).alive {
            dead.push(cur);
            cur = self.entry(cur).parent;
            assert!(dead.len() <= self.entries.len(), "parent cycle above {id:?}");
        }
        for id in dead.into_iter().rev() {
            let e = self.entry(id);
            let (parent, name, is_dir) = (e.parent, e.name.clone(), e.data == Data::Dir);
            let name = self.claim_name(parent, &name, id, is_dir, sites);
            self.update(id, |e| {
                e.alive = true;
                e.name = name;
            });
        }
    }

    /// The name `incoming` gets in `parent` when it asks for `wanted`. A directory takes the name
    /// from a file or symlink (which moves to its conflict name); otherwise the entry already
    /// there keeps it and `incoming` gets its conflict name.
    fn claim_name(
        &mut self,
        parent: EntryId,
        wanted: &str,
        incoming: EntryId,
        incoming_is_dir: bool,
        sites: &Sites,
    ) -> Box<str> {
        let Some(other) = self.child(parent, wanted).filter(|o| *o != incoming) else {
            return wanted.into();
        };
        if incoming_is_dir && !self.is_dir(other) {
            let aside = self.conflict_name(parent, wanted, other, sites);
            self.update(other, |e| e.name = aside);
            wanted.into()
        } else {
            self.conflict_name(parent, wanted, incoming, sites)
        }
    }

    /// `<stem>.conflict-<site>-<id8><.ext>`, free in `parent`. If taken, longer ids are tried,
    /// then a counter.
    fn conflict_name(&self, parent: EntryId, name: &str, id: EntryId, sites: &Sites) -> Box<str> {
        let hex = id.hex(sites);
        let site = sites.name(id.op.site);
        let (stem, ext) = split_extension(name);
        let candidates = [8, 16, 32].into_iter().map(|n| format!("conflict-{site}-{}", &hex[..n]));
        let counted = (2u64..).map(|n| format!("conflict-{site}-{hex}-{n}"));
        for tag in candidates.chain(counted) {
            let room = NAME_MAX_BYTES.saturating_sub(tag.len() + 1 + ext.len());
            let stem = truncate(stem, room);
            let candidate = format!("{stem}.{tag}{ext}");
            if self.child(parent, &candidate).is_none() {
                return candidate.into();
            }
        }
        unreachable!("the counter runs until a name is free")
    }

    /// Checks the tree invariant: every live entry has a live directory as parent, is indexed
    /// under its name there, and reaches the root without a cycle; the index holds only those.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let mut indexed = 0usize;
        for (parent, dir) in &self.children {
            if !self.is_alive(*parent) || !self.is_dir(*parent) {
                return Err(format!("{parent:?} has children but is not a live directory"));
            }
            for (name, id) in dir {
                let e = self.get(*id).ok_or_else(|| format!("{id:?} indexed but unknown"))?;
                if !e.alive || e.parent != *parent || &e.name != name {
                    return Err(format!("{id:?} indexed as {name:?} under {parent:?} but is {e:?}"));
                }
                indexed += 1;
            }
        }
        for e in self.entries.iter().filter(|e| e.alive && e.id != EntryId::ROOT) {
            if self.child(e.parent, &e.name) != Some(e.id) {
                return Err(format!("{:?} is live but not indexed", e.id));
            }
            let mut cur = e.parent;
            let mut steps = 0;
            while cur != EntryId::ROOT {
                cur = self.entry(cur).parent;
                steps += 1;
                if steps > self.entries.len() {
                    return Err(format!("cycle above {:?}", e.id));
                }
            }
        }
        let live = self.entries.iter().filter(|e| e.alive && e.id != EntryId::ROOT).count();
        if live != indexed || live + 1 != self.live {
            return Err(format!("{live} live entries, {indexed} indexed, {} counted", self.live));
        }
        let mut refs: HashMap<u64, u32> = HashMap::new();
        for e in self.entries.iter().filter(|e| e.alive && e.id != EntryId::ROOT) {
            if let Data::File(version) = &e.data {
                *refs.entry(ref_key(&version.content)).or_insert(0) += 1;
            }
        }
        if refs != self.refs {
            return Err(format!("{} versions referred to, {} counted", refs.len(), self.refs.len()));
        }
        Ok(())
    }
}

/// The key a version is counted under in `Tree::refs`: the first 8 bytes of its id (a BLAKE3
/// hash), which keeps the count at a few bytes per file. Two versions whose ids share them
/// (the chance that any two of a million versions do is about 3 in 10^8) count together: one
/// may then seem referred to when it is not, which keeps it longer, never the reverse.
fn ref_key(content: &ContentId) -> u64 {
    u64::from_le_bytes(content.0[..8].try_into().expect("8 of 32 bytes"))
}

/// Splits `shot010.clip` into `shot010` and `.clip`; a leading dot is part of the stem.
fn split_extension(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(i) if i > 0 => name.split_at(i),
        _ => (name, ""),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_split_like_the_contract_says() {
        assert_eq!(split_extension("shot010.clip"), ("shot010", ".clip"));
        assert_eq!(split_extension("archive.tar.gz"), ("archive.tar", ".gz"));
        assert_eq!(split_extension(".bashrc"), (".bashrc", ""));
        assert_eq!(split_extension("README"), ("README", ""));
        assert_eq!(truncate("ééé", 3), "é");
    }
}

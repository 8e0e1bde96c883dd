//! The [`Namespace`] replica: an automerge document holding every operation, and the tree
//! materialised from it.
//!
//! The document is a grow-only set: its root map holds one immutable entry per operation, keyed
//! `<hlc>.<site>`, whose value is the operation's binary encoding. Automerge carries the set
//! between sites (changes, sync sessions, saves); the tree is a deterministic function of the set
//! (every operation applied in id order), so two replicas holding the same operations show the
//! same tree, byte for byte.
//!
//! Incoming changes pass `check_history`, `ops_of_change` and the signature check
//! (`trust::verify`) before automerge sees them: canonical encoding, each author's sequence
//! numbers without gaps or repeats, operation counters after those of the change's
//! dependencies, no author field, only fresh keys of the root map holding valid operations of
//! the change's author, and a signature by one of the author's keys. Automerge trusts these and
//! panics or misorders operations when they lie; a change that fails them is refused and the
//! replica is left as it was.
//!
//! Local operations go into an automerge transaction; `commit` signs the change the
//! transaction will make (rebuilt as automerge builds it, and checked to hash the same) and
//! commits it with the signature as its message. Everything that reads the document commits
//! first, so no change is ever made unsigned.

use std::collections::{BTreeMap, HashMap};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, AutoCommit, Automerge, Change, ChangeHash, ReadDoc, ScalarValue, ScalarValueRef, Value, ValueRef,
};

use crate::codec::{self, CreateBody, FileMeta, Op, TagChange};
use crate::error::{DecodeError, ExchangeError, OpError, Result};
use crate::ids::{EntryId, OpId, SiteId, SiteIdx, Sites, parse_op_key};
use crate::name::{check_symlink_target, check_tag_key, check_tag_value, join, split_path};
use crate::query::Query;
use crate::tree::{Data, Entry, Tree};
use crate::trust::{self, Keys, SigningKey};
use crate::wire::{Reader, push_varint};
use crate::{ContentId, EntryKind, Frontier, Hlc, TagValue};

/// Largest saved document accepted by [`Namespace::load`]: ample for tens of millions of
/// entries, and a bound on what a corrupt file can make us allocate.
pub const LOAD_MAX_BYTES: usize = 4 << 30;
/// Bytes of changes held for the clock bound ([`Namespace::set_clock_bound`]) at most.
pub const HELD_MAX_BYTES: usize = 64 << 20;
/// Largest export accepted by [`Namespace::import`].
pub const IMPORT_MAX_BYTES: usize = 1 << 30;
/// Largest sync message accepted by [`Namespace::receive_sync_message`]. A first sync of a large
/// namespace sends the whole document in one message, so this is as large as an import.
pub const SYNC_MESSAGE_MAX_BYTES: usize = IMPORT_MAX_BYTES;
/// Above this many entries the tree invariant is no longer checked after every change in debug
/// builds (the check walks the whole tree).
const DEBUG_CHECK_ENTRIES_MAX: usize = 2_000;
/// First bytes of an export made by [`Namespace::export_since`].
const EXPORT_MAGIC: &[u8; 8] = b"mrdn-ex1";

/// A new file version, as the caller describes it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct NewVersion {
    /// BLAKE3 hash of the version's manifest.
    pub content: ContentId,
    /// Size in bytes.
    pub size: u64,
    /// Unix permission bits.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// One version of a file, as [`Stat`] shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionInfo {
    /// The version's id, `<hlc>.<site>`, the same at every site.
    pub id: String,
    /// BLAKE3 hash of the version's manifest.
    pub content: ContentId,
    /// Size in bytes.
    pub size: u64,
    /// The site that wrote it.
    pub site: String,
    /// When it was written.
    pub hlc: Hlc,
}

/// What is known of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    /// The entry's stable id (32 hexadecimal digits), the same at every site.
    pub id: String,
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// Size in bytes of a file's current version; 0 otherwise.
    pub size: u64,
    /// Unix permission bits.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// A file's current version.
    pub version: Option<VersionInfo>,
    /// A symlink's target.
    pub symlink_target: Option<String>,
    /// The entry's own tags (not inherited ones), sorted by key.
    pub tags: Vec<(String, TagValue)>,
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Its name in the directory.
    pub name: String,
    /// Its stat.
    pub stat: Stat,
}

/// One entry of a subtree walk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkEntry {
    /// Its absolute path.
    pub path: String,
    /// Its stat.
    pub stat: Stat,
}

/// One effective tag of an entry and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectiveTag {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
    /// The path of the entry that defines it: the entry itself or the nearest ancestor.
    pub source: String,
}

/// One result of [`Namespace::find`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FindHit {
    /// The entry's path.
    pub path: String,
    /// Its effective tags, explaining why it matched.
    pub tags: Vec<EffectiveTag>,
}

/// What an import or a sync message brought.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Automerge changes newly applied.
    pub changes: usize,
    /// Namespace operations newly applied.
    pub ops: usize,
    /// Changes not applied (held, or held already): an operation in each is further ahead than
    /// the clock bound ([`Namespace::set_clock_bound`]).
    pub held: usize,
}

/// The state of a sync session with one peer (automerge's sync protocol). Keep one per peer and
/// persist it with [`SyncSession::encode`] so that a reconnect does not start from nothing.
#[derive(Debug, Default)]
pub struct SyncSession {
    state: sync::State,
}

impl SyncSession {
    /// A session with a peer we know nothing about.
    pub fn new() -> SyncSession {
        SyncSession::default()
    }

    /// The part of the session worth keeping across restarts.
    pub fn encode(&self) -> Vec<u8> {
        self.state.encode()
    }

    /// The heads the peer named in its latest message (`None` before its first).
    pub fn their_heads(&self) -> Option<&[ChangeHash]> {
        self.state.their_heads.as_deref()
    }

    /// A session restored from [`SyncSession::encode`].
    pub fn decode(bytes: &[u8]) -> Result<SyncSession, ExchangeError> {
        let state = sync::State::decode(bytes)
            .map_err(|e| ExchangeError::Automerge { what: "sync session state", reason: e.to_string() })?;
        Ok(SyncSession { state })
    }
}

/// One site's replica of the namespace.
pub struct Namespace {
    doc: AutoCommit,
    site: SiteId,
    me: SiteIdx,
    sites: Sites,
    tree: Tree,
    /// The largest HLC of any operation seen from each site, by site number.
    seen: Vec<Hlc>,
    /// The largest HLC issued or seen: every local operation gets a larger one.
    last_hlc: Hlc,
    /// Local operations in the open automerge transaction: their keys and encodings, to sign
    /// the change that commits them.
    uncommitted: Vec<(String, Vec<u8>)>,
    /// The heads and the largest operation counter when the open transaction began.
    uncommitted_base: (Vec<ChangeHash>, u64),
    /// This site's last change.
    own_last: Option<ChangeHash>,
    /// Operations with a larger HLC are not integrated yet: their changes wait in `held`.
    clock_bound: Hlc,
    /// Changes held for the clock bound, with the largest HLC of each.
    held: BTreeMap<ChangeHash, (Hlc, Change)>,
    /// Bytes of the changes in `held`.
    held_bytes: usize,
    /// This site's key, which signs its changes.
    key: SigningKey,
    /// The keys of the members, this site's own included: incoming changes are checked
    /// against them.
    keys: Keys,
    /// The last change (sequence number, last operation counter) of every author in the
    /// document. Automerge trusts both numbers of an incoming change and panics or misorders
    /// operations when they lie, so new changes are checked against these first.
    authors: HashMap<Vec<u8>, (u64, u64)>,
}

fn actor_of(site: &SiteId) -> ActorId {
    ActorId::from(site.as_str().as_bytes())
}

fn automerge_error(what: &'static str) -> impl FnOnce(automerge::AutomergeError) -> ExchangeError {
    move |e| ExchangeError::Automerge { what, reason: e.to_string() }
}

fn invalid_change(what: &'static str) -> impl FnOnce(String) -> ExchangeError {
    move |reason| ExchangeError::InvalidChange { what, reason }
}

impl Namespace {
    /// An empty namespace for `site`, whose changes `key` signs. It accepts changes from no one
    /// else until it is told the members' keys ([`Namespace::set_keys`]).
    pub fn new(site: SiteId, key: SigningKey) -> Namespace {
        let mut doc = AutoCommit::new();
        doc.set_actor(actor_of(&site));
        Namespace::with_doc(site, key, doc)
    }

    fn with_doc(site: SiteId, key: SigningKey, doc: AutoCommit) -> Namespace {
        let mut sites = Sites::new();
        let me = sites.intern(site.as_str());
        let mut keys = Keys::new();
        keys.allow(&site, key.public());
        Namespace {
            doc,
            site,
            me,
            sites,
            tree: Tree::new(),
            seen: Vec::new(),
            last_hlc: Hlc::ZERO,
            uncommitted: Vec::new(),
            uncommitted_base: (Vec::new(), 0),
            own_last: None,
            clock_bound: Hlc::from_raw(u64::MAX),
            held: BTreeMap::new(),
            held_bytes: 0,
            key,
            keys,
            authors: HashMap::new(),
        }
    }

    /// The keys incoming changes are checked with, from now on: each member's current and
    /// former keys. This site's own key is always among them.
    pub fn set_keys(&mut self, mut keys: Keys) {
        keys.allow(&self.site, self.key.public());
        self.keys = keys;
    }

    /// The sequence number of the last change of `site` this replica holds (0: none). What a
    /// key retired now may still sign: the changes written before.
    pub fn last_seq_of(&mut self, site: &SiteId) -> u64 {
        let actor = actor_of(site);
        self.doc.get_changes_meta(&[]).iter().filter(|c| *c.actor == actor).map(|c| c.seq).max().unwrap_or(0)
    }

    /// This site's public key: what its changes are checked with elsewhere.
    pub fn public_key(&self) -> crate::PublicKey {
        self.key.public()
    }

    /// The keys incoming changes are checked with.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// This replica's site.
    pub fn site(&self) -> &SiteId {
        &self.site
    }

    /// The largest HLC issued here or seen from a peer. Drivers feed it to their clock so that
    /// local readings stay ahead of everything observed.
    pub fn last_hlc(&self) -> Hlc {
        self.last_hlc
    }

    /// Number of live entries, the root excluded.
    pub fn len(&self) -> usize {
        self.tree.live_count() - 1
    }

    /// Whether only the root exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of operations applied.
    pub fn op_count(&self) -> usize {
        self.tree.log_len()
    }

    // ------------------------------------------------------------------------------------------
    // Applying operations

    /// Records a local operation: gives it an id, stores it in the document and applies it.
    fn record(&mut self, hlc: Hlc, op: Op) -> Result<OpId> {
        self.check_clock(1)?;
        let hlc = hlc.max(self.last_hlc.successor());
        let id = OpId { hlc, site: self.me };
        let bytes = codec::encode(&op, &self.sites);
        let key = id.key(&self.sites);
        if self.uncommitted.is_empty() {
            // What the change this operation opens will follow (before the transaction opens:
            // reading the heads would close it).
            let deps = self.doc.get_heads();
            let mut max_op = 0;
            for head in &deps {
                if let Some(meta) = self.doc.get_change_meta_by_hash(head) {
                    max_op = max_op.max(meta.max_op);
                }
            }
            self.uncommitted_base = (deps, max_op);
        }
        self.doc
            .put(automerge::ROOT, key.as_str(), ScalarValue::Bytes(bytes.clone()))
            .expect("a put on the root map of an open document cannot fail");
        self.uncommitted.push((key, bytes));
        self.integrate(vec![(id, op)]);
        Ok(id)
    }

    /// Refuses a local change of `ops` operations that would find no HLC after every one seen
    /// (an id is never given twice: a second operation under one id would replace the first).
    fn check_clock(&self, ops: u64) -> Result<()> {
        match self.last_hlc.raw().checked_add(ops) {
            Some(_) => Ok(()),
            None => Err(OpError::ClockExhausted { last: self.last_hlc }),
        }
    }

    /// Commits the local operations recorded since the last commit as one automerge change.
    /// Exchanges and saves commit first, so calling this is only needed to bound the size of a
    /// change (for example after each request a daemon serves).
    pub fn commit(&mut self) {
        use automerge::legacy::{Key, ObjectId, Op as LegacyOp, OpType, SortedVec};
        if self.uncommitted.is_empty() {
            return;
        }
        let actor = actor_of(&self.site);
        let (mut deps, max_op) = std::mem::take(&mut self.uncommitted_base);
        // As automerge does: a change depends on its author's previous one, head or not.
        if let Some(last) = self.own_last.filter(|last| !deps.contains(last)) {
            deps.push(last);
        }
        let seq = self.authors.get(actor.to_bytes()).map_or(0, |known| known.0) + 1;
        let operations: Vec<LegacyOp> = std::mem::take(&mut self.uncommitted)
            .into_iter()
            .map(|(key, bytes)| LegacyOp {
                action: OpType::Put(ScalarValue::Bytes(bytes)),
                obj: ObjectId::Root,
                key: Key::Map(key.into()),
                pred: SortedVec::new(),
                insert: false,
            })
            .collect();
        let count = operations.len() as u64;
        let time = (self.last_hlc.physical_ms() / 1000) as i64;
        // The change the open transaction will commit, as automerge will encode it: signed,
        // and the signature goes in as its message.
        let (message, signed_hash) = trust::sign(
            &self.key,
            automerge::ExpandedChange {
                operations,
                actor_id: actor.clone(),
                hash: None,
                seq,
                start_op: std::num::NonZeroU64::new(max_op + 1).expect("one or more"),
                time,
                message: None,
                deps,
                extra_bytes: Vec::new(),
                author: None,
            },
        );
        let hash = self.doc.commit_with(CommitOptions::default().with_message(message).with_time(time));
        let hash = hash.expect("a transaction with operations commits");
        assert_eq!(hash, signed_hash, "{}: a local change differs from the one signed", self.site);
        self.note_author(actor.to_bytes(), seq, max_op + count, hash);
    }

    /// Applies operations from anywhere, in id order, undoing and redoing later ones as needed.
    fn integrate(&mut self, mut ops: Vec<(OpId, Op)>) {
        for (id, _) in &ops {
            let i = id.site.0 as usize;
            if self.seen.len() <= i {
                self.seen.resize(i + 1, Hlc::ZERO);
            }
            self.seen[i] = self.seen[i].max(id.hlc);
            self.last_hlc = self.last_hlc.max(id.hlc);
        }
        let sites = &self.sites;
        ops.sort_by(|a, b| a.0.cmp(b.0, sites));
        ops.dedup_by(|a, b| a.0 == b.0);
        ops.retain(|(id, _)| self.tree.log_position(*id, sites).is_err());
        let Some((first, _)) = ops.first() else { return };
        let position = self.tree.log_position(*first, &self.sites).unwrap_err();
        let mut redo = Vec::with_capacity(self.tree.log_len() - position);
        while self.tree.log_len() > position {
            redo.push(self.tree.undo_last().expect("the log is longer than the position"));
        }
        redo.reverse();
        let redo: Vec<(OpId, Op)> = redo.into_iter().map(|id| (id, self.fetch(id))).collect();
        let mut later = redo.into_iter().peekable();
        let mut new = ops.into_iter().peekable();
        loop {
            let take_new = match (later.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(a), Some(b)) => b.0.cmp(a.0, &self.sites).is_lt(),
            };
            let (id, op) = if take_new { new.next() } else { later.next() }.expect("peeked");
            self.tree.apply(id, &op, &self.sites);
        }
        if cfg!(debug_assertions)
            && self.tree.log_len() <= DEBUG_CHECK_ENTRIES_MAX
            && let Err(broken) = self.tree.check_invariants()
        {
            panic!("tree invariant broken at {}: {broken}", self.site);
        }
    }

    /// Reads back an applied operation from the document, to redo it.
    fn fetch(&mut self, id: OpId) -> Op {
        let key = id.key(&self.sites);
        let value = self.doc.get(automerge::ROOT, key.as_str()).expect("reading the root map");
        match value {
            Some((Value::Scalar(scalar), _)) => match scalar.as_ref() {
                ScalarValue::Bytes(bytes) => {
                    codec::decode(bytes, &mut self.sites).expect("applied operations were valid")
                }
                other => panic!("operation {key} holds {other:?}"),
            },
            other => panic!("operation {key} is missing from the document: {other:?}"),
        }
    }

    /// Applies the changes added to the document since `before`.
    fn integrate_since(&mut self, before: &[ChangeHash]) -> ImportReport {
        let changes = self.doc.get_changes(before);
        let mut ops = Vec::new();
        for change in &changes {
            self.note_author(change.actor_id().to_bytes(), change.seq(), change.max_op(), change.hash());
            // Changes were validated before they were handed to automerge; one that was queued
            // for missing dependencies and is somehow invalid is skipped at every site alike.
            if let Ok(change_ops) = ops_of_change(change, &change.decode(), &mut self.sites) {
                ops.extend(change_ops);
            }
        }
        let report = ImportReport { changes: changes.len(), ops: ops.len(), held: 0 };
        self.integrate(ops);
        report
    }

    fn note_author(&mut self, actor: &[u8], seq: u64, max_op: u64, hash: ChangeHash) {
        let known = self.authors.entry(actor.to_vec()).or_insert((0, 0));
        if seq > known.0 {
            *known = (seq, max_op);
            if actor == self.site.as_str().as_bytes() {
                self.own_last = Some(hash);
            }
        }
    }

    /// Checks what automerge trusts in new changes: each author's sequence numbers follow on
    /// without gaps, every change's operation counters start after those of everything it
    /// depends on and of its author's previous change, and no change names an author. Changes
    /// whose dependencies are missing (automerge queues them) are checked as far as can be.
    fn check_history(&mut self, changes: &[Change]) -> std::result::Result<(), String> {
        let mut known: HashMap<Vec<u8>, (u64, u64)> = HashMap::new();
        let mut batch: HashMap<ChangeHash, u64> = HashMap::new();
        let mut pending: Vec<&Change> = Vec::new();
        for change in changes {
            if change.author().is_some() {
                return Err(format!("change {} names an author", change.hash()));
            }
            if change.seq() == 0 || change.start_op().get() > change.max_op().saturating_add(1) {
                return Err(format!("change {} has inconsistent counters", change.hash()));
            }
            if self.doc.get_change_meta_by_hash(&change.hash()).is_none() {
                pending.push(change);
            }
        }
        loop {
            let mut progress = false;
            let mut waiting = Vec::new();
            for change in pending {
                let mut deps_max = Some(0u64);
                for dep in change.deps() {
                    let max = batch
                        .get(dep)
                        .copied()
                        .or_else(|| self.doc.get_change_meta_by_hash(dep).map(|m| m.max_op));
                    deps_max = deps_max.zip(max).map(|(a, b)| a.max(b));
                }
                let actor = change.actor_id().to_bytes().to_vec();
                let (seq, max_op) =
                    known.get(&actor).or_else(|| self.authors.get(&actor)).copied().unwrap_or((0, 0));
                let start = change.start_op().get();
                if change.seq() <= seq || (seq > 0 && start <= max_op) {
                    return Err(format!(
                        "change {} repeats sequence numbers or counters of its author",
                        change.hash()
                    ));
                }
                match deps_max {
                    Some(deps_max) => {
                        if change.seq() != seq + 1 {
                            return Err(format!(
                                "change {} skips sequence numbers of its author",
                                change.hash()
                            ));
                        }
                        if start <= deps_max {
                            return Err(format!(
                                "change {} has counters older than its dependencies",
                                change.hash()
                            ));
                        }
                        known.insert(actor, (change.seq(), change.max_op()));
                        batch.insert(change.hash(), change.max_op());
                        progress = true;
                    }
                    None => waiting.push(change),
                }
            }
            if waiting.is_empty() || !progress {
                return Ok(());
            }
            pending = waiting;
        }
    }

    // ------------------------------------------------------------------------------------------
    // Local operations

    fn resolve_parent<'p>(&self, path: &'p str) -> Result<(EntryId, &'p str)> {
        let names = split_path(path)?;
        let Some((last, dirs)) = names.split_last() else {
            return Err(OpError::Root { action: "replaced" });
        };
        let mut cur = EntryId::ROOT;
        let mut walked = String::from("");
        for name in dirs {
            walked = join(if walked.is_empty() { "/" } else { &walked }, name);
            cur = self.tree.child(cur, name).ok_or_else(|| OpError::NotFound { path: walked.clone() })?;
            if self.tree.entry(cur).data != Data::Dir {
                return Err(OpError::NotADirectory { path: walked });
            }
        }
        Ok((cur, last))
    }

    /// The entry at `path`.
    fn resolve_id(&self, path: &str) -> Result<EntryId> {
        let names = split_path(path)?;
        let mut cur = EntryId::ROOT;
        let mut walked = String::new();
        for name in names {
            if self.tree.entry(cur).data != Data::Dir {
                return Err(OpError::NotADirectory {
                    path: if walked.is_empty() { "/".into() } else { walked },
                });
            }
            walked.push('/');
            walked.push_str(name);
            cur = self.tree.child(cur, name).ok_or_else(|| OpError::NotFound { path: walked.clone() })?;
        }
        Ok(cur)
    }

    /// Creates the directory at `path`; with `parents`, also its missing ancestors, and an
    /// existing directory is not an error.
    pub fn mkdir(&mut self, path: &str, parents: bool, mode: u32, mtime_ns: i64, hlc: Hlc) -> Result<()> {
        let names = split_path(path)?;
        if names.is_empty() {
            return if parents { Ok(()) } else { Err(OpError::AlreadyExists { path: "/".into() }) };
        }
        // All or nothing: the clock has room for every directory this may make.
        self.check_clock(names.len() as u64)?;
        let mut cur = EntryId::ROOT;
        let mut walked = String::new();
        for (i, name) in names.iter().enumerate() {
            walked.push('/');
            walked.push_str(name);
            let last = i + 1 == names.len();
            match self.tree.child(cur, name) {
                Some(child) if self.tree.entry(child).data == Data::Dir => {
                    if last && !parents {
                        return Err(OpError::AlreadyExists { path: walked });
                    }
                    cur = child;
                }
                Some(_) if last => return Err(OpError::AlreadyExists { path: walked }),
                Some(_) => return Err(OpError::NotADirectory { path: walked }),
                None if !last && !parents => return Err(OpError::NotFound { path: walked }),
                None => {
                    let op = Op::Create {
                        parent: cur,
                        name: (*name).into(),
                        body: CreateBody::Dir { mode, mtime_ns },
                    };
                    cur = EntryId::created_by(self.record(hlc, op)?);
                }
            }
        }
        Ok(())
    }

    /// Writes a new version of the file at `path`, creating the file if it does not exist (its
    /// directory must).
    pub fn write_file(&mut self, path: &str, version: NewVersion, hlc: Hlc) -> Result<()> {
        let (parent, name) = self.resolve_parent(path)?;
        let meta = FileMeta {
            content: version.content,
            size: version.size,
            mode: version.mode,
            mtime_ns: version.mtime_ns,
        };
        let op = match self.tree.child(parent, name) {
            None => Op::Create { parent, name: name.into(), body: CreateBody::File(meta) },
            Some(id) => match &self.tree.entry(id).data {
                Data::File(current) => Op::Write { target: id, base: current.op, meta },
                Data::Dir => return Err(OpError::IsADirectory { path: path.to_owned() }),
                Data::Symlink(_) => return Err(OpError::IsASymlink { path: path.to_owned() }),
            },
        };
        self.record(hlc, op)?;
        Ok(())
    }

    /// Creates a symlink at `path` pointing at `target` (which is stored, never resolved).
    pub fn symlink(&mut self, path: &str, target: &str, mtime_ns: i64, hlc: Hlc) -> Result<()> {
        check_symlink_target(target).map_err(|reason| OpError::InvalidSymlinkTarget { reason })?;
        let (parent, name) = self.resolve_parent(path)?;
        if self.tree.child(parent, name).is_some() {
            return Err(OpError::AlreadyExists { path: path.to_owned() });
        }
        let body = CreateBody::Symlink { target: target.into(), mtime_ns };
        self.record(hlc, Op::Create { parent, name: name.into(), body })?;
        Ok(())
    }

    /// Moves or renames the entry at `from` to `to`, as one operation. `to` must not exist; its
    /// directory must.
    pub fn rename(&mut self, from: &str, to: &str, hlc: Hlc) -> Result<()> {
        let target = self.resolve_id(from)?;
        if target == EntryId::ROOT {
            return Err(OpError::Root { action: "moved" });
        }
        let (parent, name) = self.resolve_parent(to)?;
        match self.tree.child(parent, name) {
            Some(existing) if existing == target => return Ok(()),
            Some(_) => return Err(OpError::AlreadyExists { path: to.to_owned() }),
            None => {}
        }
        let mut cur = parent;
        while cur != EntryId::ROOT {
            if cur == target {
                return Err(OpError::MoveIntoSelf { from: from.to_owned(), to: to.to_owned() });
            }
            cur = self.tree.entry(cur).parent;
        }
        self.record(hlc, Op::Move { target, parent, name: name.into() })?;
        Ok(())
    }

    /// Moves `from` to `to` like [`Namespace::rename`], replacing what is at `to` as POSIX's
    /// `rename` does: a file or symlink by anything but a directory, a directory only by a
    /// directory, and only an empty one. The removal (stamped `remove_hlc`, before `hlc`) and
    /// the move are one change: every site applies both or neither. Checked in full before
    /// either is recorded.
    pub fn rename_replacing(&mut self, from: &str, to: &str, remove_hlc: Hlc, hlc: Hlc) -> Result<()> {
        let target = self.resolve_id(from)?;
        if target == EntryId::ROOT {
            return Err(OpError::Root { action: "moved" });
        }
        let (parent, name) = self.resolve_parent(to)?;
        let Some(existing) = self.tree.child(parent, name).filter(|e| *e != target) else {
            return self.rename(from, to, hlc);
        };
        // Two operations: both stamps must be there before the first is recorded.
        self.check_clock(2)?;
        let mut cur = parent;
        while cur != EntryId::ROOT {
            if cur == target {
                return Err(OpError::MoveIntoSelf { from: from.to_owned(), to: to.to_owned() });
            }
            cur = self.tree.entry(cur).parent;
        }
        let is_dir = |id: EntryId| matches!(self.tree.entry(id).data, Data::Dir);
        match (is_dir(target), is_dir(existing)) {
            (true, false) => return Err(OpError::NotADirectory { path: to.to_owned() }),
            (false, true) => return Err(OpError::IsADirectory { path: to.to_owned() }),
            (true, true) if self.tree.has_children(existing) => {
                return Err(OpError::NotEmpty { path: to.to_owned() });
            }
            _ => {}
        }
        self.remove(to, false, remove_hlc)?;
        self.rename(from, to, hlc)
    }

    /// Removes the entry at `path`; a directory with entries only if `recursive`.
    pub fn remove(&mut self, path: &str, recursive: bool, hlc: Hlc) -> Result<()> {
        let target = self.resolve_id(path)?;
        if target == EntryId::ROOT {
            return Err(OpError::Root { action: "removed" });
        }
        if !recursive && self.tree.has_children(target) {
            return Err(OpError::NotEmpty { path: path.to_owned() });
        }
        let seen = self
            .seen
            .iter()
            .enumerate()
            .filter(|(_, h)| **h > Hlc::ZERO)
            .map(|(i, h)| (SiteIdx(i as u32), *h))
            .collect();
        let entries = self.tree.subtree(target);
        self.record(hlc, Op::Remove { target, seen, entries })?;
        Ok(())
    }

    fn tag(&mut self, path: &str, key: &str, change: TagChange, hlc: Hlc) -> Result<()> {
        check_tag_key(key).map_err(|reason| OpError::InvalidTag { reason })?;
        if let TagChange::Define(TagValue::Set(value)) = &change {
            check_tag_value(value).map_err(|reason| OpError::InvalidTag { reason })?;
        }
        let target = self.resolve_id(path)?;
        self.record(hlc, Op::SetTag { target, key: key.into(), change })?;
        Ok(())
    }

    /// Sets tag `key` to `value` on the entry at `path`; everything below inherits it.
    pub fn set_tag(&mut self, path: &str, key: &str, value: &str, hlc: Hlc) -> Result<()> {
        self.tag(path, key, TagChange::Define(TagValue::Set(value.into())), hlc)
    }

    /// Explicitly unsets tag `key` on the entry at `path`: the entry and everything below it no
    /// longer inherit it.
    pub fn unset_tag(&mut self, path: &str, key: &str, hlc: Hlc) -> Result<()> {
        self.tag(path, key, TagChange::Define(TagValue::Unset), hlc)
    }

    /// Forgets the entry's own definition of `key` (set or unset): it inherits the tag again.
    pub fn clear_tag(&mut self, path: &str, key: &str, hlc: Hlc) -> Result<()> {
        self.tag(path, key, TagChange::Clear, hlc)
    }

    /// Sets the mode and/or modification time of the entry at `path`.
    pub fn set_attr(&mut self, path: &str, mode: Option<u32>, mtime_ns: Option<i64>, hlc: Hlc) -> Result<()> {
        let target = self.resolve_id(path)?;
        if target == EntryId::ROOT {
            return Err(OpError::Root { action: "changed" });
        }
        if mode.is_some() || mtime_ns.is_some() {
            self.record(hlc, Op::SetAttr { target, mode, mtime_ns })?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------------------
    // Reads

    /// Whether something lives at `path`.
    pub fn exists(&self, path: &str) -> bool {
        self.resolve_id(path).is_ok()
    }

    /// The stable id of the entry at `path`.
    pub fn resolve(&self, path: &str) -> Result<String> {
        Ok(self.tree.entry(self.resolve_id(path)?).id.hex(&self.sites))
    }

    fn stat_of(&self, e: &Entry) -> Stat {
        let version = match &e.data {
            Data::File(v) => Some(VersionInfo {
                id: v.op.key(&self.sites),
                content: v.content,
                size: v.size,
                site: self.sites.name(v.op.site).to_owned(),
                hlc: v.op.hlc,
            }),
            _ => None,
        };
        Stat {
            id: e.id.hex(&self.sites),
            kind: e.kind(),
            size: version.as_ref().map_or(0, |v| v.size),
            mode: e.mode,
            mtime_ns: e.mtime_ns,
            version,
            symlink_target: match &e.data {
                Data::Symlink(t) => Some(t.to_string()),
                _ => None,
            },
            tags: e.tags.iter().flat_map(|t| t.iter()).map(|(k, v)| (k.to_string(), v.clone())).collect(),
        }
    }

    /// What is known of the entry at `path`.
    pub fn stat(&self, path: &str) -> Result<Stat> {
        Ok(self.stat_of(self.tree.entry(self.resolve_id(path)?)))
    }

    /// The entries of the directory at `path`, sorted by name.
    pub fn list(&self, path: &str) -> Result<Vec<DirEntry>> {
        let dir = self.resolve_id(path)?;
        if self.tree.entry(dir).data != Data::Dir {
            return Err(OpError::NotADirectory { path: path.to_owned() });
        }
        Ok(self
            .tree
            .children(dir)
            .map(|(name, id)| DirEntry { name: name.to_owned(), stat: self.stat_of(self.tree.entry(id)) })
            .collect())
    }

    /// Up to `limit` entries that follow the entry at `path` in its directory, in name order:
    /// what a reader going through the directory reads next. Costs `log n + limit`, however
    /// large the directory.
    pub fn next_siblings(&self, path: &str, limit: usize) -> Result<Vec<DirEntry>> {
        let id = self.resolve_id(path)?;
        if id == EntryId::ROOT {
            return Ok(Vec::new());
        }
        let entry = self.tree.entry(id);
        Ok(self
            .tree
            .children_after(entry.parent, &entry.name)
            .take(limit)
            .map(|(name, id)| DirEntry { name: name.to_owned(), stat: self.stat_of(self.tree.entry(id)) })
            .collect())
    }

    /// The names in the directory at `path`, sorted, without stats.
    pub fn list_names(&self, path: &str) -> Result<Vec<String>> {
        let dir = self.resolve_id(path)?;
        if self.tree.entry(dir).data != Data::Dir {
            return Err(OpError::NotADirectory { path: path.to_owned() });
        }
        Ok(self.tree.children(dir).map(|(name, _)| name.to_owned()).collect())
    }

    /// The subtree at `path`, itself first, in depth-first order with names sorted.
    pub fn walk(&self, path: &str) -> Result<Vec<WalkEntry>> {
        let start = self.resolve_id(path)?;
        let mut out = Vec::new();
        let start_path = self.path_of(start);
        let mut stack = vec![(start, start_path)];
        while let Some((id, path)) = stack.pop() {
            let e = self.tree.entry(id);
            out.push(WalkEntry { path: path.clone(), stat: self.stat_of(e) });
            let children: Vec<_> = self.tree.children(id).collect();
            for (name, child) in children.into_iter().rev() {
                stack.push((child, join(&path, name)));
            }
        }
        Ok(out)
    }

    fn path_of(&self, mut id: EntryId) -> String {
        let mut names = Vec::new();
        while id != EntryId::ROOT {
            let e = self.tree.entry(id);
            names.push(&*e.name);
            id = e.parent;
        }
        if names.is_empty() {
            return "/".into();
        }
        names.iter().rev().fold(String::new(), |mut p, n| {
            p.push('/');
            p.push_str(n);
            p
        })
    }

    /// The effective tags of the entry at `path`: its own and its ancestors', the nearest
    /// definition of each key winning and an explicit unset hiding the key. Sorted by key.
    pub fn effective_tags(&self, path: &str) -> Result<Vec<EffectiveTag>> {
        let mut id = self.resolve_id(path)?;
        let mut decided: BTreeMap<&str, Option<EffectiveTag>> = BTreeMap::new();
        loop {
            let e = self.tree.entry(id);
            for (key, value) in e.tags.iter().flat_map(|t| t.iter()) {
                decided.entry(key).or_insert_with(|| match value {
                    TagValue::Set(v) => Some(EffectiveTag {
                        key: key.to_string(),
                        value: v.to_string(),
                        source: self.path_of(id),
                    }),
                    TagValue::Unset => None,
                });
            }
            if id == EntryId::ROOT {
                break;
            }
            id = e.parent;
        }
        Ok(decided.into_values().flatten().collect())
    }

    /// The live entries whose effective tags satisfy every predicate of `query` and whose path
    /// matches its glob, in depth-first order with names sorted.
    pub fn find(&self, query: &Query) -> Vec<FindHit> {
        // Effective tags are carried down the walk: (value or unset, defining entry) per key.
        type Inherited = BTreeMap<Box<str>, (TagValue, EntryId)>;
        let mut hits = Vec::new();
        let mut stack: Vec<(EntryId, String, std::rc::Rc<Inherited>)> =
            vec![(EntryId::ROOT, "/".into(), std::rc::Rc::new(Inherited::new()))];
        while let Some((id, path, inherited)) = stack.pop() {
            let e = self.tree.entry(id);
            let effective = match &e.tags {
                None => inherited,
                Some(own) => {
                    let mut mine = (*inherited).clone();
                    for (k, v) in own.iter() {
                        mine.insert(k.clone(), (v.clone(), id));
                    }
                    std::rc::Rc::new(mine)
                }
            };
            let value = |key: &str| match effective.get(key) {
                Some((TagValue::Set(v), _)) => Some(&**v),
                _ => None,
            };
            let tags_hold = query.tags.iter().all(|p| p.holds(value(p.key())));
            let path_holds = query.path.as_ref().is_none_or(|g| g.matches(&path));
            if tags_hold && path_holds && id != EntryId::ROOT {
                let tags = effective
                    .iter()
                    .filter_map(|(k, (v, src))| match v {
                        TagValue::Set(v) => Some(EffectiveTag {
                            key: k.to_string(),
                            value: v.to_string(),
                            source: self.path_of(*src),
                        }),
                        TagValue::Unset => None,
                    })
                    .collect();
                hits.push(FindHit { path: path.clone(), tags });
            }
            let children: Vec<_> = self.tree.children(id).collect();
            for (name, child) in children.into_iter().rev() {
                stack.push((child, join(&path, name), effective.clone()));
            }
        }
        hits
    }

    /// Checks the tree invariant (each live entry reachable by exactly one path, no cycle, names
    /// unique in a directory). Tests and the simulator call it; debug builds also check it after
    /// every change of small namespaces.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.tree.check_invariants()
    }

    // ------------------------------------------------------------------------------------------
    // Exchange

    /// The last change of each site integrated here (this site's own committed ones included):
    /// exactly the changes this replica holds, since a change is integrated only after
    /// everything it depends on. Changes held for the clock bound are not included.
    pub fn frontier(&mut self) -> Frontier {
        self.commit();
        self.authors
            .iter()
            .filter_map(|(actor, (seq, _))| {
                let site = SiteId::new(std::str::from_utf8(actor).ok()?).ok()?;
                Some((site, *seq))
            })
            .collect()
    }

    /// Whether a live entry shows version `content` (a file's current version or a conflict
    /// copy's).
    pub fn refers_to(&self, content: &ContentId) -> bool {
        self.tree.refers_to(content)
    }

    /// The versions that gained or lost a live entry showing them since the last call (some
    /// may be back where they were), from the first call on: what a holder of versions looks
    /// at again after a change. (Until someone asks, nothing is noted.)
    pub fn take_touched_versions(&mut self) -> std::collections::HashSet<ContentId> {
        self.tree.track_touched();
        self.tree.take_touched()
    }

    /// The ids of the existing entries changed (written, moved, removed, re-tagged, their mode
    /// or time set) since the last call, from the first call on, each once: what a cache of
    /// entries (the mount's) forgets. New entries are not named: no cache holds them yet.
    pub fn take_changed_entries(&mut self) -> Vec<String> {
        self.tree.track_changed();
        let mut changed: Vec<String> =
            self.tree.take_changed().into_iter().map(|id| id.hex(&self.sites)).collect();
        changed.sort_unstable();
        changed.dedup();
        changed
    }

    /// The heads of the document: the changes nothing else here depends on.
    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.commit();
        self.doc.get_heads()
    }

    /// How many of this replica's changes the peer of `session` has not yet confirmed holding
    /// (as of the last sync round with it).
    pub fn unconfirmed_changes(&mut self, session: &SyncSession) -> usize {
        self.commit();
        self.doc.get_changes(&session.state.shared_heads).len()
    }

    /// The changes a peer whose heads are `their_heads` lacks, framed for [`Namespace::import`].
    /// With no heads, everything.
    pub fn export_since(&mut self, their_heads: &[ChangeHash]) -> Vec<u8> {
        self.commit();
        let changes = self.doc.get_changes(their_heads);
        let mut out = EXPORT_MAGIC.to_vec();
        push_varint(&mut out, changes.len() as u64);
        for change in changes {
            let raw = change.raw_bytes();
            push_varint(&mut out, raw.len() as u64);
            out.extend_from_slice(raw);
        }
        out
    }

    /// Imports an export from a peer. Every change is checked before any is applied: on error
    /// the namespace is unchanged.
    pub fn import(&mut self, bytes: &[u8]) -> Result<ImportReport, ExchangeError> {
        const WHAT: &str = "import";
        // The open transaction is committed (signed) first: what follows reads the document.
        self.commit();
        let mut checked = Vec::new();
        for change in parse_export(bytes, WHAT)? {
            let newest = self.check_change(&change, WHAT)?;
            checked.push((change, newest));
        }
        let (changes, later) = self.split_by_clock(checked);
        self.check_history(&changes).map_err(invalid_change(WHAT))?;
        let before = self.doc.get_heads();
        self.doc.apply_changes(changes).map_err(automerge_error(WHAT))?;
        let mut report = self.integrate_since(&before);
        report.held = self.hold(later);
        Ok(report)
    }

    /// Checks a change from outside ([`checked_ops`]) unless this replica holds it already (it
    /// was checked when it came, or made here): the largest HLC of its operations, if new.
    fn check_change(&mut self, change: &Change, what: &'static str) -> Result<Option<Hlc>, ExchangeError> {
        if self.doc.get_change_meta_by_hash(&change.hash()).is_some() {
            return Ok(None);
        }
        let (sites, keys) = (&mut self.sites, &self.keys);
        let ops = guarded(what, || checked_ops(change, sites, keys, what))?;
        Ok(ops.iter().map(|(id, _)| id.hlc).max())
    }

    /// Splits checked changes into those to apply now and those whose newest operation is past
    /// the clock bound.
    fn split_by_clock(&self, checked: Vec<(Change, Option<Hlc>)>) -> (Vec<Change>, Vec<(Hlc, Change)>) {
        let mut now = Vec::with_capacity(checked.len());
        let mut later = Vec::new();
        for (change, newest) in checked {
            match newest {
                Some(newest) if newest > self.clock_bound => later.push((newest, change)),
                _ => now.push(change),
            }
        }
        (now, later)
    }

    /// Keeps changes past the clock bound until it reaches them, up to [`HELD_MAX_BYTES`] (one
    /// that does not fit is dropped: its sender offers it again). How many were past the bound
    /// (held now, or before).
    fn hold(&mut self, later: Vec<(Hlc, Change)>) -> usize {
        let count = later.len();
        for (newest, change) in later {
            let len = change.raw_bytes().len();
            if self.held.contains_key(&change.hash()) || self.held_bytes + len > HELD_MAX_BYTES {
                continue;
            }
            self.held_bytes += len;
            self.held.insert(change.hash(), (newest, change));
        }
        count
    }

    /// Operations with an HLC after `bound` are held, not integrated (the contract's clock
    /// bound: the receiver's clock plus `max_clock_ahead`); the changes held so far that it now
    /// reaches are applied. A driver moves it forward with its clock.
    pub fn set_clock_bound(&mut self, bound: Hlc) -> ImportReport {
        self.clock_bound = bound;
        let due: Vec<ChangeHash> =
            self.held.iter().filter(|(_, (newest, _))| *newest <= bound).map(|(hash, _)| *hash).collect();
        if due.is_empty() {
            return ImportReport::default();
        }
        self.commit();
        let mut changes = Vec::with_capacity(due.len());
        for hash in due {
            if let Some((_, change)) = self.held.remove(&hash) {
                self.held_bytes -= change.raw_bytes().len();
                changes.push(change);
            }
        }
        // What no longer fits this replica's history is dropped; its sender offers it again.
        if self.check_history(&changes).is_err() {
            return ImportReport::default();
        }
        let before = self.doc.get_heads();
        if self.doc.apply_changes(changes).is_err() {
            return ImportReport::default();
        }
        self.integrate_since(&before)
    }

    /// Whether changes are held for the clock bound.
    pub fn holds_changes(&self) -> bool {
        !self.held.is_empty()
    }

    /// Changes held for the clock bound, by the site that wrote them.
    pub fn held_changes(&self) -> BTreeMap<String, usize> {
        let mut by_site = BTreeMap::new();
        for (_, change) in self.held.values() {
            let author = String::from_utf8_lossy(change.actor_id().to_bytes()).into_owned();
            *by_site.entry(author).or_insert(0) += 1;
        }
        by_site
    }

    /// Checks an export without a replica: framing, every change's operations, and every
    /// change's signature against `keys`. What a site can tell of a push before it relays it
    /// (the checks that need the replica's history come at import).
    pub fn check_export(bytes: &[u8], keys: &Keys) -> Result<(), ExchangeError> {
        const WHAT: &str = "push";
        let mut sites = Sites::new();
        for change in parse_export(bytes, WHAT)? {
            guarded(WHAT, || checked_ops(&change, &mut sites, keys, WHAT))?;
        }
        Ok(())
    }

    /// The next message of the sync session with one peer, or `None` when there is nothing to
    /// say. Automerge's sync protocol: sends only what the peer lacks, and ends when both sides
    /// hold the same changes.
    pub fn generate_sync_message(&mut self, session: &mut SyncSession) -> Option<Vec<u8>> {
        self.commit();
        self.doc.sync().generate_sync_message(&mut session.state).map(sync::Message::encode)
    }

    /// Takes a sync message from the peer of `session`. The changes it carries are checked
    /// before any is applied: on error the namespace is unchanged.
    pub fn receive_sync_message(
        &mut self,
        session: &mut SyncSession,
        bytes: &[u8],
    ) -> Result<ImportReport, ExchangeError> {
        const WHAT: &str = "sync message";
        if bytes.len() > SYNC_MESSAGE_MAX_BYTES {
            return Err(ExchangeError::TooLarge {
                what: WHAT,
                len: bytes.len(),
                max: SYNC_MESSAGE_MAX_BYTES,
            });
        }
        let message = guarded(WHAT, || {
            sync::Message::decode(bytes)
                .map_err(|e| ExchangeError::Automerge { what: WHAT, reason: e.to_string() })
        })?;
        // The open transaction is committed (signed) first: what follows reads the document.
        self.commit();
        let mut message = message;
        let mut checked = Vec::new();
        for chunk in message.changes.iter() {
            checked.extend(self.check_chunk(chunk)?);
        }
        let (changes, later) = self.split_by_clock(checked);
        self.check_history(&changes).map_err(invalid_change(WHAT))?;
        if !later.is_empty() {
            // Automerge takes what the message carries: it carries only what is applied now.
            let kept: Vec<Vec<u8>> = changes.iter().map(|c| c.raw_bytes().to_vec()).collect();
            message.changes = sync::ChunkList::from(kept);
        }
        let before = self.doc.get_heads();
        self.doc.sync().receive_sync_message(&mut session.state, message).map_err(automerge_error(WHAT))?;
        let mut report = self.integrate_since(&before);
        report.held = self.hold(later);
        Ok(report)
    }

    /// Checks one element of a sync message's change list: automerge storage chunks (changes,
    /// bundles of changes, or in a first sync a whole document), concatenated.
    fn check_chunk(&mut self, bytes: &[u8]) -> Result<Vec<(Change, Option<Hlc>)>, ExchangeError> {
        let mut all = Vec::new();
        const WHAT: &str = "sync message";
        for (kind, chunk) in split_chunks(bytes).map_err(invalid_change(WHAT))? {
            let automerge =
                |e: &dyn std::fmt::Display| ExchangeError::Automerge { what: WHAT, reason: e.to_string() };
            let changes = guarded(WHAT, || match kind {
                CHUNK_CHANGE | CHUNK_COMPRESSED_CHANGE => {
                    Ok(vec![Change::from_bytes(chunk.to_vec()).map_err(|e| automerge(&e))?])
                }
                CHUNK_BUNDLE => automerge::Bundle::try_from(chunk)
                    .map_err(|e| automerge(&e))?
                    .to_changes()
                    .map_err(|e| automerge(&e)),
                _ => {
                    debug_assert_eq!(kind, CHUNK_DOCUMENT, "split_chunks checks the type");
                    Ok(Automerge::load(chunk).map_err(|e| automerge(&e))?.get_changes(&[]))
                }
            })?;
            for change in changes {
                let newest = self.check_change(&change, WHAT)?;
                all.push((change, newest));
            }
        }
        Ok(all)
    }

    /// The whole namespace, compacted.
    pub fn save(&mut self) -> Vec<u8> {
        self.commit();
        self.doc.save()
    }

    /// What changed since the last save (whole or incremental). Appending it to the bytes of
    /// earlier saves gives bytes that [`Namespace::load`] accepts.
    pub fn save_incremental(&mut self) -> Vec<u8> {
        self.commit();
        self.doc.save_incremental()
    }

    /// Loads a namespace saved by [`Namespace::save`] (followed by any number of
    /// [`Namespace::save_incremental`] outputs) for `site`. Bad bytes give an error.
    pub fn load(site: SiteId, key: SigningKey, bytes: &[u8]) -> Result<Namespace, ExchangeError> {
        const WHAT: &str = "saved namespace";
        if bytes.len() > LOAD_MAX_BYTES {
            return Err(ExchangeError::TooLarge { what: WHAT, len: bytes.len(), max: LOAD_MAX_BYTES });
        }
        let mut doc = guarded(WHAT, || AutoCommit::load(bytes).map_err(automerge_error(WHAT)))?;
        doc.set_actor(actor_of(&site));
        let mut ns = Namespace::with_doc(site, key, doc);
        let authors: Vec<(Vec<u8>, u64, u64, ChangeHash)> = ns
            .doc
            .get_changes_meta(&[])
            .iter()
            .map(|m| (m.actor.to_bytes().to_vec(), m.seq, m.max_op, m.hash))
            .collect();
        for (actor, seq, max_op, hash) in authors {
            ns.note_author(&actor, seq, max_op, hash);
        }
        let mut ops = Vec::with_capacity(ns.doc.length(automerge::ROOT));
        for item in ns.doc.map_range(automerge::ROOT, ..) {
            let (hlc, site) = parse_op_key(&item.key).map_err(invalid_change(WHAT))?;
            let ValueRef::Scalar(ScalarValueRef::Bytes(bytes)) = &item.value else {
                return Err(ExchangeError::InvalidChange {
                    what: WHAT,
                    reason: format!("operation {} is not bytes", item.key),
                });
            };
            let op = codec::decode(bytes, &mut ns.sites).map_err(|e| ExchangeError::InvalidChange {
                what: WHAT,
                reason: format!("operation {}: {e}", item.key),
            })?;
            ops.push((OpId { hlc, site: ns.sites.intern(site) }, op));
        }
        ns.integrate(ops);
        Ok(ns)
    }
}

/// Runs a parse of outside bytes into fresh, private values, turning a panic inside automerge
/// into an error. Nothing shared is touched by `parse`, so nothing is left half-changed.
fn guarded<T>(
    what: &'static str,
    parse: impl FnOnce() -> Result<T, ExchangeError>,
) -> Result<T, ExchangeError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).unwrap_or_else(|_| {
        Err(ExchangeError::Automerge { what, reason: "the bytes made automerge's parser fail".into() })
    })
}

/// First bytes of every automerge storage chunk.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED_CHANGE: u8 = 2;
const CHUNK_BUNDLE: u8 = 3;

/// Splits concatenated automerge storage chunks (magic, checksum, type, length, data) into
/// their types and bytes, without trusting any length beyond the input.
fn split_chunks(mut bytes: &[u8]) -> std::result::Result<Vec<(u8, &[u8])>, String> {
    let mut chunks = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 9 || bytes[..4] != CHUNK_MAGIC {
            return Err("not an automerge chunk".into());
        }
        let kind = bytes[8];
        if kind > CHUNK_BUNDLE {
            return Err(format!("unknown automerge chunk type {kind}"));
        }
        let mut reader = Reader::new(&bytes[9..]);
        let len = reader.varint("chunk length").map_err(|e| e.to_string())?;
        let header = bytes.len() - reader.remaining();
        let total = usize::try_from(len).ok().and_then(|l| l.checked_add(header));
        let Some(total) = total.filter(|t| *t <= bytes.len()) else {
            return Err("truncated automerge chunk".into());
        };
        let (chunk, rest) = bytes.split_at(total);
        chunks.push((kind, chunk));
        bytes = rest;
    }
    Ok(chunks)
}

/// The changes of an export made by [`Namespace::export_since`], parsed but not checked.
fn parse_export(bytes: &[u8], what: &'static str) -> Result<Vec<Change>, ExchangeError> {
    if bytes.len() > IMPORT_MAX_BYTES {
        return Err(ExchangeError::TooLarge { what, len: bytes.len(), max: IMPORT_MAX_BYTES });
    }
    let framing = |source: DecodeError| ExchangeError::Framing { what, source };
    let body = bytes.strip_prefix(EXPORT_MAGIC.as_slice()).ok_or_else(|| {
        framing(DecodeError::Invalid {
            what: "export header",
            reason: "not a meridian namespace export".into(),
        })
    })?;
    let mut reader = Reader::new(body);
    let count = reader.varint("change count").map_err(framing)?;
    let mut changes = Vec::new();
    for _ in 0..count {
        let raw = reader.bytes("change", IMPORT_MAX_BYTES).map_err(framing)?;
        changes.push(guarded(what, || {
            Change::from_bytes(raw.to_vec())
                .map_err(|e| ExchangeError::Automerge { what, reason: e.to_string() })
        })?);
    }
    reader.finish("export").map_err(framing)?;
    Ok(changes)
}

/// The operations of a change from outside, checked ([`ops_of_change`]), and its signature
/// checked against `keys`.
fn checked_ops(
    change: &Change,
    sites: &mut Sites,
    keys: &Keys,
    what: &'static str,
) -> Result<Vec<(OpId, Op)>, ExchangeError> {
    let expanded = change.decode();
    // Automerge recomputes a change's bytes from what it decoded; a change whose bytes are not
    // the canonical encoding of its contents would end up under two hashes and corrupt the
    // change graph. Only canonical changes are taken.
    if automerge::Change::from(expanded.clone()).hash() != change.hash() {
        return Err(invalid_change(what)(format!("change {} is not canonically encoded", change.hash())));
    }
    let ops = ops_of_change(change, &expanded, sites).map_err(invalid_change(what))?;
    let author = std::str::from_utf8(change.actor_id().to_bytes()).expect("checked by ops_of_change");
    trust::verify(change, &expanded, author, keys).map_err(|reason| ExchangeError::Signature {
        what,
        site: author.to_owned(),
        reason,
    })?;
    Ok(ops)
}

/// The namespace operations of one automerge change, checked: every op must put a valid
/// encoded operation under a fresh key `<hlc>.<site>` of the root map, `site` being the
/// change's author.
fn ops_of_change(
    change: &Change,
    expanded: &automerge::ExpandedChange,
    sites: &mut Sites,
) -> std::result::Result<Vec<(OpId, Op)>, String> {
    use automerge::legacy::{Key, ObjectId};
    let actor = std::str::from_utf8(change.actor_id().to_bytes())
        .map_err(|_| "the change's author is not a site id".to_owned())?;
    SiteId::new(actor)?;
    let mut ops = Vec::with_capacity(expanded.operations.len());
    for op in &expanded.operations {
        if op.obj != ObjectId::Root || op.insert || !op.pred.is_empty() {
            return Err("a change may only add new keys to the root map".into());
        }
        let Key::Map(key) = &op.key else {
            return Err("a change may only add new keys to the root map".into());
        };
        let (hlc, site) = parse_op_key(key)?;
        if site != actor {
            return Err(format!("operation {key} is signed by {site} but authored by {actor}"));
        }
        let automerge::legacy::OpType::Put(ScalarValue::Bytes(bytes)) = &op.action else {
            return Err(format!("operation {key} is not bytes"));
        };
        let decoded = codec::decode(bytes, sites).map_err(|e| format!("operation {key}: {e}"))?;
        ops.push((OpId { hlc, site: sites.intern(site) }, decoded));
    }
    Ok(ops)
}

//! The sans-IO site: a pure, deterministic state machine that makes every decision of a site.
//!
//! Inputs enter through `handle_*` methods — local requests, messages from peers, peers coming
//! and going, timeouts with the current time, results of chunk loads — and effects leave through
//! [`Site::poll_output`]: messages to send, data to store, chunks to load, replies. The driver
//! (the tokio runtime, or a test or simulator) executes outputs in order. What must wait for
//! durability says so itself: [`Output::Durable`] carries a [`Store`] and the outputs to carry
//! out only once it (and every store before it) is durable — the answer that a change is done,
//! and every message that may carry this site's changes (pushes, sync messages). No driver
//! decides that from message kinds.
//!
//! The site never does I/O, never reads a clock and never draws randomness. Time comes in with
//! every input as milliseconds of the driver's *monotonic* clock, which never steps; every timer
//! runs on it, and [`Site::poll_timeout`] says when the next one is due (the driver calls
//! [`Site::handle_timeout`] then, and need not call it otherwise). Only a local change also
//! takes the wall clock, for its hybrid logical clock stamp and times people read: a wall clock
//! stepped backwards or forwards neither stalls nor fires a timer.
//!
//! **Reads.** A read plans chunk loads and fetches over the chunks covering the requested range,
//! in a window per read (`read_window_chunks` beyond the last chunk its client has taken, so a
//! client that stops reading holds that much and delays nobody else), under a site-wide bound
//! of fetches in flight (`fetches_in_flight_max`); chunks are delivered in order. Concurrent readers of one chunk
//! share one fetch. A fetch asks the nearest connected holders (those of this region when any
//! is connected); a chunk whose hash does not match disconnects the sender and is asked of
//! another holder; a holder that goes away or does not answer in `fetch_timeout_ms` is replaced
//! by the next; with no holder connected, a fetch waits `who_has_timeout_ms` for one to
//! (re)connect, and a read without a manifest asks "who holds" again every `who_has_retry_ms`.
//! A fetch whose version has connected holders but none in this region goes through the staging
//! bucket when one is configured and `transfer` is not `direct` (`staging`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Range;

use crdt_namespace::{
    ContentId, DirEntry, EffectiveTag, EntryKind, FindHit, HlcClock, Keys, Namespace, OpError, Query, SiteId,
    Stat, SyncSession,
};
use proto::{FetchId, Message, Priority, Region};

use crate::content::{ChunkHash, ChunkRef, Manifest};

mod changes;
mod space;
mod staging;

use changes::ChangeLog;
pub use changes::{CHANGE_LOG_MAX, Changes};
use space::{ChunkInfo, Space};
pub use space::{GarbageHeldBack, SpaceStatus};
pub use staging::{BucketError, PackName, StagingEvent, pack_name};
use staging::{Holder, Reader};

/// Sync messages from a peer in a row that bring nothing new, while neither side's heads move,
/// before its session starts afresh. Automerge's session never sends a change twice; one lost
/// on a live link (a message dropped, a queue cut short) would leave both sides answering each
/// other's unchanging heads for ever. A fresh session resends what the peer still needs. (A
/// healthy session whose changes all come by push also brings nothing new, but the heads move
/// between its messages: it is not idle, and keeps its state.)
const SYNC_IDLE_MAX: u32 = 16;

/// Sync rounds in a row at which a peer has not confirmed some of this site's changes while
/// its heads did not move, before the session starts afresh. A change lost on the way leaves
/// the session sure it is in flight: both sides stay silent until a later change makes the peer
/// ask for it, and for ever if none comes (the peer's heads stay put, whatever this site's do).
/// A change the peer holds back for its clock bound looks the same: that session restarts every
/// few rounds meanwhile, which costs a summary of the history each time, no more.
const SYNC_QUIET_ROUNDS_MAX: u32 = 6;

/// Times one chunk fetch is sent (over all holders) before its readers fail: enough to go round
/// a few holders whose links were reset, few enough that a chunk nobody can serve fails fast.
const FETCH_ATTEMPTS_MAX: u32 = 8;

/// Nanoseconds since the epoch of a wall-clock reading in milliseconds; a clock that reads
/// beyond what nanoseconds hold (about the year 2262) saturates.
fn mtime_ns(wall_ms: u64) -> i64 {
    i64::try_from(wall_ms).unwrap_or(i64::MAX).saturating_mul(1_000_000)
}

/// The wall clock minus the monotonic one, saturating for clocks at the extremes.
fn wall_offset(now_ms: u64, wall_ms: u64) -> i64 {
    let offset = i128::from(wall_ms) - i128::from(now_ms);
    offset.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// The id a driver gives a local request; replies carry it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request {}", self.0)
    }
}

/// How payload crosses regions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transfer {
    /// Through the staging bucket when one is configured and no site of this region holds the
    /// version; directly from the holder when staging fails or is not configured.
    #[default]
    Auto,
    /// Always directly from a holder, whatever its region.
    Direct,
    /// Between regions only through the staging bucket: if it fails, the read fails.
    Staged,
}

/// Tuning of a site.
#[derive(Clone, Debug)]
pub struct SiteConfig {
    /// This site.
    pub site: SiteId,
    /// Chunk requests in flight at once, over all reads: enough to fill a fast link with 1 MiB
    /// chunks (16 MiB in flight), small enough to bound the memory of chunks held for
    /// reordering.
    pub fetches_in_flight_max: usize,
    /// Chunks one read keeps in flight or waiting to be delivered in order.
    pub read_window_chunks: usize,
    /// A chunk request unanswered this long is sent to another holder.
    pub fetch_timeout_ms: u64,
    /// A read whose version no reachable site holds fails after this long.
    pub who_has_timeout_ms: u64,
    /// "Who holds" is asked again this often while a read waits, so one lost question or answer
    /// is only a delay.
    pub who_has_retry_ms: u64,
    /// Anti-entropy: a sync round with every connected peer this often, so a lost push is only a
    /// delay.
    pub sync_interval_ms: u64,
    /// This site's region.
    pub region: Region,
    /// The region of every other site (from the membership); a site missing here is taken to
    /// be in this site's region.
    pub regions: BTreeMap<SiteId, Region>,
    /// The members' keys (current and former): a change is integrated only if its author's
    /// key signed it. This site's own key is always among them.
    pub keys: Keys,
    /// An operation stamped more than this far ahead of this site's wall clock is held, not
    /// integrated, until the clock gets there (the contract's `max_clock_ahead`).
    pub max_clock_ahead_ms: u64,
    /// The staging bucket between regions, if one is configured, and how this site's reads
    /// use it. Without one, payload crosses regions directly; with one, this site also stages
    /// what it holds for the sites of other regions that ask, whatever its own `Transfer`.
    pub staging: Option<Transfer>,
    /// A holder asked to stage a version that has not answered after this long is given up on.
    pub stage_timeout_ms: u64,
    /// Packs uploading at once for one region: the versions asked for meanwhile wait and go up
    /// together in the next pack.
    pub stage_uploads_in_flight: usize,
    /// Read-ahead through the bucket: a read of a file held only in another region also asks
    /// for up to this many small files that follow it in its directory (0: none).
    pub stage_read_ahead: usize,
    /// A version nothing refers to is deleted this long after the change that unreferenced it
    /// became causally stable (see `space`).
    pub collect_grace_ms: u64,
    /// Copies of versions other sites wrote are evicted, least recently used first, to keep
    /// their bytes under this (`None`: no bound but the disk).
    pub cache_max_bytes: Option<u64>,
}

impl SiteConfig {
    /// Defaults for `site`.
    pub fn new(site: SiteId) -> SiteConfig {
        SiteConfig {
            site,
            fetches_in_flight_max: 16,
            read_window_chunks: 8,
            fetch_timeout_ms: 10_000,
            who_has_timeout_ms: 5_000,
            who_has_retry_ms: 1_000,
            sync_interval_ms: 5_000,
            region: Region::new("local").expect("a valid region"),
            regions: BTreeMap::new(),
            keys: Keys::new(),
            max_clock_ahead_ms: 300_000,
            staging: None,
            stage_timeout_ms: 120_000,
            stage_uploads_in_flight: 2,
            stage_read_ahead: 256,
            collect_grace_ms: 600_000,
            cache_max_bytes: None,
        }
    }
}

/// What a site's store holds when the site starts.
#[derive(Clone, Debug, Default)]
pub struct Holdings {
    /// Versions held in full.
    pub versions: Vec<Manifest>,
    /// Those of them that are copies fetched from others (the rest this site wrote).
    pub copies: HashSet<ContentId>,
    /// Chunks held, with their lengths.
    pub chunks: HashMap<ChunkHash, u32>,
}

/// A request from a local client.
#[derive(Clone, Debug)]
pub enum Request {
    /// Make a directory (and its parents).
    Mkdir {
        /// Where.
        path: String,
        /// Also make missing parents; an existing directory is fine.
        parents: bool,
        /// Permission bits.
        mode: u32,
    },
    /// Record a new file version whose chunks the driver has already stored durably.
    CommitVersion {
        /// Where.
        path: String,
        /// The version.
        manifest: Manifest,
        /// Permission bits.
        mode: u32,
        /// Modification time, nanoseconds since the epoch.
        mtime_ns: i64,
    },
    /// Move or rename.
    Rename {
        /// From.
        from: String,
        /// To.
        to: String,
    },
    /// Move or rename over what is at `to`, as POSIX's `rename` (one change: the removal and
    /// the move reach every site together).
    Replace {
        /// From.
        from: String,
        /// To.
        to: String,
    },
    /// Remove an entry.
    Remove {
        /// What.
        path: String,
        /// A directory with entries too.
        recursive: bool,
    },
    /// Set a tag.
    SetTag {
        /// On what.
        path: String,
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Unset a tag explicitly (blocks inheritance).
    UnsetTag {
        /// On what.
        path: String,
        /// Key.
        key: String,
    },
    /// Forget the entry's own definition of a tag (set or unset): it inherits it again.
    ClearTag {
        /// On what.
        path: String,
        /// Key.
        key: String,
    },
    /// Make a symbolic link (its target is stored, never resolved).
    Symlink {
        /// Where.
        path: String,
        /// What it points at.
        target: String,
    },
    /// Change an entry's permission bits and/or modification time.
    SetAttr {
        /// Which.
        path: String,
        /// New permission bits.
        mode: Option<u32>,
        /// New modification time, nanoseconds since the epoch.
        mtime_ns: Option<i64>,
    },
    /// What is known of an entry.
    Stat {
        /// Which.
        path: String,
    },
    /// A directory's entries.
    List {
        /// Which.
        path: String,
    },
    /// An entry's effective tags.
    Tags {
        /// Which.
        path: String,
    },
    /// Entries matching tag predicates and a glob.
    Find {
        /// The query.
        query: Query,
    },
    /// Read a file's current version, or a byte range of it. Data follows as
    /// [`Output::ReadData`], in order, then [`Output::ReadDone`].
    Read {
        /// Which file.
        path: String,
        /// Which bytes; all if `None`.
        range: Option<Range<u64>>,
    },
    /// Read the version of the file at `path` whose content is `content` (`size` bytes), or a
    /// byte range of it, like [`Request::Read`]: the current version, or one it had before
    /// (or, removed since, the last it had), fetched from whoever still holds it. What a
    /// program that opened a file reads until it opens it again.
    ReadVersion {
        /// Which file.
        path: String,
        /// Which version.
        content: ContentId,
        /// Its size.
        size: u64,
        /// Which bytes; all if `None`.
        range: Option<Range<u64>>,
    },
    /// The site's state.
    Status,
    /// The entries changed after a sequence number (`None`: where the log is now).
    Changes {
        /// The `next` of the last answer, less one.
        after: Option<u64>,
    },
    /// The membership changed (`meridian mesh add|rm|rotate`): every member's keys, current and
    /// former, and regions, from now on.
    Membership {
        /// The keys changes are checked with.
        keys: Keys,
        /// The members' regions.
        regions: BTreeMap<SiteId, Region>,
    },
    /// The sequence number of the last change of `site` held here (0: none): what a key of
    /// the site retired now may still sign.
    LastSeq {
        /// The site.
        site: SiteId,
    },
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The change is recorded, and durable: this reply comes in the `then` of the
    /// [`Output::Durable`] that stores it.
    Done,
    /// A stat.
    Stat(Stat),
    /// A listing.
    List(Vec<DirEntry>),
    /// Effective tags.
    Tags(Vec<EffectiveTag>),
    /// Find results.
    Found(Vec<FindHit>),
    /// A read begins: these bytes of a file of this size will follow.
    ReadStarted {
        /// The file's size.
        size: u64,
        /// The bytes that will follow.
        range: Range<u64>,
    },
    /// The site's state.
    Status(Status),
    /// A sequence number ([`Request::LastSeq`]).
    Seq(u64),
    /// Entries changed ([`Request::Changes`]).
    Changes(Changes),
}

/// A connected peer and how far behind it is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerLag {
    /// Its site id.
    pub site: String,
    /// This site's namespace changes it had not confirmed at the last sync round.
    pub lag_changes: usize,
    /// Times the sync session with it started afresh, stuck (see [`SYNC_IDLE_MAX`] and
    /// [`SYNC_QUIET_ROUNDS_MAX`]), since the link came up.
    #[serde(default)]
    pub sync_restarts: u64,
}

/// What a site reports about itself (also the body of the control API's status answer).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// This site.
    pub site: String,
    /// Connected peers.
    pub peers: Vec<PeerLag>,
    /// Live namespace entries.
    pub entries: usize,
    /// Versions held here.
    pub versions_held: usize,
    /// Chunks held here.
    pub chunks_held: usize,
    /// Reads in progress.
    pub reads: usize,
    /// Chunk requests in flight.
    pub fetches: usize,
    /// Chunks received from peers since the site started.
    pub chunks_fetched: u64,
    /// Bytes of those chunks.
    pub bytes_fetched: u64,
    /// Bytes of chunks read from the staging bucket since the site started.
    pub bytes_from_staging: u64,
    /// Bytes of packs this site uploaded to the staging bucket since it started.
    pub bytes_to_staging: u64,
    /// Staged packs this site reads from or uploaded and has not deleted.
    pub staged_packs: usize,
    /// Versions not held here whose holders this site keeps (those it read or reads).
    #[serde(default)]
    pub versions_known: usize,
    /// Changes held, not integrated, because an operation in them is more than
    /// `max_clock_ahead_ms` ahead of this site's clock: how many, by the site that wrote them.
    pub held_changes: BTreeMap<String, usize>,
    /// Bytes stored, cached and waiting for collection.
    #[serde(default)]
    pub space: SpaceStatus,
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SiteError {
    /// The namespace refused it.
    #[error(transparent)]
    Namespace(#[from] OpError),
    /// A read of something that is not a file.
    #[error("not a file: {path}")]
    NotAFile {
        /// The path.
        path: String,
    },
    /// No reachable site holds the version.
    #[error("no reachable site holds {path} (version {content})")]
    NoHolder {
        /// The path.
        path: String,
        /// The version.
        content: ContentId,
    },
    /// The version could not be read through the staging bucket, and the configuration allows
    /// no other way.
    #[error("reading {path} through the staging bucket failed: {reason}")]
    Staging {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A read of a version by its content id asked for bytes past its end (the size given
    /// with it was not the version's).
    #[error("bytes up to {end} asked of version {content} of {path}, which has {size}")]
    BeyondEnd {
        /// The path.
        path: String,
        /// The version.
        content: ContentId,
        /// The end asked for.
        end: u64,
        /// The version's size.
        size: u64,
    },
    /// A chunk could not be read here.
    #[error("chunk {chunk} of {path} is unreadable here: {reason}")]
    Chunk {
        /// The path.
        path: String,
        /// The chunk.
        chunk: ChunkHash,
        /// Why.
        reason: String,
    },
}

/// Why the driver loads a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadPurpose {
    /// To answer a peer's request.
    Peer {
        /// The peer.
        to: SiteId,
        /// Its request id.
        request: FetchId,
    },
    /// For a local read.
    Read {
        /// The read.
        id: RequestId,
        /// The chunk's index in the version.
        index: usize,
    },
}

/// What to make durable, in this order: the chunks of `index`, already written (synced), then
/// in one transaction their index, the versions now held and the namespace change.
#[derive(Clone, Debug, Default)]
pub struct Store {
    /// Chunks already written, to sync and index.
    pub index: Vec<ChunkRef>,
    /// Versions now held in full.
    pub versions: Vec<Manifest>,
    /// An incremental namespace save (may be empty).
    pub namespace: Vec<u8>,
}

/// An effect for the driver to carry out.
#[derive(Clone, Debug)]
pub enum Output {
    /// Send a message to a peer.
    Send {
        /// The peer.
        to: SiteId,
        /// The message.
        message: Message,
    },
    /// Send fresh namespace changes to every connected peer. The driver may use a broadcast
    /// medium (gossip) instead of one message per peer.
    Broadcast {
        /// The peers connected when the changes committed.
        to: Vec<SiteId>,
        /// The message ([`Message::Push`]).
        message: Message,
    },
    /// Make `store` durable, after every store before it; only then carry out `then`, in order.
    /// With `then` empty the driver may make it durable whenever it likes, but before the
    /// `then` of any later `Durable`.
    Durable {
        /// What to make durable (may be empty: then this only orders `then` after the stores
        /// before it).
        store: Store,
        /// What waits for it: never another `Durable`.
        then: Vec<Output>,
    },
    /// Keep copies of what peers hold: write the chunks now (they are served from now on), and
    /// make them and the versions they complete durable whenever the driver likes — later, in
    /// batches, or never if it crashes first — but never a version before its chunks. Losing
    /// a copy only means fetching it again.
    Cache {
        /// Chunks fetched (each verified against its hash by the site).
        chunks: Vec<(ChunkHash, Vec<u8>)>,
        /// Versions now held in full.
        versions: Vec<Manifest>,
    },
    /// Read a chunk from the store and hand it to [`Site::handle_chunk_loaded`].
    LoadChunk {
        /// The chunk.
        hash: ChunkHash,
        /// What for.
        purpose: LoadPurpose,
    },
    /// The answer to a local request.
    Reply {
        /// The request.
        id: RequestId,
        /// The answer.
        reply: Result<Reply, SiteError>,
    },
    /// Bytes of a read, in order. Once its client has taken them, the driver says so with
    /// [`Site::handle_read_taken`]: a read holds at most `read_window_chunks` chunks its client
    /// has not taken, so a client that stops reading delays only itself.
    ReadData {
        /// The read.
        id: RequestId,
        /// Offset of `data` in the file.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A read is over.
    ReadDone {
        /// The read.
        id: RequestId,
        /// Whether it delivered every byte.
        result: Result<(), SiteError>,
    },
    /// Open the staged pack `name` and hand its chunk list to [`Site::handle_stage_opened`].
    StageOpen {
        /// The pack's name.
        name: PackName,
    },
    /// Read chunk `index` of the staged pack `name` and hand it to
    /// [`Site::handle_stage_chunk`].
    StageRead {
        /// The fetch's request id, echoed.
        request: FetchId,
        /// The pack's name.
        name: PackName,
        /// The chunk.
        chunk: ChunkHash,
        /// Its index in the pack.
        index: u32,
    },
    /// Upload `chunks` (held here: the chunks of one or more versions) as the pack `name`,
    /// then call [`Site::handle_stage_uploaded`].
    StageUpload {
        /// The pack's name.
        name: PackName,
        /// The region it is staged for.
        region: Region,
        /// Its chunks, each once, in order.
        chunks: Vec<ChunkRef>,
    },
    /// Delete the staged pack `name`: every site that needed it has it, or it is bad.
    StageDelete {
        /// The pack's name.
        name: PackName,
    },
    /// Forget these versions and delete these chunk files, which nothing here needs any more
    /// (garbage, or cache copies evicted). The core no longer counts them as held. Just
    /// before deleting a chunk file, while no put that could rely on it stores or commits, the
    /// driver checks [`Site::holds_chunk`]: a commit since may have brought the chunk back.
    Reclaim {
        /// Versions no longer held.
        versions: Vec<ContentId>,
        /// Chunks to delete.
        chunks: Vec<ChunkHash>,
    },
    /// Drop the connection to a peer that misbehaved.
    Disconnect {
        /// The peer.
        peer: SiteId,
        /// What it did.
        reason: String,
    },
}

struct Read {
    path: String,
    content: ContentId,
    /// The site that wrote the version.
    writer: Option<SiteId>,
    range: Range<u64>,
    manifest: Option<Manifest>,
    asked_at_ms: u64,
    /// When "who holds" was last asked for this read's version.
    last_ask_ms: u64,
    /// Next chunk index to deliver.
    next: usize,
    /// Chunks before this index were taken by the client (its driver said so with
    /// [`Site::handle_read_taken`]); the read loads and fetches at most `read_window_chunks`
    /// beyond it, so a client that stops taking holds that much and no more.
    taken: usize,
    /// Next chunk index to load or fetch.
    requested: usize,
    /// One past the last chunk index to deliver.
    end: usize,
    /// Chunks arrived ahead of `next`.
    ready: BTreeMap<usize, Vec<u8>>,
}

struct Fetch {
    request: FetchId,
    from: SiteId,
    content: ContentId,
    len: u32,
    priority: Priority,
    tried: BTreeSet<SiteId>,
    /// Times the fetch was sent.
    attempts: u32,
    /// Since when the fetch waits for a holder to (re)connect, if it does.
    parked_since_ms: Option<u64>,
    /// It waits for staging (a pack asked for or being opened), not for a holder: what ends the
    /// wait is staging's own answer or timer, which sends it again.
    parked_on_stage: bool,
    sent_ms: u64,
    waiters: Vec<(RequestId, usize)>,
}

impl Fetch {
    /// When the fetch is late: sent and unanswered for `fetch_timeout_ms`, or waiting for a
    /// holder for `who_has_timeout_ms`. One waiting for staging has no timer of its own.
    fn deadline(&self, config: &SiteConfig) -> Option<u64> {
        match self.parked_since_ms {
            Some(_) if self.parked_on_stage => None,
            Some(since) => Some(since + config.who_has_timeout_ms),
            None => Some(self.sent_ms + config.fetch_timeout_ms),
        }
    }
}

struct Peer {
    session: SyncSession,
    /// Sync messages received in a row that brought no change while neither side's heads
    /// moved.
    idle: u32,
    /// The peer's heads and this site's, at its last message.
    heads_at_last: Option<Heads>,
    /// Sync rounds in a row at which the peer had not confirmed some of this site's changes
    /// while its heads did not move.
    quiet_rounds: u32,
    /// The peer's heads at the last sync round.
    their_heads_at_round: Option<Vec<crdt_namespace::ChangeHash>>,
    /// Times the session started afresh, stuck.
    restarts: u64,
}

/// The heads a peer last named, and this site's.
type Heads = (Vec<crdt_namespace::ChangeHash>, Vec<crdt_namespace::ChangeHash>);

impl Peer {
    fn new() -> Peer {
        Peer {
            session: SyncSession::new(),
            idle: 0,
            heads_at_last: None,
            quiet_rounds: 0,
            their_heads_at_round: None,
            restarts: 0,
        }
    }

    /// Starts the session afresh: the peer is told everything it may lack again.
    fn restart(&mut self) {
        let restarts = self.restarts + 1;
        *self = Peer { restarts, ..Peer::new() };
    }
}

/// One site.
pub struct Site {
    config: SiteConfig,
    ns: Namespace,
    clock: HlcClock,
    now_ms: u64,
    /// The wall clock minus the monotonic one, as the driver last said
    /// ([`Site::handle_wall_clock`]): the site's reading of the wall clock at any input.
    wall_offset_ms: Option<i64>,
    peers: BTreeMap<SiteId, Peer>,
    /// Versions held in full, with their manifests.
    held: HashMap<ContentId, Manifest>,
    /// Manifests learned from peers for versions not held.
    manifests: HashMap<ContentId, Manifest>,
    /// Chunks held, with their lengths and uses (see `space`).
    chunks: HashMap<ChunkHash, ChunkInfo>,
    /// Held versions this site wrote (the others are copies: cache).
    own: HashSet<ContentId>,
    /// Garbage collection and the cache's bound.
    space: Space,
    holders: HashMap<ContentId, BTreeSet<SiteId>>,
    reads: BTreeMap<RequestId, Read>,
    fetches: BTreeMap<ChunkHash, Fetch>,
    next_request: u64,
    last_sync_ms: u64,
    pushed_heads: Vec<crdt_namespace::ChangeHash>,
    outputs: VecDeque<Output>,
    chunks_fetched: u64,
    bytes_fetched: u64,
    /// Entries changed, for caches of the namespace to follow.
    changes: ChangeLog,
    /// Versions read through the staging bucket.
    stage_in: Reader,
    /// Packs staged for other regions.
    stage_out: Holder,
}

impl Site {
    /// A site with the namespace, versions and chunks its store holds.
    pub fn new(config: SiteConfig, mut ns: Namespace, holdings: Holdings) -> Site {
        let mut clock = HlcClock::new();
        clock.observe(ns.last_hlc());
        ns.set_keys(config.keys.clone());
        let pushed_heads = ns.heads();
        let mut site = Site {
            config,
            ns,
            clock,
            now_ms: 0,
            wall_offset_ms: None,
            peers: BTreeMap::new(),
            held: HashMap::new(),
            manifests: HashMap::new(),
            chunks: HashMap::new(),
            own: HashSet::new(),
            space: Space::default(),
            holders: HashMap::new(),
            reads: BTreeMap::new(),
            fetches: BTreeMap::new(),
            next_request: 1,
            last_sync_ms: 0,
            pushed_heads,
            outputs: VecDeque::new(),
            chunks_fetched: 0,
            changes: ChangeLog::new(),
            bytes_fetched: 0,
            stage_in: Reader::default(),
            stage_out: Holder::default(),
        };
        let Holdings { versions, copies, chunks } = holdings;
        let mut chunks: Vec<(ChunkHash, u32)> = chunks.into_iter().collect();
        chunks.sort();
        for (hash, len) in chunks {
            site.add_chunk(hash, len);
        }
        for manifest in versions {
            let own = !copies.contains(&manifest.content_id());
            site.hold(manifest, own);
        }
        // `hold` put the unreferenced ones in an epoch; from now on changes say what they
        // touched.
        site.note_references();
        site
    }

    /// The site's configuration.
    pub fn config(&self) -> &SiteConfig {
        &self.config
    }

    /// The site's namespace replica, for reads that need no request.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// The site's namespace replica, mutably: for drivers that save or compact it.
    pub fn namespace_mut(&mut self) -> &mut Namespace {
        &mut self.ns
    }

    /// Whether every chunk of version `content` is held here.
    pub fn holds(&self, content: &ContentId) -> bool {
        self.held.contains_key(content)
    }

    /// The latest monotonic time the site was given.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Versions this site tracks as read (or read ahead) through the bucket, and packs it
    /// reads from: both drop to zero a minute after the last read, whatever happened.
    pub fn staged_reads(&self) -> (usize, usize) {
        self.stage_in.backlog()
    }

    /// Whether chunk requests are in flight.
    pub fn fetching(&self) -> bool {
        !self.fetches.is_empty()
    }

    /// What must hold across the core's maps after every input; the simulator checks it after
    /// every event. Reads: their chunk cursors are ordered and chunks waiting for delivery lie
    /// between them. Fetches: each serves at least one read in progress, at the chunk that read
    /// asked for, and there are never more in flight than the bound. Held versions: every
    /// chunk is here. Then the staging rules (one pack per version and region pair, upload
    /// counts, queues and waiters, packs read from).
    pub fn check_invariants(&self) -> Result<(), String> {
        for (id, read) in &self.reads {
            if !(read.taken <= read.next && read.next <= read.requested && read.requested <= read.end) {
                return Err(format!("read {id} of {}: cursors out of order", read.path));
            }
            if read.requested > read.taken + self.config.read_window_chunks {
                return Err(format!("read {id} of {}: more chunks asked for than its window", read.path));
            }
            if read.manifest.is_none() && read.end != 0 {
                return Err(format!("read {id} of {}: planned without a manifest", read.path));
            }
            if read.ready.keys().any(|i| *i < read.next || *i >= read.requested) {
                return Err(format!("read {id} of {}: a chunk waits outside its window", read.path));
            }
        }
        if self.fetches.len() > self.config.fetches_in_flight_max {
            return Err(format!("{} fetches in flight, over the bound", self.fetches.len()));
        }
        for (hash, fetch) in &self.fetches {
            let mut live = fetch.waiters.iter().filter_map(|(id, index)| Some((self.reads.get(id)?, *index)));
            let Some(_) = live.clone().next() else {
                return Err(format!("fetch of chunk {hash} serves no read"));
            };
            if let Some((read, index)) = live.find(|(r, i)| {
                r.manifest.as_ref().is_none_or(|m| m.chunks.get(*i).map(|c| c.hash) != Some(*hash))
                    || *i < r.next
                    || *i >= r.requested
            }) {
                return Err(format!(
                    "fetch of chunk {hash} serves read of {} at chunk {index}, which it did not ask for",
                    read.path
                ));
            }
        }
        for (content, manifest) in &self.held {
            if manifest.chunks.iter().any(|c| !self.chunks.contains_key(&c.hash)) {
                return Err(format!("version {content} is held without all its chunks"));
            }
        }
        self.check_space_invariants()?;
        self.check_staging_invariants()
    }

    /// The next effect to carry out.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    fn emit(&mut self, output: Output) {
        self.outputs.push_back(output);
    }

    /// Emits `output` to be carried out once everything stored so far is durable: with the
    /// `Durable` last emitted if nothing followed it, else behind an empty one.
    fn emit_after_durable(&mut self, output: Output) {
        debug_assert!(!matches!(output, Output::Durable { .. }), "durable outputs do not nest");
        match self.outputs.back_mut() {
            Some(Output::Durable { then, .. }) => then.push(output),
            _ => self.emit(Output::Durable { store: Store::default(), then: vec![output] }),
        }
    }

    fn reply(&mut self, id: RequestId, reply: Result<Reply, SiteError>) {
        self.emit(Output::Reply { id, reply });
    }

    // ------------------------------------------------------------------------------------------
    // Local requests

    /// A request from a local client, at `now_ms` of the monotonic clock and `wall_ms` of the
    /// wall clock (milliseconds since the Unix epoch): the stamp of a change it makes.
    pub fn handle_local(&mut self, now_ms: u64, wall_ms: u64, id: RequestId, request: Request) {
        self.now_ms = self.now_ms.max(now_ms);
        self.wall_offset_ms = Some(wall_offset(now_ms, wall_ms));
        let hlc = self.clock.tick(wall_ms);
        let changed: Result<Option<Manifest>, OpError> = match request {
            Request::Mkdir { path, parents, mode } => {
                self.ns.mkdir(&path, parents, mode, mtime_ns(wall_ms), hlc).map(|()| None)
            }
            Request::CommitVersion { path, manifest, mode, mtime_ns } => {
                let version = crdt_namespace::NewVersion {
                    content: manifest.content_id(),
                    size: manifest.size,
                    mode,
                    mtime_ns,
                };
                self.ns.write_file(&path, version, hlc).map(|()| Some(manifest))
            }
            Request::Rename { from, to } => self.ns.rename(&from, &to, hlc).map(|()| None),
            Request::Replace { from, to } => {
                let later = self.clock.tick(wall_ms);
                self.ns.rename_replacing(&from, &to, hlc, later).map(|()| None)
            }
            Request::Remove { path, recursive } => self.ns.remove(&path, recursive, hlc).map(|()| None),
            Request::SetTag { path, key, value } => self.ns.set_tag(&path, &key, &value, hlc).map(|()| None),
            Request::UnsetTag { path, key } => self.ns.unset_tag(&path, &key, hlc).map(|()| None),
            Request::ClearTag { path, key } => self.ns.clear_tag(&path, &key, hlc).map(|()| None),
            Request::Symlink { path, target } => {
                self.ns.symlink(&path, &target, mtime_ns(wall_ms), hlc).map(|()| None)
            }
            Request::SetAttr { path, mode, mtime_ns } => {
                self.ns.set_attr(&path, mode, mtime_ns, hlc).map(|()| None)
            }
            Request::Stat { path } => return self.answer(id, self.ns.stat(&path).map(Reply::Stat)),
            Request::List { path } => return self.answer(id, self.ns.list(&path).map(Reply::List)),
            Request::Tags { path } => return self.answer(id, self.ns.effective_tags(&path).map(Reply::Tags)),
            Request::Find { query } => return self.reply(id, Ok(Reply::Found(self.ns.find(&query)))),
            Request::Changes { after } => {
                return self.reply(id, Ok(Reply::Changes(self.changes.since(after))));
            }
            Request::Status => {
                let status = self.status();
                return self.reply(id, Ok(Reply::Status(status)));
            }
            Request::Membership { keys, regions } => {
                self.config.keys = keys;
                self.ns.set_keys(self.config.keys.clone());
                self.config.regions = regions;
                self.space_membership_changed();
                return self.reply(id, Ok(Reply::Done));
            }
            Request::LastSeq { site } => {
                let seq = self.ns.last_seq_of(&site);
                return self.reply(id, Ok(Reply::Seq(seq)));
            }
            Request::Read { path, range } => return self.start_read(id, path, range, None),
            Request::ReadVersion { path, content, size, range } => {
                return self.start_read(id, path, range, Some((content, size)));
            }
        };
        match changed {
            Err(e) => self.reply(id, Err(e.into())),
            Ok(version) => {
                let mut versions = Vec::new();
                let mut index = Vec::new();
                if let Some(manifest) = version {
                    for chunk in &manifest.chunks {
                        self.add_chunk(chunk.hash, chunk.len);
                    }
                    index.extend(manifest.chunks.iter().copied());
                    self.hold(manifest.clone(), true);
                    versions.push(manifest);
                }
                self.ns.commit();
                self.note_references();
                let namespace = self.ns.save_incremental();
                let mut then: Vec<Output> = self.push_changes().into_iter().collect();
                then.push(Output::Reply { id, reply: Ok(Reply::Done) });
                self.emit(Output::Durable { store: Store { index, versions, namespace }, then });
            }
        }
    }

    fn answer<T>(&mut self, id: RequestId, result: Result<Reply, T>)
    where
        SiteError: From<T>,
    {
        self.reply(id, result.map_err(SiteError::from));
    }

    /// Whether this site knows anything of version `content`: who holds it, its manifest.
    pub fn knows_version(&self, content: &ContentId) -> bool {
        self.holders.contains_key(content) || self.manifests.contains_key(content) || self.holds(content)
    }

    /// The state of the site.
    pub fn status(&mut self) -> Status {
        let ns = &mut self.ns;
        let peers = self
            .peers
            .iter()
            .map(|(site, p)| PeerLag {
                site: site.to_string(),
                lag_changes: ns.unconfirmed_changes(&p.session),
                sync_restarts: p.restarts,
            })
            .collect();
        Status {
            site: self.config.site.to_string(),
            peers,
            entries: self.ns.len(),
            versions_held: self.held.len(),
            chunks_held: self.chunks.len(),
            reads: self.reads.len(),
            fetches: self.fetches.len(),
            chunks_fetched: self.chunks_fetched,
            bytes_fetched: self.bytes_fetched,
            bytes_from_staging: self.stage_in.bytes_from_staging,
            bytes_to_staging: self.stage_out.bytes_to_staging,
            staged_packs: self.stage_in.packs() + self.stage_out.packs(),
            versions_known: self.holders.len().max(self.manifests.len()),
            held_changes: self.ns.held_changes(),
            space: self.space_status(|ms| {
                (ms as i64).saturating_add(self.wall_offset_ms.unwrap_or(0)).max(0) as u64
            }),
        }
    }

    /// Sends the namespace changes made since the last push to every connected peer.
    /// The push of the namespace changes made since the last one to every connected peer.
    fn push_changes(&mut self) -> Option<Output> {
        let changes = self.ns.export_since(&self.pushed_heads);
        self.pushed_heads = self.ns.heads();
        let to: Vec<SiteId> = self.peers.keys().cloned().collect();
        (!to.is_empty()).then_some(Output::Broadcast { to, message: Message::Push { changes } })
    }

    // ------------------------------------------------------------------------------------------
    // Reads

    /// Starts a read of the current version of the file at `path`, or of the version `pinned`
    /// (content, size) it has or had.
    fn start_read(
        &mut self,
        id: RequestId,
        path: String,
        range: Option<Range<u64>>,
        pinned: Option<(ContentId, u64)>,
    ) {
        let current = match self.ns.stat(&path) {
            Ok(stat) if stat.kind == EntryKind::File => stat.version,
            Ok(_) => None,
            Err(e) if pinned.is_none() => return self.reply(id, Err(e.into())),
            Err(_) => None,
        };
        // The version's content and size, and the site that wrote it when it is the current
        // one (an older one is asked of every site).
        let (content, size, writer) = match (current, pinned) {
            (Some(v), Some((content, _))) if v.content == content => {
                (v.content, v.size, SiteId::new(&v.site).ok())
            }
            (_, Some((content, size))) => (content, size, None),
            (Some(v), None) => (v.content, v.size, SiteId::new(&v.site).ok()),
            (None, None) => return self.reply(id, Err(SiteError::NotAFile { path })),
        };
        let range = range.map_or(0..size, |r| r.start.min(size)..r.end.min(size).max(r.start.min(size)));
        self.reply(id, Ok(Reply::ReadStarted { size, range: range.clone() }));
        if range.is_empty() {
            return self.emit(Output::ReadDone { id, result: Ok(()) });
        }
        let manifest = self.held.get(&content).or_else(|| self.manifests.get(&content)).cloned();
        let read = Read {
            path,
            content,
            writer,
            range,
            manifest: None,
            asked_at_ms: self.now_ms,
            last_ask_ms: self.now_ms,
            next: 0,
            taken: 0,
            requested: 0,
            end: 0,
            ready: BTreeMap::new(),
        };
        self.reads.insert(id, read);
        match manifest {
            Some(m) => self.set_manifest(id, m),
            None => self.ask_who_has(content),
        }
    }

    fn ask_who_has(&mut self, content: ContentId) {
        let peers: Vec<SiteId> = self.peers.keys().cloned().collect();
        for to in peers {
            self.emit(Output::Send { to, message: Message::WhoHas { content } });
        }
    }

    fn set_manifest(&mut self, id: RequestId, manifest: Manifest) {
        let Some(read) = self.reads.get_mut(&id) else { return };
        if read.range.end > manifest.size {
            // Only a read of a version by content id, given a wrong size, gets here.
            let (path, content, end) = (read.path.clone(), read.content, read.range.end);
            self.reads.remove(&id);
            let error = SiteError::BeyondEnd { path, content, end, size: manifest.size };
            return self.emit(Output::ReadDone { id, result: Err(error) });
        }
        let chunks = manifest.chunks_covering(read.range.clone());
        read.next = chunks.start;
        read.taken = chunks.start;
        read.requested = chunks.start;
        read.end = chunks.end;
        read.manifest = Some(manifest);
        self.advance_read(id);
    }

    /// Starts loads and fetches for a read, within its window and the site's fetch bound.
    fn advance_read(&mut self, id: RequestId) {
        loop {
            let Some(read) = self.reads.get(&id) else { return };
            let Some(manifest) = &read.manifest else { return };
            let index = read.requested;
            if index >= read.end || index >= read.taken + self.config.read_window_chunks {
                return;
            }
            let chunk = manifest.chunks[index];
            let content = read.content;
            if self.chunks.contains_key(&chunk.hash) {
                self.use_chunk(&chunk.hash);
                self.emit(Output::LoadChunk { hash: chunk.hash, purpose: LoadPurpose::Read { id, index } });
            } else if let Some(fetch) = self.fetches.get_mut(&chunk.hash) {
                // Concurrent readers of one chunk share one fetch.
                fetch.waiters.push((id, index));
            } else if self.fetches.len() < self.config.fetches_in_flight_max {
                self.start_fetch(chunk, content, id, index);
                if !self.reads.contains_key(&id) {
                    return;
                }
            } else {
                return;
            }
            self.reads.get_mut(&id).expect("the read exists").requested += 1;
        }
    }

    fn start_fetch(&mut self, chunk: ChunkRef, content: ContentId, id: RequestId, index: usize) {
        let fetch = Fetch {
            request: FetchId(0),
            from: self.config.site.clone(),
            content,
            len: chunk.len,
            priority: Priority::Urgent,
            tried: BTreeSet::new(),
            attempts: 0,
            parked_since_ms: None,
            parked_on_stage: false,
            sent_ms: self.now_ms,
            waiters: vec![(id, index)],
        };
        self.fetches.insert(chunk.hash, fetch);
        self.send_fetch(chunk.hash);
    }

    /// Sends (or re-sends) a fetch to a connected holder it has not tried. With none connected,
    /// the fetch waits for one to (re)connect — a link that is reset or a holder that restarts is
    /// a delay, not a failure — and fails its readers after `who_has_timeout_ms`, or at once when
    /// its attempts are used up.
    fn send_fetch(&mut self, hash: ChunkHash) {
        if self.fetch_through_staging(hash) {
            return;
        }
        let Some(content) = self.fetches.get(&hash).map(|f| f.content) else { return };
        let connected = self.view().nearest_holders(&content);
        let fetch = self.fetches.get_mut(&hash).expect("checked above");
        // Every connected holder tried already (a link that was reset, a holder that came back):
        // start over with them, up to a bound of attempts.
        if !connected.is_empty()
            && connected.iter().all(|h| fetch.tried.contains(h))
            && fetch.attempts < FETCH_ATTEMPTS_MAX
        {
            fetch.tried.clear();
        }
        let none_connected = connected.is_empty();
        let holder = connected.into_iter().find(|h| !fetch.tried.contains(h));
        let Some(holder) = holder else {
            let newly_parked = fetch.parked_since_ms.is_none();
            fetch.parked_on_stage = false;
            let parked_since = *fetch.parked_since_ms.get_or_insert(self.now_ms);
            let waited = self.now_ms.saturating_sub(parked_since);
            if fetch.attempts < FETCH_ATTEMPTS_MAX && waited < self.config.who_has_timeout_ms {
                if newly_parked && none_connected {
                    // Every holder known is gone (or the manifest came with a staging answer,
                    // from one holder): others may hold it.
                    let content = fetch.content;
                    self.ask_who_has(content);
                }
                return;
            }
            let fetch = self.fetches.remove(&hash).expect("checked above");
            for (id, _) in fetch.waiters {
                if let Some(read) = self.reads.get(&id) {
                    let error = SiteError::NoHolder { path: read.path.clone(), content: read.content };
                    self.fail_read(id, error);
                }
            }
            return;
        };
        let request = self.next_fetch_id();
        let fetch = self.fetches.get_mut(&hash).expect("checked above");
        fetch.request = request;
        fetch.from = holder.clone();
        fetch.tried.insert(holder.clone());
        fetch.attempts += 1;
        fetch.parked_since_ms = None;
        fetch.parked_on_stage = false;
        fetch.sent_ms = self.now_ms;
        let priority = fetch.priority;
        self.emit(Output::Send {
            to: holder,
            message: Message::GetChunk { request, chunk: hash.0, priority },
        });
    }

    /// Ends a read with an error.
    fn fail_read(&mut self, id: RequestId, error: SiteError) {
        if self.reads.contains_key(&id) {
            self.emit(Output::ReadDone { id, result: Err(error) });
            self.drop_read(id);
        }
    }

    /// Forgets a read, if it is in progress. Fetches that served only it are dropped (a late
    /// answer is ignored), and the reads their slots held back go on.
    fn drop_read(&mut self, id: RequestId) -> bool {
        if self.reads.remove(&id).is_none() {
            return false;
        }
        let before = self.fetches.len();
        self.fetches.retain(|_, f| {
            f.waiters.retain(|(waiter, _)| *waiter != id);
            !f.waiters.is_empty()
        });
        if self.fetches.len() < before {
            let waiting: Vec<RequestId> = self.reads.keys().copied().collect();
            for id in waiting {
                self.advance_read(id);
            }
        }
        true
    }

    /// Hands a chunk to a read and delivers what is now in order.
    fn deliver(&mut self, id: RequestId, index: usize, data: Vec<u8>) {
        let Some(read) = self.reads.get_mut(&id) else { return };
        read.ready.insert(index, data);
        let manifest = read.manifest.as_ref().expect("chunks arrive only for planned reads");
        while let Some(data) = read.ready.remove(&read.next) {
            let span = manifest.chunk_range(read.next);
            let start = read.range.start.max(span.start);
            let end = read.range.end.min(span.end);
            let slice = if start == span.start && end == span.end {
                data
            } else {
                data[(start - span.start) as usize..(end - span.start) as usize].to_vec()
            };
            read.next += 1;
            self.outputs.push_back(Output::ReadData { id, offset: start, data: slice });
        }
        if read.next >= read.end {
            let content = read.content;
            let manifest = read.manifest.clone().expect("planned");
            self.reads.remove(&id);
            self.emit(Output::ReadDone { id, result: Ok(()) });
            self.note_if_held(content, manifest);
        } else {
            self.advance_read(id);
        }
    }

    /// Records a version as held once every chunk of it is here.
    fn note_if_held(&mut self, content: ContentId, manifest: Manifest) {
        if !self.held.contains_key(&content)
            && manifest.chunks.iter().all(|c| self.chunks.contains_key(&c.hash))
        {
            self.hold(manifest.clone(), false);
            self.emit(Output::Cache { chunks: Vec::new(), versions: vec![manifest] });
            self.confirm_staged(content);
        }
    }

    /// The driver handed the client of read `id` one [`Output::ReadData`]: the read may load
    /// or fetch one more chunk. (Taking what a read that is over delivered changes nothing.)
    pub fn handle_read_taken(&mut self, now_ms: u64, id: RequestId) {
        self.now_ms = now_ms;
        let Some(read) = self.reads.get_mut(&id) else { return };
        if read.taken < read.next {
            read.taken += 1;
            self.advance_read(id);
        }
    }

    /// The client of read `id` went away: the read ends without another output, and what it
    /// held (its window, the fetches only it waited for) is let go.
    pub fn handle_read_cancelled(&mut self, now_ms: u64, id: RequestId) {
        self.now_ms = now_ms;
        self.drop_read(id);
    }

    /// The result of an [`Output::LoadChunk`].
    pub fn handle_chunk_loaded(
        &mut self,
        hash: ChunkHash,
        purpose: LoadPurpose,
        loaded: Result<Vec<u8>, String>,
    ) {
        match (purpose, loaded) {
            (LoadPurpose::Peer { to, request }, Ok(data)) => {
                self.emit(Output::Send { to, message: Message::Chunk { request, chunk: hash.0, data } })
            }
            (LoadPurpose::Peer { to, request }, Err(_)) => {
                self.forget_chunk(hash);
                self.emit(Output::Send { to, message: Message::NoChunk { request, chunk: hash.0 } });
            }
            (LoadPurpose::Read { id, index }, Ok(data)) => {
                // The copy here matches its hash; the manifest may still lie about its length
                // (a peer can list a chunk this site holds under a longer one).
                let Some(read) = self.reads.get(&id) else { return };
                let manifest = read.manifest.as_ref().expect("planned");
                let expected = manifest.chunks.get(index).map(|c| c.len as usize);
                if expected != Some(data.len()) {
                    let reason = format!(
                        "the version's manifest gives chunk {index} {} bytes; the chunk has {}",
                        expected.unwrap_or_default(),
                        data.len()
                    );
                    let error = SiteError::Chunk { path: read.path.clone(), chunk: hash, reason };
                    return self.fail_read(id, error);
                }
                self.deliver(id, index, data)
            }
            (LoadPurpose::Read { id, index }, Err(reason)) => {
                // The local copy is gone or corrupt: forget it and fetch the chunk from a peer.
                self.forget_chunk(hash);
                let Some(read) = self.reads.get(&id) else { return };
                let (content, path) = (read.content, read.path.clone());
                let chunk = read.manifest.as_ref().expect("planned").chunks[index];
                if self.fetches.contains_key(&hash) {
                    self.fetches.get_mut(&hash).expect("checked").waiters.push((id, index));
                } else if self.peers.is_empty() {
                    self.fail_read(id, SiteError::Chunk { path, chunk: hash, reason });
                } else {
                    if !self.holders.contains_key(&content) {
                        self.ask_who_has(content);
                    }
                    self.start_fetch(chunk, content, id, index);
                }
            }
        }
    }

    /// A fresh id for a fetch sent.
    fn next_fetch_id(&mut self) -> FetchId {
        self.next_request += 1;
        FetchId(self.next_request - 1)
    }

    /// The driver could not keep the copy of chunk `hash` it was handed ([`Output::Cache`]; the
    /// disk is full): this site does not hold it, nor the versions it is part of.
    pub fn handle_chunk_not_kept(&mut self, hash: ChunkHash) {
        self.forget_chunk(hash);
    }

    // ------------------------------------------------------------------------------------------
    // Peers

    /// A connection to `peer` is up: start a sync session and ask about pending reads.
    pub fn handle_peer_up(&mut self, now_ms: u64, peer: SiteId) {
        self.now_ms = self.now_ms.max(now_ms);
        self.peers.insert(peer.clone(), Peer::new());
        self.sync_with(&peer);
        self.report_frontier(&peer);
        let pending: BTreeSet<ContentId> =
            self.reads.values().filter(|r| r.manifest.is_none()).map(|r| r.content).collect();
        for content in pending {
            self.emit(Output::Send { to: peer.clone(), message: Message::WhoHas { content } });
        }
        self.resend_parked(None);
    }

    /// The connection to `peer` is gone: its fetches go to other holders.
    pub fn handle_peer_down(&mut self, now_ms: u64, peer: &SiteId) {
        self.now_ms = self.now_ms.max(now_ms);
        self.peers.remove(peer);
        self.staging_peer_down(peer);
        let orphaned: Vec<ChunkHash> =
            self.fetches.iter().filter(|(_, f)| &f.from == peer).map(|(h, _)| *h).collect();
        for hash in orphaned {
            self.send_fetch(hash);
        }
    }

    /// At a sync round: starts the session with `peer` afresh if it has been stuck for
    /// [`SYNC_QUIET_ROUNDS_MAX`] rounds.
    fn restart_quiet_session(&mut self, peer: &SiteId) {
        let Some(state) = self.peers.get_mut(peer) else { return };
        let unconfirmed = self.ns.unconfirmed_changes(&state.session);
        let theirs = state.session.their_heads().unwrap_or_default().to_vec();
        let still = state.their_heads_at_round.as_ref() == Some(&theirs);
        state.quiet_rounds = if unconfirmed > 0 && still { state.quiet_rounds + 1 } else { 0 };
        state.their_heads_at_round = Some(theirs);
        if state.quiet_rounds >= SYNC_QUIET_ROUNDS_MAX {
            state.restart();
        }
    }

    fn sync_with(&mut self, peer: &SiteId) {
        let Some(state) = self.peers.get_mut(peer) else { return };
        if let Some(payload) = self.ns.generate_sync_message(&mut state.session) {
            // A sync message may carry this site's changes: never before they are durable.
            self.emit_after_durable(Output::Send { to: peer.clone(), message: Message::Sync { payload } });
        }
    }

    /// `peer` sent a change this site refused: one by a site it does not know holds garbage
    /// collection back (see [`Site::note_stranger`]).
    fn note_refused(&mut self, peer: &SiteId, error: &crdt_namespace::ExchangeError) {
        if let crdt_namespace::ExchangeError::Signature { site, .. } = error {
            self.note_stranger(site, peer);
        }
    }

    fn disconnect(&mut self, peer: &SiteId, reason: String) {
        self.emit(Output::Disconnect { peer: peer.clone(), reason });
        self.handle_peer_down(self.now_ms, peer);
    }

    fn store_namespace(&mut self) {
        let namespace = self.ns.save_incremental();
        self.clock.observe(self.ns.last_hlc());
        self.emit(Output::Durable { store: Store { namespace, ..Store::default() }, then: Vec::new() });
        self.note_references();
    }

    /// The wall clock reads `wall_ms` at monotonic `now_ms`. The driver says so when it starts
    /// the site and now and then (every few hundred milliseconds): it bounds how far ahead an
    /// operation from a peer may be and still be integrated, and releases what was held once
    /// the clock gets there. Until the first reading nothing is held.
    pub fn handle_wall_clock(&mut self, now_ms: u64, wall_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.wall_offset_ms = Some(wall_offset(now_ms, wall_ms));
        self.refresh_clock_bound();
    }

    /// Moves the namespace's clock bound to the wall clock plus `max_clock_ahead_ms`, and
    /// stores what that releases.
    fn refresh_clock_bound(&mut self) {
        let Some(offset) = self.wall_offset_ms else { return };
        let wall = (self.now_ms as i64).saturating_add(offset).max(0) as u64;
        let bound = crdt_namespace::Hlc::new(wall.saturating_add(self.config.max_clock_ahead_ms), u16::MAX);
        if self.ns.set_clock_bound(bound).ops > 0 {
            self.store_namespace();
        }
    }

    /// A message from a connected peer.
    pub fn handle_message(&mut self, now_ms: u64, from: &SiteId, message: Message) {
        self.now_ms = self.now_ms.max(now_ms);
        self.refresh_clock_bound();
        if !self.peers.contains_key(from) {
            return;
        }
        match message {
            Message::Sync { payload } => {
                let state = self.peers.get_mut(from).expect("checked above");
                match self.ns.receive_sync_message(&mut state.session, &payload) {
                    Ok(report) => {
                        if report.ops > 0 {
                            self.store_namespace();
                        }
                        let ours = self.ns.heads();
                        let state = self.peers.get_mut(from).expect("checked above");
                        let heads = (state.session.their_heads().unwrap_or_default().to_vec(), ours);
                        let still = state.heads_at_last.as_ref() == Some(&heads);
                        state.idle = if report.changes == 0 && still { state.idle + 1 } else { 0 };
                        state.heads_at_last = Some(heads);
                        if state.idle >= SYNC_IDLE_MAX {
                            // Stuck: start afresh at the next round rather than answer.
                            state.restart();
                            return;
                        }
                        // While changes are held for the clock bound, a message that brought
                        // nothing new is not answered at once: the peer's heads name what is
                        // held, so each answer would ask for it again, for ever. The next sync
                        // round (or a push) goes on.
                        if report.changes > 0 || (report.held == 0 && !self.ns.holds_changes()) {
                            self.sync_with(from);
                        }
                    }
                    Err(e) => {
                        self.note_refused(from, &e);
                        self.disconnect(from, format!("bad sync message: {e}"))
                    }
                }
            }
            Message::Push { changes } => match self.ns.import(&changes) {
                Ok(report) => {
                    if report.ops > 0 {
                        self.store_namespace();
                    }
                }
                Err(e) => {
                    self.note_refused(from, &e);
                    self.disconnect(from, format!("bad push: {e}"))
                }
            },
            Message::WhoHas { content } => {
                let manifest = self.held.get(&content).map(Manifest::encode);
                self.emit(Output::Send { to: from.clone(), message: Message::Holds { content, manifest } });
            }
            Message::Holds { content, manifest: None } => {
                if let Some(holders) = self.holders.get_mut(&content) {
                    holders.remove(from);
                }
            }
            // Only an answer to what this site asked is kept: a member announcing versions
            // nobody here reads cannot make it remember them.
            Message::Holds { content, manifest: Some(bytes) } if self.asked_about(&content) => {
                self.learn_holder(from, content, &bytes)
            }
            Message::Holds { .. } => {}
            Message::GetChunk { request, chunk, .. } => {
                let hash = ChunkHash(chunk);
                if self.chunks.contains_key(&hash) {
                    self.use_chunk(&hash);
                    self.emit(Output::LoadChunk {
                        hash,
                        purpose: LoadPurpose::Peer { to: from.clone(), request },
                    });
                } else {
                    self.emit(Output::Send {
                        to: from.clone(),
                        message: Message::NoChunk { request, chunk },
                    });
                }
            }
            Message::Chunk { request, chunk, data } => {
                self.receive_chunk(from, request, ChunkHash(chunk), data)
            }
            Message::Stage { region, contents, spoiled } => {
                self.stage_for(from, region, contents, spoiled.map(PackName::from_bytes))
            }
            Message::Staged { region, pack, versions } => {
                self.on_staged(from, region, pack.map(PackName::from_bytes), versions)
            }
            Message::Unstage { region, contents } => self.on_unstage(from, region, contents),
            Message::Seen { frontier } => self.on_seen(from, frontier),
            Message::NoChunk { request, chunk } => {
                let hash = ChunkHash(chunk);
                if self.fetches.get(&hash).is_some_and(|f| f.request == request && &f.from == from) {
                    let content = self.fetches[&hash].content;
                    if let Some(holders) = self.holders.get_mut(&content) {
                        holders.remove(from);
                    }
                    self.send_fetch(hash);
                }
            }
        }
    }

    fn receive_chunk(&mut self, from: &SiteId, request: FetchId, hash: ChunkHash, data: Vec<u8>) {
        let Some(fetch) = self.fetches.get(&hash) else { return };
        if fetch.request != request || &fetch.from != from {
            return;
        }
        if ChunkHash::of(&data) != hash || data.len() != fetch.len as usize {
            // A peer that sends content whose hash does not match is disconnected; its data is
            // dropped and the chunk is asked of another holder.
            return self.disconnect(from, format!("chunk {hash} does not match its hash"));
        }
        self.chunks_fetched += 1;
        self.bytes_fetched += data.len() as u64;
        self.accept_chunk(hash, data);
    }

    /// A fetched chunk, checked: cache it, hand it to its readers, move the reads on.
    fn accept_chunk(&mut self, hash: ChunkHash, mut data: Vec<u8>) {
        let fetch = self.fetches.remove(&hash).expect("accepted chunks were fetched");
        self.add_chunk(hash, data.len() as u32);
        self.emit(Output::Cache { chunks: vec![(hash, data.clone())], versions: Vec::new() });
        let mut waiters = fetch.waiters.into_iter().peekable();
        while let Some((id, index)) = waiters.next() {
            let data = if waiters.peek().is_some() { data.clone() } else { std::mem::take(&mut data) };
            self.deliver(id, index, data);
        }
        let waiting: Vec<RequestId> = self.reads.keys().copied().collect();
        for id in waiting {
            self.advance_read(id);
        }
        self.bound_cache();
    }

    /// Whether this site asked who holds `content` (for a read or a fetch), now or before.
    fn asked_about(&self, content: &ContentId) -> bool {
        self.holders.contains_key(content)
            || self.reads.values().any(|r| r.content == *content)
            || self.fetches.values().any(|f| f.content == *content)
    }

    /// `from` holds `content`, whose manifest it sent: reads waiting for the manifest go on. A
    /// manifest that does not decode or match the version disconnects the peer.
    fn learn_holder(&mut self, from: &SiteId, content: ContentId, bytes: &[u8]) {
        let manifest = match Manifest::decode(bytes) {
            Ok(m) if m.content_id() == content => m,
            Ok(_) => return self.disconnect(from, format!("manifest does not match version {content}")),
            Err(e) => return self.disconnect(from, format!("bad manifest: {e}")),
        };
        let new_holder = self.holders.entry(content).or_default().insert(from.clone());
        if !self.held.contains_key(&content) {
            self.manifests.insert(content, manifest.clone());
        }
        if new_holder {
            // Fetches that waited for a holder go to this one.
            self.resend_parked(Some(content));
        }
        let waiting: Vec<RequestId> = self
            .reads
            .iter()
            .filter(|(_, r)| r.content == content && r.manifest.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.set_manifest(id, manifest.clone());
        }
    }

    /// Sends again the fetches that wait (of `content` only, if given).
    fn resend_parked(&mut self, content: Option<ContentId>) {
        self.resend_parked_if(|c| content.is_none_or(|content| *c == content));
    }

    /// Sends again the fetches that wait whose version `wanted` picks.
    fn resend_parked_if(&mut self, wanted: impl Fn(&ContentId) -> bool) {
        let parked: Vec<ChunkHash> = self
            .fetches
            .iter()
            .filter(|(_, f)| f.parked_since_ms.is_some() && wanted(&f.content))
            .map(|(h, _)| *h)
            .collect();
        for hash in parked {
            self.send_fetch(hash);
        }
    }

    /// When [`Site::handle_timeout`] is next due, in monotonic milliseconds (at or before the
    /// latest time given, if now): the earliest of a fetch that may be late, a read waiting for
    /// "who holds", the next anti-entropy round and staging's timers. Changes only with an input.
    pub fn poll_timeout(&self) -> Option<u64> {
        let fetches = self.fetches.values().filter_map(|f| f.deadline(&self.config));
        let reads = self.reads.values().filter(|r| r.manifest.is_none()).flat_map(|r| {
            [r.asked_at_ms + self.config.who_has_timeout_ms, r.last_ask_ms + self.config.who_has_retry_ms]
        });
        let sync = self.last_sync_ms + self.config.sync_interval_ms;
        fetches.chain(reads).chain([sync]).chain(self.staging_deadline()).chain(self.space_deadline()).min()
    }

    /// Time passes: re-send late fetches, fail reads nobody can serve, run anti-entropy.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.refresh_clock_bound();
        self.staging_timeout(now_ms);
        let late: Vec<ChunkHash> = self
            .fetches
            .iter()
            .filter(|(_, f)| f.deadline(&self.config).is_some_and(|at| at <= now_ms))
            .map(|(h, _)| *h)
            .collect();
        for hash in late {
            self.send_fetch(hash);
        }
        let unanswered: Vec<(RequestId, SiteError)> = self
            .reads
            .iter()
            .filter(|(_, r)| {
                r.manifest.is_none() && now_ms.saturating_sub(r.asked_at_ms) >= self.config.who_has_timeout_ms
            })
            .map(|(id, r)| (*id, SiteError::NoHolder { path: r.path.clone(), content: r.content }))
            .collect();
        for (id, error) in unanswered {
            self.fail_read(id, error);
        }
        let retry = self.config.who_has_retry_ms;
        let mut again = BTreeSet::new();
        for read in self.reads.values_mut() {
            if read.manifest.is_none() && now_ms.saturating_sub(read.last_ask_ms) >= retry {
                read.last_ask_ms = now_ms;
                again.insert(read.content);
            }
        }
        for content in again {
            self.ask_who_has(content);
        }
        if now_ms.saturating_sub(self.last_sync_ms) >= self.config.sync_interval_ms {
            self.last_sync_ms = now_ms;
            let peers: Vec<SiteId> = self.peers.keys().cloned().collect();
            for peer in peers {
                self.restart_quiet_session(&peer);
                self.sync_with(&peer);
                self.report_frontier(&peer);
            }
        }
        self.collect();
    }
}

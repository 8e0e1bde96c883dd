//! The daemon: opens the store, drives the [`Site`] core on its own thread, and serves the
//! local control API on a Unix socket.
//!
//! The core runs on one thread that owns it and the database and executes its outputs in order
//! (so a namespace change is durable before its reply). Connections are tokio tasks; the put
//! path runs on blocking threads and writes chunks straight into the chunk store before asking
//! the core to commit the version.
//!
//! The core thread waits on local commands, mesh events, staging results, the core's next
//! timeout ([`Site::poll_timeout`], on a monotonic clock) and a 200 ms housekeeping timer, and
//! executes outputs at once (loads, read data, answers, chunk traffic, `Disconnect`).
//! It never waits for a client: each request's events go to its connection on a channel with
//! room for all the core may have outstanding for it, because a read loads and fetches at most
//! `read_window_chunks` beyond what its client has taken (the connection says so after writing
//! each piece: [`Site::handle_read_taken`]). A client that stops reading holds its window and
//! nothing else; one that leaves has its read ended (`handle_read_cancelled`). The
//! stores of one round's `Durable` outputs, with their `then` (the `Done` reply, pushes, sync
//! messages), go as one job to the committer thread, which owns the database: it merges every
//! job queued while it was busy (group commit), syncs the chunk files once, commits one redb
//! transaction, then sends the replies and messages in order. `Cache` chunks are written by the
//! core thread at once and join a commit when fetching pauses, when 1,024 wait, or at stop.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use crdt_namespace::{Namespace, SigningKey, SiteId};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::config::{Loaded, check_region};
use crate::staged::StagingDriver;
use crate::store::{ChunkError, ChunkStore, Db};
use crdt_namespace::ContentId;
use site_core::StagingEvent;
use site_core::content::{ChunkHash, ChunkRef, ChunkerConfig};
use site_core::{Holdings, Output, Reply, Request, RequestId, Site, SiteConfig, SiteError};
use transport::p2p::{self, MeshConfig, MeshEvent, MeshHandle, MeshKeypair};
use transport::proto::Message;
use transport::staging::Staging;

/// The node's log filter unless `RUST_LOG` says otherwise. automerge opens an info-level span
/// around every load and transaction and formats its arguments for it: at info that costs the
/// core more than the change itself.
pub const DEFAULT_LOG: &str = "info,automerge=warn";

/// How often the driver looks after its own state: what fetching brought is made durable once
/// fetching pauses, and namespace saves are compacted. (The core's timers are the core's: it
/// says when it needs a timeout.)
const HOUSEKEEPING: Duration = Duration::from_millis(200);
/// Commands queued for the core before connections wait.
const COMMAND_QUEUE: usize = 256;
/// Peer events queued for the core before the streams wait (and with them the senders, through
/// the transports' flow control).
const MESH_EVENT_QUEUE: usize = 64;
/// Queued requests handled before their changes are committed together: bounds the latency one
/// request adds to the others in its commit.
const COMMANDS_PER_COMMIT_MAX: usize = 64;
/// Commits queued for the committer before the core waits for it.
const COMMIT_QUEUE: usize = 64;
/// Incremental namespace saves kept before they are compacted into one.
const NAMESPACE_SAVES_MAX: u64 = 1_000;
/// Fetched chunks written but not yet synced and indexed before they are made durable even while
/// fetches go on (about a gigabyte at the default chunk size).
const CACHE_BACKLOG_CHUNKS_MAX: usize = 1_024;

/// What the core tells a connection.
#[derive(Debug)]
pub enum Event {
    /// The answer to the request.
    Reply(Result<Reply, SiteError>),
    /// Bytes of a read.
    Data(Vec<u8>),
    /// The read is over.
    Done(Result<(), SiteError>),
}

enum Command {
    Local {
        id: RequestId,
        request: Box<Request>,
        events: mpsc::Sender<Event>,
    },
    /// The client of read `id` took one [`Event::Data`].
    Taken(RequestId),
    /// The reclaimer is about to delete chunk files the core said it no longer needs
    /// ([`Output::Reclaim`]): the core keeps those it still does not
    /// hold, the database forgets them, and `done` gets them back to delete.
    Reclaim(Reclaim, std::sync::mpsc::Sender<Vec<ChunkHash>>),
    Stop,
}

/// Versions no longer held and chunks to delete ([`Output::Reclaim`]), or the chunks a failed
/// put wrote ([`Handle::give_back`]).
#[derive(Debug, Default)]
pub(crate) struct Reclaim {
    versions: Vec<ContentId>,
    chunks: Vec<ChunkHash>,
    /// Told once the chunk files are deleted.
    finished: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// The status a daemon ends with when any of its threads panicked.
pub const PANIC_EXIT_CODE: i32 = 70;

/// Makes a panic on any thread of the process end it, with a log line and
/// [`PANIC_EXIT_CODE`]. Without it a panic on a tokio task or a helper thread would leave the
/// daemon half-alive (answering some requests, never others). A restart recovers as after
/// `kill -9`. For the daemon's process only: call it before starting the node.
pub fn exit_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
        tracing::error!(thread, "{info}; the node stops (a restart recovers the store as after kill -9)");
        report(info);
        std::process::exit(PANIC_EXIT_CODE);
    }));
}

/// Where a test makes the daemon panic, to check that it then exits: the environment variable
/// `MERIDIAN_TEST_PANIC` names the core thread (`core`, at its first local request), the
/// committer (`committer`, at its first commit) or a control connection (`connection`, at its
/// first request). Unset in production.
pub(crate) fn test_panic(place: &str) {
    if std::env::var_os("MERIDIAN_TEST_PANIC").is_some_and(|p| p == place) {
        panic!("MERIDIAN_TEST_PANIC={place}: a panic injected by a test");
    }
}

/// The wall clock, in milliseconds since the Unix epoch: only for the stamps of local changes.
pub(crate) fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The core's monotonic clock: milliseconds since the process started it. It never steps, so
/// neither does a timer.
#[derive(Clone, Copy)]
struct Monotonic(Instant);

impl Monotonic {
    fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }

    /// The instant of `ms`.
    fn at(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

/// The opened store of a site.
pub struct Opened {
    /// The core.
    pub site: Site,
    /// The database.
    pub db: Db,
    /// The chunk files.
    pub chunks: Arc<ChunkStore>,
}

/// Opens the site's store (recovering from a crash) and builds its core.
pub fn open(loaded: &Loaded) -> anyhow::Result<Opened> {
    let data = loaded.data_dir();
    std::fs::create_dir_all(&data).with_context(|| format!("creating data directory {}", data.display()))?;
    let chunks = Arc::new(
        ChunkStore::open(&data, loaded.config.reserve_bytes)
            .with_context(|| format!("opening chunk store in {}", data.display()))?,
    );
    let db_path = data.join("meridian.redb");
    let db = Db::open(&db_path).map_err(|e| {
        if e.to_string().contains("already open") {
            anyhow::anyhow!(
                "{} is in use: is another meridian node running for {}?",
                db_path.display(),
                loaded.path.display()
            )
        } else {
            anyhow::anyhow!("opening {}: {e}", db_path.display())
        }
    })?;
    let recovery = db.recover(&chunks)?;
    if recovery.leftover_chunks_removed > 0 || recovery.missing_chunks > 0 {
        tracing::warn!(
            leftover_chunks_removed = recovery.leftover_chunks_removed,
            missing_chunks = recovery.missing_chunks,
            "recovered the store after an unclean stop"
        );
    }
    let site_id = loaded.config.site_id();
    let key = SigningKey::from_secret(
        &p2p::signing_secret(&load_keypair(loaded)?).map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let saved = db.namespace_bytes()?;
    let mut ns = if saved.is_empty() {
        Namespace::new(site_id.clone(), key)
    } else {
        Namespace::load(site_id.clone(), key, &saved)
            .with_context(|| format!("loading the namespace from {}", db_path.display()))?
    };
    let holdings = Holdings { versions: db.versions()?, copies: db.copies()?, chunks: db.chunk_index()? };
    let config = &resolve_former_keys(loaded, &mut ns)?;
    let mut site_config = SiteConfig::new(site_id);
    site_config.region = check_region(&config.region)?;
    (site_config.keys, site_config.regions) = crate::membership::membership(config)?;
    site_config.max_clock_ahead_ms = config.max_clock_ahead_secs.saturating_mul(1000);
    site_config.staging = config.staging.is_some().then_some(config.transfer);
    if let Some(staging) = &config.staging {
        site_config.stage_read_ahead = staging.read_ahead;
    }
    site_config.collect_grace_ms = config.gc_grace_secs.saturating_mul(1000);
    site_config.cache_max_bytes = Some(match config.cache_max_bytes {
        Some(max) => max,
        None => chunks.capacity()? / 2,
    });
    let site = Site::new(site_config, ns, holdings);
    Ok(Opened { site, db, chunks })
}

/// The configuration with a bound on every former key: a key retired while the node was
/// stopped may sign the changes of its site held now, and no later ones. The file is updated.
fn resolve_former_keys(loaded: &Loaded, ns: &mut Namespace) -> anyhow::Result<crate::config::Config> {
    let mut config = loaded.config.clone();
    let mut resolved = false;
    for former in config.former_keys.iter_mut().filter(|f| f.until_seq.is_none()) {
        let site = SiteId::new(&former.site).map_err(anyhow::Error::msg)?;
        let until_seq = ns.last_seq_of(&site);
        tracing::info!(site = %site, peer_id = %former.peer_id, until_seq, "a retired key may sign what its site wrote up to here");
        former.until_seq = Some(until_seq);
        resolved = true;
    }
    if resolved {
        config.save(&loaded.path)?;
    }
    Ok(config)
}

/// This site's peer id, from its key file.
pub fn own_peer_id(loaded: &Loaded) -> anyhow::Result<String> {
    Ok(p2p::peer_id_of(&load_keypair(loaded)?).to_string())
}

/// Reads the site's key pair.
pub fn load_keypair(loaded: &Loaded) -> anyhow::Result<MeshKeypair> {
    let path = loaded.key_file();
    let bytes = std::fs::read(&path).with_context(|| format!("reading the site key {}", path.display()))?;
    MeshKeypair::from_protobuf_encoding(&bytes)
        .map_err(|e| anyhow::anyhow!("the site key {} is not a libp2p key: {e}", path.display()))
}

/// The core's thread: runs commands, peer events, timeouts and outputs until told to stop.
/// What must be durable goes to the [`Committer`] thread, so that the core goes on with reads
/// and requests while the disk syncs.
struct CoreThread {
    site: Site,
    chunks: Arc<ChunkStore>,
    mesh: MeshHandle,
    commits: std::sync::mpsc::SyncSender<Job>,
    /// Incremental namespace saves in the database (at most: the committer merges some).
    namespace_saves: u64,
    /// Where each request's events go. A channel holds every event the core may have
    /// outstanding for one request (the reply, a read's window of data, its end), so sending
    /// never waits for a client.
    pending: HashMap<RequestId, mpsc::Sender<Event>>,
    /// Copies fetched from peers, written but neither synced nor recorded yet: see
    /// [`CoreThread::drain`].
    backlog: CacheBacklog,
    staging: StagingDriver,
    /// The clock of the core's inputs and timers.
    clock: Monotonic,
    /// Fetched copies not kept for want of space.
    space: NotKept,
    /// What the core reclaims goes to the reclaimer thread.
    reclaims: std::sync::mpsc::Sender<Reclaim>,
    /// Reclaims the reclaimer is ready to carry out, confirmed at the end of the turn.
    confirming: Vec<(Reclaim, std::sync::mpsc::Sender<Vec<ChunkHash>>)>,
}

/// Fetched chunks read but not kept for want of space, reported in the log at most once a
/// minute.
#[derive(Default)]
struct NotKept {
    since_report: u64,
    reported: Option<Instant>,
}

impl NotKept {
    fn not_kept(&mut self, error: &ChunkError) {
        self.since_report += 1;
        if self.reported.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            tracing::warn!("{error}: {} fetched chunks were read but not kept", self.since_report);
            self.since_report = 0;
            self.reported = Some(Instant::now());
        }
    }
}

/// Sleeps until `at`, or for ever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Chunks fetched from peers and versions they complete, not yet durable.
#[derive(Default)]
struct CacheBacklog {
    chunks: Vec<ChunkRef>,
    versions: Vec<site_core::content::Manifest>,
    /// `chunks.len()`, for the status of the site.
    count: Arc<AtomicUsize>,
}

/// What woke the core.
enum Wake {
    Command(Option<Command>),
    Mesh(Option<MeshEvent>),
    Staging(Option<StagingEvent>),
    /// The core's next timeout is due.
    Timeout,
    Housekeeping,
}

impl CoreThread {
    fn run(
        mut self,
        runtime: tokio::runtime::Handle,
        mut commands: mpsc::Receiver<Command>,
        mut mesh_events: mpsc::Receiver<MeshEvent>,
        mut staging_events: mpsc::UnboundedReceiver<StagingEvent>,
    ) -> anyhow::Result<()> {
        let mut housekeeping = Instant::now() + HOUSEKEEPING;
        self.site.handle_wall_clock(self.clock.now_ms(), wall_ms());
        'run: loop {
            // Taken once a turn (it scans the core's timers): a deadline that the inputs of
            // this turn bring forward is seen at the next turn, whose sleep then ends at once.
            let due = self.site.poll_timeout();
            let timeout = due.map(|ms| self.clock.at(ms));
            let wake = runtime.block_on(async {
                tokio::select! {
                    biased;
                    command = commands.recv() => Wake::Command(command),
                    event = mesh_events.recv() => Wake::Mesh(event),
                    event = staging_events.recv() => Wake::Staging(event),
                    _ = sleep_until(timeout) => Wake::Timeout,
                    _ = tokio::time::sleep_until(housekeeping.into()) => Wake::Housekeeping,
                }
            });
            match wake {
                Wake::Command(None) | Wake::Command(Some(Command::Stop)) => break,
                Wake::Command(Some(command)) => self.command(command),
                Wake::Mesh(Some(event)) => self.mesh_event(event),
                Wake::Staging(Some(event)) => event.deliver(&mut self.site, self.clock.now_ms()),
                Wake::Mesh(None) | Wake::Staging(None) | Wake::Timeout | Wake::Housekeeping => {}
            }
            // Take what else is queued, so that its changes share one durable commit.
            for _ in 0..COMMANDS_PER_COMMIT_MAX {
                let mut took = false;
                match commands.try_recv() {
                    Ok(Command::Stop) => break 'run,
                    Ok(command) => {
                        took = true;
                        self.command(command);
                    }
                    Err(_) => {}
                }
                if let Ok(event) = mesh_events.try_recv() {
                    took = true;
                    self.mesh_event(event);
                }
                if let Ok(event) = staging_events.try_recv() {
                    took = true;
                    event.deliver(&mut self.site, self.clock.now_ms());
                }
                if !took {
                    break;
                }
            }
            // Checked here, not only when the sleep wins the select: inputs that keep coming
            // must not hold a timeout back.
            let now = self.clock.now_ms();
            if due.is_some_and(|due| due <= now) {
                self.site.handle_timeout(now);
            }
            let mut flush = false;
            if Instant::now() >= housekeeping {
                housekeeping = Instant::now() + HOUSEKEEPING;
                self.compact_if_needed()?;
                self.forget_departed_clients();
                // The bound on peers' clocks moves with this one's (and releases what it held).
                self.site.handle_wall_clock(self.clock.now_ms(), wall_ms());
                // Fetching is over for now: make what it brought durable.
                flush = !self.site.fetching();
            }
            self.drain(flush)?;
        }
        self.drain(true)?;
        Ok(())
    }

    fn mesh_event(&mut self, event: MeshEvent) {
        match event {
            MeshEvent::Up(site) => self.site.handle_peer_up(self.clock.now_ms(), site),
            MeshEvent::Down(site) => self.site.handle_peer_down(self.clock.now_ms(), &site),
            MeshEvent::Message { from, message, budget } => {
                self.site.handle_message(self.clock.now_ms(), &from, message);
                // Its bytes are the core's now (or dropped): the sender may send more.
                drop(budget);
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Local { id, request, events } => {
                test_panic("core");
                self.pending.insert(id, events);
                self.site.handle_local(self.clock.now_ms(), wall_ms(), id, *request);
            }
            Command::Taken(id) => self.site.handle_read_taken(self.clock.now_ms(), id),
            Command::Reclaim(reclaim, done) => self.confirming.push((reclaim, done)),
            Command::Stop => {}
        }
    }

    /// Ends the requests whose clients went away: a read whose client stopped taking its data
    /// and then left would otherwise hold its window for ever.
    fn forget_departed_clients(&mut self) {
        let now = self.clock.now_ms();
        let site = &mut self.site;
        self.pending.retain(|id, events| {
            let departed = events.is_closed();
            if departed {
                site.handle_read_cancelled(now, *id);
            }
            !departed
        });
    }

    fn compact_if_needed(&mut self) -> anyhow::Result<()> {
        if self.namespace_saves > NAMESPACE_SAVES_MAX {
            let whole = self.site.namespace_mut().save();
            self.submit(Job::Compact(whole))?;
            self.namespace_saves = 1;
        }
        Ok(())
    }

    fn submit(&self, job: Job) -> anyhow::Result<()> {
        self.commits.send(job).map_err(|_| anyhow::anyhow!("the committer thread stopped"))
    }

    /// Hands a request's client an event, without waiting: its channel has room for all the
    /// core may have outstanding (see `pending`). A read whose client went away is ended.
    fn send(&mut self, id: RequestId, event: Event, last: bool) {
        let sender = if last { self.pending.remove(&id) } else { self.pending.get(&id).cloned() };
        let Some(sender) = sender else { return };
        if let Err(e) = sender.try_send(event) {
            if matches!(e, mpsc::error::TrySendError::Full(_)) {
                tracing::error!("{id}: its client's queue is full; ending it");
            }
            self.pending.remove(&id);
            self.site.handle_read_cancelled(self.clock.now_ms(), id);
        }
    }

    /// Executes the core's outputs. The stores of [`Output::Durable`]s are merged into one
    /// durable commit (chunk files synced once, then one database transaction) that the
    /// committer carries out; what each says must wait for it (its `then`: the reply that a
    /// change is done, pushes and sync messages) goes with it, and the committer does it after
    /// the commit. Everything else (chunk loads, read data, answers that change nothing, chunk
    /// traffic) is carried out at once, so reads stream with the client's backpressure.
    ///
    /// Copies of what peers hold ([`Output::Cache`]) are written at once (and served from then
    /// on) but synced and recorded later, together: when fetching pauses (`flush`), when
    /// [`CACHE_BACKLOG_CHUNKS_MAX`] chunks wait, and at stop. A sync per arrival would put the
    /// disk's write-back on the path of every pull; a crash before the sync only loses copies
    /// that `Db::recover` removes and a later read fetches again.
    fn drain(&mut self, flush: bool) -> anyhow::Result<()> {
        let mut namespace = Vec::new();
        let mut versions = Vec::new();
        let mut copies = Vec::new();
        let mut refs: Vec<ChunkRef> = Vec::new();
        let mut after_commit: Vec<AfterCommit> = Vec::new();
        let mut reclaims = Vec::new();
        while let Some(output) = self.site.poll_output() {
            match output {
                Output::Reclaim { versions, chunks } => {
                    reclaims.push(Reclaim { versions, chunks, finished: Vec::new() })
                }
                Output::Cache { chunks, versions: held } => {
                    for (hash, data) in &chunks {
                        // The core checked every cached chunk against its hash.
                        match self.chunks.put_copy(hash, data) {
                            Ok(Some(_)) => {
                                self.backlog.chunks.push(ChunkRef { hash: *hash, len: data.len() as u32 })
                            }
                            // Its file is being deleted (the core reclaimed it a moment ago):
                            // no copy is kept; the reads that wanted it have it.
                            Ok(None) => self.site.handle_chunk_not_kept(*hash),
                            // A full disk keeps no copy; the reads that wanted the chunk have it.
                            Err(e @ ChunkError::NoSpace { .. }) => {
                                self.space.not_kept(&e);
                                self.site.handle_chunk_not_kept(*hash);
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    // A chunk not kept (above, or earlier in this drain) made the core drop the
                    // versions it is part of: those are not recorded as held.
                    let site = &self.site;
                    self.backlog.versions.extend(held.into_iter().filter(|m| site.holds(&m.content_id())));
                }
                Output::Durable { store, then } => {
                    refs.extend(store.index);
                    versions.extend(store.versions);
                    // Incremental saves concatenate into one that loads the same.
                    namespace.extend_from_slice(&store.namespace);
                    after_commit.extend(then.into_iter().filter_map(|output| self.after_commit(output)));
                }
                other => self.act(other),
            }
        }
        let backlog = &mut self.backlog;
        if (flush || backlog.chunks.len() >= CACHE_BACKLOG_CHUNKS_MAX)
            && !(backlog.chunks.is_empty() && backlog.versions.is_empty())
        {
            refs.append(&mut backlog.chunks);
            copies.append(&mut backlog.versions);
        }
        backlog.count.store(backlog.chunks.len(), Ordering::Relaxed);
        if !namespace.is_empty() {
            self.namespace_saves += 1;
        }
        let commit = Commit { namespace, versions, copies, refs, after_commit };
        if !commit.is_empty() {
            self.submit(Job::Commit(commit))?;
        }
        // Chunks a reclaim left to a put that has let go of them since: deleted now unless its
        // commit brought them back.
        let undeferred: Vec<ChunkHash> =
            self.chunks.take_undeferred().into_iter().filter(|h| !self.site.holds_chunk(h)).collect();
        if !undeferred.is_empty() {
            reclaims.push(Reclaim { chunks: undeferred, ..Reclaim::default() });
        }
        for reclaim in reclaims {
            // The reclaimer ends only with the node.
            let _ = self.reclaims.send(reclaim);
        }
        self.confirm_reclaims()
    }

    /// Reclaims the reclaimer is ready for: what the core still does not hold is forgotten by
    /// the database, after every commit before it, and dropped from the copies not yet
    /// recorded; of its chunks, those a put claims are deferred ([`ChunkStore::doom`]) and the
    /// reclaimer deletes the others.
    fn confirm_reclaims(&mut self) -> anyhow::Result<()> {
        for (reclaim, done) in std::mem::take(&mut self.confirming) {
            let site = &self.site;
            let versions: Vec<ContentId> = reclaim.versions.into_iter().filter(|v| !site.holds(v)).collect();
            let chunks =
                self.chunks.doom(reclaim.chunks.into_iter().filter(|h| !site.holds_chunk(h)).collect());
            let gone: HashSet<&ChunkHash> = chunks.iter().collect();
            let forgotten: HashSet<&ContentId> = versions.iter().collect();
            let backlog = &mut self.backlog;
            backlog.chunks.retain(|c| !gone.contains(&c.hash));
            backlog.versions.retain(|m| !forgotten.contains(&m.content_id()) && site.holds(&m.content_id()));
            backlog.count.store(backlog.chunks.len(), Ordering::Relaxed);
            self.submit(Job::Forget(Reclaim { versions, chunks, finished: Vec::new() }, done))?;
        }
        Ok(())
    }

    /// What the committer does for an output that waits for a commit.
    /// (Nothing for the answer to a client that went away.)
    fn after_commit(&mut self, output: Output) -> Option<AfterCommit> {
        Some(match output {
            Output::Reply { id, reply } => AfterCommit::Event(self.pending.remove(&id)?, Event::Reply(reply)),
            Output::Send { to, message } => AfterCommit::Send(vec![to], message),
            Output::Broadcast { message: Message::Push { changes }, .. } => {
                AfterCommit::BroadcastPush(changes)
            }
            Output::Broadcast { to, message } => AfterCommit::Send(to, message),
            other => unreachable!("the core never makes {other:?} wait for a commit"),
        })
    }

    fn act(&mut self, output: Output) {
        match output {
            Output::LoadChunk { hash, purpose } => {
                let loaded = self.chunks.get(&hash).map_err(|e| {
                    tracing::error!("{e}");
                    e.to_string()
                });
                self.site.handle_chunk_loaded(hash, purpose, loaded);
            }
            Output::Reply { id, reply } => {
                let read_follows = matches!(reply, Ok(Reply::ReadStarted { .. }));
                self.send(id, Event::Reply(reply), !read_follows);
            }
            Output::ReadData { id, data, .. } => self.send(id, Event::Data(data), false),
            Output::ReadDone { id, result } => self.send(id, Event::Done(result), true),
            Output::Send { to, message } => {
                if let Err(e) = self.mesh.send(&to, message) {
                    // The core learns of the lost link from the mesh and retries elsewhere.
                    tracing::debug!("{e}");
                }
            }
            Output::Disconnect { peer, reason } => self.mesh.disconnect(&peer, reason),
            output @ (Output::StageOpen { .. }
            | Output::StageRead { .. }
            | Output::StageUpload { .. }
            | Output::StageDelete { .. }) => self.staging.execute(output),
            Output::Broadcast { to, message } => {
                for to in to {
                    if let Err(e) = self.mesh.send(&to, message.clone()) {
                        tracing::debug!("{e}");
                    }
                }
            }
            Output::Durable { .. } | Output::Cache { .. } | Output::Reclaim { .. } => {
                unreachable!("stores are committed by drain")
            }
        }
    }
}

/// Work for the committer, in the order the core produced it.
enum Job {
    Commit(Commit),
    /// Replace the namespace log by this whole save.
    Compact(Vec<u8>),
    /// Forget these versions and chunks, then hand the chunks back to the reclaimer.
    Forget(Reclaim, std::sync::mpsc::Sender<Vec<ChunkHash>>),
}

/// One durable commit and what waits for it.
#[derive(Default)]
struct Commit {
    namespace: Vec<u8>,
    /// Versions this site wrote.
    versions: Vec<site_core::content::Manifest>,
    /// Copies of versions other sites wrote.
    copies: Vec<site_core::content::Manifest>,
    /// Chunks written (not yet synced) to index.
    refs: Vec<ChunkRef>,
    after_commit: Vec<AfterCommit>,
}

impl Commit {
    fn is_empty(&self) -> bool {
        self.namespace.is_empty()
            && self.versions.is_empty()
            && self.copies.is_empty()
            && self.refs.is_empty()
            && self.after_commit.is_empty()
    }

    /// Appends `later`, which the core produced after `self`.
    fn merge(&mut self, mut later: Commit) {
        // Incremental saves concatenate into one that loads the same.
        self.namespace.append(&mut later.namespace);
        self.versions.append(&mut later.versions);
        self.copies.append(&mut later.copies);
        self.refs.append(&mut later.refs);
        self.after_commit.append(&mut later.after_commit);
    }
}

/// What is done once a commit is durable.
enum AfterCommit {
    Event(mpsc::Sender<Event>, Event),
    Send(Vec<crdt_namespace::SiteId>, Message),
    BroadcastPush(Vec<u8>),
}

/// The committer's thread: makes the core's stores durable — one chunk sync and one database
/// transaction for every job queued while the previous commit ran (group commit) — then
/// carries out what waited for them, in order.
struct Committer {
    db: Db,
    chunks: Arc<ChunkStore>,
    mesh: MeshHandle,
}

impl Committer {
    fn run(self, jobs: std::sync::mpsc::Receiver<Job>) -> anyhow::Result<()> {
        while let Ok(first) = jobs.recv() {
            let mut group = Commit::default();
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Commit(commit) => group.merge(commit),
                    Job::Compact(whole) => {
                        // The whole save includes every change queued before it.
                        self.commit(std::mem::take(&mut group))?;
                        self.db.compact_namespace(&whole)?;
                    }
                    Job::Forget(reclaim, done) => {
                        self.commit(std::mem::take(&mut group))?;
                        self.db
                            .forget(&reclaim.versions, &reclaim.chunks)
                            .context("forgetting reclaimed chunks")?;
                        // A reclaimer that went away deletes nothing: the files are removed as
                        // leftovers at the next start.
                        let _ = done.send(reclaim.chunks);
                    }
                }
                next = jobs.try_recv().ok();
            }
            self.commit(group)?;
        }
        Ok(())
    }

    fn commit(&self, commit: Commit) -> anyhow::Result<()> {
        test_panic("committer");
        if !commit.refs.is_empty() {
            // One sync for every chunk the puts and fetches of the group wrote.
            self.chunks.sync()?;
        }
        if !commit.namespace.is_empty()
            || !commit.versions.is_empty()
            || !commit.copies.is_empty()
            || !commit.refs.is_empty()
        {
            let versions: Vec<_> = commit.versions.iter().collect();
            let copies: Vec<_> = commit.copies.iter().collect();
            self.db
                .commit(&commit.namespace, &versions, &copies, &commit.refs)
                .context("committing to the database")?;
        }
        for action in commit.after_commit {
            match action {
                // The reply is the request's only event, and a client that went away no longer
                // wants it.
                AfterCommit::Event(sender, event) => drop(sender.try_send(event)),
                AfterCommit::Send(to, message) => {
                    for to in to {
                        if let Err(e) = self.mesh.send(&to, message.clone()) {
                            // The core learns of the lost link from the mesh.
                            tracing::debug!("{e}");
                        }
                    }
                }
                AfterCommit::BroadcastPush(changes) => self.mesh.broadcast_push(changes),
            }
        }
        Ok(())
    }
}

/// The reclaimer's thread: deletes the chunk files the core reclaims ([`Output::Reclaim`]),
/// in batches. It has the core keep what a commit brought back since, leave what a put claims
/// (see `store::claims`) and the database forget the rest ([`Command::Reclaim`]), then deletes
/// those files. Puts go on meanwhile; one that needs a chunk being deleted waits for it.
struct Reclaimer {
    chunks: Arc<ChunkStore>,
    commands: mpsc::Sender<Command>,
}

impl Reclaimer {
    fn run(self, reclaims: std::sync::mpsc::Receiver<Reclaim>) {
        while let Ok(first) = reclaims.recv() {
            let mut batch = first;
            while let Ok(more) = reclaims.try_recv() {
                batch.versions.extend(more.versions);
                batch.chunks.extend(more.chunks);
                batch.finished.extend(more.finished);
            }
            let finished = std::mem::take(&mut batch.finished);
            let (done, confirmed) = std::sync::mpsc::channel();
            if self.commands.blocking_send(Command::Reclaim(batch, done)).is_err() {
                self.chunks.abandon_deleting();
                return;
            }
            // The node stopping (or its store failing) before the database forgot them:
            // nothing is deleted, and puts waiting for a deletion go on.
            let Ok(chunks) = confirmed.recv() else {
                self.chunks.abandon_deleting();
                return;
            };
            let started = Instant::now();
            let mut failed = 0usize;
            for hash in &chunks {
                if let Err(e) = self.chunks.remove_doomed(hash) {
                    failed += 1;
                    tracing::warn!("reclaiming: {e}");
                }
            }
            let ms = started.elapsed().as_millis() as u64;
            tracing::info!(
                chunks = chunks.len(),
                failed,
                ms,
                "deleted chunk files nothing here needs any more"
            );
            for finished in finished {
                let _ = finished.send(());
            }
        }
    }
}

/// A handle on the running core.
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    /// The reclaimer's queue (for what failed puts wrote).
    reclaims: std::sync::mpsc::Sender<Reclaim>,
    pub(crate) mesh: MeshHandle,
    pub(crate) config: Loaded,
    /// Held while the configuration file and the live membership change together.
    pub(crate) config_lock: Arc<tokio::sync::Mutex<()>>,
    /// This site's peer id.
    pub(crate) own_peer_id: String,
    /// This site's public key.
    pub(crate) own_key: crdt_namespace::PublicKey,
    pub(crate) chunks: Arc<ChunkStore>,
    pub(crate) chunker: ChunkerConfig,
    /// Fetched chunks not yet durable.
    pub(crate) cache_backlog: Arc<AtomicUsize>,
    /// Threads hashing and storing the chunks of one put.
    pub(crate) put_workers: usize,
    /// Ids of local requests.
    next_id: Arc<AtomicU64>,
    /// This run of the node (its start's wall time in nanoseconds and its process id): what
    /// tells a follower of the change log that its sequence numbers started again.
    pub(crate) boot: String,
    /// Room for one request's events: its reply, a read's window, its end.
    event_queue: usize,
}

/// The events of one request, as the core sends them.
pub(crate) struct Events {
    id: RequestId,
    events: mpsc::Receiver<Event>,
    commands: mpsc::Sender<Command>,
}

impl Events {
    /// The next event; `None` if the node stopped.
    pub(crate) async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Tells the core that the client took one [`Event::Data`], so the read may load or fetch
    /// one more chunk. A read whose client does not take its data holds a window of
    /// `read_window_chunks` chunks and delays nobody else.
    pub(crate) async fn taken(&self) -> anyhow::Result<()> {
        self.commands.send(Command::Taken(self.id)).await.map_err(|_| anyhow::anyhow!("the node is stopping"))
    }
}

impl Handle {
    /// Sends a request; events come back on the returned channel.
    pub(crate) async fn submit(&self, request: Request) -> anyhow::Result<Events> {
        let (events, rx) = mpsc::channel(self.event_queue);
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.commands
            .send(Command::Local { id, request: Box::new(request), events })
            .await
            .map_err(|_| anyhow::anyhow!("the node is stopping"))?;
        Ok(Events { id, events: rx, commands: self.commands.clone() })
    }

    /// Hands the chunks a failed put wrote to the reclaimer, and waits until it has deleted
    /// those the core does not hold and no other put claims (see `store::claims`).
    pub(crate) async fn give_back(&self, chunks: Vec<ChunkHash>) {
        if chunks.is_empty() {
            return;
        }
        let (finished, done) = tokio::sync::oneshot::channel();
        let reclaim = Reclaim { chunks, finished: vec![finished], ..Reclaim::default() };
        if self.reclaims.send(reclaim).is_ok() {
            // The node stopping first: what stays is removed at the next start.
            let _ = done.await;
        }
    }

    /// Sends a request and waits for its answer.
    pub(crate) async fn call(&self, request: Request) -> anyhow::Result<Result<Reply, SiteError>> {
        let mut rx = self.submit(request).await?;
        match rx.recv().await {
            Some(Event::Reply(reply)) => Ok(reply),
            _ => bail!("the node stopped before answering"),
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(loaded: Loaded) -> anyhow::Result<()> {
    run_until(loaded, stop_signal()).await
}

/// SIGINT or SIGTERM.
pub async fn stop_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut sigterm) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = sigterm.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// [`run`], stopping when `stop` completes instead of at a signal (`meridian node` with a
/// mount unmounts first, then stops the node).
pub async fn run_until(loaded: Loaded, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let socket = loaded.socket();
    if UnixStream::connect(&socket).await.is_ok() {
        bail!("a meridian node is already running for {}", loaded.path.display());
    }
    let _ = std::fs::remove_file(&socket);
    let mut opened = tokio::task::block_in_place(|| open(&loaded))?;
    let status = opened.site.status();
    let (listener, access) = listen_locally(&loaded)?;
    let keypair = load_keypair(&loaded)?;
    let (mesh_events, mesh_event_rx) = mpsc::channel(MESH_EVENT_QUEUE);
    let own_peer_id = p2p::peer_id_of(&keypair).to_string();
    let blocked = loaded
        .config
        .peers
        .iter()
        .filter(|p| p.blocked)
        .map(|p| SiteId::new(&p.site))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    // The namespace's keys: the members' and this site's own (a push may carry this site's
    // changes back).
    let own_key = opened.site.namespace().public_key();
    let keys = opened.site.namespace().keys().clone();
    let mesh_config = MeshConfig {
        keypair,
        listen: loaded.config.listen_addrs(),
        members: loaded.config.members(),
        blocked,
        keys,
    };
    let mesh = p2p::start(mesh_config, mesh_events).await.context("starting the mesh")?;
    let listening: Vec<String> = mesh.listening().iter().map(ToString::to_string).collect();
    tracing::info!(
        site = %loaded.config.site,
        region = %loaded.config.region,
        entries = status.entries,
        versions_held = status.versions_held,
        socket = %socket.display(),
        listen = %listening.join(" "),
        peers = loaded.config.peers.len(),
        "meridian node running"
    );
    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (reclaims, reclaim_rx) = std::sync::mpsc::channel();
    let handle = Handle {
        reclaims: reclaims.clone(),
        commands: commands.clone(),
        mesh: mesh.clone(),
        config: loaded.clone(),
        config_lock: Arc::new(tokio::sync::Mutex::new(())),
        own_peer_id,
        own_key,
        chunks: opened.chunks.clone(),
        chunker: loaded.config.chunker(),
        cache_backlog: Arc::new(AtomicUsize::new(0)),
        put_workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        next_id: Arc::new(AtomicU64::new(1)),
        boot: format!("{}-{}", wall_ms(), std::process::id()),
        event_queue: opened.site.config().read_window_chunks + 2,
    };
    let runtime = tokio::runtime::Handle::current();
    let (staging, staging_rx) = staging_driver(&loaded, &opened.chunks, &runtime)?;
    let (commits, commit_rx) = std::sync::mpsc::sync_channel(COMMIT_QUEUE);
    let namespace_saves = opened.db.namespace_saves()?;
    let committer = Committer { db: opened.db, chunks: opened.chunks.clone(), mesh: mesh.clone() };
    let reclaimer = Reclaimer { chunks: opened.chunks.clone(), commands: commands.clone() };
    std::thread::Builder::new().name("meridian-reclaim".into()).spawn(move || reclaimer.run(reclaim_rx))?;
    let core = CoreThread {
        site: opened.site,
        chunks: opened.chunks,
        mesh: mesh.clone(),
        commits,
        namespace_saves,
        pending: HashMap::new(),
        backlog: CacheBacklog { count: handle.cache_backlog.clone(), ..CacheBacklog::default() },
        staging,
        clock: Monotonic(Instant::now()),
        space: NotKept::default(),
        reclaims,
        confirming: Vec::new(),
    };
    // A store that cannot write is fatal: stop rather than acknowledge what is not durable.
    let (failed, core_failed) = mpsc::unbounded_channel::<String>();
    let committer_failed = failed.clone();
    let committer_thread = std::thread::Builder::new().name("meridian-commit".into()).spawn(move || {
        let result = committer.run(commit_rx);
        if let Err(e) = &result {
            let _ = committer_failed.send(format!("{e:#}"));
        }
        result
    })?;
    let core_thread = std::thread::Builder::new().name("meridian-core".into()).spawn(move || {
        let result = core.run(runtime, command_rx, mesh_event_rx, staging_rx);
        if let Err(e) = &result {
            let _ = failed.send(format!("{e:#}"));
        }
        // `run` consumed the core and its queue to the committer, which ends after the last
        // commit.
        let committed =
            committer_thread.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the committer panicked")));
        result.and(committed)
    })?;

    serve_until_stopped(listener, access, handle, core_failed, stop).await?;
    tracing::info!("stopping");
    mesh.stop();
    let _ = commands.send(Command::Stop).await;
    let result = tokio::task::spawn_blocking(move || core_thread.join()).await?;
    let _ = std::fs::remove_file(&socket);
    match result {
        Ok(result) => result,
        Err(_) => bail!("the core thread panicked"),
    }
}

/// The staging driver, with the bucket of the configuration if it has one (and its sweeper).
fn staging_driver(
    loaded: &Loaded,
    chunks: &Arc<ChunkStore>,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<(StagingDriver, mpsc::UnboundedReceiver<StagingEvent>)> {
    let staging = loaded
        .config
        .staging
        .as_ref()
        .map(|section| {
            Staging::new(&section.client_config()?, &section.secret_bytes()?)
                .context("setting up the staging bucket")
        })
        .transpose()?;
    let (driver, events) = StagingDriver::new(staging, chunks.clone(), runtime.clone());
    if let Some(section) = &loaded.config.staging {
        driver.start_sweeper(Duration::from_secs(section.ttl_hours.saturating_mul(3600)));
    }
    Ok((driver, events))
}

/// Who may use the control socket: the node's own user, root, and the members of a group.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Access {
    uid: u32,
    gid: Option<u32>,
}

impl Access {
    /// Whether a process of `uid`, with primary group `gid`, may use the socket; `groups` reads
    /// its supplementary groups when they matter.
    fn allows(&self, uid: u32, gid: u32, groups: impl FnOnce() -> Vec<u32>) -> bool {
        uid == 0 || uid == self.uid || self.gid.is_some_and(|g| g == gid || groups().contains(&g))
    }
}

/// The supplementary groups of process `pid` (from `/proc`; none if it cannot be read).
fn groups_of(pid: Option<i32>) -> Vec<u32> {
    let Some(status) = pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok()) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default()
}

/// Binds the control socket: mode 0600 (0660 with `control_group`, owned by that group), and
/// the callers checked by their credentials at every connection as well.
fn listen_locally(loaded: &Loaded) -> anyhow::Result<(UnixListener, Access)> {
    use std::os::unix::fs::PermissionsExt;
    let socket = loaded.socket();
    let gid = loaded.config.control_group.as_deref().map(crate::config::group_id).transpose()?;
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("listening on {}", socket.display()))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {}", socket.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&socket, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", socket.display()))?;
    }
    Ok((listener, Access { uid: rustix::process::getuid().as_raw(), gid }))
}

/// Serves control connections until `stop` completes or the core fails.
async fn serve_until_stopped(
    listener: UnixListener,
    access: Access,
    handle: Handle,
    mut core_failed: mpsc::UnboundedReceiver<String>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            Some(error) = core_failed.recv() => {
                tracing::error!("the site stopped: {error}");
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _)) => {
                    let cred = stream.peer_cred();
                    let allowed = cred.as_ref().is_ok_and(|c| access.allows(c.uid(), c.gid(), || groups_of(c.pid())));
                    if !allowed {
                        let who = cred.map(|c| format!("uid {} (pid {:?})", c.uid(), c.pid())).unwrap_or_else(|e| format!("unknown ({e})"));
                        tracing::warn!("refused a control connection from {who}: not the node's user, root or its control_group");
                        tokio::spawn(async move {
                            let error = crate::api::ApiError::new(
                                crate::api::ErrorKind::PermissionDenied,
                                "permission denied: only the node's user, root and the members of its control_group may use this node",
                            );
                            let _ = crate::api::write_answer::<()>(&mut stream, Err(error)).await;
                            // Its request is read (and dropped), so that the caller, still
                            // writing it, reads the answer rather than a broken pipe.
                            let _ = tokio::time::timeout(Duration::from_secs(10), crate::api::read_frame(&mut stream)).await;
                        });
                        continue;
                    }
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        if let Err(e) = crate::control::serve(stream, handle).await {
                            tracing::debug!("control connection ended: {e:#}");
                        }
                    });
                }
                Err(e) => tracing::warn!("accepting a control connection: {e}"),
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_socket_serves_its_user_root_and_its_group_only() {
        let alone = Access { uid: 1000, gid: None };
        let no_groups = || -> Vec<u32> { panic!("read only when a group is configured") };
        assert!(alone.allows(1000, 1000, no_groups));
        assert!(alone.allows(0, 0, no_groups));
        assert!(!alone.allows(1001, 1000, no_groups));
        let shared = Access { uid: 1000, gid: Some(50) };
        assert!(shared.allows(1001, 50, Vec::new), "its primary group");
        assert!(shared.allows(1001, 100, || vec![20, 50]), "a supplementary group");
        assert!(!shared.allows(1001, 100, || vec![20]));
        assert!(groups_of(None).is_empty(), "an unknown caller has no groups");
    }
}

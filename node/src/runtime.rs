//! The daemon: opens the store, drives the [`Site`] core on its own thread, and serves the
//! local control API on a Unix socket.
//!
//! The core runs on one thread that owns it and the database and executes its outputs in order
//! (so a namespace change is durable before its reply). Connections are tokio tasks; the put
//! path runs on blocking threads and writes chunks straight into the chunk store before asking
//! the core to commit the version.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use crdt_namespace::{Glob, Namespace, Query, SiteId, Stat, TagPredicate};
use serde_json::{Value, json};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::api::{self, ApiRequest};
use crate::config::Loaded;
use crate::staged::StagingDriver;
use crate::store::{ChunkStore, Db, put_stream};
use site_core::StagingEvent;
use site_core::content::{ChunkRef, ChunkerConfig};
use site_core::{Output, Reply, Request, RequestId, Site, SiteConfig, SiteError};
use transport::p2p::{self, MeshConfig, MeshEvent, MeshHandle, MeshKeypair};
use transport::proto::Message;
use transport::staging::Staging;

/// The node's log filter unless `RUST_LOG` says otherwise. automerge opens an info-level span
/// around every load and transaction and formats its arguments for it: at info that costs the
/// core more than the change itself.
pub const DEFAULT_LOG: &str = "info,automerge=warn";

/// How often the core gets a timeout input: fetch retries and anti-entropy are timed in seconds,
/// so a fifth of a second is fine-grained enough.
const TICK: Duration = Duration::from_millis(200);
/// Commands queued for the core before connections wait.
const COMMAND_QUEUE: usize = 256;
/// Peer events queued for the core before the streams wait (and with them the senders, through
/// the transports' flow control).
const MESH_EVENT_QUEUE: usize = 64;
/// Events (read data) queued per request before the core waits for the client.
const EVENT_QUEUE: usize = 16;
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
    Local { request: Request, events: mpsc::Sender<Event> },
    Stop,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
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
        ChunkStore::open(&data).with_context(|| format!("opening chunk store in {}", data.display()))?,
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
    let saved = db.namespace_bytes()?;
    let ns = if saved.is_empty() {
        Namespace::new(site_id.clone())
    } else {
        Namespace::load(site_id.clone(), &saved)
            .with_context(|| format!("loading the namespace from {}", db_path.display()))?
    };
    let versions = db.versions()?;
    let index = db.chunk_index()?;
    let config = &loaded.config;
    let mut site_config = SiteConfig::new(site_id);
    site_config.region = config.region.clone();
    site_config.regions = config
        .peers
        .iter()
        .map(|p| (SiteId::new(&p.site).expect("checked when loaded"), p.region.clone()))
        .collect();
    site_config.staging = config.staging.is_some().then_some(config.transfer);
    if let Some(staging) = &config.staging {
        site_config.stage_read_ahead = staging.read_ahead;
    }
    let site = Site::new(site_config, ns, versions, index);
    Ok(Opened { site, db, chunks })
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
    next_id: RequestId,
    pending: HashMap<RequestId, mpsc::Sender<Event>>,
    /// Copies fetched from peers, written but neither synced nor recorded yet: see
    /// [`CoreThread::drain`].
    backlog: CacheBacklog,
    staging: StagingDriver,
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
    Tick,
}

impl CoreThread {
    fn run(
        mut self,
        runtime: tokio::runtime::Handle,
        mut commands: mpsc::Receiver<Command>,
        mut mesh_events: mpsc::Receiver<MeshEvent>,
        mut staging_events: mpsc::UnboundedReceiver<StagingEvent>,
    ) -> anyhow::Result<()> {
        let mut next_tick = std::time::Instant::now() + TICK;
        'run: loop {
            let wake = runtime.block_on(async {
                tokio::select! {
                    biased;
                    command = commands.recv() => Wake::Command(command),
                    event = mesh_events.recv() => Wake::Mesh(event),
                    event = staging_events.recv() => Wake::Staging(event),
                    _ = tokio::time::sleep_until(next_tick.into()) => Wake::Tick,
                }
            });
            match wake {
                Wake::Command(None) | Wake::Command(Some(Command::Stop)) => break,
                Wake::Command(Some(Command::Local { request, events })) => self.local(request, events),
                Wake::Mesh(Some(event)) => self.mesh_event(event),
                Wake::Staging(Some(event)) => event.deliver(&mut self.site, now_ms()),
                Wake::Mesh(None) | Wake::Staging(None) | Wake::Tick => {}
            }
            // Take what else is queued, so that its changes share one durable commit.
            for _ in 0..COMMANDS_PER_COMMIT_MAX {
                let mut took = false;
                match commands.try_recv() {
                    Ok(Command::Local { request, events }) => {
                        took = true;
                        self.local(request, events);
                    }
                    Ok(Command::Stop) => break 'run,
                    Err(_) => {}
                }
                if let Ok(event) = mesh_events.try_recv() {
                    took = true;
                    self.mesh_event(event);
                }
                if let Ok(event) = staging_events.try_recv() {
                    took = true;
                    event.deliver(&mut self.site, now_ms());
                }
                if !took {
                    break;
                }
            }
            let mut flush = false;
            if std::time::Instant::now() >= next_tick {
                next_tick = std::time::Instant::now() + TICK;
                self.site.handle_timeout(now_ms());
                self.compact_if_needed()?;
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
            MeshEvent::Up(site) => self.site.handle_peer_up(now_ms(), site),
            MeshEvent::Down(site) => self.site.handle_peer_down(now_ms(), &site),
            MeshEvent::Message { from, message } => self.site.handle_message(now_ms(), &from, message),
        }
    }

    fn local(&mut self, request: Request, events: mpsc::Sender<Event>) {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, events);
        self.site.handle_local(now_ms(), id, request);
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

    fn send(&mut self, id: RequestId, event: Event, last: bool) {
        let sender = if last { self.pending.remove(&id) } else { self.pending.get(&id).cloned() };
        if let Some(sender) = sender {
            // A client that went away no longer wants its events.
            let _ = sender.blocking_send(event);
        }
    }

    /// Executes the core's outputs. Stores are merged into one durable commit (chunk files
    /// synced once, then one database transaction) that the committer carries out; what must
    /// not happen before that commit — the reply that a change is done, pushing or syncing
    /// namespace changes to peers — goes with it and is done by the committer after it.
    /// Everything else (chunk loads, read data, answers that change nothing, chunk traffic) is
    /// carried out at once, so reads stream with the client's backpressure.
    ///
    /// Copies of what peers hold ([`Output::Cache`]) are written at once (and served from then
    /// on) but synced and recorded later, together: when fetching pauses (`flush`), when
    /// [`CACHE_BACKLOG_CHUNKS_MAX`] chunks wait, and at stop. A sync per arrival would put the
    /// disk's write-back on the path of every pull; a crash before the sync only loses copies
    /// that `Db::recover` removes and a later read fetches again.
    fn drain(&mut self, flush: bool) -> anyhow::Result<()> {
        let mut namespace = Vec::new();
        let mut versions = Vec::new();
        let mut refs: Vec<ChunkRef> = Vec::new();
        let mut after_commit: Vec<AfterCommit> = Vec::new();
        while let Some(output) = self.site.poll_output() {
            match output {
                Output::Cache { chunks, versions: held } => {
                    for (hash, data) in &chunks {
                        // The core checked every cached chunk against its hash.
                        self.chunks.put_verified(hash, data)?;
                        self.backlog.chunks.push(ChunkRef { hash: *hash, len: data.len() as u32 });
                    }
                    self.backlog.versions.extend(held);
                }
                Output::Store { index, versions: held, namespace: delta } => {
                    refs.extend(index);
                    versions.extend(held);
                    // Incremental saves concatenate into one that loads the same.
                    namespace.extend_from_slice(&delta);
                }
                Output::Reply { id, reply: reply @ Ok(Reply::Done) } => {
                    if let Some(sender) = self.pending.remove(&id) {
                        after_commit.push(AfterCommit::Event(sender, Event::Reply(reply)));
                    }
                }
                Output::Broadcast { message: Message::Push { changes }, .. } => {
                    after_commit.push(AfterCommit::BroadcastPush(changes))
                }
                Output::Broadcast { to, message } => {
                    after_commit.extend(to.into_iter().map(|to| AfterCommit::Send(to, message.clone())))
                }
                Output::Send { to, message: message @ (Message::Push { .. } | Message::Sync { .. }) } => {
                    after_commit.push(AfterCommit::Send(to, message))
                }
                other => self.act(other),
            }
        }
        let backlog = &mut self.backlog;
        if (flush || backlog.chunks.len() >= CACHE_BACKLOG_CHUNKS_MAX)
            && !(backlog.chunks.is_empty() && backlog.versions.is_empty())
        {
            refs.append(&mut backlog.chunks);
            versions.append(&mut backlog.versions);
        }
        backlog.count.store(backlog.chunks.len(), Ordering::Relaxed);
        if !namespace.is_empty() {
            self.namespace_saves += 1;
        }
        let commit = Commit { namespace, versions, refs, after_commit };
        if !commit.is_empty() {
            self.submit(Job::Commit(commit))?;
        }
        Ok(())
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
            Output::Store { .. } | Output::Cache { .. } | Output::Broadcast { .. } => {
                unreachable!("stores and broadcasts are committed by drain")
            }
        }
    }
}

/// Work for the committer, in the order the core produced it.
enum Job {
    Commit(Commit),
    /// Replace the namespace log by this whole save.
    Compact(Vec<u8>),
}

/// One durable commit and what waits for it.
#[derive(Default)]
struct Commit {
    namespace: Vec<u8>,
    versions: Vec<site_core::content::Manifest>,
    /// Chunks written (not yet synced) to index.
    refs: Vec<ChunkRef>,
    after_commit: Vec<AfterCommit>,
}

impl Commit {
    fn is_empty(&self) -> bool {
        self.namespace.is_empty()
            && self.versions.is_empty()
            && self.refs.is_empty()
            && self.after_commit.is_empty()
    }

    /// Appends `later`, which the core produced after `self`.
    fn merge(&mut self, mut later: Commit) {
        // Incremental saves concatenate into one that loads the same.
        self.namespace.append(&mut later.namespace);
        self.versions.append(&mut later.versions);
        self.refs.append(&mut later.refs);
        self.after_commit.append(&mut later.after_commit);
    }
}

/// What is done once a commit is durable.
enum AfterCommit {
    Event(mpsc::Sender<Event>, Event),
    Send(crdt_namespace::SiteId, Message),
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
                }
                next = jobs.try_recv().ok();
            }
            self.commit(group)?;
        }
        Ok(())
    }

    fn commit(&self, commit: Commit) -> anyhow::Result<()> {
        if !commit.refs.is_empty() {
            // One sync for every chunk the puts and fetches of the group wrote.
            self.chunks.sync()?;
        }
        if !commit.namespace.is_empty() || !commit.versions.is_empty() || !commit.refs.is_empty() {
            let versions: Vec<_> = commit.versions.iter().collect();
            self.db
                .commit(&commit.namespace, &versions, &commit.refs)
                .context("committing to the database")?;
        }
        for action in commit.after_commit {
            match action {
                // A client that went away no longer wants its events.
                AfterCommit::Event(sender, event) => drop(sender.blocking_send(event)),
                AfterCommit::Send(to, message) => {
                    if let Err(e) = self.mesh.send(&to, message) {
                        // The core learns of the lost link from the mesh.
                        tracing::debug!("{e}");
                    }
                }
                AfterCommit::BroadcastPush(changes) => self.mesh.broadcast_push(changes),
            }
        }
        Ok(())
    }
}

/// A handle on the running core.
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    mesh: MeshHandle,
    config: Loaded,
    chunks: Arc<ChunkStore>,
    chunker: ChunkerConfig,
    /// Fetched chunks not yet durable.
    cache_backlog: Arc<AtomicUsize>,
    /// Threads hashing and storing the chunks of one put.
    put_workers: usize,
}

impl Handle {
    /// Sends a request; events come back on the returned channel.
    async fn submit(&self, request: Request) -> anyhow::Result<mpsc::Receiver<Event>> {
        let (events, rx) = mpsc::channel(EVENT_QUEUE);
        self.commands
            .send(Command::Local { request, events })
            .await
            .map_err(|_| anyhow::anyhow!("the node is stopping"))?;
        Ok(rx)
    }

    /// Sends a request and waits for its answer.
    async fn call(&self, request: Request) -> anyhow::Result<Result<Reply, SiteError>> {
        let mut rx = self.submit(request).await?;
        match rx.recv().await {
            Some(Event::Reply(reply)) => Ok(reply),
            _ => bail!("the node stopped before answering"),
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(loaded: Loaded) -> anyhow::Result<()> {
    let socket = loaded.socket();
    if UnixStream::connect(&socket).await.is_ok() {
        bail!("a meridian node is already running for {}", loaded.path.display());
    }
    let _ = std::fs::remove_file(&socket);
    let mut opened = tokio::task::block_in_place(|| open(&loaded))?;
    let status = opened.site.status();
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("listening on {}", socket.display()))?;
    let keypair = load_keypair(&loaded)?;
    let (mesh_events, mesh_event_rx) = mpsc::channel(MESH_EVENT_QUEUE);
    let mesh_config =
        MeshConfig { keypair, listen: loaded.config.listen_addrs(), members: loaded.config.members() };
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
    let handle = Handle {
        commands: commands.clone(),
        mesh: mesh.clone(),
        config: loaded.clone(),
        chunks: opened.chunks.clone(),
        chunker: loaded.config.chunker(),
        cache_backlog: Arc::new(AtomicUsize::new(0)),
        put_workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let staging = loaded
        .config
        .staging
        .as_ref()
        .map(|section| {
            Staging::new(&section.client_config()?, &section.secret_bytes()?)
                .context("setting up the staging bucket")
        })
        .transpose()?;
    let runtime = tokio::runtime::Handle::current();
    let (staging, staging_rx) = StagingDriver::new(staging, opened.chunks.clone(), runtime.clone());
    if let Some(section) = &loaded.config.staging {
        staging.start_sweeper(Duration::from_secs(section.ttl_hours.saturating_mul(3600)));
    }
    let (commits, commit_rx) = std::sync::mpsc::sync_channel(COMMIT_QUEUE);
    let namespace_saves = opened.db.namespace_saves()?;
    let committer = Committer { db: opened.db, chunks: opened.chunks.clone(), mesh: mesh.clone() };
    let core = CoreThread {
        site: opened.site,
        chunks: opened.chunks,
        mesh: mesh.clone(),
        commits,
        namespace_saves,
        next_id: 1,
        pending: HashMap::new(),
        backlog: CacheBacklog { count: handle.cache_backlog.clone(), ..CacheBacklog::default() },
        staging,
    };
    // A store that cannot write is fatal: stop rather than acknowledge what is not durable.
    let (failed, mut core_failed) = mpsc::unbounded_channel::<String>();
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

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            biased;
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            Some(error) = core_failed.recv() => {
                tracing::error!("the site stopped: {error}");
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, handle).await {
                            tracing::debug!("control connection ended: {e:#}");
                        }
                    });
                }
                Err(e) => tracing::warn!("accepting a control connection: {e}"),
            },
        }
    }
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

fn reply_json(reply: Result<Reply, SiteError>) -> Value {
    match reply {
        Ok(reply) => api::ok(reply_value(reply)),
        Err(e) => api::error(e),
    }
}

/// A reply as JSON.
pub fn reply_value(reply: Reply) -> Value {
    match reply {
        Reply::Done => Value::Null,
        Reply::Stat(stat) => stat_value(&stat),
        Reply::List(entries) => Value::Array(
            entries.iter().map(|e| json!({ "name": e.name, "stat": stat_value(&e.stat) })).collect(),
        ),
        Reply::Tags(tags) => {
            Value::Array(tags.iter().map(|t| json!({ "key": t.key, "value": t.value, "source": t.source })).collect())
        }
        Reply::Found(hits) => Value::Array(
            hits.iter()
                .map(|h| {
                    json!({
                        "path": h.path,
                        "tags": h.tags.iter().map(|t| json!({ "key": t.key, "value": t.value, "source": t.source })).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        ),
        Reply::ReadStarted { size, range } => json!({ "size": size, "start": range.start, "end": range.end }),
        Reply::Status(s) => json!({
            "site": s.site,
            "peers": s.peers.iter().map(|(site, lag)| json!({ "site": site, "lag_changes": lag })).collect::<Vec<_>>(), "entries": s.entries, "versions_held": s.versions_held,
            "chunks_held": s.chunks_held, "reads": s.reads, "fetches": s.fetches,
            "chunks_fetched": s.chunks_fetched, "bytes_fetched": s.bytes_fetched,
            "bytes_from_staging": s.bytes_from_staging, "bytes_to_staging": s.bytes_to_staging, "staged_packs": s.staged_packs,
        }),
    }
}

fn stat_value(stat: &Stat) -> Value {
    json!({
        "id": stat.id,
        "kind": format!("{:?}", stat.kind).to_lowercase(),
        "size": stat.size,
        "mode": stat.mode,
        "mtime_ns": stat.mtime_ns,
        "version": stat.version.as_ref().map(|v| json!({
            "id": v.id, "content": v.content.to_string(), "size": v.size, "site": v.site, "hlc": v.hlc.to_string(),
        })),
        "symlink_target": stat.symlink_target,
        "tags": stat.tags.iter().map(|(k, v)| match v {
            crdt_namespace::TagValue::Set(v) => json!({ "key": k, "value": &**v }),
            crdt_namespace::TagValue::Unset => json!({ "key": k, "unset": true }),
        }).collect::<Vec<_>>(),
    })
}

/// Serves one control connection.
async fn serve(mut stream: UnixStream, handle: Handle) -> anyhow::Result<()> {
    let Some(frame) = api::read_frame(&mut stream).await? else { return Ok(()) };
    let request: ApiRequest = match serde_json::from_slice(&frame) {
        Ok(r) => r,
        Err(e) => return Ok(api::write_json(&mut stream, &api::error(format!("bad request: {e}"))).await?),
    };
    let simple = |r: Request| Some(r);
    let request = match request {
        ApiRequest::Put { path, mode } => return serve_put(stream, handle, path, mode).await,
        ApiRequest::Read { path, start, end } => {
            let range = match (start, end) {
                (None, None) => None,
                (s, e) => Some(s.unwrap_or(0)..e.unwrap_or(u64::MAX)),
            };
            return serve_read(stream, handle, Request::Read { path, range }).await;
        }
        ApiRequest::Mkdir { path, parents } => simple(Request::Mkdir { path, parents, mode: 0o755 }),
        ApiRequest::Mv { from, to } => simple(Request::Rename { from, to }),
        ApiRequest::Rm { path, recursive } => simple(Request::Remove { path, recursive }),
        ApiRequest::Ls { path } => simple(Request::List { path }),
        ApiRequest::Stat { path } => simple(Request::Stat { path }),
        ApiRequest::TagSet { path, key, value } => simple(Request::SetTag { path, key, value }),
        ApiRequest::TagUnset { path, key } => simple(Request::UnsetTag { path, key }),
        ApiRequest::TagGet { path } => simple(Request::Tags { path }),
        ApiRequest::Find { tags, path } => {
            let query = (|| -> Result<Query, crdt_namespace::OpError> {
                Ok(Query {
                    tags: tags.iter().map(|t| TagPredicate::parse(t)).collect::<Result<_, _>>()?,
                    path: path.as_deref().map(Glob::new).transpose()?,
                })
            })();
            match query {
                Ok(query) => simple(Request::Find { query }),
                Err(e) => return Ok(api::write_json(&mut stream, &api::error(e)).await?),
            }
        }
        ApiRequest::Status => {
            let mut answer = reply_json(handle.call(Request::Status).await?);
            if let Some(status) = answer.get_mut("ok").and_then(Value::as_object_mut) {
                let backlog = handle.cache_backlog.load(Ordering::Relaxed);
                status.insert("fetched_chunks_not_yet_durable".into(), backlog.into());
            }
            return Ok(api::write_json(&mut stream, &answer).await?);
        }
        ApiRequest::MeshLs => {
            let answer = match mesh_links(&handle).await {
                Ok(links) => api::ok(links),
                Err(e) => api::error(format!("{e:#}")),
            };
            return Ok(api::write_json(&mut stream, &answer).await?);
        }
        ApiRequest::MeshBlock { site, blocked } => {
            let answer = match crdt_namespace::SiteId::new(&site) {
                Ok(id) if handle.mesh.set_blocked(&id, blocked) => api::ok(Value::Null),
                Ok(_) => api::error(format!("{site} is not a member of this site's mesh")),
                Err(e) => api::error(e),
            };
            return Ok(api::write_json(&mut stream, &answer).await?);
        }
        ApiRequest::MeshAdd { peer } => {
            let answer = match peer.member() {
                Ok(member) => {
                    let site = member.site.clone();
                    handle.mesh.add_member(member);
                    match handle.call(Request::Member { site, region: peer.region.clone() }).await? {
                        Ok(_) => api::ok(Value::Null),
                        Err(e) => api::error(e),
                    }
                }
                Err(e) => api::error(format!("{e:#}")),
            };
            return Ok(api::write_json(&mut stream, &answer).await?);
        }
    };
    let reply = handle.call(request.expect("every simple request")).await?;
    api::write_json(&mut stream, &reply_json(reply)).await?;
    Ok(())
}

/// The members, their links and lags, as JSON for `meridian mesh ls`.
async fn mesh_links(handle: &Handle) -> anyhow::Result<Value> {
    // The file, not the configuration the node started with: `mesh add` may have changed it.
    let config = crate::config::Config::load(&handle.config.path)?.config;
    let lags: HashMap<String, usize> = match handle.call(Request::Status).await? {
        Ok(Reply::Status(status)) => status.peers.into_iter().collect(),
        _ => HashMap::new(),
    };
    let links = handle.mesh.links();
    let rows = config
        .peers
        .iter()
        .map(|p| {
            let link = links.iter().find(|l| l.member.site.as_str() == p.site);
            let (state, addr) = match link.map(|l| &l.state) {
                Some(p2p::LinkState::Connected { transport, addr }) => {
                    (format!("up ({transport})"), addr.to_string())
                }
                Some(p2p::LinkState::Down { last_error: Some(e) }) => {
                    (format!("down: {}", e.chars().take(60).collect::<String>()), String::new())
                }
                Some(p2p::LinkState::Down { last_error: None }) => ("connecting".to_owned(), String::new()),
                Some(p2p::LinkState::Blocked) => ("blocked".to_owned(), String::new()),
                None => ("not admitted".to_owned(), String::new()),
            };
            json!({
                "site": p.site,
                "region": p.region,
                "peer_id": p.peer_id,
                "addrs": p.addrs,
                "link": state,
                "addr": addr,
                "since_ms": link.map(|l| l.since_ms),
                "lag_changes": lags.get(&p.site),
            })
        })
        .collect();
    Ok(Value::Array(rows))
}

/// Reads data frames from a channel, for the blocking put pipeline.
struct FrameReader {
    frames: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
}

impl Read for FrameReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            match self.frames.blocking_recv() {
                Some(frame) => {
                    self.current = frame;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

async fn serve_put(mut stream: UnixStream, handle: Handle, path: String, mode: u32) -> anyhow::Result<()> {
    // Fail before any byte moves if the path cannot take a file.
    let parent = match path.rfind('/') {
        Some(0) => "/".to_owned(),
        Some(i) => path[..i].to_owned(),
        None => path.clone(),
    };
    match handle.call(Request::Stat { path: parent.clone() }).await? {
        Ok(Reply::Stat(stat)) if stat.kind == crdt_namespace::EntryKind::Dir => {}
        Ok(_) => {
            return Ok(api::write_json(&mut stream, &api::error(format!("not a directory: {parent}"))).await?);
        }
        Err(e) => return Ok(api::write_json(&mut stream, &api::error(e)).await?),
    }
    if let Ok(Reply::Stat(stat)) = handle.call(Request::Stat { path: path.clone() }).await?
        && stat.kind != crdt_namespace::EntryKind::File
    {
        let what =
            if stat.kind == crdt_namespace::EntryKind::Dir { "is a directory" } else { "is a symlink" };
        return Ok(api::write_json(&mut stream, &api::error(format!("{what}: {path}"))).await?);
    }
    api::write_json(&mut stream, &api::ok(json!("ready"))).await?;
    let (frames, frame_rx) = mpsc::channel::<Vec<u8>>(8);
    let chunks = handle.chunks.clone();
    let chunker = handle.chunker;
    let workers = handle.put_workers;
    let put = tokio::task::spawn_blocking(move || {
        let reader = FrameReader { frames: frame_rx, current: Vec::new(), at: 0 };
        put_stream(reader, chunker, &chunks, workers, &mut |_| {})
    });
    let mut complete = false;
    while let Some(frame) = api::read_frame(&mut stream).await? {
        if frame.is_empty() {
            complete = true;
            break;
        }
        if frames.send(frame).await.is_err() {
            break;
        }
    }
    drop(frames);
    let outcome = put.await?;
    if !complete {
        bail!("the client went away before the end of the data; nothing was recorded");
    }
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => return Ok(api::write_json(&mut stream, &api::error(e)).await?),
    };
    let mtime_ns = (now_ms() as i64).saturating_mul(1_000_000);
    let size = outcome.manifest.size;
    let request = Request::CommitVersion { path: path.clone(), manifest: outcome.manifest, mode, mtime_ns };
    let answer = match handle.call(request).await? {
        Ok(_) => api::ok(
            json!({ "path": path, "size": size, "new_chunks": outcome.new_chunks, "new_bytes": outcome.new_bytes }),
        ),
        Err(e) => api::error(e),
    };
    api::write_json(&mut stream, &answer).await?;
    Ok(())
}

async fn serve_read(mut stream: UnixStream, handle: Handle, request: Request) -> anyhow::Result<()> {
    let mut events = handle.submit(request).await?;
    while let Some(event) = events.recv().await {
        match event {
            Event::Reply(reply) => {
                let failed = reply.is_err();
                api::write_json(&mut stream, &reply_json(reply)).await?;
                if failed {
                    return Ok(());
                }
            }
            Event::Data(data) => {
                for piece in data.chunks(api::DATA_FRAME_BYTES) {
                    api::write_frame(&mut stream, piece).await?;
                }
            }
            Event::Done(result) => {
                api::write_frame(&mut stream, &[]).await?;
                let status = match result {
                    Ok(()) => api::ok(Value::Null),
                    Err(e) => api::error(e),
                };
                api::write_json(&mut stream, &status).await?;
                return Ok(());
            }
        }
    }
    bail!("the node stopped during the read")
}

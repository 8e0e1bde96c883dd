//! The libp2p binding: carries [`Message`]s between the sites of the mesh.
//!
//! - Transports: QUIC (TLS 1.3 via rustls) first, TCP with Noise and Yamux as fallback. A peer's
//!   addresses are dialled one at a time in the order the configuration lists them.
//! - Membership gates every connection: a peer id that is not a member is disconnected as soon
//!   as the handshake has authenticated it, before any of its messages is read.
//! - Fresh namespace changes are published on a gossipsub topic (signed, strictly validated);
//!   everything else — sync sessions, "who holds", chunk requests and chunks — goes over one
//!   stream per direction and peer (`/meridian/1`), framed as a little-endian `u32` length and a
//!   [`Message`]. Requests are pipelined (the core keeps several in flight); flow control is the
//!   stream's (QUIC or Yamux windows) plus a bounded queue per peer.
//! - A peer that sends a malformed frame is disconnected and the frame dropped. Lost peers are
//!   redialled with exponential backoff.
//! - Which connection to keep per member, when to redial and when the site hears that a link
//!   is up or down are decided by the link table (`links`), a pure state machine with its own
//!   tests; the swarm task only turns swarm events into its inputs and its actions into swarm
//!   calls.
//!
//! This module does no protocol logic: it hands messages to the node's core and sends what the
//! core asks. It never blocks the caller: [`MeshHandle::send`] queues or fails at once.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crdt_namespace::SiteId;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::core::ConnectedPoint;
use libp2p::identity::{Keypair, PeerId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{StreamProtocol, Swarm, allow_block_list, gossipsub, identify, noise, tcp, yamux};
use tokio::sync::mpsc;

pub use libp2p::identity::Keypair as MeshKeypair;
pub use libp2p::multiaddr::{self, Multiaddr, Protocol};

use crate::proto::{MESSAGE_MAX_BYTES, Message, ProtoError};

mod links;

use links::{Action, Input, LinkEntry, Links};

/// The stream protocol of site-to-site messages.
pub const STREAM_PROTOCOL: StreamProtocol = StreamProtocol::new("/meridian/1");
/// The gossipsub topic of namespace pushes.
/// The gossipsub topic fresh namespace changes are published on.
pub const PUSH_TOPIC: &str = "meridian/namespace/1";
/// The identify protocol name.
const IDENTIFY_PROTOCOL: &str = "/meridian/id/1";

/// Messages queued for one peer before it counts as not keeping up. A well-behaved peer has at
/// most the core's fetch window of chunk requests outstanding (16), plus sync and "who holds"
/// traffic; 1,024 is far above that and bounds the memory a slow or hostile peer can pin.
const PEER_QUEUE_MESSAGES: usize = 1_024;
/// Bytes queued for one peer before it counts as not keeping up (the messages' payloads). A
/// well-behaved peer asks for at most its fetch window of chunks (16) of at most 16 MiB each;
/// a peer that asks for more than it reads is disconnected here instead of pinning memory.
const PEER_QUEUE_BYTES: usize = 320 << 20;
/// Inbound streams read at once per member. A member opens one per link; a replaced link's
/// stream may still be open while the new one starts. A further stream ends the oldest: a
/// member opening streams by the thousand keeps at most this many readers here.
const PEER_INBOUND_STREAMS: usize = 4;
/// Bytes of a member's frames held here at once: being read, or read and waiting for the core
/// to take them (see [`InboundBudget`]). One frame of the largest size fits; a member sending
/// more waits (its streams' flow control pushes back) instead of growing this site's memory.
const PEER_INBOUND_BYTES: usize = MESSAGE_MAX_BYTES;
/// Largest push published on gossipsub. Larger pushes go over the streams instead, so that
/// gossipsub's per-message memory stays small.
const GOSSIP_MESSAGE_MAX_BYTES: usize = 1 << 20;
/// How often the swarm task looks for members to redial.
const REDIAL_TICK: Duration = Duration::from_millis(250);
/// A connection without traffic is kept this long; QUIC keep-alives and the open streams keep
/// member links up well within it.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(3600);
/// Attempts at opening a link's stream before the member is disconnected, and the pause
/// between them: enough to step past a connection that is closing at that moment.
const STREAM_OPEN_ATTEMPTS: u32 = 3;
const STREAM_OPEN_RETRY: Duration = Duration::from_millis(50);
/// A QUIC connection silent this long is lost; keep-alives go out well within it.
const QUIC_IDLE_TIMEOUT_MS: u32 = 5_000;
const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// QUIC flow-control windows: the core keeps up to 16 chunks of up to 4 MiB in flight per peer,
/// so a stream must be allowed to have that much unacknowledged data on a fast link.
const QUIC_STREAM_WINDOW_BYTES: u32 = 64 << 20;
const QUIC_CONNECTION_WINDOW_BYTES: u32 = 96 << 20;
/// Largest UDP payload path MTU discovery may probe for: packets start at the safe 1,200 bytes
/// and grow to what the path carries (1,500-byte Ethernet, 9,000-byte jumbo frames, loopback),
/// so a fast path is not cut into thousands of small packets, each encrypted on its own.
const QUIC_MTU_UPPER_BOUND: u16 = 65_527;

/// A site of the mesh, as the configuration lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its site id.
    pub site: SiteId,
    /// Its libp2p identity.
    pub peer: PeerId,
    /// Where to dial it, in order of preference.
    pub addrs: Vec<Multiaddr>,
}

/// What the mesh needs to start.
pub struct MeshConfig {
    /// This site's key pair.
    pub keypair: Keypair,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// The other sites.
    pub members: Vec<Member>,
    /// Members whose links are cut from the start (`mesh block` persists).
    pub blocked: Vec<SiteId>,
    /// The keys every namespace change in a push must be signed with (this site's among them):
    /// a push is checked before gossipsub relays it.
    pub keys: crdt_namespace::Keys,
}

/// What the mesh tells the node.
#[derive(Debug)]
pub enum MeshEvent {
    /// A member is connected and messages to it can be sent.
    Up(SiteId),
    /// The last connection to a member closed.
    Down(SiteId),
    /// A message from a member.
    Message {
        /// The member that sent it (for a push: the member that relayed it).
        from: SiteId,
        /// The message.
        message: Message,
        /// The message's share of its sender's inbound budget, given back when the event is
        /// dropped: the receiver keeps the event until it has handled the message.
        budget: InboundBudget,
    },
}

/// A received frame's bytes, counted against its sender's [`PEER_INBOUND_BYTES`] until dropped.
#[derive(Debug, Default)]
pub struct InboundBudget {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The state of the link to a member, for `meridian mesh ls`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Connected over this transport to this address.
    Connected {
        /// `quic` or `tcp`.
        transport: &'static str,
        /// The peer's address.
        addr: Multiaddr,
    },
    /// Cut by the operator (`meridian mesh block`): no connection is made or accepted.
    Blocked,
    /// Not connected; the next dial is scheduled.
    Down {
        /// Why the last dial or connection failed, if one did.
        last_error: Option<String>,
    },
}

/// A member and the state of its link.
#[derive(Clone, Debug)]
pub struct Link {
    /// The member.
    pub member: Member,
    /// Its link.
    pub state: LinkState,
    /// Milliseconds since the state last changed.
    pub since_ms: u64,
}

/// Why a message could not be handed to the network.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The site is not a member or not connected.
    #[error("site {0} is not connected")]
    NotConnected(SiteId),
    /// The peer does not read its messages fast enough; it is being disconnected.
    #[error("site {0} is not keeping up with its messages")]
    Overloaded(SiteId),
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The transports could not be built.
    #[error("building the libp2p transports: {0}")]
    Transport(String),
    /// A listen address was refused.
    #[error("listening on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    members: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    identify: identify::Behaviour,
    gossipsub: gossipsub::Behaviour,
    streams: libp2p_stream::Behaviour,
}

enum Command {
    /// A push, encoded.
    Publish(Vec<u8>),
    Disconnect {
        site: SiteId,
        reason: String,
    },
    AddMember(Member),
    RemoveMember {
        peer: PeerId,
    },
    SetKeys(crdt_namespace::Keys),
    Block {
        peer: PeerId,
        blocked: bool,
    },
    Stop,
}

/// What the swarm task shares with the handles.
#[derive(Default)]
struct Shared {
    /// The members and the states of their links, as the link table last had them.
    links: Vec<LinkEntry>,
    /// Queues of connected members, by site.
    queues: HashMap<SiteId, OutQueue>,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // A panic while holding the lock leaves plain maps behind; they stay usable.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// A handle on the running mesh. Cheap to clone.
#[derive(Clone)]
pub struct MeshHandle {
    shared: Arc<Mutex<Shared>>,
    commands: mpsc::UnboundedSender<Command>,
    /// The addresses the swarm listens on, once bound.
    listening: Arc<Mutex<Vec<Multiaddr>>>,
}

impl MeshHandle {
    /// Queues `message` for `to`. Never blocks.
    pub fn send(&self, to: &SiteId, message: Message) -> Result<(), SendError> {
        let queue = lock(&self.shared).queues.get(to).cloned();
        let Some(queue) = queue else { return Err(SendError::NotConnected(to.clone())) };
        match queue.push(message) {
            Ok(()) => Ok(()),
            Err(Pushed::Closed) => Err(SendError::NotConnected(to.clone())),
            Err(Pushed::Full(what)) => {
                self.disconnect(to, format!("its message queue is full ({what})"));
                Err(SendError::Overloaded(to.clone()))
            }
        }
    }

    /// Sends fresh namespace changes to every connected member over its stream, and publishes
    /// them on gossipsub (if small enough) for the members reached only through others.
    ///
    /// The direct send is not a duplicate for nothing: gossipsub (0.50) shares one queue between
    /// the connections to a peer and wakes only the handler that polled it last, so when one of
    /// two connections to a member closes (both sides dialled at once) the other may not send
    /// what is queued until something else wakes it — measured as pushes arriving only with the
    /// next sync round, seconds later. A member that gets a push twice applies it once.
    pub fn broadcast_push(&self, changes: Vec<u8>) {
        let message = Message::Push { changes };
        let sites: Vec<SiteId> = lock(&self.shared).queues.keys().cloned().collect();
        self.send_each(&sites, &message);
        let encoded = message.encode();
        if encoded.len() <= GOSSIP_MESSAGE_MAX_BYTES {
            let _ = self.commands.send(Command::Publish(encoded));
        }
    }

    fn send_each(&self, sites: &[SiteId], message: &Message) {
        for site in sites {
            if let Err(e) = self.send(site, message.clone()) {
                tracing::debug!("push to {site}: {e}");
            }
        }
    }

    /// Drops every connection to `site`; it will be redialled.
    pub fn disconnect(&self, site: &SiteId, reason: String) {
        let _ = self.commands.send(Command::Disconnect { site: site.clone(), reason });
    }

    /// Cuts (`true`) or restores the link to member `site`; false if it is not a member.
    pub fn set_blocked(&self, site: &SiteId, blocked: bool) -> bool {
        let peer = lock(&self.shared).links.iter().find(|l| &l.member.site == site).map(|l| l.member.peer);
        let Some(peer) = peer else { return false };
        self.commands.send(Command::Block { peer, blocked }).is_ok()
    }

    /// Admits a new member and dials it. A new peer id for a member's site replaces its old
    /// one (a rotated key): the old one is refused at once.
    pub fn add_member(&self, member: Member) {
        let _ = self.commands.send(Command::AddMember(member));
    }

    /// The keys pushes are checked with from now on (after a membership change).
    pub fn set_keys(&self, keys: crdt_namespace::Keys) {
        let _ = self.commands.send(Command::SetKeys(keys));
    }

    /// Removes member `site`: its connections close and it is refused from now on; false if it
    /// is not a member.
    pub fn remove_member(&self, site: &SiteId) -> bool {
        let peer = lock(&self.shared).links.iter().find(|l| &l.member.site == site).map(|l| l.member.peer);
        let Some(peer) = peer else { return false };
        self.commands.send(Command::RemoveMember { peer }).is_ok()
    }

    /// The members and the state of their links.
    pub fn links(&self) -> Vec<Link> {
        let now = Instant::now();
        let mut links: Vec<Link> = lock(&self.shared)
            .links
            .iter()
            .map(|l| Link {
                member: l.member.clone(),
                state: l.state.clone(),
                since_ms: now.saturating_duration_since(l.since).as_millis() as u64,
            })
            .collect();
        links.sort_by(|a, b| a.member.site.cmp(&b.member.site));
        links
    }

    /// The addresses the mesh listens on.
    pub fn listening(&self) -> Vec<Multiaddr> {
        self.listening.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the mesh: closes every connection.
    pub fn stop(&self) {
        let _ = self.commands.send(Command::Stop);
    }
}

/// A member's outbound queue, bounded in messages and in bytes (see [`queued_bytes`]): the
/// bytes are counted when a message is queued and given back once its writer has written it.
#[derive(Clone)]
struct OutQueue {
    messages: mpsc::Sender<Message>,
    bytes: Arc<std::sync::atomic::AtomicUsize>,
    max_bytes: usize,
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
enum Pushed {
    /// The writer is gone.
    Closed,
    /// A bound is reached: which.
    Full(String),
}

impl OutQueue {
    fn new(max_messages: usize, max_bytes: usize) -> (OutQueue, mpsc::Receiver<Message>) {
        let (messages, outbox) = mpsc::channel(max_messages);
        (OutQueue { messages, bytes: Arc::default(), max_bytes }, outbox)
    }

    /// Queues `message`, or says why not. Never blocks.
    fn push(&self, message: Message) -> Result<(), Pushed> {
        use std::sync::atomic::Ordering::Relaxed;
        let size = queued_bytes(&message);
        let before = self.bytes.fetch_add(size, Relaxed);
        if before + size > self.max_bytes {
            self.bytes.fetch_sub(size, Relaxed);
            return Err(Pushed::Full(format!("{before} bytes queued, at most {}", self.max_bytes)));
        }
        self.messages.try_send(message).map_err(|e| {
            self.bytes.fetch_sub(size, Relaxed);
            match e {
                mpsc::error::TrySendError::Closed(_) => Pushed::Closed,
                mpsc::error::TrySendError::Full(_) => Pushed::Full("too many messages".into()),
            }
        })
    }
}

/// The bytes a queued message pins: its payloads, plus a little for the rest.
fn queued_bytes(message: &Message) -> usize {
    64 + match message {
        Message::Chunk { data, .. } => data.len(),
        Message::Push { changes } => changes.len(),
        Message::Sync { payload } => payload.len(),
        Message::Holds { manifest, .. } => manifest.as_ref().map_or(0, Vec::len),
        Message::Staged { versions, .. } => {
            versions.iter().map(|v| 32 + v.manifest.as_ref().map_or(0, Vec::len)).sum()
        }
        Message::Stage { contents, .. } | Message::Unstage { contents, .. } => 32 * contents.len(),
        _ => 0,
    }
}

/// An error and its causes, `outer: inner: ...` (libp2p's `TransportError::Other` shows nothing
/// of its own, only through its source).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut cause = error.source();
    while let Some(e) = cause {
        parts.push(e.to_string());
        cause = e.source();
    }
    parts.retain(|p| !p.is_empty());
    parts.dedup();
    parts.join(": ")
}

/// Starts the mesh on the current tokio runtime. Events go to `events`; the mesh stops when
/// [`MeshHandle::stop`] is called or `events` is closed.
pub async fn start(config: MeshConfig, events: mpsc::Sender<MeshEvent>) -> Result<MeshHandle, StartError> {
    let local_peer = config.keypair.public().to_peer_id();
    let mut swarm = build_swarm(config.keypair)?;
    let mut listening = Vec::new();
    let mut listeners = HashMap::new();
    for addr in &config.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| StartError::Listen { addr: addr.clone(), reason: with_causes(&e) })?;
        listeners.insert(id, addr.clone());
    }
    // Wait until every listener is bound, so callers (and `init`) can show real addresses.
    while listening.len() < config.listen.len() {
        match swarm.next().await {
            Some(SwarmEvent::NewListenAddr { address, .. }) => listening.push(address),
            Some(SwarmEvent::ListenerError { listener_id, error })
            | Some(SwarmEvent::ListenerClosed { listener_id, reason: Err(error), .. }) => {
                let addr = listeners.remove(&listener_id).unwrap_or_else(|| config.listen[0].clone());
                return Err(StartError::Listen { addr, reason: with_causes(&error) });
            }
            Some(_) => {}
            None => return Err(StartError::Transport("the swarm ended".into())),
        }
    }
    let topic = gossipsub::IdentTopic::new(PUSH_TOPIC);
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| StartError::Transport(format!("subscribing to pushes: {e}")))?;

    let shared = Arc::new(Mutex::new(Shared::default()));
    let (commands, command_rx) = mpsc::unbounded_channel();
    let control = swarm.behaviour().streams.new_control();
    let handle = MeshHandle { shared: shared.clone(), commands, listening: Arc::new(Mutex::new(listening)) };
    let seed = {
        use std::hash::BuildHasher;
        std::collections::hash_map::RandomState::new().hash_one(std::process::id())
    };
    let mut task = SwarmTask {
        keys: config.keys,
        links: Links::new(local_peer, seed, Instant::now()),
        swarm,
        shared,
        events,
        control,
        topic,
        handle: handle.clone(),
        inbound: HashMap::new(),
    };
    // Admitted before `start` returns, so that the handle knows the members at once.
    for member in config.members {
        let blocked = config.blocked.contains(&member.site);
        let peer = member.peer;
        task.step(Input::AddMember(member)).await;
        if blocked {
            task.step(Input::Block { peer, blocked }).await;
        }
    }
    tokio::spawn(task.run(command_rx));
    Ok(handle)
}

fn build_swarm(keypair: Keypair) -> Result<Swarm<Behaviour>, StartError> {
    let err = |e: &dyn std::fmt::Display| StartError::Transport(e.to_string());
    let builder = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| err(&e))?
        .with_quic_config(|mut config| {
            // A killed peer sends nothing over UDP: its link is declared lost after this long
            // without an answer to keep-alives, and its fetches go to other holders.
            config.max_idle_timeout = QUIC_IDLE_TIMEOUT_MS;
            config.keep_alive_interval = QUIC_KEEP_ALIVE;
            config.max_stream_data = QUIC_STREAM_WINDOW_BYTES;
            config.max_connection_data = QUIC_CONNECTION_WINDOW_BYTES;
            config.mtu_upper_bound(QUIC_MTU_UPPER_BOUND)
        })
        .with_behaviour(|key| {
            let gossip_config = gossipsub::ConfigBuilder::default()
                .validation_mode(gossipsub::ValidationMode::Strict)
                // A message is relayed only once this site has checked it (`gossip_message`):
                // an honest site never forwards a neighbour's garbage, nor is punished for it.
                .validate_messages()
                .max_transmit_size(GOSSIP_MESSAGE_MAX_BYTES + 4096)
                .flood_publish(true)
                .build()?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )?;
            Ok(Behaviour {
                members: allow_block_list::Behaviour::default(),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                        .with_agent_version(agent_version()),
                ),
                gossipsub,
                streams: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| err(&e))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT)
                // One address at a time, in the configured order: QUIC first, then TCP.
                .with_dial_concurrency_factor(std::num::NonZeroU8::MIN)
        });
    Ok(builder.build())
}

/// The identify agent version: the software and this process's instance, so that a member can
/// tell a restart (new instance) from two connections of one process.
fn agent_version() -> String {
    use std::hash::BuildHasher;
    let instance = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    format!("meridian/{} instance/{instance:016x}", env!("CARGO_PKG_VERSION"))
}

/// The driver of the swarm and the link table: swarm events and commands become the table's
/// inputs, the table's actions become swarm calls, stream tasks and events to the site.
struct SwarmTask {
    /// The members' keys, which every namespace change in a push must be signed with.
    keys: crdt_namespace::Keys,
    swarm: Swarm<Behaviour>,
    links: Links,
    shared: Arc<Mutex<Shared>>,
    events: mpsc::Sender<MeshEvent>,
    control: libp2p_stream::Control,
    topic: gossipsub::IdentTopic,
    handle: MeshHandle,
    /// The readers of each member's inbound streams and its budget of bytes held.
    inbound: HashMap<PeerId, Inbound>,
}

/// A member's inbound streams.
struct Inbound {
    /// Bytes of its frames held at once, in permits ([`PEER_INBOUND_BYTES`]).
    budget: Arc<tokio::sync::Semaphore>,
    /// Its readers, oldest first.
    readers: std::collections::VecDeque<tokio::task::JoinHandle<()>>,
}

impl Inbound {
    fn new() -> Inbound {
        Inbound {
            budget: Arc::new(tokio::sync::Semaphore::new(PEER_INBOUND_BYTES)),
            readers: Default::default(),
        }
    }

    /// Makes room for one more reader: forgets the finished ones and ends the oldest ones
    /// beyond [`PEER_INBOUND_STREAMS`]. How many were ended.
    fn make_room(&mut self) -> usize {
        self.readers.retain(|r| !r.is_finished());
        let mut ended = 0;
        while self.readers.len() >= PEER_INBOUND_STREAMS {
            if let Some(oldest) = self.readers.pop_front() {
                oldest.abort();
                ended += 1;
            }
        }
        ended
    }
}

impl SwarmTask {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut incoming = match self.control.accept(STREAM_PROTOCOL) {
            Ok(incoming) => incoming,
            Err(e) => {
                tracing::error!("accepting {STREAM_PROTOCOL} streams: {e}");
                return;
            }
        };
        let mut redial = tokio::time::interval(REDIAL_TICK);
        loop {
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(Command::Stop) | None => break,
                    Some(command) => self.command(command).await,
                },
                _ = self.events.closed() => break,
                event = self.swarm.select_next_some() => self.swarm_event(event).await,
                stream = incoming.next() => {
                    let Some((peer, stream)) = stream else { break };
                    self.accept_stream(peer, stream);
                }
                _ = redial.tick() => self.step(Input::Tick).await,
            }
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        lock(&self.shared).queues.clear();
    }

    fn site_of(&self, peer: &PeerId) -> Option<SiteId> {
        self.links.site_of(peer).cloned()
    }

    /// Hands `input` to the link table and takes the actions it calls for.
    async fn step(&mut self, input: Input) {
        self.links.apply(Instant::now(), input);
        while let Some(action) = self.links.poll_action() {
            self.act(action).await;
        }
        if self.links.take_changed() {
            lock(&self.shared).links = self.links.snapshot();
        }
    }

    async fn act(&mut self, action: Action) {
        match action {
            Action::Dial { peer, addrs } => {
                let opts = DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    self.links.apply(Instant::now(), Input::DialFailed { peer, error: e.to_string() });
                }
            }
            Action::Close { connection, why } => {
                tracing::debug!(%connection, "closing a connection: {why}");
                self.swarm.close_connection(connection);
            }
            Action::Disconnect { peer } => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            // Disallowing closes the member's connections and refuses new ones.
            Action::Allow { peer, allowed: true } => {
                self.swarm.behaviour_mut().members.allow_peer(peer);
            }
            Action::Allow { peer, allowed: false } => {
                self.swarm.behaviour_mut().members.disallow_peer(peer);
            }
            Action::Up { peer, site } => {
                self.open_link(peer, site.clone());
                let _ = self.events.send(MeshEvent::Up(site)).await;
            }
            Action::Down { peer, site } => {
                lock(&self.shared).queues.remove(&site);
                // Its readers end with their streams. One may belong to a connection that comes
                // up as this one goes down: the member's entry (and budget) stays while any runs.
                if self.inbound.get(&peer).is_some_and(|i| i.readers.iter().all(|r| r.is_finished())) {
                    self.inbound.remove(&peer);
                }
                let _ = self.events.send(MeshEvent::Down(site)).await;
            }
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Publish(encoded) => self.publish(encoded),
            Command::Disconnect { site, reason } => {
                if let Some(peer) = self.links.peer_of(&site) {
                    self.step(Input::Disconnect { peer, reason }).await;
                }
            }
            Command::AddMember(member) => {
                // A new peer id for a member's site replaces the old one, which is refused from
                // now on: its inbound entry goes (its readers end with their connections).
                if let Some(old) = self.links.peer_of(&member.site).filter(|p| *p != member.peer) {
                    self.inbound.remove(&old);
                }
                self.step(Input::AddMember(member)).await
            }
            Command::RemoveMember { peer } => {
                self.inbound.remove(&peer);
                self.step(Input::RemoveMember { peer }).await
            }
            Command::SetKeys(keys) => self.keys = keys,
            Command::Block { peer, blocked } => self.step(Input::Block { peer, blocked }).await,
            Command::Stop => unreachable!("handled by run"),
        }
    }

    /// Publishes a push on gossipsub (the connected members also got it over their streams).
    fn publish(&mut self, encoded: Vec<u8>) {
        let topic = self.topic.clone();
        if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(topic, encoded) {
            tracing::debug!("publishing a push: {e}");
        }
    }

    async fn swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                let dialled_here = matches!(endpoint, ConnectedPoint::Dialer { .. });
                let addr = match endpoint {
                    ConnectedPoint::Dialer { address, .. } => address,
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
                };
                let input =
                    Input::Established { peer: peer_id, connection: connection_id, dialled_here, addr };
                self.step(input).await;
            }
            SwarmEvent::ConnectionClosed { connection_id, cause, .. } => {
                let cause = cause.map(|c| c.to_string());
                self.step(Input::Closed { connection: connection_id, cause }).await;
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                self.step(Input::DialFailed { peer, error: error.to_string() }).await;
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                tracing::debug!(%send_back_addr, "incoming connection failed: {error}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => self.gossip_message(message_id, propagation_source, message).await,
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                connection_id,
                info,
                ..
            })) => {
                tracing::debug!(%peer_id, agent = %info.agent_version, "identified");
                let instance = info.agent_version;
                self.step(Input::Identified { peer: peer_id, connection: connection_id, instance }).await;
            }
            _ => {}
        }
    }

    /// A push that gossipsub delivered. It is checked before gossipsub may relay it: its author
    /// (who signed the gossip message) is a member, it decodes as a push, and every namespace
    /// change in it is signed by its own author's key. A good push goes to the core; a bad one
    /// is dropped, not relayed, and the neighbour that sent it disconnected (an honest relay
    /// checked it first, so only its author can have sent it bad).
    async fn gossip_message(
        &mut self,
        id: gossipsub::MessageId,
        propagation_source: PeerId,
        message: gossipsub::Message,
    ) {
        let author_is_member = message.source.is_some_and(|p| self.site_of(&p).is_some());
        let verdict = match Message::decode(&message.data) {
            _ if !author_is_member => Err("a push whose author is not a member".to_owned()),
            Ok(Message::Push { changes }) => {
                match crdt_namespace::Namespace::check_export(&changes, &self.keys) {
                    Ok(()) => Ok(Message::Push { changes }),
                    Err(e) => Err(format!("a bad push: {e}")),
                }
            }
            Ok(_) => Err("a non-push message on the push topic".to_owned()),
            Err(e) => Err(format!("a malformed push: {e}")),
        };
        let acceptance = match verdict {
            Ok(_) => gossipsub::MessageAcceptance::Accept,
            Err(_) => gossipsub::MessageAcceptance::Reject,
        };
        let gossip = &mut self.swarm.behaviour_mut().gossipsub;
        gossip.report_message_validation_result(&id, &propagation_source, acceptance);
        let Some(from) = self.site_of(&propagation_source) else { return };
        match verdict {
            Ok(message) => {
                let budget = InboundBudget::default();
                let _ = self.events.send(MeshEvent::Message { from, message, budget }).await;
            }
            Err(reason) => self.misbehaved(propagation_source, reason).await,
        }
    }

    async fn misbehaved(&mut self, peer: PeerId, reason: String) {
        self.step(Input::Disconnect { peer, reason }).await;
    }

    /// Opens the outbound stream to a newly connected member and its writer.
    ///
    /// A link is replaced when the connection under it closes while another stays open; the
    /// writer of a replaced link ends quietly. Only the current link's failure disconnects the
    /// member.
    fn open_link(&mut self, peer: PeerId, site: SiteId) {
        let (queue, mut outbox) = OutQueue::new(PEER_QUEUE_MESSAGES, PEER_QUEUE_BYTES);
        let bytes = queue.bytes.clone();
        // The registry holds the only lasting sender: while it can be upgraded, this link is
        // the member's current one.
        let current = queue.messages.downgrade();
        lock(&self.shared).queues.insert(site.clone(), queue);
        let mut control = self.control.clone();
        let handle = self.handle.clone();
        let fail = move |what: String| {
            if current.upgrade().is_some() {
                handle.disconnect(&site, what);
            }
        };
        tokio::spawn(async move {
            let mut attempt = 1;
            let mut stream = loop {
                // The stream goes over any open connection; one that is closing at this moment
                // fails the open, and the next attempt takes another.
                match control.open_stream(peer, STREAM_PROTOCOL).await {
                    Ok(stream) => break stream,
                    Err(e) if attempt >= STREAM_OPEN_ATTEMPTS => {
                        return fail(format!("opening a stream: {e}"));
                    }
                    Err(e) => {
                        tracing::debug!(%peer, "opening a stream (attempt {attempt}): {e}");
                        attempt += 1;
                        tokio::time::sleep(STREAM_OPEN_RETRY).await;
                    }
                }
            };
            while let Some(message) = outbox.recv().await {
                // Flush only when nothing else is queued, so small messages share packets.
                let flush = outbox.is_empty();
                let written = write_frame(&mut stream, &message, flush).await;
                bytes.fetch_sub(queued_bytes(&message), std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = written {
                    return fail(format!("writing to the stream: {e}"));
                }
            }
            let _ = stream.close().await;
        });
    }

    /// Reads the frames of a member's inbound stream, within the member's bounds: at most
    /// [`PEER_INBOUND_STREAMS`] readers (a further stream ends the oldest) and
    /// [`PEER_INBOUND_BYTES`] of its frames held at once.
    fn accept_stream(&mut self, peer: PeerId, stream: libp2p::Stream) {
        let Some(site) = self.site_of(&peer) else {
            // Membership gating closes such connections; a stream that slipped in is dropped.
            return;
        };
        let inbound = self.inbound.entry(peer).or_insert_with(Inbound::new);
        let ended = inbound.make_room();
        if ended > 0 {
            tracing::warn!(%site, "opened more than {PEER_INBOUND_STREAMS} streams; its oldest is closed");
        }
        let reader =
            read_stream(site, stream, inbound.budget.clone(), self.events.clone(), self.handle.clone());
        inbound.readers.push_back(tokio::spawn(reader));
    }
}

/// Hands the frames of `site`'s stream to the site's core, each with its bytes counted against
/// `budget` until the core has handled it.
async fn read_stream(
    site: SiteId,
    mut stream: libp2p::Stream,
    budget: Arc<tokio::sync::Semaphore>,
    events: mpsc::Sender<MeshEvent>,
    handle: MeshHandle,
) {
    loop {
        let held = async |len: usize| {
            // `len` is at most MESSAGE_MAX_BYTES, the whole budget: the wait ends once the
            // member's earlier frames are handled.
            let permits = u32::try_from(len).unwrap_or(u32::MAX);
            budget.clone().acquire_many_owned(permits).await.ok()
        };
        match read_frame_within(&mut stream, held).await {
            Ok(None) => return,
            Ok(Some((message, permit))) => {
                let event = MeshEvent::Message {
                    from: site.clone(),
                    message,
                    budget: InboundBudget { _permit: Some(permit) },
                };
                if events.send(event).await.is_err() {
                    return;
                }
            }
            Err(FrameError::Io(e)) => {
                tracing::debug!(%site, "reading the stream: {e}");
                return;
            }
            Err(FrameError::Proto(e)) => {
                handle.disconnect(&site, format!("sent a bad frame: {e}"));
                return;
            }
        }
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The frame is not a message.
    #[error("{0}")]
    Proto(#[from] ProtoError),
}

/// Reads one frame: `None` at a clean end of the stream. Memory grows with the bytes that
/// actually arrive, never with a length a peer claims.
pub async fn read_frame<R: futures::AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<Message>, FrameError> {
    let unbounded = async |_| Some(());
    Ok(read_frame_within(stream, unbounded).await?.map(|(message, ())| message))
}

/// Reads one frame as [`read_frame`] does, but first awaits `hold(length)` (the frame's share
/// of a budget) before reading its body; `None` from it counts as the end of the stream.
async fn read_frame_within<R: futures::AsyncRead + Unpin, T>(
    stream: &mut R,
    hold: impl AsyncFnOnce(usize) -> Option<T>,
) -> Result<Option<(Message, T)>, FrameError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MESSAGE_MAX_BYTES {
        return Err(ProtoError::TooLarge(len).into());
    }
    let Some(held) = hold(len).await else { return Ok(None) };
    let mut bytes = Vec::with_capacity(len.min(1 << 20));
    let read = (&mut *stream).take(len as u64).read_to_end(&mut bytes).await?;
    if read < len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside a frame").into());
    }
    Ok(Some((Message::decode(&bytes)?, held)))
}

/// Writes one frame, and flushes the stream if `flush`.
pub async fn write_frame<W: futures::AsyncWrite + Unpin>(
    stream: &mut W,
    message: &Message,
    flush: bool,
) -> io::Result<()> {
    let encoded = message.encode();
    stream.write_all(&(encoded.len() as u32).to_le_bytes()).await?;
    stream.write_all(&encoded).await?;
    if flush {
        stream.flush().await?;
    }
    Ok(())
}

/// The peer id a key file's key pair has.
pub fn peer_id_of(keypair: &Keypair) -> PeerId {
    keypair.public().to_peer_id()
}

/// The Ed25519 secret of a site's key pair: the key that signs its namespace changes.
pub fn signing_secret(keypair: &Keypair) -> Result<[u8; 32], String> {
    let pair =
        keypair.clone().try_into_ed25519().map_err(|_| "the site key is not an Ed25519 key".to_owned())?;
    let secret = pair.secret();
    secret.as_ref().try_into().map_err(|_| "the site key's secret is not 32 bytes".to_owned())
}

/// The Ed25519 public key a peer id carries (an Ed25519 peer id embeds its key): what checks
/// that site's namespace changes.
pub fn public_key_of(peer: &PeerId) -> Result<[u8; 32], String> {
    let digest = peer.as_ref();
    if digest.code() != 0 {
        return Err(format!("peer id {peer} does not embed its public key (not an Ed25519 key)"));
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(digest.digest())
        .map_err(|e| format!("peer id {peer}: {e}"))?;
    let key = key.try_into_ed25519().map_err(|_| format!("peer id {peer} is not an Ed25519 key"))?;
    Ok(key.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: Vec<u8>) -> Result<Option<Message>, FrameError> {
        futures::executor::block_on(read_frame(&mut futures::io::Cursor::new(bytes)))
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let message = Message::WhoHas { content: crdt_namespace::ContentId([7; 32]) };
        let mut bytes = Vec::new();
        futures::executor::block_on(write_frame(&mut futures::io::Cursor::new(&mut bytes), &message, true))
            .unwrap();
        assert_eq!(read(bytes.clone()).unwrap(), Some(message));
        assert!(read(Vec::new()).unwrap().is_none(), "a clean end");
        // A length over the bound is refused before anything is allocated for it.
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(matches!(read(huge), Err(FrameError::Proto(ProtoError::TooLarge(_)))));
        // A frame cut short, and a frame that is not a message.
        assert!(matches!(read(bytes[..bytes.len() - 1].to_vec()), Err(FrameError::Io(_))));
        let mut junk = 3u32.to_le_bytes().to_vec();
        junk.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(read(junk), Err(FrameError::Proto(_))));
    }

    #[test]
    fn a_peers_queue_is_bounded_in_bytes_as_well_as_in_messages() {
        let chunk =
            |len: usize| Message::Chunk { request: proto::FetchId(1), chunk: [1; 32], data: vec![0; len] };
        // Room for three 1 MiB chunks (and their overhead), and at most 100 messages.
        let (queue, mut outbox) = OutQueue::new(100, 3 * ((1 << 20) + 64));
        for _ in 0..3 {
            queue.push(chunk(1 << 20)).unwrap();
        }
        // A fourth would pin more than the bound: refused, and nothing of it counted.
        assert!(matches!(queue.push(chunk(1 << 20)), Err(Pushed::Full(_))));
        assert_eq!(queue.bytes.load(std::sync::atomic::Ordering::Relaxed), 3 * ((1 << 20) + 64));
        // Small messages still fit until the count is reached.
        let (small, _rx) = OutQueue::new(2, usize::MAX);
        let who = || Message::WhoHas { content: crdt_namespace::ContentId([7; 32]) };
        small.push(who()).unwrap();
        small.push(who()).unwrap();
        assert_eq!(small.push(who()), Err(Pushed::Full("too many messages".into())));
        // What the writer takes and writes is given back (as the link's writer does).
        let taken = outbox.try_recv().unwrap();
        queue.bytes.fetch_sub(queued_bytes(&taken), std::sync::atomic::Ordering::Relaxed);
        queue.push(chunk(1 << 20)).unwrap();
        let taken = outbox.try_recv().unwrap();
        queue.bytes.fetch_sub(queued_bytes(&taken), std::sync::atomic::Ordering::Relaxed);
        drop(outbox);
        assert_eq!(queue.push(chunk(1)), Err(Pushed::Closed));
        assert_eq!(
            queue.bytes.load(std::sync::atomic::Ordering::Relaxed),
            2 * ((1 << 20) + 64),
            "given back"
        );
    }
}

//! A rogue peer for tests: speaks libp2p with a site's key but writes raw bytes on the meridian
//! stream protocol, to check that a site disconnects a peer that sends malformed frames, forged
//! pushes or floods, and that what such a peer makes the site hold stays bounded.

use std::time::Duration;

use anyhow::Context;
use futures::{AsyncWriteExt, StreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, identity::Keypair};
use transport::p2p::STREAM_PROTOCOL;

/// What happened after the rogue wrote its bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The site refused the connection before any stream opened.
    Refused(String),
    /// The site closed the connection after reading the bytes.
    Disconnected,
    /// The connection was still up after the wait.
    StillConnected,
}

/// Connects to the site `target` at `addr` with `keypair`, opens a `/meridian/1` stream,
/// writes `bytes`, and waits up to `wait` for the site to close the connection.
pub async fn send_raw(
    keypair: Keypair,
    target: PeerId,
    addr: Multiaddr,
    bytes: Vec<u8>,
    wait: Duration,
) -> anyhow::Result<Outcome> {
    let mut swarm = stream_swarm(keypair)?;
    let mut control = swarm.behaviour().new_control();
    swarm.dial(addr.with_p2p(target).map_err(|a| anyhow::anyhow!("bad address {a}"))?)?;
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
    let driver = tokio::spawn(async move {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionClosed { num_established: 0, .. } => {
                    let _ = closed_tx.send(None);
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    let _ = closed_tx.send(Some(error.to_string()));
                }
                _ => {}
            }
        }
    });
    let outcome = async {
        let opened = tokio::select! {
            opened = control.open_stream(target, STREAM_PROTOCOL) => opened,
            closed = closed_rx.recv() => {
                return Ok(Outcome::Refused(closed.flatten().unwrap_or_else(|| "connection closed".into())));
            }
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(e) => return Ok(Outcome::Refused(e.to_string())),
        };
        // A site that has already closed the connection fails the write: that is a disconnect.
        if stream.write_all(&bytes).await.is_err() || stream.flush().await.is_err() {
            return Ok(Outcome::Disconnected);
        }
        match tokio::time::timeout(wait, closed_rx.recv()).await {
            Ok(_) => Ok(Outcome::Disconnected),
            Err(_) => Ok(Outcome::StillConnected),
        }
    }
    .await;
    driver.abort();
    outcome
}

/// A QUIC swarm with `keypair` that speaks only the stream protocol.
fn stream_swarm(keypair: Keypair) -> anyhow::Result<libp2p::Swarm<libp2p_stream::Behaviour>> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .context("building the rogue's swarm")?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build())
}

/// Reads a site's key pair from its key file.
pub fn read_key(path: &std::path::Path) -> anyhow::Result<Keypair> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Keypair::from_protobuf_encoding(&bytes).context("decoding the key")
}

/// A rogue that speaks gossipsub, and takes the site's `/meridian/1` stream without reading it
/// (a member that refused it would be cut off for that alone).
#[derive(libp2p::swarm::NetworkBehaviour)]
struct GossipRogue {
    gossipsub: libp2p::gossipsub::Behaviour,
    streams: libp2p_stream::Behaviour,
}

/// Connects to the site `target` at `addr` with `keypair`, subscribes to the push topic and,
/// once the site is seen subscribed, publishes `payload` on it (signed by `keypair`, as
/// gossipsub wants); then waits up to `wait` for the site to close the connection.
pub async fn publish_push(
    keypair: Keypair,
    target: PeerId,
    addr: Multiaddr,
    payload: Vec<u8>,
    wait: Duration,
) -> anyhow::Result<Outcome> {
    use libp2p::gossipsub;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic()
        .with_behaviour(|key| {
            let config = gossipsub::ConfigBuilder::default()
                .validation_mode(gossipsub::ValidationMode::Strict)
                .build()
                .expect("a valid gossipsub configuration");
            let gossipsub =
                gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), config)
                    .expect("a gossipsub behaviour");
            GossipRogue { gossipsub, streams: libp2p_stream::Behaviour::new() }
        })
        .context("building the rogue's swarm")?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let mut incoming = swarm.behaviour().streams.new_control().accept(STREAM_PROTOCOL)?;
    let topic = gossipsub::IdentTopic::new(transport::p2p::PUSH_TOPIC);
    swarm.behaviour_mut().gossipsub.subscribe(&topic)?;
    swarm.dial(addr.with_p2p(target).map_err(|a| anyhow::anyhow!("bad address {a}"))?)?;
    let run = async {
        let mut payload = Some(payload);
        let mut unread = Vec::new();
        loop {
            let event = tokio::select! {
                event = swarm.select_next_some() => event,
                Some((_, stream)) = incoming.next() => {
                    unread.push(stream);
                    continue;
                }
            };
            match event {
                SwarmEvent::Behaviour(GossipRogueEvent::Gossipsub(gossipsub::Event::Subscribed {
                    peer_id,
                    ..
                })) if peer_id == target => {
                    if let Some(payload) = payload.take() {
                        swarm.behaviour_mut().gossipsub.publish(topic.clone(), payload)?;
                    }
                }
                SwarmEvent::ConnectionClosed { num_established: 0, .. } if payload.is_none() => {
                    return Ok(Outcome::Disconnected);
                }
                SwarmEvent::ConnectionClosed { num_established: 0, cause, .. } => {
                    return Ok(Outcome::Refused(format!("closed before the push: {cause:?}")));
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    return Ok(Outcome::Refused(error.to_string()));
                }
                _ => {}
            }
        }
    };
    match tokio::time::timeout(wait, run).await {
        Ok(outcome) => outcome,
        Err(_) => Ok(Outcome::StillConnected),
    }
}

/// A member gone bad, connected to one site: it opens as many `/meridian/1` streams as it
/// likes, writes what it likes on them, and takes the site's own stream but never reads it.
pub struct Rogue {
    control: libp2p_stream::Control,
    target: PeerId,
    closed: tokio::sync::watch::Receiver<bool>,
    driver: tokio::task::JoinHandle<()>,
}

impl Rogue {
    /// Connects to the site `target` at `addr` with `keypair` and waits until the site has
    /// opened its stream to it (the link is up at the site).
    pub async fn connect(
        keypair: Keypair,
        target: PeerId,
        addr: Multiaddr,
        wait: Duration,
    ) -> anyhow::Result<Rogue> {
        let mut swarm = stream_swarm(keypair)?;
        let mut control = swarm.behaviour().new_control();
        let mut incoming = control.accept(STREAM_PROTOCOL)?;
        swarm.dial(addr.with_p2p(target).map_err(|a| anyhow::anyhow!("bad address {a}"))?)?;
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        let (linked_tx, mut linked) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            // The site's streams are kept open and never read: what it sends piles up there.
            let mut unread = Vec::new();
            loop {
                tokio::select! {
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::ConnectionClosed { num_established: 0, .. }
                        | SwarmEvent::OutgoingConnectionError { .. } => {
                            let _ = closed_tx.send(true);
                        }
                        _ => {}
                    },
                    Some((_, stream)) = incoming.next() => {
                        unread.push(stream);
                        let _ = linked_tx.send(());
                    }
                }
            }
        });
        let rogue = Rogue { control, target, closed, driver };
        match tokio::time::timeout(wait, linked.recv()).await {
            Ok(Some(())) => Ok(rogue),
            _ => anyhow::bail!("the site did not open its stream to the rogue"),
        }
    }

    /// Opens one more stream to the site.
    pub async fn open(&mut self) -> anyhow::Result<libp2p::Stream> {
        Ok(self.control.open_stream(self.target, STREAM_PROTOCOL).await?)
    }

    /// Whether the site closed the connection (now, or within `wait`).
    pub async fn cut_off(&mut self, wait: Duration) -> bool {
        let mut closed = self.closed.clone();
        tokio::time::timeout(wait, closed.wait_for(|c| *c)).await.is_ok_and(|r| r.is_ok())
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Writes `frames` (encoded messages, each framed with its length) on `stream`, giving up after
/// `wait`: how many were written in full.
pub async fn write_frames(
    stream: &mut libp2p::Stream,
    frames: impl IntoIterator<Item = transport::proto::Message>,
    wait: Duration,
) -> usize {
    let mut written = 0;
    let _ = tokio::time::timeout(wait, async {
        for message in frames {
            if transport::p2p::write_frame(stream, &message, false).await.is_err() {
                return;
            }
            written += 1;
        }
        let _ = stream.flush().await;
    })
    .await;
    written
}

/// The peak resident memory of process `pid` so far (`VmHWM`), in bytes.
pub fn peak_memory(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM")?;
    let kib: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse()?;
    Ok(kib << 10)
}

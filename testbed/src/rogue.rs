//! A rogue peer for tests: speaks libp2p with a site's key but writes raw bytes on the meridian
//! stream protocol, to check that a site disconnects a peer that sends malformed frames.

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
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .context("building the rogue's swarm")?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
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

/// Reads a site's key pair from its key file.
pub fn read_key(path: &std::path::Path) -> anyhow::Result<Keypair> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Keypair::from_protobuf_encoding(&bytes).context("decoding the key")
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
            gossipsub::Behaviour::<gossipsub::IdentityTransform, gossipsub::AllowAllSubscriptionFilter>::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                config,
            )
            .expect("a gossipsub behaviour")
        })
        .context("building the rogue's swarm")?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let topic = gossipsub::IdentTopic::new(transport::p2p::PUSH_TOPIC);
    swarm.behaviour_mut().subscribe(&topic)?;
    swarm.dial(addr.with_p2p(target).map_err(|a| anyhow::anyhow!("bad address {a}"))?)?;
    let run = async {
        let mut payload = Some(payload);
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(gossipsub::Event::Subscribed { peer_id, .. }) if peer_id == target => {
                    if let Some(payload) = payload.take() {
                        swarm.behaviour_mut().publish(topic.clone(), payload)?;
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

//! The link table: every decision the mesh makes about its members' connections, as a pure,
//! synchronous state machine.
//!
//! Inputs ([`Input`]) are what the swarm and the operator report: a member added or blocked, a
//! connection established, identified or closed, a dial that failed, a disconnection asked for,
//! the redial tick. Outputs ([`Action`]) are what the swarm task must do: dial, close a
//! connection, disconnect a member, admit or refuse its connections, tell the site a link is up
//! or down. The rules:
//!
//! - One connection per member is kept, chosen once identify names the connection's process
//!   instance: connections to another instance of the member (it restarted; they are dead but not
//!   yet timed out) are closed; of two to the same instance (both sides dialled at once) both
//!   sides keep the one the smaller peer id dialled, so they agree; between two dialled the same
//!   way, the one identified last.
//! - The site hears `Up` when a connection to a member is established while the link is down,
//!   and `Down` when the last one closes. When a connection closes while others stay open, the
//!   link's stream may have run on it: the site hears `Down` then `Up` and the link is opened
//!   again — unless every connection left is closing (the member was blocked or disconnected):
//!   then it hears `Down` alone, and nothing more until a new connection.
//! - A member that is down is redialled on the tick once its `next_dial` is due, with
//!   exponential backoff from [`REDIAL_FIRST`] to [`REDIAL_MAX`] and jitter after a failed dial.
//!   A blocked member is neither dialled nor admitted.
//!
//! It must never do I/O, read a clock or draw randomness: time comes in with every input, and
//! the jitter comes from a generator seeded by the driver.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crdt_namespace::SiteId;
use libp2p::identity::PeerId;
use libp2p::swarm::ConnectionId;

use super::{LinkState, Member, Multiaddr, Protocol};

/// First and largest delay before redialling a member that is not connected.
pub(crate) const REDIAL_FIRST: Duration = Duration::from_millis(250);
pub(crate) const REDIAL_MAX: Duration = Duration::from_secs(30);
/// Largest random delay (exclusive) added to a redial after a failed dial: it keeps sites that
/// lost each other at the same moment from redialling in lockstep, and is small beside
/// [`REDIAL_FIRST`].
pub(crate) const REDIAL_JITTER_MAX: Duration = Duration::from_millis(100);

/// What happened, as the swarm task tells it.
#[derive(Clone, Debug)]
pub(crate) enum Input {
    /// A member is admitted, or an admitted one's entry changes (its addresses); it is dialled
    /// at the next tick.
    AddMember(Member),
    /// A member leaves (`mesh rm`, or its old key after `mesh rotate`): its connections are
    /// closed, new ones refused, and it is never dialled again.
    RemoveMember { peer: PeerId },
    /// The operator cuts (`true`) or restores the link to a member.
    Block { peer: PeerId, blocked: bool },
    /// Something asks for every connection to a member to be dropped (a bad frame, a full
    /// queue, a misbehaving gossip neighbour); it will be redialled.
    Disconnect { peer: PeerId, reason: String },
    /// A connection to `peer` is established.
    Established { peer: PeerId, connection: ConnectionId, dialled_here: bool, addr: Multiaddr },
    /// Identify named the process instance at the other end of `connection`.
    Identified { peer: PeerId, connection: ConnectionId, instance: String },
    /// A connection closed, for `cause` if one is known.
    Closed { connection: ConnectionId, cause: Option<String> },
    /// A dial of `peer` failed (at once or later on).
    DialFailed { peer: PeerId, error: String },
    /// Time to look for members to redial.
    Tick,
}

/// What the swarm task must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Dial `peer` at `addrs`, one at a time in this order, unless connected or dialling it.
    Dial { peer: PeerId, addrs: Vec<Multiaddr> },
    /// Close one connection.
    Close { connection: ConnectionId, why: &'static str },
    /// Close every connection to `peer`.
    Disconnect { peer: PeerId },
    /// Admit (`true`) or refuse `peer`'s connections; refusing closes those that are open.
    Allow { peer: PeerId, allowed: bool },
    /// The link to `peer` is up: open its stream and tell the site.
    Up { peer: PeerId, site: SiteId },
    /// The link to `peer` is down: drop its stream and tell the site.
    Down { peer: PeerId, site: SiteId },
}

/// A member and the state of its link, as `meridian mesh ls` shows it.
#[derive(Clone, Debug)]
pub(crate) struct LinkEntry {
    pub(crate) member: Member,
    pub(crate) state: LinkState,
    /// When `state` last changed.
    pub(crate) since: Instant,
}

/// A rule broken on purpose, to show that the tests notice.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sabotage {
    /// Each side keeps the duplicate connection it dialled itself, so the two sides disagree.
    KeepOwnDials,
    /// Blocked members are redialled like members that are down.
    DialBlocked,
}

struct MemberLink {
    member: Member,
    state: LinkState,
    since: Instant,
    next_dial: Instant,
    backoff: Duration,
    /// Whether a dial is under way.
    dial_under_way: bool,
    /// The site the link was reported up for, while it is up.
    up: Option<SiteId>,
}

/// An open connection to a member.
struct Connection {
    peer: PeerId,
    /// Whether this site dialled it.
    dialled_here: bool,
    /// The member's process instance, once identify told it.
    instance: Option<String>,
    /// Whether this site asked for it to be closed.
    closing: bool,
}

/// The link table. See the module documentation.
pub(crate) struct Links {
    local: PeerId,
    members: BTreeMap<PeerId, MemberLink>,
    /// Open connections to members.
    connections: BTreeMap<ConnectionId, Connection>,
    /// Actions not yet taken by the driver; it drains them after every input.
    actions: VecDeque<Action>,
    jitter: Jitter,
    /// The time of the latest input.
    now: Instant,
    /// Whether a member or its state changed since [`Links::take_changed`] last said so.
    changed: bool,
    #[cfg(test)]
    pub(crate) sabotage: Option<Sabotage>,
}

impl MemberLink {
    fn new(member: Member, now: Instant) -> MemberLink {
        MemberLink {
            member,
            state: LinkState::Down { last_error: None },
            since: now,
            next_dial: now,
            backoff: REDIAL_FIRST,
            dial_under_way: false,
            up: None,
        }
    }

    /// Sets the state; `since` moves only when it changes. Says whether it changed.
    fn set(&mut self, state: LinkState, now: Instant) -> bool {
        if self.state == state {
            return false;
        }
        self.state = state;
        self.since = now;
        true
    }
}

impl Links {
    /// An empty table for the site whose peer id is `local`; `seed` seeds the redial jitter.
    pub(crate) fn new(local: PeerId, seed: u64, now: Instant) -> Links {
        Links {
            local,
            members: BTreeMap::new(),
            connections: BTreeMap::new(),
            actions: VecDeque::new(),
            jitter: Jitter(seed),
            now,
            changed: false,
            #[cfg(test)]
            sabotage: None,
        }
    }

    /// Takes `input`, which happened at `now`; the actions it calls for wait in
    /// [`Links::poll_action`].
    pub(crate) fn apply(&mut self, now: Instant, input: Input) {
        self.now = now;
        match input {
            Input::AddMember(member) => self.add_member(now, member),
            Input::RemoveMember { peer } => self.remove_member(peer),
            Input::Block { peer, blocked } => self.block(now, peer, blocked),
            Input::Disconnect { peer, reason } => self.disconnect(peer, &reason),
            Input::Established { peer, connection, dialled_here, addr } => {
                self.established(now, peer, connection, dialled_here, addr)
            }
            Input::Identified { peer, connection, instance } => self.identified(peer, connection, instance),
            Input::Closed { connection, cause } => self.closed(now, connection, cause),
            // A dial that failed while another connection is up changes nothing.
            Input::DialFailed { peer, error } if !self.is_connected(&peer) => {
                self.dial_failed(now, peer, Some(error))
            }
            Input::DialFailed { .. } => {}
            Input::Tick => self.redial(now),
        }
        if cfg!(debug_assertions) {
            self.check_invariants();
        }
    }

    /// The next action to take, in order.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The site of member `peer`.
    pub(crate) fn site_of(&self, peer: &PeerId) -> Option<&SiteId> {
        self.members.get(peer).map(|m| &m.member.site)
    }

    /// The peer id of member `site`.
    pub(crate) fn peer_of(&self, site: &SiteId) -> Option<PeerId> {
        self.members.values().find(|m| &m.member.site == site).map(|m| m.member.peer)
    }

    /// Whether a member or the state of its link changed since the last call.
    pub(crate) fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The members and the states of their links.
    pub(crate) fn snapshot(&self) -> Vec<LinkEntry> {
        self.members
            .values()
            .map(|m| LinkEntry { member: m.member.clone(), state: m.state.clone(), since: m.since })
            .collect()
    }

    fn is_connected(&self, peer: &PeerId) -> bool {
        self.connections.values().any(|c| c.peer == *peer)
    }

    fn connection_count(&self, peer: &PeerId) -> usize {
        self.connections.values().filter(|c| c.peer == *peer).count()
    }

    fn add_member(&mut self, now: Instant, member: Member) {
        let peer = member.peer;
        if peer == self.local {
            return;
        }
        // One entry per site: a new peer id for a known site replaces the old one (its key was
        // rotated).
        let replaced: Vec<PeerId> = self
            .members
            .values()
            .filter(|m| m.member.site == member.site && m.member.peer != peer)
            .map(|m| m.member.peer)
            .collect();
        for old in replaced {
            self.remove_member(old);
        }
        let m = match self.members.entry(peer) {
            std::collections::btree_map::Entry::Occupied(entry) => {
                let m = entry.into_mut();
                m.member = member;
                m.next_dial = now;
                m.backoff = REDIAL_FIRST;
                m
            }
            std::collections::btree_map::Entry::Vacant(entry) => entry.insert(MemberLink::new(member, now)),
        };
        // Adding a blocked member again (to change its addresses) does not lift the block.
        if m.state != LinkState::Blocked {
            self.actions.push_back(Action::Allow { peer, allowed: true });
        }
        self.changed = true;
    }

    fn remove_member(&mut self, peer: PeerId) {
        let Some(mut m) = self.members.remove(&peer) else { return };
        tracing::info!(site = %m.member.site, %peer, "removed from the mesh");
        self.actions.push_back(Action::Allow { peer, allowed: false });
        self.actions.push_back(Action::Disconnect { peer });
        if let Some(site) = m.up.take() {
            self.actions.push_back(Action::Down { peer, site });
        }
        // Its connections are forgotten now; their closing is of no interest any more.
        self.connections.retain(|_, c| c.peer != peer);
        self.changed = true;
    }

    fn block(&mut self, now: Instant, peer: PeerId, blocked: bool) {
        let Some(m) = self.members.get_mut(&peer) else { return };
        // Refusing the member closes its connections and refuses new ones.
        self.actions.push_back(Action::Allow { peer, allowed: !blocked });
        if blocked {
            self.changed |= m.set(LinkState::Blocked, now);
        } else if !matches!(m.state, LinkState::Connected { .. }) {
            // Restoring a link that was not cut leaves it as it is, but redials it at once.
            self.changed |= m.set(LinkState::Down { last_error: None }, now);
        }
        m.next_dial = now;
        m.backoff = REDIAL_FIRST;
        if blocked {
            self.mark_closing(&peer);
        }
    }

    fn disconnect(&mut self, peer: PeerId, reason: &str) {
        let Some(site) = self.site_of(&peer).cloned() else { return };
        tracing::warn!(%site, %peer, "disconnecting: {reason}");
        self.actions.push_back(Action::Disconnect { peer });
        self.mark_closing(&peer);
    }

    fn mark_closing(&mut self, peer: &PeerId) {
        for c in self.connections.values_mut().filter(|c| c.peer == *peer) {
            c.closing = true;
        }
    }

    fn established(
        &mut self,
        now: Instant,
        peer: PeerId,
        connection: ConnectionId,
        dialled_here: bool,
        addr: Multiaddr,
    ) {
        let Some(m) = self.members.get_mut(&peer) else { return };
        m.dial_under_way = false;
        if m.state == LinkState::Blocked {
            // Membership gating refuses a blocked member's connections; one that got through
            // anyway is closed and not counted.
            self.actions.push_back(Action::Close { connection, why: "the member is blocked" });
            return;
        }
        m.backoff = REDIAL_FIRST;
        let transport = if addr.iter().any(|p| matches!(p, Protocol::QuicV1)) { "quic" } else { "tcp" };
        self.changed |= m.set(LinkState::Connected { transport, addr: addr.clone() }, now);
        // A second connection is sorted out once identify names its process instance.
        self.connections
            .insert(connection, Connection { peer, dialled_here, instance: None, closing: false });
        // Up with the first connection, or with a new one while the others close.
        if let Some(m) = self.members.get_mut(&peer)
            && m.up.is_none()
        {
            let site = m.member.site.clone();
            tracing::info!(%site, %peer, %addr, "connected");
            m.up = Some(site.clone());
            self.actions.push_back(Action::Up { peer, site });
        }
    }

    /// Keeps one connection per member once identify has named `connection`'s instance (see
    /// the module documentation). Closing a connection the link runs on moves the link (see
    /// [`Links::closed`]).
    fn identified(&mut self, peer: PeerId, connection: ConnectionId, instance: String) {
        let Some(current) = self.connections.get_mut(&connection) else { return };
        if current.peer != peer {
            return;
        }
        current.instance = Some(instance.clone());
        let keep_dialled_here = self.local < peer;
        #[cfg(test)]
        let keep_dialled_here = keep_dialled_here || self.sabotage == Some(Sabotage::KeepOwnDials);
        let current_kept = current.dialled_here == keep_dialled_here;
        let mut close = Vec::new();
        for (id, c) in &self.connections {
            if *id == connection || c.peer != peer {
                continue;
            }
            match &c.instance {
                Some(other) if *other != instance => close.push((*id, "the site restarted")),
                // Same instance: keep the agreed direction; between equals, the newer.
                Some(_) if current_kept || c.dialled_here != keep_dialled_here => {
                    close.push((*id, "a duplicate connection"))
                }
                Some(_) => close.push((connection, "a duplicate connection")),
                None => {}
            }
        }
        close.sort_by_key(|(id, _)| *id);
        close.dedup_by_key(|(id, _)| *id);
        for (id, why) in close {
            tracing::debug!(%peer, "closing a connection: {why}");
            if let Some(c) = self.connections.get_mut(&id) {
                c.closing = true;
            }
            self.actions.push_back(Action::Close { connection: id, why });
        }
    }

    fn closed(&mut self, now: Instant, connection: ConnectionId, cause: Option<String>) {
        let Some(closed) = self.connections.remove(&connection) else { return };
        let peer = closed.peer;
        let remaining = self.connection_count(&peer);
        let open = self.connections.values().any(|c| c.peer == peer && !c.closing);
        let Some(m) = self.members.get_mut(&peer) else { return };
        if remaining > 0 {
            // The link's stream may have run on the closed connection: open it again on one that
            // is open, and let the core resynchronise and re-ask — unless every one left is
            // closing (the member was blocked or disconnected): then the link stays down.
            if let Some(site) = m.up.take() {
                self.actions.push_back(Action::Down { peer, site });
                if open && m.state != LinkState::Blocked {
                    let site = m.member.site.clone();
                    m.up = Some(site.clone());
                    self.actions.push_back(Action::Up { peer, site });
                }
            }
            return;
        }
        let site = &m.member.site;
        tracing::info!(%site, "disconnected{}", cause.as_ref().map(|r| format!(": {r}")).unwrap_or_default());
        if m.state != LinkState::Blocked {
            self.changed |= m.set(LinkState::Down { last_error: cause }, now);
            m.next_dial = now + m.backoff;
        }
        if let Some(site) = m.up.take() {
            self.actions.push_back(Action::Down { peer, site });
        }
    }

    /// Dials the members that are down and due.
    fn redial(&mut self, now: Instant) {
        #[cfg(test)]
        let dial_blocked = self.sabotage == Some(Sabotage::DialBlocked);
        #[cfg(not(test))]
        let dial_blocked = false;
        let due: Vec<PeerId> = self
            .members
            .values()
            .filter(|m| {
                let down = matches!(m.state, LinkState::Down { .. })
                    || (dial_blocked && m.state == LinkState::Blocked);
                !m.dial_under_way && down && m.next_dial <= now
            })
            .map(|m| m.member.peer)
            .collect();
        for peer in due {
            let connected = self.is_connected(&peer);
            let Some(m) = self.members.get_mut(&peer) else { continue };
            m.dial_under_way = true;
            if connected || m.member.addrs.is_empty() {
                self.dial_failed(now, peer, None);
                continue;
            }
            self.actions.push_back(Action::Dial { peer, addrs: m.member.addrs.clone() });
        }
    }

    /// Schedules the next dial of `peer` after a failure, with exponential backoff and jitter.
    fn dial_failed(&mut self, now: Instant, peer: PeerId, error: Option<String>) {
        let jitter = self.jitter.next_below(REDIAL_JITTER_MAX);
        let Some(m) = self.members.get_mut(&peer) else { return };
        m.dial_under_way = false;
        if let Some(error) = error.filter(|_| m.state != LinkState::Blocked) {
            tracing::debug!(site = %m.member.site, "dial failed: {error}");
            self.changed |= m.set(LinkState::Down { last_error: Some(error) }, now);
        }
        m.next_dial = now + m.backoff + jitter;
        m.backoff = (m.backoff * 2).min(REDIAL_MAX);
    }

    /// Asserts what must hold between any two inputs.
    pub(crate) fn check_invariants(&self) {
        for c in self.connections.values() {
            assert!(self.members.contains_key(&c.peer), "a connection to {} who is not a member", c.peer);
        }
        for (peer, m) in &self.members {
            let connections: Vec<&Connection> =
                self.connections.values().filter(|c| c.peer == *peer).collect();
            let site = &m.member.site;
            assert!(m.up.is_none() || !connections.is_empty(), "{site}: up to the site without a connection");
            if m.state != LinkState::Blocked && connections.iter().any(|c| !c.closing) {
                assert!(m.up.is_some(), "{site}: a connection not closing, and down to the site");
            }
            if matches!(m.state, LinkState::Connected { .. }) {
                assert!(!connections.is_empty(), "{site}: connected without a connection");
            }
            if m.state != LinkState::Blocked && connections.iter().any(|c| !c.closing) {
                assert!(
                    matches!(m.state, LinkState::Connected { .. }),
                    "{site}: {:?} with a connection",
                    m.state
                );
            }
            let kept = connections.iter().filter(|c| c.instance.is_some() && !c.closing).count();
            assert!(kept <= 1, "{site}: {kept} identified connections kept");
            assert!((REDIAL_FIRST..=REDIAL_MAX).contains(&m.backoff), "{site}: backoff {:?}", m.backoff);
            let waiting =
                matches!(m.state, LinkState::Down { .. }) && connections.is_empty() && !m.dial_under_way;
            assert!(
                !waiting || m.next_dial <= self.now + REDIAL_MAX + REDIAL_JITTER_MAX,
                "{site}: down with no redial within {REDIAL_MAX:?}"
            );
        }
    }
}

/// The redial jitter: splitmix64, seeded by the driver.
struct Jitter(u64);

impl Jitter {
    fn next_below(&mut self, bound: Duration) -> Duration {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Duration::from_millis(z % (bound.as_millis() as u64).max(1))
    }
}

#[cfg(test)]
mod tests;

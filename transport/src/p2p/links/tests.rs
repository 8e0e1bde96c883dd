//! The link table's laws, checked two ways: named scenarios, and property tests that drive the
//! tables of several sites through a model of their swarms (dials, connections seen by each end
//! at its own time, identify, gating, restarts) in random orders, then heal the mesh and check
//! that every pair of sites ends up on one connection, the same at both ends.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use libp2p::identity::Keypair;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::*;

/// Sites in the model: with three, every site has a member with a smaller and one with a larger
/// peer id, or two on the same side.
const SITES: usize = 3;
/// Rounds of redialling the heal may take: the backoff is reset by the first connection, so a
/// correct mesh settles in a few.
const HEAL_ROUNDS: usize = 10;
/// Events delivered while quiescing before the model counts as looping.
const QUIESCE_STEPS_MAX: usize = 10_000;

fn peer(i: usize) -> PeerId {
    Keypair::ed25519_from_bytes([i as u8 + 1; 32]).expect("a valid key").public().to_peer_id()
}

fn site(i: usize) -> SiteId {
    SiteId::new(&format!("s{i}")).expect("a valid site id")
}

fn addr(i: usize) -> Multiaddr {
    format!("/ip4/127.0.0.1/udp/{}/quic-v1", 4000 + i).parse().expect("a valid address")
}

fn member(i: usize) -> Member {
    Member { site: site(i), peer: peer(i), addrs: vec![addr(i)] }
}

fn connection(id: usize) -> ConnectionId {
    ConnectionId::new_unchecked(id)
}

/// One site of the model: its table, and what its swarm, its operator and its core saw.
struct Node {
    links: Links,
    /// Its process instance, new at each restart.
    instance: String,
    generation: u32,
    /// Peers its swarm admits.
    allowed: BTreeSet<PeerId>,
    /// Members its operator blocked.
    blocked: BTreeSet<PeerId>,
    /// Events not yet delivered to the table: one queue per connection or failed dial, each in
    /// order, the queues in any order.
    inbox: BTreeMap<Stream, VecDeque<Input>>,
    /// The members its core was told are up.
    up: BTreeSet<PeerId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stream {
    Connection(usize),
    Dial(usize),
}

/// A connection between two sites, seen by the model.
struct Wire {
    /// The site that dialled and the one that listened.
    ends: [usize; 2],
    /// Their generations when it was made: an end that restarted since no longer sees it.
    generations: [u32; 2],
    open: bool,
}

struct PendingDial {
    id: usize,
    from: usize,
    to: usize,
    generation: u32,
}

struct World {
    now: Instant,
    nodes: Vec<Node>,
    wires: BTreeMap<usize, Wire>,
    dials: Vec<PendingDial>,
    next_id: usize,
    sabotage: Option<Sabotage>,
}

#[derive(Clone, Debug)]
enum Op {
    Tick { node: usize, ms: u64 },
    Deliver { node: usize, stream: usize },
    ResolveDial { dial: usize, success: bool },
    Drop { wire: usize },
    Block { node: usize, member: usize, blocked: bool },
    AddAgain { node: usize, member: usize },
    Disconnect { node: usize, member: usize },
    Restart { node: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0..SITES;
    let member = 0..SITES - 1;
    prop_oneof![
        4 => (node.clone(), 0..2_000u64).prop_map(|(node, ms)| Op::Tick { node, ms }),
        8 => (node.clone(), 0..8usize).prop_map(|(node, stream)| Op::Deliver { node, stream }),
        4 => (0..4usize, prop::bool::weighted(0.75)).prop_map(|(dial, success)| Op::ResolveDial { dial, success }),
        1 => (0..8usize).prop_map(|wire| Op::Drop { wire }),
        1 => (node.clone(), member.clone(), any::<bool>())
            .prop_map(|(node, member, blocked)| Op::Block { node, member, blocked }),
        1 => (node.clone(), member.clone()).prop_map(|(node, member)| Op::AddAgain { node, member }),
        1 => (node.clone(), member).prop_map(|(node, member)| Op::Disconnect { node, member }),
        1 => node.prop_map(|node| Op::Restart { node }),
    ]
}

impl World {
    fn new(sabotage: Option<Sabotage>) -> World {
        let now = Instant::now();
        let nodes = (0..SITES)
            .map(|i| Node {
                links: Links::new(peer(i), 0, now),
                instance: String::new(),
                generation: 0,
                allowed: BTreeSet::new(),
                blocked: BTreeSet::new(),
                inbox: BTreeMap::new(),
                up: BTreeSet::new(),
            })
            .collect();
        let mut world = World { now, nodes, wires: BTreeMap::new(), dials: Vec::new(), next_id: 1, sabotage };
        for i in 0..SITES {
            world.start(i);
        }
        world
    }

    /// Starts site `i` afresh: a new instance with a new table that admits every other site.
    fn start(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.generation += 1;
        node.instance = format!("meridian s{i} instance/{}", node.generation);
        node.links = Links::new(peer(i), u64::from(node.generation) << 8 | i as u64, self.now);
        node.links.sabotage = self.sabotage;
        node.allowed.clear();
        node.blocked.clear();
        node.inbox.clear();
        node.up.clear();
        for j in (0..SITES).filter(|j| *j != i) {
            self.apply(i, Input::AddMember(member(j)));
        }
    }

    fn index(peer_id: &PeerId) -> usize {
        (0..SITES).find(|i| peer(*i) == *peer_id).expect("a site of the model")
    }

    /// The `member`-th other site of `node`.
    fn other(node: usize, member: usize) -> usize {
        (node + 1 + member) % SITES
    }

    fn apply(&mut self, i: usize, input: Input) {
        self.nodes[i].links.apply(self.now, input);
        while let Some(action) = self.nodes[i].links.poll_action() {
            self.act(i, action);
        }
    }

    /// Does what the swarm task does with `action` of site `i`.
    fn act(&mut self, i: usize, action: Action) {
        match action {
            Action::Dial { peer: to_peer, addrs } => {
                let to = World::index(&to_peer);
                assert!(
                    !self.nodes[i].blocked.contains(&to_peer),
                    "s{i} dialled s{to}, which its operator blocked"
                );
                assert_eq!(addrs, member(to).addrs);
                let generation = self.nodes[i].generation;
                let dialling =
                    self.dials.iter().any(|d| d.from == i && d.to == to && d.generation == generation);
                // `PeerCondition::DisconnectedAndNotDialing`.
                if dialling || self.open_between(i, to).next().is_some() {
                    let error = "the dial condition was false".to_owned();
                    return self.apply(i, Input::DialFailed { peer: to_peer, error });
                }
                self.dials.push(PendingDial { id: self.next_id, from: i, to, generation });
                self.next_id += 1;
            }
            Action::Close { connection: closed, .. } => {
                let id = self.wires.keys().copied().find(|id| connection(*id) == closed);
                self.close(id.expect("a connection the model made"));
            }
            Action::Disconnect { peer } => self.close_between(i, World::index(&peer)),
            Action::Allow { peer, allowed: true } => {
                self.nodes[i].allowed.insert(peer);
            }
            Action::Allow { peer, allowed: false } => {
                self.nodes[i].allowed.remove(&peer);
                self.close_between(i, World::index(&peer));
            }
            Action::Up { peer, site: told } => {
                assert_eq!(told, site(World::index(&peer)));
                assert!(self.nodes[i].up.insert(peer), "s{i} was told {told} is up twice in a row");
            }
            Action::Down { peer, site: told } => {
                assert!(self.nodes[i].up.remove(&peer), "s{i} was told {told} is down while it was not up");
            }
        }
    }

    fn open_between(&self, a: usize, b: usize) -> impl Iterator<Item = usize> + '_ {
        self.wires
            .iter()
            .filter(move |(_, w)| w.open && (w.ends == [a, b] || w.ends == [b, a]))
            .map(|(id, _)| *id)
    }

    fn close_between(&mut self, a: usize, b: usize) {
        let ids: Vec<usize> = self.open_between(a, b).collect();
        for id in ids {
            self.close(id);
        }
    }

    /// Closes a connection: each end that still runs the process that made it hears so.
    fn close(&mut self, id: usize) {
        let Some(wire) = self.wires.get_mut(&id).filter(|w| w.open) else { return };
        wire.open = false;
        let (ends, generations) = (wire.ends, wire.generations);
        for (end, generation) in ends.into_iter().zip(generations) {
            if self.nodes[end].generation == generation {
                let closed = Input::Closed { connection: connection(id), cause: Some("closed".into()) };
                self.nodes[end].inbox.entry(Stream::Connection(id)).or_default().push_back(closed);
            }
        }
    }

    /// Ends a dial: a connection if it succeeds and both swarms admit each other, else a failure.
    fn resolve_dial(&mut self, index: usize, success: bool) {
        if self.dials.is_empty() {
            return;
        }
        let dial = self.dials.remove(index % self.dials.len());
        let (from, to) = (dial.from, dial.to);
        if self.nodes[from].generation != dial.generation {
            return;
        }
        let admitted =
            self.nodes[from].allowed.contains(&peer(to)) && self.nodes[to].allowed.contains(&peer(from));
        if !(success && admitted) {
            let error = if admitted { "unreachable" } else { "denied" }.to_owned();
            let failed = Input::DialFailed { peer: peer(to), error };
            self.nodes[from].inbox.entry(Stream::Dial(dial.id)).or_default().push_back(failed);
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let generations = [self.nodes[from].generation, self.nodes[to].generation];
        self.wires.insert(id, Wire { ends: [from, to], generations, open: true });
        for (here, there) in [(from, to), (to, from)] {
            let established = Input::Established {
                peer: peer(there),
                connection: connection(id),
                dialled_here: here == from,
                addr: addr(there),
            };
            let identified = Input::Identified {
                peer: peer(there),
                connection: connection(id),
                instance: self.nodes[there].instance.clone(),
            };
            self.nodes[here].inbox.insert(Stream::Connection(id), VecDeque::from([established, identified]));
        }
    }

    fn deliver(&mut self, i: usize, stream: usize) {
        let inbox = &mut self.nodes[i].inbox;
        let Some(key) = inbox.keys().copied().nth(stream % inbox.len().max(1)) else { return };
        let queue = inbox.get_mut(&key).expect("a queue just listed");
        let input = queue.pop_front().expect("queues are never left empty");
        if queue.is_empty() {
            inbox.remove(&key);
        }
        self.apply(i, input);
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::Tick { node, ms } => {
                self.now += Duration::from_millis(ms);
                self.apply(node, Input::Tick);
            }
            Op::Deliver { node, stream } => self.deliver(node, stream),
            Op::ResolveDial { dial, success } => self.resolve_dial(dial, success),
            Op::Drop { wire } => {
                let open: Vec<usize> = self.wires.iter().filter(|(_, w)| w.open).map(|(id, _)| *id).collect();
                if !open.is_empty() {
                    self.close(open[wire % open.len()]);
                }
            }
            Op::Block { node, member, blocked } => {
                let peer = peer(World::other(node, member));
                if blocked {
                    self.nodes[node].blocked.insert(peer);
                } else {
                    self.nodes[node].blocked.remove(&peer);
                }
                self.apply(node, Input::Block { peer, blocked });
            }
            Op::AddAgain { node, member: nth } => {
                self.apply(node, Input::AddMember(member(World::other(node, nth))))
            }
            Op::Disconnect { node, member } => {
                let peer = peer(World::other(node, member));
                self.apply(node, Input::Disconnect { peer, reason: "asked to".into() });
            }
            Op::Restart { node } => {
                // The process is gone, its dials with it; its connections die, which the other
                // ends hear in their own time.
                self.start(node);
                let ids: Vec<usize> = self
                    .wires
                    .iter()
                    .filter(|(_, w)| w.open && w.ends.contains(&node))
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    self.close(id);
                }
            }
        }
    }

    /// What must hold after every step, besides each table's own invariants.
    fn check(&self) {
        for (i, node) in self.nodes.iter().enumerate() {
            node.links.check_invariants();
            for (p, m) in &node.links.members {
                let site = &m.member.site;
                assert_eq!(node.up.contains(p), m.up.is_some(), "s{i}: whether its core thinks {site} is up");
                if node.blocked.contains(p) {
                    assert_eq!(m.state, LinkState::Blocked, "s{i}: {site} was blocked by the operator");
                }
            }
        }
    }

    /// Delivers every event and lets every dial succeed, until nothing is left to do.
    fn quiesce(&mut self) {
        for _ in 0..QUIESCE_STEPS_MAX {
            if let Some(i) = (0..SITES).find(|i| !self.nodes[*i].inbox.is_empty()) {
                self.deliver(i, 0);
            } else if !self.dials.is_empty() {
                self.resolve_dial(0, true);
            } else {
                return;
            }
            self.check();
        }
        panic!("events still flowing after {QUIESCE_STEPS_MAX} steps");
    }

    /// Whether every pair of sites has exactly one connection, the same at both ends, up and
    /// shown connected; `Err` says which pair does not.
    fn settled(&self) -> Result<(), String> {
        for a in 0..SITES {
            for b in (0..SITES).filter(|b| *b != a) {
                let open: Vec<usize> = self.open_between(a, b).collect();
                let [id] = open[..] else { return Err(format!("s{a} and s{b}: connections {open:?}")) };
                let links = &self.nodes[a].links;
                let theirs: Vec<&ConnectionId> =
                    links.connections.iter().filter(|(_, c)| c.peer == peer(b)).map(|(id, _)| id).collect();
                if theirs != [&connection(id)] {
                    return Err(format!("s{a} keeps {theirs:?} to s{b}, the mesh has {id}"));
                }
                let m = &links.members[&peer(b)];
                if m.up.is_none() || !matches!(m.state, LinkState::Connected { .. }) {
                    return Err(format!("s{a}: s{b} is {:?}", m.state));
                }
            }
        }
        Ok(())
    }

    /// Lifts every block and stops failing dials; the mesh must then settle within a few
    /// redial rounds.
    fn heal(&mut self) {
        for i in 0..SITES {
            for peer in std::mem::take(&mut self.nodes[i].blocked) {
                self.apply(i, Input::Block { peer, blocked: false });
            }
        }
        let mut last = Ok(());
        for _ in 0..HEAL_ROUNDS {
            self.quiesce();
            last = self.settled();
            if last.is_ok() {
                return;
            }
            self.now += REDIAL_MAX + REDIAL_JITTER_MAX;
            for i in 0..SITES {
                self.apply(i, Input::Tick);
            }
            self.check();
        }
        panic!("the mesh did not settle in {HEAL_ROUNDS} rounds: {}", last.unwrap_err());
    }
}

/// Runs `ops`, checking after each, then heals the mesh.
fn run(ops: &[Op], sabotage: Option<Sabotage>) {
    let mut world = World::new(sabotage);
    world.check();
    for op in ops {
        world.run(op);
        world.check();
    }
    world.heal();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_order_of_connections_and_failures_keeps_the_rules_and_heals(ops in prop::collection::vec(op(), 0..200)) {
        run(&ops, None);
    }
}

/// Whether the property test catches `sabotage` within 256 random cases.
fn caught(sabotage: Sabotage) -> bool {
    let config = Config { cases: 256, failure_persistence: None, max_shrink_iters: 0, ..Config::default() };
    let mut runner = TestRunner::new(config);
    runner
        .run(&prop::collection::vec(op(), 0..200), |ops| {
            run(&ops, Some(sabotage));
            Ok(())
        })
        .is_err()
}

#[test]
fn the_property_test_catches_sides_that_keep_different_duplicates() {
    assert!(caught(Sabotage::KeepOwnDials));
}

#[test]
fn the_property_test_catches_a_blocked_member_being_dialled() {
    assert!(caught(Sabotage::DialBlocked));
}

// Named scenarios, on one or two tables driven by hand.

fn table(local: usize, members: &[usize], now: Instant) -> Links {
    let mut links = Links::new(peer(local), 7, now);
    for m in members {
        links.apply(now, Input::AddMember(member(*m)));
    }
    drain(&mut links);
    links
}

fn drain(links: &mut Links) -> Vec<Action> {
    std::iter::from_fn(|| links.poll_action()).collect()
}

fn established(links: &mut Links, now: Instant, there: usize, id: usize, dialled_here: bool) -> Vec<Action> {
    let input =
        Input::Established { peer: peer(there), connection: connection(id), dialled_here, addr: addr(there) };
    links.apply(now, input);
    drain(links)
}

fn identified(links: &mut Links, now: Instant, there: usize, id: usize, instance: &str) -> Vec<Action> {
    links.apply(
        now,
        Input::Identified { peer: peer(there), connection: connection(id), instance: instance.into() },
    );
    drain(links)
}

fn closed(links: &mut Links, now: Instant, id: usize) -> Vec<Action> {
    links.apply(now, Input::Closed { connection: connection(id), cause: Some("gone".into()) });
    drain(links)
}

fn up(there: usize) -> Action {
    Action::Up { peer: peer(there), site: site(there) }
}

fn down(there: usize) -> Action {
    Action::Down { peer: peer(there), site: site(there) }
}

fn dial(there: usize) -> Action {
    Action::Dial { peer: peer(there), addrs: vec![addr(there)] }
}

#[test]
fn simultaneous_dials_keep_the_connection_the_smaller_peer_dialled_at_both_ends() {
    let now = Instant::now();
    // `lo` has the smaller peer id. Connection 1 is the one `lo` dialled, 2 the one `hi` dialled.
    let (lo, hi) = if peer(0) < peer(1) { (0, 1) } else { (1, 0) };
    let mut at_lo = table(lo, &[hi], now);
    let mut at_hi = table(hi, &[lo], now);
    at_lo.apply(now, Input::Tick);
    at_hi.apply(now, Input::Tick);
    assert_eq!(drain(&mut at_lo), [dial(hi)]);
    assert_eq!(drain(&mut at_hi), [dial(lo)]);
    assert_eq!(established(&mut at_lo, now, hi, 1, true), [up(hi)]);
    assert_eq!(established(&mut at_lo, now, hi, 2, false), []);
    assert_eq!(established(&mut at_hi, now, lo, 2, true), [up(lo)]);
    assert_eq!(established(&mut at_hi, now, lo, 1, false), []);
    // Identify answers in opposite orders at the two ends; both close connection 2.
    let close_2 = Action::Close { connection: connection(2), why: "a duplicate connection" };
    assert_eq!(identified(&mut at_lo, now, hi, 1, "hi"), []);
    assert_eq!(identified(&mut at_lo, now, hi, 2, "hi"), std::slice::from_ref(&close_2));
    assert_eq!(identified(&mut at_hi, now, lo, 2, "lo"), []);
    assert_eq!(identified(&mut at_hi, now, lo, 1, "lo"), [close_2]);
    // The link may have run on connection 2: it is opened again on connection 1.
    assert_eq!(closed(&mut at_lo, now, 2), [down(hi), up(hi)]);
    assert_eq!(closed(&mut at_hi, now, 2), [down(lo), up(lo)]);
    assert_eq!(at_lo.connections.keys().collect::<Vec<_>>(), [&connection(1)]);
    assert_eq!(at_hi.connections.keys().collect::<Vec<_>>(), [&connection(1)]);
}

#[test]
fn a_restarted_member_is_told_from_a_duplicate_connection_by_its_instance() {
    let now = Instant::now();
    let mut links = table(0, &[1], now);
    assert_eq!(established(&mut links, now, 1, 1, false), [up(1)]);
    assert_eq!(identified(&mut links, now, 1, 1, "old"), []);
    // It restarted: its new connection comes before the old one times out, in either direction.
    assert_eq!(established(&mut links, now, 1, 2, true), []);
    let close_1 = Action::Close { connection: connection(1), why: "the site restarted" };
    assert_eq!(identified(&mut links, now, 1, 2, "new"), [close_1]);
    assert_eq!(closed(&mut links, now, 1), [down(1), up(1)]);
    let m = &links.members[&peer(1)];
    assert!(matches!(m.state, LinkState::Connected { transport: "quic", .. }), "{:?}", m.state);
    // Identified again with the same instance, the connection left is kept.
    assert_eq!(identified(&mut links, now, 1, 2, "new"), []);
}

#[test]
fn redial_backoff_doubles_up_to_its_cap_and_resets_on_a_connection() {
    let mut now = Instant::now();
    let mut links = table(0, &[1], now);
    let mut expected = REDIAL_FIRST;
    for _ in 0..12 {
        let next = links.members[&peer(1)].next_dial;
        now = now.max(next);
        links.apply(now, Input::Tick);
        assert_eq!(drain(&mut links), [dial(1)]);
        links.apply(now, Input::Tick);
        assert_eq!(drain(&mut links), [], "no second dial while one is under way");
        links.apply(now, Input::DialFailed { peer: peer(1), error: "unreachable".into() });
        let m = &links.members[&peer(1)];
        let wait = m.next_dial - now;
        assert!(
            (expected..expected + REDIAL_JITTER_MAX).contains(&wait),
            "waits {wait:?}, backoff {expected:?}"
        );
        assert_eq!(m.state, LinkState::Down { last_error: Some("unreachable".into()) });
        expected = (expected * 2).min(REDIAL_MAX);
    }
    assert_eq!(expected, REDIAL_MAX);
    links.apply(now, Input::Tick);
    assert_eq!(drain(&mut links), [], "not due yet");
    assert_eq!(established(&mut links, now, 1, 1, false), [up(1)], "the member dialled in meanwhile");
    assert_eq!(links.members[&peer(1)].backoff, REDIAL_FIRST);
    // Lost again: redialled after the first delay, without jitter.
    assert_eq!(closed(&mut links, now, 1), [down(1)]);
    let m = &links.members[&peer(1)];
    assert_eq!(m.next_dial, now + REDIAL_FIRST);
    assert_eq!(m.state, LinkState::Down { last_error: Some("gone".into()) });
}

#[test]
fn a_failed_dial_while_connected_changes_nothing() {
    let now = Instant::now();
    let mut links = table(0, &[1], now);
    links.apply(now, Input::Tick);
    assert_eq!(drain(&mut links), [dial(1)]);
    assert_eq!(established(&mut links, now, 1, 1, false), [up(1)]);
    links.apply(now, Input::DialFailed { peer: peer(1), error: "refused".into() });
    assert!(matches!(links.members[&peer(1)].state, LinkState::Connected { .. }));
}

#[test]
fn a_member_without_addresses_is_never_dialled_but_may_dial_in() {
    let now = Instant::now();
    let mut links = table(0, &[], now);
    links.apply(now, Input::AddMember(Member { addrs: Vec::new(), ..member(1) }));
    assert_eq!(drain(&mut links), [Action::Allow { peer: peer(1), allowed: true }]);
    for step in 0..20 {
        links.apply(now + REDIAL_MAX * step, Input::Tick);
        assert_eq!(drain(&mut links), []);
    }
    assert_eq!(established(&mut links, now, 1, 1, false), [up(1)]);
}

#[test]
fn a_blocked_member_is_refused_not_dialled_and_redialled_at_once_when_restored() {
    let now = Instant::now();
    let mut links = table(0, &[1], now);
    assert_eq!(established(&mut links, now, 1, 1, true), [up(1)]);
    links.apply(now, Input::Block { peer: peer(1), blocked: true });
    assert_eq!(drain(&mut links), [Action::Allow { peer: peer(1), allowed: false }]);
    assert_eq!(closed(&mut links, now, 1), [down(1)]);
    assert_eq!(links.members[&peer(1)].state, LinkState::Blocked);
    links.apply(now + REDIAL_MAX, Input::Tick);
    assert_eq!(drain(&mut links), []);
    // Gating refuses its connections; one that got through anyway is closed and not reported.
    let close = Action::Close { connection: connection(2), why: "the member is blocked" };
    assert_eq!(established(&mut links, now, 1, 2, false), [close]);
    assert_eq!(closed(&mut links, now, 2), []);
    let later = now + REDIAL_MAX;
    links.apply(later, Input::Block { peer: peer(1), blocked: false });
    links.apply(later, Input::Tick);
    assert_eq!(drain(&mut links), [Action::Allow { peer: peer(1), allowed: true }, dial(1)]);
    assert_eq!(links.members[&peer(1)].state, LinkState::Down { last_error: None });
}

#[test]
fn a_member_blocked_with_two_connections_goes_down_once_and_never_comes_up_while_they_close() {
    let now = Instant::now();
    let mut links = table(0, &[1], now);
    assert_eq!(established(&mut links, now, 1, 1, true), [up(1)]);
    assert_eq!(established(&mut links, now, 1, 2, false), []);
    links.apply(now, Input::Block { peer: peer(1), blocked: true });
    drain(&mut links);
    // Up again here would let the core sync with a member it was told to cut off.
    assert_eq!(closed(&mut links, now, 1), [down(1)]);
    assert_eq!(closed(&mut links, now, 2), []);
}

#[test]
fn a_member_whose_connections_close_after_a_disconnect_comes_up_on_a_new_one() {
    let now = Instant::now();
    let mut links = table(0, &[1], now);
    assert_eq!(established(&mut links, now, 1, 1, true), [up(1)]);
    assert_eq!(established(&mut links, now, 1, 2, false), []);
    links.apply(now, Input::Disconnect { peer: peer(1), reason: "misbehaved".into() });
    drain(&mut links);
    assert_eq!(closed(&mut links, now, 1), [down(1)]);
    // It dials back in before the last old connection is gone.
    assert_eq!(established(&mut links, now, 1, 3, false), [up(1)]);
    assert_eq!(closed(&mut links, now, 2), [down(1), up(1)]);
}

#[test]
fn adding_a_blocked_member_again_keeps_it_blocked() {
    let now = Instant::now();
    let mut links = table(0, &[1], now);
    links.apply(now, Input::Block { peer: peer(1), blocked: true });
    drain(&mut links);
    links.apply(now, Input::AddMember(member(1)));
    assert_eq!(drain(&mut links), [], "not admitted again");
    assert_eq!(links.members[&peer(1)].state, LinkState::Blocked);
}

#[test]
fn restoring_a_member_that_was_not_blocked_leaves_its_link_as_it_is() {
    let now = Instant::now();
    let mut links = table(0, &[1], now);
    assert_eq!(established(&mut links, now, 1, 1, true), [up(1)]);
    links.apply(now, Input::Block { peer: peer(1), blocked: false });
    assert_eq!(drain(&mut links), [Action::Allow { peer: peer(1), allowed: true }]);
    assert!(matches!(links.members[&peer(1)].state, LinkState::Connected { .. }));
    links.apply(now + REDIAL_MAX, Input::Tick);
    assert_eq!(drain(&mut links), []);
}

#[test]
fn a_tcp_connection_shows_as_tcp() {
    let now = Instant::now();
    let mut links = table(0, &[1], now);
    let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().expect("a valid address");
    links.apply(
        now,
        Input::Established {
            peer: peer(1),
            connection: connection(1),
            dialled_here: true,
            addr: addr.clone(),
        },
    );
    assert_eq!(drain(&mut links), [up(1)]);
    assert_eq!(links.snapshot()[0].state, LinkState::Connected { transport: "tcp", addr });
}

#[test]
fn a_removed_member_goes_down_at_once_and_is_never_dialled_or_admitted_again() {
    let now = Instant::now();
    let mut links = table(0, &[1], now);
    assert_eq!(established(&mut links, now, 1, 1, true), [up(1)]);
    links.apply(now, Input::RemoveMember { peer: peer(1) });
    let refuse = Action::Allow { peer: peer(1), allowed: false };
    assert_eq!(drain(&mut links), [refuse, Action::Disconnect { peer: peer(1) }, down(1)]);
    assert_eq!(closed(&mut links, now, 1), [], "its closing is not reported twice");
    links.apply(now + REDIAL_MAX, Input::Tick);
    assert_eq!(drain(&mut links), []);
    assert_eq!(established(&mut links, now, 1, 2, false), [], "not a member: not up");
    assert!(links.snapshot().is_empty());
}

#[test]
fn a_new_peer_id_for_a_member_replaces_the_old_one() {
    let now = Instant::now();
    let mut links = table(0, &[1], now);
    assert_eq!(established(&mut links, now, 1, 1, true), [up(1)]);
    // Site s1's key was rotated: its new peer id is peer(2)'s.
    links.apply(now, Input::AddMember(Member { peer: peer(2), ..member(1) }));
    let actions = drain(&mut links);
    assert_eq!(
        actions,
        [
            Action::Allow { peer: peer(1), allowed: false },
            Action::Disconnect { peer: peer(1) },
            down(1),
            Action::Allow { peer: peer(2), allowed: true },
        ]
    );
    let snapshot = links.snapshot();
    assert_eq!(snapshot.len(), 1);
    assert_eq!((snapshot[0].member.site.clone(), snapshot[0].member.peer), (site(1), peer(2)));
    assert_eq!(links.site_of(&peer(1)), None);
}

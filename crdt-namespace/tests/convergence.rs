//! The convergence property: 2–5 replicas, random operations biased toward collisions, random
//! delivery (single sync steps, stale duplicates, whole exports). After a final exchange all
//! replicas are identical, the tree invariant holds, and no write is lost.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use common::*;
use crdt_namespace::{ContentId, EntryKind, Hlc, Namespace, NewVersion, SyncSession};
use proptest::prelude::*;

const NAMES: [&str; 3] = ["a", "b", "c.clip"];

/// A path of depth 1–3 over a tiny alphabet, so that operations collide.
fn path(index: u8) -> String {
    let mut i = index as usize % (3 + 9 + 27);
    let depth = if i < 3 {
        1
    } else if i < 12 {
        i -= 3;
        2
    } else {
        i -= 12;
        3
    };
    let mut parts = Vec::new();
    for _ in 0..depth {
        parts.push(NAMES[i % 3]);
        i /= 3;
    }
    format!("/{}", parts.join("/"))
}

#[derive(Clone, Debug)]
enum Action {
    Mkdir { r: u8, p: u8 },
    Write { r: u8, p: u8 },
    Rename { r: u8, from: u8, to: u8 },
    Remove { r: u8, p: u8 },
    Tag { r: u8, p: u8, value: u8 },
    Attr { r: u8, p: u8, mode: u16 },
    SyncStep { from: u8, to: u8 },
    Redeliver { from: u8, to: u8, back: u8 },
    Import { from: u8, to: u8 },
    Tick { r: u8, ms: u16 },
}

fn action() -> impl Strategy<Value = Action> {
    let r = any::<u8>();
    let p = any::<u8>();
    prop_oneof![
        3 => (r, p).prop_map(|(r, p)| Action::Mkdir { r, p }),
        5 => (r, p).prop_map(|(r, p)| Action::Write { r, p }),
        3 => (r, p, any::<u8>()).prop_map(|(r, from, to)| Action::Rename { r, from, to }),
        2 => (r, p).prop_map(|(r, p)| Action::Remove { r, p }),
        1 => (r, p, 0u8..3).prop_map(|(r, p, value)| Action::Tag { r, p, value }),
        1 => (r, p, any::<u16>()).prop_map(|(r, p, mode)| Action::Attr { r, p, mode }),
        4 => (r, any::<u8>()).prop_map(|(from, to)| Action::SyncStep { from, to }),
        1 => (r, any::<u8>(), any::<u8>()).prop_map(|(from, to, back)| Action::Redeliver { from, to, back }),
        1 => (r, any::<u8>()).prop_map(|(from, to)| Action::Import { from, to }),
        2 => (r, any::<u16>()).prop_map(|(r, ms)| Action::Tick { r, ms }),
    ]
}

struct World {
    replicas: Vec<Namespace>,
    /// Wall clock of each replica, in milliseconds (skewed apart by ticks).
    clocks: Vec<u64>,
    sessions: HashMap<(usize, usize), SyncSession>,
    sent: HashMap<(usize, usize), Vec<Vec<u8>>>,
    next_content: u64,
    written: BTreeSet<ContentId>,
    /// Versions that a later write at the same site replaced, or that a remove had seen.
    discarded: BTreeSet<ContentId>,
}

impl World {
    fn new(n: usize) -> World {
        World {
            replicas: replicas(n),
            clocks: vec![1_000; n],
            sessions: HashMap::new(),
            sent: HashMap::new(),
            next_content: 0,
            written: BTreeSet::new(),
            discarded: BTreeSet::new(),
        }
    }

    fn hlc(&mut self, r: usize) -> Hlc {
        self.clocks[r] += 1;
        Hlc::new(self.clocks[r], 0)
    }

    fn versions_below(&self, r: usize, path: &str) -> Vec<ContentId> {
        match self.replicas[r].walk(path) {
            Ok(entries) => {
                entries.iter().filter_map(|e| e.stat.version.as_ref().map(|v| v.content)).collect()
            }
            Err(_) => Vec::new(),
        }
    }

    fn step(&mut self, a: &Action) {
        let n = self.replicas.len();
        match *a {
            Action::Mkdir { r, p } => {
                let r = r as usize % n;
                let hlc = self.hlc(r);
                let _ = self.replicas[r].mkdir(&path(p), true, 0o755, 0, hlc);
            }
            Action::Write { r, p } => {
                let r = r as usize % n;
                let hlc = self.hlc(r);
                self.next_content += 1;
                let mut id = [0u8; 32];
                id[..8].copy_from_slice(&self.next_content.to_be_bytes());
                let content = ContentId(id);
                let path = path(p);
                let before = self.replicas[r].stat(&path).ok().and_then(|s| s.version).map(|v| v.content);
                let v = NewVersion { content, size: self.next_content, mode: 0o644, mtime_ns: 0 };
                if self.replicas[r].write_file(&path, v, hlc).is_ok() {
                    self.written.insert(content);
                    self.discarded.extend(before);
                }
            }
            Action::Rename { r, from, to } => {
                let r = r as usize % n;
                let hlc = self.hlc(r);
                let _ = self.replicas[r].rename(&path(from), &path(to), hlc);
            }
            Action::Remove { r, p } => {
                let r = r as usize % n;
                let hlc = self.hlc(r);
                let path = path(p);
                let seen = self.versions_below(r, &path);
                if self.replicas[r].remove(&path, true, hlc).is_ok() {
                    self.discarded.extend(seen);
                }
            }
            Action::Tag { r, p, value } => {
                let r = r as usize % n;
                let hlc = self.hlc(r);
                let _ = self.replicas[r].set_tag(&path(p), "stage", &format!("s{value}"), hlc);
            }
            Action::Attr { r, p, mode } => {
                let r = r as usize % n;
                let hlc = self.hlc(r);
                let _ = self.replicas[r].set_attr(&path(p), Some(u32::from(mode)), None, hlc);
            }
            Action::SyncStep { from, to } => {
                let (from, to) = (from as usize % n, to as usize % n);
                if from != to {
                    self.sync_step(from, to);
                }
            }
            Action::Redeliver { from, to, back } => {
                let (from, to) = (from as usize % n, to as usize % n);
                let old = self.sent.get(&(from, to)).and_then(|s| {
                    let back = back as usize % s.len().max(1);
                    s.len().checked_sub(1 + back).map(|i| s[i].clone())
                });
                if let Some(message) = old {
                    let session = self.sessions.entry((to, from)).or_default();
                    // A stale duplicate may be refused by the protocol; it must never corrupt.
                    let _ = self.replicas[to].receive_sync_message(session, &message);
                }
            }
            Action::Import { from, to } => {
                let (from, to) = (from as usize % n, to as usize % n);
                let export = self.replicas[from].export_since(&[]);
                self.replicas[to].import(&export).unwrap();
            }
            Action::Tick { r, ms } => {
                let r = r as usize % n;
                self.clocks[r] += u64::from(ms);
            }
        }
    }

    /// One message of the session from `from` to `to`. Returns whether one was sent.
    fn sync_step(&mut self, from: usize, to: usize) -> bool {
        let session = self.sessions.entry((from, to)).or_default();
        let Some(message) = self.replicas[from].generate_sync_message(session) else { return false };
        let session = self.sessions.entry((to, from)).or_default();
        self.replicas[to].receive_sync_message(session, &message).unwrap();
        self.sent.entry((from, to)).or_default().push(message);
        true
    }

    /// Runs every pair's sessions until nobody has anything to say.
    fn settle(&mut self) {
        let n = self.replicas.len();
        for _pass in 0..50 {
            let mut quiet = true;
            for a in 0..n {
                for b in 0..n {
                    if a != b && self.sync_step(a, b) {
                        quiet = false;
                    }
                }
            }
            if quiet {
                return;
            }
        }
        panic!("sync sessions did not settle within 50 passes");
    }
}

fn check(n: usize, actions: &[Action]) -> Result<(), TestCaseError> {
    let mut world = World::new(n);
    for a in actions {
        world.step(a);
        for r in &world.replicas {
            prop_assert!(r.check_invariants().is_ok(), "{}: {:?}", r.site(), r.check_invariants());
        }
    }
    world.settle();
    let first = world.replicas[0].walk("/").unwrap();
    for r in &world.replicas[1..] {
        prop_assert_eq!(render(&r.walk("/").unwrap()), render(&first));
        prop_assert_eq!(&r.walk("/").unwrap(), &first, "stats differ at {}", r.site());
    }
    // Every live entry is reachable by exactly one path: paths unique, ids unique.
    let ids: BTreeMap<&str, &str> = first.iter().map(|e| (e.stat.id.as_str(), e.path.as_str())).collect();
    prop_assert_eq!(ids.len(), first.len());
    // No write is lost unless a later write replaced it or a remove had seen it.
    let live: BTreeSet<ContentId> = first
        .iter()
        .filter(|e| e.stat.kind == EntryKind::File)
        .map(|e| e.stat.version.as_ref().unwrap().content)
        .collect();
    for content in world.written.difference(&world.discarded) {
        prop_assert!(live.contains(content), "version {} was lost", content);
    }
    // A fresh replica loaded from a save shows the same tree.
    let saved = world.replicas[0].save();
    let loaded = load("west", &saved).unwrap();
    prop_assert_eq!(&loaded.walk("/").unwrap(), &first);
    Ok(())
}

fn cases() -> u32 {
    std::env::var("MERIDIAN_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_and_lose_nothing(n in 2usize..=5, actions in proptest::collection::vec(action(), 1..80)) {
        check(n, &actions)?;
    }
}

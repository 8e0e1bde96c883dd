//! Bad input from a peer or from disk: truncated, mutated or hostile bytes give an error and
//! leave the namespace unchanged; nothing panics.

mod common;

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, ObjType, ReadDoc, ScalarValue};
use common::*;
use crdt_namespace::{ExchangeError, Namespace, SyncSession, WalkEntry};
use proptest::prelude::*;

fn victim() -> Namespace {
    let mut ns = replica("west");
    ns.mkdir("/shots/sq010", true, 0o755, 0, hlc(1)).unwrap();
    ns.write_file("/shots/sq010/shot010.clip", version(1), hlc(2)).unwrap();
    ns.set_tag("/shots", "project", "apollo", hlc(3)).unwrap();
    ns
}

fn peer_with_changes() -> Namespace {
    let mut peer = replica("east");
    peer.import(&victim().export_since(&[])).unwrap();
    peer.mkdir("/east/work", true, 0o755, 0, hlc(10)).unwrap();
    peer.write_file("/east/work/a", version(2), hlc(11)).unwrap();
    peer.rename("/shots/sq010/shot010.clip", "/east/shot010.clip", hlc(12)).unwrap();
    peer.remove("/shots", true, hlc(13)).unwrap();
    peer
}

/// Frames raw automerge changes as `Namespace::export_since` does.
fn frame(changes: &[Vec<u8>]) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut out = b"mrdn-ex1".to_vec();
    varint(&mut out, changes.len() as u64);
    for c in changes {
        varint(&mut out, c.len() as u64);
        out.extend_from_slice(c);
    }
    out
}

fn snapshot(ns: &mut Namespace) -> (Vec<WalkEntry>, Vec<crdt_namespace::ChangeHash>) {
    (ns.walk("/").unwrap(), ns.heads())
}

fn mutate(mut bytes: Vec<u8>, flips: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    if !bytes.is_empty() {
        for (at, value) in flips {
            let at = at % bytes.len();
            bytes[at] = *value;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut % (bytes.len() + 1));
    }
    bytes
}

fn cases() -> u32 {
    std::env::var("MERIDIAN_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn mutated_exports_are_refused_or_harmless(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let mut peer = peer_with_changes();
        let bytes = mutate(peer.export_since(&[]), &flips, cut);
        let mut ns = victim();
        let before = snapshot(&mut ns);
        if ns.import(&bytes).is_err() {
            prop_assert_eq!(snapshot(&mut ns), before);
        }
        prop_assert!(ns.check_invariants().is_ok());
    }

    #[test]
    fn mutated_sync_messages_are_refused_or_harmless(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let mut peer = peer_with_changes();
        let mut ns = victim();
        // Bring the sessions to the point where the peer sends its changes.
        let (mut sp, mut sn) = (SyncSession::new(), SyncSession::new());
        let first = ns.generate_sync_message(&mut sn).unwrap();
        peer.receive_sync_message(&mut sp, &first).unwrap();
        let message = peer.generate_sync_message(&mut sp).unwrap();
        let bytes = mutate(message, &flips, cut);
        let before = snapshot(&mut ns);
        if ns.receive_sync_message(&mut sn, &bytes).is_err() {
            prop_assert_eq!(snapshot(&mut ns), before);
        }
        prop_assert!(ns.check_invariants().is_ok());
    }

    #[test]
    fn mutated_saves_are_refused_or_load_a_valid_tree(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let bytes = mutate(peer_with_changes().save(), &flips, cut);
        if let Ok(ns) = load("west", &bytes) {
            prop_assert!(ns.check_invariants().is_ok());
        }
    }

    #[test]
    fn random_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut ns = victim();
        let before = snapshot(&mut ns);
        prop_assert!(ns.import(&bytes).is_err());
        let mut session = SyncSession::new();
        let _ = ns.receive_sync_message(&mut session, &bytes);
        prop_assert!(load("west", &bytes).is_err() || bytes.is_empty());
        prop_assert_eq!(snapshot(&mut ns), before);
    }
}

/// A document that shares the victim's history and adds one hostile change by `actor`.
fn hostile_change(actor: &str, edit: impl FnOnce(&mut AutoCommit)) -> (Namespace, Vec<u8>) {
    let mut ns = victim();
    let mut doc = AutoCommit::load(&ns.save()).unwrap();
    doc.set_actor(ActorId::from(actor.as_bytes()));
    let heads = doc.get_heads();
    edit(&mut doc);
    doc.commit();
    let changes: Vec<Vec<u8>> = doc.get_changes(&heads).iter().map(|c| c.raw_bytes().to_vec()).collect();
    assert_eq!(changes.len(), 1);
    (ns, frame(&changes))
}

fn a_valid_op(doc: &AutoCommit) -> Vec<u8> {
    nth_op(doc, 0)
}

fn nth_op(doc: &AutoCommit, n: usize) -> Vec<u8> {
    let key = doc.keys(automerge::ROOT).nth(n).unwrap();
    match doc.get(automerge::ROOT, key.as_str()).unwrap().unwrap().0 {
        automerge::Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Bytes(b) => b.clone(),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

fn assert_refused(name: &str, edit: impl FnOnce(&mut AutoCommit)) {
    let (mut ns, export) = hostile_change("east", edit);
    let before = snapshot(&mut ns);
    let err = ns.import(&export).unwrap_err();
    assert!(matches!(err, ExchangeError::InvalidChange { .. }), "{name}: {err}");
    assert_eq!(snapshot(&mut ns), before, "{name} changed the namespace");
}

#[test]
fn well_formed_but_hostile_changes_are_refused() {
    assert_refused("a string value", |d| {
        d.put(automerge::ROOT, "ffffffffffff0000.east", "hello").unwrap();
    });
    assert_refused("junk bytes", |d| {
        d.put(automerge::ROOT, "ffffffffffff0000.east", ScalarValue::Bytes(vec![1, 99, 3])).unwrap();
    });
    assert_refused("a key that is no operation id", |d| {
        let op = a_valid_op(d);
        d.put(automerge::ROOT, "hello", ScalarValue::Bytes(op)).unwrap();
    });
    assert_refused("an operation signed by another site", |d| {
        let op = a_valid_op(d);
        d.put(automerge::ROOT, "ffffffffffff0000.west", ScalarValue::Bytes(op)).unwrap();
    });
    assert_refused("an overwrite of an existing operation", |d| {
        let key = d.keys(automerge::ROOT).next().unwrap();
        let other = nth_op(d, 1);
        d.put(automerge::ROOT, key.as_str(), ScalarValue::Bytes(other)).unwrap();
    });
    assert_refused("a deletion of an operation", |d| {
        let key = d.keys(automerge::ROOT).next().unwrap();
        d.delete(automerge::ROOT, key.as_str()).unwrap();
    });
    assert_refused("a nested object", |d| {
        d.put_object(automerge::ROOT, "ffffffffffff0000.east", ObjType::Map).unwrap();
    });
}

#[test]
fn hostile_documents_on_disk_are_refused() {
    let mut doc = AutoCommit::new();
    doc.set_actor(ActorId::from(b"east".as_slice()));
    doc.put(automerge::ROOT, "ffffffffffff0000.east", "not an operation").unwrap();
    let err = load("west", &doc.save()).err().unwrap();
    assert!(err.to_string().contains("is not bytes"), "{err}");
}

#[test]
fn hostile_sync_messages_are_refused() {
    let mut ns = victim();
    let mut evil = AutoCommit::load(&ns.save()).unwrap();
    evil.set_actor(ActorId::from(b"east".as_slice()));
    evil.put(automerge::ROOT, "ffffffffffff0000.east", ScalarValue::Bytes(vec![1, 2, 3])).unwrap();
    evil.commit();
    let (mut s_evil, mut s_ns) = (automerge::sync::State::new(), SyncSession::new());
    let before = snapshot(&mut ns);
    let mut refused = false;
    for _ in 0..4 {
        use automerge::sync::SyncDoc;
        if let Some(m) = ns.generate_sync_message(&mut s_ns) {
            evil.sync()
                .receive_sync_message(&mut s_evil, automerge::sync::Message::decode(&m).unwrap())
                .unwrap();
        }
        if let Some(m) = evil.sync().generate_sync_message(&mut s_evil)
            && ns.receive_sync_message(&mut s_ns, &m.encode()).is_err()
        {
            refused = true;
            break;
        }
    }
    assert!(refused, "the hostile change was never refused");
    assert_eq!(snapshot(&mut ns), before);
}

#[test]
fn oversized_inputs_are_refused_before_parsing() {
    let mut ns = victim();
    let huge = vec![0u8; crdt_namespace::IMPORT_MAX_BYTES + 1];
    assert!(matches!(ns.import(&huge), Err(ExchangeError::TooLarge { .. })));
}

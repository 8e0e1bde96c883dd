//! Sync sessions reach quiescence within a bounded number of rounds, send nothing twice, and
//! take one round trip when the replicas are already in sync.

mod common;

use std::collections::HashSet;

use automerge::sync::Message;
use common::*;
use crdt_namespace::{ChangeHash, Namespace, SyncSession};

/// The hashes of the changes a sync message carries.
fn change_hashes(message: &[u8]) -> Vec<ChangeHash> {
    let message = Message::decode(message).unwrap();
    let mut hashes = Vec::new();
    for bytes in message.changes.iter() {
        let mut doc = automerge::Automerge::new();
        doc.load_incremental(bytes).unwrap();
        hashes.extend(doc.get_changes(&[]).iter().map(|c| c.hash()));
    }
    hashes
}

struct Run {
    /// Messages sent, both directions.
    messages: usize,
    /// Round trips: pairs of turns (a speaks, then b speaks).
    round_trips: usize,
    bytes: usize,
}

/// Runs a session between `a` and `b` until neither has anything to say, asserting that no
/// change is sent twice in one direction and that it ends within `max_round_trips`.
fn run(
    a: &mut Namespace,
    sa: &mut SyncSession,
    b: &mut Namespace,
    sb: &mut SyncSession,
    max_round_trips: usize,
) -> Run {
    let mut sent_ab: HashSet<ChangeHash> = HashSet::new();
    let mut sent_ba: HashSet<ChangeHash> = HashSet::new();
    let mut run = Run { messages: 0, round_trips: 0, bytes: 0 };
    loop {
        let mut spoke = false;
        if let Some(m) = a.generate_sync_message(sa) {
            for h in change_hashes(&m) {
                assert!(sent_ab.insert(h), "change {h} sent twice from {}", a.site());
            }
            b.receive_sync_message(sb, &m).unwrap();
            run.messages += 1;
            run.bytes += m.len();
            spoke = true;
        }
        if let Some(m) = b.generate_sync_message(sb) {
            for h in change_hashes(&m) {
                assert!(sent_ba.insert(h), "change {h} sent twice from {}", b.site());
            }
            a.receive_sync_message(sa, &m).unwrap();
            run.messages += 1;
            run.bytes += m.len();
            spoke = true;
        }
        if !spoke {
            return run;
        }
        run.round_trips += 1;
        assert!(run.round_trips <= max_round_trips, "no quiescence after {max_round_trips} round trips");
    }
}

fn diverged(ops_each: u64) -> Vec<Namespace> {
    let mut rs = replicas(2);
    rs[0].mkdir("/shared", false, 0o755, 0, hlc(1)).unwrap();
    share(&mut rs);
    for (i, r) in rs.iter_mut().enumerate() {
        for k in 0..ops_each {
            r.write_file(&format!("/shared/{}-{k}", SITES[i]), version(k as u8), hlc(10 + k)).unwrap();
            if k % 7 == 0 {
                r.commit();
            }
        }
    }
    rs
}

#[test]
fn diverged_replicas_reach_quiescence_without_sending_anything_twice() {
    let mut rs = diverged(60);
    let (a, b) = rs.split_at_mut(1);
    let (mut sa, mut sb) = (SyncSession::new(), SyncSession::new());
    let run = run(&mut a[0], &mut sa, &mut b[0], &mut sb, 6);
    assert!(run.messages > 0);
    assert_eq!(a[0].walk("/").unwrap(), b[0].walk("/").unwrap());
    assert_eq!(a[0].len(), 121);
    assert_eq!(a[0].heads(), b[0].heads());
}

#[test]
fn replicas_in_sync_finish_in_one_round_trip() {
    let mut rs = diverged(30);
    share(&mut rs);
    let (a, b) = rs.split_at_mut(1);
    // Fresh sessions, as after a restart without saved session state.
    let (mut sa, mut sb) = (SyncSession::new(), SyncSession::new());
    let run = run(&mut a[0], &mut sa, &mut b[0], &mut sb, 1);
    assert_eq!(run.round_trips, 1);
    assert!(run.messages <= 2, "{} messages", run.messages);
}

#[test]
fn one_change_between_synced_replicas_takes_one_round_trip_and_few_bytes() {
    let mut rs = diverged(30);
    let (a, b) = rs.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    let (mut sa, mut sb) = (SyncSession::new(), SyncSession::new());
    run(a, &mut sa, b, &mut sb, 6);
    a.write_file("/shared/one-more", version(99), hlc(1_000)).unwrap();
    let one = run(a, &mut sa, b, &mut sb, 1);
    assert_eq!(one.round_trips, 1);
    assert!(one.bytes <= 2048, "{} bytes", one.bytes);
    assert_eq!(b.stat("/shared/one-more").unwrap().size, 99);
    // Sessions restored from their encoding (after a restart) know the peer's last heads but
    // not what is in flight: they first exchange heads, then the change.
    let mut sa = SyncSession::decode(&sa.encode()).unwrap();
    let mut sb = SyncSession::decode(&sb.encode()).unwrap();
    b.write_file("/shared/after-restart", version(98), hlc(2_000)).unwrap();
    let restored = run(a, &mut sa, b, &mut sb, 2);
    assert!(restored.bytes <= 4096, "{} bytes", restored.bytes);
    assert_eq!(a.stat("/shared/after-restart").unwrap().size, 98);
    assert!(SyncSession::decode(b"not a session").is_err());
}

#[test]
fn imports_are_idempotent_and_exports_since_heads_carry_only_what_is_missing() {
    let mut rs = diverged(10);
    let heads = rs[1].heads();
    let all = rs[0].export_since(&[]);
    let report = rs[1].import(&all).unwrap();
    assert_eq!(report.ops, 10);
    assert_eq!(rs[1].import(&all).unwrap().ops, 0);
    rs[0].write_file("/shared/late", version(5), hlc(500)).unwrap();
    let heads_after = rs[1].heads();
    assert_ne!(heads, heads_after);
    let delta = rs[0].export_since(&heads_after);
    assert!(delta.len() < all.len());
    assert_eq!(rs[1].import(&delta).unwrap().ops, 1);
    assert_eq!(rs[1].stat("/shared/late").unwrap().size, 5);
    assert_eq!(rs[1].len(), 1 + 10 + 10 + 1);
}

#[test]
fn incremental_saves_load_back() {
    let mut ns = replica("west");
    ns.mkdir("/a", false, 0o755, 0, hlc(1)).unwrap();
    let mut saved = ns.save();
    for k in 0..5u8 {
        ns.write_file(&format!("/a/{k}"), version(k), hlc(10 + u64::from(k))).unwrap();
        saved.extend(ns.save_incremental());
    }
    ns.rename("/a/0", "/zero", hlc(100)).unwrap();
    saved.extend(ns.save_incremental());
    let mut loaded = load("west", &saved).unwrap();
    assert_eq!(loaded.walk("/").unwrap(), ns.walk("/").unwrap());
    // The loaded replica keeps writing as the same site, after what it loaded.
    loaded.write_file("/a/late", version(9), hlc(5)).unwrap();
    assert!(loaded.stat("/a/late").unwrap().version.unwrap().hlc > hlc(100));
    let mut peer = replica("east");
    peer.import(&loaded.export_since(&[])).unwrap();
    assert_eq!(peer.walk("/").unwrap(), loaded.walk("/").unwrap());
}

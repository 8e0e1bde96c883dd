//! Clock bounds: an operation far ahead of the receiver's clock is held, not integrated, until
//! the clock reaches it; no value from a peer can make a site reuse an operation id (which would
//! overwrite a write it acknowledged).

mod common;

use common::*;
use crdt_namespace::{Hlc, OpError};

/// Now, in the tests' world: 2026-12-01.
const NOW_MS: u64 = 1_796_083_200_000;
const FIVE_MINUTES_MS: u64 = 300_000;

#[test]
fn an_operation_far_ahead_is_held_until_the_clock_reaches_it() {
    let mut west = replica("west");
    west.mkdir("/now", false, 0o755, 0, Hlc::new(NOW_MS, 0)).unwrap();
    // Two changes: a change is held (or applied) whole.
    west.commit();
    west.mkdir("/next-week", false, 0o755, 0, Hlc::new(NOW_MS + 7 * 86_400_000, 0)).unwrap();
    let mut north = replica("north");
    north.set_clock_bound(Hlc::new(NOW_MS + FIVE_MINUTES_MS, 0));
    let report = north.import(&west.export_since(&[])).unwrap();
    assert_eq!(report.held, 1, "{report:?}");
    assert!(north.stat("/now").is_ok());
    assert!(north.stat("/next-week").is_err(), "integrated early");
    assert_eq!(north.held_changes().get("west"), Some(&1));
    assert!(north.last_hlc() < Hlc::new(NOW_MS + FIVE_MINUTES_MS, 0), "the clock did not jump");
    // A week later the change is integrated.
    let report = north.set_clock_bound(Hlc::new(NOW_MS + 7 * 86_400_000 + FIVE_MINUTES_MS, 0));
    assert_eq!(report.ops, 1);
    assert!(north.stat("/next-week").is_ok());
    assert!(north.held_changes().is_empty());
}

#[test]
fn operations_at_the_extremes_of_the_clock_neither_stall_nor_overwrite_local_writes() {
    let mut east = replica("east");
    east.mkdir("/at-zero", false, 0o755, 0, Hlc::ZERO).unwrap();
    east.commit();
    east.mkdir("/at-max", false, 0o755, 0, Hlc::from_raw(u64::MAX - 1)).unwrap();
    let mut north = replica("north");
    north.set_clock_bound(Hlc::new(NOW_MS + FIVE_MINUTES_MS, 0));
    let report = north.import(&east.export_since(&[])).unwrap();
    assert_eq!((report.ops, report.held), (1, 1), "{report:?}");
    // The same by a sync session.
    let mut south = replica("south");
    south.set_clock_bound(Hlc::new(NOW_MS + FIVE_MINUTES_MS, 0));
    let (mut s_east, mut s_south) = (crdt_namespace::SyncSession::new(), crdt_namespace::SyncSession::new());
    let mut held = 0;
    for _ in 0..6 {
        if let Some(m) = east.generate_sync_message(&mut s_east) {
            held += south.receive_sync_message(&mut s_south, &m).unwrap().held;
        }
        if let Some(m) = south.generate_sync_message(&mut s_south) {
            east.receive_sync_message(&mut s_east, &m).unwrap();
        }
    }
    assert!(held >= 1 && south.stat("/at-max").is_err() && south.stat("/at-zero").is_ok());

    // North keeps writing: every write gets an id of its own and survives a restart and
    // replication.
    for i in 0..1_000u64 {
        north.mkdir(&format!("/local-{i}"), false, 0o755, 0, Hlc::new(NOW_MS + i, 0)).unwrap();
    }
    let reloaded = load("north", &north.save()).unwrap();
    let mut west = replica("west");
    west.import(&north.export_since(&[])).unwrap();
    for ns in [&north, &reloaded, &west] {
        assert_eq!(ns.list("/").unwrap().len(), 1_001, "{}", ns.site());
    }
}

#[test]
fn without_a_bound_a_saturated_clock_refuses_a_write_instead_of_overwriting_one() {
    let mut east = replica("east");
    east.mkdir("/at-max", false, 0o755, 0, Hlc::from_raw(u64::MAX - 1)).unwrap();
    let mut north = replica("north");
    north.import(&east.export_since(&[])).unwrap();
    north.mkdir("/first", false, 0o755, 0, Hlc::new(NOW_MS, 0)).unwrap();
    let second = north.mkdir("/second", false, 0o755, 0, Hlc::new(NOW_MS, 1));
    assert!(matches!(second, Err(OpError::ClockExhausted { .. })), "{second:?}");
    assert!(north.stat("/first").is_ok(), "the acknowledged write is still there");
    let copy = load("north", &north.save()).unwrap();
    assert!(copy.stat("/first").is_ok());
}

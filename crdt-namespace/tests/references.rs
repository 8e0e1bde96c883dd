//! What refers to a version, and how much of each site's history a replica holds: the facts
//! space reclamation decides on.

mod common;

use common::*;
use crdt_namespace::Frontier;

#[test]
fn a_version_is_referred_to_while_a_live_entry_shows_it() {
    let mut rs = replicas(2);
    rs[0].write_file("/before", version(9), hlc(1)).unwrap();
    assert!(rs[0].take_touched_versions().is_empty(), "nothing is noted until someone asks");
    rs[0].mkdir("/d", false, 0o755, 0, hlc(1)).unwrap();
    rs[0].write_file("/d/a", version(1), hlc(2)).unwrap();
    let v1 = version(1).content;
    assert!(rs[0].refers_to(&v1) && rs[0].refers_to(&version(9).content));
    assert!(rs[0].take_touched_versions().contains(&v1));
    assert!(rs[0].take_touched_versions().is_empty(), "taken once");
    // A new version: the old one is no longer shown.
    rs[0].write_file("/d/a", version(2), hlc(3)).unwrap();
    assert!(!rs[0].refers_to(&v1));
    assert!(rs[0].refers_to(&version(2).content));
    // A second entry showing version 2, then removing the first: still referred to.
    rs[0].write_file("/d/b", version(2), hlc(4)).unwrap();
    rs[0].remove("/d/a", false, hlc(5)).unwrap();
    assert!(rs[0].refers_to(&version(2).content));
    // Removing the directory removes the last.
    rs[0].remove("/d", true, hlc(6)).unwrap();
    assert!(!rs[0].refers_to(&version(2).content));
    assert!(rs[0].take_touched_versions().contains(&version(2).content));
    // The other replica gets there too.
    share(&mut rs);
    assert!(!rs[1].refers_to(&v1) && !rs[1].refers_to(&version(2).content));
}

#[test]
fn a_move_concurrent_with_a_remove_brings_the_version_back_and_touches_it() {
    let mut rs = replicas(2);
    rs[0].write_file("/a", version(7), hlc(1)).unwrap();
    share(&mut rs);
    let v = version(7).content;
    rs[0].remove("/a", false, hlc(10)).unwrap();
    rs[1].mkdir("/keep", false, 0o755, 0, hlc(11)).unwrap();
    rs[1].rename("/a", "/keep/a", hlc(12)).unwrap();
    assert!(!rs[0].refers_to(&v));
    rs[0].take_touched_versions();
    share(&mut rs);
    assert!(rs[0].refers_to(&v), "the move brings the file back");
    assert!(rs[0].take_touched_versions().contains(&v));
    rs[0].check_invariants().unwrap();
}

#[test]
fn the_frontier_names_each_sites_last_change_held() {
    let mut rs = replicas(2);
    assert!(rs[0].frontier().is_empty());
    rs[0].mkdir("/a", false, 0o755, 0, hlc(1)).unwrap();
    rs[0].mkdir("/b", false, 0o755, 0, hlc(2)).unwrap();
    let f0 = rs[0].frontier();
    assert_eq!(f0.get(&site("west")), 1, "two operations, one change (committed together)");
    rs[1].mkdir("/c", false, 0o755, 0, hlc(3)).unwrap();
    assert!(!rs[1].frontier().covers(&f0));
    share(&mut rs);
    let (f0, f1) = (rs[0].frontier(), rs[1].frontier());
    assert_eq!(f0, f1);
    assert!(f1.covers(&[(site("west"), 1), (site("east"), 1)].into_iter().collect::<Frontier>()));
}

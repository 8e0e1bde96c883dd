//! The checkers are checked: with a contract rule broken on purpose, the simulator must fail
//! within a bounded number of seeds. The switches are global, so the tests take turns.
//!
//! - Moves allowed to form cycles: it takes crossing concurrent moves that the random workload
//!   makes rarely (seed 255 caught it before the regions were added to the sim, seed 978 after,
//!   seed 154 since link resets were added, seed 1538 since readers pause and changes are
//!   signed); a workload that crosses moves more often would catch it sooner. A remove over
//!   a cycle used to walk it for ever (out of memory); the walk now visits each entry once, so
//!   the tree's checker reports the cycle.
//! - A holder that stages a version again while the pack it is in goes up (one upload per
//!   version and region pair is the rule): `Site::check_invariants` sees the version in two
//!   packs (seed 43).

use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The first of `seeds` seeds the simulator fails with the sabotage `switch` on, taking turns
/// with the other tests (the switches are global); the switch is off again afterwards.
fn first_failure_with(switch: fn(bool), seeds: u64) -> Option<sim::Failure> {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    switch(true);
    let failure = (0..seeds).find_map(|seed| sim::run(seed, &sim::Options::default()).err());
    switch(false);
    if let Some(f) = &failure {
        eprintln!("caught at seed {}: {}", f.seed, f.message);
    }
    failure
}

#[test]
fn breaking_the_cycle_rule_of_moves_is_caught_within_3000_seeds() {
    first_failure_with(crdt_namespace::sabotage::set_skip_cycle_check, 3000)
        .expect("the simulator missed a broken contract rule in 3,000 seeds");
}

#[test]
fn staging_a_version_twice_is_caught_within_500_seeds() {
    let failure = first_failure_with(site_core::sabotage::set_stage_twice, 500)
        .expect("the simulator missed a version staged twice in 500 seeds");
    assert!(failure.message.contains("goes up twice"), "caught for another reason: {}", failure.message);
}

#[test]
fn collecting_garbage_before_it_is_causally_stable_is_caught_within_500_seeds() {
    let failure = first_failure_with(site_core::sabotage::set_collect_unstable, 500)
        .expect("the simulator missed garbage collected before stability in 500 seeds");
    assert!(
        failure.message.contains("the last copy") || failure.message.contains("not readable"),
        "caught for another reason: {}",
        failure.message
    );
}

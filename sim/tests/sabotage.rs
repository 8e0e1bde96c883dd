//! The checkers are checked: with a contract rule broken on purpose, the simulator must fail
//! within a bounded number of seeds. The switches are global, so the tests take turns.
//!
//! - Moves allowed to form cycles: it takes crossing concurrent moves that the random workload
//!   makes rarely (seed 255 caught it before the regions were added to the sim, seed 978 after,
//!   seed 154 since link resets were added); a workload that crosses moves more often would
//!   catch it sooner.
//! - A holder that stages a version again while the pack it is in goes up (one upload per
//!   version and region pair is the rule): `Site::check_invariants` sees the version in two
//!   packs.

use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn first_failure(seeds: u64) -> Option<sim::Failure> {
    (0..seeds).find_map(|seed| sim::run(seed, &sim::Options::default()).err())
}

#[test]
fn breaking_the_cycle_rule_of_moves_is_caught_within_3000_seeds() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    crdt_namespace::sabotage::set_skip_cycle_check(true);
    let failure = first_failure(3000);
    crdt_namespace::sabotage::set_skip_cycle_check(false);
    let failure = failure.expect("the simulator missed a broken contract rule in 3,000 seeds");
    eprintln!("caught at seed {}: {}", failure.seed, failure.message);
}

#[test]
fn staging_a_version_twice_is_caught_within_500_seeds() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    site_core::sabotage::set_stage_twice(true);
    let failure = first_failure(500);
    site_core::sabotage::set_stage_twice(false);
    let failure = failure.expect("the simulator missed a version staged twice in 500 seeds");
    assert!(failure.message.contains("goes up twice"), "caught for another reason: {}", failure.message);
    eprintln!("caught at seed {}: {}", failure.seed, failure.message);
}

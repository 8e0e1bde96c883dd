//! The checkers are checked: with moves allowed to form cycles (a contract rule broken on
//! purpose), the simulator must fail within 3,000 seeds. (It takes crossing concurrent moves
//! that the random workload makes rarely: seed 255 caught it before the regions were added to
//! the sim, seed 978 after, seed 154 since link resets were added; a workload that crosses moves more often would catch it sooner.)

#[test]
fn breaking_the_cycle_rule_of_moves_is_caught_within_3000_seeds() {
    crdt_namespace::sabotage::set_skip_cycle_check(true);
    let failure = (0..3000).find_map(|seed| sim::run(seed, &sim::Options::default()).err());
    crdt_namespace::sabotage::set_skip_cycle_check(false);
    let failure = failure.expect("the simulator missed a broken contract rule in 3,000 seeds");
    eprintln!("caught at seed {}: {}", failure.seed, failure.message);
}

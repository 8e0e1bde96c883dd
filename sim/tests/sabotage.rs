//! The checkers are checked: with moves allowed to form cycles (a contract rule broken on
//! purpose), the simulator must fail within 500 seeds.

#[test]
fn breaking_the_cycle_rule_of_moves_is_caught_within_500_seeds() {
    crdt_namespace::sabotage::set_skip_cycle_check(true);
    let failure = (0..500).find_map(|seed| sim::run(seed, &sim::Options::default()).err());
    crdt_namespace::sabotage::set_skip_cycle_check(false);
    let failure = failure.expect("the simulator missed a broken contract rule in 500 seeds");
    eprintln!("caught at seed {}: {}", failure.seed, failure.message);
}

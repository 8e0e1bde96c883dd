//! Sync sessions: one stuck on a change lost on a live link starts afresh and delivers it; one
//! whose changes all come by push is healthy and keeps its state.

mod net;

use net::Net;
use site_core::Request;

fn mkdir(net: &mut Net, s: usize, path: &str) {
    net.request(s, Request::Mkdir { path: path.into(), parents: false, mode: 0o755 });
}

fn restarts(net: &mut Net, s: usize) -> u64 {
    net.sites[s].status().peers.iter().map(|p| p.sync_restarts).sum()
}

#[test]
fn a_session_whose_changes_all_come_by_push_never_starts_afresh() {
    let mut net = Net::new(&["west", "east"], |_| {});
    // A write a second for five minutes at each site: pushes carry every change, and each sync
    // round (every 5 s) finds nothing new to bring.
    for i in 0..300 {
        mkdir(&mut net, i % 2, &format!("/d{i}"));
        net.wait(1_000);
    }
    assert!(net.sites[1].namespace().stat("/d298").is_ok() && net.sites[0].namespace().stat("/d299").is_ok());
    assert_eq!((restarts(&mut net, 0), restarts(&mut net, 1)), (0, 0), "a healthy session kept its state");
}

#[test]
fn a_session_stuck_on_a_change_lost_on_the_way_starts_afresh_and_delivers_it() {
    let mut net = Net::new(&["west", "east"], |_| {});
    lose_a_change(&mut net);
    // Nothing else is written: both sessions stay silent.
    net.wait(60_000);
    assert!(net.sites[1].namespace().stat("/lost").is_ok(), "east has the change lost on the way");
    assert!(restarts(&mut net, 0) >= 1, "west started its session afresh");
}

#[test]
fn a_change_lost_on_the_way_arrives_while_its_site_goes_on_writing() {
    let mut net = Net::new(&["west", "east"], |_| {});
    lose_a_change(&mut net);
    // West writes a change a second, each depending on the lost one.
    for i in 0..60 {
        mkdir(&mut net, 0, &format!("/after{i}"));
        net.wait(1_000);
    }
    assert!(net.sites[1].namespace().stat("/lost").is_ok(), "east has the change lost on the way");
    assert!(net.sites[1].namespace().stat("/after58").is_ok(), "and those after it");
}

/// Everything west sends for a sync round is lost: its push of /lost and the sync message that
/// carries it. West's session has sent it and never sends it again.
fn lose_a_change(net: &mut Net) {
    mkdir(net, 0, "/before");
    net.wait(6_000);
    net.cut.insert((0, 1));
    mkdir(net, 0, "/lost");
    net.wait(6_000);
    net.cut.clear();
}

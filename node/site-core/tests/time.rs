//! Time in the core: its timers run on the driver's monotonic clock, and `poll_timeout` says
//! exactly when the next is due. The wall clock only stamps local changes, so a step of it,
//! forwards or backwards, neither fires a timer early nor holds one back.

use crdt_namespace::{Keys, Namespace, SigningKey, SiteId};
use proto::Message;
use site_core::content::{ChunkerConfig, Manifest};
use site_core::{Holdings, Output, Request, RequestId, Site, SiteConfig};

const HOUR_MS: u64 = 3_600_000;
/// A wall clock of today, in milliseconds since the epoch.
const WALL_MS: u64 = 1_796_000_000_000;

fn outputs(site: &mut Site) -> Vec<Output> {
    std::iter::from_fn(|| site.poll_output()).collect()
}

/// The messages a site sends (inside durable outputs too), taken.
fn messages(site: &mut Site) -> Vec<Message> {
    let mut sent = Vec::new();
    for output in outputs(site) {
        match output {
            Output::Send { message, .. } | Output::Broadcast { message, .. } => sent.push(message),
            Output::Durable { then, .. } => sent.extend(then.into_iter().filter_map(|o| match o {
                Output::Send { message, .. } | Output::Broadcast { message, .. } => Some(message),
                _ => None,
            })),
            _ => {}
        }
    }
    sent
}

fn who_has_asked(sent: &[Message]) -> bool {
    sent.iter().any(|m| matches!(m, Message::WhoHas { .. }))
}

/// Site `west` knows of `/f`, written at `east`, and reads it: the read waits for "who holds".
/// Returns west, and the monotonic time of the read.
fn a_read_waiting_for_who_holds() -> (Site, u64) {
    let (west, east) = (SiteId::new("west").unwrap(), SiteId::new("east").unwrap());
    let key = |id: &SiteId| SigningKey::from_secret(blake3::hash(id.as_str().as_bytes()).as_bytes());
    let mut keys = Keys::new();
    keys.allow(&west, key(&west).public());
    keys.allow(&east, key(&east).public());
    let site = |id: &SiteId| {
        let mut config = SiteConfig::new(id.clone());
        config.keys = keys.clone();
        Site::new(config, Namespace::new(id.clone(), key(id)), Holdings::default())
    };
    let (mut w, mut e) = (site(&west), site(&east));
    w.handle_peer_up(10, east.clone());
    e.handle_peer_up(10, west.clone());
    let manifest = Manifest::of_bytes(b"the bytes of f", ChunkerConfig::default());
    let commit = Request::CommitVersion { path: "/f".into(), manifest, mode: 0o644, mtime_ns: 0 };
    e.handle_local(20, WALL_MS, RequestId(1), commit);
    for message in messages(&mut e) {
        w.handle_message(30, &east, message);
    }
    messages(&mut w);
    w.handle_local(100, WALL_MS, RequestId(2), Request::Read { path: "/f".into(), range: None });
    assert!(who_has_asked(&messages(&mut w)), "the read asks who holds the version");
    (w, 100)
}

#[test]
fn the_next_timeout_is_exact_nothing_happens_before_it_and_its_work_happens_at_it() {
    let (mut w, read_at) = a_read_waiting_for_who_holds();
    let retry = SiteConfig::new(SiteId::new("west").unwrap()).who_has_retry_ms;
    let due = w.poll_timeout().expect("a read waits");
    assert_eq!(due, read_at + retry, "the next timer is the read's question, asked again");
    w.handle_timeout(due - 1);
    assert!(!who_has_asked(&messages(&mut w)), "nothing is due a millisecond before");
    assert_eq!(w.poll_timeout(), Some(due));
    w.handle_timeout(due);
    assert!(who_has_asked(&messages(&mut w)), "at the deadline the question is asked again");
    assert!(w.poll_timeout().expect("the read still waits") > due, "and the deadline moves on");
}

#[test]
fn a_wall_clock_step_forwards_does_not_fire_timers_and_one_backwards_does_not_hold_them() {
    let (mut w, read_at) = a_read_waiting_for_who_holds();
    let due = w.poll_timeout().expect("a read waits");
    // The wall clock jumps an hour ahead while a local change is made.
    let mkdir = |path: &str| Request::Mkdir { path: path.into(), parents: false, mode: 0o755 };
    w.handle_local(read_at + 1, WALL_MS + HOUR_MS, RequestId(3), mkdir("/ahead"));
    messages(&mut w);
    let ahead = w.namespace().last_hlc();
    assert_eq!(w.poll_timeout(), Some(due), "the step does not move the deadline");
    w.handle_timeout(read_at + 2);
    assert!(!who_has_asked(&messages(&mut w)), "nor fire the timer");
    // Then two hours back.
    w.handle_local(read_at + 3, WALL_MS - HOUR_MS, RequestId(4), mkdir("/behind"));
    messages(&mut w);
    assert_eq!(w.poll_timeout(), Some(due), "nor does a step back");
    w.handle_timeout(due);
    assert!(who_has_asked(&messages(&mut w)), "the timer fires on time");
    // The changes are still ordered as made: the hybrid logical clock never goes back.
    assert!(w.namespace().last_hlc() > ahead);
    // What people read follows the wall clock.
    let mtime = |path: &str| w.namespace().stat(path).unwrap().mtime_ns;
    assert_eq!(mtime("/behind"), (WALL_MS - HOUR_MS) as i64 * 1_000_000);
}

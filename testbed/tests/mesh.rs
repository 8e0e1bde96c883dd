//! Real `meridian` processes on loopback, three sites a mesh: what crosses the network, and
//! what survives a crash, a stop, a partition and a hostile peer.

use std::time::Duration;

use cluster::wait_until;
use cluster::{Cluster, Program};
use node::api::{ApiRequest, FindAnswer, MeshLink, TagAnswer};
use node::client::Client;
use node::config::Config;
use site_core::sample::pseudo_random;
use testbed::rogue::{self, Outcome};

const TIMEOUT: Duration = Duration::from_secs(60);

fn program() -> Program {
    testbed::program_at(env!("CARGO_BIN_EXE_testbed"))
}

fn started(n: usize) -> Cluster {
    let mut cluster = testbed::cluster(program(), n).unwrap();
    cluster.start_all().unwrap();
    cluster
}

fn mkdir(client: &Client, path: &str) {
    client.mkdir_p(path).unwrap();
}

fn fetched(client: &Client) -> u64 {
    client.status().unwrap().core.bytes_fetched
}

/// Every path with the version it shows (for files). A change arriving between the listing and
/// a stat makes it an error: the caller asks again.
fn tree(client: &Client) -> anyhow::Result<Vec<String>> {
    let hits: Vec<FindAnswer> = client.call(&ApiRequest::Find { tags: vec![], path: Some("/**".into()) })?;
    hits.into_iter()
        .map(|hit| {
            Ok(match client.version_id(&hit.path)? {
                Some(version) => format!("{} @{version}", hit.path),
                None => hit.path,
            })
        })
        .collect()
}

fn wait_same_trees(cluster: &Cluster, running: &[usize]) -> Vec<String> {
    let mut last = Vec::new();
    let converged = wait_until(TIMEOUT, || {
        let Ok(trees) = running.iter().map(|&i| tree(&cluster.site(i).client)).collect::<Result<Vec<_>, _>>()
        else {
            return Ok(false);
        };
        last = trees[0].clone();
        Ok(trees.windows(2).all(|w| w[0] == w[1]))
    });
    assert!(converged.is_ok(), "the sites did not converge; one has {last:?}");
    last
}

#[test]
fn namespace_changes_reach_every_site() {
    let cluster = started(3);
    let a = &cluster.site(0).client;
    mkdir(a, "/shots/sq010/sh0010");
    a.put("/shots/sq010/sh0010/take1.clip", b"<clip/>").unwrap();
    a.call::<()>(&ApiRequest::TagSet {
        path: "/shots".into(),
        key: "project".into(),
        value: "apollo".into(),
    })
    .unwrap();
    a.call::<()>(&ApiRequest::Mv {
        from: "/shots/sq010/sh0010/take1.clip".into(),
        to: "/shots/take1.clip".into(),
        replace: false,
    })
    .unwrap();
    let trees = wait_same_trees(&cluster, &[0, 1, 2]);
    assert!(trees.iter().any(|p| p.starts_with("/shots/take1.clip @")), "{trees:?}");
    for i in 1..3 {
        let tags: Vec<TagAnswer> =
            cluster.site(i).client.call(&ApiRequest::TagGet { path: "/shots/take1.clip".into() }).unwrap();
        assert_eq!(tags[0].value, "apollo");
        // Metadata only: no payload moved.
        assert_eq!(fetched(&cluster.site(i).client), 0);
    }
}

#[test]
fn payload_is_pulled_lazily_range_first_and_only_the_edited_chunks_move() {
    let cluster = started(3);
    let (a, b) = (&cluster.site(0).client, &cluster.site(1).client);
    let size = 16 << 20;
    let mut data = pseudo_random(1, size);
    mkdir(a, "/big");
    a.put("/big/f.bin", &data).unwrap();
    wait_until(TIMEOUT, || b.exists("/big/f.bin")).unwrap();
    assert_eq!(b.status().unwrap().core.versions_held, 0, "nothing is pulled before a read");
    assert_eq!(fetched(b), 0);

    // A range in the middle: only the chunks covering it move.
    let range = (8 << 20)..(8 << 20) + 1000;
    assert_eq!(
        b.read("/big/f.bin", Some(range.clone())).unwrap(),
        &data[range.start as usize..range.end as usize]
    );
    let first = fetched(b);
    assert!(first > 0 && first <= 2 * (4 << 20), "a 1000-byte range moved {first} bytes");

    // The whole file: every chunk once.
    assert!(b.read("/big/f.bin", None).unwrap() == data);
    assert_eq!(fetched(b), size as u64, "each chunk crosses the network once");
    assert_eq!(b.status().unwrap().core.versions_held, 1);

    // A 64 KiB edit: only the chunks around it move.
    data[5 << 20..(5 << 20) + (64 << 10)].copy_from_slice(&pseudo_random(2, 64 << 10));
    a.put("/big/f.bin", &data).unwrap();
    let want = a.version_id("/big/f.bin").unwrap();
    wait_until(TIMEOUT, || Ok(b.version_id("/big/f.bin")? == want)).unwrap();
    let before = fetched(b);
    assert!(b.read("/big/f.bin", None).unwrap() == data);
    let moved = fetched(b) - before;
    assert!(moved > 0 && moved < (size as u64) / 4, "a 64 KiB edit moved {moved} of {size} bytes");
}

#[test]
fn a_site_killed_mid_transfer_loses_nothing_and_reads_go_on_elsewhere() {
    let mut cluster = started(3);
    let size = 48 << 20;
    let data = pseudo_random(3, size);
    let a = cluster.site(0).client.clone();
    let b = cluster.site(1).client.clone();
    let c = cluster.site(2).client.clone();
    mkdir(&a, "/big");
    a.put("/big/f.bin", &data).unwrap();
    wait_until(TIMEOUT, || c.exists("/big/f.bin")).unwrap();
    assert!(c.read("/big/f.bin", None).unwrap() == data, "c now holds the file too");

    // b reads; the holder it pulls from dies in the middle; the read finishes from the other.
    // (b must know the file first: a read of a path it has not heard of fails at once.)
    wait_until(TIMEOUT, || b.exists("/big/f.bin")).unwrap();
    let reader = {
        let b = b.clone();
        std::thread::spawn(move || b.read("/big/f.bin", None))
    };
    wait_until(TIMEOUT, || Ok(fetched(&b) > 0 || reader.is_finished())).unwrap();
    cluster.kill(0).unwrap();
    let read = reader.join().unwrap().expect("the read continues from another holder");
    assert!(read == data);

    // The reader itself killed in the middle of a transfer, then restarted: its store is
    // consistent and the read works again.
    cluster.start(0).unwrap();
    let d = pseudo_random(4, size);
    a.put("/big/g.bin", &d).unwrap();
    wait_until(TIMEOUT, || b.exists("/big/g.bin")).unwrap();
    let reader = {
        let b = b.clone();
        std::thread::spawn(move || b.read("/big/g.bin", None))
    };
    let before = fetched(&b);
    wait_until(TIMEOUT, || Ok(fetched(&b) > before)).unwrap();
    cluster.kill(1).unwrap();
    assert!(reader.join().unwrap().is_err(), "the reader's site died");
    cluster.start(1).unwrap();
    cluster.wait_connected(TIMEOUT).unwrap();
    assert!(b.read("/big/g.bin", None).unwrap() == d);
    assert!(b.read("/big/f.bin", None).unwrap() == data);
    assert!(a.read("/big/f.bin", None).unwrap() == data, "the killed holder kept its data");
}

#[test]
fn stopped_and_partitioned_sites_converge_when_they_return() {
    let mut cluster = started(3);
    let a = cluster.site(0).client.clone();
    let b = cluster.site(1).client.clone();
    let c = cluster.site(2).client.clone();
    mkdir(&a, "/shots");
    a.put("/shots/comp.clip", b"v1").unwrap();
    wait_until(TIMEOUT, || c.exists("/shots/comp.clip")).unwrap();

    // c stops; a and b both change things, one of them the same file.
    cluster.stop(2).unwrap();
    a.put("/shots/comp.clip", b"v2 from a").unwrap();
    mkdir(&a, "/shots/from-a");
    wait_until(TIMEOUT, || b.exists("/shots/from-a")).unwrap();
    b.put("/shots/comp.clip", b"v2 from b").unwrap();
    b.call::<()>(&ApiRequest::Rm { path: "/shots/from-a".into(), recursive: true }).unwrap();
    cluster.start(2).unwrap();
    let trees = wait_same_trees(&cluster, &[0, 1, 2]);
    assert!(!trees.iter().any(|p| p.starts_with("/shots/from-a")), "{trees:?}");
    assert_eq!(c.read("/shots/comp.clip", None).unwrap(), b"v2 from b");

    // a partition: a is cut off from b and c; both sides write the same file.
    cluster.meridian(0, &["mesh", "block", "b"]).unwrap();
    cluster.meridian(0, &["mesh", "block", "c"]).unwrap();
    // Both blocks taken (a link may still flap down and up before its block is processed),
    // then the core has seen the last of both links: a's write cannot reach b before b writes.
    let blocked = || -> anyhow::Result<bool> {
        let links: Vec<MeshLink> = a.call(&ApiRequest::MeshLs)?;
        Ok(links.iter().all(|l| l.link == "blocked") && a.status()?.core.peers.is_empty())
    };
    wait_until(TIMEOUT, blocked).unwrap();
    a.put("/shots/comp.clip", b"v3 from a").unwrap();
    b.put("/shots/comp.clip", b"v3 from b").unwrap();
    cluster.meridian(0, &["mesh", "unblock", "b"]).unwrap();
    cluster.meridian(0, &["mesh", "unblock", "c"]).unwrap();
    let trees = wait_same_trees(&cluster, &[0, 1, 2]);
    assert!(trees.iter().any(|p| p.starts_with("/shots/comp.conflict-")), "{trees:?}");
    let contents: Vec<Vec<u8>> =
        [&a, &b, &c].iter().map(|s| s.read("/shots/comp.clip", None).unwrap()).collect();
    assert!(contents.windows(2).all(|w| w[0] == w[1]));
}

/// Drops site `extra` from the membership of every other site (it still lists them).
fn make_stranger(cluster: &Cluster, extra: usize) {
    for (i, site) in cluster.sites().iter().enumerate() {
        if i == extra {
            continue;
        }
        let mut loaded = Config::load(&site.config).unwrap();
        loaded.config.peers.retain(|p| p.site != cluster.site(extra).name);
        loaded.config.save(&site.config).unwrap();
    }
}

#[test]
fn an_unknown_peer_is_refused() {
    let mut cluster = testbed::cluster(program(), 3).unwrap();
    make_stranger(&cluster, 2);
    cluster.start(0).unwrap();
    cluster.start(1).unwrap();
    cluster.start(2).unwrap();
    let (a, c) = (cluster.site(0).client.clone(), cluster.site(2).client.clone());
    mkdir(&a, "/secret");
    wait_until(TIMEOUT, || cluster.site(1).client.exists("/secret")).unwrap();
    // c dials a and b for a while; both refuse it.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!c.exists("/secret").unwrap(), "a stranger received the namespace");
    let peers = a.status().unwrap().core.peers;
    assert_eq!(peers.len(), 1, "only b is connected to a: {peers:?}");
    let ls = cluster.meridian(2, &["--json", "mesh", "ls"]).unwrap();
    let ls: Vec<MeshLink> = serde_json::from_str(ls.trim()).unwrap();
    // c's handshakes complete before a and b close them: a link may show up for a moment, never
    // for longer.
    for link in ls {
        assert!(!link.link.starts_with("up") || link.since_ms < Some(2_000), "{link:?}");
    }
}

#[test]
fn malformed_frames_disconnect_the_sender_and_change_nothing() {
    let mut cluster = testbed::cluster(program(), 3).unwrap();
    // c is a member but does not run: the rogue speaks with its key.
    cluster.start(0).unwrap();
    cluster.start(1).unwrap();
    cluster.wait_connected(TIMEOUT).unwrap();
    let a = cluster.site(0).client.clone();
    mkdir(&a, "/kept");
    let before = tree(&a).unwrap();
    let target: libp2p::PeerId = cluster.site(0).peer_id.parse().unwrap();
    let addr: libp2p::Multiaddr =
        format!("/ip4/127.0.0.1/udp/{}/quic-v1", cluster.site(0).port).parse().unwrap();
    let member_key = rogue::read_key(&cluster.site(2).dir.join("node.key")).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();

    let mut garbage = 10u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"not a msg!");
    let mut oversized = u32::MAX.to_le_bytes().to_vec();
    oversized.extend_from_slice(&[0; 64]);
    let mut wrong_version = 3u32.to_le_bytes().to_vec();
    wrong_version.extend_from_slice(&[9, 9, 0]);
    for bytes in [garbage, oversized, wrong_version] {
        let outcome = runtime
            .block_on(rogue::send_raw(member_key.clone(), target, addr.clone(), bytes, TIMEOUT))
            .unwrap();
        assert_eq!(outcome, Outcome::Disconnected);
        assert!(a.status().is_ok(), "the site survived");
    }
    assert_eq!(tree(&a).unwrap(), before, "nothing changed");

    // A key that is not a member never gets a stream.
    let stranger = libp2p::identity::Keypair::generate_ed25519();
    let outcome = runtime
        .block_on(rogue::send_raw(stranger, target, addr, b"hello".to_vec(), Duration::from_secs(5)))
        .unwrap();
    assert!(matches!(outcome, Outcome::Refused(_)), "{outcome:?}");
    // And the real members still talk.
    mkdir(&a, "/after");
    wait_until(TIMEOUT, || cluster.site(1).client.exists("/after")).unwrap();
}

/// Runs `work` on a thread of its own and returns its result, or fails the test if it does not
/// finish within [`TIMEOUT`] (the thread is left behind: the cluster's drop ends its site).
fn finishes<T: Send + 'static>(what: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || drop(done.send(work())));
    result.recv_timeout(TIMEOUT).unwrap_or_else(|_| panic!("{what} did not finish while a reader was paused"))
}

#[test]
fn a_reader_that_stops_reading_delays_nobody_else() {
    use node::api::{self, blocking};
    let cluster = started(2);
    cluster.wait_connected(TIMEOUT).unwrap();
    let (a, b) = (cluster.site(0).client.clone(), cluster.site(1).client.clone());
    let big = pseudo_random(14, 64 << 20);
    a.put("/big.bin", &big).unwrap();

    // `meridian cat /big.bin | less`: the first bytes are read, then nothing.
    let mut paused = std::os::unix::net::UnixStream::connect(a.socket()).unwrap();
    let request = ApiRequest::Read { path: "/big.bin".into(), start: None, end: None, version: None };
    blocking::write_frame(&mut paused, &api::encode_request(&request)).unwrap();
    let header: node::api::ReadHeader = blocking::read_answer(&mut paused).unwrap();
    assert_eq!(header.end, big.len() as u64);
    let first = blocking::read_frame(&mut paused).unwrap().unwrap();
    assert_eq!(&first[..], &big[..first.len()]);

    let names = finishes("ls", {
        let a = a.clone();
        move || a.list("/").unwrap()
    });
    assert_eq!(names, ["big.bin"]);
    finishes("put and mkdir", {
        let a = a.clone();
        move || {
            a.put("/small.txt", b"written while a reader is paused").unwrap();
            a.mkdir_p("/made/while/paused").unwrap();
        }
    });
    // The peer's change reaches the paused site, and the paused site's reach the peer.
    b.put("/from-b.txt", b"synced").unwrap();
    finishes("sync both ways", {
        let (a, b) = (a.clone(), b.clone());
        move || {
            wait_until(TIMEOUT, || a.exists("/from-b.txt")).unwrap();
            wait_until(TIMEOUT, || b.exists("/made/while/paused")).unwrap();
            assert_eq!(b.read("/small.txt", None).unwrap(), b"written while a reader is paused");
        }
    });
    // Another reader of the same file is not held back by the paused one.
    let again = finishes("a second read of the file", {
        let a = a.clone();
        move || a.read("/big.bin", None).unwrap()
    });
    assert!(again == big, "the second read returned other bytes");

    // The paused reader resumes and gets every byte.
    let mut rest = first;
    while let Some(frame) = blocking::read_frame(&mut paused).unwrap() {
        if frame.is_empty() {
            break;
        }
        rest.extend_from_slice(&frame);
    }
    blocking::read_answer::<()>(&mut paused).unwrap();
    assert!(rest == big, "the paused reader got other bytes");
}

#[test]
fn a_reader_that_leaves_mid_file_is_let_go() {
    use node::api::{self, blocking};
    let cluster = started(1);
    let a = cluster.site(0).client.clone();
    let big = pseudo_random(15, 32 << 20);
    a.put("/big.bin", &big).unwrap();
    // Many clients read the first bytes and hang up: each read the site let go of.
    for _ in 0..20 {
        let mut reader = std::os::unix::net::UnixStream::connect(a.socket()).unwrap();
        let request = ApiRequest::Read { path: "/big.bin".into(), start: None, end: None, version: None };
        blocking::write_frame(&mut reader, &api::encode_request(&request)).unwrap();
        let _: node::api::ReadHeader = blocking::read_answer(&mut reader).unwrap();
        blocking::read_frame(&mut reader).unwrap().unwrap();
    }
    wait_until(TIMEOUT, || Ok(a.status()?.core.reads == 0)).expect("the reads of clients that left went on");
    let again = finishes("a read after the others left", move || a.read("/big.bin", None).unwrap());
    assert!(again == big);
}

/// Where the rogue reaches site `i`: its peer id and QUIC address.
fn rogue_target(cluster: &Cluster, i: usize) -> (libp2p::PeerId, libp2p::Multiaddr) {
    let target = cluster.site(i).peer_id.parse().unwrap();
    let addr = format!("/ip4/127.0.0.1/udp/{}/quic-v1", cluster.site(i).port).parse().unwrap();
    (target, addr)
}

/// Whether site `at` refuses a connection made with `key`.
fn refuses(cluster: &Cluster, at: usize, key: libp2p::identity::Keypair) -> bool {
    let (target, addr) = rogue_target(cluster, at);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let outcome = runtime
        .block_on(rogue::send_raw(key, target, addr, b"hello".to_vec(), Duration::from_secs(5)))
        .unwrap();
    matches!(outcome, Outcome::Refused(_))
}

fn links(cluster: &Cluster, i: usize) -> Vec<MeshLink> {
    cluster.site(i).client.call(&ApiRequest::MeshLs).unwrap()
}

#[test]
fn a_rotated_key_is_refused_at_once_and_the_site_returns_with_its_new_one() {
    let mut cluster = started(2);
    let (a, b) = (cluster.site(0).client.clone(), cluster.site(1).client.clone());
    let name = cluster.site(1).name.clone();
    mkdir(&b, "/before");
    wait_until(TIMEOUT, || a.exists("/before")).unwrap();
    let old_key = rogue::read_key(&cluster.site(1).dir.join("node.key")).unwrap();
    // The site gets a new key while stopped; the other site takes it while running.
    cluster.stop(1).unwrap();
    let rotated: serde_json::Value =
        serde_json::from_str(&cluster.meridian(1, &["--json", "key", "rotate"]).unwrap()).unwrap();
    let new_peer = rotated["peer_id"].as_str().unwrap().to_owned();
    assert_eq!(rotated["on_other_sites"], format!("meridian mesh rotate {name} --peer-id {new_peer}"));
    cluster.meridian(0, &["mesh", "rotate", &name, "--peer-id", &new_peer]).unwrap();
    // The old key is refused at once, without a restart; it stays valid for what it signed.
    assert!(refuses(&cluster, 0, old_key), "the old key still gets in");
    let config = Config::load(&cluster.site(0).config).unwrap().config;
    assert_eq!(config.peers[0].peer_id, new_peer);
    assert!(config.former_keys[0].site == name && config.former_keys[0].until_seq >= Some(1));
    // The site comes back with its new key: what it wrote before and after reaches the other.
    cluster.start(1).unwrap();
    cluster.wait_connected(TIMEOUT).unwrap();
    mkdir(&b, "/after");
    wait_until(TIMEOUT, || a.exists("/after")).unwrap();
    assert!(a.exists("/before").unwrap());
    // One key never serves two names.
    let taken = cluster.meridian(
        0,
        &["mesh", "add", "other", "--peer-id", &new_peer, "--addr", "/ip4/127.0.0.1/tcp/9", "--region", "eu"],
    );
    assert!(format!("{:#}", taken.unwrap_err()).contains(&format!("already {name}'s")));
}

#[test]
fn a_block_outlives_a_restart_and_a_removed_site_is_refused() {
    let mut cluster = started(2);
    let (a, b) = (cluster.site(0).client.clone(), cluster.site(1).client.clone());
    let name = cluster.site(1).name.clone();
    cluster.meridian(0, &["mesh", "block", &name]).unwrap();
    cluster.stop(0).unwrap();
    cluster.start(0).unwrap();
    assert_eq!(links(&cluster, 0)[0].link, "blocked", "still blocked after a restart");
    mkdir(&b, "/while-blocked");
    cluster.meridian(0, &["mesh", "unblock", &name]).unwrap();
    cluster.wait_connected(TIMEOUT).unwrap();
    wait_until(TIMEOUT, || a.exists("/while-blocked")).unwrap();
    // Removed: cut off at once, refused from now on, kept out after a restart.
    let key = rogue::read_key(&cluster.site(1).dir.join("node.key")).unwrap();
    let out = cluster.meridian(0, &["mesh", "rm", &name]).unwrap();
    assert!(out.contains(&format!("removed {name}")), "{out}");
    wait_until(TIMEOUT, || Ok(a.status()?.core.peers.is_empty())).unwrap();
    assert!(links(&cluster, 0).is_empty());
    assert!(refuses(&cluster, 0, key.clone()), "a removed site still gets in");
    cluster.stop(0).unwrap();
    cluster.start(0).unwrap();
    assert!(refuses(&cluster, 0, key), "a removed site gets in after a restart");
    let config = Config::load(&cluster.site(0).config).unwrap().config;
    assert!(config.peers.is_empty() && config.former_keys[0].site == name);
    assert!(a.exists("/while-blocked").unwrap(), "what it wrote stays");
}

/// Three member sites of which `a` and `b` run, connected, and the key of `c`, which does not
/// run: a rogue speaks with it.
fn a_and_b_and_cs_key() -> (Cluster, libp2p::identity::Keypair) {
    let mut cluster = testbed::cluster(program(), 3).unwrap();
    cluster.start(0).unwrap();
    cluster.start(1).unwrap();
    cluster.wait_connected(TIMEOUT).unwrap();
    let key = rogue::read_key(&cluster.site(2).dir.join("node.key")).unwrap();
    (cluster, key)
}

/// An encoded push of one change, a directory at `path` in `site`'s name stamped `hlc`, signed
/// with `key`.
fn push_of(key: &libp2p::identity::Keypair, site: &str, path: &str, hlc: crdt_namespace::Hlc) -> Vec<u8> {
    let secret = transport::p2p::signing_secret(key).unwrap();
    let site = crdt_namespace::SiteId::new(site).unwrap();
    let mut writer = crdt_namespace::Namespace::new(site, crdt_namespace::SigningKey::from_secret(&secret));
    writer.mkdir(path, false, 0o755, 0, hlc).unwrap();
    transport::proto::Message::Push { changes: writer.export_since(&[]) }.encode()
}

#[test]
fn a_change_stamped_at_the_end_of_time_is_held_shown_in_mesh_ls_and_stops_nothing() {
    // c is a member but does not run: the rogue speaks gossipsub with its key, to b.
    let (mut cluster, key) = a_and_b_and_cs_key();
    let (a, b) = (cluster.site(0).client.clone(), cluster.site(1).client.clone());
    let c = cluster.site(2).name.clone();
    // Signed by c as c: a good change, but stamped u64::MAX - 1.
    let push = push_of(&key, &c, "/far", crdt_namespace::Hlc::from_raw(u64::MAX - 1));
    let (target, addr) = rogue_target(&cluster, 1);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let outcome =
        runtime.block_on(rogue::publish_push(key, target, addr, push, Duration::from_secs(3))).unwrap();
    assert_eq!(outcome, Outcome::StillConnected, "a well-signed change is no offence");
    let held = || -> anyhow::Result<usize> {
        let ls = cluster.meridian(1, &["--json", "mesh", "ls"])?;
        let links: Vec<MeshLink> = serde_json::from_str(ls.trim())?;
        Ok(links.iter().find(|l| l.site == c).map_or(0, |l| l.held_changes))
    };
    wait_until(TIMEOUT, || Ok(held()? == 1)).unwrap();
    let text = cluster.meridian(1, &["mesh", "ls"]).unwrap();
    assert!(text.contains("1 held (clock ahead)"), "{text}");
    // Held, not integrated; b's clock is not pulled along: its own changes go on, reach a and
    // outlive a restart.
    assert!(!b.exists("/far").unwrap());
    mkdir(&b, "/after-far");
    wait_until(TIMEOUT, || a.exists("/after-far")).unwrap();
    cluster.stop(1).unwrap();
    cluster.start(1).unwrap();
    let b = cluster.site(1).client.clone();
    assert!(b.exists("/after-far").unwrap() && !b.exists("/far").unwrap());
    mkdir(&b, "/after-restart");
    wait_until(TIMEOUT, || a.exists("/after-restart")).unwrap();
    assert!(!a.exists("/far").unwrap(), "a integrated a change stamped at the end of time");
}

#[test]
fn a_forged_push_is_checked_before_it_is_relayed_and_only_its_sender_is_cut_off() {
    // c is a member but does not run: the rogue speaks gossipsub with its key, to b.
    let (cluster, key) = a_and_b_and_cs_key();
    let (a, b) = (cluster.site(0).client.clone(), cluster.site(1).client.clone());
    mkdir(&a, "/kept");
    wait_until(TIMEOUT, || b.exists("/kept")).unwrap();
    let before = tree(&a).unwrap();
    // A change in a's name, signed with c's key.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let hlc = crdt_namespace::Hlc::new(now as u64, 0);
    let push = push_of(&key, &cluster.site(0).name, "/forged", hlc);
    let (target, addr) = rogue_target(&cluster, 1);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let outcome = runtime.block_on(rogue::publish_push(key, target, addr, push, TIMEOUT)).unwrap();
    assert_eq!(outcome, Outcome::Disconnected, "b cuts off the sender of a forged push");
    // b never relayed it: a neither saw it nor cut b off, and both still talk.
    mkdir(&a, "/after");
    wait_until(TIMEOUT, || b.exists("/after")).unwrap();
    mkdir(&b, "/back");
    wait_until(TIMEOUT, || a.exists("/back")).unwrap();
    let log = std::fs::read_to_string(cluster.site(0).log()).unwrap();
    // (A link may still be replaced as it comes up; what the forgery would cause names it.)
    assert!(
        !log.contains("bad push") && !log.contains("bad sync message"),
        "a was handed the forgery:\n{log}"
    );
    let after = tree(&a).unwrap();
    assert!(!after.iter().any(|p| p.starts_with("/forged")));
    assert_eq!(after.len(), before.len() + 2);
}

/// Site `i`'s peak resident memory so far.
fn peak_memory(cluster: &Cluster, i: usize) -> u64 {
    rogue::peak_memory(cluster.site(i).pid().unwrap()).unwrap()
}

/// Two running sites, `a` and `b`, and a rogue with the key of member `c` (which does not run)
/// connected to `a`.
fn rogue_at_a(runtime: &tokio::runtime::Runtime) -> (Cluster, rogue::Rogue) {
    let (cluster, key) = a_and_b_and_cs_key();
    let (target, addr) = rogue_target(&cluster, 0);
    let rogue = runtime.block_on(rogue::Rogue::connect(key, target, addr, TIMEOUT)).unwrap();
    (cluster, rogue)
}

/// `a` and `b` still talk both ways, and `b` reads what `a` wrote.
fn still_talking(cluster: &Cluster, tag: &str) {
    let (a, b) = (cluster.site(0).client.clone(), cluster.site(1).client.clone());
    let data = pseudo_random(tag.len() as u64, 3 << 20);
    let file = format!("/{tag}.bin");
    a.put(&file, &data).unwrap();
    wait_until(TIMEOUT, || b.exists(&file)).unwrap();
    let read = finishes("a read at b", move || b.read(&file, None).unwrap());
    assert!(read == data, "b read other bytes than a wrote");
    mkdir(&cluster.site(1).client, &format!("/{tag}-back"));
    wait_until(TIMEOUT, || a.exists(&format!("/{tag}-back"))).unwrap();
}

#[test]
fn a_member_opening_streams_by_the_hundred_pins_bounded_memory_and_delays_nobody_else() {
    const STREAMS: usize = 128;
    const BROUGHT: usize = 4 << 20;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let (cluster, mut rogue) = rogue_at_a(&runtime);
    let before = peak_memory(&cluster, 0);
    // Each stream starts a frame that claims 400 MiB and brings 4 MiB of it, then stalls: a
    // site that read every stream at once would hold 512 MiB for the rogue.
    let sent: usize = runtime.block_on(async {
        let mut writers = Vec::new();
        for _ in 0..STREAMS {
            let Ok(mut stream) = rogue.open().await else { continue };
            writers.push(tokio::spawn(async move {
                let mut frame = (400u32 << 20).to_le_bytes().to_vec();
                frame.resize(4 + BROUGHT, 7);
                let wrote = tokio::time::timeout(Duration::from_secs(10), async {
                    use futures::AsyncWriteExt;
                    stream.write_all(&frame).await.is_ok() && stream.flush().await.is_ok()
                });
                let wrote = wrote.await.unwrap_or(false);
                (wrote, stream)
            }));
        }
        let mut sent = 0;
        let mut open = Vec::new();
        for writer in writers {
            let (wrote, stream) = writer.await.unwrap();
            sent += usize::from(wrote) * BROUGHT;
            open.push(stream);
        }
        // The streams stay open (and their frames unfinished) while the others work.
        std::mem::forget(open);
        sent
    });
    std::thread::sleep(Duration::from_secs(1));
    let grown = peak_memory(&cluster, 0).saturating_sub(before);
    eprintln!("streams: {} MiB sent in unfinished frames, a's peak grew {} MiB", sent >> 20, grown >> 20);
    assert!(sent >= 32 * BROUGHT, "the rogue could not send its flood: {sent} bytes");
    assert!(grown < 128 << 20, "a held {} MiB for {} MiB of unfinished frames", grown >> 20, sent >> 20);
    still_talking(&cluster, "after-streams");
    let log = std::fs::read_to_string(cluster.site(0).log()).unwrap();
    assert!(log.contains("its oldest is closed"), "no stream was closed:\n{log}");
    drop(rogue);
}

#[test]
fn a_member_flooding_requests_is_cut_off_with_bounded_memory_and_delays_nobody_else() {
    use transport::proto::Message;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let (cluster, mut rogue) = rogue_at_a(&runtime);
    let a = cluster.site(0).client.clone();
    let data = pseudo_random(11, 16 << 20);
    a.put("/big.bin", &data).unwrap();
    let manifest = site_core::content::Manifest::of_bytes(&data, Default::default());
    let largest = manifest.chunks.iter().max_by_key(|c| c.len).unwrap();
    let before = peak_memory(&cluster, 0);
    let content = |i: u32| crdt_namespace::ContentId(blake3::hash(&i.to_le_bytes()).into());
    runtime.block_on(async {
        let mut stream = rogue.open().await.unwrap();
        // Announcements of versions nobody here asked about: nothing is kept.
        let holds =
            (0..20_000).map(|i| Message::Holds { content: content(i), manifest: Some(vec![9; 8192]) });
        assert_eq!(rogue::write_frames(&mut stream, holds, TIMEOUT).await, 20_000);
        // Staging for a region it is not of: refused, each request.
        let region = transport::proto::Region::new("elsewhere").unwrap();
        let stage = (0..2_000).map(|i| Message::Stage {
            region: region.clone(),
            contents: (0..64).map(|j| content(i * 64 + j)).collect(),
            spoiled: None,
        });
        assert_eq!(rogue::write_frames(&mut stream, stage, TIMEOUT).await, 2_000);
        assert!(!rogue.cut_off(Duration::from_millis(200)).await, "announcements alone cut the rogue off");
        // Chunks asked for and never read: 2,000 of the largest would be gigabytes queued.
        let asks = (0..2_000u64).map(|i| Message::GetChunk {
            request: transport::proto::FetchId(i),
            chunk: largest.hash.0,
            priority: transport::proto::Priority::Urgent,
        });
        rogue::write_frames(&mut stream, asks, TIMEOUT).await;
        assert!(rogue.cut_off(TIMEOUT).await, "a kept queueing chunks for a member that reads none");
    });
    let grown = peak_memory(&cluster, 0).saturating_sub(before);
    eprintln!("requests: 2,000 chunks of {} KiB asked, a's peak grew {} MiB", largest.len >> 10, grown >> 20);
    // The bound: 320 MiB queued for the member, 64 MiB in its stream's window, and slack.
    assert!(grown < 768 << 20, "a held {} MiB for the rogue", grown >> 20);
    assert_eq!(a.status().unwrap().core.versions_known, 0, "unasked announcements were kept");
    let log = std::fs::read_to_string(cluster.site(0).log()).unwrap();
    assert!(log.contains("not keeping up") || log.contains("queue is full"), "{log}");
    still_talking(&cluster, "after-requests");
    drop(rogue);
}

//! Scenarios: several `Site` cores on the simulator's world with faults off (one network
//! model, one bucket model and one executor of outputs, shared with the simulator), reached
//! step by step through the world's hooks: propagation, lazy chunk-by-chunk pulls, range-first
//! reads, delta transfer, collisions, holders that vanish, peers that lie, and reads across
//! regions through the staging bucket.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crdt_namespace::{EntryKind, Namespace, SiteId};
use proto::{Message, Region};
use sim::world::{Answers, BucketFault, World};
use site_core::content::ChunkHash;
use site_core::{Holdings, Output, PackName, Reply, Request, RequestId, Site, SiteConfig, Transfer};

/// The mesh of a scenario: the simulator's world, driven by the test.
type Mesh = World<Answers>;

fn region(name: &str) -> Region {
    Region::new(name).expect("a valid region")
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    site_core::sample::pseudo_random(seed, len)
}

/// Sites `(name, region)` with a staging bucket and the given transfer mode.
fn regions(sites: &[(&str, &str)], transfer: Transfer) -> Mesh {
    regions_tuned(sites, transfer, |_| {})
}

/// Sites in regions, with `tune` applied to every site's configuration.
fn regions_tuned(sites: &[(&str, &str)], transfer: Transfer, tune: impl Fn(&mut SiteConfig)) -> Mesh {
    let regions: BTreeMap<SiteId, Region> =
        sites.iter().map(|(n, r)| (SiteId::new(n).unwrap(), region(r))).collect();
    let names: Vec<&str> = sites.iter().map(|(n, _)| *n).collect();
    configured(&names, |name| {
        let mut config = SiteConfig::new(name.clone());
        config.region = regions[name].clone();
        config.regions =
            regions.iter().filter(|(n, _)| *n != name).map(|(n, r)| (n.clone(), r.clone())).collect();
        config.staging = Some(transfer);
        tune(&mut config);
        config
    })
}

fn configured(names: &[&str], config: impl Fn(&SiteId) -> SiteConfig) -> Mesh {
    World::with_faults_off(names.iter().map(|n| config(&SiteId::new(n).unwrap())).collect())
}

/// The position in the log of messages sent that the next message will have.
fn mark(mesh: &Mesh) -> usize {
    mesh.log().messages.len()
}

/// Runs the mesh one event at a time until `n` chunks went from `from` to `to` since log
/// position `since`.
fn run_until_chunks(mesh: &mut Mesh, from: usize, to: usize, since: usize, n: usize) {
    let chunks = |mesh: &Mesh| {
        mesh.log().messages[since..]
            .iter()
            .filter(|m| (m.from, m.to) == (from, to) && matches!(m.message, Message::Chunk { .. }))
            .count()
    };
    mesh.run_until(u64::MAX, |mesh| chunks(mesh) >= n).unwrap();
    assert!(chunks(mesh) >= n, "{n} chunks never went from {from} to {to}");
}

/// Chunk requests sent by `site` since log position `since`.
fn chunk_requests(mesh: &Mesh, site: usize, since: usize) -> Vec<(usize, ChunkHash)> {
    mesh.log().messages[since..]
        .iter()
        .filter_map(|m| match m.message {
            Message::GetChunk { chunk, .. } if m.from == site => Some((m.to, ChunkHash(chunk))),
            _ => None,
        })
        .collect()
}

/// Chunk bytes that crossed the network since log position `since`.
fn chunk_bytes(mesh: &Mesh, since: usize) -> usize {
    mesh.log().messages[since..]
        .iter()
        .map(|m| match &m.message {
            Message::Chunk { data, .. } => data.len(),
            _ => 0,
        })
        .sum()
}

fn dump(mesh: &Mesh, s: usize) -> Vec<String> {
    mesh.site(s)
        .namespace()
        .walk("/")
        .unwrap()
        .into_iter()
        .map(|e| format!("{:?} {} {:?}", e.stat.kind, e.path, e.stat.version.map(|v| v.content)))
        .collect()
}

/// Messages of one kind sent since log position `since`, as (from, to).
fn sent(mesh: &Mesh, since: usize, kind: fn(&Message) -> bool) -> Vec<(usize, usize)> {
    mesh.log().messages[since..].iter().filter(|m| kind(&m.message)).map(|m| (m.from, m.to)).collect()
}

/// The pack names, each once.
fn distinct(names: &[PackName]) -> BTreeSet<&PackName> {
    names.iter().collect()
}

fn is_get_chunk(m: &Message) -> bool {
    matches!(m, Message::GetChunk { .. })
}

/// The number of versions each `Stage` sent since log position `since` asks for.
fn stage_asks(mesh: &Mesh, since: usize) -> Vec<usize> {
    mesh.log().messages[since..]
        .iter()
        .filter_map(|m| match &m.message {
            Message::Stage { contents, .. } => Some(contents.len()),
            _ => None,
        })
        .collect()
}

/// The outputs a site has queued, taken.
fn outputs(site: &mut Site) -> Vec<Output> {
    std::iter::from_fn(|| site.poll_output()).collect()
}

#[test]
fn what_may_carry_a_change_waits_for_its_store_inside_the_durable_output() {
    let (west, east) = (SiteId::new("west").unwrap(), SiteId::new("east").unwrap());
    let ns = Namespace::new(west.clone(), sim::world::signing_key(&west));
    let mut site = Site::new(SiteConfig::new(west), ns, Holdings::default());
    site.handle_peer_up(1, east.clone());
    // The first sync message may carry this site's changes, and the report of what it has
    // integrated names them: both wait for the stores before them.
    match outputs(&mut site).as_slice() {
        [Output::Durable { then, .. }] => assert!(matches!(
            then.as_slice(),
            [
                Output::Send { message: Message::Sync { .. }, .. },
                Output::Send { message: Message::Seen { .. }, .. }
            ]
        )),
        other => panic!("a bare sync message, or none: {other:?}"),
    }
    site.handle_local(2, 2, RequestId(7), Request::Mkdir { path: "/a".into(), parents: false, mode: 0o755 });
    match outputs(&mut site).as_slice() {
        [Output::Durable { store, then }] => {
            assert!(!store.namespace.is_empty(), "the change is in the store");
            assert!(matches!(
                then.as_slice(),
                [
                    Output::Broadcast { message: Message::Push { .. }, .. },
                    Output::Reply { id: RequestId(7), reply: Ok(Reply::Done) }
                ]
            ));
        }
        other => panic!("the change's push and answer are not behind its store: {other:?}"),
    }
    // An answer that changes nothing does not wait.
    site.handle_local(3, 3, RequestId(8), Request::Stat { path: "/a".into() });
    assert!(matches!(
        outputs(&mut site).as_slice(),
        [Output::Reply { id: RequestId(8), reply: Ok(Reply::Stat(_)) }]
    ));
}

#[test]
fn a_file_put_at_one_site_is_listed_and_readable_at_the_others_pulled_chunk_by_chunk() {
    let mut mesh = World::with_sites(&["west", "east", "north"]);
    mesh.ok(0, Request::Mkdir { path: "/shots".into(), parents: true, mode: 0o755 });
    let data = random_bytes(300_000, 1);
    let manifest = mesh.put(0, "/shots/a.bin", &data);
    assert!(manifest.chunks.len() > 20);
    for s in 1..3 {
        let Reply::List(entries) = mesh.ok(s, Request::List { path: "/shots".into() }) else { panic!() };
        assert_eq!(entries.len(), 1);
        assert_eq!(
            (entries[0].name.as_str(), entries[0].stat.kind, entries[0].stat.size),
            ("a.bin", EntryKind::File, 300_000)
        );
        // Nothing moved yet: the bytes stay where they were written.
        assert!(mesh.chunks(s).is_empty());
    }
    let since = mark(&mesh);
    assert_eq!(mesh.read(1, "/shots/a.bin", None).unwrap(), data);
    let requests = chunk_requests(&mesh, 1, since);
    assert_eq!(requests.len(), manifest.chunks.len(), "one request per chunk");
    assert!(requests.iter().all(|(to, _)| *to == 0));
    assert!(mesh.site(1).holds(&manifest.content_id()));
    // A second read is served locally.
    let since = mark(&mesh);
    assert_eq!(mesh.read(1, "/shots/a.bin", Some(1000..2000)).unwrap(), &data[1000..2000]);
    assert!(chunk_requests(&mesh, 1, since).is_empty());
}

#[test]
fn a_range_read_fetches_the_covering_chunks_first_and_only_those() {
    let mut mesh = World::with_sites(&["west", "east"]);
    let data = random_bytes(2_000_000, 2);
    let manifest = mesh.put(0, "/big.bin", &data);
    let range = 1_000_000..1_050_000;
    let covering = manifest.chunks_covering(range.clone());
    let since = mark(&mesh);
    assert_eq!(mesh.read(1, "/big.bin", Some(range.clone())).unwrap(), &data[1_000_000..1_050_000]);
    let requested: Vec<ChunkHash> = chunk_requests(&mesh, 1, since).into_iter().map(|(_, h)| h).collect();
    let expected: Vec<ChunkHash> = manifest.chunks[covering].iter().map(|c| c.hash).collect();
    assert_eq!(requested, expected, "exactly the covering chunks, in file order");
    assert!(!mesh.site(1).holds(&manifest.content_id()));
}

#[test]
fn editing_inside_a_large_file_moves_only_the_changed_chunks() {
    let mut mesh = World::with_sites(&["west", "east"]);
    let mut data = random_bytes(4_000_000, 3);
    mesh.put(0, "/clip.mov", &data);
    assert_eq!(mesh.read(1, "/clip.mov", None).unwrap(), data);
    data[2_000_000..2_065_536].copy_from_slice(&random_bytes(65_536, 4));
    mesh.put(0, "/clip.mov", &data);
    let since = mark(&mesh);
    assert_eq!(mesh.read(1, "/clip.mov", None).unwrap(), data);
    let moved = chunk_bytes(&mesh, since);
    assert!(moved > 0 && moved < 65_536 + 4 * 16_384, "{moved} bytes moved for a 64 KiB edit of 4 MB");
}

#[test]
fn a_collision_made_at_two_sites_during_a_partition_resolves_identically() {
    let mut mesh = World::with_sites(&["west", "east"]);
    mesh.ok(0, Request::Mkdir { path: "/shots".into(), parents: false, mode: 0o755 });
    // Both sites believe the link up; everything sent on it is lost.
    mesh.cut(0, 1);
    mesh.put(0, "/shots/shot010.clip", b"west version");
    mesh.put(1, "/shots/shot010.clip", b"east version");
    mesh.ok(1, Request::Mkdir { path: "/shots/sq".into(), parents: false, mode: 0o755 });
    mesh.put(0, "/shots/sq", b"a file where east made a directory");
    assert_ne!(dump(&mesh, 0), dump(&mesh, 1));
    mesh.mend(0, 1);
    // Anti-entropy after the partition heals.
    mesh.advance(60_000).unwrap();
    for s in 0..2 {
        mesh.timeout(s).unwrap();
    }
    mesh.run().unwrap();
    assert_eq!(dump(&mesh, 0), dump(&mesh, 1));
    let names: Vec<String> = match mesh.ok(1, Request::List { path: "/shots".into() }) {
        Reply::List(entries) => entries.into_iter().map(|e| e.name).collect(),
        other => panic!("{other:?}"),
    };
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(names.contains(&"shot010.clip".to_string()) && names.contains(&"sq".to_string()));
    assert!(names.iter().filter(|n| n.contains(".conflict-")).count() == 2, "{names:?}");
    // Both versions are readable at both sites.
    for s in 0..2 {
        let mut contents: Vec<Vec<u8>> = names
            .iter()
            .filter(|n| n.starts_with("shot010"))
            .map(|n| mesh.read(s, &format!("/shots/{n}"), None).unwrap())
            .collect();
        contents.sort();
        assert_eq!(contents, vec![b"east version".to_vec(), b"west version".to_vec()]);
    }
}

#[test]
fn a_read_continues_from_another_holder_when_one_disappears() {
    // "a" is asked first (holders are tried in site order), and vanishes mid-read.
    let mut mesh = World::with_sites(&["a", "b", "reader"]);
    let data = random_bytes(500_000, 5);
    let manifest = mesh.put(0, "/f", &data);
    assert_eq!(mesh.read(1, "/f", None).unwrap(), data);
    assert!(mesh.site(1).holds(&manifest.content_id()));
    // Drop a's link after a few chunks: run until 3 chunks came from a, then drop it, with
    // what is in flight on it.
    let since = mark(&mesh);
    let id = mesh.start_read(2, "/f");
    run_until_chunks(&mut mesh, 0, 2, since, 3);
    mesh.disconnect(0, 2);
    mesh.run().unwrap();
    let result = mesh.take_read(id);
    assert_eq!(result.done, Some(Ok(())));
    assert_eq!(result.data, data);
    let from_b = chunk_requests(&mesh, 2, since).iter().filter(|(to, _)| *to == 1).count();
    assert!(from_b > 0, "the rest came from b");
}

#[test]
fn a_read_whose_only_holder_drops_its_link_resumes_when_it_returns_and_fails_if_it_does_not() {
    let mut mesh = World::with_sites(&["west", "east"]);
    let data = random_bytes(500_000, 8);
    mesh.put(0, "/f", &data);
    mesh.put(0, "/g", &random_bytes(400_000, 9));
    for (path, comes_back) in [("/f", true), ("/g", false)] {
        let since = mark(&mesh);
        let id = mesh.start_read(1, path);
        run_until_chunks(&mut mesh, 0, 1, since, 3);
        mesh.disconnect(0, 1);
        mesh.run().unwrap();
        assert!(mesh.driver.reads.get(&id).is_none_or(|r| r.done.is_none()), "the read waits for a holder");
        if comes_back {
            mesh.connect(0, 1);
            mesh.run().unwrap();
            let result = mesh.take_read(id);
            assert_eq!(result.done, Some(Ok(())));
            assert_eq!(result.data, data);
            let asked = chunk_requests(&mesh, 1, since);
            let unique: HashSet<_> = asked.iter().map(|(_, h)| *h).collect();
            let repeated = asked.len() - unique.len();
            assert!(repeated <= 8, "resumed where it stopped: {repeated} chunks asked twice");
        } else {
            mesh.advance(10_000).unwrap();
            mesh.timeout(1).unwrap();
            mesh.run().unwrap();
            let error = mesh.take_read(id).done.unwrap().unwrap_err();
            assert!(error.starts_with("no reachable site holds /g"), "{error}");
        }
    }
}

#[test]
fn a_peer_sending_a_chunk_that_does_not_match_its_hash_is_disconnected_and_the_read_goes_on() {
    let mut mesh = World::with_sites(&["a", "b", "reader"]);
    let data = random_bytes(100_000, 6);
    mesh.put(0, "/f", &data);
    assert_eq!(mesh.read(1, "/f", None).unwrap(), data);
    mesh.lie(0);
    assert_eq!(mesh.read(2, "/f", None).unwrap(), data, "served by b after a lied");
    assert!(
        mesh.log()
            .disconnects
            .iter()
            .any(|(s, p, r)| *s == 2 && p.as_str() == "a" && r.contains("does not match"))
    );
    assert!(mesh.chunks(2).values().all(|d| mesh.chunks(1).values().any(|e| e == d)), "no bad data stored");
}

#[test]
fn a_read_of_a_version_no_reachable_site_holds_fails_clearly() {
    let mut mesh = World::with_sites(&["west", "east"]);
    mesh.put(0, "/f", b"only at west");
    mesh.cut(0, 1);
    let id = mesh.request(1, Request::Read { path: "/f".into(), range: None });
    mesh.driver.replies.remove(&id).unwrap().unwrap();
    mesh.advance(10_000).unwrap();
    mesh.timeout(1).unwrap();
    mesh.run().unwrap();
    let error = mesh.take_read(id).done.unwrap().unwrap_err();
    assert!(error.starts_with("no reachable site holds /f"), "{error}");
    let missing = mesh.request(1, Request::Read { path: "/nope".into(), range: None });
    assert_eq!(
        mesh.driver.replies.remove(&missing).unwrap().unwrap_err(),
        "no such file or directory: /nope"
    );
}

#[test]
fn a_read_of_a_version_the_file_had_returns_that_version_also_once_replaced_or_removed() {
    let mut mesh = World::with_sites(&["west", "east"]);
    let old = random_bytes(100_000, 7);
    let first = mesh.put(0, "/f", &old);
    let new = random_bytes(80_000, 8);
    mesh.put(0, "/f", &new);
    let pinned = |path: &str, range| Request::ReadVersion {
        path: path.into(),
        content: first.content_id(),
        size: old.len() as u64,
        range,
    };
    let read = |mesh: &mut World<Answers>, request| {
        let id = mesh.request(1, request);
        let header = mesh.driver.replies.remove(&id).unwrap().unwrap();
        let result = mesh.take_read(id);
        result.done.unwrap().unwrap();
        (header, result.data)
    };
    // East, which never held it, reads the replaced version from west (not collected yet).
    let (header, data) = read(&mut mesh, pinned("/f", None));
    assert_eq!(header, Reply::ReadStarted { size: old.len() as u64, range: 0..old.len() as u64 });
    assert!(data == old, "the version asked for, not the current one");
    assert!(mesh.read(1, "/f", None).unwrap() == new, "a read without a version reads the current one");
    let (_, data) = read(&mut mesh, pinned("/f", Some(40_000..40_100)));
    assert!(data[..] == old[40_000..40_100]);
    // Moved away, then removed: still the version asked for, while a site holds it.
    mesh.ok(0, Request::Rename { from: "/f".into(), to: "/g".into() });
    let (_, data) = read(&mut mesh, pinned("/f", None));
    assert!(data == old);
    mesh.ok(0, Request::Remove { path: "/g".into(), recursive: false });
    let (_, data) = read(&mut mesh, pinned("/g", None));
    assert!(data == old);
    // A size that is not the version's: the read ends with an error, not a hang.
    let wrong = Request::ReadVersion {
        path: "/g".into(),
        content: first.content_id(),
        size: 1 << 30,
        range: Some(500_000..500_010),
    };
    let id = mesh.request(1, wrong);
    mesh.driver.replies.remove(&id).unwrap().unwrap();
    let error = mesh.take_read(id).done.unwrap().unwrap_err();
    assert!(error.starts_with("bytes up to 500010 asked of version"), "{error}");
}

#[test]
fn concurrent_readers_of_one_chunk_share_one_fetch() {
    let mut mesh = World::with_sites(&["west", "east"]);
    let data = random_bytes(50_000, 7);
    let manifest = mesh.put(0, "/f", &data);
    let since = mark(&mesh);
    let ids: Vec<RequestId> = (0..3).map(|_| mesh.start_read(1, "/f")).collect();
    mesh.run().unwrap();
    for id in ids {
        assert_eq!(mesh.take_read(id).data, data);
    }
    let requests = chunk_requests(&mesh, 1, since);
    let distinct: BTreeMap<ChunkHash, usize> = requests.iter().fold(BTreeMap::new(), |mut m, (_, h)| {
        *m.entry(*h).or_default() += 1;
        m
    });
    assert_eq!(distinct.len(), manifest.chunks.len());
    assert!(distinct.values().all(|n| *n == 1), "each chunk fetched once");
}

#[test]
fn a_version_crosses_regions_once_through_the_bucket_and_goes_when_the_region_has_it() {
    // west is in eu; east and north are in us.
    let mut mesh = regions(&[("west", "eu"), ("east", "us"), ("north", "us")], Transfer::Auto);
    let data = random_bytes(60_000, 21);
    mesh.put(0, "/f", &data);
    let since = mark(&mesh);
    // Both us sites read at once: both go through the bucket, one upload serves them.
    let ids: Vec<RequestId> = [1, 2].into_iter().map(|at| mesh.start_read(at, "/f")).collect();
    mesh.run().unwrap();
    for id in ids {
        assert_eq!(mesh.take_read(id).data, data);
    }
    assert!(sent(&mesh, since, is_get_chunk).is_empty(), "no chunk crossed the regions directly");
    assert_eq!(mesh.log().uploads.len(), 1, "one upload for the region pair, shared by both readers");
    let Reply::Status(west) = mesh.ok(0, Request::Status) else { panic!("a status") };
    assert_eq!(west.bytes_to_staging, data.len() as u64);
    let Reply::Status(east) = mesh.ok(1, Request::Status) else { panic!("a status") };
    assert_eq!((east.bytes_from_staging, east.bytes_fetched), (data.len() as u64, 0));
    // Both sites of us hold it now: the uploader deleted the pack.
    assert_eq!(mesh.log().deletes, mesh.log().uploads);
    assert!(mesh.packs().is_empty());
    // A later us reader gets it from a us holder, directly.
    let since = mark(&mesh);
    mesh.put(0, "/h", &data[..3000]);
    assert_eq!(mesh.read(1, "/h", None).unwrap(), &data[..3000]);
    assert_eq!(mesh.log().uploads.len(), 2);
    assert_eq!(mesh.read(2, "/h", None).unwrap(), &data[..3000]);
    let direct = sent(&mesh, since, is_get_chunk);
    assert!(!direct.is_empty() && direct.iter().all(|(f, t)| (*f, *t) == (2, 1)), "{direct:?}");
    // Only east confirmed: the pack goes after the grace period.
    assert_eq!(mesh.log().deletes.len(), 1);
    mesh.advance(60_000).unwrap();
    mesh.timeout(0).unwrap();
    mesh.run().unwrap();
    assert_eq!(mesh.log().deletes.len(), 2);
    assert!(mesh.packs().is_empty());
    // Within a region, sites talk directly: a us site reads what another us site wrote.
    mesh.put(1, "/g", &data[..5000]);
    let since = mark(&mesh);
    assert_eq!(mesh.read(2, "/g", None).unwrap(), &data[..5000]);
    assert!(!sent(&mesh, since, is_get_chunk).is_empty());
    assert_eq!(mesh.log().uploads.len(), 2, "nothing staged within a region");
}

#[test]
fn a_region_reads_from_its_own_holder_even_when_a_holder_of_another_region_sorts_first() {
    // Found by the simulator's check that staged mode never moves a chunk across regions
    // directly: with holders in both regions, the fetch went to the first in site order.
    for transfer in [Transfer::Auto, Transfer::Staged] {
        let mut mesh = regions(&[("ams", "eu"), ("bos", "us"), ("cdg", "us")], transfer);
        let data = random_bytes(50_000, 25);
        mesh.put(0, "/f", &data);
        assert_eq!(mesh.read(1, "/f", None).unwrap(), data);
        let since = mark(&mesh);
        assert_eq!(mesh.read(2, "/f", None).unwrap(), data);
        let direct = sent(&mesh, since, is_get_chunk);
        assert!(
            !direct.is_empty() && direct.iter().all(|(f, t)| (*f, *t) == (2, 1)),
            "{transfer:?}: {direct:?}"
        );
    }
}

#[test]
fn a_bad_pack_is_discarded_and_auto_mode_reads_directly_instead() {
    let mut mesh = regions(&[("west", "eu"), ("east", "us")], Transfer::Auto);
    let data = random_bytes(30_000, 22);
    mesh.put(0, "/f", &data);
    mesh.set_bucket_fault(Some(BucketFault::Corrupt));
    let since = mark(&mesh);
    assert_eq!(mesh.read(1, "/f", None).unwrap(), data);
    // Reported at once, the tampered pack is replaced; tampered again, the chunks come directly.
    assert_eq!(mesh.log().uploads.len(), 2);
    assert_eq!(distinct(&mesh.log().deletes), distinct(&mesh.log().uploads), "both discarded");
    assert!(mesh.packs().is_empty(), "the tampered packs are gone");
    assert!(!sent(&mesh, since, is_get_chunk).is_empty(), "the chunks came directly");
    assert!(mesh.log().disconnects.is_empty(), "the bucket's fault is not the holder's");
}

#[test]
fn an_unreachable_bucket_falls_back_in_auto_mode_and_fails_clearly_in_staged_mode() {
    let mut auto = regions(&[("west", "eu"), ("east", "us")], Transfer::Auto);
    let data = random_bytes(20_000, 23);
    auto.put(0, "/f", &data);
    auto.set_bucket_fault(Some(BucketFault::TimedOut));
    assert_eq!(auto.read(1, "/f", None).unwrap(), data);

    let mut staged = regions(&[("west", "eu"), ("east", "us")], Transfer::Staged);
    staged.put(0, "/f", &data);
    staged.set_bucket_fault(Some(BucketFault::TimedOut));
    let since = mark(&staged);
    let error = staged.read(1, "/f", None).unwrap_err();
    assert!(error.starts_with("reading /f through the staging bucket failed"), "{error}");
    assert!(sent(&staged, since, is_get_chunk).is_empty(), "staged mode never reads across directly");
    // The bucket is back: a later read stages the version and succeeds.
    staged.set_bucket_fault(None);
    staged.advance(60_000).unwrap();
    assert_eq!(staged.read(1, "/f", None).unwrap(), data);
    assert_eq!(staged.log().uploads.len(), 1);
}

#[test]
fn direct_mode_never_touches_the_bucket() {
    let mut mesh = regions(&[("west", "eu"), ("east", "us")], Transfer::Direct);
    let data = random_bytes(20_000, 24);
    mesh.put(0, "/f", &data);
    assert_eq!(mesh.read(1, "/f", None).unwrap(), data);
    assert!(mesh.log().uploads.is_empty() && mesh.packs().is_empty());
}

#[test]
fn a_member_added_live_is_read_through_the_bucket_once_its_region_is_known() {
    // east does not know west's region yet (west joined with `mesh add` while east ran).
    let mut mesh = configured(&["west", "east"], |name| {
        let mut config = SiteConfig::new(name.clone());
        config.staging = Some(Transfer::Staged);
        if name.as_str() == "west" {
            config.region = region("eu");
            config.regions.insert(SiteId::new("east").unwrap(), region("us"));
        } else {
            config.region = region("us");
        }
        config
    });
    let data = random_bytes(20_000, 25);
    mesh.put(0, "/f", &data);
    let west = SiteId::new("west").unwrap();
    let mut keys = crdt_namespace::Keys::new();
    keys.allow(&west, sim::world::signing_key(&west).public());
    let regions = [(west, region("eu"))].into_iter().collect();
    let member = Request::Membership { keys, regions };
    assert_eq!(mesh.ok(1, member), Reply::Done);
    let since = mark(&mesh);
    assert_eq!(mesh.read(1, "/f", None).unwrap(), data);
    assert!(sent(&mesh, since, is_get_chunk).is_empty(), "staged mode: nothing directly across regions");
    assert_eq!(mesh.log().uploads.len(), 1);
}

#[test]
fn versions_asked_for_while_uploads_are_in_flight_go_up_together_in_one_pack() {
    // Without read-ahead, which would put them in one pack anyway (the next test).
    let no_read_ahead = |c: &mut SiteConfig| c.stage_read_ahead = 0;
    let mut mesh = regions_tuned(&[("west", "eu"), ("east", "us")], Transfer::Staged, no_read_ahead);
    // Twelve one-chunk files: fewer than the site's bound of fetches in flight (16).
    let files: Vec<Vec<u8>> = (0..12).map(|i| random_bytes(900 + i * 10, 100 + i as u64)).collect();
    for (i, data) in files.iter().enumerate() {
        mesh.put(0, &format!("/f{i}"), data);
    }
    mesh.hold_uploads();
    let ids: Vec<RequestId> = (0..files.len()).map(|i| mesh.start_read(1, &format!("/f{i}"))).collect();
    mesh.run().unwrap();
    // Two packs in flight (the default bound), each with the one version asked for first; the
    // ten asked for meanwhile wait, then go up as one pack.
    assert_eq!(mesh.held_uploads().len(), 2);
    mesh.finish_uploads().unwrap();
    assert_eq!(mesh.held_uploads().len(), 1);
    assert_eq!(mesh.held_uploads()[0].chunks.len(), 10, "the next pack has the rest");
    mesh.finish_uploads().unwrap();
    assert_eq!(mesh.log().uploads.len(), 3);
    for (id, data) in ids.into_iter().zip(&files) {
        let read = mesh.take_read(id);
        assert_eq!(read.done, Some(Ok(())));
        assert_eq!(&read.data, data);
    }
    // The only site of us holds every version: all three packs are deleted.
    assert_eq!(distinct(&mesh.log().deletes), distinct(&mesh.log().uploads));
    assert_eq!(mesh.log().deletes.len(), mesh.log().uploads.len());
    assert!(mesh.packs().is_empty());
    let Reply::Status(east) = mesh.ok(1, Request::Status) else { panic!("a status") };
    assert_eq!(east.staged_packs, 0);
}

#[test]
fn a_link_reset_while_a_version_is_being_staged_does_not_turn_the_read_direct_or_fail_it() {
    // Seen on real nodes: two sites dialling each other at once close the duplicate connection,
    // which resets the link between them while the reader waits for the holder's upload.
    for transfer in [Transfer::Auto, Transfer::Staged] {
        let mut mesh = regions(&[("west", "eu"), ("east", "us")], transfer);
        let data = random_bytes(40_000, 24);
        mesh.put(0, "/f", &data);
        mesh.hold_uploads();
        let since = mark(&mesh);
        let id = mesh.start_read(1, "/f");
        mesh.run().unwrap();
        assert_eq!(mesh.held_uploads().len(), 1, "west is uploading it");
        mesh.disconnect(0, 1);
        mesh.run().unwrap();
        mesh.advance(5).unwrap();
        mesh.connect(0, 1);
        mesh.run().unwrap();
        mesh.finish_uploads().unwrap();
        let read = mesh.take_read(id);
        assert_eq!(read.done, Some(Ok(())), "{transfer:?}");
        assert_eq!(read.data, data);
        assert!(sent(&mesh, since, is_get_chunk).is_empty(), "{transfer:?}: nothing came directly");
        assert_eq!(mesh.log().uploads.len(), 1, "{transfer:?}: the upload in flight served the read");
    }
}

#[test]
fn a_read_across_regions_reads_ahead_the_small_files_that_follow_it() {
    let mut mesh =
        regions_tuned(&[("west", "eu"), ("east", "us")], Transfer::Staged, |c| c.stage_read_ahead = 16);
    let files: Vec<Vec<u8>> = (0..40).map(|i| random_bytes(700 + i, 300 + i as u64)).collect();
    for dir in ["/d", "/e"] {
        mesh.ok(0, Request::Mkdir { path: dir.into(), parents: false, mode: 0o755 });
    }
    for (i, data) in files.iter().enumerate() {
        mesh.put(0, &format!("/d/f{i:03}"), data);
    }
    // Too large to read ahead, and another directory: neither is asked for.
    mesh.put(0, "/d/f015-big", &random_bytes(1_100_000, 340));
    mesh.put(0, "/e/x", &random_bytes(500, 341));
    let since = mark(&mesh);
    assert_eq!(mesh.read(1, "/d/f000", None).unwrap(), files[0]);
    assert_eq!(stage_asks(&mesh, since), vec![17], "the file and the 16 after it, in one ask");
    assert_eq!(mesh.log().uploads.len(), 1, "in one pack");
    // The next eight come from that pack without asking anyone anything; the ninth (the middle
    // of what was read ahead) asks for the next sixteen.
    let since = mark(&mesh);
    for (i, data) in files.iter().enumerate().take(9).skip(1) {
        assert_eq!(&mesh.read(1, &format!("/d/f{i:03}"), None).unwrap(), data);
    }
    let asked = |m: &Message| matches!(m, Message::WhoHas { .. } | Message::Stage { .. });
    assert!(
        sent(&mesh, since, asked).is_empty(),
        "neither who-has nor stage: {:?}",
        sent(&mesh, since, asked)
    );
    assert_eq!(mesh.read(1, "/d/f009", None).unwrap(), files[9]);
    assert_eq!(stage_asks(&mesh, since), vec![16]);
    for (i, data) in files.iter().enumerate().skip(10) {
        assert_eq!(&mesh.read(1, &format!("/d/f{i:03}"), None).unwrap(), data);
    }
    // 17 + 16 + the last 7 (the large file left out).
    assert_eq!(mesh.log().uploads.len(), 3);
    let Reply::Status(west) = mesh.ok(0, Request::Status) else { panic!("a status") };
    assert_eq!(west.bytes_to_staging, files.iter().map(|f| f.len() as u64).sum::<u64>());
    assert!(sent(&mesh, 0, is_get_chunk).is_empty(), "staged mode: nothing directly across regions");
    // The region holds every file read: every pack is gone.
    assert_eq!(distinct(&mesh.log().deletes), distinct(&mesh.log().uploads));
    assert!(mesh.packs().is_empty());
}

#[test]
fn files_read_ahead_and_never_read_are_let_go_and_their_pack_deleted() {
    let mut mesh =
        regions_tuned(&[("west", "eu"), ("east", "us")], Transfer::Staged, |c| c.stage_read_ahead = 8);
    let files: Vec<Vec<u8>> = (0..6).map(|i| random_bytes(900 + i, 350 + i as u64)).collect();
    mesh.ok(0, Request::Mkdir { path: "/g".into(), parents: false, mode: 0o755 });
    for (i, data) in files.iter().enumerate() {
        mesh.put(0, &format!("/g/a{i}"), data);
    }
    assert_eq!(mesh.read(1, "/g/a0", None).unwrap(), files[0]);
    assert_eq!(mesh.log().uploads.len(), 1);
    let Reply::Status(east) = mesh.ok(1, Request::Status) else { panic!("a status") };
    assert_eq!(east.staged_packs, 1, "the pack of the five read ahead");
    assert!(mesh.log().deletes.is_empty(), "five versions of the pack are not held in us yet");
    // Nobody reads them: east lets them go, and tells west, which deletes the pack.
    mesh.advance(60_000).unwrap();
    mesh.timeout(1).unwrap();
    mesh.run().unwrap();
    let Reply::Status(east) = mesh.ok(1, Request::Status) else { panic!("a status") };
    assert_eq!(east.staged_packs, 0);
    assert_eq!(mesh.log().deletes, mesh.log().uploads);
    assert!(mesh.packs().is_empty());
    // Read later, one of them is staged again.
    assert_eq!(mesh.read(1, "/g/a3", None).unwrap(), files[3]);
    assert_eq!(mesh.log().uploads.len(), 2);
}

#[test]
fn files_read_ahead_are_still_read_when_the_holder_that_staged_them_goes_away() {
    let sites = [("west", "eu"), ("west2", "eu"), ("east", "us")];
    let mut mesh = regions_tuned(&sites, Transfer::Staged, |c| c.stage_read_ahead = 8);
    let files: Vec<Vec<u8>> = (0..4).map(|i| random_bytes(800 + i, 360 + i as u64)).collect();
    mesh.ok(0, Request::Mkdir { path: "/d".into(), parents: false, mode: 0o755 });
    for (i, data) in files.iter().enumerate() {
        mesh.put(0, &format!("/d/f{i}"), data);
        assert_eq!(&mesh.read(1, &format!("/d/f{i}"), None).unwrap(), data, "west2 holds them too");
    }
    assert_eq!(mesh.read(2, "/d/f0", None).unwrap(), files[0]);
    assert_eq!(mesh.log().uploads.len(), 1, "f0 and the three after it, staged by their writer");
    // The writer goes away: east knew only it as a holder of the files read ahead; it asks who
    // else holds them and reads them all the same, from the pack already in the bucket.
    mesh.disconnect(0, 2);
    for (i, data) in files.iter().enumerate().skip(1) {
        assert_eq!(&mesh.read(2, &format!("/d/f{i}"), None).unwrap(), data);
    }
    assert!(sent(&mesh, 0, is_get_chunk).iter().all(|(f, t)| *f != 2 && *t != 2), "nothing directly across");
    assert_eq!(mesh.log().uploads.len(), 1);
}

#[test]
fn a_pack_found_missing_is_reported_and_the_holder_stages_the_version_again() {
    let mut mesh = regions(&[("west", "eu"), ("east", "us")], Transfer::Staged);
    let data = random_bytes(25_000, 26);
    mesh.put(0, "/f", &data);
    mesh.set_bucket_fault(Some(BucketFault::Lost));
    let since = mark(&mesh);
    let error = mesh.read(1, "/f", None).unwrap_err();
    assert!(error.contains("its holder staged it, but the bucket does not have it"), "{error}");
    // The reader named the missing pack to the holder at once, which dropped it and uploaded the
    // version anew — lost too: the read fails (staged mode), without a third try for now.
    let reported = |mesh: &Mesh, since: usize, pack: &PackName| {
        mesh.log().messages[since..].iter().any(|m| {
            (m.from, m.to) == (1, 0)
                && matches!(&m.message, Message::Stage { spoiled: Some(n), .. } if n[..] == pack[..])
        })
    };
    assert_eq!(mesh.log().uploads.len(), 2);
    assert!(reported(&mesh, since, &mesh.log().uploads[0]));
    assert_eq!(mesh.log().deletes, vec![mesh.log().uploads[0].clone()]);
    // Asked again after the retry delay, with the bucket back: a third upload, and the read works.
    mesh.set_bucket_fault(None);
    mesh.advance(30_000).unwrap();
    let since = mark(&mesh);
    assert_eq!(mesh.read(1, "/f", None).unwrap(), data);
    assert!(reported(&mesh, since, &mesh.log().uploads[1]));
    assert_eq!(mesh.log().uploads.len(), 3);
    assert!(mesh.log().deletes.contains(&mesh.log().uploads[1]), "the spoiled pack is deleted");
    assert!(mesh.packs().is_empty(), "and the good one once the region holds the version");
}

#[test]
fn readers_of_a_region_ask_the_writer_so_a_version_held_twice_goes_up_once() {
    let sites = [("west", "eu"), ("west2", "eu"), ("east", "us"), ("north", "us")];
    let mut mesh = regions(&sites, Transfer::Staged);
    let data = random_bytes(40_000, 27);
    mesh.put(0, "/f", &data);
    assert_eq!(mesh.read(1, "/f", None).unwrap(), data, "west2 holds it too");
    let since = mark(&mesh);
    let ids = [mesh.start_read(2, "/f"), mesh.start_read(3, "/f")];
    mesh.run().unwrap();
    for id in ids {
        assert_eq!(mesh.take_read(id).data, data);
    }
    assert_eq!(mesh.log().uploads.len(), 1);
    let asked: Vec<usize> = mesh.log().messages[since..]
        .iter()
        .filter(|m| matches!(m.message, Message::Stage { .. }))
        .map(|m| m.to)
        .collect();
    assert!(!asked.is_empty() && asked.iter().all(|to| *to == 0), "only the writer is asked: {asked:?}");
}

#[test]
fn a_writer_that_cannot_stage_hands_the_reader_to_another_holder_of_its_region() {
    let regions: BTreeMap<SiteId, Region> = [("west", "eu"), ("west2", "eu"), ("east", "us")]
        .into_iter()
        .map(|(n, r)| (SiteId::new(n).unwrap(), region(r)))
        .collect();
    let mut mesh = configured(&["west", "west2", "east"], |name| {
        let mut config = SiteConfig::new(name.clone());
        config.region = regions[name].clone();
        config.regions = regions.clone();
        // The writer has no bucket configured.
        config.staging = (name.as_str() != "west").then_some(Transfer::Staged);
        config
    });
    let data = random_bytes(20_000, 28);
    mesh.put(0, "/f", &data);
    assert_eq!(mesh.read(1, "/f", None).unwrap(), data, "west2 holds it too");
    let since = mark(&mesh);
    assert_eq!(mesh.read(2, "/f", None).unwrap(), data);
    let answers: Vec<(usize, bool)> = mesh.log().messages[since..]
        .iter()
        .filter_map(|m| match &m.message {
            Message::Staged { pack, .. } => Some((m.from, pack.is_ok())),
            _ => None,
        })
        .collect();
    assert_eq!(answers, vec![(0, false), (1, true)], "the writer refuses, west2 stages it");
    assert_eq!(mesh.log().uploads.len(), 1);
    assert!(sent(&mesh, since, is_get_chunk).is_empty(), "staged mode: nothing directly across regions");
}

#[test]
fn a_member_whose_clock_is_at_the_end_of_time_is_held_and_the_others_lose_nothing() {
    let mut mesh = World::with_sites(&["west", "east", "north"]);
    let mkdir = |path: String| Request::Mkdir { path, parents: false, mode: 0o755 };
    // East's wall clock jumps to the end of time (its stamps saturate near u64::MAX), and it
    // writes.
    mesh.jump_clock(1, i64::MAX / 2);
    assert_eq!(mesh.ok(1, mkdir("/from-the-future".into())), Reply::Done);
    mesh.jump_clock(1, -(i64::MAX / 2));
    for s in [0, 2] {
        assert!(mesh.site(s).namespace().stat("/from-the-future").is_err(), "integrated at {s}");
        assert_eq!(mesh.site_mut(s).status().held_changes.get("east"), Some(&1), "held at {s}");
    }
    // The others keep writing: every write is acknowledged, replicated, and survives a crash.
    for i in 0..50 {
        assert_eq!(mesh.ok(0, mkdir(format!("/west-{i}"))), Reply::Done);
        assert_eq!(mesh.ok(2, mkdir(format!("/north-{i}"))), Reply::Done);
    }
    mesh.crash(0);
    mesh.restart(0).unwrap();
    mesh.run().unwrap();
    for s in 0..3 {
        let names = mesh.site(s).namespace().list("/").unwrap();
        let count = |prefix: &str| names.iter().filter(|e| e.name.starts_with(prefix)).count();
        assert_eq!((count("west-"), count("north-")), (50, 50), "at {s}");
    }
    // West's own clock was never pulled forward by east's.
    let west_hlc = mesh.site(0).namespace().last_hlc();
    assert!(west_hlc.physical_ms() < 4_000_000_000_000, "{west_hlc:?}");
}

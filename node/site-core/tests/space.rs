//! Space in the core: a version nothing refers to is deleted only once the change that
//! unreferenced it is causally stable (every member has it, and this site everything
//! concurrent with it), then after the grace period; a member that stays silent holds
//! collection back until it leaves the mesh; the cache of copies stays under its bound, least
//! recently used first, and a site's own versions are never evicted.

mod net;

use std::collections::BTreeMap;

use crdt_namespace::{Keys, SiteId};
use net::{Net, bytes, key};
use site_core::Request;
use site_core::content::Manifest;

#[test]
fn a_removed_version_is_deleted_only_once_every_member_has_seen_the_removal() {
    let mut net = Net::new(&["west", "east"], |_| {});
    let data = bytes(1, 50_000);
    let m = net.put(0, "/f", &data);
    net.wait(6_000);
    assert_eq!(net.stored(0, &m), m.chunks.len());
    // East removes the file; west has the removal, but east's report that it has it, and
    // everything west may lack, waits on the link.
    net.hold(1, 0);
    net.request(1, Request::Remove { path: "/f".into(), recursive: false });
    net.release(1, 0);
    net.hold(1, 0);
    net.wait(20_000);
    assert!(net.sites[0].namespace().stat("/f").is_err(), "west has the removal");
    assert!(net.reclaimed[0].1.is_empty(), "nothing is deleted before east says it saw the removal");
    let status = net.sites[0].status().space;
    assert_eq!(status.garbage_versions, 1);
    assert_eq!(status.garbage_bytes, data.len() as u64);
    let held = &status.held_back_by;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!((held[0].site.as_str(), held[0].bytes, held[0].versions), ("east", data.len() as u64, 1));
    assert!(held[0].reported, "east reported before the removal");
    // East's reports arrive: the next look collects.
    net.release(1, 0);
    net.wait(7_000);
    assert_eq!(net.reclaimed[0].0, vec![m.content_id()]);
    assert_eq!(net.stored(0, &m), 0, "every chunk of the version is deleted");
    let status = net.sites[0].status().space;
    assert_eq!((status.store_bytes, status.garbage_bytes, status.garbage_versions), (0, 0, 0));
    assert_eq!(status.collected_bytes, data.len() as u64);
    assert!(status.held_back_by.is_empty());
    net.sites[0].check_invariants().unwrap();
}

#[test]
fn the_grace_period_runs_from_stability_and_shared_chunks_stay() {
    let mut net = Net::new(&["west", "east"], |c| c.collect_grace_ms = 30_000);
    let shared = bytes(2, 40_000);
    let mut longer = shared.clone();
    longer.extend(bytes(3, 20_000));
    let a = net.put(0, "/a", &shared);
    let b = net.put(0, "/b", &longer);
    net.wait(6_000);
    net.request(0, Request::Remove { path: "/b".into(), recursive: false });
    // Stable within a sync round or two; deleted 30 s after that, not before.
    net.wait(12_000);
    assert!(net.reclaimed[0].1.is_empty(), "the grace period has not passed");
    assert!(net.sites[0].status().space.held_back_by.is_empty(), "stable: nobody holds it back");
    net.wait(30_000);
    assert_eq!(net.reclaimed[0].0, vec![b.content_id()]);
    assert_eq!(net.stored(0, &a), a.chunks.len(), "chunks /a shares with /b stay");
    assert!(net.stored(0, &b) < b.chunks.len());
    assert_eq!(net.read(0, "/a"), shared);
    net.sites[0].check_invariants().unwrap();
}

#[test]
fn a_move_concurrent_with_the_removal_keeps_the_version_even_when_it_arrives_last() {
    // West wrote /f and removes it; east concurrently moves it. East gets the removal and
    // reports so, and its report overtakes its move on the way to west: west must see that it
    // lacks part of what east reported, wait, and then hold the version again.
    let mut net = Net::new(&["west", "east"], |_| {});
    let data = bytes(4, 30_000);
    let m = net.put(0, "/f", &data);
    net.wait(6_000);
    net.hold(1, 0);
    net.request(1, Request::Mkdir { path: "/keep".into(), parents: false, mode: 0o755 });
    net.request(1, Request::Rename { from: "/f".into(), to: "/keep/f".into() });
    net.request(0, Request::Remove { path: "/f".into(), recursive: false });
    net.wait(12_000);
    assert!(net.sites[1].namespace().stat("/keep/f").is_ok(), "at east the move wins");
    net.release_reports(1, 0);
    net.wait(3_000);
    assert!(
        net.sites[0].namespace().stat("/f").is_err() && net.sites[0].namespace().stat("/keep/f").is_err()
    );
    assert!(net.reclaimed[0].0.is_empty(), "west lacks what east reported: nothing goes");
    let held: Vec<String> = net.sites[0].status().space.held_back_by.iter().map(|h| h.site.clone()).collect();
    assert_eq!(held, ["east"]);
    net.release(1, 0);
    net.wait(20_000);
    assert!(net.reclaimed.iter().all(|(v, _)| v.is_empty()), "the move kept the version");
    assert_eq!(net.stored(0, &m), m.chunks.len());
    assert_eq!(net.read(1, "/keep/f"), data, "and it is readable anywhere");
}

#[test]
fn a_silent_member_holds_garbage_back_until_it_leaves_the_mesh() {
    let mut net = Net::new(&["west", "east", "north"], |_| {});
    let data = bytes(5, 20_000);
    net.put(0, "/f", &data);
    net.wait(6_000);
    // North goes silent (it stays a member), then west removes the file.
    net.hold(2, 0);
    net.request(0, Request::Remove { path: "/f".into(), recursive: false });
    net.wait(30_000);
    assert!(net.reclaimed[0].0.is_empty());
    let held: Vec<String> = net.sites[0].status().space.held_back_by.iter().map(|h| h.site.clone()).collect();
    assert_eq!(held, ["north"]);
    // `mesh rm north`: the membership without it.
    let (west, east) = (net.names[0].clone(), net.names[1].clone());
    let mut keys = Keys::new();
    keys.allow(&west, key(&west).public());
    keys.allow(&east, key(&east).public());
    keys.allow_until(&net.names[2].clone(), key(&net.names[2]).public(), 10);
    let regions = BTreeMap::new();
    net.request(0, Request::Membership { keys, regions });
    net.wait(2_000);
    assert_eq!(net.reclaimed[0].0.len(), 1, "released");
    assert!(net.sites[0].status().space.held_back_by.is_empty());
}

#[test]
fn a_site_added_elsewhere_but_not_here_holds_collection_back_until_it_is_added_here() {
    // North was added at east and north, not yet at west. West's removal of /f is stable (east
    // saw it, and nobody else west knows of is a member), but north moved /f concurrently;
    // its move reaches east during west's grace period.
    let names = ["west", "east", "north"].map(|n| SiteId::new(n).unwrap());
    let mut west_keys = Keys::new();
    for name in &names[..2] {
        west_keys.allow(name, key(name).public());
    }
    let mut net = Net::new(&["west", "east", "north"], |config| {
        if config.site.as_str() == "west" {
            config.keys = west_keys.clone();
            config.collect_grace_ms = 60_000;
        }
    });
    let data = bytes(8, 20_000);
    let m = net.put(0, "/f", &data);
    net.wait(6_000);
    for link in [(0, 2), (1, 2), (2, 1)] {
        net.hold(link.0, link.1);
    }
    net.cut.insert((2, 0));
    net.request(2, Request::Mkdir { path: "/keep".into(), parents: false, mode: 0o755 });
    net.request(2, Request::Rename { from: "/f".into(), to: "/keep/f".into() });
    net.request(0, Request::Remove { path: "/f".into(), recursive: false });
    net.wait(10_000);
    assert!(net.sites[0].status().space.held_back_by.is_empty(), "stable at west, in its grace period");
    // North's move reaches east, which passes it on to west: west refuses it (north is no
    // member there) and from then on holds everything back.
    net.release(2, 1);
    net.wait(120_000);
    assert!(net.sites[1].namespace().stat("/keep/f").is_ok(), "at east the move wins");
    assert!(net.reclaimed[0].0.is_empty(), "west keeps the version the move revived");
    let held = net.sites[0].status().space.held_back_by;
    let held: Vec<(&str, Option<&str>)> =
        held.iter().map(|h| (h.site.as_str(), h.named_by.as_deref())).collect();
    assert_eq!(held, [("north", Some("east"))]);
    // North is added at west: west takes its move, and the file is whole everywhere.
    let mut keys = west_keys.clone();
    keys.allow(&names[2], key(&names[2]).public());
    net.request(0, Request::Membership { keys, regions: BTreeMap::new() });
    net.cut.clear();
    for link in [(0, 2), (1, 2)] {
        net.release(link.0, link.1);
    }
    net.reconnect(0, 1);
    net.reconnect(0, 2);
    net.wait(120_000);
    assert!(net.sites[0].namespace().stat("/keep/f").is_ok(), "west has the move");
    assert!(net.reclaimed.iter().all(|(v, _)| v.is_empty()), "nothing was collected anywhere");
    assert_eq!(net.stored(0, &m), m.chunks.len());
    assert_eq!(net.read(2, "/keep/f"), data, "and it is readable anywhere");
}

#[test]
fn a_version_revived_and_removed_again_at_once_counts_once() {
    // North is silent, so west's garbage waits; the version joins an epoch, leaves it (a
    // concurrent move revives it) and joins the same epoch again (removed within a second).
    let mut net = Net::new(&["west", "east", "north"], |_| {});
    let data = bytes(9, 20_000);
    net.put(0, "/f", &data);
    net.wait(6_000);
    for link in [(2, 0), (0, 1), (1, 0)] {
        net.hold(link.0, link.1);
    }
    net.request(1, Request::Rename { from: "/f".into(), to: "/g".into() });
    net.request(0, Request::Remove { path: "/f".into(), recursive: false });
    net.release(1, 0);
    assert!(net.sites[0].namespace().stat("/g").is_ok(), "the move revived it at west");
    net.request(0, Request::Remove { path: "/g".into(), recursive: false });
    net.release(0, 1);
    net.wait(6_000);
    let space = net.sites[0].status().space;
    assert_eq!(space.garbage_versions, 1);
    let held: Vec<(&str, usize, u64)> =
        space.held_back_by.iter().map(|h| (h.site.as_str(), h.versions, h.bytes)).collect();
    assert_eq!(held, [("north", 1, data.len() as u64)]);
}

#[test]
fn the_cache_stays_under_its_bound_least_recently_used_first_and_own_versions_stay() {
    let max = 100_000;
    let mut net = Net::new(&["west", "east"], |c| c.cache_max_bytes = Some(max));
    let files: Vec<Vec<u8>> = (0..6).map(|i| bytes(10 + i, 50_000)).collect();
    let manifests: Vec<Manifest> =
        files.iter().enumerate().map(|(i, data)| net.put(0, &format!("/f{i}"), data)).collect();
    // East writes one of its own, larger than the bound.
    let own = bytes(30, 150_000);
    let own_manifest = net.put(1, "/own", &own);
    net.wait(6_000);
    // East reads 3x its cache bound, every file readable, the cache under the bound after each.
    for (i, data) in files.iter().enumerate() {
        net.wait(1_000);
        assert_eq!(&net.read(1, &format!("/f{i}")), data);
        let space = net.sites[1].status().space;
        assert!(space.cache_bytes <= max, "cache {} over its bound after file {i}", space.cache_bytes);
        assert_eq!(
            space.store_bytes - space.cache_bytes,
            own.len() as u64,
            "east's own version is not cache"
        );
    }
    assert!(net.sites[1].status().space.evicted_bytes > 0);
    assert_eq!(net.stored(1, &own_manifest), own_manifest.chunks.len(), "an own version is never evicted");
    assert_eq!(net.stored(1, &manifests[0]), 0, "the least recently used went first");
    assert_eq!(net.stored(1, &manifests[5]), manifests[5].chunks.len(), "the last read stays");
    // Evicted files are read again from west.
    assert_eq!(net.read(1, "/f0"), files[0]);
    net.sites[1].check_invariants().unwrap();
}

#[test]
fn a_version_this_site_wrote_that_lost_a_chunk_keeps_its_other_chunks_out_of_the_cache() {
    let max = 60_000;
    let mut net = Net::new(&["west", "east"], |c| c.cache_max_bytes = Some(max));
    let m = net.put(0, "/own", &bytes(40, 80_000));
    let others: Vec<Vec<u8>> = (0..4).map(|i| bytes(50 + i, 40_000)).collect();
    for (i, data) in others.iter().enumerate() {
        net.put(1, &format!("/o{i}"), data);
    }
    net.wait(6_000);
    // One chunk of west's own version cannot be read (gone, or an error for a moment).
    let lost = m.chunks[3].hash;
    net.stores[0].remove(&lost).unwrap();
    net.read(0, "/own");
    net.wait(10_000);
    // West reads more than its cache holds: the rest of its own version stays.
    for (i, data) in others.iter().enumerate() {
        net.wait(1_000);
        assert_eq!(&net.read(0, &format!("/o{i}")), data);
    }
    assert!(net.sites[0].status().space.evicted_bytes > 0);
    assert_eq!(net.stored(0, &m), m.chunks.len() - 1, "the other chunks of west's own version stay");
    net.sites[0].check_invariants().unwrap();
}

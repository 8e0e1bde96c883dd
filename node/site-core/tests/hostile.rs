//! Input a site does not control, fed to the core: it answers with an error, never a panic.

use crdt_namespace::{Namespace, SigningKey, SiteId};
use site_core::content::{ChunkHash, ChunkRef, ChunkerConfig, Manifest};
use site_core::{Holdings, LoadPurpose, Output, Request, RequestId, Site, SiteConfig, SiteError};

const WALL_MS: u64 = 1_796_000_000_000;

#[test]
fn a_manifest_that_lists_a_held_chunk_as_longer_fails_the_read_instead_of_panicking() {
    let west = SiteId::new("west").unwrap();
    let key = SigningKey::from_secret(blake3::hash(b"west").as_bytes());
    let mut site = Site::new(SiteConfig::new(west.clone()), Namespace::new(west, key), Holdings::default());
    let data = b"ten bytes!".to_vec();
    let good = Manifest::of_bytes(&data, ChunkerConfig::default());
    let chunk = good.chunks[0];
    // The same chunk, said to be 100 bytes longer.
    let lie = Manifest::new([0; 32], vec![ChunkRef { hash: chunk.hash, len: chunk.len + 100 }]);
    let commit = |path: &str, manifest: Manifest| Request::CommitVersion {
        path: path.into(),
        manifest,
        mode: 0o644,
        mtime_ns: 0,
    };
    site.handle_local(1, WALL_MS, RequestId(1), commit("/good", good));
    site.handle_local(2, WALL_MS, RequestId(2), commit("/evil", lie));
    std::iter::from_fn(|| site.poll_output()).for_each(drop);
    // A range inside the length the manifest claims, beyond the chunk's real end: slicing the
    // chunk by the manifest would go out of bounds.
    site.handle_local(3, WALL_MS, RequestId(3), Request::Read { path: "/evil".into(), range: Some(5..60) });
    let load = std::iter::from_fn(|| site.poll_output()).find_map(|o| match o {
        Output::LoadChunk { hash, purpose: purpose @ LoadPurpose::Read { .. } } => Some((hash, purpose)),
        _ => None,
    });
    let (hash, purpose) = load.expect("the read loads the chunk held here");
    assert_eq!(hash, ChunkHash::of(&data));
    site.handle_chunk_loaded(hash, purpose, Ok(data));
    let done = std::iter::from_fn(|| site.poll_output()).find_map(|o| match o {
        Output::ReadDone { id: RequestId(3), result } => Some(result),
        _ => None,
    });
    assert!(matches!(done, Some(Err(SiteError::Chunk { .. }))), "{done:?}");
    site.check_invariants().unwrap();
}

#[test]
fn a_change_forged_in_another_sites_name_disconnects_its_sender_and_changes_nothing() {
    let key = |name: &str| SigningKey::from_secret(blake3::hash(name.as_bytes()).as_bytes());
    let (west, east, north) =
        (SiteId::new("west").unwrap(), SiteId::new("east").unwrap(), SiteId::new("north").unwrap());
    let mut config = SiteConfig::new(west.clone());
    for site in [&east, &north] {
        config.keys.allow(site, key(site.as_str()).public());
    }
    let mut site = Site::new(config, Namespace::new(west.clone(), key("west")), Holdings::default());
    site.handle_peer_up(1, north.clone());
    std::iter::from_fn(|| site.poll_output()).for_each(drop);
    // North, a member, writes in east's name with its own key and pushes it.
    let mut forger = Namespace::new(east.clone(), key("north"));
    forger.mkdir("/forged", false, 0o755, 0, crdt_namespace::Hlc::new(WALL_MS, 0)).unwrap();
    let changes = forger.export_since(&[]);
    site.handle_message(2, &north, proto::Message::Push { changes });
    let disconnected = std::iter::from_fn(|| site.poll_output()).find_map(|o| match o {
        Output::Disconnect { peer, reason } => Some((peer, reason)),
        _ => None,
    });
    let (peer, reason) = disconnected.expect("the sender of the forgery is disconnected");
    assert_eq!(peer, north, "the sender, not the site named");
    assert!(reason.contains("east did not sign"), "{reason}");
    assert!(site.namespace().stat("/forged").is_err(), "nothing of the forgery is applied");
}

#[test]
fn a_member_asking_to_stage_for_a_region_not_its_own_is_refused_and_nothing_goes_up() {
    let (west, east) = (SiteId::new("west").unwrap(), SiteId::new("east").unwrap());
    let region = |r: &str| proto::Region::new(r).unwrap();
    let mut config = SiteConfig::new(west.clone());
    config.region = region("eu");
    config.regions.insert(east.clone(), region("us"));
    config.staging = Some(site_core::Transfer::Auto);
    let key = SigningKey::from_secret(blake3::hash(b"west").as_bytes());
    let mut site = Site::new(config, Namespace::new(west, key), Holdings::default());
    let manifest = Manifest::of_bytes(b"a version to stage", ChunkerConfig::default());
    let content = manifest.content_id();
    let commit = Request::CommitVersion { path: "/f".into(), manifest, mode: 0o644, mtime_ns: 0 };
    site.handle_local(1, WALL_MS, RequestId(1), commit);
    site.handle_peer_up(2, east.clone());
    std::iter::from_fn(|| site.poll_output()).for_each(drop);
    let stage = |site: &mut Site, r: &str| {
        let message = proto::Message::Stage { region: region(r), contents: vec![content], spoiled: None };
        site.handle_message(3, &east, message);
        std::iter::from_fn(|| site.poll_output()).collect::<Vec<_>>()
    };
    // East (us) names made-up regions, and this site's own: each is refused, nothing uploaded.
    for r in ["xx", "yy", "eu"] {
        let outputs = stage(&mut site, r);
        assert!(!outputs.iter().any(|o| matches!(o, Output::StageUpload { .. })), "{r}: {outputs:?}");
        let refused = outputs.iter().any(|o| {
            matches!(o, Output::Send { message: proto::Message::Staged { pack: Err(why), .. }, .. } if why.contains("not of region"))
        });
        assert!(refused, "{r}: {outputs:?}");
    }
    // For its own region it is served.
    assert!(stage(&mut site, "us").iter().any(|o| matches!(o, Output::StageUpload { .. })));
    site.check_invariants().unwrap();
}

#[test]
fn versions_announced_without_being_asked_for_are_not_kept() {
    let (west, east) = (SiteId::new("west").unwrap(), SiteId::new("east").unwrap());
    let key = SigningKey::from_secret(blake3::hash(b"west").as_bytes());
    let mut site = Site::new(SiteConfig::new(west.clone()), Namespace::new(west, key), Holdings::default());
    site.handle_peer_up(1, east.clone());
    std::iter::from_fn(|| site.poll_output()).for_each(drop);
    // East floods announcements of versions nobody here reads, each with a valid manifest.
    for i in 0..2_000u32 {
        let manifest = Manifest::of_bytes(&i.to_le_bytes(), ChunkerConfig::default());
        let content = manifest.content_id();
        let message = proto::Message::Holds { content, manifest: Some(manifest.encode()) };
        site.handle_message(2, &east, message);
    }
    assert_eq!(site.status().versions_known, 0, "unsolicited announcements are not remembered");
    site.check_invariants().unwrap();
}

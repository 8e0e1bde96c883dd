//! Signed changes, attacked through the real import paths (exports and sync sessions): a member
//! cannot write in another site's name, nor push another site's real change aside by taking its
//! next sequence number; a change relayed by an honest third site is accepted.

mod common;

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, ScalarValue};
use common::*;
use crdt_namespace::{ExchangeError, Namespace, SyncSession, WalkEntry};

fn snapshot(ns: &mut Namespace) -> (Vec<WalkEntry>, Vec<crdt_namespace::ChangeHash>) {
    (ns.walk("/").unwrap(), ns.heads())
}

/// A replica that claims to be `name` but signs with `with`'s key, starting from `history`.
fn impostor(name: &str, with: &str, history: &mut Namespace) -> Namespace {
    let mut ns = Namespace::load(site(name), key(with), &history.save()).unwrap();
    ns.set_keys(keys());
    ns
}

/// Runs a sync session from `from` to `to` until it ends or `to` refuses a message.
fn sync(from: &mut Namespace, to: &mut Namespace) -> Result<(), ExchangeError> {
    let (mut s_from, mut s_to) = (SyncSession::new(), SyncSession::new());
    for _ in 0..10 {
        let mut quiet = true;
        if let Some(m) = from.generate_sync_message(&mut s_from) {
            quiet = false;
            to.receive_sync_message(&mut s_to, &m)?;
        }
        if let Some(m) = to.generate_sync_message(&mut s_to) {
            quiet = false;
            from.receive_sync_message(&mut s_from, &m)?;
        }
        if quiet {
            return Ok(());
        }
    }
    Ok(())
}

fn assert_forgery(result: Result<impl std::fmt::Debug, ExchangeError>, claimed: &str) {
    match result {
        Err(ExchangeError::Signature { site, .. }) => assert_eq!(site, claimed),
        other => panic!("a forgery in {claimed}'s name was not refused as one: {other:?}"),
    }
}

#[test]
fn a_member_cannot_write_in_another_sites_name() {
    let mut west = replica("west");
    west.mkdir("/shots", false, 0o755, 0, hlc(1)).unwrap();
    let mut north = replica("north");
    north.import(&west.export_since(&[])).unwrap();
    let before = snapshot(&mut north);

    // East, a member, makes changes that claim to be west's, signed with its own key.
    let mut forger = impostor("west", "east", &mut west);
    let heads = forger.heads();
    forger.mkdir("/shots/forged", false, 0o755, 0, hlc(2)).unwrap();
    assert_forgery(north.import(&forger.export_since(&heads)), "west");
    assert_eq!(snapshot(&mut north), before, "nothing of the forgery was applied");
    assert_forgery(sync(&mut forger, &mut north), "west");
    assert_eq!(snapshot(&mut north), before, "nothing of the forgery was applied");
}

#[test]
fn unsigned_and_misspelled_signatures_and_strangers_are_refused() {
    let mut west = replica("west");
    west.mkdir("/shots", false, 0o755, 0, hlc(1)).unwrap();
    let mut north = replica("north");
    north.import(&west.export_since(&[])).unwrap();
    let before = snapshot(&mut north);

    // A well-formed operation in an unsigned change of west's.
    let mut raw = AutoCommit::load(&west.save()).unwrap();
    raw.set_actor(ActorId::from(b"west".as_slice()));
    let mut donor = replica("west");
    donor.mkdir("/x", false, 0o755, 0, hlc(50)).unwrap();
    let op = {
        use automerge::ReadDoc;
        let doc = AutoCommit::load(&donor.save()).unwrap();
        let key = doc.keys(automerge::ROOT).next().unwrap();
        match doc.get(automerge::ROOT, key.as_str()).unwrap().unwrap().0 {
            automerge::Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Bytes(b) => (key, b.clone()),
                _ => unreachable!(),
            },
            _ => unreachable!(),
        }
    };
    raw.put(automerge::ROOT, op.0.as_str(), ScalarValue::Bytes(op.1)).unwrap();
    raw.commit();
    let unsigned: Vec<Vec<u8>> =
        raw.get_changes(&west.heads()).iter().map(|c| c.raw_bytes().to_vec()).collect();
    assert_eq!(unsigned.len(), 1);
    let export = frame(&unsigned);
    assert_forgery(north.import(&export), "west");

    // West's own signed change, with its signature spelt in capitals: the same signature, a
    // different change (which could push the real one aside).
    let heads = west.heads();
    west.mkdir("/shots/real", false, 0o755, 0, hlc(60)).unwrap();
    let real = west.export_since(&heads);
    let recased = recase_signature(&real);
    assert_forgery(north.import(&recased), "west");
    assert_eq!(snapshot(&mut north), before);
    north.import(&real).unwrap();
    assert!(north.stat("/shots/real").is_ok(), "the real change still applies");

    // A site outside the membership.
    let mut stranger = Namespace::new(site("stranger"), key("stranger"));
    stranger.mkdir("/s", false, 0o755, 0, hlc(70)).unwrap();
    assert_forgery(north.import(&stranger.export_since(&[])), "stranger");
}

#[test]
fn taking_another_sites_next_sequence_number_does_not_block_its_real_change() {
    let mut west = replica("west");
    west.mkdir("/shots", false, 0o755, 0, hlc(1)).unwrap();
    let (mut east, mut north) = (replica("east"), replica("north"));
    east.import(&west.export_since(&[])).unwrap();
    north.import(&west.export_since(&[])).unwrap();

    // East makes west's next change (same author, next sequence number) before west does, and
    // offers it to north by export and by sync.
    let heads = west.heads();
    let mut forger = impostor("west", "east", &mut west);
    forger.mkdir("/shots/squatted", false, 0o755, 0, hlc(2)).unwrap();
    assert_forgery(north.import(&forger.export_since(&heads)), "west");
    assert_forgery(sync(&mut forger, &mut north), "west");

    // West's real change at that sequence number reaches every site, directly and relayed.
    west.mkdir("/shots/real", false, 0o755, 0, hlc(3)).unwrap();
    north.import(&west.export_since(&heads)).unwrap();
    sync(&mut west, &mut east).unwrap();
    let mut south = replica("south");
    sync(&mut east, &mut south).unwrap();
    for ns in [&mut north, &mut east, &mut south] {
        assert!(ns.stat("/shots/real").is_ok(), "{} lacks west's real change", ns.site());
        assert!(ns.stat("/shots/squatted").is_err(), "{} took the forgery", ns.site());
    }
}

#[test]
fn a_change_relayed_by_an_honest_third_site_is_accepted() {
    let mut west = replica("west");
    west.mkdir("/from-west", false, 0o755, 0, hlc(1)).unwrap();
    let mut east = replica("east");
    east.import(&west.export_since(&[])).unwrap();
    east.mkdir("/from-east", false, 0o755, 0, hlc(2)).unwrap();
    // North hears west only through east: by export and by a sync session.
    let mut north = replica("north");
    north.import(&east.export_since(&[])).unwrap();
    let mut south = replica("south");
    sync(&mut east, &mut south).unwrap();
    for ns in [&mut north, &mut south] {
        assert!(ns.stat("/from-west").is_ok() && ns.stat("/from-east").is_ok());
    }
}

#[test]
fn a_site_that_rotated_its_key_keeps_what_it_wrote_before_and_its_old_key_is_refused_after() {
    let mut west = replica("west");
    west.mkdir("/old", false, 0o755, 0, hlc(1)).unwrap();
    let old = west.export_since(&[]);
    let mut north = replica("north");
    north.import(&old).unwrap();
    // North rotates west's key: the old one may sign what west wrote up to now, no more.
    let until = north.last_seq_of(&site("west"));
    assert_eq!(until, 1);
    let mut keys = crdt_namespace::Keys::new();
    keys.allow(&site("west"), key("west-2").public());
    keys.allow_until(&site("west"), key("west").public(), until);
    north.set_keys(keys.clone());
    // Whoever still has the old key cannot write as west any more...
    let heads = west.heads();
    west.mkdir("/stolen", false, 0o755, 0, hlc(2)).unwrap();
    let err = north.import(&west.export_since(&heads)).unwrap_err();
    assert!(err.to_string().contains("retired before it"), "{err}");
    assert!(north.stat("/stolen").is_err());
    // ...west's new key can, and a site that never saw the old change still takes it.
    let mut rotated = Namespace::load(site("west"), key("west-2"), &replica_save(&old)).unwrap();
    rotated.mkdir("/new", false, 0o755, 0, hlc(3)).unwrap();
    north.import(&rotated.export_since(&heads)).unwrap();
    let mut south = replica("south");
    south.set_keys(keys);
    south.import(&rotated.export_since(&[])).unwrap();
    for ns in [&mut north, &mut south] {
        assert!(ns.stat("/old").is_ok() && ns.stat("/new").is_ok() && ns.stat("/stolen").is_err());
    }
}

/// The saved document of a replica that imported `export`.
fn replica_save(export: &[u8]) -> Vec<u8> {
    let mut ns = replica("west");
    ns.import(export).unwrap();
    ns.save()
}

/// Frames raw automerge changes as `Namespace::export_since` does.
fn frame(changes: &[Vec<u8>]) -> Vec<u8> {
    let mut out = b"mrdn-ex1".to_vec();
    crdt_namespace::wire::push_varint(&mut out, changes.len() as u64);
    for c in changes {
        crdt_namespace::wire::push_varint(&mut out, c.len() as u64);
        out.extend_from_slice(c);
    }
    out
}

/// The export of one change with the signature in its message spelt in capital letters.
fn recase_signature(export: &[u8]) -> Vec<u8> {
    let mut reader = crdt_namespace::wire::Reader::new(&export[8..]);
    assert_eq!(reader.varint("count").unwrap(), 1);
    let raw = reader.bytes("change", usize::MAX).unwrap();
    let change = automerge::Change::from_bytes(raw.to_vec()).unwrap();
    let mut expanded = change.decode();
    let message = expanded.message.take().unwrap();
    let (prefix, hex) = message.split_at("mrdn-sig1:".len());
    expanded.message = Some(format!("{prefix}{}", hex.to_uppercase()));
    expanded.hash = None;
    frame(&[automerge::Change::from(expanded).raw_bytes().to_vec()])
}

#[test]
fn a_push_is_checked_without_a_replica_before_it_is_relayed() {
    let mut west = replica("west");
    west.mkdir("/shots", false, 0o755, 0, hlc(1)).unwrap();
    Namespace::check_export(&west.export_since(&[]), &keys()).unwrap();
    let mut forger = impostor("west", "east", &mut west);
    let heads = forger.heads();
    forger.mkdir("/shots/forged", false, 0o755, 0, hlc(2)).unwrap();
    assert_forgery(Namespace::check_export(&forger.export_since(&heads), &keys()), "west");
    assert!(Namespace::check_export(b"mrdn-ex1garbage", &keys()).is_err());
}

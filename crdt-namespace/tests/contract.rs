//! One test per row of the namespace contract's table of concurrent operations (DESIGN.md),
//! each with two and with three replicas, merged in every order.

mod common;

use common::*;
use crdt_namespace::{EntryKind, Namespace, Stat, TagValue};

const DIR: u32 = 0o755;

/// The conflict name the contract specifies for `name` kept as entry `stat` of `site`.
fn conflict_name(name: &str, site: &str, stat: &Stat) -> String {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => name.split_at(i),
        _ => (name, ""),
    };
    format!("{stem}.conflict-{site}-{}{ext}", &stat.id[..8])
}

/// Replicas sharing a base state made at the first one.
fn with_base(n: usize, base: impl FnOnce(&mut Namespace)) -> Vec<Namespace> {
    let mut rs = replicas(n);
    base(&mut rs[0]);
    share(&mut rs);
    rs
}

fn both_mkdir_the_same_path(n: usize) {
    let mut rs = replicas(n);
    for (i, r) in rs.iter_mut().enumerate() {
        r.mkdir("/shots/sq010", true, DIR, 0, hlc(10 + i as u64)).unwrap();
        r.write_file(&format!("/shots/sq010/{}.clip", SITES[i]), version(i as u8 + 1), hlc(20)).unwrap();
    }
    let result = render(&converge(&mut rs));
    let mut expected = vec!["d /".to_owned(), "d /shots".into(), "d /shots/sq010".into()];
    let mut files: Vec<String> =
        (0..n).map(|i| format!("f /shots/sq010/{}.clip #{}", SITES[i], i + 1)).collect();
    files.sort();
    expected.extend(files);
    assert_eq!(result, expected);
}

#[test]
fn both_mkdir_the_same_path_2() {
    both_mkdir_the_same_path(2);
}
#[test]
fn both_mkdir_the_same_path_3() {
    both_mkdir_the_same_path(3);
}

fn file_vs_directory(n: usize, file_first: bool) {
    let mut rs = replicas(n);
    let (file_at, dir_at) = if file_first { (10, 11) } else { (11, 10) };
    rs[0].write_file("/shot010.clip", version(7), hlc(file_at)).unwrap();
    rs[1].mkdir("/shot010.clip", false, DIR, 0, hlc(dir_at)).unwrap();
    rs[1].write_file("/shot010.clip/inner", version(8), hlc(dir_at + 5)).unwrap();
    if n == 3 {
        rs[2].mkdir("/shot010.clip", false, DIR, 0, hlc(12)).unwrap();
    }
    let dump = converge(&mut rs);
    let copy = dump.iter().find(|e| e.stat.kind == EntryKind::File && e.stat.size == 7).unwrap();
    let name = conflict_name("shot010.clip", "west", &copy.stat);
    assert_eq!(
        render(&dump),
        vec![
            "d /".to_owned(),
            "d /shot010.clip".into(),
            "f /shot010.clip/inner #8".into(),
            format!("f /{name} #7"),
        ]
    );
    assert!(name.starts_with("shot010.conflict-west-") && name.ends_with(".clip"));
}

#[test]
fn file_vs_directory_2() {
    file_vs_directory(2, true);
    file_vs_directory(2, false);
}
#[test]
fn file_vs_directory_3() {
    file_vs_directory(3, true);
    file_vs_directory(3, false);
}

fn two_files_at_the_same_path(n: usize, oldest: usize) {
    let mut rs = replicas(n);
    for (i, r) in rs.iter_mut().enumerate() {
        let at = if i == oldest { 10 } else { 20 + i as u64 };
        r.write_file("/shot010.clip", version(i as u8 + 1), hlc(at)).unwrap();
    }
    let dump = converge(&mut rs);
    let mut expected = vec!["d /".to_owned()];
    for (i, _) in rs.iter().enumerate().filter(|(i, _)| *i != oldest) {
        let e = dump.iter().find(|e| e.stat.size == i as u64 + 1).unwrap();
        assert_eq!(e.path, format!("/{}", conflict_name("shot010.clip", SITES[i], &e.stat)));
        expected.push(format!("f {} #{}", e.path, i + 1));
    }
    expected.push(format!("f /shot010.clip #{}", oldest + 1));
    expected[1..].sort();
    assert_eq!(render(&dump), expected);
}

#[test]
fn two_files_at_the_same_path_older_keeps_the_name_2() {
    two_files_at_the_same_path(2, 0);
    two_files_at_the_same_path(2, 1);
}
#[test]
fn two_files_at_the_same_path_older_keeps_the_name_3() {
    for oldest in 0..3 {
        two_files_at_the_same_path(3, oldest);
    }
}

fn two_writes_to_the_same_file(n: usize) {
    let mut rs = with_base(n, |r| {
        r.mkdir("/shots", false, DIR, 0, hlc(1)).unwrap();
        r.write_file("/shots/shot010.clip", version(1), hlc(2)).unwrap();
    });
    let id = rs[0].stat("/shots/shot010.clip").unwrap().id;
    for (i, r) in rs.iter_mut().enumerate() {
        r.write_file("/shots/shot010.clip", version(10 + i as u8), hlc(10 + i as u64)).unwrap();
    }
    let dump = converge(&mut rs);
    let file = dump.iter().find(|e| e.path == "/shots/shot010.clip").unwrap();
    assert_eq!(file.stat.id, id, "the file keeps its identity");
    assert_eq!(file.stat.size, 10 + n as u64 - 1, "the latest write is the file");
    let copies: Vec<_> = dump.iter().filter(|e| e.path.contains(".conflict-")).collect();
    assert_eq!(copies.len(), n - 1, "every earlier concurrent version is kept");
    for (i, copy) in copies.iter().enumerate() {
        let writer =
            dump.iter().find(|e| e.path == copy.path).map(|e| e.stat.version.clone().unwrap().site).unwrap();
        assert_eq!(copy.path, format!("/shots/{}", conflict_name("shot010.clip", &writer, &copy.stat)));
        assert!(copy.stat.size >= 10 && copy.stat.size < 10 + n as u64 - 1, "copy {i}");
    }
    // A conflict copy is an ordinary file: deleting it discards that version everywhere.
    let copy_path = copies[0].path.clone();
    rs[0].remove(&copy_path, false, hlc(100)).unwrap();
    let after = converge(&mut rs);
    assert!(after.iter().all(|e| e.path != copy_path));
    assert_eq!(after.len(), dump.len() - 1);
}

#[test]
fn two_writes_to_the_same_file_keep_both_2() {
    two_writes_to_the_same_file(2);
}
#[test]
fn two_writes_to_the_same_file_keep_both_3() {
    two_writes_to_the_same_file(3);
}

fn delete_vs_write(n: usize, write_later: bool, remove_parent: bool) {
    let mut rs = with_base(n, |r| {
        r.mkdir("/a/b", true, DIR, 0, hlc(1)).unwrap();
        r.write_file("/a/b/f", version(1), hlc(2)).unwrap();
        r.write_file("/a/b/g", version(2), hlc(3)).unwrap();
    });
    let (remove_at, write_at) = if write_later { (10, 11) } else { (11, 10) };
    let target = if remove_parent { "/a" } else { "/a/b/f" };
    rs[0].remove(target, true, hlc(remove_at)).unwrap();
    rs[1].write_file("/a/b/f", version(9), hlc(write_at)).unwrap();
    if n == 3 {
        rs[2].remove("/a/b/f", false, hlc(12)).unwrap();
    }
    let result = render(&converge(&mut rs));
    let mut expected: Vec<String> = vec!["d /".into(), "d /a".into(), "d /a/b".into(), "f /a/b/f #9".into()];
    if !remove_parent {
        expected.push("f /a/b/g #2".into());
    }
    assert_eq!(result, expected, "remove {target} at {remove_at}, write at {write_at}");
}

#[test]
fn delete_vs_write_the_write_wins_2() {
    for write_later in [true, false] {
        for remove_parent in [true, false] {
            delete_vs_write(2, write_later, remove_parent);
        }
    }
}
#[test]
fn delete_vs_write_the_write_wins_3() {
    for write_later in [true, false] {
        for remove_parent in [true, false] {
            delete_vs_write(3, write_later, remove_parent);
        }
    }
}

fn recursive_delete_vs_create_inside(n: usize, create_later: bool) {
    let mut rs = with_base(n, |r| {
        r.mkdir("/d/sub/deep", true, DIR, 0, hlc(1)).unwrap();
        r.mkdir("/d/other", true, DIR, 0, hlc(1)).unwrap();
        r.write_file("/d/a", version(1), hlc(2)).unwrap();
        r.write_file("/d/sub/c", version(3), hlc(2)).unwrap();
        r.write_file("/d/sub/deep/e", version(4), hlc(2)).unwrap();
    });
    let (remove_at, create_at) = if create_later { (10, 11) } else { (11, 10) };
    rs[0].remove("/d", true, hlc(remove_at)).unwrap();
    rs[1].write_file("/d/sub/deep/new", version(9), hlc(create_at)).unwrap();
    if n == 3 {
        rs[2].mkdir("/d/sub/made", false, DIR, 0, hlc(create_at + 1)).unwrap();
    }
    let result = render(&converge(&mut rs));
    let mut expected: Vec<String> = vec![
        "d /".into(),
        "d /d".into(),
        "d /d/sub".into(),
        "d /d/sub/deep".into(),
        "f /d/sub/deep/new #9".into(),
    ];
    if n == 3 {
        expected.push("d /d/sub/made".into());
    }
    assert_eq!(result, expected);
}

#[test]
fn recursive_delete_vs_create_inside_keeps_what_was_created_2() {
    recursive_delete_vs_create_inside(2, true);
    recursive_delete_vs_create_inside(2, false);
}
#[test]
fn recursive_delete_vs_create_inside_keeps_what_was_created_3() {
    recursive_delete_vs_create_inside(3, true);
    recursive_delete_vs_create_inside(3, false);
}

fn two_moves_of_the_same_entry(n: usize) {
    let mut rs = with_base(n, |r| {
        for d in ["/p0", "/p1", "/p2"] {
            r.mkdir(d, false, DIR, 0, hlc(1)).unwrap();
        }
        r.mkdir("/x/inside", true, DIR, 0, hlc(1)).unwrap();
    });
    for (i, r) in rs.iter_mut().enumerate() {
        r.rename("/x", &format!("/p{i}/x{i}"), hlc(10 + i as u64)).unwrap();
    }
    let result = render(&converge(&mut rs));
    let last = n - 1;
    let mut expected: Vec<String> = vec!["d /".into()];
    for i in 0..3 {
        expected.push(format!("d /p{i}"));
        if i == last {
            expected.push(format!("d /p{i}/x{i}"));
            expected.push(format!("d /p{i}/x{i}/inside"));
        }
    }
    assert_eq!(result, expected);
}

#[test]
fn two_moves_of_the_same_entry_later_wins_2() {
    two_moves_of_the_same_entry(2);
}
#[test]
fn two_moves_of_the_same_entry_later_wins_3() {
    two_moves_of_the_same_entry(3);
}

fn moves_forming_a_cycle(n: usize) {
    let names = ["a", "b", "c"];
    let mut rs = with_base(n, |r| {
        for name in &names[..n] {
            r.mkdir(&format!("/{name}"), false, DIR, 0, hlc(1)).unwrap();
        }
    });
    // Site i moves its directory into the next one: together a cycle.
    for i in 0..n {
        let (from, into) = (names[i], names[(i + 1) % n]);
        rs[i].rename(&format!("/{from}"), &format!("/{into}/{from}"), hlc(10 + i as u64)).unwrap();
    }
    let dump = converge(&mut rs);
    let result = render(&dump);
    // Applied in HLC order, the last move would close the cycle and is skipped.
    let expected: Vec<String> = if n == 2 {
        vec!["d /".into(), "d /b".into(), "d /b/a".into()]
    } else {
        vec!["d /".into(), "d /c".into(), "d /c/b".into(), "d /c/b/a".into()]
    };
    assert_eq!(result, expected);
}

#[test]
fn moves_forming_a_cycle_are_skipped_2() {
    moves_forming_a_cycle(2);
}
#[test]
fn moves_forming_a_cycle_are_skipped_3() {
    moves_forming_a_cycle(3);
}

fn two_sets_of_the_same_tag(n: usize) {
    let mut rs = with_base(n, |r| {
        r.mkdir("/data/set", true, DIR, 0, hlc(1)).unwrap();
    });
    for (i, r) in rs.iter_mut().enumerate() {
        r.set_tag("/data", "stage", &format!("v{i}"), hlc(20 - i as u64)).unwrap();
    }
    let dump = converge(&mut rs);
    let data = dump.iter().find(|e| e.path == "/data").unwrap();
    // Site 0 wrote at the largest HLC.
    assert_eq!(data.stat.tags, vec![("stage".to_owned(), TagValue::Set("v0".into()))]);
    for r in &rs {
        let tags = r.effective_tags("/data/set").unwrap();
        assert_eq!(tags.len(), 1);
        assert_eq!((tags[0].value.as_str(), tags[0].source.as_str()), ("v0", "/data"));
    }
}

#[test]
fn two_sets_of_the_same_tag_later_wins_2() {
    two_sets_of_the_same_tag(2);
}
#[test]
fn two_sets_of_the_same_tag_later_wins_3() {
    two_sets_of_the_same_tag(3);
}

/// Found by the convergence property: a site removes `/b` while another moves `/a` into it and
/// the first writes inside `/a`. The remover never saw its write below `/b`, so it survives.
fn recursive_delete_vs_move_into_it(n: usize) {
    let mut rs = with_base(n, |r| {
        r.mkdir("/a/a", true, DIR, 0, hlc(1)).unwrap();
        r.mkdir("/b/b", true, DIR, 0, hlc(1)).unwrap();
        r.write_file("/b/b/old", version(1), hlc(2)).unwrap();
    });
    rs[1].rename("/a", "/b/b/moved", hlc(10)).unwrap();
    rs[0].write_file("/a/a/new", version(9), hlc(10)).unwrap();
    rs[0].remove("/b", true, hlc(11)).unwrap();
    if n == 3 {
        rs[2].write_file("/b/b/third", version(3), hlc(12)).unwrap();
    }
    let result = render(&converge(&mut rs));
    let mut expected: Vec<String> = vec![
        "d /".into(),
        "d /b".into(),
        "d /b/b".into(),
        "d /b/b/moved".into(),
        "d /b/b/moved/a".into(),
        "f /b/b/moved/a/new #9".into(),
    ];
    if n == 3 {
        expected.push("f /b/b/third #3".into());
    }
    assert_eq!(result, expected);
}

#[test]
fn recursive_delete_vs_move_into_it_keeps_what_the_remover_never_saw_there_2() {
    recursive_delete_vs_move_into_it(2);
}
#[test]
fn recursive_delete_vs_move_into_it_keeps_what_the_remover_never_saw_there_3() {
    recursive_delete_vs_move_into_it(3);
}

#[test]
fn next_siblings_follow_an_entry_in_name_order() {
    let mut ns = replicas(1).remove(0);
    ns.mkdir("/d/sub", true, DIR, 0, hlc(1)).unwrap();
    for (i, name) in ["c", "a", "e", "b"].iter().enumerate() {
        ns.write_file(&format!("/d/{name}"), version(i as u8 + 1), hlc(2 + i as u64)).unwrap();
    }
    let names = |entries: Vec<crdt_namespace::DirEntry>| -> Vec<String> {
        entries.into_iter().map(|e| e.name).collect()
    };
    assert_eq!(names(ns.next_siblings("/d/b", 10).unwrap()), ["c", "e", "sub"]);
    assert_eq!(names(ns.next_siblings("/d/a", 2).unwrap()), ["b", "c"]);
    assert_eq!(ns.next_siblings("/d/b", 10).unwrap()[0].stat.version.as_ref().unwrap().size, 1);
    assert!(ns.next_siblings("/d/sub", 10).unwrap().is_empty());
    assert!(ns.next_siblings("/", 10).unwrap().is_empty());
    assert!(ns.next_siblings("/d/zz", 10).is_err());
}

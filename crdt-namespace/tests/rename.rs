//! `rename_replacing`: POSIX's rename over an existing entry, as one change.

mod common;

use common::*;
use crdt_namespace::OpError;

#[test]
fn a_replacing_rename_checks_everything_first_and_reaches_other_sites_as_one_change() {
    let mut rs = replicas(2);
    let w = &mut rs[0];
    w.mkdir("/d", false, 0o755, 0, hlc(1)).unwrap();
    w.write_file("/a", version(1), hlc(2)).unwrap();
    w.write_file("/b", version(2), hlc(3)).unwrap();
    w.mkdir("/full", false, 0o755, 0, hlc(4)).unwrap();
    w.write_file("/full/x", version(3), hlc(5)).unwrap();
    w.mkdir("/empty", false, 0o755, 0, hlc(6)).unwrap();
    share(&mut rs);
    let w = &mut rs[0];
    let before = render(&w.walk("/").unwrap());
    let refused = [
        ("/a", "/d", "is a directory"),
        ("/d", "/a", "not a directory"),
        ("/empty", "/full", "not empty"),
        ("/full", "/full/x", "into itself"),
        ("/missing", "/a", "no such file"),
    ];
    for (i, (from, to, why)) in refused.into_iter().enumerate() {
        let e = w.rename_replacing(from, to, hlc(10 + 2 * i as u64), hlc(11 + 2 * i as u64)).unwrap_err();
        assert!(e.to_string().contains(why), "{from} over {to}: {e}");
        assert!(!matches!(e, OpError::Root { .. }));
    }
    assert_eq!(render(&w.walk("/").unwrap()), before, "a refused replacement changes nothing");

    // Each replacement reaches the other site as one change of two operations.
    let mut one_change = |from: &str, to: &str, ms: u64| {
        let heads = rs[0].heads();
        rs[0].rename_replacing(from, to, hlc(ms), hlc(ms + 1)).unwrap();
        let export = rs[0].export_since(&heads);
        let report = rs[1].import(&export).unwrap();
        (report.changes, report.ops)
    };
    assert_eq!(one_change("/a", "/b", 30), (1, 2));
    assert_eq!(one_change("/empty", "/d", 32), (1, 2));
    assert_eq!(one_change("/full/x", "/full/x", 34), (0, 0), "onto itself: nothing");
    let after = render(&rs[0].walk("/").unwrap());
    assert_eq!(after, ["d /", "f /b #1", "d /d", "d /full", "f /full/x #3"]);
    assert_eq!(render(&rs[1].walk("/").unwrap()), after);
}

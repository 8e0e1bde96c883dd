//! Shared helpers of the namespace's integration tests.
#![allow(dead_code)]

use crdt_namespace::{ContentId, EntryKind, Hlc, Keys, Namespace, NewVersion, SigningKey, SiteId, WalkEntry};

pub const SITES: [&str; 5] = ["west", "east", "north", "south", "central"];

pub fn site(name: &str) -> SiteId {
    SiteId::new(name).unwrap()
}

/// The signing key of test site `name` (derived from its name).
pub fn key(name: &str) -> SigningKey {
    SigningKey::from_secret(blake3::hash(name.as_bytes()).as_bytes())
}

/// The keys of every test site, and of `observer`.
pub fn keys() -> Keys {
    let mut keys = Keys::new();
    for name in SITES.iter().chain(&["observer"]) {
        keys.allow(&site(name), key(name).public());
    }
    keys
}

/// An empty replica for test site `name`, which accepts the other test sites' changes.
pub fn replica(name: &str) -> Namespace {
    let mut ns = Namespace::new(site(name), key(name));
    ns.set_keys(keys());
    ns
}

/// A replica of `name` loaded from `bytes`, which accepts the other test sites' changes.
pub fn load(name: &str, bytes: &[u8]) -> Result<Namespace, crdt_namespace::ExchangeError> {
    let mut ns = Namespace::load(site(name), key(name), bytes)?;
    ns.set_keys(keys());
    Ok(ns)
}

/// `n` empty replicas named west, east, north...
pub fn replicas(n: usize) -> Vec<Namespace> {
    SITES[..n].iter().map(|s| replica(s)).collect()
}

/// A version whose content id and size are derived from `n`.
pub fn version(n: u8) -> NewVersion {
    NewVersion { content: ContentId([n; 32]), size: u64::from(n), mode: 0o644, mtime_ns: 0 }
}

pub fn hlc(ms: u64) -> Hlc {
    Hlc::new(ms, 0)
}

/// Makes every replica hold every change.
pub fn share(replicas: &mut [Namespace]) {
    let exports: Vec<Vec<u8>> = replicas.iter_mut().map(|r| r.export_since(&[])).collect();
    for r in replicas.iter_mut() {
        for e in &exports {
            r.import(e).unwrap();
        }
    }
}

/// One line per entry: kind, path, and for files the first byte of the content id.
pub fn render(dump: &[WalkEntry]) -> Vec<String> {
    dump.iter()
        .map(|e| match e.stat.kind {
            EntryKind::Dir => format!("d {}", e.path),
            EntryKind::Symlink => {
                format!("l {} -> {}", e.path, e.stat.symlink_target.as_deref().unwrap_or(""))
            }
            EntryKind::File => format!("f {} #{}", e.path, e.stat.version.as_ref().unwrap().content.0[0]),
        })
        .collect()
}

pub fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for (i, first) in items.iter().enumerate() {
        let mut rest = items.to_vec();
        rest.remove(i);
        for mut tail in permutations(&rest) {
            tail.insert(0, *first);
            out.push(tail);
        }
    }
    out
}

fn copy(ns: &mut Namespace) -> Namespace {
    let name = ns.site().to_string();
    load(&name, &ns.save()).unwrap()
}

/// Merges the replicas' changes in every order — into a fresh observer and into a copy of each
/// replica, each delivery duplicated once — checks that every result is identical (every
/// listing and every stat) and satisfies the tree invariant, and returns it.
pub fn converge(replicas: &mut [Namespace]) -> Vec<WalkEntry> {
    let exports: Vec<Vec<u8>> = replicas.iter_mut().map(|r| r.export_since(&[])).collect();
    let all: Vec<usize> = (0..replicas.len()).collect();
    let mut results: Vec<(String, Vec<WalkEntry>)> = Vec::new();
    for order in permutations(&all) {
        let mut observer = replica("observer");
        for i in &order {
            observer.import(&exports[*i]).unwrap();
            observer.import(&exports[*i]).unwrap();
        }
        observer.check_invariants().unwrap();
        results.push((format!("observer {order:?}"), observer.walk("/").unwrap()));
    }
    for (r, replica) in replicas.iter_mut().enumerate() {
        let others: Vec<usize> = all.iter().copied().filter(|i| *i != r).collect();
        for order in permutations(&others) {
            let mut mine = copy(replica);
            for i in &order {
                mine.import(&exports[*i]).unwrap();
            }
            mine.check_invariants().unwrap();
            results.push((format!("{} then {order:?}", replica.site()), mine.walk("/").unwrap()));
        }
    }
    let (first_name, first) = &results[0];
    for (name, result) in &results[1..] {
        assert_eq!(render(result), render(first), "{name} differs from {first_name}");
        assert_eq!(result, first, "{name} differs from {first_name} in a stat");
    }
    share(replicas);
    for r in replicas.iter() {
        assert_eq!(&r.walk("/").unwrap(), first, "{} differs after sharing", r.site());
    }
    first.clone()
}

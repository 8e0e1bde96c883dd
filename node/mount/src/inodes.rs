//! Inode numbers for the kernel, each standing for one namespace entry (its stable id) and the
//! path it was last seen at.
//!
//! An entry's inode number is the first 64 bits of its id (ids are hashes, the same at every
//! site), so it is the same in every listing, at every site and after a remount: `readdir`
//! names entries the kernel has not looked up yet by the number their lookup will give.
//!
//! The control API speaks paths; the kernel speaks inode numbers. An entry keeps its inode
//! number while the kernel remembers it (lookups minus forgets), whatever its path: a rename
//! through the mount moves the paths of the entry and everything below it here; a rename at
//! another site is seen at the next lookup. Every operation on an inode checks that the entry
//! at its path still has its id, so a path taken over by another entry is never acted on.

use std::collections::HashMap;

/// The root's inode number (FUSE's).
pub const ROOT: u64 = 1;

/// One entry the kernel knows.
#[derive(Clone, Debug)]
pub struct Node {
    /// The entry's stable id.
    pub id: String,
    /// Where it was last seen.
    pub path: String,
    /// The inode of the directory it was last seen in.
    pub parent: u64,
    /// Lookups the kernel has not forgotten.
    lookups: u64,
}

/// The table of inodes.
#[derive(Debug)]
pub struct Inodes {
    by_ino: HashMap<u64, Node>,
    by_id: HashMap<String, u64>,
    /// Files created through the mount and not yet committed, numbered.
    pending: u64,
    /// The numbers files created through the mount were given, by entry id once committed:
    /// such a file keeps its number in this mount, also after the kernel forgot it (up to
    /// [`NUMBERS_KEPT`] files; other sites, and this one after a remount, give the entry its
    /// own).
    created: HashMap<String, u64>,
}

/// Files created through the mount whose numbers are kept (about 100 bytes each).
pub const NUMBERS_KEPT: usize = 1_000_000;

/// The prefix of the stand-in id of a file created through the mount and not yet committed:
/// never an entry id (those are hexadecimal).
const PENDING: &str = "pending:";

/// Whether `id` stands for a file created through the mount and not yet committed.
pub fn is_pending(id: &str) -> bool {
    id.starts_with(PENDING)
}

/// The inode number entry `id` gets unless another entry the kernel knows has it.
pub fn ino_for(id: &str) -> u64 {
    // Ids are hexadecimal; anything else (never seen) is hashed (FNV-1a).
    let hashed = id.get(..16).and_then(|h| u64::from_str_radix(h, 16).ok()).unwrap_or_else(|| {
        id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    });
    // 0 is no inode and 1 the root.
    hashed.max(ROOT + 1)
}

impl Inodes {
    /// A table holding the root, whose entry id is `root_id`.
    pub fn new(root_id: String) -> Inodes {
        let root = Node { id: root_id.clone(), path: "/".to_owned(), parent: ROOT, lookups: 1 };
        Inodes {
            by_ino: HashMap::from([(ROOT, root)]),
            by_id: HashMap::from([(root_id, ROOT)]),
            pending: 0,
            created: HashMap::new(),
        }
    }

    /// The entry behind `ino`.
    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.by_ino.get(&ino)
    }

    /// The inode of entry `id`, seen at `path` in the directory `parent`, counting one lookup
    /// (the kernel is told it).
    pub fn learn(&mut self, id: &str, parent: u64, path: &str) -> u64 {
        if let Some(&ino) = self.by_id.get(id) {
            let node = self.by_ino.get_mut(&ino).expect("the two maps agree");
            node.path = path.to_owned();
            node.parent = parent;
            node.lookups += 1;
            return ino;
        }
        // Two ids whose first 64 bits agree: the later one takes the next free number.
        let mut ino = self.number_for(id);
        while self.by_ino.contains_key(&ino) {
            ino = ino.checked_add(1).unwrap_or(ROOT + 1);
        }
        let node = Node { id: id.to_owned(), path: path.to_owned(), parent, lookups: 1 };
        self.by_ino.insert(ino, node);
        self.by_id.insert(id.to_owned(), ino);
        ino
    }

    /// The inode of a file created at `path` in the directory `parent` through the mount and
    /// not yet committed (it has no entry id yet), counting one lookup.
    pub fn pending(&mut self, parent: u64, path: &str) -> u64 {
        self.pending += 1;
        let id = format!("{PENDING}{}", self.pending);
        self.learn(&id, parent, path)
    }

    /// The kernel was given `ino` once more.
    pub fn looked_up(&mut self, ino: u64) {
        if let Some(node) = self.by_ino.get_mut(&ino) {
            node.lookups += 1;
        }
    }

    /// The file created as `ino` is committed as entry `id`: the inode stands for it from now
    /// on, in this mount (if a listing already gave the entry an inode of its own, both stand
    /// for it).
    pub fn bind(&mut self, ino: u64, id: &str) {
        let Some(node) = self.by_ino.get_mut(&ino) else { return };
        let old = std::mem::replace(&mut node.id, id.to_owned());
        if self.by_id.get(&old) == Some(&ino) {
            self.by_id.remove(&old);
        }
        self.by_id.entry(id.to_owned()).or_insert(ino);
        if self.created.len() < NUMBERS_KEPT {
            self.created.insert(id.to_owned(), ino);
        }
    }

    /// The number entry `id` is given when the kernel does not know it.
    fn number_for(&self, id: &str) -> u64 {
        self.created.get(id).copied().unwrap_or_else(|| ino_for(id))
    }

    /// Every inode the kernel knows.
    pub fn all(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_ino.keys().copied()
    }

    /// The inode entry `id` has, if the kernel knows it (no lookup counted).
    pub fn ino_of(&self, id: &str) -> Option<u64> {
        self.by_id.get(id).copied()
    }

    /// The inode number a listing gives entry `id`: the one it has, or the one its lookup
    /// will give.
    pub fn listed_ino(&self, id: &str) -> u64 {
        self.ino_of(id).unwrap_or_else(|| self.number_for(id))
    }

    /// The kernel forgot `n` lookups of `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let Some(node) = self.by_ino.get_mut(&ino) else { return };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 {
            let id = node.id.clone();
            self.by_ino.remove(&ino);
            if self.by_id.get(&id) == Some(&ino) {
                self.by_id.remove(&id);
            }
        }
    }

    /// The entry at `path` was removed (or replaced) through the mount: its inodes, and those
    /// below it, are nowhere (an empty path) until the kernel forgets them.
    pub fn removed(&mut self, path: &str) {
        for node in self.by_ino.values_mut() {
            if node.path != "/" && within(&node.path, path) {
                node.path.clear();
            }
        }
    }

    /// The entry at `from` moved to `to` in directory `parent`: it and everything below it
    /// are there now.
    pub fn moved(&mut self, from: &str, to: &str, parent: u64) {
        for node in self.by_ino.values_mut() {
            if node.path == from {
                node.parent = parent;
            }
            if let Some(path) = moved_path(&node.path, from, to) {
                node.path = path;
            }
        }
    }
}

/// Where `path` is after the entry at `from` moved to `to`: `to` itself or below it, or
/// `None` if the move does not touch it.
pub fn moved_path(path: &str, from: &str, to: &str) -> Option<String> {
    if path == from {
        return Some(to.to_owned());
    }
    let rest = path.strip_prefix(from)?.strip_prefix('/')?;
    Some(format!("{to}/{rest}"))
}

/// Whether `path` is `dir` or below it.
pub fn within(path: &str, dir: &str) -> bool {
    moved_path(path, dir, dir).is_some()
}

/// The path of `name` in the directory at `parent`.
pub fn child_path(parent: &str, name: &str) -> String {
    if parent == "/" { format!("/{name}") } else { format!("{parent}/{name}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_keeps_its_inode_across_moves_until_the_kernel_forgets_it() {
        let mut inodes = Inodes::new("root".into());
        let dir = inodes.learn("d", ROOT, "/a");
        let file = inodes.learn("f", dir, "/a/x");
        let other = inodes.learn("o", ROOT, "/ab");
        assert_eq!(inodes.learn("f", dir, "/a/x"), file, "the same entry, the same inode");
        assert_eq!(inodes.listed_ino("f"), file);
        inodes.moved("/a", "/b", ROOT);
        assert_eq!(inodes.get(dir).unwrap().path, "/b");
        assert_eq!(inodes.get(file).unwrap().path, "/b/x");
        assert_eq!(inodes.get(other).unwrap().path, "/ab", "a sibling whose name starts alike stays");
        inodes.forget(file, 1);
        assert!(inodes.get(file).is_some(), "one lookup is left");
        inodes.forget(file, 1);
        assert!(inodes.get(file).is_none() && inodes.ino_of("f").is_none());
        inodes.forget(ROOT, 10);
        assert_eq!(inodes.get(ROOT).unwrap().path, "/");
        assert_eq!(child_path("/", "a"), "/a");
        assert!(within("/a", "/a") && within("/a/b", "/a") && !within("/ab", "/a") && !within("/a", "/a/b"));
    }

    #[test]
    fn an_inode_number_is_the_start_of_the_id_and_a_listing_gives_the_same() {
        let mut inodes = Inodes::new("0".repeat(32));
        let id = "00000000000000ab0000000000000000";
        assert_eq!(inodes.listed_ino(id), 0xab, "before any lookup");
        assert_eq!(inodes.learn(id, ROOT, "/x"), 0xab);
        // Another id starting alike takes the next number; the root's and 0 are never given.
        assert_eq!(inodes.learn("00000000000000abffffffffffffffff", ROOT, "/y"), 0xac);
        assert_eq!(ino_for(&"0".repeat(32)), ROOT + 1);
        assert!(ino_for("not hex at all, but still a number") > ROOT);
        assert_eq!(child_path("/a", "b"), "/a/b");
    }

    #[test]
    fn a_file_created_through_the_mount_keeps_its_number_once_committed() {
        let mut inodes = Inodes::new("root".into());
        let ino = inodes.pending(ROOT, "/new");
        let id = inodes.get(ino).unwrap().id.clone();
        assert!(is_pending(&id) && !is_pending("00ab"));
        assert_ne!(inodes.pending(ROOT, "/other"), ino, "each creation its own number");
        let entry = "00000000000000ab0000000000000000";
        inodes.bind(ino, entry);
        assert_eq!(inodes.ino_of(entry), Some(ino));
        assert_eq!(inodes.ino_of(&id), None);
        assert_eq!(inodes.learn(entry, ROOT, "/new"), ino);
        // Forgotten by the kernel (both lookups), then listed and looked up again: the same.
        inodes.forget(ino, 2);
        assert!(inodes.get(ino).is_none());
        assert_eq!(inodes.listed_ino(entry), ino);
        assert_eq!(inodes.learn(entry, ROOT, "/new"), ino);
        // Given by a listing meanwhile: both stand for the entry, the first keeps the id.
        let late_entry = "00000000000000cd0000000000000000";
        let listed = inodes.learn(late_entry, ROOT, "/late");
        let late = inodes.pending(ROOT, "/late");
        inodes.bind(late, late_entry);
        assert_eq!(inodes.ino_of(late_entry), Some(listed));
        inodes.forget(late, 1);
        assert_eq!(inodes.ino_of(late_entry), Some(listed), "forgetting one leaves the other");
    }
}

//! Inode numbers for the kernel, each standing for one namespace entry (its stable id) and the
//! path it was last seen at.
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
    /// Lookups the kernel has not forgotten.
    lookups: u64,
}

/// The table of inodes.
#[derive(Debug)]
pub struct Inodes {
    by_ino: HashMap<u64, Node>,
    by_id: HashMap<String, u64>,
    next: u64,
}

impl Inodes {
    /// A table holding the root, whose entry id is `root_id`.
    pub fn new(root_id: String) -> Inodes {
        let root = Node { id: root_id.clone(), path: "/".to_owned(), lookups: 1 };
        Inodes {
            by_ino: HashMap::from([(ROOT, root)]),
            by_id: HashMap::from([(root_id, ROOT)]),
            next: ROOT + 1,
        }
    }

    /// The entry behind `ino`.
    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.by_ino.get(&ino)
    }

    /// The inode of entry `id`, seen at `path`, counting one lookup (the kernel is told it).
    pub fn learn(&mut self, id: &str, path: &str) -> u64 {
        if let Some(&ino) = self.by_id.get(id) {
            let node = self.by_ino.get_mut(&ino).expect("the two maps agree");
            node.path = path.to_owned();
            node.lookups += 1;
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_ino.insert(ino, Node { id: id.to_owned(), path: path.to_owned(), lookups: 1 });
        self.by_id.insert(id.to_owned(), ino);
        ino
    }

    /// The inode entry `id` has, if the kernel knows it (no lookup counted).
    pub fn ino_of(&self, id: &str) -> Option<u64> {
        self.by_id.get(id).copied()
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
            self.by_id.remove(&id);
        }
    }

    /// The entry at `from` moved to `to`: it and everything below it are there now.
    pub fn moved(&mut self, from: &str, to: &str) {
        let below = format!("{from}/");
        for node in self.by_ino.values_mut() {
            if node.path == from {
                node.path = to.to_owned();
            } else if let Some(rest) = node.path.strip_prefix(&below) {
                node.path = format!("{to}/{rest}");
            }
        }
    }
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
        let dir = inodes.learn("d", "/a");
        let file = inodes.learn("f", "/a/x");
        let other = inodes.learn("o", "/ab");
        assert_eq!(inodes.learn("f", "/a/x"), file, "the same entry, the same inode");
        inodes.moved("/a", "/b");
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
        assert_eq!(child_path("/a", "b"), "/a/b");
    }
}

//! Another site's changes reach the kernel's caches: a thread of its own follows the node's log
//! of changed entries (`ApiRequest::Changes`) and tells the kernel to forget the names,
//! attributes and pages of those it knows. (Never from inside a request handler: the kernel
//! may wait for a handler before it takes the notification.)

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{INodeNo, Notifier};
use node::api::{ApiRequest, ChangesAnswer};

use crate::inodes::{Inodes, ROOT};
use crate::remote::Remote;

/// How often the log is asked for what changed.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(100);

/// What the thread needs: the node, and the inodes the kernel knows.
pub struct Follower {
    pub(crate) remote: Remote,
    pub(crate) inodes: Arc<Mutex<Inodes>>,
}

impl Follower {
    /// Follows the change log until `stop` is set. A log that no longer reaches back to the
    /// last change seen, a node that was unreachable or that restarted makes the kernel
    /// forget every entry it knows.
    pub fn run(self, notifier: Notifier, stop: Arc<AtomicBool>) {
        let mut after: Option<u64> = None;
        let mut boot: Option<String> = None;
        let mut lost = false;
        while !stop.load(Ordering::Relaxed) {
            match self.remote.call::<ChangesAnswer>(&ApiRequest::Changes { after }) {
                Ok(changes) => {
                    // A node that restarted numbers its log again: what it answered `after` says
                    // nothing, and its `next` is where to go on from.
                    let restarted = boot.as_ref().is_some_and(|b| *b != changes.boot);
                    let everything = lost || restarted || (after.is_some() && !changes.complete);
                    boot = Some(changes.boot);
                    lost = false;
                    for (ino, parent, name) in self.known(&changes.entries, everything) {
                        // ENOENT: the kernel had already forgotten it.
                        let _ = notifier.inval_entry(INodeNo(parent), OsStr::new(&name));
                        let _ = notifier.inval_inode(INodeNo(ino), 0, 0);
                    }
                    after = Some(changes.next.saturating_sub(1));
                }
                Err(e) => {
                    if !lost {
                        tracing::warn!("following the node's changes: {e:#}");
                    }
                    lost = true;
                    after = None;
                }
            }
            std::thread::sleep(FOLLOW_EVERY);
        }
    }

    /// The inode, directory inode and name of each entry of `ids` the kernel knows, or of every
    /// entry it knows.
    fn known(&self, ids: &[String], everything: bool) -> Vec<(u64, u64, String)> {
        let inodes = crate::fs::lock(&self.inodes);
        let of = |ino: u64| {
            let node = inodes.get(ino)?;
            let name = node.path.rsplit_once('/').map(|(_, name)| name.to_owned())?;
            (ino != ROOT).then_some((ino, node.parent, name))
        };
        if everything {
            inodes.all().filter_map(of).collect()
        } else {
            ids.iter().filter_map(|id| inodes.ino_of(id)).filter_map(of).collect()
        }
    }
}

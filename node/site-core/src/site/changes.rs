//! The log of changed entries a cache of the namespace follows (the mount: it tells the kernel
//! to forget what it holds of them).
//!
//! Every change of the namespace, local or from a peer, names the existing entries it changed
//! ([`crdt_namespace::Namespace::take_changed_entries`]); they get consecutive sequence numbers
//! here. A follower asks for what came after the last number it saw and gets the entries, or
//! `complete: false` when the log no longer reaches back that far (or the site restarted):
//! then it forgets everything.

use std::collections::VecDeque;

/// Entries the log keeps: a follower that falls further behind forgets everything.
pub const CHANGE_LOG_MAX: usize = 16_384;

/// What changed after a sequence number.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Changes {
    /// The sequence number to ask after next time.
    pub next: u64,
    /// Ids of the entries changed, oldest first (one may be named twice).
    pub entries: Vec<String>,
    /// Whether `entries` is everything that changed; if not, a follower forgets all it holds.
    pub complete: bool,
}

/// The log.
#[derive(Debug, Default)]
pub(super) struct ChangeLog {
    /// The last `CHANGE_LOG_MAX` changed entries and their sequence numbers.
    recent: VecDeque<(u64, String)>,
    /// The sequence number of the next entry noted (the first is 1).
    next: u64,
}

impl ChangeLog {
    pub(super) fn new() -> ChangeLog {
        ChangeLog { recent: VecDeque::new(), next: 1 }
    }

    pub(super) fn note(&mut self, entries: Vec<String>) {
        for id in entries {
            if self.recent.len() == CHANGE_LOG_MAX {
                self.recent.pop_front();
            }
            self.recent.push_back((self.next, id));
            self.next += 1;
        }
    }

    /// What changed after `after` (the `next` of a former answer, less one); `None`: nothing,
    /// only where the log is now.
    pub(super) fn since(&self, after: Option<u64>) -> Changes {
        let Some(after) = after else {
            return Changes { next: self.next, entries: Vec::new(), complete: true };
        };
        let oldest = self.recent.front().map_or(self.next, |(seq, _)| *seq);
        // Numbers past the end come from before a restart; numbers before the oldest kept are
        // gone.
        let complete = after < self.next && after + 1 >= oldest;
        let entries = if complete {
            self.recent.iter().skip((after + 1 - oldest) as usize).map(|(_, id)| id.clone()).collect()
        } else {
            Vec::new()
        };
        Changes { next: self.next, entries, complete }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_gets_what_came_after_it_or_is_told_to_forget_everything() {
        let mut log = ChangeLog::new();
        let start = log.since(None);
        assert_eq!(start, Changes { next: 1, entries: vec![], complete: true });
        log.note(vec!["a".into(), "b".into()]);
        let first = log.since(Some(start.next - 1));
        assert_eq!(first, Changes { next: 3, entries: vec!["a".into(), "b".into()], complete: true });
        log.note(vec!["c".into()]);
        assert_eq!(log.since(Some(first.next - 1)).entries, vec!["c".to_owned()]);
        assert_eq!(log.since(Some(3)).entries, Vec::<String>::new(), "nothing new");
        assert!(!log.since(Some(7)).complete, "a number from before a restart");
        for i in 0..CHANGE_LOG_MAX {
            log.note(vec![format!("{i}")]);
        }
        assert!(!log.since(Some(0)).complete, "fell too far behind");
        let behind = log.since(Some(3));
        assert!(behind.complete, "the oldest kept is the one after");
        assert_eq!(behind.entries.len(), CHANGE_LOG_MAX);
    }
}

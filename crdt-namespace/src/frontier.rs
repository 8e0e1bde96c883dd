//! [`Frontier`]: how much of each site's history a replica has integrated.
//!
//! Every site's changes carry sequence numbers 1, 2, 3, … and a replica integrates a change only
//! after everything it depends on, its author's previous change included. The last sequence
//! number integrated per author therefore names exactly the set of changes a replica holds: a
//! frontier. Sites report theirs to each other; space reclamation compares them to decide when
//! an operation is causally stable (held everywhere) and nothing concurrent with it is missing
//! here (see the site core's collector).

use std::collections::BTreeMap;

use crate::SiteId;

/// The last change of each site a replica has integrated (sites absent: none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier(BTreeMap<SiteId, u64>);

impl Frontier {
    /// An empty frontier: no change of anyone.
    pub fn new() -> Frontier {
        Frontier::default()
    }

    /// The last change of `site` included (0: none).
    pub fn get(&self, site: &SiteId) -> u64 {
        self.0.get(site).copied().unwrap_or(0)
    }

    /// Includes `site`'s changes up to `seq` (a smaller number changes nothing).
    pub fn include(&mut self, site: SiteId, seq: u64) {
        if seq > 0 {
            let known = self.0.entry(site).or_insert(0);
            *known = (*known).max(seq);
        }
    }

    /// Whether every change `other` includes is included here.
    pub fn covers(&self, other: &Frontier) -> bool {
        other.0.iter().all(|(site, seq)| self.get(site) >= *seq)
    }

    /// The sites and their last change, in site order.
    pub fn iter(&self) -> impl Iterator<Item = (&SiteId, u64)> {
        self.0.iter().map(|(site, seq)| (site, *seq))
    }

    /// The number of sites with a change included.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no change is included.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(SiteId, u64)> for Frontier {
    fn from_iter<I: IntoIterator<Item = (SiteId, u64)>>(iter: I) -> Frontier {
        let mut frontier = Frontier::new();
        for (site, seq) in iter {
            frontier.include(site, seq);
        }
        frontier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }

    #[test]
    fn a_frontier_covers_what_it_includes_site_by_site() {
        let a: Frontier = [(site("a"), 3), (site("b"), 1)].into_iter().collect();
        let b: Frontier = [(site("a"), 2)].into_iter().collect();
        assert!(a.covers(&b));
        assert!(!b.covers(&a));
        assert!(a.covers(&Frontier::new()));
        assert!(!Frontier::new().covers(&b));
        let mut c = b.clone();
        c.include(site("a"), 1);
        c.include(site("z"), 0);
        assert_eq!(c, b, "a smaller or zero sequence number changes nothing");
        assert_eq!(a.get(&site("q")), 0);
    }
}

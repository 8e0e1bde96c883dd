//! Changes to the membership (`meridian mesh add|rm|rotate|block|unblock`), as edits of the
//! configuration. The same edit is applied by the command line while no node runs, and by the
//! node while it runs: there the file and the live membership change together (the file first;
//! if it cannot be written, nothing changes).
//!
//! The rules: one entry per site name, one name per key (current or former), never this site's
//! own name or key. A key that is retired (the site is removed, or its key rotated) stays valid
//! for the changes the site made up to the last one this site holds, so that what it wrote
//! before still verifies everywhere; anything later signed with it is refused.

use std::collections::BTreeMap;

use anyhow::bail;
use crdt_namespace::{Keys, SiteId};
use serde::{Deserialize, Serialize};
use transport::proto::Region;

use crate::config::{Config, FormerKey, PeerConfig, check_region};

/// One change to the membership.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Edit {
    /// A site joins, or a member's addresses or region change (its peer id must stay).
    Add(PeerConfig),
    /// A site leaves.
    Remove {
        /// Its name.
        site: String,
    },
    /// A member's key is replaced.
    Rotate {
        /// Its name.
        site: String,
        /// Its new peer id.
        peer_id: String,
    },
    /// A member's link is cut (`true`) or restored, until told otherwise.
    Block {
        /// Its name.
        site: String,
        /// Cut if true.
        blocked: bool,
    },
}

/// What an edit did, for the operator.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    /// The site it concerns.
    pub site: String,
    /// `added`, `updated`, `removed`, `rotated`, `blocked`, `unblocked`, or `unchanged`.
    pub done: String,
    /// The configuration file now holding it.
    pub config: String,
    /// Whether a running node took it at once.
    pub live: bool,
}

impl Edit {
    /// The site whose key the edit retires, if it retires one: its last change held here bounds
    /// what the old key may still sign.
    pub fn retires(&self) -> Option<&str> {
        match self {
            Edit::Remove { site } | Edit::Rotate { site, .. } => Some(site),
            Edit::Add(_) | Edit::Block { .. } => None,
        }
    }

    /// The site it concerns.
    pub fn site(&self) -> &str {
        match self {
            Edit::Add(peer) => &peer.site,
            Edit::Remove { site } | Edit::Rotate { site, .. } | Edit::Block { site, .. } => site,
        }
    }

    /// Applies the edit to `config`, which it leaves checked. `own_peer_id` is this site's;
    /// `until_seq` the retired site's last change held here (`None`: the node is stopped and
    /// fills it in when it starts). Returns what was done (`added`, ...).
    pub fn apply(
        &self,
        config: &mut Config,
        own_peer_id: &str,
        until_seq: Option<u64>,
    ) -> anyhow::Result<&'static str> {
        if self.site() == config.site {
            bail!("{} is this site's own name", config.site);
        }
        let index = config.peers.iter().position(|p| p.site == self.site());
        let done = match (self, index) {
            (Edit::Add(peer), index) => {
                peer.member()?;
                if peer.peer_id == own_peer_id {
                    bail!("peer id {} is this site's own", peer.peer_id);
                }
                key_is_free(config, &peer.peer_id, &peer.site)?;
                match index {
                    Some(i) if config.peers[i].peer_id != peer.peer_id => bail!(
                        "{} is already a member, with peer id {}; to give it a new key: meridian mesh rotate {} --peer-id {}",
                        peer.site,
                        config.peers[i].peer_id,
                        peer.site,
                        peer.peer_id
                    ),
                    Some(i) => {
                        let blocked = config.peers[i].blocked;
                        config.peers[i] = PeerConfig { blocked, ..peer.clone() };
                        "updated"
                    }
                    None => {
                        config.peers.push(PeerConfig { blocked: false, ..peer.clone() });
                        "added"
                    }
                }
            }
            (_, None) => bail!("{} is not a member of this site's mesh", self.site()),
            (Edit::Remove { .. }, Some(i)) => {
                let peer = config.peers.remove(i);
                config.former_keys.push(FormerKey { site: peer.site, peer_id: peer.peer_id, until_seq });
                "removed"
            }
            (Edit::Rotate { site, peer_id }, Some(i)) => {
                let old = config.peers[i].peer_id.clone();
                if *peer_id == old {
                    bail!("{peer_id} is already {site}'s peer id");
                }
                if *peer_id == own_peer_id {
                    bail!("peer id {peer_id} is this site's own");
                }
                PeerConfig { peer_id: peer_id.clone(), ..config.peers[i].clone() }.member()?;
                key_is_free(config, peer_id, site)?;
                // Back to a key it had before: that one is current again.
                config.former_keys.retain(|f| f.peer_id != *peer_id);
                config.peers[i].peer_id = peer_id.clone();
                config.former_keys.push(FormerKey { site: site.clone(), peer_id: old, until_seq });
                "rotated"
            }
            (Edit::Block { blocked, .. }, Some(i)) => {
                let was = std::mem::replace(&mut config.peers[i].blocked, *blocked);
                match (was == *blocked, blocked) {
                    (true, _) => "unchanged",
                    (false, true) => "blocked",
                    (false, false) => "unblocked",
                }
            }
        };
        config.check()?;
        Ok(done)
    }
}

/// Refuses `peer_id` if it is (or was) the key of a site other than `site`.
fn key_is_free(config: &Config, peer_id: &str, site: &str) -> anyhow::Result<()> {
    if let Some(other) = config.peers.iter().find(|p| p.peer_id == peer_id && p.site != site) {
        bail!("peer id {peer_id} is already {}'s", other.site);
    }
    if let Some(former) = config.former_keys.iter().find(|f| f.peer_id == peer_id && f.site != site) {
        bail!("peer id {peer_id} was {}'s key: one key never serves two sites", former.site);
    }
    Ok(())
}

/// The keys each member's changes are checked with, and the members' regions, as the core
/// takes them.
pub fn membership(config: &Config) -> anyhow::Result<(Keys, BTreeMap<SiteId, Region>)> {
    let mut keys = Keys::new();
    let mut regions = BTreeMap::new();
    for peer in &config.peers {
        let site = SiteId::new(&peer.site).map_err(anyhow::Error::msg)?;
        keys.allow(&site, peer.signing_key()?);
        regions.insert(site, check_region(&peer.region)?);
    }
    for former in &config.former_keys {
        let site = SiteId::new(&former.site).map_err(anyhow::Error::msg)?;
        // A bound not yet known (retired while the node was stopped) allows nothing until the
        // node fills it in at its start.
        keys.allow_until(&site, former.signing_key()?, former.until_seq.unwrap_or(0));
    }
    Ok((keys, regions))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer_id() -> String {
        libp2p_identity::Keypair::generate_ed25519().public().to_peer_id().to_string()
    }

    fn peer(site: &str, peer_id: &str) -> PeerConfig {
        PeerConfig {
            site: site.into(),
            region: "eu".into(),
            peer_id: peer_id.into(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4100".into()],
            blocked: false,
        }
    }

    #[test]
    fn membership_edits_keep_one_entry_per_name_and_one_name_per_key() {
        let own = peer_id();
        let (east, east2, north) = (peer_id(), peer_id(), peer_id());
        let mut config = Config::new("west", "eu");
        let edit =
            |config: &mut Config, edit: Edit| edit.apply(config, &own, Some(7)).map_err(|e| format!("{e:#}"));
        assert_eq!(edit(&mut config, Edit::Add(peer("east", &east))), Ok("added"));
        assert_eq!(edit(&mut config, Edit::Add(peer("east", &east))), Ok("updated"));
        let refused = |r: Result<&str, String>, why: &str| {
            let e = r.unwrap_err();
            assert!(e.contains(why), "{e}");
        };
        refused(edit(&mut config, Edit::Add(peer("east", &east2))), "meridian mesh rotate east");
        refused(edit(&mut config, Edit::Add(peer("north", &east))), "already east's");
        refused(edit(&mut config, Edit::Add(peer("north", &own))), "this site's own");
        refused(edit(&mut config, Edit::Add(peer("west", &north))), "this site's own name");
        refused(edit(&mut config, Edit::Remove { site: "south".into() }), "not a member");
        // Block persists in the file until unblocked; updating the addresses keeps it.
        assert_eq!(edit(&mut config, Edit::Block { site: "east".into(), blocked: true }), Ok("blocked"));
        assert_eq!(edit(&mut config, Edit::Add(peer("east", &east))), Ok("updated"));
        assert!(config.peers[0].blocked);
        assert_eq!(edit(&mut config, Edit::Block { site: "east".into(), blocked: false }), Ok("unblocked"));
        // Rotation: the old key becomes former, bounded; it can serve no other site.
        let rotate = Edit::Rotate { site: "east".into(), peer_id: east2.clone() };
        assert_eq!(edit(&mut config, rotate.clone()), Ok("rotated"));
        refused(edit(&mut config, rotate), "already east's peer id");
        assert_eq!(
            config.former_keys,
            [FormerKey { site: "east".into(), peer_id: east.clone(), until_seq: Some(7) }]
        );
        refused(edit(&mut config, Edit::Add(peer("north", &east))), "was east's key");
        // Removal keeps the key as former too; the name may come back, with a fresh key.
        assert_eq!(edit(&mut config, Edit::Remove { site: "east".into() }), Ok("removed"));
        assert!(config.peers.is_empty() && config.former_keys.len() == 2);
        assert_eq!(edit(&mut config, Edit::Add(peer("east", &north))), Ok("added"));
        let (keys, regions) = membership(&config).unwrap();
        assert_eq!(regions.len(), 1);
        assert!(keys.knows("east"));
        // And the file takes it all back as it was.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::config::CONFIG_FILE);
        config.save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap().config, config);
    }
}

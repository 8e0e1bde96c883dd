//! The site's configuration file (`meridian.toml`) and the files next to it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use crdt_namespace::{PublicKey, SiteId};
use serde::{Deserialize, Serialize};

use libp2p_identity::PeerId;
use transport::p2p::Member;
use transport::p2p::multiaddr::{Multiaddr, Protocol};

use site_core::Transfer;
use site_core::content::ChunkerConfig;
use transport::staging::{StagingConfig, StagingCredentials};

/// Name of the configuration file `meridian init` writes.
pub const CONFIG_FILE: &str = "meridian.toml";

/// FastCDC sizes, as written in the configuration.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Chunking {
    /// Smallest chunk, in bytes.
    pub min_bytes: u32,
    /// Average chunk, in bytes.
    pub avg_bytes: u32,
    /// Largest chunk, in bytes.
    pub max_bytes: u32,
}

impl Default for Chunking {
    fn default() -> Chunking {
        let c = ChunkerConfig::default();
        Chunking { min_bytes: c.min_bytes, avg_bytes: c.avg_bytes, max_bytes: c.max_bytes }
    }
}

/// `meridian.toml`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This site's id.
    pub site: String,
    /// The region this site belongs to.
    pub region: String,
    /// Data directory, relative to the configuration file's directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The site's Ed25519 key (libp2p protobuf encoding), relative to the configuration file's
    /// directory.
    #[serde(default = "default_key_file")]
    pub key_file: PathBuf,
    /// Addresses to listen on for other sites (libp2p multiaddrs): QUIC and TCP.
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// Content chunking.
    #[serde(default)]
    pub chunking: Chunking,
    /// How payload crosses regions: `auto` (through the staging bucket when one is configured,
    /// directly when it fails), `direct`, or `staged` (only through the bucket).
    #[serde(default)]
    pub transfer: Transfer,
    /// The staging bucket shared between regions (`[staging]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<Staging>,
    /// A peer's change stamped more than this many seconds ahead of this site's clock is held,
    /// not integrated, until the clock gets there (`mesh ls` shows how many).
    #[serde(default = "default_max_clock_ahead_secs")]
    pub max_clock_ahead_secs: u64,
    /// Bytes of the data directory's file system the chunk store leaves free, so that the
    /// database and the namespace's log can always commit: a put or a fetched copy that would
    /// leave less fails with "no space left on <data_dir>" (0: fill the disk).
    #[serde(default = "default_reserve_bytes")]
    pub reserve_bytes: u64,
    /// A version nothing refers to any more (removed, or replaced by a newer one) is deleted
    /// this many seconds after every member has seen the change that unreferenced it.
    #[serde(default = "default_gc_grace_secs")]
    pub gc_grace_secs: u64,
    /// Bytes of copies of other sites' versions kept here at most; the least recently used
    /// go first. Unset: half the size of the data directory's file system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_max_bytes: Option<u64>,
    /// A group (name or number) whose members may use the control socket, besides the node's
    /// own user and root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_group: Option<String>,
    /// The other sites of the mesh. A connection from a peer not listed here is refused.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Keys sites had before (see [`FormerKey`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub former_keys: Vec<FormerKey>,
    /// The mount (`[mount]`): where `meridian node` mounts the namespace, and how.
    #[serde(default, skip_serializing_if = "MountConfig::is_default")]
    pub mount: MountConfig,
}

/// `[mount]`: the mount's settings, for `meridian node` (which mounts at `path` when it is set
/// and unmounts when it stops) and `meridian mount`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MountConfig {
    /// Where `meridian node` mounts the namespace (an existing empty directory), relative to
    /// the configuration file's directory. Unset: it does not mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Seconds a read through the mount waits for bytes no reachable site or bucket supplies
    /// before it fails with EIO.
    #[serde(default = "default_read_timeout_secs")]
    pub read_timeout_secs: u64,
    /// Let other users than the node's use the mount (their access checked against the modes;
    /// an ordinary user's mount needs `user_allow_other` in /etc/fuse.conf).
    #[serde(default)]
    pub allow_other: bool,
}

impl Default for MountConfig {
    fn default() -> MountConfig {
        MountConfig { path: None, read_timeout_secs: default_read_timeout_secs(), allow_other: false }
    }
}

impl MountConfig {
    fn is_default(&self) -> bool {
        *self == MountConfig::default()
    }
}

fn default_read_timeout_secs() -> u64 {
    30
}

fn default_max_clock_ahead_secs() -> u64 {
    300
}

fn default_reserve_bytes() -> u64 {
    256 << 20
}

fn default_gc_grace_secs() -> u64 {
    600
}

/// The staging bucket (`[staging]`). Its `Debug` hides the secrets.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Staging {
    /// The S3 endpoint URL; omitted for AWS's own endpoint of `region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The region the bucket's server expects in signatures.
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// Prefix of every object key.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`).
    #[serde(default = "default_path_style")]
    pub path_style: bool,
    /// Where the bucket's credentials come from.
    #[serde(default)]
    pub credentials: CredentialSource,
    /// Access key id, with `credentials = "config"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key: Option<String>,
    /// Secret access key, with `credentials = "config"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<String>,
    /// The mesh secret, in hexadecimal (at least 32 digits), the same at every site: staged
    /// objects are sealed with keys derived from it.
    pub secret: String,
    /// Staged objects older than this are deleted by the sweep (their uploader died, or a site
    /// of the region never read them).
    #[serde(default = "default_ttl_hours")]
    pub ttl_hours: u64,
    /// A read of a file held only in another region also asks for up to this many small files
    /// that follow it in its directory (0: none).
    #[serde(default = "default_read_ahead")]
    pub read_ahead: usize,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "<hidden>");
        f.debug_struct("Staging")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("credentials", &self.credentials)
            .field("access_key", &self.access_key)
            .field("secret_key", &hidden(&self.secret_key))
            .field("secret", &"<hidden>")
            .field("ttl_hours", &self.ttl_hours)
            .field("read_ahead", &self.read_ahead)
            .finish()
    }
}

fn default_prefix() -> String {
    "meridian/".to_owned()
}

fn default_path_style() -> bool {
    true
}

/// Where the staging bucket's credentials come from (`staging.credentials`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CredentialSource {
    /// `staging.access_key` and `staging.secret_key`.
    #[default]
    Config,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`; never the SDK's
    /// default chain (instance metadata, profiles).
    Environment,
}

fn default_ttl_hours() -> u64 {
    24
}

fn default_read_ahead() -> usize {
    256
}

impl Staging {
    /// The mesh secret's bytes.
    pub fn secret_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let s = self.secret.trim();
        if s.len() < 32 || !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("staging.secret must be an even number (at least 32) of hexadecimal digits");
        }
        Ok((0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("checked")).collect())
    }

    /// The staging client's configuration; errors name what is wrong.
    pub fn client_config(&self) -> anyhow::Result<StagingConfig> {
        let credentials = match self.credentials {
            CredentialSource::Config => match (&self.access_key, &self.secret_key) {
                (Some(access_key), Some(secret_key)) => StagingCredentials::Static {
                    access_key: access_key.clone(),
                    secret_key: secret_key.clone(),
                },
                _ => {
                    bail!("staging.credentials = \"config\" needs staging.access_key and staging.secret_key")
                }
            },
            CredentialSource::Environment => StagingCredentials::Environment,
        };
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            bail!("staging.endpoint {endpoint:?} must be an http:// or https:// URL");
        }
        if self.bucket.is_empty() {
            bail!("staging.bucket is empty");
        }
        if self.ttl_hours == 0 {
            bail!("staging.ttl_hours is 0: every staged pack would be swept as soon as it is written");
        }
        if self.read_ahead >= transport::proto::STAGE_VERSIONS_MAX {
            bail!(
                "staging.read_ahead is {}; at most {} files are read ahead per ask",
                self.read_ahead,
                transport::proto::STAGE_VERSIONS_MAX - 1
            );
        }
        let mut config = StagingConfig::new(self.endpoint.clone(), &self.region, &self.bucket, credentials);
        config.prefix = self.prefix.clone();
        config.path_style = self.path_style;
        Ok(config)
    }
}

/// Another site of the mesh (`[[peers]]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its site id.
    pub site: String,
    /// Its region.
    pub region: String,
    /// Its libp2p peer id (what `meridian init` printed there).
    pub peer_id: String,
    /// Where to reach it, in order of preference (QUIC first, then TCP).
    #[serde(default)]
    pub addrs: Vec<String>,
    /// Its link is cut (`mesh block`) until `mesh unblock`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blocked: bool,
}

/// A key a site had before (`[[former_keys]]`): replaced by `mesh rotate`, or the key of a site
/// removed by `mesh rm`. It stays valid for what the site wrote before, and nothing after.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FormerKey {
    /// The site.
    pub site: String,
    /// The peer id the key was under.
    pub peer_id: String,
    /// The site's last change this key may sign (its sequence number). Written by the node
    /// when the key is retired; a key retired while the node was stopped gets it at the next
    /// start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_seq: Option<u64>,
}

/// Default port of the site-to-site listeners.
pub const DEFAULT_PORT: u16 = 4100;

/// The default listen addresses for `port`: QUIC and TCP on every interface.
pub fn listen_addrs(host: &str, port: u16) -> Vec<String> {
    vec![format!("/ip4/{host}/udp/{port}/quic-v1"), format!("/ip4/{host}/tcp/{port}")]
}

fn default_listen() -> Vec<String> {
    listen_addrs("0.0.0.0", DEFAULT_PORT)
}

impl PeerConfig {
    /// The peer as the mesh takes it; errors name what is wrong.
    pub fn member(&self) -> anyhow::Result<Member> {
        let site = SiteId::new(&self.site).map_err(|e| anyhow::anyhow!("peer site {:?}: {e}", self.site))?;
        check_region(&self.region)?;
        let peer = self.peer()?;
        let addrs = self
            .addrs
            .iter()
            .map(|a| parse_addr(a).with_context(|| format!("peer {}", self.site)))
            .collect::<anyhow::Result<_>>()?;
        signing_key_of(&self.site, &peer)?;
        Ok(Member { site, peer, addrs })
    }

    /// The key that signs the peer's namespace changes: the Ed25519 key its peer id embeds.
    pub fn signing_key(&self) -> anyhow::Result<PublicKey> {
        signing_key_of(&self.site, &self.peer()?)
    }

    fn peer(&self) -> anyhow::Result<PeerId> {
        self.peer_id
            .parse::<PeerId>()
            .map_err(|e| anyhow::anyhow!("peer {}: peer id {:?}: {e}", self.site, self.peer_id))
    }
}

impl FormerKey {
    /// The key: the Ed25519 key its peer id embeds.
    pub fn signing_key(&self) -> anyhow::Result<PublicKey> {
        let peer = self
            .peer_id
            .parse::<PeerId>()
            .map_err(|e| anyhow::anyhow!("former key of {}: peer id {:?}: {e}", self.site, self.peer_id))?;
        signing_key_of(&self.site, &peer)
    }
}

fn signing_key_of(site: &str, peer: &PeerId) -> anyhow::Result<PublicKey> {
    let bytes = transport::p2p::public_key_of(peer).map_err(|e| anyhow::anyhow!("peer {site}: {e}"))?;
    PublicKey::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("peer {site}: peer id {peer}: {e}"))
}

/// Parses a libp2p multiaddr such as `/ip4/10.0.0.2/udp/4100/quic-v1`.
pub fn parse_addr(addr: &str) -> anyhow::Result<Multiaddr> {
    let parsed: Multiaddr = addr.parse().map_err(|e| anyhow::anyhow!("address {addr:?}: {e}"))?;
    let ok = parsed.iter().any(|p| matches!(p, Protocol::QuicV1 | Protocol::Tcp(_)));
    if !ok {
        bail!("address {addr:?} is neither QUIC (`/udp/PORT/quic-v1`) nor TCP (`/tcp/PORT`)");
    }
    Ok(parsed)
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

fn default_key_file() -> PathBuf {
    PathBuf::from("node.key")
}

/// A configuration with the directory it was read from.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// The configuration file.
    pub path: PathBuf,
    /// Its directory, against which relative paths resolve.
    pub dir: PathBuf,
}

impl Config {
    /// A configuration with defaults for `site` in `region`.
    pub fn new(site: &str, region: &str) -> Config {
        Config {
            site: site.to_owned(),
            region: region.to_owned(),
            data_dir: default_data_dir(),
            key_file: default_key_file(),
            listen: default_listen(),
            chunking: Chunking::default(),
            transfer: Transfer::default(),
            staging: None,
            max_clock_ahead_secs: default_max_clock_ahead_secs(),
            reserve_bytes: default_reserve_bytes(),
            gc_grace_secs: default_gc_grace_secs(),
            cache_max_bytes: None,
            control_group: None,
            peers: Vec::new(),
            former_keys: Vec::new(),
            mount: MountConfig::default(),
        }
    }

    /// Checks what serde cannot.
    pub fn check(&self) -> anyhow::Result<()> {
        SiteId::new(&self.site).map_err(anyhow::Error::msg)?;
        check_region(&self.region)?;
        self.chunker().check().map_err(anyhow::Error::msg)?;
        if let Some(group) = &self.control_group {
            group_id(group)?;
        }
        if self.mount.read_timeout_secs == 0 {
            bail!("mount.read_timeout_secs is 0: every read of a file not held here would fail at once");
        }
        if self.max_clock_ahead_secs == 0 {
            bail!("max_clock_ahead_secs is 0: every change from a clock a millisecond ahead would be held");
        }
        for addr in &self.listen {
            parse_addr(addr).context("listen")?;
        }
        match &self.staging {
            Some(staging) => {
                staging.secret_bytes()?;
                staging.client_config()?;
            }
            None if self.transfer == Transfer::Staged => {
                bail!("transfer = \"staged\" needs a [staging] section: the bucket between regions")
            }
            None => {}
        }
        let mut names = std::collections::BTreeSet::new();
        let mut keys = std::collections::BTreeMap::new();
        for peer in &self.peers {
            peer.member()?;
            if peer.site == self.site {
                bail!("peer {} has this site's own name", peer.site);
            }
            if !names.insert(&peer.site) {
                bail!("peer {} is listed twice", peer.site);
            }
            if let Some(other) = keys.insert(&peer.peer_id, &peer.site) {
                bail!("peer id {} is listed for two sites, {other} and {}", peer.peer_id, peer.site);
            }
        }
        for former in &self.former_keys {
            SiteId::new(&former.site).map_err(|e| anyhow::anyhow!("former key of {:?}: {e}", former.site))?;
            former.signing_key()?;
            match keys.get(&former.peer_id) {
                Some(site) if **site == former.site => {
                    bail!(
                        "peer id {} of {} is listed as its current and its former key",
                        former.peer_id,
                        site
                    )
                }
                Some(site) => {
                    bail!(
                        "peer id {} is listed for two sites, {site} and {} (a former key)",
                        former.peer_id,
                        former.site
                    )
                }
                None => {}
            }
        }
        for (i, a) in self.former_keys.iter().enumerate() {
            if let Some(b) = self.former_keys[i + 1..].iter().find(|b| b.peer_id == a.peer_id) {
                bail!("former key {} is listed twice ({} and {})", a.peer_id, a.site, b.site);
            }
        }
        Ok(())
    }

    /// The site id.
    pub fn site_id(&self) -> SiteId {
        SiteId::new(&self.site).expect("checked when loaded")
    }

    /// The mesh members, as the transport takes them.
    pub fn members(&self) -> Vec<Member> {
        self.peers.iter().map(|p| p.member().expect("checked when loaded")).collect()
    }

    /// The listen addresses.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen.iter().map(|a| parse_addr(a).expect("checked when loaded")).collect()
    }

    /// Writes the configuration to `path`, mode 0600 (it may hold secrets), through a temporary
    /// file that is synced and renamed over it, the directory synced after: a crash leaves the
    /// old or the new file, never half of one.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = toml::to_string(self).context("encoding the configuration")?;
        write_private_atomically(path, text.as_bytes())
    }

    /// The chunker configuration.
    pub fn chunker(&self) -> ChunkerConfig {
        let c = self.chunking;
        ChunkerConfig { min_bytes: c.min_bytes, avg_bytes: c.avg_bytes, max_bytes: c.max_bytes }
    }

    /// Reads and checks the configuration at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Loaded> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        // The parser's own message quotes the offending line, which may hold a secret: only
        // the line number and what is wrong are shown.
        let config: Config = toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|span| text[..span.start].matches('\n').count() + 1);
            let at = line.map(|l| format!(", line {l}")).unwrap_or_default();
            anyhow::anyhow!("parsing config {}{at}: {}", path.display(), e.message().trim_end())
        })?;
        config.check().with_context(|| format!("checking config {}", path.display()))?;
        let path = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
        Ok(Loaded { config, path, dir })
    }
}

/// Writes `bytes` to `path`, mode 0600, atomically: a temporary file beside it, synced, renamed
/// over it, and the directory synced.
pub fn write_private_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let written = (|| {
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        // A temporary file left by a crash may have had other permissions.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

/// The group id of `group` (a name in `/etc/group`, or a number).
pub fn group_id(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
    groups
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next() == Some(group)).then(|| fields.nth(1).and_then(|gid| gid.parse().ok())).flatten()
        })
        .ok_or_else(|| anyhow::anyhow!("control_group {group:?} is not a group of this machine"))
}

/// Checks a region name: like a site id.
pub fn check_region(region: &str) -> anyhow::Result<transport::proto::Region> {
    transport::proto::Region::new(region).map_err(|e| anyhow::anyhow!(e))
}

impl Loaded {
    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join(&self.config.data_dir)
    }

    /// The key file.
    pub fn key_file(&self) -> PathBuf {
        self.dir.join(&self.config.key_file)
    }

    /// Where `meridian node` mounts the namespace, if it does.
    pub fn mount_path(&self) -> Option<PathBuf> {
        self.config.mount.path.as_ref().map(|p| self.dir.join(p))
    }

    /// The control socket the daemon listens on, next to the configuration file.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_round_trip_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(&path, toml::to_string(&Config::new("west", "eu")).unwrap()).unwrap();
        let loaded = Config::load(&path).unwrap();
        assert_eq!(loaded.config, Config::new("west", "eu"));
        assert_eq!(loaded.data_dir(), dir.path().join("data"));
        std::fs::write(&path, "site = \"we st\"\nregion = \"eu\"\n").unwrap();
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("may hold only ASCII letters"), "{err}");
        std::fs::write(&path, "site = \"west\"\nregion = \"eu\"\ncolour = 1\n").unwrap();
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("unknown field `colour`"), "{err}");
        std::fs::write(
            &path,
            "site = \"west\"\nregion = \"eu\"\n[chunking]\nmin_bytes = 10\navg_bytes = 20\nmax_bytes = 30\n",
        )
        .unwrap();
        assert!(Config::load(&path).is_err());
    }

    #[test]
    fn peers_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        let peer_id = libp2p_identity::Keypair::generate_ed25519().public().to_peer_id().to_string();
        let mut config = Config::new("west", "eu");
        config.peers.push(PeerConfig {
            site: "east".into(),
            region: "eu".into(),
            peer_id: peer_id.clone(),
            addrs: vec!["/ip4/10.0.0.1/udp/4100/quic-v1".into(), "/ip4/10.0.0.1/tcp/4100".into()],
            blocked: false,
        });
        config.save(&path).unwrap();
        let loaded = Config::load(&path).unwrap();
        assert_eq!(loaded.config, config);
        assert_eq!(loaded.config.members()[0].addrs.len(), 2);
        let refused = |edit: &dyn Fn(&mut Config), why: &str| {
            let mut bad = config.clone();
            edit(&mut bad);
            bad.save(&path).unwrap();
            let err = format!("{:#}", Config::load(&path).unwrap_err());
            assert!(err.contains(why), "{err}");
        };
        refused(&|c| c.peers[0].peer_id = "12D3nope".into(), "peer id");
        refused(&|c| c.peers[0].addrs = vec!["/ip4/10.0.0.1/udp/4100".into()], "neither QUIC");
        refused(&|c| c.peers[0].addrs = vec!["not an address".into()], "address");
        refused(&|c| c.peers.push(c.peers[0].clone()), "listed twice");
        refused(&|c| c.peers[0].site = "west".into(), "own name");
        refused(&|c| c.listen = vec!["/ip4/0.0.0.0".into()], "listen");
    }

    #[test]
    fn staging_sections_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        let text = "site = \"west\"\nregion = \"eu\"\ntransfer = \"staged\"\n[staging]\nendpoint = \"http://127.0.0.1:9000\"\nregion = \"garage\"\nbucket = \"meridian\"\naccess_key = \"AK\"\nsecret_key = \"SK\"\nsecret = \"00112233445566778899aabbccddeeff\"\n";
        std::fs::write(&path, text).unwrap();
        let loaded = Config::load(&path).unwrap().config;
        assert_eq!(loaded.transfer, Transfer::Staged);
        let staging = loaded.staging.clone().unwrap();
        assert_eq!(staging.secret_bytes().unwrap().len(), 16);
        let client = staging.client_config().unwrap();
        assert_eq!(
            (client.bucket.as_str(), client.prefix.as_str(), client.path_style),
            ("meridian", "meridian/", true)
        );
        loaded.save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap().config, loaded);
        let refused = |edit: &dyn Fn(&mut Staging), why: &str| {
            let mut bad = loaded.clone();
            edit(bad.staging.as_mut().unwrap());
            bad.save(&path).unwrap();
            let err = format!("{:#}", Config::load(&path).unwrap_err());
            assert!(err.contains(why), "{err}");
        };
        refused(&|s| s.secret = "abc".into(), "hexadecimal");
        refused(&|s| s.secret_key = None, "needs staging.access_key");
        refused(&|s| s.read_ahead = 5_000, "staging.read_ahead");
        refused(&|s| s.endpoint = Some("127.0.0.1:9000".into()), "http://");
        refused(&|s| s.ttl_hours = 0, "staging.ttl_hours is 0");
        // Secrets never show: not in `Debug`, not in a parse error quoting their line.
        let debug = format!("{loaded:?}");
        assert!(debug.contains("AK") && !debug.contains("\"SK\"") && !debug.contains("00112233"), "{debug}");
        std::fs::write(&path, text.replace("secret_key = \"SK\"", "secret_key = \"SK-unterminated")).unwrap();
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("line 9") && !err.contains("SK-unterminated"), "{err}");
        let mut unstaged = loaded.clone();
        unstaged.staging = None;
        unstaged.save(&path).unwrap();
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("needs a [staging] section"), "{err}");
        std::fs::write(&path, "site = \"west\"\nregion = \"eu\"\ntransfer = \"sometimes\"\n").unwrap();
        assert!(Config::load(&path).is_err());
        let imds = text.replace("[staging]\n", "[staging]\ncredentials = \"imds\"\n");
        std::fs::write(&path, imds).unwrap();
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("unknown variant `imds`"), "{err}");
    }
}

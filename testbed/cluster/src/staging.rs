//! A staging bucket for the demo, the testbed and tests.

use anyhow::Context;
use node::config::{CredentialSource, Staging as StagingSection};
use transport::s3_local::LocalS3;
use transport::staging::Staging;

use crate::Cluster;

/// A staging bucket for the demo, the testbed and tests: a real S3 server in this process on
/// loopback, run by a runtime of its own, with a bucket and a fresh mesh secret.
pub struct StagingStore {
    server: Option<LocalS3>,
    section: StagingSection,
    /// Runs the local server, if there is one; dropped after it.
    _runtime: Option<tokio::runtime::Runtime>,
}

/// A `[staging]` section with static credentials and a fresh mesh secret.
fn fresh_section(
    endpoint: String,
    region: String,
    bucket: String,
    prefix: &str,
    keys: (String, String),
) -> StagingSection {
    let seed = format!("{:?} {}", std::time::SystemTime::now(), std::process::id());
    let secret = blake3::hash(seed.as_bytes()).to_hex().to_string();
    StagingSection {
        endpoint: Some(endpoint),
        region,
        bucket,
        prefix: format!("{prefix}{}/", &secret[..16]),
        path_style: true,
        credentials: CredentialSource::Config,
        access_key: Some(keys.0),
        secret_key: Some(keys.1),
        secret,
        ttl_hours: 24,
        read_ahead: 256,
    }
}

impl StagingStore {
    /// Starts a server keeping its data in `dir`, and makes the bucket.
    pub fn start(dir: &std::path::Path) -> anyhow::Result<StagingStore> {
        let runtime = tokio::runtime::Runtime::new().context("starting the staging store's runtime")?;
        let (access_key, secret_key) = ("meridian-demo", "meridian-demo-secret-key");
        let server = runtime.block_on(LocalS3::start(dir, access_key, secret_key))?;
        let keys = (access_key.to_owned(), secret_key.to_owned());
        let section =
            fresh_section(server.endpoint(), "us-east-1".into(), "meridian-demo".into(), "meridian-", keys);
        let client = Staging::new(&section.client_config()?, &section.secret_bytes()?)?;
        runtime.block_on(client.ensure_bucket())?;
        Ok(StagingStore { server: Some(server), section, _runtime: Some(runtime) })
    }

    /// The bucket named by `MERIDIAN_S3_ENDPOINT`, `MERIDIAN_S3_BUCKET`,
    /// `MERIDIAN_S3_ACCESS_KEY`, `MERIDIAN_S3_SECRET_KEY` (and `MERIDIAN_S3_REGION`, default
    /// `us-east-1`) if they are set — any S3 endpoint, used under a prefix of its own — else a
    /// local server as [`StagingStore::start`] makes it.
    pub fn any(dir: &std::path::Path) -> anyhow::Result<StagingStore> {
        let Ok(endpoint) = std::env::var("MERIDIAN_S3_ENDPOINT") else { return StagingStore::start(dir) };
        let var = |name: &str| {
            std::env::var(name).with_context(|| format!("MERIDIAN_S3_ENDPOINT is set, {name} is not"))
        };
        let region = std::env::var("MERIDIAN_S3_REGION").unwrap_or_else(|_| "us-east-1".into());
        let keys = (var("MERIDIAN_S3_ACCESS_KEY")?, var("MERIDIAN_S3_SECRET_KEY")?);
        let section = fresh_section(endpoint, region, var("MERIDIAN_S3_BUCKET")?, "meridian-test-", keys);
        Ok(StagingStore { server: None, section, _runtime: None })
    }

    /// The `[staging]` section that points a site at it.
    pub fn section(&self) -> &StagingSection {
        &self.section
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        self.section.endpoint.clone().unwrap_or_default()
    }

    /// The server itself (request counts, injected `SlowDown`s), while it runs.
    pub fn server(&self) -> Option<&LocalS3> {
        self.server.as_ref()
    }

    /// Stops the server: the bucket becomes unreachable.
    pub fn stop(&mut self) {
        self.server = None;
    }
}

/// Points every site of `cluster` at `store`.
pub fn use_staging(cluster: &Cluster, store: &StagingStore) -> anyhow::Result<()> {
    for i in 0..cluster.sites().len() {
        cluster.configure(i, |c| c.staging = Some(store.section().clone()))?;
    }
    Ok(())
}

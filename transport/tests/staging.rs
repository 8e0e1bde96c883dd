//! Staging against a real S3 server: the in-process s3s server by default, or any endpoint given
//! by `MERIDIAN_S3_ENDPOINT`, `MERIDIAN_S3_BUCKET`, `MERIDIAN_S3_ACCESS_KEY`,
//! `MERIDIAN_S3_SECRET_KEY` (and optionally `MERIDIAN_S3_REGION`, default `us-east-1`). The tests
//! that tamper with stored objects or make the server answer `503 SlowDown` need the local
//! server's files and switches, and always run against it.

use std::path::PathBuf;
use std::time::Duration;

use transport::s3_local::LocalS3;
use transport::staging::{ChunkSpec, Staging, StagingConfig, StagingCredentials, StagingError};

const SECRET: &[u8] = b"the mesh secret of the staging tests";

/// A bucket to test against, and the local server behind it if there is one.
struct Bucket {
    config: StagingConfig,
    local: Option<(LocalS3, tempfile::TempDir)>,
}

impl Bucket {
    /// The bucket named by the environment, or a fresh local server.
    async fn any() -> Bucket {
        match std::env::var("MERIDIAN_S3_ENDPOINT") {
            Ok(endpoint) => {
                let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} must be set"));
                let credentials = StagingCredentials::Static {
                    access_key: var("MERIDIAN_S3_ACCESS_KEY"),
                    secret_key: var("MERIDIAN_S3_SECRET_KEY"),
                };
                let region = std::env::var("MERIDIAN_S3_REGION").unwrap_or_else(|_| "us-east-1".into());
                let mut config =
                    StagingConfig::new(Some(endpoint), &region, &var("MERIDIAN_S3_BUCKET"), credentials);
                // Tests sharing a bucket stay out of each other's way.
                config.prefix = format!("meridian-test-{}/", unique());
                Bucket { config, local: None }
            }
            Err(_) => Bucket::local().await,
        }
    }

    /// A fresh local server with an empty bucket.
    async fn local() -> Bucket {
        let dir = tempfile::tempdir().unwrap();
        let server = LocalS3::start(dir.path(), "test-access", "test-secret-key").await.unwrap();
        let credentials = StagingCredentials::Static {
            access_key: "test-access".into(),
            secret_key: "test-secret-key".into(),
        };
        let config = StagingConfig::new(Some(server.endpoint()), "us-east-1", "staging", credentials);
        Bucket { config, local: Some((server, dir)) }
    }

    async fn staging(&self) -> Staging {
        let staging = Staging::new(&self.config, SECRET).unwrap();
        staging.ensure_bucket().await.unwrap();
        staging
    }

    fn server(&self) -> &LocalS3 {
        &self.local.as_ref().expect("a local server").0
    }

    /// Where the local server keeps the object `key`.
    fn file(&self, key: &str) -> PathBuf {
        self.local.as_ref().expect("a local server").1.path().join(&self.config.bucket).join(key)
    }
}

fn unique() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{}-{nanos}", std::process::id())
}

/// Incompressible bytes, different for every seed.
fn sample(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut out);
    out
}

/// Chunks of the given lengths, with their hashes.
fn chunks(seed: u64, lens: &[usize]) -> (Vec<Vec<u8>>, Vec<ChunkSpec>) {
    let data: Vec<Vec<u8>> =
        lens.iter().enumerate().map(|(i, len)| sample(seed * 1000 + i as u64, *len)).collect();
    let refs = data.iter().map(|d| (*blake3::hash(d).as_bytes(), d.len() as u32)).collect();
    (data, refs)
}

async fn stage(staging: &Staging, name: &[u8], data: &[Vec<u8>], refs: &[ChunkSpec]) {
    staging.upload(name, refs, &mut |i| Ok(data[i].clone())).await.unwrap();
}

async fn read_all(staging: &Staging, name: &[u8]) -> Result<Vec<Vec<u8>>, StagingError> {
    let pack = staging.open(name).await?.expect("the pack is staged");
    let mut out = Vec::new();
    for i in 0..pack.entries.len() {
        out.push(staging.read_chunk(&pack, i).await?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_pack_round_trips_and_its_name_and_bytes_stay_hidden() {
    let bucket = Bucket::any().await;
    let staging = bucket.staging().await;
    let (data, refs) = chunks(1, &[1, 4096, 300_000, 0]);
    stage(&staging, b"version-1 to region eu", &data, &refs).await;
    let pack = staging.open(b"version-1 to region eu").await.unwrap().unwrap();
    assert_eq!(pack.entries.iter().map(|e| (e.hash, e.len)).collect::<Vec<_>>(), refs);
    assert_eq!(read_all(&staging, b"version-1 to region eu").await.unwrap(), data);
    assert!(!pack.key.contains("version"), "{}", pack.key);
    assert!(staging.open(b"version-2 to region eu").await.unwrap().is_none());
    if bucket.local.is_some() {
        let stored = std::fs::read(bucket.file(&pack.key)).unwrap();
        assert_eq!(stored.len() as u64, pack.size);
        let plain = &data[2][1000..1064];
        assert!(!stored.windows(plain.len()).any(|w| w == plain), "plaintext is visible in the bucket");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_pack_goes_up_in_parts_and_reads_back() {
    let bucket = Bucket::any().await;
    let mut config = bucket.config.clone();
    config.part_bytes = 5 << 20;
    let staging = Staging::new(&config, SECRET).unwrap();
    staging.ensure_bucket().await.unwrap();
    let (data, refs) = chunks(2, &[1 << 20; 13]);
    let requests_before = bucket.local.as_ref().map(|_| bucket.server().requests());
    stage(&staging, b"big", &data, &refs).await;
    if let Some(before) = requests_before {
        // Create, three parts, complete: a multipart upload, not one request.
        assert!(bucket.server().requests() - before >= 5);
    }
    let pack = staging.open(b"big").await.unwrap().unwrap();
    assert!(pack.size > 13 << 20);
    assert_eq!(staging.read_chunk(&pack, 12).await.unwrap(), data[12]);
    assert_eq!(staging.read_chunk(&pack, 6).await.unwrap(), data[6]);
    assert!(matches!(staging.read_chunk(&pack, 13).await, Err(StagingError::Config(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packs_are_deleted_and_the_sweep_removes_only_old_ones() {
    let bucket = Bucket::any().await;
    let staging = bucket.staging().await;
    let (data, refs) = chunks(3, &[1000, 2000]);
    for name in [b"one".as_slice(), b"two", b"three"] {
        stage(&staging, name, &data, &refs).await;
    }
    staging.delete(b"one").await.unwrap();
    assert!(staging.open(b"one").await.unwrap().is_none());
    staging.delete(b"one").await.unwrap();
    assert_eq!(staging.sweep(Duration::from_secs(3600)).await.unwrap(), 0);
    assert!(staging.open(b"two").await.unwrap().is_some());
    // Modification times have a resolution of a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(staging.sweep(Duration::ZERO).await.unwrap(), 2);
    assert!(staging.open(b"two").await.unwrap().is_none());
    assert!(staging.open(b"three").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_the_chunk_are_refused_before_anything_is_uploaded() {
    let bucket = Bucket::any().await;
    let staging = bucket.staging().await;
    let (_, refs) = chunks(4, &[100]);
    let refused = staging.upload(b"bad", &refs, &mut |_| Ok(vec![0; 100])).await;
    assert!(matches!(refused, Err(StagingError::Chunk { .. })), "{refused:?}");
    let failed = staging.upload(b"bad", &refs, &mut |_| Err("disk on fire".into())).await;
    assert!(matches!(&failed, Err(StagingError::Chunk { reason, .. }) if reason == "disk on fire"));
    assert!(staging.open(b"bad").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_truncated_and_swapped_objects_are_detected() {
    let bucket = Bucket::local().await;
    let staging = bucket.staging().await;
    let (data, refs) = chunks(5, &[5000, 6000, 7000]);
    for name in [b"a".as_slice(), b"b", b"c", b"d"] {
        stage(&staging, name, &data, &refs).await;
    }
    // A flipped bit in a chunk: that chunk fails, the others read.
    let a = staging.open(b"a").await.unwrap().unwrap();
    let file = bucket.file(&a.key);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 100;
    bytes[last] ^= 0x10;
    std::fs::write(&file, &bytes).unwrap();
    // (An opened pack keeps its first MiB: open again to see the change.)
    let a = staging.open(b"a").await.unwrap().unwrap();
    assert!(matches!(staging.read_chunk(&a, 2).await, Err(StagingError::Tampered { .. })));
    assert_eq!(staging.read_chunk(&a, 0).await.unwrap(), data[0]);
    // A flipped bit in the header: the pack does not open.
    let b = staging.open(b"b").await.unwrap().unwrap();
    let file = bucket.file(&b.key);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    assert!(matches!(staging.open(b"b").await, Err(StagingError::Tampered { .. })));
    // Cut short: the last chunk is missing.
    let c = staging.open(b"c").await.unwrap().unwrap();
    let file = bucket.file(&c.key);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    let c = staging.open(b"c").await.unwrap().unwrap();
    assert!(matches!(staging.read_chunk(&c, 2).await, Err(StagingError::Truncated { .. })));
    std::fs::write(&file, &bytes[..30]).unwrap();
    assert!(matches!(staging.open(b"c").await, Err(StagingError::Truncated { .. })));
    // Another pack's object under this name: it was sealed for another place.
    let d = staging.open(b"d").await.unwrap().unwrap();
    std::fs::copy(bucket.file(&a.key), bucket.file(&d.key)).unwrap();
    assert!(matches!(staging.open(b"d").await, Err(StagingError::Tampered { .. })));
    // Garbage.
    std::fs::write(bucket.file(&d.key), b"not a pack at all").unwrap();
    assert!(matches!(staging.open(b"d").await, Err(StagingError::Tampered { .. })));
    // Another mesh's key opens nothing.
    let stranger = Staging::new(&bucket.config, b"some other mesh's secret").unwrap();
    stage(&staging, b"e", &data, &refs).await;
    let key = staging.key_of(b"e");
    assert_ne!(stranger.key_of(b"e"), key);
    std::fs::copy(bucket.file(&key), bucket.file(&stranger.key_of(b"e"))).unwrap();
    assert!(matches!(stranger.open(b"e").await, Err(StagingError::Tampered { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_down_answers_are_retried_and_a_server_that_keeps_refusing_is_an_error() {
    let bucket = Bucket::local().await;
    let staging = bucket.staging().await;
    let (data, refs) = chunks(6, &[10_000]);
    bucket.server().slow_down_next(2);
    let before = bucket.server().requests();
    stage(&staging, b"retried", &data, &refs).await;
    assert!(bucket.server().requests() - before >= 3, "two refusals, then the upload");
    assert_eq!(read_all(&staging, b"retried").await.unwrap(), data);

    let mut config = bucket.config.clone();
    config.max_attempts = 2;
    let impatient = Staging::new(&config, SECRET).unwrap();
    bucket.server().slow_down_next(1_000);
    let refused = impatient.open(b"retried").await;
    bucket.server().slow_down_next(0);
    match refused {
        Err(StagingError::S3 { reason, .. }) => assert!(reason.contains("SlowDown"), "{reason}"),
        other => panic!("expected the server's refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bucket_and_a_bad_configuration_are_clear_errors() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let credentials = StagingCredentials::Static { access_key: "a".into(), secret_key: "b".into() };
    let mut config =
        StagingConfig::new(Some(format!("http://127.0.0.1:{port}")), "us-east-1", "x", credentials);
    config.max_attempts = 2;
    let staging = Staging::new(&config, SECRET).unwrap();
    let failed = staging.open(b"anything").await;
    assert!(matches!(failed, Err(StagingError::S3 { operation: "GetObject", .. })), "{failed:?}");

    assert!(matches!(Staging::new(&config, b"short"), Err(StagingError::Config(_))));
    let mut no_bucket = config.clone();
    no_bucket.bucket.clear();
    assert!(matches!(Staging::new(&no_bucket, SECRET), Err(StagingError::Config(_))));
    let mut tiny_parts = config.clone();
    tiny_parts.part_bytes = 1 << 20;
    assert!(matches!(Staging::new(&tiny_parts, SECRET), Err(StagingError::Config(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_packs_are_read_whole_when_opened_and_large_ones_chunk_by_chunk() {
    let bucket = Bucket::local().await;
    let staging = bucket.staging().await;
    // A batch of small files: the open reads every chunk with the header.
    let lens: Vec<usize> = (0..200).map(|i| 4096 + i).collect();
    let (data, refs) = chunks(7, &lens);
    stage(&staging, b"small files", &data, &refs).await;
    let before = bucket.server().requests();
    assert_eq!(read_all(&staging, b"small files").await.unwrap(), data);
    assert_eq!(bucket.server().requests() - before, 1);
    // Past the first MiB but small: the open reads the rest in a second request.
    let (data, refs) = chunks(8, &[700_000, 700_000, 700_000]);
    stage(&staging, b"medium", &data, &refs).await;
    let before = bucket.server().requests();
    assert_eq!(read_all(&staging, b"medium").await.unwrap(), data);
    assert_eq!(bucket.server().requests() - before, 2);
    // Larger than a pack read whole: a ranged GET per chunk beyond the first MiB.
    let (data, refs) = chunks(9, &[3_500_000, 3_500_000, 3_500_000]);
    stage(&staging, b"large", &data, &refs).await;
    let before = bucket.server().requests();
    assert_eq!(read_all(&staging, b"large").await.unwrap(), data);
    assert_eq!(bucket.server().requests() - before, 4, "the open, then each chunk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_range_is_an_error_and_its_answer_is_not_taken_in() {
    let bucket = Bucket::local().await;
    let staging = bucket.staging().await;
    // A pack too large to be read whole when opened: the open asks for its first MiB.
    let (data, refs) = chunks(9, &[4 << 20; 4]);
    stage(&staging, b"whole", &data, &refs).await;
    assert_eq!(read_all(&staging, b"whole").await.unwrap(), data);
    bucket.server().ignore_range(true);
    let err = staging.open(b"whole").await.unwrap_err().to_string();
    assert!(err.contains("does it ignore Range?") && err.contains("asked for 1048576 bytes"), "{err}");
    bucket.server().ignore_range(false);
    assert_eq!(read_all(&staging, b"whole").await.unwrap(), data);
}

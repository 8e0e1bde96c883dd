//! Two regions joined by a real S3 server (s3s on loopback, in this process, or any endpoint the
//! `MERIDIAN_S3_*` variables name): payload crosses the regions once, through the bucket,
//! sealed; within a region sites talk directly; without the bucket (a local server the test
//! stops), `auto` reads directly and `staged` fails clearly.

use std::time::Duration;

use cluster::Cluster;
use cluster::{StagingStore, use_staging, wait_until};
use site_core::Transfer;
use site_core::sample::pseudo_random;

const TIMEOUT: Duration = Duration::from_secs(60);

/// west in eu; east and north in us; all with the bucket and `transfer`.
fn regions(bucket: &StagingStore, transfer: Transfer) -> Cluster {
    let program = testbed::program_at(env!("CARGO_BIN_EXE_testbed"));
    let mut cluster =
        Cluster::create(program, None, &[("west", "eu"), ("east", "us"), ("north", "us")]).unwrap();
    use_staging(&cluster, bucket).unwrap();
    for i in 0..3 {
        cluster.configure(i, |c| c.transfer = transfer).unwrap();
    }
    cluster.start_all().unwrap();
    cluster
}

/// The S3 endpoint the `MERIDIAN_S3_*` variables name, or a real S3 server in this process
/// with its data in a temporary directory.
fn bucket() -> (StagingStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (StagingStore::any(dir.path()).unwrap(), dir)
}

/// A real S3 server in this process, which the test can stop.
fn local_bucket() -> (StagingStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (StagingStore::start(dir.path()).unwrap(), dir)
}

fn write(cluster: &Cluster, at: usize, path: &str, data: &[u8]) {
    cluster.site(at).client.put(path, data).unwrap();
    for i in 0..3 {
        wait_until(TIMEOUT, || cluster.site(i).client.exists(path)).unwrap();
    }
}

#[test]
fn payload_crosses_regions_once_through_the_bucket_and_within_a_region_directly() {
    let (bucket, _dir) = bucket();
    let cluster = regions(&bucket, Transfer::Auto);
    let (west, east, north) = (&cluster.site(0).client, &cluster.site(1).client, &cluster.site(2).client);
    let data = pseudo_random(31, 24 << 20);
    write(&cluster, 0, "/plate.exr", &data);

    assert!(east.read("/plate.exr", None).unwrap() == data, "east reads what west wrote");
    assert_eq!(east.status().unwrap().core.bytes_from_staging, data.len() as u64);
    assert_eq!(east.status().unwrap().core.bytes_fetched, 0, "nothing came from west directly");
    let uploaded = west.status().unwrap().core.bytes_to_staging;
    assert!(uploaded >= data.len() as u64 && uploaded < data.len() as u64 + (1 << 20), "{uploaded}");

    // north reads it too: from east, its own region's holder, once east's answer to "who holds"
    // is in — until then from the pack, which stays while a site of us may still need it. Never
    // from west directly, and no second upload.
    assert!(north.read("/plate.exr", None).unwrap() == data);
    let (direct, staged) =
        (north.status().unwrap().core.bytes_fetched, north.status().unwrap().core.bytes_from_staging);
    assert_eq!(direct + staged, data.len() as u64, "{direct} direct + {staged} from the bucket");
    assert_eq!(west.status().unwrap().core.bytes_to_staging, uploaded, "one upload for the region pair");
}

#[test]
fn without_the_bucket_auto_reads_directly_and_staged_fails_clearly() {
    let (mut bucket, _dir) = local_bucket();
    let auto = regions(&bucket, Transfer::Auto);
    let staged = regions(&bucket, Transfer::Staged);
    let data = pseudo_random(32, 3 << 20);
    write(&auto, 0, "/f", &data);
    write(&staged, 0, "/f", &data);
    bucket.stop();

    let east = &auto.site(1).client;
    assert!(east.read("/f", None).unwrap() == data);
    assert_eq!(east.status().unwrap().core.bytes_fetched, data.len() as u64, "read from west directly");

    let east = &staged.site(1).client;
    let error = east.read("/f", None).unwrap_err().to_string();
    assert!(error.contains("through the staging bucket failed"), "{error}");
    assert_eq!(east.status().unwrap().core.bytes_fetched, 0);
    assert!(staged.site(1).is_running(), "a failed read is not a failed site");
}

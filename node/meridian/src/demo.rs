//! `meridian demo`: a mesh of real sites on loopback, and what meridian does, measured.
//!
//! It starts `--sites N` daemons (children of this process) in a temporary directory, joins them
//! with `meridian mesh add`, and narrates five scenes with the numbers it measures: a folder
//! tree published at one site appears at the others; a large file is read at another site while
//! it arrives; a 1 MiB edit moves only the changed chunks; a collision made at two sites during
//! a partition resolves identically everywhere; a site of another region reads the file through
//! the staging bucket — a real S3 server (s3s) this process runs on loopback. The first two
//! sites are in region `eu`, the others in `us`. With `--dir D --keep-running` the sites stay
//! up for `meridian --config D/<site>/meridian.toml ...` (the staging store stops with the demo;
//! reads across regions then go direct).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use cluster::{Cluster, Program, StagingStore, use_staging, wait_until};
use node::client::Client;
use site_core::sample::pseudo_random;

/// Site names of the demo, in order; more sites are `site-N`.
const SITE_NAMES: [&str; 5] = ["east", "west", "north", "south", "central"];
/// How long the demo waits for something to become visible before calling it a failure.
const VISIBLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `meridian demo`.
#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// How many sites to start (2 to 16).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=16))]
    pub sites: u8,
    /// Where to create the sites [default: a temporary directory, removed at the end]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Leave the sites running at the end (with --dir, to use them with `meridian --config`).
    #[arg(long)]
    pub keep_running: bool,
    /// Size of the large file, in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(4..=65536))]
    pub size_mib: u32,
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn bytes_fetched(client: &Client) -> anyhow::Result<u64> {
    Ok(client.status()?.core.bytes_fetched)
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let names: Vec<String> = (0..args.sites as usize)
        .map(|i| SITE_NAMES.get(i).map(|s| s.to_string()).unwrap_or_else(|| format!("site-{}", i + 1)))
        .collect();
    let specs: Vec<(&str, &str)> =
        names.iter().enumerate().map(|(i, n)| (n.as_str(), if i < 2 { "eu" } else { "us" })).collect();
    let mut cluster = Cluster::create(Program::this_meridian()?, args.dir.as_deref(), &specs)?;
    let store = StagingStore::start(&cluster.root().join("staging-store"))?;
    use_staging(&cluster, &store)?;
    println!(
        "meridian demo: {} sites on loopback in {} (regions: eu = {}; us = {}), staging bucket at {}",
        names.len(),
        cluster.root().display(),
        names[..2].join(", "),
        if names.len() > 2 { names[2..].join(", ") } else { "none".into() },
        store.endpoint(),
    );
    let started = Instant::now();
    cluster.start_all()?;
    println!(
        "  started {} and joined them (QUIC + TLS 1.3, every site knows every other) in {}",
        names.join(", "),
        ms(started.elapsed())
    );

    tree_scene(&cluster)?;
    let size = args.size_mib as usize * (1 << 20);
    let original = large_file_scene(&cluster, size)?;
    let edited = edit_scene(&cluster, original)?;
    partition_scene(&cluster)?;
    if cluster.sites().len() > 2 {
        regions_scene(&cluster, &edited)?;
    }

    println!();
    if args.keep_running {
        let root = cluster.root().to_path_buf();
        let pids = cluster.keep_running();
        println!("The sites keep running. Try:");
        for (name, _) in &pids {
            println!("  meridian --config {}/{name}/meridian.toml ls /", root.display());
        }
        println!("  meridian --config {}/{}/meridian.toml mesh ls", root.display(), pids[0].0);
        let list: Vec<String> = pids.iter().map(|(_, pid)| pid.to_string()).collect();
        println!("Stop them with: kill {}", list.join(" "));
    } else {
        println!(
            "Done; the sites are stopped and their directory removed (keep them with --dir D --keep-running)."
        );
    }
    Ok(())
}

fn tree_scene(cluster: &Cluster) -> anyhow::Result<()> {
    let east = &cluster.site(0).client;
    println!();
    println!(
        "1. {} publishes a folder tree; the others see it at once, with no payload moved",
        cluster.site(0).name
    );
    let mut entries = 0;
    for shot in 1..=8 {
        let dir = format!("/shots/sq010/sh{:03}0", shot);
        east.mkdir_p(&dir)?;
        entries += 1;
        for take in 1..=3 {
            let clip = format!("<clip shot=\"sh{shot:03}0\" take=\"{take}\"/>\n");
            east.put(&format!("{dir}/take{take}.clip"), clip.as_bytes())?;
            entries += 1;
        }
    }
    let last = "/shots/sq010/sh0080/take3.clip";
    let committed = Instant::now();
    let mut line =
        format!("   {} wrote {entries} entries under /shots; the last one visible at", cluster.site(0).name);
    for site in &cluster.sites()[1..] {
        wait_until(VISIBLE_TIMEOUT, || site.client.exists(last))
            .with_context(|| format!("{last} never appeared at {}", site.name))?;
        line.push_str(&format!(" {} after {},", site.name, ms(committed.elapsed())));
    }
    line.pop();
    println!("{line}");
    let listed = cluster.site(1).client.list("/shots/sq010")?;
    println!("   {} lists /shots/sq010: {}", cluster.site(1).name, listed.join(" "));
    Ok(())
}

fn large_file_scene(cluster: &Cluster, size: usize) -> anyhow::Result<Vec<u8>> {
    let (east, west) = (cluster.site(0), cluster.site(1));
    println!();
    println!("2. {} reads a large file written at {} while it arrives, chunk by chunk", west.name, east.name);
    let data = pseudo_random(1, size);
    east.client.mkdir_p("/renders")?;
    let started = Instant::now();
    east.client.put("/renders/plate.exr", &data)?;
    println!("   {} stored /renders/plate.exr ({}) in {}", east.name, mb(size as u64), ms(started.elapsed()));
    wait_until(VISIBLE_TIMEOUT, || west.client.exists("/renders/plate.exr"))?;
    let before = bytes_fetched(&west.client)?;
    let started = Instant::now();
    let mut first_byte = None;
    let mut hasher = blake3::Hasher::new();
    west.client.read_with("/renders/plate.exr", None, &mut |bytes| {
        first_byte.get_or_insert_with(|| started.elapsed());
        hasher.update(bytes);
    })?;
    let took = started.elapsed();
    let moved = bytes_fetched(&west.client)? - before;
    let same = hasher.finalize() == blake3::hash(&data);
    println!(
        "   {}: first byte after {}, whole file in {} ({:.0} MB/s); {} pulled over the network; identical: {}",
        west.name,
        ms(first_byte.unwrap_or_default()),
        ms(took),
        size as f64 / 1e6 / took.as_secs_f64(),
        mb(moved),
        if same { "yes" } else { "NO" }
    );
    if !same {
        bail!("the file read at {} differs from the one written at {}", west.name, east.name);
    }
    Ok(data)
}

fn edit_scene(cluster: &Cluster, mut data: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let (east, west) = (cluster.site(0), cluster.site(1));
    println!();
    println!("3. {} edits 1 MiB in the middle of the file; only the changed chunks move", east.name);
    let at = data.len() / 2;
    data[at..at + (1 << 20)].copy_from_slice(&pseudo_random(2, 1 << 20));
    let answer = east.client.put("/renders/plate.exr", &data)?;
    let content = blake3::hash(&data);
    println!("   {} stored the new version: {} of new chunks", east.name, mb(answer.new_bytes));
    wait_until(VISIBLE_TIMEOUT, || is_new_version(&west.client, &east.client))?;
    let before = bytes_fetched(&west.client)?;
    let read = west.client.read("/renders/plate.exr", None)?;
    let moved = bytes_fetched(&west.client)? - before;
    if blake3::hash(&read) != content {
        bail!("the edited file read at {} differs from the one written at {}", west.name, east.name);
    }
    println!(
        "   {} read the new version: {} crossed the network, {:.2}% of the file; identical: yes",
        west.name,
        mb(moved),
        moved as f64 * 100.0 / data.len() as f64
    );
    Ok(data)
}

fn regions_scene(cluster: &Cluster, data: &[u8]) -> anyhow::Result<()> {
    let (east, north) = (cluster.site(0), cluster.site(2));
    println!();
    println!(
        "5. {} is in another region (us): it reads /renders/plate.exr through the staging bucket",
        north.name
    );
    wait_until(VISIBLE_TIMEOUT, || is_new_version(&north.client, &east.client))?;
    let uploaded_before =
        east.client.status()?.core.bytes_to_staging + cluster.site(1).client.status()?.core.bytes_to_staging;
    let direct_before = north.client.status()?.core.bytes_fetched;
    let started = Instant::now();
    let read = north.client.read("/renders/plate.exr", None)?;
    let took = started.elapsed();
    let uploaded = east.client.status()?.core.bytes_to_staging
        + cluster.site(1).client.status()?.core.bytes_to_staging
        - uploaded_before;
    let from_bucket = north.client.status()?.core.bytes_from_staging;
    let direct = north.client.status()?.core.bytes_fetched - direct_before;
    let same = blake3::hash(&read) == blake3::hash(data);
    println!(
        "   eu uploaded {} once (sealed with the mesh key, under a keyed-hash name); {} read {} from the bucket in {} ({:.0} MB/s); {} directly from eu; identical: {}",
        mb(uploaded),
        north.name,
        mb(from_bucket),
        ms(took),
        data.len() as f64 / 1e6 / took.as_secs_f64(),
        mb(direct),
        if same { "yes" } else { "NO" }
    );
    if !same {
        bail!("the file read at {} through the bucket differs", north.name);
    }
    if let Some(south) = cluster.sites().get(3) {
        let read = south.client.read("/renders/plate.exr", None)?;
        println!(
            "   {} (us too) then reads it from {} within the region: {} directly, {} more uploaded; identical: {}",
            south.name,
            north.name,
            mb(south.client.status()?.core.bytes_fetched),
            mb(east.client.status()?.core.bytes_to_staging
                + cluster.site(1).client.status()?.core.bytes_to_staging
                - uploaded_before
                - uploaded),
            if blake3::hash(&read) == blake3::hash(data) { "yes" } else { "NO" }
        );
    }
    Ok(())
}

/// Whether `a` sees the same version of the plate as `b`.
fn is_new_version(a: &Client, b: &Client) -> anyhow::Result<bool> {
    let path = "/renders/plate.exr";
    Ok(a.version_id(path)? == b.version_id(path)?)
}

fn partition_scene(cluster: &Cluster) -> anyhow::Result<()> {
    let sites = cluster.sites();
    let (east, west) = (&sites[0], &sites[1]);
    println!();
    println!(
        "4. A partition: {} is cut off, and {} and {} both edit the same file",
        east.name, east.name, west.name
    );
    let path = "/shots/sq010/sh0010/comp.clip";
    east.client.put(path, b"<comp version=\"1\"/>\n")?;
    for site in &sites[1..] {
        wait_until(VISIBLE_TIMEOUT, || site.client.exists(path))?;
    }
    for other in &sites[1..] {
        cluster.meridian(0, &["mesh", "block", &other.name])?;
    }
    // The cut is effective once nobody lists east as connected.
    wait_until(VISIBLE_TIMEOUT, || {
        for site in &sites[1..] {
            if site.client.status()?.core.peers.iter().any(|p| p.site == east.name) {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    east.client.put(path, format!("<comp version=\"2\" by=\"{}\"/>\n", east.name).as_bytes())?;
    west.client.put(path, format!("<comp version=\"2\" by=\"{}\"/>\n", west.name).as_bytes())?;
    println!("   during the partition: {} lists {:?}", east.name, east.client.list("/shots/sq010/sh0010")?);
    println!("                         {} lists {:?}", west.name, west.client.list("/shots/sq010/sh0010")?);
    for other in &sites[1..] {
        cluster.meridian(0, &["mesh", "unblock", &other.name])?;
    }
    let listing = |site: &cluster::Site| site.client.list("/shots/sq010/sh0010");
    let took = wait_until(VISIBLE_TIMEOUT, || {
        let first = listing(&sites[0])?;
        if !first.iter().any(|n| n.contains(".conflict-")) {
            return Ok(false);
        }
        for site in &sites[1..] {
            if listing(site)? != first {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .context("the sites did not converge after the partition healed")?;
    let final_listing = listing(&sites[0])?;
    println!("   link restored; after {} every site lists {:?}", ms(took), final_listing);
    let mut contents = Vec::new();
    for site in sites {
        contents.push(String::from_utf8_lossy(&site.client.read(path, None)?).trim().to_owned());
    }
    let same = contents.windows(2).all(|w| w[0] == w[1]);
    println!(
        "   {path} is {} everywhere (the later write); the other write is kept as the conflict copy; identical at all {} sites: {}",
        contents[0],
        sites.len(),
        if same { "yes" } else { "NO" }
    );
    if !same {
        bail!("the sites disagree after the partition healed");
    }
    Ok(())
}

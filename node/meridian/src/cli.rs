//! `meridian`: the daemon and the command-line tool of a meridian site.
//!
//! [`main`] takes the arguments, so the `meridian` binary and the testbed (which runs nodes as
//! children of its own binary) share every line of it.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use node::api::{self, ApiRequest};
use node::config::{CONFIG_FILE, Config, DEFAULT_PORT, PeerConfig, listen_addrs};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

/// Files at least this large show a progress bar on put and get (when stderr is a terminal).
const PROGRESS_MIN_BYTES: u64 = 64 << 20;

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "A multi-site file replication mesh: one namespace, every site."
)]
struct Cli {
    /// The site's configuration file [default: $MERIDIAN_CONFIG, else ./meridian.toml]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a site: its configuration, key and data directory.
    Init {
        /// The site's id (letters, digits, `-`, `_`).
        #[arg(long)]
        site: String,
        /// The region the site belongs to.
        #[arg(long)]
        region: String,
        /// Where to create it [default: ./<site>]
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The address to listen on for other sites.
        #[arg(long, default_value = "0.0.0.0")]
        bind: std::net::Ipv4Addr,
        /// The port to listen on for other sites (QUIC on UDP and TCP).
        #[arg(long, default_value_t = DEFAULT_PORT)]
        port: u16,
    },
    /// Run the site's daemon in the foreground (stop it with Ctrl-C or SIGTERM).
    Node,
    /// Store a local file (or `-` for stdin) at a path of the namespace.
    Put {
        /// The local file, or `-`.
        local: PathBuf,
        /// Where in the namespace; a path ending in `/` takes the local file's name.
        remote: String,
        /// Permission bits, in octal.
        #[arg(long, default_value = "644")]
        mode: String,
    },
    /// Copy a file of the namespace to a local file.
    Get {
        /// The file in the namespace.
        remote: String,
        /// The local file [default: the remote file's name, here]
        local: Option<PathBuf>,
    },
    /// Write a file of the namespace (or a byte range of it) to stdout.
    Cat {
        /// The file in the namespace.
        remote: String,
        /// Bytes START..END only.
        #[arg(long, value_name = "START..END")]
        range: Option<String>,
    },
    /// List a directory.
    Ls {
        /// The directory [default: /]
        path: Option<String>,
        /// Long format: kind, mode, size, modification time.
        #[arg(short)]
        l: bool,
    },
    /// Show what is known of an entry.
    Stat {
        /// The entry.
        path: String,
    },
    /// Make a directory.
    Mkdir {
        /// The directory.
        path: String,
        /// Make missing parents too; an existing directory is fine.
        #[arg(short)]
        p: bool,
    },
    /// Move or rename an entry.
    Mv {
        /// From.
        from: String,
        /// To (must not exist).
        to: String,
    },
    /// Remove an entry.
    Rm {
        /// The entry.
        path: String,
        /// Remove a directory and everything below it.
        #[arg(short)]
        r: bool,
    },
    /// Set, unset or show tags.
    #[command(subcommand)]
    Tag(TagCommand),
    /// Find entries by tags and path glob.
    Find {
        /// `KEY=VALUE`, `KEY!=VALUE` or `KEY` (repeatable; all must hold).
        #[arg(long = "tag", value_name = "PREDICATE")]
        tags: Vec<String>,
        /// A glob over absolute paths: `*`, `?`, `**`.
        #[arg(long, value_name = "GLOB")]
        path: Option<String>,
    },
    /// Show the site's state.
    Status,
    /// The other sites of the mesh.
    #[command(subcommand)]
    Mesh(MeshCommand),
    /// Start a mesh of sites on this machine and show what meridian does, with measured numbers.
    Demo(crate::demo::DemoArgs),
}

#[derive(Subcommand)]
enum MeshCommand {
    /// Add a site to this site's mesh (or update it). A running node connects at once.
    Add {
        /// The other site's id.
        name: String,
        /// Its peer id (`meridian init` printed it there).
        #[arg(long)]
        peer_id: String,
        /// Where to reach it, e.g. /ip4/10.0.0.2/udp/4100/quic-v1 (repeatable; tried in order).
        #[arg(long = "addr", value_name = "MULTIADDR", required = true)]
        addrs: Vec<String>,
        /// Its region.
        #[arg(long)]
        region: String,
    },
    /// Show the other sites, the state of the link to each and its lag.
    Ls,
    /// Cut the link to a site until `mesh unblock` or the node restarts (maintenance, a
    /// misbehaving site, or a partition drill). Changes made meanwhile merge when it is restored.
    Block {
        /// The site.
        name: String,
    },
    /// Restore the link to a site cut by `mesh block`.
    Unblock {
        /// The site.
        name: String,
    },
}

#[derive(Subcommand)]
enum TagCommand {
    /// Set a tag on an entry (inherited by everything below it).
    Set {
        /// The entry.
        path: String,
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Explicitly unset a tag on an entry (blocks inheritance).
    Unset {
        /// The entry.
        path: String,
        /// The key.
        key: String,
    },
    /// Show an entry's effective tags and where each comes from.
    Get {
        /// The entry.
        path: String,
    },
}

/// Runs the command line `args` (the first is the program name).
pub fn main<I: IntoIterator<Item = OsString>>(args: I) -> ExitCode {
    let cli = Cli::parse_from(args);
    let result = match &cli.command {
        Command::Init { site, region, dir, bind, port } => {
            init(site, region, dir.as_deref(), &bind.to_string(), *port, cli.json)
        }
        Command::Node => run_node(&cli),
        Command::Mesh(MeshCommand::Add { name, peer_id, addrs, region }) => {
            let peer = PeerConfig {
                site: name.clone(),
                region: region.clone(),
                peer_id: peer_id.clone(),
                addrs: addrs.clone(),
            };
            mesh_add(&cli, peer)
        }
        Command::Demo(args) => crate::demo::run(args),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")
            .and_then(|rt| rt.block_on(client(&cli))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_path(cli: &Cli) -> PathBuf {
    cli.config
        .clone()
        .or_else(|| std::env::var_os("MERIDIAN_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(CONFIG_FILE))
}

fn init(
    site: &str,
    region: &str,
    dir: Option<&Path>,
    bind: &str,
    port: u16,
    json: bool,
) -> anyhow::Result<()> {
    let mut config = Config::new(site, region);
    config.listen = listen_addrs(bind, port);
    config.check()?;
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(site));
    let config_file = dir.join(CONFIG_FILE);
    if config_file.exists() {
        bail!("{} already exists: this site is initialised", config_file.display());
    }
    std::fs::create_dir_all(dir.join(&config.data_dir))
        .with_context(|| format!("creating {}", dir.display()))?;
    let key = libp2p_identity::Keypair::generate_ed25519();
    let peer_id = key.public().to_peer_id();
    let key_file = dir.join(&config.key_file);
    let encoded = key.to_protobuf_encoding().context("encoding the key")?;
    write_private(&key_file, &encoded)?;
    std::fs::write(&config_file, toml::to_string(&config).context("writing the config")?)
        .with_context(|| format!("writing {}", config_file.display()))?;
    let config_file = std::path::absolute(&config_file)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "site": site, "region": region, "peer_id": peer_id.to_string(), "config": config_file,
                "listen": config.listen,
            })
        );
    } else {
        let host = if bind == "0.0.0.0" { "<this machine's IP>" } else { bind };
        println!("initialised site {site} (region {region})");
        println!("peer id: {peer_id}");
        println!("listen:  {}", config.listen.join(" "));
        println!("config:  {}", config_file.display());
        println!("start it with: meridian --config {} node", config_file.display());
        println!("on the other sites, add this one with:");
        println!(
            "  meridian mesh add {site} --peer-id {peer_id} --addr /ip4/{host}/udp/{port}/quic-v1 --addr /ip4/{host}/tcp/{port} --region {region}"
        );
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    file.sync_all().with_context(|| format!("writing {}", path.display()))
}

fn run_node(cli: &Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| node::runtime::DEFAULT_LOG.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let loaded = Config::load(&config_path(cli))?;
    node::runtime::load_keypair(&loaded)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(node::runtime::run(loaded))
}

fn mesh_add(cli: &Cli, peer: PeerConfig) -> anyhow::Result<()> {
    let path = config_path(cli);
    let mut loaded = Config::load(&path)?;
    peer.member()?;
    let config = &mut loaded.config;
    if peer.site == config.site {
        bail!("{} is this site's own name", peer.site);
    }
    if config.peers.iter().any(|p| p.peer_id == peer.peer_id && p.site != peer.site) {
        bail!("peer id {} is already listed under another name", peer.peer_id);
    }
    let replaced = config.peers.iter().position(|p| p.site == peer.site);
    match replaced {
        Some(i) => config.peers[i] = peer.clone(),
        None => config.peers.push(peer.clone()),
    }
    config.check()?;
    config.save(&loaded.path)?;
    // A running node admits the new member at once.
    let live = match std::os::unix::net::UnixStream::connect(loaded.socket()) {
        Ok(_) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(ask(cli, &ApiRequest::MeshAdd { peer: peer.clone() }))?;
            true
        }
        Err(_) => false,
    };
    if cli.json {
        println!("{}", serde_json::json!({ "site": peer.site, "updated": replaced.is_some(), "live": live }));
    } else {
        let what = if replaced.is_some() { "updated" } else { "added" };
        let when =
            if live { "the running node is connecting to it" } else { "the node connects when it starts" };
        println!("{what} {} ({}) in {}; {when}", peer.site, peer.peer_id, loaded.path.display());
    }
    Ok(())
}

async fn connect(cli: &Cli) -> anyhow::Result<UnixStream> {
    let path = config_path(cli);
    let loaded = Config::load(&path)?;
    match UnixStream::connect(loaded.socket()).await {
        Ok(stream) => Ok(stream),
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
        {
            bail!(
                "no meridian node is running for {}; start it with `meridian --config {} node`",
                path.display(),
                path.display()
            )
        }
        Err(e) => Err(e).with_context(|| format!("connecting to {}", loaded.socket().display())),
    }
}

async fn ask(cli: &Cli, request: &ApiRequest) -> anyhow::Result<Value> {
    let mut stream = connect(cli).await?;
    api::write_frame(&mut stream, &serde_json::to_vec(request)?).await?;
    api::read_answer(&mut stream).await
}

fn progress(size: u64) -> ProgressBar {
    if size < PROGRESS_MIN_BYTES {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("a valid template"),
    );
    bar
}

async fn client(cli: &Cli) -> anyhow::Result<()> {
    let print = |value: &Value, human: &dyn Fn(&Value)| {
        if cli.json {
            println!("{value}");
        } else {
            human(value);
        }
    };
    match &cli.command {
        Command::Init { .. } | Command::Node | Command::Demo(_) | Command::Mesh(MeshCommand::Add { .. }) => {
            unreachable!("handled in main")
        }
        Command::Mesh(MeshCommand::Block { name }) | Command::Mesh(MeshCommand::Unblock { name }) => {
            let blocked = matches!(&cli.command, Command::Mesh(MeshCommand::Block { .. }));
            let v = ask(cli, &ApiRequest::MeshBlock { site: name.clone(), blocked }).await?;
            print(&v, &|_| println!("link to {name} {}", if blocked { "cut" } else { "restored" }));
        }
        Command::Mesh(MeshCommand::Ls) => {
            let v =
                match ask(cli, &ApiRequest::MeshLs).await {
                    Ok(v) => v,
                    Err(e) if e.to_string().starts_with("no meridian node is running") => {
                        let loaded = Config::load(&config_path(cli))?;
                        let peers: Vec<Value> = loaded
                        .config
                        .peers
                        .iter()
                        .map(|p| serde_json::json!({
                            "site": p.site, "region": p.region, "peer_id": p.peer_id, "addrs": p.addrs,
                            "link": "node not running",
                        }))
                        .collect();
                        Value::Array(peers)
                    }
                    Err(e) => return Err(e),
                };
            print(&v, &|v| {
                println!(
                    "{:<12} {:<8} {:<32} {:<10} {:>10}  peer id / address",
                    "site", "region", "link", "since", "lag"
                );
                for p in v.as_array().into_iter().flatten() {
                    let lag = match p["lag_changes"].as_u64() {
                        Some(n) => format!("{n} changes"),
                        None => "-".into(),
                    };
                    let since = p["since_ms"]
                        .as_u64()
                        .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                        .unwrap_or_default();
                    println!(
                        "{:<12} {:<8} {:<32} {:<10} {:>10}  {} {}",
                        p["site"].as_str().unwrap_or(""),
                        p["region"].as_str().unwrap_or(""),
                        p["link"].as_str().unwrap_or(""),
                        since,
                        lag,
                        p["peer_id"].as_str().unwrap_or(""),
                        p["addr"].as_str().or_else(|| p["addrs"][0].as_str()).unwrap_or(""),
                    );
                }
            });
        }
        Command::Put { local, remote, mode } => {
            let mode = u32::from_str_radix(mode, 8).with_context(|| format!("mode {mode:?} is not octal"))?;
            let remote = if remote.ends_with('/') {
                let name = local
                    .file_name()
                    .and_then(|n| n.to_str())
                    .filter(|_| local.as_os_str() != "-")
                    .ok_or_else(|| {
                        anyhow::anyhow!("give the full remote path when putting {}", local.display())
                    })?;
                format!("{remote}{name}")
            } else {
                remote.clone()
            };
            let (mut source, size): (Box<dyn tokio::io::AsyncRead + Unpin>, u64) = if local.as_os_str() == "-"
            {
                (Box::new(tokio::io::stdin()), 0)
            } else {
                let file = tokio::fs::File::open(local)
                    .await
                    .with_context(|| format!("opening {}", local.display()))?;
                let size = file.metadata().await?.len();
                (Box::new(file), size)
            };
            let mut stream = connect(cli).await?;
            let request = ApiRequest::Put { path: remote.clone(), mode };
            api::write_frame(&mut stream, &serde_json::to_vec(&request)?).await?;
            api::read_answer(&mut stream).await?;
            let bar = progress(size);
            let mut buf = vec![0u8; api::DATA_FRAME_BYTES];
            loop {
                let n =
                    source.read(&mut buf).await.with_context(|| format!("reading {}", local.display()))?;
                if n == 0 {
                    break;
                }
                api::write_frame(&mut stream, &buf[..n]).await?;
                bar.inc(n as u64);
            }
            api::write_frame(&mut stream, &[]).await?;
            bar.finish_and_clear();
            let answer = api::read_answer(&mut stream).await?;
            print(&answer, &|v| {
                println!("{} ({} bytes, {} new bytes stored)", remote, v["size"], v["new_bytes"])
            });
        }
        Command::Get { remote, local } => {
            let name = remote.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("download");
            let local = local.clone().unwrap_or_else(|| PathBuf::from(name));
            let tmp = local.with_file_name(format!(
                ".{}.meridian-partial",
                local.file_name().and_then(|n| n.to_str()).unwrap_or("download")
            ));
            let mut file =
                tokio::fs::File::create(&tmp).await.with_context(|| format!("creating {}", tmp.display()))?;
            let result = read_into(cli, remote, None, &mut file, true).await;
            drop(file);
            match result {
                Ok(size) => {
                    tokio::fs::rename(&tmp, &local)
                        .await
                        .with_context(|| format!("writing {}", local.display()))?;
                    print(&serde_json::json!({ "path": remote, "local": local, "size": size }), &|_| {
                        println!("{} -> {} ({size} bytes)", remote, local.display())
                    });
                }
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e);
                }
            }
        }
        Command::Cat { remote, range } => {
            let range = match range {
                None => None,
                Some(r) => {
                    let (a, b) = r
                        .split_once("..")
                        .ok_or_else(|| anyhow::anyhow!("--range takes START..END, not {r:?}"))?;
                    let start = a.parse().with_context(|| format!("bad range start {a:?}"))?;
                    let end = b.parse().with_context(|| format!("bad range end {b:?}"))?;
                    Some((start, end))
                }
            };
            let mut stdout = tokio::io::stdout();
            read_into(cli, remote, range, &mut stdout, false).await?;
        }
        Command::Ls { path, l } => {
            let path = path.clone().unwrap_or_else(|| "/".into());
            let v = ask(cli, &ApiRequest::Ls { path }).await?;
            print(&v, &|v| {
                for e in v.as_array().into_iter().flatten() {
                    let name = e["name"].as_str().unwrap_or("");
                    if *l {
                        let s = &e["stat"];
                        let kind = match s["kind"].as_str() {
                            Some("dir") => 'd',
                            Some("symlink") => 'l',
                            _ => '-',
                        };
                        let mtime = s["mtime_ns"].as_i64().unwrap_or(0) / 1_000_000_000;
                        println!(
                            "{kind} {:o} {:>12} {:>11} {name}",
                            s["mode"].as_u64().unwrap_or(0),
                            s["size"],
                            mtime
                        );
                    } else {
                        println!("{name}");
                    }
                }
            });
        }
        Command::Stat { path } => {
            let v = ask(cli, &ApiRequest::Stat { path: path.clone() }).await?;
            print(&v, &|v| {
                println!("path:    {path}");
                println!("id:      {}", v["id"].as_str().unwrap_or(""));
                println!("kind:    {}", v["kind"].as_str().unwrap_or(""));
                println!("size:    {}", v["size"]);
                println!("mode:    {:o}", v["mode"].as_u64().unwrap_or(0));
                if let Some(version) = v["version"].as_object() {
                    println!(
                        "version: {} (written at {})",
                        version["id"].as_str().unwrap_or(""),
                        version["site"].as_str().unwrap_or("")
                    );
                    println!("content: {}", version["content"].as_str().unwrap_or(""));
                }
                for t in v["tags"].as_array().into_iter().flatten() {
                    match t["value"].as_str() {
                        Some(value) => println!("tag:     {}={value}", t["key"].as_str().unwrap_or("")),
                        None => println!("tag:     {} (unset)", t["key"].as_str().unwrap_or("")),
                    }
                }
            });
        }
        Command::Mkdir { path, p } => {
            let v = ask(cli, &ApiRequest::Mkdir { path: path.clone(), parents: *p }).await?;
            print(&v, &|_| {});
        }
        Command::Mv { from, to } => {
            let v = ask(cli, &ApiRequest::Mv { from: from.clone(), to: to.clone() }).await?;
            print(&v, &|_| {});
        }
        Command::Rm { path, r } => {
            let v = ask(cli, &ApiRequest::Rm { path: path.clone(), recursive: *r }).await?;
            print(&v, &|_| {});
        }
        Command::Tag(TagCommand::Set { path, key, value }) => {
            let v =
                ask(cli, &ApiRequest::TagSet { path: path.clone(), key: key.clone(), value: value.clone() })
                    .await?;
            print(&v, &|_| {});
        }
        Command::Tag(TagCommand::Unset { path, key }) => {
            let v = ask(cli, &ApiRequest::TagUnset { path: path.clone(), key: key.clone() }).await?;
            print(&v, &|_| {});
        }
        Command::Tag(TagCommand::Get { path }) => {
            let v = ask(cli, &ApiRequest::TagGet { path: path.clone() }).await?;
            print(&v, &|v| {
                for t in v.as_array().into_iter().flatten() {
                    let (k, val, src) = (t["key"].as_str(), t["value"].as_str(), t["source"].as_str());
                    println!("{}={} (from {})", k.unwrap_or(""), val.unwrap_or(""), src.unwrap_or(""));
                }
            });
        }
        Command::Find { tags, path } => {
            let v = ask(cli, &ApiRequest::Find { tags: tags.clone(), path: path.clone() }).await?;
            print(&v, &|v| {
                for hit in v.as_array().into_iter().flatten() {
                    println!("{}", hit["path"].as_str().unwrap_or(""));
                }
            });
        }
        Command::Status => {
            let v = ask(cli, &ApiRequest::Status).await?;
            print(&v, &|v| {
                println!("site:          {}", v["site"].as_str().unwrap_or(""));
                println!("entries:       {}", v["entries"]);
                println!("versions held: {}", v["versions_held"]);
                println!("chunks held:   {}", v["chunks_held"]);
                let peers: Vec<String> = v["peers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        format!("{} (lag {} changes)", p["site"].as_str().unwrap_or(""), p["lag_changes"])
                    })
                    .collect();
                println!(
                    "peers:         {}",
                    if peers.is_empty() { "none connected".to_owned() } else { peers.join(", ") }
                );
            });
        }
    }
    Ok(())
}

/// Streams a read into `out`; returns the bytes written.
async fn read_into<W: tokio::io::AsyncWrite + Unpin>(
    cli: &Cli,
    remote: &str,
    range: Option<(u64, u64)>,
    out: &mut W,
    show_progress: bool,
) -> anyhow::Result<u64> {
    use tokio::io::AsyncWriteExt;
    let mut stream = connect(cli).await?;
    let request =
        ApiRequest::Read { path: remote.to_owned(), start: range.map(|r| r.0), end: range.map(|r| r.1) };
    api::write_frame(&mut stream, &serde_json::to_vec(&request)?).await?;
    let header = api::read_answer(&mut stream).await?;
    let expected = header["end"].as_u64().unwrap_or(0) - header["start"].as_u64().unwrap_or(0);
    let bar = if show_progress { progress(expected) } else { ProgressBar::hidden() };
    let mut written = 0u64;
    loop {
        let frame = api::read_frame(&mut stream)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the node closed the read early"))?;
        if frame.is_empty() {
            break;
        }
        out.write_all(&frame).await?;
        written += frame.len() as u64;
        bar.inc(frame.len() as u64);
    }
    out.flush().await?;
    bar.finish_and_clear();
    api::read_answer(&mut stream).await?;
    if written != expected {
        bail!("read {written} bytes of {remote}, expected {expected}");
    }
    Ok(written)
}

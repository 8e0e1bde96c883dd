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
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use node::api::{
    self, ApiError, ApiRequest, ErrorKind, FindAnswer, Kind, ListEntry, MeshLink, PutAnswer, StatAnswer,
    StatusAnswer, TagAnswer,
};
use node::config::{CONFIG_FILE, Config, DEFAULT_PORT, PeerConfig, listen_addrs};
use node::membership::{Edit, Outcome};
use serde::Serialize;
use serde::de::DeserializeOwned;
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
    /// List directories.
    Ls {
        /// The directories [default: /]
        paths: Vec<String>,
        /// Long format: kind, mode, size, modification time.
        #[arg(short)]
        l: bool,
    },
    /// Show what is known of entries.
    Stat {
        /// The entries.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Make directories.
    Mkdir {
        /// The directories.
        #[arg(required = true)]
        paths: Vec<String>,
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
    /// Remove entries.
    Rm {
        /// The entries.
        #[arg(required = true)]
        paths: Vec<String>,
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
    /// Mount the namespace at a directory (FUSE) until Ctrl-C, SIGTERM or `fusermount3 -u DIR`.
    /// The node must be running.
    Mount {
        /// An empty directory.
        dir: PathBuf,
        /// Let other users use the mount (their access checked against the modes; a mount by
        /// an ordinary user needs `user_allow_other` in /etc/fuse.conf). Default: the
        /// configuration's `mount.allow_other`.
        #[arg(long)]
        allow_other: bool,
        /// Seconds a read waits for bytes no reachable site or bucket supplies before it fails
        /// with EIO. Default: the configuration's `mount.read_timeout_secs` (30).
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
        read_timeout: Option<u64>,
    },
    /// The other sites of the mesh.
    #[command(subcommand)]
    Mesh(MeshCommand),
    /// This site's own key.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Start a mesh of sites on this machine and show what meridian does, with measured numbers.
    Demo(crate::demo::DemoArgs),
}

#[derive(Subcommand)]
enum MeshCommand {
    /// Add a site to this site's mesh, or change a member's addresses or region. A running node
    /// connects at once.
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
    /// Remove sites from this site's mesh: their links are cut and what they sign from now on
    /// is refused (what they wrote before stays).
    Rm {
        /// The sites.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Give a member a new key (its new peer id): its old key is refused from now on, what it
    /// signed before stays valid.
    Rotate {
        /// The site.
        name: String,
        /// Its new peer id.
        #[arg(long)]
        peer_id: String,
    },
    /// Show the other sites, the state of the link to each and its lag.
    Ls,
    /// Cut the link to a site until `mesh unblock` (kept across restarts): maintenance, a
    /// misbehaving site, or a partition drill. Changes made meanwhile merge when it is restored.
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
enum KeyCommand {
    /// Give this site a new key, with its node stopped. The old one is kept beside it; the
    /// other sites then take the new one with the `mesh rotate` this prints. Let this site's
    /// changes reach them first (`meridian mesh ls` there shows no lag): what it signed with
    /// the old key after the last change they hold is refused once they rotate.
    Rotate,
}

#[derive(Subcommand)]
enum TagCommand {
    /// Set a tag on an entry (inherited by everything below it): `KEY VALUE` or `KEY=VALUE`.
    Set {
        /// The entry.
        path: String,
        /// The key, or `KEY=VALUE`.
        key: String,
        /// The value (unless given with the key).
        value: Option<String>,
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
        Command::Mount { dir, allow_other, read_timeout } => {
            run_mount(&cli, dir, *allow_other, *read_timeout)
        }
        Command::Mesh(MeshCommand::Add { name, peer_id, addrs, region }) => {
            let peer = PeerConfig {
                site: name.clone(),
                region: region.clone(),
                peer_id: peer_id.clone(),
                addrs: addrs.clone(),
                blocked: false,
            };
            mesh_edit(&cli, Edit::Add(peer))
        }
        Command::Mesh(MeshCommand::Rm { names }) => {
            names.iter().try_for_each(|name| mesh_edit(&cli, Edit::Remove { site: name.clone() }))
        }
        Command::Mesh(MeshCommand::Rotate { name, peer_id }) => {
            mesh_edit(&cli, Edit::Rotate { site: name.clone(), peer_id: peer_id.clone() })
        }
        Command::Mesh(MeshCommand::Block { name }) => {
            mesh_edit(&cli, Edit::Block { site: name.clone(), blocked: true })
        }
        Command::Mesh(MeshCommand::Unblock { name }) => {
            mesh_edit(&cli, Edit::Block { site: name.clone(), blocked: false })
        }
        Command::Key(KeyCommand::Rotate) => rotate_own_key(&cli),
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
    config.save(&config_file)?;
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

/// Logs to stderr, at `RUST_LOG`'s level or the daemon's default.
fn log_to_stderr() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| node::runtime::DEFAULT_LOG.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn run_node(cli: &Cli) -> anyhow::Result<()> {
    log_to_stderr();
    let loaded = Config::load(&config_path(cli))?;
    node::runtime::load_keypair(&loaded)?;
    node::runtime::exit_on_panic();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let Some(dir) = loaded.mount_path() else { return runtime.block_on(node::runtime::run(loaded)) };
    // `[mount] path`: mounted once the control socket answers; at a signal it is unmounted
    // first (its last commits still reach the node), then the node stops.
    let options = mount_options(&loaded, false, None);
    let socket = loaded.socket();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut node = runtime.spawn(node::runtime::run_until(loaded, async {
        let _ = stopped.await;
    }));
    let mounted = runtime.block_on(async {
        loop {
            if node.is_finished() {
                return Ok(None);
            }
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let mounted = tokio::task::spawn_blocking(move || mount::mount(&socket, &dir, &options))
            .await
            .context("mounting")??;
        eprintln!("mounted the namespace at {}", mounted.dir().display());
        anyhow::Ok(Some(mounted))
    });
    let mounted = match mounted {
        Ok(mounted) => mounted,
        Err(e) => {
            // The node runs without its mount only if asked to: a mount that fails stops it
            // (cleanly).
            let _ = stop.send(());
            let _ = runtime.block_on(node);
            return Err(e.context("`[mount] path` in the configuration"));
        }
    };
    let ended = runtime.block_on(async {
        tokio::select! {
            _ = node::runtime::stop_signal() => None,
            ran = &mut node => Some(ran),
        }
    });
    let unmounted = mounted.map_or(Ok(()), mount::Mounted::unmount);
    let ran = match ended {
        Some(ran) => ran,
        None => {
            let _ = stop.send(());
            runtime.block_on(node)
        }
    };
    ran.context("the node's task")??;
    unmounted
}

/// How to mount for `loaded`'s site: the configuration's `[mount]` settings, unless the
/// command line says otherwise.
fn mount_options(
    loaded: &node::config::Loaded,
    allow_other: bool,
    read_timeout: Option<u64>,
) -> mount::MountOptions {
    let data_scratch = loaded.data_dir().join("mount-scratch");
    let scratch_dir =
        if std::fs::create_dir_all(&data_scratch).is_ok() && tempfile::tempfile_in(&data_scratch).is_ok() {
            data_scratch
        } else {
            std::env::temp_dir()
        };
    let settings = &loaded.config.mount;
    let mut options = mount::MountOptions::new(scratch_dir);
    options.read_timeout = std::time::Duration::from_secs(read_timeout.unwrap_or(settings.read_timeout_secs));
    options.allow_other = allow_other || settings.allow_other;
    options
}

/// `meridian mount DIR`: mounts until a signal, or until the mount is taken away.
fn run_mount(cli: &Cli, dir: &Path, allow_other: bool, read_timeout: Option<u64>) -> anyhow::Result<()> {
    log_to_stderr();
    let path = config_path(cli);
    let loaded = Config::load(&path)?;
    if let Err(e) = std::os::unix::net::UnixStream::connect(loaded.socket())
        && matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused)
    {
        return Err(node_not_running(&path));
    }
    let options = mount_options(&loaded, allow_other, read_timeout);
    let mounted = mount::mount(&loaded.socket(), dir, &options)?;
    eprintln!(
        "mounted site {} at {}; Ctrl-C, SIGTERM or `fusermount3 -u {}` unmounts",
        loaded.config.site,
        dir.display(),
        dir.display()
    );
    let (signalled, signal) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        runtime.block_on(async {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        let _ = signalled.send(());
    });
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    loop {
        if signal.recv_timeout(std::time::Duration::from_millis(200)).is_ok() {
            return mounted.unmount();
        }
        if !is_mount_point(&canonical) {
            // Unmounted from outside.
            return mounted.wait();
        }
    }
}

/// Whether `dir` is a mount point of this process's mount namespace.
fn is_mount_point(dir: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else { return true };
    let dir = dir.to_string_lossy();
    table.lines().any(|line| line.split(' ').nth(4) == Some(&dir))
}

/// `meridian key rotate`.
fn rotate_own_key(cli: &Cli) -> anyhow::Result<()> {
    let path = config_path(cli);
    let loaded = Config::load(&path)?;
    if std::os::unix::net::UnixStream::connect(loaded.socket()).is_ok() {
        bail!("the node of {} is running: stop it before giving the site a new key", path.display());
    }
    let key_file = loaded.key_file();
    let old_peer_id = node::runtime::own_peer_id(&loaded)?;
    let old = std::fs::read(&key_file).with_context(|| format!("reading {}", key_file.display()))?;
    let now_ns =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
    // `node.key.2026-12-01T21-42.old`: when it was retired, readable, and a name without colons.
    let stamp = utc_minutes(now_ns).replace(' ', "T").replace(':', "-");
    let name = key_file.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let kept = key_file.with_file_name(format!("{name}.{stamp}.old"));
    if kept.exists() {
        bail!("{} exists: one rotation a minute", kept.display());
    }
    node::config::write_private_atomically(&kept, &old)?;
    let key = libp2p_identity::Keypair::generate_ed25519();
    let peer_id = key.public().to_peer_id().to_string();
    let encoded = key.to_protobuf_encoding().context("encoding the key")?;
    node::config::write_private_atomically(&key_file, &encoded)?;
    let site = &loaded.config.site;
    let command = format!("meridian mesh rotate {site} --peer-id {peer_id}");
    let answer = serde_json::json!({
        "site": site, "peer_id": peer_id, "old_peer_id": old_peer_id, "old_key": kept, "on_other_sites": command,
    });
    show(cli, &answer, |_| {
        println!(
            "new key for {site}: peer id {peer_id} (the old key, {old_peer_id}, is kept in {})",
            kept.display()
        );
        println!("on every other site, run:");
        println!("  {command}");
    })
}

/// A membership change: through the running node (which changes its configuration file and
/// its live membership together), or in the file when no node runs.
fn mesh_edit(cli: &Cli, edit: Edit) -> anyhow::Result<()> {
    let path = config_path(cli);
    let loaded = Config::load(&path)?;
    // A node that refuses this caller runs all the same: the file is not edited behind it.
    let running = std::os::unix::net::UnixStream::connect(loaded.socket())
        .map_or_else(|e| e.kind() == std::io::ErrorKind::PermissionDenied, |_| true);
    let outcome = match running {
        true => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(ask::<Outcome>(cli, &ApiRequest::MeshEdit { edit: edit.clone() }))?
        }
        false => {
            let own = node::runtime::own_peer_id(&loaded)?;
            let mut config = loaded.config.clone();
            let done = edit.apply(&mut config, &own, None)?;
            config.save(&loaded.path)?;
            Outcome {
                site: edit.site().to_owned(),
                done: done.to_owned(),
                config: loaded.path.display().to_string(),
                live: false,
            }
        }
    };
    show(cli, &outcome, |o| {
        let site = &o.site;
        let now = if o.live { "the running node" } else { "the node, when it starts," };
        let what = match (&edit, o.done.as_str()) {
            (Edit::Add(peer), done) => {
                let when = if o.live {
                    "the running node is connecting to it"
                } else {
                    "the node connects when it starts"
                };
                format!("{done} {site} ({}); {when}", peer.peer_id)
            }
            (Edit::Remove { .. }, _) => {
                format!("removed {site}: {now} refuses its links and anything it signs from now on")
            }
            (Edit::Rotate { peer_id, .. }, _) => {
                format!(
                    "{site}'s key is now {peer_id}: {now} refuses its old key (what it signed before stays valid)"
                )
            }
            (Edit::Block { .. }, "blocked") => {
                format!("blocked {site}: its link stays cut until `meridian mesh unblock {site}`")
            }
            (Edit::Block { .. }, "unblocked") => format!("unblocked {site}: its link is restored"),
            (Edit::Block { blocked, .. }, _) => {
                format!("{site} was already {}", if *blocked { "blocked" } else { "unblocked" })
            }
        };
        println!("{what} ({})", o.config);
    })
}

/// The error for a configuration whose node does not answer.
fn node_not_running(config: &Path) -> anyhow::Error {
    let message = format!(
        "no meridian node is running for {}; start it with `meridian --config {} node`",
        config.display(),
        config.display()
    );
    ApiError::new(ErrorKind::NodeNotRunning, message).into()
}

async fn connect(cli: &Cli) -> anyhow::Result<UnixStream> {
    let path = config_path(cli);
    let loaded = Config::load(&path)?;
    match UnixStream::connect(loaded.socket()).await {
        Ok(stream) => Ok(stream),
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
        {
            Err(node_not_running(&path))
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let message = format!(
                "permission denied on {}: only the node's user, root and the members of its control_group may use it",
                loaded.socket().display()
            );
            Err(ApiError::new(ErrorKind::PermissionDenied, message).into())
        }
        Err(e) => Err(e).with_context(|| format!("connecting to {}", loaded.socket().display())),
    }
}

/// Sends `request` on a new connection and reads its answer, of the type the request names.
async fn ask<T: DeserializeOwned>(cli: &Cli, request: &ApiRequest) -> anyhow::Result<T> {
    let mut stream = connect(cli).await?;
    api::write_frame(&mut stream, &api::encode_request(request)).await?;
    api::read_answer(&mut stream).await
}

/// Prints `value` as JSON with `--json`, else as `human` writes it.
fn show<T: Serialize>(cli: &Cli, value: &T, human: impl FnOnce(&T)) -> anyhow::Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        human(value);
    }
    Ok(())
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

/// The commands that talk to a running node.
async fn client(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Init { .. }
        | Command::Node
        | Command::Mount { .. }
        | Command::Demo(_)
        | Command::Key(_)
        | Command::Mesh(
            MeshCommand::Add { .. }
            | MeshCommand::Rm { .. }
            | MeshCommand::Rotate { .. }
            | MeshCommand::Block { .. }
            | MeshCommand::Unblock { .. },
        ) => {
            unreachable!("handled in main")
        }
        Command::Mesh(MeshCommand::Ls) => mesh_ls(cli).await,
        Command::Put { local, remote, mode } => put(cli, local, remote, mode).await,
        Command::Get { remote, local } => get(cli, remote, local.as_deref()).await,
        Command::Cat { remote, range } => cat(cli, remote, range.as_deref()).await,
        Command::Ls { paths, l } => ls(cli, paths, *l).await,
        Command::Stat { paths } => stat(cli, paths).await,
        Command::Mkdir { paths, p } => {
            let requests =
                paths.iter().map(|path| ApiRequest::Mkdir { path: path.clone(), parents: *p, mode: None });
            changes(cli, requests).await
        }
        Command::Mv { from, to } => {
            changes(cli, [ApiRequest::Mv { from: from.clone(), to: to.clone(), replace: false }]).await
        }
        Command::Rm { paths, r } => {
            let requests = paths.iter().map(|path| ApiRequest::Rm { path: path.clone(), recursive: *r });
            changes(cli, requests).await
        }
        Command::Tag(TagCommand::Set { path, key, value }) => {
            let (key, value) = tag_key_value(key, value.as_deref())?;
            changes(cli, [ApiRequest::TagSet { path: path.clone(), key, value }]).await
        }
        Command::Tag(TagCommand::Unset { path, key }) => {
            changes(cli, [ApiRequest::TagUnset { path: path.clone(), key: key.clone() }]).await
        }
        Command::Tag(TagCommand::Get { path }) => {
            let tags: Vec<TagAnswer> = ask(cli, &ApiRequest::TagGet { path: path.clone() }).await?;
            show(cli, &tags, |tags| {
                for t in tags {
                    println!("{}={} (from {})", t.key, t.value, t.source);
                }
            })
        }
        Command::Find { tags, path } => {
            let hits: Vec<FindAnswer> =
                ask(cli, &ApiRequest::Find { tags: tags.clone(), path: path.clone() }).await?;
            show(cli, &hits, |hits| hits.iter().for_each(|hit| println!("{}", hit.path)))
        }
        Command::Status => status(cli).await,
    }
}

/// `KEY VALUE` or `KEY=VALUE`, as `find --tag` writes it.
fn tag_key_value(key: &str, value: Option<&str>) -> anyhow::Result<(String, String)> {
    match (value, key.split_once('=')) {
        (Some(value), _) => Ok((key.to_owned(), value.to_owned())),
        (None, Some((key, value))) => Ok((key.to_owned(), value.to_owned())),
        (None, None) => bail!("give the tag as KEY VALUE or KEY=VALUE, not just {key:?}"),
    }
}

/// Sends changes in order, stopping at the first that fails.
async fn changes(cli: &Cli, requests: impl IntoIterator<Item = ApiRequest>) -> anyhow::Result<()> {
    for request in requests {
        ask::<()>(cli, &request).await?;
    }
    Ok(())
}

async fn mesh_ls(cli: &Cli) -> anyhow::Result<()> {
    let links: Vec<MeshLink> = match ask(cli, &ApiRequest::MeshLs).await {
        Ok(links) => links,
        Err(e) if ApiError::kind_of(&e) == Some(ErrorKind::NodeNotRunning) => {
            let loaded = Config::load(&config_path(cli))?;
            loaded
                .config
                .peers
                .iter()
                .map(|p| MeshLink {
                    site: p.site.clone(),
                    region: p.region.clone(),
                    peer_id: p.peer_id.clone(),
                    addrs: p.addrs.clone(),
                    link: if p.blocked { "blocked (node not running)" } else { "node not running" }.into(),
                    addr: None,
                    since_ms: None,
                    lag_changes: None,
                    held_changes: 0,
                })
                .collect()
        }
        Err(e) => return Err(e),
    };
    show(cli, &links, |links| {
        println!(
            "{:<12} {:<8} {:<32} {:<10} {:>10}  peer id / address",
            "site", "region", "link", "since", "lag"
        );
        for p in links {
            let mut lag = p.lag_changes.map_or_else(|| "-".to_owned(), |n| format!("{n} changes"));
            if p.held_changes > 0 {
                // Stamped too far ahead of this site's clock: see `max_clock_ahead`.
                lag = format!("{lag}, {} held (clock ahead)", p.held_changes);
            }
            let since = p.since_ms.map(|ms| format!("{:.1}s", ms as f64 / 1000.0)).unwrap_or_default();
            let addr = p.addr.as_deref().or(p.addrs.first().map(String::as_str)).unwrap_or("");
            println!(
                "{:<12} {:<8} {:<32} {:<10} {:>10}  {} {addr}",
                p.site, p.region, p.link, since, lag, p.peer_id
            );
        }
    })
}

async fn put(cli: &Cli, local: &Path, remote: &str, mode: &str) -> anyhow::Result<()> {
    let mode = u32::from_str_radix(mode, 8).with_context(|| format!("mode {mode:?} is not octal"))?;
    let remote = if remote.ends_with('/') {
        let name =
            local.file_name().and_then(|n| n.to_str()).filter(|_| local.as_os_str() != "-").ok_or_else(
                || anyhow::anyhow!("give the full remote path when putting {}", local.display()),
            )?;
        format!("{remote}{name}")
    } else {
        remote.to_owned()
    };
    let (mut source, size): (Box<dyn tokio::io::AsyncRead + Unpin>, u64) = if local.as_os_str() == "-" {
        (Box::new(tokio::io::stdin()), 0)
    } else {
        let file =
            tokio::fs::File::open(local).await.with_context(|| format!("opening {}", local.display()))?;
        let size = file.metadata().await?.len();
        (Box::new(file), size)
    };
    let mut stream = connect(cli).await?;
    let request = ApiRequest::Put { path: remote.clone(), mode, mtime_ns: None };
    api::write_frame(&mut stream, &api::encode_request(&request)).await?;
    api::read_answer::<()>(&mut stream).await?;
    let bar = progress(size);
    let mut buf = vec![0u8; api::DATA_FRAME_BYTES];
    let sent = loop {
        let n = source.read(&mut buf).await.with_context(|| format!("reading {}", local.display()))?;
        if n == 0 {
            break api::write_frame(&mut stream, &[]).await;
        }
        if let Err(e) = api::write_frame(&mut stream, &buf[..n]).await {
            break Err(e);
        }
        bar.inc(n as u64);
    };
    bar.finish_and_clear();
    let answer: PutAnswer = match sent {
        Ok(()) => api::read_answer(&mut stream).await?,
        // The node may have stopped taking the data to say why (a full disk): its answer is
        // the error to show.
        Err(e) => match api::read_answer::<PutAnswer>(&mut stream).await {
            Err(answer) if ApiError::kind_of(&answer).is_some() => return Err(answer),
            _ => return Err(e.into()),
        },
    };
    show(cli, &answer, |a| println!("{} ({} bytes, {} new bytes stored)", a.path, a.size, a.new_bytes))
}

/// What `get` printed.
#[derive(Serialize)]
struct GetAnswer<'a> {
    path: &'a str,
    local: &'a Path,
    size: u64,
}

async fn get(cli: &Cli, remote: &str, local: Option<&Path>) -> anyhow::Result<()> {
    let name = remote.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("download");
    let local = local.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    let tmp = local.with_file_name(format!(
        ".{}.meridian-partial",
        local.file_name().and_then(|n| n.to_str()).unwrap_or("download")
    ));
    let mut file =
        tokio::fs::File::create(&tmp).await.with_context(|| format!("creating {}", tmp.display()))?;
    let result = read_into(cli, remote, None, &mut file, true).await;
    drop(file);
    let size = match result {
        Ok(size) => size,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    tokio::fs::rename(&tmp, &local).await.with_context(|| format!("writing {}", local.display()))?;
    let answer = GetAnswer { path: remote, local: &local, size };
    show(cli, &answer, |a| println!("{} -> {} ({} bytes)", a.path, a.local.display(), a.size))
}

async fn cat(cli: &Cli, remote: &str, range: Option<&str>) -> anyhow::Result<()> {
    let range = match range {
        None => None,
        Some(r) => {
            let (a, b) =
                r.split_once("..").ok_or_else(|| anyhow::anyhow!("--range takes START..END, not {r:?}"))?;
            let start = a.parse().with_context(|| format!("bad range start {a:?}"))?;
            let end = b.parse().with_context(|| format!("bad range end {b:?}"))?;
            Some((start, end))
        }
    };
    read_into(cli, remote, range, &mut tokio::io::stdout(), false).await?;
    Ok(())
}

async fn ls(cli: &Cli, paths: &[String], long: bool) -> anyhow::Result<()> {
    let paths = if paths.is_empty() { vec!["/".to_owned()] } else { paths.to_vec() };
    for (i, path) in paths.iter().enumerate() {
        let entries: Vec<ListEntry> = ask(cli, &ApiRequest::Ls { path: path.clone() }).await?;
        show(cli, &entries, |entries| {
            if paths.len() > 1 {
                println!("{}{path}:", if i > 0 { "\n" } else { "" });
            }
            for e in entries {
                if long {
                    let kind = match e.stat.kind {
                        Kind::Dir => 'd',
                        Kind::Symlink => 'l',
                        Kind::File => '-',
                    };
                    let mtime = utc_minutes(e.stat.mtime_ns);
                    println!("{kind} {:o} {:>12} {mtime} {}", e.stat.mode, e.stat.size, e.name);
                } else {
                    println!("{}", e.name);
                }
            }
        })?;
    }
    Ok(())
}

async fn stat(cli: &Cli, paths: &[String]) -> anyhow::Result<()> {
    for (i, path) in paths.iter().enumerate() {
        let stat: StatAnswer = ask(cli, &ApiRequest::Stat { path: path.clone() }).await?;
        show(cli, &stat, |v| {
            if i > 0 {
                println!();
            }
            println!("path:     {path}");
            println!("id:       {}", v.id);
            println!("kind:     {}", v.kind);
            println!("size:     {}", v.size);
            println!("mode:     {:o}", v.mode);
            println!("modified: {}", utc_minutes(v.mtime_ns));
            if let Some(version) = &v.version {
                println!("version:  {} (written at {})", version.id, version.site);
                println!("content:  {}", version.content);
            }
            for t in &v.tags {
                match &t.value {
                    Some(value) => println!("tag:      {}={value}", t.key),
                    None => println!("tag:      {} (unset)", t.key),
                }
            }
        })?;
    }
    Ok(())
}

async fn status(cli: &Cli) -> anyhow::Result<()> {
    let status: StatusAnswer = ask(cli, &ApiRequest::Status).await?;
    show(cli, &status, |v| {
        let v = &v.core;
        println!("site:          {}", v.site);
        println!("entries:       {}", v.entries);
        println!("versions held: {}", v.versions_held);
        println!("chunks held:   {}", v.chunks_held);
        let peers: Vec<String> =
            v.peers.iter().map(|p| format!("{} (lag {} changes)", p.site, p.lag_changes)).collect();
        println!(
            "peers:         {}",
            if peers.is_empty() { "none connected".to_owned() } else { peers.join(", ") }
        );
        let space = &v.space;
        let bound = space
            .cache_max_bytes
            .map_or("unbounded".to_owned(), |max| format!("at most {}", HumanBytes(max)));
        println!(
            "store:         {} ({} of it cache, {bound})",
            HumanBytes(space.store_bytes),
            HumanBytes(space.cache_bytes)
        );
        println!(
            "garbage:       {} in {} versions nothing refers to, waiting",
            HumanBytes(space.garbage_bytes),
            space.garbage_versions
        );
        for held in &space.held_back_by {
            let since =
                utc_minutes(i64::try_from(held.since_unix_ms).unwrap_or(i64::MAX).saturating_mul(1_000_000));
            let why = match (&held.named_by, held.reported) {
                (Some(by), _) => format!(
                    "not a member here, but {by} has its changes: `meridian mesh add {}` here releases it \
                     (then `meridian mesh rm {}` if it is not wanted)",
                    held.site, held.site
                ),
                (None, true) => {
                    format!("has not seen the removal yet; `meridian mesh rm {}` releases it", held.site)
                }
                (None, false) => format!(
                    "has not reported since this node started; `meridian mesh rm {}` releases it",
                    held.site
                ),
            };
            println!(
                "  held back by {}: {} in {} versions since {since} UTC ({why})",
                held.site,
                HumanBytes(held.bytes),
                held.versions,
            );
        }
        println!(
            "reclaimed:     {} of garbage, {} of cache since the node started",
            HumanBytes(space.collected_bytes),
            HumanBytes(space.evicted_bytes)
        );
    })
}

/// A time as people read it: `YYYY-MM-DD HH:MM` in UTC.
fn utc_minutes(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}", rest / 3600, rest % 3600 / 60)
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
    let mut reading = api::Reading::start(connect(cli).await?, remote, range, None).await?;
    let header = reading.header();
    let bar = if show_progress { progress(header.end - header.start) } else { ProgressBar::hidden() };
    let mut written = 0u64;
    while let Some(frame) = reading.next().await? {
        out.write_all(&frame).await?;
        written += frame.len() as u64;
        bar.inc(frame.len() as u64);
    }
    out.flush().await?;
    bar.finish_and_clear();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_dates() {
        assert_eq!(utc_minutes(0), "1970-01-01 00:00");
        assert_eq!(utc_minutes(1_764_600_120 * 1_000_000_000), "2025-12-01 14:42");
        assert_eq!(utc_minutes(951_782_400 * 1_000_000_000), "2000-02-29 00:00");
        assert_eq!(utc_minutes(-60 * 1_000_000_000), "1969-12-31 23:59");
    }

    #[test]
    fn tags_take_both_forms() {
        assert_eq!(tag_key_value("project", Some("apollo")).unwrap(), ("project".into(), "apollo".into()));
        assert_eq!(tag_key_value("project=apollo", None).unwrap(), ("project".into(), "apollo".into()));
        assert!(tag_key_value("project", None).is_err());
    }
}

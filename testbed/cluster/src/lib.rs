//! Several real `meridian` sites on this machine, on loopback: created with `meridian init`,
//! joined with `meridian mesh add`, run as child processes (`meridian node`), driven through
//! their control sockets. `meridian demo` and the testbed are built on it; the daemon's own
//! library (`node`) never uses it.
//!
//! [`StagingStore`] is a staging bucket for them: a real S3 server in the process, or any
//! endpoint named by `MERIDIAN_S3_*`.
//!
//! Every process it starts is stopped when the [`Cluster`] is dropped (also when a test
//! fails), unless [`Cluster::keep_running`] hands them over to the user.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use node::client::Client;
use node::config::{CONFIG_FILE, Config};

mod staging;

pub use staging::{StagingStore, use_staging};

/// How long a node may take to open its store and answer on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped node may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run `meridian`: a program and the arguments that come before meridian's own.
#[derive(Clone, Debug)]
pub struct Program {
    exe: PathBuf,
    prefix: Vec<OsString>,
}

impl Program {
    /// `exe prefix… ARGS` runs `meridian ARGS`.
    pub fn new(exe: impl Into<PathBuf>, prefix: Vec<OsString>) -> Program {
        Program { exe: exe.into(), prefix }
    }

    /// The running executable, which is `meridian`.
    pub fn this_meridian() -> anyhow::Result<Program> {
        Ok(Program::new(std::env::current_exe().context("finding the meridian executable")?, Vec::new()))
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.exe);
        command.args(&self.prefix);
        command
    }

    /// Runs `meridian ARGS` to completion; returns its stdout, or its stderr as the error.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} {}", self.exe.display(), args.join(" ")))?;
        if !out.status.success() {
            bail!("meridian {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// One site of a cluster.
pub struct Site {
    /// Its id.
    pub name: String,
    /// Its region.
    pub region: String,
    /// Its directory (configuration, key, data, log).
    pub dir: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its peer id.
    pub peer_id: String,
    /// Its site-to-site port (QUIC and TCP).
    pub port: u16,
    /// A client of its daemon.
    pub client: Client,
    child: Option<Child>,
}

impl Site {
    /// Its log file (the daemon's stderr).
    pub fn log(&self) -> PathBuf {
        self.dir.join("node.log")
    }

    /// Whether its daemon is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Its daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// Sites on loopback.
pub struct Cluster {
    program: Program,
    root: PathBuf,
    temp: Option<tempfile::TempDir>,
    sites: Vec<Site>,
}

/// A port free for both TCP and UDP on 127.0.0.1 right now, never the same twice in one
/// process, and outside the kernel's ephemeral range: between the moment a cluster picks a
/// site's port and the moment the site listens on it, neither another cluster of the same
/// test process nor an outgoing connection (which gets an ephemeral port) can take it.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let (low, high) = port_range();
    let span = u32::from(high - low);
    // Processes running at once (two test binaries, a demo) start at different places.
    let start = *START.get_or_init(|| {
        use std::hash::BuildHasher;
        let seed = (std::process::id(), std::time::SystemTime::now());
        (std::collections::hash_map::RandomState::new().hash_one(seed) % u64::from(span)) as u32
    });
    for _ in 0..span {
        let port = low + ((start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        if tcp.is_ok() && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port in {low}..{high} is free for both TCP and UDP on 127.0.0.1")
}

/// The ports [`free_port`] hands out: from 10000 up to the start of the ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, 32768 by default), or above its end when it
/// starts lower.
fn port_range() -> (u16, u16) {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(str::parse::<u16>);
            Some((parts.next()?.ok()?, parts.next()?.ok()?))
        })
        .unwrap_or((32_768, 60_999));
    match ephemeral {
        (first, _) if first >= 12_000 => (10_000, first),
        (_, last) if last <= 63_000 => (last + 1, 65_535),
        _ => (10_000, 32_768),
    }
}

impl Cluster {
    /// Creates sites `(name, region)` in `root` (a new temporary directory if `None`), each
    /// knowing all the others. Nothing runs yet.
    pub fn create(program: Program, root: Option<&Path>, sites: &[(&str, &str)]) -> anyhow::Result<Cluster> {
        let (root, temp) = match root {
            Some(root) => {
                std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
                (std::path::absolute(root)?, None)
            }
            None => {
                let temp =
                    tempfile::Builder::new().prefix("meridian-").tempdir().context("creating a temp dir")?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        let mut cluster = Cluster { program, root, temp, sites: Vec::new() };
        for (name, region) in sites {
            let dir = cluster.root.join(name);
            let port = free_port()?;
            let out = cluster.program.run(&[
                "--json",
                "init",
                "--site",
                name,
                "--region",
                region,
                "--dir",
                dir.to_str().context("a UTF-8 directory")?,
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])?;
            let v: serde_json::Value = serde_json::from_str(out.trim()).context("reading init's answer")?;
            let peer_id = v["peer_id"].as_str().context("init printed no peer id")?.to_owned();
            let config = dir.join(CONFIG_FILE);
            let client = Client::new(dir.join("control.sock"));
            cluster.sites.push(Site {
                name: name.to_string(),
                region: region.to_string(),
                dir,
                config,
                peer_id,
                port,
                client,
                child: None,
            });
        }
        for i in 0..cluster.sites.len() {
            for j in 0..cluster.sites.len() {
                if i != j {
                    cluster.mesh_add(i, j)?;
                }
            }
        }
        Ok(cluster)
    }

    /// Edits the configuration file of site `i` (before it starts).
    pub fn configure(&self, i: usize, edit: impl FnOnce(&mut Config)) -> anyhow::Result<()> {
        let path = &self.sites[i].config;
        let mut config = Config::load(path)?.config;
        edit(&mut config);
        config.check()?;
        config.save(path)
    }

    /// Runs `meridian mesh add` at site `at` for site `other`.
    pub fn mesh_add(&self, at: usize, other: usize) -> anyhow::Result<()> {
        let o = &self.sites[other];
        let quic = format!("/ip4/127.0.0.1/udp/{}/quic-v1", o.port);
        let tcp = format!("/ip4/127.0.0.1/tcp/{}", o.port);
        self.meridian(
            at,
            &[
                "mesh",
                "add",
                &o.name,
                "--peer-id",
                &o.peer_id,
                "--addr",
                &quic,
                "--addr",
                &tcp,
                "--region",
                &o.region,
            ],
        )?;
        Ok(())
    }

    /// Runs `meridian --config <site's config> ARGS` to completion; returns its stdout.
    pub fn meridian(&self, site: usize, args: &[&str]) -> anyhow::Result<String> {
        let config = self.sites[site].config.to_str().context("a UTF-8 path")?.to_owned();
        let mut all = vec!["--config", &config];
        all.extend_from_slice(args);
        self.program.run(&all)
    }

    /// The cluster's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sites.
    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    /// Site `i`.
    pub fn site(&self, i: usize) -> &Site {
        &self.sites[i]
    }

    /// Starts every site and waits until all are connected to each other.
    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.sites.len() {
            self.start(i)?;
        }
        self.wait_connected(START_TIMEOUT)
    }

    /// Starts site `i`'s daemon and waits until it answers.
    pub fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let site = &mut self.sites[i];
        if site.child.is_some() {
            bail!("site {} is already running", site.name);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(site.log())
            .with_context(|| format!("opening {}", site.log().display()))?;
        let child = self
            .program
            .command()
            .arg("--config")
            .arg(&site.config)
            .arg("node")
            .env(
                "RUST_LOG",
                std::env::var("MERIDIAN_NODE_LOG").unwrap_or_else(|_| node::runtime::DEFAULT_LOG.into()),
            )
            // Belt and braces: the staging client never asks the AWS SDK's default chain.
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting site {}", site.name))?;
        site.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if site.client.status().is_ok() {
                return Ok(());
            }
            if let Some(status) = site.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                site.child = None;
                bail!("site {} exited ({status}) while starting:\n{}", site.name, site.log_tail());
            }
            if Instant::now() > deadline {
                bail!("site {} did not answer within {START_TIMEOUT:?}:\n{}", site.name, site.log_tail());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until every running site is connected to every other running site.
    pub fn wait_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        let running: Vec<&Site> = self.sites.iter().filter(|s| s.is_running()).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let mut missing = Vec::new();
            for site in &running {
                let status = site.client.status()?;
                let peers: Vec<&str> = status.core.peers.iter().map(|p| p.site.as_str()).collect();
                for other in &running {
                    if other.name != site.name && !peers.contains(&other.name.as_str()) {
                        missing.push(format!("{}→{}", site.name, other.name));
                    }
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("links still down after {timeout:?}: {}", missing.join(", "));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops site `i` cleanly (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        let site = &mut self.sites[i];
        let Some(mut child) = site.child.take() else { return Ok(()) };
        signal(&child, rustix::process::Signal::TERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("site {} exited with {status}:\n{}", site.name, site.log_tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("site {} did not stop within {STOP_TIMEOUT:?}; killed", site.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills site `i` with SIGKILL, as a crash would.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.sites[i].child.take() {
            child.kill().context("killing a site")?;
            child.wait()?;
        }
        Ok(())
    }

    /// Leaves the sites running and the directory in place when the cluster is dropped.
    pub fn keep_running(mut self) -> Vec<(String, u32)> {
        if let Some(temp) = self.temp.take() {
            let _ = temp.keep();
        }
        let mut pids = Vec::new();
        for site in &mut self.sites {
            if let Some(child) = site.child.take() {
                pids.push((site.name.clone(), child.id()));
            }
        }
        pids
    }
}

fn signal(child: &Child, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for site in &mut self.sites {
            if let Some(child) = &site.child {
                signal(child, rustix::process::Signal::TERM);
            }
        }
        for site in &mut self.sites {
            if let Some(mut child) = site.child.take() {
                let deadline = Instant::now() + STOP_TIMEOUT;
                while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // A failing test shows what the sites said before its temporary directory goes.
        if std::thread::panicking() {
            for site in &self.sites {
                eprintln!("--- the end of site {}'s log ---\n{}", site.name, site.log_tail());
            }
        }
    }
}

/// Polls until `check` holds; returns how long it took.
pub fn wait_until(
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if check()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("not reached within {timeout:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

//! The `meridian` binary as a user runs it: init, node, and the CLI against it; and crash safety:
//! a node killed with SIGKILL in the middle of large writes restarts consistent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const MERIDIAN: &str = env!("CARGO_BIN_EXE_meridian");

/// A running `meridian node`, killed when dropped (also when a test fails).
struct Node {
    child: Child,
    config: PathBuf,
}

impl Node {
    fn start(config: &Path) -> Node {
        Node::start_with(config, &[])
    }

    /// Starts the node with `env` and waits until it answers.
    fn start_with(config: &Path, env: &[(&str, &str)]) -> Node {
        let node = Node::spawn(config, env);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !run(config, &["status"]).status.success() {
            assert!(Instant::now() < deadline, "the node did not start: {}", node.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    /// Starts the node with `env` and waits for its control socket (not for an answer).
    fn spawn(config: &Path, env: &[(&str, &str)]) -> Node {
        let log = std::fs::File::create(config.with_file_name("node.log")).unwrap();
        let child = Command::new(MERIDIAN)
            .args(["--config", config.to_str().unwrap(), "node"])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let node = Node { child, config: config.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !config.with_file_name("control.sock").exists() {
            assert!(Instant::now() < deadline, "the node did not start: {}", node.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    /// Waits for the node to exit by itself.
    fn exited(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the node is still running: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_file_name("node.log")).unwrap_or_default()
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the node did not stop cleanly: {status:?}\n{}", self.log());
        assert!(!self.config.with_file_name("control.sock").exists(), "the socket is removed");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(config: &Path, args: &[&str]) -> Output {
    Command::new(MERIDIAN).arg("--config").arg(config).args(args).output().unwrap()
}

fn ok(config: &Path, args: &[&str]) -> String {
    let out = run(config, args);
    assert!(out.status.success(), "meridian {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(config: &Path, args: &[&str]) -> String {
    let out = run(config, args);
    assert!(!out.status.success(), "meridian {args:?} should fail");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    stderr
}

fn init(dir: &Path, site: &str) -> PathBuf {
    let out = Command::new(MERIDIAN)
        // Port 0: the tests run in parallel, each node on ports of its own.
        .args(["init", "--site", site, "--region", "eu", "--bind", "127.0.0.1", "--port", "0", "--dir"])
        .arg(dir.join(site))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("peer id: 12D3KooW"), "{stdout}");
    dir.join(site).join("meridian.toml")
}

fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = site_core::sample::pseudo_random(seed, len);
    std::fs::write(path, &data).unwrap();
    data
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.filter_map(Result::ok).map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 }).sum()
}

/// Temporary chunk files (of interrupted writes) under `dir`.
fn count_tmp_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.path().is_dir() {
            true => count_tmp_files(&e.path()),
            false => usize::from(e.file_name().to_string_lossy().starts_with(".tmp")),
        })
        .sum()
}

#[test]
fn a_user_can_init_run_put_list_tag_find_get_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path(), "west");
    let missing = fails(&config, &["ls", "/"]);
    assert!(missing.contains("no meridian node is running for"), "{missing}");
    let node = Node::start(&config);

    ok(&config, &["mkdir", "-p", "/shots/sq010"]);
    let data = random_file(&dir.path().join("shot.exr"), 3_000_000, 1);
    let put = ok(&config, &["put", dir.path().join("shot.exr").to_str().unwrap(), "/shots/sq010/"]);
    assert!(put.contains("/shots/sq010/shot.exr (3000000 bytes"), "{put}");
    assert_eq!(ok(&config, &["ls", "/shots/sq010"]), "shot.exr\n");
    assert!(ok(&config, &["ls", "-l", "/shots"]).starts_with("d 755"));
    ok(&config, &["tag", "set", "/shots", "project", "apollo"]);
    assert_eq!(ok(&config, &["tag", "get", "/shots/sq010/shot.exr"]), "project=apollo (from /shots)\n");
    assert_eq!(
        ok(&config, &["find", "--tag", "project=apollo", "--path", "/shots/**/*.exr"]),
        "/shots/sq010/shot.exr\n"
    );
    assert_eq!(ok(&config, &["find", "--tag", "project=other"]), "");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&config, &["--json", "stat", "/shots/sq010/shot.exr"])).unwrap();
    assert_eq!(json["size"], 3_000_000);
    assert_eq!(json["kind"], "file");

    let out = dir.path().join("copy.exr");
    ok(&config, &["get", "/shots/sq010/shot.exr", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let range = Command::new(MERIDIAN)
        .args(["--config", config.to_str().unwrap(), "cat", "/shots/sq010/shot.exr", "--range", "1000..1010"])
        .output()
        .unwrap();
    assert_eq!(range.stdout, &data[1000..1010]);

    ok(&config, &["mv", "/shots/sq010/shot.exr", "/shots/final.exr"]);
    assert!(fails(&config, &["rm", "/shots"]).contains("directory not empty: /shots"));
    assert!(fails(&config, &["mkdir", "/shots/a/b"]).contains("no such file or directory: /shots/a"));
    assert!(fails(&config, &["mkdir", "/shots/final.exr/x"]).contains("not a directory: /shots/final.exr"));
    assert!(fails(&config, &["mkdir", "/bad\\name/.."]).contains("invalid name \"..\""));
    assert!(
        fails(&config, &["put", out.to_str().unwrap(), "/nowhere/x"])
            .contains("no such file or directory: /nowhere")
    );
    assert!(fails(&config, &["put", out.to_str().unwrap(), "/shots"]).contains("is a directory: /shots"));
    ok(&config, &["rm", "-r", "/shots"]);
    assert_eq!(ok(&config, &["ls", "/"]), "");

    // Restarted, the node has what it had.
    ok(&config, &["put", out.to_str().unwrap(), "/kept.exr"]);
    node.stop();
    let node = Node::start(&config);
    ok(&config, &["get", "/kept.exr", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    node.stop();
}

#[test]
fn a_node_killed_during_large_writes_restarts_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path(), "west");
    let sources: Vec<(PathBuf, Vec<u8>)> = (0..4)
        .map(|i| {
            let path = dir.path().join(format!("src{i}.bin"));
            let data = random_file(&path, (i as usize + 1) * (10 << 20), 100 + i);
            (path, data)
        })
        .collect();
    for round in 0..3u64 {
        let node = Node::start(&config);
        let puts: Vec<Child> = sources
            .iter()
            .enumerate()
            .map(|(i, (path, _))| {
                Command::new(MERIDIAN)
                    .args(["--config", config.to_str().unwrap(), "put"])
                    .arg(path)
                    .arg(format!("/r{round}-f{i}.bin"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        // Kill once the puts are well under way: chunks are on disk, not all versions committed.
        let chunks = config.with_file_name("data").join("chunks");
        let target = 8 + 12 * round as usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        while count_files(&chunks) < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let at_kill = count_files(&chunks);
        node.kill9();
        for mut put in puts {
            let _ = put.wait();
        }
        // Restart: every file the namespace lists is whole, and nothing half-written is left.
        let node = Node::start(&config);
        let listed = ok(&config, &["ls", "/"]);
        eprintln!(
            "round {round}: {} files listed after the kill, {} chunk files at the kill",
            listed.lines().count(),
            at_kill
        );
        assert!(node.log().contains("recovered the store after an unclean stop"), "{}", node.log());
        for name in listed.lines() {
            let i: usize = name.split("-f").nth(1).unwrap().trim_end_matches(".bin").parse().unwrap();
            let out = dir.path().join("check.bin");
            ok(&config, &["get", &format!("/{name}"), out.to_str().unwrap()]);
            assert!(std::fs::read(&out).unwrap() == sources[i].1, "{name} is not what was put");
        }
        assert_eq!(count_tmp_files(&chunks), 0, "temporary files are cleaned at start");
        node.stop();
    }
}

#[test]
fn a_panic_on_any_daemon_thread_ends_the_node_with_an_error_and_a_restart_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path(), "west");
    let node = Node::start(&config);
    ok(&config, &["mkdir", "/before"]);
    node.stop();
    for place in ["core", "committer", "connection"] {
        let mut node = Node::spawn(&config, &[("MERIDIAN_TEST_PANIC", place)]);
        // The request that meets the panic fails; the node does not linger.
        fails(&config, &["mkdir", &format!("/during-{place}")]);
        let status = node.exited();
        assert_eq!(status.code(), Some(node::runtime::PANIC_EXIT_CODE), "{place}: {}", node.log());
        let log = node.log();
        assert!(log.contains("the node stops") && log.contains(place), "{place}: {log}");
        // A restart recovers: what was acknowledged is there.
        let node = Node::start(&config);
        assert!(ok(&config, &["ls", "/"]).contains("before"));
        node.stop();
    }
}

/// The permission bits of `path`.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The binary, linked (or copied) into `dir`: another user cannot reach the build directory.
fn reachable_binary(dir: &Path) -> PathBuf {
    let exe = dir.join("meridian");
    if std::fs::hard_link(MERIDIAN, &exe).is_err() {
        std::fs::copy(MERIDIAN, &exe).unwrap();
    }
    exe
}

/// `meridian ls /` run as uid and gid 65534, with a copy of the binary in `dir` (opened to
/// others) and a readable copy of `config` beside it.
fn ls_as_nobody(dir: &Path, config: &Path) -> impl Fn() -> std::process::Output {
    use std::os::unix::process::CommandExt;
    set_mode(dir, 0o755);
    let public = config.with_file_name("public.toml");
    std::fs::copy(config, &public).unwrap();
    set_mode(&public, 0o644);
    let exe = reachable_binary(dir);
    move || {
        Command::new(&exe)
            .arg("--config")
            .arg(&public)
            .args(["ls", "/"])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    }
}

fn fresh_peer_id() -> String {
    libp2p_identity::Keypair::generate_ed25519().public().to_peer_id().to_string()
}

#[test]
fn the_config_the_key_and_the_control_socket_are_private_and_strangers_are_refused() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path(), "west");
    let site_dir = config.parent().unwrap().to_owned();
    assert_eq!(mode(&config), 0o600, "created private");
    assert_eq!(mode(&site_dir.join("node.key")), 0o600);
    // Rewritten, it is private again whatever it had become, and nothing temporary is left.
    set_mode(&config, 0o644);
    let add = [
        "mesh",
        "add",
        "east",
        "--peer-id",
        &fresh_peer_id(),
        "--addr",
        "/ip4/127.0.0.1/tcp/9",
        "--region",
        "eu",
    ];
    ok(&config, &add);
    assert_eq!(mode(&config), 0o600, "rewritten private");
    let leftovers: Vec<_> = std::fs::read_dir(&site_dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let node = Node::start(&config);
    let socket = site_dir.join("control.sock");
    assert_eq!(mode(&socket), 0o600);
    // A rotation of its own key while the node runs is refused.
    assert!(fails(&config, &["key", "rotate"]).contains("stop it before"));
    if std::fs::metadata(&config).unwrap().uid() != 0 {
        eprintln!("not root: no client can be run as another user here; the stranger is not tried");
        return node.stop();
    }
    // A stranger (uid 65534), with a readable copy of the configuration beside the socket.
    let ls = ls_as_nobody(dir.path(), &config);
    let stranger = || {
        let out = ls();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let denied = stranger();
    assert!(denied.contains("permission denied on") && denied.contains("control.sock"), "{denied}");
    // Even with the socket's mode opened up by mistake, the node checks who calls.
    set_mode(&socket, 0o666);
    let denied = stranger();
    assert!(denied.contains("permission denied: only the node's user"), "{denied}");
    assert!(node.log().contains("refused a control connection from uid 65534"), "{}", node.log());
    assert!(ok(&config, &["ls", "/"]).is_empty(), "its own user is served");
    node.stop();
}

#[test]
fn secrets_never_show_in_the_log_status_listings_or_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path(), "west");
    let (secret_key, secret) = ("SECRETKEY-never-to-be-shown", "5ec7e75ec7e75ec7e75ec7e75ec7e75e");
    let staging = format!(
        "[staging]\nendpoint = \"http://127.0.0.1:9\"\nregion = \"garage\"\nbucket = \"b\"\naccess_key = \"AK\"\nsecret_key = \"{secret_key}\"\nsecret = \"{secret}\"\n"
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&staging);
    std::fs::write(&config, &text).unwrap();
    let key = libp2p_identity::Keypair::from_protobuf_encoding(
        &std::fs::read(config.with_file_name("node.key")).unwrap(),
    )
    .unwrap()
    .try_into_ed25519()
    .unwrap();
    let key_hex: String = key.secret().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let mut seen = String::new();
    let record = |seen: &mut String, out: Output| {
        seen.push_str(&String::from_utf8_lossy(&out.stdout));
        seen.push_str(&String::from_utf8_lossy(&out.stderr));
    };
    let node = Node::start_with(&config, &[("AWS_EC2_METADATA_DISABLED", "true"), ("RUST_LOG", "debug")]);
    for args in [
        &["status"][..],
        &["--json", "status"],
        &["mesh", "ls"],
        &["--json", "mesh", "ls"],
        &["get", "/none", "x"],
    ] {
        record(&mut seen, run(&config, args));
    }
    node.stop();
    let log = std::fs::read_to_string(config.with_file_name("node.log")).unwrap();
    assert!(log.contains("meridian node running"), "{log}");
    seen.push_str(&log);
    // Configurations with mistakes around the secrets.
    for bad in [
        text.replace(&format!("secret_key = \"{secret_key}\""), &format!("secret_key = \"{secret_key}")),
        text.replace(&format!("secret = \"{secret}\""), &format!("secret = \"{secret}zz\"")),
        text.replace("[staging]\n", "[staging]\nttl_hours = 0\n"),
    ] {
        std::fs::write(&config, bad).unwrap();
        let out = run(&config, &["ls", "/"]);
        assert!(!out.status.success());
        record(&mut seen, out);
    }
    for hidden in [secret_key, secret, key_hex.as_str()] {
        assert!(!seen.contains(hidden), "a secret shows:\n{seen}");
    }
}

#[test]
fn the_members_of_the_control_group_may_use_the_node() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path(), "west");
    if std::fs::metadata(&config).unwrap().uid() != 0 {
        eprintln!("not root: the socket cannot be given to another group here; not tried");
        return;
    }
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.insert_str(0, "control_group = \"65534\"\n");
    std::fs::write(&config, text).unwrap();
    let node = Node::start(&config);
    let socket = config.with_file_name("control.sock");
    assert_eq!(mode(&socket), 0o660);
    assert_eq!(std::fs::metadata(&socket).unwrap().gid(), 65534);
    // A user of that group (uid 65534, primary group 65534) is served.
    let out = ls_as_nobody(dir.path(), &config)();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    node.stop();
}

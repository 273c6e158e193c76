#![allow(clippy::unwrap_used)]
//! Several registry addresses: two real `pilotd` processes run with `--registry A,B`, where B
//! is a cold standby of A (a `pilot-registry` process started on A's store file once A has
//! stopped). The daemons move to B within a bounded time, keep their node IDs and hostnames,
//! Info names B, and one still finds the other by name (answered by B, not from the cache) and
//! reaches it. A list with a bad entry stops `pilotd` (and `--check-config`) at start.

use crate::support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pilot_driver::Driver;
use serde_json::Value;

/// How long a daemon may take to be registered on the standby once it serves.
const MOVE_WITHIN: Duration = Duration::from_secs(20);

fn free_tcp_addr() -> String {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// The `pilot-registry` binary next to this test's target directory
/// (target/<profile>/deps/<test> -> target/<profile>), built there when missing.
fn registry_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let bin = dir.join("pilot-registry");
    if !bin.is_file() {
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let st = Command::new(cargo)
            .args(["build", "-p", "pilot-registry", "--bin", "pilot-registry"])
            .status()
            .unwrap();
        assert!(st.success(), "cargo build -p pilot-registry: {st}");
    }
    assert!(bin.is_file(), "no {}", bin.display());
    bin
}

/// A child process killed on drop, its log printed after a panic.
struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env_remove("PILOT_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap();
        Proc {
            name,
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and waits for the exit (the store file is free afterwards).
    async fn stop(&mut self) {
        let mut child = self.child.take().unwrap();
        let st = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{} ignored SIGTERM", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn check_running(&mut self) {
        if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("{} exited: {st}\n{}", self.name, self.log());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.name, self.log());
        }
    }
}

/// A `pilot-registry` on `store`, listening on `addr`, every rate limit off.
fn spawn_registry(name: &'static str, dir: &Path, store: &Path, addr: &str) -> Proc {
    Proc::spawn(
        name,
        Command::new(registry_bin())
            .args(["--addr", addr, "--store"])
            .arg(store)
            .args([
                "--register-per-minute",
                "0",
                "--requests-per-ip",
                "0",
                "--requests-per-node",
                "0",
            ]),
        dir.join(format!("{name}.log")),
    )
}

/// A public `pilotd` named `hostname` with `registry` (one flag value, comma-separated).
fn spawn_pilotd(name: &'static str, home: &Path, registry: &str, hostname: &str) -> Proc {
    std::fs::create_dir_all(home).unwrap();
    let port = support::free_udp_port();
    Proc::spawn(
        name,
        Command::new(env!("CARGO_BIN_EXE_pilotd"))
            .arg("--home")
            .arg(home)
            .arg("--socket")
            .arg(home.join("pilotd.sock"))
            .args(["--registry", registry])
            .args(["--beacon", ""])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--public", "true"])
            .args(["--hostname", hostname])
            .args(["--keepalive", "1s"]),
        home.join("pilotd.log"),
    )
}

/// Polls `daemon`'s Info until `ready` holds, for at most `within`.
async fn info_until(
    daemon: &mut Proc,
    home: &Path,
    what: &str,
    within: Duration,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        daemon.check_running();
        if let Ok(d) = Driver::connect(home.join("pilotd.sock")).await {
            if let Ok(i) = d.info_json().await {
                if ready(&i) {
                    return i;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{}: {what}: not within {within:?}\n{}",
            daemon.name,
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether Info shows a registered session at `addr`.
fn on(i: &Value, addr: &str) -> bool {
    i["node_id"].as_u64().is_some_and(|n| n != 0)
        && i["registry"]["connected"] == true
        && i["registry"]["address"] == addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_move_to_a_standby_registry_and_keep_their_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("registry.redb");
    let (a, b) = (free_tcp_addr(), free_tcp_addr());
    let list = format!("{a},{b}");
    let mut reg_a = spawn_registry("registry-a", dir.path(), &store, &a);

    let (home_x, home_y) = (dir.path().join("x"), dir.path().join("y"));
    let mut x = spawn_pilotd("pilotd-x", &home_x, &list, "failover-x");
    let mut y = spawn_pilotd("pilotd-y", &home_y, &list, "failover-y");
    let wait = Duration::from_secs(30);
    let before_x = info_until(&mut x, &home_x, "registered on A", wait, |i| on(i, &a)).await;
    let before_y = info_until(&mut y, &home_y, "registered on A", wait, |i| on(i, &a)).await;
    assert_eq!(before_x["hostname"], "failover-x");

    // A stops; B starts on A's store file, on another port.
    reg_a.stop().await;
    let x_down = info_until(&mut x, &home_x, "registry loss noticed", wait, |i| {
        i["registry"]["connected"] == false
    })
    .await;
    assert_eq!(x_down["registry"]["address"], a.as_str());
    let _reg_b = spawn_registry("registry-b", dir.path(), &store, &b);
    let started = Instant::now();
    let after_x = info_until(&mut x, &home_x, "registered on B", MOVE_WITHIN, |i| {
        on(i, &b)
    })
    .await;
    let after_y = info_until(&mut y, &home_y, "registered on B", MOVE_WITHIN, |i| {
        on(i, &b)
    })
    .await;
    eprintln!(
        "both daemons on the standby {:?} after it started",
        started.elapsed()
    );
    for (before, after) in [(&before_x, &after_x), (&before_y, &after_y)] {
        assert_eq!(after["node_id"], before["node_id"]);
        assert_eq!(after["address"], before["address"]);
        assert_eq!(after["hostname"], before["hostname"]);
    }
    let log = std::fs::read_to_string(home_x.join("pilotd.log")).unwrap();
    assert!(log.contains("registry session established"), "{log}");

    // Y finds X by name through B (not from its cache) and reaches it.
    let dy = Driver::connect(home_y.join("pilotd.sock")).await.unwrap();
    let found = dy.resolve_hostname("failover-x").await.unwrap();
    assert_eq!(found["node_id"], after_x["node_id"], "{found}");
    assert!(
        found.get("stale").is_none(),
        "answered from the cache: {found}"
    );
    let node_x = u32::try_from(after_x["node_id"].as_u64().unwrap()).unwrap();
    let got = support::echo(&dy, node_x, b"after the move").await.unwrap();
    assert_eq!(got, b"after the move");
}

/// `pilotd` with `args`, expecting it to refuse them at start: returns its stderr.
fn refused(args: &[&str]) -> String {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pilotd"))
        .arg("--home")
        .arg(home.path())
        .args(args)
        .env_remove("PILOT_CONFIG")
        .env_remove("PILOT_REGISTRY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    err
}

#[test]
fn a_registry_list_with_a_bad_entry_is_refused_at_start() {
    let want = "pilotd: registry: registry address \"127.0.0.1\" (entry 2 of the list): no \
                port: write host:port";
    for args in [
        &["--registry", "127.0.0.1:9000,127.0.0.1"][..],
        &["--check-config", "--registry", "127.0.0.1:9000,127.0.0.1"],
        &[
            "--check-config",
            "--registry",
            "127.0.0.1:9000",
            "--registry",
            "127.0.0.1",
        ],
    ] {
        let err = refused(args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(refused(&["--check-config", "--registry", "a:1,,b:2"]).contains("entry 2"));
    // A good list is printed, in order, as a JSON list.
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pilotd"))
        .arg("--home")
        .arg(home.path())
        .args(["--check-config", "--registry", "127.0.0.1:9000, [::1]:9001"])
        .env_remove("PILOT_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["registry"],
        serde_json::json!(["127.0.0.1:9000", "[::1]:9001"])
    );
}

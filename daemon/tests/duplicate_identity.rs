#![allow(clippy::unwrap_used)]
//! Two real `pilotd` processes started from one home directory's identity (the second home is
//! a copy of the first), against a registry serving over TCP in this process: the second
//! daemon is refused with an error that names the other daemon and the fix, in its log and
//! in Info; the first keeps its endpoint in the registry, keeps receiving traffic, and is
//! told of the second in its log and Info; stopping the second leaves the first registered.
//! Once the first stops, the copy registers.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pilot_driver::Driver;
use pilot_registry_client::Client;
use serde_json::{json, Value};
use tunnel::ipc::{ExtReply, ExtRequest};

/// A `pilotd` child process, killed on drop (its log printed after a panic).
struct Pilotd {
    name: &'static str,
    child: Option<Child>,
    home: PathBuf,
    port: u16,
}

impl Pilotd {
    fn spawn(name: &'static str, home: &Path, registry: &str) -> Pilotd {
        std::fs::create_dir_all(home).unwrap();
        let port = support::free_udp_port();
        let log = std::fs::File::create(home.join("pilotd.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pilotd"))
            .arg("--home")
            .arg(home)
            .arg("--socket")
            .arg(home.join("pilotd.sock"))
            .args(["--registry", registry])
            .args(["--beacon", ""])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--public", "true"])
            .args(["--keepalive", "1s"])
            .env_remove("PILOT_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        Pilotd {
            name,
            child: Some(child),
            home: home.into(),
            port,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("pilotd.log")).unwrap_or_default()
    }

    async fn driver(&self) -> Option<Driver> {
        Driver::connect(self.home.join("pilotd.sock")).await.ok()
    }

    async fn info(&mut self) -> Option<Value> {
        if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("pilotd {} exited: {st}\n{}", self.name, self.log());
        }
        self.driver().await?.info_json().await.ok()
    }

    /// Polls Info until `ready` holds.
    async fn info_until(&mut self, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = self.info().await.filter(|i| ready(i)) {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "pilotd {}: {what}: not within 30 s\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn registered(&mut self) -> u32 {
        let i = self
            .info_until("registered", |i| i["node_id"].as_u64() != Some(0))
            .await;
        i["node_id"].as_u64().unwrap() as u32
    }

    /// SIGTERM, and a clean exit.
    async fn stop(&mut self) {
        let mut child = self.child.take().unwrap();
        let st = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "pilotd {}: {st}\n{}", self.name, self.log());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pilotd {} ignored SIGTERM",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Pilotd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- pilotd {} ---\n{}", self.name, self.log());
        }
    }
}

/// Copies the regular files of `from` (identity and kept state; not the socket or the log)
/// into a new directory `to`, as a user copying a home directory would.
fn copy_home(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if e.file_type().unwrap().is_file() && name != "pilotd.log" {
            std::fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
}

/// The registry's record of `node`.
async fn lookup(registry: &str, node: u32) -> Value {
    let mut c = Client::connect(registry).await.unwrap();
    c.call(&json!({"type": "lookup", "node_id": node}))
        .await
        .unwrap()
}

/// Packets the daemon has received on its tunnel socket.
fn pkts_recv(info: &Value) -> u64 {
    info["pkts_recv"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_identity_is_refused_and_never_takes_the_node_over() {
    let registry = support::registry().await;
    let dir = tempfile::tempdir().unwrap();
    let mut first = Pilotd::spawn("first", &dir.path().join("first"), &registry);
    let node = first.registered().await;
    let mut peer = Pilotd::spawn("peer", &dir.path().join("peer"), &registry);
    peer.registered().await;
    let peer_driver = peer.driver().await.unwrap();
    assert_eq!(
        support::echo(&peer_driver, node, b"before").await.unwrap(),
        b"before"
    );

    // A copy of the first daemon's home, with its identity, started as a second daemon.
    copy_home(&dir.path().join("first"), &dir.path().join("second"));
    let mut second = Pilotd::spawn("second", &dir.path().join("second"), &registry);
    let info = second
        .info_until("refused", |i| i["registry"]["conflict"].is_string())
        .await;
    let conflict = info["registry"]["conflict"].as_str().unwrap();
    for part in [
        "duplicate_instance".to_owned(),
        format!("node {node}"),
        format!("endpoint 127.0.0.1:{}", first.port),
        "Stop the other daemon".to_owned(),
        "identity directory was copied".to_owned(),
    ] {
        assert!(conflict.contains(&part), "{part:?} not in {conflict:?}");
    }
    assert_eq!(info["node_id"], 0, "the refused daemon has no node");
    assert_eq!(info["registry"]["connected"], false);
    let log = second.log();
    assert!(
        log.contains("ERROR") && log.contains("another daemon with this identity serves the node"),
        "{log}"
    );

    // The first daemon is told, in its log and in Info, and keeps the node.
    let info = first
        .info_until("told", |i| i["registry"]["conflict"].is_string())
        .await;
    let told = info["registry"]["conflict"].as_str().unwrap();
    assert!(
        told.contains(&format!("endpoint 127.0.0.1:{}", second.port)) && told.contains("refused"),
        "{told}"
    );
    assert_eq!(info["node_id"], node);
    assert_eq!(info["registry"]["connected"], true);
    let log = first.log();
    assert!(
        log.contains("ERROR") && log.contains("another pilotd with this node's identity"),
        "{log}"
    );
    let rec = lookup(&registry, node).await;
    assert_eq!(rec["real_addr"], format!("127.0.0.1:{}", first.port));

    // Traffic for the node still reaches the first daemon.
    let before = pkts_recv(&first.info().await.unwrap());
    assert_eq!(
        support::echo(&peer_driver, node, b"during").await.unwrap(),
        b"during"
    );
    assert!(pkts_recv(&first.info().await.unwrap()) > before);

    // Stopping the second daemon leaves the first registered, reachable, and heartbeating.
    second.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rec = lookup(&registry, node).await;
    assert_eq!(rec["real_addr"], format!("127.0.0.1:{}", first.port));
    let info = first.info().await.unwrap();
    assert_eq!(info["node_id"], node);
    assert_eq!(info["registry"]["connected"], true);
    assert_eq!(
        support::echo(&peer_driver, node, b"after").await.unwrap(),
        b"after"
    );

    // Once the first daemon stops, the copy may serve the node at once, with no wait for the
    // registry's liveness window (`pilotctl register` cuts its retry interval short).
    let mut second = Pilotd::spawn("second", &dir.path().join("second"), &registry);
    second
        .info_until("refused again", |i| i["registry"]["conflict"].is_string())
        .await;
    first.stop().await;
    let d = second.driver().await.unwrap();
    let t0 = Instant::now();
    loop {
        match d.ext(&ExtRequest::Register).await.unwrap() {
            ExtReply::Ok { data } => {
                assert_eq!(data["node_id"], node);
                break;
            }
            ExtReply::Error { message, .. } => {
                // The registry has not yet seen the first daemon's connection close.
                assert!(
                    message.contains("served by another live pilotd"),
                    "{message}"
                );
                assert!(t0.elapsed() < Duration::from_secs(5), "{message}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    eprintln!(
        "the copy took the node {:?} after the first stopped",
        t0.elapsed()
    );
    let info = second
        .info_until("registered after the first stopped", |i| {
            i["node_id"].as_u64() == Some(u64::from(node)) && i["registry"]["conflict"].is_null()
        })
        .await;
    assert_eq!(info["registry"]["connected"], true);
    let rec = lookup(&registry, node).await;
    assert_eq!(rec["real_addr"], format!("127.0.0.1:{}", second.port));
}

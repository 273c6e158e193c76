#![allow(clippy::unwrap_used)]
//! The node's registry state and the registry's outages, with whole nodes and a registry in
//! this process (the registry can be stopped and started again on the same port):
//!
//! - a registry that restarts with nothing stored gets the node's hostname, visibility, tags
//!   and task advert back;
//! - `deregister` then `register` registers at once, with the same state;
//! - with the registry down, a trusted peer the node knows stays reachable by its hostname
//!   (resolve, ping, a stream), a name never seen fails naming the outage, and the node
//!   registers again once the registry is back.

use crate::support;

use std::path::Path;
use std::time::{Duration, Instant};

use pilot_driver::Driver;
use pilot_registry_client::Client;
use pilotd::config::Cli;
use pilotd::node::Node;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel::ipc::{code, ExtReply, ExtRequest};
use tunnel::{Addr, SocketAddr as PilotAddr};

/// A registry with an in-memory store that can be stopped and started again (empty) on the
/// same address.
struct TestRegistry {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestRegistry {
    async fn start(bind: &str) -> TestRegistry {
        let reg = support::in_memory_registry();
        let l = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(reg.serve(l, None, async {
            let _ = rx.await;
        }));
        TestRegistry {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops serving and closes every connection.
    async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }

    /// A new, empty registry on the same address.
    async fn restart(&mut self) {
        self.stop().await;
        let addr = self.addr.clone();
        *self = TestRegistry::start(&addr).await;
    }
}

async fn start_node(registry: &str, home: &Path) -> Node {
    let cli = Cli {
        public: Some(false),
        ..support::loopback_cli(registry, home)
    };
    let node = Node::start(&cli.resolve().unwrap()).await.unwrap();
    node.daemon
        .registered(Duration::from_secs(10))
        .await
        .unwrap();
    node
}

async fn driver(home: &Path) -> Driver {
    Driver::connect(home.join("pilotd.sock")).await.unwrap()
}

async fn ext(d: &Driver, req: ExtRequest) -> Result<Value, (String, String)> {
    match d.ext(&req).await.unwrap() {
        ExtReply::Ok { data } => Ok(data),
        ExtReply::Error { code, message } => Err((code, message)),
    }
}

async fn ext_ok(d: &Driver, req: ExtRequest) -> Value {
    let what = format!("{req:?}");
    ext(d, req)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

/// Asks the registry directly (no daemon in between).
async fn ask(registry: &str, req: Value) -> Option<Value> {
    let mut c = Client::connect(registry).await.ok()?;
    c.call(&req).await.ok()
}

/// Waits until the registry resolves `hostname`, then returns its record.
async fn record_named(registry: &str, hostname: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Some(r) = ask(
            registry,
            json!({"type": "resolve_hostname", "hostname": hostname}),
        )
        .await
        {
            let node = r["node_id"].as_u64().unwrap();
            return ask(registry, json!({"type": "lookup", "node_id": node}))
                .await
                .unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the registry does not know {hostname:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Hostname, visibility, tags and task advert through the node's IPC.
async fn set_state(d: &Driver, hostname: &str) {
    ext_ok(
        d,
        ExtRequest::SetHostname {
            hostname: hostname.into(),
        },
    )
    .await;
    ext_ok(d, ExtRequest::SetVisibility { public: true }).await;
    ext_ok(
        d,
        ExtRequest::SetTags {
            tags: vec!["gpu".into()],
        },
    )
    .await;
    ext_ok(d, ExtRequest::SetTaskExec { enabled: true }).await;
}

fn assert_state(r: &Value, when: &str) {
    assert_eq!(r["public"], true, "{when}: {r}");
    assert_eq!(r["tags"], json!(["gpu"]), "{when}: {r}");
    assert_eq!(r["task_exec"], true, "{when}: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_lost_everything_gets_the_state_back() {
    let mut reg = TestRegistry::start("127.0.0.1:0").await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    let node = start_node(&reg.addr, &home).await;
    set_state(&driver(&home).await, "alice-lab").await;
    assert_state(
        &record_named(&reg.addr, "alice-lab", Duration::from_secs(1)).await,
        "before",
    );

    reg.restart().await;
    assert!(
        ask(
            &reg.addr,
            json!({"type": "resolve_hostname", "hostname": "alice-lab"})
        )
        .await
        .is_none(),
        "the new registry starts empty"
    );
    // The link notices at its next request or heartbeat; a register request makes it now.
    let d = driver(&home).await;
    let _ = ext(&d, ExtRequest::Register).await;
    let r = record_named(&reg.addr, "alice-lab", Duration::from_secs(30)).await;
    assert_state(&r, "after the registry restart");
    let info = d.info_json().await.unwrap();
    assert_eq!(info["hostname"], "alice-lab", "{info}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregister_then_register_restores_the_state() {
    let reg = TestRegistry::start("127.0.0.1:0").await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    let node = start_node(&reg.addr, &home).await;
    let d = driver(&home).await;
    set_state(&d, "alice-lab").await;

    ext_ok(&d, ExtRequest::Deregister).await;
    assert!(
        ask(
            &reg.addr,
            json!({"type": "resolve_hostname", "hostname": "alice-lab"})
        )
        .await
        .is_none(),
        "deregistered"
    );
    let r = ext_ok(&d, ExtRequest::Register).await;
    assert_eq!(r["node_id"], node.daemon.engine.node(), "{r}");
    // Registered and the state applied before the answer.
    let r = record_named(&reg.addr, "alice-lab", Duration::from_secs(1)).await;
    assert_state(&r, "after register");
    let info = d.info_json().await.unwrap();
    assert_eq!(info["hostname"], "alice-lab", "{info}");
    node.shutdown().await;
}

/// Makes `a` and `b` trust each other through the handshake.
async fn trust(da: &Driver, a: u32, db: &Driver, b: u32) {
    ext_ok(
        da,
        ExtRequest::Handshake {
            node_id: b,
            justification: "outage test".into(),
        },
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if ext(db, ExtRequest::Approve { node_id: a }).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no handshake request arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = ext_ok(da, ExtRequest::TrustList).await;
        let trusted = list["trusted"]
            .as_array()
            .is_some_and(|l| l.iter().any(|e| e["node_id"] == b));
        if trusted {
            return;
        }
        assert!(Instant::now() < deadline, "approval never arrived: {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A round trip through `peer`'s echo service (port 7).
async fn echo(d: &Driver, peer: u32) -> Result<(), String> {
    let mut s = d
        .dial(PilotAddr::new(Addr::new(0, peer), 7))
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"still there?")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .map_err(|_| "no echo".to_owned())?
        .map_err(|e| e.to_string())?;
    assert_eq!(&buf, b"still there?");
    Ok(())
}

/// What works with the registry down: resolving a known name, ping, a stream.
async fn known_peer_reachable(da: &Driver, b: u32, when: &str) {
    let r = ext(
        da,
        ExtRequest::Resolve {
            target: "bob".into(),
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{when}: resolve bob: {e:?}"));
    assert_eq!(r["node_id"], b, "{when}: {r}");
    assert_eq!(r["stale"], true, "{when}: {r}");
    let p = ext_ok(
        da,
        ExtRequest::Ping {
            node_id: b,
            count: 1,
            timeout_ms: Some(3000),
        },
    )
    .await;
    assert!(p["results"][0]["rtt_ms"].is_number(), "{when}: ping {p}");
    echo(da, b)
        .await
        .unwrap_or_else(|e| panic!("{when}: stream to bob: {e}"));
    let (c, m) = ext(
        da,
        ExtRequest::Resolve {
            target: "nobody".into(),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(c, code::UNAVAILABLE, "{when}: {m}");
    assert!(
        m.contains("registry unreachable") && m.contains("nobody"),
        "{when}: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_peers_stay_reachable_by_name_while_the_registry_is_down() {
    let mut reg = TestRegistry::start("127.0.0.1:0").await;
    let dir = tempfile::tempdir().unwrap();
    let (ha, hb) = (dir.path().join("a"), dir.path().join("b"));
    let na = start_node(&reg.addr, &ha).await;
    let nb = start_node(&reg.addr, &hb).await;
    let (a, b) = (na.daemon.engine.node(), nb.daemon.engine.node());
    let (da, db) = (driver(&ha).await, driver(&hb).await);
    ext_ok(
        &da,
        ExtRequest::SetHostname {
            hostname: "alice".into(),
        },
    )
    .await;
    ext_ok(
        &db,
        ExtRequest::SetHostname {
            hostname: "bob".into(),
        },
    )
    .await;
    trust(&da, a, &db, b).await;
    // The node learns bob's name and reaches him over a direct tunnel.
    let r = ext_ok(
        &da,
        ExtRequest::Resolve {
            target: "bob".into(),
        },
    )
    .await;
    assert_eq!(r["node_id"], b);
    assert!(r.get("stale").is_none(), "{r}");
    echo(&da, b).await.unwrap();

    reg.stop().await;
    known_peer_reachable(&da, b, "at once").await;
    // Later, with the link reconnecting with backoff.
    tokio::time::sleep(Duration::from_secs(3)).await;
    known_peer_reachable(&da, b, "3 s later").await;

    // Back, empty: the node registers again under its own name.
    reg.restart().await;
    let r = record_named(&reg.addr, "alice", Duration::from_secs(30)).await;
    assert_eq!(r["hostname"], "alice", "{r}");
    let r = ext_ok(
        &da,
        ExtRequest::Resolve {
            target: "alice".into(),
        },
    )
    .await;
    assert!(r.get("stale").is_none(), "fresh from the registry: {r}");
    na.shutdown().await;
    nb.shutdown().await;
}

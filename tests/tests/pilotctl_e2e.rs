#![allow(clippy::unwrap_used)]
//! pilotctl against real daemons: a registry and two `pilotd` nodes in this process, each
//! serving its IPC socket in a temporary directory; pilotctl runs through its library entry
//! point with `--json`, and the results are checked field by field. The test lives in the
//! workspace's test crate because it needs the daemon library, which pilotctl itself never
//! links.

use std::path::Path;
use std::time::{Duration, Instant};

use pilot_registry::store::RedbStore;
use pilot_registry::{Config as RegistryConfig, Registry};
use pilotctl::{run_captured, run_captured_with_stdin, Captured};
use pilotd::config::Cli;
use pilotd::node::Node;
use serde_json::Value;
use tunnel::Addr;

async fn registry() -> String {
    let reg = Registry::open(
        Box::new(RedbStore::in_memory().unwrap()),
        RegistryConfig {
            register_per_minute: 0,
            requests_per_ip: 0,
            requests_per_node: 0,
            ..RegistryConfig::default()
        },
    )
    .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(reg.serve(l, None, std::future::pending()));
    addr.to_string()
}

struct TestNode {
    node: Node,
    sock: String,
    id: u32,
}

impl TestNode {
    fn addr(&self) -> String {
        Addr::new(0, self.id).to_string()
    }

    /// Runs pilotctl with `--json` against this node.
    async fn ctl(&self, args: &[&str]) -> Captured {
        let mut all = vec!["--json", "--socket", self.sock.as_str()];
        all.extend_from_slice(args);
        run_captured(&all).await
    }

    /// Runs pilotctl and returns the `data` of a success.
    async fn ok(&self, args: &[&str]) -> Value {
        let out = self.ctl(args).await;
        let v = out.json();
        assert_eq!(out.status, 0, "pilotctl {args:?}: {}", out.stdout);
        assert_eq!(v["status"], "ok", "pilotctl {args:?}: {v}");
        v["data"].clone()
    }

    /// Runs pilotctl expecting a failure and returns its code.
    async fn err(&self, args: &[&str]) -> String {
        let out = self.ctl(args).await;
        let v = out.json();
        assert_eq!(out.status, 1, "pilotctl {args:?}: {}", out.stdout);
        assert_eq!(v["status"], "error", "pilotctl {args:?}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        v["code"].as_str().unwrap().to_owned()
    }
}

async fn start(registry: &str, home: &Path, public: bool) -> TestNode {
    start_with(registry, home, public, false).await
}

async fn start_with(registry: &str, home: &Path, public: bool, no_echo: bool) -> TestNode {
    let sock = home.join("pilotd.sock");
    let cli = Cli {
        registry: vec![registry.into()],
        beacon: Some(String::new()),
        listen: Some("127.0.0.1:0".into()),
        home: Some(home.into()),
        socket: Some(sock.clone()),
        public: Some(public),
        no_echo: Some(no_echo),
        ..Cli::default()
    };
    let node = Node::start(&cli.resolve().unwrap()).await.unwrap();
    let id = node
        .daemon
        .registered(Duration::from_secs(10))
        .await
        .unwrap();
    TestNode {
        node,
        sock: sock.to_string_lossy().into_owned(),
        id,
    }
}

/// Polls `f` until it returns true or 30 s pass.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}");
}

fn has_node(list: &Value, node: u32) -> bool {
    list.as_array()
        .is_some_and(|l| l.iter().any(|e| e["node_id"] == node))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_hostname_find_lookup_and_errors() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start(&reg, &dir.path().join("a"), true).await;
    let b = start(&reg, &dir.path().join("b"), true).await;

    let info = a.ok(&["info"]).await;
    assert_eq!(info["node_id"], a.id);
    assert_eq!(info["address"], a.addr());
    assert!(!info["public_key"].as_str().unwrap().is_empty());

    let name = format!("alpha-{}", a.id);
    let set = a.ok(&["set-hostname", &name]).await;
    assert_eq!(set["hostname"], name.as_str());
    assert_eq!(set["node_id"], a.id);

    let found = b.ok(&["find", &name]).await;
    assert_eq!(found["node_id"], a.id);
    assert_eq!(found["address"], a.addr());
    let by_alias = b.ok(&["resolve", &name]).await;
    assert_eq!(by_alias["node_id"], a.id);

    // Lookup by hostname, by address and by node ID name the same record.
    let rec = b.ok(&["lookup", &name]).await;
    assert_eq!(rec["node_id"], a.id);
    assert_eq!(rec["public"], true);
    assert_eq!(rec["public_key"], info["public_key"]);
    assert_eq!(rec["hostname"], name.as_str());
    let by_addr = b.ok(&["lookup", &a.addr()]).await;
    assert_eq!(by_addr["public_key"], info["public_key"]);
    let by_id = b.ok(&["lookup", &a.id.to_string()]).await;
    assert_eq!(by_id["address"], a.addr());

    let tags = a.ok(&["tags", "gpu", "search"]).await;
    assert_eq!(tags["tags"], serde_json::json!(["gpu", "search"]));
    let rec = b.ok(&["lookup", &a.addr()]).await;
    assert_eq!(rec["tags"], serde_json::json!(["gpu", "search"]));

    let cleared = a.ok(&["clear-hostname"]).await;
    assert_eq!(cleared["hostname"], "");
    assert_eq!(b.err(&["find", &name]).await, "not_found");

    assert_eq!(a.err(&["lookup", "0:00zz.0000.0001"]).await, "bad_address");
    assert_eq!(a.err(&["ping", "1:0000.0000.0005"]).await, "bad_address");
    assert_eq!(
        a.err(&["set-hostname", "Not A Hostname!"]).await,
        "invalid_hostname"
    );
    assert_eq!(a.err(&["disconnect", "999999"]).await, "unknown_peer");

    let private = a.ok(&["set-private"]).await;
    assert_eq!(private["public"], false);
    let rec = b.ok(&["lookup", &a.addr()]).await;
    assert_eq!(rec["public"], false);

    // The text form is for people, but names the node.
    let out = run_captured(&["--socket", &a.sock, "info"]).await;
    assert_eq!(out.status, 0);
    assert!(out.stdout.contains(&a.addr()), "{}", out.stdout);

    let sock = a.sock.clone();
    a.node.shutdown().await;
    let down = run_captured(&["--json", "--socket", &sock, "info"]).await;
    assert_eq!(down.status, 1);
    assert_eq!(down.json()["code"], "daemon_down");
    b.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_peers_bench_connect_and_messages() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    // B answers on port 7 with the daemon's built-in echo service; A runs without it.
    let a = start_with(&reg, &dir.path().join("a"), true, true).await;
    let b = start(&reg, &dir.path().join("b"), true).await;

    let ping = a.ok(&["ping", &b.addr(), "--count", "2"]).await;
    assert_eq!(ping["node_id"], b.id);
    let results = ping["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        assert!(r["rtt_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["path"], "direct");
    }
    assert_eq!(ping["summary"]["received"], 2);

    let tr = a.ok(&["traceroute", &b.addr(), "--count", "3"]).await;
    assert!(tr["setup_ms"].as_f64().unwrap() > 0.0, "{tr}");
    let samples = tr["rtt_samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3);
    assert!(
        samples.iter().all(|s| s["rtt_ms"].as_f64().unwrap() > 0.0),
        "{tr}"
    );
    assert_eq!(tr["path"], "direct");

    let peers = a.ok(&["peers"]).await;
    let list = peers["peers"].as_array().unwrap();
    let p = list.iter().find(|p| p["node_id"] == b.id).unwrap();
    assert_eq!(p["path"], "direct");
    assert_eq!(p["encrypted"], true);
    assert!(p["endpoint"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(peers["total"], list.len());

    // No echo service on node A: every probe fails, and so does the command.
    assert_eq!(
        b.err(&["ping", &a.addr(), "-c", "1", "--timeout", "2s"])
            .await,
        "refused"
    );

    let bench = a.ok(&["bench", &b.id.to_string(), "--size", "2M"]).await;
    assert_eq!(bench["sent_bytes"], 2 << 20);
    assert_eq!(bench["recv_bytes"], 2 << 20);
    assert!(bench["send_mbps"].as_f64().unwrap() > 0.0);
    assert!(bench["total_mbps"].as_f64().unwrap() > 0.0);

    let conn = a
        .ok(&[
            "connect",
            &format!("{}:7", b.addr()),
            "--message",
            "hello echo",
        ])
        .await;
    assert_eq!(conn["response"], "hello echo");
    assert_eq!(conn["bytes_sent"], 10);
    assert_eq!(conn["bytes_received"], 10);

    // Stdin is piped to the connection; in text mode the echo comes out unchanged.
    let piped = run_captured_with_stdin(
        &["--socket", &a.sock, "connect", &b.addr(), "7"],
        b"line one\nline two\n".to_vec(),
    )
    .await;
    assert_eq!(piped.status, 0, "{}", piped.stderr);
    assert_eq!(piped.stdout, "line one\nline two\n");
    let piped = run_captured_with_stdin(
        &[
            "--json",
            "--socket",
            &a.sock,
            "connect",
            &b.id.to_string(),
            "7",
        ],
        vec![b'x'; 100_000],
    )
    .await;
    let v = piped.json();
    assert_eq!(v["data"]["bytes_sent"], 100_000);
    assert_eq!(v["data"]["bytes_received"], 100_000);

    if std::env::var_os("PILOTCTL_SHOW_TEXT").is_some() {
        for args in [
            &["info"][..],
            &["peers"],
            &["connections"],
            &["ping", &b.addr(), "-c", "2"],
            &["lookup", &b.addr()],
            &["bench", &b.addr(), "--size", "4M"],
            &["trust"],
            &["pending"],
        ] {
            let mut all = vec!["--socket", a.sock.as_str()];
            all.extend_from_slice(args);
            let out = run_captured(&all).await;
            println!(
                "$ pilotctl {}\n{}{}",
                args.join(" "),
                out.stdout,
                out.stderr
            );
        }
    }

    let conns = a.ok(&["connections"]).await;
    assert!(conns["total"].as_u64().unwrap() >= 1, "{conns}");
    // Connections that carried data show their live transport figures, not zeros.
    let busy: Vec<&Value> = conns["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["bytes_sent"].as_u64() > Some(1000))
        .collect();
    assert!(!busy.is_empty(), "{conns}");
    for c in busy {
        assert!(c["srtt_ms"].as_f64() > Some(0.0), "{c}");
        assert!(c["cong_win"].as_u64() > Some(0), "{c}");
        assert!(c["ssthresh"].as_u64() > Some(0), "{c}");
        assert!(c["recv_win"].as_u64() > Some(0), "{c}");
    }

    let sent = a
        .ok(&["send", &format!("{}:7", b.addr()), "stream hello"])
        .await;
    assert_eq!(sent["mode"], "stream");
    assert_eq!(sent["reply"], "stream hello");
    assert_eq!(sent["eof"], true);

    // Datagrams and a stream message to a port pilotctl listens on.
    let sock = b.sock.clone();
    let listener = tokio::spawn(async move {
        run_captured(&[
            "--json",
            "--socket",
            &sock,
            "listen",
            "5000",
            "--count",
            "2",
            "--timeout",
            "30s",
        ])
        .await
    });
    let target = format!("{}:5000", b.addr());
    let t0 = Instant::now();
    while !listener.is_finished() && t0.elapsed() < Duration::from_secs(30) {
        a.ok(&["send", &target, "--datagram", "dgram hi"]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = listener.await.unwrap();
    assert_eq!(out.status, 0, "{}", out.stdout);
    let v = out.json();
    let msgs = v["data"]["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["data"], "dgram hi");
    assert_eq!(msgs[0]["kind"], "datagram");
    assert_eq!(msgs[0]["src_addr"], a.addr());
    assert_eq!(v["data"]["timeout"], false);

    let sock = b.sock.clone();
    let listener = tokio::spawn(async move {
        run_captured(&[
            "--json",
            "--socket",
            &sock,
            "listen",
            "5001",
            "--count",
            "1",
            "--timeout",
            "30s",
        ])
        .await
    });
    let target = format!("{}:5001", b.addr());
    eventually("a stream message to be delivered", || async {
        let out = a
            .ctl(&["send", &target, "over a stream", "--no-wait"])
            .await;
        out.status == 0
    })
    .await;
    let out = listener.await.unwrap();
    let v = out.json();
    assert_eq!(v["data"]["messages"][0]["kind"], "stream");
    assert_eq!(v["data"]["messages"][0]["data"], "over a stream");

    let quiet = b.ok(&["listen", "5002", "--timeout", "300ms"]).await;
    assert_eq!(quiet["timeout"], true);
    assert_eq!(quiet["total"], 0);

    a.node.shutdown().await;
    b.node.shutdown().await;
}

/// An echo service that ends a stream as v1's does (wire §3.6): it echoes what it read,
/// slowly (8 KiB every 20 ms), and drops whatever it has not echoed yet as soon as the
/// client's end of stream arrives, since a v1 FIN ends both directions.
async fn v1_style_echo(engine: pilotd::engine::EngineHandle, port: u16) {
    use pilotd::engine::{AppEvent, Cmd};
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    engine.listen(port, tx).await.unwrap();
    tokio::spawn(async move {
        let mut open = None;
        let mut queue: Vec<u8> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    None => return,
                    Some(AppEvent::Accepted { conn, credit, .. }) => {
                        open = Some((conn, credit));
                        queue.clear();
                    }
                    Some(AppEvent::Data { data, .. }) => queue.extend_from_slice(&data),
                    Some(AppEvent::Closed { conn, .. }) => {
                        queue.clear();
                        open = None;
                        let _ = engine.send(Cmd::Close { conn }).await;
                    }
                    Some(_) => {}
                },
                _ = tick.tick() => {
                    if let Some((conn, credit)) = &open {
                        let n = queue.len().min(8 * 1024);
                        if n > 0 {
                            let chunk: Vec<u8> = queue.drain(..n).collect();
                            let _ = engine.write(*conn, credit, &chunk).await;
                        }
                    }
                }
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_ends_its_stream_only_after_the_whole_echo() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start(&reg, &dir.path().join("a"), true).await;
    let b = start_with(&reg, &dir.path().join("b"), true, true).await;
    v1_style_echo(b.node.daemon.engine.clone(), 7).await;
    let bench = a
        .ok(&["bench", &b.addr(), "--size", "512K", "--timeout", "60s"])
        .await;
    assert_eq!(bench["recv_bytes"], 512 << 10, "{bench}");
    assert!(bench["total_mbps"].as_f64().unwrap() > 0.0, "{bench}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_pending_approve_trust_between_private_nodes() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let p = start(&reg, &dir.path().join("p"), false).await;
    let q = start(&reg, &dir.path().join("q"), false).await;

    // Private nodes: no trust yet, and a request not made cannot be approved.
    let t = p.ok(&["trust"]).await;
    assert!(!has_node(&t["trusted"], q.id));
    assert_eq!(q.err(&["untrust", &p.addr()]).await, "untrusted");

    let p_name = format!("asker-{}", p.id);
    p.ok(&["set-hostname", &p_name]).await;
    let sent = p.ok(&["handshake", &q.addr(), "summarizer", "agent"]).await;
    assert_eq!(sent["status"], "sent");
    assert_eq!(sent["node_id"], q.id);

    eventually("the request to reach q", || async {
        let v = q.ok(&["pending"]).await;
        has_node(&v["pending"], p.id)
    })
    .await;
    let pend = q.ok(&["pending"]).await;
    let entry = pend["pending"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["node_id"] == p.id)
        .unwrap()
        .clone();
    assert_eq!(entry["justification"], "summarizer agent");
    // The text form names the requester.
    let text = run_captured(&["--socket", &q.sock, "pending"]).await;
    assert!(text.stdout.contains(&p_name), "{}", text.stdout);

    let approved = q.ok(&["approve", &p.id.to_string()]).await;
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["node_id"], p.id);

    let t = q.ok(&["trust"]).await;
    assert!(has_node(&t["trusted"], p.id), "{t}");
    let pend = q.ok(&["pending"]).await;
    assert!(!has_node(&pend["pending"], p.id));

    eventually("p to learn of the approval", || async {
        let v = p.ok(&["trust"]).await;
        has_node(&v["trusted"], q.id)
    })
    .await;

    // One pair, told the same way at both ends: who asked.
    let at_q = run_captured(&["--socket", &q.sock, "trust"]).await;
    let at_p = run_captured(&["--socket", &p.sock, "trust"]).await;
    assert!(at_q.stdout.contains(&p_name), "{}", at_q.stdout);
    assert!(at_q.stdout.contains("the peer"), "{}", at_q.stdout);
    assert!(at_p.stdout.contains("this node"), "{}", at_p.stdout);

    let revoked = q.ok(&["untrust", &p.addr()]).await;
    assert_eq!(revoked["status"], "revoked");
    let t = q.ok(&["trust"]).await;
    assert!(!has_node(&t["trusted"], p.id));

    p.node.shutdown().await;
    q.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_and_networks() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let p = start(&reg, &dir.path().join("p"), false).await;
    let q = start(&reg, &dir.path().join("q"), true).await;

    p.ok(&["handshake", &q.id.to_string(), "hello"]).await;
    let mine = p.ok(&["pending"]).await;
    let entry = mine["outgoing"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["node_id"] == q.id))
        .unwrap_or_else(|| panic!("our request is listed: {mine}"))
        .clone();
    assert_eq!(entry["status"], "waiting");
    assert_eq!(entry["justification"], "hello");
    eventually("the request to reach q", || async {
        let v = q.ok(&["pending"]).await;
        has_node(&v["pending"], p.id)
    })
    .await;
    let rejected = q.ok(&["reject", &p.addr(), "not", "today"]).await;
    assert_eq!(rejected["status"], "rejected");
    // The requester sees the rejection and its reason.
    eventually("p to see the rejection with its reason", || async {
        let v = p.ok(&["pending"]).await;
        v["outgoing"].as_array().is_some_and(|l| {
            l.iter().any(|e| {
                e["node_id"] == q.id && e["status"] == "rejected" && e["reason"] == "not today"
            })
        })
    })
    .await;
    let text = run_captured(&["--socket", &p.sock, "pending"]).await;
    assert!(text.stdout.contains("rejected"), "{}", text.stdout);
    assert!(text.stdout.contains("not today"), "{}", text.stdout);
    let pend = q.ok(&["pending"]).await;
    assert!(!has_node(&pend["pending"], p.id));
    let t = q.ok(&["trust"]).await;
    assert!(!has_node(&t["trusted"], p.id));

    let net = q.ok(&["networks", "create", "lab"]).await;
    let id = net["id"].as_u64().unwrap();
    assert!(id > 0);
    assert_eq!(net["name"], "lab");
    let list = p.ok(&["networks", "list"]).await;
    assert!(list["networks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["id"] == id && n["name"] == "lab"));
    let joined = p.ok(&["networks", "join", &id.to_string()]).await;
    assert_eq!(joined["network_id"], id);
    assert_eq!(joined["node_id"], p.id);
    let rec = q.ok(&["lookup", &p.addr()]).await;
    assert!(rec["networks"].as_array().unwrap().iter().any(|n| n == id));
    let left = p.ok(&["networks", "leave", &id.to_string()]).await;
    assert_eq!(left["network_id"], id);

    let hook = q.ok(&["webhook", "http://127.0.0.1:9/hook"]).await;
    assert_eq!(hook["webhook"], "http://127.0.0.1:9/hook");
    assert_eq!(q.err(&["webhook", "ftp://x"]).await, "bad_request");
    let hook = q.ok(&["webhook", "--clear"]).await;
    assert_eq!(hook["webhook"], "");

    let dereg = q.ok(&["deregister"]).await;
    assert_eq!(dereg["node_id"], q.id);
    assert_eq!(p.err(&["lookup", &q.addr()]).await, "not_found");

    p.node.shutdown().await;
    q.node.shutdown().await;
}

/// The pilotd binary of this workspace, built if the test run has not built it yet.
fn pilotd_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/pilotd
    let bin = exe.parent().unwrap().parent().unwrap().join("pilotd");
    if !bin.is_file() {
        let st = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", "pilotd", "--bin", "pilotd"])
            .status()
            .unwrap();
        assert!(st.success(), "building pilotd failed");
    }
    assert!(bin.is_file(), "no pilotd at {}", bin.display());
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_start_status_stop() {
    let bin = pilotd_bin();
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("n");
    let sock = dir.path().join("run").join("pilotd.sock");
    let sock_s = sock.to_string_lossy().into_owned();
    let home_s = home.to_string_lossy().into_owned();
    let ctl = |args: Vec<String>| {
        let mut all: Vec<String> = vec!["--json".into(), "--socket".into(), sock_s.clone()];
        all.extend(args);
        async move {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            run_captured(&refs).await
        }
    };
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<String>>();

    let down = ctl(s(&["daemon", "status"])).await;
    assert_eq!(down.status, 0, "{}", down.stdout);
    assert_eq!(down.json()["data"]["running"], false);
    assert_eq!(ctl(s(&["daemon", "status", "--check"])).await.status, 1);

    let mut args = s(&["daemon", "start", "--"]);
    args.extend(s(&[
        "--home",
        &home_s,
        "--registry",
        &reg,
        "--beacon",
        "",
        "--listen",
        "127.0.0.1:0",
    ]));
    std::env::set_var("PILOTD_BIN", &bin);
    let up = ctl(args.clone()).await;
    assert_eq!(up.status, 0, "{} {}", up.stdout, up.stderr);
    let pid = up.json()["data"]["pid"].as_u64().unwrap();
    assert!(pid > 1);

    // It registers in the background; status reports the node once it has.
    let t0 = Instant::now();
    loop {
        let st = ctl(s(&["daemon", "status"])).await.json();
        assert_eq!(st["data"]["running"], true, "{st}");
        assert_eq!(st["data"]["pid"], pid);
        if st["data"]["node_id"].as_u64().unwrap_or(0) != 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "never registered: {st}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ctl(s(&["daemon", "status", "--check"])).await.status, 0);
    let again = ctl(args).await;
    assert_eq!(again.json()["code"], "bad_request", "{}", again.stdout);

    let stop = ctl(s(&["daemon", "stop"])).await;
    assert_eq!(stop.status, 0, "{}", stop.stdout);
    assert_eq!(
        stop.json()["data"]["forced"],
        false,
        "SIGTERM is a clean stop"
    );
    assert!(!sock.exists(), "the socket is removed at stop");
    assert_eq!(
        ctl(s(&["daemon", "status"])).await.json()["data"]["running"],
        false
    );
    assert_eq!(
        ctl(s(&["daemon", "stop"])).await.json()["code"],
        "daemon_down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_with_a_wildcard_and_two_subscribers() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start(&reg, &dir.path().join("a"), true).await;
    let b = start(&reg, &dir.path().join("b"), true).await;
    let broker = b.node.eventstream.clone().unwrap();
    let target = b.addr();

    let sub = |topic: &'static str, count: &'static str| {
        let sock = a.sock.clone();
        let target = target.clone();
        tokio::spawn(async move {
            run_captured(&[
                "--json",
                "--socket",
                &sock,
                "subscribe",
                &target,
                topic,
                "--count",
                count,
                "--timeout",
                "30s",
            ])
            .await
        })
    };
    let exact = sub("alerts", "1");
    let all = sub("*", "2");
    eventually("two subscribers", || async {
        broker.stats().subscribers == 2
    })
    .await;

    let p = a.ok(&["publish", &target, "alerts", "disk full"]).await;
    assert_eq!(p["bytes"], 9);
    a.ok(&["publish", &target, "news", "hello"]).await;

    let exact = exact.await.unwrap().json();
    assert_eq!(exact["status"], "ok", "{exact}");
    let ev = exact["data"]["events"].as_array().unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["topic"], "alerts");
    assert_eq!(ev[0]["data"], "disk full");

    let all = all.await.unwrap().json();
    let ev = all["data"]["events"].as_array().unwrap();
    // Two publishing connections: the broker may see them in either order.
    let mut got: Vec<(&str, &str)> = ev
        .iter()
        .map(|e| (e["topic"].as_str().unwrap(), e["data"].as_str().unwrap()))
        .collect();
    got.sort();
    assert_eq!(got, [("alerts", "disk full"), ("news", "hello")], "{all}");

    assert_eq!(a.err(&["publish", &target, "*", "x"]).await, "bad_request");
    assert_eq!(a.err(&["subscribe", &target, "t"]).await, "bad_request");
}

/// Stdout of a pilotctl run that hands each write to a channel as it happens.
struct Tap(tokio::sync::mpsc::UnboundedSender<String>);

impl std::io::Write for Tap {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.send(String::from_utf8_lossy(b).into_owned());
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `pilotctl subscribe` in text mode on a task; its stdout arrives on the receiver as
/// it is written. The task yields the exit status and stderr.
fn subscribe_text(
    sock: &str,
    args: &[&str],
) -> (
    tokio::sync::mpsc::UnboundedReceiver<String>,
    tokio::task::JoinHandle<(i32, String)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut argv: Vec<String> = ["pilotctl", "--socket", sock, "subscribe"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.extend(args.iter().map(|s| s.to_string()));
    let task = tokio::spawn(async move {
        let mut out = Tap(tx);
        let mut err = Vec::new();
        let status = pilotctl::run(
            argv,
            pilotctl::Io {
                stdin: Box::new(std::io::Cursor::new(Vec::new())),
                stdout: &mut out,
                stderr: &mut err,
            },
        )
        .await;
        (status, String::from_utf8_lossy(&err).into_owned())
    });
    (rx, task)
}

/// Waits for a line containing `what` on a subscriber's stdout.
async fn saw(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, what: &str) -> bool {
    let wait = async {
        let mut all = String::new();
        while let Some(s) = rx.recv().await {
            all.push_str(&s);
            if all.contains(what) {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribed_means_live_and_a_lost_stream_fails() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start(&reg, &dir.path().join("a"), true).await;
    let b = start(&reg, &dir.path().join("b"), true).await;
    let target = b.addr();

    // An event published the moment "Subscribed" is printed reaches the subscriber, every
    // time: a remote subscriber with the broker's node publishing, and a subscriber on the
    // broker's node (its own address) with a remote publisher.
    for round in 0..8 {
        let topic = format!("race{round}");
        let (sub_node, pub_node) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let (mut rx, sub) = subscribe_text(
            &sub_node.sock,
            &[&target, &topic, "--count", "1", "--timeout", "20s"],
        );
        assert!(
            saw(&mut rx, "Subscribed").await,
            "round {round}: no Subscribed"
        );
        pub_node.ok(&["publish", &target, &topic, "now"]).await;
        let got = saw(&mut rx, &format!("[{topic}] now")).await;
        let (status, err) = sub.await.unwrap();
        assert!(
            got,
            "round {round}: the event published after Subscribed was lost"
        );
        assert_eq!(status, 0, "round {round}: {err}");
    }

    // A subscriber whose broker goes away fails, saying so.
    let (mut rx, sub) = subscribe_text(&a.sock, &[&target, "gone"]);
    assert!(saw(&mut rx, "Subscribed").await);
    b.node.shutdown().await;
    let (status, err) = tokio::time::timeout(Duration::from_secs(30), sub)
        .await
        .expect("subscribe kept running after its stream ended")
        .unwrap();
    assert_eq!(status, 1, "{err}");
    assert!(err.contains("the broker closed the stream"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_records() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start(&reg, &dir.path().join("a"), true).await;
    let b = start(&reg, &dir.path().join("b"), true).await;
    let addr = b.addr();

    let added = b.ok(&["names", "add", "A", "web", &addr]).await;
    assert_eq!(added["name"], "web");
    assert_eq!(added["origin"], "local");
    b.ok(&["names", "add", "N", "lab", "7"]).await;
    b.ok(&["names", "add", "S", "http", &addr, "7", "80"]).await;
    let list = b.ok(&["names", "list"]).await;
    assert_eq!(list["total"], 3, "{list}");

    let q = a.ok(&["names", "query", &addr, "A", "web"]).await;
    assert_eq!(q["answer"]["address"], addr.as_str());
    let q = a.ok(&["names", "query", &addr, "N", "lab"]).await;
    assert_eq!(q["answer"]["network_id"], 7);
    let q = a.ok(&["names", "query", &addr, "S", "7", "80"]).await;
    assert_eq!(q["answer"]["providers"][0]["address"], addr.as_str());

    b.ok(&["names", "remove", "A", "web", &addr]).await;
    assert_eq!(
        a.err(&["names", "query", &addr, "A", "web"]).await,
        "not_found"
    );
    assert_eq!(
        b.err(&["names", "remove", "A", "web", &addr]).await,
        "not_found"
    );
    assert_eq!(
        b.err(&["names", "add", "A", "web", "nowhere"]).await,
        "bad_request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_files_and_stdio() {
    use sha2::{Digest, Sha256};
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start(&reg, &dir.path().join("a"), true).await;
    let b = start(&reg, &dir.path().join("b"), true).await;
    let target = b.addr();

    // Typed messages land in B's inbox.
    let m = a.ok(&["send-message", &target, "hello bob"]).await;
    assert_eq!(m["ack"], "ACK TEXT 9 bytes");
    a.ok(&["send-message", &target, r#"{"job":42}"#, "--type", "json"])
        .await;
    assert_eq!(
        a.err(&["send-message", &target, "{not json", "--type", "json"])
            .await,
        "bad_request"
    );
    // connect reaches the stdio service on port 1000, which stores the text too.
    let c = a.ok(&["connect", &target, "--message", "via stdio"]).await;
    assert!(c.to_string().contains("ACK TEXT 9 bytes"), "{c}");
    let inbox = b.ok(&["inbox"]).await;
    let msgs = inbox["messages"].as_array().unwrap();
    assert_eq!(inbox["total"], 3, "{inbox}");
    assert_eq!(msgs[0]["type"], "TEXT");
    assert_eq!(msgs[0]["data"], "hello bob");
    assert_eq!(msgs[0]["from"], a.addr().as_str());
    assert_eq!(msgs[1]["type"], "JSON");
    assert_eq!(msgs[2]["data"], "via stdio");
    assert_eq!(b.ok(&["inbox", "--clear"]).await["cleared"], 3);
    assert_eq!(b.ok(&["inbox"]).await["total"], 0);

    // A 100 MiB file arrives whole, with the same SHA-256.
    let path = dir.path().join("big.bin");
    let mut data = vec![0u8; 100 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&path, &data).unwrap();
    let sent = a.ok(&["send-file", &target, path.to_str().unwrap()]).await;
    assert_eq!(sent["bytes"], 100u64 << 20);
    let files = b.ok(&["received"]).await;
    let f = &files["files"][0];
    assert_eq!(f["name"], "big.bin");
    let got = std::fs::read(f["path"].as_str().unwrap()).unwrap();
    assert_eq!(Sha256::digest(&got), Sha256::digest(&data), "file differs");
    drop((data, got));

    // A hostile name is neutralized and lands inside received/; nothing is overwritten.
    let small = dir.path().join("s.txt");
    std::fs::write(&small, b"x").unwrap();
    for _ in 0..2 {
        a.ok(&[
            "send-file",
            &target,
            small.to_str().unwrap(),
            "--name",
            "../../etc/passwd",
        ])
        .await;
    }
    let files = b.ok(&["received"]).await;
    let recv_dir = files["dir"].as_str().unwrap().to_owned();
    let names: Vec<&str> = files["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"passwd") && names.contains(&"passwd-1"),
        "{names:?}"
    );
    for f in files["files"].as_array().unwrap() {
        let p = std::path::Path::new(f["path"].as_str().unwrap());
        assert_eq!(p.parent().unwrap(), std::path::Path::new(&recv_dir));
    }
    assert_eq!(
        a.err(&["send-file", &target, "/nonexistent/file"]).await,
        "bad_request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegated_task_and_its_result() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start(&reg, &dir.path().join("a"), true).await;
    let b = start(&reg, &dir.path().join("b"), true).await;
    let target = b.addr();

    // B does not take tasks until it says so.
    assert_eq!(
        a.err(&["tasks", "submit", &target, "add", "2", "and", "3"])
            .await,
        "refused"
    );
    b.ok(&["enable-tasks"]).await;
    let sub = a
        .ok(&["tasks", "submit", &target, "add", "2", "and", "3"])
        .await;
    assert_eq!(sub["accepted"], true, "{sub}");
    let id = sub["task_id"].as_str().unwrap().to_owned();

    let list = b.ok(&["tasks", "list", "--type", "received"]).await;
    let t = &list["tasks"][0];
    assert_eq!(t["task_id"], id.as_str());
    assert_eq!(t["status"], "NEW");
    assert_eq!(t["description"], "add 2 and 3");
    assert_eq!(t["from"], a.addr().as_str());

    b.ok(&["tasks", "accept", &id]).await;
    assert_eq!(b.ok(&["tasks", "queue"]).await["count"], 1);
    let ex = b.ok(&["tasks", "execute"]).await;
    assert_eq!(ex["task_id"], id.as_str());
    let res = b.ok(&["tasks", "results", &id, "--text", "5"]).await;
    assert_eq!(res["task_id"], id.as_str());

    // A sees the task done and holds its result.
    let t0 = Instant::now();
    let last = loop {
        let l = a.ok(&["tasks", "list", "--type", "submitted"]).await;
        if matches!(
            l["tasks"][0]["status"].as_str(),
            Some("COMPLETED" | "SUCCEEDED")
        ) {
            break l;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "never done: {l}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let result_file = last["tasks"][0]["result_file"].as_str().unwrap().to_owned();
    assert_eq!(std::fs::read_to_string(&result_file).unwrap(), "5");
    // The text form says where the results are too.
    let listed = run_captured(&["--socket", &a.sock, "tasks", "list", "--type", "submitted"]).await;
    assert!(listed.stdout.contains(&result_file), "{}", listed.stdout);

    // Unknown and malformed IDs are errors with codes.
    assert_eq!(b.err(&["tasks", "accept", "../../x"]).await, "bad_request");
    assert_eq!(
        b.err(&["tasks", "accept", "00000000-0000-4000-8000-000000000000"])
            .await,
        "not_found"
    );
}

/// A minimal HTTP endpoint: every POST body (JSON) goes to the channel; answers 200.
async fn hook_server() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // Parse every complete request in the buffer.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse().unwrap())
                            .unwrap_or(0);
                        if buf.len() < end + 4 + len {
                            break;
                        }
                        let body = buf[end + 4..end + 4 + len].to_vec();
                        buf.drain(..end + 4 + len);
                        let _ = tx.send(serde_json::from_slice(&body).unwrap());
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .await
                            .unwrap();
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_events_reach_the_configured_url() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start(&reg, &dir.path().join("a"), true).await;
    let b = start(&reg, &dir.path().join("b"), true).await;
    let (url, mut events) = hook_server().await;
    let set = b.ok(&["webhook", &url]).await;
    assert_eq!(set["webhook"], url.as_str());

    a.ok(&["send-message", &b.addr(), "for the hook"]).await;
    a.ok(&["send", &b.addr(), "5000", "--datagram", "dgram"])
        .await;
    let want = ["conn.established", "message.received", "data.datagram"];
    let mut seen = Vec::new();
    while !want.iter().all(|w| seen.iter().any(|s: &String| s == w)) {
        let ev = tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .unwrap_or_else(|_| panic!("events so far: {seen:?}"))
            .unwrap();
        assert_eq!(ev["node_id"], b.id, "{ev}");
        assert!(ev["timestamp"].as_str().unwrap().ends_with('Z'), "{ev}");
        if ev["event"] == "data.datagram" {
            assert_eq!(ev["data"]["dst_port"], 5000, "{ev}");
            assert_eq!(ev["data"]["size"], 5, "{ev}");
        }
        if ev["event"] == "message.received" {
            assert_eq!(ev["data"]["type"], "TEXT");
            assert_eq!(ev["data"]["from"], a.addr().as_str());
            assert_eq!(ev["data"]["size"], 12);
        }
        seen.push(ev["event"].as_str().unwrap().to_owned());
    }
    let info = b.ok(&["info"]).await;
    assert!(
        info["webhook"]["delivered"].as_u64().unwrap() >= 2,
        "{info}"
    );
    assert_eq!(
        b.err(&["webhook", "https://example.com/x"]).await,
        "bad_request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_with_token_and_invite_rules() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let owner = start(&reg, &dir.path().join("o"), true).await;
    let p = start(&reg, &dir.path().join("p"), true).await;

    // Token: the right token joins, a wrong one is refused.
    let net = owner
        .ok(&[
            "networks",
            "create",
            "tok",
            "--join-rule",
            "token",
            "--token",
            "s3cret",
        ])
        .await;
    let id = net["id"].as_u64().unwrap().to_string();
    let bad = p.err(&["networks", "join", &id, "--token", "wrong"]).await;
    assert!(bad == "refused" || bad == "bad_request", "{bad}");
    let ok = p.ok(&["networks", "join", &id, "--token", "s3cret"]).await;
    assert_eq!(ok["node_id"], p.id);

    // Invite: joining without an invitation is refused; after one, it works.
    let net = owner
        .ok(&["networks", "create", "inv", "--join-rule", "invite"])
        .await;
    let id = net["id"].as_u64().unwrap().to_string();
    let refused = p
        .err(&["networks", "join", &id, "--inviter", &owner.addr()])
        .await;
    assert!(
        refused == "refused" || refused == "bad_request",
        "{refused}"
    );
    owner.ok(&["networks", "invite", &id, &p.addr()]).await;
    let ok = p
        .ok(&["networks", "join", &id, "--inviter", &owner.addr()])
        .await;
    assert_eq!(ok["node_id"], p.id);
    let list = p.ok(&["networks", "list"]).await;
    assert!(list["networks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["name"] == "inv"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_key_keeps_the_address_and_peers_follow() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let home_a = dir.path().join("a");
    let a = start(&reg, &home_a, true).await;
    let b = start(&reg, &dir.path().join("b"), true).await;
    // B holds A's key and a session with A before the rotation.
    assert_eq!(
        b.ok(&["ping", &a.addr(), "-c", "1"]).await["summary"]["received"],
        1
    );
    let old = a.ok(&["info"]).await["public_key"]
        .as_str()
        .unwrap()
        .to_owned();

    let r = a.ok(&["rotate-key"]).await;
    assert_eq!(r["node_id"], a.id);
    let new = r["public_key"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(a.ok(&["info"]).await["public_key"], new.as_str());
    assert_eq!(
        b.ok(&["lookup", &a.addr()]).await["public_key"],
        new.as_str()
    );
    let on_disk = tunnel::Identity::load(&home_a.join("identity.json")).unwrap();
    assert_eq!(on_disk.public_key_base64(), new);
    assert!(!home_a.join("identity.json.next").exists());

    // Both directions work again: A's tunnels were re-keyed under the new key, and B looks
    // up A's key again when A's key exchange no longer verifies against the cached one.
    let ping = b
        .ok(&["ping", &a.addr(), "-c", "3", "--timeout", "5s"])
        .await;
    assert!(ping["summary"]["received"].as_u64().unwrap() >= 1, "{ping}");
    let ping = a
        .ok(&["ping", &b.addr(), "-c", "2", "--timeout", "5s"])
        .await;
    assert!(ping["summary"]["received"].as_u64().unwrap() >= 1, "{ping}");

    // A restart keeps the node ID and the new key.
    let id = a.id;
    a.node.shutdown().await;
    let a = start(&reg, &home_a, true).await;
    assert_eq!(a.id, id);
    assert_eq!(a.ok(&["info"]).await["public_key"], new.as_str());
    assert_eq!(
        b.ok(&["ping", &a.addr(), "-c", "2", "--timeout", "5s"])
            .await["summary"]["received"]
            .as_u64()
            .map(|n| n >= 1),
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_its_own_address() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    // Private: its own traffic needs no trust.
    let a = start(&reg, &dir.path().join("a"), false).await;
    let ping = a.ok(&["ping", &a.addr(), "-c", "2"]).await;
    assert_eq!(ping["summary"]["received"], 2, "{ping}");
    let m = a.ok(&["send-message", &a.addr(), "note to self"]).await;
    assert_eq!(m["ack"], "ACK TEXT 12 bytes");
    let inbox = a.ok(&["inbox"]).await;
    assert_eq!(inbox["messages"][0]["data"], "note to self", "{inbox}");
    assert_eq!(inbox["messages"][0]["from"], a.addr().as_str());
    let bench = a.ok(&["bench", &a.addr(), "--size", "8M"]).await;
    assert_eq!(bench["recv_bytes"], 8 << 20);
    let info = a.ok(&["info"]).await;
    assert_eq!(info["peers"], 0, "no tunnel to ourselves: {info}");
}

/// The ULA of a node in network 0, as `pilotd up` shows it to the host.
fn ula_of(node: u32) -> String {
    tunnel::ula::to_ipv6(Addr::new(0, node)).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whois_and_status_name_peers_their_trust_and_connections() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    // A runs without an echo service; B answers on port 7.
    let a = start_with(&reg, &dir.path().join("a"), true, true).await;
    let b = start(&reg, &dir.path().join("b"), true).await;
    let a_name = format!("whois-a-{}", a.id);
    let b_name = format!("whois-b-{}", b.id);
    a.ok(&["set-hostname", &a_name]).await;
    b.ok(&["set-hostname", &b_name]).await;
    let a_key = a.ok(&["info"]).await["public_key"].clone();

    // By hostname and by ULA, B learns who A is; no trust yet.
    let by_name = b.ok(&["whois", &a_name]).await;
    assert_eq!(by_name["node_id"], a.id);
    assert_eq!(by_name["address"], a.addr());
    assert_eq!(by_name["ula"], ula_of(a.id));
    assert_eq!(by_name["hostname"], a_name.as_str());
    assert_eq!(by_name["public_key"], a_key);
    assert_eq!(by_name["key_fingerprint"].as_str().unwrap().len(), 32);
    assert_eq!(by_name["visibility"], "public");
    assert_eq!(by_name["self"], false);
    assert_eq!(by_name["trust"]["trusted"], false);
    assert_eq!(by_name["port"], Value::Null);
    let by_ula = b.ok(&["whois", &ula_of(a.id)]).await;
    assert_eq!(by_ula, by_name);
    let me = a.ok(&["whois", &a.id.to_string()]).await;
    assert_eq!(me["self"], true);
    assert_eq!(me["key_fingerprint"], by_name["key_fingerprint"]);

    // A stream from A to B's echo port, held open: stdin stays open until `hold` drops.
    let (mut hold, input) = tokio::io::duplex(64);
    tokio::io::AsyncWriteExt::write_all(&mut hold, b"hello")
        .await
        .unwrap();
    let sock = a.sock.clone();
    let target = format!("{}:7", b.addr());
    let conn = tokio::spawn(async move {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = pilotctl::run(
            ["pilotctl", "--socket", &sock, "connect", &target],
            pilotctl::Io {
                stdin: Box::new(input),
                stdout: &mut out,
                stderr: &mut err,
            },
        )
        .await;
        (status, String::from_utf8_lossy(&out).into_owned())
    });

    // A's status lists B, direct and encrypted, with the open connection and its bytes.
    let counted = |status: &Value| {
        status["peers"].as_array().unwrap().iter().any(|p| {
            p["node_id"] == b.id
                && p["connections"].as_u64() >= Some(1)
                && p["bytes_recv"].as_u64() >= Some(5)
        })
    };
    let t0 = Instant::now();
    let mut status = a.ok(&["status"]).await;
    while !counted(&status) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "A's status never counted the stream to B: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        status = a.ok(&["status"]).await;
    }
    assert_eq!(status["self"]["node_id"], a.id);
    assert_eq!(status["self"]["ula"], ula_of(a.id));
    assert_eq!(status["self"]["hostname"], a_name.as_str());
    let peers = status["peers"].as_array().unwrap();
    let ids: Vec<u64> = peers
        .iter()
        .map(|p| p["node_id"].as_u64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{status}");
    let pb = peers.iter().find(|p| p["node_id"] == b.id).unwrap();
    assert_eq!(pb["hostname"], b_name.as_str());
    assert_eq!(pb["ula"], ula_of(b.id));
    assert_eq!(pb["path"], "direct");
    assert_eq!(pb["encrypted"], true);
    assert!(pb["bytes_sent"].as_u64().unwrap() >= 5, "{pb}");
    let text = run_captured(&["--socket", &a.sock, "status"]).await;
    assert_eq!(text.status, 0);
    let line = text.stdout.lines().find(|l| l.contains(&b_name)).unwrap();
    assert!(line.starts_with(&ula_of(b.id)) && line.contains("direct 127.0.0.1:"));

    // On A, [B's ULA]:7 names the connection; on B, [A's ULA]:<A's port> names the same one
    // from the other side, as a service on B would see its caller.
    let out = a.ok(&["whois", &format!("[{}]:7", ula_of(b.id))]).await;
    assert_eq!(out["node_id"], b.id);
    assert_eq!(out["port"], 7);
    assert_eq!(out["tunnel"]["path"], "direct");
    let conns = out["connections"].as_array().unwrap();
    let open = conns
        .iter()
        .find(|c| {
            c["state"]
                .as_str()
                .unwrap()
                .eq_ignore_ascii_case("established")
        })
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(open["remote_port"], 7);
    let a_port = open["local_port"].as_u64().unwrap();
    let caller = format!("[{}]:{a_port}", ula_of(a.id));
    let seen = b.ok(&["whois", &caller]).await;
    assert_eq!(seen["node_id"], a.id);
    assert_eq!(seen["hostname"], a_name.as_str());
    let c = seen["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["state"]
                .as_str()
                .unwrap()
                .eq_ignore_ascii_case("established")
        })
        .unwrap_or_else(|| panic!("{seen}"))
        .clone();
    assert_eq!(c["local_port"], 7);
    assert_eq!(c["remote_port"], a_port);
    assert_eq!(seen["tunnel"]["encrypted"], true);
    let text = run_captured(&["--socket", &b.sock, "whois", &caller]).await;
    assert_eq!(text.status, 0, "{}", text.stderr);
    assert!(text.stdout.contains(&a_name) && text.stdout.contains("not trusted"));

    if std::env::var_os("PILOTCTL_SHOW_TEXT").is_some() {
        for (sock, args) in [
            (&a.sock, vec!["status"]),
            (&b.sock, vec!["whois", caller.as_str()]),
            (&a.sock, vec!["whois", a_name.as_str()]),
        ] {
            let mut all = vec!["--socket", sock.as_str()];
            all.extend_from_slice(&args);
            let out = run_captured(&all).await;
            println!(
                "$ pilotctl {}\n{}{}",
                args.join(" "),
                out.stdout,
                out.stderr
            );
        }
    }

    drop(hold);
    let (code, echoed) = conn.await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(echoed, "hello");

    // Trust: A asks, B approves, B's whois of A says so.
    a.ok(&["handshake", &b.addr(), "whois", "test"]).await;
    eventually("A's request to reach B", || async {
        has_node(&b.ok(&["pending"]).await["pending"], a.id)
    })
    .await;
    b.ok(&["approve", &a.addr()]).await;
    let after = b.ok(&["whois", &a_name]).await;
    assert_eq!(after["trust"]["trusted"], true, "{after}");
    assert!(after["trust"]["approved_at"].as_i64().unwrap() > 0);

    // Unknown nodes and names; bad input.
    assert_eq!(b.err(&["whois", "0:0000.00FF.FFF0"]).await, "not_found");
    assert_eq!(b.err(&["whois", "no-such-host-whois"]).await, "not_found");
    assert_eq!(b.err(&["whois", "fd00::1"]).await, "bad_address");
    assert_eq!(
        b.err(&["whois", "[fd06:3fcd:b33d::2a]:x"]).await,
        "bad_address"
    );

    a.node.shutdown().await;
    b.node.shutdown().await;
}

/// `a` asks `b` for trust and `b` approves; returns once `a` knows.
async fn pair(a: &TestNode, b: &TestNode) {
    a.ok(&["handshake", &b.addr(), "pair"]).await;
    eventually("the request to reach b", || async {
        has_node(&b.ok(&["pending"]).await["pending"], a.id)
    })
    .await;
    b.ok(&["approve", &a.id.to_string()]).await;
    eventually("a to learn of the approval", || async {
        has_node(&a.ok(&["trust"]).await["trusted"], b.id)
    })
    .await;
}

/// One condition, one code: every command aimed at a node the registry does not know says
/// `not_found` at once, whichever service it uses; a private peer that revoked trust answers
/// a new stream with `untrusted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_condition_one_code() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start(&reg, &dir.path().join("a"), false).await;
    let b = start(&reg, &dir.path().join("b"), false).await;

    let ghost = Addr::new(0, 99).to_string();
    for args in [
        vec!["ping", ghost.as_str(), "--count", "1"],
        vec!["send-message", ghost.as_str(), "hello"],
        vec!["lookup", ghost.as_str()],
        vec!["find", ghost.as_str()],
        vec!["whois", ghost.as_str()],
        vec!["handshake", ghost.as_str(), "please"],
        vec!["connect", ghost.as_str(), "--message", "hi"],
        vec!["bench", ghost.as_str(), "--size", "1K"],
    ] {
        let started = Instant::now();
        assert_eq!(a.err(&args).await, "not_found", "pilotctl {args:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "pilotctl {args:?} took {:?}",
            started.elapsed()
        );
    }
    // Failed attempts leave no peer behind.
    let peers = a.ok(&["peers"]).await;
    assert!(!has_node(&peers["peers"], 99), "{peers}");

    // Trust both ways, then B revokes: A's next stream is refused as untrusted.
    pair(&a, &b).await;
    a.ok(&["send-message", &b.addr(), "before"]).await;
    b.ok(&["untrust", &a.addr()]).await;
    eventually("a to learn of the revocation", || async {
        !has_node(&a.ok(&["trust"]).await["trusted"], b.id)
    })
    .await;
    assert_eq!(
        a.err(&["send-message", &b.addr(), "after"]).await,
        "untrusted"
    );
    // Trust given again: messages flow.
    pair(&a, &b).await;
    a.ok(&["send-message", &b.addr(), "again"]).await;
    a.node.shutdown().await;
    b.node.shutdown().await;
}

/// `info` says whether the registry link is up, and why not when it is down, instead of a
/// node that silently shows node 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_reports_the_registry_link() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let up = start(&reg, &dir.path().join("up"), false).await;
    let info = up.ok(&["info"]).await;
    assert_eq!(info["registry"]["connected"], true, "{info}");

    // A registry address where nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap().to_string();
    drop(closed);
    let home = dir.path().join("down");
    let sock = home.join("pilotd.sock");
    let cli = Cli {
        registry: vec![nowhere],
        beacon: Some(String::new()),
        listen: Some("127.0.0.1:0".into()),
        home: Some(home.clone()),
        socket: Some(sock.clone()),
        ..Cli::default()
    };
    let node = Node::start(&cli.resolve().unwrap()).await.unwrap();
    let sock = sock.to_string_lossy().into_owned();
    let mut last = Value::Null;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        let out = run_captured(&["--json", "--socket", &sock, "info"]).await;
        last = out.json();
        if last["data"]["registry"]["error"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last["data"]["registry"]["connected"], false, "{last}");
    assert!(
        last["data"]["registry"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{last}"
    );
    let text = run_captured(&["--socket", &sock, "info"]).await;
    assert!(text.stdout.contains("NOT CONNECTED"), "{}", text.stdout);
    node.shutdown().await;
    up.node.shutdown().await;
}

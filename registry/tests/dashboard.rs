#![allow(clippy::unwrap_used)]
//! The dashboard through the binary: a pilot-registry process with `--http`, a few hundred
//! nodes registered over the protocol, three networks and 75 trust pairs; `/api/stats` read
//! over HTTP, and `/` loaded in headless Chromium (Debian's `chromium`), whose DOM must show
//! the counts and the drawn trust graph. The screenshot is kept under the target directory
//! and its path printed. Without Chromium the test fails (scripts/setup.sh installs it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use pilot_registry::auth::b64;
use pilot_registry_client::{sign_v1, Client};
use serde_json::{json, Value};

const NODES: u32 = 300;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The registry process, killed when dropped.
struct RegistryProcess(Child);

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_registry(addr: SocketAddr, http: SocketAddr) -> RegistryProcess {
    let child = Command::new(env!("CARGO_BIN_EXE_pilot-registry"))
        .args(["--addr", &addr.to_string(), "--ephemeral"])
        .args(["--http", &http.to_string()])
        .args(["--register-per-minute", "0", "--requests-per-ip", "0"])
        .args(["--requests-per-node", "0", "--log-level", "warn"])
        .env_remove("PILOT_REGISTRY_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    RegistryProcess(child)
}

fn key(i: u32) -> SigningKey {
    let mut seed = [0xD5u8; 32];
    seed[..4].copy_from_slice(&i.to_be_bytes());
    SigningKey::from_bytes(&seed)
}

fn address(node: u32) -> String {
    format!("0:0000.{:04X}.{:04X}", node >> 16, node & 0xFFFF)
}

async fn connect(addr: SocketAddr) -> Client<tokio::net::TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Client::connect(addr).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("registry did not start: {e}"),
        }
    }
}

/// `GET path` over HTTP/1.1: (head, body).
fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("HTTP listener {addr}: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.to_ascii_lowercase(), body.to_owned())
}

/// What the test registered, to compare with what the registry and the page show.
struct Fixture {
    ids: Vec<u32>,
    /// (network name, member node IDs).
    networks: Vec<(String, Vec<u32>)>,
    /// Trust pairs by node ID.
    pairs: Vec<(u32, u32)>,
    tags: Vec<&'static str>,
    task_executors: usize,
}

async fn populate(c: &mut Client<tokio::net::TcpStream>) -> Fixture {
    let mut ids = Vec::new();
    for i in 0..NODES {
        let r = c
            .call(&json!({"type": "register", "listen_addr": "0.0.0.0:4000",
                "public_key": b64(key(i).verifying_key().as_bytes())}))
            .await
            .unwrap();
        ids.push(r["node_id"].as_u64().unwrap() as u32);
    }
    let (mut tags, mut task_executors) = (Vec::new(), 0);
    for (i, &id) in ids.iter().enumerate() {
        let k = key(i as u32);
        let t: Vec<&'static str> = match i % 30 {
            0 => vec!["gpu", "vision"],
            10 => vec!["gpu"],
            20 => vec!["storage"],
            _ => continue,
        };
        tags.extend(&t);
        c.call(&json!({"type": "set_tags", "node_id": id, "tags": t,
            "signature": sign_v1(&k, &format!("set_tags:{id}"))}))
            .await
            .unwrap();
        if i % 60 == 0 {
            c.call(
                &json!({"type": "set_task_exec", "node_id": id, "enabled": true,
                "signature": sign_v1(&k, &format!("set_task_exec:{id}"))}),
            )
            .await
            .unwrap();
            task_executors += 1;
        }
    }
    tags.sort_unstable();
    tags.dedup();
    // Networks "alpha", "beta", "gamma": created by the first of their members.
    let mut networks = Vec::new();
    for (name, members) in [
        ("alpha", 0..60usize),
        ("beta", 100..140),
        ("gamma", 200..220),
    ] {
        let creator = ids[members.start];
        let k = key(members.start as u32);
        let r = c
            .call(
                &json!({"type": "create_network", "node_id": creator, "name": name,
                "join_rule": "open",
                "signature": sign_v1(&k, &format!("create_network:{creator}:{name}"))}),
            )
            .await
            .unwrap();
        let net = r["network_id"].as_u64().unwrap() as u16;
        for i in members.clone().skip(1) {
            let id = ids[i];
            c.call(
                &json!({"type": "join_network", "node_id": id, "network_id": net,
                "signature": sign_v1(&key(i as u32), &format!("join_network:{id}:{net}"))}),
            )
            .await
            .unwrap();
        }
        networks.push((name.to_owned(), members.map(|i| ids[i]).collect()));
    }
    // Trust: a ring of 40, a star of 20 around node 50, 15 separate pairs from node 100 on.
    let mut pairs: Vec<(usize, usize)> = (0..40).map(|i| (i, (i + 1) % 40)).collect();
    pairs.extend((51..71).map(|i| (50, i)));
    pairs.extend((0..15).map(|k| (100 + 2 * k, 101 + 2 * k)));
    for &(a, b) in &pairs {
        for (me, peer) in [(a, b), (b, a)] {
            let (mid, pid) = (ids[me], ids[peer]);
            let r = c
                .call(
                    &json!({"type": "report_trust", "node_id": mid, "peer_id": pid,
                    "signature": sign_v1(&key(me as u32), &format!("report_trust:{mid}:{pid}"))}),
                )
                .await
                .unwrap();
            assert_eq!(r["mutual"], me == b, "{r}");
        }
    }
    let pairs = pairs.into_iter().map(|(a, b)| (ids[a], ids[b])).collect();
    Fixture {
        ids,
        networks,
        pairs,
        tags,
        task_executors,
    }
}

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("PILOT_CHROMIUM") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "FAIL: chromium not found in PATH (nor PILOT_CHROMIUM set): this test loads the \
        dashboard in headless Chromium. Install Debian's package: `apt-get install chromium` \
        (scripts/setup.sh does, as root)"
    );
}

/// Runs headless Chromium on `url` with `args`, giving up after 120 s.
fn run_chromium(browser: &Path, profile: &Path, url: &str, args: &[String]) -> Output {
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            // Let the page fetch /api/stats and run its scripts before the DOM or the picture
            // is taken.
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("FAIL: starting chromium: {e}"));
    let deadline = Instant::now() + Duration::from_secs(120);
    // Drain stdout on a thread so a large DOM cannot fill the pipe while we wait.
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("FAIL: chromium did not finish within 120 s ({args:?})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut stderr = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_end(&mut stderr);
    }
    let status = child.wait().unwrap();
    Output {
        status,
        stdout: reader.join().unwrap(),
        stderr,
    }
}

/// The text of the element with `id` in a serialized DOM (no nested elements expected).
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the DOM"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap();
    &rest[start..start + end]
}

#[tokio::test]
async fn dashboard_in_headless_chromium_shows_counts_and_draws_the_trust_graph() {
    let browser = chromium();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _registry = spawn_registry(addr, http);
    let mut c = connect(addr).await;
    let f = populate(&mut c).await;
    let n = f.ids.len() as u64;

    // /api/stats: v1's fields, CORS, the registered state, no IPs or keys.
    let (head, body) = http_get(http, "/api/stats");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let s: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["total_nodes"], n);
    assert_eq!(s["active_nodes"], n);
    assert_eq!(s["total_trust_links"], f.pairs.len());
    assert_eq!(s["unique_tags"], f.tags.len());
    assert_eq!(s["task_executors"], f.task_executors);
    assert!(s["total_requests"].as_u64().unwrap() >= n);
    assert!(s["uptime_secs"].is_u64());
    let nets = s["networks"].as_array().unwrap();
    assert_eq!(nets.len(), 1 + f.networks.len());
    assert_eq!(
        nets[0],
        json!({"id": 0, "name": "backbone", "members": n, "online_members": n})
    );
    for (net, (name, members)) in nets[1..].iter().zip(&f.networks) {
        assert_eq!(net["name"], name.as_str());
        assert_eq!(net["members"], members.len());
        assert_eq!(net["online_members"], members.len());
    }
    let nodes = s["nodes"].as_array().unwrap();
    assert_eq!(nodes.len() as u64, n);
    let mut want: Vec<String> = f.ids.iter().map(|id| address(*id)).collect();
    want.sort();
    let got: Vec<&str> = nodes
        .iter()
        .map(|n| n["address"].as_str().unwrap())
        .collect();
    assert_eq!(got, want, "nodes sorted by address");
    let mut edges: Vec<(String, String)> = f
        .pairs
        .iter()
        .map(|&(a, b)| (address(a.min(b)), address(a.max(b))))
        .collect();
    edges.sort();
    let got: Vec<(String, String)> = s["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap().to_owned(),
                e["target"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, edges);
    assert!(!body.contains("127.0.0.1"), "an IP in /api/stats");
    for i in 0..NODES {
        assert!(
            !body.contains(&b64(key(i).verifying_key().as_bytes())),
            "a key in /api/stats"
        );
    }
    // /metrics is still served on the same listener.
    let (head, metrics) = http_get(http, "/metrics");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        metrics.contains(&format!("pilot_nodes_total {n}")),
        "{metrics}"
    );
    let (head, page) = http_get(http, "/");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-security-policy: default-src 'none'"));
    // Nothing to fetch but /api/stats: no script, style or image source, no URL but the SVG
    // namespace.
    for external in ["https://", "src=", "href=", "@import", "url("] {
        assert!(!page.contains(external), "the page refers to {external}");
    }
    assert_eq!(
        page.matches("http://").count(),
        page.matches("http://www.w3.org/2000/svg").count(),
        "the page names a URL"
    );

    // The page in headless Chromium, after its scripts ran.
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{http}/");
    let out = run_chromium(&browser, profile.path(), &url, &["--dump-dom".into()]);
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("data-ready=\"true\""),
        "the page did not render /api/stats (status {}); DOM:\n{dom}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text_of(&dom, "nodes-online"), n.to_string());
    assert_eq!(text_of(&dom, "nodes-total"), n.to_string());
    assert_eq!(text_of(&dom, "trust-links"), f.pairs.len().to_string());
    assert_eq!(
        text_of(&dom, "networks-count"),
        (1 + f.networks.len()).to_string()
    );
    assert_eq!(text_of(&dom, "unique-tags"), f.tags.len().to_string());
    assert_eq!(
        text_of(&dom, "task-executors"),
        f.task_executors.to_string()
    );
    let requests: u64 = text_of(&dom, "requests-total")
        .replace(',', "")
        .parse()
        .unwrap();
    assert!(requests >= n, "requests shown: {requests}");
    // Networks with their members.
    for (name, members) in &f.networks {
        assert!(
            dom.contains(&format!(">{name}<")),
            "network {name} not shown"
        );
        assert!(
            dom.contains(&format!("{} members", members.len())),
            "{name}'s member list not shown"
        );
        for m in members {
            assert!(dom.contains(&address(*m)), "member {m} of {name} not shown");
        }
    }
    // The trust graph: one circle per node with a trust link, one line per pair.
    let mut drawn: Vec<u32> = f.pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
    drawn.sort_unstable();
    drawn.dedup();
    let g_at = dom.find("<svg id=\"graph\"").expect("no graph in the DOM");
    let graph = &dom[g_at..g_at + dom[g_at..].find("</svg>").unwrap()];
    assert!(
        graph.contains(&format!("data-drawn-nodes=\"{}\"", drawn.len())),
        "{graph}"
    );
    assert!(
        graph.contains(&format!("data-drawn-edges=\"{}\"", f.pairs.len())),
        "{graph}"
    );
    assert_eq!(graph.matches("<circle").count(), drawn.len());
    assert_eq!(graph.matches("<line").count(), f.pairs.len());
    for id in &drawn {
        assert!(graph.contains(&format!("data-address=\"{}\"", address(*id))));
    }
    assert!(!dom.contains("127.0.0.1"), "an IP in the page");
    println!(
        "dashboard DOM: {n} nodes online of {n}, {} trust links, {} networks; graph: {} circles, {} lines",
        f.pairs.len(),
        1 + f.networks.len(),
        drawn.len(),
        f.pairs.len()
    );

    // The picture.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = run_chromium(
        &browser,
        profile.path(),
        &url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1400,1800".into(),
        ],
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {} ({e}); chromium status {}, stderr:\n{}",
            shot.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // A blank page compresses to a few kilobytes; the dashboard with its graph and tables
    // does not.
    assert!(png.len() > 30_000, "screenshot of {} bytes", png.len());
    println!("dashboard screenshot: {}", shot.display());
}

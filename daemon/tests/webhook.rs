//! The webhook poster against small HTTP servers on loopback.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pilotd::events::{Events, EVENT_QUEUE};
use pilotd::webhook::{
    rfc3339_nano, UrlError, Webhook, WebhookConfig, WebhookHandle, WebhookStats, WebhookUrl,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// What the test server does with a request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// 200 with an empty body, connection kept.
    Ok,
    /// This status with an empty body, connection kept.
    Status(u16),
    /// 200 with `Connection: close`, then closes.
    Close,
    /// Answers the first request of each connection; closes on the second without answering.
    OnePerConn,
    /// Sends a head announcing a 10-byte body, 2 bytes of it, then nothing more.
    SlowBody,
    /// Never answers on the first connection; answers on later ones.
    HangFirst,
    /// Never answers.
    Hang,
}

/// One request as the server saw it.
#[derive(Debug)]
struct Req {
    conn: usize,
    line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

struct Server {
    url: String,
    addr: String,
    reqs: mpsc::UnboundedReceiver<Req>,
    conns: Arc<AtomicUsize>,
}

impl Server {
    async fn start(mode: Mode) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (tx, reqs) = mpsc::unbounded_channel();
        let conns = Arc::new(AtomicUsize::new(0));
        let count = conns.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_conn(s, n, mode, tx.clone()));
            }
        });
        Server {
            url: format!("http://{addr}/hook"),
            addr,
            reqs,
            conns,
        }
    }

    async fn next(&mut self) -> Req {
        tokio::time::timeout(Duration::from_secs(10), self.reqs.recv())
            .await
            .expect("no request within 10 s")
            .unwrap()
    }

    /// Asserts nothing more arrives within a short while.
    async fn quiet(&mut self) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(r) = self.reqs.try_recv() {
            panic!("unexpected request {r:?}");
        }
    }

    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

async fn read_request(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(String, Vec<(String, String)>, Vec<u8>)> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..end].to_vec()).unwrap();
    buf.drain(..end + 4);
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap().to_owned();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.to_owned(), v.trim().to_owned())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap());
    while buf.len() < len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf.drain(..len).collect();
    Some((line, headers, body))
}

async fn serve_conn(mut s: TcpStream, conn: usize, mode: Mode, tx: mpsc::UnboundedSender<Req>) {
    let mut buf = Vec::new();
    let mut served = 0;
    while let Some((line, headers, body)) = read_request(&mut s, &mut buf).await {
        let _ = tx.send(Req {
            conn,
            line,
            headers,
            body,
        });
        served += 1;
        let answer = match mode {
            Mode::Ok => "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_owned(),
            Mode::Status(code) => format!("HTTP/1.1 {code} Nope\r\nContent-Length: 4\r\n\r\nnope"),
            Mode::Close => {
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok".to_owned()
            }
            Mode::SlowBody => "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok".to_owned(),
            Mode::OnePerConn if served > 1 => return,
            Mode::OnePerConn => "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_owned(),
            Mode::HangFirst | Mode::Hang if mode == Mode::Hang || conn == 0 => {
                // Hold the connection open without answering.
                std::future::pending::<()>().await;
                return;
            }
            Mode::HangFirst | Mode::Hang => {
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_owned()
            }
        };
        if s.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        if mode == Mode::Close {
            return;
        }
    }
}

fn start(url: &str, timeout: Duration) -> (Events, WebhookHandle) {
    let (events, rx) = Events::channel();
    let (_node_tx, node_rx) = watch::channel(42u32);
    let hook = Webhook::start_with(
        rx,
        Some(WebhookUrl::parse(url).unwrap()),
        node_rx,
        WebhookConfig { timeout },
    );
    (events, hook)
}

async fn wait_stats(hook: &WebhookHandle, want: impl Fn(WebhookStats) -> bool) -> WebhookStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = hook.stats();
        if want(s) {
            return s;
        }
        assert!(Instant::now() < deadline, "stats stuck at {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn events_arrive_as_v1_json_posts() {
    let mut srv = Server::start(Mode::Ok).await;
    let (events, rx) = Events::channel();
    let (node_tx, node_rx) = watch::channel(0u32);
    let url = format!("{}?token=abc", srv.url);
    let hook = Webhook::start(rx, Some(WebhookUrl::parse(&url).unwrap()), node_rx);
    node_tx.send(42).unwrap();
    let before = rfc3339_nano(SystemTime::now());
    events.emit(
        "message.received",
        json!({"type": "text", "from": "0:0000.0000.0001", "size": 5}),
    );
    events.emit_bare("node.deregistered");

    let r = srv.next().await;
    let after = rfc3339_nano(SystemTime::now());
    assert_eq!(r.line, "POST /hook?token=abc HTTP/1.1");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("host"), Some(srv.addr.as_str()));
    let v = r.json();
    let ts = v["timestamp"].as_str().unwrap().to_owned();
    assert_eq!(
        v,
        json!({"event": "message.received", "node_id": 42, "timestamp": ts,
               "data": {"type": "text", "from": "0:0000.0000.0001", "size": 5}})
    );
    // RFC 3339 UTC, within the emission window (fixed width up to the seconds).
    assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    assert!(
        before[..19] <= ts[..19] && ts[..19] <= after[..19],
        "{before} {ts} {after}"
    );

    let r = srv.next().await;
    let v = r.json();
    assert_eq!(v["event"], "node.deregistered");
    assert_eq!(v["node_id"], 42);
    assert_eq!(v.as_object().unwrap().len(), 3, "no data key: {v}");

    let s = wait_stats(&hook, |s| s.delivered == 2).await;
    assert_eq!((s.failed, s.discarded), (0, 0));
    assert_eq!(srv.conns(), 1, "the connection is kept between posts");
    assert_eq!(hook.url().as_deref(), Some(url.as_str()));
    let j = hook.to_json(&events);
    assert_eq!(j["delivered"], 2);
    assert_eq!(j["dropped"], 0);
}

#[tokio::test]
async fn a_url_change_redirects_and_clearing_discards() {
    let mut a = Server::start(Mode::Ok).await;
    let mut b = Server::start(Mode::Ok).await;
    let (events, hook) = start(&a.url, Duration::from_secs(5));
    events.emit(
        "pubsub.published",
        json!({"topic": "t", "size": 1, "from": "x"}),
    );
    assert_eq!(a.next().await.json()["event"], "pubsub.published");
    wait_stats(&hook, |s| s.delivered == 1).await;

    hook.set(&b.url).unwrap();
    events.emit_bare("node.deregistered");
    assert_eq!(b.next().await.json()["event"], "node.deregistered");
    a.quiet().await;
    assert_eq!(hook.url().as_deref(), Some(b.url.as_str()));

    hook.set("").unwrap();
    assert_eq!(hook.url(), None);
    events.emit_bare("node.deregistered");
    events.emit_bare("node.deregistered");
    let s = wait_stats(&hook, |s| s.discarded == 2).await;
    assert_eq!((s.delivered, s.failed), (2, 0));
    a.quiet().await;
    b.quiet().await;

    hook.set(&a.url).unwrap();
    events.emit_bare("trust.revoked");
    assert_eq!(a.next().await.json()["event"], "trust.revoked");
}

#[tokio::test]
async fn a_hung_server_blocks_neither_emitters_nor_later_deliveries() {
    let mut srv = Server::start(Mode::HangFirst).await;
    let timeout = Duration::from_millis(500);
    let (events, hook) = start(&srv.url, timeout);
    let t0 = Instant::now();
    events.emit("conn.established", json!({"n": 0}));
    let first = srv.next().await;
    assert_eq!(
        (first.conn, first.json()["data"]["n"].clone()),
        (0, json!(0))
    );
    // The first delivery now hangs; emitting does not wait for it.
    let e0 = Instant::now();
    for n in 1..=50 {
        events.emit("conn.established", json!({"n": n}));
    }
    assert!(
        e0.elapsed() < Duration::from_millis(100),
        "{:?}",
        e0.elapsed()
    );
    for n in 1..=50 {
        let r = srv.next().await;
        assert_eq!((r.conn, r.json()["data"]["n"].clone()), (1, json!(n)));
    }
    let took = t0.elapsed();
    assert!(took >= timeout, "{took:?}");
    assert!(took < timeout + Duration::from_secs(3), "{took:?}");
    let s = wait_stats(&hook, |s| s.delivered == 50).await;
    assert_eq!(s.failed, 1);
    assert_eq!(events.dropped(), 0);
}

#[tokio::test]
async fn a_url_change_cancels_a_hung_delivery() {
    let mut hung = Server::start(Mode::Hang).await;
    let mut good = Server::start(Mode::Ok).await;
    let (events, hook) = start(&hung.url, Duration::from_secs(30));
    events.emit_bare("node.deregistered");
    hung.next().await;
    let t0 = Instant::now();
    hook.set(&good.url).unwrap();
    events.emit_bare("trust.revoked");
    assert_eq!(good.next().await.json()["event"], "trust.revoked");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let s = wait_stats(&hook, |s| s.delivered == 1).await;
    assert_eq!(s.failed, 1);
}

#[tokio::test]
async fn bad_urls_are_refused_and_the_old_one_stays() {
    let mut srv = Server::start(Mode::Ok).await;
    let (events, hook) = start(&srv.url, Duration::from_secs(5));
    assert_eq!(hook.set("https://example.com/hook"), Err(UrlError::Https));
    assert_eq!(hook.set("ftp://example.com/"), Err(UrlError::Scheme));
    assert_eq!(hook.set("http://example.com/a b"), Err(UrlError::Chars));
    assert_eq!(
        hook.set("http://user@example.com/"),
        Err(UrlError::UserInfo)
    );
    assert_eq!(
        hook.set("http://example.com:99999/"),
        Err(UrlError::Port("99999".into()))
    );
    assert!(UrlError::Scheme
        .to_string()
        .contains("http://host[:port]/path"));
    assert!("localhost:80/x".parse::<WebhookUrl>().is_err());
    assert_eq!(hook.url().as_deref(), Some(srv.url.as_str()));
    events.emit_bare("node.deregistered");
    assert_eq!(srv.next().await.json()["event"], "node.deregistered");
}

#[tokio::test]
async fn a_full_queue_drops_and_counts() {
    let mut srv = Server::start(Mode::Hang).await;
    let (events, hook) = start(&srv.url, Duration::from_secs(30));
    events.emit_bare("node.deregistered");
    // The poster has taken that event and waits on the hung server: the queue is empty.
    srv.next().await;
    let t0 = Instant::now();
    for _ in 0..EVENT_QUEUE + 100 {
        events.emit("data.datagram", json!({"size": 1}));
    }
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(events.dropped(), 100);
    assert_eq!(hook.to_json(&events)["dropped"], 100);
    assert_eq!(hook.stats(), WebhookStats::default());
}

#[tokio::test]
async fn error_statuses_count_as_failed() {
    let mut srv = Server::start(Mode::Status(500)).await;
    let (events, hook) = start(&srv.url, Duration::from_secs(5));
    for _ in 0..3 {
        events.emit_bare("node.deregistered");
    }
    for _ in 0..3 {
        srv.next().await;
    }
    let s = wait_stats(&hook, |s| s.failed == 3).await;
    assert_eq!(s.delivered, 0);
    assert_eq!(
        srv.conns(),
        1,
        "an error status with a body keeps the connection"
    );

    let mut srv = Server::start(Mode::Status(302)).await;
    hook.set(&srv.url).unwrap();
    events.emit_bare("node.deregistered");
    srv.next().await;
    wait_stats(&hook, |s| s.delivered == 1).await;
}

#[tokio::test]
async fn closed_connections_are_reopened() {
    for mode in [Mode::Close, Mode::OnePerConn, Mode::SlowBody] {
        let mut srv = Server::start(mode).await;
        let (events, hook) = start(&srv.url, Duration::from_secs(5));
        for n in 1..=5u64 {
            events.emit("conn.fin", json!({"n": n}));
            // Delivered before the next is emitted, so each one meets the previous connection.
            wait_stats(&hook, |s| s.delivered == n).await;
        }
        let mut seen = Vec::new();
        while let Ok(r) = srv.reqs.try_recv() {
            seen.push(r.json()["data"]["n"].as_u64().unwrap());
        }
        assert_eq!(hook.stats().failed, 0, "{mode:?}");
        assert_eq!(srv.conns(), 5, "{mode:?}");
        match mode {
            // A body that never completes closes the connection, but the status counts.
            Mode::Close | Mode::SlowBody => assert_eq!(seen, [1, 2, 3, 4, 5]),
            // Each reused connection takes the request and closes unanswered; it is sent
            // again on a new connection.
            _ => assert_eq!(seen, [1, 2, 2, 3, 3, 4, 4, 5, 5]),
        }
    }
}

#[tokio::test]
async fn drain_waits_for_the_queued_events_and_gives_up_at_its_limit() {
    let srv = Server::start(Mode::Ok).await;
    let (events, hook) = start(&srv.url, Duration::from_secs(5));
    for n in 0..20 {
        events.emit("conn.fin", json!({"n": n}));
    }
    assert!(hook.drain(&events, Duration::from_secs(10)).await);
    assert_eq!(hook.stats().delivered, 20);

    // A server that never answers holds the first event for the post's whole timeout.
    let srv = Server::start(Mode::HangFirst).await;
    let (events, hook) = start(&srv.url, Duration::from_secs(5));
    events.emit_bare("node.deregistered");
    assert!(!hook.drain(&events, Duration::from_millis(200)).await);
    assert_eq!(hook.stats(), WebhookStats::default());
}

use crate::support;

/// A whole node with a webhook: the engine's and the trust service's events arrive as posts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_posts_its_events() {
    use pilotd::config::Cli;
    use pilotd::node::Node;
    let mut srv = Server::start(Mode::Ok).await;
    let reg = support::registry().await;
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str, hook: Option<String>, public: bool| {
        let home = dir.path().join(name);
        let cli = Cli {
            registry: vec![reg.clone()],
            beacon: Some(String::new()),
            listen: Some("127.0.0.1:0".into()),
            socket: Some(home.join("pilotd.sock")),
            home: Some(home),
            public: Some(public),
            webhook: hook,
            ..Cli::default()
        };
        async move { Node::start(&cli.resolve().unwrap()).await.unwrap() }
    };
    let a = start("a", Some(srv.url.clone()), true).await;
    let b = start("b", None, false).await;
    let na = a.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let nb = b.daemon.registered(Duration::from_secs(10)).await.unwrap();

    // B asks A for trust: A posts handshake.received and handshake.pending.
    let d = pilot_driver::Driver::connect(dir.path().join("b").join("pilotd.sock"))
        .await
        .unwrap();
    d.handshake(tunnel::ipc::HandshakeOp::Request {
        node: na,
        justification: "webhook test",
    })
    .await
    .unwrap();

    // And opens a stream to A's echo port, then closes it: conn.established, conn.fin.
    let mut s = d
        .dial(tunnel::SocketAddr::new(tunnel::Addr::new(0, na), 7))
        .await
        .unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    s.shutdown().await.unwrap();
    drop(s);

    let mut names = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let want = [
        "node.registered",
        "handshake.received",
        "handshake.pending",
        "conn.established",
        "conn.fin",
    ];
    while !want.iter().all(|w| names.iter().any(|n| n == w)) {
        assert!(Instant::now() < deadline, "events so far: {names:?}");
        let r = srv.next().await;
        let v = r.json();
        assert_eq!(v["node_id"], na, "{v}");
        let name = v["event"].as_str().unwrap().to_owned();
        match name.as_str() {
            "node.registered" => {
                assert_eq!(v["data"]["address"], tunnel::Addr::new(0, na).to_string())
            }
            "handshake.received" => {
                assert_eq!(v["data"]["peer_node_id"], nb);
                assert_eq!(v["data"]["justification"], "webhook test");
            }
            "conn.established" | "conn.fin" => {
                let port = if name == "conn.fin" {
                    "local_port"
                } else {
                    "dst_port"
                };
                assert!(v["data"][port] == 7 || v["data"][port] == 444, "{v}");
            }
            _ => {}
        }
        names.push(name);
    }
    let info = a.daemon.engine.info().await.unwrap();
    assert!(info.get("refused_syn_rate").is_some());
    a.shutdown().await;
    b.shutdown().await;
}

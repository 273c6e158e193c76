#![allow(clippy::unwrap_used)]
//! The IPC server and the driver library, end to end: a registry and two daemons in one
//! process, each daemon serving its IPC socket on a temporary path, agents talking through
//! the driver (and, for protocol abuse, through raw socket bytes).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pilot_driver::{Driver, DriverError};
use pilotd::config::Cli;
use pilotd::ipc_server::{serve, IpcContext, IpcServer};
use pilotd::node::Daemon;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;
use tunnel::ipc::{self, code, ExtReply, ExtRequest, HandshakeOp, Message};
use tunnel::{Addr, SocketAddr as PilotAddr};

const T: Duration = Duration::from_secs(20);

use crate::support;
use support::registry;

struct Node {
    daemon: Daemon,
    server: IpcServer,
    sock: PathBuf,
    id: u32,
}

async fn node(registry: &str, home: &Path) -> Node {
    let cli = Cli {
        registry: vec![registry.into()],
        beacon: Some(String::new()),
        listen: Some("127.0.0.1:0".into()),
        home: Some(home.into()),
        public: Some(true),
        ..Cli::default()
    };
    let daemon = Daemon::start(&cli.resolve().unwrap()).await.unwrap();
    let id = daemon.registered(Duration::from_secs(10)).await.unwrap();
    let sock = home.join("run").join("pilotd.sock");
    let server = serve(&sock, ctx(&daemon)).await.unwrap();
    Node {
        daemon,
        server,
        sock,
        id,
    }
}

fn ctx(d: &Daemon) -> IpcContext {
    IpcContext {
        engine: d.engine.clone(),
        link: d.link.clone(),
        trust: None,
        trust_handle: None,
        webhook: None,
        events: Default::default(),
        nameserver: None,
        stdio: None,
        tasks: None,
        home: PathBuf::from("/nonexistent"),
        identity: d.identity.clone(),
        desired: d.desired.clone(),
    }
}

async fn pair() -> (tempfile::TempDir, Node, Node) {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&reg, &dir.path().join("a")).await;
    let b = node(&reg, &dir.path().join("b")).await;
    (dir, a, b)
}

/// Echoes every connection accepted on `port` through a driver: copy until EOF, then close.
async fn echo_service(sock: &Path, port: u16) -> Driver {
    let d = Driver::connect(sock).await.unwrap();
    let mut l = d.listen(port).await.unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
        }
    });
    d
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// Writes `data`, closes, and reads the echo to EOF.
async fn round_trip(d: &Driver, dst: PilotAddr, data: Vec<u8>) -> Vec<u8> {
    let s = timeout(T, d.dial(dst)).await.unwrap().unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    timeout(T, r.read_to_end(&mut got)).await.unwrap().unwrap();
    writer.await.unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_one_mib_through_both_ipc_sockets() {
    let (_dir, a, b) = pair().await;
    let _echo = echo_service(&b.sock, 1000).await;
    let da = Driver::connect(&a.sock).await.unwrap();
    // The daemon runs in this process: the kernel names it as the socket's peer.
    assert_eq!(da.peer_pid(), Some(std::process::id() as i32));
    let data = pattern(1 << 20, 7);
    let got = round_trip(&da, PilotAddr::new(Addr::new(0, b.id), 1000), data.clone()).await;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_streams_on_one_driver() {
    let (_dir, a, b) = pair().await;
    let _echo = echo_service(&b.sock, 1000).await;
    let da = Driver::connect(&a.sock).await.unwrap();
    let dst = PilotAddr::new(Addr::new(0, b.id), 1000);
    let mut tasks = Vec::new();
    for i in 0..20u32 {
        let d = da.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(48 * 1024 + i as usize * 1000, i);
            let got = round_trip(&d, dst, data.clone()).await;
            assert!(got == data, "stream {i}: echoed bytes differ");
            got.len()
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, (0..20).map(|i| 48 * 1024 + i * 1000).sum::<usize>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_round_trip() {
    let (_dir, a, b) = pair().await;
    let da = Driver::connect(&a.sock).await.unwrap();
    let db = Driver::connect(&b.sock).await.unwrap();
    let _la = da.listen(2000).await.unwrap();
    let _lb = db.listen(2001).await.unwrap();
    // The first datagrams may race the tunnel key exchange: repeat until one arrives.
    let to_b = PilotAddr::new(Addr::new(0, b.id), 2001);
    let got = timeout(T, async {
        loop {
            da.send_to(to_b, b"ping").await.unwrap();
            if let Ok(r) = timeout(Duration::from_millis(300), db.recv_from()).await {
                break r.unwrap();
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got.data, b"ping");
    assert_eq!(got.dst_port, 2001);
    assert_eq!(got.src.addr, Addr::new(0, a.id));

    let to_a = PilotAddr::new(Addr::new(0, a.id), 2000);
    let back = timeout(T, async {
        loop {
            db.send_to(to_a, b"pong").await.unwrap();
            if let Ok(r) = timeout(Duration::from_millis(300), da.recv_from()).await {
                break r.unwrap();
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(back.data, b"pong");
    assert_eq!(back.dst_port, 2000);
    assert_eq!(back.src.addr, Addr::new(0, b.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_and_extension_requests() {
    let (_dir, a, b) = pair().await;
    let d = Driver::connect(&a.sock).await.unwrap();
    let info = d.info().await.unwrap();
    assert_eq!(info.node_id, a.id);
    assert_eq!(info.address, Addr::new(0, a.id).to_string());
    assert!(!info.public_key.is_empty());
    let raw = d.info_json().await.unwrap();
    assert!(raw["ipc"]["clients_active"].as_u64().unwrap() >= 1);

    let ext = d.ext(&ExtRequest::Info).await.unwrap();
    let info: ipc::Info = ext.into_result().unwrap();
    assert_eq!(info.node_id, a.id);

    let r: ipc::LookupReply = d
        .ext(&ExtRequest::Lookup { node_id: b.id })
        .await
        .unwrap()
        .into_result()
        .unwrap();
    assert_eq!(r.node_id, b.id);
    assert!(r.public);

    let e = d
        .ext(&ExtRequest::Lookup { node_id: 999_999 })
        .await
        .unwrap()
        .into_result::<ipc::LookupReply>()
        .unwrap_err();
    assert_eq!(e.code, code::NOT_FOUND);

    // Hostname through v1 commands, then resolved through the extension.
    let set = d.set_hostname("alpha-node").await.unwrap();
    assert_eq!(set["hostname"], "alpha-node");
    let res = d.resolve_hostname("alpha-node").await.unwrap();
    assert_eq!(res["node_id"], a.id);
    let r: ipc::ResolveReply = d
        .ext(&ExtRequest::Resolve {
            target: "alpha-node".into(),
        })
        .await
        .unwrap()
        .into_result()
        .unwrap();
    assert_eq!(r.node_id, a.id);
    assert_eq!(d.info().await.unwrap().hostname, "alpha-node");

    let tags = d.set_tags(&["gpu", "llm"]).await.unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["gpu", "llm"]));
    let too_many = d.set_tags(&["a", "b", "c", "d"]).await.unwrap_err();
    assert!(
        matches!(too_many, DriverError::Daemon(ref m) if m.contains("tags")),
        "{too_many}"
    );

    let hook = d.set_webhook("http://127.0.0.1:9/hook").await.unwrap();
    assert_eq!(hook["webhook"], "http://127.0.0.1:9/hook");
    assert_eq!(a.server.webhook(), "http://127.0.0.1:9/hook");

    let nets: ipc::NetworksReply = d
        .ext(&ExtRequest::NetworkList)
        .await
        .unwrap()
        .into_result()
        .unwrap();
    assert!(nets.networks.iter().any(|n| n.id == 0));

    // Unknown op and unavailable services answer with stable codes, never a hang.
    let mut raw = UnixStream::connect(&a.sock).await.unwrap();
    send(
        &mut raw,
        Message::Ext {
            json: br#"{"op":"teleport"}"#,
        },
    )
    .await;
    let (c, body) = read_frame(&mut raw).await.unwrap();
    assert_eq!(c, ipc::cmd::EXT_OK);
    match ExtReply::from_json(&body).unwrap() {
        ExtReply::Error { code: c, .. } => assert_eq!(c, code::UNSUPPORTED),
        other => panic!("{other:?}"),
    }
    let e = d.ext(&ExtRequest::TrustList).await.unwrap();
    assert!(
        matches!(e, ExtReply::Error { ref code, .. } if code == code::UNAVAILABLE),
        "{e:?}"
    );
    let hs = d.handshake(HandshakeOp::Pending).await.unwrap_err();
    assert!(hs.to_string().contains("trust service not running"), "{hs}");
    // Ping: echo probes to port 7, answered here by a driver echo service on b.
    let _echo = echo_service(&b.sock, 7).await;
    let p: ipc::PingReply = d
        .ext(&ExtRequest::Ping {
            node_id: b.id,
            count: 3,
            timeout_ms: Some(5000),
        })
        .await
        .unwrap()
        .into_result()
        .unwrap();
    assert_eq!(p.results.len(), 3);
    for r in &p.results {
        assert!(r.error.is_none(), "{r:?}");
        assert!(r.rtt_ms.unwrap() > 0.0);
        assert_eq!(r.path, Some(ipc::PathKind::Direct));
    }
    // Requests still work after the errors.
    assert_eq!(d.info().await.unwrap().node_id, a.id);
}

async fn send(s: &mut UnixStream, m: Message<'_>) {
    let mut v = Vec::new();
    m.encode(&mut v).unwrap();
    s.write_all(&v).await.unwrap();
}

/// One frame, or `None` at EOF.
async fn read_frame(s: &mut UnixStream) -> Option<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    timeout(T, s.read_exact(&mut len)).await.unwrap().ok()?;
    let len = u32::from_be_bytes(len) as usize;
    let mut body = vec![0u8; len];
    timeout(T, s.read_exact(&mut body)).await.unwrap().ok()?;
    let cmd = body.remove(0);
    Some((cmd, body))
}

async fn expect_error(s: &mut UnixStream) -> String {
    let (c, body) = read_frame(s).await.unwrap();
    assert_eq!(c, ipc::cmd::ERROR, "expected Error, got 0x{c:02x}");
    match Message::parse(c, &body).unwrap() {
        Message::Error { code, message } => {
            assert_eq!(code, ipc::ERROR_CODE);
            message.to_owned()
        }
        _ => unreachable!(),
    }
}

async fn expect_eof(s: &mut UnixStream) {
    let mut b = [0u8; 1];
    let n = timeout(T, s.read(&mut b)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "the server should have closed the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_connection_ids_are_errors() {
    let (_dir, a, _b) = pair().await;
    let mut s = UnixStream::connect(&a.sock).await.unwrap();
    send(
        &mut s,
        Message::Send {
            conn_id: 424_242,
            data: b"x",
        },
    )
    .await;
    assert!(expect_error(&mut s).await.contains("424242 not found"));
    send(&mut s, Message::Close { conn_id: 424_242 }).await;
    assert!(expect_error(&mut s).await.contains("424242 not found"));
    // The client is still served, replies in order.
    send(&mut s, Message::Info).await;
    let (c, body) = read_frame(&mut s).await.unwrap();
    assert_eq!(c, ipc::cmd::INFO_OK);
    let info: ipc::Info = serde_json::from_slice(&body).unwrap();
    assert_eq!(info.node_id, a.id);

    let d = Driver::connect(&a.sock).await.unwrap();
    let r = d
        .ext(&ExtRequest::Disconnect { conn_id: 424_242 })
        .await
        .unwrap();
    assert!(
        matches!(r, ExtReply::Error { ref code, .. } if code == code::UNKNOWN_PEER),
        "{r:?}"
    );
    assert!(a.server.stats().to_json()["errors_sent"].as_u64().unwrap() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_drop_only_that_client() {
    let (_dir, a, _b) = pair().await;
    let stats = a.server.stats();
    let bystander = Driver::connect(&a.sock).await.unwrap();

    // Text where a length prefix belongs: "GARB" is a length far above 1 MiB.
    let mut g = UnixStream::connect(&a.sock).await.unwrap();
    g.write_all(b"GARBAGE GARBAGE GARBAGE\n").await.unwrap();
    assert!(expect_error(&mut g).await.contains("1 MiB"));
    expect_eof(&mut g).await;

    // A length prefix of 1 MiB + 1.
    let mut o = UnixStream::connect(&a.sock).await.unwrap();
    o.write_all(&((1u32 << 20) + 1).to_be_bytes())
        .await
        .unwrap();
    assert!(expect_error(&mut o).await.contains("exceeds"));
    expect_eof(&mut o).await;

    // A zero length prefix.
    let mut z = UnixStream::connect(&a.sock).await.unwrap();
    z.write_all(&[0, 0, 0, 0]).await.unwrap();
    expect_error(&mut z).await;
    expect_eof(&mut z).await;

    // Well framed but unknown, or a reply sent as a request: Error, and the client stays.
    let mut u = UnixStream::connect(&a.sock).await.unwrap();
    u.write_all(&[0, 0, 0, 3, 0x30, 1, 2]).await.unwrap();
    assert!(expect_error(&mut u).await.contains("unknown"));
    send(&mut u, Message::DialOk { conn_id: 1 }).await;
    assert!(expect_error(&mut u).await.contains("not a request"));
    send(&mut u, Message::Bind { port: 1 }).await;
    // Truncated Bind payload (one byte).
    u.write_all(&[0, 0, 0, 2, ipc::cmd::BIND, 9]).await.unwrap();
    let (c, _) = read_frame(&mut u).await.unwrap();
    assert_eq!(c, ipc::cmd::BIND_OK);
    assert!(expect_error(&mut u).await.contains("too short"));
    // Enough bad requests and the client is dropped too.
    u.write_all(&[0, 0, 0, 1, 0x31].repeat(8)).await.unwrap();
    let mut errors = 0;
    while let Some((c, _)) = read_frame(&mut u).await {
        assert_eq!(c, ipc::cmd::ERROR);
        errors += 1;
    }
    assert!((1..=8).contains(&errors), "{errors}");

    assert_eq!(
        stats.oversized.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(
        stats
            .empty_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        stats
            .unknown_commands
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 7
    );
    assert_eq!(
        stats.malformed.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        stats
            .clients_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    assert!(stats.bad_frames() >= 11);

    // Port 1 was freed when its client was dropped; the others are still served.
    assert_eq!(bystander.info().await.unwrap().node_id, a.id);
    let fresh = Driver::connect(&a.sock).await.unwrap();
    let l = timeout(T, async {
        loop {
            match fresh.listen(1).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(l.local_port(), 1);
    let info = fresh.info_json().await.unwrap();
    assert_eq!(info["ipc"]["oversized"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_private_refuses_a_second_server_and_is_removed() {
    let (dir, a, _b) = pair().await;
    let mode = std::fs::metadata(&a.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // A live server keeps its path.
    let e = serve(&a.sock, ctx(&a.daemon)).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    let d = Driver::connect(&a.sock).await.unwrap();
    assert_eq!(d.info().await.unwrap().node_id, a.id);

    // A regular file is not taken for a stale socket.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"x").unwrap();
    let e = serve(&file, ctx(&a.daemon)).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);

    a.server.shutdown().await;
    assert!(!a.sock.exists(), "socket file left behind");
    // Clients are disconnected.
    let r = timeout(T, d.info()).await.unwrap();
    assert!(matches!(r, Err(DriverError::DaemonDown(_))), "{r:?}");
    assert!(matches!(
        Driver::connect(&a.sock).await,
        Err(DriverError::Connect { .. })
    ));

    // A stale socket file (nobody listening) is replaced.
    let stale = dir.path().join("stale").join("s.sock");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let s2 = serve(&stale, ctx(&a.daemon)).await.unwrap();
    let d2 = Driver::connect(&stale).await.unwrap();
    assert_eq!(d2.info().await.unwrap().node_id, a.id);
    s2.shutdown().await;
    assert!(!stale.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_and_connections_belong_to_their_client() {
    let (_dir, a, b) = pair().await;
    // One port, one owner.
    let d1 = Driver::connect(&b.sock).await.unwrap();
    let d2 = Driver::connect(&b.sock).await.unwrap();
    let mut l1 = d1.listen(3000).await.unwrap();
    let e = d2.listen(3000).await.unwrap_err();
    assert!(e.to_string().contains("already"), "{e}");

    // A dialer's disconnect closes its connection: the acceptor sees EOF.
    let da = Driver::connect(&a.sock).await.unwrap();
    let mut s = da
        .dial(PilotAddr::new(Addr::new(0, b.id), 3000))
        .await
        .unwrap();
    s.write_all(b"hello").await.unwrap();
    let (mut acc, remote) = timeout(T, l1.accept()).await.unwrap().unwrap();
    assert_eq!(remote.addr, Addr::new(0, a.id));
    let mut buf = [0u8; 5];
    timeout(T, acc.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"hello");
    drop(s);
    drop(da);
    let mut rest = Vec::new();
    timeout(T, acc.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());

    // The listener's client goes away: the port is free for another.
    drop(acc);
    drop(l1);
    drop(d1);
    let l2 = timeout(T, async {
        loop {
            match d2.listen(3000).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(l2.local_port(), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_dial_does_not_hold_up_other_streams() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&reg, &dir.path().join("a")).await;
    let b = node(&reg, &dir.path().join("b")).await;
    // A node that registered and then vanished: dials to it wait for SYN retries.
    let c = node(&reg, &dir.path().join("c")).await;
    let gone = c.id;
    c.server.shutdown().await;
    c.daemon.shutdown().await;

    let _echo = echo_service(&b.sock, 1000).await;
    let da = Driver::connect(&a.sock).await.unwrap();
    let s = da
        .dial(PilotAddr::new(Addr::new(0, b.id), 1000))
        .await
        .unwrap();
    let slow = {
        let d = da.clone();
        tokio::spawn(async move { d.dial(PilotAddr::new(Addr::new(0, gone), 1000)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut r, mut w) = tokio::io::split(s);
    let t0 = std::time::Instant::now();
    for i in 0..5u8 {
        w.write_all(&[i; 100]).await.unwrap();
        let mut buf = [0u8; 100];
        timeout(Duration::from_secs(5), r.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf, [i; 100]);
    }
    assert!(
        !slow.is_finished(),
        "the dial to a vanished node should still be pending"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    slow.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_stalls_only_its_connection() {
    let (_dir, a, b) = pair().await;
    let _echo = echo_service(&b.sock, 1000).await;
    // A sink on b that accepts and never reads.
    let sink = Driver::connect(&b.sock).await.unwrap();
    let mut l = sink.listen(4000).await.unwrap();
    let held = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(s);
    });

    let da = Driver::connect(&a.sock).await.unwrap();
    let mut stuck = da
        .dial(PilotAddr::new(Addr::new(0, b.id), 4000))
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        stuck.write_all(&pattern(3 << 20, 1)).await.unwrap();
        stuck
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The same client and another one still move data on other connections.
    let echo = PilotAddr::new(Addr::new(0, b.id), 1000);
    let data = pattern(256 * 1024, 2);
    assert!(round_trip(&da, echo, data.clone()).await == data);
    let other = Driver::connect(&a.sock).await.unwrap();
    assert!(round_trip(&other, echo, data.clone()).await == data);
    // The stalled connection is still open and owned: its 3 MiB sit in queues.
    let info = da.info().await.unwrap();
    assert!(info.conn_list.iter().any(|c| c.remote_port == 4000));
    held.abort();
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_connection_reads_as_an_error_not_as_eof() {
    use pilotd::engine::{AppEvent, Cmd};
    let (_dir, a, b) = pair().await;
    // B accepts on port 77 and resets every connection once its first bytes arrive.
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    b.daemon.engine.listen(77, tx).await.unwrap();
    let engine = b.daemon.engine.clone();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if let AppEvent::Data { conn, .. } = ev {
                engine.send(Cmd::Abort { conn }).await.unwrap();
            }
        }
    });
    let d = Driver::connect(&a.sock).await.unwrap();
    let mut s = d
        .dial(PilotAddr::new(Addr::new(0, b.id), 77))
        .await
        .unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut buf = Vec::new();
    let r = timeout(T, s.read_to_end(&mut buf)).await.unwrap();
    let e = r.expect_err("a reset must not read as a clean EOF");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    // A raw v1 client that never asked sees only CloseOk, as v1 sends.
    let mut raw = UnixStream::connect(&a.sock).await.unwrap();
    send(
        &mut raw,
        Message::Dial {
            dst: PilotAddr::new(Addr::new(0, b.id), 77),
        },
    )
    .await;
    let (c, p) = read_frame(&mut raw).await.unwrap();
    assert_eq!(c, ipc::cmd::DIAL_OK);
    let conn_id = u32::from_be_bytes(p[..4].try_into().unwrap());
    send(
        &mut raw,
        Message::Send {
            conn_id,
            data: b"x",
        },
    )
    .await;
    let (c, _) = timeout(T, read_frame(&mut raw)).await.unwrap().unwrap();
    assert_eq!(c, ipc::cmd::CLOSE_OK);
}

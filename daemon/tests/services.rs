#![allow(clippy::unwrap_used)]
//! Built-in services of a whole node (`Node::start`): the echo service on port 7, over
//! streams through the driver and over datagrams through the engine.

use std::time::Duration;

use pilot_driver::Driver;
use pilotd::config::Cli;
use pilotd::engine::{AppEvent, Cmd};
use pilotd::node::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tunnel::{Addr, SocketAddr as PilotAddr};

use crate::support;
use support::registry;

async fn node(registry: &str, home: &std::path::Path, no_echo: bool) -> Node {
    let cli = Cli {
        public: Some(true),
        no_echo: Some(no_echo),
        ..support::loopback_cli(registry, home)
    };
    Node::start(&cli.resolve().unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_service_answers_streams_and_datagrams() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&reg, &dir.path().join("a"), false).await;
    let b = node(&reg, &dir.path().join("b"), false).await;
    a.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let nb = b.daemon.registered(Duration::from_secs(10)).await.unwrap();

    // A stream through A's IPC socket to B's echo port.
    let driver = Driver::connect(dir.path().join("a").join("pilotd.sock"))
        .await
        .unwrap();
    let mut s = driver
        .dial(PilotAddr::new(Addr::new(0, nb), 7))
        .await
        .unwrap();
    let sent: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = tokio::io::split(&mut s);
    let writer = async {
        wr.write_all(&sent).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let reader = async {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(writer, reader)
    })
    .await
    .unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the echo differs from what was sent");

    // A datagram from A's port 5000 comes back to it.
    let (tx, mut rx) = mpsc::channel(16);
    a.daemon.engine.listen(5000, tx).await.unwrap();
    a.daemon
        .engine
        .send(Cmd::SendTo {
            dst: PilotAddr::new(Addr::new(0, nb), 7),
            src_port: Some(5000),
            data: b"marco".to_vec(),
        })
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    match ev {
        AppEvent::Datagram {
            src,
            dst_port,
            data,
        } => {
            assert_eq!((src.addr.node, src.port, dst_port), (nb, 7, 5000));
            assert_eq!(data, b"marco");
        }
        other => panic!("expected a datagram, got {other:?}"),
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_can_be_turned_off() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&reg, &dir.path().join("a"), false).await;
    let b = node(&reg, &dir.path().join("b"), true).await;
    a.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let nb = b.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let (tx, _rx) = mpsc::channel(16);
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        a.daemon
            .engine
            .dial(PilotAddr::new(Addr::new(0, nb), 7), tx),
    )
    .await
    .unwrap();
    assert!(r.is_err(), "a dial to a node without echo must fail");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_streams_carry_bytes_both_ways_and_a_slow_one_holds_up_no_other() {
    use pilotd::local::{dial, LocalListener};
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&reg, &dir.path().join("a"), true).await;
    let b = node(&reg, &dir.path().join("b"), true).await;
    let na = a.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let nb = b.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let mut l = LocalListener::bind(&b.daemon.engine, 900).await.unwrap();
    let dst = PilotAddr::new(Addr::new(0, nb), 900);

    // A connection whose data the service never reads.
    let mut stuck = dial(&a.daemon.engine, dst).await.unwrap();
    let (_stuck_server, _) = l.accept().await.unwrap();
    let filler = tokio::spawn(async move {
        let junk = vec![1u8; 1 << 20];
        for _ in 0..8 {
            if stuck.write_all(&junk).await.is_err() {
                break;
            }
        }
        stuck
    });

    // Another connection on the same port still works: 2 MB up, reversed and back.
    let mut c = dial(&a.daemon.engine, dst).await.unwrap();
    let (mut s, remote) = l.accept().await.unwrap();
    assert_eq!(remote.addr.node, na);
    let sent: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    let server = tokio::spawn(async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got.reverse();
        s.write_all(&got).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        c.write_all(&sent).await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        got
    })
    .await
    .expect("second connection held up by the first");
    server.await.unwrap();
    let mut want = sent.clone();
    want.reverse();
    assert!(got == want, "bytes differ");
    filler.abort();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syn_rate_limits_drop_new_attempts_and_dialers_retry() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&reg, &dir.path().join("a"), true).await;
    let home = dir.path().join("b");
    let cli = Cli {
        registry: vec![reg.clone()],
        beacon: Some(String::new()),
        listen: Some("127.0.0.1:0".into()),
        socket: Some(home.join("pilotd.sock")),
        home: Some(home),
        public: Some(true),
        syn_rate_limit_per_peer: Some(5),
        ..Cli::default()
    };
    let b = Node::start(&cli.resolve().unwrap()).await.unwrap();
    a.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let nb = b.daemon.registered(Duration::from_secs(10)).await.unwrap();

    // 20 dials at once to B's echo port: 5 pass at once, the rest are dropped and get in
    // as their SYNs are retransmitted and the bucket refills.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let engine = a.daemon.engine.clone();
        set.spawn(async move {
            let (tx, _rx) = mpsc::channel(8);
            engine
                .dial(PilotAddr::new(Addr::new(0, nb), 7), tx)
                .await
                .map(|(conn, _)| conn)
        });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        if r.unwrap().is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 20, "every dial gets through in the end");
    let info = b.daemon.engine.info().await.unwrap();
    let refused = info["refused_syn_rate"].as_u64().unwrap();
    assert!(refused >= 10, "refused {refused}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_unbind_never_takes_a_port_someone_bound_since() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&reg, &dir.path().join("a"), true).await;
    let engine = &a.daemon.engine;
    let (tx1, _rx1) = mpsc::channel(8);
    let first = tx1.downgrade();
    engine.listen(6000, tx1).await.unwrap();
    let unbind = |owner| Cmd::Unlisten { port: 6000, owner };
    engine.send(unbind(Some(first.clone()))).await.unwrap();
    let (tx2, _rx2) = mpsc::channel(8);
    let second = tx2.downgrade();
    engine.listen(6000, tx2).await.unwrap();
    // The first listener's unbind, arriving late, leaves the second in place...
    engine.send(unbind(Some(first))).await.unwrap();
    let (tx3, _rx3) = mpsc::channel(8);
    let e = engine.listen(6000, tx3.clone()).await.unwrap_err();
    assert!(e.to_string().contains("already bound"), "{e}");
    // ...and the second's own unbind frees the port.
    engine.send(unbind(Some(second))).await.unwrap();
    engine.listen(6000, tx3).await.unwrap();
    a.shutdown().await;
}

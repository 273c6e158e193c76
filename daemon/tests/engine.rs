#![allow(clippy::unwrap_used)]
//! Two daemons and a registry in one process, over real loopback UDP and TCP: registration,
//! key exchange, an encrypted echo round trip, and a clean shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pilotd::config::Cli;
use pilotd::engine::{AppEvent, Cmd, EngineHandle};
use pilotd::node::Daemon;
use tokio::sync::{mpsc, Semaphore};
use tunnel::{Addr, SocketAddr as PilotAddr};

use crate::support;
use support::registry;

async fn daemon(registry: &str, home: &std::path::Path, public: bool) -> Daemon {
    let cli = Cli {
        registry: vec![registry.into()],
        beacon: Some(String::new()),
        listen: Some("127.0.0.1:0".into()),
        home: Some(home.into()),
        public: Some(public),
        ..Cli::default()
    };
    Daemon::start(&cli.resolve().unwrap()).await.unwrap()
}

/// Echoes every connection on `port`.
async fn echo(engine: EngineHandle, port: u16) {
    let (tx, mut rx) = mpsc::channel(256);
    engine.listen(port, tx).await.unwrap();
    tokio::spawn(async move {
        let mut credits: HashMap<u32, Arc<Semaphore>> = HashMap::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                AppEvent::Accepted { conn, credit, .. } => {
                    credits.insert(conn, credit);
                }
                AppEvent::Data { conn, data } => {
                    if let Some(c) = credits.get(&conn) {
                        engine.write(conn, c, &data).await.unwrap();
                    }
                }
                AppEvent::Closed { conn, .. } => {
                    let _ = engine.send(Cmd::Close { conn }).await;
                }
                AppEvent::Datagram { .. } | AppEvent::Incoming { .. } => {}
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_echo_between_two_daemons() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = daemon(&reg, &dir.path().join("a"), false).await;
    let b = daemon(&reg, &dir.path().join("b"), true).await;
    let _na = a.registered(Duration::from_secs(10)).await.unwrap();
    let nb = b.registered(Duration::from_secs(10)).await.unwrap();
    echo(b.engine.clone(), 7).await;

    let t0 = std::time::Instant::now();
    let (tx, mut rx) = mpsc::channel(256);
    let dst = PilotAddr::new(Addr::new(0, nb), 7);
    let (conn, credit) = tokio::time::timeout(Duration::from_secs(10), a.engine.dial(dst, tx))
        .await
        .unwrap()
        .unwrap();
    println!("dial: {:?}", t0.elapsed());
    let t1 = std::time::Instant::now();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let writer = {
        let engine = a.engine.clone();
        let data = data.clone();
        tokio::spawn(async move {
            engine.write(conn, &credit, &data).await.unwrap();
            engine.send(Cmd::Close { conn }).await.unwrap();
        })
    };
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap()
        {
            Some(AppEvent::Data { data, .. }) => got.extend_from_slice(&data),
            Some(AppEvent::Closed { error, .. }) => {
                assert!(error.is_none(), "{error:?}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    writer.await.unwrap();
    println!("1 MB echoed in {:?}", t1.elapsed());
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");

    let info = a.engine.info().await.unwrap();
    let peer = &info["peer_list"][0];
    assert_eq!(peer["node_id"], nb);
    assert_eq!(peer["encrypted"], true);
    assert_eq!(peer["relay"], false);
    a.shutdown().await;
    b.shutdown().await;
}

/// Many small writes queue up in the engine's command channel faster than one wake handles
/// them; every byte must still arrive, in order (a node dialing its own address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_small_writes_arrives_whole() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = daemon(&reg, &dir.path().join("a"), false).await;
    let na = a.registered(Duration::from_secs(10)).await.unwrap();

    let (tx, mut rx) = mpsc::channel(256);
    a.engine.listen(9, tx).await.unwrap();
    let sink = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                AppEvent::Data { data, .. } => got.extend_from_slice(&data),
                AppEvent::Closed { error, .. } => {
                    assert!(error.is_none(), "{error:?}");
                    break;
                }
                AppEvent::Accepted { .. }
                | AppEvent::Datagram { .. }
                | AppEvent::Incoming { .. } => {}
            }
        }
        got
    });

    let (etx, _erx) = mpsc::channel(256);
    let (conn, credit) = a
        .engine
        .dial(PilotAddr::new(Addr::new(0, na), 9), etx)
        .await
        .unwrap();
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 13 % 241) as u8).collect();
    for piece in data.chunks(500) {
        a.engine.write(conn, &credit, piece).await.unwrap();
    }
    a.engine.send(Cmd::Close { conn }).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), sink)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), data.len(), "bytes received");
    assert!(got == data, "received bytes differ");
    a.shutdown().await;
}

/// A dial's failure says why, as a type: a closed port is refused by the peer, a node the
/// registry does not know fails to resolve with `not_found`, and a private node that does not
/// trust us is `forbidden`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_failures_are_typed() {
    use pilotd::engine::DialError;
    use pilotd::registry_link::LinkError;
    use tunnel::node::CloseReason;

    let raddr = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = daemon(&raddr, &dir.path().join("a"), true).await;
    let b = daemon(&raddr, &dir.path().join("b"), true).await;
    let p = daemon(&raddr, &dir.path().join("p"), false).await;
    let t = Duration::from_secs(10);
    a.registered(t).await.unwrap();
    let nb = b.registered(t).await.unwrap();
    let np = p.registered(t).await.unwrap();
    let dial = |node: u32, port: u16| {
        let (tx, _rx) = mpsc::channel(8);
        let engine = a.engine.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(20),
                engine.dial(PilotAddr::new(Addr::new(0, node), port), tx),
            )
            .await
            .expect("a dial answers in time")
        }
    };

    match dial(nb, 4321).await {
        Err(DialError::Closed(CloseReason::Refused)) => {}
        other => panic!("closed port: {other:?}"),
    }
    match dial(nb.wrapping_add(1000), 80).await {
        Err(e @ DialError::Resolve { .. }) => {
            let DialError::Resolve { node, reason } = &e else {
                unreachable!()
            };
            assert_eq!(*node, nb.wrapping_add(1000));
            assert!(
                matches!(&**reason, LinkError::Refused { code, .. } if code == LinkError::REGISTRY_NOT_FOUND),
                "{reason:?}"
            );
            assert!(!e.is_forbidden());
        }
        other => panic!("unknown node: {other:?}"),
    }
    match dial(np, 80).await {
        Err(e) => assert!(e.is_forbidden(), "private node: {e:?}"),
        Ok(_) => panic!("a private node that does not trust us was reached"),
    }
}

/// The next event on `rx`, within 10 s.
async fn next(rx: &mut mpsc::Receiver<AppEvent>) -> AppEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event in time")
        .expect("the engine runs")
}

/// The fallback listener takes attempts and datagrams to ports no one listens on: an accepted
/// attempt completes the dialer's handshake only then and carries bytes both ways, a refused
/// one is refused at the dialer, and a port someone listens on stays theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_listener_decides_each_attempt() {
    use pilotd::engine::DialError;
    use tunnel::node::CloseReason;

    let raddr = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = daemon(&raddr, &dir.path().join("a"), true).await;
    let b = daemon(&raddr, &dir.path().join("b"), true).await;
    let t = Duration::from_secs(10);
    let na = a.registered(t).await.unwrap();
    let nb = b.registered(t).await.unwrap();
    echo(b.engine.clone(), 7).await;
    let (ftx, mut frx) = mpsc::channel(16);
    b.engine.listen_fallback(ftx).await.unwrap();
    let (other, _keep) = mpsc::channel(1);
    assert!(
        b.engine.listen_fallback(other).await.is_err(),
        "a second fallback owner was admitted"
    );

    // Accepted: the dial completes only after the decision.
    let (atx, mut arx) = mpsc::channel(64);
    let engine = a.engine.clone();
    let dialing = tokio::spawn(async move {
        engine
            .dial(PilotAddr::new(Addr::new(0, nb), 5555), atx)
            .await
    });
    let AppEvent::Incoming { id, port, remote } = next(&mut frx).await else {
        panic!("no attempt reported")
    };
    assert_eq!((port, remote.addr.node), (5555, na));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !dialing.is_finished(),
        "the dial completed before the accept"
    );
    let (btx, mut brx) = mpsc::channel(64);
    let (bconn, bcredit) = b.engine.accept_incoming(id, btx).await.unwrap();
    let (aconn, acredit) = dialing.await.unwrap().unwrap();
    a.engine.write(aconn, &acredit, b"ping").await.unwrap();
    b.engine.write(bconn, &bcredit, b"pong").await.unwrap();
    for (rx, want) in [(&mut brx, b"ping"), (&mut arx, b"pong")] {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(AppEvent::Data { data, .. })) => assert_eq!(&data, want),
            other => panic!("{other:?}"),
        }
    }

    // Refused: the dialer sees a refusal, as from a closed port.
    let (atx, _arx) = mpsc::channel(8);
    let engine = a.engine.clone();
    let dialing = tokio::spawn(async move {
        engine
            .dial(PilotAddr::new(Addr::new(0, nb), 6666), atx)
            .await
    });
    let AppEvent::Incoming { id, port, .. } = next(&mut frx).await else {
        panic!("no attempt reported")
    };
    assert_eq!(port, 6666);
    b.engine.refuse_incoming(id).await.unwrap();
    match dialing.await.unwrap() {
        Err(DialError::Closed(CloseReason::Refused)) => {}
        other => panic!("refused attempt: {other:?}"),
    }

    // A listened port is not the fallback's, and datagrams to other ports are.
    let (etx, _erx) = mpsc::channel(8);
    a.engine
        .dial(PilotAddr::new(Addr::new(0, nb), 7), etx)
        .await
        .expect("the echo port is served by its listener");
    a.engine
        .send(Cmd::SendTo {
            dst: PilotAddr::new(Addr::new(0, nb), 5353),
            src_port: Some(4000),
            data: b"hello".to_vec(),
        })
        .await
        .unwrap();
    match next(&mut frx).await {
        AppEvent::Datagram {
            src,
            dst_port,
            data,
        } => {
            assert_eq!((src.addr.node, src.port, dst_port), (na, 4000, 5353));
            assert_eq!(data, b"hello");
        }
        other => panic!("{other:?}"),
    }
}

/// A daemon whose UDP port is taken fails to start before it writes a new identity file, so a
/// mistyped `--listen` leaves the home directory as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_listen_port_fails_before_an_identity_is_written() {
    let reg = registry().await;
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("n");
    let cli = Cli {
        registry: vec![reg],
        beacon: Some(String::new()),
        listen: Some(busy.local_addr().unwrap().to_string()),
        home: Some(home.clone()),
        ..Cli::default()
    };
    let config = cli.resolve().unwrap();
    match Daemon::start(&config).await {
        Err(pilotd::node::StartError::Bind { .. }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("started on a busy port"),
    }
    assert!(
        !config.identity.exists(),
        "an identity was written at {}",
        config.identity.display()
    );
}

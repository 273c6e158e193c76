#![allow(clippy::unwrap_used)]
//! The trust service between daemons and a registry in one process: requests, approval,
//! rejection, mutual requests, revocation, persistence, and hostile input on port 444.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use pilot_registry::auth::b64;
use pilot_registry_client::sign_v1;
use pilotd::config::Cli;
use pilotd::engine::{AppEvent, Cmd, EngineHandle};
use pilotd::identity::NodeIdentity;
use pilotd::node::Daemon;
use pilotd::trust::{TrustConfig, TrustEvent, TrustHandle, TrustService};
use pilotd::trust_api::{TrustCmd, TrustOp, TrustSender};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, oneshot, Semaphore};
use tunnel::{Addr, Identity, SocketAddr as PilotAddr};

const APP_PORT: u16 = 7000;

use crate::support;
use support::registry;

struct Node {
    daemon: Daemon,
    trust: TrustSender,
    handle: TrustHandle,
    id: u32,
    key: SigningKey,
    home: PathBuf,
}

async fn start_daemon(registry: &str, home: &Path, public: bool) -> Daemon {
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

fn identity(home: &Path) -> SigningKey {
    Identity::load(&home.join("identity.json"))
        .unwrap()
        .signing_key()
        .clone()
}

async fn node_with(registry: &str, home: &Path, public: bool, pushes: bool) -> Node {
    let mut daemon = start_daemon(registry, home, public).await;
    let key = identity(home);
    let p = daemon.pushes.take().filter(|_| pushes);
    let config = TrustConfig {
        poll_interval: if pushes {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(3600)
        },
        ..TrustConfig::new(home, daemon.identity.clone(), public)
    };
    let (trust, handle) =
        TrustService::start(config, daemon.engine.clone(), daemon.link.clone(), p)
            .await
            .unwrap();
    let id = daemon.registered(Duration::from_secs(10)).await.unwrap();
    Node {
        daemon,
        trust,
        handle,
        id,
        key,
        home: home.into(),
    }
}

async fn node(registry: &str, home: &Path, public: bool) -> Node {
    node_with(registry, home, public, true).await
}

async fn op(n: &Node, op: TrustOp) -> Result<Value, String> {
    let (reply, rx) = oneshot::channel();
    n.trust.send(TrustCmd { op, reply }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .unwrap()
        .unwrap()
        .map_err(|e| e.to_string())
}

async fn trusted(n: &Node) -> Vec<Value> {
    let v = op(n, TrustOp::Trusted).await.unwrap();
    v["trusted"].as_array().cloned().unwrap_or_default()
}

async fn pending(n: &Node) -> Vec<Value> {
    let v = op(n, TrustOp::Pending).await.unwrap();
    v["pending"].as_array().cloned().unwrap_or_default()
}

fn ids(list: &[Value]) -> Vec<u64> {
    list.iter().filter_map(|e| e["node_id"].as_u64()).collect()
}

/// Polls `f` until it holds (10 s at most).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Waits for the first event matching `f`.
async fn event<F: FnMut(&TrustEvent) -> bool>(
    rx: &mut broadcast::Receiver<TrustEvent>,
    mut f: F,
) -> TrustEvent {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match rx.recv().await {
                Ok(ev) if f(&ev) => return ev,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .unwrap()
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
                        let _ = engine.write(conn, c, &data).await;
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

/// Opens a stream to `node:port` and echoes one message through it; `Err` if the connection
/// cannot be opened within 3 s.
async fn stream_works(engine: &EngineHandle, node: u32, port: u16) -> Result<(), String> {
    let (tx, mut rx) = mpsc::channel(64);
    let dst = PilotAddr::new(Addr::new(0, node), port);
    let (conn, credit) = tokio::time::timeout(Duration::from_secs(3), engine.dial(dst, tx))
        .await
        .map_err(|_| "dial timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    engine.write(conn, &credit, b"hello").await.unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(AppEvent::Data { data, .. })) => got.extend_from_slice(&data),
            other => return Err(format!("{other:?}")),
        }
    }
    let _ = engine.send(Cmd::Close { conn }).await;
    assert_eq!(got, b"hello");
    Ok(())
}

/// Sends raw bytes to `node`'s port 444 and finishes the connection.
async fn raw_send(engine: &EngineHandle, node: u32, bytes: &[u8]) {
    let (tx, mut rx) = mpsc::channel(64);
    let dst = PilotAddr::new(Addr::new(0, node), 444);
    let (conn, credit) = tokio::time::timeout(Duration::from_secs(5), engine.dial(dst, tx))
        .await
        .unwrap()
        .unwrap();
    if !bytes.is_empty() {
        engine.write(conn, &credit, bytes).await.unwrap();
    }
    engine.send(Cmd::Close { conn }).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(ev) = rx.recv().await {
            if matches!(ev, AppEvent::Closed { .. }) {
                return;
            }
        }
    })
    .await;
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A handshake message as v1 writes it.
fn message(
    kind: &str,
    from: u32,
    to: u32,
    signer: &SigningKey,
    embed_key: bool,
    ts: i64,
) -> Vec<u8> {
    let key = if embed_key {
        b64(signer.verifying_key().as_bytes())
    } else {
        String::new()
    };
    serde_json::to_vec(&json!({
        "type": kind,
        "node_id": from,
        "public_key": key,
        "justification": "let me in",
        "signature": sign_v1(signer, &format!("handshake:{from}:{to}")),
        "reason": "",
        "timestamp": ts,
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_then_approve_opens_private_ports() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&reg, &dir.path().join("a"), false).await;
    let b = node(&reg, &dir.path().join("b"), false).await;
    echo(b.daemon.engine.clone(), APP_PORT).await;

    assert!(stream_works(&a.daemon.engine, b.id, APP_PORT)
        .await
        .is_err());

    let sent = op(
        &a,
        TrustOp::Request {
            peer: b.id,
            justification: "need your data".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(sent, json!({"status": "sent", "node_id": b.id}));

    eventually("B sees A's request", || async {
        ids(&pending(&b).await) == [u64::from(a.id)]
    })
    .await;
    let p = pending(&b).await;
    assert_eq!(p[0]["justification"], "need your data");
    assert_eq!(p[0]["public_key"], b64(a.key.verifying_key().as_bytes()));
    assert!(trusted(&a).await.is_empty());
    assert!(trusted(&b).await.is_empty());
    assert!(stream_works(&a.daemon.engine, b.id, APP_PORT)
        .await
        .is_err());

    // Approving something that is not pending is an error.
    let e = op(&b, TrustOp::Approve { peer: 999 }).await.unwrap_err();
    assert!(e.contains("no pending"), "{e}");

    let approved = op(&b, TrustOp::Approve { peer: a.id }).await.unwrap();
    assert_eq!(approved, json!({"status": "approved", "node_id": a.id}));
    assert!(pending(&b).await.is_empty());
    let tb = trusted(&b).await;
    assert_eq!(ids(&tb), [u64::from(a.id)]);
    assert_eq!(tb[0]["mutual"], false);
    assert!(b.handle.gate().is_trusted(a.id));

    eventually("A trusts B", || async {
        ids(&trusted(&a).await) == [u64::from(b.id)]
    })
    .await;
    let ta = trusted(&a).await;
    assert_eq!(ta[0]["mutual"], true);
    assert_eq!(ta[0]["public_key"], b64(b.key.verifying_key().as_bytes()));

    stream_works(&a.daemon.engine, b.id, APP_PORT)
        .await
        .unwrap();

    // Both decisions are on disk.
    let file: Value =
        serde_json::from_slice(&std::fs::read(b.home.join("trust.json")).unwrap()).unwrap();
    assert_eq!(file["trusted"][0]["node_id"], a.id);
    assert!(file.get("pending").is_none());
    a.daemon.shutdown().await;
    b.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejection_reaches_the_requester_with_its_reason() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    // A public requester can be reached directly, so it hears the reason; a private one
    // hears the registry's answer, which carries none.
    let a = node(&reg, &dir.path().join("a"), true).await;
    let c = node(&reg, &dir.path().join("c"), false).await;
    let b = node(&reg, &dir.path().join("b"), false).await;
    let mut a_events = a.handle.subscribe();
    let mut c_events = c.handle.subscribe();

    for n in [&a, &c] {
        op(
            n,
            TrustOp::Request {
                peer: b.id,
                justification: "please".into(),
            },
        )
        .await
        .unwrap();
    }
    eventually("B sees both requests", || async {
        pending(&b).await.len() == 2
    })
    .await;

    let r = op(
        &b,
        TrustOp::Reject {
            peer: a.id,
            reason: "not today".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(r, json!({"status": "rejected", "node_id": a.id}));
    op(
        &b,
        TrustOp::Reject {
            peer: c.id,
            reason: "no".into(),
        },
    )
    .await
    .unwrap();
    assert!(pending(&b).await.is_empty());
    let e = op(
        &b,
        TrustOp::Reject {
            peer: a.id,
            reason: String::new(),
        },
    )
    .await
    .unwrap_err();
    assert!(e.contains("no pending"), "{e}");

    // The registry's answer (no reason) and B's direct message race; the reason arrives.
    let ev = event(
        &mut a_events,
        |e| matches!(e, TrustEvent::Rejected { reason, .. } if !reason.is_empty()),
    )
    .await;
    assert_eq!(
        ev,
        TrustEvent::Rejected {
            peer: b.id,
            reason: "not today".into()
        }
    );
    let ev = event(&mut c_events, |e| matches!(e, TrustEvent::Rejected { .. })).await;
    assert_eq!(
        ev,
        TrustEvent::Rejected {
            peer: b.id,
            reason: String::new()
        }
    );
    for n in [&a, &b, &c] {
        assert!(trusted(n).await.is_empty());
    }
    a.daemon.shutdown().await;
    b.daemon.shutdown().await;
    c.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_requests_trust_both_sides() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    // B neither watches nor polls soon, so it does not see A's request before asking A:
    // A, which has asked B, approves B's request on its own.
    let a = node(&reg, &dir.path().join("a"), false).await;
    let b = node_with(&reg, &dir.path().join("b"), false, false).await;
    let mut a_events = a.handle.subscribe();
    echo(a.daemon.engine.clone(), APP_PORT).await;
    echo(b.daemon.engine.clone(), APP_PORT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    op(
        &a,
        TrustOp::Request {
            peer: b.id,
            justification: "a->b".into(),
        },
    )
    .await
    .unwrap();
    assert!(pending(&b).await.is_empty());
    op(
        &b,
        TrustOp::Request {
            peer: a.id,
            justification: "b->a".into(),
        },
    )
    .await
    .unwrap();

    let ev = event(&mut a_events, |e| {
        matches!(e, TrustEvent::AutoApproved { .. })
    })
    .await;
    assert_eq!(
        ev,
        TrustEvent::AutoApproved {
            peer: b.id,
            reason: "mutual".into()
        }
    );
    eventually("both trusted", || async {
        ids(&trusted(&a).await) == [u64::from(b.id)] && ids(&trusted(&b).await) == [u64::from(a.id)]
    })
    .await;
    assert_eq!(trusted(&a).await[0]["mutual"], true);
    assert_eq!(trusted(&b).await[0]["mutual"], true);
    assert!(pending(&a).await.is_empty());
    assert!(pending(&b).await.is_empty());
    stream_works(&a.daemon.engine, b.id, APP_PORT)
        .await
        .unwrap();
    stream_works(&b.daemon.engine, a.id, APP_PORT)
        .await
        .unwrap();
    a.daemon.shutdown().await;
    b.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_back_approves_a_pending_request() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&reg, &dir.path().join("a"), false).await;
    let b = node(&reg, &dir.path().join("b"), false).await;
    op(
        &a,
        TrustOp::Request {
            peer: b.id,
            justification: String::new(),
        },
    )
    .await
    .unwrap();
    eventually("B sees A's request", || async {
        ids(&pending(&b).await) == [u64::from(a.id)]
    })
    .await;
    let r = op(
        &b,
        TrustOp::Request {
            peer: a.id,
            justification: String::new(),
        },
    )
    .await
    .unwrap();
    assert_eq!(r["status"], "sent");
    assert!(pending(&b).await.is_empty());
    assert_eq!(trusted(&b).await[0]["mutual"], true);
    eventually("A trusts B", || async {
        ids(&trusted(&a).await) == [u64::from(b.id)]
    })
    .await;
    a.daemon.shutdown().await;
    b.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_the_gate() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&reg, &dir.path().join("a"), false).await;
    let b = node(&reg, &dir.path().join("b"), false).await;
    let mut a_events = a.handle.subscribe();
    echo(b.daemon.engine.clone(), APP_PORT).await;
    op(
        &a,
        TrustOp::Request {
            peer: b.id,
            justification: String::new(),
        },
    )
    .await
    .unwrap();
    eventually("B sees A's request", || async {
        !pending(&b).await.is_empty()
    })
    .await;
    op(&b, TrustOp::Approve { peer: a.id }).await.unwrap();
    eventually("A trusts B", || async { !trusted(&a).await.is_empty() }).await;
    stream_works(&a.daemon.engine, b.id, APP_PORT)
        .await
        .unwrap();

    let e = op(&b, TrustOp::Revoke { peer: 12345 }).await.unwrap_err();
    assert!(e.contains("not trusted"), "{e}");
    let r = op(&b, TrustOp::Revoke { peer: a.id }).await.unwrap();
    assert_eq!(r, json!({"status": "revoked", "node_id": a.id}));
    assert!(trusted(&b).await.is_empty());
    assert!(!b.handle.gate().is_trusted(a.id));

    // A learns of it and drops its trust too.
    let ev = event(&mut a_events, |e| {
        matches!(e, TrustEvent::RevokedByPeer { .. })
    })
    .await;
    assert_eq!(ev, TrustEvent::RevokedByPeer { peer: b.id });
    eventually("A dropped B", || async { trusted(&a).await.is_empty() }).await;

    // A still has a tunnel to B, so its SYN reaches B, whose gate now refuses it.
    let before = b.daemon.engine.info().await.unwrap()["refused_untrusted"]
        .as_u64()
        .unwrap();
    // Refused with a reset, not left to time out: the dial fails at once.
    let e = stream_works(&a.daemon.engine, b.id, APP_PORT)
        .await
        .unwrap_err();
    assert_ne!(e, "dial timed out", "the refusal should be answered");
    let after = b.daemon.engine.info().await.unwrap()["refused_untrusted"]
        .as_u64()
        .unwrap();
    assert!(
        after > before,
        "B's gate refused nothing ({before} -> {after})"
    );
    a.daemon.shutdown().await;
    b.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_and_pending_requests_survive_a_restart() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&reg, &dir.path().join("a"), false).await;
    let b = node(&reg, &dir.path().join("b"), false).await;
    let c = node(&reg, &dir.path().join("c"), false).await;
    echo(a.daemon.engine.clone(), APP_PORT).await;
    for (n, j) in [(&a, "from a"), (&c, "from c")] {
        op(
            n,
            TrustOp::Request {
                peer: b.id,
                justification: j.into(),
            },
        )
        .await
        .unwrap();
    }
    eventually("B sees both requests", || async {
        pending(&b).await.len() == 2
    })
    .await;
    op(&b, TrustOp::Approve { peer: a.id }).await.unwrap();
    eventually("A trusts B", || async { !trusted(&a).await.is_empty() }).await;
    let before_trusted = trusted(&b).await;

    let home = b.home.clone();
    let b_id = b.id;
    let Node { daemon, trust, .. } = b;
    drop(trust);
    daemon.shutdown().await;

    let b = node(&reg, &home, false).await;
    assert_eq!(b.id, b_id);
    assert_eq!(trusted(&b).await, before_trusted);
    let p = pending(&b).await;
    assert_eq!(ids(&p), [u64::from(c.id)]);
    assert_eq!(p[0]["justification"], "from c");
    assert!(b.handle.gate().is_trusted(a.id));
    assert!(!b.handle.gate().is_trusted(c.id));
    // The restarted node still reaches A, whose gate admits it.
    stream_works(&b.daemon.engine, a.id, APP_PORT)
        .await
        .unwrap();
    // And it can still decide the request that waited across the restart.
    op(&b, TrustOp::Approve { peer: c.id }).await.unwrap();
    eventually("C trusts B", || async { !trusted(&c).await.is_empty() }).await;

    // A damaged trust file stops the service instead of silently dropping trust.
    let bad = dir.path().join("bad");
    let d = start_daemon(&reg, &bad, false).await;
    std::fs::write(bad.join("trust.json"), b"{\"trusted\": [{\"node_id\": ").unwrap();
    let e = TrustService::start(
        TrustConfig::new(
            &bad,
            Arc::new(NodeIdentity::in_memory(identity(&bad))),
            false,
        ),
        d.engine.clone(),
        d.link.clone(),
        None,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("trust.json"), "{e}");
    d.shutdown().await;
    a.daemon.shutdown().await;
    b.daemon.shutdown().await;
    c.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_handshake_messages_are_refused() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    // B is public so M can reach its port 444 without any trust.
    let a = node(&reg, &dir.path().join("a"), false).await;
    let b = node(&reg, &dir.path().join("b"), true).await;
    let m = node(&reg, &dir.path().join("m"), false).await;
    let mut events = b.handle.subscribe();
    let forger = SigningKey::from_bytes(&[42; 32]);
    let now = unix_now();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "own node ID, someone else's key in the message",
            message("handshake_request", m.id, b.id, &forger, true, now),
            "not the one registered",
        ),
        (
            "own node ID, no key in the message",
            message("handshake_request", m.id, b.id, &forger, false, now),
            "signature",
        ),
        (
            "another node's ID",
            message("handshake_accept", a.id, b.id, &forger, true, now),
            "comes from node",
        ),
        (
            "another node's ID with that node's real signature",
            message("handshake_revoke", a.id, b.id, &a.key, true, now),
            "comes from node",
        ),
        (
            "too old",
            message("handshake_request", m.id, b.id, &m.key, true, now - 3600),
            "too old",
        ),
        (
            "signed for another receiver",
            message("handshake_request", m.id, a.id, &m.key, true, now),
            "signature",
        ),
    ];
    for (what, bytes, why) in cases {
        raw_send(&m.daemon.engine, b.id, &bytes).await;
        let ev = event(&mut events, |e| matches!(e, TrustEvent::Refused { .. })).await;
        match ev {
            TrustEvent::Refused { from, why: got } => {
                assert_eq!(from, m.id, "{what}");
                assert!(got.contains(why), "{what}: {got}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(pending(&b).await.is_empty());
    assert!(trusted(&b).await.is_empty());

    // The same sender with its registered key is heard; the exact bytes again are not.
    let genuine = message("handshake_request", m.id, b.id, &m.key, true, now);
    raw_send(&m.daemon.engine, b.id, &genuine).await;
    eventually("B has M's request", || async {
        ids(&pending(&b).await) == [u64::from(m.id)]
    })
    .await;
    raw_send(&m.daemon.engine, b.id, &genuine).await;
    let ev = event(&mut events, |e| matches!(e, TrustEvent::Refused { .. })).await;
    assert!(
        matches!(&ev, TrustEvent::Refused { why, .. } if why.contains("already received")),
        "{ev:?}"
    );
    a.daemon.shutdown().await;
    b.daemon.shutdown().await;
    m.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_port_444_is_survived() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let b = node(&reg, &dir.path().join("b"), true).await;
    let m = node(&reg, &dir.path().join("m"), false).await;
    let mut events = b.handle.subscribe();

    let mut deep = vec![b'['; 3000];
    deep.extend_from_slice(&[b']'; 3000][..]);
    let garbage: Vec<Vec<u8>> = vec![
        b"hello there".to_vec(),
        b"{\"type\":\"handshake_request\",".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x01, 0x80],
        vec![b'['; 4000],
        deep,
        vec![b' '; 20_000],
        b"[1,2,3]".to_vec(),
        b"{\"node_id\":\"seven\"}".to_vec(),
        b"{\"node_id\":-1,\"type\":\"handshake_request\"}".to_vec(),
        b"{\"node_id\":99999999999}".to_vec(),
        b"{\"type\":\"handshake_request\",\"timestamp\":9223372036854775807}".to_vec(),
        b"{\"type\":\"handshake_request\",\"timestamp\":-9223372036854775808}".to_vec(),
        b"{}".to_vec(),
        b"{\"type\":\"handshake_request\"} trailing".to_vec(),
        Vec::new(),
    ];
    let n = garbage.len();
    for g in &garbage {
        raw_send(&m.daemon.engine, b.id, g).await;
    }
    m.daemon
        .engine
        .send(Cmd::SendTo {
            dst: PilotAddr::new(Addr::new(0, b.id), 444),
            src_port: None,
            data: b"datagram".to_vec(),
        })
        .await
        .unwrap();
    // Every connection ends in a refusal.
    for _ in 0..n {
        event(&mut events, |e| matches!(e, TrustEvent::Refused { .. })).await;
    }
    assert!(pending(&b).await.is_empty());

    // The service still works.
    let genuine = message("handshake_request", m.id, b.id, &m.key, true, unix_now());
    raw_send(&m.daemon.engine, b.id, &genuine).await;
    eventually("B has M's request", || async {
        ids(&pending(&b).await) == [u64::from(m.id)]
    })
    .await;
    assert!(b.daemon.engine.info().await.is_ok());
    b.daemon.shutdown().await;
    m.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_shared_network_are_approved_automatically() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = node(&reg, &dir.path().join("a"), false).await;
    let b = node(&reg, &dir.path().join("b"), false).await;
    let call = |n: &Node, v: Value| {
        let link = n.daemon.link.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            link.send(pilotd::registry_link::LinkCmd::Call(v, tx))
                .await
                .unwrap();
            rx.await.unwrap()
        }
    };
    let net = call(
        &b,
        json!({"type": "create_network", "node_id": null, "name": "team", "join_rule": "open"}),
    )
    .await
    .unwrap();
    let net_id = net["network_id"].as_u64().unwrap();
    call(
        &a,
        json!({"type": "join_network", "node_id": null, "network_id": net_id}),
    )
    .await
    .unwrap();

    op(
        &a,
        TrustOp::Request {
            peer: b.id,
            justification: String::new(),
        },
    )
    .await
    .unwrap();
    eventually("both trusted", || async {
        ids(&trusted(&a).await) == [u64::from(b.id)] && ids(&trusted(&b).await) == [u64::from(a.id)]
    })
    .await;
    assert_eq!(trusted(&b).await[0]["network"], net_id);
    assert!(pending(&b).await.is_empty());
    a.daemon.shutdown().await;
    b.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_copy_of_a_rejected_request_is_not_pending_again() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    // B is public so A reaches its port 444 directly without trust.
    let a = node(&reg, &dir.path().join("a"), false).await;
    let b = node(&reg, &dir.path().join("b"), true).await;
    // The request as A's daemon sends it directly ("let me in", signed by A).
    let copy = message("handshake_request", a.id, b.id, &a.key, true, unix_now());
    raw_send(&a.daemon.engine, b.id, &copy).await;
    eventually("B sees the request", || async {
        ids(&pending(&b).await) == vec![u64::from(a.id)]
    })
    .await;
    op(
        &b,
        TrustOp::Reject {
            peer: a.id,
            reason: "no".into(),
        },
    )
    .await
    .unwrap();
    // The same request arriving again through the registry's relay (the copy that took the
    // other path) stays rejected.
    let (tx, rx) = oneshot::channel();
    let relayed = json!({"type": "request_handshake", "from_node_id": a.id,
        "to_node_id": b.id, "justification": "let me in"});
    a.daemon
        .link
        .send(pilotd::registry_link::LinkCmd::Call(relayed, tx))
        .await
        .unwrap();
    rx.await.unwrap().unwrap();
    // B polls its registry inbox every second in these tests.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(pending(&b).await.is_empty(), "{:?}", pending(&b).await);
    // A new request (another justification) is heard.
    op(
        &a,
        TrustOp::Request {
            peer: b.id,
            justification: "please, now".into(),
        },
    )
    .await
    .unwrap();
    eventually("B sees the new request", || async {
        ids(&pending(&b).await) == vec![u64::from(a.id)]
    })
    .await;
    a.daemon.shutdown().await;
    b.daemon.shutdown().await;
}

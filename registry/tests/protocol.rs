#![allow(clippy::unwrap_used)]
//! The registry over real TCP: every message of the v1 catalogue and of the extensions, and
//! every refusal (privacy, trust, tokens, names, frames, garbage, replayed signatures).
//! Each test runs on redb, and again on PostgreSQL in `on_postgresql` (root only).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use pilot_registry::auth::b64;
use pilot_registry::state::Policy;
use pilot_registry::{Config, Registry};
use pilot_registry_client::{sign_v1, Client, ClientError};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

struct Server {
    addr: SocketAddr,
    reg: Registry,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(config: Config, path: Option<&Path>) -> Server {
        // redb, or PostgreSQL when run from `on_postgresql` below.
        let store = crate::pg_cluster::store(path);
        let reg = Registry::open(store, config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let r = reg.clone();
        let done = tokio::spawn(async move {
            r.serve(listener, None, async {
                let _ = rx.await;
            })
            .await
        });
        Server {
            addr,
            reg,
            stop: Some(tx),
            done,
        }
    }

    async fn client(&self) -> Client<TcpStream> {
        Client::connect(self.addr).await.unwrap()
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.done.await;
    }
}

fn open_config() -> Config {
    Config {
        register_per_minute: 0,
        requests_per_ip: 0,
        requests_per_node: 0,
        ..Config::default()
    }
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn pk(k: &SigningKey) -> String {
    b64(k.verifying_key().as_bytes())
}

/// Registers `k` the v1 way (no proof) and returns the reply.
async fn register(c: &mut Client<TcpStream>, k: &SigningKey, port: u16) -> Value {
    c.call(
        &json!({"type": "register", "listen_addr": format!("0.0.0.0:{port}"), "public_key": pk(k)}),
    )
    .await
    .unwrap()
}

async fn register_id(c: &mut Client<TcpStream>, k: &SigningKey) -> u32 {
    id_of(&register(c, k, 4000).await)
}

fn id_of(v: &Value) -> u32 {
    v["node_id"].as_u64().unwrap() as u32
}

fn code(r: Result<Value, ClientError>) -> String {
    match r {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn resolve(
    c: &mut Client<TcpStream>,
    k: &SigningKey,
    me: u32,
    target: u32,
) -> Result<Value, ClientError> {
    c.call(
        &json!({"type": "resolve", "node_id": target, "requester_id": me,
        "signature": sign_v1(k, &format!("resolve:{me}:{target}"))}),
    )
    .await
}

async fn set_public(c: &mut Client<TcpStream>, k: &SigningKey, id: u32, public: bool) {
    c.call(
        &json!({"type": "set_visibility", "node_id": id, "public": public,
        "signature": sign_v1(k, &format!("set_visibility:{id}"))}),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn registration_lookup_and_privacy() {
    let s = Server::start(open_config(), None).await;
    let mut c = s.client().await;
    let (ka, kb) = (key(1), key(2));
    let ra = register(&mut c, &ka, 4000).await;
    assert_eq!(ra["type"], "register_ok");
    let a = id_of(&ra);
    assert_eq!(
        ra["address"],
        format!("0:0000.{:04X}.{:04X}", a >> 16, a & 0xffff)
    );
    // Default hostname: pilot- and 8 hex digits of SHA-256 of the key.
    let h = ra["hostname"].as_str().unwrap();
    assert!(h.starts_with("pilot-") && h.len() == 14, "{h}");
    let b = register_id(&mut c, &kb).await;
    assert_ne!(a, b);

    // Same key again: same node.
    assert_eq!(id_of(&register(&mut c, &ka, 4001).await), a);

    // Private by default: lookup hides the endpoint, resolve is refused.
    let l = c
        .call(&json!({"type": "lookup", "node_id": b}))
        .await
        .unwrap();
    assert_eq!(l["public"], false);
    assert!(l.get("real_addr").is_none(), "{l}");
    assert_eq!(l["public_key"], pk(&kb));
    assert_eq!(code(resolve(&mut c, &ka, a, b).await), "forbidden");

    // Public: both show the endpoint (the TCP source IP and the given port).
    set_public(&mut c, &kb, b, true).await;
    let l = c
        .call(&json!({"type": "lookup", "node_id": b}))
        .await
        .unwrap();
    assert_eq!(l["real_addr"], "127.0.0.1:4000");
    let r = resolve(&mut c, &ka, a, b).await.unwrap();
    assert_eq!(r["real_addr"], "127.0.0.1:4000");

    // Resolve must be signed by the requester.
    let forged = c
        .call(&json!({"type": "resolve", "node_id": b, "requester_id": a,
            "signature": sign_v1(&kb, &format!("resolve:{a}:{b}"))}))
        .await;
    assert_eq!(code(forged), "unauthorized");
    let unsigned = c
        .call(&json!({"type": "resolve", "node_id": b, "requester_id": a}))
        .await;
    assert_eq!(code(unsigned), "unauthorized");

    // Heartbeat, unknown nodes, deregistration.
    let hb = c
        .call(&json!({"type": "heartbeat", "node_id": a, "signature": sign_v1(&ka, &format!("heartbeat:{a}"))}))
        .await
        .unwrap();
    assert_eq!(hb["type"], "heartbeat_ok");
    assert_eq!(
        code(c.call(&json!({"type": "lookup", "node_id": 999_999})).await),
        "not_found"
    );
    c.call(&json!({"type": "deregister", "node_id": b, "signature": sign_v1(&kb, &format!("deregister:{b}"))}))
        .await
        .unwrap();
    assert_eq!(
        code(c.call(&json!({"type": "lookup", "node_id": b})).await),
        "not_found"
    );
    // Back with the same key: the same ID, private again.
    let rb = register(&mut c, &kb, 4000).await;
    assert_eq!(id_of(&rb), b);
    let l = c
        .call(&json!({"type": "lookup", "node_id": b}))
        .await
        .unwrap();
    assert_eq!(l["public"], false);
    s.stop().await;
}

#[tokio::test]
async fn keys_are_validated_and_never_issued() {
    let s = Server::start(open_config(), None).await;
    let mut c = s.client().await;
    let bad = c
        .call(&json!({"type": "register", "listen_addr": ":4000", "public_key": "not base64!"}))
        .await;
    assert_eq!(code(bad), "bad_request");
    // The identity point is a weak key.
    let mut weak = [0u8; 32];
    weak[0] = 1;
    let w = c
        .call(&json!({"type": "register", "listen_addr": ":4000", "public_key": b64(&weak)}))
        .await;
    assert_eq!(code(w), "bad_request");
    // No key at all: v1 would generate one; this registry never issues private keys.
    let none = c
        .call(&json!({"type": "register", "listen_addr": ":4000"}))
        .await;
    assert_eq!(code(none), "bad_request");
    let r = register(&mut c, &key(3), 4000).await;
    assert!(r.get("private_key").is_none());
    s.stop().await;
}

#[tokio::test]
async fn hostnames_tags_and_task_exec() {
    let s = Server::start(open_config(), None).await;
    let mut c = s.client().await;
    let (ka, kb) = (key(1), key(2));
    let ra = c
        .call(&json!({"type": "register", "listen_addr": ":4000", "public_key": pk(&ka), "hostname": "alpha"}))
        .await
        .unwrap();
    assert_eq!(ra["hostname"], "alpha");
    let a = id_of(&ra);
    // Taken and invalid names do not block registration.
    let rb = c
        .call(&json!({"type": "register", "listen_addr": ":4000", "public_key": pk(&kb), "hostname": "alpha"}))
        .await
        .unwrap();
    assert!(
        rb["hostname_error"].as_str().unwrap().contains("taken"),
        "{rb}"
    );
    let b = id_of(&rb);
    let rc = c
        .call(&json!({"type": "register", "listen_addr": ":4000", "public_key": pk(&key(3)), "hostname": "Bad Name!"}))
        .await
        .unwrap();
    assert!(rc.get("hostname_error").is_some(), "{rc}");

    let set = |k: &SigningKey, id: u32, h: &str| json!({"type": "set_hostname", "node_id": id, "hostname": h, "signature": sign_v1(k, &format!("set_hostname:{id}"))});
    assert_eq!(code(c.call(&set(&kb, b, "alpha")).await), "conflict");
    assert_eq!(code(c.call(&set(&kb, b, "-nope")).await), "bad_request");
    assert_eq!(
        code(c.call(&set(&kb, b, &"x".repeat(64))).await),
        "bad_request"
    );
    c.call(&set(&kb, b, "beta")).await.unwrap();

    // Resolve by hostname gives the address; the endpoint still needs the resolve rule.
    let r = c
        .call(&json!({"type": "resolve_hostname", "hostname": "beta"}))
        .await
        .unwrap();
    assert_eq!(id_of(&r), b);
    assert_eq!(r["public"], false);
    assert!(r.get("real_addr").is_none());
    assert_eq!(
        code(
            c.call(&json!({"type": "resolve_hostname", "hostname": "nobody"}))
                .await
        ),
        "not_found"
    );
    // Clearing frees the name.
    c.call(&set(&ka, a, "")).await.unwrap();
    c.call(&set(&kb, b, "alpha")).await.unwrap();

    let tags = c
        .call(
            &json!({"type": "set_tags", "node_id": b, "tags": ["gpu", "#vision"],
            "signature": sign_v1(&kb, &format!("set_tags:{b}"))}),
        )
        .await
        .unwrap();
    assert!(tags["tags"].as_array().unwrap().len() == 2, "{tags}");
    let too_many: Vec<String> = (0..50).map(|i| format!("t{i}")).collect();
    let r = c
        .call(&json!({"type": "set_tags", "node_id": b, "tags": too_many,
            "signature": sign_v1(&kb, &format!("set_tags:{b}"))}))
        .await;
    assert_eq!(code(r), "bad_request");
    c.call(
        &json!({"type": "set_task_exec", "node_id": b, "enabled": true,
        "signature": sign_v1(&kb, &format!("set_task_exec:{b}"))}),
    )
    .await
    .unwrap();
    let l = c
        .call(&json!({"type": "lookup", "node_id": b}))
        .await
        .unwrap();
    assert_eq!(l["task_exec"], true);
    assert_eq!(l["hostname"], "alpha");
    s.stop().await;
}

async fn request_handshake(
    c: &mut Client<TcpStream>,
    k: &SigningKey,
    from: u32,
    to: u32,
    why: &str,
) -> Result<Value, ClientError> {
    c.call(&json!({"type": "request_handshake", "from_node_id": from, "to_node_id": to, "justification": why,
        "signature": sign_v1(k, &format!("handshake:{from}:{to}"))}))
        .await
}

async fn respond(
    c: &mut Client<TcpStream>,
    k: &SigningKey,
    me: u32,
    peer: u32,
    accept: bool,
) -> Result<Value, ClientError> {
    c.call(
        &json!({"type": "respond_handshake", "node_id": me, "peer_id": peer, "accept": accept,
        "signature": sign_v1(k, &format!("respond:{me}:{peer}"))}),
    )
    .await
}

async fn poll(c: &mut Client<TcpStream>, k: &SigningKey, me: u32) -> Value {
    c.call(&json!({"type": "poll_handshakes", "node_id": me, "signature": sign_v1(k, &format!("poll_handshakes:{me}"))}))
        .await
        .unwrap()
}

#[tokio::test]
async fn trust_needs_both_sides() {
    let s = Server::start(open_config(), None).await;
    let mut c = s.client().await;
    let (ka, kb, kc) = (key(1), key(2), key(3));
    let a = register_id(&mut c, &ka).await;
    let b = register_id(&mut c, &kb).await;
    let x = register_id(&mut c, &kc).await;

    // One side alone never creates a pair (v1's report_trust and unsolicited accept do).
    let r = c
        .call(&json!({"type": "report_trust", "node_id": x, "peer_id": b,
            "signature": sign_v1(&kc, &format!("report_trust:{x}:{b}"))}))
        .await
        .unwrap();
    assert_eq!(r["mutual"], false);
    respond(&mut c, &kc, x, b, true).await.unwrap();
    assert_eq!(code(resolve(&mut c, &kc, x, b).await), "forbidden");
    assert!(!s.reg.may_reach(x, b));

    // Request with a justification, seen by the target's poll.
    request_handshake(&mut c, &ka, a, b, "need your GPU")
        .await
        .unwrap();
    assert_eq!(
        code(request_handshake(&mut c, &ka, a, b, "again").await),
        "conflict"
    );
    let p = poll(&mut c, &kb, b).await;
    let reqs = p["requests"].as_array().unwrap();
    assert!(
        reqs.iter()
            .any(|r| r["from_node_id"] == a && r["justification"] == "need your GPU"),
        "{p}"
    );
    assert_eq!(code(resolve(&mut c, &ka, a, b).await), "forbidden");
    // Accepting forms the pair; the requester learns it by polling.
    respond(&mut c, &kb, b, a, true).await.unwrap();
    assert!(resolve(&mut c, &ka, a, b).await.is_ok());
    assert!(resolve(&mut c, &kb, b, a).await.is_ok());
    let p = poll(&mut c, &ka, a).await;
    assert!(
        p["responses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["from_node_id"] == b && r["accept"] == true),
        "{p}"
    );
    // Revocation by either side ends it.
    c.call(&json!({"type": "revoke_trust", "node_id": b, "peer_id": a,
        "signature": sign_v1(&kb, &format!("revoke_trust:{b}:{a}"))}))
        .await
        .unwrap();
    assert_eq!(code(resolve(&mut c, &ka, a, b).await), "forbidden");

    // Rejection: no pair, and the requester hears no.
    request_handshake(&mut c, &ka, a, b, "please")
        .await
        .unwrap();
    respond(&mut c, &kb, b, a, false).await.unwrap();
    assert_eq!(code(resolve(&mut c, &ka, a, b).await), "forbidden");
    let p = poll(&mut c, &ka, a).await;
    assert!(
        p["responses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["accept"] == false),
        "{p}"
    );

    // Both asking each other is mutual consent.
    request_handshake(&mut c, &ka, a, x, "hi").await.unwrap();
    request_handshake(&mut c, &kc, x, a, "hi").await.unwrap();
    assert!(resolve(&mut c, &ka, a, x).await.is_ok());

    // Requests are signed by the requester.
    let forged = c
        .call(&json!({"type": "request_handshake", "from_node_id": b, "to_node_id": x, "justification": "",
            "signature": sign_v1(&ka, &format!("handshake:{b}:{x}"))}))
        .await;
    assert_eq!(code(forged), "unauthorized");
    // Oversized justification.
    assert_eq!(
        code(request_handshake(&mut c, &kb, b, x, &"j".repeat(2000)).await),
        "bad_request"
    );
    s.stop().await;
}

#[tokio::test]
async fn one_requester_cannot_fill_an_inbox() {
    let s = Server::start(open_config(), None).await;
    let mut c = s.client().await;
    let spam = key(200);
    let spammer = register_id(&mut c, &spam).await;
    let mut refused = None;
    for i in 0..70u32 {
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&i.to_be_bytes());
        seed[31] = 7;
        let t = register_id(&mut c, &SigningKey::from_bytes(&seed)).await;
        if let Err(e) = request_handshake(&mut c, &spam, spammer, t, "buy").await {
            refused = Some((i, e));
            break;
        }
    }
    let (at, e) = refused.expect("outstanding requests are bounded");
    assert_eq!(at, 64, "the 65th outstanding request is refused");
    assert!(
        matches!(e, ClientError::Refused { ref code, .. } if code == "throttled"),
        "{e}"
    );
    s.stop().await;
}

#[tokio::test]
async fn handshake_requests_are_pushed_to_a_watching_target() {
    let s = Server::start(open_config(), None).await;
    let mut c = s.client().await;
    let (ka, kb) = (key(1), key(2));
    let a = register_id(&mut c, &ka).await;
    // The target registers with proof: its session is bound, then it watches.
    let mut w = s.client().await;
    let rb = w.register_proven(&kb, ":4000", None).await.unwrap();
    let b = id_of(&rb);
    let ok = w.call(&json!({"type": "watch"})).await.unwrap();
    assert_eq!(ok["type"], "watch_ok");
    let sent = Instant::now();
    request_handshake(&mut c, &ka, a, b, "push me")
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("pushed, not left for the 30 s poll")
        .unwrap();
    let latency = sent.elapsed();
    println!("handshake push latency: {latency:?}");
    assert_eq!(ev["type"], "handshake_request");
    assert_eq!(ev["from_node_id"], a);
    assert_eq!(ev["justification"], "push me");
    // The answer is pushed to a watching requester too.
    let mut wa = s.client().await;
    wa.authenticate(a, &ka).await.unwrap();
    wa.call(&json!({"type": "watch"})).await.unwrap();
    let mut cb = s.client().await;
    cb.authenticate(b, &kb).await.unwrap();
    cb.call(&json!({"type": "respond_handshake", "node_id": b, "peer_id": a, "accept": true}))
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), wa.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev["type"], "handshake_response");
    assert_eq!(ev["accept"], true);
    // Watching needs an authenticated session.
    let mut anon = s.client().await;
    assert_eq!(
        code(anon.call(&json!({"type": "watch"})).await),
        "unauthorized"
    );
    s.stop().await;
}

#[tokio::test]
async fn authenticated_nodes_refuse_replayed_fixed_signatures() {
    let s = Server::start(open_config(), None).await;
    let mut v1 = s.client().await;
    let k = key(9);
    let id = register_id(&mut v1, &k).await;
    // A v1 daemon's heartbeat signature: a fixed string, valid forever for v1 nodes.
    let captured = json!({"type": "heartbeat", "node_id": id, "signature": sign_v1(&k, &format!("heartbeat:{id}"))});
    v1.call(&captured).await.unwrap();
    v1.call(&captured).await.unwrap();

    // Once the node authenticates a session, fixed strings are refused on any connection.
    let mut ours = s.client().await;
    ours.authenticate(id, &k).await.unwrap();
    ours.call(&json!({"type": "heartbeat", "node_id": id}))
        .await
        .unwrap();
    let mut attacker = s.client().await;
    assert_eq!(code(attacker.call(&captured).await), "unauthorized");

    // A session signature is bound to its nonce: replaying it on a new session fails.
    let mut c1 = s.client().await;
    let nonce = c1.hello().await.unwrap();
    let sig = sign_v1(&k, &pilot_registry::auth::session_message(&nonce, id));
    c1.call(&json!({"type": "auth", "node_id": id, "signature": sig}))
        .await
        .unwrap();
    let mut c2 = s.client().await;
    c2.hello().await.unwrap();
    let replay = c2
        .call(&json!({"type": "auth", "node_id": id, "signature": sig}))
        .await;
    assert_eq!(code(replay), "unauthorized");
    // Auth without hello, and with another node's key, fail.
    let mut c3 = s.client().await;
    assert_eq!(
        code(
            c3.call(&json!({"type": "auth", "node_id": id, "signature": sig}))
                .await
        ),
        "unauthorized"
    );
    assert!(c3.authenticate(id, &key(10)).await.is_err());

    // Unproven re-registration of an authenticating node's key is refused; a proof works.
    let again = v1
        .call(&json!({"type": "register", "listen_addr": ":4001", "public_key": pk(&k)}))
        .await;
    assert_eq!(code(again), "unauthorized");
    let mut c4 = s.client().await;
    let r = c4.register_proven(&k, ":4001", None).await.unwrap();
    assert_eq!(id_of(&r), id);
    // A proof made for another nonce fails.
    let mut c5 = s.client().await;
    c5.hello().await.unwrap();
    let proof = sign_v1(
        &k,
        &pilot_registry::auth::register_message("stale", &pk(&k)),
    );
    let r = c5
        .call(&json!({"type": "register", "listen_addr": ":4001", "public_key": pk(&k), "proof": proof}))
        .await;
    assert_eq!(code(r), "unauthorized");
    s.stop().await;
}

#[tokio::test]
async fn owners_and_key_rotation() {
    let s = Server::start(open_config(), None).await;
    let mut c = s.client().await;
    let (k1, k2, k3) = (key(1), key(2), key(3));
    let r = c
        .call(&json!({"type": "register", "listen_addr": ":4000", "public_key": pk(&k1), "owner": "ops@example.com"}))
        .await
        .unwrap();
    let id = id_of(&r);
    // v1 lets a new key with the same owner take the node over; here it is refused.
    let takeover = c
        .call(&json!({"type": "register", "listen_addr": ":4000", "public_key": pk(&k2), "owner": "ops@example.com"}))
        .await;
    assert_eq!(code(takeover), "conflict");
    // Rotation signed by the current key.
    let forged = c
        .call(
            &json!({"type": "rotate_key", "node_id": id, "new_public_key": pk(&k2),
            "signature": sign_v1(&k2, &format!("rotate:{id}"))}),
        )
        .await;
    assert_eq!(code(forged), "unauthorized");
    let r = c
        .call(
            &json!({"type": "rotate_key", "node_id": id, "new_public_key": pk(&k2),
            "signature": sign_v1(&k1, &format!("rotate:{id}"))}),
        )
        .await
        .unwrap();
    assert_eq!(r["public_key"], pk(&k2));
    let l = c
        .call(&json!({"type": "lookup", "node_id": id}))
        .await
        .unwrap();
    assert_eq!(l["public_key"], pk(&k2));
    // The old key no longer signs for the node; the new one does.
    let hb = |k: &SigningKey| json!({"type": "heartbeat", "node_id": id, "signature": sign_v1(k, &format!("heartbeat:{id}"))});
    assert_eq!(code(c.call(&hb(&k1)).await), "unauthorized");
    c.call(&hb(&k2)).await.unwrap();
    // A key registered elsewhere cannot be rotated onto.
    let other = register_id(&mut c, &k3).await;
    let clash = c
        .call(
            &json!({"type": "rotate_key", "node_id": id, "new_public_key": pk(&k3),
            "signature": sign_v1(&k2, &format!("rotate:{id}"))}),
        )
        .await;
    assert_eq!(code(clash), "conflict");
    assert_ne!(other, id);
    s.stop().await;
}

fn net_req(kind: &str, k: &SigningKey, id: u32, net: u16, extra: Value) -> Value {
    let mut v = json!({"type": kind, "node_id": id, "network_id": net,
        "signature": sign_v1(k, &format!("{kind}:{id}:{net}"))});
    if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
        m.extend(e);
    }
    v
}

async fn create(
    c: &mut Client<TcpStream>,
    k: &SigningKey,
    id: u32,
    name: &str,
    rule: &str,
    extra: Value,
) -> Result<Value, ClientError> {
    let mut v = json!({"type": "create_network", "node_id": id, "name": name, "join_rule": rule,
        "signature": sign_v1(k, &format!("create_network:{id}:{name}"))});
    if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
        m.extend(e);
    }
    c.call(&v).await
}

#[tokio::test]
async fn networks_with_each_join_rule() {
    let s = Server::start(open_config(), None).await;
    let mut c = s.client().await;
    let (ka, kb, kc) = (key(1), key(2), key(3));
    let a = register_id(&mut c, &ka).await;
    let b = register_id(&mut c, &kb).await;
    let x = register_id(&mut c, &kc).await;

    let open = create(&mut c, &ka, a, "lab", "open", json!({}))
        .await
        .unwrap();
    let open = open["network_id"].as_u64().unwrap() as u16;
    assert!(open > 0);
    assert_eq!(
        code(create(&mut c, &kb, b, "lab", "open", json!({})).await),
        "conflict"
    );
    assert_eq!(
        code(create(&mut c, &kb, b, "Bad Name", "open", json!({})).await),
        "bad_request"
    );
    assert_eq!(
        code(create(&mut c, &kb, b, "x1", "weird", json!({})).await),
        "bad_request"
    );
    assert_eq!(
        code(create(&mut c, &kb, b, "x2", "token", json!({})).await),
        "bad_request"
    );

    // Open: anyone joins; members reach each other while private.
    let j = c
        .call(&net_req("join_network", &kb, b, open, json!({})))
        .await
        .unwrap();
    assert_eq!(
        j["address"],
        format!("{open}:{open:04X}.{:04X}.{:04X}", b >> 16, b & 0xffff)
    );
    assert!(resolve(&mut c, &ka, a, b).await.is_ok());
    assert_eq!(code(resolve(&mut c, &kc, x, b).await), "forbidden");
    let nodes = c
        .call(&json!({"type": "list_nodes", "network_id": open}))
        .await
        .unwrap();
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 2);
    let l = c
        .call(&json!({"type": "lookup", "node_id": b}))
        .await
        .unwrap();
    assert!(l["networks"].as_array().unwrap().contains(&json!(open)));

    // Token.
    let tok = create(
        &mut c,
        &ka,
        a,
        "secret-lab",
        "token",
        json!({"token": "s3cret"}),
    )
    .await
    .unwrap();
    let tok = tok["network_id"].as_u64().unwrap() as u16;
    let wrong = c
        .call(&net_req(
            "join_network",
            &kc,
            x,
            tok,
            json!({"token": "guess"}),
        ))
        .await;
    assert_eq!(code(wrong), "forbidden");
    c.call(&net_req(
        "join_network",
        &kc,
        x,
        tok,
        json!({"token": "s3cret"}),
    ))
    .await
    .unwrap();

    // Invite-only: refused until a member invites.
    let inv = create(&mut c, &ka, a, "club", "invite", json!({}))
        .await
        .unwrap();
    let inv = inv["network_id"].as_u64().unwrap() as u16;
    assert_eq!(
        code(
            c.call(&net_req("join_network", &kb, b, inv, json!({})))
                .await
        ),
        "forbidden"
    );
    // A non-member cannot invite.
    let bad_invite = c
        .call(
            &json!({"type": "invite_network", "node_id": x, "network_id": inv, "target_id": b,
            "signature": sign_v1(&kc, &format!("invite_network:{x}:{inv}:{b}"))}),
        )
        .await;
    assert_eq!(code(bad_invite), "forbidden");
    c.call(
        &json!({"type": "invite_network", "node_id": a, "network_id": inv, "target_id": b,
        "signature": sign_v1(&ka, &format!("invite_network:{a}:{inv}:{b}"))}),
    )
    .await
    .unwrap();
    c.call(&net_req("join_network", &kb, b, inv, json!({})))
        .await
        .unwrap();

    // Leaving; the backbone cannot be left nor listed.
    c.call(&net_req("leave_network", &kb, b, open, json!({})))
        .await
        .unwrap();
    assert_eq!(
        code(
            c.call(&net_req("leave_network", &kb, b, open, json!({})))
                .await
        ),
        "not_found"
    );
    assert_eq!(
        code(
            c.call(&net_req("leave_network", &kb, b, 0, json!({})))
                .await
        ),
        "forbidden"
    );
    assert_eq!(
        code(
            c.call(&json!({"type": "list_nodes", "network_id": 0}))
                .await
        ),
        "forbidden"
    );
    let nets = c.call(&json!({"type": "list_networks"})).await.unwrap();
    let names: Vec<&str> = nets["networks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, ["backbone", "lab", "secret-lab", "club"]);
    // Network operations are signed by the node.
    let forged = c
        .call(&net_req("join_network", &ka, x, open, json!({})))
        .await;
    assert_eq!(code(forged), "unauthorized");
    s.stop().await;
}

#[tokio::test]
async fn tokens_gate_administration_scores_and_beacons() {
    let config = Config {
        policy: Policy {
            admin_token: Some("admin-secret".into()),
            beacon_token: Some("beacon-secret".into()),
        },
        ..open_config()
    };
    let s = Server::start(config, None).await;
    let mut c = s.client().await;
    let (ka, kb) = (key(1), key(2));
    let a = register_id(&mut c, &ka).await;
    let b = register_id(&mut c, &kb).await;
    assert_eq!(
        code(create(&mut c, &ka, a, "lab", "open", json!({})).await),
        "forbidden"
    );
    assert_eq!(
        code(
            create(
                &mut c,
                &ka,
                a,
                "lab",
                "open",
                json!({"admin_token": "nope"})
            )
            .await
        ),
        "forbidden"
    );
    create(
        &mut c,
        &ka,
        a,
        "lab",
        "open",
        json!({"admin_token": "admin-secret"}),
    )
    .await
    .unwrap();

    // Scores change only with the admin token.
    let upd = |t: Option<&str>| json!({"type": "update_polo_score", "node_id": b, "delta": 5, "admin_token": t});
    assert_eq!(code(c.call(&upd(None)).await), "forbidden");
    assert_eq!(code(c.call(&upd(Some("x"))).await), "forbidden");
    assert_eq!(
        c.call(&upd(Some("admin-secret"))).await.unwrap()["polo_score"],
        5
    );
    let set = c
        .call(&json!({"type": "set_polo_score", "node_id": b, "polo_score": -2, "admin_token": "admin-secret"}))
        .await
        .unwrap();
    assert_eq!(set["polo_score"], -2);
    let get = c
        .call(&json!({"type": "get_polo_score", "node_id": b}))
        .await
        .unwrap();
    assert_eq!(get["polo_score"], -2);

    // Beacons ask reachability with their token.
    let reach = |t: &str| json!({"type": "reachable", "from": a, "to": b, "beacon_token": t});
    assert_eq!(code(c.call(&reach("guess")).await), "forbidden");
    assert_eq!(
        c.call(&reach("beacon-secret")).await.unwrap()["allowed"],
        false
    );
    set_public(&mut c, &kb, b, true).await;
    assert_eq!(
        c.call(&reach("beacon-secret")).await.unwrap()["allowed"],
        true
    );
    let br = c
        .call(&json!({"type": "beacon_register", "beacon_id": 7, "addr": "127.0.0.1:9001"}))
        .await
        .unwrap();
    assert_eq!(br["beacon_id"], 7);
    let bl = c.call(&json!({"type": "beacon_list"})).await.unwrap();
    assert_eq!(bl["beacons"][0]["addr"], "127.0.0.1:9001");
    s.stop().await;
}

#[tokio::test]
async fn punch_needs_the_resolve_rule() {
    let s = Server::start(open_config(), None).await;
    let mut c = s.client().await;
    let (ka, kb) = (key(1), key(2));
    let a = register_id(&mut c, &ka).await;
    let b = register_id(&mut c, &kb).await;
    let punch = |k: &SigningKey| {
        json!({"type": "punch", "requester_id": a, "node_a": a, "node_b": b,
            "signature": sign_v1(k, &format!("punch:{a}:{b}"))})
    };
    // v1 hands out the victim's endpoint here without any trust.
    assert_eq!(code(c.call(&punch(&ka)).await), "forbidden");
    assert_eq!(code(c.call(&punch(&kb)).await), "unauthorized");
    set_public(&mut c, &kb, b, true).await;
    let p = c.call(&punch(&ka)).await.unwrap();
    assert_eq!(p["node_b_addr"], "127.0.0.1:4000");
    let third = c
        .call(&json!({"type": "punch", "requester_id": 77, "node_a": a, "node_b": b}))
        .await;
    // An unknown, unsigned requester.
    assert_eq!(code(third), "not_found");
    s.stop().await;
}

#[tokio::test]
async fn garbage_and_oversized_frames_never_disturb_other_clients() {
    let s = Server::start(open_config(), None).await;
    let mut good = s.client().await;
    let k = key(1);
    let id = register_id(&mut good, &k).await;

    // Malformed JSON, unknown type, wrong field types: an error reply, the connection lives.
    for body in [
        &b"{not json"[..],
        b"{\"type\":\"teleport\"}",
        b"{\"type\":\"lookup\",\"node_id\":\"x\"}",
        b"\xff\xfe\x00",
    ] {
        let mut raw = (body.len() as u32).to_be_bytes().to_vec();
        raw.extend_from_slice(body);
        // Send the raw frame through a bare socket to control the bytes exactly.
        let mut sock = TcpStream::connect(s.addr).await.unwrap();
        sock.write_all(&raw).await.unwrap();
        let mut len = [0u8; 4];
        sock.read_exact(&mut len).await.unwrap();
        let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
        sock.read_exact(&mut reply).await.unwrap();
        let v: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["code"], "bad_request", "{v}");
        // Same socket still answers.
        let req = serde_json::to_vec(&json!({"type": "lookup", "node_id": id})).unwrap();
        let mut raw = (req.len() as u32).to_be_bytes().to_vec();
        raw.extend_from_slice(&req);
        sock.write_all(&raw).await.unwrap();
        sock.read_exact(&mut len).await.unwrap();
        let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
        sock.read_exact(&mut reply).await.unwrap();
        let v: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(v["type"], "lookup_ok", "{v}");
    }

    // A frame over 1 MiB: an error, then the connection is closed.
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(&(2u32 << 20).to_be_bytes()).await.unwrap();
    let mut len = [0u8; 4];
    sock.read_exact(&mut len).await.unwrap();
    let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
    sock.read_exact(&mut reply).await.unwrap();
    let v: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(v["code"], "bad_request");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "closed after an oversized frame");

    // Random bytes and a half-sent frame from many sockets at once.
    let mut junk = Vec::new();
    for i in 0..20u8 {
        let mut s2 = TcpStream::connect(s.addr).await.unwrap();
        let bytes: Vec<u8> = (0..300u32)
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i))
            .collect();
        let _ = s2.write_all(&bytes).await;
        junk.push(s2);
    }
    let mut half = TcpStream::connect(s.addr).await.unwrap();
    half.write_all(&100u32.to_be_bytes()).await.unwrap();
    half.write_all(b"{\"type\"").await.unwrap();

    // The well-behaved client is served throughout.
    let t = Instant::now();
    let l = good
        .call(&json!({"type": "lookup", "node_id": id}))
        .await
        .unwrap();
    assert_eq!(l["type"], "lookup_ok");
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(junk);
    s.stop().await;
}

#[tokio::test]
async fn rate_limits_answer_throttled() {
    let config = Config {
        register_per_minute: 3,
        requests_per_ip: 20,
        requests_per_node: 0,
        ..Config::default()
    };
    let s = Server::start(config, None).await;
    let mut c = s.client().await;
    // New keys per address per minute.
    let mut throttled_at = None;
    for i in 0..10u8 {
        let r = c
            .call(&json!({"type": "register", "listen_addr": ":4000", "public_key": pk(&key(100 + i))}))
            .await;
        if let Err(ClientError::Refused { code, .. }) = &r {
            assert_eq!(code, "throttled");
            throttled_at = Some(i);
            break;
        }
    }
    assert_eq!(throttled_at, Some(3));
    // Requests per address per second (burst twice the rate).
    let mut throttled = 0;
    for _ in 0..200 {
        if let Err(ClientError::Refused { code, .. }) =
            c.call(&json!({"type": "list_networks"})).await
        {
            assert_eq!(code, "throttled");
            throttled += 1;
        }
    }
    assert!(throttled > 100, "{throttled} of 200 throttled");
    let metrics = s.reg.metrics_text();
    assert!(metrics.contains("throttled"), "{metrics}");
    s.stop().await;
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let (ka, kb, kc) = (key(1), key(2), key(3));
    let (a, b, x, net);
    {
        let s = Server::start(open_config(), Some(&path)).await;
        let mut c = s.client().await;
        a = id_of(
            &c.call(
                &json!({"type": "register", "listen_addr": ":4000", "public_key": pk(&ka),
                "hostname": "alpha", "owner": "a@example.com"}),
            )
            .await
            .unwrap(),
        );
        b = register_id(&mut c, &kb).await;
        x = register_id(&mut c, &kc).await;
        set_public(&mut c, &kc, x, true).await;
        c.call(&json!({"type": "set_tags", "node_id": b, "tags": ["gpu"],
            "signature": sign_v1(&kb, &format!("set_tags:{b}"))}))
            .await
            .unwrap();
        let n = create(&mut c, &ka, a, "lab", "token", json!({"token": "t0k"}))
            .await
            .unwrap();
        net = n["network_id"].as_u64().unwrap() as u16;
        c.call(&net_req(
            "join_network",
            &kc,
            x,
            net,
            json!({"token": "t0k"}),
        ))
        .await
        .unwrap();
        request_handshake(&mut c, &ka, a, b, "trust me")
            .await
            .unwrap();
        respond(&mut c, &kb, b, a, true).await.unwrap();
        request_handshake(&mut c, &kc, x, b, "pending one")
            .await
            .unwrap();
        s.stop().await;
    }
    let s = Server::start(open_config(), Some(&path)).await;
    let mut c = s.client().await;
    let l = c
        .call(&json!({"type": "lookup", "node_id": a}))
        .await
        .unwrap();
    assert_eq!(l["hostname"], "alpha");
    assert_eq!(l["public_key"], pk(&ka));
    assert!(l["networks"].as_array().unwrap().contains(&json!(net)));
    let lb = c
        .call(&json!({"type": "lookup", "node_id": b}))
        .await
        .unwrap();
    assert_eq!(lb["tags"][0], "gpu");
    let lx = c
        .call(&json!({"type": "lookup", "node_id": x}))
        .await
        .unwrap();
    assert_eq!(lx["public"], true);
    // Trust pair, pending request, owner, network token, ID counter.
    assert!(resolve(&mut c, &ka, a, b).await.is_ok());
    let p = poll(&mut c, &kb, b).await;
    assert!(
        p["requests"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["justification"] == "pending one"),
        "{p}"
    );
    let takeover = c
        .call(&json!({"type": "register", "listen_addr": ":4000", "public_key": pk(&key(50)), "owner": "a@example.com"}))
        .await;
    assert_eq!(code(takeover), "conflict");
    let wrong = c
        .call(&net_req(
            "join_network",
            &kb,
            b,
            net,
            json!({"token": "bad"}),
        ))
        .await;
    assert_eq!(code(wrong), "forbidden");
    let fresh = register_id(&mut c, &key(60)).await;
    assert!(fresh > a.max(b).max(x), "IDs are never reused: {fresh}");
    assert_eq!(id_of(&register(&mut c, &kb, 4000).await), b);
    s.stop().await;
}

#[tokio::test]
async fn tls_carries_the_same_protocol() {
    use std::sync::Arc;
    let (cert, key_pem, _fp) = pilot_registry::server::self_signed().unwrap();
    let acceptor =
        pilot_registry::server::tls_from_pem(cert.as_bytes(), key_pem.as_bytes()).unwrap();
    let reg = Registry::open(crate::pg_cluster::store(None), open_config()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let served = tokio::spawn(reg.clone().serve(listener, Some(acceptor), async {
        let _ = rx.await;
    }));

    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut cert.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let mut c = Client::new(tls);
    let r = c
        .call(&json!({"type": "register", "listen_addr": ":4000", "public_key": pk(&key(1))}))
        .await
        .unwrap();
    assert_eq!(r["type"], "register_ok");

    // Plain TCP to a TLS listener gets nothing but a closed connection.
    let mut plain = Client::connect(addr).await.unwrap();
    assert!(plain.call(&json!({"type": "list_networks"})).await.is_err());
    let _ = tx.send(());
    served.await.unwrap();
}

/// The refusal's code and message.
fn refusal(r: Result<Value, ClientError>) -> (String, String) {
    match r {
        Err(ClientError::Refused { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Registers `k` with a proof as daemon instance `instance`, listening on `port`.
async fn register_as(
    c: &mut Client<TcpStream>,
    k: &SigningKey,
    port: u16,
    instance: &str,
) -> Result<Value, ClientError> {
    c.register_instance(k, &format!("0.0.0.0:{port}"), None, Some(instance))
        .await
}

#[tokio::test]
async fn a_second_live_daemon_of_one_node_is_refused_and_the_first_is_told() {
    let s = Server::start(open_config(), None).await;
    let k = key(21);
    // The serving daemon: its session, and its watching connection.
    let mut first = s.client().await;
    let id = id_of(&register_as(&mut first, &k, 4000, "aaaa").await.unwrap());
    set_public(&mut first, &k, id, true).await;
    let mut watch = s.client().await;
    watch.authenticate(id, &k).await.unwrap();
    watch.call(&json!({"type": "watch"})).await.unwrap();

    // A copy of its identity, started elsewhere: refused, with who holds the node and why.
    let mut second = s.client().await;
    let (code, message) = refusal(register_as(&mut second, &k, 5000, "bbbb").await);
    assert_eq!(code, "duplicate_instance");
    for part in [
        format!("node {id}"),
        "instance aaaa".into(),
        "endpoint 127.0.0.1:4000".into(),
        "since unix time".into(),
        "Stop the other daemon".into(),
        "identity directory was copied".into(),
    ] {
        assert!(message.contains(&part), "{part:?} not in {message:?}");
    }

    // The first daemon is told at once on its watching connection...
    let ev = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("the refusal is pushed to the serving daemon")
        .unwrap();
    assert_eq!(ev["type"], "duplicate_instance");
    assert_eq!(ev["node_id"], id);
    assert_eq!(ev["instance"], "bbbb");
    assert_eq!(ev["endpoint"], "127.0.0.1:5000");
    assert!(ev["message"].as_str().unwrap().contains("it was refused"));
    // ...and in its next heartbeat reply, once.
    let hb = json!({"type": "heartbeat", "node_id": id, "instance": "aaaa"});
    let v = first.call(&hb).await.unwrap();
    assert_eq!(v["duplicate_instance"]["instance"], "bbbb");
    let v = first.call(&hb).await.unwrap();
    assert!(v.get("duplicate_instance").is_none(), "{v}");

    // The refused daemon changes nothing: its endpoint is not taken, and even on a session
    // it authenticates with the shared key, its heartbeats and its deregistration are
    // refused.
    let mut c = s.client().await;
    let look = c
        .call(&json!({"type": "lookup", "node_id": id}))
        .await
        .unwrap();
    assert_eq!(look["real_addr"], "127.0.0.1:4000");
    second.authenticate(id, &k).await.unwrap();
    let r = second
        .call(&json!({"type": "heartbeat", "node_id": id, "instance": "bbbb"}))
        .await;
    assert_eq!(refusal(r).0, "duplicate_instance");
    let r = second
        .call(&json!({"type": "deregister", "node_id": id, "instance": "bbbb"}))
        .await;
    assert_eq!(refusal(r).0, "duplicate_instance");
    let look = c
        .call(&json!({"type": "lookup", "node_id": id}))
        .await
        .unwrap();
    assert_eq!(look["real_addr"], "127.0.0.1:4000");
    assert_eq!(look["public"], true);
    first.call(&hb).await.unwrap();

    // An instance ID is bounded.
    let mut third = s.client().await;
    let long = "x".repeat(65);
    assert_eq!(
        refusal(register_as(&mut third, &k, 5000, &long).await).0,
        "bad_request"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_new_daemon_takes_the_node_once_the_live_one_is_gone() {
    let s = Server::start(open_config(), None).await;
    let k = key(22);
    let mut first = s.client().await;
    let id = id_of(&register_as(&mut first, &k, 4000, "aaaa").await.unwrap());
    // The same daemon reconnecting (a new session, same instance) is never refused.
    let mut again = s.client().await;
    assert_eq!(
        id_of(&register_as(&mut again, &k, 4000, "aaaa").await.unwrap()),
        id
    );
    // It stops (or is killed): its connections close, and its successor is accepted at once,
    // with no wait for the liveness window.
    drop(first);
    drop(again);
    let mut restarted = s.client().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        match register_as(&mut restarted, &k, 4001, "cccc").await {
            Err(e) if Instant::now() < deadline => {
                // The registry has not yet seen the connections close.
                assert_eq!(refusal(Err(e)).0, "duplicate_instance");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => break r.unwrap(),
        }
    };
    assert_eq!(id_of(&r), id);
    // The old instance, coming back, is now the rival.
    let mut old = s.client().await;
    assert_eq!(
        refusal(register_as(&mut old, &k, 4000, "aaaa").await).0,
        "duplicate_instance"
    );
    // A deregistration by the live instance frees the node for any other.
    restarted
        .call(&json!({"type": "deregister", "node_id": id, "instance": "cccc"}))
        .await
        .unwrap();
    let mut next = s.client().await;
    assert_eq!(
        id_of(&register_as(&mut next, &k, 4002, "dddd").await.unwrap()),
        id
    );
    // Requests that name no instance (v1 daemons, older pilotd) are served as before.
    let mut plain = s.client().await;
    assert_eq!(
        id_of(&plain.register_proven(&k, ":4003", None).await.unwrap()),
        id
    );
    plain
        .call(&json!({"type": "heartbeat", "node_id": id}))
        .await
        .unwrap();
    let mut v1 = s.client().await;
    let kv1 = key(23);
    let v1_id = register_id(&mut v1, &kv1).await;
    let mut v1b = s.client().await;
    assert_eq!(register_id(&mut v1b, &kv1).await, v1_id);
    v1b.call(&json!({"type": "deregister", "node_id": v1_id,
        "signature": sign_v1(&kv1, &format!("deregister:{v1_id}"))}))
        .await
        .unwrap();
    s.stop().await;
}

/// Every test above again, with its stores on PostgreSQL: a cluster of its own per test
/// (`crate::pg_cluster`), a fresh database per `Server::start(_, None)` and one database per
/// path, so `state_survives_a_restart` restarts on the same database.
mod on_postgresql {
    macro_rules! on_postgresql {
        ($($test:ident),* $(,)?) => {$(
            #[test]
            #[ignore = "root: starts a PostgreSQL cluster (initdb, pg_ctl) as user nobody"]
            fn $test() {
                crate::pg_cluster::with_postgresql(super::$test);
            }
        )*};
    }

    on_postgresql!(
        registration_lookup_and_privacy,
        keys_are_validated_and_never_issued,
        hostnames_tags_and_task_exec,
        trust_needs_both_sides,
        one_requester_cannot_fill_an_inbox,
        handshake_requests_are_pushed_to_a_watching_target,
        authenticated_nodes_refuse_replayed_fixed_signatures,
        owners_and_key_rotation,
        networks_with_each_join_rule,
        tokens_gate_administration_scores_and_beacons,
        punch_needs_the_resolve_rule,
        garbage_and_oversized_frames_never_disturb_other_clients,
        rate_limits_answer_throttled,
        state_survives_a_restart,
        tls_carries_the_same_protocol,
        a_second_live_daemon_of_one_node_is_refused_and_the_first_is_told,
        a_new_daemon_takes_the_node_once_the_live_one_is_gone,
    );
}

#![allow(clippy::unwrap_used)]
//! pilotd on a v1 registry. The registry here is a script that speaks only the v1 message
//! forms of wire §4.3: every request it does not know (`hello`, `auth`, `watch`) gets v1's
//! one error form, and every signed request must carry the fixed-string signature by the
//! node's registered key. The daemon must fall back to those forms, report it in Info, and
//! work: register, heartbeat, apply its state, and reach another node found through the
//! registry.

use crate::support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pilot_driver::Driver;
use pilotd::config::Cli;
use pilotd::node::Node;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel::registry::auth::{decode_key, verify};
use tunnel::registry::proto::{encode_frame, FrameDecoder};
use tunnel::{Addr, SocketAddr as PilotAddr};

/// What the scripted registry holds and saw.
#[derive(Default)]
struct V1State {
    /// Node ID → (public key, endpoint, public, hostname).
    nodes: HashMap<u32, V1Node>,
    next: u32,
    /// Every request type received, in order.
    seen: Vec<String>,
    /// Request types answered with the error form because v1 does not know them.
    unknown: Vec<String>,
    /// Signed requests whose signature did not verify.
    bad_signatures: Vec<Value>,
    /// Heartbeats whose signature verified.
    heartbeats: u32,
    /// Handshake requests held for their target (from, to) until it polls.
    inbox: Vec<(u32, u32)>,
    /// `request_handshake` refused because the target's inbox held one from the sender.
    duplicate_requests: u32,
    /// The `owner` of every `register` that carried one.
    owners: Vec<String>,
}

#[derive(Clone)]
struct V1Node {
    key: [u8; 32],
    key_b64: String,
    endpoint: String,
    public: bool,
    hostname: String,
}

/// v1's challenge string for a signed request (wire §4.3), or `None` for unsigned ones.
fn challenge(req: &Value) -> Option<(u32, String)> {
    let n = |k: &str| req.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
    let t = req["type"].as_str().unwrap_or_default();
    Some(match t {
        "heartbeat" | "deregister" | "set_visibility" | "set_hostname" | "set_tags"
        | "set_task_exec" | "poll_handshakes" => (n("node_id"), format!("{t}:{}", n("node_id"))),
        "resolve" => (
            n("requester_id"),
            format!("resolve:{}:{}", n("requester_id"), n("node_id")),
        ),
        "request_handshake" => (
            n("from_node_id"),
            format!("handshake:{}:{}", n("from_node_id"), n("to_node_id")),
        ),
        "respond_handshake" => (
            n("node_id"),
            format!("respond:{}:{}", n("node_id"), n("peer_id")),
        ),
        "report_trust" | "revoke_trust" => (
            n("node_id"),
            format!("{t}:{}:{}", n("node_id"), n("peer_id")),
        ),
        _ => return None,
    })
}

const V1_ERROR: &[u8] = br#"{"type":"error","error":"request failed"}"#;

/// One request, answered the way a v1 registry answers it.
fn answer(st: &mut V1State, req: &Value, peer_ip: std::net::IpAddr) -> Value {
    let t = req["type"].as_str().unwrap_or_default().to_owned();
    st.seen.push(t.clone());
    if req.get("instance").is_some() {
        // Not a v1 field: the daemon names its instance only to pilot-registry.
        st.unknown.push(format!("{t} instance"));
    }
    let error: Value = serde_json::from_slice(V1_ERROR).unwrap();
    if let Some((signer, text)) = challenge(req) {
        let ok = st.nodes.get(&signer).is_some_and(|n| {
            req["signature"]
                .as_str()
                .is_some_and(|s| verify(&n.key, text.as_bytes(), s).is_ok())
        });
        if !ok {
            st.bad_signatures.push(req.clone());
            return error;
        }
    }
    let id = req["node_id"].as_u64().unwrap_or(0) as u32;
    match t.as_str() {
        "register" => {
            if req.get("proof").is_some() {
                // v1 ignores the field; recorded so the test sees it was sent.
                st.unknown.push("register proof".into());
            }
            let Some(pk) = req["public_key"].as_str() else {
                return error;
            };
            let Ok(key) = decode_key(pk) else {
                return error;
            };
            let port = req["listen_addr"]
                .as_str()
                .and_then(|a| a.rsplit(':').next())
                .unwrap_or("0");
            let endpoint = format!("{peer_ip}:{port}");
            let known = st.nodes.iter().find(|(_, n)| n.key == key).map(|(i, _)| *i);
            let id = known.unwrap_or_else(|| {
                st.next += 1;
                st.next
            });
            if let Some(o) = req["owner"].as_str() {
                st.owners.push(o.to_owned());
            }
            let hostname = req["hostname"].as_str().unwrap_or_default().to_owned();
            st.nodes.insert(
                id,
                V1Node {
                    key,
                    key_b64: pk.to_owned(),
                    endpoint,
                    public: false,
                    hostname: hostname.clone(),
                },
            );
            let mut r = json!({"type": "register_ok", "node_id": id, "network_id": 0,
                               "address": Addr::new(0, id).to_string(), "public_key": pk});
            if !hostname.is_empty() {
                r["hostname"] = json!(hostname);
            }
            r
        }
        "heartbeat" => {
            st.heartbeats += 1;
            json!({"type": "heartbeat_ok", "time": 1_800_000_000u64})
        }
        "lookup" => match st.nodes.get(&id) {
            Some(n) => json!({"type": "lookup_ok", "node_id": id,
                              "address": Addr::new(0, id).to_string(), "networks": [0],
                              "public_key": n.key_b64, "public": n.public, "polo_score": 0}),
            None => error,
        },
        "resolve" => match st.nodes.get(&id) {
            Some(n) if n.public => {
                json!({"type": "resolve_ok", "node_id": id, "real_addr": n.endpoint})
            }
            _ => error,
        },
        "set_visibility" => match st.nodes.get_mut(&id) {
            Some(n) => {
                n.public = req["public"].as_bool().unwrap_or(false);
                let v = if n.public { "public" } else { "private" };
                json!({"type": "set_visibility_ok", "node_id": id, "visibility": v})
            }
            None => error,
        },
        "set_hostname" => match st.nodes.get_mut(&id) {
            Some(n) => {
                n.hostname = req["hostname"].as_str().unwrap_or_default().to_owned();
                json!({"type": "set_hostname_ok", "node_id": id, "hostname": n.hostname})
            }
            None => error,
        },
        "poll_handshakes" => {
            json!({"type": "poll_handshakes_ok", "requests": [], "responses": []})
        }
        "request_handshake" => {
            let n = |k: &str| req[k].as_u64().unwrap_or(0) as u32;
            let (from, to) = (n("from_node_id"), n("to_node_id"));
            if !st.nodes.contains_key(&to) {
                return error;
            }
            // v1 refuses a second request from the same sender while the first is held,
            // in its one error form.
            if st.inbox.contains(&(from, to)) {
                st.duplicate_requests += 1;
                return error;
            }
            st.inbox.push((from, to));
            json!({"type": "request_handshake_ok", "status": "delivered"})
        }
        _ => {
            st.unknown.push(t);
            error
        }
    }
}

/// Starts the scripted v1 registry on loopback; returns its address and state.
async fn v1_registry() -> (String, Arc<Mutex<V1State>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let state = Arc::new(Mutex::new(V1State::default()));
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = l.accept().await else {
                return;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let mut dec = FrameDecoder::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Ok(Some(f)) = dec.next_frame() {
                        let req: Value = serde_json::from_slice(&f).unwrap();
                        let reply = answer(&mut st.lock().unwrap(), &req, peer.ip());
                        let mut wire = Vec::new();
                        encode_frame(&serde_json::to_vec(&reply).unwrap(), &mut wire).unwrap();
                        if s.write_all(&wire).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => dec.push(&buf[..n]),
                    }
                }
            });
        }
    });
    (addr, state)
}

/// A public node named `hostname` with the owner string `<hostname>@example.com`.
async fn start_node(registry: &str, home: &Path, hostname: &str) -> Node {
    let cli = Cli {
        public: Some(true),
        hostname: Some(hostname.into()),
        owner: Some(format!("{hostname}@example.com")),
        keepalive: Some("1s".into()),
        ..support::loopback_cli(registry, home)
    };
    Node::start(&cli.resolve().unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pilotd_registers_with_a_v1_registry_in_v1_forms_and_reaches_a_peer() {
    let (registry, state) = v1_registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&registry, &dir.path().join("a"), "alice").await;
    let b = start_node(&registry, &dir.path().join("b"), "bob").await;
    let na = a.daemon.registered(Duration::from_secs(10)).await;
    let nb = b.daemon.registered(Duration::from_secs(10)).await;
    let (Some(_), Some(nb)) = (na, nb) else {
        let st = state.lock().unwrap();
        panic!(
            "not registered with the v1 registry; it saw {:?}, refused {:?}",
            st.seen, st.unknown
        );
    };

    // The fallback is reported in Info.
    let da = Driver::connect(dir.path().join("a").join("pilotd.sock"))
        .await
        .unwrap();
    let info = da.info_json().await.unwrap();
    assert_eq!(info["registry_protocol"], "v1", "{info}");
    assert_eq!(info["hostname"], "alice", "{info}");

    // Heartbeats with the fixed-string signature arrive (keepalive 1 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    while state.lock().unwrap().heartbeats < 4 {
        assert!(Instant::now() < deadline, "no signed heartbeats");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A stream to bob's echo: bob's key and endpoint come from the v1 registry.
    let mut s = da.dial(PilotAddr::new(Addr::new(0, nb), 7)).await.unwrap();
    s.write_all(b"through a v1 registry").await.unwrap();
    let mut got = [0u8; 21];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"through a v1 registry");

    {
        let st = state.lock().unwrap();
        assert!(
            st.bad_signatures.is_empty(),
            "unsigned or badly signed requests: {:?}",
            st.bad_signatures
        );
        // `--owner` goes with each v1 registration.
        let mut owners = st.owners.clone();
        owners.sort();
        owners.dedup();
        assert_eq!(owners, ["alice@example.com", "bob@example.com"]);
        // Each connection asked `hello` once and then spoke only v1's forms: no `auth`, no
        // `watch`, no registration proof, no instance.
        assert!(
            st.unknown.iter().all(|t| t == "hello"),
            "requests v1 does not know: {:?}",
            st.unknown
        );
        assert!(
            st.seen.iter().any(|t| t == "set_visibility"),
            "{:?}",
            st.seen
        );
        assert!(st.nodes.values().all(|n| n.public), "visibility applied");
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_trust_request_a_v1_registry_still_holds_counts_as_sent() {
    let (registry, state) = v1_registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&registry, &dir.path().join("a"), "alice").await;
    assert!(a.daemon.registered(Duration::from_secs(10)).await.is_some());
    // A private v1 node that is not running: the registry holds requests for it, and a
    // direct delivery cannot reach it (its endpoint is refused, and nothing listens).
    let target = 4242;
    {
        let key = [7u8; 32];
        state.lock().unwrap().nodes.insert(
            target,
            V1Node {
                key,
                key_b64: tunnel::registry::auth::b64(&key),
                endpoint: "127.0.0.1:9".into(),
                public: false,
                hostname: String::new(),
            },
        );
    }
    let da = Driver::connect(dir.path().join("a").join("pilotd.sock"))
        .await
        .unwrap();
    let ask = || {
        da.handshake(tunnel::ipc::HandshakeOp::Request {
            node: target,
            justification: "again",
        })
    };
    let first = ask().await.unwrap();
    assert_eq!(first["status"], "sent", "{first}");
    // The registry still holds the first: v1 refuses the second with its uncoded error.
    let second = ask().await.unwrap();
    assert_eq!(second["status"], "sent", "{second}");
    assert_eq!(state.lock().unwrap().duplicate_requests, 1);
    a.shutdown().await;
}

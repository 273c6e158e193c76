#![allow(clippy::unwrap_used)]
//! A registry process killed with SIGKILL in the middle of a stream of mutations loses none
//! that it acknowledged, on redb and on PostgreSQL.

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use pilot_registry::auth::b64;
use pilot_registry_client::{sign_v1, Client};
use serde_json::json;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(store: &OsStr, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pilot-registry"))
        .args(["--addr", &format!("127.0.0.1:{port}"), "--store"])
        .arg(store)
        .args([
            "--register-per-minute",
            "0",
            "--requests-per-ip",
            "0",
            "--requests-per-node",
            "0",
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
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

fn key(worker: u32, i: u32) -> SigningKey {
    let mut seed = [0u8; 32];
    seed[..4].copy_from_slice(&worker.to_be_bytes());
    seed[4..8].copy_from_slice(&i.to_be_bytes());
    seed[31] = 0xA5;
    SigningKey::from_bytes(&seed)
}

/// What one worker saw acknowledged: (node, key, highest acknowledged tag number).
type Acked = Arc<Mutex<Vec<(u32, SigningKey, Option<u32>)>>>;

async fn worker(addr: SocketAddr, w: u32, acked: Acked) {
    let mut c = connect(addr).await;
    for i in 0.. {
        let k = key(w, i);
        let r = c
            .call(&json!({"type": "register", "listen_addr": ":4000",
                "public_key": b64(k.verifying_key().as_bytes())}))
            .await;
        let Ok(r) = r else { return };
        let id = r["node_id"].as_u64().unwrap() as u32;
        let slot = {
            let mut a = acked.lock().unwrap();
            a.push((id, k.clone(), None));
            a.len() - 1
        };
        for n in 0..3u32 {
            let r = c
                .call(
                    &json!({"type": "set_tags", "node_id": id, "tags": [format!("v{n}")],
                    "signature": sign_v1(&k, &format!("set_tags:{id}"))}),
                )
                .await;
            if r.is_err() {
                return;
            }
            acked.lock().unwrap()[slot].2 = Some(n);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_mutation() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("registry.redb");
    sigkill_during_registrations(store.as_os_str()).await;
}

#[test]
#[ignore = "root: starts a PostgreSQL cluster (initdb, pg_ctl) as user nobody"]
fn sigkill_loses_no_acknowledged_mutation_on_postgresql() {
    let cluster = crate::pg_cluster::Cluster::start();
    let url = cluster.fresh_database();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(sigkill_during_registrations(OsStr::new(&url)));
}

/// Registrations and tag changes from 8 clients; SIGKILL once 400 are acknowledged; a new
/// process on the same store must have every acknowledged one.
async fn sigkill_during_registrations(store: &OsStr) {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = spawn(store, port);
    connect(addr).await;

    let acked: Acked = Arc::default();
    let workers: Vec<_> = (0..8)
        .map(|w| tokio::spawn(worker(addr, w, acked.clone())))
        .collect();
    // Kill in the middle of the stream, once a fair amount is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 400 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for w in workers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 400,
        "only {} registrations acknowledged",
        acked.len()
    );
    println!("acknowledged before SIGKILL: {} registrations", acked.len());

    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = spawn(store, port);
    let mut c = connect(addr).await;
    let mut max_id = 0;
    for (id, k, tag) in &acked {
        let l = c
            .call(&json!({"type": "lookup", "node_id": id}))
            .await
            .unwrap();
        assert_eq!(
            l["public_key"],
            b64(k.verifying_key().as_bytes()),
            "node {id}"
        );
        if let Some(n) = tag {
            // The acknowledged value, or a later one that committed without its reply.
            let t = l["tags"][0].as_str().unwrap();
            let got: u32 = t.trim_start_matches('v').parse().unwrap();
            assert!(got >= *n, "node {id}: tag {t} older than acknowledged v{n}");
        }
        max_id = max_id.max(*id);
    }
    // The ID counter survived too: a new node gets a fresh ID.
    let k = key(999, 0);
    let r = c
        .call(&json!({"type": "register", "listen_addr": ":4000",
            "public_key": b64(k.verifying_key().as_bytes())}))
        .await
        .unwrap();
    assert!(r["node_id"].as_u64().unwrap() as u32 > max_id);
    child.kill().unwrap();
    child.wait().unwrap();
}

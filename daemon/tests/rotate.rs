#![allow(clippy::unwrap_used)]
//! Key rotation that was interrupted (a crash between writing the new key and the registry's
//! answer) is settled on the next start by the key the registry holds.

use std::time::Duration;

use pilot_registry::auth::b64;
use pilot_registry_client::{sign_v1, Client};
use pilotd::identity::NodeIdentity;
use serde_json::json;
use tunnel::Identity;

use crate::support;
use support::{bare_node, registry};

async fn started(reg: &str, home: &std::path::Path) -> (pilotd::node::Node, u32) {
    let node = bare_node(reg, home).await;
    let id = node
        .daemon
        .registered(Duration::from_secs(10))
        .await
        .unwrap();
    (node, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_key_the_registry_never_took_is_discarded() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    let (node, id) = started(&reg, &home).await;
    let old = node.daemon.identity.public_key_base64();
    node.shutdown().await;

    // The crash came after the new key was written and before the registry was asked.
    let path = home.join("identity.json");
    let (ident, _) = NodeIdentity::load_or_create(&path).unwrap();
    ident.prepare(id).unwrap();
    drop(ident);

    let (node, again) = started(&reg, &home).await;
    assert_eq!(again, id);
    assert_eq!(node.daemon.identity.public_key_base64(), old);
    assert_eq!(Identity::load(&path).unwrap().public_key_base64(), old);
    assert!(!home.join("identity.json.next").exists());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_key_the_registry_took_is_adopted() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    let (node, id) = started(&reg, &home).await;
    let old_key = node.daemon.identity.key();
    node.shutdown().await;

    // The crash came after the registry rotated and before the identity file was replaced.
    let path = home.join("identity.json");
    let (ident, _) = NodeIdentity::load_or_create(&path).unwrap();
    let new = ident.prepare(id).unwrap();
    drop(ident);
    let new_b64 = b64(new.verifying_key().as_bytes());
    let mut c = Client::connect(&reg).await.unwrap();
    c.authenticate(id, &old_key).await.unwrap();
    c.call(&json!({"type": "rotate_key", "node_id": id,
                   "signature": sign_v1(&old_key, &format!("rotate:{id}")),
                   "new_public_key": new_b64}))
        .await
        .unwrap();

    let (node, again) = started(&reg, &home).await;
    assert_eq!(again, id, "the node keeps its address");
    assert_eq!(node.daemon.identity.public_key_base64(), new_b64);
    assert_eq!(Identity::load(&path).unwrap().public_key_base64(), new_b64);
    assert!(!home.join("identity.json.next").exists());
    let info = node.daemon.engine.info().await.unwrap();
    assert_eq!(info["node_id"], id);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rotation_while_one_is_pending_is_refused() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    let (node, id) = started(&reg, &home).await;
    node.daemon.identity.prepare(id).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    node.daemon
        .link
        .send(pilotd::registry_link::LinkCmd::Rotate(tx))
        .await
        .unwrap();
    let err = rx.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("already in progress"), "{err}");
    node.shutdown().await;
}

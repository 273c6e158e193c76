//! A beacon given several registry addresses: the first does not answer, so the start-up
//! token check and the cache's fetches are answered by the second.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use pilot_beacon::{check_token, Answer, Authority, CacheConfig, RegistryAddrs, RegistryAuthority};

const TOKEN: &str = "the-right-beacon-token";

/// A loopback address nothing listens on (a port bound, then released).
fn dead_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_dead_first_registry_is_passed_over_for_the_next() {
    let store = pilot_registry::store::RedbStore::in_memory().unwrap();
    let mut config = pilot_registry::Config::default();
    config.policy.beacon_token = Some(TOKEN.into());
    let reg = pilot_registry::Registry::open(Box::new(store), config).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live = l.local_addr().unwrap();
    tokio::spawn(reg.serve(l, None, std::future::pending()));

    let key = SigningKey::from_bytes(&[5u8; 32]);
    let mut c = pilot_registry_client::Client::connect(live).await.unwrap();
    let node = c.register_proven(&key, ":4000", None).await.unwrap()["node_id"]
        .as_u64()
        .unwrap() as u32;

    let addrs = RegistryAddrs::parse(&format!("{},{live}", dead_addr())).unwrap();
    let config = CacheConfig::new(addrs, TOKEN);
    check_token(&config).await.unwrap();
    let wrong = CacheConfig::new(config.registry.clone(), "a-wrong-beacon-token-here");
    let e = check_token(&wrong).await.unwrap_err().to_string();
    assert!(
        e.contains(&live.to_string()) && e.contains("refuses"),
        "{e}"
    );

    let auth = RegistryAuthority::spawn(config);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Answer::Ready(k) = auth.node_key_answer(node) {
            assert_eq!(k, Some(key.verifying_key().to_bytes()));
            break;
        }
        assert!(Instant::now() < deadline, "no key within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_registry_list_with_a_bad_entry_stops_the_beacon_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    for check in [true, false] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pilot-beacon"));
        cmd.args(["--addr", "127.0.0.1:0", "--registry", "127.0.0.1:9000,nope"])
            .arg("--beacon-token-file")
            .arg(&token)
            .env_remove("PILOT_BEACON_CONFIG");
        if check {
            cmd.arg("--check-config");
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(
                "pilot-beacon: --registry: registry address \"nope\" (entry 2 of the list): no \
                 port"
            ),
            "{err}"
        );
    }
}

#[test]
fn check_config_prints_several_registries_as_a_list() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pilot-beacon"))
        .args(["--registry", "127.0.0.1:9000, 127.0.0.1:9002"])
        .args(["--registry", "[::1]:9000"])
        .arg("--beacon-token-file")
        .arg(&token)
        .arg("--check-config")
        .env_remove("PILOT_BEACON_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["registry"],
        serde_json::json!(["127.0.0.1:9000", "127.0.0.1:9002", "[::1]:9000"])
    );
}

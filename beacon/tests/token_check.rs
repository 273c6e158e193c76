//! At start, a beacon with a registry authority asks the registry whether it takes the
//! beacon's token: a wrong token stops it with a clear error instead of a beacon that says
//! it serves and then refuses every punch and relay.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "the-right-beacon-token";

/// A registry in a thread of its own (with its own runtime) that takes [`TOKEN`].
fn registry() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let store = pilot_registry::store::RedbStore::in_memory().unwrap();
            let mut config = pilot_registry::Config::default();
            config.policy.beacon_token = Some(TOKEN.into());
            let reg = pilot_registry::Registry::open(Box::new(store), config).unwrap();
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap().to_string()).unwrap();
            reg.serve(l, None, std::future::pending()).await;
        });
    });
    rx.recv().unwrap()
}

/// Starts the beacon against `registry` with `token` in its token file (kept in the returned
/// directory), its log piped.
fn spawn_beacon(registry: &str, token: &str) -> (Child, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, token).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pilot-beacon"))
        .args(["--addr", "127.0.0.1:0", "--registry", registry])
        .arg("--beacon-token-file")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, dir)
}

/// Reads `child`'s log until it contains `until`, it ends, or 20 s pass.
fn log_until(child: &mut Child, until: &str) -> String {
    let mut stderr = child.stderr.take().unwrap();
    let want = until.to_owned();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && !String::from_utf8_lossy(&got).contains(&want) {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    String::from_utf8_lossy(&reader.join().unwrap()).into_owned()
}

#[test]
fn a_wrong_token_stops_the_beacon_at_start() {
    let reg = registry();
    let (mut child, _dir) = spawn_beacon(&reg, "a-wrong-beacon-token");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let mut log = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut log);
            panic!("the beacon kept running with a token the registry refuses: {log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(!status.success(), "{log}");
    assert!(log.contains("refuses this beacon's token"), "{log}");
    assert!(log.contains("--beacon-token-file"), "{log}");
}

#[test]
fn the_right_token_is_confirmed_at_start() {
    let reg = registry();
    let (mut child, _dir) = spawn_beacon(&reg, TOKEN);
    let log = log_until(&mut child, "accepts this beacon's token");
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(log.contains("accepts this beacon's token"), "{log}");
    assert!(running, "the beacon keeps serving: {log}");
}

#![allow(clippy::unwrap_used)]
//! `pilotd --registry-tls --registry-fingerprint` against a registry serving TLS with a
//! self-signed certificate (as `pilot-registry --tls-self-signed` does), in this process: the
//! daemon process registers over TLS with the right pin; with a wrong pin it never registers
//! and its log names both fingerprints.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pilot_driver::Driver;
use pilot_registry::{server, Registry};

/// Starts an in-memory registry serving TLS on loopback; returns its address, the
/// certificate's fingerprint as the registry logs it, and the registry.
async fn tls_registry() -> (String, String, Registry) {
    let reg = support::in_memory_registry();
    let (cert, key, fp) = server::self_signed().unwrap();
    let tls = server::tls_from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(reg.clone().serve(l, Some(tls), std::future::pending()));
    (addr, fp, reg)
}

/// A `pilotd` child process, killed on drop.
struct Pilotd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Pilotd {
    fn spawn(home: &Path, registry: &str, extra: &[&str]) -> Pilotd {
        std::fs::create_dir_all(home).unwrap();
        let log = home.join("pilotd.log");
        let socket = home.join("pilotd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_pilotd"))
            .arg("--home")
            .arg(home)
            .arg("--socket")
            .arg(&socket)
            .args(["--registry", registry])
            .args(["--beacon", ""])
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("PILOT_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        Pilotd { child, socket, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The node ID the daemon reports (0 while unregistered), once its socket answers.
    async fn node_id(&mut self) -> Option<u32> {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("pilotd exited: {st}\n{}", self.log());
        }
        let d = Driver::connect(&self.socket).await.ok()?;
        d.info().await.ok().map(|i| i.node_id)
    }
}

impl Drop for Pilotd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- pilotd log ---\n{}", self.log());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_registers_over_pinned_tls() {
    let (addr, fp, reg) = tls_registry().await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Pilotd::spawn(
        &dir.path().join("a"),
        &addr,
        &["--registry-tls", "--registry-fingerprint", &fp],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        if let Some(id) = d.node_id().await.filter(|&id| id != 0) {
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "not registered over TLS\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        reg.node_key(id).is_some(),
        "the registry does not know node {id}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_fingerprint_is_named_and_nothing_is_registered() {
    let (addr, fp, _reg) = tls_registry().await;
    let wrong = "ab".repeat(32);
    assert_ne!(fp, wrong);
    let dir = tempfile::tempdir().unwrap();
    let mut d = Pilotd::spawn(
        &dir.path().join("a"),
        &addr,
        &["--registry-tls", "--registry-fingerprint", &wrong],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = d.log();
        if log.contains(&fp) && log.contains(&wrong) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no error naming both fingerprints\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still unregistered a while later: nothing went over plain TCP instead.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(d.node_id().await, Some(0), "{}", d.log());
    assert!(!d.log().contains("exceeds the 1 MiB limit"), "{}", d.log());
}

/// Runs `pilotd` with `args` and a fresh home; returns its exit code and stderr, or fails
/// the test if it is still running after 5 s (it started instead of refusing).
fn refused_at_start(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let err = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pilotd"))
        .arg("--home")
        .arg(dir.path())
        .arg("--socket")
        .arg(dir.path().join("pilotd.sock"))
        .args(["--listen", "127.0.0.1:0", "--beacon", ""])
        .args(args)
        .env_remove("PILOT_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st.code(), std::fs::read_to_string(&err).unwrap());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "pilotd {args:?} started instead of refusing\n{}",
                std::fs::read_to_string(&err).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn registry_tls_without_a_fingerprint_is_refused_at_start() {
    let (code, err) = refused_at_start(&["--registry", "127.0.0.1:1", "--registry-tls"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--registry-fingerprint"), "{err}");
}

#[test]
fn encrypt_false_is_refused_at_start() {
    let (code, err) = refused_at_start(&["--registry", "127.0.0.1:1", "--encrypt", "false"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("encrypt: false is not supported"), "{err}");
}

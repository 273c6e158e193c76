#![allow(clippy::unwrap_used)]
//! A real `pilotd` process as systemd sees it, with this test standing in for the service
//! manager: READY=1 with a STATUS= naming the node once it is registered (not before),
//! RELOADING=1 then READY=1 again on SIGHUP (one that comes earlier does not end it),
//! STOPPING=1 on SIGTERM, all on `$NOTIFY_SOCKET`;
//! and the IPC socket handed to `--socket-group` with mode 0660.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pilot_registry::store::RedbStore;
use pilot_registry::{Config as RegistryConfig, Registry};

/// Receives notifications until one contains `want`; returns every message seen.
fn wait_for(sock: &UnixDatagram, want: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(deadline - Instant::now()))
            .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.contains(want);
                seen.push(msg);
                if done {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no {want:?} within {within:?}; got {seen:?}");
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pilotd_notifies_ready_reload_and_stop_and_shares_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();

    // No registry yet: pilotd runs but must not say it is ready.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let registry = l.local_addr().unwrap().to_string();
    drop(l);
    let home = dir.path().join("home");
    let socket = home.join("pilotd.sock");
    let config = dir.path().join("pilotd.json");
    std::fs::write(&config, r#"{"log-level": "info"}"#).unwrap();
    // The caller's own primary group: a group the daemon may give its socket to without root.
    let gid = nix::unistd::getegid();
    let group = nix::unistd::Group::from_gid(gid).unwrap().unwrap().name;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pilotd"))
        .args(["--config", config.to_str().unwrap()])
        .args(["--home", home.to_str().unwrap()])
        .args(["--socket", socket.to_str().unwrap()])
        .args(["--registry", &registry, "--beacon", ""])
        .args(["--listen", "127.0.0.1:0", "--socket-group", &group])
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("PILOT_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();

    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no IPC socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = std::fs::metadata(&socket).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    assert_eq!(m.gid(), gid.as_raw());
    notify.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    assert!(
        notify.recv(&mut buf).is_err(),
        "pilotd notified before it was registered"
    );
    notify.set_nonblocking(false).unwrap();
    // A SIGHUP before the daemon is ready does not end it (it is held for a reload).
    signal(pid, "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP ended pilotd");

    // The registry comes up: the node registers and pilotd says so.
    let reg = Registry::open(
        Box::new(RedbStore::in_memory().unwrap()),
        RegistryConfig::default(),
    )
    .unwrap();
    let l = tokio::net::TcpListener::bind(&registry).await.unwrap();
    tokio::spawn(reg.serve(l, None, std::future::pending()));
    let seen = wait_for(&notify, "READY=1", Duration::from_secs(30));
    let ready = seen.last().unwrap();
    assert!(
        ready.contains("STATUS=node 0:0000.0000.0001 registered"),
        "{ready}"
    );

    // SIGHUP: reloading, then ready again with the same status.
    std::fs::write(&config, r#"{"log-level": "debug"}"#).unwrap();
    signal(pid, "HUP");
    let seen = wait_for(&notify, "READY=1", Duration::from_secs(10));
    assert!(seen.iter().any(|m| m.contains("RELOADING=1")), "{seen:?}");
    assert!(seen.last().unwrap().contains("registered"), "{seen:?}");

    signal(pid, "TERM");
    wait_for(&notify, "STOPPING=1", Duration::from_secs(10));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// `--check-config` refuses a registry or beacon address that does not resolve, naming the
/// setting, instead of passing a node that would never register.
#[test]
fn check_config_refuses_an_address_that_does_not_resolve() {
    let home = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pilotd"))
            .arg("--check-config")
            .arg("--home")
            .arg(home.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let good = run(&["--registry", "127.0.0.1:9000", "--beacon", "127.0.0.1:9001"]);
    assert!(good.status.success(), "{good:?}");
    for (flag, setting) in [("--registry", "registry"), ("--beacon", "beacon")] {
        let out = run(&[flag, "registry.invalid:9000"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {err}");
        assert!(
            err.contains(setting) && err.contains("does not resolve"),
            "{err}"
        );
    }
}

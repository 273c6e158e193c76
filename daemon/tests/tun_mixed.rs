//! `pilotd up` beside the rest of Pilot: trust opens a host's kernel listeners to a peer, and
//! kernel programs reach agents that use the driver library on a plain pilotd (no TUN), and
//! the reverse, because both sides speak plain Pilot streams.
//!
//! These need root (network namespaces, /dev/net/tun), so they are ignored by default;
//! `scripts/test.sh` runs them when it runs as root.
#![allow(clippy::unwrap_used)]

use crate::netns;

use std::fs::File;
use std::net::Ipv6Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use netns::*;
use pilot_driver::Driver;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel::ipc::HandshakeOp;
use tunnel::{Addr, SocketAddr as PilotAddr};

/// Namespaces A (registry, `pilotd up`) and B (`pilotd up`, exposing `EXPOSED`) on a veth.
struct World {
    a: Netns,
    b: Netns,
    up_a: Up,
    up_b: Up,
    registry: String,
    dir: tempfile::TempDir,
}

const EXPOSED: u16 = 8080;

fn world() -> World {
    let mut a = Netns::new();
    let mut b = Netns::new();
    a.link_to(&b, "pv0", "10.78.0.1", "10.78.0.2");
    a.listen = "10.78.0.1:0".into();
    b.listen = "10.78.0.2:0".into();
    let registry = a.registry_at("10.78.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    for home in ["a", "b", "c"] {
        std::fs::create_dir(dir.path().join(home)).unwrap();
    }
    let up_a = Up::start(&a, &dir.path().join("a"), &registry, &["--public"]);
    let expose = EXPOSED.to_string();
    let up_b = Up::start(
        &b,
        &dir.path().join("b"),
        &registry,
        &["--public", "--expose", &expose],
    );
    World {
        a,
        b,
        up_a,
        up_b,
        registry,
        dir,
    }
}

fn node_of(ula: Ipv6Addr) -> u32 {
    tunnel::ula::from_ipv6(ula).unwrap().node
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A driver connected to the daemon whose socket is `sock`, once the socket is there.
async fn driver(sock: &Path) -> Driver {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Driver::connect(sock).await {
            Ok(d) => return d,
            Err(e) => {
                assert!(Instant::now() < deadline, "{}: {e}", sock.display());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn trust_opens_a_port_that_is_not_exposed_and_info_shows_the_interface() {
    let w = world();
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("x"), b"trusted\n").unwrap();
    let log = w.dir.path().join("http.log");
    let _server = w.b.http_server(w.up_b.ula, 8081, site.path(), Some(&log));
    let url = format!("http://[{}]:8081/x", w.up_b.ula);
    let curl = || {
        w.a.exec("curl", &["-sS", "-g", "--max-time", "10", &url])
            .output()
            .unwrap()
    };
    let out = curl();
    assert_eq!(out.status.code(), Some(7), "not trusted yet, yet: {out:?}");

    rt().block_on(async {
        let da = driver(&w.dir.path().join("a/pilotd.sock")).await;
        let db = driver(&w.dir.path().join("b/pilotd.sock")).await;
        let (na, nb) = (node_of(w.up_a.ula), node_of(w.up_b.ula));
        da.handshake(HandshakeOp::Request {
            node: nb,
            justification: "tun_mixed",
        })
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while db
            .handshake(HandshakeOp::Approve { node: na })
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the trust request never arrived");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let info = db.info_json().await.unwrap();
        let inside = &info["inside"];
        assert_eq!(inside["interface"], "pilot0", "{info}");
        assert_eq!(inside["ula"], w.up_b.ula.to_string(), "{info}");
        assert_eq!(inside["expose"], serde_json::json!([EXPOSED]), "{info}");
    });

    let out = curl();
    assert!(out.status.success(), "trusted: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "trusted\n");
    let served = std::fs::read_to_string(&log).unwrap();
    assert!(served.contains(&format!("{} - - ", w.up_a.ula)), "{served}");
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn kernel_programs_and_driver_agents_reach_each_other() {
    let w = world();
    // C: a plain pilotd (no TUN) in A's namespace, with an agent on the driver library.
    let home_c = w.dir.path().join("c");
    let mut c_cmd = w.a.pilotd(&home_c, &w.registry, &["--public"]);
    let _c = Proc(
        c_cmd
            .stdout(Stdio::null())
            .stderr(File::create(home_c.join("pilotd.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("index.html"), b"kernel listener on B\n").unwrap();
    let _server = w.b.http_server(
        w.up_b.ula,
        EXPOSED,
        site.path(),
        Some(&w.dir.path().join("http.log")),
    );
    let rt = rt();
    let (dc, nc) = rt.block_on(async {
        let dc = driver(&home_c.join("pilotd.sock")).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let id = dc.info().await.unwrap().node_id;
            if id != 0 {
                break (dc, id);
            }
            assert!(Instant::now() < deadline, "C did not register");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    // The agent answers one line on port 7777; a kernel client in B connects to C's ULA.
    let mut listener = rt.block_on(dc.listen(7777)).unwrap();
    let agent = rt.spawn(async move {
        let (mut s, remote) = listener.accept().await.unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        let reply = format!(
            "agent saw {} from {}",
            String::from_utf8_lossy(&buf[..n]),
            remote.addr
        );
        s.write_all(reply.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let c_ula = tunnel::ula::to_ipv6(Addr::new(0, nc));
    let client = format!(
        "import socket\n\
         s = socket.create_connection(('{c_ula}', 7777), timeout=10)\n\
         s.sendall(b'hello')\n\
         out = b''\n\
         while True:\n\
         \x20   d = s.recv(4096)\n\
         \x20   if not d: break\n\
         \x20   out += d\n\
         print(out.decode())\n"
    );
    let out = w.b.exec("python3", &["-c", &client]).output().unwrap();
    assert!(out.status.success(), "kernel client: {out:?}");
    let nb = node_of(w.up_b.ula);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("agent saw hello from {}", Addr::new(0, nb))
    );
    rt.block_on(agent).unwrap();

    // The agent fetches the page from B's kernel listener (exposed port) over a Pilot stream.
    let body = rt.block_on(async {
        let mut s = dc
            .dial(PilotAddr::new(Addr::new(0, nb), EXPOSED))
            .await
            .unwrap();
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&got).into_owned()
    });
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(body.ends_with("kernel listener on B\n"), "{body}");
    let _ = (&w.up_a, &w.a);
}

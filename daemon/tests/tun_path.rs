//! The data path of `pilotd up` with unmodified programs: two network namespaces linked by a
//! veth, a registry in the first, `pilotd up` in both, and curl, Python's http.server, ping and
//! UDP sockets talking through pilot0 to each other's ULA.
//!
//! These need root (network namespaces, /dev/net/tun), so they are ignored by default;
//! `scripts/test.sh` runs them when it runs as root.
#![allow(clippy::unwrap_used)]

mod netns;
mod support;

use std::fs::File;
use std::net::Ipv6Addr;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use netns::*;

/// Two namespaces with `pilotd up` each; B exposes `EXPOSED` and `UDP_PORT` to any caller.
struct Pair {
    a: Netns,
    b: Netns,
    up_a: Up,
    up_b: Up,
    dir: tempfile::TempDir,
}

const EXPOSED: u16 = 8080;
const UDP_PORT: u16 = 9999;

impl Pair {
    fn start() -> Pair {
        let mut a = Netns::new();
        let mut b = Netns::new();
        a.link_to(&b, "pv0", "10.77.0.1", "10.77.0.2");
        a.listen = "10.77.0.1:0".into();
        b.listen = "10.77.0.2:0".into();
        let reg = a.registry_at("10.77.0.1:0");
        let dir = tempfile::tempdir().unwrap();
        for home in ["a", "b"] {
            std::fs::create_dir(dir.path().join(home)).unwrap();
        }
        let up_a = Up::start(&a, &dir.path().join("a"), &reg, &["--public"]);
        let expose = format!("{EXPOSED},{UDP_PORT}");
        let up_b = Up::start(
            &b,
            &dir.path().join("b"),
            &reg,
            &["--public", "--expose", &expose],
        );
        Pair {
            a,
            b,
            up_a,
            up_b,
            dir,
        }
    }

    /// `http://[B's ULA]:port/path`.
    fn url(&self, port: u16, path: &str) -> String {
        format!("http://[{}]:{port}/{path}", self.up_b.ula)
    }

    /// Serves `dir` with Python's http.server on B's ULA and `port`; its log (which names each
    /// client) goes to the returned path. Waits until it answers through pilot0 from A.
    fn http_server(&self, port: u16, dir: &std::path::Path) -> (Server, std::path::PathBuf) {
        let log = self.dir.path().join(format!("http-{port}.log"));
        let ula = self.up_b.ula.to_string();
        let child = self
            .b
            .exec(
                "python3",
                &[
                    "-u",
                    "-m",
                    "http.server",
                    &port.to_string(),
                    "--bind",
                    &ula,
                    "--directory",
                    dir.to_str().unwrap(),
                ],
            )
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let server = Server(child);
        // Listening in B's namespace (checked there, so no connection is refused meanwhile).
        let probe = format!("sport = :{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self
            .b
            .exec("ss", &["-Hltn", &probe])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false)
        {
            assert!(Instant::now() < deadline, "http.server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        (server, log)
    }

    /// curl from A, with a bound on its time.
    fn curl(&self, args: &[&str]) -> (Output, Duration) {
        let mut v = vec!["-sS", "-g", "--max-time", "20"];
        v.extend_from_slice(args);
        let t = Instant::now();
        let out = self.a.exec("curl", &v).output().unwrap();
        (out, t.elapsed())
    }
}

/// A child process killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn curl_reaches_an_exposed_http_server_and_the_server_sees_the_callers_ula() {
    let p = Pair::start();
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("hello.txt"), b"hello through pilot0\n").unwrap();
    // 32 MiB that do not repeat, to see every byte arrive in order.
    let big: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(site.path().join("big.bin"), &big).unwrap();
    let (_server, log) = p.http_server(EXPOSED, site.path());

    let (out, _) = p.curl(&[&p.url(EXPOSED, "hello.txt")]);
    assert!(out.status.success(), "curl: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello through pilot0\n");
    let served = std::fs::read_to_string(&log).unwrap();
    assert!(
        served.contains(&format!("{} - - ", p.up_a.ula)),
        "the server did not see A's ULA {} as its client:\n{served}",
        p.up_a.ula
    );

    let got = p.dir.path().join("big.out");
    let t = Instant::now();
    let (out, _) = p.curl(&["-o", got.to_str().unwrap(), &p.url(EXPOSED, "big.bin")]);
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "curl: {}", text(&out.stderr));
    let body = std::fs::read(&got).unwrap();
    assert_eq!(body.len(), big.len());
    assert!(body == big, "the 32 MiB body differs");
    println!(
        "32 MiB through pilot0 in {secs:.2} s ({:.0} MB/s)",
        33.554432 / secs
    );
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn refusals_are_fast_and_say_why() {
    let p = Pair::start();
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("x"), b"x").unwrap();
    // A server on a port B does not expose: A is not trusted, so it must not get through.
    let (_server, log) = p.http_server(8081, site.path());

    for (what, url) in [
        ("a port nothing listens on", p.url(8082, "")),
        ("a port open only to trusted peers", p.url(8081, "x")),
    ] {
        let (out, took) = p.curl(&[&url]);
        assert_eq!(out.status.code(), Some(7), "{what}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("refused") || text(&out.stderr).contains("Couldn't connect"),
            "{what}: {}",
            text(&out.stderr)
        );
        assert!(
            took < Duration::from_secs(2),
            "{what}: refused after {took:?}"
        );
    }
    assert!(
        !std::fs::read_to_string(&log).unwrap().contains("GET"),
        "an untrusted caller reached a port that is not exposed"
    );

    // A node no registry knows: ICMPv6 unreachable, at once.
    let unknown: Ipv6Addr = tunnel::ula::to_ipv6(tunnel::Addr::new(0, 0x00ff_fff0));
    let (out, took) = p.curl(&[&format!("http://[{unknown}]:80/")]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("No route to host")
            || text(&out.stderr).contains("Couldn't connect"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        took < Duration::from_secs(5),
        "unknown node: failed after {took:?}"
    );
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn ping_and_udp_cross_pilot0() {
    let p = Pair::start();
    let out =
        p.a.exec(
            "ping",
            &[
                "-6",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "5",
                &p.up_b.ula.to_string(),
            ],
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ping: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("3 received"),
        "{}",
        text(&out.stdout)
    );

    // B answers one datagram on its exposed UDP port with the same bytes in upper case; A's
    // socket gets the answer from B's ULA and port.
    let server = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         s.bind(('{b}', {UDP_PORT}))\n\
         d, a = s.recvfrom(4096)\n\
         s.sendto(d.upper(), a)\n\
         print(a[0], flush=True)\n",
        b = p.up_b.ula
    );
    let mut srv =
        p.b.exec("python3", &["-c", &server])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let client = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         s.settimeout(10)\n\
         s.sendto(b'hello udp', ('{b}', {UDP_PORT}))\n\
         d, a = s.recvfrom(4096)\n\
         print(d.decode(), a[0], a[1])\n",
        b = p.up_b.ula
    );
    let out = p.a.exec("python3", &["-c", &client]).output().unwrap();
    let _ = srv.kill();
    let srv_out = srv.wait_with_output().unwrap();
    assert!(out.status.success(), "udp client: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("HELLO UDP {} {UDP_PORT}", p.up_b.ula)
    );
    assert_eq!(text(&srv_out.stdout).trim(), p.up_a.ula.to_string());
}

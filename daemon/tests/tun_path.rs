//! The data path of `pilotd up` with unmodified programs: two network namespaces linked by a
//! veth, a registry in the first, `pilotd up` in both, and curl, Python's http.server, ping,
//! UDP sockets, ssh/scp, iperf3 and Python echo servers talking through pilot0 to each other's
//! ULA.
//!
//! These need root (network namespaces, /dev/net/tun), so they are ignored by default;
//! `scripts/test.sh` runs them when it runs as root.
#![allow(clippy::unwrap_used)]

use crate::netns;

use std::fs::File;
use std::net::Ipv6Addr;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use netns::*;

/// Two namespaces with `pilotd up` each; B exposes `EXPOSED`, `UDP_PORT`, `SSH_PORT`,
/// `IPERF_PORT` and `ECHO_PORT` to any caller.
struct Pair {
    a: Netns,
    b: Netns,
    up_a: Up,
    up_b: Up,
    dir: tempfile::TempDir,
}

const EXPOSED: u16 = 8080;
const UDP_PORT: u16 = 9999;
const SSH_PORT: u16 = 2222;
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7000;

impl Pair {
    fn start() -> Pair {
        Pair::start_with(&[])
    }

    /// Like [`Pair::start`], with `extra` flags given to both daemons.
    fn start_with(extra: &[&str]) -> Pair {
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
        let mut args_a = vec!["--public"];
        args_a.extend_from_slice(extra);
        let up_a = Up::start(&a, &dir.path().join("a"), &reg, &args_a);
        let expose = format!("{EXPOSED},{UDP_PORT},{SSH_PORT},{IPERF_PORT},{ECHO_PORT}");
        let mut args_b = vec!["--public", "--expose", &expose];
        args_b.extend_from_slice(extra);
        let up_b = Up::start(&b, &dir.path().join("b"), &reg, &args_b);
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
    fn http_server(&self, port: u16, dir: &std::path::Path) -> (Proc, std::path::PathBuf) {
        let log = self.dir.path().join(format!("http-{port}.log"));
        let server = self.b.http_server(self.up_b.ula, port, dir, Some(&log));
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn curl_reaches_an_exposed_http_server_and_the_server_sees_the_callers_ula() {
    let p = Pair::start();
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("hello.txt"), b"hello through pilot0\n").unwrap();
    // 1 GiB that does not repeat (a xorshift stream), to see every byte arrive in order.
    let big = site.path().join("big.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(File::create(&big).unwrap());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            for w in chunk.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&chunk).unwrap();
        }
    }
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

    // Hashed as it arrives (curl into sha256sum), against the file's own hash.
    let want = sha256_file(&big);
    let t = Instant::now();
    let fetch = format!(
        "set -o pipefail; curl -sS -g --max-time 300 '{}' | sha256sum",
        p.url(EXPOSED, "big.bin")
    );
    let out = p.a.exec("bash", &["-c", &fetch]).output().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "curl: {}", text(&out.stderr));
    let got = text(&out.stdout);
    assert_eq!(
        got.split_whitespace().next(),
        Some(want.as_str()),
        "the 1 GiB body differs"
    );
    println!(
        "1 GiB through pilot0 in {secs:.2} s ({:.0} MB/s)",
        1073.741824 / secs
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

/// SHA-256 of a file, in hex.
fn sha256_file(path: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut f = File::open(path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `ssh-keygen` of an ed25519 key without passphrase at `path` (and `path`.pub).
fn keygen(path: &std::path::Path) {
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "pilot-test",
            "-f",
            path.to_str().unwrap(),
        ],
    );
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn ssh_runs_a_command_and_scp_copies_64_mib_intact() {
    let p = Pair::start();
    let keys = tempfile::tempdir().unwrap();
    let k = |name: &str| keys.path().join(name);
    keygen(&k("id"));
    keygen(&k("host"));
    std::fs::copy(k("id.pub"), k("authorized_keys")).unwrap();
    // sshd's privilege separation directory; it holds nothing.
    std::fs::create_dir_all("/run/sshd").unwrap();
    let ula = p.up_b.ula;
    std::fs::write(
        k("sshd_config"),
        format!(
            "ListenAddress [{ula}]:{SSH_PORT}\n\
             HostKey {host}\n\
             AuthorizedKeysFile {auth}\n\
             PidFile none\n\
             StrictModes no\n\
             UsePAM no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             Subsystem sftp internal-sftp\n",
            host = k("host").display(),
            auth = k("authorized_keys").display(),
        ),
    )
    .unwrap();
    let sshd_log = keys.path().join("sshd.log");
    let _sshd = Proc(
        p.b.exec(
            "/usr/sbin/sshd",
            &["-D", "-e", "-f", k("sshd_config").to_str().unwrap()],
        )
        .stdout(Stdio::null())
        .stderr(File::create(&sshd_log).unwrap())
        .spawn()
        .unwrap(),
    );
    p.b.wait_listening(SSH_PORT);

    let id = k("id");
    let port = SSH_PORT.to_string();
    let common = [
        "-F",
        "/dev/null",
        "-i",
        id.to_str().unwrap(),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=20",
        "-o",
        "LogLevel=ERROR",
    ];
    let mut ssh_args = vec!["-p", &port];
    ssh_args.extend_from_slice(&common);
    let dest = format!("root@{ula}");
    ssh_args.extend_from_slice(&[&dest, "echo ok; cat /proc/sys/kernel/hostname"]);
    let out = p.a.exec("ssh", &ssh_args).output().unwrap();
    assert!(
        out.status.success(),
        "ssh: {}\nsshd:\n{}",
        text(&out.stderr),
        std::fs::read_to_string(&sshd_log).unwrap_or_default()
    );
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(text(&out.stdout), format!("ok\n{hostname}"));
    let log = std::fs::read_to_string(&sshd_log).unwrap();
    assert!(
        log.contains(&format!("Accepted publickey for root from {}", p.up_a.ula)),
        "sshd did not see A's ULA {}:\n{log}",
        p.up_a.ula
    );

    // 64 MiB that do not repeat, copied A -> B with scp.
    let src = p.dir.path().join("scp-src.bin");
    let dst = p.dir.path().join("scp-dst.bin");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let big: Vec<u8> = (0..64usize << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&src, &big).unwrap();
    drop(big);
    let target = format!("root@[{ula}]:{}", dst.display());
    let mut scp_args = vec!["-q", "-P", &port];
    scp_args.extend_from_slice(&common);
    scp_args.extend_from_slice(&[src.to_str().unwrap(), &target]);
    let t = Instant::now();
    let out = p.a.exec("scp", &scp_args).output().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "scp: {}", text(&out.stderr));
    assert_eq!(sha256_file(&dst), sha256_file(&src), "the copy differs");
    println!(
        "scp of 64 MiB through pilot0 in {secs:.2} s ({:.0} MB/s)",
        67.108864 / secs
    );
}

/// Figures from iperf3's JSON report, read with Python (the tests have no JSON parser).
fn iperf_figures(json: &[u8], exprs: &str) -> Vec<f64> {
    let script =
        format!("import json, sys\nr = json.load(sys.stdin)\ne = r['end']\nprint({exprs})\n");
    let mut c = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(json).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "iperf3 report: {}\n{}",
        text(&out.stderr),
        text(json)
    );
    text(&out.stdout)
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

impl Pair {
    /// One iperf3 run from A to the one-off server on B's ULA; returns its JSON report.
    fn iperf(&self, args: &[&str]) -> Vec<u8> {
        let ula = self.up_b.ula.to_string();
        let port = IPERF_PORT.to_string();
        let mut server = Proc(
            self.b
                .exec("iperf3", &["-s", "-1", "-B", &ula, "-p", &port])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        self.b.wait_listening(IPERF_PORT);
        let mut v = vec!["-c", &ula, "-p", &port, "-t", "3", "-J"];
        v.extend_from_slice(args);
        let out = self.a.exec("iperf3", &v).output().unwrap();
        assert!(
            out.status.success(),
            "iperf3 {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let _ = server.0.wait();
        out.stdout
    }
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn iperf3_tcp_both_ways_and_udp_through_pilot0() {
    let p = Pair::start();
    for (what, args) in [
        ("TCP A->B", &[][..]),
        ("TCP B->A (-R)", &["-R"][..]),
        ("TCP A->B -P 4", &["-P", "4"][..]),
    ] {
        let json = p.iperf(args);
        let f = iperf_figures(
            &json,
            "e['sum_received']['bytes'], e['sum_received']['bits_per_second'], \
             e['sum_sent'].get('retransmits', 0)",
        );
        assert!(f[0] > 0.0, "{what}: nothing received:\n{}", text(&json));
        println!(
            "iperf3 {what}: {:.3} Gbit/s received ({:.0} MB, {} retransmits)",
            f[1] / 1e9,
            f[0] / 1e6,
            f[2]
        );
    }
    let json = p.iperf(&["-u", "-l", "1200", "-b", "200M"]);
    // The server's figures: datagrams sent, lost, and the loss in per cent.
    let f = iperf_figures(
        &json,
        "e['sum']['packets'], e['sum']['lost_packets'], e['sum']['lost_percent'], \
         e['sum']['seconds']",
    );
    let received = f[0] - f[1];
    assert!(received > 0.0, "UDP: nothing received:\n{}", text(&json));
    println!(
        "iperf3 UDP 200 Mbit/s offered, 1,200-byte datagrams: {received} of {} received, \
         {:.2} % lost, {:.3} Gbit/s received",
        f[0],
        f[2],
        received * 1200.0 * 8.0 / f[3] / 1e9
    );
}

/// An asyncio echo server on B's ULA and `port`: each connection gets back what it sends.
const ECHO_SERVER: &str = "
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def echo(r, w):
    try:
        while True:
            d = await r.read(4096)
            if not d:
                break
            w.write(d)
            await w.drain()
    except ConnectionError:
        pass
    w.close()
async def main():
    s = await asyncio.start_server(echo, sys.argv[1], int(sys.argv[2]), backlog=4096)
    async with s:
        await s.serve_forever()
asyncio.run(main())
";

/// Opens N connections to host:port, in waves of W started together `pause` seconds apart
/// (W = N: all at once); when every one is open (or failed), each sends its number and reads
/// it back. Prints `opened ok failed open-secs total-secs` and one line per error kind.
const MANY_CLIENT: &str = "
import asyncio, collections, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
wave, pause = int(sys.argv[4]), float(sys.argv[5])
errors = collections.Counter()
async def conn():
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port), 60)
    except Exception as e:
        errors['connect: ' + type(e).__name__ + ' ' + str(e)] += 1
        return None
async def talk(i, c):
    r, w = c
    msg = b'%06d' % i
    try:
        w.write(msg)
        await w.drain()
        got = await asyncio.wait_for(r.readexactly(len(msg)), 30)
        ok = got == msg
        if not ok:
            errors['wrong bytes'] += 1
    except Exception as e:
        errors['echo: ' + type(e).__name__ + ' ' + str(e)] += 1
        ok = False
    w.close()
    return ok
async def main():
    t = time.monotonic()
    tasks = []
    for i in range(n):
        if i and i % wave == 0:
            await asyncio.sleep(pause)
        tasks.append(asyncio.ensure_future(conn()))
    conns = await asyncio.gather(*tasks)
    opened = [c for c in conns if c]
    t_open = time.monotonic() - t
    oks = await asyncio.gather(*(talk(i, c) for i, c in enumerate(opened)))
    print(len(opened), sum(oks), n - sum(oks), '%.2f' % t_open, '%.2f' % (time.monotonic() - t))
    for k, v in errors.most_common():
        print(v, k)
asyncio.run(main())
";

impl Pair {
    /// Runs [`MANY_CLIENT`] in A against [`ECHO_SERVER`] on B's ULA: `n` connections in waves
    /// of `wave`, `pause` apart. Returns the client's report, after checking that it ran.
    fn many_connections(&self, n: usize, wave: usize, pause: f64) -> String {
        let ula = self.up_b.ula.to_string();
        let port = ECHO_PORT.to_string();
        let _server = Proc(
            self.b
                .exec("python3", &["-c", ECHO_SERVER, &ula, &port])
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        self.b.wait_listening(ECHO_PORT);
        let args = [n.to_string(), wave.to_string(), pause.to_string()];
        let out = self
            .a
            .exec(
                "python3",
                &["-c", MANY_CLIENT, &ula, &port, &args[0], &args[1], &args[2]],
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "client: {}", text(&out.stderr));
        let report = text(&out.stdout);
        println!("{n} connections in waves of {wave}, {pause} s apart: opened ok failed open-secs total-secs:\n{report}");
        report
    }

    /// Asserts that every one of `n` connections echoed.
    fn assert_all_echoed(&self, n: usize, report: &str) {
        let first: Vec<&str> = report.split_whitespace().take(3).collect();
        let n = n.to_string();
        assert_eq!(
            first,
            [n.as_str(), n.as_str(), "0"],
            "not every connection echoed:\n{report}\nA's daemon:\n{}\nB's daemon:\n{}",
            tail(&self.up_a.log_text()),
            tail(&self.up_b.log_text())
        );
    }
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn a_thousand_tcp_connections_opened_in_waves_stay_open_together_and_all_echo() {
    // Waves of 50 every 0.3 s, with the default SYN rate limit (200 per second from one peer).
    let p = Pair::start();
    let report = p.many_connections(1000, 50, 0.3);
    p.assert_all_echoed(1000, &report);
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn a_thousand_tcp_connections_opened_at_once_all_echo() {
    // No SYN rate limit, so nothing but the data path stands between the burst and B.
    let p = Pair::start_with(&["--syn-rate-limit", "0", "--syn-rate-limit-per-peer", "0"]);
    let report = p.many_connections(1000, 1000, 0.0);
    p.assert_all_echoed(1000, &report);
}

/// The last lines of a log.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A client in A connects to an echo server on B's ULA, talks, stays silent for `idle`, and
/// talks again; returns what it printed (`first <reply>`, then `second <reply>`, or when and
/// how the connection ended while silent) and whether it exited cleanly.
fn idle_conversation(p: &Pair, idle: Duration) -> (bool, String) {
    let ula = p.up_b.ula.to_string();
    let port = ECHO_PORT.to_string();
    let _server = Proc(
        p.b.exec("python3", &["-c", ECHO_SERVER, &ula, &port])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    p.b.wait_listening(ECHO_PORT);
    let client = format!(
        "import select, socket, time\n\
         s = socket.create_connection(('{ula}', {port}), timeout=20)\n\
         s.sendall(b'one')\n\
         print('first', s.recv(16).decode(), flush=True)\n\
         t = time.monotonic()\n\
         while time.monotonic() - t < {secs}:\n    \
             # Silent; anything readable now is the end of the connection.\n    \
             if select.select([s], [], [], 0.25)[0]:\n        \
                 try:\n            \
                     why = 'EOF' if not s.recv(16) else 'unexpected data'\n        \
                 except Exception as e:\n            \
                     why = type(e).__name__ + ' ' + str(e)\n        \
                 print('ended after %.1f s of silence: %s' % (time.monotonic() - t, why))\n        \
                 raise SystemExit(0)\n\
         s.sendall(b'two')\n\
         print('second', s.recv(16).decode() or 'EOF', flush=True)\n",
        secs = idle.as_secs_f64()
    );
    let out = p.a.exec("python3", &["-c", &client]).output().unwrap();
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

#[test]
#[ignore = "needs root: network namespaces and /dev/net/tun"]
fn an_idle_tcp_connection_outlives_every_timeout() {
    // The hairpin NAT has no idle timeout; the Pilot stream's is set to 5 s, below the
    // keepalive interval (30 s): 20 s of silence (four idle timeouts) must leave the
    // connection alive, kept by keepalive probes.
    let p = Pair::start_with(&["--idle-timeout", "5s"]);
    let (ok, out) = idle_conversation(&p, Duration::from_secs(20));
    assert!(ok, "{out}");
    assert_eq!(
        out,
        "first one\nsecond two\n",
        "A's daemon:\n{}\nB's daemon:\n{}",
        tail(&p.up_a.log_text()),
        tail(&p.up_b.log_text())
    );
}

//! NAT traversal with real kernels and NATs: `pilotd` pairs behind nftables NATs in network
//! namespaces (`pilot_tests::natlab`), a registry and a beacon in an "internet" namespace.
//!
//! Covered: every pair of NAT kinds connects (an echo and a 16 MiB hash-checked transfer)
//! and goes direct exactly when the pair allows it, relayed otherwise (a table of time to
//! first byte and transfer time per pair is printed, visible with `--nocapture`); transfers
//! at 1 % and 5 % loss between the NATs; a relayed pair moving to the direct path while a
//! stream runs once direct UDP is unblocked; a transfer across restarts of the beacon and the
//! registry; roaming (a host's public address and NAT mapping change under a 64 MiB transfer
//! and under an idle ssh session through `pilotd up`'s TUN interface: both go on, on the same
//! connection).
//!
//! These need root (network namespaces, nftables), so they are ignored by default and run by
//! the root section of `scripts/test.sh`; asked for without root or `nft`, they fail at once
//! naming what is missing.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use pilot_driver::Driver;
use pilot_tests::natlab::{
    echo_first_byte, hashed_transfer, unavailable, Host, Lab, LabError, Nat, ECHO_PORT, SINK_PORT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1 << 20;

/// One test at a time: they share the machine's CPU, and timings are printed.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Fails `test` at once, naming what is missing, when the lab cannot run here. The tests are
/// ignored unless asked for (`--ignored`, which `scripts/test.sh` does only as root), so without
/// root they count as skipped; asked for where they cannot run, they fail instead of passing.
fn require_lab(test: &str) {
    if let Some(why) = unavailable() {
        panic!("{test} cannot run here: {why} (it needs root and nft)");
    }
}

/// The set-up most lab tests share: the serial lock, a lab, host A behind one NAT and host B
/// behind another (each on its own site, registered), B serving the echo and the hashing
/// sink (which marks what it reads in `sunk`), and a driver connection to A.
struct Pair {
    // Declared before `lab`: the hosts and their sites go before the internet namespace.
    a: Host,
    b: Host,
    d: Driver,
    server: tokio::task::JoinHandle<()>,
    sunk: std::sync::Arc<pilot_tests::natlab::Progress>,
    lab: Lab,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Pair {
    async fn start(test: &str, a: Nat, b: Nat) -> Pair {
        Pair::start_with(test, (a, &[]), (b, &[])).await
    }

    /// Like [`Pair::start`], with extra `pilotd` arguments for each host.
    async fn start_with(test: &str, a: (Nat, &[&str]), b: (Nat, &[&str])) -> Pair {
        require_lab(test);
        let serial = SERIAL.lock().await;
        let mut lab = Lab::start().unwrap();
        let a = lab.host_with(a.0, a.1).await.unwrap();
        let b = lab.host_with(b.0, b.1).await.unwrap();
        let sunk = std::sync::Arc::default();
        let server = b.serve_tracked(std::sync::Arc::clone(&sunk)).await.unwrap();
        let d = a.driver().await.unwrap();
        Pair {
            a,
            b,
            d,
            server,
            sunk,
            lab,
            _serial: serial,
        }
    }
}

/// Waits up to `within` for `from`'s path to `to` to be direct (`want_relay` false) or
/// relayed; returns how long that took, or the last path seen.
async fn wait_path(
    from: &Host,
    to: u32,
    want_relay: bool,
    within: Duration,
) -> Result<Duration, Option<bool>> {
    let t0 = Instant::now();
    loop {
        let now = from.relayed(to).await.ok().flatten();
        if now == Some(want_relay) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > within {
            return Err(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One measured pair of the matrix.
struct PairResult {
    a: Nat,
    b: Nat,
    expect_direct: bool,
    ttfb: Option<Duration>,
    transfer: Option<Duration>,
    /// The path A reports for B at the end: Some(true) relayed.
    relayed: Option<bool>,
    /// Time from the end of the transfer until the path was as expected.
    settle: Option<Duration>,
    error: Option<String>,
}

async fn run_pair(a: &Host, b: &Host, expect_direct: bool) -> PairResult {
    let mut r = PairResult {
        a: a.kind,
        b: b.kind,
        expect_direct,
        ttfb: None,
        transfer: None,
        relayed: None,
        settle: None,
        error: None,
    };
    let res: Result<(), LabError> = async {
        let d = a.driver().await?;
        let ttfb = tokio::time::timeout(
            Duration::from_secs(30),
            echo_first_byte(&d, b.addr(ECHO_PORT)),
        )
        .await
        .map_err(|_| LabError::Timeout("echo within 30 s".into()))??;
        r.ttfb = Some(ttfb);
        let t = tokio::time::timeout(
            Duration::from_secs(180),
            hashed_transfer(&d, b.addr(SINK_PORT), 16 * MIB, u64::from(b.node_id)),
        )
        .await
        .map_err(|_| LabError::Timeout("16 MiB within 180 s".into()))??;
        r.transfer = Some(t);
        Ok(())
    }
    .await;
    if let Err(e) = res {
        r.error = Some(format!("{e}"));
    }
    match wait_path(a, b.node_id, !expect_direct, Duration::from_secs(30)).await {
        Ok(t) => {
            r.settle = Some(t);
            r.relayed = Some(!expect_direct);
        }
        Err(last) => r.relayed = last,
    }
    r
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{}", d.as_millis()))
        .unwrap_or_else(|| "-".into())
}

/// Every unordered pair of NAT kinds (each kind twice, so a kind meets itself on two sites):
/// connects, transfers 16 MiB, and is direct exactly when [`Nat::direct_possible`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and nftables"]
async fn nat_matrix() {
    require_lab("nat_matrix");
    let _serial = SERIAL.lock().await;
    let mut lab = Lab::start().unwrap();
    let mut hosts: Vec<[Host; 2]> = Vec::new();
    for kind in Nat::ALL {
        let h0 = lab.host(kind).await.unwrap();
        let h1 = lab.host(kind).await.unwrap();
        hosts.push([h0, h1]);
    }
    let mut servers = Vec::new();
    for pair in &hosts {
        for h in pair {
            servers.push(h.serve().await.unwrap());
        }
    }
    let mut results = Vec::new();
    for i in 0..hosts.len() {
        for j in i..hosts.len() {
            let (a, b) = (&hosts[i][0], &hosts[j][1]);
            let expect_direct = Nat::direct_possible(a.kind, b.kind);
            let r = run_pair(a, b, expect_direct).await;
            eprintln!(
                "{} -> {}: ttfb {} ms, 16 MiB {} ms, relayed {:?}, error {:?}",
                a.kind.name(),
                b.kind.name(),
                ms(r.ttfb),
                ms(r.transfer),
                r.relayed,
                r.error
            );
            results.push(r);
        }
    }
    println!(
        "\n{:<16} {:<16} {:<8} {:<8} {:>9} {:>12} {:>10}",
        "A (dials)", "B", "expect", "path", "ttfb ms", "16 MiB ms", "settle ms"
    );
    let mut failures = Vec::new();
    for r in &results {
        let path = match r.relayed {
            Some(true) => "relay",
            Some(false) => "direct",
            None => "none",
        };
        println!(
            "{:<16} {:<16} {:<8} {:<8} {:>9} {:>12} {:>10}",
            r.a.name(),
            r.b.name(),
            if r.expect_direct { "direct" } else { "relay" },
            path,
            ms(r.ttfb),
            ms(r.transfer),
            ms(r.settle)
        );
        if let Some(e) = &r.error {
            failures.push(format!("{} -> {}: {e}", r.a.name(), r.b.name()));
        } else if r.relayed != Some(!r.expect_direct) {
            failures.push(format!(
                "{} -> {}: expected {}, path {path}",
                r.a.name(),
                r.b.name(),
                if r.expect_direct { "direct" } else { "relay" }
            ));
        }
    }
    for s in servers {
        s.abort();
    }
    if !failures.is_empty() {
        for pair in &hosts {
            for h in pair {
                eprintln!("{}:\n{}", h.name, h.log_tail(30));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Hash-checked transfers on a direct path between two port-restricted NATs while the
/// internet drops 1 % (32 MiB) and 5 % (16 MiB) of the datagrams between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and nftables"]
async fn transfers_under_loss() {
    let p = Pair::start(
        "transfers_under_loss",
        Nat::PortRestricted,
        Nat::PortRestricted,
    )
    .await;
    let (a, b, d, lab) = (&p.a, &p.b, &p.d, &p.lab);
    echo_first_byte(d, b.addr(ECHO_PORT)).await.unwrap();
    wait_path(a, b.node_id, false, Duration::from_secs(30))
        .await
        .unwrap();
    for (percent, mib) in [(1u8, 32usize), (5, 16)] {
        lab.set_loss(percent).unwrap();
        let t = tokio::time::timeout(
            Duration::from_secs(300),
            hashed_transfer(d, b.addr(SINK_PORT), mib * MIB, u64::from(percent)),
        )
        .await
        .unwrap_or_else(|_| panic!("{mib} MiB at {percent} % loss: not within 300 s"))
        .unwrap_or_else(|e| panic!("{mib} MiB at {percent} % loss: {e}"));
        println!(
            "{mib} MiB at {percent} % loss: {} ms ({:.1} MB/s), relayed {:?}",
            t.as_millis(),
            (mib * MIB) as f64 / 1e6 / t.as_secs_f64(),
            a.relayed(b.node_id).await.unwrap()
        );
    }
    lab.set_loss(0).unwrap();
}

/// Echo round trips of 1 KiB on one stream every 100 ms until the returned sender is
/// dropped; the count of completed ones is published.
fn keep_echoing(
    s: pilot_driver::PilotStream,
) -> (
    tokio::sync::watch::Receiver<u64>,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let task = tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(s);
        let mut rng = pilot_tests::natlab::Prng::new(7);
        let mut data = vec![0u8; 1024];
        let mut back = vec![0u8; 1024];
        for n in 1.. {
            rng.fill(&mut data);
            let once = async {
                w.write_all(&data).await?;
                r.read_exact(&mut back).await?;
                Ok::<_, std::io::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(20), once).await {
                Err(_) => return Err(format!("round trip {n} took over 20 s")),
                Ok(Err(e)) => return Err(format!("round trip {n}: {e}")),
                Ok(Ok(())) => {}
            }
            if back != data {
                return Err(format!("round trip {n}: echo differs"));
            }
            if tx.send(n).is_err() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    });
    (rx, task)
}

/// Waits until `n` more round trips completed.
async fn more_round_trips(rx: &mut tokio::sync::watch::Receiver<u64>, n: u64, within: Duration) {
    let start = *rx.borrow();
    tokio::time::timeout(within, rx.wait_for(|&c| c >= start + n))
        .await
        .unwrap_or_else(|_| panic!("fewer than {n} round trips in {within:?}"))
        .expect("the echo loop ended");
}

/// With direct UDP between the sites blocked, two port-restricted hosts talk through the
/// relay; once unblocked, the path becomes direct within 30 s while a stream keeps echoing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and nftables"]
async fn relay_then_direct() {
    let p = Pair::start(
        "relay_then_direct",
        Nat::PortRestricted,
        Nat::PortRestricted,
    )
    .await;
    let (a, b, d, lab) = (&p.a, &p.b, &p.d, &p.lab);
    lab.block_direct_udp(true).unwrap();
    let ttfb = echo_first_byte(d, b.addr(ECHO_PORT)).await.unwrap();
    let s = d.dial(b.addr(ECHO_PORT)).await.unwrap();
    let (mut count, task) = keep_echoing(s);
    more_round_trips(&mut count, 3, Duration::from_secs(20)).await;
    assert_eq!(a.relayed(b.node_id).await.unwrap(), Some(true));
    let t = hashed_transfer(d, b.addr(SINK_PORT), 16 * MIB, 3)
        .await
        .unwrap();
    println!(
        "blocked: relayed, first byte after {} ms, 16 MiB in {} ms",
        ttfb.as_millis(),
        t.as_millis()
    );
    lab.block_direct_udp(false).unwrap();
    let direct = wait_path(a, b.node_id, false, Duration::from_secs(30))
        .await
        .unwrap_or_else(|last| panic!("not direct within 30 s of the unblock: {last:?}"));
    println!("unblocked: direct after {} ms", direct.as_millis());
    more_round_trips(&mut count, 10, Duration::from_secs(20)).await;
    let t = hashed_transfer(d, b.addr(SINK_PORT), 16 * MIB, 4)
        .await
        .unwrap();
    println!("direct: 16 MiB in {} ms", t.as_millis());
    assert_eq!(a.relayed(b.node_id).await.unwrap(), Some(false));
    drop(count);
    tokio::time::timeout(Duration::from_secs(25), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A 64 MiB transfer between a full-cone and a port-restricted host keeps going while the
/// beacon restarts, then the registry; afterwards new streams work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and nftables"]
async fn beacon_and_registry_restart_during_transfer() {
    let mut p = Pair::start(
        "beacon_and_registry_restart_during_transfer",
        Nat::FullCone,
        Nat::PortRestricted,
    )
    .await;
    echo_first_byte(&p.d, p.b.addr(ECHO_PORT)).await.unwrap();
    let dst = p.b.addr(SINK_PORT);
    let d = p.a.driver().await.unwrap();
    let transfer = tokio::spawn(async move { hashed_transfer(&d, dst, 64 * MIB, 9).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.lab.start_beacon().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.lab.start_registry().unwrap();
    let t = tokio::time::timeout(Duration::from_secs(300), transfer)
        .await
        .expect("64 MiB across the restarts: not within 300 s")
        .unwrap()
        .unwrap();
    println!(
        "64 MiB across beacon and registry restarts: {} ms",
        t.as_millis()
    );
    // The registry kept nothing: both daemons register again; new streams work.
    let t0 = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ttfb = loop {
        p.a.wait_registered().await.unwrap();
        p.b.wait_registered().await.unwrap();
        let d = p.a.driver().await.unwrap();
        match tokio::time::timeout(
            Duration::from_secs(10),
            echo_first_byte(&d, p.b.addr(ECHO_PORT)),
        )
        .await
        {
            Ok(Ok(t)) => break t,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no echo within 60 s of the registry restart: {other:?}\n{}\n{}",
                    p.a.log_tail(30),
                    p.b.log_tail(30)
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    println!(
        "after the restarts: echo after {} ms (first byte {} ms)",
        t0.elapsed().as_millis(),
        ttfb.as_millis()
    );
    p.server.abort();
}

/// Two hosts behind one port-restricted NAT that does not hairpin (Linux masquerade: a
/// datagram from the LAN to the NAT's public address ends at the NAT itself). Each learns
/// the other's public endpoint only, which it cannot reach from inside: the pair must still
/// connect, through the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and nftables"]
async fn same_nat_without_hairpin() {
    require_lab("same_nat_without_hairpin");
    let _serial = SERIAL.lock().await;
    let mut lab = Lab::start().unwrap();
    let mut site = lab.site(Nat::PortRestricted).unwrap();
    let mut a = site.host().unwrap();
    let mut b = site.host().unwrap();
    a.wait_registered().await.unwrap();
    b.wait_registered().await.unwrap();
    let _server = b.serve().await.unwrap();
    let d = a.driver().await.unwrap();
    let ttfb = tokio::time::timeout(
        Duration::from_secs(30),
        echo_first_byte(&d, b.addr(ECHO_PORT)),
    )
    .await
    .expect("no echo within 30 s")
    .unwrap();
    let t = tokio::time::timeout(
        Duration::from_secs(180),
        hashed_transfer(&d, b.addr(SINK_PORT), 16 * MIB, 5),
    )
    .await
    .expect("16 MiB not within 180 s")
    .unwrap();
    let path = a.relayed(b.node_id).await.unwrap();
    println!(
        "same NAT, no hairpin: first byte after {} ms, 16 MiB in {} ms, relayed {path:?}",
        ttfb.as_millis(),
        t.as_millis()
    );
    assert_eq!(
        path,
        Some(true),
        "a direct path through a NAT that does not hairpin"
    );
}

/// What `host` shows of tunnel peer `peer`: its endpoint and whether it is relayed.
async fn peer_view(host: &Host, peer: u32) -> (String, bool) {
    let p = host
        .peer_info(peer)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{} has no tunnel to {peer}", host.name));
    (p.endpoint, p.relay)
}

/// Waits up to `within` for `host` to show `peer` directly at an endpoint on `ip`; returns
/// that endpoint.
async fn wait_endpoint_on(host: &Host, peer: u32, ip: &str, within: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let (ep, relay) = peer_view(host, peer).await;
        if !relay && ep.starts_with(&format!("{ip}:")) {
            return ep;
        }
        assert!(
            t0.elapsed() < within,
            "{} does not show {peer} directly on {ip} within {within:?}: endpoint {ep}, \
             relayed {relay}\n{}",
            host.name,
            host.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The IDs of `host`'s live connections to `peer`'s virtual port `port`.
async fn conn_ids(host: &Host, peer: &Host, port: u16) -> Vec<u32> {
    let remote = peer.addr(port).addr.to_string();
    host.connections()
        .await
        .unwrap()
        .iter()
        .filter(|c| {
            c.remote_addr == remote
                && c.remote_port == port
                && c.state.eq_ignore_ascii_case("established")
        })
        .map(|c| c.id)
        .collect()
}

/// Roaming: host A (port-restricted) moves to a new public address and NAT mapping in the
/// middle of a 64 MiB transfer to B (full cone, so A's new mapping reaches it). The transfer
/// completes on the one stream it dialed (the same connection ID before and after, no
/// other), the hash matches, the path stays direct, and B shows A at its new endpoint. The
/// sink's longest time without progress after the move is printed against the longest
/// before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and nftables"]
async fn roam_during_transfer() {
    use pilot_tests::natlab::{hashed_transfer_tracked, Progress};
    use std::sync::Arc;

    let mut p = Pair::start("roam_during_transfer", Nat::PortRestricted, Nat::FullCone).await;
    let sunk = Arc::clone(&p.sunk);
    echo_first_byte(&p.d, p.b.addr(ECHO_PORT)).await.unwrap();
    wait_path(&p.a, p.b.node_id, false, Duration::from_secs(30))
        .await
        .unwrap_or_else(|last| panic!("A -> B not direct within 30 s: {last:?}"));
    let old_ip = p.a.site().unwrap().public_ip.clone();
    let old_ep = wait_endpoint_on(&p.b, p.a.node_id, &old_ip, Duration::from_secs(10)).await;

    // Paced (8 MiB/s, 8 s in all) so that the move falls in the middle with data in flight.
    let total = 64 * MIB;
    let written = Arc::new(Progress::paced(8.0 * MIB as f64));
    let (d, dst, w) = (
        p.a.driver().await.unwrap(),
        p.b.addr(SINK_PORT),
        written.clone(),
    );
    let transfer =
        tokio::spawn(async move { hashed_transfer_tracked(&d, dst, total, 21, w).await });
    let t0 = Instant::now();
    while sunk.written() < 16 * MIB {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "16 MiB not within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let conns = conn_ids(&p.a, &p.b, SINK_PORT).await;
    assert_eq!(conns.len(), 1, "A's connections to the sink: {conns:?}");

    let moved_at = Instant::now();
    let at_move = sunk.written();
    let new_ip = p.a.site_mut().unwrap().roam().unwrap();
    let move_took = moved_at.elapsed();
    // Progress after the move, on the same connection.
    while sunk.written() < at_move + 8 * MIB {
        assert!(
            moved_at.elapsed() < Duration::from_secs(60),
            "no 8 MiB progress within 60 s of the move ({} bytes)\nA:\n{}\nB:\n{}",
            sunk.written() - at_move,
            p.a.log_tail(30),
            p.b.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        conn_ids(&p.a, &p.b, SINK_PORT).await,
        conns,
        "the transfer's connection changed across the move"
    );
    let t = tokio::time::timeout(Duration::from_secs(300), transfer)
        .await
        .expect("64 MiB across the move: not within 300 s")
        .unwrap()
        .unwrap_or_else(|e| panic!("64 MiB across the move: {e}"));
    let new_ep = wait_endpoint_on(&p.b, p.a.node_id, &new_ip, Duration::from_secs(10)).await;
    assert_eq!(p.a.relayed(p.b.node_id).await.unwrap(), Some(false));
    // Without progress at the sink: the gap around the move (from the last read before it
    // to the first after it was done), the longest in the 5 s after it, and the longest before.
    let moved = moved_at + move_took;
    let resumed = sunk
        .first_after(moved)
        .expect("the sink read after the move");
    let ms = |d: Duration| d.as_millis();
    let (near, near_end) = sunk
        .longest_stall(moved_at, moved_at + Duration::from_secs(5))
        .expect("the sink read after the move");
    let before = sunk
        .longest_stall(t0, moved_at)
        .map(|(gap, _)| gap)
        .unwrap_or_default();
    println!(
        "roam during 64 MiB: B sees A at {old_ep}, then {new_ep}; transfer {} ms; the move took \
         {} ms; first read after it {} ms after its end; longest time without progress at the \
         sink in the 5 s after the move {} ms (ending {} ms after it), before the move {} ms",
        ms(t),
        ms(move_took),
        ms(resumed.duration_since(moved)),
        ms(near),
        ms(near_end.duration_since(moved_at)),
        ms(before)
    );
}

/// The port of the sshd on B's TUN address in [`roam_with_idle_ssh_through_pilot0`].
const SSH_PORT: u16 = 2222;

/// What the ssh test needs beyond the lab, when something is missing.
fn ssh_unavailable() -> Option<String> {
    let in_path = |tool: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
    };
    let missing: Vec<&str> = [
        (
            "/dev/net/tun",
            std::path::Path::new("/dev/net/tun").exists(),
        ),
        (
            "/usr/sbin/sshd",
            std::path::Path::new("/usr/sbin/sshd").is_file(),
        ),
        ("ssh", in_path("ssh")),
        ("ssh-keygen", in_path("ssh-keygen")),
    ]
    .into_iter()
    .filter(|&(_, there)| !there)
    .map(|(what, _)| what)
    .collect();
    (!missing.is_empty()).then(|| format!("missing {}", missing.join(", ")))
}

/// `ssh-keygen` of an ed25519 key without passphrase at `path` (and `path`.pub).
fn keygen(path: &std::path::Path) {
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "natlab", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Roaming with `pilotd up`: an idle ssh session from A to B's TUN address (port-restricted
/// A, full-cone B) stays open while A moves to a new public address and NAT mapping; the line
/// sent after the move is answered on the same session (one connection, the same ID before
/// and after), and B shows A at its new endpoint. After a second move B speaks first, which
/// reaches A only once A's new mapping is known (within 90 s; the time is printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, nftables and /dev/net/tun"]
async fn roam_with_idle_ssh_through_pilot0() {
    use std::io::{BufRead as _, Write as _};
    use std::process::Stdio;

    if let Some(why) = ssh_unavailable() {
        panic!("roam_with_idle_ssh_through_pilot0 cannot run here: {why}");
    }
    let expose = SSH_PORT.to_string();
    let mut p = Pair::start_with(
        "roam_with_idle_ssh_through_pilot0",
        (Nat::PortRestricted, &["up"]),
        (Nat::FullCone, &["up", "--expose", &expose]),
    )
    .await;
    let mut ulas = Vec::new();
    for h in [&p.a, &p.b] {
        let t0 = Instant::now();
        ulas.push(loop {
            if let Some(ula) = h.ula() {
                break ula;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{} not up within 30 s:\n{}",
                h.name,
                h.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
    }
    let ula = ulas[1];

    let keys = tempfile::tempdir().unwrap();
    let k = |name: &str| keys.path().join(name);
    keygen(&k("id"));
    keygen(&k("host"));
    std::fs::copy(k("id.pub"), k("authorized_keys")).unwrap();
    // sshd's privilege separation directory; it holds nothing.
    std::fs::create_dir_all("/run/sshd").unwrap();
    std::fs::write(
        k("sshd_config"),
        format!(
            "ListenAddress [{ula}]:{SSH_PORT}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
            k("host").display(),
            k("authorized_keys").display(),
        ),
    )
    .unwrap();
    let sshd_log = k("sshd.log");
    let mut sshd =
        p.b.ns
            .exec("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(k("sshd_config"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&sshd_log).unwrap())
            .spawn()
            .unwrap();
    pilot_tests::natlab::wait_until("sshd listening", Duration::from_secs(20), || {
        Ok(p.b.ns.is_bound("t", SSH_PORT))
    })
    .unwrap();

    let ssh_log = k("ssh.log");
    let mut ssh =
        p.a.ns
            .exec("ssh")
            .args(["-p", &expose, "-F", "/dev/null", "-i"])
            .arg(k("id"))
            .args([
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
            ])
            .arg(format!("root@{ula}"))
            .arg(format!(
                "echo ready; read line; echo \"got $line\"; \
             while [ ! -e {flag} ]; do sleep 0.05; done; echo 'B first'; read end || true",
                flag = k("flag").display()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&ssh_log).unwrap())
            .spawn()
            .unwrap();
    let mut stdin = ssh.stdin.take().unwrap();
    let stdout = ssh.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = |within: Duration| {
        tokio::task::block_in_place(|| lines.recv_timeout(within))
            .unwrap_or_else(|e| {
                panic!(
                    "no line from ssh within {within:?} ({e}):\nssh: {}\nsshd: {}",
                    std::fs::read_to_string(&ssh_log).unwrap_or_default(),
                    std::fs::read_to_string(&sshd_log).unwrap_or_default()
                )
            })
            .unwrap()
    };
    assert_eq!(next_line(Duration::from_secs(30)), "ready");
    let conns = conn_ids(&p.a, &p.b, SSH_PORT).await;
    assert_eq!(conns.len(), 1, "A's connections to B's sshd: {conns:?}");

    // Idle across the move: nothing is sent from a second before it to three seconds after.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old_ip = p.a.site().unwrap().public_ip.clone();
    let old_ep = peer_view(&p.b, p.a.node_id).await.0;
    assert!(
        old_ep.starts_with(&format!("{old_ip}:")),
        "B sees A at {old_ep}"
    );
    let new_ip = p.a.site_mut().unwrap().roam().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let sent = Instant::now();
    stdin.write_all(b"after the move\n").unwrap();
    stdin.flush().unwrap();
    assert_eq!(next_line(Duration::from_secs(30)), "got after the move");
    let answer = sent.elapsed();
    assert_eq!(
        conn_ids(&p.a, &p.b, SSH_PORT).await,
        conns,
        "the ssh session's connection changed across the move"
    );
    let new_ep = wait_endpoint_on(&p.b, p.a.node_id, &new_ip, Duration::from_secs(10)).await;

    // A second move, after a second of silence (past A's delayed acknowledgments), after
    // which B speaks first. A has sent nothing from its new mapping, and nothing tells it the
    // mapping changed: B's frames go to the old one, and the beacon drops A's datagrams from
    // the new one as spoofed, until A's next discover (its mapping check, at most 10 s after
    // the last one). Then A's moved notice moves B's view, the beacon relays to A again, and
    // B's next retransmission gets through. The session must survive that, and B's line
    // arrives within the mapping check plus B's retransmission backoff (measured: about
    // 13 s; 32-43 s when A discovered only at its 30 s heartbeat).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let newer_ip = p.a.site_mut().unwrap().roam().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let flagged = Instant::now();
    std::fs::write(k("flag"), b"").unwrap();
    assert_eq!(next_line(Duration::from_secs(45)), "B first");
    let b_first = flagged.elapsed();
    assert_eq!(
        conn_ids(&p.a, &p.b, SSH_PORT).await,
        conns,
        "the ssh session's connection changed across the second move"
    );
    let newer_ep = peer_view(&p.b, p.a.node_id).await;
    let a_sees_b = peer_view(&p.a, p.b.node_id).await;
    drop(stdin);
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = ssh.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "ssh did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "ssh: {status}\n{}",
        std::fs::read_to_string(&ssh_log).unwrap_or_default()
    );
    println!(
        "idle ssh across a move: B sees A at {old_ep}, then {new_ep}; the line sent 3 s after \
         the move was answered in {} ms; after a second move (to {newer_ip}) B's line reached A \
         after {} ms, B then sees A at {newer_ep:?} (endpoint, relayed) and A sees B at \
         {a_sees_b:?}",
        answer.as_millis(),
        b_first.as_millis()
    );
    let _ = sshd.kill();
    let _ = sshd.wait();
}

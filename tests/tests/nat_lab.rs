//! NAT traversal with real kernels and NATs: `pilotd` pairs behind nftables NATs in network
//! namespaces (`pilot_tests::natlab`), a registry and a beacon in an "internet" namespace.
//!
//! Covered: every pair of NAT kinds connects (an echo and a 16 MiB hash-checked transfer)
//! and goes direct exactly when the pair allows it, relayed otherwise (a table of time to
//! first byte and transfer time per pair is printed, visible with `--nocapture`); transfers
//! at 1 % and 5 % loss between the NATs; a relayed pair moving to the direct path while a
//! stream runs once direct UDP is unblocked; a transfer across restarts of the beacon and the
//! registry.
//!
//! These need root (network namespaces, nftables), so they are ignored by default and run by
//! the root section of `scripts/test.sh`; asked for without root or `nft`, they fail at once
//! naming what is missing.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

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
    require_lab("transfers_under_loss");
    let _serial = SERIAL.lock().await;
    let mut lab = Lab::start().unwrap();
    let a = lab.host(Nat::PortRestricted).await.unwrap();
    let b = lab.host(Nat::PortRestricted).await.unwrap();
    let _server = b.serve().await.unwrap();
    let d = a.driver().await.unwrap();
    echo_first_byte(&d, b.addr(ECHO_PORT)).await.unwrap();
    wait_path(&a, b.node_id, false, Duration::from_secs(30))
        .await
        .unwrap();
    for (percent, mib) in [(1u8, 32usize), (5, 16)] {
        lab.set_loss(percent).unwrap();
        let t = tokio::time::timeout(
            Duration::from_secs(300),
            hashed_transfer(&d, b.addr(SINK_PORT), mib * MIB, u64::from(percent)),
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
    require_lab("relay_then_direct");
    let _serial = SERIAL.lock().await;
    let mut lab = Lab::start().unwrap();
    let a = lab.host(Nat::PortRestricted).await.unwrap();
    let b = lab.host(Nat::PortRestricted).await.unwrap();
    let _server = b.serve().await.unwrap();
    lab.block_direct_udp(true).unwrap();
    let d = a.driver().await.unwrap();
    let ttfb = echo_first_byte(&d, b.addr(ECHO_PORT)).await.unwrap();
    let s = d.dial(b.addr(ECHO_PORT)).await.unwrap();
    let (mut count, task) = keep_echoing(s);
    more_round_trips(&mut count, 3, Duration::from_secs(20)).await;
    assert_eq!(a.relayed(b.node_id).await.unwrap(), Some(true));
    let t = hashed_transfer(&d, b.addr(SINK_PORT), 16 * MIB, 3)
        .await
        .unwrap();
    println!(
        "blocked: relayed, first byte after {} ms, 16 MiB in {} ms",
        ttfb.as_millis(),
        t.as_millis()
    );
    lab.block_direct_udp(false).unwrap();
    let direct = wait_path(&a, b.node_id, false, Duration::from_secs(30))
        .await
        .unwrap_or_else(|last| panic!("not direct within 30 s of the unblock: {last:?}"));
    println!("unblocked: direct after {} ms", direct.as_millis());
    more_round_trips(&mut count, 10, Duration::from_secs(20)).await;
    let t = hashed_transfer(&d, b.addr(SINK_PORT), 16 * MIB, 4)
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
    require_lab("beacon_and_registry_restart_during_transfer");
    let _serial = SERIAL.lock().await;
    let mut lab = Lab::start().unwrap();
    let a = lab.host(Nat::FullCone).await.unwrap();
    let mut b = lab.host(Nat::PortRestricted).await.unwrap();
    let server = b.serve().await.unwrap();
    let d = a.driver().await.unwrap();
    echo_first_byte(&d, b.addr(ECHO_PORT)).await.unwrap();
    let dst = b.addr(SINK_PORT);
    let transfer = tokio::spawn(async move {
        let d = d;
        hashed_transfer(&d, dst, 64 * MIB, 9).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    lab.start_beacon().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    lab.start_registry().unwrap();
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
    let mut a = a;
    let deadline = Instant::now() + Duration::from_secs(60);
    let ttfb = loop {
        a.wait_registered().await.unwrap();
        b.wait_registered().await.unwrap();
        let d = a.driver().await.unwrap();
        match tokio::time::timeout(
            Duration::from_secs(10),
            echo_first_byte(&d, b.addr(ECHO_PORT)),
        )
        .await
        {
            Ok(Ok(t)) => break t,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no echo within 60 s of the registry restart: {other:?}\n{}\n{}",
                    a.log_tail(30),
                    b.log_tail(30)
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
    server.abort();
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

//! Transport benchmarks (print numbers; no pass/fail).
//!
//! 1. Goodput in the simulator as a percentage of link capacity, for 1 Gbit/s x 20 ms and
//!    100 Mbit/s x 100 ms links with a drop-tail queue of one bandwidth-delay product, and a
//!    deep-buffer 100 Mbit/s x 20 ms link with a queue of ten, at 0 %, 0.1 % and 1 % random
//!    loss, for NewReno, CUBIC and BBR; with the 95th percentile of the queueing delay at the
//!    bottleneck (the time each packet the queue accepted waited there). The link carries
//!    Pilot packets (34-byte header + payload); the layers below are not counted, so with the
//!    default segment size (1,153 bytes) the best possible goodput is 1153 / 1187 = 97.1 %.
//! 2. Raw state-machine speed: bytes per second through a connection pair over an infinitely
//!    fast, lossless link on one core, no crypto (header emit, CRC-32 and parse included), for
//!    the default segment size and for 4,096-byte segments. The application writes 64 KiB per
//!    round and reads everything available; each byte is copied four times (write, segment,
//!    reassembly, read).
//!
//! `cargo bench -p pilot-tests --bench transport`. `PILOT_BENCH_SCALE` (default 1) scales the
//! simulated durations; `PILOT_BENCH_ONLY=goodput` or `raw` runs one table;
//! `cargo test --benches` runs a tiny version as a smoke test.

#![allow(clippy::unwrap_used)] // benchmark code: a panic is a failed run

use std::time::{Duration, Instant};

use pilot_tests::sim::{LinkConfig, Sim};
use tunnel::stream::congestion::Algorithm;
use tunnel::stream::{EndpointConfig, Incoming, ReadError, DEFAULT_MSS};
use tunnel::wire::HEADER_LEN;
use tunnel::{Addr, SocketAddr};

struct GoodputCase {
    mbit: u64,
    rtt_ms: u64,
    /// Bottleneck queue in bandwidth-delay products.
    queue_bdp: usize,
    seconds: f64,
}

/// Bytes delivered in order to the receiving application within `seconds` of virtual time,
/// as a percentage of capacity, and the 95th percentile of the bottleneck queueing delay.
fn goodput(case: &GoodputCase, loss: f64, algo: Algorithm, seed: u64) -> (f64, Duration) {
    let mut cfg = EndpointConfig::default();
    cfg.stream.congestion = algo;
    // Buffers above the bandwidth-delay product plus queue, so windows never limit.
    let bdp = (case.mbit * 1_000_000 / 8 * case.rtt_ms / 1000) as usize;
    cfg.stream.send_buffer = (4 * bdp).max(8 << 20);
    cfg.stream.recv_buffer = (4 * bdp).max(8 << 20);
    let mut sim = Sim::new(seed);
    let a = sim.add_node(Addr::new(0, 1), cfg);
    let b = sim.add_node(Addr::new(0, 2), cfg);
    let mut link = LinkConfig::new(case.mbit, Duration::from_millis(case.rtt_ms)).loss(loss);
    link.queue = (case.queue_bdp * bdp).max(link.queue);
    sim.connect(a, b, link);
    sim.node(b).ep.listen(5001, None).unwrap();
    let now = sim.now();
    let client = sim
        .node(a)
        .ep
        .connect(now, SocketAddr::new(Addr::new(0, 2), 5001))
        .unwrap();
    let chunk = vec![0x5Au8; 1 << 20];
    let mut sink = vec![0u8; 1 << 20];
    let mut server = None;
    let mut received = 0u64;
    let limit = Duration::from_secs_f64(case.seconds);
    sim.run_until(limit, |sim| {
        if let Some(mut c) = sim.node(a).ep.connection(client) {
            while c.writable() > 0 {
                let n = c.writable().min(chunk.len());
                if c.write(&chunk[..n]).is_err() {
                    break;
                }
            }
        }
        server = server.or_else(|| sim.node(b).ep.accept(5001));
        if let Some(h) = server {
            if let Some(mut c) = sim.node(b).ep.connection(h) {
                loop {
                    match c.read(&mut sink) {
                        Ok(0) | Err(ReadError::Blocked) | Err(ReadError::Failed(_)) => break,
                        Ok(n) => received += n as u64,
                    }
                }
            }
        }
        sim.elapsed() >= limit
    });
    let capacity = case.mbit as f64 * 1e6 / 8.0 * sim.elapsed().as_secs_f64();
    (
        100.0 * received as f64 / capacity,
        sim.queue_delay_percentile(a, b, 95.0),
    )
}

/// Moves data between two endpoints with no link at all; returns bytes per second.
fn raw_speed(mss: u16, budget: Duration) -> f64 {
    let mut cfg = EndpointConfig::default();
    cfg.stream.mss = mss;
    cfg.stream.pacing = false;
    let mut a = tunnel::stream::Endpoint::new(Addr::new(0, 1), cfg);
    let mut b = tunnel::stream::Endpoint::new(Addr::new(0, 2), cfg);
    b.listen(5001, None).unwrap();
    let start = Instant::now();
    let client = a
        .connect(start, SocketAddr::new(Addr::new(0, 2), 5001))
        .unwrap();
    let mut buf = vec![0u8; HEADER_LEN + 65_536];
    let chunk = vec![0xA5u8; 64 * 1024];
    let mut sink = vec![0u8; 256 * 1024];
    let mut server = None;
    let mut received = 0u64;
    let mut measured_from: Option<(Instant, u64)> = None;
    loop {
        let now = Instant::now();
        if let Some((t0, _)) = measured_from {
            if now - t0 >= budget {
                break;
            }
        }
        // Sender: the application hands over up to 64 KiB per round, and everything the
        // table has ready goes out.
        {
            let mut c = a.connection(client).unwrap();
            let n = c.writable().min(chunk.len());
            if n > 0 {
                c.write(&chunk[..n]).unwrap();
            }
        }
        while let Some((n, _)) = a.poll_transmit(now, &mut buf) {
            if let Incoming::Stream(h) = b.handle(now, &buf[..n]) {
                server = Some(h);
            }
        }
        // Receiver: read everything, acknowledge.
        if let Some(h) = server {
            let mut s = b.connection(h).unwrap();
            while let Ok(n) = s.read(&mut sink) {
                if n == 0 {
                    break;
                }
                received += n as u64;
            }
            drop(s);
            while let Some((n, _)) = b.poll_transmit(now, &mut buf) {
                a.handle(now, &buf[..n]);
            }
            if measured_from.is_none() && received > 0 {
                measured_from = Some((now, received));
            }
        }
    }
    let (t0, r0) = measured_from.unwrap();
    (received - r0) as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let test_mode = !std::env::args().any(|a| a == "--bench");
    let scale: f64 = std::env::var("PILOT_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(if test_mode { 0.02 } else { 1.0 });

    let only = std::env::var("PILOT_BENCH_ONLY").unwrap_or_default();
    let cases = [
        GoodputCase {
            mbit: 1000,
            rtt_ms: 20,
            queue_bdp: 1,
            seconds: 10.0 * scale,
        },
        GoodputCase {
            mbit: 100,
            rtt_ms: 100,
            queue_bdp: 1,
            seconds: 30.0 * scale,
        },
        GoodputCase {
            mbit: 100,
            rtt_ms: 20,
            queue_bdp: 10,
            seconds: 20.0 * scale,
        },
    ];
    if only != "raw" {
        println!(
            "goodput in the simulator, % of link capacity (segment {DEFAULT_MSS} B, best \
             possible 97.1 %), and p95 queueing delay at the bottleneck in ms"
        );
        println!(
            "{:<30} {:>6} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8}",
            "link (queue)",
            "loss",
            "NewReno",
            "CUBIC",
            "BBR",
            "q NewReno",
            "q CUBIC",
            "q BBR",
            "sim s"
        );
    }
    for case in cases.iter().filter(|_| only != "raw") {
        for loss in [0.0, 0.001, 0.01] {
            let t = Instant::now();
            let (reno, q_reno) = goodput(case, loss, Algorithm::NewReno, 11);
            let (cubic, q_cubic) = goodput(case, loss, Algorithm::Cubic, 11);
            let (bbr, q_bbr) = goodput(case, loss, Algorithm::Bbr, 11);
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            println!(
                "{:<30} {:>5.1}% {:>7.1}% {:>7.1}% {:>7.1}% {:>9.1} {:>9.1} {:>9.1} {:>8.1}   \
                 ({:.1} s of CPU)",
                format!(
                    "{} Mbit/s x {} ms ({} BDP)",
                    case.mbit, case.rtt_ms, case.queue_bdp
                ),
                loss * 100.0,
                reno,
                cubic,
                bbr,
                ms(q_reno),
                ms(q_cubic),
                ms(q_bbr),
                case.seconds,
                t.elapsed().as_secs_f64()
            );
        }
    }

    let budget = Duration::from_secs_f64((1.0 * scale).max(0.05));
    if only != "goodput" {
        println!("\nraw state machine, one core, no crypto, infinitely fast lossless link");
        println!("{:<10} {:>12}", "segment", "MB/s");
    }
    for mss in [DEFAULT_MSS, 4096]
        .into_iter()
        .filter(|_| only != "goodput")
    {
        let bps = raw_speed(mss, budget);
        println!("{:<10} {:>12.0}", mss, bps / 1e6);
    }
}

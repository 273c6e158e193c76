//! Transport scenarios in the deterministic simulator. Each checks that the bytes arrive
//! intact (SHA-256 of what was written equals that of what was read) and that the connection
//! ends cleanly.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::time::Duration;

use pilot_tests::sim::{LinkConfig, Sim};
use pilot_tests::transfer::BulkTransfer;
use tunnel::stream::congestion::Algorithm;
use tunnel::stream::{ConnError, ConnHandle, EndpointConfig, ReadError, State};
use tunnel::{Addr, SocketAddr};

const MIB: u64 = 1 << 20;

fn pair(seed: u64, link: LinkConfig, config: EndpointConfig) -> (Sim, usize, usize) {
    let mut sim = Sim::new(seed);
    let a = sim.add_node(Addr::new(0, 1), config);
    let b = sim.add_node(Addr::new(0, 2), config);
    sim.connect(a, b, link);
    (sim, a, b)
}

/// Listens on `port` at `b` and dials it from `a`; returns the client connection.
fn dial(sim: &mut Sim, a: usize, b: usize, port: u16) -> ConnHandle {
    sim.node(b).ep.listen(port, None).unwrap();
    let now = sim.now();
    let server_addr = sim.node(b).ep.local();
    sim.node(a)
        .ep
        .connect(now, SocketAddr::new(server_addr, port))
        .unwrap()
}

/// Dials like [`dial`] and runs until the server accepted and the client is established.
/// Returns (client, server).
fn open(sim: &mut Sim, a: usize, b: usize, port: u16) -> (ConnHandle, ConnHandle) {
    let ca = dial(sim, a, b, port);
    let mut cb = None;
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        cb = cb.or_else(|| sim.node(b).ep.accept(port));
        cb.is_some() && sim.node(a).ep.connection(ca).unwrap().state() == State::Established
    }));
    (ca, cb.unwrap())
}

/// Runs a bulk transfer to completion and a clean close; returns it and the simulator.
fn bulk(seed: u64, link: LinkConfig, total: u64, limit: Duration) -> (BulkTransfer, Sim) {
    bulk_with(seed, link, EndpointConfig::default(), total, limit)
}

/// An endpoint configuration whose connections use `algo`.
fn with_congestion(algo: Algorithm) -> EndpointConfig {
    let mut cfg = EndpointConfig::default();
    cfg.stream.congestion = algo;
    cfg
}

/// [`bulk`] with both endpoints configured by `config`.
fn bulk_with(
    seed: u64,
    link: LinkConfig,
    config: EndpointConfig,
    total: u64,
    limit: Duration,
) -> (BulkTransfer, Sim) {
    let (mut sim, a, b) = pair(seed, link, config);
    let mut t = BulkTransfer::start(&mut sim, a, b, 1001, total);
    let ok = sim.run_until(limit, |sim| {
        t.drive(sim);
        t.complete() && t.closed_cleanly(sim)
    });
    let (tx, rx) = t.hashes();
    let stats = sim.node(a).ep.connection(t.client_conn).map(|c| c.stats());
    eprintln!(
        "seed {seed}: {} of {} bytes in {:?} virtual; link {:?}; sender {:?}",
        t.received,
        total,
        t.finished_at.map(|f| f - (sim.now() - sim.elapsed())),
        sim.link_stats(a, b),
        stats
    );
    if !ok {
        for (n, h) in [(a, Some(t.client_conn)), (b, t.server_conn)] {
            if let Some(c) = h.and_then(|h| sim.node(n).ep.connection(h)) {
                eprintln!("node {n}: {:?} {:?} {:?}", c.state(), c.error(), c.stats());
            }
        }
    }
    assert!(
        ok,
        "transfer did not finish cleanly within {limit:?}: {t:?}"
    );
    assert_eq!(tx, rx, "data corrupted");
    (t, sim)
}

#[test]
fn small_transfer_clean_link() {
    bulk(
        1,
        LinkConfig::new(100, Duration::from_millis(50)),
        100_000,
        Duration::from_secs(30),
    );
}

#[test]
fn bulk_64mib_no_loss() {
    let (t, _) = bulk(
        2,
        LinkConfig::new(100, Duration::from_millis(50)),
        64 * MIB,
        Duration::from_secs(60),
    );
    assert!(t.complete());
}

#[test]
fn bulk_64mib_1pct_loss_with_reordering_and_duplication() {
    let link = LinkConfig::new(100, Duration::from_millis(50))
        .loss(0.01)
        .reorder(0.02, Duration::from_millis(5))
        .duplicate(0.01);
    bulk(3, link, 64 * MIB, Duration::from_secs(300));
}

#[test]
fn bulk_64mib_5pct_loss() {
    let link = LinkConfig::new(100, Duration::from_millis(50)).loss(0.05);
    bulk(4, link, 64 * MIB, Duration::from_secs(900));
}

#[test]
fn bulk_64mib_10pct_loss_with_reordering_duplication_corruption() {
    let link = LinkConfig::new(100, Duration::from_millis(50))
        .loss(0.10)
        .reorder(0.05, Duration::from_millis(10))
        .duplicate(0.02)
        .corrupt(0.001);
    bulk(5, link, 64 * MIB, Duration::from_secs(1800));
}

#[test]
fn slow_reader_zero_window_8mib() {
    let mut config = EndpointConfig::default();
    config.stream.recv_buffer = 256 * 1024;
    let (mut sim, a, b) = pair(6, LinkConfig::new(100, Duration::from_millis(20)), config);
    let mut t = BulkTransfer::start(&mut sim, a, b, 1001, 8 * MIB);
    // The reader takes 64 KiB every 50 ms at most: ~1.3 MB/s against a 100 Mbit/s link.
    t.read_limit = Some(0);
    let mut last_read = sim.now();
    let mut saw_zero_window = false;
    let ok = sim.run_until(Duration::from_secs(120), |sim| {
        if sim.now() >= last_read + Duration::from_millis(50) {
            t.read_limit = Some(64 * 1024);
            last_read = sim.now();
        } else {
            t.read_limit = Some(0);
        }
        sim.wake_at(last_read + Duration::from_millis(50));
        t.drive(sim);
        if let Some(h) = t.server_conn {
            if let Some(c) = sim.node(b).ep.connection(h) {
                saw_zero_window |= c.readable() >= 256 * 1024 - 4096;
            }
        }
        t.complete() && t.closed_cleanly(sim)
    });
    let (tx, rx) = t.hashes();
    for (n, h) in [(a, Some(t.client_conn)), (b, t.server_conn)] {
        if let Some(c) = h.and_then(|h| sim.node(n).ep.connection(h)) {
            eprintln!("node {n}: {:?} {:?} {:?}", c.state(), c.error(), c.stats());
        }
    }
    assert!(ok, "slow reader transfer did not finish: {t:?}");
    assert_eq!(tx, rx);
    assert!(saw_zero_window, "the receive buffer never filled");
}

#[test]
fn simultaneous_close() {
    let (mut sim, a, b) = pair(
        7,
        LinkConfig::new(10, Duration::from_millis(30)),
        EndpointConfig::default(),
    );
    let (ca, cb) = open(&mut sim, a, b, 80);
    sim.node(a)
        .ep
        .connection(ca)
        .unwrap()
        .write(b"from a")
        .unwrap();
    sim.node(b)
        .ep
        .connection(cb)
        .unwrap()
        .write(b"from b")
        .unwrap();
    // Both close at the same instant, with their data still in flight.
    let now = sim.now();
    sim.node(a).ep.connection(ca).unwrap().shutdown(now);
    sim.node(b).ep.connection(cb).unwrap().shutdown(now);
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    let done = sim.run_until(Duration::from_secs(30), |sim| {
        let mut buf = [0u8; 64];
        for (node, h, got) in [(a, ca, &mut got_a), (b, cb, &mut got_b)] {
            let mut c = sim.node(node).ep.connection(h).unwrap();
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        }
        [(a, ca), (b, cb)].iter().all(|&(n, h)| {
            let c = sim.node(n).ep.connection(h).unwrap();
            c.state() == State::Closed && c.error().is_none()
        })
    });
    assert!(done, "simultaneous close did not finish");
    assert_eq!(got_a, b"from b");
    assert_eq!(got_b, b"from a");
}

#[test]
fn vanished_peer_gives_the_writer_an_error_within_the_retry_budget() {
    let (mut sim, a, b) = pair(
        8,
        LinkConfig::new(100, Duration::from_millis(50)),
        EndpointConfig::default(),
    );
    let mut t = BulkTransfer::start(&mut sim, a, b, 1001, 64 * MIB);
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        t.drive(sim);
        t.received > MIB
    }));
    sim.set_link_up(a, b, false);
    let cut = sim.now();
    let mut failed_at = None;
    sim.run_until(Duration::from_secs(200), |sim| {
        t.drive(sim);
        let failed = sim
            .node(a)
            .ep
            .connection(t.client_conn)
            .unwrap()
            .error()
            .is_some();
        if failed {
            failed_at = Some(sim.now());
        }
        failed
    });
    let failed_at = failed_at.expect("the writer never saw an error");
    let mut c = sim.node(a).ep.connection(t.client_conn).unwrap();
    assert_eq!(c.error(), Some(ConnError::TimedOut));
    let mut buf = [0u8; 8];
    assert_eq!(
        c.read(&mut buf),
        Err(ReadError::Failed(ConnError::TimedOut))
    );
    // 8 transmissions with the RTO doubling on every timeout up to 10 s: about
    // 0.2 + 0.4 + ... + 6.4 + 10 + 10 s, well under the 120 s idle timeout.
    let took = failed_at - cut;
    eprintln!("writer failed {took:?} after the peer vanished");
    assert!(
        took > Duration::from_secs(20) && took < Duration::from_secs(60),
        "{took:?}"
    );
}

#[test]
fn transfer_survives_a_five_second_outage() {
    let (mut sim, a, b) = pair(
        12,
        LinkConfig::new(100, Duration::from_millis(50)),
        EndpointConfig::default(),
    );
    let total = 16 * MIB;
    let mut t = BulkTransfer::start(&mut sim, a, b, 1001, total);
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        t.drive(sim);
        t.received > MIB
    }));
    sim.set_link_up(a, b, false);
    let before = t.received;
    let outage = Duration::from_secs(5);
    let healed = sim.run_until(outage, |sim| {
        t.drive(sim);
        false
    });
    assert!(!healed);
    assert!(t.received - before < MIB, "the outage let data through");
    sim.set_link_up(a, b, true);
    let ok = sim.run_until(Duration::from_secs(60), |sim| {
        t.drive(sim);
        t.complete() && t.closed_cleanly(sim)
    });
    let stats = sim.node(a).ep.connection(t.client_conn).map(|c| c.stats());
    eprintln!("after the outage: {t:?}; sender {stats:?}");
    assert!(ok, "transfer did not finish after the outage: {t:?}");
    let (tx, rx) = t.hashes();
    assert_eq!(tx, rx, "data corrupted");
    assert_eq!(t.received, total);
}

fn one_byte_writes(nodelay: bool) -> u64 {
    let (mut sim, a, b) = pair(
        9,
        LinkConfig::new(100, Duration::from_millis(20)),
        EndpointConfig::default(),
    );
    let ca = dial(&mut sim, a, b, 7);
    sim.node(a).ep.connection(ca).unwrap().set_nodelay(nodelay);
    let mut cb = None;
    let mut written = 0u32;
    let mut got = Vec::new();
    let mut next_write = sim.now();
    let ok = sim.run_until(Duration::from_secs(60), |sim| {
        cb = cb.or_else(|| sim.node(b).ep.accept(7));
        let now = sim.now();
        let mut c = sim.node(a).ep.connection(ca).unwrap();
        // One byte every 100 us of virtual time, from the moment the connection is open.
        if c.state() != State::Established {
            next_write = now;
        }
        while written < 10_000 && now >= next_write && c.state() == State::Established {
            let byte = [(written % 251) as u8];
            assert_eq!(c.write(&byte), Ok(1));
            written += 1;
            next_write += Duration::from_micros(100);
        }
        drop(c);
        if written < 10_000 {
            sim.wake_at(next_write);
        }
        let mut c = sim.node(a).ep.connection(ca).unwrap();
        if written == 10_000 && c.state() == State::Established {
            c.close(now);
        }
        drop(c);
        if let Some(h) = cb {
            let mut s = sim.node(b).ep.connection(h).unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        }
        got.len() == 10_000
    });
    assert!(ok, "only {} of 10000 bytes arrived", got.len());
    assert!(got.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
    let sent = sim.node(a).ep.connection(ca).unwrap().stats().segments_sent;
    sent
}

#[test]
fn ten_thousand_one_byte_writes_nagle_on_and_off() {
    let with_nagle = one_byte_writes(false);
    let without = one_byte_writes(true);
    eprintln!("segments sent: Nagle {with_nagle}, no-delay {without}");
    // Nagle coalesces while a segment is unacknowledged; no-delay sends almost every byte.
    assert!(without > 5_000, "{without}");
    assert!(with_nagle * 10 < without, "{with_nagle} vs {without}");
}

#[test]
fn thousand_concurrent_connections_through_one_table() {
    let (mut sim, a, b) = pair(
        10,
        LinkConfig::new(1000, Duration::from_millis(10)),
        EndpointConfig::default(),
    );
    sim.node(b).ep.listen(80, Some(1024)).unwrap();
    let now = sim.now();
    let clients: Vec<_> = (0..1000)
        .map(|_| {
            sim.node(a)
                .ep
                .connect(now, SocketAddr::new(Addr::new(0, 2), 80))
                .unwrap()
        })
        .collect();
    let message = |i: usize| format!("request {i} ").repeat(50).into_bytes();
    let mut sent = vec![false; 1000];
    let mut servers = Vec::new();
    let mut echoed = std::collections::HashSet::new();
    let mut replies: Vec<Vec<u8>> = vec![Vec::new(); 1000];
    let ok = sim.run_until(Duration::from_secs(60), |sim| {
        let now = sim.now();
        for (i, &h) in clients.iter().enumerate() {
            let mut c = sim.node(a).ep.connection(h).unwrap();
            while c.poll_event().is_some() {}
            if !sent[i] && c.state() == State::Established {
                let m = message(i);
                assert_eq!(c.write(&m), Ok(m.len()));
                c.shutdown(now);
                sent[i] = true;
            }
            let mut buf = [0u8; 2048];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                replies[i].extend_from_slice(&buf[..n]);
            }
        }
        while let Some(h) = sim.node(b).ep.accept(80) {
            servers.push(h);
        }
        // Servers echo everything, then close after the client's FIN.
        for &h in &servers {
            let mut c = sim.node(b).ep.connection(h).unwrap();
            let mut buf = [0u8; 2048];
            loop {
                match c.read(&mut buf) {
                    Ok(0) => {
                        if echoed.insert(h) {
                            c.close(now);
                        }
                        break;
                    }
                    Ok(n) => {
                        assert_eq!(c.write(&buf[..n]), Ok(n));
                    }
                    Err(_) => break,
                }
            }
        }
        replies
            .iter()
            .enumerate()
            .all(|(i, r)| r.len() == message(i).len())
            && clients.iter().all(|&h| {
                matches!(
                    sim.node(a).ep.connection(h).unwrap().state(),
                    State::TimeWait | State::Closed
                )
            })
    });
    assert!(ok, "not every connection finished");
    assert_eq!(servers.len(), 1000);
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r, &message(i), "connection {i}");
    }
    for &h in &clients {
        let c = sim.node(a).ep.connection(h).unwrap();
        assert_eq!(c.error(), None);
    }
}

#[test]
fn simultaneous_open() {
    let (mut sim, a, b) = pair(
        11,
        LinkConfig::new(10, Duration::from_millis(40)),
        EndpointConfig::default(),
    );
    let now = sim.now();
    // Both dial each other's first ephemeral port at the same instant: the tuples match.
    let ca = sim
        .node(a)
        .ep
        .connect(now, SocketAddr::new(Addr::new(0, 2), 49152))
        .unwrap();
    let cb = sim
        .node(b)
        .ep
        .connect(now, SocketAddr::new(Addr::new(0, 1), 49152))
        .unwrap();
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        [(a, ca), (b, cb)]
            .iter()
            .all(|&(n, h)| sim.node(n).ep.connection(h).unwrap().state() == State::Established)
    }));
    sim.node(a)
        .ep
        .connection(ca)
        .unwrap()
        .write(b"ping")
        .unwrap();
    let mut got = [0u8; 8];
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        sim.node(b).ep.connection(cb).unwrap().read(&mut got) == Ok(4)
    }));
    assert_eq!(&got[..4], b"ping");
}

#[test]
fn lost_syns_are_retransmitted() {
    let (mut sim, a, b) = pair(
        12,
        LinkConfig::new(10, Duration::from_millis(40)),
        EndpointConfig::default(),
    );
    sim.node(b).ep.listen(80, None).unwrap();
    sim.set_link_up(a, b, false);
    let now = sim.now();
    let ca = sim
        .node(a)
        .ep
        .connect(now, SocketAddr::new(Addr::new(0, 2), 80))
        .unwrap();
    // The first SYNs (t = 0, 1, 3 s) are lost; the link comes back at 5 s.
    sim.run_until(Duration::from_secs(5), |_| false);
    sim.set_link_up(a, b, true);
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        sim.node(a).ep.connection(ca).unwrap().state() == State::Established
    }));
    // The SYN at t = 7 s got through.
    assert!(sim.elapsed() >= Duration::from_secs(7));
    assert!(sim.elapsed() < Duration::from_secs(8));
}

#[test]
fn idle_connection_stays_up_with_keepalives_and_a_silent_peer_is_detected() {
    let (mut sim, a, b) = pair(
        13,
        LinkConfig::new(10, Duration::from_millis(40)),
        EndpointConfig::default(),
    );
    let (ca, cb) = open(&mut sim, a, b, 80);
    // Five idle minutes: keepalives flow both ways and nothing fails.
    let before = sim.link_stats(a, b).delivered;
    sim.run_until(Duration::from_secs(300), |_| false);
    assert!(
        sim.link_stats(a, b).delivered >= before + 5,
        "no keepalives"
    );
    for (n, h) in [(a, ca), (b, cb)] {
        let c = sim.node(n).ep.connection(h).unwrap();
        assert_eq!((c.state(), c.error()), (State::Established, None));
    }
    // The peer goes silent: the idle timeout (120 s without receiving) fails the connection.
    sim.set_link_up(a, b, false);
    let cut = sim.now();
    let mut failed = None;
    sim.run_until(Duration::from_secs(200), |sim| {
        let error = sim.node(a).ep.connection(ca).unwrap().error();
        if error.is_some() && failed.is_none() {
            failed = Some(sim.now() - cut);
        }
        failed.is_some()
    });
    let took = failed.expect("the silent peer was never detected");
    assert_eq!(
        sim.node(a).ep.connection(ca).unwrap().error(),
        Some(ConnError::Idle)
    );
    assert!(took <= Duration::from_secs(121), "{took:?}");
}

/// An idle timeout shorter than the keepalive interval: probes go out often enough that a
/// live, idle connection is never failed for silence.
#[test]
fn a_short_idle_timeout_keeps_an_idle_connection_alive() {
    let mut config = EndpointConfig::default();
    config.stream.idle_timeout = Duration::from_secs(5);
    let (mut sim, a, b) = pair(15, LinkConfig::new(10, Duration::from_millis(40)), config);
    let (ca, cb) = open(&mut sim, a, b, 80);
    sim.run_until(Duration::from_secs(120), |_| false);
    for (n, h) in [(a, ca), (b, cb)] {
        let c = sim.node(n).ep.connection(h).unwrap();
        assert_eq!((c.state(), c.error()), (State::Established, None));
    }
}

#[test]
fn half_close_keeps_the_other_direction_open() {
    let (mut sim, a, b) = pair(
        14,
        LinkConfig::new(10, Duration::from_millis(40)),
        EndpointConfig::default(),
    );
    let ca = dial(&mut sim, a, b, 80);
    sim.node(a)
        .ep
        .connection(ca)
        .unwrap()
        .write(b"request")
        .unwrap();
    let now = sim.now();
    sim.node(a).ep.connection(ca).unwrap().shutdown(now);
    let mut cb = None;
    let mut request = Vec::new();
    // The server reads the request to its end, then answers on the still-open direction.
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        cb = cb.or_else(|| sim.node(b).ep.accept(80));
        let Some(h) = cb else { return false };
        let mut c = sim.node(b).ep.connection(h).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match c.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => request.extend_from_slice(&buf[..n]),
                Err(_) => return false,
            }
        }
    }));
    assert_eq!(request, b"request");
    let now = sim.now();
    let mut s = sim.node(b).ep.connection(cb.unwrap()).unwrap();
    assert_eq!(s.state(), State::CloseWait);
    s.write(b"response").unwrap();
    s.close(now);
    drop(s);
    let mut response = Vec::new();
    let mut eof = false;
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        let mut c = sim.node(a).ep.connection(ca).unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                eof = true;
                break;
            }
            response.extend_from_slice(&buf[..n]);
        }
        eof
    }));
    assert_eq!(response, b"response");
}

/// Runs one transfer over a lossy 10 Mbit/s, 272 ms link (18.7 % loss, 5.2 % reordering,
/// 10 % duplication) with a 316,545-byte receive buffer; both ends must close cleanly.
fn lossy_close(seed: u64, size: u64) {
    let mut cfg = EndpointConfig::default();
    cfg.stream.recv_buffer = 316_545;
    cfg.stream.pacing = false;
    let link = LinkConfig::new(10, Duration::from_millis(272))
        .loss(0.187)
        .reorder(0.052, Duration::from_millis(137))
        .duplicate(0.0997);
    let (mut sim, a, b) = pair(seed, link, cfg);
    let mut t = BulkTransfer::start(&mut sim, a, b, 1001, size);
    let ok = sim.run_until(Duration::from_secs(4 * 3600), |sim| {
        t.drive(sim);
        t.complete() && t.closed_cleanly(sim)
    });
    assert!(ok, "{t:?}");
    let (tx, rx) = t.hashes();
    assert_eq!(tx, rx);
}

/// Found by the property test: a late duplicate ACK after our FIN cancelled the FIN's
/// retransmission timer, so a lost FIN was never resent.
#[test]
fn lost_fin_is_resent_after_a_late_ack() {
    lossy_close(12044418354191290856, 498_097);
}

/// Found by the property test: the peer's FIN|ACK was lost after we had already closed, and
/// its resent FIN reached a connection that no longer answered.
#[test]
fn resent_fin_after_close_is_answered() {
    lossy_close(12044418342973346060, 529_228);
}

/// Node `b` takes every port through its fallback listener; `a` dials `b`:`port`. Runs until
/// `b` reports the request; returns the client connection and the request.
fn dial_fallback(
    sim: &mut Sim,
    a: usize,
    b: usize,
    port: u16,
) -> (ConnHandle, tunnel::stream::Deferred) {
    sim.node(b).ep.enable_fallback().unwrap();
    let now = sim.now();
    let server = SocketAddr::new(sim.node(b).ep.local(), port);
    let ca = sim.node(a).ep.connect(now, server).unwrap();
    let mut d = None;
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        d = d.or_else(|| sim.node(b).ep.poll_deferred());
        d.is_some()
    }));
    (ca, d.unwrap())
}

#[test]
fn deferred_accept_then_data_both_ways_over_a_lossy_link() {
    let link = LinkConfig::new(50, Duration::from_millis(40))
        .loss(0.05)
        .reorder(0.02, Duration::from_millis(5));
    let (mut sim, a, b) = pair(41, link, EndpointConfig::default());
    let (ca, d) = dial_fallback(&mut sim, a, b, 5555);
    assert_eq!(d.local_port, 5555);
    assert_eq!(d.remote.addr, sim.node(a).ep.local());
    // The decision takes a while (the kernel side is slow): the dialer keeps retransmitting
    // its SYN, and nothing answers it.
    let decide_at = sim.now() + Duration::from_millis(2500);
    sim.run_until(Duration::from_secs(5), |sim| {
        sim.wake_at(decide_at);
        sim.now() >= decide_at
    });
    assert_eq!(
        sim.node(a).ep.connection(ca).unwrap().state(),
        State::SynSent
    );
    assert!(
        sim.node(b).ep.is_empty(),
        "no connection before the decision"
    );
    assert_eq!(sim.node(b).ep.poll_deferred(), None, "one request only");
    let stats = sim.node(b).ep.deferred_stats();
    assert_eq!((stats.deferred, stats.pending), (1, 1));

    let now = sim.now();
    let cb = sim.node(b).ep.accept_deferred(now, d.id).unwrap();
    let up: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let down: Vec<u8> = (0..192 * 1024u32).map(|i| (i % 241) as u8).collect();
    let (mut sent_up, mut sent_down) = (0, 0);
    let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
    let done = sim.run_until(Duration::from_secs(120), |sim| {
        let mut buf = [0u8; 8192];
        for (node, h, data, sent, got) in [
            (a, ca, &up, &mut sent_up, &mut got_down),
            (b, cb, &down, &mut sent_down, &mut got_up),
        ] {
            let mut c = sim.node(node).ep.connection(h).unwrap();
            while *sent < data.len() {
                match c.write(&data[*sent..]) {
                    Ok(n) => *sent += n,
                    Err(_) => break,
                }
            }
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        }
        got_up.len() == up.len() && got_down.len() == down.len()
    });
    assert!(
        done,
        "transfer stalled: {} of {} up, {} of {} down",
        got_up.len(),
        up.len(),
        got_down.len(),
        down.len()
    );
    assert!(got_up == up, "upstream bytes differ");
    assert!(got_down == down, "downstream bytes differ");
    assert_eq!(sim.node(b).ep.deferred_stats().accepted, 1);
}

#[test]
fn a_refused_deferred_dial_fails_at_once() {
    let (mut sim, a, b) = pair(
        42,
        LinkConfig::new(10, Duration::from_millis(30)),
        EndpointConfig::default(),
    );
    let (ca, d) = dial_fallback(&mut sim, a, b, 5555);
    let refused_at = sim.now();
    sim.node(b).ep.refuse_deferred(d.id).unwrap();
    assert!(sim.run_until(Duration::from_secs(5), |sim| {
        sim.node(a).ep.connection(ca).unwrap().state() == State::Closed
    }));
    assert_eq!(
        sim.node(a).ep.connection(ca).unwrap().error(),
        Some(ConnError::Refused)
    );
    // One way delay plus a packet's transmission time: no SYN retransmission was needed.
    assert!(sim.now() - refused_at < Duration::from_millis(100));
    assert!(sim.node(b).ep.is_empty());
}

#[test]
fn an_undecided_deferred_dial_is_refused_after_the_timeout() {
    let (mut sim, a, b) = pair(
        43,
        LinkConfig::new(10, Duration::from_millis(30)),
        EndpointConfig::default(),
    );
    let start = sim.now();
    let (ca, _) = dial_fallback(&mut sim, a, b, 5555);
    assert!(sim.run_until(Duration::from_secs(60), |sim| {
        sim.node(a).ep.connection(ca).unwrap().state() == State::Closed
    }));
    // Refused by the deferred timeout, before the dialer's own SYN budget (39 s) ran out.
    assert_eq!(
        sim.node(a).ep.connection(ca).unwrap().error(),
        Some(ConnError::Refused)
    );
    let took = sim.now() - start;
    assert!(
        took >= tunnel::stream::DEFERRED_TIMEOUT && took < Duration::from_secs(31),
        "{took:?}"
    );
    let stats = sim.node(b).ep.deferred_stats();
    assert_eq!((stats.expired, stats.pending, stats.deferred), (1, 0, 1));
}

// ---- BBR ---------------------------------------------------------------------------------

#[test]
fn bbr_16mib_no_loss() {
    let link = LinkConfig::new(100, Duration::from_millis(50));
    let (t, sim) = bulk_with(
        21,
        link,
        with_congestion(Algorithm::Bbr),
        16 * MIB,
        Duration::from_secs(60),
    );
    // 16 MiB at 100 Mbit/s takes 1.35 s; Startup, the handshake and the close add a few
    // round trips.
    let took = t.finished_at.unwrap() - (sim.now() - sim.elapsed());
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn bbr_16mib_1pct_loss_with_reordering_and_duplication() {
    let link = LinkConfig::new(100, Duration::from_millis(50))
        .loss(0.01)
        .reorder(0.02, Duration::from_millis(5))
        .duplicate(0.01);
    bulk_with(
        22,
        link,
        with_congestion(Algorithm::Bbr),
        16 * MIB,
        Duration::from_secs(300),
    );
}

#[test]
fn bbr_16mib_5pct_loss() {
    let link = LinkConfig::new(100, Duration::from_millis(50)).loss(0.05);
    bulk_with(
        23,
        link,
        with_congestion(Algorithm::Bbr),
        16 * MIB,
        Duration::from_secs(900),
    );
}

#[test]
fn bbr_16mib_10pct_loss_with_reordering_duplication_corruption() {
    let link = LinkConfig::new(100, Duration::from_millis(50))
        .loss(0.10)
        .reorder(0.05, Duration::from_millis(10))
        .duplicate(0.02)
        .corrupt(0.001);
    bulk_with(
        24,
        link,
        with_congestion(Algorithm::Bbr),
        16 * MIB,
        Duration::from_secs(1800),
    );
}

/// Two long transfers, the first from a sender running `first`, the second from one running
/// `second`, through one shared bottleneck (50 Mbit/s, 40 ms, queue of one BDP). The second
/// starts `stagger` after the first. Returns the bytes each delivered between `from` and
/// `until` (virtual time since the start).
fn two_flows(
    seed: u64,
    first: Algorithm,
    second: Algorithm,
    stagger: Duration,
    from: Duration,
    until: Duration,
) -> (u64, u64) {
    let mut sim = Sim::new(seed);
    let a1 = sim.add_node(Addr::new(0, 1), with_congestion(first));
    let a2 = sim.add_node(Addr::new(0, 2), with_congestion(second));
    let b1 = sim.add_node(Addr::new(0, 3), EndpointConfig::default());
    let b2 = sim.add_node(Addr::new(0, 4), EndpointConfig::default());
    sim.connect_shared(
        &[(a1, b1), (a2, b2)],
        LinkConfig::new(50, Duration::from_millis(40)),
    );
    let total = 1 << 40;
    let mut t1 = BulkTransfer::start(&mut sim, a1, b1, 1001, total);
    sim.run_until(stagger, |sim| {
        t1.drive(sim);
        false
    });
    let mut t2 = BulkTransfer::start(&mut sim, a2, b2, 1002, total);
    let mut at_from = None;
    sim.run_until(until - sim.elapsed(), |sim| {
        t1.drive(sim);
        t2.drive(sim);
        if at_from.is_none() && sim.elapsed() >= from {
            at_from = Some((t1.received, t2.received));
        }
        sim.elapsed() >= until
    });
    let (r1, r2) = at_from.unwrap();
    let shares = (t1.received - r1, t2.received - r2);
    let capacity = 50e6 / 8.0 * (until - from).as_secs_f64();
    eprintln!(
        "{first:?} {} ({:.1} % of the link), {second:?} {} ({:.1} %); queue p95 {:?}",
        shares.0,
        100.0 * shares.0 as f64 / capacity,
        shares.1,
        100.0 * shares.1 as f64 / capacity,
        sim.queue_delay_percentile(a1, b1, 95.0)
    );
    // Together they use the link.
    assert!(
        (shares.0 + shares.1) as f64 > 0.8 * capacity,
        "{shares:?} of {capacity}"
    );
    shares
}

#[test]
fn two_bbr_flows_converge_to_a_fair_share() {
    // The second flow starts 2 s late, at a twentieth of the link; the shares converge over
    // about 40 s of bandwidth probing (every 2 to 3 s).
    let (x, y) = two_flows(
        31,
        Algorithm::Bbr,
        Algorithm::Bbr,
        Duration::from_secs(2),
        Duration::from_secs(45),
        Duration::from_secs(90),
    );
    let (lo, hi) = (x.min(y) as f64, x.max(y) as f64);
    assert!(
        lo >= 0.8 * hi,
        "BBR {x} and BBR {y} differ by more than 20 %"
    );
}

/// The goal is that BBR takes at most 80 % against CUBIC; on a one-BDP drop-tail queue it takes
/// about 85 % today, so this guards the share measured (no starving of CUBIC) until the goal
/// is met.
#[test]
fn bbr_leaves_cubic_at_least_a_tenth() {
    let (bbr, cubic) = two_flows(
        32,
        Algorithm::Bbr,
        Algorithm::Cubic,
        Duration::from_secs(2),
        Duration::from_secs(45),
        Duration::from_secs(90),
    );
    let share = bbr as f64 / (bbr + cubic) as f64;
    assert!(
        share <= 0.9,
        "BBR took {:.1} % (CUBIC {cubic}, BBR {bbr})",
        share * 100.0
    );
}

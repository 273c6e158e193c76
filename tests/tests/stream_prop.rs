//! Property: whatever the link does (loss, reordering, duplication, corruption, any bandwidth
//! and delay) and however the connection is configured (segment size, buffers, congestion
//! controller, Nagle), a transfer arrives intact and both ends close cleanly.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::time::Duration;

use pilot_tests::sim::{LinkConfig, Sim};
use pilot_tests::transfer::BulkTransfer;
use proptest::prelude::*;
use tunnel::stream::congestion::Algorithm;
use tunnel::stream::EndpointConfig;
use tunnel::Addr;

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    mbit: u64,
    rtt_ms: u64,
    loss: f64,
    reorder: f64,
    duplicate: f64,
    corrupt: f64,
    mss: u16,
    recv_buffer: usize,
    send_buffer: usize,
    reno: bool,
    nodelay: bool,
    pacing: bool,
    size: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        prop_oneof![Just(1u64), Just(10), Just(100), Just(1000)],
        1u64..300,
        // Up to 10 % loss each way: beyond that, 8 consecutive timeouts (the retry budget)
        // become likely enough over thousands of cases that a failure is the budget working.
        prop_oneof![Just(0.0), 0.0..0.1f64],
        prop_oneof![Just(0.0), 0.0..0.3f64],
        0.0..0.1f64,
        prop_oneof![Just(0.0), 0.0..0.02f64],
        prop_oneof![Just(1153u16), 64u16..4097],
        prop_oneof![Just(8usize << 20), 4096usize..(1 << 20)],
        prop_oneof![Just(8usize << 20), 1usize..(1 << 20)],
        any::<(bool, bool, bool)>(),
        0u64..(1 << 20),
    )
        .prop_map(
            |(seed, mbit, rtt_ms, loss, reorder, duplicate, corrupt, mss, rb, sb, flags, size)| {
                Case {
                    seed,
                    mbit,
                    rtt_ms,
                    loss,
                    reorder,
                    duplicate,
                    corrupt,
                    mss,
                    recv_buffer: rb,
                    send_buffer: sb,
                    reno: flags.0,
                    nodelay: flags.1,
                    pacing: flags.2,
                    size,
                }
            },
        )
}

proptest! {
    // 256 cases by default; PROPTEST_CASES=n for a longer hunt.
    #![proptest_config(ProptestConfig::default())]
    #[test]
    fn transfers_arrive_intact_and_close_cleanly(c in case()) {
        let mut cfg = EndpointConfig::default();
        cfg.stream.mss = c.mss;
        cfg.stream.recv_buffer = c.recv_buffer;
        cfg.stream.send_buffer = c.send_buffer;
        cfg.stream.congestion = if c.reno { Algorithm::NewReno } else { Algorithm::Cubic };
        cfg.stream.nodelay = c.nodelay;
        cfg.stream.pacing = c.pacing;
        let mut sim = Sim::new(c.seed);
        let a = sim.add_node(Addr::new(0, 1), cfg);
        let b = sim.add_node(Addr::new(0, 2), cfg);
        let link = LinkConfig::new(c.mbit, Duration::from_millis(c.rtt_ms))
            .loss(c.loss)
            .reorder(c.reorder, Duration::from_millis(c.rtt_ms / 2 + 1))
            .duplicate(c.duplicate)
            .corrupt(c.corrupt);
        sim.connect(a, b, link);
        let mut t = BulkTransfer::start(&mut sim, a, b, 1001, c.size);
        let ok = sim.run_until(Duration::from_secs(4 * 3600), |sim| {
            t.drive(sim);
            t.complete() && t.closed_cleanly(sim)
        });
        let states: Vec<_> = [(a, Some(t.client_conn)), (b, t.server_conn)]
            .into_iter()
            .filter_map(|(n, h)| h.and_then(|h| sim.node(n).ep.connection(h)).map(|c| (c.state(), c.error())))
            .collect();
        prop_assert!(ok, "{t:?} after {:?}: {states:?}", sim.elapsed());
        let (tx, rx) = t.hashes();
        prop_assert_eq!(tx, rx);
    }
}

//! The node core ([`tunnel::node::Node`]) in the deterministic simulator with real crypto:
//! key exchanges through a fake registry, streams with and without loss checked by SHA-256,
//! a peer restart that re-keys, the trust gate, own-address delivery, a relayed path (and its
//! way back to direct once the registry resolves the peer), the fallback listener (SYN-ACK
//! only once the owner accepts; refusal answers RST), and idle connections that cost nothing
//! per timer wake.
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use pilot_tests::nodesim::{digests, payload, sha256, AllowList, NodeNet};
use proptest::prelude::*;
use tunnel::node::CloseReason;
use tunnel::SocketAddr as PilotAddr;

const MS: Duration = Duration::from_millis(1);

/// Sends `len` bytes from `a` to `b` and checks they arrive intact.
fn transfer(net: &mut NodeNet, a: usize, b: usize, port: u16, seed: u64, len: usize) {
    let data = payload(seed, len);
    let want = sha256(&data);
    net.listen(b, port);
    net.send(a, b, port, data);
    let ok = net.run_until(Duration::from_secs(120), |n| digests(n, b).contains(&want));
    assert!(
        ok,
        "transfer of {len} bytes from {a} to {b} did not complete"
    );
}

#[test]
fn two_nodes_key_exchange_and_stream_without_loss() {
    let mut net = NodeNet::new(1, 10 * MS, 0.0);
    let a = net.add_node(1);
    let b = net.add_node(2);
    transfer(&mut net, a, b, 80, 7, 1 << 20);
    let peers = net.nodes[a].node.peers();
    assert_eq!(peers.len(), 1);
    assert!(peers[0].encrypted && peers[0].authenticated);
    assert_eq!(peers[0].endpoint, Some(net.nodes[b].addr));
}

#[test]
fn a_stream_at_five_percent_loss_arrives_intact() {
    let mut net = NodeNet::new(2, 15 * MS, 0.05);
    let a = net.add_node(1);
    let b = net.add_node(2);
    transfer(&mut net, a, b, 80, 8, 512 * 1024);
}

#[test]
fn three_nodes_exchange_streams_at_once() {
    let mut net = NodeNet::new(3, 5 * MS, 0.01);
    let n: Vec<usize> = (1..=3).map(|id| net.add_node(id)).collect();
    let mut want = Vec::new();
    for (k, &(from, to)) in [(0, 1), (1, 2), (2, 0), (0, 2)].iter().enumerate() {
        let port = 1000 + k as u16;
        net.listen(n[to], port);
        let data = payload(100 + k as u64, 200_000 + k * 1000);
        want.push((n[to], sha256(&data)));
        net.send(n[from], n[to], port, data);
    }
    let ok = net.run_until(Duration::from_secs(120), |net| {
        want.iter().all(|(to, d)| digests(net, *to).contains(d))
    });
    assert!(ok, "every transfer completes");
    for i in &n {
        assert_eq!(
            net.nodes[*i].node.peers().len(),
            2,
            "each node keyed both others"
        );
    }
}

#[test]
fn a_restarted_peer_is_rekeyed_and_reachable_again() {
    let mut net = NodeNet::new(4, 10 * MS, 0.0);
    let a = net.add_node(1);
    let b = net.add_node(2);
    transfer(&mut net, a, b, 80, 1, 100_000);
    net.restart(b);
    // A still holds the old session; B answers A's undecryptable frames with its PILA.
    transfer(&mut net, a, b, 81, 2, 100_000);
    assert!(net.nodes[a].node.peers()[0].encrypted);
}

#[test]
fn the_trust_gate_refuses_an_untrusted_syn_with_rst() {
    let mut net = NodeNet::new(5, 10 * MS, 0.0);
    let a = net.add_node(1);
    let b = net.add_node(2);
    let c = net.add_node(3);
    net.nodes[b]
        .node
        .set_gate(Some(Arc::new(AllowList(HashSet::from([3])))));
    net.listen(b, 80);
    let refused = net.send(a, b, 80, b"let me in".to_vec());
    let ok = net.run_until(Duration::from_secs(10), |n| {
        n.nodes[a].closed.contains_key(&refused)
    });
    assert!(ok, "the dial ends at once");
    assert_eq!(net.nodes[a].closed[&refused], CloseReason::Refused);
    // The SYN (and any retransmission that crossed the RST) was refused.
    assert!(net.nodes[b].node.stats().untrusted >= 1);
    assert!(net.nodes[b].sinks.is_empty());
    // A trusted peer gets through the same gate.
    let data = payload(3, 50_000);
    let want = sha256(&data);
    net.send(c, b, 80, data);
    assert!(net.run_until(Duration::from_secs(30), |n| digests(n, b).contains(&want)));
}

#[test]
fn the_fallback_listener_answers_only_once_its_owner_accepts() {
    let mut net = NodeNet::new(11, 10 * MS, 0.05);
    let a = net.add_node(1);
    let b = net.add_node(2);
    net.nodes[b].node.listen_fallback().unwrap();
    assert!(net.nodes[b].node.listen_fallback().is_err(), "one fallback");
    let data = payload(21, 400_000);
    let want = sha256(&data);
    let conn = net.send(a, b, 8080, data);
    // The attempt is reported once (retransmitted SYNs add nothing) and left unanswered.
    assert!(net.run_until(Duration::from_secs(5), |n| {
        !n.nodes[b].incoming.is_empty()
    }));
    net.run_until(Duration::from_secs(3), |_| false);
    assert_eq!(net.nodes[b].incoming.len(), 1);
    let (id, port, remote) = net.nodes[b].incoming[0];
    assert_eq!(port, 8080);
    assert_eq!(remote.addr, net.addr(a));
    assert!(
        !net.nodes[a].connected.contains(&conn),
        "no SYN-ACK before the owner accepts"
    );
    assert_eq!(net.sent(a, conn), 0);
    // A port with an ordinary listener (bound after the fallback) is not the fallback's.
    transfer(&mut net, a, b, 80, 22, 10_000);
    assert_eq!(net.nodes[b].incoming.len(), 1);
    // Accepted: the handshake completes and the stream arrives intact through 5 % loss.
    let accepted = net.accept_incoming(b, id);
    assert!(net.run_until(Duration::from_secs(120), |n| {
        n.nodes[b].sinks.get(&accepted).and_then(|r| r.digest) == Some(want)
    }));
    assert!(net.nodes[a].connected.contains(&conn));
    assert!(net.nodes[b].connected.contains(&accepted));
}

#[test]
fn a_refused_fallback_attempt_gets_an_rst() {
    let mut net = NodeNet::new(12, 10 * MS, 0.0);
    let a = net.add_node(1);
    let b = net.add_node(2);
    net.nodes[b].node.listen_fallback().unwrap();
    let conn = net.send(a, b, 22, b"ssh?".to_vec());
    assert!(net.run_until(Duration::from_secs(5), |n| {
        !n.nodes[b].incoming.is_empty()
    }));
    let (id, ..) = net.nodes[b].incoming[0];
    net.nodes[b].node.refuse_incoming(id).unwrap();
    assert!(
        net.nodes[b].node.refuse_incoming(id).is_err(),
        "decided once"
    );
    assert!(net.run_until(Duration::from_secs(1), |n| {
        n.nodes[a].closed.contains_key(&conn)
    }));
    assert_eq!(net.nodes[a].closed[&conn], CloseReason::Refused);
    assert!(!net.nodes[a].connected.contains(&conn));
}

#[test]
fn an_undecided_fallback_attempt_is_refused_after_the_deadline() {
    let mut net = NodeNet::new(13, 10 * MS, 0.0);
    let a = net.add_node(1);
    let b = net.add_node(2);
    net.nodes[b].node.listen_fallback().unwrap();
    let conn = net.send(a, b, 9000, b"anyone?".to_vec());
    let start = net.now;
    assert!(net.run_until(Duration::from_secs(60), |n| {
        n.nodes[a].closed.contains_key(&conn)
    }));
    assert_eq!(net.nodes[a].closed[&conn], CloseReason::Refused);
    let waited = net.now - start;
    assert!(
        waited >= tunnel::stream::DEFERRED_TIMEOUT,
        "refused after {waited:?}"
    );
    assert_eq!(net.nodes[b].incoming.len(), 1, "reported once");
}

#[test]
fn own_address_delivery_needs_no_tunnel() {
    let mut net = NodeNet::new(6, 10 * MS, 0.0);
    let a = net.add_node(1);
    transfer(&mut net, a, a, 80, 9, 300_000);
    let me = net.addr(a);
    net.nodes[a]
        .node
        .send_datagram(PilotAddr::new(me, 80), Some(5), b"to myself")
        .unwrap();
    assert!(net.run_until(Duration::from_secs(1), |n| !n.nodes[a].datagrams.is_empty()));
    assert_eq!(net.nodes[a].datagrams[0].2, b"to myself");
    assert!(net.nodes[a].node.peers().is_empty());
    assert_eq!(
        net.nodes[a].node.stats().pkts_out,
        0,
        "nothing left the node"
    );
}

#[test]
fn a_broken_direct_path_goes_through_the_beacon_relay() {
    let mut net = NodeNet::new(7, 10 * MS, 0.0).with_beacon();
    let a = net.add_node(1);
    let b = net.add_node(2);
    let (pa, pb) = (net.nodes[a].addr, net.nodes[b].addr);
    net.blocked.insert((pa, pb));
    net.blocked.insert((pb, pa));
    transfer(&mut net, a, b, 80, 10, 200_000);
    assert!(net.relayed > 0, "the data went through the relay");
    assert_eq!(
        net.nodes[a].node.peers()[0].path,
        tunnel::node::tunnels::Path::Relay
    );
}

/// A peer whose resolution the registry first refuses (no trust pair yet) and that is then
/// reached only through the relay has its endpoint looked up again, about every 10 s, without
/// those refusals ending dials that go through the relay; once the registry allows the
/// look-up, the node probes the endpoint and the path turns direct within 20 s. A sits behind
/// a NAT that lets in only answers, so B's own direct probes never reach it: only A's
/// look-up can heal the path (as with a v1 peer, which never probes).
#[test]
fn a_relayed_peer_the_registry_refused_goes_direct_once_allowed() {
    use tunnel::node::tunnels::Path;
    let mut net = NodeNet::new(11, 10 * MS, 0.0).with_beacon();
    let a = net.add_node(1);
    let b = net.add_node(2);
    let (ia, ib) = (net.nodes[a].id, net.nodes[b].id);
    let (pa, pb) = (net.nodes[a].addr, net.nodes[b].addr);
    net.nat.insert(pa);
    net.refused.insert((ia, ib));
    let peer_b = |n: &NodeNet| n.nodes[a].node.peers().into_iter().find(|p| p.node == ib);

    // A's first dial is refused at once and leaves no peer.
    let first = net.send(a, b, 79, b"too early".to_vec());
    let ended = net.run_until(Duration::from_secs(5), |n| {
        n.nodes[a].closed.contains_key(&first)
    });
    assert!(ended, "the refused dial ended");
    assert_eq!(net.nodes[a].closed[&first], CloseReason::Unreachable);
    assert!(peer_b(&net).is_none(), "a refused look-up leaves no peer");

    // B reaches A: its direct packets die at A's NAT, so it goes through the relay.
    transfer(&mut net, b, a, 80, 21, 20_000);
    assert!(net.relayed > 0, "B's data went through the relay");
    let p = peer_b(&net).expect("A knows B");
    assert_eq!((p.path, p.endpoint), (Path::Relay, None));

    // A talks back through the relay while its look-ups of B keep being refused; a refusal
    // that lands while A's dial is under way does not end it.
    let (start, asked) = (net.now, net.resolves(a, b));
    let data = payload(22, 20_000);
    let want = sha256(&data);
    net.listen(b, 81);
    net.send(a, b, 81, data);
    let now = net.now;
    assert!(
        !net.nodes[a].node.resolve_failed(now, ib),
        "a relayed peer with a session is still reachable"
    );
    let ok = net.run_until(Duration::from_secs(30), |n| digests(n, b).contains(&want));
    assert!(ok, "A's stream through the relay arrived");
    net.run_until(Duration::from_secs(60), |_| false);
    let again = net.resolves(a, b) - asked;
    let secs = net.now.duration_since(start).as_secs();
    assert!(again >= 5, "A looked B up again {again} times in {secs} s");
    assert!(
        again <= secs / 10 + 1,
        "at most one look-up per 10 s: {again} in {secs} s"
    );
    let p = peer_b(&net).expect("refusals keep a relayed peer");
    assert_eq!((p.path, p.endpoint), (Path::Relay, None));

    // B approves: the registry now resolves B for A. The path turns direct within 20 s.
    net.refused.remove(&(ia, ib));
    let direct = net.run_until(Duration::from_secs(20), |n| {
        peer_b(n).is_some_and(|p| p.path == Path::Direct && p.endpoint == Some(pb))
    });
    assert!(direct, "A's path to B: {:?}", peer_b(&net));
    let relayed = net.relayed;
    transfer(&mut net, a, b, 82, 23, 20_000);
    assert_eq!(net.relayed, relayed, "the data went direct");
}

#[test]
fn idle_connections_cost_nothing_per_timer_wake() {
    const IDLE: usize = 10_000;
    let mut net = NodeNet::new(8, 5 * MS, 0.0);
    net.endpoint.max_conns = 4 * IDLE;
    net.endpoint.max_conns_per_port = 4 * IDLE;
    net.endpoint.default_backlog = 4 * IDLE;
    let a = net.add_node(1);
    let b = net.add_node(2);
    net.listen(b, 80);
    let conns: Vec<_> = (0..IDLE)
        .map(|_| {
            let dst = PilotAddr::new(net.addr(b), 80);
            let now = net.now;
            net.nodes[a].node.dial(now, dst).unwrap()
        })
        .collect();
    assert!(net.run_until(Duration::from_secs(5), |n| {
        n.nodes[b].sinks.len() == IDLE && n.nodes[a].node.connection_count() == IDLE
    }));
    assert_eq!(conns.len(), IDLE);
    // Everything settled (delayed ACKs gone). Now one transfer runs beside the idle ones.
    net.run_until(Duration::from_secs(1), |_| false);
    let (s0, w0) = (net.nodes[a].node.stats().serviced, net.nodes[a].wakes);
    let (t0, v0) = (net.nodes[b].node.stats().serviced, net.nodes[b].wakes);
    transfer(&mut net, a, b, 81, 11, 1 << 20);
    let (s1, w1) = (net.nodes[a].node.stats().serviced, net.nodes[a].wakes);
    let (t1, v1) = (net.nodes[b].node.stats().serviced, net.nodes[b].wakes);
    let wakes = (w1 - w0) + (v1 - v0);
    let serviced = (s1 - s0) + (t1 - t0);
    assert!(wakes > 0);
    println!("{wakes} timer wakes, {serviced} connections serviced");
    // Each wake and each packet touches the one active connection on each side, never
    // the idle ten thousand.
    assert!(
        serviced < (IDLE as u64) / 2,
        "{serviced} services for {wakes} wakes"
    );
    // The idle connections are all still open (the transfer's lingers in TIME_WAIT).
    assert!(net.nodes[a].node.connection_count() >= IDLE);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// Any seed, loss up to 8 %, any delay and any sizes: every transfer completes intact.
    #[test]
    fn every_transfer_completes_intact(
        seed in any::<u64>(),
        loss_pct in 0u32..8,
        delay_ms in 1u32..40,
        sizes in proptest::collection::vec(1usize..150_000, 1..4),
    ) {
        let mut net = NodeNet::new(seed, delay_ms * MS, f64::from(loss_pct) / 100.0);
        let a = net.add_node(1);
        let b = net.add_node(2);
        let mut want = Vec::new();
        for (k, len) in sizes.iter().enumerate() {
            let port = 2000 + k as u16;
            net.listen(b, port);
            let data = payload(seed ^ k as u64, *len);
            want.push(sha256(&data));
            net.send(a, b, port, data);
        }
        let ok = net.run_until(Duration::from_secs(300), |n| {
            let got = digests(n, b);
            want.iter().all(|d| got.contains(d))
        });
        prop_assert!(ok, "transfers did not complete");
    }
}

//! The stream transport as a v1 peer sees it on the wire: exact header fields of the
//! handshake, refusals, FIN exchange, SACK placement, and the strict checks on RST and FIN.
//! Packets are built and parsed with the header codec; no simulator.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::time::{Duration, Instant};

use tunnel::stream::{
    ConnError, ConnHandle, DropReason, Endpoint, EndpointConfig, Incoming, State, WriteError,
};
use tunnel::wire::{Flags, Packet, PacketRepr, Protocol, HEADER_LEN};
use tunnel::{Addr, SocketAddr};

const A: Addr = Addr::new(0, 1);
const B: Addr = Addr::new(0, 2);

fn parse(p: &[u8]) -> (PacketRepr, Vec<u8>) {
    let pk = Packet::new_checked(p).unwrap();
    let r = PacketRepr::parse(&pk).unwrap();
    (r, pk.payload().to_vec())
}

/// Everything a connection wants to send now.
fn drain(ep: &mut Endpoint, h: ConnHandle, now: Instant) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; HEADER_LEN + 65_536];
    let mut c = ep.connection(h).unwrap();
    while let Some(n) = c.poll_transmit(now, &mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

/// A packet as a v1 peer would build it.
fn v1_packet(
    flags: Flags,
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    window: u16,
    payload: &[u8],
) -> Vec<u8> {
    let repr = PacketRepr {
        flags,
        protocol: Protocol::Stream,
        src,
        dst,
        seq,
        ack,
        window,
        payload_len: payload.len() as u16,
    };
    let mut buf = vec![0u8; HEADER_LEN + payload.len()];
    repr.emit_with_payload(&mut buf, payload).unwrap();
    buf
}

/// Our endpoint at A dials a v1 peer at B:port and completes the handshake the v1 way.
/// Returns the endpoint, handle, and our local socket address.
fn dial_v1(now: Instant, port: u16, peer_window: u16) -> (Endpoint, ConnHandle, SocketAddr) {
    let mut ep = Endpoint::new(A, EndpointConfig::default());
    let h = ep.connect(now, SocketAddr::new(B, port)).unwrap();
    let syn = drain(&mut ep, h, now);
    let (r, _) = parse(&syn[0]);
    let local = r.src;
    let synack = v1_packet(
        Flags::SYN | Flags::ACK,
        SocketAddr::new(B, port),
        local,
        0,
        1,
        peer_window,
        &[],
    );
    ep.handle(now, &synack);
    assert_eq!(ep.connection(h).unwrap().state(), State::Established);
    let ack = drain(&mut ep, h, now);
    let (r, p) = parse(&ack[0]);
    assert_eq!((r.flags, r.seq, r.ack, p.len()), (Flags::ACK, 1, 1, 0));
    (ep, h, local)
}

#[test]
fn syn_and_final_ack_have_v1_fields() {
    let now = Instant::now();
    let mut ep = Endpoint::new(A, EndpointConfig::default());
    let h = ep.connect(now, SocketAddr::new(B, 1000)).unwrap();
    let out = drain(&mut ep, h, now);
    assert_eq!(out.len(), 1);
    let (r, p) = parse(&out[0]);
    assert_eq!(out[0][0], 0x11, "version 1, SYN");
    assert_eq!(r.protocol, Protocol::Stream);
    assert_eq!(r.src, SocketAddr::new(A, 49152));
    assert_eq!(r.dst, SocketAddr::new(B, 1000));
    assert_eq!((r.seq, r.ack), (0, 0));
    // 8 MiB receive buffer = 2048 free 4,096-byte slots.
    assert_eq!(r.window, 2048);
    assert!(p.is_empty());
    // Retransmitted after 1 s, identical.
    let later = now + Duration::from_secs(1);
    let mut c = ep.connection(h).unwrap();
    assert_eq!(c.poll_timeout(), Some(later));
    c.handle_timeout(later);
    drop(c);
    let again = drain(&mut ep, h, later);
    assert_eq!(again, out);
    dial_v1(now, 7, 512);
}

#[test]
fn syn_to_a_closed_port_gets_v1_rst() {
    let now = Instant::now();
    let mut ep = Endpoint::new(B, EndpointConfig::default());
    let syn = v1_packet(
        Flags::SYN,
        SocketAddr::new(A, 49152),
        SocketAddr::new(B, 80),
        0,
        0,
        512,
        &[],
    );
    assert!(matches!(ep.handle(now, &syn), Incoming::Refused));
    let mut buf = [0u8; 64];
    let (n, dst) = ep.poll_transmit(now, &mut buf).unwrap();
    let (r, _) = parse(&buf[..n]);
    assert_eq!(dst, SocketAddr::new(A, 49152));
    assert_eq!(buf[0], 0x18, "version 1, RST");
    assert_eq!((r.seq, r.ack, r.window), (0, 0, 0));
    assert_eq!(r.src, SocketAddr::new(B, 80));
}

#[test]
fn rst_refuses_our_dial() {
    let now = Instant::now();
    let mut ep = Endpoint::new(A, EndpointConfig::default());
    let h = ep.connect(now, SocketAddr::new(B, 80)).unwrap();
    drain(&mut ep, h, now);
    let rst = v1_packet(
        Flags::RST,
        SocketAddr::new(B, 80),
        SocketAddr::new(A, 49152),
        0,
        0,
        0,
        &[],
    );
    ep.handle(now, &rst);
    let c = ep.connection(h).unwrap();
    assert_eq!(c.state(), State::Closed);
    assert_eq!(c.error(), Some(tunnel::stream::ConnError::Refused));
    assert!(c.is_drained());
}

#[test]
fn accepting_a_v1_dial_and_duplicate_syn() {
    let now = Instant::now();
    let mut ep = Endpoint::new(B, EndpointConfig::default());
    ep.listen(1000, None).unwrap();
    let peer = SocketAddr::new(A, 49152);
    let syn = v1_packet(Flags::SYN, peer, SocketAddr::new(B, 1000), 0, 0, 512, &[]);
    let Incoming::Stream(h) = ep.handle(now, &syn) else {
        panic!("SYN not accepted")
    };
    let out = drain(&mut ep, h, now);
    let (r, _) = parse(&out[0]);
    assert_eq!(out[0][0], 0x13, "SYN|ACK");
    assert_eq!((r.seq, r.ack), (0, 1));
    // The SYN again (our SYN-ACK was lost): the same SYN-ACK again.
    ep.handle(now, &syn);
    assert_eq!(drain(&mut ep, h, now), out);
    // Not accepted before the handshake completes.
    assert_eq!(ep.accept(1000), None);
    // v1's third ACK, then data from seq 1.
    ep.handle(
        now,
        &v1_packet(Flags::ACK, peer, SocketAddr::new(B, 1000), 1, 1, 512, &[]),
    );
    assert_eq!(ep.accept(1000), Some(h));
    ep.handle(
        now,
        &v1_packet(
            Flags::ACK,
            peer,
            SocketAddr::new(B, 1000),
            1,
            1,
            512,
            b"hello",
        ),
    );
    let mut buf = [0u8; 16];
    assert_eq!(ep.connection(h).unwrap().read(&mut buf), Ok(5));
    assert_eq!(&buf[..5], b"hello");
}

#[test]
fn accept_queue_limit_drops_syns_silently() {
    let now = Instant::now();
    let mut ep = Endpoint::new(B, EndpointConfig::default());
    ep.listen(80, Some(2)).unwrap();
    for port in 0..3u16 {
        let src = SocketAddr::new(A, 50000 + port);
        let syn = v1_packet(Flags::SYN, src, SocketAddr::new(B, 80), 0, 0, 512, &[]);
        let r = ep.handle(now, &syn);
        if port < 2 {
            assert!(matches!(r, Incoming::Stream(_)));
            let ack = v1_packet(Flags::ACK, src, SocketAddr::new(B, 80), 1, 1, 512, &[]);
            ep.handle(now, &ack);
        } else {
            // Two established connections wait in the queue: the SYN is dropped, not reset.
            assert!(matches!(r, Incoming::Dropped(_)));
        }
    }
    let mut buf = [0u8; 64];
    while let Some((n, _)) = ep.poll_transmit(now, &mut buf) {
        let (r, _) = parse(&buf[..n]);
        assert!(!r.flags.contains(Flags::RST));
    }
    assert!(ep.listen(80, None).is_err(), "a port has one listener");
}

#[test]
fn first_data_byte_is_seq_1_and_fin_is_v1() {
    let now = Instant::now();
    let (mut ep, h, local) = dial_v1(now, 1000, 512);
    let peer = SocketAddr::new(B, 1000);
    let mut c = ep.connection(h).unwrap();
    c.write(b"abc").unwrap();
    c.close(now);
    drop(c);
    let out = drain(&mut ep, h, now);
    let (r, p) = parse(&out[0]);
    assert_eq!(
        (r.flags, r.seq, r.ack, p.as_slice()),
        (Flags::ACK, 1, 1, &b"abc"[..])
    );
    // No FIN while data is unacknowledged (a v1 receiver would discard it).
    assert_eq!(out.len(), 1);
    ep.handle(now, &v1_packet(Flags::ACK, peer, local, 1, 4, 512, &[]));
    let out = drain(&mut ep, h, now);
    let (r, _) = parse(&out[0]);
    assert_eq!(out[0][0], 0x14, "bare FIN");
    assert_eq!((r.seq, r.ack, r.window), (4, 0, 0));
    // v1 answers FIN|ACK with ack = seq + 1; we do not answer that.
    ep.handle(
        now,
        &v1_packet(Flags::FIN | Flags::ACK, peer, local, 1, 5, 0, &[]),
    );
    assert!(
        drain(&mut ep, h, now).is_empty(),
        "FIN|ACK must not be answered"
    );
    assert_eq!(ep.connection(h).unwrap().state(), State::FinWait2);
}

#[test]
fn peer_fin_is_answered_with_fin_ack_and_reads_as_end() {
    let now = Instant::now();
    let (mut ep, h, local) = dial_v1(now, 1000, 512);
    let peer = SocketAddr::new(B, 1000);
    ep.handle(now, &v1_packet(Flags::ACK, peer, local, 1, 1, 512, b"bye"));
    ep.handle(now, &v1_packet(Flags::FIN, peer, local, 4, 0, 0, &[]));
    let out = drain(&mut ep, h, now);
    let fin_ack = out
        .iter()
        .map(|p| parse(p).0)
        .find(|r| r.flags.contains(Flags::FIN))
        .unwrap();
    assert_eq!(fin_ack.flags, Flags::FIN | Flags::ACK);
    assert_eq!((fin_ack.ack, fin_ack.window), (5, 0));
    let mut c = ep.connection(h).unwrap();
    assert_eq!(c.state(), State::CloseWait);
    let mut buf = [0u8; 8];
    assert_eq!(c.read(&mut buf), Ok(3));
    assert_eq!(c.read(&mut buf), Ok(0), "end of stream");
}

#[test]
fn rst_and_fin_outside_the_window_are_ignored() {
    let now = Instant::now();
    let (mut ep, h, local) = dial_v1(now, 1000, 512);
    let peer = SocketAddr::new(B, 1000);
    ep.handle(
        now,
        &v1_packet(Flags::ACK, peer, local, 1, 1, 512, b"0123456789"),
    );
    // Blind injections with guessed sequence numbers.
    ep.handle(now, &v1_packet(Flags::RST, peer, local, 0, 0, 0, &[]));
    ep.handle(
        now,
        &v1_packet(Flags::RST, peer, local, 0x4000_0000, 0, 0, &[]),
    );
    ep.handle(now, &v1_packet(Flags::FIN, peer, local, 5, 0, 0, &[]));
    ep.handle(
        now,
        &v1_packet(Flags::FIN, peer, local, 0x8000_0000, 0, 0, &[]),
    );
    assert_eq!(ep.connection(h).unwrap().state(), State::Established);
    // In window: accepted.
    ep.handle(now, &v1_packet(Flags::RST, peer, local, 11, 0, 0, &[]));
    let c = ep.connection(h).unwrap();
    assert_eq!(c.state(), State::Closed);
    assert_eq!(c.error(), Some(tunnel::stream::ConnError::Reset));
}

#[test]
fn sack_travels_only_in_pure_acks() {
    let now = Instant::now();
    let (mut ep, h, local) = dial_v1(now, 1000, 512);
    let peer = SocketAddr::new(B, 1000);
    ep.connection(h).unwrap().write(b"our data").unwrap();
    // Bytes 1..=5 missing; 6..=10 arrive.
    ep.handle(
        now,
        &v1_packet(Flags::ACK, peer, local, 6, 1, 512, b"fghij"),
    );
    let out: Vec<_> = drain(&mut ep, h, now).iter().map(|p| parse(p)).collect();
    let (ack, payload) = out.iter().find(|(_, p)| p.starts_with(b"SACK")).unwrap();
    assert_eq!(ack.flags, Flags::ACK);
    assert_eq!(ack.ack, 1);
    assert_eq!(
        payload.as_slice(),
        b"SACK\x01\x00\x00\x00\x06\x00\x00\x00\x0b"
    );
    // The data segment carries our bytes only.
    assert!(out.iter().any(|(_, p)| p.as_slice() == b"our data"));
}

#[test]
fn data_that_looks_like_sack_is_cut_so_v1_cannot_swallow_it() {
    let now = Instant::now();
    let (mut ep, h, _) = dial_v1(now, 1000, 512);
    let mut c = ep.connection(h).unwrap();
    c.set_nodelay(true);
    let evil = b"SACK\x01\x00\x00\x00\x01\x00\x00\x00\x02 and more";
    c.write(evil).unwrap();
    drop(c);
    let out = drain(&mut ep, h, now);
    let (r, p) = parse(&out[0]);
    assert_eq!((r.seq, p.as_slice()), (1, &b"SACK"[..]));
    let (r, p) = parse(&out[1]);
    assert_eq!((r.seq, p.as_slice()), (5, &evil[4..]));
}

#[test]
fn zero_window_stops_sending_and_a_one_byte_probe_follows() {
    let now = Instant::now();
    let (mut ep, h, local) = dial_v1(now, 1000, 1);
    let peer = SocketAddr::new(B, 1000);
    let mut c = ep.connection(h).unwrap();
    c.set_nodelay(true);
    c.write(&[7u8; 10_000]).unwrap();
    // A one-slot window: 4,096 bytes. Three full segments go; the 637-byte rest would be a
    // silly window and waits.
    drop(c);
    let sent: usize = drain(&mut ep, h, now)
        .iter()
        .map(|p| parse(p).1.len())
        .sum();
    assert_eq!(sent, 3 * 1153);
    // The peer acknowledges everything and advertises a zero window (its buffer is full).
    ep.handle(now, &v1_packet(Flags::ACK, peer, local, 1, 3460, 0, &[]));
    assert!(drain(&mut ep, h, now).is_empty());
    let t = ep.connection(h).unwrap().poll_timeout().unwrap();
    ep.connection(h).unwrap().handle_timeout(t);
    let probe = drain(&mut ep, h, t);
    assert_eq!(probe.len(), 1);
    let (r, p) = parse(&probe[0]);
    assert_eq!((r.seq, p.len()), (3460, 1));
    // The window opens to two slots: the remaining bytes go.
    ep.handle(t, &v1_packet(Flags::ACK, peer, local, 1, 3461, 2, &[]));
    let resumed: usize = drain(&mut ep, h, t).iter().map(|p| parse(p).1.len()).sum();
    assert_eq!(resumed, 10_000 - 3460);
}

#[test]
fn ephemeral_ports_wrap_inside_their_range() {
    let now = Instant::now();
    let cfg = EndpointConfig {
        max_conns: 100_000,
        ..EndpointConfig::default()
    };
    let mut ep = Endpoint::new(A, cfg);
    let mut last = 0;
    for i in 0..16_384u32 {
        let h = ep.connect(now, SocketAddr::new(B, 80)).unwrap();
        let port = ep.connection(h).unwrap().local().port;
        assert!(port >= 49152, "port {port}");
        last = port;
        if i % 2 == 0 {
            ep.release(h);
        }
    }
    assert_eq!(last, 65535);
    // Released ports are found again after the wrap; the rest stay taken.
    let h = ep.connect(now, SocketAddr::new(B, 80)).unwrap();
    assert_eq!(ep.connection(h).unwrap().local().port, 49152);
    let h = ep.connect(now, SocketAddr::new(B, 80)).unwrap();
    assert_eq!(ep.connection(h).unwrap().local().port, 49154);
}

#[test]
fn writes_after_shutdown_fail() {
    let now = Instant::now();
    let (mut ep, h, _) = dial_v1(now, 1000, 512);
    let mut c = ep.connection(h).unwrap();
    c.shutdown(now);
    assert_eq!(c.write(b"x"), Err(WriteError::Closed));
}

#[test]
fn datagrams_round_trip_with_v1_fields() {
    let now = Instant::now();
    let mut a = Endpoint::new(A, EndpointConfig::default());
    let mut b = Endpoint::new(B, EndpointConfig::default());
    let mut buf = vec![0u8; HEADER_LEN + 5];
    buf[HEADER_LEN..].copy_from_slice(b"hello");
    let n = a
        .emit_datagram(SocketAddr::new(B, 1001), None, 5, &mut buf)
        .unwrap();
    let (r, _) = parse(&buf[..n]);
    assert_eq!(buf[0], 0x10, "no flags");
    assert_eq!(
        (r.protocol, r.seq, r.ack, r.window),
        (Protocol::Datagram, 0, 0, 0)
    );
    assert!(r.src.port >= 49152);
    match b.handle(now, &buf[..n]) {
        Incoming::Datagram(d) => {
            assert_eq!((d.src.addr, d.dst_port, d.data), (A, 1001, &b"hello"[..]));
        }
        other => panic!("{other:?}"),
    }
    // An empty datagram is dropped, as v1 does.
    let n = a
        .emit_datagram(SocketAddr::new(B, 1001), Some(5), 0, &mut buf)
        .unwrap();
    assert!(matches!(b.handle(now, &buf[..n]), Incoming::Dropped(_)));
}

#[test]
fn fin_for_a_forgotten_connection_gets_fin_ack_not_rst() {
    let now = Instant::now();
    let mut ep = Endpoint::new(B, EndpointConfig::default());
    let fin = v1_packet(
        Flags::FIN,
        SocketAddr::new(A, 49152),
        SocketAddr::new(B, 80),
        77,
        0,
        0,
        &[],
    );
    assert!(matches!(ep.handle(now, &fin), Incoming::Dropped(_)));
    let mut buf = [0u8; 64];
    let (n, dst) = ep.poll_transmit(now, &mut buf).unwrap();
    let (r, _) = parse(&buf[..n]);
    assert_eq!(dst, SocketAddr::new(A, 49152));
    assert_eq!((r.flags, r.ack, r.window), (Flags::FIN | Flags::ACK, 78, 0));
    // FIN|ACK itself is never answered.
    let fin_ack = v1_packet(
        Flags::FIN | Flags::ACK,
        SocketAddr::new(A, 49152),
        SocketAddr::new(B, 80),
        1,
        1,
        0,
        &[],
    );
    ep.handle(now, &fin_ack);
    assert!(ep.poll_transmit(now, &mut buf).is_none());
}

#[test]
fn three_duplicate_acks_without_sack_trigger_fast_retransmit() {
    let now = Instant::now();
    let (mut ep, h, local) = dial_v1(now, 1000, 512);
    let peer = SocketAddr::new(B, 1000);
    let mut c = ep.connection(h).unwrap();
    c.write(&[1u8; 5 * 1153]).unwrap();
    drop(c);
    let sent = drain(&mut ep, h, now);
    assert_eq!(sent.len(), 5);
    // The first segment is lost; a peer without SACK answers each later one with a
    // duplicate pure ACK of seq 1.
    let t = now + Duration::from_millis(30);
    for _ in 0..2 {
        ep.handle(t, &v1_packet(Flags::ACK, peer, local, 1, 1, 512, &[]));
        assert!(drain(&mut ep, h, t).is_empty());
    }
    ep.handle(t, &v1_packet(Flags::ACK, peer, local, 1, 1, 512, &[]));
    let out = drain(&mut ep, h, t);
    let (r, p) = parse(&out[0]);
    assert_eq!(
        (r.seq, p.len()),
        (1, 1153),
        "the first segment again, at once"
    );
    let st = ep.connection(h).unwrap().stats();
    assert_eq!(
        (st.duplicate_acks, st.fast_retransmits, st.retransmissions),
        (3, 1, 1)
    );
    assert_eq!(st.recovery, tunnel::stream::Recovery::Fast);
}

/// Sends one segment to a peer that answers nothing and returns the times (since the
/// original transmission) of every transmission of it, and when the connection failed.
fn silent_peer_transmissions() -> (Vec<Duration>, Duration) {
    let t0 = Instant::now();
    let (mut ep, h, local) = dial_v1(t0, 1000, 512);
    let peer = SocketAddr::new(B, 1000);
    // With the handshake and this round trip sampled, the RTO is the 200 ms minimum.
    ep.connection(h).unwrap().write(b"x").unwrap();
    assert_eq!(drain(&mut ep, h, t0).len(), 1);
    let acked = t0 + Duration::from_millis(100);
    ep.handle(acked, &v1_packet(Flags::ACK, peer, local, 1, 2, 512, &[]));
    drain(&mut ep, h, acked);

    ep.connection(h).unwrap().write(b"lost").unwrap();
    let sent = drain(&mut ep, h, acked);
    assert_eq!(sent.len(), 1);
    let mut times = vec![Duration::ZERO];
    let mut now = acked;
    for _ in 0..1000 {
        if ep.connection(h).unwrap().error().is_some() {
            break;
        }
        now = ep
            .poll_timeout()
            .expect("a timer while data is unacknowledged");
        ep.handle_timeout(now);
        for p in drain(&mut ep, h, now) {
            let (r, payload) = parse(&p);
            if payload == b"lost" {
                assert_eq!(r.seq, 2);
                times.push(now - acked);
            }
        }
    }
    assert_eq!(
        ep.connection(h).unwrap().error(),
        Some(tunnel::stream::ConnError::TimedOut)
    );
    (times, now - acked)
}

#[test]
fn consecutive_timeouts_back_off_exponentially_up_to_the_max_rto() {
    let (times, _) = silent_peer_transmissions();
    let intervals: Vec<u128> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    assert_eq!(
        intervals,
        [200, 400, 800, 1600, 3200, 6400, 10_000],
        "retransmissions of one segment"
    );
}

#[test]
fn a_silent_peer_fails_the_connection_after_eight_transmissions() {
    let (times, failed) = silent_peer_transmissions();
    assert_eq!(times.len(), 8, "1 original + 7 retransmissions: {times:?}");
    // The next timeout after the last retransmission sends RST and fails the connection.
    assert_eq!(failed - times[7], Duration::from_secs(10));
    assert_eq!(failed.as_millis(), 32_600);
}

/// Every packet `from` has ready now, delivered to `to`.
fn shuttle(from: &mut Endpoint, to: &mut Endpoint, now: Instant) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; HEADER_LEN + 65_536];
    let mut out = Vec::new();
    while let Some((n, _)) = from.poll_transmit(now, &mut buf) {
        out.push(buf[..n].to_vec());
    }
    for p in &out {
        to.handle(now, p);
    }
    out
}

#[test]
fn deferred_accept_holds_the_syn_ack_until_the_decision() {
    let now = Instant::now();
    let mut a = Endpoint::new(A, EndpointConfig::default());
    let mut b = Endpoint::new(B, EndpointConfig::default());
    b.enable_fallback().unwrap();
    let ca = a.connect(now, SocketAddr::new(B, 4242)).unwrap();
    let syn = shuttle(&mut a, &mut b, now);
    assert_eq!(syn.len(), 1);
    assert_eq!(syn[0][0], 0x11, "SYN");
    assert!(shuttle(&mut b, &mut a, now).is_empty(), "no SYN-ACK yet");
    let d = b.poll_deferred().unwrap();
    assert_eq!(d.local_port, 4242);
    assert_eq!(d.remote, SocketAddr::new(A, 49152));

    // The dialer retransmits while the decision is pending: still nothing comes back.
    let t1 = now + Duration::from_secs(1);
    a.handle_timeout(t1);
    let again = shuttle(&mut a, &mut b, t1);
    assert_eq!(again, syn, "the identical SYN again");
    assert!(shuttle(&mut b, &mut a, t1).is_empty());
    assert_eq!(b.poll_deferred(), None);

    let t2 = t1 + Duration::from_millis(10);
    let cb = b.accept_deferred(t2, d.id).unwrap();
    let synack = shuttle(&mut b, &mut a, t2);
    assert_eq!(synack.len(), 1);
    let (r, p) = parse(&synack[0]);
    assert_eq!(synack[0][0], 0x13, "SYN|ACK");
    assert_eq!((r.seq, r.ack, r.window, p.len()), (0, 1, 2048, 0));
    assert_eq!(r.src, SocketAddr::new(B, 4242));
    assert_eq!(a.connection(ca).unwrap().state(), State::Established);
    a.connection(ca).unwrap().write(b"request").unwrap();
    shuttle(&mut a, &mut b, t2);
    assert_eq!(b.connection(cb).unwrap().state(), State::Established);
    let mut buf = [0u8; 16];
    assert_eq!(b.connection(cb).unwrap().read(&mut buf), Ok(7));
    assert_eq!(&buf[..7], b"request");
    b.connection(cb).unwrap().write(b"reply").unwrap();
    shuttle(&mut b, &mut a, t2);
    assert_eq!(a.connection(ca).unwrap().read(&mut buf), Ok(5));
    assert_eq!(&buf[..5], b"reply");
}

#[test]
fn refused_deferred_request_gets_the_closed_port_rst() {
    let now = Instant::now();
    let syn = v1_packet(
        Flags::SYN,
        SocketAddr::new(A, 49152),
        SocketAddr::new(B, 4242),
        0,
        0,
        512,
        &[],
    );
    // What a closed port answers...
    let mut closed = Endpoint::new(B, EndpointConfig::default());
    assert!(matches!(closed.handle(now, &syn), Incoming::Refused));
    let mut buf = [0u8; 64];
    let (n, dst) = closed.poll_transmit(now, &mut buf).unwrap();
    let closed_rst = buf[..n].to_vec();
    // ...is what a refused deferred request gets, byte for byte.
    let mut b = Endpoint::new(B, EndpointConfig::default());
    b.enable_fallback().unwrap();
    assert!(matches!(
        b.handle(now, &syn),
        Incoming::Dropped(DropReason::Deferred)
    ));
    let d = b.poll_deferred().unwrap();
    b.refuse_deferred(d.id).unwrap();
    let (n, refused_dst) = b.poll_transmit(now, &mut buf).unwrap();
    assert_eq!(refused_dst, dst);
    assert_eq!(buf[..n], closed_rst[..]);
    assert_eq!(buf[0], 0x18, "version 1, RST");
    assert_eq!(b.poll_transmit(now, &mut buf), None);
}

#[test]
fn a_refused_deferred_dial_fails_as_refused() {
    let now = Instant::now();
    let mut a = Endpoint::new(A, EndpointConfig::default());
    let mut b = Endpoint::new(B, EndpointConfig::default());
    b.enable_fallback().unwrap();
    let ca = a.connect(now, SocketAddr::new(B, 4242)).unwrap();
    shuttle(&mut a, &mut b, now);
    let d = b.poll_deferred().unwrap();
    b.refuse_deferred(d.id).unwrap();
    let rst = shuttle(&mut b, &mut a, now);
    assert_eq!(rst.len(), 1);
    let c = a.connection(ca).unwrap();
    assert_eq!(c.state(), State::Closed);
    assert_eq!(c.error(), Some(ConnError::Refused));
    assert!(c.is_drained());
}

/// Runs every timer of `h` up to `until`, delivering nothing from the peer; returns what was
/// sent, with the time of each packet.
fn run_silent(
    ep: &mut Endpoint,
    h: ConnHandle,
    until: Instant,
) -> Vec<(Instant, PacketRepr, Vec<u8>)> {
    let mut sent = Vec::new();
    while let Some(now) = ep.connection(h).and_then(|c| c.poll_timeout()) {
        if now > until {
            break;
        }
        ep.handle_timeout(now);
        for p in drain(ep, h, now) {
            let (r, payload) = parse(&p);
            sent.push((now, r, payload));
        }
    }
    sent
}

/// We half-close toward a v1 peer: v1 answers our FIN with FIN|ACK, which puts it in
/// TIME_WAIT for good (wire §3.6): it sends nothing more, never a FIN of its own.
fn half_closed_toward_v1(t0: Instant) -> (Endpoint, ConnHandle, SocketAddr) {
    let (mut ep, h, local) = dial_v1(t0, 1000, 512);
    let peer = SocketAddr::new(B, 1000);
    ep.connection(h).unwrap().write(b"abc").unwrap();
    ep.connection(h).unwrap().shutdown(t0);
    drain(&mut ep, h, t0);
    let t1 = t0 + Duration::from_millis(50);
    ep.handle(t1, &v1_packet(Flags::ACK, peer, local, 1, 4, 512, b"hi"));
    let fin = drain(&mut ep, h, t1)
        .iter()
        .map(|p| parse(p).0)
        .find(|r| r.flags == Flags::FIN)
        .unwrap();
    assert_eq!(fin.seq, 4);
    ep.handle(
        t1,
        &v1_packet(Flags::FIN | Flags::ACK, peer, local, 3, 5, 0, &[]),
    );
    assert_eq!(ep.connection(h).unwrap().state(), State::FinWait2);
    (ep, h, local)
}

#[test]
fn a_v1_peer_that_answered_our_fin_has_finished_reading_ends() {
    let t0 = Instant::now();
    let (mut ep, h, _) = half_closed_toward_v1(t0);
    let t1 = t0 + Duration::from_millis(50);
    let mut buf = [0u8; 8];
    assert_eq!(ep.connection(h).unwrap().read(&mut buf), Ok(2));
    assert_eq!(
        ep.connection(h).unwrap().read(&mut buf),
        Err(tunnel::stream::ReadError::Blocked)
    );
    let sent = run_silent(&mut ep, h, t1 + Duration::from_secs(7));
    // A few keepalive probes (seq one below our next), which v1 never answers ...
    let probes = sent
        .iter()
        .filter(|(_, r, p)| r.flags == Flags::ACK && r.seq == 3 && p.is_empty())
        .count();
    assert!((1..=5).contains(&probes), "{sent:?}");
    // ... then, within 7 s (at the minimum RTO), the stream ends cleanly: no FIN|ACK (v1 sent no FIN),
    // no RST.
    assert!(
        sent.iter()
            .all(|(_, r, _)| !r.flags.contains(Flags::FIN) && !r.flags.contains(Flags::RST)),
        "{sent:?}"
    );
    let mut c = ep.connection(h).unwrap();
    assert_eq!(c.read(&mut buf), Ok(0), "end of stream");
    assert_eq!(c.error(), None);
    assert_eq!(c.state(), State::TimeWait);
}

#[test]
fn a_peer_that_answers_the_probe_after_our_fin_may_still_send() {
    let t0 = Instant::now();
    let (mut ep, h, local) = half_closed_toward_v1(t0);
    let peer = SocketAddr::new(B, 1000);
    let t1 = t0 + Duration::from_millis(50);
    // The first probe goes out (after the delayed ACK of "hi"); a pilot peer answers it at
    // once with an ACK.
    let mut t = t1;
    let mut probed = false;
    while !probed && t < t1 + Duration::from_secs(1) {
        t = ep.connection(h).unwrap().poll_timeout().unwrap();
        ep.handle_timeout(t);
        probed = drain(&mut ep, h, t).iter().any(|p| parse(p).0.seq == 3);
    }
    assert!(probed, "no probe within a second of our FIN being answered");
    ep.handle(t, &v1_packet(Flags::ACK, peer, local, 3, 4, 512, &[]));
    // It keeps reading for as long as the peer sends nothing (no end without its FIN) ...
    let later = t1 + Duration::from_secs(25);
    run_silent(&mut ep, h, later);
    let mut buf = [0u8; 8];
    let mut c = ep.connection(h).unwrap();
    assert_eq!(c.state(), State::FinWait2);
    assert_eq!(c.read(&mut buf), Ok(2));
    assert_eq!(c.read(&mut buf), Err(tunnel::stream::ReadError::Blocked));
    drop(c);
    // ... then its data and its FIN arrive.
    ep.handle(
        later,
        &v1_packet(Flags::ACK, peer, local, 3, 4, 512, b"late"),
    );
    ep.handle(later, &v1_packet(Flags::FIN, peer, local, 7, 0, 0, &[]));
    let mut c = ep.connection(h).unwrap();
    assert_eq!(c.read(&mut buf), Ok(4));
    assert_eq!(&buf[..4], b"late");
    assert_eq!(c.read(&mut buf), Ok(0));
    assert_eq!(c.state(), State::TimeWait);
}

#[test]
fn our_fin_after_the_peers_is_resent_only_briefly_and_ends_cleanly() {
    let t0 = Instant::now();
    let (mut ep, h, local) = dial_v1(t0, 1000, 512);
    let peer = SocketAddr::new(B, 1000);
    // v1 closes first; we answer FIN|ACK, then close.
    ep.handle(t0, &v1_packet(Flags::FIN, peer, local, 1, 0, 0, &[]));
    let out = drain(&mut ep, h, t0);
    assert_eq!(parse(&out[0]).0.flags, Flags::FIN | Flags::ACK);
    ep.connection(h).unwrap().close(t0);
    let fin = drain(&mut ep, h, t0);
    assert_eq!(fin.len(), 1);
    assert_eq!(parse(&fin[0]).0.flags, Flags::FIN);
    // The v1 peer has forgotten the connection and stays silent.
    let sent = run_silent(&mut ep, h, t0 + Duration::from_secs(120));
    let fins: Vec<Duration> = sent
        .iter()
        .filter(|(_, r, _)| r.flags == Flags::FIN)
        .map(|(t, _, _)| *t - t0)
        .collect();
    assert_eq!(fins.len(), 2, "FIN sent three times in all: {sent:?}");
    assert!(
        sent.iter().all(|(_, r, _)| !r.flags.contains(Flags::RST)),
        "no RST: {sent:?}"
    );
    let c = ep.connection(h).unwrap();
    assert_eq!((c.state(), c.error()), (State::Closed, None));
    assert!(*fins.last().unwrap() < Duration::from_secs(3), "{fins:?}");
}

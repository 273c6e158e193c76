//! Tests of the inside classifier and hairpin. Packets are built and checksums verified here
//! by code independent of `packet.rs`.

use core::net::{Ipv6Addr, SocketAddrV6};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::ula;

const LISTENER: u16 = 4000;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;

fn own() -> Addr {
    Addr::new(1, 0x10)
}
fn own_ip() -> Ipv6Addr {
    ula::to_ipv6(own())
}
fn peer() -> Addr {
    Addr::new(1, 0x0001_f291)
}
fn peer_ip() -> Ipv6Addr {
    ula::to_ipv6(peer())
}
fn sock(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}
fn hairpin() -> Hairpin {
    Hairpin::new(HairpinConfig::new(own(), LISTENER))
}

// --- Independent packet construction and checksum verification -----------------------------

fn sum16(bytes: &[u8]) -> u32 {
    let mut s = 0u32;
    for (i, b) in bytes.iter().enumerate() {
        s += if i % 2 == 0 {
            u32::from(*b) << 8
        } else {
            u32::from(*b)
        };
    }
    s
}

fn fold16(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn pseudo(src: &Ipv6Addr, dst: &Ipv6Addr, len: usize, next: u8) -> u32 {
    let mut ph = Vec::new();
    ph.extend_from_slice(&src.octets());
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&(len as u32).to_be_bytes());
    ph.extend_from_slice(&[0, 0, 0, next]);
    sum16(&ph)
}

/// Offset of the upper-layer header and its protocol, walking HBH/routing/dest-opts.
fn upper(p: &[u8]) -> (usize, u8) {
    let mut next = p[6];
    let mut off = 40;
    while matches!(next, 0 | 43 | 60) {
        next = p[off];
        off += (usize::from(p[off + 1]) + 1) * 8;
    }
    (off, next)
}

fn ip_src(p: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).unwrap())
}
fn ip_dst(p: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&p[24..40]).unwrap())
}
fn port_at(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}
fn u32_at(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(p[at..at + 4].try_into().unwrap())
}

/// Verifies the transport checksum of an IPv6 packet from scratch.
fn checksum_ok(p: &[u8]) -> bool {
    let (l4, next) = upper(p);
    let end = 40 + usize::from(port_at(p, 4));
    let seg = &p[l4..end];
    fold16(pseudo(&ip_src(p), &ip_dst(p), seg.len(), next) + sum16(seg)) == 0xffff
}

/// What a device does with a CHECKSUM_PARTIAL TCP packet: sums the segment, seeded by the
/// field, and stores the complement.
fn complete_partial(p: &mut [u8]) {
    let (l4, _) = upper(p);
    let end = 40 + usize::from(port_at(p, 4));
    let c = !fold16(sum16(&p[l4..end]));
    p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
}

struct Tcp<'a> {
    src: SocketAddrV6,
    dst: SocketAddrV6,
    seq: u32,
    ack: u32,
    flags: u8,
    options: &'a [u8],
    payload: &'a [u8],
    /// One extension header whose first byte names its own type.
    ext: &'a [u8],
    partial: bool,
}

impl Tcp<'_> {
    fn new(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Self {
        Tcp {
            src,
            dst,
            seq: 1000,
            ack: 0,
            flags,
            options: &[],
            payload: &[],
            ext: &[],
            partial: false,
        }
    }

    fn build(&self) -> Vec<u8> {
        let mut seg = Vec::new();
        seg.extend_from_slice(&self.src.port().to_be_bytes());
        seg.extend_from_slice(&self.dst.port().to_be_bytes());
        seg.extend_from_slice(&self.seq.to_be_bytes());
        seg.extend_from_slice(&self.ack.to_be_bytes());
        seg.push((((20 + self.options.len()) / 4) as u8) << 4);
        seg.push(self.flags);
        seg.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        seg.extend_from_slice(self.options);
        seg.extend_from_slice(self.payload);
        let ph = pseudo(self.src.ip(), self.dst.ip(), seg.len(), 6);
        let c = if self.partial {
            fold16(ph)
        } else {
            !fold16(ph + sum16(&seg))
        };
        seg[16..18].copy_from_slice(&c.to_be_bytes());
        let next = if self.ext.is_empty() { 6 } else { self.ext[0] };
        let mut ext = self.ext.to_vec();
        if !ext.is_empty() {
            ext[0] = 6;
        }
        ipv6(
            self.src.ip(),
            self.dst.ip(),
            next,
            &[&ext[..], &seg[..]].concat(),
        )
    }
}

fn ipv6(src: &Ipv6Addr, dst: &Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.push(next);
    p.push(64);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

fn icmp6(src: &Ipv6Addr, dst: &Ipv6Addr, ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0];
    m.extend_from_slice(body);
    let c = !fold16(pseudo(src, dst, m.len(), 58) + sum16(&m));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv6(src, dst, 58, &m)
}

fn udp(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&src.port().to_be_bytes());
    m.extend_from_slice(&dst.port().to_be_bytes());
    m.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(payload);
    ipv6(src.ip(), dst.ip(), 17, &m)
}

/// Asserts the TCP header of `p`.
fn assert_tcp(p: &[u8], src: SocketAddrV6, dst: SocketAddrV6) {
    let (l4, next) = upper(p);
    assert_eq!(next, 6);
    assert_eq!(ip_src(p), *src.ip());
    assert_eq!(ip_dst(p), *dst.ip());
    assert_eq!(port_at(p, l4), src.port());
    assert_eq!(port_at(p, l4 + 2), dst.port());
    assert!(checksum_ok(p), "checksum of {p:02x?}");
}

const MSS_OPTION: [u8; 4] = [2, 4, 0x05, 0xa0];

fn app() -> SocketAddrV6 {
    sock(own_ip(), 40000)
}
fn remote() -> SocketAddrV6 {
    sock(peer_ip(), 80)
}

fn syn_packet() -> Vec<u8> {
    Tcp {
        options: &MSS_OPTION,
        ..Tcp::new(app(), remote(), SYN)
    }
    .build()
}

/// An outbound connection app -> remote, accepted; returns the info and the inner socket.
fn accepted(h: &mut Hairpin, now: Instant) -> (FlowInfo, SocketAddrV6) {
    let mut syn = syn_packet();
    let Verdict::Connect(info) = h.handle_packet(now, &mut syn, ChecksumMode::Complete) else {
        panic!("SYN not reported as a connection");
    };
    let mut out = [0u8; 256];
    let n = h.accept_outbound(info.key, &mut out).unwrap();
    assert_tcp(&out[..n], info.fake, sock(own_ip(), LISTENER));
    (info, sock(own_ip(), LISTENER))
}

fn send(h: &mut Hairpin, now: Instant, t: Tcp<'_>) -> Vec<u8> {
    let mut p = t.build();
    let v = h.handle_packet(now, &mut p, ChecksumMode::Complete);
    let Verdict::Rewritten { len } = v else {
        panic!("not rewritten: {v:?}");
    };
    p.truncate(len);
    p
}

// --- Outbound ---------------------------------------------------------------------------------

#[test]
fn outbound_syn_pending_then_accepted() {
    let mut h = hairpin();
    let now = Instant::now();
    let mut syn = syn_packet();
    let original = syn.clone();
    let v = h.handle_packet(now, &mut syn, ChecksumMode::Complete);
    let Verdict::Connect(info) = v else {
        panic!("{v:?}")
    };
    assert_eq!(info.direction, Direction::Outbound);
    assert_eq!(info.peer, peer());
    assert_eq!(info.peer_port, 80);
    assert_eq!(info.local_port, 40000);
    assert!(fake_index(info.fake.ip()).is_some());
    assert_eq!(h.stats().live, 0);
    assert_eq!(h.stats().entries, 1);

    let mut out = [0u8; 256];
    let n = h.accept_outbound(info.key, &mut out).unwrap();
    let rewritten = &out[..n];
    assert_eq!(n, original.len());
    assert_tcp(rewritten, info.fake, sock(own_ip(), LISTENER));
    // Everything but addresses, ports and checksum is the application's SYN.
    let (l4, _) = upper(rewritten);
    assert_eq!(rewritten[..8], original[..8]);
    assert_eq!(rewritten[l4 + 4..l4 + 16], original[l4 + 4..l4 + 16]);
    assert_eq!(rewritten[l4 + 18..], original[l4 + 18..]);
    assert_eq!(h.outbound_for(info.fake), Some(info));
    assert_eq!(h.outbound_for(sock(*info.fake.ip(), 1)), None);
    assert_eq!(h.stats().live, 1);
    assert_eq!(
        h.accept_outbound(info.key, &mut out),
        Err(HairpinError::NotPending(info.key))
    );
}

#[test]
fn data_round_trip_both_ways() {
    let mut h = hairpin();
    let now = Instant::now();
    let (info, listener) = accepted(&mut h, now);
    // pilotd's socket answers the SYN: own:c -> fake:d becomes peer:b -> own:a.
    let p = send(
        &mut h,
        now,
        Tcp {
            seq: 7000,
            ack: 1001,
            ..Tcp::new(listener, info.fake, SYN | ACK)
        },
    );
    assert_tcp(&p, remote(), app());
    assert_eq!(u32_at(&p, 40 + 4), 7000);
    assert_eq!(u32_at(&p, 40 + 8), 1001);
    // Application data: own:a -> peer:b becomes fake:d -> own:c.
    let p = send(
        &mut h,
        now,
        Tcp {
            seq: 1001,
            ack: 7001,
            payload: b"GET / HTTP/1.0\r\n\r\n",
            ..Tcp::new(app(), remote(), ACK | PSH)
        },
    );
    assert_tcp(&p, info.fake, listener);
    assert_eq!(&p[60..], b"GET / HTTP/1.0\r\n\r\n");
    // Odd-length payload back.
    let p = send(
        &mut h,
        now,
        Tcp {
            payload: b"HTTP/1.0 200 OK",
            ..Tcp::new(listener, info.fake, ACK)
        },
    );
    assert_tcp(&p, remote(), app());
    assert_eq!(h.stats().rewritten, 3);
}

#[test]
fn fin_fin_ack_lingers_then_freed() {
    let mut h = hairpin();
    let now = Instant::now();
    let (info, listener) = accepted(&mut h, now);
    send(
        &mut h,
        now,
        Tcp {
            seq: 100,
            payload: b"bye",
            ..Tcp::new(app(), remote(), FIN | ACK)
        },
    );
    // The FIN ends at 100 + 3 + 1; acknowledging less does not count.
    send(
        &mut h,
        now,
        Tcp {
            seq: 500,
            ack: 103,
            ..Tcp::new(listener, info.fake, ACK)
        },
    );
    send(
        &mut h,
        now,
        Tcp {
            seq: 500,
            ack: 104,
            ..Tcp::new(listener, info.fake, FIN | ACK)
        },
    );
    assert_eq!(
        h.poll_timeout(),
        None,
        "the second FIN is not acknowledged yet"
    );
    let t1 = now + Duration::from_secs(3);
    send(
        &mut h,
        t1,
        Tcp {
            seq: 104,
            ack: 501,
            ..Tcp::new(app(), remote(), ACK)
        },
    );
    assert_eq!(h.poll_timeout(), Some(t1 + LINGER));
    // Lingering entries still rewrite (a retransmitted last ACK).
    send(
        &mut h,
        t1,
        Tcp {
            seq: 104,
            ack: 501,
            ..Tcp::new(app(), remote(), ACK)
        },
    );
    h.handle_timeout(t1 + LINGER - Duration::from_millis(1));
    assert_eq!(h.len(), 1);
    h.handle_timeout(t1 + LINGER);
    assert!(h.is_empty());
    assert_eq!(h.outbound_for(info.fake), None);
    assert_eq!(h.poll_timeout(), None);
    assert_eq!(h.stats().expired, 1);
    // The tuple is free again: a new SYN is a new connection.
    let mut syn = syn_packet();
    assert!(matches!(
        h.handle_packet(t1 + LINGER, &mut syn, ChecksumMode::Complete),
        Verdict::Connect(_)
    ));
}

#[test]
fn rst_lingers_then_freed() {
    let mut h = hairpin();
    let now = Instant::now();
    let (info, listener) = accepted(&mut h, now);
    let p = send(
        &mut h,
        now,
        Tcp {
            seq: 9,
            ..Tcp::new(listener, info.fake, RST)
        },
    );
    assert_tcp(&p, remote(), app());
    assert_eq!(h.poll_timeout(), Some(now + LINGER));
    assert_eq!(h.len(), 1);
    h.handle_timeout(now + LINGER);
    assert!(h.is_empty());
}

#[test]
fn explicit_remove_leaves_no_stale_timer() {
    let mut h = hairpin();
    let now = Instant::now();
    let (info, _) = accepted(&mut h, now);
    send(&mut h, now, Tcp::new(app(), remote(), RST));
    assert!(h.remove(info.key));
    assert!(!h.remove(info.key));
    assert_eq!(h.poll_timeout(), None);
    let mut p = Tcp::new(app(), remote(), ACK).build();
    assert_eq!(
        h.handle_packet(now, &mut p, ChecksumMode::Complete),
        Verdict::Drop(DropReason::TcpNoFlow)
    );
}

#[test]
fn retransmitted_syn_while_pending() {
    let mut h = hairpin();
    let now = Instant::now();
    let mut syn = syn_packet();
    let Verdict::Connect(info) = h.handle_packet(now, &mut syn, ChecksumMode::Complete) else {
        panic!()
    };
    let mut again = syn_packet();
    assert_eq!(
        h.handle_packet(now, &mut again, ChecksumMode::Complete),
        Verdict::SynRetransmit(info.key)
    );
    assert_eq!(again, syn_packet(), "a dropped packet is left alone");
    assert_eq!(h.stats().syn_retransmits, 1);
    assert_eq!(h.stats().outbound, 1);
    // Anything else from the application before the dial completes has no flow yet.
    let mut ack = Tcp::new(app(), remote(), ACK).build();
    assert_eq!(
        h.handle_packet(now, &mut ack, ChecksumMode::Complete),
        Verdict::Drop(DropReason::TcpNoFlow)
    );
}

#[test]
fn syn_too_large_is_dropped() {
    let mut h = hairpin();
    let mut p = Tcp {
        payload: &[0u8; 80],
        ..Tcp::new(app(), remote(), SYN)
    }
    .build();
    assert_eq!(
        h.handle_packet(Instant::now(), &mut p, ChecksumMode::Complete),
        Verdict::Drop(DropReason::SynTooLarge)
    );
    assert_eq!(h.stats().dropped(DropReason::SynTooLarge), 1);
    assert!(h.is_empty());
}

// --- Refusals ---------------------------------------------------------------------------------

fn pending(h: &mut Hairpin) -> (FlowInfo, Vec<u8>) {
    let mut syn = syn_packet();
    let original = syn.clone();
    let Verdict::Connect(info) = h.handle_packet(Instant::now(), &mut syn, ChecksumMode::Complete)
    else {
        panic!()
    };
    (info, original)
}

#[test]
fn refuse_with_reset() {
    let mut h = hairpin();
    let (info, _) = pending(&mut h);
    let mut out = [0u8; 128];
    let n = h
        .refuse_outbound(info.key, Refusal::Reset, &mut out)
        .unwrap();
    let p = &out[..n];
    assert_eq!(n, 60);
    assert_tcp(p, remote(), app());
    assert_eq!(u32_at(p, 44), 0, "seq");
    assert_eq!(u32_at(p, 48), 1001, "ack = SYN seq + 1");
    assert_eq!(p[53], RST | ACK);
    assert!(h.is_empty());
    assert_eq!(
        h.refuse_outbound(info.key, Refusal::Reset, &mut out),
        Err(HairpinError::UnknownFlow(info.key))
    );
}

#[test]
fn refuse_with_icmp_unreachable_and_prohibited() {
    for (refusal, code) in [(Refusal::Unreachable, 3u8), (Refusal::Prohibited, 1)] {
        let mut h = hairpin();
        let (info, syn) = pending(&mut h);
        let mut small = [0u8; 60];
        assert!(matches!(
            h.refuse_outbound(info.key, refusal, &mut small),
            Err(HairpinError::Build(BuildError::BufferTooSmall { .. }))
        ));
        assert_eq!(h.len(), 1, "a failed refusal keeps the entry");
        let mut out = [0u8; 1280];
        let n = h.refuse_outbound(info.key, refusal, &mut out).unwrap();
        let p = &out[..n];
        assert_eq!(n, 48 + syn.len());
        assert_eq!(p[6], 58);
        assert_eq!(ip_src(p), peer_ip());
        assert_eq!(ip_dst(p), own_ip());
        assert_eq!((p[40], p[41]), (1, code));
        assert_eq!(&p[44..48], &[0; 4], "unused field");
        assert_eq!(&p[48..], &syn[..], "the whole SYN is quoted");
        assert!(checksum_ok(p));
        assert!(h.is_empty());
    }
}

#[test]
fn icmp_error_quote_is_bounded_by_min_mtu() {
    let big = vec![0xabu8; 2000];
    let mut out = vec![0u8; 3000];
    let n = build_dest_unreachable(peer_ip(), own_ip(), 3, &big, &mut out).unwrap();
    assert_eq!(n, 1280);
    assert!(checksum_ok(&out[..n]));
}

// --- Inbound ----------------------------------------------------------------------------------

#[test]
fn inbound_prepare_then_kernel_syn_and_replies() {
    let mut h = hairpin();
    let now = Instant::now();
    let x = sock(peer_ip(), 5555);
    let info = h.prepare_inbound(x, 22).unwrap();
    assert_eq!(info.direction, Direction::Inbound);
    assert_eq!(info.peer, peer());
    assert_eq!(info.local_port, 22);
    assert!(ula::from_ipv6(*info.fake.ip()).is_err());
    assert_eq!(
        h.outbound_for(info.fake),
        None,
        "inbound entries are not outbound"
    );
    assert_eq!(
        h.prepare_inbound(x, 22),
        Err(HairpinError::TupleInUse {
            local_port: 22,
            peer: x
        })
    );
    // pilotd's connect: own:c -> fake:d arrives as X:sp -> own:P.
    let pilotd = sock(own_ip(), 51000);
    let p = send(&mut h, now, Tcp::new(pilotd, info.fake, SYN));
    assert_tcp(&p, x, sock(own_ip(), 22));
    // The listener answers X:sp; the answer reaches pilotd's socket from fake:d.
    let p = send(
        &mut h,
        now,
        Tcp {
            ack: 1001,
            ..Tcp::new(sock(own_ip(), 22), x, SYN | ACK)
        },
    );
    assert_tcp(&p, info.fake, pilotd);
    let p = send(
        &mut h,
        now,
        Tcp {
            payload: b"SSH-2.0-x\r\n",
            ..Tcp::new(pilotd, info.fake, ACK)
        },
    );
    assert_tcp(&p, x, sock(own_ip(), 22));
    // Another local port cannot use the entry.
    let mut p = Tcp::new(sock(own_ip(), 51001), info.fake, ACK).build();
    assert_eq!(
        h.handle_packet(now, &mut p, ChecksumMode::Complete),
        Verdict::Drop(DropReason::TcpNoFlow)
    );
    assert!(h.cancel_inbound(info.fake));
    assert!(!h.cancel_inbound(info.fake));
    assert!(h.is_empty());
}

#[test]
fn inbound_requires_a_pilot_peer() {
    let mut h = hairpin();
    let ip: Ipv6Addr = "2001:db8::1".parse().unwrap();
    assert_eq!(
        h.prepare_inbound(sock(ip, 1), 22),
        Err(HairpinError::NotPilot(ip))
    );
    let fake = fake_addr(3);
    assert_eq!(
        h.prepare_inbound(sock(fake, 1), 22),
        Err(HairpinError::NotPilot(fake))
    );
}

#[test]
fn reserved_entry_ignores_non_syn() {
    let mut h = hairpin();
    let info = h.prepare_inbound(sock(peer_ip(), 5555), 22).unwrap();
    let mut p = Tcp::new(sock(own_ip(), 51000), info.fake, ACK).build();
    assert_eq!(
        h.handle_packet(Instant::now(), &mut p, ChecksumMode::Complete),
        Verdict::Drop(DropReason::TcpNoFlow)
    );
}

// --- Table limit and fake addresses -----------------------------------------------------------

#[test]
fn table_limit_refuses_new_syns_with_rst() {
    let mut h = Hairpin::new(HairpinConfig {
        max_entries: 2,
        ..HairpinConfig::new(own(), LISTENER)
    });
    let now = Instant::now();
    for port in [1, 2] {
        let mut p = Tcp::new(sock(own_ip(), port), remote(), SYN).build();
        assert!(matches!(
            h.handle_packet(now, &mut p, ChecksumMode::Complete),
            Verdict::Connect(_)
        ));
    }
    let mut p = Tcp {
        seq: 77,
        ..Tcp::new(sock(own_ip(), 3), remote(), SYN)
    }
    .build();
    let Verdict::Reply { len } = h.handle_packet(now, &mut p, ChecksumMode::Partial) else {
        panic!()
    };
    let p = &p[..len];
    assert_tcp(p, remote(), sock(own_ip(), 3));
    assert_eq!((u32_at(p, 44), u32_at(p, 48), p[53]), (0, 78, RST | ACK));
    assert_eq!(
        h.prepare_inbound(sock(peer_ip(), 9), 22),
        Err(HairpinError::TableFull)
    );
    assert_eq!(h.stats().table_full, 2);
    assert_eq!(h.len(), 2);
}

#[test]
fn fake_addresses_are_distinct_and_never_pilot_addresses() {
    let mut h = hairpin();
    let mut seen = std::collections::HashSet::new();
    for i in 0..300u16 {
        let info = h.prepare_inbound(sock(peer_ip(), i + 1), 22).unwrap();
        assert!(
            seen.insert(*info.fake.ip()),
            "fake address handed out twice"
        );
        assert!(ula::in_prefix(*info.fake.ip()));
        assert!(matches!(
            ula::from_ipv6(*info.fake.ip()),
            Err(ula::UlaError::ReservedBits(_))
        ));
        if i % 3 == 0 {
            h.cancel_inbound(info.fake);
        }
    }
    for index in [0, 1, 0xffff, 0x1_0000, u32::MAX] {
        let ip = fake_addr(index);
        assert_eq!(fake_index(&ip), Some(index));
        assert!(ula::from_ipv6(ip).is_err());
        assert_eq!(ip.octets()[..10], FAKE_PREFIX.octets()[..10]);
    }
    assert_eq!(fake_index(&peer_ip()), None);
    assert_eq!(
        FAKE_PREFIX.to_string(),
        "fd06:3fcd:b33d:0:ffff::",
        "documented range"
    );
}

// --- CHECKSUM_PARTIAL -------------------------------------------------------------------------

#[test]
fn partial_checksums_stay_partial_and_complete_correctly() {
    let mut h = hairpin();
    let now = Instant::now();
    // A partial SYN is held with a complete checksum.
    let mut syn = Tcp {
        options: &MSS_OPTION,
        partial: true,
        ..Tcp::new(app(), remote(), SYN)
    }
    .build();
    let Verdict::Connect(info) = h.handle_packet(now, &mut syn, ChecksumMode::Partial) else {
        panic!()
    };
    let mut out = [0u8; 256];
    let n = h.accept_outbound(info.key, &mut out).unwrap();
    assert_tcp(&out[..n], info.fake, sock(own_ip(), LISTENER));
    let mut refused = hairpin();
    let mut syn = Tcp {
        partial: true,
        ..Tcp::new(app(), remote(), SYN)
    }
    .build();
    let Verdict::Connect(r) = refused.handle_packet(now, &mut syn, ChecksumMode::Partial) else {
        panic!()
    };
    let n = refused
        .refuse_outbound(r.key, Refusal::Unreachable, &mut out)
        .unwrap();
    let quoted = &out[48..n];
    assert!(
        checksum_ok(quoted),
        "the quoted SYN carries a complete checksum"
    );

    // Data both ways with partial checksums.
    let listener = sock(own_ip(), LISTENER);
    for (from, to, want_src, want_dst) in [
        (app(), remote(), info.fake, listener),
        (listener, info.fake, remote(), app()),
    ] {
        let payload = b"partial checksum payload, odd!";
        let mut p = Tcp {
            payload,
            partial: true,
            ..Tcp::new(from, to, ACK | PSH)
        }
        .build();
        let len = p.len();
        assert_eq!(
            h.handle_packet(now, &mut p, ChecksumMode::Partial),
            Verdict::Rewritten { len }
        );
        let (l4, _) = upper(&p);
        // The field is the uncomplemented pseudo-header sum of the new addresses.
        let seg_len = len - l4;
        let expected = fold16(pseudo(want_src.ip(), want_dst.ip(), seg_len, 6));
        assert_eq!(port_at(&p, l4 + 16), expected);
        assert!(!checksum_ok(&p) || expected == 0xffff);
        complete_partial(&mut p);
        assert_tcp(&p, want_src, want_dst);
    }
}

// --- UDP and echo -----------------------------------------------------------------------------

#[test]
fn dns_queries_to_the_resolver_address_are_reported() {
    let mut h = hairpin();
    let mut p = udp(sock(own_ip(), 40000), sock(dns::RESOLVER, 53), b"query");
    let v = h.handle_packet(Instant::now(), &mut p, ChecksumMode::Complete);
    let Verdict::DnsQuery {
        client_port,
        payload,
    } = v
    else {
        panic!("{v:?}")
    };
    assert_eq!((client_port, &p[payload]), (40000, &b"query"[..]));
    assert_eq!(h.stats().dns_queries, 1);
    // Another port of the resolver address, or TCP to it, is not a node: dropped.
    let mut p = udp(sock(own_ip(), 40000), sock(dns::RESOLVER, 54), b"query");
    let v = h.handle_packet(Instant::now(), &mut p, ChecksumMode::Complete);
    assert_eq!(v, Verdict::Drop(DropReason::NotPilot));
}

#[test]
fn udp_classified_and_built() {
    let mut h = hairpin();
    let mut p = udp(sock(own_ip(), 5353), sock(peer_ip(), 53), b"query");
    let v = h.handle_packet(Instant::now(), &mut p, ChecksumMode::Complete);
    let Verdict::Datagram {
        peer: to,
        peer_port,
        local_port,
        payload,
    } = v
    else {
        panic!("{v:?}")
    };
    assert_eq!((to, peer_port, local_port), (peer(), 53, 5353));
    assert_eq!(&p[payload], b"query");

    let mut out = [0u8; 128];
    let n = build_udp(
        sock(peer_ip(), 53),
        sock(own_ip(), 5353),
        b"answer",
        &mut out,
    )
    .unwrap();
    let q = &out[..n];
    assert_eq!(n, 40 + 8 + 6);
    assert_eq!((q[6], ip_src(q), ip_dst(q)), (17, peer_ip(), own_ip()));
    assert_eq!(
        (port_at(q, 40), port_at(q, 42), port_at(q, 44)),
        (53, 5353, 14)
    );
    assert_eq!(&q[48..], b"answer");
    assert!(checksum_ok(q));
    assert!(matches!(
        build_udp(
            sock(peer_ip(), 53),
            sock(own_ip(), 5353),
            b"answer",
            &mut out[..50]
        ),
        Err(BuildError::BufferTooSmall { needed: 54, .. })
    ));
}

#[test]
fn udp_checksum_zero_is_sent_as_ffff() {
    let (src, dst) = (sock(peer_ip(), 53), sock(own_ip(), 5353));
    let mut out = [0u8; 64];
    let n = build_udp(src, dst, &[0, 0], &mut out).unwrap();
    // A payload word equal to that checksum makes the computed checksum zero.
    let c = port_at(&out, 46);
    let n2 = build_udp(src, dst, &c.to_be_bytes(), &mut out).unwrap();
    assert_eq!(n, n2);
    assert_eq!(port_at(&out, 46), 0xffff);
    assert!(checksum_ok(&out[..n2]));
}

#[test]
fn udp_too_large_is_dropped() {
    let mut h = Hairpin::new(HairpinConfig {
        max_datagram: 4,
        ..HairpinConfig::new(own(), LISTENER)
    });
    let mut p = udp(sock(own_ip(), 1), sock(peer_ip(), 2), b"12345");
    assert_eq!(
        h.handle_packet(Instant::now(), &mut p, ChecksumMode::Complete),
        Verdict::Drop(DropReason::DatagramTooLarge)
    );
}

#[test]
fn echo_request_classified_and_reply_built() {
    let mut h = hairpin();
    let body = [0x12, 0x34, 0, 7, b'p', b'i', b'n', b'g', b'!'];
    let mut p = icmp6(&own_ip(), &peer_ip(), 128, &body);
    let v = h.handle_packet(Instant::now(), &mut p, ChecksumMode::Complete);
    let Verdict::EchoRequest {
        peer: to,
        ident,
        seq,
        payload,
    } = v
    else {
        panic!("{v:?}")
    };
    assert_eq!((to, ident, seq), (peer(), 0x1234, 7));
    assert_eq!(&p[payload.clone()], b"ping!");

    let mut out = [0u8; 128];
    let n = build_echo_reply(peer_ip(), own_ip(), ident, seq, &p[payload], &mut out).unwrap();
    let r = &out[..n];
    assert_eq!((r[6], r[40], r[41]), (58, 129, 0));
    assert_eq!((ip_src(r), ip_dst(r)), (peer_ip(), own_ip()));
    assert_eq!(&r[44..48], &body[..4]);
    assert_eq!(&r[48..], b"ping!");
    assert!(checksum_ok(r));
}

// --- Drops ------------------------------------------------------------------------------------

fn verdict(p: &mut [u8]) -> Verdict {
    hairpin().handle_packet(Instant::now(), p, ChecksumMode::Complete)
}

#[test]
fn drops_are_classified() {
    let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
    let link_local: Ipv6Addr = "fe80::1".parse().unwrap();
    let doc: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let reserved: Ipv6Addr = "fd06:3fcd:b33d:1:0:1:0:20".parse().unwrap();
    let drop = |r| Verdict::Drop(r);

    let mut ipv4 = vec![
        0x45, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    assert_eq!(verdict(&mut ipv4), drop(DropReason::Ipv4));
    // Router solicitation, neighbour solicitation.
    let mut rs = icmp6(&link_local, &all_routers, 133, &[0; 4]);
    assert_eq!(verdict(&mut rs), drop(DropReason::IcmpControl));
    let mut ns = icmp6(&own_ip(), &peer_ip(), 135, &[0; 20]);
    assert_eq!(verdict(&mut ns), drop(DropReason::IcmpControl));
    // MLDv2 report behind a hop-by-hop header with a router alert option.
    let mut mld = icmp6(&link_local, &"ff02::16".parse().unwrap(), 143, &[0; 4]);
    let hbh = [58u8, 0, 5, 2, 0, 0, 1, 0];
    mld.splice(40..40, hbh);
    mld[6] = 0;
    let plen = (mld.len() - 40) as u16;
    mld[4..6].copy_from_slice(&plen.to_be_bytes());
    assert_eq!(verdict(&mut mld), drop(DropReason::IcmpControl));
    // Fragment header.
    let mut frag = udp(sock(own_ip(), 1), sock(peer_ip(), 2), b"x");
    frag.splice(40..40, [17u8, 0, 0, 1, 0, 0, 0, 9]);
    frag[6] = 44;
    let plen = (frag.len() - 40) as u16;
    frag[4..6].copy_from_slice(&plen.to_be_bytes());
    assert_eq!(verdict(&mut frag), drop(DropReason::Fragment));
    // Sources and destinations.
    let mut foreign = Tcp::new(sock(link_local, 1), remote(), SYN).build();
    assert_eq!(verdict(&mut foreign), drop(DropReason::ForeignSource));
    for dst in [doc, reserved, own_ip(), "ff02::fb".parse().unwrap()] {
        let mut p = Tcp::new(app(), sock(dst, 80), SYN).build();
        assert_eq!(verdict(&mut p), drop(DropReason::NotPilot), "{dst}");
        let mut p = udp(app(), sock(dst, 80), b"x");
        assert_eq!(verdict(&mut p), drop(DropReason::NotPilot), "{dst}");
    }
    // Other protocols and broken packets.
    let mut sctp = ipv6(&own_ip(), &peer_ip(), 132, &[0; 12]);
    assert_eq!(verdict(&mut sctp), drop(DropReason::Protocol));
    let mut nonext = ipv6(&own_ip(), &peer_ip(), 59, &[0; 8]);
    assert_eq!(verdict(&mut nonext), drop(DropReason::ExtensionHeader));
    let mut rh = ipv6(&own_ip(), &peer_ip(), 43, &[6, 0, 0, 1, 0, 0, 0, 0]);
    assert_eq!(verdict(&mut rh), drop(DropReason::ExtensionHeader));
    let syn = syn_packet();
    for cut in [0, 1, 39, 40, 59, syn.len() - 1] {
        let mut p = syn[..cut].to_vec();
        assert_eq!(verdict(&mut p), drop(DropReason::Malformed), "cut at {cut}");
    }
    let mut bad_off = syn_packet();
    bad_off[52] = 0x40;
    assert_eq!(verdict(&mut bad_off), drop(DropReason::Malformed));
    let mut bad_udp_len = udp(app(), remote(), b"abc");
    bad_udp_len[45] = 99;
    assert_eq!(verdict(&mut bad_udp_len), drop(DropReason::Malformed));
    let mut v5 = syn_packet();
    v5[0] = 0x50;
    assert_eq!(verdict(&mut v5), drop(DropReason::Malformed));
}

#[test]
fn drop_counters_and_labels() {
    let mut h = hairpin();
    let mut p = vec![0x45u8; 20];
    h.handle_packet(Instant::now(), &mut p, ChecksumMode::Complete);
    h.handle_packet(Instant::now(), &mut p, ChecksumMode::Complete);
    let s = h.stats();
    assert_eq!(s.dropped(DropReason::Ipv4), 2);
    assert_eq!(s.drops.iter().sum::<u64>(), 2);
    let labels: std::collections::HashSet<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(labels.len(), DropReason::ALL.len());
    for (i, r) in DropReason::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
    }
}

#[test]
fn extension_headers_are_walked_and_kept() {
    let mut h = hairpin();
    let now = Instant::now();
    // First byte: this header's own type (the builder puts it in the IPv6 header).
    let dest_opts = [60u8, 0, 1, 4, 0, 0, 0, 0];
    let mut syn = Tcp {
        ext: &dest_opts,
        ..Tcp::new(app(), remote(), SYN)
    }
    .build();
    let original = syn.clone();
    let Verdict::Connect(info) = h.handle_packet(now, &mut syn, ChecksumMode::Complete) else {
        panic!()
    };
    let mut out = [0u8; 256];
    let n = h.accept_outbound(info.key, &mut out).unwrap();
    assert_eq!(out[6], 60);
    assert_eq!(out[40..48], original[40..48]);
    assert_tcp(&out[..n], info.fake, sock(own_ip(), LISTENER));
}

// --- Properties -------------------------------------------------------------------------------

/// A table with live outbound and inbound entries, plus the tuples that reach them.
fn populated() -> (Hairpin, Vec<(SocketAddrV6, SocketAddrV6)>) {
    let mut h = hairpin();
    let now = Instant::now();
    let (info, listener) = accepted(&mut h, now);
    let x = sock(peer_ip(), 5555);
    let inbound = h.prepare_inbound(x, 22).unwrap();
    let pilotd = sock(own_ip(), 51000);
    send(&mut h, now, Tcp::new(pilotd, inbound.fake, SYN));
    let reserved = h.prepare_inbound(sock(peer_ip(), 6666), 23).unwrap();
    let tuples = vec![
        (app(), remote()),
        (listener, info.fake),
        (pilotd, inbound.fake),
        (sock(own_ip(), 22), x),
        (sock(own_ip(), 51001), reserved.fake),
        (sock(own_ip(), 40001), remote()),
    ];
    (h, tuples)
}

fn assert_emitted_ok(v: &Verdict, p: &[u8], mode: ChecksumMode) {
    match *v {
        Verdict::Rewritten { len } => {
            let mut q = p[..len].to_vec();
            if mode == ChecksumMode::Partial {
                complete_partial(&mut q);
            }
            assert!(checksum_ok(&q), "rewritten packet {q:02x?}");
        }
        Verdict::Reply { len } => assert!(checksum_ok(&p[..len])),
        _ => {}
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..200),
                                partial in any::<bool>()) {
        let (mut h, _) = populated();
        let mode = if partial { ChecksumMode::Partial } else { ChecksumMode::Complete };
        // Make most inputs look like IPv6 from us so they get past the first checks.
        if bytes.len() >= 40 && bytes[0] & 1 == 0 {
            bytes[0] = 0x60;
            let plen = (bytes.len() - 40) as u16;
            bytes[4..6].copy_from_slice(&plen.to_be_bytes());
            bytes[8..24].copy_from_slice(&own_ip().octets());
            if bytes[1] & 1 == 0 {
                bytes[24..40].copy_from_slice(&peer_ip().octets());
            }
        }
        let v = h.handle_packet(Instant::now(), &mut bytes, mode);
        if let Verdict::Reply { len } = v {
            prop_assert!(checksum_ok(&bytes[..len]));
        }
    }

    #[test]
    fn rewritten_packets_have_valid_checksums(
        which in 0usize..6,
        flags in any::<u8>(),
        seq in any::<u32>(),
        ack in any::<u32>(),
        payload in proptest::collection::vec(any::<u8>(), 0..100),
        options in proptest::sample::select(vec![0usize, 4, 8, 12]),
        partial in any::<bool>(),
        reverse in any::<bool>(),
    ) {
        let (mut h, tuples) = populated();
        let (mut src, mut dst) = tuples[which];
        if reverse {
            core::mem::swap(&mut src, &mut dst);
        }
        let opts = vec![1u8; options];
        let mut p = Tcp { seq, ack, flags, options: &opts, payload: &payload, partial,
                          ..Tcp::new(src, dst, flags) }.build();
        let mode = if partial { ChecksumMode::Partial } else { ChecksumMode::Complete };
        let v = h.handle_packet(Instant::now(), &mut p, mode);
        if which < 4 && !reverse {
            // Live entries rewrite every segment of their tuples.
            prop_assert_eq!(&v, &Verdict::Rewritten { len: p.len() });
        }
        assert_emitted_ok(&v, &p, mode);
        if let Verdict::Connect(info) = v {
            let mut out = [0u8; 256];
            let n = h.accept_outbound(info.key, &mut out).unwrap();
            prop_assert!(checksum_ok(&out[..n]));
        }
    }

    #[test]
    fn builders_always_checksum(payload in proptest::collection::vec(any::<u8>(), 0..1500),
                                sp in any::<u16>(), dp in any::<u16>(), id in any::<u16>()) {
        let mut out = vec![0u8; 1600];
        let n = build_udp(sock(peer_ip(), sp), sock(own_ip(), dp), &payload, &mut out).unwrap();
        prop_assert!(checksum_ok(&out[..n]));
        prop_assert_ne!(port_at(&out, 46), 0);
        let n = build_echo_reply(peer_ip(), own_ip(), id, sp, &payload, &mut out).unwrap();
        prop_assert!(checksum_ok(&out[..n]));
        let n = build_dest_unreachable(peer_ip(), own_ip(), 1, &payload, &mut out).unwrap();
        prop_assert!(n <= 1280);
        prop_assert!(checksum_ok(&out[..n]));
    }
}

#[test]
fn answers_to_the_firewall_probe_are_reported_never_rewritten() {
    let mut h = hairpin();
    let now = Instant::now();
    let listener = sock(own_ip(), 40_000);
    let probe = sock(PROBE_ADDR, 9);
    let mut syn_ack = Tcp::new(listener, probe, SYN | ACK);
    syn_ack.ack = 1001;
    let mut p = syn_ack.build();
    assert_eq!(
        h.handle_packet(now, &mut p, ChecksumMode::Complete),
        Verdict::ProbeSynAck {
            port: 40_000,
            probe_port: 9,
            ack: 1001
        }
    );
    assert_eq!(p, syn_ack.build(), "a probe answer is left alone");
    assert_eq!(h.stats().probe_answers, 1);
    // Any other segment to the probe address is dropped, and no entry is made.
    for flags in [RST | ACK, ACK, SYN, RST] {
        let mut p = Tcp::new(listener, probe, flags).build();
        assert_eq!(
            h.handle_packet(now, &mut p, ChecksumMode::Complete),
            Verdict::Drop(DropReason::TcpNoFlow),
            "flags {flags:#x}"
        );
    }
    assert_eq!(h.stats().entries, 0);
}

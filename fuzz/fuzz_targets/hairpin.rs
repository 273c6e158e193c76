//! Hairpin classifier: arbitrary bytes through `Hairpin::handle_packet` with live entries in
//! the table never panic, and every packet it rewrites or emits carries a valid checksum
//! (complete, or for CHECKSUM_PARTIAL input the new pseudo-header sum).
//!
//! Input: byte 0 steers the packet (bit 0: partial checksum; bits 1-3: overlay the addresses
//! and ports of a live tuple when < 4; bit 4: swap the tuple's direction; bit 5: set the IPv6
//! payload length to the input's), the rest is the packet. A packet that then looks like
//! IPv6 TCP without extension headers gets a correct checksum before it goes in.
#![no_main]
use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use tunnel::inside::packet::{partial_checksum, proto, transport_checksum, transport_checksum_ok};
use tunnel::inside::{build_tcp, ChecksumMode, Hairpin, HairpinConfig, Verdict};
use tunnel::{ula, Addr};

const SYN: u8 = 0x02;
const TCP_CHECKSUM: usize = 40 + 16;

fn sock(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

/// A table with an accepted outbound and a live inbound connection; returns their tuples.
fn setup(now: Instant) -> (Hairpin, [(SocketAddrV6, SocketAddrV6); 4]) {
    let own = ula::to_ipv6(Addr::new(1, 0x10));
    let peer = ula::to_ipv6(Addr::new(1, 0x20));
    let mut h = Hairpin::new(HairpinConfig::new(Addr::new(1, 0x10), 4000));
    let mut buf = [0u8; 256];
    let n = build_tcp(sock(own, 40000), sock(peer, 80), 1, 0, SYN, &mut buf).expect("fits");
    let Verdict::Connect(out) = h.handle_packet(now, &mut buf[..n], ChecksumMode::Complete) else {
        panic!("setup SYN not reported as a connection");
    };
    h.accept_outbound(out.key, &mut buf).expect("pending");
    let inb = h.prepare_inbound(sock(peer, 5555), 22).expect("room");
    let n = build_tcp(sock(own, 51000), inb.fake, 1, 0, SYN, &mut buf).expect("fits");
    let v = h.handle_packet(now, &mut buf[..n], ChecksumMode::Complete);
    assert!(matches!(v, Verdict::Rewritten { .. }));
    let tuples = [
        (sock(own, 40000), sock(peer, 80)),
        (sock(own, 4000), out.fake),
        (sock(own, 51000), inb.fake),
        (sock(own, 22), sock(peer, 5555)),
    ];
    (h, tuples)
}

fn addr(p: &[u8], at: usize) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&p[at..at + 16]);
    Ipv6Addr::from(o)
}

/// Gives an IPv6 TCP packet without extension headers a correct checksum for `mode`.
fn fix_checksum(p: &mut [u8], mode: ChecksumMode) -> bool {
    if p.len() < 60 || p[0] >> 4 != 6 || p[6] != proto::TCP {
        return false;
    }
    let end = 40 + usize::from(u16::from_be_bytes([p[4], p[5]]));
    if end > p.len() || end < 60 {
        return false;
    }
    let (src, dst) = (addr(p, 8), addr(p, 24));
    let c = match mode {
        ChecksumMode::Complete => {
            p[TCP_CHECKSUM..TCP_CHECKSUM + 2].fill(0);
            transport_checksum(&src, &dst, proto::TCP, &p[40..end])
        }
        ChecksumMode::Partial => partial_checksum(&src, &dst, proto::TCP, end - 40),
    };
    p[TCP_CHECKSUM..TCP_CHECKSUM + 2].copy_from_slice(&c.to_be_bytes());
    true
}

fn checksum_ok(p: &[u8], mode: ChecksumMode) -> bool {
    let (src, dst) = (addr(p, 8), addr(p, 24));
    match mode {
        ChecksumMode::Complete => transport_checksum_ok(&src, &dst, proto::TCP, &p[40..]),
        ChecksumMode::Partial => {
            let field = u16::from_be_bytes([p[TCP_CHECKSUM], p[TCP_CHECKSUM + 1]]);
            field == partial_checksum(&src, &dst, proto::TCP, p.len() - 40)
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let now = Instant::now();
    let (mut h, tuples) = setup(now);
    let mode = if control & 1 == 0 {
        ChecksumMode::Complete
    } else {
        ChecksumMode::Partial
    };
    let mut p = rest.to_vec();
    let which = usize::from((control >> 1) & 7);
    if which < tuples.len() && p.len() >= 44 {
        let (mut src, mut dst) = tuples[which];
        if control & 0x10 != 0 {
            core::mem::swap(&mut src, &mut dst);
        }
        p[8..24].copy_from_slice(&src.ip().octets());
        p[24..40].copy_from_slice(&dst.ip().octets());
        if p[6] == proto::TCP {
            p[40..42].copy_from_slice(&src.port().to_be_bytes());
            p[42..44].copy_from_slice(&dst.port().to_be_bytes());
        }
    }
    if control & 0x20 != 0 && p.len() >= 40 {
        let plen = u16::try_from(p.len() - 40).unwrap_or(u16::MAX);
        p[4..6].copy_from_slice(&plen.to_be_bytes());
    }
    let fixed = fix_checksum(&mut p, mode);
    match h.handle_packet(now, &mut p, mode) {
        Verdict::Rewritten { len } if fixed => assert!(checksum_ok(&p[..len], mode)),
        Verdict::Reply { len } => assert!(checksum_ok(&p[..len], ChecksumMode::Complete)),
        Verdict::Connect(info) if fixed => {
            let mut out = [0u8; 256];
            let n = h.accept_outbound(info.key, &mut out).expect("pending");
            assert!(checksum_ok(&out[..n], ChecksumMode::Complete));
        }
        Verdict::Datagram { payload, .. } | Verdict::EchoRequest { payload, .. } => {
            assert!(payload.start <= payload.end && payload.end <= p.len());
        }
        _ => {}
    }
    h.handle_timeout(now + tunnel::inside::LINGER);
    let _ = h.poll_timeout();
});

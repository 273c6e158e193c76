//! Property tests: every codec round-trips, and no parser panics on arbitrary input.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use proptest::prelude::*;
use rand_core::OsRng;
use tunnel::crypto::Session;
use tunnel::wire::frame::{
    AuthKeyExchangeRepr, Frame, KeyExchangeRepr, ENCRYPTED_HEADER_LEN, ENCRYPTED_OVERHEAD,
};
use tunnel::wire::{Flags, Packet, PacketRepr, Protocol, HEADER_LEN};
use tunnel::{ula, Addr, SocketAddr};
use x25519_dalek::{PublicKey, StaticSecret};

fn addr() -> impl Strategy<Value = Addr> {
    (any::<u16>(), any::<u32>()).prop_map(|(n, h)| Addr::new(n, h))
}

fn sockaddr() -> impl Strategy<Value = SocketAddr> {
    (addr(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(a, p))
}

proptest! {
    #[test]
    fn addr_text_round_trips(a in addr()) {
        let text = a.to_string();
        prop_assert_eq!(text.parse::<Addr>(), Ok(a));
        prop_assert_eq!(text.to_lowercase().parse::<Addr>(), Ok(a));
        prop_assert_eq!(Addr::from_bytes(a.to_bytes()), a);
    }

    #[test]
    fn socket_addr_text_round_trips(s in sockaddr()) {
        prop_assert_eq!(s.to_string().parse::<SocketAddr>(), Ok(s));
    }

    #[test]
    fn ula_round_trips(a in addr()) {
        let ip = ula::to_ipv6(a);
        prop_assert!(ula::in_prefix(ip));
        prop_assert_eq!(ula::from_ipv6(ip), Ok(a));
    }

    #[test]
    fn ula_rejects_foreign_addresses(bytes in any::<[u8; 16]>()) {
        let ip = std::net::Ipv6Addr::from(bytes);
        match ula::from_ipv6(ip) {
            Ok(a) => prop_assert_eq!(ula::to_ipv6(a), ip),
            Err(_) => prop_assert!(bytes[..6] != ula::PREFIX || bytes[8..12] != [0; 4]),
        }
    }

    #[test]
    fn text_parsers_never_panic(s in "\\PC{0,40}") {
        let _ = s.parse::<Addr>();
        let _ = s.parse::<SocketAddr>();
    }

    #[test]
    fn header_round_trips(
        flags in 0u8..16,
        proto in any::<u8>(),
        src in sockaddr(),
        dst in sockaddr(),
        seq in any::<u32>(),
        ack in any::<u32>(),
        window in any::<u16>(),
        payload in proptest::collection::vec(any::<u8>(), 0..2000),
    ) {
        let repr = PacketRepr {
            flags: Flags::from_bits_truncate(flags),
            protocol: Protocol::from(proto),
            src, dst, seq, ack, window,
            payload_len: payload.len() as u16,
        };
        let mut buf = vec![0u8; HEADER_LEN + payload.len()];
        prop_assert_eq!(repr.emit_with_payload(&mut buf, &payload), Ok(buf.len()));
        let p = Packet::new_checked(&buf[..]).unwrap();
        prop_assert_eq!(PacketRepr::parse(&p), Ok(repr));
        prop_assert_eq!(p.payload(), &payload[..]);
        // Any single-bit error is caught by the CRC or the length/version checks.
        let bit = (seq as usize) % (buf.len() * 8);
        buf[bit / 8] ^= 1 << (bit % 8);
        let damaged = Packet::new_checked(&buf[..]).and_then(|p| PacketRepr::parse(&p));
        prop_assert!(damaged.is_err());
    }

    #[test]
    fn packet_parser_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(p) = Packet::new_checked(&buf[..]) {
            let _ = PacketRepr::parse(&p);
            let _ = p.payload();
        }
    }

    #[test]
    fn key_exchange_frames_round_trip(
        node in any::<u32>(),
        x in any::<[u8; 32]>(),
        ed in any::<[u8; 32]>(),
        sig in proptest::collection::vec(any::<u8>(), 64),
    ) {
        let k = KeyExchangeRepr { node, x25519_public: x };
        let kb = k.to_bytes();
        match Frame::parse(&kb) {
            Ok(Frame::KeyExchange(v)) => prop_assert_eq!(KeyExchangeRepr::parse(&v), k),
            other => prop_assert!(false, "{:?}", other),
        }
        let a = AuthKeyExchangeRepr {
            node,
            x25519_public: x,
            ed25519_public: ed,
            signature: sig.try_into().unwrap(),
        };
        let ab = a.to_bytes();
        match Frame::parse(&ab) {
            Ok(Frame::AuthKeyExchange(v)) => prop_assert_eq!(AuthKeyExchangeRepr::parse(&v), a),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn frame_parser_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(f) = Frame::parse(&buf) {
            match f {
                Frame::Encrypted(v) => { let _ = (v.node(), v.counter(), v.plaintext_len()); }
                Frame::AuthKeyExchange(v) => { let _ = AuthKeyExchangeRepr::parse(&v); }
                Frame::KeyExchange(v) => { let _ = KeyExchangeRepr::parse(&v); }
                Frame::Plain(p) => prop_assert!(p.len() >= HEADER_LEN),
                Frame::Beacon(b) => prop_assert!(b[0] < 0x10),
                Frame::Punch => prop_assert_eq!(&buf[..4], b"PILP"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn seal_open_round_trips(packets in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 0..1500), 1..20)
    ) {
        let a = StaticSecret::random_from_rng(OsRng);
        let b = StaticSecret::random_from_rng(OsRng);
        let mut tx = Session::new(1, &a, &PublicKey::from(&b).to_bytes(), &mut OsRng).unwrap();
        let mut rx = Session::new(2, &b, &PublicKey::from(&a).to_bytes(), &mut OsRng).unwrap();
        for p in &packets {
            let mut buf = vec![0u8; p.len() + ENCRYPTED_OVERHEAD];
            buf[ENCRYPTED_HEADER_LEN..ENCRYPTED_HEADER_LEN + p.len()].copy_from_slice(p);
            let n = tx.seal(&mut buf, p.len()).unwrap();
            prop_assert_eq!(rx.open(&mut buf[..n]).unwrap(), &p[..]);
        }
    }

    #[test]
    fn open_never_panics(mut buf in proptest::collection::vec(any::<u8>(), 0..200)) {
        let a = StaticSecret::random_from_rng(OsRng);
        let mut rx = Session::new(2, &a, &PublicKey::from(&a).to_bytes(), &mut OsRng).unwrap();
        prop_assert!(rx.open(&mut buf).is_err());
    }
}

//! The tunnel layer after trust ends, against a scripted v1 tunnel peer on the wire.
//!
//! A v1 daemon removes its tunnel peer (session keys and endpoint) when trust with us ends
//! either way (v1 wire §2.5 `RemovePeer`, §6.3), then drops our PILS without a word (§2.4).
//! It makes a context again only from our PILA (fresh nonce prefix, counter and replay
//! window, same key) and answers that PILA only when it had no context or our key changed
//! (§2.3 steps 5 and 8). These tests script exactly that peer and check that after
//! [`Tunnels::rekey`] our next packet goes out behind our PILA, so traffic works both ways
//! at once, and that a peer that kept its keys is re-keyed only a bounded number of times.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::FixedRng;
use ed25519_dalek::SigningKey;
use tunnel::crypto::{build_auth_key_exchange, verify_auth_key_exchange, Session};
use tunnel::node::tunnels::{
    send_buffer_len, Received, Sent, TunnelConfig, Tunnels, HEADROOM, PILA_INTERVAL, REKEY_PILAS,
};
use tunnel::wire::frame::{AuthKeyExchangeRepr, ENCRYPTED_HEADER_LEN, TAG_LEN};
use tunnel::wire::{Flags, Frame, Packet, PacketRepr, Protocol, HEADER_LEN};
use tunnel::{Addr, SocketAddr as PilotAddr};
use x25519_dalek::{PublicKey, StaticSecret};

const US: u32 = 1;
const V1: u32 = 2;

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// A byte cycle of prime length: keys and nonce prefixes drawn from it differ.
fn rng(offset: u8) -> FixedRng {
    let bytes: Vec<u8> = (0..251u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(offset))
        .collect();
    FixedRng::new(&bytes)
}

/// A datagram packet from `from` to `to` carrying `payload`, marshaled.
fn packet(from: u32, to: u32, payload: &[u8]) -> Vec<u8> {
    let repr = PacketRepr {
        flags: Flags::empty(),
        protocol: Protocol::Datagram,
        src: PilotAddr::new(Addr::new(0, from), 9),
        dst: PilotAddr::new(Addr::new(0, to), 9),
        seq: 0,
        ack: 0,
        window: 0,
        payload_len: payload.len() as u16,
    };
    let mut buf = vec![0u8; HEADER_LEN + payload.len()];
    repr.emit_with_payload(&mut buf, payload).unwrap();
    buf
}

fn payload_of(p: &[u8]) -> Vec<u8> {
    Packet::new_checked(p).unwrap().payload().to_vec()
}

/// What a v1 tunnel does with one peer (ours), per v1 wire §2.2-§2.5.
struct V1Tunnel {
    identity: SigningKey,
    secret: StaticSecret,
    rng: FixedRng,
    our_key: ed25519_dalek::VerifyingKey,
    /// `peers[us]`: where our frames go.
    endpoint: Option<SocketAddr>,
    /// `crypto[us]`.
    context: Option<Session>,
    our_x25519: Option<[u8; 32]>,
    /// Frames it sends, in order.
    out: Vec<Vec<u8>>,
    /// PILS dropped for want of a context ("encrypted packet from node but no key").
    no_key: usize,
    /// Payloads of packets it opened.
    got: Vec<Vec<u8>>,
}

impl V1Tunnel {
    fn new(our_key: ed25519_dalek::VerifyingKey) -> Self {
        let mut rng = rng(101);
        let secret = StaticSecret::random_from_rng(&mut rng);
        V1Tunnel {
            identity: SigningKey::from_bytes(&[2; 32]),
            secret,
            rng,
            our_key,
            endpoint: None,
            context: None,
            our_x25519: None,
            out: Vec::new(),
            no_key: 0,
            got: Vec::new(),
        }
    }

    fn pila(&self) -> Vec<u8> {
        let public = PublicKey::from(&self.secret).to_bytes();
        build_auth_key_exchange(&self.identity, V1, &public)
            .to_bytes()
            .to_vec()
    }

    /// `RemovePeer`: trust with us ended.
    fn remove_peer(&mut self) {
        self.endpoint = None;
        self.context = None;
    }

    fn receive(&mut self, src: SocketAddr, frame: &[u8]) {
        match Frame::parse(frame).unwrap() {
            Frame::AuthKeyExchange(a) => {
                let pila = AuthKeyExchangeRepr::parse(&a);
                verify_auth_key_exchange(&pila, &self.our_key).unwrap();
                let answer = self.context.is_none() || self.our_x25519 != Some(pila.x25519_public);
                // Step 5: a new context replaces any, even for an unchanged key.
                self.context = Some(
                    Session::new(V1, &self.secret, &pila.x25519_public, &mut self.rng).unwrap(),
                );
                self.our_x25519 = Some(pila.x25519_public);
                self.endpoint = Some(src);
                if answer {
                    self.out.push(self.pila());
                }
            }
            Frame::Encrypted(_) => {
                let Some(ctx) = self.context.as_mut() else {
                    self.no_key += 1;
                    return;
                };
                let mut f = frame.to_vec();
                let inner = ctx.open(&mut f).expect("v1 opens our PILS");
                self.got.push(payload_of(inner));
            }
            other => panic!("unexpected frame to v1: {other:?}"),
        }
    }

    /// Sends `payload` to us with its context (`Send` with a ready context).
    fn send(&mut self, payload: &[u8]) {
        let p = packet(V1, US, payload);
        let ctx = self.context.as_mut().expect("v1 has a context");
        let mut buf = vec![0u8; ENCRYPTED_HEADER_LEN + p.len() + TAG_LEN];
        buf[ENCRYPTED_HEADER_LEN..ENCRYPTED_HEADER_LEN + p.len()].copy_from_slice(&p);
        let n = ctx.seal(&mut buf, p.len()).unwrap();
        buf.truncate(n);
        self.out.push(buf);
    }
}

struct Us {
    t: Tunnels<FixedRng>,
    addr: SocketAddr,
}

impl Us {
    fn new(identity: SigningKey, offset: u8) -> Self {
        Us {
            t: Tunnels::new(
                US,
                identity,
                TunnelConfig {
                    refuse_plaintext: true,
                    beacon: None,
                },
                rng(offset),
            ),
            addr: addr(4001),
        }
    }

    /// Seals `payload` to `node` and returns every datagram that goes out now, in order.
    fn send(&mut self, now: Instant, node: u32, payload: &[u8]) -> (Sent, Vec<Vec<u8>>) {
        let p = packet(US, node, payload);
        let mut buf = vec![0u8; send_buffer_len(p.len())];
        buf[HEADROOM..HEADROOM + p.len()].copy_from_slice(&p);
        let sent = self.t.seal(now, node, &mut buf, p.len());
        let mut out = Vec::new();
        if let Sent::Now { range, .. } = sent {
            out.push(buf[range.0..range.1].to_vec());
        }
        out.extend(self.drain(now));
        (sent, out)
    }

    fn drain(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; send_buffer_len(65_535)];
        while let Some(t) = self.t.poll_transmit(now, &mut buf) {
            out.push(buf[t.range()].to_vec());
        }
        out
    }

    /// Handles frames from `src`; returns the payloads of the packets opened.
    fn receive(&mut self, now: Instant, src: SocketAddr, frames: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        for mut f in frames {
            if let Received::Packet { range, .. } = self.t.handle(now, src, &mut f) {
                got.push(payload_of(&f[range]));
            }
        }
        got
    }
}

fn is_pila(f: &[u8]) -> bool {
    matches!(Frame::parse(f), Ok(Frame::AuthKeyExchange(_)))
}

/// Our node and a v1 peer with a working session, as after a first trust round.
fn keyed(now: Instant) -> (Us, V1Tunnel, SocketAddr) {
    let identity = SigningKey::from_bytes(&[1; 32]);
    let mut v1 = V1Tunnel::new(identity.verifying_key());
    let mut us = Us::new(identity, 3);
    let v1_addr = addr(4002);
    us.t.set_key(now, V1, v1.identity.verifying_key());
    us.t.set_endpoint(now, V1, v1_addr);
    for f in us.drain(now) {
        v1.receive(us.addr, &f);
    }
    let answer = std::mem::take(&mut v1.out);
    assert_eq!(answer.len(), 1, "v1 answers our first PILA");
    us.receive(now, v1_addr, answer);
    let (sent, frames) = us.send(now, V1, b"first");
    assert!(matches!(sent, Sent::Now { .. }), "{sent:?}");
    for f in frames {
        v1.receive(us.addr, &f);
    }
    assert_eq!(v1.got, [b"first".to_vec()]);
    v1.send(b"first back");
    let back = std::mem::take(&mut v1.out);
    assert_eq!(us.receive(now, v1_addr, back), [b"first back".to_vec()]);
    v1.got.clear();
    (us, v1, v1_addr)
}

#[test]
fn without_a_rekey_a_v1_peer_that_dropped_its_keys_drops_what_we_seal() {
    // The failure the rekey exists for: our session alone reaches nothing.
    let t0 = Instant::now();
    let (mut us, mut v1, _) = keyed(t0);
    v1.remove_peer();
    for i in 0..3u64 {
        let now = t0 + Duration::from_secs(i);
        let (sent, frames) = us.send(now, V1, b"ping");
        assert!(matches!(sent, Sent::Now { .. }), "{sent:?}");
        assert!(frames.iter().all(|f| !is_pila(f)), "no key exchange goes");
        for f in frames {
            v1.receive(us.addr, &f);
        }
    }
    assert_eq!(v1.no_key, 3);
    assert!(v1.got.is_empty());
}

#[test]
fn after_a_revoke_our_next_packet_goes_behind_our_pila_and_both_ways_work() {
    let t0 = Instant::now();
    let (mut us, mut v1, v1_addr) = keyed(t0);
    // Trust ended: v1 removed its tunnel peer; our daemon asks for a rekey.
    v1.remove_peer();
    us.t.rekey(V1);
    assert!(us.t.rekey_pending(V1));

    // A new trust round later: our first packet to v1 goes out behind our PILA.
    let now = t0 + Duration::from_secs(30);
    let (sent, frames) = us.send(now, V1, b"ping 1");
    assert_eq!(sent, Sent::Queued);
    assert_eq!(frames.len(), 2, "our PILA, then the packet");
    assert!(is_pila(&frames[0]), "the PILA goes first");
    assert!(!is_pila(&frames[1]));
    for f in frames {
        v1.receive(us.addr, &f);
    }
    assert_eq!(v1.no_key, 0, "v1 had our key before the packet came");
    assert_eq!(v1.got, [b"ping 1".to_vec()]);
    assert_eq!(v1.endpoint, Some(us.addr), "our PILA gave v1 our endpoint");

    // v1 had no context, so it answers our PILA; that ends the rekey.
    let answer = std::mem::take(&mut v1.out);
    assert_eq!(answer.len(), 1);
    assert!(is_pila(&answer[0]));
    assert!(us.receive(now, v1_addr, answer).is_empty());
    assert!(!us.t.rekey_pending(V1));

    // v1's new context (new prefix, counter from 1) opens here, three times.
    for i in 0..3u8 {
        v1.send(&[b'r', i]);
        let f = std::mem::take(&mut v1.out);
        assert_eq!(us.receive(now, v1_addr, f), [vec![b'r', i]]);
    }
    // And ours go out sealed alone again, and open there.
    for i in 0..3u8 {
        let (sent, frames) = us.send(now + PILA_INTERVAL * 2, V1, &[b'p', i]);
        assert!(matches!(sent, Sent::Now { .. }), "{sent:?}");
        assert_eq!(frames.len(), 1);
        for f in frames {
            v1.receive(us.addr, &f);
        }
    }
    assert_eq!(v1.got.len(), 4);
    assert_eq!(v1.no_key, 0);
}

#[test]
fn a_lost_rekey_pila_is_sent_again_on_a_later_packet() {
    let t0 = Instant::now();
    let (mut us, mut v1, v1_addr) = keyed(t0);
    v1.remove_peer();
    us.t.rekey(V1);
    // The first PILA and its packet are lost.
    let (_, lost) = us.send(t0, V1, b"lost");
    assert!(is_pila(&lost[0]));
    // Within the interval, packets go sealed alone (and v1 drops them).
    let (sent, frames) = us.send(t0 + PILA_INTERVAL / 2, V1, b"early");
    assert!(matches!(sent, Sent::Now { .. }), "{sent:?}");
    for f in frames {
        v1.receive(us.addr, &f);
    }
    assert_eq!(v1.no_key, 1);
    // After it, the next packet goes behind a new PILA and arrives.
    let later = t0 + PILA_INTERVAL;
    let (sent, frames) = us.send(later, V1, b"retransmit");
    assert_eq!(sent, Sent::Queued);
    assert!(is_pila(&frames[0]));
    for f in frames {
        v1.receive(us.addr, &f);
    }
    assert_eq!(v1.got, [b"retransmit".to_vec()]);
    let answer = std::mem::take(&mut v1.out);
    us.receive(later, v1_addr, answer);
    assert!(!us.t.rekey_pending(V1));
}

#[test]
fn a_peer_that_kept_its_keys_gets_a_bounded_number_of_pilas_and_loses_nothing() {
    // The peer's revoke reached us over a tunnel it had keyed again to send it: it holds a
    // context, so it never answers our PILA (our key is unchanged). Each PILA resets its
    // context (same key): nothing is lost, and after REKEY_PILAS our packets go alone.
    let t0 = Instant::now();
    let (mut us, mut v1, v1_addr) = keyed(t0);
    us.t.rekey(V1);
    let mut pilas = 0;
    for i in 0..10u8 {
        let now = t0 + PILA_INTERVAL * u32::from(i);
        let (_, frames) = us.send(now, V1, &[i]);
        pilas += frames.iter().filter(|f| is_pila(f)).count();
        for f in frames {
            v1.receive(us.addr, &f);
        }
        assert!(v1.out.is_empty(), "v1 with a context does not answer");
        // v1's packets, from whichever context it holds now, open here.
        v1.send(&[b'r', i]);
        let f = std::mem::take(&mut v1.out);
        assert_eq!(us.receive(now, v1_addr, f), [vec![b'r', i]]);
    }
    assert_eq!(pilas, usize::from(REKEY_PILAS));
    assert!(!us.t.rekey_pending(V1));
    assert_eq!(v1.got, (0..10u8).map(|i| vec![i]).collect::<Vec<_>>());
}

#[test]
fn between_two_pilot_nodes_a_rekey_costs_one_pila_each_way_and_keeps_the_sessions() {
    let t0 = Instant::now();
    let (ka, kb) = (
        SigningKey::from_bytes(&[1; 32]),
        SigningKey::from_bytes(&[2; 32]),
    );
    let mut a = Us::new(ka.clone(), 3);
    let mut b = Tunnels::new(
        V1,
        kb.clone(),
        TunnelConfig {
            refuse_plaintext: true,
            beacon: None,
        },
        rng(77),
    );
    let b_addr = addr(4002);
    a.t.set_key(t0, V1, kb.verifying_key());
    b.set_key(t0, US, ka.verifying_key());
    a.t.set_endpoint(t0, V1, b_addr);
    let mut buf = vec![0u8; send_buffer_len(65_535)];
    // Key both sides.
    for _ in 0..3 {
        for mut f in a.drain(t0) {
            b.handle(t0, a.addr, &mut f);
        }
        let mut back = Vec::new();
        while let Some(t) = b.poll_transmit(t0, &mut buf) {
            back.push(buf[t.range()].to_vec());
        }
        a.receive(t0, b_addr, back);
    }
    // B seals to A with the session it keeps through the rekey.
    let b_send = |b: &mut Tunnels<FixedRng>, now: Instant, payload: &[u8]| {
        let p = packet(V1, US, payload);
        let mut buf = vec![0u8; send_buffer_len(p.len())];
        buf[HEADROOM..HEADROOM + p.len()].copy_from_slice(&p);
        match b.seal(now, US, &mut buf, p.len()) {
            Sent::Now { range, .. } => buf[range.0..range.1].to_vec(),
            other => panic!("B could not seal: {other:?}"),
        }
    };
    let f = b_send(&mut b, t0, b"before");
    assert_eq!(a.receive(t0, b_addr, vec![f]), [b"before".to_vec()]);

    a.t.rekey(V1);
    let now = t0 + Duration::from_secs(5);
    let (sent, frames) = a.send(now, V1, b"after");
    assert_eq!(sent, Sent::Queued);
    assert!(is_pila(&frames[0]));
    let mut opened = Vec::new();
    for mut f in frames {
        if let Received::Packet { range, .. } = b.handle(now, a.addr, &mut f) {
            opened.push(payload_of(&f[range]));
        }
    }
    assert_eq!(opened, [b"after".to_vec()], "B's session opens A's packet");
    // B answers the PILA once; that ends A's rekey.
    let mut back = Vec::new();
    while let Some(t) = b.poll_transmit(now, &mut buf) {
        back.push(buf[t.range()].to_vec());
    }
    assert_eq!(back.len(), 1);
    assert!(is_pila(&back[0]));
    a.receive(now, b_addr, back);
    assert!(!a.t.rekey_pending(V1));
    // B's session was kept: its next packet opens with A's session as it was.
    let f = b_send(&mut b, now, b"still");
    assert_eq!(a.receive(now, b_addr, vec![f]), [b"still".to_vec()]);
    let (sent, _) = a.send(now, V1, b"alone");
    assert!(matches!(sent, Sent::Now { .. }), "{sent:?}");
}

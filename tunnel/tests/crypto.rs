//! Tunnel crypto: golden frames computed with an independent implementation (Python
//! `cryptography`), interoperation of two sessions, and every refusal.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use crate::common;

use common::{hex, FixedRng};
use ed25519_dalek::SigningKey;
use rand_core::OsRng;
use tunnel::crypto::replay::{ReplayError, WINDOW};
use tunnel::crypto::{
    build_auth_key_exchange, verify_auth_key_exchange, AuthError, OpenError, SealError, Session,
    SessionError,
};
use tunnel::wire::frame::{
    AuthKeyExchangeRepr, Frame, ENCRYPTED_HEADER_LEN, ENCRYPTED_OVERHEAD, TAG_LEN,
};
use x25519_dalek::{PublicKey, StaticSecret};

const A_PUB: &str = "07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c";
const B_PUB: &str = "5869aff450549732cbaaed5e5df9b30a6da31cb0e5742bad5ad4a1a768f1a67b";
/// The v1 SPEC.md SYN example with its CRC.
const SYN: &str = "11010000000000000001000000000002C00003E800000000000000000200145ED874";
/// SYN sealed by node 7 with secret 1..=32 toward the key of secret 33..=64, prefix deadbeef.
const PILS: &str = "50494c5300000007deadbeef0000000000000001afafc7ede6e4e98e80b6efe0deab39fd\
                    117acf2d731cc3362b5e0341525e5468350fc7e4cec286544bd0fc62da3d54dcb1a7";
/// PILA of node 5, identity seed [7; 32], X25519 key A_PUB.
const PILA: &str = "50494c410000000507a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b8\
                    6d1c7cea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22cba62\
                    41778b72636746d6bc30c1907e0ad67c3a7c56464cce2572157725fe4499269f654ff1a7ec\
                    51e76e2f2ed19c0f48bd66ba73c6495f61e9fd205c12b84d0e";

fn secret_a() -> StaticSecret {
    StaticSecret::from(core::array::from_fn::<u8, 32, _>(|i| i as u8 + 1))
}

fn secret_b() -> StaticSecret {
    StaticSecret::from(core::array::from_fn::<u8, 32, _>(|i| i as u8 + 33))
}

fn key32(s: &str) -> [u8; 32] {
    hex(s).try_into().unwrap()
}

fn seal(s: &mut Session, packet: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; packet.len() + ENCRYPTED_OVERHEAD];
    buf[ENCRYPTED_HEADER_LEN..ENCRYPTED_HEADER_LEN + packet.len()].copy_from_slice(packet);
    let n = s.seal(&mut buf, packet.len()).unwrap();
    assert_eq!(n, buf.len());
    buf
}

/// A pair of sessions with random keys: (node 1's, node 2's).
fn pair() -> (Session, Session) {
    let a = StaticSecret::random_from_rng(OsRng);
    let b = StaticSecret::random_from_rng(OsRng);
    let ap = PublicKey::from(&a).to_bytes();
    let bp = PublicKey::from(&b).to_bytes();
    (
        Session::new(1, &a, &bp, &mut OsRng).unwrap(),
        Session::new(2, &b, &ap, &mut OsRng).unwrap(),
    )
}

#[test]
fn public_keys_match_vectors() {
    assert_eq!(PublicKey::from(&secret_a()).to_bytes(), key32(A_PUB));
    assert_eq!(PublicKey::from(&secret_b()).to_bytes(), key32(B_PUB));
}

#[test]
fn golden_pils_seal_and_open() {
    let mut tx = Session::new(
        7,
        &secret_a(),
        &key32(B_PUB),
        &mut FixedRng::new(&[0xde, 0xad, 0xbe, 0xef]),
    )
    .unwrap();
    let frame = seal(&mut tx, &hex(SYN));
    assert_eq!(frame, hex(PILS));
    assert_eq!(tx.send_counter(), 1);

    let mut rx = Session::new(9, &secret_b(), &key32(A_PUB), &mut OsRng).unwrap();
    let mut f = hex(PILS);
    let Ok(Frame::Encrypted(v)) = Frame::parse(&f) else {
        panic!("not PILS")
    };
    assert_eq!((v.node(), v.counter()), (7, 1));
    assert_eq!(rx.open(&mut f).unwrap(), &hex(SYN)[..]);
}

#[test]
fn golden_pila_build_and_verify() {
    let id = SigningKey::from_bytes(&[7; 32]);
    let pila = build_auth_key_exchange(&id, 5, &key32(A_PUB));
    assert_eq!(pila.to_bytes().to_vec(), hex(PILA));
    let bytes = hex(PILA);
    let Ok(Frame::AuthKeyExchange(v)) = Frame::parse(&bytes) else {
        panic!("not PILA")
    };
    let parsed = AuthKeyExchangeRepr::parse(&v);
    assert_eq!(
        verify_auth_key_exchange(&parsed, &id.verifying_key()),
        Ok(())
    );

    // The registry holds another key for node 5.
    let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
    assert_eq!(
        verify_auth_key_exchange(&parsed, &other),
        Err(AuthError::KeyMismatch(5))
    );
    // Signature, node or X25519 key altered.
    let mut bad = parsed;
    bad.signature[10] ^= 1;
    assert_eq!(
        verify_auth_key_exchange(&bad, &id.verifying_key()),
        Err(AuthError::BadSignature(5))
    );
    let mut bad = parsed;
    bad.node = 6;
    assert_eq!(
        verify_auth_key_exchange(&bad, &id.verifying_key()),
        Err(AuthError::BadSignature(6))
    );
    let mut bad = parsed;
    bad.x25519_public[0] ^= 1;
    assert!(verify_auth_key_exchange(&bad, &id.verifying_key()).is_err());
}

#[test]
fn two_sessions_interoperate_both_ways() {
    let (mut a, mut b) = pair();
    for i in 0..3000u32 {
        let msg = i.to_be_bytes().repeat((i % 50) as usize + 1);
        let mut f = seal(&mut a, &msg);
        assert_eq!(b.open(&mut f).unwrap(), &msg[..]);
        let mut f = seal(&mut b, &msg);
        assert_eq!(a.open(&mut f).unwrap(), &msg[..]);
    }
    assert_eq!(a.send_counter(), 3000);
}

#[test]
fn out_of_order_delivery_is_accepted_once() {
    let (mut a, mut b) = pair();
    let mut frames: Vec<Vec<u8>> = (0..500u32)
        .map(|i| seal(&mut a, &i.to_be_bytes()))
        .collect();
    frames.reverse();
    for f in &frames {
        let mut f = f.clone();
        b.open(&mut f).unwrap();
    }
    let mut again = frames[7].clone();
    assert!(matches!(
        b.open(&mut again),
        Err(OpenError::Replay(ReplayError::Replayed(_)))
    ));
}

#[test]
fn tampering_is_rejected_and_changes_nothing() {
    let (mut a, mut b) = pair();
    let good = seal(&mut a, b"payload of a packet");
    // Every byte after the node ID is covered: nonce (as GCM input), ciphertext and tag.
    for i in 8..good.len() {
        let mut f = good.clone();
        f[i] ^= 0x40;
        let r = b.open(&mut f);
        assert!(
            matches!(
                r,
                Err(OpenError::Authentication) | Err(OpenError::Replay(_))
            ),
            "byte {i}: {r:?}"
        );
    }
    // After all that, the genuine frame still opens.
    let mut f = good.clone();
    assert_eq!(b.open(&mut f).unwrap(), b"payload of a packet");
    // Truncated below the minimum.
    let mut short = good[..ENCRYPTED_OVERHEAD - 1].to_vec();
    assert!(matches!(b.open(&mut short), Err(OpenError::Frame(_))));
    // Wrong key.
    let (_, mut stranger) = pair();
    let mut f = seal(&mut a, b"x");
    assert_eq!(stranger.open(&mut f), Err(OpenError::Authentication));
}

#[test]
fn replay_is_rejected() {
    let (mut a, mut b) = pair();
    let f = seal(&mut a, b"once");
    b.open(&mut f.clone()).unwrap();
    assert_eq!(
        b.open(&mut f.clone()),
        Err(OpenError::Replay(ReplayError::Replayed(1)))
    );
}

#[test]
fn too_old_is_rejected() {
    let (mut a, mut b) = pair();
    let first = seal(&mut a, b"first");
    for _ in 0..WINDOW + 10 {
        seal(&mut a, b"skipped");
    }
    let last = seal(&mut a, b"last");
    b.open(&mut last.clone()).unwrap();
    assert!(matches!(
        b.open(&mut first.clone()),
        Err(OpenError::Replay(ReplayError::TooOld { counter: 1, .. }))
    ));
}

#[test]
fn reflection_is_rejected() {
    let (mut a, _b) = pair();
    let mut own = seal(&mut a, b"to the peer");
    assert_eq!(a.open(&mut own), Err(OpenError::Reflected));
}

#[test]
fn forged_huge_counter_does_not_block_genuine_traffic() {
    let (mut a, mut b) = pair();
    let mut f = seal(&mut a, b"hello");
    b.open(&mut f).unwrap();

    // A forger copies the peer's node ID and prefix, claims counter 2^64-1, and cannot make
    // a valid tag.
    let mut forged = seal(&mut a, b"hello");
    forged[12..20].copy_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(b.open(&mut forged), Err(OpenError::Authentication));
    // The same with a fresh prefix must not switch the receive context either.
    let mut forged2 = forged.clone();
    forged2[8..12].copy_from_slice(&[1, 2, 3, 4]);
    assert_eq!(b.open(&mut forged2), Err(OpenError::Authentication));

    for i in 0..100u32 {
        let mut f = seal(&mut a, &i.to_be_bytes());
        assert_eq!(b.open(&mut f).unwrap(), &i.to_be_bytes());
    }
}

#[test]
fn peer_context_recreation_is_followed_and_old_context_refused() {
    // A v1 peer recreates its context (new prefix, counter back to 1, same key) whenever it
    // receives our PILA.
    let a_secret = StaticSecret::random_from_rng(OsRng);
    let b_secret = StaticSecret::random_from_rng(OsRng);
    let ap = PublicKey::from(&a_secret).to_bytes();
    let bp = PublicKey::from(&b_secret).to_bytes();
    let mut a1 = Session::new(1, &a_secret, &bp, &mut FixedRng::new(&[1, 1, 1, 1])).unwrap();
    let mut b = Session::new(2, &b_secret, &ap, &mut OsRng).unwrap();
    let old: Vec<Vec<u8>> = (0..5).map(|_| seal(&mut a1, b"old")).collect();
    b.open(&mut old[0].clone()).unwrap();

    let mut a2 = Session::new(1, &a_secret, &bp, &mut FixedRng::new(&[2, 2, 2, 2])).unwrap();
    let mut f = seal(&mut a2, b"new");
    assert_eq!(b.open(&mut f).unwrap(), b"new");
    // Frames of the earlier context are refused from now on, even unseen ones.
    assert_eq!(b.open(&mut old[3].clone()), Err(OpenError::RetiredPrefix));
    for _ in 0..10 {
        let mut f = seal(&mut a2, b"more");
        b.open(&mut f).unwrap();
    }
}

#[test]
fn low_order_peer_key_is_refused() {
    let s = StaticSecret::random_from_rng(OsRng);
    assert_eq!(
        Session::new(1, &s, &[0u8; 32], &mut OsRng).err(),
        Some(SessionError::NonContributory)
    );
}

#[test]
fn seal_needs_room_for_header_and_tag() {
    let (mut a, _) = pair();
    let mut buf = vec![0u8; 100];
    assert_eq!(
        a.seal(&mut buf, 100 - ENCRYPTED_OVERHEAD + 1),
        Err(SealError::BufferTooSmall {
            needed: 101,
            have: 100
        })
    );
    // A failed seal consumes no counter.
    assert_eq!(a.send_counter(), 0);
    assert_eq!(a.seal(&mut buf, 100 - ENCRYPTED_OVERHEAD), Ok(100));
    assert_eq!(buf.len() - TAG_LEN, 84);
}

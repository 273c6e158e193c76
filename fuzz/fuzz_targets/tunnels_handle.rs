//! The daemon's tunnel peer table fed a hostile stream of datagrams from a few sources (a
//! known peer, the beacon, a stranger), with time moving: no panic, every packet it hands out
//! lies inside the buffer and comes from a peer whose key it holds, and its output queue stays
//! bounded.
#![no_main]
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use tunnel::node::tunnels::{send_buffer_len, Received, TunnelConfig, Tunnels};

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let peer: SocketAddr = "127.0.0.1:4002".parse().unwrap();
    let beacon: SocketAddr = "127.0.0.1:9001".parse().unwrap();
    let stranger: SocketAddr = "[::1]:5000".parse().unwrap();
    let mut t = Tunnels::new(
        1,
        SigningKey::from_bytes(&[1; 32]),
        TunnelConfig {
            refuse_plaintext: data.first().is_some_and(|b| b & 1 == 0),
            beacon: Some(beacon),
        },
        rand_core::OsRng,
    );
    let peer_key = SigningKey::from_bytes(&[2; 32]).verifying_key();
    t.set_key(t0, 2, peer_key);
    t.set_endpoint(t0, 2, peer);
    let mut now = t0;
    // Records: [selector][length][bytes]; the selector picks the source and a time step.
    let mut rest = data.get(1..).unwrap_or_default();
    while let [sel, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        now += Duration::from_millis(u64::from(sel >> 2) * 50);
        let src = match sel & 3 {
            0 => peer,
            1 => beacon,
            _ => stranger,
        };
        let mut buf = bytes.to_vec();
        match t.handle(now, src, &mut buf) {
            Received::Packet { peer, range } => {
                assert!(range.start <= range.end && range.end <= buf.len());
                assert_eq!(peer, 2, "only the keyed peer can produce packets");
            }
            Received::NeedKey(node) => {
                // Answer unknown nodes with an unrelated key: their PILA must then fail.
                if node != 1 {
                    t.set_key(now, node, SigningKey::from_bytes(&[9; 32]).verifying_key());
                }
            }
            _ => {}
        }
        t.handle_timeout(now);
        let mut queued = 0;
        let mut out = vec![0u8; send_buffer_len(65_535)];
        while let Some(tx) = t.poll_transmit(now, &mut out) {
            assert!(tx.range().end <= out.len());
            queued += 1;
        }
        assert!(queued < 1024, "output queue grew to {queued}");
    }
});

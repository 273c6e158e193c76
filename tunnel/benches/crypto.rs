//! Seal and open throughput of tunnel sessions on one core, against raw AES-256-GCM on the
//! same buffers measured in the same run (the ratio shows what framing, nonce and replay
//! handling cost on top of the cipher).
//!
//! `cargo bench -p tunnel` runs it. `PILOT_BENCH_SECS` sets the time per measurement
//! (default 1). Throughput counts the sealed packet bytes (Pilot header + payload), in
//! MB/s (10^6 bytes per second).

#![allow(clippy::unwrap_used)] // benchmark code: a panic is a failed run

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use rand_core::OsRng;
use tunnel::crypto::Session;
use tunnel::wire::frame::{ENCRYPTED_HEADER_LEN, ENCRYPTED_OVERHEAD};
use x25519_dalek::{PublicKey, StaticSecret};

const SIZES: [usize; 2] = [1400, 4096];
/// Frames sealed ahead of each timed open batch.
const OPEN_BATCH: usize = 1024;

fn budget() -> Duration {
    let secs = std::env::var("PILOT_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0);
    Duration::from_secs_f64(secs)
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn pair() -> (Session, Session) {
    let a = StaticSecret::random_from_rng(OsRng);
    let b = StaticSecret::random_from_rng(OsRng);
    (
        Session::new(1, &a, &PublicKey::from(&b).to_bytes(), &mut OsRng).unwrap(),
        Session::new(2, &b, &PublicKey::from(&a).to_bytes(), &mut OsRng).unwrap(),
    )
}

/// Runs `f` (which processes one packet and returns its size) until the budget is spent.
fn timed(budget: Duration, mut f: impl FnMut() -> usize) -> (usize, Duration) {
    let start = Instant::now();
    let mut bytes = 0;
    loop {
        for _ in 0..64 {
            bytes += f();
        }
        let e = start.elapsed();
        if e >= budget {
            return (bytes, e);
        }
    }
}

fn raw_cipher() -> Aes256Gcm {
    Aes256Gcm::new(&[7u8; 32].into())
}

fn bench_seal(size: usize, budget: Duration) -> (f64, f64) {
    let (mut tx, _) = pair();
    let mut buf = vec![0xA5u8; size + ENCRYPTED_OVERHEAD];
    let (b, d) = timed(budget, || {
        black_box(tx.seal(black_box(&mut buf), size).unwrap());
        size
    });
    let ours = mbps(b, d);

    let cipher = raw_cipher();
    let mut raw = vec![0xA5u8; size];
    let mut counter = 0u64;
    let (b, d) = timed(budget, || {
        counter += 1;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&counter.to_be_bytes());
        let tag = cipher
            .encrypt_inout_detached((&nonce).into(), b"", black_box(&mut raw[..]).into())
            .unwrap();
        black_box(tag);
        size
    });
    (ours, mbps(b, d))
}

fn bench_open(size: usize, budget: Duration) -> (f64, f64) {
    let (mut tx, mut rx) = pair();
    let frame_len = size + ENCRYPTED_OVERHEAD;
    let mut batch = vec![0u8; frame_len * OPEN_BATCH];
    let mut spent = Duration::ZERO;
    let mut bytes = 0;
    while spent < budget {
        for f in batch.chunks_exact_mut(frame_len) {
            f[ENCRYPTED_HEADER_LEN..ENCRYPTED_HEADER_LEN + size].fill(0x5A);
            tx.seal(f, size).unwrap();
        }
        let start = Instant::now();
        for f in batch.chunks_exact_mut(frame_len) {
            black_box(rx.open(black_box(f)).unwrap());
        }
        spent += start.elapsed();
        bytes += size * OPEN_BATCH;
    }
    let ours = mbps(bytes, spent);

    // Raw decryption of the same batch shape, with fresh ciphertexts each round.
    let cipher = raw_cipher();
    let mut raw = vec![0u8; size * OPEN_BATCH];
    let mut tags = Vec::with_capacity(OPEN_BATCH);
    let mut spent = Duration::ZERO;
    let mut bytes = 0;
    let mut counter = 0u64;
    while spent < budget {
        tags.clear();
        let first = counter;
        for p in raw.chunks_exact_mut(size) {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_be_bytes());
            tags.push(
                cipher
                    .encrypt_inout_detached((&nonce).into(), b"", p.into())
                    .unwrap(),
            );
        }
        let start = Instant::now();
        for (i, (p, tag)) in raw.chunks_exact_mut(size).zip(&tags).enumerate() {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&(first + 1 + i as u64).to_be_bytes());
            cipher
                .decrypt_inout_detached((&nonce).into(), b"", black_box(p).into(), tag)
                .unwrap();
        }
        spent += start.elapsed();
        bytes += size * OPEN_BATCH;
    }
    (ours, mbps(bytes, spent))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this once in test mode.
    let test_mode = !std::env::args().any(|a| a == "--bench");
    let budget = if test_mode {
        Duration::from_millis(20)
    } else {
        budget()
    };
    println!(
        "tunnel crypto, one core, {:.1} s per measurement{}",
        budget.as_secs_f64(),
        if test_mode { " (test mode)" } else { "" }
    );
    println!(
        "{:<6} {:>7} {:>12} {:>16} {:>8}",
        "op", "bytes", "session MB/s", "raw AES-GCM MB/s", "ratio"
    );
    for size in SIZES {
        let (ours, raw) = bench_seal(size, budget);
        println!(
            "{:<6} {:>7} {:>12.1} {:>16.1} {:>8.3}",
            "seal",
            size,
            ours,
            raw,
            ours / raw
        );
        let (ours, raw) = bench_open(size, budget);
        println!(
            "{:<6} {:>7} {:>12.1} {:>16.1} {:>8.3}",
            "open",
            size,
            ours,
            raw,
            ours / raw
        );
    }
}

//! Decoding and opening hostile secure-channel records (v1 wire §8.5): no panic, the decoder
//! walks any byte stream without reading out of bounds, nothing opens (the fuzzer cannot forge
//! a tag), and the opener still opens genuine records afterwards.
#![no_main]
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use tunnel::secure::{decode, establish, Decoded, Opener, Role, Sealer, RECORD_OVERHEAD};
use x25519_dalek::{PublicKey, StaticSecret};

/// One client sealer and one server opener for the whole run.
fn halves() -> &'static Mutex<(Sealer, Opener)> {
    static H: OnceLock<Mutex<(Sealer, Opener)>> = OnceLock::new();
    H.get_or_init(|| {
        let c = StaticSecret::from([1u8; 32]);
        let s = StaticSecret::from([2u8; 32]);
        let (tx, _) = establish(Role::Client, &c, &PublicKey::from(&s).to_bytes()).unwrap();
        let (_, rx) = establish(Role::Server, &s, &PublicKey::from(&c).to_bytes()).unwrap();
        Mutex::new((tx, rx))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut guard = halves().lock().unwrap();
    let (tx, rx) = &mut *guard;

    // Walk the input as a stream of records, as a receiver would.
    let mut buf = data.to_vec();
    let mut pos = 0;
    while let Ok(Decoded::Complete { len }) = decode(&buf[pos..]) {
        assert!(len >= RECORD_OVERHEAD && pos + len <= buf.len());
        let mut out = vec![0u8; len];
        assert!(rx.open(&buf[pos..pos + len], &mut out).is_err());
        assert!(rx.open_in_place(&mut buf[pos..pos + len]).is_err());
        pos += len;
    }
    // The whole input as one record, with any length field.
    let mut whole = data.to_vec();
    assert!(rx.open_in_place(&mut whole).is_err());

    let mut rec = [0u8; RECORD_OVERHEAD + 5];
    let n = tx.seal(b"hello", &mut rec).unwrap();
    assert_eq!(rx.open_in_place(&mut rec[..n]).unwrap(), b"hello");
});

//! Opening hostile PILS frames: no panic, never accepted (the fuzzer cannot forge a tag), and
//! the session still opens genuine traffic afterwards.
#![no_main]
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use rand_core::OsRng;
use tunnel::crypto::Session;
use tunnel::wire::frame::{ENCRYPTED_HEADER_LEN, ENCRYPTED_OVERHEAD};
use x25519_dalek::{PublicKey, StaticSecret};

/// One sender and one receiver for the whole run (key agreement per input would dominate).
fn sessions() -> &'static Mutex<(Session, Session)> {
    static S: OnceLock<Mutex<(Session, Session)>> = OnceLock::new();
    S.get_or_init(|| {
        let a = StaticSecret::from([1u8; 32]);
        let b = StaticSecret::from([2u8; 32]);
        let tx = Session::new(1, &a, &PublicKey::from(&b).to_bytes(), &mut OsRng).unwrap();
        let rx = Session::new(2, &b, &PublicKey::from(&a).to_bytes(), &mut OsRng).unwrap();
        Mutex::new((tx, rx))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut guard = sessions().lock().unwrap();
    let (tx, rx) = &mut *guard;
    let mut hostile = data.to_vec();
    assert!(rx.open(&mut hostile).is_err());
    let mut buf = [0u8; ENCRYPTED_OVERHEAD + 5];
    buf[ENCRYPTED_HEADER_LEN..ENCRYPTED_HEADER_LEN + 5].copy_from_slice(b"hello");
    let n = tx.seal(&mut buf, 5).unwrap();
    assert_eq!(rx.open(&mut buf[..n]).unwrap(), b"hello");
});

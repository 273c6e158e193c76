//! Signed Discover: parsing and proof verification never panic on any input; a parsed signed
//! Discover re-emits to the same 77 bytes; a proof that verifies under the fuzzed key still
//! verifies after a round trip and fails for any other node.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel::wire::beacon::{BeaconMessage, SIGNED_DISCOVER_LEN};

fuzz_target!(|data: &[u8]| {
    // The first 32 bytes are a candidate public key, the rest the datagram.
    let Some((key, msg)) = data.split_first_chunk::<32>() else {
        return;
    };
    let Ok(m) = BeaconMessage::parse(msg) else {
        return;
    };
    let BeaconMessage::Discover { node, proof } = m else {
        return;
    };
    let Some(proof) = proof else {
        assert_ne!(msg.len(), SIGNED_DISCOVER_LEN);
        return;
    };
    assert_eq!(msg.len(), SIGNED_DISCOVER_LEN);
    let mut out = [0u8; SIGNED_DISCOVER_LEN];
    assert_eq!(m.emit(&mut out), Ok(SIGNED_DISCOVER_LEN));
    assert_eq!(&out[..], msg);
    if proof.verify(node, key).is_ok() {
        assert!(proof.verify(node.wrapping_add(1), key).is_err());
    }
});

//! Beacon message parser: no panic; what parses re-emits to the same bytes (up to trailing
//! bytes, which fixed-size messages ignore).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel::wire::beacon::BeaconMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = BeaconMessage::parse(data) {
        let mut out = vec![0u8; m.buffer_len()];
        let n = m.emit(&mut out).unwrap();
        assert_eq!(BeaconMessage::parse(&out[..n]), Ok(m));
        let _ = m.sync_nodes().count();
    }
});

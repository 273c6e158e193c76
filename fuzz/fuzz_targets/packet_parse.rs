//! Packet header parser: no panic; a packet that parses re-emits to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel::wire::{Packet, PacketRepr};

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Packet::new_checked(data) else {
        return;
    };
    let Ok(repr) = PacketRepr::parse(&p) else {
        return;
    };
    let len = repr.buffer_len();
    let mut out = data[..len].to_vec();
    assert_eq!(repr.emit(&mut out), Ok(len));
    // Flags outside the low nibble do not exist, so byte 0 is reproduced exactly.
    assert_eq!(out, &data[..len]);
});

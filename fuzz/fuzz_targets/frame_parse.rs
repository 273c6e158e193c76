//! Tunnel frame demultiplexer and every view it hands out: no panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel::wire::frame::{AuthKeyExchangeRepr, Frame, KeyExchangeRepr};
use tunnel::wire::{Packet, PacketRepr};

fuzz_target!(|data: &[u8]| {
    match Frame::parse(data) {
        Ok(Frame::Plain(inner)) => {
            if let Ok(p) = Packet::new_checked(inner) {
                let _ = PacketRepr::parse(&p);
            }
        }
        Ok(Frame::KeyExchange(v)) => {
            let r = KeyExchangeRepr::parse(&v);
            assert_eq!(&r.to_bytes()[..], &data[..r.to_bytes().len()]);
        }
        Ok(Frame::AuthKeyExchange(v)) => {
            let r = AuthKeyExchangeRepr::parse(&v);
            assert_eq!(&r.to_bytes()[..], &data[..r.to_bytes().len()]);
        }
        Ok(Frame::Encrypted(v)) => {
            let _ = (v.node(), v.nonce(), v.counter(), v.plaintext_len());
        }
        Ok(Frame::Beacon(_)) | Ok(Frame::Punch) | Err(_) => {}
    }
});

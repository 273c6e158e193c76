//! The stream transport under hostile segments: each input is a sequence of records, each
//! turned into a checksum-valid packet (so the state machine, not the CRC, is exercised) and
//! fed to an endpoint holding a listener and an established connection. Nothing may panic,
//! and the connection's invariants must hold after every step.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tunnel::stream::{Endpoint, EndpointConfig, Incoming};
use tunnel::wire::{Flags, PacketRepr, Protocol, HEADER_LEN};
use tunnel::{Addr, SocketAddr};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut now = start;
    let us = Addr::new(0, 2);
    let peer = SocketAddr::new(Addr::new(0, 1), 49152);
    let mut ep = Endpoint::new(us, EndpointConfig::default());
    ep.listen(80, None).unwrap();
    let mut buf = vec![0u8; HEADER_LEN + 65_536];
    let mut out = vec![0u8; HEADER_LEN + 65_536];
    // Raw bytes go through the full parser too.
    let _ = ep.handle(now, data);
    let mut rest = data;
    while rest.len() >= 12 {
        let (rec, tail) = rest.split_at(12);
        let plen = usize::from(rec[11] & 0x3f).min(tail.len());
        let (payload, tail) = tail.split_at(plen);
        rest = tail;
        now += Duration::from_millis(u64::from(rec[10]));
        let repr = PacketRepr {
            flags: Flags::from_bits_truncate(rec[0]),
            protocol: if rec[1] & 1 == 0 { Protocol::Stream } else { Protocol::Datagram },
            src: peer,
            dst: SocketAddr::new(us, if rec[1] & 2 == 0 { 80 } else { 81 }),
            seq: u32::from_be_bytes([rec[2], rec[3], rec[4], rec[5]]),
            ack: u32::from_be_bytes([rec[6], rec[7], 0, rec[8]]),
            window: u16::from(rec[9]),
            payload_len: plen as u16,
        };
        let n = repr.emit_with_payload(&mut buf, payload).unwrap();
        if let Incoming::Stream(h) = ep.handle(now, &buf[..n]) {
            if let Some(mut c) = ep.connection(h) {
                let _ = c.write(payload);
                let mut sink = [0u8; 256];
                let _ = c.read(&mut sink);
                if let Some(t) = c.poll_timeout() {
                    if t <= now {
                        c.handle_timeout(now);
                    }
                }
                while let Some(m) = c.poll_transmit(now, &mut out) {
                    assert!(m >= HEADER_LEN);
                }
                let st = c.stats();
                assert!(st.bytes_in_flight <= c.unacked());
            }
        }
        while ep.poll_transmit(now, &mut out).is_some() {}
    }
});

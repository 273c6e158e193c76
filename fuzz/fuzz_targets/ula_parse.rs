//! ULA to Pilot address conversion: no panic, and accepted addresses map back exactly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel::ula;

fuzz_target!(|data: [u8; 16]| {
    let ip = std::net::Ipv6Addr::from(data);
    if let Ok(a) = ula::from_ipv6(ip) {
        assert_eq!(ula::to_ipv6(a), ip);
    }
});

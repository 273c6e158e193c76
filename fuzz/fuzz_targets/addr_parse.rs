//! Address and socket-address text parsers: no panic, and what parses prints back the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel::{Addr, SocketAddr};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(a) = s.parse::<Addr>() {
        assert_eq!(a.to_string().parse::<Addr>(), Ok(a));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        assert_eq!(sa.to_string().parse::<SocketAddr>(), Ok(sa));
    }
});

//! Nameserver requests and responses: no panic; what parses prints back to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel::services::nameserver::{parse_request, parse_request_bytes, parse_response};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request_bytes(data) {
        assert_eq!(parse_request(&req.to_line()), Ok(req));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(resp) = parse_response(text) {
            assert_eq!(parse_response(&resp.to_text()).ok(), Some(resp));
        }
    }
});

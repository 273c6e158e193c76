//! Data exchange frame header, FILE and FILE_STREAM payloads and the file-name sanitizer: no
//! panic; parsed parts re-encode to the same bytes; every sanitized name is one safe component.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pilotd::dataexchange::{sanitize_file_name, NAME_MAX};
use tunnel::services::dataexchange::{
    encode_file_prefix, encode_frame_header, encode_stream_header, parse_file_payload,
    parse_frame_header, parse_stream_header,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse_frame_header(data) {
        assert!(h.len <= h.kind.max_len());
        assert_eq!(&encode_frame_header(h.kind, h.len)[..], &data[..8]);
    }
    if let Ok((name, body)) = parse_file_payload(data) {
        if let Ok(p) = encode_file_prefix(name, body.len() as u64) {
            assert_eq!(&p[8..], &data[..2 + name.len()]);
        }
    }
    if let Ok((size, name)) = parse_stream_header(data) {
        if let Ok(frame) = encode_stream_header(name, size) {
            assert_eq!(&frame[8..], data);
        }
    }
    let name = sanitize_file_name(data);
    assert!(!name.is_empty() && name.len() <= NAME_MAX);
    assert!(!name.starts_with('.') && !name.contains(['/', '\\', '\0']));
    assert_eq!(std::path::Path::new(&name).components().count(), 1);
});

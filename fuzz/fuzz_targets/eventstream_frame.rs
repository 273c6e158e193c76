//! Event stream frames: no panic; what parses encodes back to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel::services::eventstream::{encode_frame, parse_frame};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((frame, used))) = parse_frame(data) {
        assert!(used <= data.len());
        assert_eq!(
            encode_frame(frame.topic, frame.payload).ok().as_deref(),
            data.get(..used)
        );
    }
});

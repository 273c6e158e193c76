//! Registry frame decoder and request parser: no panic on any byte stream; memory stays
//! bounded by one frame; every request that parses re-serializes to an equal request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel::registry::proto::{FrameDecoder, Request, LEN_PREFIX, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let mut d = FrameDecoder::new();
    for chunk in data.chunks(7) {
        d.push(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(body)) => {
                    assert!(body.len() <= MAX_FRAME);
                    if let Ok(r) = serde_json::from_slice::<Request>(&body) {
                        let again: Request =
                            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
                        assert_eq!(again, r);
                        let _ = r.challenge();
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(d.buffered() <= LEN_PREFIX + MAX_FRAME + 7);
    }
    // The whole input as one body, too.
    let _ = serde_json::from_slice::<Request>(data);
});

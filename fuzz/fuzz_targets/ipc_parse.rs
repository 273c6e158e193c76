//! IPC frame decoder and message parser: no panic on any byte stream; memory stays bounded by
//! one message; every message that parses re-encodes to a frame that parses equal; extension
//! and Info JSON bodies decode without panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel::ipc::{
    ExtReply, ExtRequest, FrameDecoder, FrameError, Info, Message, LEN_PREFIX, MAX_MESSAGE,
};

fn check(m: Message<'_>) {
    let mut wire = Vec::new();
    m.encode(&mut wire).expect("a parsed message fits in a frame");
    assert_eq!(wire.len(), LEN_PREFIX + 1 + m.payload_len());
    let mut d = FrameDecoder::new();
    d.push(&wire);
    assert_eq!(d.next_message(), Ok(Some(m)));
    assert_eq!(d.buffered(), 0);
    match m {
        Message::Ext { json } => {
            if let Ok(r) = ExtRequest::from_json(json) {
                assert_eq!(ExtRequest::from_json(&r.to_json()), Ok(r));
            }
        }
        Message::ExtOk { json } => {
            if let Ok(r) = ExtReply::from_json(json) {
                let _ = ExtReply::from_json(&r.to_json());
            }
        }
        Message::InfoOk { json } => {
            let _ = serde_json::from_slice::<Info>(json);
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so frames split at every boundary.
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split % 16) + 1;
    let mut d = FrameDecoder::new();
    'stream: for piece in stream.chunks(chunk) {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(Some((cmd, payload))) => {
                    assert!(payload.len() < MAX_MESSAGE);
                    if let Ok(m) = Message::parse(cmd, payload) {
                        assert_eq!(m.cmd(), cmd);
                        check(m);
                    }
                }
                Ok(None) => break,
                Err(FrameError::Empty) => {}
                Err(FrameError::TooLarge(_)) => break 'stream,
            }
        }
        assert!(d.buffered() <= LEN_PREFIX + MAX_MESSAGE + chunk);
    }
    // The whole input as one payload under every command byte, too.
    for cmd in 0..=u8::MAX {
        if let Ok(m) = Message::parse(cmd, stream) {
            check(m);
        }
    }
});

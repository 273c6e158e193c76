//! Event stream codec (virtual port 1002, v1 wire §8.3), sans-IO: the publish/subscribe
//! frame. The broker is `pilotd::eventstream`; the client calls are
//! `pilot_driver::services::eventstream`.
//!
//! # Frame
//!
//! ```text
//!  0       2               2+T      6+T
//! +-------+---------------+--------+------------------------+
//! | T u16 | topic (T B)   | P u32  | payload (P bytes)      |
//! +-------+---------------+--------+------------------------+
//! ```
//!
//! Both lengths are big-endian. `T` is at most [`MAX_TOPIC`] (1024) and `P` at most
//! [`MAX_PAYLOAD`] (16 MiB); a longer length is refused as soon as it is read, before
//! anything is allocated for it. The topic must be UTF-8.
//!
//! On a connection to the broker the first frame is the subscription (its topic is kept,
//! its payload discarded; topic [`WILDCARD`] subscribes to every topic) and every later
//! frame is published.

use std::io;

// ---------------------------------------------------------------------------------------
// Wire constants (v1 wire §8.3)

/// The event stream port.
pub const EVENT_STREAM_PORT: u16 = crate::addr::port::EVENT_STREAM;
/// Longest topic, in bytes.
pub const MAX_TOPIC: usize = 1024;
/// Largest payload, in bytes (16 MiB).
pub const MAX_PAYLOAD: usize = 16 << 20;
/// The topic that subscribes to every topic.
pub const WILDCARD: &str = "*";

/// Bytes before the topic: its u16 length.
pub const TOPIC_LEN_BYTES: usize = 2;
/// Bytes between topic and payload: the u32 payload length.
pub const PAYLOAD_LEN_BYTES: usize = 4;

// ---------------------------------------------------------------------------------------
// Codec

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The topic length is over [`MAX_TOPIC`].
    #[error("topic of {0} bytes is over the {MAX_TOPIC}-byte limit")]
    TopicTooLong(usize),
    /// The payload length is over [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLarge(u64),
    /// The topic is not UTF-8.
    #[error("topic is not UTF-8")]
    TopicNotUtf8,
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The frame's body did not arrive in time.
    #[error("frame body did not arrive in time")]
    Timeout,
    /// Reading or writing the stream failed.
    #[error("stream: {0}")]
    Io(#[from] io::Error),
}

impl FrameError {
    /// The error of a read that failed inside a frame: an early end of stream is
    /// [`FrameError::Truncated`], anything else [`FrameError::Io`].
    pub fn inside_frame(e: io::Error) -> FrameError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    }
}

/// One decoded frame, borrowing from the bytes it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The topic.
    pub topic: &'a str,
    /// The payload.
    pub payload: &'a [u8],
}

/// Checks a topic length read from the wire.
pub fn check_topic_len(len: usize) -> Result<(), FrameError> {
    if len > MAX_TOPIC {
        return Err(FrameError::TopicTooLong(len));
    }
    Ok(())
}

/// Checks a payload length read from the wire.
pub fn check_payload_len(len: u64) -> Result<usize, FrameError> {
    match usize::try_from(len) {
        Ok(n) if n <= MAX_PAYLOAD => Ok(n),
        _ => Err(FrameError::PayloadTooLarge(len)),
    }
}

/// Parses one frame from the start of `buf`: `Ok(None)` when more bytes are needed,
/// otherwise the frame and the number of bytes it took. Lengths are checked before the
/// bytes they announce are needed, so an oversize frame is refused from its header alone.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some(&[t0, t1]) = buf.get(..TOPIC_LEN_BYTES) else {
        return Ok(None);
    };
    let topic_len = usize::from(u16::from_be_bytes([t0, t1]));
    check_topic_len(topic_len)?;
    let topic_end = TOPIC_LEN_BYTES + topic_len;
    let Some(&[p0, p1, p2, p3]) = buf.get(topic_end..topic_end + PAYLOAD_LEN_BYTES) else {
        return Ok(None);
    };
    let payload_len = check_payload_len(u64::from(u32::from_be_bytes([p0, p1, p2, p3])))?;
    let topic = buf
        .get(TOPIC_LEN_BYTES..topic_end)
        .ok_or(FrameError::Truncated)?;
    let topic = std::str::from_utf8(topic).map_err(|_| FrameError::TopicNotUtf8)?;
    let start = topic_end + PAYLOAD_LEN_BYTES;
    let end = start + payload_len;
    let Some(payload) = buf.get(start..end) else {
        return Ok(None);
    };
    Ok(Some((Frame { topic, payload }, end)))
}

/// Encodes a frame.
pub fn encode_frame(topic: &str, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut out = encode_frame_header(topic, payload.len())?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// The bytes of a frame before its payload.
pub fn encode_frame_header(topic: &str, payload_len: usize) -> Result<Vec<u8>, FrameError> {
    check_topic_len(topic.len())?;
    let payload_len_u32 = u32::try_from(payload_len)
        .ok()
        .filter(|&n| n as usize <= MAX_PAYLOAD)
        .ok_or(FrameError::PayloadTooLarge(payload_len as u64))?;
    let topic_len =
        u16::try_from(topic.len()).map_err(|_| FrameError::TopicTooLong(topic.len()))?;
    let mut out =
        Vec::with_capacity(TOPIC_LEN_BYTES + topic.len() + PAYLOAD_LEN_BYTES + payload_len);
    out.extend_from_slice(&topic_len.to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&payload_len_u32.to_be_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn golden_bytes_round_trip() {
        let f = encode_frame("ab", b"xyz").unwrap();
        assert_eq!(f, [0, 2, b'a', b'b', 0, 0, 0, 3, b'x', b'y', b'z']);
        let (frame, used) = parse_frame(&f).unwrap().unwrap();
        assert_eq!(used, f.len());
        assert_eq!(
            frame,
            Frame {
                topic: "ab",
                payload: b"xyz"
            }
        );
        for cut in 0..f.len() {
            assert!(parse_frame(&f[..cut]).unwrap().is_none(), "cut {cut}");
        }
    }

    #[test]
    fn oversize_lengths_are_refused_from_the_header() {
        let long = (MAX_TOPIC as u16 + 1).to_be_bytes();
        assert!(matches!(
            parse_frame(&long),
            Err(FrameError::TopicTooLong(1025))
        ));
        let mut big = vec![0, 1, b't'];
        big.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
        assert!(matches!(
            parse_frame(&big),
            Err(FrameError::PayloadTooLarge(_))
        ));
        assert!(encode_frame(&"x".repeat(MAX_TOPIC + 1), b"").is_err());
        assert!(matches!(
            parse_frame(&[0, 1, 0xFF, 0, 0, 0, 0]),
            Err(FrameError::TopicNotUtf8)
        ));
    }
}

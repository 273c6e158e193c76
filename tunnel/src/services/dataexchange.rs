//! Data exchange codec (virtual port 1001, v1 wire §8.2), sans-IO: frame headers, FILE and
//! FILE_STREAM payloads, and the message types. The daemon's server (`pilotd::dataexchange`)
//! and the client (`pilot_driver::services::dataexchange`) both build on it.
//!
//! # Frames
//!
//! ```text
//!  0                   4                   8
//! +-------------------+-------------------+------------------------+
//! | type (u32 BE)     | length (u32 BE)   | payload (length bytes) |
//! +-------------------+-------------------+------------------------+
//!
//! type 1 TEXT, 2 BINARY, 3 JSON: the payload is the message.
//! type 4 FILE:        payload = [u16 BE name_len][name][file bytes]
//! type 256 FILE_STREAM (extension, not in v1):
//!                     payload = [u64 BE size][u16 BE name_len][name]
//!                     then exactly `size` raw file bytes, not framed.
//! ```
//!
//! A payload is at most [`MAX_PAYLOAD`] (16 MiB) bytes; a FILE_STREAM payload at most
//! [`MAX_STREAM_HEADER`]. A sender uses FILE whenever the file fits one frame, so v1 peers
//! receive it; FILE_STREAM only for bigger files. A v1 peer answers a FILE_STREAM frame with
//! `ACK UNKNOWN(256) ...`, which the client reports before it sends the file bytes on.
//!
//! Every parser checks the announced length against the type's limit before anything is
//! allocated for it, and never panics on peer bytes.

use std::fmt;
use std::io;
use std::str::FromStr;

// ---------------------------------------------------------------------------------------
// Wire constants (v1 wire §8.2) and the extension

/// The data exchange port.
pub const DATA_PORT: u16 = 1001;
/// Frame header: type and length, both u32 big-endian.
pub const HEADER_LEN: usize = 8;
/// Largest payload of a v1 frame (v1: the reader rejects more than 2^24).
pub const MAX_PAYLOAD: u32 = 1 << 24;
/// v1 type TEXT.
pub const TYPE_TEXT: u32 = 1;
/// v1 type BINARY.
pub const TYPE_BINARY: u32 = 2;
/// v1 type JSON.
pub const TYPE_JSON: u32 = 3;
/// v1 type FILE.
pub const TYPE_FILE: u32 = 4;
/// Extension type FILE_STREAM: a file too big for one frame (see the module docs).
pub const TYPE_FILE_STREAM: u32 = 0x100;
/// Fixed part of a FILE_STREAM payload: u64 size and u16 name length.
pub const STREAM_HEADER_FIXED: usize = 10;
/// Largest FILE_STREAM payload (the longest name a u16 can announce).
pub const MAX_STREAM_HEADER: u32 = STREAM_HEADER_FIXED as u32 + u16::MAX as u32;

// ---------------------------------------------------------------------------------------
// Codec

/// A frame type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// 1: UTF-8 text.
    Text,
    /// 2: opaque bytes.
    Binary,
    /// 3: a JSON document.
    Json,
    /// 4: a named file in one frame.
    File,
    /// 256 (extension): a named file whose bytes follow the frame.
    FileStream,
    /// Any other code.
    Unknown(u32),
}

impl FrameType {
    /// The type of a wire code.
    pub fn from_code(code: u32) -> FrameType {
        match code {
            TYPE_TEXT => FrameType::Text,
            TYPE_BINARY => FrameType::Binary,
            TYPE_JSON => FrameType::Json,
            TYPE_FILE => FrameType::File,
            TYPE_FILE_STREAM => FrameType::FileStream,
            other => FrameType::Unknown(other),
        }
    }

    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            FrameType::Text => TYPE_TEXT,
            FrameType::Binary => TYPE_BINARY,
            FrameType::Json => TYPE_JSON,
            FrameType::File => TYPE_FILE,
            FrameType::FileStream => TYPE_FILE_STREAM,
            FrameType::Unknown(c) => c,
        }
    }

    /// Whether the type is a message stored in the inbox (TEXT, BINARY, JSON).
    pub fn is_message(self) -> bool {
        matches!(self, FrameType::Text | FrameType::Binary | FrameType::Json)
    }

    /// Largest payload the type may announce.
    pub fn max_len(self) -> u32 {
        match self {
            FrameType::FileStream => MAX_STREAM_HEADER,
            _ => MAX_PAYLOAD,
        }
    }
}

/// v1 names: `TEXT`, `BINARY`, `JSON`, `FILE`, `UNKNOWN(n)`; the extension prints as `FILE`.
impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameType::Text => f.write_str("TEXT"),
            FrameType::Binary => f.write_str("BINARY"),
            FrameType::Json => f.write_str("JSON"),
            FrameType::File | FrameType::FileStream => f.write_str("FILE"),
            FrameType::Unknown(c) => write!(f, "UNKNOWN({c})"),
        }
    }
}

/// A message type name that is not `text`, `json` or `binary`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a message type (text, json or binary)")]
pub struct BadMessageType(pub String);

/// Parses a message type as `pilotctl send-message --type` takes it (any case).
impl FromStr for FrameType {
    type Err = BadMessageType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(FrameType::Text),
            "json" => Ok(FrameType::Json),
            "binary" => Ok(FrameType::Binary),
            _ => Err(BadMessageType(s.to_owned())),
        }
    }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The type.
    pub kind: FrameType,
    /// The payload length, within [`FrameType::max_len`].
    pub len: u32,
}

/// A whole frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The type.
    pub kind: FrameType,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Why bytes are not a valid frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the part needs.
    #[error("truncated: {need} bytes needed, {got} present")]
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// A length over the type's limit.
    #[error("{kind} frame of {len} bytes is over the {max} byte limit")]
    TooLarge {
        /// The frame type.
        kind: FrameType,
        /// The announced length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A name length that does not match the payload.
    #[error("malformed {0} payload: the name length does not fit the payload")]
    BadName(FrameType),
    /// The connection failed or ended inside a frame.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Parses a frame header from the first [`HEADER_LEN`] bytes of `buf`, checking the length
/// against the type's limit.
pub fn parse_frame_header(buf: &[u8]) -> Result<FrameHeader, FrameError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Err(FrameError::Short {
            need: HEADER_LEN,
            got: buf.len(),
        });
    };
    let kind = FrameType::from_code(be_u32(&h[..4]));
    let len = be_u32(&h[4..]);
    if len > kind.max_len() {
        return Err(FrameError::TooLarge {
            kind,
            len: u64::from(len),
            max: u64::from(kind.max_len()),
        });
    }
    Ok(FrameHeader { kind, len })
}

/// A frame header's bytes.
pub fn encode_frame_header(kind: FrameType, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&kind.code().to_be_bytes());
    h[4..].copy_from_slice(&len.to_be_bytes());
    h
}

/// A whole frame's bytes; fails when the payload is over the type's limit.
pub fn encode_frame(kind: FrameType, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = check_len(kind, payload.len() as u64)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&encode_frame_header(kind, len));
    out.extend_from_slice(payload);
    Ok(out)
}

/// Splits a v1 FILE payload into name and file bytes.
pub fn parse_file_payload(payload: &[u8]) -> Result<(&[u8], &[u8]), FrameError> {
    let Some(n) = payload.get(..2) else {
        return Err(FrameError::Short {
            need: 2,
            got: payload.len(),
        });
    };
    let name_len = usize::from(be_u16(n));
    let rest = &payload[2..];
    match (rest.get(..name_len), rest.get(name_len..)) {
        (Some(name), Some(data)) => Ok((name, data)),
        _ => Err(FrameError::BadName(FrameType::File)),
    }
}

/// The bytes that start a v1 FILE frame of a `size`-byte file: header, name length, name.
/// The file bytes follow.
pub fn encode_file_prefix(name: &[u8], size: u64) -> Result<Vec<u8>, FrameError> {
    let name_len = name_len_u16(name)?;
    let len = check_len(FrameType::File, 2 + name.len() as u64 + size)?;
    let mut out = Vec::with_capacity(HEADER_LEN + 2 + name.len());
    out.extend_from_slice(&encode_frame_header(FrameType::File, len));
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(name);
    Ok(out)
}

/// Splits a FILE_STREAM payload into the file size and name; the payload must be exactly
/// that long.
pub fn parse_stream_header(payload: &[u8]) -> Result<(u64, &[u8]), FrameError> {
    let Some(fixed) = payload.get(..STREAM_HEADER_FIXED) else {
        return Err(FrameError::Short {
            need: STREAM_HEADER_FIXED,
            got: payload.len(),
        });
    };
    let size = u64::from_be_bytes(fixed[..8].try_into().unwrap_or([0; 8]));
    let name_len = usize::from(be_u16(&fixed[8..]));
    let name = &payload[STREAM_HEADER_FIXED..];
    if name.len() != name_len {
        return Err(FrameError::BadName(FrameType::FileStream));
    }
    Ok((size, name))
}

/// A whole FILE_STREAM frame for a `size`-byte file; the raw file bytes follow it.
pub fn encode_stream_header(name: &[u8], size: u64) -> Result<Vec<u8>, FrameError> {
    let name_len = name_len_u16(name)?;
    let mut payload = Vec::with_capacity(STREAM_HEADER_FIXED + name.len());
    payload.extend_from_slice(&size.to_be_bytes());
    payload.extend_from_slice(&name_len.to_be_bytes());
    payload.extend_from_slice(name);
    encode_frame(FrameType::FileStream, &payload)
}

/// Checks a payload length against the type's limit: the length as the header carries it.
pub fn check_len(kind: FrameType, len: u64) -> Result<u32, FrameError> {
    match u32::try_from(len) {
        Ok(l) if l <= kind.max_len() => Ok(l),
        _ => Err(FrameError::TooLarge {
            kind,
            len,
            max: u64::from(kind.max_len()),
        }),
    }
}

fn name_len_u16(name: &[u8]) -> Result<u16, FrameError> {
    u16::try_from(name.len()).map_err(|_| FrameError::TooLarge {
        kind: FrameType::File,
        len: name.len() as u64,
        max: u64::from(u16::MAX),
    })
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap_or([0; 4]))
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().unwrap_or([0; 2]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn golden_frames() {
        assert_eq!(
            encode_frame(FrameType::Text, b"hi").unwrap(),
            [0, 0, 0, 1, 0, 0, 0, 2, b'h', b'i']
        );
        assert_eq!(
            encode_file_prefix(b"a.txt", 3).unwrap(),
            [0, 0, 0, 4, 0, 0, 0, 10, 0, 5, b'a', b'.', b't', b'x', b't']
        );
        assert_eq!(
            encode_stream_header(b"b", 0x1_0000_0001).unwrap(),
            [0, 0, 1, 0, 0, 0, 0, 11, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, b'b']
        );
        let h = parse_frame_header(&[0, 0, 0, 3, 0, 1, 0, 0, 9]).unwrap();
        assert_eq!(
            h,
            FrameHeader {
                kind: FrameType::Json,
                len: 65536
            }
        );
        assert_eq!(FrameType::Unknown(9).to_string(), "UNKNOWN(9)");
        assert_eq!("Binary".parse::<FrameType>().unwrap(), FrameType::Binary);
        assert!("file".parse::<FrameType>().is_err());
    }

    #[test]
    fn header_limits() {
        assert!(matches!(
            parse_frame_header(&[0, 0, 0, 1, 0, 0, 0]),
            Err(FrameError::Short { need: 8, got: 7 })
        ));
        let at_limit = encode_frame_header(FrameType::Binary, MAX_PAYLOAD);
        assert_eq!(parse_frame_header(&at_limit).unwrap().len, MAX_PAYLOAD);
        let mut over = at_limit;
        over[7] = 1;
        assert!(matches!(
            parse_frame_header(&over),
            Err(FrameError::TooLarge { len, .. }) if len == u64::from(MAX_PAYLOAD) + 1
        ));
        let stream = encode_frame_header(FrameType::FileStream, MAX_STREAM_HEADER + 1);
        assert!(parse_frame_header(&stream).is_err());
        assert!(encode_frame(FrameType::Text, &vec![0; MAX_PAYLOAD as usize + 1]).is_err());
    }

    #[test]
    fn file_payloads() {
        assert_eq!(
            parse_file_payload(&[0, 2, b'a', b'b', 1, 2]).unwrap(),
            (&b"ab"[..], &[1u8, 2][..])
        );
        assert_eq!(parse_file_payload(&[0, 0]).unwrap(), (&b""[..], &b""[..]));
        assert!(matches!(
            parse_file_payload(&[0, 3, b'a']),
            Err(FrameError::BadName(_))
        ));
        assert!(parse_file_payload(&[0]).is_err());
        let frame = encode_stream_header(b"name", 42).unwrap();
        assert_eq!(
            parse_stream_header(&frame[8..]).unwrap(),
            (42, &b"name"[..])
        );
        assert!(parse_stream_header(&frame[8..frame.len() - 1]).is_err());
        assert!(parse_stream_header(&[0; 9]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn headers_parse_without_panic(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32)) {
            if let Ok(h) = parse_frame_header(&raw) {
                proptest::prop_assert!(h.len <= h.kind.max_len());
                proptest::prop_assert_eq!(&encode_frame_header(h.kind, h.len)[..], &raw[..8]);
            }
            // The checks of the fuzz target.
            if let Ok((name, body)) = parse_file_payload(&raw) {
                let p = encode_file_prefix(name, body.len() as u64).unwrap();
                proptest::prop_assert_eq!(&p[8..], &raw[..2 + name.len()]);
            }
            if let Ok((size, name)) = parse_stream_header(&raw) {
                let frame = encode_stream_header(name, size).unwrap();
                proptest::prop_assert_eq!(&frame[8..], &raw[..]);
            }
        }

        #[test]
        fn payloads_round_trip(
            name in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            size in proptest::prelude::any::<u64>(),
        ) {
            let mut frame = encode_file_prefix(&name, body.len() as u64).unwrap();
            frame.extend_from_slice(&body);
            let h = parse_frame_header(&frame).unwrap();
            proptest::prop_assert_eq!((h.kind, h.len as usize), (FrameType::File, frame.len() - 8));
            proptest::prop_assert_eq!(parse_file_payload(&frame[8..]).unwrap(), (&name[..], &body[..]));
            let frame = encode_stream_header(&name, size).unwrap();
            let h = parse_frame_header(&frame).unwrap();
            proptest::prop_assert_eq!(h.kind, FrameType::FileStream);
            proptest::prop_assert_eq!(parse_stream_header(&frame[8..]).unwrap(), (size, &name[..]));
        }
    }
}

//! Data exchange client (virtual port 1001, v1 wire §8.2): send typed messages and files
//! to a peer's data exchange service over any stream (a [`crate::PilotStream`] in practice),
//! and the async frame reader and writer the daemon's server shares.
//!
//! The frame codec itself is sans-IO and lives in [`tunnel::services::dataexchange`]. A
//! sender uses FILE whenever the file fits one frame, so v1 peers receive it; FILE_STREAM
//! only for bigger files. A v1 peer answers a FILE_STREAM frame with
//! `ACK UNKNOWN(256) ...`, which [`send_file`] reports as [`SendError::Unsupported`] before
//! it sends the file bytes on.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tunnel::services::dataexchange::{
    check_len, encode_file_prefix, encode_frame_header, encode_stream_header, parse_frame_header,
    Frame, FrameError, FrameType, HEADER_LEN, MAX_PAYLOAD,
};

pub use tunnel::services::dataexchange::DATA_PORT;

/// Largest reply frame a client accepts.
pub const MAX_REPLY: u32 = 64 * 1024;
/// How long a client waits for the peer's reason after its upload failed.
pub const REPLY_GRACE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Frames over a stream

/// Reads one frame whose payload is at most `max` bytes (and within its type's limit);
/// `None` at a clean end of stream before the header. A length over the limit is refused
/// before anything is allocated, and the payload buffer grows only as bytes arrive.
pub async fn read_frame<R>(r: &mut R, max: u32) -> Result<Option<Frame>, FrameError>
where
    R: AsyncRead + Unpin,
{
    let mut h = [0u8; HEADER_LEN];
    if !read_header(r, &mut h).await? {
        return Ok(None);
    }
    let header = parse_frame_header(&h)?;
    if header.len > max {
        return Err(FrameError::TooLarge {
            kind: header.kind,
            len: u64::from(header.len),
            max: u64::from(max),
        });
    }
    let payload = read_payload(r, header.len).await?;
    Ok(Some(Frame {
        kind: header.kind,
        payload,
    }))
}

/// Writes one frame and flushes.
pub async fn write_frame<W>(w: &mut W, kind: FrameType, payload: &[u8]) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
{
    let len = check_len(kind, payload.len() as u64)?;
    w.write_all(&encode_frame_header(kind, len)).await?;
    w.write_all(payload).await?;
    w.flush().await?;
    Ok(())
}

/// Fills `h`; `false` at end of stream before its first byte.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R, h: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < h.len() {
        let Some(rest) = h.get_mut(got..) else { break };
        let n = r.read(rest).await?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

/// Reads exactly `len` bytes, growing the buffer only as they arrive.
pub async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: u32) -> io::Result<Vec<u8>> {
    let len = u64::from(len);
    let mut payload = Vec::with_capacity(usize::try_from(len.min(64 * 1024)).unwrap_or(0));
    (&mut *r).take(len).read_to_end(&mut payload).await?;
    if (payload.len() as u64) < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(payload)
}

// ---------------------------------------------------------------------------------------
// Client

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Bad arguments (type, size, name length).
    #[error("{0}")]
    Invalid(String),
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The file could not be read (or ended early); the connection is mid-frame.
    #[error("reading the file: {0}")]
    File(io::Error),
    /// The peer answered `ERR ...` (the whole reply).
    #[error("peer refused: {0}")]
    Refused(String),
    /// The peer does not know FILE_STREAM (a v1 peer); files over 16 MiB cannot go to it.
    #[error("the peer does not accept files over 16 MiB (it answered {0:?})")]
    Unsupported(String),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Sends one message (TEXT, JSON or BINARY) and returns the peer's `ACK ...` reply.
pub async fn send_message<S>(
    stream: &mut S,
    kind: FrameType,
    data: &[u8],
) -> Result<String, SendError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !kind.is_message() {
        return Err(SendError::Invalid(format!("{kind} is not a message type")));
    }
    write_frame(stream, kind, data).await.map_err(|e| match e {
        FrameError::Io(e) => SendError::Io(e),
        other => SendError::Invalid(other.to_string()),
    })?;
    read_reply(stream).await
}

/// Sends a file of `size` bytes read from `reader` under `name`, calling `progress` with
/// the bytes sent so far; returns the peer's `ACK ...` reply. A file that fits one v1
/// frame goes as FILE, a bigger one as FILE_STREAM. The peer's reply is read while the file
/// is sent, so a refusal stops the upload early. `reader` must yield at least `size` bytes;
/// after an error the stream is mid-frame and must be dropped.
pub async fn send_file<S, R, P>(
    stream: &mut S,
    name: &str,
    mut reader: R,
    size: u64,
    mut progress: P,
) -> Result<String, SendError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
    P: FnMut(u64),
{
    let invalid = |e: FrameError| SendError::Invalid(e.to_string());
    let head = if 2 + name.len() as u64 + size <= u64::from(MAX_PAYLOAD) {
        encode_file_prefix(name.as_bytes(), size).map_err(invalid)?
    } else {
        encode_stream_header(name.as_bytes(), size).map_err(invalid)?
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Err(Ok(e)): the file failed to read; Err(Err(e)): the connection failed.
    let upload = async {
        wr.write_all(&head).await.map_err(Err)?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < size {
            let want = usize::try_from(size - sent).map_or(buf.len(), |l| l.min(buf.len()));
            let Some(chunk) = buf.get_mut(..want) else {
                break;
            };
            let n = reader.read(chunk).await.map_err(Ok)?;
            if n == 0 {
                return Err(Ok(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ended after {sent} of {size} bytes"),
                )));
            }
            wr.write_all(chunk.get(..n).unwrap_or_default())
                .await
                .map_err(Err)?;
            sent += n as u64;
            progress(sent);
        }
        wr.flush().await.map_err(Err)?;
        Ok::<_, Result<io::Error, io::Error>>(())
    };
    let reply = read_reply(&mut rd);
    tokio::pin!(upload, reply);
    tokio::select! {
        r = &mut reply => match r {
            Ok(ack) => Err(SendError::Protocol(format!("reply before the file was sent: {ack}"))),
            Err(e) => Err(e),
        },
        w = &mut upload => match w {
            Ok(()) => reply.await,
            Err(Ok(e)) => Err(SendError::File(e)),
            // The peer may have said why it stopped reading.
            Err(Err(e)) => match tokio::time::timeout(REPLY_GRACE, reply).await {
                Ok(Err(r @ (SendError::Refused(_) | SendError::Unsupported(_)))) => Err(r),
                _ => Err(SendError::Io(e)),
            },
        },
    }
}

/// Reads one reply frame: `Ok` for `ACK ...`, the matching error otherwise.
async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, SendError> {
    let frame = match read_frame(r, MAX_REPLY).await {
        Ok(Some(f)) => f,
        Ok(None) => {
            return Err(SendError::Protocol(
                "the peer closed the connection without a reply".into(),
            ))
        }
        Err(FrameError::Io(e)) => return Err(SendError::Io(e)),
        Err(e) => return Err(SendError::Protocol(e.to_string())),
    };
    if frame.kind != FrameType::Text {
        return Err(SendError::Protocol(format!("a {} reply", frame.kind)));
    }
    let text = String::from_utf8_lossy(&frame.payload).into_owned();
    if text.starts_with("ACK UNKNOWN(") {
        Err(SendError::Unsupported(text))
    } else if text.starts_with("ACK ") {
        Ok(text)
    } else if text.starts_with("ERR ") {
        Err(SendError::Refused(text))
    } else {
        Err(SendError::Protocol(format!("unexpected reply {text:?}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tunnel::services::dataexchange::{encode_frame, TYPE_FILE_STREAM};

    #[tokio::test]
    async fn read_frame_refuses_a_huge_length_without_reading_it() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF])
            .await
            .unwrap();
        assert!(matches!(
            read_frame(&mut b, MAX_PAYLOAD).await,
            Err(FrameError::TooLarge { .. })
        ));
        a.write_all(&encode_frame(FrameType::Text, &[7; 100]).unwrap())
            .await
            .unwrap();
        assert!(matches!(
            read_frame(&mut b, 99).await,
            Err(FrameError::TooLarge { len: 100, .. })
        ));
        drop(a);
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&encode_frame(FrameType::Json, b"{}").unwrap())
            .await
            .unwrap();
        a.write_all(&[0, 0, 0, 1, 0, 0, 0, 5, b'x']).await.unwrap();
        drop(a);
        let f = read_frame(&mut b, MAX_PAYLOAD).await.unwrap().unwrap();
        assert_eq!((f.kind, &f.payload[..]), (FrameType::Json, &b"{}"[..]));
        assert!(matches!(
            read_frame(&mut b, MAX_PAYLOAD).await,
            Err(FrameError::Io(_))
        ));
        let (a, mut b) = tokio::io::duplex(16);
        drop(a);
        assert!(read_frame(&mut b, MAX_PAYLOAD).await.unwrap().is_none());
    }

    /// The type name a v1 peer prints: it does not know FILE_STREAM.
    fn kind_v1(f: &Frame) -> String {
        match f.kind {
            FrameType::FileStream => format!("UNKNOWN({TYPE_FILE_STREAM})"),
            k => k.to_string(),
        }
    }

    #[tokio::test]
    async fn a_v1_peer_is_detected_before_a_big_file_is_sent() {
        // A peer that ACKs every frame as v1 does, unknown types included.
        let (mut c, mut s) = tokio::io::duplex(64 * 1024);
        let peer = tokio::spawn(async move {
            let f = read_frame(&mut s, MAX_PAYLOAD).await.unwrap().unwrap();
            let reply = format!("ACK {} {} bytes", kind_v1(&f), f.payload.len());
            write_frame(&mut s, FrameType::Text, reply.as_bytes())
                .await
                .unwrap();
            s
        });
        let size = u64::from(MAX_PAYLOAD) * 4;
        let e = send_file(&mut c, "big", tokio::io::repeat(0), size, |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SendError::Unsupported(t) if t == "ACK UNKNOWN(256) 13 bytes"),
            "{e}"
        );
        drop(peer);
    }
}

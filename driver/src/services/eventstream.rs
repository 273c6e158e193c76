//! Event stream client (virtual port 1002, v1 wire §8.3): subscribe to a peer's broker,
//! publish to it, and read the events it forwards, over any stream (a
//! [`crate::PilotStream`] in practice). The frame codec is
//! [`tunnel::services::eventstream`].
//!
//! The broker takes the first frame of a connection as its subscription and keeps the
//! subscription while the connection's sending side stays open: a subscriber calls
//! [`subscribe`], then [`next_event`] in a loop, and shuts its side down only when it is
//! done.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tunnel::services::eventstream::{
    check_payload_len, check_topic_len, encode_frame_header, FrameError,
};

pub use tunnel::services::eventstream::{EVENT_STREAM_PORT, WILDCARD};

/// Payload bytes the reader reserves at a time: memory follows what arrives, not what a
/// header announces.
const READ_CHUNK: usize = 64 * 1024;

/// Sends the subscription frame: the first frame on a fresh connection to port 1002.
/// Topic [`WILDCARD`] subscribes to everything.
pub async fn subscribe<S: AsyncWrite + Unpin>(
    stream: &mut S,
    topic: &str,
) -> Result<(), FrameError> {
    write_frame(stream, topic, &[]).await
}

/// Publishes one event. The broker takes the first frame of a connection as its
/// subscription, so a fresh connection calls [`subscribe`] first (v1's `pilotctl publish`
/// subscribes to the topic it publishes to).
pub async fn publish<S: AsyncWrite + Unpin>(
    stream: &mut S,
    topic: &str,
    payload: &[u8],
) -> Result<(), FrameError> {
    write_frame(stream, topic, payload).await
}

/// Reads the next event: `Ok(None)` when the stream ends cleanly between frames. Lengths
/// are checked as they are read, before the bytes they announce.
pub async fn next_event<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<(String, Vec<u8>)>, FrameError> {
    let first = match stream.read_u8().await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let second = stream.read_u8().await.map_err(FrameError::inside_frame)?;
    let topic_len = usize::from(u16::from_be_bytes([first, second]));
    check_topic_len(topic_len)?;
    let mut topic = vec![0u8; topic_len];
    stream
        .read_exact(&mut topic)
        .await
        .map_err(FrameError::inside_frame)?;
    let len = stream.read_u32().await.map_err(FrameError::inside_frame)?;
    let payload_len = check_payload_len(u64::from(len))?;
    let topic = String::from_utf8(topic).map_err(|_| FrameError::TopicNotUtf8)?;
    let mut payload = Vec::with_capacity(payload_len.min(READ_CHUNK));
    (&mut *stream)
        .take(payload_len as u64)
        .read_to_end(&mut payload)
        .await?;
    if payload.len() < payload_len {
        return Err(FrameError::Truncated);
    }
    Ok(Some((topic, payload)))
}

async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    topic: &str,
    payload: &[u8],
) -> Result<(), FrameError> {
    let header = encode_frame_header(topic, payload.len())?;
    stream.write_all(&header).await?;
    stream.write_all(payload).await?;
    stream.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tunnel::services::eventstream::encode_frame;

    #[tokio::test]
    async fn async_reader_matches_the_parser() {
        let mut wire = encode_frame("t", b"hello").unwrap();
        wire.extend(encode_frame("", b"").unwrap());
        let mut rd = &wire[..];
        assert_eq!(
            next_event(&mut rd).await.unwrap(),
            Some(("t".to_owned(), b"hello".to_vec()))
        );
        assert_eq!(
            next_event(&mut rd).await.unwrap(),
            Some((String::new(), vec![]))
        );
        assert!(next_event(&mut rd).await.unwrap().is_none());
        let cut = &encode_frame("t", b"hello").unwrap()[..7];
        let mut rd = cut;
        assert!(matches!(
            next_event(&mut rd).await,
            Err(FrameError::Truncated)
        ));
    }
}

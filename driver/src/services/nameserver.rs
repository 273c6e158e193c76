//! Nameserver client (virtual port 53, v1 wire §8.6): one request per connection, over any
//! stream (a [`crate::PilotStream`] to the peer's port 53 in practice). The line protocol is
//! [`tunnel::services::nameserver`].

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tunnel::services::nameserver::{
    parse_response, Request, Response, ResponseError, MAX_RESPONSE,
};

pub use tunnel::services::nameserver::NAMESERVER_PORT;

/// Why a query to a remote nameserver failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Writing or reading the stream failed.
    #[error("nameserver stream: {0}")]
    Io(#[from] std::io::Error),
    /// The response is longer than [`MAX_RESPONSE`].
    #[error("nameserver response over {MAX_RESPONSE} bytes")]
    TooLong,
    /// The response is not UTF-8 or does not parse.
    #[error("{0}")]
    Malformed(#[from] ResponseError),
}

/// Sends `req` on a fresh connection to a nameserver's port 53 and reads its response
/// (up to the end of the stream, at most [`MAX_RESPONSE`] bytes).
pub async fn query<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    req: &Request,
) -> Result<Response, ClientError> {
    let mut line = req.to_line();
    line.push('\n');
    stream.write_all(line.as_bytes()).await?;
    stream.flush().await?;
    let mut buf = Vec::new();
    (&mut *stream)
        .take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut buf)
        .await?;
    if buf.len() > MAX_RESPONSE {
        return Err(ClientError::TooLong);
    }
    let text = std::str::from_utf8(&buf).map_err(|_| ResponseError::new("not UTF-8"))?;
    Ok(parse_response(text)?)
}

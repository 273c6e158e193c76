//! The v1 secure channel (v1 wire §8.5, port 443) over any tokio byte stream: the I/O adapter
//! of the sans-IO [`tunnel::secure`].
//!
//! [`SecureStream::client`] and [`SecureStream::server`] run the handshake (the client sends
//! its ephemeral X25519 key first, the server answers with its own; 10 s deadline), then the
//! stream is an `AsyncRead + AsyncWrite` in which every write call becomes one record of at
//! most [`MAX_WRITE_PLAINTEXT`] bytes and reads return the plaintext of one record at a time.
//!
//! The channel is unauthenticated (anyone in the path can sit in the middle); Pilot tunnels
//! already seal every packet under identity-bound keys. It exists so v1 agents that use it
//! can talk to Rust agents.
//!
//! Invariants:
//! - Depends only on tokio, `tunnel` and std (plus `rand_core`/`x25519-dalek` for the
//!   ephemeral key), so it can live in an agent library unchanged.
//! - Input from the peer never panics: a bad record surfaces as an `io::Error` of kind
//!   `InvalidData` wrapping a [`ChannelError`]; after it every read fails
//!   ([`ChannelError::Broken`]), since the byte stream can no longer be trusted.
//! - Memory grows only with bytes the peer actually sent: a record's buffer grows as its
//!   bytes arrive, not from the length field alone (which may announce up to 16 MiB).
//! - A write's bytes are accepted once sealed; a record not yet fully written is pushed out
//!   by the next write, flush or shutdown.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use rand_core::OsRng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tunnel::secure::{
    self, Decoded, KeyError, OpenError, Opener, Role, SealError, Sealer, HANDSHAKE_TIMEOUT,
    PUBLIC_KEY_LEN, RECORD_HEADER_LEN, RECORD_OVERHEAD,
};
use x25519_dalek::{PublicKey, StaticSecret};

/// Largest plaintext one write call puts in a record; larger writes are accepted in part.
pub const MAX_WRITE_PLAINTEXT: usize = 64 * 1024;

/// Receive buffer kept between records (larger records grow it while they arrive).
const READ_BUF_LEN: usize = MAX_WRITE_PLAINTEXT + RECORD_OVERHEAD;

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The keys were not exchanged before the deadline.
    #[error("secure channel handshake timed out after {0:?}")]
    Timeout(Duration),
    /// Reading or writing a key failed (including the peer closing early).
    #[error("secure channel handshake I/O: {0}")]
    Io(#[from] io::Error),
    /// The peer's key cannot be used.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Why reading or writing the channel failed; carried inside the `io::Error` the
/// `AsyncRead`/`AsyncWrite` methods return (get it back with
/// `err.get_ref().and_then(|e| e.downcast_ref::<ChannelError>())`).
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A record from the peer was refused (framing, nonce or tag).
    #[error("secure channel record refused: {0}")]
    Open(#[from] OpenError),
    /// A record could not be sealed (the send counter is used up).
    #[error("secure channel cannot seal: {0}")]
    Seal(#[from] SealError),
    /// The peer closed the stream in the middle of a record.
    #[error("peer closed the stream inside a record ({have} of {needed} bytes)")]
    Truncated {
        /// Bytes of the record announced so far.
        needed: usize,
        /// Bytes received.
        have: usize,
    },
    /// An earlier read failed; the stream can no longer be read.
    #[error("secure channel unusable after an earlier receive error")]
    Broken,
}

impl ChannelError {
    fn into_io(self) -> io::Error {
        let kind = match self {
            ChannelError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

/// A byte stream wrapped in the v1 secure channel.
pub struct SecureStream<S> {
    io: S,
    role: Role,
    sealer: Sealer,
    opener: Opener,
    /// Received bytes: `rbuf[..filled]` are valid. While `plain` is non-empty it lies inside
    /// the opened record `rbuf[..record_len]`; the bytes after the record belong to the next.
    rbuf: Vec<u8>,
    filled: usize,
    record_len: usize,
    plain: Range<usize>,
    read_failed: bool,
    /// The sealed record being written: `wbuf[wpos..]` is still to go.
    wbuf: Vec<u8>,
    wpos: usize,
}

impl<S> std::fmt::Debug for SecureStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureStream")
            .field("role", &self.role)
            .field("sealer", &self.sealer)
            .field("opener", &self.opener)
            .field("buffered", &(self.filled, self.plain.len()))
            .field("unwritten", &(self.wbuf.len() - self.wpos))
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> SecureStream<S> {
    /// Dials: sends a fresh ephemeral key first, then reads the server's (10 s deadline).
    pub async fn client(io: S) -> Result<Self, HandshakeError> {
        let secret = StaticSecret::random_from_rng(OsRng);
        Self::handshake(io, Role::Client, secret, HANDSHAKE_TIMEOUT).await
    }

    /// Accepts: reads the client's key, then sends a fresh ephemeral key (10 s deadline).
    pub async fn server(io: S) -> Result<Self, HandshakeError> {
        let secret = StaticSecret::random_from_rng(OsRng);
        Self::handshake(io, Role::Server, secret, HANDSHAKE_TIMEOUT).await
    }

    /// The handshake with a given ephemeral secret and deadline ([`Self::client`] and
    /// [`Self::server`] draw the secret from the OS and use v1's 10 s). The secret must be
    /// fresh for every connection.
    pub async fn handshake(
        mut io: S,
        role: Role,
        secret: StaticSecret,
        timeout: Duration,
    ) -> Result<Self, HandshakeError> {
        let ours = PublicKey::from(&secret).to_bytes();
        let exchange = async {
            let mut theirs = [0u8; PUBLIC_KEY_LEN];
            if role.sends_key_first() {
                io.write_all(&ours).await?;
                io.flush().await?;
                io.read_exact(&mut theirs).await?;
            } else {
                io.read_exact(&mut theirs).await?;
                io.write_all(&ours).await?;
                io.flush().await?;
            }
            Ok::<_, io::Error>(theirs)
        };
        let theirs = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HandshakeError::Timeout(timeout))??;
        let (sealer, opener) = secure::establish(role, &secret, &theirs)?;
        Ok(SecureStream {
            io,
            role,
            sealer,
            opener,
            rbuf: vec![0; READ_BUF_LEN],
            filled: 0,
            record_len: 0,
            plain: 0..0,
            read_failed: false,
            wbuf: Vec::with_capacity(READ_BUF_LEN),
            wpos: 0,
        })
    }
}

impl<S> SecureStream<S> {
    /// Our role in the channel.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Gives back the underlying stream. Received plaintext not yet read and a record not yet
    /// fully written are lost.
    pub fn into_inner(self) -> S {
        self.io
    }

    /// Drops the delivered record from the front of the receive buffer.
    fn consume_record(&mut self) {
        let len = self.record_len;
        self.rbuf.copy_within(len..self.filled, 0);
        self.filled -= len;
        self.record_len = 0;
        self.plain = 0..0;
        // A large record grew the buffer; give the memory back once it is delivered.
        if self.rbuf.len() > 2 * READ_BUF_LEN && self.filled <= READ_BUF_LEN {
            self.rbuf.truncate(READ_BUF_LEN);
            self.rbuf.shrink_to_fit();
        }
    }

    fn fail_read(&mut self, e: ChannelError) -> io::Error {
        self.read_failed = true;
        e.into_io()
    }
}

impl<S: AsyncWrite + Unpin> SecureStream<S> {
    /// Writes out what remains of the pending record.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SecureStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.read_failed {
                return Poll::Ready(Err(ChannelError::Broken.into_io()));
            }
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                let start = this.plain.start;
                buf.put_slice(&this.rbuf[start..start + n]);
                this.plain.start += n;
                if this.plain.is_empty() {
                    this.consume_record();
                }
                return Poll::Ready(Ok(()));
            }
            if this.record_len > 0 {
                // An opened record with an empty plaintext (v1 sends one per empty write).
                this.consume_record();
            }
            match secure::decode(&this.rbuf[..this.filled]) {
                Err(e) => return Poll::Ready(Err(this.fail_read(OpenError::from(e).into()))),
                Ok(Decoded::Complete { len }) => {
                    match this.opener.open_in_place(&mut this.rbuf[..len]) {
                        Ok(plain) => {
                            this.plain = RECORD_HEADER_LEN..RECORD_HEADER_LEN + plain.len();
                            this.record_len = len;
                        }
                        Err(e) => return Poll::Ready(Err(this.fail_read(e.into()))),
                    }
                }
                Ok(Decoded::Partial { needed }) => {
                    if this.filled == this.rbuf.len() {
                        // Full and the record is longer (needed > filled): grow with what
                        // arrived, never straight to an announced 16 MiB.
                        let grow = needed.min(this.rbuf.len().saturating_mul(2));
                        this.rbuf.resize(grow, 0);
                    }
                    let mut rb = ReadBuf::new(&mut this.rbuf[this.filled..]);
                    ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        if this.filled == 0 {
                            return Poll::Ready(Ok(())); // clean end of stream
                        }
                        let have = this.filled;
                        return Poll::Ready(Err(
                            this.fail_read(ChannelError::Truncated { needed, have })
                        ));
                    }
                    this.filled += n;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SecureStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_WRITE_PLAINTEXT);
        this.wbuf.clear();
        this.wbuf.resize(n + RECORD_OVERHEAD, 0);
        this.wpos = 0;
        match this.sealer.seal(&buf[..n], &mut this.wbuf) {
            Ok(len) => this.wbuf.truncate(len),
            Err(e) => {
                this.wbuf.clear();
                return Poll::Ready(Err(ChannelError::Seal(e).into_io()));
            }
        }
        // The bytes are sealed and accepted; push the record now if the stream takes it,
        // otherwise the next write, flush or shutdown finishes it.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use tokio::io::{duplex, DuplexStream};
    use tunnel::secure::{RecordError, CLIENT_PREFIX};

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test vector is hex"))
            .collect()
    }

    async fn pair(buffer: usize) -> (SecureStream<DuplexStream>, SecureStream<DuplexStream>) {
        let (a, b) = duplex(buffer);
        let (c, s) = tokio::join!(SecureStream::client(a), SecureStream::server(b));
        (c.unwrap(), s.unwrap())
    }

    /// The raw side of a channel driven by hand with the sans-IO halves, standing in for a
    /// v1 client so tests can send records the adapter would never produce.
    async fn raw_client(io: &mut DuplexStream) -> (Sealer, Opener) {
        let secret = StaticSecret::from([7u8; 32]);
        io.write_all(PublicKey::from(&secret).as_bytes())
            .await
            .unwrap();
        let mut theirs = [0u8; 32];
        io.read_exact(&mut theirs).await.unwrap();
        secure::establish(Role::Client, &secret, &theirs).unwrap()
    }

    fn seal(sealer: &mut Sealer, pt: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; pt.len() + RECORD_OVERHEAD];
        let n = sealer.seal(pt, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn channel_error(e: &io::Error) -> &ChannelError {
        e.get_ref()
            .and_then(|e| e.downcast_ref::<ChannelError>())
            .expect("a ChannelError inside the io::Error")
    }

    #[tokio::test]
    async fn round_trip_both_ways() {
        let (mut c, mut s) = pair(4096).await;
        assert_eq!((c.role(), s.role()), (Role::Client, Role::Server));
        c.write_all(b"ping from client").await.unwrap();
        c.flush().await.unwrap();
        let mut buf = [0u8; 16];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping from client");
        s.write_all(b"pong").await.unwrap();
        s.write_all(b" from server").await.unwrap();
        s.flush().await.unwrap();
        let mut buf = [0u8; 16];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong from server");
        // Closing one side is a clean end of stream on the other.
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn large_transfer_hash_checked() {
        let (mut c, mut s) = pair(16 * 1024).await;
        let data: Vec<u8> = (0..3 * 1024 * 1024 + 17)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let want = Sha256::digest(&data);
        let writer = tokio::spawn(async move {
            c.write_all(&data).await.unwrap();
            c.shutdown().await.unwrap();
            c
        });
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 3 * 1024 * 1024 + 17);
        assert_eq!(Sha256::digest(&got), want);
        let c = writer.await.unwrap();
        // 64 KiB per record at most.
        assert_eq!(
            c.sealer.counter(),
            got.len().div_ceil(MAX_WRITE_PLAINTEXT) as u64
        );
    }

    #[tokio::test]
    async fn wire_bytes_match_golden_vectors() {
        // Vectors from tunnel/tests/vectors/secure_channel.py: the raw side plays a v1 client
        // with the script's client key; the adapter is the server with the script's key.
        let client_secret: [u8; 32] = core::array::from_fn(|i| 0x01 + i as u8);
        let server_secret: [u8; 32] = core::array::from_fn(|i| 0x41 + i as u8);
        let (mut raw, b) = duplex(4096);
        let server = tokio::spawn(SecureStream::handshake(
            b,
            Role::Server,
            StaticSecret::from(server_secret),
            HANDSHAKE_TIMEOUT,
        ));
        raw.write_all(PublicKey::from(&StaticSecret::from(client_secret)).as_bytes())
            .await
            .unwrap();
        let mut server_public = [0u8; 32];
        raw.read_exact(&mut server_public).await.unwrap();
        assert_eq!(
            server_public.to_vec(),
            unhex("64b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d48466")
        );
        let mut s = server.await.unwrap().unwrap();

        // Two v1 client records: a text and an empty one (v1 sends one per empty write).
        raw.write_all(&unhex("000000310000000200000000000000014d460dfc3d1e5448017736de984640b9312afc3e6cc2d84dac0f4a0ac0da17d6315b6a68c7")).await.unwrap();
        raw.write_all(&unhex(
            "0000001c000000020000000000000002923c118c7dafc0ce7c4b7d4e4eb50fb5",
        ))
        .await
        .unwrap();
        let mut buf = [0u8; 21];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello from the client");

        s.write_all(b"hello from the server").await.unwrap();
        s.flush().await.unwrap();
        let want = unhex("00000031000000010000000000000001087c53e53512501b2f57f9f98d65103decbf477d93f9d90988796eb914d1e57edf362c1637");
        let mut got = vec![0u8; want.len()];
        raw.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);

        // The empty record is skipped, not taken as end of stream.
        raw.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn large_v1_record_grows_then_shrinks_the_buffer() {
        // A v1 peer writes a whole 1 MiB buffer as one record.
        let (mut raw, b) = duplex(32 * 1024);
        let ((mut tx, _rx), s) = tokio::join!(raw_client(&mut raw), SecureStream::server(b));
        let mut s = s.unwrap();
        let big: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
        let mut wire = seal(&mut tx, &big);
        wire.extend_from_slice(&seal(&mut tx, b"tail"));
        let writer = tokio::spawn(async move {
            raw.write_all(&wire).await.unwrap();
            raw.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), big.len() + 4);
        assert_eq!(&got[..big.len()], &big[..]);
        assert_eq!(&got[big.len()..], b"tail");
        assert_eq!(s.rbuf.len(), READ_BUF_LEN);
    }

    #[tokio::test]
    async fn bad_length_is_a_clear_error() {
        let (mut raw, b) = duplex(4096);
        let (keys, s) = tokio::join!(raw_client(&mut raw), SecureStream::server(b));
        let mut s = s.unwrap();
        drop(keys);
        raw.write_all(&5u32.to_be_bytes()).await.unwrap();
        let mut buf = [0u8; 8];
        let err = s.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(matches!(
            channel_error(&err),
            ChannelError::Open(OpenError::Record(RecordError::TooShort(5)))
        ));
        let err = s.read(&mut buf).await.unwrap_err();
        assert!(matches!(channel_error(&err), ChannelError::Broken));
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_reading_the_body() {
        let (mut raw, b) = duplex(4096);
        let (_keys, s) = tokio::join!(raw_client(&mut raw), SecureStream::server(b));
        let mut s = s.unwrap();
        raw.write_all(&(16 * 1024 * 1024 + 1u32).to_be_bytes())
            .await
            .unwrap();
        let err = s.read(&mut [0u8; 8]).await.unwrap_err();
        assert!(matches!(
            channel_error(&err),
            ChannelError::Open(OpenError::Record(RecordError::TooLong(_)))
        ));
    }

    #[tokio::test]
    async fn corrupted_tag_is_a_clear_error() {
        let (mut raw, b) = duplex(4096);
        let ((mut tx, _rx), s) = tokio::join!(raw_client(&mut raw), SecureStream::server(b));
        let mut s = s.unwrap();
        let good = seal(&mut tx, b"first");
        let mut bad = seal(&mut tx, b"second");
        *bad.last_mut().unwrap() ^= 0x80;
        raw.write_all(&good).await.unwrap();
        raw.write_all(&bad).await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"first");
        let err = s.read(&mut [0u8; 8]).await.unwrap_err();
        assert!(matches!(
            channel_error(&err),
            ChannelError::Open(OpenError::Authentication)
        ));
    }

    #[tokio::test]
    async fn replayed_record_is_refused() {
        let (mut raw, b) = duplex(4096);
        let ((mut tx, _rx), s) = tokio::join!(raw_client(&mut raw), SecureStream::server(b));
        let mut s = s.unwrap();
        let rec = seal(&mut tx, b"once");
        raw.write_all(&rec).await.unwrap();
        raw.write_all(&rec).await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        let err = s.read(&mut [0u8; 8]).await.unwrap_err();
        assert!(matches!(
            channel_error(&err),
            ChannelError::Open(OpenError::Replayed {
                counter: 1,
                last: 1
            })
        ));
    }

    #[tokio::test]
    async fn eof_inside_a_record() {
        let (mut raw, b) = duplex(4096);
        let ((mut tx, _rx), s) = tokio::join!(raw_client(&mut raw), SecureStream::server(b));
        let mut s = s.unwrap();
        let rec = seal(&mut tx, b"cut short");
        assert_eq!(rec[4..8], CLIENT_PREFIX);
        raw.write_all(&rec[..rec.len() - 3]).await.unwrap();
        raw.shutdown().await.unwrap();
        let err = s.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(matches!(
            channel_error(&err),
            ChannelError::Truncated { needed, have } if *needed == rec.len() && *have == rec.len() - 3
        ));
    }

    #[tokio::test]
    async fn handshake_times_out() {
        let (_silent, b) = duplex(4096);
        let secret = StaticSecret::from([9u8; 32]);
        let limit = Duration::from_millis(50);
        let err = SecureStream::handshake(b, Role::Server, secret, limit)
            .await
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Timeout(d) if d == limit));
    }

    #[tokio::test]
    async fn handshake_peer_closes_or_sends_low_order_key() {
        let (a, b) = duplex(4096);
        drop(a);
        let err = SecureStream::client(b).await.unwrap_err();
        assert!(matches!(err, HandshakeError::Io(_)), "{err}");

        let (mut raw, b) = duplex(4096);
        raw.write_all(&[0u8; 32]).await.unwrap();
        let err = SecureStream::server(b).await.unwrap_err();
        assert!(matches!(
            err,
            HandshakeError::Key(KeyError::NonContributory)
        ));
    }
}

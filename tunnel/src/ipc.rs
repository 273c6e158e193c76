//! The local IPC protocol between the daemon and its clients (the driver library, `pilotctl`),
//! v1 wire §7: message framing, the typed command catalogue, the JSON bodies some replies
//! carry, and the JSON extension commands this implementation adds.
//!
//! This module is pure: bytes in, typed messages out, and back. The daemon's Unix-socket server
//! and the clients' connection code sit above it.
//!
//! # Framing (v1 wire §7.1), both directions
//!
//! ```text
//! +----------------+--------+------------------------------------+
//! | length u32 BE  | cmd u8 | payload, length - 1 bytes          |   1 <= length <= 1,048,576
//! +----------------+--------+------------------------------------+
//! ```
//!
//! The length covers the command byte and the payload. A length above [`MAX_MESSAGE`] cannot be
//! skipped safely, so the stream is lost; v1 drops the client, and so should a caller that gets
//! [`FrameError::TooLarge`]. A length of zero (no command byte) is [`FrameError::Empty`].
//!
//! # Payloads (v1 wire §7.2; integers big-endian, addresses as the 6 bytes of §1.1)
//!
//! ```text
//! 0x01 Bind            [u16 port]
//! 0x02 BindOk          [u16 port]
//! 0x03 Dial            [6 addr][u16 port]
//! 0x04 DialOk          [u32 conn]
//! 0x05 Accept          [u16 local port][u32 conn][6 remote addr][u16 remote port]
//! 0x06 Send            [u32 conn][data ...]
//! 0x07 Recv            [u32 conn][data ...]
//! 0x08 Close           [u32 conn]
//! 0x09 CloseOk         [u32 conn]
//! 0x0A Error           [u16 code][UTF-8 message ...]
//! 0x0B SendTo          [6 dst addr][u16 dst port][data ...]
//! 0x0C RecvFrom        [6 src addr][u16 src port][u16 dst port][data ...]
//! 0x0D Info            (empty)
//! 0x0E InfoOk          JSON, see [`Info`]
//! 0x0F Handshake       [u8 sub][...], see [`HandshakeOp`]
//! 0x10 HandshakeOk     JSON, see [`HandshakeStatus`], [`PendingList`], [`TrustedList`]
//! 0x11 ResolveHostname UTF-8 hostname
//! 0x12 ResolveHostnameOk  JSON (the registry's `resolve_hostname_ok`, verbatim)
//! 0x13 SetHostname     UTF-8 hostname ("" clears)
//! 0x14 SetHostnameOk   JSON (the registry's `set_hostname_ok`)
//! 0x15 SetVisibility   [u8 1 = public, anything else = private]
//! 0x16 SetVisibilityOk JSON (the registry's `set_visibility_ok`)
//! 0x17 Deregister      (empty)
//! 0x18 DeregisterOk    JSON `{"type":"deregister_ok"}`
//! 0x19 SetTags         JSON array of at most 3 strings
//! 0x1A SetTagsOk       JSON (the registry's `set_tags_ok`)
//! 0x1B SetWebhook      UTF-8 URL ("" disables)
//! 0x1C SetWebhookOk    JSON, see [`WebhookReply`]
//! 0x1D SetTaskExec     [u8 1 = enable, anything else = disable]
//! 0x1E SetTaskExecOk   JSON (the registry's `set_task_exec_ok`)
//! 0x40 Ext             JSON, see [`ExtRequest`]      (extension)
//! 0x41 ExtOk           JSON, see [`ExtReply`]        (extension)
//! 0x42 ConnFailed      [u32 conn][UTF-8 reason]      (extension, unsolicited; only to a
//!                      client that sent ExtRequest::ConnErrors)
//! ```
//!
//! # Strictness
//!
//! Every payload is bounds-checked; no input panics. Fixed-size payloads must have exactly
//! their size: v1 ignores trailing bytes, this codec refuses them, so every accepted fixed-size
//! message re-encodes to the bytes it came from. Text fields (hostnames, URLs, justifications,
//! reasons, error messages) must be UTF-8, where v1 passes arbitrary bytes along as Go strings.
//! JSON payloads are carried as bytes and checked only by whoever decodes them, with the serde
//! types below.
//!
//! # Extensions
//!
//! v1 leaves command bytes from 0x40 up unused ([`cmd::EXT_RANGE`]; later v1 releases take
//! 0x1F..=0x2B). The pair [`cmd::EXT`]/[`cmd::EXT_OK`] carries one JSON request tagged by `"op"`
//! ([`ExtRequest`]) and one reply envelope `{"status":"ok","data":…}` or
//! `{"status":"error","code":"…","message":"…"}` ([`ExtReply`]) whose codes are the stable
//! strings of [`code`]. Replies come back in request order on a connection, interleaved with
//! the unsolicited messages (Accept, Recv, RecvFrom, CloseOk) v1 pushes.

use serde::{Deserialize, Deserializer, Serialize};

use crate::addr::{Addr, SocketAddr, ADDR_LEN};

/// Largest value of the length prefix: command byte plus payload (v1 wire §7.1).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Largest payload of one message.
pub const MAX_PAYLOAD: usize = MAX_MESSAGE - 1;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// The only error code v1 sends in an [`Message::Error`].
pub const ERROR_CODE: u16 = 1;
/// Most tags a [`Message::SetTags`] may carry (v1 wire §7.2); the daemon enforces it.
pub const MAX_TAGS: usize = 3;

/// Command bytes (v1 wire §7.2) and the extension range.
pub mod cmd {
    use core::ops::RangeInclusive;

    /// Driver binds a port.
    pub const BIND: u8 = 0x01;
    /// The port is bound.
    pub const BIND_OK: u8 = 0x02;
    /// Driver opens a stream connection.
    pub const DIAL: u8 = 0x03;
    /// The connection is established.
    pub const DIAL_OK: u8 = 0x04;
    /// A connection arrived on a bound port (unsolicited).
    pub const ACCEPT: u8 = 0x05;
    /// Driver writes stream data (no success reply).
    pub const SEND: u8 = 0x06;
    /// Stream data arrived (unsolicited).
    pub const RECV: u8 = 0x07;
    /// Driver closes a connection.
    pub const CLOSE: u8 = 0x08;
    /// The connection is closed, or its receive side reached EOF (also unsolicited).
    pub const CLOSE_OK: u8 = 0x09;
    /// A request failed.
    pub const ERROR: u8 = 0x0A;
    /// Driver sends a datagram (no success reply).
    pub const SEND_TO: u8 = 0x0B;
    /// A datagram arrived (unsolicited, to every client).
    pub const RECV_FROM: u8 = 0x0C;
    /// Driver asks for the node's status.
    pub const INFO: u8 = 0x0D;
    /// The status JSON.
    pub const INFO_OK: u8 = 0x0E;
    /// Trust handshake operation, sub-command in the first payload byte.
    pub const HANDSHAKE: u8 = 0x0F;
    /// The handshake operation's JSON result.
    pub const HANDSHAKE_OK: u8 = 0x10;
    /// Hostname lookup through the registry.
    pub const RESOLVE_HOSTNAME: u8 = 0x11;
    /// The registry's answer.
    pub const RESOLVE_HOSTNAME_OK: u8 = 0x12;
    /// Sets or clears the node's hostname.
    pub const SET_HOSTNAME: u8 = 0x13;
    /// The registry's answer.
    pub const SET_HOSTNAME_OK: u8 = 0x14;
    /// Makes the node public or private.
    pub const SET_VISIBILITY: u8 = 0x15;
    /// The registry's answer.
    pub const SET_VISIBILITY_OK: u8 = 0x16;
    /// Removes the node from the registry; the daemon keeps running.
    pub const DEREGISTER: u8 = 0x17;
    /// `{"type":"deregister_ok"}`.
    pub const DEREGISTER_OK: u8 = 0x18;
    /// Replaces the node's tags.
    pub const SET_TAGS: u8 = 0x19;
    /// The registry's answer.
    pub const SET_TAGS_OK: u8 = 0x1A;
    /// Sets or clears the webhook URL (v1 wire §8.8).
    pub const SET_WEBHOOK: u8 = 0x1B;
    /// `{"webhook":"<url>"}`.
    pub const SET_WEBHOOK_OK: u8 = 0x1C;
    /// Advertises task execution on or off.
    pub const SET_TASK_EXEC: u8 = 0x1D;
    /// The registry's answer.
    pub const SET_TASK_EXEC_OK: u8 = 0x1E;

    /// Command bytes reserved for extensions. v1 never sends them.
    pub const EXT_RANGE: RangeInclusive<u8> = 0x40..=0x7F;
    /// Extension request: a JSON [`ExtRequest`](super::ExtRequest).
    pub const EXT: u8 = 0x40;
    /// Extension reply: a JSON [`ExtReply`](super::ExtReply).
    pub const EXT_OK: u8 = 0x41;
    /// Extension, unsolicited: a connection failed (reset, timed out); the CloseOk that
    /// follows is not a clean EOF.
    pub const CONN_FAILED: u8 = 0x42;

    /// The name of a command byte, for logs; `None` for bytes no command uses.
    pub fn name(cmd: u8) -> Option<&'static str> {
        Some(match cmd {
            BIND => "Bind",
            BIND_OK => "BindOk",
            DIAL => "Dial",
            DIAL_OK => "DialOk",
            ACCEPT => "Accept",
            SEND => "Send",
            RECV => "Recv",
            CLOSE => "Close",
            CLOSE_OK => "CloseOk",
            ERROR => "Error",
            SEND_TO => "SendTo",
            RECV_FROM => "RecvFrom",
            INFO => "Info",
            INFO_OK => "InfoOk",
            HANDSHAKE => "Handshake",
            HANDSHAKE_OK => "HandshakeOk",
            RESOLVE_HOSTNAME => "ResolveHostname",
            RESOLVE_HOSTNAME_OK => "ResolveHostnameOk",
            SET_HOSTNAME => "SetHostname",
            SET_HOSTNAME_OK => "SetHostnameOk",
            SET_VISIBILITY => "SetVisibility",
            SET_VISIBILITY_OK => "SetVisibilityOk",
            DEREGISTER => "Deregister",
            DEREGISTER_OK => "DeregisterOk",
            SET_TAGS => "SetTags",
            SET_TAGS_OK => "SetTagsOk",
            SET_WEBHOOK => "SetWebhook",
            SET_WEBHOOK_OK => "SetWebhookOk",
            SET_TASK_EXEC => "SetTaskExec",
            SET_TASK_EXEC_OK => "SetTaskExecOk",
            EXT => "Ext",
            EXT_OK => "ExtOk",
            CONN_FAILED => "ConnFailed",
            _ => return None,
        })
    }
}

/// Handshake sub-commands: the first payload byte of a [`cmd::HANDSHAKE`] (v1 wire §7.2, §6.4).
pub mod handshake_sub {
    /// Send a trust request: `[u32 node][UTF-8 justification]`.
    pub const REQUEST: u8 = 0x01;
    /// Approve a pending request: `[u32 node]`.
    pub const APPROVE: u8 = 0x02;
    /// Reject a pending request: `[u32 node][UTF-8 reason]`.
    pub const REJECT: u8 = 0x03;
    /// List pending requests: no operand.
    pub const PENDING: u8 = 0x04;
    /// List trusted peers: no operand.
    pub const TRUSTED: u8 = 0x05;
    /// Revoke trust: `[u32 node]`.
    pub const REVOKE: u8 = 0x06;
}

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

/// Why a frame could not be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix (or a message to encode) exceeds [`MAX_MESSAGE`]. The stream cannot be
    /// resynchronised after this on input.
    #[error("IPC message of {0} bytes exceeds the 1 MiB limit")]
    TooLarge(usize),
    /// The length prefix is zero: there is no command byte. The prefix has been consumed.
    #[error("IPC message of length 0 has no command byte")]
    Empty,
}

/// Reassembles IPC messages from a byte stream.
///
/// Calling order: [`push`](Self::push) what the socket delivered, then call
/// [`next_frame`](Self::next_frame) until it returns `Ok(None)`. Frames borrow from the decoder
/// (no copy); consumed bytes are reclaimed on the next `push`. An oversized length is refused as
/// soon as its prefix arrives, so with that calling order the decoder never holds more than
/// `LEN_PREFIX + MAX_MESSAGE` bytes plus the last pushed chunk.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the bytes not yet handed out.
    start: usize,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        FrameDecoder::default()
    }

    /// Appends received bytes, first dropping the frames already handed out.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message as `(command byte, payload)`, if one has arrived.
    ///
    /// After [`FrameError::TooLarge`] every later call fails the same way: drop the stream.
    pub fn next_frame(&mut self) -> Result<Option<(u8, &[u8])>, FrameError> {
        let avail = self.buf.get(self.start..).unwrap_or_default();
        let Some(&[a, b, c, d]) = avail.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let len = usize::try_from(u32::from_be_bytes([a, b, c, d])).unwrap_or(usize::MAX);
        if len > MAX_MESSAGE {
            return Err(FrameError::TooLarge(len));
        }
        if len == 0 {
            self.start += LEN_PREFIX;
            return Err(FrameError::Empty);
        }
        let Some(body) = avail.get(LEN_PREFIX..LEN_PREFIX + len) else {
            return Ok(None);
        };
        let begin = self.start + LEN_PREFIX;
        self.start += LEN_PREFIX + len;
        let Some((&cmd, _)) = body.split_first() else {
            return Err(FrameError::Empty); // unreachable: len >= 1
        };
        let payload = self.buf.get(begin + 1..begin + len).unwrap_or_default();
        Ok(Some((cmd, payload)))
    }

    /// The next complete message, parsed.
    pub fn next_message(&mut self) -> Result<Option<Message<'_>>, IpcError> {
        match self.next_frame()? {
            Some((cmd, payload)) => Ok(Some(Message::parse(cmd, payload)?)),
            None => Ok(None),
        }
    }

    /// Bytes held that have not been handed out as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Appends one message frame, `[length][cmd][payload]`, to `out`.
pub fn encode(cmd: u8, payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = prefix_for(payload.len())?;
    out.reserve(LEN_PREFIX + 1 + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.push(cmd);
    out.extend_from_slice(payload);
    Ok(())
}

/// The length prefix for a payload of `payload_len` bytes.
fn prefix_for(payload_len: usize) -> Result<u32, FrameError> {
    let total = payload_len.saturating_add(1);
    if total > MAX_MESSAGE {
        return Err(FrameError::TooLarge(total));
    }
    u32::try_from(total).map_err(|_| FrameError::TooLarge(total))
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

/// Why a payload is not a valid message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The command byte is neither a v1 command nor an extension this codec knows.
    #[error("unknown IPC command 0x{0:02x}")]
    UnknownCommand(u8),
    /// The payload ends before its fixed fields do.
    #[error("IPC command 0x{cmd:02x}: payload too short, need {needed} bytes, have {have}")]
    Truncated {
        /// The command byte.
        cmd: u8,
        /// Bytes the fixed fields need.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// A fixed-size payload has bytes after its last field.
    #[error("IPC command 0x{cmd:02x}: payload of {have} bytes, expected exactly {expected}")]
    TrailingBytes {
        /// The command byte.
        cmd: u8,
        /// The fixed size.
        expected: usize,
        /// Bytes present.
        have: usize,
    },
    /// A text field is not UTF-8.
    #[error("IPC command 0x{cmd:02x}: text is not UTF-8")]
    NotUtf8 {
        /// The command byte.
        cmd: u8,
    },
    /// The handshake sub-command byte is not one of [`handshake_sub`].
    #[error("unknown handshake sub-command 0x{0:02x}")]
    UnknownHandshakeOp(u8),
}

/// Why a message could not be read from a stream: framing or payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IpcError {
    /// The framing is broken.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A whole frame arrived but its payload is invalid.
    #[error(transparent)]
    Parse(#[from] ParseError),
}

/// A trust handshake operation: the payload of [`cmd::HANDSHAKE`] (v1 wire §6.4, §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeOp<'a> {
    /// Ask `node` for trust. Reply: [`HandshakeStatus`] `"sent"`.
    Request {
        /// The peer.
        node: u32,
        /// Why; may be empty.
        justification: &'a str,
    },
    /// Approve `node`'s pending request. Reply: [`HandshakeStatus`] `"approved"`.
    Approve {
        /// The peer.
        node: u32,
    },
    /// Reject `node`'s pending request. Reply: [`HandshakeStatus`] `"rejected"`.
    Reject {
        /// The peer.
        node: u32,
        /// Why; may be empty.
        reason: &'a str,
    },
    /// List pending requests. Reply: [`PendingList`].
    Pending,
    /// List trusted peers. Reply: [`TrustedList`].
    Trusted,
    /// Withdraw trust in `node`. Reply: [`HandshakeStatus`] `"revoked"`.
    Revoke {
        /// The peer.
        node: u32,
    },
}

impl HandshakeOp<'_> {
    /// The sub-command byte.
    pub fn sub(&self) -> u8 {
        match self {
            HandshakeOp::Request { .. } => handshake_sub::REQUEST,
            HandshakeOp::Approve { .. } => handshake_sub::APPROVE,
            HandshakeOp::Reject { .. } => handshake_sub::REJECT,
            HandshakeOp::Pending => handshake_sub::PENDING,
            HandshakeOp::Trusted => handshake_sub::TRUSTED,
            HandshakeOp::Revoke { .. } => handshake_sub::REVOKE,
        }
    }
}

/// One IPC message, in either direction. Data, text and JSON fields borrow from the frame.
///
/// `d→c` marks messages the daemon sends to a client, `c→d` the other way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// c→d 0x01: bind `port` for incoming connections.
    Bind {
        /// The virtual port.
        port: u16,
    },
    /// d→c 0x02: `port` is bound; [`Message::Accept`]s for it may follow.
    BindOk {
        /// The virtual port.
        port: u16,
    },
    /// c→d 0x03: open a stream connection to `dst`.
    Dial {
        /// The remote socket address.
        dst: SocketAddr,
    },
    /// d→c 0x04: the dial succeeded; [`Message::Recv`]s may follow at once.
    DialOk {
        /// The new connection.
        conn_id: u32,
    },
    /// d→c 0x05 (unsolicited): a connection arrived on a bound port. The leading local port is
    /// on the v1 wire although v1's SPEC.md omits it.
    Accept {
        /// The bound port it arrived on.
        local_port: u16,
        /// The new connection.
        conn_id: u32,
        /// The remote end.
        remote: SocketAddr,
    },
    /// c→d 0x06: write stream data. No success reply; an [`Message::Error`] on failure.
    Send {
        /// The connection.
        conn_id: u32,
        /// The bytes.
        data: &'a [u8],
    },
    /// d→c 0x07 (unsolicited): stream data arrived.
    Recv {
        /// The connection.
        conn_id: u32,
        /// The bytes.
        data: &'a [u8],
    },
    /// c→d 0x08: close a connection.
    Close {
        /// The connection.
        conn_id: u32,
    },
    /// d→c 0x09: the connection is closed; also sent unsolicited when its receive side ends,
    /// where it means EOF.
    CloseOk {
        /// The connection.
        conn_id: u32,
    },
    /// d→c 0x0A: a request failed. v1 always sends code [`ERROR_CODE`].
    Error {
        /// Error code.
        code: u16,
        /// Human-readable text.
        message: &'a str,
    },
    /// c→d 0x0B: send a datagram. No success reply.
    SendTo {
        /// Destination.
        dst: SocketAddr,
        /// The datagram.
        data: &'a [u8],
    },
    /// d→c 0x0C (unsolicited, to every client): a datagram arrived. The destination port is on
    /// the v1 wire although v1's SPEC.md omits it.
    RecvFrom {
        /// Sender.
        src: SocketAddr,
        /// The local port it was sent to.
        dst_port: u16,
        /// The datagram.
        data: &'a [u8],
    },
    /// c→d 0x0D: node status.
    Info,
    /// d→c 0x0E: the status, JSON [`Info`].
    InfoOk {
        /// The JSON bytes.
        json: &'a [u8],
    },
    /// c→d 0x0F: a trust handshake operation.
    Handshake(HandshakeOp<'a>),
    /// d→c 0x10: its JSON result.
    HandshakeOk {
        /// The JSON bytes.
        json: &'a [u8],
    },
    /// c→d 0x11: look a hostname up in the registry.
    ResolveHostname {
        /// The hostname.
        hostname: &'a str,
    },
    /// d→c 0x12: the registry's `resolve_hostname_ok` JSON.
    ResolveHostnameOk {
        /// The JSON bytes.
        json: &'a [u8],
    },
    /// c→d 0x13: set the node's hostname; "" clears it.
    SetHostname {
        /// The hostname.
        hostname: &'a str,
    },
    /// d→c 0x14: the registry's JSON answer.
    SetHostnameOk {
        /// The JSON bytes.
        json: &'a [u8],
    },
    /// c→d 0x15: public or private. Any byte but 1 means private, as in v1; it encodes as 0.
    SetVisibility {
        /// True for public.
        public: bool,
    },
    /// d→c 0x16: the registry's JSON answer.
    SetVisibilityOk {
        /// The JSON bytes.
        json: &'a [u8],
    },
    /// c→d 0x17: deregister the node; the daemon keeps running.
    Deregister,
    /// d→c 0x18: `{"type":"deregister_ok"}`.
    DeregisterOk {
        /// The JSON bytes.
        json: &'a [u8],
    },
    /// c→d 0x19: replace the tags; a JSON array of at most [`MAX_TAGS`] strings.
    SetTags {
        /// The JSON bytes.
        json: &'a [u8],
    },
    /// d→c 0x1A: the registry's JSON answer.
    SetTagsOk {
        /// The JSON bytes.
        json: &'a [u8],
    },
    /// c→d 0x1B: set the webhook URL (v1 wire §8.8); "" disables webhooks.
    SetWebhook {
        /// The URL.
        url: &'a str,
    },
    /// d→c 0x1C: JSON [`WebhookReply`].
    SetWebhookOk {
        /// The JSON bytes.
        json: &'a [u8],
    },
    /// c→d 0x1D: advertise task execution. Any byte but 1 means off, as in v1.
    SetTaskExec {
        /// On or off.
        enabled: bool,
    },
    /// d→c 0x1E: the registry's JSON answer.
    SetTaskExecOk {
        /// The JSON bytes.
        json: &'a [u8],
    },
    /// c→d 0x40 (extension): a JSON [`ExtRequest`].
    Ext {
        /// The JSON bytes.
        json: &'a [u8],
    },
    /// d→c 0x41 (extension): a JSON [`ExtReply`].
    ExtOk {
        /// The JSON bytes.
        json: &'a [u8],
    },
    /// d→c 0x42 (extension, unsolicited): the connection failed; sent just before its
    /// CloseOk, and only to clients that asked with [`ExtRequest::ConnErrors`].
    ConnFailed {
        /// The connection.
        conn_id: u32,
        /// Why.
        reason: &'a str,
    },
}

/// A bounds-checked cursor over a payload.
struct Reader<'a> {
    cmd: u8,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(cmd: u8, buf: &'a [u8]) -> Self {
        Reader { cmd, buf, pos: 0 }
    }

    fn take<const N: usize>(&mut self, needed_total: usize) -> Result<[u8; N], ParseError> {
        let truncated = ParseError::Truncated {
            cmd: self.cmd,
            needed: needed_total,
            have: self.buf.len(),
        };
        let bytes = self
            .buf
            .get(self.pos..self.pos + N)
            .ok_or(truncated)?
            .try_into()
            .map_err(|_| truncated)?;
        self.pos += N;
        Ok(bytes)
    }

    /// Checks the payload holds at least `n` bytes (the fixed part), for one clear error.
    fn need(&self, n: usize) -> Result<(), ParseError> {
        if self.buf.len() < n {
            return Err(ParseError::Truncated {
                cmd: self.cmd,
                needed: n,
                have: self.buf.len(),
            });
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, ParseError> {
        let need = self.pos + 1;
        Ok(self.take::<1>(need)?[0])
    }

    fn u16(&mut self) -> Result<u16, ParseError> {
        let need = self.pos + 2;
        Ok(u16::from_be_bytes(self.take(need)?))
    }

    fn u32(&mut self) -> Result<u32, ParseError> {
        let need = self.pos + 4;
        Ok(u32::from_be_bytes(self.take(need)?))
    }

    fn socket_addr(&mut self) -> Result<SocketAddr, ParseError> {
        let need = self.pos + ADDR_LEN + 2;
        self.need(need)?;
        let addr = Addr::from_bytes(self.take(need)?);
        Ok(SocketAddr::new(addr, self.u16()?))
    }

    fn rest(&mut self) -> &'a [u8] {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        self.pos = self.buf.len();
        rest
    }

    fn text(&mut self) -> Result<&'a str, ParseError> {
        let cmd = self.cmd;
        core::str::from_utf8(self.rest()).map_err(|_| ParseError::NotUtf8 { cmd })
    }

    /// Requires that every byte was read (fixed-size payloads).
    fn end(self) -> Result<(), ParseError> {
        if self.pos != self.buf.len() {
            return Err(ParseError::TrailingBytes {
                cmd: self.cmd,
                expected: self.pos,
                have: self.buf.len(),
            });
        }
        Ok(())
    }
}

impl<'a> Message<'a> {
    /// Parses the payload of a message whose command byte is `cmd`.
    pub fn parse(cmd: u8, payload: &'a [u8]) -> Result<Self, ParseError> {
        let mut r = Reader::new(cmd, payload);
        let m = match cmd {
            cmd::BIND => Message::Bind { port: r.u16()? },
            cmd::BIND_OK => Message::BindOk { port: r.u16()? },
            cmd::DIAL => Message::Dial {
                dst: r.socket_addr()?,
            },
            cmd::DIAL_OK => Message::DialOk { conn_id: r.u32()? },
            cmd::ACCEPT => {
                r.need(2 + 4 + ADDR_LEN + 2)?;
                Message::Accept {
                    local_port: r.u16()?,
                    conn_id: r.u32()?,
                    remote: r.socket_addr()?,
                }
            }
            cmd::SEND => Message::Send {
                conn_id: r.u32()?,
                data: r.rest(),
            },
            cmd::RECV => Message::Recv {
                conn_id: r.u32()?,
                data: r.rest(),
            },
            cmd::CLOSE => Message::Close { conn_id: r.u32()? },
            cmd::CLOSE_OK => Message::CloseOk { conn_id: r.u32()? },
            cmd::ERROR => Message::Error {
                code: r.u16()?,
                message: r.text()?,
            },
            cmd::SEND_TO => Message::SendTo {
                dst: r.socket_addr()?,
                data: r.rest(),
            },
            cmd::RECV_FROM => {
                r.need(ADDR_LEN + 2 + 2)?;
                Message::RecvFrom {
                    src: r.socket_addr()?,
                    dst_port: r.u16()?,
                    data: r.rest(),
                }
            }
            cmd::INFO => Message::Info,
            cmd::INFO_OK => Message::InfoOk { json: r.rest() },
            cmd::HANDSHAKE => Message::Handshake(parse_handshake(&mut r)?),
            cmd::HANDSHAKE_OK => Message::HandshakeOk { json: r.rest() },
            cmd::RESOLVE_HOSTNAME => Message::ResolveHostname {
                hostname: r.text()?,
            },
            cmd::RESOLVE_HOSTNAME_OK => Message::ResolveHostnameOk { json: r.rest() },
            cmd::SET_HOSTNAME => Message::SetHostname {
                hostname: r.text()?,
            },
            cmd::SET_HOSTNAME_OK => Message::SetHostnameOk { json: r.rest() },
            cmd::SET_VISIBILITY => Message::SetVisibility {
                public: r.u8()? == 1,
            },
            cmd::SET_VISIBILITY_OK => Message::SetVisibilityOk { json: r.rest() },
            cmd::DEREGISTER => Message::Deregister,
            cmd::DEREGISTER_OK => Message::DeregisterOk { json: r.rest() },
            cmd::SET_TAGS => Message::SetTags { json: r.rest() },
            cmd::SET_TAGS_OK => Message::SetTagsOk { json: r.rest() },
            cmd::SET_WEBHOOK => Message::SetWebhook { url: r.text()? },
            cmd::SET_WEBHOOK_OK => Message::SetWebhookOk { json: r.rest() },
            cmd::SET_TASK_EXEC => Message::SetTaskExec {
                enabled: r.u8()? == 1,
            },
            cmd::SET_TASK_EXEC_OK => Message::SetTaskExecOk { json: r.rest() },
            cmd::EXT => Message::Ext { json: r.rest() },
            cmd::EXT_OK => Message::ExtOk { json: r.rest() },
            cmd::CONN_FAILED => Message::ConnFailed {
                conn_id: r.u32()?,
                reason: r.text()?,
            },
            other => return Err(ParseError::UnknownCommand(other)),
        };
        r.end()?;
        Ok(m)
    }

    /// The command byte.
    pub fn cmd(&self) -> u8 {
        match self {
            Message::Bind { .. } => cmd::BIND,
            Message::BindOk { .. } => cmd::BIND_OK,
            Message::Dial { .. } => cmd::DIAL,
            Message::DialOk { .. } => cmd::DIAL_OK,
            Message::Accept { .. } => cmd::ACCEPT,
            Message::Send { .. } => cmd::SEND,
            Message::Recv { .. } => cmd::RECV,
            Message::Close { .. } => cmd::CLOSE,
            Message::CloseOk { .. } => cmd::CLOSE_OK,
            Message::Error { .. } => cmd::ERROR,
            Message::SendTo { .. } => cmd::SEND_TO,
            Message::RecvFrom { .. } => cmd::RECV_FROM,
            Message::Info => cmd::INFO,
            Message::InfoOk { .. } => cmd::INFO_OK,
            Message::Handshake(_) => cmd::HANDSHAKE,
            Message::HandshakeOk { .. } => cmd::HANDSHAKE_OK,
            Message::ResolveHostname { .. } => cmd::RESOLVE_HOSTNAME,
            Message::ResolveHostnameOk { .. } => cmd::RESOLVE_HOSTNAME_OK,
            Message::SetHostname { .. } => cmd::SET_HOSTNAME,
            Message::SetHostnameOk { .. } => cmd::SET_HOSTNAME_OK,
            Message::SetVisibility { .. } => cmd::SET_VISIBILITY,
            Message::SetVisibilityOk { .. } => cmd::SET_VISIBILITY_OK,
            Message::Deregister => cmd::DEREGISTER,
            Message::DeregisterOk { .. } => cmd::DEREGISTER_OK,
            Message::SetTags { .. } => cmd::SET_TAGS,
            Message::SetTagsOk { .. } => cmd::SET_TAGS_OK,
            Message::SetWebhook { .. } => cmd::SET_WEBHOOK,
            Message::SetWebhookOk { .. } => cmd::SET_WEBHOOK_OK,
            Message::SetTaskExec { .. } => cmd::SET_TASK_EXEC,
            Message::SetTaskExecOk { .. } => cmd::SET_TASK_EXEC_OK,
            Message::Ext { .. } => cmd::EXT,
            Message::ExtOk { .. } => cmd::EXT_OK,
            Message::ConnFailed { .. } => cmd::CONN_FAILED,
        }
    }

    /// Length of the payload [`emit_payload`](Self::emit_payload) writes.
    pub fn payload_len(&self) -> usize {
        const SA: usize = ADDR_LEN + 2;
        match self {
            Message::Bind { .. } | Message::BindOk { .. } => 2,
            Message::Dial { .. } => SA,
            Message::DialOk { .. } | Message::Close { .. } | Message::CloseOk { .. } => 4,
            Message::Accept { .. } => 2 + 4 + SA,
            Message::Send { data, .. } | Message::Recv { data, .. } => 4 + data.len(),
            Message::Error { message, .. } => 2 + message.len(),
            Message::ConnFailed { reason, .. } => 4 + reason.len(),
            Message::SendTo { data, .. } => SA + data.len(),
            Message::RecvFrom { data, .. } => SA + 2 + data.len(),
            Message::Info | Message::Deregister => 0,
            Message::Handshake(op) => match op {
                HandshakeOp::Request {
                    justification: t, ..
                }
                | HandshakeOp::Reject { reason: t, .. } => 1 + 4 + t.len(),
                HandshakeOp::Approve { .. } | HandshakeOp::Revoke { .. } => 1 + 4,
                HandshakeOp::Pending | HandshakeOp::Trusted => 1,
            },
            Message::ResolveHostname { hostname: t }
            | Message::SetHostname { hostname: t }
            | Message::SetWebhook { url: t } => t.len(),
            Message::SetVisibility { .. } | Message::SetTaskExec { .. } => 1,
            Message::InfoOk { json }
            | Message::HandshakeOk { json }
            | Message::ResolveHostnameOk { json }
            | Message::SetHostnameOk { json }
            | Message::SetVisibilityOk { json }
            | Message::DeregisterOk { json }
            | Message::SetTags { json }
            | Message::SetTagsOk { json }
            | Message::SetWebhookOk { json }
            | Message::SetTaskExecOk { json }
            | Message::Ext { json }
            | Message::ExtOk { json } => json.len(),
        }
    }

    /// Appends the payload (without length prefix or command byte) to `out`.
    pub fn emit_payload(&self, out: &mut Vec<u8>) {
        fn sa(out: &mut Vec<u8>, s: &SocketAddr) {
            out.extend_from_slice(&s.addr.to_bytes());
            out.extend_from_slice(&s.port.to_be_bytes());
        }
        match *self {
            Message::Bind { port } | Message::BindOk { port } => {
                out.extend_from_slice(&port.to_be_bytes())
            }
            Message::Dial { dst } => sa(out, &dst),
            Message::DialOk { conn_id }
            | Message::Close { conn_id }
            | Message::CloseOk { conn_id } => out.extend_from_slice(&conn_id.to_be_bytes()),
            Message::Accept {
                local_port,
                conn_id,
                remote,
            } => {
                out.extend_from_slice(&local_port.to_be_bytes());
                out.extend_from_slice(&conn_id.to_be_bytes());
                sa(out, &remote);
            }
            Message::Send { conn_id, data } | Message::Recv { conn_id, data } => {
                out.extend_from_slice(&conn_id.to_be_bytes());
                out.extend_from_slice(data);
            }
            Message::Error { code, message } => {
                out.extend_from_slice(&code.to_be_bytes());
                out.extend_from_slice(message.as_bytes());
            }
            Message::ConnFailed { conn_id, reason } => {
                out.extend_from_slice(&conn_id.to_be_bytes());
                out.extend_from_slice(reason.as_bytes());
            }
            Message::SendTo { dst, data } => {
                sa(out, &dst);
                out.extend_from_slice(data);
            }
            Message::RecvFrom {
                src,
                dst_port,
                data,
            } => {
                sa(out, &src);
                out.extend_from_slice(&dst_port.to_be_bytes());
                out.extend_from_slice(data);
            }
            Message::Info | Message::Deregister => {}
            Message::Handshake(op) => {
                out.push(op.sub());
                match op {
                    HandshakeOp::Request {
                        node,
                        justification: text,
                    }
                    | HandshakeOp::Reject { node, reason: text } => {
                        out.extend_from_slice(&node.to_be_bytes());
                        out.extend_from_slice(text.as_bytes());
                    }
                    HandshakeOp::Approve { node } | HandshakeOp::Revoke { node } => {
                        out.extend_from_slice(&node.to_be_bytes())
                    }
                    HandshakeOp::Pending | HandshakeOp::Trusted => {}
                }
            }
            Message::ResolveHostname { hostname: t }
            | Message::SetHostname { hostname: t }
            | Message::SetWebhook { url: t } => out.extend_from_slice(t.as_bytes()),
            Message::SetVisibility { public: on } | Message::SetTaskExec { enabled: on } => {
                out.push(u8::from(on))
            }
            Message::InfoOk { json }
            | Message::HandshakeOk { json }
            | Message::ResolveHostnameOk { json }
            | Message::SetHostnameOk { json }
            | Message::SetVisibilityOk { json }
            | Message::DeregisterOk { json }
            | Message::SetTags { json }
            | Message::SetTagsOk { json }
            | Message::SetWebhookOk { json }
            | Message::SetTaskExecOk { json }
            | Message::Ext { json }
            | Message::ExtOk { json } => out.extend_from_slice(json),
        }
    }

    /// Appends the whole frame, `[length][cmd][payload]`, to `out`. Nothing is written if the
    /// message exceeds [`MAX_MESSAGE`].
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let payload_len = self.payload_len();
        let len = prefix_for(payload_len)?;
        out.reserve(LEN_PREFIX + 1 + payload_len);
        out.extend_from_slice(&len.to_be_bytes());
        out.push(self.cmd());
        self.emit_payload(out);
        Ok(())
    }
}

fn parse_handshake<'a>(r: &mut Reader<'a>) -> Result<HandshakeOp<'a>, ParseError> {
    Ok(match r.u8()? {
        handshake_sub::REQUEST => HandshakeOp::Request {
            node: r.u32()?,
            justification: r.text()?,
        },
        handshake_sub::APPROVE => HandshakeOp::Approve { node: r.u32()? },
        handshake_sub::REJECT => HandshakeOp::Reject {
            node: r.u32()?,
            reason: r.text()?,
        },
        handshake_sub::PENDING => HandshakeOp::Pending,
        handshake_sub::TRUSTED => HandshakeOp::Trusted,
        handshake_sub::REVOKE => HandshakeOp::Revoke { node: r.u32()? },
        other => return Err(ParseError::UnknownHandshakeOp(other)),
    })
}

// ---------------------------------------------------------------------------------------------
// v1 JSON bodies
// ---------------------------------------------------------------------------------------------

/// Reads `null` (what Go writes for a nil slice) as an empty list.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// The node status, body of [`Message::InfoOk`] (v1 wire §7.3). Field names are v1's; missing
/// fields read as their defaults and unknown ones are ignored, so newer and older peers decode.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Info {
    /// This node's ID.
    pub node_id: u32,
    /// This node's address, text form.
    pub address: String,
    /// This node's hostname, "" if none.
    pub hostname: String,
    /// Whole seconds since the daemon started.
    pub uptime_secs: f64,
    /// Connections in ESTABLISHED, SYN_SENT or SYN_RECV.
    pub connections: u32,
    /// Bound listener ports.
    pub ports: u32,
    /// Tunnel peers.
    pub peers: u32,
    /// Peers with an encrypted tunnel.
    pub encrypted_peers: u32,
    /// Peers whose tunnel key is signed by their identity.
    pub authenticated_peers: u32,
    /// Whether tunnel encryption is on.
    pub encrypt: bool,
    /// Whether an identity file path is configured.
    pub identity: bool,
    /// Standard base64 of the node's Ed25519 public key.
    pub public_key: String,
    /// Owner string, "" if none.
    pub owner: String,
    /// Tunnel bytes sent.
    pub bytes_sent: u64,
    /// Tunnel bytes received.
    pub bytes_recv: u64,
    /// Tunnel packets sent.
    pub pkts_sent: u64,
    /// Tunnel packets received.
    pub pkts_recv: u64,
    /// One entry per tunnel peer.
    #[serde(deserialize_with = "null_as_empty")]
    pub peer_list: Vec<PeerInfo>,
    /// One entry per connection, TIME_WAIT ones included.
    #[serde(deserialize_with = "null_as_empty")]
    pub conn_list: Vec<ConnInfo>,
    /// The daemon's process ID (extension; 0 from a v1 daemon).
    pub pid: u32,
    /// The daemon's version (extension; "" from a v1 daemon).
    pub version: String,
    /// The protocol the registry speaks: `"pilot"` (session extensions) or `"v1"` (fixed-string
    /// signatures, no pushes); "" before the first registration (extension; "" from a v1
    /// daemon).
    pub registry_protocol: String,
    /// The registry link's state (extension; absent from a v1 daemon).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryLinkInfo>,
    /// The virtual NIC, when the daemon runs as `pilotd up` (extension; absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inside: Option<InsideInfo>,
    /// The beacon, when NAT traversal through one is on (extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beacon: Option<BeaconInfo>,
}

/// The registry link as [`Info::registry`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RegistryLinkInfo {
    /// Whether the node has a registered session now.
    pub connected: bool,
    /// Seconds in this state (since start while it never connected).
    pub since_secs: u64,
    /// Why the last attempt or session failed, while not connected.
    pub error: Option<String>,
    /// Another daemon with this node's identity, as the registry explained it: this daemon
    /// was refused, or one was refused while this daemon serves the node (absent when there
    /// is none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
    /// The registry address (`host:port`) of the session, or of the last one while not
    /// connected: with several `--registry` addresses, the one in use (absent before the
    /// first session).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// The beacon as [`Info::beacon`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BeaconInfo {
    /// Its UDP address.
    pub address: String,
    /// Whether it answers the discovers sent at each registry heartbeat (`None` before the
    /// first could be answered).
    pub answering: Option<bool>,
    /// Seconds since it last answered, if it ever did.
    pub last_answer_secs: Option<u64>,
}

/// The virtual NIC of a daemon running as `pilotd up`, in [`Info::inside`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct InsideInfo {
    /// The TUN interface.
    pub interface: String,
    /// The node's ULA on it.
    pub ula: String,
    /// Its MTU.
    pub mtu: u16,
    /// Kernel ports any caller may reach; other ports only trusted peers.
    pub expose: Vec<u16>,
    /// The address that answers DNS for `.pilot` names, "" if none.
    pub dns: String,
    /// How the system resolver reaches that address (or how to point it there), "" if unknown.
    pub dns_system: String,
    /// Kernel TCP connections carried now.
    pub flows: u64,
    /// Outbound connections dialed.
    pub outbound_dials: u64,
    /// Outbound connections refused (RST or ICMPv6).
    pub outbound_refused: u64,
    /// Inbound attempts offered to the kernel.
    pub inbound_offered: u64,
    /// Inbound attempts refused.
    pub inbound_refused: u64,
}

/// One tunnel peer in [`Info::peer_list`] (v1 wire §7.3, plus `relay`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerInfo {
    /// The peer's node ID.
    pub node_id: u32,
    /// The peer's UDP endpoint, `ip:port` (the relay's when `relay` is true).
    pub endpoint: String,
    /// Whether the tunnel is encrypted.
    pub encrypted: bool,
    /// Whether the tunnel key is signed by the peer's identity.
    pub authenticated: bool,
    /// Whether traffic goes through the beacon relay instead of directly (extension; v1 omits
    /// the key, which reads as false).
    pub relay: bool,
}

/// One connection in [`Info::conn_list`] (v1 wire §7.3): identity, state and transport
/// statistics.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnInfo {
    /// Connection ID.
    pub id: u32,
    /// Local virtual port.
    pub local_port: u16,
    /// Remote address, text form.
    pub remote_addr: String,
    /// Remote virtual port.
    pub remote_port: u16,
    /// State name: "ESTABLISHED", "SYN_SENT", "SYN_RECV", "TIME_WAIT", "CLOSED", …
    pub state: String,
    /// Congestion window, bytes.
    pub cong_win: u64,
    /// Slow-start threshold, bytes.
    pub ssthresh: u64,
    /// Bytes sent and not acknowledged.
    pub in_flight: u64,
    /// Smoothed RTT, milliseconds (whole ones from v1).
    pub srtt_ms: f64,
    /// RTT variance, milliseconds (whole ones from v1).
    pub rttvar_ms: f64,
    /// Bytes written and not yet acknowledged (pilotd; v1 counts segments).
    pub unacked: u64,
    /// Segments held out of order.
    pub ooo_buf: u64,
    /// The peer's advertised receive window, bytes.
    pub peer_recv_win: u64,
    /// Our receive window, bytes.
    pub recv_win: u64,
    /// Whether fast recovery is in progress.
    pub in_recovery: bool,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_recv: u64,
    /// Segments sent.
    pub segs_sent: u64,
    /// Segments received.
    pub segs_recv: u64,
    /// Retransmitted segments.
    pub retransmits: u64,
    /// Fast retransmits.
    pub fast_retx: u64,
    /// SACK blocks received.
    pub sack_recv: u64,
    /// SACK blocks sent.
    pub sack_sent: u64,
    /// Duplicate ACKs received.
    pub dup_acks: u64,
}

/// [`Message::HandshakeOk`] body for request, approve, reject and revoke (v1 wire §7.2):
/// `{"status":"sent"|"approved"|"rejected"|"revoked","node_id":N}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HandshakeStatus {
    /// What happened.
    pub status: String,
    /// The peer.
    pub node_id: u32,
}

impl HandshakeStatus {
    /// `status` after a request was sent.
    pub const SENT: &'static str = "sent";
    /// `status` after an approval.
    pub const APPROVED: &'static str = "approved";
    /// `status` after a rejection.
    pub const REJECTED: &'static str = "rejected";
    /// `status` after a revocation.
    pub const REVOKED: &'static str = "revoked";
}

/// [`Message::HandshakeOk`] body for [`HandshakeOp::Pending`]: `{"pending":[…]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PendingList {
    /// Requests waiting for a decision.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub pending: Vec<PendingEntry>,
    /// Extension: this node's own requests, unanswered or rejected (v1 omits it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outgoing: Vec<OutgoingEntry>,
}

/// One trust request this node sent, in [`PendingList::outgoing`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct OutgoingEntry {
    /// The peer asked.
    pub node_id: u32,
    /// [`OutgoingEntry::WAITING`] or [`OutgoingEntry::REJECTED`].
    pub status: String,
    /// Our reason, while waiting.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub justification: String,
    /// When it was sent, Unix seconds (0 once answered).
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub sent_at: i64,
    /// The peer's reason for a rejection ("" when it gave none or it came through the
    /// registry, which carries none).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// When the rejection arrived, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answered_at: Option<i64>,
}

impl OutgoingEntry {
    /// Sent, no answer yet.
    pub const WAITING: &'static str = "waiting";
    /// The peer rejected it.
    pub const REJECTED: &'static str = "rejected";
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

/// One pending trust request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PendingEntry {
    /// The requester.
    pub node_id: u32,
    /// Its Ed25519 key, standard base64; "" when the request came through the registry relay.
    pub public_key: String,
    /// Its reason.
    pub justification: String,
    /// When it arrived, Unix seconds.
    pub received_at: i64,
}

/// [`Message::HandshakeOk`] body for [`HandshakeOp::Trusted`]: `{"trusted":[…]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TrustedList {
    /// Trusted peers.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub trusted: Vec<TrustedEntry>,
}

/// One trusted peer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TrustedEntry {
    /// The peer.
    pub node_id: u32,
    /// Its Ed25519 key, standard base64.
    pub public_key: String,
    /// When trust was established, Unix seconds.
    pub approved_at: i64,
    /// Whether both sides asked (or the peer accepted our request).
    pub mutual: bool,
    /// The shared network that granted trust, 0 if none.
    pub network: u16,
}

/// [`Message::SetWebhookOk`] body: `{"webhook":"<url>"}`, "" when disabled (v1 wire §8.8).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WebhookReply {
    /// The URL now in effect.
    pub webhook: String,
}

// ---------------------------------------------------------------------------------------------
// Extension: JSON requests and replies
// ---------------------------------------------------------------------------------------------

/// Stable error codes of [`ExtReply::Error`]. Clients match on these, never on the message.
pub mod code {
    /// The request is malformed: not JSON, no `op`, or fields of the wrong type.
    pub const BAD_REQUEST: &str = "bad_request";
    /// The `op` is unknown to this daemon (an older daemon than the client).
    pub const UNSUPPORTED: &str = "unsupported";
    /// An address, node ID or target text does not parse.
    pub const BAD_ADDRESS: &str = "bad_address";
    /// The node, hostname, network or pending request does not exist.
    pub const NOT_FOUND: &str = "not_found";
    /// The node is not a tunnel peer of this daemon, or the connection ID is unknown.
    pub const UNKNOWN_PEER: &str = "unknown_peer";
    /// The operation needs trust the peer has not granted (private node, revoke of a stranger).
    pub const UNTRUSTED: &str = "untrusted";
    /// The hostname breaks the naming rules or is taken.
    pub const INVALID_HOSTNAME: &str = "invalid_hostname";
    /// The peer or registry did not answer in time.
    pub const TIMEOUT: &str = "timeout";
    /// The peer or registry refused (connection refused, registry rejection).
    pub const REFUSED: &str = "refused";
    /// The registry cannot be reached right now.
    pub const UNAVAILABLE: &str = "unavailable";
    /// A bug or an unexpected local failure in the daemon.
    pub const INTERNAL: &str = "internal";
    /// Client side only: the daemon's socket cannot be reached.
    pub const DAEMON_DOWN: &str = "daemon_down";
    /// Client side only: the daemon's reply does not decode.
    pub const BAD_REPLY: &str = "bad_reply";
    /// Client side only: the peer echoed back fewer bytes than were sent (`pilotctl bench`).
    pub const SHORT_ECHO: &str = "short_echo";
}

/// An extension request, body of [`Message::Ext`]: a JSON object tagged by `"op"`.
///
/// Each variant documents its reply `data` type. Nodes are named by node ID on network 0, as
/// everywhere in v1; a client turns user input into a node ID with [`ExtRequest::Resolve`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ExtRequest {
    /// Node status. Reply: [`Info`].
    Info,
    /// Tunnel peers, optionally filtered by a substring of node ID, address or endpoint.
    /// Reply: [`PeersReply`].
    Peers {
        /// Substring filter.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        search: Option<String>,
    },
    /// Connections with transport statistics. Reply: [`ConnectionsReply`].
    Connections,
    /// Closes a connection. Reply: [`ConnIdReply`]. Error: `unknown_peer` for an unknown ID.
    Disconnect {
        /// The connection.
        conn_id: u32,
    },
    /// A node's public registry record. Reply: [`LookupReply`]. Error: `not_found`.
    Lookup {
        /// The node.
        node_id: u32,
    },
    /// Registers the node again with the registry under its identity. Reply: [`RegisterReply`].
    Register,
    /// Removes the node from the registry; the daemon keeps running. Reply: [`NodeReply`].
    Deregister,
    /// Replaces the node's identity key, signed by the current one. Reply: [`RotateKeyReply`].
    RotateKey,
    /// Every network the registry knows. Reply: [`NetworksReply`].
    NetworkList,
    /// Creates a network with this node as its first member. Reply: [`NetworkInfo`].
    NetworkCreate {
        /// Its name.
        name: String,
        /// `open` (the default), `token` or `invite`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        join_rule: Option<String>,
        /// The join token of a `token` network.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Joins a network. Reply: [`NetworkReply`].
    NetworkJoin {
        /// The network.
        network_id: u16,
        /// The join token of a `token` network.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// The inviting member of an `invite` network.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        inviter_id: Option<u32>,
    },
    /// Leaves a network. Reply: [`NetworkReply`].
    NetworkLeave {
        /// The network.
        network_id: u16,
    },
    /// Invites a node into an invite-only network this node belongs to. Reply:
    /// [`NetworkReply`] naming the invited node.
    NetworkInvite {
        /// The network.
        network_id: u16,
        /// The invited node.
        node_id: u32,
    },
    /// Turns user input into a node: a full address, a decimal node ID, or a hostname looked up
    /// in the registry. Reply: [`ResolveReply`]. Errors: `bad_address`, `not_found`.
    Resolve {
        /// The text to resolve.
        target: String,
    },
    /// Echo probes (port 7), one fresh connection per probe. Reply: [`PingReply`], one result
    /// per probe; a failed probe is a result with `error`, not an error reply.
    Ping {
        /// The node.
        node_id: u32,
        /// Number of probes.
        count: u32,
        /// Per-probe timeout in milliseconds; the daemon's default when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Asks a node for trust. Reply: [`HandshakeStatus`] `"sent"`.
    Handshake {
        /// The peer.
        node_id: u32,
        /// Why.
        #[serde(default)]
        justification: String,
    },
    /// Approves a pending request. Reply: [`HandshakeStatus`] `"approved"`. Error: `not_found`.
    Approve {
        /// The peer.
        node_id: u32,
    },
    /// Rejects a pending request. Reply: [`HandshakeStatus`] `"rejected"`. Error: `not_found`.
    Reject {
        /// The peer.
        node_id: u32,
        /// Why.
        #[serde(default)]
        reason: String,
    },
    /// Withdraws trust. Reply: [`HandshakeStatus`] `"revoked"`. Error: `untrusted`.
    Untrust {
        /// The peer.
        node_id: u32,
    },
    /// Trusted peers. Reply: [`TrustedList`].
    TrustList,
    /// Pending trust requests. Reply: [`PendingList`].
    TrustPending,
    /// Public or private. Reply: [`VisibilityReply`].
    SetVisibility {
        /// True for public.
        public: bool,
    },
    /// Replaces the tags (at most [`MAX_TAGS`]; empty clears). Reply: [`TagsReply`].
    /// Error: `bad_request` for too many or malformed tags.
    SetTags {
        /// The tags.
        tags: Vec<String>,
    },
    /// Sets the hostname ("" clears). Reply: [`HostnameReply`]. Error: `invalid_hostname`.
    SetHostname {
        /// The hostname.
        hostname: String,
    },
    /// Sets the webhook URL ("" disables; otherwise `http://` or `https://`). Reply:
    /// [`WebhookReply`]. Error: `bad_request` for another scheme.
    SetWebhook {
        /// The URL.
        url: String,
    },
    /// Advertises task execution. Reply: [`TaskExecReply`].
    SetTaskExec {
        /// On or off.
        enabled: bool,
    },
    /// From now on, tell this client when one of its connections fails (reset, timed out,
    /// refused) with [`Message::ConnFailed`] just before the connection's CloseOk, so a failure
    /// is not mistaken for a clean EOF. v1 clients never send it and never get one. Reply:
    /// `{"conn_errors": true}`.
    ConnErrors,
    /// The local nameserver's records. Reply: `{"records": [...], "total": n}`, each record
    /// `{"type": "A"|"N"|"S", "name", ...}`. Error: `unavailable` when the nameserver is off.
    NameList,
    /// Adds a permanent record to the local nameserver, written as the nameserver's REGISTER
    /// arguments: `A <name> <addr>`, `N <name> <net_id>` or `S <name> <addr> <net_id> <port>`.
    /// Reply: the record. Error: `bad_request` for a malformed record.
    NameAdd {
        /// The record.
        record: String,
    },
    /// Removes a record of the local nameserver, written as for [`ExtRequest::NameAdd`].
    /// Reply: `{"removed": bool}`.
    NameRemove {
        /// The record.
        record: String,
    },
    /// Messages the data exchange and stdio services stored, oldest first. Reply:
    /// `{"messages": [{"id","type","from","data","bytes","received_at",...}], "total", "dir"}`,
    /// or with `clear`, `{"cleared": n}` after deleting them.
    Inbox {
        /// Delete them instead.
        #[serde(default)]
        clear: bool,
    },
    /// Files the data exchange service received, oldest first. Reply:
    /// `{"files": [{"name","bytes","modified","path"}], "total", "dir"}`, or with `clear`,
    /// `{"cleared": n}` after deleting them.
    Received {
        /// Delete them instead.
        #[serde(default)]
        clear: bool,
    },
    /// Hands a task to a peer's task service (port 1003). Reply:
    /// `{"target","task_id","task","status","message","accepted"}`; a refusal by the peer is
    /// `accepted: false` with its message.
    TaskSubmit {
        /// The peer.
        node_id: u32,
        /// What to do.
        description: String,
    },
    /// Tasks this node received and submitted, or one kind (`received`, `submitted`). Reply:
    /// `{"tasks": [{"task_id","description","status","from","to","created_at",...}], "total"}`.
    TaskList {
        /// `received` or `submitted`; both when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<String>,
    },
    /// Received tasks waiting (NEW and ACCEPTED), oldest first. Reply: `{"queue": [...],
    /// "count"}`.
    TaskQueue,
    /// Accepts a received task. Reply: `{"task_id","status","message","notified"}`.
    TaskAccept {
        /// The task.
        task_id: String,
    },
    /// Declines a received task, telling the submitter why. Reply as for `TaskAccept`.
    TaskDecline {
        /// The task.
        task_id: String,
        /// Why.
        justification: String,
    },
    /// Withdraws a task this node submitted. Reply as for `TaskAccept`.
    TaskCancel {
        /// The task.
        task_id: String,
    },
    /// Starts the oldest accepted task. Reply: `{"task_id","task_description","status",
    /// "from","notified"}`.
    TaskExecute,
    /// Sends a task's results to its submitter: `text`, or the file at `file` (read by the
    /// daemon; its extension must be on the allowed list). Reply: `{"task_id","status",
    /// "sent_to","sent_type",...}`.
    TaskResults {
        /// The task.
        task_id: String,
        /// Text results.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        /// A results file on the daemon's host.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<String>,
    },
}

impl ExtRequest {
    /// Every `op` string, in declaration order.
    pub const OPS: &'static [&'static str] = &[
        "info",
        "peers",
        "connections",
        "disconnect",
        "lookup",
        "register",
        "deregister",
        "rotate_key",
        "network_list",
        "network_create",
        "network_join",
        "network_leave",
        "network_invite",
        "resolve",
        "ping",
        "handshake",
        "approve",
        "reject",
        "untrust",
        "trust_list",
        "trust_pending",
        "set_visibility",
        "set_tags",
        "set_hostname",
        "set_webhook",
        "set_task_exec",
        "conn_errors",
        "name_list",
        "name_add",
        "name_remove",
        "inbox",
        "received",
        "task_submit",
        "task_list",
        "task_queue",
        "task_accept",
        "task_decline",
        "task_cancel",
        "task_execute",
        "task_results",
    ];

    /// Decodes a request, classifying failures the way the reply should: an unknown `op` is
    /// [`code::UNSUPPORTED`], anything else malformed is [`code::BAD_REQUEST`].
    pub fn from_json(json: &[u8]) -> Result<Self, ExtError> {
        let value: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| ExtError::new(code::BAD_REQUEST, format!("not JSON: {e}")))?;
        let op = match value.get("op") {
            Some(serde_json::Value::String(op)) => op,
            _ => {
                return Err(ExtError::new(
                    code::BAD_REQUEST,
                    "request has no string \"op\"",
                ))
            }
        };
        if !Self::OPS.contains(&op.as_str()) {
            return Err(ExtError::new(
                code::UNSUPPORTED,
                format!("unknown op {op:?}"),
            ));
        }
        serde_json::from_value(value).map_err(|e| ExtError::new(code::BAD_REQUEST, e.to_string()))
    }

    /// The request as JSON bytes, for [`Message::Ext`].
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The `op` string of this request.
    pub fn op(&self) -> &'static str {
        match self {
            ExtRequest::Info => "info",
            ExtRequest::Peers { .. } => "peers",
            ExtRequest::Connections => "connections",
            ExtRequest::Disconnect { .. } => "disconnect",
            ExtRequest::Lookup { .. } => "lookup",
            ExtRequest::Register => "register",
            ExtRequest::Deregister => "deregister",
            ExtRequest::RotateKey => "rotate_key",
            ExtRequest::NetworkList => "network_list",
            ExtRequest::NetworkCreate { .. } => "network_create",
            ExtRequest::NetworkJoin { .. } => "network_join",
            ExtRequest::NetworkLeave { .. } => "network_leave",
            ExtRequest::NetworkInvite { .. } => "network_invite",
            ExtRequest::Resolve { .. } => "resolve",
            ExtRequest::Ping { .. } => "ping",
            ExtRequest::Handshake { .. } => "handshake",
            ExtRequest::Approve { .. } => "approve",
            ExtRequest::Reject { .. } => "reject",
            ExtRequest::Untrust { .. } => "untrust",
            ExtRequest::TrustList => "trust_list",
            ExtRequest::TrustPending => "trust_pending",
            ExtRequest::SetVisibility { .. } => "set_visibility",
            ExtRequest::SetTags { .. } => "set_tags",
            ExtRequest::SetHostname { .. } => "set_hostname",
            ExtRequest::SetWebhook { .. } => "set_webhook",
            ExtRequest::SetTaskExec { .. } => "set_task_exec",
            ExtRequest::ConnErrors => "conn_errors",
            ExtRequest::NameList => "name_list",
            ExtRequest::NameAdd { .. } => "name_add",
            ExtRequest::NameRemove { .. } => "name_remove",
            ExtRequest::Inbox { .. } => "inbox",
            ExtRequest::Received { .. } => "received",
            ExtRequest::TaskSubmit { .. } => "task_submit",
            ExtRequest::TaskList { .. } => "task_list",
            ExtRequest::TaskQueue => "task_queue",
            ExtRequest::TaskAccept { .. } => "task_accept",
            ExtRequest::TaskDecline { .. } => "task_decline",
            ExtRequest::TaskCancel { .. } => "task_cancel",
            ExtRequest::TaskExecute => "task_execute",
            ExtRequest::TaskResults { .. } => "task_results",
        }
    }
}

/// A failed extension request: a stable [`code`] and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ExtError {
    /// One of the [`code`] constants.
    pub code: String,
    /// Human-readable detail.
    pub message: String,
}

impl ExtError {
    /// Builds an error.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ExtError {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

/// The reply to an [`ExtRequest`], body of [`Message::ExtOk`]:
/// `{"status":"ok","data":…}` or `{"status":"error","code":"…","message":"…"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ExtReply {
    /// Success; `data` is the reply type the request documents.
    Ok {
        /// The result.
        #[serde(default)]
        data: serde_json::Value,
    },
    /// Failure.
    Error {
        /// One of the [`code`] constants.
        code: String,
        /// Human-readable detail.
        #[serde(default)]
        message: String,
    },
}

impl ExtReply {
    /// A success carrying `data`. A value that cannot become JSON yields an `internal` error
    /// reply instead.
    pub fn ok<T: Serialize>(data: &T) -> Self {
        match serde_json::to_value(data) {
            Ok(data) => ExtReply::Ok { data },
            Err(e) => ExtReply::error(code::INTERNAL, format!("reply does not serialize: {e}")),
        }
    }

    /// A failure.
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        ExtReply::Error {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// The reply as JSON bytes, for [`Message::ExtOk`].
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a `Value` or two strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a reply body; a body that does not decode is a [`code::BAD_REPLY`] error.
    pub fn from_json(json: &[u8]) -> Result<Self, ExtError> {
        serde_json::from_slice(json).map_err(|e| ExtError::new(code::BAD_REPLY, e.to_string()))
    }

    /// The `data` of a success decoded as `T`, or the error. Data that does not decode as `T`
    /// is a [`code::BAD_REPLY`] error.
    pub fn into_result<T: serde::de::DeserializeOwned>(self) -> Result<T, ExtError> {
        match self {
            ExtReply::Ok { data } => serde_json::from_value(data)
                .map_err(|e| ExtError::new(code::BAD_REPLY, e.to_string())),
            ExtReply::Error { code, message } => Err(ExtError { code, message }),
        }
    }
}

impl From<ExtError> for ExtReply {
    fn from(e: ExtError) -> Self {
        ExtReply::Error {
            code: e.code,
            message: e.message,
        }
    }
}

/// Reply to [`ExtRequest::Peers`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PeersReply {
    /// The peers.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub peers: Vec<PeerInfo>,
    /// Number of peers listed.
    pub total: usize,
}

/// Reply to [`ExtRequest::Connections`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ConnectionsReply {
    /// The connections, TIME_WAIT ones included.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub connections: Vec<ConnInfo>,
    /// Number of connections listed.
    pub total: usize,
}

/// Reply to [`ExtRequest::Disconnect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConnIdReply {
    /// The closed connection.
    pub conn_id: u32,
}

/// Reply naming a node, for [`ExtRequest::Deregister`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeReply {
    /// The node.
    pub node_id: u32,
}

/// Reply to [`ExtRequest::Lookup`]: the registry's public record of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LookupReply {
    /// The node.
    pub node_id: u32,
    /// Its address, text form.
    pub address: String,
    /// Networks it belongs to, 0 included.
    pub networks: Vec<u16>,
    /// Its Ed25519 key, standard base64.
    pub public_key: String,
    /// Whether it is public.
    pub public: bool,
    /// Its hostname, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Its tags.
    pub tags: Vec<String>,
    /// Whether it advertises task execution.
    pub task_exec: bool,
    /// Its UDP endpoint, present only for public nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub real_addr: Option<String>,
}

/// Reply to [`ExtRequest::Register`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RegisterReply {
    /// The node ID the registry holds for this identity.
    pub node_id: u32,
    /// The address, text form.
    pub address: String,
}

/// Reply to [`ExtRequest::RotateKey`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RotateKeyReply {
    /// The node.
    pub node_id: u32,
    /// The new Ed25519 key, standard base64.
    pub public_key: String,
}

/// A network, as [`ExtRequest::NetworkList`] lists it and [`ExtRequest::NetworkCreate`]
/// returns it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkInfo {
    /// Network ID.
    pub id: u16,
    /// Name.
    pub name: String,
    /// Member count.
    pub members: u64,
    /// `open`, `token` or `invite`.
    pub join_rule: String,
}

/// Reply to [`ExtRequest::NetworkList`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworksReply {
    /// The networks.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub networks: Vec<NetworkInfo>,
}

/// Reply to [`ExtRequest::NetworkJoin`], [`ExtRequest::NetworkLeave`] and
/// [`ExtRequest::NetworkInvite`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkReply {
    /// The network.
    pub network_id: u16,
    /// The node that joined, left or was invited.
    pub node_id: u32,
}

/// Reply to [`ExtRequest::Resolve`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ResolveReply {
    /// The node.
    pub node_id: u32,
    /// Its address, text form.
    pub address: String,
    /// Its hostname, when the target was one or the registry knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Whether it is public, when the registry was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<bool>,
}

/// How a probe travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// Straight to the peer's endpoint.
    Direct,
    /// Through the beacon relay.
    Relayed,
}

/// One echo probe of [`ExtRequest::Ping`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PingProbe {
    /// Probe number, from 1.
    pub seq: u32,
    /// Round-trip time in milliseconds (fractional), absent when the probe failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// The tunnel path at the time of the probe, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathKind>,
    /// Why the probe failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Reply to [`ExtRequest::Ping`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PingReply {
    /// The node.
    pub node_id: u32,
    /// Its address, text form.
    pub address: String,
    /// One entry per probe, in order.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub results: Vec<PingProbe>,
}

/// Reply to [`ExtRequest::SetVisibility`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VisibilityReply {
    /// The node.
    pub node_id: u32,
    /// Whether it is now public.
    pub public: bool,
}

/// Reply to [`ExtRequest::SetTags`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TagsReply {
    /// The node.
    pub node_id: u32,
    /// The tags now in effect.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tags: Vec<String>,
}

/// Reply to [`ExtRequest::SetHostname`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostnameReply {
    /// The node.
    pub node_id: u32,
    /// The hostname now in effect, "" if cleared.
    pub hostname: String,
}

/// Reply to [`ExtRequest::SetTaskExec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskExecReply {
    /// The node.
    pub node_id: u32,
    /// Whether task execution is now advertised.
    pub enabled: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_is_listed() {
        assert_eq!(ExtRequest::OPS.len(), 40);
        assert!(ExtRequest::OPS.contains(&ExtRequest::RotateKey.op()));
    }

    #[test]
    fn decoder_reclaims_consumed_bytes() {
        let mut d = FrameDecoder::new();
        let mut wire = Vec::new();
        for port in 0..100u16 {
            Message::Bind { port }.encode(&mut wire).unwrap();
        }
        d.push(&wire);
        let mut n = 0;
        while let Ok(Some(m)) = d.next_message() {
            assert_eq!(m, Message::Bind { port: n });
            n += 1;
        }
        assert_eq!(n, 100);
        assert_eq!(d.buffered(), 0);
        d.push(&[0, 0]);
        assert_eq!(d.buf.len(), 2);
    }
}

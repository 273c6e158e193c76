//! Data exchange server (virtual port 1001, v1 wire §8.2): typed messages and files between
//! nodes.
//!
//! The frame codec is [`tunnel::services::dataexchange`] (sans-IO) and the client calls
//! (`send_message`, `send_file`) are in [`pilot_driver::services::dataexchange`]. This module
//! holds the server the daemon runs on [`DATA_PORT`], the name policy for received files
//! ([`sanitize_file_name`]) and the functions that list and clear what was received
//! ([`list_inbox`], [`clear_inbox`], [`list_received`], [`clear_received`]).
//!
//! # Server
//!
//! One task per connection reads frames in a loop and answers each with a TEXT frame,
//! `ACK <TYPE> <n> bytes` (n: the payload length, or the file size for FILE_STREAM) or
//! `ERR <TYPE> <reason>`.
//!
//! - FILE and FILE_STREAM: the bytes go to a temporary file (a dot file, mode 0600) in
//!   `<home>/received/` (mode 0700), which is linked under its final name only once complete
//!   and synced; an interrupted or refused transfer leaves nothing behind. The final name is
//!   the sender's name through [`sanitize_file_name`], with `-1`, `-2`, ... before the
//!   extension when taken; an existing file is never replaced. Files over
//!   [`DataExchangeConfig::max_file_size`], or that would take `received/` over
//!   [`DataExchangeConfig::max_received_bytes`], are refused before any byte is written.
//!   Event `file.received` {filename, size, path, from}.
//! - TEXT, JSON, BINARY: stored as `<home>/inbox/<TYPE>-<YYYYMMDD-HHMMSS.mmm>[-k].json` (UTC),
//!   `{"id","type","from","data","bytes","received_at"}`; TEXT and JSON data is the payload
//!   as UTF-8 (invalid sequences replaced by U+FFFD), BINARY data is standard base64 with
//!   `"encoding":"base64"`. The inbox holds at most [`DataExchangeConfig::max_inbox_messages`]
//!   files and [`DataExchangeConfig::max_inbox_bytes`] bytes; a message beyond either is
//!   refused (`ERR <TYPE> inbox full`) and nothing stored is dropped. Event
//!   `message.received` {type, from, size}.
//! - Unknown types are read, discarded and ACKed (as v1 does) and counted as bad frames.
//! - A length over the limit is answered with ERR and the connection is closed without
//!   reading or allocating the payload. Message payloads in memory across all connections
//!   are bounded by [`MESSAGE_MEMORY`] (a message that cannot get its share within 30 s is
//!   answered `ERR <TYPE> busy` and its connection closed); file bytes are never held whole.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use pilot_driver::services::dataexchange::{read_header, read_payload, write_frame};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
pub use tunnel::services::dataexchange::DATA_PORT;
use tunnel::services::dataexchange::{
    parse_frame_header, parse_stream_header, FrameError, FrameHeader, FrameType, HEADER_LEN,
    MAX_PAYLOAD,
};
use tunnel::SocketAddr as PilotAddr;

use crate::engine::{BindError, EngineHandle};
use crate::events::Events;
use crate::local::LocalListener;
use crate::ratelog::LogGate;
use crate::trust::format_rfc3339;

// ---------------------------------------------------------------------------------------
// Implementation limits

/// Message payload bytes held in memory by the server across all connections.
pub const MESSAGE_MEMORY: u32 = 64 << 20;
/// Longest stored file name in bytes (the extension is kept).
pub const NAME_MAX: usize = 128;
/// Longest extension [`sanitize_file_name`] keeps when it shortens a name.
const EXT_MAX: usize = 16;
/// Default largest received file.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 1 << 30;
/// Default total bytes in `received/`.
pub const DEFAULT_MAX_RECEIVED_BYTES: u64 = 16 << 30;
/// Default most messages in `inbox/`.
pub const DEFAULT_MAX_INBOX_MESSAGES: usize = 1000;
/// Default total bytes in `inbox/`.
pub const DEFAULT_MAX_INBOX_BYTES: u64 = 64 << 20;
/// File bytes moved per disk write.
const IO_CHUNK: usize = 1 << 20;
/// How long a message waits for its share of [`MESSAGE_MEMORY`] before it is refused.
const MEMORY_WAIT: Duration = Duration::from_secs(30);
/// How long a connection is drained after a closing ERR, so the reply gets out.
const LINGER: Duration = Duration::from_secs(2);
/// Most `-k` suffixes tried for a free name.
const MAX_SUFFIX: u32 = 10_000;
/// Problems are logged at most once per interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Prefix of the temporary files of transfers in progress.
const TMP_FILE_PREFIX: &str = ".incoming-";
/// Prefix of the temporary files of messages being stored.
const TMP_MSG_PREFIX: &str = ".msg-";

/// Subdirectory of the home for received files.
pub const RECEIVED_DIR: &str = "received";
/// Subdirectory of the home for messages.
pub const INBOX_DIR: &str = "inbox";

/// Reads and discards `n` bytes.
async fn discard<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut (&mut *r).take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// File names

/// A file name a peer sent, made safe to create inside `received/`: only its last path
/// component (after `/` or `\`), without control characters, bidirectional-text controls,
/// leading dots, dashes and white space, and trailing white space; empty, `.` and `..`
/// become `file`. Longer than [`NAME_MAX`] bytes it is cut, keeping an extension of up to
/// 16 bytes. Invalid UTF-8 is replaced by U+FFFD.
pub fn sanitize_file_name(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let last = text.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = last.chars().filter(|&c| !unsafe_char(c)).collect();
    let trimmed = cleaned
        .trim_start_matches(|c: char| c == '.' || c == '-' || c.is_whitespace())
        .trim_end();
    if trimmed.is_empty() {
        return "file".to_owned();
    }
    truncate_keep_ext(trimmed, NAME_MAX)
}

fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '/' | '\\'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}')
}

/// `(stem, extension with its dot)`; no extension when the only dot leads.
fn split_ext(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(i) if i > 0 => name.split_at(i),
        _ => (name, ""),
    }
}

fn truncate_keep_ext(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_owned();
    }
    let (stem, ext) = match split_ext(name) {
        (stem, ext) if ext.len() <= EXT_MAX => (stem, ext),
        _ => (name, ""),
    };
    let mut keep = max.saturating_sub(ext.len());
    while !stem.is_char_boundary(keep) {
        keep -= 1;
    }
    let stem = stem.get(..keep).unwrap_or_default().trim_end();
    let stem = if stem.is_empty() { "file" } else { stem };
    format!("{stem}{ext}")
}

/// `name` with `-k` before its extension (`k` = 0 gives `name`).
fn with_suffix(name: &str, k: u32) -> String {
    if k == 0 {
        return name.to_owned();
    }
    let (stem, ext) = split_ext(name);
    format!("{stem}-{k}{ext}")
}

// ---------------------------------------------------------------------------------------
// Server

/// Server settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataExchangeConfig {
    /// The home directory; files go to `<home>/received/`, messages to `<home>/inbox/`.
    pub home: PathBuf,
    /// Largest file accepted, in bytes.
    pub max_file_size: u64,
    /// Most bytes in `received/` together; 0: no limit.
    pub max_received_bytes: u64,
    /// Most messages in `inbox/`.
    pub max_inbox_messages: usize,
    /// Most bytes in `inbox/` together.
    pub max_inbox_bytes: u64,
}

impl DataExchangeConfig {
    /// The defaults for `home`.
    pub fn new(home: impl Into<PathBuf>) -> DataExchangeConfig {
        DataExchangeConfig {
            home: home.into(),
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            max_received_bytes: DEFAULT_MAX_RECEIVED_BYTES,
            max_inbox_messages: DEFAULT_MAX_INBOX_MESSAGES,
            max_inbox_bytes: DEFAULT_MAX_INBOX_BYTES,
        }
    }
}

/// The server's counters.
#[derive(Debug, Default)]
pub struct DataExchangeStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Messages stored.
    pub messages: AtomicU64,
    /// Files stored.
    pub files: AtomicU64,
    /// File bytes stored.
    pub file_bytes: AtomicU64,
    /// Frames with a bad length, a malformed name field or an unknown type.
    pub bad_frames: AtomicU64,
    /// Messages and files refused for a limit (size, quota, full inbox).
    pub refused: AtomicU64,
    /// Messages and files that could not be stored (disk errors).
    pub save_errors: AtomicU64,
    /// Transfers cut short by the peer.
    pub truncated: AtomicU64,
}

impl DataExchangeStats {
    /// The counters as a JSON object (for Info and metrics).
    pub fn snapshot(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "connections": g(&self.connections),
            "messages": g(&self.messages),
            "files": g(&self.files),
            "file_bytes": g(&self.file_bytes),
            "bad_frames": g(&self.bad_frames),
            "refused": g(&self.refused),
            "save_errors": g(&self.save_errors),
            "truncated": g(&self.truncated),
        })
    }
}

/// Why the service did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A directory could not be created.
    #[error("data exchange: cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The port could not be bound.
    #[error("data exchange: cannot listen on port {DATA_PORT}: {0}")]
    Bind(BindError),
}

/// The running service. Dropping it leaves it running until the engine stops; [`stop`]
/// stops accepting connections.
///
/// [`stop`]: DataExchange::stop
#[derive(Debug)]
pub struct DataExchange {
    service: Arc<Service>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts the data exchange service on [`DATA_PORT`] of `engine`: creates the directories,
/// removes temporary files an earlier run left, and serves each connection in its own task.
pub async fn start(
    engine: &EngineHandle,
    cfg: DataExchangeConfig,
    events: Events,
) -> Result<DataExchange, StartError> {
    let service = Service::open(cfg, events).await?;
    let mut listener = LocalListener::bind(engine, DATA_PORT)
        .await
        .map_err(StartError::Bind)?;
    let svc = service.clone();
    let task = tokio::spawn(async move {
        while let Some((stream, remote)) = listener.accept().await {
            let svc = svc.clone();
            tokio::spawn(async move { svc.serve(stream, remote).await });
        }
    });
    Ok(DataExchange { service, task })
}

impl DataExchange {
    /// A service that is not bound to any port; [`serve`](DataExchange::serve) feeds it
    /// streams. For tests and other transports.
    pub async fn unbound(cfg: DataExchangeConfig, events: Events) -> Result<Self, StartError> {
        let service = Service::open(cfg, events).await?;
        Ok(DataExchange {
            service,
            task: tokio::spawn(async {}),
        })
    }

    /// Serves one connection from `from` until it ends.
    pub async fn serve<S>(&self, stream: S, from: PilotAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.service.serve(stream, from).await;
    }

    /// Stores text received some other way (the stdio service) in the inbox as a TEXT
    /// message from `from`, with its `message.received` event; the message ID, or why not.
    pub async fn store_text(&self, from: PilotAddr, text: Vec<u8>) -> Result<String, StoreError> {
        let svc = self.service.clone();
        let sender = from.addr.to_string();
        let len = text.len();
        let saved =
            blocking(move || svc.save_message(FrameType::Text, &sender, &text, SystemTime::now()))
                .await;
        match saved {
            Ok(Ok(id)) => {
                self.service.stats.messages.fetch_add(1, Ordering::Relaxed);
                self.service.events.emit(
                    "message.received",
                    json!({"type": "TEXT", "from": from.addr.to_string(), "size": len}),
                );
                Ok(id)
            }
            Ok(Err(SaveError::Full)) => Err(StoreError::Full),
            Ok(Err(SaveError::Io(e))) | Err(e) => Err(StoreError::Save(e)),
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<DataExchangeStats> {
        self.service.stats.clone()
    }

    /// The settings.
    pub fn config(&self) -> &DataExchangeConfig {
        &self.service.cfg
    }

    /// Stops accepting connections and unbinds the port; connections being served finish.
    pub fn stop(self) {
        self.task.abort();
    }
}

/// Space used in a directory, as far as the service knows.
#[derive(Debug, Default)]
struct Tally {
    /// Whether `files` and `bytes` come from a scan.
    scanned: bool,
    files: usize,
    bytes: u64,
    /// Bytes reserved by transfers in progress.
    pending: u64,
    /// The inbox's newest name stamp and its suffix.
    last_stamp: String,
    last_k: u32,
}

#[derive(Debug)]
struct Service {
    cfg: DataExchangeConfig,
    received: PathBuf,
    inbox: PathBuf,
    events: Events,
    stats: Arc<DataExchangeStats>,
    memory: Arc<Semaphore>,
    received_tally: Arc<Mutex<Tally>>,
    inbox_tally: Mutex<Tally>,
    warn: LogGate,
    seq: AtomicU64,
}

/// What the connection loop does after a frame.
enum Step {
    Reply(String),
    ReplyAndClose(String),
    Close,
}

/// Why a file was not stored.
enum RecvError {
    /// Refused before reading its bytes.
    Refused(String),
    /// The disk failed; `left` bytes of the file were not read.
    Disk { error: io::Error, left: u64 },
    /// The peer failed or ended inside the file.
    Peer,
}

/// Why no file could be opened for a transfer.
enum Open {
    Quota,
    Io(io::Error),
}

/// Why a message was not stored.
enum SaveError {
    Full,
    Io(io::Error),
}

/// Why [`DataExchange::store_text`] did not store a message; the text is what the stdio
/// service answers after `ERR `.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The inbox holds as many messages or bytes as it may.
    #[error("inbox full")]
    Full,
    /// The message file could not be written.
    #[error("save failed: {0}")]
    Save(io::Error),
}

impl Service {
    async fn open(cfg: DataExchangeConfig, events: Events) -> Result<Arc<Service>, StartError> {
        let received = cfg.home.join(RECEIVED_DIR);
        let inbox = cfg.home.join(INBOX_DIR);
        let dirs = [received.clone(), inbox.clone()];
        blocking(move || {
            for d in &dirs {
                make_private_dir(d).map_err(|source| StartError::Dir {
                    path: d.clone(),
                    source,
                })?;
            }
            remove_temps(&dirs[0], TMP_FILE_PREFIX);
            remove_temps(&dirs[1], TMP_MSG_PREFIX);
            Ok(())
        })
        .await
        .map_err(|source| StartError::Dir {
            path: cfg.home.clone(),
            source,
        })??;
        Ok(Arc::new(Service {
            cfg,
            received,
            inbox,
            events,
            stats: Arc::default(),
            memory: Arc::new(Semaphore::new(MESSAGE_MEMORY as usize)),
            received_tally: Arc::default(),
            inbox_tally: Mutex::default(),
            warn: LogGate::new(WARN_INTERVAL),
            seq: AtomicU64::new(0),
        }))
    }

    /// Logs a problem, at most once per [`WARN_INTERVAL`].
    fn warn(&self, peer: &PilotAddr, what: &str) {
        if let Some(suppressed) = self.warn.allow() {
            tracing::warn!(peer = %peer, suppressed, "data exchange: {what}");
        }
    }

    fn bad_frame(&self, peer: &PilotAddr, what: &str) {
        self.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
        self.warn(peer, what);
    }

    async fn serve<S>(self: &Arc<Self>, mut s: S, from: PilotAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        loop {
            let mut h = [0u8; HEADER_LEN];
            match read_header(&mut s, &mut h).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => {
                    self.stats.truncated.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            let step = match parse_frame_header(&h) {
                Ok(FrameHeader { kind, len }) => match kind {
                    FrameType::Text | FrameType::Binary | FrameType::Json => {
                        self.on_message(&mut s, kind, len, &from).await
                    }
                    FrameType::File => self.on_file(&mut s, len, &from).await,
                    FrameType::FileStream => self.on_stream(&mut s, len, &from).await,
                    FrameType::Unknown(_) => {
                        self.bad_frame(&from, &format!("unknown frame type {kind}"));
                        match discard(&mut s, u64::from(len)).await {
                            Ok(()) => Step::Reply(format!("ACK {kind} {len} bytes")),
                            Err(_) => Step::Close,
                        }
                    }
                },
                Err(FrameError::TooLarge { kind, len, max }) => {
                    self.bad_frame(&from, &format!("{kind} frame of {len} bytes refused"));
                    Step::ReplyAndClose(format!(
                        "ERR {kind} frame too large: {len} bytes (limit {max})"
                    ))
                }
                Err(_) => Step::Close,
            };
            match step {
                Step::Reply(text) => {
                    if write_frame(&mut s, FrameType::Text, text.as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Step::ReplyAndClose(text) => {
                    if write_frame(&mut s, FrameType::Text, text.as_bytes())
                        .await
                        .is_ok()
                    {
                        linger(&mut s).await;
                    }
                    return;
                }
                Step::Close => return,
            }
        }
    }

    async fn on_message<S>(
        self: &Arc<Self>,
        s: &mut S,
        kind: FrameType,
        len: u32,
        from: &PilotAddr,
    ) -> Step
    where
        S: AsyncRead + Unpin,
    {
        // `len` is at most MAX_PAYLOAD, below the semaphore's size. The whole payload is
        // reserved before reading, so readers never wait on each other half-way; a peer
        // that announces much and sends slowly holds its share, so waiting is bounded.
        let permits =
            match tokio::time::timeout(MEMORY_WAIT, self.memory.clone().acquire_many_owned(len))
                .await
            {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => return Step::Close,
                Err(_) => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    self.warn(from, "message memory exhausted; message refused");
                    return Step::ReplyAndClose(format!("ERR {kind} busy"));
                }
            };
        let Ok(payload) = read_payload(s, len).await else {
            self.stats.truncated.fetch_add(1, Ordering::Relaxed);
            return Step::Close;
        };
        let svc = self.clone();
        let sender = from.addr.to_string();
        let saved = blocking(move || {
            let r = svc.save_message(kind, &sender, &payload, SystemTime::now());
            drop(permits);
            r
        })
        .await;
        match saved {
            Ok(Ok(_id)) => {
                self.stats.messages.fetch_add(1, Ordering::Relaxed);
                self.events.emit(
                    "message.received",
                    json!({"type": kind.to_string(), "from": from.addr.to_string(), "size": len}),
                );
                Step::Reply(format!("ACK {kind} {len} bytes"))
            }
            Ok(Err(SaveError::Full)) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                self.warn(from, "inbox full; message refused");
                Step::Reply(format!("ERR {kind} inbox full"))
            }
            Ok(Err(SaveError::Io(e))) | Err(e) => {
                self.stats.save_errors.fetch_add(1, Ordering::Relaxed);
                self.warn(from, &format!("cannot store a message: {e}"));
                Step::Reply(format!("ERR {kind} save failed: {e}"))
            }
        }
    }

    /// A v1 FILE frame of `len` payload bytes; its header is read.
    async fn on_file<S>(self: &Arc<Self>, s: &mut S, len: u32, from: &PilotAddr) -> Step
    where
        S: AsyncRead + Unpin,
    {
        let kind = FrameType::File;
        let len64 = u64::from(len);
        if len < 2 {
            self.bad_frame(from, "FILE frame without a name length");
            return match discard(s, len64).await {
                Ok(()) => Step::Reply(format!("ERR {kind} malformed file header")),
                Err(_) => Step::Close,
            };
        }
        let mut nl = [0u8; 2];
        if s.read_exact(&mut nl).await.is_err() {
            self.stats.truncated.fetch_add(1, Ordering::Relaxed);
            return Step::Close;
        }
        let name_len = u32::from(u16::from_be_bytes(nl));
        if name_len + 2 > len {
            self.bad_frame(from, "FILE frame whose name is longer than its payload");
            return match discard(s, len64 - 2).await {
                Ok(()) => Step::Reply(format!("ERR {kind} malformed file header")),
                Err(_) => Step::Close,
            };
        }
        let Ok(name) = read_payload(s, name_len).await else {
            self.stats.truncated.fetch_add(1, Ordering::Relaxed);
            return Step::Close;
        };
        let size = u64::from(len - 2 - name_len);
        match self.receive_file(s, &name, size, from).await {
            Ok(()) => Step::Reply(format!("ACK {kind} {len} bytes")),
            Err(RecvError::Refused(why)) => match discard(s, size).await {
                Ok(()) => Step::Reply(format!("ERR {kind} {why}")),
                Err(_) => Step::Close,
            },
            Err(RecvError::Disk { error, left }) => match discard(s, left).await {
                Ok(()) => Step::Reply(format!("ERR {kind} save failed: {error}")),
                Err(_) => Step::Close,
            },
            Err(RecvError::Peer) => Step::Close,
        }
    }

    /// A FILE_STREAM frame of `len` payload bytes; its header is read.
    async fn on_stream<S>(self: &Arc<Self>, s: &mut S, len: u32, from: &PilotAddr) -> Step
    where
        S: AsyncRead + Unpin,
    {
        let kind = FrameType::FileStream;
        let Ok(payload) = read_payload(s, len).await else {
            self.stats.truncated.fetch_add(1, Ordering::Relaxed);
            return Step::Close;
        };
        let Ok((size, name)) = parse_stream_header(&payload) else {
            self.bad_frame(from, "malformed FILE_STREAM header");
            return Step::ReplyAndClose(format!("ERR {kind} malformed file header"));
        };
        match self.receive_file(s, name, size, from).await {
            Ok(()) => Step::Reply(format!("ACK {kind} {size} bytes")),
            Err(RecvError::Refused(why)) => Step::ReplyAndClose(format!("ERR {kind} {why}")),
            Err(RecvError::Disk { error, .. }) => {
                Step::ReplyAndClose(format!("ERR {kind} save failed: {error}"))
            }
            Err(RecvError::Peer) => Step::Close,
        }
    }

    /// Reads `size` file bytes from `s` into `received/` under the sanitized `raw_name`.
    async fn receive_file<S>(
        self: &Arc<Self>,
        s: &mut S,
        raw_name: &[u8],
        size: u64,
        from: &PilotAddr,
    ) -> Result<(), RecvError>
    where
        S: AsyncRead + Unpin,
    {
        let name = sanitize_file_name(raw_name);
        if size > self.cfg.max_file_size {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            self.warn(from, &format!("file of {size} bytes over the size limit"));
            return Err(RecvError::Refused(format!(
                "file too large: {size} bytes (limit {})",
                self.cfg.max_file_size
            )));
        }
        let svc = self.clone();
        let opened = blocking(move || {
            let reservation = svc.reserve_received(size).map_err(Open::Io)?;
            let Some(reservation) = reservation else {
                return Err(Open::Quota);
            };
            let (file, tmp) = svc
                .create_temp(&svc.received, TMP_FILE_PREFIX)
                .map_err(Open::Io)?;
            Ok((reservation, file, tmp))
        })
        .await;
        let (mut reservation, file, tmp) = match opened {
            Ok(Ok(v)) => v,
            Ok(Err(Open::Quota)) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                self.warn(from, "received files over their quota; file refused");
                return Err(RecvError::Refused("received files over quota".into()));
            }
            Ok(Err(Open::Io(error))) | Err(error) => {
                self.stats.save_errors.fetch_add(1, Ordering::Relaxed);
                self.warn(from, &format!("cannot create a file: {error}"));
                return Err(RecvError::Disk { error, left: size });
            }
        };
        let mut file = Some(file);
        let mut buf = vec![0u8; IO_CHUNK.min(usize::try_from(size).unwrap_or(IO_CHUNK))];
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
            let Some(chunk) = buf.get_mut(..want) else {
                return Err(RecvError::Peer);
            };
            if s.read_exact(chunk).await.is_err() {
                self.stats.truncated.fetch_add(1, Ordering::Relaxed);
                return Err(RecvError::Peer);
            }
            let Some(f) = file.take() else {
                return Err(RecvError::Peer);
            };
            let data = std::mem::take(&mut buf);
            let written = blocking(move || {
                let mut f = f;
                let r = f.write_all(&data[..want]);
                (f, data, r)
            })
            .await;
            match written {
                Ok((f, data, Ok(()))) => {
                    file = Some(f);
                    buf = data;
                    left -= want as u64;
                }
                Ok((_, _, Err(error))) | Err(error) => {
                    self.stats.save_errors.fetch_add(1, Ordering::Relaxed);
                    self.warn(from, &format!("cannot write a file: {error}"));
                    return Err(RecvError::Disk {
                        error,
                        left: left - want as u64,
                    });
                }
            }
        }
        let Some(f) = file.take() else {
            return Err(RecvError::Peer);
        };
        let dir = self.received.clone();
        let placed = blocking(move || {
            f.sync_all()?;
            drop(f);
            let placed = place_unique(&dir, tmp.path(), &name);
            // Linked under its final name (or failed): the temporary name goes either way.
            drop(tmp);
            placed
        })
        .await;
        let (final_name, path) = match placed {
            Ok(Ok(p)) => p,
            Ok(Err(error)) | Err(error) => {
                self.stats.save_errors.fetch_add(1, Ordering::Relaxed);
                self.warn(from, &format!("cannot store a file: {error}"));
                return Err(RecvError::Disk { error, left: 0 });
            }
        };
        reservation.commit();
        self.stats.files.fetch_add(1, Ordering::Relaxed);
        self.stats.file_bytes.fetch_add(size, Ordering::Relaxed);
        self.events.emit(
            "file.received",
            json!({
                "filename": final_name,
                "size": size,
                "path": path.display().to_string(),
                "from": from.addr.to_string(),
            }),
        );
        Ok(())
    }

    /// Reserves `size` bytes of the received quota; `None` when over it.
    fn reserve_received(&self, size: u64) -> io::Result<Option<Reservation>> {
        let quota = self.cfg.max_received_bytes;
        let mut t = lock(&self.received_tally);
        let fits = |t: &Tally| {
            quota == 0 || t.bytes.saturating_add(t.pending).saturating_add(size) <= quota
        };
        if quota != 0 && (!t.scanned || !fits(&t)) {
            // Files may have been cleared since the last scan.
            let (files, bytes) = dir_usage(&self.received, |_| true)?;
            t.files = files;
            t.bytes = bytes;
            t.scanned = true;
        }
        if !fits(&t) {
            return Ok(None);
        }
        t.pending += size;
        Ok(Some(Reservation {
            tally: self.received_tally.clone(),
            size,
            committed: false,
        }))
    }

    /// Creates a new temporary file (mode 0600) in `dir`.
    fn create_temp(&self, dir: &Path, prefix: &str) -> io::Result<(fs::File, TempPath)> {
        loop {
            let n = self.seq.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("{prefix}{}-{n}.part", std::process::id()));
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(f) => return Ok((f, TempPath(Some(path)))),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores a message in the inbox; returns its ID.
    fn save_message(
        &self,
        kind: FrameType,
        from: &str,
        payload: &[u8],
        now: SystemTime,
    ) -> Result<String, SaveError> {
        let (data, encoding) = match kind {
            FrameType::Binary => (
                base64::engine::general_purpose::STANDARD.encode(payload),
                Some("base64"),
            ),
            _ => (String::from_utf8_lossy(payload).into_owned(), None),
        };
        let ms = now
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let stamp = name_stamp(ms);
        let base = format!("{kind}-{stamp}");
        let received_at = rfc3339_millis(ms);
        // The inbox lock orders stores: the count check, the name choice and the link.
        let mut t = lock(&self.inbox_tally);
        // Within one millisecond the suffix counts on across types, so that (stamp, suffix)
        // orders messages by arrival.
        let first = if t.last_stamp == stamp {
            t.last_k.saturating_add(1)
        } else {
            0
        };
        for k in first..first.saturating_add(MAX_SUFFIX) {
            let id = if k == 0 {
                base.clone()
            } else {
                format!("{base}-{k}")
            };
            let path = self.inbox.join(format!("{id}.json"));
            if fs::symlink_metadata(&path).is_ok() {
                continue;
            }
            let mut doc = json!({
                "id": id,
                "type": kind.to_string(),
                "from": from,
                "data": data,
                "bytes": payload.len(),
                "received_at": received_at,
            });
            if let (Some(enc), Some(obj)) = (encoding, doc.as_object_mut()) {
                obj.insert("encoding".into(), enc.into());
            }
            let body = serde_json::to_vec(&doc).map_err(|e| SaveError::Io(e.into()))?;
            let size = body.len() as u64;
            let fits = |t: &Tally| {
                t.files < self.cfg.max_inbox_messages
                    && t.bytes.saturating_add(size) <= self.cfg.max_inbox_bytes
            };
            if !t.scanned || !fits(&t) {
                // Messages may have been cleared since the last scan.
                let (files, bytes) =
                    dir_usage(&self.inbox, is_message_file).map_err(SaveError::Io)?;
                t.files = files;
                t.bytes = bytes;
                t.scanned = true;
                if !fits(&t) {
                    return Err(SaveError::Full);
                }
            }
            let (mut file, tmp) = self
                .create_temp(&self.inbox, TMP_MSG_PREFIX)
                .map_err(SaveError::Io)?;
            // Not synced: a message is small and many may arrive; the link below makes it
            // visible only once written.
            file.write_all(&body).map_err(SaveError::Io)?;
            drop(file);
            let linked = link_no_replace(tmp.path(), &path);
            // Linked under its final name (or failed): the temporary name goes either way.
            drop(tmp);
            match linked {
                Ok(()) => {
                    t.files += 1;
                    t.bytes += size;
                    t.last_stamp = stamp;
                    t.last_k = k;
                    return Ok(id);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(SaveError::Io(e)),
            }
        }
        Err(SaveError::Io(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free message name",
        )))
    }
}

/// A share of the received quota, released when dropped (kept as used when committed).
struct Reservation {
    tally: Arc<Mutex<Tally>>,
    size: u64,
    committed: bool,
}

impl Reservation {
    fn commit(&mut self) {
        self.committed = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut t = lock(&self.tally);
        t.pending = t.pending.saturating_sub(self.size);
        if self.committed {
            t.files += 1;
            t.bytes = t.bytes.saturating_add(self.size);
        }
    }
}

/// A temporary file name, removed when dropped (after the file got its final name, only
/// that second name remains).
struct TempPath(Option<PathBuf>);

impl TempPath {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Links `tmp` as `name` (or `name-1`, `name-2`, ...) in `dir` without replacing anything;
/// returns the name and path used. The caller removes `tmp`'s name afterwards.
fn place_unique(dir: &Path, tmp: &Path, name: &str) -> io::Result<(String, PathBuf)> {
    for k in 0..MAX_SUFFIX {
        let candidate = with_suffix(name, k);
        let path = dir.join(&candidate);
        match link_no_replace(tmp, &path) {
            Ok(()) => return Ok((candidate, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("no free name for {name} in {}", dir.display()),
    ))
}

/// Gives `tmp`'s file the name `path` unless `path` exists (`AlreadyExists`). A hard link
/// where the file system has them; elsewhere the name is claimed with an exclusive create
/// and `tmp` renamed onto it.
fn link_no_replace(tmp: &Path, path: &Path) -> io::Result<()> {
    match fs::hard_link(tmp, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
        Err(_) => {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            fs::rename(tmp, path)
        }
    }
}

fn make_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn remove_temps(dir: &Path, prefix: &str) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn is_message_file(name: &str) -> bool {
    !name.starts_with('.') && name.ends_with(".json")
}

/// Count and total size of the visible regular files in `dir` whose names pass `keep`.
fn dir_usage(dir: &Path, keep: impl Fn(&str) -> bool) -> io::Result<(usize, u64)> {
    let mut files = 0;
    let mut bytes = 0u64;
    for e in fs::read_dir(dir)?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !keep(&name) {
            continue;
        }
        if let Ok(m) = e.metadata() {
            if m.is_file() {
                files += 1;
                bytes = bytes.saturating_add(m.len());
            }
        }
    }
    Ok((files, bytes))
}

/// Waits briefly for the peer to finish after a closing reply, discarding what it sends.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let _ = s.shutdown().await;
    let _ = tokio::time::timeout(LINGER, tokio::io::copy(s, &mut tokio::io::sink())).await;
}

async fn blocking<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `YYYYMMDD-HHMMSS.mmm` (UTC) of Unix milliseconds.
fn name_stamp(ms: i64) -> String {
    let t = format_rfc3339(ms.div_euclid(1000));
    // 2006-01-02T15:04:05Z
    let digits: String = t.chars().filter(char::is_ascii_digit).collect();
    let (date, time) = digits.split_at(digits.len().saturating_sub(6));
    format!("{date}-{time}.{:03}", ms.rem_euclid(1000))
}

/// RFC 3339 with milliseconds (UTC) of Unix milliseconds.
fn rfc3339_millis(ms: i64) -> String {
    let t = format_rfc3339(ms.div_euclid(1000));
    let t = t.strip_suffix('Z').unwrap_or(&t);
    format!("{t}.{:03}Z", ms.rem_euclid(1000))
}

// ---------------------------------------------------------------------------------------
// Listing and clearing (for the IPC server and pilotctl)

/// A stored message, as [`list_inbox`] returns it and as its file holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxMessage {
    /// Its ID: the file name without `.json`.
    #[serde(default)]
    pub id: String,
    /// `TEXT`, `JSON` or `BINARY`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The sender's address.
    #[serde(default)]
    pub from: String,
    /// The payload: UTF-8 text, or base64 when `encoding` is `base64`.
    #[serde(default)]
    pub data: String,
    /// `base64` for BINARY messages stored by this daemon; absent for text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// Payload length in bytes.
    #[serde(default)]
    pub bytes: u64,
    /// When it arrived (RFC 3339, UTC).
    #[serde(default)]
    pub received_at: String,
}

impl InboxMessage {
    /// The payload bytes (base64 decoded when so encoded).
    pub fn payload(&self) -> Vec<u8> {
        match self.encoding.as_deref() {
            Some("base64") => base64::engine::general_purpose::STANDARD
                .decode(&self.data)
                .unwrap_or_else(|_| self.data.as_bytes().to_vec()),
            _ => self.data.as_bytes().to_vec(),
        }
    }
}

/// A received file, as [`list_received`] returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedFile {
    /// File name.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Last modification (RFC 3339, UTC).
    pub modified: String,
    /// Full path.
    pub path: String,
}

/// `<home>/inbox`.
pub fn inbox_dir(home: &Path) -> PathBuf {
    home.join(INBOX_DIR)
}

/// `<home>/received`.
pub fn received_dir(home: &Path) -> PathBuf {
    home.join(RECEIVED_DIR)
}

/// Stored messages, oldest first (by arrival time in the name, then arrival order within a
/// millisecond). Unreadable files are skipped. Blocking: call from `spawn_blocking` in async
/// code.
pub fn list_inbox(home: &Path) -> io::Result<Vec<InboxMessage>> {
    let dir = inbox_dir(home);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_message_file(&name) {
            continue;
        }
        let Ok(m) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        // Bounded: a message is at most 16 MiB, base64 makes it 4/3 of that.
        if !m.is_file() || m.len() > 2 * u64::from(MAX_PAYLOAD) + 4096 {
            continue;
        }
        let Ok(body) = fs::read(e.path()) else {
            continue;
        };
        let Ok(mut msg) = serde_json::from_slice::<InboxMessage>(&body) else {
            tracing::debug!(file = %name, "inbox: not a message; skipped");
            continue;
        };
        msg.id = name.trim_end_matches(".json").to_owned();
        out.push(msg);
    }
    out.sort_by_cached_key(|m| inbox_order(&m.id));
    Ok(out)
}

/// Sort key of a message ID `<TYPE>-<YYYYMMDD-HHMMSS.mmm>[-k]`: stamp, k, ID. Other IDs sort
/// first, by name.
fn inbox_order(id: &str) -> (String, u32, String) {
    let parsed = id.split_once('-').and_then(|(_, rest)| {
        let stamp = rest.get(..19)?;
        let k = match rest.get(19..)? {
            "" => 0,
            s => s.strip_prefix('-')?.parse().ok()?,
        };
        Some((stamp.to_owned(), k))
    });
    match parsed {
        Some((stamp, k)) => (stamp, k, id.to_owned()),
        None => (String::new(), 0, id.to_owned()),
    }
}

/// Removes every stored message; returns how many. Blocking.
pub fn clear_inbox(home: &Path) -> io::Result<usize> {
    clear_dir(&inbox_dir(home), is_message_file)
}

/// Received files, oldest first (by modification time, then name). Files being received are
/// not listed. Blocking.
pub fn list_received(home: &Path) -> io::Result<Vec<ReceivedFile>> {
    let dir = received_dir(home);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let Ok(m) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        if !m.is_file() {
            continue;
        }
        let modified = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        out.push((
            modified,
            ReceivedFile {
                name,
                bytes: m.len(),
                modified: format_rfc3339(modified),
                path: e.path().display().to_string(),
            },
        ));
    }
    out.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
    Ok(out.into_iter().map(|(_, f)| f).collect())
}

/// Removes every received file (not transfers in progress); returns how many. Blocking.
pub fn clear_received(home: &Path) -> io::Result<usize> {
    clear_dir(&received_dir(home), |_| true)
}

fn clear_dir(dir: &Path, keep: impl Fn(&str) -> bool) -> io::Result<usize> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !keep(&name) {
            continue;
        }
        let is_file = fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_file());
        if is_file && fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use pilot_driver::services::dataexchange::{
        read_frame, send_file, send_message, SendError, MAX_REPLY, REPLY_GRACE,
    };
    use tokio::io::AsyncWriteExt;
    use tunnel::services::dataexchange::{encode_file_prefix, encode_stream_header};
    use tunnel::Addr;

    fn peer() -> PilotAddr {
        PilotAddr::new(Addr::new(0, 7), 49152)
    }

    /// Names that must come out safe, and what they become.
    const HOSTILE: &[(&[u8], &str)] = &[
        (b"../../etc/passwd", "passwd"),
        (b"..", "file"),
        (b".", "file"),
        (b"", "file"),
        (b"/", "file"),
        (b"a/b/", "file"),
        (b"..\\..\\windows\\system32\\cmd.exe", "cmd.exe"),
        (b".bashrc", "bashrc"),
        (b"...hidden", "hidden"),
        (b"evil\0name.txt", "evilname.txt"),
        (b"line\nbreak\r.txt", "linebreak.txt"),
        (b"\x1b[31mred", "[31mred"),
        (b"-rf", "rf"),
        (b"  spaced  ", "spaced"),
        (b"tab\tname", "tabname"),
        (b"\xff\xfe.bin", "\u{FFFD}\u{FFFD}.bin"),
        ("rtl\u{202E}txt.exe".as_bytes(), "rtltxt.exe"),
        (b"report.pdf", "report.pdf"),
        (b"..\0..", "file"),
        (b"/..", "file"),
        (b"dir/..", "file"),
        (b"\0", "file"),
    ];

    fn assert_safe(name: &str) {
        assert!(!name.is_empty());
        assert!(name.len() <= NAME_MAX, "{name:?} is {} bytes", name.len());
        assert!(!name.starts_with('.') && !name.starts_with('-'), "{name:?}");
        assert!(!name.contains(['/', '\\']), "{name:?}");
        assert!(!name.chars().any(unsafe_char), "{name:?}");
        assert_ne!(name, ".");
        assert_ne!(name, "..");
        assert_eq!(Path::new(name).components().count(), 1, "{name:?}");
    }

    #[test]
    fn hostile_names_are_neutralized() {
        for (raw, want) in HOSTILE {
            let got = sanitize_file_name(raw);
            assert_eq!(&got, want, "for {:?}", String::from_utf8_lossy(raw));
            assert_safe(&got);
        }
    }

    #[test]
    fn long_names_keep_their_extension() {
        let long = format!("{}.tar.gz", "x".repeat(300));
        let got = sanitize_file_name(long.as_bytes());
        assert_eq!(got.len(), NAME_MAX);
        assert!(got.ends_with("x.gz"), "{got}");
        let odd_ext = format!("a.{}", "y".repeat(300));
        let got = sanitize_file_name(odd_ext.as_bytes());
        assert_eq!(got.len(), NAME_MAX);
        assert!(got.starts_with("a.yyy"));
        // Multi-byte characters are never split.
        let wide = "é".repeat(200);
        let got = sanitize_file_name(wide.as_bytes());
        assert!(got.len() <= NAME_MAX && got.chars().all(|c| c == 'é'));
        assert_eq!(with_suffix("report.pdf", 2), "report-2.pdf");
        assert_eq!(with_suffix("file", 1), "file-1");
    }

    proptest::proptest! {
        #[test]
        fn any_name_comes_out_safe(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            assert_safe(&sanitize_file_name(&raw));
        }

        #[test]
        fn any_text_name_comes_out_safe(raw in "\\PC{0,300}") {
            assert_safe(&sanitize_file_name(raw.as_bytes()));
        }
    }

    #[test]
    fn stamps() {
        // 2024-02-29T12:34:56.789Z
        let ms = 1_709_210_096_789;
        assert_eq!(name_stamp(ms), "20240229-123456.789");
        assert_eq!(rfc3339_millis(ms), "2024-02-29T12:34:56.789Z");
        assert_eq!(
            inbox_order("TEXT-20240229-123456.789-12"),
            (
                "20240229-123456.789".into(),
                12,
                "TEXT-20240229-123456.789-12".into()
            )
        );
        assert_eq!(inbox_order("odd").0, "");
    }

    async fn service(home: &Path) -> DataExchange {
        DataExchange::unbound(DataExchangeConfig::new(home), Events::default())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn messages_are_stored_uniquely_and_listed_in_order() {
        let home = tempfile::tempdir().unwrap();
        let dx = Arc::new(service(home.path()).await);
        let (mut c, s) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn({
            let dx = dx.clone();
            async move { dx.serve(s, peer()).await }
        });
        for i in 0..20 {
            let ack = send_message(&mut c, FrameType::Text, format!("m{i}").as_bytes())
                .await
                .unwrap();
            assert_eq!(ack, format!("ACK TEXT {} bytes", format!("m{i}").len()));
        }
        let bin = [0u8, 159, 146, 150, 255];
        send_message(&mut c, FrameType::Binary, &bin).await.unwrap();
        drop(c);
        srv.await.unwrap();
        let msgs = list_inbox(home.path()).unwrap();
        assert_eq!(msgs.len(), 21);
        let texts: Vec<_> = msgs[..20].iter().map(|m| m.data.clone()).collect();
        let want: Vec<_> = (0..20).map(|i| format!("m{i}")).collect();
        assert_eq!(texts, want);
        let ids: std::collections::HashSet<_> = msgs.iter().map(|m| &m.id).collect();
        assert_eq!(ids.len(), 21);
        let b = &msgs[20];
        assert_eq!(
            (b.kind.as_str(), b.encoding.as_deref()),
            ("BINARY", Some("base64"))
        );
        assert_eq!(b.payload(), bin);
        assert_eq!(b.from, Addr::new(0, 7).to_string());
        assert_eq!(dx.stats().messages.load(Ordering::Relaxed), 21);
        assert_eq!(clear_inbox(home.path()).unwrap(), 21);
        assert!(list_inbox(home.path()).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_full_inbox_refuses_until_cleared() {
        let home = tempfile::tempdir().unwrap();
        let mut cfg = DataExchangeConfig::new(home.path());
        cfg.max_inbox_messages = 3;
        let dx = Arc::new(DataExchange::unbound(cfg, Events::default()).await.unwrap());
        let (mut c, s) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn({
            let dx = dx.clone();
            async move { dx.serve(s, peer()).await }
        });
        for _ in 0..3 {
            send_message(&mut c, FrameType::Json, b"{}").await.unwrap();
        }
        let e = send_message(&mut c, FrameType::Json, b"{}")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SendError::Refused(t) if t == "ERR JSON inbox full"),
            "{e}"
        );
        assert_eq!(clear_inbox(home.path()).unwrap(), 3);
        send_message(&mut c, FrameType::Json, b"{}").await.unwrap();
        drop(c);
        srv.await.unwrap();
        assert_eq!(list_inbox(home.path()).unwrap().len(), 1);
        assert_eq!(dx.stats().refused.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn an_interrupted_file_leaves_nothing() {
        let home = tempfile::tempdir().unwrap();
        let dx = Arc::new(service(home.path()).await);
        for stream in [false, true] {
            let (mut c, s) = tokio::io::duplex(64 * 1024);
            let srv = tokio::spawn({
                let dx = dx.clone();
                async move { dx.serve(s, peer()).await }
            });
            let head = if stream {
                encode_stream_header(b"big.bin", 100 << 20).unwrap()
            } else {
                encode_file_prefix(b"small.bin", 1 << 20).unwrap()
            };
            c.write_all(&head).await.unwrap();
            c.write_all(&vec![5u8; 300_000]).await.unwrap();
            drop(c);
            srv.await.unwrap();
            let left: Vec<_> = fs::read_dir(home.path().join(RECEIVED_DIR))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert!(left.is_empty(), "left behind: {left:?}");
        }
        assert_eq!(dx.stats().truncated.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn files_go_to_received_without_overwriting() {
        let home = tempfile::tempdir().unwrap();
        let (events, mut rx) = Events::channel();
        let dx = Arc::new(
            DataExchange::unbound(DataExchangeConfig::new(home.path()), events)
                .await
                .unwrap(),
        );
        let (mut c, s) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn({
            let dx = dx.clone();
            async move { dx.serve(s, peer()).await }
        });
        for body in [&b"one"[..], b"two!"] {
            let ack = send_file(&mut c, "../notes.txt", body, body.len() as u64, |_| {})
                .await
                .unwrap();
            assert_eq!(ack, format!("ACK FILE {} bytes", 2 + 12 + body.len()));
        }
        drop(c);
        srv.await.unwrap();
        let dir = home.path().join(RECEIVED_DIR);
        assert_eq!(fs::read(dir.join("notes.txt")).unwrap(), b"one");
        assert_eq!(fs::read(dir.join("notes-1.txt")).unwrap(), b"two!");
        let files = list_received(home.path()).unwrap();
        let mut names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["notes-1.txt", "notes.txt"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join("notes.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let ev = rx.try_recv().unwrap();
        assert_eq!(ev.name, "file.received");
        let data = ev.data.unwrap();
        assert_eq!(
            (data["filename"].as_str(), data["size"].as_u64()),
            (Some("notes.txt"), Some(3))
        );
        assert_eq!(clear_received(home.path()).unwrap(), 2);
        assert!(list_received(home.path()).unwrap().is_empty());
    }

    #[tokio::test]
    async fn quota_and_size_limits_refuse_before_writing() {
        let home = tempfile::tempdir().unwrap();
        let mut cfg = DataExchangeConfig::new(home.path());
        cfg.max_file_size = 1000;
        cfg.max_received_bytes = 1500;
        let dx = Arc::new(DataExchange::unbound(cfg, Events::default()).await.unwrap());
        let (mut c, s) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn({
            let dx = dx.clone();
            async move { dx.serve(s, peer()).await }
        });
        let body = vec![1u8; 1001];
        let e = send_file(&mut c, "a", &body[..], 1001, |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SendError::Refused(t) if t.starts_with("ERR FILE file too large")),
            "{e}"
        );
        // The connection is still usable after a refused v1 FILE.
        send_file(&mut c, "a", &body[..1000], 1000, |_| {})
            .await
            .unwrap();
        let e = send_file(&mut c, "b", &body[..600], 600, |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SendError::Refused(t) if t.contains("quota")),
            "{e}"
        );
        clear_received(home.path()).unwrap();
        send_file(&mut c, "b", &body[..600], 600, |_| {})
            .await
            .unwrap();
        drop(c);
        srv.await.unwrap();
        let names: Vec<_> = list_received(home.path())
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(names, ["b"]);
    }

    #[tokio::test]
    async fn a_short_file_fails_at_once_and_stores_nothing() {
        let home = tempfile::tempdir().unwrap();
        let dx = Arc::new(service(home.path()).await);
        let (mut c, s) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn({
            let dx = dx.clone();
            async move { dx.serve(s, peer()).await }
        });
        let started = std::time::Instant::now();
        let e = send_file(&mut c, "short", &[1u8; 10][..], 11, |_| {})
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::File(ref e) if e.kind() == io::ErrorKind::UnexpectedEof));
        assert!(started.elapsed() < REPLY_GRACE);
        drop(c);
        srv.await.unwrap();
        assert!(list_received(home.path()).unwrap().is_empty());
        assert_eq!(
            fs::read_dir(home.path().join(RECEIVED_DIR))
                .unwrap()
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn oversized_and_unknown_frames() {
        let home = tempfile::tempdir().unwrap();
        let dx = Arc::new(service(home.path()).await);
        let (mut c, s) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn({
            let dx = dx.clone();
            async move { dx.serve(s, peer()).await }
        });
        c.write_all(&[0, 0, 0, 99, 0, 0, 0, 2, 1, 2]).await.unwrap();
        let f = read_frame(&mut c, MAX_REPLY).await.unwrap().unwrap();
        assert_eq!(f.payload, b"ACK UNKNOWN(99) 2 bytes");
        c.write_all(&[0, 0, 0, 2, 0xFF, 0xFF, 0xFF, 0xF0])
            .await
            .unwrap();
        let f = read_frame(&mut c, MAX_REPLY).await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&f.payload).starts_with("ERR BINARY frame too large"));
        assert!(read_frame(&mut c, MAX_REPLY).await.unwrap().is_none());
        drop(c);
        srv.await.unwrap();
        assert_eq!(dx.stats().bad_frames.load(Ordering::Relaxed), 2);
    }
}

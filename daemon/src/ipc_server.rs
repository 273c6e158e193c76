//! The IPC server: the Unix socket agents and `pilotctl` talk to (v1 wire §7), speaking the
//! typed codec of [`tunnel::ipc`].
//!
//! # Socket
//!
//! [`serve`] creates the parent directory (mode 0700 for directories it creates), refuses a
//! path another live server answers on, removes a stale socket file, binds, and sets the socket
//! to mode 0600. [`IpcServer::shutdown`] stops accepting, disconnects every client and removes
//! the socket file (only if it is still the one this server bound).
//!
//! # Concurrency
//!
//! Each client has a reader task, a writer task and a reply pump; nothing one client does
//! blocks another.
//!
//! - Requests that have a reply (Bind, Dial, Info, Handshake, the registry commands, Ext) run
//!   concurrently, each in its own task, so a slow Dial blocks nothing else. Their replies are
//!   still written **in request order**: clients match replies (and the untagged `Error`)
//!   first-in-first-out, as v1's sequential server taught them to.
//! - Unsolicited messages (Accept, Recv, CloseOk as EOF, RecvFrom) are written as they happen,
//!   except that a connection's Recvs never precede its DialOk and a port's Accepts never
//!   precede its BindOk.
//! - Send and Close go through a per-connection queue: their order on one connection is kept,
//!   and a connection whose peer reads slowly waits for write credit without holding up other
//!   connections. Each queue holds at most [`CONN_QUEUE_BYTES`]; beyond that (plus the engine's
//!   per-connection credit) the client's socket is not read until the queue drains, the only
//!   point where one connection can hold up its client's other requests.
//! - Received data reaches a client through its one socket; a client that stops reading stalls
//!   only its own connections (the engine then stops reading them and their windows close).
//!
//! # Differences from v1
//!
//! - Bound ports, dialed and accepted connections belong to the client that made them. Send
//!   and Close name only the client's own connections (v1 accepts any connection ID); an
//!   operator closes any connection with the `disconnect` extension request.
//! - Datagrams go to the client that bound their destination port, not to every client.
//! - A Close half-closes: queued data and then FIN go out, and data from the peer keeps
//!   arriving until its unsolicited CloseOk (EOF).
//! - A well-framed but unknown or malformed request is answered with Error and counted; the
//!   client is dropped only after [`MAX_PROTOCOL_ERRORS`] of them. A broken frame (a length
//!   prefix above 1 MiB, or zero) cannot be skipped: Error, then the client is dropped.
//! - SetTags with more than three tags, SetWebhook, and the extension requests are answered
//!   here; the registry commands are sent on the node's authenticated registry session.
//!
//! A disconnecting client's connections are closed (FIN after their queued data) and its ports
//! unbound.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tunnel::ipc::{
    self, code, ExtError, ExtReply, ExtRequest, FrameDecoder, FrameError, Message, ERROR_CODE,
    MAX_TAGS,
};
use tunnel::node::CloseReason;
use tunnel::services::nameserver::{parse_request, Record, Request};
use tunnel::{Addr, SocketAddr as PilotAddr};

use crate::desired::Desired;
use crate::engine::{AppEvent, Cmd, ConnId, EngineHandle};
use crate::events::Events;
use crate::identity::NodeIdentity;
use crate::nameserver::Nameserver;
use crate::ratelog::LogGate;
use crate::registry_link::{self, LinkCmd, LinkError, LinkReply};
use crate::stdio::{Stdio, STDIO_PORT};
use crate::tasks::{read_result_file, ResultInput, TaskError, TaskHandle, TaskKind};
use crate::trust_api::{TrustCmd, TrustOp, TrustOpError, TrustReply, TrustSender};
use crate::webhook::{UrlError, WebhookHandle, WebhookUrl};

/// Clients served at once; further connections are closed at once and counted.
pub const MAX_CLIENTS: usize = 1024;
/// Bytes a client may queue on one connection beyond the engine's write credit before its
/// socket stops being read.
pub const CONN_QUEUE_BYTES: usize = 4 << 20;
/// Malformed or unknown (but well-framed) requests tolerated per client before it is dropped.
pub const MAX_PROTOCOL_ERRORS: u32 = 8;
/// How long a registry request may take before the client gets an error.
pub const REGISTRY_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-probe timeout of the `ping` extension when the request names none.
const PING_TIMEOUT_MS: u64 = 3000;
/// Most probes one `ping` request sends.
const MAX_PING_COUNT: u32 = 100;
/// Frames queued for one client's socket.
const OUT_FRAMES: usize = 256;
/// Requests of one client awaiting their reply before its socket stops being read.
const REPLY_SLOTS: usize = 256;
/// Engine events queued per dialed connection.
const DIAL_EVENTS: usize = 64;
/// Engine events queued per bound port (shared by its accepted connections).
const LISTEN_EVENTS: usize = 256;
/// Bytes read from a client socket at a time.
const READ_BUF: usize = 64 * 1024;
/// Bytes gathered into one socket write.
const WRITE_BATCH: usize = 256 * 1024;
/// Least interval between two protocol warnings in the log.
const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// What the server needs from the rest of the daemon.
#[derive(Debug, Clone)]
pub struct IpcContext {
    /// The engine: ports, connections, datagrams, status.
    pub engine: EngineHandle,
    /// The registry link; requests go out on the node's authenticated session.
    pub link: mpsc::Sender<LinkCmd>,
    /// The trust service, if it runs. Without it, handshake requests fail with
    /// "trust service not running".
    pub trust: Option<TrustSender>,
    /// The running trust service, told when the node's visibility changes so its gate
    /// follows.
    pub trust_handle: Option<crate::trust::TrustHandle>,
    /// The event feed (for its drop counter in Info).
    pub events: Events,
    /// The nameserver, for the operator's records.
    pub nameserver: Option<Nameserver>,
    /// The task service.
    pub tasks: Option<TaskHandle>,
    /// The stdio service, which yields port 1000 to a client that binds it.
    pub stdio: Option<Stdio>,
    /// The state directory (inbox and received files live under it).
    pub home: PathBuf,
    /// The webhook poster, whose URL SetWebhook changes. Without one, the URL is only
    /// checked and remembered.
    pub webhook: Option<WebhookHandle>,
    /// The node's identity: its public key for Info (the engine does not hold the identity),
    /// and the key RotateKey replaces.
    pub identity: Arc<NodeIdentity>,
    /// The node's desired registry state, and the hostname the registry holds now (for
    /// Info).
    pub desired: Desired,
}

/// Counters of the IPC server, readable at any time (see [`IpcStats::to_json`]).
#[derive(Debug, Default)]
pub struct IpcStats {
    /// Clients accepted since start.
    pub clients_accepted: AtomicU64,
    /// Clients connected now.
    pub clients_active: AtomicU64,
    /// Clients refused because [`MAX_CLIENTS`] were connected.
    pub clients_refused: AtomicU64,
    /// Clients dropped for protocol violations.
    pub clients_dropped: AtomicU64,
    /// Requests handled.
    pub requests: AtomicU64,
    /// Frames whose length prefix exceeded 1 MiB.
    pub oversized: AtomicU64,
    /// Frames with a zero length prefix.
    pub empty_frames: AtomicU64,
    /// Frames with an unknown command byte, or a daemon-to-client command.
    pub unknown_commands: AtomicU64,
    /// Frames whose payload does not parse.
    pub malformed: AtomicU64,
    /// Error replies sent.
    pub errors_sent: AtomicU64,
}

impl IpcStats {
    /// The counters as a JSON object (added to Info as `"ipc"`).
    pub fn to_json(&self) -> Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "clients_accepted": g(&self.clients_accepted),
            "clients_active": g(&self.clients_active),
            "clients_refused": g(&self.clients_refused),
            "clients_dropped": g(&self.clients_dropped),
            "requests": g(&self.requests),
            "oversized": g(&self.oversized),
            "empty_frames": g(&self.empty_frames),
            "unknown_commands": g(&self.unknown_commands),
            "malformed": g(&self.malformed),
            "errors_sent": g(&self.errors_sent),
        })
    }

    /// Bad frames of every kind: oversized, empty, unknown and malformed.
    pub fn bad_frames(&self) -> u64 {
        [
            &self.oversized,
            &self.empty_frames,
            &self.unknown_commands,
            &self.malformed,
        ]
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .sum()
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by every client of one server.
#[derive(Debug)]
struct Shared {
    ctx: IpcContext,
    stats: Arc<IpcStats>,
    webhook: Mutex<String>,
    /// The virtual NIC's status for Info, when `pilotd up` runs one.
    inside: Mutex<Option<InsideStatus>>,
    warn: LogGate,
    next_client: AtomicU64,
}

impl Shared {
    /// Logs a protocol problem, at most once per [`WARN_INTERVAL`].
    fn warn(&self, client: u64, what: &str, detail: impl Display) {
        if let Some(suppressed) = self.warn.allow() {
            tracing::warn!(client, suppressed, "IPC {what}: {detail}");
        }
    }
}

/// The virtual NIC's status as Info reports it (interface, address, exposed ports, counters):
/// called at each Info request.
#[derive(Clone)]
pub struct InsideStatus(pub Arc<dyn Fn() -> Value + Send + Sync>);

impl std::fmt::Debug for InsideStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InsideStatus")
    }
}

/// A running IPC server. Dropping it stops it too, without waiting.
#[derive(Debug)]
pub struct IpcServer {
    path: PathBuf,
    /// Device and inode of the socket file this server bound.
    file_id: (u64, u64),
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl IpcServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<IpcStats> {
        self.shared.stats.clone()
    }

    /// Reports the virtual NIC's status in Info (key `inside`) from now on.
    pub fn set_inside(&self, status: InsideStatus) {
        *lock(&self.shared.inside) = Some(status);
    }

    /// The webhook URL now in effect ("" if none), as last set by SetWebhook.
    pub fn webhook(&self) -> String {
        lock(&self.shared.webhook).clone()
    }

    /// Stops accepting, disconnects every client (closing their connections) and removes the
    /// socket file.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.remove_file();
    }

    fn remove_file(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.file_id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for IpcServer {
    fn drop(&mut self) {
        // Not shut down explicitly: stop accepting and disconnect clients in the background.
        if self.task.take().is_some() {
            let _ = self.stop.send(true);
            self.remove_file();
        }
    }
}

/// Binds the IPC socket at `path` and serves clients on it until [`IpcServer::shutdown`].
///
/// Errors: [`io::ErrorKind::AddrInUse`] when a server already answers on `path`,
/// [`io::ErrorKind::AlreadyExists`] when `path` exists and is not a socket, and the errors of
/// creating the directory, binding and setting the mode.
pub async fn serve(path: &Path, ctx: IpcContext) -> io::Result<IpcServer> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path).await {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another daemon is serving {}", path.display()),
                ))
            }
            Err(_) => {
                tracing::info!(path = %path.display(), "removing a stale IPC socket");
                std::fs::remove_file(path)?;
            }
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let m = std::fs::symlink_metadata(path)?;
    let shared = Arc::new(Shared {
        webhook: Mutex::new(
            ctx.webhook
                .as_ref()
                .and_then(WebhookHandle::url)
                .unwrap_or_default(),
        ),
        ctx,
        stats: Arc::new(IpcStats::default()),
        inside: Mutex::new(None),
        warn: LogGate::new(WARN_INTERVAL),
        next_client: AtomicU64::new(1),
    });
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, shared.clone(), stop_rx));
    tracing::info!(path = %path.display(), "IPC socket listening");
    Ok(IpcServer {
        path: path.to_owned(),
        file_id: (m.dev(), m.ino()),
        shared,
        stop,
        task: Some(task),
    })
}

async fn accept_loop(listener: UnixListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut clients = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    while clients.try_join_next().is_some() {}
                    if clients.len() >= MAX_CLIENTS {
                        bump(&shared.stats.clients_refused);
                        shared.warn(0, "client refused", "too many clients");
                        continue;
                    }
                    bump(&shared.stats.clients_accepted);
                    let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
                    clients.spawn(serve_client(shared.clone(), stream, id, stop.clone()));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    shared.warn(0, "accept failed", e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    // Clients see the stop signal and disconnect; give them a moment to flush.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while clients.join_next().await.is_some() {}
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// One client
// ---------------------------------------------------------------------------------------------

/// A reply, written when every earlier request's reply has been.
struct Reply {
    frame: Vec<u8>,
    /// Told once the frame is queued for the socket (to start that connection's or port's
    /// unsolicited messages only after it).
    then: Option<oneshot::Sender<()>>,
}

impl Reply {
    fn new(frame: Vec<u8>) -> Self {
        Reply { frame, then: None }
    }
}

enum ConnOp {
    Data(Vec<u8>),
    Close,
}

#[derive(Clone)]
struct ConnSlot {
    queue: mpsc::UnboundedSender<ConnOp>,
    room: Arc<Semaphore>,
}

#[derive(Default)]
struct ClientState {
    closed: bool,
    /// The client asked for [`Message::ConnFailed`] reports.
    conn_errors: bool,
    conns: HashMap<ConnId, ConnSlot>,
    ports: HashSet<u16>,
}

/// What a client's request tasks share. Holds no reply-slot sender, so the reply pump ends
/// once the reader has.
#[derive(Clone)]
struct ClientCtx {
    shared: Arc<Shared>,
    id: u64,
    out: mpsc::Sender<Vec<u8>>,
    state: Arc<Mutex<ClientState>>,
}

fn encode(msg: &Message<'_>) -> Vec<u8> {
    let mut v = Vec::with_capacity(ipc::LEN_PREFIX + 1 + msg.payload_len());
    if msg.encode(&mut v).is_err() {
        v.clear();
        let _ = Message::Error {
            code: ERROR_CODE,
            message: "reply exceeds the 1 MiB IPC limit",
        }
        .encode(&mut v);
    }
    v
}

fn error_frame(text: &str) -> Vec<u8> {
    // Keep within one frame whatever the text.
    let mut end = text.len().min(4096);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    encode(&Message::Error {
        code: ERROR_CODE,
        message: text.get(..end).unwrap_or_default(),
    })
}

async fn serve_client(
    shared: Arc<Shared>,
    stream: UnixStream,
    id: u64,
    stop: watch::Receiver<bool>,
) {
    bump(&shared.stats.clients_active);
    let (rd, wr) = stream.into_split();
    let (out, out_rx) = mpsc::channel(OUT_FRAMES);
    let (slots, slots_rx) = mpsc::channel(REPLY_SLOTS);
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let (kill_tx, kill_rx) = oneshot::channel::<Vec<u8>>();
    let writer = tokio::spawn(write_loop(wr, out_rx, done_rx, kill_rx));
    tokio::spawn(reply_pump(slots_rx, out.clone(), done_tx));
    let ctx = ClientCtx {
        shared: shared.clone(),
        id,
        out,
        state: Arc::new(Mutex::new(ClientState::default())),
    };
    tracing::debug!(client = id, "IPC client connected");
    let end = read_loop(&ctx, rd, slots, stop).await;
    if let Some(last) = end {
        bump(&shared.stats.clients_dropped);
        bump(&shared.stats.errors_sent);
        let _ = kill_tx.send(last);
    }
    ctx.disconnect().await;
    drop(ctx);
    let _ = writer.await;
    shared.stats.clients_active.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(client = id, "IPC client disconnected");
}

/// Writes frames to the socket, batching what is queued. Ends on a write error, when the
/// reply pump is done (after writing what is queued), or when killed (after writing the last
/// frame it is given).
async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut done: oneshot::Receiver<()>,
    mut kill: oneshot::Receiver<Vec<u8>>,
) {
    let mut buf = Vec::with_capacity(WRITE_BATCH);
    let mut draining = false;
    loop {
        buf.clear();
        if draining {
            match rx.try_recv() {
                Ok(f) => buf.extend_from_slice(&f),
                Err(_) => break,
            }
        } else {
            tokio::select! {
                biased;
                k = &mut kill => {
                    if let Ok(last) = k {
                        let _ = wr.write_all(&last).await;
                    }
                    break;
                }
                f = rx.recv() => match f {
                    Some(f) => buf.extend_from_slice(&f),
                    None => break,
                },
                _ = &mut done => {
                    draining = true;
                    continue;
                }
            }
        }
        while buf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(f) => buf.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        if wr.write_all(&buf).await.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

/// Writes replies in request order.
async fn reply_pump(
    mut slots: mpsc::Receiver<oneshot::Receiver<Reply>>,
    out: mpsc::Sender<Vec<u8>>,
    done: oneshot::Sender<()>,
) {
    while let Some(slot) = slots.recv().await {
        let reply = slot
            .await
            .unwrap_or_else(|_| Reply::new(error_frame("internal error: request abandoned")));
        if out.send(reply.frame).await.is_err() {
            break;
        }
        if let Some(t) = reply.then {
            let _ = t.send(());
        }
    }
    drop(done);
}

/// Why a client's reading stopped: `None` for EOF, a read error or the server stopping;
/// `Some(frame)` for a protocol violation, with the last frame to send it.
type ReadEnd = Option<Vec<u8>>;

async fn read_loop(
    ctx: &ClientCtx,
    mut rd: OwnedReadHalf,
    slots: mpsc::Sender<oneshot::Receiver<Reply>>,
    mut stop: watch::Receiver<bool>,
) -> ReadEnd {
    let stats = &ctx.shared.stats;
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; READ_BUF];
    let mut violations = 0u32;
    loop {
        let n = tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            },
            _ = stop.changed() => return None,
        };
        dec.push(buf.get(..n).unwrap_or_default());
        loop {
            let (cmd, payload) = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    match e {
                        FrameError::TooLarge(_) => bump(&stats.oversized),
                        FrameError::Empty => bump(&stats.empty_frames),
                    }
                    ctx.shared.warn(ctx.id, "client dropped", e);
                    return Some(error_frame(&e.to_string()));
                }
            };
            bump(&stats.requests);
            let msg = match Message::parse(cmd, payload) {
                Ok(m) => m,
                Err(e) => {
                    match e {
                        ipc::ParseError::UnknownCommand(_) => bump(&stats.unknown_commands),
                        _ => bump(&stats.malformed),
                    }
                    violations += 1;
                    ctx.shared.warn(ctx.id, "bad request", e);
                    if violations >= MAX_PROTOCOL_ERRORS {
                        return Some(error_frame(&format!("{e}; too many bad requests")));
                    }
                    if !ctx.ready_reply(&slots, error_frame(&e.to_string())).await {
                        return None;
                    }
                    continue;
                }
            };
            match ctx.dispatch(msg, &slots).await {
                Dispatch::Ok => {}
                Dispatch::Gone => return None,
                Dispatch::NotARequest(c) => {
                    bump(&stats.unknown_commands);
                    violations += 1;
                    let text = format!(
                        "IPC command 0x{c:02x} ({}) is not a request",
                        ipc::cmd::name(c).unwrap_or("?")
                    );
                    ctx.shared.warn(ctx.id, "bad request", &text);
                    if violations >= MAX_PROTOCOL_ERRORS {
                        return Some(error_frame(&text));
                    }
                    if !ctx.ready_reply(&slots, error_frame(&text)).await {
                        return None;
                    }
                }
            }
        }
    }
}

enum Dispatch {
    Ok,
    /// The client's writer side is gone.
    Gone,
    /// A daemon-to-client command arrived.
    NotARequest(u8),
}

/// A pending reply: fill it from a task.
struct Slot(oneshot::Sender<Reply>);

impl Slot {
    fn send(self, frame: Vec<u8>) {
        let _ = self.0.send(Reply::new(frame));
    }

    fn error(self, ctx: &ClientCtx, text: impl Display) {
        bump(&ctx.shared.stats.errors_sent);
        self.send(error_frame(&text.to_string()));
    }

    /// Sends `frame`; the returned receiver fires once it is queued for the socket.
    fn send_then(self, frame: Vec<u8>) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.0.send(Reply {
            frame,
            then: Some(tx),
        });
        rx
    }
}

impl ClientCtx {
    fn engine(&self) -> &EngineHandle {
        &self.shared.ctx.engine
    }

    /// Reserves the next reply position.
    async fn slot(&self, slots: &mpsc::Sender<oneshot::Receiver<Reply>>) -> Option<Slot> {
        let (tx, rx) = oneshot::channel();
        slots.send(rx).await.ok()?;
        Some(Slot(tx))
    }

    /// Queues a reply that is ready now, in order.
    async fn ready_reply(
        &self,
        slots: &mpsc::Sender<oneshot::Receiver<Reply>>,
        frame: Vec<u8>,
    ) -> bool {
        if frame.get(ipc::LEN_PREFIX) == Some(&ipc::cmd::ERROR) {
            bump(&self.shared.stats.errors_sent);
        }
        match self.slot(slots).await {
            Some(s) => {
                s.send(frame);
                true
            }
            None => false,
        }
    }

    async fn dispatch(
        &self,
        msg: Message<'_>,
        slots: &mpsc::Sender<oneshot::Receiver<Reply>>,
    ) -> Dispatch {
        macro_rules! spawn_reply {
            (|$this:ident, $slot:ident| $body:expr) => {{
                let Some($slot) = self.slot(slots).await else {
                    return Dispatch::Gone;
                };
                let $this = self.clone();
                tokio::spawn(async move { $body });
            }};
        }
        match msg {
            Message::Send { conn_id, data } => {
                if let Err(text) = self.on_send(conn_id, data).await {
                    if !self.ready_reply(slots, error_frame(&text)).await {
                        return Dispatch::Gone;
                    }
                }
            }
            Message::Close { conn_id } => {
                let slot = lock(&self.state).conns.remove(&conn_id);
                let frame = match slot {
                    Some(s) => {
                        let _ = s.queue.send(ConnOp::Close);
                        encode(&Message::CloseOk { conn_id })
                    }
                    None => error_frame(&format!("connection {conn_id} not found")),
                };
                if !self.ready_reply(slots, frame).await {
                    return Dispatch::Gone;
                }
            }
            Message::SendTo { dst, data } => {
                let cmd = Cmd::SendTo {
                    dst,
                    src_port: None,
                    data: data.to_vec(),
                };
                if self.engine().send(cmd).await.is_err()
                    && !self
                        .ready_reply(slots, error_frame("send: the daemon is stopping"))
                        .await
                {
                    return Dispatch::Gone;
                }
            }
            Message::Bind { port } => spawn_reply!(|this, slot| this.bind(port, slot).await),
            Message::Dial { dst } => spawn_reply!(|this, slot| this.dial(dst, slot).await),
            Message::Info => spawn_reply!(|this, slot| match this.shared.info().await {
                Ok(v) => slot.send(encode(&Message::InfoOk {
                    json: &json_bytes(&v)
                })),
                Err(e) => slot.error(&this, &e),
            }),
            Message::Handshake(op) => {
                let op = TrustOp::from(op);
                spawn_reply!(|this, slot| match this.shared.trust(op).await {
                    Ok(v) => slot.send(encode(&Message::HandshakeOk {
                        json: &json_bytes(&v)
                    })),
                    Err(e) => slot.error(&this, &e),
                })
            }
            Message::ResolveHostname { hostname } => {
                let req = json!({"type": "resolve_hostname", "hostname": hostname});
                spawn_reply!(|this, slot| this
                    .registry_reply(slot, req, |json| Message::ResolveHostnameOk { json })
                    .await)
            }
            Message::SetHostname { hostname } => {
                let req = json!({"type": "set_hostname", "node_id": null, "hostname": hostname});
                spawn_reply!(|this, slot| this
                    .registry_reply(slot, req, |json| Message::SetHostnameOk { json })
                    .await)
            }
            Message::SetVisibility { public } => {
                spawn_reply!(
                    |this, slot| match this.shared.set_visibility(public).await {
                        Ok(v) => slot.send(encode(&Message::SetVisibilityOk {
                            json: &json_bytes(&v)
                        })),
                        Err(e) => slot.error(&this, &e),
                    }
                )
            }
            Message::Deregister => {
                let req = json!({"type": "deregister", "node_id": null});
                spawn_reply!(|this, slot| this
                    .registry_reply(slot, req, |json| Message::DeregisterOk { json })
                    .await)
            }
            Message::SetTags { json } => match parse_tags(json) {
                Ok(tags) => {
                    let req = json!({"type": "set_tags", "node_id": null, "tags": tags});
                    spawn_reply!(|this, slot| this
                        .registry_reply(slot, req, |json| Message::SetTagsOk { json })
                        .await)
                }
                Err(e) => {
                    if !self.ready_reply(slots, error_frame(&e.to_string())).await {
                        return Dispatch::Gone;
                    }
                }
            },
            Message::SetTaskExec { enabled } => {
                let req = json!({"type": "set_task_exec", "node_id": null, "enabled": enabled});
                spawn_reply!(|this, slot| {
                    // The registry first: if it cannot be told, nothing changes.
                    let reply = match this.shared.registry(req).await {
                        Ok(v) => v,
                        Err(e) => return slot.error(&this, &e),
                    };
                    if let Some(t) = &this.shared.ctx.tasks {
                        if let Err(e) = t.set_enabled(enabled).await {
                            return slot.error(&this, e);
                        }
                    }
                    slot.send(encode(&Message::SetTaskExecOk {
                        json: &json_bytes(&reply),
                    }))
                })
            }
            Message::SetWebhook { url } => {
                let frame = match self.shared.set_webhook(url) {
                    Ok(()) => encode(&Message::SetWebhookOk {
                        json: &json_bytes(&json!({ "webhook": url })),
                    }),
                    Err(e) => error_frame(&e.to_string()),
                };
                if !self.ready_reply(slots, frame).await {
                    return Dispatch::Gone;
                }
            }
            Message::Ext { json } => {
                let req = ExtRequest::from_json(json);
                spawn_reply!(|this, slot| {
                    let reply = match req {
                        Ok(r) => this.ext(r).await,
                        Err(e) => ExtReply::from(e),
                    };
                    slot.send(encode(&Message::ExtOk {
                        json: &reply.to_json(),
                    }));
                })
            }
            other => return Dispatch::NotARequest(other.cmd()),
        }
        Dispatch::Ok
    }

    /// Queues stream data on a connection of this client.
    async fn on_send(&self, conn: ConnId, data: &[u8]) -> Result<(), String> {
        let slot = lock(&self.state).conns.get(&conn).cloned();
        let Some(slot) = slot else {
            return Err(format!("connection {conn} not found"));
        };
        if data.is_empty() {
            return Ok(());
        }
        // At most 1 MiB per message, so the count fits and never exceeds the queue size.
        let n = u32::try_from(data.len()).map_err(|_| "send: message too large".to_owned())?;
        match slot.room.clone().acquire_many_owned(n).await {
            Ok(p) => p.forget(),
            Err(_) => return Err(format!("send: connection {conn} is closed")),
        }
        slot.queue
            .send(ConnOp::Data(data.to_vec()))
            .map_err(|_| format!("send: connection {conn} is closed"))
    }

    /// Makes a new connection this client's: a write queue and its writer task. False if the
    /// client is gone (the caller closes the connection).
    fn adopt(&self, conn: ConnId, credit: Arc<Semaphore>) -> bool {
        let mut s = lock(&self.state);
        if s.closed {
            return false;
        }
        let (queue, rx) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(CONN_QUEUE_BYTES));
        s.conns.insert(
            conn,
            ConnSlot {
                queue,
                room: room.clone(),
            },
        );
        tokio::spawn(conn_writer(self.engine().clone(), conn, credit, rx, room));
        true
    }

    async fn bind(self, port: u16, slot: Slot) {
        let (tx, rx) = mpsc::channel(LISTEN_EVENTS);
        // The built-in stdio service gives its port to an agent that asks for it.
        let bound = match &self.shared.ctx.stdio {
            Some(s) if port == STDIO_PORT => s.yield_port(|| self.engine().listen(port, tx)).await,
            _ => self.engine().listen(port, tx).await,
        };
        if let Err(e) = bound {
            return slot.error(&self, e);
        }
        let kept = {
            let mut s = lock(&self.state);
            !s.closed && s.ports.insert(port)
        };
        if !kept {
            let _ = self
                .engine()
                .send(Cmd::Unlisten { port, owner: None })
                .await;
            self.port_released(port).await;
            return slot.error(&self, "client disconnected");
        }
        let ready = slot.send_then(encode(&Message::BindOk { port }));
        tokio::spawn(self.forward_port(rx, ready));
    }

    async fn dial(self, dst: PilotAddr, slot: Slot) {
        let (tx, rx) = mpsc::channel(DIAL_EVENTS);
        match self.engine().dial(dst, tx).await {
            Ok((conn, credit)) => {
                if !self.adopt(conn, credit.clone()) {
                    let _ = self.engine().send(Cmd::Close { conn }).await;
                    return slot.error(&self, "client disconnected");
                }
                let ready = slot.send_then(encode(&Message::DialOk { conn_id: conn }));
                tokio::spawn(self.forward_conn(rx, ready, credit));
            }
            Err(e) => {
                let text = self.shared.dial_failure(dst, &e).await;
                slot.error(&self, text)
            }
        }
    }

    /// Queues an unsolicited frame; false once the client's socket is gone.
    async fn push(&self, alive: &mut bool, frame: Vec<u8>) {
        if *alive && self.out.send(frame).await.is_err() {
            *alive = false;
        }
    }

    /// Tells the client a connection's receive side ended: CloseOk, preceded by ConnFailed
    /// when it failed and the client asked to know.
    async fn closed(&self, alive: &mut bool, conn: ConnId, error: Option<CloseReason>) {
        if let Some(reason) = error {
            if lock(&self.state).conn_errors {
                self.push(
                    alive,
                    encode(&Message::ConnFailed {
                        conn_id: conn,
                        reason: &reason.to_string(),
                    }),
                )
                .await;
            }
        }
        self.push(alive, encode(&Message::CloseOk { conn_id: conn }))
            .await;
    }

    /// Forwards a dialed connection's events once its DialOk is queued.
    async fn forward_conn(
        self,
        mut rx: mpsc::Receiver<AppEvent>,
        ready: oneshot::Receiver<()>,
        credit: Arc<Semaphore>,
    ) {
        let mut alive = ready.await.is_ok();
        while let Some(ev) = rx.recv().await {
            match ev {
                AppEvent::Data { conn, data } => {
                    self.push(
                        &mut alive,
                        encode(&Message::Recv {
                            conn_id: conn,
                            data: &data,
                        }),
                    )
                    .await
                }
                AppEvent::Closed { conn, error } => {
                    if error.is_some() {
                        // Failed or reset: queued writes can never go.
                        credit.close();
                    }
                    self.closed(&mut alive, conn, error).await;
                }
                AppEvent::Accepted { conn, .. } => {
                    let _ = self.engine().send(Cmd::Close { conn }).await;
                }
                AppEvent::Datagram { .. } | AppEvent::Incoming { .. } => {}
            }
        }
        // The engine released the connection.
        credit.close();
    }

    /// Forwards a bound port's events (new connections, their data, datagrams) once its BindOk
    /// is queued.
    async fn forward_port(self, mut rx: mpsc::Receiver<AppEvent>, ready: oneshot::Receiver<()>) {
        let mut alive = ready.await.is_ok();
        let mut credits: HashMap<ConnId, Arc<Semaphore>> = HashMap::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                AppEvent::Accepted {
                    port,
                    conn,
                    remote,
                    credit,
                    ..
                } => {
                    if !alive || !self.adopt(conn, credit.clone()) {
                        let _ = self.engine().send(Cmd::Close { conn }).await;
                        continue;
                    }
                    credits.insert(conn, credit);
                    self.push(
                        &mut alive,
                        encode(&Message::Accept {
                            local_port: port,
                            conn_id: conn,
                            remote,
                        }),
                    )
                    .await;
                }
                AppEvent::Data { conn, data } => {
                    self.push(
                        &mut alive,
                        encode(&Message::Recv {
                            conn_id: conn,
                            data: &data,
                        }),
                    )
                    .await
                }
                AppEvent::Closed { conn, error } => {
                    if let Some(c) = credits.remove(&conn) {
                        if error.is_some() {
                            c.close();
                        }
                    }
                    self.closed(&mut alive, conn, error).await;
                }
                // Only the fallback listener's channel carries attempts.
                AppEvent::Incoming { .. } => {}
                AppEvent::Datagram {
                    src,
                    dst_port,
                    data,
                } => {
                    self.push(
                        &mut alive,
                        encode(&Message::RecvFrom {
                            src,
                            dst_port,
                            data: &data,
                        }),
                    )
                    .await
                }
            }
        }
    }

    /// The client is gone: close its connections (after their queued data) and unbind its
    /// ports.
    async fn disconnect(&self) {
        let (conns, ports) = {
            let mut s = lock(&self.state);
            s.closed = true;
            (std::mem::take(&mut s.conns), std::mem::take(&mut s.ports))
        };
        for (_, slot) in conns {
            let _ = slot.queue.send(ConnOp::Close);
        }
        for port in ports {
            let _ = self
                .engine()
                .send(Cmd::Unlisten { port, owner: None })
                .await;
            self.port_released(port).await;
        }
    }

    /// A port this client held is free again: the stdio service takes its port back.
    async fn port_released(&self, port: u16) {
        if port == STDIO_PORT {
            if let Some(s) = &self.shared.ctx.stdio {
                s.reclaim().await;
            }
        }
    }

    /// Sends a registry request and replies with its answer verbatim.
    async fn registry_reply(
        self,
        slot: Slot,
        req: Value,
        ok: impl for<'a> FnOnce(&'a [u8]) -> Message<'a>,
    ) {
        match self.shared.registry(req).await {
            Ok(v) => slot.send(encode(&ok(&json_bytes(&v)))),
            Err(e) => slot.error(&self, &e),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Extension requests
    // -----------------------------------------------------------------------------------------

    async fn ext(&self, req: ExtRequest) -> ExtReply {
        match self.ext_inner(req).await {
            Ok(v) => ExtReply::Ok { data: v },
            Err(e) => ExtReply::from(e),
        }
    }

    async fn ext_inner(&self, req: ExtRequest) -> Result<Value, ExtError> {
        let sh = &self.shared;
        let me = self.engine().node();
        match req {
            ExtRequest::Info => sh.info().await.map_err(unavailable),
            ExtRequest::Peers { search } => {
                let info = sh.info().await.map_err(unavailable)?;
                let mut peers: Vec<ipc::PeerInfo> =
                    serde_json::from_value(info.get("peer_list").cloned().unwrap_or(json!([])))
                        .map_err(|e| ExtError::new(code::INTERNAL, e.to_string()))?;
                if let Some(s) = search.filter(|s| !s.is_empty()) {
                    peers.retain(|p| {
                        p.node_id.to_string().contains(&s)
                            || Addr::new(0, p.node_id).to_string().contains(&s)
                            || p.endpoint.contains(&s)
                    });
                }
                let total = peers.len();
                to_value(&ipc::PeersReply { peers, total })
            }
            ExtRequest::Connections => {
                let info = sh.info().await.map_err(unavailable)?;
                let connections: Vec<ipc::ConnInfo> =
                    serde_json::from_value(info.get("conn_list").cloned().unwrap_or(json!([])))
                        .map_err(|e| ExtError::new(code::INTERNAL, e.to_string()))?;
                let total = connections.len();
                to_value(&ipc::ConnectionsReply { connections, total })
            }
            ExtRequest::Disconnect { conn_id } => {
                let own = lock(&self.state).conns.remove(&conn_id);
                if let Some(s) = own {
                    let _ = s.queue.send(ConnOp::Close);
                } else {
                    let info = sh.info().await.map_err(unavailable)?;
                    let known = info
                        .get("conn_list")
                        .and_then(Value::as_array)
                        .is_some_and(|l| {
                            l.iter().any(|c| {
                                c.get("id").and_then(Value::as_u64) == Some(conn_id.into())
                            })
                        });
                    if !known {
                        return Err(ExtError::new(
                            code::UNKNOWN_PEER,
                            format!("connection {conn_id} not found"),
                        ));
                    }
                    self.engine()
                        .send(Cmd::Close { conn: conn_id })
                        .await
                        .map_err(unavailable)?;
                }
                to_value(&ipc::ConnIdReply { conn_id })
            }
            ExtRequest::Lookup { node_id } => {
                let v = sh
                    .registry(json!({"type": "lookup", "node_id": node_id}))
                    .await
                    .map_err(registry_error)?;
                let r: ipc::LookupReply = serde_json::from_value(v)
                    .map_err(|e| ExtError::new(code::INTERNAL, e.to_string()))?;
                to_value(&r)
            }
            ExtRequest::Register => {
                // The link registers now (again, after a deregistration) and applies the
                // node's desired state before it answers.
                let v = sh
                    .link_request(LinkCmd::Register)
                    .await
                    .map_err(registry_error)?;
                let node = v
                    .get("node_id")
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| ExtError::new(code::INTERNAL, "registry gave no node_id"))?;
                to_value(&ipc::RegisterReply {
                    node_id: node,
                    address: Addr::new(0, node).to_string(),
                })
            }
            ExtRequest::Deregister => {
                sh.registry(json!({"type": "deregister", "node_id": null}))
                    .await
                    .map_err(registry_error)?;
                to_value(&ipc::NodeReply { node_id: me })
            }
            ExtRequest::RotateKey => {
                sh.link_request(LinkCmd::Rotate)
                    .await
                    .map_err(registry_error)?;
                to_value(&ipc::RotateKeyReply {
                    node_id: me,
                    public_key: sh.ctx.identity.public_key_base64(),
                })
            }
            ExtRequest::NetworkList => {
                let v = sh
                    .registry(json!({"type": "list_networks"}))
                    .await
                    .map_err(registry_error)?;
                let networks: Vec<ipc::NetworkInfo> =
                    serde_json::from_value(v.get("networks").cloned().unwrap_or(json!([])))
                        .map_err(|e| ExtError::new(code::INTERNAL, e.to_string()))?;
                to_value(&ipc::NetworksReply { networks })
            }
            ExtRequest::NetworkCreate {
                name,
                join_rule,
                token,
            } => {
                let join_rule = join_rule.unwrap_or_else(|| "open".to_owned());
                let v = sh
                    .registry(
                        json!({"type": "create_network", "node_id": null, "name": name,
                        "join_rule": join_rule, "token": token}),
                    )
                    .await
                    .map_err(registry_error)?;
                let id = v
                    .get("network_id")
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or_else(|| ExtError::new(code::INTERNAL, "registry gave no network_id"))?;
                to_value(&ipc::NetworkInfo {
                    id,
                    name,
                    members: 1,
                    join_rule,
                })
            }
            ExtRequest::NetworkJoin {
                network_id,
                token,
                inviter_id,
            } => {
                sh.registry(json!({"type": "join_network", "node_id": null,
                    "network_id": network_id, "token": token, "inviter_id": inviter_id}))
                    .await
                    .map_err(registry_error)?;
                to_value(&ipc::NetworkReply {
                    network_id,
                    node_id: me,
                })
            }
            ExtRequest::NetworkLeave { network_id } => {
                sh.registry(
                    json!({"type": "leave_network", "node_id": null, "network_id": network_id}),
                )
                .await
                .map_err(registry_error)?;
                to_value(&ipc::NetworkReply {
                    network_id,
                    node_id: me,
                })
            }
            ExtRequest::NetworkInvite {
                network_id,
                node_id,
            } => {
                sh.registry(json!({"type": "invite_network", "node_id": null,
                    "network_id": network_id, "target_id": node_id}))
                    .await
                    .map_err(registry_error)?;
                to_value(&ipc::NetworkReply {
                    network_id,
                    node_id,
                })
            }
            ExtRequest::Resolve { target } => self.resolve(target.trim()).await,
            ExtRequest::Ping {
                node_id,
                count,
                timeout_ms,
            } => self.ping(node_id, count, timeout_ms).await,
            ExtRequest::Handshake {
                node_id,
                justification,
            } => {
                self.trust_ext(TrustOp::Request {
                    peer: node_id,
                    justification,
                })
                .await
            }
            ExtRequest::Approve { node_id } => {
                self.trust_ext(TrustOp::Approve { peer: node_id }).await
            }
            ExtRequest::Reject { node_id, reason } => {
                self.trust_ext(TrustOp::Reject {
                    peer: node_id,
                    reason,
                })
                .await
            }
            ExtRequest::Untrust { node_id } => {
                self.trust_ext(TrustOp::Revoke { peer: node_id }).await
            }
            ExtRequest::TrustList => self.trust_ext(TrustOp::Trusted).await,
            ExtRequest::TrustPending => self.trust_ext(TrustOp::Pending).await,
            ExtRequest::SetVisibility { public } => {
                sh.set_visibility(public).await.map_err(registry_error)?;
                to_value(&ipc::VisibilityReply {
                    node_id: me,
                    public,
                })
            }
            ExtRequest::SetTags { tags } => {
                if tags.len() > MAX_TAGS {
                    return Err(ExtError::new(
                        code::BAD_REQUEST,
                        format!("at most {MAX_TAGS} tags, got {}", tags.len()),
                    ));
                }
                let v = sh
                    .registry(json!({"type": "set_tags", "node_id": null, "tags": tags}))
                    .await
                    .map_err(|e| match registry_error(e) {
                        e if e.code == code::REFUSED => ExtError::new(code::BAD_REQUEST, e.message),
                        e => e,
                    })?;
                let tags = v
                    .get("tags")
                    .and_then(|t| serde_json::from_value::<Vec<String>>(t.clone()).ok())
                    .unwrap_or_default();
                to_value(&ipc::TagsReply { node_id: me, tags })
            }
            ExtRequest::SetHostname { hostname } => {
                let v = sh
                    .registry(
                        json!({"type": "set_hostname", "node_id": null, "hostname": hostname}),
                    )
                    .await
                    .map_err(|e| match registry_error(e) {
                        e if e.code == code::REFUSED => {
                            ExtError::new(code::INVALID_HOSTNAME, e.message)
                        }
                        e => e,
                    })?;
                let hostname = v
                    .get("hostname")
                    .and_then(Value::as_str)
                    .unwrap_or(&hostname)
                    .to_owned();
                to_value(&ipc::HostnameReply {
                    node_id: me,
                    hostname,
                })
            }
            ExtRequest::SetWebhook { url } => {
                sh.set_webhook(&url)
                    .map_err(|e| ExtError::new(code::BAD_REQUEST, e.to_string()))?;
                to_value(&ipc::WebhookReply { webhook: url })
            }
            ExtRequest::SetTaskExec { enabled } => {
                // The registry first: if it cannot be told, nothing changes.
                sh.registry(json!({"type": "set_task_exec", "node_id": null, "enabled": enabled}))
                    .await
                    .map_err(registry_error)?;
                if let Some(t) = &sh.ctx.tasks {
                    t.set_enabled(enabled).await.map_err(task_error)?;
                }
                to_value(&ipc::TaskExecReply {
                    node_id: me,
                    enabled,
                })
            }
            ExtRequest::NameList => {
                let ns = self.nameserver()?;
                let mut records: Vec<Value> = ns.list().iter().map(|r| r.to_json()).collect();
                let total = records.len();
                let omitted = keep_newest_within(&mut records, MAX_LISTING_BYTES);
                Ok(json!({"total": total, "omitted": omitted, "records": records}))
            }
            ExtRequest::NameAdd { record } => {
                let ns = self.nameserver()?;
                let r = parse_record(&record)?;
                ns.add(r.clone())
                    .await
                    .map_err(|e| ExtError::new(code::BAD_REQUEST, e.to_string()))?;
                let info = ns.list().into_iter().find(|i| i.record == r);
                Ok(info.map(|i| i.to_json()).unwrap_or_else(|| json!({})))
            }
            ExtRequest::NameRemove { record } => {
                let ns = self.nameserver()?;
                let r = parse_record(&record)?;
                let removed = ns
                    .remove(&r.key())
                    .await
                    .map_err(|e| ExtError::new(code::INTERNAL, e.to_string()))?;
                Ok(json!({"removed": removed}))
            }
            ExtRequest::Inbox { clear } => {
                let home = sh.ctx.home.clone();
                blocking_json(move || {
                    use crate::dataexchange as dx;
                    Ok(if clear {
                        json!({"cleared": dx::clear_inbox(&home)?})
                    } else {
                        let mut m: Vec<Value> = dx::list_inbox(&home)?
                            .into_iter()
                            .filter_map(|x| serde_json::to_value(x).ok())
                            .collect();
                        let total = m.len();
                        let omitted = keep_newest_within(&mut m, MAX_LISTING_BYTES);
                        json!({"total": total, "omitted": omitted, "messages": m,
                               "dir": dx::inbox_dir(&home)})
                    })
                })
                .await
            }
            ExtRequest::Received { clear } => {
                let home = sh.ctx.home.clone();
                blocking_json(move || {
                    use crate::dataexchange as dx;
                    Ok(if clear {
                        json!({"cleared": dx::clear_received(&home)?})
                    } else {
                        let mut f: Vec<Value> = dx::list_received(&home)?
                            .into_iter()
                            .filter_map(|x| serde_json::to_value(x).ok())
                            .collect();
                        let total = f.len();
                        let omitted = keep_newest_within(&mut f, MAX_LISTING_BYTES);
                        json!({"total": total, "omitted": omitted, "files": f,
                               "dir": dx::received_dir(&home)})
                    })
                })
                .await
            }
            ExtRequest::TaskSubmit {
                node_id,
                description,
            } => {
                let t = self.tasks()?;
                let r = t
                    .submit(Addr::new(0, node_id), &description)
                    .await
                    .map_err(task_error)?;
                to_value(&r)
            }
            ExtRequest::TaskList { kind } => {
                let t = self.tasks()?;
                let kind = match kind.as_deref() {
                    None | Some("") | Some("all") => None,
                    Some("received") => Some(TaskKind::Received),
                    Some("submitted") => Some(TaskKind::Submitted),
                    Some(other) => {
                        return Err(ExtError::new(
                            code::BAD_REQUEST,
                            format!("task list kind {other:?}: use received or submitted"),
                        ))
                    }
                };
                let tasks = t.list(kind);
                let mut tasks: Vec<Value> = tasks
                    .iter()
                    .filter_map(|t| serde_json::to_value(t).ok())
                    .collect();
                let total = tasks.len();
                let omitted = keep_newest_within(&mut tasks, MAX_LISTING_BYTES);
                Ok(json!({"total": total, "omitted": omitted, "tasks": tasks}))
            }
            ExtRequest::TaskQueue => {
                let mut q: Vec<Value> = self
                    .tasks()?
                    .queue()
                    .iter()
                    .filter_map(|t| serde_json::to_value(t).ok())
                    .collect();
                let count = q.len();
                let omitted = keep_newest_within(&mut q, MAX_LISTING_BYTES);
                Ok(json!({"count": count, "omitted": omitted, "queue": q}))
            }
            ExtRequest::TaskAccept { task_id } => {
                check_task_id(&task_id)?;
                to_value(&self.tasks()?.accept(&task_id).await.map_err(task_error)?)
            }
            ExtRequest::TaskDecline {
                task_id,
                justification,
            } => {
                check_task_id(&task_id)?;
                to_value(
                    &self
                        .tasks()?
                        .decline(&task_id, &justification)
                        .await
                        .map_err(task_error)?,
                )
            }
            ExtRequest::TaskCancel { task_id } => {
                check_task_id(&task_id)?;
                to_value(&self.tasks()?.cancel(&task_id).await.map_err(task_error)?)
            }
            ExtRequest::TaskExecute => {
                to_value(&self.tasks()?.execute().await.map_err(task_error)?)
            }
            ExtRequest::TaskResults {
                task_id,
                text,
                file,
            } => {
                check_task_id(&task_id)?;
                let t = self.tasks()?;
                let input = match (text, file) {
                    (Some(text), None) => ResultInput::Text(text),
                    (None, Some(path)) => tokio::task::spawn_blocking(move || {
                        read_result_file(std::path::Path::new(&path))
                    })
                    .await
                    .map_err(|e| ExtError::new(code::INTERNAL, e.to_string()))?
                    .map_err(task_error)?,
                    _ => {
                        return Err(ExtError::new(
                            code::BAD_REQUEST,
                            "give the results as text or as a file, not both",
                        ))
                    }
                };
                to_value(&t.send_results(&task_id, input).await.map_err(task_error)?)
            }
            ExtRequest::ConnErrors => {
                lock(&self.state).conn_errors = true;
                Ok(json!({"conn_errors": true}))
            }
        }
    }

    fn tasks(&self) -> Result<&TaskHandle, ExtError> {
        self.shared.ctx.tasks.as_ref().ok_or_else(|| {
            ExtError::new(
                code::UNAVAILABLE,
                "the task service is off (pilotd --no-tasks)",
            )
        })
    }

    fn nameserver(&self) -> Result<&Nameserver, ExtError> {
        self.shared.ctx.nameserver.as_ref().ok_or_else(|| {
            ExtError::new(
                code::UNAVAILABLE,
                "the nameserver is off (pilotd --no-nameserver)",
            )
        })
    }

    /// A full address, a decimal node ID, or a hostname.
    async fn resolve(&self, target: &str) -> Result<Value, ExtError> {
        if target.is_empty() {
            return Err(ExtError::new(code::BAD_ADDRESS, "empty target"));
        }
        if let Ok(a) = target.parse::<Addr>() {
            return to_value(&ipc::ResolveReply {
                node_id: a.node,
                address: a.to_string(),
                hostname: None,
                public: None,
            });
        }
        if target.bytes().all(|b| b.is_ascii_digit()) {
            let node: u32 = target.parse().map_err(|_| {
                ExtError::new(
                    code::BAD_ADDRESS,
                    format!("node ID {target} is out of range"),
                )
            })?;
            return to_value(&ipc::ResolveReply {
                node_id: node,
                address: Addr::new(0, node).to_string(),
                hostname: None,
                public: None,
            });
        }
        if target.contains(':') {
            return Err(ExtError::new(
                code::BAD_ADDRESS,
                format!("{target:?} is not an address"),
            ));
        }
        let v = self
            .shared
            .registry(json!({"type": "resolve_hostname", "hostname": target}))
            .await
            .map_err(registry_error)?;
        let node = v
            .get("node_id")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ExtError::new(code::INTERNAL, "registry gave no node_id"))?;
        let mut out = to_value(&ipc::ResolveReply {
            node_id: node,
            address: Addr::new(0, node).to_string(),
            hostname: Some(target.to_owned()),
            public: v.get("public").and_then(Value::as_bool),
        })?;
        // Answered from what the node knew, the registry being unreachable.
        if v.get("stale").and_then(Value::as_bool) == Some(true) {
            out["stale"] = json!(true);
        }
        Ok(out)
    }

    /// Echo probes to port 7 of `node`, one fresh connection each. The round-trip time is
    /// measured from the write to the echo, once the connection is up.
    async fn ping(
        &self,
        node: u32,
        count: u32,
        timeout_ms: Option<u64>,
    ) -> Result<Value, ExtError> {
        if node == 0 {
            return Err(ExtError::new(code::BAD_ADDRESS, "node 0 is not a node"));
        }
        let per = Duration::from_millis(timeout_ms.unwrap_or(PING_TIMEOUT_MS).clamp(10, 60_000));
        let mut results = Vec::new();
        for seq in 1..=count.clamp(1, MAX_PING_COUNT) {
            let probe = match tokio::time::timeout(per, echo_probe(self.engine(), node, seq)).await
            {
                Ok(Ok(rtt)) => ipc::PingProbe {
                    seq,
                    rtt_ms: Some(rtt.as_secs_f64() * 1000.0),
                    path: self.path_to(node).await,
                    error: None,
                },
                Ok(Err(e)) => ipc::PingProbe {
                    seq,
                    error: Some(e),
                    ..ipc::PingProbe::default()
                },
                Err(_) => ipc::PingProbe {
                    seq,
                    error: Some("timeout".into()),
                    ..ipc::PingProbe::default()
                },
            };
            results.push(probe);
        }
        to_value(&ipc::PingReply {
            node_id: node,
            address: Addr::new(0, node).to_string(),
            results,
        })
    }

    /// How the tunnel to `node` travels now, if it is a peer.
    async fn path_to(&self, node: u32) -> Option<ipc::PathKind> {
        let info = self.engine().info().await.ok()?;
        let peer = info
            .get("peer_list")?
            .as_array()?
            .iter()
            .find(|p| p.get("node_id").and_then(Value::as_u64) == Some(node.into()))?;
        Some(
            if peer.get("relay").and_then(Value::as_bool) == Some(true) {
                ipc::PathKind::Relayed
            } else {
                ipc::PathKind::Direct
            },
        )
    }

    async fn trust_ext(&self, op: TrustOp) -> Result<Value, ExtError> {
        self.shared
            .trust(op)
            .await
            .map_err(|e| ExtError::new(e.code(), e.to_string()))
    }
}

impl Shared {
    /// Points webhooks at `url` ("" stops them). A bad URL is refused and the old one stays.
    fn set_webhook(&self, url: &str) -> Result<(), BadWebhookUrl> {
        match &self.ctx.webhook {
            Some(h) => {
                h.set(url)?;
                self.ctx.events.set_wanted(!url.is_empty());
            }
            None if url.is_empty() => {}
            None => {
                WebhookUrl::parse(url)?;
            }
        }
        *lock(&self.webhook) = url.to_owned();
        // Only whether it is set: the URL's query may hold a token.
        tracing::info!(set = !url.is_empty(), "webhook changed over IPC");
        Ok(())
    }

    async fn info(&self) -> Result<Value, String> {
        let mut v = self.ctx.engine.info().await.map_err(|e| e.to_string())?;
        if let Some(o) = v.as_object_mut() {
            if let Some(h) = self.ctx.desired.current_hostname() {
                o.insert("hostname".into(), json!(h));
            }
            let has_key = o
                .get("public_key")
                .and_then(Value::as_str)
                .is_some_and(|k| !k.is_empty());
            if !has_key {
                o.insert(
                    "public_key".into(),
                    json!(self.ctx.identity.public_key_base64()),
                );
            }
            o.insert("ipc".into(), self.stats.to_json());
            o.insert("pid".into(), json!(std::process::id()));
            if let Some(h) = &self.ctx.webhook {
                o.insert("webhook".into(), h.to_json(&self.ctx.events));
            }
            o.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
            if let Some(status) = lock(&self.inside).as_ref() {
                o.insert("inside".into(), (status.0)());
            }
        }
        Ok(v)
    }

    async fn trust(&self, op: TrustOp) -> TrustReply {
        let Some(t) = &self.ctx.trust else {
            return Err(TrustOpError::NotRunning);
        };
        let (reply, rx) = oneshot::channel();
        t.send(TrustCmd { op, reply })
            .await
            .map_err(|_| TrustOpError::NotRunning)?;
        rx.await.map_err(|_| TrustOpError::Stopped)?
    }

    /// Makes the node public or private in the registry, then has the trust gate follow.
    async fn set_visibility(&self, public: bool) -> LinkReply {
        let r = self
            .registry(json!({"type": "set_visibility", "node_id": null, "public": public}))
            .await?;
        if let Some(t) = &self.ctx.trust_handle {
            t.set_public(public);
        }
        Ok(r)
    }

    /// The text of a failed Dial, worded so that its stable code reads right from it
    /// ([`pilot_driver::v1_error_code`]'s rules): a private peer that refused a stream from
    /// a node it does not trust says so, instead of a bare `connection refused` that also
    /// means a closed port.
    async fn dial_failure(&self, dst: PilotAddr, e: &crate::engine::DialError) -> String {
        let refused = matches!(e, crate::engine::DialError::Closed(CloseReason::Refused));
        let node = dst.addr.node;
        let trusted = self
            .ctx
            .trust_handle
            .as_ref()
            .is_none_or(|t| t.gate().is_trusted(node));
        if !refused || trusted || dst.port == tunnel::addr::port::HANDSHAKE {
            return e.to_string();
        }
        match self
            .registry(json!({"type": "lookup", "node_id": node}))
            .await
        {
            Ok(v) if v.get("public").and_then(Value::as_bool) == Some(false) => {
                format!("{e}: node {node} is private and does not trust this node")
            }
            _ => e.to_string(),
        }
    }

    async fn registry(&self, req: Value) -> LinkReply {
        self.link_request(|tx| LinkCmd::Call(req, tx)).await
    }

    /// Sends the registry link a command answered on a channel, bounded in time.
    async fn link_request(
        &self,
        cmd: impl FnOnce(oneshot::Sender<LinkReply>) -> LinkCmd,
    ) -> LinkReply {
        registry_link::request(&self.ctx.link, cmd, REGISTRY_TIMEOUT).await
    }
}

/// Writes a connection's queued data in order, waiting for the engine's write credit, then
/// closes it if asked.
async fn conn_writer(
    engine: EngineHandle,
    conn: ConnId,
    credit: Arc<Semaphore>,
    mut rx: mpsc::UnboundedReceiver<ConnOp>,
    room: Arc<Semaphore>,
) {
    let mut failed = false;
    while let Some(op) = rx.recv().await {
        match op {
            ConnOp::Data(d) => {
                if !failed && engine.write(conn, &credit, &d).await.is_err() {
                    // The engine stopped or the connection failed: drop what is queued.
                    failed = true;
                }
                room.add_permits(d.len());
            }
            ConnOp::Close => {
                let _ = engine.send(Cmd::Close { conn }).await;
                break;
            }
        }
    }
    room.close();
}

/// Opens a connection to port 7 of `node`, writes a probe and waits for its echo; the time
/// from the write to the echo.
async fn echo_probe(engine: &EngineHandle, node: u32, seq: u32) -> Result<Duration, String> {
    let (tx, mut rx) = mpsc::channel(8);
    let (conn, credit) = engine
        .dial(PilotAddr::new(Addr::new(0, node), 7), tx)
        .await
        .map_err(|e| e.to_string())?;
    let probe = format!("pilot ping {seq}");
    let t0 = Instant::now();
    let r = async {
        engine
            .write(conn, &credit, probe.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        while got.len() < probe.len() {
            match rx.recv().await {
                Some(AppEvent::Data { data, .. }) => got.extend_from_slice(&data),
                Some(AppEvent::Closed { error, .. }) => {
                    return Err(
                        error.map_or_else(|| "closed before the echo".into(), |r| r.to_string())
                    )
                }
                Some(_) => {}
                None => return Err("connection lost".into()),
            }
        }
        if got.get(..probe.len()) != Some(probe.as_bytes()) {
            return Err("the echo differs from the probe".into());
        }
        Ok(t0.elapsed())
    }
    .await;
    let _ = engine.send(Cmd::Close { conn }).await;
    r
}

/// Task IDs are `8-4-4-4-12` lowercase hex, as pilotctl shows them.
fn check_task_id(id: &str) -> Result<(), ExtError> {
    if crate::tasks::valid_task_id(id) {
        Ok(())
    } else {
        Err(ExtError::new(
            code::BAD_REQUEST,
            format!("{id:?} is not a task ID (8-4-4-4-12 lowercase hex, as `tasks list` shows)"),
        ))
    }
}

/// A task service failure with the closest stable code.
fn task_error(e: TaskError) -> ExtError {
    let c = match e.code() {
        "not_found" => code::NOT_FOUND,
        "unavailable" => code::UNAVAILABLE,
        "timeout" => code::TIMEOUT,
        "connection_failed" => code::REFUSED,
        "internal" => code::INTERNAL,
        // invalid_argument, invalid_state, expired
        _ => code::BAD_REQUEST,
    };
    ExtError::new(c, e.to_string())
}

/// Bytes of listed items one reply carries, below the 1 MiB IPC frame limit.
const MAX_LISTING_BYTES: usize = 900 * 1024;

/// Longest text field (message data, task description) shown in a listing; longer ones are
/// cut and marked `"truncated": true` (the whole text stays on disk).
const MAX_LISTED_TEXT: usize = 4096;

/// Makes a listing fit one reply: cuts long text fields, then keeps the newest items (the
/// back) that fit in `budget` bytes; returns how many were left out.
fn keep_newest_within(items: &mut Vec<Value>, budget: usize) -> usize {
    for v in items.iter_mut() {
        let Some(o) = v.as_object_mut() else { continue };
        let mut cut = false;
        for key in [
            "data",
            "description",
            "task_description",
            "status_justification",
        ] {
            if let Some(Value::String(t)) = o.get_mut(key) {
                if t.len() > MAX_LISTED_TEXT {
                    let mut end = MAX_LISTED_TEXT;
                    while !t.is_char_boundary(end) {
                        end -= 1;
                    }
                    t.truncate(end);
                    cut = true;
                }
            }
        }
        if cut {
            o.insert("truncated".into(), Value::Bool(true));
        }
    }
    let mut used = 0usize;
    let mut keep = vec![false; items.len()];
    for (i, v) in items.iter().enumerate().rev() {
        let n = serde_json::to_vec(v)
            .map(|b| b.len() + 1)
            .unwrap_or(usize::MAX);
        if used.saturating_add(n) <= budget {
            used += n;
            if let Some(k) = keep.get_mut(i) {
                *k = true;
            }
        }
    }
    let before = items.len();
    let mut it = keep.iter();
    items.retain(|_| it.next().copied().unwrap_or(false));
    before - items.len()
}

/// Runs file work off the async threads; its JSON, or an `internal` error.
async fn blocking_json(
    f: impl FnOnce() -> std::io::Result<Value> + Send + 'static,
) -> Result<Value, ExtError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Err(ExtError::new(
            code::NOT_FOUND,
            format!("nothing stored yet: {e}"),
        )),
        Ok(Err(e)) => Err(ExtError::new(code::INTERNAL, e.to_string())),
        Err(e) => Err(ExtError::new(code::INTERNAL, e.to_string())),
    }
}

/// A nameserver record written as REGISTER arguments (`A alice 0:0000.0000.0001`).
fn parse_record(text: &str) -> Result<Record, ExtError> {
    match parse_request(&format!("REGISTER {}", text.trim())) {
        Ok(Request::Register(r)) => Ok(r),
        Ok(_) => Err(ExtError::new(code::BAD_REQUEST, "not a record")),
        Err(e) => Err(ExtError::new(
            code::BAD_REQUEST,
            format!(
                "record {text:?}: {e} (write `A <name> <addr>`, `N <name> <net_id>` or \
                 `S <name> <addr> <net_id> <port>`)"
            ),
        )),
    }
}

/// A webhook URL refused by [`Shared::set_webhook`] (the `bad_request` of the extension).
#[derive(Debug, thiserror::Error)]
#[error("webhook URL: {0}")]
struct BadWebhookUrl(#[from] UrlError);

/// Why a v1 SetTags payload is refused.
#[derive(Debug, thiserror::Error)]
enum TagsError {
    /// Not a JSON array of strings (or null).
    #[error("tags must be a JSON array of strings: {0}")]
    NotJson(serde_json::Error),
    /// More than [`MAX_TAGS`].
    #[error("too many tags: at most {MAX_TAGS}, got {0}")]
    TooMany(usize),
}

fn parse_tags(json: &[u8]) -> Result<Vec<String>, TagsError> {
    let tags: Option<Vec<String>> = serde_json::from_slice(json).map_err(TagsError::NotJson)?;
    let tags = tags.unwrap_or_default();
    if tags.len() > MAX_TAGS {
        return Err(TagsError::TooMany(tags.len()));
    }
    Ok(tags)
}

fn json_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, ExtError> {
    serde_json::to_value(v).map_err(|e| ExtError::new(code::INTERNAL, e.to_string()))
}

fn unavailable(e: impl Display) -> ExtError {
    ExtError::new(code::UNAVAILABLE, e.to_string())
}

/// A registry failure as an extension error: its code is [`LinkError::code`].
fn registry_error(e: LinkError) -> ExtError {
    ExtError::new(e.code(), e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn listings_cut_long_text_and_keep_the_newest_that_fit() {
        let mut items: Vec<Value> = (0..10)
            .map(|i| json!({"id": i, "data": "x".repeat(if i == 8 { 100_000 } else { 10 })}))
            .collect();
        // Everything fits once the long text is cut.
        assert_eq!(keep_newest_within(&mut items, 100_000), 0);
        assert_eq!(items.len(), 10);
        assert_eq!(items[8]["truncated"], true);
        assert_eq!(items[8]["data"].as_str().unwrap().len(), MAX_LISTED_TEXT);
        assert!(items[7].get("truncated").is_none());
        // A small budget keeps the newest items (the back), never an older one past a gap.
        let omitted = keep_newest_within(&mut items, 200);
        assert!(omitted > 0);
        let ids: Vec<u64> = items.iter().map(|v| v["id"].as_u64().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(*ids.last().unwrap(), 9);
        assert_eq!(ids.len() + omitted, 10);
    }
}

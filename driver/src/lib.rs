//! `pilot-driver`: the library agents use to talk to a running `pilotd` over its IPC Unix
//! socket (v1 wire §7). Through it an agent opens stream connections to other nodes' virtual
//! ports, listens on its own ports, sends and receives datagrams, asks the daemon for its
//! status and trust state, and makes the JSON extension requests (`tunnel::ipc::ExtRequest`).
//! It links only `tunnel` (the sans-IO protocol crate) and tokio, never the daemon.
//!
//! - [`Driver`]: one connection to the daemon; cheap to clone.
//! - [`PilotStream`]: a stream connection, `AsyncRead + AsyncWrite`.
//! - [`PilotListener`]: a bound port that yields incoming streams.
//! - [`Datagram`]: what [`Driver::recv_from`] returns; [`Driver::send_to`] sends one.
//! - [`services`]: clients of the built-in services every node runs: data exchange
//!   (messages and files, port 1001), the event stream (publish/subscribe, port 1002), the
//!   nameserver (port 53).
//! - [`config`]: where the daemon puts its socket ([`config::SYSTEM_SOCKET`] as root, else
//!   `<home>/pilotd.sock`) and the duration syntax of its flags.
//!
//! # Dial, write, read
//!
//! Addresses are `net:NNNN.NNNN.NNNN:port` ([`tunnel::SocketAddr`]). Write with
//! `AsyncWriteExt`, then `shutdown` to send FIN once the data is out; the peer's data keeps
//! arriving until its EOF.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use pilot_driver::Driver;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let driver = Driver::connect("/run/pilot/pilotd.sock").await?;
//! let mut stream = driver.dial("0:0000.0000.0007:7".parse()?).await?;
//! stream.write_all(b"hello").await?;
//! stream.shutdown().await?; // Close: FIN once the data is out
//! let mut echoed = Vec::new();
//! stream.read_to_end(&mut echoed).await?;
//! # Ok(()) }
//! ```
//!
//! # Listen and accept
//!
//! ```no_run
//! # async fn demo(driver: pilot_driver::Driver) -> Result<(), pilot_driver::DriverError> {
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let mut listener = driver.listen(9000).await?;
//! loop {
//!     let (mut conn, from) = listener.accept().await?;
//!     println!("connection from {from}");
//!     tokio::spawn(async move {
//!         let mut request = Vec::new();
//!         // Reads until the peer shuts its side down.
//!         if conn.read_to_end(&mut request).await.is_ok() {
//!             let _ = conn.write_all(&request).await;
//!         }
//!         let _ = conn.shutdown().await;
//!     });
//! }
//! # }
//! ```
//!
//! # Datagrams and the built-in services
//!
//! ```no_run
//! # async fn demo(driver: pilot_driver::Driver) -> Result<(), Box<dyn std::error::Error>> {
//! use pilot_driver::services::dataexchange::{send_message, DATA_PORT};
//! use tunnel::services::dataexchange::FrameType;
//! use tunnel::SocketAddr;
//!
//! let peer: SocketAddr = "0:0000.0000.0007:5000".parse()?;
//! let _port = driver.listen(5000).await?; // datagrams to port 5000 come to this driver
//! driver.send_to(peer, b"ping").await?;
//! let reply = driver.recv_from().await?;
//! println!("{} bytes from {}", reply.data.len(), reply.src);
//!
//! let mut inbox = driver.dial(SocketAddr::new(peer.addr, DATA_PORT)).await?;
//! let ack = send_message(&mut inbox, FrameType::Text, b"hello").await?;
//! println!("{ack}"); // "ACK TEXT 5 bytes"
//! # Ok(()) }
//! ```
//!
//! # Model
//!
//! One background task reads the socket and routes each message: replies to the oldest waiting
//! request (the daemon answers in request order), Recv and CloseOk to their stream, Accept to
//! its listener, RecvFrom to the datagram queue. Another task writes the requests, in the
//! order they were made. A [`Driver`] is cheap to clone; the socket closes once the driver, its
//! clones, streams and listeners are all dropped.
//!
//! The daemon works on requests concurrently but answers them in order, so a slow dial delays
//! the replies to later requests of the same driver (never its stream data or datagrams).
//! Use another driver for requests that must not wait behind a dial.
//!
//! Each stream buffers up to [`STREAM_BUFFER`] received chunks. The v1 protocol has no
//! per-connection flow control between daemon and client, so a stream whose reader falls that
//! far behind holds up delivery to every stream of the same driver (the daemon then stops
//! reading those connections); use one driver per independent consumer if that matters.
//!
//! # Close and EOF
//!
//! [`PilotStream`]'s `shutdown` sends Close: the daemon sends queued data, then FIN, and the
//! peer's data keeps arriving until its EOF. The daemon answers Close with a CloseOk and
//! reports the peer's EOF with another, unsolicited, CloseOk; the stream reaches EOF on the
//! second. Dropping a stream closes it and discards what arrives later.
//!
//! v1 has no command to unbind a port: dropping a [`PilotListener`] makes the driver close
//! further connections to it at once; the port is released when the driver disconnects.

pub mod config;
pub mod secure;
pub mod services;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc::{self, error::SendError, OwnedPermit};
use tokio::sync::oneshot;
use tunnel::ipc::{
    self, cmd, ExtReply, ExtRequest, FrameDecoder, FrameError, HandshakeOp, Message,
};
use tunnel::SocketAddr;

/// Received chunks buffered per stream.
pub const STREAM_BUFFER: usize = 64;
/// Connections waiting per listener for [`PilotListener::accept`]; more are closed.
pub const ACCEPT_BACKLOG: usize = 128;
/// Datagrams buffered for [`Driver::recv_from`]; more are dropped (and counted).
pub const DATAGRAM_BUFFER: usize = 256;
/// How long `connect` waits for the daemon to take the `conn_errors` request.
const CONNECT_PROBE: std::time::Duration = std::time::Duration::from_secs(2);
/// Largest chunk of stream data sent in one message.
pub const MAX_WRITE: usize = 256 * 1024;
/// Frames queued for the socket before writers wait.
const OUT_FRAMES: usize = 64;
/// Bytes read from the socket at a time.
const READ_BUF: usize = 64 * 1024;
/// Bytes gathered into one socket write.
const WRITE_BATCH: usize = 256 * 1024;

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The socket cannot be reached.
    #[error("cannot reach the daemon at {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The connection to the daemon is gone.
    #[error("daemon connection lost: {0}")]
    DaemonDown(String),
    /// The daemon answered with an Error message.
    #[error("{0}")]
    Daemon(String),
    /// The daemon's reply is not what the request expects.
    #[error("unexpected reply from the daemon: {0}")]
    BadReply(String),
    /// The request does not fit in one IPC message.
    #[error(transparent)]
    TooLarge(#[from] FrameError),
}

impl DriverError {
    /// The stable error code of [`tunnel::ipc::code`] closest to this error. A v1 Error
    /// message carries no code: its code is [`v1_error_code`]'s reading of the text, or
    /// `refused` when the text says nothing more.
    pub fn code(&self) -> &'static str {
        match self {
            DriverError::Connect { .. } | DriverError::DaemonDown(_) => ipc::code::DAEMON_DOWN,
            DriverError::BadReply(_) => ipc::code::BAD_REPLY,
            DriverError::TooLarge(_) => ipc::code::BAD_REQUEST,
            DriverError::Daemon(m) => v1_error_code(m).unwrap_or(ipc::code::REFUSED),
        }
    }
}

/// The stable code ([`tunnel::ipc::code`]) a v1-form Error message stands for, read from its
/// text, or `None` when the text matches no rule.
///
/// This is the only place an error is classified by its wording. Extension replies carry
/// their code ([`ExtReply::Error`]) and need no reading; a v1 `Error` (v1 wire §7.2: code is
/// always 1) answers Bind, Dial, Send, Info and the other v1 commands with free text, and the
/// text is all there is. The rules, first match wins, on the lowercased text:
///
/// | words                                   | code               |
/// |-----------------------------------------|--------------------|
/// | `not registered`                        | `not_found`        |
/// | `registry unreachable`, `unavailable`   | `unavailable`      |
/// | `does not trust`                        | `untrusted`        |
/// | `refused`                               | `refused`          |
/// | `timeout`, `timed out`                  | `timeout`          |
/// | `trust`, `private`, `denied`            | `untrusted`        |
/// | `not found`, `no such`, `unknown`       | `not_found`        |
/// | `in use`, `already`, `invalid`          | `bad_request`      |
///
/// pilotd words its Dial failures so that they read right: a node the registry does not know
/// is `not registered`, a registry it cannot reach is `registry unreachable`, and a private
/// peer that refuses us is `does not trust`.
pub fn v1_error_code(message: &str) -> Option<&'static str> {
    const RULES: &[(&[&str], &str)] = &[
        (&["not registered"], ipc::code::NOT_FOUND),
        (
            &["registry unreachable", "unavailable"],
            ipc::code::UNAVAILABLE,
        ),
        (&["does not trust"], ipc::code::UNTRUSTED),
        (&["refused"], ipc::code::REFUSED),
        (&["timeout", "timed out"], ipc::code::TIMEOUT),
        (&["trust", "private", "denied"], ipc::code::UNTRUSTED),
        (&["not found", "no such", "unknown"], ipc::code::NOT_FOUND),
        (&["in use", "already", "invalid"], ipc::code::BAD_REQUEST),
    ];
    let l = message.to_ascii_lowercase();
    RULES
        .iter()
        .find(|(words, _)| words.iter().any(|w| l.contains(w)))
        .map(|&(_, c)| c)
}

impl From<DriverError> for io::Error {
    fn from(e: DriverError) -> Self {
        let kind = match &e {
            DriverError::Connect { .. } | DriverError::DaemonDown(_) => io::ErrorKind::BrokenPipe,
            DriverError::TooLarge(_) => io::ErrorKind::InvalidInput,
            DriverError::Daemon(m) => match v1_error_code(m) {
                Some(ipc::code::REFUSED) => io::ErrorKind::ConnectionRefused,
                Some(ipc::code::TIMEOUT) => io::ErrorKind::TimedOut,
                _ => io::ErrorKind::Other,
            },
            DriverError::BadReply(_) => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// A datagram received on a port this driver bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Sender.
    pub src: SocketAddr,
    /// The local port it was sent to.
    pub dst_port: u16,
    /// Payload.
    pub data: Vec<u8>,
}

enum StreamEvent {
    Data(Vec<u8>),
    Eof,
    /// The connection failed; no clean EOF follows.
    Failed(String),
}

struct StreamEntry {
    tx: mpsc::Sender<StreamEvent>,
    /// EOF was delivered.
    eof: bool,
    /// This side sent Close.
    close_sent: bool,
    /// CloseOks seen since then.
    after_close: u8,
}

struct Accepted {
    conn: u32,
    remote: SocketAddr,
    rx: mpsc::Receiver<StreamEvent>,
}

enum Answer {
    Json(Vec<u8>),
    Dialed(u32, mpsc::Receiver<StreamEvent>),
    Bound(mpsc::Receiver<Accepted>),
}

struct Waiter {
    /// The reply command expected.
    expect: u8,
    tx: oneshot::Sender<Result<Answer, DriverError>>,
}

#[derive(Default)]
struct State {
    waiters: VecDeque<Waiter>,
    streams: HashMap<u32, StreamEntry>,
    listeners: HashMap<u16, mpsc::Sender<Accepted>>,
    /// Why the connection ended, once it has.
    dead: Option<String>,
    /// Error messages no request was waiting for.
    stray_errors: u64,
    /// Datagrams dropped because the queue was full.
    datagrams_dropped: u64,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A frame for the daemon, and who waits until it is written to the socket.
struct Out {
    frame: Vec<u8>,
    written: Option<oneshot::Sender<()>>,
}

impl From<Vec<u8>> for Out {
    fn from(frame: Vec<u8>) -> Out {
        Out {
            frame,
            written: None,
        }
    }
}

struct Inner {
    out: mpsc::Sender<Out>,
    state: Arc<Mutex<State>>,
    datagrams: tokio::sync::Mutex<mpsc::Receiver<Datagram>>,
    demux: tokio::task::JoinHandle<()>,
    peer_pid: Option<i32>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.demux.abort();
    }
}

impl Inner {
    fn down(&self) -> DriverError {
        DriverError::DaemonDown(
            lock(&self.state)
                .dead
                .clone()
                .unwrap_or_else(|| "the connection is closed".into()),
        )
    }

    /// Sends a request and waits for its reply.
    async fn request(&self, msg: &Message<'_>) -> Result<Answer, DriverError> {
        let frame = encode(msg)?;
        let permit = self.out.reserve().await.map_err(|_| self.down())?;
        let (tx, rx) = oneshot::channel();
        {
            let mut s = lock(&self.state);
            if let Some(d) = &s.dead {
                return Err(DriverError::DaemonDown(d.clone()));
            }
            s.waiters.push_back(Waiter {
                expect: msg.cmd().wrapping_add(1),
                tx,
            });
            // Queued under the lock: waiters and requests stay in the same order.
            permit.send(frame.into());
        }
        rx.await.map_err(|_| self.down())?
    }

    async fn request_json(&self, msg: &Message<'_>) -> Result<Vec<u8>, DriverError> {
        match self.request(msg).await? {
            Answer::Json(j) => Ok(j),
            _ => Err(DriverError::BadReply("not a JSON reply".into())),
        }
    }

    /// Queues a message that has no reply.
    async fn send(&self, msg: &Message<'_>) -> Result<(), DriverError> {
        let frame = encode(msg)?;
        self.out.send(frame.into()).await.map_err(|_| self.down())
    }

    fn stream(
        self: &Arc<Self>,
        conn: u32,
        remote: SocketAddr,
        rx: mpsc::Receiver<StreamEvent>,
    ) -> PilotStream {
        PilotStream {
            inner: self.clone(),
            conn,
            remote,
            rx,
            buf: Vec::new(),
            pos: 0,
            eof: false,
            failed: None,
            reserve: None,
            write_closed: false,
            flushing: None,
        }
    }
}

fn encode(msg: &Message<'_>) -> Result<Vec<u8>, FrameError> {
    let mut v = Vec::with_capacity(ipc::LEN_PREFIX + 1 + msg.payload_len());
    msg.encode(&mut v)?;
    Ok(v)
}

/// A connection to the daemon's IPC socket. Cheap to clone.
#[derive(Clone)]
pub struct Driver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = lock(&self.inner.state);
        f.debug_struct("Driver")
            .field("streams", &s.streams.len())
            .field("listeners", &s.listeners.len())
            .field("waiting", &s.waiters.len())
            .field("dead", &s.dead)
            .finish()
    }
}

impl Driver {
    /// Connects to the daemon's socket.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Driver, DriverError> {
        let path = path.as_ref();
        let sock = UnixStream::connect(path)
            .await
            .map_err(|source| DriverError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let peer_pid = sock.peer_cred().ok().and_then(|c| c.pid());
        let (rd, wr) = sock.into_split();
        let (out, out_rx) = mpsc::channel(OUT_FRAMES);
        let (dg_tx, dg_rx) = mpsc::channel(DATAGRAM_BUFFER);
        let state = Arc::new(Mutex::new(State::default()));
        tokio::spawn(write_loop(wr, out_rx));
        let demux = tokio::spawn(demux(rd, state.clone(), out.clone(), dg_tx));
        let d = Driver {
            inner: Arc::new(Inner {
                out,
                state,
                datagrams: tokio::sync::Mutex::new(dg_rx),
                demux,
                peer_pid,
            }),
        };
        // Ask to hear of failed connections. A daemon without the extension answers with an
        // error; its failures then read as EOF, as in v1.
        let _ = tokio::time::timeout(CONNECT_PROBE, d.ext(&ExtRequest::ConnErrors)).await;
        Ok(d)
    }

    /// The daemon's process ID as the kernel reports it for the socket (`SO_PEERCRED`), in
    /// this process's PID namespace: 0 when the daemon runs in a namespace this process
    /// cannot see, `None` when the kernel gave none.
    pub fn peer_pid(&self) -> Option<i32> {
        self.inner.peer_pid
    }

    /// Opens a stream connection to `addr`. Errors carry the daemon's text, e.g.
    /// `connection refused` or `resolve node N: …`.
    pub async fn dial(&self, addr: SocketAddr) -> Result<PilotStream, DriverError> {
        match self.inner.request(&Message::Dial { dst: addr }).await? {
            Answer::Dialed(conn, rx) => Ok(self.inner.stream(conn, addr, rx)),
            _ => Err(DriverError::BadReply("DialOk expected".into())),
        }
    }

    /// Binds `port`: connections to it and datagrams sent to it come to the listener and to
    /// [`Driver::recv_from`].
    pub async fn listen(&self, port: u16) -> Result<PilotListener, DriverError> {
        match self.inner.request(&Message::Bind { port }).await? {
            Answer::Bound(rx) => Ok(PilotListener {
                inner: self.inner.clone(),
                port,
                rx,
            }),
            _ => Err(DriverError::BadReply("BindOk expected".into())),
        }
    }

    /// Sends a datagram from an ephemeral port. There is no delivery report; a failure the
    /// daemon notices comes back as an Error no request waits for (counted in
    /// [`Driver::stray_errors`]).
    pub async fn send_to(&self, dst: SocketAddr, data: &[u8]) -> Result<(), DriverError> {
        self.inner.send(&Message::SendTo { dst, data }).await
    }

    /// The next datagram to a port this driver bound.
    pub async fn recv_from(&self) -> Result<Datagram, DriverError> {
        let mut rx = self.inner.datagrams.lock().await;
        rx.recv().await.ok_or_else(|| self.inner.down())
    }

    /// The node's status.
    pub async fn info(&self) -> Result<ipc::Info, DriverError> {
        let j = self.info_json().await?;
        serde_json::from_value(j).map_err(|e| DriverError::BadReply(e.to_string()))
    }

    /// The node's status as the daemon sent it, extension keys included.
    pub async fn info_json(&self) -> Result<Value, DriverError> {
        self.json(&Message::Info).await
    }

    /// A trust handshake operation; the reply is the HandshakeOk JSON
    /// ([`ipc::HandshakeStatus`], [`ipc::PendingList`] or [`ipc::TrustedList`]).
    pub async fn handshake(&self, op: HandshakeOp<'_>) -> Result<Value, DriverError> {
        self.json(&Message::Handshake(op)).await
    }

    /// An extension request. A daemon-side failure is an [`ExtReply::Error`], not an `Err`.
    pub async fn ext(&self, req: &ExtRequest) -> Result<ExtReply, DriverError> {
        let json = req.to_json();
        let reply = self
            .inner
            .request_json(&Message::Ext { json: &json })
            .await?;
        ExtReply::from_json(&reply).map_err(|e| DriverError::BadReply(e.message))
    }

    /// The registry's record for a hostname (`resolve_hostname_ok`).
    pub async fn resolve_hostname(&self, hostname: &str) -> Result<Value, DriverError> {
        self.json(&Message::ResolveHostname { hostname }).await
    }

    /// Sets ("" clears) the node's hostname; the registry's answer.
    pub async fn set_hostname(&self, hostname: &str) -> Result<Value, DriverError> {
        self.json(&Message::SetHostname { hostname }).await
    }

    /// Makes the node public or private; the registry's answer.
    pub async fn set_visibility(&self, public: bool) -> Result<Value, DriverError> {
        self.json(&Message::SetVisibility { public }).await
    }

    /// Removes the node from the registry; the daemon keeps running.
    pub async fn deregister(&self) -> Result<Value, DriverError> {
        self.json(&Message::Deregister).await
    }

    /// Replaces the node's tags (at most [`ipc::MAX_TAGS`]); the registry's answer.
    pub async fn set_tags(&self, tags: &[&str]) -> Result<Value, DriverError> {
        let json = serde_json::to_vec(tags).map_err(|e| DriverError::BadReply(e.to_string()))?;
        self.json(&Message::SetTags { json: &json }).await
    }

    /// Sets ("" disables) the webhook URL; `{"webhook": url}`.
    pub async fn set_webhook(&self, url: &str) -> Result<Value, DriverError> {
        self.json(&Message::SetWebhook { url }).await
    }

    /// Advertises task execution on or off; the registry's answer.
    pub async fn set_task_exec(&self, enabled: bool) -> Result<Value, DriverError> {
        self.json(&Message::SetTaskExec { enabled }).await
    }

    /// Error messages from the daemon that no request was waiting for (failed sends).
    pub fn stray_errors(&self) -> u64 {
        lock(&self.inner.state).stray_errors
    }

    /// Datagrams dropped because [`Driver::recv_from`] fell [`DATAGRAM_BUFFER`] behind.
    pub fn datagrams_dropped(&self) -> u64 {
        lock(&self.inner.state).datagrams_dropped
    }

    async fn json(&self, msg: &Message<'_>) -> Result<Value, DriverError> {
        let j = self.inner.request_json(msg).await?;
        serde_json::from_slice(&j).map_err(|e| DriverError::BadReply(e.to_string()))
    }
}

/// A bound port: [`accept`](Self::accept) yields its incoming connections.
pub struct PilotListener {
    inner: Arc<Inner>,
    port: u16,
    rx: mpsc::Receiver<Accepted>,
}

impl std::fmt::Debug for PilotListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PilotListener")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl PilotListener {
    /// The next connection and its remote address.
    pub async fn accept(&mut self) -> Result<(PilotStream, SocketAddr), DriverError> {
        match self.rx.recv().await {
            Some(a) => Ok((self.inner.stream(a.conn, a.remote, a.rx), a.remote)),
            None => Err(self.inner.down()),
        }
    }

    /// The bound port.
    pub fn local_port(&self) -> u16 {
        self.port
    }
}

impl Drop for PilotListener {
    fn drop(&mut self) {
        lock(&self.inner.state).listeners.remove(&self.port);
    }
}

type ReserveFuture = Pin<Box<dyn Future<Output = Result<OwnedPermit<Out>, SendError<()>>> + Send>>;

/// A stream connection through the daemon: `AsyncRead` + `AsyncWrite`. `shutdown` sends Close
/// (FIN after the written data); reading continues until the peer's EOF.
pub struct PilotStream {
    inner: Arc<Inner>,
    conn: u32,
    remote: SocketAddr,
    rx: mpsc::Receiver<StreamEvent>,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
    /// Why the connection failed, once the daemon said so.
    failed: Option<String>,
    /// A pending wait for room in the socket queue; the mutex only makes the stream `Sync`
    /// (it is reached through `&mut self`, never locked).
    reserve: Option<Mutex<ReserveFuture>>,
    write_closed: bool,
    /// A flush or Close on its way to the daemon's socket; fires once written.
    flushing: Option<oneshot::Receiver<()>>,
}

impl std::fmt::Debug for PilotStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PilotStream")
            .field("conn", &self.conn)
            .field("remote", &self.remote)
            .field("eof", &self.eof)
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl PilotStream {
    /// The daemon's connection ID.
    pub fn conn_id(&self) -> u32 {
        self.conn
    }

    /// The remote end.
    pub fn peer_addr(&self) -> SocketAddr {
        self.remote
    }

    /// Waits for room to queue one frame.
    fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<OwnedPermit<Out>>> {
        let out = &self.inner.out;
        let fut = self
            .reserve
            .get_or_insert_with(|| Mutex::new(Box::pin(out.clone().reserve_owned())));
        let fut = fut.get_mut().unwrap_or_else(|e| e.into_inner());
        match fut.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                self.reserve = None;
                Poll::Ready(r.map_err(|_| io::Error::from(self.inner.down())))
            }
        }
    }
}

impl PilotStream {
    /// Waits until the frame [`PilotStream::flushing`] stands for is written.
    fn poll_written(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(rx) = self.flushing.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let Poll::Ready(r) = Pin::new(rx).poll(cx) else {
            return Poll::Pending;
        };
        self.flushing = None;
        Poll::Ready(r.map_err(|_| io::Error::from(self.inner.down())))
    }
}

impl AsyncRead for PilotStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pos < this.buf.len() {
                let n = (this.buf.len() - this.pos).min(out.remaining());
                out.put_slice(this.buf.get(this.pos..this.pos + n).unwrap_or_default());
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            if let Some(why) = &this.failed {
                return Poll::Ready(Err(failed(why)));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match this.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(StreamEvent::Data(d))) => {
                    this.buf = d;
                    this.pos = 0;
                }
                Poll::Ready(Some(StreamEvent::Eof)) => this.eof = true,
                Poll::Ready(Some(StreamEvent::Failed(why))) => {
                    this.eof = true;
                    this.failed = Some(why);
                }
                Poll::Ready(None) => {
                    this.eof = true;
                    if lock(&this.inner.state).dead.is_some() {
                        return Poll::Ready(Err(this.inner.down().into()));
                    }
                }
            }
        }
    }
}

fn failed(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("connection failed: {why}"),
    )
}

impl AsyncWrite for PilotStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream is shut down for writing",
            )));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let permit = match self.poll_permit(cx) {
            Poll::Ready(Ok(p)) => p,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        let n = data.len().min(MAX_WRITE);
        let msg = Message::Send {
            conn_id: self.conn,
            data: data.get(..n).unwrap_or_default(),
        };
        match encode(&msg) {
            Ok(f) => {
                permit.send(f.into());
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidInput, e))),
        }
    }

    /// Ready once everything written so far is in the daemon's socket: a process may exit
    /// right after it and lose nothing.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.flushing.is_none() {
            let permit = match self.poll_permit(cx) {
                Poll::Ready(Ok(p)) => p,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            let (tx, rx) = oneshot::channel();
            permit.send(Out {
                frame: Vec::new(),
                written: Some(tx),
            });
            self.flushing = Some(rx);
        }
        self.poll_written(cx)
    }

    /// Sends Close (FIN after the written data) and is ready once the Close is in the
    /// daemon's socket.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            let permit = match self.poll_permit(cx) {
                Poll::Ready(Ok(p)) => p,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            let conn = self.conn;
            let frame = encode(&Message::Close { conn_id: conn })
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            if let Some(e) = lock(&self.inner.state).streams.get_mut(&conn) {
                e.close_sent = true;
            }
            let (tx, rx) = oneshot::channel();
            permit.send(Out {
                frame,
                written: Some(tx),
            });
            self.write_closed = true;
            self.flushing = Some(rx);
        }
        self.poll_written(cx)
    }
}

impl Drop for PilotStream {
    fn drop(&mut self) {
        lock(&self.inner.state).streams.remove(&self.conn);
        if self.write_closed {
            return;
        }
        let Ok(frame) = encode(&Message::Close { conn_id: self.conn }) else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(frame)) = self.inner.out.try_send(frame.into()) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let out = self.inner.out.clone();
                rt.spawn(async move {
                    let _ = out.send(frame).await;
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Background tasks
// ---------------------------------------------------------------------------------------------

async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Out>) {
    let mut buf = Vec::with_capacity(WRITE_BATCH);
    let mut waiting = Vec::new();
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut next = Some(first);
        while let Some(o) = next.take() {
            buf.extend_from_slice(&o.frame);
            waiting.extend(o.written);
            if buf.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if wr.write_all(&buf).await.is_err() {
            break;
        }
        for w in waiting.drain(..) {
            let _ = w.send(());
        }
    }
    let _ = wr.shutdown().await;
}

async fn demux(
    mut rd: OwnedReadHalf,
    state: Arc<Mutex<State>>,
    out: mpsc::Sender<Out>,
    datagrams: mpsc::Sender<Datagram>,
) {
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; READ_BUF];
    let why = 'read: loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => break "the daemon closed the connection".to_owned(),
            Ok(n) => n,
            Err(e) => break e.to_string(),
        };
        dec.push(buf.get(..n).unwrap_or_default());
        loop {
            match dec.next_message() {
                Ok(Some(m)) => route(m, &state, &out, &datagrams).await,
                Ok(None) => break,
                Err(ipc::IpcError::Parse(e)) => {
                    // A whole frame this driver does not understand: skip it.
                    tracing::debug!(error = %e, "IPC message from the daemon ignored");
                }
                Err(ipc::IpcError::Frame(e)) => break 'read e.to_string(),
            }
        }
    };
    let mut s = lock(&state);
    s.dead = Some(why.clone());
    for w in s.waiters.drain(..) {
        let _ = w.tx.send(Err(DriverError::DaemonDown(why.clone())));
    }
    s.streams.clear();
    s.listeners.clear();
}

/// Closes a connection nobody will use.
async fn close_unwanted(out: &mpsc::Sender<Out>, conn: u32) {
    if let Ok(f) = encode(&Message::Close { conn_id: conn }) {
        let _ = out.send(f.into()).await;
    }
}

fn new_stream(s: &mut State, conn: u32) -> mpsc::Receiver<StreamEvent> {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    s.streams.insert(
        conn,
        StreamEntry {
            tx,
            eof: false,
            close_sent: false,
            after_close: 0,
        },
    );
    rx
}

async fn route(
    m: Message<'_>,
    state: &Mutex<State>,
    out: &mpsc::Sender<Out>,
    datagrams: &mpsc::Sender<Datagram>,
) {
    match m {
        Message::Recv { conn_id, data } => {
            let tx = lock(state).streams.get(&conn_id).map(|e| e.tx.clone());
            if let Some(tx) = tx {
                let _ = tx.send(StreamEvent::Data(data.to_vec())).await;
            }
        }
        Message::ConnFailed { conn_id, reason } => {
            let tx = {
                let mut s = lock(state);
                let Some(e) = s.streams.get_mut(&conn_id) else {
                    return;
                };
                // The CloseOk that follows is not a clean EOF; the stream ends here.
                e.eof = true;
                e.tx.clone()
            };
            let _ = tx.send(StreamEvent::Failed(reason.to_owned())).await;
        }
        Message::CloseOk { conn_id } => {
            let tx = {
                let mut s = lock(state);
                let Some(e) = s.streams.get_mut(&conn_id) else {
                    return;
                };
                if e.eof {
                    // The answer to our Close after the peer's EOF.
                    if e.close_sent {
                        s.streams.remove(&conn_id);
                    }
                    return;
                }
                if e.close_sent {
                    // One CloseOk answers our Close, the other is the peer's EOF; the data
                    // before the EOF precedes it, so EOF is due at the second.
                    e.after_close += 1;
                    if e.after_close < 2 {
                        return;
                    }
                }
                e.eof = true;
                let tx = e.tx.clone();
                if e.close_sent {
                    s.streams.remove(&conn_id);
                }
                tx
            };
            let _ = tx.send(StreamEvent::Eof).await;
        }
        Message::Accept {
            local_port,
            conn_id,
            remote,
        } => {
            let refused = {
                let mut s = lock(state);
                match s.listeners.get(&local_port).cloned() {
                    Some(l) => {
                        let rx = new_stream(&mut s, conn_id);
                        let a = Accepted {
                            conn: conn_id,
                            remote,
                            rx,
                        };
                        if l.try_send(a).is_err() {
                            s.streams.remove(&conn_id);
                            true
                        } else {
                            false
                        }
                    }
                    None => true,
                }
            };
            if refused {
                close_unwanted(out, conn_id).await;
            }
        }
        Message::RecvFrom {
            src,
            dst_port,
            data,
        } => {
            let d = Datagram {
                src,
                dst_port,
                data: data.to_vec(),
            };
            if datagrams.try_send(d).is_err() {
                lock(state).datagrams_dropped += 1;
            }
        }
        Message::Error { message, .. } => {
            let w = {
                let mut s = lock(state);
                let w = s.waiters.pop_front();
                if w.is_none() {
                    s.stray_errors += 1;
                }
                w
            };
            match w {
                Some(w) => {
                    let _ = w.tx.send(Err(DriverError::Daemon(message.to_owned())));
                }
                None => tracing::debug!(error = message, "IPC error for no pending request"),
            }
        }
        other => {
            let c = other.cmd();
            let mut unwanted = None;
            {
                let mut s = lock(state);
                let Some(w) = s.waiters.pop_front() else {
                    tracing::debug!(cmd = c, "IPC reply for no pending request");
                    return;
                };
                let answer = if w.expect != c {
                    Err(DriverError::BadReply(format!(
                        "{} for a request expecting {}",
                        cmd::name(c).unwrap_or("?"),
                        cmd::name(w.expect).unwrap_or("?")
                    )))
                } else {
                    Ok(match other {
                        Message::DialOk { conn_id } => {
                            Answer::Dialed(conn_id, new_stream(&mut s, conn_id))
                        }
                        Message::BindOk { port } => {
                            let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
                            s.listeners.insert(port, tx);
                            Answer::Bound(rx)
                        }
                        Message::InfoOk { json }
                        | Message::HandshakeOk { json }
                        | Message::ResolveHostnameOk { json }
                        | Message::SetHostnameOk { json }
                        | Message::SetVisibilityOk { json }
                        | Message::DeregisterOk { json }
                        | Message::SetTagsOk { json }
                        | Message::SetWebhookOk { json }
                        | Message::SetTaskExecOk { json }
                        | Message::ExtOk { json } => Answer::Json(json.to_vec()),
                        _ => Answer::Json(Vec::new()),
                    })
                };
                if let Err(Ok(Answer::Dialed(conn, _))) = w.tx.send(answer) {
                    // The dial was abandoned.
                    s.streams.remove(&conn);
                    unwanted = Some(conn);
                }
            }
            if let Some(conn) = unwanted {
                close_unwanted(out, conn).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_error_texts_map_to_codes() {
        let cases = [
            ("dial: connection refused", Some(ipc::code::REFUSED)),
            ("dial timed out", Some(ipc::code::TIMEOUT)),
            ("Connection Timeout", Some(ipc::code::TIMEOUT)),
            ("node is private", Some(ipc::code::UNTRUSTED)),
            ("node 7 is not trusted", Some(ipc::code::UNTRUSTED)),
            ("no such connection", Some(ipc::code::NOT_FOUND)),
            ("port 80 already bound", Some(ipc::code::BAD_REQUEST)),
            (
                "resolve node 99: node 99 is not registered",
                Some(ipc::code::NOT_FOUND),
            ),
            (
                "resolve node 9: registry unreachable",
                Some(ipc::code::UNAVAILABLE),
            ),
            (
                "connection refused: node 9 is private and does not trust this node",
                Some(ipc::code::UNTRUSTED),
            ),
            ("too many tags: at most 3, got 4", None),
        ];
        for (text, want) in cases {
            assert_eq!(v1_error_code(text), want, "{text}");
        }
    }

    #[test]
    fn driver_errors_have_codes_and_io_kinds() {
        let down = DriverError::DaemonDown("gone".into());
        assert_eq!(down.code(), ipc::code::DAEMON_DOWN);
        assert_eq!(io::Error::from(down).kind(), io::ErrorKind::BrokenPipe);

        let refused = DriverError::Daemon("connection refused".into());
        assert_eq!(refused.code(), ipc::code::REFUSED);
        assert_eq!(
            io::Error::from(refused).kind(),
            io::ErrorKind::ConnectionRefused
        );

        let timeout = DriverError::Daemon("dial timed out".into());
        assert_eq!(timeout.code(), ipc::code::TIMEOUT);
        assert_eq!(io::Error::from(timeout).kind(), io::ErrorKind::TimedOut);

        // Text no rule reads: the code defaults to `refused`, the I/O kind stays `Other`.
        let other = DriverError::Daemon("too many tags".into());
        assert_eq!(other.code(), ipc::code::REFUSED);
        assert_eq!(io::Error::from(other).kind(), io::ErrorKind::Other);

        let bad = DriverError::BadReply("x".into());
        assert_eq!(bad.code(), ipc::code::BAD_REPLY);
        assert_eq!(io::Error::from(bad).kind(), io::ErrorKind::Other);
    }
}

#[cfg(test)]
mod flush_tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::os::unix::net::UnixListener;

    /// What a stand-in daemon received: (command, connection, data) per stream frame.
    type Seen = Vec<(&'static str, u32, Vec<u8>)>;

    /// A daemon on `path` that answers the extension probe and one Dial, then records every
    /// Send and Close until the client's end of the socket closes.
    fn fake_daemon(path: &Path) -> std::thread::JoinHandle<Seen> {
        let listener = UnixListener::bind(path).expect("bind the test socket");
        std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().expect("a client");
            let mut dec = FrameDecoder::new();
            let mut seen = Seen::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = sock.read(&mut buf).expect("read the socket");
                if n == 0 {
                    return seen;
                }
                dec.push(&buf[..n]);
                while let Some(m) = dec.next_message().expect("a well-formed frame") {
                    let reply = match m {
                        Message::Ext { .. } => Some(Message::Error {
                            code: ipc::ERROR_CODE,
                            message: "unknown",
                        }),
                        Message::Dial { .. } => Some(Message::DialOk { conn_id: 7 }),
                        Message::Send { conn_id, data } => {
                            seen.push(("send", conn_id, data.to_vec()));
                            None
                        }
                        Message::Close { conn_id } => {
                            seen.push(("close", conn_id, Vec::new()));
                            None
                        }
                        _ => None,
                    };
                    if let Some(r) = reply {
                        let mut v = Vec::new();
                        r.encode(&mut v).expect("encode a reply");
                        sock.write_all(&v).expect("answer");
                    }
                }
            }
        })
    }

    /// `shutdown` returns once the Close is in the daemon's socket, so a program that exits
    /// right after it (here: its runtime is dropped at once) loses neither data nor Close.
    #[test]
    fn shutdown_then_exit_loses_nothing() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("d.sock");
        let daemon = fake_daemon(&path);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let d = Driver::connect(&path).await.expect("connect");
            let dst = SocketAddr::new(tunnel::Addr::new(0, 2), 1002);
            let mut s = d.dial(dst).await.expect("dial");
            s.write_all(b"first").await.expect("write");
            s.flush().await.expect("flush");
            s.write_all(b"last").await.expect("write");
            s.shutdown().await.expect("shutdown");
        });
        drop(rt);
        let seen = daemon.join().expect("the daemon thread");
        assert_eq!(
            seen,
            vec![
                ("send", 7, b"first".to_vec()),
                ("send", 7, b"last".to_vec()),
                ("close", 7, Vec::new()),
            ]
        );
    }
}

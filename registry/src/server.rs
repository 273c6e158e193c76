//! The registry service: connections, sessions, rate limits, group commit, pushes, reaping.
//!
//! ```text
//! connection task --frame--> Registry::handle --lock--> State::handle --> Outcome
//!                                   |                        (mutations sent to the committer
//!                                   |                         while the lock is held, so commit
//!                                   v                         order is apply order)
//!                            await commit  <-- committer thread: drains every queued batch,
//!                                   |                            one transaction, one fsync
//!                                 reply
//! ```
//!
//! The committer batches whatever accumulated while the previous transaction was being made
//! durable, so fsync cost is shared by every concurrent writer and a mutation is still
//! acknowledged only after it is on disk.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand_core::{OsRng, RngCore};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::auth::{b64, decode_key, register_message, session_message, verify};
use crate::dashboard::{Limits, Stats};
use crate::metrics::Metrics;
use crate::proto::{encode_frame, FrameDecoder, Request};
use crate::state::{Code, Ctx, Policy, Reject, State};
use crate::store::{Mutation, Store, StoreError};

/// Idle connections are closed after this long without a request (v1: 5 minutes).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often silent nodes are reaped.
pub const REAP_INTERVAL: Duration = Duration::from_secs(10);
/// Pushed events buffered per watching connection; beyond it events wait in the inbox for a
/// poll.
pub const WATCH_QUEUE: usize = 256;
/// Most mutations committed in one transaction.
pub const MAX_BATCH: usize = 8192;

/// Limits and secrets of a registry.
#[derive(Debug, Clone)]
pub struct Config {
    /// Rules' settings (admin and beacon tokens).
    pub policy: Policy,
    /// Registrations of new keys per source IP per minute (0: unlimited). v1: 10.
    pub register_per_minute: u32,
    /// Requests per source IP per second (0: unlimited).
    pub requests_per_ip: u32,
    /// Requests per authenticated node per second (0: unlimited).
    pub requests_per_node: u32,
    /// Most simultaneous connections.
    pub max_connections: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: Policy::default(),
            register_per_minute: 10,
            requests_per_ip: 200,
            requests_per_node: 50,
            max_connections: 200_000,
        }
    }
}

/// Why the registry could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store failed to load.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The commit thread could not start.
    #[error("starting the commit thread: {0}")]
    Thread(std::io::Error),
}

struct Job {
    mutations: Vec<Mutation>,
    done: oneshot::Sender<Result<(), String>>,
}

type Limiter<K> = DefaultKeyedRateLimiter<K>;

fn limiter<K: std::hash::Hash + Eq + Clone>(quota: Option<Quota>) -> Option<Limiter<K>> {
    quota.map(RateLimiter::keyed)
}

fn per_second(n: u32) -> Option<Quota> {
    NonZeroU32::new(n).map(|n| Quota::per_second(n).allow_burst(n.saturating_add(n.get())))
}

struct Inner {
    state: Mutex<State>,
    commits: std::sync::mpsc::Sender<Job>,
    watchers: Mutex<HashMap<u32, Vec<mpsc::Sender<Value>>>>,
    metrics: Metrics,
    started: Instant,
    config: Config,
    by_ip: Option<Limiter<IpAddr>>,
    by_node: Option<Limiter<u32>>,
    registrations: Option<Limiter<IpAddr>>,
    connections: std::sync::atomic::AtomicUsize,
    /// The last connection number handed out (0 stands for in-process requests).
    conn_ids: std::sync::atomic::AtomicU64,
    committer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    /// Closing the queue lets the committer finish what is queued and close the store; joining
    /// it means the store file is released when the last handle to the registry is gone.
    fn drop(&mut self) {
        let (closed, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.commits, closed));
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
    }
}

/// A running registry. Cheap to clone; every clone is the same registry.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// Per-connection session: the last nonce handed out, the node the connection proved to be,
/// and the connection's number (0 for in-process requests).
#[derive(Debug, Default)]
struct Session {
    nonce: Option<String>,
    node: Option<u32>,
    conn: u64,
}

/// Tells the state when a connection ends, however its task ends (closed, idle, aborted at
/// shutdown): a daemon instance that spoke on it is no longer live.
struct ConnectionEnd<'a> {
    reg: &'a Registry,
    conn: u64,
}

impl Drop for ConnectionEnd<'_> {
    fn drop(&mut self) {
        self.reg.state().connection_closed(self.conn);
    }
}

/// Counts a connection for as long as its task lives, including when it is aborted.
struct LiveConnection(Registry);

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.0
            .inner
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

enum Action {
    Reply(Value),
    Close(Value),
    Watch(u32),
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Registry {
    /// Loads `store` and starts the commit thread. Must be called inside a tokio runtime.
    pub fn open(mut store: Box<dyn Store>, config: Config) -> Result<Registry, StartError> {
        let snap = store.load()?;
        let started = Instant::now();
        let nodes = snap.nodes.len();
        let state = State::from_snapshot(snap, config.policy.clone(), 0);
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let metrics = Metrics::new();
        let m = metrics.clone();
        let committer = std::thread::Builder::new()
            .name("registry-commit".into())
            .spawn(move || committer(store, rx, m))
            .map_err(StartError::Thread)?;
        tracing::info!(nodes, "registry state loaded");
        let per_minute = NonZeroU32::new(config.register_per_minute).map(Quota::per_minute);
        let inner = Inner {
            state: Mutex::new(state),
            commits: tx,
            watchers: Mutex::new(HashMap::new()),
            metrics,
            started,
            by_ip: limiter(per_second(config.requests_per_ip)),
            by_node: limiter(per_second(config.requests_per_node)),
            registrations: limiter(per_minute),
            connections: Default::default(),
            conn_ids: Default::default(),
            committer: Some(committer),
            config,
        };
        let reg = Registry {
            inner: Arc::new(inner),
        };
        tokio::spawn(Registry::housekeeping(Arc::downgrade(&reg.inner)));
        Ok(reg)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in the rules; keep serving the state
        // as it is rather than failing every later request.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.inner.started.elapsed().as_millis() as u64
    }

    /// Whether `from` may learn `to`'s endpoint (the resolve rule). Answers from memory.
    pub fn may_reach(&self, from: u32, to: u32) -> bool {
        self.state().may_reach(from, to)
    }

    /// The key registered for an active node. Answers from memory.
    pub fn node_key(&self, node: u32) -> Option<[u8; 32]> {
        self.state().node_key(node)
    }

    /// The metrics, in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let counts = self.state().counts(self.now_ms());
        self.inner.metrics.render(
            counts,
            self.inner
                .connections
                .load(std::sync::atomic::Ordering::Relaxed),
            self.inner.started.elapsed().as_secs(),
        )
    }

    /// The dashboard's statistics (v1 `/api/stats`) but `request_rate`, which needs samples
    /// over time (see [`crate::http`]). Holds the state lock for one pass over the state.
    pub fn stats(&self, limits: Limits) -> Stats {
        let now = self.now_ms();
        let mut stats = self.state().dashboard(now, limits);
        stats.total_requests = self.inner.metrics.requests_total();
        stats.uptime_secs = self.inner.started.elapsed().as_secs();
        stats
    }

    /// Requests handled since start, every type.
    pub fn requests_total(&self) -> u64 {
        self.inner.metrics.requests_total()
    }

    /// Reaps silent nodes and trims limiter tables until the last handle to the registry is
    /// dropped (it holds only a weak reference, so it never keeps the store open).
    async fn housekeeping(inner: Weak<Inner>) {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        tick.tick().await;
        let mut n = 0u64;
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let reg = Registry { inner };
            reg.housekeep(n).await;
            n += 1;
        }
    }

    async fn housekeep(&self, n: u64) {
        let muts = self.with_state_commit(|st, now| st.reap(now));
        if let Some(rx) = muts {
            if let Ok(Err(e)) = rx.await {
                tracing::error!(error = %e, "committing reaped nodes failed");
            }
        }
        if n % 6 == 5 {
            for l in [&self.inner.by_ip, &self.inner.registrations]
                .into_iter()
                .flatten()
            {
                l.retain_recent();
            }
            if let Some(l) = &self.inner.by_node {
                l.retain_recent();
            }
            self.inner
                .watchers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, v| {
                    v.retain(|s| !s.is_closed());
                    !v.is_empty()
                });
        }
    }

    /// Runs `f` under the state lock and queues the mutations it returns, in apply order.
    fn with_state_commit(
        &self,
        f: impl FnOnce(&mut State, u64) -> Vec<Mutation>,
    ) -> Option<oneshot::Receiver<Result<(), String>>> {
        let now = self.now_ms();
        let mut st = self.state();
        let muts = f(&mut st, now);
        self.queue(muts)
    }

    /// Queues mutations for the committer; call with the state lock held.
    fn queue(&self, mutations: Vec<Mutation>) -> Option<oneshot::Receiver<Result<(), String>>> {
        if mutations.is_empty() {
            return None;
        }
        let (done, rx) = oneshot::channel();
        if self.inner.commits.send(Job { mutations, done }).is_err() {
            tracing::error!("commit thread is gone");
        }
        Some(rx)
    }

    async fn committed(rx: Option<oneshot::Receiver<Result<(), String>>>) -> Result<(), Reject> {
        let Some(rx) = rx else {
            return Ok(());
        };
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Reject::new(Code::Internal, format!("store: {e}"))),
            Err(_) => Err(Reject::new(Code::Internal, "store is gone")),
        }
    }

    /// Serves connections from `listener` until `shutdown` completes; then every connection
    /// of this listener is closed (a request already handed to the store still commits).
    pub async fn serve(
        self,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut errors = 0u32;
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (sock, peer) = tokio::select! {
                _ = &mut shutdown => {
                    conns.shutdown().await;
                    return;
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                r = listener.accept() => match r {
                    Ok(x) => { errors = 0; x }
                    Err(e) => {
                        // Out of descriptors and similar: back off instead of spinning.
                        errors = errors.saturating_add(1);
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(errors.min(20)))).await;
                        continue;
                    }
                },
            };
            let live = self
                .inner
                .connections
                .load(std::sync::atomic::Ordering::Relaxed);
            if live >= self.inner.config.max_connections {
                self.inner.metrics.dropped("connection_limit");
                continue;
            }
            let _ = sock.set_nodelay(true);
            let reg = self.clone();
            let tls = tls.clone();
            reg.inner
                .connections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let live = LiveConnection(reg);
            conns.spawn(async move {
                let reg = &live.0;
                match tls {
                    None => reg.connection(sock, peer).await,
                    Some(acc) => {
                        match tokio::time::timeout(Duration::from_secs(10), acc.accept(sock)).await
                        {
                            Ok(Ok(s)) => reg.connection(s, peer).await,
                            _ => reg.inner.metrics.dropped("tls_handshake"),
                        }
                    }
                }
            });
        }
    }

    async fn connection<S: AsyncRead + AsyncWrite + Unpin>(&self, mut s: S, peer: SocketAddr) {
        let mut dec = FrameDecoder::new();
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::new();
        let conn = self
            .inner
            .conn_ids
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let _end = ConnectionEnd { reg: self, conn };
        let mut session = Session {
            conn,
            ..Session::default()
        };
        loop {
            let frame = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => {
                    match tokio::time::timeout(IDLE_TIMEOUT, s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                        Ok(Ok(n)) => dec.push(&buf[..n]),
                    }
                    continue;
                }
                Err(e) => {
                    self.inner.metrics.dropped("oversized_frame");
                    let body = Reject::new(Code::BadRequest, e.to_string()).to_json();
                    let _ = write_frame(&mut s, &body, &mut out).await;
                    return;
                }
            };
            match self.handle(&frame, &mut session, peer).await {
                Action::Reply(v) => {
                    if write_frame(&mut s, &v, &mut out).await.is_err() {
                        return;
                    }
                }
                Action::Close(v) => {
                    let _ = write_frame(&mut s, &v, &mut out).await;
                    return;
                }
                Action::Watch(node) => {
                    self.watch(s, node, &mut out).await;
                    return;
                }
            }
        }
    }

    async fn watch<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut s: S,
        node: u32,
        out: &mut Vec<u8>,
    ) {
        let (tx, mut rx) = mpsc::channel(WATCH_QUEUE);
        self.inner
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node)
            .or_default()
            .push(tx);
        if write_frame(&mut s, &json!({"type": "watch_ok", "node_id": node}), out)
            .await
            .is_err()
        {
            return;
        }
        let mut sink = [0u8; 256];
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(v) => if write_frame(&mut s, &v, out).await.is_err() { return },
                    None => return,
                },
                // A watching connection sends nothing more; reading notices when it closes.
                r = s.read(&mut sink) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
            }
        }
    }

    /// Handles one request frame on behalf of `peer`, returning the reply body. In-process
    /// callers (tests, an embedding daemon) use this without a socket.
    pub async fn request(&self, frame: &[u8], peer: SocketAddr) -> Value {
        let mut session = Session::default();
        match self.handle(frame, &mut session, peer).await {
            Action::Reply(v) | Action::Close(v) => v,
            Action::Watch(_) => Reject::new(Code::BadRequest, "watch needs a connection").to_json(),
        }
    }

    async fn handle(&self, frame: &[u8], session: &mut Session, peer: SocketAddr) -> Action {
        let started = Instant::now();
        let req: Request = match serde_json::from_slice(frame) {
            Ok(r) => r,
            Err(e) => {
                self.inner.metrics.request("malformed", false, started);
                return Action::Reply(
                    Reject::new(Code::BadRequest, format!("malformed request: {e}")).to_json(),
                );
            }
        };
        let kind = req.kind();
        let result = self.handle_request(req, session, peer).await;
        self.inner.metrics.request(kind, result.is_ok(), started);
        match result {
            Ok(Some(v)) => Action::Reply(v),
            Ok(None) => match session.node {
                Some(n) => Action::Watch(n),
                None => Action::Reply(Reject::new(Code::Internal, "no session").to_json()),
            },
            Err(r) => {
                if r.code == Code::Unauthorized || r.code == Code::Throttled {
                    tracing::debug!(%peer, kind, code = r.code.as_str(), reason = %r.message, "request refused");
                }
                if r.code == Code::DuplicateInstance {
                    tracing::warn!(%peer, kind, code = r.code.as_str(), reason = %r.message, "second live daemon for one node refused");
                }
                if matches!(r.code, Code::Unsupported) && kind == "subscribe_replication" {
                    Action::Close(r.to_json())
                } else {
                    Action::Reply(r.to_json())
                }
            }
        }
    }

    /// `Ok(None)` means: turn the connection into a watch stream.
    async fn handle_request(
        &self,
        req: Request,
        session: &mut Session,
        peer: SocketAddr,
    ) -> Result<Option<Value>, Reject> {
        if let Some(l) = &self.inner.by_ip {
            if l.check_key(&peer.ip().to_canonical()).is_err() {
                return Err(self.throttled("too many requests from this address"));
            }
        }
        match req {
            Request::Hello {} => {
                let mut n = [0u8; 32];
                OsRng.fill_bytes(&mut n);
                let nonce = b64(&n);
                session.nonce = Some(nonce.clone());
                return Ok(Some(json!({
                    "type": "hello_ok",
                    "nonce": nonce,
                    "features": [
                        "session_auth", "register_proof", "watch", "networks", "reachable",
                        "instance",
                    ],
                })));
            }
            Request::Auth { node_id, signature } => {
                let Some(nonce) = session.nonce.take() else {
                    return Err(Reject::new(Code::Unauthorized, "send hello first"));
                };
                let key = self.state().signing_key(node_id).map(|(k, _)| k);
                let Some(key) = key else {
                    return Err(Reject::new(
                        Code::NotFound,
                        format!("node {node_id} is unknown"),
                    ));
                };
                verify(
                    &key,
                    session_message(&nonce, node_id).as_bytes(),
                    &signature,
                )
                .map_err(|e| Reject::new(Code::Unauthorized, format!("session signature: {e}")))?;
                session.node = Some(node_id);
                let rx = {
                    let mut st = self.state();
                    let m = st.mark_session_auth(node_id);
                    self.queue(m.into_iter().collect())
                };
                Self::committed(rx).await?;
                return Ok(Some(json!({"type": "auth_ok", "node_id": node_id})));
            }
            Request::Watch {} => {
                return match session.node {
                    Some(_) => Ok(None),
                    None => Err(Reject::new(
                        Code::Unauthorized,
                        "authenticate the session first",
                    )),
                };
            }
            _ => {}
        }
        let now_ms = self.now_ms();
        let authed = self.authenticate(&req, session)?;
        if let (Some(node), Some(l)) = (authed, &self.inner.by_node) {
            if l.check_key(&node).is_err() {
                return Err(self.throttled("too many requests from this node"));
            }
        }
        let mut register_proven = false;
        if let Request::Register {
            public_key, proof, ..
        } = &req
        {
            let key =
                decode_key(public_key).map_err(|e| Reject::new(Code::BadRequest, e.to_string()))?;
            if let Some(proof) = proof {
                let Some(nonce) = session.nonce.take() else {
                    return Err(Reject::new(
                        Code::Unauthorized,
                        "a registration proof needs hello first",
                    ));
                };
                verify(&key, register_message(&nonce, public_key).as_bytes(), proof).map_err(
                    |e| Reject::new(Code::Unauthorized, format!("registration proof: {e}")),
                )?;
                register_proven = true;
            }
            let known = self.state().knows_key(&key);
            if !known {
                if let Some(l) = &self.inner.registrations {
                    if l.check_key(&peer.ip().to_canonical()).is_err() {
                        return Err(self.throttled("too many registrations from this address"));
                    }
                }
            }
        }
        let ctx = Ctx {
            peer,
            authed,
            register_proven,
            now_ms,
            unix: unix_now(),
            conn: session.conn,
        };
        let (outcome, rx) = {
            let mut st = self.state();
            let mut outcome = st.handle(req, &ctx);
            let rx = self.queue(std::mem::take(&mut outcome.mutations));
            (outcome, rx)
        };
        let reply = outcome
            .reply
            .unwrap_or_else(|| Err(Reject::new(Code::Internal, "no reply")));
        if reply.is_ok() {
            Self::committed(rx).await?;
        } else if let Some(rx) = rx {
            // A refusal changes nothing, but wait for anything it queued to stay in order.
            let _ = rx.await;
        }
        // Pushes go out even with a refusal: a refused rival instance is reported to the live
        // one.
        if !outcome.pushes.is_empty() {
            let watchers = self
                .inner
                .watchers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (node, ev) in outcome.pushes {
                for w in watchers.get(&node).into_iter().flatten() {
                    if w.try_send(ev.clone()).is_err() {
                        self.inner.metrics.dropped("push_queue_full");
                    }
                }
            }
        }
        let v = reply?;
        if let Some(node) = outcome.bind_session {
            session.node = Some(node);
        }
        Ok(Some(v))
    }

    fn throttled(&self, why: &str) -> Reject {
        self.inner.metrics.dropped("throttled");
        Reject::new(Code::Throttled, why)
    }

    /// The node this request is proven to come from: its session's node, or a valid v1
    /// fixed-string signature from a node that has never authenticated a session.
    fn authenticate(&self, req: &Request, session: &Session) -> Result<Option<u32>, Reject> {
        let Some(signer) = req.signer() else {
            return Ok(None);
        };
        if session.node == Some(signer) {
            return Ok(Some(signer));
        }
        let (Some(challenge), Some(sig)) = (req.challenge(), req.signature()) else {
            return Ok(None);
        };
        let Some((key, session_auth)) = self.state().signing_key(signer) else {
            return Err(Reject::new(
                Code::NotFound,
                format!("node {signer} is unknown"),
            ));
        };
        if session_auth {
            return Err(Reject::new(
                Code::Unauthorized,
                format!(
                    "node {signer} authenticates sessions; fixed-string signatures are refused"
                ),
            ));
        }
        if sig.is_empty() {
            return Ok(None);
        }
        verify(&key, challenge.as_bytes(), sig)
            .map_err(|e| Reject::new(Code::Unauthorized, format!("signature: {e}")))?;
        Ok(Some(signer))
    }
}

async fn write_frame<S: AsyncWrite + Unpin>(
    s: &mut S,
    v: &Value,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    out.clear();
    let body = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    encode_frame(&body, out).map_err(std::io::Error::other)?;
    s.write_all(out).await?;
    s.flush().await
}

fn committer(mut store: Box<dyn Store>, rx: std::sync::mpsc::Receiver<Job>, metrics: Metrics) {
    let mut batch = Vec::new();
    let mut jobs = Vec::new();
    while let Ok(first) = rx.recv() {
        jobs.push(first);
        while batch.len() + jobs.iter().map(|j| j.mutations.len()).sum::<usize>() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        for j in &mut jobs {
            batch.append(&mut j.mutations);
        }
        let t = Instant::now();
        let r = store.commit(&batch).map_err(|e| e.to_string());
        metrics.commit(batch.len(), jobs.len(), t.elapsed());
        if let Err(e) = &r {
            tracing::error!(error = %e, mutations = batch.len(), "store commit failed");
        }
        for j in jobs.drain(..) {
            let _ = j.done.send(r.clone());
        }
        batch.clear();
    }
}

/// Loads PEM certificate chain and key into a TLS acceptor.
pub fn tls_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<tokio_rustls::TlsAcceptor, String> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("certificate PEM holds no certificate".into());
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("key PEM: {e}"))?
        .ok_or("key PEM holds no private key")?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("certificate and key: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// A self-signed certificate for localhost (PEM cert, PEM key, SHA-256 fingerprint of the DER
/// certificate in lowercase hex: what daemons pin).
pub fn self_signed() -> Result<(String, String, String), String> {
    let ck = rcgen::generate_simple_self_signed(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])
    .map_err(|e| e.to_string())?;
    let fp = fingerprint(ck.cert.der());
    Ok((ck.cert.pem(), ck.signing_key.serialize_pem(), fp))
}

/// Lowercase hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

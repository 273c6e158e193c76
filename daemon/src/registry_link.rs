//! The daemon's link to the registry: registers with a proof of its key (so the session is
//! authenticated and no replayable fixed-string signature is ever sent), heartbeats, keeps a
//! second connection watching for pushed handshake events, answers key and endpoint lookups
//! for the engine, and reconnects with backoff. It runs as its own task: nothing here is ever
//! awaited on the packet path; the engine sends commands and receives events.
//!
//! # A v1 registry
//!
//! Every session starts with [`Client::negotiate`]. A registry that refuses `hello` in v1's
//! form is a v1 registry ([`RegistryProtocol::V1`]): the link then registers in v1's form,
//! signs every request that v1 signs with its fixed string (wire §4.3), runs no watching
//! connection (handshakes arrive through the trust service's polling), and says so once in
//! the log and in Info (`registry_protocol`). Each reconnection negotiates again, so a
//! registry upgraded in place is used with the session extensions at once.
//!
//! A request answered on a channel ([`LinkCmd::Call`], [`LinkCmd::Rotate`],
//! [`LinkCmd::Register`]) fails with a [`LinkError`]; [`LinkError::code`] is the one place
//! those failures become IPC error codes.
//!
//! # Desired state
//!
//! After every registration (the first, a re-registration after a lost session or a registry
//! restart, an explicit [`LinkCmd::Register`]) the link applies the node's desired state
//! ([`crate::desired`]): hostname (sent with the registration), visibility, tags, task
//! advert and network memberships. Each request of that kind the registry accepts on the
//! session is recorded in it. A `deregister` request the registry accepts ends the session;
//! the link then stays unregistered, answering requests from its cache, until
//! [`LinkCmd::Register`] (or the next start of the daemon).
//!
//! # One daemon per node
//!
//! Each link picks a random instance ID when the daemon starts ([`new_instance`]) and, toward
//! `pilot-registry`, sends it with `register`, `heartbeat` and `deregister` (never toward a v1
//! registry). While one daemon serves the node, the registry refuses another daemon with the
//! same identity (a copied home directory) with `duplicate_instance`: the refused link logs
//! the registry's explanation as an error, reports it in Info (`registry.conflict`), never
//! takes the node over, and tries again every [`RIVAL_RETRY`], so it takes the node once the
//! other daemon has stopped. The serving link learns of each refused rival (pushed on its
//! watching connection and in its next heartbeat reply), logs it as an error and reports it
//! in Info until no rival has been refused for [`RIVAL_QUIET`].
//!
//! # Several registries
//!
//! [`LinkConfig::registry`] lists one or more addresses of the same registry (instances on one
//! database, or a standby on the same store), first preferred. A connect that fails, a
//! session that is lost, and a certificate that is not the pinned one move the link to the
//! next address ([`Rotation`]); once every address has failed in a row it backs off
//! exponentially up to [`BACKOFF`]'s cap, with random jitter. A registry that answers and
//! refuses (a heartbeat for a reaped node, say) is asked again at the same address. The link
//! stays on an address while it works, and reports the address in use in Info
//! ([`LinkEvent::Registered`]). Moving is a new session: the link proves its key and
//! registers again, and the node keeps its address, and the desired state is applied again,
//! as after any reconnection.
//!
//! The session notices a registry that went away at once: the watching connection's end
//! makes the session send a heartbeat now, and a heartbeat on a connection that is closed or
//! broken ends the session (a heartbeat that only times out ends it on the third in a row).
//!
//! # Registry outages
//!
//! The link remembers what the registry told it about other nodes ([`PeerCache`]). While the
//! registry cannot be asked (between sessions, or when a session breaks under a request),
//! key and endpoint lookups and `lookup`, `resolve` and `resolve_hostname` requests are
//! answered from it, marked `"stale": true`; a node or name never seen fails with
//! [`LinkError::Unknown`], which names the outage.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use pilot_registry_client::{
    jitter_sample, sign_request_v1, sign_v1, Backoff, Client, ClientError, RegistryAddrs,
    RegistryProtocol, RegistryStream, Rotation, Transport,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tunnel::ipc::code;
use tunnel::registry::auth::{b64, decode_key};

use crate::desired::{Desired, DesiredState};
use crate::identity::{NodeIdentity, RotateError};
use crate::peer_cache::PeerCache;

/// Backoff between reconnection attempts: after each round of failures (every address
/// failed), doubles from `base` to `cap`, each wait jittered down by up to half.
pub const BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(250),
    cap: Duration::from_secs(10),
};
/// How long one registry request may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait before registering again after the registry refused this daemon because another one
/// with the same identity serves the node.
pub const RIVAL_RETRY: Duration = Duration::from_secs(30);
/// A refused rival stays in Info this long after the last report of it (a few of its
/// retries).
pub const RIVAL_QUIET: Duration = Duration::from_secs(90);

/// A fresh random instance ID for this daemon process: 16 hex digits.
pub fn new_instance() -> String {
    use rand_core::RngCore;
    format!("{:016x}", rand_core::OsRng.next_u64())
}

/// Why a registry request made through the link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The link is between sessions (reconnecting with backoff).
    #[error("registry unreachable")]
    Unreachable,
    /// The registry cannot be asked and the node has never learned what was asked for.
    #[error("registry unreachable, and {0} is not among the nodes this node has seen")]
    Unknown(String),
    /// The node was deregistered on request; nothing is sent until it registers again.
    #[error("this node is deregistered; `pilotctl register` registers it again")]
    Deregistered,
    /// The link task has ended or dropped the request.
    #[error("registry link stopped")]
    Stopped,
    /// The link did not take the request in time (its queue is full).
    #[error("registry link busy")]
    Busy,
    /// No answer in time.
    #[error("registry request timed out")]
    Timeout,
    /// The registry answered with an error.
    #[error("{message}")]
    Refused {
        /// The registry's stable code (`not_found`, `conflict`, ...; `request_failed` from a
        /// v1 registry, which sends no code).
        code: String,
        /// The registry's reason.
        message: String,
    },
    /// The registry's answer lacks a field the request needs, or the field is malformed.
    #[error("registry reply: {0}")]
    BadReply(String),
    /// The session broke while the request was outstanding.
    #[error("{0}")]
    Connection(String),
    /// A key rotation was sent but the session broke before the registry answered.
    #[error(
        "the registry connection broke before it answered ({0}); the key in use is settled \
         with the registry when the daemon reconnects"
    )]
    RotationUnsettled(String),
    /// A key rotation's file step failed before the registry was asked.
    #[error(transparent)]
    Rotate(#[from] RotateError),
}

impl LinkError {
    /// The registry's code for a refusal that means the node, name or network does not
    /// exist.
    pub const REGISTRY_NOT_FOUND: &'static str = "not_found";
    /// The registry's code for a name taken, a request already pending, a key in use.
    pub const REGISTRY_CONFLICT: &'static str = "conflict";

    /// The stable IPC error code ([`tunnel::ipc::code`]) of this failure.
    pub fn code(&self) -> &'static str {
        match self {
            LinkError::Unreachable
            | LinkError::Unknown(_)
            | LinkError::Deregistered
            | LinkError::Stopped
            | LinkError::Busy
            | LinkError::Connection(_)
            | LinkError::RotationUnsettled(_) => code::UNAVAILABLE,
            LinkError::Timeout => code::TIMEOUT,
            LinkError::Refused { code: c, .. } if c == Self::REGISTRY_NOT_FOUND => code::NOT_FOUND,
            LinkError::Refused { .. } => code::REFUSED,
            LinkError::Rotate(RotateError::NoFile | RotateError::InProgress) => code::REFUSED,
            LinkError::BadReply(_)
            | LinkError::Rotate(RotateError::Task(_) | RotateError::File { .. }) => code::INTERNAL,
        }
    }

    /// Whether the registry refused because the request conflicts with its state (for a
    /// handshake request: one is already pending).
    pub fn is_conflict(&self) -> bool {
        matches!(self, LinkError::Refused { code, .. } if code == Self::REGISTRY_CONFLICT)
    }

    /// Whether this is a refusal in a v1 registry's form: no code, and always the same
    /// words (`request failed`), whatever the cause (wire §4.2).
    pub fn is_v1_refusal(&self) -> bool {
        matches!(self, LinkError::Refused { code, .. } if code == ClientError::V1_CODE)
    }

    /// A failed call on the session.
    fn from_client(e: &ClientError) -> LinkError {
        match e {
            ClientError::Refused { code, message } => LinkError::Refused {
                code: code.clone(),
                message: message.clone(),
            },
            ClientError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => LinkError::Timeout,
            e => LinkError::Connection(e.to_string()),
        }
    }
}

/// What a [`LinkCmd::Call`] or [`LinkCmd::Rotate`] is answered with.
pub type LinkReply = Result<Value, LinkError>;

/// Sends the link a request and waits at most `limit` for its answer.
pub async fn request(
    link: &mpsc::Sender<LinkCmd>,
    cmd: impl FnOnce(oneshot::Sender<LinkReply>) -> LinkCmd,
    limit: Duration,
) -> LinkReply {
    let (tx, rx) = oneshot::channel();
    link.send(cmd(tx)).await.map_err(|_| LinkError::Stopped)?;
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(LinkError::Stopped),
        Err(_) => Err(LinkError::Timeout),
    }
}

/// What the link needs to know.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Registry addresses, first preferred.
    pub registry: RegistryAddrs,
    /// Plain TCP or TLS pinned to the registry's certificate.
    pub transport: Transport,
    /// Identity key (replaced by a rotation).
    pub identity: Arc<NodeIdentity>,
    /// The UDP port to register (the registry keeps our TCP source IP).
    pub listen_port: u16,
    /// Owner string.
    pub owner: Option<String>,
    /// What the registry should hold for the node; applied after every registration.
    pub desired: Desired,
    /// Heartbeat interval.
    pub keepalive: Duration,
    /// This daemon process's instance ID ([`new_instance`]).
    pub instance: String,
}

/// A request from the engine or the IPC server.
#[derive(Debug)]
pub enum LinkCmd {
    /// The registered key of a node.
    Lookup(u32),
    /// A node's endpoint (subject to the registry's resolve rule).
    Resolve(u32),
    /// Any request, answered on the channel. The link fills `node_id` fields signed by this
    /// node's session.
    Call(Value, oneshot::Sender<LinkReply>),
    /// Replace the node's identity key (see [`crate::identity`]); answered with the
    /// registry's `rotate_key_ok`.
    Rotate(oneshot::Sender<LinkReply>),
    /// Register now (again) and apply the desired state; answered with the registry's
    /// `register_ok`. Ends a deregistration and cuts a reconnection backoff short.
    Register(oneshot::Sender<LinkReply>),
}

/// What the link reports.
#[derive(Debug)]
pub enum LinkEvent {
    /// Registered (again): our node ID and the registry's reply.
    Registered {
        /// Our node ID.
        node: u32,
        /// The `register_ok` reply.
        reply: Value,
        /// The protocol the registry speaks.
        protocol: RegistryProtocol,
        /// The registry address of the session.
        registry: String,
    },
    /// A heartbeat succeeded (time to refresh the beacon mapping).
    Heartbeat,
    /// The registered key of a node, or `None` if it is unknown.
    Key(u32, Option<[u8; 32]>),
    /// A node's endpoint, or why it cannot be had.
    Endpoint(u32, Result<SocketAddr, LinkError>),
    /// The registry connection broke; reconnecting.
    Disconnected(String),
    /// The node's identity key was replaced: tunnels are re-keyed under the new one.
    Rotated(Arc<SigningKey>),
    /// Another daemon with this node's identity: the registry's explanation (this daemon
    /// was refused, or a rival was refused while this one serves the node), or `None` once
    /// that is over.
    Conflict(Option<String>),
}

/// Why the link has no session, for the requests it answers meanwhile.
#[derive(Debug, Clone, Copy)]
enum Down {
    /// Reconnecting with backoff.
    Unreachable,
    /// Deregistered on request; waiting for [`LinkCmd::Register`].
    Deregistered,
}

impl Down {
    fn error(self) -> LinkError {
        match self {
            Down::Unreachable => LinkError::Unreachable,
            Down::Deregistered => LinkError::Deregistered,
        }
    }
}

/// How a session ended without a connection error.
#[derive(Debug)]
enum End {
    /// The command channel closed: the daemon is stopping.
    Stopped,
    /// The registry accepted a `deregister`.
    Deregistered,
}

/// [`LinkCmd::Register`] requests waiting for the next registration.
type Waiters = Vec<oneshot::Sender<LinkReply>>;

/// Runs the link until `cmds` closes. Pushed handshake events (`handshake_request`,
/// `handshake_response`) go to `pushes`.
pub async fn run(
    config: LinkConfig,
    mut cmds: mpsc::Receiver<LinkCmd>,
    events: mpsc::Sender<LinkEvent>,
    pushes: mpsc::Sender<Value>,
) {
    let mut cache = PeerCache::new();
    let mut waiters = Waiters::new();
    let mut seen = Seen::default();
    let mut rotation = Rotation::new(config.registry.len(), BACKOFF);
    loop {
        let addr = config.registry.get(rotation.current()).to_owned();
        let outcome = session(
            &config,
            &addr,
            &mut rotation,
            &mut cmds,
            &events,
            &pushes,
            &mut cache,
            &mut waiters,
            &mut seen,
        )
        .await;
        let backoff = match outcome {
            Ok(End::Stopped) => return,
            Ok(End::Deregistered) => {
                tracing::info!("deregistered; registering again on a register request");
                if events
                    .send(LinkEvent::Disconnected("deregistered".into()))
                    .await
                    .is_err()
                {
                    return;
                }
                loop {
                    match cmds.recv().await {
                        None => return,
                        Some(LinkCmd::Register(r)) => {
                            waiters.push(r);
                            break;
                        }
                        Some(c) => fail(c, Down::Deregistered, &cache, &events).await,
                    }
                }
                continue;
            }
            Err(e) if e.is_duplicate_instance() => {
                if seen.refused.is_none() {
                    tracing::error!(registry = %addr, instance = %config.instance, error = %e, "registration refused: another daemon with this identity serves the node; retrying every {}s", RIVAL_RETRY.as_secs());
                } else {
                    tracing::debug!(error = %e, "registration still refused");
                }
                seen.refused = Some(e.to_string());
                for w in waiters.drain(..) {
                    let _ = w.send(Err(LinkError::from_client(&e)));
                }
                let told = events
                    .send(LinkEvent::Conflict(Some(e.to_string())))
                    .await
                    .and(events.send(LinkEvent::Disconnected(e.to_string())).await);
                if told.is_err() {
                    return;
                }
                RIVAL_RETRY
            }
            Err(e) => {
                let wait = if refused(&e) {
                    rotation.handle_refusal(jitter_sample())
                } else {
                    rotation.handle_failure(jitter_sample())
                };
                let next = config.registry.get(rotation.current());
                let retry_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                if matches!(e, ClientError::FingerprintMismatch { .. }) {
                    tracing::error!(registry = %addr, next, retry_ms, error = %e, "registry refused: certificate not pinned; trying again");
                } else {
                    tracing::warn!(registry = %addr, next, retry_ms, error = %e, "registry link down; reconnecting");
                }
                for w in waiters.drain(..) {
                    let _ = w.send(Err(LinkError::Connection(e.to_string())));
                }
                if events
                    .send(LinkEvent::Disconnected(e.to_string()))
                    .await
                    .is_err()
                {
                    return;
                }
                wait
            }
        };
        // Commands that arrive while down are answered at once (from the cache where it
        // can) rather than left waiting; a register request ends the wait.
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                c = cmds.recv() => match c {
                    None => return,
                    Some(LinkCmd::Register(r)) => {
                        waiters.push(r);
                        break;
                    }
                    Some(c) => fail(c, Down::Unreachable, &cache, &events).await,
                },
            }
        }
    }
}

/// What the link has reported, across sessions.
#[derive(Debug, Default)]
struct Seen {
    /// The protocol the registry spoke at the last negotiation.
    protocol: Option<RegistryProtocol>,
    /// Why the last registration was refused, while another daemon serves the node.
    refused: Option<String>,
    /// The last rival refused while this daemon serves the node: its instance and when it
    /// was reported.
    rival: Option<(String, tokio::time::Instant)>,
}

impl Seen {
    /// A `duplicate_instance` report from the registry (pushed, or in a heartbeat reply):
    /// logged as an error once per rival, and shown in Info.
    async fn rival(&mut self, notice: &Value, events: &mpsc::Sender<LinkEvent>) {
        let instance = notice
            .get("instance")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let message = notice
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("another daemon with this node's identity tried to register")
            .to_owned();
        if self.rival.as_ref().map(|(i, _)| i) != Some(&instance) {
            let endpoint = notice
                .get("endpoint")
                .and_then(Value::as_str)
                .unwrap_or_default();
            tracing::error!(rival = %instance, endpoint, "{message}");
        }
        self.rival = Some((instance, tokio::time::Instant::now()));
        let _ = events.send(LinkEvent::Conflict(Some(message))).await;
    }

    /// Clears a rival not reported for [`RIVAL_QUIET`].
    async fn expire(&mut self, events: &mpsc::Sender<LinkEvent>) {
        if self
            .rival
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() >= RIVAL_QUIET)
        {
            tracing::info!(
                "no other daemon with this node's identity has tried to register lately"
            );
            self.rival = None;
            let _ = events.send(LinkEvent::Conflict(None)).await;
        }
    }
}

/// Answers a command the registry cannot be asked: from the cache where it can, else with
/// why not.
async fn fail(cmd: LinkCmd, down: Down, cache: &PeerCache, events: &mpsc::Sender<LinkEvent>) {
    match cmd {
        LinkCmd::Lookup(n) => {
            let key = cache.get(n).and_then(|e| e.key);
            let _ = events.send(LinkEvent::Key(n, key)).await;
        }
        LinkCmd::Resolve(n) => {
            let ep = cache
                .get(n)
                .and_then(|e| e.endpoint)
                .ok_or_else(|| down.error());
            let _ = events.send(LinkEvent::Endpoint(n, ep)).await;
        }
        LinkCmd::Call(req, reply) => {
            let _ = reply.send(from_cache(&req, down, cache));
        }
        LinkCmd::Rotate(reply) | LinkCmd::Register(reply) => {
            let _ = reply.send(Err(down.error()));
        }
    }
}

/// The cache's answer to `req`, or why there is none.
fn from_cache(req: &Value, down: Down, cache: &PeerCache) -> LinkReply {
    if let Some(v) = cache.answer(req) {
        return Ok(v);
    }
    match (down, PeerCache::subject(req)) {
        (Down::Unreachable, Some(what)) => Err(LinkError::Unknown(what)),
        _ => Err(down.error()),
    }
}

/// One registry connection and the protocol it speaks.
struct Session {
    client: Client<RegistryStream>,
    protocol: RegistryProtocol,
    identity: Arc<NodeIdentity>,
    /// This daemon's instance ID, sent with heartbeats and deregistration toward
    /// `pilot-registry`.
    instance: String,
}

/// Sends `v` on the session; toward a v1 registry with the fixed-string signature v1 checks
/// (by the identity key in use when it is sent).
async fn call(s: &mut Session, v: &Value) -> Result<Value, ClientError> {
    let signed;
    let v = match s.protocol {
        RegistryProtocol::Pilot if matches!(kind(v), "heartbeat" | "deregister") => {
            let mut req = v.clone();
            if let Some(o) = req.as_object_mut() {
                o.insert("instance".into(), json!(s.instance));
            }
            signed = req;
            &signed
        }
        RegistryProtocol::Pilot => v,
        RegistryProtocol::V1 => {
            let mut req = v.clone();
            sign_request_v1(&s.identity.key(), &mut req);
            signed = req;
            &signed
        }
    };
    match tokio::time::timeout(CALL_TIMEOUT, s.client.call(v)).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "registry request timed out",
        ))),
    }
}

/// Logs the protocol the registry speaks when it is not the one spoken before (once per
/// change, not per reconnection).
fn report_protocol(addr: &str, spoken: &mut Option<RegistryProtocol>, now: RegistryProtocol) {
    if *spoken == Some(now) {
        return;
    }
    match now {
        RegistryProtocol::V1 => tracing::warn!(
            registry = addr,
            protocol = %now,
            "the registry refused the session extensions (a v1 registry): using v1's forms \
             with fixed-string signatures, which anyone who sees them can replay; handshake \
             requests arrive by polling"
        ),
        RegistryProtocol::Pilot if spoken.is_some() => tracing::info!(
            registry = addr,
            protocol = %now,
            "the registry speaks the session extensions again"
        ),
        RegistryProtocol::Pilot => {}
    }
    *spoken = Some(now);
}

/// Whether `e` is a request that got no answer in time (the connection may still work).
fn timed_out_error(e: &ClientError) -> bool {
    matches!(e, ClientError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

fn refused(e: &ClientError) -> bool {
    matches!(e, ClientError::Refused { .. })
}

fn kind(req: &Value) -> &str {
    req.get("type").and_then(Value::as_str).unwrap_or_default()
}

/// One connected session; returns `Ok` when the command channel closed or the node was
/// deregistered.
#[allow(clippy::too_many_arguments)]
async fn session(
    config: &LinkConfig,
    addr: &str,
    rotation: &mut Rotation,
    cmds: &mut mpsc::Receiver<LinkCmd>,
    events: &mpsc::Sender<LinkEvent>,
    pushes: &mpsc::Sender<Value>,
    cache: &mut PeerCache,
    waiters: &mut Waiters,
    seen: &mut Seen,
) -> Result<End, ClientError> {
    let timed_out = |what: &str| {
        ClientError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} timed out"),
        ))
    };
    let mut client =
        tokio::time::timeout(CALL_TIMEOUT, Client::connect_with(addr, &config.transport))
            .await
            .map_err(|_| timed_out("connect"))??;
    let protocol = tokio::time::timeout(CALL_TIMEOUT, client.negotiate())
        .await
        .map_err(|_| timed_out("hello"))??;
    report_protocol(addr, &mut seen.protocol, protocol);
    let mut c = Session {
        client,
        protocol,
        identity: config.identity.clone(),
        instance: config.instance.clone(),
    };
    settle_rotation(&mut c, config, events).await?;
    let (node, reply) = register(&mut c, config).await?;
    rotation.handle_success();
    tracing::info!(registry = addr, node, "registry session established");
    if seen.refused.take().is_some() {
        tracing::info!(
            "the other daemon with this identity is gone; this daemon serves the node now"
        );
        let _ = events.send(LinkEvent::Conflict(None)).await;
    }
    for w in waiters.drain(..) {
        let _ = w.send(Ok(reply.clone()));
    }
    if events
        .send(LinkEvent::Registered {
            node,
            reply,
            protocol,
            registry: addr.to_owned(),
        })
        .await
        .is_err()
    {
        return Ok(End::Stopped);
    }
    // A v1 registry pushes nothing: the trust service's polling delivers handshakes.
    let (rivals_tx, mut rivals) = mpsc::channel(8);
    let (lost_tx, mut lost) = mpsc::channel(1);
    let _guard = (protocol == RegistryProtocol::Pilot).then(|| {
        AbortOnDrop(tokio::spawn(watch(
            config.clone(),
            addr.to_owned(),
            node,
            pushes.clone(),
            rivals_tx,
            lost_tx,
        )))
    });
    let mut tick = tokio::time::interval(config.keepalive);
    tick.tick().await;
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match call(&mut c, &json!({"type": "heartbeat", "node_id": node})).await {
                    Ok(v) => {
                        failures = 0;
                        if let Some(notice) = v.get("duplicate_instance") {
                            seen.rival(notice, events).await;
                        }
                        seen.expire(events).await;
                        let _ = events.send(LinkEvent::Heartbeat).await;
                    }
                    Err(e) if refused(&e) => {
                        // Reaped or unknown: register again on a fresh session.
                        return Err(e);
                    }
                    Err(e) if !timed_out_error(&e) => {
                        // The connection is closed or broken: no later heartbeat can pass.
                        return Err(e);
                    }
                    Err(e) => {
                        failures += 1;
                        if failures >= 3 {
                            return Err(e);
                        }
                    }
                }
            }
            Some(notice) = rivals.recv() => seen.rival(&notice, events).await,
            // The watching connection ended: ask whether the registry is still there now
            // rather than at the next tick.
            Some(()) = lost.recv() => tick.reset_immediately(),
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return Ok(End::Stopped) };
                match cmd {
                    LinkCmd::Lookup(n) => {
                        let req = json!({"type": "lookup", "node_id": n});
                        let key = match call(&mut c, &req).await {
                            Ok(v) => {
                                cache.learn(&req, &v);
                                v.get("public_key").and_then(Value::as_str).and_then(|k| decode_key(k).ok())
                            }
                            Err(e) if refused(&e) => None,
                            Err(e) => {
                                fail(LinkCmd::Lookup(n), Down::Unreachable, cache, events).await;
                                return Err(e);
                            }
                        };
                        let _ = events.send(LinkEvent::Key(n, key)).await;
                    }
                    LinkCmd::Resolve(n) => {
                        let req = json!({"type": "resolve", "node_id": n, "requester_id": node});
                        let ep = match call(&mut c, &req).await {
                            Ok(v) => {
                                cache.learn(&req, &v);
                                v.get("real_addr").and_then(Value::as_str).and_then(|a| a.parse::<SocketAddr>().ok()).ok_or_else(|| LinkError::BadReply("no endpoint".into()))
                            }
                            Err(e @ ClientError::Refused { .. }) => Err(LinkError::from_client(&e)),
                            Err(e) => {
                                fail(LinkCmd::Resolve(n), Down::Unreachable, cache, events).await;
                                return Err(e);
                            }
                        };
                        let _ = events.send(LinkEvent::Endpoint(n, ep)).await;
                    }
                    LinkCmd::Call(mut v, reply) => {
                        if let Some(o) = v.as_object_mut() {
                            for k in ["node_id", "from_node_id", "requester_id"] {
                                if o.get(k).is_some_and(Value::is_null) {
                                    o.insert(k.into(), json!(node));
                                }
                            }
                        }
                        match call(&mut c, &v).await {
                            Ok(answer) => {
                                accepted(config, cache, &v, &answer).await;
                                let _ = reply.send(Ok(answer));
                                if kind(&v) == "deregister" {
                                    return Ok(End::Deregistered);
                                }
                            }
                            Err(e @ ClientError::Refused { .. }) => { let _ = reply.send(Err(LinkError::from_client(&e))); }
                            Err(e) => {
                                let r = match from_cache(&v, Down::Unreachable, cache) {
                                    Err(LinkError::Unreachable) => Err(LinkError::from_client(&e)),
                                    r => r,
                                };
                                let _ = reply.send(r);
                                return Err(e);
                            }
                        }
                    }
                    LinkCmd::Rotate(reply) => rotate(&mut c, config, node, events, reply).await?,
                    LinkCmd::Register(reply) => match register(&mut c, config).await {
                        Ok((again, answer)) => {
                            let _ = reply.send(Ok(answer.clone()));
                            let _ = events.send(LinkEvent::Registered { node: again, reply: answer, protocol, registry: addr.to_owned() }).await;
                        }
                        Err(e) => {
                            let _ = reply.send(Err(LinkError::from_client(&e)));
                            if !refused(&e) {
                                return Err(e);
                            }
                        }
                    },
                }
            }
        }
    }
}

/// What follows a request the registry accepted: the cache learns from lookups, the desired
/// state records changes of the node's attributes.
async fn accepted(config: &LinkConfig, cache: &mut PeerCache, req: &Value, answer: &Value) {
    cache.learn(req, answer);
    if let Err(e) = config.desired.record(req, answer).await {
        tracing::error!(error = %e, "registry state not saved; a restart may not restore it");
    }
    if kind(req) == "set_hostname" {
        let h = answer
            .get("hostname")
            .or_else(|| req.get("hostname"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        config.desired.set_current_hostname(h);
    }
}

/// Registers on `c` with a proof of the key (in v1's plain form toward a v1 registry), then
/// applies the desired state. Returns the node ID and the `register_ok` reply, whose
/// `hostname` is the one the registry holds once the state is applied.
async fn register(c: &mut Session, config: &LinkConfig) -> Result<(u32, Value), ClientError> {
    let want = config.desired.snapshot();
    let listen = format!("0.0.0.0:{}", config.listen_port);
    let identity = config.identity.key();
    // Sent with the registration, so the node never shows the registry's default name.
    let hostname = want.hostname.as_deref().filter(|h| !h.is_empty());
    let registration = async {
        match c.protocol {
            RegistryProtocol::Pilot => {
                c.client
                    .register_instance(&identity, &listen, hostname, Some(&config.instance))
                    .await
            }
            RegistryProtocol::V1 => {
                c.client
                    .register_v1(&identity, &listen, hostname, config.owner.as_deref())
                    .await
            }
        }
    };
    let mut reply = tokio::time::timeout(CALL_TIMEOUT, registration)
        .await
        .map_err(|_| {
            ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "register timed out",
            ))
        })??;
    let node = reply
        .get("node_id")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(ClientError::Closed)?;
    if let Some(e) = reply.get("hostname_error").and_then(Value::as_str) {
        tracing::warn!(error = e, "hostname not set");
    }
    if config.owner.is_some() && c.protocol == RegistryProtocol::Pilot {
        tracing::info!(
            "--owner applies to v1 registries only; pilot-registry registers by key proof and \
             takes no owner string"
        );
    }
    apply(c, node, &want, &mut reply).await?;
    let hostname = reply
        .get("hostname")
        .and_then(Value::as_str)
        .map(str::to_owned);
    config.desired.set_current_hostname(hostname.clone());
    let address = reply
        .get("address")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    tracing::info!(node, %address, hostname = hostname.as_deref().unwrap_or(""), protocol = %c.protocol, "registered");
    Ok((node, reply))
}

/// Applies the desired state after a registration. A refusal (a hostname taken meanwhile, a
/// network that needs a new invitation) is logged and the rest still applied; a broken
/// connection ends the session. `reply` gets the hostname the registry holds afterwards.
async fn apply(
    c: &mut Session,
    node: u32,
    want: &DesiredState,
    reply: &mut Value,
) -> Result<(), ClientError> {
    let mut reqs = Vec::new();
    if let Some(h) = &want.hostname {
        let held = reply.get("hostname").and_then(Value::as_str);
        let refused_at_registration = reply.get("hostname_error").is_some();
        if held.unwrap_or_default() != h && !refused_at_registration {
            reqs.push(json!({"type": "set_hostname", "node_id": node, "hostname": h}));
        }
    }
    if let Some(p) = want.public {
        reqs.push(json!({"type": "set_visibility", "node_id": node, "public": p}));
    }
    if let Some(t) = &want.tags {
        reqs.push(json!({"type": "set_tags", "node_id": node, "tags": t}));
    }
    if let Some(e) = want.task_exec {
        reqs.push(json!({"type": "set_task_exec", "node_id": node, "enabled": e}));
    }
    for (id, m) in &want.networks {
        reqs.push(
            json!({"type": "join_network", "node_id": node, "network_id": id,
                         "token": m.token}),
        );
    }
    for req in reqs {
        match call(c, &req).await {
            Ok(v) => {
                if kind(&req) == "set_hostname" {
                    reply["hostname"] = v
                        .get("hostname")
                        .cloned()
                        .unwrap_or_else(|| req["hostname"].clone());
                }
            }
            Err(e) if refused(&e) => {
                tracing::warn!(request = kind(&req), error = %e, "registry state not applied");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Replaces the identity key: the new key is kept in the pending file before the registry
/// is asked, so a crash or a lost answer is settled by [`settle_rotation`]. Returns an error
/// only when the connection broke.
async fn rotate(
    c: &mut Session,
    config: &LinkConfig,
    node: u32,
    events: &mpsc::Sender<LinkEvent>,
    reply: oneshot::Sender<LinkReply>,
) -> Result<(), ClientError> {
    let new = match on_disk(&config.identity, move |id| id.prepare(node)).await {
        Ok(k) => k,
        Err(e) => {
            let _ = reply.send(Err(e.into()));
            return Ok(());
        }
    };
    let req = json!({
        "type": "rotate_key",
        "node_id": node,
        "signature": sign_v1(&config.identity.key(), &format!("rotate:{node}")),
        "new_public_key": b64(new.verifying_key().as_bytes()),
    });
    match call(c, &req).await {
        Ok(v) => {
            adopt(config, new, events).await;
            let _ = reply.send(Ok(v));
            Ok(())
        }
        Err(e @ ClientError::Refused { .. }) => {
            if let Err(e) = on_disk(&config.identity, NodeIdentity::abandon).await {
                tracing::warn!(error = %e, "could not remove the refused key");
            }
            let _ = reply.send(Err(LinkError::from_client(&e)));
            Ok(())
        }
        Err(e) => {
            let _ = reply.send(Err(LinkError::RotationUnsettled(e.to_string())));
            Err(e)
        }
    }
}

/// Runs one of the identity's file steps (they fsync) off the async workers.
async fn on_disk<T: Send + 'static>(
    identity: &Arc<NodeIdentity>,
    step: impl FnOnce(&NodeIdentity) -> Result<T, RotateError> + Send + 'static,
) -> Result<T, RotateError> {
    let id = identity.clone();
    tokio::task::spawn_blocking(move || step(&id))
        .await
        .unwrap_or_else(|e| Err(RotateError::Task(e.to_string())))
}

/// Makes `key` current (the registry holds it now) and tells the engine.
async fn adopt(config: &LinkConfig, key: SigningKey, events: &mpsc::Sender<LinkEvent>) {
    if let Err(e) = on_disk(&config.identity, move |id| id.commit(key)).await {
        // The key is in use; the pending file stays and the next start settles it again.
        tracing::error!(error = %e, "rotated key in use but not saved");
    }
    tracing::info!(public_key = %config.identity.public_key_base64(), "identity key rotated");
    let _ = events.send(LinkEvent::Rotated(config.identity.key())).await;
}

/// Before registering: a rotation left unsettled (a crash, or a connection lost before the
/// registry's answer) is decided by the key the registry holds for the node.
async fn settle_rotation(
    c: &mut Session,
    config: &LinkConfig,
    events: &mpsc::Sender<LinkEvent>,
) -> Result<(), ClientError> {
    let pending = match on_disk(&config.identity, NodeIdentity::pending).await {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(()),
        Err(e) => {
            tracing::error!(error = %e, "unreadable pending key rotation; the current key is used");
            return Ok(());
        }
    };
    let held = match call(c, &json!({"type": "lookup", "node_id": pending.node})).await {
        Ok(v) => v
            .get("public_key")
            .and_then(Value::as_str)
            .and_then(|k| decode_key(k).ok()),
        Err(e) if refused(&e) => None,
        Err(e) => return Err(e),
    };
    if held == Some(pending.key.verifying_key().to_bytes()) {
        adopt(config, pending.key, events).await;
    } else {
        tracing::info!(
            node = pending.node,
            "the registry did not take the pending key; it is discarded"
        );
        if let Err(e) = on_disk(&config.identity, NodeIdentity::abandon).await {
            tracing::warn!(error = %e, "could not remove the pending key");
        }
    }
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A second connection to the session's registry `addr`, authenticated as `node`, receiving
/// pushed events: handshake events go to `pushes`, reports of a refused rival daemon to
/// `rivals`. Each time it ends, `lost` is told (the session then checks its own connection).
async fn watch(
    config: LinkConfig,
    addr: String,
    node: u32,
    pushes: mpsc::Sender<Value>,
    rivals: mpsc::Sender<Value>,
    lost: mpsc::Sender<()>,
) {
    let mut round = 0;
    loop {
        let r: Result<(), ClientError> = async {
            let mut c = Client::connect_with(&addr, &config.transport).await?;
            c.authenticate(node, &config.identity.key()).await?;
            c.call(&json!({"type": "watch"})).await?;
            round = 0;
            loop {
                let ev = c.next().await?;
                let to = if kind(&ev) == "duplicate_instance" {
                    &rivals
                } else {
                    &pushes
                };
                if to.send(ev).await.is_err() {
                    return Ok(());
                }
            }
        }
        .await;
        match r {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(registry = addr, error = %e, "registry watch ended; retrying")
            }
        }
        let _ = lost.try_send(());
        tokio::time::sleep(BACKOFF.delay(round, jitter_sample())).await;
        round = round.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn refused(code: &str) -> LinkError {
        LinkError::Refused {
            code: code.into(),
            message: "node 7 is not registered".into(),
        }
    }

    #[test]
    fn each_link_failure_maps_to_its_code() {
        let cases = [
            (LinkError::Unreachable, code::UNAVAILABLE),
            (LinkError::Unknown("\"bob\"".into()), code::UNAVAILABLE),
            (LinkError::Deregistered, code::UNAVAILABLE),
            (LinkError::Stopped, code::UNAVAILABLE),
            (LinkError::Busy, code::UNAVAILABLE),
            (LinkError::Connection("reset".into()), code::UNAVAILABLE),
            (
                LinkError::RotationUnsettled("reset".into()),
                code::UNAVAILABLE,
            ),
            (LinkError::Timeout, code::TIMEOUT),
            (refused("not_found"), code::NOT_FOUND),
            (refused("forbidden"), code::REFUSED),
            (refused("conflict"), code::REFUSED),
            (refused("request_failed"), code::REFUSED),
            (LinkError::BadReply("no key".into()), code::INTERNAL),
            (LinkError::Rotate(RotateError::InProgress), code::REFUSED),
            (LinkError::Rotate(RotateError::NoFile), code::REFUSED),
            (
                LinkError::Rotate(RotateError::Task("x".into())),
                code::INTERNAL,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.code(), want, "{e}");
        }
    }

    #[test]
    fn a_refusal_shows_the_registrys_message_and_conflict_is_by_code() {
        assert_eq!(refused("not_found").to_string(), "node 7 is not registered");
        assert!(refused("conflict").is_conflict());
        assert!(!refused("request_failed").is_conflict());
        assert!(!LinkError::Timeout.is_conflict());
    }

    #[test]
    fn a_v1_registrys_refusal_is_told_apart_by_its_missing_code() {
        let v1 = LinkError::Refused {
            code: ClientError::V1_CODE.into(),
            message: "request failed".into(),
        };
        assert!(v1.is_v1_refusal());
        assert!(!v1.is_conflict());
        assert!(!refused("conflict").is_v1_refusal());
        assert!(!LinkError::Timeout.is_v1_refusal());
    }

    #[test]
    fn session_failures_become_link_errors() {
        let timed_out = ClientError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "registry request timed out",
        ));
        assert!(matches!(
            LinkError::from_client(&timed_out),
            LinkError::Timeout
        ));
        assert!(matches!(
            LinkError::from_client(&ClientError::Closed),
            LinkError::Connection(_)
        ));
        let r = ClientError::Refused {
            code: "not_found".into(),
            message: "gone".into(),
        };
        assert_eq!(LinkError::from_client(&r).code(), code::NOT_FOUND);
    }

    #[test]
    fn without_a_session_known_nodes_are_answered_and_unknown_ones_name_the_outage() {
        let mut cache = PeerCache::new();
        cache.learn(
            &json!({"type": "resolve_hostname", "hostname": "bob"}),
            &json!({"type": "resolve_hostname_ok", "node_id": 7, "hostname": "bob"}),
        );
        let bob = json!({"type": "resolve_hostname", "hostname": "bob"});
        let v = from_cache(&bob, Down::Unreachable, &cache).unwrap();
        assert_eq!(
            (v["node_id"].as_u64(), v["stale"].as_bool()),
            (Some(7), Some(true))
        );
        let eve = json!({"type": "resolve_hostname", "hostname": "eve"});
        let e = from_cache(&eve, Down::Unreachable, &cache).unwrap_err();
        assert!(matches!(&e, LinkError::Unknown(w) if w == "\"eve\""), "{e}");
        assert_eq!(
            e.to_string(),
            "registry unreachable, and \"eve\" is not among the nodes this node has seen"
        );
        // Requests that change something are not answered from the cache.
        let set = json!({"type": "set_hostname", "node_id": 3, "hostname": "x"});
        assert!(matches!(
            from_cache(&set, Down::Unreachable, &cache),
            Err(LinkError::Unreachable)
        ));
        assert!(matches!(
            from_cache(&eve, Down::Deregistered, &cache),
            Err(LinkError::Deregistered)
        ));
    }

    #[tokio::test]
    async fn without_a_session_the_engine_gets_cached_keys_and_endpoints() {
        let mut cache = PeerCache::new();
        cache.learn_key(7, [9; 32]);
        cache.learn_endpoint(7, "10.0.0.2:4000".parse().unwrap());
        let (tx, mut rx) = mpsc::channel(8);
        fail(LinkCmd::Lookup(7), Down::Unreachable, &cache, &tx).await;
        fail(LinkCmd::Resolve(7), Down::Unreachable, &cache, &tx).await;
        fail(LinkCmd::Resolve(8), Down::Unreachable, &cache, &tx).await;
        assert!(matches!(rx.recv().await, Some(LinkEvent::Key(7, Some(k))) if k == [9; 32]));
        assert!(matches!(
            rx.recv().await,
            Some(LinkEvent::Endpoint(7, Ok(ep))) if ep.port() == 4000
        ));
        assert!(matches!(
            rx.recv().await,
            Some(LinkEvent::Endpoint(8, Err(LinkError::Unreachable)))
        ));
    }

    #[tokio::test]
    async fn a_refused_rival_is_reported_until_it_has_been_quiet() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut seen = Seen::default();
        let notice = json!({"type": "duplicate_instance", "instance": "bbbb",
                            "endpoint": "10.0.0.2:4000", "message": "another pilotd: stop it"});
        seen.rival(&notice, &tx).await;
        seen.rival(&notice, &tx).await;
        for _ in 0..2 {
            assert!(matches!(
                rx.try_recv(),
                Ok(LinkEvent::Conflict(Some(m))) if m == "another pilotd: stop it"
            ));
        }
        // Reported a moment ago: it stays.
        seen.expire(&tx).await;
        assert!(rx.try_recv().is_err());
        assert_eq!(seen.rival.as_ref().map(|(i, _)| i.as_str()), Some("bbbb"));
        // Quiet for RIVAL_QUIET: cleared, and Info is told.
        // The monotonic clock counts from boot, long more than RIVAL_QUIET ago.
        let long_ago = tokio::time::Instant::now()
            .checked_sub(RIVAL_QUIET)
            .unwrap();
        seen.rival.as_mut().unwrap().1 = long_ago;
        seen.expire(&tx).await;
        assert!(matches!(rx.try_recv(), Ok(LinkEvent::Conflict(None))));
        assert!(seen.rival.is_none());
    }

    #[test]
    fn instance_ids_are_random_and_fit_the_wire_limit() {
        let (a, b) = (new_instance(), new_instance());
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.len() <= tunnel::registry::proto::MAX_INSTANCE);
    }

    #[test]
    fn unsettled_rotation_keeps_its_text() {
        let e = LinkError::RotationUnsettled("registry closed the connection".into());
        assert_eq!(
            e.to_string(),
            "the registry connection broke before it answered (registry closed the \
             connection); the key in use is settled with the registry when the daemon \
             reconnects"
        );
    }
}

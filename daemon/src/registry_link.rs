//! The daemon's link to the registry: registers with a proof of its key (so the session is
//! authenticated and no replayable fixed-string signature is ever sent), heartbeats, keeps a
//! second connection watching for pushed handshake events, answers key and endpoint lookups
//! for the engine, and reconnects with backoff. It runs as its own task: nothing here is ever
//! awaited on the packet path; the engine sends commands and receives events.
//!
//! A request answered on a channel ([`LinkCmd::Call`], [`LinkCmd::Rotate`]) fails with a
//! [`LinkError`]; [`LinkError::code`] is the one place those failures become IPC error codes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use pilot_registry_client::{sign_v1, Client, ClientError};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tunnel::ipc::code;
use tunnel::registry::auth::{b64, decode_key};

use crate::identity::{NodeIdentity, RotateError};

/// Backoff between reconnection attempts: doubles from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(10));
/// How long one registry request may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a registry request made through the link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The link is between sessions (reconnecting with backoff).
    #[error("registry unreachable")]
    Unreachable,
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
    /// Registry address.
    pub registry: String,
    /// Identity key (replaced by a rotation).
    pub identity: Arc<NodeIdentity>,
    /// The UDP port to register (the registry keeps our TCP source IP).
    pub listen_port: u16,
    /// Owner string.
    pub owner: Option<String>,
    /// Hostname to claim.
    pub hostname: Option<String>,
    /// Make the node public.
    pub public: bool,
    /// Heartbeat interval.
    pub keepalive: Duration,
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
}

/// Runs the link until `cmds` closes. Pushed handshake events (`handshake_request`,
/// `handshake_response`) go to `pushes`.
pub async fn run(
    config: LinkConfig,
    mut cmds: mpsc::Receiver<LinkCmd>,
    events: mpsc::Sender<LinkEvent>,
    pushes: mpsc::Sender<Value>,
) {
    let mut backoff = BACKOFF.0;
    loop {
        match session(&config, &mut cmds, &events, &pushes).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(registry = %config.registry, error = %e, "registry link down; reconnecting");
                if events
                    .send(LinkEvent::Disconnected(e.to_string()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        // Commands that arrive while down are answered at once rather than left waiting.
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                c = cmds.recv() => match c {
                    None => return,
                    Some(c) => fail(c, &events).await,
                },
            }
        }
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// Answers a command the link cannot carry out: the registry is unreachable.
async fn fail(cmd: LinkCmd, events: &mpsc::Sender<LinkEvent>) {
    match cmd {
        LinkCmd::Lookup(n) => {
            let _ = events.send(LinkEvent::Key(n, None)).await;
        }
        LinkCmd::Resolve(n) => {
            let _ = events
                .send(LinkEvent::Endpoint(n, Err(LinkError::Unreachable)))
                .await;
        }
        LinkCmd::Call(_, reply) | LinkCmd::Rotate(reply) => {
            let _ = reply.send(Err(LinkError::Unreachable));
        }
    }
}

async fn call(c: &mut Client<tokio::net::TcpStream>, v: &Value) -> Result<Value, ClientError> {
    match tokio::time::timeout(CALL_TIMEOUT, c.call(v)).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "registry request timed out",
        ))),
    }
}

fn refused(e: &ClientError) -> bool {
    matches!(e, ClientError::Refused { .. })
}

/// One connected session; returns `Ok` only when the command channel closed.
async fn session(
    config: &LinkConfig,
    cmds: &mut mpsc::Receiver<LinkCmd>,
    events: &mpsc::Sender<LinkEvent>,
    pushes: &mpsc::Sender<Value>,
) -> Result<(), ClientError> {
    let mut c = tokio::time::timeout(CALL_TIMEOUT, Client::connect(&config.registry))
        .await
        .map_err(|_| {
            ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        })??;
    settle_rotation(&mut c, config, events).await?;
    let listen = format!("0.0.0.0:{}", config.listen_port);
    let identity = config.identity.key();
    let reply = tokio::time::timeout(
        CALL_TIMEOUT,
        c.register_proven(&identity, &listen, config.hostname.as_deref()),
    )
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
    if config.owner.is_some() {
        tracing::debug!(
            "owner strings are sent only with v1 registration; ignored with a proven one"
        );
    }
    if config.public {
        if let Err(e) = call(
            &mut c,
            &json!({"type": "set_visibility", "node_id": node, "public": true}),
        )
        .await
        {
            tracing::warn!(error = %e, "could not make the node public");
        }
    }
    let address = reply
        .get("address")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    tracing::info!(node, %address, "registered");
    if events
        .send(LinkEvent::Registered { node, reply })
        .await
        .is_err()
    {
        return Ok(());
    }
    let watcher = tokio::spawn(watch(config.clone(), node, pushes.clone()));
    let _guard = AbortOnDrop(watcher);
    let mut tick = tokio::time::interval(config.keepalive);
    tick.tick().await;
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match call(&mut c, &json!({"type": "heartbeat", "node_id": node})).await {
                    Ok(_) => {
                        failures = 0;
                        let _ = events.send(LinkEvent::Heartbeat).await;
                    }
                    Err(e) if refused(&e) => {
                        // Reaped or unknown: register again on a fresh session.
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
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return Ok(()) };
                match cmd {
                    LinkCmd::Lookup(n) => {
                        let r = call(&mut c, &json!({"type": "lookup", "node_id": n})).await;
                        let key = match &r {
                            Ok(v) => v.get("public_key").and_then(Value::as_str).and_then(|k| decode_key(k).ok()),
                            Err(e) if refused(e) => None,
                            Err(_) => { fail(LinkCmd::Lookup(n), events).await; return r.map(drop); }
                        };
                        let _ = events.send(LinkEvent::Key(n, key)).await;
                    }
                    LinkCmd::Resolve(n) => {
                        let r = call(&mut c, &json!({"type": "resolve", "node_id": n, "requester_id": node})).await;
                        let ep = match &r {
                            Ok(v) => v.get("real_addr").and_then(Value::as_str).and_then(|a| a.parse::<SocketAddr>().ok()).ok_or_else(|| LinkError::BadReply("no endpoint".into())),
                            Err(e @ ClientError::Refused { .. }) => Err(LinkError::from_client(e)),
                            Err(_) => { fail(LinkCmd::Resolve(n), events).await; return r.map(drop); }
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
                        let r = call(&mut c, &v).await;
                        match r {
                            Ok(v) => { let _ = reply.send(Ok(v)); }
                            Err(e @ ClientError::Refused { .. }) => { let _ = reply.send(Err(LinkError::from_client(&e))); }
                            Err(e) => { let _ = reply.send(Err(LinkError::from_client(&e))); return Err(e); }
                        }
                    }
                    LinkCmd::Rotate(reply) => rotate(&mut c, config, node, events, reply).await?,
                }
            }
        }
    }
}

/// Replaces the identity key: the new key is kept in the pending file before the registry
/// is asked, so a crash or a lost answer is settled by [`settle_rotation`]. Returns an error
/// only when the connection broke.
async fn rotate(
    c: &mut Client<tokio::net::TcpStream>,
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
    c: &mut Client<tokio::net::TcpStream>,
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

/// A second connection, authenticated as `node`, receiving pushed handshake events.
async fn watch(config: LinkConfig, node: u32, pushes: mpsc::Sender<Value>) {
    let mut backoff = BACKOFF.0;
    loop {
        let r: Result<(), ClientError> = async {
            let mut c = Client::connect(&config.registry).await?;
            c.authenticate(node, &config.identity.key()).await?;
            c.call(&json!({"type": "watch"})).await?;
            loop {
                let ev = c.next().await?;
                if pushes.send(ev).await.is_err() {
                    return Ok(());
                }
            }
        }
        .await;
        match r {
            Ok(()) => return,
            Err(e) => tracing::debug!(error = %e, "registry watch ended; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

#[cfg(test)]
mod tests {
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

//! The trust service: who may reach this node, the handshake protocol on virtual port 444
//! (v1 wire §6), the registry handshake relay (§4.8), and `trust.json`.
//!
//! # Who may reach which port
//!
//! The service installs a [`Gate`] in the engine. It is consulted for every new inbound
//! stream connection and every inbound datagram:
//!
//! - a **public** node accepts everyone on every port;
//! - a **private** node accepts its trusted peers on every port, and anyone else only on
//!   port 444 ([`HANDSHAKE_PORT`]), so that a stranger can still ask for trust.
//!
//! v1 never consults its trust set for inbound traffic (§6.4): once a peer knows a node's
//! endpoint every port is open. Here trust is what opens a private node's ports.
//!
//! Revoking trust refuses **new** connections and datagrams at once; connections already
//! open are left to finish.
//!
//! # Delivery
//!
//! A request goes both through the registry (`request_handshake`, which also records our
//! consent and reaches a private peer we cannot resolve yet) and directly to the peer's port
//! 444 (which fails while the peer is private and untrusted). Incoming requests and answers
//! arrive directly, as registry pushes, or from `poll_handshakes` (v1's path, and a
//! backstop for missed pushes); duplicates are harmless. A rejection's reason travels only
//! directly: the registry's answer carries none, so a requester we cannot reach sees an
//! empty reason.
//!
//! # Authenticity
//!
//! v1 checks a handshake message against the key inside the message (§11.2 item 6). Here a
//! direct message is accepted only when
//!
//! - its `node_id` is the node the connection comes from (the tunnel authenticates that
//!   node's key), and
//! - its signature over `handshake:<sender>:<us>` verifies against the key the **registry**
//!   holds for that node; a non-empty `public_key` field must be that same key.
//!
//! Requests and answers relayed by the registry are authentic by construction: the registry
//! accepts them only on the sender's authenticated session.
//!
//! An `accept` is honoured only when we asked that peer (v1 honours unsolicited ones).
//!
//! # Automatic approval
//!
//! An incoming request is approved without asking the operator when
//!
//! - the peer is already trusted (the accept is sent again),
//! - we have an outgoing request to that peer (`mutual`), or
//! - the registry reports that both nodes are members of the same network other than the
//!   backbone (`same_network`). Membership of such a network is controlled by the registry's
//!   join rules, so it stands for the operators' consent. The check is two registry `lookup`s,
//!   made when the request arrives; leaving the network later does not withdraw trust.
//!
//! # Registry trust pairs
//!
//! The registry forms a pair (which lets each side resolve the other's endpoint) only when
//! both nodes consented: our request, our approval (`respond_handshake` with `accept`) and
//! `report_trust` each record our consent; `revoke_trust` withdraws both.
//!
//! # Persistence
//!
//! `<home>/trust.json` in the v1 format (§6.5), plus an `outgoing` list (requests we sent and
//! that are still unanswered) which v1 ignores. Rewritten atomically after every change. A
//! file that cannot be read is an error at start: trust is never dropped silently.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, Semaphore};
use tunnel::ipc::{
    HandshakeStatus, OutgoingEntry, PendingEntry, PendingList, TrustedEntry, TrustedList,
};
use tunnel::{Addr, SocketAddr as PilotAddr};

use crate::engine::{AppEvent, Cmd, ConnId, EngineHandle, TrustGate};
use crate::fsutil::write_atomic;
use crate::identity::NodeIdentity;
use crate::registry_link::{self, LinkCmd, LinkError, LinkReply};
use crate::trust_api::{DeliveryError, TrustCmd, TrustOp, TrustOpError, TrustReply, TrustSender};

/// The handshake port (v1 wire §6.1).
pub const HANDSHAKE_PORT: u16 = tunnel::addr::port::HANDSHAKE;
/// Name of the trust file inside the home directory.
pub const TRUST_FILE: &str = "trust.json";
/// Largest message we send: v1 receivers read only one 4,096-byte segment.
pub const MAX_SEND: usize = 4096;
/// Largest message we accept (read up to the sender's FIN, unlike v1).
pub const MAX_RECEIVE: usize = 8 * 1024;
/// Longest justification or reason, in bytes (the registry's own limit).
pub const MAX_TEXT: usize = 1024;
/// How long an inbound handshake connection may take to deliver its message.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Inbound handshake connections read at once; more are reset.
const MAX_INBOUND: usize = 64;
/// Direct messages being verified at once; more are dropped.
const MAX_VERIFYING: usize = 16;
/// Oldest acceptable message timestamp, seconds.
const MAX_AGE: i64 = 300;
/// Furthest a message timestamp may be in the future, seconds.
const MAX_SKEW: i64 = 30;
/// How long a seen message is remembered for replay detection, seconds.
const REPLAY_TTL: i64 = 600;
/// Most messages remembered for replay detection.
const REPLAY_CAP: usize = 4096;
/// Most pending requests kept; further requests are dropped until some are answered.
const MAX_PENDING: usize = 1024;
/// How long a dial to a peer's handshake port may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the peer to finish after we sent a message.
const LINGER: Duration = Duration::from_secs(5);
/// How long one registry request may take (the link has its own timeout too).
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long after the registry reported a rejection the peer's direct reason is still heard.
const RELAYED_REJECT_WINDOW: Duration = Duration::from_secs(60);
/// How long a copy of a request the operator rejected is taken for the rejected request
/// itself (it came the other way: through the registry or directly).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(60);
/// Default interval of registry inbox polls (v1 polls after each 30 s heartbeat).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(30);

/// Message types (v1 wire §6.2).
const REQUEST: &str = "handshake_request";
const ACCEPT: &str = "handshake_accept";
const REJECT: &str = "handshake_reject";
const REVOKE: &str = "handshake_revoke";

/// What the trust service needs.
#[derive(Debug, Clone)]
pub struct TrustConfig {
    /// The state directory; trust lives in `<home>/trust.json`.
    pub home: PathBuf,
    /// This node's identity key (signs handshake messages).
    pub identity: Arc<NodeIdentity>,
    /// Whether the node is public (everyone may reach every port).
    pub public: bool,
    /// How often the registry inbox is polled, in addition to pushed events.
    pub poll_interval: Duration,
}

impl TrustConfig {
    /// Settings with the default poll interval.
    pub fn new(home: impl Into<PathBuf>, identity: Arc<NodeIdentity>, public: bool) -> Self {
        TrustConfig {
            home: home.into(),
            identity,
            public,
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }
}

/// Why the trust service could not start.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// `trust.json` exists but cannot be read or parsed.
    #[error("trust file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The engine refused the handshake port or has stopped.
    #[error("handshake port {HANDSHAKE_PORT}: {0}")]
    Listen(String),
}

/// Something the trust service did or saw, for logs, webhooks and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustEvent {
    /// A peer asked for trust (directly or through the registry).
    Received {
        /// The peer.
        peer: u32,
        /// Its justification.
        justification: String,
    },
    /// The request waits for the operator.
    Pending {
        /// The peer.
        peer: u32,
    },
    /// A request was approved without the operator.
    AutoApproved {
        /// The peer.
        peer: u32,
        /// `already_trusted`, `mutual` or `same_network`.
        reason: String,
    },
    /// A peer accepted our request; it is now trusted.
    Accepted {
        /// The peer.
        peer: u32,
    },
    /// A peer rejected our request. The reason is empty when the answer came through the
    /// registry, which carries none; if the peer's direct message with the reason arrives
    /// after that, a second event carries it.
    Rejected {
        /// The peer.
        peer: u32,
        /// Its reason.
        reason: String,
    },
    /// A peer withdrew its trust; we dropped ours.
    RevokedByPeer {
        /// The peer.
        peer: u32,
    },
    /// The operator approved a peer's request.
    Approved {
        /// The peer.
        peer: u32,
    },
    /// The operator rejected a peer's request.
    Declined {
        /// The peer.
        peer: u32,
        /// The reason given.
        reason: String,
    },
    /// The operator withdrew trust from a peer.
    Revoked {
        /// The peer.
        peer: u32,
    },
    /// A direct handshake message failed the checks.
    Refused {
        /// The node the connection came from.
        from: u32,
        /// Why.
        why: String,
    },
}

/// Who may open connections to which local port (see the module documentation). Lock-free
/// reads except for one uncontended `RwLock` read for private nodes.
#[derive(Debug)]
pub struct Gate {
    public: AtomicBool,
    trusted: RwLock<HashSet<u32>>,
}

impl TrustEvent {
    /// The webhook event (v1 wire §8.8): its name and fields; `None` for events v1 does not
    /// report.
    pub fn webhook(&self) -> Option<(&'static str, Value)> {
        Some(match self {
            TrustEvent::Received {
                peer,
                justification,
            } => (
                "handshake.received",
                json!({"peer_node_id": peer, "justification": justification}),
            ),
            TrustEvent::Pending { peer } => ("handshake.pending", json!({"peer_node_id": peer})),
            TrustEvent::AutoApproved { peer, reason } => (
                "handshake.auto_approved",
                json!({"peer_node_id": peer, "reason": reason}),
            ),
            TrustEvent::Approved { peer } | TrustEvent::Accepted { peer } => {
                ("handshake.approved", json!({"peer_node_id": peer}))
            }
            TrustEvent::Rejected { peer, reason } | TrustEvent::Declined { peer, reason } => (
                "handshake.rejected",
                json!({"peer_node_id": peer, "reason": reason}),
            ),
            TrustEvent::Revoked { peer } => ("trust.revoked", json!({"peer_node_id": peer})),
            TrustEvent::RevokedByPeer { peer } => {
                ("trust.revoked_by_peer", json!({"peer_node_id": peer}))
            }
            TrustEvent::Refused { .. } => return None,
        })
    }
}

impl Gate {
    /// A gate that trusts nobody yet.
    pub fn new(public: bool) -> Self {
        Gate {
            public: AtomicBool::new(public),
            trusted: RwLock::new(HashSet::new()),
        }
    }

    /// Changes the node's visibility.
    pub fn set_public(&self, public: bool) {
        self.public.store(public, Ordering::Relaxed);
    }

    /// Whether the node is public.
    pub fn is_public(&self) -> bool {
        self.public.load(Ordering::Relaxed)
    }

    /// Whether `peer` is trusted.
    pub fn is_trusted(&self, peer: u32) -> bool {
        match self.trusted.read() {
            Ok(s) => s.contains(&peer),
            Err(poisoned) => poisoned.into_inner().contains(&peer),
        }
    }

    fn replace(&self, peers: HashSet<u32>) {
        match self.trusted.write() {
            Ok(mut s) => *s = peers,
            Err(poisoned) => *poisoned.into_inner() = peers,
        }
    }
}

impl TrustGate for Gate {
    fn allows(&self, peer: u32, port: u16) -> bool {
        port == HANDSHAKE_PORT || self.is_public() || self.is_trusted(peer)
    }
}

/// A running trust service, beyond its command channel.
#[derive(Debug, Clone)]
pub struct TrustHandle {
    gate: Arc<Gate>,
    events: broadcast::Sender<TrustEvent>,
}

impl TrustHandle {
    /// The gate installed in the engine.
    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    /// Changes the node's visibility (call after a successful `set_visibility`).
    pub fn set_public(&self, public: bool) {
        self.gate.set_public(public);
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TrustEvent> {
        self.events.subscribe()
    }
}

/// The trust service.
#[derive(Debug)]
pub struct TrustService;

impl TrustService {
    /// Loads `trust.json`, installs the gate, listens on port 444 and spawns the service. It
    /// runs until every clone of the returned [`TrustSender`] is dropped. `pushes` carries
    /// the registry's `handshake_request` / `handshake_response` events
    /// ([`crate::node::Daemon::pushes`]).
    pub async fn start(
        config: TrustConfig,
        engine: EngineHandle,
        link: mpsc::Sender<LinkCmd>,
        pushes: Option<mpsc::Receiver<Value>>,
    ) -> Result<(TrustSender, TrustHandle), TrustError> {
        let path = config.home.join(TRUST_FILE);
        let state = load(&path)?;
        let gate = Arc::new(Gate::new(config.public));
        gate.replace(state.trusted.keys().copied().collect());
        engine
            .set_gate(gate.clone())
            .await
            .map_err(|e| TrustError::Listen(e.to_string()))?;
        let (app_tx, app_rx) = mpsc::channel(crate::engine::APP_QUEUE);
        engine
            .listen(HANDSHAKE_PORT, app_tx)
            .await
            .map_err(|e| TrustError::Listen(e.to_string()))?;
        let (events, _) = broadcast::channel(256);
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (inbound_tx, inbound_rx) = mpsc::channel(64);
        let key = config.identity.clone();
        tokio::spawn(
            Listener {
                engine: engine.clone(),
                link: link.clone(),
                events: events.clone(),
                out: inbound_tx,
                conns: HashMap::new(),
                replay: Arc::new(Mutex::new(Replay::default())),
                verifying: Arc::new(Semaphore::new(MAX_VERIFYING)),
            }
            .run(app_rx),
        );
        let actor = Actor {
            path,
            key,
            engine,
            link,
            gate: gate.clone(),
            events: events.clone(),
            state,
            relayed_rejects: HashMap::new(),
            declined: HashMap::new(),
            rejected_ours: BTreeMap::new(),
        };
        tokio::spawn(actor.run(cmd_rx, inbound_rx, pushes, config.poll_interval));
        Ok((cmd_tx, TrustHandle { gate, events }))
    }
}

// ---------------------------------------------------------------------------------------
// State and trust.json

#[derive(Debug, Clone)]
struct Trusted {
    public_key: String,
    approved_at: i64,
    mutual: bool,
    network: u16,
}

#[derive(Debug, Clone)]
struct Pending {
    public_key: String,
    justification: String,
    received_at: i64,
}

#[derive(Debug, Clone)]
struct Outgoing {
    justification: String,
    sent_at: i64,
}

#[derive(Debug, Default)]
struct State {
    trusted: BTreeMap<u32, Trusted>,
    pending: BTreeMap<u32, Pending>,
    outgoing: BTreeMap<u32, Outgoing>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TrustFile {
    #[serde(default, deserialize_with = "null_as_empty")]
    trusted: Vec<FileTrusted>,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pending: Vec<FilePending>,
    /// Extension: our unanswered requests (v1 ignores unknown fields).
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    outgoing: Vec<FileOutgoing>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileTrusted {
    node_id: u32,
    #[serde(default)]
    public_key: String,
    #[serde(default)]
    approved_at: String,
    #[serde(default)]
    mutual: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    network: u16,
}

#[derive(Debug, Serialize, Deserialize)]
struct FilePending {
    node_id: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    public_key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    justification: String,
    #[serde(default)]
    received_at: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileOutgoing {
    node_id: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    justification: String,
    #[serde(default)]
    sent_at: String,
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

fn file_time(s: &str, what: &str, node: u32) -> Result<i64, String> {
    if s.is_empty() {
        return Ok(0);
    }
    parse_rfc3339(s).map_err(|e| format!("{what} of node {node}: {e}"))
}

fn load(path: &Path) -> Result<State, TrustError> {
    let err = |reason: String| TrustError::File {
        path: path.display().to_string(),
        reason,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(e) => return Err(err(e.to_string())),
    };
    let file: TrustFile =
        serde_json::from_slice(&bytes).map_err(|e| err(format!("not valid trust JSON: {e}")))?;
    let mut st = State::default();
    for t in file.trusted {
        if t.node_id == 0 {
            return Err(err("a trusted entry has node_id 0".into()));
        }
        let approved_at = file_time(&t.approved_at, "approved_at", t.node_id).map_err(err)?;
        st.trusted.insert(
            t.node_id,
            Trusted {
                public_key: t.public_key,
                approved_at,
                mutual: t.mutual,
                network: t.network,
            },
        );
    }
    for p in file.pending {
        if p.node_id == 0 {
            return Err(err("a pending entry has node_id 0".into()));
        }
        let received_at = file_time(&p.received_at, "received_at", p.node_id).map_err(err)?;
        st.pending.insert(
            p.node_id,
            Pending {
                public_key: p.public_key,
                justification: p.justification,
                received_at,
            },
        );
    }
    for o in file.outgoing {
        if o.node_id == 0 {
            return Err(err("an outgoing entry has node_id 0".into()));
        }
        let sent_at = file_time(&o.sent_at, "sent_at", o.node_id).map_err(err)?;
        st.outgoing.insert(
            o.node_id,
            Outgoing {
                justification: o.justification,
                sent_at,
            },
        );
    }
    Ok(st)
}

fn render(st: &State) -> Result<Vec<u8>, serde_json::Error> {
    let file = TrustFile {
        trusted: st
            .trusted
            .iter()
            .map(|(&node_id, t)| FileTrusted {
                node_id,
                public_key: t.public_key.clone(),
                approved_at: format_rfc3339(t.approved_at),
                mutual: t.mutual,
                network: t.network,
            })
            .collect(),
        pending: st
            .pending
            .iter()
            .map(|(&node_id, p)| FilePending {
                node_id,
                public_key: p.public_key.clone(),
                justification: p.justification.clone(),
                received_at: format_rfc3339(p.received_at),
            })
            .collect(),
        outgoing: st
            .outgoing
            .iter()
            .map(|(&node_id, o)| FileOutgoing {
                node_id,
                justification: o.justification.clone(),
                sent_at: format_rfc3339(o.sent_at),
            })
            .collect(),
    };
    let mut out = serde_json::to_vec_pretty(&file)?;
    out.push(b'\n');
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Time

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Unix seconds as RFC 3339 in UTC (`2006-01-02T15:04:05Z`).
pub fn format_rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Parses RFC 3339 (as Go writes it: optional fraction, `Z` or `±hh:mm`) to Unix seconds;
/// the fraction is dropped.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 time");
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let part = b.get(r).ok_or_else(bad)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        part.iter()
            .try_fold(0i64, |acc, &c| {
                acc.checked_mul(10)?.checked_add(i64::from(c - b'0'))
            })
            .ok_or_else(bad)
    };
    let sep = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    if b.len() < 20
        || !sep(4, b"-")
        || !sep(7, b"-")
        || !sep(10, b"Tt")
        || !sep(13, b":")
        || !sep(16, b":")
    {
        return Err(bad());
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let mut i = 19;
    if sep(i, b".") {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&c @ (b'+' | b'-')) if i + 6 == b.len() && sep(i + 3, b":") => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            let o = oh * 3600 + om * 60;
            if c == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return Err(bad()),
    };
    Ok(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset)
}

// ---------------------------------------------------------------------------------------
// Wire message (v1 wire §6.2)

/// A handshake message. Field order is v1's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct Message {
    #[serde(rename = "type")]
    kind: String,
    node_id: u32,
    public_key: String,
    justification: String,
    signature: String,
    reason: String,
    timestamp: i64,
}

/// The string every handshake message signs (the same for all four types).
pub fn challenge(from: u32, to: u32) -> String {
    format!("handshake:{from}:{to}")
}

fn build(
    key: &SigningKey,
    me: u32,
    peer: u32,
    kind: &str,
    justification: &str,
    reason: &str,
) -> Vec<u8> {
    let msg = Message {
        kind: kind.to_owned(),
        node_id: me,
        public_key: tunnel::registry::auth::b64(key.verifying_key().as_bytes()),
        justification: justification.to_owned(),
        signature: tunnel::registry::auth::b64(
            &key.sign(challenge(me, peer).as_bytes()).to_bytes(),
        ),
        reason: reason.to_owned(),
        timestamp: now_unix(),
    };
    serde_json::to_vec(&msg).unwrap_or_default()
}

/// Trust with `peer` ended: a v1 peer drops its tunnel keys for us then (v1 wire §6.3), so
/// the engine sends our key exchange ahead of what goes to it next (the session stays, so
/// open streams go on and the gate still refuses the peer's new streams at once).
async fn rekey_tunnel(engine: &EngineHandle, peer: u32) {
    let _ = engine.send(crate::engine::Cmd::Rekey { node: peer }).await;
}

/// Sends one message to `peer`'s port 444: dial, write, finish, and wait briefly for the
/// peer to finish too.
async fn send_direct(engine: &EngineHandle, peer: u32, body: &[u8]) -> Result<(), DeliveryError> {
    if body.is_empty() || body.len() > MAX_SEND {
        return Err(DeliveryError::Size(body.len()));
    }
    let (tx, mut rx) = mpsc::channel(16);
    let dst = PilotAddr::new(Addr::new(0, peer), HANDSHAKE_PORT);
    let (conn, credit) = tokio::time::timeout(DIAL_TIMEOUT, engine.dial(dst, tx))
        .await
        .map_err(|_| DeliveryError::DialTimeout(peer))?
        .map_err(DeliveryError::Dial)?;
    engine
        .write(conn, &credit, body)
        .await
        .map_err(DeliveryError::Stopped)?;
    engine
        .send(Cmd::Close { conn })
        .await
        .map_err(DeliveryError::Stopped)?;
    let closed = tokio::time::timeout(LINGER, async {
        while let Some(ev) = rx.recv().await {
            if let AppEvent::Closed { error, .. } = ev {
                return error;
            }
        }
        None
    })
    .await;
    match closed {
        Ok(Some(e)) => Err(DeliveryError::Closed(e)),
        Ok(None) => Ok(()),
        Err(_) => {
            let _ = engine.send(Cmd::Abort { conn }).await;
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------
// Registry

async fn registry(link: &mpsc::Sender<LinkCmd>, req: Value) -> LinkReply {
    registry_link::request(link, |tx| LinkCmd::Call(req, tx), REGISTRY_TIMEOUT).await
}

/// What the registry says about a node.
#[derive(Debug)]
struct NodeInfo {
    key: [u8; 32],
    key_b64: String,
    networks: Vec<u16>,
}

async fn lookup(link: &mpsc::Sender<LinkCmd>, node: u32) -> Result<NodeInfo, LinkError> {
    let v = registry(link, json!({"type": "lookup", "node_id": node})).await?;
    let key_b64 = v
        .get("public_key")
        .and_then(Value::as_str)
        .ok_or_else(|| LinkError::BadReply(format!("no key for node {node}")))?
        .to_owned();
    let key = tunnel::registry::auth::decode_key(&key_b64)
        .map_err(|e| LinkError::BadReply(format!("key of node {node}: {e}")))?;
    let networks = v
        .get("networks")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .filter_map(|n| u16::try_from(n).ok())
                .collect()
        })
        .unwrap_or_default();
    Ok(NodeInfo {
        key,
        key_b64,
        networks,
    })
}

// ---------------------------------------------------------------------------------------
// Port 444 listener and verification

#[derive(Debug, Default)]
struct Replay {
    seen: HashSet<String>,
    order: VecDeque<(i64, String)>,
}

impl Replay {
    fn expire(&mut self, now: i64) {
        while let Some((t, _)) = self.order.front() {
            if now - *t < REPLAY_TTL && self.order.len() <= REPLAY_CAP {
                break;
            }
            if let Some((_, k)) = self.order.pop_front() {
                self.seen.remove(&k);
            }
        }
    }

    fn contains(&mut self, now: i64, k: &str) -> bool {
        self.expire(now);
        self.seen.contains(k)
    }

    /// Records `k`; false if it was already there.
    fn insert(&mut self, now: i64, k: String) -> bool {
        self.expire(now);
        if !self.seen.insert(k.clone()) {
            return false;
        }
        self.order.push_back((now, k));
        self.expire(now);
        true
    }
}

#[derive(Debug)]
struct Reading {
    from: u32,
    buf: Vec<u8>,
    deadline: Instant,
}

/// A direct message that passed every check.
#[derive(Debug)]
struct Verified {
    msg: Message,
    key_b64: String,
}

#[derive(Debug)]
struct Listener {
    engine: EngineHandle,
    link: mpsc::Sender<LinkCmd>,
    events: broadcast::Sender<TrustEvent>,
    out: mpsc::Sender<Verified>,
    conns: HashMap<ConnId, Reading>,
    replay: Arc<Mutex<Replay>>,
    verifying: Arc<Semaphore>,
}

impl Listener {
    async fn run(mut self, mut rx: mpsc::Receiver<AppEvent>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    None => return,
                    Some(ev) => self.on_event(ev).await,
                },
                _ = tick.tick() => self.expire().await,
            }
            if self.out.is_closed() {
                return;
            }
        }
    }

    fn refuse(&self, from: u32, why: impl Into<String>) {
        let why = why.into();
        tracing::debug!(from, %why, "handshake message refused");
        let _ = self.events.send(TrustEvent::Refused { from, why });
    }

    async fn on_event(&mut self, ev: AppEvent) {
        match ev {
            AppEvent::Accepted { conn, remote, .. } => {
                if self.conns.len() >= MAX_INBOUND {
                    self.refuse(remote.addr.node, "too many handshake connections");
                    let _ = self.engine.send(Cmd::Abort { conn }).await;
                    return;
                }
                self.conns.insert(
                    conn,
                    Reading {
                        from: remote.addr.node,
                        buf: Vec::new(),
                        deadline: Instant::now() + READ_TIMEOUT,
                    },
                );
            }
            AppEvent::Data { conn, data } => {
                let Some(r) = self.conns.get_mut(&conn) else {
                    return;
                };
                if r.buf.len() + data.len() > MAX_RECEIVE {
                    let from = r.from;
                    self.conns.remove(&conn);
                    self.refuse(from, format!("message longer than {MAX_RECEIVE} bytes"));
                    let _ = self.engine.send(Cmd::Abort { conn }).await;
                    return;
                }
                r.buf.extend_from_slice(&data);
                match serde_json::from_slice::<Message>(&r.buf) {
                    Ok(msg) => {
                        let from = r.from;
                        self.conns.remove(&conn);
                        let _ = self.engine.send(Cmd::Close { conn }).await;
                        self.verify(from, msg);
                    }
                    Err(e) if e.is_eof() => {}
                    Err(e) => {
                        let from = r.from;
                        self.conns.remove(&conn);
                        self.refuse(from, format!("not a handshake message: {e}"));
                        let _ = self.engine.send(Cmd::Abort { conn }).await;
                    }
                }
            }
            AppEvent::Closed { conn, .. } => {
                if let Some(r) = self.conns.remove(&conn) {
                    let why = if r.buf.is_empty() {
                        "connection closed without a message".to_owned()
                    } else {
                        match serde_json::from_slice::<Message>(&r.buf) {
                            Ok(_) => "unreachable".to_owned(),
                            Err(e) => format!("not a handshake message: {e}"),
                        }
                    };
                    self.refuse(r.from, why);
                }
                let _ = self.engine.send(Cmd::Close { conn }).await;
            }
            AppEvent::Datagram { .. } | AppEvent::Incoming { .. } => {}
        }
    }

    async fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(&c, _)| c)
            .collect();
        for conn in late {
            if let Some(r) = self.conns.remove(&conn) {
                self.refuse(r.from, "no complete message within 10 s");
            }
            let _ = self.engine.send(Cmd::Abort { conn }).await;
        }
    }

    fn verify(&self, from: u32, msg: Message) {
        let Ok(permit) = self.verifying.clone().try_acquire_owned() else {
            self.refuse(from, "too many messages being verified");
            return;
        };
        let me = self.engine.node();
        let link = self.link.clone();
        let replay = self.replay.clone();
        let events = self.events.clone();
        let out = self.out.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match check(me, from, &msg, &link, &replay).await {
                Ok(key_b64) => {
                    let _ = out.send(Verified { msg, key_b64 }).await;
                }
                Err(why) => {
                    tracing::debug!(from, %why, "handshake message refused");
                    let _ = events.send(TrustEvent::Refused { from, why });
                }
            }
        });
    }
}

/// The receiver checks of v1 wire §6.3 (age, replay, signature), with the signature checked
/// against the registry's key for the connection's authenticated source. Returns that key.
async fn check(
    me: u32,
    from: u32,
    msg: &Message,
    link: &mpsc::Sender<LinkCmd>,
    replay: &Mutex<Replay>,
) -> Result<String, String> {
    if me == 0 {
        return Err("not registered yet".into());
    }
    if ![REQUEST, ACCEPT, REJECT, REVOKE].contains(&msg.kind.as_str()) {
        return Err(format!("unknown message type {:?}", msg.kind));
    }
    let now = now_unix();
    if now.saturating_sub(msg.timestamp) > MAX_AGE {
        return Err("message is too old".into());
    }
    if msg.timestamp.saturating_sub(now) > MAX_SKEW {
        return Err("message is from the future".into());
    }
    let canonical = serde_json::to_string(msg).map_err(|e| e.to_string())?;
    let seen = match replay.lock() {
        Ok(mut r) => r.contains(now, &canonical),
        Err(p) => p.into_inner().contains(now, &canonical),
    };
    if seen {
        return Err("message was already received".into());
    }
    if msg.node_id != from {
        return Err(format!(
            "message claims node {} but comes from node {from}",
            msg.node_id
        ));
    }
    if msg.justification.len() > MAX_TEXT || msg.reason.len() > MAX_TEXT {
        return Err(format!(
            "justification or reason longer than {MAX_TEXT} bytes"
        ));
    }
    let info = lookup(link, from).await.map_err(|e| e.to_string())?;
    if !msg.public_key.is_empty() && msg.public_key != info.key_b64 {
        return Err(format!("key is not the one registered for node {from}"));
    }
    tunnel::registry::auth::verify(&info.key, challenge(from, me).as_bytes(), &msg.signature)
        .map_err(|e| format!("signature: {e}"))?;
    let fresh = match replay.lock() {
        Ok(mut r) => r.insert(now, canonical),
        Err(p) => p.into_inner().insert(now, canonical),
    };
    if !fresh {
        return Err("message was already received".into());
    }
    Ok(info.key_b64)
}

// ---------------------------------------------------------------------------------------
// The service

#[derive(Debug)]
struct Actor {
    path: PathBuf,
    key: Arc<NodeIdentity>,
    engine: EngineHandle,
    link: mpsc::Sender<LinkCmd>,
    gate: Arc<Gate>,
    events: broadcast::Sender<TrustEvent>,
    state: State,
    /// When the registry last reported a rejection by each peer, so that the direct reject
    /// carrying the reason, which races it, is still heard.
    relayed_rejects: HashMap<u32, Instant>,
    /// The requests the operator rejected lately (when, and their justification): a request
    /// travels both through the registry and directly, and the slower copy of one just
    /// rejected must not make it pending again.
    declined: HashMap<u32, (Instant, String)>,
    /// Our requests that peers rejected (when, Unix seconds, and their reason), shown with
    /// the pending list until we ask that peer again; at most [`MAX_REJECTED_OURS`].
    rejected_ours: BTreeMap<u32, (i64, String)>,
}

/// Most rejections of our requests remembered for `pilotctl pending`.
const MAX_REJECTED_OURS: usize = 256;

type Reply = TrustReply;

fn status(status: &str, peer: u32) -> Value {
    serde_json::to_value(HandshakeStatus {
        status: status.to_owned(),
        node_id: peer,
    })
    .unwrap_or(Value::Null)
}

impl Actor {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<TrustCmd>,
        mut inbound: mpsc::Receiver<Verified>,
        mut pushes: Option<mpsc::Receiver<Value>>,
        poll_interval: Duration,
    ) {
        let mut poll = tokio::time::interval(poll_interval.max(Duration::from_millis(100)));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let node = self.engine.clone();
        let mut registered = self.engine.node() != 0;
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(TrustCmd { op, reply }) => {
                        let r = self.op(op).await;
                        let _ = reply.send(r);
                    }
                },
                Some(v) = inbound.recv() => self.on_direct(v).await,
                Some(v) = recv_opt(&mut pushes) => self.on_push(&v).await,
                r = node.registered(), if !registered => {
                    if r.is_err() {
                        return;
                    }
                    registered = true;
                    poll.reset_immediately();
                }
                _ = poll.tick(), if registered => self.poll().await,
            }
        }
    }

    fn emit(&self, ev: TrustEvent) {
        let _ = self.events.send(ev);
    }

    /// Applies the state to the gate and writes trust.json.
    async fn commit(&mut self) -> Result<(), TrustOpError> {
        self.gate
            .replace(self.state.trusted.keys().copied().collect());
        let bytes = render(&self.state).map_err(|e| TrustOpError::Encode(e.to_string()))?;
        let path = self.path.clone();
        let r = tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = &r {
            tracing::error!(path = %self.path.display(), error = %e, "could not save trust");
        }
        r.map_err(|reason| TrustOpError::Save {
            path: self.path.display().to_string(),
            reason,
        })
    }

    fn me(&self) -> Result<u32, TrustOpError> {
        match self.engine.node() {
            0 => Err(TrustOpError::NotRegistered),
            n => Ok(n),
        }
    }

    fn check_peer(&self, peer: u32) -> Result<u32, TrustOpError> {
        let me = self.me()?;
        if peer == 0 {
            return Err(TrustOpError::ZeroPeer);
        }
        if peer == me {
            return Err(TrustOpError::SelfPeer);
        }
        Ok(me)
    }

    /// Sends a signed message to `peer`'s port 444 in the background.
    fn spawn_direct(
        &self,
        me: u32,
        peer: u32,
        kind: &'static str,
        justification: &str,
        reason: &str,
    ) {
        let body = build(&self.key.key(), me, peer, kind, justification, reason);
        let engine = self.engine.clone();
        tokio::spawn(async move {
            if let Err(e) = send_direct(&engine, peer, &body).await {
                tracing::debug!(peer, kind, error = %e, "direct handshake message not delivered");
            }
        });
    }

    /// Registry `report_trust` (our consent to the pair) in the background.
    fn spawn_report(&self, me: u32, peer: u32) {
        let link = self.link.clone();
        tokio::spawn(async move {
            let req = json!({"type": "report_trust", "node_id": me, "peer_id": peer});
            if let Err(e) = registry(&link, req).await {
                tracing::warn!(peer, error = %e, "registry report_trust failed");
            }
        });
    }

    fn trust(&mut self, peer: u32, key: String, mutual: bool, network: u16) {
        self.state.pending.remove(&peer);
        self.state.outgoing.remove(&peer);
        self.state.trusted.insert(
            peer,
            Trusted {
                public_key: key,
                approved_at: now_unix(),
                mutual,
                network,
            },
        );
    }

    async fn op(&mut self, op: TrustOp) -> Reply {
        match op {
            TrustOp::Request {
                peer,
                justification,
            } => self.request(peer, justification).await,
            TrustOp::Approve { peer } => {
                let me = self.check_peer(peer)?;
                let Some(p) = self.state.pending.get(&peer).cloned() else {
                    return Err(TrustOpError::NoPending(peer));
                };
                let key = match p.public_key.is_empty() {
                    true => lookup(&self.link, peer)
                        .await
                        .map(|i| i.key_b64)
                        .unwrap_or_default(),
                    false => p.public_key,
                };
                self.trust(peer, key, false, 0);
                self.commit().await?;
                self.emit(TrustEvent::Approved { peer });
                self.answer_accept(me, peer).await;
                Ok(status(HandshakeStatus::APPROVED, peer))
            }
            TrustOp::Reject { peer, reason } => {
                let me = self.check_peer(peer)?;
                if reason.len() > MAX_TEXT {
                    return Err(TrustOpError::TooLong {
                        what: "reason",
                        max: MAX_TEXT,
                    });
                }
                let Some(rejected) = self.state.pending.remove(&peer) else {
                    return Err(TrustOpError::NoPending(peer));
                };
                self.commit().await?;
                let now = Instant::now();
                self.declined
                    .retain(|_, (at, _)| now.duration_since(*at) < DUPLICATE_WINDOW);
                self.declined.insert(peer, (now, rejected.justification));
                self.emit(TrustEvent::Declined {
                    peer,
                    reason: reason.clone(),
                });
                // Directly first, so that a reachable requester sees the reason before the
                // registry's answer (which has none) arrives.
                let body = build(&self.key.key(), me, peer, REJECT, "", &reason);
                let engine = self.engine.clone();
                let link = self.link.clone();
                tokio::spawn(async move {
                    if let Err(e) = send_direct(&engine, peer, &body).await {
                        tracing::debug!(peer, error = %e, "direct reject not delivered");
                    }
                    let req = json!({"type": "respond_handshake", "node_id": me, "peer_id": peer, "accept": false});
                    if let Err(e) = registry(&link, req).await {
                        tracing::warn!(peer, error = %e, "registry respond_handshake failed");
                    }
                });
                Ok(status(HandshakeStatus::REJECTED, peer))
            }
            TrustOp::Pending => {
                let pending = self
                    .state
                    .pending
                    .iter()
                    .map(|(&node_id, p)| PendingEntry {
                        node_id,
                        public_key: p.public_key.clone(),
                        justification: p.justification.clone(),
                        received_at: p.received_at,
                    })
                    .collect();
                let waiting = self
                    .state
                    .outgoing
                    .iter()
                    .map(|(&node_id, o)| OutgoingEntry {
                        node_id,
                        justification: o.justification.clone(),
                        sent_at: o.sent_at,
                        status: OutgoingEntry::WAITING.into(),
                        ..OutgoingEntry::default()
                    });
                let rejected =
                    self.rejected_ours
                        .iter()
                        .map(|(&node_id, (at, reason))| OutgoingEntry {
                            node_id,
                            status: OutgoingEntry::REJECTED.into(),
                            reason: reason.clone(),
                            answered_at: Some(*at),
                            ..OutgoingEntry::default()
                        });
                let outgoing = waiting.chain(rejected).collect();
                serde_json::to_value(PendingList { pending, outgoing })
                    .map_err(|e| TrustOpError::Encode(e.to_string()))
            }
            TrustOp::Trusted => {
                let trusted = self
                    .state
                    .trusted
                    .iter()
                    .map(|(&node_id, t)| TrustedEntry {
                        node_id,
                        public_key: t.public_key.clone(),
                        approved_at: t.approved_at,
                        mutual: t.mutual,
                        network: t.network,
                    })
                    .collect();
                serde_json::to_value(TrustedList { trusted })
                    .map_err(|e| TrustOpError::Encode(e.to_string()))
            }
            TrustOp::Revoke { peer } => {
                let me = self.check_peer(peer)?;
                if self.state.trusted.remove(&peer).is_none() {
                    return Err(TrustOpError::NotTrusted(peer));
                }
                self.state.pending.remove(&peer);
                self.state.outgoing.remove(&peer);
                self.commit().await?;
                self.emit(TrustEvent::Revoked { peer });
                let req = json!({"type": "revoke_trust", "node_id": me, "peer_id": peer});
                if let Err(e) = registry(&self.link, req).await {
                    tracing::warn!(peer, error = %e, "registry revoke_trust failed");
                }
                // The revoke goes out over the session as it is; then the peer may have
                // dropped its keys for us (a v1 daemon does on a revoke), so what we send
                // next starts with our key exchange.
                let body = build(&self.key.key(), me, peer, REVOKE, "", "trust revoked");
                let engine = self.engine.clone();
                tokio::spawn(async move {
                    if let Err(e) = send_direct(&engine, peer, &body).await {
                        tracing::debug!(peer, error = %e, "direct revoke not delivered");
                    }
                    rekey_tunnel(&engine, peer).await;
                });
                Ok(status(HandshakeStatus::REVOKED, peer))
            }
        }
    }

    async fn request(&mut self, peer: u32, justification: String) -> Reply {
        let me = self.check_peer(peer)?;
        if justification.len() > MAX_TEXT {
            return Err(TrustOpError::TooLong {
                what: "justification",
                max: MAX_TEXT,
            });
        }
        if self.state.trusted.contains_key(&peer) {
            return Ok(status(HandshakeStatus::SENT, peer));
        }
        if let Some(p) = self.state.pending.get(&peer).cloned() {
            // They asked us first: asking back is approving.
            let key = match p.public_key.is_empty() {
                true => lookup(&self.link, peer)
                    .await
                    .map(|i| i.key_b64)
                    .unwrap_or_default(),
                false => p.public_key,
            };
            self.trust(peer, key, true, 0);
            self.commit().await?;
            self.emit(TrustEvent::AutoApproved {
                peer,
                reason: "mutual".into(),
            });
            self.answer_accept(me, peer).await;
            return Ok(status(HandshakeStatus::SENT, peer));
        }
        self.rejected_ours.remove(&peer);
        // Asked before and not answered yet: the registry may still hold that request.
        let repeat = self.state.outgoing.contains_key(&peer);
        self.state.outgoing.insert(
            peer,
            Outgoing {
                justification: justification.clone(),
                sent_at: now_unix(),
            },
        );
        self.commit().await?;
        let req = json!({
            "type": "request_handshake",
            "from_node_id": me,
            "to_node_id": peer,
            "justification": justification,
        });
        let relayed = registry(&self.link, req).await;
        let body = build(&self.key.key(), me, peer, REQUEST, &justification, "");
        match relayed {
            Ok(_) => {
                self.spawn_direct_body(peer, body);
                Ok(status(HandshakeStatus::SENT, peer))
            }
            // The registry holds our earlier request. A v1 registry says so only as "request
            // failed" (no code, wire §4.2): for a request we already sent and that is still
            // unanswered, that is read as the same conflict.
            Err(e) if e.is_conflict() || (repeat && e.is_v1_refusal()) => {
                self.spawn_direct_body(peer, body);
                Ok(status(HandshakeStatus::SENT, peer))
            }
            Err(relay_err) => {
                // The registry refused or is unreachable: the request counts as sent only if
                // it reaches the peer directly.
                match send_direct(&self.engine, peer, &body).await {
                    Ok(()) => Ok(status(HandshakeStatus::SENT, peer)),
                    Err(direct) => {
                        self.state.outgoing.remove(&peer);
                        let _ = self.commit().await;
                        Err(TrustOpError::NotDelivered {
                            peer,
                            registry: relay_err,
                            direct,
                        })
                    }
                }
            }
        }
    }

    fn spawn_direct_body(&self, peer: u32, body: Vec<u8>) {
        let engine = self.engine.clone();
        tokio::spawn(async move {
            if let Err(e) = send_direct(&engine, peer, &body).await {
                tracing::debug!(peer, error = %e, "direct trust request not delivered");
            }
        });
    }

    /// Tells `peer` we accept: through the registry (which records our consent, forming the
    /// pair, and notifies the peer), then directly.
    async fn answer_accept(&self, me: u32, peer: u32) {
        let req =
            json!({"type": "respond_handshake", "node_id": me, "peer_id": peer, "accept": true});
        if let Err(e) = registry(&self.link, req).await {
            tracing::warn!(peer, error = %e, "registry respond_handshake failed");
            self.spawn_report(me, peer);
        }
        self.spawn_direct(me, peer, ACCEPT, "", "");
    }

    /// A request from `peer`, direct (with its verified key) or relayed.
    async fn on_request(&mut self, peer: u32, justification: String, key: Option<String>) {
        let Ok(me) = self.check_peer(peer) else {
            return;
        };
        let justification: String = truncate(justification, MAX_TEXT);
        if let Some((at, declined)) = self.declined.get(&peer) {
            if at.elapsed() < DUPLICATE_WINDOW && *declined == justification {
                tracing::debug!(peer, "second copy of a request just rejected; ignored");
                return;
            }
        }
        if self.state.trusted.contains_key(&peer) {
            self.emit(TrustEvent::AutoApproved {
                peer,
                reason: "already_trusted".into(),
            });
            self.answer_accept(me, peer).await;
            return;
        }
        let fresh = !self.state.pending.contains_key(&peer);
        if fresh {
            self.emit(TrustEvent::Received {
                peer,
                justification: justification.clone(),
            });
        }
        let info = lookup(&self.link, peer).await;
        let key = key
            .or_else(|| info.as_ref().ok().map(|i| i.key_b64.clone()))
            .unwrap_or_default();
        if self.state.outgoing.contains_key(&peer) {
            self.trust(peer, key, true, 0);
            if self.commit().await.is_ok() {
                self.emit(TrustEvent::AutoApproved {
                    peer,
                    reason: "mutual".into(),
                });
                self.answer_accept(me, peer).await;
            }
            return;
        }
        if let Ok(theirs) = &info {
            if let Some(net) = self.shared_network(me, &theirs.networks).await {
                self.trust(peer, key, false, net);
                if self.commit().await.is_ok() {
                    self.emit(TrustEvent::AutoApproved {
                        peer,
                        reason: "same_network".into(),
                    });
                    self.answer_accept(me, peer).await;
                }
                return;
            }
        }
        if fresh && self.state.pending.len() >= MAX_PENDING {
            tracing::warn!(peer, "too many pending trust requests; request dropped");
            return;
        }
        let entry = self.state.pending.entry(peer).or_insert(Pending {
            public_key: String::new(),
            justification: String::new(),
            received_at: now_unix(),
        });
        let mut changed = fresh;
        if !key.is_empty() && entry.public_key != key {
            entry.public_key = key;
            changed = true;
        }
        if !justification.is_empty() && entry.justification != justification {
            entry.justification = justification;
            changed = true;
        }
        if changed && self.commit().await.is_ok() && fresh {
            self.emit(TrustEvent::Pending { peer });
        }
    }

    /// The lowest network other than the backbone that both we and the peer are in.
    async fn shared_network(&self, me: u32, theirs: &[u16]) -> Option<u16> {
        if theirs.iter().all(|&n| n == 0) {
            return None;
        }
        let mine = lookup(&self.link, me).await.ok()?;
        mine.networks
            .iter()
            .copied()
            .filter(|&n| n != 0 && theirs.contains(&n))
            .min()
    }

    /// `peer` accepted (directly or through the registry).
    async fn on_accept(&mut self, peer: u32, key: Option<String>) {
        let Ok(me) = self.check_peer(peer) else {
            return;
        };
        if !self.state.outgoing.contains_key(&peer) {
            tracing::debug!(peer, "accept without a request of ours; ignored");
            return;
        }
        let key = match key {
            Some(k) => k,
            None => lookup(&self.link, peer)
                .await
                .map(|i| i.key_b64)
                .unwrap_or_default(),
        };
        self.trust(peer, key, true, 0);
        if self.commit().await.is_ok() {
            self.emit(TrustEvent::Accepted { peer });
            // Our request already recorded our consent; this repeats it in case the
            // registry lost it.
            self.spawn_report(me, peer);
        }
    }

    /// `peer` rejected our request, directly (with its reason) or through the registry
    /// (without one). The two race; a direct reason arriving shortly after the registry's
    /// answer is reported in a second event.
    async fn on_reject(&mut self, peer: u32, reason: String, relayed: bool) {
        let now = Instant::now();
        self.relayed_rejects
            .retain(|_, t| now.duration_since(*t) < RELAYED_REJECT_WINDOW);
        let asked = self.state.outgoing.remove(&peer).is_some();
        if asked {
            let _ = self.commit().await;
        }
        let late_reason =
            !relayed && !reason.is_empty() && self.relayed_rejects.remove(&peer).is_some();
        if relayed && asked {
            self.relayed_rejects.insert(peer, now);
        }
        if asked || late_reason {
            if self.rejected_ours.len() >= MAX_REJECTED_OURS
                && !self.rejected_ours.contains_key(&peer)
            {
                let oldest = self
                    .rejected_ours
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(&n, _)| n);
                if let Some(n) = oldest {
                    self.rejected_ours.remove(&n);
                }
            }
            self.rejected_ours
                .insert(peer, (now_unix(), truncate(reason.clone(), MAX_TEXT)));
            self.emit(TrustEvent::Rejected {
                peer,
                reason: truncate(reason, MAX_TEXT),
            });
        }
    }

    /// `peer` withdrew its trust.
    async fn on_revoke(&mut self, peer: u32) {
        let Ok(me) = self.check_peer(peer) else {
            return;
        };
        let was = self.state.trusted.remove(&peer).is_some();
        let changed = self.state.pending.remove(&peer).is_some()
            | self.state.outgoing.remove(&peer).is_some();
        if was || changed {
            let _ = self.commit().await;
        }
        if was {
            self.emit(TrustEvent::RevokedByPeer { peer });
            rekey_tunnel(&self.engine, peer).await;
            let req = json!({"type": "revoke_trust", "node_id": me, "peer_id": peer});
            // The peer usually withdrew the pair already; a not-found answer is expected.
            let _ = registry(&self.link, req).await;
        }
    }

    async fn on_direct(&mut self, v: Verified) {
        let Verified { msg, key_b64 } = v;
        let peer = msg.node_id;
        match msg.kind.as_str() {
            REQUEST => {
                self.on_request(peer, msg.justification, Some(key_b64))
                    .await
            }
            ACCEPT => self.on_accept(peer, Some(key_b64)).await,
            REJECT => self.on_reject(peer, msg.reason, false).await,
            REVOKE => self.on_revoke(peer).await,
            _ => {}
        }
    }

    /// A pushed registry event, or one entry of a poll.
    async fn on_push(&mut self, v: &Value) {
        let from = v
            .get("from_node_id")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        if from == 0 {
            return;
        }
        match v.get("type").and_then(Value::as_str) {
            Some("handshake_request") => {
                let j = v
                    .get("justification")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                self.on_request(from, j, None).await;
            }
            Some("handshake_response") => self.on_response(from, v).await,
            _ => {}
        }
    }

    async fn on_response(&mut self, from: u32, v: &Value) {
        if v.get("accept").and_then(Value::as_bool).unwrap_or(false) {
            self.on_accept(from, None).await;
        } else {
            self.on_reject(from, String::new(), true).await;
        }
    }

    /// Drains the registry inbox (v1's delivery path, and a backstop for missed pushes).
    async fn poll(&mut self) {
        let Ok(me) = self.me() else {
            return;
        };
        let r = registry(
            &self.link,
            json!({"type": "poll_handshakes", "node_id": me}),
        )
        .await;
        let v = match r {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "poll_handshakes failed");
                return;
            }
        };
        let list = |k: &str| {
            v.get(k)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        for mut req in list("requests") {
            req["type"] = json!("handshake_request");
            self.on_push(&req).await;
        }
        for resp in list("responses") {
            if let Some(from) = resp
                .get("from_node_id")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
            {
                self.on_response(from, &resp).await;
            }
        }
    }
}

async fn recv_opt(rx: &mut Option<mpsc::Receiver<Value>>) -> Option<Value> {
    match rx {
        Some(r) => {
            let v = r.recv().await;
            if v.is_none() {
                *rx = None;
            }
            v
        }
        None => std::future::pending().await,
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut n = max;
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        s.truncate(n);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_reads_go_forms() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_rfc3339("2024-02-29T12:34:56.123456789+02:00"),
            Ok(1_709_202_896)
        );
        assert_eq!(format_rfc3339(1_709_210_096), "2024-02-29T12:34:56Z");
        assert_eq!(parse_rfc3339("0001-01-01T00:00:00Z"), Ok(-62_135_596_800));
        for t in [-62_135_596_800, -1, 1, 951_782_400, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Ok(t));
        }
        for bad in [
            "",
            "2024-02-29",
            "2024-13-01T00:00:00Z",
            "2024-02-29T12:34:56",
            "2024-02-29T12:34:56.Z",
            "2024-02-29T12:34:56+0200",
            "2024-02-29 12:34:56Z",
            "２024-02-29T12:34:56Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn gate_rules() {
        let g = Gate::new(false);
        g.replace([5].into_iter().collect());
        assert!(g.allows(5, 7000));
        assert!(g.allows(6, HANDSHAKE_PORT));
        assert!(!g.allows(6, 7000));
        assert!(!g.allows(6, 7));
        g.set_public(true);
        assert!(g.allows(6, 7000));
    }

    #[test]
    fn replay_cache_is_bounded() {
        let mut r = Replay::default();
        assert!(r.insert(0, "a".into()));
        assert!(!r.insert(1, "a".into()));
        assert!(r.contains(1, "a"));
        assert!(!r.contains(REPLAY_TTL, "a"));
        for i in 0..REPLAY_CAP + 10 {
            r.insert(REPLAY_TTL, i.to_string());
        }
        assert!(r.seen.len() <= REPLAY_CAP);
        assert_eq!(r.seen.len(), r.order.len());
    }

    #[test]
    fn v1_trust_file_loads_and_saves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TRUST_FILE);
        std::fs::write(
            &path,
            r#"{
  "trusted": [
    {"node_id": 7, "public_key": "k7", "approved_at": "2025-01-02T03:04:05.5+01:00", "mutual": true},
    {"node_id": 9, "public_key": "k9", "approved_at": "2025-01-02T03:04:05Z", "mutual": false, "network": 3}
  ],
  "pending": [{"node_id": 11, "justification": "hi", "received_at": "2025-01-02T03:04:05Z"}]
}"#,
        )
        .expect("write");
        let st = load(&path).expect("load");
        assert_eq!(st.trusted.len(), 2);
        assert_eq!(st.trusted[&7].approved_at, 1_735_783_445);
        assert!(st.trusted[&7].mutual);
        assert_eq!(st.trusted[&9].network, 3);
        assert_eq!(st.pending[&11].justification, "hi");
        write_atomic(&path, &render(&st).expect("render")).expect("save");
        let again = load(&path).expect("reload");
        assert_eq!(again.trusted.len(), 2);
        assert_eq!(again.pending[&11].received_at, 1_735_787_045);
        std::fs::write(&path, r#"{"trusted": null}"#).expect("write");
        assert!(load(&path).expect("null list").trusted.is_empty());
        std::fs::write(&path, b"{\"trusted\": [").expect("write");
        let e = load(&path).expect_err("corrupt");
        assert!(e.to_string().contains("trust.json"), "{e}");
        std::fs::write(
            &path,
            r#"{"trusted":[{"node_id":1,"approved_at":"yesterday"}]}"#,
        )
        .expect("write");
        assert!(load(&path).is_err());
    }
}

//! `whois` and `status`: who a node is, and what this node's tunnels carry.
//!
//! Layer: pilotctl commands over the daemon's IPC. Both are read-only: they ask the daemon for
//! [`ipc::Info`], the trust list and registry records ([`ExtRequest::Lookup`]) and change
//! nothing.
//!
//! Each command is split in two: an async part that gathers the daemon's answers, and pure
//! functions ([`whois_report`], [`whois_text`], [`status_report`], [`status_text`]) that turn
//! them into the JSON `data` and the text, so the formatting is tested without a daemon.
//!
//! Invariants:
//! - Output is deterministic: peers and connections are sorted by node ID, then connection ID.
//! - `whois` fails (`not_found`, `bad_address`, …) rather than report a node it could not
//!   look up: a service authorizes callers with it, so a partial answer must not look whole.
//! - `status` tolerates failed per-peer lookups (the hostname shows as `-`, `null` in JSON);
//!   at most [`LOOKUP_CONCURRENCY`] lookups are in flight at once.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use pilot_driver::Driver;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tunnel::ipc::{self, code, ExtRequest};
use tunnel::{ula, Addr};

use crate::commands::{decode, ext, ext_within, fmt_bytes, output, resolve, yes_no, Ctx};
use crate::parse::parse_whois;
use crate::{CtlError, Output};

/// Most registry lookups `status` has in flight at once.
pub(crate) const LOOKUP_CONCURRENCY: usize = 4;
/// Longest wait for one peer's lookup in `status`; a slower one shows as `-`.
const STATUS_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of the SHA-256 digest kept in a key fingerprint.
const FINGERPRINT_BYTES: usize = 16;
/// Connection states that no longer carry data; `status` does not count them as open. Compared
/// without case and underscores: daemons write `TIME_WAIT` or `TimeWait`.
const CLOSED_STATES: [&str; 2] = ["TIMEWAIT", "CLOSED"];

/// Whether a connection state is one of [`CLOSED_STATES`].
fn is_closed(state: &str) -> bool {
    let s: String = state
        .chars()
        .filter(|&c| c != '_')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    CLOSED_STATES.contains(&s.as_str())
}

/// The fingerprint of a standard-base64 Ed25519 public key: the first 16 bytes of SHA-256
/// over the raw 32-byte key, as 32 lowercase hex digits. `None` when the text is not a key.
pub(crate) fn key_fingerprint(public_key_b64: &str) -> Option<String> {
    let raw = tunnel::registry::auth::decode_key(public_key_b64).ok()?;
    let digest = Sha256::digest(raw);
    let mut hex = String::with_capacity(FINGERPRINT_BYTES * 2);
    for b in digest.iter().take(FINGERPRINT_BYTES) {
        let _ = write!(hex, "{b:02x}");
    }
    Some(hex)
}

/// The node ID a connection's remote address names, if it parses.
fn remote_node(c: &ipc::ConnInfo) -> Option<u32> {
    c.remote_addr.parse::<Addr>().ok().map(|a| a.node)
}

/// Whether our trust list holds a node, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct TrustState {
    /// This node trusts it (approved, mutual or through a shared network).
    pub(crate) trusted: bool,
    /// Both sides trust each other.
    pub(crate) mutual: bool,
    /// The shared network that granted trust, 0 if none.
    pub(crate) network: u16,
    /// When trust was established, Unix seconds.
    pub(crate) approved_at: Option<i64>,
}

/// How the tunnel to a peer runs, from [`ipc::Info::peer_list`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct TunnelPath {
    /// `direct` or `relayed`.
    pub(crate) path: &'static str,
    /// The peer's UDP endpoint, or the relay's.
    pub(crate) endpoint: String,
    /// Whether the tunnel is encrypted.
    pub(crate) encrypted: bool,
    /// Whether the tunnel key is signed by the peer's identity.
    pub(crate) authenticated: bool,
}

impl TunnelPath {
    fn of(p: &ipc::PeerInfo) -> Self {
        TunnelPath {
            path: if p.relay { "relayed" } else { "direct" },
            endpoint: p.endpoint.clone(),
            encrypted: p.encrypted,
            authenticated: p.authenticated,
        }
    }

    /// `direct 1.2.3.4:4000` or `relayed via 1.2.3.4:9001`.
    fn describe(&self) -> String {
        if self.path == "relayed" {
            format!("relayed via {}", self.endpoint)
        } else {
            format!("direct {}", self.endpoint)
        }
    }
}

/// One local connection to the node, from [`ipc::Info::conn_list`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ConnRef {
    /// Connection ID (`pilotctl disconnect ID`).
    pub(crate) id: u32,
    /// This node's port.
    pub(crate) local_port: u16,
    /// The node's port.
    pub(crate) remote_port: u16,
    /// State name.
    pub(crate) state: String,
    /// Payload bytes sent to the node.
    pub(crate) bytes_sent: u64,
    /// Payload bytes received from it.
    pub(crate) bytes_recv: u64,
}

/// Everything `whois` reports; its JSON form is the command's `data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct WhoisReport {
    pub(crate) node_id: u32,
    pub(crate) address: String,
    pub(crate) ula: String,
    pub(crate) hostname: Option<String>,
    /// Standard base64 of the Ed25519 key the registry holds.
    pub(crate) public_key: String,
    /// See [`key_fingerprint`]; `None` if the registry's key does not decode.
    pub(crate) key_fingerprint: Option<String>,
    /// `public` or `private`.
    pub(crate) visibility: &'static str,
    pub(crate) tags: Vec<String>,
    pub(crate) networks: Vec<u16>,
    /// The node is this one.
    #[serde(rename = "self")]
    pub(crate) is_self: bool,
    pub(crate) trust: TrustState,
    /// `None` when the node is not a tunnel peer now.
    pub(crate) tunnel: Option<TunnelPath>,
    /// The port asked about (`[ULA]:PORT`), if any.
    pub(crate) port: Option<u16>,
    /// This node's connections to the node (to `port` only, when given), by ID.
    pub(crate) connections: Vec<ConnRef>,
}

/// Builds the `whois` report from the registry record, this node's status and trust list.
pub(crate) fn whois_report(
    rec: &ipc::LookupReply,
    port: Option<u16>,
    info: &ipc::Info,
    trusted: &ipc::TrustedList,
) -> WhoisReport {
    let node = rec.node_id;
    let addr = rec.address.parse().unwrap_or(Addr::new(0, node));
    let trust = match trusted.trusted.iter().find(|t| t.node_id == node) {
        Some(t) => TrustState {
            trusted: true,
            mutual: t.mutual,
            network: t.network,
            approved_at: Some(t.approved_at),
        },
        None => TrustState {
            trusted: false,
            mutual: false,
            network: 0,
            approved_at: None,
        },
    };
    let tunnel = info
        .peer_list
        .iter()
        .find(|p| p.node_id == node)
        .map(TunnelPath::of);
    let mut connections: Vec<ConnRef> = info
        .conn_list
        .iter()
        .filter(|c| remote_node(c) == Some(node) && port.is_none_or(|p| p == c.remote_port))
        .map(|c| ConnRef {
            id: c.id,
            local_port: c.local_port,
            remote_port: c.remote_port,
            state: c.state.clone(),
            bytes_sent: c.bytes_sent,
            bytes_recv: c.bytes_recv,
        })
        .collect();
    connections.sort_by_key(|c| c.id);
    WhoisReport {
        node_id: node,
        address: addr.to_string(),
        ula: ula::to_ipv6(addr).to_string(),
        hostname: rec.hostname.clone().filter(|h| !h.is_empty()),
        public_key: rec.public_key.clone(),
        key_fingerprint: key_fingerprint(&rec.public_key),
        visibility: if rec.public { "public" } else { "private" },
        tags: rec.tags.clone(),
        networks: rec.networks.clone(),
        is_self: info.node_id == node,
        trust,
        tunnel,
        port,
        connections,
    }
}

/// The text form of a `whois` report.
pub(crate) fn whois_text(r: &WhoisReport) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "Node:         {} ({})", r.node_id, r.address);
    let _ = writeln!(t, "ULA:          {}", r.ula);
    let _ = writeln!(
        t,
        "Hostname:     {}",
        r.hostname.as_deref().unwrap_or("(none)")
    );
    let _ = writeln!(t, "Public key:   {}", r.public_key);
    let _ = writeln!(
        t,
        "Fingerprint:  {}",
        r.key_fingerprint
            .as_deref()
            .map_or("(key does not decode)".to_owned(), |f| format!(
                "sha256:{f}"
            ))
    );
    let _ = writeln!(t, "Visibility:   {}", r.visibility);
    if !r.tags.is_empty() {
        let _ = writeln!(t, "Tags:         {}", r.tags.join(", "));
    }
    let trust = if r.is_self {
        "this node".to_owned()
    } else if r.trust.trusted {
        let mut s = "trusted".to_owned();
        if r.trust.mutual {
            s.push_str(", mutual");
        }
        if r.trust.network != 0 {
            let _ = write!(s, ", through network {}", r.trust.network);
        }
        if let Some(at) = r.trust.approved_at.filter(|&at| at > 0) {
            let _ = write!(s, ", since {}", crate::commands::ago(at));
        }
        s
    } else {
        "not trusted".to_owned()
    };
    let _ = writeln!(t, "Trust:        {trust}");
    let tunnel = match (&r.tunnel, r.is_self) {
        (_, true) => "this node".to_owned(),
        (Some(p), false) => format!(
            "{}, encrypted: {}, authenticated: {}",
            p.describe(),
            yes_no(p.encrypted),
            yes_no(p.authenticated)
        ),
        (None, false) => "none (not a tunnel peer now)".to_owned(),
    };
    let _ = writeln!(t, "Tunnel:       {tunnel}");
    let what = match r.port {
        Some(p) => format!("Connections from port {p}:"),
        None => "Connections:".to_owned(),
    };
    if r.connections.is_empty() {
        let _ = writeln!(t, "{what:<14}none");
    } else {
        let _ = writeln!(t, "{what}");
        let mut rows = vec![row(["ID", "LOCAL", "REMOTE", "STATE", "SENT", "RECEIVED"])];
        for c in &r.connections {
            rows.push(vec![
                c.id.to_string(),
                c.local_port.to_string(),
                c.remote_port.to_string(),
                c.state.clone(),
                fmt_bytes(c.bytes_sent),
                fmt_bytes(c.bytes_recv),
            ]);
        }
        for line in table(&rows) {
            let _ = writeln!(t, "  {line}");
        }
    }
    t
}

pub(crate) async fn whois(ctx: &Ctx, text: &str) -> Result<Output, CtlError> {
    let q = parse_whois(text)?;
    let d = ctx.driver().await?;
    let peer = resolve(&d, &q.target).await?;
    let v = ext(
        &d,
        ExtRequest::Lookup {
            node_id: peer.node(),
        },
    )
    .await?;
    let rec: ipc::LookupReply = decode(&v)?;
    if rec.node_id != peer.node() {
        return Err(CtlError::new(
            code::BAD_REPLY,
            format!(
                "asked for node {}, the registry answered for node {}",
                peer.node(),
                rec.node_id
            ),
        ));
    }
    let (info, trusted) = tokio::join!(ext(&d, ExtRequest::Info), ext(&d, ExtRequest::TrustList));
    let info: ipc::Info = decode(&info?)?;
    let trusted: ipc::TrustedList = decode(&trusted?)?;
    let report = whois_report(&rec, q.port, &info, &trusted);
    let data = serde_json::to_value(&report)
        .map_err(|e| CtlError::new(code::INTERNAL, format!("whois report: {e}")))?;
    Ok(output(data, whois_text(&report)))
}

// ---------------------------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------------------------

/// This node, in the first line of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct StatusSelf {
    pub(crate) node_id: u32,
    pub(crate) address: String,
    pub(crate) ula: String,
    pub(crate) hostname: Option<String>,
    /// The virtual NIC when the daemon runs `pilotd up`.
    pub(crate) interface: Option<String>,
    /// How the system resolver reaches the `.pilot` answerer, or how to point it there.
    pub(crate) dns: Option<String>,
}

/// One tunnel peer in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct StatusPeer {
    pub(crate) node_id: u32,
    pub(crate) address: String,
    pub(crate) ula: String,
    /// From the registry; `None` when it has none or the lookup failed.
    pub(crate) hostname: Option<String>,
    /// `direct` or `relayed`.
    pub(crate) path: &'static str,
    pub(crate) endpoint: String,
    pub(crate) encrypted: bool,
    pub(crate) authenticated: bool,
    /// Connections to the peer not in TIME_WAIT or CLOSED.
    pub(crate) connections: usize,
    /// Payload bytes sent on every connection to the peer the daemon still lists.
    pub(crate) bytes_sent: u64,
    /// Payload bytes received on them.
    pub(crate) bytes_recv: u64,
}

/// Everything `status` reports; its JSON form is the command's `data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct StatusReport {
    #[serde(rename = "self")]
    pub(crate) me: StatusSelf,
    /// Sorted by node ID.
    pub(crate) peers: Vec<StatusPeer>,
}

/// Builds the `status` report; `names` holds the hostname found for each peer (absent or
/// `None`: unknown).
pub(crate) fn status_report(
    info: &ipc::Info,
    names: &BTreeMap<u32, Option<String>>,
) -> StatusReport {
    let own = info.address.parse().unwrap_or(Addr::new(0, info.node_id));
    let me = StatusSelf {
        node_id: info.node_id,
        address: own.to_string(),
        ula: match &info.inside {
            Some(n) if !n.ula.is_empty() => n.ula.clone(),
            _ => ula::to_ipv6(own).to_string(),
        },
        hostname: Some(info.hostname.clone()).filter(|h| !h.is_empty()),
        interface: info
            .inside
            .as_ref()
            .map(|n| n.interface.clone())
            .filter(|i| !i.is_empty()),
        dns: info
            .inside
            .as_ref()
            .map(|n| n.dns_system.clone())
            .filter(|d| !d.is_empty()),
    };
    let mut peers: Vec<StatusPeer> = info
        .peer_list
        .iter()
        .map(|p| {
            let addr = Addr::new(0, p.node_id);
            let conns = info
                .conn_list
                .iter()
                .filter(|c| remote_node(c) == Some(p.node_id));
            let (mut open, mut sent, mut recv) = (0usize, 0u64, 0u64);
            for c in conns {
                if !is_closed(&c.state) {
                    open += 1;
                }
                sent = sent.saturating_add(c.bytes_sent);
                recv = recv.saturating_add(c.bytes_recv);
            }
            let path = TunnelPath::of(p);
            StatusPeer {
                node_id: p.node_id,
                address: addr.to_string(),
                ula: ula::to_ipv6(addr).to_string(),
                hostname: names.get(&p.node_id).cloned().flatten(),
                path: path.path,
                endpoint: path.endpoint,
                encrypted: p.encrypted,
                authenticated: p.authenticated,
                connections: open,
                bytes_sent: sent,
                bytes_recv: recv,
            }
        })
        .collect();
    peers.sort_by_key(|p| p.node_id);
    peers.dedup_by_key(|p| p.node_id);
    StatusReport { me, peers }
}

/// The text form of a `status` report: this node, then a table of peers.
pub(crate) fn status_text(r: &StatusReport) -> String {
    let mut t = format!(
        "{}  {}  {}",
        r.me.ula,
        r.me.hostname.as_deref().unwrap_or("-"),
        r.me.address
    );
    if let Some(i) = &r.me.interface {
        let _ = write!(t, "  {i}");
    }
    t.push_str("  (this node)\n");
    if let Some(d) = &r.me.dns {
        let _ = writeln!(t, "# DNS: {d}");
    }
    if r.peers.is_empty() {
        t.push_str("No tunnel peers\n");
        return t;
    }
    let mut rows = vec![row([
        "ULA",
        "HOSTNAME",
        "ADDRESS",
        "PATH",
        "ENCRYPTED",
        "CONNS",
        "SENT",
        "RECEIVED",
    ])];
    for p in &r.peers {
        let path = if p.path == "relayed" {
            format!("relay {}", p.endpoint)
        } else {
            format!("direct {}", p.endpoint)
        };
        rows.push(vec![
            p.ula.clone(),
            p.hostname.clone().unwrap_or_else(|| "-".to_owned()),
            p.address.clone(),
            path,
            yes_no(p.encrypted).to_owned(),
            p.connections.to_string(),
            fmt_bytes(p.bytes_sent),
            fmt_bytes(p.bytes_recv),
        ]);
    }
    for line in table(&rows) {
        let _ = writeln!(t, "{line}");
    }
    t
}

pub(crate) async fn status(ctx: &Ctx) -> Result<Output, CtlError> {
    let d = ctx.driver().await?;
    let v = ext(&d, ExtRequest::Info).await?;
    let info: ipc::Info = decode(&v)?;
    let mut ids: Vec<u32> = info.peer_list.iter().map(|p| p.node_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let names = hostnames(&d, &ids).await;
    let report = status_report(&info, &names);
    let data = serde_json::to_value(&report)
        .map_err(|e| CtlError::new(code::INTERNAL, format!("status report: {e}")))?;
    Ok(output(data, status_text(&report)))
}

/// The registry hostname of each node, at most [`LOOKUP_CONCURRENCY`] lookups at a time; a
/// failed or slow lookup gives `None`.
async fn hostnames(d: &Driver, ids: &[u32]) -> BTreeMap<u32, Option<String>> {
    let permits = Arc::new(tokio::sync::Semaphore::new(LOOKUP_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for &node_id in ids {
        let d = d.clone();
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.ok();
            let name = ext_within(&d, ExtRequest::Lookup { node_id }, STATUS_LOOKUP_TIMEOUT)
                .await
                .ok()
                .and_then(|v| decode::<ipc::LookupReply>(&v).ok())
                .and_then(|r| r.hostname)
                .filter(|h| !h.is_empty());
            (node_id, name)
        });
    }
    let mut names = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok((node, name)) = done {
            names.insert(node, name);
        }
    }
    names
}

// ---------------------------------------------------------------------------------------------
// Text tables
// ---------------------------------------------------------------------------------------------

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// Rows as lines with left-aligned columns two spaces apart; the last column is not padded.
fn table(rows: &[Vec<String>]) -> Vec<String> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|r| {
            let mut line = String::new();
            for (i, cell) in r.iter().enumerate() {
                if i + 1 == r.len() {
                    line.push_str(cell);
                } else {
                    let w = widths.get(i).copied().unwrap_or(0);
                    let _ = write!(line, "{cell:<w$}  ");
                }
            }
            line
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::{json, Value};

    fn json_of<T: Serialize>(v: &T) -> Value {
        serde_json::to_value(v).unwrap()
    }

    /// A key that decodes, standard base64.
    fn key() -> String {
        tunnel::registry::auth::b64(&ed25519_seed_key())
    }

    /// The public key of a fixed identity, computed by the tunnel crate.
    fn ed25519_seed_key() -> [u8; 32] {
        tunnel::identity::Identity::from_seed(&[7u8; 32])
            .public_key()
            .to_bytes()
    }

    fn record(node: u32, hostname: Option<&str>) -> ipc::LookupReply {
        ipc::LookupReply {
            node_id: node,
            address: Addr::new(0, node).to_string(),
            networks: vec![0],
            public_key: key(),
            public: false,
            hostname: hostname.map(str::to_owned),
            tags: vec!["gpu".into()],
            task_exec: false,
            real_addr: None,
        }
    }

    fn conn(id: u32, node: u32, local: u16, remote: u16, state: &str) -> ipc::ConnInfo {
        ipc::ConnInfo {
            id,
            local_port: local,
            remote_addr: Addr::new(0, node).to_string(),
            remote_port: remote,
            state: state.into(),
            bytes_sent: u64::from(id) * 100,
            bytes_recv: u64::from(id) * 10,
            ..ipc::ConnInfo::default()
        }
    }

    fn info() -> ipc::Info {
        ipc::Info {
            node_id: 5,
            address: Addr::new(0, 5).to_string(),
            hostname: "me".into(),
            peer_list: vec![
                ipc::PeerInfo {
                    node_id: 42,
                    endpoint: "127.0.0.1:4000".into(),
                    encrypted: true,
                    authenticated: true,
                    relay: false,
                },
                ipc::PeerInfo {
                    node_id: 9,
                    endpoint: "10.0.0.1:9001".into(),
                    encrypted: true,
                    authenticated: false,
                    relay: true,
                },
            ],
            conn_list: vec![
                conn(3, 42, 80, 51234, "ESTABLISHED"),
                conn(1, 42, 80, 51000, "TimeWait"),
                conn(2, 42, 1000, 51234, "ESTABLISHED"),
                conn(4, 9, 7, 49152, "SYN_SENT"),
            ],
            ..ipc::Info::default()
        }
    }

    #[test]
    fn closed_states_in_either_spelling() {
        for s in ["TIME_WAIT", "TimeWait", "CLOSED", "Closed"] {
            assert!(is_closed(s), "{s}");
        }
        for s in ["ESTABLISHED", "Established", "SYN_SENT", "FinWait1", ""] {
            assert!(!is_closed(s), "{s}");
        }
    }

    #[test]
    fn fingerprints_are_sha256_prefixes_of_the_raw_key() {
        let raw = ed25519_seed_key();
        let f = key_fingerprint(&key()).unwrap();
        assert_eq!(f.len(), 32);
        let digest = Sha256::digest(raw);
        let want: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(f, want);
        assert_eq!(key_fingerprint("not base64!"), None);
        assert_eq!(key_fingerprint(""), None);
    }

    #[test]
    fn whois_picks_trust_tunnel_and_the_connections_from_the_port() {
        let trusted = ipc::TrustedList {
            trusted: vec![ipc::TrustedEntry {
                node_id: 42,
                public_key: key(),
                approved_at: 1_700_000_000,
                mutual: true,
                network: 0,
            }],
        };
        let r = whois_report(&record(42, Some("alice")), Some(51234), &info(), &trusted);
        assert_eq!(r.node_id, 42);
        assert_eq!(r.ula, ula::to_ipv6(Addr::new(0, 42)).to_string());
        assert_eq!(r.hostname.as_deref(), Some("alice"));
        assert!(r.trust.trusted && r.trust.mutual);
        assert!(!r.is_self);
        let t = r.tunnel.as_ref().unwrap();
        assert_eq!((t.path, t.endpoint.as_str()), ("direct", "127.0.0.1:4000"));
        let ids: Vec<u32> = r.connections.iter().map(|c| c.id).collect();
        assert_eq!(ids, [2, 3]);

        let v = json_of(&r);
        assert_eq!(v["visibility"], "private");
        assert_eq!(v["self"], false);
        assert_eq!(v["trust"]["approved_at"], 1_700_000_000);
        assert_eq!(v["connections"][0]["local_port"], 1000);
        assert_eq!(v["port"], 51234);

        let text = whois_text(&r);
        assert!(text.contains("Hostname:     alice\n"), "{text}");
        assert!(
            text.contains("Trust:        trusted, mutual, since"),
            "{text}"
        );
        assert!(text.contains("direct 127.0.0.1:4000"), "{text}");
        assert!(text.contains("Connections from port 51234:\n"), "{text}");
        let table_ids: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("Connections"))
            .skip(2)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(table_ids, ["2", "3"]);
    }

    #[test]
    fn whois_of_an_untrusted_node_that_is_no_peer() {
        let r = whois_report(
            &record(77, None),
            None,
            &info(),
            &ipc::TrustedList::default(),
        );
        assert!(!r.trust.trusted);
        assert_eq!(r.trust.approved_at, None);
        assert_eq!(r.tunnel, None);
        assert!(r.connections.is_empty());
        let v = json_of(&r);
        assert_eq!(v["hostname"], Value::Null);
        assert_eq!(v["tunnel"], Value::Null);
        assert_eq!(v["connections"], json!([]));
        let text = whois_text(&r);
        assert!(text.contains("Trust:        not trusted\n"), "{text}");
        assert!(text.contains("Tunnel:       none"), "{text}");
        assert!(text.contains("Connections:  none\n"), "{text}");

        // Without a port, every connection to the node counts; this node is itself.
        let all = whois_report(&record(42, None), None, &info(), &Default::default());
        assert_eq!(all.connections.len(), 3);
        let me = whois_report(&record(5, Some("me")), None, &info(), &Default::default());
        assert!(me.is_self);
        assert!(whois_text(&me).contains("Trust:        this node\n"));
    }

    #[test]
    fn status_sorts_peers_and_sums_their_connections() {
        let mut names = BTreeMap::new();
        names.insert(42, Some("alice".to_owned()));
        names.insert(9, None);
        let r = status_report(&info(), &names);
        assert_eq!(r.me.node_id, 5);
        assert_eq!(r.me.interface, None);
        let ids: Vec<u32> = r.peers.iter().map(|p| p.node_id).collect();
        assert_eq!(ids, [9, 42]);
        let alice = &r.peers[1];
        // Connections 1 (TIME_WAIT, not open), 2 and 3.
        assert_eq!(alice.connections, 2);
        assert_eq!(alice.bytes_sent, 100 + 200 + 300);
        assert_eq!(alice.bytes_recv, 10 + 20 + 30);
        assert_eq!(r.peers[0].path, "relayed");
        assert_eq!(r.peers[0].connections, 1);

        let v = json_of(&r);
        assert_eq!(v["self"]["hostname"], "me");
        assert_eq!(v["peers"][0]["hostname"], Value::Null);
        assert_eq!(v["peers"][1]["hostname"], "alice");

        let text = status_text(&r);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with(&ula::to_ipv6(Addr::new(0, 5)).to_string()));
        assert!(lines[0].ends_with("(this node)"));
        assert!(lines[1].starts_with("ULA"));
        assert!(lines[2].contains(" - ") && lines[2].contains("relay 10.0.0.1:9001"));
        assert!(lines[3].contains("alice") && lines[3].contains("direct 127.0.0.1:4000"));
        // Columns line up: every row's HOSTNAME cell starts at the same offset.
        let col = lines[1].find("HOSTNAME").unwrap();
        assert_eq!(&lines[3][col..col + 5], "alice");
    }

    #[test]
    fn status_with_a_virtual_nic_and_no_peers() {
        let mut i = info();
        i.peer_list.clear();
        i.inside = Some(ipc::InsideInfo {
            interface: "pilot0".into(),
            ula: "fd06:3fcd:b33d::5".into(),
            ..ipc::InsideInfo::default()
        });
        let r = status_report(&i, &BTreeMap::new());
        assert_eq!(r.me.interface.as_deref(), Some("pilot0"));
        assert!(r.peers.is_empty());
        assert_eq!(
            status_text(&r),
            "fd06:3fcd:b33d::5  me  0:0000.0000.0005  pilot0  (this node)\nNo tunnel peers\n"
        );
        if let Some(n) = i.inside.as_mut() {
            n.dns_system = "not configured (--dns=off): point a resolver at it".into();
        }
        let r = status_report(&i, &BTreeMap::new());
        assert_eq!(
            status_text(&r),
            "fd06:3fcd:b33d::5  me  0:0000.0000.0005  pilot0  (this node)\n\
             # DNS: not configured (--dns=off): point a resolver at it\nNo tunnel peers\n"
        );
    }
}

//! Durable registry state behind the [`Store`] trait.
//!
//! The registry keeps its working state in memory and writes every acknowledged change as a
//! small [`Mutation`] (one record upserted or deleted), never a whole snapshot, so a change costs
//! O(1) whatever the registry's size. A batch of mutations commits atomically; the server
//! replies only after the commit returns. Liveness (heartbeats) is never stored.
//!
//! [`RedbStore`] is the embedded implementation (one file, copy-on-write B-trees, fsync on
//! commit), and the default. [`pg::PgStore`] keeps the same records in relational PostgreSQL
//! tables (one registry instance per database for now).
//!
//! ```text
//! table        key                         value
//! nodes        node id (u32)               NodeRecord (JSON)
//! networks     network id (u16)            NetworkRecord (JSON)
//! members      network << 32 | node        ()
//! invites      network << 32 | node        inviter (u32)
//! consents     from << 32 | to             unix seconds (u64)
//! inbox        target << 32 | requester    InboxEntry (JSON)
//! responses    requester << 32 | responder ResponseEntry (JSON)
//! meta         "next_node" | "next_net"    u64
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

pub mod pg;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine reported an error.
    #[error("store: {0}")]
    Backend(String),
    /// A stored record does not decode.
    #[error("store: corrupt record in table {table} key {key}: {reason}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// Key.
        key: u64,
        /// Why.
        reason: String,
    },
    /// PostgreSQL refused or failed an operation. `target` names the database without its
    /// password.
    #[error("store {target}: {context}: {reason}")]
    Postgres {
        /// The database, as `postgresql://USER@HOST:PORT/DB`.
        target: String,
        /// What the store was doing.
        context: &'static str,
        /// The error PostgreSQL or the client reported.
        reason: String,
    },
}

fn backend<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Backend(e.into().to_string())
}

/// How a network admits members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinRule {
    /// Anyone may join.
    Open,
    /// Joining needs the network's token.
    Token,
    /// Joining needs an invitation from a member.
    Invite,
}

impl JoinRule {
    /// Parses the v1 spelling.
    pub fn parse(s: &str) -> Option<JoinRule> {
        match s {
            "open" | "" => Some(JoinRule::Open),
            "token" => Some(JoinRule::Token),
            "invite" => Some(JoinRule::Invite),
            _ => None,
        }
    }

    /// The v1 spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JoinRule::Open => "open",
            JoinRule::Token => "token",
            JoinRule::Invite => "invite",
        }
    }
}

/// Everything durable about one node. Deregistered and reaped nodes keep a record with
/// `active = false`, so the same key gets the same ID back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node ID.
    pub id: u32,
    /// Ed25519 public key.
    #[serde(with = "key_b64")]
    pub public_key: [u8; 32],
    /// Owner string, if given at registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The node's tunnel endpoint as the registry saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub real_addr: Option<SocketAddr>,
    /// Visible to everyone.
    #[serde(default)]
    pub public: bool,
    /// Hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Reputation.
    #[serde(default)]
    pub polo_score: i64,
    /// Advertises task execution.
    #[serde(default)]
    pub task_exec: bool,
    /// Has authenticated with a fresh challenge; its v1 fixed-string signatures are refused
    /// from then on.
    #[serde(default)]
    pub session_auth: bool,
    /// Registered (not deregistered or reaped).
    pub active: bool,
}

/// A network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// Network ID (0 is the backbone).
    pub id: u16,
    /// Unique name.
    pub name: String,
    /// Admission rule.
    pub join_rule: JoinRule,
    /// Join token for [`JoinRule::Token`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Unix seconds.
    pub created: u64,
    /// Creating node (0 for the backbone and imported networks).
    #[serde(default)]
    pub creator: u32,
}

/// A trust request waiting in its target's inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    /// Why the requester asks.
    pub justification: String,
    /// Unix seconds.
    pub timestamp: u64,
}

/// An answer waiting in the requester's inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseEntry {
    /// Accepted.
    pub accept: bool,
    /// Unix seconds.
    pub timestamp: u64,
}

/// One durable change. `None` deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Upserts a node.
    Node(NodeRecord),
    /// Upserts a network.
    Network(NetworkRecord),
    /// Adds (`true`) or removes a membership.
    Member {
        /// Network.
        net: u16,
        /// Node.
        node: u32,
        /// Present.
        present: bool,
    },
    /// Records or consumes an invitation.
    Invite {
        /// Network.
        net: u16,
        /// Invited node.
        node: u32,
        /// Inviting member.
        inviter: Option<u32>,
    },
    /// Records or withdraws one side's consent to a trust pair.
    Consent {
        /// Consenting node.
        from: u32,
        /// Trusted node.
        to: u32,
        /// Unix seconds of consent.
        at: Option<u64>,
    },
    /// Puts or removes a pending trust request.
    Inbox {
        /// Target.
        target: u32,
        /// Requester.
        from: u32,
        /// The request.
        entry: Option<InboxEntry>,
    },
    /// Puts or removes an answer for a requester.
    Response {
        /// Requester.
        requester: u32,
        /// Responder.
        responder: u32,
        /// The answer.
        entry: Option<ResponseEntry>,
    },
    /// The next node ID to hand out.
    NextNode(u32),
    /// The next network ID to hand out (u32 so exhaustion past 65535 is representable).
    NextNet(u32),
}

/// Everything a store holds, as loaded at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Nodes by ID.
    pub nodes: BTreeMap<u32, NodeRecord>,
    /// Networks by ID (without the backbone unless stored).
    pub networks: BTreeMap<u16, NetworkRecord>,
    /// Memberships (network, node).
    pub members: Vec<(u16, u32)>,
    /// Invitations (network, node) -> inviter.
    pub invites: BTreeMap<(u16, u32), u32>,
    /// Consents (from, to) -> unix seconds.
    pub consents: BTreeMap<(u32, u32), u64>,
    /// Pending requests (target, requester).
    pub inbox: BTreeMap<(u32, u32), InboxEntry>,
    /// Pending answers (requester, responder).
    pub responses: BTreeMap<(u32, u32), ResponseEntry>,
    /// Next node ID (0 when never stored).
    pub next_node: u32,
    /// Next network ID (0 when never stored).
    pub next_net: u32,
}

impl Snapshot {
    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.networks.is_empty() && self.next_node == 0
    }
}

/// Durable storage for the registry. `commit` applies a batch atomically and returns only
/// once it is durable.
pub trait Store: Send + 'static {
    /// Everything stored.
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// Applies `batch` atomically and durably.
    fn commit(&mut self, batch: &[Mutation]) -> Result<(), StoreError>;
}

const NODES: TableDefinition<u32, &[u8]> = TableDefinition::new("nodes");
const NETWORKS: TableDefinition<u16, &[u8]> = TableDefinition::new("networks");
const MEMBERS: TableDefinition<u64, ()> = TableDefinition::new("members");
const INVITES: TableDefinition<u64, u32> = TableDefinition::new("invites");
const CONSENTS: TableDefinition<u64, u64> = TableDefinition::new("consents");
const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("inbox");
const RESPONSES: TableDefinition<u64, &[u8]> = TableDefinition::new("responses");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

fn pair(hi: u32, lo: u32) -> u64 {
    (u64::from(hi) << 32) | u64::from(lo)
}

fn split(k: u64) -> (u32, u32) {
    ((k >> 32) as u32, k as u32)
}

/// The embedded store: one redb file (or memory, for tests).
pub struct RedbStore {
    db: redb::Database,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens or creates the store file at `path`.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Backend(format!("{}: {e}", dir.display())))?;
        }
        let db = redb::Database::create(path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        RedbStore::init(db)
    }

    /// A store that lives in memory only.
    pub fn in_memory() -> Result<RedbStore, StoreError> {
        let db = redb::Builder::new()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(backend)?;
        RedbStore::init(db)
    }

    fn init(db: redb::Database) -> Result<RedbStore, StoreError> {
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(NODES).map_err(backend)?;
        txn.open_table(NETWORKS).map_err(backend)?;
        txn.open_table(MEMBERS).map_err(backend)?;
        txn.open_table(INVITES).map_err(backend)?;
        txn.open_table(CONSENTS).map_err(backend)?;
        txn.open_table(INBOX).map_err(backend)?;
        txn.open_table(RESPONSES).map_err(backend)?;
        txn.open_table(META).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(RedbStore { db })
    }
}

fn decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    key: u64,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table,
        key,
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // The record types serialize infallibly (no maps with non-string keys, no custom errors).
    serde_json::to_vec(v).unwrap_or_default()
}

impl Store for RedbStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let mut s = Snapshot::default();
        for e in txn
            .open_table(NODES)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (k, v) = e.map_err(backend)?;
            let rec: NodeRecord = decode("nodes", k.value().into(), v.value())?;
            s.nodes.insert(k.value(), rec);
        }
        for e in txn
            .open_table(NETWORKS)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (k, v) = e.map_err(backend)?;
            let rec: NetworkRecord = decode("networks", k.value().into(), v.value())?;
            s.networks.insert(k.value(), rec);
        }
        for e in txn
            .open_table(MEMBERS)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (k, _) = e.map_err(backend)?;
            let (net, node) = split(k.value());
            s.members.push((net as u16, node));
        }
        for e in txn
            .open_table(INVITES)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (k, v) = e.map_err(backend)?;
            let (net, node) = split(k.value());
            s.invites.insert((net as u16, node), v.value());
        }
        for e in txn
            .open_table(CONSENTS)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (k, v) = e.map_err(backend)?;
            s.consents.insert(split(k.value()), v.value());
        }
        for e in txn
            .open_table(INBOX)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (k, v) = e.map_err(backend)?;
            s.inbox
                .insert(split(k.value()), decode("inbox", k.value(), v.value())?);
        }
        for e in txn
            .open_table(RESPONSES)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (k, v) = e.map_err(backend)?;
            s.responses
                .insert(split(k.value()), decode("responses", k.value(), v.value())?);
        }
        let meta = txn.open_table(META).map_err(backend)?;
        if let Some(v) = meta.get("next_node").map_err(backend)? {
            s.next_node = u32::try_from(v.value()).unwrap_or(u32::MAX);
        }
        if let Some(v) = meta.get("next_net").map_err(backend)? {
            s.next_net = u32::try_from(v.value()).unwrap_or(u32::MAX);
        }
        Ok(s)
    }

    fn commit(&mut self, batch: &[Mutation]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut nodes = txn.open_table(NODES).map_err(backend)?;
            let mut networks = txn.open_table(NETWORKS).map_err(backend)?;
            let mut members = txn.open_table(MEMBERS).map_err(backend)?;
            let mut invites = txn.open_table(INVITES).map_err(backend)?;
            let mut consents = txn.open_table(CONSENTS).map_err(backend)?;
            let mut inbox = txn.open_table(INBOX).map_err(backend)?;
            let mut responses = txn.open_table(RESPONSES).map_err(backend)?;
            let mut meta = txn.open_table(META).map_err(backend)?;
            for m in batch {
                match m {
                    Mutation::Node(r) => {
                        nodes.insert(r.id, encode(r).as_slice()).map_err(backend)?;
                    }
                    Mutation::Network(r) => {
                        networks
                            .insert(r.id, encode(r).as_slice())
                            .map_err(backend)?;
                    }
                    Mutation::Member { net, node, present } => {
                        let k = pair((*net).into(), *node);
                        if *present {
                            members.insert(k, ()).map_err(backend)?;
                        } else {
                            members.remove(k).map_err(backend)?;
                        }
                    }
                    Mutation::Invite { net, node, inviter } => {
                        let k = pair((*net).into(), *node);
                        match inviter {
                            Some(i) => invites.insert(k, *i).map(drop),
                            None => invites.remove(k).map(drop),
                        }
                        .map_err(backend)?;
                    }
                    Mutation::Consent { from, to, at } => {
                        let k = pair(*from, *to);
                        match at {
                            Some(t) => consents.insert(k, *t).map(drop),
                            None => consents.remove(k).map(drop),
                        }
                        .map_err(backend)?;
                    }
                    Mutation::Inbox {
                        target,
                        from,
                        entry,
                    } => {
                        let k = pair(*target, *from);
                        match entry {
                            Some(e) => inbox.insert(k, encode(e).as_slice()).map(drop),
                            None => inbox.remove(k).map(drop),
                        }
                        .map_err(backend)?;
                    }
                    Mutation::Response {
                        requester,
                        responder,
                        entry,
                    } => {
                        let k = pair(*requester, *responder);
                        match entry {
                            Some(e) => responses.insert(k, encode(e).as_slice()).map(drop),
                            None => responses.remove(k).map(drop),
                        }
                        .map_err(backend)?;
                    }
                    Mutation::NextNode(n) => {
                        meta.insert("next_node", u64::from(*n)).map_err(backend)?;
                    }
                    Mutation::NextNet(n) => {
                        meta.insert("next_net", u64::from(*n)).map_err(backend)?;
                    }
                }
            }
        }
        txn.commit().map_err(backend)
    }
}

mod key_b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(k))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        crate::auth::decode_key(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u32) -> NodeRecord {
        NodeRecord {
            id,
            public_key: ed25519_dalek::SigningKey::from_bytes(&[id as u8; 32])
                .verifying_key()
                .to_bytes(),
            owner: None,
            real_addr: Some("192.0.2.1:4000".parse().unwrap()),
            public: false,
            hostname: Some(format!("n{id}")),
            tags: vec!["a".into()],
            polo_score: -3,
            task_exec: true,
            session_auth: false,
            active: true,
        }
    }

    #[test]
    fn every_mutation_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/registry.redb");
        let mut st = RedbStore::open(&path).unwrap();
        assert!(st.load().unwrap().is_empty());
        let net = NetworkRecord {
            id: 3,
            name: "lab".into(),
            join_rule: JoinRule::Token,
            token: Some("secret".into()),
            created: 10,
            creator: 1,
        };
        st.commit(&[
            Mutation::Node(node(1)),
            Mutation::Node(node(2)),
            Mutation::Network(net.clone()),
            Mutation::Member {
                net: 3,
                node: 1,
                present: true,
            },
            Mutation::Member {
                net: 3,
                node: 2,
                present: true,
            },
            Mutation::Invite {
                net: 3,
                node: 2,
                inviter: Some(1),
            },
            Mutation::Consent {
                from: 1,
                to: 2,
                at: Some(5),
            },
            Mutation::Inbox {
                target: 2,
                from: 1,
                entry: Some(InboxEntry {
                    justification: "hi".into(),
                    timestamp: 6,
                }),
            },
            Mutation::Response {
                requester: 1,
                responder: 2,
                entry: Some(ResponseEntry {
                    accept: true,
                    timestamp: 7,
                }),
            },
            Mutation::NextNode(3),
            Mutation::NextNet(4),
        ])
        .unwrap();
        st.commit(&[Mutation::Member {
            net: 3,
            node: 2,
            present: false,
        }])
        .unwrap();
        drop(st);
        let s = RedbStore::open(&path).unwrap().load().unwrap();
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.nodes[&1], node(1));
        assert_eq!(s.networks[&3], net);
        assert_eq!(s.members, vec![(3, 1)]);
        assert_eq!(s.invites[&(3, 2)], 1);
        assert_eq!(s.consents[&(1, 2)], 5);
        assert_eq!(s.inbox[&(2, 1)].justification, "hi");
        assert!(s.responses[&(1, 2)].accept);
        assert_eq!((s.next_node, s.next_net), (3, 4));
    }
}

//! One-shot import of a v1 registry snapshot (`-store` JSON, wire §4.7) into a [`Store`].
//!
//! v1 trust pairs were created by one side alone; an imported pair becomes two consents, so
//! pairs that existed keep working. Entries that do not validate (bad keys, bad names) are
//! skipped and counted, never fatal. Timestamps of pending requests become the import time.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Deserialize;

use crate::auth::decode_key;
use crate::names::{normalize_tags, validate_hostname, validate_network_name};
use crate::store::{
    InboxEntry, JoinRule, Mutation, NetworkRecord, NodeRecord, ResponseEntry, Store, StoreError,
};

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file is not a v1 snapshot.
    #[error("not a v1 registry snapshot: {0}")]
    Format(#[from] serde_json::Error),
    /// The store already holds state.
    #[error("the store is not empty; import only into a new store")]
    NotEmpty,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Nodes imported (active).
    pub nodes: usize,
    /// Key-index entries imported as inactive nodes.
    pub inactive_nodes: usize,
    /// Networks imported.
    pub networks: usize,
    /// Trust pairs imported.
    pub trust_pairs: usize,
    /// Pending requests and answers imported.
    pub handshakes: usize,
    /// Entries skipped as invalid.
    pub skipped: usize,
}

#[derive(Deserialize)]
struct V1Snapshot {
    #[serde(default)]
    next_node: u32,
    #[serde(default)]
    next_net: u32,
    #[serde(default)]
    nodes: BTreeMap<String, V1Node>,
    #[serde(default)]
    networks: BTreeMap<String, V1Network>,
    #[serde(default)]
    trust_pairs: Option<Vec<String>>,
    #[serde(default)]
    pub_key_idx: Option<BTreeMap<String, u32>>,
    #[serde(default)]
    handshake_inbox: Option<BTreeMap<String, Vec<V1Request>>>,
    #[serde(default)]
    handshake_responses: Option<BTreeMap<String, Vec<V1Response>>>,
}

#[derive(Deserialize)]
struct V1Node {
    id: u32,
    #[serde(default)]
    owner: Option<String>,
    public_key: String,
    #[serde(default)]
    real_addr: Option<String>,
    #[serde(default)]
    networks: Option<Vec<u16>>,
    #[serde(default)]
    public: bool,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    polo_score: i64,
    #[serde(default)]
    task_exec: bool,
}

#[derive(Deserialize)]
struct V1Network {
    id: u16,
    name: String,
    #[serde(default)]
    join_rule: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    members: Option<Vec<u32>>,
}

#[derive(Deserialize)]
struct V1Request {
    from_node_id: u32,
    #[serde(default)]
    justification: String,
}

#[derive(Deserialize)]
struct V1Response {
    from_node_id: u32,
    accept: bool,
}

/// Converts a v1 snapshot into mutations for an empty store.
pub fn v1_mutations(json: &[u8], unix: u64) -> Result<(Vec<Mutation>, ImportReport), ImportError> {
    let snap: V1Snapshot = serde_json::from_slice(json)?;
    let mut rep = ImportReport::default();
    let mut out = Vec::new();
    let mut keys = HashMap::new();
    let mut hostnames = BTreeSet::new();
    let mut members = BTreeSet::new();
    let mut max_node = 0u32;
    for n in snap.nodes.into_values() {
        let Ok(key) = decode_key(&n.public_key) else {
            rep.skipped += 1;
            continue;
        };
        if n.id == 0 || keys.insert(key, n.id).is_some() {
            rep.skipped += 1;
            continue;
        }
        let hostname = n
            .hostname
            .filter(|h| validate_hostname(h).is_ok() && hostnames.insert(h.clone()));
        for net in n.networks.unwrap_or_default() {
            if net != 0 {
                members.insert((net, n.id));
            }
        }
        max_node = max_node.max(n.id);
        out.push(Mutation::Node(NodeRecord {
            id: n.id,
            public_key: key,
            owner: n.owner.filter(|o| !o.is_empty()),
            real_addr: n.real_addr.and_then(|a| a.parse().ok()),
            public: n.public,
            hostname,
            tags: normalize_tags(&n.tags.unwrap_or_default()).unwrap_or_default(),
            polo_score: n.polo_score,
            task_exec: n.task_exec,
            session_auth: false,
            active: true,
        }));
        rep.nodes += 1;
    }
    let active: BTreeSet<u32> = keys.values().copied().collect();
    for (k, id) in snap.pub_key_idx.unwrap_or_default() {
        let Ok(key) = decode_key(&k) else {
            rep.skipped += 1;
            continue;
        };
        if keys.contains_key(&key) || active.contains(&id) || id == 0 {
            continue;
        }
        keys.insert(key, id);
        max_node = max_node.max(id);
        out.push(Mutation::Node(NodeRecord {
            id,
            public_key: key,
            owner: None,
            real_addr: None,
            public: false,
            hostname: None,
            tags: Vec::new(),
            polo_score: 0,
            task_exec: false,
            session_auth: false,
            active: false,
        }));
        rep.inactive_nodes += 1;
    }
    let mut max_net = 0u16;
    for n in snap.networks.into_values() {
        if n.id == 0 {
            continue;
        }
        let Some(rule) = JoinRule::parse(&n.join_rule) else {
            rep.skipped += 1;
            continue;
        };
        if validate_network_name(&n.name).is_err() {
            rep.skipped += 1;
            continue;
        }
        max_net = max_net.max(n.id);
        for m in n.members.unwrap_or_default() {
            members.insert((n.id, m));
        }
        out.push(Mutation::Network(NetworkRecord {
            id: n.id,
            name: n.name,
            join_rule: rule,
            token: n.token.filter(|t| !t.is_empty()),
            created: unix,
            creator: 0,
        }));
        rep.networks += 1;
    }
    let nets: BTreeSet<u16> = out
        .iter()
        .filter_map(|m| match m {
            Mutation::Network(r) => Some(r.id),
            _ => None,
        })
        .collect();
    for (net, node) in members {
        if nets.contains(&net) && active.contains(&node) {
            out.push(Mutation::Member {
                net,
                node,
                present: true,
            });
        }
    }
    let known: BTreeSet<u32> = keys.values().copied().collect();
    for p in snap.trust_pairs.unwrap_or_default() {
        let parsed = p
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
        match parsed {
            Some((a, b)) if a != b && known.contains(&a) && known.contains(&b) => {
                out.push(Mutation::Consent {
                    from: a,
                    to: b,
                    at: Some(unix),
                });
                out.push(Mutation::Consent {
                    from: b,
                    to: a,
                    at: Some(unix),
                });
                rep.trust_pairs += 1;
            }
            _ => rep.skipped += 1,
        }
    }
    for (target, reqs) in snap.handshake_inbox.unwrap_or_default() {
        let Ok(target) = target.parse::<u32>() else {
            rep.skipped += 1;
            continue;
        };
        for r in reqs {
            let from = r.from_node_id;
            if from == target
                || !known.contains(&from)
                || !known.contains(&target)
                || r.justification.len() > crate::state::MAX_JUSTIFICATION
            {
                rep.skipped += 1;
                continue;
            }
            // Asking is consenting: the pair forms if the target accepts after the import.
            out.push(Mutation::Consent {
                from,
                to: target,
                at: Some(unix),
            });
            out.push(Mutation::Inbox {
                target,
                from: r.from_node_id,
                entry: Some(InboxEntry {
                    justification: r.justification,
                    timestamp: unix,
                }),
            });
            rep.handshakes += 1;
        }
    }
    for (requester, resps) in snap.handshake_responses.unwrap_or_default() {
        let Ok(requester) = requester.parse::<u32>() else {
            rep.skipped += 1;
            continue;
        };
        for r in resps {
            if !known.contains(&r.from_node_id) || !known.contains(&requester) {
                rep.skipped += 1;
                continue;
            }
            out.push(Mutation::Response {
                requester,
                responder: r.from_node_id,
                entry: Some(ResponseEntry {
                    accept: r.accept,
                    timestamp: unix,
                }),
            });
            rep.handshakes += 1;
        }
    }
    out.push(Mutation::NextNode(
        snap.next_node.max(max_node.saturating_add(1)).max(1),
    ));
    out.push(Mutation::NextNet(
        snap.next_net.max(u32::from(max_net) + 1).max(1),
    ));
    Ok((out, rep))
}

/// Imports a v1 snapshot into an empty store in one transaction.
pub fn import_v1(
    store: &mut dyn Store,
    json: &[u8],
    unix: u64,
) -> Result<ImportReport, ImportError> {
    if !store.load()?.is_empty() {
        return Err(ImportError::NotEmpty);
    }
    let (muts, rep) = v1_mutations(json, unix)?;
    store.commit(&muts)?;
    Ok(rep)
}

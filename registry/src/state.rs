//! The registry's rules, over its in-memory state. No I/O and no clock: the server passes the
//! time in, applies the returned [`Outcome`]: commits its mutations before replying, sends its
//! pushes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;

use serde_json::{json, Value};
use tunnel::Addr;

use crate::auth::{b64, decode_key};
use crate::dashboard::{Edge, Limits, NetworkStats, NodeStats, Stats};
use crate::names::{default_hostname, normalize_tags, validate_hostname, validate_network_name};
use crate::proto::{Request, MAX_INSTANCE};
use crate::store::{
    InboxEntry, JoinRule, Mutation, NetworkRecord, NodeRecord, ResponseEntry, Snapshot,
};

/// A node is stale after this long without a heartbeat (v1: 3 minutes).
pub const STALE_MS: u64 = 180_000;
/// Beacon announcements live this long (v1: 60 s).
pub const BEACON_TTL_MS: u64 = 60_000;
/// Most beacons remembered.
pub const MAX_BEACONS: usize = 1024;
/// Most pending trust requests one node may have out at once, across all targets.
pub const MAX_OUTSTANDING_REQUESTS: usize = 64;
/// Most pending trust requests in one target's inbox.
pub const MAX_INBOX: usize = 1024;
/// Longest justification kept.
pub const MAX_JUSTIFICATION: usize = 1024;
/// Longest owner string kept.
pub const MAX_OWNER: usize = 256;
/// Longest network join token.
pub const MAX_TOKEN: usize = 256;
/// Highest node ID handed out (0xFFFF_FFFF is the broadcast node).
pub const MAX_NODE_ID: u32 = 0xFFFF_FFFE;

/// A `register` request's fields.
struct Registration<'a> {
    listen_addr: &'a str,
    public_key: &'a str,
    owner: Option<String>,
    hostname: Option<String>,
    instance: Option<&'a str>,
}

/// Stable error codes, sent as `code` next to v1's `error` string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Malformed or invalid request.
    BadRequest,
    /// Missing or wrong signature or session.
    Unauthorized,
    /// Authenticated but not allowed (privacy, trust, tokens, rules).
    Forbidden,
    /// Unknown node, network or pair.
    NotFound,
    /// Name taken, already pending, key in use.
    Conflict,
    /// Rate limited; retry later.
    Throttled,
    /// An ID space or a bounded list is full.
    Exhausted,
    /// Not offered by this registry.
    Unsupported,
    /// Another daemon process with this node's identity is live (extension).
    DuplicateInstance,
    /// The store failed.
    Internal,
}

impl Code {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::Unauthorized => "unauthorized",
            Code::Forbidden => "forbidden",
            Code::NotFound => "not_found",
            Code::Conflict => "conflict",
            Code::Throttled => "throttled",
            Code::Exhausted => "exhausted",
            Code::Unsupported => "unsupported",
            Code::DuplicateInstance => "duplicate_instance",
            Code::Internal => "internal",
        }
    }
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Stable code.
    pub code: Code,
    /// Human-readable reason.
    pub message: String,
}

impl Reject {
    /// A refusal.
    pub fn new(code: Code, message: impl Into<String>) -> Reject {
        Reject {
            code,
            message: message.into(),
        }
    }

    /// The wire body: v1's `{"type":"error","error":...}` plus `code`.
    pub fn to_json(&self) -> Value {
        json!({"type": "error", "error": self.message, "code": self.code.as_str()})
    }
}

fn reject<T>(code: Code, message: impl Into<String>) -> Result<T, Reject> {
    Err(Reject::new(code, message))
}

/// Facts about the request the state cannot know itself.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// TCP peer.
    pub peer: SocketAddr,
    /// The node this request is proven to come from (session or verified signature).
    pub authed: Option<u32>,
    /// A `register` carried a valid proof of key possession.
    pub register_proven: bool,
    /// Monotonic milliseconds (liveness).
    pub now_ms: u64,
    /// Unix seconds (timestamps kept or sent).
    pub unix: u64,
    /// The connection the request came on (0: none, for in-process requests). A daemon
    /// instance is live only while the connection it last spoke on is open.
    pub conn: u64,
}

/// What handling a request produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The reply.
    pub reply: Option<Result<Value, Reject>>,
    /// Durable changes, to commit before replying.
    pub mutations: Vec<Mutation>,
    /// Events for watching nodes: (node, event).
    pub pushes: Vec<(u32, Value)>,
    /// A proven registration binds the session to this node.
    pub bind_session: Option<u32>,
}

/// Settings that shape the rules.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Gates network creation and score changes when set.
    pub admin_token: Option<String>,
    /// Lets beacons ask `reachable` when set.
    pub beacon_token: Option<String>,
}

#[derive(Debug)]
struct Node {
    rec: NodeRecord,
    last_seen_ms: u64,
    networks: Vec<u16>,
    /// The daemon process serving the node, if one named itself (memory only).
    instance: Option<Instance>,
}

/// The daemon process that serves a node: the one whose `register` or `heartbeat` carrying
/// an instance ID was last accepted (extension). It is live while the connection it spoke on
/// is open and the node was heard from within [`STALE_MS`]; while it is live, requests naming
/// another instance are refused with [`Code::DuplicateInstance`], so a second daemon started
/// from a copy of the node's identity never takes the node over. A daemon that stops closes
/// its connection, so its successor (a restart) is accepted at once; one that vanishes
/// without closing it (host lost) is replaced after [`STALE_MS`].
#[derive(Debug, Clone)]
struct Instance {
    id: String,
    /// The connection it last spoke on (0: in-process, never closes).
    conn: u64,
    /// Whether that connection is open.
    connected: bool,
    /// Its endpoint, as registered.
    endpoint: SocketAddr,
    /// Unix seconds when it first served the node.
    since: u64,
    /// The last refused rival, not yet reported in a heartbeat reply.
    notice: Option<Value>,
}

#[derive(Debug)]
struct Network {
    rec: NetworkRecord,
    members: HashSet<u32>,
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Registered nodes.
    pub nodes: usize,
    /// Registered nodes heard from within [`STALE_MS`].
    pub online: usize,
    /// Mutual trust pairs.
    pub trust_pairs: usize,
    /// Networks, the backbone included.
    pub networks: usize,
    /// Pending trust requests.
    pub pending_requests: usize,
}

/// The registry's working state.
#[derive(Debug)]
pub struct State {
    policy: Policy,
    nodes: HashMap<u32, Node>,
    by_key: HashMap<[u8; 32], u32>,
    by_owner: HashMap<String, u32>,
    by_hostname: HashMap<String, u32>,
    networks: BTreeMap<u16, Network>,
    invites: HashMap<(u16, u32), u32>,
    consents: HashMap<(u32, u32), u64>,
    inbox: HashMap<u32, BTreeMap<u32, InboxEntry>>,
    outstanding: HashMap<u32, usize>,
    responses: HashMap<u32, BTreeMap<u32, ResponseEntry>>,
    beacons: BTreeMap<u32, (String, u64)>,
    next_node: u32,
    next_net: u32,
    /// Open connections a node's instance spoke on: connection -> node.
    instance_conns: HashMap<u64, u32>,
}

fn address(net: u16, node: u32) -> String {
    Addr::new(net, node).to_string()
}

/// The endpoint a node registers: the TCP peer's IP with the port the node gave (v1 §4.4).
fn sanitize(listen_addr: &str, peer: SocketAddr) -> SocketAddr {
    let port = listen_addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .filter(|p| *p != 0);
    match port {
        Some(p) => SocketAddr::new(peer.ip().to_canonical(), p),
        None => SocketAddr::new(peer.ip().to_canonical(), peer.port()),
    }
}

impl State {
    /// State restored from a store snapshot. Every active node counts as just heard from, so a
    /// registry restart gives nodes a full stale period to heartbeat again.
    pub fn from_snapshot(snap: Snapshot, policy: Policy, now_ms: u64) -> State {
        let mut st = State {
            policy,
            nodes: HashMap::with_capacity(snap.nodes.len()),
            by_key: HashMap::with_capacity(snap.nodes.len()),
            by_owner: HashMap::new(),
            by_hostname: HashMap::with_capacity(snap.nodes.len()),
            networks: BTreeMap::new(),
            invites: snap.invites.into_iter().collect(),
            consents: snap.consents.into_iter().collect(),
            inbox: HashMap::new(),
            outstanding: HashMap::new(),
            responses: HashMap::new(),
            beacons: BTreeMap::new(),
            next_node: snap.next_node.max(1),
            next_net: snap.next_net.max(1),
            instance_conns: HashMap::new(),
        };
        st.networks.insert(
            0,
            Network {
                rec: NetworkRecord {
                    id: 0,
                    name: "backbone".into(),
                    join_rule: JoinRule::Open,
                    token: None,
                    created: 0,
                    creator: 0,
                },
                members: HashSet::new(),
            },
        );
        for (id, rec) in snap.nodes {
            st.by_key.insert(rec.public_key, id);
            if let Some(o) = &rec.owner {
                st.by_owner.insert(o.clone(), id);
            }
            if rec.active {
                if let Some(h) = &rec.hostname {
                    st.by_hostname.insert(h.clone(), id);
                }
            }
            st.next_node = st.next_node.max(id.saturating_add(1));
            st.nodes.insert(
                id,
                Node {
                    rec,
                    last_seen_ms: now_ms,
                    networks: Vec::new(),
                    instance: None,
                },
            );
        }
        for (id, rec) in snap.networks {
            if id == 0 {
                continue;
            }
            st.next_net = st.next_net.max(u32::from(id) + 1);
            st.networks.insert(
                id,
                Network {
                    rec,
                    members: HashSet::new(),
                },
            );
        }
        for (net, node) in snap.members {
            if let (Some(n), Some(network)) = (st.nodes.get_mut(&node), st.networks.get_mut(&net)) {
                network.members.insert(node);
                n.networks.push(net);
            }
        }
        for ((target, from), e) in snap.inbox {
            st.inbox.entry(target).or_default().insert(from, e);
            *st.outstanding.entry(from).or_default() += 1;
        }
        for ((requester, responder), e) in snap.responses {
            st.responses
                .entry(requester)
                .or_default()
                .insert(responder, e);
        }
        st
    }

    /// Whether `from` may learn `to`'s endpoint: `to` is public, the two share a non-backbone
    /// network, or both consented to a trust pair.
    pub fn may_reach(&self, from: u32, to: u32) -> bool {
        let (Some(a), Some(b)) = (self.nodes.get(&from), self.nodes.get(&to)) else {
            return false;
        };
        if !a.rec.active || !b.rec.active {
            return false;
        }
        from == to
            || b.rec.public
            || a.networks.iter().any(|n| b.networks.contains(n))
            || self.mutual(from, to)
    }

    fn mutual(&self, a: u32, b: u32) -> bool {
        self.consents.contains_key(&(a, b)) && self.consents.contains_key(&(b, a))
    }

    /// The key registered for an active node.
    pub fn node_key(&self, node: u32) -> Option<[u8; 32]> {
        self.nodes
            .get(&node)
            .filter(|n| n.rec.active)
            .map(|n| n.rec.public_key)
    }

    /// The key of a known node (active or not) and whether it authenticates sessions.
    pub fn signing_key(&self, node: u32) -> Option<([u8; 32], bool)> {
        self.nodes
            .get(&node)
            .map(|n| (n.rec.public_key, n.rec.session_auth))
    }

    /// Whether a key is registered (active or not).
    pub fn knows_key(&self, key: &[u8; 32]) -> bool {
        self.by_key.contains_key(key)
    }

    /// Marks a node as authenticating sessions (its fixed-string signatures are refused from
    /// now on).
    pub fn mark_session_auth(&mut self, node: u32) -> Option<Mutation> {
        let n = self.nodes.get_mut(&node)?;
        if n.rec.session_auth {
            return None;
        }
        n.rec.session_auth = true;
        Some(Mutation::Node(n.rec.clone()))
    }

    /// Counts for metrics.
    pub fn counts(&self, now_ms: u64) -> Counts {
        let active = self.nodes.values().filter(|n| n.rec.active);
        let (mut nodes, mut online) = (0, 0);
        for n in active {
            nodes += 1;
            if now_ms.saturating_sub(n.last_seen_ms) <= STALE_MS {
                online += 1;
            }
        }
        Counts {
            nodes,
            online,
            trust_pairs: self
                .consents
                .keys()
                .filter(|(a, b)| a < b && self.consents.contains_key(&(*b, *a)))
                .count(),
            networks: self.networks.len(),
            pending_requests: self.inbox.values().map(BTreeMap::len).sum(),
        }
    }

    /// The dashboard's view (v1 `/api/stats`, wire §4.10), without the fields the server
    /// knows (`total_requests`, `uptime_secs`, `request_rate`, left at 0). One pass over the
    /// nodes, the consents and the network members; only the listed nodes are copied, so the
    /// lock is held for a time linear in the registry's size with small constants.
    pub fn dashboard(&self, now_ms: u64, limits: Limits) -> Stats {
        let fresh = |n: &Node| now_ms.saturating_sub(n.last_seen_ms) <= STALE_MS;
        let mut stats = Stats::default();
        let mut ids = Vec::new();
        let mut tags: HashSet<&str> = HashSet::new();
        for n in self.nodes.values().filter(|n| n.rec.active) {
            stats.total_nodes += 1;
            stats.active_nodes += u64::from(fresh(n));
            stats.task_executors += u64::from(n.rec.task_exec);
            tags.extend(n.rec.tags.iter().map(String::as_str));
            ids.push(n.rec.id);
        }
        stats.unique_tags = tags.len() as u64;
        if ids.len() > limits.nodes {
            // The lowest IDs are the lowest addresses (all on the backbone).
            ids.select_nth_unstable(limits.nodes);
            ids.truncate(limits.nodes);
            stats.nodes_truncated = true;
        }
        ids.sort_unstable();
        let index = |id: &u32| ids.binary_search(id).ok();
        let mut trust = vec![0u64; ids.len()];
        let mut pairs = Vec::new();
        for &(a, b) in self.consents.keys() {
            if a >= b || !self.consents.contains_key(&(b, a)) {
                continue;
            }
            stats.total_trust_links += 1;
            let (ia, ib) = (index(&a), index(&b));
            for i in [ia, ib].into_iter().flatten() {
                trust[i] += 1;
            }
            if ia.is_some() && ib.is_some() {
                pairs.push((a, b));
            }
        }
        pairs.sort_unstable();
        if pairs.len() > limits.edges {
            pairs.truncate(limits.edges);
            stats.edges_truncated = true;
        }
        stats.edges = pairs
            .into_iter()
            .map(|(a, b)| Edge {
                source: address(0, a),
                target: address(0, b),
            })
            .collect();
        stats.nodes = ids
            .iter()
            .zip(trust)
            .filter_map(|(id, trust_links)| {
                let n = self.nodes.get(id)?;
                let mut networks = n.networks.clone();
                networks.sort_unstable();
                Some(NodeStats {
                    address: address(0, *id),
                    tags: n.rec.tags.clone(),
                    online: fresh(n),
                    trust_links,
                    task_exec: n.rec.task_exec,
                    polo_score: n.rec.polo_score,
                    networks,
                })
            })
            .collect();
        stats.networks = self
            .networks
            .values()
            .map(|net| {
                let (members, online_members) = if net.rec.id == 0 {
                    (stats.total_nodes, stats.active_nodes)
                } else {
                    let online = net
                        .members
                        .iter()
                        .filter(|m| self.nodes.get(m).is_some_and(fresh))
                        .count();
                    (net.members.len() as u64, online as u64)
                };
                NetworkStats {
                    id: net.rec.id,
                    name: net.rec.name.clone(),
                    members,
                    online_members,
                }
            })
            .collect();
        stats
    }

    /// Marks nodes silent for longer than [`STALE_MS`] as gone: their hostnames are freed and
    /// they leave their networks (v1 §4.6). Their keys keep their IDs.
    pub fn reap(&mut self, now_ms: u64) -> Vec<Mutation> {
        let stale: Vec<u32> = self
            .nodes
            .values()
            .filter(|n| n.rec.active && now_ms.saturating_sub(n.last_seen_ms) > STALE_MS)
            .map(|n| n.rec.id)
            .collect();
        let mut out = Vec::new();
        for id in stale {
            self.deactivate(id, &mut out);
        }
        self.beacons.retain(|_, (_, exp)| *exp > now_ms);
        out
    }

    fn deactivate(&mut self, id: u32, out: &mut Vec<Mutation>) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        n.rec.active = false;
        n.rec.real_addr = None;
        if let Some(i) = n.instance.take() {
            if self.instance_conns.get(&i.conn) == Some(&id) {
                self.instance_conns.remove(&i.conn);
            }
        }
        if let Some(h) = n.rec.hostname.take() {
            self.by_hostname.remove(&h);
        }
        for net in std::mem::take(&mut n.networks) {
            if let Some(network) = self.networks.get_mut(&net) {
                network.members.remove(&id);
            }
            out.push(Mutation::Member {
                net,
                node: id,
                present: false,
            });
        }
        out.push(Mutation::Node(n.rec.clone()));
    }

    /// The connection `conn` closed: the instance that last spoke on it is no longer live, so
    /// another (its restart) may take the node at once.
    pub fn connection_closed(&mut self, conn: u64) {
        let Some(id) = self.instance_conns.remove(&conn) else {
            return;
        };
        if let Some(i) = self.nodes.get_mut(&id).and_then(|n| n.instance.as_mut()) {
            if i.conn == conn {
                i.connected = false;
            }
        }
    }

    /// Refuses `claim` when another instance serves node `id` and is live (see [`Instance`]):
    /// the refusal tells the rival which daemon holds the node, the live one is told of the
    /// rival by a push and in its next heartbeat reply. `endpoint` is the rival's.
    fn check_instance(
        &mut self,
        id: u32,
        claim: &str,
        endpoint: SocketAddr,
        kind: &str,
        ctx: &Ctx,
        out: &mut Outcome,
    ) -> Result<(), Reject> {
        let Some(n) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        let fresh = n.rec.active && ctx.now_ms.saturating_sub(n.last_seen_ms) <= STALE_MS;
        let Some(live) = n.instance.as_mut() else {
            return Ok(());
        };
        if live.id == claim || !live.connected || !fresh {
            return Ok(());
        }
        let ago = ctx.unix.saturating_sub(live.since);
        let message = format!(
            "node {id} is served by another live pilotd with the same identity (instance {}, \
            endpoint {}, since unix time {} ({ago} s ago)); this daemon's {kind} was refused \
            and it does not take the node over. Stop the other daemon, or, if this daemon's \
            identity directory was copied from it, give this daemon its own identity",
            live.id, live.endpoint, live.since
        );
        let notice = json!({
            "type": "duplicate_instance",
            "node_id": id,
            "instance": claim,
            "endpoint": endpoint.to_string(),
            "at": ctx.unix,
            "message": format!(
                "another pilotd with this node's identity (node {id}, instance {claim}, \
                endpoint {endpoint}) sent a {kind} at unix time {}; it was refused and this \
                daemon keeps the node. Stop that daemon, or, if its identity directory was \
                copied from this one, give it its own identity",
                ctx.unix
            ),
        });
        live.notice = Some(notice.clone());
        out.pushes.push((id, notice));
        reject(Code::DuplicateInstance, message)
    }

    /// Records `claim` as the instance serving node `id`, on the request's connection.
    /// Returns a refused rival not yet reported to this instance.
    fn claim_instance(
        &mut self,
        id: u32,
        claim: &str,
        endpoint: SocketAddr,
        ctx: &Ctx,
    ) -> Option<Value> {
        let n = self.nodes.get_mut(&id)?;
        let (previous, since, notice) = match n.instance.take() {
            Some(i) if i.id == claim => (Some(i.conn), i.since, i.notice),
            Some(i) => (Some(i.conn), ctx.unix, None),
            None => (None, ctx.unix, None),
        };
        n.instance = Some(Instance {
            id: claim.to_owned(),
            conn: ctx.conn,
            connected: true,
            endpoint,
            since,
            notice: None,
        });
        if let Some(old) = previous.filter(|c| *c != ctx.conn) {
            if self.instance_conns.get(&old) == Some(&id) {
                self.instance_conns.remove(&old);
            }
        }
        if ctx.conn != 0 {
            self.instance_conns.insert(ctx.conn, id);
        }
        notice
    }

    /// Handles one request. `ctx.authed` must already hold the proven signer, if any.
    pub fn handle(&mut self, req: Request, ctx: &Ctx) -> Outcome {
        let mut out = Outcome::default();
        let reply = self.dispatch(req, ctx, &mut out);
        out.reply = Some(reply);
        out
    }

    fn require(&self, ctx: &Ctx, node: u32) -> Result<(), Reject> {
        if ctx.authed == Some(node) {
            Ok(())
        } else {
            reject(
                Code::Unauthorized,
                format!(
                    "request must be signed by node {node} or sent on its authenticated session"
                ),
            )
        }
    }

    fn active(&self, id: u32) -> Result<&Node, Reject> {
        match self.nodes.get(&id) {
            Some(n) if n.rec.active => Ok(n),
            _ => reject(Code::NotFound, format!("node {id} is not registered")),
        }
    }

    fn active_mut(&mut self, id: u32) -> Result<&mut Node, Reject> {
        match self.nodes.get_mut(&id) {
            Some(n) if n.rec.active => Ok(n),
            _ => reject(Code::NotFound, format!("node {id} is not registered")),
        }
    }

    fn admin(&self, given: Option<&str>) -> Result<(), Reject> {
        match &self.policy.admin_token {
            None => Ok(()),
            Some(t) if given.is_some_and(|g| crate::auth::secret_eq(g, t)) => Ok(()),
            Some(_) => reject(Code::Forbidden, "admin token missing or wrong"),
        }
    }

    fn dispatch(&mut self, req: Request, ctx: &Ctx, out: &mut Outcome) -> Result<Value, Reject> {
        use Request::*;
        if let Some(signer) = req.signer() {
            self.require(ctx, signer)?;
        }
        match req {
            Register {
                listen_addr,
                public_key,
                owner,
                hostname,
                instance,
                ..
            } => {
                let registration = Registration {
                    listen_addr: &listen_addr,
                    public_key: &public_key,
                    owner,
                    hostname,
                    instance: instance.as_deref(),
                };
                self.register(registration, ctx, out)
            }
            Lookup { node_id } => {
                let n = self.active(node_id)?;
                let mut v = json!({
                    "type": "lookup_ok",
                    "node_id": node_id,
                    "address": address(0, node_id),
                    "networks": std::iter::once(0).chain(n.networks.iter().copied()).collect::<Vec<u16>>(),
                    "public_key": b64(&n.rec.public_key),
                    "public": n.rec.public,
                    "polo_score": n.rec.polo_score,
                });
                if let Some(h) = &n.rec.hostname {
                    v["hostname"] = json!(h);
                }
                if !n.rec.tags.is_empty() {
                    v["tags"] = json!(n.rec.tags);
                }
                if n.rec.task_exec {
                    v["task_exec"] = json!(true);
                }
                if let (true, Some(a)) = (n.rec.public, n.rec.real_addr) {
                    v["real_addr"] = json!(a.to_string());
                }
                Ok(v)
            }
            Resolve {
                node_id,
                requester_id,
                ..
            } => {
                self.active(requester_id)?;
                let target = self.active(node_id)?;
                let addr = target.rec.real_addr;
                if !self.may_reach(requester_id, node_id) {
                    return reject(
                        Code::Forbidden,
                        format!("node {node_id} is private and shares no trust pair or network with node {requester_id}"),
                    );
                }
                let Some(addr) = addr else {
                    return reject(Code::NotFound, format!("node {node_id} has no endpoint"));
                };
                Ok(json!({"type": "resolve_ok", "node_id": node_id, "real_addr": addr.to_string()}))
            }
            Heartbeat {
                node_id, instance, ..
            } => {
                let n = self.active(node_id)?;
                let endpoint = n.rec.real_addr.unwrap_or(ctx.peer);
                let mut v = json!({"type": "heartbeat_ok", "time": ctx.unix});
                if let Some(claim) = instance.as_deref() {
                    self.check_instance(node_id, claim, ctx.peer, "heartbeat", ctx, out)?;
                    let notice = self.claim_instance(node_id, claim, endpoint, ctx);
                    if let Some(notice) = notice {
                        v["duplicate_instance"] = notice;
                    }
                }
                let n = self.active_mut(node_id)?;
                n.last_seen_ms = ctx.now_ms;
                Ok(v)
            }
            Deregister {
                node_id, instance, ..
            } => {
                if let Some(claim) = instance.as_deref() {
                    self.check_instance(node_id, claim, ctx.peer, "deregister", ctx, out)?;
                }
                if self.nodes.get(&node_id).is_some_and(|n| n.rec.active) {
                    self.deactivate(node_id, &mut out.mutations);
                }
                Ok(json!({"type": "deregister_ok"}))
            }
            SetVisibility {
                node_id, public, ..
            } => {
                let n = self.active_mut(node_id)?;
                n.rec.public = public;
                out.mutations.push(Mutation::Node(n.rec.clone()));
                Ok(json!({
                    "type": "set_visibility_ok",
                    "node_id": node_id,
                    "visibility": if public { "public" } else { "private" },
                }))
            }
            SetHostname {
                node_id, hostname, ..
            } => {
                self.active(node_id)?;
                if !hostname.is_empty() {
                    validate_hostname(&hostname)
                        .map_err(|e| Reject::new(Code::BadRequest, e.to_string()))?;
                    if let Some(&other) = self.by_hostname.get(&hostname) {
                        if other != node_id {
                            return reject(
                                Code::Conflict,
                                format!("hostname {hostname:?} is taken"),
                            );
                        }
                    }
                }
                self.set_hostname(node_id, (!hostname.is_empty()).then(|| hostname.clone()));
                if let Some(n) = self.nodes.get(&node_id) {
                    out.mutations.push(Mutation::Node(n.rec.clone()));
                }
                Ok(json!({"type": "set_hostname_ok", "node_id": node_id, "hostname": hostname}))
            }
            SetTags { node_id, tags, .. } => {
                let tags = normalize_tags(&tags.unwrap_or_default())
                    .map_err(|e| Reject::new(Code::BadRequest, e.to_string()))?;
                let n = self.active_mut(node_id)?;
                n.rec.tags = tags;
                out.mutations.push(Mutation::Node(n.rec.clone()));
                let tags = if n.rec.tags.is_empty() {
                    Value::Null
                } else {
                    json!(n.rec.tags)
                };
                Ok(json!({"type": "set_tags_ok", "node_id": node_id, "tags": tags}))
            }
            SetTaskExec {
                node_id, enabled, ..
            } => {
                let n = self.active_mut(node_id)?;
                n.rec.task_exec = enabled;
                out.mutations.push(Mutation::Node(n.rec.clone()));
                Ok(json!({"type": "set_task_exec_ok", "node_id": node_id, "task_exec": enabled}))
            }
            ResolveHostname { hostname } => {
                let Some(&id) = self.by_hostname.get(&hostname) else {
                    return reject(Code::NotFound, format!("no node has hostname {hostname:?}"));
                };
                let n = self.active(id)?;
                Ok(json!({
                    "type": "resolve_hostname_ok",
                    "node_id": id,
                    "address": address(0, id),
                    "public": n.rec.public,
                    "hostname": hostname,
                }))
            }
            ReportTrust {
                node_id, peer_id, ..
            } => {
                self.active(node_id)?;
                self.nodes.get(&peer_id).ok_or_else(|| {
                    Reject::new(Code::NotFound, format!("node {peer_id} is unknown"))
                })?;
                if node_id == peer_id {
                    return reject(Code::BadRequest, "a node cannot trust itself");
                }
                self.consent(node_id, peer_id, ctx.unix, out);
                Ok(json!({"type": "report_trust_ok", "mutual": self.mutual(node_id, peer_id)}))
            }
            RevokeTrust {
                node_id, peer_id, ..
            } => {
                let had = self.consents.contains_key(&(node_id, peer_id))
                    || self.consents.contains_key(&(peer_id, node_id));
                if !had {
                    return reject(
                        Code::NotFound,
                        format!("no trust between nodes {node_id} and {peer_id}"),
                    );
                }
                self.withdraw(node_id, peer_id, out);
                self.withdraw(peer_id, node_id, out);
                Ok(json!({"type": "revoke_trust_ok"}))
            }
            RequestHandshake {
                from_node_id,
                to_node_id,
                justification,
                ..
            } => self.request_handshake(from_node_id, to_node_id, justification, ctx, out),
            PollHandshakes { node_id, .. } => {
                self.active(node_id)?;
                let mut requests = Vec::new();
                for (from, e) in self.inbox.remove(&node_id).unwrap_or_default() {
                    if let Some(c) = self.outstanding.get_mut(&from) {
                        *c = c.saturating_sub(1);
                        if *c == 0 {
                            self.outstanding.remove(&from);
                        }
                    }
                    out.mutations.push(Mutation::Inbox {
                        target: node_id,
                        from,
                        entry: None,
                    });
                    requests.push(json!({"from_node_id": from, "justification": e.justification, "timestamp": e.timestamp}));
                }
                let mut responses = Vec::new();
                for (responder, e) in self.responses.remove(&node_id).unwrap_or_default() {
                    out.mutations.push(Mutation::Response {
                        requester: node_id,
                        responder,
                        entry: None,
                    });
                    responses.push(json!({"from_node_id": responder, "accept": e.accept, "timestamp": e.timestamp}));
                }
                Ok(
                    json!({"type": "poll_handshakes_ok", "requests": requests, "responses": responses}),
                )
            }
            RespondHandshake {
                node_id,
                peer_id,
                accept,
                ..
            } => {
                self.active(node_id)?;
                self.nodes.get(&peer_id).ok_or_else(|| {
                    Reject::new(Code::NotFound, format!("node {peer_id} is unknown"))
                })?;
                if node_id == peer_id {
                    return reject(Code::BadRequest, "a node cannot answer itself");
                }
                self.drop_request(node_id, peer_id, out);
                if accept {
                    self.consent(node_id, peer_id, ctx.unix, out);
                } else {
                    self.withdraw(peer_id, node_id, out);
                    self.withdraw(node_id, peer_id, out);
                }
                let e = ResponseEntry {
                    accept,
                    timestamp: ctx.unix,
                };
                self.responses
                    .entry(peer_id)
                    .or_default()
                    .insert(node_id, e);
                out.mutations.push(Mutation::Response {
                    requester: peer_id,
                    responder: node_id,
                    entry: Some(e),
                });
                out.pushes.push((
                    peer_id,
                    json!({"type": "handshake_response", "from_node_id": node_id, "accept": accept, "timestamp": ctx.unix}),
                ));
                Ok(json!({"type": "respond_handshake_ok", "accept": accept, "peer_id": peer_id}))
            }
            RotateKey {
                node_id,
                new_public_key,
                ..
            } => {
                let key = decode_key(&new_public_key)
                    .map_err(|e| Reject::new(Code::BadRequest, e.to_string()))?;
                if self.by_key.get(&key).is_some_and(|&o| o != node_id) {
                    return reject(Code::Conflict, "new key is registered to another node");
                }
                let n = self.active_mut(node_id)?;
                let old = std::mem::replace(&mut n.rec.public_key, key);
                out.mutations.push(Mutation::Node(n.rec.clone()));
                self.by_key.remove(&old);
                self.by_key.insert(key, node_id);
                Ok(json!({
                    "type": "rotate_key_ok",
                    "node_id": node_id,
                    "address": address(0, node_id),
                    "public_key": new_public_key,
                }))
            }
            Punch {
                requester_id,
                node_a,
                node_b,
                ..
            } => {
                let other = if requester_id == node_a {
                    node_b
                } else if requester_id == node_b {
                    node_a
                } else {
                    return reject(
                        Code::Forbidden,
                        "the requester must be one of the two nodes",
                    );
                };
                let a = self.active(node_a)?.rec.real_addr;
                let b = self.active(node_b)?.rec.real_addr;
                if !self.may_reach(requester_id, other) {
                    return reject(
                        Code::Forbidden,
                        format!("node {other} is private and shares no trust pair or network with node {requester_id}"),
                    );
                }
                let ep = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
                Ok(
                    json!({"type": "punch_ok", "node_a": node_a, "node_a_addr": ep(a), "node_b": node_b, "node_b_addr": ep(b)}),
                )
            }
            GetPoloScore { node_id } => {
                let n = self.active(node_id)?;
                Ok(
                    json!({"type": "get_polo_score_ok", "node_id": node_id, "address": address(0, node_id), "polo_score": n.rec.polo_score}),
                )
            }
            UpdatePoloScore {
                node_id,
                delta,
                admin_token,
            } => {
                self.admin_required(admin_token.as_deref())?;
                let n = self.active_mut(node_id)?;
                n.rec.polo_score = n.rec.polo_score.saturating_add(delta);
                out.mutations.push(Mutation::Node(n.rec.clone()));
                Ok(
                    json!({"type": "update_polo_score_ok", "node_id": node_id, "address": address(0, node_id), "polo_score": n.rec.polo_score}),
                )
            }
            SetPoloScore {
                node_id,
                polo_score,
                admin_token,
            } => {
                self.admin_required(admin_token.as_deref())?;
                let n = self.active_mut(node_id)?;
                n.rec.polo_score = polo_score;
                out.mutations.push(Mutation::Node(n.rec.clone()));
                Ok(
                    json!({"type": "set_polo_score_ok", "node_id": node_id, "address": address(0, node_id), "polo_score": polo_score}),
                )
            }
            ListNetworks {} => {
                let active = self.nodes.values().filter(|n| n.rec.active).count();
                let networks: Vec<Value> = self
                    .networks
                    .values()
                    .map(|n| {
                        let members = if n.rec.id == 0 { active } else { n.members.len() };
                        json!({"id": n.rec.id, "name": n.rec.name, "members": members, "join_rule": n.rec.join_rule.as_str()})
                    })
                    .collect();
                Ok(json!({"type": "list_networks_ok", "networks": networks}))
            }
            ListNodes { network_id } => {
                if network_id == 0 {
                    return reject(Code::Forbidden, "the backbone is not listed");
                }
                let Some(net) = self.networks.get(&network_id) else {
                    return reject(
                        Code::NotFound,
                        format!("network {network_id} does not exist"),
                    );
                };
                let mut ids: Vec<u32> = net.members.iter().copied().collect();
                ids.sort_unstable();
                let nodes: Vec<Value> = ids
                    .into_iter()
                    .filter_map(|id| self.nodes.get(&id))
                    .map(|n| {
                        let mut v =
                            json!({"node_id": n.rec.id, "address": address(network_id, n.rec.id)});
                        if let Some(h) = &n.rec.hostname {
                            v["hostname"] = json!(h);
                        }
                        if n.rec.task_exec {
                            v["task_exec"] = json!(true);
                        }
                        if let (true, Some(a)) = (n.rec.public, n.rec.real_addr) {
                            v["real_addr"] = json!(a.to_string());
                        }
                        v
                    })
                    .collect();
                Ok(json!({"type": "list_nodes_ok", "nodes": nodes}))
            }
            CreateNetwork {
                node_id,
                name,
                join_rule,
                token,
                admin_token,
                ..
            } => self.create_network(node_id, name, &join_rule, token, admin_token, ctx, out),
            JoinNetwork {
                node_id,
                network_id,
                token,
                ..
            } => self.join_network(node_id, network_id, token, out),
            LeaveNetwork {
                node_id,
                network_id,
                ..
            } => {
                if network_id == 0 {
                    return reject(Code::Forbidden, "the backbone cannot be left");
                }
                let n = self.active_mut(node_id)?;
                let Some(pos) = n.networks.iter().position(|&x| x == network_id) else {
                    return reject(
                        Code::NotFound,
                        format!("node {node_id} is not a member of network {network_id}"),
                    );
                };
                n.networks.swap_remove(pos);
                if let Some(net) = self.networks.get_mut(&network_id) {
                    net.members.remove(&node_id);
                }
                out.mutations.push(Mutation::Member {
                    net: network_id,
                    node: node_id,
                    present: false,
                });
                Ok(json!({"type": "leave_network_ok", "network_id": network_id}))
            }
            InviteNetwork {
                node_id,
                network_id,
                target_id,
                ..
            } => {
                let member = self.active(node_id)?.networks.contains(&network_id);
                self.active(target_id)?;
                let Some(net) = self.networks.get(&network_id).filter(|_| network_id != 0) else {
                    return reject(
                        Code::NotFound,
                        format!("network {network_id} does not exist"),
                    );
                };
                if net.rec.join_rule != JoinRule::Invite {
                    return reject(
                        Code::BadRequest,
                        format!("network {network_id} is not invite-only"),
                    );
                }
                if !member {
                    return reject(
                        Code::Forbidden,
                        format!("node {node_id} is not a member of network {network_id}"),
                    );
                }
                self.invites.insert((network_id, target_id), node_id);
                out.mutations.push(Mutation::Invite {
                    net: network_id,
                    node: target_id,
                    inviter: Some(node_id),
                });
                Ok(
                    json!({"type": "invite_network_ok", "network_id": network_id, "target_id": target_id}),
                )
            }
            BeaconRegister { beacon_id, addr } => {
                if beacon_id == 0 {
                    return reject(Code::BadRequest, "beacon_id must not be 0");
                }
                if addr.len() > 256 {
                    return reject(Code::BadRequest, "beacon address too long");
                }
                if !self.beacons.contains_key(&beacon_id) && self.beacons.len() >= MAX_BEACONS {
                    return reject(Code::Exhausted, "too many beacons");
                }
                self.beacons
                    .insert(beacon_id, (addr, ctx.now_ms + BEACON_TTL_MS));
                Ok(json!({"type": "beacon_register_ok", "beacon_id": beacon_id}))
            }
            BeaconList {} => {
                let beacons: Vec<Value> = self
                    .beacons
                    .iter()
                    .filter(|(_, (_, exp))| *exp > ctx.now_ms)
                    .map(|(id, (addr, _))| json!({"id": id, "addr": addr}))
                    .collect();
                Ok(json!({"type": "beacon_list_ok", "beacons": beacons}))
            }
            Reachable {
                from,
                to,
                beacon_token,
            } => match &self.policy.beacon_token {
                Some(t) if crate::auth::secret_eq(&beacon_token, t) => {
                    Ok(json!({"type": "reachable_ok", "allowed": self.may_reach(from, to)}))
                }
                _ => reject(Code::Forbidden, "beacon token missing or wrong"),
            },
            SubscribeReplication { .. } => reject(
                Code::Unsupported,
                "replication is not offered; registries share a store instead",
            ),
            Hello {} | Auth { .. } | Watch {} => reject(
                Code::BadRequest,
                "session requests are handled by the connection",
            ),
        }
    }

    fn admin_required(&self, given: Option<&str>) -> Result<(), Reject> {
        if self.policy.admin_token.is_none() {
            return reject(
                Code::Forbidden,
                "score changes need an admin token, and this registry has none",
            );
        }
        self.admin(given)
    }

    fn set_hostname(&mut self, id: u32, name: Option<String>) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        if let Some(old) = n.rec.hostname.take() {
            self.by_hostname.remove(&old);
        }
        if let Some(new) = &name {
            self.by_hostname.insert(new.clone(), id);
        }
        n.rec.hostname = name;
    }

    fn consent(&mut self, from: u32, to: u32, unix: u64, out: &mut Outcome) {
        if self.consents.contains_key(&(from, to)) {
            return;
        }
        self.consents.insert((from, to), unix);
        out.mutations.push(Mutation::Consent {
            from,
            to,
            at: Some(unix),
        });
    }

    fn withdraw(&mut self, from: u32, to: u32, out: &mut Outcome) {
        if self.consents.remove(&(from, to)).is_some() {
            out.mutations.push(Mutation::Consent { from, to, at: None });
        }
    }

    /// Removes `from`'s pending request to `target`, if any.
    fn drop_request(&mut self, target: u32, from: u32, out: &mut Outcome) {
        let Some(inbox) = self.inbox.get_mut(&target) else {
            return;
        };
        if inbox.remove(&from).is_none() {
            return;
        }
        if inbox.is_empty() {
            self.inbox.remove(&target);
        }
        if let Some(c) = self.outstanding.get_mut(&from) {
            *c = c.saturating_sub(1);
        }
        out.mutations.push(Mutation::Inbox {
            target,
            from,
            entry: None,
        });
    }

    fn request_handshake(
        &mut self,
        from: u32,
        to: u32,
        justification: String,
        ctx: &Ctx,
        out: &mut Outcome,
    ) -> Result<Value, Reject> {
        self.active(from)?;
        self.active(to)?;
        if from == to {
            return reject(Code::BadRequest, "a node cannot ask itself for trust");
        }
        if justification.len() > MAX_JUSTIFICATION {
            return reject(
                Code::BadRequest,
                format!("justification longer than {MAX_JUSTIFICATION} bytes"),
            );
        }
        let inbox = self.inbox.get(&to);
        if inbox.is_some_and(|i| i.contains_key(&from)) {
            return reject(
                Code::Conflict,
                format!("a request from node {from} to node {to} is already pending"),
            );
        }
        if inbox.is_some_and(|i| i.len() >= MAX_INBOX) {
            return reject(Code::Exhausted, format!("node {to}'s inbox is full"));
        }
        if self.outstanding.get(&from).copied().unwrap_or(0) >= MAX_OUTSTANDING_REQUESTS {
            return reject(
                Code::Throttled,
                format!(
                    "node {from} has {MAX_OUTSTANDING_REQUESTS} requests pending; wait for answers"
                ),
            );
        }
        let e = InboxEntry {
            justification,
            timestamp: ctx.unix,
        };
        out.pushes.push((
            to,
            json!({"type": "handshake_request", "from_node_id": from, "justification": e.justification, "timestamp": e.timestamp}),
        ));
        self.inbox.entry(to).or_default().insert(from, e.clone());
        *self.outstanding.entry(from).or_default() += 1;
        out.mutations.push(Mutation::Inbox {
            target: to,
            from,
            entry: Some(e),
        });
        // Asking is consenting: the pair forms once the target accepts.
        self.consent(from, to, ctx.unix, out);
        Ok(json!({"type": "request_handshake_ok", "status": "delivered"}))
    }

    fn register(
        &mut self,
        r: Registration<'_>,
        ctx: &Ctx,
        out: &mut Outcome,
    ) -> Result<Value, Reject> {
        let Registration {
            listen_addr,
            public_key,
            owner,
            hostname,
            instance,
        } = r;
        if let Some(claim) = instance {
            if claim.is_empty() || claim.len() > MAX_INSTANCE {
                return reject(
                    Code::BadRequest,
                    format!("instance must be 1 to {MAX_INSTANCE} bytes"),
                );
            }
        }
        let key =
            decode_key(public_key).map_err(|e| Reject::new(Code::BadRequest, e.to_string()))?;
        let owner = owner.filter(|o| !o.is_empty());
        if owner.as_ref().is_some_and(|o| o.len() > MAX_OWNER) {
            return reject(
                Code::BadRequest,
                format!("owner longer than {MAX_OWNER} bytes"),
            );
        }
        let real_addr = sanitize(listen_addr, ctx.peer);
        let id = match self.by_key.get(&key).copied() {
            Some(id) => {
                let Some(n) = self.nodes.get_mut(&id) else {
                    return reject(Code::Internal, "key index names a missing node");
                };
                let alive = n.rec.active && ctx.now_ms.saturating_sub(n.last_seen_ms) <= STALE_MS;
                if !ctx.register_proven {
                    if n.rec.session_auth {
                        return reject(
                            Code::Unauthorized,
                            "this node authenticates sessions: registration needs a proof of its key",
                        );
                    }
                    if alive && n.rec.real_addr.map(|a| a.ip()) != Some(real_addr.ip()) {
                        return reject(
                            Code::Unauthorized,
                            "node is online from another address: re-registration from here needs a proof of its key",
                        );
                    }
                }
                if let Some(claim) = instance {
                    self.check_instance(id, claim, real_addr, "register", ctx, out)?;
                }
                let Some(n) = self.nodes.get_mut(&id) else {
                    return reject(Code::Internal, "key index names a missing node");
                };
                if !n.rec.active {
                    // Back after deregistration or reaping: same ID, fresh attributes (v1).
                    n.rec.public = false;
                    n.rec.tags.clear();
                    n.rec.polo_score = 0;
                    n.rec.task_exec = false;
                    n.rec.active = true;
                }
                if n.rec.owner.is_none() {
                    if let Some(o) = &owner {
                        if !self.by_owner.contains_key(o) {
                            n.rec.owner = Some(o.clone());
                            self.by_owner.insert(o.clone(), id);
                        }
                    }
                }
                n.rec.real_addr = Some(real_addr);
                n.last_seen_ms = ctx.now_ms;
                id
            }
            None => {
                if let Some(o) = &owner {
                    if let Some(&holder) = self.by_owner.get(o) {
                        return reject(
                            Code::Conflict,
                            format!("owner {o:?} belongs to node {holder}; change that node's key with rotate_key signed by its current key"),
                        );
                    }
                }
                let id = self.next_node;
                if id > MAX_NODE_ID {
                    return reject(Code::Exhausted, "node ID space exhausted");
                }
                self.next_node = id + 1;
                out.mutations.push(Mutation::NextNode(self.next_node));
                let rec = NodeRecord {
                    id,
                    public_key: key,
                    owner: owner.clone(),
                    real_addr: Some(real_addr),
                    public: false,
                    hostname: None,
                    tags: Vec::new(),
                    polo_score: 0,
                    task_exec: false,
                    session_auth: false,
                    active: true,
                };
                if let Some(o) = owner {
                    self.by_owner.insert(o, id);
                }
                self.by_key.insert(key, id);
                self.nodes.insert(
                    id,
                    Node {
                        rec,
                        last_seen_ms: ctx.now_ms,
                        networks: Vec::new(),
                        instance: None,
                    },
                );
                id
            }
        };
        let mut hostname_error = None;
        match hostname.filter(|h| !h.is_empty()) {
            Some(h) => match validate_hostname(&h) {
                Err(e) => hostname_error = Some(e.to_string()),
                Ok(()) if self.by_hostname.get(&h).is_some_and(|&o| o != id) => {
                    hostname_error = Some(format!("hostname {h:?} is taken"));
                }
                Ok(()) => self.set_hostname(id, Some(h)),
            },
            None => {
                let has = self
                    .nodes
                    .get(&id)
                    .is_some_and(|n| n.rec.hostname.is_some());
                let default = default_hostname(&key);
                if !has && !self.by_hostname.contains_key(&default) {
                    self.set_hostname(id, Some(default));
                }
            }
        }
        if ctx.register_proven {
            out.bind_session = Some(id);
        }
        if let Some(claim) = instance {
            self.claim_instance(id, claim, real_addr, ctx);
        }
        let Some(n) = self.nodes.get_mut(&id) else {
            return reject(Code::Internal, "registered node vanished");
        };
        if ctx.register_proven {
            n.rec.session_auth = true;
        }
        out.mutations.push(Mutation::Node(n.rec.clone()));
        let mut v = json!({
            "type": "register_ok",
            "node_id": id,
            "network_id": 0,
            "address": address(0, id),
            "public_key": public_key,
        });
        if let Some(h) = &n.rec.hostname {
            v["hostname"] = json!(h);
        }
        if let Some(e) = hostname_error {
            v["hostname_error"] = json!(e);
        }
        Ok(v)
    }

    #[allow(clippy::too_many_arguments)]
    fn create_network(
        &mut self,
        node_id: u32,
        name: String,
        join_rule: &str,
        token: Option<String>,
        admin_token: Option<String>,
        ctx: &Ctx,
        out: &mut Outcome,
    ) -> Result<Value, Reject> {
        self.admin(admin_token.as_deref())?;
        self.active(node_id)?;
        validate_network_name(&name).map_err(|e| Reject::new(Code::BadRequest, e.to_string()))?;
        let Some(rule) = JoinRule::parse(join_rule) else {
            return reject(
                Code::BadRequest,
                format!("join_rule {join_rule:?} is not open, token or invite"),
            );
        };
        let token = token.filter(|t| !t.is_empty());
        match (&rule, &token) {
            (JoinRule::Token, None) => {
                return reject(Code::BadRequest, "a token network needs a token")
            }
            (_, Some(t)) if t.len() > MAX_TOKEN => {
                return reject(
                    Code::BadRequest,
                    format!("token longer than {MAX_TOKEN} bytes"),
                )
            }
            _ => {}
        }
        if self.networks.values().any(|n| n.rec.name == name) {
            return reject(Code::Conflict, format!("network name {name:?} is taken"));
        }
        let Ok(id) = u16::try_from(self.next_net) else {
            return reject(Code::Exhausted, "network ID space exhausted");
        };
        self.next_net += 1;
        out.mutations.push(Mutation::NextNet(self.next_net));
        let rec = NetworkRecord {
            id,
            name: name.clone(),
            join_rule: rule,
            token: if rule == JoinRule::Token { token } else { None },
            created: ctx.unix,
            creator: node_id,
        };
        out.mutations.push(Mutation::Network(rec.clone()));
        let mut members = HashSet::new();
        members.insert(node_id);
        self.networks.insert(id, Network { rec, members });
        if let Some(n) = self.nodes.get_mut(&node_id) {
            n.networks.push(id);
        }
        out.mutations.push(Mutation::Member {
            net: id,
            node: node_id,
            present: true,
        });
        Ok(json!({"type": "create_network_ok", "network_id": id, "name": name}))
    }

    fn join_network(
        &mut self,
        node_id: u32,
        network_id: u16,
        token: Option<String>,
        out: &mut Outcome,
    ) -> Result<Value, Reject> {
        self.active(node_id)?;
        if network_id == 0 {
            return reject(Code::Conflict, "every node is a member of the backbone");
        }
        let Some(net) = self.networks.get(&network_id) else {
            return reject(
                Code::NotFound,
                format!("network {network_id} does not exist"),
            );
        };
        let ok = json!({"type": "join_network_ok", "network_id": network_id, "address": address(network_id, node_id)});
        if net.members.contains(&node_id) {
            return Ok(ok);
        }
        match net.rec.join_rule {
            JoinRule::Open => {}
            JoinRule::Token => {
                let good = matches!((&net.rec.token, &token), (Some(t), Some(g)) if crate::auth::secret_eq(g, t));
                if !good {
                    return reject(
                        Code::Forbidden,
                        format!("network {network_id} needs its join token"),
                    );
                }
            }
            JoinRule::Invite => {
                if self.invites.remove(&(network_id, node_id)).is_none() {
                    return reject(Code::Forbidden, format!("network {network_id} is invite-only and node {node_id} has no invitation"));
                }
                out.mutations.push(Mutation::Invite {
                    net: network_id,
                    node: node_id,
                    inviter: None,
                });
            }
        }
        if let Some(net) = self.networks.get_mut(&network_id) {
            net.members.insert(node_id);
        }
        if let Some(n) = self.nodes.get_mut(&node_id) {
            n.networks.push(network_id);
        }
        out.mutations.push(Mutation::Member {
            net: network_id,
            node: node_id,
            present: true,
        });
        Ok(ok)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ctx(now_ms: u64, conn: u64) -> Ctx {
        Ctx {
            peer: "127.0.0.1:9".parse().unwrap(),
            authed: None,
            register_proven: true,
            now_ms,
            unix: 1_000 + now_ms / 1000,
            conn,
        }
    }

    fn register(st: &mut State, instance: &str, ctx: &Ctx) -> Result<Value, Reject> {
        let req = Request::Register {
            listen_addr: "0.0.0.0:4000".into(),
            // The public key of the all-zero secret key.
            public_key: b64(ed25519_dalek::SigningKey::from_bytes(&[0; 32])
                .verifying_key()
                .as_bytes()),
            owner: None,
            hostname: None,
            proof: None,
            instance: Some(instance.into()),
        };
        st.handle(req, ctx).reply.unwrap()
    }

    #[test]
    fn a_silent_instance_gives_way_after_the_liveness_window() {
        let mut st = State::from_snapshot(Snapshot::default(), Policy::default(), 0);
        register(&mut st, "a", &ctx(0, 1)).unwrap();
        // Its connection is still open (a host that vanished): refused within the window...
        let e = register(&mut st, "b", &ctx(STALE_MS, 2)).unwrap_err();
        assert_eq!(e.code, Code::DuplicateInstance);
        // ...and accepted after it, with no heartbeat from the silent instance.
        register(&mut st, "b", &ctx(STALE_MS + 1, 2)).unwrap();
        let e = register(&mut st, "a", &ctx(STALE_MS + 2, 3)).unwrap_err();
        assert_eq!(e.code, Code::DuplicateInstance);
        // A closed connection frees the node at once; another connection's close does not.
        st.connection_closed(1);
        assert!(register(&mut st, "a", &ctx(STALE_MS + 3, 3)).is_err());
        st.connection_closed(2);
        register(&mut st, "a", &ctx(STALE_MS + 4, 3)).unwrap();
    }
}

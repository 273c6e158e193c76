//! [`PgStore`]: the registry's [`Store`] on PostgreSQL.
//!
//! Layer: storage, below the registry's state; it knows records and keys, never protocol rules.
//!
//! Invariants:
//! - every [`Store::commit`] is one transaction, committed before `commit` returns (with
//!   `synchronous_commit` at least `on` for the session); when any statement of it fails (a
//!   constraint, a lost connection), nothing of the batch is written;
//! - a batch is first folded to the last change of each key, so a commit runs at most one
//!   upsert and one delete per table whatever its size, and applying the same batch twice
//!   leaves the same rows: after a lost connection the commit is retried once on a new one;
//! - the `postgres` client drives a tokio runtime of its own, which must not run inside the
//!   registry's runtime: the client lives on its own thread (`registry-pg`), and `load` and
//!   `commit` hand their work to it and wait, which is safe from any thread or runtime;
//! - the password never leaves the connection settings: errors and logs name the database
//!   with [`describe`] or [`redact_url`].
//!
//! The schema lives in versioned migrations embedded in the binary (`migrations/NNNN_*.sql`,
//! each applied once, in order, in one transaction under an advisory lock, and recorded in
//! `schema_version`). A database whose schema is newer than this binary knows is refused.
//! Tables are relational, one row per record, with the constraints a registry relies on:
//! node ID and public key and hostname unique, network ID and name unique, memberships,
//! invitations, consents (trust pairs keyed by the ordered pair), inbox and answers keyed by
//! their pair and referring to existing nodes and networks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::config::Host;
use postgres::{Client, IsolationLevel, NoTls, Statement, Transaction};

use super::{
    pair, InboxEntry, JoinRule, Mutation, NetworkRecord, NodeRecord, ResponseEntry, Snapshot,
    Store, StoreError,
};

/// One schema change.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Every schema change, in order. A new one is appended with the next version; released ones
/// never change.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "initial",
    sql: include_str!("migrations/0001_initial.sql"),
}];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Advisory lock key that serializes migrations of registries sharing one database.
const MIGRATION_LOCK: i64 = 0x7069_6c6f_7472_6567;

/// How long connecting may take when the URL does not say (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `store` names a PostgreSQL database rather than a file.
pub fn is_url(store: &str) -> bool {
    store.starts_with("postgres://") || store.starts_with("postgresql://")
}

/// `url` with its password (in the user part or a `password=` parameter) replaced by `***`.
/// When the URL is malformed it errs on the side of hiding more (everything up to the last
/// `@` but the user name).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(not a URL)".to_owned();
    };
    let rest = match rest.rfind('@') {
        Some(at) => {
            let (userinfo, hosts) = (&rest[..at], &rest[at + 1..]);
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{hosts}"),
                None => rest.to_owned(),
            }
        }
        None => rest.to_owned(),
    };
    let rest = match rest.split_once('?') {
        Some((path, query)) => {
            let params: Vec<&str> = query
                .split('&')
                .map(|kv| {
                    let k = kv.split('=').next().unwrap_or("");
                    if k.eq_ignore_ascii_case("password") {
                        "password=***"
                    } else {
                        kv
                    }
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => rest,
    };
    format!("{scheme}://{rest}")
}

fn parse(url: &str) -> Result<postgres::Config, StoreError> {
    url.parse()
        .map_err(|e: postgres::Error| StoreError::Postgres {
            target: redact_url(url),
            context: "reading the URL",
            reason: e.to_string(),
        })
}

/// Checks that `url` is a database URL the store can use, without connecting.
pub fn check_url(url: &str) -> Result<(), StoreError> {
    parse(url).map(drop)
}

/// The database as `postgresql://USER@HOST[,HOST][:PORT]/DB`, without password or options.
pub fn describe(cfg: &postgres::Config) -> String {
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(s) => s.clone(),
            Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = cfg.get_ports().iter().map(u16::to_string).collect();
    let port = if ports.is_empty() {
        String::new()
    } else {
        format!(":{}", ports.join(","))
    };
    format!(
        "postgresql://{}@{}{port}/{}",
        cfg.get_user().unwrap_or(""),
        hosts.join(","),
        cfg.get_dbname().unwrap_or("")
    )
}

fn db_error(e: &postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        return e.to_string();
    };
    let mut s = format!("{}: {}", db.severity(), db.message());
    if let Some(d) = db.detail() {
        s.push_str(&format!(" ({d})"));
    }
    if let Some(c) = db.constraint() {
        s.push_str(&format!(" [constraint {c}]"));
    }
    s
}

fn pg_error(target: &str, context: &'static str, e: &postgres::Error) -> StoreError {
    StoreError::Postgres {
        target: target.to_owned(),
        context,
        reason: db_error(e),
    }
}

/// A batch folded to the last change of each key (`None` or `false`: delete).
#[derive(Debug, Default)]
struct Changes {
    nodes: BTreeMap<u32, NodeRecord>,
    networks: BTreeMap<u16, NetworkRecord>,
    members: BTreeMap<(u16, u32), bool>,
    invites: BTreeMap<(u16, u32), Option<u32>>,
    consents: BTreeMap<(u32, u32), Option<u64>>,
    inbox: BTreeMap<(u32, u32), Option<InboxEntry>>,
    responses: BTreeMap<(u32, u32), Option<ResponseEntry>>,
    counters: BTreeMap<&'static str, u32>,
}

impl Changes {
    fn fold(batch: &[Mutation]) -> Changes {
        let mut c = Changes::default();
        for m in batch {
            match m {
                Mutation::Node(r) => {
                    c.nodes.insert(r.id, r.clone());
                }
                Mutation::Network(r) => {
                    c.networks.insert(r.id, r.clone());
                }
                Mutation::Member { net, node, present } => {
                    c.members.insert((*net, *node), *present);
                }
                Mutation::Invite { net, node, inviter } => {
                    c.invites.insert((*net, *node), *inviter);
                }
                Mutation::Consent { from, to, at } => {
                    c.consents.insert((*from, *to), *at);
                }
                Mutation::Inbox {
                    target,
                    from,
                    entry,
                } => {
                    c.inbox.insert((*target, *from), entry.clone());
                }
                Mutation::Response {
                    requester,
                    responder,
                    entry,
                } => {
                    c.responses.insert((*requester, *responder), *entry);
                }
                Mutation::NextNode(n) => {
                    c.counters.insert("next_node", *n);
                }
                Mutation::NextNet(n) => {
                    c.counters.insert("next_net", *n);
                }
            }
        }
        c
    }
}

/// Unix seconds as PostgreSQL's bigint.
fn secs(table: &'static str, key: u64, t: u64) -> Result<i64, StoreError> {
    i64::try_from(t).map_err(|_| StoreError::Corrupt {
        table,
        key,
        reason: format!("time {t} does not fit a bigint"),
    })
}

/// The statements a commit runs, prepared once per connection.
struct Statements {
    upsert_nodes: Statement,
    upsert_networks: Statement,
    add_members: Statement,
    del_members: Statement,
    put_invites: Statement,
    del_invites: Statement,
    put_consents: Statement,
    del_consents: Statement,
    put_inbox: Statement,
    del_inbox: Statement,
    put_responses: Statement,
    del_responses: Statement,
    put_counters: Statement,
}

impl Statements {
    fn prepare(c: &mut Client) -> Result<Statements, postgres::Error> {
        Ok(Statements {
            upsert_nodes: c.prepare(
                "INSERT INTO nodes (id, public_key, owner, real_addr, public, hostname, tags, \
                     polo_score, task_exec, session_auth, active) \
                 SELECT u.id, u.public_key, u.owner, u.real_addr, u.public, u.hostname, \
                     ARRAY(SELECT t.tag FROM jsonb_array_elements_text(u.tags::jsonb) \
                           WITH ORDINALITY AS t(tag, n) ORDER BY t.n), \
                     u.polo_score, u.task_exec, u.session_auth, u.active \
                 FROM unnest($1::bigint[], $2::bytea[], $3::text[], $4::text[], $5::boolean[], \
                     $6::text[], $7::text[], $8::bigint[], $9::boolean[], $10::boolean[], \
                     $11::boolean[]) \
                     AS u(id, public_key, owner, real_addr, public, hostname, tags, polo_score, \
                          task_exec, session_auth, active) \
                 ON CONFLICT (id) DO UPDATE SET public_key = EXCLUDED.public_key, \
                     owner = EXCLUDED.owner, real_addr = EXCLUDED.real_addr, \
                     public = EXCLUDED.public, hostname = EXCLUDED.hostname, \
                     tags = EXCLUDED.tags, polo_score = EXCLUDED.polo_score, \
                     task_exec = EXCLUDED.task_exec, session_auth = EXCLUDED.session_auth, \
                     active = EXCLUDED.active",
            )?,
            upsert_networks: c.prepare(
                "INSERT INTO networks (id, name, join_rule, token, created, creator) \
                 SELECT * FROM unnest($1::integer[], $2::text[], $3::text[], $4::text[], \
                     $5::bigint[], $6::bigint[]) \
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, \
                     join_rule = EXCLUDED.join_rule, token = EXCLUDED.token, \
                     created = EXCLUDED.created, creator = EXCLUDED.creator",
            )?,
            add_members: c.prepare(
                "INSERT INTO members (net, node) \
                 SELECT * FROM unnest($1::integer[], $2::bigint[]) ON CONFLICT DO NOTHING",
            )?,
            del_members: c.prepare(
                "DELETE FROM members m USING unnest($1::integer[], $2::bigint[]) AS d(net, node) \
                 WHERE m.net = d.net AND m.node = d.node",
            )?,
            put_invites: c.prepare(
                "INSERT INTO invites (net, node, inviter) \
                 SELECT * FROM unnest($1::integer[], $2::bigint[], $3::bigint[]) \
                 ON CONFLICT (net, node) DO UPDATE SET inviter = EXCLUDED.inviter",
            )?,
            del_invites: c.prepare(
                "DELETE FROM invites i USING unnest($1::integer[], $2::bigint[]) AS d(net, node) \
                 WHERE i.net = d.net AND i.node = d.node",
            )?,
            put_consents: c.prepare(
                "INSERT INTO consents (from_node, to_node, at) \
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) \
                 ON CONFLICT (from_node, to_node) DO UPDATE SET at = EXCLUDED.at",
            )?,
            del_consents: c.prepare(
                "DELETE FROM consents c USING unnest($1::bigint[], $2::bigint[]) AS d(a, b) \
                 WHERE c.from_node = d.a AND c.to_node = d.b",
            )?,
            put_inbox: c.prepare(
                "INSERT INTO inbox (target, requester, justification, at) \
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[]) \
                 ON CONFLICT (target, requester) DO UPDATE \
                     SET justification = EXCLUDED.justification, at = EXCLUDED.at",
            )?,
            del_inbox: c.prepare(
                "DELETE FROM inbox i USING unnest($1::bigint[], $2::bigint[]) AS d(a, b) \
                 WHERE i.target = d.a AND i.requester = d.b",
            )?,
            put_responses: c.prepare(
                "INSERT INTO responses (requester, responder, accept, at) \
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::boolean[], $4::bigint[]) \
                 ON CONFLICT (requester, responder) DO UPDATE \
                     SET accept = EXCLUDED.accept, at = EXCLUDED.at",
            )?,
            del_responses: c.prepare(
                "DELETE FROM responses r USING unnest($1::bigint[], $2::bigint[]) AS d(a, b) \
                 WHERE r.requester = d.a AND r.responder = d.b",
            )?,
            put_counters: c.prepare(
                "INSERT INTO counters (name, value) \
                 SELECT * FROM unnest($1::text[], $2::bigint[]) \
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            )?,
        })
    }
}

/// Applies the migrations this database lacks, in one transaction.
fn migrate(c: &mut Client, target: &str) -> Result<(), StoreError> {
    let err = |e: postgres::Error| pg_error(target, "migrating the schema", &e);
    let mut tx = c.transaction().map_err(err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (\
             version    integer     PRIMARY KEY, \
             name       text        NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .map_err(err)?;
    let current: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .map_err(err)?
        .get(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::Postgres {
            target: target.to_owned(),
            context: "checking the schema",
            reason: format!(
                "the database's schema is version {current}, newer than this registry's \
                 ({SCHEMA_VERSION}): upgrade pilot-registry"
            ),
        });
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        tx.batch_execute(m.sql).map_err(err)?;
        tx.execute(
            "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .map_err(err)?;
        tracing::info!(version = m.version, name = m.name, "store schema migrated");
    }
    tx.commit().map_err(err)
}

/// Opens a session: connects, makes its commits durable, prepares the statements.
fn session(
    cfg: &postgres::Config,
    target: &str,
    migrate_first: bool,
) -> Result<(Client, Statements), StoreError> {
    let mut client = cfg
        .connect(NoTls)
        .map_err(|e| pg_error(target, "connecting", &e))?;
    // An acknowledged change must survive a crash of the database server: a server or role
    // configured with `synchronous_commit = off` is overridden for this session (stronger
    // settings, such as `remote_apply`, are kept).
    let err = |e: postgres::Error| pg_error(target, "setting up the session", &e);
    let sync: String = client
        .query_one("SHOW synchronous_commit", &[])
        .map_err(err)?
        .get(0);
    if sync == "off" {
        client
            .batch_execute("SET synchronous_commit TO on")
            .map_err(err)?;
        tracing::info!(store = %target, "synchronous_commit is off on the server; on for the registry's session");
    }
    if migrate_first {
        migrate(&mut client, target)?;
    }
    let stmts = Statements::prepare(&mut client)
        .map_err(|e| pg_error(target, "preparing statements", &e))?;
    Ok((client, stmts))
}

/// One open connection, its prepared statements, and what it takes to open it again.
struct Conn {
    cfg: postgres::Config,
    target: String,
    client: Client,
    stmts: Statements,
}

impl Conn {
    fn open(cfg: postgres::Config, target: String) -> Result<Conn, StoreError> {
        let (client, stmts) = session(&cfg, &target, true)?;
        Ok(Conn {
            cfg,
            target,
            client,
            stmts,
        })
    }

    fn reconnect(&mut self) -> Result<(), StoreError> {
        tracing::warn!(store = %self.target, "store connection lost; reconnecting");
        let (client, stmts) = session(&self.cfg, &self.target, false)?;
        self.client = client;
        self.stmts = stmts;
        Ok(())
    }

    /// Runs `op`; when it failed because the connection is gone, runs it once more on a new
    /// connection (`op` must be idempotent).
    fn retrying<T>(
        &mut self,
        context: &'static str,
        op: impl Fn(&mut Client, &Statements) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        match op(&mut self.client, &self.stmts) {
            Err(Failure::Pg(e)) if self.client.is_closed() || connection_lost(&e) => {
                tracing::warn!(store = %self.target, error = %db_error(&e), "{context} failed");
                self.reconnect()?;
                op(&mut self.client, &self.stmts).map_err(|f| f.into_store(&self.target, context))
            }
            r => r.map_err(|f| f.into_store(&self.target, context)),
        }
    }

    fn serve(mut self, jobs: mpsc::Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            match job {
                Job::Load(reply) => {
                    let _ = reply.send(self.retrying("loading", load));
                }
                Job::Commit(changes, reply) => {
                    let r = self.retrying("committing", |c, s| commit(c, s, &changes));
                    let _ = reply.send(r);
                }
            }
        }
    }
}

/// Whether `e` means the connection is gone: closed, or ended by the server (SQLSTATE class
/// 08, connection exception, or 57P, the server shutting down or terminating the session).
fn connection_lost(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    e.code().is_some_and(|c| {
        let c = c.code();
        c.starts_with("08") || c.starts_with("57P")
    })
}

/// Why an operation on one connection failed.
enum Failure {
    Pg(postgres::Error),
    Store(StoreError),
}

impl From<postgres::Error> for Failure {
    fn from(e: postgres::Error) -> Failure {
        Failure::Pg(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::Store(e)
    }
}

impl Failure {
    fn into_store(self, target: &str, context: &'static str) -> StoreError {
        match self {
            Failure::Pg(e) => pg_error(target, context, &e),
            Failure::Store(e) => e,
        }
    }
}

fn u32_of(table: &'static str, key: i64, v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt {
        table,
        key: key as u64,
        reason: format!("{v} is not a u32"),
    })
}

fn u16_of(table: &'static str, key: i64, v: i32) -> Result<u16, StoreError> {
    u16::try_from(v).map_err(|_| StoreError::Corrupt {
        table,
        key: key as u64,
        reason: format!("{v} is not a u16"),
    })
}

fn unix_of(table: &'static str, key: u64, v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        table,
        key,
        reason: format!("time {v} is negative"),
    })
}

fn load(c: &mut Client, _: &Statements) -> Result<Snapshot, Failure> {
    let mut tx = c
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()?;
    let mut s = Snapshot::default();
    for row in tx.query(
        "SELECT id, public_key, owner, real_addr, public, hostname, tags, polo_score, \
             task_exec, session_auth, active FROM nodes ORDER BY id",
        &[],
    )? {
        let raw: i64 = row.try_get(0)?;
        let id = u32_of("nodes", raw, raw)?;
        let corrupt = |reason: String| StoreError::Corrupt {
            table: "nodes",
            key: id.into(),
            reason,
        };
        let key: Vec<u8> = row.try_get(1)?;
        let public_key: [u8; 32] = key
            .try_into()
            .map_err(|k: Vec<u8>| corrupt(format!("public key of {} bytes", k.len())))?;
        let real_addr: Option<String> = row.try_get(3)?;
        let real_addr = real_addr
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|e| corrupt(format!("real_addr {a:?}: {e}")))
            })
            .transpose()?;
        s.nodes.insert(
            id,
            NodeRecord {
                id,
                public_key,
                owner: row.try_get(2)?,
                real_addr,
                public: row.try_get(4)?,
                hostname: row.try_get(5)?,
                tags: row.try_get(6)?,
                polo_score: row.try_get(7)?,
                task_exec: row.try_get(8)?,
                session_auth: row.try_get(9)?,
                active: row.try_get(10)?,
            },
        );
    }
    for row in tx.query(
        "SELECT id, name, join_rule, token, created, creator FROM networks ORDER BY id",
        &[],
    )? {
        let raw: i32 = row.try_get(0)?;
        let id = u16_of("networks", raw.into(), raw)?;
        let rule: String = row.try_get(2)?;
        let join_rule = JoinRule::parse(&rule).ok_or_else(|| StoreError::Corrupt {
            table: "networks",
            key: id.into(),
            reason: format!("join rule {rule:?}"),
        })?;
        s.networks.insert(
            id,
            NetworkRecord {
                id,
                name: row.try_get(1)?,
                join_rule,
                token: row.try_get(3)?,
                created: unix_of("networks", id.into(), row.try_get(4)?)?,
                creator: u32_of("networks", raw.into(), row.try_get(5)?)?,
            },
        );
    }
    for row in tx.query("SELECT net, node FROM members ORDER BY net, node", &[])? {
        let (net, node): (i32, i64) = (row.try_get(0)?, row.try_get(1)?);
        s.members.push((
            u16_of("members", node, net)?,
            u32_of("members", node, node)?,
        ));
    }
    for row in tx.query("SELECT net, node, inviter FROM invites", &[])? {
        let (net, node, inviter): (i32, i64, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        s.invites.insert(
            (
                u16_of("invites", node, net)?,
                u32_of("invites", node, node)?,
            ),
            u32_of("invites", node, inviter)?,
        );
    }
    for row in tx.query("SELECT from_node, to_node, at FROM consents", &[])? {
        let (a, b) = pair_of("consents", row.try_get(0)?, row.try_get(1)?)?;
        let at = unix_of("consents", pair(a, b), row.try_get(2)?)?;
        s.consents.insert((a, b), at);
    }
    for row in tx.query(
        "SELECT target, requester, justification, at FROM inbox",
        &[],
    )? {
        let (a, b) = pair_of("inbox", row.try_get(0)?, row.try_get(1)?)?;
        let entry = InboxEntry {
            justification: row.try_get(2)?,
            timestamp: unix_of("inbox", pair(a, b), row.try_get(3)?)?,
        };
        s.inbox.insert((a, b), entry);
    }
    for row in tx.query(
        "SELECT requester, responder, accept, at FROM responses",
        &[],
    )? {
        let (a, b) = pair_of("responses", row.try_get(0)?, row.try_get(1)?)?;
        let entry = ResponseEntry {
            accept: row.try_get(2)?,
            timestamp: unix_of("responses", pair(a, b), row.try_get(3)?)?,
        };
        s.responses.insert((a, b), entry);
    }
    for row in tx.query("SELECT name, value FROM counters", &[])? {
        let name: String = row.try_get(0)?;
        let value: i64 = row.try_get(1)?;
        let v = u32_of("counters", value, value)?;
        match name.as_str() {
            "next_node" => s.next_node = v,
            "next_net" => s.next_net = v,
            _ => {}
        }
    }
    tx.commit()?;
    Ok(s)
}

fn pair_of(table: &'static str, a: i64, b: i64) -> Result<(u32, u32), StoreError> {
    Ok((u32_of(table, a, a)?, u32_of(table, a, b)?))
}

/// Splits keyed changes into (keys to delete, keys and values to put).
#[allow(clippy::type_complexity)]
fn split<K: Copy, V: Clone>(m: &BTreeMap<K, Option<V>>) -> (Vec<K>, Vec<(K, V)>) {
    let mut del = Vec::new();
    let mut put = Vec::new();
    for (k, v) in m {
        match v {
            Some(v) => put.push((*k, v.clone())),
            None => del.push(*k),
        }
    }
    (del, put)
}

fn ids(keys: &[(u32, u32)]) -> (Vec<i64>, Vec<i64>) {
    keys.iter()
        .map(|&(a, b)| (i64::from(a), i64::from(b)))
        .unzip()
}

fn net_ids(keys: &[(u16, u32)]) -> (Vec<i32>, Vec<i64>) {
    keys.iter()
        .map(|&(a, b)| (i32::from(a), i64::from(b)))
        .unzip()
}

fn commit(c: &mut Client, st: &Statements, ch: &Changes) -> Result<(), Failure> {
    let mut tx = c.transaction()?;
    put_nodes(&mut tx, st, ch)?;
    put_networks(&mut tx, st, ch)?;

    let (gone, present): (Vec<_>, Vec<_>) = ch.members.iter().partition(|(_, &p)| !p);
    let gone: Vec<(u16, u32)> = gone.into_iter().map(|(k, _)| *k).collect();
    let present: Vec<(u16, u32)> = present.into_iter().map(|(k, _)| *k).collect();
    if !gone.is_empty() {
        let (n, m) = net_ids(&gone);
        tx.execute(&st.del_members, &[&n, &m])?;
    }
    if !present.is_empty() {
        let (n, m) = net_ids(&present);
        tx.execute(&st.add_members, &[&n, &m])?;
    }

    let (del, put) = split(&ch.invites);
    if !del.is_empty() {
        let (n, m) = net_ids(&del);
        tx.execute(&st.del_invites, &[&n, &m])?;
    }
    if !put.is_empty() {
        let keys: Vec<(u16, u32)> = put.iter().map(|(k, _)| *k).collect();
        let (n, m) = net_ids(&keys);
        let inviters: Vec<i64> = put.iter().map(|(_, v)| i64::from(*v)).collect();
        tx.execute(&st.put_invites, &[&n, &m, &inviters])?;
    }

    let (del, put) = split(&ch.consents);
    if !del.is_empty() {
        let (a, b) = ids(&del);
        tx.execute(&st.del_consents, &[&a, &b])?;
    }
    if !put.is_empty() {
        let keys: Vec<(u32, u32)> = put.iter().map(|(k, _)| *k).collect();
        let (a, b) = ids(&keys);
        let at = put
            .iter()
            .map(|((a, b), t)| secs("consents", pair(*a, *b), *t))
            .collect::<Result<Vec<i64>, _>>()?;
        tx.execute(&st.put_consents, &[&a, &b, &at])?;
    }

    let (del, put) = split(&ch.inbox);
    if !del.is_empty() {
        let (a, b) = ids(&del);
        tx.execute(&st.del_inbox, &[&a, &b])?;
    }
    if !put.is_empty() {
        let keys: Vec<(u32, u32)> = put.iter().map(|(k, _)| *k).collect();
        let (a, b) = ids(&keys);
        let why: Vec<&str> = put.iter().map(|(_, e)| e.justification.as_str()).collect();
        let at = put
            .iter()
            .map(|((a, b), e)| secs("inbox", pair(*a, *b), e.timestamp))
            .collect::<Result<Vec<i64>, _>>()?;
        tx.execute(&st.put_inbox, &[&a, &b, &why, &at])?;
    }

    let (del, put) = split(&ch.responses);
    if !del.is_empty() {
        let (a, b) = ids(&del);
        tx.execute(&st.del_responses, &[&a, &b])?;
    }
    if !put.is_empty() {
        let keys: Vec<(u32, u32)> = put.iter().map(|(k, _)| *k).collect();
        let (a, b) = ids(&keys);
        let accept: Vec<bool> = put.iter().map(|(_, e)| e.accept).collect();
        let at = put
            .iter()
            .map(|((a, b), e)| secs("responses", pair(*a, *b), e.timestamp))
            .collect::<Result<Vec<i64>, _>>()?;
        tx.execute(&st.put_responses, &[&a, &b, &accept, &at])?;
    }

    if !ch.counters.is_empty() {
        let names: Vec<&str> = ch.counters.keys().copied().collect();
        let values: Vec<i64> = ch.counters.values().map(|&v| i64::from(v)).collect();
        tx.execute(&st.put_counters, &[&names, &values])?;
    }
    tx.commit()?;
    Ok(())
}

fn put_nodes(tx: &mut Transaction<'_>, st: &Statements, ch: &Changes) -> Result<(), Failure> {
    if ch.nodes.is_empty() {
        return Ok(());
    }
    let n = ch.nodes.len();
    let mut id = Vec::with_capacity(n);
    let mut key: Vec<&[u8]> = Vec::with_capacity(n);
    let mut owner = Vec::with_capacity(n);
    let mut addr = Vec::with_capacity(n);
    let mut public = Vec::with_capacity(n);
    let mut hostname = Vec::with_capacity(n);
    let mut tags = Vec::with_capacity(n);
    let mut polo = Vec::with_capacity(n);
    let mut task_exec = Vec::with_capacity(n);
    let mut session_auth = Vec::with_capacity(n);
    let mut active = Vec::with_capacity(n);
    for r in ch.nodes.values() {
        id.push(i64::from(r.id));
        key.push(&r.public_key[..]);
        owner.push(r.owner.as_deref());
        addr.push(r.real_addr.map(|a| a.to_string()));
        public.push(r.public);
        hostname.push(r.hostname.as_deref());
        // A list of strings always serializes.
        tags.push(serde_json::to_string(&r.tags).unwrap_or_else(|_| "[]".into()));
        polo.push(r.polo_score);
        task_exec.push(r.task_exec);
        session_auth.push(r.session_auth);
        active.push(r.active);
    }
    tx.execute(
        &st.upsert_nodes,
        &[
            &id,
            &key,
            &owner,
            &addr,
            &public,
            &hostname,
            &tags,
            &polo,
            &task_exec,
            &session_auth,
            &active,
        ],
    )?;
    Ok(())
}

fn put_networks(tx: &mut Transaction<'_>, st: &Statements, ch: &Changes) -> Result<(), Failure> {
    if ch.networks.is_empty() {
        return Ok(());
    }
    let nets: Vec<&NetworkRecord> = ch.networks.values().collect();
    let id: Vec<i32> = nets.iter().map(|r| i32::from(r.id)).collect();
    let name: Vec<&str> = nets.iter().map(|r| r.name.as_str()).collect();
    let rule: Vec<&str> = nets.iter().map(|r| r.join_rule.as_str()).collect();
    let token: Vec<Option<&str>> = nets.iter().map(|r| r.token.as_deref()).collect();
    let created = nets
        .iter()
        .map(|r| secs("networks", r.id.into(), r.created))
        .collect::<Result<Vec<i64>, _>>()?;
    let creator: Vec<i64> = nets.iter().map(|r| i64::from(r.creator)).collect();
    tx.execute(
        &st.upsert_networks,
        &[&id, &name, &rule, &token, &created, &creator],
    )?;
    Ok(())
}

/// Work for the connection's thread, with where to send its outcome.
enum Job {
    Load(mpsc::SyncSender<Result<Snapshot, StoreError>>),
    Commit(Box<Changes>, mpsc::SyncSender<Result<(), StoreError>>),
}

/// The registry's store in a PostgreSQL database. See the module documentation.
pub struct PgStore {
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    target: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://` or `postgresql://`, with the
    /// parameters of libpq's URLs that the `postgres` crate knows), and brings its schema up
    /// to date. Without a password in the URL, `PGPASSWORD` is used when set. Fails, with the
    /// database named without its password, when the URL is malformed, the database
    /// unreachable or its schema newer than this binary's.
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        let mut cfg = parse(url)?;
        if cfg.get_password().is_none() {
            if let Some(p) = std::env::var_os("PGPASSWORD") {
                cfg.password(p.as_encoded_bytes());
            }
        }
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(CONNECT_TIMEOUT);
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("pilot-registry");
        }
        let target = describe(&cfg);
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let (jobs, rx) = mpsc::channel();
        let t = target.clone();
        let worker = std::thread::Builder::new()
            .name("registry-pg".into())
            .spawn(move || match Conn::open(cfg, t) {
                Ok(conn) => {
                    let _ = ready_tx.send(Ok(()));
                    conn.serve(rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| StoreError::Postgres {
                target: target.clone(),
                context: "starting its thread",
                reason: e.to_string(),
            })?;
        let outcome = ready.recv().unwrap_or_else(|_| Err(gone(&target)));
        if let Err(e) = outcome {
            let _ = worker.join();
            return Err(e);
        }
        Ok(PgStore {
            jobs: Some(jobs),
            worker: Some(worker),
            target,
        })
    }

    /// The database, without password: `postgresql://USER@HOST:PORT/DB`.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn call<T>(
        &self,
        job: impl FnOnce(mpsc::SyncSender<Result<T, StoreError>>) -> Job,
    ) -> Result<T, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let jobs = self.jobs.as_ref().ok_or_else(|| gone(&self.target))?;
        jobs.send(job(tx)).map_err(|_| gone(&self.target))?;
        rx.recv().unwrap_or_else(|_| Err(gone(&self.target)))
    }
}

fn gone(target: &str) -> StoreError {
    StoreError::Postgres {
        target: target.to_owned(),
        context: "connection thread",
        reason: "it has stopped".into(),
    }
}

impl Store for PgStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        self.call(Job::Load)
    }

    fn commit(&mut self, batch: &[Mutation]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let changes = Box::new(Changes::fold(batch));
        self.call(|reply| Job::Commit(changes, reply))
    }
}

impl Drop for PgStore {
    /// Closes the connection: its thread ends once the queue is closed.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        for (url, shown) in [
            (
                "postgres://pilot:s3cret@db.example:5432/reg",
                "postgres://pilot:***@db.example:5432/reg",
            ),
            (
                "postgresql://pilot@db/reg?password=s3cret&sslmode=disable",
                "postgresql://pilot@db/reg?password=***&sslmode=disable",
            ),
            // Unencoded '@' and '/' in a password: everything before the last '@' but the
            // user is hidden.
            (
                "postgres://pilot:s3/c@ret@db/reg",
                "postgres://pilot:***@db/reg",
            ),
            ("postgres://db/reg", "postgres://db/reg"),
        ] {
            assert_eq!(redact_url(url), shown);
            assert!(!redact_url(url).contains("s3"), "{url}");
        }
    }

    #[test]
    fn descriptions_never_hold_the_password() {
        let cfg: postgres::Config = "postgres://pilot:s3cret@127.0.0.1:6543/reg"
            .parse()
            .unwrap();
        assert_eq!(describe(&cfg), "postgresql://pilot@127.0.0.1:6543/reg");
    }

    #[test]
    fn malformed_urls_fail_without_showing_the_password() {
        let e = PgStore::connect("postgres://pilot:s3cret@db:notaport/reg")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("reading the URL"), "{e}");
    }

    #[test]
    fn batches_fold_to_the_last_change_of_each_key() {
        let c = Changes::fold(&[
            Mutation::Member {
                net: 1,
                node: 2,
                present: true,
            },
            Mutation::Consent {
                from: 1,
                to: 2,
                at: Some(5),
            },
            Mutation::Member {
                net: 1,
                node: 2,
                present: false,
            },
            Mutation::Consent {
                from: 1,
                to: 2,
                at: None,
            },
            Mutation::NextNode(3),
            Mutation::NextNode(4),
        ]);
        assert_eq!(c.members.get(&(1, 2)), Some(&false));
        assert_eq!(c.consents.get(&(1, 2)), Some(&None));
        assert_eq!(c.counters.get("next_node"), Some(&4));
        assert_eq!(c.counters.len(), 1);
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
        }
    }
}

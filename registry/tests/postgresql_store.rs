#![allow(clippy::unwrap_used)]
//! `PgStore` on its own: the same batches give the same snapshot as redb, state survives a
//! new connection, a batch that breaks a constraint writes nothing, the schema is migrated
//! once and a newer one refused, a lost connection is reopened; and without a database, the
//! errors name it without its password (these run everywhere; the rest needs root).

use std::process::Command;

use pilot_registry::store::pg::{PgStore, SCHEMA_VERSION};
use pilot_registry::store::{
    InboxEntry, JoinRule, Mutation, NetworkRecord, NodeRecord, RedbStore, ResponseEntry, Store,
};

use crate::pg_cluster::Cluster;

fn node(id: u32, hostname: Option<&str>) -> NodeRecord {
    NodeRecord {
        id,
        public_key: ed25519_dalek::SigningKey::from_bytes(&[id as u8; 32])
            .verifying_key()
            .to_bytes(),
        owner: (id % 2 == 0).then(|| format!("owner{id}@example.com")),
        real_addr: Some(if id % 2 == 0 {
            "192.0.2.1:4000".parse().unwrap()
        } else {
            "[2001:db8::1]:4001".parse().unwrap()
        }),
        public: id % 3 == 0,
        hostname: hostname.map(str::to_owned),
        tags: vec!["gpu".into(), "a-b".into(), format!("t{id}")],
        polo_score: -3 * i64::from(id),
        task_exec: id % 2 == 1,
        session_auth: id == 1,
        active: true,
    }
}

fn network(id: u16, name: &str) -> NetworkRecord {
    NetworkRecord {
        id,
        name: name.into(),
        join_rule: JoinRule::Token,
        token: Some("secret".into()),
        created: 1_700_000_000,
        creator: 1,
    }
}

/// Batches touching every table, with later changes overriding earlier ones of a key.
fn batches() -> Vec<Vec<Mutation>> {
    vec![
        vec![
            Mutation::Node(node(1, Some("alpha"))),
            // Referencing rows before the rows they refer to: checked at commit.
            Mutation::Member {
                net: 3,
                node: 2,
                present: true,
            },
            Mutation::Node(node(2, None)),
            Mutation::Network(network(3, "lab")),
            Mutation::Member {
                net: 3,
                node: 1,
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
            Mutation::Consent {
                from: 2,
                to: 1,
                at: Some(6),
            },
            Mutation::Inbox {
                target: 2,
                from: 1,
                entry: Some(InboxEntry {
                    justification: "hi, it's me".into(),
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
        ],
        vec![
            // A hostname moves from node 1 to node 2 inside one batch, in either order.
            Mutation::Node(node(2, Some("alpha"))),
            Mutation::Node(node(1, Some("beta"))),
            Mutation::Node(node(4, Some("delta"))),
            Mutation::Member {
                net: 3,
                node: 2,
                present: false,
            },
            Mutation::Member {
                net: 3,
                node: 4,
                present: true,
            },
            Mutation::Member {
                net: 3,
                node: 4,
                present: false,
            },
            Mutation::Invite {
                net: 3,
                node: 2,
                inviter: None,
            },
            Mutation::Consent {
                from: 2,
                to: 1,
                at: None,
            },
            Mutation::Inbox {
                target: 2,
                from: 1,
                entry: None,
            },
            Mutation::Inbox {
                target: 1,
                from: 4,
                entry: Some(InboxEntry {
                    justification: "again".into(),
                    timestamp: 9,
                }),
            },
            Mutation::NextNode(5),
        ],
        vec![Mutation::Node(NodeRecord {
            active: false,
            real_addr: None,
            hostname: None,
            ..node(4, None)
        })],
    ]
}

#[test]
#[ignore = "root: starts a PostgreSQL cluster (initdb, pg_ctl) as user nobody"]
fn postgresql_holds_what_redb_holds_across_connections() {
    let cluster = Cluster::start();
    let url = cluster.fresh_database();
    let mut pg = PgStore::connect(&url).unwrap();
    let mut redb = RedbStore::in_memory().unwrap();
    assert!(pg.load().unwrap().is_empty());
    for b in batches() {
        pg.commit(&b).unwrap();
        redb.commit(&b).unwrap();
    }
    let expected = redb.load().unwrap();
    assert_eq!(expected.nodes[&2].hostname.as_deref(), Some("alpha"));
    assert_eq!(pg.load().unwrap(), expected);
    drop(pg);
    // A new connection, as a restarted registry makes, sees the same.
    let mut again = PgStore::connect(&url).unwrap();
    assert_eq!(again.load().unwrap(), expected);
    // The rows are relational: a trust pair is a row of its ordered pair.
    let db = url.rsplit('/').next().unwrap();
    assert_eq!(
        cluster.sql(db, "SELECT from_node || '>' || to_node FROM consents"),
        "1>2"
    );
    assert_eq!(
        cluster.sql(
            db,
            "SELECT array_to_string(tags, ',') FROM nodes WHERE id = 1"
        ),
        "gpu,a-b,t1"
    );
}

#[test]
#[ignore = "root: starts a PostgreSQL cluster (initdb, pg_ctl) as user nobody"]
fn postgresql_a_batch_breaking_a_constraint_writes_nothing() {
    let cluster = Cluster::start();
    let url = cluster.fresh_database();
    let mut pg = PgStore::connect(&url).unwrap();
    pg.commit(&batches()[0]).unwrap();
    let before = pg.load().unwrap();
    // Each bad batch also carries valid changes to several tables, which must not land.
    let valid = [
        Mutation::Node(node(7, Some("seven"))),
        Mutation::Network(network(8, "eight")),
        Mutation::Consent {
            from: 2,
            to: 7,
            at: Some(9),
        },
        Mutation::NextNode(8),
        Mutation::NextNet(9),
    ];
    let bad = [
        (
            "nodes_hostname_unique",
            Mutation::Node(node(9, Some("alpha"))),
        ),
        (
            "nodes_public_key_unique",
            Mutation::Node(NodeRecord {
                id: 9,
                ..node(1, None)
            }),
        ),
        ("networks_name_unique", Mutation::Network(network(9, "lab"))),
        (
            "members_node_fkey",
            Mutation::Member {
                net: 3,
                node: 99,
                present: true,
            },
        ),
        (
            "inbox_requester_fkey",
            Mutation::Inbox {
                target: 1,
                from: 99,
                entry: Some(InboxEntry {
                    justification: "ghost".into(),
                    timestamp: 1,
                }),
            },
        ),
    ];
    for (constraint, m) in bad {
        let mut batch = valid.to_vec();
        batch.insert(2, m);
        let e = pg.commit(&batch).unwrap_err().to_string();
        assert!(e.contains(constraint), "{constraint}: {e}");
        assert_eq!(pg.load().unwrap(), before, "{constraint}: partial write");
    }
    // The store is still usable, and the valid changes alone commit.
    pg.commit(&valid).unwrap();
    let after = pg.load().unwrap();
    assert_eq!(after.nodes[&7].hostname.as_deref(), Some("seven"));
    assert_eq!((after.next_node, after.next_net), (8, 9));
}

#[test]
#[ignore = "root: starts a PostgreSQL cluster (initdb, pg_ctl) as user nobody"]
fn postgresql_schema_is_migrated_once_and_a_newer_one_refused() {
    let cluster = Cluster::start();
    let url = cluster.fresh_database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    drop(PgStore::connect(&url).unwrap());
    drop(PgStore::connect(&url).unwrap());
    assert_eq!(
        cluster.sql(
            &db,
            "SELECT string_agg(version::text, ',') FROM schema_version"
        ),
        SCHEMA_VERSION.to_string()
    );
    cluster.sql(
        &db,
        &format!(
            "INSERT INTO schema_version (version, name) VALUES ({}, 'future')",
            SCHEMA_VERSION + 1
        ),
    );
    let e = PgStore::connect(&url).unwrap_err().to_string();
    assert!(e.contains("newer than this registry's"), "{e}");
}

#[test]
#[ignore = "root: starts a PostgreSQL cluster (initdb, pg_ctl) as user nobody"]
fn postgresql_a_lost_connection_is_reopened() {
    let cluster = Cluster::start();
    let url = cluster.fresh_database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let mut pg = PgStore::connect(&url).unwrap();
    pg.commit(&batches()[0]).unwrap();
    let killed = cluster.sql(
        &db,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'pilot-registry'",
    );
    assert_eq!(killed, "1");
    pg.commit(&batches()[1]).unwrap();
    assert_eq!(pg.load().unwrap().next_node, 5);
}

/// Nothing listens on port 1 of loopback.
const UNREACHABLE: &str = "postgres://pilot:s3cret-pw@127.0.0.1:1/registry";

#[test]
fn postgresql_unreachable_is_a_clear_error_without_the_password() {
    let e = PgStore::connect(UNREACHABLE).unwrap_err().to_string();
    assert!(!e.contains("s3cret-pw"), "{e}");
    assert!(
        e.contains("postgresql://pilot@127.0.0.1:1/registry") && e.contains("connecting"),
        "{e}"
    );
}

#[test]
fn postgresql_unreachable_stops_the_registry_at_start_without_the_password() {
    let out = Command::new(env!("CARGO_BIN_EXE_pilot-registry"))
        .args(["--addr", "127.0.0.1:0", "--store", UNREACHABLE])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("s3cret-pw"), "{all}");
    assert!(
        all.contains("postgresql://pilot@127.0.0.1:1/registry"),
        "{all}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_pilot-registry"))
        .args(["--store", UNREACHABLE, "--check-config"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    assert!(shown.contains("pilot:***@127.0.0.1:1"), "{shown}");
}

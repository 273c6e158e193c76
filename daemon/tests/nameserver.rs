#![allow(clippy::unwrap_used)]
//! The nameserver (port 53) between real nodes: A, N and S records registered and queried
//! over the wire, a node refused an A record for another node's address, a v1-style client
//! (no newline), operator records, and the store surviving a restart of the service.

use std::time::Duration;

use pilot_driver::services::nameserver::query;
use pilotd::local::dial;
use pilotd::nameserver::{NameLimits, Nameserver, Origin, NAMESERVER_PORT};
use pilotd::node::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel::services::nameserver::{
    parse_request, Record, RecordKey, Request, Response, ServiceEntry,
};
use tunnel::{Addr, SocketAddr as PilotAddr};

use crate::support;
use support::registry;

const WAIT: Duration = Duration::from_secs(20);

/// One request from `from` to the nameserver on node `to`.
async fn ask(from: &Node, to: u32, line: &str) -> Response {
    let req = parse_request(line).unwrap();
    tokio::time::timeout(WAIT, async {
        let mut s = dial(
            &from.daemon.engine,
            PilotAddr::new(Addr::new(0, to), NAMESERVER_PORT),
        )
        .await
        .unwrap();
        query(&mut s, &req).await.unwrap()
    })
    .await
    .expect("no answer in time")
}

fn err(r: &Response) -> bool {
    matches!(r, Response::Err(_))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_query_authorize_and_persist() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = support::bare_node(&reg, &dir.path().join("a")).await;
    let b = support::bare_node(&reg, &dir.path().join("b")).await;
    let c = support::bare_node(&reg, &dir.path().join("c")).await;
    let na = a.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let nb = b.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let nc = c.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let (addr_a, addr_c) = (Addr::new(0, na), Addr::new(0, nc));

    let store = dir.path().join("ns");
    let ns = Nameserver::open(&store, NameLimits::default()).unwrap();
    ns.start(&b.daemon.engine).await.unwrap();

    // A: own name, a network name, a service.
    let r = ask(&a, nb, &format!("REGISTER A alice {addr_a}")).await;
    assert_eq!(r, Response::Ok);
    assert_eq!(ask(&a, nb, "REGISTER N lab 3").await, Response::Ok);
    let r = ask(&a, nb, &format!("REGISTER S web {addr_a} 0 80")).await;
    assert_eq!(r, Response::Ok);
    // C offers the same service, and tries to pass A's address off as its own.
    let r = ask(&c, nb, &format!("REGISTER S web {addr_c} 0 80")).await;
    assert_eq!(r, Response::Ok);
    let r = ask(&c, nb, &format!("REGISTER A mallory {addr_a}")).await;
    assert!(err(&r), "C registered A's address: {r:?}");
    let r = ask(&c, nb, &format!("REGISTER S web {addr_a} 0 8080")).await;
    assert!(err(&r), "C registered a service at A's address: {r:?}");
    // Nor can C take A's name or network name while they live.
    let r = ask(&c, nb, &format!("REGISTER A alice {addr_c}")).await;
    assert!(err(&r), "C took A's name: {r:?}");
    assert!(err(&ask(&c, nb, "REGISTER N lab 4").await));

    // Anyone can query.
    let r = ask(&c, nb, "QUERY A alice").await;
    assert_eq!(
        r,
        Response::A {
            name: "alice".into(),
            addr: addr_a
        }
    );
    assert!(err(&ask(&c, nb, "QUERY A mallory").await));
    let r = ask(&c, nb, "QUERY N lab").await;
    assert_eq!(
        r,
        Response::N {
            name: "lab".into(),
            network: 3
        }
    );
    let Response::S(mut web) = ask(&c, nb, "QUERY S 0 80").await else {
        panic!("not an S answer");
    };
    web.sort_by_key(|e| e.addr);
    let mut want = vec![
        ServiceEntry {
            name: "web".into(),
            addr: addr_a,
            port: 80,
        },
        ServiceEntry {
            name: "web".into(),
            addr: addr_c,
            port: 80,
        },
    ];
    want.sort_by_key(|e| e.addr);
    assert_eq!(web, want);
    assert_eq!(ask(&c, nb, "QUERY S 0 8080").await, Response::S(vec![]));

    // A v1 client: the line without a newline, then one read of the answer.
    let mut s = dial(
        &a.daemon.engine,
        PilotAddr::new(Addr::new(0, nb), NAMESERVER_PORT),
    )
    .await
    .unwrap();
    s.write_all(b"query a alice").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, format!("A alice {addr_a}"));

    // A malformed and an oversize request get ERR.
    assert!(err(&raw(&a, nb, b"FROB X\n").await));
    assert!(raw(&a, nb, &vec![b'Q'; 4096]).await == Response::Err("request too long".into()));

    // The operator's record: permanent, served over the wire, not takeable.
    ns.add(Record::A {
        name: "gateway".into(),
        addr: Addr::new(0, nb),
    })
    .await
    .unwrap();
    assert_eq!(ns.lookup_a("gateway"), Some(Addr::new(0, nb)));
    let r = ask(&a, nb, "QUERY A gateway").await;
    assert_eq!(
        r,
        Response::A {
            name: "gateway".into(),
            addr: Addr::new(0, nb)
        }
    );
    assert!(err(
        &ask(&a, nb, &format!("REGISTER A gateway {addr_a}")).await
    ));
    ns.add(Record::N {
        name: "tmp".into(),
        network: 9,
    })
    .await
    .unwrap();
    assert!(ns.remove(&RecordKey::N("tmp".into())).await.unwrap());
    assert!(!ns.remove(&RecordKey::N("tmp".into())).await.unwrap());

    let stats = ns.stats();
    assert_eq!(stats.refused, 5);
    assert_eq!(stats.bad_requests, 2);
    let listed = ns.list();
    assert_eq!(listed.len(), 5, "{listed:?}");
    assert!(listed
        .iter()
        .any(|i| i.origin == Origin::Local && i.expires.is_none()));
    assert!(listed
        .iter()
        .filter(|i| i.origin != Origin::Local)
        .all(|i| i.expires.is_some()));

    // Restart: a new service from the same store (served by C this time) answers the
    // same records.
    ns.flush().await.unwrap();
    let again = Nameserver::open(&store, NameLimits::default()).unwrap();
    assert_eq!(again.list(), listed);
    again.start(&c.daemon.engine).await.unwrap();
    let r = ask(&a, nc, "QUERY A alice").await;
    assert_eq!(
        r,
        Response::A {
            name: "alice".into(),
            addr: addr_a
        }
    );
    let r = ask(&a, nc, "QUERY A gateway").await;
    assert_eq!(
        r,
        Response::A {
            name: "gateway".into(),
            addr: Addr::new(0, nb)
        }
    );
    let Response::S(web) = ask(&a, nc, "QUERY S 0 80").await else {
        panic!("not an S answer");
    };
    assert_eq!(web.len(), 2);
    // Ownership survives too.
    let addr_b = Addr::new(0, nb);
    assert!(err(
        &ask(&b, nc, &format!("REGISTER A alice {addr_b}")).await
    ));
    assert_eq!(
        ask(&b, nc, &format!("REGISTER A bob {addr_b}")).await,
        Response::Ok
    );

    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

/// Remote registrations reach the store without an explicit flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_registrations_are_written_soon() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = support::bare_node(&reg, &dir.path().join("a")).await;
    let b = support::bare_node(&reg, &dir.path().join("b")).await;
    let na = a.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let nb = b.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let store = dir.path().join("ns");
    let ns = Nameserver::open(&store, NameLimits::default()).unwrap();
    ns.start(&b.daemon.engine).await.unwrap();
    let line = format!("REGISTER A bob {}", Addr::new(0, na));
    assert_eq!(ask(&a, nb, &line).await, Response::Ok);
    tokio::time::timeout(WAIT, async {
        loop {
            let loaded = Nameserver::open(&store, NameLimits::default()).unwrap();
            if loaded.lookup_a("bob") == Some(Addr::new(0, na)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("registration never written");
    a.shutdown().await;
    b.shutdown().await;
}

/// Raw bytes as a request; the parsed answer.
async fn raw(from: &Node, to: u32, bytes: &[u8]) -> Response {
    let mut s = dial(
        &from.daemon.engine,
        PilotAddr::new(Addr::new(0, to), NAMESERVER_PORT),
    )
    .await
    .unwrap();
    s.write_all(bytes).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    tunnel::services::nameserver::parse_response(&answer).unwrap()
}

#[test]
fn request_lines_round_trip() {
    let r = Request::Register(Record::S {
        name: "web".into(),
        addr: Addr::new(1, 2),
        network: 1,
        port: 80,
    });
    assert_eq!(parse_request(&r.to_line()).unwrap(), r);
}

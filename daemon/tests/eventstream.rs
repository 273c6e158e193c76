#![allow(clippy::unwrap_used)]
//! The event stream broker (port 1002) between real nodes: exact topics, the `*` wildcard,
//! no echo to the publisher, a subscriber that never reads, oversize topics; and the
//! disconnection of a stalled subscriber, in process.

use std::time::Duration;

use pilot_driver::services::eventstream::{next_event, publish, subscribe};
use pilotd::events::{Event, Events};
use pilotd::eventstream::{Broker, BrokerLimits, EVENT_STREAM_PORT};
use pilotd::local::{dial, LocalStream};
use pilotd::node::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tunnel::services::eventstream::{encode_frame, MAX_TOPIC};
use tunnel::{Addr, SocketAddr as PilotAddr};

use crate::support;
use support::registry;

const WAIT: Duration = Duration::from_secs(20);

/// Two registered nodes; B runs a broker with `limits`.
struct Pair {
    a: Node,
    b: Node,
    broker: Broker,
    events: mpsc::Receiver<Event>,
    dst: PilotAddr,
    _dir: tempfile::TempDir,
}

async fn pair(limits: BrokerLimits) -> Pair {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let a = support::bare_node(&reg, &dir.path().join("a")).await;
    let b = support::bare_node(&reg, &dir.path().join("b")).await;
    a.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let nb = b.daemon.registered(Duration::from_secs(10)).await.unwrap();
    let (ev, events) = Events::channel();
    let broker = Broker::start(&b.daemon.engine, ev, limits).await.unwrap();
    Pair {
        a,
        b,
        broker,
        events,
        dst: PilotAddr::new(Addr::new(0, nb), EVENT_STREAM_PORT),
        _dir: dir,
    }
}

impl Pair {
    async fn conn(&self, topic: &str) -> LocalStream {
        let mut s = dial(&self.a.daemon.engine, self.dst).await.unwrap();
        subscribe(&mut s, topic).await.unwrap();
        s
    }

    async fn wait_subscribers(&self, n: usize) {
        tokio::time::timeout(WAIT, async {
            while self.broker.stats().subscribers != n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("subscriptions did not arrive");
    }

    async fn shutdown(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

async fn next(s: &mut LocalStream) -> (String, Vec<u8>) {
    tokio::time::timeout(WAIT, next_event(s))
        .await
        .expect("no event in time")
        .unwrap()
        .expect("stream ended")
}

fn ev(topic: &str, payload: &[u8]) -> (String, Vec<u8>) {
    (topic.to_owned(), payload.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_topics_wildcard_and_no_echo_to_the_publisher() {
    let mut p = pair(BrokerLimits::default()).await;
    let mut news = p.conn("news").await;
    let mut all = p.conn("*").await;
    let mut other = p.conn("other").await;
    let mut publisher = p.conn("news").await;
    p.wait_subscribers(4).await;

    // Each step's events are read before the next step publishes from another connection,
    // so the order every subscriber sees is fixed.
    publish(&mut publisher, "news", b"hello").await.unwrap();
    publish(&mut publisher, "other", b"x").await.unwrap();
    assert_eq!(next(&mut news).await, ev("news", b"hello"));
    assert_eq!(next(&mut all).await, ev("news", b"hello"));
    assert_eq!(next(&mut all).await, ev("other", b"x"));
    assert_eq!(next(&mut other).await, ev("other", b"x"));

    // The news subscriber publishes: the other news subscriber (the first publisher) and
    // the wildcard get it. The publisher's first event is this one, not its own.
    publish(&mut news, "news", b"from-news").await.unwrap();
    assert_eq!(next(&mut publisher).await, ev("news", b"from-news"));
    assert_eq!(next(&mut all).await, ev("news", b"from-news"));

    publish(&mut other, "news", b"end").await.unwrap();
    // Had `from-news` come back to its sender it would be queued before `end`.
    assert_eq!(
        next(&mut news).await,
        ev("news", b"end"),
        "own event echoed"
    );
    assert_eq!(next(&mut publisher).await, ev("news", b"end"));
    assert_eq!(next(&mut all).await, ev("news", b"end"));

    // Had `other` received a news event (or its own `end`) it would come before `last`.
    publish(&mut news, "other", b"last").await.unwrap();
    assert_eq!(next(&mut other).await, ev("other", b"last"));
    assert_eq!(next(&mut all).await, ev("other", b"last"));

    let stats = p.broker.stats();
    assert_eq!(stats.published, 5);
    assert_eq!(stats.delivered, 11);
    assert_eq!(stats.dropped, 0);

    // Closing a subscriber's sending side ends its subscription.
    other.shutdown().await.unwrap();
    p.wait_subscribers(3).await;
    let mut names = Vec::new();
    while let Ok(e) = p.events.try_recv() {
        names.push((e.name, e.data.unwrap()));
    }
    let count = |n: &str| names.iter().filter(|(name, _)| *name == n).count();
    assert_eq!(count("pubsub.subscribed"), 4);
    assert_eq!(count("pubsub.published"), 5);
    assert_eq!(count("pubsub.unsubscribed"), 1);
    let (_, first_pub) = names
        .iter()
        .find(|(n, _)| *n == "pubsub.published")
        .unwrap();
    assert_eq!(first_pub["topic"], "news");
    assert_eq!(first_pub["size"], 5);
    let na = p.a.daemon.engine.node();
    assert!(
        first_pub["from"]
            .as_str()
            .unwrap()
            .starts_with(&Addr::new(0, na).to_string()),
        "from = {}",
        first_pub["from"]
    );
    drop((news, all, publisher));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_does_not_hold_up_the_others() {
    let limits = BrokerLimits {
        queue_events: 16,
        queue_bytes: 1 << 20,
        ..BrokerLimits::default()
    };
    let p = pair(limits).await;
    // Subscribed to everything and never read.
    let slow = p.conn("*").await;
    let mut fast = p.conn("t").await;
    let mut publisher = p.conn("p").await;
    p.wait_subscribers(3).await;

    // More than everything between the broker and the slow socket can buffer (engine
    // credit, send and receive windows, connection queue, local pipes). The publisher waits
    // for the fast subscriber to have each event before sending the next, so the fast
    // subscriber's queue never overflows: whatever is dropped is the slow one's.
    const N: usize = 64;
    const SIZE: usize = 512 * 1024;
    let (ack, mut acks) = mpsc::channel::<()>(1);
    let reader = tokio::spawn(async move {
        for i in 0..N {
            let (topic, payload) = next_event(&mut fast).await.unwrap().unwrap();
            assert_eq!(topic, "t");
            assert_eq!(payload.len(), SIZE);
            assert!(payload.iter().all(|&b| b == i as u8), "event {i} corrupt");
            ack.send(()).await.unwrap();
        }
        fast
    });
    let done = tokio::time::timeout(Duration::from_secs(60), async {
        for i in 0..N {
            publish(&mut publisher, "t", &vec![i as u8; SIZE])
                .await
                .unwrap();
            acks.recv().await.unwrap();
        }
        reader.await.unwrap()
    })
    .await
    .expect("delivery held up by the slow subscriber");
    let stats = p.broker.stats();
    assert_eq!(stats.published, N as u64);
    assert!(
        stats.dropped > 0,
        "the slow subscriber never overflowed: {stats:?}"
    );
    assert_eq!(stats.slow_disconnects, 0);
    drop((slow, done, publisher));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_topic_is_refused() {
    let p = pair(BrokerLimits::default()).await;
    assert!(
        subscribe(&mut tokio::io::sink(), &"x".repeat(MAX_TOPIC + 1))
            .await
            .is_err()
    );
    assert!(encode_frame(&"x".repeat(MAX_TOPIC), b"").is_ok());

    // As a subscription: the header alone ends the connection.
    let mut s = dial(&p.a.daemon.engine, p.dst).await.unwrap();
    s.write_all(&((MAX_TOPIC + 1) as u16).to_be_bytes())
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("connection not closed")
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(p.broker.stats().bad_frames, 1);
    assert_eq!(p.broker.stats().subscribers, 0);

    // As a publication from a subscriber: it loses its subscription and connection.
    let mut s = p.conn("ok").await;
    p.wait_subscribers(1).await;
    s.write_all(&[0xFF, 0xFF]).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("connection not closed")
        .unwrap();
    p.wait_subscribers(0).await;
    assert_eq!(p.broker.stats().bad_frames, 2);
    p.shutdown().await;
}

#[tokio::test]
async fn a_stalled_subscriber_is_disconnected_in_process() {
    let (ev, mut events) = Events::channel();
    let broker = Broker::new(
        ev,
        BrokerLimits {
            queue_events: 2,
            queue_bytes: 1024,
            stall_timeout: Duration::from_millis(200),
            ..BrokerLimits::default()
        },
    );
    let remote = PilotAddr::new(Addr::new(0, 9), 49152);
    // Pipes of 256 bytes: the slow side fills at once.
    let (mut slow, server) = tokio::io::duplex(256);
    broker.serve(server, remote);
    subscribe(&mut slow, "t").await.unwrap();
    let (mut publisher, server) = tokio::io::duplex(1 << 16);
    broker.serve(server, remote);
    subscribe(&mut publisher, "p").await.unwrap();
    tokio::time::timeout(WAIT, async {
        while broker.stats().subscribers != 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();

    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.stats().slow_disconnects == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never disconnected");
        publish(&mut publisher, "t", &[1; 200]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = broker.stats();
    assert_eq!(stats.subscribers, 1);
    assert!(stats.dropped > 0);
    // The slow side's stream ends once what was already in its pipe is read.
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, slow.read_to_end(&mut rest))
        .await
        .expect("stalled subscriber not closed")
        .unwrap();
    let mut unsubscribed = 0;
    while let Ok(e) = events.try_recv() {
        if e.name == "pubsub.unsubscribed" {
            assert_eq!(e.data.unwrap()["topic"], "t");
            unsubscribed += 1;
        }
    }
    assert_eq!(unsubscribed, 1);
}

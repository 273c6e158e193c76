//! The event stream broker on virtual port 1002 (v1 wire §8.3). The frame codec is
//! [`tunnel::services::eventstream`]; the client calls (subscribe, publish, read events) are
//! `pilot_driver::services::eventstream`.
//!
//! # Broker
//!
//! 1. The **first** frame on a connection is its subscription: its topic is kept, its
//!    payload discarded. Topic `*` subscribes to every topic.
//! 2. Every later frame is **published**: queued for every subscriber of exactly that topic
//!    and every `*` subscriber, never for the connection that sent it.
//! 3. The subscription ends when the connection's sending side ends (EOF), on a bad frame,
//!    or when a write to it fails. A client therefore keeps its sending side open for as
//!    long as it wants events.
//!
//! # Slow subscribers
//!
//! Publishing never waits for a subscriber. Each subscriber has its own bounded queue
//! ([`BrokerLimits::queue_events`] frames and [`BrokerLimits::queue_bytes`] bytes; a single
//! frame larger than the byte bound is still taken by an empty queue), and all queues
//! together hold at most [`BrokerLimits::total_queued_bytes`]. A frame that does not fit is
//! dropped for that subscriber only and counted. A subscriber that keeps overflowing its
//! own queue while not one frame is written to it for [`BrokerLimits::stall_timeout`] is
//! disconnected: it is no longer reading, and its queue only holds memory. A subscriber that
//! reads slowly but steadily is never disconnected; it just misses what overflows.
//!
//! Frames being read are bounded too: payload bytes are reserved from a shared budget
//! ([`BrokerLimits::readbudget`]) in chunks as they arrive, so memory follows what peers
//! really sent, and a frame whose body does not arrive within
//! [`BrokerLimits::frame_timeout`] ends its connection.
//!
//! # Webhook events
//!
//! `pubsub.subscribed` and `pubsub.unsubscribed` `{topic, remote}`, `pubsub.published`
//! `{topic, size, from}` (v1 wire §8.8), through [`Events`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tunnel::services::eventstream::{
    check_payload_len, check_topic_len, encode_frame_header, FrameError, PAYLOAD_LEN_BYTES,
};
pub use tunnel::services::eventstream::{EVENT_STREAM_PORT, WILDCARD};
use tunnel::SocketAddr as PilotAddr;

use crate::engine::EngineHandle;
use crate::events::Events;
use crate::local::LocalListener;
use crate::ratelog::LogGate;
use crate::services::PortError;

/// Payload bytes reserved and read at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Least interval between two warnings of one kind.
const LOG_EVERY: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Reading frames

/// A frame read from a stream: the whole encoded frame (so it can be forwarded as is),
/// its topic, and the read budget its payload holds.
#[derive(Debug)]
struct RawFrame {
    bytes: Vec<u8>,
    topic: String,
    payload_len: usize,
    budget: Option<OwnedSemaphorePermit>,
}

/// What to do with a frame's payload while reading it.
enum Payload<'a> {
    /// Read and discard it.
    Discard,
    /// Keep it, reserving its bytes from `budget` as they arrive (none: no reservation).
    Keep(Option<&'a Arc<Semaphore>>),
}

/// Reads one frame. `Ok(None)` at a clean end of stream (before a frame's first byte). The
/// rest of a frame, once its first byte is in, must arrive within `body_timeout`.
async fn read_raw<R: AsyncRead + Unpin>(
    rd: &mut R,
    payload: Payload<'_>,
    body_timeout: Option<Duration>,
) -> Result<Option<RawFrame>, FrameError> {
    let first = match rd.read_u8().await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let rest = read_rest(rd, first, payload);
    match body_timeout {
        Some(t) => tokio::time::timeout(t, rest)
            .await
            .map_err(|_| FrameError::Timeout)?,
        None => rest.await,
    }
    .map(Some)
}

async fn read_rest<R: AsyncRead + Unpin>(
    rd: &mut R,
    first: u8,
    payload: Payload<'_>,
) -> Result<RawFrame, FrameError> {
    let second = rd.read_u8().await.map_err(FrameError::inside_frame)?;
    let topic_len = usize::from(u16::from_be_bytes([first, second]));
    check_topic_len(topic_len)?;
    let mut topic = vec![0u8; topic_len];
    rd.read_exact(&mut topic)
        .await
        .map_err(FrameError::inside_frame)?;
    let payload_len = check_payload_len(u64::from(
        rd.read_u32().await.map_err(FrameError::inside_frame)?,
    ))?;
    let topic = String::from_utf8(topic).map_err(|_| FrameError::TopicNotUtf8)?;
    match payload {
        Payload::Discard => {
            let mut limited = (&mut *rd).take(payload_len as u64);
            let n = tokio::io::copy(&mut limited, &mut tokio::io::sink()).await?;
            if n != payload_len as u64 {
                return Err(FrameError::Truncated);
            }
            Ok(RawFrame {
                bytes: Vec::new(),
                topic,
                payload_len,
                budget: None,
            })
        }
        Payload::Keep(budget) => {
            let mut bytes = encode_frame_header(&topic, 0)?;
            let header_len = bytes.len();
            // The payload length sits at the end of the header; it was encoded as 0 above.
            if let Some(len) = bytes.get_mut(header_len - PAYLOAD_LEN_BYTES..) {
                len.copy_from_slice(&(payload_len as u32).to_be_bytes());
            }
            bytes.reserve(payload_len.min(READ_CHUNK));
            let mut held: Option<OwnedSemaphorePermit> = None;
            let mut left = payload_len;
            while left > 0 {
                let n = left.min(READ_CHUNK);
                if let Some(budget) = budget {
                    // n ≤ READ_CHUNK, so it fits a u32.
                    let p = budget
                        .clone()
                        .acquire_many_owned(n as u32)
                        .await
                        .map_err(|_| FrameError::Truncated)?;
                    match &mut held {
                        Some(h) => h.merge(p),
                        None => held = Some(p),
                    }
                }
                let start = bytes.len();
                bytes.resize(start + n, 0);
                let dst = bytes.get_mut(start..).ok_or(FrameError::Truncated)?;
                rd.read_exact(dst).await.map_err(FrameError::inside_frame)?;
                left -= n;
            }
            Ok(RawFrame {
                bytes,
                topic,
                payload_len,
                budget: held,
            })
        }
    }
}
// ---------------------------------------------------------------------------------------
// Broker

/// Bounds of the broker. Every one applies to input from the network.
#[derive(Debug, Clone)]
pub struct BrokerLimits {
    /// Connections served at once (each one is a subscriber once it sent its first frame);
    /// more are closed at once.
    pub max_connections: usize,
    /// Distinct subscribed topics; a subscription to a new topic beyond it is refused.
    pub max_topics: usize,
    /// Frames queued for one subscriber.
    pub queue_events: usize,
    /// Bytes queued for one subscriber (an empty queue still takes one larger frame).
    pub queue_bytes: usize,
    /// Bytes queued for all subscribers together (a frame queued for several subscribers
    /// counts once per subscriber, so this overstates memory, never understates it).
    pub total_queued_bytes: usize,
    /// Payload bytes being read on all connections together.
    pub readbudget: usize,
    /// Time a new connection has to send its subscription frame.
    pub subscribe_timeout: Duration,
    /// Time a frame's body has to arrive once its first byte did.
    pub frame_timeout: Duration,
    /// A subscriber that overflows its queue and writes nothing for this long is
    /// disconnected.
    pub stall_timeout: Duration,
    /// Time a subscriber whose sending side ended gets to take what is queued for it.
    pub drain_timeout: Duration,
}

impl Default for BrokerLimits {
    fn default() -> Self {
        BrokerLimits {
            max_connections: 256,
            max_topics: 1024,
            queue_events: 1024,
            queue_bytes: 8 << 20,
            total_queued_bytes: 256 << 20,
            readbudget: 64 << 20,
            subscribe_timeout: Duration::from_secs(30),
            frame_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters and gauges of the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BrokerStats {
    /// Connections being served.
    pub connections: usize,
    /// Current subscribers.
    pub subscribers: usize,
    /// Distinct subscribed topics.
    pub topics: usize,
    /// Frames published.
    pub published: u64,
    /// Frames queued for a subscriber (one per subscriber reached).
    pub delivered: u64,
    /// Frames dropped for a subscriber whose queue was full.
    pub dropped: u64,
    /// Subscribers disconnected for not reading.
    pub slow_disconnects: u64,
    /// Connections ended by a bad frame (oversize, not UTF-8, truncated, too slow).
    pub bad_frames: u64,
    /// Connections or subscriptions refused by a limit.
    pub refused: u64,
}

/// The broker: cheap to clone; every clone is the same broker.
#[derive(Debug, Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limits: BrokerLimits,
    events: Events,
    state: Mutex<State>,
    connections: AtomicUsize,
    total_queued: Arc<AtomicUsize>,
    readbudget: Arc<Semaphore>,
    published: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    slow_disconnects: AtomicU64,
    bad_frames: AtomicU64,
    refused: AtomicU64,
    log_bad: LogGate,
    log_drop: LogGate,
    log_refused: LogGate,
}

#[derive(Debug, Default)]
struct State {
    subs: HashMap<u64, Sub>,
    topics: HashMap<String, HashSet<u64>>,
    next_id: u64,
}

#[derive(Debug)]
struct Sub {
    topic: String,
    remote: PilotAddr,
    tx: mpsc::Sender<Queued>,
    queued: Arc<AtomicUsize>,
    /// Frames its writer has finished.
    progress: Arc<AtomicU64>,
    /// Since when it overflows, and its progress then.
    stalled: Option<(Instant, u64)>,
    kill: Arc<Notify>,
}

/// A frame in a subscriber's queue; its bytes are counted until it is dropped.
#[derive(Debug)]
struct Queued {
    frame: Arc<Vec<u8>>,
    sub: Arc<AtomicUsize>,
    total: Arc<AtomicUsize>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let n = self.frame.len();
        self.sub.fetch_sub(n, Ordering::Relaxed);
        self.total.fetch_sub(n, Ordering::Relaxed);
    }
}

enum Offer {
    Queued,
    Dropped,
    Stalled,
}

impl Broker {
    /// A broker that emits its webhook events to `events`.
    pub fn new(events: Events, limits: BrokerLimits) -> Broker {
        let readbudget = Arc::new(Semaphore::new(limits.readbudget.max(READ_CHUNK)));
        Broker {
            inner: Arc::new(Inner {
                limits,
                events,
                state: Mutex::default(),
                connections: AtomicUsize::new(0),
                total_queued: Arc::default(),
                readbudget,
                published: AtomicU64::new(0),
                delivered: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                slow_disconnects: AtomicU64::new(0),
                bad_frames: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                log_bad: LogGate::new(LOG_EVERY),
                log_drop: LogGate::new(LOG_EVERY),
                log_refused: LogGate::new(LOG_EVERY),
            }),
        }
    }

    /// Starts a broker on the engine's port [`EVENT_STREAM_PORT`]; it serves until the
    /// engine stops.
    pub async fn start(
        engine: &EngineHandle,
        events: Events,
        limits: BrokerLimits,
    ) -> Result<Broker, PortError> {
        let broker = Broker::new(events, limits);
        let mut listener = LocalListener::bind(engine, EVENT_STREAM_PORT)
            .await
            .map_err(PortError::on(EVENT_STREAM_PORT))?;
        let b = broker.clone();
        tokio::spawn(async move {
            while let Some((stream, remote)) = listener.accept().await {
                b.serve(stream, remote);
            }
        });
        Ok(broker)
    }

    /// Serves one connection from `remote` on a task of its own.
    pub fn serve<S>(&self, stream: S, remote: PilotAddr)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let inner = &self.inner;
        let n = inner.connections.fetch_add(1, Ordering::Relaxed);
        if n >= inner.limits.max_connections {
            inner.connections.fetch_sub(1, Ordering::Relaxed);
            inner.refuse(remote, "too many connections");
            return;
        }
        tokio::spawn(serve_conn(inner.clone(), stream, remote));
    }

    /// Current counters.
    pub fn stats(&self) -> BrokerStats {
        let i = &self.inner;
        let (subscribers, topics) = {
            let st = i.lock();
            (st.subs.len(), st.topics.len())
        };
        BrokerStats {
            connections: i.connections.load(Ordering::Relaxed),
            subscribers,
            topics,
            published: i.published.load(Ordering::Relaxed),
            delivered: i.delivered.load(Ordering::Relaxed),
            dropped: i.dropped.load(Ordering::Relaxed),
            slow_disconnects: i.slow_disconnects.load(Ordering::Relaxed),
            bad_frames: i.bad_frames.load(Ordering::Relaxed),
            refused: i.refused.load(Ordering::Relaxed),
        }
    }
}

/// Gives the connection slot back however the connection task ends.
struct ConnSlot(Arc<Inner>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_conn<S>(inner: Arc<Inner>, stream: S, remote: PilotAddr)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let _slot = ConnSlot(inner.clone());
    let (mut rd, mut wr) = tokio::io::split(stream);
    let limits = &inner.limits;
    let first = tokio::time::timeout(
        limits.subscribe_timeout,
        read_raw(&mut rd, Payload::Discard, None),
    )
    .await;
    let topic = match first {
        Ok(Ok(Some(f))) => f.topic,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return inner.bad_frame(remote, &e),
        Err(_) => return inner.bad_frame(remote, &FrameError::Timeout),
    };
    let (tx, mut rx) = mpsc::channel::<Queued>(limits.queue_events.max(1));
    let Some((id, progress, kill)) = inner.subscribe(&topic, remote, tx) else {
        return;
    };

    let writer = async {
        while let Some(q) = rx.recv().await {
            if wr.write_all(&q.frame).await.is_err() {
                return;
            }
            progress.fetch_add(1, Ordering::Relaxed);
        }
        let _ = wr.shutdown().await;
    };
    let reader = async {
        loop {
            let body_timeout = Some(limits.frame_timeout);
            match read_raw(
                &mut rd,
                Payload::Keep(Some(&inner.readbudget)),
                body_timeout,
            )
            .await
            {
                Ok(Some(f)) => inner.publish(id, remote, f),
                Ok(None) => return,
                Err(e) => return inner.bad_frame(remote, &e),
            }
        }
    };
    tokio::pin!(writer, reader);
    let reader_ended = tokio::select! {
        () = &mut reader => true,
        () = &mut writer => false,
        () = kill.notified() => false,
    };
    inner.unsubscribe(id);
    if reader_ended {
        // The queue's sender is gone, so the writer finishes what waits and stops.
        let _ = tokio::time::timeout(limits.drain_timeout, &mut writer).await;
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, remote: PilotAddr, why: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if self.log_refused.allow().is_some() {
            tracing::warn!(peer = %remote, why, "eventstream: connection refused");
        }
    }

    fn bad_frame(&self, remote: PilotAddr, e: &FrameError) {
        self.bad_frames.fetch_add(1, Ordering::Relaxed);
        if self.log_bad.allow().is_some() {
            tracing::warn!(peer = %remote, error = %e, "eventstream: bad frame; closing");
        }
    }

    /// Adds a subscriber; `None` when a limit refuses it.
    fn subscribe(
        &self,
        topic: &str,
        remote: PilotAddr,
        tx: mpsc::Sender<Queued>,
    ) -> Option<(u64, Arc<AtomicU64>, Arc<Notify>)> {
        let progress = Arc::new(AtomicU64::new(0));
        let kill = Arc::new(Notify::new());
        let mut st = self.lock();
        if !st.topics.contains_key(topic) && st.topics.len() >= self.limits.max_topics {
            drop(st);
            self.refuse(remote, "too many topics");
            return None;
        }
        let id = st.next_id;
        st.next_id += 1;
        st.topics.entry(topic.to_owned()).or_default().insert(id);
        st.subs.insert(
            id,
            Sub {
                topic: topic.to_owned(),
                remote,
                tx,
                queued: Arc::default(),
                progress: progress.clone(),
                stalled: None,
                kill: kill.clone(),
            },
        );
        drop(st);
        self.events.emit(
            "pubsub.subscribed",
            json!({"topic": topic, "remote": remote.to_string()}),
        );
        Some((id, progress, kill))
    }

    /// Removes a subscriber if it is still there, and reports it.
    fn unsubscribe(&self, id: u64) {
        let removed = remove_sub(&mut self.lock(), id);
        if let Some(sub) = removed {
            self.emit_unsubscribed(&sub);
        }
    }

    fn emit_unsubscribed(&self, sub: &Sub) {
        self.events.emit(
            "pubsub.unsubscribed",
            json!({"topic": sub.topic, "remote": sub.remote.to_string()}),
        );
    }

    /// Queues a frame for its topic's subscribers and the wildcard subscribers, except the
    /// sender. Never waits.
    fn publish(&self, from: u64, remote: PilotAddr, frame: RawFrame) {
        let RawFrame {
            bytes,
            topic,
            payload_len,
            budget,
        } = frame;
        let bytes = Arc::new(bytes);
        let now = Instant::now();
        let (mut delivered, mut dropped) = (0u64, 0u64);
        let mut stalled = Vec::new();
        {
            let mut st = self.lock();
            let mut targets: Vec<u64> = st
                .topics
                .get(&topic)
                .into_iter()
                .flatten()
                .copied()
                .collect();
            if topic != WILDCARD {
                targets.extend(st.topics.get(WILDCARD).into_iter().flatten().copied());
            }
            for id in targets {
                if id == from {
                    continue;
                }
                let Some(sub) = st.subs.get_mut(&id) else {
                    continue;
                };
                match self.offer(sub, &bytes, now) {
                    Offer::Queued => delivered += 1,
                    Offer::Dropped => dropped += 1,
                    Offer::Stalled => {
                        dropped += 1;
                        stalled.push(id);
                    }
                }
            }
            let killed: Vec<Sub> = stalled
                .into_iter()
                .filter_map(|id| remove_sub(&mut st, id))
                .collect();
            drop(st);
            for sub in killed {
                sub.kill.notify_one();
                self.emit_unsubscribed(&sub);
                self.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                if self.log_drop.allow().is_some() {
                    tracing::warn!(peer = %sub.remote, topic = %sub.topic,
                        "eventstream: subscriber does not read; disconnected");
                }
            }
        }
        drop(budget);
        self.published.fetch_add(1, Ordering::Relaxed);
        self.delivered.fetch_add(delivered, Ordering::Relaxed);
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
            if self.log_drop.allow().is_some() {
                tracing::warn!(topic = %topic, dropped,
                    "eventstream: subscriber queues full; events dropped");
            }
        }
        self.events.emit(
            "pubsub.published",
            json!({"topic": topic, "size": payload_len, "from": remote.to_string()}),
        );
    }

    /// Tries to queue `frame` for `sub` without waiting.
    fn offer(&self, sub: &mut Sub, frame: &Arc<Vec<u8>>, now: Instant) -> Offer {
        let n = frame.len();
        let limits = &self.limits;
        let queued = sub.queued.load(Ordering::Relaxed);
        let fits = (queued == 0 || queued + n <= limits.queue_bytes)
            && self.total_queued.load(Ordering::Relaxed) + n <= limits.total_queued_bytes;
        if fits {
            sub.queued.fetch_add(n, Ordering::Relaxed);
            self.total_queued.fetch_add(n, Ordering::Relaxed);
            let q = Queued {
                frame: frame.clone(),
                sub: sub.queued.clone(),
                total: self.total_queued.clone(),
            };
            // On failure `q` is dropped here, which gives its bytes back.
            if sub.tx.try_send(q).is_ok() {
                sub.stalled = None;
                return Offer::Queued;
            }
        }
        if sub.queued.load(Ordering::Relaxed) == 0 {
            // Nothing of its own waits (all queues together are full): it is not the one
            // holding things up.
            sub.stalled = None;
            return Offer::Dropped;
        }
        let progress = sub.progress.load(Ordering::Relaxed);
        match sub.stalled {
            Some((since, p)) if p == progress => {
                if now.duration_since(since) >= limits.stall_timeout {
                    return Offer::Stalled;
                }
            }
            _ => sub.stalled = Some((now, progress)),
        }
        Offer::Dropped
    }
}

fn remove_sub(st: &mut State, id: u64) -> Option<Sub> {
    let sub = st.subs.remove(&id)?;
    if let Some(set) = st.topics.get_mut(&sub.topic) {
        set.remove(&id);
        if set.is_empty() {
            st.topics.remove(&sub.topic);
        }
    }
    Some(sub)
}
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tunnel::services::eventstream::MAX_PAYLOAD;

    #[tokio::test]
    async fn a_huge_announced_payload_allocates_only_what_arrives() {
        // 16 MiB announced, 10 bytes sent: the reader fails as truncated without having
        // reserved the announced size.
        let mut wire = vec![0, 1, b't'];
        wire.extend_from_slice(&(MAX_PAYLOAD as u32).to_be_bytes());
        wire.extend_from_slice(&[7; 10]);
        let budget = Arc::new(Semaphore::new(READ_CHUNK));
        let mut rd = &wire[..];
        let r = read_raw(&mut rd, Payload::Keep(Some(&budget)), None).await;
        assert!(matches!(r, Err(FrameError::Truncated)));
        assert_eq!(budget.available_permits(), READ_CHUNK);
    }
}

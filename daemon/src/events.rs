//! The daemon's event feed: what happened (registered, connection, trust, message, file,
//! pub/sub, ...) as named JSON events, for the webhook poster (v1 wire §8.8) and anything
//! else that listens.
//!
//! Emitting never blocks and never fails: events go into a bounded queue, and when it is full
//! (or nothing listens) they are dropped and counted. So the packet path and the services can
//! emit freely.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::Value;
use tokio::sync::mpsc;

/// Events queued for the listener before new ones are dropped (v1 queues 1024).
pub const EVENT_QUEUE: usize = 1024;

/// One event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Its name, v1 style: `node.registered`, `message.received`, `pubsub.published`, ...
    pub name: &'static str,
    /// When it happened.
    pub at: SystemTime,
    /// Its fields, if any.
    pub data: Option<Value>,
}

/// Where events are emitted. Cheap to clone; a default value drops everything.
#[derive(Debug, Clone, Default)]
pub struct Events {
    tx: Option<mpsc::Sender<Event>>,
    dropped: Arc<AtomicU64>,
    queued: Arc<AtomicU64>,
    wanted: Arc<AtomicBool>,
}

impl Events {
    /// A feed and the receiving end of its queue.
    pub fn channel() -> (Events, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        (
            Events {
                tx: Some(tx),
                dropped: Arc::default(),
                queued: Arc::default(),
                wanted: Arc::new(AtomicBool::new(true)),
            },
            rx,
        )
    }

    /// Emits an event with fields.
    pub fn emit(&self, name: &'static str, data: Value) {
        self.push(Event {
            name,
            at: SystemTime::now(),
            data: Some(data),
        });
    }

    /// Emits an event without fields.
    pub fn emit_bare(&self, name: &'static str) {
        self.push(Event {
            name,
            at: SystemTime::now(),
            data: None,
        });
    }

    fn push(&self, ev: Event) {
        let sent = match &self.tx {
            Some(tx) => tx.try_send(ev).is_ok(),
            None => false,
        };
        if sent {
            self.queued.fetch_add(1, Ordering::Relaxed);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events queued so far (emitted and not dropped).
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether the events are consumed now. Emitters on the packet path check it before they
    /// build an event.
    pub fn wanted(&self) -> bool {
        self.tx.is_some() && self.wanted.load(Ordering::Relaxed)
    }

    /// Tells emitters whether the events are consumed (the webhook poster discards them while
    /// it has no URL). Emitting stays allowed either way.
    pub fn set_wanted(&self, on: bool) {
        self.wanted.store(on, Ordering::Relaxed);
    }

    /// Events dropped so far because the queue was full or nothing listened.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (ev, mut rx) = Events::channel();
        for _ in 0..EVENT_QUEUE + 5 {
            ev.emit("x.y", serde_json::json!({"n": 1}));
        }
        assert_eq!(ev.dropped(), 5);
        let first = rx.try_recv().unwrap();
        assert_eq!(first.name, "x.y");
        assert_eq!(first.data, Some(serde_json::json!({"n": 1})));
        let off = Events::default();
        off.emit_bare("node.deregistered");
        assert_eq!(off.dropped(), 1);
        assert!(!off.wanted());
        assert!(ev.wanted());
        ev.clone().set_wanted(false);
        assert!(!ev.wanted(), "clones share the flag");
    }
}

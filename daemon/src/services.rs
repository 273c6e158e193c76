//! Built-in services the daemon runs on its own virtual ports.
//!
//! - **echo** (port 7): every stream's bytes are sent back on the same stream, and every
//!   datagram back to its sender's port (except one from another echo port). `pilotctl ping` and `bench` use it. A connection
//!   whose peer sends faster than it reads its echo is reset once [`ECHO_BACKLOG`] bytes
//!   wait, so one client cannot make the service buffer without bound or stall others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

use crate::engine::{AppEvent, Cmd, ConnId, EngineHandle, APP_QUEUE};

/// The echo port (v1 wire §8.1).
pub const ECHO_PORT: u16 = 7;
/// Bytes waiting to be echoed on one connection before it is reset: well above what a peer
/// that reads its echo can have in flight (the engine's write credit plus the windows).
pub const ECHO_BACKLOG: usize = 16 << 20;
/// Bytes waiting to be echoed on all connections together; a connection whose data would
/// go beyond it is reset.
pub const ECHO_BACKLOG_TOTAL: usize = 64 << 20;

/// Starts the echo service: listens on [`ECHO_PORT`] and serves until the engine stops.
pub async fn start_echo(engine: EngineHandle) -> Result<(), String> {
    let (tx, rx) = mpsc::channel(APP_QUEUE);
    engine.listen(ECHO_PORT, tx).await?;
    tokio::spawn(echo(engine, rx));
    Ok(())
}

async fn echo(engine: EngineHandle, mut events: mpsc::Receiver<AppEvent>) {
    type Queue = (mpsc::UnboundedSender<Vec<u8>>, Arc<AtomicUsize>);
    let mut conns: HashMap<ConnId, Queue> = HashMap::new();
    let total = Arc::new(AtomicUsize::new(0));
    while let Some(ev) = events.recv().await {
        match ev {
            AppEvent::Accepted { conn, credit, .. } => {
                let (tx, rx) = mpsc::unbounded_channel();
                let queued = Arc::new(AtomicUsize::new(0));
                conns.insert(conn, (tx, queued.clone()));
                tokio::spawn(echo_conn(
                    engine.clone(),
                    conn,
                    credit,
                    rx,
                    [queued, total.clone()],
                ));
            }
            AppEvent::Data { conn, data } => {
                let Some((tx, queued)) = conns.get(&conn) else {
                    continue;
                };
                let n = data.len();
                if queued.fetch_add(n, Ordering::Relaxed) + n > ECHO_BACKLOG
                    || tx.send(data).is_err()
                {
                    conns.remove(&conn);
                    tracing::debug!(conn, "echo: peer does not read its echo; resetting");
                    let _ = engine.send(Cmd::Abort { conn }).await;
                }
            }
            AppEvent::Closed { conn, .. } => {
                // Dropping the sender lets the writer finish what waits, then close.
                conns.remove(&conn);
            }
            AppEvent::Datagram {
                src,
                dst_port,
                data,
            } => {
                // Never answer another echo port: two echo services would bounce a datagram
                // between them forever.
                if src.port == ECHO_PORT {
                    continue;
                }
                let _ = engine
                    .send(Cmd::SendTo {
                        dst: src,
                        src_port: Some(dst_port),
                        data,
                    })
                    .await;
            }
        }
    }
}

async fn echo_conn(
    engine: EngineHandle,
    conn: ConnId,
    credit: Arc<Semaphore>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    counters: [Arc<AtomicUsize>; 2],
) {
    while let Some(data) = rx.recv().await {
        let ok = engine.write(conn, &credit, &data).await.is_ok();
        for c in &counters {
            c.fetch_sub(data.len(), Ordering::Relaxed);
        }
        if !ok {
            // Release what still waits, so the shared budget does not leak.
            rx.close();
            while let Ok(d) = rx.try_recv() {
                for c in &counters {
                    c.fetch_sub(d.len(), Ordering::Relaxed);
                }
            }
            return;
        }
    }
    let _ = engine.send(Cmd::Close { conn }).await;
}

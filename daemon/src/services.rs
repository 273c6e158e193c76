//! Built-in services the daemon runs on its own virtual ports.
//!
//! - **echo** (port 7): every stream's bytes are sent back on the same stream, and every
//!   datagram back to its sender's port (except one from another echo port). `pilotctl ping` and `bench` use it. A connection
//!   whose peer sends faster than it reads its echo is reset once [`ECHO_BACKLOG`] chunks
//!   wait, so one client cannot make the service buffer without bound or stall others.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

use crate::engine::{AppEvent, Cmd, ConnId, EngineHandle, APP_QUEUE};

/// The echo port (v1 wire §8.1).
pub const ECHO_PORT: u16 = 7;
/// Chunks waiting to be echoed on one connection before it is reset.
pub const ECHO_BACKLOG: usize = 64;

/// Starts the echo service: listens on [`ECHO_PORT`] and serves until the engine stops.
pub async fn start_echo(engine: EngineHandle) -> Result<(), String> {
    let (tx, rx) = mpsc::channel(APP_QUEUE);
    engine.listen(ECHO_PORT, tx).await?;
    tokio::spawn(echo(engine, rx));
    Ok(())
}

async fn echo(engine: EngineHandle, mut events: mpsc::Receiver<AppEvent>) {
    let mut conns: HashMap<ConnId, mpsc::Sender<Vec<u8>>> = HashMap::new();
    while let Some(ev) = events.recv().await {
        match ev {
            AppEvent::Accepted { conn, credit, .. } => {
                let (tx, rx) = mpsc::channel(ECHO_BACKLOG);
                conns.insert(conn, tx);
                tokio::spawn(echo_conn(engine.clone(), conn, credit, rx));
            }
            AppEvent::Data { conn, data } => {
                let Some(tx) = conns.get(&conn) else { continue };
                if tx.try_send(data).is_err() {
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
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    while let Some(data) = rx.recv().await {
        if engine.write(conn, &credit, &data).await.is_err() {
            return;
        }
    }
    let _ = engine.send(Cmd::Close { conn }).await;
}

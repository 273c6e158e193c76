//! Built-in services the daemon runs on its own virtual ports.
//!
//! - **echo** (port 7): every stream's bytes are sent back on the same stream, and every
//!   datagram back to its sender's port (except one from another echo port). `pilotctl ping` and `bench` use it. A connection
//!   whose echo cannot drain (its peer does not read) holds up the service's input for at
//!   most [`ECHO_STALL`] and is then reset; all connections together buffer at most
//!   [`ECHO_BACKLOG_TOTAL`] bytes.
//!
//! A built-in service that cannot take its port fails to start with a [`PortError`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};

use crate::engine::{AppEvent, BindError, Cmd, ConnId, EngineHandle, APP_QUEUE};

/// Why a built-in service could not take its virtual port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("port {port}: {reason}")]
pub struct PortError {
    /// The port.
    pub port: u16,
    /// The engine's reason (the port is bound by another owner, or the engine stopped).
    pub reason: BindError,
}

impl PortError {
    /// The engine's refusal of `port`, as a function for `map_err`.
    pub fn on(port: u16) -> impl FnOnce(BindError) -> PortError {
        move |reason| PortError { port, reason }
    }
}

/// The echo port (v1 wire §8.1).
pub const ECHO_PORT: u16 = 7;
/// Chunks waiting to be echoed on one connection (each at most the engine's read chunk).
pub const ECHO_CHUNKS: usize = 64;
/// How long the service waits for a connection's echo to drain before resetting it.
pub const ECHO_STALL: Duration = Duration::from_secs(5);
/// Bytes waiting to be echoed on all connections together; a connection whose data would
/// go beyond it is reset.
pub const ECHO_BACKLOG_TOTAL: usize = 64 << 20;

/// Starts the echo service: listens on [`ECHO_PORT`] and serves until the engine stops.
pub async fn start_echo(engine: EngineHandle) -> Result<(), PortError> {
    let (tx, rx) = mpsc::channel(APP_QUEUE);
    engine
        .listen(ECHO_PORT, tx)
        .await
        .map_err(PortError::on(ECHO_PORT))?;
    tokio::spawn(echo(engine, rx));
    Ok(())
}

async fn echo(engine: EngineHandle, mut events: mpsc::Receiver<AppEvent>) {
    let mut conns: HashMap<ConnId, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let total = Arc::new(AtomicUsize::new(0));
    while let Some(ev) = events.recv().await {
        match ev {
            AppEvent::Accepted { conn, credit, .. } => {
                let (tx, rx) = mpsc::channel(ECHO_CHUNKS);
                conns.insert(conn, tx);
                tokio::spawn(echo_conn(engine.clone(), conn, credit, rx, total.clone()));
            }
            AppEvent::Data { conn, data } => {
                let Some(tx) = conns.get(&conn) else {
                    continue;
                };
                let n = data.len();
                // Waiting here is the backpressure: the engine stops handing this service
                // data, so peers slow down. A peer that never reads its echo is reset after
                // ECHO_STALL so it cannot hold up the others for long.
                let over = total.load(Ordering::Relaxed) + n > ECHO_BACKLOG_TOTAL;
                let sent = !over
                    && matches!(
                        tokio::time::timeout(ECHO_STALL, tx.send(data)).await,
                        Ok(Ok(()))
                    );
                if sent {
                    total.fetch_add(n, Ordering::Relaxed);
                } else {
                    conns.remove(&conn);
                    tracing::debug!(conn, "echo: peer does not read its echo; resetting");
                    let _ = engine.send(Cmd::Abort { conn }).await;
                }
            }
            AppEvent::Closed { conn, .. } => {
                // Dropping the sender lets the writer finish what waits, then close.
                conns.remove(&conn);
            }
            // Only the fallback listener's channel carries attempts.
            AppEvent::Incoming { .. } => {}
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
    total: Arc<AtomicUsize>,
) {
    while let Some(data) = rx.recv().await {
        let ok = engine.write(conn, &credit, &data).await.is_ok();
        total.fetch_sub(data.len(), Ordering::Relaxed);
        if !ok {
            // Release what still waits, so the shared budget does not leak.
            rx.close();
            while let Ok(d) = rx.try_recv() {
                total.fetch_sub(d.len(), Ordering::Relaxed);
            }
            return;
        }
    }
    let _ = engine.send(Cmd::Close { conn }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_error_names_the_port() {
        let e = PortError::on(ECHO_PORT)(BindError::Taken(
            tunnel::node::ListenError::AlreadyBound(ECHO_PORT),
        ));
        assert_eq!(e.port, ECHO_PORT);
        assert_eq!(e.to_string(), "port 7: port 7 is already bound");
    }
}

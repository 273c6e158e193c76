//! The stdio service (virtual port 1000): what `pilotctl connect <peer>` reaches by default.
//!
//! A peer opens a stream, writes text and finishes its side; the text (at most
//! [`MAX_STDIO_TEXT`] bytes) is stored in the inbox as a TEXT message, like one from the data
//! exchange service, and the peer is answered `ACK TEXT <n> bytes\n` (or `ERR <why>\n`)
//! before the stream closes. A peer that sends nothing for [`STDIO_IDLE`] is answered with
//! what arrived so far.
//!
//! Port 1000 is also where applications listen by convention (v1 has no service there). So
//! the service steps aside: when an agent binds port 1000 over IPC, the service releases the
//! port ([`Stdio::yield_port`]) and takes it back once the agent lets it go
//! ([`Stdio::reclaim`]). At most [`MAX_STDIO_CONNS`] connections are served at once, each for
//! at most [`STDIO_DEADLINE`].

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore};
use tunnel::SocketAddr as PilotAddr;

use crate::dataexchange::DataExchange;
use crate::engine::EngineHandle;
use crate::local::{LocalListener, LocalStream};
use crate::services::PortError;

/// The stdio port.
pub const STDIO_PORT: u16 = tunnel::addr::port::STDIO;
/// Most bytes stored from one connection; more is refused.
pub const MAX_STDIO_TEXT: usize = 1 << 20;
/// How long the service waits for more text before answering.
pub const STDIO_IDLE: Duration = Duration::from_secs(30);
/// Longest a connection may take to send its text.
pub const STDIO_DEADLINE: Duration = Duration::from_secs(120);
/// Connections served at once; more are closed at once.
pub const MAX_STDIO_CONNS: usize = 64;

/// The running service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Stdio {
    engine: EngineHandle,
    store: Arc<DataExchange>,
    /// Connections served at once.
    slots: Arc<Semaphore>,
    /// The accept task while the service holds the port.
    running: Arc<Mutex<Option<Running>>>,
}

#[derive(Debug)]
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl Stdio {
    /// Binds [`STDIO_PORT`] and serves it, storing text through `store`'s inbox.
    pub async fn start(
        engine: &EngineHandle,
        store: Arc<DataExchange>,
    ) -> Result<Stdio, PortError> {
        let s = Stdio {
            engine: engine.clone(),
            store,
            slots: Arc::new(Semaphore::new(MAX_STDIO_CONNS)),
            running: Arc::default(),
        };
        s.reclaim_inner().await?;
        Ok(s)
    }

    /// Whether the service holds the port now.
    pub async fn holds_port(&self) -> bool {
        self.running.lock().await.is_some()
    }

    /// Gives the port to `bind` (an application binding it): the service releases it, `bind`
    /// runs, and if `bind` fails the service takes the port back. Nothing else can take or
    /// release the port in between.
    pub async fn yield_port<F, Fut, T, E>(&self, bind: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut running = self.running.lock().await;
        let held = running.take();
        let was_held = held.is_some();
        if let Some(r) = held {
            let _ = r.stop.send(());
            let _ = r.done.await;
        }
        let r = bind().await;
        if r.is_err() && was_held {
            if let Err(e) = self.bind_locked(&mut running).await {
                tracing::warn!(error = %e, "stdio service could not take its port back");
            }
        }
        r
    }

    /// Takes the port back once the application that had it lets it go (a no-op while the
    /// service holds it, or while someone else has bound it).
    pub async fn reclaim(&self) {
        let mut running = self.running.lock().await;
        if let Err(e) = self.bind_locked(&mut running).await {
            tracing::debug!(error = %e, "stdio service: port still taken");
        }
    }

    async fn reclaim_inner(&self) -> Result<(), PortError> {
        let mut running = self.running.lock().await;
        self.bind_locked(&mut running).await
    }

    async fn bind_locked(&self, running: &mut Option<Running>) -> Result<(), PortError> {
        if running.is_some() {
            return Ok(());
        }
        let mut listener = LocalListener::bind(&self.engine, STDIO_PORT)
            .await
            .map_err(PortError::on(STDIO_PORT))?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let store = self.store.clone();
        let slots = self.slots.clone();
        let done = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    acc = listener.accept() => match acc {
                        Some((stream, remote)) => match slots.clone().try_acquire_owned() {
                            Ok(permit) => {
                                let store = store.clone();
                                tokio::spawn(async move {
                                    let _ = tokio::time::timeout(
                                        STDIO_DEADLINE,
                                        serve(stream, remote, store),
                                    )
                                    .await;
                                    drop(permit);
                                });
                            }
                            Err(_) => {
                                tracing::debug!(%remote, "stdio service busy; connection closed");
                                drop(stream);
                            }
                        },
                        None => return,
                    },
                }
            }
            listener.close().await;
        });
        *running = Some(Running { stop, done });
        Ok(())
    }
}

async fn serve(mut s: LocalStream, from: PilotAddr, store: Arc<DataExchange>) {
    let mut text = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut too_long = false;
    loop {
        match tokio::time::timeout(STDIO_IDLE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => {
                let Some(chunk) = buf.get(..n) else { break };
                if text.len() + n > MAX_STDIO_TEXT {
                    too_long = true;
                    break;
                }
                text.extend_from_slice(chunk);
            }
            Ok(Err(_)) => return,
        }
    }
    let reply = if too_long {
        format!("ERR text longer than {MAX_STDIO_TEXT} bytes\n")
    } else if text.is_empty() {
        "ERR no text\n".to_owned()
    } else {
        let n = text.len();
        match store.store_text(from, text).await {
            Ok(_) => format!("ACK TEXT {n} bytes\n"),
            Err(e) => format!("ERR {e}\n"),
        }
    };
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
}

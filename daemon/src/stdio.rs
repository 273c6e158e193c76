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
//! port ([`Stdio::release`]) and takes it back once the agent lets it go
//! ([`Stdio::reclaim`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tunnel::SocketAddr as PilotAddr;

use crate::dataexchange::DataExchange;
use crate::engine::EngineHandle;
use crate::local::{LocalListener, LocalStream};

/// The stdio port.
pub const STDIO_PORT: u16 = tunnel::addr::port::STDIO;
/// Most bytes stored from one connection; more is refused.
pub const MAX_STDIO_TEXT: usize = 1 << 20;
/// How long the service waits for more text before answering.
pub const STDIO_IDLE: Duration = Duration::from_secs(30);

/// The running service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Stdio {
    engine: EngineHandle,
    store: Arc<DataExchange>,
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
    pub async fn start(engine: &EngineHandle, store: Arc<DataExchange>) -> Result<Stdio, String> {
        let s = Stdio {
            engine: engine.clone(),
            store,
            running: Arc::default(),
        };
        s.reclaim_inner().await?;
        Ok(s)
    }

    /// Whether the service holds the port now.
    pub async fn holds_port(&self) -> bool {
        self.running.lock().await.is_some()
    }

    /// Releases the port so that an application can bind it; connections being served
    /// finish. Once this returns the port is free.
    pub async fn release(&self) {
        let taken = self.running.lock().await.take();
        if let Some(r) = taken {
            let _ = r.stop.send(());
            let _ = r.done.await;
        }
    }

    /// Takes the port back after [`release`](Stdio::release) (a no-op while it holds it, or
    /// while someone else has bound it).
    pub async fn reclaim(&self) {
        if let Err(e) = self.reclaim_inner().await {
            tracing::debug!(error = %e, "stdio service: port still taken");
        }
    }

    async fn reclaim_inner(&self) -> Result<(), String> {
        let mut running = self.running.lock().await;
        if running.is_some() {
            return Ok(());
        }
        let mut listener = LocalListener::bind(&self.engine, STDIO_PORT).await?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let store = self.store.clone();
        let done = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    acc = listener.accept() => match acc {
                        Some((stream, remote)) => {
                            tokio::spawn(serve(stream, remote, store.clone()));
                        }
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

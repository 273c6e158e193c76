//! In-process streams over the engine, for the daemon's own services: a listener whose
//! connections are ordinary tokio byte streams (`AsyncRead + AsyncWrite`), and a dialer.
//!
//! Each connection gets its own event channel from the engine, so a service that is slow to
//! read one connection never holds up its others. Two small tasks per connection move bytes
//! between the engine and a [`DuplexStream`]: engine data in (waiting while the service does
//! not read, which stops the engine reading that connection and so slows its peer), service
//! writes out (waiting for the connection's write credit). Dropping or shutting down the
//! service's end finishes the connection with FIN once its data is sent; dropping the
//! listener unbinds the port.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, Semaphore};
use tunnel::SocketAddr as PilotAddr;

use crate::engine::{
    AppEvent, BindError, Cmd, ConnId, DialError, EngineHandle, APP_QUEUE, CONN_QUEUE,
};

/// Bytes buffered between a connection's pump tasks and the service, each way.
pub const LOCAL_BUFFER: usize = 64 * 1024;

/// A stream connection as a service sees it.
pub type LocalStream = DuplexStream;

/// A bound port whose connections are [`LocalStream`]s.
#[derive(Debug)]
pub struct LocalListener {
    engine: EngineHandle,
    port: u16,
    events: mpsc::Receiver<AppEvent>,
    /// The engine's end of `events`, to unbind only our own listener.
    owner: mpsc::WeakSender<AppEvent>,
    closed: bool,
}

impl LocalListener {
    /// Binds `port` on the engine.
    pub async fn bind(engine: &EngineHandle, port: u16) -> Result<LocalListener, BindError> {
        let (tx, events) = mpsc::channel(APP_QUEUE);
        let owner = tx.downgrade();
        engine.listen_per_conn(port, tx).await?;
        Ok(LocalListener {
            engine: engine.clone(),
            port,
            events,
            owner,
            closed: false,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next connection and its remote end; `None` once the engine stops. Datagrams to
    /// the port are dropped.
    pub async fn accept(&mut self) -> Option<(LocalStream, PilotAddr)> {
        while let Some(ev) = self.events.recv().await {
            if let AppEvent::Accepted {
                conn,
                remote,
                credit,
                events: Some(events),
                ..
            } = ev
            {
                return Some((attach(&self.engine, conn, credit, events), remote));
            }
        }
        None
    }
}

impl LocalListener {
    /// Unbinds the port now: once this returns, the port is free for another listener.
    pub async fn close(mut self) {
        let _ = self
            .engine
            .send(Cmd::Unlisten {
                port: self.port,
                owner: Some(self.owner.clone()),
            })
            .await;
        self.closed = true;
    }
}

impl Drop for LocalListener {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let engine = self.engine.clone();
        let port = self.port;
        let owner = Some(self.owner.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = engine.send(Cmd::Unlisten { port, owner }).await;
            });
        }
    }
}

/// Opens a connection to `dst`.
pub async fn dial(engine: &EngineHandle, dst: PilotAddr) -> Result<LocalStream, DialError> {
    let (tx, rx) = mpsc::channel(CONN_QUEUE);
    let (conn, credit) = engine.dial(dst, tx).await?;
    Ok(attach(engine, conn, credit, rx))
}

fn attach(
    engine: &EngineHandle,
    conn: ConnId,
    credit: Arc<Semaphore>,
    events: mpsc::Receiver<AppEvent>,
) -> LocalStream {
    let (service, pump) = tokio::io::duplex(LOCAL_BUFFER);
    let (rd, wr) = tokio::io::split(pump);
    tokio::spawn(inbound(events, wr));
    tokio::spawn(outbound(engine.clone(), conn, credit, rd));
    service
}

/// Engine data to the service; EOF to the service when the peer finishes.
async fn inbound(mut events: mpsc::Receiver<AppEvent>, mut wr: WriteHalf<DuplexStream>) {
    while let Some(ev) = events.recv().await {
        match ev {
            AppEvent::Data { data, .. } => {
                if wr.write_all(&data).await.is_err() {
                    // The service dropped its end: nothing more is wanted. Dropping the
                    // channel tells the engine, which finishes the connection.
                    return;
                }
            }
            AppEvent::Closed { .. } => break,
            AppEvent::Accepted { .. } | AppEvent::Datagram { .. } | AppEvent::Incoming { .. } => {}
        }
    }
    let _ = wr.shutdown().await;
}

/// Service writes to the engine; FIN when the service shuts its end or drops it.
async fn outbound(
    engine: EngineHandle,
    conn: ConnId,
    credit: Arc<Semaphore>,
    mut rd: ReadHalf<DuplexStream>,
) {
    let mut buf = vec![0u8; LOCAL_BUFFER];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let Some(data) = buf.get(..n) else { break };
                if engine.write(conn, &credit, data).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = engine.send(Cmd::Close { conn }).await;
}

//! A bulk transfer driven through the simulator: the client writes a deterministic byte
//! stream and closes; the server reads to the end, checks the SHA-256, and closes.

use std::time::Instant;

use sha2::{Digest, Sha256};
use tunnel::stream::{ConnHandle, ReadError, State, WriteError};
use tunnel::SocketAddr;

use crate::sim::Sim;

/// The byte at stream offset `i` of a test stream.
pub fn pattern_byte(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (i as u8)
}

/// Fills `buf` with the test stream from `offset`.
pub fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(offset + k as u64);
    }
}

/// How a transfer is going.
pub struct BulkTransfer {
    /// Client node index.
    pub client: usize,
    /// Server node index.
    pub server: usize,
    /// Client connection.
    pub client_conn: ConnHandle,
    /// Server connection once accepted.
    pub server_conn: Option<ConnHandle>,
    port: u16,
    /// Bytes to send.
    pub total: u64,
    /// Bytes written so far.
    pub written: u64,
    /// Bytes received so far.
    pub received: u64,
    tx_hash: Sha256,
    rx_hash: Sha256,
    /// The server saw the end of the stream.
    pub eof: bool,
    /// When the last byte arrived.
    pub finished_at: Option<Instant>,
    chunk: Vec<u8>,
    /// Most bytes the server reads per step (None: everything available).
    pub read_limit: Option<usize>,
}

impl std::fmt::Debug for BulkTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkTransfer")
            .field("total", &self.total)
            .field("written", &self.written)
            .field("received", &self.received)
            .field("eof", &self.eof)
            .field("server_conn", &self.server_conn)
            .finish()
    }
}

impl BulkTransfer {
    /// Listens on `port` at `server` and connects from `client`.
    pub fn start(sim: &mut Sim, client: usize, server: usize, port: u16, total: u64) -> Self {
        let now = sim.now();
        let server_addr = sim.node(server).ep.local();
        if !sim.node(server).ep.is_listening(port) {
            sim.node(server)
                .ep
                .listen(port, None)
                .expect("listen on a free port");
        }
        let client_conn = sim
            .node(client)
            .ep
            .connect(now, SocketAddr::new(server_addr, port))
            .expect("connect");
        BulkTransfer {
            client,
            server,
            client_conn,
            server_conn: None,
            port,
            total,
            written: 0,
            received: 0,
            tx_hash: Sha256::new(),
            rx_hash: Sha256::new(),
            eof: false,
            finished_at: None,
            chunk: vec![0u8; 256 * 1024],
            read_limit: None,
        }
    }

    /// Writes what fits, accepts, reads what is there, closes when done.
    pub fn drive(&mut self, sim: &mut Sim) {
        let now = sim.now();
        // Client side: write the stream, then close.
        if let Some(mut c) = sim.node(self.client).ep.connection(self.client_conn) {
            while c.poll_event().is_some() {}
            while self.written < self.total && c.writable() > 0 {
                let n = (self.total - self.written)
                    .min(self.chunk.len() as u64)
                    .min(c.writable() as u64) as usize;
                fill_pattern(self.written, &mut self.chunk[..n]);
                match c.write(&self.chunk[..n]) {
                    Ok(k) => {
                        self.tx_hash.update(&self.chunk[..k]);
                        self.written += k as u64;
                    }
                    Err(WriteError::Blocked)
                    | Err(WriteError::Closed)
                    | Err(WriteError::Failed(_)) => break,
                }
            }
            if self.written == self.total
                && !matches!(
                    c.state(),
                    State::FinWait1
                        | State::FinWait2
                        | State::TimeWait
                        | State::Closed
                        | State::LastAck
                        | State::Closing
                )
            {
                c.close(now);
            }
        }
        // Server side.
        if self.server_conn.is_none() {
            self.server_conn = sim.node(self.server).ep.accept(self.port);
        }
        let Some(h) = self.server_conn else {
            return;
        };
        let Some(mut c) = sim.node(self.server).ep.connection(h) else {
            return;
        };
        while c.poll_event().is_some() {}
        let mut budget = self.read_limit.unwrap_or(usize::MAX);
        while budget > 0 && !self.eof {
            let want = self.chunk.len().min(budget);
            match c.read(&mut self.chunk[..want]) {
                Ok(0) => {
                    self.eof = true;
                    self.finished_at = Some(now);
                    c.close(now);
                }
                Ok(n) => {
                    self.rx_hash.update(&self.chunk[..n]);
                    self.received += n as u64;
                    budget -= n;
                }
                Err(ReadError::Blocked) | Err(ReadError::Failed(_)) => break,
            }
        }
    }

    /// True once the server has read everything and seen the end.
    pub fn complete(&self) -> bool {
        self.eof && self.received == self.total
    }

    /// True when both ends reached a clean final state (TIME_WAIT or CLOSED without error).
    pub fn closed_cleanly(&self, sim: &mut Sim) -> bool {
        let ends = [
            (self.client, Some(self.client_conn)),
            (self.server, self.server_conn),
        ];
        ends.iter().all(|&(node, h)| {
            let Some(h) = h else { return false };
            match sim.node(node).ep.connection(h) {
                Some(c) => {
                    matches!(c.state(), State::TimeWait | State::Closed) && c.error().is_none()
                }
                None => false,
            }
        })
    }

    /// SHA-256 of what was written and of what was read.
    pub fn hashes(&self) -> ([u8; 32], [u8; 32]) {
        (
            self.tx_hash.clone().finalize().into(),
            self.rx_hash.clone().finalize().into(),
        )
    }
}

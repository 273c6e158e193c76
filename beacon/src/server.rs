//! The tokio driver: one UDP socket, one task, one reused receive buffer.
//!
//! Each wake-up drains up to [`BATCH`] datagrams with non-blocking reads, hands each to
//! [`Beacon::handle_datagram`] and sends what it returns straight from the same buffer, then
//! runs the timers every [`TICK`]. Nothing is allocated per datagram.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;

use crate::authority::Authority;
use crate::state::{Beacon, Config, Now, Output, TICK};
use crate::stats::{DropReason, StatsHandle};

/// Receive buffer: the largest UDP payload.
pub const RECV_BUF: usize = 65_536;
/// Datagrams handled per wake-up before timers and shutdown are looked at again.
pub const BATCH: usize = 64;
/// Socket receive buffer asked for (v1: 4 MiB).
pub const SOCKET_RCVBUF: usize = 4 << 20;
/// Socket send buffer asked for.
pub const SOCKET_SNDBUF: usize = 4 << 20;

/// Binds the beacon's UDP socket: dual-stack when `addr` is an IPv6 wildcard, with large
/// socket buffers (the kernel may grant less). Must be called inside a tokio runtime.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let with_addr = |e: io::Error| io::Error::new(e.kind(), format!("UDP {addr}: {e}"));
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(with_addr)?;
    if addr.is_ipv6() {
        s.set_only_v6(false).map_err(with_addr)?;
    }
    // Best effort: an unprivileged process gets at most net.core.rmem_max.
    let _ = s.set_recv_buffer_size(SOCKET_RCVBUF);
    let _ = s.set_send_buffer_size(SOCKET_SNDBUF);
    s.set_nonblocking(true).map_err(with_addr)?;
    s.bind(&addr.into()).map_err(with_addr)?;
    UdpSocket::from_std(s.into()).map_err(with_addr)
}

/// A beacon bound to its socket, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    socket: UdpSocket,
    beacon: Beacon,
}

impl Server {
    /// A beacon serving `socket` with `authority`'s answers.
    pub fn new(socket: UdpSocket, authority: Arc<dyn Authority>, config: Config) -> Server {
        Server {
            socket,
            beacon: Beacon::new(authority, config, Instant::now()),
        }
    }

    /// The live counters.
    pub fn stats(&self) -> StatsHandle {
        self.beacon.stats_handle()
    }

    /// The socket's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Serves until `shutdown` completes. Fails only if the socket itself fails.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let Server { socket, mut beacon } = self;
        let local = socket.local_addr()?;
        let v6 = local.is_ipv6();
        let stats = beacon.stats_handle();
        let mut buf = vec![0u8; RECV_BUF];
        let mut sync = Vec::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut recv_errors = ErrorLog::default();
        tracing::info!(addr = %local, peers = ?beacon.config().peers, "beacon serving");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => return Ok(()),
                _ = tick.tick() => {
                    let now = Now::system();
                    beacon.handle_timeout(now.instant);
                    if let Some(peers) = beacon.poll_sync(now.instant, &mut sync) {
                        for &p in peers {
                            send(&socket, v6, p, &sync, &stats).await;
                        }
                    }
                    while let Some(out) = beacon.poll_deferred(now, &mut buf) {
                        send_output(&socket, v6, &out, &buf, &stats).await;
                    }
                }
                r = socket.readable() => {
                    r?;
                    let now = Now::system();
                    for _ in 0..BATCH {
                        let (n, src) = match socket.try_recv_from(&mut buf) {
                            Ok(x) => x,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                // ICMP errors surface here on some systems; they concern one
                                // datagram, not the socket.
                                recv_errors.warn(&e, local);
                                break;
                            }
                        };
                        let Some(dg) = buf.get_mut(..n) else { continue };
                        let out = beacon.handle_datagram(now, src, dg);
                        send_output(&socket, v6, &out, &buf[..n], &stats).await;
                    }
                }
            }
        }
    }
}

/// Serves `socket` with `authority`'s answers until `shutdown` completes.
pub async fn serve(
    socket: UdpSocket,
    authority: Arc<dyn Authority>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    Server::new(socket, authority, config).run(shutdown).await
}

/// A destination in the socket's family: IPv4 becomes v4-mapped on an IPv6 socket.
fn for_socket(to: SocketAddr, v6: bool) -> SocketAddr {
    match to {
        SocketAddr::V4(a) if v6 => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        _ => to,
    }
}

async fn send_output(socket: &UdpSocket, v6: bool, out: &Output, buf: &[u8], stats: &StatsHandle) {
    for (to, bytes) in out.transmits(buf) {
        send(socket, v6, to, bytes, stats).await;
    }
}

async fn send(socket: &UdpSocket, v6: bool, to: SocketAddr, bytes: &[u8], stats: &StatsHandle) {
    let to = for_socket(to, v6);
    let r = match socket.try_send_to(bytes, to) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket.send_to(bytes, to).await,
        r => r,
    };
    if let Err(e) = r {
        stats.count_drop(DropReason::SendFailed);
        tracing::debug!(endpoint = %to, error = %e, "send failed");
    }
}

/// At most one warning per [`crate::stats::LOG_EVERY`] for receive errors.
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn warn(&mut self, e: &io::Error, local: SocketAddr) {
        if self
            .last
            .is_none_or(|t| t.elapsed() >= crate::stats::LOG_EVERY)
        {
            tracing::warn!(addr = %local, error = %e, suppressed = self.suppressed, "UDP receive error");
            self.last = Some(Instant::now());
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}

//! The outside of the engine: the tunnel UDP socket. Received datagrams (split by their
//! stride when the kernel coalesced them, GRO) go into the node one by one; the node's
//! datagrams come out into one reused buffer and are batched per destination (GSO) by
//! [`udp::Batch`].

use std::net::SocketAddr;
use std::time::Instant;

use rand_core::OsRng;
use tokio::net::UdpSocket;
use tunnel::node::tunnels::Drop;
use tunnel::node::{Node, TRANSMIT_BUFFER};

use crate::udp;

/// Datagrams read from the socket per wakeup.
const RECV_BATCH: usize = 64;
/// Largest UDP datagram handled.
const MAX_DATAGRAM: usize = 65_535;

/// The socket, its buffers and send counters.
#[derive(Debug)]
pub(super) struct Outside {
    socket: UdpSocket,
    batch: udp::Batch,
    sendbuf: Vec<u8>,
    rbuf: Vec<u8>,
    cmsg: Vec<u8>,
    offload: bool,
    sent: udp::Flushed,
}

impl Outside {
    pub(super) fn new(socket: UdpSocket, offload: bool) -> Self {
        Outside {
            socket,
            batch: udp::Batch::new(offload),
            sendbuf: vec![0u8; TRANSMIT_BUFFER],
            rbuf: vec![0u8; MAX_DATAGRAM],
            cmsg: udp::cmsg_buffer(),
            offload,
            sent: udp::Flushed::default(),
        }
    }

    /// Asks for receive offload where it was configured.
    pub(super) fn start(&self) {
        if self.offload && udp::enable_gro(&self.socket) {
            tracing::debug!("UDP receive offload on");
        }
    }

    /// Waits until the socket has something to read.
    pub(super) async fn readable(&self) -> std::io::Result<()> {
        self.socket.readable().await
    }

    /// Reads what the socket has (up to a batch) into the node; `dropped` hears of every
    /// datagram the tunnel layer refused.
    pub(super) fn receive(
        &mut self,
        now: Instant,
        node: &mut Node<OsRng>,
        mut dropped: impl FnMut(Drop, SocketAddr, Instant),
    ) {
        for _ in 0..RECV_BATCH {
            let Ok(got) = udp::try_recv(&self.socket, &mut self.rbuf, &mut self.cmsg) else {
                break;
            };
            let Some(buf) = self.rbuf.get_mut(..got.len) else {
                continue;
            };
            match got.stride {
                Some(stride) if stride > 0 && stride < got.len => {
                    for d in buf.chunks_mut(stride) {
                        if let Some(why) = node.handle_outside(now, got.src, d) {
                            dropped(why, got.src, now);
                        }
                    }
                }
                // One datagram (an empty one too: it is counted as malformed).
                _ => {
                    if let Some(why) = node.handle_outside(now, got.src, buf) {
                        dropped(why, got.src, now);
                    }
                }
            }
        }
    }

    /// Sends everything the node has to send, batched; returns whether there was anything.
    pub(super) async fn transmit(&mut self, now: Instant, node: &mut Node<OsRng>) -> bool {
        let mut any = false;
        while let Some(t) = node.poll_transmit(now, &mut self.sendbuf) {
            any = true;
            if t.range().end > self.sendbuf.len() {
                continue;
            }
            if !self.batch.fits(t.dst, t.len) {
                let f = self.batch.flush(&self.socket).await;
                self.count(f);
            }
            self.batch.push(t.dst, &self.sendbuf[t.range()]);
        }
        if !self.batch.is_empty() {
            let f = self.batch.flush(&self.socket).await;
            self.count(f);
        }
        any
    }

    fn count(&mut self, f: udp::Flushed) {
        self.sent.datagrams += f.datagrams;
        self.sent.bytes += f.bytes;
        self.sent.errors += f.errors;
    }

    /// Datagrams and bytes sent, and send errors.
    pub(super) fn stats(&self) -> udp::Flushed {
        self.sent
    }
}

/// Binds the tunnel socket: dual-stack when `addr` is the IPv6 wildcard, with large buffers.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack where the wildcard is asked for; an error leaves the system default.
        let _ = s.set_only_v6(false);
    }
    for size in [8 << 20, 4 << 20, 1 << 20] {
        if s.set_recv_buffer_size(size).is_ok() {
            break;
        }
    }
    for size in [8 << 20, 4 << 20, 1 << 20] {
        if s.set_send_buffer_size(size).is_ok() {
            break;
        }
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

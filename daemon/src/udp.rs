//! Segmentation offload for the tunnel socket (Linux UDP GSO and GRO).
//!
//! A full stream segment is a 4,166-byte datagram, and without offload every one costs a
//! system call on each side. With GSO the engine hands the kernel one buffer of up to 64
//! equal-sized datagrams for one destination and a segment size; with GRO the kernel hands
//! back runs of datagrams from one source in one buffer with their stride. The datagrams on
//! the wire are unchanged, so peers see no difference.
//!
//! Both are probed at run time: GRO is asked for when the socket is set up, and GSO is turned
//! off for a destination the first time the kernel refuses it there (for example a path whose
//! MTU is smaller than the datagrams, which v1 sizes rely on IP fragmentation to cross).

use std::collections::HashSet;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrIn, SockaddrIn6, SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Most datagrams in one GSO send (the kernel's limit is 64).
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send (a UDP payload is at most 65,507 bytes over IPv4).
pub const MAX_BATCH_BYTES: usize = 65_000;

/// Asks the kernel to coalesce received datagrams (UDP_GRO). Returns whether it will.
pub fn enable_gro(socket: &UdpSocket) -> bool {
    setsockopt(socket, sockopt::UdpGroSegment, &true).is_ok()
}

/// One receive: the bytes, who sent them, and the size of each datagram in the buffer when
/// the kernel coalesced several (the last may be shorter).
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// Sender.
    pub src: SocketAddr,
    /// Datagram size when the buffer holds several.
    pub stride: Option<usize>,
}

/// Space for the GRO control message; allocate once and reuse.
pub fn cmsg_buffer() -> Vec<u8> {
    nix::cmsg_space!(i32)
}

/// Receives once without waiting (`WouldBlock` when nothing is queued).
pub fn try_recv(socket: &UdpSocket, buf: &mut [u8], cmsg: &mut [u8]) -> io::Result<Received> {
    socket.try_io(Interest::READABLE, || {
        let fd = socket.as_raw_fd();
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut *cmsg), MsgFlags::empty())
            .map_err(io::Error::from)?;
        let mut stride = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::UdpGroSegments(s) = c {
                    stride = usize::try_from(s).ok().filter(|&s| s > 0);
                }
            }
        }
        let src = msg
            .address
            .as_ref()
            .and_then(to_std)
            .ok_or_else(|| io::Error::other("datagram without a source address"))?;
        Ok(Received {
            len: msg.bytes,
            src,
            stride,
        })
    })
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Sends `bytes` to `dst` as datagrams of `segment` bytes each (the last may be shorter), in
/// one system call; `None` sends one datagram.
pub async fn send(
    socket: &UdpSocket,
    bytes: &[u8],
    dst: SocketAddr,
    segment: Option<u16>,
) -> io::Result<usize> {
    socket
        .async_io(Interest::WRITABLE, || {
            let fd = socket.as_raw_fd();
            let iov = [IoSlice::new(bytes)];
            let r = match (dst, segment) {
                (SocketAddr::V4(a), Some(s)) => sendmsg(
                    fd,
                    &iov,
                    &[ControlMessage::UdpGsoSegments(&s)],
                    MsgFlags::empty(),
                    Some(&SockaddrIn::from(a)),
                ),
                (SocketAddr::V6(a), Some(s)) => sendmsg(
                    fd,
                    &iov,
                    &[ControlMessage::UdpGsoSegments(&s)],
                    MsgFlags::empty(),
                    Some(&SockaddrIn6::from(a)),
                ),
                (SocketAddr::V4(a), None) => {
                    sendmsg(fd, &iov, &[], MsgFlags::empty(), Some(&SockaddrIn::from(a)))
                }
                (SocketAddr::V6(a), None) => sendmsg(
                    fd,
                    &iov,
                    &[],
                    MsgFlags::empty(),
                    Some(&SockaddrIn6::from(a)),
                ),
            };
            r.map_err(io::Error::from)
        })
        .await
}

/// Datagrams waiting to go out together: consecutive ones to one destination, all of one size
/// but the last.
#[derive(Debug)]
pub struct Batch {
    buf: Vec<u8>,
    dst: Option<SocketAddr>,
    segment: usize,
    count: usize,
    closed: bool,
    /// Destinations where the kernel refused GSO.
    no_gso: HashSet<SocketAddr>,
    /// Whether GSO is tried at all.
    gso: bool,
}

/// What a [`Batch`] did with the datagrams it sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flushed {
    /// Datagrams sent.
    pub datagrams: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// Datagrams that failed.
    pub errors: u64,
}

impl Batch {
    /// An empty batch; `gso` false sends every datagram on its own.
    pub fn new(gso: bool) -> Self {
        Batch {
            buf: Vec::with_capacity(MAX_BATCH_BYTES + 4096),
            dst: None,
            segment: 0,
            count: 0,
            closed: false,
            no_gso: HashSet::new(),
            gso,
        }
    }

    /// Whether `datagram` for `dst` can join the batch.
    pub fn fits(&self, dst: SocketAddr, len: usize) -> bool {
        if self.count == 0 {
            return true;
        }
        self.gso
            && !self.closed
            && self.dst == Some(dst)
            && len <= self.segment
            && self.count < MAX_SEGMENTS
            && self.buf.len() + len <= MAX_BATCH_BYTES
            && !self.no_gso.contains(&dst)
    }

    /// Adds a datagram; the caller checked [`Batch::fits`].
    pub fn push(&mut self, dst: SocketAddr, datagram: &[u8]) {
        if self.count == 0 {
            self.dst = Some(dst);
            self.segment = datagram.len();
            self.closed = false;
        } else if datagram.len() < self.segment {
            // Only the last datagram may be shorter.
            self.closed = true;
        }
        self.buf.extend_from_slice(datagram);
        self.count += 1;
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Sends what waits.
    pub async fn flush(&mut self, socket: &UdpSocket) -> Flushed {
        let mut out = Flushed::default();
        let Some(dst) = self.dst.take() else {
            return out;
        };
        let count = self.count as u64;
        let segment = u16::try_from(self.segment).ok().filter(|_| self.count > 1);
        let r = send(socket, &self.buf, dst, segment).await;
        match (r, segment) {
            (Ok(_), _) => {
                out.datagrams = count;
                out.bytes = self.buf.len() as u64;
            }
            (Err(e), Some(seg)) => {
                // GSO refused on this path: send the datagrams one by one, and never batch
                // for this destination again.
                tracing::debug!(%dst, error = %e, "segmentation offload refused; sending singly");
                if self.no_gso.len() >= 4096 {
                    self.no_gso.clear();
                }
                self.no_gso.insert(dst);
                for d in self.buf.chunks(usize::from(seg)) {
                    match send(socket, d, dst, None).await {
                        Ok(n) => {
                            out.datagrams += 1;
                            out.bytes += n as u64;
                        }
                        Err(_) => out.errors += 1,
                    }
                }
            }
            (Err(_), None) => out.errors += count,
        }
        self.buf.clear();
        self.count = 0;
        self.closed = false;
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (a, b)
    }

    /// Receives until `want` datagrams arrived, splitting coalesced buffers by their stride.
    async fn collect(b: &UdpSocket, want: usize) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 65_535];
        let mut cmsg = cmsg_buffer();
        let mut got = Vec::new();
        while got.len() < want {
            b.readable().await.unwrap();
            while let Ok(r) = try_recv(b, &mut buf, &mut cmsg) {
                let stride = r.stride.unwrap_or(r.len).max(1);
                for d in buf[..r.len].chunks(stride) {
                    got.push(d.to_vec());
                }
            }
        }
        got
    }

    #[tokio::test]
    async fn a_batch_arrives_as_the_same_datagrams_with_or_without_offload() {
        for offload in [true, false] {
            let (a, b) = pair().await;
            if offload {
                enable_gro(&b);
            }
            let dst = b.local_addr().unwrap();
            let mut batch = Batch::new(offload);
            let mut sent = Vec::new();
            for i in 0..10u8 {
                // Nine full datagrams and a shorter last one.
                let len = if i == 9 { 300 } else { 1000 };
                let d = vec![i; len];
                assert!(batch.fits(dst, d.len()));
                batch.push(dst, &d);
                sent.push(d);
                if !offload {
                    let f = batch.flush(&a).await;
                    assert_eq!((f.datagrams, f.errors), (1, 0));
                }
            }
            // Nothing may follow a shorter datagram in one batch.
            assert_eq!(batch.fits(dst, 1000), !offload || batch.is_empty());
            let f = batch.flush(&a).await;
            if offload {
                assert_eq!((f.datagrams, f.bytes, f.errors), (10, 9300, 0));
            }
            assert!(batch.is_empty());
            assert_eq!(collect(&b, 10).await, sent, "offload {offload}");
        }
    }

    #[tokio::test]
    async fn another_destination_or_size_starts_a_new_batch() {
        let (a, b) = pair().await;
        let dst = b.local_addr().unwrap();
        let other = a.local_addr().unwrap();
        let mut batch = Batch::new(true);
        batch.push(dst, &[1; 100]);
        assert!(!batch.fits(other, 100));
        assert!(!batch.fits(dst, 101));
        assert!(batch.fits(dst, 100));
        for _ in 1..MAX_SEGMENTS {
            batch.push(dst, &[1; 100]);
        }
        assert!(!batch.fits(dst, 100), "at most {MAX_SEGMENTS} segments");
        let f = batch.flush(&a).await;
        assert_eq!(f.datagrams, MAX_SEGMENTS as u64);
        assert_eq!(collect(&b, MAX_SEGMENTS).await.len(), MAX_SEGMENTS);
    }
}

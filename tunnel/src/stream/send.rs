//! The send side: bytes the application wrote and the peer has not acknowledged, and the
//! record of every segment in flight.
//!
//! Stream offsets are 64-bit (offset 0 is the first data byte), so nothing here wraps; the
//! connection maps offsets to 32-bit wire sequence numbers. Segments keep their original
//! boundaries for their whole life: a retransmission resends exactly the same bytes, as a v1
//! receiver needs (v1 wire §3.4).
//!
//! Bytes in flight ("pipe", RFC 6675) are kept as a running total, so no per-ACK scan is
//! needed: a segment is either outstanding (counted), SACKed, or marked lost (not counted
//! until it is retransmitted).
//!
//! Every transmission also carries a [`SendStamp`] of the delivery counters, so that each ACK
//! yields a delivery-rate sample (see [`super::rate`]); deliveries and losses found here are
//! reported to the buffer's [`DeliveryState`] as they are found.

use std::collections::VecDeque;
use std::time::Instant;

use super::rate::{DeliveryState, SendStamp};

/// What is known about one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SegState {
    /// Sent and not known to have arrived: counted in the pipe.
    Outstanding,
    /// Reported held by the receiver (SACK).
    Sacked,
    /// Deemed lost and waiting for retransmission.
    Lost,
}

/// One segment between `snd_una` and `snd_nxt`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    pub offset: u64,
    pub len: u32,
    pub sent: Instant,
    pub transmissions: u8,
    pub state: SegState,
    /// Delivery counters at the latest transmission.
    pub stamp: SendStamp,
}

impl Segment {
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// Unacknowledged bytes and the segments that carry them.
#[derive(Debug)]
pub(crate) struct SendBuffer {
    data: VecDeque<u8>,
    /// Stream offset of `data[0]`: everything before it is acknowledged.
    una: u64,
    /// Next offset never sent.
    nxt: u64,
    max: usize,
    segments: VecDeque<Segment>,
    pipe: u64,
    /// Bytes marked lost and not yet retransmitted.
    lost_bytes: u64,
    /// Highest end offset of any SACKed segment.
    highest_sacked: u64,
    /// Segments below this offset were already checked by the loss scan.
    loss_scanned: u64,
    /// Retransmissions in the order they were sent: (offset, time).
    retransmitted: VecDeque<(u64, Instant)>,
    /// Latest send time of any segment known delivered (acknowledged or SACKed).
    delivered_sent: Option<Instant>,
    /// Delivery-rate estimation.
    delivery: DeliveryState,
}

impl SendBuffer {
    pub fn new(max: usize, now: Instant) -> Self {
        SendBuffer {
            data: VecDeque::new(),
            una: 0,
            nxt: 0,
            max,
            segments: VecDeque::new(),
            pipe: 0,
            lost_bytes: 0,
            highest_sacked: 0,
            loss_scanned: 0,
            retransmitted: VecDeque::new(),
            delivered_sent: None,
            delivery: DeliveryState::new(now),
        }
    }

    /// Delivery-rate estimation state.
    pub fn delivery(&mut self) -> &mut DeliveryState {
        &mut self.delivery
    }

    /// Appends what fits; returns the bytes taken.
    pub fn write(&mut self, buf: &[u8]) -> usize {
        let n = buf.len().min(self.max - self.data.len());
        self.data.extend(&buf[..n]);
        n
    }

    pub fn free(&self) -> usize {
        self.max - self.data.len()
    }

    pub fn una(&self) -> u64 {
        self.una
    }

    pub fn nxt(&self) -> u64 {
        self.nxt
    }

    /// Offset one past the last byte written.
    pub fn end(&self) -> u64 {
        self.una + self.data.len() as u64
    }

    /// Bytes written and never sent.
    pub fn unsent(&self) -> u64 {
        self.end() - self.nxt
    }

    pub fn pipe(&self) -> u64 {
        self.pipe
    }

    pub fn lost_bytes(&self) -> u64 {
        self.lost_bytes
    }

    pub fn in_flight_segments(&self) -> usize {
        self.segments.len()
    }

    /// True when every byte written has been acknowledged.
    pub fn all_acked(&self) -> bool {
        self.data.is_empty()
    }

    /// Copies `len` bytes from `offset` into `out`.
    pub fn copy_out(&self, offset: u64, out: &mut [u8]) {
        let start = (offset - self.una) as usize;
        let (a, b) = self.data.as_slices();
        let len = out.len();
        if start + len <= a.len() {
            out.copy_from_slice(&a[start..start + len]);
        } else if start >= a.len() {
            let s = start - a.len();
            out.copy_from_slice(&b[s..s + len]);
        } else {
            let first = a.len() - start;
            out[..first].copy_from_slice(&a[start..]);
            out[first..].copy_from_slice(&b[..len - first]);
        }
    }

    /// The byte at `offset` and the next few, for the SACK look-alike check.
    pub fn peek(&self, offset: u64, out: &mut [u8]) -> usize {
        let avail = (self.end() - offset) as usize;
        let n = out.len().min(avail);
        self.copy_out(offset, &mut out[..n]);
        n
    }

    /// Records a new segment `[nxt, nxt + len)` sent at `now`.
    pub fn on_new_segment(&mut self, len: u32, now: Instant) {
        let stamp = self.delivery.on_send(now, self.pipe, u64::from(len));
        self.segments.push_back(Segment {
            offset: self.nxt,
            len,
            sent: now,
            transmissions: 1,
            state: SegState::Outstanding,
            stamp,
        });
        self.nxt += u64::from(len);
        self.pipe += u64::from(len);
    }

    /// The first segment marked lost, if any.
    pub fn first_lost(&self) -> Option<usize> {
        if self.lost_bytes == 0 {
            return None;
        }
        self.segments.iter().position(|s| s.state == SegState::Lost)
    }

    pub fn segment(&self, i: usize) -> &Segment {
        &self.segments[i]
    }

    /// The first segment not acknowledged or SACKed.
    pub fn first_unsacked(&self) -> Option<usize> {
        self.segments
            .iter()
            .position(|s| s.state != SegState::Sacked)
    }

    /// Records the retransmission of segment `i`.
    pub fn on_retransmit(&mut self, i: usize, now: Instant) {
        let s = &mut self.segments[i];
        let pipe_before = if s.state == SegState::Outstanding {
            self.pipe - u64::from(s.len)
        } else {
            self.pipe
        };
        s.stamp = self.delivery.on_send(now, pipe_before, u64::from(s.len));
        if s.state == SegState::Lost {
            self.lost_bytes -= u64::from(s.len);
            self.pipe += u64::from(s.len);
        }
        s.state = SegState::Outstanding;
        s.sent = now;
        s.transmissions = s.transmissions.saturating_add(1);
        let offset = s.offset;
        self.retransmitted.push_back((offset, now));
    }

    fn note_delivered(&mut self, sent: Instant) {
        self.delivered_sent = Some(self.delivered_sent.map_or(sent, |d| d.max(sent)));
    }

    /// Marks lost every retransmission sent more than `reorder` before the latest-sent
    /// segment known delivered and still unacknowledged: the retransmission itself was lost
    /// (the time-based rule of RACK, RFC 8985, applied to retransmissions, which the
    /// SACK-distance rule cannot judge). Returns the bytes newly marked.
    pub fn detect_lost_retransmissions(&mut self, reorder: core::time::Duration) -> u64 {
        let Some(delivered) = self.delivered_sent else {
            return 0;
        };
        let mut newly = 0;
        while let Some(&(offset, sent)) = self.retransmitted.front() {
            if sent + reorder >= delivered {
                break;
            }
            self.retransmitted.pop_front();
            if offset < self.una {
                continue;
            }
            let i = self.segments.partition_point(|s| s.offset < offset);
            if let Some(s) = self.segments.get_mut(i) {
                if s.offset == offset && s.state == SegState::Outstanding && s.sent == sent {
                    s.state = SegState::Lost;
                    self.pipe -= u64::from(s.len);
                    self.lost_bytes += u64::from(s.len);
                    self.delivery.on_lost(u64::from(s.len));
                    newly += u64::from(s.len);
                }
            }
        }
        newly
    }

    /// Cumulative acknowledgment up to `offset` (`una < offset <= nxt`). Returns the bytes
    /// newly acknowledged and, when the newest segment acknowledged was sent once and
    /// never SACKed, its send time for an RTT sample (Karn's rule). Deliveries are counted
    /// at `now` for rate estimation.
    pub fn ack_to(&mut self, offset: u64, now: Instant) -> (u64, Option<Instant>) {
        let mut sample = None;
        let mut newly = 0;
        let mut delivered = None;
        while let Some(s) = self.segments.front() {
            if s.end() > offset {
                break;
            }
            let sent = s.sent;
            match s.state {
                SegState::Outstanding => {
                    self.pipe -= u64::from(s.len);
                    newly += u64::from(s.len);
                    sample = (s.transmissions == 1).then_some(s.sent);
                    delivered = Some(delivered.map_or(sent, |d: Instant| d.max(sent)));
                    self.delivery.on_delivered(
                        now,
                        u64::from(s.len),
                        &s.stamp,
                        sent,
                        s.transmissions == 1,
                    );
                }
                SegState::Lost => {
                    self.lost_bytes -= u64::from(s.len);
                    newly += u64::from(s.len);
                    sample = None;
                    self.delivery
                        .on_delivered(now, u64::from(s.len), &s.stamp, sent, false);
                }
                SegState::Sacked => sample = None,
            }
            self.segments.pop_front();
        }
        // An acknowledgment inside a segment (a peer that re-segments, or a hostile one):
        // what is acknowledged leaves the segment, the rest keeps its place.
        if let Some(s) = self.segments.front_mut() {
            if s.offset < offset {
                let cut = (offset - s.offset) as u32;
                match s.state {
                    SegState::Outstanding => self.pipe -= u64::from(cut),
                    SegState::Lost => self.lost_bytes -= u64::from(cut),
                    SegState::Sacked => {}
                }
                newly += u64::from(cut);
                if s.state != SegState::Sacked {
                    self.delivery.on_delivered_unstamped(now, u64::from(cut));
                }
                s.offset = offset;
                s.len -= cut;
            }
        }
        if let Some(d) = delivered {
            self.note_delivered(d);
        }
        let drained = (offset - self.una) as usize;
        self.data.drain(..drained.min(self.data.len()));
        self.una = offset;
        (newly, sample)
    }

    /// Marks segments inside `[left, right)` as SACKed at `now`. Returns the bytes newly
    /// SACKed.
    pub fn sack(&mut self, left: u64, right: u64, now: Instant) -> u64 {
        if right <= left || right <= self.una || left >= self.nxt {
            return 0;
        }
        let start = self.segments.partition_point(|s| s.offset < left);
        let mut newly = 0;
        let mut delivered: Option<Instant> = None;
        for s in self.segments.range_mut(start..) {
            if s.end() > right {
                break;
            }
            match s.state {
                SegState::Outstanding => {
                    self.pipe -= u64::from(s.len);
                    newly += u64::from(s.len);
                    delivered = Some(delivered.map_or(s.sent, |d| d.max(s.sent)));
                    self.delivery.on_delivered(
                        now,
                        u64::from(s.len),
                        &s.stamp,
                        s.sent,
                        s.transmissions == 1,
                    );
                }
                SegState::Lost => {
                    self.lost_bytes -= u64::from(s.len);
                    newly += u64::from(s.len);
                    self.delivery
                        .on_delivered(now, u64::from(s.len), &s.stamp, s.sent, false);
                }
                SegState::Sacked => continue,
            }
            s.state = SegState::Sacked;
            self.highest_sacked = self.highest_sacked.max(s.end());
        }
        if let Some(d) = delivered {
            self.note_delivered(d);
        }
        newly
    }

    /// Marks lost every original transmission sent more than `reorder` before the latest-sent
    /// segment known delivered (RACK, RFC 8985 §6.2, with a fixed reordering window): a
    /// segment that later ones overtook by more than the window is not merely reordered.
    /// Retransmissions are judged by [`SendBuffer::detect_lost_retransmissions`]. Returns the
    /// bytes newly marked.
    pub fn detect_losses(&mut self, reorder: core::time::Duration) -> u64 {
        let Some(delivered) = self.delivered_sent else {
            return 0;
        };
        let from = self.loss_scanned.max(self.una);
        let start = self.segments.partition_point(|s| s.offset < from);
        let mut newly = 0;
        for s in self.segments.range_mut(start..) {
            if s.transmissions == 1 && s.sent + reorder >= delivered {
                break;
            }
            if s.transmissions == 1 && s.state == SegState::Outstanding {
                s.state = SegState::Lost;
                self.pipe -= u64::from(s.len);
                self.lost_bytes += u64::from(s.len);
                self.delivery.on_lost(u64::from(s.len));
                newly += u64::from(s.len);
            }
            self.loss_scanned = s.end();
        }
        newly
    }

    /// Marks segment `i` lost if it is outstanding (three duplicate ACKs without SACK).
    pub fn mark_lost(&mut self, i: usize) -> bool {
        let s = &mut self.segments[i];
        if s.state != SegState::Outstanding {
            return false;
        }
        s.state = SegState::Lost;
        self.pipe -= u64::from(s.len);
        self.lost_bytes += u64::from(s.len);
        self.delivery.on_lost(u64::from(s.len));
        true
    }

    /// After a retransmission timeout: every outstanding segment is deemed lost.
    pub fn mark_all_lost(&mut self) {
        for s in self.segments.iter_mut() {
            if s.state == SegState::Outstanding {
                s.state = SegState::Lost;
                self.pipe -= u64::from(s.len);
                self.lost_bytes += u64::from(s.len);
                self.delivery.on_lost(u64::from(s.len));
            }
        }
        self.loss_scanned = self.una;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_accounting() {
        let now = Instant::now();
        let mut b = SendBuffer::new(100_000, now);
        assert_eq!(b.write(&[7u8; 10_000]), 10_000);
        for _ in 0..10 {
            b.on_new_segment(1000, now);
        }
        assert_eq!(b.pipe(), 10_000);
        // Segments 2..=5 SACKed: 4000 bytes leave the pipe.
        assert_eq!(b.sack(2000, 6000, now), 4000);
        assert_eq!(b.pipe(), 6000);
        // Segments 2..=5 were delivered; 0 and 1, sent no later, count as lost at once
        // with a zero reordering window.
        assert_eq!(b.detect_losses(core::time::Duration::ZERO), 0);
        let later = now + core::time::Duration::from_millis(1);
        b.segments[2].sent = later;
        b.delivered_sent = Some(later);
        assert_eq!(b.detect_losses(core::time::Duration::ZERO), 2000);
        assert_eq!((b.pipe(), b.lost_bytes()), (4000, 2000));
        assert_eq!(b.first_lost(), Some(0));
        b.on_retransmit(0, now);
        assert_eq!((b.pipe(), b.lost_bytes()), (5000, 1000));
        let (newly, sample) = b.ack_to(6000, now);
        // Segment 0 (retransmitted) 1000 + segment 1 (lost) 1000; no RTT sample.
        assert_eq!((newly, sample), (2000, None));
        assert_eq!((b.pipe(), b.lost_bytes()), (4000, 0));
        let (newly, sample) = b.ack_to(7000, now);
        assert_eq!((newly, sample), (1000, Some(now)));
        b.mark_all_lost();
        assert_eq!((b.pipe(), b.lost_bytes()), (0, 3000));
        b.ack_to(10_000, now);
        assert!(b.all_acked());
        assert_eq!((b.pipe(), b.lost_bytes()), (0, 0));
    }

    #[test]
    fn copy_out_across_the_ring_seam() {
        let now = Instant::now();
        let mut b = SendBuffer::new(16, now);
        b.write(&[1; 12]);
        b.on_new_segment(10, now);
        b.ack_to(10, now);
        b.write(&(0..14).collect::<Vec<u8>>());
        let mut out = [0u8; 16];
        b.copy_out(10, &mut out);
        assert_eq!(out[..2], [1, 1]);
        assert_eq!(out[2..], (0..14).collect::<Vec<u8>>()[..]);
    }

    #[test]
    fn ack_inside_a_segment_trims_it() {
        let now = Instant::now();
        let mut b = SendBuffer::new(1000, now);
        b.write(&(0..100).collect::<Vec<u8>>());
        b.on_new_segment(60, now);
        b.on_new_segment(40, now);
        assert_eq!(b.ack_to(30, now), (30, None));
        assert_eq!(b.pipe(), 70);
        assert_eq!((b.segment(0).offset, b.segment(0).len), (30, 30));
        let mut out = [0u8; 30];
        b.copy_out(30, &mut out);
        assert_eq!(out[0], 30);
        b.mark_all_lost();
        assert_eq!(b.ack_to(70, now).0, 40);
        assert_eq!((b.pipe(), b.lost_bytes()), (0, 30));
    }
}

//! Delivery-rate estimation (draft-ietf-ccwg-bbr §4.5.2, after draft-cheng-iccrg-delivery-rate
//! -estimation): how fast the path delivered data, sampled on every acknowledgment.
//!
//! Layer: the send side of the stream state machine, sans-IO (time comes in as arguments).
//!
//! Each transmission is stamped with the connection's delivery counters ([`SendStamp`]); when
//! the peer acknowledges (or SACKs) it, the bytes delivered between the stamp and now, over the
//! longer of the send and the ACK interval, give one [`RateSample`]. The ACK interval alone
//! would overestimate when ACKs are compressed; the send interval alone when sends were bursty.
//!
//! Invariants: `delivered` and `lost` only grow; a segment is counted delivered at most once
//! (the caller stops passing a segment once it is SACKed or acknowledged); the sample in
//! progress is reset by [`DeliveryState::generate`].

use std::time::{Duration, Instant};

/// The connection's delivery counters, copied into each segment when it is (re)sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendStamp {
    /// Bytes delivered when the segment was sent.
    pub delivered: u64,
    /// When `delivered` last grew before the send.
    pub delivered_time: Instant,
    /// Send time of the first segment of the flight this one belongs to.
    pub first_send_time: Instant,
    /// Bytes declared lost when the segment was sent.
    pub lost: u64,
    /// Bytes in flight just after the send, this segment included.
    pub tx_in_flight: u64,
    /// The sender was application-limited when it sent the segment.
    pub app_limited: bool,
}

/// One delivery-rate sample, taken after an acknowledgment was processed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSample {
    /// Delivery rate in bytes per second (0 when the interval was too short to trust).
    pub delivery_rate: f64,
    /// Bytes delivered over the sample's interval.
    pub delivered: u64,
    /// Length of the sample's interval.
    pub interval: Duration,
    /// The connection's delivered count when the newest delivered segment was sent.
    pub prior_delivered: u64,
    /// The connection's total delivered count now.
    pub total_delivered: u64,
    /// Bytes newly acknowledged or SACKed by this ACK.
    pub newly_acked: u64,
    /// Bytes newly declared lost while processing this ACK.
    pub newly_lost: u64,
    /// Bytes declared lost since the newest delivered segment was sent.
    pub lost: u64,
    /// Bytes in flight when the newest delivered segment was sent.
    pub tx_in_flight: u64,
    /// The newest delivered segment was sent while application-limited: a low rate says
    /// nothing about the path.
    pub is_app_limited: bool,
    /// Round-trip time of the newest delivered segment, if sent only once.
    pub rtt: Option<Duration>,
    /// Bytes in flight after this ACK.
    pub bytes_in_flight: u64,
}

/// The sample under construction: the newest segment delivered by this ACK.
#[derive(Debug, Clone, Copy)]
struct Newest {
    stamp: SendStamp,
    sent: Instant,
    first_transmission: bool,
}

/// The connection-level counters of delivery-rate estimation.
#[derive(Debug, Clone)]
pub(crate) struct DeliveryState {
    delivered: u64,
    delivered_time: Instant,
    first_send_time: Instant,
    lost: u64,
    /// Nonzero while application-limited: the `delivered` count at which that ends.
    app_limited_until: u64,
    newest: Option<Newest>,
    newly_acked: u64,
    newly_lost: u64,
}

impl DeliveryState {
    pub fn new(now: Instant) -> Self {
        DeliveryState {
            delivered: 0,
            delivered_time: now,
            first_send_time: now,
            lost: 0,
            app_limited_until: 0,
            newest: None,
            newly_acked: 0,
            newly_lost: 0,
        }
    }

    /// The stamp of a segment sent at `now`; `pipe_before` is the bytes in flight before it.
    #[inline]
    pub fn on_send(&mut self, now: Instant, pipe_before: u64, len: u64) -> SendStamp {
        if pipe_before == 0 {
            // A new flight after idle: intervals start now, not at the last ACK.
            self.first_send_time = now;
            self.delivered_time = now;
        }
        SendStamp {
            delivered: self.delivered,
            delivered_time: self.delivered_time,
            first_send_time: self.first_send_time,
            lost: self.lost,
            tx_in_flight: pipe_before + len,
            app_limited: self.app_limited_until != 0,
        }
    }

    /// The sender has nothing more to send while the window has room: samples taken until
    /// what is in flight now is delivered are marked application-limited.
    pub fn on_app_limited(&mut self, pipe: u64) {
        self.app_limited_until = (self.delivered + pipe).max(1);
    }

    /// `len` bytes of a segment stamped `stamp` and sent at `sent` were delivered at `now`.
    #[inline]
    pub fn on_delivered(
        &mut self,
        now: Instant,
        len: u64,
        stamp: &SendStamp,
        sent: Instant,
        first_transmission: bool,
    ) {
        self.delivered += len;
        self.delivered_time = now;
        self.newly_acked += len;
        let newer = self.newest.is_none_or(|n| {
            stamp.delivered > n.stamp.delivered
                || (stamp.delivered == n.stamp.delivered && sent >= n.sent)
        });
        if newer {
            self.newest = Some(Newest {
                stamp: *stamp,
                sent,
                first_transmission,
            });
            // The next flight's send interval starts at this segment's send.
            self.first_send_time = sent;
        }
    }

    /// Bytes delivered without a stamp (an acknowledgment inside a segment).
    pub fn on_delivered_unstamped(&mut self, now: Instant, len: u64) {
        self.delivered += len;
        self.delivered_time = now;
        self.newly_acked += len;
    }

    /// `len` bytes were declared lost.
    #[inline]
    pub fn on_lost(&mut self, len: u64) {
        self.lost += len;
        self.newly_lost += len;
    }

    /// Finishes the sample of one ACK. `None` when the ACK delivered nothing and declared
    /// nothing lost. `min_rtt` rejects intervals shorter than a round trip (draft §4.5.2.3).
    pub fn generate(
        &mut self,
        now: Instant,
        min_rtt: Option<Duration>,
        bytes_in_flight: u64,
    ) -> Option<RateSample> {
        let newly_acked = core::mem::take(&mut self.newly_acked);
        let newly_lost = core::mem::take(&mut self.newly_lost);
        if self.app_limited_until != 0 && self.delivered > self.app_limited_until {
            self.app_limited_until = 0;
        }
        let newest = self.newest.take();
        if newest.is_none() && newly_lost == 0 {
            return None;
        }
        let mut rs = RateSample {
            delivery_rate: 0.0,
            delivered: 0,
            interval: Duration::ZERO,
            prior_delivered: self.delivered,
            total_delivered: self.delivered,
            newly_acked,
            newly_lost,
            lost: 0,
            tx_in_flight: 0,
            is_app_limited: self.app_limited_until != 0,
            rtt: None,
            bytes_in_flight,
        };
        if let Some(n) = newest {
            let send_elapsed = n.sent.saturating_duration_since(n.stamp.first_send_time);
            let ack_elapsed = now.saturating_duration_since(n.stamp.delivered_time);
            rs.interval = send_elapsed.max(ack_elapsed);
            rs.delivered = self.delivered - n.stamp.delivered;
            rs.prior_delivered = n.stamp.delivered;
            rs.lost = self.lost - n.stamp.lost;
            rs.tx_in_flight = n.stamp.tx_in_flight;
            rs.is_app_limited = n.stamp.app_limited;
            rs.rtt = n
                .first_transmission
                .then(|| now.saturating_duration_since(n.sent));
            let long_enough = min_rtt.is_none_or(|m| rs.interval >= m);
            if !rs.interval.is_zero() && long_enough {
                rs.delivery_rate = rs.delivered as f64 / rs.interval.as_secs_f64();
            }
        }
        Some(rs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_flight_samples_its_rate() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let mut d = DeliveryState::new(t0);
        // Ten 1,000-byte segments, one per millisecond; each acknowledged 100 ms later.
        let mut stamps = Vec::new();
        for i in 0..10u32 {
            stamps.push((
                d.on_send(t0 + ms * i, u64::from(i) * 1000, 1000),
                t0 + ms * i,
            ));
        }
        let mut last = None;
        for (i, (stamp, sent)) in stamps.iter().enumerate() {
            let now = t0 + ms * (100 + i as u32);
            d.on_delivered(now, 1000, stamp, *sent, true);
            last = d.generate(now, None, 0);
        }
        let rs = last.unwrap();
        // The last ACK: 10,000 bytes over max(9 ms send, 109 ms ack) intervals.
        assert_eq!(rs.delivered, 10_000);
        assert_eq!(rs.interval, ms * 109);
        assert!((rs.delivery_rate - 10_000.0 / 0.109).abs() < 1.0);
        assert_eq!(rs.rtt, Some(ms * 100));
        assert_eq!(rs.tx_in_flight, 10_000);
        assert!(!rs.is_app_limited);
        // A second flight after the first was delivered: both intervals count from there.
        let t1 = t0 + ms * 200;
        let s = d.on_send(t1, 0, 1000);
        d.on_delivered(t1 + ms * 50, 1000, &s, t1, true);
        let rs = d.generate(t1 + ms * 50, Some(ms * 50), 0).unwrap();
        assert_eq!((rs.delivered, rs.interval), (1000, ms * 50));
    }

    #[test]
    fn losses_and_app_limits_are_reported() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let mut d = DeliveryState::new(t0);
        d.on_app_limited(0);
        let s = d.on_send(t0, 0, 1000);
        assert!(s.app_limited);
        d.on_lost(500);
        d.on_delivered(t0 + ms * 10, 1000, &s, t0, false);
        let rs = d.generate(t0 + ms * 10, None, 0).unwrap();
        assert!(rs.is_app_limited);
        assert_eq!((rs.lost, rs.newly_lost, rs.rtt), (500, 500, None));
        // Everything in flight then is delivered: no longer application-limited.
        let s = d.on_send(t0 + ms * 10, 0, 1000);
        assert!(!s.app_limited);
        // An ACK that delivers nothing and loses nothing makes no sample.
        assert!(d.generate(t0 + ms * 11, None, 1000).is_none());
        // A sample shorter than the minimum RTT carries no rate.
        d.on_delivered(t0 + ms * 12, 1000, &s, t0 + ms * 10, true);
        let rs = d.generate(t0 + ms * 12, Some(ms * 10), 0).unwrap();
        assert_eq!(rs.delivery_rate, 0.0);
    }
}

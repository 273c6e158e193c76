//! The reliable-stream transport (protocol 0x01): one connection's state machine, sans-IO.
//!
//! # Calling order
//!
//! A driver owns each [`Connection`] (usually through an [`Endpoint`], which routes segments
//! and handles SYNs). It feeds inputs and drains outputs in any order, always passing the
//! current time:
//!
//! - [`Connection::handle_segment`] for every segment of this connection;
//! - [`Connection::write`], [`Connection::read`], [`Connection::shutdown`],
//!   [`Connection::close`], [`Connection::abort`] from the application;
//! - after any of these, [`Connection::poll_transmit`] until it returns `None`, sending each
//!   packet it writes;
//! - [`Connection::poll_timeout`] gives the next deadline; at that time call
//!   [`Connection::handle_timeout`] (and then `poll_transmit` again);
//! - [`Connection::poll_event`] reports readability, writability and the end.
//!
//! An [`Endpoint`] can also hold SYNs to ports without a listener until its caller lets each
//! in or refuses it (fallback listening with deferred accept): see [`Endpoint::enable_fallback`]
//! and the calling order in the endpoint's docs.
//!
//! # Sequence numbers
//!
//! Internally every byte has a 64-bit stream offset (0 = first data byte), so nothing wraps.
//! On the wire v1's rules hold (v1 wire §3): our ISN is 0, the SYN has seq 0 and the first
//! data byte seq 1; FIN occupies no sequence space and is answered with FIN|ACK whose ack is
//! FIN.seq + 1. The peer's ISN is whatever its SYN carried.
//!
//! # Windows
//!
//! The window field counts 4,096-byte slots of free receive buffer. A zero window stops our
//! sender; it probes with one byte on the persist timer, which a v1 peer (whose keepalives
//! carry window 0) answers with its real window. Our receiver never blocks: bytes beyond its
//! buffer are dropped unacknowledged, which also holds back v1 senders that ignore a zero
//! window.

pub mod congestion;
mod endpoint;
pub mod pacing;
mod rate;
mod recv;
pub mod rtt;
pub mod sack;
mod send;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use endpoint::{
    ConnHandle, ConnectError, Datagram, Deferred, DeferredError, DeferredId, DeferredStats,
    DropReason, Endpoint, EndpointConfig, FallbackError, Incoming, ListenError, DEFERRED_TIMEOUT,
    MAX_DEFERRED,
};

use crate::addr::SocketAddr;
use crate::wire::header::{Flags, PacketRepr, Protocol, HEADER_LEN};
use congestion::{Algorithm, Controller};
use pacing::Pacer;
use recv::RecvBuffer;
use rtt::RttEstimator;
use send::SendBuffer;

/// Bytes per window slot (v1 wire §3.4: the receiver advertises free 4,096-byte slots).
pub const WINDOW_SLOT: u64 = 4096;
/// Largest segment payload a v1 receiver accounts for correctly.
pub const MAX_MSS: u16 = 4096;
/// Bytes the tunnel adds around a Pilot packet in the worst case: PILS framing (36) plus a
/// beacon relay header (9).
pub const TUNNEL_OVERHEAD: u16 = 36 + 9;

/// Segment payload that fits a path MTU once sealed, relayed, and wrapped in UDP/IP.
/// `ipv6` selects a 40-byte rather than a 20-byte IP header.
pub const fn mss_for_path_mtu(mtu: u16, ipv6: bool) -> u16 {
    let ip = if ipv6 { 40 } else { 20 };
    let overhead = ip + 8 + TUNNEL_OVERHEAD + HEADER_LEN as u16;
    let mss = mtu.saturating_sub(overhead);
    if mss > MAX_MSS {
        MAX_MSS
    } else {
        mss
    }
}

/// The default segment size: fits a 1,280-byte IPv6 path (the IPv6 minimum MTU).
pub const DEFAULT_MSS: u16 = mss_for_path_mtu(1280, true);

/// Per-connection settings.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Payload bytes per segment (at most [`MAX_MSS`]); see [`mss_for_path_mtu`].
    pub mss: u16,
    /// Most bytes written and not yet acknowledged.
    pub send_buffer: usize,
    /// Most bytes received and not yet read (in order plus out of order).
    pub recv_buffer: usize,
    /// Congestion controller.
    pub congestion: Algorithm,
    /// Disable Nagle: send partial segments at once.
    pub nodelay: bool,
    /// Spread sends over the round trip.
    pub pacing: bool,
    /// Longest an ACK is delayed.
    pub delayed_ack: Duration,
    /// Idle time after which an empty keepalive probe is sent.
    pub keepalive: Duration,
    /// Time without any packet from the peer after which the connection fails.
    pub idle_timeout: Duration,
    /// Time spent in TIME_WAIT.
    pub time_wait: Duration,
    /// How long a closed connection waits in FIN_WAIT_2 for the peer's FIN (a v1 peer never
    /// sends one after answering ours).
    pub fin_wait2: Duration,
    /// Transmissions of a segment without progress before the connection fails: the
    /// connection fails on this many consecutive retransmission timeouts.
    pub max_retransmits: u8,
    /// SYN (or SYN-ACK) retransmissions before the handshake fails.
    pub syn_retries: u8,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mss: DEFAULT_MSS,
            send_buffer: 8 << 20,
            recv_buffer: 8 << 20,
            congestion: Algorithm::Cubic,
            nodelay: false,
            pacing: true,
            delayed_ack: Duration::from_millis(40),
            keepalive: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            time_wait: Duration::from_secs(10),
            fin_wait2: Duration::from_secs(60),
            max_retransmits: 8,
            syn_retries: 6,
        }
    }
}

/// Connection states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Our SYN is out.
    SynSent,
    /// A SYN arrived and our SYN-ACK is out.
    SynReceived,
    /// Data flows both ways.
    Established,
    /// We shut down; our FIN is not yet acknowledged.
    FinWait1,
    /// Our FIN is acknowledged; the peer may still send.
    FinWait2,
    /// The peer shut down; we may still send.
    CloseWait,
    /// Both sent FIN; ours is not yet acknowledged.
    Closing,
    /// The peer shut down first, then we did; ours is not yet acknowledged.
    LastAck,
    /// Both directions finished; lingering for stray segments.
    TimeWait,
    /// Finished or failed. Nothing more will be sent.
    Closed,
}

/// Why a connection ended abnormally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    /// The peer answered our SYN with RST (nothing listens on that port).
    #[error("connection refused")]
    Refused,
    /// The peer reset the connection.
    #[error("connection reset by peer")]
    Reset,
    /// Retransmissions were not acknowledged within the retry budget.
    #[error("connection timed out (no acknowledgment after retries)")]
    TimedOut,
    /// Nothing was received from the peer for the idle timeout.
    #[error("connection idle timeout")]
    Idle,
    /// The application aborted the connection.
    #[error("connection aborted locally")]
    Aborted,
}

/// Why a read returned no data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Nothing to read yet.
    #[error("no data available yet")]
    Blocked,
    /// The connection failed.
    #[error(transparent)]
    Failed(#[from] ConnError),
}

/// Why a write took no data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The send buffer is full (or the handshake is not done); wait for [`Event::Writable`].
    #[error("send buffer full")]
    Blocked,
    /// The write side was shut down.
    #[error("connection shut down for writing")]
    Closed,
    /// The connection failed.
    #[error(transparent)]
    Failed(#[from] ConnError),
}

/// Something the application may want to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The handshake completed.
    Connected,
    /// Data (or the end of the stream) can be read.
    Readable,
    /// The send buffer has room again.
    Writable,
    /// The connection reached `Closed`; [`Connection::error`] says whether it failed.
    Closed,
}

/// Loss-recovery phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recovery {
    /// No loss being repaired.
    #[default]
    Open,
    /// Fast recovery after duplicate ACKs or SACK-detected loss.
    Fast,
    /// Recovery after a retransmission timeout.
    Timeout,
}

/// Per-connection statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Payload bytes sent, retransmissions included.
    pub bytes_sent: u64,
    /// Payload bytes accepted in order.
    pub bytes_received: u64,
    /// Packets sent.
    pub segments_sent: u64,
    /// Packets received for this connection.
    pub segments_received: u64,
    /// Segments retransmitted (all causes).
    pub retransmissions: u64,
    /// Loss events repaired by fast retransmit (duplicate ACKs or SACK).
    pub fast_retransmits: u64,
    /// Retransmission timeouts.
    pub timeouts: u64,
    /// SACK blocks sent.
    pub sack_blocks_sent: u64,
    /// SACK blocks received.
    pub sack_blocks_received: u64,
    /// Duplicate ACKs received.
    pub duplicate_acks: u64,
    /// Congestion window in bytes.
    pub cwnd: u64,
    /// Bytes in flight.
    pub bytes_in_flight: u64,
    /// Smoothed RTT.
    pub srtt: Duration,
    /// RTT variance.
    pub rttvar: Duration,
    /// Recovery phase.
    pub recovery: Recovery,
    /// Slow-start threshold in bytes.
    pub ssthresh: u64,
    /// The peer's advertised receive window in bytes.
    pub peer_window: u64,
    /// The receive window this side advertises, in bytes.
    pub recv_window: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// RTO, SYN retransmission, FIN retransmission, or the persist (zero-window) probe.
    Retransmit,
    DelayedAck,
    TimeWait,
    Pacing,
}

const TIMERS: usize = 4;

/// Most SYN retransmission interval (1 s doubling to 8 s).
const MAX_SYN_INTERVAL: Duration = Duration::from_secs(8);
/// Longest persist (zero-window probe) interval.
const MAX_PERSIST: Duration = Duration::from_secs(30);
/// Duplicate ACKs that trigger fast retransmit.
const DUP_THRESH: u32 = 3;
/// Keepalive probes sent after the peer answered our FIN, to learn whether it may still send
/// (see [`Connection::check_peer_finished`]). Five, so that one of our peers on a path losing
/// 10 % of packets each way is taken for a silent one about once in 4,000 half-closes.
const FIN_WAIT_PROBES: u8 = 5;
/// Transmissions of our FIN after the peer's FIN was received (LAST_ACK) before the
/// connection ends without its answer (see [`Connection::on_retransmit_timer`]).
const LAST_ACK_FIN_TRANSMISSIONS: u8 = 3;

/// HyStart++ (RFC 9406) delay-increase detection: leave slow start when the minimum RTT of a
/// round grows by more than an eighth (clamped to 4..16 ms) over the previous round's.
#[derive(Debug, Clone, Copy, Default)]
struct HyStart {
    round_end: u64,
    round_min: Option<Duration>,
    last_round_min: Option<Duration>,
    samples: u32,
}

impl HyStart {
    /// RFC 9406 §4.3 N_RTT_SAMPLE.
    const MIN_SAMPLES: u32 = 8;

    fn new_round(&mut self, end: u64) {
        if self.round_min.is_some() {
            self.last_round_min = self.round_min;
        }
        self.round_end = end;
        self.round_min = None;
        self.samples = 0;
    }

    /// Takes an RTT sample; true when slow start should end.
    fn on_sample(&mut self, r: Duration) -> bool {
        self.round_min = Some(self.round_min.map_or(r, |m| m.min(r)));
        self.samples += 1;
        let (Some(cur), Some(last)) = (self.round_min, self.last_round_min) else {
            return false;
        };
        let eta = (last / 8).clamp(Duration::from_millis(4), Duration::from_millis(16));
        self.samples >= Self::MIN_SAMPLES && cur >= last + eta
    }
}

/// One reliable stream.
pub struct Connection {
    config: Config,
    local: SocketAddr,
    remote: SocketAddr,
    state: State,
    error: Option<ConnError>,

    send: SendBuffer,
    recv: RecvBuffer,
    peer_isn: u32,
    /// Peer's window in bytes, from `window_base` (the ACK offset that carried it).
    peer_window: u64,
    window_base: u64,
    largest_peer_window: u64,

    cc: Box<dyn Controller>,
    rtt: RttEstimator,
    pacer: Pacer,
    recovery: Recovery,
    recovery_point: u64,
    dup_acks: u32,
    rto_backoff: u32,
    consecutive_timeouts: u8,
    hystart: HyStart,
    persist_probe: bool,

    timers: [Option<Instant>; TIMERS],
    handshake_sent: Option<Instant>,
    handshake_transmissions: u8,
    syn_pending: bool,

    ack_pending: bool,
    ack_now: bool,
    unacked_segments: u32,
    advertised_slots: u16,
    window_update: bool,

    shutdown: bool,
    closed_by_app: bool,
    fin_sent: bool,
    fin_pending: bool,
    fin_transmissions: u8,
    peer_fin: Option<u64>,
    peer_fin_seq: u32,
    fin_ack_pending: bool,
    /// Probes sent in FIN_WAIT_2 to learn whether the peer, having answered our FIN, may
    /// still send; `None` when not (or no longer) asking.
    fin_wait_probes: Option<u8>,
    rst_pending: bool,
    keepalive_pending: bool,
    /// A keepalive probe went out and nothing has arrived since.
    probe_outstanding: bool,
    /// The peer answered a keepalive probe, so silence from it means it is gone. A v1 peer
    /// never answers probes; for it, as in v1, an idle connection is never timed out.
    peer_answers_probes: bool,

    last_recv: Instant,
    last_activity: Instant,
    /// When the handshake completed.
    established_at: Option<Instant>,
    blocked_writer: bool,
    events: VecDeque<Event>,
    stats: Stats,
}

impl core::fmt::Debug for Connection {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Connection")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("state", &self.state)
            .field("una", &self.send.una())
            .field("nxt", &self.send.nxt())
            .field("rcv_nxt", &self.recv.nxt())
            .finish_non_exhaustive()
    }
}

/// The parts of a received stream packet the state machine uses.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    /// Flags.
    pub flags: Flags,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Window in slots.
    pub window: u16,
    /// Payload.
    pub payload: &'a [u8],
}

impl<'a> Segment<'a> {
    /// Takes the fields of a parsed packet.
    pub fn new(repr: &PacketRepr, payload: &'a [u8]) -> Self {
        Segment {
            flags: repr.flags,
            seq: repr.seq,
            ack: repr.ack,
            window: repr.window,
            payload,
        }
    }
}

impl Connection {
    fn new(
        now: Instant,
        config: Config,
        local: SocketAddr,
        remote: SocketAddr,
        state: State,
    ) -> Self {
        let mss = u64::from(config.mss.clamp(1, MAX_MSS));
        let config = Config {
            mss: mss as u16,
            ..config
        };
        Connection {
            config,
            local,
            remote,
            state,
            error: None,
            send: SendBuffer::new(config.send_buffer, now),
            recv: RecvBuffer::new(config.recv_buffer),
            peer_isn: 0,
            peer_window: 0,
            window_base: 0,
            largest_peer_window: 0,
            cc: config.congestion.build(mss),
            rtt: RttEstimator::new(),
            pacer: Pacer::new(),
            recovery: Recovery::Open,
            recovery_point: 0,
            dup_acks: 0,
            rto_backoff: 1,
            consecutive_timeouts: 0,
            hystart: HyStart::default(),
            persist_probe: false,
            timers: [None; TIMERS],
            handshake_sent: None,
            handshake_transmissions: 0,
            syn_pending: true,
            ack_pending: false,
            ack_now: false,
            unacked_segments: 0,
            advertised_slots: 0,
            window_update: false,
            shutdown: false,
            closed_by_app: false,
            fin_sent: false,
            fin_pending: false,
            fin_transmissions: 0,
            peer_fin: None,
            peer_fin_seq: 0,
            fin_ack_pending: false,
            fin_wait_probes: None,
            rst_pending: false,
            keepalive_pending: false,
            probe_outstanding: false,
            peer_answers_probes: false,
            last_recv: now,
            last_activity: now,
            established_at: None,
            blocked_writer: false,
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// Opens a connection: the first `poll_transmit` sends the SYN.
    pub fn connect(now: Instant, config: Config, local: SocketAddr, remote: SocketAddr) -> Self {
        Connection::new(now, config, local, remote, State::SynSent)
    }

    /// Answers a SYN: the first `poll_transmit` sends the SYN-ACK.
    pub fn accept(
        now: Instant,
        config: Config,
        local: SocketAddr,
        remote: SocketAddr,
        syn: &Segment<'_>,
    ) -> Self {
        let mut c = Connection::new(now, config, local, remote, State::SynReceived);
        c.peer_isn = syn.seq;
        c.set_peer_window(0, syn.window);
        c
    }

    // ---- accessors -------------------------------------------------------------------

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Why the connection failed, once it has.
    pub fn error(&self) -> Option<ConnError> {
        self.error
    }

    /// Our end.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// The peer's end.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// True when the connection is closed and has nothing left to send: it can be dropped.
    pub fn is_drained(&self) -> bool {
        self.state == State::Closed && !self.rst_pending && !self.fin_ack_pending
    }

    /// Statistics, with the live congestion figures.
    pub fn stats(&self) -> Stats {
        Stats {
            cwnd: self.cc.window(),
            bytes_in_flight: self.send.pipe(),
            srtt: self.rtt.srtt(),
            rttvar: self.rtt.rttvar(),
            recovery: self.recovery,
            ssthresh: self.cc.ssthresh(),
            peer_window: self.peer_window,
            recv_window: self.recv.free() as u64,
            ..self.stats
        }
    }

    /// Disables (or re-enables) Nagle's algorithm.
    pub fn set_nodelay(&mut self, nodelay: bool) {
        self.config.nodelay = nodelay;
    }

    /// Bytes ready to read.
    pub fn readable(&self) -> usize {
        self.recv.readable()
    }

    /// Bytes the send buffer can take now.
    pub fn writable(&self) -> usize {
        if self.can_write() {
            self.send.free()
        } else {
            0
        }
    }

    /// Bytes written and not yet acknowledged.
    pub fn unacked(&self) -> u64 {
        self.send.end() - self.send.una()
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---- wire sequence mapping ----------------------------------------------------------

    /// Wire seq of our stream offset (ISN 0: offset 0 is seq 1).
    fn snd_seq(offset: u64) -> u32 {
        (offset as u32).wrapping_add(1)
    }

    /// Wire seq of the peer's stream offset.
    fn rcv_seq(&self, offset: u64) -> u32 {
        self.peer_isn.wrapping_add(1).wrapping_add(offset as u32)
    }

    /// Peer stream offset of a wire seq, relative to what we expect next (may be negative).
    fn rcv_offset(&self, seq: u32) -> i64 {
        let nxt = self.recv.nxt();
        let diff = seq.wrapping_sub(self.rcv_seq(nxt)) as i32;
        nxt as i64 + i64::from(diff)
    }

    /// Our stream offset acknowledged by a wire ack, if it lies in `[una, nxt]`.
    fn ack_offset(&self, ack: u32) -> Option<u64> {
        let una = self.send.una();
        let diff = ack.wrapping_sub(Self::snd_seq(una)) as i32;
        if diff < 0 {
            return None;
        }
        let off = una + diff as u64;
        (off <= self.send.nxt()).then_some(off)
    }

    fn set_peer_window(&mut self, base: u64, slots: u16) {
        self.peer_window = u64::from(slots) * WINDOW_SLOT;
        self.window_base = base;
        self.largest_peer_window = self.largest_peer_window.max(self.peer_window);
    }

    fn window_slots(&self) -> u16 {
        (self.recv.free() as u64 / WINDOW_SLOT).min(u64::from(u16::MAX)) as u16
    }

    // ---- application side ---------------------------------------------------------------

    fn can_write(&self) -> bool {
        matches!(
            self.state,
            State::SynSent | State::SynReceived | State::Established | State::CloseWait
        ) && !self.shutdown
    }

    /// Queues bytes for sending; returns how many were taken.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, WriteError> {
        if let Some(e) = self.error {
            return Err(WriteError::Failed(e));
        }
        if !self.can_write() {
            return Err(WriteError::Closed);
        }
        let n = self.send.write(data);
        if n == 0 && !data.is_empty() {
            self.blocked_writer = true;
            return Err(WriteError::Blocked);
        }
        Ok(n)
    }

    /// Reads in-order bytes. `Ok(0)` for a non-empty `out` means the peer finished sending.
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize, ReadError> {
        let before = self.window_slots();
        let n = self.recv.read(out);
        if n > 0 {
            // Tell the peer when the window opens meaningfully (receiver SWS avoidance,
            // RFC 1122 §4.2.3.3): by two segments or half the buffer from a small value.
            let after = self.window_slots();
            let opened = u64::from(after.saturating_sub(self.advertised_slots)) * WINDOW_SLOT;
            let threshold = (2 * u64::from(self.config.mss))
                .min(self.config.recv_buffer as u64 / 2)
                .max(WINDOW_SLOT);
            if after > before && opened >= threshold && self.receiving() {
                self.window_update = true;
            }
            return Ok(n);
        }
        if out.is_empty() {
            return Ok(0);
        }
        if let Some(e) = self.error {
            return Err(ReadError::Failed(e));
        }
        if self.peer_finished() || self.state == State::Closed {
            return Ok(0);
        }
        Err(ReadError::Blocked)
    }

    fn peer_finished(&self) -> bool {
        self.peer_fin.is_some_and(|f| self.recv.nxt() >= f)
    }

    fn receiving(&self) -> bool {
        matches!(
            self.state,
            State::Established | State::FinWait1 | State::FinWait2
        )
    }

    /// Finishes our direction: a FIN follows once every byte written is acknowledged (a v1
    /// receiver discards data that arrives after a FIN). Reading stays possible.
    pub fn shutdown(&mut self, now: Instant) {
        if self.shutdown || self.state == State::Closed {
            return;
        }
        self.shutdown = true;
        match self.state {
            // Nothing written yet: there is nothing to deliver, so stop now. Otherwise the
            // data and then the FIN go out once the handshake completes.
            State::SynSent if self.send.end() == 0 => self.finish(now, None),
            State::SynSent => {}
            State::SynReceived | State::Established => self.state = State::FinWait1,
            State::CloseWait => self.state = State::LastAck,
            _ => {}
        }
        self.fin_pending = true;
    }

    /// Shuts down and stops reading: data that still arrives is acknowledged and discarded,
    /// and the connection does not wait for the peer's FIN once ours is acknowledged.
    pub fn close(&mut self, now: Instant) {
        self.closed_by_app = true;
        let mut discard = [0u8; 4096];
        while self.recv.read(&mut discard) > 0 {}
        self.shutdown(now);
    }

    /// Resets the connection at once.
    pub fn abort(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if self.state != State::SynSent {
            self.rst_pending = true;
        }
        self.finish(now, Some(ConnError::Aborted));
    }

    fn finish(&mut self, _now: Instant, error: Option<ConnError>) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        if self.error.is_none() {
            self.error = error;
        }
        self.timers = [None; TIMERS];
        self.events.push_back(Event::Closed);
        if self.recv.readable() == 0 || error.is_some() {
            self.events.push_back(Event::Readable);
        }
    }

    fn fail(&mut self, now: Instant, error: ConnError) {
        self.rst_pending = true;
        self.finish(now, Some(error));
    }

    /// True when `seg`, a SYN for this connection's 4-tuple, opens a new connection rather
    /// than repeating the SYN of this one:
    ///
    /// - in TIME_WAIT, any SYN;
    /// - after the handshake (ESTABLISHED through LAST_ACK), a SYN with the peer's ISN (v1:
    ///   always 0) once the peer has provably left SYN_SENT: it sent data or FIN, it
    ///   acknowledged data of ours, or the handshake completed at least one RTO ago, longer
    ///   than a duplicate of its SYN can plausibly stay in flight.
    ///
    /// Before the handshake completes a SYN is a retransmission (or a simultaneous open).
    pub fn syn_opens_new_connection(&self, now: Instant, seg: &Segment<'_>) -> bool {
        let f = seg.flags;
        if !f.contains(Flags::SYN) || f.contains(Flags::ACK) || f.contains(Flags::RST) {
            return false;
        }
        match self.state {
            State::TimeWait => true,
            State::Established
            | State::FinWait1
            | State::FinWait2
            | State::CloseWait
            | State::Closing
            | State::LastAck => {
                if seg.seq != self.peer_isn {
                    return false;
                }
                let peer_sent = self.recv.nxt() > 0 || self.peer_fin.is_some();
                let peer_acked = self.send.una() > 0;
                let old = self
                    .established_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.rtt.rto());
                peer_sent || peer_acked || old
            }
            State::SynSent | State::SynReceived | State::Closed => false,
        }
    }

    /// Ends the connection because its peer opened a new one on the same 4-tuple. Nothing is
    /// sent: an RST would reach the peer's new connection. From TIME_WAIT this is a clean
    /// close; otherwise the application sees [`ConnError::Reset`].
    pub fn supersede(&mut self, now: Instant) {
        let error = (self.state != State::TimeWait).then_some(ConnError::Reset);
        self.finish(now, error);
    }

    // ---- input ---------------------------------------------------------------------------

    /// Processes one segment of this connection.
    pub fn handle_segment(&mut self, now: Instant, seg: &Segment<'_>) {
        if self.state == State::Closed {
            // A closed connection still answers a resent FIN it already accepted, so a peer
            // whose FIN|ACK was lost can finish.
            if seg.flags == Flags::FIN && self.peer_fin.is_some() && seg.seq == self.peer_fin_seq {
                self.fin_ack_pending = true;
            }
            return;
        }
        self.stats.segments_received += 1;
        if self.probe_outstanding
            && self.fin_wait_probes.is_some()
            && !seg.flags.contains(Flags::FIN)
        {
            // The peer answered after our FIN was: it is not a v1 peer in TIME_WAIT.
            self.fin_wait_probes = None;
        }
        if self.probe_outstanding {
            self.probe_outstanding = false;
            self.peer_answers_probes = true;
        }
        let f = seg.flags;
        if f.contains(Flags::RST) {
            self.handle_rst(now, seg);
            return;
        }
        if f.contains(Flags::SYN) {
            self.last_recv = now;
            self.handle_syn(now, seg);
            return;
        }
        if f.contains(Flags::FIN) {
            self.last_recv = now;
            if f.contains(Flags::ACK) {
                self.handle_fin_ack(now, seg);
            } else {
                self.handle_fin(now, seg);
            }
            return;
        }
        if !f.contains(Flags::ACK) {
            return;
        }
        self.last_recv = now;
        match self.state {
            State::SynSent => return,
            State::SynReceived => {
                if seg.ack != Self::snd_seq(0) {
                    return;
                }
                self.establish(now);
            }
            _ => {}
        }
        let sack = sack::parse(seg.payload);
        if seg.payload.is_empty() && self.rcv_offset(seg.seq) < self.recv.nxt() as i64 {
            // A keepalive probe (seq below what we expect): answer at once.
            self.ack_now = true;
        }
        self.handle_ack(now, seg, sack.as_ref());
        if sack.is_none() && !seg.payload.is_empty() {
            self.handle_data(now, seg);
        }
    }

    fn handle_rst(&mut self, now: Instant, seg: &Segment<'_>) {
        let acceptable = match self.state {
            // v1 refuses with seq 0, ack 0 and no ACK flag.
            State::SynSent => true,
            _ => {
                let off = self.rcv_offset(seg.seq);
                let nxt = self.recv.nxt() as i64;
                off >= nxt && off <= nxt + (self.recv.window() as i64).max(1)
            }
        };
        if !acceptable {
            return;
        }
        let error = if self.state == State::SynSent {
            ConnError::Refused
        } else {
            ConnError::Reset
        };
        // Everything we sent was acknowledged before our FIN went out: a reset after both
        // sides finished loses nothing.
        let clean = matches!(
            self.state,
            State::TimeWait | State::LastAck | State::Closing
        ) || (self.state == State::FinWait2 && self.closed_by_app);
        self.finish(now, (!clean).then_some(error));
    }

    fn handle_syn(&mut self, now: Instant, seg: &Segment<'_>) {
        let is_synack = seg.flags.contains(Flags::ACK);
        match (self.state, is_synack) {
            (State::SynSent, true) => {
                if seg.ack != Self::snd_seq(0) {
                    return;
                }
                self.peer_isn = seg.seq;
                self.set_peer_window(0, seg.window);
                self.handshake_rtt(now);
                self.establish(now);
                self.ack_now = true;
            }
            (State::SynSent, false) => {
                // Simultaneous open: answer with SYN-ACK and wait for the peer's.
                self.peer_isn = seg.seq;
                self.set_peer_window(0, seg.window);
                self.state = State::SynReceived;
                self.syn_pending = true;
            }
            (State::SynReceived, true) => {
                if seg.ack != Self::snd_seq(0) {
                    return;
                }
                self.handshake_rtt(now);
                self.establish(now);
                self.ack_now = true;
            }
            (State::SynReceived, false) => {
                // Duplicate SYN: the SYN-ACK was lost.
                if seg.seq == self.peer_isn {
                    self.syn_pending = true;
                }
            }
            (_, true) => {
                // Our final ACK was lost and the peer resent its SYN-ACK.
                if seg.seq == self.peer_isn {
                    self.ack_now = true;
                }
            }
            (_, false) => {
                // A retransmitted SYN after we consider the connection open (v1 wire §3.3:
                // a SYN-ACK must answer every SYN).
                if seg.seq == self.peer_isn {
                    self.syn_pending = true;
                }
            }
        }
    }

    fn handshake_rtt(&mut self, now: Instant) {
        if self.handshake_transmissions == 1 {
            if let Some(sent) = self.handshake_sent {
                self.rtt.update(now.saturating_duration_since(sent));
            }
        }
    }

    fn establish(&mut self, now: Instant) {
        self.state = if self.shutdown {
            State::FinWait1
        } else {
            State::Established
        };
        self.syn_pending = false;
        self.set_timer(Timer::Retransmit, None);
        self.last_activity = now;
        self.established_at = Some(now);
        self.events.push_back(Event::Connected);
        if self.send.free() > 0 {
            self.events.push_back(Event::Writable);
        }
    }

    fn handle_fin(&mut self, now: Instant, seg: &Segment<'_>) {
        let off = self.rcv_offset(seg.seq);
        let nxt = self.recv.nxt() as i64;
        // A FIN outside the receive window is ignored (v1 accepts any).
        if off < nxt || off > nxt + self.recv.window() as i64 {
            if self.peer_fin.is_some() && seg.seq == self.peer_fin_seq {
                self.fin_ack_pending = true; // our FIN|ACK was lost
            }
            return;
        }
        if self.state == State::TimeWait {
            // RFC 9293 §3.10.7.4: a FIN in TIME_WAIT is answered and restarts the timer.
            self.peer_fin_seq = seg.seq;
            self.fin_ack_pending = true;
            self.set_timer(Timer::TimeWait, Some(now + self.config.time_wait));
            return;
        }
        if matches!(self.state, State::SynSent | State::SynReceived) {
            return;
        }
        self.peer_fin = Some(off as u64);
        self.peer_fin_seq = seg.seq;
        self.fin_ack_pending = true;
        self.state = match self.state {
            State::Established => State::CloseWait,
            State::FinWait1 => {
                if self.fin_sent {
                    State::Closing
                } else {
                    State::LastAck
                }
            }
            State::FinWait2 => State::TimeWait,
            s => s,
        };
        if self.state == State::TimeWait {
            self.enter_time_wait(now);
        }
        if self.peer_finished() {
            self.events.push_back(Event::Readable);
        }
    }

    fn handle_fin_ack(&mut self, now: Instant, seg: &Segment<'_>) {
        // Never answered (v1 wire §3.6: answering FIN|ACK makes two peers bounce forever).
        if !self.fin_sent || seg.ack != Self::snd_seq(self.send.end()).wrapping_add(1) {
            return;
        }
        self.set_timer(Timer::Retransmit, None);
        self.fin_pending = false;
        match self.state {
            State::FinWait1 => {
                self.state = State::FinWait2;
                if self.closed_by_app {
                    // A v1 peer never sends its own FIN after answering ours: a closed
                    // connection waits for one only so long.
                    self.set_timer(Timer::TimeWait, Some(now + self.config.fin_wait2));
                }
                if !self.peer_answers_probes {
                    // It may be a v1 peer, which has now finished both directions: ask.
                    self.fin_wait_probes = Some(0);
                    self.set_timer(Timer::Retransmit, Some(now + self.rtt.rto()));
                }
            }
            State::Closing => {
                self.state = State::TimeWait;
                self.enter_time_wait(now);
            }
            // Linger in TIME_WAIT as well: if our FIN|ACK answering the peer's FIN was lost,
            // the peer resends its FIN and must get an answer.
            State::LastAck => {
                self.state = State::TimeWait;
                self.enter_time_wait(now);
            }
            _ => {}
        }
    }

    fn enter_time_wait(&mut self, now: Instant) {
        self.set_timer(Timer::Retransmit, None);
        self.set_timer(Timer::TimeWait, Some(now + self.config.time_wait));
        if self.peer_finished() {
            self.events.push_back(Event::Readable);
        }
    }

    fn handle_ack(&mut self, now: Instant, seg: &Segment<'_>, sack: Option<&sack::Blocks>) {
        let Some(off) = self.ack_offset(seg.ack) else {
            return;
        };
        let una = self.send.una();
        let old_window_right = self.window_base + self.peer_window;
        if off >= self.window_base {
            self.set_peer_window(off, seg.window);
        }
        // The peer answered: the path is alive, whatever the ACK says.
        self.consecutive_timeouts = 0;
        if self.peer_window > 0 {
            self.persist_probe = false;
        }

        if off > una {
            let was_cwnd_limited =
                self.send.pipe() + u64::from(self.config.mss) >= self.cc.window();
            let (newly, sample) = self.send.ack_to(off, now);
            if let Some(sent) = sample {
                let r = now.saturating_duration_since(sent);
                self.rtt.update(r);
                if self.cc.in_slow_start() && self.hystart.on_sample(r) {
                    self.cc.exit_slow_start();
                }
            }
            if off >= self.hystart.round_end {
                self.hystart.new_round(self.send.nxt());
            }
            self.dup_acks = 0;
            self.rto_backoff = 1;
            if self.recovery != Recovery::Open && off >= self.recovery_point {
                self.recovery = Recovery::Open;
            }
            // No growth during fast recovery; after a timeout, slow start rebuilds the window.
            if self.recovery != Recovery::Fast && newly > 0 {
                self.cc.on_ack(now, newly, &self.rtt, !was_cwnd_limited);
            }
            // RFC 6298 §5.3: restart the timer on new acknowledgments.
            let next = (self.send.pipe() > 0 || self.send.lost_bytes() > 0)
                .then(|| now + self.current_rto());
            self.set_timer(Timer::Retransmit, next);
            if self.blocked_writer && self.send.free() > 0 {
                self.blocked_writer = false;
                self.events.push_back(Event::Writable);
            }
        } else if off == una
            && self.send.nxt() > una
            && (seg.payload.is_empty() || sack.is_some())
            && self.window_base + self.peer_window == old_window_right
        {
            self.dup_acks += 1;
            self.stats.duplicate_acks += 1;
        }

        if let Some(blocks) = sack {
            self.stats.sack_blocks_received += blocks.len() as u64;
            let mut newly_sacked = 0;
            for b in blocks.iter() {
                if let (Some(l), Some(r)) = (self.ack_offset(b.left), self.ack_offset(b.right)) {
                    newly_sacked += self.send.sack(l, r, now);
                }
            }
            // Newly SACKed data shows the path delivers: the retransmission timer is for
            // when nothing comes back at all, so it restarts (as on a cumulative ACK).
            if newly_sacked > 0 && self.timers[Timer::Retransmit as usize].is_some() {
                self.set_timer(Timer::Retransmit, Some(now + self.current_rto()));
            }
        }

        // RACK's reordering window: a quarter of the minimum RTT (RFC 8985 §6.2).
        let reorder =
            (self.rtt.min_rtt().unwrap_or(rtt::INITIAL_RTO) / 4).max(Duration::from_millis(1));
        let mut lost = self.send.detect_losses(reorder) > 0;
        lost |= self.send.detect_lost_retransmissions(reorder) > 0;
        // Without SACK, three duplicate ACKs mean the first segment is lost (RFC 5681 §3.2).
        if self.stats.sack_blocks_received == 0
            && self.dup_acks >= DUP_THRESH
            && self.recovery == Recovery::Open
        {
            if let Some(i) = self.send.first_unsacked() {
                lost |= self.send.mark_lost(i);
            }
        }
        if lost && self.recovery == Recovery::Open {
            self.recovery = Recovery::Fast;
            self.recovery_point = self.send.nxt();
            self.stats.fast_retransmits += 1;
            self.cc
                .on_congestion_event(now, self.send.pipe() + self.send.lost_bytes());
        }
        // One delivery-rate sample per ACK, in or out of recovery.
        let pipe = self.send.pipe();
        if let Some(rs) = self.send.delivery().generate(now, self.rtt.min_rtt(), pipe) {
            self.cc.on_rate_sample(now, &rs);
        }
        // Everything acknowledged: nothing to time out, unless our FIN is still unanswered.
        if self.send.all_acked() && !(self.fin_sent && self.fin_pending) {
            self.set_timer(Timer::Retransmit, None);
        }
    }

    fn handle_data(&mut self, now: Instant, seg: &Segment<'_>) {
        if !self.receiving() {
            return;
        }
        let off = self.rcv_offset(seg.seq);
        let (start, data) = if off < 0 {
            let skip = (-off) as usize;
            if skip >= seg.payload.len() {
                self.ack_now = true;
                return;
            }
            (0u64, &seg.payload[skip..])
        } else {
            (off as u64, seg.payload)
        };
        let readable_before = self.recv.readable();
        let ins = self.recv.insert(start, data);
        if self.closed_by_app {
            let mut discard = [0u8; 4096];
            while self.recv.read(&mut discard) > 0 {}
        }
        self.stats.bytes_received += ins.in_order as u64;
        if ins.in_order > 0 && readable_before == 0 && !self.closed_by_app {
            self.events.push_back(Event::Readable);
        }
        if ins.in_order > 0 && self.peer_finished() {
            self.events.push_back(Event::Readable);
        }
        // Out of order, duplicate, or beyond the window: acknowledge at once (with SACK).
        if ins.out_of_order > 0
            || ins.duplicate > 0
            || ins.beyond_window > 0
            || self.recv.has_out_of_order()
        {
            self.ack_now = true;
        } else {
            self.unacked_segments += 1;
            if self.unacked_segments >= 2 {
                self.ack_now = true;
            } else if !self.ack_pending {
                self.ack_pending = true;
                self.set_timer(Timer::DelayedAck, Some(now + self.config.delayed_ack));
            }
        }
    }

    // ---- timers --------------------------------------------------------------------------

    fn set_timer(&mut self, t: Timer, at: Option<Instant>) {
        self.timers[t as usize] = at;
    }

    /// The retransmission timeout with exponential backoff, capped at [`rtt::MAX_RTO`].
    fn current_rto(&self) -> Duration {
        (self.rtt.rto() * self.rto_backoff).min(rtt::MAX_RTO)
    }

    /// The next time [`Connection::handle_timeout`] must run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        let mut next = self.timers.iter().flatten().min().copied();
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(t) = self.idle_deadline() {
            consider(t);
        }
        if matches!(
            self.state,
            State::Established | State::CloseWait | State::FinWait2
        ) {
            consider(self.last_activity.max(self.last_recv) + self.keepalive_interval());
        }
        next
    }

    /// Idle time before a keepalive probe: the configured interval, but at most a third of the
    /// idle timeout, so that a peer answering probes is heard from before silence fails the
    /// connection.
    fn keepalive_interval(&self) -> Duration {
        self.config.keepalive.min(self.config.idle_timeout / 3)
    }

    /// When silence from the peer fails the connection: after the idle timeout without any
    /// packet, if the peer is known to answer keepalive probes or owes us acknowledgments.
    fn idle_deadline(&self) -> Option<Instant> {
        let watch = self.peer_answers_probes
            || !self.send.all_acked()
            || matches!(self.state, State::SynSent | State::SynReceived);
        (watch && self.state != State::TimeWait).then(|| self.last_recv + self.config.idle_timeout)
    }

    /// Runs whatever timers are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if self.idle_deadline().is_some_and(|t| now >= t) {
            self.fail(now, ConnError::Idle);
            return;
        }
        if matches!(
            self.state,
            State::Established | State::CloseWait | State::FinWait2
        ) && now >= self.last_activity.max(self.last_recv) + self.keepalive_interval()
        {
            self.keepalive_pending = true;
            self.last_activity = now;
        }
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        if due(self.timers[Timer::TimeWait as usize]) {
            self.finish(now, None);
            return;
        }
        if due(self.timers[Timer::DelayedAck as usize]) {
            self.set_timer(Timer::DelayedAck, None);
            if self.ack_pending {
                self.ack_now = true;
            }
        }
        if due(self.timers[Timer::Pacing as usize]) {
            self.set_timer(Timer::Pacing, None);
        }
        if due(self.timers[Timer::Retransmit as usize]) {
            self.set_timer(Timer::Retransmit, None);
            self.on_retransmit_timer(now);
        }
    }

    fn on_retransmit_timer(&mut self, now: Instant) {
        match self.state {
            State::SynSent | State::SynReceived => {
                if self.handshake_transmissions > self.config.syn_retries {
                    self.fail(now, ConnError::TimedOut);
                } else {
                    self.syn_pending = true;
                }
                return;
            }
            State::TimeWait | State::Closed => return,
            State::FinWait2 => {
                self.check_peer_finished(now);
                return;
            }
            _ => {}
        }
        if self.send.in_flight_segments() == 0 {
            if self.fin_sent && self.fin_pending {
                // Our FIN went unanswered.
                self.fin_transmissions = self.fin_transmissions.saturating_add(1);
                if self.state == State::LastAck
                    && self.fin_transmissions >= LAST_ACK_FIN_TRANSMISSIONS
                {
                    // The peer finished first and acknowledged every byte we sent: our FIN
                    // only tells it we are done too. A v1 peer forgets the connection 10 to
                    // 25 s after its FIN and then ignores FINs (v1 wire §3.6), so the FIN is
                    // not resent for long, and the end is clean: no RST, no error.
                    self.finish(now, None);
                } else if self.fin_transmissions > self.config.max_retransmits {
                    self.fail(now, ConnError::TimedOut);
                } else {
                    self.fin_sent = false;
                    self.rto_backoff = self.rto_backoff.saturating_mul(2).min(64);
                }
            } else if self.peer_window == 0 && self.send.unsent() > 0 {
                // Persist timer: probe the zero window with one byte.
                self.persist_probe = true;
            }
            return;
        }
        self.stats.timeouts += 1;
        if self.peer_window == 0 && self.send.nxt() >= self.window_base {
            // Zero window with a probe outstanding: resend it, no congestion reaction.
            self.send.mark_all_lost();
            self.persist_probe = true;
            self.rto_backoff = self.rto_backoff.saturating_mul(2).min(64);
            return;
        }
        self.consecutive_timeouts += 1;
        // v1 §3.5: a segment is sent at most `max_retransmits` times in all; the timeout
        // after the last of them fails the connection.
        if self.consecutive_timeouts >= self.config.max_retransmits {
            self.fail(now, ConnError::TimedOut);
            return;
        }
        if self.recovery != Recovery::Timeout {
            // A new loss event: the congestion window is reduced once per event.
            self.cc
                .on_timeout(now, self.send.pipe() + self.send.lost_bytes());
            self.recovery = Recovery::Timeout;
        }
        // RFC 6298 §5.5: every expiry doubles the RTO (capped by `current_rto`); new
        // acknowledged data resets the backoff.
        self.rto_backoff = self.rto_backoff.saturating_mul(2).min(64);
        self.recovery_point = self.send.nxt();
        self.dup_acks = 0;
        self.send.mark_all_lost();
        self.set_timer(Timer::Retransmit, Some(now + self.current_rto()));
    }

    /// FIN_WAIT_2 after the peer answered our FIN: tells a v1 peer, which has then finished
    /// both directions, from one of ours, which may still send (half-close).
    ///
    /// v1 wire §3.6: a v1 peer answers our FIN with FIN|ACK and enters TIME_WAIT, where it
    /// sends no data and never a FIN of its own. Our peers answer a keepalive probe at once;
    /// v1 never does. So up to [`FIN_WAIT_PROBES`] probes go out, the first one RTO after
    /// the FIN|ACK, then doubling (6.2 s in all at the minimum RTO); an answer (any segment
    /// other than a FIN after a probe) keeps the connection open until the peer's FIN,
    /// silence ends the peer's direction here as its FIN would have.
    fn check_peer_finished(&mut self, now: Instant) {
        let Some(sent) = self.fin_wait_probes else {
            return;
        };
        if sent < FIN_WAIT_PROBES {
            self.fin_wait_probes = Some(sent + 1);
            self.keepalive_pending = true;
            let wait = (self.rtt.rto() * (1u32 << sent)).min(rtt::MAX_RTO);
            self.set_timer(Timer::Retransmit, Some(now + wait));
            return;
        }
        self.fin_wait_probes = None;
        self.peer_fin = Some(self.recv.nxt());
        self.state = State::TimeWait;
        self.enter_time_wait(now);
    }

    // ---- output --------------------------------------------------------------------------

    fn emit(
        &mut self,
        buf: &mut [u8],
        flags: Flags,
        seq: u32,
        ack: u32,
        window: u16,
        len: usize,
    ) -> usize {
        let repr = PacketRepr {
            flags,
            protocol: Protocol::Stream,
            src: self.local,
            dst: self.remote,
            seq,
            ack,
            window,
            payload_len: len as u16,
        };
        self.stats.segments_sent += 1;
        // The caller checked that `buf` holds the header and payload.
        repr.emit(buf).unwrap_or(0)
    }

    fn emit_ack(&mut self, now: Instant, buf: &mut [u8]) -> usize {
        let mut ranges = [(0u64, 0u64); sack::MAX_BLOCKS];
        let n = self.recv.sack_ranges(&mut ranges);
        let mut blocks = [sack::Block { left: 0, right: 0 }; sack::MAX_BLOCKS];
        for (b, r) in blocks.iter_mut().zip(&ranges[..n]) {
            *b = sack::Block {
                left: self.rcv_seq(r.0),
                right: self.rcv_seq(r.1),
            };
        }
        let len = sack::emit(&blocks[..n], &mut buf[HEADER_LEN..]).unwrap_or(0);
        self.stats.sack_blocks_sent += n as u64;
        let window = self.window_slots();
        let seq = Self::snd_seq(self.send.nxt());
        let ack = self.rcv_seq(self.recv.nxt());
        self.acked(now, window);
        self.emit(buf, Flags::ACK, seq, ack, window, len)
    }

    /// Bookkeeping after any packet that carries our current ACK.
    fn acked(&mut self, now: Instant, window: u16) {
        self.ack_pending = false;
        self.ack_now = false;
        self.unacked_segments = 0;
        self.window_update = false;
        self.advertised_slots = window;
        self.set_timer(Timer::DelayedAck, None);
        self.last_activity = now;
    }

    /// Writes the next packet (header and payload) into `buf` and returns its length, or
    /// `None` when there is nothing to send now. `buf` must hold a header plus one segment.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        let mss = usize::from(self.config.mss);
        if buf.len() < HEADER_LEN + mss.max(sack::MAX_LEN) {
            return None;
        }
        if self.rst_pending {
            self.rst_pending = false;
            let seq = Self::snd_seq(self.send.nxt());
            let ack = self.rcv_seq(self.recv.nxt());
            return Some(self.emit(buf, Flags::RST, seq, ack, 0, 0));
        }
        match self.state {
            State::Closed => {
                if !self.fin_ack_pending {
                    return None;
                }
                self.fin_ack_pending = false;
                let seq = Self::snd_seq(self.send.nxt());
                let ack = self.peer_fin_seq.wrapping_add(1);
                return Some(self.emit(buf, Flags::FIN | Flags::ACK, seq, ack, 0, 0));
            }
            State::SynSent | State::SynReceived => return self.poll_handshake(now, buf),
            _ => {}
        }
        if self.syn_pending {
            // A SYN-ACK answering a duplicate SYN after the handshake.
            self.syn_pending = false;
            let window = self.window_slots();
            let ack = self.peer_isn.wrapping_add(1);
            return Some(self.emit(buf, Flags::SYN | Flags::ACK, 0, ack, window, 0));
        }
        // An ACK with SACK goes before data: SACK travels only in pure ACKs.
        if self.ack_now && self.recv.has_out_of_order() {
            return Some(self.emit_ack(now, buf));
        }
        if let Some(n) = self.poll_data(now, buf) {
            return Some(n);
        }
        if self.fin_pending && !self.fin_sent && self.send.all_acked() {
            self.fin_sent = true;
            self.set_timer(Timer::Retransmit, Some(now + self.current_rto()));
            let seq = Self::snd_seq(self.send.end());
            self.last_activity = now;
            return Some(self.emit(buf, Flags::FIN, seq, 0, 0, 0));
        }
        if self.fin_ack_pending {
            self.fin_ack_pending = false;
            let seq = Self::snd_seq(self.send.nxt());
            let ack = self.peer_fin_seq.wrapping_add(1);
            self.last_activity = now;
            return Some(self.emit(buf, Flags::FIN | Flags::ACK, seq, ack, 0, 0));
        }
        if self.keepalive_pending {
            // A probe one byte below our next sequence number: our peers answer it at once
            // (v1 ignores it, and only refreshes its idle timer).
            self.keepalive_pending = false;
            self.probe_outstanding = true;
            let window = self.window_slots();
            let seq = Self::snd_seq(self.send.nxt()).wrapping_sub(1);
            let ack = self.rcv_seq(self.recv.nxt());
            self.acked(now, window);
            return Some(self.emit(buf, Flags::ACK, seq, ack, window, 0));
        }
        if self.ack_now || self.window_update {
            return Some(self.emit_ack(now, buf));
        }
        None
    }

    fn poll_handshake(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if !self.syn_pending {
            return None;
        }
        self.syn_pending = false;
        self.handshake_transmissions = self.handshake_transmissions.saturating_add(1);
        self.handshake_sent = Some(now);
        let interval = (Duration::from_secs(1)
            * (1u32 << (self.handshake_transmissions - 1).min(3)))
        .min(MAX_SYN_INTERVAL);
        self.set_timer(Timer::Retransmit, Some(now + interval));
        let window = self.window_slots();
        self.advertised_slots = window;
        Some(if self.state == State::SynSent {
            self.emit(buf, Flags::SYN, 0, 0, window, 0)
        } else {
            let ack = self.peer_isn.wrapping_add(1);
            self.emit(buf, Flags::SYN | Flags::ACK, 0, ack, window, 0)
        })
    }

    fn sending(&self) -> bool {
        matches!(
            self.state,
            State::Established
                | State::CloseWait
                | State::FinWait1
                | State::LastAck
                | State::Closing
        )
    }

    fn pace(&mut self, now: Instant, bytes: u64) -> bool {
        if !self.config.pacing || !self.rtt.has_sample() {
            return true;
        }
        let mss = u64::from(self.config.mss);
        let allowed = match self.cc.pacing_rate() {
            Some(rate) => self.pacer.check_rate(now, bytes, rate, mss),
            None => {
                let window = self.cc.window();
                let slow_start = self.cc.in_slow_start();
                let srtt = self.rtt.srtt();
                self.pacer.check(now, bytes, window, srtt, slow_start, mss)
            }
        };
        match allowed {
            Ok(()) => true,
            Err(at) => {
                self.set_timer(Timer::Pacing, Some(at));
                false
            }
        }
    }

    fn poll_data(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if !self.sending() {
            return None;
        }
        let cwnd = self.cc.window();
        let mss = u64::from(self.config.mss);

        // Retransmit what is marked lost first.
        if let Some(i) = self.send.first_lost() {
            let seg = *self.send.segment(i);
            let len = u64::from(seg.len);
            if self.send.pipe() + len <= cwnd.max(mss) || self.send.pipe() == 0 {
                if !self.pace(now, len) {
                    return None;
                }
                self.send.copy_out(
                    seg.offset,
                    &mut buf[HEADER_LEN..HEADER_LEN + seg.len as usize],
                );
                self.send.on_retransmit(i, now);
                self.pacer.on_sent(len);
                self.stats.retransmissions += 1;
                self.stats.bytes_sent += len;
                if self.timers[Timer::Retransmit as usize].is_none() {
                    self.set_timer(Timer::Retransmit, Some(now + self.current_rto()));
                }
                return Some(self.emit_data(now, buf, seg.offset, seg.len as usize));
            }
            return None;
        }

        let unsent = self.send.unsent();
        if unsent == 0 {
            // Nothing to send with room in the window: rate samples until what is in flight
            // is delivered show the application's pace, not the path's.
            let pipe = self.send.pipe();
            if pipe < cwnd {
                self.send.delivery().on_app_limited(pipe);
            }
            return None;
        }
        let nxt = self.send.nxt();
        let right = self.window_base + self.peer_window;
        let rwnd_room = right.saturating_sub(nxt);
        let cwnd_room = cwnd.saturating_sub(self.send.pipe());
        let mut len = unsent.min(mss).min(rwnd_room).min(cwnd_room);
        if self.persist_probe && rwnd_room == 0 && self.send.pipe() == 0 {
            len = 1;
        } else if len == 0 {
            if rwnd_room == 0
                && self.send.pipe() == 0
                && self.timers[Timer::Retransmit as usize].is_none()
            {
                // Zero window: arm the persist timer.
                let at = now + (self.current_rto()).min(MAX_PERSIST);
                self.set_timer(Timer::Retransmit, Some(at));
            }
            return None;
        } else if len < mss {
            // Sender-side silly-window avoidance and Nagle (RFC 896, RFC 1122 §4.2.3.4).
            let window_limited = len < unsent;
            let nagle_ok = self.config.nodelay || self.send.pipe() == 0;
            let big_enough = len >= self.largest_peer_window / 2 && len > 0;
            if window_limited && !big_enough {
                return None;
            }
            if !window_limited && !nagle_ok {
                return None;
            }
        }
        // A v1 receiver swallows a data payload that parses as SACK; cut such a segment
        // after its first four bytes so it cannot.
        let mut head = [0u8; sack::MAX_LEN];
        let peeked = self
            .send
            .peek(nxt, &mut head[..(len as usize).min(sack::MAX_LEN)]);
        if sack::would_parse_as_sack(&head[..peeked]) {
            len = 4;
        }
        if !self.persist_probe && !self.pace(now, len) {
            return None;
        }
        self.persist_probe = false;
        self.send
            .copy_out(nxt, &mut buf[HEADER_LEN..HEADER_LEN + len as usize]);
        self.send.on_new_segment(len as u32, now);
        self.pacer.on_sent(len);
        self.stats.bytes_sent += len;
        if self.timers[Timer::Retransmit as usize].is_none() {
            self.set_timer(Timer::Retransmit, Some(now + self.current_rto()));
        }
        Some(self.emit_data(now, buf, nxt, len as usize))
    }

    fn emit_data(&mut self, now: Instant, buf: &mut [u8], offset: u64, len: usize) -> usize {
        let window = self.window_slots();
        let seq = Self::snd_seq(offset);
        let ack = self.rcv_seq(self.recv.nxt());
        // Data carries the ACK: a delayed ACK is no longer needed (unless SACK is owed).
        if !self.recv.has_out_of_order() {
            self.acked(now, window);
        } else {
            self.last_activity = now;
        }
        self.emit(buf, Flags::ACK, seq, ack, window, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_mss_fits_ipv6_minimum_path() {
        // 1280 - 40 (IPv6) - 8 (UDP) - 36 (PILS) - 9 (relay) - 34 (header)
        assert_eq!(DEFAULT_MSS, 1153);
        assert_eq!(mss_for_path_mtu(1500, false), 1393);
        assert_eq!(mss_for_path_mtu(9000, false), 4096);
        assert_eq!(mss_for_path_mtu(10, true), 0);
    }
}

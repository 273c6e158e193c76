//! The application front end of the engine: listened ports, each connection's owner (an
//! event channel and write credit), and the moves between them and the node, driven only by
//! the node's events for that connection and by the owners' commands.
//!
//! Reading: on `Readable`, bytes go to the owner in chunks while its channel has room; when
//! it is full, a waiter task wakes the engine once it has room (no polling). Writing: the
//! owner's bytes wait here until the node takes them; `Writable` resumes them, and the credit
//! they held goes back to the owner as the node takes them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use rand_core::OsRng;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tunnel::node::{
    CloseReason, ConnId as NodeConn, Event, ListenError, ListenMode, Node, ReadError, WriteError,
};
use tunnel::stream::{ConnError, State};
use tunnel::SocketAddr as PilotAddr;

use super::{AppEvent, Cmd, ConnId, DialError, DialReply, CONN_QUEUE, READ_CHUNK, WRITE_CREDIT};
use crate::events::Events;
use crate::registry_link::LinkError;

/// A listened port.
#[derive(Debug)]
struct Listener {
    events: mpsc::Sender<AppEvent>,
    per_conn: bool,
}

/// One connection's owner side.
#[derive(Debug)]
struct Conn {
    events: mpsc::Sender<AppEvent>,
    credit: Arc<Semaphore>,
    pending: VecDeque<Vec<u8>>,
    pending_off: usize,
    dial: Option<DialReply>,
    close_requested: bool,
    shut: bool,
    /// The owner was told the connection ended (or is gone).
    finished: bool,
    /// How the node reported the connection ended.
    closed: Option<CloseReason>,
    /// A task waits for room in `events`.
    waiting: bool,
    remote: PilotAddr,
    local_port: u16,
}

impl Conn {
    /// A connection owned by `events`, with `credit` for its writes; `dial` hears when it is
    /// established (or why not) if it is not yet.
    fn new(
        events: mpsc::Sender<AppEvent>,
        credit: Arc<Semaphore>,
        dial: Option<DialReply>,
        remote: PilotAddr,
        local_port: u16,
    ) -> Conn {
        Conn {
            events,
            credit,
            pending: VecDeque::new(),
            pending_off: 0,
            dial,
            close_requested: false,
            shut: false,
            finished: false,
            closed: None,
            waiting: false,
            remote,
            local_port,
        }
    }
}

/// Room in an owner's channel for one more event, or `None` when the owner is gone.
pub(super) type Room = (ConnId, Option<mpsc::OwnedPermit<AppEvent>>);

/// Every listened port and connection owner.
#[derive(Debug, Default)]
pub(super) struct Apps {
    conns: HashMap<ConnId, Conn>,
    listeners: HashMap<u16, Listener>,
    /// Who takes attempts and datagrams to ports no one listens on.
    fallback: Option<mpsc::Sender<AppEvent>>,
    waiters: JoinSet<Room>,
}

/// Emits a connection's end as a webhook event.
fn emit_closed(events: &Events, name: &'static str, c: &Conn, id: ConnId) {
    events.emit(
        name,
        json!({"remote_addr": c.remote.addr.to_string(), "remote_port": c.remote.port,
               "local_port": c.local_port, "conn_id": id}),
    );
}

impl Apps {
    /// Connections with an owner.
    pub(super) fn len(&self) -> usize {
        self.conns.len()
    }

    /// Listened ports.
    pub(super) fn ports(&self) -> usize {
        self.listeners.len()
    }

    pub(super) fn has_waiters(&self) -> bool {
        !self.waiters.is_empty()
    }

    /// The next owner channel with room again.
    pub(super) async fn next_room(&mut self) -> Option<Room> {
        self.waiters.join_next().await.and_then(Result::ok)
    }

    /// An owner's channel has room (or the owner left).
    pub(super) fn on_room(&mut self, now: Instant, node: &mut Node<OsRng>, ev: &Events, r: Room) {
        let (id, permit) = r;
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.waiting = false;
        match permit {
            Some(p) => self.pump_read(now, node, ev, id, Some(p)),
            None => {
                // The owner is gone: finish the connection.
                let _ = node.close(now, NodeConn(id));
                c.finished = true;
                self.maybe_remove(id);
            }
        }
    }

    pub(super) fn on_cmd(&mut self, now: Instant, node: &mut Node<OsRng>, cmd: Cmd) {
        match cmd {
            Cmd::Listen {
                port,
                events,
                per_conn,
                reply,
            } => {
                let r = match self.listeners.entry(port) {
                    std::collections::hash_map::Entry::Occupied(_) => {
                        Err(ListenError::AlreadyBound(port).into())
                    }
                    std::collections::hash_map::Entry::Vacant(v) => node
                        .listen(port, ListenMode::Accept)
                        .map(|()| {
                            v.insert(Listener { events, per_conn });
                        })
                        .map_err(Into::into),
                };
                let _ = reply.send(r);
            }
            Cmd::Unlisten { port, owner } => {
                let held = self.listeners.get(&port).is_some_and(|l| {
                    owner
                        .as_ref()
                        .is_none_or(|w| w.upgrade().is_some_and(|s| s.same_channel(&l.events)))
                });
                if held {
                    self.listeners.remove(&port);
                    node.unlisten(now, port);
                }
            }
            Cmd::ListenFallback { events, reply } => {
                if self.fallback.as_ref().is_some_and(|f| !f.is_closed()) {
                    let _ = reply.send(Err(ListenError::FallbackTaken.into()));
                } else {
                    node.unlisten_fallback();
                    let r = node.listen_fallback().map_err(Into::into);
                    if r.is_ok() {
                        self.fallback = Some(events);
                    }
                    let _ = reply.send(r);
                }
            }
            Cmd::UnlistenFallback => {
                self.fallback = None;
                node.unlisten_fallback();
            }
            Cmd::AcceptIncoming { id, events, reply } => match node.accept_incoming(now, id) {
                Ok(conn) => {
                    // The node just created the connection; its info is there.
                    let Some(info) = node.connection_info(conn) else {
                        let _ = node.abort(now, conn);
                        let _ = reply.send(Err(DialError::Closed(CloseReason::Aborted)));
                        return;
                    };
                    let (remote, local_port) = (info.remote, info.local_port);
                    self.conns.insert(
                        conn.0,
                        Conn::new(
                            events,
                            Arc::new(Semaphore::new(WRITE_CREDIT)),
                            Some(reply),
                            remote,
                            local_port,
                        ),
                    );
                }
                Err(e) => {
                    let _ = reply.send(Err(DialError::Incoming(e)));
                }
            },
            Cmd::RefuseIncoming { id } => {
                let _ = node.refuse_incoming(id);
            }
            Cmd::Dial { dst, events, reply } => match node.dial(now, dst) {
                Ok(id) => {
                    self.conns.insert(
                        id.0,
                        Conn::new(
                            events,
                            Arc::new(Semaphore::new(WRITE_CREDIT)),
                            Some(reply),
                            dst,
                            0,
                        ),
                    );
                }
                Err(e) => {
                    let _ = reply.send(Err(DialError::Start(e)));
                }
            },
            Cmd::Write { conn, data } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.pending.push_back(data);
                    self.pump_write(now, node, conn);
                }
            }
            Cmd::Close { conn } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.close_requested = true;
                    self.pump_write(now, node, conn);
                }
            }
            Cmd::Abort { conn } => {
                let _ = node.abort(now, NodeConn(conn));
            }
            Cmd::SendTo {
                dst,
                src_port,
                data,
            } => {
                let _ = node.send_datagram(dst, src_port, &data);
            }
            Cmd::Info { .. } | Cmd::SetGate(_) | Cmd::Rekey { .. } | Cmd::Shutdown => {}
        }
    }

    /// A node event about a connection or a datagram.
    pub(super) fn on_event(&mut self, now: Instant, node: &mut Node<OsRng>, ev: &Events, e: Event) {
        match e {
            Event::Accepted { conn, port, remote } => {
                self.accepted(now, node, ev, conn, port, remote)
            }
            Event::Connected(conn) => {
                let id = conn.0;
                if let Some(c) = self.conns.get_mut(&id) {
                    if let Some(d) = c.dial.take() {
                        if let Some(info) = node.connection_info(conn) {
                            c.local_port = info.local_port;
                        }
                        let _ = d.send(Ok((id, c.credit.clone())));
                    }
                }
                self.pump_write(now, node, id);
                self.pump_read(now, node, ev, id, None);
            }
            Event::Readable(conn) => self.pump_read(now, node, ev, conn.0, None),
            Event::Writable(conn) => self.pump_write(now, node, conn.0),
            Event::Closed { conn, reason } => {
                let id = conn.0;
                let Some(c) = self.conns.get_mut(&id) else {
                    return;
                };
                c.closed = Some(reason);
                if let Some(d) = c.dial.take() {
                    let _ = d.send(Err(DialError::Closed(reason)));
                    c.finished = true;
                }
                self.pump_read(now, node, ev, id, None);
                self.maybe_remove(id);
            }
            Event::Datagram {
                src,
                dst_port,
                data,
            } => {
                if ev.wanted() {
                    ev.emit(
                        "data.datagram",
                        json!({"src_addr": src.addr.to_string(), "src_port": src.port,
                               "dst_port": dst_port, "size": data.len()}),
                    );
                }
                let owner = match self.listeners.get(&dst_port) {
                    Some(l) => Some(&l.events),
                    None => self.fallback.as_ref(),
                };
                if let Some(events) = owner {
                    let _ = events.try_send(AppEvent::Datagram {
                        src,
                        dst_port,
                        data,
                    });
                }
            }
            // Attempts to ports no one listens on go to the fallback listener's owner; with no
            // owner (or no room in its queue) they are refused as from a closed port.
            Event::Incoming { id, port, remote } => {
                let told = self
                    .fallback
                    .as_ref()
                    .is_some_and(|f| f.try_send(AppEvent::Incoming { id, port, remote }).is_ok());
                if !told {
                    let _ = node.refuse_incoming(id);
                }
            }
            Event::NeedKey(_)
            | Event::NeedEndpoint(_)
            | Event::Discovered(_)
            | Event::SynRateLimited { .. }
            | Event::Untrusted { .. } => {}
        }
    }

    fn accepted(
        &mut self,
        now: Instant,
        node: &mut Node<OsRng>,
        ev: &Events,
        conn: NodeConn,
        port: u16,
        remote: PilotAddr,
    ) {
        let id = conn.0;
        let Some(l) = self.listeners.get(&port) else {
            let _ = node.abort(now, conn);
            return;
        };
        let (events, own) = if l.per_conn {
            let (tx, rx) = mpsc::channel(CONN_QUEUE);
            (tx, Some(rx))
        } else {
            (l.events.clone(), None)
        };
        let credit = Arc::new(Semaphore::new(WRITE_CREDIT));
        let told = l.events.try_send(AppEvent::Accepted {
            port,
            conn: id,
            remote,
            credit: credit.clone(),
            events: own,
        });
        if told.is_err() {
            let _ = node.abort(now, conn);
            return;
        }
        ev.emit(
            "conn.established",
            json!({"src_addr": remote.addr.to_string(), "src_port": remote.port,
                   "dst_port": port, "conn_id": id}),
        );
        self.conns
            .insert(id, Conn::new(events, credit, None, remote, port));
        // Data (or the end) may have come with the handshake.
        self.pump_read(now, node, ev, id, None);
    }

    /// Dials to `node` not yet connected fail with `why` (the node aborts them next).
    pub(super) fn fail_dials_to(&mut self, node: u32, why: Arc<LinkError>) {
        for c in self.conns.values_mut() {
            if c.remote.addr.node == node {
                if let Some(d) = c.dial.take() {
                    let _ = d.send(Err(DialError::Resolve {
                        node,
                        reason: why.clone(),
                    }));
                    c.finished = true;
                }
            }
        }
    }

    /// Shutdown: every connection finishes once its data is sent.
    pub(super) fn close_all(&mut self, now: Instant, node: &mut Node<OsRng>) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                c.close_requested = true;
            }
            self.pump_write(now, node, id);
        }
    }

    /// Every connection has finished its side of the exchange (lingering in TIME_WAIT is not
    /// worth waiting for at shutdown).
    pub(super) fn all_finished(&self, node: &mut Node<OsRng>) -> bool {
        self.conns.iter().all(|(&id, c)| {
            c.pending.is_empty()
                && node.connection_info(NodeConn(id)).is_none_or(|x| {
                    matches!(x.state, State::Closed | State::TimeWait)
                        || x.unacked == 0 && c.finished
                })
        })
    }

    /// The owner's bytes into the node while it takes them; FIN once asked and all taken.
    fn pump_write(&mut self, now: Instant, node: &mut Node<OsRng>, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        while let Some(front) = c.pending.front() {
            let Some(rest) = front.get(c.pending_off..) else {
                break;
            };
            match node.write(NodeConn(id), rest) {
                Ok(n) => {
                    c.credit.add_permits(n);
                    c.pending_off += n;
                    if c.pending_off >= front.len() {
                        c.pending.pop_front();
                        c.pending_off = 0;
                    }
                }
                Err(WriteError::Blocked) => break,
                Err(_) => {
                    // Failed or shut: the bytes can never go; give the credit back.
                    let left: usize = c.pending.iter().map(Vec::len).sum::<usize>() - c.pending_off;
                    c.credit.add_permits(left);
                    c.pending.clear();
                    c.pending_off = 0;
                    break;
                }
            }
        }
        if c.close_requested && c.pending.is_empty() && !c.shut {
            c.shut = true;
            let _ = node.shutdown(now, NodeConn(id));
        }
    }

    /// Received bytes to the owner while its channel has room; its end once read out.
    fn pump_read(
        &mut self,
        now: Instant,
        node: &mut Node<OsRng>,
        ev: &Events,
        id: ConnId,
        mut room: Option<mpsc::OwnedPermit<AppEvent>>,
    ) {
        loop {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if c.finished || c.dial.is_some() || c.waiting {
                break;
            }
            let permit = match room.take() {
                Some(p) => p,
                None => match c.events.clone().try_reserve_owned() {
                    Ok(p) => p,
                    Err(mpsc::error::TrySendError::Full(tx)) => {
                        c.waiting = true;
                        self.waiters
                            .spawn(async move { (id, tx.reserve_owned().await.ok()) });
                        return;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        // The owner is gone: finish the connection.
                        let _ = node.close(now, NodeConn(id));
                        c.finished = true;
                        break;
                    }
                },
            };
            let n = node.readable(NodeConn(id)).unwrap_or(0).min(READ_CHUNK);
            let mut data = vec![0u8; n.max(1)];
            match node.read(NodeConn(id), &mut data) {
                Ok(0) => {
                    emit_closed(ev, "conn.fin", c, id);
                    permit.send(AppEvent::Closed {
                        conn: id,
                        error: None,
                    });
                    c.finished = true;
                    break;
                }
                Ok(k) => {
                    data.truncate(k);
                    permit.send(AppEvent::Data { conn: id, data });
                }
                Err(ReadError::Blocked) => break,
                Err(ReadError::Failed(e)) => {
                    let name = if e == ConnError::Idle {
                        "conn.idle_timeout"
                    } else {
                        "conn.rst"
                    };
                    emit_closed(ev, name, c, id);
                    permit.send(AppEvent::Closed {
                        conn: id,
                        error: Some(CloseReason::from(e)),
                    });
                    c.finished = true;
                    break;
                }
                Err(ReadError::UnknownConnection) => {
                    // Released by the node: the end was reported as Closed.
                    let error = c.closed.filter(|r| *r != CloseReason::Finished);
                    permit.send(AppEvent::Closed { conn: id, error });
                    c.finished = true;
                    break;
                }
            }
        }
        self.maybe_remove(id);
    }

    /// Forgets a connection once its owner was told it ended and the node closed it.
    fn maybe_remove(&mut self, id: ConnId) {
        let done = self
            .conns
            .get(&id)
            .is_some_and(|c| c.finished && c.closed.is_some() && !c.waiting);
        if done {
            if let Some(c) = self.conns.remove(&id) {
                let left: usize = c.pending.iter().map(Vec::len).sum::<usize>() - c.pending_off;
                c.credit.add_permits(left);
            }
        }
    }
}

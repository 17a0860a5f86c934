//! Everything behind the coordinator's one lock, and the one way a command
//! reaches it: [`Core::execute`] applies a command and delivers what it
//! produced (events, the reply, an attached connection, a session's end)
//! to the connections. A server in memory executes a request's command at
//! once; a durable one executes each command as the log applies it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use latchkey_client::protocol::{
    self, ErrorCode, ErrorReply, Op, Reply, ServerMessage, SessionEvent, SessionId, Welcome, Xid,
};
use tokio::sync::{oneshot, Notify};
use tracing::{info, warn};

use super::lease;
use super::outbound::{CloseReason, Outbound};
use crate::state::{
    Command, Coordinator, Forced, ForcedNode, Heard, Outcome, Output, Refusal, SessionEnd,
    SessionGrant,
};

/// Everything behind the one lock.
pub(super) struct Core {
    pub(super) coordinator: Coordinator,
    /// The connection currently attached to each session, if any.
    pub(super) connections: HashMap<SessionId, Attached>,
    /// Source of connection ids, to tell an old connection from its successor.
    pub(super) next_connection: u64,
    /// Source of handshake tickets (see `pending`).
    next_ticket: u64,
    /// Run `check_invariants` after every apply (a bug then stops the server
    /// at once instead of corrupting state quietly).
    pub(super) check_invariants: bool,
    /// Keeps the lease file ahead of the coordinator's lease horizon.
    pub(super) lease: Option<lease::LeaseRecorder>,
    /// Queues that events were pushed to since the last `take_to_flush`:
    /// whoever applied writes them once the lock is dropped.
    to_flush: Vec<Arc<Outbound>>,
    /// Closes whose sessions still own nodes: the connection's queue, with
    /// a place held for the reply, and the reply, which goes out once the
    /// session is gone (its client may rely on its ephemerals being
    /// deleted when the close returns).
    pub(super) closing: HashMap<SessionId, (Arc<Outbound>, Bytes)>,
    /// Sessions that expired and still own nodes: their clients are told
    /// once the nodes are gone, so that a client told of its expiry finds
    /// its ephemerals deleted, as after a close.
    expiring: HashSet<SessionId>,
    /// Sessions heard from by reads and heartbeats since the last
    /// `Command::Heard`, with the highest ack each sent.
    heard: BTreeMap<SessionId, Xid>,
    /// Handshakes waiting for their open or resume to be applied, by the
    /// ticket their command carries.
    pending: HashMap<u64, PendingAttach>,
    /// Wakes the ticker when a close leaves nodes to delete.
    tick_now: Arc<Notify>,
    /// Why writes are refused, once the log can no longer make them
    /// durable: reads go on.
    pub(super) read_only: Option<String>,
    /// The limits a welcome announces.
    frame_bytes_max: u64,
    data_bytes_max: u64,
}

/// A session's current connection.
pub(super) struct Attached {
    pub(super) connection: u64,
    pub(super) peer: SocketAddr,
    pub(super) outbound: Arc<Outbound>,
    /// Its requests whose commands are on their way through the log, in
    /// order, and the replies made behind them without the log (refusals),
    /// which wait their turn: replies go out in request order. A read
    /// behind a request in the log goes through the log too, so that it
    /// sees the write.
    pub(super) in_flight: VecDeque<InFlight>,
}

/// A request of a connection on its way through the log, or a reply made
/// without the log that waits behind one.
pub(super) struct InFlight {
    xid: Xid,
    reply: Option<Bytes>,
}

/// A handshake whose open or resume is on its way through the log: the
/// connection to attach when it applies, and who waits for the answer.
pub(super) struct PendingAttach {
    pub(super) connection: u64,
    pub(super) peer: SocketAddr,
    pub(super) outbound: Arc<Outbound>,
    pub(super) done: oneshot::Sender<Result<SessionGrant, ErrorReply>>,
}

/// Writes the queues an apply pushed events to, from the calling task,
/// after the coordinator lock is dropped: a lock passed on reaches the next
/// holder's socket without waking its connection's tasks.
pub(super) fn flush(queues: Vec<Arc<Outbound>>) {
    for queue in queues {
        queue.write_inline();
    }
}

impl Core {
    pub(super) fn new(
        coordinator: Coordinator,
        config: &super::Config,
        lease: Option<lease::LeaseRecorder>,
        tick_now: Arc<Notify>,
    ) -> Core {
        Core {
            coordinator,
            connections: HashMap::new(),
            next_connection: 0,
            next_ticket: 0,
            check_invariants: config.check_invariants,
            lease,
            to_flush: Vec::new(),
            closing: HashMap::new(),
            expiring: HashSet::new(),
            heard: BTreeMap::new(),
            pending: HashMap::new(),
            tick_now,
            read_only: None,
            frame_bytes_max: u64::try_from(config.frame_bytes_max).unwrap_or(u64::MAX),
            data_bytes_max: config.coordinator.data_bytes_max,
        }
    }

    /// The queues to write once the lock is dropped (see [`flush`]).
    pub(super) fn take_to_flush(&mut self) -> Vec<Arc<Outbound>> {
        std::mem::take(&mut self.to_flush)
    }

    /// Whether `connection` is the one attached to `session` now.
    pub(super) fn is_current(&self, session: SessionId, connection: u64) -> bool {
        self.connections
            .get(&session)
            .is_some_and(|attached| attached.connection == connection)
    }

    /// Whether `session`'s connection has requests on their way through
    /// the log.
    pub(super) fn has_in_flight(&self, session: SessionId) -> bool {
        self.connections
            .get(&session)
            .is_some_and(|attached| !attached.in_flight.is_empty())
    }

    /// Notes a request of `session`'s connection sent to the log.
    pub(super) fn sent(&mut self, session: SessionId, xid: Xid) {
        if let Some(attached) = self.connections.get_mut(&session) {
            attached.in_flight.push_back(InFlight { xid, reply: None });
        }
    }

    /// Queues a reply made without the log behind the session's requests
    /// in the log, if it has any; false if it has none (then send it now).
    pub(super) fn answer_in_order(&mut self, session: SessionId, xid: Xid, reply: Bytes) -> bool {
        match self.connections.get_mut(&session) {
            Some(attached) if !attached.in_flight.is_empty() => {
                attached.in_flight.push_back(InFlight {
                    xid,
                    reply: Some(reply),
                });
                true
            }
            _ => false,
        }
    }

    /// A new connection id.
    pub(super) fn new_connection(&mut self) -> u64 {
        self.next_connection += 1;
        self.next_connection
    }

    /// Registers a handshake that waits for its command; returns the
    /// ticket the command must carry.
    pub(super) fn wait_for_attach(&mut self, pending: PendingAttach) -> u64 {
        self.next_ticket += 1;
        self.pending.insert(self.next_ticket, pending);
        self.next_ticket
    }

    /// Takes the handshake waiting on `ticket`, if it still waits.
    pub(super) fn take_pending(&mut self, ticket: u64) -> Option<PendingAttach> {
        if ticket == 0 {
            return None;
        }
        self.pending.remove(&ticket)
    }

    /// Forgets a handshake that gave up waiting.
    pub(super) fn forget_pending(&mut self, ticket: u64) {
        self.pending.remove(&ticket);
    }

    /// The sessions heard from since the last call, for a `Command::Heard`.
    pub(super) fn take_heard(&mut self) -> Vec<Heard> {
        std::mem::take(&mut self.heard)
            .into_iter()
            .map(|(session, ack)| Heard { session, ack })
            .collect()
    }

    /// Applies `command` at `at_ms` and delivers all it produced: events,
    /// the reply to the session's current connection, the connection of
    /// `attach` for an open or resume (and its answer), the end of a close
    /// or an expiry.
    pub(super) fn execute(&mut self, at_ms: u64, command: Command, attach: Option<PendingAttach>) {
        let close = matches!(
            &command,
            Command::Request {
                op: Op::CloseSession,
                ..
            }
        );
        let session = match &command {
            Command::Request { session, .. } => Some(*session),
            _ => None,
        };
        match (self.apply(command, at_ms), session) {
            (Outcome::Session(result), _) => {
                if let Some(pending) = attach {
                    if let Ok(grant) = &result {
                        self.attach(&pending, grant);
                    }
                    // The handshake may have given up (its task ended); the
                    // session then lives on unattached until it expires.
                    let _ = pending
                        .done
                        .send(result.map_err(|refusal| refusal.to_reply()));
                }
            }
            (Outcome::Reply(reply), Some(session)) => {
                self.deliver(session, reply.into_wire(), close)
            }
            _ => {}
        }
    }

    /// Answers a read or heartbeat from the current state, without a
    /// command (see `Coordinator::read`), and notes the session as heard.
    pub(super) fn read(
        &mut self,
        session: SessionId,
        attach: u64,
        xid: Xid,
        op: Op,
        now_ms: u64,
    ) -> Outcome {
        let ack = match &op {
            Op::Ping { ack } => *ack,
            _ => Xid(0),
        };
        let Output {
            outcome, events, ..
        } = self.coordinator.read(session, attach, xid, op);
        self.push_events(events);
        if matches!(&outcome, Outcome::Reply(reply) if reply.result.as_ref().map_err(Refusal::code) != Err(ErrorCode::SessionExpired))
        {
            let seen = self.heard.entry(session).or_insert(Xid(0));
            *seen = (*seen).max(ack);
            // The client's lease estimate moves on this reply; the file
            // must cover the deadline the coming `Heard` will give.
            if let Some(lease) = &mut self.lease {
                lease.cover(
                    self.coordinator.lease_horizon_if_heard(session, now_ms),
                    now_ms,
                );
            }
        }
        outcome
    }

    /// Writes the attached connection's welcome and registers it as the
    /// session's current one; a connection it replaces is told it moved.
    fn attach(&mut self, pending: &PendingAttach, grant: &SessionGrant) {
        pending
            .outbound
            .push(protocol::encode(&ServerMessage::Welcome(Welcome {
                protocol_version: protocol::PROTOCOL_VERSION,
                session_id: grant.session,
                secret: grant.secret.clone(),
                session_timeout_ms: grant.timeout_ms,
                zxid: grant.zxid,
                last_xid_applied: grant.last_xid_applied,
                frame_bytes_max: self.frame_bytes_max,
                data_bytes_max: self.data_bytes_max,
            })));
        let attached = Attached {
            connection: pending.connection,
            peer: pending.peer,
            outbound: pending.outbound.clone(),
            in_flight: VecDeque::new(),
        };
        if let Some(previous) = self.connections.insert(grant.session, attached) {
            previous.outbound.push_last(
                protocol::encode(&ServerMessage::Session(SessionEvent::Moved)),
                CloseReason::Moved,
            );
        }
        self.queue_flush(&pending.outbound);
    }

    /// Sends a request's reply to its session's current connection. A
    /// close's reply ends the connection, once the session is gone.
    fn deliver(&mut self, session: SessionId, reply: Reply, close: bool) {
        let Some(attached) = self.connections.get_mut(&session) else {
            return;
        };
        let waiting = attached
            .in_flight
            .iter()
            .position(|f| f.xid == reply.xid && f.reply.is_none());
        // Answered already, when the log stopped: the client was told it
        // may not have been applied, and must not get a second reply.
        if waiting.is_none() && self.read_only.is_some() {
            return;
        }
        let closed = close && reply.result.is_ok();
        let message = protocol::encode(&ServerMessage::Reply(reply));
        if !closed {
            let outbound = attached.outbound.clone();
            let mut queued = true;
            match waiting {
                None => queued = outbound.push(message),
                Some(at) => {
                    attached.in_flight[at].reply = Some(message);
                    while attached
                        .in_flight
                        .front()
                        .is_some_and(|f| f.reply.is_some())
                    {
                        if let Some(InFlight {
                            reply: Some(reply), ..
                        }) = attached.in_flight.pop_front()
                        {
                            queued &= outbound.push(reply);
                        }
                    }
                }
            }
            if queued {
                self.queue_flush(&outbound);
            }
            return;
        }
        let Some(attached) = self.connections.remove(&session) else {
            return;
        };
        info!(peer = %attached.peer, %session, "closing connection: its client closed the session");
        if self.coordinator.session_ending(session) {
            // Its nodes go in later ticks, started now; the reply waits
            // for the last.
            attached.outbound.hold();
            self.closing.insert(session, (attached.outbound, message));
            self.tick_now.notify_one();
        } else {
            attached.outbound.push_last(message, CloseReason::Done);
        }
    }

    /// Answers every request on its way through the log with `error`: the
    /// log stopped, and none of them will be applied by this process.
    pub(super) fn fail_in_flight(&mut self, error: &ErrorReply) {
        let zxid = self.coordinator.zxid();
        let mut queues = Vec::new();
        for attached in self.connections.values_mut() {
            for InFlight { xid, reply } in attached.in_flight.drain(..) {
                let reply = reply.unwrap_or_else(|| {
                    protocol::encode(&ServerMessage::Reply(Reply {
                        xid,
                        zxid,
                        result: Err(error.clone()),
                    }))
                });
                attached.outbound.push(reply);
            }
            queues.push(attached.outbound.clone());
        }
        self.to_flush.extend(queues);
        // Handshakes whose open or resume will not be applied now.
        for (_, pending) in self.pending.drain() {
            let _ = pending.done.send(Err(error.clone()));
        }
    }

    fn queue_flush(&mut self, outbound: &Arc<Outbound>) {
        if !self
            .to_flush
            .last()
            .is_some_and(|last| Arc::ptr_eq(last, outbound))
        {
            self.to_flush.push(outbound.clone());
        }
    }

    fn push_events(&mut self, events: Vec<(SessionId, latchkey_client::protocol::WatchEvent)>) {
        for (session, event) in events {
            if let Some(attached) = self.connections.get(&session) {
                let outbound = attached.outbound.clone();
                // A full queue closes that connection; the event is then
                // recovered by the client's set_watches when it resumes.
                if outbound.push(protocol::encode(&ServerMessage::Watch(event))) {
                    self.queue_flush(&outbound);
                }
            }
        }
    }

    /// Applies a command, checks invariants in debug builds, and queues the
    /// events it produced and the end of any session it ended.
    fn apply(&mut self, command: Command, now_ms: u64) -> Outcome {
        let paused = self.coordinator.grants_paused_until_ms().is_some();
        let Output {
            outcome,
            events,
            ended,
            gone,
            forced,
        } = self.coordinator.apply(command, now_ms);
        forced.iter().for_each(log_forced);
        // Before anything is queued: no client may learn of a grant, or of
        // a heartbeat that extends a holder's lease, that the file does not
        // yet cover.
        if let Some(lease) = &mut self.lease {
            lease.cover(self.coordinator.lease_horizon_ms(), now_ms);
        }
        if paused && self.coordinator.grants_paused_until_ms().is_none() {
            info!("startup grace over: granting locks");
        }
        if self.check_invariants {
            if let Err(broken) = self.coordinator.check_invariants() {
                // A panic would unwind this task only and leave the others
                // serving a broken state; a coordinator must stop instead.
                tracing::error!("coordinator invariant broken: {broken}; aborting");
                eprintln!("latchkey: coordinator invariant broken: {broken}; aborting");
                std::process::abort();
            }
        }
        self.push_events(events);
        for (session, end) in ended {
            // A closed session's connection holds the reply to
            // close_session until the session is gone (see `closing`).
            if end == SessionEnd::Expired {
                info!(%session, "session expired");
                self.expiring.insert(session);
            }
        }
        for session in gone {
            if let Some((outbound, reply)) = self.closing.remove(&session) {
                outbound.fill(reply);
                // Closed already by its task: this wakes it to write.
                outbound.close(CloseReason::Done);
            }
            if self.expiring.remove(&session) {
                if let Some(attached) = self.connections.remove(&session) {
                    attached.outbound.push_last(
                        protocol::encode(&ServerMessage::Session(SessionEvent::Expired)),
                        CloseReason::SessionExpired,
                    );
                }
            }
        }
        outcome
    }

    /// Whether a tick now would find work the last one left over (see
    /// `Coordinator::next_deadline_ms`).
    pub(super) fn backlog(&self, now_ms: u64) -> bool {
        self.coordinator
            .next_deadline_ms()
            .is_some_and(|due| due <= now_ms)
    }
}

/// One line per forced delete, naming who asked: taking a lock or a hold
/// from its owner is an operator's act that must leave a trace.
fn log_forced(forced: &Forced) {
    let Forced { by, path, node } = forced;
    match node {
        ForcedNode::Holder {
            owner,
            freed_at_ms: Some(freed_at_ms),
        } => warn!(
            %by, %path, %owner, freed_at_ms,
            "forced delete: lock taken from its holder, who was told; the next waiter is granted when its lock-delay ends"
        ),
        ForcedNode::Holder {
            owner,
            freed_at_ms: None,
        } => {
            warn!(%by, %path, %owner, "forced delete: lock taken from its holder, who was told; it had no lock-delay")
        }
        ForcedNode::Waiter { owner } => {
            warn!(%by, %path, %owner, "forced delete: a waiting lock node of another session")
        }
        ForcedNode::Zombie => {
            warn!(%by, %path, "forced delete: a zombie ended before its lock-delay")
        }
        ForcedNode::Hold => {
            warn!(%by, %path, "forced delete: a timed hold ended without its token")
        }
    }
}

//! The session table: who is alive, until when, what each session owns, and
//! each session's reply cache for retried writes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use latchkey_client::protocol::{limits, ErrorReply, OpResult, Secret, SessionId, Xid, Zxid};

/// A cached reply to a write, keyed by its xid.
pub(crate) type CachedReply = (Xid, Result<OpResult, ErrorReply>);

#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) secret: Secret,
    pub(crate) timeout_ms: u64,
    /// Changed only through [`Sessions::touch`], which keeps the deadline
    /// index in step.
    last_heard_ms: u64,
    pub(crate) last_xid_applied: Xid,
    /// Replies to this session's recent writes, oldest first; at most
    /// `limits::INFLIGHT_MAX` entries outside the pinned range, because xids
    /// strictly increase and entries more than that far below the newest
    /// are dropped.
    pub(crate) replies: VecDeque<CachedReply>,
    /// At a resume, the replies up to the last applied xid are pinned: the
    /// client may send new xids (its watch re-registrations, renumbered
    /// requests) before retrying those writes, and the window must not push
    /// them out meanwhile. Only an ack releases them.
    pub(crate) pinned_through: Xid,
    /// The session's ephemeral nodes, czxid -> slab key; the order in which
    /// they are deleted when the session ends.
    pub(crate) ephemerals: BTreeMap<Zxid, usize>,
}

impl Session {
    /// The first instant at which a tick expires this session: it is never
    /// expired at or before exactly `last_heard_ms + timeout_ms`.
    pub(crate) fn deadline_ms(&self) -> u64 {
        self.last_heard_ms
            .saturating_add(self.timeout_ms)
            .saturating_add(1)
    }

    pub(crate) fn cached(&self, xid: Xid) -> Option<&Result<OpResult, ErrorReply>> {
        self.replies
            .iter()
            .find(|(cached, _)| *cached == xid)
            .map(|(_, result)| result)
    }

    /// Forgets replies the client has acknowledged receiving.
    pub(crate) fn forget_through(&mut self, ack: Xid) {
        self.replies.retain(|(xid, _)| *xid > ack);
        if ack >= self.pinned_through {
            self.pinned_through = Xid(0);
        }
    }

    /// Pins every cached reply (see `pinned_through`).
    pub(crate) fn pin_cached(&mut self) {
        self.pinned_through = self.last_xid_applied;
    }

    /// Caches the reply to write `xid`.
    pub(crate) fn remember(&mut self, xid: Xid, result: Result<OpResult, ErrorReply>) {
        self.replies.push_back((xid, result));
    }

    /// Drops replies too old to be retried by a client that keeps at most
    /// `limits::INFLIGHT_MAX` requests in flight: those with xid <= `xid -
    /// INFLIGHT_MAX`, where `xid` is the newest applied.
    pub(crate) fn forget_outside_window(&mut self, xid: Xid) {
        let window = u64::try_from(limits::INFLIGHT_MAX).unwrap_or(u64::MAX);
        let floor = xid.0.saturating_sub(window);
        let pinned = self.pinned_through;
        self.replies
            .retain(|(cached, _)| cached.0 > floor || *cached <= pinned);
    }
}

#[derive(Default)]
pub(crate) struct Sessions {
    table: BTreeMap<SessionId, Session>,
    /// `(deadline_ms, session)` for every live session.
    deadlines: BTreeSet<(u64, SessionId)>,
}

impl Sessions {
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    pub(crate) fn get(&self, id: SessionId) -> Option<&Session> {
        self.table.get(&id)
    }

    pub(crate) fn get_mut(&mut self, id: SessionId) -> Option<&mut Session> {
        self.table.get_mut(&id)
    }

    pub(crate) fn contains(&self, id: SessionId) -> bool {
        self.table.contains_key(&id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&SessionId, &Session)> {
        self.table.iter()
    }

    pub(crate) fn open(&mut self, id: SessionId, secret: Secret, timeout_ms: u64, now_ms: u64) {
        let session = Session {
            secret,
            timeout_ms,
            last_heard_ms: now_ms,
            last_xid_applied: Xid(0),
            replies: VecDeque::new(),
            pinned_through: Xid(0),
            ephemerals: BTreeMap::new(),
        };
        self.deadlines.insert((session.deadline_ms(), id));
        self.table.insert(id, session);
    }

    pub(crate) fn remove(&mut self, id: SessionId) -> Option<Session> {
        let session = self.table.remove(&id)?;
        self.deadlines.remove(&(session.deadline_ms(), id));
        Some(session)
    }

    /// Records that the session was heard from at `now_ms`.
    pub(crate) fn touch(&mut self, id: SessionId, now_ms: u64) {
        if let Some(session) = self.table.get_mut(&id) {
            self.deadlines.remove(&(session.deadline_ms(), id));
            session.last_heard_ms = now_ms;
            self.deadlines.insert((session.deadline_ms(), id));
        }
    }

    /// Sessions whose deadline has passed at `now_ms`, in SessionId order.
    pub(crate) fn expired(&self, now_ms: u64) -> Vec<SessionId> {
        let mut due: Vec<SessionId> = self
            .deadlines
            .iter()
            .take_while(|(deadline_ms, _)| *deadline_ms <= now_ms)
            .map(|&(_, id)| id)
            .collect();
        due.sort_unstable();
        due
    }

    pub(crate) fn next_deadline_ms(&self) -> Option<u64> {
        self.deadlines.first().map(|&(deadline_ms, _)| deadline_ms)
    }

    /// Checks the deadline index against the table.
    pub(crate) fn check(&self, zxid: Zxid) -> Result<(), String> {
        if self.deadlines.len() != self.table.len() {
            return Err(format!(
                "{} session deadlines for {} sessions",
                self.deadlines.len(),
                self.table.len()
            ));
        }
        for (id, session) in &self.table {
            if !self.deadlines.contains(&(session.deadline_ms(), *id)) {
                return Err(format!("session {id} is missing from the deadline index"));
            }
            if id.0 > zxid.0 {
                return Err(format!("session {id} is above the latest zxid {zxid}"));
            }
            // A window of replies, plus at most a window pinned at a resume.
            if session.replies.len() > 2 * limits::INFLIGHT_MAX {
                return Err(format!(
                    "session {id} caches {} replies; the bound is {}",
                    session.replies.len(),
                    2 * limits::INFLIGHT_MAX
                ));
            }
        }
        Ok(())
    }
}

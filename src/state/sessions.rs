//! The session table: who is alive, until when, what each session owns, and
//! each session's reply cache for retried writes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::mem::size_of;

use latchkey_client::protocol::{
    limits, ErrorReply, MultiResult, OpResult, Secret, SessionId, WaitEdge, Xid, Zxid,
};

/// Most bytes (by `reply_bytes`) one session's reply cache holds, beyond its
/// newest reply. The count bound alone let a window of 128 big multi replies
/// (each up to ~1.2 MB: `MULTI_OPS_MAX` creates with `PATH_BYTES_MAX`
/// paths) take ~150 MB per session. 1 MiB still keeps a full window of
/// ordinary writes (~200 bytes each by `reply_bytes`) or of multis of up to
/// ~8 KB. With the newest always kept, a session's cache holds at most the
/// larger of this and its newest reply (~1.2 MB), so the worst case across
/// `sessions_max` sessions is still ~120 GB at the default of 100,000:
/// `sessions_max` is the knob for that product.
pub(crate) const REPLY_CACHE_BYTES_MAX: usize = 1024 * 1024;

/// A cached reply to a write, keyed by its xid, with its size estimate.
#[derive(Debug)]
pub(crate) struct CachedReply {
    pub(crate) xid: Xid,
    pub(crate) result: Result<OpResult, ErrorReply>,
    /// `reply_bytes(&result)`, kept so that dropping it needs no new walk.
    bytes: usize,
}

/// A cheap estimate of the memory a cached reply takes: a fixed cost per
/// reply and per multi step (each holding its `Stat` inline), plus the bytes
/// of the strings they own. Not a serialization: it walks the results once.
pub(crate) fn reply_bytes(result: &Result<OpResult, ErrorReply>) -> usize {
    let owned = match result {
        Ok(OpResult::Created { path, .. }) => path.len(),
        Ok(OpResult::Multi { results }) => results.iter().fold(0usize, |sum, step| {
            let path = match step {
                MultiResult::Created { path, .. } => path.len(),
                MultiResult::Checked | MultiResult::Stat { .. } | MultiResult::Deleted => 0,
            };
            sum.saturating_add(size_of::<MultiResult>())
                .saturating_add(path)
        }),
        // Reads are not cached; counted anyway so the estimate stays honest
        // if that changes.
        Ok(OpResult::Data { data, .. }) => data.0.len(),
        Ok(OpResult::Children { children, .. }) => children.iter().fold(0usize, |sum, name| {
            sum.saturating_add(size_of::<String>())
                .saturating_add(name.len())
        }),
        Ok(OpResult::Deleted | OpResult::Stat { .. } | OpResult::Exists { .. })
        | Ok(OpResult::Pong | OpResult::Done) => 0,
        Err(error) => error.cycle.iter().fold(error.message.len(), |sum, edge| {
            sum.saturating_add(size_of::<WaitEdge>())
                .saturating_add(edge.lock.len())
        }),
    };
    size_of::<CachedReply>().saturating_add(owned)
}

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
    /// are dropped; and at most `REPLY_CACHE_BYTES_MAX` bytes unless the
    /// newest alone is larger. Changed only through the methods below, which
    /// keep `replies_bytes` in step.
    replies: VecDeque<CachedReply>,
    /// The sum of the `bytes` of `replies`.
    replies_bytes: usize,
    /// At a resume, the replies up to the last applied xid are pinned: the
    /// client may send new xids (its watch re-registrations, renumbered
    /// requests) before retrying those writes, and the window must not push
    /// them out meanwhile. Only an ack releases them.
    pub(crate) pinned_through: Xid,
    /// The session's ephemeral nodes, czxid -> slab key; the order in which
    /// they are deleted when the session ends.
    pub(crate) ephemerals: BTreeMap<Zxid, usize>,
    /// The session's lock nodes not yet granted, czxid -> slab key: the
    /// waits the deadlock search follows, so that it costs in proportion to
    /// the waits rather than to the tree.
    pub(crate) waiting: BTreeMap<Zxid, usize>,
    /// The longest lock-delay of any lock node this session was granted, if
    /// it was granted one: how long after its deadline a holder may still
    /// be finishing. Never lowered while the session lives (conservative).
    pub(crate) held_delay_ms_max: Option<u64>,
    /// How many lock nodes the session owns, granted or waiting. A session
    /// that owns none is in no queue, so no wait can lead back to it: its
    /// first wait needs no deadlock search.
    pub(crate) lock_nodes: usize,
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
            .find(|cached| cached.xid == xid)
            .map(|cached| &cached.result)
    }

    /// The cached replies, oldest first.
    #[cfg(test)]
    pub(crate) fn replies(&self) -> impl Iterator<Item = &CachedReply> {
        self.replies.iter()
    }

    /// The bytes the reply cache holds, by `reply_bytes`.
    #[cfg(test)]
    pub(crate) fn replies_bytes(&self) -> usize {
        self.replies_bytes
    }

    /// Forgets replies the client has acknowledged receiving.
    pub(crate) fn forget_through(&mut self, ack: Xid) {
        self.retain_replies(|xid| xid > ack);
        if ack >= self.pinned_through {
            self.pinned_through = Xid(0);
        }
    }

    /// Pins every cached reply (see `pinned_through`).
    pub(crate) fn pin_cached(&mut self) {
        self.pinned_through = self.last_xid_applied;
    }

    /// Caches the reply to write `xid` (above every cached xid), then drops
    /// the oldest replies, pinned ones included, until the cache is within
    /// `REPLY_CACHE_BYTES_MAX`; the newest always stays. A retry of a
    /// dropped reply gets RetryUnknown, the documented outcome for a reply no
    /// longer kept: the client reads to learn whether the write took effect.
    pub(crate) fn remember(&mut self, xid: Xid, result: Result<OpResult, ErrorReply>) {
        let bytes = reply_bytes(&result);
        self.replies.push_back(CachedReply { xid, result, bytes });
        self.replies_bytes = self.replies_bytes.saturating_add(bytes);
        // Bounded: each pass removes an entry, and the last one stays.
        while self.replies_bytes > REPLY_CACHE_BYTES_MAX && self.replies.len() > 1 {
            if let Some(oldest) = self.replies.pop_front() {
                self.replies_bytes = self.replies_bytes.saturating_sub(oldest.bytes);
            }
        }
    }

    /// Keeps the replies whose xid passes `keep`, and the byte total in step.
    fn retain_replies(&mut self, keep: impl Fn(Xid) -> bool) {
        let mut bytes = self.replies_bytes;
        self.replies.retain(|cached| {
            let kept = keep(cached.xid);
            if !kept {
                bytes = bytes.saturating_sub(cached.bytes);
            }
            kept
        });
        self.replies_bytes = bytes;
    }

    /// Drops replies too old to be retried by a client that keeps at most
    /// `limits::INFLIGHT_MAX` requests in flight: those with xid <= `xid -
    /// INFLIGHT_MAX`, where `xid` is the newest applied.
    pub(crate) fn forget_outside_window(&mut self, xid: Xid) {
        let window = u64::try_from(limits::INFLIGHT_MAX).unwrap_or(u64::MAX);
        let floor = xid.0.saturating_sub(window);
        let pinned = self.pinned_through;
        self.retain_replies(|cached| cached.0 > floor || cached <= pinned);
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
            replies_bytes: 0,
            pinned_through: Xid(0),
            ephemerals: BTreeMap::new(),
            waiting: BTreeMap::new(),
            held_delay_ms_max: None,
            lock_nodes: 0,
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
            let mut bytes = 0usize;
            for cached in &session.replies {
                let estimate = reply_bytes(&cached.result);
                if cached.bytes != estimate {
                    return Err(format!(
                        "session {id}'s reply to xid {} is recorded as {} bytes but estimates \
                         at {estimate}",
                        cached.xid.0, cached.bytes
                    ));
                }
                bytes = bytes.saturating_add(cached.bytes);
            }
            if bytes != session.replies_bytes {
                return Err(format!(
                    "session {id}'s reply cache totals {} bytes but its replies hold {bytes}",
                    session.replies_bytes
                ));
            }
            if bytes > REPLY_CACHE_BYTES_MAX && session.replies.len() > 1 {
                return Err(format!(
                    "session {id} caches {} replies of {bytes} bytes; the bound is {} bytes \
                     unless only the newest is left",
                    session.replies.len(),
                    REPLY_CACHE_BYTES_MAX
                ));
            }
        }
        Ok(())
    }
}

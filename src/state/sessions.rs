//! The session table: who is alive, until when, what each session owns, and
//! each session's reply cache for retried writes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use latchkey_client::protocol::{
    limits, ErrorReply, MultiResult, OpResult, Secret, SessionId, Xid, Zxid,
};

use super::{count, Refusal, SessionEnd, Why};

/// Most bytes (by `reply_bytes`) one session's reply cache holds, beyond its
/// newest reply. The count bound alone let a window of 128 big multi replies
/// (each up to ~1.2 MB: `MULTI_OPS_MAX` creates with `PATH_BYTES_MAX`
/// paths) take ~150 MB per session. 1 MiB still keeps a full window of
/// ordinary writes (~200 bytes each by `reply_bytes`) or of multis of up to
/// ~8 KB. With the newest always kept, a session's cache holds at most the
/// larger of this and its newest reply (~1.2 MB); across `sessions_max`
/// sessions that would still be ~120 GB at the default of 100,000, which
/// `Config::reply_cache_bytes_max` bounds.
pub(crate) const REPLY_CACHE_BYTES_MAX: u64 = 1024 * 1024;

/// A cached reply to a write, keyed by its xid, with its size estimate.
#[derive(Debug)]
pub(crate) struct CachedReply {
    pub(crate) xid: Xid,
    pub(crate) result: Result<OpResult, Refusal>,
    /// `reply_bytes(&result)`, kept so that dropping it needs no new walk.
    bytes: u64,
}

/// What a cached reply costs against the cache bounds, in bytes: a fixed
/// function of the reply, written down here rather than read off the
/// types' sizes, so that every build (and so every replica of a replicated
/// log) drops the same replies. The constants are the sizes on x86_64 when
/// they were fixed, so that the bounds still mean about what they say.
pub(crate) mod cost {
    /// One cached reply, whatever it holds.
    pub(crate) const REPLY: u64 = 216;
    /// One step of a multi's results.
    pub(crate) const MULTI_STEP: u64 = 192;
    /// One name of a listing.
    pub(crate) const NAME: u64 = 24;
    /// One edge of a refused wait's cycle.
    pub(crate) const WAIT_EDGE: u64 = 40;
    /// A refusal, whatever its fields hold (beyond a cycle's edges): the
    /// message a client gets is written from them when it is sent, and
    /// its length must not decide which replies a replica keeps. 256 is
    /// more than most messages take.
    pub(crate) const ERROR_MESSAGE: u64 = 256;
}

/// A cheap estimate of the memory a cached reply takes (see [`cost`]): a
/// fixed cost per reply, per multi step and per error message, plus the
/// bytes of the paths and names they own. Not a serialization: it walks
/// the results once.
pub(crate) fn reply_bytes(result: &Result<OpResult, Refusal>) -> u64 {
    let owned = match result {
        Ok(OpResult::Created { path, .. }) => count(path.len()),
        Ok(OpResult::Multi { results }) => results.iter().fold(0u64, |sum, step| {
            let path = match step {
                MultiResult::Created { path, .. } => path.len(),
                MultiResult::Checked | MultiResult::Stat { .. } | MultiResult::Deleted => 0,
            };
            sum.saturating_add(cost::MULTI_STEP)
                .saturating_add(count(path))
        }),
        // Reads are not cached; counted anyway so the estimate stays honest
        // if that changes.
        Ok(OpResult::Data { data, .. }) => count(data.0.len()),
        Ok(OpResult::Children { children, .. }) => children.iter().fold(0u64, |sum, name| {
            sum.saturating_add(cost::NAME)
                .saturating_add(count(name.len()))
        }),
        Ok(OpResult::Deleted | OpResult::Stat { .. } | OpResult::Zombified { .. })
        | Ok(OpResult::Exists { .. })
        | Ok(OpResult::Pong | OpResult::Done) => 0,
        Err(refusal) => refusal
            .cycle()
            .iter()
            .fold(cost::ERROR_MESSAGE, |sum, edge| {
                sum.saturating_add(cost::WAIT_EDGE)
                    .saturating_add(count(edge.lock.len()))
            }),
    };
    cost::REPLY.saturating_add(owned)
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
    /// keep `replies_bytes` and `pinned_bytes` in step, each called through
    /// `Sessions::change_cache`, which keeps the total and its indexes in
    /// step.
    replies: VecDeque<CachedReply>,
    /// The sum of the `bytes` of `replies`.
    replies_bytes: u64,
    /// The part of `replies_bytes` held by pinned replies.
    pinned_bytes: u64,
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
    /// The session's granted lock nodes, czxid -> slab key (a zombie is no
    /// longer its session's): with `waiting`, every lock node it owns, which
    /// the deadlock search reads to find the sessions that wait for it, so
    /// that this costs in proportion to its locks, not to its ephemerals.
    pub(crate) held: BTreeMap<Zxid, usize>,
    /// Set once the session has ended (closed or expired) while its nodes
    /// are still being deleted, a bounded number per step (see
    /// `Coordinator::end_session`). An ending session has no deadline, no
    /// waits, no watches and no cached replies; it answers no request and
    /// cannot be resumed.
    pub(crate) ending: Option<SessionEnd>,
    /// The current attachment's number (see `SessionGrant::attach`).
    pub(crate) attach: u64,
}

impl Session {
    /// How many lock nodes the session owns, granted or waiting. A session
    /// that owns none is in no queue, so no wait can lead back to it: its
    /// first wait needs no deadlock search.
    pub(crate) fn lock_nodes(&self) -> usize {
        self.held.len().saturating_add(self.waiting.len())
    }

    /// The first instant at which a tick expires this session: it is never
    /// expired at or before exactly `last_heard_ms + timeout_ms`.
    pub(crate) fn deadline_ms(&self) -> u64 {
        self.last_heard_ms
            .saturating_add(self.timeout_ms)
            .saturating_add(1)
    }

    pub(crate) fn cached(&self, xid: Xid) -> Option<&Result<OpResult, Refusal>> {
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
    pub(crate) fn replies_bytes(&self) -> u64 {
        self.replies_bytes
    }

    fn is_pinned(&self, xid: Xid) -> bool {
        xid <= self.pinned_through
    }

    /// The bytes of the replies not pinned: the ones the total budget
    /// drops first.
    fn unpinned_bytes(&self) -> u64 {
        self.replies_bytes.saturating_sub(self.pinned_bytes)
    }

    /// Forgets replies the client has acknowledged receiving.
    fn forget_through(&mut self, ack: Xid) {
        // Replies are in xid order: the acknowledged ones come first.
        let acked = self.count_from(0, ack);
        self.drop_range(0..acked);
        if ack >= self.pinned_through {
            self.pinned_through = Xid(0);
            self.pinned_bytes = 0;
        }
    }

    /// Pins every cached reply (see `pinned_through`).
    fn pin_cached(&mut self) {
        self.pinned_through = self.last_xid_applied;
        let pinned = self.pinned_through;
        self.pinned_bytes = self
            .replies
            .iter()
            .filter(|cached| cached.xid <= pinned)
            .fold(0u64, |sum, cached| sum.saturating_add(cached.bytes));
    }

    /// Caches the reply to write `xid` (above every cached xid), then drops
    /// the oldest replies, pinned ones included, until the cache is within
    /// `REPLY_CACHE_BYTES_MAX`; the newest always stays.
    fn remember(&mut self, xid: Xid, result: Result<OpResult, Refusal>) {
        let bytes = reply_bytes(&result);
        self.replies.push_back(CachedReply { xid, result, bytes });
        self.replies_bytes = self.replies_bytes.saturating_add(bytes);
        // Bounded: each pass removes an entry, and the last one stays.
        while self.replies_bytes > REPLY_CACHE_BYTES_MAX && self.replies.len() > 1 {
            self.take(0);
        }
    }

    /// Removes the reply at `index`, keeping the byte totals in step.
    fn take(&mut self, index: usize) -> Option<CachedReply> {
        let cached = self.replies.remove(index)?;
        self.replies_bytes = self.replies_bytes.saturating_sub(cached.bytes);
        if self.is_pinned(cached.xid) {
            self.pinned_bytes = self.pinned_bytes.saturating_sub(cached.bytes);
        }
        Some(cached)
    }

    /// Drops the oldest reply not pinned if there is one, else the oldest.
    /// Pinned replies are the oldest ones (a pin covers every xid applied
    /// so far, and later replies have higher xids), so the first unpinned
    /// one follows them.
    fn drop_one(&mut self) {
        let pinned = self.pinned_through;
        let first_unpinned = self.replies.partition_point(|cached| cached.xid <= pinned);
        let index = if first_unpinned < self.replies.len() {
            first_unpinned
        } else {
            0
        };
        self.take(index);
    }

    /// Drops replies too old to be retried by a client that keeps at most
    /// `limits::INFLIGHT_MAX` requests in flight: those with xid <= `xid -
    /// INFLIGHT_MAX`, where `xid` is the newest applied.
    /// Pinned replies are kept.
    fn forget_outside_window(&mut self, xid: Xid) {
        let window = u64::try_from(limits::INFLIGHT_MAX).unwrap_or(u64::MAX);
        let floor = Xid(xid.0.saturating_sub(window));
        // Replies are in xid order: the pinned ones, then those at or
        // below the floor, then the window. Called on every request, so it
        // must cost what it drops, not what the cache holds.
        let pinned = self.pinned_through;
        let first_unpinned = if pinned == Xid(0) {
            0
        } else {
            self.replies.partition_point(|cached| cached.xid <= pinned)
        };
        let below = self.count_from(first_unpinned, floor);
        self.drop_range(first_unpinned..first_unpinned + below);
    }

    /// How many replies from `start` on have an xid at or below `xid`,
    /// counted from the front: it reads only those and the next one (a
    /// binary search would read cold entries of a cache that is touched
    /// once a request, which measurably cost more).
    fn count_from(&self, start: usize, xid: Xid) -> usize {
        self.replies
            .iter()
            .skip(start)
            .take_while(|cached| cached.xid <= xid)
            .count()
    }

    /// Removes the replies at `range`, keeping the byte totals in step.
    fn drop_range(&mut self, range: std::ops::Range<usize>) {
        let pinned = self.pinned_through;
        for cached in self.replies.drain(range) {
            self.replies_bytes = self.replies_bytes.saturating_sub(cached.bytes);
            if cached.xid <= pinned {
                self.pinned_bytes = self.pinned_bytes.saturating_sub(cached.bytes);
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct Sessions {
    table: BTreeMap<SessionId, Session>,
    /// `(deadline_ms, session)` for every live session that is not ending.
    deadlines: BTreeSet<(u64, SessionId)>,
    /// The sum of every session's `replies_bytes`, which
    /// `Config::reply_cache_bytes_max` bounds.
    replies_bytes: u64,
    /// `(bytes, session)` of the unpinned replies of each session that has
    /// some, so that the total budget drops from the largest cache first,
    /// found in one look-up and in an order every replica shares.
    unpinned: BTreeSet<(u64, SessionId)>,
    /// The same for pinned replies, dropped only when no unpinned one is
    /// left.
    pinned: BTreeSet<(u64, SessionId)>,
}

/// Moves `id` in a `(bytes, session)` index from `before` to `after` bytes;
/// sessions with none are left out.
fn reindex(index: &mut BTreeSet<(u64, SessionId)>, id: SessionId, before: u64, after: u64) {
    if before != after {
        if before > 0 {
            index.remove(&(before, id));
        }
        if after > 0 {
            index.insert((after, id));
        }
    }
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
            pinned_bytes: 0,
            pinned_through: Xid(0),
            ephemerals: BTreeMap::new(),
            waiting: BTreeMap::new(),
            held_delay_ms_max: None,
            held: BTreeMap::new(),
            ending: None,
            attach: 0,
        };
        self.deadlines.insert((session.deadline_ms(), id));
        self.table.insert(id, session);
    }

    pub(crate) fn remove(&mut self, id: SessionId) -> Option<Session> {
        self.change_cache(id, |s| s.drop_range(0..s.replies.len()));
        let session = self.table.remove(&id)?;
        self.deadlines.remove(&(session.deadline_ms(), id));
        Some(session)
    }

    /// Whether `id` is a session that has not ended: one that requests,
    /// resumes, events and expiry apply to.
    pub(crate) fn alive(&self, id: SessionId) -> bool {
        self.table.get(&id).is_some_and(|s| s.ending.is_none())
    }

    /// Marks `id` as ending for `why`: out of the deadline index, its reply
    /// cache dropped (no request of it is answered again), and no later
    /// change to either.
    pub(crate) fn end(&mut self, id: SessionId, why: SessionEnd) {
        self.change_cache(id, |s| s.drop_range(0..s.replies.len()));
        if let Some(session) = self.table.get_mut(&id) {
            if session.ending.is_none() {
                self.deadlines.remove(&(session.deadline_ms(), id));
                session.ending = Some(why);
            }
        }
    }

    /// The bytes all sessions' reply caches hold, by `reply_bytes`.
    pub(crate) fn replies_bytes(&self) -> u64 {
        self.replies_bytes
    }

    /// Applies `change` to the reply cache of `id` (if live) and keeps the
    /// total and the two indexes in step: the one way the caches change.
    fn change_cache(&mut self, id: SessionId, change: impl FnOnce(&mut Session)) {
        let Some(s) = self.table.get_mut(&id).filter(|s| s.ending.is_none()) else {
            return;
        };
        let (unpinned, pinned) = (s.unpinned_bytes(), s.pinned_bytes);
        change(s);
        let (unpinned_now, pinned_now) = (s.unpinned_bytes(), s.pinned_bytes);
        reindex(&mut self.unpinned, id, unpinned, unpinned_now);
        reindex(&mut self.pinned, id, pinned, pinned_now);
        self.replies_bytes = self
            .replies_bytes
            .saturating_sub(unpinned.saturating_add(pinned))
            .saturating_add(unpinned_now.saturating_add(pinned_now));
    }

    /// Caches the reply to write `xid` of session `id` (the newest it
    /// applied), drops its replies outside the window and past its own
    /// bound, then drops replies across all sessions until they hold at
    /// most `total_bytes_max` (see `drop_to`).
    ///
    /// A retry of any dropped reply gets RetryUnknown (see `ops.rs`): its
    /// xid is at or below the session's last applied one, so it is never
    /// applied again, and the client reads to learn whether it took effect.
    pub(crate) fn remember(
        &mut self,
        id: SessionId,
        xid: Xid,
        result: Result<OpResult, Refusal>,
        total_bytes_max: u64,
    ) {
        self.change_cache(id, |s| {
            s.remember(xid, result);
            s.forget_outside_window(xid);
        });
        self.drop_to(total_bytes_max);
    }

    /// Drops cached replies until all sessions hold at most
    /// `total_bytes_max`: each time the oldest unpinned reply of the session
    /// whose unpinned replies hold the most bytes (the largest SessionId
    /// among equals), and only when none is left unpinned, the oldest
    /// pinned reply of the session holding the most pinned bytes. Pinning
    /// moves bytes and never adds any, so while the budget stays the same
    /// the pinned ones fit in it and are not dropped here.
    pub(crate) fn drop_to(&mut self, total_bytes_max: u64) {
        // Bounded: each pass drops one reply (each has a non-zero size),
        // and stops when none is left.
        while self.replies_bytes > total_bytes_max {
            let Some(&(_, id)) = self.unpinned.last().or_else(|| self.pinned.last()) else {
                break;
            };
            self.change_cache(id, Session::drop_one);
        }
    }

    /// Forgets the replies of `id` that its client has acknowledged.
    pub(crate) fn forget_through(&mut self, id: SessionId, ack: Xid) {
        self.change_cache(id, |s| s.forget_through(ack));
    }

    /// Pins every reply `id` has cached (see `Session::pinned_through`).
    pub(crate) fn pin_cached(&mut self, id: SessionId) {
        self.change_cache(id, Session::pin_cached);
    }

    /// Drops the replies of `id` outside the window below `xid`, its newest
    /// applied (see `Session::forget_outside_window`).
    pub(crate) fn forget_outside_window(&mut self, id: SessionId, xid: Xid) {
        self.change_cache(id, |s| s.forget_outside_window(xid));
    }

    /// Records that the session was heard from at `now_ms`.
    pub(crate) fn touch(&mut self, id: SessionId, now_ms: u64) {
        if let Some(session) = self.table.get_mut(&id).filter(|s| s.ending.is_none()) {
            self.deadlines.remove(&(session.deadline_ms(), id));
            session.last_heard_ms = now_ms;
            self.deadlines.insert((session.deadline_ms(), id));
        }
    }

    /// Up to `max` sessions whose deadline has passed at `now_ms`, earliest
    /// deadline first (then by SessionId): found in `max` steps however
    /// many are due.
    pub(crate) fn expired(&self, now_ms: u64, max: usize) -> Vec<SessionId> {
        self.deadlines
            .iter()
            .take_while(|(deadline_ms, _)| *deadline_ms <= now_ms)
            .take(max)
            .map(|&(_, id)| id)
            .collect()
    }

    pub(crate) fn next_deadline_ms(&self) -> Option<u64> {
        self.deadlines.first().map(|&(deadline_ms, _)| deadline_ms)
    }

    /// Checks the deadline index against the table, each session's reply
    /// cache against its bounds and byte totals, and the caches' total
    /// against its indexes and `total_bytes_max`.
    pub(crate) fn check(&self, zxid: Zxid, total_bytes_max: u64) -> Result<(), String> {
        let mut total = 0u64;
        for (id, session) in &self.table {
            let pinned = session
                .replies
                .iter()
                .filter(|cached| session.is_pinned(cached.xid))
                .fold(0u64, |sum, cached| sum.saturating_add(cached.bytes));
            if pinned != session.pinned_bytes {
                return Err(format!(
                    "session {id}'s pinned replies hold {pinned} bytes but it records {}",
                    session.pinned_bytes
                ));
            }
            for (index, bytes, kind) in [
                (&self.unpinned, session.unpinned_bytes(), "unpinned"),
                (&self.pinned, session.pinned_bytes, "pinned"),
            ] {
                if (bytes > 0) != index.contains(&(bytes, *id)) {
                    return Err(format!(
                        "session {id} holds {bytes} {kind} reply bytes, which its index \
                         does not match"
                    ));
                }
            }
            total = total.saturating_add(session.replies_bytes);
        }
        let indexed = self.unpinned.len().saturating_add(self.pinned.len());
        let expected = self
            .table
            .values()
            .map(|s| usize::from(s.unpinned_bytes() > 0) + usize::from(s.pinned_bytes > 0))
            .sum::<usize>();
        if indexed != expected {
            return Err(format!(
                "the reply cache indexes list {indexed} entries for {expected}"
            ));
        }
        if total != self.replies_bytes {
            return Err(format!(
                "the reply caches hold {total} bytes but their running total is {}",
                self.replies_bytes
            ));
        }
        if total > total_bytes_max {
            return Err(format!(
                "the reply caches hold {total} bytes; the budget is {total_bytes_max}"
            ));
        }
        let live = self.table.values().filter(|s| s.ending.is_none()).count();
        if self.deadlines.len() != live {
            return Err(format!(
                "{} session deadlines for {live} sessions that have not ended",
                self.deadlines.len(),
            ));
        }
        for (id, session) in &self.table {
            if session.ending.is_none() && !self.deadlines.contains(&(session.deadline_ms(), *id)) {
                return Err(format!("session {id} is missing from the deadline index"));
            }
            if session.ending.is_some()
                && !(session.replies.is_empty() && session.waiting.is_empty())
            {
                return Err(format!(
                    "session {id} has ended but still has cached replies or waits"
                ));
            }
            if id.0 > zxid.0 {
                return Err(format!("session {id} is above the latest zxid {zxid}"));
            }
            // The window bounds the unpinned replies only: each resume pins
            // every reply then cached, so resumes without an ack between
            // them pin more than a window, and those are bounded by bytes
            // (below) like the rest.
            let unpinned = session
                .replies
                .iter()
                .filter(|cached| !session.is_pinned(cached.xid))
                .count();
            if unpinned > limits::INFLIGHT_MAX {
                return Err(format!(
                    "session {id} caches {unpinned} replies outside its pin; the bound is {}",
                    limits::INFLIGHT_MAX
                ));
            }
            let mut bytes = 0u64;
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

impl Sessions {
    /// The sessions as a snapshot holds them, in id order; their nodes
    /// named by czxid, each cached result encoded by `encode`.
    ///
    /// # Errors
    /// A cached reply that does not encode (none should).
    pub(crate) fn image_with(
        &self,
        encode: impl Fn(&Result<OpResult, Refusal>) -> serde_json::Result<Vec<u8>>,
    ) -> Result<Vec<SessionImage>, String> {
        self.table
            .iter()
            .map(|(&id, s)| {
                let replies = s
                    .replies
                    .iter()
                    .map(|cached| {
                        Ok(CachedImage {
                            xid: cached.xid,
                            result: encode(&cached.result).map_err(|e| {
                                format!("session {id}'s reply to xid {}: {e}", cached.xid.0)
                            })?,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                Ok(SessionImage {
                    id,
                    secret: s.secret.0.clone(),
                    timeout_ms: s.timeout_ms,
                    last_heard_ms: s.last_heard_ms,
                    last_xid_applied: s.last_xid_applied,
                    replies,
                    pinned_through: s.pinned_through,
                    ephemerals: s.ephemerals.keys().copied().collect(),
                    waiting: s.waiting.keys().copied().collect(),
                    held: s.held.keys().copied().collect(),
                    held_delay_ms_max: s.held_delay_ms_max,
                    ending: s.ending,
                    attach: s.attach,
                })
            })
            .collect()
    }

    /// Rebuilds the session table from its image, with its indexes;
    /// `keys` gives each node's key by czxid. `format` is the snapshot's:
    /// format 1 cached refusals as the replies their clients got.
    ///
    /// # Errors
    /// A session given twice, a node it names that is not in the tree, a
    /// cached reply that does not decode.
    pub(crate) fn from_image(
        image: Vec<SessionImage>,
        keys: &BTreeMap<Zxid, usize>,
        format: u8,
    ) -> Result<Sessions, String> {
        let mut sessions = Sessions::default();
        for image in image {
            let id = image.id;
            let to_keys = |czxids: Vec<Zxid>| {
                czxids
                    .into_iter()
                    .map(|czxid| match keys.get(&czxid) {
                        Some(&key) => Ok((czxid, key)),
                        None => Err(format!("session {id} names node {czxid}, which is missing")),
                    })
                    .collect::<Result<BTreeMap<_, _>, String>>()
            };
            let mut replies = VecDeque::with_capacity(image.replies.len());
            for cached in image.replies {
                let result = decode_result(&cached.result, format)
                    .map_err(|e| format!("session {id}'s reply to xid {}: {e}", cached.xid.0))?;
                let bytes = reply_bytes(&result);
                replies.push_back(CachedReply {
                    xid: cached.xid,
                    result,
                    bytes,
                });
            }
            let sum = |pinned: bool| {
                replies
                    .iter()
                    .filter(|c| (c.xid <= image.pinned_through) == pinned)
                    .fold(0u64, |sum, c| sum.saturating_add(c.bytes))
            };
            let (pinned_bytes, unpinned_bytes) = (sum(true), sum(false));
            let session = Session {
                secret: Secret(image.secret),
                timeout_ms: image.timeout_ms,
                last_heard_ms: image.last_heard_ms,
                last_xid_applied: image.last_xid_applied,
                replies,
                replies_bytes: pinned_bytes.saturating_add(unpinned_bytes),
                pinned_bytes,
                pinned_through: image.pinned_through,
                ephemerals: to_keys(image.ephemerals)?,
                waiting: to_keys(image.waiting)?,
                held_delay_ms_max: image.held_delay_ms_max,
                held: to_keys(image.held)?,
                ending: image.ending,
                attach: image.attach,
            };
            reindex(&mut sessions.unpinned, id, 0, unpinned_bytes);
            reindex(&mut sessions.pinned, id, 0, pinned_bytes);
            sessions.replies_bytes = sessions.replies_bytes.saturating_add(session.replies_bytes);
            if session.ending.is_none() {
                sessions.deadlines.insert((session.deadline_ms(), id));
            }
            if sessions.table.insert(id, session).is_some() {
                return Err(format!("session {id} is given twice"));
            }
        }
        Ok(sessions)
    }
}

fn decode_result(bytes: &[u8], format: u8) -> Result<Result<OpResult, Refusal>, String> {
    let undecoded = |e: serde_json::Error| format!("does not decode: {e}");
    if format > 1 {
        return serde_json::from_slice(bytes).map_err(undecoded);
    }
    let result: Result<OpResult, ErrorReply> = serde_json::from_slice(bytes).map_err(undecoded)?;
    Ok(result.map_err(|mut reply| Refusal {
        index: reply.index.take(),
        why: Why::Recorded(reply),
    }))
}

/// One session as a snapshot holds it: [`Session`] without what its
/// replies and the tree give (byte totals, slab keys).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct SessionImage {
    id: SessionId,
    secret: String,
    timeout_ms: u64,
    last_heard_ms: u64,
    last_xid_applied: Xid,
    replies: Vec<CachedImage>,
    pinned_through: Xid,
    ephemerals: Vec<Zxid>,
    waiting: Vec<Zxid>,
    held: Vec<Zxid>,
    held_delay_ms_max: Option<u64>,
    ending: Option<SessionEnd>,
    attach: u64,
}

/// A cached reply in a snapshot, in JSON: a result as the protocol
/// encodes it, with a [`Refusal`] (format 2) or, in format 1, the error
/// reply its client got. JSON, so that the snapshot format does not repeat
/// every reply type.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CachedImage {
    xid: Xid,
    result: Vec<u8>,
}

//! Lock queues: which lock nodes a queue grants, the grants a removal
//! passes on, and the search of the wait-for graph that refuses a wait
//! that would close a cycle.
//!
//! A parent's lock children form its queue, in czxid order; other children
//! are not part of it. A node is granted by the rule of its mode over the
//! nodes ahead of it, and stays granted: nodes only join at the back, so the
//! set ahead of a node only shrinks, and every rule holds on a subset of the
//! nodes it held on. A scan after each removal therefore grants exactly the
//! nodes that newly qualify.
//!
//! The wait-for graph has an edge from a session to each session it waits
//! for: a waiting exclusive node waits for the owners of every node ahead
//! of it, a waiting shared node for those of every exclusive node ahead. A
//! semaphore node waits until fewer than its permits are ahead (no single
//! edge): it is stuck for good if at least its permits of the nodes ahead
//! are stuck sessions', which never leave. Listed edge
//! by edge, one queue of N exclusive waiters has N^2/2 edges. Neither
//! search here lists them: the deadlock check reads each queue node at most
//! twice per half of its search and, searching from both ends, costs about
//! what the cheaper end costs (see `Search`); the invariant check follows
//! at most about two edges per node that reach the same sessions (see
//! `Coordinator::for_each_wait_target`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;

use latchkey_client::protocol::{
    self, Grant, LockMode, SessionId, WaitEdge, WatchEvent, WatchEventKind, Zxid,
};

use super::{count, Coordinator, Effects, Refusal, Why};

/// Above every czxid in any queue: the place of a node about to join.
const QUEUE_BACK: Zxid = Zxid(u64::MAX);

/// Whether a node of `mode` with `ahead` lock nodes ahead of it, of which at
/// least one is exclusive if `exclusive_ahead`, is granted.
pub(crate) fn qualifies(mode: LockMode, ahead: usize, exclusive_ahead: bool) -> bool {
    match mode {
        LockMode::Exclusive => ahead == 0,
        LockMode::Shared => !exclusive_ahead,
        // `permits` comes from a request: converted, never cast.
        LockMode::Semaphore { permits } => ahead < usize::try_from(permits).unwrap_or(usize::MAX),
    }
}

/// How far one half of a search has read a queue. Forward: the nodes ahead
/// of `all` were all read, the exclusive nodes ahead of `exclusive` too;
/// backward: the nodes behind `all`, and the exclusive ones behind
/// `exclusive`. `None`: none yet.
#[derive(Clone, Copy, Default)]
struct Scanned {
    all: Option<Zxid>,
    exclusive: Option<Zxid>,
}

/// The range from `from` (the front if `None`) up to, not including, `to`;
/// `None` if empty.
fn unread(from: Option<Zxid>, to: Zxid) -> Option<(Bound<Zxid>, Bound<Zxid>)> {
    match from {
        None => Some((Bound::Unbounded, Bound::Excluded(to))),
        Some(from) if from < to => Some((Bound::Included(from), Bound::Excluded(to))),
        Some(_) => None,
    }
}

/// The range after `from` up to, not including, `to` (the back if
/// `None`); `None` if empty.
fn unread_behind(from: Zxid, to: Option<Zxid>) -> Option<(Bound<Zxid>, Bound<Zxid>)> {
    match to {
        None => Some((Bound::Excluded(from), Bound::Unbounded)),
        Some(to) if from < to => Some((Bound::Excluded(from), Bound::Excluded(to))),
        Some(_) => None,
    }
}

/// The lower of two backward marks, `None` (nothing read) above all.
fn min_mark(a: Option<Zxid>, b: Option<Zxid>) -> Option<Zxid> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

impl Coordinator {
    /// Refuses a lock node of `mode` at `path` whose queue holds nodes of
    /// another kind: a semaphore queue takes only semaphore nodes of the
    /// same permits, a lock queue only exclusive and shared nodes. Each
    /// node is granted by its own mode's rule, so a semaphore node behind
    /// an exclusive holder, or one asking for more permits than the others,
    /// would be granted beside them. Queues are kept uniform from their
    /// first node on, so checking the first node is enough.
    pub(super) fn check_lock_mode(&self, path: &str, mode: LockMode) -> Result<(), Refusal> {
        let Some(parent) = protocol::parent_path(path) else {
            return Ok(());
        };
        let Some(parent_key) = self.tree.key(parent) else {
            return Ok(());
        };
        let Some((_, first)) = self.tree.lock_queue(parent_key, ..).next() else {
            return Ok(());
        };
        let Some(theirs) = self.tree.node(first).lock.as_deref().map(|l| l.mode) else {
            return Ok(());
        };
        let compatible = match (theirs, mode) {
            (LockMode::Semaphore { permits: a }, LockMode::Semaphore { permits: b }) => a == b,
            (LockMode::Semaphore { .. }, _) | (_, LockMode::Semaphore { .. }) => false,
            _ => true,
        };
        if compatible {
            return Ok(());
        }
        Err(Why::QueueKindMismatch {
            parent: parent.to_owned(),
            queued: theirs,
            asked: mode,
        }
        .into())
    }

    /// Refuses, with Deadlock, a lock node of `mode` that `session` would
    /// create at `path` if it would wait for a session that is `session`
    /// itself or reaches it through the other sessions' waits; a semaphore
    /// node if at least its permits of the nodes in the queue are
    /// `session`'s or those of sessions that reach it (see `Search`).
    /// Changes nothing. Nodes granted at once are never refused.
    ///
    /// Every exclusive and shared wait is checked when it starts, and the
    /// waits a node has only shrink as the nodes ahead of it leave or turn
    /// into zombies, so their graph is acyclic before this wait. A stuck
    /// cycle through a semaphore can still form later without a new wait
    /// (a permit passing to a waiter that others wait for); the search
    /// looks only for cycles through the caller, so such a cycle elsewhere
    /// does not mislead it.
    /// Cost: nothing at all for a session that owns no other lock node;
    /// else the bound written at `Search`, which does not grow with the
    /// waits of the sessions the new wait is for while nobody waits for
    /// the caller.
    pub(super) fn check_lock_wait(
        &self,
        session: SessionId,
        path: &str,
        mode: LockMode,
    ) -> Result<(), Refusal> {
        let Some(lock) = protocol::parent_path(path) else {
            return Ok(());
        };
        // A parent the same create makes has an empty queue.
        let Some(parent_key) = self.tree.key(lock) else {
            return Ok(());
        };
        if !self.would_wait(path, mode) {
            return Ok(());
        }
        // Every edge points at the owner of a lock node, so no wait leads
        // back to a session that owns none: a session's first wait, the
        // common case, costs no search.
        if self
            .sessions
            .get(session)
            .is_none_or(|s| s.lock_nodes() == 0)
        {
            return Ok(());
        }
        match self.find_cycle(session, lock, parent_key, mode) {
            None => Ok(()),
            Some(cycle) => Err(deadlock(path, cycle)),
        }
    }

    /// Whether a lock node of `mode` created at `path` now would wait: its
    /// queue's rule does not let it through at the back, or grants are
    /// paused. A parent that does not exist yet has an empty queue.
    pub(super) fn would_wait(&self, path: &str, mode: LockMode) -> bool {
        let parent_key = protocol::parent_path(path).and_then(|p| self.tree.key(p));
        let (ahead, exclusive_ahead) = parent_key.map_or((0, false), |key| {
            let exclusive = self.tree.exclusive_ahead_of(key, QUEUE_BACK).is_some();
            (self.tree.lock_queue_len(key), exclusive)
        });
        self.grants_paused_until_ms.is_some() || !qualifies(mode, ahead, exclusive_ahead)
    }

    /// Refuses, with LimitExceeded, the lock nodes `locks` (path and mode)
    /// if those that would wait would take `session` past
    /// `waits_per_session_max` waits. A lock node is created alone, never
    /// in a multi, so each is judged against the queue as it is.
    pub(super) fn check_waits_limit<'p>(
        &self,
        session: SessionId,
        locks: impl Iterator<Item = (&'p str, LockMode)>,
    ) -> Result<(), Refusal> {
        let waits = locks
            .filter(|&(path, mode)| self.would_wait(path, mode))
            .count();
        let max = self.config.waits_per_session_max;
        let now = self.sessions.get(session).map_or(0, |s| s.waiting.len());
        if waits == 0 || count(now.saturating_add(waits)) <= max {
            return Ok(());
        }
        Err(Why::WaitsFull {
            session,
            waits: count(now),
            adds: count(waits),
            max,
        }
        .into())
    }

    /// The queue of the lock node `key`: its parent's path and slab key,
    /// and the node's mode.
    fn queue_of(&self, key: usize) -> Option<(&str, usize, LockMode)> {
        let node = self.tree.node(key);
        let mode = node.lock.as_deref()?.mode;
        let parent = protocol::parent_path(&node.path)?;
        Some((parent, self.tree.key(parent)?, mode))
    }

    /// A shortest cycle that `session` would close by waiting at the back
    /// of the queue `lock` (under `parent_key`) with a node of `mode`,
    /// starting with its own edge; `None` if none would.
    fn find_cycle(
        &self,
        session: SessionId,
        lock: &str,
        parent_key: usize,
        mode: LockMode,
    ) -> Option<Vec<WaitEdge>> {
        let root = match mode {
            LockMode::Semaphore { .. } => Root::Semaphore { parent_key },
            mode => Root::Queue { parent_key, mode },
        };
        Search::new(self, session, lock, root).run()
    }

    /// Appends to `holders` the owners, not read before in this search (by
    /// `scanned`), of the nodes that a waiting node of `mode` at `czxid` in
    /// the queue under `parent_key` waits for, in queue order; repeats
    /// possible. Zombies have no owner and add no one; semaphore nodes wait
    /// for enough of several nodes to leave, which no single edge
    /// describes, so they add no one either. Returns how many
    /// nodes it read.
    fn read_ahead(
        &self,
        scanned: &mut BTreeMap<usize, Scanned>,
        parent_key: usize,
        mode: LockMode,
        czxid: Zxid,
        holders: &mut Vec<SessionId>,
    ) -> u64 {
        let mark = scanned.entry(parent_key).or_default();
        let range = match mode {
            LockMode::Semaphore { .. } => None,
            LockMode::Exclusive => unread(mark.all, czxid).inspect(|_| mark.all = Some(czxid)),
            LockMode::Shared => unread(mark.all.max(mark.exclusive), czxid)
                .inspect(|_| mark.exclusive = Some(czxid)),
        };
        range.map_or(0, |range| {
            self.read_range(parent_key, mode == LockMode::Exclusive, range, holders)
        })
    }

    /// Appends to `waiters` the owners, not read before in this search (by
    /// `scanned`), of the nodes that wait for the node of `mode` at `czxid`
    /// in the queue under `parent_key`: every node behind an exclusive one,
    /// the exclusive nodes behind a shared one (shared nodes wait only for
    /// exclusive ones), none behind a semaphore node (no single edge).
    /// Everything read waits: behind an exclusive node, or an exclusive
    /// node behind any, nothing is granted. Returns how many nodes it read.
    fn read_behind(
        &self,
        scanned: &mut BTreeMap<usize, Scanned>,
        parent_key: usize,
        mode: LockMode,
        czxid: Zxid,
        waiters: &mut Vec<SessionId>,
    ) -> u64 {
        let mark = scanned.entry(parent_key).or_default();
        let range = match mode {
            LockMode::Semaphore { .. } => None,
            LockMode::Exclusive => {
                unread_behind(czxid, mark.all).inspect(|_| mark.all = Some(czxid))
            }
            LockMode::Shared => unread_behind(czxid, min_mark(mark.all, mark.exclusive))
                .inspect(|_| mark.exclusive = Some(czxid)),
        };
        range.map_or(0, |range| {
            self.read_range(parent_key, mode == LockMode::Exclusive, range, waiters)
        })
    }

    /// Appends to `owners` the owner of each node in `range` of the queue
    /// under `parent_key`: every node if `every`, else the exclusive ones
    /// alone, through the queue's exclusive index. Returns how many nodes
    /// it read.
    fn read_range(
        &self,
        parent_key: usize,
        every: bool,
        range: (Bound<Zxid>, Bound<Zxid>),
        owners: &mut Vec<SessionId>,
    ) -> u64 {
        if every {
            self.read_owners(self.tree.lock_queue(parent_key, range), owners)
        } else {
            self.read_owners(self.tree.lock_queue_exclusive(parent_key, range), owners)
        }
    }

    /// Appends the owner of each of `nodes` to `owners` (zombies have
    /// none); returns how many nodes it read.
    fn read_owners(
        &self,
        nodes: impl Iterator<Item = (Zxid, usize)>,
        owners: &mut Vec<SessionId>,
    ) -> u64 {
        let mut read = 0u64;
        for (_, key) in nodes {
            read = read.saturating_add(1);
            if let Some(owner) = self.tree.node(key).owner {
                owners.push(owner);
            }
        }
        read
    }

    /// Calls `target` with the owner of each node that a waiting node of
    /// `mode` at `czxid` in the queue under `parent_key` points to in a
    /// graph with fewer edges than the wait-for graph but the same
    /// reachability, which the invariant check searches for cycles: for an
    /// exclusive node, the nearest exclusive node ahead of it (if any) and
    /// every node between the two; for a shared node, that nearest
    /// exclusive node alone; for a semaphore node, none.
    ///
    /// Why these reach every session the node waits for: the nodes it waits
    /// for that lie ahead of the nearest exclusive node `e` are also ahead
    /// of `e`, so `e` is not first and therefore waits (an exclusive node is
    /// granted only when first), for all of them. A waiting node's owner is
    /// a live session (only granted nodes become ownerless zombies), so the
    /// edge to `e`'s owner, then `e`'s own edges (by induction on the place
    /// in the queue), reach their owners. Over a queue, the ranges of its
    /// exclusive nodes do not overlap, so its waiting nodes together list
    /// at most about twice its length.
    fn for_each_wait_target(
        &self,
        parent_key: usize,
        mode: LockMode,
        czxid: Zxid,
        mut target: impl FnMut(SessionId),
    ) {
        let nearest = self.tree.exclusive_ahead_of(parent_key, czxid);
        let range = match (mode, nearest) {
            (LockMode::Semaphore { .. }, _) | (LockMode::Shared, None) => return,
            (LockMode::Shared, Some(e)) => (Bound::Included(e), Bound::Included(e)),
            (LockMode::Exclusive, Some(e)) => (Bound::Included(e), Bound::Excluded(czxid)),
            (LockMode::Exclusive, None) => (Bound::Unbounded, Bound::Excluded(czxid)),
        };
        for (_, key) in self.tree.lock_queue(parent_key, range) {
            if let Some(owner) = self.tree.node(key).owner {
                target(owner);
            }
        }
    }

    /// The sessions `waiter` points to by `for_each_wait_target`, each with
    /// the queue (the parent path) of its oldest wait that points there, in
    /// SessionId order.
    fn wait_edges(&self, waiter: SessionId) -> BTreeMap<SessionId, &str> {
        let mut edges = BTreeMap::new();
        let Some(s) = self.sessions.get(waiter) else {
            return edges;
        };
        for (&czxid, &key) in &s.waiting {
            let node = self.tree.node(key);
            let (Some(lock), Some(parent)) =
                (node.lock.as_deref(), protocol::parent_path(&node.path))
            else {
                continue;
            };
            let Some(parent_key) = self.tree.key(parent) else {
                continue;
            };
            self.for_each_wait_target(parent_key, lock.mode, czxid, |holder| {
                edges.entry(holder).or_insert(parent);
            });
        }
        edges
    }

    /// The nodes of the queue under `parent_key` that qualify and are not
    /// yet granted, in queue order. One pass over the front of that queue,
    /// up to the first node that cannot qualify: behind an exclusive node
    /// none can, nor behind as many nodes as a semaphore has permits (a
    /// queue is all of one semaphore, or none), so a release behind a
    /// holder reads the holders, not the waiters.
    fn ready_in_queue(&self, parent_key: usize) -> Vec<usize> {
        let mut ready = Vec::new();
        if self.grants_paused_until_ms.is_some() {
            return ready;
        }
        let mut ahead = 0usize;
        let mut exclusive_ahead = false;
        for (_, key) in self.tree.lock_queue(parent_key, ..) {
            let Some(lock) = self.tree.node(key).lock.as_deref() else {
                continue;
            };
            if !qualifies(lock.mode, ahead, exclusive_ahead) {
                break;
            }
            if lock.granted.is_none() {
                ready.push(key);
            }
            ahead = ahead.saturating_add(1);
            exclusive_ahead |= lock.mode == LockMode::Exclusive;
        }
        ready
    }

    /// Grants every node of the queue under `parent_key` that now qualifies,
    /// with `token` (the zxid of the write that let it through) at `now_ms`,
    /// and takes them off their owners' waits. Returns them in queue order.
    pub(super) fn grant_ready(
        &mut self,
        parent_key: usize,
        token: Zxid,
        now_ms: u64,
    ) -> Vec<usize> {
        let ready = self.ready_in_queue(parent_key);
        for &key in &ready {
            self.grant(key, token, now_ms);
        }
        ready
    }

    /// Grants, in every queue, the nodes that qualify and are not yet
    /// granted, and tells their owners; each queue that grants anything
    /// takes a zxid of its own, so that tokens stay unique across locks.
    /// Visits every node once: run when a grant pause ends, not per request.
    pub(super) fn grant_all_queues(&mut self, now_ms: u64, fx: &mut Effects) {
        let parents: BTreeSet<(Zxid, usize)> = self
            .tree
            .iter()
            .filter(|(_, node)| node.lock.is_some())
            .filter_map(|(_, node)| protocol::parent_path(&node.path))
            .filter_map(|parent| self.tree.key(parent))
            .map(|key| (self.tree.node(key).czxid, key))
            .collect();
        for (_, parent_key) in parents {
            if self.ready_in_queue(parent_key).is_empty() {
                continue;
            }
            let token = self.next_zxid();
            let granted = self.grant_ready(parent_key, token, now_ms);
            self.announce_grants(&granted, token, fx);
        }
    }

    /// Grants the lock node `key`, which has just joined the back of the
    /// queue under `parent_key`, if its rule lets it through and grants are
    /// not paused. Joining at the back lets no other node through, so this
    /// looks at the new node alone: no scan of the queue.
    pub(super) fn grant_joined(&mut self, parent_key: usize, key: usize, token: Zxid, now_ms: u64) {
        let node = self.tree.node(key);
        let Some(lock) = node.lock.as_deref() else {
            return;
        };
        let ahead = self.tree.lock_queue_len(parent_key).saturating_sub(1);
        let exclusive_ahead = self
            .tree
            .exclusive_ahead_of(parent_key, node.czxid)
            .is_some();
        if self.grants_paused_until_ms.is_none() && qualifies(lock.mode, ahead, exclusive_ahead) {
            self.grant(key, token, now_ms);
        }
    }

    /// Grants one lock node and takes it off its owner's waits.
    fn grant(&mut self, key: usize, token: Zxid, now_ms: u64) {
        self.tree.grant(
            key,
            Grant {
                token,
                at_ms: now_ms,
            },
        );
        let node = self.tree.node(key);
        let delay_ms = node.lock.as_deref().map_or(0, |l| l.delay_ms);
        let owner = node.owner;
        if let Some(s) = owner.and_then(|o| self.sessions.get_mut(o)) {
            s.waiting.remove(&node.czxid);
            s.held.insert(node.czxid, key);
            s.held_delay_ms_max = Some(s.held_delay_ms_max.unwrap_or(0).max(delay_ms));
        }
        if let Some(owner) = owner {
            self.cover_holder(owner);
        }
    }

    /// Tells each owner of `granted` (from `grant_ready`) that its node was
    /// granted, in that order: the lock watch every owner holds implicitly.
    pub(super) fn announce_grants(&self, granted: &[usize], token: Zxid, fx: &mut Effects) {
        for &key in granted {
            let node = self.tree.node(key);
            if let Some(owner) = node.owner {
                fx.events.push((
                    owner,
                    WatchEvent {
                        kind: WatchEventKind::LockGranted,
                        path: node.path.clone(),
                        zxid: token,
                    },
                ));
            }
        }
    }

    /// After a lock node at `path` was removed at `zxid`: tells `owner`
    /// (if given) through its implied lock watch, then grants what the
    /// removal let through.
    pub(super) fn lock_node_removed(
        &mut self,
        path: &str,
        owner: Option<SessionId>,
        zxid: Zxid,
        now_ms: u64,
        fx: &mut Effects,
    ) {
        if let Some(owner) = owner {
            fx.events.push((
                owner,
                WatchEvent {
                    kind: WatchEventKind::NodeDeleted,
                    path: path.to_owned(),
                    zxid,
                },
            ));
        }
        let parent_key = protocol::parent_path(path).and_then(|p| self.tree.key(p));
        if let Some(parent_key) = parent_key {
            let granted = self.grant_ready(parent_key, zxid, now_ms);
            self.announce_grants(&granted, zxid, fx);
        }
    }
}

impl Coordinator {
    /// Checks the lock invariants: lock nodes are ephemeral; in every queue
    /// a node is granted exactly when its rule lets it through (no grant is
    /// missed, none given early); a grant's token lies between the node's
    /// czxid and the latest zxid; a session's waits are exactly its lock
    /// nodes not yet granted, and its lock node count is right; the
    /// sessions' waits form no cycle.
    pub(super) fn check_locks(&self) -> Result<(), String> {
        let mut waits = 0usize;
        let mut owned: BTreeMap<SessionId, usize> = BTreeMap::new();
        for (parent_key, parent) in self.tree.iter() {
            let mut ahead = 0usize;
            let mut exclusive_ahead = false;
            let mut semaphore: Option<Option<LockMode>> = None;
            for (_, key) in self.tree.lock_queue(parent_key, ..) {
                let node = self.tree.node(key);
                let Some(lock) = node.lock.as_deref() else {
                    return Err(format!("{} is queued but is no lock node", node.path));
                };
                if node.kind != protocol::NodeKind::Ephemeral {
                    return Err(format!("lock node {} is {:?}", node.path, node.kind));
                }
                // A queue is all semaphore nodes of one permit count, or
                // none: `None` inside stands for exclusive and shared.
                let family = matches!(lock.mode, LockMode::Semaphore { .. }).then_some(lock.mode);
                if *semaphore.get_or_insert(family) != family {
                    return Err(format!(
                        "queue {} mixes {:?} with {:?}",
                        parent.path, semaphore, lock.mode
                    ));
                }
                if let Some(owner) = node.owner {
                    *owned.entry(owner).or_default() += 1;
                }
                let due = self.grants_paused_until_ms.is_none()
                    && qualifies(lock.mode, ahead, exclusive_ahead);
                if due != lock.granted.is_some() {
                    return Err(format!(
                        "lock node {} in {} has {ahead} ahead (exclusive among them: \
                         {exclusive_ahead}) and mode {:?}, but granted is {:?}",
                        node.path, parent.path, lock.mode, lock.granted
                    ));
                }
                if let Some(grant) = lock.granted {
                    if grant.token < node.czxid || grant.token > self.zxid {
                        return Err(format!(
                            "lock node {} (czxid {}) has token {} outside [czxid, {}]",
                            node.path, node.czxid, grant.token, self.zxid
                        ));
                    }
                    let listed = node
                        .owner
                        .and_then(|o| self.sessions.get(o))
                        .is_none_or(|s| s.held.get(&node.czxid) == Some(&key));
                    if !listed {
                        return Err(format!(
                            "granted lock node {} is not among its owner's held locks",
                            node.path
                        ));
                    }
                } else {
                    waits = waits.saturating_add(1);
                    let listed = node
                        .owner
                        .and_then(|o| self.sessions.get(o))
                        .is_some_and(|s| s.waiting.get(&node.czxid) == Some(&key));
                    if !listed {
                        return Err(format!(
                            "waiting lock node {} is not among its owner's waits",
                            node.path
                        ));
                    }
                }
                ahead = ahead.saturating_add(1);
                exclusive_ahead |= lock.mode == LockMode::Exclusive;
            }
        }
        for (id, s) in self.sessions.iter() {
            let count = owned.get(id).copied().unwrap_or(0);
            if s.lock_nodes() != count {
                return Err(format!(
                    "session {id} lists {} lock nodes but owns {count}",
                    s.lock_nodes()
                ));
            }
        }
        self.check_acyclic()?;
        let listed: usize = self.sessions.iter().map(|(_, s)| s.waiting.len()).sum();
        if listed != waits {
            return Err(format!(
                "sessions list {listed} waits but {waits} lock nodes wait"
            ));
        }
        Ok(())
    }
}

impl Coordinator {
    /// Checks that the sessions' waits form no cycle: one depth-first search
    /// over the edges of `wait_edges` (which reach what all waits reach, so
    /// they have a cycle exactly when all waits have one), each session
    /// expanded once: linear in those edges, so tests can run it after
    /// every step.
    fn check_acyclic(&self) -> Result<(), String> {
        // Absent: not reached yet; true: on the current path; false: done,
        // no cycle through it.
        let mut on_path: BTreeMap<SessionId, bool> = BTreeMap::new();
        for (&root, s) in self.sessions.iter() {
            if s.waiting.is_empty() || on_path.contains_key(&root) {
                continue;
            }
            on_path.insert(root, true);
            let mut path = vec![(root, self.wait_edges(root).into_iter())];
            // Bounded: each pass takes an edge or pops a session, each
            // session is pushed once, and each edge taken once.
            while let Some((at, edges)) = path.last_mut() {
                let at = *at;
                let Some((to, _)) = edges.next() else {
                    on_path.insert(at, false);
                    path.pop();
                    continue;
                };
                match on_path.get(&to) {
                    Some(false) => {}
                    Some(true) => {
                        let start = path.iter().position(|(s, _)| *s == to).unwrap_or(0);
                        let cycle: Vec<SessionId> = path[start..].iter().map(|(s, _)| *s).collect();
                        return Err(format!(
                            "the sessions' waits form a cycle: {cycle:?} back to {to}"
                        ));
                    }
                    None => {
                        on_path.insert(to, true);
                        path.push((to, self.wait_edges(to).into_iter()));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Where the forward half of a `Search` starts: the new node's wait at the
/// back of the queue under `parent_key`.
#[derive(Clone, Copy)]
enum Root {
    /// An exclusive or shared wait: for the owners of the nodes ahead
    /// that its mode waits for, each an edge.
    Queue { parent_key: usize, mode: LockMode },
    /// A semaphore wait: for any one permit to be freed, no single edge.
    /// The forward half cannot follow it; the backward half settles it.
    Semaphore { parent_key: usize },
}

/// A session one half of a `Search` reached: its distance from the caller
/// (forward: edges from the caller to it; backward: from it to the
/// caller), and the session it was reached from with the queue of that
/// edge.
#[derive(Clone, Copy)]
struct Reach<'a> {
    distance: u32,
    next: SessionId,
    via: &'a str,
}

/// One half of a `Search`: what it reached, what it has still to expand
/// (in order of distance), how far it read each queue, and what it cost.
#[derive(Default)]
struct Half<'a> {
    reached: BTreeMap<SessionId, Reach<'a>>,
    frontier: VecDeque<SessionId>,
    scanned: BTreeMap<usize, Scanned>,
    spent: u64,
}

impl Half<'_> {
    /// The distance of the next session to expand, if any is left.
    fn next_distance(&self) -> Option<u32> {
        let next = self.frontier.front()?;
        self.reached.get(next).map(|r| r.distance)
    }
}

/// What the backward half knows of a semaphore queue it met: the nodes
/// of it owned by stuck sessions (they never leave), and from where on its
/// nodes have been read as stuck. A node is granted when fewer than
/// `permits` nodes are ahead of it, so every node behind the `permits`-th
/// stuck one is stuck too; nodes ahead of it may still be granted.
struct Permits {
    permits: usize,
    stuck: BTreeSet<Zxid>,
    read_from: Option<Zxid>,
}

/// The search for a shortest cycle that a new wait of `session` in `lock`
/// would be certain to close, from both ends at once: forward from the
/// sessions the wait is for, along their waits, and backward from
/// `session`, through the waits that are stuck if it is. A session is stuck
/// if one of its waits is: an exclusive or shared wait when one session it
/// waits for is stuck; a semaphore wait when at least its permits of the
/// nodes ahead are stuck sessions' (a zombie is freed in time, so it never
/// counts). Both halves are
/// breadth-first, each session expanded at most once per half, in an order
/// fixed by the state alone, so the answer is the same on every replica.
/// A cycle of length L meets both halves' reach by the time their next
/// distances sum to L - 1, so the search stops there with a shortest one;
/// the forward half cannot follow a semaphore wait, so once it has met one,
/// only the backward half's end settles the answer.
///
/// A cycle through a semaphore is given as a path whose semaphore edge
/// goes to the owner of the node that made the wait stuck (the permits-th
/// stuck node ahead found); the owners of the others wait for the caller
/// too.
///
/// Expanding a session does not list its edges one by one: of the nodes a
/// wait is for, those ahead of a node this half already expanded in the
/// same queue were reached then, at no greater distance; so each queue
/// keeps how far this half has read it (`Scanned`), and each queue node is
/// read at most twice per half (once in full, once through the queue's
/// exclusive index). Backward, likewise, from the back of the queue, and a
/// semaphore queue's holders and waiters once each.
///
/// Cost, the bound: a half run to its end costs the waits (forward) or the
/// lock nodes (backward) of the sessions it reaches, plus at most two reads
/// per node of the queues those lie in. The search advances the half whose
/// spending after its next step (estimated by the session's waits or lock
/// nodes) is lower, and stops as soon as either half runs out (the forward
/// half: if it met no semaphore wait), so it spends at most about twice
/// what the cheaper half costs alone, plus one step. So a create behind a
/// session that waits in 20,000 queues, by a caller that nobody waits for,
/// costs a few reads: the backward half ends before the forward one has
/// expanded that session. Only a caller that many wait for, queued behind
/// sessions that wait for many, costs much; the per-session limit on waits
/// bounds each session's part of that.
struct Search<'a> {
    c: &'a Coordinator,
    session: SessionId,
    lock: &'a str,
    /// The forward half's start, until it is expanded (a semaphore root
    /// never is).
    root: Option<Root>,
    /// Whether the forward half skipped a semaphore wait: then it no longer
    /// sees every cycle, so neither its end nor the early stop is final.
    partial: bool,
    forward: Half<'a>,
    backward: Half<'a>,
    /// The semaphore queues the backward half met, by parent slab key.
    permits: BTreeMap<usize, Permits>,
    /// The shortest cycle met so far: its length, and a session on it that
    /// both halves reached.
    best: Option<(u32, SessionId)>,
}

impl<'a> Search<'a> {
    fn new(c: &'a Coordinator, session: SessionId, lock: &'a str, root: Root) -> Self {
        let mut backward = Half::default();
        backward.reached.insert(
            session,
            Reach {
                distance: 0,
                next: session,
                via: lock,
            },
        );
        backward.frontier.push_back(session);
        Search {
            c,
            session,
            lock,
            root: Some(root),
            partial: matches!(root, Root::Semaphore { .. }),
            forward: Half::default(),
            backward,
            permits: BTreeMap::new(),
            best: None,
        }
    }

    /// Runs the search to its end: a shortest cycle, starting with the
    /// caller's new edge, or `None`.
    fn run(mut self) -> Option<Vec<WaitEdge>> {
        // Bounded: each pass expands the root or one session of one half,
        // and a session enters each half's frontier at most once. The
        // backward half running out settles the answer either way.
        while let Some(b) = self.backward.next_distance() {
            let forward_next = match self.root {
                Some(Root::Queue { .. }) => Some(0),
                Some(Root::Semaphore { .. }) => None,
                None => self.forward.next_distance(),
            };
            // The forward half ran out having seen every wait it met.
            if forward_next.is_none() && self.root.is_none() && !self.partial {
                break;
            }
            let f = forward_next.unwrap_or(0);
            let settled =
                |(length, _): (u32, SessionId)| length <= f.saturating_add(b).saturating_add(1);
            // No shorter cycle can be left: past a skipped semaphore wait
            // only the backward half's end can say so, except for a
            // semaphore root, whose cycle the backward half alone finds
            // (at the distance of the node that made it stuck).
            if self.best.is_some_and(settled) && (!self.partial || self.root.is_some()) {
                break;
            }
            let forward_cost = self.forward.spent.saturating_add(self.forward_estimate());
            let backward_cost = self.backward.spent.saturating_add(self.backward_estimate());
            if forward_next.is_some() && forward_cost <= backward_cost {
                self.expand_forward();
            } else {
                self.expand_backward();
            }
        }
        #[cfg(test)]
        self.c.deadlock_steps.fetch_add(
            self.forward.spent.saturating_add(self.backward.spent),
            std::sync::atomic::Ordering::Relaxed,
        );
        let (_, meeting) = self.best?;
        Some(self.trace(meeting))
    }

    /// What the forward half's next step costs, at least: the root's
    /// queue, or the next session's waits.
    fn forward_estimate(&self) -> u64 {
        let count = match self.root {
            Some(Root::Queue { parent_key, .. }) => self.c.tree.lock_queue_len(parent_key),
            Some(Root::Semaphore { .. }) => 0,
            None => self
                .forward
                .frontier
                .front()
                .and_then(|&s| self.c.sessions.get(s))
                .map_or(0, |s| s.waiting.len()),
        };
        u64::try_from(count).unwrap_or(u64::MAX).saturating_add(1)
    }

    /// What the backward half's next step costs, at least: the next
    /// session's lock nodes.
    fn backward_estimate(&self) -> u64 {
        let count = self
            .backward
            .frontier
            .front()
            .and_then(|&s| self.c.sessions.get(s))
            .map_or(0, |s| s.lock_nodes());
        u64::try_from(count).unwrap_or(u64::MAX).saturating_add(1)
    }

    /// Expands the forward root, or else the next session of the forward
    /// half: every session it waits for is reached one edge further.
    fn expand_forward(&mut self) {
        let c = self.c;
        let mut found = Vec::new();
        self.forward.spent = self.forward.spent.saturating_add(1);
        if let Some(Root::Queue { parent_key, mode }) = self.root {
            self.root = None;
            let read = c.read_ahead(
                &mut self.forward.scanned,
                parent_key,
                mode,
                QUEUE_BACK,
                &mut found,
            );
            self.forward.spent = self.forward.spent.saturating_add(read);
            for holder in found {
                self.reach_forward(holder, 1, self.session, self.lock);
            }
            return;
        }
        let Some(waiter) = self.forward.frontier.pop_front() else {
            return;
        };
        let distance = self.forward.reached.get(&waiter).map_or(0, |r| r.distance);
        let Some(s) = c.sessions.get(waiter) else {
            return;
        };
        for (&czxid, &key) in &s.waiting {
            self.forward.spent = self.forward.spent.saturating_add(1);
            let Some((via, via_key, mode)) = c.queue_of(key) else {
                continue;
            };
            if matches!(mode, LockMode::Semaphore { .. }) {
                self.partial = true;
                continue;
            }
            let read = c.read_ahead(&mut self.forward.scanned, via_key, mode, czxid, &mut found);
            self.forward.spent = self.forward.spent.saturating_add(read);
            for holder in found.drain(..) {
                self.reach_forward(holder, distance.saturating_add(1), waiter, via);
            }
        }
    }

    /// Expands the next session of the backward half (stuck if the caller
    /// is): every session with a wait that this makes stuck is reached one
    /// edge further.
    fn expand_backward(&mut self) {
        let c = self.c;
        let mut found = Vec::new();
        self.backward.spent = self.backward.spent.saturating_add(1);
        let Some(holder) = self.backward.frontier.pop_front() else {
            return;
        };
        let distance = self.backward.reached.get(&holder).map_or(0, |r| r.distance);
        let further = distance.saturating_add(1);
        let Some(s) = c.sessions.get(holder) else {
            return;
        };
        for (&czxid, &key) in s.held.iter().chain(&s.waiting) {
            self.backward.spent = self.backward.spent.saturating_add(1);
            let Some((via, via_key, mode)) = c.queue_of(key) else {
                continue;
            };
            // While the root is not expanded, this is where the new wait's
            // edges to the sessions this half reaches are found: so that
            // when this half runs out first, no cycle is left unseen.
            match self.root {
                Some(Root::Queue {
                    parent_key,
                    mode: joining,
                }) if parent_key == via_key
                    && (joining == LockMode::Exclusive || mode == LockMode::Exclusive) =>
                {
                    self.reach_forward(holder, 1, self.session, self.lock);
                }
                _ => {}
            }
            if let LockMode::Semaphore { permits } = mode {
                if let Some(range) = self.permit_stuck(via_key, permits, czxid) {
                    if matches!(self.root, Some(Root::Semaphore { parent_key }) if parent_key == via_key)
                    {
                        self.reach_forward(holder, 1, self.session, self.lock);
                    }
                    let read = c.read_range(via_key, true, range, &mut found);
                    self.backward.spent = self.backward.spent.saturating_add(read);
                }
            } else {
                let read =
                    c.read_behind(&mut self.backward.scanned, via_key, mode, czxid, &mut found);
                self.backward.spent = self.backward.spent.saturating_add(read);
            }
            for waiter in found.drain(..) {
                self.reach_backward(waiter, further, holder, via);
            }
        }
    }

    /// Records that the node at `czxid` of the semaphore of `permits`
    /// under `parent_key` is a stuck session's. If this makes more of its
    /// nodes stuck (those behind the `permits`-th stuck node, the new wait
    /// at the back among them), returns the range of them not read before.
    fn permit_stuck(
        &mut self,
        parent_key: usize,
        permits: u32,
        czxid: Zxid,
    ) -> Option<(Bound<Zxid>, Bound<Zxid>)> {
        let queue = self.permits.entry(parent_key).or_insert_with(|| Permits {
            permits: usize::try_from(permits).unwrap_or(usize::MAX),
            stuck: BTreeSet::new(),
            read_from: None,
        });
        queue.stuck.insert(czxid);
        if queue.stuck.len() < queue.permits {
            return None;
        }
        // Up to `permits` steps: cheap for the few permits a pool has.
        let threshold = *queue.stuck.iter().nth(queue.permits.checked_sub(1)?)?;
        if queue.read_from.is_some_and(|from| from <= threshold) {
            return None;
        }
        let range = unread_behind(threshold, queue.read_from);
        queue.read_from = Some(threshold);
        range
    }

    /// `holder`, waited for by `from` in `via`, reached forward at
    /// `distance`, unless reached before. The caller is not expanded: a
    /// shortest cycle passes it once.
    fn reach_forward(&mut self, holder: SessionId, distance: u32, from: SessionId, via: &'a str) {
        if self.forward.reached.contains_key(&holder) {
            return;
        }
        let reach = Reach {
            distance,
            next: from,
            via,
        };
        self.forward.reached.insert(holder, reach);
        if let Some(back) = self.backward.reached.get(&holder) {
            self.met(distance.saturating_add(back.distance), holder);
        }
        if holder != self.session {
            self.forward.frontier.push_back(holder);
        }
    }

    /// `waiter`, stuck through a wait for `to` in `via`, reached backward
    /// at `distance`, unless reached before.
    fn reach_backward(&mut self, waiter: SessionId, distance: u32, to: SessionId, via: &'a str) {
        if self.backward.reached.contains_key(&waiter) {
            return;
        }
        let reach = Reach {
            distance,
            next: to,
            via,
        };
        self.backward.reached.insert(waiter, reach);
        if let Some(ahead) = self.forward.reached.get(&waiter) {
            self.met(distance.saturating_add(ahead.distance), waiter);
        }
        self.backward.frontier.push_back(waiter);
    }

    /// A cycle of `length` through `meeting`: kept if the shortest so far.
    fn met(&mut self, length: u32, meeting: SessionId) {
        if self.best.is_none_or(|(best, _)| length < best) {
            self.best = Some((length, meeting));
        }
    }

    /// The cycle through `meeting`: the forward half's path from the caller
    /// to it, then the backward half's path from it to the caller.
    fn trace(&self, meeting: SessionId) -> Vec<WaitEdge> {
        let mut cycle = Vec::new();
        let mut at = meeting;
        // Bounded: each step goes one edge closer to the caller, on a path
        // of distinct reached sessions.
        for _ in 0..=self.forward.reached.len() {
            let Some(r) = self.forward.reached.get(&at) else {
                break;
            };
            cycle.push(edge(r.next, r.via, at));
            if r.next == self.session {
                break;
            }
            at = r.next;
        }
        cycle.reverse();
        let mut at = meeting;
        for _ in 0..=self.backward.reached.len() {
            if at == self.session {
                break;
            }
            let Some(r) = self.backward.reached.get(&at) else {
                break;
            };
            cycle.push(edge(at, r.via, r.next));
            at = r.next;
        }
        cycle
    }
}

/// One wait: `session` waits in `lock` for `holder`.
fn edge(session: SessionId, lock: &str, holder: SessionId) -> WaitEdge {
    WaitEdge {
        session,
        lock: lock.to_owned(),
        holder,
    }
}

/// The Deadlock refusal of a lock node at `path`.
fn deadlock(path: &str, cycle: Vec<WaitEdge>) -> Refusal {
    let lock = protocol::parent_path(path).unwrap_or(path).to_owned();
    Why::Deadlock { lock, cycle }.into()
}

/// The deadlock check as it was before it followed fewer edges: each wait
/// lists every session it waits for. Quadratic in a long queue; kept to
/// check the one in use against.
#[cfg(test)]
impl Coordinator {
    /// The sessions a node of `mode` waits for, given the nodes ahead of it.
    fn blockers_reference<'n>(
        mode: LockMode,
        ahead: impl Iterator<Item = &'n super::tree::Node>,
    ) -> BTreeSet<SessionId> {
        match mode {
            LockMode::Semaphore { .. } => BTreeSet::new(),
            LockMode::Exclusive => ahead.filter_map(|n| n.owner).collect(),
            LockMode::Shared => ahead
                .filter(|n| {
                    n.lock
                        .as_deref()
                        .is_some_and(|l| l.mode == LockMode::Exclusive)
                })
                .filter_map(|n| n.owner)
                .collect(),
        }
    }

    /// The sessions a node of `mode` joining the queue of `lock` would wait
    /// for, by the full rule; empty if it would be granted at once.
    pub(super) fn joining_blockers_reference(
        &self,
        lock: &str,
        mode: LockMode,
    ) -> BTreeSet<SessionId> {
        let Some(parent_key) = self.tree.key(lock) else {
            return BTreeSet::new();
        };
        let queue: Vec<&super::tree::Node> = self
            .tree
            .lock_queue(parent_key, ..)
            .map(|(_, key)| self.tree.node(key))
            .collect();
        let exclusive_ahead = queue.iter().any(|n| {
            n.lock
                .as_deref()
                .is_some_and(|l| l.mode == LockMode::Exclusive)
        });
        if qualifies(mode, queue.len(), exclusive_ahead) {
            return BTreeSet::new();
        }
        Self::blockers_reference(mode, queue.into_iter())
    }

    /// `check_lock_wait` by the full edges.
    pub(super) fn check_lock_wait_reference(
        &self,
        session: SessionId,
        path: &str,
        mode: LockMode,
    ) -> Result<(), Refusal> {
        let Some(lock) = protocol::parent_path(path) else {
            return Ok(());
        };
        let Some(parent_key) = self.tree.key(lock) else {
            return Ok(());
        };
        let stuck = self.stuck_reference(session);
        let first = if let LockMode::Semaphore { permits } = mode {
            let queue = self.tree.lock_queue_len(parent_key);
            if qualifies(mode, queue, false) {
                return Ok(());
            }
            self.permits_stuck_reference(parent_key, QUEUE_BACK, permits, &stuck)
        } else {
            let blockers = self.joining_blockers_reference(lock, mode);
            blockers
                .into_iter()
                .filter(|h| stuck.contains_key(h))
                .min_by_key(|h| stuck[h].0)
        };
        let Some(first) = first else {
            return Ok(());
        };
        let mut cycle = vec![edge(session, lock, first)];
        let mut at = first;
        while at != session {
            let (_, next, via) = &stuck[&at];
            cycle.push(edge(at, via, *next));
            at = *next;
        }
        Err(deadlock(path, cycle))
    }

    /// Whether a semaphore node of `permits` at `czxid` under `parent_key`
    /// is stuck by `stuck`: at least `permits` nodes ahead of it are stuck
    /// sessions' (zombies are freed in time). If so, the owner of the node
    /// that made it so: the `permits`-th nearest to the caller.
    fn permits_stuck_reference(
        &self,
        parent_key: usize,
        czxid: Zxid,
        permits: u32,
        stuck: &BTreeMap<SessionId, (u32, SessionId, String)>,
    ) -> Option<SessionId> {
        let mut owners: Vec<(u32, SessionId)> = self
            .tree
            .lock_queue(parent_key, ..czxid)
            .filter_map(|(_, key)| self.tree.node(key).owner)
            .filter_map(|owner| stuck.get(&owner).map(|d| (d.0, owner)))
            .collect();
        owners.sort_by_key(|&(distance, _)| distance);
        let nth = usize::try_from(permits).ok()?.checked_sub(1)?;
        owners.get(nth).map(|&(_, owner)| owner)
    }

    /// Every session that is stuck if `session` is, found level by level
    /// over every wait of every session: -> its distance to `session`, and
    /// the next session and queue on the way. A wait is stuck if one
    /// session it waits for is (exclusive and shared), or if at least its
    /// permits of the nodes ahead are stuck sessions' (semaphore), the next
    /// session then being the owner of the last of those found.
    pub(super) fn stuck_reference(
        &self,
        session: SessionId,
    ) -> BTreeMap<SessionId, (u32, SessionId, String)> {
        let mut stuck = BTreeMap::from([(session, (0u32, session, String::new()))]);
        for level in 0u32.. {
            let mut next = Vec::new();
            for (&id, s) in self.sessions.iter() {
                if stuck.contains_key(&id) {
                    continue;
                }
                for (&czxid, &key) in &s.waiting {
                    let Some((via, via_key, mode)) = self.queue_of(key) else {
                        continue;
                    };
                    let at_level = |h: &SessionId| stuck.get(h).is_some_and(|d| d.0 == level);
                    let to = if let LockMode::Semaphore { permits } = mode {
                        self.permits_stuck_reference(via_key, czxid, permits, &stuck)
                    } else {
                        let ahead = self
                            .tree
                            .lock_queue(via_key, ..czxid)
                            .map(|(_, key)| self.tree.node(key));
                        Self::blockers_reference(mode, ahead)
                            .into_iter()
                            .find(at_level)
                    };
                    if let Some(to) = to {
                        next.push((id, (level + 1, to, via.to_owned())));
                        break;
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            stuck.extend(next);
        }
        stuck
    }

    /// `wait_edges` by the full rule.
    pub(super) fn wait_edges_reference(&self, waiter: SessionId) -> BTreeMap<SessionId, &str> {
        let mut edges = BTreeMap::new();
        let Some(s) = self.sessions.get(waiter) else {
            return edges;
        };
        for (&czxid, &key) in &s.waiting {
            let node = self.tree.node(key);
            let (Some(lock), Some(parent)) =
                (node.lock.as_deref(), protocol::parent_path(&node.path))
            else {
                continue;
            };
            let Some(parent_key) = self.tree.key(parent) else {
                continue;
            };
            let ahead = self
                .tree
                .lock_queue(parent_key, ..czxid)
                .map(|(_, key)| self.tree.node(key));
            for holder in Self::blockers_reference(lock.mode, ahead) {
                edges.entry(holder).or_insert(parent);
            }
        }
        edges
    }

    /// Whether `edge` is a wait by the full rule: its session has a waiting
    /// node in its queue that waits for its holder, or waits for a permit
    /// of a semaphore its holder holds one of.
    pub(super) fn is_wait_reference(&self, edge: &WaitEdge) -> bool {
        let Some(s) = self.sessions.get(edge.session) else {
            return false;
        };
        s.waiting.iter().any(|(&czxid, &key)| {
            let node = self.tree.node(key);
            let Some(lock) = node.lock.as_deref() else {
                return false;
            };
            if protocol::parent_path(&node.path) != Some(edge.lock.as_str()) {
                return false;
            }
            let Some(parent_key) = self.tree.key(&edge.lock) else {
                return false;
            };
            if let LockMode::Semaphore { .. } = lock.mode {
                return self
                    .tree
                    .lock_queue(parent_key, ..czxid)
                    .any(|(_, key)| self.tree.node(key).owner == Some(edge.holder));
            }
            let ahead = self
                .tree
                .lock_queue(parent_key, ..czxid)
                .map(|(_, key)| self.tree.node(key));
            Self::blockers_reference(lock.mode, ahead).contains(&edge.holder)
        })
    }

    /// Every session with waits -> the sessions it reaches through one or
    /// more edges: by the full edges if `reference`, else by the ones the
    /// deadlock check follows.
    pub(super) fn reach(&self, reference: bool) -> BTreeMap<SessionId, BTreeSet<SessionId>> {
        let edges = |s: SessionId| -> Vec<SessionId> {
            if reference {
                self.wait_edges_reference(s).into_keys().collect()
            } else {
                self.wait_edges(s).into_keys().collect()
            }
        };
        let mut reach = BTreeMap::new();
        for (&id, s) in self.sessions.iter() {
            if s.waiting.is_empty() {
                continue;
            }
            let mut seen = BTreeSet::new();
            let mut todo = edges(id);
            while let Some(next) = todo.pop() {
                if seen.insert(next) {
                    todo.extend(edges(next));
                }
            }
            reach.insert(id, seen);
        }
        reach
    }

    /// How many steps the deadlock searches have taken so far: sessions
    /// expanded, their waits or lock nodes looked at, queue nodes read.
    pub(super) fn deadlock_steps(&self) -> u64 {
        self.deadlock_steps
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

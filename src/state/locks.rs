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
//! of it, a waiting shared node for those of every exclusive node ahead, a
//! semaphore node for no one in particular. Listed edge by edge, one queue
//! of N exclusive waiters has N^2/2 edges. Neither search here lists them:
//! the deadlock check reads each queue node at most twice per search (see
//! `Coordinator::find_cycle`), and the invariant check follows at most
//! about two edges per node that reach the same sessions (see
//! `Coordinator::for_each_wait_target`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;

use latchkey_client::protocol::{
    self, ErrorCode, ErrorReply, Grant, LockMode, SessionId, WaitEdge, WatchEvent, WatchEventKind,
    Zxid,
};

use super::{Coordinator, Effects};

/// How many edges of a refused wait's cycle its message spells out; the
/// reply's `cycle` lists them all. A cycle through thousands of sessions
/// would otherwise make a message nobody reads.
const CYCLE_EDGES_IN_MESSAGE_MAX: usize = 8;

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

/// How far one search has read a queue: the nodes ahead of `all` were all
/// read, the exclusive nodes ahead of `exclusive` too (`None`: none yet).
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

impl Coordinator {
    /// Refuses a lock node of `mode` at `path` whose queue holds nodes of
    /// another kind: a semaphore queue takes only semaphore nodes of the
    /// same permits, a lock queue only exclusive and shared nodes. Each
    /// node is granted by its own mode's rule, so a semaphore node behind
    /// an exclusive holder, or one asking for more permits than the others,
    /// would be granted beside them. Queues are kept uniform from their
    /// first node on, so checking the first node is enough.
    pub(super) fn check_lock_mode(&self, path: &str, mode: LockMode) -> Result<(), ErrorReply> {
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
        let describe = |mode: LockMode| match mode {
            LockMode::Exclusive => "an exclusive lock".to_owned(),
            LockMode::Shared => "a shared lock".to_owned(),
            LockMode::Semaphore { permits } => format!("a semaphore of {permits} permits"),
        };
        Err(ErrorReply::new(
            ErrorCode::InvalidArgument,
            format!(
                "{parent} is queued as {} but this create asks for {} (every node of a queue \
                 must use the same kind, and a semaphore the same permits)",
                describe(theirs),
                describe(mode)
            ),
        ))
    }

    /// Refuses, with Deadlock, a lock node of `mode` that `session` would
    /// create at `path` if it would wait for a session that is `session`
    /// itself or reaches it through the other sessions' waits. Changes
    /// nothing. Nodes granted at once and semaphore waits are never refused.
    ///
    /// Every wait is checked when it starts, and the waits a node has only
    /// shrink as the nodes ahead of it leave or turn into zombies, so the
    /// graph is acyclic before this wait and a cycle must pass through it.
    /// Cost: at most two reads of each node of the queues the search
    /// reaches (linear in them, not quadratic), and none at all for a
    /// session that owns no other lock node.
    pub(super) fn check_lock_wait(
        &self,
        session: SessionId,
        path: &str,
        mode: LockMode,
    ) -> Result<(), ErrorReply> {
        let Some(lock) = protocol::parent_path(path) else {
            return Ok(());
        };
        // A parent the same create makes has an empty queue.
        let Some(parent_key) = self.tree.key(lock) else {
            return Ok(());
        };
        let ahead = self.tree.lock_queue_len(parent_key);
        let exclusive_ahead = self
            .tree
            .exclusive_ahead_of(parent_key, QUEUE_BACK)
            .is_some();
        if qualifies(mode, ahead, exclusive_ahead) {
            return Ok(());
        }
        // Every edge points at the owner of a lock node, so no wait leads
        // back to a session that owns none: a session's first wait, the
        // common case, costs no search.
        if self
            .sessions
            .get(session)
            .map_or(true, |s| s.lock_nodes == 0)
        {
            return Ok(());
        }
        match self.find_cycle(session, lock, parent_key, mode) {
            None => Ok(()),
            Some(cycle) => Err(deadlock(path, cycle)),
        }
    }

    /// A shortest cycle that `session`, waiting with a node of `mode` at
    /// the back of the queue `lock` (under `parent_key`), would close,
    /// starting with its own edge; `None` if none would.
    ///
    /// A breadth-first search over sessions, each expanded at most once
    /// (its waits in czxid order, each queue read in queue order), so the
    /// answer is the same on every replica. Expanding a wait does not list
    /// its edges one by one: an exclusive node's edges go to the owners of
    /// the nodes ahead of it, and of those, the ones ahead of a node this
    /// search has already expanded in the same queue were reached then, at
    /// no greater distance (the search goes in order of distance). So each
    /// queue keeps how far from its front it has been read (`Scanned`), and
    /// a wait reads only the nodes between that mark and itself; a shared
    /// node likewise reads only the exclusive nodes past both marks,
    /// through the queue's exclusive index. Each node is thus read at most
    /// twice per search, and the distances, hence the cycle's length, are
    /// those of the search over every edge.
    fn find_cycle(
        &self,
        session: SessionId,
        lock: &str,
        parent_key: usize,
        mode: LockMode,
    ) -> Option<Vec<WaitEdge>> {
        let mut scanned: BTreeMap<usize, Scanned> = BTreeMap::new();
        let mut holders = Vec::new();
        self.read_wait(&mut scanned, parent_key, mode, QUEUE_BACK, &mut holders);
        if holders.contains(&session) {
            return Some(vec![edge(session, lock, session)]);
        }
        // Each reached session -> the session and queue it was reached from.
        let mut reached: BTreeMap<SessionId, (SessionId, &str)> = BTreeMap::new();
        let mut frontier = VecDeque::new();
        for holder in holders.drain(..) {
            if let std::collections::btree_map::Entry::Vacant(e) = reached.entry(holder) {
                e.insert((session, lock));
                frontier.push_back(holder);
            }
        }
        // Bounded: a session enters the frontier at most once, and each of
        // its waits is read once.
        while let Some(waiter) = frontier.pop_front() {
            let Some(s) = self.sessions.get(waiter) else {
                continue;
            };
            for (&czxid, &key) in &s.waiting {
                let node = self.tree.node(key);
                let (Some(info), Some(via)) =
                    (node.lock.as_deref(), protocol::parent_path(&node.path))
                else {
                    continue;
                };
                let Some(via_key) = self.tree.key(via) else {
                    continue;
                };
                self.read_wait(&mut scanned, via_key, info.mode, czxid, &mut holders);
                for holder in holders.drain(..) {
                    if holder == session {
                        return Some(trace_cycle(&reached, session, waiter, via));
                    }
                    if let std::collections::btree_map::Entry::Vacant(e) = reached.entry(holder) {
                        e.insert((waiter, via));
                        frontier.push_back(holder);
                    }
                }
            }
        }
        None
    }

    /// Appends to `holders` the owners, not read before in this search (by
    /// `scanned`), of the nodes that a waiting node of `mode` at `czxid` in
    /// the queue under `parent_key` waits for, in queue order; repeats
    /// possible. Zombies have no owner and add no one; semaphore nodes wait
    /// for any one of several holders to leave (an OR-wait), which no
    /// single edge describes, so they add no one either.
    fn read_wait(
        &self,
        scanned: &mut BTreeMap<usize, Scanned>,
        parent_key: usize,
        mode: LockMode,
        czxid: Zxid,
        holders: &mut Vec<SessionId>,
    ) {
        let mark = scanned.entry(parent_key).or_default();
        let mut read = |key: usize| {
            #[cfg(test)]
            self.wait_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(owner) = self.tree.node(key).owner {
                holders.push(owner);
            }
        };
        match mode {
            LockMode::Semaphore { .. } => {}
            LockMode::Exclusive => {
                if let Some(range) = unread(mark.all, czxid) {
                    for (_, key) in self.tree.lock_queue(parent_key, range) {
                        read(key);
                    }
                    mark.all = Some(czxid);
                }
            }
            LockMode::Shared => {
                if let Some(range) = unread(mark.all.max(mark.exclusive), czxid) {
                    for (_, key) in self.tree.lock_queue_exclusive(parent_key, range) {
                        read(key);
                    }
                    mark.exclusive = Some(czxid);
                }
            }
        }
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
    /// yet granted, in queue order. One pass over that queue.
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
            if lock.granted.is_none() && qualifies(lock.mode, ahead, exclusive_ahead) {
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
            if s.lock_nodes != count {
                return Err(format!(
                    "session {id} counts {} lock nodes but owns {count}",
                    s.lock_nodes
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

/// One wait: `session` waits in `lock` for `holder`.
fn edge(session: SessionId, lock: &str, holder: SessionId) -> WaitEdge {
    WaitEdge {
        session,
        lock: lock.to_owned(),
        holder,
    }
}

/// The cycle a breadth-first search from `session` closed when `waiter`,
/// reached through `reached` (each session -> the session and queue it was
/// reached from), turned out to wait for `session` in `via`: the search
/// tree's path from `session` to `waiter`, then that last edge.
fn trace_cycle(
    reached: &BTreeMap<SessionId, (SessionId, &str)>,
    session: SessionId,
    waiter: SessionId,
    via: &str,
) -> Vec<WaitEdge> {
    let mut cycle = vec![edge(waiter, via, session)];
    let mut at = waiter;
    // Bounded: each step goes back one edge of the search tree, whose root
    // is `session`.
    for _ in 0..reached.len() {
        let Some(&(from, via)) = reached.get(&at) else {
            break;
        };
        cycle.push(edge(from, via, at));
        if from == session {
            break;
        }
        at = from;
    }
    cycle.reverse();
    cycle
}

/// The Deadlock refusal of a lock node at `path`: names the cycle, and the
/// two ways out.
fn deadlock(path: &str, cycle: Vec<WaitEdge>) -> ErrorReply {
    let lock = protocol::parent_path(path).unwrap_or(path);
    let mut message = format!("waiting on {lock} would deadlock: ");
    for (i, e) in cycle.iter().take(CYCLE_EDGES_IN_MESSAGE_MAX).enumerate() {
        if i == 0 {
            message.push_str(&format!(
                "session {} would wait for session {} (it holds or queues ahead in {})",
                e.session, e.holder, e.lock
            ));
        } else {
            message.push_str(&format!(
                ", which waits for session {} in {}",
                e.holder, e.lock
            ));
        }
    }
    if cycle.len() > CYCLE_EDGES_IN_MESSAGE_MAX {
        message.push_str(&format!(
            ", and so on: {} waits in all (see the reply's cycle)",
            cycle.len()
        ));
    }
    message.push_str(
        "; release one lock before taking the other, or take them together with a multi-lock",
    );
    ErrorReply {
        cycle,
        ..ErrorReply::new(ErrorCode::Deadlock, message)
    }
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
    ) -> Result<(), ErrorReply> {
        let Some(lock) = protocol::parent_path(path) else {
            return Ok(());
        };
        let holders = self.joining_blockers_reference(lock, mode);
        if holders.is_empty() {
            return Ok(());
        }
        match find_cycle_reference(session, lock, holders, |waiter| {
            self.wait_edges_reference(waiter)
        }) {
            None => Ok(()),
            Some(cycle) => Err(deadlock(path, cycle)),
        }
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
    /// node in its queue that waits for its holder.
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

    /// How many lock-queue nodes the wait-for edges have read so far.
    pub(super) fn wait_reads(&self) -> u64 {
        self.wait_reads.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A shortest cycle (in the graph `wait_edges` lists, all edges listed) that `session`,
/// waiting in `lock` for `holders`, would close, starting with its own edge;
/// `None` if none would. A breadth-first search over the sessions' edges in
/// SessionId order: each session is expanded at most once, so the cost is
/// that of the edges it reaches, and the answer is the same on every
/// replica.
#[cfg(test)]
fn find_cycle_reference<'a>(
    session: SessionId,
    lock: &'a str,
    holders: BTreeSet<SessionId>,
    wait_edges: impl Fn(SessionId) -> BTreeMap<SessionId, &'a str>,
) -> Option<Vec<WaitEdge>> {
    if holders.contains(&session) {
        return Some(vec![edge(session, lock, session)]);
    }
    // Each reached session -> the session and queue it was reached from.
    let mut reached: BTreeMap<SessionId, (SessionId, &str)> = BTreeMap::new();
    let mut frontier = VecDeque::new();
    for holder in holders {
        reached.insert(holder, (session, lock));
        frontier.push_back(holder);
    }
    // Bounded: a session enters the frontier at most once.
    while let Some(waiter) = frontier.pop_front() {
        for (holder, via) in wait_edges(waiter) {
            if holder == session {
                return Some(trace_cycle(&reached, session, waiter, via));
            }
            if let std::collections::btree_map::Entry::Vacant(e) = reached.entry(holder) {
                e.insert((waiter, via));
                frontier.push_back(holder);
            }
        }
    }
    None
}

//! Lock queues: which lock nodes a queue grants, and the grants a removal
//! passes on.
//!
//! A parent's lock children form its queue, in czxid order; other children
//! are not part of it. A node is granted by the rule of its mode over the
//! nodes ahead of it, and stays granted: nodes only join at the back, so the
//! set ahead of a node only shrinks, and every rule holds on a subset of the
//! nodes it held on. A scan after each removal therefore grants exactly the
//! nodes that newly qualify.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use latchkey_client::protocol::{
    self, ErrorCode, ErrorReply, Grant, LockMode, SessionId, WaitEdge, WatchEvent, WatchEventKind,
    Zxid,
};

use super::{Coordinator, Effects};

/// How many edges of a refused wait's cycle its message spells out; the
/// reply's `cycle` lists them all. A cycle through thousands of sessions
/// would otherwise make a message nobody reads.
const CYCLE_EDGES_IN_MESSAGE_MAX: usize = 8;

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

/// The sessions a waiting node of `mode` waits for, given the nodes ahead
/// of it: an exclusive node waits for every node ahead, a shared one for the
/// exclusive ones. A zombie has no owner and adds no one; a semaphore node
/// waits for any one of several holders to leave (an OR-wait), which no
/// single edge describes, so it adds no one either.
fn blockers<'n>(
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

impl Coordinator {
    /// Refuses, with Deadlock, a lock node of `mode` that `session` would
    /// create at `path` if it would wait for a session that is `session`
    /// itself or reaches it through the other sessions' waits. Changes
    /// nothing. Nodes granted at once and semaphore waits are never refused.
    ///
    /// Every wait is checked when it starts, and the waits a node has only
    /// shrink as the nodes ahead of it leave or turn into zombies, so the
    /// graph is acyclic before this wait and a cycle must pass through it.
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
            return Ok(());
        }
        let holders = blockers(mode, queue.into_iter());
        match self.find_cycle(session, lock, holders) {
            None => Ok(()),
            Some(cycle) => Err(deadlock(path, cycle)),
        }
    }

    /// The sessions `waiter` waits for, each with the queue (the parent
    /// path) of its oldest wait on it, in SessionId order.
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
            let ahead = self
                .tree
                .lock_queue(parent_key, ..czxid)
                .map(|(_, key)| self.tree.node(key));
            for holder in blockers(lock.mode, ahead) {
                edges.entry(holder).or_insert(parent);
            }
        }
        edges
    }

    /// A shortest cycle that `session`, waiting in `lock` for `holders`,
    /// would close, starting with its own edge; `None` if none would. A
    /// breadth-first search over the sessions' waits in SessionId order:
    /// each session is expanded at most once, so the cost is that of the
    /// waits it reaches, and the answer is the same on every replica.
    fn find_cycle(
        &self,
        session: SessionId,
        lock: &str,
        holders: BTreeSet<SessionId>,
    ) -> Option<Vec<WaitEdge>> {
        let edge = |session: SessionId, lock: &str, holder: SessionId| WaitEdge {
            session,
            lock: lock.to_owned(),
            holder,
        };
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
            for (holder, via) in self.wait_edges(waiter) {
                if holder == session {
                    let mut cycle = vec![edge(waiter, via, session)];
                    let mut at = waiter;
                    // Bounded: each step goes back one edge of the search
                    // tree, whose root is `session`.
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
                    return Some(cycle);
                }
                if let std::collections::btree_map::Entry::Vacant(e) = reached.entry(holder) {
                    e.insert((waiter, via));
                    frontier.push_back(holder);
                }
            }
        }
        None
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
    /// nodes not yet granted.
    pub(super) fn check_locks(&self) -> Result<(), String> {
        let mut waits = 0usize;
        for (parent_key, parent) in self.tree.iter() {
            let mut ahead = 0usize;
            let mut exclusive_ahead = false;
            for (_, key) in self.tree.lock_queue(parent_key, ..) {
                let node = self.tree.node(key);
                let Some(lock) = node.lock.as_deref() else {
                    return Err(format!("{} is queued but is no lock node", node.path));
                };
                if node.kind != protocol::NodeKind::Ephemeral {
                    return Err(format!("lock node {} is {:?}", node.path, node.kind));
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
        // No cycle: every waiting session, searched as if it were starting
        // its waits again, reaches no path back to itself.
        for (&id, s) in self.sessions.iter() {
            if s.waiting.is_empty() {
                continue;
            }
            let holders = self.wait_edges(id).into_keys().collect();
            if let Some(cycle) = self.find_cycle(id, "", holders) {
                return Err(format!("the sessions' waits form a cycle: {cycle:?}"));
            }
        }
        let listed: usize = self.sessions.iter().map(|(_, s)| s.waiting.len()).sum();
        if listed != waits {
            return Err(format!(
                "sessions list {listed} waits but {waits} lock nodes wait"
            ));
        }
        Ok(())
    }
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

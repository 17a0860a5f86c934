//! Lock queues: which lock nodes a queue grants, and the grants a removal
//! passes on.
//!
//! A parent's lock children form its queue, in czxid order; other children
//! are not part of it. A node is granted by the rule of its mode over the
//! nodes ahead of it, and stays granted: nodes only join at the back, so the
//! set ahead of a node only shrinks, and every rule holds on a subset of the
//! nodes it held on. A scan after each removal therefore grants exactly the
//! nodes that newly qualify.

use latchkey_client::protocol::{
    self, Grant, LockMode, SessionId, WatchEvent, WatchEventKind, Zxid,
};

use super::{Coordinator, Effects};

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

impl Coordinator {
    /// The nodes of the queue under `parent_key` that qualify and are not
    /// yet granted, in queue order. One pass over that queue.
    fn ready_in_queue(&self, parent_key: usize) -> Vec<usize> {
        let mut ready = Vec::new();
        let mut ahead = 0usize;
        let mut exclusive_ahead = false;
        for (_, key) in self.tree.lock_queue(parent_key) {
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
            if let Some(s) = node.owner.and_then(|o| self.sessions.get_mut(o)) {
                s.waiting.remove(&node.czxid);
            }
        }
        ready
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

    /// After a lock node at `path`, owned by `owner`, was removed at `zxid`
    /// by `by` (`None`: the server): tells a live owner other than the
    /// remover (its implied lock watch), unless a data watch already told it,
    /// then grants what the removal let through.
    pub(super) fn lock_node_removed(
        &mut self,
        path: &str,
        owner: Option<SessionId>,
        by: Option<SessionId>,
        zxid: Zxid,
        now_ms: u64,
        fx: &mut Effects,
    ) {
        if let Some(owner) = owner {
            let told = fx.events.iter().any(|(s, e)| {
                *s == owner
                    && e.kind == WatchEventKind::NodeDeleted
                    && e.zxid == zxid
                    && e.path == path
            });
            if by != Some(owner) && self.sessions.contains(owner) && !told {
                fx.events.push((
                    owner,
                    WatchEvent {
                        kind: WatchEventKind::NodeDeleted,
                        path: path.to_owned(),
                        zxid,
                    },
                ));
            }
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
            for (_, key) in self.tree.lock_queue(parent_key) {
                let node = self.tree.node(key);
                let Some(lock) = node.lock.as_deref() else {
                    return Err(format!("{} is queued but is no lock node", node.path));
                };
                if node.kind != protocol::NodeKind::Ephemeral {
                    return Err(format!("lock node {} is {:?}", node.path, node.kind));
                }
                let due = qualifies(lock.mode, ahead, exclusive_ahead);
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
        let listed: usize = self.sessions.iter().map(|(_, s)| s.waiting.len()).sum();
        if listed != waits {
            return Err(format!(
                "sessions list {listed} waits but {waits} lock nodes wait"
            ));
        }
        Ok(())
    }
}

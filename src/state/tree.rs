//! The node tree: a slab of nodes, a path index, the two indexes a tick
//! needs (TTL deadlines and empty containers) so that it never scans the
//! tree, and each parent's lock queue (with an index of its exclusive
//! nodes) so that a grant scans one queue and the deadlock check skips the
//! shared nodes between exclusive ones.
//!
//! The tree's mutators are infallible: requests are validated against a
//! draft (see `ops.rs`) before any of them runs, so a failed `expect` here is
//! a bug in that validation, never bad input.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeBounds;

use latchkey_client::protocol::{self, Grant, LockInfo, LockMode, NodeKind, SessionId, Stat, Zxid};
use slab::Slab;

use super::count;

/// One node. `data_length` and `num_children` are derived from `data` and
/// `children` so that they cannot disagree with them.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) path: String,
    pub(crate) data: Vec<u8>,
    pub(crate) kind: NodeKind,
    pub(crate) ttl_ms: Option<u64>,
    /// The owning session of an ephemeral node; `None` for an ephemeral
    /// only when it is a zombie (a lock node outliving its expired owner).
    pub(crate) owner: Option<SessionId>,
    /// Set for a lock node. Boxed: most nodes are not lock nodes, and the
    /// box keeps them 8 bytes larger instead of 56.
    pub(crate) lock: Option<Box<LockInfo>>,
    /// Child names, sorted by bytes (the order `children` replies use).
    pub(crate) children: BTreeSet<String>,
    /// The next sequence number for a sequential child; only ever grows.
    pub(crate) next_seq: u64,
    pub(crate) czxid: Zxid,
    pub(crate) mzxid: Zxid,
    pub(crate) pzxid: Zxid,
    pub(crate) ctime_ms: u64,
    pub(crate) mtime_ms: u64,
    pub(crate) version: u64,
    pub(crate) cversion: u64,
}

impl Node {
    pub(crate) fn stat(&self) -> Stat {
        Stat {
            czxid: self.czxid,
            mzxid: self.mzxid,
            pzxid: self.pzxid,
            ctime_ms: self.ctime_ms,
            mtime_ms: self.mtime_ms,
            version: self.version,
            cversion: self.cversion,
            ephemeral_owner: self.owner,
            data_length: u64::try_from(self.data.len()).unwrap_or(u64::MAX),
            num_children: u64::try_from(self.children.len()).unwrap_or(u64::MAX),
            kind: self.kind,
            ttl_ms: self.ttl_ms,
            lock: self.lock.as_deref().cloned(),
        }
    }

    /// When a TTL node becomes due for deletion (if it has no children then).
    pub(crate) fn ttl_deadline_ms(&self) -> Option<u64> {
        self.ttl_ms.map(|ttl| self.mtime_ms.saturating_add(ttl))
    }
}

/// A node to insert; its path, parent and limits were already checked.
pub(crate) struct NewNode {
    pub(crate) path: String,
    pub(crate) data: Vec<u8>,
    pub(crate) kind: NodeKind,
    pub(crate) ttl_ms: Option<u64>,
    pub(crate) owner: Option<SessionId>,
    /// For a lock node: its mode and delay, not yet granted.
    pub(crate) lock: Option<LockInfo>,
    /// A sequential create consumes its parent's counter.
    pub(crate) bump_parent_seq: bool,
}

pub(crate) struct Tree {
    nodes: Slab<Node>,
    /// Path -> slab key. Ordered rather than hashed: a hash map grows by
    /// rehashing every entry in one insert, which held the coordinator for
    /// 9 ms at 57,000 nodes and 17 ms at 90,000, and would for seconds
    /// near `nodes_max`; a B-tree grows a node at a time.
    index: BTreeMap<String, usize>,
    /// `(deadline_ms, czxid, key)` of TTL nodes. Holds every childless TTL
    /// node; may also hold TTL nodes with children (dropped when a tick meets
    /// them, re-added when their last child goes).
    ttl_deadlines: BTreeSet<(u64, Zxid, usize)>,
    /// `(czxid, key)` of containers that lost their last child.
    empty_containers: BTreeSet<(Zxid, usize)>,
    /// Parent key -> its lock queue. Only parents with lock children have
    /// an entry, so other nodes pay nothing; a parent's key cannot be reused
    /// while it has one, because a node with children is never removed.
    lock_queues: BTreeMap<usize, LockQueue>,
    /// `(freed_at_ms, czxid, key)` of zombies: granted lock nodes whose
    /// owner expired, kept holding through their lock-delay.
    zombies: BTreeSet<(u64, Zxid, usize)>,
    /// The sum of `node_bytes` over all nodes, kept by every mutator so that
    /// a write can be checked against `Config::tree_bytes_max` without a walk.
    bytes: u64,
}

/// One parent's lock children.
#[derive(Default)]
struct LockQueue {
    /// czxid -> key, in queue order.
    nodes: BTreeMap<Zxid, usize>,
    /// The czxids of the exclusive nodes among `nodes`, so that the nearest
    /// exclusive node ahead of a node is found without walking back over
    /// the shared ones between (the deadlock search asks for it at every
    /// wait it follows).
    exclusive: BTreeSet<Zxid>,
}

/// What a node counts against `Config::tree_bytes_max`: its path and its
/// data. The draft in `ops.rs` must count the same way.
pub(crate) fn node_bytes(path: &str, data_bytes: usize) -> u64 {
    count(path.len()).saturating_add(count(data_bytes))
}

impl Tree {
    /// A tree holding only the root, created at `zxid_start`.
    pub(crate) fn new(zxid_start: Zxid) -> Self {
        let mut nodes = Slab::new();
        let root = nodes.insert(Node {
            path: "/".to_owned(),
            data: Vec::new(),
            kind: NodeKind::Persistent,
            ttl_ms: None,
            owner: None,
            lock: None,
            children: BTreeSet::new(),
            next_seq: 0,
            czxid: zxid_start,
            mzxid: zxid_start,
            pzxid: zxid_start,
            ctime_ms: 0,
            mtime_ms: 0,
            version: 0,
            cversion: 0,
        });
        let mut index = BTreeMap::new();
        index.insert("/".to_owned(), root);
        Tree {
            nodes,
            index,
            ttl_deadlines: BTreeSet::new(),
            empty_containers: BTreeSet::new(),
            lock_queues: BTreeMap::new(),
            zombies: BTreeSet::new(),
            bytes: node_bytes("/", 0),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The bytes the tree holds, as `node_bytes` counts them.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn key(&self, path: &str) -> Option<usize> {
        self.index.get(path).copied()
    }

    pub(crate) fn get(&self, path: &str) -> Option<&Node> {
        self.key(path).and_then(|key| self.nodes.get(key))
    }

    /// The node at `key`, if that key is live.
    pub(crate) fn node_at(&self, key: usize) -> Option<&Node> {
        self.nodes.get(key)
    }

    /// The node at `key`; the key must come from this tree and be live.
    pub(crate) fn node(&self, key: usize) -> &Node {
        self.nodes
            .get(key)
            .expect("keys handed out by the tree stay valid until removed")
    }

    /// Inserts a node under its existing parent and returns its key.
    pub(crate) fn insert(&mut self, new: NewNode, zxid: Zxid, now_ms: u64) -> usize {
        let parent_key = {
            let parent = protocol::parent_path(&new.path).expect("the root is never inserted");
            self.key(parent)
                .expect("a create is planned only under an existing parent")
        };
        let name = protocol::node_name(&new.path).to_owned();
        let node = Node {
            path: new.path.clone(),
            data: new.data,
            kind: new.kind,
            ttl_ms: new.ttl_ms,
            owner: new.owner,
            lock: new.lock.map(Box::new),
            children: BTreeSet::new(),
            next_seq: 0,
            czxid: zxid,
            mzxid: zxid,
            pzxid: zxid,
            ctime_ms: now_ms,
            mtime_ms: now_ms,
            version: 0,
            cversion: 0,
        };
        let deadline = node.ttl_deadline_ms();
        let lock_mode = node.lock.as_deref().map(|l| l.mode);
        self.bytes = self
            .bytes
            .saturating_add(node_bytes(&node.path, node.data.len()));
        let key = self.nodes.insert(node);
        self.index.insert(new.path, key);
        if let Some(deadline_ms) = deadline {
            self.ttl_deadlines.insert((deadline_ms, zxid, key));
        }
        if let Some(mode) = lock_mode {
            let queue = self.lock_queues.entry(parent_key).or_default();
            queue.nodes.insert(zxid, key);
            if mode == LockMode::Exclusive {
                queue.exclusive.insert(zxid);
            }
        }
        let parent = &mut self.nodes[parent_key];
        parent.children.insert(name);
        parent.cversion = parent.cversion.saturating_add(1);
        parent.pzxid = zxid;
        if new.bump_parent_seq {
            parent.next_seq = parent.next_seq.saturating_add(1);
        }
        let parent_czxid = parent.czxid;
        self.empty_containers.remove(&(parent_czxid, parent_key));
        key
    }

    /// Removes a childless node, updates its parent, and returns it.
    pub(crate) fn remove(&mut self, key: usize, zxid: Zxid) -> Node {
        let node = self
            .nodes
            .try_remove(key)
            .expect("a delete is planned only for a live node");
        debug_assert!(node.children.is_empty(), "removed a node with children");
        self.bytes = self
            .bytes
            .saturating_sub(node_bytes(&node.path, node.data.len()));
        self.index.remove(&node.path);
        if let Some(deadline_ms) = node.ttl_deadline_ms() {
            self.ttl_deadlines.remove(&(deadline_ms, node.czxid, key));
        }
        self.empty_containers.remove(&(node.czxid, key));
        if let Some(freed_at_ms) = node.lock.as_ref().and_then(|l| l.freed_at_ms) {
            self.zombies.remove(&(freed_at_ms, node.czxid, key));
        }
        let parent_key = {
            let parent = protocol::parent_path(&node.path).expect("the root is never removed");
            self.key(parent).expect("a live node's parent is live")
        };
        if node.lock.is_some() {
            if let Some(queue) = self.lock_queues.get_mut(&parent_key) {
                queue.nodes.remove(&node.czxid);
                queue.exclusive.remove(&node.czxid);
                if queue.nodes.is_empty() {
                    self.lock_queues.remove(&parent_key);
                }
            }
        }
        let parent = &mut self.nodes[parent_key];
        parent.children.remove(protocol::node_name(&node.path));
        parent.cversion = parent.cversion.saturating_add(1);
        parent.pzxid = zxid;
        if parent.children.is_empty() {
            if parent.kind == NodeKind::Container {
                self.empty_containers.insert((parent.czxid, parent_key));
            }
            if let Some(deadline_ms) = parent.ttl_deadline_ms() {
                self.ttl_deadlines
                    .insert((deadline_ms, parent.czxid, parent_key));
            }
        }
        node
    }

    /// Replaces a node's data; renews its TTL.
    pub(crate) fn set_data(&mut self, key: usize, data: Vec<u8>, zxid: Zxid, now_ms: u64) {
        let old_bytes = self.node(key).data.len();
        self.bytes = self
            .bytes
            .saturating_sub(count(old_bytes))
            .saturating_add(count(data.len()));
        self.modify(key, zxid, now_ms, |node| node.data = data);
    }

    /// Renews a TTL node (a touch): its TTL becomes `ttl_ms` if given, and
    /// like a set it moves the version, mzxid and mtime, so the deadline
    /// moves to now plus the TTL.
    pub(crate) fn touch(&mut self, key: usize, ttl_ms: Option<u64>, zxid: Zxid, now_ms: u64) {
        self.modify(key, zxid, now_ms, |node| {
            if ttl_ms.is_some() {
                node.ttl_ms = ttl_ms;
            }
        });
    }

    /// Applies `change` to a node as one write (a set or a touch): one
    /// more version, mzxid and mtime move, and the TTL index follows the
    /// new deadline. `change` must not touch what the indexes key on
    /// besides the TTL, and must keep `bytes` in step itself.
    fn modify(&mut self, key: usize, zxid: Zxid, now_ms: u64, change: impl FnOnce(&mut Node)) {
        let node = self
            .nodes
            .get_mut(key)
            .expect("a set or touch is planned only for a live node");
        if let Some(deadline_ms) = node.ttl_deadline_ms() {
            self.ttl_deadlines.remove(&(deadline_ms, node.czxid, key));
        }
        change(node);
        node.version = node.version.saturating_add(1);
        node.mzxid = zxid;
        node.mtime_ms = now_ms;
        if let Some(deadline_ms) = node.ttl_deadline_ms() {
            self.ttl_deadlines.insert((deadline_ms, node.czxid, key));
        }
    }

    /// The nodes of the lock queue under `parent_key` whose czxids lie in
    /// `czxids` (`..` for all, `..czxid` for those ahead of a node), in
    /// queue order; none if it has no lock children.
    pub(crate) fn lock_queue<'a>(
        &'a self,
        parent_key: usize,
        czxids: impl RangeBounds<Zxid> + 'a,
    ) -> impl Iterator<Item = (Zxid, usize)> + 'a {
        self.lock_queues
            .get(&parent_key)
            .map(|queue| queue.nodes.range(czxids))
            .into_iter()
            .flatten()
            .map(|(&czxid, &key)| (czxid, key))
    }

    /// The exclusive nodes of the lock queue under `parent_key` whose
    /// czxids lie in `czxids`, in queue order, found through the exclusive
    /// index: the shared and semaphore nodes between cost nothing.
    pub(crate) fn lock_queue_exclusive<'a>(
        &'a self,
        parent_key: usize,
        czxids: impl RangeBounds<Zxid> + 'a,
    ) -> impl Iterator<Item = (Zxid, usize)> + 'a {
        let queue = self.lock_queues.get(&parent_key);
        queue
            .map(|queue| queue.exclusive.range(czxids))
            .into_iter()
            .flatten()
            .filter_map(move |czxid| {
                let key = queue.and_then(|queue| queue.nodes.get(czxid))?;
                Some((*czxid, *key))
            })
    }

    /// How many nodes the lock queue under `parent_key` holds.
    pub(crate) fn lock_queue_len(&self, parent_key: usize) -> usize {
        self.lock_queues
            .get(&parent_key)
            .map_or(0, |queue| queue.nodes.len())
    }

    /// The czxid of the exclusive node nearest ahead of `czxid` in the lock
    /// queue under `parent_key` (the last exclusive node of the queue for a
    /// `czxid` above all of them), if any. One index look-up.
    pub(crate) fn exclusive_ahead_of(&self, parent_key: usize, czxid: Zxid) -> Option<Zxid> {
        self.lock_queues
            .get(&parent_key)
            .and_then(|queue| queue.exclusive.range(..czxid).next_back())
            .copied()
    }

    /// Records a lock node's grant.
    pub(crate) fn grant(&mut self, key: usize, grant: Grant) {
        let lock = self
            .nodes
            .get_mut(key)
            .and_then(|n| n.lock.as_mut())
            .expect("only a live lock node is granted");
        lock.granted = Some(grant);
    }

    /// Turns a granted lock node whose owner expired into a zombie: no
    /// owner, still holding, due for deletion at `freed_at_ms`.
    pub(crate) fn zombify(&mut self, key: usize, freed_at_ms: u64) {
        let node = self
            .nodes
            .get_mut(key)
            .expect("only a live lock node becomes a zombie");
        let lock = node
            .lock
            .as_mut()
            .expect("only a lock node becomes a zombie");
        debug_assert!(lock.granted.is_some(), "a waiting node became a zombie");
        lock.freed_at_ms = Some(freed_at_ms);
        node.owner = None;
        self.zombies.insert((freed_at_ms, node.czxid, key));
    }

    /// How many zombies the tree holds.
    #[cfg(test)]
    pub(crate) fn zombie_count(&self) -> usize {
        self.zombies.len()
    }

    /// The earliest time a zombie is due.
    pub(crate) fn next_zombie_deadline_ms(&self) -> Option<u64> {
        self.zombies.first().map(|&(freed_at_ms, _, _)| freed_at_ms)
    }

    /// The next zombie due at `now_ms`, in (freed_at, czxid) order, taken
    /// off the index. The caller must remove it.
    pub(crate) fn pop_due_zombie(&mut self, now_ms: u64) -> Option<usize> {
        match self.zombies.first() {
            Some(&(freed_at_ms, _, key)) if freed_at_ms <= now_ms => {
                self.zombies.pop_first();
                Some(key)
            }
            _ => None,
        }
    }

    /// The earliest TTL deadline in the index.
    pub(crate) fn next_ttl_deadline_ms(&self) -> Option<u64> {
        self.ttl_deadlines
            .first()
            .map(|&(deadline_ms, _, _)| deadline_ms)
    }

    /// The next childless TTL node due at `now_ms`, in (deadline, czxid)
    /// order. The caller must remove it. Due nodes that still have children
    /// leave the index until their last child goes.
    pub(crate) fn pop_expired_ttl(&mut self, now_ms: u64) -> Option<usize> {
        // Bounded: every iteration takes one entry out of the index.
        while let Some(&(deadline_ms, _, key)) = self.ttl_deadlines.first() {
            if deadline_ms > now_ms {
                return None;
            }
            self.ttl_deadlines.pop_first();
            if self.nodes.get(key).is_some_and(|n| n.children.is_empty()) {
                return Some(key);
            }
        }
        None
    }

    /// Whether a container that lost its last child waits to be reaped.
    pub(crate) fn has_empty_container(&self) -> bool {
        !self.empty_containers.is_empty()
    }

    /// The next container that had children and has none, in czxid order.
    /// The caller must remove it.
    pub(crate) fn pop_empty_container(&mut self) -> Option<usize> {
        while let Some((_, key)) = self.empty_containers.pop_first() {
            let due = self.nodes.get(key).is_some_and(|n| {
                n.kind == NodeKind::Container && n.children.is_empty() && n.cversion > 0
            });
            if due {
                return Some(key);
            }
        }
        None
    }

    /// Moves a node's sequence counter, so tests can reach
    /// `limits::SEQUENCE_MAX` without creating ten billion nodes.
    #[cfg(test)]
    pub(crate) fn set_next_seq_for_test(&mut self, path: &str, next_seq: u64) {
        let key = self.key(path).expect("test names a live node");
        self.nodes[key].next_seq = next_seq;
    }

    /// Keys of all nodes in slab order (deterministic).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &Node)> {
        self.nodes.iter()
    }

    /// Checks the tree's own invariants against the latest zxid.
    pub(crate) fn check(&self, zxid: Zxid) -> Result<(), String> {
        if self.index.len() != self.nodes.len() {
            return Err(format!(
                "path index has {} entries but the tree has {} nodes",
                self.index.len(),
                self.nodes.len()
            ));
        }
        let mut child_links = 0usize;
        let mut bytes = 0u64;
        for (key, node) in self.nodes.iter() {
            bytes = bytes.saturating_add(node_bytes(&node.path, node.data.len()));
            if self.index.get(&node.path) != Some(&key) {
                return Err(format!(
                    "path index does not map {} to key {key}",
                    node.path
                ));
            }
            if node.czxid > zxid || node.mzxid > zxid || node.pzxid > zxid {
                return Err(format!(
                    "{} has czxid {}, mzxid {}, pzxid {} above the latest zxid {zxid}",
                    node.path, node.czxid, node.mzxid, node.pzxid
                ));
            }
            if node.kind == NodeKind::Ephemeral && !node.children.is_empty() {
                return Err(format!("ephemeral {} has children", node.path));
            }
            if node.kind != NodeKind::Ephemeral && node.owner.is_some() {
                return Err(format!(
                    "{} has kind {:?} but owner {:?}",
                    node.path, node.kind, node.owner
                ));
            }
            let freed_at_ms = node.lock.as_ref().and_then(|l| l.freed_at_ms);
            let zombie = node.lock.as_ref().is_some_and(|l| l.granted.is_some())
                && freed_at_ms.is_some_and(|at| self.zombies.contains(&(at, node.czxid, key)));
            if node.kind == NodeKind::Ephemeral && node.owner.is_none() && !zombie {
                return Err(format!(
                    "ephemeral {} has no owner but is not a granted lock node waiting out its \
                     lock-delay",
                    node.path
                ));
            }
            if freed_at_ms.is_some() && node.owner.is_some() {
                return Err(format!(
                    "lock node {} has a freed_at but an owner {:?}",
                    node.path, node.owner
                ));
            }
            for name in &node.children {
                let child = protocol::child_path(&node.path, name);
                if self.get(&child).is_none() {
                    return Err(format!(
                        "{} lists child {name} but {child} is not in the tree",
                        node.path
                    ));
                }
            }
            if node.kind == NodeKind::Container
                && node.children.is_empty()
                && node.cversion > 0
                && !self.empty_containers.contains(&(node.czxid, key))
            {
                return Err(format!(
                    "empty container {} is not queued for reaping",
                    node.path
                ));
            }
            child_links += node.children.len();
            match protocol::parent_path(&node.path) {
                None if key_is_root(&node.path) => {}
                None => return Err(format!("{} has no parent path", node.path)),
                Some(parent) => match self.get(parent) {
                    Some(p) if p.children.contains(protocol::node_name(&node.path)) => {}
                    _ => {
                        return Err(format!(
                            "{} is not listed by its parent {parent}",
                            node.path
                        ))
                    }
                },
            }
            if let Some(deadline_ms) = node.ttl_deadline_ms() {
                if node.children.is_empty()
                    && !self.ttl_deadlines.contains(&(deadline_ms, node.czxid, key))
                {
                    return Err(format!(
                        "childless TTL node {} is missing from the TTL index",
                        node.path
                    ));
                }
            }
        }
        if bytes != self.bytes {
            return Err(format!(
                "the tree's running byte total is {} but its nodes hold {bytes}",
                self.bytes
            ));
        }
        if child_links + 1 != self.nodes.len() {
            return Err(format!(
                "parents list {child_links} children in total but there are {} non-root nodes",
                self.nodes.len().saturating_sub(1)
            ));
        }
        for &(deadline_ms, czxid, key) in &self.ttl_deadlines {
            match self.nodes.get(key) {
                Some(n) if n.czxid == czxid && n.ttl_deadline_ms() == Some(deadline_ms) => {}
                _ => {
                    return Err(format!(
                        "TTL index entry ({deadline_ms}, {czxid}, {key}) is stale"
                    ))
                }
            }
        }
        let mut queued = 0usize;
        for (&parent_key, queue) in &self.lock_queues {
            let Some(parent) = self.nodes.get(parent_key) else {
                return Err(format!("lock queue under dead key {parent_key}"));
            };
            if queue.nodes.is_empty() {
                return Err(format!("empty lock queue kept for {}", parent.path));
            }
            let mut exclusive = 0usize;
            for (&czxid, &key) in &queue.nodes {
                queued += 1;
                let mode = self
                    .nodes
                    .get(key)
                    .and_then(|n| n.lock.as_deref())
                    .map(|l| l.mode);
                if (mode == Some(LockMode::Exclusive)) != queue.exclusive.contains(&czxid) {
                    return Err(format!(
                        "the exclusive index of {}'s lock queue disagrees with node ({czxid}, \
                         {key}) of mode {mode:?}",
                        parent.path
                    ));
                }
                if mode == Some(LockMode::Exclusive) {
                    exclusive += 1;
                }
                match self.nodes.get(key) {
                    Some(n)
                        if n.czxid == czxid
                            && n.lock.is_some()
                            && protocol::parent_path(&n.path) == Some(parent.path.as_str()) => {}
                    _ => {
                        return Err(format!(
                            "lock queue of {} lists ({czxid}, {key}), which is not one of its \
                             lock children",
                            parent.path
                        ))
                    }
                }
            }
            if exclusive != queue.exclusive.len() {
                return Err(format!(
                    "the exclusive index of {}'s lock queue lists {} czxids for {exclusive} \
                     exclusive nodes",
                    parent.path,
                    queue.exclusive.len()
                ));
            }
        }
        let lock_nodes = self.nodes.iter().filter(|(_, n)| n.lock.is_some()).count();
        if queued != lock_nodes {
            return Err(format!(
                "lock queues list {queued} nodes but the tree has {lock_nodes} lock nodes"
            ));
        }
        for &(freed_at_ms, czxid, key) in &self.zombies {
            match self.nodes.get(key) {
                Some(n)
                    if n.czxid == czxid
                        && n.owner.is_none()
                        && n.lock.as_ref().and_then(|l| l.freed_at_ms) == Some(freed_at_ms) => {}
                _ => {
                    return Err(format!(
                        "zombie entry ({freed_at_ms}, {czxid}, {key}) is stale"
                    ))
                }
            }
        }
        for &(czxid, key) in &self.empty_containers {
            match self.nodes.get(key) {
                Some(n) if n.czxid == czxid && n.kind == NodeKind::Container => {}
                _ => return Err(format!("empty-container entry ({czxid}, {key}) is stale")),
            }
        }
        Ok(())
    }
}

fn key_is_root(path: &str) -> bool {
    path == "/"
}

impl Tree {
    /// The tree as a snapshot holds it: every node in path order (so a
    /// parent comes before its children), with no slab key in it, so that
    /// two trees that hold the same nodes give the same image whatever
    /// order their keys were handed out in.
    /// Borrowed, so that the coordinator is held only as long as the
    /// encoding takes, with no copy of every node's data.
    pub(crate) fn image(&self) -> Vec<NodeImage<'_>> {
        self.index
            .values()
            .map(|&key| {
                let node = self.node(key);
                NodeImage {
                    path: Cow::Borrowed(&node.path),
                    data: Cow::Borrowed(&node.data),
                    kind: node.kind,
                    ttl_ms: node.ttl_ms,
                    owner: node.owner,
                    lock: node.lock.as_deref().map(|l| LockImage {
                        mode: l.mode,
                        delay_ms: l.delay_ms,
                        granted: l.granted,
                        freed_at_ms: l.freed_at_ms,
                    }),
                    next_seq: node.next_seq,
                    czxid: node.czxid,
                    mzxid: node.mzxid,
                    pzxid: node.pzxid,
                    ctime_ms: node.ctime_ms,
                    mtime_ms: node.mtime_ms,
                    version: node.version,
                    cversion: node.cversion,
                    ttl_indexed: node
                        .ttl_deadline_ms()
                        .is_some_and(|d| self.ttl_deadlines.contains(&(d, node.czxid, key))),
                    emptied: self.empty_containers.contains(&(node.czxid, key)),
                }
            })
            .collect()
    }

    /// Rebuilds a tree from its image, with its indexes, and returns it
    /// with each node's key by czxid (the name a snapshot gives a node).
    ///
    /// # Errors
    /// What makes the image not a tree: no root first, a node whose parent
    /// is missing or comes later, a path or czxid given twice.
    pub(crate) fn from_image(
        image: Vec<NodeImage<'_>>,
    ) -> Result<(Tree, BTreeMap<Zxid, usize>), String> {
        let mut nodes = image.into_iter();
        let root = match nodes.next() {
            Some(root) if key_is_root(&root.path) => root,
            _ => return Err("the first node is not the root /".to_owned()),
        };
        let mut tree = Tree {
            nodes: Slab::new(),
            index: BTreeMap::new(),
            ttl_deadlines: BTreeSet::new(),
            empty_containers: BTreeSet::new(),
            lock_queues: BTreeMap::new(),
            zombies: BTreeSet::new(),
            bytes: 0,
        };
        let mut keys = BTreeMap::new();
        let mut flagged = Vec::new();
        for image in std::iter::once(root).chain(nodes) {
            let parent_key = match protocol::parent_path(&image.path) {
                None if key_is_root(&image.path) && tree.nodes.is_empty() => None,
                None => return Err(format!("{} is not a node path", image.path)),
                Some(parent) => match tree.key(parent) {
                    Some(key) => Some(key),
                    None => {
                        return Err(format!(
                            "{} comes before its parent {parent}, or has none",
                            image.path
                        ))
                    }
                },
            };
            let (czxid, ttl_indexed, emptied) = (image.czxid, image.ttl_indexed, image.emptied);
            let lock_mode = image.lock.as_ref().map(|l| l.mode);
            let node = image.into_node();
            let path = node.path.clone();
            if tree.index.contains_key(&path) {
                return Err(format!("{path} is given twice"));
            }
            tree.bytes = tree
                .bytes
                .saturating_add(node_bytes(&node.path, node.data.len()));
            let freed_at_ms = node.lock.as_ref().and_then(|l| l.freed_at_ms);
            let key = tree.nodes.insert(node);
            if keys.insert(czxid, key).is_some() {
                return Err(format!("czxid {czxid} is given twice (again at {path})"));
            }
            if let Some(parent_key) = parent_key {
                let name = protocol::node_name(&path).to_owned();
                tree.nodes[parent_key].children.insert(name);
                if let Some(mode) = lock_mode {
                    let queue = tree.lock_queues.entry(parent_key).or_default();
                    queue.nodes.insert(czxid, key);
                    if mode == LockMode::Exclusive {
                        queue.exclusive.insert(czxid);
                    }
                }
            }
            if let Some(freed_at_ms) = freed_at_ms {
                tree.zombies.insert((freed_at_ms, czxid, key));
            }
            if emptied {
                tree.empty_containers.insert((czxid, key));
            }
            tree.index.insert(path, key);
            flagged.push((key, ttl_indexed));
        }
        // Whether a node has children is known only now.
        for (key, ttl_indexed) in flagged {
            let node = &tree.nodes[key];
            if let Some(deadline_ms) = node.ttl_deadline_ms() {
                if ttl_indexed || node.children.is_empty() {
                    tree.ttl_deadlines.insert((deadline_ms, node.czxid, key));
                }
            }
        }
        Ok((tree, keys))
    }
}

/// One node as a snapshot holds it: [`Node`] without its child set (the
/// other nodes' paths give it) and with its place in the two indexes that
/// its fields alone do not decide.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct NodeImage<'a> {
    path: Cow<'a, str>,
    data: Cow<'a, [u8]>,
    kind: NodeKind,
    ttl_ms: Option<u64>,
    owner: Option<SessionId>,
    lock: Option<LockImage>,
    next_seq: u64,
    czxid: Zxid,
    mzxid: Zxid,
    pzxid: Zxid,
    ctime_ms: u64,
    mtime_ms: u64,
    version: u64,
    cversion: u64,
    /// In the TTL index although it has children (it had none when last
    /// renewed); a childless TTL node always is.
    ttl_indexed: bool,
    /// A container that lost its last child and waits to be reaped.
    emptied: bool,
}

/// [`LockInfo`] as a snapshot holds it: every field written, where the
/// protocol's encoding leaves out those that are not set.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LockImage {
    mode: LockMode,
    delay_ms: u64,
    granted: Option<Grant>,
    freed_at_ms: Option<u64>,
}

impl NodeImage<'_> {
    fn into_node(self) -> Node {
        Node {
            path: self.path.into_owned(),
            data: self.data.into_owned(),
            kind: self.kind,
            ttl_ms: self.ttl_ms,
            owner: self.owner,
            lock: self.lock.map(|l| {
                Box::new(LockInfo {
                    mode: l.mode,
                    delay_ms: l.delay_ms,
                    granted: l.granted,
                    freed_at_ms: l.freed_at_ms,
                })
            }),
            children: BTreeSet::new(),
            next_seq: self.next_seq,
            czxid: self.czxid,
            mzxid: self.mzxid,
            pzxid: self.pzxid,
            ctime_ms: self.ctime_ms,
            mtime_ms: self.mtime_ms,
            version: self.version,
            cversion: self.cversion,
        }
    }
}

//! Requests: the retry cache, reads and their watches, and writes.
//!
//! Every write (a lone create, set or delete is a one-step multi) runs in two
//! phases. First each step is checked against a `Draft`: a small overlay of
//! the pending steps' effects over the tree, so later steps see earlier ones
//! and nothing in the tree is touched. Only if every step passes are the
//! planned actions applied for real; they cannot fail, so a multi is all or
//! nothing without cloning the tree or undoing anything.

use std::collections::{BTreeSet, HashMap, HashSet};

use latchkey_client::protocol::{
    self, limits, Create, LockInfo, LockMode, LockSpec, MultiOp, MultiResult, NodeKind, Op,
    OpResult, SessionId, WatchEvent, WatchEventKind, WatchKind, Xid, Zxid,
};

use super::tree::{node_bytes, NewNode, Node, Tree};
use super::{
    count, session_expired, to_usize, Config, Coordinator, Effects, Forced, ForcedNode, Missing,
    Refusal, Reply, Verb, Why,
};

impl Coordinator {
    /// Answers one request, applying it at most once per xid.
    pub(super) fn request(
        &mut self,
        session: SessionId,
        xid: Xid,
        op: Op,
        now_ms: u64,
        fx: &mut Effects,
    ) -> Reply {
        let Some(s) = self.sessions.get(session).filter(|s| s.ending.is_none()) else {
            return Reply {
                xid,
                zxid: self.zxid,
                result: Err(session_expired(session)),
            };
        };
        let last = s.last_xid_applied;
        let cached = if xid <= last {
            s.cached(xid).cloned()
        } else {
            None
        };
        self.sessions.touch(session, now_ms);
        self.cover_holder(session);
        let result = if xid > last {
            if let Some(s) = self.sessions.get_mut(session) {
                s.last_xid_applied = xid;
            }
            let is_write = op.is_write();
            let result = self.execute(session, op, now_ms, fx);
            // A closed session is ending and keeps no cache: both are
            // then no-ops.
            if is_write {
                let budget = self.config.reply_cache_bytes_max;
                self.sessions.remember(session, xid, result.clone(), budget);
            } else {
                self.sessions.forget_outside_window(session, xid);
            }
            result
        } else if let Some(cached) = cached {
            cached
        } else if !op.is_write() {
            self.execute(session, op, now_ms, fx)
        } else {
            Err(Why::RetryUnknown {
                session,
                xid,
                last,
                cache_bytes_max: self.config.reply_cache_bytes_max,
            }
            .into())
        };
        Reply {
            xid,
            zxid: self.zxid,
            result,
        }
    }

    pub(super) fn execute(
        &mut self,
        session: SessionId,
        op: Op,
        now_ms: u64,
        fx: &mut Effects,
    ) -> Result<OpResult, Refusal> {
        match op {
            Op::Create(create) => self
                .write(
                    session,
                    vec![MultiOp::Create(create)],
                    Shape::Alone,
                    now_ms,
                    fx,
                )
                .map(single_result),
            Op::Delete {
                path,
                version,
                czxid,
                force,
            } => self
                .write(
                    session,
                    vec![MultiOp::Delete {
                        path,
                        version,
                        czxid,
                    }],
                    if force { Shape::Forced } else { Shape::Alone },
                    now_ms,
                    fx,
                )
                .map(|mut results| match results.pop() {
                    // A delete answers with a stat only when it left a
                    // zombie behind.
                    Some(MultiResult::Stat { stat }) => OpResult::Zombified { stat },
                    other => single_result(other.into_iter().collect()),
                }),
            Op::Touch {
                path,
                ttl_ms,
                czxid,
            } => self
                .write(
                    session,
                    vec![MultiOp::Touch {
                        path,
                        ttl_ms,
                        czxid,
                    }],
                    Shape::Alone,
                    now_ms,
                    fx,
                )
                .map(single_result),
            Op::Set {
                path,
                data,
                version,
                czxid,
            } => self
                .write(
                    session,
                    vec![MultiOp::Set {
                        path,
                        data,
                        version,
                        czxid,
                    }],
                    Shape::Alone,
                    now_ms,
                    fx,
                )
                .map(single_result),
            Op::Multi { ops } => {
                if ops.len() > limits::MULTI_OPS_MAX {
                    return Err(Why::MultiTooLong {
                        ops: count(ops.len()),
                    }
                    .into());
                }
                self.write(session, ops, Shape::Multi, now_ms, fx)
                    .map(|results| OpResult::Multi { results })
            }
            Op::Get { path, watch } => self.get(session, &path, watch),
            Op::Exists { path, watch } => self.exists(session, &path, watch),
            Op::Children {
                path,
                watch,
                limit,
                after,
            } => self.children(session, &path, watch, limit, after.as_deref()),
            Op::Ping { ack } => {
                self.sessions.forget_through(session, ack);
                Ok(OpResult::Pong)
            }
            Op::SetWatches {
                last_zxid,
                data,
                exist,
                child,
                lock,
            } => self.set_watches(session, last_zxid, [&data, &exist, &child, &lock], fx),
            Op::CloseSession => {
                self.close_session(session, now_ms, fx);
                Ok(OpResult::Done)
            }
        }
    }

    /// Checks every step against a draft, then applies them all.
    fn write(
        &mut self,
        session: SessionId,
        ops: Vec<MultiOp>,
        shape: Shape,
        now_ms: u64,
        fx: &mut Effects,
    ) -> Result<Vec<MultiResult>, Refusal> {
        let in_multi = shape == Shape::Multi;
        let force = shape == Shape::Forced;
        let mut draft = Draft::new(&self.tree, self.zxid);
        let mut plan = Vec::with_capacity(ops.len());
        for (i, op) in ops.into_iter().enumerate() {
            match plan_step(&mut draft, &self.config, session, op, in_multi, force) {
                Ok(step) => plan.push(step),
                Err(mut refusal) => {
                    if in_multi {
                        refusal.index = Some(u32::try_from(i).unwrap_or(u32::MAX));
                    }
                    return Err(refusal);
                }
            }
        }
        let locks = || {
            plan.iter()
                .flat_map(|step| &step.actions)
                .filter_map(|action| match action {
                    Action::Create(NewNode {
                        path,
                        lock: Some(lock),
                        ..
                    }) => Some((path.as_str(), lock.mode)),
                    _ => None,
                })
        };
        for (path, mode) in locks() {
            self.check_lock_mode(path, mode)?;
        }
        self.check_waits_limit(session, locks())?;
        for (path, mode) in locks() {
            self.check_lock_wait(session, path, mode)?;
        }
        Ok(self.apply_plan(plan, session, now_ms, fx))
    }

    /// Applies checked steps; one zxid per action (a create with
    /// make_parents has one action per created node; a check has none, as it
    /// writes nothing).
    fn apply_plan(
        &mut self,
        plan: Vec<Step>,
        session: SessionId,
        now_ms: u64,
        fx: &mut Effects,
    ) -> Vec<MultiResult> {
        let mut results = Vec::with_capacity(plan.len());
        for step in plan {
            let mut touched = None;
            let mut answer = step.answer;
            for action in step.actions {
                let zxid = self.next_zxid();
                match action {
                    Action::Create(new) => touched = Some(self.create_node(new, zxid, now_ms, fx)),
                    Action::Delete(path, Forcing::None) => {
                        let key = self
                            .tree
                            .key(&path)
                            .expect("a planned delete names a live node");
                        self.delete_node(key, zxid, Some(session), now_ms, fx);
                    }
                    Action::Delete(path, Forcing::Lock | Forcing::Hold) => {
                        let key = self
                            .tree
                            .key(&path)
                            .expect("a planned delete names a live node");
                        let node = self.force_delete(key, zxid, session, now_ms, fx);
                        if let ForcedNode::Holder {
                            freed_at_ms: Some(_),
                            ..
                        } = node
                        {
                            touched = Some(key);
                            answer = Answer::Stat;
                        }
                        fx.forced.push(Forced {
                            by: session,
                            path,
                            node,
                        });
                    }
                    Action::Set(path, change) => {
                        let key = self
                            .tree
                            .key(&path)
                            .expect("a planned set names a live node");
                        match change {
                            Change::Data(data) => self.tree.set_data(key, data, zxid, now_ms),
                            Change::Ttl(ttl_ms) => self.tree.touch(key, ttl_ms, zxid, now_ms),
                        }
                        let fired = self.watches.fire(
                            &[(&path, WatchKind::Data, WatchEventKind::NodeDataChanged)],
                            zxid,
                        );
                        fx.events.extend(fired);
                        touched = Some(key);
                    }
                }
            }
            let node = || {
                self.tree
                    .node(touched.expect("a create or set step touches a node"))
            };
            results.push(match answer {
                Answer::Checked => MultiResult::Checked,
                Answer::Deleted => MultiResult::Deleted,
                Answer::Created => MultiResult::Created {
                    path: node().path.clone(),
                    stat: node().stat(),
                },
                Answer::Stat => MultiResult::Stat {
                    stat: node().stat(),
                },
            });
        }
        results
    }

    /// Deletes the node `key` at `zxid` for `session`, which forced it past
    /// the owner or token rule, as the end of its owner's session would: a
    /// granted lock node with a lock-delay is taken from its owner, who is
    /// told at once, and stays as a zombie through the delay, so the next
    /// waiter is granted only when the holder has had that long to stop;
    /// anything else goes at once. An owner whose session is ending is told
    /// nothing, and after a close (its own word that it is done) its node
    /// goes at once, as the rest of its end would take it. Returns what it
    /// was.
    fn force_delete(
        &mut self,
        key: usize,
        zxid: Zxid,
        session: SessionId,
        now_ms: u64,
        fx: &mut Effects,
    ) -> ForcedNode {
        let node = self.tree.node(key);
        let (owner, granted) = (
            node.owner,
            node.lock.as_deref().map(|l| l.granted.is_some()),
        );
        if let Some(owner) = owner {
            let end = self.sessions.get(owner).and_then(|s| s.ending);
            if let Some(delay_ms) = self.zombie_delay_ms(key, end) {
                let freed_at_ms = now_ms.saturating_add(delay_ms);
                let path = self.tree.node(key).path.clone();
                self.zombify(key, owner, freed_at_ms);
                if end.is_none() {
                    fx.events.push((
                        owner,
                        WatchEvent {
                            kind: WatchEventKind::NodeDeleted,
                            path,
                            zxid,
                        },
                    ));
                }
                return ForcedNode::Holder {
                    owner,
                    freed_at_ms: Some(freed_at_ms),
                };
            }
        }
        let forced = match (owner, granted) {
            (Some(owner), Some(true)) => ForcedNode::Holder {
                owner,
                freed_at_ms: None,
            },
            (Some(owner), Some(false)) => ForcedNode::Waiter { owner },
            (None, Some(_)) => ForcedNode::Zombie,
            (_, None) => ForcedNode::Hold,
        };
        self.delete_node(key, zxid, Some(session), now_ms, fx);
        forced
    }

    /// Registers a watch for a read, unless the session holds it already.
    /// Fails, registering nothing, if the session or the whole table is at
    /// its watch bound.
    fn watch_for_read(
        &mut self,
        session: SessionId,
        path: &str,
        kind: WatchKind,
    ) -> Result<(), Refusal> {
        if self.watches.holds(session, path, kind) {
            return Ok(());
        }
        let held = self.watches.count(session);
        if count(held) >= self.config.watches_per_session_max {
            return Err(Why::SessionWatchesFull {
                session,
                held: count(held),
                max: self.config.watches_per_session_max,
            }
            .into());
        }
        let total = self.watches.total();
        if count(total) >= self.config.watches_max {
            return Err(Why::WatchesFull {
                total: count(total),
                max: self.config.watches_max,
            }
            .into());
        }
        self.watches.add(session, path, kind);
        Ok(())
    }

    fn get(&mut self, session: SessionId, path: &str, watch: bool) -> Result<OpResult, Refusal> {
        check_path(path)?;
        let Some(node) = self.tree.get(path) else {
            return Err(no_node(path, Missing::Read));
        };
        let answer = OpResult::Data {
            data: node.data.clone().into(),
            stat: node.stat(),
        };
        if watch {
            self.watch_for_read(session, path, WatchKind::Data)?;
        }
        Ok(answer)
    }

    fn exists(&mut self, session: SessionId, path: &str, watch: bool) -> Result<OpResult, Refusal> {
        check_path(path)?;
        let stat = self.tree.get(path).map(Node::stat);
        if watch {
            let kind = if stat.is_some() {
                WatchKind::Data
            } else {
                WatchKind::Exist
            };
            self.watch_for_read(session, path, kind)?;
        }
        Ok(OpResult::Exists { stat })
    }

    /// One page of `path`'s children: at most `limit` and
    /// `Config::children_page_max` names after `after`. The cost is the
    /// page's, never the whole listing's: a range of the sorted child set.
    fn children(
        &mut self,
        session: SessionId,
        path: &str,
        watch: bool,
        limit: Option<u32>,
        after: Option<&str>,
    ) -> Result<OpResult, Refusal> {
        check_path(path)?;
        if limit == Some(0) {
            return Err(Why::ListingOfNothing {
                path: path.to_owned(),
            }
            .into());
        }
        let Some(node) = self.tree.get(path) else {
            return Err(no_node(path, Missing::Listing));
        };
        let page = limit
            .and_then(|l| usize::try_from(l).ok())
            .unwrap_or(usize::MAX)
            .min(to_usize(self.config.children_page_max))
            .max(1);
        let range = match after {
            Some(after) => node
                .children
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => node.children.range::<str, _>(..),
        };
        let mut children: Vec<String> = Vec::with_capacity(page.min(node.children.len()));
        let mut more = false;
        for name in range {
            if children.len() == page {
                more = true;
                break;
            }
            children.push(name.clone());
        }
        let answer = OpResult::Children {
            children,
            stat: node.stat(),
            more,
        };
        if watch {
            self.watch_for_read(session, path, WatchKind::Child)?;
        }
        Ok(answer)
    }

    /// Re-registers a resumed session's watches (data, exist, child, lock);
    /// fires at once, with the current zxid, those whose node changed after
    /// `last_zxid`. An exist watch on an absent node fires NodeCreated unless
    /// the node cannot have existed since `last_zxid`: it may have been
    /// created and deleted while the session was away, its event lost with
    /// the connection. Every create and delete of a child moves the
    /// parent's pzxid (and a parent made since has a later one), so a parent
    /// there now with a pzxid at or below `last_zxid` proves the node never
    /// came; anything else fires, as a wake-up the client may find spurious
    /// (it looks again) beats one it never gets. A lock path fires
    /// LockGranted with its token if it is the session's lock node and
    /// granted, nothing if it still waits (the implied lock watch will
    /// tell), and NodeDeleted otherwise: the node is gone, or the path names
    /// another node now.
    fn set_watches(
        &mut self,
        session: SessionId,
        last_zxid: Zxid,
        [data, exist, child, lock]: [&[String]; 4],
        fx: &mut Effects,
    ) -> Result<OpResult, Refusal> {
        let total = data
            .len()
            .saturating_add(exist.len())
            .saturating_add(child.len())
            .saturating_add(lock.len());
        if total > limits::SET_WATCHES_PATHS_MAX {
            return Err(Why::SetWatchesTooLong {
                paths: count(total),
            }
            .into());
        }
        for path in data.iter().chain(exist).chain(child).chain(lock) {
            check_path(path)?;
        }
        let now = self.zxid;
        let mut fire: Vec<(WatchEventKind, &str, Zxid)> = Vec::new();
        let mut register: BTreeSet<(&str, WatchKind)> = BTreeSet::new();
        for path in data {
            match self.tree.get(path) {
                None => fire.push((WatchEventKind::NodeDeleted, path, now)),
                Some(n) if n.mzxid > last_zxid => {
                    fire.push((WatchEventKind::NodeDataChanged, path, now))
                }
                Some(_) => {
                    register.insert((path, WatchKind::Data));
                }
            }
        }
        for path in exist {
            let absent_throughout = self.tree.get(path).is_none()
                && protocol::parent_path(path)
                    .and_then(|parent| self.tree.get(parent))
                    .is_some_and(|parent| parent.pzxid <= last_zxid);
            if absent_throughout {
                register.insert((path, WatchKind::Exist));
            } else {
                fire.push((WatchEventKind::NodeCreated, path, now));
            }
        }
        for path in child {
            match self.tree.get(path) {
                None => fire.push((WatchEventKind::NodeDeleted, path, now)),
                Some(n) if n.pzxid > last_zxid => {
                    fire.push((WatchEventKind::NodeChildrenChanged, path, now))
                }
                Some(_) => {
                    register.insert((path, WatchKind::Child));
                }
            }
        }
        for path in lock {
            let mine = self
                .tree
                .get(path)
                .filter(|n| n.owner == Some(session))
                .and_then(|n| n.lock.as_deref());
            match mine {
                Some(l) => {
                    if let Some(grant) = l.granted {
                        fire.push((WatchEventKind::LockGranted, path, grant.token));
                    }
                }
                // Gone, or the path now names another node (a queue parent
                // reaped and made again restarts its sequence): either way
                // the session's node was deleted, and no implied event
                // would ever come for it.
                None => fire.push((WatchEventKind::NodeDeleted, path, now)),
            }
        }
        let held = self.watches.count(session);
        let new = register
            .iter()
            .filter(|(path, kind)| !self.watches.holds(session, path, *kind))
            .count();
        if count(held.saturating_add(new)) > self.config.watches_per_session_max {
            return Err(Why::SetWatchesOverSession {
                session,
                held: count(held),
                adds: count(new),
                max: self.config.watches_per_session_max,
            }
            .into());
        }
        let total = self.watches.total();
        if count(total.saturating_add(new)) > self.config.watches_max {
            return Err(Why::SetWatchesOverAll {
                total: count(total),
                adds: count(new),
                max: self.config.watches_max,
            }
            .into());
        }
        for (path, kind) in register {
            self.watches.add(session, path, kind);
        }
        // Lookup only: the events keep the order of `fire`.
        let mut seen: HashSet<(WatchEventKind, &str)> = HashSet::new();
        for (kind, path, zxid) in fire {
            if seen.insert((kind, path)) {
                fx.events.push((
                    session,
                    WatchEvent {
                        kind,
                        path: path.to_owned(),
                        zxid,
                    },
                ));
            }
        }
        Ok(OpResult::Done)
    }
}

/// Turns the one result of a lone create, set or delete into its reply.
fn single_result(mut results: Vec<MultiResult>) -> OpResult {
    match results.pop() {
        Some(MultiResult::Created { path, stat }) => OpResult::Created { path, stat },
        Some(MultiResult::Stat { stat }) => OpResult::Stat { stat },
        Some(MultiResult::Deleted) => OpResult::Deleted,
        // Lone checks do not exist on the wire.
        Some(MultiResult::Checked) | None => OpResult::Done,
    }
}

/// How a write's steps came: a lone request, a lone delete with force (the
/// owner and token rules lifted), or a multi.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Alone,
    Forced,
    Multi,
}

/// One checked step of a write.
struct Step {
    actions: Vec<Action>,
    answer: Answer,
}

/// One change to make; each takes one zxid.
enum Action {
    Create(NewNode),
    /// A delete; forced past the rule named, unless `Forcing::None`.
    Delete(String, Forcing),
    /// A set or a touch: either moves the version and fires data watches.
    Set(String, Change),
}

/// What a set-like action changes besides the version, mzxid and mtime.
enum Change {
    /// A set: new data.
    Data(Vec<u8>),
    /// A touch: the data stays; the TTL becomes this one (if given).
    Ttl(Option<u64>),
}

/// What a step answers once applied.
#[derive(Clone, Copy)]
enum Answer {
    Checked,
    Created,
    Stat,
    Deleted,
}

/// What validation needs to know about a node.
#[derive(Clone, Copy)]
struct View {
    kind: NodeKind,
    /// An ephemeral node's session (`None` for a zombie lock node).
    owner: Option<SessionId>,
    /// For a lock node: when it stops holding, if it is a zombie.
    lock: Option<Option<u64>>,
    /// For a node the draft creates, the zxid its create will take.
    czxid: Zxid,
    ttl_ms: Option<u64>,
    version: u64,
    num_children: usize,
    next_seq: u64,
    data_bytes: usize,
}

impl View {
    fn of(node: &Node) -> View {
        View {
            kind: node.kind,
            owner: node.owner,
            lock: node.lock.as_deref().map(|l| l.freed_at_ms),
            czxid: node.czxid,
            ttl_ms: node.ttl_ms,
            version: node.version,
            num_children: node.children.len(),
            next_seq: node.next_seq,
            data_bytes: node.data.len(),
        }
    }
}

/// The tree as it will be after the steps checked so far: an overlay of
/// touched paths (`None` = deleted) over the real tree. Lookup only.
struct Draft<'t> {
    tree: &'t Tree,
    overlay: HashMap<String, Option<View>>,
    node_count: u64,
    /// The tree's bytes (see `tree::node_bytes`) after the steps so far.
    bytes: u64,
    /// The zxid the last action so far will take: each create, set, touch
    /// and delete takes the next, so a check can name the czxid of a node an
    /// earlier step creates.
    zxid: Zxid,
}

impl<'t> Draft<'t> {
    fn new(tree: &'t Tree, zxid: Zxid) -> Self {
        Draft {
            tree,
            overlay: HashMap::new(),
            node_count: count(tree.len()),
            bytes: tree.bytes(),
            zxid,
        }
    }

    /// Counts one more action's zxid and returns it.
    fn take_zxid(&mut self) -> Zxid {
        self.zxid = Zxid(self.zxid.0.saturating_add(1));
        self.zxid
    }

    fn get(&self, path: &str) -> Option<View> {
        match self.overlay.get(path) {
            Some(view) => *view,
            None => self.tree.get(path).map(View::of),
        }
    }

    fn update(&mut self, path: &str, change: impl FnOnce(&mut View)) {
        if let Some(mut view) = self.get(path) {
            change(&mut view);
            self.overlay.insert(path.to_owned(), Some(view));
        }
    }

    fn create(
        &mut self,
        path: &str,
        kind: NodeKind,
        ttl_ms: Option<u64>,
        bump_parent_seq: bool,
        data_bytes: usize,
        owner: Option<SessionId>,
    ) {
        let czxid = self.take_zxid();
        if let Some(parent) = protocol::parent_path(path) {
            self.update(parent, |v| {
                v.num_children = v.num_children.saturating_add(1);
                if bump_parent_seq {
                    v.next_seq = v.next_seq.saturating_add(1);
                }
            });
        }
        self.overlay.insert(
            path.to_owned(),
            Some(View {
                kind,
                owner,
                // Lock nodes are created alone, never before a later step.
                lock: None,
                czxid,
                ttl_ms,
                version: 0,
                num_children: 0,
                next_seq: 0,
                data_bytes,
            }),
        );
        self.node_count = self.node_count.saturating_add(1);
        self.bytes = self.bytes.saturating_add(node_bytes(path, data_bytes));
    }

    /// Replaces a node's data (a set): one more version, the new size.
    fn set(&mut self, path: &str, data_bytes: usize) {
        self.take_zxid();
        let old_bytes = self.get(path).map_or(0, |v| v.data_bytes);
        self.update(path, |v| {
            v.version = v.version.saturating_add(1);
            v.data_bytes = data_bytes;
        });
        self.bytes = self
            .bytes
            .saturating_sub(count(old_bytes))
            .saturating_add(count(data_bytes));
    }

    /// Renews a TTL node (a touch): one more version, maybe a new TTL.
    fn touch(&mut self, path: &str, ttl_ms: Option<u64>) {
        self.take_zxid();
        self.update(path, |v| {
            v.version = v.version.saturating_add(1);
            if ttl_ms.is_some() {
                v.ttl_ms = ttl_ms;
            }
        });
    }

    fn delete(&mut self, path: &str) {
        self.take_zxid();
        let freed = self.get(path).map_or(0, |v| node_bytes(path, v.data_bytes));
        self.bytes = self.bytes.saturating_sub(freed);
        if let Some(parent) = protocol::parent_path(path) {
            self.update(parent, |v| {
                v.num_children = v.num_children.saturating_sub(1)
            });
        }
        self.overlay.insert(path.to_owned(), None);
        self.node_count = self.node_count.saturating_sub(1);
    }

    /// Fails unless `parent` can take one more child and the tree one more
    /// node.
    fn check_room(&self, parent: &str, config: &Config) -> Result<(), Refusal> {
        let children = self.get(parent).map_or(0, |v| v.num_children);
        if count(children) >= config.children_per_node_max {
            return Err(Why::ChildrenFull {
                parent: parent.to_owned(),
                children: count(children),
                max: config.children_per_node_max,
            }
            .into());
        }
        if self.node_count >= config.nodes_max {
            return Err(Why::NodesFull {
                nodes: self.node_count,
                max: config.nodes_max,
            }
            .into());
        }
        Ok(())
    }

    /// Fails if a step that frees `freed` bytes and adds `added` would take
    /// the tree over `tree_bytes_max`. A step that does not grow the tree
    /// always passes, so shrinking data is never refused.
    fn check_bytes(&self, freed: u64, added: u64, config: &Config) -> Result<(), Refusal> {
        let after = self.bytes.saturating_sub(freed).saturating_add(added);
        if added > freed && after > config.tree_bytes_max {
            return Err(Why::TreeFull {
                bytes: after,
                max: config.tree_bytes_max,
            }
            .into());
        }
        Ok(())
    }
}

/// Checks one step against the draft and records its effects there.
fn plan_step(
    draft: &mut Draft<'_>,
    config: &Config,
    session: SessionId,
    op: MultiOp,
    in_multi: bool,
    force: bool,
) -> Result<Step, Refusal> {
    match op {
        MultiOp::Create(create) => plan_create(draft, config, session, create, in_multi),
        MultiOp::Touch {
            path,
            ttl_ms,
            czxid,
        } => {
            check_path(&path)?;
            if ttl_ms == Some(0) {
                return Err(Why::RenewToZero { path }.into());
            }
            if let Some(ttl_ms) = ttl_ms {
                check_ttl(&path, ttl_ms, config)?;
            }
            let view = draft
                .get(&path)
                .ok_or_else(|| no_node(&path, Missing::Renew))?;
            check_token(&path, czxid, view.czxid)?;
            check_may_change(&path, &view, session, czxid, Verb::Renew)?;
            if view.ttl_ms.is_none() {
                return Err(Why::NoTtl { path }.into());
            }
            draft.touch(&path, ttl_ms);
            Ok(Step {
                actions: vec![Action::Set(path, Change::Ttl(ttl_ms))],
                answer: Answer::Stat,
            })
        }
        MultiOp::Delete {
            path,
            version,
            czxid,
        } => {
            check_path(&path)?;
            if path == "/" {
                return Err(Why::DeleteRoot.into());
            }
            let view = draft
                .get(&path)
                .ok_or_else(|| no_node(&path, Missing::Delete))?;
            check_token(&path, czxid, view.czxid)?;
            let forcing = forcing(&view, session, czxid);
            if !force {
                check_may_change(&path, &view, session, czxid, Verb::Delete)?;
            }
            check_version(&path, version, view.version)?;
            if view.num_children > 0 {
                return Err(Why::NotEmpty {
                    path,
                    children: count(view.num_children),
                }
                .into());
            }
            draft.delete(&path);
            Ok(Step {
                actions: vec![Action::Delete(path, forcing)],
                answer: Answer::Deleted,
            })
        }
        MultiOp::Set {
            path,
            data,
            version,
            czxid,
        } => {
            check_path(&path)?;
            let view = draft
                .get(&path)
                .ok_or_else(|| no_node(&path, Missing::Set))?;
            check_token(&path, czxid, view.czxid)?;
            check_may_change(&path, &view, session, czxid, Verb::Set)?;
            check_version(&path, version, view.version)?;
            check_data(&data.0, config)?;
            draft.check_bytes(count(view.data_bytes), count(data.0.len()), config)?;
            draft.set(&path, data.0.len());
            Ok(Step {
                actions: vec![Action::Set(path, Change::Data(data.0))],
                answer: Answer::Stat,
            })
        }
        MultiOp::Check {
            path,
            version,
            czxid,
        } => {
            check_path(&path)?;
            let view = draft
                .get(&path)
                .ok_or_else(|| no_node(&path, Missing::Check))?;
            check_token(&path, czxid, view.czxid)?;
            check_version(&path, version, view.version)?;
            Ok(Step {
                actions: Vec::new(),
                answer: Answer::Checked,
            })
        }
    }
}

fn plan_create(
    draft: &mut Draft<'_>,
    config: &Config,
    session: SessionId,
    create: Create,
    in_multi: bool,
) -> Result<Step, Refusal> {
    let Create {
        path,
        data,
        kind,
        sequential,
        ttl_ms,
        make_parents,
        lock,
    } = create;
    let lock = match lock {
        Some(spec) => Some(plan_lock(spec, kind, sequential, in_multi, config)?),
        None => None,
    };
    check_path(&path)?;
    if path == "/" {
        return Err(Why::CreateRoot.into());
    }
    if ttl_ms.is_some() && kind != NodeKind::Persistent {
        return Err(Why::TtlNotPersistent { kind }.into());
    }
    if ttl_ms == Some(0) {
        return Err(Why::TtlZero.into());
    }
    if let Some(ttl_ms) = ttl_ms {
        check_ttl(&path, ttl_ms, config)?;
    }
    if kind == NodeKind::Container && sequential {
        return Err(Why::ContainerSequential.into());
    }
    check_data(&data.0, config)?;
    let parent = protocol::parent_path(&path)
        .expect("a valid path other than / has a parent")
        .to_owned();

    let mut actions = Vec::new();
    match draft.get(&parent) {
        Some(view) if view.kind == NodeKind::Ephemeral => {
            return Err(ephemeral_parent(&parent, &path));
        }
        Some(_) => {}
        None if !make_parents => {
            return Err(no_node(&parent, Missing::Parent));
        }
        None => {
            // Every ancestor from the top; the existing ones come first, and
            // only the deepest existing one can be ephemeral.
            let mut ancestors = Vec::new();
            let mut at = parent.as_str();
            while at != "/" {
                ancestors.push(at.to_owned());
                at = protocol::parent_path(at).expect("a path other than / has a parent");
            }
            for ancestor in ancestors.into_iter().rev() {
                match draft.get(&ancestor) {
                    Some(view) if view.kind == NodeKind::Ephemeral => {
                        return Err(ephemeral_parent(&ancestor, &path));
                    }
                    Some(_) => {}
                    None => {
                        let above = protocol::parent_path(&ancestor).unwrap_or("/");
                        draft.check_room(above, config)?;
                        draft.check_bytes(0, node_bytes(&ancestor, 0), config)?;
                        draft.create(&ancestor, NodeKind::Container, None, false, 0, None);
                        actions.push(Action::Create(NewNode {
                            path: ancestor,
                            data: Vec::new(),
                            kind: NodeKind::Container,
                            ttl_ms: None,
                            owner: None,
                            lock: None,
                            bump_parent_seq: false,
                        }));
                    }
                }
            }
        }
    }

    let path = if sequential {
        let next_seq = draft.get(&parent).map_or(0, |v| v.next_seq);
        if next_seq > limits::SEQUENCE_MAX {
            return Err(Why::SequenceExhausted {
                parent,
                next: next_seq,
            }
            .into());
        }
        let name = format!("{path}{next_seq:010}");
        check_path(&name)?;
        name
    } else {
        path
    };
    if draft.get(&path).is_some() {
        return Err(Why::NodeExists { path }.into());
    }
    draft.check_room(&parent, config)?;
    draft.check_bytes(0, node_bytes(&path, data.0.len()), config)?;
    let owner = (kind == NodeKind::Ephemeral).then_some(session);
    draft.create(&path, kind, ttl_ms, sequential, data.0.len(), owner);
    actions.push(Action::Create(NewNode {
        path,
        data: data.0,
        kind,
        ttl_ms,
        owner,
        lock,
        bump_parent_seq: sequential,
    }));
    Ok(Step {
        actions,
        answer: Answer::Created,
    })
}

/// Checks a lock node's create and resolves its delay: the node must be
/// ephemeral (it goes with its holder) and sequential (its name is its place
/// in the queue), and made alone, because a multi's creates would all join
/// queues at once and the deadlock check weighs one wait at a time.
fn plan_lock(
    spec: LockSpec,
    kind: NodeKind,
    sequential: bool,
    in_multi: bool,
    config: &Config,
) -> Result<LockInfo, Refusal> {
    if kind != NodeKind::Ephemeral || !sequential {
        return Err(Why::LockNotEphemeralSequential.into());
    }
    if in_multi {
        return Err(Why::LockInMulti.into());
    }
    if spec.mode == (LockMode::Semaphore { permits: 0 }) {
        return Err(Why::SemaphoreOfNone.into());
    }
    let delay_ms = spec.delay_ms.unwrap_or(config.lock_delay_ms_default);
    if delay_ms > config.lock_delay_ms_max {
        return Err(Why::LockDelayTooLong {
            delay_ms,
            max_ms: config.lock_delay_ms_max,
            default_ms: config.lock_delay_ms_default,
        }
        .into());
    }
    Ok(LockInfo {
        mode: spec.mode,
        delay_ms,
        granted: None,
        freed_at_ms: None,
    })
}

fn check_path(path: &str) -> Result<(), Refusal> {
    Ok(protocol::validate_path(path)?)
}

fn check_version(path: &str, expected: Option<u64>, actual: u64) -> Result<(), Refusal> {
    match expected {
        Some(expected) if expected != actual => Err(Why::BadVersion {
            path: path.to_owned(),
            expected,
            actual,
        }
        .into()),
        _ => Ok(()),
    }
}

/// Which rule a change of `view` by `session`, with `token` (if given),
/// would have to be forced past: the owner rule of a lock node (another
/// session's, or a zombie's), then the token rule of a timed hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Forcing {
    None,
    Lock,
    Hold,
}

fn forcing(view: &View, session: SessionId, token: Option<Zxid>) -> Forcing {
    if view.lock.is_some() && view.owner != Some(session) {
        Forcing::Lock
    } else if view.ttl_ms.is_some() && token.is_none() {
        Forcing::Hold
    } else {
        Forcing::None
    }
}

/// Refuses, with NotOwner, a change to another session's lock node or to a
/// zombie, and, with TokenRequired, a change to a timed hold that gives no
/// token (a wrong token was refused before, by `check_token`). `verb` says
/// what the request would do.
fn check_may_change(
    path: &str,
    view: &View,
    session: SessionId,
    token: Option<Zxid>,
    verb: Verb,
) -> Result<(), Refusal> {
    match forcing(view, session, token) {
        Forcing::None => Ok(()),
        Forcing::Lock => Err(Why::NotOwner {
            path: path.to_owned(),
            verb,
            owner: view.owner,
            freed_at_ms: view.lock.flatten(),
        }
        .into()),
        Forcing::Hold => Err(Why::TokenRequired {
            path: path.to_owned(),
            verb,
        }
        .into()),
    }
}

/// Refuses a hold's TTL over `Config::hold_ttl_ms_max`.
fn check_ttl(path: &str, ttl_ms: u64, config: &Config) -> Result<(), Refusal> {
    if ttl_ms > config.hold_ttl_ms_max {
        return Err(Why::TtlTooLong {
            path: path.to_owned(),
            ttl_ms,
            max_ms: config.hold_ttl_ms_max,
        }
        .into());
    }
    Ok(())
}

/// Fails with BadToken unless the node is the one created at `expected`
/// (when given): a hold's token names one incarnation of a path.
fn check_token(path: &str, expected: Option<Zxid>, actual: Zxid) -> Result<(), Refusal> {
    match expected {
        Some(expected) if expected != actual => Err(Why::BadToken {
            path: path.to_owned(),
            expected,
            actual,
        }
        .into()),
        _ => Ok(()),
    }
}

fn check_data(data: &[u8], config: &Config) -> Result<(), Refusal> {
    if count(data.len()) > config.data_bytes_max {
        return Err(Why::DataTooLarge {
            bytes: count(data.len()),
            max: config.data_bytes_max,
        }
        .into());
    }
    Ok(())
}

fn no_node(path: &str, doing: Missing) -> Refusal {
    Why::NoNode {
        path: path.to_owned(),
        doing,
    }
    .into()
}

fn ephemeral_parent(parent: &str, path: &str) -> Refusal {
    Why::EphemeralParent {
        parent: parent.to_owned(),
        path: path.to_owned(),
    }
    .into()
}

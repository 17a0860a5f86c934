//! A model-based property test of `Coordinator::apply`: random steps from
//! several sessions (reads that set watches, conditional writes, multis,
//! sequential, ephemeral, container and TTL nodes, session opens, resumes,
//! closes, and expiries by advancing `now` and ticking) go both to the
//! coordinator and to `Model`, a plain reference written here from the
//! documented semantics. After every step the two must agree on the answer,
//! each session's watch events (in order), the sessions that ended, every
//! node (path, data, kind, TTL, owner, versions, sequence counter, zxids,
//! times, children), the watch table, the session table and the latest
//! zxid; and `check_invariants` must pass.
//!
//! The model shares no code with the state machine, only the protocol's
//! types: it keeps nodes in one map by path and finds children by scanning
//! it, runs each write on a copy of itself and keeps the copy only if every
//! step passed (so a multi is all or nothing by construction), and scans for
//! what a tick removes. The comparison reads the coordinator's tables, but
//! only to observe them.
//!
//! Left out: lock nodes (`tests_locks.rs`), retried xids and `set_watches`
//! (`tests_random.rs`), and the bounds on nodes, tree bytes, children and
//! watches (`tests.rs`). The session and data-size bounds are in.
//!
//! Cases: `LATCHKEY_MODEL_CASES`, or a default sized to run in a few seconds
//! in a debug build on two cores.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use latchkey_client::protocol::{
    Create, Data, ErrorCode, MultiOp, MultiResult, NodeKind, Op, OpResult, Secret, SessionId, Stat,
    WatchEvent, WatchEventKind, WatchKind, Xid, Zxid,
};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

use super::{Command, Config, Coordinator, Outcome, SessionEnd, SessionGrant};

const ZXID_START: Zxid = Zxid(1_000);
const TIMEOUT_MS_MIN: u64 = 100;
const TIMEOUT_MS_MAX: u64 = 1_000;
/// Small, so that opens are refused now and then.
const SESSIONS_MAX: usize = 4;
/// Small, so that a generated value is too large now and then.
const DATA_BYTES_MAX: usize = 3;

fn config() -> Config {
    Config {
        session_timeout_ms_min: TIMEOUT_MS_MIN,
        session_timeout_ms_max: TIMEOUT_MS_MAX,
        data_bytes_max: DATA_BYTES_MAX,
        sessions_max: SESSIONS_MAX,
        ..super::tests::config()
    }
}

// ---- the reference model ----

/// One node as the model keeps it; also what the coordinator's nodes are
/// turned into for comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ModelNode {
    data: Vec<u8>,
    kind: NodeKind,
    ttl_ms: Option<u64>,
    owner: Option<SessionId>,
    version: u64,
    cversion: u64,
    next_seq: u64,
    czxid: Zxid,
    mzxid: Zxid,
    pzxid: Zxid,
    ctime_ms: u64,
    mtime_ms: u64,
}

/// A node about to be created.
struct Fresh {
    data: Vec<u8>,
    kind: NodeKind,
    ttl_ms: Option<u64>,
    owner: Option<SessionId>,
    /// Takes its name from the parent's counter, which moves on.
    sequential: bool,
}

#[derive(Clone, Debug)]
struct ModelSession {
    secret: String,
    timeout_ms: u64,
    last_heard_ms: u64,
    last_xid: u64,
}

/// What a step answered, with error messages left out: the model predicts
/// codes (and a multi's failing index), not wording.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Session(Result<SessionGrant, ErrorCode>),
    Reply {
        xid: Xid,
        zxid: Zxid,
        result: Result<OpResult, (ErrorCode, Option<u32>)>,
    },
    Ticked,
}

#[derive(Clone, Debug)]
struct Model {
    /// Every node by path, the root included.
    nodes: BTreeMap<String, ModelNode>,
    sessions: BTreeMap<SessionId, ModelSession>,
    watches: BTreeSet<(SessionId, String, WatchKind)>,
    zxid: Zxid,
    /// This step's watch events and ended sessions.
    events: Vec<(SessionId, WatchEvent)>,
    ended: Vec<(SessionId, SessionEnd)>,
    /// Nodes removed by ticks because their TTL ran out, and empty
    /// containers reaped: for the coverage check.
    ttl_removed: u64,
    containers_removed: u64,
}

fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

fn name_of(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[i + 1..])
}

/// Enough of the path rules for the paths the generator makes.
fn canonical(path: &str) -> bool {
    path == "/"
        || path
            .strip_prefix('/')
            .is_some_and(|rest| rest.split('/').all(|s| !s.is_empty()))
}

fn len_u64(n: usize) -> u64 {
    u64::try_from(n).expect("small")
}

impl Model {
    fn new() -> Self {
        let root = ModelNode {
            data: Vec::new(),
            kind: NodeKind::Persistent,
            ttl_ms: None,
            owner: None,
            version: 0,
            cversion: 0,
            next_seq: 0,
            czxid: ZXID_START,
            mzxid: ZXID_START,
            pzxid: ZXID_START,
            ctime_ms: 0,
            mtime_ms: 0,
        };
        Model {
            nodes: BTreeMap::from([("/".to_owned(), root)]),
            sessions: BTreeMap::new(),
            watches: BTreeSet::new(),
            zxid: ZXID_START,
            events: Vec::new(),
            ended: Vec::new(),
            ttl_removed: 0,
            containers_removed: 0,
        }
    }

    fn next_zxid(&mut self) -> Zxid {
        self.zxid = Zxid(self.zxid.0 + 1);
        self.zxid
    }

    fn children(&self, path: &str) -> BTreeSet<String> {
        self.nodes
            .keys()
            .filter(|p| p.as_str() != "/" && parent_of(p) == path)
            .map(|p| name_of(p).to_owned())
            .collect()
    }

    fn stat(&self, path: &str) -> Stat {
        let n = &self.nodes[path];
        Stat {
            czxid: n.czxid,
            mzxid: n.mzxid,
            pzxid: n.pzxid,
            ctime_ms: n.ctime_ms,
            mtime_ms: n.mtime_ms,
            version: n.version,
            cversion: n.cversion,
            ephemeral_owner: n.owner,
            data_length: len_u64(n.data.len()),
            num_children: len_u64(self.children(path).len()),
            kind: n.kind,
            ttl_ms: n.ttl_ms,
            lock: None,
        }
    }

    /// Each trigger takes its watches off the table (one-shot) and tells
    /// each watcher; a session hears of one (kind, path) once per change.
    fn fire(&mut self, triggers: &[(&str, WatchKind, WatchEventKind)], zxid: Zxid) {
        let mut fired: Vec<(SessionId, WatchEvent)> = Vec::new();
        for &(path, watch, kind) in triggers {
            let hit: Vec<_> = self
                .watches
                .iter()
                .filter(|(_, p, w)| p == path && *w == watch)
                .cloned()
                .collect();
            for target in hit {
                self.watches.remove(&target);
                let event = (
                    target.0,
                    WatchEvent {
                        kind,
                        path: path.to_owned(),
                        zxid,
                    },
                );
                if !fired.contains(&event) {
                    fired.push(event);
                }
            }
        }
        self.events.extend(fired);
    }

    fn insert(&mut self, path: &str, fresh: Fresh, now_ms: u64) {
        let zxid = self.next_zxid();
        self.nodes.insert(
            path.to_owned(),
            ModelNode {
                data: fresh.data,
                kind: fresh.kind,
                ttl_ms: fresh.ttl_ms,
                owner: fresh.owner,
                version: 0,
                cversion: 0,
                next_seq: 0,
                czxid: zxid,
                mzxid: zxid,
                pzxid: zxid,
                ctime_ms: now_ms,
                mtime_ms: now_ms,
            },
        );
        let parent = self
            .nodes
            .get_mut(parent_of(path))
            .expect("the model checks the parent first");
        parent.cversion += 1;
        parent.pzxid = zxid;
        if fresh.sequential {
            parent.next_seq += 1;
        }
        self.fire(
            &[
                (path, WatchKind::Exist, WatchEventKind::NodeCreated),
                (
                    parent_of(path),
                    WatchKind::Child,
                    WatchEventKind::NodeChildrenChanged,
                ),
            ],
            zxid,
        );
    }

    fn remove(&mut self, path: &str) {
        let zxid = self.next_zxid();
        self.nodes.remove(path);
        let parent = self
            .nodes
            .get_mut(parent_of(path))
            .expect("a node's parent outlives it");
        parent.cversion += 1;
        parent.pzxid = zxid;
        self.fire(
            &[
                (path, WatchKind::Data, WatchEventKind::NodeDeleted),
                (path, WatchKind::Child, WatchEventKind::NodeDeleted),
                (
                    parent_of(path),
                    WatchKind::Child,
                    WatchEventKind::NodeChildrenChanged,
                ),
            ],
            zxid,
        );
    }

    /// A set or a touch: one more version, and the data watches fire.
    fn modify(&mut self, path: &str, now_ms: u64, change: impl FnOnce(&mut ModelNode)) {
        let zxid = self.next_zxid();
        let node = self.nodes.get_mut(path).expect("the model checks first");
        change(node);
        node.version += 1;
        node.mzxid = zxid;
        node.mtime_ms = now_ms;
        self.fire(
            &[(path, WatchKind::Data, WatchEventKind::NodeDataChanged)],
            zxid,
        );
    }

    fn open(&mut self, timeout_ms: u64, secret: &Secret, now_ms: u64) -> Answer {
        if self.sessions.len() >= SESSIONS_MAX {
            return Answer::Session(Err(ErrorCode::LimitExceeded));
        }
        let timeout_ms = timeout_ms.clamp(TIMEOUT_MS_MIN, TIMEOUT_MS_MAX);
        let session = SessionId(self.next_zxid().0);
        self.sessions.insert(
            session,
            ModelSession {
                secret: secret.0.clone(),
                timeout_ms,
                last_heard_ms: now_ms,
                last_xid: 0,
            },
        );
        Answer::Session(Ok(SessionGrant {
            session,
            secret: secret.clone(),
            timeout_ms,
            zxid: self.zxid,
            last_xid_applied: Xid(0),
        }))
    }

    /// A resume re-registers nothing: the client sends its watches again.
    fn resume(&mut self, session: SessionId, secret: &Secret, now_ms: u64) -> Answer {
        let zxid = self.zxid;
        let Some(s) = self
            .sessions
            .get_mut(&session)
            .filter(|s| s.secret == secret.0)
        else {
            return Answer::Session(Err(ErrorCode::SessionExpired));
        };
        s.last_heard_ms = now_ms;
        let grant = SessionGrant {
            session,
            secret: secret.clone(),
            timeout_ms: s.timeout_ms,
            zxid,
            last_xid_applied: Xid(s.last_xid),
        };
        self.watches.retain(|(w, _, _)| *w != session);
        Answer::Session(Ok(grant))
    }

    /// Deletes the session's ephemerals, oldest first (its own watches on
    /// them fire too), then forgets its watches; the end itself takes one
    /// more zxid.
    fn end_session(&mut self, session: SessionId, why: SessionEnd) {
        let mut owned: Vec<(Zxid, String)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.owner == Some(session))
            .map(|(p, n)| (n.czxid, p.clone()))
            .collect();
        owned.sort();
        for (_, path) in owned {
            self.remove(&path);
        }
        self.watches.retain(|(w, _, _)| *w != session);
        self.next_zxid();
        self.sessions.remove(&session);
        self.ended.push((session, why));
    }

    /// Expires sessions not heard from for longer than their timeout (in id
    /// order), then removes childless TTL nodes whose TTL has run out since
    /// their last write (earliest deadline first), then containers that had
    /// children and have none (oldest first; a reaped container may empty
    /// its parent, which goes in the same tick).
    fn tick(&mut self, now_ms: u64) -> Answer {
        let due: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| now_ms > s.last_heard_ms + s.timeout_ms)
            .map(|(id, _)| *id)
            .collect();
        for session in due {
            self.end_session(session, SessionEnd::Expired);
        }
        loop {
            let next = self
                .nodes
                .iter()
                .filter_map(|(p, n)| {
                    let deadline_ms = n.mtime_ms + n.ttl_ms?;
                    (deadline_ms <= now_ms && self.children(p).is_empty())
                        .then(|| (deadline_ms, n.czxid, p.clone()))
                })
                .min();
            let Some((_, _, path)) = next else { break };
            self.remove(&path);
            self.ttl_removed += 1;
        }
        loop {
            let next = self
                .nodes
                .iter()
                .filter(|(p, n)| {
                    n.kind == NodeKind::Container && n.cversion > 0 && self.children(p).is_empty()
                })
                .map(|(p, n)| (n.czxid, p.clone()))
                .min();
            let Some((_, path)) = next else { break };
            self.remove(&path);
            self.containers_removed += 1;
        }
        Answer::Ticked
    }

    fn request(&mut self, session: SessionId, xid: Xid, op: &Op, now_ms: u64) -> Answer {
        let result = match self.sessions.get_mut(&session) {
            None => Err((ErrorCode::SessionExpired, None)),
            Some(s) => {
                s.last_heard_ms = now_ms;
                s.last_xid = xid.0;
                self.execute(session, op, now_ms)
            }
        };
        Answer::Reply {
            xid,
            zxid: self.zxid,
            result,
        }
    }

    fn execute(
        &mut self,
        session: SessionId,
        op: &Op,
        now_ms: u64,
    ) -> Result<OpResult, (ErrorCode, Option<u32>)> {
        let alone = |model: &mut Model, step: MultiOp| {
            let mut results = model.write(session, &[step], false, now_ms)?;
            Ok(match results.pop().expect("one step, one result") {
                MultiResult::Created { path, stat } => OpResult::Created { path, stat },
                MultiResult::Stat { stat } => OpResult::Stat { stat },
                MultiResult::Deleted => OpResult::Deleted,
                MultiResult::Checked => unreachable!("no lone check"),
            })
        };
        let no_index = |code| (code, None);
        match op.clone() {
            Op::Create(create) => alone(self, MultiOp::Create(create)),
            Op::Set {
                path,
                data,
                version,
            } => alone(
                self,
                MultiOp::Set {
                    path,
                    data,
                    version,
                },
            ),
            Op::Delete {
                path,
                version,
                czxid,
            } => alone(
                self,
                MultiOp::Delete {
                    path,
                    version,
                    czxid,
                },
            ),
            Op::Touch {
                path,
                ttl_ms,
                czxid,
            } => alone(
                self,
                MultiOp::Touch {
                    path,
                    ttl_ms,
                    czxid,
                },
            ),
            Op::Multi { ops } => self
                .write(session, &ops, true, now_ms)
                .map(|results| OpResult::Multi { results }),
            Op::Get { path, watch } => self.get(session, &path, watch).map_err(no_index),
            Op::Exists { path, watch } => self.exists(session, &path, watch).map_err(no_index),
            Op::Children { path, watch } => {
                self.children_of(session, &path, watch).map_err(no_index)
            }
            Op::Ping { .. } => Ok(OpResult::Pong),
            Op::CloseSession => {
                self.end_session(session, SessionEnd::Closed);
                Ok(OpResult::Done)
            }
            Op::SetWatches { .. } => unreachable!("the generator sends no set_watches"),
        }
    }

    /// Runs the steps on a copy and keeps it only if all of them passed.
    fn write(
        &mut self,
        session: SessionId,
        ops: &[MultiOp],
        in_multi: bool,
        now_ms: u64,
    ) -> Result<Vec<MultiResult>, (ErrorCode, Option<u32>)> {
        let mut copy = self.clone();
        let mut results = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match copy.write_step(session, op, now_ms) {
                Ok(result) => results.push(result),
                Err(code) => {
                    let index = in_multi.then(|| u32::try_from(i).expect("small"));
                    return Err((code, index));
                }
            }
        }
        *self = copy;
        Ok(results)
    }

    fn write_step(
        &mut self,
        session: SessionId,
        op: &MultiOp,
        now_ms: u64,
    ) -> Result<MultiResult, ErrorCode> {
        match op {
            MultiOp::Create(create) => self.create(session, create, now_ms),
            MultiOp::Set {
                path,
                data,
                version,
            } => {
                let node = self.node(path)?;
                if version.is_some_and(|v| v != node.version) {
                    return Err(ErrorCode::BadVersion);
                }
                if data.0.len() > DATA_BYTES_MAX {
                    return Err(ErrorCode::TooLarge);
                }
                self.modify(path, now_ms, |n| n.data = data.0.clone());
                Ok(MultiResult::Stat {
                    stat: self.stat(path),
                })
            }
            MultiOp::Delete {
                path,
                version,
                czxid,
            } => {
                if !canonical(path) {
                    return Err(ErrorCode::InvalidPath);
                }
                if path == "/" {
                    return Err(ErrorCode::InvalidArgument);
                }
                let node = self.node(path)?;
                if czxid.is_some_and(|z| z != node.czxid) {
                    return Err(ErrorCode::BadToken);
                }
                if version.is_some_and(|v| v != node.version) {
                    return Err(ErrorCode::BadVersion);
                }
                if !self.children(path).is_empty() {
                    return Err(ErrorCode::NotEmpty);
                }
                self.remove(path);
                Ok(MultiResult::Deleted)
            }
            MultiOp::Check {
                path,
                version,
                czxid,
            } => {
                let node = self.node(path)?;
                if czxid.is_some_and(|z| z != node.czxid) {
                    return Err(ErrorCode::BadToken);
                }
                if version.is_some_and(|v| v != node.version) {
                    return Err(ErrorCode::BadVersion);
                }
                Ok(MultiResult::Checked)
            }
            MultiOp::Touch {
                path,
                ttl_ms,
                czxid,
            } => {
                if !canonical(path) {
                    return Err(ErrorCode::InvalidPath);
                }
                if *ttl_ms == Some(0) {
                    return Err(ErrorCode::InvalidArgument);
                }
                let node = self.node(path)?;
                if czxid.is_some_and(|z| z != node.czxid) {
                    return Err(ErrorCode::BadToken);
                }
                if node.ttl_ms.is_none() {
                    return Err(ErrorCode::InvalidArgument);
                }
                self.modify(path, now_ms, |n| {
                    if ttl_ms.is_some() {
                        n.ttl_ms = *ttl_ms;
                    }
                });
                Ok(MultiResult::Stat {
                    stat: self.stat(path),
                })
            }
        }
    }

    /// The node at a path that must be canonical and present.
    fn node(&self, path: &str) -> Result<ModelNode, ErrorCode> {
        if !canonical(path) {
            return Err(ErrorCode::InvalidPath);
        }
        self.nodes.get(path).cloned().ok_or(ErrorCode::NoNode)
    }

    /// Argument errors first, then the parent, then the name.
    fn create(
        &mut self,
        session: SessionId,
        create: &Create,
        now_ms: u64,
    ) -> Result<MultiResult, ErrorCode> {
        let Create {
            path,
            data,
            kind,
            sequential,
            ttl_ms,
            make_parents,
            lock,
        } = create;
        assert!(lock.is_none(), "lock nodes are tested in tests_locks.rs");
        if !canonical(path) {
            return Err(ErrorCode::InvalidPath);
        }
        if path == "/" {
            return Err(ErrorCode::NodeExists);
        }
        if (ttl_ms.is_some() && *kind != NodeKind::Persistent)
            || *ttl_ms == Some(0)
            || (*kind == NodeKind::Container && *sequential)
        {
            return Err(ErrorCode::InvalidArgument);
        }
        if data.0.len() > DATA_BYTES_MAX {
            return Err(ErrorCode::TooLarge);
        }
        let parent = parent_of(path);
        if !self.nodes.contains_key(parent) && !make_parents {
            return Err(ErrorCode::NoNode);
        }
        // Every ancestor from the top: the missing ones become containers.
        let mut ancestors = vec![parent];
        while let Some(&top) = ancestors.last().filter(|p| **p != "/") {
            ancestors.push(parent_of(top));
        }
        for ancestor in ancestors.into_iter().rev() {
            match self.nodes.get(ancestor) {
                Some(n) if n.kind == NodeKind::Ephemeral => {
                    return Err(ErrorCode::NoChildrenForEphemerals)
                }
                Some(_) => {}
                None => self.insert(
                    ancestor,
                    Fresh {
                        data: Vec::new(),
                        kind: NodeKind::Container,
                        ttl_ms: None,
                        owner: None,
                        sequential: false,
                    },
                    now_ms,
                ),
            }
        }
        let name = if *sequential {
            format!("{path}{:010}", self.nodes[parent].next_seq)
        } else {
            path.clone()
        };
        if self.nodes.contains_key(&name) {
            return Err(ErrorCode::NodeExists);
        }
        let owner = (*kind == NodeKind::Ephemeral).then_some(session);
        self.insert(
            &name,
            Fresh {
                data: data.0.clone(),
                kind: *kind,
                ttl_ms: *ttl_ms,
                owner,
                sequential: *sequential,
            },
            now_ms,
        );
        let stat = self.stat(&name);
        Ok(MultiResult::Created { path: name, stat })
    }

    fn get(&mut self, session: SessionId, path: &str, watch: bool) -> Result<OpResult, ErrorCode> {
        let node = self.node(path)?;
        if watch {
            self.watches
                .insert((session, path.to_owned(), WatchKind::Data));
        }
        Ok(OpResult::Data {
            data: Data(node.data),
            stat: self.stat(path),
        })
    }

    fn exists(
        &mut self,
        session: SessionId,
        path: &str,
        watch: bool,
    ) -> Result<OpResult, ErrorCode> {
        if !canonical(path) {
            return Err(ErrorCode::InvalidPath);
        }
        let stat = self.nodes.contains_key(path).then(|| self.stat(path));
        if watch {
            let kind = if stat.is_some() {
                WatchKind::Data
            } else {
                WatchKind::Exist
            };
            self.watches.insert((session, path.to_owned(), kind));
        }
        Ok(OpResult::Exists { stat })
    }

    fn children_of(
        &mut self,
        session: SessionId,
        path: &str,
        watch: bool,
    ) -> Result<OpResult, ErrorCode> {
        self.node(path)?;
        if watch {
            self.watches
                .insert((session, path.to_owned(), WatchKind::Child));
        }
        Ok(OpResult::Children {
            children: self.children(path).into_iter().collect(),
            stat: self.stat(path),
        })
    }

    fn apply(&mut self, command: &Command, now_ms: u64) -> Answer {
        self.events.clear();
        self.ended.clear();
        match command {
            Command::OpenSession { timeout_ms, secret } => self.open(*timeout_ms, secret, now_ms),
            Command::ResumeSession {
                session, secret, ..
            } => self.resume(*session, secret, now_ms),
            Command::Request { session, xid, op } => self.request(*session, *xid, op, now_ms),
            Command::Tick => self.tick(now_ms),
        }
    }

    /// Every node with its children, as compared.
    fn tree(&self) -> BTreeMap<String, (ModelNode, BTreeSet<String>)> {
        self.nodes
            .iter()
            .map(|(p, n)| (p.clone(), (n.clone(), self.children(p))))
            .collect()
    }

    /// Session -> (timeout, first instant a tick expires it).
    fn session_table(&self) -> BTreeMap<SessionId, (u64, u64)> {
        self.sessions
            .iter()
            .map(|(id, s)| (*id, (s.timeout_ms, s.last_heard_ms + s.timeout_ms + 1)))
            .collect()
    }

    /// The first instant at which a tick would expire a session or remove
    /// a TTL node (empty containers go at any tick).
    fn next_deadline_ms(&self) -> Option<u64> {
        let sessions = self
            .sessions
            .values()
            .map(|s| s.last_heard_ms + s.timeout_ms + 1);
        let ttls = self.nodes.iter().filter_map(|(p, n)| {
            let deadline_ms = n.mtime_ms + n.ttl_ms?;
            self.children(p).is_empty().then_some(deadline_ms)
        });
        sessions.chain(ttls).min()
    }
}

// ---- observing the coordinator ----

fn real_tree(c: &Coordinator) -> BTreeMap<String, (ModelNode, BTreeSet<String>)> {
    c.tree
        .iter()
        .map(|(_, n)| {
            assert!(n.lock.is_none(), "no lock nodes are made here");
            let node = ModelNode {
                data: n.data.clone(),
                kind: n.kind,
                ttl_ms: n.ttl_ms,
                owner: n.owner,
                version: n.version,
                cversion: n.cversion,
                next_seq: n.next_seq,
                czxid: n.czxid,
                mzxid: n.mzxid,
                pzxid: n.pzxid,
                ctime_ms: n.ctime_ms,
                mtime_ms: n.mtime_ms,
            };
            (n.path.clone(), (node, n.children.clone()))
        })
        .collect()
}

fn real_watches(c: &Coordinator) -> BTreeSet<(SessionId, String, WatchKind)> {
    c.watches
        .iter()
        .map(|(path, kind, session)| (session, path.to_owned(), kind))
        .collect()
}

fn real_sessions(c: &Coordinator) -> BTreeMap<SessionId, (u64, u64)> {
    c.sessions
        .iter()
        .map(|(id, s)| (*id, (s.timeout_ms, s.deadline_ms())))
        .collect()
}

fn real_answer(outcome: Outcome) -> Answer {
    match outcome {
        Outcome::Session(result) => Answer::Session(result.map_err(|e| e.code)),
        Outcome::Reply(reply) => Answer::Reply {
            xid: reply.xid,
            zxid: reply.zxid,
            result: reply.result.map_err(|e| (e.code, e.index)),
        },
        Outcome::Ticked => Answer::Ticked,
    }
}

/// Each session's events of one step, in the order it gets them: the order
/// between sessions is not promised.
fn by_session(events: &[(SessionId, WatchEvent)]) -> BTreeMap<SessionId, Vec<WatchEvent>> {
    let mut each: BTreeMap<SessionId, Vec<WatchEvent>> = BTreeMap::new();
    for (session, event) in events {
        each.entry(*session).or_default().push(event.clone());
    }
    each
}

/// The first entry on which two maps differ.
fn first_difference<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    want: &BTreeMap<K, V>,
    got: &BTreeMap<K, V>,
) -> Option<String> {
    let keys: BTreeSet<&K> = want.keys().chain(got.keys()).collect();
    keys.into_iter().find_map(|k| {
        let (w, g) = (want.get(k), got.get(k));
        (w != g).then(|| format!("at {k:?}: model {w:?}, coordinator {g:?}"))
    })
}

// ---- the generator ----

/// Paths the steps name; sequential creates at `/a/s` and `/s` make the
/// numbered ones, and a plain create of a numbered name takes it first.
const PATHS: [&str; 10] = [
    "/",
    "/a",
    "/b",
    "/a/b",
    "/a/b/c",
    "/a/s",
    "/a/s0000000000",
    "/a/s0000000001",
    "/s",
    "/b/c/d",
];

#[derive(Clone, Debug)]
enum PathPick {
    Fixed(&'static str),
    /// The nth node of the model's tree other than the root (the root
    /// when there is no other), whatever is there.
    Existing(usize),
    /// A name under the nth node of the model's tree.
    Under(usize, &'static str),
    /// The nth node with a TTL (the root when there is none).
    WithTtl(usize),
    /// Not canonical.
    Bad(&'static str),
}

/// A czxid guard: none, the node's own (when it exists), or another.
#[derive(Clone, Copy, Debug)]
enum Token {
    Any,
    Right,
    Wrong,
}

#[derive(Clone, Debug)]
enum Write {
    Create {
        path: PathPick,
        data: Vec<u8>,
        kind: NodeKind,
        sequential: bool,
        ttl_ms: Option<u64>,
        make_parents: bool,
    },
    Set {
        path: PathPick,
        data: Vec<u8>,
        version: Option<u64>,
    },
    Delete {
        path: PathPick,
        version: Option<u64>,
        token: Token,
    },
    Check {
        path: PathPick,
        version: Option<u64>,
        token: Token,
    },
    Touch {
        path: PathPick,
        ttl_ms: Option<u64>,
        token: Token,
    },
}

#[derive(Clone, Copy, Debug)]
enum Read {
    Get,
    Exists,
    Children,
}

#[derive(Clone, Debug)]
enum Request {
    Write(Write),
    Multi(Vec<Write>),
    Read(Read, PathPick, bool),
    Ping,
    Close,
}

/// Which session: usually a live one, sometimes any ever opened.
#[derive(Clone, Copy, Debug)]
struct Who {
    live: bool,
    index: usize,
}

#[derive(Clone, Debug)]
enum Step {
    Open {
        timeout_ms: u64,
    },
    Resume {
        who: Who,
        right_secret: bool,
    },
    Request {
        who: Who,
        request: Request,
    },
    Time {
        advance_ms: u64,
        tick: bool,
    },
    /// The ticker's tick at the model's next deadline, or 1 ms before it.
    Deadline {
        early: bool,
    },
}

fn path_pick() -> impl Strategy<Value = PathPick> {
    prop_oneof![
        6 => prop::sample::select(PATHS.to_vec()).prop_map(PathPick::Fixed),
        8 => (0usize..64).prop_map(PathPick::Existing),
        3 => (0usize..64, prop::sample::select(vec!["x", "s"]))
            .prop_map(|(i, name)| PathPick::Under(i, name)),
        1 => prop::sample::select(vec!["a", "/a/", "/a//b", ""]).prop_map(PathPick::Bad),
    ]
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => prop::collection::vec(0u8..3, 0..=DATA_BYTES_MAX),
        1 => prop::collection::vec(0u8..3, DATA_BYTES_MAX + 1),
    ]
}

fn version() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![2 => Just(None), 1 => (0u64..3).prop_map(Some)]
}

fn token() -> impl Strategy<Value = Token> {
    prop_oneof![6 => Just(Token::Any), 1 => Just(Token::Right), 1 => Just(Token::Wrong)]
}

fn ttl() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![5 => Just(None), 1 => Just(Some(0)), 3 => (1u64..600).prop_map(Some)]
}

/// Where a create goes: mostly a name that may be free.
fn create_path() -> impl Strategy<Value = PathPick> {
    prop_oneof![
        8 => prop::sample::select(PATHS.to_vec()).prop_map(PathPick::Fixed),
        5 => (0usize..64, prop::sample::select(vec!["x", "s"]))
            .prop_map(|(i, name)| PathPick::Under(i, name)),
        1 => path_pick(),
    ]
}

/// What a touch renews: mostly a node that has a TTL.
fn touch_path() -> impl Strategy<Value = PathPick> {
    prop_oneof![3 => (0usize..64).prop_map(PathPick::WithTtl), 1 => path_pick()]
}

/// A kind, and a TTL mostly only where one is allowed.
fn kind_and_ttl() -> impl Strategy<Value = (NodeKind, Option<u64>)> {
    prop_oneof![
        4 => ttl().prop_map(|ttl_ms| (NodeKind::Persistent, ttl_ms)),
        4 => Just((NodeKind::Ephemeral, None)),
        1 => Just((NodeKind::Container, None)),
        1 => (
            prop::sample::select(vec![NodeKind::Ephemeral, NodeKind::Container]),
            1u64..600,
        )
            .prop_map(|(kind, ttl_ms)| (kind, Some(ttl_ms))),
    ]
}

fn write() -> impl Strategy<Value = Write> {
    prop_oneof![
        6 => (
            create_path(),
            data(),
            kind_and_ttl(),
            prop::bool::weighted(0.3),
            prop::bool::weighted(0.6),
        )
            .prop_map(|(path, data, (kind, ttl_ms), sequential, make_parents)| {
                Write::Create { path, data, kind, sequential, ttl_ms, make_parents }
            }),
        3 => (path_pick(), data(), version())
            .prop_map(|(path, data, version)| Write::Set { path, data, version }),
        4 => (path_pick(), version(), token())
            .prop_map(|(path, version, token)| Write::Delete { path, version, token }),
        1 => (path_pick(), version(), token())
            .prop_map(|(path, version, token)| Write::Check { path, version, token }),
        1 => (touch_path(), ttl(), token())
            .prop_map(|(path, ttl_ms, token)| Write::Touch { path, ttl_ms, token }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    let read = prop_oneof![Just(Read::Get), Just(Read::Exists), Just(Read::Children)];
    prop_oneof![
        8 => write().prop_map(Request::Write),
        3 => prop::collection::vec(write(), 0..=3).prop_map(Request::Multi),
        7 => (read, path_pick(), prop::bool::weighted(0.8))
            .prop_map(|(read, path, watch)| Request::Read(read, path, watch)),
        1 => Just(Request::Ping),
        1 => Just(Request::Close),
    ]
}

fn who() -> impl Strategy<Value = Who> {
    (prop::bool::weighted(0.9), 0usize..8).prop_map(|(live, index)| Who { live, index })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => prop::sample::select(vec![50u64, 150, 400, 2_000])
            .prop_map(|timeout_ms| Step::Open { timeout_ms }),
        1 => (who(), prop::bool::weighted(0.8))
            .prop_map(|(who, right_secret)| Step::Resume { who, right_secret }),
        24 => (who(), request()).prop_map(|(who, request)| Step::Request { who, request }),
        // Mostly short moves, so sessions that keep talking live on; now
        // and then one past every timeout.
        4 => (0u64..60, prop::bool::weighted(0.7))
            .prop_map(|(advance_ms, tick)| Step::Time { advance_ms, tick }),
        1 => (100u64..1_200).prop_map(|advance_ms| Step::Time { advance_ms, tick: true }),
        1 => any::<bool>().prop_map(|early| Step::Deadline { early }),
    ]
}

/// Steps in one case.
const STEPS_MAX: usize = 80;

// ---- the driver ----

/// What the generator knows besides the model: every session it opened,
/// with its secret, and each session's next xid.
#[derive(Default)]
struct Clients {
    known: Vec<(SessionId, Secret)>,
    next_xid: BTreeMap<SessionId, u64>,
}

impl Clients {
    fn pick(&self, who: Who, model: &Model) -> Option<(SessionId, Secret)> {
        let live: Vec<&(SessionId, Secret)> = self
            .known
            .iter()
            .filter(|(s, _)| model.sessions.contains_key(s))
            .collect();
        if who.live && !live.is_empty() {
            return Some(live[who.index % live.len()].clone());
        }
        if self.known.is_empty() {
            return None;
        }
        Some(self.known[who.index % self.known.len()].clone())
    }
}

fn nth_node(model: &Model, i: usize) -> &str {
    let below_root = model.nodes.len() - 1;
    if below_root == 0 {
        return "/";
    }
    model
        .nodes
        .keys()
        .filter(|p| p.as_str() != "/")
        .nth(i % below_root)
        .expect("i is below the count")
}

fn resolve_path(pick: &PathPick, model: &Model) -> String {
    match pick {
        PathPick::Fixed(p) | PathPick::Bad(p) => (*p).to_owned(),
        PathPick::Existing(i) => nth_node(model, *i).to_owned(),
        PathPick::WithTtl(i) => {
            let with_ttl: Vec<&String> = model
                .nodes
                .iter()
                .filter(|(_, n)| n.ttl_ms.is_some())
                .map(|(p, _)| p)
                .collect();
            match with_ttl.len() {
                0 => "/".to_owned(),
                n => with_ttl[i % n].clone(),
            }
        }
        PathPick::Under(i, name) => match nth_node(model, *i) {
            "/" => format!("/{name}"),
            parent => format!("{parent}/{name}"),
        },
    }
}

fn resolve_token(token: Token, path: &str, model: &Model) -> Option<Zxid> {
    let czxid = model.nodes.get(path).map_or(Zxid(1), |n| n.czxid);
    match token {
        Token::Any => None,
        Token::Right => Some(czxid),
        Token::Wrong => Some(Zxid(czxid.0 + 1)),
    }
}

fn resolve_write(w: &Write, model: &Model) -> MultiOp {
    match w {
        Write::Create {
            path,
            data,
            kind,
            sequential,
            ttl_ms,
            make_parents,
        } => MultiOp::Create(Create {
            path: resolve_path(path, model),
            data: Data(data.clone()),
            kind: *kind,
            sequential: *sequential,
            ttl_ms: *ttl_ms,
            make_parents: *make_parents,
            lock: None,
        }),
        Write::Set {
            path,
            data,
            version,
        } => MultiOp::Set {
            path: resolve_path(path, model),
            data: Data(data.clone()),
            version: *version,
        },
        Write::Delete {
            path,
            version,
            token,
        } => {
            let path = resolve_path(path, model);
            MultiOp::Delete {
                czxid: resolve_token(*token, &path, model),
                path,
                version: *version,
            }
        }
        Write::Check {
            path,
            version,
            token,
        } => {
            let path = resolve_path(path, model);
            MultiOp::Check {
                czxid: resolve_token(*token, &path, model),
                path,
                version: *version,
            }
        }
        Write::Touch {
            path,
            ttl_ms,
            token,
        } => {
            let path = resolve_path(path, model);
            MultiOp::Touch {
                czxid: resolve_token(*token, &path, model),
                path,
                ttl_ms: *ttl_ms,
            }
        }
    }
}

fn resolve_request(request: &Request, model: &Model) -> Op {
    match request {
        Request::Write(w) => match resolve_write(w, model) {
            MultiOp::Create(create) => Op::Create(create),
            MultiOp::Set {
                path,
                data,
                version,
            } => Op::Set {
                path,
                data,
                version,
            },
            MultiOp::Delete {
                path,
                version,
                czxid,
            } => Op::Delete {
                path,
                version,
                czxid,
            },
            // A lone check is not on the wire: send it as a one-step multi.
            check @ MultiOp::Check { .. } => Op::Multi { ops: vec![check] },
            MultiOp::Touch {
                path,
                ttl_ms,
                czxid,
            } => Op::Touch {
                path,
                ttl_ms,
                czxid,
            },
        },
        Request::Multi(ws) => Op::Multi {
            ops: ws.iter().map(|w| resolve_write(w, model)).collect(),
        },
        Request::Read(read, path, watch) => {
            let path = resolve_path(path, model);
            let watch = *watch;
            match read {
                Read::Get => Op::Get { path, watch },
                Read::Exists => Op::Exists { path, watch },
                Read::Children => Op::Children { path, watch },
            }
        }
        Request::Ping => Op::Ping { ack: Xid(0) },
        Request::Close => Op::CloseSession,
    }
}

/// The command a step sends, if any (a step may only move the clock, or
/// name a session when none was ever opened).
fn resolve(step: &Step, model: &Model, clients: &mut Clients, now_ms: &mut u64) -> Option<Command> {
    match step {
        Step::Open { timeout_ms } => Some(Command::OpenSession {
            timeout_ms: *timeout_ms,
            secret: Secret(format!("secret-{}", clients.known.len())),
        }),
        Step::Resume { who, right_secret } => {
            let (session, secret) = clients.pick(*who, model)?;
            let xid = clients.next_xid.get(&session).copied().unwrap_or(1);
            Some(Command::ResumeSession {
                session,
                secret: if *right_secret {
                    secret
                } else {
                    Secret("wrong".into())
                },
                last_xid_received: Xid(xid - 1),
            })
        }
        // With no session alive, a request step opens one instead, so that
        // runs do not dwindle into requests from dead sessions.
        Step::Request { .. } if model.sessions.is_empty() => Some(Command::OpenSession {
            timeout_ms: TIMEOUT_MS_MAX,
            secret: Secret(format!("secret-{}", clients.known.len())),
        }),
        Step::Request { who, request } => {
            let (session, _) = clients.pick(*who, model)?;
            let next = clients.next_xid.entry(session).or_insert(1);
            let xid = Xid(*next);
            *next += 1;
            Some(Command::Request {
                session,
                xid,
                op: resolve_request(request, model),
            })
        }
        Step::Deadline { early } => {
            if let Some(deadline_ms) = model.next_deadline_ms() {
                *now_ms = (*now_ms).max(deadline_ms - u64::from(*early));
            }
            Some(Command::Tick)
        }
        Step::Time { advance_ms, tick } => {
            *now_ms += advance_ms;
            tick.then_some(Command::Tick)
        }
    }
}

/// How often a run reached each outcome, to show the generator reaches
/// them all.
type Tally = BTreeMap<String, u64>;

/// Applies the steps to a coordinator and to the model; the first
/// disagreement, or what the run reached.
fn run(steps: &[Step]) -> Result<Tally, String> {
    let mut c = Coordinator::new(config(), ZXID_START);
    let mut model = Model::new();
    let mut clients = Clients::default();
    let mut now_ms = 10_000u64;
    let mut tally = Tally::new();
    for (i, step) in steps.iter().enumerate() {
        let Some(command) = resolve(step, &model, &mut clients, &mut now_ms) else {
            continue;
        };
        let fail = |what: String| Err(format!("step {i}, {command:?} at {now_ms} ms: {what}"));
        let output = c.apply(command.clone(), now_ms);
        let want = model.apply(&command, now_ms);
        let got = real_answer(output.outcome);
        if got != want {
            return fail(format!(
                "answer\n  model       {want:?}\n  coordinator {got:?}"
            ));
        }
        if let Answer::Session(Ok(grant)) = &got {
            if !clients.known.iter().any(|(s, _)| *s == grant.session) {
                clients.known.push((grant.session, grant.secret.clone()));
            }
        }
        // Events go out in the order they fired, so their zxids never go back.
        if output.events.windows(2).any(|w| w[0].1.zxid > w[1].1.zxid) {
            return fail(format!("events out of zxid order: {:?}", output.events));
        }
        if let Some(diff) =
            first_difference(&by_session(&model.events), &by_session(&output.events))
        {
            return fail(format!("events differ {diff}"));
        }
        if model.ended != output.ended {
            return fail(format!(
                "ended sessions: model {:?}, coordinator {:?}",
                model.ended, output.ended
            ));
        }
        if let Err(broken) = c.check_invariants() {
            return fail(format!("invariant broken: {broken}"));
        }
        if let Some(diff) = first_difference(&model.tree(), &real_tree(&c)) {
            return fail(format!("tree differs {diff}"));
        }
        let (want_watches, got_watches) = (&model.watches, real_watches(&c));
        if *want_watches != got_watches {
            return fail(format!(
                "watches\n  model       {want_watches:?}\n  coordinator {got_watches:?}"
            ));
        }
        if let Some(diff) = first_difference(&model.session_table(), &real_sessions(&c)) {
            return fail(format!("session table differs {diff}"));
        }
        // The ticker sleeps until the coordinator's next deadline: it must
        // not be later than the first one the model knows of.
        if let Some(due_ms) = model.next_deadline_ms() {
            if c.next_deadline_ms().map_or(true, |at_ms| at_ms > due_ms) {
                return fail(format!(
                    "next deadline: the model has one at {due_ms} ms, the coordinator says {:?}",
                    c.next_deadline_ms()
                ));
            }
        }
        if model.zxid != c.zxid() {
            return fail(format!(
                "zxid: model {}, coordinator {}",
                model.zxid,
                c.zxid()
            ));
        }
        count(&mut tally, &command, &got, &model);
    }
    *tally.entry("ttl nodes removed".into()).or_default() += model.ttl_removed;
    *tally.entry("containers reaped".into()).or_default() += model.containers_removed;
    Ok(tally)
}

fn count(tally: &mut Tally, command: &Command, answer: &Answer, model: &Model) {
    let mut add = |label: &str| *tally.entry(label.to_owned()).or_default() += 1;
    let sequential = matches!(
        command,
        Command::Request {
            op: Op::Create(Create {
                sequential: true,
                ..
            }),
            ..
        }
    );
    match answer {
        Answer::Session(Err(code)) => add(&format!("{code:?}")),
        Answer::Reply {
            result: Err((code, index)),
            ..
        } => {
            add(&format!("{code:?}"));
            if index.is_some_and(|i| i > 0) {
                add("multi failed past its first step");
            }
            if sequential && *code == ErrorCode::NodeExists {
                add("sequential name taken");
            }
        }
        Answer::Reply {
            result: Ok(OpResult::Multi { results }),
            ..
        } if results.len() > 1 => add("multi of several steps"),
        Answer::Reply {
            result: Ok(OpResult::Created { .. }),
            ..
        } if sequential => add("sequential created"),
        _ => {}
    }
    if let (Command::Request { op, .. }, Answer::Reply { result, .. }) = (command, answer) {
        let name = format!("{op:?}");
        let name = name.split([' ', '(', '{']).next().unwrap_or_default();
        match result {
            Ok(_) => add(&format!("{name} ok")),
            Err((code, _)) => add(&format!("{name} {code:?}")),
        }
    }
    for (_, event) in &model.events {
        add(&format!("{:?}", event.kind));
    }
    for (_, why) in &model.ended {
        add(&format!("session {why:?}"));
    }
    if !model.ended.is_empty() && !model.events.is_empty() {
        add("events at a session's end");
    }
}

/// Cases: `LATCHKEY_MODEL_CASES`, or the default.
fn cases() -> u32 {
    match std::env::var("LATCHKEY_MODEL_CASES") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("LATCHKEY_MODEL_CASES={text:?} is not a u32")),
        Err(_) => CASES_DEFAULT,
    }
}

/// About 2 s in a debug build on two cores (`cargo test -p latchkey --lib
/// state::tests_model`).
const CASES_DEFAULT: u32 = 500;

/// Run through proptest's runner rather than `proptest!`, so that the
/// outcomes of all cases can be tallied and checked at the end.
#[test]
fn sessions_watches_and_writes_match_a_reference_model() {
    let cases = cases();
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        source_file: Some(file!()),
        test_name: Some("sessions_watches_and_writes_match_a_reference_model"),
        ..ProptestConfig::default()
    });
    let tally = RefCell::new(Tally::new());
    let strategy = prop::collection::vec(step(), 1..=STEPS_MAX);
    let result = runner.run(&strategy, |steps| {
        let reached = run(&steps).map_err(TestCaseError::fail)?;
        let mut tally = tally.borrow_mut();
        for (label, n) in reached {
            *tally.entry(label).or_default() += n;
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    let tally = tally.into_inner();
    eprintln!("reached over {cases} cases: {tally:?}");
    // A generator that never reaches an outcome proves nothing about it.
    // Checked only at the default count or more: a few cases may miss some.
    if cases >= CASES_DEFAULT {
        let wanted = [
            "NoNode",
            "NodeExists",
            "BadVersion",
            "BadToken",
            "NotEmpty",
            "NoChildrenForEphemerals",
            "InvalidArgument",
            "InvalidPath",
            "TooLarge",
            "LimitExceeded",
            "SessionExpired",
            "NodeCreated",
            "NodeDeleted",
            "NodeDataChanged",
            "NodeChildrenChanged",
            "session Expired",
            "session Closed",
            "events at a session's end",
            "sequential created",
            "sequential name taken",
            "multi of several steps",
            "multi failed past its first step",
            "ttl nodes removed",
            "containers reaped",
        ];
        let missing: Vec<&str> = wanted
            .into_iter()
            .filter(|label| tally.get(*label).copied().unwrap_or(0) < 10)
            .collect();
        assert!(
            missing.is_empty(),
            "reached fewer than 10 times in {cases} cases: {missing:?}"
        );
    }
}

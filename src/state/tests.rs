//! Unit tests of the state machine: every op, every error code, every
//! limit, and the timing rules, driven by choosing `now_ms`.

use std::collections::BTreeMap;

use latchkey_client::protocol::{
    limits, Create, Data, ErrorCode, ErrorReply, MultiOp, MultiResult, NodeKind, Op, OpResult,
    Secret, SessionId, Stat, WatchEvent, WatchEventKind, Xid, Zxid,
};

use super::{
    count, sessions, Command, Config, Coordinator, Outcome, Output, Refusal, SessionEnd,
    SessionGrant,
};

pub(super) const START: Zxid = Zxid(1_000);

/// The case count of a long property test: the environment variable `var`
/// if set, else `default`. A value that is not a count is refused, not
/// ignored.
pub(super) fn cases_from_env(var: &str, default: u32) -> u32 {
    match std::env::var(var) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={text:?} is not a u32")),
        Err(_) => default,
    }
}

/// Runs `check` on `cases` values of `strategy` through proptest's runner
/// (shrinking, and the regressions file of `source_file`) rather than
/// `proptest!`, so that what every case reached can be summed for a
/// coverage check; returns that sum. A failure panics with the shrunk input
/// and the number of the first failing case.
pub(super) fn run_tallied<S: proptest::strategy::Strategy, K: Ord>(
    source_file: &'static str,
    test_name: &'static str,
    cases: u32,
    strategy: &S,
    check: impl Fn(&S::Value) -> Result<BTreeMap<K, u64>, String>,
) -> BTreeMap<K, u64> {
    use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
    use std::cell::RefCell;

    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        source_file: Some(source_file),
        test_name: Some(test_name),
        ..ProptestConfig::default()
    });
    let tally = RefCell::new(BTreeMap::new());
    // Cases run before the first failure (shrinking runs more after it).
    let (ran, first_failure) = (RefCell::new(0u32), RefCell::new(None));
    let result = runner.run(strategy, |value| {
        *ran.borrow_mut() += 1;
        let reached = check(&value).map_err(|why| {
            first_failure.borrow_mut().get_or_insert(*ran.borrow());
            TestCaseError::fail(why)
        })?;
        let mut tally = tally.borrow_mut();
        for (label, n) in reached {
            *tally.entry(label).or_default() += n;
        }
        Ok(())
    });
    if let Err(failure) = result {
        let at = first_failure.borrow().map_or("?".into(), |n| n.to_string());
        panic!("{failure}\n(the first failing case was case {at})");
    }
    tally.into_inner()
}

pub(super) fn config() -> Config {
    Config {
        session_timeout_ms_min: 100,
        session_timeout_ms_max: 60_000,
        data_bytes_max: count(limits::DATA_BYTES_MAX),
        sessions_max: 64,
        nodes_max: 10_000,
        tree_bytes_max: 1 << 30,
        children_per_node_max: 1_000,
        children_page_max: 1_000,
        watches_per_session_max: 1_000,
        watches_max: 10_000,
        reply_cache_bytes_max: 1 << 30,
        lock_delay_ms_default: 500,
        lock_delay_ms_max: 60_000,
        hold_ttl_ms_max: 3_600_000,
        waits_per_session_max: 64,
        step_deletes_max: 1_000,
    }
}

/// A coordinator, a clock, and each session's next xid. Every apply checks
/// the invariants.
pub(super) struct Harness {
    pub(super) c: Coordinator,
    pub(super) now_ms: u64,
    xids: BTreeMap<SessionId, u64>,
    /// Each session's attachment number from its latest grant.
    attach: BTreeMap<SessionId, u64>,
}

impl Harness {
    pub(super) fn new() -> Self {
        Self::with(config())
    }

    pub(super) fn with(config: Config) -> Self {
        Harness {
            c: Coordinator::new(config, START),
            now_ms: 0,
            xids: BTreeMap::new(),
            attach: BTreeMap::new(),
        }
    }

    /// A harness over `c` whose sessions go on from where this one's are
    /// (their latest xids and attachments): `c` restored from a snapshot
    /// of this one's, say.
    pub(super) fn going_on_with(&self, c: Coordinator) -> Harness {
        Harness {
            c,
            now_ms: self.now_ms,
            xids: self.xids.clone(),
            attach: self.attach.clone(),
        }
    }

    /// The latest xid `session` sent.
    pub(super) fn last_xid(&self, session: SessionId) -> Xid {
        Xid(self.xids.get(&session).copied().unwrap_or(0))
    }

    /// `apply`, then `check_invariants`.
    pub(super) fn apply_checked(&mut self, command: Command) -> Output {
        let out = self.c.apply(command.clone(), self.now_ms);
        if let Err(broken) = self.c.check_invariants() {
            panic!("invariant broken after {command:?}: {broken}");
        }
        out
    }

    pub(super) fn open_with(
        &mut self,
        timeout_ms: u64,
        secret: &str,
    ) -> Result<SessionGrant, ErrorReply> {
        let out = self.apply_checked(Command::OpenSession {
            timeout_ms,
            secret: Secret(secret.into()),
        });
        assert!(out.events.is_empty() && out.ended.is_empty());
        match out.outcome {
            Outcome::Session(result) => {
                if let Ok(grant) = &result {
                    self.attach.insert(grant.session, grant.attach);
                }
                result.map_err(|refusal| refusal.to_reply())
            }
            other => panic!("open answered {other:?}"),
        }
    }

    pub(super) fn open(&mut self) -> SessionId {
        self.open_with(10_000, "s3cret").expect("open").session
    }

    pub(super) fn resume(
        &mut self,
        session: SessionId,
        secret: &str,
        last: u64,
    ) -> Result<SessionGrant, ErrorReply> {
        match self
            .apply_checked(Command::ResumeSession {
                session,
                secret: Secret(secret.into()),
                last_xid_received: Xid(last),
            })
            .outcome
        {
            Outcome::Session(result) => {
                if let Ok(grant) = &result {
                    self.attach.insert(grant.session, grant.attach);
                }
                result.map_err(|refusal| refusal.to_reply())
            }
            other => panic!("resume answered {other:?}"),
        }
    }

    /// Sends `op` with the session's next xid.
    pub(super) fn send(&mut self, session: SessionId, op: Op) -> Output {
        let xid = self.xids.entry(session).or_insert(0);
        *xid += 1;
        let xid = Xid(*xid);
        self.send_xid(session, xid, op)
    }

    /// Sends `op` with an explicit xid (a retry, or a jump ahead).
    pub(super) fn send_xid(&mut self, session: SessionId, xid: Xid, op: Op) -> Output {
        let counter = self.xids.entry(session).or_insert(0);
        *counter = (*counter).max(xid.0);
        let attach = self.attach.get(&session).copied().unwrap_or(0);
        let out = self.apply_checked(Command::Request {
            session,
            attach,
            xid,
            op,
        });
        match &out.outcome {
            Outcome::Reply(reply) => {
                assert_eq!(reply.xid, xid);
                assert_eq!(reply.zxid, self.c.zxid());
            }
            other => panic!("request answered {other:?}"),
        }
        out
    }

    pub(super) fn ok(&mut self, session: SessionId, op: Op) -> OpResult {
        result(&self.send(session, op))
            .clone()
            .expect("request should succeed")
    }

    pub(super) fn err(&mut self, session: SessionId, op: Op) -> ErrorReply {
        let zxid = self.c.zxid();
        let nodes = self.c.node_count();
        let bytes = self.c.tree_bytes();
        let out = self.send(session, op);
        assert!(
            out.events.is_empty(),
            "a failed request fired {:?}",
            out.events
        );
        assert_eq!(self.c.zxid(), zxid, "a failed request consumed a zxid");
        assert_eq!(
            self.c.node_count(),
            nodes,
            "a failed request changed the tree"
        );
        assert_eq!(
            self.c.tree_bytes(),
            bytes,
            "a failed request changed the tree's bytes"
        );
        let error = result(&out).clone().expect_err("request should fail");
        assert!(!error.message.is_empty());
        error
    }

    pub(super) fn tick(&mut self, now_ms: u64) -> Output {
        self.now_ms = now_ms;
        let out = self.apply_checked(Command::Tick);
        assert_eq!(out.outcome, Outcome::Ticked);
        out
    }

    pub(super) fn create(&mut self, session: SessionId, path: &str) -> String {
        self.create_with(session, mk(path))
    }

    pub(super) fn create_with(&mut self, session: SessionId, create: Create) -> String {
        match self.ok(session, Op::Create(create)) {
            OpResult::Created { path, .. } => path,
            other => panic!("create answered {other:?}"),
        }
    }

    pub(super) fn stat(&mut self, session: SessionId, path: &str) -> Option<Stat> {
        match self.ok(session, exists(path, false)) {
            OpResult::Exists { stat } => stat,
            other => panic!("exists answered {other:?}"),
        }
    }

    pub(super) fn present(&mut self, session: SessionId, path: &str) -> bool {
        self.stat(session, path).is_some()
    }

    pub(super) fn children(&mut self, session: SessionId, path: &str) -> Vec<String> {
        match self.ok(session, children(path, false)) {
            OpResult::Children { children, .. } => children,
            other => panic!("children answered {other:?}"),
        }
    }
}

/// The reply's result as a client gets it.
pub(super) fn result(out: &Output) -> Result<OpResult, ErrorReply> {
    refused(out).clone().map_err(|refusal| refusal.to_reply())
}

/// The reply's result as the state machine gives it.
pub(super) fn refused(out: &Output) -> &Result<OpResult, Refusal> {
    match &out.outcome {
        Outcome::Reply(reply) => &reply.result,
        other => panic!("not a reply: {other:?}"),
    }
}

pub(super) fn mk(path: &str) -> Create {
    Create {
        path: path.into(),
        ..Create::default()
    }
}

/// A create with `data_bytes` bytes of data.
pub(super) fn sized(path: &str, data_bytes: usize) -> Create {
    Create {
        data: Data(vec![b'x'; data_bytes]),
        ..mk(path)
    }
}

/// A set to `data_bytes` bytes of data.
fn set_sized(path: &str, data_bytes: usize) -> MultiOp {
    MultiOp::Set {
        path: path.into(),
        data: Data(vec![b'x'; data_bytes]),
        version: None,
        czxid: None,
    }
}

pub(super) fn kind(path: &str, kind: NodeKind) -> Create {
    Create { kind, ..mk(path) }
}

pub(super) fn seq(path: &str, kind: NodeKind) -> Create {
    Create {
        sequential: true,
        kind,
        ..mk(path)
    }
}

pub(super) fn create(c: Create) -> Op {
    Op::Create(c)
}

pub(super) fn set(path: &str, data: &str, version: Option<u64>) -> Op {
    Op::Set {
        path: path.into(),
        data: Data::from(data),
        version,
        czxid: None,
    }
}

/// A set of a timed hold with its token.
pub(super) fn set_held(path: &str, data: &str, token: Zxid) -> Op {
    Op::Set {
        path: path.into(),
        data: Data::from(data),
        version: None,
        czxid: Some(token),
    }
}

/// A delete past the owner and token rules.
pub(super) fn force_delete(path: &str) -> Op {
    Op::Delete {
        path: path.into(),
        version: None,
        czxid: None,
        force: true,
    }
}

pub(super) fn delete(path: &str, version: Option<u64>) -> Op {
    Op::Delete {
        path: path.into(),
        version,
        czxid: None,
        force: false,
    }
}

pub(super) fn get(path: &str, watch: bool) -> Op {
    Op::Get {
        path: path.into(),
        watch,
    }
}

pub(super) fn exists(path: &str, watch: bool) -> Op {
    Op::Exists {
        path: path.into(),
        watch,
    }
}

pub(super) fn children(path: &str, watch: bool) -> Op {
    Op::Children {
        path: path.into(),
        watch,
        after: None,
        limit: None,
    }
}

pub(super) fn event(
    session: SessionId,
    kind: WatchEventKind,
    path: &str,
    zxid: Zxid,
) -> (SessionId, WatchEvent) {
    (
        session,
        WatchEvent {
            kind,
            path: path.into(),
            zxid,
        },
    )
}

pub(super) fn next(z: Zxid, by: u64) -> Zxid {
    Zxid(z.0 + by)
}

// ---- the root and the zxid rule ----

#[test]
fn the_root_always_exists_and_cannot_be_created_or_deleted() {
    let mut h = Harness::new();
    assert_eq!(h.c.node_count(), 1);
    assert_eq!(h.c.zxid(), START);
    let s = h.open();
    let stat = h.stat(s, "/").expect("root");
    assert_eq!(stat.czxid, START);
    assert_eq!(stat.kind, NodeKind::Persistent);
    let e = h.err(s, create(mk("/")));
    assert_eq!(e.code, ErrorCode::NodeExists);
    let e = h.err(s, delete("/", None));
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("root"), "{e:?}");
    // The root's data can be set like any node's.
    assert!(matches!(
        h.ok(s, set("/", "x", Some(0))),
        OpResult::Stat { .. }
    ));
}

#[test]
fn every_state_change_takes_exactly_one_zxid() {
    let mut h = Harness::new();
    let s = h.open();
    assert_eq!(
        s,
        SessionId(START.0 + 1),
        "a session id is the zxid of its open"
    );
    assert_eq!(h.c.zxid(), next(START, 1));
    h.create(s, "/a");
    assert_eq!(h.c.zxid(), next(START, 2));
    h.ok(s, set("/a", "x", None));
    assert_eq!(h.c.zxid(), next(START, 3));
    // Reads, pings and set_watches take none.
    h.ok(s, get("/a", true));
    h.ok(s, exists("/b", true));
    h.ok(s, children("/", true));
    h.ok(s, Op::Ping { ack: Xid(0) });
    h.ok(
        s,
        Op::SetWatches {
            last_zxid: h.c.zxid(),
            data: vec![],
            exist: vec![],
            child: vec![],
            lock: vec![],
        },
    );
    assert_eq!(h.c.zxid(), next(START, 3));
    h.ok(s, delete("/a", None));
    assert_eq!(h.c.zxid(), next(START, 4));
    // A resume takes none.
    h.resume(s, "s3cret", 0).expect("resume");
    assert_eq!(h.c.zxid(), next(START, 4));
    // A close with two ephemerals: one per delete, one for the close.
    h.create_with(s, kind("/e1", NodeKind::Ephemeral));
    h.create_with(s, kind("/e2", NodeKind::Ephemeral));
    let before = h.c.zxid();
    h.ok(s, Op::CloseSession);
    assert_eq!(h.c.zxid(), next(before, 3));
}

#[test]
fn create_get_set_delete_keep_stats() {
    let mut h = Harness::new();
    let s = h.open();
    h.now_ms = 500;
    let created = h.ok(
        s,
        create(Create {
            data: Data::from("hello"),
            ..mk("/a")
        }),
    );
    let z = h.c.zxid();
    let OpResult::Created { path, stat } = created else {
        panic!("{created:?}")
    };
    assert_eq!(path, "/a");
    assert_eq!((stat.czxid, stat.mzxid, stat.pzxid), (z, z, z));
    assert_eq!((stat.ctime_ms, stat.mtime_ms), (500, 500));
    assert_eq!((stat.version, stat.cversion, stat.data_length), (0, 0, 5));
    assert_eq!(stat.ephemeral_owner, None);
    let root = h.stat(s, "/").expect("root");
    assert_eq!((root.cversion, root.pzxid, root.num_children), (1, z, 1));

    h.now_ms = 700;
    let OpResult::Stat { stat } = h.ok(s, set("/a", "bye", Some(0))) else {
        panic!()
    };
    let z2 = h.c.zxid();
    assert_eq!(
        (stat.version, stat.mzxid, stat.czxid, stat.mtime_ms),
        (1, z2, z, 700)
    );
    assert_eq!(stat.ctime_ms, 500);
    assert_eq!(stat.data_length, 3);

    let OpResult::Data { data, stat: got } = h.ok(s, get("/a", false)) else {
        panic!()
    };
    assert_eq!(data, Data::from("bye"));
    assert_eq!(got, stat);

    h.create(s, "/a/x");
    h.create(s, "/a/b");
    assert_eq!(h.children(s, "/a"), vec!["b".to_string(), "x".to_string()]);
    let OpResult::Children { stat, .. } = h.ok(s, children("/a", false)) else {
        panic!()
    };
    assert_eq!(
        (stat.num_children, stat.cversion, stat.pzxid),
        (2, 2, h.c.zxid())
    );

    assert_eq!(h.ok(s, delete("/a/x", Some(0))), OpResult::Deleted);
    let a = h.stat(s, "/a").expect("a");
    assert_eq!((a.cversion, a.pzxid, a.num_children), (3, h.c.zxid(), 1));
    assert_eq!(h.ok(s, delete("/a/b", None)), OpResult::Deleted);
    assert_eq!(h.ok(s, delete("/a", None)), OpResult::Deleted);
    assert_eq!(h.c.node_count(), 1);
}

#[test]
fn ephemeral_nodes_are_owned_by_the_creating_session() {
    let mut h = Harness::new();
    let s = h.open();
    h.create_with(s, kind("/e", NodeKind::Ephemeral));
    assert_eq!(h.stat(s, "/e").expect("e").ephemeral_owner, Some(s));
    assert_eq!(h.stat(s, "/e").expect("e").kind, NodeKind::Ephemeral);
}

// ---- error codes ----

#[test]
fn no_node_for_every_op_on_a_missing_path() {
    let mut h = Harness::new();
    let s = h.open();
    let e = h.err(s, create(mk("/a/b")));
    assert_eq!(e.code, ErrorCode::NoNode);
    assert_eq!(
        e.message,
        "no node at /a (create it first, or have missing parents created: make_parents, or \
         --parents on the command line)"
    );
    for op in [
        get("/x", false),
        set("/x", "d", None),
        delete("/x", None),
        children("/x", false),
    ] {
        let e = h.err(s, op.clone());
        assert_eq!(e.code, ErrorCode::NoNode, "{op:?}");
        assert!(e.message.contains("/x"), "{e:?}");
    }
    let e = h.err(
        s,
        Op::Multi {
            ops: vec![MultiOp::Check {
                path: "/x".into(),
                version: Some(0),
                czxid: None,
            }],
        },
    );
    assert_eq!((e.code, e.index), (ErrorCode::NoNode, Some(0)));
    // A get of a missing node sets no watch.
    h.err(s, get("/x", true));
    assert_eq!(h.c.watch_count(s), 0);
}

#[test]
fn node_exists() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/a");
    let e = h.err(s, create(mk("/a")));
    assert_eq!(e.code, ErrorCode::NodeExists);
    assert!(e.message.contains("/a"));
}

#[test]
fn bad_version_on_set_delete_and_check() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/a");
    h.ok(s, set("/a", "1", None));
    h.ok(s, set("/a", "2", None));
    h.ok(s, set("/a", "3", None));
    h.ok(s, set("/a", "4", None));
    h.ok(s, set("/a", "5", None));
    let e = h.err(s, set("/a", "x", Some(3)));
    assert_eq!(e.code, ErrorCode::BadVersion);
    assert_eq!(
        e.message,
        "version mismatch at /a: expected 3, the node is at 5 (read it again and retry)"
    );
    assert_eq!(h.err(s, delete("/a", Some(4))).code, ErrorCode::BadVersion);
    let e = h.err(
        s,
        Op::Multi {
            ops: vec![MultiOp::Check {
                path: "/a".into(),
                version: Some(0),
                czxid: None,
            }],
        },
    );
    assert_eq!((e.code, e.index), (ErrorCode::BadVersion, Some(0)));
    h.ok(s, set("/a", "6", Some(5)));
    h.ok(s, delete("/a", Some(6)));
}

#[test]
fn not_empty() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/a");
    h.create(s, "/a/b");
    let e = h.err(s, delete("/a", None));
    assert_eq!(e.code, ErrorCode::NotEmpty);
    assert!(e.message.contains("/a has 1 children"), "{e:?}");
}

#[test]
fn ephemerals_cannot_have_children() {
    let mut h = Harness::new();
    let s = h.open();
    h.create_with(s, kind("/e", NodeKind::Ephemeral));
    let e = h.err(s, create(mk("/e/c")));
    assert_eq!(e.code, ErrorCode::NoChildrenForEphemerals);
    let e = h.err(
        s,
        create(Create {
            make_parents: true,
            ..mk("/e/x/y")
        }),
    );
    assert_eq!(e.code, ErrorCode::NoChildrenForEphemerals);
    assert!(e.message.contains("/e is ephemeral"), "{e:?}");
}

#[test]
fn non_canonical_paths_are_invalid_for_every_op() {
    let mut h = Harness::new();
    let s = h.open();
    for bad in ["", "a", "/a/", "/a//b", "/a/./b", "/a/../b", "/a\0b"] {
        for op in [
            create(mk(bad)),
            get(bad, false),
            exists(bad, true),
            children(bad, true),
            set(bad, "x", None),
            delete(bad, None),
            Op::SetWatches {
                last_zxid: Zxid(0),
                data: vec!["/ok".into()],
                exist: vec![bad.into()],
                child: vec![],
                lock: vec![],
            },
        ] {
            let e = h.err(s, op.clone());
            assert_eq!(e.code, ErrorCode::InvalidPath, "{bad:?} {op:?}");
        }
    }
    // set_watches registered nothing even for its valid path.
    assert_eq!(h.c.watch_count(s), 0);
}

#[test]
fn too_large_data_multi_and_set_watches() {
    let mut h = Harness::with(Config {
        data_bytes_max: 10,
        ..config()
    });
    let s = h.open();
    let e = h.err(
        s,
        create(Create {
            data: Data(vec![0; 11]),
            ..mk("/a")
        }),
    );
    assert_eq!(e.code, ErrorCode::TooLarge);
    assert_eq!(
        e.message,
        "data is 11 bytes; the limit is 10 (store large values elsewhere and keep a reference here)"
    );
    h.create_with(
        s,
        Create {
            data: Data(vec![0; 10]),
            ..mk("/a")
        },
    );
    assert_eq!(
        h.err(s, set("/a", "01234567890", None)).code,
        ErrorCode::TooLarge
    );

    let ops = vec![
        MultiOp::Check {
            path: "/a".into(),
            version: Some(0),
            czxid: None,
        };
        limits::MULTI_OPS_MAX + 1
    ];
    let e = h.err(s, Op::Multi { ops });
    assert_eq!((e.code, e.index), (ErrorCode::TooLarge, None));
    let ops = vec![
        MultiOp::Check {
            path: "/a".into(),
            version: Some(0),
            czxid: None,
        };
        limits::MULTI_OPS_MAX
    ];
    assert!(matches!(h.ok(s, Op::Multi { ops }), OpResult::Multi { .. }));

    let e = h.err(
        s,
        Op::SetWatches {
            last_zxid: Zxid(0),
            data: vec!["/a".into(); limits::SET_WATCHES_PATHS_MAX],
            exist: vec!["/b".into()],
            child: vec![],
            lock: vec![],
        },
    );
    assert_eq!(e.code, ErrorCode::TooLarge);
}

#[test]
fn invalid_arguments() {
    let mut h = Harness::new();
    let s = h.open();
    for bad in [
        Create {
            ttl_ms: Some(10),
            ..kind("/a", NodeKind::Ephemeral)
        },
        Create {
            ttl_ms: Some(10),
            ..kind("/a", NodeKind::Container)
        },
        Create {
            ttl_ms: Some(0),
            ..mk("/a")
        },
        seq("/a", NodeKind::Container),
    ] {
        let e = h.err(s, create(bad.clone()));
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{bad:?}");
    }
}

#[test]
fn limit_on_sessions() {
    let mut h = Harness::with(Config {
        sessions_max: 2,
        ..config()
    });
    h.open();
    let s2 = h.open();
    let zxid = h.c.zxid();
    let e = h.open_with(1000, "x").expect_err("third session");
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert!(e.message.contains("the limit is 2"), "{e:?}");
    assert_eq!(h.c.zxid(), zxid);
    assert_eq!(h.c.session_count(), 2);
    h.ok(s2, Op::CloseSession);
    h.open();
}

#[test]
fn limit_on_nodes_counts_the_root_and_made_parents() {
    let mut h = Harness::with(Config {
        nodes_max: 3,
        ..config()
    });
    let s = h.open();
    h.create(s, "/a");
    let e = h.err(
        s,
        create(Create {
            make_parents: true,
            ..mk("/b/c")
        }),
    );
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert!(e.message.contains("3 nodes"), "{e:?}");
    h.create(s, "/b");
    assert_eq!(h.err(s, create(mk("/c"))).code, ErrorCode::LimitExceeded);
    h.ok(s, delete("/b", None));
    h.create(s, "/c");
}

#[test]
fn limit_on_tree_bytes_counts_paths_data_and_made_parents() {
    let mut h = Harness::with(Config {
        tree_bytes_max: 20,
        ..config()
    });
    let s = h.open();
    // The root's "/" is the one byte of an empty tree.
    assert_eq!(h.c.tree_bytes(), 1);
    h.create_with(s, sized("/a", 10));
    assert_eq!(h.c.tree_bytes(), 13);
    let e = h.err(s, create(sized("/b", 6)));
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert_eq!(
        e.message,
        "the tree would hold 21 bytes; the limit is 20 (delete nodes you no longer need, or \
         raise --tree-bytes-max)"
    );
    // Exactly at the bound is allowed.
    h.create_with(s, sized("/b", 5));
    assert_eq!(h.c.tree_bytes(), 20);

    // A set counts its new data in place of the old.
    let e = h.err(
        s,
        Op::Multi {
            ops: vec![set_sized("/a", 11)],
        },
    );
    assert_eq!((e.code, e.index), (ErrorCode::LimitExceeded, Some(0)));
    assert!(e.message.contains("would hold 21 bytes"), "{e:?}");
    assert_eq!(
        h.err(s, set("/a", "0123456789a", None)).code,
        ErrorCode::LimitExceeded
    );
    h.ok(s, set("/a", "0123456789", None));
    h.ok(s, set("/a", "", None));
    assert_eq!(h.c.tree_bytes(), 10);

    // Made parents count their paths: /p (2) and /p/q (4) fit, /p/q/r (6)
    // does not.
    let e = h.err(
        s,
        create(Create {
            make_parents: true,
            ..mk("/p/q/r")
        }),
    );
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert!(e.message.contains("would hold 22 bytes"), "{e:?}");
    h.create_with(
        s,
        Create {
            make_parents: true,
            ..mk("/p/q")
        },
    );
    assert_eq!(h.c.tree_bytes(), 16);
}

#[test]
fn a_multi_over_the_tree_bytes_bound_changes_nothing() {
    let mut h = Harness::with(Config {
        tree_bytes_max: 30,
        ..config()
    });
    let s = h.open();
    let w = h.open();
    h.create_with(s, sized("/a", 5));
    h.ok(w, get("/a", true));
    h.ok(w, exists("/b", true));
    let zxid = h.c.zxid();
    let bytes = h.c.tree_bytes();
    assert_eq!(bytes, 8);
    let e = h.err(
        s,
        Op::Multi {
            ops: vec![
                MultiOp::Create(sized("/b", 10)),
                set_sized("/a", 8),
                MultiOp::Create(sized("/c", 6)),
                MultiOp::Check {
                    path: "/a".into(),
                    version: Some(1),
                    czxid: None,
                },
            ],
        },
    );
    // 8, + 12 for /b, + 3 as /a grows = 23; /c would add 8.
    assert_eq!((e.code, e.index), (ErrorCode::LimitExceeded, Some(2)));
    assert!(e.message.contains("would hold 31 bytes"), "{e:?}");
    assert_eq!(h.c.zxid(), zxid);
    assert_eq!(h.c.tree_bytes(), bytes);
    assert!(!h.present(s, "/b"));
    assert_eq!(h.stat(s, "/a").expect("a").data_length, 5);
    // The watches are still armed.
    let out = h.send(s, create(mk("/b")));
    assert_eq!(
        out.events,
        vec![event(w, WatchEventKind::NodeCreated, "/b", h.c.zxid())]
    );
}

#[test]
fn deletes_and_smaller_sets_free_tree_bytes_even_within_a_multi() {
    let mut h = Harness::with(Config {
        tree_bytes_max: 20,
        ..config()
    });
    let s = h.open();
    h.create_with(s, sized("/a", 15));
    assert_eq!(h.c.tree_bytes(), 18);
    assert_eq!(
        h.err(s, create(sized("/b", 1))).code,
        ErrorCode::LimitExceeded
    );
    // Within one multi, a delete frees its path and data for later steps.
    let out = h.ok(
        s,
        Op::Multi {
            ops: vec![
                MultiOp::Delete {
                    path: "/a".into(),
                    version: None,
                    czxid: None,
                },
                MultiOp::Create(sized("/b", 16)),
            ],
        },
    );
    assert!(matches!(out, OpResult::Multi { .. }));
    assert_eq!(h.c.tree_bytes(), 19);
    // And a set that shrinks data frees the difference.
    let out = h.ok(
        s,
        Op::Multi {
            ops: vec![set_sized("/b", 0), MultiOp::Create(sized("/c", 15))],
        },
    );
    assert!(matches!(out, OpResult::Multi { .. }));
    assert_eq!(h.c.tree_bytes(), 20);
    // A lone delete frees its bytes for a later create.
    h.ok(s, delete("/c", None));
    assert_eq!(h.c.tree_bytes(), 3);
    h.create_with(s, sized("/c", 15));
    assert_eq!(h.c.tree_bytes(), 20);
}

#[test]
fn limit_on_children_per_node() {
    let mut h = Harness::with(Config {
        children_per_node_max: 2,
        ..config()
    });
    let s = h.open();
    h.create(s, "/a");
    h.create(s, "/a/1");
    h.create(s, "/a/2");
    let e = h.err(s, create(mk("/a/3")));
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert!(e.message.contains("/a has 2 children"), "{e:?}");
    // The root has one child, so it takes one more.
    h.create(s, "/b");
    assert_eq!(h.err(s, create(mk("/c"))).code, ErrorCode::LimitExceeded);
}

#[test]
fn limit_on_watches_per_session() {
    let mut h = Harness::with(Config {
        watches_per_session_max: 2,
        ..config()
    });
    let s = h.open();
    h.create(s, "/a");
    h.ok(s, get("/a", true));
    h.ok(s, children("/a", true));
    // Setting a watch already held is a no-op, so not over the bound.
    h.ok(s, get("/a", true));
    h.ok(s, exists("/a", true));
    for op in [
        exists("/b", true),
        children("/", true),
        get("/", true),
        Op::SetWatches {
            last_zxid: h.c.zxid(),
            data: vec!["/".into()],
            exist: vec![],
            child: vec![],
            lock: vec![],
        },
    ] {
        let e = h.err(s, op);
        assert_eq!(e.code, ErrorCode::LimitExceeded);
    }
    assert_eq!(h.c.watch_count(s), 2);
    // Reads without a watch still work.
    h.ok(s, get("/", false));
    // A fired watch frees a slot.
    h.ok(s, set("/a", "x", None));
    h.ok(s, exists("/b", true));
}

#[test]
fn limit_on_watches_across_sessions_for_reads_and_set_watches() {
    let mut h = Harness::with(Config {
        watches_max: 3,
        ..config()
    });
    let a = h.open();
    let b = h.open();
    h.create(a, "/x");
    h.ok(a, get("/x", true));
    h.ok(a, children("/x", true));
    h.ok(b, exists("/y", true));
    assert_eq!(h.c.watch_count_total(), 3);
    // Setting a watch already held is a no-op, so not over the bound.
    h.ok(a, get("/x", true));
    let e = h.err(b, get("/x", true));
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert_eq!(
        e.message,
        "all sessions hold 3 watches; the limit is 3 (read without a watch, wait for some to \
         fire, or raise --watches-max)"
    );
    for op in [exists("/z", true), children("/", true)] {
        assert_eq!(h.err(b, op).code, ErrorCode::LimitExceeded);
    }
    let e = h.err(
        b,
        Op::SetWatches {
            last_zxid: h.c.zxid(),
            data: vec!["/x".into()],
            exist: vec!["/y".into()],
            child: vec![],
            lock: vec![],
        },
    );
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert_eq!(
        e.message,
        "all sessions hold 3 watches and set_watches adds 1; the limit is 3 (watch fewer \
         nodes, or raise --watches-max)"
    );
    assert_eq!((h.c.watch_count(b), h.c.watch_count_total()), (1, 3));
    // Watches held already and watches that fire at once add nothing.
    let out = h.send(
        b,
        Op::SetWatches {
            last_zxid: h.c.zxid(),
            data: vec![],
            exist: vec!["/x".into(), "/y".into()],
            child: vec![],
            lock: vec![],
        },
    );
    assert_eq!(result(&out), Ok(OpResult::Done));
    assert_eq!(
        out.events,
        vec![event(b, WatchEventKind::NodeCreated, "/x", h.c.zxid())]
    );
    // Reads without a watch still work.
    h.ok(b, get("/x", false));
    // A fired watch frees room, and so does a resume or a close.
    h.ok(a, set("/x", "v", None));
    assert_eq!(h.c.watch_count_total(), 2);
    h.ok(b, get("/x", true));
    assert_eq!(h.err(b, get("/", true)).code, ErrorCode::LimitExceeded);
    h.resume(b, "s3cret", 0).expect("resume");
    assert_eq!(h.c.watch_count_total(), 1);
    h.ok(a, Op::CloseSession);
    assert_eq!(h.c.watch_count_total(), 0);
}

#[test]
fn limit_on_the_sequence_counter() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/q");
    h.c.tree.set_next_seq_for_test("/q", limits::SEQUENCE_MAX);
    assert_eq!(
        h.create_with(s, seq("/q/n-", NodeKind::Persistent)),
        "/q/n-9999999999"
    );
    let e = h.err(s, create(seq("/q/n-", NodeKind::Persistent)));
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert!(e.message.contains("sequence counter of /q"), "{e:?}");
}

#[test]
fn a_sequential_name_over_the_name_limit_is_an_invalid_path() {
    let mut h = Harness::new();
    let s = h.open();
    let prefix = format!("/{}", "n".repeat(limits::NAME_BYTES_MAX - 5));
    let e = h.err(s, create(seq(&prefix, NodeKind::Persistent)));
    assert_eq!(e.code, ErrorCode::InvalidPath);
}

#[test]
fn unknown_sessions_get_session_expired_and_nothing_else() {
    let mut h = Harness::new();
    let s = h.open();
    let ghost = SessionId(42);
    let out = h.apply_checked(Command::Request {
        session: ghost,
        attach: 0,
        xid: Xid(1),
        op: create(mk("/a")),
    });
    let e = result(&out).clone().expect_err("ghost");
    assert_eq!(e.code, ErrorCode::SessionExpired);
    assert_eq!(
        e.message,
        "session 0x2a has expired or never existed; open a new session"
    );
    assert!(!h.present(s, "/a"));
    let unknown = h.resume(ghost, "s3cret", 0).expect_err("unknown");
    let wrong = h.resume(s, "guess", 0).expect_err("wrong secret");
    assert_eq!(unknown.code, ErrorCode::SessionExpired);
    assert_eq!(wrong.code, ErrorCode::SessionExpired);
    assert_eq!(
        wrong.message.replace(&s.to_string(), "ID"),
        unknown.message.replace(&ghost.to_string(), "ID"),
        "a wrong secret and an unknown session look the same"
    );
}

#[test]
fn timeouts_are_clamped() {
    let mut h = Harness::new();
    assert_eq!(h.open_with(1, "a").expect("open").timeout_ms, 100);
    assert_eq!(h.open_with(u64::MAX, "a").expect("open").timeout_ms, 60_000);
    let g = h.open_with(5_000, "a").expect("open");
    assert_eq!(g.timeout_ms, 5_000);
    assert_eq!(g.zxid, h.c.zxid());
    assert_eq!(g.last_xid_applied, Xid(0));
    assert_eq!(g.secret, Secret("a".into()));
}

// ---- sequential nodes ----

#[test]
fn sequential_names_strictly_increase_and_never_repeat() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/q");
    let mut seen = Vec::new();
    for round in 0..5 {
        let a = h.create_with(s, seq("/q/lock-", NodeKind::Ephemeral));
        let b = h.create_with(s, seq("/q/other-", NodeKind::Persistent));
        seen.push(a.clone());
        seen.push(b.clone());
        if round % 2 == 0 {
            h.ok(s, delete(&a, None));
            h.ok(s, delete(&b, None));
        }
    }
    assert_eq!(seen[0], "/q/lock-0000000000");
    assert_eq!(seen[1], "/q/other-0000000001");
    let counters: Vec<u64> = seen
        .iter()
        .map(|p| p[p.len() - 10..].parse().expect("digits"))
        .collect();
    assert!(counters.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    // A failed sequential create does not consume the counter.
    h.err(
        s,
        create(Create {
            data: Data(vec![0; limits::DATA_BYTES_MAX + 1]),
            ..seq("/q/lock-", NodeKind::Persistent)
        }),
    );
    assert_eq!(
        h.create_with(s, seq("/q/lock-", NodeKind::Persistent)),
        "/q/lock-0000000010"
    );
    // Sequential children of the root work too.
    // Each parent has its own counter.
    assert_eq!(
        h.create_with(s, seq("/r-", NodeKind::Persistent)),
        "/r-0000000000"
    );
}

// ---- multi ----

#[test]
fn a_failing_last_step_leaves_everything_unchanged() {
    let mut h = Harness::new();
    let s = h.open();
    let w = h.open();
    h.create(s, "/q");
    h.create(s, "/keep");
    h.ok(w, children("/q", true));
    h.ok(w, exists("/new", true));
    let zxid = h.c.zxid();
    let nodes = h.c.node_count();
    let before = h.ok(s, children("/q", false));
    let e = h.err(
        s,
        Op::Multi {
            ops: vec![
                MultiOp::Create(seq("/q/n-", NodeKind::Persistent)),
                MultiOp::Create(mk("/new")),
                MultiOp::Set {
                    path: "/keep".into(),
                    data: Data::from("x"),
                    version: None,
                    czxid: None,
                },
                MultiOp::Delete {
                    path: "/keep".into(),
                    version: None,
                    czxid: None,
                },
                MultiOp::Check {
                    path: "/keep".into(),
                    version: Some(0),
                    czxid: None,
                },
            ],
        },
    );
    assert_eq!((e.code, e.index), (ErrorCode::NoNode, Some(4)));
    assert_eq!(h.c.zxid(), zxid);
    assert_eq!(h.c.node_count(), nodes);
    assert_eq!(h.ok(s, children("/q", false)), before);
    assert_eq!(h.stat(s, "/keep").expect("keep").version, 0);
    // The counter was not consumed and the watches are still armed.
    assert_eq!(
        h.create_with(s, seq("/q/n-", NodeKind::Persistent)),
        "/q/n-0000000000"
    );
    let out = h.send(s, create(mk("/new")));
    assert_eq!(
        out.events,
        vec![event(w, WatchEventKind::NodeCreated, "/new", h.c.zxid())]
    );
}

#[test]
fn later_steps_see_earlier_ones() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/old");
    let zxid = h.c.zxid();
    let OpResult::Multi { results } = h.ok(
        s,
        Op::Multi {
            ops: vec![
                MultiOp::Create(mk("/a")),
                MultiOp::Create(mk("/a/b")),
                MultiOp::Set {
                    path: "/a/b".into(),
                    data: Data::from("v1"),
                    version: Some(0),
                    czxid: None,
                },
                MultiOp::Check {
                    path: "/a/b".into(),
                    version: Some(1),
                    czxid: None,
                },
                MultiOp::Create(seq("/a/s-", NodeKind::Persistent)),
                MultiOp::Create(seq("/a/s-", NodeKind::Persistent)),
                MultiOp::Delete {
                    path: "/old".into(),
                    version: Some(0),
                    czxid: None,
                },
                MultiOp::Create(mk("/old")),
            ],
        },
    ) else {
        panic!()
    };
    assert_eq!(
        h.c.zxid(),
        next(zxid, 7),
        "one zxid per write step; the check takes none"
    );
    assert!(
        matches!(&results[0], MultiResult::Created { path, stat } if path == "/a" && stat.czxid == next(zxid, 1))
    );
    assert!(matches!(&results[1], MultiResult::Created { path, .. } if path == "/a/b"));
    assert!(
        matches!(&results[2], MultiResult::Stat { stat } if stat.version == 1 && stat.mzxid == next(zxid, 3))
    );
    assert_eq!(results[3], MultiResult::Checked);
    assert!(matches!(&results[4], MultiResult::Created { path, .. } if path == "/a/s-0000000000"));
    assert!(matches!(&results[5], MultiResult::Created { path, .. } if path == "/a/s-0000000001"));
    assert_eq!(results[6], MultiResult::Deleted);
    assert!(
        matches!(&results[7], MultiResult::Created { stat, .. } if stat.czxid == next(zxid, 7))
    );
    assert_eq!(
        h.children(s, "/a"),
        vec!["b", "s-0000000000", "s-0000000001"]
    );
    // A step that fails only because of an earlier step fails the multi.
    let e = h.err(
        s,
        Op::Multi {
            ops: vec![
                MultiOp::Delete {
                    path: "/old".into(),
                    version: None,
                    czxid: None,
                },
                MultiOp::Set {
                    path: "/old".into(),
                    data: Data::from("x"),
                    version: None,
                    czxid: None,
                },
            ],
        },
    );
    assert_eq!((e.code, e.index), (ErrorCode::NoNode, Some(1)));
    // An empty multi is a no-op.
    let zxid = h.c.zxid();
    assert_eq!(
        h.ok(s, Op::Multi { ops: vec![] }),
        OpResult::Multi { results: vec![] }
    );
    assert_eq!(h.c.zxid(), zxid);
}

// ---- make_parents and containers ----

#[test]
fn make_parents_creates_containers_from_the_top_with_their_own_zxids_and_events() {
    let mut h = Harness::new();
    let s = h.open();
    let w = h.open();
    h.ok(w, children("/", true));
    h.ok(w, exists("/a/b", true));
    let zxid = h.c.zxid();
    let out = h.send(
        s,
        create(Create {
            make_parents: true,
            data: Data::from("leaf"),
            ..mk("/a/b/c")
        }),
    );
    let Ok(OpResult::Created { stat, .. }) = result(&out) else {
        panic!("{out:?}")
    };
    assert_eq!(stat.czxid, next(zxid, 3));
    assert_eq!(
        out.events,
        vec![
            event(w, WatchEventKind::NodeChildrenChanged, "/", next(zxid, 1)),
            event(w, WatchEventKind::NodeCreated, "/a/b", next(zxid, 2)),
        ]
    );
    for (path, z) in [("/a", 1), ("/a/b", 2)] {
        let st = h.stat(s, path).expect("made");
        assert_eq!(
            (st.kind, st.czxid, st.data_length),
            (NodeKind::Container, next(zxid, z), 0)
        );
    }
    // Existing ancestors are kept as they are.
    h.create_with(
        s,
        Create {
            make_parents: true,
            ..mk("/a/x/y")
        },
    );
    assert_eq!(h.stat(s, "/a/x").expect("x").kind, NodeKind::Container);
    assert_eq!(h.c.node_count(), 6);
}

#[test]
fn empty_containers_are_reaped_in_chains_but_fresh_ones_are_kept() {
    let mut h = Harness::new();
    let s = h.open();
    let w = h.open();
    h.create_with(s, kind("/fresh", NodeKind::Container));
    h.create_with(
        s,
        Create {
            make_parents: true,
            kind: NodeKind::Ephemeral,
            ..mk("/c1/c2/c3/lock")
        },
    );
    h.create_with(
        s,
        Create {
            make_parents: true,
            ..mk("/c1/keep/leaf")
        },
    );
    h.tick(1);
    assert_eq!(h.c.node_count(), 8);
    h.ok(w, exists("/c1/c2", true));
    h.ok(s, delete("/c1/c2/c3/lock", None));
    let zxid = h.c.zxid();
    let out = h.tick(2);
    assert!(!h.present(s, "/c1/c2/c3"));
    assert!(!h.present(s, "/c1/c2"));
    // /c1 still has /c1/keep, whose child is persistent; /fresh never had one.
    assert!(h.present(s, "/c1"));
    assert!(h.present(s, "/c1/keep"));
    assert!(h.present(s, "/fresh"));
    assert_eq!(h.c.zxid(), next(zxid, 2));
    assert_eq!(
        out.events,
        vec![event(
            w,
            WatchEventKind::NodeDeleted,
            "/c1/c2",
            next(zxid, 2)
        )]
    );
    h.ok(s, delete("/c1/keep/leaf", None));
    h.tick(3);
    assert!(!h.present(s, "/c1"));
    assert!(h.present(s, "/fresh"));
    assert_eq!(h.c.node_count(), 2);
    // A container that gains a child again before the tick is kept.
    h.create(s, "/fresh/x");
    h.ok(s, delete("/fresh/x", None));
    h.create(s, "/fresh/y");
    h.tick(4);
    assert!(h.present(s, "/fresh"));
}

// ---- TTL ----

#[test]
fn ttl_nodes_expire_exactly_at_their_deadline_and_sets_renew_them() {
    let mut h = Harness::new();
    let s = h.open_with(60_000, "x").expect("open").session;
    h.now_ms = 100;
    h.create_with(
        s,
        Create {
            ttl_ms: Some(1_000),
            ..mk("/hold")
        },
    );
    assert_eq!(h.stat(s, "/hold").expect("hold").ttl_ms, Some(1_000));
    assert_eq!(h.c.next_deadline_ms(), Some(1_100));
    h.tick(1_099);
    assert!(h.present(s, "/hold"));
    h.tick(1_100);
    assert!(!h.present(s, "/hold"));

    h.now_ms = 2_000;
    h.create_with(
        s,
        Create {
            ttl_ms: Some(1_000),
            ..mk("/hold")
        },
    );
    let token = h.stat(s, "/hold").expect("held").czxid;
    h.now_ms = 2_600;
    h.ok(s, set_held("/hold", "renew", token));
    assert_eq!(h.c.next_deadline_ms(), Some(3_600));
    h.tick(3_000);
    assert!(h.present(s, "/hold"));
    h.tick(3_599);
    assert!(h.present(s, "/hold"));
    // With a child it stays past its deadline, and goes once it is empty.
    h.create(s, "/hold/child");
    h.tick(3_700);
    assert!(h.present(s, "/hold"));
    h.ok(s, delete("/hold/child", None));
    h.tick(3_701);
    assert!(!h.present(s, "/hold"));
}

// ---- sessions ----

#[test]
fn sessions_expire_just_after_their_timeout_and_take_their_ephemerals() {
    let mut h = Harness::new();
    let holder = h.open_with(1_000, "h").expect("open").session;
    let watcher = h.open_with(60_000, "w").expect("open").session;
    h.create_with(holder, kind("/lock", NodeKind::Ephemeral));
    h.create_with(holder, kind("/lock2", NodeKind::Ephemeral));
    h.ok(watcher, exists("/lock", true));
    h.ok(watcher, children("/", true));
    assert_eq!(h.c.next_deadline_ms(), Some(1_001));
    h.tick(1_000);
    assert!(h.c.session_alive(holder));
    let zxid = h.c.zxid();
    let out = h.tick(1_001);
    assert!(!h.c.session_alive(holder));
    assert_eq!(out.ended, vec![(holder, SessionEnd::Expired)]);
    assert_eq!(
        out.events,
        vec![
            event(watcher, WatchEventKind::NodeDeleted, "/lock", next(zxid, 1)),
            event(
                watcher,
                WatchEventKind::NodeChildrenChanged,
                "/",
                next(zxid, 1)
            ),
        ]
    );
    assert_eq!(h.c.zxid(), next(zxid, 3));
    assert!(!h.present(watcher, "/lock"));
    assert!(!h.present(watcher, "/lock2"));
    let e = h.err(holder, get("/", false));
    assert_eq!(e.code, ErrorCode::SessionExpired);
}

#[test]
fn any_request_keeps_a_session_alive() {
    let mut h = Harness::new();
    let s = h.open_with(1_000, "x").expect("open").session;
    h.now_ms = 900;
    h.ok(s, Op::Ping { ack: Xid(0) });
    h.tick(1_500);
    assert!(h.c.session_alive(s));
    h.now_ms = 1_900;
    h.ok(s, get("/", false));
    assert_eq!(h.c.next_deadline_ms(), Some(2_901));
    h.tick(2_900);
    assert!(h.c.session_alive(s));
    h.tick(2_901);
    assert!(!h.c.session_alive(s));
    assert_eq!(h.c.next_deadline_ms(), None);
}

#[test]
fn sessions_expire_earliest_deadline_first_then_in_id_order() {
    let mut h = Harness::new();
    let a = h.open_with(2_000, "a").expect("open").session;
    let b = h.open_with(1_000, "b").expect("open").session;
    let c = h.open_with(1_000, "c").expect("open").session;
    let out = h.tick(5_000);
    assert_eq!(
        out.ended,
        vec![
            (b, SessionEnd::Expired),
            (c, SessionEnd::Expired),
            (a, SessionEnd::Expired)
        ]
    );
}

#[test]
fn close_deletes_ephemerals_at_once() {
    let mut h = Harness::new();
    let s = h.open();
    let w = h.open();
    h.create(s, "/q");
    h.create_with(s, seq("/q/lock-", NodeKind::Ephemeral));
    h.create_with(s, seq("/q/lock-", NodeKind::Ephemeral));
    h.ok(w, children("/q", true));
    let zxid = h.c.zxid();
    let out = h.send(s, Op::CloseSession);
    assert_eq!(result(&out), Ok(OpResult::Done));
    assert_eq!(out.ended, vec![(s, SessionEnd::Closed)]);
    assert_eq!(
        out.events,
        vec![event(
            w,
            WatchEventKind::NodeChildrenChanged,
            "/q",
            next(zxid, 1)
        )]
    );
    assert_eq!(h.c.zxid(), next(zxid, 3));
    assert!(h.children(w, "/q").is_empty());
    assert!(!h.c.session_alive(s));
    // Its persistent nodes stay.
    assert!(h.present(w, "/q"));
}

#[test]
fn resume_keeps_nodes_clears_watches_and_needs_the_secret() {
    let mut h = Harness::new();
    let s = h.open_with(1_000, "right").expect("open").session;
    h.create_with(s, kind("/e", NodeKind::Ephemeral));
    h.ok(s, get("/e", true));
    h.ok(s, exists("/nope", true));
    assert_eq!(h.c.watch_count(s), 2);
    let e = h.resume(s, "wrong", 0).expect_err("wrong secret");
    assert_eq!(e.code, ErrorCode::SessionExpired);
    assert_eq!(h.c.watch_count(s), 2, "a failed resume changes nothing");
    h.now_ms = 800;
    let g = h.resume(s, "right", 0).expect("resume");
    assert_eq!(g.session, s);
    assert_eq!(g.last_xid_applied, Xid(3));
    assert_eq!(g.timeout_ms, 1_000);
    assert_eq!(g.zxid, h.c.zxid());
    assert_eq!(h.c.watch_count(s), 0);
    // The resume refreshed the deadline.
    h.tick(1_500);
    assert!(h.c.session_alive(s));
    // A cleared watch no longer fires.
    let other = h.open();
    let out = h.send(other, set("/e", "x", None));
    assert!(out.events.is_empty());
}

// ---- watches ----

#[test]
fn watches_fire_once_with_the_right_kinds() {
    let mut h = Harness::new();
    let s = h.open();
    let w = h.open();
    h.create(s, "/a");
    h.ok(w, get("/a", true));
    let out = h.send(s, set("/a", "1", None));
    assert_eq!(
        out.events,
        vec![event(w, WatchEventKind::NodeDataChanged, "/a", h.c.zxid())]
    );
    let out = h.send(s, set("/a", "2", None));
    assert!(out.events.is_empty(), "one-shot");

    h.ok(w, exists("/b", true));
    let out = h.send(s, create(mk("/b")));
    assert_eq!(
        out.events,
        vec![event(w, WatchEventKind::NodeCreated, "/b", h.c.zxid())]
    );

    h.ok(w, children("/a", true));
    let out = h.send(s, create(mk("/a/x")));
    assert_eq!(
        out.events,
        vec![event(
            w,
            WatchEventKind::NodeChildrenChanged,
            "/a",
            h.c.zxid()
        )]
    );
    h.ok(w, children("/a", true));
    let out = h.send(s, delete("/a/x", None));
    assert_eq!(
        out.events,
        vec![event(
            w,
            WatchEventKind::NodeChildrenChanged,
            "/a",
            h.c.zxid()
        )]
    );

    // Delete fires data and child watches on the node (once per session)
    // and child watches on the parent.
    h.ok(w, exists("/a", true));
    h.ok(w, children("/a", true));
    h.ok(w, children("/", true));
    let out = h.send(s, delete("/a", None));
    let z = h.c.zxid();
    assert_eq!(
        out.events,
        vec![
            event(w, WatchEventKind::NodeDeleted, "/a", z),
            event(w, WatchEventKind::NodeChildrenChanged, "/", z),
        ]
    );
    assert_eq!(h.c.watch_count(w), 0);
    // A set does not fire exist or child watches.
    h.ok(w, children("/b", true));
    let out = h.send(s, set("/b", "x", None));
    assert!(out.events.is_empty());
}

#[test]
fn the_changing_session_gets_its_own_events_and_sessions_go_in_id_order() {
    let mut h = Harness::new();
    let first = h.open();
    let second = h.open();
    let third = h.open();
    h.create(first, "/a");
    for s in [third, first, second] {
        h.ok(s, get("/a", true));
    }
    let out = h.send(second, set("/a", "x", None));
    let z = h.c.zxid();
    assert_eq!(
        out.events,
        vec![
            event(first, WatchEventKind::NodeDataChanged, "/a", z),
            event(second, WatchEventKind::NodeDataChanged, "/a", z),
            event(third, WatchEventKind::NodeDataChanged, "/a", z),
        ]
    );
}

#[test]
fn set_watches_fires_changes_after_last_zxid_and_registers_the_rest() {
    let mut h = Harness::new();
    let s = h.open();
    let w = h.open();
    h.create(s, "/same");
    h.create(s, "/changed");
    h.create(s, "/kids");
    h.create(s, "/quiet");
    h.create(s, "/still");
    let last = h.c.zxid();
    h.ok(s, set("/changed", "x", None));
    h.create(s, "/kids/k");
    h.create(s, "/born");
    let now = h.c.zxid();
    let out = h.send(
        w,
        Op::SetWatches {
            last_zxid: last,
            data: vec!["/same".into(), "/changed".into(), "/gone".into()],
            exist: vec!["/born".into(), "/still/unborn".into()],
            child: vec!["/kids".into(), "/quiet".into(), "/gone".into()],
            lock: vec![],
        },
    );
    assert_eq!(result(&out), Ok(OpResult::Done));
    assert_eq!(
        out.events,
        vec![
            event(w, WatchEventKind::NodeDataChanged, "/changed", now),
            event(w, WatchEventKind::NodeDeleted, "/gone", now),
            event(w, WatchEventKind::NodeCreated, "/born", now),
            event(w, WatchEventKind::NodeChildrenChanged, "/kids", now),
        ]
    );
    assert_eq!(h.c.watch_count(w), 3);
    let out = h.send(s, set("/same", "x", None));
    assert_eq!(out.events.len(), 1);
    let out = h.send(s, create(mk("/still/unborn")));
    assert_eq!(
        out.events,
        vec![event(
            w,
            WatchEventKind::NodeCreated,
            "/still/unborn",
            h.c.zxid()
        )]
    );
    let out = h.send(s, create(mk("/quiet/k")));
    assert_eq!(out.events.len(), 1);
    assert_eq!(h.c.watch_count(w), 0);
}

/// Postmortem: an exist watch on an absent node was re-registered by
/// set_watches whenever the node was absent, so a create and delete while
/// the session was away (the created event lost with the connection) was
/// never reported, and a client waiting for the node waited for good.
#[test]
fn an_exist_watch_fires_on_resume_if_the_node_came_and_went_while_away() {
    let mut h = Harness::new();
    let s = h.open();
    let w = h.open();
    h.create(s, "/p");
    h.create(s, "/gone");
    h.create(s, "/q");
    h.ok(w, exists("/p/x", true));
    h.ok(w, exists("/q/y", true));
    h.ok(w, exists("/gone/x", true));
    h.ok(w, exists("/never", true));
    let last = h.c.zxid();
    // Away: the created event for /p/x goes to a connection that is gone.
    let created = h.send(s, create(mk("/p/x")));
    assert_eq!(
        created.events,
        vec![event(w, WatchEventKind::NodeCreated, "/p/x", h.c.zxid())]
    );
    h.ok(s, delete("/p/x", None));
    h.ok(s, delete("/gone", None));
    h.resume(w, "s3cret", 0).expect("resume");
    let out = h.send(
        w,
        Op::SetWatches {
            last_zxid: last,
            data: vec![],
            exist: vec![
                "/p/x".into(),
                "/gone/x".into(),
                "/never".into(),
                "/q/y".into(),
            ],
            child: vec![],
            lock: vec![],
        },
    );
    let now = h.c.zxid();
    assert_eq!(
        out.events,
        vec![
            event(w, WatchEventKind::NodeCreated, "/p/x", now),
            event(w, WatchEventKind::NodeCreated, "/gone/x", now),
            // The root's children changed too (/gone went): a wake-up the
            // client finds spurious when it looks again, never a lost one.
            event(w, WatchEventKind::NodeCreated, "/never", now),
        ]
    );
    // /q's children did not change since: /q/y cannot have come and gone.
    assert_eq!(h.c.watch_count(w), 1);
    let out = h.send(s, create(mk("/q/y")));
    assert_eq!(
        out.events,
        vec![event(w, WatchEventKind::NodeCreated, "/q/y", h.c.zxid())]
    );
}

// ---- retries ----

#[test]
fn a_retried_sequential_create_returns_the_same_node() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/q");
    let op = create(seq("/q/lock-", NodeKind::Ephemeral));
    let first = h.send_xid(s, Xid(10), op.clone());
    let nodes = h.c.node_count();
    let zxid = h.c.zxid();
    h.resume(s, "s3cret", 0).expect("resume");
    let again = h.send_xid(s, Xid(10), op.clone());
    assert_eq!(result(&again), result(&first));
    assert!(
        matches!(result(&again), Ok(OpResult::Created { path, .. }) if path == "/q/lock-0000000000")
    );
    assert_eq!(h.c.node_count(), nodes);
    assert_eq!(h.c.zxid(), zxid);
    // A cached failure is replayed too.
    let failed = h.send_xid(s, Xid(11), delete("/missing", None));
    h.create(s, "/missing");
    assert_eq!(
        result(&h.send_xid(s, Xid(11), delete("/missing", None))),
        result(&failed)
    );
    assert!(h.present(s, "/missing"));
    // Acknowledged replies are forgotten: then the retry is unknown.
    h.ok(s, Op::Ping { ack: Xid(10) });
    let e = result(&h.send_xid(s, Xid(10), op.clone()))
        .clone()
        .expect_err("acked");
    assert_eq!(e.code, ErrorCode::RetryUnknown);
    assert!(e.message.contains("write 10"), "{e:?}");
    // Xid 11 is still kept; a resume's last_xid_received forgets it.
    assert!(result(&h.send_xid(s, Xid(11), delete("/missing", None))).is_err());
    h.resume(s, "s3cret", 11).expect("resume");
    let e = result(&h.send_xid(s, Xid(11), delete("/missing", None)))
        .clone()
        .expect_err("forgotten");
    assert_eq!(e.code, ErrorCode::RetryUnknown);
    assert!(h.present(s, "/missing"));
    // An old read is simply executed.
    assert!(matches!(
        result(&h.send_xid(s, Xid(1), get("/q", false))),
        Ok(OpResult::Data { .. })
    ));
}

#[test]
fn the_reply_cache_keeps_only_the_inflight_window() {
    let mut h = Harness::new();
    let s = h.open();
    let window = u64::try_from(limits::INFLIGHT_MAX).expect("small");
    for xid in 1..=window + 5 {
        h.send_xid(s, Xid(xid), create(mk(&format!("/n{xid}"))));
    }
    let e = result(&h.send_xid(s, Xid(5), create(mk("/n5"))))
        .clone()
        .expect_err("out of the window");
    assert_eq!(e.code, ErrorCode::RetryUnknown);
    let kept = h.send_xid(s, Xid(6), create(mk("/n6")));
    assert!(matches!(result(&kept), Ok(OpResult::Created { path, .. }) if path == "/n6"));
    assert_eq!(
        h.c.sessions.get(s).expect("live").replies().count(),
        limits::INFLIGHT_MAX
    );
}

/// A directory whose children's paths are near `limits::PATH_BYTES_MAX`:
/// three segments of the longest name, 768 bytes.
fn long_dir() -> String {
    format!(
        "/{}/{}/{}",
        "a".repeat(255),
        "b".repeat(255),
        "c".repeat(255)
    )
}

#[test]
fn the_reply_cache_drops_its_oldest_replies_past_its_byte_bound() {
    let mut h = Harness::new();
    let s = h.open();
    let dir = long_dir();
    h.send_xid(
        s,
        Xid(1),
        create(Create {
            make_parents: true,
            ..mk(&dir)
        }),
    );
    h.send_xid(s, Xid(2), create(mk("/small")));
    // Pin both: the byte bound pushes out pinned replies too.
    h.resume(s, "s3cret", 0).expect("resume");
    // 300 creates and deletes of a 1,019-byte path: ~390 KB a reply, so
    // two fit in the cache and a third does not.
    let leaf = format!("{dir}/{}", "d".repeat(250));
    let ops: Vec<MultiOp> = (0..300)
        .flat_map(|_| {
            [
                MultiOp::Create(mk(&leaf)),
                MultiOp::Delete {
                    path: leaf.clone(),
                    version: None,
                    czxid: None,
                },
            ]
        })
        .collect();
    let mut replies = BTreeMap::new();
    for xid in 3..=5 {
        let out = h.send_xid(s, Xid(xid), Op::Multi { ops: ops.clone() });
        replies.insert(xid, refused(&out).clone());
    }
    let multi_bytes = sessions::reply_bytes(&replies[&5]);
    assert!(2 * multi_bytes < sessions::REPLY_CACHE_BYTES_MAX);
    assert!(3 * multi_bytes > sessions::REPLY_CACHE_BYTES_MAX);
    let session = h.c.sessions.get(s).expect("live");
    let kept: Vec<Xid> = session.replies().map(|cached| cached.xid).collect();
    assert_eq!(kept, vec![Xid(4), Xid(5)]);
    assert_eq!(session.replies_bytes(), 2 * multi_bytes);

    let zxid = h.c.zxid();
    for xid in 1..=3 {
        let out = h.send_xid(s, Xid(xid), create(mk("/again")));
        assert_eq!(
            result(&out).as_ref().expect_err("dropped").code,
            ErrorCode::RetryUnknown,
            "xid {xid}"
        );
    }
    for xid in 4..=5 {
        let out = h.send_xid(s, Xid(xid), Op::Multi { ops: ops.clone() });
        assert_eq!(refused(&out), &replies[&xid], "xid {xid}");
    }
    assert_eq!(h.c.zxid(), zxid, "a retry was applied again");
}

#[test]
fn the_reply_cache_keeps_its_newest_reply_even_past_its_byte_bound() {
    let mut h = Harness::with(Config {
        children_per_node_max: 2_000,
        ..config()
    });
    let s = h.open();
    let dir = long_dir();
    h.create_with(
        s,
        Create {
            make_parents: true,
            ..mk(&dir)
        },
    );
    // 1,024 creates of 969-byte paths: one reply of ~1.1 MB.
    let ops: Vec<MultiOp> = (0..limits::MULTI_OPS_MAX)
        .map(|i| MultiOp::Create(mk(&format!("{dir}/{i:0>200}"))))
        .collect();
    let out = h.send(s, Op::Multi { ops: ops.clone() });
    let reply = refused(&out).clone();
    assert!(reply.is_ok());
    let bytes = sessions::reply_bytes(&reply);
    assert!(bytes > sessions::REPLY_CACHE_BYTES_MAX);
    let session = h.c.sessions.get(s).expect("live");
    let kept: Vec<Xid> = session.replies().map(|cached| cached.xid).collect();
    assert_eq!(kept, vec![Xid(2)]);
    assert_eq!(session.replies_bytes(), bytes);

    let zxid = h.c.zxid();
    assert_eq!(refused(&h.send_xid(s, Xid(2), Op::Multi { ops })), &reply);
    assert_eq!(h.c.zxid(), zxid);
    let out = h.send_xid(s, Xid(1), create(mk("/x")));
    assert_eq!(
        result(&out).as_ref().expect_err("dropped").code,
        ErrorCode::RetryUnknown
    );
    // The next write pushes the big reply out.
    h.create(s, "/y");
    let session = h.c.sessions.get(s).expect("live");
    let kept: Vec<Xid> = session.replies().map(|cached| cached.xid).collect();
    assert_eq!(kept, vec![Xid(3)]);
}

/// The xids of the replies `session` caches, oldest first.
fn cached_xids(h: &Harness, session: SessionId) -> Vec<u64> {
    h.c.sessions
        .get(session)
        .expect("live")
        .replies()
        .map(|cached| cached.xid.0)
        .collect()
}

/// Sends creates of `/{prefix}{i}` with xids `xids` as `session`; returns
/// each reply and the size of one (all have three-byte paths).
fn create_each(
    h: &mut Harness,
    session: SessionId,
    prefix: &str,
    xids: std::ops::RangeInclusive<u64>,
) -> (BTreeMap<u64, Result<OpResult, Refusal>>, u64) {
    let mut replies = BTreeMap::new();
    let mut bytes = 0;
    for xid in xids {
        let out = h.send_xid(session, Xid(xid), create(mk(&format!("/{prefix}{xid}"))));
        bytes = sessions::reply_bytes(refused(&out));
        replies.insert(xid, refused(&out).clone());
    }
    (replies, bytes)
}

/// The size of the reply to one create with a three-byte path.
fn create_reply_bytes() -> u64 {
    let mut h = Harness::new();
    let s = h.open();
    create_each(&mut h, s, "z", 1..=1).1
}

/// Retries `xid` of `session` (a create of `path`) and checks that it was
/// refused with RetryUnknown and nothing was applied.
fn assert_retry_unknown(h: &mut Harness, session: SessionId, xid: u64, path: &str) {
    let (zxid, nodes) = (h.c.zxid(), h.c.node_count());
    let out = h.send_xid(session, Xid(xid), create(mk(path)));
    let e = result(&out).clone().expect_err("dropped");
    assert_eq!(e.code, ErrorCode::RetryUnknown, "xid {xid}: {e:?}");
    assert!(e.message.contains("all sessions' within"), "{e:?}");
    assert_eq!(
        (h.c.zxid(), h.c.node_count()),
        (zxid, nodes),
        "applied again"
    );
}

#[test]
fn all_sessions_cached_replies_stay_within_their_total_budget() {
    let one = create_reply_bytes();
    // Room for ten replies.
    let budget = 10 * one + one / 2;
    let mut h = Harness::with(Config {
        reply_cache_bytes_max: budget,
        ..config()
    });
    let [a, b, c] = [h.open(), h.open(), h.open()];
    let (a_replies, _) = create_each(&mut h, a, "a", 1..=8);
    create_each(&mut h, b, "b", 1..=3);
    // The eleventh reply pushed out the oldest of the largest cache.
    assert_eq!(cached_xids(&h, a), (2..=8).collect::<Vec<_>>());
    assert_eq!(cached_xids(&h, b), vec![1, 2, 3]);
    create_each(&mut h, c, "c", 1..=2);
    assert_eq!(cached_xids(&h, a), (4..=8).collect::<Vec<_>>());
    assert_eq!(cached_xids(&h, c), vec![1, 2]);
    assert_eq!(h.c.reply_cache_bytes(), 10 * one);
    // Once b's cache is the largest, b's oldest go.
    create_each(&mut h, b, "b", 4..=6);
    assert_eq!(cached_xids(&h, a), (5..=8).collect::<Vec<_>>());
    assert_eq!(cached_xids(&h, b), (3..=6).collect::<Vec<_>>());
    assert!(h.c.reply_cache_bytes() <= budget);

    // A retry of a dropped write is not applied again, and says why.
    for xid in 1..=4 {
        assert_retry_unknown(&mut h, a, xid, &format!("/a{xid}"));
    }
    assert_retry_unknown(&mut h, b, 1, "/b1");
    // A kept one is answered from the cache.
    let zxid = h.c.zxid();
    let out = h.send_xid(a, Xid(8), create(mk("/a8")));
    assert_eq!(refused(&out), &a_replies[&8]);
    assert_eq!(h.c.zxid(), zxid);
    // A session's end frees its share.
    h.ok(a, Op::CloseSession);
    assert_eq!(h.c.reply_cache_bytes(), 6 * one);
}

#[test]
fn pinned_replies_stay_while_the_total_budget_drops_unpinned_ones() {
    let one = create_reply_bytes();
    let mut h = Harness::with(Config {
        reply_cache_bytes_max: 10 * one,
        ..config()
    });
    let [a, b] = [h.open(), h.open()];
    let (a_replies, _) = create_each(&mut h, a, "a", 1..=6);
    // a reconnects: its six replies are pinned until it acknowledges them.
    h.resume(a, "s3cret", 0).expect("resume");
    create_each(&mut h, b, "b", 1..=8);
    // a holds the most bytes, but b's unpinned replies went instead.
    assert_eq!(cached_xids(&h, a), (1..=6).collect::<Vec<_>>());
    assert_eq!(cached_xids(&h, b), (5..=8).collect::<Vec<_>>());
    assert_retry_unknown(&mut h, b, 4, "/b4");
    // a's new xids add unpinned replies: b's largest share goes first,
    // then a's oldest unpinned one, never a pinned one.
    create_each(&mut h, a, "n", 7..=9);
    assert_eq!(cached_xids(&h, b), vec![7, 8]);
    assert_eq!(
        cached_xids(&h, a),
        (1..=6).chain([8, 9]).collect::<Vec<_>>()
    );
    let zxid = h.c.zxid();
    for xid in 1..=6 {
        let out = h.send_xid(a, Xid(xid), create(mk(&format!("/a{xid}"))));
        assert_eq!(refused(&out), &a_replies[&xid], "xid {xid}");
    }
    assert_eq!(h.c.zxid(), zxid, "a retry was applied again");
    // The ack releases them.
    h.send_xid(a, Xid(10), Op::Ping { ack: Xid(9) });
    assert_eq!(cached_xids(&h, a), Vec::<u64>::new());
}

#[test]
fn a_reply_larger_than_the_total_budget_is_answered_but_not_kept() {
    let one = create_reply_bytes();
    let mut h = Harness::with(Config {
        reply_cache_bytes_max: one / 2,
        ..config()
    });
    let s = h.open();
    let out = h.send_xid(s, Xid(1), create(mk("/a1")));
    assert!(matches!(result(&out), Ok(OpResult::Created { .. })));
    assert_eq!(h.c.reply_cache_bytes(), 0);
    assert_retry_unknown(&mut h, s, 1, "/a1");
    assert!(h.present(s, "/a1"));
}

#[test]
fn a_read_far_ahead_also_moves_the_cache_window() {
    let mut h = Harness::new();
    let s = h.open();
    h.send_xid(s, Xid(1), create(mk("/a")));
    h.send_xid(s, Xid(2), create(mk("/b")));
    let window = u64::try_from(limits::INFLIGHT_MAX).expect("small");
    // xid - INFLIGHT_MAX = 2: xid 1 and 2 drop out, nothing newer exists.
    h.send_xid(s, Xid(window + 2), get("/", false));
    assert_eq!(h.c.sessions.get(s).expect("live").replies().count(), 0);
    let e = result(&h.send_xid(s, Xid(2), create(mk("/b"))))
        .clone()
        .expect_err("out of the window");
    assert_eq!(e.code, ErrorCode::RetryUnknown);
}

// ---- invariants ----

#[test]
fn the_coordinator_can_be_shared_behind_a_lock() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Coordinator>();
}

#[test]
fn check_invariants_catches_a_broken_state() {
    let mut h = Harness::new();
    let s = h.open();
    h.create_with(s, kind("/e", NodeKind::Ephemeral));
    // Forget the session without deleting its ephemeral.
    h.c.sessions.remove(s);
    let broken = h.c.check_invariants().expect_err("orphan ephemeral");
    assert!(broken.contains("not a live session"), "{broken}");

    let h2 = Harness::new();
    h2.c.check_invariants().expect("fresh");
    let mut h3 = Harness::new();
    h3.c.check_invariants().expect("fresh");
    h3.c.zxid = Zxid(START.0 - 1);
    assert!(h3
        .c
        .check_invariants()
        .expect_err("went back")
        .contains("went back"));
}

/// Postmortem: the client re-registers its watches (new xids) before it
/// retries writes applied before the cut; with a full window of them, the
/// first new xid pushed the oldest reply out and its retry got
/// RetryUnknown, the very orphan the cache exists to prevent.
#[test]
fn a_resume_keeps_every_applied_write_retryable_while_new_xids_arrive() {
    let mut h = Harness::new();
    let s = h.open();
    let window = u64::try_from(limits::INFLIGHT_MAX).expect("small");
    for xid in 1..=window {
        h.send_xid(s, Xid(xid), create(mk(&format!("/n{xid}"))));
    }
    h.resume(s, "s3cret", 0).expect("resume");
    for extra in 1..=3 {
        h.send_xid(
            s,
            Xid(window + extra),
            Op::SetWatches {
                last_zxid: Zxid(0),
                data: vec!["/n1".into()],
                exist: vec![],
                child: vec![],
                lock: vec![],
            },
        );
    }
    for xid in 1..=window {
        let out = h.send_xid(s, Xid(xid), create(mk(&format!("/n{xid}"))));
        assert!(
            matches!(result(&out), Ok(OpResult::Created { path, .. }) if *path == format!("/n{xid}")),
            "retry of xid {xid}: {:?}",
            result(&out)
        );
    }
    // An ack releases them.
    h.send_xid(
        s,
        Xid(window + 4),
        Op::Ping {
            ack: Xid(window + 3),
        },
    );
    let out = h.send_xid(s, Xid(1), create(mk("/n1")));
    assert_eq!(
        result(&out).as_ref().unwrap_err().code,
        ErrorCode::RetryUnknown
    );
}

/// Postmortem: a resume pins every cached reply, and a second resume
/// without an ack in between pinned the first one's again with a window of
/// newer ones: past two windows of replies, which `check_invariants` took
/// for a broken cache, so a server checking invariants aborted on a client
/// that resumes twice with `last_xid_received` 0. The pinned replies are
/// bounded by bytes, like the rest; only the unpinned ones by the window.
#[test]
fn resuming_twice_without_an_ack_keeps_every_reply_and_the_invariants() {
    let mut h = Harness::new();
    let s = h.open();
    let window = u64::try_from(limits::INFLIGHT_MAX).expect("small");
    let (first, _) = create_each(&mut h, s, "a", 1..=window);
    h.resume(s, "s3cret", 0).expect("resume");
    create_each(&mut h, s, "b", window + 1..=2 * window);
    h.resume(s, "s3cret", 0).expect("resume");
    // One more write: three windows of replies, two of them pinned.
    create_each(&mut h, s, "c", 2 * window + 1..=2 * window + 1);
    assert_eq!(cached_xids(&h, s), (1..=2 * window + 1).collect::<Vec<_>>());
    let zxid = h.c.zxid();
    let out = h.send_xid(s, Xid(1), create(mk("/a1")));
    assert_eq!(refused(&out), &first[&1], "the oldest is still answered");
    assert_eq!(h.c.zxid(), zxid, "a retry was applied again");
}

#[test]
fn time_never_goes_back_for_the_state_machine() {
    let mut h = Harness::new();
    let s = h.open();
    h.now_ms = 10_000;
    h.create(s, "/a");
    // A caller whose clock stepped back: the write happens at 10,000.
    h.now_ms = 4_000;
    h.ok(s, set("/a", "x", None));
    let stat = h.stat(s, "/a").expect("present");
    assert_eq!(stat.mtime_ms, 10_000);
    // And the session's deadline did not move back either: a tick at its
    // old deadline from 4,000 does not expire it.
    let out = h.tick(4_000 + 10_001);
    assert!(out.ended.is_empty(), "{:?}", out.ended);
    assert!(h.c.session_alive(s));
    // A tick from a clock behind the state's time still runs at that time:
    // a session due between the two expires.
    let short = h.open_with(100, "short").expect("open").session;
    h.now_ms = 14_500;
    h.ok(s, set("/a", "y", None));
    let out = h.tick(9_000);
    assert_eq!(out.ended, vec![(short, SessionEnd::Expired)]);
}

#[test]
fn a_request_from_an_attachment_the_session_left_is_not_applied() {
    let mut h = Harness::new();
    let s = h.open();
    h.now_ms = 1_000;
    let grant = h.resume(s, "s3cret", 0).expect("resume");
    assert_eq!(grant.attach, 1);
    let (zxid, nodes) = (h.c.zxid(), h.c.node_count());
    // A create still buffered on the first connection arrives late.
    h.now_ms = 5_000;
    let out = h.apply_checked(Command::Request {
        session: s,
        attach: 0,
        xid: Xid(1),
        op: create(mk("/late")),
    });
    assert_eq!(out.outcome, Outcome::Stale);
    assert_eq!((h.c.zxid(), h.c.node_count()), (zxid, nodes));
    // Nor did it count as hearing from the session: its deadline is still
    // a timeout after the resume.
    let out = h.tick(1_000 + 10_001);
    assert_eq!(out.ended, vec![(s, SessionEnd::Expired)]);
}

#[test]
fn the_current_attachment_s_requests_apply_after_a_resume() {
    let mut h = Harness::new();
    let s = h.open();
    h.resume(s, "s3cret", 0).expect("resume");
    h.resume(s, "s3cret", 0).expect("resume again");
    h.create(s, "/now");
    assert!(h.present(s, "/now"));
}

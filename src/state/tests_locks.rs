//! Unit tests of holds and locks: token guards, touch, lock queues and their
//! grants, lock-delay, deadlock refusals and lock watches, driven through
//! the same `Harness` as `tests.rs`.

use latchkey_client::protocol::{
    Create, ErrorCode, MultiOp, MultiResult, Op, OpResult, WatchEventKind, Xid, Zxid,
};

use super::tests::{create, delete, event, get, mk, next, result, set, Harness};

/// A persistent node that expires `ttl_ms` after its last change.
fn ttl(path: &str, ttl_ms: u64) -> Create {
    Create {
        ttl_ms: Some(ttl_ms),
        ..mk(path)
    }
}

fn touch(path: &str, ttl_ms: Option<u64>, czxid: Option<Zxid>) -> Op {
    Op::Touch {
        path: path.into(),
        ttl_ms,
        czxid,
    }
}

fn delete_token(path: &str, czxid: Zxid) -> Op {
    Op::Delete {
        path: path.into(),
        version: None,
        czxid: Some(czxid),
    }
}

fn check(path: &str, version: Option<u64>, czxid: Option<Zxid>) -> MultiOp {
    MultiOp::Check {
        path: path.into(),
        version,
        czxid,
    }
}

// ---- token guards ----

#[test]
fn a_token_guard_names_one_incarnation_of_a_path() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/holds");
    let first = match h.ok(s, create(ttl("/holds/x", 10_000))) {
        OpResult::Created { stat, .. } => stat.czxid,
        other => panic!("create answered {other:?}"),
    };
    // A wrong token fails the delete and names both zxids.
    let e = h.err(s, delete_token("/holds/x", next(first, 99)));
    assert_eq!(e.code, ErrorCode::BadToken);
    assert!(
        e.message
            .contains(&format!("created at zxid {first}, not {}", next(first, 99))),
        "{e:?}"
    );
    // The path is deleted and taken again: the first token no longer works.
    h.ok(s, delete_token("/holds/x", first));
    let second = match h.ok(s, create(ttl("/holds/x", 10_000))) {
        OpResult::Created { stat, .. } => stat.czxid,
        other => panic!("create answered {other:?}"),
    };
    assert!(second > first);
    assert_eq!(
        h.err(s, delete_token("/holds/x", first)).code,
        ErrorCode::BadToken
    );
    assert_eq!(
        h.err(
            s,
            Op::Multi {
                ops: vec![check("/holds/x", None, Some(first))],
            }
        )
        .code,
        ErrorCode::BadToken
    );
    // The token is checked before the version: a stale holder learns that
    // its hold ended, not that it should reread the version.
    let e = h.err(
        s,
        Op::Delete {
            path: "/holds/x".into(),
            version: Some(7),
            czxid: Some(first),
        },
    );
    assert_eq!(e.code, ErrorCode::BadToken);
    // A check with no version checks existence and the token only.
    let out = h.ok(
        s,
        Op::Multi {
            ops: vec![
                check("/holds/x", None, Some(second)),
                check("/holds/x", None, None),
                MultiOp::Set {
                    path: "/holds/x".into(),
                    data: "v".into(),
                    version: None,
                },
                check("/holds/x", Some(1), Some(second)),
            ],
        },
    );
    assert!(
        matches!(out, OpResult::Multi { ref results } if results.len() == 4),
        "{out:?}"
    );
    let e = h.err(
        s,
        Op::Multi {
            ops: vec![check("/holds/missing", None, None)],
        },
    );
    assert_eq!((e.code, e.index), (ErrorCode::NoNode, Some(0)));
    h.ok(s, delete_token("/holds/x", second));
    assert!(!h.present(s, "/holds/x"));
}

#[test]
fn a_check_sees_the_czxid_of_a_node_an_earlier_step_creates() {
    let mut h = Harness::new();
    let s = h.open();
    let zxid = h.c.zxid();
    // Step 0 takes zxid+1, step 1 zxid+2.
    let e = h.err(
        s,
        Op::Multi {
            ops: vec![
                MultiOp::Create(mk("/a")),
                MultiOp::Create(mk("/b")),
                check("/b", Some(0), Some(next(zxid, 1))),
            ],
        },
    );
    assert_eq!((e.code, e.index), (ErrorCode::BadToken, Some(2)));
    h.ok(
        s,
        Op::Multi {
            ops: vec![
                MultiOp::Create(mk("/a")),
                MultiOp::Create(mk("/b")),
                check("/b", Some(0), Some(next(zxid, 2))),
            ],
        },
    );
    assert_eq!(h.stat(s, "/b").expect("b").czxid, next(zxid, 2));
}

// ---- touch ----

#[test]
fn touch_renews_a_ttl_node_like_a_set_and_moves_its_deadline() {
    let mut h = Harness::new();
    let s = h.open_with(60_000, "x").expect("open").session;
    let w = h.open_with(60_000, "y").expect("open").session;
    h.now_ms = 100;
    h.create_with(s, ttl("/hold", 1_000));
    let czxid = h.stat(s, "/hold").expect("hold").czxid;
    h.ok(w, get("/hold", true));
    h.now_ms = 900;
    let out = h.send(s, touch("/hold", None, Some(czxid)));
    let zxid = h.c.zxid();
    assert_eq!(
        out.events,
        vec![event(w, WatchEventKind::NodeDataChanged, "/hold", zxid)]
    );
    let stat = match result(&out) {
        Ok(OpResult::Stat { stat }) => stat.clone(),
        other => panic!("touch answered {other:?}"),
    };
    assert_eq!(
        (stat.version, stat.mzxid, stat.mtime_ms, stat.ttl_ms),
        (1, zxid, 900, Some(1_000))
    );
    assert_eq!(h.c.next_deadline_ms(), Some(1_900));
    h.tick(1_100);
    assert!(h.present(s, "/hold"), "the old deadline no longer applies");
    h.tick(1_899);
    assert!(h.present(s, "/hold"));
    h.tick(1_900);
    assert!(!h.present(s, "/hold"));
}

#[test]
fn touch_with_a_ttl_sets_a_new_ttl() {
    let mut h = Harness::new();
    let s = h.open_with(60_000, "x").expect("open").session;
    h.create_with(s, ttl("/hold", 1_000));
    h.now_ms = 500;
    h.ok(s, touch("/hold", Some(5_000), None));
    assert_eq!(h.stat(s, "/hold").expect("hold").ttl_ms, Some(5_000));
    assert_eq!(h.c.next_deadline_ms(), Some(5_500));
    h.tick(5_499);
    assert!(h.present(s, "/hold"));
    h.tick(5_500);
    assert!(!h.present(s, "/hold"));
}

#[test]
fn touch_in_a_multi_answers_a_stat_and_fails_all_or_nothing() {
    let mut h = Harness::new();
    let s = h.open_with(60_000, "x").expect("open").session;
    h.create_with(s, ttl("/a", 1_000));
    h.create_with(s, ttl("/b", 1_000));
    let b = h.stat(s, "/b").expect("b").czxid;
    let e = h.err(
        s,
        Op::Multi {
            ops: vec![
                MultiOp::Touch {
                    path: "/a".into(),
                    ttl_ms: Some(9_000),
                    czxid: None,
                },
                MultiOp::Touch {
                    path: "/b".into(),
                    ttl_ms: None,
                    czxid: Some(next(b, 1)),
                },
            ],
        },
    );
    assert_eq!((e.code, e.index), (ErrorCode::BadToken, Some(1)));
    assert_eq!(h.stat(s, "/a").expect("a").ttl_ms, Some(1_000));
    h.now_ms = 10;
    let out = h.ok(
        s,
        Op::Multi {
            ops: vec![
                MultiOp::Touch {
                    path: "/a".into(),
                    ttl_ms: Some(9_000),
                    czxid: None,
                },
                // A later step sees the touch's version.
                check("/a", Some(1), None),
                MultiOp::Touch {
                    path: "/b".into(),
                    ttl_ms: None,
                    czxid: Some(b),
                },
            ],
        },
    );
    let OpResult::Multi { results } = out else {
        panic!("multi answered {out:?}");
    };
    assert!(
        matches!(&results[0], MultiResult::Stat { stat } if stat.ttl_ms == Some(9_000) && stat.version == 1)
    );
    assert_eq!(results[1], MultiResult::Checked);
    assert!(matches!(&results[2], MultiResult::Stat { stat } if stat.mtime_ms == 10));
    assert_eq!(h.c.next_deadline_ms(), Some(1_010));
}

#[test]
fn touch_refuses_nodes_without_a_ttl_a_zero_ttl_and_missing_nodes() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/plain");
    h.create_with(s, ttl("/hold", 1_000));
    let e = h.err(s, touch("/plain", None, None));
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("no TTL"), "{e:?}");
    let e = h.err(s, touch("/hold", Some(0), None));
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("TTL of 0"), "{e:?}");
    assert_eq!(h.err(s, touch("/gone", None, None)).code, ErrorCode::NoNode);
    assert_eq!(
        h.err(s, touch("gone", None, None)).code,
        ErrorCode::InvalidPath
    );
}

#[test]
fn a_retried_touch_is_answered_from_the_reply_cache() {
    let mut h = Harness::new();
    let s = h.open();
    h.create_with(s, ttl("/hold", 1_000));
    let first = h.send_xid(s, Xid(10), touch("/hold", None, None));
    let zxid = h.c.zxid();
    let again = h.send_xid(s, Xid(10), touch("/hold", None, None));
    assert_eq!(result(&again), result(&first));
    assert_eq!(h.c.zxid(), zxid, "a retried touch is not applied twice");
    assert_eq!(h.stat(s, "/hold").expect("hold").version, 1);
    // Sets are unaffected by the touch's bookkeeping.
    h.ok(s, set("/hold", "x", Some(1)));
    h.ok(s, delete("/hold", Some(2)));
}

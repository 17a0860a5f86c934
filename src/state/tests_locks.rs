//! Unit tests of holds and locks: token guards, touch, lock queues and their
//! grants, lock-delay, deadlock refusals and lock watches, driven through
//! the same `Harness` as `tests.rs`.

use latchkey_client::protocol::{
    limits, Create, ErrorCode, Grant, LockInfo, LockMode, LockSpec, MultiOp, MultiResult, NodeKind,
    Op, OpResult, SessionId, Stat, WaitEdge, WatchEventKind, Xid, Zxid,
};

use super::tests::{
    create, delete, event, force_delete, get, mk, next, result, seq, set, set_held, Harness,
};

const EXCLUSIVE: LockMode = LockMode::Exclusive;
const SHARED: LockMode = LockMode::Shared;

/// A lock node create: ephemeral, sequential, `mode`, the default delay.
fn lock(prefix: &str, mode: LockMode) -> Create {
    lock_delay(prefix, mode, None)
}

fn lock_delay(prefix: &str, mode: LockMode, delay_ms: Option<u64>) -> Create {
    Create {
        lock: Some(LockSpec { mode, delay_ms }),
        make_parents: true,
        ..seq(prefix, NodeKind::Ephemeral)
    }
}

impl Harness {
    /// Creates a lock node; returns its path and the create's stat.
    fn take(&mut self, session: SessionId, create: Create) -> (String, Stat) {
        match self.ok(session, Op::Create(create)) {
            OpResult::Created { path, stat } => (path, stat),
            other => panic!("create answered {other:?}"),
        }
    }

    /// Takes a lock node in `prefix`'s queue and returns its path and grant.
    fn lock(
        &mut self,
        session: SessionId,
        prefix: &str,
        mode: LockMode,
    ) -> (String, Option<Grant>) {
        let (path, stat) = self.take(session, lock(prefix, mode));
        let info = stat.lock.expect("a lock node's stat has lock info");
        assert_eq!(info.mode, mode);
        (path, info.granted)
    }

    /// The grant of a live lock node.
    fn grant_of(&mut self, session: SessionId, path: &str) -> Option<Grant> {
        self.stat(session, path)
            .expect("live")
            .lock
            .expect("a lock node")
            .granted
    }
}

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
        force: false,
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
            force: false,
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
                    czxid: Some(second),
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
fn a_timed_hold_is_set_renewed_and_deleted_only_with_its_token() {
    let mut h = Harness::new();
    let [buyer, other] = [h.open(), h.open()];
    h.create(buyer, "/holds");
    h.create_with(buyer, ttl("/holds/seat", 10_000));
    let stale = h.stat(buyer, "/holds/seat").expect("held").czxid;
    // An earlier hold of the same name, ended and taken again: its token
    // is stale.
    h.ok(buyer, delete_token("/holds/seat", stale));
    h.create_with(buyer, ttl("/holds/seat", 10_000));
    let token = h.stat(buyer, "/holds/seat").expect("held").czxid;
    let zxid = h.c.zxid();
    // No token, from any session, the taker's own included: refused, and
    // the message names the way with the token.
    for session in [buyer, other] {
        for op in [
            set("/holds/seat", "someone else", None),
            touch("/holds/seat", Some(5_000), None),
            delete("/holds/seat", None),
        ] {
            let e = h.err(session, op.clone());
            assert_eq!(e.code, ErrorCode::TokenRequired, "{op:?}: {e:?}");
            assert!(
                e.message.contains("latchkey extend") && e.message.contains("latchkey release"),
                "{e:?}"
            );
        }
    }
    // A wrong token and the stale one: refused as tokens of another hold.
    for bad in [next(token, 5), stale] {
        assert_eq!(
            h.err(other, set_held("/holds/seat", "x", bad)).code,
            ErrorCode::BadToken
        );
        assert_eq!(
            h.err(other, touch("/holds/seat", None, Some(bad))).code,
            ErrorCode::BadToken
        );
        assert_eq!(
            h.err(other, delete_token("/holds/seat", bad)).code,
            ErrorCode::BadToken
        );
    }
    assert_eq!(h.c.zxid(), zxid, "nothing was written");
    // With the token, any session may: the token is the proof, not the
    // session.
    h.ok(other, set_held("/holds/seat", "buyer-7", token));
    h.ok(other, touch("/holds/seat", Some(20_000), Some(token)));
    let stat = h.stat(other, "/holds/seat").expect("held");
    assert_eq!((stat.version, stat.ttl_ms), (2, Some(20_000)));
    // A forced delete ends it without the token, and says so.
    let out = h.send(other, force_delete("/holds/seat"));
    assert_eq!(result(&out), Ok(OpResult::Deleted));
    assert_eq!(out.forced[0].node, super::ForcedNode::Hold);
    assert!(!h.present(other, "/holds/seat"));
}

#[test]
fn a_hold_s_ttl_is_at_most_the_ceiling_and_deadlines_never_overflow() {
    let mut h = Harness::new();
    let s = h.open();
    let max = super::tests::config().hold_ttl_ms_max;
    h.now_ms = 1_000;
    for (ttl_ms, ok) in [
        (0, false),
        (1, true),
        (max, true),
        (max + 1, false),
        (u64::MAX, false),
    ] {
        let path = format!("/t{ttl_ms}");
        let out = h.send(s, create(ttl(&path, ttl_ms)));
        match result(&out) {
            Ok(_) => assert!(ok, "a TTL of {ttl_ms} ms was accepted"),
            Err(e) => {
                assert!(!ok, "a TTL of {ttl_ms} ms was refused: {e:?}");
                assert_eq!(e.code, ErrorCode::InvalidArgument);
                if ttl_ms > 0 {
                    assert!(
                        e.message.contains(&format!("the limit is {max} ms")),
                        "{e:?}"
                    );
                }
            }
        }
    }
    // A touch that sets a TTL obeys the same ceiling.
    let token = h.stat(s, "/t1").expect("held").czxid;
    for (ttl_ms, code) in [
        (0, Some(ErrorCode::InvalidArgument)),
        (max + 1, Some(ErrorCode::InvalidArgument)),
        (u64::MAX, Some(ErrorCode::InvalidArgument)),
        (max, None),
    ] {
        let out = h.send(s, touch("/t1", Some(ttl_ms), Some(token)));
        assert_eq!(
            result(&out).as_ref().err().map(|e| e.code),
            code,
            "touch with {ttl_ms}"
        );
    }
    assert_eq!(h.stat(s, "/t1").expect("held").ttl_ms, Some(max));
    // The ceiling's deadline: one ms early it stays, then it goes. (The
    // session that took it has long expired by then: a hold outlives it.)
    let deadline = 1_000 + max;
    h.now_ms = deadline - 1;
    h.tick(deadline - 1);
    let later = h.open();
    assert!(h.present(later, "/t1"));
    h.tick(deadline);
    assert!(!h.present(later, "/t1"));
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
    let token = h.stat(s, "/hold").expect("hold").czxid;
    h.now_ms = 500;
    h.ok(s, touch("/hold", Some(5_000), Some(token)));
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
    let a = h.stat(s, "/a").expect("a").czxid;
    let b = h.stat(s, "/b").expect("b").czxid;
    let e = h.err(
        s,
        Op::Multi {
            ops: vec![
                MultiOp::Touch {
                    path: "/a".into(),
                    ttl_ms: Some(9_000),
                    czxid: Some(a),
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
                    czxid: Some(a),
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
    let token = h.stat(s, "/hold").expect("hold").czxid;
    let first = h.send_xid(s, Xid(10), touch("/hold", None, Some(token)));
    let zxid = h.c.zxid();
    let again = h.send_xid(s, Xid(10), touch("/hold", None, Some(token)));
    assert_eq!(result(&again), result(&first));
    assert_eq!(h.c.zxid(), zxid, "a retried touch is not applied twice");
    assert_eq!(h.stat(s, "/hold").expect("hold").version, 1);
    // Sets are unaffected by the touch's bookkeeping.
    h.ok(s, set_held("/hold", "x", token));
    h.ok(
        s,
        Op::Delete {
            path: "/hold".into(),
            version: Some(2),
            czxid: Some(token),
            force: false,
        },
    );
}

// ---- lock nodes and their grants ----

#[test]
fn lock_creates_are_checked_whole_before_anything_changes() {
    let mut h = Harness::new();
    let s = h.open();
    let refused = [
        (
            Create {
                kind: NodeKind::Persistent,
                ..lock("/l/x-", EXCLUSIVE)
            },
            "ephemeral and sequential",
        ),
        (
            Create {
                sequential: false,
                ..lock("/l/x", EXCLUSIVE)
            },
            "ephemeral and sequential",
        ),
        (
            lock("/l/x-", LockMode::Semaphore { permits: 0 }),
            "0 permits",
        ),
        (
            lock_delay("/l/x-", EXCLUSIVE, Some(60_001)),
            "the limit is 60000 ms",
        ),
    ];
    for (c, says) in refused {
        let e = h.err(s, Op::Create(c));
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains(says), "{e:?}");
    }
    let e = h.err(
        s,
        Op::Multi {
            ops: vec![MultiOp::Create(lock("/l/x-", EXCLUSIVE))],
        },
    );
    assert_eq!((e.code, e.index), (ErrorCode::InvalidArgument, Some(0)));
    assert!(e.message.contains("one at a time"), "{e:?}");
    // The bounds themselves pass; no delay takes the default.
    let (_, stat) = h.take(s, lock_delay("/l/x-", EXCLUSIVE, Some(60_000)));
    assert_eq!(stat.lock.expect("lock").delay_ms, 60_000);
    let (_, stat) = h.take(s, lock("/m/x-", LockMode::Semaphore { permits: 1 }));
    assert_eq!(stat.lock.expect("lock").delay_ms, 500);
}

#[test]
fn a_lock_node_reports_its_lock_in_its_stat_and_others_report_none() {
    let mut h = Harness::new();
    let s = h.open();
    h.now_ms = 42;
    let plain = h.create(s, "/plain");
    assert_eq!(h.stat(s, &plain).expect("plain").lock, None);
    let (path, stat) = h.take(s, lock_delay("/l/x-", SHARED, Some(0)));
    let expected = LockInfo {
        mode: SHARED,
        delay_ms: 0,
        granted: Some(Grant {
            token: stat.czxid,
            at_ms: 42,
        }),
        freed_at_ms: None,
    };
    assert_eq!(stat.lock.as_ref(), Some(&expected));
    assert_eq!(h.stat(s, &path).expect("lock").lock, Some(expected));
    assert_eq!(stat.ephemeral_owner, Some(s));
}

#[test]
fn exclusive_locks_pass_one_holder_at_a_time_with_increasing_tokens() {
    let mut h = Harness::new();
    let [a, b, c] = [h.open(), h.open(), h.open()];
    let (pa, ga) = h.lock(a, "/l/x-", EXCLUSIVE);
    let ga = ga.expect("first in the queue is granted at once");
    // A non-lock child of the queue's parent is ignored by the queue.
    h.create_with(a, seq("/l/plain-", NodeKind::Ephemeral));
    let (pb, gb) = h.lock(b, "/l/x-", EXCLUSIVE);
    let (pc, gc) = h.lock(c, "/l/x-", EXCLUSIVE);
    assert_eq!((gb, gc), (None, None));

    let out = h.send(a, delete(&pa, None));
    let release = h.c.zxid();
    assert_eq!(
        out.events,
        vec![event(b, WatchEventKind::LockGranted, &pb, release)],
        "exactly the next node is granted"
    );
    let gb = h.grant_of(b, &pb).expect("granted");
    assert_eq!(gb.token, release);
    assert!(gb.token > ga.token);
    assert_eq!(h.grant_of(c, &pc), None);

    h.now_ms = 7;
    let out = h.send(b, delete(&pb, None));
    let release = h.c.zxid();
    assert_eq!(
        out.events,
        vec![event(c, WatchEventKind::LockGranted, &pc, release)]
    );
    let gc = h.grant_of(c, &pc).expect("granted");
    assert_eq!(
        gc,
        Grant {
            token: release,
            at_ms: 7
        }
    );
    assert!(gc.token > gb.token);
}

#[test]
fn a_release_grants_the_next_run_of_shared_nodes_and_no_further() {
    let mut h = Harness::new();
    let s: Vec<SessionId> = (0..6).map(|_| h.open()).collect();
    let (writer, _) = h.lock(s[0], "/rw/n-", EXCLUSIVE);
    let readers: Vec<String> = (1..4)
        .map(|i| {
            let (p, g) = h.lock(s[i], "/rw/n-", SHARED);
            assert_eq!(g, None, "a reader waits behind a writer");
            p
        })
        .collect();
    let (writer2, _) = h.lock(s[4], "/rw/n-", EXCLUSIVE);
    let (late_reader, g) = h.lock(s[5], "/rw/n-", SHARED);
    assert_eq!(g, None);

    let out = h.send(s[0], delete(&writer, None));
    let release = h.c.zxid();
    let expected: Vec<_> = (1..4)
        .map(|i| event(s[i], WatchEventKind::LockGranted, &readers[i - 1], release))
        .collect();
    assert_eq!(out.events, expected, "the three readers, in queue order");
    assert_eq!(h.grant_of(s[4], &writer2), None);
    assert_eq!(
        h.grant_of(s[5], &late_reader),
        None,
        "a writer is ahead of it"
    );

    for i in 1..3 {
        let out = h.send(s[i], delete(&readers[i - 1], None));
        assert!(
            out.events.is_empty(),
            "a reader is still in: {:?}",
            out.events
        );
    }
    let out = h.send(s[3], delete(&readers[2], None));
    assert_eq!(
        out.events,
        vec![event(
            s[4],
            WatchEventKind::LockGranted,
            &writer2,
            h.c.zxid()
        )]
    );
    let out = h.send(s[4], delete(&writer2, None));
    assert_eq!(
        out.events,
        vec![event(
            s[5],
            WatchEventKind::LockGranted,
            &late_reader,
            h.c.zxid()
        )]
    );
}

#[test]
fn shared_nodes_ahead_of_a_writer_are_granted_together_at_once() {
    let mut h = Harness::new();
    let [a, b, c] = [h.open(), h.open(), h.open()];
    let (_, ga) = h.lock(a, "/rw/n-", SHARED);
    let (_, gb) = h.lock(b, "/rw/n-", SHARED);
    assert!(ga.is_some() && gb.is_some());
    let (_, gc) = h.lock(c, "/rw/n-", EXCLUSIVE);
    assert_eq!(gc, None, "a writer waits for the readers ahead");
}

#[test]
fn a_semaphore_release_grants_exactly_one_waiter() {
    let mut h = Harness::new();
    let s: Vec<SessionId> = (0..5).map(|_| h.open()).collect();
    let three = LockMode::Semaphore { permits: 3 };
    let taken: Vec<(String, Option<Grant>)> =
        (0..5).map(|i| h.lock(s[i], "/pool/p-", three)).collect();
    let granted: Vec<bool> = taken.iter().map(|(_, g)| g.is_some()).collect();
    assert_eq!(granted, [true, true, true, false, false]);

    let out = h.send(s[1], delete(&taken[1].0, None));
    assert_eq!(
        out.events,
        vec![event(
            s[3],
            WatchEventKind::LockGranted,
            &taken[3].0,
            h.c.zxid()
        )]
    );
    assert_eq!(h.grant_of(s[4], &taken[4].0), None);
    // A waiter leaving frees no permit.
    let (p5, g5) = h.lock(s[1], "/pool/p-", three);
    assert_eq!(g5, None);
    let out = h.send(s[4], delete(&taken[4].0, None));
    assert!(out.events.is_empty(), "{:?}", out.events);
    let out = h.send(s[0], delete(&taken[0].0, None));
    assert_eq!(
        out.events,
        vec![event(s[1], WatchEventKind::LockGranted, &p5, h.c.zxid())]
    );
}

#[test]
fn a_waiter_leaving_can_let_the_nodes_behind_it_through() {
    let mut h = Harness::new();
    let [a, b, c] = [h.open(), h.open(), h.open()];
    h.lock(a, "/rw/n-", SHARED);
    let (writer, _) = h.lock(b, "/rw/n-", EXCLUSIVE);
    let (reader, g) = h.lock(c, "/rw/n-", SHARED);
    assert_eq!(g, None);
    // The waiting writer gives up: the reader behind it now qualifies.
    let out = h.send(b, delete(&writer, None));
    assert_eq!(
        out.events,
        vec![event(c, WatchEventKind::LockGranted, &reader, h.c.zxid())]
    );
}

#[test]
fn tokens_increase_across_the_grants_of_two_locks() {
    let mut h = Harness::new();
    let s: Vec<SessionId> = (0..4).map(|_| h.open()).collect();
    let (x1, gx1) = h.lock(s[0], "/locks/x/n-", EXCLUSIVE);
    let (y1, gy1) = h.lock(s[1], "/locks/y/n-", EXCLUSIVE);
    let (x2, _) = h.lock(s[2], "/locks/x/n-", EXCLUSIVE);
    let (y2, _) = h.lock(s[3], "/locks/y/n-", EXCLUSIVE);
    // Creation order is x2 before y2, but y is released first: the tokens
    // follow the grants, not the creates.
    h.ok(s[1], delete(&y1, None));
    h.ok(s[0], delete(&x1, None));
    let tokens = [
        gx1.expect("x1").token,
        gy1.expect("y1").token,
        h.grant_of(s[3], &y2).expect("y2").token,
        h.grant_of(s[2], &x2).expect("x2").token,
    ];
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}

/// The stat of a live node, seen by `session`.
fn lock_info(h: &mut Harness, session: SessionId, path: &str) -> LockInfo {
    h.stat(session, path)
        .expect("live")
        .lock
        .expect("a lock node")
}

#[test]
fn another_session_may_not_delete_set_or_touch_a_lock_node_held_or_waiting() {
    let mut h = Harness::new();
    let [a, b, c] = [h.open(), h.open(), h.open()];
    let (held, _) = h.lock(a, "/l/n-", EXCLUSIVE);
    let (c_holds, _) = h.lock(c, "/v/n-", EXCLUSIVE);
    let (a_waits, g) = h.lock(a, "/v/n-", EXCLUSIVE);
    assert_eq!(g, None);
    let zxid = h.c.zxid();
    for path in [&held, &a_waits] {
        for op in [
            delete(path, None),
            set(path, "mine now", None),
            Op::Touch {
                path: path.clone(),
                ttl_ms: None,
                czxid: None,
            },
        ] {
            let out = h.send(b, op.clone());
            let Err(e) = result(&out) else {
                panic!("{op:?} by another session answered {out:?}");
            };
            assert_eq!(e.code, ErrorCode::NotOwner, "{op:?}: {e:?}");
            assert_eq!(e.owner, Some(a), "the error names the owner");
            assert!(
                e.message.contains(&format!("lock node of session {a}"))
                    && e.message.contains("with force"),
                "{e:?}"
            );
            assert!(out.events.is_empty(), "{:?}", out.events);
        }
    }
    // Inside a multi too, and the multi changes nothing.
    let e = h.err(
        b,
        Op::Multi {
            ops: vec![MultiOp::Create(mk("/other")), delete_step(&held)],
        },
    );
    assert_eq!((e.code, e.index), (ErrorCode::NotOwner, Some(1)));
    assert!(!h.present(b, "/other"));
    assert_eq!(h.c.zxid(), zxid, "nothing was written");
    assert!(lock_info(&mut h, b, &held).granted.is_some());
    // The owner itself may set its node's data and delete it.
    h.ok(a, set(&held, "note", None));
    h.ok(a, delete(&held, None));
    h.ok(c, delete(&c_holds, None));
    assert!(lock_info(&mut h, a, &a_waits).granted.is_some());
}

fn delete_step(path: &str) -> MultiOp {
    MultiOp::Delete {
        path: path.into(),
        version: None,
        czxid: None,
    }
}

#[test]
fn a_forced_delete_of_a_held_lock_tells_the_holder_and_grants_only_after_its_delay() {
    let mut h = Harness::new();
    let [a, b, c] = [h.open(), h.open(), h.open()];
    h.now_ms = 1_000;
    let (held, _) = h.take(a, lock_delay("/l/n-", EXCLUSIVE, Some(300)));
    let (waiting, _) = h.lock(b, "/l/n-", EXCLUSIVE);
    h.ok(a, get(&held, true));
    let out = h.send(c, force_delete(&held));
    let zxid = h.c.zxid();
    // Only the holder hears, at once; the lock is not passed on yet.
    assert_eq!(
        out.events,
        vec![event(a, WatchEventKind::NodeDeleted, &held, zxid)]
    );
    let Ok(OpResult::Zombified { stat }) = result(&out) else {
        panic!("a forced delete of a held lock answered {out:?}");
    };
    assert_eq!(stat.ephemeral_owner, None);
    assert_eq!(stat.lock.as_ref().and_then(|l| l.freed_at_ms), Some(1_300));
    assert_eq!(
        out.forced,
        vec![super::Forced {
            by: c,
            path: held.clone(),
            node: super::ForcedNode::Holder {
                owner: a,
                freed_at_ms: Some(1_300),
            },
        }]
    );
    assert_eq!(lock_info(&mut h, b, &waiting).granted, None);
    assert!(lock_info(&mut h, b, &held).granted.is_some(), "still holds");
    // The holder's own release of what is now a zombie is refused: the
    // delay runs out as it would after its session's end.
    assert_eq!(h.err(a, delete(&held, None)).code, ErrorCode::NotOwner);
    assert_eq!(h.c.next_deadline_ms(), Some(1_300));
    let out = h.tick(1_299);
    assert!(out.events.is_empty(), "{:?}", out.events);
    let out = h.tick(1_300);
    let freed = h.c.zxid();
    assert_eq!(
        out.events,
        vec![
            // a's data watch on its node fires when the node goes.
            event(a, WatchEventKind::NodeDeleted, &held, freed),
            event(b, WatchEventKind::LockGranted, &waiting, freed),
        ]
    );
}

#[test]
fn a_forced_delete_without_a_delay_or_of_a_waiter_goes_at_once_and_tells_the_owner() {
    let mut h = Harness::new();
    let [a, b, c] = [h.open(), h.open(), h.open()];
    let (held, _) = h.take(a, lock_delay("/l/n-", EXCLUSIVE, Some(0)));
    let (waiting, _) = h.lock(b, "/l/n-", EXCLUSIVE);
    let (behind, _) = h.lock(c, "/l/n-", EXCLUSIVE);
    // b's waiting node: b is told, nothing is granted.
    let out = h.send(c, force_delete(&waiting));
    assert_eq!(result(&out), Ok(OpResult::Deleted));
    assert_eq!(
        out.events,
        vec![event(b, WatchEventKind::NodeDeleted, &waiting, h.c.zxid())]
    );
    assert_eq!(
        out.forced[0].node,
        super::ForcedNode::Waiter { owner: b },
        "{:?}",
        out.forced
    );
    // a's held node without a delay: a is told before c is granted.
    let out = h.send(b, force_delete(&held));
    let zxid = h.c.zxid();
    assert_eq!(
        out.events,
        vec![
            event(a, WatchEventKind::NodeDeleted, &held, zxid),
            event(c, WatchEventKind::LockGranted, &behind, zxid),
        ]
    );
    // A forced delete of one's own node is a plain one: nothing is logged.
    let out = h.send(c, force_delete(&behind));
    assert!(out.events.is_empty() && out.forced.is_empty(), "{out:?}");
}

// ---- lock-delay ----

/// Opens a session that expires at the first tick after `timeout_ms`.
fn short_session(h: &mut Harness, timeout_ms: u64) -> SessionId {
    h.open_with(timeout_ms, "short").expect("open").session
}

#[test]
fn an_expired_holder_keeps_its_lock_until_exactly_its_delay_has_passed() {
    let mut h = Harness::new();
    h.now_ms = 1_000;
    let a = short_session(&mut h, 1_000);
    let b = h.open_with(60_000, "long").expect("open").session;
    let watcher = h.open_with(60_000, "w").expect("open").session;
    let (held, _) = h.take(a, lock_delay("/l/n-", EXCLUSIVE, Some(300)));
    let (waiting, _) = h.take(b, lock_delay("/l/n-", EXCLUSIVE, Some(300)));
    h.ok(watcher, get(&held, true));
    // a was last heard at 1_000 with a 1_000 ms timeout: it expires at 2_001.
    let out = h.tick(2_001);
    assert!(!h.c.session_alive(a));
    assert!(out.events.is_empty(), "{:?}", out.events);
    let stat = h.stat(b, &held).expect("the zombie is still there");
    assert_eq!(stat.ephemeral_owner, None);
    let info = stat.lock.expect("lock");
    assert_eq!(info.freed_at_ms, Some(2_301));
    assert!(info.granted.is_some(), "it still holds");
    assert_eq!(h.grant_of(b, &waiting), None);
    assert_eq!(h.c.next_deadline_ms(), Some(2_301));

    let out = h.tick(2_300);
    assert!(out.events.is_empty(), "{:?}", out.events);
    assert!(h.present(b, &held), "not one ms before freed_at");
    assert_eq!(h.grant_of(b, &waiting), None);

    let zxid = h.c.zxid();
    let out = h.tick(2_301);
    let freed = next(zxid, 1);
    assert_eq!(h.c.zxid(), freed, "one zxid for the zombie's deletion");
    assert_eq!(
        out.events,
        vec![
            event(watcher, WatchEventKind::NodeDeleted, &held, freed),
            event(b, WatchEventKind::LockGranted, &waiting, freed),
        ]
    );
    assert!(!h.present(b, &held));
    assert_eq!(
        h.grant_of(b, &waiting),
        Some(Grant {
            token: freed,
            at_ms: 2_301
        })
    );
}

#[test]
fn a_zero_delay_or_a_close_frees_a_lock_at_once() {
    for close in [false, true] {
        let mut h = Harness::new();
        let a = short_session(&mut h, 1_000);
        let b = h.open_with(60_000, "long").expect("open").session;
        let delay = if close { None } else { Some(0) };
        let (held, _) = h.take(a, lock_delay("/l/n-", EXCLUSIVE, delay));
        let (waiting, _) = h.lock(b, "/l/n-", EXCLUSIVE);
        let out = if close {
            h.send(a, Op::CloseSession)
        } else {
            h.tick(1_001)
        };
        assert!(!h.c.session_alive(a));
        assert!(!h.present(b, &held), "close={close}");
        let token = h.grant_of(b, &waiting).expect("granted at once").token;
        assert!(out
            .events
            .contains(&event(b, WatchEventKind::LockGranted, &waiting, token)));
    }
}

#[test]
fn an_expired_session_s_waiting_nodes_go_at_once_and_its_held_ones_wait() {
    let mut h = Harness::new();
    let a = short_session(&mut h, 1_000);
    let c = h.open_with(60_000, "long").expect("open").session;
    let (held, _) = h.lock(a, "/x/n-", EXCLUSIVE);
    let (_, gc) = h.lock(c, "/y/n-", EXCLUSIVE);
    assert!(gc.is_some());
    let (waiting, _) = h.lock(a, "/y/n-", EXCLUSIVE);
    let plain = h.create_with(a, seq("/x/plain-", NodeKind::Ephemeral));
    h.tick(1_001);
    assert!(!h.present(c, &waiting), "a wait of an expired session goes");
    assert!(!h.present(c, &plain), "so does a plain ephemeral");
    assert!(h.present(c, &held), "a held lock waits out its delay");
    h.tick(1_500);
    assert!(h.present(c, &held));
    h.tick(1_501);
    assert!(!h.present(c, &held));
}

#[test]
fn a_zombie_refuses_a_plain_delete_and_a_forced_one_frees_it_at_once() {
    let mut h = Harness::new();
    let a = short_session(&mut h, 1_000);
    let b = h.open_with(60_000, "long").expect("open").session;
    let (held, _) = h.lock(a, "/l/n-", EXCLUSIVE);
    let (waiting, _) = h.lock(b, "/l/n-", EXCLUSIVE);
    h.tick(1_001);
    assert!(h.present(b, &held));
    let e = h.err(b, delete(&held, None));
    assert_eq!((e.code, e.owner), (ErrorCode::NotOwner, None));
    assert!(e.message.contains("zombie"), "{e:?}");
    assert_eq!(h.err(b, set(&held, "x", None)).code, ErrorCode::NotOwner);
    let out = h.send(b, force_delete(&held));
    assert_eq!(
        out.events,
        vec![event(b, WatchEventKind::LockGranted, &waiting, h.c.zxid())]
    );
    assert_eq!(out.forced[0].node, super::ForcedNode::Zombie);
    // b was last heard at 1_001; only its session deadline is left.
    assert_eq!(
        h.c.next_deadline_ms(),
        Some(61_002),
        "no zombie left to wait for"
    );
}

// ---- deadlock ----

fn wait_edge(session: SessionId, lock: &str, holder: SessionId) -> WaitEdge {
    WaitEdge {
        session,
        lock: lock.into(),
        holder,
    }
}

#[test]
fn crossing_waits_of_two_sessions_are_refused_and_change_nothing() {
    let mut h = Harness::new();
    let [a, b] = [h.open(), h.open()];
    h.lock(a, "/locks/x/n-", EXCLUSIVE);
    h.lock(b, "/locks/y/n-", EXCLUSIVE);
    let (a_waits, g) = h.lock(a, "/locks/y/n-", EXCLUSIVE);
    assert_eq!(g, None, "a may wait for b");
    let before = h.children(b, "/locks/x");
    let e = h.err(b, Op::Create(lock("/locks/x/n-", EXCLUSIVE)));
    assert_eq!(e.code, ErrorCode::Deadlock);
    assert_eq!(
        e.cycle,
        vec![wait_edge(b, "/locks/x", a), wait_edge(a, "/locks/y", b)]
    );
    assert_eq!(
        e.message,
        format!(
            "waiting on /locks/x would deadlock: session {b} would wait for session {a} (it \
             holds or queues ahead in /locks/x), which waits for session {b} in /locks/y; \
             release one lock before taking the other, or take them together with a multi-lock"
        )
    );
    assert_eq!(h.children(b, "/locks/x"), before);
    // Once a gives up its wait, b may wait for a.
    h.ok(a, delete(&a_waits, None));
    let (_, g) = h.lock(b, "/locks/x/n-", EXCLUSIVE);
    assert_eq!(g, None);
}

#[test]
fn a_cycle_through_three_sessions_is_refused_and_named_in_order() {
    let mut h = Harness::new();
    let s: Vec<SessionId> = (0..3).map(|_| h.open()).collect();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        h.lock(s[i], &format!("/l/{name}/n-"), EXCLUSIVE);
    }
    h.lock(s[0], "/l/b/n-", EXCLUSIVE);
    h.lock(s[1], "/l/c/n-", EXCLUSIVE);
    let e = h.err(s[2], Op::Create(lock("/l/a/n-", SHARED)));
    assert_eq!(e.code, ErrorCode::Deadlock);
    assert_eq!(
        e.cycle,
        vec![
            wait_edge(s[2], "/l/a", s[0]),
            wait_edge(s[0], "/l/b", s[1]),
            wait_edge(s[1], "/l/c", s[2]),
        ]
    );
    assert!(
        e.message.contains(&format!(
            ", which waits for session {} in /l/b, which waits for session {} in /l/c;",
            s[1], s[2]
        )),
        "{e:?}"
    );
}

#[test]
fn a_session_waiting_behind_its_own_node_is_refused() {
    let mut h = Harness::new();
    let [a, b] = [h.open(), h.open()];
    h.lock(a, "/l/n-", EXCLUSIVE);
    for mode in [EXCLUSIVE, SHARED] {
        let e = h.err(a, Op::Create(lock("/l/n-", mode)));
        assert_eq!(e.code, ErrorCode::Deadlock);
        assert_eq!(e.cycle, vec![wait_edge(a, "/l", a)]);
    }
    // Queued ahead counts like holding: behind its own waiting node too.
    h.lock(b, "/l/n-", EXCLUSIVE);
    let e = h.err(b, Op::Create(lock("/l/n-", EXCLUSIVE)));
    assert_eq!(e.cycle, vec![wait_edge(b, "/l", b)]);
    assert!(
        e.message
            .contains(&format!("session {b} would wait for session {b}")),
        "{e:?}"
    );
}

#[test]
fn shared_behind_shared_waits_are_never_refused() {
    let mut h = Harness::new();
    let [a, b] = [h.open(), h.open()];
    h.lock(a, "/r/x/n-", SHARED);
    h.lock(b, "/r/y/n-", SHARED);
    let (_, g1) = h.lock(a, "/r/y/n-", SHARED);
    let (_, g2) = h.lock(b, "/r/x/n-", SHARED);
    assert!(
        g1.is_some() && g2.is_some(),
        "readers do not wait for readers"
    );
    // A session may hold several shared nodes of one queue.
    assert!(h.lock(a, "/r/x/n-", SHARED).1.is_some());
}

#[test]
fn a_cycle_through_a_semaphore_of_one_permit_is_refused() {
    let mut h = Harness::new();
    let one = LockMode::Semaphore { permits: 1 };
    let [a, b] = [h.open(), h.open()];
    h.lock(a, "/s/x/n-", one);
    h.lock(b, "/s/y/n-", one);
    // b waits for nothing: a may wait for its permit.
    assert_eq!(h.lock(a, "/s/y/n-", one).1, None);
    let e = h.err(b, Op::Create(lock("/s/x/n-", one)));
    assert_eq!(e.code, ErrorCode::Deadlock);
    assert_eq!(
        e.cycle,
        vec![wait_edge(b, "/s/x", a), wait_edge(a, "/s/y", b)]
    );
    assert!(e.message.contains("would deadlock"), "{}", e.message);
    // Behind its own permit, alone: it would wait for itself.
    let e = h.err(a, Op::Create(lock("/s/x/n-", one)));
    assert_eq!(e.cycle, vec![wait_edge(a, "/s/x", a)]);
    // Nothing was created by the refusals.
    assert_eq!(h.children(b, "/s/x").len(), 1);
}

#[test]
fn a_semaphore_wait_behind_a_stuck_waiter_is_refused_before_the_permit_passes() {
    let mut h = Harness::new();
    let one = LockMode::Semaphore { permits: 1 };
    let [a, s, c] = [h.open(), h.open(), h.open()];
    let (permit, _) = h.lock(a, "/sw/n-", one);
    h.lock(s, "/x/n-", EXCLUSIVE);
    // c queues for the permit, then for /x behind s: a will free the
    // permit, so neither is refused.
    assert_eq!(h.lock(c, "/sw/n-", one).1, None);
    assert_eq!(h.lock(c, "/x/n-", EXCLUSIVE).1, None);
    // s behind c in /sw: the permit goes to c first, and c never lets it
    // go while it waits for s. a holding it now changes nothing.
    let e = h.err(s, Op::Create(lock("/sw/n-", one)));
    assert_eq!(e.code, ErrorCode::Deadlock);
    assert_eq!(e.cycle, vec![wait_edge(s, "/sw", c), wait_edge(c, "/x", s)]);
    // Once a lets go and c holds the permit, the same holds.
    h.send(a, delete(&permit, None));
    let e = h.err(s, Op::Create(lock("/sw/n-", one)));
    assert_eq!(e.cycle.len(), 2, "{:?}", e.cycle);
}

#[test]
fn a_semaphore_of_two_permits_is_refused_only_when_both_holders_wait_on_the_caller() {
    let mut h = Harness::new();
    let two = LockMode::Semaphore { permits: 2 };
    let [a, b, c] = [h.open(), h.open(), h.open()];
    h.lock(a, "/s2/n-", two);
    h.lock(c, "/s2/n-", two);
    h.lock(b, "/l/n-", EXCLUSIVE);
    // a waits on b; c still can free its permit: b may wait.
    assert_eq!(h.lock(a, "/l/n-", EXCLUSIVE).1, None);
    let (waiting, g) = h.lock(b, "/s2/n-", two);
    assert_eq!(g, None, "c holds a permit and waits for no one");
    h.send(b, delete(&waiting, None));
    // Now c waits on b too: no permit can ever be freed.
    assert_eq!(h.lock(c, "/l/n-", SHARED).1, None);
    let e = h.err(b, Op::Create(lock("/s2/n-", two)));
    assert_eq!(e.code, ErrorCode::Deadlock);
    assert_eq!(e.cycle.len(), 2, "{:?}", e.cycle);
    assert_eq!(e.cycle[0].session, b);
    assert!([a, c].contains(&e.cycle[0].holder), "{:?}", e.cycle);
    assert_eq!(e.cycle[1], wait_edge(e.cycle[0].holder, "/l", b));

    // A session holding both permits may not wait for a third.
    let d = h.open();
    h.lock(d, "/s3/n-", two);
    h.lock(d, "/s3/n-", two);
    let e = h.err(d, Op::Create(lock("/s3/n-", two)));
    assert_eq!(e.cycle, vec![wait_edge(d, "/s3", d)]);
}

#[test]
fn a_permit_held_by_a_zombie_will_be_freed_so_the_wait_is_not_refused() {
    let mut h = Harness::new();
    let one = LockMode::Semaphore { permits: 1 };
    let a = h.open_with(1_000, "short").expect("open").session;
    let b = h.open_with(60_000, "b").expect("open").session;
    h.lock(a, "/z1/n-", one);
    h.lock(b, "/w1/n-", EXCLUSIVE);
    assert_eq!(h.lock(a, "/w1/n-", EXCLUSIVE).1, None);
    // While a lives, b's wait for a's permit would deadlock.
    let e = h.err(b, Op::Create(lock("/z1/n-", one)));
    assert_eq!(e.code, ErrorCode::Deadlock);
    // a expires: its permit is held by a zombie for the lock-delay, then
    // freed, so b may wait for it.
    h.tick(1_001);
    let (waiting, g) = h.lock(b, "/z1/n-", one);
    assert_eq!(g, None);
    h.tick(1_501);
    assert!(h.grant_of(b, &waiting).is_some());
}

#[test]
fn a_session_fills_its_waits_to_the_limit_and_the_next_wait_is_refused() {
    let mut h = Harness::new();
    let max = super::tests::config().waits_per_session_max;
    let [holder, waiter] = [h.open(), h.open()];
    for i in 0..=max {
        h.lock(holder, &format!("/full{i}/n-"), EXCLUSIVE);
    }
    let mut waits = Vec::new();
    for i in 0..max {
        let (path, grant) = h.lock(waiter, &format!("/full{i}/n-"), EXCLUSIVE);
        assert_eq!(grant, None);
        waits.push(path);
    }
    let e = h.err(
        waiter,
        Op::Create(lock(&format!("/full{max}/n-"), EXCLUSIVE)),
    );
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert!(
        e.message.contains(&format!("the limit is {max}"))
            && e.message.contains("--waits-per-session-max"),
        "{}",
        e.message
    );
    assert!(
        h.children(waiter, &format!("/full{max}")).len() == 1,
        "nothing created"
    );
    // A lock granted at once is no wait: still allowed at the limit.
    let (_, grant) = h.lock(waiter, "/free/n-", EXCLUSIVE);
    assert!(grant.is_some());
    // Giving up one wait makes room for one.
    h.send(waiter, delete(&waits[0], None));
    let (_, grant) = h.lock(waiter, &format!("/full{max}/n-"), EXCLUSIVE);
    assert_eq!(grant, None);
}

#[test]
fn a_zombie_ahead_adds_no_wait() {
    let mut h = Harness::new();
    let a = h.open_with(1_000, "short").expect("open").session;
    let [b, c] = [
        h.open_with(60_000, "b").expect("open").session,
        h.open_with(60_000, "c").expect("open").session,
    ];
    h.lock(a, "/z/n-", EXCLUSIVE);
    h.lock(c, "/w/n-", EXCLUSIVE);
    h.tick(1_001);
    // b waits behind the zombie alone (no edge), and for c in /w.
    let (b_waits, g) = h.lock(b, "/z/n-", EXCLUSIVE);
    assert_eq!(g, None);
    assert_eq!(h.lock(b, "/w/n-", EXCLUSIVE).1, None);
    // c behind the zombie and b in /z would close c -> b -> c; the zombie,
    // ownerless, is in no edge.
    let e = h.err(c, Op::Create(lock("/z/n-", EXCLUSIVE)));
    assert_eq!(e.cycle, vec![wait_edge(c, "/z", b), wait_edge(b, "/w", c)]);
    h.tick(1_501);
    assert!(h.grant_of(b, &b_waits).is_some());
}

// ---- lock watches after a resume ----

fn set_lock_watches(lock: Vec<String>) -> Op {
    Op::SetWatches {
        last_zxid: Zxid(0),
        data: vec![],
        exist: vec![],
        child: vec![],
        lock,
    }
}

#[test]
fn set_watches_lock_reports_grants_and_deletions_missed_while_away() {
    let mut h = Harness::new();
    let [a, b, c] = [h.open(), h.open(), h.open()];
    h.lock(a, "/l/n-", EXCLUSIVE);
    let held = "/l/n-0000000000";
    let (granted, _) = h.lock(b, "/l/n-", EXCLUSIVE);
    let (c_holds, _) = h.lock(c, "/m/n-", EXCLUSIVE);
    let (waiting, _) = h.lock(b, "/m/n-", EXCLUSIVE);
    let (gone, _) = h.lock(b, "/k/n-", SHARED);
    // While b is away: a releases, so b's first node is granted, and c
    // deletes b's node in /k.
    h.ok(a, delete(held, None));
    let token = h.grant_of(b, &granted).expect("granted").token;
    h.ok(c, force_delete(&gone));
    h.resume(b, "s3cret", 0).expect("resume");
    let zxid = h.c.zxid();
    let out = h.send(
        b,
        set_lock_watches(vec![
            granted.clone(),
            waiting.clone(),
            gone.clone(),
            // A path b names that is not its node: its node must be gone.
            c_holds.clone(),
        ]),
    );
    assert_eq!(result(&out), Ok(OpResult::Done));
    assert_eq!(h.c.zxid(), zxid, "set_watches writes nothing");
    assert_eq!(
        out.events,
        vec![
            event(b, WatchEventKind::LockGranted, &granted, token),
            event(b, WatchEventKind::NodeDeleted, &gone, zxid),
            event(b, WatchEventKind::NodeDeleted, &c_holds, zxid),
        ]
    );
    assert_eq!(h.c.watch_count(b), 0, "lock watches take no entry");
    // The waiting node is told by its implied watch when its turn comes.
    let out = h.send(c, delete(&c_holds, None));
    assert_eq!(
        out.events,
        vec![event(b, WatchEventKind::LockGranted, &waiting, h.c.zxid())]
    );
}

#[test]
fn set_watches_lock_paths_count_toward_its_bounds() {
    let mut h = Harness::new();
    let s = h.open();
    let e = h.err(
        s,
        Op::SetWatches {
            last_zxid: Zxid(0),
            data: vec!["/a".into(); limits::SET_WATCHES_PATHS_MAX],
            exist: vec![],
            child: vec![],
            lock: vec!["/b".into()],
        },
    );
    assert_eq!(e.code, ErrorCode::TooLarge);
    let e = h.err(s, set_lock_watches(vec!["/ok".into(), "bad".into()]));
    assert_eq!(e.code, ErrorCode::InvalidPath);
}

#[test]
fn a_long_cycle_is_listed_whole_and_spelled_out_in_part() {
    let mut h = Harness::new();
    let s: Vec<SessionId> = (0..10).map(|_| h.open()).collect();
    for (i, &session) in s.iter().enumerate() {
        h.lock(session, &format!("/c/{i}/n-"), EXCLUSIVE);
    }
    for (i, &session) in s.iter().enumerate().take(9) {
        assert_eq!(
            h.lock(session, &format!("/c/{}/n-", i + 1), EXCLUSIVE).1,
            None
        );
    }
    let e = h.err(s[9], Op::Create(lock("/c/0/n-", EXCLUSIVE)));
    assert_eq!(e.code, ErrorCode::Deadlock);
    let expected: Vec<WaitEdge> = (0..10)
        .map(|k| {
            // The cycle starts with s9 -> s0 in /c/0, then s0 -> s1 in /c/1...
            let from = (k + 9) % 10;
            let to = k;
            wait_edge(s[from], &format!("/c/{to}"), s[to])
        })
        .collect();
    assert_eq!(e.cycle, expected);
    assert!(
        e.message
            .contains("and so on: 10 waits in all (see the reply's cycle)"),
        "{e:?}"
    );
    assert!(
        !e.message.contains("/c/8;"),
        "only 8 edges are spelled out: {e:?}"
    );
}

#[test]
fn a_queue_takes_only_nodes_of_its_own_kind() {
    let mut h = Harness::new();
    let (a, b) = (h.open(), h.open());
    let two = LockMode::Semaphore { permits: 2 };
    let (first, _) = h.lock(a, "/sem/x-", two);
    // Each node is granted by its own rule, so an exclusive node, or one
    // asking for more permits, would be granted beside the holders.
    for mode in [EXCLUSIVE, SHARED, LockMode::Semaphore { permits: 5 }] {
        let error = h.err(b, create(lock("/sem/x-", mode)));
        assert_eq!(error.code, ErrorCode::InvalidArgument, "{mode:?}");
        assert!(
            error.message.contains("semaphore of 2 permits"),
            "{}",
            error.message
        );
    }
    let (_, granted) = h.lock(b, "/sem/x-", two);
    assert!(granted.is_some());
    // A lock queue takes exclusive and shared nodes, and no semaphore's.
    h.lock(a, "/rw/x-", SHARED);
    h.lock(b, "/rw/x-", EXCLUSIVE);
    let error = h.err(b, create(lock("/rw/x-", two)));
    assert_eq!(error.code, ErrorCode::InvalidArgument);
    // Once a queue is empty, it may start again as another kind.
    h.ok(a, delete(&first, None));
    let rest = h.children(a, "/sem");
    for name in rest {
        h.ok(b, delete(&format!("/sem/{name}"), None));
    }
    let (_, granted) = h.lock(a, "/sem/x-", EXCLUSIVE);
    assert!(granted.is_some());
}

//! Unit tests of sessions that end with more nodes than one step deletes
//! (`Config::step_deletes_max`): the end itself is immediate, the nodes go
//! a bounded number per tick, and nothing the ending session still owns
//! lets it act, wait or be resumed.

use latchkey_client::protocol::{
    Create, ErrorCode, LockMode, LockSpec, NodeKind, Op, OpResult, SessionId, WatchEventKind, Xid,
};

use super::tests::{config, kind, result, seq, Harness};
use super::{Command, Config, Output, SessionEnd};

/// Whether `out` told `session` that its lock node `path` was granted.
fn told_granted(out: &Output, session: SessionId, path: &str) -> bool {
    out.events
        .iter()
        .any(|(s, e)| *s == session && e.kind == WatchEventKind::LockGranted && e.path == path)
}

/// A harness whose steps delete at most `step` nodes.
fn harness(step: usize) -> Harness {
    Harness::with(Config {
        step_deletes_max: super::count(step),
        ..config()
    })
}

/// An exclusive lock node create under `lock`, with `delay_ms` of
/// lock-delay.
fn lock(lock: &str, delay_ms: u64) -> Create {
    Create {
        lock: Some(LockSpec {
            mode: LockMode::Exclusive,
            delay_ms: Some(delay_ms),
        }),
        make_parents: true,
        ..seq(&format!("{lock}/n-"), NodeKind::Ephemeral)
    }
}

impl Harness {
    /// Creates a lock node; returns its path and whether it was granted.
    fn take_lock(&mut self, session: SessionId, create: Create) -> (String, bool) {
        match self.ok(session, Op::Create(create)) {
            OpResult::Created { path, stat } => {
                let granted = stat.lock.expect("a lock node").granted.is_some();
                (path, granted)
            }
            other => panic!("create answered {other:?}"),
        }
    }

    /// `count` ephemerals under `parent` (created if absent).
    fn ephemerals(&mut self, session: SessionId, parent: &str, count: usize) {
        if !self.present(session, parent) {
            self.create(session, parent);
        }
        for _ in 0..count {
            self.create_with(session, seq(&format!("{parent}/e-"), NodeKind::Ephemeral));
        }
    }
}

#[test]
fn a_close_ends_the_session_at_once_and_its_nodes_go_a_step_at_a_time() {
    let mut h = harness(3);
    let a = h.open();
    let b = h.open();
    let c = h.open();
    // c holds /m; a holds /l and waits for /m; b waits for /l.
    let (_, granted) = h.take_lock(c, lock("/m", 0));
    assert!(granted);
    let (a_held, granted) = h.take_lock(a, lock("/l", 0));
    assert!(granted);
    let (a_waits, granted) = h.take_lock(a, lock("/m", 0));
    assert!(!granted);
    let (b_waits, granted) = h.take_lock(b, lock("/l", 0));
    assert!(!granted);
    h.ephemerals(a, "/e", 10);
    let nodes = h.c.node_count();

    let xid_before = h.c.zxid();
    let out = h.send(a, Op::CloseSession);
    assert_eq!(result(&out), Ok(OpResult::Done));
    assert_eq!(out.ended, vec![(a, SessionEnd::Closed)]);
    assert!(out.gone.is_empty(), "{:?}", out.gone);
    // Only b hears anything: its grant of /l.
    assert!(
        out.events.iter().all(|(s, e)| *s == b && e.path == b_waits),
        "{:?}",
        out.events
    );
    // The wait went whole (1 + 1 of the budget), then one more node: the
    // oldest it owns, its held lock.
    assert_eq!(h.c.node_count(), nodes - 2);
    assert!(!h.present(b, &a_waits));
    assert!(!h.present(b, &a_held));
    assert_eq!(h.c.zxid().0, xid_before.0 + 2);
    assert!(!h.c.session_alive(a));
    assert!(h.c.session_ending(a));
    assert_eq!(h.c.next_deadline_ms(), Some(0));
    // b was granted /l when a's node there went.
    assert!(h
        .stat(b, &b_waits)
        .and_then(|s| s.lock)
        .is_some_and(|l| l.granted.is_some()));

    // The ended session answers nothing and cannot come back.
    let refused = h.send(a, Op::Ping { ack: Xid(0) });
    assert_eq!(
        result(&refused).as_ref().map_err(|e| e.code),
        Err(ErrorCode::SessionExpired)
    );
    let resumed = h.resume(a, "s3cret", 0);
    assert_eq!(resumed.map_err(|e| e.code), Err(ErrorCode::SessionExpired));
    // Others go on between the steps, and see its remaining nodes.
    assert_eq!(h.children(b, "/e").len(), 10);
    h.create(b, "/between");

    // Each tick deletes at most 3; the last reports the session gone.
    let mut left = h.children(b, "/e").len();
    let mut ticks = 0;
    while h.c.session_ending(a) {
        let before = h.c.node_count();
        let out = h.tick(h.now_ms);
        ticks += 1;
        let deleted = before - h.c.node_count();
        assert!(deleted <= 3, "a tick deleted {deleted} nodes");
        left -= deleted;
        assert_eq!(out.gone.is_empty(), left > 0, "{:?}", out.gone);
        assert!(out.ended.is_empty());
    }
    assert_eq!((left, ticks), (0, 4));
    assert!(h.children(b, "/e").is_empty());
    assert_eq!(h.c.session_count(), 2);
    assert_ne!(h.c.next_deadline_ms(), Some(0));
}

#[test]
fn an_ending_session_waits_for_nothing_so_waiting_on_it_is_no_deadlock() {
    let mut h = harness(1);
    let a = h.open();
    let b = h.open();
    h.take_lock(b, lock("/y", 0));
    let (a_held, _) = h.take_lock(a, lock("/x", 0));
    let (_, granted) = h.take_lock(a, lock("/y", 0));
    assert!(!granted);
    h.ephemerals(a, "/e", 5);
    // Its wait (and the end) spend the whole budget: a still holds /x.
    h.send(a, Op::CloseSession);
    assert!(h.present(b, &a_held));
    // b waits for a, which waits for nothing any more: no cycle.
    let (b_waits, granted) = h.take_lock(b, lock("/x", 0));
    assert!(!granted);
    let out = h.tick(h.now_ms);
    assert!(told_granted(&out, b, &b_waits), "{:?}", out.events);
}

#[test]
fn an_expiry_past_the_step_keeps_its_held_lock_through_the_delay() {
    let mut h = harness(2);
    let a = h.open_with(1_000, "s3cret").expect("open").session;
    let b = h.open_with(60_000, "s3cret").expect("open").session;
    let (a_held, _) = h.take_lock(a, lock("/l", 500));
    h.ephemerals(a, "/e", 4);
    let (b_waits, _) = h.take_lock(b, lock("/l", 0));
    h.now_ms = 2_000;
    let out = h.tick(2_000);
    assert_eq!(out.ended, vec![(a, SessionEnd::Expired)]);
    // The end (1) and the held lock made a zombie (1): nothing deleted.
    assert_eq!(h.c.zombie_count(), 1);
    assert!(out.gone.is_empty());
    // 4 ephemerals and the removal, 2 a tick.
    for _ in 0..3 {
        let out = h.tick(2_000);
        assert!(out.events.iter().all(|(s, _)| *s != b), "{:?}", out.events);
    }
    assert!(!h.c.session_ending(a));
    // Held through the delay, then granted on.
    assert!(h.present(b, &a_held));
    h.tick(2_499);
    assert!(h.present(b, &a_held));
    let out = h.tick(2_500);
    assert!(told_granted(&out, b, &b_waits), "{:?}", out.events);
}

#[test]
fn one_tick_ends_and_removes_at_most_a_step_of_expired_sessions() {
    let mut h = harness(2);
    let sessions: Vec<SessionId> = (0..5)
        .map(|_| h.open_with(1_000, "s3cret").expect("open").session)
        .collect();
    let keep = h.open_with(60_000, "s3cret").expect("open").session;
    h.create_with(keep, kind("/p", NodeKind::Persistent));
    h.now_ms = 5_000;
    let (mut ended, mut gone) = (Vec::new(), Vec::new());
    let mut ticks = 0;
    while gone.len() < sessions.len() {
        let out = h.apply_checked(Command::Tick);
        ticks += 1;
        // Ending a session costs one, removing it one.
        assert!(out.ended.len() + out.gone.len() <= 2, "{out:?}");
        ended.extend(out.ended.into_iter().map(|(s, _)| s));
        gone.extend(out.gone);
    }
    assert_eq!(ticks, 5);
    assert_eq!(ended, sessions);
    assert_eq!(gone, sessions);
    assert!(h.c.session_alive(keep));
    assert_eq!(h.c.session_count(), 1);
    assert!(h.present(keep, "/p"));
}

#[test]
fn a_forced_delete_of_an_ending_session_s_lock_tells_it_nothing_and_frees_a_closed_one_at_once() {
    for why in [SessionEnd::Closed, SessionEnd::Expired] {
        let mut h = harness(2);
        let a = h.open_with(1_000, "s3cret").expect("open").session;
        let b = h.open_with(60_000, "s3cret").expect("open").session;
        // The lock is a's newest node, so it outlasts the end's first step.
        h.ephemerals(a, "/e", 3);
        let (a_held, _) = h.take_lock(a, lock("/l", 500));
        let (b_waits, _) = h.take_lock(b, lock("/l", 0));
        match why {
            SessionEnd::Closed => {
                h.send(a, Op::CloseSession);
            }
            SessionEnd::Expired => {
                h.now_ms = 2_000;
                h.tick(2_000);
            }
        }
        assert!(h.c.session_ending(a) && h.present(b, &a_held));
        let out = h.send(b, super::tests::force_delete(&a_held));
        assert!(out.events.iter().all(|(s, _)| *s != a), "{:?}", out.events);
        let granted = told_granted(&out, b, &b_waits);
        match why {
            // Its own word that it was done: no lock-delay to wait out.
            SessionEnd::Closed => {
                assert_eq!(result(&out), Ok(OpResult::Deleted));
                assert!(granted);
            }
            SessionEnd::Expired => {
                assert!(matches!(result(&out), Ok(OpResult::Zombified { .. })));
                assert!(!granted);
                assert_eq!(h.c.zombie_count(), 1);
            }
        }
    }
}

//! Unit tests of the startup grace: lock grants paused until a time, then
//! given at the first tick after it; and the lease horizon a server records
//! so that its successor knows how long to pause.

use latchkey_client::protocol::{
    Create, LockMode, LockSpec, NodeKind, Op, OpResult, SessionId, WatchEventKind,
};

use super::tests::{delete, seq, Harness};

fn lock_node(prefix: &str, mode: LockMode, delay_ms: u64) -> Op {
    Op::Create(Create {
        lock: Some(LockSpec {
            mode,
            delay_ms: Some(delay_ms),
        }),
        make_parents: true,
        ..seq(prefix, NodeKind::Ephemeral)
    })
}

/// Creates a lock node; returns its path and whether it was granted at once.
fn take(h: &mut Harness, session: SessionId, prefix: &str, mode: LockMode) -> (String, bool) {
    match h.ok(session, lock_node(prefix, mode, 500)) {
        OpResult::Created { path, stat } => {
            let granted = stat.lock.expect("lock info").granted.is_some();
            (path, granted)
        }
        other => panic!("create answered {other:?}"),
    }
}

#[test]
fn paused_grants_queue_and_are_given_at_the_first_tick_after_the_pause() {
    let mut h = Harness::new();
    h.c.pause_grants_until(1_000);
    assert_eq!(h.c.grants_paused_until_ms(), Some(1_000));
    assert_eq!(h.c.next_deadline_ms().map(|d| d <= 1_000), Some(true));
    let (a, b) = (h.open(), h.open());
    let (qa, granted) = take(&mut h, a, "/q/lock-", LockMode::Exclusive);
    assert!(!granted, "a lock was granted during the pause");
    let (qb, granted) = take(&mut h, b, "/q/lock-", LockMode::Exclusive);
    assert!(!granted);
    let (r, granted) = take(&mut h, b, "/r/lock-", LockMode::Shared);
    assert!(!granted);
    // A waiter that leaves during the pause grants nothing either.
    let (gone, _) = take(&mut h, a, "/s/lock-", LockMode::Exclusive);
    h.ok(a, delete(&gone, None));

    let out = h.tick(999);
    assert!(
        out.events.is_empty(),
        "granted before the pause ended: {:?}",
        out.events
    );
    let before = h.c.zxid();
    let out = h.tick(1_000);
    assert_eq!(h.c.grants_paused_until_ms(), None);
    let grants: Vec<_> = out
        .events
        .iter()
        .filter(|(_, e)| e.kind == WatchEventKind::LockGranted)
        .map(|(s, e)| (*s, e.path.clone(), e.zxid))
        .collect();
    // The head of /q and the reader of /r, each queue with its own token,
    // in the order the queues were made; the second /q node still waits.
    assert_eq!(grants.len(), 2, "{grants:?}");
    assert_eq!((grants[0].0, grants[0].1.as_str()), (a, qa.as_str()));
    assert_eq!((grants[1].0, grants[1].1.as_str()), (b, r.as_str()));
    assert!(before < grants[0].2 && grants[0].2 < grants[1].2);
    assert_eq!(h.c.zxid(), grants[1].2);
    let waiting = h.stat(b, &qb).expect("live").lock.expect("lock info");
    assert!(waiting.granted.is_none());

    // After the pause, grants are immediate again.
    h.ok(a, delete(&qa, None));
    assert!(h
        .stat(b, &qb)
        .expect("live")
        .lock
        .expect("lock")
        .granted
        .is_some());
    let (_, granted) = take(&mut h, a, "/t/lock-", LockMode::Exclusive);
    assert!(granted);
}

#[test]
fn a_pause_is_refused_once_a_lock_node_exists() {
    let mut h = Harness::new();
    let a = h.open();
    let (_, granted) = take(&mut h, a, "/q/lock-", LockMode::Exclusive);
    assert!(granted);
    h.c.pause_grants_until(5_000);
    assert_eq!(h.c.grants_paused_until_ms(), None);
}

#[test]
fn the_lease_horizon_covers_every_holder_deadline_plus_its_delay() {
    let mut h = Harness::new();
    assert_eq!(h.c.lease_horizon_ms(), 0);
    let holder = h.open_with(10_000, "x").expect("open").session;
    let other = h.open_with(30_000, "y").expect("open").session;
    // A session that never held a lock does not count, however long its
    // timeout.
    h.ok(
        other,
        Op::Ping {
            ack: Default::default(),
        },
    );
    assert_eq!(h.c.lease_horizon_ms(), 0);

    h.now_ms = 100;
    match h.ok(holder, lock_node("/q/lock-", LockMode::Exclusive, 700)) {
        OpResult::Created { stat, .. } => assert!(stat.lock.expect("lock").granted.is_some()),
        other => panic!("create answered {other:?}"),
    }
    // Deadline: last heard (100) + timeout + 1; then the delay.
    assert_eq!(h.c.lease_horizon_ms(), 100 + 10_001 + 700);
    // Heard from again: the horizon follows its deadline.
    h.now_ms = 4_000;
    h.ok(
        holder,
        Op::Ping {
            ack: Default::default(),
        },
    );
    assert_eq!(h.c.lease_horizon_ms(), 4_000 + 10_001 + 700);
    // A waiter granted later is covered from its grant.
    h.now_ms = 4_500;
    let (queued, granted) = take(&mut h, other, "/q/lock-", LockMode::Exclusive);
    assert!(!granted);
    assert_eq!(h.c.lease_horizon_ms(), 4_000 + 10_001 + 700);
    h.now_ms = 5_000;
    let held = h.children(holder, "/q");
    let mine = held
        .iter()
        .map(|name| format!("/q/{name}"))
        .find(|path| *path != queued)
        .expect("the holder's node");
    h.ok(holder, delete(&mine, None));
    assert_eq!(h.c.lease_horizon_ms(), 4_500 + 30_001 + 500);
    // Its release is heard from it too, which moves its deadline on.
    h.now_ms = 6_000;
    h.ok(other, delete(&queued, None));
    assert_eq!(h.c.lease_horizon_ms(), 6_000 + 30_001 + 500);
    // It never goes down, even when every session has ended.
    h.tick(6_000 + 30_002);
    assert_eq!(h.c.session_count(), 0);
    assert_eq!(h.c.lease_horizon_ms(), 6_000 + 30_001 + 500);
}

//! The deadlock check's cost and its agreement with the full search, cost
//! counted in search steps, never timed: one create behind a queue of tens
//! of thousands of waiters takes at most two steps per queue node, and one
//! behind a session waiting in 20,000 queues as few as one behind a session
//! waiting in none; on random small scenarios the check refuses exactly
//! what a level-by-level search over every wait refuses (semaphores
//! included), with a cycle as short.

use latchkey_client::protocol::{
    limits, Create, ErrorCode, ErrorReply, LockMode, LockSpec, NodeKind, Op, OpResult, Secret,
    SessionId, WaitEdge, Xid,
};
use proptest::prelude::*;

use super::tests::{config, result, Harness};
use super::{count, Command, Config, Coordinator, Outcome};

const EXCLUSIVE: LockMode = LockMode::Exclusive;
const SHARED: LockMode = LockMode::Shared;

fn lock(prefix: &str, mode: LockMode) -> Create {
    Create {
        path: prefix.into(),
        kind: NodeKind::Ephemeral,
        sequential: true,
        make_parents: true,
        lock: Some(LockSpec {
            mode,
            delay_ms: None,
        }),
        ..Create::default()
    }
}

/// Drives a coordinator without checking invariants after each step, which
/// would cost the whole state every time: building a queue of tens of
/// thousands of waiters that way would be quadratic.
struct Bulk {
    c: Coordinator,
    xid: u64,
}

impl Bulk {
    fn open(&mut self) -> SessionId {
        let out = self.c.apply(
            Command::OpenSession {
                timeout_ms: 60_000,
                secret: Secret("s".into()),
            },
            0,
        );
        match out.outcome {
            Outcome::Session(Ok(grant)) => grant.session,
            other => panic!("open answered {other:?}"),
        }
    }

    /// Sends `op`; one xid counter for all sessions still increases within
    /// each.
    fn send(&mut self, session: SessionId, op: Op) -> Result<OpResult, ErrorReply> {
        self.xid += 1;
        let command = Command::Request {
            session,
            attach: 0,
            xid: Xid(self.xid),
            op,
        };
        match self.c.apply(command, 0).outcome {
            Outcome::Reply(reply) => reply.result.map_err(|refusal| refusal.to_reply()),
            other => panic!("request answered {other:?}"),
        }
    }

    fn lock(&mut self, session: SessionId, prefix: &str, mode: LockMode) -> String {
        match self.send(session, Op::Create(lock(prefix, mode))) {
            Ok(OpResult::Created { path, .. }) => path,
            other => panic!("create answered {other:?}"),
        }
    }

    /// The create's result and how many queue nodes its check read.
    fn lock_counted(
        &mut self,
        session: SessionId,
        prefix: &str,
        mode: LockMode,
    ) -> (Result<OpResult, ErrorReply>, u64) {
        let before = self.c.deadlock_steps();
        let out = self.send(session, Op::Create(lock(prefix, mode)));
        (out, self.c.deadlock_steps() - before)
    }

    fn delete(&mut self, session: SessionId, path: &str) {
        let op = Op::Delete {
            path: path.into(),
            version: None,
            czxid: None,
            force: false,
        };
        assert_eq!(self.send(session, op), Ok(OpResult::Deleted));
    }
}

/// Exclusive waiters in the long queue; a shared one follows every fourth.
const EXCLUSIVE_WAITERS: usize = 20_000;
/// A run of shared waiters just before the last exclusive one: finding the
/// nearest exclusive node ahead by walking back would read them all.
const SHARED_RUN: usize = 2_000;

#[test]
fn one_create_behind_twenty_thousand_waiters_reads_each_node_at_most_twice() {
    let sessions = EXCLUSIVE_WAITERS + EXCLUSIVE_WAITERS / 4 + SHARED_RUN + 16;
    let mut b = Bulk {
        c: Coordinator::new(
            Config {
                sessions_max: count(sessions),
                nodes_max: count(sessions * 2),
                children_per_node_max: count(limits::CHILDREN_PER_NODE_MAX),
                ..config()
            },
            super::tests::START,
        ),
        xid: 0,
    };
    let holder = b.open();
    b.lock(holder, "/q/n-", EXCLUSIVE);
    for i in 0..EXCLUSIVE_WAITERS {
        let s = b.open();
        b.lock(s, "/q/n-", EXCLUSIVE);
        if i % 4 == 3 {
            let s = b.open();
            b.lock(s, "/q/n-", SHARED);
        }
    }
    for _ in 0..SHARED_RUN {
        let s = b.open();
        b.lock(s, "/q/n-", SHARED);
    }
    let last = b.open();
    b.lock(last, "/q/n-", EXCLUSIVE);
    let queue =
        b.c.tree
            .lock_queue_len(b.c.tree.key("/q").expect("the queue"));
    assert_eq!(
        queue,
        1 + EXCLUSIVE_WAITERS + EXCLUSIVE_WAITERS / 4 + SHARED_RUN + 1
    );
    let bound = u64::try_from(2 * queue).expect("small");

    // A session that owns no other lock node cannot be waited for: no
    // search at all.
    let fresh = b.open();
    let (out, reads) = b.lock_counted(fresh, "/q/n-", EXCLUSIVE);
    let Ok(OpResult::Created { path, .. }) = out else {
        panic!("create answered {out:?}")
    };
    assert_eq!(reads, 0, "a first wait searches nothing");
    b.delete(fresh, &path);

    // One that holds a lock elsewhere is searched for: the search reaches
    // every session of the queue, and finds no way back.
    let holding = b.open();
    b.lock(holding, "/other/n-", EXCLUSIVE);
    for mode in [EXCLUSIVE, SHARED] {
        let (out, reads) = b.lock_counted(holding, "/q/n-", mode);
        let Ok(OpResult::Created { path, .. }) = out else {
            panic!("{mode:?} create answered {out:?}")
        };
        assert!(
            reads <= bound,
            "a {mode:?} create behind {queue} nodes read {reads}; the bound is {bound}"
        );
        b.delete(holding, &path);
    }

    // The holder waits for `holding` in /other; `holding` joining /q
    // would wait for the holder: refused, with the shortest cycle.
    b.lock(holder, "/other/n-", EXCLUSIVE);
    let (out, reads) = b.lock_counted(holding, "/q/n-", EXCLUSIVE);
    let cycle = out.expect_err("a cycle").cycle;
    assert_eq!(
        cycle,
        vec![
            WaitEdge {
                session: holding,
                lock: "/q".into(),
                holder,
            },
            WaitEdge {
                session: holder,
                lock: "/other".into(),
                holder: holding,
            },
        ]
    );
    assert!(reads <= bound, "{reads} > {bound}");
    b.c.check_invariants().expect("invariants");
}

/// Waits in the many-queue scenarios: the 20,000.
const WAITS: usize = 20_000;

/// A coordinator with room for `WAITS` waits of one session, plus a few.
fn roomy() -> Bulk {
    let nodes = 8 * WAITS + 64;
    Bulk {
        c: Coordinator::new(
            Config {
                nodes_max: count(nodes),
                tree_bytes_max: count(64 * nodes),
                children_per_node_max: count(limits::CHILDREN_PER_NODE_MAX),
                waits_per_session_max: count(WAITS + 1),
                ..config()
            },
            super::tests::START,
        ),
        xid: 0,
    }
}

/// A session that waits in `n` queues, each held by `holder`.
fn waiting_in(b: &mut Bulk, holder: SessionId, n: usize, tag: &str) -> SessionId {
    let waiter = b.open();
    for i in 0..n {
        let queue = format!("/{tag}{i}/n-");
        b.lock(holder, &queue, EXCLUSIVE);
        b.lock(waiter, &queue, EXCLUSIVE);
    }
    waiter
}

#[test]
fn a_create_behind_a_session_waiting_in_twenty_thousand_queues_costs_what_one_behind_none_does() {
    let mut b = roomy();
    let holder = b.open();
    // `busy` waits in WAITS queues, `idle` in none; each holds a lock the
    // caller then queues for.
    let busy = waiting_in(&mut b, holder, WAITS, "w");
    let idle = b.open();
    b.lock(busy, "/busy/n-", EXCLUSIVE);
    b.lock(idle, "/idle/n-", EXCLUSIVE);
    // The caller holds a lock of its own, so its wait is searched.
    let caller = b.open();
    b.lock(caller, "/mine/n-", EXCLUSIVE);
    let (out, behind_idle) = b.lock_counted(caller, "/idle/n-", EXCLUSIVE);
    assert!(matches!(out, Ok(OpResult::Created { .. })), "{out:?}");
    let (out, behind_busy) = b.lock_counted(caller, "/busy/n-", EXCLUSIVE);
    assert!(matches!(out, Ok(OpResult::Created { .. })), "{out:?}");
    assert!(
        behind_busy <= 4 * behind_idle.max(1),
        "behind a session waiting in {WAITS} queues: {behind_busy} steps; behind one waiting in \
         none: {behind_idle}"
    );

    // The caller's own waits cost nothing either when the sessions ahead
    // wait for nothing: a caller waiting in WAITS queues joins /lone.
    let lone = b.open();
    b.lock(lone, "/lone/n-", EXCLUSIVE);
    let many = waiting_in(&mut b, holder, WAITS, "c");
    let (out, steps) = b.lock_counted(many, "/lone/n-", EXCLUSIVE);
    assert!(matches!(out, Ok(OpResult::Created { .. })), "{out:?}");
    assert!(steps <= 4 * behind_idle.max(1), "{steps} steps");

    // And a cycle through the busy session is still found: `busy` waits in
    // /mine2 for `caller2`, who then queues for /busy.
    let caller2 = b.open();
    b.lock(caller2, "/mine2/n-", EXCLUSIVE);
    b.lock(busy, "/mine2/n-", EXCLUSIVE);
    let (out, _) = b.lock_counted(caller2, "/busy/n-", EXCLUSIVE);
    let cycle = out.expect_err("a cycle").cycle;
    assert_eq!(cycle.len(), 2, "{cycle:?}");
    assert_eq!((cycle[0].holder, cycle[1].holder), (busy, caller2));
}

#[test]
fn check_invariants_finds_a_cycle_that_slipped_past_the_check() {
    let mut h = Harness::new();
    let [a, b, c] = [h.open(), h.open(), h.open()];
    for (s, prefix) in [(a, "/x/n-"), (b, "/y/n-"), (c, "/z/n-")] {
        h.send(s, Op::Create(lock(prefix, EXCLUSIVE)));
    }
    // In /y, a waits for b and for c's reader, which waits for b; then b's
    // wait for a in /x is slipped in past the check.
    h.send(c, Op::Create(lock("/y/n-", SHARED)));
    h.send(a, Op::Create(lock("/y/n-", EXCLUSIVE)));
    h.c.check_invariants().expect("no cycle yet");
    let zxid = h.c.next_zxid();
    let mut fx = super::Effects::default();
    h.c.create_node(
        super::tree::NewNode {
            path: "/x/n-9999999999".into(),
            data: Vec::new(),
            kind: NodeKind::Ephemeral,
            ttl_ms: None,
            owner: Some(b),
            lock: Some(latchkey_client::protocol::LockInfo {
                mode: EXCLUSIVE,
                delay_ms: 0,
                granted: None,
                freed_at_ms: None,
            }),
            bump_parent_seq: false,
        },
        zxid,
        0,
        &mut fx,
    );
    let broken = h.c.check_invariants().expect_err("a cycle");
    assert!(broken.contains("form a cycle"), "{broken}");
}

// ---- agreement with the search over every edge ----

const SLOTS: usize = 5;
const QUEUES: usize = 4;

#[derive(Clone, Debug)]
enum Step {
    /// Slot `0` takes a lock node in queue `1` of mode `2`.
    Lock(usize, usize, LockMode),
    /// Slot `0` deletes the `1`th (modulo) of its lock nodes.
    Release(usize, usize),
    /// Slot `0`'s session expires (its held nodes become zombies for the
    /// lock-delay); a new session takes the slot.
    Expire(usize),
    /// Slot `0`'s session closes; a new session takes the slot.
    Close(usize),
    /// Time passes, less than a session timeout: due zombies go.
    Reap,
}

fn step() -> impl Strategy<Value = Step> {
    let mode = prop_oneof![
        4 => Just(EXCLUSIVE),
        3 => Just(SHARED),
        1 => Just(LockMode::Semaphore { permits: 1 }),
        1 => Just(LockMode::Semaphore { permits: 2 }),
    ];
    prop_oneof![
        // A queue takes one kind of node: the last two queues are
        // semaphores of 1 and 2 permits, the others exclusive and shared.
        8 => (0..SLOTS, 0..QUEUES, mode).prop_map(|(s, q, m)| {
            let m = match (QUEUES - q, m) {
                (1, _) => LockMode::Semaphore { permits: 1 },
                (2, _) => LockMode::Semaphore { permits: 2 },
                (_, LockMode::Semaphore { .. }) => EXCLUSIVE,
                (_, m) => m,
            };
            Step::Lock(s, q, m)
        }),
        3 => (0..SLOTS, 0..8usize).prop_map(|(s, n)| Step::Release(s, n)),
        1 => (0..SLOTS).prop_map(Step::Expire),
        1 => (0..SLOTS).prop_map(Step::Close),
        1 => Just(Step::Reap),
    ]
}

/// Sessions live for a second unless heard from.
const TIMEOUT_MS: u64 = 1_000;

fn open(h: &mut Harness) -> SessionId {
    h.open_with(TIMEOUT_MS, "s3cret").expect("open").session
}

/// Pings every session but `except`, then ticks `after_ms` later.
fn tick_after(h: &mut Harness, slots: &[SessionId], except: Option<usize>, after_ms: u64) {
    h.now_ms += 1;
    for (i, &s) in slots.iter().enumerate() {
        if Some(i) != except {
            h.send(s, Op::Ping { ack: Xid(0) });
        }
    }
    let at = h.now_ms + after_ms;
    h.tick(at);
}

proptest! {
    #[test]
    fn the_deadlock_check_refuses_what_the_search_over_every_edge_refuses(
        steps in prop::collection::vec(step(), 1..80)
    ) {
        let mut h = Harness::new();
        let mut slots: Vec<SessionId> = (0..SLOTS).map(|_| open(&mut h)).collect();
        let mut held: Vec<Vec<String>> = vec![Vec::new(); SLOTS];
        for (i, step) in steps.iter().enumerate() {
            match *step {
                Step::Lock(slot, q, mode) => {
                    let s = slots[slot];
                    let queue = format!("/q{q}");
                    let prefix = format!("{queue}/n-");
                    let expected = h.c.check_lock_wait_reference(s, &prefix, mode);
                    let blockers = h.c.joining_blockers_reference(&queue, mode);
                    let out = h.send(s, Op::Create(lock(&prefix, mode)));
                    match (result(&out), expected) {
                        (Ok(OpResult::Created { path, .. }), Ok(())) => {
                            held[slot].push(path.clone());
                        }
                        (Err(e), Err(full)) if e.code == ErrorCode::Deadlock => {
                            // As short as the full search's, and true: the
                            // first edge is this wait, each next one a wait
                            // of the full graph, and it closes.
                            prop_assert_eq!(e.cycle.len(), full.cycle().len(), "step {}", i);
                            let first = &e.cycle[0];
                            prop_assert_eq!(first.session, s);
                            prop_assert_eq!(&first.lock, &queue);
                            prop_assert!(
                                blockers.contains(&first.holder) || matches!(mode, LockMode::Semaphore { .. }),
                                "{:?}", e.cycle
                            );
                            // Every session on it is stuck if `s` is.
                            let stuck = h.c.stuck_reference(s);
                            for edge in &e.cycle {
                                prop_assert!(stuck.contains_key(&edge.holder), "{:?}", e.cycle);
                            }
                            for pair in e.cycle.windows(2) {
                                prop_assert_eq!(pair[0].holder, pair[1].session);
                                prop_assert!(h.c.is_wait_reference(&pair[1]), "{:?}", e.cycle);
                            }
                            prop_assert_eq!(e.cycle.last().map(|e| e.holder), Some(s));
                        }
                        (actual, expected) => prop_assert!(
                            false,
                            "step {} {:?}: answered {:?}, the full search {:?}",
                            i, step, actual, expected
                        ),
                    }
                }
                Step::Release(slot, n) => {
                    if !held[slot].is_empty() {
                        let at = n % held[slot].len();
                        let path = held[slot].remove(at);
                        let op = Op::Delete { path, version: None, czxid: None, force: false };
                        let out = h.send(slots[slot], op);
                        prop_assert_eq!(result(&out), Ok(OpResult::Deleted));
                    }
                }
                Step::Expire(slot) => {
                    tick_after(&mut h, &slots, Some(slot), TIMEOUT_MS);
                    prop_assert!(!h.c.session_alive(slots[slot]));
                    slots[slot] = open(&mut h);
                    held[slot].clear();
                }
                Step::Close(slot) => {
                    h.send(slots[slot], Op::CloseSession);
                    slots[slot] = open(&mut h);
                    held[slot].clear();
                }
                Step::Reap => tick_after(&mut h, &slots, None, TIMEOUT_MS / 2 + 100),
            }
            // The edges the invariant check follows reach what all reach.
            prop_assert_eq!(h.c.reach(false), h.c.reach(true), "after step {} {:?}", i, step);
        }
    }
}

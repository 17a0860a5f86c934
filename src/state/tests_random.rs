//! Randomized tests: one seeded command stream applied to two coordinators
//! (determinism plus invariants), and a proptest against a `BTreeMap` model.

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};

use latchkey_client::protocol::{
    Create, Data, ErrorCode, LockMode, LockSpec, MultiOp, NodeKind, Op, OpResult, Secret,
    SessionId, WatchEventKind, Xid, Zxid,
};
use proptest::prelude::*;

use super::{Command, Config, Coordinator, Outcome};

/// xorshift64*: enough randomness for a test, and no `rand` in `state`.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // A zero state would stay zero; `| 1` would make seeds 2k and 2k+1
        // one stream.
        let state = seed ^ 0x9E37_79B9_7F4A_7C15;
        XorShift(if state == 0 { 1 } else { state })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        let i = usize::try_from(self.below(u64::try_from(items.len()).expect("small")))
            .expect("below len");
        &items[i]
    }
}

/// The seed from `LATCHKEY_SEED`, or a fresh one (from the process's
/// random hash keys: no clock, no `rand`).
fn seed() -> u64 {
    match std::env::var("LATCHKEY_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("LATCHKEY_SEED={text:?} is not a u64")),
        Err(_) => RandomState::new().build_hasher().finish(),
    }
}

fn small_config() -> Config {
    Config {
        session_timeout_ms_min: 100,
        session_timeout_ms_max: 2_000,
        data_bytes_max: 16,
        sessions_max: 6,
        nodes_max: 40,
        // A node here averages ~20 bytes of path and data, so 40 nodes hold
        // ~800: at 700 both this bound and `nodes_max` are hit in a stream
        // (seen in the "bounds hit" counts over seeds 1-12).
        tree_bytes_max: 700,
        children_per_node_max: 6,
        children_page_max: 4,
        watches_per_session_max: 5,
        // Below 6 sessions x 5, so both watch bounds are hit.
        watches_max: 12,
        // Room for about ten cached replies of the stream's size (~150
        // bytes each) across its six sessions, so retries of replies
        // dropped for the total budget come up.
        reply_cache_bytes_max: 1_500,
        // Delays of up to a few ticks, so zombies are made and reaped within
        // a stream; the generator asks for more now and then.
        lock_delay_ms_default: 200,
        lock_delay_ms_max: 400,
        hold_ttl_ms_max: 5_000,
        waits_per_session_max: 3,
        // Below what a session often owns here, so that ends take several
        // ticks and other sessions' requests come between them.
        step_deletes_max: 3,
    }
}

const NAMES: [&str; 4] = ["a", "b", "c", "lock-"];

/// A path of one to three segments, sometimes not canonical.
fn random_path(rng: &mut XorShift) -> String {
    if rng.chance(3) {
        return rng
            .pick(&["", "a", "/a/", "/a//b", "/a/./b", "/a\0b"])
            .to_string();
    }
    if rng.chance(5) {
        return "/".into();
    }
    let depth = *rng.pick(&[1, 1, 2, 2, 2, 3]);
    let mut path = String::new();
    for _ in 0..depth {
        path.push('/');
        let name: &&str = rng.pick(&NAMES);
        path.push_str(name);
    }
    path
}

fn random_data(rng: &mut XorShift) -> Data {
    let len = usize::try_from(rng.below(18)).expect("small");
    Data(vec![b'x'; len])
}

fn random_version(rng: &mut XorShift) -> Option<u64> {
    rng.chance(50).then(|| rng.below(3))
}

fn random_create(rng: &mut XorShift) -> Create {
    let kind = *rng.pick(&[
        NodeKind::Persistent,
        NodeKind::Persistent,
        NodeKind::Ephemeral,
        NodeKind::Container,
    ]);
    Create {
        path: random_path(rng),
        data: random_data(rng),
        kind,
        sequential: rng.chance(30),
        ttl_ms: rng.chance(15).then(|| rng.below(1_500)),
        make_parents: rng.chance(60),
        lock: None,
    }
}

/// The lock queues the stream uses: few, so that waits cross.
const QUEUES: [&str; 3] = ["/x", "/y", "/a"];

/// A lock node create of any mode, sometimes invalid (wrong kind, not
/// sequential, 0 permits, a delay over the bound).
fn random_lock(rng: &mut XorShift) -> Create {
    let mode = match rng.below(6) {
        0..=2 => LockMode::Exclusive,
        3 | 4 => LockMode::Shared,
        _ => LockMode::Semaphore {
            permits: u32::try_from(rng.below(4)).expect("small"),
        },
    };
    let delay_ms = match rng.below(6) {
        0 => Some(0),
        1 | 2 => Some(rng.below(300)),
        3 if rng.chance(20) => Some(500),
        _ => None,
    };
    Create {
        path: format!("{}/lk-", rng.pick(&QUEUES)),
        data: random_data(rng),
        kind: if rng.chance(97) {
            NodeKind::Ephemeral
        } else {
            NodeKind::Persistent
        },
        sequential: rng.chance(97),
        ttl_ms: None,
        make_parents: rng.chance(80),
        lock: Some(LockSpec { mode, delay_ms }),
    }
}

/// A path a lock node of the stream may have.
fn random_lock_path(rng: &mut XorShift) -> String {
    format!("{}/lk-{:010}", rng.pick(&QUEUES), rng.below(12))
}

/// A path, often one a lock node may have.
fn random_target(rng: &mut XorShift) -> String {
    if rng.chance(40) {
        random_lock_path(rng)
    } else {
        random_path(rng)
    }
}

/// A czxid guard: none, or a recent zxid (now and then the right one).
fn random_czxid(rng: &mut XorShift, zxid: Zxid) -> Option<Zxid> {
    rng.chance(30)
        .then(|| Zxid(zxid.0.saturating_sub(rng.below(40))))
}

fn random_multi_op(rng: &mut XorShift, zxid: Zxid) -> MultiOp {
    match rng.below(6) {
        0 if rng.chance(10) => MultiOp::Create(random_lock(rng)),
        0 => MultiOp::Create(random_create(rng)),
        4 => MultiOp::Touch {
            path: random_target(rng),
            ttl_ms: rng.chance(30).then(|| rng.below(1_500)),
            czxid: random_czxid(rng, zxid),
        },
        1 => MultiOp::Set {
            path: random_path(rng),
            data: random_data(rng),
            version: random_version(rng),
            czxid: None,
        },
        2 | 5 => MultiOp::Delete {
            path: random_target(rng),
            version: random_version(rng),
            czxid: random_czxid(rng, zxid),
        },
        _ => MultiOp::Check {
            path: random_target(rng),
            version: random_version(rng),
            czxid: random_czxid(rng, zxid),
        },
    }
}

fn random_op(rng: &mut XorShift, zxid: Zxid) -> Op {
    match rng.below(18) {
        0..=2 => Op::Create(random_create(rng)),
        14..=16 => Op::Create(random_lock(rng)),
        17 => Op::Touch {
            path: random_target(rng),
            ttl_ms: rng.chance(30).then(|| rng.below(1_500)),
            czxid: random_czxid(rng, zxid),
        },
        3 => Op::Delete {
            path: random_target(rng),
            version: random_version(rng),
            czxid: random_czxid(rng, zxid),
            force: false,
        },
        4 => Op::Set {
            path: random_path(rng),
            data: random_data(rng),
            version: random_version(rng),
            czxid: None,
        },
        5 => Op::Get {
            path: random_target(rng),
            watch: rng.chance(60),
        },
        6 => Op::Exists {
            path: random_target(rng),
            watch: rng.chance(60),
        },
        7 => Op::Children {
            path: random_path(rng),
            watch: rng.chance(60),
            after: None,
            limit: None,
        },
        8 | 9 => {
            let n = rng.below(5);
            Op::Multi {
                ops: (0..n).map(|_| random_multi_op(rng, zxid)).collect(),
            }
        }
        10 => Op::Ping {
            ack: Xid(rng.below(50)),
        },
        11 => Op::SetWatches {
            last_zxid: Zxid(zxid.0.saturating_sub(rng.below(20))),
            data: (0..rng.below(3)).map(|_| random_path(rng)).collect(),
            exist: (0..rng.below(3)).map(|_| random_path(rng)).collect(),
            child: (0..rng.below(3)).map(|_| random_path(rng)).collect(),
            lock: (0..rng.below(3)).map(|_| random_lock_path(rng)).collect(),
        },
        12 if rng.chance(20) => Op::CloseSession,
        _ => Op::Delete {
            path: random_target(rng),
            version: None,
            czxid: None,
            force: false,
        },
    }
}

/// The generator's view of the sessions it opened.
#[derive(Default)]
struct Clients {
    /// Session, its secret, and its next xid.
    known: Vec<(SessionId, String, u64)>,
    /// Each session's attachment number from its latest grant.
    attach: BTreeMap<SessionId, u64>,
}

fn random_command(rng: &mut XorShift, clients: &mut Clients, zxid: Zxid) -> Command {
    let roll = rng.below(100);
    if clients.known.is_empty() || roll < 6 {
        let secret = format!("secret-{}", rng.below(1_000));
        return Command::OpenSession {
            timeout_ms: rng.below(2_500),
            secret: Secret(secret),
        };
    }
    if roll < 12 {
        return Command::Tick;
    }
    let i = usize::try_from(rng.below(u64::try_from(clients.known.len()).expect("small")))
        .expect("below len");
    let (session, secret, next_xid) = clients.known[i].clone();
    if roll < 15 {
        let secret = if rng.chance(80) {
            secret
        } else {
            "wrong".into()
        };
        return Command::ResumeSession {
            session,
            secret: Secret(secret),
            last_xid_received: Xid(rng.below(next_xid.saturating_add(1))),
        };
    }
    let op = random_op(rng, zxid);
    // Mostly fresh xids; sometimes a retry of an old one.
    let xid = if rng.chance(10) && next_xid > 1 {
        Xid(1 + rng.below(next_xid - 1))
    } else {
        clients.known[i].2 = next_xid + 1;
        Xid(next_xid)
    };
    // Now and then from an attachment the session has left.
    let attach = clients.attach.get(&session).copied().unwrap_or(0);
    let attach = if attach > 0 && rng.chance(3) {
        attach - 1
    } else {
        attach
    };
    Command::Request {
        session,
        attach,
        xid,
        op,
    }
}

/// Which bound a `LimitExceeded` message names, to count how often the
/// stream reaches each.
fn bound_of(message: &str) -> &'static str {
    if message.contains("bytes; the limit") {
        "tree bytes"
    } else if message.contains("children; the limit") {
        "children"
    } else if message.contains("nodes; the limit") {
        "nodes"
    } else if message.contains("sequence counter") {
        "sequence"
    } else if message.contains("all sessions hold") {
        "watches (all sessions)"
    } else if message.contains("watches") {
        "watches (one session)"
    } else {
        "other"
    }
}

#[test]
fn one_random_stream_gives_equal_outputs_on_two_coordinators() {
    let seed = seed();
    eprintln!("LATCHKEY_SEED={seed}");
    let mut rng = XorShift::new(seed);
    let mut left = Coordinator::new(small_config(), Zxid(7_000));
    let mut right = Coordinator::new(small_config(), Zxid(7_000));
    let mut clients = Clients::default();
    let mut now_ms = 0u64;
    let mut kinds = BTreeMap::<&str, u64>::new();
    let mut codes = BTreeMap::<String, u64>::new();
    let mut bounds = BTreeMap::<&str, u64>::new();
    // Run at least STEPS_MIN steps, and on until every path of interest has
    // been covered: an unlucky seed then runs longer instead of failing a
    // coverage floor, and every seed still checks determinism throughout.
    let mut step = 0u64;
    while step < STEPS_MIN || (uncovered(&kinds, &codes).is_some() && step < STEPS_MAX) {
        step += 1;
        now_ms += rng.below(120);
        let command = random_command(&mut rng, &mut clients, left.zxid());
        let a = left.apply(command.clone(), now_ms);
        let b = right.apply(command.clone(), now_ms);
        assert_eq!(
            a, b,
            "step {step}: outputs differ for {command:?}; rerun with LATCHKEY_SEED={seed}"
        );
        for c in [&left, &right] {
            if let Err(broken) = c.check_invariants() {
                panic!(
                    "step {step}: invariant broken after {command:?}: {broken}; rerun with \
                     LATCHKEY_SEED={seed}"
                );
            }
        }
        match &a.outcome {
            Outcome::Session(Ok(grant)) => {
                if !clients.known.iter().any(|(s, _, _)| *s == grant.session) {
                    clients
                        .known
                        .push((grant.session, grant.secret.0.clone(), 1));
                }
                clients.attach.insert(grant.session, grant.attach);
                *kinds.entry("session ok").or_default() += 1;
            }
            Outcome::Reply(reply) => {
                let label = match &reply.result {
                    Ok(OpResult::Created { .. }) => "created",
                    Ok(OpResult::Multi { .. }) => "multi ok",
                    Ok(_) => "ok",
                    Err(e) if e.code() == ErrorCode::SessionExpired => "expired",
                    Err(_) => "error",
                };
                *kinds.entry(label).or_default() += 1;
                if let Err(e) = &reply.result {
                    *codes.entry(format!("{:?}", e.code())).or_default() += 1;
                    if e.code() == ErrorCode::LimitExceeded {
                        *bounds.entry(bound_of(&e.why.to_string())).or_default() += 1;
                    }
                }
            }
            Outcome::Stale => *kinds.entry("stale").or_default() += 1,
            _ => {}
        }
        *kinds.entry("events").or_default() += u64::try_from(a.events.len()).expect("small");
        *kinds.entry("lock granted events").or_default() += u64::try_from(
            a.events
                .iter()
                .filter(|(_, e)| e.kind == WatchEventKind::LockGranted)
                .count(),
        )
        .expect("small");
        if let Outcome::Reply(reply) = &a.outcome {
            if let Ok(OpResult::Created { stat, .. }) = &reply.result {
                match stat.lock.as_ref().map(|l| l.granted.is_some()) {
                    Some(true) => *kinds.entry("lock granted at once").or_default() += 1,
                    Some(false) => *kinds.entry("lock waits").or_default() += 1,
                    None => {}
                }
            }
        }
        if left.zombie_count() > 0 {
            *kinds.entry("steps with zombies").or_default() += 1;
        }
        if left.next_deadline_ms() != right.next_deadline_ms() {
            panic!("step {step}: deadlines differ; rerun with LATCHKEY_SEED={seed}");
        }
        clients
            .known
            .retain(|(s, _, _)| left.session_alive(*s) || rng.chance(50));
    }
    eprintln!("outcome counts: {kinds:?}");
    eprintln!("error codes: {codes:?}");
    eprintln!("bounds hit: {bounds:?}");
    // The stream must have exercised the interesting paths, or it proves
    // little.
    if let Some(missing) = uncovered(&kinds, &codes) {
        panic!(
            "after {step} steps, {missing}: {kinds:?} {codes:?}; rerun with LATCHKEY_SEED={seed}"
        );
    }
}

/// Steps every random stream runs.
const STEPS_MIN: u64 = 4_000;
/// Steps a stream may run to cover every path of interest.
const STEPS_MAX: u64 = 40_000;

/// The first path of interest the stream has not covered often enough.
fn uncovered(kinds: &BTreeMap<&str, u64>, codes: &BTreeMap<String, u64>) -> Option<String> {
    let floors = [
        ("created", 10),
        ("multi ok", 10),
        ("error", 10),
        ("events", 10),
        ("lock granted at once", 10),
        ("lock waits", 10),
        // Rarer: a waiter's session often ends before its turn, and a
        // holder's session must expire (not close) to leave a zombie.
        ("lock granted events", 2),
        ("steps with zombies", 2),
        // A request from an attachment left by a resume.
        ("stale", 2),
    ];
    for (label, floor) in floors {
        let seen = kinds.get(label).copied().unwrap_or(0);
        if seen <= floor {
            return Some(format!("only {seen} {label:?} (want more than {floor})"));
        }
    }
    for code in ["Deadlock", "BadToken"] {
        let seen = codes.get(code).copied().unwrap_or(0);
        if seen <= 5 {
            return Some(format!("only {seen} {code} errors (want more than 5)"));
        }
    }
    None
}

// ---- proptest against a plain model ----

#[derive(Clone, Debug)]
enum ModelOp {
    Create(String, Vec<u8>),
    Set(String, Vec<u8>, Option<u64>),
    Delete(String, Option<u64>),
    Get(String),
}

fn model_path() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["/a", "/b", "/a/x", "/a/y", "/b/x", "/a/x/z"]).prop_map(String::from)
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    let data = prop::collection::vec(any::<u8>(), 0..4);
    let version = prop::option::of(0u64..3);
    prop_oneof![
        (model_path(), data.clone()).prop_map(|(p, d)| ModelOp::Create(p, d)),
        (model_path(), data, version.clone()).prop_map(|(p, d, v)| ModelOp::Set(p, d, v)),
        (model_path(), version).prop_map(|(p, v)| ModelOp::Delete(p, v)),
        model_path().prop_map(ModelOp::Get),
    ]
}

/// path -> (data, version); the root is implicit.
type Model = BTreeMap<String, (Vec<u8>, u64)>;

fn parent_of(path: &str) -> &str {
    latchkey_client::protocol::parent_path(path).expect("model paths are not the root")
}

/// What the model says the op returns: Ok(data and version) or an error code.
fn model_apply(model: &mut Model, op: &ModelOp) -> Result<Option<(Vec<u8>, u64)>, ErrorCode> {
    match op {
        ModelOp::Create(path, data) => {
            let parent = parent_of(path);
            if parent != "/" && !model.contains_key(parent) {
                return Err(ErrorCode::NoNode);
            }
            if model.contains_key(path) {
                return Err(ErrorCode::NodeExists);
            }
            model.insert(path.clone(), (data.clone(), 0));
            Ok(Some((data.clone(), 0)))
        }
        ModelOp::Set(path, data, version) => {
            let (old, v) = model.get_mut(path).ok_or(ErrorCode::NoNode)?;
            if version.is_some_and(|want| want != *v) {
                return Err(ErrorCode::BadVersion);
            }
            *old = data.clone();
            *v += 1;
            Ok(Some((data.clone(), *v)))
        }
        ModelOp::Delete(path, version) => {
            let (_, v) = model.get(path).ok_or(ErrorCode::NoNode)?;
            if version.is_some_and(|want| want != *v) {
                return Err(ErrorCode::BadVersion);
            }
            if model.keys().any(|k| parent_of(k) == path) {
                return Err(ErrorCode::NotEmpty);
            }
            model.remove(path);
            Ok(None)
        }
        ModelOp::Get(path) => model.get(path).cloned().map(Some).ok_or(ErrorCode::NoNode),
    }
}

fn real_op(op: &ModelOp) -> Op {
    match op.clone() {
        ModelOp::Create(path, data) => Op::Create(Create {
            path,
            data: Data(data),
            ..Create::default()
        }),
        ModelOp::Set(path, data, version) => Op::Set {
            path,
            data: Data(data),
            version,
            czxid: None,
        },
        ModelOp::Delete(path, version) => Op::Delete {
            path,
            version,
            czxid: None,
            force: false,
        },
        ModelOp::Get(path) => Op::Get { path, watch: false },
    }
}

proptest! {
    #[test]
    fn persistent_ops_match_a_btreemap_model(ops in prop::collection::vec(model_op(), 1..80)) {
        let mut c = Coordinator::new(super::tests::config(), Zxid(1));
        let session = match c.apply(
            Command::OpenSession { timeout_ms: 10_000, secret: Secret("s".into()) },
            0,
        ).outcome {
            Outcome::Session(Ok(grant)) => grant.session,
            other => panic!("open failed: {other:?}"),
        };
        let mut model = Model::new();
        for (i, op) in ops.iter().enumerate() {
            let xid = Xid(u64::try_from(i).expect("small") + 1);
            let out = c.apply(Command::Request { session, attach: 0, xid, op: real_op(op) }, 1);
            prop_assert_eq!(c.check_invariants(), Ok(()));
            let Outcome::Reply(reply) = out.outcome else { panic!("not a reply") };
            let expected = model_apply(&mut model, op);
            let actual = match reply.result {
                Ok(OpResult::Created { stat, .. }) | Ok(OpResult::Stat { stat }) => {
                    let data = match op {
                        ModelOp::Create(_, d) | ModelOp::Set(_, d, _) => d.clone(),
                        _ => unreachable!("only create and set answer a stat"),
                    };
                    prop_assert_eq!(stat.data_length, u64::try_from(data.len()).expect("small"));
                    Ok(Some((data, stat.version)))
                }
                Ok(OpResult::Data { data, stat }) => Ok(Some((data.0, stat.version))),
                Ok(OpResult::Deleted) => Ok(None),
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => Err(e.code()),
            };
            prop_assert_eq!(actual, expected, "step {} {:?}", i, op);
            prop_assert_eq!(c.node_count(), model.len() + 1);
        }
    }
}

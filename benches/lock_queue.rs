//! The cost of one lock create's deadlock check behind a long queue, in the
//! state machine alone (no sockets): the time `Coordinator::apply` takes for
//! an exclusive create at the back of a queue of N waiters, each from its
//! own session.
//!
//!   cargo bench --bench lock_queue                  # N = 1000, 4000, 20000
//!   cargo bench --bench lock_queue -- 500 1000 2000 # chosen sizes
//!
//! Two queue shapes: "exclusive" (one holder, N exclusive waiters) and
//! "mixed" (one holder, then runs of one exclusive and three shared
//! waiters). Two creators: a "fresh" session that owns no other lock node,
//! and a "holding" session that holds a lock in another queue, so that a
//! search for a cycle back to it cannot stop early. Each create is timed,
//! then deleted, REPEATS times; the median is printed. The queue is built
//! through `apply` too, so building costs what the creates cost.

use std::time::{Duration, Instant};

use latchkey::state::{Command, Config, Coordinator, Outcome};
use latchkey_client::protocol::{
    Create, LockMode, LockSpec, NodeKind, Op, OpResult, Secret, SessionId, Xid, Zxid,
};

const REPEATS: usize = 5;

struct Bench {
    c: Coordinator,
    xid: u64,
}

impl Bench {
    fn new(n: usize) -> Bench {
        let config = Config {
            sessions_max: latchkey::state::count(n.saturating_add(16)),
            ..Config::default()
        };
        Bench {
            c: Coordinator::new(config, Zxid(1_000)),
            xid: 0,
        }
    }

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

    /// Sends `op` as `session`; xids are shared across sessions, which only
    /// needs them to increase within each.
    fn send(&mut self, session: SessionId, op: Op) -> Result<OpResult, String> {
        self.xid += 1;
        let out = self.c.apply(
            Command::Request {
                attach: 0,
                session,
                xid: Xid(self.xid),
                op,
            },
            0,
        );
        match out.outcome {
            Outcome::Reply(reply) => reply.result.map_err(|e| format!("{:?}", e.code())),
            other => panic!("request answered {other:?}"),
        }
    }

    fn lock(&mut self, session: SessionId, prefix: &str, mode: LockMode) -> Result<String, String> {
        let create = Create {
            path: prefix.into(),
            kind: NodeKind::Ephemeral,
            sequential: true,
            make_parents: true,
            lock: Some(LockSpec {
                mode,
                delay_ms: None,
            }),
            ..Create::default()
        };
        match self.send(session, Op::Create(create))? {
            OpResult::Created { path, .. } => Ok(path),
            other => panic!("create answered {other:?}"),
        }
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn run(n: usize, mixed: bool) {
    let mut b = Bench::new(n);
    let holder = b.open();
    b.lock(holder, "/q/n-", LockMode::Exclusive)
        .expect("the first node");
    let build = Instant::now();
    for i in 0..n {
        let s = b.open();
        let mode = if mixed && i % 4 != 0 {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        };
        b.lock(s, "/q/n-", mode).expect("a waiter");
    }
    let build = build.elapsed();
    let fresh = b.open();
    let holding = b.open();
    b.lock(holding, "/other/n-", LockMode::Exclusive)
        .expect("a lock elsewhere");
    let mut line = format!(
        "{:>9} N={n:<6} build {:>9.3} s",
        if mixed { "mixed" } else { "exclusive" },
        build.as_secs_f64()
    );
    for (name, s) in [("fresh", fresh), ("holding", holding)] {
        let mut samples = Vec::with_capacity(REPEATS);
        for _ in 0..REPEATS {
            let start = Instant::now();
            let path = b
                .lock(s, "/q/n-", LockMode::Exclusive)
                .expect("no cycle: nothing waits for this session");
            samples.push(start.elapsed());
            b.send(
                s,
                Op::Delete {
                    path,
                    version: None,
                    czxid: None,
                    force: false,
                },
            )
            .expect("delete");
        }
        line.push_str(&format!(
            "  {name} create {:>10.1} us",
            median(samples).as_secs_f64() * 1e6
        ));
    }
    println!("{line}");
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse().expect("sizes are numbers"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 4_000, 20_000]
    } else {
        sizes
    };
    println!(
        "lock_queue: median of {REPEATS} creates at the back of a queue of N waiters; \
         cores: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for &n in &sizes {
        for mixed in [false, true] {
            run(n, mixed);
        }
    }
}

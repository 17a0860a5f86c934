//! Round trips of the basic operations, as ratios to the floor: a bare
//! length-delimited echo over loopback, measured by this harness in the
//! same run with the same codec.
//!
//!   cargo bench --bench ops                 # full: 20,000 ops a workload
//!   cargo bench --bench ops -- --quick      # 2,000 ops a workload
//!   cargo bench --bench ops -- --server ADDR   # against a running server
//!
//! Each workload warms up, then runs a fixed count sequentially on one
//! connection; the whole set is repeated three times and the median run of
//! each workload (by p50) is printed.
//!
//! A second table, once per run, gives the pauses the default limits allow:
//! a lock create's deadlock check behind a session waiting in 0, 1,000
//! (the default limit), 10,000 and 20,000 queues (and, as the check's known
//! worst case, by a caller that a session with as many waits waits for),
//! and the close of that session, whose waits go in one step; one page of
//! a listing; a whole listing of 100,000 children; another client's `get`
//! while that listing runs over and over, whose max is the longest pause a
//! listing causes; the close of a session owning 100,000 ephemeral nodes,
//! and another client's `get` while it runs, whose max is the longest pause
//! a close causes; and the close of a session holding 65,536 watches (the
//! most a session may), dropped in one step. The server allows 20,001 waits per session here (default
//! 1,000) so that the larger rows can be built.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use latchkey::server::{Config, RunningServer};
use latchkey_client::protocol::{self, limits, Create, LockMode, LockSpec, NodeKind, Op, OpResult};
use latchkey_client::{Client, ClientOptions, CreateOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

const REPEATS: usize = 3;

struct Run {
    name: &'static str,
    histogram: Histogram<u64>,
    elapsed: Duration,
}

impl Run {
    fn p(&self, quantile: f64) -> u64 {
        self.histogram.value_at_quantile(quantile)
    }
}

/// Records one workload's latencies: `ops / 10` warm-up calls are not
/// recorded, then `ops` are.
struct Recorder {
    name: &'static str,
    ops: u64,
    done: u64,
    histogram: Histogram<u64>,
    start: Option<Instant>,
    end: Option<Instant>,
}

impl Recorder {
    fn new(name: &'static str, ops: u64) -> Recorder {
        Recorder {
            name,
            ops,
            done: 0,
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            start: None,
            end: None,
        }
    }

    /// Calls to make in all, warm-up included.
    fn calls(&self) -> u64 {
        self.ops + self.ops / 10
    }

    fn record(&mut self, began: Instant) {
        self.record_until(began, Instant::now());
    }

    /// Records a call that began at `began` and ended at `now`.
    fn record_until(&mut self, began: Instant, now: Instant) {
        self.done += 1;
        if self.done <= self.ops / 10 {
            return;
        }
        self.start.get_or_insert(began);
        self.end = Some(now);
        let micros = u64::try_from(now.duration_since(began).as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(micros.max(1));
    }

    fn finish(self) -> Run {
        let elapsed = match (self.start, self.end) {
            (Some(start), Some(end)) => end.duration_since(start),
            _ => Duration::ZERO,
        };
        Run {
            name: self.name,
            histogram: self.histogram,
            elapsed,
        }
    }
}

/// A bare framed echo server on 127.0.0.1:0.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let _ = socket.set_nodelay(true);
            tokio::spawn(async move {
                let mut framed = Framed::new(socket, protocol::codec(limits::FRAME_BYTES_MAX));
                while let Some(Ok(frame)) = framed.next().await {
                    if framed.send(frame.freeze()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn echo_run(addr: SocketAddr, ops: u64) -> Run {
    let socket = TcpStream::connect(addr).await.expect("connect echo");
    socket.set_nodelay(true).expect("nodelay");
    let mut framed = Framed::new(socket, protocol::codec(limits::FRAME_BYTES_MAX));
    // About the size of a small request.
    let body = Bytes::from(vec![b'x'; 96]);
    let mut recorder = Recorder::new("echo (floor)", ops);
    for _ in 0..recorder.calls() {
        let began = Instant::now();
        framed.send(body.clone()).await.expect("echo send");
        framed.next().await.expect("echo open").expect("echo frame");
        recorder.record(began);
    }
    recorder.finish()
}

async fn latchkey_runs(client: &Client, ops: u64, round: usize) -> Vec<Run> {
    let base = format!("/bench-{round}");
    let data_path = format!("{base}/data");
    client
        .create(
            &data_path,
            vec![b'x'; 64],
            CreateOptions::persistent().make_parents(),
        )
        .await
        .expect("create data node");

    let mut get = Recorder::new("get", ops);
    for _ in 0..get.calls() {
        let began = Instant::now();
        client.get(&data_path).await.expect("get");
        get.record(began);
    }

    let queue = format!("{base}/locks/x/lock-");
    let mut cycle = Recorder::new("lock node cycle (create+delete)", ops);
    for _ in 0..cycle.calls() {
        let began = Instant::now();
        let created = client
            .create(
                &queue,
                "",
                CreateOptions::ephemeral().sequential().make_parents(),
            )
            .await
            .expect("create lock node");
        client
            .delete(&created.path, None)
            .await
            .expect("delete lock node");
        cycle.record(began);
    }

    let mut set = Recorder::new("set", ops);
    for i in 0..set.calls() {
        let began = Instant::now();
        client
            .set(&data_path, i.to_string().as_str(), None)
            .await
            .expect("set");
        set.record(began);
    }
    vec![get.finish(), cycle.finish(), set.finish()]
}

fn median_by_p50(mut runs: Vec<Run>) -> Run {
    runs.sort_by_key(|r| r.p(0.5));
    let middle = runs.len() / 2;
    runs.swap_remove(middle)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let server_arg = args
        .iter()
        .position(|a| a == "--server")
        .and_then(|i| args.get(i + 1).cloned());
    let ops: u64 = if quick { 2_000 } else { 20_000 };

    let own = match &server_arg {
        Some(_) => None,
        None => Some(
            RunningServer::start(Config {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                check_invariants: false,
                coordinator: latchkey::state::Config {
                    waits_per_session_max: latchkey::state::count(WAITS_MAX + 1),
                    ..latchkey::state::Config::default()
                },
                ..Config::default()
            })
            .await
            .expect("start server"),
        ),
    };
    let addr = server_arg.unwrap_or_else(|| {
        own.as_ref()
            .map(|s| s.addr().to_string())
            .unwrap_or_default()
    });
    let echo = echo_server().await;
    let client = Client::connect(ClientOptions::new(addr.clone()))
        .await
        .expect("connect to latchkey");

    println!(
        "latchkey bench ops: {} ops a workload, median of {REPEATS} runs; {} cores; commit {}",
        ops,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        option_env!("LATCHKEY_COMMIT").unwrap_or("(set LATCHKEY_COMMIT to record it)")
    );
    println!(
        "command: cargo bench --bench ops{}",
        if quick { " -- --quick" } else { "" }
    );
    let mut by_workload: Vec<Vec<Run>> = Vec::new();
    for round in 0..REPEATS {
        let mut runs = vec![echo_run(echo, ops).await];
        runs.extend(latchkey_runs(&client, ops, round).await);
        for (i, run) in runs.into_iter().enumerate() {
            if by_workload.len() <= i {
                by_workload.push(Vec::new());
            }
            by_workload[i].push(run);
        }
    }
    let medians: Vec<Run> = by_workload.into_iter().map(median_by_p50).collect();
    print_table(&medians[0], &medians);
    println!();
    println!("pauses (one run; ratios against the floor above):");
    let mut pauses = deadlock_runs(&addr, ops / 10).await;
    pauses.extend(listing_runs(&addr, &client, ops).await);
    print_table(&medians[0], &pauses);
    let _ = client.close().await;
    if let Some(server) = own {
        server.stop().await;
    }
}

/// Prints `runs` with their ratios to `floor`.
fn print_table(floor: &Run, runs: &[Run]) {
    println!(
        "{:<32} {:>7} {:>7} {:>8} {:>8} {:>8} {:>9}   {:>6} {:>6} {:>7}",
        "workload",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "max us",
        "mean us",
        "ops/s",
        "x p50",
        "x p99",
        "x p99.9"
    );
    for run in runs {
        let ratio = |q: f64| run.p(q) as f64 / floor.p(q).max(1) as f64;
        println!(
            "{:<32} {:>7} {:>7} {:>8} {:>8} {:>8.0} {:>9.0}   {:>6.2} {:>6.2} {:>7.2}",
            run.name,
            run.p(0.5),
            run.p(0.99),
            run.p(0.999),
            run.histogram.max(),
            run.histogram.mean(),
            run.histogram.len() as f64 / run.elapsed.as_secs_f64(),
            ratio(0.5),
            ratio(0.99),
            ratio(0.999),
        );
    }
}

/// The most waits a session has in the deadlock rows.
const WAITS_MAX: usize = 20_000;

/// Requests kept in flight while building a scenario.
const IN_FLIGHT: usize = 64;

async fn connect(addr: &str) -> Client {
    Client::connect(ClientOptions::new(addr))
        .await
        .expect("connect to latchkey")
}

/// Creates an exclusive lock node under `lock` for `client`; its path.
async fn lock_node(client: &Client, lock: &str) -> String {
    let op = Op::Create(Create {
        path: format!("{lock}/n-"),
        kind: NodeKind::Ephemeral,
        sequential: true,
        make_parents: true,
        lock: Some(LockSpec {
            mode: LockMode::Exclusive,
            delay_ms: None,
        }),
        ..Create::default()
    });
    match client.request(op).await.expect("a lock node") {
        OpResult::Created { path, .. } => path,
        other => panic!("a lock create answered {other:?}"),
    }
}

/// A new session waiting in `n` queues under `base`, each held by `holder`.
async fn waiting_in(addr: &str, holder: &Client, n: usize, base: &str) -> Client {
    let waiter = connect(addr).await;
    let waiter_ref = &waiter;
    stream::iter(0..n)
        .map(|i| async move {
            let queue = format!("{base}/q{i}");
            lock_node(holder, &queue).await;
            lock_node(waiter_ref, &queue).await;
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|()| async {})
        .await;
    waiter
}

/// The deadlock check's cost: a create by a caller that holds a lock of its
/// own, queued behind a session that waits in W queues, for W = 0, 1,000
/// (the default limit), 10,000 and 20,000; then the same with a session of
/// W waits also queued behind the caller, so that both ends of the search
/// are large (its known worst case). Only the create is timed; each is
/// deleted after. Then the close of the session waiting in W queues: its
/// waits go in the close's first step, the pause that ending it causes.
async fn deadlock_runs(addr: &str, ops: u64) -> Vec<Run> {
    let rows: [(usize, [&'static str; 3]); 4] = [
        (
            0,
            [
                "deadlock check, 0 waits ahead",
                "  and 0 waits behind caller",
                "  close of the 0-wait session",
            ],
        ),
        (
            1_000,
            [
                "deadlock check, 1,000 waits ahead",
                "  and 1,000 waits behind",
                "  close of a 1,000-wait session",
            ],
        ),
        (
            10_000,
            [
                "deadlock check, 10,000 waits ahead",
                "  and 10,000 waits behind",
                "  close of a 10,000-wait session",
            ],
        ),
        (
            WAITS_MAX,
            [
                "deadlock check, 20,000 waits ahead",
                "  and 20,000 waits behind",
                "  close of a 20,000-wait session",
            ],
        ),
    ];
    let holder = connect(addr).await;
    let mut runs = Vec::new();
    for (waits, [name, both_name, close_name]) in rows {
        let base = format!("/deadlock-{waits}");
        let busy = waiting_in(addr, &holder, waits, &format!("{base}/busy-waits")).await;
        let ahead = format!("{base}/ahead");
        lock_node(&busy, &ahead).await;
        let caller = connect(addr).await;
        let mine = format!("{base}/mine");
        lock_node(&caller, &mine).await;
        runs.push(timed_creates(name, &caller, &ahead, ops).await);
        let behind = waiting_in(addr, &holder, waits, &format!("{base}/behind-waits")).await;
        lock_node(&behind, &mine).await;
        // Slow by design: fewer samples.
        let both_ops = (ops / 10).max(20);
        runs.push(timed_creates(both_name, &caller, &ahead, both_ops).await);
        let mut close = Recorder::new(close_name, 1);
        let began = Instant::now();
        busy.close().await.expect("close");
        close.record(began);
        runs.push(close.finish());
        for client in [caller, behind] {
            let _ = client.close().await;
        }
    }
    let _ = holder.close().await;
    runs
}

/// Times `ops` lock creates (plus a tenth to warm up) by `caller` under
/// `lock`, deleting each after it is timed.
async fn timed_creates(name: &'static str, caller: &Client, lock: &str, ops: u64) -> Run {
    let mut recorder = Recorder::new(name, ops);
    for _ in 0..recorder.calls() {
        let began = Instant::now();
        let path = lock_node(caller, lock).await;
        recorder.record(began);
        caller.delete(&path, None).await.expect("delete");
    }
    recorder.finish()
}

/// Children of the listed node in the listing rows.
const WIDE: usize = 100_000;

/// Listings: one page (1,000 names), a whole listing of 100,000 children,
/// and `client`'s `get` while another client lists them over and over.
async fn listing_runs(addr: &str, client: &Client, ops: u64) -> Vec<Run> {
    let setup = connect(addr).await;
    let setup_ref = &setup;
    setup
        .create("/wide", "", CreateOptions::persistent())
        .await
        .expect("create /wide");
    stream::iter(0..WIDE)
        .map(|i| async move {
            setup_ref
                .create(&format!("/wide/c{i:06}"), "", CreateOptions::persistent())
                .await
                .expect("create a child");
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|()| async {})
        .await;

    let mut page = Recorder::new("one listing page (1,000 names)", ops / 10);
    for _ in 0..page.calls() {
        let began = Instant::now();
        client
            .children_page("/wide", None, None)
            .await
            .expect("a page");
        page.record(began);
    }
    let mut whole = Recorder::new("whole listing, 100,000 children", 20);
    for _ in 0..whole.calls() {
        let began = Instant::now();
        let (names, _) = client.children("/wide").await.expect("a listing");
        assert_eq!(names.len(), WIDE);
        whole.record(began);
    }

    client
        .create("/wide-ping", "x", CreateOptions::persistent())
        .await
        .expect("create /wide-ping");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lister = {
        let stop = stop.clone();
        let lister = connect(addr).await;
        tokio::spawn(async move {
            let mut listings = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                lister.children("/wide").await.expect("a listing");
                listings += 1;
            }
            let _ = lister.close().await;
            listings
        })
    };
    let mut get = Recorder::new("get while another client lists", ops);
    for _ in 0..get.calls() {
        let began = Instant::now();
        client.get("/wide-ping").await.expect("get");
        get.record(began);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let listings = lister.await.expect("the lister");
    println!("(the lister finished {listings} listings of {WIDE} children meanwhile)");
    let _ = setup.close().await;
    let mut runs = vec![page.finish(), whole.finish(), get.finish()];
    runs.extend(closes(addr, client).await);
    runs.push(watcher_close(addr).await);
    runs
}

/// Closing a session that holds the most watches a session may
/// (`limits::WATCHES_PER_SESSION_MAX`): they are dropped in the close's
/// first step, as at a resume, so its time is that step's pause.
async fn watcher_close(addr: &str) -> Run {
    let watcher = connect(addr).await;
    let watcher_ref = &watcher;
    stream::iter(0..limits::WATCHES_PER_SESSION_MAX)
        .map(|i| async move {
            let op = Op::Exists {
                path: format!("/watched/w{i}"),
                watch: true,
            };
            watcher_ref.request(op).await.expect("a watch");
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|()| async {})
        .await;
    let mut recorder = Recorder::new("close of a session with 65,536 watches", 1);
    let began = Instant::now();
    watcher.close().await.expect("close");
    recorder.record(began);
    recorder.finish()
}

/// Ephemeral nodes of each session the close rows end.
const EPHEMERALS: usize = 100_000;

/// Closing a session that owns `EPHEMERALS` ephemeral nodes, three times,
/// each timed alone; and another client's `get`, over and over while each
/// close runs, whose max is the longest pause a close causes (the server
/// deletes at most `step_deletes_max` nodes a step and lets go of the
/// coordinator between steps).
async fn closes(addr: &str, client: &Client) -> Vec<Run> {
    let mut recorder = Recorder::new("close of a session with 100,000 ephemerals", 3);
    let mut during = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut during_elapsed = Duration::ZERO;
    for round in 0..recorder.calls() {
        let owner = connect(addr).await;
        let owner_ref = &owner;
        stream::iter(0..EPHEMERALS)
            .map(|i| async move {
                let path = format!("/ephemerals-{round}/p{}/e{i}", i % 10);
                owner_ref
                    .create(&path, "", CreateOptions::ephemeral().make_parents())
                    .await
                    .expect("an ephemeral node");
            })
            .buffer_unordered(IN_FLIGHT)
            .for_each(|()| async {})
            .await;
        let began = Instant::now();
        let closing = tokio::spawn(async move {
            owner.close().await.expect("close");
            Instant::now()
        });
        while !closing.is_finished() {
            let sent = Instant::now();
            client.get("/wide-ping").await.expect("get");
            let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
            during.saturating_record(micros.max(1));
        }
        let closed = closing.await.expect("the close");
        during_elapsed += closed.duration_since(began);
        recorder.record_until(began, closed);
    }
    let during = Run {
        name: "get while a session of 100,000 closes",
        histogram: during,
        elapsed: during_elapsed,
    };
    vec![recorder.finish(), during]
}

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

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use latchkey::server::{Config, RunningServer};
use latchkey_client::protocol::{self, limits};
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
        self.done += 1;
        if self.done <= self.ops / 10 {
            return;
        }
        self.start.get_or_insert(began);
        let now = Instant::now();
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
    let floor = &medians[0];
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
    for run in &medians {
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
    let _ = client.close().await;
    if let Some(server) = own {
        server.stop().await;
    }
}

//! The client library's own cost per request: sequential `exists /` over a
//! bare socket and through the client, and uncontended lock cycles written
//! by hand and through the client's `Lock`, against
//! a `latchkey serve` child on 127.0.0.1:0. A focused companion to the
//! round-trip line of `benches/locks.rs`, small enough to run under
//! valgrind.
//!
//!   cargo bench --bench client_path                    # all three, p50s
//!   cargo bench --bench client_path -- --only exists --ops 2000
//!
//! `--only bare|exists|bare_lock|lock` runs one workload (with no warm-up of the
//! others), so that `valgrind --tool=callgrind` at two `--ops` counts gives
//! the instructions per request by difference. `--current-thread` runs the
//! client on a current-thread runtime instead of the default multi-thread
//! one; `--on-worker` runs the workloads in a spawned task, on a worker
//! thread, instead of in `block_on` on the main thread. Nothing here
//! asserts on speed.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use latchkey_client::protocol::{
    self, limits, Create, Hello, LockMode, LockSpec, NodeKind, Op, OpResult, Request,
    ServerMessage, Xid,
};
use latchkey_client::{Client, ClientOptions, Lock};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// The `latchkey serve` child; killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start() -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_latchkey"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--in-memory",
                "--no-lease-file",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start latchkey serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the server prints its address");
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("the server printed {line:?}, not `listening on ADDR`"));
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn p50_us(histogram: &Histogram<u64>) -> u64 {
    histogram.value_at_quantile(0.5)
}

fn record(histogram: &mut Histogram<u64>, began: Instant) {
    let us = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(us);
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

type Raw = Framed<TcpStream, tokio_util::codec::LengthDelimitedCodec>;

async fn raw_session(addr: SocketAddr) -> Raw {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut framed = Framed::new(stream, protocol::codec(limits::REPLY_FRAME_BYTES_MAX));
    framed
        .send(protocol::encode(&Hello {
            protocol_version: protocol::PROTOCOL_VERSION,
            session_timeout_ms: 10_000,
            resume: None,
        }))
        .await
        .expect("hello");
    framed
        .next()
        .await
        .expect("welcome")
        .expect("welcome frame");
    framed
}

/// Sends `op` as `xid` and waits for its reply's result.
async fn call(raw: &mut Raw, xid: u64, op: Op) -> OpResult {
    let request = Request { xid: Xid(xid), op };
    raw.send(protocol::encode(&request)).await.expect("send");
    let frame = raw.next().await.expect("reply").expect("reply frame");
    match serde_json::from_slice::<ServerMessage>(&frame) {
        Ok(ServerMessage::Reply(reply)) => reply.result.expect("a successful reply"),
        other => panic!("expected a reply, got {other:?}"),
    }
}

/// The lock cycle of `lock` written by hand: the create the server grants
/// at once, then the guarded delete.
async fn bare_lock(addr: SocketAddr, ops: u64) -> Histogram<u64> {
    let mut raw = raw_session(addr).await;
    let mut histogram = histogram();
    let mut xid = 0;
    for _ in 0..ops {
        let began = Instant::now();
        xid += 1;
        let create = Op::Create(Create {
            path: "/bench/client_path_bare/lock-".into(),
            kind: NodeKind::Ephemeral,
            sequential: true,
            make_parents: true,
            lock: Some(LockSpec {
                mode: LockMode::Exclusive,
                delay_ms: None,
            }),
            ..Create::default()
        });
        let OpResult::Created { path, stat } = call(&mut raw, xid, create).await else {
            panic!("a create answered with something else");
        };
        assert!(stat.lock.and_then(|l| l.granted).is_some(), "not granted");
        xid += 1;
        let delete = Op::Delete {
            path,
            version: None,
            czxid: Some(stat.czxid),
            force: false,
        };
        call(&mut raw, xid, delete).await;
        record(&mut histogram, began);
    }
    histogram
}

async fn bare(addr: SocketAddr, ops: u64) -> Histogram<u64> {
    let mut framed = raw_session(addr).await;
    let mut histogram = histogram();
    for xid in 1..=ops {
        let began = Instant::now();
        let request = Request {
            xid: Xid(xid),
            op: Op::Exists {
                path: "/".into(),
                watch: false,
            },
        };
        framed.send(protocol::encode(&request)).await.expect("send");
        let frame = framed.next().await.expect("reply").expect("reply frame");
        match serde_json::from_slice::<ServerMessage>(&frame) {
            Ok(ServerMessage::Reply(_)) => {}
            other => panic!("expected a reply, got {other:?}"),
        }
        record(&mut histogram, began);
    }
    histogram
}

async fn exists(addr: SocketAddr, ops: u64) -> Histogram<u64> {
    let client = Client::connect(ClientOptions::new(addr.to_string()))
        .await
        .expect("connect");
    let mut histogram = histogram();
    for _ in 0..ops {
        let began = Instant::now();
        client.exists("/").await.expect("exists");
        record(&mut histogram, began);
    }
    client.close().await.expect("close");
    histogram
}

async fn lock(addr: SocketAddr, ops: u64) -> Histogram<u64> {
    let client = Client::connect(ClientOptions::new(addr.to_string()))
        .await
        .expect("connect");
    let lock = Lock::new(&client, "/bench/client_path");
    let mut histogram = histogram();
    for _ in 0..ops {
        let began = Instant::now();
        let guard = lock.acquire().await.expect("acquire");
        guard.release().await.expect("release");
        record(&mut histogram, began);
    }
    client.close().await.expect("close");
    histogram
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let ops: u64 = value("--ops").map_or(20_000, |s| s.parse().expect("--ops N"));
    let only = value("--only");
    let runtime = if args.iter().any(|a| a == "--current-thread") {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build()
    .expect("runtime");
    let server = Server::start();
    let addr = server.addr;
    let warm = ops / 10;
    let workloads = async move {
        let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
        if run("bare") {
            if only.is_none() {
                bare(addr, warm).await;
            }
            let h = bare(addr, ops).await;
            println!(
                "bare exists:   p50 {} us, p99 {} us",
                p50_us(&h),
                h.value_at_quantile(0.99)
            );
        }
        if run("exists") {
            if only.is_none() {
                exists(addr, warm).await;
            }
            let h = exists(addr, ops).await;
            println!(
                "client exists: p50 {} us, p99 {} us",
                p50_us(&h),
                h.value_at_quantile(0.99)
            );
        }
        if run("bare_lock") {
            if only.is_none() {
                bare_lock(addr, warm).await;
            }
            let h = bare_lock(addr, ops).await;
            println!(
                "bare lock:     p50 {} us, p99 {} us",
                p50_us(&h),
                h.value_at_quantile(0.99)
            );
        }
        if run("lock") {
            if only.is_none() {
                lock(addr, warm).await;
            }
            let h = lock(addr, ops).await;
            println!(
                "lock cycle:    p50 {} us, p99 {} us",
                p50_us(&h),
                h.value_at_quantile(0.99)
            );
        }
    };
    if args.iter().any(|a| a == "--on-worker") {
        runtime.block_on(async { tokio::spawn(workloads).await.expect("the workloads ran") });
    } else {
        runtime.block_on(workloads);
    }
    drop(server);
}

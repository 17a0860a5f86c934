//! The lock benchmark's harness: what people pick a lock service on,
//! measured in one run, as ratios to the floor (the round trip of a bare
//! length-delimited echo over loopback, measured here in the same run).
//!
//! Two benches run it: `benches/locks.rs` (latchkey alone, `cargo bench
//! --bench locks`) and the peer comparison in benches/peers, a package of
//! its own so that building latchkey's tests never builds the peers' client
//! crates (etcd's needs protoc). Each includes this folder as a module and
//! calls [`main`] with the systems it adds beside latchkey.
//!
//! Arguments, the same for both: `--quick` (a short smoke run, as CI does),
//! `--server ADDR` (a running latchkey instead of one started here),
//! `--only uncontended,handoff,...` (some of the workloads).
//!
//! latchkey runs as its own process (the `latchkey` binary of the package
//! that builds the bench, on 127.0.0.1:0), so its CPU time and memory can be
//! read from /proc; the echo floor runs as a process too.
//!
//! Workloads: uncontended (one client, acquire + release of one lock),
//! handoff (32 clients on one lock; from the holder's release call to the
//! next holder's acquire returning), spread (32 clients on 32 locks),
//! sessions (idle sessions heartbeating: the server's memory and CPU for
//! them) and fan-out (watchers on one node: from the write to the last
//! event). Every lock workload checks, as it runs, that no two clients hold
//! a lock at once and that fencing tokens rise; a broken check fails the
//! bench. Nothing here asserts on speed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use latchkey_client::protocol::{self, limits, Hello, Op, Request, ServerMessage, Xid};
use latchkey_client::{Client, ClientOptions, Lock, LockGuard};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// Clients in the handoff and spread workloads.
const CLIENTS: usize = 32;

/// How much of each workload a run does.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    /// Echo round trips for the floor.
    echoes: u64,
    /// Uncontended acquire + release cycles.
    cycles: u64,
    /// Handoffs in the handoff workload.
    handoffs: u64,
    /// Lock cycles, all clients together, in the spread workload.
    spread: u64,
    /// Idle sessions.
    sessions: usize,
    /// How long the idle sessions are watched for CPU time.
    idle: Duration,
    /// Watchers on the fan-out node.
    watchers: usize,
    /// Writes in the fan-out workload.
    fanouts: u64,
    /// Repeats of each workload; the median run is shown.
    repeats: usize,
}

impl Sizes {
    fn quick() -> Sizes {
        Sizes {
            echoes: 2_000,
            cycles: 500,
            handoffs: 640,
            spread: 3_200,
            sessions: 1_000,
            idle: Duration::from_secs(4),
            watchers: 200,
            fanouts: 10,
            repeats: 1,
        }
    }

    fn full() -> Sizes {
        Sizes {
            echoes: 20_000,
            cycles: 5_000,
            handoffs: 6_400,
            spread: 32_000,
            sessions: 10_000,
            idle: Duration::from_secs(10),
            watchers: 1_000,
            fanouts: 30,
            repeats: 3,
        }
    }
}

/// One client's hold on locks of one system, whatever the system.
pub trait Locker: Send {
    /// Waits until this client holds `name`; returns the fencing token if
    /// the system gives one.
    fn acquire<'a>(&'a mut self, name: &'a str) -> BoxFuture<'a, Result<Option<u64>, String>>;
    /// Releases what the last `acquire` took.
    fn release(&mut self) -> BoxFuture<'_, Result<(), String>>;
}

/// A system under test: makes clients, each with its own connection.
pub trait System: Send + Sync {
    fn name(&self) -> String;
    fn locker(&self) -> BoxFuture<'_, Result<Box<dyn Locker>, String>>;
}

struct Latchkey {
    addr: String,
}

struct LatchkeyLocker {
    client: Client,
    guard: Option<LockGuard>,
}

impl Locker for LatchkeyLocker {
    fn acquire<'a>(&'a mut self, name: &'a str) -> BoxFuture<'a, Result<Option<u64>, String>> {
        Box::pin(async move {
            let guard = Lock::new(&self.client, format!("/bench/{name}"))
                .acquire()
                .await
                .map_err(|e| e.to_string())?;
            let token = guard.token().0;
            self.guard = Some(guard);
            Ok(Some(token))
        })
    }

    fn release(&mut self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            match self.guard.take() {
                Some(guard) => guard.release().await.map_err(|e| e.to_string()),
                None => Err("release without a hold".into()),
            }
        })
    }
}

impl System for Latchkey {
    fn name(&self) -> String {
        "latchkey".into()
    }

    fn locker(&self) -> BoxFuture<'_, Result<Box<dyn Locker>, String>> {
        Box::pin(async move {
            let client = Client::connect(ClientOptions::new(self.addr.clone()))
                .await
                .map_err(|e| e.to_string())?;
            Ok(Box::new(LatchkeyLocker {
                client,
                guard: None,
            }) as Box<dyn Locker>)
        })
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// One run of one workload on one system.
struct Run {
    histogram: Histogram<u64>,
    ops: u64,
    elapsed: Duration,
    /// The server's CPU time over the run, where it can be read.
    server_cpu: Option<Duration>,
    /// Each client's acquisitions (handoff), for fairness.
    shares: Vec<u64>,
}

impl Run {
    fn p(&self, q: f64) -> u64 {
        self.histogram.value_at_quantile(q)
    }

    fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Lock safety, checked as the clients run: one holder at a time per lock,
/// tokens rising.
struct Guard {
    held: AtomicBool,
    last_token: AtomicU64,
    violations: AtomicU64,
    first_violation: Mutex<Option<String>>,
}

impl Guard {
    fn new() -> Guard {
        Guard {
            held: AtomicBool::new(false),
            last_token: AtomicU64::new(0),
            violations: AtomicU64::new(0),
            first_violation: Mutex::new(None),
        }
    }

    fn enter(&self, system: &str, token: Option<u64>) {
        if self.held.swap(true, Ordering::SeqCst) {
            self.violate(format!("{system}: two clients held one lock at once"));
        }
        if let Some(token) = token {
            let last = self.last_token.swap(token, Ordering::SeqCst);
            if token <= last {
                self.violate(format!("{system}: token {token} granted after {last}"));
            }
        }
    }

    fn leave(&self) {
        self.held.store(false, Ordering::SeqCst);
    }

    fn violate(&self, what: String) {
        self.violations.fetch_add(1, Ordering::SeqCst);
        self.first_violation.lock().get_or_insert(what);
    }

    fn check(&self) -> Result<(), String> {
        match self.first_violation.lock().clone() {
            None => Ok(()),
            Some(first) => Err(format!(
                "{} violation(s); the first: {first}",
                self.violations.load(Ordering::SeqCst)
            )),
        }
    }
}

/// The CPU time the process has used so far, all threads.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: utime and stime are the 12th and 13th of them.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux whatever the kernel's own tick rate.
    Some(Duration::from_millis(ticks * 10))
}

/// The process's resident memory in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A child process that prints `... listening on ADDR` on stdout.
struct Process {
    child: Child,
    addr: SocketAddr,
}

impl Process {
    fn spawn(mut command: Command, what: &str) -> Process {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{what} printed no address: {e}"));
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{what} printed {line:?}, not `listening on ADDR`"));
        Process { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The echo floor's server: the same codec and runtime as latchkey's
/// server, answering each frame with itself. Runs in its own process when
/// this program is started with `--echo-server`.
fn echo_server_main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        println!(
            "echo listening on {}",
            listener.local_addr().expect("echo address")
        );
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
}

async fn echo_run(addr: SocketAddr, ops: u64) -> Run {
    let socket = TcpStream::connect(addr).await.expect("connect echo");
    socket.set_nodelay(true).expect("nodelay");
    let mut framed = Framed::new(socket, protocol::codec(limits::FRAME_BYTES_MAX));
    // About the size of a lock request.
    let body = Bytes::from(vec![b'x'; 96]);
    let mut histogram = histogram();
    let warm = ops / 10;
    let mut start = Instant::now();
    for i in 0..ops + warm {
        if i == warm {
            start = Instant::now();
        }
        let began = Instant::now();
        framed.send(body.clone()).await.expect("echo send");
        framed.next().await.expect("echo open").expect("echo frame");
        if i >= warm {
            histogram.saturating_record(micros(began.elapsed()));
        }
    }
    Run {
        histogram,
        ops,
        elapsed: start.elapsed(),
        server_cpu: None,
        shares: Vec::new(),
    }
}

fn cpu_delta(pid: Option<u32>, before: Option<Duration>) -> Option<Duration> {
    Some(cpu_time(pid?)?.saturating_sub(before?))
}

/// One client, acquire + release of one lock, one after the other.
async fn uncontended(system: &dyn System, cycles: u64, pid: Option<u32>) -> Result<Run, String> {
    let mut locker = system.locker().await?;
    let guard = Guard::new();
    let system_name = system.name();
    let name = "uncontended";
    let warm = cycles / 10;
    let mut histogram = histogram();
    let mut start = Instant::now();
    let mut cpu_before = None;
    for i in 0..cycles + warm {
        if i == warm {
            start = Instant::now();
            cpu_before = pid.and_then(cpu_time);
        }
        let began = Instant::now();
        let token = locker.acquire(name).await?;
        guard.enter(&system_name, token);
        guard.leave();
        locker.release().await?;
        if i >= warm {
            histogram.saturating_record(micros(began.elapsed()));
        }
    }
    let elapsed = start.elapsed();
    guard.check()?;
    Ok(Run {
        histogram,
        ops: cycles,
        elapsed,
        server_cpu: cpu_delta(pid, cpu_before),
        shares: Vec::new(),
    })
}

/// The handoff workload's shared state.
struct Handoff {
    guard: Guard,
    /// When the last holder called release, and which client it was.
    released_at: Mutex<Option<(Instant, usize)>>,
    /// Acquisitions so far, warm-up included.
    acquired: AtomicU64,
    histogram: Mutex<Histogram<u64>>,
    shares: Vec<AtomicU64>,
    measured_from: Mutex<Option<Instant>>,
    measured_to: Mutex<Option<Instant>>,
}

/// `CLIENTS` clients, each on its own connection, on one lock: the time
/// from a holder's release call to the next holder's acquire returning,
/// and handoffs (passages to another client) per second.
async fn handoff(system: &dyn System, handoffs: u64, pid: Option<u32>) -> Result<Run, String> {
    let mut lockers = Vec::new();
    for _ in 0..CLIENTS {
        lockers.push(system.locker().await?);
    }
    let warm = handoffs / 10;
    let total = handoffs + warm;
    let state = Arc::new(Handoff {
        guard: Guard::new(),
        released_at: Mutex::new(None),
        acquired: AtomicU64::new(0),
        histogram: Mutex::new(histogram()),
        shares: (0..CLIENTS).map(|_| AtomicU64::new(0)).collect(),
        measured_from: Mutex::new(None),
        measured_to: Mutex::new(None),
    });
    let name = system.name();
    let cpu_before = Arc::new(Mutex::new(None));
    let mut tasks = tokio::task::JoinSet::new();
    for (index, mut locker) in lockers.into_iter().enumerate() {
        let (state, name, cpu_before) = (state.clone(), name.clone(), cpu_before.clone());
        tasks.spawn(async move {
            // Bounded: every pass takes the lock once, and the passes stop
            // once `total` acquisitions have been made by all.
            loop {
                if state.acquired.load(Ordering::SeqCst) >= total {
                    return Ok::<(), String>(());
                }
                let token = locker.acquire("handoff").await?;
                let now = Instant::now();
                state.guard.enter(&name, token);
                let n = state.acquired.fetch_add(1, Ordering::SeqCst) + 1;
                if n == warm + 1 {
                    *state.measured_from.lock() = Some(now);
                    *cpu_before.lock() = pid.and_then(cpu_time);
                }
                if n > warm && n <= total {
                    // A client taking the lock back is no handoff: only a
                    // passage to another client counts (and is timed).
                    if let Some((released, by)) = *state.released_at.lock() {
                        if by != index {
                            state
                                .histogram
                                .lock()
                                .saturating_record(micros(now.duration_since(released)));
                        }
                    }
                    state.shares[index].fetch_add(1, Ordering::SeqCst);
                    *state.measured_to.lock() = Some(now);
                }
                state.guard.leave();
                *state.released_at.lock() = Some((Instant::now(), index));
                locker.release().await?;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| format!("a handoff client failed: {e}"))??;
    }
    state.guard.check()?;
    let from = state.measured_from.lock().ok_or("no handoff measured")?;
    let to = state.measured_to.lock().ok_or("no handoff measured")?;
    let cpu_before = *cpu_before.lock();
    let histogram = state.histogram.lock().clone();
    Ok(Run {
        ops: histogram.len(),
        histogram,
        elapsed: to.duration_since(from),
        server_cpu: cpu_delta(pid, cpu_before),
        shares: state
            .shares
            .iter()
            .map(|s| s.load(Ordering::SeqCst))
            .collect(),
    })
}

/// `CLIENTS` clients, each on its own lock: lock cycles per second in all.
async fn spread(system: &dyn System, cycles: u64, pid: Option<u32>) -> Result<Run, String> {
    let mut lockers = Vec::new();
    for _ in 0..CLIENTS {
        lockers.push(system.locker().await?);
    }
    let warm = cycles / 10;
    let total = cycles + warm;
    let done = Arc::new(AtomicU64::new(0));
    let histogram_all = Arc::new(Mutex::new(histogram()));
    let window = Arc::new(Mutex::new((None::<Instant>, None::<Instant>)));
    let cpu_before = Arc::new(Mutex::new(None));
    let name = system.name();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, mut locker) in lockers.into_iter().enumerate() {
        let (done, histogram_all, window, cpu_before, name) = (
            done.clone(),
            histogram_all.clone(),
            window.clone(),
            cpu_before.clone(),
            name.clone(),
        );
        tasks.spawn(async move {
            let guard = Guard::new();
            let lock = format!("spread-{index}");
            // Bounded by `total` cycles across all clients.
            while done.load(Ordering::SeqCst) < total {
                let began = Instant::now();
                let token = locker.acquire(&lock).await?;
                guard.enter(&name, token);
                guard.leave();
                locker.release().await?;
                let n = done.fetch_add(1, Ordering::SeqCst) + 1;
                let now = Instant::now();
                if n == warm + 1 {
                    window.lock().0 = Some(now);
                    *cpu_before.lock() = pid.and_then(cpu_time);
                }
                if n > warm + 1 && n <= total {
                    histogram_all
                        .lock()
                        .saturating_record(micros(now.duration_since(began)));
                    window.lock().1 = Some(now);
                }
            }
            guard.check()
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| format!("a spread client failed: {e}"))??;
    }
    let (from, to) = *window.lock();
    let (from, to) = (
        from.ok_or("no cycle measured")?,
        to.ok_or("no cycle measured")?,
    );
    let cpu_before = *cpu_before.lock();
    let histogram = histogram_all.lock().clone();
    Ok(Run {
        ops: histogram.len(),
        histogram,
        elapsed: to.duration_since(from),
        server_cpu: cpu_delta(pid, cpu_before),
        shares: Vec::new(),
    })
}

type Raw = Framed<TcpStream, LengthDelimitedCodec>;

/// A session opened by hand: a socket from `source`, a hello, a welcome.
async fn raw_session(source: std::net::Ipv4Addr, server: SocketAddr) -> Result<Raw, String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let stream = socket
        .connect(server)
        .await
        .map_err(|e| format!("connect from {source}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(stream, protocol::codec(limits::REPLY_FRAME_BYTES_MAX));
    framed
        .send(protocol::encode(&Hello {
            protocol_version: protocol::PROTOCOL_VERSION,
            session_timeout_ms: IDLE_SESSION_TIMEOUT.as_millis() as u64,
            resume: None,
        }))
        .await
        .map_err(|e| e.to_string())?;
    match next_message(&mut framed).await? {
        ServerMessage::Welcome(_) => Ok(framed),
        other => Err(format!("expected a welcome, got {other:?}")),
    }
}

async fn next_message(raw: &mut Raw) -> Result<ServerMessage, String> {
    let frame = raw
        .next()
        .await
        .ok_or("the server closed the connection")?
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&frame).map_err(|e| format!("undecodable frame: {e}"))
}

async fn request(raw: &mut Raw, xid: u64, op: Op) -> Result<(), String> {
    raw.send(protocol::encode(&Request { xid: Xid(xid), op }))
        .await
        .map_err(|e| e.to_string())
}

/// The session timeout idle sessions ask for: the client's default, so
/// they heartbeat as applications' sessions do (every third of it).
const IDLE_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Source addresses for many connections: a few loopback addresses, so
/// that ephemeral ports do not run short.
fn source(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 0, 0, 1 + (i % 8) as u8)
}

/// What the sessions workload found.
struct SessionsRun {
    sessions: usize,
    rss_per_session_bytes: u64,
    cpu_share: f64,
    heartbeats_per_second: f64,
}

/// Opens `count` idle sessions that heartbeat like real clients, and reads
/// the server's memory and CPU time for them.
async fn sessions(
    addr: SocketAddr,
    pid: u32,
    count: usize,
    idle: Duration,
) -> Result<SessionsRun, String> {
    let rss_before = rss_kib(pid).ok_or("cannot read the server's memory")?;
    let stop = Arc::new(AtomicBool::new(false));
    let pings = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let opened = futures_util::stream::iter(0..count)
        .map(|i| raw_session(source(i), addr))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let mut raws = Vec::with_capacity(count);
    for raw in opened {
        raws.push(raw?);
    }
    for (i, mut raw) in raws.into_iter().enumerate() {
        let (stop, pings) = (stop.clone(), pings.clone());
        tasks.spawn(async move {
            // Spread the heartbeats over the interval, as independent
            // clients' would be.
            let every = IDLE_SESSION_TIMEOUT / 3;
            let offset = every.mul_f64((i % 1000) as f64 / 1000.0);
            tokio::time::sleep(offset).await;
            let mut xid = 0u64;
            while !stop.load(Ordering::SeqCst) {
                xid += 1;
                request(&mut raw, xid, Op::Ping { ack: Xid(xid - 1) }).await?;
                match next_message(&mut raw).await? {
                    ServerMessage::Reply(_) => {}
                    other => return Err(format!("expected a reply, got {other:?}")),
                }
                pings.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(every).await;
            }
            Ok::<(), String>(())
        });
    }
    // Let every session heartbeat at least once before measuring.
    tokio::time::sleep(IDLE_SESSION_TIMEOUT / 2).await;
    let rss_after = rss_kib(pid).ok_or("cannot read the server's memory")?;
    let cpu_before = cpu_time(pid).ok_or("cannot read the server's CPU time")?;
    let pings_before = pings.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(idle).await;
    let cpu = cpu_time(pid).ok_or("cannot read the server's CPU time")? - cpu_before;
    let elapsed = started.elapsed();
    let pinged = pings.load(Ordering::Relaxed) - pings_before;
    stop.store(true, Ordering::SeqCst);
    tasks.abort_all();
    Ok(SessionsRun {
        sessions: count,
        rss_per_session_bytes: rss_after.saturating_sub(rss_before) * 1024 / count.max(1) as u64,
        cpu_share: cpu.as_secs_f64() / elapsed.as_secs_f64(),
        heartbeats_per_second: pinged as f64 / elapsed.as_secs_f64(),
    })
}

/// `watchers` sessions watch one node; a write to it; the time from the
/// write's start to the last watcher's event, once per round.
async fn fan_out(addr: SocketAddr, watchers: usize, rounds: u64) -> Result<Run, String> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let path = &format!("/bench/fan-out-{}", RUNS.fetch_add(1, Ordering::SeqCst));
    let writer = Client::connect(ClientOptions::new(addr.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    writer
        .create(
            path,
            "0",
            latchkey_client::CreateOptions::persistent().make_parents(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let opened = futures_util::stream::iter(0..watchers)
        .map(|i| raw_session(source(i), addr))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let mut raws = Vec::with_capacity(watchers);
    for raw in opened {
        raws.push(raw?);
    }
    let mut histogram = histogram();
    let mut xid = 0u64;
    let started = Instant::now();
    for round in 0..rounds {
        xid += 1;
        // Arm every watch (one pipelined request each, then the replies).
        for raw in &mut raws {
            request(
                raw,
                xid,
                Op::Exists {
                    path: path.into(),
                    watch: true,
                },
            )
            .await?;
        }
        for raw in &mut raws {
            match next_message(raw).await? {
                ServerMessage::Reply(_) => {}
                other => return Err(format!("expected a reply, got {other:?}")),
            }
        }
        let mut arrivals = futures_util::stream::FuturesUnordered::new();
        for raw in &mut raws {
            arrivals.push(async move {
                match next_message(raw).await? {
                    ServerMessage::Watch(_) => Ok::<Instant, String>(Instant::now()),
                    other => Err(format!("expected a watch event, got {other:?}")),
                }
            });
        }
        let data = round.to_string();
        let wrote = Instant::now();
        let (set, last) = tokio::join!(writer.set(path, data.as_str(), None), async {
            let mut last = wrote;
            while let Some(arrival) = arrivals.next().await {
                last = last.max(arrival?);
            }
            Ok::<Instant, String>(last)
        });
        set.map_err(|e| e.to_string())?;
        histogram.saturating_record(micros(last?.duration_since(wrote)));
    }
    let _ = writer.close().await;
    Ok(Run {
        ops: rounds,
        histogram,
        elapsed: started.elapsed(),
        server_cpu: None,
        shares: Vec::new(),
    })
}

/// Where a round trip's time goes: `exists` sent over a bare socket (the
/// server's part), and the same through the client library (adding the
/// client's part), sequentially.
async fn round_trips(addr: SocketAddr, ops: u64) -> Result<(Run, Run), String> {
    let mut raw = raw_session(source(0), addr).await?;
    let mut bare = histogram();
    let started = Instant::now();
    for xid in 1..=ops {
        let began = Instant::now();
        request(
            &mut raw,
            xid,
            Op::Exists {
                path: "/".into(),
                watch: false,
            },
        )
        .await?;
        match next_message(&mut raw).await? {
            ServerMessage::Reply(_) => {}
            other => return Err(format!("expected a reply, got {other:?}")),
        }
        bare.saturating_record(micros(began.elapsed()));
    }
    let bare = Run {
        histogram: bare,
        ops,
        elapsed: started.elapsed(),
        server_cpu: None,
        shares: Vec::new(),
    };
    let client = Client::connect(ClientOptions::new(addr.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    let mut through = histogram();
    let started = Instant::now();
    for _ in 0..ops {
        let began = Instant::now();
        client.exists("/").await.map_err(|e| e.to_string())?;
        through.saturating_record(micros(began.elapsed()));
    }
    let _ = client.close().await;
    Ok((
        bare,
        Run {
            histogram: through,
            ops,
            elapsed: started.elapsed(),
            server_cpu: None,
            shares: Vec::new(),
        },
    ))
}

fn median_by_p50(mut runs: Vec<Run>) -> Run {
    runs.sort_by_key(|r| r.p(0.5));
    let middle = runs.len() / 2;
    runs.swap_remove(middle)
}

/// One row of the table.
struct Row {
    workload: &'static str,
    system: String,
    run: Run,
}

fn print_table(floor: &Run, rows: &[Row]) {
    println!();
    println!(
        "{:<12} {:<10} {:>8} {:>8} {:>9} {:>10} {:>7} {:>7} {:>9} {:>10}",
        "workload",
        "system",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "ops/s",
        "x floor",
        "x p99",
        "cpu us/op",
        "vs latchkey"
    );
    let floor_p50 = floor.p(0.5).max(1) as f64;
    let floor_p99 = floor.p(0.99).max(1) as f64;
    println!(
        "{:<12} {:<10} {:>8} {:>8} {:>9} {:>10.0} {:>7} {:>7} {:>9} {:>10}",
        "floor",
        "echo",
        floor.p(0.5),
        floor.p(0.99),
        floor.p(0.999),
        floor.per_second(),
        "1.00",
        "1.00",
        "",
        ""
    );
    let mut ours: BTreeMap<&str, f64> = BTreeMap::new();
    for row in rows {
        if row.system == "latchkey" {
            ours.insert(row.workload, row.run.per_second());
        }
    }
    for row in rows {
        let run = &row.run;
        let cpu = run
            .server_cpu
            .map(|c| format!("{:.1}", c.as_secs_f64() * 1e6 / run.ops.max(1) as f64))
            .unwrap_or_default();
        let versus = ours
            .get(row.workload)
            .map(|ours| format!("{:.2}x", run.per_second() / ours))
            .unwrap_or_default();
        println!(
            "{:<12} {:<10} {:>8} {:>8} {:>9} {:>10.0} {:>7.2} {:>7.2} {:>9} {:>10}",
            row.workload,
            row.system,
            run.p(0.5),
            run.p(0.99),
            run.p(0.999),
            run.per_second(),
            run.p(0.5) as f64 / floor_p50,
            run.p(0.99) as f64 / floor_p99,
            cpu,
            versus,
        );
    }
}

fn fairness(shares: &[u64]) -> String {
    if shares.is_empty() {
        return String::new();
    }
    let mean = shares.iter().sum::<u64>() as f64 / shares.len() as f64;
    let min = shares.iter().copied().min().unwrap_or(0);
    let max = shares.iter().copied().max().unwrap_or(0);
    let spread = shares
        .iter()
        .map(|&s| ((s as f64 - mean) / mean.max(1e-9)).abs())
        .fold(0.0f64, f64::max);
    format!(
        "acquisitions per client: min {min}, max {max}, mean {mean:.1}; the furthest from the mean is {:.1}% off",
        spread * 100.0
    )
}

/// Raises the open-file soft limit to the hard one: the sessions workload
/// holds one socket per session.
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// What a bench adds to the harness.
pub struct Setup {
    /// The command that runs this bench in full, printed with its results.
    pub command: &'static str,
    /// The same for the quick mode.
    pub quick_command: &'static str,
    /// The systems compared with latchkey: each one that cannot be reached
    /// is left out, with a printed line saying why.
    pub others: fn() -> BoxFuture<'static, Vec<Box<dyn System>>>,
}

/// Runs the bench with the process's arguments; exits 1 if a workload fails
/// or a check breaks, 2 on a bad argument.
pub fn main(setup: Setup) {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--echo-server") {
        echo_server_main();
        return;
    }
    raise_open_files();
    let quick = args.iter().any(|a| a == "--quick");
    let server_arg = args
        .iter()
        .position(|a| a == "--server")
        .and_then(|i| args.get(i + 1).cloned());
    let sizes = if quick { Sizes::quick() } else { Sizes::full() };
    let only = match args.iter().position(|a| a == "--only") {
        None => None,
        Some(i) => match args.get(i + 1).map(|list| Only::parse(list)) {
            Some(Ok(only)) => Some(only),
            Some(Err(e)) => {
                eprintln!("bench failed: {e}");
                std::process::exit(2);
            }
            None => {
                eprintln!("bench failed: --only needs a list, e.g. --only sessions,fan-out");
                std::process::exit(2);
            }
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // On a worker thread, as an application's tasks run: a future passed to
    // block_on runs on this thread instead, outside the runtime's workers,
    // so that every wake of it by the I/O driver or by a client's session
    // task would cross threads.
    let run = runtime.block_on(async {
        tokio::spawn(bench(setup, sizes, quick, server_arg, only))
            .await
            .unwrap_or_else(|e| Err(format!("the bench task failed: {e}")))
    });
    if let Err(e) = run {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}

/// The workloads `--only` names.
struct Only(Vec<String>);

impl Only {
    const NAMES: [&'static str; 6] = [
        "uncontended",
        "handoff",
        "spread",
        "round-trip",
        "fan-out",
        "sessions",
    ];

    fn parse(list: &str) -> Result<Only, String> {
        let names: Vec<String> = list.split(',').map(|n| n.trim().to_owned()).collect();
        for name in &names {
            if !Self::NAMES.contains(&name.as_str()) {
                return Err(format!(
                    "--only {list}: no workload {name:?}; the workloads are {}",
                    Self::NAMES.join(", ")
                ));
            }
        }
        Ok(Only(names))
    }
}

/// Whether `workload` runs, given `--only`.
fn runs(only: &Option<Only>, workload: &str) -> bool {
    only.as_ref()
        .is_none_or(|o| o.0.iter().any(|n| n == workload))
}

async fn bench(
    setup: Setup,
    sizes: Sizes,
    quick: bool,
    server_arg: Option<String>,
    only: Option<Only>,
) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut echo_command = Command::new(exe);
    echo_command.arg("--echo-server");
    let echo = Process::spawn(echo_command, "the echo server");
    let (server, addr) = match server_arg {
        Some(addr) => (
            None,
            addr.parse::<SocketAddr>()
                .map_err(|e| format!("--server {addr}: {e}"))?,
        ),
        None => {
            let mut command = Command::new(env!("CARGO_BIN_EXE_latchkey"));
            command
                .args([
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--in-memory",
                    "--no-lease-file",
                ])
                .env("RUST_LOG", "warn");
            // For experiments: the server's worker threads (tokio reads it).
            if let Ok(threads) = std::env::var("LATCHKEY_BENCH_SERVER_THREADS") {
                command.env("TOKIO_WORKER_THREADS", threads);
            }
            let process = Process::spawn(command, "latchkey serve");
            let addr = process.addr;
            (Some(process), addr)
        }
    };
    let pid = server.as_ref().map(Process::pid);

    println!(
        "latchkey bench locks ({}): {} cores; medians of {} runs; {} clients in handoff and spread",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        sizes.repeats,
        CLIENTS
    );
    println!(
        "command: {}",
        if quick {
            setup.quick_command
        } else {
            setup.command
        }
    );

    let mut systems: Vec<Box<dyn System>> = vec![Box::new(Latchkey {
        addr: addr.to_string(),
    })];
    systems.extend((setup.others)().await);

    let mut floors = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    type Workload =
        for<'a> fn(&'a dyn System, u64, Option<u32>) -> BoxFuture<'a, Result<Run, String>>;
    let workloads: [(&'static str, u64, Workload); 3] = [
        ("uncontended", sizes.cycles, |s, n, p| {
            Box::pin(uncontended(s, n, p))
        }),
        ("handoff", sizes.handoffs, |s, n, p| {
            Box::pin(handoff(s, n, p))
        }),
        ("spread", sizes.spread, |s, n, p| Box::pin(spread(s, n, p))),
    ];
    for (workload, count, run_workload) in workloads {
        if !runs(&only, workload) {
            continue;
        }
        for system in &systems {
            let name = system.name();
            let own_pid = if name == "latchkey" { pid } else { None };
            let mut runs = Vec::new();
            for _ in 0..sizes.repeats {
                floors.push(echo_run(echo.addr, sizes.echoes / 4).await);
                runs.push(
                    run_workload(system.as_ref(), count, own_pid)
                        .await
                        .map_err(|e| format!("{workload} on {name}: {e}"))?,
                );
            }
            let run = median_by_p50(runs);
            if workload == "handoff" {
                notes.push(format!(
                    "handoff fairness, {name}: {}",
                    fairness(&run.shares)
                ));
            }
            rows.push(Row {
                workload,
                system: name,
                run,
            });
        }
    }
    if runs(&only, "round-trip") {
        let (bare, through) = round_trips(addr, sizes.echoes).await?;
        notes.push(format!(
            "one round trip (exists /): over a bare socket p50 {} us, p99 {} us; through the \
             client p50 {} us, p99 {} us",
            bare.p(0.5),
            bare.p(0.99),
            through.p(0.5),
            through.p(0.99)
        ));
    }
    if pid.is_some() && runs(&only, "fan-out") {
        let mut fan_outs = Vec::new();
        for _ in 0..sizes.repeats {
            fan_outs.push(fan_out(addr, sizes.watchers, sizes.fanouts).await?);
        }
        let run = median_by_p50(fan_outs);
        notes.push(format!(
            "fan-out: {} watchers on one node, from the write to the last event: p50 {} us, \
             max {} us ({} writes)",
            sizes.watchers,
            run.p(0.5),
            run.histogram.max(),
            run.ops
        ));
    }
    if let (Some(pid), true) = (pid, runs(&only, "sessions")) {
        let s = sessions(addr, pid, sizes.sessions, sizes.idle).await?;
        notes.push(format!(
            "sessions: {} idle sessions (timeout {:?}, a heartbeat every third of it: {:.0}/s): \
             {} bytes of server memory each, {:.2}% of one core",
            s.sessions,
            IDLE_SESSION_TIMEOUT,
            s.heartbeats_per_second,
            s.rss_per_session_bytes,
            s.cpu_share * 100.0
        ));
    }
    if pid.is_none() {
        notes.push(
            "fan-out and sessions: skipped (they read the server's /proc; run without --server)"
                .into(),
        );
    }
    floors.push(echo_run(echo.addr, sizes.echoes).await);
    let floor = median_by_p50(floors);
    print_table(&floor, &rows);
    println!();
    for note in notes {
        println!("{note}");
    }
    drop(server);
    Ok(())
}

//! Limits under load, through real sockets: many sessions on one server, a
//! client flooding requests without reading, a burst of watches on one node,
//! connections that stall before or inside a frame, a frame header
//! announcing 4 GiB. Each shows that the limit holds, that the server says
//! why it closes a connection, that the others are still answered, and that
//! the server's memory stays bounded.
//!
//! Where memory or logs are checked, the server is the real `latchkey serve`
//! in a child process: its resident memory is then its own (read from
//! /proc), its log is what an operator sees, and its file descriptors do not
//! count against the test's.
//!
//! The many-sessions test opens 10,000 sessions (fewer if `ulimit -n` is
//! too low for them; `LATCHKEY_LIMITS_SESSIONS=<n>` sets the number).
//! `LATCHKEY_SERVE_BIN=target/release/latchkey` runs them against a release
//! build.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{connect, within, Raw};
use futures_util::StreamExt;
use latchkey_client::protocol::{self, Op, Request, ServerMessage, Xid};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;

/// The server binary: this build's, or `LATCHKEY_SERVE_BIN` (a release
/// build, to measure what users run).
fn server_binary() -> String {
    std::env::var("LATCHKEY_SERVE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_latchkey").into())
}

/// A `latchkey serve` child process on a free loopback port, with its log
/// lines collected as they come.
struct ServerProcess {
    child: tokio::process::Child,
    pid: u32,
    addr: SocketAddr,
    log: Arc<Log>,
    // Kept open: a closed pipe would fail the server's later prints.
    _stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    grew: Notify,
}

impl ServerProcess {
    /// Starts `latchkey serve --listen 127.0.0.1:0 ARGS` and waits for the
    /// line that says it listens.
    async fn start(args: &[&str]) -> ServerProcess {
        let mut child = tokio::process::Command::new(server_binary())
            .args(["serve", "--listen", "127.0.0.1:0", "--in-memory"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn latchkey serve");
        let pid = child.id().expect("a running child has a pid");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let line = within("the server's listening line", stdout.next_line())
            .await
            .expect("read the server's stdout")
            .expect("a listening line");
        let addr = line
            .strip_prefix("latchkey listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .expect("an address");
        let log = Arc::new(Log::default());
        let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let collector = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                collector.lines.lock().unwrap().push(line);
                collector.grew.notify_waiters();
            }
        });
        ServerProcess {
            child,
            pid,
            addr,
            log,
            _stdout: stdout,
        }
    }

    /// How many log lines so far contain `needle`.
    /// How many events the log lines containing `needle` stand for: the
    /// server logs one line per second per reason, each with the count of
    /// lines folded into it (`folded=N`), and a line of the count alone
    /// ("... not logged one by one") when no other follows.
    fn log_count(&self, needle: &str) -> usize {
        let lines = self.log.lines.lock().unwrap();
        lines
            .iter()
            .filter(|line| line.contains(needle))
            .map(|line| {
                let folded = line
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("folded="))
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(0);
                if line.contains("not logged one by one") {
                    folded
                } else {
                    1 + folded
                }
            })
            .sum()
    }

    /// How many log lines contain `needle`.
    fn log_lines(&self, needle: &str) -> usize {
        let lines = self.log.lines.lock().unwrap();
        lines.iter().filter(|line| line.contains(needle)).count()
    }

    /// Waits until the log lines containing `needle` stand for at least
    /// `count` events.
    async fn wait_for_log(&self, needle: &str, count: usize) {
        let what = format!("{count} log lines saying {needle:?}");
        within(&what, async {
            loop {
                let grew = self.log.grew.notified();
                if self.log_count(needle) >= count {
                    return;
                }
                grew.await;
            }
        })
        .await
    }

    /// A field of /proc/PID/status in KiB (VmRSS: resident now; VmHWM:
    /// resident at most; VmPeak: address space at most).
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("read the server's /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid))
    }

    /// Sends SIGTERM and waits for a clean exit.
    async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid).expect("a pid fits i32"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal the server");
        let status = within("the server to exit", self.child.wait())
            .await
            .expect("wait for the server");
        assert!(status.success(), "the server exited with {status}");
    }
}

/// A raw session on a socket bound to a loopback source address of its own,
/// so that many sessions do not run out of one address's ephemeral ports.
async fn raw_session_from(source: Ipv4Addr, server: SocketAddr, timeout_ms: u64) -> Raw {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket
        .bind(SocketAddr::from((source, 0)))
        .unwrap_or_else(|e| panic!("bind {source}: {e}"));
    let stream = socket.connect(server).await.expect("connect");
    Raw::over(stream).hello(timeout_ms).await.0
}

/// Sends one request and returns its reply's xid; panics on anything else.
async fn ping(raw: &mut Raw, xid: u64) {
    let frame = protocol::encode(&Request {
        xid: Xid(xid),
        op: Op::Ping { ack: Xid(0) },
    });
    raw.send_bytes(frame).await;
    match raw.recv().await {
        Some(ServerMessage::Reply(reply)) if reply.xid == Xid(xid) => {
            assert!(reply.result.is_ok(), "ping failed: {:?}", reply.result)
        }
        other => panic!("expected the reply to ping {xid}, got {other:?}"),
    }
}

/// A round trip through the real client: create, read back, delete.
async fn round_trip(client: &latchkey_client::Client, path: &str) {
    use latchkey_client::CreateOptions;
    within(
        "a create",
        client.create(path, "x", CreateOptions::default()),
    )
    .await
    .expect("create");
    let (data, _) = within("a get", client.get(path)).await.expect("get");
    assert_eq!(data, b"x");
    within("a delete", client.delete(path, None))
        .await
        .expect("delete");
}

/// Raises this process's open-file limit to its hard limit (the server
/// child inherits it) and returns it: each session here costs a socket in
/// this process and one in the server.
fn open_files_max() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("read the open-file limit");
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// How many sessions the many-sessions test opens: 10,000, or fewer where
/// the open-file limit does not allow it, or `LATCHKEY_LIMITS_SESSIONS`.
fn sessions_wanted() -> usize {
    // The other tests of this file, run alongside, hold up to ~1,500.
    let room = usize::try_from(open_files_max().saturating_sub(2_500)).unwrap_or(usize::MAX);
    match std::env::var("LATCHKEY_LIMITS_SESSIONS") {
        Ok(n) => {
            let n = n
                .parse()
                .expect("LATCHKEY_LIMITS_SESSIONS is a number of sessions");
            assert!(
                n <= room,
                "{n} sessions need more open files than the limit allows; raise `ulimit -n`"
            );
            n
        }
        Err(_) if room < 10_000 => {
            println!("the open-file limit allows {room} sessions, not 10,000; raise `ulimit -n`");
            room.max(100)
        }
        Err(_) => 10_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_on_one_server_are_all_answered_in_bounded_memory() {
    let sessions = sessions_wanted();
    // The invariant check walks every session on every step: with
    // thousands of sessions in a debug build, it would be all the test
    // measures.
    let server = ServerProcess::start(&["--check-invariants", "false"]).await;
    let addr = server.addr;
    // One full round trip first, so that what the server allocates once
    // (runtime, buffers, the first session) is in the baseline.
    let client = connect(addr).await;
    round_trip(&client, "/warm").await;
    let rss_before_kib = server.status_kib("VmRSS");
    let started = std::time::Instant::now();

    // Each source address has its own ~28,000 ephemeral ports to the one
    // server port; four of them leave room for tests running beside this one.
    let sources: Vec<Ipv4Addr> = (1..=4).map(|last| Ipv4Addr::new(127, 0, 0, last)).collect();
    let mut raws: Vec<Raw> = futures_util::stream::iter(0..sessions)
        .map(|i| raw_session_from(sources[i % sources.len()], addr, 120_000))
        .buffer_unordered(64)
        .collect()
        .await;
    assert_eq!(raws.len(), sessions);
    let opened = started.elapsed();

    // Every session answers a request while all of them are open.
    futures_util::stream::iter(raws.iter_mut())
        .for_each_concurrent(64, |raw| ping(raw, 1))
        .await;
    let pinged = started.elapsed();
    round_trip(&client, "/probe").await;
    let rss_after_kib = server.status_kib("VmRSS");

    let grown_bytes = (rss_after_kib.saturating_sub(rss_before_kib)) * 1024;
    let per_session_bytes = grown_bytes / u64::try_from(sessions).unwrap();
    println!(
        "{sessions} sessions: opened in {opened:?}, all pinged by {pinged:?}; server RSS \
         {rss_before_kib} KiB -> {rss_after_kib} KiB, {per_session_bytes} bytes per session"
    );
    // Generous: a session and its connection cost a few KiB; 64 KiB each
    // would mean per-session buffers that do not shrink.
    assert!(
        per_session_bytes < 64 * 1024,
        "{per_session_bytes} bytes of server memory per session"
    );
    assert!(
        rss_after_kib < 1024 * 1024,
        "the server holds {rss_after_kib} KiB"
    );
    drop(raws);
    client.close().await.expect("close");
    server.stop().await;
}

/// The frame of a ping with this xid, length prefix included.
fn ping_frame(xid: u64, into: &mut Vec<u8>) {
    let body = protocol::encode(&Request {
        xid: Xid(xid),
        op: Op::Ping { ack: Xid(0) },
    });
    let length = u32::try_from(body.len()).expect("a ping fits a frame");
    into.extend_from_slice(&length.to_be_bytes());
    into.extend_from_slice(&body);
}

/// Opens a session and writes pings as fast as the socket takes them,
/// never reading a reply, until the server drops the connection. Returns
/// how many were written.
async fn flood_until_dropped(addr: SocketAddr) -> u64 {
    use tokio::io::AsyncWriteExt;
    let (raw, _) = Raw::open(addr).await.hello(60_000).await;
    let mut socket = raw.framed.into_inner();
    let batch = 1_000u64;
    // Bounded: at ~50 bytes a ping, 10 million fill any socket buffers and
    // queue a server could sanely allow a client that does not read.
    let requests_max = 10_000_000u64;
    let mut chunk = Vec::new();
    let mut xid = 0u64;
    while xid < requests_max {
        chunk.clear();
        for _ in 0..batch {
            xid += 1;
            ping_frame(xid, &mut chunk);
        }
        if socket.write_all(&chunk).await.is_err() {
            return xid - batch;
        }
    }
    panic!("the server took {requests_max} requests from a client that reads no reply");
}

/// A client that writes requests without reading the replies is dropped
/// once its outbound queue passes the bound, with a log line saying why,
/// while another client's round trips keep being answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_flood_without_reading_is_dropped_while_others_are_answered() {
    let server = ServerProcess::start(&[]).await;
    let addr = server.addr;
    let client = connect(addr).await;
    round_trip(&client, "/warm").await;
    let rss_before_kib = server.status_kib("VmRSS");

    // Flooders follow one another, so that a flood is running during every
    // round trip of the client below.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut written = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && written.len() < 100 {
                written.push(within("a flood to be dropped", flood_until_dropped(addr)).await);
            }
            written
        }
    });
    let round_trips = 100u32;
    let mut slowest = Duration::ZERO;
    let started = std::time::Instant::now();
    for i in 0..round_trips {
        let one = std::time::Instant::now();
        round_trip(&client, &format!("/probe-{i}")).await;
        slowest = slowest.max(one.elapsed());
    }
    let probing = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = within("the flooders to stop", flooding)
        .await
        .expect("the flooders ran");
    let rss_peak_kib = server.status_kib("VmHWM");
    println!(
        "{round_trips} round trips (create, get, delete) took {probing:?}, the slowest \
         {slowest:?}, while {} flooding connections were dropped after writing {:?} pings each; \
         server RSS {rss_before_kib} KiB before, peak {rss_peak_kib} KiB",
        written.len(),
        written
    );
    server
        .wait_for_log("the client is not reading its replies", written.len())
        .await;
    // A flooder may have 4 MiB of replies queued, plus socket and read
    // buffers: a few times that at most.
    assert!(
        rss_peak_kib < rss_before_kib + 64 * 1024,
        "the server's peak RSS rose from {rss_before_kib} KiB to {rss_peak_kib} KiB"
    );
    client.close().await.expect("close");
    server.stop().await;
}

/// Many sessions watch one node and one write fires them all; the watch
/// limits, per session and in all, refuse one more with an error naming the
/// limit, and watches that fired make room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_watches_on_one_node_all_fire_and_the_watch_limits_hold() {
    use latchkey_client::protocol::{ErrorCode, WatchEventKind};
    use serde_json::json;

    let watchers = 500usize;
    let per_session_max = 4usize;
    let mut config = common::test_config();
    config.coordinator.watches_per_session_max = latchkey::state::count(per_session_max);
    config.coordinator.watches_max = latchkey::state::count(watchers + per_session_max);
    let server = common::start_server_with(config).await;
    let addr = server.addr();
    let writer = connect(addr).await;
    writer
        .create("/hot", "0", latchkey_client::CreateOptions::default())
        .await
        .expect("create /hot");

    let mut sessions: Vec<Raw> = futures_util::stream::iter(0..watchers)
        .map(|_| async move {
            let mut raw = Raw::session(addr).await;
            let reply = raw
                .request(1, json!({"exists": {"path": "/hot", "watch": true}}))
                .await;
            assert!(reply.result.is_ok(), "{:?}", reply.result);
            raw
        })
        .buffer_unordered(64)
        .collect()
        .await;

    // One session takes its whole share of watches; one more is refused.
    let mut greedy = Raw::session(addr).await;
    for i in 0..per_session_max {
        let path = if i == 0 {
            "/hot".to_owned()
        } else {
            format!("/cold-{i}")
        };
        let xid = u64::try_from(i).unwrap() + 1;
        let reply = greedy
            .request(xid, json!({"exists": {"path": path, "watch": true}}))
            .await;
        assert!(reply.result.is_ok(), "{:?}", reply.result);
    }
    let refused = greedy
        .request(100, json!({"exists": {"path": "/cold-x", "watch": true}}))
        .await
        .result
        .expect_err("a watch over the per-session limit");
    assert_eq!(refused.code, ErrorCode::LimitExceeded);
    assert!(
        refused
            .message
            .contains(&format!("the limit is {per_session_max}")),
        "{}",
        refused.message
    );
    // All sessions now hold `watches_max` watches together.
    let mut late = Raw::session(addr).await;
    let refused = late
        .request(1, json!({"exists": {"path": "/hot", "watch": true}}))
        .await
        .result
        .expect_err("a watch over the total limit");
    assert_eq!(refused.code, ErrorCode::LimitExceeded);
    assert!(
        refused.message.contains("all sessions hold"),
        "{}",
        refused.message
    );

    // One write fires every watch on /hot.
    writer.set("/hot", "1", None).await.expect("set /hot");
    sessions.push(greedy);
    futures_util::stream::iter(sessions.iter_mut())
        .for_each_concurrent(64, |raw| async move {
            match raw.recv().await {
                Some(ServerMessage::Watch(event)) => {
                    assert_eq!(event.path, "/hot");
                    assert_eq!(event.kind, WatchEventKind::NodeDataChanged);
                }
                other => panic!("expected the watch event on /hot, got {other:?}"),
            }
        })
        .await;
    // The fired watches are gone, and so is the room they took.
    let reply = late
        .request(2, json!({"exists": {"path": "/hot", "watch": true}}))
        .await;
    assert!(reply.result.is_ok(), "{:?}", reply.result);
    writer.close().await.expect("close");
    server.stop().await;
}

/// Whether the server has closed this socket or sent on it, without
/// waiting: a read that would block means neither.
fn closed_by_server(socket: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    !matches!(socket.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Connections that never finish a frame (no handshake, half a handshake,
/// half a request after the handshake, or just a request's length header)
/// fill most of the connection limit; a real client still connects and
/// works while they are open, and each of them is closed within a bound
/// far below its session timeout, with a log line saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_are_closed_in_bounded_time_and_do_not_crowd_out_others() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let each = 90usize;
    let server = ServerProcess::start(&[
        "--connections-max",
        "300",
        // Wide enough that opening them all and one client's work fit well
        // inside it, so they are all still open then.
        "--handshake-timeout",
        "8s",
        "--frame-timeout",
        "8s",
    ])
    .await;
    let addr = server.addr;
    let rss_before_kib = server.status_kib("VmRSS");
    let test_started = std::time::Instant::now();

    let silent: Vec<TcpStream> = futures_util::stream::iter(0..each)
        .map(|_| async move { TcpStream::connect(addr).await.expect("connect") })
        .buffer_unordered(32)
        .collect()
        .await;
    let half_hello: Vec<TcpStream> = futures_util::stream::iter(0..each)
        .map(|_| async move {
            let mut socket = TcpStream::connect(addr).await.expect("connect");
            socket.write_all(&[0, 0, 0, 50, b'{']).await.expect("write");
            socket
        })
        .buffer_unordered(32)
        .collect()
        .await;
    // Sessions that outlive the test: their expiry cannot be what closes
    // them.
    let half_request: Vec<Raw> = futures_util::stream::iter(0..each)
        .map(|i| async move {
            let (mut raw, welcome) = Raw::open(addr).await.hello(120_000).await;
            assert!(welcome.session_timeout_ms > 60_000);
            // Half of them send only the length header, which the codec
            // consumes at once: no buffered byte tells it is inside a frame.
            let partial: &[u8] = if i % 2 == 0 {
                &[0, 0, 0, 100]
            } else {
                &[0, 0, 0, 100, b'{', b'"', b'x', b'i', b'd']
            };
            raw.framed
                .get_mut()
                .write_all(partial)
                .await
                .expect("write");
            raw
        })
        .buffer_unordered(32)
        .collect()
        .await;

    let client = connect(addr).await;
    round_trip(&client, "/among-stalled").await;
    client.close().await.expect("close");
    let open = silent
        .iter()
        .chain(&half_hello)
        .chain(half_request.iter().map(|raw| raw.framed.get_ref()))
        .filter(|socket| !closed_by_server(socket))
        .count();
    assert_eq!(
        open,
        3 * each,
        "some stalled connections were closed before the client finished; the test's 8 s \
         margin was too small for this machine"
    );

    let started = std::time::Instant::now();
    for mut socket in silent.into_iter().chain(half_hello) {
        let mut rest = Vec::new();
        let read = within(
            "a stalled handshake to be closed",
            socket.read_to_end(&mut rest),
        )
        .await;
        assert!(
            read.is_ok() && rest.is_empty(),
            "closed without a word: {read:?}"
        );
    }
    for mut raw in half_request {
        match raw.recv().await {
            Some(ServerMessage::Fatal(error)) => {
                assert_eq!(error.code, protocol::ErrorCode::Malformed);
                assert!(error.message.contains("incomplete"), "{}", error.message);
            }
            other => panic!("expected a fatal error for the stalled frame, got {other:?}"),
        }
        assert!(raw.recv().await.is_none(), "closed after the fatal error");
    }
    println!(
        "{} stalled connections all closed {:?} after the client's round trip",
        3 * each,
        started.elapsed()
    );
    server
        .wait_for_log("closing connection: no handshake", 2 * each)
        .await;
    server
        .wait_for_log("closing connection: a frame stalled", each)
        .await;
    // A flood of closes is not a flood of lines: at most one a second per
    // reason, and one more with the count of the rest.
    let seconds = test_started.elapsed().as_secs();
    let bound = usize::try_from(2 * (seconds + 1)).expect("small");
    for needle in [
        "closing connection: no handshake",
        "closing connection: a frame stalled",
    ] {
        let lines = server.log_lines(needle);
        println!("{needle:?}: {lines} log lines for its closes");
        assert!(
            lines <= bound,
            "{lines} lines of {needle:?} in {seconds} s; at most {bound}"
        );
    }

    // Every slot is free again, and the server still serves.
    let mut last = common::all_slots_free(addr, 300).await;
    let reply = last
        .request(1, serde_json::json!({"exists": {"path": "/"}}))
        .await;
    assert!(reply.result.is_ok(), "{:?}", reply.result);
    let rss_after_kib = server.status_kib("VmRSS");
    println!("server RSS {rss_before_kib} KiB before, {rss_after_kib} KiB after");
    assert!(
        rss_after_kib < rss_before_kib + 128 * 1024,
        "the server's RSS rose from {rss_before_kib} KiB to {rss_after_kib} KiB"
    );
    server.stop().await;
}

/// A length header announcing 4 GiB - 1 is refused from the header alone:
/// the server's address space never grows by that much (bad_input.rs has
/// the in-process case with 1 GiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_gib_length_header_is_refused_without_reserving_it() {
    use tokio::io::AsyncWriteExt;

    let server = ServerProcess::start(&[]).await;
    let peak_before_kib = server.status_kib("VmPeak");
    let mut raw = Raw::session(server.addr).await;
    raw.framed
        .get_mut()
        .write_all(&[0xff, 0xff, 0xff, 0xff, b'{'])
        .await
        .expect("write");
    match raw.recv().await {
        Some(ServerMessage::Fatal(error)) => {
            assert_eq!(
                error.code,
                protocol::ErrorCode::TooLarge,
                "{}",
                error.message
            )
        }
        other => panic!("expected a fatal too_large, got {other:?}"),
    }
    assert!(raw.recv().await.is_none(), "closed after the fatal error");
    server
        .wait_for_log("closing connection: frame size too big", 1)
        .await;
    let peak_after_kib = server.status_kib("VmPeak");
    assert!(
        peak_after_kib < peak_before_kib + 1024 * 1024,
        "the server's address space peaked at {peak_after_kib} KiB, from {peak_before_kib} KiB"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_per_session_max_bounds_one_session_s_watches() {
    use latchkey_client::protocol::ErrorCode;
    use serde_json::json;

    let server = ServerProcess::start(&["--watches-per-session-max", "2"]).await;
    let mut raw = Raw::session(server.addr).await;
    for (xid, path) in [(1, "/w1"), (2, "/w2")] {
        let reply = raw
            .request(xid, json!({"exists": {"path": path, "watch": true}}))
            .await;
        assert!(reply.result.is_ok(), "{:?}", reply.result);
    }
    let refused = raw
        .request(3, json!({"exists": {"path": "/w3", "watch": true}}))
        .await
        .result
        .expect_err("a third watch");
    assert_eq!(refused.code, ErrorCode::LimitExceeded);
    assert!(
        refused.message.contains("the limit is 2"),
        "{}",
        refused.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_per_session_max_above_what_clients_register_is_refused_at_start() {
    let out = tokio::process::Command::new(server_binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--in-memory",
            "--watches-per-session-max",
            "70000",
        ])
        .output();
    let out = within("serve to refuse its settings", out)
        .await
        .expect("run latchkey serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("watches per session (70000) must be from 1 to 65536"),
        "{stderr}"
    );
}

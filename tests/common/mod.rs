//! Test support: a server on 127.0.0.1:0, a client that speaks raw frames,
//! and a TCP proxy that can cut connections or hold back the server's
//! replies, from the test.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use latchkey::server::{Config, RunningServer};
use latchkey_client::protocol::{self, limits, ErrorCode, Hello, Reply, ServerMessage, Welcome};
use latchkey_client::{Client, ClientError, ClientOptions};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::Framed;

/// Generous bound for waiting on an event that must happen.
pub const WAIT: Duration = Duration::from_secs(20);

/// A config for tests: port 0, short session bounds, fast ticks.
pub fn test_config() -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        coordinator: latchkey::state::Config {
            session_timeout_ms_min: 200,
            ..latchkey::state::Config::default()
        },
        tick_interval: Duration::from_millis(20),
        check_invariants: true,
        ..Config::default()
    }
}

pub async fn start_server() -> RunningServer {
    start_server_with(test_config()).await
}

pub async fn start_server_with(config: Config) -> RunningServer {
    RunningServer::start(config)
        .await
        .expect("the test server binds 127.0.0.1:0")
}

pub async fn connect(addr: SocketAddr) -> Client {
    connect_with(ClientOptions::new(addr.to_string())).await
}

pub async fn connect_with(options: ClientOptions) -> Client {
    tokio::time::timeout(WAIT, Client::connect(options))
        .await
        .expect("connect finished in time")
        .expect("connect succeeded")
}

/// A server on a tokio runtime of its own, so that a test can crash it:
/// shutting that runtime down drops every task and closes every socket at
/// once, and no client is told anything, as when the process is killed.
pub struct CrashableServer {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
}

impl CrashableServer {
    /// Starts a server with `config`. A config whose port is one a crashed
    /// server just used binds it again (the listener closes as the runtime
    /// winds down; binding is retried until it has, within [`WAIT`]).
    pub async fn start(config: Config) -> CrashableServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the server");
        let started = Instant::now();
        let server = loop {
            match runtime.spawn(RunningServer::start(config.clone())).await {
                Ok(Ok(server)) => break server,
                Ok(Err(e)) if started.elapsed() < WAIT => {
                    eprintln!("restart: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Err(e)) => panic!("the server did not start within {WAIT:?}: {e}"),
                Err(e) => panic!("the server's start task failed: {e}"),
            }
        };
        let addr = server.addr();
        // Kept running by its own runtime; the handle is not needed to stop
        // it, since a crash is the point.
        std::mem::forget(server);
        CrashableServer {
            runtime: Some(runtime),
            addr,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills the server: every task and socket goes, nothing is sent.
    pub fn crash(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for CrashableServer {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's task would panic.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A fresh, empty temporary folder for one test.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("latchkey-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temporary folder");
    dir
}

/// A proxy in front of `server` and a client connected through it.
pub async fn connect_via_proxy(server: SocketAddr, session_timeout: Duration) -> (Proxy, Client) {
    let proxy = Proxy::start(server).await;
    let client =
        connect_with(ClientOptions::new(proxy.addr().to_string()).session_timeout(session_timeout))
            .await;
    (proxy, client)
}

/// Awaits `future` or fails the test after [`WAIT`].
pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(WAIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A client that speaks raw frames.
pub struct Raw {
    pub framed: Framed<TcpStream, tokio_util::codec::LengthDelimitedCodec>,
}

impl Raw {
    pub async fn open(addr: SocketAddr) -> Raw {
        Raw::over(TcpStream::connect(addr).await.expect("connect"))
    }

    /// Frames an open socket (one bound to a chosen source address, or
    /// with small buffers).
    pub fn over(socket: TcpStream) -> Raw {
        Raw {
            framed: Framed::new(socket, protocol::codec(limits::REPLY_FRAME_BYTES_MAX)),
        }
    }

    /// Opens a connection and a session.
    pub async fn session(addr: SocketAddr) -> Raw {
        Raw::session_welcome(addr).await.0
    }

    /// Opens a connection and a session; returns the server's welcome too.
    pub async fn session_welcome(addr: SocketAddr) -> (Raw, Welcome) {
        Raw::open(addr).await.hello(10_000).await
    }

    /// Opens a session on this connection.
    pub async fn hello(self, session_timeout_ms: u64) -> (Raw, Welcome) {
        let mut raw = self;
        raw.send_json(&json!(Hello {
            protocol_version: protocol::PROTOCOL_VERSION,
            session_timeout_ms,
            resume: None,
        }))
        .await;
        match raw.recv().await {
            Some(ServerMessage::Welcome(welcome)) => (raw, welcome),
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    pub async fn send_json(&mut self, value: &serde_json::Value) {
        self.send_bytes(Bytes::from(value.to_string())).await;
    }

    pub async fn send_bytes(&mut self, body: Bytes) {
        self.framed.send(body).await.expect("send frame");
    }

    /// The next message, or None at end of stream.
    pub async fn recv(&mut self) -> Option<ServerMessage> {
        let frame = within("a frame from the server", self.framed.next()).await?;
        let frame = frame.ok()?;
        Some(serde_json::from_slice(&frame).expect("the server sends valid messages"))
    }

    pub async fn request(&mut self, xid: u64, op: serde_json::Value) -> Reply {
        self.send_json(&json!({ "xid": xid, "op": op })).await;
        match self.recv().await {
            Some(ServerMessage::Reply(reply)) => reply,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// Expects a fatal error with this code, then the end of the stream.
    pub async fn expect_fatal(&mut self, code: ErrorCode) -> String {
        let message = match self.recv().await {
            Some(ServerMessage::Fatal(error)) => {
                assert_eq!(error.code, code, "{}", error.message);
                error.message
            }
            other => panic!("expected a fatal {code:?}, got {other:?}"),
        };
        assert!(
            self.recv().await.is_none(),
            "the server closes after a fatal error"
        );
        message
    }
}

/// Waits until all `slots` connection slots are free at once, which proves
/// that every earlier connection's task has ended. Returns one session on
/// one of them.
pub async fn all_slots_free(addr: SocketAddr, slots: usize) -> Raw {
    within("every connection slot to be free", async {
        loop {
            let mut admitted = Vec::new();
            for _ in 0..slots {
                let mut probe = Raw::open(addr).await;
                probe
                    .send_json(&json!(Hello {
                        protocol_version: protocol::PROTOCOL_VERSION,
                        session_timeout_ms: 10_000,
                        resume: None,
                    }))
                    .await;
                match probe.recv().await {
                    Some(ServerMessage::Welcome(_)) => admitted.push(probe),
                    Some(ServerMessage::Fatal(e)) if e.code == ErrorCode::TooManyConnections => {
                        break
                    }
                    other => panic!("unexpected answer to a probe: {other:?}"),
                }
            }
            if admitted.len() == slots {
                return admitted.swap_remove(0);
            }
            // Pace the rounds; slots free on the server's own schedule,
            // which no message announces.
            drop(admitted);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Control {
    /// Bumped to cut every open connection.
    epoch: u64,
    /// Hold back bytes from the server to the client.
    stall_down: bool,
    /// Hold back bytes in both directions (a partition that keeps sockets
    /// open).
    stall_all: bool,
    /// Close new connections at once.
    refuse: bool,
}

/// A loopback TCP proxy in front of a server.
pub struct Proxy {
    addr: SocketAddr,
    control: Arc<watch::Sender<Control>>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let control = Arc::new(
            watch::channel(Control {
                epoch: 0,
                stall_down: false,
                stall_all: false,
                refuse: false,
            })
            .0,
        );
        let accept_control = control.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if accept_control.borrow().refuse {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let epoch = accept_control.borrow().epoch;
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(
                    client_read,
                    server_write,
                    accept_control.subscribe(),
                    epoch,
                    false,
                ));
                tokio::spawn(pump(
                    server_read,
                    client_write,
                    accept_control.subscribe(),
                    epoch,
                    true,
                ));
            }
        });
        Proxy {
            addr,
            control,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection open now; new ones pass (unless refused).
    pub fn cut_all(&self) {
        self.control.send_modify(|c| {
            c.epoch += 1;
            c.stall_down = false;
            c.stall_all = false;
        });
    }

    /// Closes new connections at once while `refuse` holds.
    pub fn refuse(&self, refuse: bool) {
        self.control.send_modify(|c| c.refuse = refuse);
    }

    /// Holds back everything in both directions, sockets kept open.
    pub fn partition(&self, stall: bool) {
        self.control.send_modify(|c| c.stall_all = stall);
    }

    /// Holds back (or releases) everything the server sends.
    pub fn stall_replies(&self, stall: bool) {
        self.control.send_modify(|c| c.stall_down = stall);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut control: watch::Receiver<Control>,
    epoch: u64,
    downstream: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let now = *control.borrow_and_update();
        if now.epoch != epoch {
            return;
        }
        if now.stall_all || (downstream && now.stall_down) {
            if control.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            changed = control.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Waits until `path` has exactly `count` children.
pub async fn wait_for_children(client: &Client, path: &str, count: usize) {
    within(&format!("{count} children under {path}"), async {
        loop {
            match client.children_watch(path).await {
                Ok((children, _, _)) if children.len() == count => return,
                Ok((_, _, watch)) => {
                    watch.await.expect("a children watch fires");
                }
                Err(ClientError::NoNode { .. }) if count == 0 => return,
                Err(ClientError::NoNode { .. }) => {
                    let (stat, created) = client.exists_watch(path).await.unwrap();
                    if stat.is_none() {
                        created.await.expect("an exist watch fires");
                    }
                }
                Err(e) => panic!("listing {path}: {e}"),
            }
        }
    })
    .await
}

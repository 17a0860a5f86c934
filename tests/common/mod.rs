//! Test support: a server on 127.0.0.1:0 and a TCP proxy that can cut
//! connections or hold back the server's replies, from the test.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use latchkey::server::{Config, RunningServer};
use latchkey_client::{Client, ClientOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

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

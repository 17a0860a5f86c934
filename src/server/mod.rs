//! The server: a TCP listener, one task per connection, the expiry ticker,
//! and graceful shutdown, around the deterministic [`Coordinator`].
//!
//! All state changes go through one lock, as commands (see `core`): in
//! memory, a connection applies its request's command under the lock at
//! once; durable, it proposes the command to the log (`raft`), and the
//! log's state machine applies it under the lock once it is on disk.
//! Either way the reply and every watch event the command produced are
//! queued on the connections concerned under the lock (queueing never
//! blocks), which is what guarantees that a client sees a watch event
//! before any later reply reflecting the change. Reads and heartbeats are
//! answered from the applied state without a command.

mod config;
mod core;
mod frames;
mod lease;
pub(crate) mod log_limit;
mod outbound;
pub(crate) mod raft;

use std::collections::VecDeque;
use std::future::Future;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use latchkey_client::protocol::{
    self, ErrorCode, ErrorReply, Hello, Op, Reply, Request, Secret, ServerMessage, SessionEvent,
    SessionId, Xid, Zxid,
};
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, sleep_until, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use config::Config;
use frames::Frames;
pub use lease::default_folder as default_lease_folder;
use log_limit::limited;
use outbound::{CloseReason, Outbound, Work};

use crate::state::{Command, Coordinator, Outcome};
use core::{flush, Core, PendingAttach};

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}; is another program using that port? (pick another with --listen)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The data folder or its log cannot be used.
    #[error("{0}")]
    Data(String),
    /// The lease file could not be read or written.
    #[error("cannot use the lease file {}: {message}; pass --lease-file with a writable path, or --no-lease-file with --startup-grace", path.display())]
    LeaseFile {
        path: std::path::PathBuf,
        message: String,
    },
}

/// Milliseconds since the Unix epoch that never go backwards: the wall
/// clock read once at start, advanced by the monotonic clock. A wall-clock
/// step while running then cannot expire every session at once.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    start_unix_ms: u64,
}

impl Clock {
    fn new() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Clock {
            start: Instant::now(),
            start_unix_ms: u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.start_unix_ms.saturating_add(elapsed)
    }
}

/// The zxid a fresh in-memory coordinator starts from: the wall clock in
/// microseconds. A restarted server thus hands out fencing tokens above
/// every token of its previous run, without storing anything, as long as the
/// previous run averaged under one write per microsecond and the clock did
/// not step back across the restart.
fn zxid_start() -> Zxid {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    Zxid(u64::try_from(since_epoch.as_micros()).unwrap_or(u64::MAX / 2))
}

/// A 128-bit random secret, hex-encoded.
fn new_secret() -> Secret {
    let bytes: [u8; 16] = rand::random();
    Secret(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

struct Shared {
    core: Arc<Mutex<Core>>,
    /// Where commands go.
    engine: Engine,
    config: Config,
    clock: Clock,
    connection_slots: Arc<Semaphore>,
    /// When shutdown began: every connection is cut `shutdown_grace` after
    /// it, whatever it is still writing.
    shutdown_at: std::sync::OnceLock<tokio::time::Instant>,
    /// Wakes the ticker before its interval when a request left it work (a
    /// close whose session still owns nodes), so that the close's reply
    /// does not wait for the next interval.
    tick_now: Arc<Notify>,
}

/// Where a command goes to be applied.
enum Engine {
    /// Applied at once, under the lock: the state lives in memory only.
    Memory,
    /// Through the log on disk: applied once it is there. The folder is
    /// held (and locked) as long as the server runs.
    Log {
        log: raft::node::Log,
        _folder: raft::folder::DataFolder,
    },
}

impl Shared {
    /// Sends `command` on its way: applied now in memory, or proposed to
    /// the log, whose state machine executes it once it is on disk. Call
    /// under the core's lock (`core`), so that commands go in the order
    /// their connections sent them.
    ///
    /// # Errors
    /// Why the log did not take it (see `Log::propose`): nothing was sent.
    fn submit(
        &self,
        core: &mut Core,
        at_ms: u64,
        ticket: u64,
        command: Command,
    ) -> Result<(), String> {
        match &self.engine {
            Engine::Memory => {
                let pending = core.take_pending(ticket);
                core.execute(at_ms, command, pending);
                Ok(())
            }
            Engine::Log { log, .. } => log.propose(&raft::encoding::Stamped {
                at_ms,
                ticket,
                command,
            }),
        }
    }

    /// Applies `command` and waits until it has been: for the ticker and
    /// the start, which must see each step done before the next.
    ///
    /// # Cancel safety
    /// Safe to drop: the command may still be applied.
    async fn write(&self, at_ms: u64, command: Command) -> Result<(), String> {
        match &self.engine {
            Engine::Memory => {
                let queues = {
                    let mut core = self.core.lock();
                    core.execute(at_ms, command, None);
                    let queues = core.take_to_flush();
                    // Handed straight to a request waiting for it: with an
                    // ordinary unlock the ticker took the lock back at
                    // once, step after step, and a get waited up to 15 ms.
                    parking_lot::MutexGuard::unlock_fair(core);
                    queues
                };
                flush(queues);
                Ok(())
            }
            Engine::Log { log, .. } => {
                log.write(&raft::encoding::Stamped {
                    at_ms,
                    ticket: 0,
                    command,
                })
                .await
            }
        }
    }

    /// Stops the log, if there is one: what is on disk stays.
    ///
    /// # Cancel safety
    /// Safe to drop: the log stops in the background.
    async fn stop_log(&self) {
        if let Engine::Log { log, .. } = &self.engine {
            log.shutdown().await;
        }
    }

    fn durable(&self) -> bool {
        matches!(self.engine, Engine::Log { .. })
    }
}

impl Shared {
    /// The moment every connection must be gone by, once shutdown has
    /// begun (the first call fixes when it began).
    fn shutdown_deadline(&self) -> tokio::time::Instant {
        *self.shutdown_at.get_or_init(tokio::time::Instant::now) + self.config.shutdown_grace
    }
}

/// Turns the server read-only once its log has stopped (a write or an
/// fsync failed): no later write is acknowledged, and those on their way
/// are answered with the reason.
fn log_stopped(core: &Mutex<Core>, why: &str) {
    tracing::error!("the log stopped: {why}; serving reads only, writes are refused until restart");
    let error = ErrorReply::new(ErrorCode::Unavailable, refused_write(why));
    let queues = {
        let mut core = core.lock();
        core.read_only = Some(why.to_owned());
        core.fail_in_flight(&error);
        core.take_to_flush()
    };
    flush(queues);
}

/// What a write is told once the log has stopped for `why`.
fn refused_write(why: &str) -> String {
    format!(
        "the server cannot make writes durable ({why}); this request may not have been applied \
         (read to find out after a restart). Reads still work; the operator must fix the data \
         folder's disk and restart the server"
    )
}

/// What a handshake is told once the log has stopped for `why`: opening
/// or resuming a session is a write too.
fn refused_session(why: &str) -> String {
    format!(
        "the server cannot make writes durable ({why}), so it opens and resumes no session; \
         sessions already connected can still read. The operator must fix the data folder's \
         disk and restart the server"
    )
}

/// A server bound to its address, not yet serving.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Server {
    /// Validates the configuration and binds the listener.
    ///
    /// # Errors
    /// [`ServerError::Config`] for inconsistent settings,
    /// [`ServerError::Bind`] when the address cannot be bound.
    ///
    /// # Cancel safety
    /// Safe: nothing is bound if the future is dropped before it completes.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        config.validate().map_err(ServerError::Config)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let clock = Clock::new();
        let tick_now = Arc::new(Notify::new());
        let shared = match config.data.clone() {
            None => {
                let mut coordinator = Coordinator::new(config.coordinator.clone(), zxid_start());
                let lease = startup_grace(&config, &mut coordinator, clock.now_ms())?;
                let core = Core::new(coordinator, &config, lease, tick_now.clone());
                Shared {
                    core: Arc::new(Mutex::new(core)),
                    engine: Engine::Memory,
                    connection_slots: Arc::new(Semaphore::new(config.connections_max)),
                    shutdown_at: std::sync::OnceLock::new(),
                    tick_now,
                    config,
                    clock,
                }
            }
            Some(path) => {
                let started = Instant::now();
                let folder = raft::folder::DataFolder::open(&path, zxid_start().0)
                    .map_err(ServerError::Data)?;
                let new_folder = folder.is_new();
                let coordinator =
                    Coordinator::new(config.coordinator.clone(), Zxid(folder.zxid_start()));
                let core = Arc::new(Mutex::new(Core::new(
                    coordinator,
                    &config,
                    None,
                    tick_now.clone(),
                )));
                let on_fatal = {
                    let core = core.clone();
                    move |why: String| log_stopped(&core, &why)
                };
                let address = listener
                    .local_addr()
                    .map_or_else(|_| config.listen.to_string(), |a| a.to_string());
                let snapshots = raft::node::Snapshots {
                    folder: folder.path().to_owned(),
                    every: config.snapshot_every,
                };
                let log = raft::node::Log::open(
                    &folder.log(),
                    snapshots,
                    core.clone(),
                    address,
                    on_fatal,
                )
                .await
                .map_err(ServerError::Data)?;
                let (sessions, nodes) = {
                    let core = core.lock();
                    (
                        core.coordinator.session_count(),
                        core.coordinator.node_count(),
                    )
                };
                let shared = Shared {
                    core,
                    engine: Engine::Log {
                        log,
                        _folder: folder,
                    },
                    connection_slots: Arc::new(Semaphore::new(config.connections_max)),
                    shutdown_at: std::sync::OnceLock::new(),
                    tick_now,
                    config,
                    clock,
                };
                // The log's commands were applied under the settings it
                // recorded; those given now apply from here on, and a
                // replay will see the change where it happened.
                let recorded = shared.core.lock().coordinator.configured().cloned();
                if recorded.as_ref() != Some(&shared.config.coordinator) {
                    if recorded.is_some() {
                        info!("settings changed since the log last recorded them; recording the new ones");
                    }
                    let configure = Command::Configure(shared.config.coordinator.clone());
                    shared
                        .write(shared.clock.now_ms(), configure)
                        .await
                        .map_err(|e| ServerError::Data(format!("the log refused a write: {e}")))?;
                }
                // Every session alive before the restart gets its full
                // timeout from now, so that its client has that long to
                // come back and resume it.
                let all = shared.core.lock().coordinator.live_sessions();
                shared
                    .write(shared.clock.now_ms(), Command::Heard(all))
                    .await
                    .map_err(|e| ServerError::Data(format!("the log refused a write: {e}")))?;
                if new_folder {
                    info!(folder = %path.display(), "new data folder: every change is kept in its log");
                } else {
                    info!(
                        folder = %path.display(),
                        sessions,
                        nodes,
                        took_ms = started.elapsed().as_millis(),
                        "data folder replayed: its sessions may resume, each with a fresh timeout"
                    );
                }
                shared
            }
        };
        let shared = Arc::new(shared);
        Ok(Server { listener, shared })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, tells
    /// every connected client that its session has ended, gives connections
    /// `shutdown_grace` to flush, and returns: true if every connection
    /// task had ended by then (a second more is allowed), false if some
    /// were left behind.
    ///
    /// # Cancel safety
    /// Not cancel-safe: drop it only by cancelling `shutdown` and awaiting it.
    pub async fn run(self, shutdown: CancellationToken) -> bool {
        let Server { listener, shared } = self;
        let tracker = TaskTracker::new();
        tracker.spawn(ticker(shared.clone(), shutdown.clone()));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        tracker.spawn(serve_socket(
                            shared.clone(),
                            socket,
                            peer,
                            shutdown.clone(),
                            tracker.clone(),
                        ));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // rather than spin.
                        warn!("accept failed: {e}; retrying in 100 ms");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        let deadline = shared.shutdown_deadline();
        // In memory, every attached connection tells its client that the
        // session has ended, writes what it has, and closes. Durable, the
        // sessions live on in the log: connections just close, and their
        // clients resume once the server is back. A connection still in
        // its handshake sees the cancellation itself.
        let durable = shared.durable();
        let sessions = {
            let mut core = shared.core.lock();
            for attached in core.connections.values() {
                if durable {
                    attached.outbound.close(CloseReason::ShuttingDown);
                } else {
                    attached.outbound.push_last(
                        protocol::encode(&ServerMessage::Session(SessionEvent::Expired)),
                        CloseReason::ShuttingDown,
                    );
                }
            }
            // In memory their nodes end with the server's memory; durable,
            // the rest go after the restart.
            for (_, (outbound, reply)) in core.closing.drain() {
                outbound.fill(reply);
                outbound.close(CloseReason::Done);
            }
            core.coordinator.session_count()
        };
        if durable {
            info!(
                sessions,
                "shutting down: stopped accepting; sessions are kept in the data folder and resume after a restart"
            );
        } else {
            info!(
                sessions,
                "shutting down: stopped accepting; sessions end with the server (state is in memory)"
            );
        }
        tracker.close();
        // Every connection task ends within the grace: it stops taking
        // requests at once, gets the grace to flush, then drops its socket.
        let bound = deadline + Duration::from_secs(1);
        if tokio::time::timeout_at(bound, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                "some connection tasks did not end within {:?}; leaving them behind",
                shared.config.shutdown_grace + Duration::from_secs(1)
            );
            shared.stop_log().await;
            return false;
        }
        shared.stop_log().await;
        true
    }
}

/// Pauses lock grants for the startup grace: until the later of the
/// configured grace and what the lease file of a previous run says (in
/// wall-clock time), the latter bounded by the longest wait this server's
/// settings could need. Opens the lease file for this run, recording at
/// least the end of the pause, so that a crash during the pause leaves the
/// next run as long a wait.
fn startup_grace(
    config: &Config,
    coordinator: &mut Coordinator,
    clock_now_ms: u64,
) -> Result<Option<lease::LeaseRecorder>, ServerError> {
    let lease_error = |path: &std::path::Path, message: String| ServerError::LeaseFile {
        path: path.to_owned(),
        message,
    };
    let wall_now_ms = lease::wall_now_ms();
    let previous_ms = match &config.lease_file {
        Some(path) => lease::read(path).map_err(|m| lease_error(path, m))?,
        None => None,
    };
    // A holder's deadline is at most a session timeout after it was last
    // heard, its lock-delay at most the maximum, the file a second more.
    let wait_max_ms = config
        .coordinator
        .session_timeout_ms_max
        .saturating_add(config.coordinator.lock_delay_ms_max)
        .saturating_add(1_000);
    let mut file_wait_ms = previous_ms.map_or(0, |until| until.saturating_sub(wall_now_ms));
    if file_wait_ms > wait_max_ms {
        if let Some(path) = &config.lease_file {
            warn!(
                "{} asks for a wait of {:?}, longer than any holder of this server's \
                 settings could need; waiting {:?} (was the clock set back?)",
                path.display(),
                Duration::from_millis(file_wait_ms),
                Duration::from_millis(wait_max_ms)
            );
        }
        file_wait_ms = wait_max_ms;
    }
    let grace_ms = config
        .startup_grace
        .map_or(0, |g| u64::try_from(g.as_millis()).unwrap_or(u64::MAX));
    let wait_ms = grace_ms.max(file_wait_ms);
    if wait_ms > 0 {
        coordinator.pause_grants_until(clock_now_ms.saturating_add(wait_ms));
        let wait = Duration::from_millis(wait_ms);
        match &config.lease_file {
            Some(path) if file_wait_ms >= grace_ms => info!(
                "no lock is granted for {wait:?}: {} says a lock holder of the previous \
                 run on this address may act as one until then (delete that file, or pass \
                 --no-lease-file, to skip this wait, at the risk of two holders at once)",
                path.display()
            ),
            _ => info!("no lock is granted for {wait:?} (--startup-grace)"),
        }
    }
    let record_ms = previous_ms
        .unwrap_or(0)
        .min(wall_now_ms.saturating_add(wait_max_ms))
        .max(wall_now_ms.saturating_add(wait_ms));
    match &config.lease_file {
        Some(path) => lease::LeaseRecorder::create(path.clone(), record_ms)
            .map(Some)
            .map_err(|m| lease_error(path, m)),
        None => Ok(None),
    }
}

/// A server running in the background, for tests, benches and embedding.
pub struct RunningServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<bool>,
}

impl RunningServer {
    /// Binds and starts serving on the current tokio runtime.
    ///
    /// # Errors
    /// As [`Server::bind`].
    ///
    /// # Cancel safety
    /// Safe: nothing runs until the future completes.
    pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
        let server = Server::bind(config).await?;
        let addr = server.local_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Ok(RunningServer {
            addr,
            shutdown,
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Shuts down as on SIGTERM and waits until it has. Returns true if
    /// every connection ended within the shutdown grace (see
    /// [`Server::run`]).
    ///
    /// # Cancel safety
    /// Safe: shutdown proceeds in the background if this future is dropped.
    pub async fn stop(self) -> bool {
        self.shutdown.cancel();
        match self.task.await {
            Ok(clean) => clean,
            Err(e) => {
                warn!("server task ended abnormally: {e}");
                false
            }
        }
    }
}

/// Applies `Tick` every `tick_interval` (or at once when woken through
/// `Shared::tick_now`), and again at once, letting go of the coordinator
/// between, while a tick leaves work over (each does a bounded amount:
/// `step_deletes_max`).
async fn ticker(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(shared.config.tick_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
            () = shared.tick_now.notified() => {}
        }
        // Bounded: every tick does work, and the work left shrinks unless
        // clients add to it as fast.
        loop {
            let now_ms = shared.clock.now_ms();
            let heard = shared.core.lock().take_heard();
            // Before the tick, so that a session heard since the last one is
            // not expired by it.
            if !heard.is_empty() {
                if let Err(e) = shared.write(now_ms, Command::Heard(heard)).await {
                    limited!(
                        warn,
                        "heartbeats not written",
                        "heartbeats not written: {e}"
                    );
                }
            }
            if shared.core.lock().backlog(now_ms) {
                if let Err(e) = shared.write(now_ms, Command::Tick).await {
                    limited!(warn, "tick not written", "tick not written: {e}");
                    break;
                }
            }
            let more = shared.core.lock().backlog(now_ms);
            if !more || shutdown.is_cancelled() {
                break;
            }
            tokio::task::yield_now().await;
        }
        log_limit::report_folded();
    }
}

/// Admission control, then the connection's life.
async fn serve_socket(
    shared: Arc<Shared>,
    socket: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let Ok(slot) = shared.connection_slots.clone().try_acquire_owned() else {
        limited!(
            warn,
            "refusing connection: the connection limit is reached",
            %peer,
            limit = shared.config.connections_max,
            "refusing connection: the connection limit is reached"
        );
        let message = ErrorReply::new(
            ErrorCode::TooManyConnections,
            format!(
                "the server has {} connections, its limit; retry later or raise --connections-max",
                shared.config.connections_max
            ),
        );
        let (_reader, writer) = socket.into_split();
        let frame = protocol::encode(&ServerMessage::Fatal(message));
        Box::pin(send_last(&writer, &frame, Duration::from_secs(1))).await;
        return;
    };
    if let Err(e) = socket.set_nodelay(true) {
        debug!(%peer, "set_nodelay failed: {e}");
    }
    // The handshake's task ends once the session is attached; the
    // connection goes on in a task of its own, whose future is only the
    // connection's state, so an idle session costs the server little.
    if let Some(live) = Connection::handshake(shared, socket, peer, shutdown, slot).await {
        tracker.spawn(live);
    }
}

/// The `xid` of a frame whose operation could not be decoded, so the error
/// can still be answered as a reply.
#[derive(Deserialize)]
struct XidOnly {
    xid: Xid,
}

struct Connection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    id: u64,
    session: SessionId,
    /// The session's attachment number from this connection's grant,
    /// carried by each of its requests.
    attach: u64,
    outbound: Arc<Outbound>,
}

/// Why the handshake did not attach a session.
enum NoHello {
    /// Close without a word (logged already).
    Silent,
    /// Send this fatal frame, then close (logged already).
    Fatal(Bytes),
}

impl Connection {
    /// The handshake: reads the client's hello and attaches its session.
    /// Returns the connection, ready to serve requests, or `None` once it
    /// has been refused and closed.
    async fn handshake(
        shared: Arc<Shared>,
        socket: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
        slot: OwnedSemaphorePermit,
    ) -> Option<Live> {
        let (mut reader, writer) = socket.into_split();
        let writer = Arc::new(writer);
        // Boxed: the handshake's buffer and timers live until the session is
        // attached and no longer, instead of sizing every idle connection.
        let hello = Box::pin(read_hello(&shared, &mut reader, peer, &shutdown)).await;
        let (hello, frames) = match hello {
            Ok(hello) => hello,
            Err(NoHello::Silent) => return None,
            Err(NoHello::Fatal(frame)) => {
                Box::pin(send_last(&writer, &frame, refusal_limit(&shared))).await;
                return None;
            }
        };
        let attached = Connection::attach(&shared, peer, &hello, writer.clone(), &shutdown);
        let connection = match Box::pin(attached).await {
            None => return None,
            Some(Ok(connection)) => connection,
            Some(Err(refusal)) => {
                Box::pin(send_last(&writer, &refusal, refusal_limit(&shared))).await;
                return None;
            }
        };
        // A shutdown that began before this session was attached did not see
        // it; one after, did (a second last frame is ignored).
        if shutdown.is_cancelled() {
            connection.outbound.push_last(
                protocol::encode(&ServerMessage::Session(SessionEvent::Expired)),
                CloseReason::ShuttingDown,
            );
        }
        let mut live = Live {
            connection,
            reader,
            writer,
            frames,
            writing: None,
            frame_deadline: None,
            write_deadline: None,
            shutdown,
            reading: true,
            _slot: slot,
        };
        // Requests the client sent right behind its handshake.
        if live.frames.mid_frame() {
            live.on_bytes(&[]);
        }
        Some(live)
    }

    /// Opens or resumes the session and registers this connection as its
    /// current one, with the welcome queued as its first frame. A refused
    /// handshake returns the fatal frame to send before closing; `None`
    /// when the server shut down meanwhile.
    async fn attach(
        shared: &Arc<Shared>,
        peer: SocketAddr,
        hello: &Hello,
        writer: Arc<OwnedWriteHalf>,
        shutdown: &CancellationToken,
    ) -> Option<Result<Connection, Bytes>> {
        let outbound = Arc::new(Outbound::new(
            shared.config.outbound_bytes_max,
            Some(writer),
        ));
        let command = match &hello.resume {
            None => Command::OpenSession {
                timeout_ms: hello.session_timeout_ms,
                secret: new_secret(),
            },
            Some(resume) => Command::ResumeSession {
                session: resume.session_id,
                secret: resume.secret.clone(),
                last_xid_received: resume.last_xid_received,
            },
        };
        let (done, answer) = tokio::sync::oneshot::channel();
        let now_ms = shared.clock.now_ms();
        let (id, ticket) = {
            let mut core = shared.core.lock();
            if let Some(why) = &core.read_only {
                let refusal = ErrorReply::new(ErrorCode::Unavailable, refused_session(why));
                return Some(Err(protocol::encode(&ServerMessage::Fatal(refusal))));
            }
            let id = core.new_connection();
            let ticket = core.wait_for_attach(PendingAttach {
                connection: id,
                peer,
                outbound: outbound.clone(),
                done,
            });
            if let Err(why) = shared.submit(&mut core, now_ms, ticket, command) {
                core.forget_pending(ticket);
                let refusal = ErrorReply::new(ErrorCode::Unavailable, why);
                return Some(Err(protocol::encode(&ServerMessage::Fatal(refusal))));
            }
            let queues = core.take_to_flush();
            drop(core);
            flush(queues);
            (id, ticket)
        };
        let answer = tokio::select! {
            answer = answer => answer,
            _ = shutdown.cancelled() => {
                shared.core.lock().forget_pending(ticket);
                return None;
            }
        };
        let grant = match answer {
            Ok(Ok(grant)) => grant,
            Ok(Err(refusal)) => {
                if refusal.code == ErrorCode::LimitExceeded {
                    limited!(warn, "closing connection: handshake refused at a limit", %peer, "closing connection: handshake refused: {}", refusal.message);
                } else {
                    limited!(info, "closing connection: handshake refused", %peer, "closing connection: handshake refused: {}", refusal.message);
                }
                return Some(Err(protocol::encode(&ServerMessage::Fatal(refusal))));
            }
            // The log stopped before it applied the handshake.
            Err(_) => {
                let refusal = ErrorReply::new(
                    ErrorCode::Unavailable,
                    "the server's log stopped before the handshake was applied; retry later",
                );
                return Some(Err(protocol::encode(&ServerMessage::Fatal(refusal))));
            }
        };
        info!(%peer, session = %grant.session, resumed = hello.resume.is_some(), timeout_ms = grant.timeout_ms, "session attached");
        Some(Ok(Connection {
            shared: shared.clone(),
            peer,
            id,
            session: grant.session,
            attach: grant.attach,
            outbound,
        }))
    }

    /// Decodes and applies one request. Returns false when the connection
    /// must close.
    ///
    /// A read or heartbeat is answered from the current state at once,
    /// unless a request of this connection is still on its way through the
    /// log: then it follows that request there, so that it sees it and is
    /// answered after it. Anything else is a command.
    fn handle_frame(&self, frame: &[u8]) -> bool {
        let request = match serde_json::from_slice::<Request>(frame) {
            Ok(request) => request,
            Err(e) => return self.reject_frame(frame, &e),
        };
        let now_ms = self.shared.clock.now_ms();
        let mut core = self.shared.core.lock();
        // Once the session has moved to another connection, a frame still
        // buffered on this one must not be applied: the new connection's
        // welcome already told the client which xids were applied.
        if !core.is_current(self.session, self.id) {
            return false;
        }
        // A read answered here moves the client's lease estimate before the
        // server's deadline moves (at the next `Heard`): near its deadline,
        // the session's read goes through the log, ordered with the tick
        // that would expire it. Once the log has stopped, no tick expires
        // anyone (a restart gives every session a fresh timeout), so every
        // read is answered here.
        let far = core.read_only.is_some()
            || core
                .coordinator
                .session_deadline_ms(self.session)
                .is_some_and(|(deadline_ms, timeout_ms)| {
                    deadline_ms > now_ms.saturating_add(timeout_ms / 2)
                });
        if !request.op.is_write() && far && !core.has_in_flight(self.session) {
            let outcome = core.read(self.session, self.attach, request.xid, request.op, now_ms);
            let reply = match outcome {
                Outcome::Reply(reply) => reply,
                // Moved on since: as above, the newer attachment answers.
                Outcome::Stale => return false,
                other => unreachable!("a read is answered with a reply, not {other:?}"),
            };
            // The reply's place is taken under the lock (a reply that set a
            // watch must reach the client before the event of any later
            // change fires that watch), but it is encoded after: a page of
            // names or a large node's data costs the other clients no wait.
            self.outbound.hold();
            let queues = core.take_to_flush();
            drop(core);
            flush(queues);
            return self
                .outbound
                .fill(protocol::encode(&ServerMessage::Reply(reply.into_wire())));
        }
        let xid = request.xid;
        let sent = match &core.read_only {
            Some(why) => Err(refused_write(why)),
            None => self.shared.submit(
                &mut core,
                now_ms,
                0,
                Command::Request {
                    session: self.session,
                    attach: self.attach,
                    xid,
                    op: request.op,
                },
            ),
        };
        match sent {
            Ok(()) if self.shared.durable() => core.sent(self.session, xid),
            Ok(()) => {}
            Err(why) => {
                let reply = Reply {
                    xid,
                    zxid: core.coordinator.zxid(),
                    result: Err(ErrorReply::new(ErrorCode::Unavailable, why)),
                };
                return self.answer(&mut core, reply);
            }
        }
        // In memory, a close or a move is done by now; durable, its command
        // is on its way and the connection reads on until it applies.
        let current = core.is_current(self.session, self.id);
        let queues = core.take_to_flush();
        drop(core);
        flush(queues);
        current
    }

    /// Answers a frame that is not a valid request: with an error reply when
    /// its xid can be read (the connection stays), else with a fatal error.
    fn reject_frame(&self, frame: &[u8], error: &serde_json::Error) -> bool {
        let Ok(XidOnly { xid }) = serde_json::from_slice::<XidOnly>(frame) else {
            limited!(warn, "closing connection: frame is not a request", peer = %self.peer, session = %self.session, "closing connection: frame is not a request: {error}");
            self.fatal(
                ErrorCode::Malformed,
                format!("the frame is not a valid request (JSON with \"xid\" and \"op\"): {error}"),
            );
            return false;
        };
        let text = error.to_string();
        let code = if text.contains("unknown variant") {
            ErrorCode::UnknownOperation
        } else {
            ErrorCode::Malformed
        };
        limited!(debug, "rejected request", peer = %self.peer, session = %self.session, ?code, "rejected request: {text}");
        let now_ms = self.shared.clock.now_ms();
        let mut core = self.shared.core.lock();
        if !core.is_current(self.session, self.id) {
            return false;
        }
        // The client was heard from, as with any request: its lease
        // estimate moves on this reply, so the server's deadline must too.
        // A heartbeat with no ack does exactly that.
        let outcome = core.read(
            self.session,
            self.attach,
            xid,
            Op::Ping { ack: Xid(0) },
            now_ms,
        );
        let zxid = match outcome {
            Outcome::Reply(reply) => reply.zxid,
            Outcome::Stale => return false,
            other => unreachable!("a read is answered with a reply, not {other:?}"),
        };
        let reply = Reply {
            xid,
            zxid,
            result: Err(ErrorReply::new(
                code,
                format!("request {} was not applied: {text}", xid.0),
            )),
        };
        let queued = self.answer(&mut core, reply);
        let queues = core.take_to_flush();
        drop(core);
        flush(queues);
        queued
    }

    /// Sends a reply made without the log, behind this connection's
    /// requests still in the log (replies go out in request order).
    fn answer(&self, core: &mut Core, reply: Reply) -> bool {
        let xid = reply.xid;
        let message = protocol::encode(&ServerMessage::Reply(reply));
        if core.answer_in_order(self.session, xid, message.clone()) {
            return true;
        }
        self.outbound.push(message)
    }

    fn fatal(&self, code: ErrorCode, message: String) {
        self.outbound.push_last(
            protocol::encode(&ServerMessage::Fatal(ErrorReply::new(code, message))),
            CloseReason::Done,
        );
    }

    /// Unregisters this connection from its session (if still current) and
    /// closes its queue: what is queued is still written. The session itself
    /// lives on until it expires. Calling it again does nothing.
    fn detach(&self) {
        let mut core = self.shared.core.lock();
        if core.is_current(self.session, self.id) {
            core.connections.remove(&self.session);
        }
        drop(core);
        self.outbound.close(CloseReason::Done);
    }
}

fn log_overflow(peer: SocketAddr, bytes_max: usize) {
    limited!(
        warn,
        "closing connection: the client is not reading its replies",
        %peer,
        "closing connection: the client is not reading its replies \
         (over {bytes_max} bytes queued); its session can resume"
    );
}

/// Reads the handshake: the first frame, within the handshake timeout.
/// Returns it with whatever the client sent after it, unread.
async fn read_hello(
    shared: &Shared,
    reader: &mut OwnedReadHalf,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) -> Result<(Hello, Frames), NoHello> {
    let fatal = |code, message: String| {
        NoHello::Fatal(protocol::encode(&ServerMessage::Fatal(ErrorReply::new(
            code, message,
        ))))
    };
    let timeout = shared.config.handshake_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut frames = Frames::new(shared.config.frame_bytes_max);
    let mut buf = [0u8; READ_CHUNK_BYTES];
    loop {
        let read = tokio::select! {
            _ = shutdown.cancelled() => return Err(NoHello::Silent),
            read = tokio::time::timeout_at(deadline, reader.read(&mut buf)) => read,
        };
        let n = match read {
            Err(_) => {
                limited!(warn, "closing connection: no handshake", %peer, "closing connection: no handshake within {timeout:?}");
                return Err(NoHello::Silent);
            }
            Ok(Ok(0)) => {
                debug!(%peer, "client closed the connection before its handshake");
                return Err(NoHello::Silent);
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                debug!(%peer, "connection failed before its handshake: {e}");
                return Err(NoHello::Silent);
            }
        };
        let mut first = None;
        if let Err(e) = frames.feed(&buf[..n], |frame| {
            first = Some(serde_json::from_slice::<Hello>(frame));
            false
        }) {
            limited!(warn, "closing connection: broken handshake frame", %peer, "closing connection: broken handshake frame: {e}");
            return Err(fatal(ErrorCode::Malformed, format!("broken frame: {e}")));
        }
        let hello = match first {
            None => continue,
            Some(Ok(hello)) => hello,
            Some(Err(e)) => {
                limited!(warn, "closing connection: the first frame is not a handshake", %peer, "closing connection: the first frame is not a handshake: {e}");
                return Err(fatal(
                    ErrorCode::Malformed,
                    format!("the first frame must be a handshake (hello): {e}"),
                ));
            }
        };
        if hello.protocol_version != protocol::PROTOCOL_VERSION {
            limited!(warn, "closing connection: protocol version mismatch", %peer, theirs = hello.protocol_version, "closing connection: protocol version mismatch");
            return Err(fatal(
                ErrorCode::ProtocolVersion,
                format!(
                    "the client speaks protocol version {}, this server speaks {}; \
                     use a client and server of matching versions",
                    hello.protocol_version,
                    protocol::PROTOCOL_VERSION
                ),
            ));
        }
        return Ok((hello, frames));
    }
}

/// How long a refused handshake's error may take to write: a refusal must
/// not keep a shutdown waiting past its grace either.
fn refusal_limit(shared: &Shared) -> Duration {
    shared
        .config
        .write_timeout
        .min(shared.config.shutdown_grace)
}

/// Sends one frame to a connection that is about to close, giving up after
/// `limit`.
async fn send_last(writer: &OwnedWriteHalf, frame: &Bytes, limit: Duration) {
    let mut framed = VecDeque::from([frame.clone()]);
    let all = framed.len();
    let Ok(mut framed) = outbound::frame_batch(&mut framed, all) else {
        return;
    };
    let write = async {
        while !framed.is_empty() {
            writer.writable().await?;
            match writer.try_write(&framed) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let _ = framed.split_to(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(limit, write).await;
}

/// How much one read takes from the socket, into a buffer on the stack.
const READ_CHUNK_BYTES: usize = 4096;

/// A connection with an attached session: everything its task keeps
/// between wakes. Kept small, since every idle session has one; what only
/// some states need (a partial frame, a write the socket did not take, the
/// timers for both) is allocated while that state lasts.
struct Live {
    connection: Connection,
    reader: OwnedReadHalf,
    writer: Arc<OwnedWriteHalf>,
    frames: Frames,
    /// Bytes this task is writing (it holds the queue's turn), when the
    /// socket did not take them at once.
    writing: Option<BytesMut>,
    /// Runs while a frame is incomplete: its rest must come by then.
    frame_deadline: Option<Pin<Box<Sleep>>>,
    /// Runs while `writing` waits for the socket.
    write_deadline: Option<Pin<Box<dyn Future<Output = WriteCut> + Send>>>,
    /// Cut a waiting write at the shutdown deadline.
    shutdown: CancellationToken,
    /// Whether requests are still taken.
    reading: bool,
    /// The connection's place under the connection limit.
    _slot: OwnedSemaphorePermit,
}

/// The connection's task: serves until the connection ends.
impl Future for Live {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let live = self.get_mut();
        let end = live.serve(cx);
        if end.is_ready() {
            live.connection.detach();
        }
        end
    }
}

impl Live {
    /// Writes what is queued, then reads and applies requests, until the
    /// connection ends (`Ready`) or nothing can go on without a wake.
    fn serve(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.connection.outbound.register(cx.waker());
        loop {
            // Writing first: replies to the requests just read go out in one
            // write, and a closed queue wins over a readable request.
            if self.poll_write(cx).is_ready() {
                return Poll::Ready(());
            }
            if self.reading && self.connection.outbound.closing().is_some() {
                self.stop_reading();
            }
            if !self.reading {
                return Poll::Pending;
            }
            if let Some(deadline) = &mut self.frame_deadline {
                if deadline.as_mut().poll(cx).is_ready() {
                    let frame_timeout = self.connection.shared.config.frame_timeout;
                    limited!(
                        warn,
                        "closing connection: a frame stalled",
                        peer = %self.connection.peer, session = %self.connection.session,
                        "closing connection: a frame stalled: its first bytes came but not the \
                         rest within {frame_timeout:?} (its session can resume)"
                    );
                    self.connection.fatal(
                        ErrorCode::Malformed,
                        format!(
                            "a frame was still incomplete {frame_timeout:?} after its first \
                             byte; send each frame whole"
                        ),
                    );
                    self.stop_reading();
                    continue;
                }
            }
            // Uninitialised: zeroing 4 KiB before every read was a quarter
            // of the server's instructions per lock cycle.
            let mut buf = [MaybeUninit::<u8>::uninit(); READ_CHUNK_BYTES];
            let mut read = ReadBuf::uninit(&mut buf);
            match Pin::new(&mut self.reader).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    debug!(peer = %self.connection.peer, session = %self.connection.session, "connection failed: {e}");
                    self.stop_reading();
                }
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    if self.frames.mid_frame() {
                        debug!(peer = %self.connection.peer, session = %self.connection.session, "client closed the connection inside a frame");
                    } else {
                        debug!(peer = %self.connection.peer, session = %self.connection.session, "client closed the connection");
                    }
                    self.stop_reading();
                }
                Poll::Ready(Ok(())) => self.on_bytes(read.filled()),
            }
        }
    }

    /// Applies the requests in bytes just read.
    fn on_bytes(&mut self, bytes: &[u8]) {
        let connection = &self.connection;
        let fed = self
            .frames
            .feed(bytes, |frame| connection.handle_frame(frame));
        match fed {
            Err(e) => {
                limited!(warn, "closing connection: frame refused", peer = %connection.peer, session = %connection.session, "closing connection: {e}");
                connection.fatal(
                    ErrorCode::TooLarge,
                    format!(
                        "frame refused: {e} bytes; send smaller requests, or raise the \
                         server's --frame-bytes-max"
                    ),
                );
                self.stop_reading();
            }
            Ok(fed) if fed.stopped => self.stop_reading(),
            Ok(fed) => {
                if !self.frames.mid_frame() {
                    self.frame_deadline = None;
                } else if fed.frames > 0 || self.frame_deadline.is_none() {
                    // A frame began: its own deadline.
                    let deadline =
                        tokio::time::Instant::now() + self.connection.shared.config.frame_timeout;
                    match &mut self.frame_deadline {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        None => self.frame_deadline = Some(Box::pin(sleep_until(deadline))),
                    }
                }
            }
        }
    }

    /// Takes no more requests; what is queued is still written.
    fn stop_reading(&mut self) {
        self.reading = false;
        self.frame_deadline = None;
        self.frames = Frames::new(0);
        self.connection.detach();
    }

    /// Writes what the queue has for this task. `Ready` when the connection
    /// must end now: the queue closed and is written, it overflowed, the
    /// socket failed, or a write took too long.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let outbound = &self.connection.outbound;
        let peer = self.connection.peer;
        loop {
            let bytes = match &mut self.writing {
                Some(bytes) => {
                    // An overflow drops the connection at once, mid-write.
                    if let Some(CloseReason::Overflow { bytes_max }) = outbound.closing() {
                        log_overflow(peer, bytes_max);
                        return Poll::Ready(());
                    }
                    bytes
                }
                None => match outbound.take_work() {
                    Work::Idle => return Poll::Pending,
                    Work::Closed(reason) => {
                        log_close(peer, &reason);
                        return Poll::Ready(());
                    }
                    Work::Write(bytes) => self.writing.insert(bytes),
                },
            };
            // Bounded: each pass writes at least one byte, or waits.
            while !bytes.is_empty() {
                match self.writer.try_write(bytes) {
                    Ok(0) => {
                        debug!(%peer, "write failed: the socket took nothing");
                        return Poll::Ready(());
                    }
                    Ok(n) => {
                        let _ = bytes.split_to(n);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        match self.writer.as_ref().as_ref().poll_write_ready(cx) {
                            Poll::Ready(Ok(())) => continue,
                            Poll::Ready(Err(e)) => {
                                debug!(%peer, "write failed: {e}");
                                return Poll::Ready(());
                            }
                            Poll::Pending => {}
                        }
                        let limit = self.connection.shared.config.write_timeout;
                        let shared = &self.connection.shared;
                        let shutdown = &self.shutdown;
                        let deadline = self
                            .write_deadline
                            .get_or_insert_with(|| write_deadline(shared, shutdown));
                        match deadline.as_mut().poll(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(WriteCut::Timeout) => {
                                limited!(
                                    warn,
                                    "closing connection: a write timed out",
                                    %peer,
                                    "closing connection: a write took over {limit:?}; \
                                     the client is not reading (its session can resume)"
                                );
                                return Poll::Ready(());
                            }
                            // The server's one shutdown line says why.
                            Poll::Ready(WriteCut::Shutdown) => return Poll::Ready(()),
                        }
                    }
                    Err(e) => {
                        debug!(%peer, "write failed: {e}");
                        return Poll::Ready(());
                    }
                }
            }
            self.writing = None;
            self.write_deadline = None;
            outbound.written();
        }
    }
}

/// Why a write that waited for the socket was given up.
enum WriteCut {
    /// It took longer than the write timeout: the client is not reading.
    Timeout,
    /// The server is shutting down and its grace is over.
    Shutdown,
}

/// The deadline of a write that waits for the socket: the write timeout
/// from now, or the shutdown deadline once shutdown begins, whichever comes
/// first. A connection closing for any reason is cut at the shutdown
/// deadline, and one written in several batches gets the grace once.
fn write_deadline(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> Pin<Box<dyn Future<Output = WriteCut> + Send>> {
    let shared = shared.clone();
    let shutdown = shutdown.clone();
    let limit = shared.config.write_timeout;
    Box::pin(async move {
        tokio::select! {
            () = sleep(limit) => WriteCut::Timeout,
            () = async {
                shutdown.cancelled().await;
                sleep_until(shared.shutdown_deadline()).await;
            } => WriteCut::Shutdown,
        }
    })
}

fn log_close(peer: SocketAddr, reason: &CloseReason) {
    match reason {
        CloseReason::Overflow { bytes_max } => log_overflow(peer, *bytes_max),
        CloseReason::Moved => info!(%peer, "closing connection: its session was resumed elsewhere"),
        CloseReason::SessionExpired => info!(%peer, "closing connection: its session expired"),
        // One line for the whole server says it is stopping.
        CloseReason::ShuttingDown => {}
        // Whoever closed with `Done` logged why, or the client closed or
        // asked to.
        CloseReason::Done => {}
    }
}

#[cfg(test)]
mod tests_replay;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle session keeps one `Live` (as its task's future) and one
    /// queue: growing them grows the server's memory per session, which the
    /// lock bench's sessions workload measures (the target is 2 KiB).
    #[test]
    fn an_idle_connection_keeps_little_state() {
        assert!(
            std::mem::size_of::<Live>() <= 256,
            "Live is {} bytes",
            std::mem::size_of::<Live>()
        );
        assert!(
            std::mem::size_of::<Outbound>() <= 160,
            "Outbound is {} bytes",
            std::mem::size_of::<Outbound>()
        );
    }
}

//! The `latchkey` command line: argument parsing, `serve`, and the
//! client-side commands. The binary's `main` only calls [`main`]; it lives
//! in the library so that another package (the peer comparison in
//! benches/peers) can build the very same binary.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::server::{Config, Server};
use clap::{Args as ClapArgs, Parser, Subcommand};
use latchkey_client::protocol::{NodeKind, Stat, WatchEvent, WatchEventKind};
use latchkey_client::{Client, ClientError, ClientOptions, CreateOptions, Forced};
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod recipes;
mod supervise;

/// latchkey: a lock coordinator with sessions, queued locks, watches and
/// fencing tokens.
#[derive(Parser, Debug)]
#[command(name = "latchkey", version, about, long_about = None)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the coordinator until SIGINT or SIGTERM (durable in --data, or --in-memory).
    Serve(ServeArgs),
    /// Create a node and print its path (with the sequence suffix, if any).
    Create {
        #[command(flatten)]
        common: Common,
        /// The node's path, e.g. /config/db.
        path: String,
        /// The node's data (UTF-8 text; empty if left out).
        data: Option<String>,
        /// Delete the node when this command's session ends. The command
        /// keeps its session open until interrupted (Ctrl-C); if it is
        /// killed instead, the node goes when the session times out (5 s).
        #[arg(long, conflicts_with = "container")]
        ephemeral: bool,
        /// Append a 10-digit counter from the parent to the name.
        #[arg(long)]
        sequential: bool,
        /// A container: deleted once it has had children and has none left.
        #[arg(long)]
        container: bool,
        /// Delete the node when it has not been set for this long, e.g. 10m.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Create missing parents, as containers: each vanishes once its last
        /// child is gone.
        #[arg(long, short = 'p')]
        parents: bool,
    },
    /// Print a node's data, exactly as stored (plus a newline on a
    /// terminal).
    Get {
        #[command(flatten)]
        common: Common,
        /// The node's path, e.g. /config/db.
        path: String,
    },
    /// Replace a node's data. A lock node's data is set only by its own
    /// session; a timed hold's only with --token.
    Set {
        #[command(flatten)]
        common: Common,
        /// The node's path.
        path: String,
        /// The new data (UTF-8 text).
        data: String,
        /// Only if the node is at this version (optimistic update).
        #[arg(long)]
        version: Option<u64>,
        /// For a timed hold: the token `hold` printed (only the hold it
        /// names is set; the write renews the hold for its TTL).
        #[arg(long)]
        token: Option<String>,
    },
    /// Delete a node (it must have no children). Another session's lock
    /// node, a zombie and a timed hold are refused without --force.
    Delete {
        #[command(flatten)]
        common: Common,
        /// The node's path.
        path: String,
        /// Only if the node is at this version.
        #[arg(long)]
        version: Option<u64>,
        /// Delete it even if it is another session's lock node, a zombie or
        /// a timed hold (no token needed). A held lock is taken away as if
        /// its holder's session had ended: the holder is told at once and
        /// keeps the lock through its lock-delay (a `latchkey lock` command
        /// is killed within it), then the next waiter is granted. The
        /// server logs who asked.
        #[arg(long)]
        force: bool,
    },
    /// List a node's children, sorted.
    Ls {
        #[command(flatten)]
        common: Common,
        /// The parent node (default the root).
        #[arg(default_value = "/")]
        path: String,
    },
    /// Print a node's metadata: versions, zxids (czxid is the fencing
    /// token), owner, times.
    Stat {
        #[command(flatten)]
        common: Common,
        /// The node's path.
        path: String,
    },
    /// Run CMD while holding a lock: wait for the lock, run CMD with
    /// LATCHKEY_FENCING_TOKEN set, release when it exits, exit with its
    /// status. If the lock is lost, CMD's process group gets SIGTERM, then
    /// SIGKILL after --kill-grace, before the server can grant the lock to
    /// anyone else, and latchkey exits 4. Not acquired within --timeout:
    /// exits 3 without running CMD.
    Lock {
        #[command(flatten)]
        common: Common,
        /// The lock: a name (kept under /locks) or a path.
        name: String,
        /// Give up waiting after this long, e.g. 30s.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run CMD while leading an election: wait to be leader, run CMD, same
    /// rules on loss as `lock`.
    Elect {
        #[command(flatten)]
        common: Common,
        /// The election: a name (kept under /elections) or a path.
        name: String,
        /// This candidate's id, shown to observers (default host:pid).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Hold a name for a while, e.g. a ticket for a buyer: prints the
    /// token. The hold outlives this command; it ends at its TTL, or when
    /// released with the token.
    Hold {
        #[command(flatten)]
        common: Common,
        /// The hold: a name (kept under /holds) or a path.
        name: String,
        /// How long the hold lasts unless extended, e.g. 10m.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// What the hold is for (stored with it).
        data: Option<String>,
    },
    /// End a hold, with the token `hold` printed.
    Release {
        #[command(flatten)]
        common: Common,
        /// The hold's name or path.
        name: String,
        /// The token `hold` printed.
        token: String,
    },
    /// Extend a hold: it now ends --ttl from now.
    Extend {
        #[command(flatten)]
        common: Common,
        /// The hold's name or path.
        name: String,
        /// The token `hold` printed.
        token: String,
        /// The new time to live, from now.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Show every lock, election, semaphore and hold under PATH: holders with
    /// their fencing token and since when, waiters in order and for how long.
    Status {
        #[command(flatten)]
        common: Common,
        /// Where to look (default the whole tree); a bare name looks at the
        /// lock, election and hold of that name.
        #[arg(default_value = "/")]
        path: String,
    },
    /// Print changes to a node (created, data changed, children changed,
    /// deleted) as they happen, until interrupted.
    Watch {
        #[command(flatten)]
        common: Common,
        /// The node's path; it need not exist yet.
        path: String,
        /// Exit after this many changes (at least 1).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
}

/// How `lock` and `elect` run their command.
#[derive(ClapArgs, Debug, Clone)]
struct RunArgs {
    /// The session timeout: how long a crashed latchkey keeps the lock.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    session_timeout: Duration,
    /// After SIGTERM on loss, how long CMD has before SIGKILL.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    kill_grace: Duration,
    /// Print nothing while waiting.
    #[arg(long)]
    quiet: bool,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

/// Options every client command takes.
#[derive(ClapArgs, Debug, Clone)]
struct Common {
    /// The server's address.
    #[arg(
        long,
        env = "LATCHKEY_SERVER",
        default_value = "127.0.0.1:7878",
        global = true
    )]
    server: String,
    /// Print JSON (one object per line) for scripts.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(ClapArgs, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Smallest session timeout granted.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    session_timeout_min: Duration,
    /// Largest session timeout granted.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
    session_timeout_max: Duration,
    /// Most open connections.
    #[arg(long, default_value_t = Config::default().connections_max)]
    connections_max: usize,
    /// Largest frame a client may send, in bytes.
    #[arg(long, default_value_t = Config::default().frame_bytes_max)]
    frame_bytes_max: usize,
    /// Largest node data, in bytes.
    #[arg(long, default_value_t = Config::default().coordinator.data_bytes_max)]
    data_bytes_max: u64,
    /// Bytes that may wait unread for one client before it is disconnected.
    #[arg(long, default_value_t = Config::default().outbound_bytes_max)]
    outbound_bytes_max: usize,
    /// Most live sessions.
    #[arg(long, default_value_t = Config::default().coordinator.sessions_max)]
    sessions_max: u64,
    /// Most nodes in the tree.
    #[arg(long, default_value_t = Config::default().coordinator.nodes_max)]
    nodes_max: u64,
    /// Most bytes the tree holds, counting each node's path and data.
    #[arg(long, default_value_t = Config::default().coordinator.tree_bytes_max)]
    tree_bytes_max: u64,
    /// Most watches all sessions hold together.
    #[arg(long, default_value_t = Config::default().coordinator.watches_max)]
    watches_max: u64,
    /// Most watches one session holds (at most 65536, what a client may
    /// re-register after a reconnect). A session's watches are dropped in
    /// one step when it ends or resumes: 17 ms for 65536, so a lower limit
    /// means a shorter pause for everyone else.
    #[arg(long, default_value_t = Config::default().coordinator.watches_per_session_max)]
    watches_per_session_max: u64,
    /// Most bytes all sessions' cached replies (kept so that a write retried
    /// after a reconnect is answered, not applied twice) hold together; past
    /// it the largest caches' oldest replies go, and their retries get
    /// retry_unknown.
    #[arg(long, default_value_t = Config::default().coordinator.reply_cache_bytes_max)]
    reply_cache_bytes_max: u64,
    /// After a lock holder's session expires, how long until the lock passes
    /// to the next waiter (unless the lock asked for its own delay).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    lock_delay: Duration,
    /// The longest TTL a timed hold may be taken or extended for.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "7days")]
    hold_ttl_max: Duration,
    /// Most lock nodes one session may have waiting at once; a create past
    /// it is refused with limit_exceeded.
    #[arg(long, default_value_t = Config::default().coordinator.waits_per_session_max)]
    waits_per_session_max: u64,
    /// How long one batch of replies may take to write before a client that
    /// does not read is disconnected (its session lives on).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    write_timeout: Duration,
    /// The data folder: every change goes to the log in it and is
    /// acknowledged once it is on disk, so that a restart keeps sessions,
    /// locks, holds and nodes. Made if absent; one server at a time.
    #[arg(long, default_value = "latchkey-data", conflicts_with = "in_memory")]
    data: PathBuf,
    /// Log entries between two snapshots of the state in --data; a restart
    /// replays at most this many after the last snapshot. 0: no snapshots
    /// (the whole log is kept and replayed).
    #[arg(long, default_value_t = 10_000, conflicts_with = "in_memory")]
    snapshot_every: u64,
    /// Keep the state in memory only, as for tests and demos: a restart
    /// ends every session and loses every node.
    #[arg(long)]
    in_memory: bool,
    /// With --in-memory: grant no lock for at least this long after start,
    /// and as long as the lease file says a lock holder of the previous run
    /// may still act as one. For restarts where the file may be lost (a
    /// reboot, another machine): the longest session timeout in use plus
    /// the lock-delay.
    #[arg(long, value_parser = humantime::parse_duration, requires = "in_memory")]
    startup_grace: Option<Duration>,
    /// With --in-memory: where to record how long this run's lock holders
    /// may act as holders, for a restarted server to wait out. Default:
    /// lease-PORT in $STATE_DIRECTORY, $XDG_STATE_HOME/latchkey or
    /// ~/.local/state/latchkey (none when listening on port 0).
    #[arg(long, conflicts_with = "no_lease_file", requires = "in_memory")]
    lease_file: Option<PathBuf>,
    /// With --in-memory: keep no lease file; a restart then grants locks at
    /// once (after --startup-grace, if given), even to a lock whose
    /// previous holder may still believe it holds it.
    #[arg(long, requires = "in_memory")]
    no_lease_file: bool,
    /// How long a new connection has to send its handshake before it is
    /// closed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    handshake_timeout: Duration,
    /// Once a frame's first byte has come, how long the rest may take before
    /// the connection is closed (its session lives on).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    frame_timeout: Duration,
    /// Check the coordinator's invariants after every step, and abort on
    /// the first one broken. Each check walks the whole state, so it is on
    /// by default only in debug builds; load tests of a debug build turn it
    /// off.
    #[arg(long, default_value_t = Config::default().check_invariants, action = clap::ArgAction::Set)]
    check_invariants: bool,
}

/// The lease file `serve` uses unless told otherwise: one per port, in a
/// folder private to the user, so that a server restarted on the same port
/// finds its predecessor's whichever address it was given.
fn default_lease_file(listen: SocketAddr) -> Option<PathBuf> {
    if listen.port() == 0 {
        return None;
    }
    Some(crate::server::default_lease_folder().join(format!("lease-{}", listen.port())))
}

/// Parses the process's arguments, runs the command on a multi-threaded
/// runtime and returns its exit code. Errors are printed to stderr as
/// `latchkey: MESSAGE`; a bad argument exits through clap with its usage.
pub fn main() -> ExitCode {
    let args = Args::parse();
    if matches!(args.command, Command::Serve(_)) {
        precise_timers();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("latchkey: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("latchkey: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Lets short waits end on time in every thread the server starts (each
/// inherits its creator's slack). The log's flush worker waits 5 us for
/// more writes to share an fsync; Linux's default slack of 50 us made that
/// wait about 55 us, and every durable write as much slower.
fn precise_timers() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_timerslack(1) {
        tracing::debug!("timer slack left at its default: {e}");
    }
}

/// Runs the parsed command; returns the exit code, or an error message for
/// stderr.
pub async fn run(args: Args) -> Result<ExitCode, String> {
    match args.command {
        Command::Serve(serve_args) => serve(serve_args).await,
        command => client_command(command).await,
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

async fn serve(args: ServeArgs) -> Result<ExitCode, String> {
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            EnvFilter::new("info,openraft=warn,chunked_wal=warn,raft_log=warn")
        }))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = Config {
        listen: args.listen,
        coordinator: crate::state::Config {
            session_timeout_ms_min: millis(args.session_timeout_min),
            session_timeout_ms_max: millis(args.session_timeout_max),
            data_bytes_max: args.data_bytes_max,
            sessions_max: args.sessions_max,
            nodes_max: args.nodes_max,
            tree_bytes_max: args.tree_bytes_max,
            watches_max: args.watches_max,
            watches_per_session_max: args.watches_per_session_max,
            reply_cache_bytes_max: args.reply_cache_bytes_max,
            lock_delay_ms_default: millis(args.lock_delay),
            hold_ttl_ms_max: millis(args.hold_ttl_max),
            waits_per_session_max: args.waits_per_session_max,
            ..crate::state::Config::default()
        },
        connections_max: args.connections_max,
        frame_bytes_max: args.frame_bytes_max,
        outbound_bytes_max: args.outbound_bytes_max,
        write_timeout: args.write_timeout,
        startup_grace: args.startup_grace,
        lease_file: if args.no_lease_file || !args.in_memory {
            None
        } else {
            args.lease_file.or_else(|| default_lease_file(args.listen))
        },
        data: (!args.in_memory).then_some(args.data),
        snapshot_every: args.snapshot_every,
        handshake_timeout: args.handshake_timeout,
        frame_timeout: args.frame_timeout,
        check_invariants: args.check_invariants,
        ..Config::default()
    };
    let data_folder = config
        .data
        .as_ref()
        .map(|folder| std::path::absolute(folder).unwrap_or_else(|_| folder.clone()));
    let server = Server::bind(config).await.map_err(|e| e.to_string())?;
    let addr = server.local_addr();
    // Caught before the line below goes out: a SIGTERM sent as soon as a
    // script sees it must stop the server cleanly, not kill it.
    let signal = shutdown_signal();
    println!("latchkey listening on {addr}");
    // Scripts wait for this line; make sure it is out even when piped.
    let _ = std::io::stdout().flush();
    match &data_folder {
        Some(folder) => {
            tracing::info!(%addr, data = %folder.display(), "serving (durable: every change is on disk before it is acknowledged)")
        }
        None => tracing::info!(%addr, "serving (in-memory state: a restart loses it)"),
    }
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        signal.await;
        tracing::info!("signal received; shutting down");
        signals.cancel();
    });
    server.run(shutdown).await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// A future that resolves on SIGINT or SIGTERM. Both are caught from the
/// moment this returns, before the future is first polled (if a handler
/// cannot be installed, it waits for Ctrl-C alone).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let caught =
        signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)));
    async move {
        match caught {
            Ok((mut term, mut interrupt)) => {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Session timeout of the one-shot commands: they are short, and an
/// interrupted command's ephemeral nodes should not linger.
const COMMAND_SESSION_TIMEOUT: Duration = Duration::from_secs(5);

async fn connect(common: &Common, session_timeout: Duration) -> Result<Client, String> {
    let options = ClientOptions::new(common.server.clone()).session_timeout(session_timeout);
    Client::connect(options).await.map_err(|e| e.to_string())
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

fn stat_json(stat: &Stat) -> serde_json::Value {
    serde_json::to_value(stat).unwrap_or(serde_json::Value::Null)
}

fn kind_name(kind: NodeKind) -> &'static str {
    match kind {
        NodeKind::Persistent => "persistent",
        NodeKind::Ephemeral => "ephemeral",
        NodeKind::Container => "container",
    }
}

fn print_stat(stat: &Stat) {
    println!("czxid (fencing token): {}", stat.czxid);
    println!("mzxid:                 {}", stat.mzxid);
    println!("pzxid:                 {}", stat.pzxid);
    println!("created:               {}", format_time(stat.ctime_ms));
    println!("modified:              {}", format_time(stat.mtime_ms));
    println!("version:               {}", stat.version);
    println!("cversion:              {}", stat.cversion);
    println!("kind:                  {}", kind_name(stat.kind));
    if let Some(owner) = stat.ephemeral_owner {
        println!("ephemeral owner:       {owner}");
    }
    if let Some(ttl) = stat.ttl_ms {
        println!(
            "ttl:                   {}",
            humantime::format_duration(Duration::from_millis(ttl))
        );
    }
    if let Some(lock) = &stat.lock {
        let mode = match lock.mode {
            latchkey_client::protocol::LockMode::Exclusive => "exclusive".to_owned(),
            latchkey_client::protocol::LockMode::Shared => "shared".to_owned(),
            latchkey_client::protocol::LockMode::Semaphore { permits } => {
                format!("semaphore of {permits}")
            }
        };
        let state = match (lock.granted, lock.freed_at_ms) {
            (Some(_), Some(freed_at_ms)) => format!(
                "zombie: its holder lost it, it passes on at {}",
                format_time(freed_at_ms)
            ),
            (Some(grant), None) => format!(
                "held since {}, token {}",
                format_time(grant.at_ms),
                grant.token
            ),
            (None, _) => "waiting".to_owned(),
        };
        println!("lock:                  {mode}, {state}");
        println!(
            "lock-delay:            {}",
            humantime::format_duration(Duration::from_millis(lock.delay_ms))
        );
    }
    println!("data length:           {}", stat.data_length);
    println!("children:              {}", stat.num_children);
}

fn format_time(unix_ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(time).to_string()
}

/// Runs one client command on its own session and closes it.
async fn client_command(command: Command) -> Result<ExitCode, String> {
    let common = match &command {
        Command::Serve(_) => unreachable!("serve is handled by run"),
        Command::Create { common, .. }
        | Command::Get { common, .. }
        | Command::Set { common, .. }
        | Command::Delete { common, .. }
        | Command::Ls { common, .. }
        | Command::Stat { common, .. }
        | Command::Lock { common, .. }
        | Command::Elect { common, .. }
        | Command::Hold { common, .. }
        | Command::Release { common, .. }
        | Command::Extend { common, .. }
        | Command::Status { common, .. }
        | Command::Watch { common, .. } => common.clone(),
    };
    let session_timeout = match &command {
        Command::Lock { run, .. } | Command::Elect { run, .. } => {
            // A bad --kill-grace is an argument error: say so before
            // connecting.
            recipes::lock_delay_for(run.kill_grace)?;
            run.session_timeout
        }
        _ => COMMAND_SESSION_TIMEOUT,
    };
    let client = connect(&common, session_timeout).await?;
    let result = match command {
        Command::Lock {
            name, timeout, run, ..
        } => recipes::lock(&client, &name, timeout, run.into()).await,
        Command::Elect { name, id, run, .. } => {
            recipes::elect(&client, &name, id, run.into()).await
        }
        Command::Hold {
            name, ttl, data, ..
        } => recipes::hold(&client, &name, ttl, data, common.json).await,
        Command::Release { name, token, .. } => recipes::release(&client, &name, &token).await,
        Command::Extend {
            name, token, ttl, ..
        } => recipes::extend(&client, &name, &token, ttl).await,
        Command::Status { path, .. } => recipes::status(&client, &path, common.json).await,
        command => execute(&client, &common, command)
            .await
            .map_err(|e| e.to_string()),
    };
    // The session's ephemeral nodes go with it; a failed close only means
    // they go at the session timeout instead.
    let _ = client.close().await;
    result
}

impl From<RunArgs> for recipes::Supervised {
    fn from(run: RunArgs) -> Self {
        recipes::Supervised {
            argv: run.cmd,
            grace: run.kill_grace,
            quiet: run.quiet,
        }
    }
}

async fn execute(
    client: &Client,
    common: &Common,
    command: Command,
) -> Result<ExitCode, ClientError> {
    let json = common.json;
    match command {
        Command::Serve(_)
        | Command::Lock { .. }
        | Command::Elect { .. }
        | Command::Hold { .. }
        | Command::Release { .. }
        | Command::Extend { .. }
        | Command::Status { .. } => unreachable!("handled by client_command"),
        Command::Create {
            path,
            data,
            ephemeral,
            sequential,
            container,
            ttl,
            parents,
            ..
        } => {
            let mut options = if ephemeral {
                CreateOptions::ephemeral()
            } else if container {
                CreateOptions::container()
            } else {
                CreateOptions::persistent()
            };
            if sequential {
                options = options.sequential();
            }
            if let Some(ttl) = ttl {
                options = options.ttl(ttl);
            }
            if parents {
                options = options.make_parents();
            }
            let data = data.unwrap_or_default();
            let created = client.create(&path, data.as_bytes(), options).await?;
            if json {
                print_json(&json!({ "path": created.path, "stat": stat_json(&created.stat) }));
            } else {
                println!("{}", created.path);
            }
            if ephemeral {
                let _ = std::io::stdout().flush();
                eprintln!(
                    "holding ephemeral node {} until interrupted (Ctrl-C); it is deleted when this session ends",
                    created.path
                );
                let mut status = client.session_status();
                tokio::select! {
                    _ = shutdown_signal() => {}
                    _ = async {
                        loop {
                            if status.changed().await.is_err() { break; }
                            let state = status.borrow().state;
                            if matches!(state, latchkey_client::SessionState::Expired | latchkey_client::SessionState::Closed) {
                                break;
                            }
                        }
                    } => {
                        return Err(ClientError::SessionExpired);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Get { path, .. } => {
            let (data, stat) = client.get(&path).await?;
            if json {
                print_json(&json!({
                    "path": path,
                    "data": String::from_utf8(data.clone()).ok(),
                    "data_base64": base64_of(&data),
                    "stat": stat_json(&stat),
                }));
            } else {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&data);
                if out.is_terminal() && !data.ends_with(b"\n") && !data.is_empty() {
                    let _ = out.write_all(b"\n");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Set {
            path,
            data,
            version,
            token,
            ..
        } => {
            let stat = match token {
                Some(token) => {
                    let token = recipes::parse_token(&token).map_err(|message| {
                        ClientError::InvalidArgument {
                            message,
                            index: None,
                        }
                    })?;
                    client
                        .request(latchkey_client::protocol::Op::Set {
                            path: path.clone(),
                            data: data.as_bytes().into(),
                            version,
                            czxid: Some(token.0),
                        })
                        .await
                        .and_then(|result| match result {
                            latchkey_client::protocol::OpResult::Stat { stat } => Ok(stat),
                            other => Err(ClientError::Protocol {
                                message: format!("a set was answered with {other:?}"),
                            }),
                        })?
                }
                None => client.set(&path, data.as_bytes(), version).await?,
            };
            if json {
                print_json(&json!({ "path": path, "stat": stat_json(&stat) }));
            } else {
                println!("version {}", stat.version);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete {
            path,
            version: _,
            force: true,
            ..
        } => {
            let forced = client.force_delete(&path).await?;
            let freed_at_ms = match forced {
                Forced::Deleted => None,
                Forced::Zombie { freed_at } => Some(
                    freed_at
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                ),
            };
            if json {
                print_json(&json!({ "path": path, "deleted": true, "freed_at_ms": freed_at_ms }));
            } else if let Some(freed_at_ms) = freed_at_ms {
                eprintln!(
                    "{path}: taken from its holder, who has been told; the lock passes on at {} \
                     (its lock-delay), when the node is deleted",
                    format_time(freed_at_ms)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete { path, version, .. } => {
            client.delete(&path, version).await.map_err(|e| match e {
                ClientError::NotOwner { message, .. } => ClientError::NotOwner {
                    message: format!("{message}; here: latchkey delete --force {path}"),
                    owner: None,
                    index: None,
                },
                ClientError::TokenRequired { message, .. } => ClientError::TokenRequired {
                    message: format!(
                        "{message}; here: latchkey release NAME TOKEN, or latchkey delete \
                         --force {path}"
                    ),
                    index: None,
                },
                e => e,
            })?;
            if json {
                print_json(&json!({ "path": path, "deleted": true }));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls { path, .. } => {
            let (children, stat) = client.children(&path).await?;
            if json {
                print_json(
                    &json!({ "path": path, "children": children, "stat": stat_json(&stat) }),
                );
            } else {
                for child in children {
                    println!("{child}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stat { path, .. } => {
            let stat = client
                .exists(&path)
                .await?
                .ok_or_else(|| ClientError::NoNode {
                    message: format!("no node at {path}"),
                    index: None,
                })?;
            if json {
                print_json(&json!({ "path": path, "stat": stat_json(&stat) }));
            } else {
                print_stat(&stat);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { path, count, .. } => watch(client, &path, count, json).await,
    }
}

fn base64_of(data: &[u8]) -> String {
    serde_json::to_value(latchkey_client::protocol::Data(data.to_vec()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// One change `watch` reports.
struct Change {
    kind: WatchEventKind,
    zxid: u64,
}

/// The changes between two reads of a node's stat. Reading the stat at
/// every re-arm, rather than trusting the one-shot event alone, means a
/// change made between an event and the re-arm is still reported.
fn changes(before: Option<&Stat>, after: Option<&Stat>, event_zxid: u64) -> Vec<Change> {
    let change = |kind, zxid| Change { kind, zxid };
    match (before, after) {
        (None, None) => Vec::new(),
        (None, Some(now)) => vec![change(WatchEventKind::NodeCreated, now.czxid.0)],
        (Some(_), None) => vec![change(WatchEventKind::NodeDeleted, event_zxid)],
        (Some(was), Some(now)) if was.czxid != now.czxid => vec![
            change(WatchEventKind::NodeDeleted, event_zxid.min(now.czxid.0)),
            change(WatchEventKind::NodeCreated, now.czxid.0),
        ],
        (Some(was), Some(now)) => {
            let mut found = Vec::new();
            if now.mzxid != was.mzxid {
                found.push(change(WatchEventKind::NodeDataChanged, now.mzxid.0));
            }
            if now.pzxid != was.pzxid {
                found.push(change(WatchEventKind::NodeChildrenChanged, now.pzxid.0));
            }
            found
        }
    }
}

/// Prints every change to `path` until interrupted or `count` changes.
/// Changes in quick succession may be reported as one, as with any
/// one-shot watch; none is missed.
async fn watch(
    client: &Client,
    path: &str,
    count: Option<u64>,
    json: bool,
) -> Result<ExitCode, ClientError> {
    let mut reported: u64 = 0;
    let mut last: Option<Stat> = None;
    let mut event_zxid: u64 = 0;
    let mut first = true;
    loop {
        let (stat, node_watch) = client.exists_watch(path).await?;
        let child_watch = match stat {
            Some(_) => match client.children_watch(path).await {
                Ok((_, _, watch)) => Some(watch),
                // Deleted between the two reads: the node watch reports it.
                Err(ClientError::NoNode { .. }) => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        if first {
            first = false;
            eprintln!("watching {path}; Ctrl-C to stop");
        } else {
            for change in changes(last.as_ref(), stat.as_ref(), event_zxid) {
                if json {
                    let event = change.kind.to_string();
                    print_json(&json!({ "event": event, "path": path, "zxid": change.zxid }));
                } else {
                    println!("{} {path} (zxid {})", change.kind, change.zxid);
                }
                let _ = std::io::stdout().flush();
                reported += 1;
                if count.is_some_and(|n| reported >= n) {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        last = stat;
        let event: WatchEvent = tokio::select! {
            _ = shutdown_signal() => return Ok(ExitCode::SUCCESS),
            event = node_watch => event?,
            event = async {
                match child_watch {
                    Some(watch) => watch.await,
                    None => std::future::pending().await,
                }
            } => event?,
        };
        event_zxid = event.zxid.0;
    }
}

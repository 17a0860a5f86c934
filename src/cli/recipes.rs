//! The recipe commands: lock, elect, hold, release, extend, status.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use latchkey_client::protocol::{LockMode, Stat, Zxid};
use latchkey_client::recipes::{Election, Hold, HoldToken, Lock};
use latchkey_client::{Client, ClientError};
use serde_json::json;

use super::supervise::{run_while_held, Ended, EXIT_LOST, EXIT_TIMEOUT};

/// A lock's delay must outlast the kill grace, so that the command is dead
/// before the server hands the lock to the next holder; this is the margin.
const LOCK_DELAY_MARGIN: Duration = Duration::from_secs(1);

/// The longest lock-delay a default server grants
/// (`state::Config::lock_delay_ms_max`).
const LOCK_DELAY_MAX: Duration = Duration::from_secs(60);

/// The lock-delay that keeps the server from granting the lock to anyone
/// else until a command killed on loss is surely dead.
pub fn lock_delay_for(grace: Duration) -> Result<Duration, String> {
    let delay = grace + LOCK_DELAY_MARGIN;
    if delay > LOCK_DELAY_MAX {
        return Err(format!(
            "--kill-grace {} is too long: the lock is held back for the grace plus {} after a \
             loss, and a server allows at most {}; use at most {}",
            humantime::format_duration(grace),
            humantime::format_duration(LOCK_DELAY_MARGIN),
            humantime::format_duration(LOCK_DELAY_MAX),
            humantime::format_duration(LOCK_DELAY_MAX - LOCK_DELAY_MARGIN),
        ));
    }
    Ok(delay)
}

/// How often the waiting line is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Most nodes `status` visits, so a huge tree cannot keep it reading.
const STATUS_NODES_MAX: usize = 10_000;

/// Most queue entries whose data the waiting line reads to find its place.
const PLACE_SCAN_MAX: usize = 100;

/// A recipe name: a path if it starts with `/`, else a name under `base`.
pub fn recipe_path(name: &str, base: &str) -> String {
    if name.starts_with('/') {
        name.to_string()
    } else {
        format!("{base}/{name}")
    }
}

/// Who holds or waits: stored as a lock node's data, shown by `status` and
/// by waiters' progress lines.
fn holder_description(argv: &[String]) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    json!({
        "host": host,
        "pid": std::process::id(),
        "cmd": argv.join(" "),
    })
    .to_string()
}

/// A short text for a holder description (the JSON above, or anything a
/// program stored).
fn describe(data: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(v) if v.get("pid").is_some() => format!(
            "{}:{} ({})",
            v["host"].as_str().unwrap_or("?"),
            v["pid"],
            v["cmd"].as_str().unwrap_or("")
        ),
        _ if data.is_empty() => "(no description)".into(),
        _ => String::from_utf8_lossy(data).chars().take(80).collect(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ago(since_ms: u64) -> String {
    let secs = now_ms().saturating_sub(since_ms) / 1000;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// The lock nodes of a queue, in queue order, with stat and data.
async fn queue(client: &Client, path: &str) -> Result<Vec<(String, Stat, Vec<u8>)>, ClientError> {
    let (mut names, _) = match client.children(path).await {
        Ok(found) => found,
        Err(ClientError::NoNode { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    names.sort();
    let mut nodes = Vec::new();
    for name in names {
        let child = format!("{}/{name}", path.trim_end_matches('/'));
        match client.get(&child).await {
            Ok((data, stat)) if stat.lock.is_some() => nodes.push((name, stat, data)),
            Ok(_) | Err(ClientError::NoNode { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    nodes.sort_by_key(|(_, stat, _)| stat.czxid);
    Ok(nodes)
}

/// One line on what a waiter waits for: who holds the lock and since when,
/// and this waiter's place.
async fn progress_line(client: &Client, path: &str, mine: &str) -> Result<String, ClientError> {
    let nodes = queue(client, path).await?;
    let holders: Vec<String> = nodes
        .iter()
        .filter_map(|(_, stat, data)| {
            let grant = stat.lock.as_ref()?.granted?;
            Some(format!("{} for {}", describe(data), ago(grant.at_ms)))
        })
        .collect();
    // Numbered among the waiters, as `status` numbers them.
    let waiters: Vec<&Vec<u8>> = nodes
        .iter()
        .filter(|(_, stat, _)| stat.lock.as_ref().is_some_and(|l| l.granted.is_none()))
        .map(|(_, _, data)| data)
        .collect();
    let place = if waiters.len() <= PLACE_SCAN_MAX {
        waiters
            .iter()
            .position(|data| data.as_slice() == mine.as_bytes())
            .map(|i| format!("waiter {} of {}", i + 1, waiters.len()))
    } else {
        None
    };
    Ok(format!(
        "waiting for {path}: held by {}; {}",
        if holders.is_empty() {
            "nobody (handing over)".to_string()
        } else {
            holders.join(", ")
        },
        place.unwrap_or_else(|| format!("{} waiting", waiters.len()))
    ))
}

/// Awaits `acquiring`, refreshing one live line on stderr while it waits.
async fn with_progress<T>(
    client: &Client,
    path: &str,
    mine: &str,
    show: bool,
    acquiring: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(acquiring);
    if !show {
        return acquiring.await;
    }
    let mut ticks = tokio::time::interval(PROGRESS_EVERY);
    // The first tick fires at once: an uncontended lock shows no line.
    ticks.tick().await;
    let mut shown = false;
    let result = loop {
        tokio::select! {
            result = &mut acquiring => break result,
            _ = ticks.tick() => {
                if let Ok(line) = progress_line(client, path, mine).await {
                    eprint!("\r\x1b[2K{line}");
                    let _ = std::io::stderr().flush();
                    shown = true;
                }
            }
        }
    };
    if shown {
        eprint!("\r\x1b[2K");
    }
    result
}

/// Exit status after an interrupt while waiting, as shells report SIGINT.
const EXIT_INTERRUPTED: u8 = 130;

/// Awaits `waiting`, unless SIGINT, SIGTERM or SIGHUP comes first: then the wait is
/// dropped (a pending acquire deletes its queue node) and `None` returned,
/// and the caller's session close removes whatever is left at once. Without
/// this, an interrupted waiter would die with its place still queued and
/// hold up everyone behind it until its session timed out.
async fn unless_interrupted<T>(waiting: impl std::future::Future<Output = T>) -> Option<T> {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return Some(waiting.await);
    };
    tokio::select! {
        done = waiting => Some(done),
        _ = int.recv() => None,
        _ = term.recv() => None,
        _ = hup.recv() => None,
    }
}

/// Options shared by `lock` and `elect`.
pub struct Supervised {
    pub argv: Vec<String>,
    pub grace: Duration,
    pub quiet: bool,
}

/// `latchkey lock NAME [--timeout D] -- CMD`.
pub async fn lock(
    client: &Client,
    name: &str,
    timeout: Option<Duration>,
    run: Supervised,
) -> Result<ExitCode, String> {
    let path = recipe_path(name, "/locks");
    let mine = holder_description(&run.argv);
    let lock = Lock::new(client, &path)
        .data(mine.as_str())
        .lock_delay(lock_delay_for(run.grace)?);
    let show = !run.quiet && std::io::stderr().is_terminal();
    let acquiring = async {
        match timeout {
            Some(t) => lock.acquire_timeout(t).await,
            None => lock.acquire().await.map(Some),
        }
    };
    let Some(guard) =
        unless_interrupted(with_progress(client, &path, &mine, show, acquiring)).await
    else {
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    };
    let guard = guard.map_err(|e| e.to_string())?;
    let Some(guard) = guard else {
        let waited = timeout.map(humantime::format_duration);
        if !run.quiet {
            eprintln!(
                "latchkey: {path} was not acquired within {}; the command was not run",
                waited.map_or_else(String::new, |w| w.to_string())
            );
        }
        return Ok(ExitCode::from(EXIT_TIMEOUT));
    };
    let token = guard.token();
    let lost = async { guard.lost().await.to_string() };
    let ended = run_while_held(&run.argv, token, lost, run.grace).await?;
    finish(ended, &path, "lock", &run, async { guard.release().await }).await
}

/// `latchkey elect NAME [--id ID] -- CMD`.
pub async fn elect(
    client: &Client,
    name: &str,
    id: Option<String>,
    run: Supervised,
) -> Result<ExitCode, String> {
    let path = recipe_path(name, "/elections");
    let id = id.unwrap_or_else(|| describe(holder_description(&run.argv).as_bytes()));
    let election = Election::new(client, &path, id.as_str()).lock_delay(lock_delay_for(run.grace)?);
    let show = !run.quiet && std::io::stderr().is_terminal();
    if show {
        eprintln!("campaigning in {path} as {id}");
    }
    let Some(leadership) = unless_interrupted(election.campaign()).await else {
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    };
    let leadership = leadership.map_err(|e| e.to_string())?;
    if show {
        eprintln!("leading {path} (fencing token {})", leadership.token());
    }
    let token = leadership.token();
    let lost = async { leadership.lost().await.to_string() };
    let ended = run_while_held(&run.argv, token, lost, run.grace).await?;
    finish(ended, &path, "leadership", &run, async {
        leadership.resign().await
    })
    .await
}

/// Releases after a normal exit; reports a loss.
async fn finish(
    ended: Ended,
    path: &str,
    what: &str,
    run: &Supervised,
    release: impl std::future::Future<Output = Result<(), ClientError>>,
) -> Result<ExitCode, String> {
    match ended {
        Ended::Exited(code) => {
            if let Err(e) = release.await {
                eprintln!(
                    "latchkey: releasing {path} failed: {e}; it is freed when the session ends"
                );
            }
            Ok(code)
        }
        Ended::Lost(reason) => {
            eprintln!(
                "latchkey: lost the {what} on {path} ({reason}); `{}` was terminated",
                run.argv.join(" ")
            );
            Ok(ExitCode::from(EXIT_LOST))
        }
    }
}

pub(crate) fn parse_token(token: &str) -> Result<HoldToken, String> {
    token
        .trim()
        .parse::<u64>()
        .map(|z| HoldToken(Zxid(z)))
        .map_err(|_| format!("{token:?} is not a hold token (the number `latchkey hold` printed)"))
}

/// `latchkey hold NAME --ttl D [DATA]`: prints the token.
pub async fn hold(
    client: &Client,
    name: &str,
    ttl: Duration,
    data: Option<String>,
    json_out: bool,
) -> Result<ExitCode, String> {
    if ttl.is_zero() {
        return Err("--ttl must be above 0, e.g. --ttl 10m".into());
    }
    let path = recipe_path(name, "/holds");
    let token = Hold::take(client, &path, ttl, data.unwrap_or_default().as_str())
        .await
        .map_err(|e| e.to_string())?;
    if json_out {
        println!("{}", json!({ "path": path, "token": token.0.0 }));
    } else {
        println!("{}", token.0 .0);
    }
    Ok(ExitCode::SUCCESS)
}

/// A hold error in the terms of the hold commands.
fn hold_error(path: &str, token: &str, error: ClientError) -> String {
    match error {
        ClientError::NoNode { .. } => format!(
            "the hold on {path} has ended (it expired or was released); take it again with \
             `latchkey hold`"
        ),
        ClientError::BadToken { .. } => format!(
            "{token} is not the token of the current hold on {path} (a wrong token, or the hold \
             ended and was taken again)"
        ),
        other => other.to_string(),
    }
}

/// `latchkey release NAME TOKEN`.
pub async fn release(client: &Client, name: &str, token: &str) -> Result<ExitCode, String> {
    let path = recipe_path(name, "/holds");
    Hold::release(client, &path, parse_token(token)?)
        .await
        .map_err(|e| hold_error(&path, token, e))?;
    Ok(ExitCode::SUCCESS)
}

/// `latchkey extend NAME TOKEN --ttl D`.
pub async fn extend(
    client: &Client,
    name: &str,
    token: &str,
    ttl: Duration,
) -> Result<ExitCode, String> {
    if ttl.is_zero() {
        return Err("--ttl must be above 0, e.g. --ttl 10m".into());
    }
    let path = recipe_path(name, "/holds");
    Hold::extend(client, &path, parse_token(token)?, ttl)
        .await
        .map_err(|e| hold_error(&path, token, e))?;
    Ok(ExitCode::SUCCESS)
}

fn mode_name(mode: LockMode) -> String {
    match mode {
        LockMode::Exclusive => "exclusive".into(),
        LockMode::Shared => "shared".into(),
        LockMode::Semaphore { permits } => format!("semaphore of {permits}"),
    }
}

/// `latchkey status [PATH]`: every lock queue and hold under PATH; a bare
/// name looks in the lock, election and hold of that name.
pub async fn status(client: &Client, root: &str, json_out: bool) -> Result<ExitCode, String> {
    let mut pending: VecDeque<String> = if root.starts_with('/') {
        VecDeque::from([root.to_string()])
    } else {
        ["/locks", "/elections", "/holds"]
            .iter()
            .map(|base| recipe_path(root, base))
            .collect()
    };
    let mut visited = 0usize;
    let mut found = Vec::new();
    while let Some(path) = pending.pop_front() {
        visited += 1;
        if visited > STATUS_NODES_MAX {
            eprintln!("latchkey: stopped after {STATUS_NODES_MAX} nodes; name a narrower PATH");
            break;
        }
        let (data, stat) = match client.get(&path).await {
            Ok(found) => found,
            Err(ClientError::NoNode { .. }) => continue,
            Err(e) => return Err(e.to_string()),
        };
        if let Some(ttl) = stat.ttl_ms {
            found.push(json!({
                "path": path,
                "kind": "hold",
                "token": stat.czxid,
                "held_by": describe(&data),
                "until_ms": stat.mtime_ms.saturating_add(ttl),
            }));
        }
        let nodes = queue(client, &path).await.map_err(|e| e.to_string())?;
        if !nodes.is_empty() {
            let mut holders = Vec::new();
            let mut waiters = Vec::new();
            for (name, stat, data) in &nodes {
                let Some(lock) = &stat.lock else { continue };
                match lock.granted {
                    Some(grant) => holders.push(json!({
                        "node": name,
                        "token": grant.token,
                        "since_ms": grant.at_ms,
                        "held_by": describe(data),
                        "mode": mode_name(lock.mode),
                        "freed_at_ms": lock.freed_at_ms,
                    })),
                    None => waiters.push(json!({
                        "node": name,
                        "since_ms": stat.ctime_ms,
                        "waiting": describe(data),
                        "mode": mode_name(lock.mode),
                    })),
                }
            }
            found.push(json!({
                "path": path,
                "kind": "queue",
                "holders": holders,
                "waiters": waiters,
            }));
        }
        let (mut children, _) = match client.children(&path).await {
            Ok(listing) => listing,
            Err(ClientError::NoNode { .. }) => continue,
            Err(e) => return Err(e.to_string()),
        };
        children.sort();
        for child in children {
            let child_path = format!("{}/{child}", path.trim_end_matches('/'));
            // Lock nodes have no children; skip reading them again.
            if !nodes.iter().any(|(name, _, _)| *name == child) {
                pending.push_back(child_path);
            }
        }
    }
    if json_out {
        for entry in &found {
            println!("{entry}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if found.is_empty() {
        println!("no locks, elections, semaphores or holds under {root}");
    }
    for entry in &found {
        print_entry(entry);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_entry(entry: &serde_json::Value) {
    let path = entry["path"].as_str().unwrap_or("?");
    if entry["kind"] == "hold" {
        let until = entry["until_ms"].as_u64().unwrap_or(0);
        let left = until.saturating_sub(now_ms()) / 1000;
        println!(
            "{path}: held by {} (token {}) for {} more",
            entry["held_by"].as_str().unwrap_or("?"),
            entry["token"],
            humantime::format_duration(Duration::from_secs(left))
        );
        return;
    }
    println!("{path}:");
    for holder in entry["holders"].as_array().into_iter().flatten() {
        let freed = holder["freed_at_ms"]
            .as_u64()
            .map(|at| {
                format!(
                    "; lost by its holder (session expired or forced delete), freed in {}ms",
                    at.saturating_sub(now_ms())
                )
            })
            .unwrap_or_default();
        println!(
            "  holder  {} ({}) token {} for {}: {}{freed}",
            holder["node"].as_str().unwrap_or("?"),
            holder["mode"].as_str().unwrap_or("?"),
            holder["token"],
            ago(holder["since_ms"].as_u64().unwrap_or(0)),
            holder["held_by"].as_str().unwrap_or("?"),
        );
    }
    for (i, waiter) in entry["waiters"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        println!(
            "  {:>6}  {} ({}) waiting {}: {}",
            format!("#{}", i + 1),
            waiter["node"].as_str().unwrap_or("?"),
            waiter["mode"].as_str().unwrap_or("?"),
            ago(waiter["since_ms"].as_u64().unwrap_or(0)),
            waiter["waiting"].as_str().unwrap_or("?"),
        );
    }
}

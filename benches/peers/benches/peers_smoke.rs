//! Checks the lock of each running peer (Redis, etcd, ZooKeeper) before a
//! benchmark relies on it, and times a short uncontended loop of each.
//!
//!   scripts/peers.sh start
//!   cargo bench --manifest-path benches/peers/Cargo.toml --bench peers_smoke
//!   cargo bench --manifest-path benches/peers/Cargo.toml --bench peers_smoke -- --tasks 8 --rounds 50 --cycles 1000
//!
//! For each peer, `--tasks` clients (each its own connection and session)
//! take one lock `--rounds` times each, holding it 1 ms; a counter shared
//! by the tasks checks that no two ever hold it at once and that every
//! acquire and release completes. Then one client runs `--cycles`
//! acquire+release pairs on a lock nobody else wants (a tenth more first,
//! not recorded) and the latency is printed.
//!
//! Peers that are not running are skipped, each with a line saying why; with
//! none running the bench says so and exits 0. It exits 1 if a running
//! peer's lock fails the check, 2 on a bad argument.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use latchkey_peers::Peer;

/// How long each holder keeps the lock: long enough that a lock which let
/// two clients in would be caught with both inside.
const HOLD: Duration = Duration::from_millis(1);

/// A bound on one peer's whole contended check. Each acquire has its own
/// bound too; this one catches a release or a close that hangs.
const CHECK_TIMEOUT: Duration = Duration::from_secs(300);

struct Options {
    tasks: usize,
    rounds: usize,
    cycles: usize,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        tasks: 4,
        rounds: 25,
        cycles: 300,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let target = match arg.as_str() {
            "--tasks" => &mut options.tasks,
            "--rounds" => &mut options.rounds,
            "--cycles" => &mut options.cycles,
            // cargo bench passes this to every harness = false bench.
            "--bench" => continue,
            other => {
                return Err(format!(
                    "unknown argument {other:?}; the arguments are --tasks N, --rounds N and --cycles N"
                ))
            }
        };
        let value = args
            .next()
            .ok_or_else(|| format!("{arg} needs a number after it"))?;
        *target = value
            .parse()
            .map_err(|e| format!("{arg} {value:?}: not a count ({e})"))?;
    }
    if options.tasks < 2 || options.rounds == 0 {
        return Err(
            "--tasks must be at least 2 and --rounds at least 1, or nothing contends".into(),
        );
    }
    Ok(options)
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("peers_smoke: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "peers_smoke: {} tasks x {} rounds on one lock per peer, then {} uncontended cycles; {} cores",
        options.tasks,
        options.rounds,
        options.cycles,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let detected = latchkey_peers::detect().await;
    for line in &detected.skipped {
        println!("{line}");
    }
    if detected.peers.is_empty() {
        println!(
            "peers_smoke: no peer is running; nothing checked (scripts/peers.sh start runs them)"
        );
        return ExitCode::SUCCESS;
    }
    let mut failed = 0;
    for peer in &detected.peers {
        println!("{} {} on {}", peer.name(), peer.version(), peer.addr());
        match contend(peer, &options).await {
            Ok(report) => println!("  contended:   {report}"),
            Err(e) => {
                failed += 1;
                println!("  contended:   FAILED: {e}");
            }
        }
        match uncontended(peer, options.cycles).await {
            Ok(report) => println!("  uncontended: {report}"),
            Err(e) => {
                failed += 1;
                println!("  uncontended: FAILED: {e}");
            }
        }
    }
    println!(
        "peers_smoke: {} checked, {} failed, {} skipped",
        detected.peers.len(),
        failed,
        detected.skipped.len()
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// A lock name no earlier run has used, so that nothing left behind by a
/// crashed run can be in its queue.
fn fresh_name(what: &str) -> String {
    format!(
        "smoke-{what}-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    )
}

/// `tasks` clients take one lock `rounds` times each; fails if two ever
/// held it at once or any acquire or release did not complete.
async fn contend(peer: &Peer, options: &Options) -> Result<String, String> {
    let name = Arc::new(fresh_name("contend"));
    let mut clients = Vec::with_capacity(options.tasks);
    for _ in 0..options.tasks {
        clients.push(peer.client().await?);
    }
    let holders = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, mut client) in clients.into_iter().enumerate() {
        let (name, holders, overlaps) = (name.clone(), holders.clone(), overlaps.clone());
        let rounds = options.rounds;
        tasks.spawn(async move {
            let mut done = 0;
            let mut longest_wait = Duration::ZERO;
            let mut outcome = Ok(());
            for _ in 0..rounds {
                let asked = Instant::now();
                if let Err(e) = client.acquire(&name).await {
                    outcome = Err(format!("task {index}: {e}"));
                    break;
                }
                longest_wait = longest_wait.max(asked.elapsed());
                if holders.fetch_add(1, Ordering::SeqCst) != 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(HOLD).await;
                holders.fetch_sub(1, Ordering::SeqCst);
                if let Err(e) = client.release(&name).await {
                    outcome = Err(format!("task {index}: {e}"));
                    break;
                }
                done += 1;
            }
            client.close().await;
            outcome.map(|()| (done, longest_wait))
        });
    }
    let mut completed = 0;
    let mut longest_wait = Duration::ZERO;
    let mut errors = Vec::new();
    let joined = tokio::time::timeout(CHECK_TIMEOUT, async {
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok((done, wait))) => {
                    completed += done;
                    longest_wait = longest_wait.max(wait);
                }
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(format!("a task panicked: {e}")),
            }
        }
    })
    .await;
    if joined.is_err() {
        errors.push(format!("not finished within {CHECK_TIMEOUT:?}"));
    }
    let elapsed = started.elapsed();
    let expected = options.tasks * options.rounds;
    let overlaps = overlaps.load(Ordering::SeqCst);
    if overlaps > 0 {
        errors.push(format!(
            "two clients held the lock at once {overlaps} times"
        ));
    }
    if errors.is_empty() && completed != expected {
        errors.push(format!(
            "{completed} of {expected} acquire/release pairs completed"
        ));
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    Ok(format!(
        "ok: {completed} acquires by {} clients, never two holders; {:.2} s in all, longest wait {:.0} ms",
        options.tasks,
        elapsed.as_secs_f64(),
        longest_wait.as_secs_f64() * 1e3
    ))
}

/// One client, acquire then release of a lock nobody else takes, `cycles`
/// times after a tenth as many unrecorded.
async fn uncontended(peer: &Peer, cycles: usize) -> Result<String, String> {
    if cycles == 0 {
        return Ok("not run (--cycles 0)".to_string());
    }
    let name = fresh_name("alone");
    let mut client = peer.client().await?;
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let warmup = cycles / 10;
    let mut recorded = Duration::ZERO;
    let mut outcome = Ok(());
    for i in 0..warmup + cycles {
        let started = Instant::now();
        if let Err(e) = client.acquire(&name).await {
            outcome = Err(e);
            break;
        }
        if let Err(e) = client.release(&name).await {
            outcome = Err(e);
            break;
        }
        let took = started.elapsed();
        if i >= warmup {
            recorded += took;
            histogram.saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        }
    }
    client.close().await;
    outcome?;
    let ms = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1e3;
    Ok(format!(
        "{cycles} acquire+release cycles: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, {:.0} cycles/s",
        ms(0.5),
        ms(0.99),
        histogram.max() as f64 / 1e3,
        cycles as f64 / recorded.as_secs_f64()
    ))
}

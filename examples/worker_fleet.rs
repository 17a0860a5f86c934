//! Workers share jobs under fair locks. One worker is killed (SIGKILL) in
//! the middle of a job; its lock is freed when its session expires, another
//! worker takes the job over, and every job completes exactly once.
//!
//! Run against a local server:
//!   cargo run --release -- serve              # in one terminal
//!   cargo run --example worker_fleet          # in another
//!
//! The example runs its workers as child processes of itself, so that the
//! one it kills dies the way a crashed process does: without closing its
//! session.

use std::process::{Child, Command};
use std::time::Duration;

use latchkey_client::recipes::Lock;
use latchkey_client::{Client, ClientError, ClientOptions, CreateOptions};

const WORKERS: usize = 3;
const JOBS: usize = 8;
/// The worker that crashes in its first job.
const DOOMED: usize = 2;
/// Short, so a crashed worker's locks come free quickly.
const SESSION_TIMEOUT: Duration = Duration::from_secs(1);

async fn connect() -> Result<Client, ClientError> {
    let server = std::env::var("LATCHKEY_SERVER").unwrap_or_else(|_| "127.0.0.1:7878".into());
    Client::connect(ClientOptions::new(server).session_timeout(SESSION_TIMEOUT)).await
}

/// One worker: takes each job's lock in turn and does the job unless it is
/// done already. The doomed worker announces its first job and hangs in it.
async fn worker(base: &str, me: usize) -> Result<(), ClientError> {
    let client = connect().await?;
    // Start together: say we are ready, then wait for the boss's go.
    client
        .create(
            &format!("{base}/ready/worker-{me}"),
            "",
            CreateOptions::ephemeral(),
        )
        .await?;
    loop {
        let (go, created) = client.exists_watch(&format!("{base}/go")).await?;
        if go.is_some() {
            break;
        }
        created.await?;
    }
    // Each worker starts at a different job, so the doomed one surely
    // starts a job before the others have done them all.
    let first = (me - 1) * JOBS / WORKERS;
    for job in (0..JOBS).map(|k| (k + first) % JOBS) {
        let lock = Lock::new(&client, format!("{base}/locks/job-{job}"))
            .data(format!("worker-{me}").as_str());
        let guard = lock.acquire().await?;
        let done = format!("{base}/done/job-{job}");
        if client.exists(&done).await?.is_none() {
            client
                .create(
                    &format!("{base}/started/job-{job}-by-worker-{me}"),
                    "",
                    CreateOptions::persistent(),
                )
                .await?;
            if me == DOOMED {
                println!("worker-{me}: working on job-{job}... (and about to be killed)");
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Under the lock, so no other worker can be doing this job.
            client
                .create(
                    &done,
                    format!("worker-{me}").as_str(),
                    CreateOptions::persistent(),
                )
                .await?;
            println!(
                "worker-{me}: did job-{job} (fencing token {})",
                guard.token()
            );
        }
        guard.release().await?;
    }
    client.close().await
}

fn spawn_worker(base: &str, me: usize) -> std::io::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["--worker", &me.to_string(), base])
        .spawn()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, me, base] = args.as_slice() {
        if flag == "--worker" {
            worker(base, me.parse()?).await?;
            return Ok(());
        }
    }

    let base = format!("/demo/fleet-{}", std::process::id());
    let boss = connect().await?;
    for dir in ["done", "started", "ready"] {
        boss.create(
            &format!("{base}/{dir}"),
            "",
            CreateOptions::persistent().make_parents(),
        )
        .await?;
    }
    let mut workers = Vec::new();
    for me in 1..=WORKERS {
        workers.push(spawn_worker(&base, me)?);
    }
    loop {
        let (ready, _, more) = boss.children_watch(&format!("{base}/ready")).await?;
        if ready.len() == WORKERS {
            break;
        }
        more.await?;
    }
    boss.create(&format!("{base}/go"), "", CreateOptions::persistent())
        .await?;

    // Kill the doomed worker as soon as it has started a job.
    let started = format!("{base}/started");
    loop {
        let (children, _, changed) = boss.children_watch(&started).await?;
        if let Some(job) = children
            .iter()
            .find(|c| c.ends_with(&format!("-by-worker-{DOOMED}")))
        {
            println!("killing worker-{DOOMED} in the middle of {job}");
            workers[DOOMED - 1].kill()?;
            break;
        }
        changed.await?;
    }
    for (i, worker) in workers.iter_mut().enumerate() {
        let status = worker.wait()?;
        if i + 1 != DOOMED && !status.success() {
            return Err(format!("worker-{} failed: {status}", i + 1).into());
        }
    }

    // Every job done once: one done marker each (a second create of the
    // same marker would have failed the worker).
    let (done, _) = boss.children(&format!("{base}/done")).await?;
    println!("done: {} of {JOBS} jobs", done.len());
    assert_eq!(done.len(), JOBS);
    let (started, _) = boss.children(&started).await?;
    let taken_over = started
        .iter()
        .filter(|s| !s.ends_with(&format!("-by-worker-{DOOMED}")))
        .count();
    println!(
        "{} job starts, one of them by the killed worker; {taken_over} completed by the others",
        started.len()
    );
    boss.close().await?;
    Ok(())
}

//! Replicas elect a leader that runs a periodic job (the nightly billing,
//! every half second here). The leader is killed (SIGKILL); another replica
//! takes over within the session timeout plus the lock-delay, and the job
//! goes on, never run by two leaders at once.
//!
//! Run against a local server:
//!   cargo run --release -- serve              # in one terminal
//!   cargo run --example leader_jobs           # in another
//!
//! The replicas are child processes of this example, so the killed leader
//! dies the way a crashed process does.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use latchkey_client::recipes::Election;
use latchkey_client::{Client, ClientError, ClientOptions, CreateOptions};

const REPLICAS: usize = 3;
const RUNS_PER_LEADER: usize = 3;
const EVERY: Duration = Duration::from_millis(500);
const SESSION_TIMEOUT: Duration = Duration::from_secs(1);

async fn connect() -> Result<Client, ClientError> {
    let server = std::env::var("LATCHKEY_SERVER").unwrap_or_else(|_| "127.0.0.1:7878".into());
    Client::connect(ClientOptions::new(server).session_timeout(SESSION_TIMEOUT)).await
}

/// One replica: campaign, then run the job every `EVERY` while leading.
async fn replica(base: &str, me: usize) -> Result<(), ClientError> {
    let client = connect().await?;
    let id = format!("replica-{me}");
    let leadership = Election::new(&client, format!("{base}/election"), id.as_str())
        .campaign()
        .await?;
    let token = leadership.token();
    let mut ticks = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            reason = leadership.lost() => {
                println!("{id}: lost the leadership ({reason}); stopping the job");
                return Ok(());
            }
            _ = ticks.tick() => {
                // The fencing token goes with every run, so a run by a
                // deposed leader can be told from a current one.
                client
                    .create(
                        &format!("{base}/runs/run-"),
                        format!("{id} token {token}").as_str(),
                        CreateOptions::persistent().sequential(),
                    )
                    .await?;
            }
        }
    }
}

fn spawn_replica(base: &str, me: usize) -> std::io::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["--replica", &me.to_string(), base])
        .spawn()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, me, base] = args.as_slice() {
        if flag == "--replica" {
            replica(base, me.parse()?).await?;
            return Ok(());
        }
    }

    let base = format!("/demo/leader-{}", std::process::id());
    let observer = connect().await?;
    observer
        .create(
            &format!("{base}/runs"),
            "",
            CreateOptions::persistent().make_parents(),
        )
        .await?;
    let mut replicas = Vec::new();
    for me in 1..=REPLICAS {
        replicas.push(spawn_replica(&base, me)?);
    }

    let election = format!("{base}/election");
    let mut leaders = Election::observe(&observer, &election);
    let mut killed_at = None;
    let mut seen = 0;
    while seen < 2 {
        let Some(leader) = leaders.changed().await? else {
            continue;
        };
        seen += 1;
        match killed_at {
            None => println!("leader: {}", leader.id),
            Some(at) => println!(
                "new leader: {} after {:?} (session timeout {SESSION_TIMEOUT:?})",
                leader.id,
                Instant::now().duration_since(at)
            ),
        }
        // Let this leader run the job a few times.
        loop {
            let (runs, _, more) = observer.children_watch(&format!("{base}/runs")).await?;
            if runs.len() >= seen * RUNS_PER_LEADER {
                break;
            }
            more.await?;
        }
        if killed_at.is_none() {
            let index: usize = leader.id.trim_start_matches("replica-").parse()?;
            println!("killing {} (SIGKILL)", leader.id);
            replicas[index - 1].kill()?;
            killed_at = Some(Instant::now());
        }
    }

    let (runs, _) = observer.children(&format!("{base}/runs")).await?;
    for run in &runs {
        let (data, _) = observer.get(&format!("{base}/runs/{run}")).await?;
        println!("{run}: {}", String::from_utf8_lossy(&data));
    }
    for replica in &mut replicas {
        let _ = replica.kill();
        let _ = replica.wait();
    }
    observer.close().await?;
    Ok(())
}

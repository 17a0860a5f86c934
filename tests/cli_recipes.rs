//! The recipe commands as a user runs them: `latchkey lock`, `elect`,
//! `hold`, `release`, `extend` and `status`, as child processes against a
//! server in this process (behind a proxy where a test cuts them off).

mod common;

use std::path::Path;
use std::process::Stdio;

use common::{connect, start_server, within, Proxy};
use latchkey_client::recipes::Lock;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_latchkey");

fn latchkey(server: &str) -> Command {
    let mut command = Command::new(BIN);
    command.env("LATCHKEY_SERVER", server).kill_on_drop(true);
    command
}

async fn run(server: &str, args: &[&str]) -> std::process::Output {
    within(
        &format!("latchkey {args:?}"),
        latchkey(server).args(args).output(),
    )
    .await
    .expect("run latchkey")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Starts `latchkey ARGS` whose command prints its pid first; returns the
/// latchkey process and the command's pid.
async fn spawn_supervised(server: &str, args: &[&str]) -> (tokio::process::Child, u32) {
    let mut child = latchkey(server)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn latchkey");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let pid = within("the command to start", lines.next_line())
        .await
        .unwrap()
        .expect("a pid line")
        .trim()
        .parse()
        .expect("a pid");
    (child, pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_runs_the_command_with_its_token_and_passes_its_status() {
    let server = start_server().await;
    let addr = server.addr().to_string();
    let out = run(
        &addr,
        &[
            "lock",
            "job",
            "--",
            "sh",
            "-c",
            "echo $LATCHKEY_FENCING_TOKEN",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token: u64 = text(&out.stdout)
        .trim()
        .parse()
        .expect("the token is a number");
    assert!(token > 0);

    let out = run(&addr, &["lock", "job", "--", "sh", "-c", "exit 7"]).await;
    assert_eq!(
        out.status.code(),
        Some(7),
        "the command's status passes through"
    );

    // Released after each run: the lock is free again.
    let client = connect(server.addr()).await;
    let guard = within(
        "a free lock",
        Lock::new(&client, "/locks/job").try_acquire(),
    )
    .await
    .unwrap()
    .expect("the lock was released");
    assert!(guard.token().0 > token, "tokens increase across holders");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_with_a_timeout_gives_up_without_running_the_command() {
    let server = start_server().await;
    let addr = server.addr().to_string();
    let client = connect(server.addr()).await;
    let _held = Lock::new(&client, "/locks/busy").acquire().await.unwrap();
    let marker = std::env::temp_dir().join(format!("latchkey-ran-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let touch = format!("touch {}", marker.display());
    let out = run(
        &addr,
        &[
            "lock",
            "busy",
            "--timeout",
            "300ms",
            "--",
            "sh",
            "-c",
            &touch,
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("not acquired within 300ms"));
    assert!(!marker.exists(), "the command must not run");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lock_kills_the_command_before_anyone_else_holds_it() {
    let server = start_server().await;
    let proxy = Proxy::start(server.addr()).await;
    let (mut holder, pid) = spawn_supervised(
        &proxy.addr().to_string(),
        &[
            "lock",
            "critical",
            "--session-timeout",
            "1s",
            "--kill-grace",
            "300ms",
            "--",
            "sh",
            "-c",
            // Report our pid, then stay busy far longer than the test.
            "echo $$; exec sleep 60",
        ],
    )
    .await;
    assert!(alive(pid));

    // Queue a waiter, then cut the holder off from the server.
    let waiter = connect(server.addr()).await;
    let waiting = tokio::spawn(async move {
        let guard = Lock::new(&waiter, "/locks/critical").acquire().await;
        // The very moment the lock is ours: the old command must be dead.
        let was_alive = alive(pid);
        (guard, was_alive)
    });
    proxy.partition(true);

    let (guard, was_alive) = within("the waiter to get the lock", waiting).await.unwrap();
    let _guard = guard.expect("the waiter acquires after the holder's session expires");
    assert!(!was_alive, "the command ran on while another held the lock");

    let status = within("latchkey to exit", holder.wait()).await.unwrap();
    assert_eq!(status.code(), Some(4));
    let mut stderr = String::new();
    if let Some(mut pipe) = holder.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = pipe.read_to_string(&mut stderr).await;
    }
    assert!(
        stderr.contains("lost the lock on /locks/critical"),
        "{stderr}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elect_runs_the_command_while_leading() {
    let server = start_server().await;
    let addr = server.addr().to_string();
    let out = run(
        &addr,
        &[
            "elect",
            "billing",
            "--id",
            "replica-a",
            "--",
            "sh",
            "-c",
            "echo leading $LATCHKEY_FENCING_TOKEN",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("leading "));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_release_and_extend_work_with_the_token_only() {
    let server = start_server().await;
    let addr = server.addr().to_string();
    let out = run(&addr, &["hold", "seat-12A", "--ttl", "10m", "buyer-7"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_string();
    assert!(token.parse::<u64>().is_ok(), "{token}");

    let out = run(&addr, &["hold", "seat-12A", "--ttl", "10m", "buyer-8"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("held until"),
        "{}",
        text(&out.stderr)
    );

    let out = run(&addr, &["extend", "seat-12A", "12345", "--ttl", "20m"]).await;
    assert!(!out.status.success(), "a wrong token must not extend");
    let out = run(&addr, &["extend", "seat-12A", &token, "--ttl", "20m"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&addr, &["release", "seat-12A", "12345"]).await;
    assert!(!out.status.success(), "a wrong token must not release");
    let out = run(&addr, &["release", "seat-12A", &token]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&addr, &["hold", "seat-12A", "--ttl", "1m"]).await;
    assert!(out.status.success(), "free again after release");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_holder_and_the_waiters_in_order() {
    let server = start_server().await;
    let addr = server.addr().to_string();
    let clients = [
        connect(server.addr()).await,
        connect(server.addr()).await,
        connect(server.addr()).await,
    ];
    let holder = Lock::new(&clients[0], "/locks/report")
        .data("holder-0")
        .acquire()
        .await
        .unwrap();
    let mut waiting = Vec::new();
    for (i, client) in clients.iter().enumerate().skip(1) {
        // Queue the waiters in a known order: each joins the queue (a
        // child appears) before the next starts.
        let (_, _, joined) = clients[0].children_watch("/locks/report").await.unwrap();
        let lock = Lock::new(client, "/locks/report").data(format!("waiter-{i}").as_str());
        waiting.push(tokio::spawn(async move {
            lock.acquire().await.map(|g| g.token())
        }));
        within("the waiter to queue", joined).await.unwrap();
    }
    let out = run(&addr, &["status", "/locks", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let entry: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(entry["path"], "/locks/report");
    let holders = entry["holders"].as_array().unwrap();
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0]["held_by"], "holder-0");
    assert_eq!(holders[0]["token"], holder.token().0);
    let waiters: Vec<&str> = entry["waiters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["waiting"].as_str().unwrap())
        .collect();
    assert_eq!(waiters, ["waiter-1", "waiter-2"]);

    let human = text(&run(&addr, &["status"]).await.stdout);
    assert!(human.contains("holder  lock-"), "{human}");
    assert!(human.contains("#1"), "{human}");
    holder.release().await.unwrap();
    for w in waiting {
        within("waiters to get their turn", async {
            let guard_token = w.await.unwrap();
            assert!(guard_token.is_ok());
        })
        .await;
    }
    server.stop().await;
}

/// Postmortem: `elect` did not ask for a lock-delay covering its kill grace,
/// so with a grace above the server's default delay, a command that ignores
/// SIGTERM ran on while the next leader led.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_leadership_kills_the_command_before_the_next_leader_leads() {
    let server = start_server().await;
    let proxy = Proxy::start(server.addr()).await;
    let (mut leader, pid) = spawn_supervised(
        &proxy.addr().to_string(),
        &[
            "elect",
            "critical",
            "--id",
            "a",
            "--session-timeout",
            "1s",
            // Longer than the server's default lock-delay (500 ms), and the
            // command ignores SIGTERM: only SIGKILL, after the grace, ends it.
            "--kill-grace",
            "1500ms",
            "--",
            "sh",
            "-c",
            "trap '' TERM; echo $$; exec sleep 60",
        ],
    )
    .await;

    let follower = connect(server.addr()).await;
    let campaigning = tokio::spawn(async move {
        let leadership =
            latchkey_client::recipes::Election::new(&follower, "/elections/critical", "b")
                .campaign()
                .await;
        (leadership, alive(pid))
    });
    proxy.partition(true);
    let (leadership, was_alive) = within("the follower to lead", campaigning).await.unwrap();
    let _leadership = leadership.expect("the follower leads after the leader's session ends");
    assert!(
        !was_alive,
        "the old leader's command ran on under the new leader"
    );
    let status = within("latchkey to exit", leader.wait()).await.unwrap();
    assert_eq!(status.code(), Some(4));
    server.stop().await;
}

/// `latchkey delete` of another session's lock node is refused and says
/// how to force it; `--force` takes the lock as the holder's session end
/// would, so a command that ignores SIGTERM is SIGKILLed within its
/// lock-delay, before the next waiter is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_delete_kills_the_command_before_the_next_holder_is_granted() {
    let server = start_server().await;
    let addr = server.addr().to_string();
    let (mut holder, pid) = spawn_supervised(
        &addr,
        &[
            "lock",
            "forced",
            // Longer than the server's default lock-delay: the lock asks a
            // delay that covers it.
            "--kill-grace",
            "1500ms",
            "--",
            "sh",
            "-c",
            "trap '' TERM; echo $$; exec sleep 60",
        ],
    )
    .await;
    let client = connect(server.addr()).await;
    let (children, _) = client.children("/locks/forced").await.unwrap();
    let node = format!("/locks/forced/{}", children[0]);
    let waiter = connect(server.addr()).await;
    let waiting = tokio::spawn(async move {
        let guard = Lock::new(&waiter, "/locks/forced").acquire().await;
        (guard, alive(pid))
    });
    common::wait_for_children(&client, "/locks/forced", 2).await;

    let out = run(&addr, &["delete", &node]).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("lock node of session") && stderr.contains("latchkey delete --force"),
        "{stderr}"
    );
    assert!(alive(pid), "a refused delete takes nothing");

    let out = run(&addr, &["delete", "--force", &node]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("taken from its holder"),
        "{}",
        text(&out.stderr)
    );
    let (guard, was_alive) = within("the waiter to get the lock", waiting).await.unwrap();
    let _guard = guard.expect("the waiter is granted after the lock-delay");
    assert!(!was_alive, "the command ran on while another held the lock");
    let status = within("latchkey to exit", holder.wait()).await.unwrap();
    assert_eq!(status.code(), Some(4));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_is_set_only_with_its_token_and_ended_without_one_only_by_force() {
    let server = start_server().await;
    let addr = server.addr().to_string();
    let out = run(&addr, &["hold", "seat-9", "--ttl", "10m", "buyer-1"]).await;
    let token = text(&out.stdout).trim().to_string();
    for args in [
        &["set", "/holds/seat-9", "buyer-2"][..],
        &["delete", "/holds/seat-9"][..],
    ] {
        let out = run(&addr, args).await;
        assert!(!out.status.success(), "{args:?} without the token");
        assert!(
            text(&out.stderr).contains("timed hold"),
            "{}",
            text(&out.stderr)
        );
    }
    let out = run(
        &addr,
        &["set", "/holds/seat-9", "buyer-1 paid", "--token", &token],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&addr, &["hold", "seat-10", "--ttl", "30days"]).await;
    assert!(!out.status.success(), "over the 7-day ceiling");
    assert!(
        text(&out.stderr).contains("the limit is 604800000 ms"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&addr, &["delete", "--force", "/holds/seat-9"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&addr, &["hold", "seat-9", "--ttl", "1m"]).await;
    assert!(out.status.success(), "free again: {}", text(&out.stderr));
    server.stop().await;
}

/// Postmortem: Ctrl-C killed a waiting `latchkey lock` with its place
/// still queued, so everyone behind it waited out its session timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_waiter_leaves_the_queue_at_once() {
    let server = start_server().await;
    let addr = server.addr().to_string();
    let client = connect(server.addr()).await;
    let _held = Lock::new(&client, "/locks/busy").acquire().await.unwrap();
    let (_, _, joined) = client.children_watch("/locks/busy").await.unwrap();
    let mut waiter = latchkey(&addr)
        .args(["lock", "busy", "--quiet", "--", "true"])
        .spawn()
        .expect("spawn latchkey lock");
    within("the waiter to queue", joined).await.unwrap();
    let pid = waiter
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .expect("a pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("send SIGINT");
    let status = within("the waiter to exit", waiter.wait()).await.unwrap();
    assert_eq!(status.code(), Some(130));
    // Its session was closed on the way out: its node is gone already.
    let (queue, _) = client.children("/locks/busy").await.unwrap();
    assert_eq!(queue.len(), 1, "only the holder is left: {queue:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_be_found_exits_127() {
    let server = start_server().await;
    let out = run(
        &server.addr().to_string(),
        &["lock", "x", "--", "/no/such/command"],
    )
    .await;
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("cannot run /no/such/command"));
    server.stop().await;
}

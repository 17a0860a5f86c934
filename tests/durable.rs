//! A durable server (`latchkey serve --data DIR`) killed with SIGKILL and
//! restarted from its folder, as real processes on loopback: what it
//! acknowledged is there after the restart, sessions resume and keep their
//! locks, holds keep their deadlines, and tokens keep rising.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{connect_with, within};
use latchkey_client::protocol::ErrorCode;
use latchkey_client::{Client, ClientError, ClientOptions, CreateOptions, Hold, Lock, LockState};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

const BIN: &str = env!("CARGO_BIN_EXE_latchkey");

/// A `latchkey serve --data` process.
struct Durable {
    child: Child,
    port: u16,
}

impl Durable {
    /// Starts a server on `folder`, on `port` (0: any free port), and waits
    /// until it listens. A port a killed server just held is retried until
    /// the kernel lets it go.
    async fn start(folder: &Path, port: u16) -> Durable {
        Durable::start_with(folder, port, &[]).await
    }

    /// As `start`, with more arguments for `serve`.
    async fn start_with(folder: &Path, port: u16, args: &[&str]) -> Durable {
        Durable::start_under(folder, port, args, None).await
    }

    /// As `start_with`; with `file_blocks`, the server can write no file
    /// past that many 512-byte blocks (`ulimit -f`, SIGXFSZ ignored, so a
    /// write past it fails with EFBIG, as a full disk fails with ENOSPC).
    async fn start_under(
        folder: &Path,
        port: u16,
        args: &[&str],
        file_blocks: Option<u64>,
    ) -> Durable {
        within("the server to start", async {
            loop {
                let mut command = match file_blocks {
                    None => tokio::process::Command::new(BIN),
                    Some(blocks) => {
                        let mut sh = tokio::process::Command::new("sh");
                        sh.args(["-c", "trap '' XFSZ; ulimit -f \"$0\" && exec \"$@\""])
                            .arg(blocks.to_string())
                            .arg(BIN);
                        sh
                    }
                };
                let mut child = command
                    .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
                    .arg(folder)
                    .args([
                        "--session-timeout-min",
                        "200ms",
                        "--check-invariants",
                        "true",
                    ])
                    .args(args)
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("spawn latchkey serve");
                let stdout = child.stdout.take().expect("piped stdout");
                let mut lines = BufReader::new(stdout).lines();
                match lines.next_line().await.expect("read stdout") {
                    Some(line) => {
                        let port = line
                            .rsplit(':')
                            .next()
                            .and_then(|p| p.trim().parse().ok())
                            .unwrap_or_else(|| panic!("a listening line, not {line:?}"));
                        return Durable { child, port };
                    }
                    None => {
                        let out = child.wait_with_output().await.expect("the failed server");
                        let stderr = String::from_utf8_lossy(&out.stderr);
                        assert!(
                            stderr.contains("cannot listen"),
                            "the server did not start: {stderr}"
                        );
                        tokio::task::yield_now().await;
                    }
                }
            }
        })
        .await
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and wait until the process is gone.
    async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL");
        within("the killed server to exit", self.child.wait())
            .await
            .expect("wait for the server");
    }
}

/// A fresh folder under the temporary folder, removed when dropped.
struct Folder(PathBuf);

impl Folder {
    fn new(name: &str) -> Folder {
        Folder(common::temp_dir(&format!("durable-{name}")).join("data"))
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

async fn client(addr: &str) -> Client {
    connect_with(
        ClientOptions::new(addr)
            .session_timeout(Duration::from_secs(20))
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200)),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_sessions_locks_holds_and_nodes() {
    let folder = Folder::new("keeps");
    let server = Durable::start(&folder.0, 0).await;
    let port = server.port;
    let holder = client(&server.addr()).await;
    let session = holder.session_id();
    let guard = within("the lock", Lock::new(&holder, "/jobs/nightly").acquire())
        .await
        .expect("acquired");
    let ephemeral = holder
        .create(
            "/workers/w",
            "me",
            CreateOptions::ephemeral().make_parents(),
        )
        .await
        .expect("an ephemeral");
    let hold = Hold::take(&holder, "/tickets/abc", Duration::from_secs(600), "buyer-1")
        .await
        .expect("a 10-minute hold");
    let (_, held_stat) = holder.get("/tickets/abc").await.expect("the hold");

    server.kill().await;
    let server = Durable::start(&folder.0, port).await;

    // The holder's client resumes its session on the restarted server.
    within("the holder to resume", async {
        loop {
            match holder.exists("/workers/w").await {
                Ok(stat) => break stat,
                Err(ClientError::ConnectionLost) => tokio::task::yield_now().await,
                Err(e) => panic!("after the restart: {e}"),
            }
        }
    })
    .await
    .expect("the ephemeral outlived the restart");
    assert_eq!(holder.session_id(), session);
    assert!(
        matches!(guard.state(), LockState::Granted { token } if token == guard.token()),
        "the lock was lost across the restart: {:?}",
        guard.state()
    );
    assert!(!guard.is_lost());
    let (data, stat) = holder.get(&ephemeral.path).await.expect("the ephemeral");
    assert_eq!(data, b"me");
    assert_eq!(stat.ephemeral_owner, Some(session));

    // The hold kept its token and its deadline; a second buyer is refused.
    let buyer = client(&server.addr()).await;
    let (data, stat) = buyer.get("/tickets/abc").await.expect("the hold");
    assert_eq!(data, b"buyer-1");
    assert_eq!(stat.czxid, hold.0);
    assert_eq!(stat.ttl_ms, held_stat.ttl_ms);
    assert_eq!(stat.mtime_ms, held_stat.mtime_ms);
    let taken = Hold::take(&buyer, "/tickets/abc", Duration::from_secs(600), "buyer-2").await;
    assert!(matches!(taken, Err(ClientError::Held { .. })), "{taken:?}");

    // The lock is still the holder's: another waits until it is released,
    // then gets a higher token.
    let waiter = Lock::new(&buyer, "/jobs/nightly");
    assert!(waiter.try_acquire().await.expect("try").is_none());
    let first_token = guard.token();
    guard.release().await.expect("released");
    let next = within("the next holder", waiter.acquire())
        .await
        .expect("acquired");
    assert!(next.token() > first_token);
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kills_under_load_lose_nothing_acknowledged() {
    let folder = Folder::new("kills");
    // Snapshots every few entries, so that kills land before, during and
    // after snapshot writes and the purges behind them.
    let snapshots = ["--snapshot-every", "25"];
    let mut server = Durable::start_with(&folder.0, 0, &snapshots).await;
    let port = server.port;
    let addr = server.addr();
    let worker = client(&addr).await;
    let session = worker.session_id();
    let hold = Hold::take(&worker, "/tickets/t", Duration::from_secs(600), "held")
        .await
        .expect("a hold");
    let (_, hold_stat) = worker.get("/tickets/t").await.expect("the hold");
    // The highest value of /counter acknowledged, and of any token.
    let acknowledged = Arc::new(AtomicU64::new(0));
    let highest_token = Arc::new(AtomicU64::new(0));
    let cycles = Arc::new(AtomicU64::new(0));
    worker
        .create("/counter", "0", CreateOptions::persistent())
        .await
        .expect("the counter");
    let load = {
        let (worker, acknowledged, highest_token, cycles) = (
            worker.clone(),
            acknowledged.clone(),
            highest_token.clone(),
            cycles.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                n += 1;
                // A write is acknowledged only if its reply came.
                if worker
                    .set("/counter", n.to_string().into_bytes(), None)
                    .await
                    .is_ok()
                {
                    acknowledged.fetch_max(n, Ordering::SeqCst);
                }
                if let Ok(guard) = Lock::new(&worker, "/jobs/cycle").acquire().await {
                    let token = guard.token().0;
                    let before = highest_token.fetch_max(token, Ordering::SeqCst);
                    assert!(token > before, "token {token} after {before}");
                    if guard.release().await.is_ok() {
                        cycles.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
    };
    for round in 0..20u64 {
        // Let the load run for a while, then kill at a moment the load
        // does not choose.
        let acked = acknowledged.load(Ordering::SeqCst);
        within("the load to make progress", async {
            while acknowledged.load(Ordering::SeqCst) < acked + 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let pause = rand::random::<u64>() % 40;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        server.kill().await;
        let acked = acknowledged.load(Ordering::SeqCst);
        server = Durable::start_with(&folder.0, port, &snapshots).await;
        let reader = client(&server.addr()).await;
        let (data, _) = reader.get("/counter").await.expect("the counter");
        let stored: u64 = String::from_utf8(data)
            .expect("text")
            .parse()
            .expect("a number");
        assert!(
            stored >= acked,
            "round {round}: /counter is {stored} but {acked} was acknowledged"
        );
        let (_, stat) = reader.get("/tickets/t").await.expect("the hold lives on");
        assert_eq!(stat.czxid, hold.0);
        assert_eq!(
            stat.mtime_ms, hold_stat.mtime_ms,
            "the hold's deadline moved"
        );
        reader.close().await.expect("closed");
    }
    // The worker's session lived through all of it.
    within("the worker to go on", async {
        let acked = acknowledged.load(Ordering::SeqCst);
        while acknowledged.load(Ordering::SeqCst) < acked + 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(worker.session_id(), session);
    assert!(
        !load.is_finished(),
        "the load stopped (a token fell?): {:?}",
        load.await
    );
    assert!(
        cycles.load(Ordering::SeqCst) >= 20,
        "too few lock cycles ran"
    );
    load.abort();
    server.kill().await;
    assert!(
        folder.0.join("snapshot").exists(),
        "no snapshot was written"
    );
}

/// The log's segment files in `folder`, oldest first.
fn wal_files(folder: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder.join("log"))
        .expect("the log folder")
        .map(|entry| entry.expect("an entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "wal"))
        .collect();
    files.sort();
    files
}

/// Runs `latchkey serve` on `folder`, expecting it to refuse; returns its
/// stderr.
async fn refused_start(folder: &Path) -> String {
    let out = tokio::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(folder)
        .output();
    let out = within("serve to refuse the folder", out)
        .await
        .expect("run latchkey serve");
    assert!(!out.status.success(), "the server started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_write_is_cut_off_and_the_rest_is_kept() {
    let folder = Folder::new("torn");
    let server = Durable::start(&folder.0, 0).await;
    let writer = client(&server.addr()).await;
    writer
        .create("/kept", "yes", CreateOptions::persistent())
        .await
        .expect("created");
    writer
        .create("/last", "maybe", CreateOptions::persistent())
        .await
        .expect("created");
    server.kill().await;
    // As if the process died inside its last append: the file ends in the
    // middle of a record.
    let last = wal_files(&folder.0).pop().expect("a segment");
    let bytes = std::fs::read(&last).expect("read the segment");
    std::fs::write(&last, &bytes[..bytes.len() - 7]).expect("tear the segment");
    let server = Durable::start(&folder.0, 0).await;
    let reader = client(&server.addr()).await;
    let (data, _) = reader.get("/kept").await.expect("kept");
    assert_eq!(data, b"yes");
    reader
        .create("/after", "", CreateOptions::persistent())
        .await
        .expect("the server writes on");
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_or_a_newer_format_refuses_to_start_with_what_to_do() {
    let folder = Folder::new("damaged");
    let server = Durable::start(&folder.0, 0).await;
    let writer = client(&server.addr()).await;
    for i in 0..20 {
        writer
            .create(&format!("/n{i}"), "x", CreateOptions::persistent())
            .await
            .expect("created");
    }
    server.kill().await;
    let segment = wal_files(&folder.0).remove(0);
    let mut bytes = std::fs::read(&segment).expect("read the segment");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&segment, &bytes).expect("damage the segment");
    let stderr = refused_start(&folder.0).await;
    assert!(
        stderr.contains("cannot open the log in") && stderr.contains("restore it from a backup"),
        "{stderr}"
    );

    let newer = Folder::new("newer");
    Durable::start(&newer.0, 0).await.kill().await;
    std::fs::write(
        newer.0.join("format.json"),
        br#"{"format":99,"zxid_start":1}"#,
    )
    .expect("a newer format");
    let stderr = refused_start(&newer.0).await;
    assert!(
        stderr.contains("format 99") && stderr.contains("newer latchkey"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_a_snapshot_keeps_the_state_and_a_damaged_one_is_refused() {
    let folder = Folder::new("snapshot");
    let snapshots = ["--snapshot-every", "5"];
    let server = Durable::start_with(&folder.0, 0, &snapshots).await;
    let port = server.port;
    let writer = client(&server.addr()).await;
    for i in 0..30 {
        writer
            .create(
                &format!("/n{i}"),
                format!("{i}").as_str(),
                CreateOptions::persistent(),
            )
            .await
            .expect("created");
    }
    let session = writer.session_id();
    server.kill().await;
    let snapshot = folder.0.join("snapshot");
    assert!(snapshot.exists(), "no snapshot was written");

    let server = Durable::start_with(&folder.0, port, &snapshots).await;
    let reader = client(&server.addr()).await;
    for i in 0..30 {
        let (data, _) = reader.get(&format!("/n{i}")).await.expect("kept");
        assert_eq!(data, format!("{i}").into_bytes());
    }
    let (children, _) = reader.children("/").await.expect("listed");
    assert_eq!(children.len(), 30, "{children:?}");
    // The writer's session was in the snapshot: it resumes.
    writer
        .create("/after", "", CreateOptions::ephemeral())
        .await
        .expect("the writer writes on");
    assert_eq!(
        writer.session_id(),
        session,
        "the writer's session was lost"
    );
    server.kill().await;

    let good = std::fs::read(&snapshot).expect("read the snapshot");
    let mut bytes = good.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&snapshot, &bytes).expect("damage the snapshot");
    let stderr = refused_start(&folder.0).await;
    assert!(
        stderr.contains(&snapshot.display().to_string())
            && stderr.contains("restore the data folder from a backup"),
        "{stderr}"
    );
    // Without its snapshot, the purged log cannot be replayed: the start
    // says which file is missing.
    std::fs::remove_file(&snapshot).expect("remove the snapshot");
    let stderr = refused_start(&folder.0).await;
    assert!(
        stderr.contains(&snapshot.display().to_string()) && stderr.contains("is missing"),
        "{stderr}"
    );
    std::fs::write(&snapshot, &good).expect("put the snapshot back");
    Durable::start(&folder.0, 0).await.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_disk_refuses_writes_clearly_and_reads_go_on() {
    let folder = Folder::new("disk");
    // 64 blocks: the log's first segment fills after a few dozen writes.
    // (The log always reaches the limit before a snapshot of the same
    // nodes would, so a failing snapshot write is not what this tries.)
    let server = Durable::start_under(&folder.0, 0, &[], Some(64)).await;
    let port = server.port;
    let writer = client(&server.addr()).await;
    let short =
        connect_with(ClientOptions::new(server.addr()).session_timeout(Duration::from_millis(600)))
            .await;
    let value = "x".repeat(600);
    let mut acknowledged = Vec::new();
    let failed = within("a write to fail", async {
        for i in 0.. {
            let path = format!("/n{i}");
            match writer
                .create(&path, value.as_str(), CreateOptions::persistent())
                .await
            {
                Ok(_) => acknowledged.push(path),
                Err(e) => return e,
            }
        }
        unreachable!()
    })
    .await;
    assert_eq!(failed.code(), Some(ErrorCode::Unavailable), "{failed}");
    let message = failed.to_string();
    assert!(
        message.contains("cannot make writes durable")
            && message.contains("File too large")
            && message.contains("may not have been applied")
            && message.contains("restart the server"),
        "{message}"
    );
    assert!(!acknowledged.is_empty(), "no write fit under the limit");
    // Reads go on for the sessions already there; writes are refused
    // before they reach the log.
    let (data, _) = writer.get(&acknowledged[0]).await.expect("a read");
    assert_eq!(data, value.as_bytes());
    let refused = writer
        .create("/after", "", CreateOptions::persistent())
        .await
        .expect_err("a write after the failure");
    assert_eq!(refused.code(), Some(ErrorCode::Unavailable), "{refused}");
    // No tick can expire a session now: one with a short timeout reads on
    // well past it (its heartbeats are reads, answered without the log).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (data, _) = short
        .get(&acknowledged[0])
        .await
        .expect("a read past a timeout");
    assert_eq!(data, value.as_bytes());
    // A new session is a write too: refused, with why.
    let opened = Client::connect(ClientOptions::new(server.addr())).await;
    let Err(opened) = opened else {
        panic!("a session opened on a server that cannot write");
    };
    assert!(
        opened.to_string().contains("opens and resumes no session"),
        "{opened}"
    );
    server.kill().await;

    // The operator fixes the disk and restarts: everything acknowledged is
    // there, and nothing refused is.
    let server = Durable::start(&folder.0, port).await;
    let reader = client(&server.addr()).await;
    for path in &acknowledged {
        reader.get(path).await.expect("an acknowledged write");
    }
    assert!(reader.exists("/after").await.expect("exists").is_none());
    reader
        .create("/after", "", CreateOptions::persistent())
        .await
        .expect("writes work again");
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_one_folder_is_refused() {
    let folder = Folder::new("shared");
    let server = Durable::start(&folder.0, 0).await;
    let stderr = refused_start(&folder.0).await;
    assert!(
        stderr.contains("in use by another latchkey server"),
        "{stderr}"
    );
    server.kill().await;
}

/// Over the bare protocol: a write, then at once a frame the server
/// refuses without the log and a read. The replies come in request order,
/// though the write's waits for the disk and the others' do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_keep_request_order_behind_a_write_in_the_log() {
    let folder = Folder::new("order");
    let server = Durable::start(&folder.0, 0).await;
    let addr: std::net::SocketAddr = server.addr().parse().expect("an address");
    let (mut raw, _) = common::Raw::session_welcome(addr).await;
    for round in 0..20u64 {
        let base = round * 3;
        raw.send_json(&serde_json::json!({
            "xid": base + 1,
            "op": {"create": {"path": format!("/n{round}"), "data": ""}}
        }))
        .await;
        raw.send_json(&serde_json::json!({"xid": base + 2, "op": {"no_such_op": {}}}))
            .await;
        raw.send_json(
            &serde_json::json!({"xid": base + 3, "op": {"exists": {"path": format!("/n{round}")}}}),
        )
        .await;
        for xid in base + 1..=base + 3 {
            match within("a reply", raw.recv()).await {
                Some(latchkey_client::protocol::ServerMessage::Reply(reply)) => {
                    assert_eq!(reply.xid.0, xid, "replies out of request order");
                    if xid == base + 3 {
                        let found = matches!(
                            reply.result,
                            Ok(latchkey_client::OpResult::Exists { stat: Some(_) })
                        );
                        assert!(found, "the read did not see the write before it: {reply:?}");
                    }
                }
                other => panic!("expected the reply to {xid}, got {other:?}"),
            }
        }
    }
    server.kill().await;
}

/// Settings changed across a restart apply from the restart on: the log is
/// replayed under the settings it was written with, so a lower node limit
/// loses none of the nodes created under the higher one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_other_settings_replays_under_the_old_ones() {
    let folder = Folder::new("settings");
    let server = Durable::start_with(&folder.0, 0, &["--nodes-max", "100"]).await;
    let writer = client(&server.addr()).await;
    for i in 0..40 {
        writer
            .create(&format!("/n{i}"), "", CreateOptions::persistent())
            .await
            .expect("created under the limit of 100");
    }
    server.kill().await;
    let server = Durable::start_with(&folder.0, 0, &["--nodes-max", "20"]).await;
    let reader = client(&server.addr()).await;
    for i in 0..40 {
        assert!(
            reader
                .exists(&format!("/n{i}"))
                .await
                .expect("exists")
                .is_some(),
            "/n{i} was lost in the replay under the new limit"
        );
    }
    let refused = reader
        .create("/over", "", CreateOptions::persistent())
        .await;
    assert!(
        matches!(refused, Err(ClientError::LimitExceeded { .. })),
        "the new limit does not apply: {refused:?}"
    );
    server.kill().await;
}

//! One log, replayed: a durable server in this process takes a workload
//! from real clients over loopback, with snapshots every few entries;
//! then its data folder is replayed, twice, into fresh coordinators (the
//! last snapshot restored, the entries after it applied at their stamped
//! times). Both replays and the server's own state must give the same
//! snapshot, byte for byte.

use std::path::Path;
use std::time::Duration;

use latchkey_client::protocol::Zxid;
use latchkey_client::{Client, ClientOptions, CreateOptions, Hold, Lock};
use openraft::storage::{RaftLogReader, RaftLogStorage};
use openraft::EntryPayload;
use tokio_util::sync::CancellationToken;

use super::raft::encoding::decode_command;
use super::raft::log_store::LogStore;
use super::raft::snapshot_file;
use super::{Config, Server};
use crate::state::Coordinator;

/// The state a data folder holds, rebuilt without a server: the snapshot
/// restored, then each committed entry after it applied.
async fn replay(folder: &Path, zxid_start: u64) -> Coordinator {
    let stored = snapshot_file::read(folder).expect("a readable snapshot");
    let (mut coordinator, from) = match stored {
        Some(stored) => (
            Coordinator::restore(&stored.state).expect("a snapshot that restores"),
            stored.meta.last_log_id.map_or(0, |id| id.index + 1),
        ),
        None => (
            Coordinator::new(crate::state::Config::default(), Zxid(zxid_start)),
            0,
        ),
    };
    // The stopped server's log tasks let go of the log's lock a moment
    // after `run` returns.
    let started = std::time::Instant::now();
    let mut log = loop {
        match LogStore::open(&folder.join("log")) {
            Ok(log) => break log,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "the log stays locked"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("the log does not open: {e}"),
        }
    };
    let committed = log
        .read_committed()
        .await
        .expect("the commit record reads")
        .expect("something was committed");
    let entries = log
        .get_log_reader()
        .await
        .try_get_log_entries(from..committed.index + 1)
        .await
        .expect("the entries after the snapshot read");
    assert_eq!(
        entries.first().map(|e| e.log_id.index),
        Some(from),
        "the log holds every entry after the snapshot"
    );
    for entry in entries {
        if let EntryPayload::Normal(encoded) = entry.payload {
            let stamped = decode_command(&encoded).expect("an entry that decodes");
            coordinator.apply(stamped.command, stamped.at_ms);
        }
    }
    coordinator
}

fn zxid_start_of(folder: &Path) -> u64 {
    let format: serde_json::Value = serde_json::from_slice(
        &std::fs::read(folder.join("format.json")).expect("the format file"),
    )
    .expect("JSON");
    format["zxid_start"].as_u64().expect("a zxid start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_log_replayed_twice_gives_the_servers_snapshot_byte_for_byte() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let folder = dir.path().join("data");
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("an address"),
        data: Some(folder.clone()),
        // Small, so that the replay starts from a snapshot taken while
        // the workload ran, with a purged log behind it.
        snapshot_every: 16,
        ..Config::default()
    };
    let server = Server::bind(config).await.expect("the server binds");
    let addr = server.local_addr().to_string();
    let shared = server.shared.clone();
    let stop = CancellationToken::new();
    let running = tokio::spawn(server.run(stop.clone()));

    let options = || ClientOptions::new(addr.as_str()).session_timeout(Duration::from_secs(10));
    let a = Client::connect(options()).await.expect("client a");
    let b = Client::connect(options()).await.expect("client b");
    let gone = Client::connect(options()).await.expect("client gone");
    a.create("/jobs", "", CreateOptions::persistent())
        .await
        .expect("create /jobs");
    for i in 0..40 {
        let path = format!("/jobs/{i}");
        a.create(
            &path,
            format!("job {i}").as_str(),
            CreateOptions::persistent(),
        )
        .await
        .expect("create a job");
        if i % 3 == 0 {
            b.set(&path, "taken", None).await.expect("set a job");
        }
        if i % 5 == 0 {
            a.delete(&path, None).await.expect("delete a job");
        }
    }
    gone.create("/mine", "", CreateOptions::ephemeral())
        .await
        .expect("an ephemeral");
    let hold = Hold::take(&b, "/tickets/abc", Duration::from_secs(600), "buyer 7")
        .await
        .expect("a 10-minute hold");
    let lock = Lock::new(&a, "/locks/nightly")
        .acquire()
        .await
        .expect("a lock");
    gone.close().await.expect("close a session");
    b.create("/jobs/seq-", "", CreateOptions::persistent().sequential())
        .await
        .expect("a sequential node");

    stop.cancel();
    assert!(running.await.expect("the server task"), "connections left");
    drop((a, b, hold, lock));
    let live = shared
        .core
        .lock()
        .coordinator
        .snapshot()
        .expect("the live state encodes");
    drop(shared);

    assert!(
        folder.join(snapshot_file::SNAPSHOT_FILE).exists(),
        "the workload made a snapshot"
    );
    let zxid_start = zxid_start_of(&folder);
    let first = replay(&folder, zxid_start).await;
    let second = replay(&folder, zxid_start).await;
    let first = first.snapshot().expect("encodes");
    assert_eq!(
        first,
        second.snapshot().expect("encodes"),
        "two replays differ"
    );
    assert_eq!(
        first, live,
        "the replay differs from the server's own state"
    );
}

//! A server killed and restarted on the same address: its state is in
//! memory and gone, but no lock is granted again while a holder from the
//! previous run may still believe it holds, and tokens keep rising.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{connect, connect_via_proxy, test_config, within, CrashableServer};
use latchkey::server::Config;
use latchkey_client::{Lock, LostReason};

fn config_with_lease_file(name: &str) -> Config {
    Config {
        lease_file: Some(common::temp_dir(name).join("lease")),
        ..test_config()
    }
}

/// Kills the server while a client holds a lock and is cut off from it,
/// restarts it, and has another client take the lock. Returns whether the
/// old holder had been told of its loss when the new one got the lock, and
/// both tokens.
async fn take_over_after_restart(config: Config) -> (bool, u64, u64) {
    let first = CrashableServer::start(config.clone()).await;
    let (proxy, holder) = connect_via_proxy(first.addr(), Duration::from_secs(1)).await;
    let guard = within(
        "the first acquire",
        Lock::new(&holder, "/jobs/nightly")
            .lock_delay(Duration::from_millis(300))
            .acquire(),
    )
    .await
    .expect("acquired");
    // The holder keeps its session for two more timeouts, heartbeating, so
    // the lease file must follow its deadline, not just record the grant.
    let mut status = holder.session_status();
    let heard_until = tokio::time::Instant::now() + Duration::from_secs(3);
    within("the holder's heartbeats", async {
        while status.borrow_and_update().lease_end < heard_until {
            status.changed().await.expect("the client is alive");
        }
    })
    .await;
    let told = Arc::new(AtomicBool::new(false));
    let lost = {
        let (lost, told) = (guard.lost(), told.clone());
        tokio::spawn(async move {
            let reason = lost.await;
            told.store(true, Ordering::SeqCst);
            reason
        })
    };
    // The holder hears nothing more: not the crash, not the restart.
    proxy.partition(true);
    let addr = first.addr();
    first.crash();
    let second = CrashableServer::start(Config {
        listen: addr,
        ..config
    })
    .await;
    let taker = connect(second.addr()).await;
    let taken = within(
        "the acquire after the restart",
        Lock::new(&taker, "/jobs/nightly").acquire(),
    )
    .await
    .expect("acquired after the restart");
    let told_first = told.load(Ordering::SeqCst);
    let reason = within("the old holder's loss", lost).await.expect("joined");
    assert!(
        matches!(reason, LostReason::LeaseEnded | LostReason::SessionExpired),
        "{reason:?}"
    );
    (told_first, guard.token().0, taken.token().0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_grants_no_lock_until_the_previous_holders_lease_is_over() {
    let (told_first, before, after) =
        take_over_after_restart(config_with_lease_file("grace")).await;
    assert!(
        told_first,
        "the new holder got the lock before the old one was told it had lost it"
    );
    assert!(
        after > before,
        "token {after} after the restart, {before} before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_lease_file_a_fixed_startup_grace_holds_grants_back() {
    let config = Config {
        startup_grace: Some(Duration::from_secs(3)),
        ..test_config()
    };
    let (told_first, before, after) = take_over_after_restart(config).await;
    assert!(told_first, "granted during the startup grace");
    assert!(after > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_file_asking_for_too_long_a_wait_is_cut_to_what_the_settings_allow() {
    let path = common::temp_dir("huge").join("lease");
    let config = Config {
        lease_file: Some(path.clone()),
        coordinator: latchkey::state::Config {
            session_timeout_ms_max: 1_000,
            lock_delay_ms_max: 1_000,
            ..test_config().coordinator
        },
        ..test_config()
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64;
    std::fs::write(&path, format!("{}\n", now_ms + 3_600_000)).expect("write the lease file");
    let server = CrashableServer::start(config).await;
    let client = connect(server.addr()).await;
    // At most 1 s + 1 s + 1 s of slack, not an hour.
    let guard = within(
        "a lock after a bounded wait",
        Lock::new(&client, "/jobs/x").acquire(),
    )
    .await
    .expect("acquired");
    guard.release().await.expect("released");
    let recorded: u64 = std::fs::read_to_string(&path)
        .expect("the lease file")
        .trim()
        .parse()
        .expect("a number");
    assert!(
        recorded < now_ms + 60_000,
        "the file still asks for {} s",
        (recorded - now_ms) / 1000
    );
}

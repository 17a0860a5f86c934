//! Deadlock refusals and the per-session limit on waits as any client
//! meets them: a second session speaking the bare protocol (JSON frames, as
//! a client in another language would) against locks and semaphores held
//! through our client.

mod common;

use common::{connect, start_server, start_server_with, test_config, wait_for_children, Raw};
use latchkey_client::protocol::{ErrorCode, OpResult, WaitEdge};
use latchkey_client::{Lock, Semaphore};
use serde_json::json;

/// A bare create of a lock node of `mode` (its JSON form) under `lock`.
fn lock_node(lock: &str, mode: serde_json::Value) -> serde_json::Value {
    json!({ "create": {
        "path": format!("{lock}/n-"),
        "kind": "ephemeral",
        "sequential": true,
        "make_parents": true,
        "lock": { "mode": mode },
    } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_session_is_refused_a_permit_whose_holder_waits_for_it() {
    let server = start_server().await;
    let ours = connect(server.addr()).await;
    let permit = Semaphore::new(&ours, "/pool", 1)
        .acquire()
        .await
        .expect("a permit");

    // The bare session holds /job; our client queues for it.
    let (mut raw, welcome) = Raw::session_welcome(server.addr()).await;
    let reply = raw.request(1, lock_node("/job", json!("exclusive"))).await;
    assert!(
        matches!(reply.result, Ok(OpResult::Created { .. })),
        "{reply:?}"
    );
    let waiting = {
        let ours = ours.clone();
        tokio::spawn(async move { Lock::new(&ours, "/job").acquire().await })
    };
    wait_for_children(&ours, "/job", 2).await;

    // Waiting for the only permit, held by a session that waits for it,
    // could never end.
    let semaphore = json!({ "semaphore": { "permits": 1 } });
    let reply = raw.request(2, lock_node("/pool", semaphore.clone())).await;
    let Err(e) = &reply.result else {
        panic!("the wait answered {reply:?}");
    };
    assert_eq!(e.code, ErrorCode::Deadlock, "{e:?}");
    let me = welcome.session_id;
    assert_eq!(
        e.cycle,
        vec![
            WaitEdge {
                session: me,
                lock: "/pool".into(),
                holder: ours.session_id(),
            },
            WaitEdge {
                session: ours.session_id(),
                lock: "/job".into(),
                holder: me,
            },
        ]
    );
    assert!(e.message.contains("would deadlock"), "{}", e.message);
    assert_eq!(ours.children("/pool").await.expect("list").0.len(), 1);

    // Once the permit is given back, the same wait is granted at once.
    permit.release().await.expect("release");
    let reply = raw.request(3, lock_node("/pool", semaphore)).await;
    let Ok(OpResult::Created { stat, .. }) = &reply.result else {
        panic!("the wait answered {reply:?}");
    };
    assert!(
        stat.lock.as_ref().is_some_and(|l| l.granted.is_some()),
        "{stat:?}"
    );
    waiting.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_session_waits_up_to_the_limit_and_no_further() {
    let mut config = test_config();
    config.coordinator.waits_per_session_max = 2;
    let server = start_server_with(config).await;
    let ours = connect(server.addr()).await;
    let mut held = Vec::new();
    for lock in ["/a", "/b", "/c"] {
        held.push(Lock::new(&ours, lock).acquire().await.expect("a lock"));
    }
    let mut raw = Raw::session(server.addr()).await;
    for (xid, lock) in (1..).zip(["/a", "/b"]) {
        let reply = raw.request(xid, lock_node(lock, json!("exclusive"))).await;
        assert!(
            matches!(reply.result, Ok(OpResult::Created { .. })),
            "{reply:?}"
        );
    }
    let reply = raw.request(3, lock_node("/c", json!("shared"))).await;
    let Err(e) = &reply.result else {
        panic!("a third wait answered {reply:?}");
    };
    assert_eq!(e.code, ErrorCode::LimitExceeded, "{e:?}");
    assert!(
        e.message.contains("--waits-per-session-max"),
        "{}",
        e.message
    );
    assert_eq!(ours.children("/c").await.expect("list").0.len(), 1);
    // A lock granted at once is no wait.
    let reply = raw.request(4, lock_node("/free", json!("exclusive"))).await;
    assert!(
        matches!(reply.result, Ok(OpResult::Created { .. })),
        "{reply:?}"
    );
}

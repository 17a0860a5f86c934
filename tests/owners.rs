//! The owner and token rules as any client meets them: a second session
//! speaking the bare protocol (JSON frames, as a client in another
//! language would) against locks and holds taken through our client.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{connect, start_server, wait_for_children, within, Raw};
use latchkey_client::protocol::{ErrorCode, OpResult, Reply};
use latchkey_client::{Hold, Lock, LostReason};
use serde_json::json;

/// The error code of a reply that must have failed.
fn refused(reply: &Reply) -> (ErrorCode, String) {
    match &reply.result {
        Err(e) => (e.code, e.message.clone()),
        Ok(result) => panic!("expected a refusal, got {result:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_session_cannot_take_a_lock_and_its_forced_delete_tells_the_holder_first() {
    let server = start_server().await;
    let holder = connect(server.addr()).await;
    let waiter = connect(server.addr()).await;
    let guard = Lock::new(&holder, "/locks/job")
        .lock_delay(Duration::from_millis(800))
        .acquire()
        .await
        .unwrap();
    let node = guard.node().to_owned();
    let told = Arc::new(AtomicBool::new(false));
    let lost = {
        let told = told.clone();
        let lost = guard.lost();
        tokio::spawn(async move {
            let reason = lost.await;
            told.store(true, Ordering::SeqCst);
            reason
        })
    };
    let waiting = {
        let told = told.clone();
        tokio::spawn(async move {
            let guard = Lock::new(&waiter, "/locks/job").acquire().await;
            // The moment the lock is granted: the holder must know already.
            (guard, told.load(Ordering::SeqCst))
        })
    };
    wait_for_children(&holder, "/locks/job", 2).await;

    let mut raw = Raw::session(server.addr()).await;
    let ops = [
        json!({ "delete": { "path": node } }),
        json!({ "set": { "path": node, "data": "" } }),
        json!({ "touch": { "path": node } }),
        json!({ "multi": { "ops": [{ "delete": { "path": node } }] } }),
    ];
    for (xid, op) in (1..).zip(ops) {
        let reply = raw.request(xid, op.clone()).await;
        let Err(e) = &reply.result else {
            panic!("{op} from another session answered {reply:?}");
        };
        assert_eq!(e.code, ErrorCode::NotOwner, "{op}: {e:?}");
        assert_eq!(e.owner, Some(holder.session_id()), "{op}: {e:?}");
        assert!(e.message.contains("with force"), "{e:?}");
    }
    assert!(!told.load(Ordering::SeqCst), "a refusal takes nothing");

    let reply = raw
        .request(10, json!({ "delete": { "path": node, "force": true } }))
        .await;
    let Ok(OpResult::Zombified { stat }) = &reply.result else {
        panic!("a forced delete of a held lock answered {reply:?}");
    };
    assert_eq!(stat.ephemeral_owner, None);
    assert!(stat.lock.as_ref().and_then(|l| l.freed_at_ms).is_some());
    assert_eq!(
        within("the holder's loss", lost).await.unwrap(),
        LostReason::NodeDeleted
    );
    let (granted, holder_knew) = within("the waiter's grant", waiting).await.unwrap();
    let granted = granted.expect("the waiter is granted once the lock-delay is over");
    assert!(holder_knew, "the waiter was granted before the holder knew");
    assert!(granted.token() > guard.token());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_session_changes_a_hold_only_with_its_token() {
    let server = start_server().await;
    let client = connect(server.addr()).await;
    let token = Hold::take(
        &client,
        "/holds/seat-12A",
        Duration::from_secs(600),
        "buyer-7",
    )
    .await
    .unwrap();
    let mut raw = Raw::session(server.addr()).await;
    let path = "/holds/seat-12A";
    let no_token = [
        json!({ "set": { "path": path, "data": "" } }),
        json!({ "touch": { "path": path, "ttl_ms": 5_000 } }),
        json!({ "delete": { "path": path } }),
    ];
    for (xid, op) in (1..).zip(no_token) {
        let (code, message) = refused(&raw.request(xid, op.clone()).await);
        assert_eq!(code, ErrorCode::TokenRequired, "{op}: {message}");
        assert!(
            message.contains("extend") && message.contains("release"),
            "{message}"
        );
    }
    let wrong = token.0 .0 + 1;
    let wrong_token = [
        json!({ "set": { "path": path, "data": "", "czxid": wrong } }),
        json!({ "touch": { "path": path, "czxid": wrong } }),
        json!({ "delete": { "path": path, "czxid": wrong } }),
    ];
    for (xid, op) in (10..).zip(wrong_token) {
        let (code, message) = refused(&raw.request(xid, op.clone()).await);
        assert_eq!(code, ErrorCode::BadToken, "{op}: {message}");
    }
    let (data, stat) = client.get(path).await.unwrap();
    assert_eq!(
        (data.as_slice(), stat.version),
        (&b"buyer-7"[..], 0),
        "untouched"
    );
    // Over the ceiling, whoever asks.
    let (code, message) = refused(
        &raw.request(
            20,
            json!({ "touch": { "path": path, "ttl_ms": u64::MAX, "czxid": token.0 } }),
        )
        .await,
    );
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(message.contains("the limit is"), "{message}");
    // The token is the proof, whichever session brings it.
    let reply = raw
        .request(
            30,
            json!({ "set": { "path": path, "data": "", "czxid": token.0 } }),
        )
        .await;
    assert!(reply.result.is_ok(), "{reply:?}");
    let reply = raw
        .request(31, json!({ "delete": { "path": path, "force": true } }))
        .await;
    assert_eq!(reply.result, Ok(OpResult::Deleted));
    assert!(client.exists(path).await.unwrap().is_none());
    server.stop().await;
}

//! Sessions end to end, through real sockets: expiry, resume after a cut,
//! close, retried requests, and fencing tokens across a restart.

mod common;

use std::time::{Duration, Instant};

use common::{connect, connect_via_proxy, start_server, start_server_with, test_config, within};
use latchkey_client::protocol::{node_name, OpResult, ServerMessage, SessionEvent, WatchEventKind};
use latchkey_client::{ClientError, CreateOptions, SessionState};
use serde_json::json;

/// Waits until the client's session reaches `state`.
async fn wait_for_state(client: &latchkey_client::Client, state: SessionState) {
    let mut status = client.session_status();
    within(&format!("session state {state:?}"), async {
        loop {
            if status.borrow_and_update().state == state {
                return;
            }
            if status.changed().await.is_err() {
                panic!("the client's status channel closed before {state:?}");
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemerals_vanish_when_the_session_expires_and_not_before_its_timeout() {
    let server = start_server().await;
    let timeout = Duration::from_millis(1500);
    let (proxy, holder) = connect_via_proxy(server.addr(), timeout).await;
    let observer = connect(server.addr()).await;

    let sent = Instant::now();
    holder
        .create("/e", "held", CreateOptions::ephemeral())
        .await
        .expect("create ephemeral");
    let (stat, deleted) = observer.exists_watch("/e").await.unwrap();
    assert_eq!(stat.unwrap().ephemeral_owner, Some(holder.session_id()));

    // The holder stops being heard: heartbeats are held in the proxy.
    let partitioned = Instant::now();
    proxy.partition(true);
    let event = within("the ephemeral's deletion", deleted).await.unwrap();
    let gone = Instant::now();
    assert_eq!(event.kind, WatchEventKind::NodeDeleted);
    // The server last heard the holder no earlier than the create was sent,
    // so it cannot have expired the session before that plus the timeout.
    assert!(
        gone.duration_since(sent) >= timeout,
        "deleted {:?} after the create was sent; the timeout is {timeout:?}",
        gone.duration_since(sent)
    );
    assert!(gone.duration_since(partitioned) < timeout + common::WAIT);
    assert_eq!(observer.exists("/e").await.unwrap(), None);

    // The holder knew its lease had ended before the server deleted the node.
    let lease_end = holder.session_status().borrow().lease_end;
    assert!(
        lease_end <= gone.into(),
        "the client's lease estimate must end before the server's expiry"
    );
    proxy.partition(false);
    proxy.cut_all();
    wait_for_state(&holder, SessionState::Expired).await;
    assert!(matches!(
        holder.get("/").await,
        Err(ClientError::SessionExpired)
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resumes_its_session_keeps_ephemerals_and_gets_missed_events() {
    let server = start_server().await;
    let (proxy, client) = connect_via_proxy(server.addr(), Duration::from_secs(10)).await;
    let other = connect(server.addr()).await;
    let session = client.session_id();

    client
        .create("/mine", "", CreateOptions::ephemeral())
        .await
        .unwrap();
    other
        .create("/watched", "v1", CreateOptions::persistent())
        .await
        .unwrap();
    let (_, _, changed) = client.get_watch("/watched").await.unwrap();

    // Cut the connection and keep the client out while the node changes.
    proxy.refuse(true);
    proxy.cut_all();
    wait_for_state(&client, SessionState::Suspended).await;
    other.set("/watched", "v2", None).await.unwrap();
    proxy.refuse(false);

    let event = within("the event missed while away", changed)
        .await
        .expect("the watch fires after the resume");
    assert_eq!(event.kind, WatchEventKind::NodeDataChanged);
    assert_eq!(event.path, "/watched");
    wait_for_state(&client, SessionState::Connected).await;
    assert_eq!(client.session_id(), session, "the same session resumed");
    let stat = other.exists("/mine").await.unwrap().expect("kept");
    assert_eq!(stat.ephemeral_owner, Some(session));
    assert_eq!(client.get("/watched").await.unwrap().0, b"v2");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_deletes_ephemerals_at_once() {
    let server = start_server().await;
    let client = connect(server.addr()).await;
    let other = connect(server.addr()).await;
    client
        .create("/a", "", CreateOptions::ephemeral())
        .await
        .unwrap();
    let (_, deleted) = other.exists_watch("/a").await.unwrap();
    client.close().await.expect("close");
    // No waiting: the close's reply came after the delete.
    assert_eq!(other.exists("/a").await.unwrap(), None);
    let event = within("the delete event", deleted).await.unwrap();
    assert_eq!(event.kind, WatchEventKind::NodeDeleted);
    assert!(matches!(client.get("/").await, Err(ClientError::Closed)));
    assert_eq!(client.session_status().borrow().state, SessionState::Closed);
    server.stop().await;
}

/// A bare session (JSON frames) that owns `count` ephemerals under `/e`.
async fn bare_owner_of(addr: std::net::SocketAddr, timeout_ms: u64, count: u64) -> common::Raw {
    let (mut raw, _) = common::Raw::open(addr).await.hello(timeout_ms).await;
    let parent = json!({ "create": { "path": "/e", "kind": "persistent" } });
    assert!(raw.request(1, parent).await.result.is_ok());
    for xid in 2..count + 2 {
        let op = json!({ "create": { "path": "/e/n-", "kind": "ephemeral", "sequential": true } });
        let reply = raw.request(xid, op).await;
        assert!(reply.result.is_ok(), "{reply:?}");
    }
    raw
}

/// A server whose ticks and closes delete at most 7 nodes at a time.
fn small_steps() -> latchkey::server::Config {
    let mut config = test_config();
    config.coordinator.step_deletes_max = 7;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_of_many_ephemerals_returns_once_the_last_is_gone() {
    let server = start_server_with(small_steps()).await;
    let other = connect(server.addr()).await;
    let mut raw = bare_owner_of(server.addr(), 10_000, 100).await;
    assert_eq!(other.children("/e").await.unwrap().0.len(), 100);
    let reply = raw.request(200, json!("close_session")).await;
    assert_eq!(reply.result, Ok(OpResult::Done));
    assert!(
        raw.recv().await.is_none(),
        "the server closes after the reply"
    );
    // 100 nodes are 15 steps of 7: the reply waited for all of them.
    assert_eq!(other.children("/e").await.unwrap().0, Vec::<String>::new());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_told_once_its_many_ephemerals_are_gone() {
    let server = start_server_with(small_steps()).await;
    let other = connect(server.addr()).await;
    // The bare session sends no heartbeat: it expires after 200 ms.
    let mut raw = bare_owner_of(server.addr(), 200, 100).await;
    let told = raw.recv().await;
    assert!(
        matches!(told, Some(ServerMessage::Session(SessionEvent::Expired))),
        "{told:?}"
    );
    // Told once the last of its nodes was gone, over 15 steps of 7.
    assert_eq!(other.children("/e").await.unwrap().0, Vec::<String>::new());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_create_after_a_cut_leaves_no_orphan() {
    let server = start_server().await;
    let (proxy, client) = connect_via_proxy(server.addr(), Duration::from_secs(10)).await;
    let observer = connect(server.addr()).await;
    observer
        .create("/q", "", CreateOptions::persistent())
        .await
        .unwrap();
    let (_, _, child_added) = observer.children_watch("/q").await.unwrap();

    // The request reaches the server; its reply is held back, then lost
    // with the connection.
    proxy.stall_replies(true);
    let creating = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .create("/q/lock-", "", CreateOptions::ephemeral().sequential())
                .await
        })
    };
    within("the create to be applied", child_added)
        .await
        .unwrap();
    proxy.cut_all();

    let created = within("the retried create", creating)
        .await
        .unwrap()
        .expect("the create succeeds once the client resumes");
    let (children, _) = observer.children("/q").await.unwrap();
    assert_eq!(children, vec![node_name(&created.path).to_string()]);
    assert_eq!(
        client.session_id(),
        observer
            .exists(&created.path)
            .await
            .unwrap()
            .unwrap()
            .ephemeral_owner
            .unwrap()
    );
    server.stop().await;
}

/// Creates three lock-queue nodes; returns their creation zxids.
async fn three_lock_nodes(client: &latchkey_client::Client) -> Vec<latchkey_client::Zxid> {
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let created = client
            .create(
                "/locks/x/lock-",
                "",
                CreateOptions::ephemeral().sequential().make_parents(),
            )
            .await
            .unwrap();
        tokens.push(created.stat.czxid);
    }
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_strictly_increase_across_a_server_restart() {
    let first = start_server().await;
    let client = connect(first.addr()).await;
    let mut tokens = Vec::new();
    tokens.extend(three_lock_nodes(&client).await);
    drop(client);
    first.stop().await;

    let second = start_server().await;
    let client = connect(second.addr()).await;
    tokens.extend(three_lock_nodes(&client).await);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens must strictly increase: {tokens:?}"
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_by_shutdown_is_reported_expired() {
    let server = start_server().await;
    let client = connect(server.addr()).await;
    server.stop().await;
    wait_for_state(&client, SessionState::Expired).await;
}

/// Requests sent in the same write as the handshake, and several requests
/// in one write, are all answered, in order: the server reads whole bursts
/// and keeps what follows the hello for after the session is attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_with_the_handshake_in_one_write_are_all_answered_in_order() {
    use bytes::BufMut;
    use latchkey_client::protocol::{self, Hello, ServerMessage};
    use tokio::io::AsyncWriteExt;

    let server = start_server().await;
    let frame = |value: serde_json::Value, out: &mut bytes::BytesMut| {
        let body = value.to_string();
        out.put_u32(u32::try_from(body.len()).expect("a small frame"));
        out.put_slice(body.as_bytes());
    };
    let mut burst = bytes::BytesMut::new();
    frame(
        serde_json::json!(Hello {
            protocol_version: protocol::PROTOCOL_VERSION,
            session_timeout_ms: 10_000,
            resume: None,
        }),
        &mut burst,
    );
    for xid in 1..=20u64 {
        frame(
            serde_json::json!({"xid": xid, "op": {"create": {"path": format!("/burst-{xid}")}}}),
            &mut burst,
        );
    }
    let mut socket = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    socket.write_all(&burst).await.expect("write the burst");
    let mut raw = common::Raw::over(socket);
    match raw.recv().await {
        Some(ServerMessage::Welcome(_)) => {}
        other => panic!("expected a welcome, got {other:?}"),
    }
    for xid in 1..=20u64 {
        match raw.recv().await {
            Some(ServerMessage::Reply(reply)) => {
                assert_eq!(reply.xid.0, xid);
                assert!(reply.result.is_ok(), "{:?}", reply.result);
            }
            other => panic!("expected the reply to {xid}, got {other:?}"),
        }
    }
    server.stop().await;
}

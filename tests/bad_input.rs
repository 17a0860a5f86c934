//! Bad input through real sockets: each gets a clear error or a closed
//! connection, the server keeps serving others, and nothing else changes.
//!
//! Every test runs on several worker threads, as the server does in
//! production: on one thread, connection tasks never truly interleave and
//! races stay hidden.

mod common;

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use common::{all_slots_free, start_server, start_server_with, test_config, within, Raw};
use futures_util::SinkExt;
use latchkey_client::protocol::{
    self, ErrorCode, Hello, OpResult, ServerMessage, SessionEvent, Xid,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The root's children and child version, seen by a fresh session: proof
/// that nothing changed.
async fn root_state(addr: SocketAddr) -> (Vec<String>, u64) {
    let mut raw = Raw::session(addr).await;
    let reply = raw.request(1, json!({"children": {"path": "/"}})).await;
    match reply.result {
        Ok(OpResult::Children { children, stat, .. }) => (children, stat.cversion),
        other => panic!("children of / failed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_close_the_connection_and_others_are_served() {
    let server = start_server().await;
    let before = root_state(server.addr()).await;
    let mut socket = TcpStream::connect(server.addr()).await.unwrap();
    // An HTTP request: its first four bytes announce a 1.2 GB frame.
    socket
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    within("the server closing", socket.read_to_end(&mut rest))
        .await
        .expect("read until close");
    // What came back, if anything, is one fatal frame.
    if !rest.is_empty() {
        let body = &rest[4..];
        let message: ServerMessage = serde_json::from_slice(body).unwrap();
        assert!(matches!(message, ServerMessage::Fatal(_)), "{message:?}");
    }
    assert_eq!(root_state(server.addr()).await, before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_length_header_is_refused_without_allocating_it() {
    let server = start_server().await;
    let mut raw = Raw::session(server.addr()).await;
    // Announce 1 GiB and send a few bytes of it: the codec rejects the
    // length from the header alone.
    let mut frame = BytesMut::new();
    frame.put_u32(1 << 30);
    frame.put_slice(b"{\"xid\":1");
    raw.framed.get_mut().write_all(&frame).await.unwrap();
    let message = raw.expect_fatal(ErrorCode::TooLarge).await;
    assert!(message.contains("frame"), "{message}");
    // The server still serves.
    let _ = root_state(server.addr()).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_and_nothing_changes() {
    let mut config = test_config();
    config.frame_bytes_max = 64 * 1024;
    config.coordinator.data_bytes_max = 16 * 1024;
    let server = start_server_with(config).await;
    let before = root_state(server.addr()).await;
    let mut raw = Raw::session(server.addr()).await;
    let big = "x".repeat(100 * 1024);
    raw.send_json(&json!({"xid": 1, "op": {"create": {"path": "/big", "data": big}}}))
        .await;
    let message = raw.expect_fatal(ErrorCode::TooLarge).await;
    assert!(
        message.contains("the limit is 65536 bytes") && message.contains("--frame-bytes-max"),
        "the error names the limit and how to change it: {message}"
    );
    assert_eq!(root_state(server.addr()).await, before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_closes_the_connection_with_a_reason() {
    let server = start_server().await;
    let before = root_state(server.addr()).await;
    let mut raw = Raw::session(server.addr()).await;
    raw.send_bytes(Bytes::from_static(b"{\"xid\": 1, \"op\": {\"create\""))
        .await;
    let message = raw.expect_fatal(ErrorCode::Malformed).await;
    assert!(message.contains("not a valid request"), "{message}");
    assert_eq!(root_state(server.addr()).await, before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_frame_that_is_not_a_handshake_is_refused() {
    let server = start_server().await;
    let mut raw = Raw::open(server.addr()).await;
    raw.send_json(&json!({"xid": 1, "op": "close_session"}))
        .await;
    let message = raw.expect_fatal(ErrorCode::Malformed).await;
    assert!(message.contains("handshake"), "{message}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_version_mismatch_names_both_versions() {
    let server = start_server().await;
    let mut raw = Raw::open(server.addr()).await;
    raw.send_json(&json!({"protocol_version": 999, "session_timeout_ms": 5000}))
        .await;
    let message = raw.expect_fatal(ErrorCode::ProtocolVersion).await;
    assert!(message.contains("999"), "{message}");
    assert!(
        message.contains(&protocol::PROTOCOL_VERSION.to_string()),
        "{message}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_with_a_wrong_secret_is_refused() {
    let server = start_server().await;
    let (mut first, welcome) = Raw::session_welcome(server.addr()).await;
    let mut thief = Raw::open(server.addr()).await;
    thief
        .send_json(&json!({
            "protocol_version": protocol::PROTOCOL_VERSION,
            "session_timeout_ms": 5000,
            "resume": {"session_id": welcome.session_id, "secret": "guess", "last_xid_received": 0}
        }))
        .await;
    thief.expect_fatal(ErrorCode::SessionExpired).await;
    // The owner's connection is untouched.
    let reply = first.request(1, json!({"exists": {"path": "/"}})).await;
    assert!(reply.result.is_ok());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_operation_gets_an_error_reply_and_the_connection_stays() {
    let server = start_server().await;
    let mut raw = Raw::session(server.addr()).await;
    let reply = raw.request(1, json!({"explode": {"path": "/"}})).await;
    assert_eq!(reply.xid, Xid(1));
    let error = reply.result.expect_err("unknown op fails");
    assert_eq!(error.code, ErrorCode::UnknownOperation);
    assert!(error.message.contains("explode"), "{}", error.message);
    // A malformed but identifiable request is answered too.
    let reply = raw.request(2, json!({"create": {"data": "AA=="}})).await;
    assert_eq!(
        reply.result.expect_err("no path").code,
        ErrorCode::Malformed
    );
    let reply = raw.request(3, json!({"exists": {"path": "/"}})).await;
    assert!(reply.result.is_ok(), "the connection still works");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_paths_are_refused_and_nothing_is_created() {
    let server = start_server().await;
    let before = root_state(server.addr()).await;
    let mut raw = Raw::session(server.addr()).await;
    let paths = [
        "", "a", "/a/", "/a//b", "/a/./b", "/a/../b", "/a\0b", "/a\u{1}b",
    ];
    for (i, path) in paths.iter().enumerate() {
        let xid = u64::try_from(i).unwrap() + 1;
        let reply = raw
            .request(xid, json!({"create": {"path": path, "make_parents": true}}))
            .await;
        let error = reply.result.expect_err("a bad path fails");
        assert_eq!(
            error.code,
            ErrorCode::InvalidPath,
            "{path:?}: {}",
            error.message
        );
        assert!(!error.message.is_empty());
    }
    let reply = raw.request(100, json!({"get": {"path": "/a/"}})).await;
    assert_eq!(reply.result.unwrap_err().code, ErrorCode::InvalidPath);
    assert_eq!(root_state(server.addr()).await, before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_over_the_limit_is_refused_with_the_limit_named() {
    let mut config = test_config();
    config.coordinator.data_bytes_max = 1000;
    let server = start_server_with(config).await;
    let before = root_state(server.addr()).await;
    let mut raw = Raw::session(server.addr()).await;
    let data = protocol::Data(vec![7u8; 1001]);
    let reply = raw
        .request(1, json!({"create": {"path": "/a", "data": data}}))
        .await;
    let error = reply.result.expect_err("too large");
    assert_eq!(error.code, ErrorCode::TooLarge);
    assert!(error.message.contains("1000"), "{}", error.message);
    assert_eq!(root_state(server.addr()).await, before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_disconnected_and_others_are_served() {
    let mut config = test_config();
    config.outbound_bytes_max = 64 * 1024;
    let server = start_server_with(config).await;
    let mut writer = Raw::session(server.addr()).await;
    let data = protocol::Data(vec![b'x'; 32 * 1024]);
    let reply = writer
        .request(1, json!({"create": {"path": "/big", "data": data}}))
        .await;
    assert!(reply.result.is_ok());

    // Ask for the 32 KiB node over and over without reading: far more than
    // the socket buffers and the 64 KiB queue hold.
    let mut sluggard = Raw::session(server.addr()).await;
    let requests = 4000u64;
    let mut send_failed = false;
    for xid in 1..=requests {
        let frame = Bytes::from(json!({"xid": xid, "op": {"get": {"path": "/big"}}}).to_string());
        if sluggard.framed.send(frame).await.is_err() {
            send_failed = true;
            break;
        }
    }
    // Now read: the stream ends before all replies arrived.
    let mut replies = 0u64;
    while let Some(message) = sluggard.recv().await {
        if matches!(message, ServerMessage::Reply(_)) {
            replies += 1;
        }
    }
    assert!(
        send_failed || replies < requests,
        "the server kept queueing for a client that does not read ({replies} replies)"
    );
    // Everyone else is served.
    let reply = writer.request(2, json!({"exists": {"path": "/big"}})).await;
    assert!(reply.result.is_ok());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_with_a_reason() {
    let mut config = test_config();
    config.connections_max = 2;
    let server = start_server_with(config).await;
    let _a = Raw::session(server.addr()).await;
    let _b = Raw::session(server.addr()).await;
    let mut c = Raw::open(server.addr()).await;
    let message = c.expect_fatal(ErrorCode::TooManyConnections).await;
    assert!(message.contains('2'), "{message}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_connected_clients_their_session_ended() {
    let server = start_server().await;
    let mut raw = Raw::session(server.addr()).await;
    server.stop().await;
    assert_eq!(
        raw.recv().await,
        Some(ServerMessage::Session(SessionEvent::Expired))
    );
    assert!(raw.recv().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_says_hello_is_closed_after_the_handshake_timeout() {
    let mut config = test_config();
    config.handshake_timeout = std::time::Duration::from_millis(300);
    let server = start_server_with(config).await;
    let mut silent = TcpStream::connect(server.addr()).await.unwrap();
    let mut rest = Vec::new();
    let read = within(
        "the server closing a silent connection",
        silent.read_to_end(&mut rest),
    )
    .await;
    assert!(
        read.is_ok() && rest.is_empty(),
        "closed without a word: {read:?}"
    );
    // A connection stalled inside its first frame is closed the same way.
    let mut stalled = TcpStream::connect(server.addr()).await.unwrap();
    stalled.write_all(&[0, 0, 0, 50, b'{']).await.unwrap();
    let read = within(
        "the server closing a stalled connection",
        stalled.read_to_end(&mut rest),
    )
    .await;
    assert!(read.is_ok());
    let _ = root_state(server.addr()).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_on_a_new_connection_moves_the_session_and_closes_the_old_one() {
    let server = start_server().await;
    let (mut first, welcome) = Raw::session_welcome(server.addr()).await;
    let created = first
        .request(1, json!({"create": {"path": "/mine", "kind": "ephemeral"}}))
        .await;
    assert!(created.result.is_ok());

    let mut second = Raw::open(server.addr()).await;
    second
        .send_json(&json!({
            "protocol_version": protocol::PROTOCOL_VERSION,
            "session_timeout_ms": 5000,
            "resume": {"session_id": welcome.session_id, "secret": welcome.secret, "last_xid_received": 1}
        }))
        .await;
    let Some(ServerMessage::Welcome(resumed)) = second.recv().await else {
        panic!("no welcome on resume");
    };
    assert_eq!(resumed.session_id, welcome.session_id);
    assert_eq!(resumed.last_xid_applied, Xid(1));
    assert_eq!(
        first.recv().await,
        Some(ServerMessage::Session(SessionEvent::Moved))
    );
    assert!(first.recv().await.is_none(), "the old connection is closed");
    // The session, and its ephemeral node, carry on on the new connection.
    let reply = second
        .request(2, json!({"exists": {"path": "/mine"}}))
        .await;
    match reply.result {
        Ok(OpResult::Exists { stat: Some(stat) }) => {
            assert_eq!(stat.ephemeral_owner, Some(welcome.session_id));
        }
        other => panic!("the ephemeral should survive the move: {other:?}"),
    }
    server.stop().await;
}

/// Postmortem: a frame already buffered on a connection whose session had
/// just been resumed elsewhere was still applied, after the new
/// connection's welcome had reported it as never applied; the client then
/// sent it again under a new xid and it took effect twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_still_buffered_on_a_moved_connection_is_never_applied_after_the_move() {
    let slots = 16;
    let mut config = test_config();
    config.connections_max = slots;
    let server = start_server_with(config).await;
    let trials = 300u64;
    let mut reported_applied = Vec::new();
    for trial in 0..trials {
        let (mut old, welcome) = Raw::session_welcome(server.addr()).await;
        let mut new = Raw::open(server.addr()).await;
        let hello = json!(Hello {
            protocol_version: protocol::PROTOCOL_VERSION,
            session_timeout_ms: 10_000,
            resume: Some(protocol::Resume {
                session_id: welcome.session_id,
                secret: welcome.secret.clone(),
                last_xid_received: Xid(0),
            }),
        });
        let create = json!({"xid": 1, "op": {"create": {"path": format!("/t{trial}")}}});
        // Race the old connection's write against the resume, both orders.
        if trial % 2 == 0 {
            new.send_json(&hello).await;
            old.send_json(&create).await;
        } else {
            old.send_json(&create).await;
            new.send_json(&hello).await;
        }
        let Some(ServerMessage::Welcome(resumed)) = new.recv().await else {
            panic!("no welcome on resume");
        };
        reported_applied.push(resumed.last_xid_applied == Xid(1));
        while old.recv().await.is_some() {}
    }
    // Only once every old connection's task has ended can nothing more of
    // what it carried be applied.
    let mut checker = all_slots_free(server.addr(), slots).await;
    for (trial, reported) in (0..trials).zip(reported_applied) {
        let reply = checker
            .request(trial + 1, json!({"exists": {"path": format!("/t{trial}")}}))
            .await;
        let applied = matches!(reply.result, Ok(OpResult::Exists { stat: Some(_) }));
        assert_eq!(
            applied, reported,
            "trial {trial}: the create was applied={applied}, but the resume's welcome \
             reported it applied={reported}"
        );
    }
    server.stop().await;
}

/// A session that asks for `requests` copies of a node of `data_bytes`
/// bytes and reads none of them, on a socket with a small receive buffer:
/// the server's write to it blocks after a few replies instead of filling
/// the kernel's autotuned buffers.
async fn stalled_reader(
    addr: SocketAddr,
    data_bytes: usize,
    requests: u64,
    session_timeout_ms: u64,
) -> Raw {
    let mut writer = Raw::session(addr).await;
    let data = protocol::Data(vec![b'x'; data_bytes]);
    let reply = writer
        .request(1, json!({"create": {"path": "/big", "data": data}}))
        .await;
    assert!(reply.result.is_ok());
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut sluggard, _) = Raw::over(stream).hello(session_timeout_ms).await;
    for xid in 1..=requests {
        sluggard
            .send_json(&json!({"xid": xid, "op": {"get": {"path": "/big"}}}))
            .await;
    }
    sluggard
}

/// Postmortem: a writer blocked on a client that does not read waited for
/// ever, holding the connection's task, socket and slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_gives_its_connection_slot_back() {
    let mut config = test_config();
    config.coordinator.session_timeout_ms_max = 60_000;
    config.connections_max = 2;
    // Room for every reply in the queue: only the write deadline can act.
    config.outbound_bytes_max = 64 * 1024 * 1024;
    config.write_timeout = std::time::Duration::from_millis(300);
    let server = start_server_with(config).await;
    // A session that outlives the test, so its expiry cannot be what frees
    // the slot.
    let requests = 20u64;
    let mut sluggard = stalled_reader(server.addr(), 1024 * 1024, requests, 60_000).await;
    // Both slots are taken until the server gives up on the sluggard.
    within("the sluggard's slot to be freed", async {
        loop {
            let mut probe = Raw::open(server.addr()).await;
            probe
                .send_json(&json!(Hello {
                    protocol_version: protocol::PROTOCOL_VERSION,
                    session_timeout_ms: 10_000,
                    resume: None,
                }))
                .await;
            match probe.recv().await {
                Some(ServerMessage::Welcome(_)) => return,
                Some(ServerMessage::Fatal(e)) if e.code == ErrorCode::TooManyConnections => {
                    // Pace the probes; the slot frees on the server's own
                    // deadline, which no message announces.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                other => panic!("unexpected answer to a probe: {other:?}"),
            }
        }
    })
    .await;
    let mut replies = 0u64;
    while let Some(message) = sluggard.recv().await {
        if matches!(message, ServerMessage::Reply(_)) {
            replies += 1;
        }
    }
    assert!(
        replies < requests,
        "all {replies} replies arrived: nothing was dropped"
    );
    server.stop().await;
}

/// A connection already closing when the server shuts down (its client
/// ended its side) while a write waits for a client that does not read is
/// still cut at the shutdown grace, as every connection is: the server
/// stops within the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_a_closing_connection_with_a_stalled_write_at_the_grace() {
    use std::time::Duration;
    let mut config = test_config();
    config.shutdown_grace = Duration::from_millis(300);
    config.write_timeout = Duration::from_secs(60);
    config.outbound_bytes_max = 64 << 20;
    let server = start_server_with(config).await;
    let mut sluggard = stalled_reader(server.addr(), 256 * 1024, 32, 10_000).await;
    // Nothing tells a client that the server's write is waiting for it;
    // time for the server to fill both buffers. Were it not stalled yet, the
    // test could only pass, never fail falsely.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The client ends its side: the server stops reading, detaches the
    // session and closes its queue, still trying to write what is queued.
    sluggard.framed.get_mut().shutdown().await.unwrap();
    // Time for the server to see the end of the stream (as above).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        server.stop().await,
        "a connection task outlived the shutdown grace: a closing connection's stalled write \
         was not cut at the grace (its write timeout is 60 s)"
    );
    drop(sluggard);
}

//! The client against a scripted fake server on 127.0.0.1:0: handshake,
//! correlation, watches, heartbeats, reconnect with resume and resend,
//! expiry and close. Each test plays the server's side by hand.

use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::protocol::{
    self, limits, ErrorCode, ErrorReply, Hello, Op, OpResult, Reply, Request, Secret,
    ServerMessage, SessionEvent, SessionId, Stat, WatchEvent, WatchEventKind, Welcome, Xid, Zxid,
    PROTOCOL_VERSION,
};
use crate::{Client, ClientError, ClientOptions, CreateOptions, SessionState, WatchKind};

const SESSION: SessionId = SessionId(0x42);
/// Long enough that no heartbeat interferes unless a test wants one.
const QUIET_TIMEOUT_MS: u64 = 30_000;

async fn within<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("the test timed out")
}

struct Fake {
    listener: TcpListener,
    addr: String,
}

impl Fake {
    async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        Fake { listener, addr }
    }

    async fn accept(&self) -> Peer {
        let (stream, _) = self.listener.accept().await.unwrap();
        Peer {
            conn: Framed::new(stream, protocol::codec(limits::REPLY_FRAME_BYTES_MAX)),
        }
    }

    fn options(&self) -> ClientOptions {
        ClientOptions::new(self.addr.clone())
            .session_timeout(Duration::from_millis(QUIET_TIMEOUT_MS))
            .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
    }
}

struct Peer {
    conn: Framed<TcpStream, LengthDelimitedCodec>,
}

fn welcome(timeout_ms: u64, last_xid_applied: u64) -> ServerMessage {
    ServerMessage::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        session_id: SESSION,
        secret: Secret("s3cret".into()),
        session_timeout_ms: timeout_ms,
        zxid: Zxid(100),
        last_xid_applied: Xid(last_xid_applied),
        frame_bytes_max: u64::try_from(limits::FRAME_BYTES_MAX).unwrap(),
        data_bytes_max: 16,
    })
}

fn stat(version: u64) -> Stat {
    Stat {
        czxid: Zxid(3),
        version,
        ..Stat::default()
    }
}

impl Peer {
    async fn frame(&mut self) -> Option<bytes::BytesMut> {
        self.conn.next().await.map(|f| f.unwrap())
    }

    async fn hello(&mut self) -> Hello {
        serde_json::from_slice(&self.frame().await.expect("a hello")).unwrap()
    }

    async fn send(&mut self, message: ServerMessage) {
        self.conn.send(protocol::encode(&message)).await.unwrap();
    }

    async fn request(&mut self) -> Request {
        serde_json::from_slice(&self.frame().await.expect("a request")).unwrap()
    }

    async fn reply(&mut self, xid: Xid, result: Result<OpResult, ErrorReply>) {
        self.send(ServerMessage::Reply(Reply {
            xid,
            zxid: Zxid(10),
            result,
        }))
        .await;
    }
}

/// A connected client and the fake's side of its connection.
async fn connected(fake: &Fake, options: ClientOptions, timeout_ms: u64) -> (Client, Peer) {
    let server = async {
        let mut peer = fake.accept().await;
        let hello = peer.hello().await;
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        assert!(hello.resume.is_none());
        peer.send(welcome(timeout_ms, 0)).await;
        peer
    };
    let (client, peer) = within(async { tokio::join!(Client::connect(options), server) }).await;
    (client.unwrap(), peer)
}

#[tokio::test]
async fn requests_get_their_own_replies_in_order() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    assert_eq!(client.session_id(), SESSION);
    assert_eq!(
        client.session_status().borrow().state,
        SessionState::Connected
    );

    let c = client.clone();
    let ops = tokio::spawn(async move {
        tokio::join!(
            c.create("/a", "x", CreateOptions::ephemeral().sequential()),
            c.get("/b"),
            c.exists("/c"),
        )
    });
    let server = async {
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(peer.request().await);
        }
        let xids: Vec<u64> = requests.iter().map(|r| r.xid.0).collect();
        assert_eq!(xids, vec![1, 2, 3]);
        let created = OpResult::Created {
            path: "/a0000000001".into(),
            stat: stat(0),
        };
        peer.reply(Xid(1), Ok(created)).await;
        let no_node = ErrorReply::new(ErrorCode::NoNode, "no node at /b");
        peer.reply(Xid(2), Err(no_node)).await;
        let exists = OpResult::Exists {
            stat: Some(stat(4)),
        };
        peer.reply(Xid(3), Ok(exists)).await;
        requests
    };
    let (requests, results) = within(async { tokio::join!(server, ops) }).await;
    let (created, got, exists) = results.unwrap();
    assert_eq!(created.unwrap().path, "/a0000000001");
    let err = got.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoNode));
    assert!(err.to_string().contains("no node at /b"), "{err}");
    assert_eq!(exists.unwrap().unwrap().version, 4);
    let Op::Create(create) = &requests[0].op else {
        panic!("{:?}", requests[0])
    };
    assert!(create.sequential);
    assert_eq!(create.data.0, b"x");
}

#[tokio::test]
async fn refused_connect_names_the_address_and_the_reason() {
    let fake = Fake::start().await;
    let addr = fake.addr.clone();
    drop(fake);
    let err = Client::connect(ClientOptions::new(addr.clone()))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert!(
        text.contains(&addr) && text.contains("latchkey serve"),
        "{text}"
    );
}

#[tokio::test]
async fn a_version_mismatch_names_both_versions() {
    let fake = Fake::start().await;
    let server = async {
        let mut peer = fake.accept().await;
        peer.hello().await;
        let mut w = welcome(1000, 0);
        if let ServerMessage::Welcome(w) = &mut w {
            w.protocol_version = PROTOCOL_VERSION + 1;
        }
        peer.send(w).await;
        peer
    };
    let (result, _peer) =
        within(async { tokio::join!(Client::connect(fake.options()), server) }).await;
    let err = result.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ProtocolVersion));
    let text = err.to_string();
    assert!(
        text.contains(&format!("version {PROTOCOL_VERSION}"))
            && text.contains(&format!("version {}", PROTOCOL_VERSION + 1)),
        "{text}"
    );
}

#[tokio::test]
async fn bad_paths_and_big_data_fail_without_a_round_trip() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let err = client.get("no-slash").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidPath));
    assert!(err.to_string().contains("no-slash"), "{err}");
    // The welcome said data_bytes_max = 16.
    let err = client.set("/a", vec![0u8; 17], None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TooLarge));
    // Proof that neither went out: the next request is xid 1.
    let c = client.clone();
    let get = tokio::spawn(async move { c.exists("/ok").await });
    let request = within(peer.request()).await;
    assert_eq!(request.xid, Xid(1));
    peer.reply(Xid(1), Ok(OpResult::Exists { stat: None }))
        .await;
    assert_eq!(within(get).await.unwrap(), Ok(None));
}

#[tokio::test]
async fn watches_fire_on_matching_events() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let c = client.clone();
    let reads = tokio::spawn(async move {
        let (_, _, data) = c.get_watch("/a").await.unwrap();
        let (stat, exist) = c.exists_watch("/b").await.unwrap();
        assert!(stat.is_none());
        let (_, _, child) = c.children_watch("/c").await.unwrap();
        (data, exist, child)
    });
    within(async {
        let r = peer.request().await;
        assert_eq!(
            r.op,
            Op::Get {
                path: "/a".into(),
                watch: true
            }
        );
        let data = OpResult::Data {
            data: "v".into(),
            stat: stat(1),
        };
        peer.reply(r.xid, Ok(data)).await;
        let r = peer.request().await;
        peer.reply(r.xid, Ok(OpResult::Exists { stat: None })).await;
        let r = peer.request().await;
        let children = OpResult::Children {
            children: vec![],
            stat: stat(0),
            more: false,
        };
        peer.reply(r.xid, Ok(children)).await;
    })
    .await;
    let (data, exist, child) = within(reads).await.unwrap();
    assert_eq!(exist.kind(), WatchKind::Exist);
    assert_eq!(child.kind(), WatchKind::Child);
    let event = |kind, path: &str| {
        ServerMessage::Watch(WatchEvent {
            kind,
            path: path.into(),
            zxid: Zxid(20),
        })
    };
    // Events that match no watch are ignored.
    peer.send(event(WatchEventKind::NodeDataChanged, "/b"))
        .await;
    peer.send(event(WatchEventKind::NodeCreated, "/b")).await;
    peer.send(event(WatchEventKind::NodeDataChanged, "/a"))
        .await;
    peer.send(event(WatchEventKind::NodeDeleted, "/c")).await;
    assert_eq!(
        within(exist).await.unwrap().kind,
        WatchEventKind::NodeCreated
    );
    assert_eq!(
        within(data).await.unwrap().kind,
        WatchEventKind::NodeDataChanged
    );
    assert_eq!(
        within(child).await.unwrap().kind,
        WatchEventKind::NodeDeleted
    );
}

#[tokio::test]
async fn an_idle_client_pings_and_its_lease_moves() {
    let fake = Fake::start().await;
    let options = fake.options().session_timeout(Duration::from_millis(300));
    let (client, mut peer) = connected(&fake, options, 300).await;
    let mut status = client.session_status();
    let first_lease = status.borrow_and_update().lease_end;
    for expected in 1..=2 {
        let ping = within(peer.request()).await;
        assert_eq!(ping.xid, Xid(expected));
        assert_eq!(
            ping.op,
            Op::Ping {
                ack: Xid(expected - 1)
            }
        );
        peer.reply(ping.xid, Ok(OpResult::Pong)).await;
    }
    within(status.wait_for(|s| s.lease_end > first_lease))
        .await
        .unwrap();
    assert_eq!(status.borrow().state, SessionState::Connected);
}

#[tokio::test]
async fn a_silent_server_is_dropped_and_the_session_resumed() {
    let fake = Fake::start().await;
    let options = fake.options().session_timeout(Duration::from_millis(300));
    let (client, mut peer) = connected(&fake, options, 300).await;
    // Read the ping, never answer it.
    let ping = within(peer.request()).await;
    assert!(matches!(ping.op, Op::Ping { .. }));
    let mut status = client.session_status();
    within(status.wait_for(|s| s.state == SessionState::Suspended))
        .await
        .unwrap();
    let mut peer2 = within(fake.accept()).await;
    let hello = within(peer2.hello()).await;
    let resume = hello.resume.expect("a resume");
    assert_eq!(resume.session_id, SESSION);
    assert_eq!(resume.secret, Secret("s3cret".into()));
    assert_eq!(resume.last_xid_received, Xid(0));
    peer2.send(welcome(300, 1)).await;
    within(status.wait_for(|s| s.state == SessionState::Connected))
        .await
        .unwrap();
    // The old ping is not resent; the next request has a fresh xid. (Not
    // necessarily 2: the second ping and the silence deadline both fall
    // about 2/3 of the timeout in, and a loaded runner can see both ready
    // at once, so a second unanswered ping may have gone on the old
    // connection.)
    let next = within(peer2.request()).await;
    assert!(matches!(next.op, Op::Ping { .. }), "{next:?}");
    assert!(next.xid > ping.xid && next.xid <= Xid(3), "{next:?}");
    drop(peer);
}

/// A server that keeps talking but stops reading: the requests the socket
/// cannot take wait with the session task, and once no byte has gone out
/// for 2/3 of the session timeout the connection is dropped as dead and
/// the session resumed on a new one.
#[tokio::test]
async fn a_server_that_stops_reading_is_dropped_though_it_still_talks() {
    let fake = Fake::start().await;
    // The drop comes 2 s in; the session would be given up at about 6 s.
    let options = fake.options().session_timeout(Duration::from_millis(3000));
    let server = async {
        let mut peer = fake.accept().await;
        peer.hello().await;
        let mut hello_back = welcome(3000, 0);
        if let ServerMessage::Welcome(w) = &mut hello_back {
            w.data_bytes_max = 1 << 20;
        }
        peer.send(hello_back).await;
        peer
    };
    let (client, mut peer) = within(async { tokio::join!(Client::connect(options), server) }).await;
    let client = client.unwrap();
    // About 34 MB once encoded: far more than loopback socket buffers hold.
    let data = vec![b'x'; 512 * 1024];
    let writers: Vec<_> = (0..48)
        .map(|_| {
            let (c, d) = (client.clone(), data.clone());
            tokio::spawn(async move { c.set("/big", d, None).await })
        })
        .collect();
    let chatter = async {
        // Events for a path nobody watches: the client hears from the
        // server all along, so only the stuck writes can end the connection.
        let mut every = tokio::time::interval(Duration::from_millis(50));
        loop {
            every.tick().await;
            let event = ServerMessage::Watch(WatchEvent {
                kind: WatchEventKind::NodeDataChanged,
                path: "/other".into(),
                zxid: Zxid(20),
            });
            // Once the client drops this connection, sends fail (a reset):
            // that is the drop this test waits for, seen from this side.
            if peer.conn.send(protocol::encode(&event)).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let mut peer2 = within(async {
        tokio::select! {
            peer2 = fake.accept() => peer2,
            () = chatter => unreachable!("the chatter never ends"),
        }
    })
    .await;
    let resume = within(peer2.hello()).await.resume.expect("a resume");
    assert_eq!(resume.session_id, SESSION);
    for writer in writers {
        writer.abort();
    }
}

#[tokio::test]
async fn resume_resets_watches_then_resends_unanswered_requests() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let c = client.clone();
    let watch = tokio::spawn(async move { c.get_watch("/w").await.map(|r| r.2) });
    let r = within(peer.request()).await;
    let data = OpResult::Data {
        data: "v".into(),
        stat: stat(1),
    };
    peer.send(ServerMessage::Reply(Reply {
        xid: r.xid,
        zxid: Zxid(5),
        result: Ok(data),
    }))
    .await;
    let watch = within(watch).await.unwrap().unwrap();

    // Two creates go out; the server applies the first (xid 2), the
    // connection breaks before either reply.
    let c = client.clone();
    let first = tokio::spawn(async move { c.create("/a", "", CreateOptions::default()).await });
    assert_eq!(within(peer.request()).await.xid, Xid(2));
    let c = client.clone();
    let second = tokio::spawn(async move { c.create("/b", "", CreateOptions::default()).await });
    assert_eq!(within(peer.request()).await.xid, Xid(3));
    drop(peer);

    let mut peer = within(fake.accept()).await;
    let hello = within(peer.hello()).await;
    assert_eq!(hello.resume.unwrap().last_xid_received, Xid(1));
    peer.send(welcome(QUIET_TIMEOUT_MS, 2)).await;
    let sw = within(peer.request()).await;
    assert_eq!(sw.xid, Xid(4));
    assert_eq!(
        sw.op,
        Op::SetWatches {
            last_zxid: Zxid(5),
            data: vec!["/w".into()],
            exist: vec![],
            child: vec![],
            lock: vec![],
        }
    );
    let retried = within(peer.request()).await;
    assert_eq!(retried.xid, Xid(2), "an applied write keeps its xid");
    let renumbered = within(peer.request()).await;
    assert_eq!(
        renumbered.xid,
        Xid(5),
        "an unapplied request gets a fresh xid"
    );
    let Op::Create(create) = &renumbered.op else {
        panic!("{renumbered:?}")
    };
    assert_eq!(create.path, "/b");

    // /w changed in the gap: the server fires it before the replies.
    peer.send(ServerMessage::Watch(WatchEvent {
        kind: WatchEventKind::NodeDataChanged,
        path: "/w".into(),
        zxid: Zxid(6),
    }))
    .await;
    peer.reply(Xid(4), Ok(OpResult::Done)).await;
    for (xid, path) in [(Xid(2), "/a"), (Xid(5), "/b")] {
        let created = OpResult::Created {
            path: path.into(),
            stat: stat(0),
        };
        peer.reply(xid, Ok(created)).await;
    }
    assert_eq!(within(watch).await.unwrap().zxid, Zxid(6));
    assert_eq!(within(first).await.unwrap().unwrap().path, "/a");
    assert_eq!(within(second).await.unwrap().unwrap().path, "/b");
    assert_eq!(
        client.session_status().borrow().state,
        SessionState::Connected
    );
}

#[tokio::test]
async fn garbage_or_a_wrong_xid_makes_the_client_reconnect() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    peer.conn
        .send(bytes::Bytes::from_static(b"not json"))
        .await
        .unwrap();
    let mut peer = within(fake.accept()).await;
    assert!(within(peer.hello()).await.resume.is_some());
    peer.send(welcome(QUIET_TIMEOUT_MS, 0)).await;

    let c = client.clone();
    let get = tokio::spawn(async move { c.exists("/x").await });
    let r = within(peer.request()).await;
    assert_eq!(r.xid, Xid(1));
    peer.reply(Xid(99), Ok(OpResult::Pong)).await;
    let mut peer = within(fake.accept()).await;
    assert!(within(peer.hello()).await.resume.is_some());
    peer.send(welcome(QUIET_TIMEOUT_MS, 1)).await;
    // A read is renumbered: the server may not answer an old read xid.
    let r = within(peer.request()).await;
    assert_eq!(r.xid, Xid(2));
    peer.reply(r.xid, Ok(OpResult::Exists { stat: None })).await;
    assert_eq!(within(get).await.unwrap(), Ok(None));
}

#[tokio::test]
async fn expiry_on_resume_fails_pending_requests_and_watches() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let c = client.clone();
    let watch = tokio::spawn(async move { c.exists_watch("/w").await.map(|r| r.1) });
    let r = within(peer.request()).await;
    peer.reply(r.xid, Ok(OpResult::Exists { stat: None })).await;
    let watch = within(watch).await.unwrap().unwrap();
    let c = client.clone();
    let pending = tokio::spawn(async move { c.get("/x").await });
    within(peer.request()).await;
    drop(peer);

    let mut peer = within(fake.accept()).await;
    within(peer.hello()).await;
    let expired = ErrorReply::new(ErrorCode::SessionExpired, "session 0x42 expired");
    peer.send(ServerMessage::Fatal(expired)).await;
    assert_eq!(
        within(pending).await.unwrap(),
        Err(ClientError::SessionExpired)
    );
    assert_eq!(within(watch).await, Err(ClientError::SessionExpired));
    assert_eq!(
        client.session_status().borrow().state,
        SessionState::Expired
    );
    assert_eq!(client.exists("/x").await, Err(ClientError::SessionExpired));
    assert_eq!(client.close().await, Ok(()));
}

#[tokio::test]
async fn an_expired_event_ends_the_session() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let c = client.clone();
    let pending = tokio::spawn(async move { c.get("/x").await });
    within(peer.request()).await;
    peer.send(ServerMessage::Session(SessionEvent::Expired))
        .await;
    assert_eq!(
        within(pending).await.unwrap(),
        Err(ClientError::SessionExpired)
    );
    let mut status = client.session_status();
    within(status.wait_for(|s| s.state == SessionState::Expired))
        .await
        .unwrap();
}

#[tokio::test]
async fn close_ends_the_session_on_the_server() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let c = client.clone();
    let close = tokio::spawn(async move { c.close().await });
    let r = within(peer.request()).await;
    assert_eq!(r.op, Op::CloseSession);
    peer.reply(r.xid, Ok(OpResult::Done)).await;
    assert_eq!(within(close).await.unwrap(), Ok(()));
    assert_eq!(client.session_status().borrow().state, SessionState::Closed);
    assert_eq!(client.get("/a").await, Err(ClientError::Closed));
    assert_eq!(client.close().await, Ok(()));
}

#[tokio::test]
async fn close_while_disconnected_reports_connection_lost() {
    let fake = Fake::start().await;
    let (client, peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    drop(peer);
    let mut status = client.session_status();
    within(status.wait_for(|s| s.state == SessionState::Suspended))
        .await
        .unwrap();
    // The fake never answers the resume's hello.
    assert_eq!(
        within(client.close()).await,
        Err(ClientError::ConnectionLost)
    );
    assert_eq!(client.session_status().borrow().state, SessionState::Closed);
    assert_eq!(client.close().await, Ok(()));
}

#[tokio::test]
async fn dropping_every_handle_closes_the_session() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let status = client.session_status();
    drop(client.clone());
    drop(client);
    let r = within(peer.request()).await;
    assert_eq!(r.op, Op::CloseSession);
    peer.reply(r.xid, Ok(OpResult::Done)).await;
    let mut status = status;
    within(status.wait_for(|s| s.state == SessionState::Closed))
        .await
        .unwrap();
}

#[tokio::test]
async fn moved_makes_the_client_resume_elsewhere() {
    let fake = Fake::start().await;
    let second = Fake::start().await;
    let options = fake.options().server(second.addr.clone());
    let (client, mut peer) = connected(&fake, options, QUIET_TIMEOUT_MS).await;
    peer.send(ServerMessage::Session(SessionEvent::Moved)).await;
    // Reconnects go to the next server in the list.
    let mut peer2 = within(second.accept()).await;
    assert_eq!(
        within(peer2.hello()).await.resume.unwrap().session_id,
        SESSION
    );
    peer2.send(welcome(QUIET_TIMEOUT_MS, 0)).await;
    let c = client.clone();
    let get = tokio::spawn(async move { c.exists("/x").await });
    let r = within(peer2.request()).await;
    peer2
        .reply(r.xid, Ok(OpResult::Exists { stat: None }))
        .await;
    assert_eq!(within(get).await.unwrap(), Ok(None));
}

#[tokio::test]
async fn requests_made_while_suspended_go_out_after_the_resume() {
    let fake = Fake::start().await;
    let (client, peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    drop(peer);
    let mut status = client.session_status();
    within(status.wait_for(|s| s.state == SessionState::Suspended))
        .await
        .unwrap();
    let c = client.clone();
    let get = tokio::spawn(async move { c.exists("/x").await });
    let mut peer = within(fake.accept()).await;
    within(peer.hello()).await;
    peer.send(welcome(QUIET_TIMEOUT_MS, 0)).await;
    let r = within(peer.request()).await;
    assert_eq!(r.xid, Xid(1));
    peer.reply(r.xid, Ok(OpResult::Exists { stat: None })).await;
    assert_eq!(within(get).await.unwrap(), Ok(None));
}

#[tokio::test]
async fn no_server_until_the_lease_is_surely_over_means_expired() {
    let fake = Fake::start().await;
    let options = fake.options().session_timeout(Duration::from_millis(200));
    let (client, peer) = connected(&fake, options, 200).await;
    let lease_end = client.session_status().borrow().lease_end;
    let c = client.clone();
    let pending = tokio::spawn(async move { c.get("/x").await });
    drop(peer);
    drop(fake); // every reconnect is refused
    assert_eq!(
        within(pending).await.unwrap(),
        Err(ClientError::SessionExpired)
    );
    let status = *client.session_status().borrow();
    assert_eq!(status.state, SessionState::Expired);
    assert!(tokio::time::Instant::now() >= lease_end + Duration::from_millis(200));
}

#[tokio::test]
async fn a_huge_announced_timeout_does_not_overflow() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), u64::MAX).await;
    let c = client.clone();
    let get = tokio::spawn(async move { c.exists("/x").await });
    let r = within(peer.request()).await;
    peer.reply(r.xid, Ok(OpResult::Exists { stat: None })).await;
    assert_eq!(within(get).await.unwrap(), Ok(None));
    let lease_end = client.session_status().borrow().lease_end;
    assert!(lease_end > tokio::time::Instant::now() + Duration::from_secs(3600));
}

fn lock_stat(czxid: u64, granted: Option<u64>) -> Stat {
    Stat {
        czxid: Zxid(czxid),
        ephemeral_owner: Some(SESSION),
        kind: crate::NodeKind::Ephemeral,
        lock: Some(crate::protocol::LockInfo {
            mode: crate::LockMode::Exclusive,
            delay_ms: 500,
            granted: granted.map(|t| crate::protocol::Grant {
                token: Zxid(t),
                at_ms: 1,
            }),
            freed_at_ms: None,
        }),
        ..Stat::default()
    }
}

fn lock_event(kind: WatchEventKind, path: &str, zxid: u64) -> ServerMessage {
    ServerMessage::Watch(WatchEvent {
        kind,
        path: path.into(),
        zxid: Zxid(zxid),
    })
}

fn created(path: &str, stat: Stat) -> Result<OpResult, ErrorReply> {
    Ok(OpResult::Created {
        path: path.into(),
        stat,
    })
}

fn guarded_delete(path: &str, czxid: u64) -> Op {
    Op::Delete {
        path: path.into(),
        version: None,
        czxid: Some(Zxid(czxid)),
        force: false,
    }
}

#[tokio::test]
async fn an_uncontended_lock_is_one_round_trip_to_take_and_one_to_release() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let lock = crate::Lock::new(&client, "/orders/42").data("worker-7");
    let acquire = tokio::spawn(async move { lock.acquire().await });
    let r = within(peer.request()).await;
    assert_eq!(r.xid, Xid(1));
    let Op::Create(create) = &r.op else {
        panic!("{r:?}")
    };
    assert_eq!(create.path, "/orders/42/lock-");
    assert_eq!(create.data.0, b"worker-7");
    assert_eq!(create.kind, crate::NodeKind::Ephemeral);
    assert!(create.sequential && create.make_parents);
    assert_eq!(
        create.lock,
        Some(crate::LockSpec {
            mode: crate::LockMode::Exclusive,
            delay_ms: None
        })
    );
    let node = "/orders/42/lock-0000000000";
    peer.reply(r.xid, created(node, lock_stat(7, Some(7))))
        .await;
    let guard = within(acquire).await.unwrap().unwrap();
    assert_eq!(guard.token(), Zxid(7));
    assert_eq!(guard.node(), node);
    assert_eq!(guard.grant_events(), 0);
    assert!(!guard.is_lost());

    let release = tokio::spawn(guard.release());
    let r = within(peer.request()).await;
    assert_eq!((r.xid, &r.op), (Xid(2), &guarded_delete(node, 7)));
    peer.reply(r.xid, Ok(OpResult::Deleted)).await;
    within(release).await.unwrap().unwrap();
    // Nothing else went out: the next request is xid 3.
    let c = client.clone();
    let probe = tokio::spawn(async move { c.exists("/x").await });
    assert_eq!(within(peer.request()).await.xid, Xid(3));
    peer.reply(Xid(3), Ok(OpResult::Exists { stat: None }))
        .await;
    assert_eq!(within(probe).await.unwrap(), Ok(None));
}

#[tokio::test]
async fn a_grant_right_behind_the_reply_is_caught_and_a_delete_by_another_is_a_loss() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let lock = crate::Lock::new(&client, "/l");
    let acquire = tokio::spawn(async move { lock.acquire().await });
    let r = within(peer.request()).await;
    let node = "/l/lock-0000000003";
    // The reply and the grant leave the server back to back.
    peer.reply(r.xid, created(node, lock_stat(8, None))).await;
    peer.send(lock_event(WatchEventKind::LockGranted, node, 9))
        .await;
    let guard = within(acquire).await.unwrap().unwrap();
    assert_eq!(guard.token(), Zxid(9));
    assert_eq!(guard.grant_events(), 1);

    let lost = tokio::spawn(guard.lost());
    peer.send(lock_event(WatchEventKind::NodeDeleted, node, 10))
        .await;
    assert_eq!(within(lost).await.unwrap(), crate::LostReason::NodeDeleted);
    assert!(guard.is_lost());
    // A release now finds the node gone.
    let release = tokio::spawn(guard.release());
    let r = within(peer.request()).await;
    assert_eq!(r.op, guarded_delete(node, 8));
    let mut gone = ErrorReply::new(ErrorCode::NoNode, "no node");
    gone.index = None;
    peer.reply(r.xid, Err(gone)).await;
    assert_eq!(
        within(release).await.unwrap().unwrap_err().code(),
        Some(ErrorCode::NoNode)
    );
}

#[tokio::test]
async fn abandoned_waiters_delete_their_nodes() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let lock = crate::Lock::new(&client, "/l");

    // Dropped before the create's reply: the node is deleted once it comes.
    let l = lock.clone();
    let acquire = tokio::spawn(async move { l.acquire().await });
    let r = within(peer.request()).await;
    acquire.abort();
    let _ = acquire.await;
    peer.reply(r.xid, created("/l/lock-0000000000", lock_stat(5, None)))
        .await;
    let r = within(peer.request()).await;
    assert_eq!(r.op, guarded_delete("/l/lock-0000000000", 5));
    peer.reply(r.xid, Ok(OpResult::Deleted)).await;

    // Dropped while waiting for the grant.
    let l = lock.clone();
    let acquire = tokio::spawn(async move { l.acquire().await });
    let r = within(peer.request()).await;
    peer.reply(r.xid, created("/l/lock-0000000001", lock_stat(6, None)))
        .await;
    acquire.abort();
    let _ = acquire.await;
    let r = within(peer.request()).await;
    assert_eq!(r.op, guarded_delete("/l/lock-0000000001", 6));
    peer.reply(r.xid, Ok(OpResult::Deleted)).await;

    // A timeout leaves the queue and says None.
    let l = lock.clone();
    let acquire = tokio::spawn(async move { l.acquire_timeout(Duration::from_millis(100)).await });
    let r = within(peer.request()).await;
    peer.reply(r.xid, created("/l/lock-0000000002", lock_stat(7, None)))
        .await;
    let r = within(peer.request()).await;
    assert_eq!(r.op, guarded_delete("/l/lock-0000000002", 7));
    peer.reply(r.xid, Ok(OpResult::Deleted)).await;
    assert!(within(acquire).await.unwrap().unwrap().is_none());

    // try_acquire: not granted at once, so it leaves at once.
    let l = lock.clone();
    let attempt = tokio::spawn(async move { l.try_acquire().await });
    let r = within(peer.request()).await;
    peer.reply(r.xid, created("/l/lock-0000000003", lock_stat(8, None)))
        .await;
    let r = within(peer.request()).await;
    assert_eq!(r.op, guarded_delete("/l/lock-0000000003", 8));
    peer.reply(r.xid, Ok(OpResult::Deleted)).await;
    assert!(within(attempt).await.unwrap().unwrap().is_none());

    // A dropped guard deletes its node too.
    let l = lock.clone();
    let acquire = tokio::spawn(async move { l.acquire().await });
    let r = within(peer.request()).await;
    peer.reply(r.xid, created("/l/lock-0000000004", lock_stat(9, Some(9))))
        .await;
    drop(within(acquire).await.unwrap().unwrap());
    let r = within(peer.request()).await;
    assert_eq!(r.op, guarded_delete("/l/lock-0000000004", 9));
}

#[tokio::test]
async fn a_deadlock_refusal_reaches_the_caller_with_its_cycle() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let lock = crate::Lock::new(&client, "/y");
    let acquire = tokio::spawn(async move { lock.acquire().await });
    let r = within(peer.request()).await;
    let mut refusal = ErrorReply::new(ErrorCode::Deadlock, "waiting on /y closes a cycle");
    refusal.cycle = vec![
        crate::WaitEdge {
            session: SESSION,
            lock: "/y".into(),
            holder: SessionId(7),
        },
        crate::WaitEdge {
            session: SessionId(7),
            lock: "/x".into(),
            holder: SESSION,
        },
    ];
    peer.reply(r.xid, Err(refusal)).await;
    let err = within(acquire).await.unwrap().unwrap_err();
    let ClientError::Deadlock { cycle, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(cycle.len(), 2);
    assert_eq!(err.code(), Some(ErrorCode::Deadlock));
}

#[tokio::test]
async fn resume_re_registers_lock_nodes_and_hears_what_happened_in_the_gap() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let held = crate::Lock::new(&client, "/a");
    let waiting = crate::Lock::new(&client, "/b");
    let acquire_held = tokio::spawn(async move { held.acquire().await });
    let r = within(peer.request()).await;
    peer.reply(r.xid, created("/a/lock-0000000000", lock_stat(5, Some(5))))
        .await;
    let guard = within(acquire_held).await.unwrap().unwrap();
    let acquire_waiting = tokio::spawn(async move { waiting.acquire().await });
    let r = within(peer.request()).await;
    peer.reply(r.xid, created("/b/lock-0000000001", lock_stat(6, None)))
        .await;
    // The reply is processed before the probe's: the node is followed now.
    let c = client.clone();
    let probe = tokio::spawn(async move { c.exists("/p").await });
    let r = within(peer.request()).await;
    peer.reply(r.xid, Ok(OpResult::Exists { stat: None })).await;
    within(probe).await.unwrap().unwrap();
    let lost = tokio::spawn(guard.lost());

    drop(peer);
    let mut peer = within(fake.accept()).await;
    within(peer.hello()).await;
    peer.send(welcome(QUIET_TIMEOUT_MS, 3)).await;
    let sw = within(peer.request()).await;
    let Op::SetWatches { lock, .. } = &sw.op else {
        panic!("{sw:?}")
    };
    assert_eq!(
        lock,
        &vec![
            "/a/lock-0000000000".to_string(),
            "/b/lock-0000000001".to_string()
        ]
    );
    // In the gap, /b's node was granted and /a's deleted by someone else.
    peer.send(lock_event(
        WatchEventKind::LockGranted,
        "/b/lock-0000000001",
        20,
    ))
    .await;
    peer.send(lock_event(
        WatchEventKind::NodeDeleted,
        "/a/lock-0000000000",
        21,
    ))
    .await;
    peer.reply(sw.xid, Ok(OpResult::Done)).await;
    let second = within(acquire_waiting).await.unwrap().unwrap();
    assert_eq!(second.token(), Zxid(20));
    assert_eq!(within(lost).await.unwrap(), crate::LostReason::NodeDeleted);
}

#[tokio::test]
async fn a_retried_lock_create_asks_whether_it_was_granted_in_the_gap() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let lock = crate::Lock::new(&client, "/l");
    let acquire = tokio::spawn(async move { lock.acquire().await });
    let r = within(peer.request()).await;
    assert_eq!(r.xid, Xid(1));
    drop(peer);
    let mut peer = within(fake.accept()).await;
    within(peer.hello()).await;
    // The server applied the create (xid 1) and granted the node later,
    // while the client was away: its cached reply says "waiting".
    peer.send(welcome(QUIET_TIMEOUT_MS, 1)).await;
    let retried = within(peer.request()).await;
    assert_eq!(retried.xid, Xid(1));
    peer.reply(Xid(1), created("/l/lock-0000000000", lock_stat(5, None)))
        .await;
    let sw = within(peer.request()).await;
    let Op::SetWatches { lock, .. } = &sw.op else {
        panic!("{sw:?}")
    };
    assert_eq!(lock, &vec!["/l/lock-0000000000".to_string()]);
    peer.send(lock_event(
        WatchEventKind::LockGranted,
        "/l/lock-0000000000",
        9,
    ))
    .await;
    peer.reply(sw.xid, Ok(OpResult::Done)).await;
    assert_eq!(within(acquire).await.unwrap().unwrap().token(), Zxid(9));
}

#[tokio::test]
async fn a_hold_that_is_taken_names_its_end() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let c = client.clone();
    let take = tokio::spawn(async move {
        crate::Hold::take(&c, "/holds/ticket-abc", Duration::from_secs(600), "buyer-1").await
    });
    let r = within(peer.request()).await;
    let Op::Create(create) = &r.op else {
        panic!("{r:?}")
    };
    assert_eq!(create.ttl_ms, Some(600_000));
    assert!(create.make_parents && create.lock.is_none());
    assert_eq!(create.kind, crate::NodeKind::Persistent);
    peer.reply(r.xid, Err(ErrorReply::new(ErrorCode::NodeExists, "exists")))
        .await;
    let r = within(peer.request()).await;
    assert!(matches!(r.op, Op::Exists { .. }), "{r:?}");
    let held = Stat {
        czxid: Zxid(4),
        mtime_ms: 1_700_000_000_000,
        ttl_ms: Some(600_000),
        ..Stat::default()
    };
    peer.reply(r.xid, Ok(OpResult::Exists { stat: Some(held) }))
        .await;
    let err = within(take).await.unwrap().unwrap_err();
    let ClientError::Held { path, until, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(path, "/holds/ticket-abc");
    assert_eq!(
        *until,
        std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_600_000)
    );
    assert!(
        err.to_string()
            .contains("held until 2023-11-14T22:23:20.000Z"),
        "{err}"
    );
}

/// A listing in pages reads on from the last name, and starts over when
/// the children changed between pages (the node's cversion moved), so
/// that the list it returns is one moment's.
#[tokio::test]
async fn a_listing_reads_every_page_and_starts_over_when_the_children_change() {
    let fake = Fake::start().await;
    let (client, mut peer) = connected(&fake, fake.options(), QUIET_TIMEOUT_MS).await;
    let listing = tokio::spawn(async move { client.children("/q").await });
    let page = |names: &[&str], cversion: u64, more: bool| OpResult::Children {
        children: names.iter().map(|n| n.to_string()).collect(),
        stat: Stat {
            cversion,
            ..stat(0)
        },
        more,
    };
    let mut asked = Vec::new();
    for (names, cversion, more) in [
        (&["a", "b"][..], 1, true),
        // Changed meanwhile: the client starts over.
        (&["c"][..], 2, false),
        (&["a", "b"][..], 2, true),
        (&["c", "d"][..], 2, false),
    ] {
        let r = within(peer.request()).await;
        let Op::Children { after, limit, .. } = &r.op else {
            panic!("expected a listing, got {:?}", r.op);
        };
        assert_eq!(*limit, None);
        asked.push(after.clone());
        peer.reply(r.xid, Ok(page(names, cversion, more))).await;
    }
    let (children, stat) = within(listing).await.unwrap().unwrap();
    assert_eq!(children, ["a", "b", "c", "d"]);
    assert_eq!(stat.cversion, 2);
    assert_eq!(
        asked,
        [None, Some("b".to_string()), None, Some("b".to_string())]
    );
}

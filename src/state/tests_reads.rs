//! Unit tests of reads answered without a command (`Coordinator::read`)
//! and of `Command::Heard`, which carries what those reads and heartbeats
//! said about liveness into the log.

use latchkey_client::protocol::{ErrorCode, Op, OpResult, WatchEventKind, Xid};

use super::tests::{get, result, set, Harness};
use super::{Command, Heard, Outcome};

fn read(h: &mut Harness, session: latchkey_client::protocol::SessionId, op: Op) -> Outcome {
    h.c.read(session, 0, Xid(1_000), op).outcome
}

#[test]
fn a_read_moves_no_deadline_and_heard_does() {
    let mut h = Harness::new();
    // Timeout 10 s from t=0.
    let s = h.open();
    h.create(s, "/a");
    h.now_ms = 9_000;
    let Outcome::Reply(reply) = read(&mut h, s, Op::Ping { ack: Xid(0) }) else {
        panic!("a ping is answered");
    };
    assert_eq!(reply.result, Ok(OpResult::Pong));
    // Without a Heard, the ping did not count: the session expires on time.
    let mut twin = Harness::new();
    let t = twin.open();
    twin.create(t, "/a");
    assert!(twin.tick(10_001).ended.iter().any(|(e, _)| *e == t));
    let out = h.tick(10_001);
    assert!(
        out.ended.iter().any(|(e, _)| *e == s),
        "a read must not move the deadline"
    );

    let mut h = Harness::new();
    let s = h.open();
    h.now_ms = 9_000;
    h.apply_checked(Command::Heard(vec![Heard {
        session: s,
        ack: Xid(0),
    }]));
    assert!(h.tick(10_001).ended.is_empty(), "heard at 9 s, due at 19 s");
    assert!(h.tick(19_001).ended.iter().any(|(e, _)| *e == s));
}

#[test]
fn a_read_changes_no_zxid_and_refuses_writes() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/a");
    let zxid = h.c.zxid();
    let Outcome::Reply(reply) = read(&mut h, s, get("/a", false)) else {
        panic!("a get is answered");
    };
    assert!(matches!(reply.result, Ok(OpResult::Data { .. })));
    assert_eq!(reply.zxid, zxid);
    let Outcome::Reply(reply) = read(&mut h, s, set("/a", "x", None)) else {
        panic!("a write is answered");
    };
    assert_eq!(
        reply.result.map_err(|e| e.code()),
        Err(ErrorCode::Malformed)
    );
    assert_eq!(h.c.zxid(), zxid, "a write sent as a read changed the state");
}

#[test]
fn a_watch_set_by_a_read_fires_on_a_later_write() {
    let mut h = Harness::new();
    let s = h.open();
    let t = h.open();
    h.create(s, "/a");
    read(&mut h, t, get("/a", true));
    let out = h.send(s, set("/a", "x", None));
    assert!(out
        .events
        .iter()
        .any(|(to, e)| *to == t && e.kind == WatchEventKind::NodeDataChanged));
}

#[test]
fn heard_forgets_acknowledged_replies() {
    let mut h = Harness::new();
    let s = h.open();
    h.create(s, "/a");
    // Retried before the ack: the cached reply.
    assert!(result(&h.send_xid(s, Xid(1), super::tests::create(super::tests::mk("/a")))).is_ok());
    h.apply_checked(Command::Heard(vec![Heard {
        session: s,
        ack: Xid(1),
    }]));
    let retried = h.send_xid(s, Xid(1), super::tests::create(super::tests::mk("/a")));
    assert_eq!(
        result(&retried).clone().map_err(|e| e.code),
        Err(ErrorCode::RetryUnknown)
    );
}

#[test]
fn reads_of_a_left_attachment_or_an_ended_session_are_refused() {
    let mut h = Harness::new();
    let s = h.open_with(10_000, "k").expect("open").session;
    h.resume(s, "k", 0).expect("resume");
    // Attachment 0 was left at the resume.
    assert_eq!(read(&mut h, s, get("/", false)), Outcome::Stale);
    h.send(s, Op::CloseSession);
    let Outcome::Reply(reply) = h.c.read(s, 1, Xid(9), get("/", false)).outcome else {
        panic!("answered");
    };
    assert_eq!(
        reply.result.map_err(|e| e.code()),
        Err(ErrorCode::SessionExpired)
    );
    // Heard of an ended session changes nothing.
    h.apply_checked(Command::Heard(vec![Heard {
        session: s,
        ack: Xid(0),
    }]));
}

//! Fuzzing the decoders with proptest: arbitrary and near-miss bytes through
//! the frame codec, the JSON messages, `validate_path` and `Coordinator::apply`.
//!
//! cargo-fuzz needs a nightly toolchain; these properties run on stable in
//! `cargo test`. The default case counts keep this file to a few seconds;
//! `LATCHKEY_FUZZ_CASES=100000 cargo test --release --test fuzz` runs longer.
//! A shrunk failure goes into `tests/fuzz_corpus/` as a file, where
//! `corpus_inputs_keep_the_properties` replays it on every run.

use std::path::Path;

use bytes::{BufMut, BytesMut};
use latchkey::state::{Command, Config, Coordinator, Outcome};
use latchkey_client::protocol::{
    self, limits, Create, Data, Hello, LockMode, LockSpec, MultiOp, NodeKind, Op, Request, Resume,
    Secret, ServerMessage, SessionId, Xid, Zxid,
};
use proptest::prelude::*;
use serde::Deserialize;
use tokio_util::codec::Decoder;

/// A small frame limit, so that over-limit lengths are cheap to generate.
const FRAME_BYTES_MAX: usize = 1024;
const HEAD_BYTES: usize = 4;

/// Cases per property: `LATCHKEY_FUZZ_CASES`, or `default` (sized so the
/// whole file runs in a few seconds on two cores in a debug build).
fn config(default: u32) -> ProptestConfig {
    let cases = match std::env::var("LATCHKEY_FUZZ_CASES") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("LATCHKEY_FUZZ_CASES={text:?} is not a u32")),
        Err(_) => default,
    };
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// The frame codec, against a model of the wire format.

/// What decoding a byte stream must give: the complete frames in order, then
/// either an error (a length over the limit) or the bytes of an unfinished
/// frame.
#[derive(Debug, PartialEq, Eq)]
struct StreamModel {
    frames: Vec<Vec<u8>>,
    error: bool,
    partial: bool,
}

fn model(stream: &[u8], frame_bytes_max: usize) -> StreamModel {
    let mut frames = Vec::new();
    let mut rest = stream;
    loop {
        let Some((head, body)) = rest.split_first_chunk::<HEAD_BYTES>() else {
            return StreamModel {
                frames,
                error: false,
                partial: !rest.is_empty(),
            };
        };
        let len = usize::try_from(u32::from_be_bytes(*head)).expect("u32 fits usize");
        if len > frame_bytes_max {
            return StreamModel {
                frames,
                error: true,
                partial: false,
            };
        }
        if body.len() < len {
            return StreamModel {
                frames,
                error: false,
                partial: true,
            };
        }
        frames.push(body[..len].to_vec());
        rest = &body[len..];
    }
}

/// Feeds `stream` to the codec in chunks of the given sizes (cycled), as a
/// socket would, and checks it against the model. Returns the frames.
fn check_stream(stream: &[u8], chunk_sizes: &[usize], frame_bytes_max: usize) -> Vec<Vec<u8>> {
    let mut codec = protocol::codec(frame_bytes_max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut error = false;
    let mut fed = 0usize;
    let mut sizes = chunk_sizes.iter().copied().filter(|&n| n > 0).cycle();
    'feed: while fed < stream.len() {
        let n = sizes.next().unwrap_or(stream.len()).min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            let result = codec.decode(&mut buf);
            // The codec may reserve room for the frame it announced, but only
            // up to the limit: a huge length header must cost nothing. BytesMut
            // at most doubles when it grows, hence the factor 2.
            let bound = 2 * (frame_bytes_max + HEAD_BYTES + fed);
            assert!(
                buf.capacity() <= bound,
                "buffer capacity {} after {fed} bytes fed; bound {bound}",
                buf.capacity()
            );
            match result {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= frame_bytes_max, "frame over the limit");
                    frames.push(frame.to_vec());
                }
                Ok(None) => break,
                Err(_) => {
                    error = true;
                    break 'feed;
                }
            }
        }
    }
    let partial = !error && !buf.is_empty();
    assert_eq!(
        StreamModel {
            frames: frames.clone(),
            error,
            partial
        },
        model(stream, frame_bytes_max),
        "stream {:?}",
        &stream[..stream.len().min(64)]
    );
    if !error {
        // A clean EOF is told apart from one in the middle of a frame.
        let eof = codec.decode_eof(&mut buf);
        if partial {
            assert!(eof.is_err(), "EOF mid-frame must be an error: {eof:?}");
        } else {
            assert!(matches!(eof, Ok(None)), "clean EOF: {eof:?}");
        }
    }
    frames
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAD_BYTES + body.len());
    out.put_u32(u32::try_from(body.len()).expect("test frames are small"));
    out.extend_from_slice(body);
    out
}

/// One piece of a near-miss stream.
#[derive(Clone, Debug)]
enum Piece {
    /// A well-formed frame within the limit.
    Frame(Vec<u8>),
    /// A length header over the limit, then random bytes.
    HugeHead(u32, Vec<u8>),
    /// Bytes with no structure.
    Noise(Vec<u8>),
}

fn arb_piece() -> impl Strategy<Value = Piece> {
    let max = u32::try_from(FRAME_BYTES_MAX).expect("small");
    prop_oneof![
        6 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Piece::Frame),
        1 => prop::collection::vec(any::<u8>(), FRAME_BYTES_MAX - 8..=FRAME_BYTES_MAX)
            .prop_map(Piece::Frame),
        1 => (
            prop_oneof![Just(max + 1), max + 1..=u32::MAX, Just(u32::MAX)],
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(n, rest)| Piece::HugeHead(n, rest)),
        1 => prop::collection::vec(any::<u8>(), 0..16).prop_map(Piece::Noise),
    ]
}

fn concat(pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Frame(body) => out.extend(frame(body)),
            Piece::HugeHead(n, rest) => {
                out.put_u32(*n);
                out.extend_from_slice(rest);
            }
            Piece::Noise(bytes) => out.extend_from_slice(bytes),
        }
    }
    out
}

fn arb_chunks() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![1usize..8, 1usize..300], 1..16)
}

// ---------------------------------------------------------------------------
// The JSON messages.

/// The server's fallback when a frame is not a `Request`: it reads only the
/// xid (a copy of the private `server::XidOnly`).
#[derive(Deserialize)]
struct XidOnly {
    #[allow(dead_code)]
    xid: Xid,
}

/// Parses `body` as every message either side decodes; none may panic, and
/// whatever parses must survive a round trip. Returns the request, if any.
fn check_body(body: &[u8]) -> Option<Request> {
    if let Ok(hello) = serde_json::from_slice::<Hello>(body) {
        let back: Hello = serde_json::from_slice(&protocol::encode(&hello)).expect("re-parse");
        assert_eq!(back, hello);
    }
    if let Ok(message) = serde_json::from_slice::<ServerMessage>(body) {
        let back: ServerMessage =
            serde_json::from_slice(&protocol::encode(&message)).expect("re-parse");
        assert_eq!(back, message);
    }
    let _ = serde_json::from_slice::<XidOnly>(body);
    let request = serde_json::from_slice::<Request>(body).ok()?;
    let back: Request = serde_json::from_slice(&protocol::encode(&request)).expect("re-parse");
    assert_eq!(back, request);
    Some(request)
}

const PATHS: &[&str] = &[
    "/", "/a", "/a/b", "/a/b/c", "/l", "/l/n-", "/q", "/q/w-", "/x/y/z", "", "a", "/a/", "/a//b",
    "/a/./b", "/a\0b", "/\u{7f}",
];

fn arb_path() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(PATHS).prop_map(String::from),
        1 => "[/a.\\x00]{0,8}",
    ]
}

fn arb_opt_u64() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![
        Just(None),
        (0u64..5).prop_map(Some),
        Just(Some(u64::MAX)),
        any::<u64>().prop_map(Some),
    ]
}

fn arb_create() -> impl Strategy<Value = Create> {
    let kind = prop::sample::select(
        &[
            NodeKind::Persistent,
            NodeKind::Ephemeral,
            NodeKind::Container,
        ][..],
    );
    let mode = prop_oneof![
        Just(LockMode::Exclusive),
        Just(LockMode::Shared),
        prop_oneof![0u32..4, Just(u32::MAX)].prop_map(|permits| LockMode::Semaphore { permits }),
    ];
    let lock = prop::option::of((mode, arb_opt_u64()))
        .prop_map(|l| l.map(|(mode, delay_ms)| LockSpec { mode, delay_ms }));
    (
        arb_path(),
        prop::collection::vec(any::<u8>(), 0..24),
        kind,
        any::<bool>(),
        arb_opt_u64(),
        any::<bool>(),
        lock,
    )
        .prop_map(
            |(path, data, kind, sequential, ttl_ms, make_parents, lock)| Create {
                path,
                data: Data(data),
                kind,
                sequential,
                ttl_ms,
                make_parents,
                lock,
            },
        )
}

fn arb_czxid() -> impl Strategy<Value = Option<Zxid>> {
    arb_opt_u64().prop_map(|z| z.map(Zxid))
}

fn arb_multi_op() -> impl Strategy<Value = MultiOp> {
    prop_oneof![
        (arb_path(), arb_opt_u64(), arb_czxid()).prop_map(|(path, version, czxid)| {
            MultiOp::Check {
                path,
                version,
                czxid,
            }
        }),
        arb_create().prop_map(MultiOp::Create),
        (arb_path(), arb_opt_u64()).prop_map(|(path, version)| MultiOp::Set {
            path,
            data: Data::from("m"),
            version,
            czxid: None
        }),
        (arb_path(), arb_opt_u64(), arb_czxid()).prop_map(|(path, version, czxid)| {
            MultiOp::Delete {
                path,
                version,
                czxid,
            }
        }),
        (arb_path(), arb_opt_u64(), arb_czxid()).prop_map(|(path, ttl_ms, czxid)| {
            MultiOp::Touch {
                path,
                ttl_ms,
                czxid,
            }
        }),
    ]
}

fn arb_op() -> impl Strategy<Value = Op> {
    let paths = || prop::collection::vec(arb_path(), 0..4);
    prop_oneof![
        4 => arb_create().prop_map(Op::Create),
        2 => (arb_path(), arb_opt_u64(), arb_czxid())
            .prop_map(|(path, version, czxid)| Op::Delete { path, version, czxid, force: false }),
        1 => (arb_path(), arb_opt_u64(), arb_czxid())
            .prop_map(|(path, ttl_ms, czxid)| Op::Touch { path, ttl_ms, czxid }),
        1 => (arb_path(), arb_opt_u64())
            .prop_map(|(path, version)| Op::Set { path, data: Data::from("s"), version, czxid: None }),
        1 => (arb_path(), any::<bool>()).prop_map(|(path, watch)| Op::Get { path, watch }),
        1 => (arb_path(), any::<bool>()).prop_map(|(path, watch)| Op::Exists { path, watch }),
        1 => (arb_path(), any::<bool>()).prop_map(|(path, watch)| Op::Children { path, watch, after: None, limit: None }),
        2 => prop::collection::vec(arb_multi_op(), 0..5).prop_map(|ops| Op::Multi { ops }),
        1 => any::<u64>().prop_map(|ack| Op::Ping { ack: Xid(ack) }),
        1 => (arb_opt_u64(), paths(), paths(), paths(), paths()).prop_map(
            |(last_zxid, data, exist, child, lock)| Op::SetWatches {
                last_zxid: Zxid(last_zxid.unwrap_or(0)),
                data,
                exist,
                child,
                lock,
            }
        ),
        1 => Just(Op::CloseSession),
    ]
}

/// A valid message as JSON: a request, a hello, or a server message.
fn arb_valid_json() -> impl Strategy<Value = serde_json::Value> {
    let request = (0u64..64, arb_op())
        .prop_map(|(xid, op)| serde_json::to_value(Request { xid: Xid(xid), op }).expect("json"));
    let hello = (any::<u32>(), any::<u64>(), any::<bool>()).prop_map(|(v, t, resume)| {
        serde_json::to_value(Hello {
            protocol_version: v,
            session_timeout_ms: t,
            resume: resume.then(|| Resume {
                session_id: SessionId(t),
                secret: Secret("00ff".into()),
                last_xid_received: Xid(3),
            }),
        })
        .expect("json")
    });
    prop_oneof![8 => request, 1 => hello]
}

/// Values put in place of a field: wrong types, out-of-range numbers,
/// strange strings, deep nesting.
fn arb_replacement() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{json, Value};
    prop_oneof![
        Just(Value::Null),
        Just(json!(true)),
        Just(json!(-1)),
        Just(json!(0.5)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!("")),
        Just(json!("/")),
        Just(json!("/a\u{0}b")),
        Just(json!("!!!")),
        Just(json!("x".repeat(2000))),
        Just(json!([])),
        Just(json!({})),
        Just(json!({"semaphore": {"permits": 0}})),
        Just(json!({"unknown_op": {}})),
        (1usize..300).prop_map(|depth| {
            let mut v = json!(1);
            for _ in 0..depth {
                v = json!([v]);
            }
            v
        }),
        any::<String>().prop_map(Value::String),
        any::<i64>().prop_map(|n| json!(n)),
    ]
}

/// A structured mutation of a valid message.
#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the n-th node of the JSON tree (pre-order) with a value.
    Replace(usize, serde_json::Value),
    /// Drop the n-th object key found.
    DropKey(usize),
    /// Add an unknown key to the n-th object.
    AddKey(usize),
    /// Insert text at a byte offset (fraction of the length, in 1/256ths).
    Splice(u8, &'static str),
    /// Cut the text at a fraction of its length.
    Truncate(u8),
    /// Flip a byte.
    Flip(u8, u8),
}

const SPLICES: &[&str] = &[
    "18446744073709551616",
    "99999999999999999999999999",
    "-1",
    "1e400",
    "0.0",
    "\"\\ud800\"",
    "\"\\u0000\"",
    "[[[[[[[[[[[[[[[[[[[[",
    "}",
    ",",
    "null",
    "\"",
    "\\",
    "\u{0}",
    "\u{fffd}",
];

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), arb_replacement()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        1 => any::<usize>().prop_map(Mutation::DropKey),
        1 => any::<usize>().prop_map(Mutation::AddKey),
        2 => (any::<u8>(), prop::sample::select(SPLICES)).prop_map(|(at, s)| Mutation::Splice(at, s)),
        1 => any::<u8>().prop_map(Mutation::Truncate),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(at, x)| Mutation::Flip(at, x)),
    ]
}

/// Visits every node of a JSON tree in pre-order; `f` returns true to stop.
fn visit(value: &mut serde_json::Value, f: &mut dyn FnMut(&mut serde_json::Value) -> bool) -> bool {
    if f(value) {
        return true;
    }
    match value {
        serde_json::Value::Array(items) => items.iter_mut().any(|v| visit(v, f)),
        serde_json::Value::Object(map) => map.values_mut().any(|v| visit(v, f)),
        _ => false,
    }
}

fn count_nodes(value: &mut serde_json::Value, objects_only: bool) -> usize {
    let mut n = 0;
    visit(value, &mut |v| {
        if !objects_only || v.is_object() {
            n += 1;
        }
        false
    });
    n
}

fn at(fraction: u8, len: usize) -> usize {
    len * usize::from(fraction) / 256
}

fn mutate(mut value: serde_json::Value, mutations: &[Mutation]) -> Vec<u8> {
    let mut text_mutations = Vec::new();
    for m in mutations {
        match m {
            Mutation::Replace(i, new) => {
                let mut k = i % count_nodes(&mut value, false);
                visit(&mut value, &mut |v| {
                    if k == 0 {
                        *v = new.clone();
                        return true;
                    }
                    k -= 1;
                    false
                });
            }
            Mutation::DropKey(i) | Mutation::AddKey(i) => {
                let objects = count_nodes(&mut value, true);
                if objects == 0 {
                    continue;
                }
                let mut k = i % objects;
                let drop = matches!(m, Mutation::DropKey(_));
                visit(&mut value, &mut |v| {
                    let Some(map) = v.as_object_mut() else {
                        return false;
                    };
                    if k > 0 {
                        k -= 1;
                        return false;
                    }
                    if drop {
                        let key = map.keys().nth(*i % map.len().max(1)).cloned();
                        if let Some(key) = key {
                            map.remove(&key);
                        }
                    } else {
                        map.insert("surprise".into(), serde_json::json!(1));
                    }
                    true
                });
            }
            other => text_mutations.push(other),
        }
    }
    let mut text = serde_json::to_vec(&value).expect("a Value serializes");
    for m in text_mutations {
        match m {
            Mutation::Splice(fraction, s) => {
                let i = at(*fraction, text.len());
                text.splice(i..i, s.bytes());
            }
            Mutation::Truncate(fraction) => text.truncate(at(*fraction, text.len())),
            Mutation::Flip(fraction, x) => {
                let i = at(*fraction, text.len());
                if let Some(b) = text.get_mut(i) {
                    *b ^= x;
                }
            }
            _ => unreachable!("tree mutations are applied above"),
        }
    }
    text
}

// ---------------------------------------------------------------------------
// Paths.

/// An independent statement of "canonical", to compare `validate_path` with.
fn canonical(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    path.len() <= limits::PATH_BYTES_MAX
        && segments.len() <= limits::PATH_DEPTH_MAX
        && segments.iter().all(|s| {
            !s.is_empty()
                && *s != "."
                && *s != ".."
                && s.len() <= limits::NAME_BYTES_MAX
                && !s.chars().any(char::is_control)
        })
}

fn check_path(path: &str) {
    match protocol::validate_path(path) {
        Ok(()) => {
            assert!(path.starts_with('/'), "{path:?}");
            assert!(!path.contains("//"), "{path:?}");
            assert!(path == "/" || !path.ends_with('/'), "{path:?}");
            assert!(!path.chars().any(char::is_control), "{path:?}");
            assert!(path.len() <= limits::PATH_BYTES_MAX, "{path:?}");
            assert!(canonical(path), "accepted a non-canonical path {path:?}");
        }
        Err(e) => {
            assert!(!e.fault.to_string().is_empty(), "{path:?}");
            assert!(e.path.chars().count() <= 80, "{path:?}");
            assert!(!canonical(path), "rejected a canonical path {path:?}: {e}");
        }
    }
}

fn arb_path_text() -> impl Strategy<Value = String> {
    // Mostly clean segments and few of them, so that one flaw decides.
    let segment = prop_oneof![
        12 => "[a.é-]{1,4}",
        2 => "[a.é\\x00\\n\\x7f\\u{85}-]{0,4}",
        1 => Just(".".to_string()),
        1 => Just("..".to_string()),
        1 => (limits::NAME_BYTES_MAX - 1..=limits::NAME_BYTES_MAX + 1).prop_map(|n| "n".repeat(n)),
    ];
    let count = prop_oneof![
        8 => 0..6usize,
        1 => limits::PATH_DEPTH_MAX - 1..=limits::PATH_DEPTH_MAX + 2,
    ];
    prop_oneof![
        any::<String>(),
        "[/a.\\x00\\n é]{0,16}",
        (
            count.prop_flat_map(move |n| prop::collection::vec(segment.clone(), n)),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(segments, lead, trail)| {
                let mut p = segments.join("/");
                if lead {
                    p.insert(0, '/');
                }
                if trail {
                    p.push('/');
                }
                p
            }),
    ]
}

// ---------------------------------------------------------------------------
// Applying parsed requests.

fn small_config() -> Config {
    Config {
        session_timeout_ms_min: 100,
        session_timeout_ms_max: 2_000,
        data_bytes_max: 16,
        sessions_max: 4,
        nodes_max: 30,
        tree_bytes_max: 600,
        children_per_node_max: 5,
        children_page_max: 3,
        watches_per_session_max: 4,
        watches_max: 6,
        reply_cache_bytes_max: Config::default().reply_cache_bytes_max,
        lock_delay_ms_default: 200,
        lock_delay_ms_max: 400,
        hold_ttl_ms_max: 5_000,
        waits_per_session_max: 3,
        // Below what a session owns here, so that ends span ticks.
        step_deletes_max: 2,
    }
}

/// Two coordinators fed the same commands: they must agree (determinism)
/// and keep their invariants after every step.
struct Pair {
    a: Coordinator,
    b: Coordinator,
    sessions: Vec<SessionId>,
    now_ms: u64,
}

impl Pair {
    fn new() -> Pair {
        let mut pair = Pair {
            a: Coordinator::new(small_config(), Zxid(1_000)),
            b: Coordinator::new(small_config(), Zxid(1_000)),
            sessions: Vec::new(),
            now_ms: 1_000_000,
        };
        for i in 0..2 {
            let Outcome::Session(Ok(grant)) = pair.apply(Command::OpenSession {
                timeout_ms: 1_000,
                secret: Secret(format!("secret-{i}")),
            }) else {
                panic!("a session opens in an empty coordinator");
            };
            pair.sessions.push(grant.session);
        }
        pair
    }

    fn apply(&mut self, command: Command) -> Outcome {
        let out_a = self.a.apply(command.clone(), self.now_ms);
        let out_b = self.b.apply(command.clone(), self.now_ms);
        assert_eq!(out_a, out_b, "two coordinators disagree on {command:?}");
        self.a
            .check_invariants()
            .unwrap_or_else(|e| panic!("invariant broken after {command:?}: {e}"));
        out_a.outcome
    }

    fn request(&mut self, session_index: usize, request: Request) {
        let session = self.sessions[session_index % self.sessions.len()];
        let xid = request.xid;
        // These sessions are never resumed: their first attachment.
        let outcome = self.apply(Command::Request {
            session,
            attach: 0,
            xid,
            op: request.op,
        });
        let Outcome::Reply(reply) = outcome else {
            panic!("a request is answered with a reply: {outcome:?}");
        };
        assert_eq!(reply.xid, xid);
        // What the server sends, the client decodes.
        let message = ServerMessage::Reply(reply.into_wire());
        let back: ServerMessage =
            serde_json::from_slice(&protocol::encode(&message)).expect("a reply decodes");
        assert_eq!(back, message);
    }

    fn tick(&mut self, advance_ms: u64) {
        self.now_ms += advance_ms;
        let outcome = self.apply(Command::Tick);
        assert_eq!(outcome, Outcome::Ticked);
    }
}

/// Runs every check on one corpus input: as a stream of frames, as a frame
/// body, as a path, and (if it parses) as a request to a coordinator.
fn check_input(bytes: &[u8]) {
    for frame in check_stream(bytes, &[1, 3, 7, 64], FRAME_BYTES_MAX) {
        check_body(&frame);
    }
    check_stream(&frame(bytes), &[5], bytes.len().max(1));
    if let Some(request) = check_body(bytes) {
        let mut pair = Pair::new();
        pair.request(0, request);
        pair.tick(5_000);
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        check_path(text);
    }
}

// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn codec_on_arbitrary_bytes_matches_the_model(
        stream in prop::collection::vec(any::<u8>(), 0..2048),
        chunks in arb_chunks(),
    ) {
        check_stream(&stream, &chunks, FRAME_BYTES_MAX);
    }

    #[test]
    fn codec_on_near_miss_streams_matches_the_model(
        pieces in prop::collection::vec(arb_piece(), 0..8),
        chunks in arb_chunks(),
    ) {
        let stream = concat(&pieces);
        let frames = check_stream(&stream, &chunks, FRAME_BYTES_MAX);
        // Every well-formed frame before the first bad piece comes out whole.
        for (piece, got) in pieces.iter().zip(&frames) {
            match piece {
                Piece::Frame(body) => prop_assert_eq!(body, got),
                _ => break,
            }
        }
    }

    #[test]
    fn a_length_over_the_limit_is_an_error(
        len in (u32::try_from(FRAME_BYTES_MAX).expect("small") + 1)..=u32::MAX,
        rest in prop::collection::vec(any::<u8>(), 0..64),
        chunks in arb_chunks(),
    ) {
        let mut stream = len.to_be_bytes().to_vec();
        stream.extend(rest);
        let model = model(&stream, FRAME_BYTES_MAX);
        prop_assert!(model.error && model.frames.is_empty());
        check_stream(&stream, &chunks, FRAME_BYTES_MAX);
    }

    #[test]
    fn parsing_arbitrary_bytes_never_panics(
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        check_body(&body);
        if let Ok(text) = std::str::from_utf8(&body) {
            check_path(text);
        }
    }

    #[test]
    fn parsing_mutated_messages_never_panics(
        value in arb_valid_json(),
        mutations in prop::collection::vec(arb_mutation(), 0..4),
    ) {
        let body = mutate(value, &mutations);
        check_body(&body);
        check_stream(&frame(&body), &[17], FRAME_BYTES_MAX.max(body.len()));
    }

    #[test]
    fn validate_path_accepts_exactly_the_canonical_paths(path in arb_path_text()) {
        check_path(&path);
    }

    #[test]
    fn parsed_requests_apply_without_breaking_invariants(
        steps in prop::collection::vec(
            (
                arb_valid_json(),
                prop::collection::vec(arb_mutation(), 0..2),
                0usize..2,
                prop::option::weighted(0.2, 0u64..3_000),
            ),
            1..24,
        ),
    ) {
        let mut pair = Pair::new();
        for (value, mutations, session, tick) in steps {
            let body = mutate(value, &mutations);
            if let Some(request) = check_body(&body) {
                pair.request(session, request);
            }
            if let Some(advance_ms) = tick {
                pair.tick(advance_ms);
            }
        }
    }
}

#[test]
fn corpus_inputs_keep_the_properties() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus");
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    entries.sort();
    assert!(entries.len() >= 10, "the corpus lost files: {entries:?}");
    for path in entries {
        let bytes = std::fs::read(&path).expect("read a corpus file");
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        check_input(&bytes);
        // Files named valid-* stay valid messages, so the corpus keeps
        // reaching past the parser as the protocol changes.
        if name.starts_with("valid-") {
            let parses = serde_json::from_slice::<Request>(&bytes).is_ok()
                || serde_json::from_slice::<Hello>(&bytes).is_ok();
            assert!(parses, "{name} no longer parses");
        }
        if name.starts_with("frame-over-limit") {
            assert!(model(&bytes, FRAME_BYTES_MAX).error, "{name}");
        }
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let depth = 100_000;
    let mut body = "[".repeat(depth);
    body.push_str(&"]".repeat(depth));
    assert!(check_body(body.as_bytes()).is_none());
    let nested_op = format!(
        "{{\"xid\":1,\"op\":{{\"multi\":{{\"ops\":{}1{}}}}}}}",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    assert!(serde_json::from_slice::<Request>(nested_op.as_bytes()).is_err());
}

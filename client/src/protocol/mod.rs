//! The wire protocol: every message, the frame codec, error codes and limits.
//!
//! This module is the one contract between the coordinator and its clients.
//! A connection carries length-delimited frames (a 4-byte big-endian length,
//! then that many bytes) of JSON.
//!
//! 1. The client sends one [`Hello`]; the server answers with
//!    [`ServerMessage::Welcome`] or [`ServerMessage::Fatal`] and closes.
//! 2. Then the client sends [`Request`]s, each with a per-session request id
//!    ([`Xid`]) that strictly increases. Many may be in flight; the server
//!    answers each with one [`ServerMessage::Reply`], in request order.
//! 3. The server pushes [`ServerMessage::Watch`] events and
//!    [`ServerMessage::Session`] events on the same stream. A watch event is
//!    always sent before any reply that reflects the change it reports.
//!
//! A reply lost with a broken connection is recovered by resending the request
//! with the same xid after resuming the session: the server answers a retried
//! write from its per-session reply cache instead of applying it twice.

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

/// The protocol version this build speaks. A peer with another version is
/// refused during the handshake with [`ErrorCode::ProtocolVersion`].
///
/// Version 2: a `children` listing comes in pages of at most the server's
/// page size (`more` says another page follows); a version 1 client would
/// take the first page for the whole list, so it is refused instead.
pub const PROTOCOL_VERSION: u32 = 2;

/// Wire limits shared by both sides. Server tunables live in the server's
/// `Config`; these are the values a client can rely on.
pub mod limits {
    /// Default bound on a client-to-server frame. Large enough for a node of
    /// [`DATA_BYTES_MAX`] bytes after base64 (4/3) plus the request around it.
    pub const FRAME_BYTES_MAX: usize = 2 * 1024 * 1024;
    /// Bound on a server-to-client frame. Replies can exceed requests (a
    /// children listing of [`CHILDREN_PER_NODE_MAX`] names of
    /// [`NAME_BYTES_MAX`] bytes is about 26 MB), so the client decodes up to
    /// this.
    pub const REPLY_FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
    /// Default bound on a node's data, as in ZooKeeper (1 MiB): a coordinator
    /// holds small facts, not files.
    pub const DATA_BYTES_MAX: usize = 1024 * 1024;
    /// Bound on a path's length in bytes.
    pub const PATH_BYTES_MAX: usize = 1024;
    /// Bound on a path's number of segments.
    pub const PATH_DEPTH_MAX: usize = 64;
    /// Bound on one segment (node name) in bytes.
    pub const NAME_BYTES_MAX: usize = 255;
    /// Bound on the children of one node, so that a listing fits a frame.
    pub const CHILDREN_PER_NODE_MAX: usize = 100_000;
    /// Bound on the operations in one multi.
    pub const MULTI_OPS_MAX: usize = 1024;
    /// Bound on the watches one session may hold.
    pub const WATCHES_PER_SESSION_MAX: usize = 65_536;
    /// Bound on the paths in one `set_watches` request (a resuming client
    /// sends its watches in batches of at most this many).
    pub const SET_WATCHES_PATHS_MAX: usize = 1024;
    /// Bound on a client's unanswered requests per session. The server keeps
    /// the replies of a session's last `INFLIGHT_MAX` writes so that any of
    /// them can be retried; a client must not have more in flight.
    pub const INFLIGHT_MAX: usize = 128;
    /// Digits of the counter appended to sequential node names; names with
    /// the same prefix then sort in creation order.
    pub const SEQUENCE_DIGITS: usize = 10;
    /// The largest sequence number that fits [`SEQUENCE_DIGITS`] digits.
    pub const SEQUENCE_MAX: u64 = 9_999_999_999;
}

/// A session's id. Unique across server restarts: it is the zxid of the
/// write that opened the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:x}", self.0)
    }
}

/// The coordinator's write counter. Every write gets the next zxid; a node's
/// creation zxid is its fencing token. Zxids strictly increase, also across a
/// server restart (the counter starts from the server's start time in
/// microseconds since the Unix epoch).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Zxid(pub u64);

impl fmt::Display for Zxid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A request id, chosen by the client, strictly increasing within a session
/// (not per connection: a resumed session continues the sequence).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Xid(pub u64);

/// The secret that proves a client owns a session when it resumes it.
/// Its `Debug` output is redacted so that it never reaches a log, and two
/// secrets are compared without an early exit, so the time a refusal takes
/// does not tell a guesser how much of its guess was right.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        // The length is no secret: the server's secrets are all 32 hex digits.
        let differing = a
            .iter()
            .zip(b)
            .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
        a.len() == b.len() && differing == 0
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A node's data: bytes, carried on the wire as a base64 string.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Data(pub Vec<u8>);

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) if text.len() <= 64 => write!(f, "Data({text:?})"),
            _ => write!(f, "Data({} bytes)", self.0.len()),
        }
    }
}

impl From<Vec<u8>> for Data {
    fn from(bytes: Vec<u8>) -> Self {
        Data(bytes)
    }
}

impl From<&[u8]> for Data {
    fn from(bytes: &[u8]) -> Self {
        Data(bytes.to_vec())
    }
}

impl From<&str> for Data {
    fn from(text: &str) -> Self {
        Data(text.as_bytes().to_vec())
    }
}

impl Serialize for Data {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(Data)
            .map_err(|e| serde::de::Error::custom(format!("data is not valid base64: {e}")))
    }
}

/// What kind of node a create makes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// Lives until deleted.
    #[default]
    Persistent,
    /// Deleted when its owning session ends; cannot have children.
    Ephemeral,
    /// Deleted by the coordinator once it has had children and has none left
    /// (ZooKeeper's container nodes): lock queue parents use this so that
    /// locking millions of names does not leak millions of parents.
    Container,
}

/// The first frame a client sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal the server's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The requested session timeout; the server clamps it to its bounds.
    pub session_timeout_ms: u64,
    /// Resume this session instead of opening a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
}

/// How a reconnecting client names the session it resumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The session to resume.
    pub session_id: SessionId,
    /// The secret the server gave when the session was opened.
    pub secret: Secret,
    /// The highest xid whose reply the client has received; the server may
    /// forget cached replies up to it.
    pub last_xid_received: Xid,
}

/// The server's answer to a successful [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The server's protocol version.
    pub protocol_version: u32,
    /// The session (new or resumed).
    pub session_id: SessionId,
    /// The session's secret, to present when resuming.
    pub secret: Secret,
    /// The session timeout after clamping: the server expires the session
    /// when it has not heard from the client for this long.
    pub session_timeout_ms: u64,
    /// The server's latest zxid.
    pub zxid: Zxid,
    /// The highest xid the server has applied for this session (0 for a new
    /// one). Requests above it that the client sent were never applied.
    pub last_xid_applied: Xid,
    /// The largest frame the server accepts from this client.
    pub frame_bytes_max: u64,
    /// The largest node data the server accepts.
    pub data_bytes_max: u64,
}

/// One request on an established connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Strictly increasing within the session.
    pub xid: Xid,
    /// What to do.
    pub op: Op,
}

/// A create, alone or inside a multi.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Create {
    /// The node's path; for a sequential node, the prefix of its name.
    pub path: String,
    /// The node's data.
    #[serde(default)]
    pub data: Data,
    /// Persistent, ephemeral or container.
    #[serde(default)]
    pub kind: NodeKind,
    /// Append a 10-digit counter from the parent to the name. The counter
    /// never repeats while the parent exists (a reaped container parent
    /// created again starts from zero; czxids never repeat).
    #[serde(default)]
    pub sequential: bool,
    /// Delete the node when it has not been modified for this long (only for
    /// persistent nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Create missing ancestors as container nodes, in the same write.
    #[serde(default)]
    pub make_parents: bool,
    /// Make this node a place in its parent's lock queue (only for an
    /// ephemeral sequential node, and not inside a multi). The server then
    /// grants it in queue order by the rules of its [`LockMode`], tells the
    /// owner in the create's stat whether it was granted at once, and later
    /// pushes [`WatchEventKind::LockGranted`] to the owner, with no watch to
    /// set. A wait that would close a cycle of sessions waiting on each other
    /// fails with [`ErrorCode::Deadlock`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockSpec>,
}

/// How a lock node shares its queue with the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockMode {
    /// Granted when first in the queue: a mutex, a writer, a leader.
    Exclusive,
    /// Granted when no exclusive node is ahead: a reader.
    Shared,
    /// Granted when fewer than `permits` nodes are ahead.
    Semaphore { permits: u32 },
}

/// A lock node's mode and lock-delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockSpec {
    /// How the node shares the queue.
    pub mode: LockMode,
    /// After the owner's session expires while holding the lock, the lock
    /// passes to the next waiter only this long after the expiry (a holder
    /// cut off from the server may still be finishing its work). `None`
    /// takes the server's default; 0 turns the delay off. An explicit
    /// release or a close passes the lock at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
}

/// A lock node's state, in its [`Stat`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// How the node shares its queue.
    pub mode: LockMode,
    /// The lock-delay in force for this node.
    pub delay_ms: u64,
    /// Set once the node is granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<Grant>,
    /// Set when the owner's session expired while holding the lock: the node
    /// stays (ownerless, still holding) until this time, then goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freed_at_ms: Option<u64>,
}

/// When and at which zxid a lock node was granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The fencing token: the zxid of the write that granted the node (its
    /// own create when granted at once). Strictly increasing across the
    /// grants of all locks, but for shared nodes granted by one write.
    pub token: Zxid,
    /// When it was granted, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// An operation. Reads may set a one-shot watch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Create a node. Replies [`OpResult::Created`].
    Create(Create),
    /// Delete a node without children, if its version matches and, given
    /// `czxid`, if it is the node created at that zxid (a hold's token).
    ///
    /// A lock node may be deleted only by its owner session, a node with a
    /// TTL (a timed hold) only with its token: otherwise
    /// [`ErrorCode::NotOwner`] or [`ErrorCode::TokenRequired`]. `force`
    /// lifts both rules, as the end of the owner's session would: a granted
    /// lock node with a lock-delay becomes a zombie for that delay (its
    /// owner is told at once, the next waiter is granted only when the
    /// delay is over; replies [`OpResult::Zombified`]); anything else goes
    /// at once. The server logs every forced removal with who asked.
    Delete {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        czxid: Option<Zxid>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
    },
    /// Renew a TTL node: its deadline becomes now plus its TTL, or plus
    /// `ttl_ms`, which then becomes its TTL. Given `czxid`, only if it is the
    /// node created at that zxid. A write like a set: the version and mzxid
    /// move and data watches fire. Replies [`OpResult::Stat`].
    Touch {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        czxid: Option<Zxid>,
    },
    /// Replace a node's data, if its version matches and, given `czxid`,
    /// if it is the node created at that zxid. A lock node's data is set
    /// only by its owner session, a timed hold's only with its token
    /// (`czxid`). Replies [`OpResult::Stat`].
    Set {
        path: String,
        data: Data,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        czxid: Option<Zxid>,
    },
    /// Read data and stat; `watch` sets a data watch. Replies [`OpResult::Data`].
    Get {
        path: String,
        #[serde(default)]
        watch: bool,
    },
    /// Read the stat if the node exists; `watch` sets a data watch (node
    /// present) or an exist watch (node absent). Replies [`OpResult::Exists`].
    Exists {
        path: String,
        #[serde(default)]
        watch: bool,
    },
    /// List children (sorted by bytes) with the node's own stat; `watch`
    /// sets a child watch. One page: the names after `after` (all if
    /// `None`), at most `limit` of them and at most the server's page size
    /// (1,000 by default), so that no listing holds the server long.
    /// Replies [`OpResult::Children`], whose `more` says whether names
    /// follow the page; ask again with `after` set to its last name. Pages
    /// are not one snapshot: compare the stat's `cversion` across them.
    Children {
        path: String,
        #[serde(default)]
        watch: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
    },
    /// Apply all or none of these. Replies [`OpResult::Multi`].
    Multi { ops: Vec<MultiOp> },
    /// A heartbeat. `ack` is the highest xid whose reply the client has
    /// received. Replies [`OpResult::Pong`].
    Ping { ack: Xid },
    /// Re-register watches after resuming a session. Watches whose node
    /// changed after `last_zxid` fire at once; the rest are registered.
    /// Replies [`OpResult::Done`].
    SetWatches {
        last_zxid: Zxid,
        #[serde(default)]
        data: Vec<String>,
        #[serde(default)]
        exist: Vec<String>,
        #[serde(default)]
        child: Vec<String>,
        /// The session's own lock nodes still waiting for a grant: those
        /// granted since fire [`WatchEventKind::LockGranted`] at once, those
        /// gone fire [`WatchEventKind::NodeDeleted`].
        #[serde(default)]
        lock: Vec<String>,
    },
    /// End the session now: its ephemeral nodes are deleted at once.
    /// Replies [`OpResult::Done`]; the server then closes the connection.
    CloseSession,
}

impl Op {
    /// Whether this operation changes the tree or the session (and so is
    /// answered from the reply cache when retried).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Op::Create(_)
                | Op::Delete { .. }
                | Op::Touch { .. }
                | Op::Set { .. }
                | Op::Multi { .. }
                | Op::CloseSession
        )
    }
}

/// One step of a multi.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultiOp {
    /// Fails the multi unless the node exists, at this version if given,
    /// and created at this zxid if given.
    Check {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        czxid: Option<Zxid>,
    },
    /// As [`Op::Create`].
    Create(Create),
    /// As [`Op::Set`].
    Set {
        path: String,
        data: Data,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        czxid: Option<Zxid>,
    },
    /// As [`Op::Delete`], without `force`: a forced delete goes alone.
    Delete {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        czxid: Option<Zxid>,
    },
    /// As [`Op::Touch`].
    Touch {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        czxid: Option<Zxid>,
    },
}

/// A node's metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    /// Zxid of the write that created the node: its fencing token.
    pub czxid: Zxid,
    /// Zxid of the write that last set its data.
    pub mzxid: Zxid,
    /// Zxid of the write that last added or removed a child.
    pub pzxid: Zxid,
    /// Creation time, milliseconds since the Unix epoch (server clock).
    pub ctime_ms: u64,
    /// Last modification time, milliseconds since the Unix epoch.
    pub mtime_ms: u64,
    /// Number of sets since creation.
    pub version: u64,
    /// Number of child additions and removals since creation.
    pub cversion: u64,
    /// The session that owns this ephemeral node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_owner: Option<SessionId>,
    /// Bytes of data.
    pub data_length: u64,
    /// Number of children.
    pub num_children: u64,
    /// Persistent, ephemeral or container.
    pub kind: NodeKind,
    /// The node's TTL, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// For a lock node: its mode, grant and lock-delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockInfo>,
}

/// The answer to the request with this xid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The request's xid.
    pub xid: Xid,
    /// The server's latest zxid when it answered.
    pub zxid: Zxid,
    /// The operation's result.
    pub result: Result<OpResult, ErrorReply>,
}

/// A successful operation's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpResult {
    /// The node was created at `path` (with the sequence suffix, if any).
    Created { path: String, stat: Stat },
    /// The node was deleted.
    Deleted,
    /// A forced delete of a granted lock node with a lock-delay: its owner
    /// has been told, and the node stays, ownerless and holding, until
    /// `stat.lock.freed_at_ms`; then it is deleted and the next waiter
    /// granted.
    Zombified { stat: Stat },
    /// The node's new stat after a set.
    Stat { stat: Stat },
    /// A node's data and stat.
    Data { data: Data, stat: Stat },
    /// The node's stat, or `None` if it does not exist.
    Exists { stat: Option<Stat> },
    /// One page of sorted child names and the parent's stat; `more` if
    /// names follow the page.
    Children {
        children: Vec<String>,
        stat: Stat,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
    },
    /// One result per operation of the multi, in order.
    Multi { results: Vec<MultiResult> },
    /// The answer to a ping.
    Pong,
    /// The answer to `set_watches` and `close_session`.
    Done,
}

/// The result of one step of a successful multi.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultiResult {
    Checked,
    Created { path: String, stat: Stat },
    Stat { stat: Stat },
    Deleted,
}

/// A failed operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What kind of failure; stable across versions.
    pub code: ErrorCode,
    /// What was wrong and what to do, for people.
    pub message: String,
    /// For a multi: the index of the operation that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// For [`ErrorCode::Deadlock`]: the cycle the refused wait would have
    /// closed, starting with the requesting session.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cycle: Vec<WaitEdge>,
    /// For [`ErrorCode::NotOwner`]: the session that owns the node, or
    /// `None` for a zombie (a lock node whose owner's session ended, held
    /// through its lock-delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<SessionId>,
}

/// One edge of a wait-for cycle: `session` would wait on the lock queue
/// `lock`, in which `holder` owns a node ahead of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitEdge {
    /// The waiting session.
    pub session: SessionId,
    /// The lock queue (the lock nodes' parent).
    pub lock: String,
    /// The session it waits for.
    pub holder: SessionId,
}

impl ErrorReply {
    /// An error with a message and no multi index.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
            index: None,
            cycle: Vec::new(),
            owner: None,
        }
    }
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "operation {i} of the multi failed: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Stable error codes. Each variant's text is the generic meaning; the
/// [`ErrorReply::message`] says what exactly was wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    #[error("the node does not exist")]
    NoNode,
    #[error("the node already exists")]
    NodeExists,
    #[error("the node's version is not the expected one")]
    BadVersion,
    #[error("the node has children")]
    NotEmpty,
    #[error("ephemeral nodes cannot have children")]
    NoChildrenForEphemerals,
    #[error("the path is not canonical")]
    InvalidPath,
    #[error("the request is larger than a limit")]
    TooLarge,
    #[error("a bound on nodes, children, watches or sessions was reached")]
    LimitExceeded,
    #[error("an argument is not allowed")]
    InvalidArgument,
    #[error("the operation is unknown")]
    UnknownOperation,
    #[error("the request is malformed")]
    Malformed,
    #[error("the session has expired or never existed")]
    SessionExpired,
    #[error("the protocol versions differ")]
    ProtocolVersion,
    #[error("the retried request's reply is no longer kept")]
    RetryUnknown,
    #[error("too many connections")]
    TooManyConnections,
    #[error("the wait would close a cycle of sessions waiting on each other")]
    Deadlock,
    #[error("the node is not the one the token names")]
    BadToken,
    #[error("the node is another session's lock node")]
    NotOwner,
    #[error("the node is a timed hold and the request gives no token")]
    TokenRequired,
    /// The server cannot make writes durable now (its log stopped on a
    /// failed write or fsync): the write was not applied; reads still work.
    #[error("the server cannot make writes durable now")]
    Unavailable,
}

/// A watch event: what happened, to which node, at which zxid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    /// What happened.
    pub kind: WatchEventKind,
    /// The watched node's path.
    pub path: String,
    /// The zxid of the change (or of the check, for a watch fired when set).
    pub zxid: Zxid,
}

/// The kinds of watch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchEventKind {
    /// The node was created (fires exist watches).
    NodeCreated,
    /// The node was deleted (fires data and child watches).
    NodeDeleted,
    /// The node's data was set (fires data watches).
    NodeDataChanged,
    /// A child was added or removed (fires child watches).
    NodeChildrenChanged,
    /// The session's own lock node was granted; `zxid` is the fencing token.
    /// Pushed to the owner with no watch set.
    LockGranted,
}

impl fmt::Display for WatchEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WatchEventKind::NodeCreated => "created",
            WatchEventKind::NodeDeleted => "deleted",
            WatchEventKind::NodeDataChanged => "data_changed",
            WatchEventKind::NodeChildrenChanged => "children_changed",
            WatchEventKind::LockGranted => "lock_granted",
        })
    }
}

/// Which kind of watch a path is registered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchKind {
    /// Set on an existing node by `get` or `exists`: fires on set and delete.
    Data,
    /// Set on an absent node by `exists`: fires on create.
    Exist,
    /// Set by `children`: fires on a child added or removed, and on delete.
    Child,
    /// Implied on the session's own lock nodes: fires on the grant, and on
    /// a delete by anyone but the owner (or by the server after an expiry).
    Lock,
}

/// Why the server ended a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEvent {
    /// The session has ended on the server: it did not hear from the client
    /// for the session timeout, or it is shutting down (its state is in
    /// memory). The session's ephemeral nodes and watches are gone.
    Expired,
    /// The session was resumed on another connection; this one is closed.
    Moved,
}

/// Every message the server sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerMessage {
    /// The handshake succeeded.
    Welcome(Welcome),
    /// The answer to one request.
    Reply(Reply),
    /// A one-shot watch fired.
    Watch(WatchEvent),
    /// The session ended; the server closes the connection after this.
    Session(SessionEvent),
    /// A connection-level error (bad handshake, broken frame, limit); the
    /// server closes the connection after this.
    Fatal(ErrorReply),
}

/// The frame codec both sides use: a 4-byte big-endian length prefix, and a
/// bound on the frame size checked before any buffer for the frame is grown,
/// so a header announcing a huge length costs nothing.
pub fn codec(frame_bytes_max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(frame_bytes_max)
        .new_codec()
}

/// Serializes a message into a frame body.
pub fn encode<T: Serialize>(message: &T) -> bytes::Bytes {
    // Serializing these types cannot fail: no maps with non-string keys, no
    // non-finite floats.
    bytes::Bytes::from(serde_json::to_vec(message).expect("protocol messages serialize"))
}

/// Why a path is not canonical.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("invalid path {path:?}: {fault}")]
pub struct PathError {
    /// The offending path (cut to 80 characters).
    pub path: String,
    /// What is wrong with it; its `Display` says how to fix it.
    pub fault: PathFault,
}

/// What makes a path not canonical: the facts, with the advice in
/// `Display`, so that a refusal can be kept (in a reply cache, a snapshot)
/// without its prose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum PathFault {
    /// The empty string.
    #[error("a path cannot be empty (use \"/\" for the root)")]
    Empty,
    /// Over [`limits::PATH_BYTES_MAX`].
    #[error(
        "it is {bytes} bytes; the limit is {} (use shorter names)",
        limits::PATH_BYTES_MAX
    )]
    TooLong {
        /// The path's length.
        bytes: u64,
    },
    /// Not starting with `/`.
    #[error("a path must start with \"/\" (write it absolute, e.g. \"/locks/a\")")]
    Relative,
    /// A `/` at the end of a path other than the root.
    #[error("a path must not end with \"/\" (drop the trailing slash)")]
    TrailingSlash,
    /// A control character, NUL included.
    #[error("it contains the control character {character:?} (use printable characters)")]
    Control {
        /// The first control character found.
        character: char,
    },
    /// `//`.
    #[error("it has an empty segment (\"//\"); remove the doubled slash")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("it has a {segment:?} segment; paths are not resolved, write the canonical form")]
    DotSegment {
        /// `.` or `..`.
        segment: String,
    },
    /// A segment over [`limits::NAME_BYTES_MAX`].
    #[error("a segment is {bytes} bytes; the limit is {}", limits::NAME_BYTES_MAX)]
    LongSegment {
        /// The segment's length.
        bytes: u64,
    },
    /// More than [`limits::PATH_DEPTH_MAX`] segments.
    #[error(
        "it has {segments} segments; the limit is {} (use a flatter name)",
        limits::PATH_DEPTH_MAX
    )]
    TooDeep {
        /// How many segments the path has.
        segments: u64,
    },
}

/// Checks that `path` is canonical: starts with `/`, has no empty, `.` or
/// `..` segment, no trailing `/` (except the root `/` itself), no control
/// character (NUL included), and is within [`limits::PATH_BYTES_MAX`],
/// [`limits::PATH_DEPTH_MAX`] and [`limits::NAME_BYTES_MAX`].
pub fn validate_path(path: &str) -> Result<(), PathError> {
    let fail = |fault: PathFault| {
        let shown: String = path.chars().take(80).collect();
        Err(PathError { path: shown, fault })
    };
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    if path.is_empty() {
        return fail(PathFault::Empty);
    }
    if path.len() > limits::PATH_BYTES_MAX {
        return fail(PathFault::TooLong {
            bytes: count(path.len()),
        });
    }
    if !path.starts_with('/') {
        return fail(PathFault::Relative);
    }
    if path == "/" {
        return Ok(());
    }
    if path.ends_with('/') {
        return fail(PathFault::TrailingSlash);
    }
    if let Some(character) = path.chars().find(|c| c.is_control()) {
        return fail(PathFault::Control { character });
    }
    let mut depth = 0usize;
    for segment in path[1..].split('/') {
        depth += 1;
        if segment.is_empty() {
            return fail(PathFault::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return fail(PathFault::DotSegment {
                segment: segment.to_owned(),
            });
        }
        if segment.len() > limits::NAME_BYTES_MAX {
            return fail(PathFault::LongSegment {
                bytes: count(segment.len()),
            });
        }
    }
    if depth > limits::PATH_DEPTH_MAX {
        return fail(PathFault::TooDeep {
            segments: count(depth),
        });
    }
    Ok(())
}

/// The parent of a canonical path (`None` for the root).
pub fn parent_path(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// The last segment of a canonical path (empty for the root).
pub fn node_name(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[i + 1..])
}

/// Joins a canonical parent path and a child name.
pub fn child_path(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths_pass() {
        for p in [
            "/",
            "/a",
            "/a/b",
            "/locks/order-42/lock-0000000001",
            "/a.b/..c",
        ] {
            assert_eq!(validate_path(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn non_canonical_paths_fail_with_a_reason() {
        for p in [
            "", "a", "/a/", "/a//b", "/a/./b", "/a/../b", "/a\0b", "/a\nb",
        ] {
            let err = validate_path(p).expect_err(p);
            assert!(!err.fault.to_string().is_empty());
        }
        let deep = "/a".repeat(limits::PATH_DEPTH_MAX + 1);
        assert!(validate_path(&deep)
            .unwrap_err()
            .fault
            .to_string()
            .contains("segments"));
        let long = format!("/{}", "x".repeat(limits::NAME_BYTES_MAX + 1));
        assert!(validate_path(&long)
            .unwrap_err()
            .fault
            .to_string()
            .contains("segment is"));
        let huge = "/abc".repeat(limits::PATH_BYTES_MAX);
        assert!(validate_path(&huge)
            .unwrap_err()
            .fault
            .to_string()
            .contains("bytes"));
    }

    #[test]
    fn parent_and_name() {
        assert_eq!(parent_path("/"), None);
        assert_eq!(parent_path("/a"), Some("/"));
        assert_eq!(parent_path("/a/b"), Some("/a"));
        assert_eq!(node_name("/a/b"), "b");
        assert_eq!(child_path("/", "a"), "/a");
        assert_eq!(child_path("/a", "b"), "/a/b");
    }

    #[test]
    fn messages_round_trip_through_json() {
        let req = Request {
            xid: Xid(7),
            op: Op::Create(Create {
                path: "/locks/x/lock-".into(),
                data: Data(vec![0, 255, 10]),
                kind: NodeKind::Ephemeral,
                sequential: true,
                ttl_ms: None,
                make_parents: true,
                lock: Some(LockSpec {
                    mode: LockMode::Semaphore { permits: 3 },
                    delay_ms: None,
                }),
            }),
        };
        let bytes = encode(&req);
        let back: Request = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, req);

        let reply = ServerMessage::Reply(Reply {
            xid: Xid(7),
            zxid: Zxid(9),
            result: Err(ErrorReply::new(ErrorCode::NoNode, "no node at /x")),
        });
        let back: ServerMessage = serde_json::from_slice(&encode(&reply)).unwrap();
        assert_eq!(back, reply);
    }

    #[test]
    fn secrets_compare_by_content() {
        let s = |t: &str| Secret(t.to_string());
        assert_eq!(s("00ff"), s("00ff"));
        assert_ne!(s("00ff"), s("00fe"));
        assert_ne!(s("00ff"), s("00ff0"));
        assert_ne!(s(""), s("0"));
        assert_eq!(format!("{:?}", s("00ff")), "Secret(..)");
    }

    #[test]
    fn bad_base64_data_is_a_decode_error() {
        let raw = r#"{"xid":1,"op":{"set":{"path":"/a","data":"!!!"}}}"#;
        let err = serde_json::from_str::<Request>(raw).unwrap_err();
        assert!(err.to_string().contains("base64"), "{err}");
    }
}

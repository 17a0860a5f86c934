//! Why the state machine refuses a request: the facts, as data.
//!
//! A refusal is replicated state: it sits in a session's reply cache and
//! so in snapshots, and a retried write gets it back. Prose there would
//! make the state depend on the build that wrote it (a reworded message
//! changes a snapshot's bytes, and one member's cache from another's).
//! So `apply` keeps only a [`Why`] and its fields; the message is written
//! when the server sends the reply ([`Refusal::to_reply`]), and a new build
//! may word it better without a new snapshot format. Adding a variant or a
//! field is a format change (see `snapshot::SNAPSHOT_FORMAT`).

use latchkey_client::protocol::{
    limits, ErrorCode, ErrorReply, LockMode, NodeKind, PathError, SessionId, WaitEdge, Xid, Zxid,
};

use super::sessions::REPLY_CACHE_BYTES_MAX;

/// How many edges of a refused wait's cycle its message spells out; the
/// reply's `cycle` lists them all. A cycle through thousands of sessions
/// would otherwise make a message nobody reads.
const CYCLE_EDGES_IN_MESSAGE_MAX: usize = 8;

/// A refused request: why, and for a multi, which of its operations.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Refusal {
    /// What was wrong.
    pub why: Why,
    /// For a multi: the index of the operation refused.
    pub index: Option<u32>,
}

impl From<Why> for Refusal {
    fn from(why: Why) -> Self {
        Refusal { why, index: None }
    }
}

impl From<PathError> for Refusal {
    fn from(error: PathError) -> Self {
        Why::InvalidPath(error).into()
    }
}

impl Refusal {
    /// The wire code: stable across versions, as [`ErrorCode`] is.
    pub fn code(&self) -> ErrorCode {
        self.why.code()
    }

    /// For a Deadlock: the cycle the refused wait would have closed,
    /// starting with the requesting session; else empty.
    pub fn cycle(&self) -> &[WaitEdge] {
        match &self.why {
            Why::Deadlock { cycle, .. } => cycle,
            Why::Recorded(reply) => &reply.cycle,
            _ => &[],
        }
    }

    /// The reply a client gets: the code, the message this build writes
    /// (what was wrong and what to do), and the structured fields the
    /// protocol carries (the multi index, a deadlock's cycle, a lock
    /// node's owner).
    pub fn to_reply(&self) -> ErrorReply {
        let mut reply = match &self.why {
            Why::Recorded(reply) => reply.clone(),
            why => ErrorReply::new(why.code(), why.to_string()),
        };
        match &self.why {
            Why::Deadlock { cycle, .. } => reply.cycle = cycle.clone(),
            Why::NotOwner { owner, .. } => reply.owner = *owner,
            _ => {}
        }
        if self.index.is_some() {
            reply.index = self.index;
        }
        reply
    }
}

/// What a refused request would have done to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verb {
    /// A set of data.
    Set,
    /// A delete.
    Delete,
    /// A renewal of a TTL.
    Renew,
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verb::Set => "set",
            Verb::Delete => "delete",
            Verb::Renew => "renew",
        })
    }
}

/// What a request that found no node was doing, for the advice its
/// message gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    /// A read of data.
    Read,
    /// A listing of children.
    Listing,
    /// A renewal of a TTL.
    Renew,
    /// A delete.
    Delete,
    /// A set.
    Set,
    /// A check in a multi.
    Check,
    /// A create whose parent is missing.
    Parent,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Missing::Read => {
                "check the path; to wait for it, watch it (exists with a watch, or `latchkey watch`)"
            }
            Missing::Listing => "check the path, or create it first",
            Missing::Renew => "it may have expired; create it again",
            Missing::Delete => "it may have been deleted already",
            Missing::Set => "create it first",
            Missing::Check => "create it first, or check another node",
            Missing::Parent => {
                "create it first, or have missing parents created: make_parents, or --parents on \
                 the command line"
            }
        })
    }
}

/// Why a request was refused. Counts are `u64`, whatever the build's word
/// size. Each variant's `Display` is its message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Why {
    /// An unknown session or a wrong secret: one answer for both, so that
    /// a guesser learns nothing.
    #[error("session {session} has expired or never existed; open a new session")]
    SessionExpired { session: SessionId },
    /// `sessions_max` sessions are open.
    #[error(
        "{open} sessions are open; the limit is {max} (close sessions you no longer use, or \
         retry later)"
    )]
    SessionsFull { open: u64, max: u64 },
    /// A write sent where only reads are answered.
    #[error("a write cannot be answered as a read")]
    WriteAsRead,
    /// A retried write whose reply is no longer cached: not applied again.
    #[error(
        "write {} of session {session} is at or below the last applied xid {} and its reply is \
         no longer kept (acknowledged, more than {} requests old, or dropped to keep the \
         session's cached replies within {} bytes or all sessions' within {cache_bytes_max} \
         bytes); it was not applied again: read the nodes it touches to learn whether it took \
         effect",
        xid.0,
        last.0,
        limits::INFLIGHT_MAX,
        REPLY_CACHE_BYTES_MAX
    )]
    RetryUnknown {
        session: SessionId,
        xid: Xid,
        last: Xid,
        cache_bytes_max: u64,
    },
    /// A multi of more than `limits::MULTI_OPS_MAX` operations.
    #[error(
        "the multi has {ops} operations; the limit is {} (split it into several multis)",
        limits::MULTI_OPS_MAX
    )]
    MultiTooLong { ops: u64 },
    /// The session holds `watches_per_session_max` watches.
    #[error(
        "session {session} holds {held} watches; the limit is {max} (read without a watch, or \
         wait for some to fire)"
    )]
    SessionWatchesFull {
        session: SessionId,
        held: u64,
        max: u64,
    },
    /// All sessions hold `watches_max` watches.
    #[error(
        "all sessions hold {total} watches; the limit is {max} (read without a watch, wait for \
         some to fire, or raise --watches-max)"
    )]
    WatchesFull { total: u64, max: u64 },
    /// A children listing with a limit of 0.
    #[error("a listing of {path} with a limit of 0 lists nothing; give at least 1")]
    ListingOfNothing { path: String },
    /// A set_watches naming more than `limits::SET_WATCHES_PATHS_MAX` paths.
    #[error(
        "set_watches names {paths} paths; the limit is {} (send them in batches)",
        limits::SET_WATCHES_PATHS_MAX
    )]
    SetWatchesTooLong { paths: u64 },
    /// A set_watches that would take the session past its watch bound.
    #[error(
        "session {session} holds {held} watches and set_watches adds {adds}; the limit is {max} \
         (watch fewer nodes)"
    )]
    SetWatchesOverSession {
        session: SessionId,
        held: u64,
        adds: u64,
        max: u64,
    },
    /// A set_watches that would take all sessions past `watches_max`.
    #[error(
        "all sessions hold {total} watches and set_watches adds {adds}; the limit is {max} \
         (watch fewer nodes, or raise --watches-max)"
    )]
    SetWatchesOverAll { total: u64, adds: u64, max: u64 },
    /// A create under a parent with `children_per_node_max` children.
    #[error(
        "{parent} has {children} children; the limit is {max} (spread the children over more \
         parents)"
    )]
    ChildrenFull {
        parent: String,
        children: u64,
        max: u64,
    },
    /// A create in a tree of `nodes_max` nodes.
    #[error("the tree has {nodes} nodes; the limit is {max} (delete nodes you no longer need)")]
    NodesFull { nodes: u64, max: u64 },
    /// A write that would take the tree past `tree_bytes_max` bytes.
    #[error(
        "the tree would hold {bytes} bytes; the limit is {max} (delete nodes you no longer need, \
         or raise --tree-bytes-max)"
    )]
    TreeFull { bytes: u64, max: u64 },
    /// A renewal to a TTL of 0.
    #[error("a TTL of 0 is not allowed for {path}; give at least 1 ms, or delete the node")]
    RenewToZero { path: String },
    /// A renewal of a node without a TTL.
    #[error(
        "{path} has no TTL, so there is nothing to renew (create the node with a TTL to hold it \
         for a time)"
    )]
    NoTtl { path: String },
    /// A delete of `/`.
    #[error("the root / cannot be deleted (delete its children instead)")]
    DeleteRoot,
    /// A delete of a node with children.
    #[error("{path} has {children} children (delete them first)")]
    NotEmpty { path: String, children: u64 },
    /// A create of `/`.
    #[error("the root / always exists (create nodes below it)")]
    CreateRoot,
    /// A TTL given for a node that is not persistent.
    #[error(
        "a TTL was given for {} node; only persistent nodes take a TTL (drop the TTL, or make \
         the node persistent)",
        match kind {
            NodeKind::Ephemeral => "an ephemeral",
            NodeKind::Container => "a container",
            NodeKind::Persistent => "a persistent",
        }
    )]
    TtlNotPersistent { kind: NodeKind },
    /// A create with a TTL of 0.
    #[error(
        "a TTL of 0 is not allowed; give at least 1 ms, or no TTL for a node that does not expire"
    )]
    TtlZero,
    /// A sequential container node.
    #[error(
        "a container node cannot be sequential (create the container, then sequential children \
         under it)"
    )]
    ContainerSequential,
    /// A sequential create under a parent whose counter is past `limits::SEQUENCE_MAX`.
    #[error(
        "the sequence counter of {parent} is at {next}, past {} (the largest that fits {} \
         digits); use a new parent",
        limits::SEQUENCE_MAX,
        limits::SEQUENCE_DIGITS
    )]
    SequenceExhausted { parent: String, next: u64 },
    /// A create where a node already is.
    #[error("a node already exists at {path} (delete it first, or pick another name)")]
    NodeExists { path: String },
    /// A lock node that is not ephemeral and sequential.
    #[error(
        "a lock node must be ephemeral and sequential (create it with kind ephemeral and \
         sequential set)"
    )]
    LockNotEphemeralSequential,
    /// A lock node created inside a multi.
    #[error(
        "lock nodes are created one at a time, not inside a multi (send each lock create on its \
         own)"
    )]
    LockInMulti,
    /// A semaphore of 0 permits.
    #[error("a semaphore with 0 permits could never be granted (give at least 1 permit)")]
    SemaphoreOfNone,
    /// A lock-delay past `lock_delay_ms_max`.
    #[error(
        "a lock-delay of {delay_ms} ms was asked for; the limit is {max_ms} ms (ask for less, or \
         none to take the default of {default_ms} ms)"
    )]
    LockDelayTooLong {
        delay_ms: u64,
        max_ms: u64,
        default_ms: u64,
    },
    /// A path that is not canonical.
    #[error("{0}")]
    InvalidPath(PathError),
    /// A conditional write whose expected version is not the node's.
    #[error(
        "version mismatch at {path}: expected {expected}, the node is at {actual} (read it again \
         and retry)"
    )]
    BadVersion {
        path: String,
        expected: u64,
        actual: u64,
    },
    /// A change to another session's lock node (`owner`), or to a zombie
    /// (`owner` none), freed at `freed_at_ms`.
    #[error("{}", not_owner(path, *verb, *owner, *freed_at_ms))]
    NotOwner {
        path: String,
        verb: Verb,
        owner: Option<SessionId>,
        freed_at_ms: Option<u64>,
    },
    /// A change to a timed hold without its token.
    #[error(
        "{path} is a timed hold: to {verb} it, give its token, the czxid that took it \
         (`latchkey extend` and `latchkey release` take it; Hold::extend and Hold::release), or \
         delete it with force to end it without"
    )]
    TokenRequired { path: String, verb: Verb },
    /// A TTL past `hold_ttl_ms_max`.
    #[error(
        "a TTL of {ttl_ms} ms was asked for {path}; the limit is {max_ms} ms (ask for less, and \
         extend the hold before it ends if it must last longer)"
    )]
    TtlTooLong {
        path: String,
        ttl_ms: u64,
        max_ms: u64,
    },
    /// A hold's token that names another incarnation of the node.
    #[error(
        "the node at {path} was created at zxid {actual}, not {expected}: the hold that token \
         names has ended or was taken again"
    )]
    BadToken {
        path: String,
        expected: Zxid,
        actual: Zxid,
    },
    /// Data past `data_bytes_max` bytes.
    #[error(
        "data is {bytes} bytes; the limit is {max} (store large values elsewhere and keep a \
         reference here)"
    )]
    DataTooLarge { bytes: u64, max: u64 },
    /// No node at `path`; `doing` says what the request was doing.
    #[error("no node at {path} ({doing})")]
    NoNode { path: String, doing: Missing },
    /// A create under an ephemeral node.
    #[error(
        "{parent} is ephemeral and cannot have children (create {path} under a persistent or \
         container node)"
    )]
    EphemeralParent { parent: String, path: String },
    /// A lock node of another kind (or permit count) than its queue's.
    #[error(
        "{parent} is queued as {} but this create asks for {} (every node of a queue must use \
         the same kind, and a semaphore the same permits)",
        describe(*queued),
        describe(*asked)
    )]
    QueueKindMismatch {
        parent: String,
        queued: LockMode,
        asked: LockMode,
    },
    /// Lock creates that would take the session past `waits_per_session_max` waits.
    #[error(
        "session {session} already waits for {waits} lock nodes and this request would add \
         {adds}; the limit is {max} (give up some waits first, or raise --waits-per-session-max)"
    )]
    WaitsFull {
        session: SessionId,
        waits: u64,
        adds: u64,
        max: u64,
    },
    /// A wait on `lock` that would close `cycle`, starting with the
    /// requesting session.
    #[error("{}", deadlock(lock, cycle))]
    Deadlock { lock: String, cycle: Vec<WaitEdge> },
    /// A refusal cached before refusals were kept as facts (snapshot
    /// format 1), kept as its client got it.
    #[error("{}", .0.message)]
    Recorded(ErrorReply),
}

impl Why {
    /// The wire code of this refusal.
    pub fn code(&self) -> ErrorCode {
        use ErrorCode as C;
        match self {
            Why::SessionExpired { .. } => C::SessionExpired,
            Why::WriteAsRead => C::Malformed,
            Why::RetryUnknown { .. } => C::RetryUnknown,
            Why::MultiTooLong { .. } | Why::SetWatchesTooLong { .. } | Why::DataTooLarge { .. } => {
                C::TooLarge
            }
            Why::SessionsFull { .. }
            | Why::SessionWatchesFull { .. }
            | Why::WatchesFull { .. }
            | Why::SetWatchesOverSession { .. }
            | Why::SetWatchesOverAll { .. }
            | Why::ChildrenFull { .. }
            | Why::NodesFull { .. }
            | Why::TreeFull { .. }
            | Why::SequenceExhausted { .. }
            | Why::WaitsFull { .. } => C::LimitExceeded,
            Why::ListingOfNothing { .. }
            | Why::RenewToZero { .. }
            | Why::NoTtl { .. }
            | Why::DeleteRoot
            | Why::TtlNotPersistent { .. }
            | Why::TtlZero
            | Why::ContainerSequential
            | Why::LockNotEphemeralSequential
            | Why::LockInMulti
            | Why::SemaphoreOfNone
            | Why::LockDelayTooLong { .. }
            | Why::TtlTooLong { .. }
            | Why::QueueKindMismatch { .. } => C::InvalidArgument,
            Why::NotEmpty { .. } => C::NotEmpty,
            Why::CreateRoot | Why::NodeExists { .. } => C::NodeExists,
            Why::InvalidPath(_) => C::InvalidPath,
            Why::BadVersion { .. } => C::BadVersion,
            Why::NotOwner { .. } => C::NotOwner,
            Why::TokenRequired { .. } => C::TokenRequired,
            Why::BadToken { .. } => C::BadToken,
            Why::NoNode { .. } => C::NoNode,
            Why::EphemeralParent { .. } => C::NoChildrenForEphemerals,
            Why::Deadlock { .. } => C::Deadlock,
            Why::Recorded(reply) => reply.code,
        }
    }
}

fn describe(mode: LockMode) -> String {
    match mode {
        LockMode::Exclusive => "an exclusive lock".to_owned(),
        LockMode::Shared => "a shared lock".to_owned(),
        LockMode::Semaphore { permits } => format!("a semaphore of {permits} permits"),
    }
}

fn not_owner(path: &str, verb: Verb, owner: Option<SessionId>, freed_at_ms: Option<u64>) -> String {
    match owner {
        Some(owner) => format!(
            "{path} is a lock node of session {owner}: only that session may {verb} it (to \
             take the lock away, delete the node with force: its holder is told at once and \
             keeps it through its lock-delay, then the next waiter is granted)"
        ),
        None => format!(
            "{path} is a zombie: the lock node of a session that ended, holding until {} ms \
             since the epoch (its lock-delay) so that its holder can stop; no one may {verb} \
             it (delete it with force to end it now)",
            freed_at_ms.unwrap_or(0)
        ),
    }
}

/// Names the cycle, and the two ways out.
fn deadlock(lock: &str, cycle: &[WaitEdge]) -> String {
    let mut message = format!("waiting on {lock} would deadlock: ");
    for (i, e) in cycle.iter().take(CYCLE_EDGES_IN_MESSAGE_MAX).enumerate() {
        if i == 0 {
            message.push_str(&format!(
                "session {} would wait for session {} (it holds or queues ahead in {})",
                e.session, e.holder, e.lock
            ));
        } else {
            message.push_str(&format!(
                ", which waits for session {} in {}",
                e.holder, e.lock
            ));
        }
    }
    if cycle.len() > CYCLE_EDGES_IN_MESSAGE_MAX {
        message.push_str(&format!(
            ", and so on: {} waits in all (see the reply's cycle)",
            cycle.len()
        ));
    }
    message.push_str(
        "; release one lock before taking the other, or take them together with a multi-lock",
    );
    message
}

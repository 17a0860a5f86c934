//! The coordinator state: the node tree, the session table, the watch table,
//! and [`Coordinator::apply`], the one step that turns a command into an
//! output. Deterministic: no clock, no I/O, no randomness; time and secrets
//! come in as arguments, so a replicated log can later drive it unchanged.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use latchkey_client::protocol::{
    self, limits, NodeKind, Op, OpResult, Secret, SessionId, WatchEvent, WatchEventKind, WatchKind,
    Xid, Zxid,
};

mod locks;
mod ops;
mod refusal;
mod sessions;
mod snapshot;
mod tree;
mod watches;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cache;
#[cfg(test)]
mod tests_deadlock;
#[cfg(test)]
mod tests_ending;
#[cfg(test)]
mod tests_grace;
#[cfg(test)]
mod tests_locks;
#[cfg(test)]
mod tests_model;
#[cfg(test)]
mod tests_random;
#[cfg(test)]
mod tests_reads;

pub use refusal::{Missing, Refusal, Verb, Why};
use sessions::Sessions;
use tree::Tree;
use watches::WatchTable;

/// A count or a length as the replicated state keeps it: `u64` on every
/// build, so that a bound decides alike on every member whatever its word
/// size.
pub fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A bound as a length of this build's collections: a bound past what
/// `usize` holds allows anything this build can hold.
pub fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Bounds the state machine enforces. `Config::default()` is what a server
/// started with no flags uses; each field says its default and why. Every
/// bound is a `u64`, as are the totals held against them (tree bytes,
/// reply cache bytes): a `Configure` command in the log sets them, and a
/// member of any word size must decide alike.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    /// Smallest session timeout granted; smaller requests are raised to it.
    /// Default 1 s: below that, a pause of the client's process (GC, swap)
    /// would expire it.
    pub session_timeout_ms_min: u64,
    /// Largest session timeout granted; larger requests are lowered to it.
    /// Default 120 s: a crashed holder blocks its locks for at most this
    /// long.
    pub session_timeout_ms_max: u64,
    /// Largest node data. Default 1 MiB, as in ZooKeeper.
    pub data_bytes_max: u64,
    /// Most live sessions. Default 100,000.
    pub sessions_max: u64,
    /// Most nodes in the tree. Default 10,000,000. Besides its path and data
    /// (bounded by `tree_bytes_max`), each node costs about 300 bytes of
    /// bookkeeping (a 184-byte node in the slab, a path index entry with its
    /// own copy of the path, the name in the parent's child set, allocator
    /// overhead): about 3 GiB at the default, on top of the tree's bytes.
    /// Estimated from type sizes, not measured; lower it on small machines.
    /// A lock node costs about 150 bytes more (its boxed lock state and its
    /// entries in its queue and its owner's waits).
    pub nodes_max: u64,
    /// Most bytes the tree holds, counting each node's path and data.
    /// Default 1 GiB. Without it the per-node bounds multiply to
    /// `nodes_max` x `data_bytes_max`, about 10 TiB; with it, paths and data
    /// take at most this much plus the copies of paths the indexes keep. A
    /// coordinator holds small values; a tree near this size belongs in a
    /// database.
    pub tree_bytes_max: u64,
    /// Most children of one node. Default and ceiling
    /// `protocol::limits::CHILDREN_PER_NODE_MAX`, so a listing fits a frame.
    pub children_per_node_max: u64,
    /// Most names in one page of a children listing. Default 1,000: a page
    /// then costs the coordinator tens of microseconds (cloning its names;
    /// the reply is encoded outside its lock), where one listing of 100,000
    /// children stalled every other client for 25-120 ms.
    pub children_page_max: u64,
    /// Most watches per session. Default
    /// `protocol::limits::WATCHES_PER_SESSION_MAX`.
    pub watches_per_session_max: u64,
    /// Most watches all sessions hold together. Default 2,000,000, or 20 per
    /// session at 100,000 sessions. A watch costs ~100-200 bytes plus twice
    /// its path (an entry in each of two ordered indexes, each with its own
    /// copy of the path; up to ~150 bytes more for the first watch on a
    /// path, which gets its own set of watchers): ~0.3-0.7 GB at worst.
    /// Estimated from type sizes, not measured. Without it the per-session
    /// bound times `sessions_max` allowed billions.
    pub watches_max: u64,
    /// Most bytes all sessions' reply caches hold together, as the caches
    /// estimate them: fixed costs per reply, multi step and cycle edge
    /// (`sessions::cost`, the same on every build), plus the strings it
    /// owns.
    /// Default 256 MiB. Each session's cache is bounded (1 MiB, or its one
    /// newest reply of up to ~1.2 MB), but times `sessions_max` that is
    /// ~120 GB at the defaults. Clients acknowledge replies with every
    /// heartbeat, so caches are normally small; 256 MiB keeps full caches
    /// for 256 sessions at once, or ~2.6 KB (about a dozen ordinary
    /// replies) for each of 100,000. Past it, the oldest unpinned replies of
    /// the sessions caching the most are dropped first; a retry of a
    /// dropped reply gets RetryUnknown, never a second apply.
    pub reply_cache_bytes_max: u64,
    /// The lock-delay of a lock node whose create gives none. Default 500
    /// ms: at most one second, as the brief asks; long enough for a holder
    /// cut off from the server to notice through its lease estimate, short
    /// enough to hand over quickly.
    pub lock_delay_ms_default: u64,
    /// The largest lock-delay a create may ask for. Default 60 s: a lock
    /// whose holder's session expired stays blocked at most this long, no
    /// longer than a generous session timeout.
    pub lock_delay_ms_max: u64,
    /// The longest TTL a timed hold may be created or renewed with.
    /// Default 7 days: longer than any checkout, booking or approval hold a
    /// ticket system keeps open, short enough that a hold whose taker
    /// vanished is gone within a week rather than never (a TTL of u64::MAX
    /// would keep a seat until someone forced it).
    pub hold_ttl_ms_max: u64,
    /// Most lock nodes one session may have waiting at once. Default
    /// 1,000: far more than a worker waits for (a few locks, or one
    /// multi-lock of a few dozen), and it bounds two pauses a session's
    /// waits can cause every other client: a deadlock search that must
    /// expand it (about a microsecond per wait: ~0.7 ms with 1,000 on each
    /// side, ~15 ms with 10,000) and the end of the session, whose waits
    /// go in one step (about 2 us each). `cargo bench --bench ops`, the
    /// "waits behind" rows.
    pub waits_per_session_max: u64,
    /// Most nodes one step deletes (or turns into zombies) on behalf of
    /// ending sessions, expired sessions it ends, zombies, TTL nodes and
    /// containers: a tick, or a close, does at most this much and leaves
    /// the rest to the next tick, which the server runs at once, letting go
    /// of the coordinator between. Default 1,000: about 1-2 ms of the
    /// coordinator's time (a deletion with its watches and hand-over costs
    /// about a microsecond), where closing a session with 100,000
    /// ephemerals in one step held every other client for ~120 ms. One
    /// session's waits go whole at the start of its end, so a step may go
    /// over by up to `waits_per_session_max`.
    pub step_deletes_max: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            session_timeout_ms_min: 1_000,
            session_timeout_ms_max: 120_000,
            data_bytes_max: count(limits::DATA_BYTES_MAX),
            sessions_max: 100_000,
            nodes_max: 10_000_000,
            tree_bytes_max: 1024 * 1024 * 1024,
            children_per_node_max: count(limits::CHILDREN_PER_NODE_MAX),
            children_page_max: 1_000,
            watches_per_session_max: count(limits::WATCHES_PER_SESSION_MAX),
            watches_max: 2_000_000,
            reply_cache_bytes_max: 256 * 1024 * 1024,
            lock_delay_ms_default: 500,
            lock_delay_ms_max: 60_000,
            hold_ttl_ms_max: 7 * 24 * 60 * 60 * 1000,
            waits_per_session_max: 1_000,
            step_deletes_max: 1_000,
        }
    }
}

/// One input to the state machine.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Open a new session. The secret is generated by the caller (the state
    /// machine has no randomness).
    OpenSession {
        /// The requested timeout; clamped to the configured bounds.
        timeout_ms: u64,
        /// The secret a client must present to resume the session.
        secret: Secret,
    },
    /// Resume a live session on a new connection.
    ResumeSession {
        /// The session to resume.
        session: SessionId,
        /// Must equal the secret given at open.
        secret: Secret,
        /// Cached replies up to this xid are forgotten.
        last_xid_received: Xid,
    },
    /// A request from a session.
    Request {
        /// The requesting session.
        session: SessionId,
        /// The attachment it came through: the `attach` of the grant that
        /// attached its connection. A request from an attachment the
        /// session has since left (it resumed elsewhere) is not applied:
        /// its client already learned from the newer attachment's grant
        /// which requests were applied. (An ended session answers every
        /// request `session_expired`, whichever attachment it came from.)
        attach: u64,
        /// The request id, strictly increasing within the session.
        xid: Xid,
        /// What to do.
        op: Op,
    },
    /// Sessions heard from since the last `Heard`, by heartbeats and reads
    /// that the server answered without a command of their own: each live
    /// one is heard from at this command's time, and forgets its cached
    /// replies up to its `ack` (as a ping's ack does). Its deadline moves
    /// only here, so that a log replayed without those heartbeats expires
    /// exactly the sessions the live server did.
    Heard(Vec<Heard>),
    /// Expire sessions, TTL nodes and empty containers whose time has come.
    Tick,
    /// From here on, apply with these bounds: a server started with other
    /// settings than its log last recorded proposes this first, so that a
    /// replay applies every command under the settings it was first
    /// applied under. Lowering the reply cache's budget drops replies to
    /// fit it; other bounds refuse only what comes after.
    Configure(Config),
}

/// One session heard from, for [`Command::Heard`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Heard {
    /// The session.
    pub session: SessionId,
    /// The highest xid whose reply its client said it has received (0:
    /// none said).
    pub ack: Xid,
}

/// What the coordinator granted on open or resume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionGrant {
    /// The session opened or resumed; for a new one, the zxid of its open.
    pub session: SessionId,
    /// The session's secret (the one given at open).
    pub secret: Secret,
    /// The timeout after clamping: the session expires at the first tick
    /// later than this many ms after the coordinator last heard from it.
    pub timeout_ms: u64,
    /// The coordinator's latest zxid.
    pub zxid: Zxid,
    /// The highest xid applied for this session (0 for a new one).
    pub last_xid_applied: Xid,
    /// This attachment's number: 0 at open, one more at each resume.
    /// Requests carry it (`Command::Request::attach`).
    pub attach: u64,
}

/// The direct answer to a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// For `OpenSession` and `ResumeSession`.
    Session(Result<SessionGrant, Refusal>),
    /// For `Request`.
    Reply(Reply),
    /// For a `Request` from an attachment its session has left: nothing
    /// was applied and the session was not touched (only the coordinator's
    /// time moved on, as with any command), and nobody is waiting for an
    /// answer.
    Stale,
    /// For `Tick` and `Heard`.
    Ticked,
}

/// The answer to a request as the state machine gives it: the wire's
/// reply with a [`Refusal`] (facts, no prose) for its error. The server
/// writes it out with [`Reply::into_wire`] when it sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The request's xid.
    pub xid: Xid,
    /// The coordinator's latest zxid when it answered.
    pub zxid: Zxid,
    /// The operation's result.
    pub result: Result<OpResult, Refusal>,
}

impl Reply {
    /// The reply as the client gets it, its error's message written by
    /// this build.
    pub fn into_wire(self) -> protocol::Reply {
        protocol::Reply {
            xid: self.xid,
            zxid: self.zxid,
            result: self.result.map_err(|refusal| refusal.to_reply()),
        }
    }
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SessionEnd {
    /// Not heard from for its timeout.
    Expired,
    /// Closed by its client.
    Closed,
}

/// Everything one `apply` produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// The answer to the command itself.
    pub outcome: Outcome,
    /// Watch events, in the order they fired, each for one session.
    pub events: Vec<(SessionId, WatchEvent)>,
    /// Sessions that ended in this step, in the order they ended; their
    /// connections should be told and closed. Their nodes may outlast the
    /// step (see `gone`).
    pub ended: Vec<(SessionId, SessionEnd)>,
    /// Ended sessions that left the session table in this step, their
    /// nodes all deleted (or made zombies): a close is complete, and an
    /// expiry may be reported, once its session is here.
    pub gone: Vec<SessionId>,
    /// Forced deletes in this step that overrode an owner or a token, for
    /// the server to log with who asked.
    pub forced: Vec<Forced>,
}

/// A forced delete that took a node from its owner or its token's holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forced {
    /// The session that asked.
    pub by: SessionId,
    /// The node's path.
    pub path: String,
    /// What the node was, and what became of it.
    pub node: ForcedNode,
}

/// What a forced delete removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForcedNode {
    /// A granted lock node of `owner`, who was told at once; the node stays
    /// as a zombie until `freed_at_ms` (its lock-delay), or was deleted at
    /// once if it had none (`None`).
    Holder {
        owner: SessionId,
        freed_at_ms: Option<u64>,
    },
    /// A waiting lock node of `owner`, deleted at once (it held nothing).
    Waiter { owner: SessionId },
    /// A zombie, ended before its lock-delay was over.
    Zombie,
    /// A timed hold, deleted without its token.
    Hold,
}

/// Side effects collected while one command is applied.
#[derive(Default)]
struct Effects {
    events: Vec<(SessionId, WatchEvent)>,
    ended: Vec<(SessionId, SessionEnd)>,
    gone: Vec<SessionId>,
    forced: Vec<Forced>,
}

impl Effects {
    fn into_output(self, outcome: Outcome) -> Output {
        Output {
            outcome,
            events: self.events,
            ended: self.ended,
            gone: self.gone,
            forced: self.forced,
        }
    }
}

/// The coordinator's whole state: the tree, the session table and the watch
/// table. Same commands in (with the same `now_ms`), same outputs out.
pub struct Coordinator {
    config: Config,
    tree: Tree,
    sessions: Sessions,
    watches: WatchTable,
    /// Sessions that have ended and still own nodes, finished in id order
    /// by later ticks.
    ending: BTreeSet<SessionId>,
    zxid: Zxid,
    /// No lock node is granted before this time, if set: see
    /// [`Coordinator::pause_grants_until`].
    grants_paused_until_ms: Option<u64>,
    /// The latest moment until which a holder of a lock granted by this
    /// coordinator may still act as its holder: see
    /// [`Coordinator::lease_horizon_ms`].
    lease_horizon_ms: u64,
    /// The time of the latest `apply`: no later one is applied at an
    /// earlier time. Part of the state, so that a replayed log clamps the
    /// same way (with a log, the time will be the proposer's clock stamped
    /// into each entry, and clocks can step back).
    now_ms: u64,
    /// Whether a `Command::Configure` was applied: the settings then come
    /// from the log, not from whoever made the coordinator.
    configured: bool,
    /// The zxid seen by the last `check_invariants`, to catch a decrease.
    /// Atomic rather than `Cell` so that the coordinator stays `Sync`.
    zxid_checked: AtomicU64,
    /// Steps the deadlock check has taken (see `deadlock_steps`), so that
    /// tests can bound its work by counting rather than timing.
    #[cfg(test)]
    deadlock_steps: AtomicU64,
}

impl Coordinator {
    /// An empty tree (just `/`, persistent, created at `zxid_start`) whose
    /// next write gets a zxid above `zxid_start`.
    pub fn new(config: Config, zxid_start: Zxid) -> Self {
        Coordinator {
            config,
            tree: Tree::new(zxid_start),
            sessions: Sessions::default(),
            watches: WatchTable::default(),
            ending: BTreeSet::new(),
            zxid: zxid_start,
            grants_paused_until_ms: None,
            lease_horizon_ms: 0,
            now_ms: 0,
            configured: false,
            zxid_checked: AtomicU64::new(zxid_start.0),
            #[cfg(test)]
            deadlock_steps: AtomicU64::new(0),
        }
    }

    /// Applies one command at time `now_ms` (milliseconds since the Unix
    /// epoch), or at the time of the previous apply if that is later: time
    /// never goes back for the state machine, whatever the caller's clock
    /// did.
    ///
    /// Never panics on any command. A rejected request or session command
    /// changes nothing but the session's liveness and retry bookkeeping
    /// (`last_heard`, `last_xid_applied`, the reply cache): no zxid is
    /// consumed and no event fires. `Output::events` must be delivered to
    /// their sessions before the reply, in order.
    pub fn apply(&mut self, command: Command, now_ms: u64) -> Output {
        let now_ms = now_ms.max(self.now_ms);
        self.now_ms = now_ms;
        let mut fx = Effects::default();
        let outcome = match command {
            Command::OpenSession { timeout_ms, secret } => {
                Outcome::Session(self.open_session(timeout_ms, secret, now_ms))
            }
            Command::ResumeSession {
                session,
                secret,
                last_xid_received,
            } => Outcome::Session(self.resume_session(session, &secret, last_xid_received, now_ms)),
            Command::Request {
                session,
                attach,
                xid,
                op,
            } => {
                if self.is_stale(session, attach) {
                    Outcome::Stale
                } else {
                    Outcome::Reply(self.request(session, xid, op, now_ms, &mut fx))
                }
            }
            Command::Heard(heard) => {
                for Heard { session, ack } in heard {
                    if self.sessions.alive(session) {
                        self.sessions.touch(session, now_ms);
                        self.cover_holder(session);
                        self.sessions.forget_through(session, ack);
                    }
                }
                Outcome::Ticked
            }
            Command::Tick => {
                self.tick(now_ms, &mut fx);
                Outcome::Ticked
            }
            Command::Configure(config) => {
                self.sessions.drop_to(config.reply_cache_bytes_max);
                self.config = config;
                self.configured = true;
                Outcome::Ticked
            }
        };
        fx.into_output(outcome)
    }

    /// Whether a request from `attach` comes from an attachment its live
    /// session has left (it resumed elsewhere since).
    fn is_stale(&self, session: SessionId, attach: u64) -> bool {
        self.sessions
            .get(session)
            .is_some_and(|s| s.ending.is_none() && s.attach != attach)
    }

    /// Answers a read (`get`, `exists`, `children`, `set_watches`) or a
    /// heartbeat (`ping`) from the current state, without a command: no
    /// zxid, no time, no deadline and no reply cache move. Only the
    /// server's own bookkeeping may: watches are set (and `set_watches`
    /// fires what changed since), because watches belong to the server a
    /// client is connected to, not to the replicated state. The caller
    /// reports the session as heard (and a ping's ack) in a later
    /// [`Command::Heard`]. A write is refused with `malformed` and changes
    /// nothing: it must be a command. A request from an attachment the
    /// session has left is `Outcome::Stale`, as in `apply`.
    pub fn read(&mut self, session: SessionId, attach: u64, xid: Xid, op: Op) -> Output {
        let mut fx = Effects::default();
        let outcome = match self.sessions.get(session) {
            _ if self.is_stale(session, attach) => Outcome::Stale,
            Some(s) if s.ending.is_none() => {
                let result = match op {
                    _ if op.is_write() => Err(Why::WriteAsRead.into()),
                    Op::Ping { .. } => Ok(OpResult::Pong),
                    op => self.execute(session, op, self.now_ms, &mut fx),
                };
                Outcome::Reply(Reply {
                    xid,
                    zxid: self.zxid,
                    result,
                })
            }
            _ => Outcome::Reply(Reply {
                xid,
                zxid: self.zxid,
                result: Err(session_expired(session)),
            }),
        };
        fx.into_output(outcome)
    }

    /// The latest zxid: the one taken by the most recent state change, or
    /// `zxid_start` before any.
    pub fn zxid(&self) -> Zxid {
        self.zxid
    }

    /// The earliest time at which a `Tick` could change anything (a session
    /// deadline, a TTL deadline or the end of a lock-delay), if any; empty
    /// containers are reaped at every tick. May be in the past (then tick
    /// now): it is 0 while an ending session or an empty container is left
    /// from a tick that ran out of its `Config::step_deletes_max`.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let backlog = !self.ending.is_empty() || self.tree.has_empty_container();
        [
            backlog.then_some(0),
            self.sessions.next_deadline_ms(),
            self.tree.next_ttl_deadline_ms(),
            self.tree.next_zombie_deadline_ms(),
            self.grants_paused_until_ms,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Grants no lock node before `until_ms`: nodes queue as usual, and the
    /// first `Tick` at or after `until_ms` grants every node that then
    /// qualifies (each queue with a zxid of its own as the token). A server
    /// restarted without its state calls this before serving, so that no
    /// lock is granted while a holder from its previous run may still
    /// believe it holds (see [`Coordinator::lease_horizon_ms`]). Must be
    /// called before any lock node exists; later calls are ignored, so that
    /// a grant already given is never in a paused queue.
    pub fn pause_grants_until(&mut self, until_ms: u64) {
        if self.tree.iter().all(|(_, node)| node.lock.is_none()) {
            self.grants_paused_until_ms = Some(until_ms);
        }
    }

    /// When lock grants resume, if they are paused.
    pub fn grants_paused_until_ms(&self) -> Option<u64> {
        self.grants_paused_until_ms
    }

    /// An upper bound on the moment until which some holder of a lock this
    /// coordinator granted may still act as its holder: the latest, over
    /// every session ever granted a lock, of its deadline (its client's
    /// lease estimate ends before it) plus the longest lock-delay it was
    /// granted under (the time the holder has to stop its work). Never
    /// decreases; 0 before the first grant. A server records it so that its
    /// successor can wait it out.
    pub fn lease_horizon_ms(&self) -> u64 {
        self.lease_horizon_ms
    }

    /// The lease horizon as it will be once `session` is heard from at
    /// `now_ms` (by a `Command::Heard` to come): what a lease file must
    /// cover before a heartbeat's reply tells the client its lease moved.
    pub fn lease_horizon_if_heard(&self, session: SessionId, now_ms: u64) -> u64 {
        let heard = self.sessions.get(session).and_then(|s| {
            let delay_ms = s.held_delay_ms_max?;
            let deadline_ms = now_ms
                .max(self.now_ms)
                .saturating_add(s.timeout_ms)
                .saturating_add(1);
            Some(deadline_ms.saturating_add(delay_ms))
        });
        self.lease_horizon_ms.max(heard.unwrap_or(0))
    }

    /// Raises the lease horizon to cover `session`'s current deadline, if
    /// it was ever granted a lock. Called whenever a deadline moves or a
    /// grant is given.
    fn cover_holder(&mut self, session: SessionId) {
        let Some(s) = self.sessions.get(session) else {
            return;
        };
        if let Some(delay_ms) = s.held_delay_ms_max {
            let until = s.deadline_ms().saturating_add(delay_ms);
            self.lease_horizon_ms = self.lease_horizon_ms.max(until);
        }
    }

    /// Number of zombies: lock nodes held through their lock-delay.
    #[cfg(test)]
    pub(crate) fn zombie_count(&self) -> usize {
        self.tree.zombie_count()
    }

    /// A live session's deadline (it expires at the first tick at or after
    /// it) and its timeout.
    pub fn session_deadline_ms(&self, session: SessionId) -> Option<(u64, u64)> {
        self.sessions
            .get(session)
            .filter(|s| s.ending.is_none())
            .map(|s| (s.deadline_ms(), s.timeout_ms))
    }

    /// The bounds it applies with, if a `Command::Configure` set them.
    pub fn configured(&self) -> Option<&Config> {
        self.configured.then_some(&self.config)
    }

    /// Every live session, as heard from (for a `Command::Heard` that
    /// gives each its full timeout again, as after a restart).
    pub fn live_sessions(&self) -> Vec<Heard> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.ending.is_none())
            .map(|(&session, _)| Heard {
                session,
                ack: Xid(0),
            })
            .collect()
    }

    /// Number of sessions in the table: live ones, and ended ones whose
    /// nodes are still being deleted (both count against
    /// `Config::sessions_max`).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Number of nodes, the root included.
    pub fn node_count(&self) -> usize {
        self.tree.len()
    }

    /// The bytes the tree holds as `Config::tree_bytes_max` counts them: the
    /// path and data bytes of every node, the root included.
    pub fn tree_bytes(&self) -> u64 {
        self.tree.bytes()
    }

    /// Whether `session` is alive (opened, and not closed or expired).
    pub fn session_alive(&self, session: SessionId) -> bool {
        self.sessions.alive(session)
    }

    /// Whether `session` has ended but still owns nodes that later ticks
    /// delete; it leaves through `Output::gone`.
    pub fn session_ending(&self, session: SessionId) -> bool {
        self.ending.contains(&session)
    }

    /// The number of watches `session` holds (0 for an unknown session).
    pub fn watch_count(&self, session: SessionId) -> usize {
        self.watches.count(session)
    }

    /// The number of watches all sessions hold, as `Config::watches_max`
    /// counts them.
    pub fn watch_count_total(&self) -> usize {
        self.watches.total()
    }

    /// The bytes all sessions' cached replies hold, as
    /// `Config::reply_cache_bytes_max` counts them.
    pub fn reply_cache_bytes(&self) -> u64 {
        self.sessions.replies_bytes()
    }

    /// Checks the invariants (every ephemeral owner is a live session and
    /// lists the node, every lock queue grants exactly the nodes its rules
    /// let through, each session's waits are its ungranted lock nodes and
    /// its lock node count is right, each queue's index of exclusive nodes
    /// matches it, the sessions' waits form no cycle, the path index
    /// matches the tree, child sets match the nodes, the tree's byte total
    /// matches its nodes, ephemerals have no children, every watch belongs
    /// to a live session, the two watch indexes and the watch total agree,
    /// each reply cache's byte total matches its replies and all of them
    /// together stay within their budget, no zxid in the
    /// tree is above the latest, the latest zxid did not decrease since the
    /// previous check); returns what is broken. Run after each `apply` in
    /// tests and debug builds.
    pub fn check_invariants(&self) -> Result<(), String> {
        let previous = Zxid(self.zxid_checked.fetch_max(self.zxid.0, Ordering::Relaxed));
        if self.zxid < previous {
            return Err(format!("zxid went back from {previous} to {}", self.zxid));
        }
        self.tree.check(self.zxid)?;
        self.sessions
            .check(self.zxid, self.config.reply_cache_bytes_max)?;
        self.watches.check()?;
        for (key, node) in self.tree.iter() {
            if let Some(owner) = node.owner {
                match self.sessions.get(owner) {
                    None => {
                        return Err(format!(
                            "ephemeral {} is owned by {owner}, which is not a live session",
                            node.path
                        ))
                    }
                    Some(s) if s.ephemerals.get(&node.czxid) != Some(&key) => {
                        return Err(format!(
                            "ephemeral {} is not listed by its owner {owner}",
                            node.path
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        for (id, session) in self.sessions.iter() {
            if let Some(delay_ms) = session.held_delay_ms_max {
                let until = session.deadline_ms().saturating_add(delay_ms);
                if self.lease_horizon_ms < until {
                    return Err(format!(
                        "session {id} was granted a lock and may act on it until {until}, \
                         past the lease horizon {}",
                        self.lease_horizon_ms
                    ));
                }
            }
            for (czxid, &key) in &session.ephemerals {
                let owned = self
                    .tree
                    .node_at(key)
                    .is_some_and(|n| n.czxid == *czxid && n.owner == Some(*id));
                if !owned {
                    return Err(format!(
                        "session {id} lists ephemeral key {key} (czxid {czxid}) it does not own"
                    ));
                }
            }
        }
        self.check_locks()?;
        for (id, session) in self.sessions.iter() {
            if session.ending.is_some() != self.ending.contains(id) {
                return Err(format!(
                    "session {id} is ending: {:?}, but in the ending set: {}",
                    session.ending,
                    self.ending.contains(id)
                ));
            }
        }
        if let Some(missing) = self.ending.iter().find(|&&s| !self.sessions.contains(s)) {
            return Err(format!(
                "ending session {missing} is not in the session table"
            ));
        }
        for (path, kind, session) in self.watches.iter() {
            if !self.sessions.alive(session) {
                return Err(format!(
                    "{kind:?} watch on {path} belongs to dead session {session}"
                ));
            }
            let present = self.tree.get(path).is_some();
            let consistent = match kind {
                WatchKind::Data | WatchKind::Child => present,
                WatchKind::Exist => !present,
                // Lock watches are implied by ownership, never registered.
                WatchKind::Lock => false,
            };
            if !consistent {
                return Err(format!(
                    "{kind:?} watch on {path} by {session} should have fired (node present: {present})"
                ));
            }
        }
        Ok(())
    }

    /// Takes the next zxid.
    fn next_zxid(&mut self) -> Zxid {
        // Zxids start near 2^51 (microseconds since the epoch); running out
        // of u64 is not a reachable state.
        self.zxid = Zxid(self.zxid.0.checked_add(1).expect("zxid space exhausted"));
        self.zxid
    }

    fn open_session(
        &mut self,
        timeout_ms: u64,
        secret: Secret,
        now_ms: u64,
    ) -> Result<SessionGrant, Refusal> {
        if count(self.sessions.len()) >= self.config.sessions_max {
            return Err(Why::SessionsFull {
                open: count(self.sessions.len()),
                max: self.config.sessions_max,
            }
            .into());
        }
        // Not `u64::clamp`: it panics if a misconfigured min exceeds max.
        let timeout_ms = timeout_ms
            .max(self.config.session_timeout_ms_min)
            .min(self.config.session_timeout_ms_max);
        let session = SessionId(self.next_zxid().0);
        self.sessions
            .open(session, secret.clone(), timeout_ms, now_ms);
        Ok(SessionGrant {
            session,
            secret,
            timeout_ms,
            zxid: self.zxid,
            last_xid_applied: Xid(0),
            attach: 0,
        })
    }

    fn resume_session(
        &mut self,
        session: SessionId,
        secret: &Secret,
        last_xid_received: Xid,
        now_ms: u64,
    ) -> Result<SessionGrant, Refusal> {
        let grant = match self.sessions.get(session) {
            Some(s) if s.secret == *secret && s.ending.is_none() => SessionGrant {
                session,
                secret: s.secret.clone(),
                timeout_ms: s.timeout_ms,
                zxid: self.zxid,
                last_xid_applied: s.last_xid_applied,
                attach: s.attach.saturating_add(1),
            },
            // One message for both cases, so a guesser learns nothing.
            _ => return Err(session_expired(session)),
        };
        if let Some(s) = self.sessions.get_mut(session) {
            s.attach = grant.attach;
        }
        self.sessions.forget_through(session, last_xid_received);
        self.sessions.pin_cached(session);
        self.sessions.touch(session, now_ms);
        self.cover_holder(session);
        self.watches.drop_session(session);
        Ok(grant)
    }

    /// Ends a session, and returns what that cost against
    /// `Config::step_deletes_max` (1, plus its waits). From here on the
    /// session answers no request, cannot be resumed, expires no more, gets
    /// no event and is in no wait: its watches and cached replies are
    /// dropped and its waiting lock nodes deleted (oldest first, a zxid
    /// and events each), all in this step, so that no queue grants it
    /// anything again and no deadlock search passes through it. Its other
    /// ephemerals go later, a bounded number per step (see
    /// [`Coordinator::finish_ending`]). A session already ending costs
    /// nothing.
    fn end_session(
        &mut self,
        session: SessionId,
        why: SessionEnd,
        now_ms: u64,
        fx: &mut Effects,
    ) -> usize {
        let waits: Vec<usize> = match self.sessions.get(session) {
            Some(s) if s.ending.is_none() => s.waiting.values().copied().collect(),
            _ => return 0,
        };
        self.watches.drop_session(session);
        self.sessions.end(session, why);
        // Deleted after the end is marked: the session's own delete, so
        // that it is told of none of them.
        for &key in &waits {
            let zxid = self.next_zxid();
            self.delete_node(key, zxid, Some(session), now_ms, fx);
        }
        self.ending.insert(session);
        fx.ended.push((session, why));
        waits.len().saturating_add(1)
    }

    /// Spends up to `*left` on an ending session: deleting its remaining
    /// ephemerals, oldest first, one each, and once none is left removing
    /// the session, one more (with a zxid), which reports it in
    /// `Output::gone`. After an expiry, a granted lock node with a
    /// lock-delay is not deleted but left ownerless and holding until the
    /// delay has passed: the holder may be cut off from the server, not
    /// dead, and still finishing its work. A close is the holder's own word
    /// that it is done: no delay.
    fn finish_ending(
        &mut self,
        session: SessionId,
        left: &mut usize,
        now_ms: u64,
        fx: &mut Effects,
    ) {
        let Some(why) = self.sessions.get(session).and_then(|s| s.ending) else {
            // Not reachable while the invariants hold; left in the set, it
            // would keep a tick's loop from ever ending.
            debug_assert!(
                false,
                "session {session} is in the ending set but not ending"
            );
            self.ending.remove(&session);
            *left = left.saturating_sub(1);
            return;
        };
        while *left > 0 {
            *left -= 1;
            let Some(key) = self
                .sessions
                .get(session)
                .and_then(|s| s.ephemerals.values().next().copied())
            else {
                self.next_zxid();
                self.sessions.remove(session);
                self.ending.remove(&session);
                fx.gone.push(session);
                return;
            };
            match self.zombie_delay_ms(key, Some(why)) {
                Some(delay_ms) => {
                    self.zombify(key, session, now_ms.saturating_add(delay_ms));
                }
                _ => {
                    let zxid = self.next_zxid();
                    self.delete_node(key, zxid, Some(session), now_ms, fx);
                }
            }
        }
    }

    /// A close: ends the session and deletes as much of what it owns as
    /// one step allows; later ticks finish it.
    fn close_session(&mut self, session: SessionId, now_ms: u64, fx: &mut Effects) {
        let cost = self.end_session(session, SessionEnd::Closed, now_ms, fx);
        let mut left = to_usize(self.config.step_deletes_max.max(1)).saturating_sub(cost);
        self.finish_ending(session, &mut left, now_ms, fx);
    }

    /// How long the lock node `key`, taken from an owner whose session is
    /// alive (`None`) or ended as `end`, stays as a zombie: its lock-delay,
    /// if it is granted and has one, unless its owner closed (the holder's
    /// own word that it is done). `None`: it goes at once.
    fn zombie_delay_ms(&self, key: usize, end: Option<SessionEnd>) -> Option<u64> {
        if end == Some(SessionEnd::Closed) {
            return None;
        }
        self.tree
            .node(key)
            .lock
            .as_deref()
            .filter(|lock| lock.granted.is_some() && lock.delay_ms > 0)
            .map(|lock| lock.delay_ms)
    }

    /// Takes the granted lock node `key` from its owner `session` and keeps
    /// it holding, ownerless, until `freed_at_ms`: the road every loss of a
    /// lock with a lock-delay takes, so that its holder has that long to
    /// stop before the next waiter is granted.
    fn zombify(&mut self, key: usize, session: SessionId, freed_at_ms: u64) {
        let czxid = self.tree.node(key).czxid;
        if let Some(s) = self.sessions.get_mut(session) {
            s.ephemerals.remove(&czxid);
            s.held.remove(&czxid);
        }
        self.tree.zombify(key, freed_at_ms);
    }

    /// Within one step's `Config::step_deletes_max`: ends overdue sessions
    /// (earliest deadline first, then by id), then finishes ending
    /// sessions (in id order), then deletes zombies whose lock-delay is
    /// over, due TTL nodes, and empty containers. What does not fit is left
    /// for the next tick, and `next_deadline_ms` says so.
    fn tick(&mut self, now_ms: u64, fx: &mut Effects) {
        // At least 1, so that every tick moves a backlog on.
        let mut left = to_usize(self.config.step_deletes_max.max(1));
        // Each costs at least 1: no more than `left` can be ended.
        for session in self.sessions.expired(now_ms, left) {
            if left == 0 {
                break;
            }
            left = left.saturating_sub(self.end_session(session, SessionEnd::Expired, now_ms, fx));
        }
        // Bounded: each pass spends from `left`.
        while left > 0 {
            let Some(&session) = self.ending.first() else {
                break;
            };
            self.finish_ending(session, &mut left, now_ms, fx);
        }
        if self
            .grants_paused_until_ms
            .is_some_and(|until| until <= now_ms)
        {
            self.grants_paused_until_ms = None;
            self.grant_all_queues(now_ms, fx);
        }
        // Bounded by `left`, and by the zombie index: every pop removes an
        // entry, and a deletion adds none.
        while left > 0 {
            let Some(key) = self.tree.pop_due_zombie(now_ms) else {
                break;
            };
            left -= 1;
            let zxid = self.next_zxid();
            self.delete_node(key, zxid, None, now_ms, fx);
        }
        // Bounded by `left`, and by the TTL index: every pop removes an
        // entry, and a deletion re-adds at most its parent, which is then
        // one node fewer.
        while left > 0 {
            let Some(key) = self.tree.pop_expired_ttl(now_ms) else {
                break;
            };
            left -= 1;
            let zxid = self.next_zxid();
            self.delete_node(key, zxid, None, now_ms, fx);
        }
        // Deleting a container may empty its parent container, which is
        // queued and reaped in this same loop: a chain goes in one tick if
        // `left` allows.
        while left > 0 {
            let Some(key) = self.tree.pop_empty_container() else {
                break;
            };
            left -= 1;
            let zxid = self.next_zxid();
            self.delete_node(key, zxid, None, now_ms, fx);
        }
    }

    /// Deletes a childless node at `zxid`, removed by session `by` (`None`:
    /// by the server), fires its watches, and for a lock node tells its
    /// owner and passes the grants on.
    fn delete_node(
        &mut self,
        key: usize,
        zxid: Zxid,
        by: Option<SessionId>,
        now_ms: u64,
        fx: &mut Effects,
    ) {
        let node = self.tree.remove(key, zxid);
        if let Some(owner) = node.owner {
            if let Some(s) = self.sessions.get_mut(owner) {
                s.ephemerals.remove(&node.czxid);
                s.waiting.remove(&node.czxid);
                s.held.remove(&node.czxid);
            }
        }
        let parent = latchkey_client::protocol::parent_path(&node.path).unwrap_or("/");
        let fired = self.watches.fire(
            &[
                (&node.path, WatchKind::Data, WatchEventKind::NodeDeleted),
                (&node.path, WatchKind::Child, WatchEventKind::NodeDeleted),
                (
                    parent,
                    WatchKind::Child,
                    WatchEventKind::NodeChildrenChanged,
                ),
            ],
            zxid,
        );
        // A live owner hears of its lock node deleted by anyone else, unless
        // a data watch of its own has just told it; its own delete (or its
        // session's end) tells it nothing.
        let tell_owner = node.owner.filter(|&owner| {
            by != Some(owner)
                && self.sessions.alive(owner)
                && !fired.iter().any(|(s, e)| {
                    *s == owner && e.kind == WatchEventKind::NodeDeleted && e.path == node.path
                })
        });
        fx.events.extend(fired);
        if node.lock.is_some() {
            self.lock_node_removed(&node.path, tell_owner, zxid, now_ms, fx);
        }
    }

    /// Creates a node at `zxid`, records its owner, fires its watches; a
    /// lock node joins its owner's waits and is granted at once if its
    /// queue lets it.
    fn create_node(
        &mut self,
        new: tree::NewNode,
        zxid: Zxid,
        now_ms: u64,
        fx: &mut Effects,
    ) -> usize {
        let owner = new.owner;
        let is_lock = new.lock.is_some();
        debug_assert_eq!(owner.is_some(), new.kind == NodeKind::Ephemeral);
        let key = self.tree.insert(new, zxid, now_ms);
        if let Some(owner) = owner {
            if let Some(s) = self.sessions.get_mut(owner) {
                s.ephemerals.insert(zxid, key);
                if is_lock {
                    s.waiting.insert(zxid, key);
                }
            }
        }
        let path = self.tree.node(key).path.clone();
        let parent = latchkey_client::protocol::parent_path(&path).unwrap_or("/");
        let fired = self.watches.fire(
            &[
                (&path, WatchKind::Exist, WatchEventKind::NodeCreated),
                (
                    parent,
                    WatchKind::Child,
                    WatchEventKind::NodeChildrenChanged,
                ),
            ],
            zxid,
        );
        fx.events.extend(fired);
        if is_lock {
            let parent_key = latchkey_client::protocol::parent_path(&path)
                .and_then(|p| self.tree.key(p))
                .expect("a live node's parent is live");
            // Joining at the back lets no other node through: only the new
            // node can be granted here, and its owner learns it from the
            // create's stat, not from an event.
            self.grant_joined(parent_key, key, zxid, now_ms);
        }
        key
    }
}

/// The one answer for an unknown session and a wrong secret.
fn session_expired(session: SessionId) -> Refusal {
    Why::SessionExpired { session }.into()
}

//! The async Rust client of latchkey, a ZooKeeper-style lock coordinator.
//!
//! [`Client::connect`] opens a session; the client keeps it alive with
//! heartbeats, reconnects and resumes it when a connection breaks, and
//! reports where it stands through [`Client::session_status`]. Reads can set
//! one-shot [`Watch`]es. The wire contract is in [`protocol`].
//!
//! The [`recipes`] build locks on the server's lock queues: [`Lock`],
//! [`Semaphore`], [`RwLock`], [`MultiLock`], [`Election`], and the timed
//! [`Hold`] of a resource across requests.

mod client;
mod error;
#[cfg(test)]
mod fake_server_tests;
pub mod protocol;
pub mod recipes;
mod session;

pub use client::watches::Watch;
pub use client::{
    Client, ClientOptions, CreateOptions, Created, Forced, SessionState, SessionStatus,
};
pub use error::ClientError;
pub use protocol::{
    Data, ErrorCode, LockMode, LockSpec, MultiOp, MultiResult, NodeKind, Op, OpResult, SessionId,
    Stat, WaitEdge, WatchEvent, WatchEventKind, WatchKind, Zxid,
};
pub use recipes::{
    Election, Hold, HoldToken, Leader, LeaderWatch, Leadership, Lock, LockGuard, LockNode,
    LockState, LostReason, MultiLock, MultiLockGuard, RwLock, Semaphore,
};

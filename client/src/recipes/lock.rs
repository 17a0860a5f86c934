//! The mutex recipe, and the queue logic the other lock recipes share.

use std::future::Future;
use std::time::Duration;

use tokio::time::{timeout_at, Instant};

use super::lock_node::{LockNode, LockState, LostReason};
use crate::error::ClientError;
use crate::protocol::{child_path, Data, LockMode, LockSpec, Zxid};
use crate::Client;

use super::{millis, LOCK_PREFIX};

/// A fair, queued mutex on a path: holders get it one at a time, in the
/// order they asked.
///
/// Each acquire creates the ephemeral sequential node `{path}/lock-<n>`
/// (with `{path}` and its missing ancestors as container nodes, which the
/// server removes once the queue is empty). The server grants nodes in
/// queue order and tells the owner, so waiting costs no polling and a
/// release wakes exactly the next waiter. If a holder's session ends, its
/// node goes and the lock passes on: after an expiry, only once the
/// lock-delay has passed too ([`Lock::lock_delay`]).
///
/// A `Lock` is a description, cheap to clone; every acquire makes a new
/// node, so one `Lock` can be acquired again after a release (a second
/// acquire while holding would wait for itself: the server refuses it as a
/// deadlock).
#[derive(Clone, Debug)]
pub struct Lock {
    client: Client,
    path: String,
    data: Data,
    delay: Option<Duration>,
    mode: LockMode,
}

impl Lock {
    /// A mutex on `path` (a canonical path, e.g. `/locks/order-42`), taken
    /// through `client`'s session.
    pub fn new(client: &Client, path: impl Into<String>) -> Lock {
        Lock {
            client: client.clone(),
            path: path.into(),
            data: Data::default(),
            delay: None,
            mode: LockMode::Exclusive,
        }
    }

    pub(crate) fn with_mode(mut self, mode: LockMode) -> Lock {
        self.mode = mode;
        self
    }

    /// Stores `data` in each lock node: a description of the holder (host,
    /// pid, job) that anyone can read from the queue.
    pub fn data(mut self, data: impl Into<Data>) -> Lock {
        self.data = data.into();
        self
    }

    /// How long the lock stays with a holder whose session *expired* before
    /// passing on (a holder cut off from the server may still be finishing
    /// its work). Default: the server's (500 ms unless configured); zero
    /// turns it off. A release or a close passes the lock at once.
    pub fn lock_delay(mut self, delay: Duration) -> Lock {
        self.delay = Some(delay);
        self
    }

    /// The locked path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Waits until this session holds the lock.
    ///
    /// # Errors
    /// - `Deadlock { cycle, .. }`: waiting would close a cycle of sessions
    ///   waiting on each other (e.g. this session holds a lock that the
    ///   holder of this one waits for); nothing was queued.
    /// - `NoNode`: this waiter's node was deleted by someone else before the
    ///   grant.
    /// - `InvalidPath`, `InvalidArgument` (no round trip), `SessionExpired`,
    ///   `Closed`, and the create's errors (`NoChildrenForEphemerals`,
    ///   `LimitExceeded`, ...).
    ///
    /// # Cancel safety
    /// Safe: dropping the future deletes this waiter's node in the
    /// background (at once if created, else as soon as the create's reply
    /// arrives), so an abandoned waiter never gets, or blocks, the lock.
    pub async fn acquire(&self) -> Result<LockGuard, ClientError> {
        let guard = self.acquire_until(None).await?;
        guard.ok_or_else(|| {
            ClientError::protocol("an acquire without a deadline ended without the lock")
        })
    }

    /// Takes the lock if it is free now, in one round trip; else leaves the
    /// queue (one more round trip) and returns `None`.
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    ///
    /// # Cancel safety
    /// Safe, as [`Lock::acquire`].
    pub async fn try_acquire(&self) -> Result<Option<LockGuard>, ClientError> {
        let node = self.join().await?;
        if let Some(token) = node.token() {
            return Ok(Some(LockGuard { node, token }));
        }
        leave(node).await?;
        Ok(None)
    }

    /// As [`Lock::acquire`], but gives up after `timeout` (counting the
    /// create): then it leaves the queue and returns `None`.
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    ///
    /// # Cancel safety
    /// Safe, as [`Lock::acquire`].
    pub async fn acquire_timeout(
        &self,
        timeout: Duration,
    ) -> Result<Option<LockGuard>, ClientError> {
        self.acquire_until(Some(super::deadline_after(timeout)))
            .await
    }

    pub(crate) async fn acquire_until(
        &self,
        deadline: Option<Instant>,
    ) -> Result<Option<LockGuard>, ClientError> {
        let mut node = match deadline {
            None => self.join().await?,
            // A create cut off here is deleted once its reply arrives.
            Some(deadline) => match timeout_at(deadline, self.join()).await {
                Ok(node) => node?,
                Err(_) => return Ok(None),
            },
        };
        let granted = match deadline {
            None => node.granted().await.map(Some),
            Some(deadline) => match timeout_at(deadline, node.granted()).await {
                Ok(granted) => granted.map(Some),
                Err(_) => Ok(node.token()),
            },
        };
        match granted {
            Ok(Some(token)) => Ok(Some(LockGuard { node, token })),
            Ok(None) => {
                leave(node).await?;
                Ok(None)
            }
            // Dropping the node deletes it (if it is still there).
            Err(e) => Err(e),
        }
    }

    /// Creates this waiter's node.
    async fn join(&self) -> Result<LockNode, ClientError> {
        if let LockMode::Semaphore { permits: 0 } = self.mode {
            return Err(ClientError::invalid_argument(format!(
                "a semaphore on {} with 0 permits could never be taken (give 1 or more)",
                self.path
            )));
        }
        let delay_ms = match self.delay {
            None => None,
            Some(d) => Some(millis(d, "lock-delay")?),
        };
        let spec = LockSpec {
            mode: self.mode,
            delay_ms,
        };
        crate::protocol::validate_path(&self.path)
            .map_err(|e| ClientError::invalid_path(e, None))?;
        let prefix = child_path(&self.path, LOCK_PREFIX);
        self.client
            .create_lock(&prefix, self.data.clone(), spec)
            .await
    }
}

/// Leaves a queue without the lock: deletes the node, which may have been
/// granted meanwhile (its delete then releases it). A node already gone is
/// no error: the aim was to be out of the queue.
async fn leave(node: LockNode) -> Result<(), ClientError> {
    match node.delete().await {
        Ok(()) | Err(ClientError::NoNode { .. }) | Err(ClientError::BadToken { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A held lock (or semaphore permit, or read or write lock).
///
/// The lock is held until [`LockGuard::release`], until the guard is
/// dropped (the node is then deleted in the background, soon), or until the
/// session ends. Check [`LockGuard::lost`] while working under the lock:
/// it resolves before the server could give the lock to anyone else.
#[derive(Debug)]
#[must_use = "dropping the guard releases the lock"]
pub struct LockGuard {
    node: LockNode,
    token: Zxid,
}

impl LockGuard {
    /// The fencing token: the zxid of the write that granted this node.
    /// It strictly increases across successive holders of any lock (shared
    /// holders granted by one write share it), so a storage service that
    /// remembers the highest token it saw can refuse a stale holder.
    pub fn token(&self) -> Zxid {
        self.token
    }

    /// The lock node's path (`{path}/lock-<n>`).
    pub fn node(&self) -> &str {
        self.node.path()
    }

    /// The zxid that created the node: its place in the queue.
    pub fn czxid(&self) -> Zxid {
        self.node.czxid()
    }

    /// How many `LockGranted` events the server pushed for this node: 0 if
    /// it was granted in the create's reply, 1 if after waiting (a resume of
    /// the session re-confirms the grant and can add one).
    pub fn grant_events(&self) -> u64 {
        self.node.grant_events()
    }

    /// The node's state as the client last heard (granted, unless the lock
    /// was lost).
    pub fn state(&self) -> LockState {
        self.node.state()
    }

    /// Resolves once the lock may be lost, with the reason: the session
    /// expired or the client closed, the node was deleted by someone else,
    /// or the client has heard nothing from the server until its lease end
    /// (which comes before the server's expiry, and so before the lock can
    /// pass on). Stop acting on the lock when it resolves. Resolves at once
    /// if the lock may already be lost. The future owns what it needs.
    ///
    /// # Cancel safety
    /// Safe: it only observes; make another at any time.
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        self.node.lost()
    }

    /// Whether the lock may be lost now, by the rules of
    /// [`LockGuard::lost`].
    pub fn is_lost(&self) -> bool {
        self.node.is_lost()
    }

    /// Releases the lock: deletes the node, in one round trip. The next
    /// waiter is granted by the same write.
    ///
    /// # Errors
    /// `NoNode` or `BadToken` if the node was already gone (the lock had
    /// been lost); `SessionExpired` or `Closed` if the session ended (its
    /// nodes went with it).
    ///
    /// # Cancel safety
    /// Safe: once queued the delete is sent even if the future is dropped; dropped earlier, the guard's drop deletes the node
    /// in the background.
    pub async fn release(self) -> Result<(), ClientError> {
        self.node.delete().await
    }
}

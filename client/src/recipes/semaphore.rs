//! The counting semaphore recipe.

use std::time::Duration;

use crate::error::ClientError;
use crate::protocol::{Data, LockMode};
use crate::Client;

use super::{Lock, LockGuard};

/// At most `permits` holders at a time on a path, granted in queue order.
///
/// Each acquire queues a node `{path}/lock-<n>`; the server grants it once
/// fewer than `permits` nodes are ahead of it. Every user of one path must
/// give the same `permits` (each node is judged by its own count). Permits
/// are [`LockGuard`]s: each has its own fencing token, and goes with its
/// holder's session as a lock does.
#[derive(Clone, Debug)]
pub struct Semaphore {
    lock: Lock,
}

impl Semaphore {
    /// A semaphore of `permits` on `path`, taken through `client`'s session.
    /// A count of 0 is refused at acquire with `InvalidArgument`.
    pub fn new(client: &Client, path: impl Into<String>, permits: u32) -> Semaphore {
        Semaphore {
            lock: Lock::new(client, path).with_mode(LockMode::Semaphore { permits }),
        }
    }

    /// Stores `data` (a description of the holder) in each node.
    pub fn data(mut self, data: impl Into<Data>) -> Semaphore {
        self.lock = self.lock.data(data);
        self
    }

    /// As [`Lock::lock_delay`], for each permit.
    pub fn lock_delay(mut self, delay: Duration) -> Semaphore {
        self.lock = self.lock.lock_delay(delay);
        self
    }

    /// Waits for a permit.
    ///
    /// # Errors
    /// As [`Lock::acquire`]; `InvalidArgument` for 0 permits.
    ///
    /// # Cancel safety
    /// Safe: dropping the future deletes this waiter's node in the
    /// background.
    pub async fn acquire(&self) -> Result<LockGuard, ClientError> {
        self.lock.acquire().await
    }

    /// Takes a permit if one is free now (one round trip), else leaves the
    /// queue and returns `None`.
    ///
    /// # Errors
    /// As [`Semaphore::acquire`].
    ///
    /// # Cancel safety
    /// Safe, as [`Semaphore::acquire`].
    pub async fn try_acquire(&self) -> Result<Option<LockGuard>, ClientError> {
        self.lock.try_acquire().await
    }

    /// Waits for a permit for at most `timeout`; then leaves the queue and
    /// returns `None`.
    ///
    /// # Errors
    /// As [`Semaphore::acquire`].
    ///
    /// # Cancel safety
    /// Safe, as [`Semaphore::acquire`].
    pub async fn acquire_timeout(
        &self,
        timeout: Duration,
    ) -> Result<Option<LockGuard>, ClientError> {
        self.lock.acquire_timeout(timeout).await
    }
}

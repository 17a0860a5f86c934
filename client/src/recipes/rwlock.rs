//! The read-write lock recipe.

use std::time::Duration;

use crate::error::ClientError;
use crate::protocol::{Data, LockMode};
use crate::Client;

use super::{Lock, LockGuard};

/// Many readers or one writer on a path, in arrival order.
///
/// Readers and writers wait in one queue (`{path}/lock-<n>`): a reader is
/// granted when no writer is ahead of it, a writer when it is first. So a
/// writer waits only for those who came before it, and readers that come
/// after a waiting writer wait behind it: neither side starves.
#[derive(Clone, Debug)]
pub struct RwLock {
    write: Lock,
    read: Lock,
}

impl RwLock {
    /// A read-write lock on `path`, taken through `client`'s session.
    pub fn new(client: &Client, path: impl Into<String>) -> RwLock {
        let write = Lock::new(client, path);
        let read = write.clone().with_mode(LockMode::Shared);
        RwLock { write, read }
    }

    /// Stores `data` (a description of the holder) in each node.
    pub fn data(self, data: impl Into<Data>) -> RwLock {
        let data = data.into();
        RwLock {
            write: self.write.data(data.clone()),
            read: self.read.data(data),
        }
    }

    /// As [`Lock::lock_delay`], for readers and writers.
    pub fn lock_delay(self, delay: Duration) -> RwLock {
        RwLock {
            write: self.write.lock_delay(delay),
            read: self.read.lock_delay(delay),
        }
    }

    /// Waits for a read (shared) lock.
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    ///
    /// # Cancel safety
    /// Safe: dropping the future deletes this waiter's node in the
    /// background.
    pub async fn read(&self) -> Result<LockGuard, ClientError> {
        self.read.acquire().await
    }

    /// Waits for the write (exclusive) lock.
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    ///
    /// # Cancel safety
    /// Safe, as [`RwLock::read`].
    pub async fn write(&self) -> Result<LockGuard, ClientError> {
        self.write.acquire().await
    }

    /// Takes a read lock if granted at once, else leaves the queue: `None`.
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    ///
    /// # Cancel safety
    /// Safe, as [`RwLock::read`].
    pub async fn try_read(&self) -> Result<Option<LockGuard>, ClientError> {
        self.read.try_acquire().await
    }

    /// Takes the write lock if granted at once, else leaves the queue: `None`.
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    ///
    /// # Cancel safety
    /// Safe, as [`RwLock::read`].
    pub async fn try_write(&self) -> Result<Option<LockGuard>, ClientError> {
        self.write.try_acquire().await
    }

    /// Waits at most `timeout` for a read lock; then leaves the queue: `None`.
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    ///
    /// # Cancel safety
    /// Safe, as [`RwLock::read`].
    pub async fn read_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>, ClientError> {
        self.read.acquire_timeout(timeout).await
    }

    /// Waits at most `timeout` for the write lock; then leaves the queue:
    /// `None`.
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    ///
    /// # Cancel safety
    /// Safe, as [`RwLock::read`].
    pub async fn write_timeout(&self, timeout: Duration) -> Result<Option<LockGuard>, ClientError> {
        self.write.acquire_timeout(timeout).await
    }
}

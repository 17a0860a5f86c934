//! Several locks taken all or nothing, in one global order.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

use super::lock_node::LostReason;
use crate::error::ClientError;
use crate::protocol::{Data, Zxid};
use crate::Client;

use super::{Lock, LockGuard};

/// Mutexes on several paths, taken together.
///
/// The paths are sorted and deduplicated, and taken one after the other in
/// that order: two `MultiLock`s sharing paths take them in the same order,
/// so they cannot deadlock each other (lock ordering). If a step fails or
/// times out, the locks already taken are released: all or nothing.
#[derive(Clone, Debug)]
pub struct MultiLock {
    locks: Vec<Lock>,
}

impl MultiLock {
    /// Mutexes on `paths` (sorted and deduplicated here), taken through
    /// `client`'s session.
    pub fn new<I, P>(client: &Client, paths: I) -> MultiLock
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        let mut paths: Vec<String> = paths.into_iter().map(Into::into).collect();
        paths.sort();
        paths.dedup();
        MultiLock {
            locks: paths.into_iter().map(|p| Lock::new(client, p)).collect(),
        }
    }

    /// Stores `data` (a description of the holder) in each node.
    pub fn data(mut self, data: impl Into<Data>) -> MultiLock {
        let data = data.into();
        self.locks = self
            .locks
            .into_iter()
            .map(|l| l.data(data.clone()))
            .collect();
        self
    }

    /// As [`Lock::lock_delay`], for each lock.
    pub fn lock_delay(mut self, delay: Duration) -> MultiLock {
        self.locks = self
            .locks
            .into_iter()
            .map(|l| l.lock_delay(delay))
            .collect();
        self
    }

    /// The paths, in the order they are taken.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.locks.iter().map(Lock::path)
    }

    /// Waits until this session holds every lock.
    ///
    /// # Errors
    /// The first error of a step (as [`Lock::acquire`]); the locks taken
    /// before it are released first.
    ///
    /// # Cancel safety
    /// Safe: dropping the future deletes the nodes taken or queued so far in
    /// the background.
    pub async fn acquire(&self) -> Result<MultiLockGuard, ClientError> {
        self.acquire_until(None).await?.ok_or_else(|| {
            ClientError::protocol("a multi-lock acquire without a deadline ended without the locks")
        })
    }

    /// As [`MultiLock::acquire`], but gives up after `timeout` in all:
    /// releases what it took and returns `None`.
    ///
    /// # Errors
    /// As [`MultiLock::acquire`].
    ///
    /// # Cancel safety
    /// Safe, as [`MultiLock::acquire`].
    pub async fn acquire_timeout(
        &self,
        timeout: Duration,
    ) -> Result<Option<MultiLockGuard>, ClientError> {
        self.acquire_until(Some(super::deadline_after(timeout)))
            .await
    }

    async fn acquire_until(
        &self,
        deadline: Option<Instant>,
    ) -> Result<Option<MultiLockGuard>, ClientError> {
        let mut guards = Vec::with_capacity(self.locks.len());
        for lock in &self.locks {
            match lock.acquire_until(deadline).await {
                Ok(Some(guard)) => guards.push(guard),
                Ok(None) => {
                    release_all(guards).await;
                    return Ok(None);
                }
                Err(e) => {
                    release_all(guards).await;
                    return Err(e);
                }
            }
        }
        Ok(Some(MultiLockGuard { guards }))
    }
}

/// Releases `guards`, one round trip for all; failures are left to the
/// background deletes (a node already gone needs nothing).
async fn release_all(guards: Vec<LockGuard>) {
    let _ = futures_util::future::join_all(guards.into_iter().map(LockGuard::release)).await;
}

/// Every lock of a [`MultiLock`], held together.
#[derive(Debug)]
#[must_use = "dropping the guard releases the locks"]
pub struct MultiLockGuard {
    guards: Vec<LockGuard>,
}

impl MultiLockGuard {
    /// Each locked path with its fencing token, in the order taken.
    pub fn tokens(&self) -> Vec<(String, Zxid)> {
        self.guards
            .iter()
            .map(|g| (queue_of(g.node()).to_string(), g.token()))
            .collect()
    }

    /// The fencing token of the lock on `path`, if it is one of them.
    pub fn token(&self, path: &str) -> Option<Zxid> {
        self.guards
            .iter()
            .find(|g| queue_of(g.node()) == path)
            .map(LockGuard::token)
    }

    /// The guards, in the order taken.
    pub fn guards(&self) -> &[LockGuard] {
        &self.guards
    }

    /// Resolves once any of the locks may be lost (see
    /// [`LockGuard::lost`]), with that lock's path and reason.
    ///
    /// # Cancel safety
    /// Safe: it only observes.
    pub fn lost(&self) -> impl Future<Output = (String, LostReason)> + Send + 'static {
        type Lost = Pin<Box<dyn Future<Output = (String, LostReason)> + Send>>;
        let each: Vec<Lost> = self
            .guards
            .iter()
            .map(|g| {
                let path = queue_of(g.node()).to_string();
                let lost = g.lost();
                Box::pin(async move { (path, lost.await) }) as Lost
            })
            .collect();
        async move {
            if each.is_empty() {
                return std::future::pending().await;
            }
            futures_util::future::select_all(each).await.0
        }
    }

    /// Whether any of the locks may be lost now.
    pub fn is_lost(&self) -> bool {
        self.guards.iter().any(LockGuard::is_lost)
    }

    /// Releases every lock (their deletes go out together: one round trip).
    ///
    /// # Errors
    /// The first failure (as [`LockGuard::release`]); the other locks are
    /// released anyway.
    ///
    /// # Cancel safety
    /// Safe: the guards whose deletes were not queued yet are deleted in the
    /// background as they drop.
    pub async fn release(self) -> Result<(), ClientError> {
        let results =
            futures_util::future::join_all(self.guards.into_iter().map(LockGuard::release)).await;
        results.into_iter().collect()
    }
}

/// The lock path a lock node belongs to.
fn queue_of(node: &str) -> &str {
    crate::protocol::parent_path(node).unwrap_or(node)
}

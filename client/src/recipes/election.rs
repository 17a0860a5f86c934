//! Leader election: one leader at a time, the next candidate in line takes
//! over when it goes.

use std::future::Future;
use std::time::{Duration, SystemTime};

use super::lock_node::LostReason;
use crate::error::ClientError;
use crate::protocol::{child_path, Zxid};
use crate::Client;

use super::{system_time, Lock, LockGuard, LOCK_PREFIX};

/// Bound on re-reads when the queue changes under [`Election::leader`].
const READ_ATTEMPTS_MAX: usize = 32;

/// Pause before re-reading a queue whose first node is not granted yet (a
/// state the server should not show for an exclusive queue; the pause
/// keeps a surprise from becoming a busy loop).
const UNGRANTED_RETRY: Duration = Duration::from_millis(20);

/// An election on a path: candidates queue on an exclusive lock whose node
/// holds the candidate's id; the holder leads.
///
/// The leader is the holder of the lock: at most one at a time, and when its
/// session ends the next candidate in line leads (after an expiry, once the
/// lock-delay has passed as well). Anyone can read the leader
/// ([`Election::leader`]) or follow it ([`Election::observe`]) without
/// campaigning.
#[derive(Clone, Debug)]
pub struct Election {
    lock: Lock,
    id: String,
}

/// The current leader of an election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    /// The candidate id it campaigned with (lossy UTF-8).
    pub id: String,
    /// Its fencing token: strictly greater for every later leader.
    pub token: Zxid,
    /// When it became leader (server clock).
    pub since: SystemTime,
    /// Its node in the queue.
    pub node: String,
}

impl Election {
    /// A candidate `candidate_id` (stored in its node, for others to read)
    /// for the election on `path`, campaigning through `client`'s session.
    pub fn new(client: &Client, path: impl Into<String>, candidate_id: impl Into<String>) -> Self {
        let id = candidate_id.into();
        Election {
            lock: Lock::new(client, path).data(id.as_bytes()),
            id,
        }
    }

    /// As [`Lock::lock_delay`]: how long leadership stays with a leader
    /// whose session expired before it passes on.
    pub fn lock_delay(mut self, delay: Duration) -> Self {
        self.lock = self.lock.lock_delay(delay);
        self
    }

    /// Waits until this candidate leads.
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    ///
    /// # Cancel safety
    /// Safe: dropping the future withdraws the candidacy (its node is
    /// deleted in the background).
    pub async fn campaign(&self) -> Result<Leadership, ClientError> {
        let guard = self.lock.acquire().await?;
        Ok(Leadership {
            guard,
            id: self.id.clone(),
        })
    }

    /// The leader of the election on `path` now, or `None` if nobody leads.
    /// A leader whose session expired still leads until its lock-delay has
    /// passed (its node stays).
    ///
    /// # Errors
    /// `InvalidPath`, `SessionExpired`, `Closed`.
    ///
    /// # Cancel safety
    /// Safe: reads only.
    pub async fn leader(client: &Client, path: &str) -> Result<Option<Leader>, ClientError> {
        for _ in 0..READ_ATTEMPTS_MAX {
            let children = match client.children(path).await {
                Ok((children, _)) => children,
                Err(ClientError::NoNode { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            match read_first(client, path, &children).await? {
                First::Leader(leader) => return Ok(leader),
                First::Gone => continue,
                First::Ungranted => tokio::time::sleep(UNGRANTED_RETRY).await,
            }
        }
        Ok(None)
    }

    /// Follows the leader of the election on `path`, without campaigning.
    pub fn observe(client: &Client, path: impl Into<String>) -> LeaderWatch {
        LeaderWatch {
            client: client.clone(),
            path: path.into(),
            last: None,
        }
    }
}

/// What the first node of a queue says.
enum First {
    Leader(Option<Leader>),
    /// It went between the listing and the read: list again.
    Gone,
    /// Not granted (yet).
    Ungranted,
}

async fn read_first(
    client: &Client,
    path: &str,
    children: &[String],
) -> Result<First, ClientError> {
    // Children come sorted, and lock nodes share a prefix: the first is the
    // oldest, so the holder of an exclusive queue.
    let Some(first) = children.iter().find(|c| c.starts_with(LOCK_PREFIX)) else {
        return Ok(First::Leader(None));
    };
    let node = child_path(path, first);
    let (data, stat) = match client.get(&node).await {
        Ok(read) => read,
        Err(ClientError::NoNode { .. }) => return Ok(First::Gone),
        Err(e) => return Err(e),
    };
    let Some(grant) = stat.lock.and_then(|l| l.granted) else {
        return Ok(First::Ungranted);
    };
    Ok(First::Leader(Some(Leader {
        id: String::from_utf8_lossy(&data).into_owned(),
        token: grant.token,
        since: system_time(grant.at_ms),
        node,
    })))
}

/// This candidate's leadership, held until resigned, dropped, or lost.
#[derive(Debug)]
#[must_use = "dropping the leadership resigns it"]
pub struct Leadership {
    guard: LockGuard,
    id: String,
}

impl Leadership {
    /// The fencing token of this term: strictly greater for every later
    /// leader. Pass it with the leader's writes.
    pub fn token(&self) -> Zxid {
        self.guard.token()
    }

    /// The candidate id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Resolves once the leadership may be lost (see [`LockGuard::lost`]),
    /// before anyone else can lead: stop leading then.
    ///
    /// # Cancel safety
    /// Safe: it only observes.
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        self.guard.lost()
    }

    /// Whether the leadership may be lost now.
    pub fn is_lost(&self) -> bool {
        self.guard.is_lost()
    }

    /// Steps down (one round trip): the next candidate leads at once.
    ///
    /// # Errors
    /// As [`LockGuard::release`].
    ///
    /// # Cancel safety
    /// Safe, as [`LockGuard::release`].
    pub async fn resign(self) -> Result<(), ClientError> {
        self.guard.release().await
    }
}

/// Follows an election's leader: see [`LeaderWatch::changed`].
#[derive(Debug)]
pub struct LeaderWatch {
    client: Client,
    path: String,
    /// The leader last reported (by node and token); `None` before the first.
    last: Option<Option<(String, Zxid)>>,
}

impl LeaderWatch {
    /// The first call returns the current leader (`None`: nobody leads);
    /// each later call waits for a different one and returns it. Changes
    /// quicker than a round trip can be coalesced: the latest leader is
    /// returned, never a stale one.
    ///
    /// # Errors
    /// `InvalidPath`, `SessionExpired`, `Closed`.
    ///
    /// # Cancel safety
    /// Safe: a dropped call loses nothing; the next call compares with the
    /// leader last returned.
    pub async fn changed(&mut self) -> Result<Option<Leader>, ClientError> {
        loop {
            let (children, watch) = match self.client.children_watch(&self.path).await {
                Ok((children, _, watch)) => (children, watch),
                Err(ClientError::NoNode { .. }) => {
                    // No queue: nobody leads. Wait for it to appear.
                    let (stat, created) = self.client.exists_watch(&self.path).await?;
                    if stat.is_none() {
                        if let Some(leader) = self.report(None) {
                            return Ok(leader);
                        }
                        created.await?;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            match read_first(&self.client, &self.path, &children).await? {
                First::Leader(leader) => {
                    if let Some(leader) = self.report(leader) {
                        return Ok(leader);
                    }
                    watch.await?;
                }
                First::Gone => {}
                First::Ungranted => tokio::time::sleep(UNGRANTED_RETRY).await,
            }
        }
    }

    /// `Some` if `leader` differs from the last one returned.
    fn report(&mut self, leader: Option<Leader>) -> Option<Option<Leader>> {
        let key = leader.as_ref().map(|l| (l.node.clone(), l.token));
        if self.last.as_ref() == Some(&key) {
            return None;
        }
        self.last = Some(key);
        Some(leader)
    }
}

//! ZooKeeper's lock recipe (the "Locks" section of ZooKeeper's recipes
//! document, and what Curator's `InterProcessMutex` does), with a session
//! per client:
//!
//! - Create `/latchkey-bench/<name>/lock-` ephemeral and sequential. The
//!   lock's folder is a container node, made on the first `NoNode`, so that
//!   the server removes it once its queue is empty, as Curator does.
//! - List the folder's children. If ours has the lowest sequence number,
//!   the lock is held (two round trips uncontended).
//! - Otherwise set an exists watch on the next-lower node only; when it
//!   fires (or the node is already gone), list again.
//! - Release deletes our node. A failed wait deletes it too.
//!
//! Not done: Curator's "protected" node names. A create whose reply is lost
//! with the connection leaves a node that queues everyone behind it until
//! the session ends; on loopback that takes a broken server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use zookeeper_client as zk;

/// The session timeout asked for; the server clamps it to between 2 and
/// 20 ticks (4 s and 40 s with `scripts/peers.sh`'s `tickTime=2000`).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The folder under which each lock gets its own folder of queue nodes.
const ROOT: &str = "/latchkey-bench";

/// Node names in a lock's queue: this, then the server's 10-digit counter.
const NODE_PREFIX: &str = "lock-";

/// How many times a create may find its folder gone (a container the
/// server removed between our mkdir and our create) before giving up.
const CREATE_TRIES_MAX: usize = 3;

/// How long `close` waits for the server to confirm the session's end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A ZooKeeper server that accepted a session.
pub struct ZooKeeperPeer {
    addr: SocketAddr,
    version: String,
}

impl ZooKeeperPeer {
    /// Opens a session once, and reads the version with the `srvr`
    /// four-letter word (`unknown` if the server does not allow it).
    ///
    /// # Errors
    /// When no session can be opened.
    pub async fn probe(addr: SocketAddr) -> Result<ZooKeeperPeer, String> {
        close_session(connect(addr).await?).await;
        let version = srvr_version(addr)
            .await
            .unwrap_or_else(|| "unknown".to_string());
        Ok(ZooKeeperPeer { addr, version })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client with a connection and a session of its own.
    ///
    /// # Errors
    /// When no session can be opened.
    pub async fn client(&self) -> Result<ZooKeeperLock, String> {
        Ok(ZooKeeperLock {
            addr: self.addr,
            client: connect(self.addr).await?,
            held: BTreeMap::new(),
        })
    }
}

async fn connect(addr: SocketAddr) -> Result<zk::Client, String> {
    zk::Client::connector()
        .with_session_timeout(SESSION_TIMEOUT)
        .with_connection_timeout(super::CONNECT_TIMEOUT)
        .connect(&addr.to_string())
        .await
        .map_err(|e| format!("zookeeper {addr}: no session: {e}"))
}

/// The version from `srvr`'s first line, `Zookeeper version: 3.8.0-...`.
async fn srvr_version(addr: SocketAddr) -> Option<String> {
    let ask = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream.write_all(b"srvr").await.ok()?;
        // The server closes the connection after its answer, a few hundred
        // bytes; the cap only guards against a peer that is not ZooKeeper.
        let mut answer = Vec::new();
        (&mut stream)
            .take(64 * 1024)
            .read_to_end(&mut answer)
            .await
            .ok()?;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let line = answer
            .lines()
            .find_map(|l| l.strip_prefix("Zookeeper version: "))?;
        let version = line.split(['-', ',']).next()?.trim().to_string();
        (!version.is_empty()).then_some(version)
    };
    tokio::time::timeout(super::CONNECT_TIMEOUT, ask)
        .await
        .ok()
        .flatten()
}

/// One ZooKeeper client: a session, and the node of each lock it holds.
pub struct ZooKeeperLock {
    addr: SocketAddr,
    client: zk::Client,
    held: BTreeMap<String, String>,
}

impl ZooKeeperLock {
    /// See [`PeerLock::acquire`](super::PeerLock::acquire).
    pub async fn acquire(&mut self, name: &str) -> Result<(), String> {
        if self.held.contains_key(name) {
            return Err(format!(
                "zookeeper: lock {name:?} is already held by this client"
            ));
        }
        let folder = format!("{ROOT}/{name}");
        let deadline = super::acquire_deadline();
        let (my_path, my_seq) = self.enqueue(&folder).await?;
        if let Err(e) = self.wait_turn(&folder, my_seq, deadline).await {
            let _ = self.client.delete(&my_path, None).await;
            return Err(format!("zookeeper: lock {name:?}: {e}"));
        }
        self.held.insert(name.to_string(), my_path);
        Ok(())
    }

    /// Creates our queue node, making the folder if it is missing; returns
    /// its path and sequence number.
    async fn enqueue(&mut self, folder: &str) -> Result<(String, i64), String> {
        let addr = self.addr;
        let prefix = format!("{folder}/{NODE_PREFIX}");
        let node = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
        let container = zk::CreateMode::Container.with_acls(zk::Acls::anyone_all());
        for _ in 0..CREATE_TRIES_MAX {
            match self.client.create(&prefix, b"", &node).await {
                Ok((_, sequence)) => {
                    return Ok((format!("{prefix}{sequence}"), sequence.into_i64()))
                }
                Err(zk::Error::NoNode) => self
                    .client
                    .mkdir(folder, &container)
                    .await
                    .map_err(|e| format!("zookeeper {addr}: mkdir {folder} failed: {e}"))?,
                Err(e) => {
                    return Err(format!(
                        "zookeeper {addr}: create under {folder} failed: {e}"
                    ))
                }
            }
        }
        Err(format!(
            "zookeeper {addr}: {folder} vanished {CREATE_TRIES_MAX} times between mkdir and create"
        ))
    }

    /// Returns once our node is the lowest in the folder.
    async fn wait_turn(
        &mut self,
        folder: &str,
        my_seq: i64,
        deadline: Instant,
    ) -> Result<(), String> {
        let addr = self.addr;
        loop {
            if Instant::now() >= deadline {
                return Err(format!("not acquired within {:?}", super::ACQUIRE_TIMEOUT));
            }
            let children = self
                .client
                .list_children(folder)
                .await
                .map_err(|e| format!("zookeeper {addr}: list {folder} failed: {e}"))?;
            let mut queue: Vec<(i64, String)> = children
                .into_iter()
                .filter_map(|child| {
                    let seq = child.strip_prefix(NODE_PREFIX)?.parse().ok()?;
                    Some((seq, child))
                })
                .collect();
            queue.sort_unstable();
            let ours = queue
                .iter()
                .position(|(seq, _)| *seq == my_seq)
                .ok_or_else(|| {
                    format!("our node {NODE_PREFIX}{my_seq:010} is gone from {folder}; the session expired")
                })?;
            let Some(ours_minus_one) = ours.checked_sub(1) else {
                return Ok(());
            };
            let (_, previous) = &queue[ours_minus_one];
            let previous = format!("{folder}/{previous}");
            let (stat, watcher) = self
                .client
                .check_and_watch_stat(&previous)
                .await
                .map_err(|e| format!("zookeeper {addr}: exists {previous} failed: {e}"))?;
            if stat.is_none() {
                continue;
            }
            // Any event (the delete, or a session event) means look again.
            tokio::time::timeout_at(deadline, watcher.changed())
                .await
                .map_err(|_| format!("not acquired within {:?}", super::ACQUIRE_TIMEOUT))?;
        }
    }

    /// See [`PeerLock::release`](super::PeerLock::release).
    pub async fn release(&mut self, name: &str) -> Result<(), String> {
        let my_path = self
            .held
            .remove(name)
            .ok_or_else(|| format!("zookeeper: lock {name:?} is not held by this client"))?;
        self.client
            .delete(&my_path, None)
            .await
            .map_err(|e| format!("zookeeper {}: delete {my_path} failed: {e}", self.addr))
    }

    /// Closes the session, which deletes every node this client still has,
    /// and waits a bounded time for the server to confirm.
    pub async fn close(self) {
        close_session(self.client).await;
    }
}

/// Drops the client, which closes its session, and waits a bounded time
/// for the server to confirm, so that a bench exiting right after leaves
/// no session to time out.
async fn close_session(client: zk::Client) {
    let mut state = client.state_watcher();
    drop(client);
    let closed = async { while !state.changed().await.is_terminated() {} };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, closed).await;
}

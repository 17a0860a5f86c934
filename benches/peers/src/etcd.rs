//! The etcd v3 lock as etcd's own Go package takes it
//! (go.etcd.io/etcd/client/v3/concurrency: `mutex.go` and `key.go`), step
//! for step:
//!
//! - Each client grants a lease (60 s, concurrency's default session TTL)
//!   and keeps it alive at a third of its TTL, as the Go client does.
//! - Acquire is one transaction: if `prefix/<lease-id-hex>` does not exist,
//!   put it with the lease, and in the same transaction read the key with
//!   the lowest create revision under the prefix. If that is ours, the lock
//!   is held (one round trip uncontended).
//! - Otherwise wait for every key created before ours to go (`waitDeletes`):
//!   read the newest key with a create revision below ours, watch it from
//!   the revision of that read until its delete event, repeat.
//! - Then check that our key still exists (the lease may have expired
//!   meanwhile: `ErrSessionExpired`).
//! - Release deletes our key. A failed wait deletes it too, as `Lock` does.
//!
//! What this costs under contention, by design of the recipe: a watch that
//! starts at or below the server's current revision (as `waitDelete`'s
//! does) joins etcd's unsynced watchers, which a server loop catches up
//! every 100 ms (`mvcc/watchable_store.go`). A delete that comes before
//! that catch-up reaches the waiter late by up to 100 ms; the smoke bench's
//! 1 ms holds show waits of about that much. Go's mutex waits the same way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The lease TTL in seconds: concurrency's `defaultSessionTTL`.
pub const LEASE_TTL_SECS: i64 = 60;

/// How long one request may take before the client gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Keys of this bench's locks start with this.
const KEY_PREFIX: &str = "latchkey-bench/lock/";

/// An etcd server that answered a status request.
pub struct EtcdPeer {
    addr: SocketAddr,
    version: String,
}

impl EtcdPeer {
    /// Connects once and reads the server's version.
    ///
    /// # Errors
    /// When the connection or the status request fails.
    pub async fn probe(addr: SocketAddr) -> Result<EtcdPeer, String> {
        let mut client = connect(addr).await?;
        let status = client
            .status()
            .await
            .map_err(|e| format!("etcd {addr}: status failed: {e}"))?;
        Ok(EtcdPeer {
            addr,
            version: status.version().to_string(),
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client with a connection and a lease of its own, kept alive by a
    /// task that ends with the client.
    ///
    /// # Errors
    /// When the connection, the lease grant or the keep-alive stream fails.
    pub async fn client(&self) -> Result<EtcdLock, String> {
        let addr = self.addr;
        let mut client = connect(addr).await?;
        let lease = client
            .lease_grant(LEASE_TTL_SECS, None)
            .await
            .map_err(|e| format!("etcd {addr}: lease grant failed: {e}"))?;
        let lease_id = lease.id();
        let (mut keeper, mut responses) = client
            .lease_keep_alive(lease_id)
            .await
            .map_err(|e| format!("etcd {addr}: lease keep-alive failed: {e}"))?;
        let period = Duration::from_secs(LEASE_TTL_SECS.unsigned_abs() / 3);
        // Ends when the stream breaks; the lease then expires and acquire
        // reports the lost key. Aborted when the client is dropped.
        let keep_alive = tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                if keeper.keep_alive().await.is_err() {
                    return;
                }
                match responses.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return,
                }
            }
        });
        Ok(EtcdLock {
            addr,
            client,
            lease_id,
            keep_alive,
            held: BTreeMap::new(),
        })
    }
}

async fn connect(addr: SocketAddr) -> Result<Client, String> {
    let options = ConnectOptions::new()
        .with_connect_timeout(super::CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT);
    Client::connect([format!("http://{addr}")], Some(options))
        .await
        .map_err(|e| format!("etcd {addr}: connect failed: {e}"))
}

/// One etcd client: a connection, a lease, and the key of each lock it holds.
pub struct EtcdLock {
    addr: SocketAddr,
    client: Client,
    lease_id: i64,
    keep_alive: JoinHandle<()>,
    held: BTreeMap<String, String>,
}

impl Drop for EtcdLock {
    fn drop(&mut self) {
        self.keep_alive.abort();
    }
}

impl EtcdLock {
    /// See [`PeerLock::acquire`](super::PeerLock::acquire).
    pub async fn acquire(&mut self, name: &str) -> Result<(), String> {
        if self.held.contains_key(name) {
            return Err(format!(
                "etcd: lock {name:?} is already held by this client"
            ));
        }
        let prefix = format!("{KEY_PREFIX}{name}/");
        let my_key = format!("{prefix}{:x}", self.lease_id);
        let deadline = super::acquire_deadline();
        let my_rev = self.enqueue(&prefix, &my_key).await?;
        if let Some(my_rev) = my_rev {
            if let Err(e) = self.wait_deletes(&prefix, my_rev - 1, deadline).await {
                // As Lock does: leave the queue, so nobody waits behind a
                // waiter that gave up.
                let _ = self.client.delete(my_key.as_str(), None).await;
                return Err(format!("etcd: lock {name:?}: {e}"));
            }
            let mine = self
                .client
                .get(my_key.as_str(), None)
                .await
                .map_err(|e| format!("etcd {}: get {my_key} failed: {e}", self.addr))?;
            if mine.kvs().is_empty() {
                return Err(format!(
                    "etcd: lock {name:?}: our key {my_key} is gone; the lease expired while waiting"
                ));
            }
        }
        self.held.insert(name.to_string(), my_key);
        Ok(())
    }

    /// Puts our key if it is not there, and reads the oldest key under the
    /// prefix, in one transaction. Returns `None` if the lock is ours now,
    /// or our key's create revision to wait with.
    async fn enqueue(&mut self, prefix: &str, my_key: &str) -> Result<Option<i64>, String> {
        let addr = self.addr;
        let owner = || {
            TxnOp::get(
                prefix,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(1),
                ),
            )
        };
        let txn = Txn::new()
            .when([Compare::create_revision(my_key, CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    my_key,
                    "",
                    Some(PutOptions::new().with_lease(self.lease_id)),
                ),
                owner(),
            ])
            // Our key exists already (a lease reused for the same lock):
            // keep its place in the queue.
            .or_else([TxnOp::get(my_key, None), owner()]);
        let response = self
            .client
            .txn(txn)
            .await
            .map_err(|e| format!("etcd {addr}: enqueue txn on {my_key} failed: {e}"))?;
        let ops = response.op_responses();
        let my_rev = if response.succeeded() {
            response
                .header()
                .map(|h| h.revision())
                .ok_or_else(|| format!("etcd {addr}: enqueue txn answered without a header"))?
        } else {
            match ops.first() {
                Some(TxnOpResponse::Get(get)) => {
                    get.kvs()
                        .first()
                        .map(|kv| kv.create_revision())
                        .ok_or_else(|| format!("etcd {addr}: {my_key} vanished inside a txn"))?
                }
                _ => return Err(format!("etcd {addr}: enqueue txn answered out of shape")),
            }
        };
        let owner_rev = match ops.get(1) {
            Some(TxnOpResponse::Get(get)) => get.kvs().first().map(|kv| kv.create_revision()),
            _ => return Err(format!("etcd {addr}: enqueue txn answered out of shape")),
        };
        Ok(match owner_rev {
            None => None,
            Some(rev) if rev == my_rev => None,
            Some(_) => Some(my_rev),
        })
    }

    /// `waitDeletes`: returns once no key under `prefix` has a create
    /// revision at or below `max_create_rev`.
    async fn wait_deletes(
        &mut self,
        prefix: &str,
        max_create_rev: i64,
        deadline: Instant,
    ) -> Result<(), String> {
        let addr = self.addr;
        loop {
            if Instant::now() >= deadline {
                return Err(format!("not acquired within {:?}", super::ACQUIRE_TIMEOUT));
            }
            let newest_before_us = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(1)
                .with_max_create_revision(max_create_rev);
            let response = self
                .client
                .get(prefix, Some(newest_before_us))
                .await
                .map_err(|e| format!("etcd {addr}: get under {prefix} failed: {e}"))?;
            let Some(last) = response.kvs().first() else {
                return Ok(());
            };
            let revision = response
                .header()
                .map(|h| h.revision())
                .ok_or_else(|| format!("etcd {addr}: get answered without a header"))?;
            self.wait_delete(last.key().to_vec(), revision, deadline)
                .await?;
        }
    }

    /// `waitDelete`: watches `key` from `revision` until its delete event.
    /// Watching from the revision of the read that found the key means a
    /// delete that came between the read and the watch is still seen.
    async fn wait_delete(
        &mut self,
        key: Vec<u8>,
        revision: i64,
        deadline: Instant,
    ) -> Result<(), String> {
        let addr = self.addr;
        let shown = String::from_utf8_lossy(&key).into_owned();
        let mut stream = self
            .client
            .watch(key, Some(WatchOptions::new().with_start_revision(revision)))
            .await
            .map_err(|e| format!("etcd {addr}: watch on {shown} failed: {e}"))?;
        loop {
            let message = tokio::time::timeout_at(deadline, stream.message())
                .await
                .map_err(|_| format!("not acquired within {:?}", super::ACQUIRE_TIMEOUT))?
                .map_err(|e| format!("etcd {addr}: watch on {shown} broke: {e}"))?;
            let Some(response) = message else {
                return Err(format!("etcd {addr}: watch on {shown} closed"));
            };
            if response.canceled() {
                return Err(format!(
                    "etcd {addr}: watch on {shown} canceled: {}",
                    response.cancel_reason()
                ));
            }
            if response
                .events()
                .iter()
                .any(|event| event.event_type() == EventType::Delete)
            {
                return Ok(());
            }
        }
    }

    /// See [`PeerLock::release`](super::PeerLock::release).
    pub async fn release(&mut self, name: &str) -> Result<(), String> {
        let my_key = self
            .held
            .remove(name)
            .ok_or_else(|| format!("etcd: lock {name:?} is not held by this client"))?;
        self.client
            .delete(my_key.as_str(), None)
            .await
            .map_err(|e| format!("etcd {}: delete {my_key} failed: {e}", self.addr))?;
        Ok(())
    }

    /// Revokes the lease, which deletes every key this client still has.
    pub async fn close(mut self) {
        self.keep_alive.abort();
        let _ = self.client.lease_revoke(self.lease_id).await;
    }
}

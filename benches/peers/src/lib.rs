//! Redis, etcd v3 and ZooKeeper locks, each taken the way its users take it,
//! so that a bench can run one workload against latchkey and against these
//! peers in the same run.
//!
//! `scripts/peers.sh start` runs the three on loopback; [`detect`] finds the
//! ones that answer and says why each other one was skipped. A bench of
//! this package gets a [`Peer`] per running service and one [`PeerLock`] per
//! task (each on its own connection and session), and calls
//! `acquire`/`release` on a lock name.
//!
//! This is a package of its own, outside latchkey's workspace, so that
//! latchkey's own build and tests never compile these client crates (etcd's
//! runs protoc at build time).
//!
//! The recipes, each in its own file with its sources:
//! - Redis: `SET key token NX PX ttl`; waiters retry after a randomized
//!   delay (node-redlock's defaults); release is a compare-and-delete script.
//! - etcd: the mutex of etcd's own `client/v3/concurrency` package: a key per
//!   lease under the lock's prefix, create-revision order, a watch on the
//!   next-lower key.
//! - ZooKeeper: ephemeral sequential nodes, a watch on the next-lower node.
//!
//! Addresses default to the ones `scripts/peers.sh` uses and can be moved
//! with `LATCHKEY_PEER_REDIS`, `LATCHKEY_PEER_ETCD` and
//! `LATCHKEY_PEER_ZOOKEEPER` (`host:port`, loopback only: a bench sends no
//! traffic off this machine).

pub mod etcd;
pub mod redis;
pub mod zookeeper;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// How long one `acquire` may wait for the lock before it fails. It bounds
/// every retry and watch loop; a correct run never comes near it.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long reaching a peer may take, connection and first answer; past it
/// the peer counts as not running.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running lock service that answered on its loopback address.
pub enum Peer {
    Redis(redis::RedisPeer),
    Etcd(etcd::EtcdPeer),
    ZooKeeper(zookeeper::ZooKeeperPeer),
}

impl Peer {
    /// The service's name as the bench prints it: `redis`, `etcd`, `zookeeper`.
    pub fn name(&self) -> &'static str {
        match self {
            Peer::Redis(_) => "redis",
            Peer::Etcd(_) => "etcd",
            Peer::ZooKeeper(_) => "zookeeper",
        }
    }

    /// The version the server reported when it was detected, or `unknown`.
    pub fn version(&self) -> &str {
        match self {
            Peer::Redis(p) => p.version(),
            Peer::Etcd(p) => p.version(),
            Peer::ZooKeeper(p) => p.version(),
        }
    }

    /// The address it answered on.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Peer::Redis(p) => p.addr(),
            Peer::Etcd(p) => p.addr(),
            Peer::ZooKeeper(p) => p.addr(),
        }
    }

    /// Opens a new client: its own connection, and for etcd its own lease,
    /// for ZooKeeper its own session. Locks held by one client exclude every
    /// other client.
    ///
    /// # Errors
    /// A string naming the peer, its address and what failed, when the
    /// connection or the session cannot be set up within [`CONNECT_TIMEOUT`].
    ///
    /// # Cancel safety
    /// Safe: a dropped future leaves at most a half-open connection, closed
    /// with it (an etcd lease granted before the drop expires on its own).
    pub async fn client(&self) -> Result<PeerLock, String> {
        let client = async {
            Ok(match self {
                Peer::Redis(p) => PeerLock::Redis(p.client().await?),
                Peer::Etcd(p) => PeerLock::Etcd(Box::new(p.client().await?)),
                Peer::ZooKeeper(p) => PeerLock::ZooKeeper(p.client().await?),
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, client)
            .await
            .map_err(|_| {
                format!(
                    "{} {}: no client within {CONNECT_TIMEOUT:?}",
                    self.name(),
                    self.addr()
                )
            })?
    }
}

/// One client of a peer, taking and releasing locks by name.
///
/// A client holds any number of different locks at once; a lock is not
/// re-entrant (acquiring a name this client holds is an error).
pub enum PeerLock {
    Redis(redis::RedisLock),
    // Boxed: etcd's client is some 3.6 KB, the others a few hundred bytes.
    Etcd(Box<etcd::EtcdLock>),
    ZooKeeper(zookeeper::ZooKeeperLock),
}

impl PeerLock {
    /// Waits until this client holds the lock `name`.
    ///
    /// # Errors
    /// When this client already holds `name`, when the peer fails or drops
    /// the connection, when the client's lease or session expired while it
    /// waited, and when the lock was not granted within [`ACQUIRE_TIMEOUT`].
    /// After an error the client does not hold `name` and has left the
    /// lock's queue (as far as the peer can still be reached).
    ///
    /// # Cancel safety
    /// Not safe for etcd and ZooKeeper: a dropped future can leave this
    /// client's queue entry behind until its lease or session ends, and
    /// later waiters queue behind it. Use the timeout built in instead.
    pub async fn acquire(&mut self, name: &str) -> Result<(), String> {
        match self {
            PeerLock::Redis(l) => l.acquire(name).await,
            PeerLock::Etcd(l) => l.acquire(name).await,
            PeerLock::ZooKeeper(l) => l.acquire(name).await,
        }
    }

    /// Releases the lock `name`, which this client holds.
    ///
    /// # Errors
    /// When this client does not hold `name`, and when the peer fails. For
    /// Redis, also when the key no longer holds this client's token: its TTL
    /// ran out during the hold and someone else may have taken the lock.
    ///
    /// # Cancel safety
    /// Not safe: a dropped future may or may not have released the lock, and
    /// this client forgets it either way.
    pub async fn release(&mut self, name: &str) -> Result<(), String> {
        match self {
            PeerLock::Redis(l) => l.release(name).await,
            PeerLock::Etcd(l) => l.release(name).await,
            PeerLock::ZooKeeper(l) => l.release(name).await,
        }
    }

    /// Ends the client: revokes its etcd lease, closes its ZooKeeper
    /// session, closes the connection. Every lock it still held is released
    /// by the peer (Redis: when each TTL runs out).
    ///
    /// # Cancel safety
    /// Safe: what a dropped future did not do, the lease or session expiry
    /// does later.
    pub async fn close(self) {
        match self {
            PeerLock::Redis(_) => {}
            PeerLock::Etcd(l) => (*l).close().await,
            PeerLock::ZooKeeper(l) => l.close().await,
        }
    }
}

/// What [`detect`] found: the peers that answered, and one line for each
/// one skipped, saying why.
#[derive(Default)]
pub struct Detected {
    pub peers: Vec<Peer>,
    pub skipped: Vec<String>,
}

/// Finds which peers are running on their loopback addresses.
///
/// Never fails: a peer that is not listening, does not answer within
/// [`CONNECT_TIMEOUT`], or whose address variable is not a loopback
/// `host:port` is skipped, with a line saying which and why.
///
/// # Cancel safety
/// Safe: it holds nothing but probe connections, closed when dropped.
pub async fn detect() -> Detected {
    let mut detected = Detected::default();
    for (name, var, default) in [
        ("redis", "LATCHKEY_PEER_REDIS", "127.0.0.1:6379"),
        ("etcd", "LATCHKEY_PEER_ETCD", "127.0.0.1:2379"),
        ("zookeeper", "LATCHKEY_PEER_ZOOKEEPER", "127.0.0.1:2181"),
    ] {
        match probe(name, var, default).await {
            Ok(peer) => detected.peers.push(peer),
            Err(why) => detected.skipped.push(format!("{name}: skipped: {why}")),
        }
    }
    detected
}

async fn probe(name: &str, var: &str, default: &str) -> Result<Peer, String> {
    let addr = loopback_addr(var, default)?;
    // A cheap TCP check first: an absent peer is then told apart from one
    // that listens but does not speak its protocol, and etcd's client, which
    // connects lazily, is not left to time out.
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(format!(
                "nothing listens on {addr} ({e}); scripts/peers.sh start runs it"
            ))
        }
        Err(_) => return Err(format!("{addr} did not accept within {CONNECT_TIMEOUT:?}")),
    }
    let peer = async {
        Ok(match name {
            "redis" => Peer::Redis(redis::RedisPeer::probe(addr).await?),
            "etcd" => Peer::Etcd(etcd::EtcdPeer::probe(addr).await?),
            _ => Peer::ZooKeeper(zookeeper::ZooKeeperPeer::probe(addr).await?),
        })
    };
    tokio::time::timeout(CONNECT_TIMEOUT, peer)
        .await
        .map_err(|_| format!("{addr} accepted but did not answer within {CONNECT_TIMEOUT:?}"))?
}

/// The address in `var`, or `default`; only loopback addresses are taken.
fn loopback_addr(var: &str, default: &str) -> Result<SocketAddr, String> {
    let text = std::env::var(var).unwrap_or_else(|_| default.to_string());
    let addr: SocketAddr = text
        .parse()
        .map_err(|e| format!("{var}={text:?} is not an IP:port ({e}); write e.g. {default}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{var}={addr} is not a loopback address; the bench only talks to 127.0.0.0/8 or ::1"
        ));
    }
    Ok(addr)
}

/// The moment an acquire that starts now must give up.
fn acquire_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + ACQUIRE_TIMEOUT
}

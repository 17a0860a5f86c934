//! The single-instance Redis lock as the common client libraries take it:
//! `SET key token NX PX ttl` with a random token per acquire; a waiter
//! retries after a randomized delay; release deletes the key only if it
//! still holds this acquire's token (a Lua script run by EVALSHA).
//!
//! Retry timing follows node-redlock (mike-marcacci/node-redlock,
//! `src/index.ts`): `retryDelay` 200 ms plus a jitter uniform in ±100 ms
//! (`retryJitter`). badboy/redlock-rs (`src/redlock.rs`) waits a uniform
//! 0..200 ms instead, and redis-py's `Lock` a fixed 100 ms; none of them
//! wakes a waiter when the lock is released, which is what a benchmark of
//! contended locks measures here. Those libraries give up after a few
//! retries (node-redlock 10, redlock-rs 3); this one retries until
//! [`ACQUIRE_TIMEOUT`](super::ACQUIRE_TIMEOUT), as a caller looping on them
//! would. The compare-and-delete script is the one in both libraries.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use rand::Rng;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

/// The lock's TTL: the longest a crashed holder blocks others. Any hold in
/// a bench must be far shorter, or the lock would pass to a second holder.
pub const LOCK_TTL: Duration = Duration::from_secs(30);

/// How long one command may take before the client gives up on it.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Keys of this bench's locks start with this, apart from anything else
/// kept in the same Redis.
const KEY_PREFIX: &str = "latchkey-bench:lock:";

/// Deletes KEYS[1] only if it still holds ARGV[1]; returns how many keys it
/// deleted. A holder whose TTL ran out thereby never deletes the next
/// holder's key.
const RELEASE_SCRIPT: &str = r"if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
else
    return 0
end";

/// How long a waiter sleeps before it tries `SET NX` again: `delay` plus a
/// uniform jitter in `-jitter..=jitter`.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    pub delay: Duration,
    pub jitter: Duration,
}

impl Retry {
    /// node-redlock's defaults: 200 ms ± 100 ms.
    pub const REDLOCK: Retry = Retry {
        delay: Duration::from_millis(200),
        jitter: Duration::from_millis(100),
    };

    fn pause(&self) -> Duration {
        let jitter = self.jitter.min(self.delay);
        let low = self.delay - jitter;
        let high = self.delay + jitter;
        if high <= low {
            return low;
        }
        rand::rng().random_range(low..=high)
    }
}

/// A Redis server that answered `INFO server`.
pub struct RedisPeer {
    addr: SocketAddr,
    client: redis::Client,
    version: String,
    /// The waiters' retry timing for clients made from now on.
    pub retry: Retry,
}

impl RedisPeer {
    /// Connects once and reads the server's version.
    ///
    /// # Errors
    /// When the connection fails or the server does not answer `INFO`.
    pub async fn probe(addr: SocketAddr) -> Result<RedisPeer, String> {
        let client = redis::Client::open(format!("redis://{addr}/"))
            .map_err(|e| format!("redis {addr}: bad address: {e}"))?;
        let mut peer = RedisPeer {
            addr,
            client,
            version: String::new(),
            retry: Retry::REDLOCK,
        };
        let mut conn = peer.connect().await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("redis {addr}: INFO server failed: {e}"))?;
        peer.version = info
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
            .map_or_else(|| "unknown".to_string(), |v| v.trim().to_string());
        Ok(peer)
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client on a connection of its own.
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn client(&self) -> Result<RedisLock, String> {
        Ok(RedisLock {
            addr: self.addr,
            conn: self.connect().await?,
            retry: self.retry,
            release: redis::Script::new(RELEASE_SCRIPT),
            held: BTreeMap::new(),
        })
    }

    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(super::CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| format!("redis {}: connect failed: {e}", self.addr))
    }
}

/// One Redis client: a connection, and the token of each lock it holds.
pub struct RedisLock {
    addr: SocketAddr,
    conn: MultiplexedConnection,
    retry: Retry,
    release: redis::Script,
    held: BTreeMap<String, String>,
}

impl RedisLock {
    /// See [`PeerLock::acquire`](super::PeerLock::acquire).
    pub async fn acquire(&mut self, name: &str) -> Result<(), String> {
        if self.held.contains_key(name) {
            return Err(format!(
                "redis: lock {name:?} is already held by this client"
            ));
        }
        let key = format!("{KEY_PREFIX}{name}");
        let token = format!("{:032x}", rand::random::<u128>());
        let ttl_ms = u64::try_from(LOCK_TTL.as_millis()).expect("LOCK_TTL fits in u64 ms");
        let deadline = super::acquire_deadline();
        loop {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut self.conn)
                .await
                .map_err(|e| format!("redis {}: SET NX PX on {key} failed: {e}", self.addr))?;
            if set.is_some() {
                self.held.insert(name.to_string(), token);
                return Ok(());
            }
            // The recipe's own wait: nothing tells a Redis waiter that the
            // lock was released, so it sleeps and tries again.
            let pause = self.retry.pause();
            if tokio::time::Instant::now() + pause > deadline {
                return Err(format!(
                    "redis: lock {name:?} not acquired within {:?}",
                    super::ACQUIRE_TIMEOUT
                ));
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// See [`PeerLock::release`](super::PeerLock::release).
    pub async fn release(&mut self, name: &str) -> Result<(), String> {
        let token = self
            .held
            .remove(name)
            .ok_or_else(|| format!("redis: lock {name:?} is not held by this client"))?;
        let key = format!("{KEY_PREFIX}{name}");
        let deleted: i64 = self
            .release
            .key(&key)
            .arg(&token)
            .invoke_async(&mut self.conn)
            .await
            .map_err(|e| format!("redis {}: release script on {key} failed: {e}", self.addr))?;
        if deleted != 1 {
            return Err(format!(
                "redis: lock {name:?} no longer had this client's token at release: its TTL ({LOCK_TTL:?}) ran out or another client overwrote it, so another client may have held it too"
            ));
        }
        Ok(())
    }
}

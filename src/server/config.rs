//! The server's tunables, each with its default and the reason for it.

use std::net::SocketAddr;
use std::time::Duration;

use latchkey_client::protocol::limits;

use crate::state;

/// Everything `latchkey serve` can be told. `Config::default()` is what runs
/// with no flags: an in-memory server on 127.0.0.1:7878.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where to listen. Default 127.0.0.1:7878: loopback, so that a server
    /// started without thought is not reachable from the network.
    pub listen: SocketAddr,
    /// Smallest session timeout granted. Default 1 s: below that, a pause of
    /// the client's process (GC, swap) would expire it.
    pub session_timeout_ms_min: u64,
    /// Largest session timeout granted. Default 120 s: a crashed holder
    /// blocks its locks for at most this long.
    pub session_timeout_ms_max: u64,
    /// Most open connections. Default 16,384: room for 10,000 sessions
    /// and their reconnects; each costs a file descriptor (see `ulimit -n`).
    pub connections_max: usize,
    /// Largest frame a client may send. Default 2 MiB: a node of
    /// `data_bytes_max` bytes after base64, plus its request.
    pub frame_bytes_max: usize,
    /// Largest node data. Default 1 MiB, as in ZooKeeper.
    pub data_bytes_max: usize,
    /// Bytes that may wait in one connection's outbound queue before the
    /// server decides the client is not reading and disconnects it (its
    /// session lives on and can resume). Default 4 MiB.
    pub outbound_bytes_max: usize,
    /// Most live sessions. Default 100,000.
    pub sessions_max: usize,
    /// Most nodes in the tree. Default 10,000,000. Besides its path and data
    /// (bounded by `tree_bytes_max`), each node costs about 300 bytes of
    /// bookkeeping (a 176-byte node in the slab, a path index entry with its
    /// own copy of the path, the name in the parent's child set, allocator
    /// overhead): about 3 GiB at the default, on top of the tree's bytes.
    /// Estimated from type sizes, not measured; lower it on small machines.
    pub nodes_max: usize,
    /// Most bytes the tree holds, counting each node's path and data.
    /// Default 1 GiB. Without it the per-node bounds multiply to
    /// `nodes_max` x `data_bytes_max`, about 10 TiB; with it, paths and data
    /// take at most this much plus the copies of paths the indexes keep. A
    /// coordinator holds small values; a tree near this size belongs in a
    /// database.
    pub tree_bytes_max: usize,
    /// Most children of one node. Default and ceiling
    /// `protocol::limits::CHILDREN_PER_NODE_MAX`, so a listing fits a frame.
    pub children_per_node_max: usize,
    /// Most watches per session. Default
    /// `protocol::limits::WATCHES_PER_SESSION_MAX`.
    pub watches_per_session_max: usize,
    /// Most watches all sessions hold together. Default 2,000,000, or 20 per
    /// session at 100,000 sessions. A watch costs ~100-200 bytes plus twice
    /// its path (an entry in each of two ordered indexes, each with its own
    /// copy of the path; up to ~150 bytes more for the first watch on a
    /// path, which gets its own set of watchers): ~0.3-0.7 GB at worst.
    /// Estimated from type sizes, not measured. Without it the per-session
    /// bound times `sessions_max` allowed billions.
    pub watches_max: usize,
    /// How long a new connection has to complete its handshake. Default
    /// 10 s: long enough for a slow client, short enough that idle sockets
    /// cannot hold connection slots.
    pub handshake_timeout: Duration,
    /// How often session expiry, TTLs and empty containers are checked.
    /// Default 50 ms: the slack added to every expiry.
    pub tick_interval: Duration,
    /// How long one batch of replies may take to write before the server
    /// decides the client is not reading and drops the connection (its
    /// session lives on). Default 10 s: 4 MiB at 400 KB/s.
    pub write_timeout: Duration,
    /// How long shutdown waits for connections to flush. Default 5 s.
    pub shutdown_grace: Duration,
    /// Check the coordinator's invariants after every step and stop on the
    /// first broken one. Default: on in debug builds. It costs a walk of the
    /// whole state per request, so load tests turn it off.
    pub check_invariants: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            session_timeout_ms_min: 1_000,
            session_timeout_ms_max: 120_000,
            connections_max: 16_384,
            frame_bytes_max: limits::FRAME_BYTES_MAX,
            data_bytes_max: limits::DATA_BYTES_MAX,
            outbound_bytes_max: 4 * 1024 * 1024,
            sessions_max: 100_000,
            nodes_max: 10_000_000,
            tree_bytes_max: 1024 * 1024 * 1024,
            children_per_node_max: limits::CHILDREN_PER_NODE_MAX,
            watches_per_session_max: limits::WATCHES_PER_SESSION_MAX,
            watches_max: 2_000_000,
            handshake_timeout: Duration::from_secs(10),
            tick_interval: Duration::from_millis(50),
            write_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            check_invariants: cfg!(debug_assertions),
        }
    }
}

impl Config {
    /// Checks that the values make sense together; says which do not.
    pub fn validate(&self) -> Result<(), String> {
        if self.session_timeout_ms_min == 0 {
            return Err("the minimum session timeout must be above 0".into());
        }
        if self.session_timeout_ms_min > self.session_timeout_ms_max {
            return Err(format!(
                "the minimum session timeout ({} ms) is above the maximum ({} ms)",
                self.session_timeout_ms_min, self.session_timeout_ms_max
            ));
        }
        if self.connections_max == 0 {
            return Err("the connection limit must be at least 1".into());
        }
        if self.frame_bytes_max < 1024 {
            return Err(format!(
                "the frame limit ({} bytes) is below 1024 bytes: not even a handshake would fit",
                self.frame_bytes_max
            ));
        }
        if self.frame_bytes_max > limits::REPLY_FRAME_BYTES_MAX {
            return Err(format!(
                "the frame limit ({} bytes) is above what clients decode ({} bytes)",
                self.frame_bytes_max,
                limits::REPLY_FRAME_BYTES_MAX
            ));
        }
        // base64 makes data 4/3 larger; leave room for the request around it.
        if self.data_bytes_max / 3 * 4 + 1024 > self.frame_bytes_max {
            return Err(format!(
                "data of {} bytes would not fit a frame of {} bytes once encoded; \
                 raise the frame limit or lower the data limit",
                self.data_bytes_max, self.frame_bytes_max
            ));
        }
        if self.children_per_node_max > limits::CHILDREN_PER_NODE_MAX {
            return Err(format!(
                "at most {} children per node are supported",
                limits::CHILDREN_PER_NODE_MAX
            ));
        }
        if self.write_timeout.is_zero() || self.handshake_timeout.is_zero() {
            return Err("the write and handshake timeouts must be above 0".into());
        }
        if self.tick_interval.is_zero() {
            return Err("the tick interval must be above 0".into());
        }
        Ok(())
    }

    /// The bounds the state machine enforces.
    pub fn state_config(&self) -> state::Config {
        state::Config {
            session_timeout_ms_min: self.session_timeout_ms_min,
            session_timeout_ms_max: self.session_timeout_ms_max,
            data_bytes_max: self.data_bytes_max,
            sessions_max: self.sessions_max,
            nodes_max: self.nodes_max,
            tree_bytes_max: self.tree_bytes_max,
            children_per_node_max: self.children_per_node_max,
            watches_per_session_max: self.watches_per_session_max,
            watches_max: self.watches_max,
        }
    }
}

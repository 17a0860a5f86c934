//! The server's tunables, each with its default and the reason for it.

use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// The bounds the coordinator itself enforces: session timeouts,
    /// sessions, nodes, data, children, watches. Each default and its reason
    /// is on [`state::Config`].
    pub coordinator: state::Config,
    /// Most open connections. Default 16,384: room for 10,000 sessions
    /// and their reconnects; each costs a file descriptor (see `ulimit -n`).
    pub connections_max: usize,
    /// Largest frame a client may send. Default 2 MiB: a node of
    /// `coordinator.data_bytes_max` bytes after base64, plus its request.
    pub frame_bytes_max: usize,
    /// Bytes that may wait in one connection's outbound queue before the
    /// server decides the client is not reading and disconnects it (its
    /// session lives on and can resume). Default 4 MiB.
    pub outbound_bytes_max: usize,
    /// How long a new connection has to complete its handshake. Default
    /// 10 s: long enough for a slow client, short enough that idle sockets
    /// cannot hold connection slots.
    pub handshake_timeout: Duration,
    /// How long the rest of a frame may take once its first byte has come.
    /// Default 10 s: a frame at the default 2 MiB limit at 200 KB/s. Time
    /// between frames is bounded by the session timeout instead; without
    /// this, a client that stops inside a frame would hold its connection
    /// slot and its partial frame's buffer until its session expires, up to
    /// `coordinator.session_timeout_ms_max`.
    pub frame_timeout: Duration,
    /// How often session expiry, TTLs and empty containers are checked.
    /// Default 50 ms: the slack added to every expiry.
    pub tick_interval: Duration,
    /// How long one batch of replies may take to write before the server
    /// decides the client is not reading and drops the connection (its
    /// session lives on). Default 10 s: 4 MiB at 400 KB/s.
    pub write_timeout: Duration,
    /// How long shutdown waits for connections to flush. Default 5 s.
    pub shutdown_grace: Duration,
    /// Grant no lock for at least this long after start (requests queue
    /// meanwhile). Whatever it says, grants also wait as long as
    /// `lease_file` says a holder from a previous run on this address may
    /// still act as one. State is in memory, so a restart loses every
    /// session, but a holder cut off from the server does not learn that
    /// until its lease estimate runs out; granting its lock sooner would
    /// give the lock to two holders at once. Default `None`: no wait beyond
    /// the lease file's. A grace is for when the file may be lost, as after
    /// a reboot or a move: the longest session timeout in use plus the
    /// lock-delay.
    pub startup_grace: Option<Duration>,
    /// Where the server records, and reads at start, how long holders of
    /// its locks may still act as holders (see `startup_grace`). Default
    /// `None`: no file, for tests and embedding; `latchkey serve` keeps one
    /// per port in [`default_lease_folder`](super::default_lease_folder).
    pub lease_file: Option<PathBuf>,
    /// The data folder: every change is written to the log in it, and
    /// acknowledged once it is on disk, so that a restart keeps sessions,
    /// nodes, locks and holds. Default `None`: state in memory only (for
    /// tests and embedding); `latchkey serve` uses `latchkey-data` in the
    /// working folder unless given `--in-memory`. With a folder, no lease
    /// file or startup grace is needed: holders keep their locks across a
    /// restart.
    pub data: Option<PathBuf>,
    /// With a data folder: how many log entries are applied between two
    /// snapshots of the state (0: none). Default 10,000. A restart restores
    /// the last snapshot and replays at most this many entries after it, and
    /// the log on disk holds no more than that; each snapshot costs a pause
    /// of the coordinator while it is encoded (tens of milliseconds at
    /// 100,000 nodes) and one write of the whole state.
    pub snapshot_every: u64,
    /// Check the coordinator's invariants after every step and stop on the
    /// first broken one. Default: on in debug builds. It costs a walk of the
    /// whole state per request, so load tests turn it off.
    pub check_invariants: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            coordinator: state::Config::default(),
            connections_max: 16_384,
            frame_bytes_max: limits::FRAME_BYTES_MAX,
            outbound_bytes_max: 4 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(10),
            tick_interval: Duration::from_millis(50),
            write_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            startup_grace: None,
            lease_file: None,
            data: None,
            snapshot_every: 10_000,
            check_invariants: cfg!(debug_assertions),
        }
    }
}

impl Config {
    /// Checks that the values make sense together; says which do not.
    pub fn validate(&self) -> Result<(), String> {
        if self.data.is_some() && (self.lease_file.is_some() || self.startup_grace.is_some()) {
            return Err(
                "a durable server (--data) keeps its sessions across a restart and needs no \
                 lease file or startup grace; those are for --in-memory"
                    .into(),
            );
        }
        if self.coordinator.session_timeout_ms_min == 0 {
            return Err("the minimum session timeout must be above 0".into());
        }
        if self.coordinator.session_timeout_ms_min > self.coordinator.session_timeout_ms_max {
            return Err(format!(
                "the minimum session timeout ({} ms) is above the maximum ({} ms)",
                self.coordinator.session_timeout_ms_min, self.coordinator.session_timeout_ms_max
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
        if (self.coordinator.data_bytes_max / 3)
            .saturating_mul(4)
            .saturating_add(1024)
            > crate::state::count(self.frame_bytes_max)
        {
            return Err(format!(
                "data of {} bytes would not fit a frame of {} bytes once encoded; \
                 raise the frame limit or lower the data limit",
                self.coordinator.data_bytes_max, self.frame_bytes_max
            ));
        }
        if self.coordinator.children_per_node_max
            > crate::state::count(limits::CHILDREN_PER_NODE_MAX)
        {
            return Err(format!(
                "at most {} children per node are supported",
                limits::CHILDREN_PER_NODE_MAX
            ));
        }
        if self.write_timeout.is_zero()
            || self.handshake_timeout.is_zero()
            || self.frame_timeout.is_zero()
        {
            return Err("the write, handshake and frame timeouts must be above 0".into());
        }
        if self.tick_interval.is_zero() {
            return Err("the tick interval must be above 0".into());
        }
        let watches = self.coordinator.watches_per_session_max;
        if watches == 0 || watches > crate::state::count(limits::WATCHES_PER_SESSION_MAX) {
            return Err(format!(
                "the watches per session ({watches}) must be from 1 to {}, what a client may \
                 register again after a reconnect",
                limits::WATCHES_PER_SESSION_MAX
            ));
        }
        if self.coordinator.step_deletes_max == 0 {
            return Err("the nodes deleted per step must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Data of the largest size must fit a frame once base64 has made it
    /// 4/3 larger, with 1 KiB for the request around it; a frame one byte
    /// short is refused, naming both limits, and a huge data limit
    /// saturates rather than overflowing.
    #[test]
    fn the_data_limit_must_fit_a_frame_once_encoded() {
        let mut config = Config::default();
        config.coordinator.data_bytes_max = 3 * 1000;
        config.frame_bytes_max = 4 * 1000 + 1024;
        assert_eq!(config.validate(), Ok(()));
        config.frame_bytes_max -= 1;
        let e = config.validate().expect_err("a frame too small");
        assert!(
            e.contains("data of 3000 bytes would not fit a frame of 5023 bytes"),
            "{e}"
        );
        config.coordinator.data_bytes_max = u64::MAX;
        config.frame_bytes_max = limits::REPLY_FRAME_BYTES_MAX;
        assert!(config.validate().is_err());
    }
}

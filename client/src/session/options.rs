//! What a session is given (where to connect, how long it lives) and what
//! it publishes about itself.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::ClientError;
use crate::protocol::SessionId;

/// How to reach the coordinator and how long a session lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// Server addresses (`host:port`), tried in order by `connect` and cycled
    /// through on reconnect.
    pub servers: Vec<String>,
    /// The session timeout to ask for (the server clamps it). Default 10 s:
    /// a crashed holder blocks others for at most this long, while a GC pause
    /// or a network blip of a few seconds does not cost the session.
    pub session_timeout: Duration,
    /// Bound on one TCP connect, and again on the handshake. Default 5 s:
    /// longer than any healthy connect, shorter than the session timeout so
    /// a resume can try another server in time.
    pub connect_timeout: Duration,
    /// First delay between reconnect attempts. Default 50 ms: a restarted
    /// server is retried almost at once.
    pub reconnect_backoff_min: Duration,
    /// Cap of the exponential reconnect delay. Default 2 s: several attempts
    /// still fit in a 10 s session timeout.
    pub reconnect_backoff_max: Duration,
}

impl ClientOptions {
    /// Options for one server, with the defaults documented on each field.
    pub fn new(addr: impl Into<String>) -> Self {
        ClientOptions {
            servers: vec![addr.into()],
            session_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(2),
        }
    }

    /// Adds another server to try, after those already listed.
    pub fn server(mut self, addr: impl Into<String>) -> Self {
        self.servers.push(addr.into());
        self
    }

    /// Sets the requested session timeout.
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// Sets the bound on one connect and on one handshake.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the reconnect delay range: it starts at `min` and doubles up to
    /// `max`.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_backoff_min = min;
        self.reconnect_backoff_max = max;
        self
    }

    pub(crate) fn session_timeout_ms(&self) -> u64 {
        u64::try_from(self.session_timeout.as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn check(&self) -> Result<(), ClientError> {
        if self.servers.is_empty() {
            return Err(ClientError::invalid_argument(
                "no server address given (pass at least one host:port)",
            ));
        }
        if self.session_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(ClientError::invalid_argument(
                "session_timeout and connect_timeout must be above zero",
            ));
        }
        if self.reconnect_backoff_min.is_zero()
            || self.reconnect_backoff_min > self.reconnect_backoff_max
        {
            return Err(ClientError::invalid_argument(format!(
                "reconnect backoff {:?}..{:?} must be above zero with min <= max",
                self.reconnect_backoff_min, self.reconnect_backoff_max
            )));
        }
        Ok(())
    }
}

/// Where the session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// Connected to a server; requests flow.
    Connected,
    /// The connection broke and the client is reconnecting. The session may
    /// still be alive on the server until [`SessionStatus::lease_end`];
    /// requests wait and go out after the resume.
    Suspended,
    /// The server ended the session (or surely has): its ephemeral nodes,
    /// and so its locks, are gone. Final.
    Expired,
    /// The client was closed. Final.
    Closed,
}

/// The session's state and the conservative end of its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionStatus {
    /// The session.
    pub session_id: SessionId,
    /// Connected, suspended, expired or closed.
    pub state: SessionState,
    /// The session surely lives until this instant: it is the time the
    /// client *sent* the request whose reply it last received, plus the
    /// session timeout. The server's expiry clock started later (when that
    /// request arrived), so the server cannot expire the session, and hand
    /// its locks to someone else, before `lease_end`. A lock holder that is
    /// suspended should stop acting on its lock before then.
    pub lease_end: Instant,
}

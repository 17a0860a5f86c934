//! The client's one error type.

use std::time::SystemTime;

use crate::protocol::{ErrorCode, ErrorReply, PathError, SessionId, WaitEdge};

/// Every way a client call can fail.
///
/// Errors the server reports for one request carry the server's `message`
/// (which names the path and the values involved) and, for a
/// [`Client::multi`](crate::Client::multi), the `index` of the operation that
/// failed (`None` outside a multi). Errors about the session or the
/// connection (`SessionExpired`, `ConnectionLost`, `Closed`, `Connect`,
/// `Protocol`, `VersionMismatch`) carry no index.
///
/// [`ClientError::code`] gives the stable wire [`ErrorCode`] where there is
/// one, for programs that branch on the kind of failure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The node (or, for a create, its parent) does not exist.
    #[error("{}{message}", at(.index))]
    NoNode { message: String, index: Option<u32> },
    /// A node already exists at the path.
    #[error("{}{message}", at(.index))]
    NodeExists { message: String, index: Option<u32> },
    /// The node's version is not the one the request expected.
    #[error("{}{message}", at(.index))]
    BadVersion { message: String, index: Option<u32> },
    /// The node to delete has children.
    #[error("{}{message}", at(.index))]
    NotEmpty { message: String, index: Option<u32> },
    /// The create's parent is an ephemeral node.
    #[error("{}{message}", at(.index))]
    NoChildrenForEphemerals { message: String, index: Option<u32> },
    /// A path is not canonical. Checked locally before any round trip, so
    /// the server never sees the request.
    #[error("{}{message}", at(.index))]
    InvalidPath { message: String, index: Option<u32> },
    /// Data or the whole request is over a limit. Checked locally against the
    /// limits the server announced, and by the server.
    #[error("{}{message}", at(.index))]
    TooLarge { message: String, index: Option<u32> },
    /// A bound on nodes, children, watches or sessions was reached.
    #[error("{}{message}", at(.index))]
    LimitExceeded { message: String, index: Option<u32> },
    /// An argument is not allowed (the message names it).
    #[error("{}{message}", at(.index))]
    InvalidArgument { message: String, index: Option<u32> },
    /// The lock wait would have closed a cycle of sessions waiting on each
    /// other, so the server refused it: no node was created. `cycle` is the
    /// cycle, starting with this session (each edge: `session` would wait on
    /// the queue `lock`, where `holder` holds a node). Release a lock of the
    /// cycle (or take locks in one global order, as
    /// [`MultiLock`](crate::MultiLock) does) and try again.
    #[error("{message} (release a lock you hold and retry, or take your locks in one order, e.g. with MultiLock)")]
    Deadlock {
        message: String,
        cycle: Vec<WaitEdge>,
    },
    /// The node at the path is not the one the token (its creation zxid)
    /// names: it was deleted, and perhaps created again by someone else.
    /// Whatever the token stood for is no longer held.
    #[error("{}{message}", at(.index))]
    BadToken { message: String, index: Option<u32> },
    /// The node is a lock node (of a lock, election, semaphore or
    /// read-write lock) owned by another session, `owner` (`None`: a zombie,
    /// held through the lock-delay of a session that ended). Only the owner
    /// changes or deletes it; a forced delete
    /// ([`Client::force_delete`](crate::Client::force_delete)) takes it
    /// away the way the owner's session end would.
    #[error("{}{message}", at(.index))]
    NotOwner {
        message: String,
        owner: Option<SessionId>,
        index: Option<u32>,
    },
    /// The node is a timed hold (it has a TTL) and the request gave no
    /// token: set, touch and delete of a hold need the token its
    /// [`Hold::take`](crate::Hold::take) returned (its czxid); use
    /// [`Hold::extend`](crate::Hold::extend) and
    /// [`Hold::release`](crate::Hold::release).
    #[error("{}{message}", at(.index))]
    TokenRequired { message: String, index: Option<u32> },
    /// A timed hold ([`Hold::take`](crate::Hold::take)) found the node held
    /// by someone else, until `until` unless they extend or release it.
    #[error("{message}")]
    Held {
        path: String,
        until: SystemTime,
        message: String,
    },
    /// The session has expired: the server deleted its ephemeral nodes and
    /// watches. This client is finished; every later call fails the same way.
    #[error("the session has ended (it expired, or the server shut down or restarted): its ephemeral nodes, locks and watches are gone; open a new session and take them again")]
    SessionExpired,
    /// `close()` could not reach the server: the session was closed locally
    /// and the server will expire it (and delete its ephemeral nodes) after
    /// its session timeout.
    #[error("the connection to the server is down: the client is closed, and the server will expire the session after its timeout")]
    ConnectionLost,
    /// The client was closed (by `close()` or because every handle was
    /// dropped). Every later call fails the same way.
    #[error("the client is closed (connect a new client)")]
    Closed,
    /// The first connection could not be made.
    #[error("cannot connect to {addr}: {reason}; is `latchkey serve` running?")]
    Connect { addr: String, reason: String },
    /// Client and server speak different protocol versions.
    #[error("protocol version mismatch: this client speaks version {client_version}, {} (upgrade the older side)", server_side(.server_version, .message))]
    VersionMismatch {
        client_version: u32,
        /// The server's version, when the server said it in its welcome.
        server_version: Option<u32>,
        /// The server's own words, if it refused the handshake.
        message: String,
    },
    /// The server sent a message the client cannot accept (undecodable, or
    /// out of order). The client drops such a connection and reconnects; a
    /// request gets this error only when its own reply was of the wrong type.
    #[error("the server sent an unexpected message: {message} (a client/server bug: report it with both versions)")]
    Protocol { message: String },
    /// Any other error the server reported (`UnknownOperation`, `Malformed`,
    /// `RetryUnknown`, `TooManyConnections`, ...).
    #[error("{}{message}{}", at(.index), advice(*.code))]
    Server {
        code: ErrorCode,
        message: String,
        index: Option<u32>,
    },
}

fn at(index: &Option<u32>) -> String {
    match index {
        Some(i) => format!("operation {i} of the multi failed: "),
        None => String::new(),
    }
}

fn server_side(server_version: &Option<u32>, message: &str) -> String {
    match server_version {
        Some(v) => format!("the server speaks version {v}"),
        None => format!("the server refused it: {message}"),
    }
}

/// Advice the server's message may lack, for codes the client does not
/// give a variant of their own.
fn advice(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::RetryUnknown => {
            " (the outcome of the retried request is unknown: read the node to find out)"
        }
        ErrorCode::UnknownOperation | ErrorCode::Malformed | ErrorCode::ProtocolVersion => {
            " (client and server disagree on the protocol: upgrade the older side)"
        }
        _ => "",
    }
}

impl ClientError {
    /// The stable wire code of this error, if it has one. Local failures
    /// (`ConnectionLost`, `Closed`, `Connect`, `Protocol`) have none.
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            ClientError::NoNode { .. } => ErrorCode::NoNode,
            ClientError::NodeExists { .. } => ErrorCode::NodeExists,
            ClientError::BadVersion { .. } => ErrorCode::BadVersion,
            ClientError::NotEmpty { .. } => ErrorCode::NotEmpty,
            ClientError::NoChildrenForEphemerals { .. } => ErrorCode::NoChildrenForEphemerals,
            ClientError::InvalidPath { .. } => ErrorCode::InvalidPath,
            ClientError::TooLarge { .. } => ErrorCode::TooLarge,
            ClientError::LimitExceeded { .. } => ErrorCode::LimitExceeded,
            ClientError::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            ClientError::SessionExpired => ErrorCode::SessionExpired,
            ClientError::Deadlock { .. } => ErrorCode::Deadlock,
            ClientError::BadToken { .. } => ErrorCode::BadToken,
            ClientError::NotOwner { .. } => ErrorCode::NotOwner,
            ClientError::TokenRequired { .. } => ErrorCode::TokenRequired,
            ClientError::Held { .. } => ErrorCode::NodeExists,
            ClientError::VersionMismatch { .. } => ErrorCode::ProtocolVersion,
            ClientError::Server { code, .. } => *code,
            ClientError::ConnectionLost
            | ClientError::Closed
            | ClientError::Connect { .. }
            | ClientError::Protocol { .. } => return None,
        })
    }

    /// For an error inside a multi: the index of the operation that failed.
    pub fn index(&self) -> Option<u32> {
        match self {
            ClientError::NoNode { index, .. }
            | ClientError::NodeExists { index, .. }
            | ClientError::BadVersion { index, .. }
            | ClientError::NotEmpty { index, .. }
            | ClientError::NoChildrenForEphemerals { index, .. }
            | ClientError::InvalidPath { index, .. }
            | ClientError::TooLarge { index, .. }
            | ClientError::LimitExceeded { index, .. }
            | ClientError::InvalidArgument { index, .. }
            | ClientError::BadToken { index, .. }
            | ClientError::NotOwner { index, .. }
            | ClientError::TokenRequired { index, .. }
            | ClientError::Server { index, .. } => *index,
            _ => None,
        }
    }

    /// Maps a server's error reply to the client's error.
    pub(crate) fn from_reply(reply: ErrorReply) -> Self {
        let ErrorReply {
            code,
            message,
            index,
            cycle,
            owner,
        } = reply;
        match code {
            ErrorCode::NoNode => ClientError::NoNode { message, index },
            ErrorCode::NodeExists => ClientError::NodeExists { message, index },
            ErrorCode::BadVersion => ClientError::BadVersion { message, index },
            ErrorCode::NotEmpty => ClientError::NotEmpty { message, index },
            ErrorCode::NoChildrenForEphemerals => {
                ClientError::NoChildrenForEphemerals { message, index }
            }
            ErrorCode::InvalidPath => ClientError::InvalidPath { message, index },
            ErrorCode::TooLarge => ClientError::TooLarge { message, index },
            ErrorCode::LimitExceeded => ClientError::LimitExceeded { message, index },
            ErrorCode::InvalidArgument => ClientError::InvalidArgument { message, index },
            ErrorCode::SessionExpired => ClientError::SessionExpired,
            ErrorCode::Deadlock => ClientError::Deadlock { message, cycle },
            ErrorCode::BadToken => ClientError::BadToken { message, index },
            ErrorCode::NotOwner => ClientError::NotOwner {
                message,
                owner,
                index,
            },
            ErrorCode::TokenRequired => ClientError::TokenRequired { message, index },
            ErrorCode::ProtocolVersion => ClientError::VersionMismatch {
                client_version: crate::protocol::PROTOCOL_VERSION,
                server_version: None,
                message,
            },
            code => ClientError::Server {
                code,
                message,
                index,
            },
        }
    }

    pub(crate) fn invalid_path(err: PathError, index: Option<u32>) -> Self {
        ClientError::InvalidPath {
            message: err.to_string(),
            index,
        }
    }

    pub(crate) fn invalid_argument(message: impl Into<String>) -> Self {
        ClientError::InvalidArgument {
            message: message.into(),
            index: None,
        }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        ClientError::Protocol {
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_keep_message_index_and_code() {
        let mut reply = ErrorReply::new(ErrorCode::NoNode, "no node at /a/b");
        reply.index = Some(2);
        let err = ClientError::from_reply(reply);
        assert_eq!(err.code(), Some(ErrorCode::NoNode));
        assert_eq!(err.index(), Some(2));
        let text = err.to_string();
        assert!(
            text.starts_with("operation 2 of the multi failed: no node at /a/b"),
            "{text}"
        );

        let err = ClientError::from_reply(ErrorReply::new(ErrorCode::RetryUnknown, "xid 3"));
        assert_eq!(err.code(), Some(ErrorCode::RetryUnknown));
        assert!(err.to_string().contains("xid 3"), "{err}");

        let err = ClientError::from_reply(ErrorReply::new(ErrorCode::SessionExpired, "gone"));
        assert_eq!(err, ClientError::SessionExpired);
    }

    #[test]
    fn every_code_maps_back_to_itself() {
        use ErrorCode::*;
        for code in [
            NoNode,
            NodeExists,
            BadVersion,
            NotEmpty,
            NoChildrenForEphemerals,
            InvalidPath,
            TooLarge,
            LimitExceeded,
            InvalidArgument,
            UnknownOperation,
            Malformed,
            SessionExpired,
            ProtocolVersion,
            RetryUnknown,
            TooManyConnections,
            Deadlock,
            BadToken,
            NotOwner,
            TokenRequired,
            Unavailable,
        ] {
            let err = ClientError::from_reply(ErrorReply::new(code, "m"));
            assert_eq!(err.code(), Some(code), "{err}");
        }
        assert_eq!(ClientError::Closed.code(), None);
        assert_eq!(ClientError::ConnectionLost.code(), None);
    }

    #[test]
    fn a_deadlock_keeps_its_cycle() {
        let edge = |s, lock: &str, h| WaitEdge {
            session: crate::SessionId(s),
            lock: lock.into(),
            holder: crate::SessionId(h),
        };
        let mut reply = ErrorReply::new(ErrorCode::Deadlock, "session 0x1 would wait on /y");
        reply.cycle = vec![edge(1, "/y", 2), edge(2, "/x", 1)];
        let err = ClientError::from_reply(reply);
        let ClientError::Deadlock { cycle, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(cycle.len(), 2);
        assert_eq!(cycle[1].lock, "/x");
        assert!(err.to_string().contains("/y"), "{err}");
        let mut reply = ErrorReply::new(ErrorCode::BadToken, "czxid differs");
        reply.index = Some(1);
        let err = ClientError::from_reply(reply);
        assert_eq!(err.index(), Some(1));
        assert_eq!(err.code(), Some(ErrorCode::BadToken));
    }

    #[test]
    fn connect_error_names_address_and_reason() {
        let err = ClientError::Connect {
            addr: "127.0.0.1:7878".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(
            err.to_string(),
            "cannot connect to 127.0.0.1:7878: connection refused; is `latchkey serve` running?"
        );
        let err = ClientError::VersionMismatch {
            client_version: 1,
            server_version: Some(2),
            message: String::new(),
        };
        let text = err.to_string();
        assert!(
            text.contains("version 1") && text.contains("version 2"),
            "{text}"
        );
    }
}

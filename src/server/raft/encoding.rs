//! Commands as the log holds them: one byte of format version, then the
//! command with the time its proposer stamped on it, as JSON. Every member
//! applies the command at that time, never its own clock's, so that all
//! apply the same thing. A member reads only the versions it knows, so a
//! log written by a newer latchkey is refused rather than misread.

use serde::{Deserialize, Serialize};

use crate::state::Command;

use super::Encoded;

/// The format this build writes, and the only one it reads.
pub(crate) const COMMAND_FORMAT: u8 = 1;

/// Why a log entry's bytes are not a command this build can apply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("the log entry is empty: the log is damaged; restore the data folder from a backup")]
    Empty,
    #[error(
        "the log entry is in format {found}, and this latchkey reads format {COMMAND_FORMAT}: \
         run a latchkey at least as new as the one that wrote it"
    )]
    Version { found: u8 },
    #[error("the log entry is not a command ({0}): the log is damaged; restore the data folder from a backup")]
    Malformed(serde_json::Error),
}

/// One log entry's command: what to apply, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stamped {
    /// The proposer's clock when it proposed the command, in milliseconds
    /// since the Unix epoch: the time `Coordinator::apply` is given.
    pub(crate) at_ms: u64,
    /// The proposer's own number for the handshake that is waiting for
    /// this open or resume, so that the member that proposed it attaches
    /// the connection when it applies the entry (0: nobody waits). Never
    /// read by the state machine.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) ticket: u64,
    pub(crate) command: Command,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Encodes a stamped command for the log.
pub(crate) fn encode_command(stamped: &Stamped) -> Encoded {
    let mut bytes = vec![COMMAND_FORMAT];
    // Serializing these types to a Vec cannot fail: no map has non-string
    // keys and no value is a non-finite float.
    serde_json::to_writer(&mut bytes, stamped).expect("a command serializes");
    Encoded(bytes)
}

/// Decodes a stamped command from the log.
///
/// # Errors
/// [`DecodeError`]: empty, another format version, or not a command.
pub(crate) fn decode_command(encoded: &Encoded) -> Result<Stamped, DecodeError> {
    let (&format, rest) = encoded.0.split_first().ok_or(DecodeError::Empty)?;
    if format != COMMAND_FORMAT {
        return Err(DecodeError::Version { found: format });
    }
    serde_json::from_slice(rest).map_err(DecodeError::Malformed)
}

#[cfg(test)]
mod tests {
    use latchkey_client::protocol::{
        Create, Data, LockMode, LockSpec, MultiOp, NodeKind, Op, Secret, SessionId, Xid,
    };

    use super::*;

    fn samples() -> Vec<Command> {
        let session = SessionId(0x6620_a022_53e0);
        let lock = Create {
            path: "/locks/job/n-".into(),
            kind: NodeKind::Ephemeral,
            sequential: true,
            make_parents: true,
            lock: Some(LockSpec {
                mode: LockMode::Semaphore { permits: 3 },
                delay_ms: Some(2_000),
            }),
            ..Create::default()
        };
        let request = |xid, op| Command::Request {
            session,
            attach: 2,
            xid: Xid(xid),
            op,
        };
        vec![
            Command::OpenSession {
                timeout_ms: 10_000,
                secret: Secret("0123456789abcdef".into()),
            },
            Command::ResumeSession {
                session,
                secret: Secret("0123456789abcdef".into()),
                last_xid_received: Xid(41),
            },
            request(42, Op::Create(lock.clone())),
            request(
                43,
                Op::Multi {
                    ops: vec![
                        MultiOp::Create(lock),
                        MultiOp::Set {
                            path: "/seat".into(),
                            data: Data(vec![0, 255, b'"', b'\\']),
                            version: Some(3),
                            czxid: None,
                        },
                    ],
                },
            ),
            request(
                44,
                Op::Delete {
                    path: "/locks/job/n-0000000001".into(),
                    version: None,
                    czxid: None,
                    force: true,
                },
            ),
            request(45, Op::CloseSession),
            Command::Heard(vec![crate::state::Heard {
                session,
                ack: Xid(45),
            }]),
            Command::Tick,
            Command::Configure(crate::state::Config::default()),
        ]
    }

    #[test]
    fn every_kind_of_command_decodes_to_itself() {
        for (i, command) in samples().into_iter().enumerate() {
            let stamped = Stamped {
                at_ms: 1_796_644_985_454 + u64::try_from(i).expect("few"),
                ticket: u64::try_from(i % 2).expect("few"),
                command,
            };
            let encoded = encode_command(&stamped);
            assert_eq!(encoded.0[0], COMMAND_FORMAT);
            let decoded = decode_command(&encoded).expect("decodes");
            assert_eq!(decoded, stamped);
        }
    }

    #[test]
    fn an_empty_entry_another_format_or_garbage_is_refused_with_what_to_do() {
        let empty = decode_command(&Encoded(Vec::new())).expect_err("empty");
        assert!(matches!(empty, DecodeError::Empty), "{empty}");
        let mut newer = encode_command(&Stamped {
            at_ms: 0,
            ticket: 0,
            command: Command::Tick,
        });
        newer.0[0] = COMMAND_FORMAT + 1;
        let newer = decode_command(&newer).expect_err("a newer format");
        assert!(
            newer.to_string().contains("format 2") && newer.to_string().contains("at least as new"),
            "{newer}"
        );
        let garbage = decode_command(&Encoded(vec![COMMAND_FORMAT, b'{'])).expect_err("garbage");
        assert!(matches!(garbage, DecodeError::Malformed(_)), "{garbage}");
    }
}

//! Timed holds of a resource across requests (the ticket hold).

use std::time::{Duration, SystemTime};

use crate::client::CreateOptions;
use crate::error::ClientError;
use crate::protocol::{Data, Op, OpResult, Zxid};
use crate::Client;

use super::{format_utc, millis, system_time};

/// How many times [`Hold::take`] retries when the node it found vanishes
/// before it could read it (its TTL ran out in between).
const TAKE_ATTEMPTS_MAX: usize = 3;

/// Holds of a path for a time, independent of any session: "hold ticket
/// abc for 10 minutes while this buyer pays".
///
/// A hold is a persistent node with a TTL: it outlives the process and
/// session that took it, and the server deletes it once the TTL passes
/// without an [`Hold::extend`]. Any client that knows the [`HoldToken`]
/// (another web server handling the same buyer) can extend, rewrite or
/// release it; a stale token (of an expired hold, taken again since) is
/// refused, and so is a set, touch or delete of the node that gives no
/// token (`TokenRequired`): only a forced delete
/// ([`Client::force_delete`]) ends a hold without it. The TTL is at most
/// the server's `--hold-ttl-max` (7 days by default).
#[derive(Clone, Copy, Debug)]
pub struct Hold;

/// Proof of a hold: the creation zxid of its node. Store it with the
/// buyer's session; it strictly increases across holds, so it is also a
/// fencing token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HoldToken(pub Zxid);

impl Hold {
    /// Holds `path` for `ttl`, storing `data` (who holds it) in the node,
    /// and creating missing ancestors (as containers).
    ///
    /// # Errors
    /// - `Held { path, until, .. }` if someone holds it: `until` is when
    ///   their hold ends unless extended.
    /// - `NodeExists` if a node without a TTL is at `path` (not a hold).
    /// - `InvalidPath`, `InvalidArgument` (a TTL the server refuses),
    ///   `TooLarge`, `SessionExpired`, `Closed`.
    ///
    /// # Cancel safety
    /// Not cancel-safe: dropped after the create went out, the hold may be
    /// taken without the caller learning its token. It then ends at its TTL
    /// (or read its token from the node's stat: `czxid`).
    pub async fn take(
        client: &Client,
        path: &str,
        ttl: Duration,
        data: impl Into<Data>,
    ) -> Result<HoldToken, ClientError> {
        let data = data.into();
        let options = CreateOptions::persistent().ttl(ttl).make_parents();
        let mut last = None;
        for _ in 0..TAKE_ATTEMPTS_MAX {
            match client.create(path, data.clone(), options.clone()).await {
                Ok(created) => return Ok(HoldToken(created.stat.czxid)),
                Err(ClientError::NodeExists { message, .. }) => match client.exists(path).await? {
                    // Gone in between: its TTL ran out. Try again.
                    None => last = Some(message),
                    Some(stat) => {
                        let Some(ttl_ms) = stat.ttl_ms else {
                            return Err(ClientError::NodeExists {
                                message: format!(
                                    "{path} exists and has no TTL, so it is not a hold; \
                                     delete it or hold another path"
                                ),
                                index: None,
                            });
                        };
                        let until = system_time(stat.mtime_ms.saturating_add(ttl_ms));
                        return Err(ClientError::Held {
                            path: path.to_string(),
                            message: format!(
                                "{path} is held until {} unless extended (czxid {})",
                                format_utc(until),
                                stat.czxid
                            ),
                            until,
                        });
                    }
                },
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::NodeExists {
            message: format!(
                "{path} kept reappearing after {TAKE_ATTEMPTS_MAX} attempts: {}",
                last.unwrap_or_default()
            ),
            index: None,
        })
    }

    /// Ends the hold on `path` now, if `token` is still its token.
    ///
    /// # Errors
    /// `BadToken` if another hold is at `path` (this one expired and the
    /// path was taken again); `NoNode` if nothing is held there (it
    /// expired); `InvalidPath`, `SessionExpired`, `Closed`.
    ///
    /// # Cancel safety
    /// Dropping the future after the request went out does not stop the
    /// release.
    pub async fn release(client: &Client, path: &str, token: HoldToken) -> Result<(), ClientError> {
        let op = Op::Delete {
            path: path.to_string(),
            version: None,
            czxid: Some(token.0),
            force: false,
        };
        match client.request(op).await? {
            OpResult::Deleted => Ok(()),
            other => Err(ClientError::protocol(format!(
                "a delete was answered with {other:?}"
            ))),
        }
    }

    /// Replaces the data stored in the hold on `path` (who holds it), if
    /// `token` is still its token. Like any write to the node, it renews
    /// the hold for its TTL from now.
    ///
    /// # Errors
    /// As [`Hold::release`]; `TooLarge` for data over the server's limit.
    ///
    /// # Cancel safety
    /// Dropping the future after the request went out does not stop the
    /// write.
    pub async fn set(
        client: &Client,
        path: &str,
        token: HoldToken,
        data: impl Into<Data>,
    ) -> Result<SystemTime, ClientError> {
        let op = Op::Set {
            path: path.to_string(),
            data: data.into(),
            version: None,
            czxid: Some(token.0),
        };
        match client.request(op).await? {
            OpResult::Stat { stat } => Ok(system_time(
                stat.mtime_ms.saturating_add(stat.ttl_ms.unwrap_or(0)),
            )),
            other => Err(ClientError::protocol(format!(
                "a set was answered with {other:?}"
            ))),
        }
    }

    /// Renews the hold on `path` for `ttl` from now (which becomes its TTL),
    /// if `token` is still its token, and returns when it now ends.
    ///
    /// # Errors
    /// As [`Hold::release`]; `InvalidArgument` for a TTL the server refuses.
    ///
    /// # Cancel safety
    /// Dropping the future after the request went out does not stop the
    /// renewal.
    pub async fn extend(
        client: &Client,
        path: &str,
        token: HoldToken,
        ttl: Duration,
    ) -> Result<SystemTime, ClientError> {
        let ttl_ms = millis(ttl, "TTL")?;
        let op = Op::Touch {
            path: path.to_string(),
            ttl_ms: Some(ttl_ms),
            czxid: Some(token.0),
        };
        match client.request(op).await? {
            OpResult::Stat { stat } => Ok(system_time(
                stat.mtime_ms.saturating_add(stat.ttl_ms.unwrap_or(ttl_ms)),
            )),
            other => Err(ClientError::protocol(format!(
                "a touch was answered with {other:?}"
            ))),
        }
    }
}

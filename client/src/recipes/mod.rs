//! Lock recipes on top of the server's lock queues: a mutex ([`Lock`]), a
//! counting [`Semaphore`], a fair [`RwLock`], an all-or-nothing
//! [`MultiLock`], leader [`Election`], and the timed [`Hold`] of a resource
//! across requests.
//!
//! Every queued recipe creates one ephemeral sequential node
//! `{path}/lock-<counter>` that the server grants in queue order (no herd:
//! a release wakes only the waiters it grants). Uncontended, taking a lock
//! is one round trip and releasing it is one more. A lock's fencing token
//! ([`LockGuard::token`]) strictly increases across all grants: pass it to
//! the storage the lock protects so that it can refuse a stale holder.

mod election;
mod hold;
mod lock;
mod lock_node;
mod multilock;
mod rwlock;
mod semaphore;

pub(crate) use crate::client::system_time;
pub use election::{Election, Leader, LeaderWatch, Leadership};
pub use hold::{Hold, HoldToken};
pub use lock::{Lock, LockGuard};
pub use lock_node::{LockNode, LockState, LostReason};
pub use multilock::{MultiLock, MultiLockGuard};
pub use rwlock::RwLock;
pub use semaphore::Semaphore;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::ClientError;

/// The name prefix of every lock node in a queue.
pub(crate) const LOCK_PREFIX: &str = "lock-";

/// Whole milliseconds of `d`, for a wire field called `what`.
pub(crate) fn millis(d: Duration, what: &str) -> Result<u64, ClientError> {
    u64::try_from(d.as_millis()).map_err(|_| {
        ClientError::invalid_argument(format!(
            "a {what} of {d:?} does not fit in 64-bit milliseconds; give a shorter one"
        ))
    })
}

/// `t` as an RFC 3339 UTC timestamp with milliseconds, for messages.
pub(crate) fn format_utc(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The instant `timeout` from now; a timeout too long to represent waits a
/// year, which is as good as for ever for an acquire.
pub(crate) fn deadline_after(timeout: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(86_400 * 365))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_utc(system_time(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            format_utc(system_time(1_700_000_000_000)),
            "2023-11-14T22:13:20.000Z"
        );
    }

    #[test]
    fn huge_durations_are_refused() {
        assert_eq!(millis(Duration::from_millis(1500), "TTL"), Ok(1500));
        let err = millis(Duration::MAX, "TTL").unwrap_err();
        assert!(err.to_string().contains("TTL"), "{err}");
    }
}

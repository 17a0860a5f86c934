//! At most one log line per second per reason for what a client can repeat
//! at will (refused handshakes, bad frames, refused requests): a flood of
//! them must not flood the log, nor spend the server's time writing it.
//! Lines held back are counted, and the count goes out with the next line
//! of that reason or, if none comes, from the ticker once the second is
//! over: nothing is lost but the repetition.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long one reason stays quiet after a line.
pub(crate) const WINDOW: Duration = Duration::from_secs(1);

/// The reasons a client can repeat, each at its own rate. Bounded: the
/// keys are the call sites' fixed names, never input.
pub(crate) struct Limiter {
    reasons: Mutex<BTreeMap<&'static str, Window>>,
}

struct Window {
    /// When the last line of this reason went out.
    logged_at: Instant,
    /// Lines held back since then.
    folded: u64,
    /// The level of this reason's lines, for the report of a count.
    level: tracing::Level,
}

impl Limiter {
    pub(crate) const fn new() -> Limiter {
        Limiter {
            reasons: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether a line of `reason` may go out at `now`: `Some(n)` with the
    /// number of lines held back before it (to be logged with it), `None`
    /// if this one is held back and counted.
    pub(crate) fn admit(
        &self,
        reason: &'static str,
        level: tracing::Level,
        now: Instant,
    ) -> Option<u64> {
        let mut reasons = self.reasons.lock();
        match reasons.get_mut(reason) {
            Some(w) if now.saturating_duration_since(w.logged_at) < WINDOW => {
                w.folded = w.folded.saturating_add(1);
                None
            }
            Some(w) => {
                let folded = std::mem::take(&mut w.folded);
                w.logged_at = now;
                w.level = level;
                Some(folded)
            }
            None => {
                reasons.insert(
                    reason,
                    Window {
                        logged_at: now,
                        folded: 0,
                        level,
                    },
                );
                Some(0)
            }
        }
    }

    /// The reasons whose window is over with lines held back, with their
    /// count and level; their counts start again from 0.
    pub(crate) fn due(&self, now: Instant) -> Vec<(&'static str, u64, tracing::Level)> {
        let mut reasons = self.reasons.lock();
        let mut due = Vec::new();
        for (reason, w) in reasons.iter_mut() {
            if w.folded > 0 && now.saturating_duration_since(w.logged_at) >= WINDOW {
                due.push((*reason, std::mem::take(&mut w.folded), w.level));
                w.logged_at = now;
            }
        }
        due
    }
}

/// The process's limiter: log lines are the process's, whichever server
/// in it writes them.
pub(crate) static LIMITER: LazyLock<Limiter> = LazyLock::new(Limiter::new);

/// Logs the count of lines held back whose second is over; the ticker calls
/// it.
pub(crate) fn report_folded() {
    for (reason, folded, level) in LIMITER.due(Instant::now()) {
        match level {
            tracing::Level::ERROR | tracing::Level::WARN => {
                tracing::warn!(
                    folded,
                    "{reason}: {folded} more in the last second, not logged one by one"
                )
            }
            tracing::Level::INFO => {
                tracing::info!(
                    folded,
                    "{reason}: {folded} more in the last second, not logged one by one"
                )
            }
            _ => {
                tracing::debug!(
                    folded,
                    "{reason}: {folded} more in the last second, not logged one by one"
                )
            }
        }
    }
}

/// Logs like `tracing`'s macros, but at most one line per second per
/// `reason` (a fixed string naming the call site), with the count of lines
/// held back before it as the field `folded`.
macro_rules! limited {
    (@level warn) => {
        tracing::Level::WARN
    };
    (@level info) => {
        tracing::Level::INFO
    };
    (@level debug) => {
        tracing::Level::DEBUG
    };
    ($level:ident, $reason:expr, $($rest:tt)+) => {{
        if tracing::enabled!($crate::server::log_limit::limited!(@level $level)) {
            if let Some(folded) = $crate::server::log_limit::LIMITER.admit(
                $reason,
                $crate::server::log_limit::limited!(@level $level),
                std::time::Instant::now(),
            ) {
                tracing::$level!(folded, $($rest)+);
            }
        }
    }};
}
pub(crate) use limited;

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn one_line_a_second_per_reason_and_the_rest_counted() {
        let limiter = Limiter::new();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(limiter.admit("bad frame", Level::WARN, at(0)), Some(0));
        for ms in 1..=500 {
            assert_eq!(limiter.admit("bad frame", Level::WARN, at(ms)), None);
        }
        // Another reason has its own window.
        assert_eq!(limiter.admit("refused", Level::INFO, at(10)), Some(0));
        // Nothing is due before the second is over.
        assert!(limiter.due(at(999)).is_empty());
        // The next line after the window carries the count.
        assert_eq!(
            limiter.admit("bad frame", Level::WARN, at(1_000)),
            Some(500)
        );
        assert_eq!(limiter.admit("bad frame", Level::WARN, at(1_001)), None);
        assert_eq!(limiter.admit("bad frame", Level::WARN, at(1_002)), None);
        // With no next line, the ticker reports the count once.
        assert_eq!(limiter.due(at(2_000)), vec![("bad frame", 2, Level::WARN)]);
        assert!(limiter.due(at(5_000)).is_empty());
        assert_eq!(limiter.admit("bad frame", Level::WARN, at(5_000)), Some(0));
    }
}

//! Work a `Drop` leaves behind: requests that a dropped handle needs sent
//! (a lock node's delete), handed to the session without a task of their own
//! and without a channel that could be full.
//!
//! The queue is bounded by reservation: a handle reserves its place when it
//! is made, so the push in its `Drop`, which cannot wait or fail, always
//! finds room. A handle that cannot reserve is refused when it is made,
//! where the caller can still act on it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::protocol::Op;

/// Places in one session's queue: how many live handles may leave work
/// behind.
/// Far above what one process holds in practice (each is a node on the
/// server, which bounds a session's nodes much lower).
pub(crate) const DEFERRED_MAX: usize = 65_536;

/// The session's queue of deferred requests.
#[derive(Debug)]
pub(crate) struct Deferred {
    ops: Mutex<VecDeque<Op>>,
    /// Places reserved and not yet given back or used.
    reserved: AtomicUsize,
    capacity: usize,
    /// `notify_one` keeps a permit, so a push while the session task is
    /// busy (or reconnecting) is seen on its next turn.
    pub(crate) notify: Notify,
    /// Set when the session is over: whatever was deferred went with it.
    closed: AtomicBool,
}

impl Default for Deferred {
    fn default() -> Self {
        Deferred::with_capacity(DEFERRED_MAX)
    }
}

impl Deferred {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Deferred {
            ops: Mutex::new(VecDeque::new()),
            reserved: AtomicUsize::new(0),
            capacity,
            notify: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Reserves a place for one request that a later `Drop` may push;
    /// `None` if all `capacity` places are held.
    pub(crate) fn reserve(self: &Arc<Self>) -> Option<Reservation> {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .ok()
            .map(|_| Reservation {
                queue: Some(Arc::clone(self)),
            })
    }

    /// How many places the queue has.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Takes every queued request, oldest first.
    pub(crate) fn take(&self) -> VecDeque<Op> {
        std::mem::take(&mut *self.ops.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The session ended: later pushes are dropped, and so is what waits.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.take();
    }

    fn release(&self) {
        self.reserved.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One reserved place in a session's [`Deferred`] queue. Dropped unused,
/// it gives the place back.
#[derive(Debug)]
pub(crate) struct Reservation {
    queue: Option<Arc<Deferred>>,
}

impl Reservation {
    /// Queues `op` in the reserved place; it goes out before the session's
    /// next request, or on the session task's next turn.
    pub(crate) fn push(mut self, op: Op) {
        let Some(queue) = self.queue.take() else {
            return;
        };
        if !queue.closed.load(Ordering::Acquire) {
            queue
                .ops
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back(op);
            queue.notify.notify_one();
        }
        // The place bounds live handles, not the queue: a pushed request
        // waits only until the session task's next turn or the next
        // request, which take the whole queue (while suspended, it waits
        // with the session's other requests for the resume).
        queue.release();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            queue.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Xid;

    fn ping(n: u64) -> Op {
        Op::Ping { ack: Xid(n) }
    }

    #[test]
    fn places_are_reserved_and_given_back() {
        let queue = Arc::new(Deferred::with_capacity(2));
        let a = queue.reserve().unwrap();
        let b = queue.reserve().unwrap();
        assert!(queue.reserve().is_none());
        drop(a);
        let c = queue.reserve().unwrap();
        b.push(ping(1));
        c.push(ping(2));
        let taken: Vec<_> = queue.take().into_iter().collect();
        assert_eq!(taken, vec![ping(1), ping(2)]);
        // Pushed places are free again.
        let _d = queue.reserve().unwrap();
        let _e = queue.reserve().unwrap();
    }

    #[test]
    fn a_closed_queue_drops_what_is_pushed() {
        let queue = Arc::new(Deferred::with_capacity(4));
        let a = queue.reserve().unwrap();
        queue.close();
        a.push(ping(1));
        assert!(queue.take().is_empty());
    }
}

//! A connection's outbound queue: frames waiting to be written, bounded in
//! bytes, filled synchronously under the coordinator's lock and drained by
//! the connection's writer, which writes everything ready and flushes once.

use std::collections::VecDeque;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Why a connection's queue stopped taking frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client asked (close session) or the connection ended normally.
    Done,
    /// The client did not read fast enough: queued bytes passed the bound.
    Overflow { bytes_max: usize },
    /// The session was resumed on another connection.
    Moved,
    /// The session expired.
    SessionExpired,
    /// The server is shutting down.
    ShuttingDown,
}

struct State {
    frames: VecDeque<Bytes>,
    bytes: usize,
    closing: Option<CloseReason>,
}

/// The queue. Pushing never blocks and never waits for the network, so it is
/// safe to call while holding the coordinator's lock: that is what keeps a
/// watch event ahead of any later reply on every connection.
pub struct Outbound {
    state: Mutex<State>,
    ready: Notify,
    /// Cancelled as soon as the queue starts closing, so the connection's
    /// reader stops taking requests that could no longer be answered.
    closed: CancellationToken,
    /// Cancelled on overflow only: the writer then drops the socket at once
    /// instead of finishing a write the client is not reading.
    overflowed: CancellationToken,
    bytes_max: usize,
}

impl Outbound {
    /// A queue that refuses frames once `bytes_max` bytes wait unwritten.
    pub fn new(bytes_max: usize) -> Self {
        Outbound {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                bytes: 0,
                closing: None,
            }),
            ready: Notify::new(),
            closed: CancellationToken::new(),
            overflowed: CancellationToken::new(),
            bytes_max,
        }
    }

    /// Queues a frame. Returns false, and closes the queue with
    /// [`CloseReason::Overflow`], when the client has let more than the bound
    /// pile up; returns false without queueing when the queue is closing.
    /// One frame larger than the bound still goes out when the queue is
    /// empty, so that a large reply is not mistaken for a stalled client.
    pub fn push(&self, frame: Bytes) -> bool {
        let mut state = self.state.lock();
        if state.closing.is_some() {
            return false;
        }
        if state.bytes > 0 && state.bytes + frame.len() > self.bytes_max {
            state.closing = Some(CloseReason::Overflow {
                bytes_max: self.bytes_max,
            });
            state.frames.clear();
            state.bytes = 0;
            drop(state);
            self.overflowed.cancel();
            self.closed.cancel();
            self.ready.notify_one();
            return false;
        }
        state.bytes += frame.len();
        state.frames.push_back(frame);
        drop(state);
        self.ready.notify_one();
        true
    }

    /// Queues a last frame, then closes: the writer sends what is queued and
    /// this frame, then ends the connection.
    pub fn push_last(&self, frame: Bytes, reason: CloseReason) {
        let mut state = self.state.lock();
        if state.closing.is_none() {
            state.bytes += frame.len();
            state.frames.push_back(frame);
            state.closing = Some(reason);
        }
        drop(state);
        self.closed.cancel();
        self.ready.notify_one();
    }

    /// Closes the queue: what is queued is still written (except after an
    /// overflow, where it was dropped).
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.state.lock();
        if state.closing.is_none() {
            state.closing = Some(reason);
        }
        drop(state);
        self.closed.cancel();
        self.ready.notify_one();
    }

    /// Resolves once the queue is closing.
    ///
    /// # Cancel safety
    /// Safe: it only waits.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// The bound on queued bytes.
    pub fn bytes_max(&self) -> usize {
        self.bytes_max
    }

    /// Resolves once the queue has overflowed.
    ///
    /// # Cancel safety
    /// Safe: it only waits.
    pub async fn overflowed(&self) {
        self.overflowed.cancelled().await
    }

    /// Why the queue is closing, if it is.
    #[cfg(test)]
    pub fn closing(&self) -> Option<CloseReason> {
        self.state.lock().closing.clone()
    }

    /// Waits for frames and moves all that are ready into `batch`. Returns
    /// the close reason instead once the queue is closing and empty.
    ///
    /// # Cancel safety
    /// Safe: frames are moved only after the wait completes, in one step.
    pub async fn next_batch(&self, batch: &mut Vec<Bytes>) -> Result<(), CloseReason> {
        loop {
            // Register interest before checking, so a push between the check
            // and the await is not missed.
            let notified = self.ready.notified();
            {
                let mut state = self.state.lock();
                if !state.frames.is_empty() {
                    batch.extend(state.frames.drain(..));
                    state.bytes = 0;
                    return Ok(());
                }
                if let Some(reason) = &state.closing {
                    return Err(reason.clone());
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_that_does_not_read_overflows_the_bound() {
        let out = Outbound::new(10);
        assert!(out.push(Bytes::from_static(b"123456")));
        assert!(!out.push(Bytes::from_static(b"789012")));
        assert_eq!(out.closing(), Some(CloseReason::Overflow { bytes_max: 10 }));
        let mut batch = Vec::new();
        assert_eq!(
            out.next_batch(&mut batch).await,
            Err(CloseReason::Overflow { bytes_max: 10 })
        );
        assert!(batch.is_empty());
    }

    #[tokio::test]
    async fn one_large_frame_passes_an_empty_queue_and_batches_drain_whole() {
        let out = Outbound::new(4);
        assert!(out.push(Bytes::from_static(b"a large reply")));
        let mut batch = Vec::new();
        out.next_batch(&mut batch).await.unwrap();
        assert_eq!(batch.len(), 1);
        assert!(out.push(Bytes::from_static(b"ab")));
        assert!(out.push(Bytes::from_static(b"cd")));
        out.push_last(Bytes::from_static(b"bye"), CloseReason::Done);
        batch.clear();
        out.next_batch(&mut batch).await.unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(out.next_batch(&mut batch).await, Err(CloseReason::Done));
    }
}

//! A connection's outbound queue: frames waiting to be written, bounded in
//! bytes, filled synchronously under the coordinator's lock and drained by
//! one writer at a time: whichever task queued them, writing what the socket
//! takes at once (no task wake for the common reply or event), or else the
//! connection's own task, which waits for the socket.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Waker;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use latchkey_client::protocol::limits::REPLY_FRAME_BYTES_MAX;
use parking_lot::Mutex;
use tokio::net::tcp::OwnedWriteHalf;
use tracing::debug;

use crate::server::log_limit::limited;

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
    /// Set between [`Outbound::hold`] and [`Outbound::fill`]: a reply is
    /// being encoded outside the coordinator's lock, and goes in at this
    /// index of `frames`; the frames from there on wait behind it, so that
    /// they keep their order. (A u32: frames are bounded by `bytes_max`.)
    held_at: Option<u32>,
    bytes: usize,
    closing: Option<CloseReason>,
    /// Someone is writing: an inline writer, or the connection's task.
    /// Frames leave the queue only to whoever set it, so they go out in
    /// order.
    busy: bool,
    /// Bytes an inline write could not finish; the connection's task, which
    /// is handed `busy` with them, writes them before anything else.
    leftover: Option<BytesMut>,
    /// The connection's socket, for inline writes from any task; dropped
    /// once the queue closes (the connection's task keeps its own).
    socket: Option<Arc<OwnedWriteHalf>>,
}

/// What [`Outbound::take_work`] gives the connection's task.
#[derive(Debug, PartialEq, Eq)]
pub enum Work {
    /// Bytes to write (framed frames, or the rest of an inline write); the
    /// task owns the writing until it calls [`Outbound::written`].
    Write(BytesMut),
    /// Nothing to write now, or another task is writing.
    Idle,
    /// The queue is closed and nothing is left to write (after an overflow,
    /// what was queued is dropped): the connection ends.
    Closed(CloseReason),
}

/// The queue. Pushing never blocks and never waits for the network, so it is
/// safe to call while holding the coordinator's lock: that is what keeps a
/// watch event ahead of any later reply on every connection.
pub struct Outbound {
    state: Mutex<State>,
    /// The connection's task, woken when it has work: a leftover, frames
    /// that no inline write took, or a close.
    task: AtomicWaker,
    bytes_max: usize,
}

impl Outbound {
    /// A queue that refuses frames once `bytes_max` bytes wait unwritten,
    /// writing inline to `socket` (if given).
    pub fn new(bytes_max: usize, socket: Option<Arc<OwnedWriteHalf>>) -> Self {
        Outbound {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                held_at: None,
                bytes: 0,
                closing: None,
                busy: false,
                leftover: None,
                socket,
            }),
            task: AtomicWaker::new(),
            bytes_max,
        }
    }

    /// Queues a frame. Returns false, and closes the queue with
    /// [`CloseReason::Overflow`], when the client has let more than the bound
    /// pile up; returns false without queueing when the queue is closing.
    /// One frame larger than the bound still goes out when the queue is
    /// empty, so that a large reply is not mistaken for a stalled client.
    /// The caller then writes the queue with [`Outbound::write_inline`]:
    /// pushing alone wakes nobody, so that a frame written inline costs no
    /// task wake.
    pub fn push(&self, frame: Bytes) -> bool {
        let state = self.state.lock();
        if state.closing.is_some() {
            return false;
        }
        self.queue(state, frame)
    }

    /// Queues `frame` behind everything queued (behind a held reply too),
    /// or overflows.
    fn queue(&self, mut state: parking_lot::MutexGuard<'_, State>, frame: Bytes) -> bool {
        if self.overflows(&state, &frame) {
            return self.overflow(state);
        }
        state.bytes += frame.len();
        state.frames.push_back(frame);
        true
    }

    /// Whether queueing `frame` would take a queue that holds anything past
    /// the bound (one frame alone always fits, however large).
    fn overflows(&self, state: &State, frame: &Bytes) -> bool {
        state.bytes > 0 && state.bytes + frame.len() > self.bytes_max
    }

    /// Closes the queue for a client that let too much pile up: what is
    /// queued is dropped. Returns false, for the push that overflowed.
    fn overflow(&self, mut state: parking_lot::MutexGuard<'_, State>) -> bool {
        state.socket = None;
        state.closing = Some(CloseReason::Overflow {
            bytes_max: self.bytes_max,
        });
        state.frames.clear();
        state.held_at = None;
        state.bytes = 0;
        drop(state);
        self.task.wake();
        false
    }

    /// Keeps a place for a reply that the caller encodes after it lets go
    /// of the coordinator's lock: frames pushed until [`Outbound::fill`]
    /// wait behind it. Call under the coordinator's lock, where the reply
    /// was made, and fill without waiting on anything; a second hold
    /// before the fill is a bug (one connection answers one request at a
    /// time).
    pub fn hold(&self) {
        let mut state = self.state.lock();
        debug_assert!(state.held_at.is_none(), "a reply is already held");
        if state.closing.is_none() {
            state.held_at = Some(u32::try_from(state.frames.len()).unwrap_or(u32::MAX));
        }
    }

    /// Puts the held reply in its place, and the frames queued behind it
    /// after it. Returns as [`Outbound::push`] does for the reply.
    pub fn fill(&self, reply: Bytes) -> bool {
        let mut state = self.state.lock();
        // None: the queue was closing at the hold, or overflowed since and
        // dropped everything.
        let Some(at) = state.held_at.take() else {
            return false;
        };
        if self.overflows(&state, &reply) {
            return self.overflow(state);
        }
        state.bytes += reply.len();
        let at = usize::try_from(at)
            .unwrap_or(usize::MAX)
            .min(state.frames.len());
        state.frames.insert(at, reply);
        true
    }

    /// Queues a last frame, then closes: the connection's task sends what is
    /// queued and this frame, then ends the connection.
    pub fn push_last(&self, frame: Bytes, reason: CloseReason) {
        let mut state = self.state.lock();
        if state.closing.is_none() {
            state.bytes += frame.len();
            state.frames.push_back(frame);
            state.closing = Some(reason);
            state.socket = None;
        }
        drop(state);
        self.task.wake();
    }

    /// Closes the queue: what is queued is still written (except after an
    /// overflow, where it was dropped).
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.state.lock();
        if state.closing.is_none() {
            state.closing = Some(reason);
            state.socket = None;
        }
        drop(state);
        self.task.wake();
    }

    /// Why the queue is closing, if it is.
    pub fn closing(&self) -> Option<CloseReason> {
        self.state.lock().closing.clone()
    }

    /// Makes `waker` the one woken when the connection's task has work.
    /// Register before [`Outbound::take_work`], so that no wake is lost in
    /// between.
    pub fn register(&self, waker: &Waker) {
        self.task.register(waker);
    }

    /// The connection's task's next piece of work (see [`Work`]). With
    /// [`Work::Write`], the task owns the writing until
    /// [`Outbound::written`]. A batch too large for a client's frame limit
    /// closes the queue.
    pub fn take_work(&self) -> Work {
        let mut state = self.state.lock();
        if let Some(reason @ CloseReason::Overflow { .. }) = &state.closing {
            return Work::Closed(reason.clone());
        }
        if let Some(leftover) = state.leftover.take() {
            return Work::Write(leftover);
        }
        if state.busy {
            return Work::Idle;
        }
        if state.writable() > 0 {
            return match state.take_batch() {
                Ok(framed) => {
                    state.busy = true;
                    Work::Write(framed)
                }
                Err(e) => {
                    limited!(
                        warn,
                        "closing connection: a reply batch failed",
                        "closing connection: {e}"
                    );
                    state.closing = Some(CloseReason::Done);
                    state.socket = None;
                    Work::Closed(CloseReason::Done)
                }
            };
        }
        match &state.closing {
            // A held reply and what waits behind it still go out first.
            Some(reason) if state.held_at.is_none() && state.frames.is_empty() => {
                Work::Closed(reason.clone())
            }
            _ => Work::Idle,
        }
    }

    /// The connection's task has written what [`Outbound::take_work`] gave
    /// it.
    pub fn written(&self) {
        self.state.lock().busy = false;
    }

    /// Writes what is queued straight to the socket from the calling task,
    /// without waiting: if nobody else is writing, takes the frames, frames
    /// them and writes as much as the socket takes now. The rest, if any, is
    /// handed to the connection's task. Returns false if the socket failed
    /// (the queue is then closed).
    pub fn write_inline(&self) -> bool {
        let (socket, framed) = {
            let mut state = self.state.lock();
            if state.busy || state.writable() == 0 || state.closing.is_some() {
                return true;
            }
            let Some(socket) = state.socket.clone() else {
                drop(state);
                self.task.wake();
                return true;
            };
            state.busy = true;
            (socket, state.take_batch())
        };
        let mut framed = match framed {
            Ok(framed) => framed,
            Err(e) => {
                limited!(
                    warn,
                    "closing connection: a reply batch failed",
                    "closing connection: {e}"
                );
                self.state.lock().busy = false;
                self.close(CloseReason::Done);
                return false;
            }
        };
        // Bounded: each pass writes at least one byte or stops.
        while !framed.is_empty() {
            match socket.try_write(&framed) {
                Ok(0) => break,
                Ok(n) => {
                    let _ = framed.split_to(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!("write failed: {e}");
                    self.state.lock().busy = false;
                    self.close(CloseReason::Done);
                    return false;
                }
            }
        }
        let mut state = self.state.lock();
        if framed.is_empty() {
            state.busy = false;
            // Frames queued meanwhile, or a close, are the connection
            // task's now.
            let wake = state.writable() > 0 || state.closing.is_some();
            drop(state);
            if wake {
                self.task.wake();
            }
        } else {
            state.leftover = Some(framed);
            drop(state);
            self.task.wake();
        }
        true
    }
}

impl State {
    /// How many frames from the front may be written now: all, or those
    /// ahead of a held reply.
    fn writable(&self) -> usize {
        match self.held_at {
            Some(at) => usize::try_from(at)
                .unwrap_or(usize::MAX)
                .min(self.frames.len()),
            None => self.frames.len(),
        }
    }

    /// Takes the writable frames as one batch (see [`frame_batch`]); a held
    /// reply's place moves to the front by as many.
    fn take_batch(&mut self) -> std::io::Result<BytesMut> {
        let n = self.writable();
        let taken: usize = self.frames.iter().take(n).map(Bytes::len).sum();
        self.bytes = self.bytes.saturating_sub(taken);
        if let Some(at) = &mut self.held_at {
            *at = at.saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
        }
        frame_batch(&mut self.frames, n)
    }
}

/// The first `n` frames of `batch`, each behind its 4-byte big-endian
/// length, in one buffer for one write; takes them out of `batch`. The
/// buffer is the batch's size and goes with it, so an idle connection holds
/// no write buffer.
pub(super) fn frame_batch(batch: &mut VecDeque<Bytes>, n: usize) -> std::io::Result<BytesMut> {
    let n = n.min(batch.len());
    let total: usize = batch.iter().take(n).map(|frame| frame.len() + 4).sum();
    let mut framed = BytesMut::with_capacity(total);
    for frame in batch.drain(..n) {
        // Clients refuse frames over this; sending one would only make them
        // drop the connection with a less clear error.
        let len = u32::try_from(frame.len())
            .ok()
            .filter(|&len| len as usize <= REPLY_FRAME_BYTES_MAX)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "a reply of {} bytes is over the {REPLY_FRAME_BYTES_MAX} bytes clients accept",
                        frame.len(),
                    ),
                )
            })?;
        framed.put_u32(len);
        framed.extend_from_slice(&frame);
    }
    Ok(framed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(work: Work) -> BytesMut {
        match work {
            Work::Write(bytes) => bytes,
            other => panic!("expected bytes to write, got {other:?}"),
        }
    }

    fn frames(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            out.push(bytes[4..4 + len].to_vec());
            bytes = &bytes[4 + len..];
        }
        out
    }

    #[test]
    fn a_client_that_does_not_read_overflows_the_bound() {
        let out = Outbound::new(10, None);
        assert!(out.push(Bytes::from_static(b"123456")));
        assert!(!out.push(Bytes::from_static(b"789012")));
        assert_eq!(out.closing(), Some(CloseReason::Overflow { bytes_max: 10 }));
        assert_eq!(
            out.take_work(),
            Work::Closed(CloseReason::Overflow { bytes_max: 10 })
        );
    }

    #[test]
    fn one_large_frame_passes_an_empty_queue_and_batches_drain_whole() {
        let out = Outbound::new(4, None);
        assert!(out.push(Bytes::from_static(b"a large reply")));
        assert_eq!(
            frames(&written(out.take_work())),
            [b"a large reply".to_vec()]
        );
        assert_eq!(out.take_work(), Work::Idle, "one batch at a time");
        out.written();
        assert!(out.push(Bytes::from_static(b"ab")));
        assert!(out.push(Bytes::from_static(b"cd")));
        out.push_last(Bytes::from_static(b"bye"), CloseReason::Done);
        assert!(!out.push(Bytes::from_static(b"late")), "closed");
        assert_eq!(frames(&written(out.take_work())).len(), 3);
        out.written();
        assert_eq!(out.take_work(), Work::Closed(CloseReason::Done));
    }

    #[test]
    fn a_held_reply_keeps_its_place_ahead_of_what_was_queued_after_it() {
        let out = Outbound::new(1 << 20, None);
        assert!(out.push(Bytes::from_static(b"before")));
        out.hold();
        assert!(out.push(Bytes::from_static(b"event")));
        assert_eq!(
            frames(&written(out.take_work())),
            [b"before".to_vec()],
            "only what is ahead of the held reply goes"
        );
        out.written();
        assert_eq!(out.take_work(), Work::Idle, "the event waits for the reply");
        assert!(out.fill(Bytes::from_static(b"reply")));
        assert_eq!(
            frames(&written(out.take_work())),
            [b"reply".to_vec(), b"event".to_vec()]
        );
        out.written();

        // A close while a reply is held: the reply, then the last frame.
        out.hold();
        out.push_last(Bytes::from_static(b"moved"), CloseReason::Moved);
        assert_eq!(out.take_work(), Work::Idle, "not closed before the reply");
        assert!(out.fill(Bytes::from_static(b"reply")));
        assert_eq!(
            frames(&written(out.take_work())),
            [b"reply".to_vec(), b"moved".to_vec()]
        );
        out.written();
        assert_eq!(out.take_work(), Work::Closed(CloseReason::Moved));
    }

    #[test]
    fn a_held_reply_over_the_bound_overflows() {
        let out = Outbound::new(10, None);
        assert!(out.push(Bytes::from_static(b"123456")));
        out.hold();
        assert!(!out.fill(Bytes::from_static(b"789012")));
        assert_eq!(out.closing(), Some(CloseReason::Overflow { bytes_max: 10 }));
        // An overflow while held drops the place too.
        let out = Outbound::new(10, None);
        assert!(out.push(Bytes::from_static(b"123456")));
        out.hold();
        assert!(!out.push(Bytes::from_static(b"789012")));
        assert!(!out.fill(Bytes::from_static(b"r")));
    }

    #[test]
    fn the_task_is_woken_for_work_an_inline_write_did_not_take() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::Wake;

        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let out = Outbound::new(1 << 20, None);
        out.register(&waker);
        assert!(out.push(Bytes::from_static(b"one")));
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            0,
            "a push alone wakes nobody"
        );
        assert!(out.write_inline(), "no socket yet");
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the task writes it");
        out.register(&waker);
        out.close(CloseReason::Moved);
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "a close wakes the task");
    }

    /// A connected pair of sockets on loopback: our halves, and the peer
    /// that reads what we write.
    async fn pair() -> (
        OwnedWriteHalf,
        tokio::net::tcp::OwnedReadHalf,
        tokio::net::TcpStream,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (ours, theirs) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (read, write) = ours.expect("connect").into_split();
        (write, read, theirs.expect("accept").0)
    }

    async fn read_frames(peer: &mut tokio::net::TcpStream, count: usize) -> Vec<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut frames = Vec::new();
        for _ in 0..count {
            let len = peer.read_u32().await.expect("a length") as usize;
            let mut frame = vec![0; len];
            peer.read_exact(&mut frame).await.expect("a frame");
            frames.push(frame);
        }
        frames
    }

    #[tokio::test]
    async fn an_inline_write_sends_in_order_and_waits_its_turn() {
        let (socket, _read, mut peer) = pair().await;
        let out = Outbound::new(1 << 20, Some(Arc::new(socket)));
        assert!(out.push(Bytes::from_static(b"one")));
        assert!(out.push(Bytes::from_static(b"two")));
        assert!(out.write_inline());
        assert_eq!(
            read_frames(&mut peer, 2).await,
            [b"one".to_vec(), b"two".to_vec()]
        );
        // While the connection's task holds a batch, an inline write leaves
        // the queue alone, so nothing overtakes that batch.
        assert!(out.push(Bytes::from_static(b"three")));
        let _batch = written(out.take_work());
        assert!(out.push(Bytes::from_static(b"four")));
        assert!(out.write_inline());
        assert_eq!(
            out.state.lock().frames.len(),
            1,
            "four was taken out of turn"
        );
        out.written();
        assert!(out.write_inline());
        assert!(out.state.lock().frames.is_empty());
    }

    #[tokio::test]
    async fn what_an_inline_write_cannot_finish_goes_to_the_task_first() {
        let (socket, _read, mut peer) = pair().await;
        let socket = Arc::new(socket);
        let out = Outbound::new(64 << 20, Some(socket.clone()));
        // More than the socket buffers take while nobody reads.
        let big = Bytes::from(vec![7u8; 16 << 20]);
        assert!(out.push(big.clone()));
        assert!(out.write_inline());
        assert!(out.push(Bytes::from_static(b"after")));
        let rest = written(out.take_work());
        assert!(!rest.is_empty());
        assert_eq!(
            out.state.lock().frames.len(),
            1,
            "the rest comes before what was queued after it"
        );
        let reader = tokio::spawn(async move { read_frames(&mut peer, 2).await });
        for mut bytes in [rest, BytesMut::new()] {
            if bytes.is_empty() {
                out.written();
                bytes = written(out.take_work());
            }
            while !bytes.is_empty() {
                socket.writable().await.expect("writable");
                if let Ok(n) = socket.try_write(&bytes) {
                    let _ = bytes.split_to(n);
                }
            }
        }
        let frames = reader.await.expect("reader");
        assert_eq!(frames[0].len(), big.len());
        assert_eq!(frames[1], b"after".to_vec());
    }
}

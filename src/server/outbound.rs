//! A connection's outbound queue: frames waiting to be written, bounded in
//! bytes, filled synchronously under the coordinator's lock and drained by
//! one writer at a time: the connection's reader, which writes what it can
//! without blocking right after answering (no task wake for the common
//! reply), or else the connection's writer task, which waits for the socket.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use latchkey_client::protocol::limits::REPLY_FRAME_BYTES_MAX;
use parking_lot::Mutex;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

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
    /// Someone is writing: the reader inline, or the writer task. Frames
    /// leave the queue only to whoever set it, so they go out in order.
    busy: bool,
    /// Bytes an inline write could not finish; the writer task, which is
    /// handed `busy` with them, writes them before anything else.
    leftover: Option<BytesMut>,
    /// The connection's socket, for inline writes from any task; dropped
    /// once the queue closes (the writer task keeps its own for the rest).
    socket: Option<Arc<OwnedWriteHalf>>,
}

/// What [`Outbound::next_batch`] hands the writer task.
#[derive(Debug, PartialEq, Eq)]
pub enum Batch {
    /// Frames to frame and write.
    Frames,
    /// The rest of an inline write, already framed.
    Leftover(BytesMut),
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
                busy: false,
                leftover: None,
                socket: None,
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
    /// The caller then writes the queue with [`Outbound::write_inline`]
    /// or wakes the writer task with [`Outbound::kick`]: pushing alone
    /// wakes nobody, so that a reply written inline costs no task wake.
    pub fn push(&self, frame: Bytes) -> bool {
        let mut state = self.state.lock();
        if state.closing.is_some() {
            return false;
        }
        if state.bytes > 0 && state.bytes + frame.len() > self.bytes_max {
            state.socket = None;
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
            state.socket = None;
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
            state.socket = None;
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

    /// Waits for frames and moves all that are ready into `batch`, or for
    /// the rest of an inline write; either way the writer task then owns the
    /// writing until [`Outbound::written`]. Returns the close reason instead
    /// once the queue is closing, empty and nobody writes.
    ///
    /// # Cancel safety
    /// Safe: frames are moved only after the wait completes, in one step.
    pub async fn next_batch(&self, batch: &mut Vec<Bytes>) -> Result<Batch, CloseReason> {
        loop {
            let notified = self.ready.notified();
            {
                let mut state = self.state.lock();
                if let Some(leftover) = state.leftover.take() {
                    return Ok(Batch::Leftover(leftover));
                }
                if !state.busy {
                    if !state.frames.is_empty() {
                        batch.extend(state.frames.drain(..));
                        state.bytes = 0;
                        state.busy = true;
                        return Ok(Batch::Frames);
                    }
                    if let Some(reason) = &state.closing {
                        return Err(reason.clone());
                    }
                }
            }
            notified.await;
        }
    }

    /// Lets [`Outbound::write_inline`] write to `socket` from now on.
    pub fn set_socket(&self, socket: Arc<OwnedWriteHalf>) {
        let mut state = self.state.lock();
        if state.closing.is_none() {
            state.socket = Some(socket);
        }
    }

    /// Wakes the writer task to write what is queued.
    pub fn kick(&self) {
        self.ready.notify_one();
    }

    /// The writer task has written what [`Outbound::next_batch`] gave it.
    pub fn written(&self) {
        self.state.lock().busy = false;
    }

    /// Writes what is queued straight to `socket` from the calling task,
    /// without waiting: if nobody else is writing, takes the frames, frames
    /// them and writes as much as the socket takes now. The rest, if any, is
    /// handed to the writer task. Returns false if the socket failed (the
    /// queue is then closed).
    pub fn write_inline(&self) -> bool {
        let mut batch = Vec::new();
        let socket = {
            let mut state = self.state.lock();
            if state.busy || state.frames.is_empty() || state.closing.is_some() {
                return true;
            }
            let Some(socket) = state.socket.clone() else {
                // Not serving yet: the writer task takes the frames when it
                // starts.
                drop(state);
                self.ready.notify_one();
                return true;
            };
            batch.extend(state.frames.drain(..));
            state.bytes = 0;
            state.busy = true;
            socket
        };
        let mut framed = match frame_batch(&mut batch) {
            Ok(framed) => framed,
            Err(e) => {
                warn!("closing connection: {e}");
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
            // Frames queued meanwhile, or a close, are the writer task's now.
            let wake = !state.frames.is_empty() || state.closing.is_some();
            drop(state);
            if wake {
                self.ready.notify_one();
            }
        } else {
            state.leftover = Some(framed);
            drop(state);
            self.ready.notify_one();
        }
        true
    }
}

/// The frames of `batch`, each behind its 4-byte big-endian length, in one
/// buffer for one write; empties `batch`. The buffer is the batch's size and
/// goes with it, so an idle connection holds no write buffer.
pub fn frame_batch(batch: &mut Vec<Bytes>) -> std::io::Result<BytesMut> {
    let total: usize = batch.iter().map(|frame| frame.len() + 4).sum();
    let mut framed = BytesMut::with_capacity(total);
    for frame in batch.drain(..) {
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
        assert_eq!(out.next_batch(&mut batch).await, Ok(Batch::Frames));
        assert_eq!(batch.len(), 1);
        out.written();
        assert!(out.push(Bytes::from_static(b"ab")));
        assert!(out.push(Bytes::from_static(b"cd")));
        out.push_last(Bytes::from_static(b"bye"), CloseReason::Done);
        batch.clear();
        assert_eq!(out.next_batch(&mut batch).await, Ok(Batch::Frames));
        assert_eq!(batch.len(), 3);
        out.written();
        assert_eq!(out.next_batch(&mut batch).await, Err(CloseReason::Done));
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
        let out = Outbound::new(1 << 20);
        let socket = Arc::new(socket);
        out.set_socket(socket.clone());
        assert!(out.push(Bytes::from_static(b"one")));
        assert!(out.push(Bytes::from_static(b"two")));
        assert!(out.write_inline());
        assert_eq!(
            read_frames(&mut peer, 2).await,
            [b"one".to_vec(), b"two".to_vec()]
        );
        // While the writer task holds a batch, an inline write leaves the
        // queue alone, so nothing overtakes that batch.
        assert!(out.push(Bytes::from_static(b"three")));
        let mut batch = Vec::new();
        assert_eq!(out.next_batch(&mut batch).await, Ok(Batch::Frames));
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
    async fn what_an_inline_write_cannot_finish_goes_to_the_writer_task_first() {
        let (socket, _read, mut peer) = pair().await;
        let out = Outbound::new(64 << 20);
        let socket = Arc::new(socket);
        out.set_socket(socket.clone());
        // More than the socket buffers take while nobody reads.
        let big = Bytes::from(vec![7u8; 16 << 20]);
        assert!(out.push(big.clone()));
        assert!(out.write_inline());
        assert!(out.push(Bytes::from_static(b"after")));
        let mut batch = Vec::new();
        let Ok(Batch::Leftover(rest)) = out.next_batch(&mut batch).await else {
            panic!("the rest of the inline write should come first");
        };
        assert!(!rest.is_empty() && batch.is_empty());
        let reader = tokio::spawn(async move { read_frames(&mut peer, 2).await });
        let mut rest = rest;
        while !rest.is_empty() {
            socket.writable().await.expect("writable");
            if let Ok(n) = socket.try_write(&rest) {
                let _ = rest.split_to(n);
            }
        }
        out.written();
        assert_eq!(out.next_batch(&mut batch).await, Ok(Batch::Frames));
        let mut framed = frame_batch(&mut batch).expect("framed");
        while !framed.is_empty() {
            socket.writable().await.expect("writable");
            if let Ok(n) = socket.try_write(&framed) {
                let _ = framed.split_to(n);
            }
        }
        let frames = reader.await.expect("reader");
        assert_eq!(frames[0].len(), big.len());
        assert_eq!(frames[1], b"after".to_vec());
    }
}

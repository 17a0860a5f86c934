//! The session task, and what it shares with the client handles.
//!
//! A handle queues its request and writes it to the socket itself when the
//! connection is up and the socket takes it, so a request crosses no task
//! on its way out; only its reply does. The session task reads and matches
//! replies, routes server events to the [`subscriptions`] that the layers
//! above installed, writes what the socket did not take, sends heartbeats,
//! and reconnects and resumes the session when the connection breaks. It
//! knows the protocol and nothing of locks or recipes.

pub(crate) mod deferred;
pub(crate) mod options;
pub(crate) mod subscriptions;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Notify, Semaphore, TryAcquireError};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::codec::{Framed, FramedParts, LengthDelimitedCodec};

use self::deferred::Deferred;
use self::options::{ClientOptions, SessionState, SessionStatus};
use self::subscriptions::{set_watches_batches, set_watches_keys, Subscriber, Subscriptions};
use crate::error::ClientError;
use crate::protocol::{
    self, limits, ErrorCode, Hello, Op, OpResult, Resume, Secret, ServerMessage, SessionEvent,
    SessionId, WatchKind, Welcome, Xid, Zxid, PROTOCOL_VERSION,
};

/// Bound on the requests of callers that a session holds unanswered, in
/// flight or waiting for a slot on the wire or for a connection. A caller
/// past it waits in [`Shared::submit`] until an earlier request is
/// answered: backpressure instead of an unbounded queue. Twice the wire's
/// `INFLIGHT_MAX` lets many tasks sharing one client keep the next batch
/// queued while one is in flight.
pub(crate) const REQUESTS_QUEUED_MAX: usize = 2 * limits::INFLIGHT_MAX;

/// Bytes of framed requests held for the socket at once. Further requests
/// are framed as the socket takes these, so the buffer stays small however
/// many large requests wait.
const OUT_BYTES_SOFT_MAX: usize = 64 * 1024;

/// Room left in a frame for the request around an encoded op (the xid and
/// the JSON around it), used to check frame size before an xid exists.
const REQUEST_OVERHEAD_BYTES: usize = 64;

/// Bound on the session timeout the client uses, whatever the server
/// announces: instants derived from it then cannot overflow, and a client
/// that uses less than the server's timeout is only more conservative
/// (earlier heartbeats, an earlier lease end).
const SESSION_TIMEOUT_MAX: Duration = Duration::from_secs(24 * 60 * 60);

/// The session timeout a welcome announces, as the client uses it.
pub(crate) fn session_timeout(welcome: &Welcome) -> Duration {
    Duration::from_millis(welcome.session_timeout_ms).min(SESSION_TIMEOUT_MAX)
}

/// Takes a request's outcome on the session task, with the request's op:
/// it hands the result to its caller and may install subscriptions first,
/// so that no event after the reply is missed. Called once, also when the session ends first; a
/// handler dropped uncalled (the session task is gone) drops its caller's
/// channel.
pub(crate) type OnReply =
    Box<dyn FnOnce(&Op, Result<OpResult, ClientError>, &mut Install<'_>) + Send>;

/// What a reply handler may do to the session while it runs.
pub(crate) struct Install<'a> {
    subs: &'a mut Subscriptions,
    shared: &'a Shared,
    last_zxid: Zxid,
    retried: bool,
}

impl Install<'_> {
    /// Follows a key from this reply on.
    pub(crate) fn add(&mut self, path: String, kind: WatchKind, sub: Box<dyn Subscriber>) {
        self.subs.add(path, kind, sub);
    }

    /// Follows a node just created at `path`, ending earlier followers of
    /// the key (see [`Subscriptions::replace`]).
    pub(crate) fn replace(&mut self, path: String, kind: WatchKind, sub: Box<dyn Subscriber>) {
        self.subs.replace(path, kind, sub);
    }

    /// Whether the reply came from the server's cache after a resume: it
    /// may predate events the client missed in the gap.
    pub(crate) fn retried(&self) -> bool {
        self.retried
    }

    /// Re-registers a key just installed, so that the server reports what
    /// changed since the zxid the session last saw (for a [`retried`]
    /// reply). Queued at once, so it goes ahead of any request the caller
    /// sends once it has the reply: its event then comes before their
    /// replies.
    ///
    /// [`retried`]: Install::retried
    pub(crate) fn recheck(&mut self, path: String, kind: WatchKind) {
        let mut link = self.shared.lock();
        for op in set_watches_batches(&[(path, kind)], self.last_zxid) {
            link.queue.push(op, Origin::SetWatches);
        }
        link.pump();
    }
}

/// One connection after the handshake: the session task reads it; the write
/// half is shared with the handles through [`Link`].
pub(crate) struct Conn {
    reader: Framed<OwnedReadHalf, LengthDelimitedCodec>,
    writer: Arc<OwnedWriteHalf>,
}

impl Conn {
    fn new(framed: Framed<TcpStream, LengthDelimitedCodec>) -> Conn {
        let parts = framed.into_parts();
        let (read, write) = parts.io.into_split();
        // Anything the server sent right behind the welcome was read with
        // it and must not be lost.
        let mut read_parts = FramedParts::new::<Bytes>(read, parts.codec);
        read_parts.read_buf = parts.read_buf;
        Conn {
            reader: Framed::from_parts(read_parts),
            writer: Arc::new(write),
        }
    }
}

/// Who waits for an entry's reply.
pub(crate) enum Origin {
    /// A caller's request.
    User(OnReply),
    /// Work a dropped handle left behind (see [`deferred`]).
    Background,
    Ping,
    SetWatches,
    Close,
}

impl Origin {
    /// Whether the entry holds one of the callers' [`Shared::slots`].
    fn holds_slot(&self) -> bool {
        matches!(self, Origin::User(_))
    }
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::User(_) => "User",
            Origin::Background => "Background",
            Origin::Ping => "Ping",
            Origin::SetWatches => "SetWatches",
            Origin::Close => "Close",
        })
    }
}

#[derive(Debug)]
struct Entry {
    /// Assigned when first written; kept across a resume only by a write the
    /// server already applied (its reply then comes from the server's cache).
    xid: Option<Xid>,
    op: Op,
    /// `op` as JSON, encoded once when queued: a resume may send it again
    /// under another xid.
    encoded: Bytes,
    /// When it was written on the current connection.
    sent_at: Option<Instant>,
    origin: Origin,
    /// Resent after a resume with the xid the server already applied: its
    /// reply comes from the server's cache and may be older than events the
    /// client missed in the gap.
    retried: bool,
}

/// The requests of a session not yet answered, in the order they go (or
/// went) on the wire. A prefix of `sent` entries is written on the current
/// connection; the rest wait for a slot (at most `INFLIGHT_MAX` in flight) or
/// for a connection.
#[derive(Debug)]
struct Queue {
    entries: VecDeque<Entry>,
    sent: usize,
    next_xid: u64,
}

impl Queue {
    fn new() -> Self {
        Queue {
            entries: VecDeque::new(),
            sent: 0,
            next_xid: 1,
        }
    }

    fn inflight(&self) -> usize {
        self.sent
    }

    /// Whether an entry waits and a slot is free for it.
    fn can_send(&self) -> bool {
        self.sent < self.entries.len() && self.sent < limits::INFLIGHT_MAX
    }

    fn push(&mut self, op: Op, origin: Origin) {
        let encoded = protocol::encode(&op);
        self.push_encoded(op, encoded, origin);
    }

    fn push_encoded(&mut self, op: Op, encoded: Bytes, origin: Origin) {
        self.entries.push_back(Entry {
            xid: None,
            op,
            encoded,
            sent_at: None,
            origin,
            retried: false,
        });
    }

    /// The next entry to write, if one waits and a slot is free. Marks it
    /// sent at `now` and gives it an xid if it has none.
    fn next_to_send(&mut self, now: Instant) -> Option<(Xid, &Entry)> {
        if self.sent >= limits::INFLIGHT_MAX {
            return None;
        }
        let entry = self.entries.get_mut(self.sent)?;
        let xid = match entry.xid {
            Some(xid) => xid,
            None => {
                let xid = Xid(self.next_xid);
                self.next_xid += 1;
                entry.xid = Some(xid);
                xid
            }
        };
        entry.sent_at = Some(now);
        self.sent += 1;
        Some((xid, entry))
    }
    /// Takes the entry a reply with `xid` answers: replies come in request
    /// order, so it must be the front one. Anything else breaks the protocol.
    fn on_reply(&mut self, xid: Xid) -> Result<Entry, String> {
        if self.sent == 0 {
            return Err(format!(
                "a reply for xid {} with no request in flight",
                xid.0
            ));
        }
        let front = self.entries.front().and_then(|e| e.xid);
        if front != Some(xid) {
            return Err(format!(
                "a reply for xid {} while xid {} was the oldest in flight",
                xid.0,
                front.map_or(0, |x| x.0)
            ));
        }
        self.sent -= 1;
        self.entries
            .pop_front()
            .ok_or_else(|| "reply queue out of step".to_string())
    }

    /// The ack to send: the highest xid received, but below any request
    /// still waiting with a lower xid (one kept across a resume), so that
    /// the server never forgets a reply the client still needs.
    fn ack(&self, last_received: Xid) -> Xid {
        match self.entries.iter().filter_map(|e| e.xid).min() {
            Some(lowest) if lowest <= last_received => Xid(lowest.0.saturating_sub(1)),
            _ => last_received,
        }
    }

    /// The oldest `last_zxid` among re-registrations still unanswered.
    fn unanswered_watch_baseline(&self) -> Option<Zxid> {
        self.entries
            .iter()
            .filter_map(|e| match (&e.origin, &e.op) {
                (Origin::SetWatches, Op::SetWatches { last_zxid, .. }) => Some(*last_zxid),
                _ => None,
            })
            .min()
    }

    /// Prepares the queue for a resumed connection.
    ///
    /// Heartbeats and old watch re-registrations are dropped. Writes the
    /// server has applied (`xid <= last_xid_applied`) keep their xid so that
    /// the server answers them from its reply cache. Everything else gets a
    /// fresh xid when written: the server never applied those (`Welcome`
    /// says so), and reads are safe to repeat. `set_watches` go first, so
    /// every watch is registered again before any resent request's reply.
    fn resume(&mut self, last_xid_applied: Xid, set_watches: Vec<Op>) {
        let old = std::mem::take(&mut self.entries);
        for op in set_watches {
            self.push(op, Origin::SetWatches);
        }
        for mut entry in old {
            if matches!(entry.origin, Origin::Ping | Origin::SetWatches) {
                continue;
            }
            let applied = entry.xid.is_some_and(|x| x <= last_xid_applied);
            if applied && entry.op.is_write() {
                entry.retried = true;
            } else {
                entry.xid = None;
            }
            entry.sent_at = None;
            self.entries.push_back(entry);
        }
        self.sent = 0;
    }

    fn drain(&mut self) -> impl Iterator<Item = Entry> + '_ {
        self.sent = 0;
        self.entries.drain(..)
    }
}

/// The conservative end of the lease that a request sent at `sent_at`
/// and answered bought: the server heard it no earlier than `sent_at`, so it
/// keeps the session at least `timeout` past that by its own clock. 1/32 of
/// the timeout is kept back for the two clocks running at slightly
/// different rates (Chubby keeps a margin for the same reason).
pub(crate) fn lease_end(sent_at: Instant, timeout: Duration) -> Instant {
    sent_at + (timeout - timeout / 32)
}

/// A pause between `delay / 2` and `delay`, different in every client, so
/// that a fleet cut off together (a server restart) does not reconnect in
/// lockstep. The randomness is the standard library's randomly keyed hasher:
/// jitter needs no more.
fn jittered(delay: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let bits = hasher.finish() >> 11; // 53 bits: exact in an f64
    let fraction = bits as f64 / (1u64 << 53) as f64;
    delay.mul_f64(0.5 + fraction / 2.0)
}

/// Appends the frame of `Request { xid, op }` to `out`, with `op` already
/// encoded: the 4-byte big-endian length, then the JSON serde writes for a
/// `Request` (`{"xid":N,"op":...}`; a test holds the two equal).
fn write_frame(out: &mut BytesMut, xid: Xid, op: &[u8]) {
    let start = out.len();
    out.put_u32(0);
    out.extend_from_slice(b"{\"xid\":");
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = xid.0;
    loop {
        at -= 1;
        digits[at] = b'0' + u8::try_from(n % 10).expect("a decimal digit");
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b",\"op\":");
    out.extend_from_slice(op);
    out.put_u8(b'}');
    let len = u32::try_from(out.len() - start - 4)
        .expect("a request's size is checked against a 4-byte length when it is queued");
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// What the handles and the session task share behind one lock, which is
/// never held across an await: the queue of requests and the connection's
/// write side. Whoever queues a request writes what the socket takes at
/// once, under the lock, so bytes go out in xid order; the session task
/// waits for the socket when some are left.
pub(crate) struct Link {
    queue: Queue,
    /// The current connection's write half; `None` while suspended.
    socket: Option<Arc<OwnedWriteHalf>>,
    /// Framed requests the socket has not taken yet, in xid order.
    out: BytesMut,
    /// When bytes last went out on the current connection.
    last_sent: Instant,
    /// A write from a handle failed: the session task drops the connection.
    broken: Option<String>,
    frame_bytes_max: usize,
    data_bytes_max: usize,
    /// `close_session` is queued: accept no more requests.
    closing: bool,
    close_reply: Option<oneshot::Sender<Result<(), ClientError>>>,
    /// The session task has finished: nothing more is sent or answered.
    ended: bool,
}

impl Link {
    fn new(welcome: &Welcome) -> Link {
        let mut link = Link {
            queue: Queue::new(),
            socket: None,
            out: BytesMut::new(),
            last_sent: Instant::now(),
            broken: None,
            frame_bytes_max: 0,
            data_bytes_max: 0,
            closing: false,
            close_reply: None,
            ended: false,
        };
        link.set_limits(welcome);
        link
    }

    fn set_limits(&mut self, welcome: &Welcome) {
        self.frame_bytes_max = usize::try_from(welcome.frame_bytes_max).unwrap_or(usize::MAX);
        self.data_bytes_max = usize::try_from(welcome.data_bytes_max).unwrap_or(usize::MAX);
    }

    /// Frames the requests that have a slot and writes as much as the socket
    /// takes now, without waiting. Returns true if the session task must
    /// act: bytes were left where there were none (it waits for the socket),
    /// or the write failed (it drops the connection).
    fn pump(&mut self) -> bool {
        let Some(socket) = &self.socket else {
            return false;
        };
        if self.out.is_empty() && !self.queue.can_send() {
            return false;
        }
        let was_waiting = !self.out.is_empty();
        let now = Instant::now();
        // Each pass writes at least one byte or stops.
        let failed = loop {
            while self.out.len() < OUT_BYTES_SOFT_MAX {
                match self.queue.next_to_send(now) {
                    Some((xid, entry)) => write_frame(&mut self.out, xid, &entry.encoded),
                    None => break,
                }
            }
            if self.out.is_empty() {
                break None;
            }
            match socket.try_write(&self.out) {
                Ok(0) => break Some("write failed: the socket took no bytes".to_string()),
                Ok(n) => {
                    self.out.advance(n);
                    self.last_sent = now;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                Err(e) => break Some(format!("write failed: {e}")),
            }
        };
        if let Some(reason) = failed {
            self.socket = None;
            self.out.clear();
            self.broken = Some(reason);
            return true;
        }
        if self.out.is_empty() && self.out.capacity() > OUT_BYTES_SOFT_MAX {
            // One large request must not pin its size for the session's life.
            self.out = BytesMut::new();
        }
        !was_waiting && !self.out.is_empty()
    }

    /// Queues the requests that dropped handles left behind.
    fn adopt_deferred(&mut self, deferred: &Deferred) {
        for op in deferred.take() {
            self.queue.push(op, Origin::Background);
        }
    }

    /// Checks a request against the limits the server announced; `encoded_len`
    /// is the size of its op as JSON.
    fn check_size(&self, op: &Op, encoded_len: usize) -> Result<(), ClientError> {
        let data_len = |data: &protocol::Data| data.0.len();
        let mut datas: Vec<(Option<u32>, usize)> = Vec::new();
        match op {
            Op::Create(c) => datas.push((None, data_len(&c.data))),
            Op::Set { data, .. } => datas.push((None, data_len(data))),
            Op::Multi { ops } => {
                for (i, m) in ops.iter().enumerate() {
                    let index = u32::try_from(i).ok();
                    match m {
                        protocol::MultiOp::Create(c) => datas.push((index, data_len(&c.data))),
                        protocol::MultiOp::Set { data, .. } => datas.push((index, data_len(data))),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        for (index, len) in datas {
            if len > self.data_bytes_max {
                return Err(ClientError::TooLarge {
                    message: format!(
                        "the data is {len} bytes; the server's limit is {}",
                        self.data_bytes_max
                    ),
                    index,
                });
            }
        }
        // The frame's length field has 4 bytes, whatever the server allows.
        let frame_bytes_max = self
            .frame_bytes_max
            .min(usize::try_from(u32::MAX).unwrap_or(usize::MAX));
        let frame_len = encoded_len.saturating_add(REQUEST_OVERHEAD_BYTES);
        if frame_len > frame_bytes_max {
            return Err(ClientError::TooLarge {
                message: format!(
                    "the request is about {frame_len} bytes on the wire; the server's limit is {}",
                    frame_bytes_max
                ),
                index: None,
            });
        }
        Ok(())
    }

    /// Marks the session over and takes what still waits.
    fn end(&mut self) -> (Vec<Entry>, Option<oneshot::Sender<Result<(), ClientError>>>) {
        self.ended = true;
        self.socket = None;
        self.out = BytesMut::new();
        (self.queue.drain().collect(), self.close_reply.take())
    }
}

/// Why [`Shared::submit`] refused a request.
pub(crate) enum Refused {
    /// The session is over or closing: the caller reports how it ended.
    Ended,
    /// The request breaks a limit the server announced.
    Invalid(ClientError),
}

/// The state the client handles share with the session task.
pub(crate) struct Shared {
    link: Mutex<Link>,
    /// Wakes the session task: bytes were left for it to write, a write
    /// failed, or the session is closing. `notify_one` keeps a permit, so a
    /// wake while the task is busy is seen on its next turn.
    wake: Notify,
    /// One per request of a caller queued; see [`REQUESTS_QUEUED_MAX`]. A
    /// caller takes one before queueing and the session task gives it back
    /// with the reply. Closed when the session ends.
    slots: Semaphore,
    pub(crate) deferred: Arc<Deferred>,
}

impl Shared {
    pub(crate) fn new(welcome: &Welcome) -> Shared {
        Shared {
            link: Mutex::new(Link::new(welcome)),
            wake: Notify::new(),
            slots: Semaphore::new(REQUESTS_QUEUED_MAX),
            deferred: Arc::new(Deferred::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Link> {
        // Nothing under the lock panics but bugs; the queue is still sound
        // after one, and ending the session is the caller's part.
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a request and, when connected with nothing waiting ahead of
    /// it, writes it to the socket from the calling task. Once this returns
    /// `Ok`, the request goes out (again after a resume if need be) and its
    /// reply goes to `origin`, even if the caller stops waiting.
    ///
    /// # Cancel safety
    /// Safe: the only wait is for a slot, before anything is queued; a
    /// dropped call queues nothing.
    pub(crate) async fn submit(&self, op: Op, origin: Origin) -> Result<(), Refused> {
        let permit = match self.slots.try_acquire() {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => {
                self.slots.acquire().await.map_err(|_| Refused::Ended)?
            }
            Err(TryAcquireError::Closed) => return Err(Refused::Ended),
        };
        // Encoded outside the lock: other callers and the replies need it.
        let encoded = protocol::encode(&op);
        let wake = {
            let mut link = self.lock();
            if link.ended || link.closing {
                return Err(Refused::Ended);
            }
            link.check_size(&op, encoded.len())
                .map_err(Refused::Invalid)?;
            // Work of dropped handles goes before any later request: a new
            // lock node must not queue behind the session's own old one,
            // which the server refuses as a deadlock.
            link.adopt_deferred(&self.deferred);
            link.queue.push_encoded(op, encoded, origin);
            link.pump()
        };
        permit.forget();
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Queues the session's close; `reply` gets its outcome. Returns false
    /// (dropping `reply`) if the session is already over or closing.
    pub(crate) fn close(&self, reply: Option<oneshot::Sender<Result<(), ClientError>>>) -> bool {
        {
            let mut link = self.lock();
            if link.ended || link.closing {
                return false;
            }
            link.closing = true;
            link.close_reply = reply;
            link.queue.push(Op::CloseSession, Origin::Close);
            link.pump();
        }
        // Always: a suspended session task closes at once.
        self.wake.notify_one();
        true
    }
}
/// A completed handshake.
pub(crate) struct Handshake {
    pub(crate) conn: Conn,
    pub(crate) welcome: Welcome,
    /// When the hello went out: the server heard from the session no earlier.
    pub(crate) hello_sent_at: Instant,
}

/// Connects to `addr` and performs the handshake, all within
/// `connect_timeout` for the TCP connect and again for the answer.
pub(crate) async fn handshake(
    addr: String,
    hello: Hello,
    connect_timeout: Duration,
) -> Result<Handshake, ClientError> {
    let connect_error = |reason: String| ClientError::Connect {
        addr: addr.clone(),
        reason,
    };
    let stream = match timeout(connect_timeout, TcpStream::connect(addr.as_str())).await {
        Err(_) => {
            return Err(connect_error(format!(
                "no connection within {}ms",
                connect_timeout.as_millis()
            )))
        }
        // Not a network failure: the address itself cannot be used.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidInput => {
            return Err(ClientError::invalid_argument(format!(
                "invalid server address {addr:?}: {e}; write it as HOST:PORT, e.g. 127.0.0.1:7878"
            )))
        }
        Ok(Err(e)) => return Err(connect_error(e.to_string())),
        Ok(Ok(stream)) => stream,
    };
    // Requests are small and latency-bound; a lost ack must not wait 40ms.
    let _ = stream.set_nodelay(true);
    let mut conn = Framed::new(stream, protocol::codec(limits::REPLY_FRAME_BYTES_MAX));
    let hello_sent_at = Instant::now();
    let exchange = async {
        conn.send(protocol::encode(&hello))
            .await
            .map_err(|e| connect_error(format!("sending the hello failed: {e}")))?;
        match conn.next().await {
            None => Err(connect_error(
                "the server closed the connection during the handshake".into(),
            )),
            Some(Err(e)) => Err(connect_error(format!("reading the welcome failed: {e}"))),
            Some(Ok(frame)) => serde_json::from_slice::<ServerMessage>(&frame)
                .map_err(|e| ClientError::protocol(format!("undecodable welcome: {e}"))),
        }
    };
    let message = match timeout(connect_timeout, exchange).await {
        Err(_) => {
            return Err(connect_error(format!(
                "no answer to the hello within {}ms",
                connect_timeout.as_millis()
            )))
        }
        Ok(result) => result?,
    };
    match message {
        ServerMessage::Welcome(welcome) => {
            if welcome.protocol_version != PROTOCOL_VERSION {
                return Err(ClientError::VersionMismatch {
                    client_version: PROTOCOL_VERSION,
                    server_version: Some(welcome.protocol_version),
                    message: String::new(),
                });
            }
            if welcome.session_timeout_ms == 0 {
                return Err(ClientError::protocol(
                    "a welcome with a zero session timeout",
                ));
            }
            Ok(Handshake {
                conn: Conn::new(conn),
                welcome,
                hello_sent_at,
            })
        }
        ServerMessage::Fatal(e) => Err(ClientError::from_reply(e)),
        other => Err(ClientError::protocol(format!(
            "expected a welcome, got {other:?}"
        ))),
    }
}

/// Why the session task stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The server ended the session (or surely has).
    Expired,
    /// The server answered `close_session`.
    Closed,
    /// Closing without the server: it will expire the session.
    ClosedWhileDown,
}

/// How one connection ended.
enum ConnEnd {
    Lost(String),
    Stop(Stop),
}

/// The session task's state.
pub(crate) struct Session {
    options: ClientOptions,
    status: watch::Sender<SessionStatus>,
    shared: Arc<Shared>,
    session_id: SessionId,
    secret: Secret,
    session_timeout: Duration,
    subs: Subscriptions,
    last_xid_received: Xid,
    last_zxid: Zxid,
    lease_end: Instant,
    server_next: usize,
    /// A heartbeat was due while every slot was in flight: it goes with the
    /// next reply.
    ping_due: bool,
}

impl Session {
    pub(crate) fn new(
        options: ClientOptions,
        status: watch::Sender<SessionStatus>,
        handshake: &Handshake,
        server_index: usize,
        shared: Arc<Shared>,
    ) -> Self {
        let welcome = &handshake.welcome;
        let session_timeout = session_timeout(welcome);
        let server_next = server_index.wrapping_add(1) % options.servers.len().max(1);
        Session {
            options,
            status,
            shared,
            session_id: welcome.session_id,
            secret: welcome.secret.clone(),
            session_timeout,
            subs: Subscriptions::default(),
            last_xid_received: Xid(0),
            last_zxid: Zxid(0),
            lease_end: lease_end(handshake.hello_sent_at, session_timeout),
            server_next,
            ping_due: false,
        }
    }

    /// Runs the session until it expires or closes, then fails whatever is
    /// still waiting.
    pub(crate) async fn run(mut self, mut conn: Conn) {
        let stop = loop {
            let end = self.drive(&mut conn).await;
            // Close the old socket before anything else: a request still
            // buffered for it must not reach the server after a resume.
            let closing = {
                let mut link = self.shared.lock();
                link.socket = None;
                link.out.clear();
                link.broken = None;
                link.closing
            };
            drop(conn);
            match end {
                ConnEnd::Stop(stop) => break stop,
                ConnEnd::Lost(reason) => {
                    if closing {
                        break Stop::ClosedWhileDown;
                    }
                    tracing::warn!(session = %self.session_id, "connection lost: {reason}; reconnecting");
                    self.publish(SessionState::Suspended);
                    match self.reconnect().await {
                        Ok(next) => conn = next,
                        Err(stop) => break stop,
                    }
                }
            }
        };
        self.finish(stop);
    }

    fn publish(&self, state: SessionState) {
        let lease_end = self.lease_end;
        self.status.send_if_modified(|s| {
            let changed = s.state != state || s.lease_end != lease_end;
            s.state = state;
            s.lease_end = lease_end;
            changed
        });
    }

    fn finish(&mut self, stop: Stop) {
        let (state, err) = match stop {
            Stop::Expired => (SessionState::Expired, ClientError::SessionExpired),
            Stop::Closed | Stop::ClosedWhileDown => (SessionState::Closed, ClientError::Closed),
        };
        tracing::debug!(session = %self.session_id, ?stop, "session task ends");
        // Published first: a caller refused from now on reads why.
        self.publish(state);
        let (entries, close_reply) = self.shared.lock().end();
        self.shared.slots.close();
        for entry in entries {
            match entry.origin {
                Origin::User(on_reply) => {
                    on_reply(&entry.op, Err(err.clone()), &mut self.install(false));
                }
                Origin::Background | Origin::Ping | Origin::SetWatches | Origin::Close => {}
            }
        }
        self.subs.fail_all(&err);
        // The session's nodes are gone (or go at its expiry) with it.
        self.shared.deferred.close();
        if let Some(reply) = close_reply {
            let result = match stop {
                Stop::ClosedWhileDown => Err(ClientError::ConnectionLost),
                // Expired or closed: the session is over either way.
                Stop::Expired | Stop::Closed => Ok(()),
            };
            let _ = reply.send(result);
        }
    }

    /// When the heartbeat timer must next look: the dead-connection check,
    /// then a stuck write or the next heartbeat. It may look early (the
    /// instants only move later), never late.
    fn next_check(&self, link: &Link, last_received: Instant) -> Instant {
        let dead_at = last_received + self.session_timeout * 2 / 3;
        if !link.out.is_empty() {
            dead_at.min(link.last_sent + self.session_timeout * 2 / 3)
        } else if link.closing || self.ping_due {
            dead_at
        } else {
            dead_at.min(link.last_sent + self.session_timeout / 3)
        }
    }

    /// The heartbeat timer fired: ends the connection if the server fell
    /// silent or stopped taking bytes, sends a heartbeat if one is due, and
    /// says when to look again.
    fn on_timer(&mut self, last_received: Instant) -> Result<Instant, ConnEnd> {
        let now = Instant::now();
        let dead_after = self.session_timeout * 2 / 3;
        if now >= last_received + dead_after {
            return Err(ConnEnd::Lost(format!(
                "nothing received for {}ms (2/3 of the session timeout)",
                dead_after.as_millis()
            )));
        }
        let mut link = self.shared.lock();
        if !link.out.is_empty() {
            if now >= link.last_sent + dead_after {
                return Err(ConnEnd::Lost(format!(
                    "a write took over {}ms",
                    dead_after.as_millis()
                )));
            }
        } else if !link.closing && now >= link.last_sent + self.session_timeout / 3 {
            self.ping_due = !queue_ping(&mut link, self.last_xid_received);
        }
        Ok(self.next_check(&link, last_received))
    }

    /// Serves one connection until it breaks or the session stops.
    async fn drive(&mut self, conn: &mut Conn) -> ConnEnd {
        let shared = Arc::clone(&self.shared);
        let deferred = Arc::clone(&shared.deferred);
        let mut last_received = Instant::now();
        let first_check = {
            let mut link = shared.lock();
            link.socket = Some(Arc::clone(&conn.writer));
            link.last_sent = Instant::now();
            link.pump();
            self.next_check(&link, last_received)
        };
        self.publish(SessionState::Connected);
        let timer = sleep_until(first_check);
        let wake = shared.wake.notified();
        let deferred_work = deferred.notify.notified();
        tokio::pin!(timer, wake, deferred_work);
        let mut writing = false;
        loop {
            let want_write = {
                let mut link = shared.lock();
                if let Some(reason) = link.broken.take() {
                    return ConnEnd::Lost(reason);
                }
                !link.out.is_empty()
            };
            if want_write && !writing {
                // The armed instant may be a later one than a stuck write's.
                let at = self.next_check(&shared.lock(), last_received);
                if at < timer.deadline() {
                    timer.as_mut().reset(at);
                }
            }
            writing = want_write;
            tokio::select! {
                frame = conn.reader.next() => {
                    let bytes = match frame {
                        None => return ConnEnd::Lost("the server closed the connection".into()),
                        Some(Err(e)) => return ConnEnd::Lost(format!("read failed: {e}")),
                        Some(Ok(bytes)) => bytes,
                    };
                    last_received = Instant::now();
                    if let Some(end) = self.on_frame(&bytes) {
                        return end;
                    }
                }
                () = &mut wake => wake.set(shared.wake.notified()),
                () = &mut deferred_work => {
                    deferred_work.set(deferred.notify.notified());
                    let mut link = shared.lock();
                    if !link.closing {
                        link.adopt_deferred(&deferred);
                        link.pump();
                    }
                }
                ready = conn.writer.writable(), if want_write => {
                    if let Err(e) = ready {
                        return ConnEnd::Lost(format!("write failed: {e}"));
                    }
                    shared.lock().pump();
                }
                () = &mut timer => match self.on_timer(last_received) {
                    Ok(at) => timer.as_mut().reset(at),
                    Err(end) => return end,
                },
            }
        }
    }

    /// Handles one frame; `Some` ends the connection.
    fn on_frame(&mut self, bytes: &[u8]) -> Option<ConnEnd> {
        let message = match serde_json::from_slice::<ServerMessage>(bytes) {
            Ok(message) => message,
            Err(e) => {
                return Some(ConnEnd::Lost(format!(
                    "undecodable frame from the server: {e}"
                )))
            }
        };
        match message {
            ServerMessage::Reply(reply) => {
                let entry = {
                    let mut link = self.shared.lock();
                    let entry = match link.queue.on_reply(reply.xid) {
                        Ok(entry) => entry,
                        Err(reason) => return Some(ConnEnd::Lost(reason)),
                    };
                    if self.ping_due && !link.closing {
                        self.ping_due = !queue_ping(&mut link, self.last_xid_received);
                    }
                    // The reply freed a slot for a waiting request.
                    link.pump();
                    entry
                };
                if entry.origin.holds_slot() {
                    self.shared.slots.add_permits(1);
                }
                self.last_xid_received = self.last_xid_received.max(reply.xid);
                self.last_zxid = self.last_zxid.max(reply.zxid);
                if let Some(sent_at) = entry.sent_at {
                    self.lease_end = self.lease_end.max(lease_end(sent_at, self.session_timeout));
                    self.publish(SessionState::Connected);
                }
                self.on_reply(entry, reply.result)
            }
            ServerMessage::Watch(event) => {
                self.last_zxid = self.last_zxid.max(event.zxid);
                self.subs.fire(&event);
                None
            }
            ServerMessage::Session(SessionEvent::Expired) => Some(ConnEnd::Stop(Stop::Expired)),
            ServerMessage::Session(SessionEvent::Moved) => Some(ConnEnd::Lost(
                "the server says the session moved to another connection".into(),
            )),
            ServerMessage::Fatal(e) if e.code == ErrorCode::SessionExpired => {
                Some(ConnEnd::Stop(Stop::Expired))
            }
            ServerMessage::Fatal(e) => Some(ConnEnd::Lost(format!(
                "the server ended the connection: {e} ({:?})",
                e.code
            ))),
            ServerMessage::Welcome(_) => Some(ConnEnd::Lost("an unexpected second welcome".into())),
        }
    }
    /// What a reply handler may do, for a reply that was `retried` or not.
    fn install(&mut self, retried: bool) -> Install<'_> {
        Install {
            subs: &mut self.subs,
            shared: &self.shared,
            last_zxid: self.last_zxid,
            retried,
        }
    }

    fn on_reply(
        &mut self,
        entry: Entry,
        result: Result<OpResult, protocol::ErrorReply>,
    ) -> Option<ConnEnd> {
        self.gone_by_own_request(&entry.op, &result);
        match entry.origin {
            Origin::User(on_reply) => {
                let result = result.map_err(ClientError::from_reply);
                on_reply(&entry.op, result, &mut self.install(entry.retried));
                None
            }
            Origin::Background => {
                if let Err(e) = result {
                    tracing::debug!(session = %self.session_id, "a dropped handle's request failed: {e}");
                }
                None
            }
            Origin::Ping => {
                if let Err(e) = result {
                    tracing::warn!(session = %self.session_id, "heartbeat refused: {e}");
                }
                None
            }
            Origin::SetWatches => {
                if let Err(e) = result {
                    // Those watches are not on the server: tell their waiters
                    // rather than let them wait forever.
                    tracing::warn!(session = %self.session_id, "re-registering watches failed: {e}");
                    let err = ClientError::from_reply(e);
                    self.subs.fail_keys(&set_watches_keys(&entry.op), &err);
                }
                None
            }
            Origin::Close => {
                if let Err(e) = result {
                    if e.code == ErrorCode::SessionExpired {
                        return Some(ConnEnd::Stop(Stop::Expired));
                    }
                    let close_reply = self.shared.lock().close_reply.take();
                    if let Some(reply) = close_reply {
                        let _ = reply.send(Err(ClientError::from_reply(e)));
                    }
                }
                Some(ConnEnd::Stop(Stop::Closed))
            }
        }
    }

    /// A node this session deleted (or found gone) is no longer followed:
    /// the server sends no event for the deleter's own delete.
    fn gone_by_own_request(&mut self, op: &Op, result: &Result<OpResult, protocol::ErrorReply>) {
        // NotOwner: the node was taken away (a zombie now) and is no
        // longer this session's.
        let gone = |code: ErrorCode| {
            matches!(
                code,
                ErrorCode::NoNode | ErrorCode::BadToken | ErrorCode::NotOwner
            )
        };
        match (op, result) {
            (Op::Delete { path, czxid, .. }, Ok(OpResult::Deleted)) => {
                self.subs.gone(path, *czxid, true);
            }
            (Op::Delete { path, czxid, .. }, Err(e)) if gone(e.code) => {
                self.subs.gone(path, *czxid, false);
            }
            (Op::Multi { ops }, Ok(OpResult::Multi { .. })) => {
                for op in ops {
                    if let protocol::MultiOp::Delete { path, czxid, .. } = op {
                        self.subs.gone(path, *czxid, true);
                    }
                }
            }
            _ => {}
        }
    }

    /// Waits for `fut` (the session's requests still queue meanwhile),
    /// until the session is closed or surely expired on the server.
    async fn while_suspended<F: std::future::Future>(&mut self, fut: F) -> Result<F::Output, Stop> {
        tokio::pin!(fut);
        // The server expires the session a timeout after it last heard from
        // the client; past `lease_end` plus another timeout it surely has.
        let give_up = sleep_until(self.lease_end + self.session_timeout);
        tokio::pin!(give_up);
        let shared = Arc::clone(&self.shared);
        loop {
            let wake = shared.wake.notified();
            if shared.lock().closing {
                return Err(Stop::ClosedWhileDown);
            }
            tokio::select! {
                out = &mut fut => return Ok(out),
                () = wake => {}
                () = &mut give_up => {
                    tracing::warn!(session = %self.session_id, "no server reachable before the session timeout; the session is expired");
                    return Err(Stop::Expired);
                }
            }
        }
    }

    /// Reconnects with backoff over the servers and resumes the session.
    async fn reconnect(&mut self) -> Result<Conn, Stop> {
        let mut backoff = self.options.reconnect_backoff_min;
        loop {
            self.while_suspended(sleep(jittered(backoff))).await?;
            backoff = backoff
                .saturating_mul(2)
                .min(self.options.reconnect_backoff_max);
            let index = self.server_next;
            self.server_next = (index + 1) % self.options.servers.len().max(1);
            let Some(addr) = self.options.servers.get(index).cloned() else {
                return Err(Stop::Expired);
            };
            let hello = Hello {
                protocol_version: PROTOCOL_VERSION,
                session_timeout_ms: self.options.session_timeout_ms(),
                resume: Some(Resume {
                    session_id: self.session_id,
                    secret: self.secret.clone(),
                    last_xid_received: self.shared.lock().queue.ack(self.last_xid_received),
                }),
            };
            let attempt = handshake(addr.clone(), hello, self.options.connect_timeout);
            match self.while_suspended(attempt).await? {
                Ok(handshake) => {
                    if handshake.welcome.session_id != self.session_id {
                        tracing::warn!(
                            "server {addr} resumed session {} instead of {}; treating ours as expired",
                            handshake.welcome.session_id,
                            self.session_id
                        );
                        return Err(Stop::Expired);
                    }
                    tracing::info!(session = %self.session_id, "resumed on {addr}");
                    self.on_welcome(&handshake);
                    return Ok(handshake.conn);
                }
                Err(ClientError::SessionExpired) => return Err(Stop::Expired),
                Err(e) => tracing::warn!(session = %self.session_id, "reconnect failed: {e}"),
            }
        }
    }

    fn on_welcome(&mut self, handshake: &Handshake) {
        let welcome = &handshake.welcome;
        self.secret = welcome.secret.clone();
        self.session_timeout = session_timeout(welcome);
        self.lease_end = self
            .lease_end
            .max(lease_end(handshake.hello_sent_at, self.session_timeout));
        // A re-registration that went unanswered (the connection dropped
        // mid-resume) was based on an older zxid than the replies to its
        // siblings raised `last_zxid` to: changes in between would be missed
        // if its paths were re-sent with the newer one.
        let shared = Arc::clone(&self.shared);
        let mut link = shared.lock();
        link.set_limits(welcome);
        let baseline = link
            .queue
            .unanswered_watch_baseline()
            .map_or(self.last_zxid, |older| older.min(self.last_zxid));
        let keys = self.subs.live_keys();
        let batches = set_watches_batches(&keys, baseline);
        link.queue.resume(welcome.last_xid_applied, batches);
    }
}

/// Queues a heartbeat if a slot is free; returns false if none was.
fn queue_ping(link: &mut Link, last_xid_received: Xid) -> bool {
    if link.queue.inflight() >= limits::INFLIGHT_MAX {
        return false;
    }
    let ack = link.queue.ack(last_xid_received);
    link.queue.push(Op::Ping { ack }, Origin::Ping);
    link.pump();
    true
}

impl Drop for Session {
    fn drop(&mut self) {
        // After `finish` this finds nothing. If the task panicked instead, it
        // drops what waits, so callers learn the session is gone rather than
        // wait forever.
        let (entries, _) = self.shared.lock().end();
        self.shared.slots.close();
        drop(entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Create, Request};

    fn user() -> Origin {
        Origin::User(Box::new(|_, _, _| {}))
    }

    fn create(path: &str) -> Op {
        Op::Create(Create {
            path: path.into(),
            ..Create::default()
        })
    }

    fn get(path: &str) -> Op {
        Op::Get {
            path: path.into(),
            watch: false,
        }
    }

    #[test]
    fn xids_increase_and_replies_match_the_front() {
        let mut q = Queue::new();
        let now = Instant::now();
        q.push(get("/a"), user());
        q.push(get("/b"), user());
        assert_eq!(q.next_to_send(now).map(|(x, _)| x), Some(Xid(1)));
        assert_eq!(q.next_to_send(now).map(|(x, _)| x), Some(Xid(2)));
        assert!(q.next_to_send(now).is_none());
        assert!(q.on_reply(Xid(2)).is_err(), "out of order");
        assert_eq!(q.on_reply(Xid(1)).unwrap().op, get("/a"));
        assert_eq!(q.on_reply(Xid(2)).unwrap().op, get("/b"));
        assert!(q.on_reply(Xid(3)).is_err(), "nothing in flight");
    }

    #[test]
    fn no_more_than_inflight_max_are_sent() {
        let mut q = Queue::new();
        let now = Instant::now();
        for _ in 0..limits::INFLIGHT_MAX + 5 {
            q.push(get("/a"), user());
        }
        let mut sent = 0;
        while q.next_to_send(now).is_some() {
            sent += 1;
        }
        assert_eq!(sent, limits::INFLIGHT_MAX);
        q.on_reply(Xid(1)).unwrap();
        assert_eq!(q.next_to_send(now).map(|(x, _)| x.0), Some(129));
        assert!(q.next_to_send(now).is_none());
    }

    #[test]
    fn resume_keeps_applied_writes_and_renumbers_the_rest() {
        let mut q = Queue::new();
        let now = Instant::now();
        q.push(create("/w1"), user()); // xid 1, applied
        q.push(get("/r2"), user()); // xid 2, applied read
        q.push(Op::Ping { ack: Xid(0) }, Origin::Ping); // xid 3
        q.push(create("/w4"), user()); // xid 4, not applied
        while q.next_to_send(now).is_some() {}
        q.push(create("/w5"), user()); // never sent
        assert_eq!(q.ack(Xid(0)), Xid(0));

        let sw = set_watches_batches(&[("/x".into(), WatchKind::Data)], Zxid(7));
        q.resume(Xid(3), sw);
        let order: Vec<(Xid, Op)> =
            std::iter::from_fn(|| q.next_to_send(now).map(|(x, e)| (x, e.op.clone()))).collect();
        let xids: Vec<u64> = order.iter().map(|(x, _)| x.0).collect();
        // set_watches first with a fresh xid, then the applied write with its
        // own xid, then the rest renumbered in order; the ping is gone.
        assert_eq!(xids, vec![5, 1, 6, 7, 8]);
        assert!(matches!(order[0].1, Op::SetWatches { .. }));
        assert_eq!(order[1].1, create("/w1"));
        assert_eq!(order[2].1, get("/r2"));
        assert_eq!(order[3].1, create("/w4"));
        assert_eq!(order[4].1, create("/w5"));

        // Once set_watches (xid 5) is answered, the ack must stay below the
        // kept xid 1 so the server keeps its cached reply.
        q.on_reply(Xid(5)).unwrap();
        assert_eq!(q.ack(Xid(5)), Xid(0));
        q.on_reply(Xid(1)).unwrap();
        assert_eq!(q.ack(Xid(5)), Xid(5));
    }

    /// Postmortem: with more than one batch of watches, the reply to the
    /// first batch raised `last_zxid`; if the connection then dropped, the
    /// unanswered batch was re-sent with the newer zxid and a change in
    /// between never fired.
    #[test]
    fn an_unanswered_re_registration_keeps_its_older_baseline() {
        let mut q = Queue::new();
        let now = Instant::now();
        let keys: Vec<(String, WatchKind)> = (0..=limits::SET_WATCHES_PATHS_MAX)
            .map(|i| (format!("/w{i}"), WatchKind::Data))
            .collect();
        let batches = set_watches_batches(&keys, Zxid(7));
        assert_eq!(batches.len(), 2);
        q.resume(Xid(0), batches);
        while q.next_to_send(now).is_some() {}
        assert_eq!(q.unanswered_watch_baseline(), Some(Zxid(7)));
        // The first batch is answered; the second is still out.
        q.on_reply(Xid(1)).unwrap();
        assert_eq!(q.unanswered_watch_baseline(), Some(Zxid(7)));
        q.on_reply(Xid(2)).unwrap();
        assert_eq!(q.unanswered_watch_baseline(), None);
    }

    /// The frame written by hand around an op encoded once must be the one
    /// serde writes for the request, for any xid's number of digits.
    #[test]
    fn a_hand_framed_request_is_the_serde_encoding() {
        let ops = [
            get("/a"),
            create("/b\"\u{1}é"),
            Op::Ping { ack: Xid(7) },
            Op::CloseSession,
        ];
        for op in ops {
            for xid in [0, 1, 9, 10, 12_345, u64::MAX] {
                let mut out = BytesMut::from(&b"before"[..]);
                write_frame(&mut out, Xid(xid), &protocol::encode(&op));
                let request = Request {
                    xid: Xid(xid),
                    op: op.clone(),
                };
                let body = protocol::encode(&request);
                let len = u32::try_from(body.len()).unwrap().to_be_bytes();
                assert_eq!(&out[..6], b"before");
                assert_eq!(&out[6..10], &len);
                assert_eq!(&out[10..], &body[..], "xid {xid}");
            }
        }
    }

    #[test]
    fn jitter_stays_within_half_and_whole_and_varies() {
        let delay = Duration::from_millis(800);
        let pauses: Vec<Duration> = (0..64).map(|_| jittered(delay)).collect();
        assert!(pauses.iter().all(|p| *p >= delay / 2 && *p <= delay));
        let first = pauses[0];
        assert!(
            pauses.iter().any(|p| *p != first),
            "no variation: {first:?}"
        );
    }
}

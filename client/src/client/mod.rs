//! The client handle and its requests, and one-shot watches. The options
//! it connects with and the status it publishes belong to the session
//! layer and are re-exported here.

pub(crate) mod watches;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use self::watches::{Watch, WatchSender};
use crate::error::ClientError;
use crate::protocol::{
    self, Create, Data, Hello, MultiOp, MultiResult, NodeKind, Op, OpResult, SessionId, Stat,
    WatchKind, PROTOCOL_VERSION,
};
use crate::session::deferred::Deferred;
pub use crate::session::options::{ClientOptions, SessionState, SessionStatus};
use crate::session::{
    handshake, lease_end, session_timeout, OnReply, Origin, Refused, Session, Shared,
};

/// A server timestamp (milliseconds since the Unix epoch) as a `SystemTime`.
pub(crate) fn system_time(ms: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

/// How [`Client::create`] makes a node. Build it with the constructors:
/// `CreateOptions::ephemeral().sequential()`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// Persistent (default), ephemeral or container.
    pub kind: NodeKind,
    /// Append a 10-digit counter from the parent to the name.
    pub sequential: bool,
    /// Delete the node when it has not been modified for this long
    /// (persistent nodes only; whole milliseconds on the wire).
    pub ttl: Option<Duration>,
    /// Create missing ancestors as container nodes in the same write.
    pub make_parents: bool,
}

impl CreateOptions {
    /// A persistent node: it lives until deleted.
    pub fn persistent() -> Self {
        CreateOptions::default()
    }

    /// An ephemeral node: deleted when this session ends.
    pub fn ephemeral() -> Self {
        CreateOptions {
            kind: NodeKind::Ephemeral,
            ..CreateOptions::default()
        }
    }

    /// A container node: deleted once it had children and has none left.
    pub fn container() -> Self {
        CreateOptions {
            kind: NodeKind::Container,
            ..CreateOptions::default()
        }
    }

    /// Also append a sequence number to the name.
    pub fn sequential(mut self) -> Self {
        self.sequential = true;
        self
    }

    /// Also expire the node after `ttl` without modification.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Also create missing ancestors (as containers).
    pub fn make_parents(mut self) -> Self {
        self.make_parents = true;
        self
    }

    /// The wire form of a create of `path` with `data`.
    ///
    /// # Errors
    /// `InvalidArgument` if the TTL does not fit in u64 milliseconds.
    pub fn to_create(&self, path: impl Into<String>, data: Data) -> Result<Create, ClientError> {
        let ttl_ms = match self.ttl {
            None => None,
            Some(ttl) => Some(u64::try_from(ttl.as_millis()).map_err(|_| {
                ClientError::invalid_argument(format!(
                    "a TTL of {ttl:?} does not fit in 64-bit milliseconds (about 584 million \
                         years); give a shorter one"
                ))
            })?),
        };
        Ok(Create {
            path: path.into(),
            data,
            kind: self.kind,
            sequential: self.sequential,
            ttl_ms,
            make_parents: self.make_parents,
            lock: None,
        })
    }
}

/// A created node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    /// Its path, with the sequence suffix if it is sequential.
    pub path: String,
    /// Its stat; `stat.czxid` is its fencing token.
    pub stat: Stat,
}

/// A handle to one session with the coordinator.
///
/// Cheap to clone: clones share the session. A request is written by the
/// task that makes it when the connection is up and takes it, else as soon
/// as it can be; a background task reads the replies, sends heartbeats, and
/// when the connection breaks it reconnects and resumes the session, resending unanswered requests (the
/// server answers a retried write from its reply cache, so nothing is
/// applied twice) and re-registering watches. Replies arrive in request
/// order, and a watch event arrives before any later reply that reflects its
/// change.
///
/// When the last handle is dropped the task closes the session
/// (best effort); call [`Client::close`] to know it happened.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    status: watch::Receiver<SessionStatus>,
    session_id: SessionId,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Every handle is gone: end the session now rather than leave its
        // ephemeral nodes to the expiry.
        self.shared.close(None);
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session_id", &self.inner.session_id)
            .field("state", &self.inner.status.borrow().state)
            .finish()
    }
}

impl Client {
    /// Connects to the first server of `options.servers` that answers, opens
    /// a session and starts the session task.
    ///
    /// # Errors
    /// - `Connect { addr, reason }` if no server could be reached (the last
    ///   server's address and the OS reason).
    /// - `VersionMismatch` if the server speaks another protocol version.
    /// - `InvalidArgument` for unusable options (no servers, zero timeouts).
    /// - `Server` if the server refused the session (e.g. too many
    ///   connections).
    ///
    /// # Cancel safety
    /// Safe: dropping the future before it returns drops the connection; the
    /// server then expires the half-opened session after its timeout.
    pub async fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        options.check()?;
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            session_timeout_ms: options.session_timeout_ms(),
            resume: None,
        };
        let mut last_error = None;
        let mut connected = None;
        for (index, addr) in options.servers.iter().enumerate() {
            match handshake(addr.clone(), hello.clone(), options.connect_timeout).await {
                Ok(hs) => {
                    connected = Some((index, hs));
                    break;
                }
                // Every server speaks the same version; no use trying more.
                Err(e @ ClientError::VersionMismatch { .. }) => return Err(e),
                Err(e) => {
                    tracing::debug!("connect to {addr} failed: {e}");
                    last_error = Some(e);
                }
            }
        }
        let Some((index, hs)) = connected else {
            return Err(last_error.unwrap_or(ClientError::ConnectionLost));
        };
        let session_id = hs.welcome.session_id;
        let shared = Arc::new(Shared::new(&hs.welcome));
        let (status_tx, status_rx) = watch::channel(SessionStatus {
            session_id,
            state: SessionState::Connected,
            lease_end: lease_end(hs.hello_sent_at, session_timeout(&hs.welcome)),
        });
        let session = Session::new(options, status_tx, &hs, index, Arc::clone(&shared));
        let task = tokio::spawn(session.run(hs.conn));
        Ok(Client {
            inner: Arc::new(Inner {
                shared,
                status: status_rx,
                session_id,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// The session's id (fixed for this client's life: a resume keeps it).
    pub fn session_id(&self) -> SessionId {
        self.inner.session_id
    }

    /// A receiver of the session's status: it sees every state change and
    /// every move of the lease end. The session is over once the state is
    /// `Expired` or `Closed`.
    pub fn session_status(&self) -> watch::Receiver<SessionStatus> {
        self.inner.status.clone()
    }

    fn ended_error(&self) -> ClientError {
        match self.inner.status.borrow().state {
            SessionState::Expired => ClientError::SessionExpired,
            SessionState::Closed => ClientError::Closed,
            // The task ended without saying why (it panicked): the session
            // is unusable either way.
            SessionState::Connected | SessionState::Suspended => ClientError::Closed,
        }
    }

    async fn call(&self, op: Op, watch: Option<WatchSender>) -> Result<OpResult, ClientError> {
        let rx = self.send(op, watch).await?;
        self.reply(rx).await
    }

    /// Queues a request (and writes it, when the connection is free): once
    /// this returns `Ok`, the request goes out even if the caller stops
    /// waiting for its reply.
    pub(crate) async fn send(
        &self,
        op: Op,
        watch: Option<WatchSender>,
    ) -> Result<oneshot::Receiver<Result<OpResult, ClientError>>, ClientError> {
        self.submit(op, move |reply| -> OnReply {
            Box::new(move |op, result, install| {
                if let (Ok(ok), Some(tx)) = (&result, watch) {
                    watches::install(op, ok, tx, install);
                }
                let _ = reply.send(result);
            })
        })
        .await
    }

    /// Waits for the reply to a request handed over by [`Client::send`].
    pub(crate) async fn reply<T>(
        &self,
        rx: oneshot::Receiver<Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        rx.await.unwrap_or_else(|_| Err(self.ended_error()))
    }

    /// Queues a request whose reply `on_reply` handles on the session task
    /// (see [`OnReply`]), handing its caller a `T` through the channel it is
    /// given. Once this returns `Ok`, the request goes out.
    ///
    /// # Cancel safety
    /// Safe: a dropped call queues nothing.
    pub(crate) async fn submit<T>(
        &self,
        op: Op,
        on_reply: impl FnOnce(oneshot::Sender<Result<T, ClientError>>) -> OnReply,
    ) -> Result<oneshot::Receiver<Result<T, ClientError>>, ClientError> {
        let (reply, rx) = oneshot::channel();
        match self
            .inner
            .shared
            .submit(op, Origin::User(on_reply(reply)))
            .await
        {
            Ok(()) => Ok(rx),
            Err(Refused::Ended) => Err(self.ended_error()),
            Err(Refused::Invalid(e)) => Err(e),
        }
    }

    /// The session's queue for work a dropped handle leaves behind.
    pub(crate) fn deferred(&self) -> &Arc<Deferred> {
        &self.inner.shared.deferred
    }

    /// Sends one operation and returns its result: the building block of the
    /// recipes. Paths are checked locally first.
    ///
    /// `Ping`, `SetWatches` and `CloseSession` belong to the session task
    /// and are refused with `InvalidArgument` (use [`Client::close`]). A read
    /// with `watch: true` sets a watch on the server, but its events only
    /// reach callers of the `*_watch` methods.
    ///
    /// # Errors
    /// `InvalidPath` (no round trip), any error the server reports,
    /// `SessionExpired`, `Closed`.
    ///
    /// # Cancel safety
    /// Dropping the future after the request was queued does not cancel it:
    /// the server still applies it and its reply is discarded. Dropped while
    /// waiting for room in the session's queue (more than 256 requests
    /// unanswered), the request is never sent.
    pub async fn request(&self, op: Op) -> Result<OpResult, ClientError> {
        validate_op(&op)?;
        self.call(op, None).await
    }

    /// Creates a node with `data`.
    ///
    /// # Errors
    /// `InvalidPath` (no round trip), `NodeExists`, `NoNode` (missing parent
    /// without `make_parents`), `NoChildrenForEphemerals`, `TooLarge`,
    /// `LimitExceeded`, `InvalidArgument` (e.g. a TTL on a non-persistent
    /// node), `SessionExpired`, `Closed`.
    ///
    /// # Cancel safety
    /// Dropping the future after the request was sent does not cancel the
    /// create: the node may exist without the caller learning its name (for
    /// an ephemeral node, it goes with the session).
    pub async fn create(
        &self,
        path: &str,
        data: impl Into<Data>,
        options: CreateOptions,
    ) -> Result<Created, ClientError> {
        check_path(path)?;
        let op = Op::Create(options.to_create(path, data.into())?);
        match self.call(op, None).await? {
            OpResult::Created { path, stat } => Ok(Created { path, stat }),
            other => Err(unexpected("create", &other)),
        }
    }

    /// Deletes a node with no children, if its version is `version` (any
    /// version if `None`).
    ///
    /// # Errors
    /// `InvalidPath`, `NoNode`, `BadVersion`, `NotEmpty`, `NotOwner`
    /// (another session's lock node, or a zombie), `TokenRequired` (a timed
    /// hold: use [`Hold::release`](crate::Hold::release)),
    /// `SessionExpired`, `Closed`.
    ///
    /// # Cancel safety
    /// Dropping the future after the request was sent does not cancel the
    /// delete.
    pub async fn delete(&self, path: &str, version: Option<u64>) -> Result<(), ClientError> {
        check_path(path)?;
        let op = Op::Delete {
            path: path.into(),
            version,
            czxid: None,
            force: false,
        };
        match self.call(op, None).await? {
            OpResult::Deleted => Ok(()),
            other => Err(unexpected("delete", &other)),
        }
    }

    /// Deletes a node past the owner and token rules: another session's
    /// lock node, a zombie, or a timed hold without its token. The server
    /// does what the end of the owner's session would: a granted lock node
    /// with a lock-delay is taken from its holder, who is told at once, and
    /// stays as a zombie through the delay before the next waiter is
    /// granted ([`Forced::Zombie`]); anything else goes at once
    /// ([`Forced::Deleted`]). The server logs it with this session's id.
    ///
    /// # Errors
    /// `InvalidPath` (no round trip), `NoNode`, `NotEmpty`, `SessionExpired`,
    /// `Closed`.
    ///
    /// # Cancel safety
    /// Dropping the future after the request was sent does not cancel the
    /// delete.
    pub async fn force_delete(&self, path: &str) -> Result<Forced, ClientError> {
        check_path(path)?;
        let op = Op::Delete {
            path: path.into(),
            version: None,
            czxid: None,
            force: true,
        };
        match self.call(op, None).await? {
            OpResult::Deleted => Ok(Forced::Deleted),
            OpResult::Zombified { stat } => Ok(Forced::Zombie {
                freed_at: system_time(stat.lock.and_then(|l| l.freed_at_ms).unwrap_or(0)),
            }),
            other => Err(unexpected("forced delete", &other)),
        }
    }

    /// Replaces a node's data, if its version is `version` (any if `None`),
    /// and returns its new stat.
    ///
    /// # Errors
    /// `InvalidPath`, `NoNode`, `BadVersion`, `TooLarge`, `NotOwner`
    /// (another session's lock node, or a zombie), `TokenRequired` (a timed
    /// hold: use [`Hold::set`](crate::Hold::set)), `SessionExpired`,
    /// `Closed`.
    ///
    /// # Cancel safety
    /// Dropping the future after the request was sent does not cancel the
    /// set.
    pub async fn set(
        &self,
        path: &str,
        data: impl Into<Data>,
        version: Option<u64>,
    ) -> Result<Stat, ClientError> {
        check_path(path)?;
        let op = Op::Set {
            path: path.into(),
            data: data.into(),
            version,
            czxid: None,
        };
        match self.call(op, None).await? {
            OpResult::Stat { stat } => Ok(stat),
            other => Err(unexpected("set", &other)),
        }
    }

    /// Reads a node's data and stat.
    ///
    /// # Errors
    /// `InvalidPath`, `NoNode`, `SessionExpired`, `Closed`.
    ///
    /// # Cancel safety
    /// Safe: a read changes nothing.
    pub async fn get(&self, path: &str) -> Result<(Vec<u8>, Stat), ClientError> {
        check_path(path)?;
        let op = Op::Get {
            path: path.into(),
            watch: false,
        };
        match self.call(op, None).await? {
            OpResult::Data { data, stat } => Ok((data.0, stat)),
            other => Err(unexpected("get", &other)),
        }
    }

    /// Reads a node's data and stat and sets a data watch on it, which fires
    /// on the next set or delete of the node.
    ///
    /// # Errors
    /// As [`Client::get`]; on an error no watch is set.
    ///
    /// # Cancel safety
    /// Safe: dropping the future (or the returned [`Watch`]) only drops the
    /// interest in the event.
    pub async fn get_watch(&self, path: &str) -> Result<(Vec<u8>, Stat, Watch), ClientError> {
        check_path(path)?;
        let (tx, watch) = Watch::new(path.into(), WatchKind::Data);
        let op = Op::Get {
            path: path.into(),
            watch: true,
        };
        match self.call(op, Some(tx)).await? {
            OpResult::Data { data, stat } => Ok((data.0, stat, watch)),
            other => Err(unexpected("get", &other)),
        }
    }

    /// The node's stat, or `None` if it does not exist.
    ///
    /// # Errors
    /// `InvalidPath`, `SessionExpired`, `Closed`.
    ///
    /// # Cancel safety
    /// Safe: a read changes nothing.
    pub async fn exists(&self, path: &str) -> Result<Option<Stat>, ClientError> {
        check_path(path)?;
        let op = Op::Exists {
            path: path.into(),
            watch: false,
        };
        match self.call(op, None).await? {
            OpResult::Exists { stat } => Ok(stat),
            other => Err(unexpected("exists", &other)),
        }
    }

    /// As [`Client::exists`], and sets a watch: a data watch (fires on set
    /// or delete) if the node exists, else an exist watch (fires on create).
    /// After a reconnect, an exist watch also fires `created` if the node
    /// may have been created and deleted while the client was away, so the
    /// node may be absent when it fires: read it again.
    ///
    /// # Errors
    /// As [`Client::exists`].
    ///
    /// # Cancel safety
    /// Safe: dropping the future (or the returned [`Watch`]) only drops the
    /// interest in the event.
    pub async fn exists_watch(&self, path: &str) -> Result<(Option<Stat>, Watch), ClientError> {
        check_path(path)?;
        let (tx, mut watch) = Watch::new(path.into(), WatchKind::Exist);
        let op = Op::Exists {
            path: path.into(),
            watch: true,
        };
        match self.call(op, Some(tx)).await? {
            OpResult::Exists { stat } => {
                if stat.is_some() {
                    watch.set_kind(WatchKind::Data);
                }
                Ok((stat, watch))
            }
            other => Err(unexpected("exists", &other)),
        }
    }

    /// A node's children, sorted, with the node's own stat: every page of
    /// the listing (the server sends at most its page size, 1,000 names by
    /// default, per request), read again from the start if the children
    /// changed between pages (the node's `cversion` moved), so the list is
    /// one moment's.
    ///
    /// # Errors
    /// `InvalidPath`, `NoNode`, `SessionExpired`, `Closed`; `LimitExceeded`
    /// if the children changed during each of 5 listings in a row (read
    /// them page by page with [`Client::children_page`] instead).
    ///
    /// # Cancel safety
    /// Safe: a read changes nothing.
    pub async fn children(&self, path: &str) -> Result<(Vec<String>, Stat), ClientError> {
        self.children_listing(path, false)
            .await
            .map(|(c, s, _)| (c, s))
    }

    /// As [`Client::children`], and sets a child watch, which fires when a
    /// child is added or removed or the node is deleted.
    ///
    /// # Errors
    /// As [`Client::children`].
    ///
    /// # Cancel safety
    /// Safe: dropping the future (or the returned [`Watch`]) only drops the
    /// interest in the event.
    pub async fn children_watch(
        &self,
        path: &str,
    ) -> Result<(Vec<String>, Stat, Watch), ClientError> {
        let (children, stat, watch) = self.children_listing(path, true).await?;
        let watch = watch.ok_or_else(|| ClientError::protocol("a watched listing has a watch"))?;
        Ok((children, stat, watch))
    }

    /// One page of a node's children: the names after `after` (from the
    /// first if `None`), at most `limit` of them and at most the server's
    /// page size, with the node's stat, and whether names follow. For the
    /// next page, pass the last name as `after`. Pages are not one
    /// snapshot: a `cversion` that moved between pages means the children
    /// changed in between.
    ///
    /// # Errors
    /// `InvalidPath`, `NoNode`, `InvalidArgument` (a limit of 0),
    /// `SessionExpired`, `Closed`.
    ///
    /// # Cancel safety
    /// Safe: a read changes nothing.
    pub async fn children_page(
        &self,
        path: &str,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<(Vec<String>, Stat, bool), ClientError> {
        check_path(path)?;
        let op = Op::Children {
            path: path.into(),
            watch: false,
            limit,
            after: after.map(str::to_owned),
        };
        match self.call(op, None).await? {
            OpResult::Children {
                children,
                stat,
                more,
            } => Ok((children, stat, more)),
            other => Err(unexpected("children", &other)),
        }
    }

    /// Every page of `path`'s children as of one `cversion`; with `watch`,
    /// the first page of the listing that is returned sets a child watch.
    async fn children_listing(
        &self,
        path: &str,
        watch: bool,
    ) -> Result<(Vec<String>, Stat, Option<Watch>), ClientError> {
        check_path(path)?;
        for _ in 0..CHILDREN_LISTINGS_MAX {
            let (tx, rx) = if watch {
                let (tx, rx) = Watch::new(path.into(), WatchKind::Child);
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            let op = Op::Children {
                path: path.into(),
                watch: tx.is_some(),
                limit: None,
                after: None,
            };
            let (mut children, first, mut more) = match self.call(op, tx).await? {
                OpResult::Children {
                    children,
                    stat,
                    more,
                } => (children, stat, more),
                other => return Err(unexpected("children", &other)),
            };
            let mut changed = false;
            // Bounded: each page is non-empty and moves `after` forward,
            // and the node has at most CHILDREN_PER_NODE_MAX children.
            while more {
                let after = children.last().cloned();
                let (page, stat, next) = self.children_page(path, after.as_deref(), None).await?;
                if stat.cversion != first.cversion || page.is_empty() {
                    changed = true;
                    break;
                }
                children.extend(page);
                more = next;
            }
            if !changed {
                return Ok((children, first, rx));
            }
        }
        Err(ClientError::LimitExceeded {
            message: format!(
                "the children of {path} changed while they were listed, {CHILDREN_LISTINGS_MAX} \
                 times in a row; list them page by page with children_page"
            ),
            index: None,
        })
    }
    /// Applies all of `ops` or none, and returns one result per op.
    ///
    /// # Errors
    /// The error of the first failing op, with its position in `index`
    /// (see [`ClientError::index`]); `InvalidPath` for a bad path with its
    /// index (no round trip); `SessionExpired`, `Closed`.
    ///
    /// # Cancel safety
    /// Dropping the future after the request was sent does not cancel the
    /// multi.
    pub async fn multi(&self, ops: Vec<MultiOp>) -> Result<Vec<MultiResult>, ClientError> {
        let op = Op::Multi { ops };
        validate_op(&op)?;
        match self.call(op, None).await? {
            OpResult::Multi { results } => Ok(results),
            other => Err(unexpected("multi", &other)),
        }
    }

    /// Ends the session: the server deletes its ephemeral nodes (and so
    /// releases its locks) before this returns `Ok`. Requests sent before are
    /// answered first; later calls, and all watches, fail with `Closed`.
    /// Closing a closed or expired client is `Ok`.
    ///
    /// # Errors
    /// `ConnectionLost` if the server could not be reached: the client is
    /// closed anyway, and the server expires the session after its timeout.
    ///
    /// # Cancel safety
    /// Dropping the future after the close was queued does not stop it: the
    /// session still closes.
    pub async fn close(&self) -> Result<(), ClientError> {
        if matches!(
            self.inner.status.borrow().state,
            SessionState::Expired | SessionState::Closed
        ) {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        let result = if self.inner.shared.close(Some(reply)) {
            // A dropped reply means the task ended for another reason first
            // (expiry): the session is over either way.
            rx.await.unwrap_or(Ok(()))
        } else {
            // Over, or another close is under way: wait for the end.
            let mut status = self.session_status();
            let _ = status
                .wait_for(|s| matches!(s.state, SessionState::Expired | SessionState::Closed))
                .await;
            Ok(())
        };
        let task = self.inner.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
        result
    }
}

/// How many times [`Client::children`] lists a node again whose children
/// changed between pages before it gives up.
const CHILDREN_LISTINGS_MAX: usize = 5;

/// What a [`Client::force_delete`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forced {
    /// The node is gone.
    Deleted,
    /// The node was a held lock with a lock-delay: its holder has been
    /// told, and the lock passes to the next waiter at `freed_at` (server
    /// clock), when the zombie left behind is deleted.
    Zombie { freed_at: std::time::SystemTime },
}

fn unexpected(what: &str, result: &OpResult) -> ClientError {
    ClientError::protocol(format!("a {what} was answered with {result:?}"))
}

pub(crate) fn check_path(path: &str) -> Result<(), ClientError> {
    protocol::validate_path(path).map_err(|e| ClientError::invalid_path(e, None))
}

/// Checks every path of `op` locally, and refuses the ops the session task
/// owns.
fn validate_op(op: &Op) -> Result<(), ClientError> {
    match op {
        Op::Create(c) => check_path(&c.path),
        Op::Delete { path, .. }
        | Op::Touch { path, .. }
        | Op::Set { path, .. }
        | Op::Get { path, .. }
        | Op::Exists { path, .. }
        | Op::Children { path, .. } => check_path(path),
        Op::Multi { ops } => {
            for (i, m) in ops.iter().enumerate() {
                let path = match m {
                    MultiOp::Check { path, .. }
                    | MultiOp::Set { path, .. }
                    | MultiOp::Touch { path, .. }
                    | MultiOp::Delete { path, .. } => path,
                    MultiOp::Create(c) => &c.path,
                };
                protocol::validate_path(path)
                    .map_err(|e| ClientError::invalid_path(e, u32::try_from(i).ok()))?;
            }
            Ok(())
        }
        Op::Ping { .. } | Op::SetWatches { .. } => Err(ClientError::invalid_argument(
            "heartbeats and watch re-registration are sent by the client itself",
        )),
        Op::CloseSession => Err(ClientError::invalid_argument(
            "use Client::close() to end the session",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_options_build_the_wire_create() {
        let c = CreateOptions::ephemeral()
            .sequential()
            .to_create("/l/lock-", Data::from("x"))
            .unwrap();
        assert_eq!(c.kind, NodeKind::Ephemeral);
        assert!(c.sequential && !c.make_parents && c.ttl_ms.is_none());
        let c = CreateOptions::persistent()
            .ttl(Duration::from_secs(600))
            .make_parents()
            .to_create("/t", Data::default())
            .unwrap();
        assert_eq!(c.ttl_ms, Some(600_000));
        assert!(c.make_parents);
        assert_eq!(CreateOptions::container().kind, NodeKind::Container);
        let err = CreateOptions::persistent()
            .ttl(Duration::MAX)
            .to_create("/t", Data::default())
            .unwrap_err();
        assert_eq!(err.code(), Some(protocol::ErrorCode::InvalidArgument));
    }

    #[test]
    fn multi_paths_are_checked_with_their_index() {
        let op = Op::Multi {
            ops: vec![
                MultiOp::Check {
                    path: "/ok".into(),
                    version: Some(1),
                    czxid: None,
                },
                MultiOp::Delete {
                    path: "bad".into(),
                    version: None,
                    czxid: None,
                },
            ],
        };
        let err = validate_op(&op).unwrap_err();
        assert_eq!(err.code(), Some(protocol::ErrorCode::InvalidPath));
        assert_eq!(err.index(), Some(1));
        assert!(validate_op(&Op::CloseSession).is_err());
        assert!(validate_op(&Op::Ping {
            ack: protocol::Xid(0)
        })
        .is_err());
    }

    #[test]
    fn options_defaults_and_checks() {
        let o = ClientOptions::new("127.0.0.1:1").server("127.0.0.1:2");
        assert_eq!(o.servers.len(), 2);
        assert_eq!(o.session_timeout, Duration::from_secs(10));
        assert!(o.check().is_ok());
        let bad = ClientOptions::new("x")
            .reconnect_backoff(Duration::from_secs(3), Duration::from_secs(1));
        assert!(bad.check().is_err());
    }
}

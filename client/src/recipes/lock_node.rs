//! Lock nodes: a session's own places in lock queues, the events the server
//! pushes for them (grant, deletion by others) without any watch being set,
//! and the handle that deletes its node when dropped.

use std::future::Future;

use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use crate::client::{check_path, Client, SessionState, SessionStatus};
use crate::error::ClientError;
use crate::protocol::{
    Create, Data, LockSpec, NodeKind, Op, OpResult, Stat, WatchEvent, WatchEventKind, WatchKind,
    Zxid,
};
use crate::session::deferred::Reservation;
use crate::session::subscriptions::Subscriber;
use crate::session::OnReply;

/// Where one lock node stands, as this client last heard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockState {
    /// In the queue, not granted yet.
    Waiting,
    /// Granted: `token` is the fencing token (the zxid of the granting
    /// write).
    Granted { token: Zxid },
    /// Deleted by another session, or by the server (after this session's
    /// expiry and its lock-delay). Final.
    Deleted,
    /// Deleted by this session. Final.
    Released,
    /// The client can no longer follow the node: the session ended
    /// (`SessionExpired`), the client closed (`Closed`), or the server
    /// refused to re-register the node after a resume (its error). Final.
    Failed(ClientError),
}

impl LockState {
    /// The fencing token, if granted.
    pub fn token(&self) -> Option<Zxid> {
        match self {
            LockState::Granted { token } => Some(*token),
            _ => None,
        }
    }

    /// Whether the state can no longer change (the node is gone or no
    /// longer followed).
    pub fn is_final(&self) -> bool {
        !matches!(self, LockState::Waiting | LockState::Granted { .. })
    }
}

/// What a lock node's subscription publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LockStatus {
    pub(crate) state: LockState,
    /// `LockGranted` events received for the node.
    pub(crate) grant_events: u64,
}

/// Why a held lock may be lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// The session expired: the server deleted the node, or keeps it as an
    /// ownerless zombie until its lock-delay passes, then gives the lock on.
    SessionExpired,
    /// The client was closed (its session ended with it).
    Closed,
    /// Another session (or the server) deleted the node.
    NodeDeleted,
    /// The client has not heard from the server for so long that the server
    /// may expire the session at any moment (its lease ended while
    /// suspended). The lock is held again if the session resumes, but the
    /// holder must stop acting on it now.
    LeaseEnded,
    /// The client can no longer follow the node (the server refused to
    /// re-register it after a resume).
    Untracked(ClientError),
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::SessionExpired => f.write_str("the session expired"),
            LostReason::Closed => f.write_str("the client was closed"),
            LostReason::NodeDeleted => f.write_str("the lock node was deleted by someone else"),
            LostReason::LeaseEnded => f.write_str(
                "the client has not heard from the server for the session timeout: the session may expire at any moment",
            ),
            LostReason::Untracked(e) => write!(f, "the lock node can no longer be followed: {e}"),
        }
    }
}

/// A lock node as the session follows it, from the create's reply on (so
/// no event after the reply is missed) until the node is gone: a
/// `NodeDeleted`, this session's own delete of the node, or the session's
/// end.
#[derive(Debug)]
struct LockSub {
    czxid: Zxid,
    tx: watch::Sender<LockStatus>,
}

impl LockSub {
    fn new(stat: &Stat) -> (Self, watch::Receiver<LockStatus>) {
        let state = match stat.lock.as_ref().and_then(|l| l.granted) {
            Some(grant) => LockState::Granted { token: grant.token },
            None => LockState::Waiting,
        };
        let (tx, rx) = watch::channel(LockStatus {
            state,
            grant_events: 0,
        });
        (
            LockSub {
                czxid: stat.czxid,
                tx,
            },
            rx,
        )
    }
}

impl Subscriber for LockSub {
    fn on_event(&mut self, event: &WatchEvent) -> bool {
        match event.kind {
            WatchEventKind::LockGranted => {
                self.tx.send_modify(|s| {
                    s.grant_events += 1;
                    // A resume re-confirms a grant: the first token stays.
                    if s.state == LockState::Waiting {
                        s.state = LockState::Granted { token: event.zxid };
                    }
                });
                true
            }
            WatchEventKind::NodeDeleted => {
                self.tx.send_modify(|s| s.state = LockState::Deleted);
                false
            }
            _ => true,
        }
    }

    fn on_gone(&mut self, czxid: Option<Zxid>, by_own_delete: bool) -> bool {
        if czxid.is_some_and(|z| z != self.czxid) {
            // A delete of another node at this path.
            return true;
        }
        let gone = if by_own_delete {
            LockState::Released
        } else {
            LockState::Deleted
        };
        self.tx.send_modify(|s| s.state = gone);
        false
    }

    fn fail(self: Box<Self>, err: &ClientError) {
        self.tx
            .send_modify(|s| s.state = LockState::Failed(err.clone()));
    }

    fn is_abandoned(&self) -> bool {
        // Only a dropped handle lets go of every receiver, and its drop
        // already queued the node's delete.
        self.tx.is_closed()
    }
}

/// Owns a lock node: dropped while armed, it queues the node's delete in the
/// place it reserved in the session's queue for dropped handles' work.
#[derive(Debug)]
pub(crate) struct NodeOwner {
    path: String,
    czxid: Zxid,
    armed: Option<Reservation>,
}

impl NodeOwner {
    pub(crate) fn new(path: String, czxid: Zxid, place: Reservation) -> Self {
        NodeOwner {
            path,
            czxid,
            armed: Some(place),
        }
    }

    fn disarm(&mut self) {
        self.armed = None;
    }
}

impl Drop for NodeOwner {
    fn drop(&mut self) {
        if let Some(place) = self.armed.take() {
            place.push(Op::Delete {
                path: std::mem::take(&mut self.path),
                version: None,
                czxid: Some(self.czxid),
                force: false,
            });
        }
    }
}

impl Client {
    /// Joins the lock queue of `prefix`'s parent: creates an ephemeral
    /// sequential node `prefix<counter>` with `data` (and any missing
    /// ancestors, as containers) that the server grants by the rules of
    /// `spec.mode`, and follows it from the create's reply on, so that no
    /// grant or deletion is missed. The lock recipes ([`crate::Lock`] and
    /// the others) are built on this.
    ///
    /// The returned [`LockNode`] is granted at once if
    /// [`LockNode::token`] is `Some`; else await [`LockNode::granted`].
    /// Dropping it deletes the node in the background.
    ///
    /// # Errors
    /// - `Deadlock { cycle, .. }` if waiting in this queue would close a
    ///   cycle of sessions waiting on each other: no node was created.
    /// - `InvalidPath` (no round trip), `InvalidArgument` (a mode the server
    ///   refuses, e.g. a semaphore of 0 permits), `NoChildrenForEphemerals`
    ///   (the queue's parent is ephemeral), `TooLarge`, `SessionExpired`,
    ///   `Closed`.
    /// - `LimitExceeded`: a server limit, or this client already follows
    ///   65,536 lock nodes (no round trip).
    ///
    /// # Cancel safety
    /// Safe: if the future is dropped after the create went out, the session
    /// task deletes the node as soon as the create's reply arrives.
    pub async fn create_lock(
        &self,
        prefix: &str,
        data: impl Into<Data>,
        spec: LockSpec,
    ) -> Result<LockNode, ClientError> {
        check_path(prefix)?;
        let op = Op::Create(Create {
            path: prefix.into(),
            data: data.into(),
            kind: NodeKind::Ephemeral,
            sequential: true,
            ttl_ms: None,
            make_parents: true,
            lock: Some(spec),
        });
        let deferred = self.deferred();
        let place = deferred
            .reserve()
            .ok_or_else(|| ClientError::LimitExceeded {
                message: format!(
                    "this client already follows {} lock nodes, the most one session does; \
                 release or drop some before creating more",
                    deferred.capacity()
                ),
                index: None,
            })?;
        let rx = self
            .submit(op, move |reply| -> OnReply {
                Box::new(move |_, result, install| {
                    let created = match result {
                        Ok(OpResult::Created { path, stat }) => {
                            let (sub, status) = LockSub::new(&stat);
                            install.replace(path.clone(), WatchKind::Lock, Box::new(sub));
                            if install.retried() && status.borrow().state == LockState::Waiting {
                                // The cached reply predates the gap: ask the
                                // server whether the node was granted or
                                // deleted meanwhile.
                                install.recheck(path.clone(), WatchKind::Lock);
                            }
                            Ok(LockCreated {
                                owner: NodeOwner::new(path, stat.czxid, place),
                                stat,
                                status,
                            })
                        }
                        Ok(other) => Err(ClientError::protocol(format!(
                            "a lock create was answered with {other:?}"
                        ))),
                        Err(e) => Err(e),
                    };
                    // If the caller is gone, the value's owner queues the
                    // node's delete as it drops.
                    let _ = reply.send(created);
                })
            })
            .await?;
        let created = self.reply(rx).await?;
        Ok(LockNode::new(self.clone(), created))
    }
}

/// What the session task hands back for a successful lock create.
#[derive(Debug)]
pub(crate) struct LockCreated {
    pub(crate) stat: Stat,
    pub(crate) owner: NodeOwner,
    pub(crate) status: watch::Receiver<LockStatus>,
}

/// This session's place in a lock queue, made by
/// [`Client::create_lock`]: the building block of the lock recipes.
///
/// It follows the node with no watch to set and no gap after the create:
/// the grant (a `LockGranted` event, or the create's own reply) and a
/// deletion by anyone else, also across a reconnect (the client
/// re-registers the node when it resumes the session).
///
/// Dropping a `LockNode` deletes the node in the background (the session
/// task sends the delete, guarded by the node's creation zxid, so a node
/// created later at the same path is never touched). [`LockNode::delete`]
/// deletes it and reports the outcome.
#[derive(Debug)]
pub struct LockNode {
    client: Client,
    owner: NodeOwner,
    stat: Stat,
    status: watch::Receiver<LockStatus>,
}

impl LockNode {
    pub(crate) fn new(client: Client, created: LockCreated) -> Self {
        LockNode {
            client,
            owner: created.owner,
            stat: created.stat,
            status: created.status,
        }
    }

    /// The node's path (with its sequence suffix).
    pub fn path(&self) -> &str {
        &self.owner.path
    }

    /// The zxid that created the node (its place in the queue).
    pub fn czxid(&self) -> Zxid {
        self.owner.czxid
    }

    /// The node's stat from the create's reply.
    pub fn created_stat(&self) -> &Stat {
        &self.stat
    }

    /// Where the node stands now.
    pub fn state(&self) -> LockState {
        self.status.borrow().state.clone()
    }

    /// The fencing token, if the node is granted.
    pub fn token(&self) -> Option<Zxid> {
        self.status.borrow().state.token()
    }

    /// How many `LockGranted` events the server pushed for this node: 0 if
    /// it was granted in the create's reply (or not yet), 1 if granted
    /// later. Each resume of the session re-confirms a grant and may add one.
    pub fn grant_events(&self) -> u64 {
        self.status.borrow().grant_events
    }

    /// Waits for the next change of [`LockNode::state`] and returns the new
    /// state (at once if a change came since the last call).
    ///
    /// # Cancel safety
    /// Safe: a change seen by a dropped call is still seen by the next one
    /// through [`LockNode::state`].
    pub async fn changed(&mut self) -> LockState {
        if self.status.changed().await.is_err() {
            // The subscription ended; its final state is in the channel.
            return self.state();
        }
        self.status.borrow_and_update().state.clone()
    }

    /// Waits until the node is granted and returns its fencing token.
    ///
    /// # Errors
    /// - `NoNode` if the node was deleted first (by another session, by the
    ///   server, or by this client through another path).
    /// - `SessionExpired` or `Closed` if the session ended first; the error
    ///   of a refused re-registration.
    ///
    /// # Cancel safety
    /// Safe: dropping the future leaves the node queued; the grant is still
    /// recorded in [`LockNode::state`].
    pub async fn granted(&mut self) -> Result<Zxid, ClientError> {
        let path = self.owner.path.clone();
        let status = self
            .status
            .wait_for(|s| s.state != LockState::Waiting)
            .await
            .map(|s| s.state.clone())
            .unwrap_or_else(|_| self.state());
        match status {
            LockState::Granted { token } => Ok(token),
            LockState::Failed(e) => Err(e),
            LockState::Waiting | LockState::Deleted | LockState::Released => {
                Err(ClientError::NoNode {
                    message: format!(
                        "the lock node {path} was deleted before it was granted (by another \
                         session or an administrator); the lock was not taken"
                    ),
                    index: None,
                })
            }
        }
    }

    /// Deletes the node (one round trip): releases the lock if granted,
    /// leaves the queue if waiting. The delete names the node's creation
    /// zxid, so it never deletes another node at the same path.
    ///
    /// # Errors
    /// `NoNode`, `BadToken` or `NotOwner` if the node was already gone or
    /// taken away (the lock had been lost); `SessionExpired` or `Closed` if the session ended (the node
    /// goes with it).
    ///
    /// # Cancel safety
    /// Safe: once the delete is queued it is sent even if the future is
    /// dropped; dropped before that, the node is deleted in the
    /// background as if the `LockNode` had been dropped.
    pub async fn delete(mut self) -> Result<(), ClientError> {
        let op = Op::Delete {
            path: self.owner.path.clone(),
            version: None,
            czxid: Some(self.owner.czxid),
            force: false,
        };
        let reply = self.client.send(op, None).await?;
        self.owner.disarm();
        match self.client.reply(reply).await? {
            OpResult::Deleted => Ok(()),
            other => Err(ClientError::protocol(format!(
                "a delete was answered with {other:?}"
            ))),
        }
    }

    /// Resolves once a granted lock may be lost, with the reason: the
    /// session expired or the client closed, the node was deleted by someone
    /// else, or the client went without hearing from the server until its
    /// lease end. The lease end is the client's conservative bound on the
    /// server's expiry (see [`SessionStatus::lease_end`]), and the server
    /// gives a lock on only after the expiry plus the lock-delay, so this
    /// resolves before anyone else can hold the lock. Resolves at once if the
    /// lock may already be lost.
    ///
    /// The future owns what it needs (it can be spawned) and can be made
    /// again at any time.
    ///
    /// # Cancel safety
    /// Safe: it only observes.
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        let mut session = self.client.session_status();
        let mut lock = self.status.clone();
        async move {
            loop {
                let reason = lost_now(&session.borrow_and_update(), &lock.borrow_and_update());
                if let Some(reason) = reason {
                    return reason;
                }
                let lease_end = session.borrow().lease_end;
                tokio::select! {
                    changed = session.changed() => if changed.is_err() {
                        return LostReason::Closed;
                    },
                    changed = lock.changed() => if changed.is_err() {
                        let final_state = lock.borrow().state.clone();
                        return lost_now(&session.borrow(), &LockStatus {
                            state: final_state,
                            grant_events: 0,
                        })
                        .unwrap_or(LostReason::Closed);
                    },
                    () = sleep_until(lease_end) => {}
                }
            }
        }
    }

    /// Whether the lock may be lost now, by the rules of [`LockNode::lost`].
    pub fn is_lost(&self) -> bool {
        lost_now(
            &self.client.session_status().borrow(),
            &self.status.borrow(),
        )
        .is_some()
    }
}

fn lost_now(session: &SessionStatus, lock: &LockStatus) -> Option<LostReason> {
    match session.state {
        SessionState::Expired => return Some(LostReason::SessionExpired),
        SessionState::Closed => return Some(LostReason::Closed),
        SessionState::Connected | SessionState::Suspended => {}
    }
    match &lock.state {
        LockState::Deleted | LockState::Released => return Some(LostReason::NodeDeleted),
        LockState::Failed(ClientError::SessionExpired) => return Some(LostReason::SessionExpired),
        LockState::Failed(ClientError::Closed) => return Some(LostReason::Closed),
        LockState::Failed(e) => return Some(LostReason::Untracked(e.clone())),
        LockState::Waiting | LockState::Granted { .. } => {}
    }
    // The session task moves the lease end on every reply; a lease end in
    // the past means nothing was heard for a whole timeout.
    (Instant::now() >= session.lease_end).then_some(LostReason::LeaseEnded)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::protocol::{Grant, LockInfo, LockMode};
    use crate::session::deferred::Deferred;
    use crate::session::subscriptions::Subscriptions;

    fn stat(czxid: u64, granted: Option<u64>) -> Stat {
        Stat {
            czxid: Zxid(czxid),
            lock: Some(LockInfo {
                mode: LockMode::Exclusive,
                delay_ms: 0,
                granted: granted.map(|t| Grant {
                    token: Zxid(t),
                    at_ms: 0,
                }),
                freed_at_ms: None,
            }),
            ..Stat::default()
        }
    }

    fn event(kind: WatchEventKind, path: &str, zxid: u64) -> WatchEvent {
        WatchEvent {
            kind,
            path: path.into(),
            zxid: Zxid(zxid),
        }
    }

    fn follow(subs: &mut Subscriptions, path: &str, stat: &Stat) -> watch::Receiver<LockStatus> {
        let (sub, rx) = LockSub::new(stat);
        subs.replace(path.into(), WatchKind::Lock, Box::new(sub));
        rx
    }

    #[test]
    fn a_subscription_sees_the_grant_then_the_deletion() {
        let mut subs = Subscriptions::default();
        let rx = follow(&mut subs, "/l/lock-0000000001", &stat(5, None));
        assert_eq!(rx.borrow().state, LockState::Waiting);
        assert_eq!(
            subs.fire(&event(WatchEventKind::LockGranted, "/other", 9)),
            0
        );
        assert_eq!(
            subs.fire(&event(WatchEventKind::LockGranted, "/l/lock-0000000001", 9)),
            1
        );
        assert_eq!(rx.borrow().state, LockState::Granted { token: Zxid(9) });
        // A resume's re-confirmation counts but keeps the first token.
        subs.fire(&event(
            WatchEventKind::LockGranted,
            "/l/lock-0000000001",
            12,
        ));
        assert_eq!(rx.borrow().state.token(), Some(Zxid(9)));
        assert_eq!(rx.borrow().grant_events, 2);
        let key = ("/l/lock-0000000001".to_string(), WatchKind::Lock);
        assert_eq!(subs.live_keys(), vec![key]);
        subs.fire(&event(
            WatchEventKind::NodeDeleted,
            "/l/lock-0000000001",
            13,
        ));
        assert_eq!(rx.borrow().state, LockState::Deleted);
        assert!(rx.borrow().state.is_final());
        assert!(subs.live_keys().is_empty());
    }

    #[test]
    fn a_grant_in_the_reply_and_an_own_delete() {
        let mut subs = Subscriptions::default();
        let rx = follow(&mut subs, "/a", &stat(5, Some(5)));
        assert_eq!(rx.borrow().state.token(), Some(Zxid(5)));
        assert_eq!(rx.borrow().grant_events, 0);
        // A delete guarded by another czxid was not of this node.
        subs.gone("/a", Some(Zxid(4)), true);
        assert_eq!(subs.count(), 1);
        subs.gone("/a", Some(Zxid(5)), true);
        assert_eq!(rx.borrow().state, LockState::Released);
        assert_eq!(subs.count(), 0);
    }

    #[test]
    fn a_newer_node_at_the_path_ends_the_old_subscription() {
        let mut subs = Subscriptions::default();
        let old = follow(&mut subs, "/a", &stat(5, None));
        let new = follow(&mut subs, "/a", &stat(8, None));
        assert_eq!(old.borrow().state, LockState::Deleted);
        assert_eq!(new.borrow().state, LockState::Waiting);
        assert_eq!(subs.count(), 1);
    }

    #[test]
    fn dropped_subscribers_are_not_re_registered_and_failures_reach_the_rest() {
        let mut subs = Subscriptions::default();
        drop(follow(&mut subs, "/a", &stat(1, None)));
        let b = follow(&mut subs, "/b", &stat(2, None));
        let c = follow(&mut subs, "/c", &stat(3, Some(3)));
        let keys: Vec<_> = subs.live_keys().into_iter().map(|(p, _)| p).collect();
        assert_eq!(keys, vec!["/b".to_string(), "/c".to_string()]);
        subs.fail_keys(&[("/b".into(), WatchKind::Lock)], &ClientError::Closed);
        assert_eq!(b.borrow().state, LockState::Failed(ClientError::Closed));
        subs.fail_all(&ClientError::SessionExpired);
        assert_eq!(
            c.borrow().state,
            LockState::Failed(ClientError::SessionExpired)
        );
    }

    #[test]
    fn loss_rules() {
        let now = Instant::now();
        let session = |state, lease_end| SessionStatus {
            session_id: crate::SessionId(1),
            state,
            lease_end,
        };
        let held = LockStatus {
            state: LockState::Granted { token: Zxid(1) },
            grant_events: 0,
        };
        let later = now + std::time::Duration::from_secs(60);
        assert_eq!(
            lost_now(&session(SessionState::Connected, later), &held),
            None
        );
        assert_eq!(
            lost_now(&session(SessionState::Suspended, later), &held),
            None
        );
        assert_eq!(
            lost_now(&session(SessionState::Suspended, now), &held),
            Some(LostReason::LeaseEnded)
        );
        assert_eq!(
            lost_now(&session(SessionState::Expired, later), &held),
            Some(LostReason::SessionExpired)
        );
        let deleted = LockStatus {
            state: LockState::Deleted,
            grant_events: 1,
        };
        assert_eq!(
            lost_now(&session(SessionState::Connected, later), &deleted),
            Some(LostReason::NodeDeleted)
        );
    }

    #[test]
    fn a_dropped_owner_hands_its_delete_to_the_session_task() {
        let queue = Arc::new(Deferred::with_capacity(8));
        drop(NodeOwner::new(
            "/a".into(),
            Zxid(3),
            queue.reserve().unwrap(),
        ));
        let mut kept = NodeOwner::new("/b".into(), Zxid(4), queue.reserve().unwrap());
        kept.disarm();
        drop(kept);
        let ops: Vec<_> = queue.take().into_iter().collect();
        assert_eq!(
            ops,
            vec![Op::Delete {
                path: "/a".into(),
                version: None,
                czxid: Some(Zxid(3)),
                force: false,
            }]
        );
        queue.close();
        drop(NodeOwner::new(
            "/c".into(),
            Zxid(5),
            queue.reserve().unwrap(),
        ));
        assert!(queue.take().is_empty());
    }
}

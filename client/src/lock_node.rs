//! Lock nodes: a session's own places in lock queues, the events the server
//! pushes for them (grant, deletion by others) without any watch being set,
//! and the handle that deletes its node when dropped.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, Instant};

use crate::client::{Client, SessionState, SessionStatus};
use crate::error::ClientError;
use crate::protocol::{Stat, WatchEvent, WatchEventKind, Zxid};

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

/// The session task's lock subscriptions, by node path. A subscription is
/// made when a lock create's reply is processed (so no event after the reply
/// is missed) and ends with the node: on a `NodeDeleted`, on this session's
/// own delete of the node, or with the session.
#[derive(Debug, Default)]
pub(crate) struct LockRegistry {
    by_path: BTreeMap<String, LockSub>,
}

#[derive(Debug)]
struct LockSub {
    czxid: Zxid,
    tx: watch::Sender<LockStatus>,
}

impl LockRegistry {
    /// Subscribes to the node just created at `path` with `stat`.
    pub(crate) fn register(&mut self, path: String, stat: &Stat) -> watch::Receiver<LockStatus> {
        let state = match stat.lock.as_ref().and_then(|l| l.granted) {
            Some(grant) => LockState::Granted { token: grant.token },
            None => LockState::Waiting,
        };
        let (tx, rx) = watch::channel(LockStatus {
            state,
            grant_events: 0,
        });
        let sub = LockSub {
            czxid: stat.czxid,
            tx,
        };
        if let Some(old) = self.by_path.insert(path, sub) {
            // Only possible if a node at this path was deleted without this
            // client seeing it (its queue's parent reaped and recreated).
            old.tx.send_modify(|s| s.state = LockState::Deleted);
        }
        rx
    }

    /// Routes a server event; returns whether a subscription took it.
    pub(crate) fn on_event(&mut self, event: &WatchEvent) -> bool {
        match event.kind {
            WatchEventKind::LockGranted => match self.by_path.get(&event.path) {
                Some(sub) => {
                    sub.tx.send_modify(|s| {
                        s.grant_events += 1;
                        // A resume re-confirms a grant: the first token stays.
                        if s.state == LockState::Waiting {
                            s.state = LockState::Granted { token: event.zxid };
                        }
                    });
                    true
                }
                None => false,
            },
            WatchEventKind::NodeDeleted => match self.by_path.remove(&event.path) {
                Some(sub) => {
                    sub.tx.send_modify(|s| s.state = LockState::Deleted);
                    true
                }
                None => false,
            },
            _ => false,
        }
    }

    /// This session deleted `path` (or learned it is gone): given `czxid`,
    /// only the node created at that zxid.
    pub(crate) fn on_own_delete(&mut self, path: &str, czxid: Option<Zxid>, gone: LockState) {
        let matches = self
            .by_path
            .get(path)
            .is_some_and(|sub| czxid.is_none_or(|z| z == sub.czxid));
        if matches {
            if let Some(sub) = self.by_path.remove(path) {
                sub.tx.send_modify(|s| s.state = gone);
            }
        }
    }

    /// Ends the subscriptions of `paths` with `err` (a refused re-registration).
    pub(crate) fn fail_paths(&mut self, paths: &[String], err: &ClientError) {
        for path in paths {
            if let Some(sub) = self.by_path.remove(path) {
                sub.tx
                    .send_modify(|s| s.state = LockState::Failed(err.clone()));
            }
        }
    }

    pub(crate) fn fail_all(&mut self, err: &ClientError) {
        for (_, sub) in std::mem::take(&mut self.by_path) {
            sub.tx
                .send_modify(|s| s.state = LockState::Failed(err.clone()));
        }
    }

    /// Paths to re-register after a resume: every node still followed,
    /// waiting or granted. For a waiting node the server fires a grant made
    /// in the gap; for a granted one it confirms the grant again (harmless)
    /// or reports the deletion the client missed.
    pub(crate) fn live_paths(&mut self) -> Vec<String> {
        // A subscription nobody listens to belongs to a dropped handle,
        // whose drop already queued the node's delete.
        self.by_path.retain(|_, sub| !sub.tx.is_closed());
        self.by_path.keys().cloned().collect()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_path.len()
    }
}

/// Lock nodes whose handles were dropped: their deletes are queued by the
/// session task or ahead of the session's next request, whichever comes
/// first. Shared between the client handles and the session task, so that a
/// `Drop` (which cannot await) can hand a delete over without a task of its
/// own and without a channel that could be full. Bounded by the number of
/// lock nodes the application had.
#[derive(Debug, Default)]
pub(crate) struct Orphans {
    nodes: Mutex<Vec<(String, Zxid)>>,
    /// `notify_one` keeps a permit, so a push while the task is busy (or
    /// reconnecting) is seen on its next turn.
    pub(crate) notify: Notify,
    /// Set when the session is over: its nodes are gone with it.
    closed: AtomicBool,
}

impl Orphans {
    fn push(&self, path: String, czxid: Zxid) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((path, czxid));
        self.notify.notify_one();
    }

    pub(crate) fn take(&self) -> Vec<(String, Zxid)> {
        std::mem::take(&mut *self.nodes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.take();
    }
}

/// Owns a lock node: dropped while armed, it queues the node's delete.
#[derive(Debug)]
pub(crate) struct NodeOwner {
    path: String,
    czxid: Zxid,
    orphans: Arc<Orphans>,
    armed: bool,
}

impl NodeOwner {
    pub(crate) fn new(path: String, czxid: Zxid, orphans: Arc<Orphans>) -> Self {
        NodeOwner {
            path,
            czxid,
            orphans,
            armed: true,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for NodeOwner {
    fn drop(&mut self) {
        if self.armed {
            self.orphans
                .push(std::mem::take(&mut self.path), self.czxid);
        }
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
        let op = crate::protocol::Op::Delete {
            path: self.owner.path.clone(),
            version: None,
            czxid: Some(self.owner.czxid),
            force: false,
        };
        let reply = self.client.send(op, None).await?;
        self.owner.disarm();
        match self.client.reply(reply).await? {
            crate::protocol::OpResult::Deleted => Ok(()),
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
    use super::*;
    use crate::protocol::{Grant, LockInfo, LockMode};

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

    #[test]
    fn a_subscription_sees_the_grant_then_the_deletion() {
        let mut reg = LockRegistry::default();
        let rx = reg.register("/l/lock-0000000001".into(), &stat(5, None));
        assert_eq!(rx.borrow().state, LockState::Waiting);
        assert!(!reg.on_event(&event(WatchEventKind::LockGranted, "/other", 9)));
        assert!(reg.on_event(&event(WatchEventKind::LockGranted, "/l/lock-0000000001", 9)));
        assert_eq!(rx.borrow().state, LockState::Granted { token: Zxid(9) });
        // A resume's re-confirmation counts but keeps the first token.
        assert!(reg.on_event(&event(
            WatchEventKind::LockGranted,
            "/l/lock-0000000001",
            12
        )));
        assert_eq!(rx.borrow().state.token(), Some(Zxid(9)));
        assert_eq!(rx.borrow().grant_events, 2);
        assert_eq!(reg.live_paths(), vec!["/l/lock-0000000001".to_string()]);
        assert!(reg.on_event(&event(
            WatchEventKind::NodeDeleted,
            "/l/lock-0000000001",
            13
        )));
        assert_eq!(rx.borrow().state, LockState::Deleted);
        assert!(rx.borrow().state.is_final());
        assert!(reg.live_paths().is_empty());
    }

    #[test]
    fn a_grant_in_the_reply_and_an_own_delete() {
        let mut reg = LockRegistry::default();
        let rx = reg.register("/a".into(), &stat(5, Some(5)));
        assert_eq!(rx.borrow().state.token(), Some(Zxid(5)));
        assert_eq!(rx.borrow().grant_events, 0);
        // A delete guarded by another czxid was not of this node.
        reg.on_own_delete("/a", Some(Zxid(4)), LockState::Released);
        assert_eq!(reg.len(), 1);
        reg.on_own_delete("/a", Some(Zxid(5)), LockState::Released);
        assert_eq!(rx.borrow().state, LockState::Released);
        assert_eq!(reg.len(), 0);
    }

    #[test]
    fn dropped_subscribers_are_not_re_registered_and_failures_reach_the_rest() {
        let mut reg = LockRegistry::default();
        drop(reg.register("/a".into(), &stat(1, None)));
        let b = reg.register("/b".into(), &stat(2, None));
        let c = reg.register("/c".into(), &stat(3, Some(3)));
        assert_eq!(reg.live_paths(), vec!["/b".to_string(), "/c".to_string()]);
        reg.fail_paths(&["/b".into()], &ClientError::Closed);
        assert_eq!(b.borrow().state, LockState::Failed(ClientError::Closed));
        reg.fail_all(&ClientError::SessionExpired);
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
    fn a_dropped_owner_hands_its_node_to_the_session_task() {
        let orphans = Arc::new(Orphans::default());
        drop(NodeOwner::new("/a".into(), Zxid(3), orphans.clone()));
        let mut kept = NodeOwner::new("/b".into(), Zxid(4), orphans.clone());
        kept.disarm();
        drop(kept);
        assert_eq!(orphans.take(), vec![("/a".to_string(), Zxid(3))]);
        orphans.close();
        drop(NodeOwner::new("/c".into(), Zxid(5), orphans.clone()));
        assert!(orphans.take().is_empty());
    }
}

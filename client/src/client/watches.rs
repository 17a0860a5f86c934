//! One-shot watches: the future a caller awaits, and the subscription the
//! session routes its event to.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use crate::error::ClientError;
use crate::protocol::{Op, OpResult, WatchEvent, WatchKind};
use crate::session::subscriptions::Subscriber;
use crate::session::Install;

pub(crate) type WatchSender = oneshot::Sender<Result<WatchEvent, ClientError>>;

/// A one-shot watch set by [`Client::get_watch`](crate::Client::get_watch),
/// [`Client::exists_watch`](crate::Client::exists_watch) or
/// [`Client::children_watch`](crate::Client::children_watch).
///
/// Resolves once, with the first event on the watched node after the read
/// that set it; events are never lost across a reconnect (the client
/// re-registers its watches when it resumes the session, and the server fires
/// at once those whose node changed in the gap). Resolves to
/// `Err(SessionExpired)` if the session expires first, and to `Err(Closed)`
/// once the client is closed or every `Client` handle is dropped.
///
/// # Cancel safety
/// Dropping a `Watch` only drops interest in it: the client forgets it at the
/// latest when another watch is registered or fires.
#[derive(Debug)]
#[must_use = "a watch does nothing unless awaited"]
pub struct Watch {
    path: String,
    kind: WatchKind,
    rx: oneshot::Receiver<Result<WatchEvent, ClientError>>,
}

impl Watch {
    pub(crate) fn new(path: String, kind: WatchKind) -> (WatchSender, Watch) {
        let (tx, rx) = oneshot::channel();
        (tx, Watch { path, kind, rx })
    }

    /// The watched node's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The kind of watch: `Data` for a node that existed when read, `Exist`
    /// for one that did not, `Child` for a children listing.
    pub fn kind(&self) -> WatchKind {
        self.kind
    }

    pub(crate) fn set_kind(&mut self, kind: WatchKind) {
        self.kind = kind;
    }
}

impl Future for Watch {
    type Output = Result<WatchEvent, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The registry always sends before it lets go of a sender, so a bare
        // drop only happens when the client task is gone.
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ClientError::Closed)))
    }
}

/// A one-shot watch as the session follows it: the first event ends it.
#[derive(Debug)]
struct WatchSub(Option<WatchSender>);

impl Subscriber for WatchSub {
    fn on_event(&mut self, event: &WatchEvent) -> bool {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Ok(event.clone()));
        }
        false
    }

    fn fail(mut self: Box<Self>, err: &ClientError) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Err(err.clone()));
        }
    }

    fn is_abandoned(&self) -> bool {
        self.0.as_ref().is_none_or(|tx| tx.is_closed())
    }
}

/// Installs the watch a successful watching read sets, keyed by what the
/// read found. A result that does not match the read drops `tx`: the caller
/// reports the reply as a protocol error and never hands out the watch.
pub(crate) fn install(op: &Op, result: &OpResult, tx: WatchSender, install: &mut Install<'_>) {
    let key = match (op, result) {
        (Op::Get { path, .. }, OpResult::Data { .. }) => Some((path, WatchKind::Data)),
        (Op::Exists { path, .. }, OpResult::Exists { stat: Some(_) }) => {
            Some((path, WatchKind::Data))
        }
        (Op::Exists { path, .. }, OpResult::Exists { stat: None }) => {
            Some((path, WatchKind::Exist))
        }
        (Op::Children { path, .. }, OpResult::Children { .. }) => Some((path, WatchKind::Child)),
        _ => None,
    };
    if let Some((path, kind)) = key {
        install.add(path.clone(), kind, Box::new(WatchSub(Some(tx))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{WatchEventKind, Zxid};
    use crate::session::subscriptions::{Subscriptions, FULL_PRUNE_AT_MIN};

    fn sub(tx: WatchSender) -> Box<dyn Subscriber> {
        Box::new(WatchSub(Some(tx)))
    }

    fn event(kind: WatchEventKind, path: &str) -> WatchEvent {
        WatchEvent {
            kind,
            path: path.into(),
            zxid: Zxid(7),
        }
    }

    #[tokio::test]
    async fn events_fire_the_right_kinds_once() {
        let mut reg = Subscriptions::default();
        let (tx_data, w_data) = Watch::new("/a".into(), WatchKind::Data);
        let (tx_child, w_child) = Watch::new("/a".into(), WatchKind::Child);
        let (tx_exist, w_exist) = Watch::new("/b".into(), WatchKind::Exist);
        let (tx_data2, w_data2) = Watch::new("/a".into(), WatchKind::Data);
        reg.add("/a".into(), WatchKind::Data, sub(tx_data));
        reg.add("/a".into(), WatchKind::Child, sub(tx_child));
        reg.add("/b".into(), WatchKind::Exist, sub(tx_exist));
        reg.add("/a".into(), WatchKind::Data, sub(tx_data2));

        // A created event on /a fires no data or child watch.
        assert_eq!(reg.fire(&event(WatchEventKind::NodeCreated, "/a")), 0);
        assert_eq!(reg.fire(&event(WatchEventKind::NodeCreated, "/b")), 1);
        assert_eq!(w_exist.await.unwrap().kind, WatchEventKind::NodeCreated);
        // A delete fires data and child watches, every waiter of each.
        assert_eq!(reg.fire(&event(WatchEventKind::NodeDeleted, "/a")), 3);
        assert_eq!(w_data.await.unwrap().path, "/a");
        assert_eq!(w_data2.await.unwrap().path, "/a");
        assert_eq!(w_child.await.unwrap().kind, WatchEventKind::NodeDeleted);
        // One-shot: nothing is left.
        assert_eq!(reg.fire(&event(WatchEventKind::NodeDeleted, "/a")), 0);
        assert_eq!(reg.count(), 0);
    }

    #[tokio::test]
    async fn data_change_fires_data_only_and_children_change_child_only() {
        let mut reg = Subscriptions::default();
        let (tx_data, w_data) = Watch::new("/a".into(), WatchKind::Data);
        let (tx_child, w_child) = Watch::new("/a".into(), WatchKind::Child);
        reg.add("/a".into(), WatchKind::Data, sub(tx_data));
        reg.add("/a".into(), WatchKind::Child, sub(tx_child));
        assert_eq!(reg.fire(&event(WatchEventKind::NodeDataChanged, "/a")), 1);
        assert_eq!(w_data.await.unwrap().kind, WatchEventKind::NodeDataChanged);
        assert_eq!(
            reg.fire(&event(WatchEventKind::NodeChildrenChanged, "/a")),
            1
        );
        assert_eq!(
            w_child.await.unwrap().kind,
            WatchEventKind::NodeChildrenChanged
        );
    }

    #[test]
    fn dropped_watches_are_pruned() {
        let mut reg = Subscriptions::default();
        for i in 0..1000 {
            let (tx, w) = Watch::new(format!("/n{i}"), WatchKind::Data);
            reg.add(format!("/n{i}"), WatchKind::Data, sub(tx));
            drop(w);
        }
        // Full prunes keep the map within twice the live count (or the floor).
        assert!(reg.count() <= 2 * FULL_PRUNE_AT_MIN, "{}", reg.count());
        assert!(reg.live_keys().is_empty());
        assert_eq!(reg.count(), 0);
    }

    #[tokio::test]
    async fn fail_all_reaches_every_waiter() {
        let mut reg = Subscriptions::default();
        let (tx, w) = Watch::new("/a".into(), WatchKind::Data);
        reg.add("/a".into(), WatchKind::Data, sub(tx));
        reg.fail_all(&ClientError::SessionExpired);
        assert_eq!(w.await, Err(ClientError::SessionExpired));
    }
}

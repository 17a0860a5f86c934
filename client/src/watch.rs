//! One-shot watches: the future a caller awaits, and the client's local
//! registry that routes server events to the waiting futures.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use crate::error::ClientError;
use crate::protocol::{limits, WatchEvent, WatchEventKind, WatchKind};

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

/// The watch kinds an event fires.
pub(crate) fn fired_kinds(kind: WatchEventKind) -> &'static [WatchKind] {
    match kind {
        WatchEventKind::NodeCreated => &[WatchKind::Exist],
        WatchEventKind::NodeDeleted => &[WatchKind::Data, WatchKind::Child, WatchKind::Lock],
        WatchEventKind::NodeDataChanged => &[WatchKind::Data],
        WatchEventKind::NodeChildrenChanged => &[WatchKind::Child],
        WatchEventKind::LockGranted => &[WatchKind::Lock],
    }
}

/// The client's registered watches, keyed by path and kind, several waiters
/// per key (the server holds one watch per key and session).
///
/// Waiters whose `Watch` was dropped are pruned: the key's own list on each
/// register and fire, and the whole map whenever it has doubled since the
/// last full prune, so the cost stays amortized O(1) per register.
#[derive(Debug)]
pub(crate) struct WatchRegistry {
    by_key: BTreeMap<(String, WatchKind), Vec<WatchSender>>,
    waiters: usize,
    full_prune_at: usize,
}

const FULL_PRUNE_AT_MIN: usize = 64;

impl Default for WatchRegistry {
    fn default() -> Self {
        WatchRegistry {
            by_key: BTreeMap::new(),
            waiters: 0,
            full_prune_at: FULL_PRUNE_AT_MIN,
        }
    }
}

impl WatchRegistry {
    pub(crate) fn register(&mut self, path: String, kind: WatchKind, tx: WatchSender) {
        if self.waiters >= self.full_prune_at {
            self.prune();
            self.full_prune_at = (self.waiters * 2).max(FULL_PRUNE_AT_MIN);
        }
        let list = self.by_key.entry((path, kind)).or_default();
        let before = list.len();
        list.retain(|tx| !tx.is_closed());
        self.waiters -= before - list.len();
        list.push(tx);
        self.waiters += 1;
    }

    /// Delivers `event` to every waiter it fires; returns how many got it.
    pub(crate) fn fire(&mut self, event: &WatchEvent) -> usize {
        let mut delivered = 0;
        for kind in fired_kinds(event.kind) {
            let key = (event.path.clone(), *kind);
            if let Some(list) = self.by_key.remove(&key) {
                self.waiters -= list.len();
                for tx in list {
                    if tx.send(Ok(event.clone())).is_ok() {
                        delivered += 1;
                    }
                }
            }
        }
        delivered
    }

    /// Fails the waiters of these keys (a re-registration the server refused).
    pub(crate) fn fail_keys(&mut self, keys: &[(String, WatchKind)], err: &ClientError) {
        for key in keys {
            if let Some(list) = self.by_key.remove(key) {
                self.waiters -= list.len();
                for tx in list {
                    let _ = tx.send(Err(err.clone()));
                }
            }
        }
    }

    pub(crate) fn fail_all(&mut self, err: &ClientError) {
        for (_, list) in std::mem::take(&mut self.by_key) {
            for tx in list {
                let _ = tx.send(Err(err.clone()));
            }
        }
        self.waiters = 0;
    }

    fn prune(&mut self) {
        self.by_key.retain(|_, list| {
            list.retain(|tx| !tx.is_closed());
            !list.is_empty()
        });
        self.waiters = self.by_key.values().map(Vec::len).sum();
    }

    /// Keys with a live waiter, in path order (pruning the rest): what a
    /// resuming client must re-register.
    pub(crate) fn live_keys(&mut self) -> Vec<(String, WatchKind)> {
        self.prune();
        self.by_key.keys().cloned().collect()
    }

    #[cfg(test)]
    pub(crate) fn waiters(&self) -> usize {
        self.waiters
    }
}

/// Splits watch keys into `SetWatches` batches of at most
/// [`limits::SET_WATCHES_PATHS_MAX`] paths each.
pub(crate) fn set_watches_batches(
    keys: &[(String, WatchKind)],
    last_zxid: crate::protocol::Zxid,
) -> Vec<crate::protocol::Op> {
    keys.chunks(limits::SET_WATCHES_PATHS_MAX)
        .map(|chunk| {
            let (mut data, mut exist, mut child, mut lock) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (path, kind) in chunk {
                match kind {
                    WatchKind::Data => data.push(path.clone()),
                    WatchKind::Exist => exist.push(path.clone()),
                    WatchKind::Child => child.push(path.clone()),
                    WatchKind::Lock => lock.push(path.clone()),
                }
            }
            crate::protocol::Op::SetWatches {
                last_zxid,
                data,
                exist,
                child,
                lock,
            }
        })
        .collect()
}

/// The keys a `SetWatches` op names.
pub(crate) fn set_watches_keys(op: &crate::protocol::Op) -> Vec<(String, WatchKind)> {
    match op {
        crate::protocol::Op::SetWatches {
            data,
            exist,
            child,
            lock,
            ..
        } => data
            .iter()
            .map(|p| (p.clone(), WatchKind::Data))
            .chain(exist.iter().map(|p| (p.clone(), WatchKind::Exist)))
            .chain(child.iter().map(|p| (p.clone(), WatchKind::Child)))
            .chain(lock.iter().map(|p| (p.clone(), WatchKind::Lock)))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Op, Zxid};

    fn event(kind: WatchEventKind, path: &str) -> WatchEvent {
        WatchEvent {
            kind,
            path: path.into(),
            zxid: Zxid(7),
        }
    }

    #[tokio::test]
    async fn events_fire_the_right_kinds_once() {
        let mut reg = WatchRegistry::default();
        let (tx_data, w_data) = Watch::new("/a".into(), WatchKind::Data);
        let (tx_child, w_child) = Watch::new("/a".into(), WatchKind::Child);
        let (tx_exist, w_exist) = Watch::new("/b".into(), WatchKind::Exist);
        let (tx_data2, w_data2) = Watch::new("/a".into(), WatchKind::Data);
        reg.register("/a".into(), WatchKind::Data, tx_data);
        reg.register("/a".into(), WatchKind::Child, tx_child);
        reg.register("/b".into(), WatchKind::Exist, tx_exist);
        reg.register("/a".into(), WatchKind::Data, tx_data2);

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
        assert_eq!(reg.waiters(), 0);
    }

    #[tokio::test]
    async fn data_change_fires_data_only_and_children_change_child_only() {
        let mut reg = WatchRegistry::default();
        let (tx_data, w_data) = Watch::new("/a".into(), WatchKind::Data);
        let (tx_child, w_child) = Watch::new("/a".into(), WatchKind::Child);
        reg.register("/a".into(), WatchKind::Data, tx_data);
        reg.register("/a".into(), WatchKind::Child, tx_child);
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
        let mut reg = WatchRegistry::default();
        for i in 0..1000 {
            let (tx, w) = Watch::new(format!("/n{i}"), WatchKind::Data);
            reg.register(format!("/n{i}"), WatchKind::Data, tx);
            drop(w);
        }
        // Full prunes keep the map within twice the live count (or the floor).
        assert!(reg.waiters() <= 2 * FULL_PRUNE_AT_MIN, "{}", reg.waiters());
        assert!(reg.live_keys().is_empty());
        assert_eq!(reg.waiters(), 0);
    }

    #[tokio::test]
    async fn fail_all_reaches_every_waiter() {
        let mut reg = WatchRegistry::default();
        let (tx, w) = Watch::new("/a".into(), WatchKind::Data);
        reg.register("/a".into(), WatchKind::Data, tx);
        reg.fail_all(&ClientError::SessionExpired);
        assert_eq!(w.await, Err(ClientError::SessionExpired));
    }

    #[test]
    fn set_watches_batches_respect_the_limit() {
        let keys: Vec<_> = (0..limits::SET_WATCHES_PATHS_MAX + 3)
            .map(|i| {
                let kind = [WatchKind::Data, WatchKind::Exist, WatchKind::Child][i % 3];
                (format!("/n{i}"), kind)
            })
            .collect();
        let batches = set_watches_batches(&keys, Zxid(9));
        assert_eq!(batches.len(), 2);
        let mut back = Vec::new();
        for op in &batches {
            let Op::SetWatches { last_zxid, .. } = op else {
                panic!("{op:?}")
            };
            assert_eq!(*last_zxid, Zxid(9));
            let names = set_watches_keys(op);
            assert!(names.len() <= limits::SET_WATCHES_PATHS_MAX);
            back.extend(names);
        }
        back.sort();
        let mut want = keys.clone();
        want.sort();
        assert_eq!(back, want);
    }
}

//! Subscriptions: what the session routes server events to, keyed by path
//! and watch kind. The layers above install them while a reply is handled
//! (so no event after the reply is missed): a one-shot watch ends with its
//! first event, a kept subscription (a lock node's) follows its node until
//! it is gone. The session re-registers every live key when it resumes and
//! ends every subscription when it ends; it knows nothing of what a
//! subscription stands for.

use std::collections::BTreeMap;

use crate::error::ClientError;
use crate::protocol::{limits, Op, WatchEvent, WatchEventKind, WatchKind, Zxid};

/// One follower of a key, driven by the session task. Its methods run on
/// that task and must not block.
pub(crate) trait Subscriber: Send + std::fmt::Debug {
    /// An event on the key. Returns whether the subscription stays.
    fn on_event(&mut self, event: &WatchEvent) -> bool;

    /// The node at the key is gone without an event: this session deleted
    /// it (`by_own_delete`, for which the server sends no event to the
    /// deleter), or learned from a refused delete or a newer node at the
    /// path that it no longer exists. `czxid` is the creation zxid the
    /// delete named, if any: a subscriber of another node at the path stays.
    /// Returns whether the subscription stays.
    fn on_gone(&mut self, _czxid: Option<Zxid>, _by_own_delete: bool) -> bool {
        true
    }

    /// The subscription ends without its event: the session ended, or the
    /// server refused to re-register the key after a resume.
    fn fail(self: Box<Self>, err: &ClientError);

    /// Nobody listens any more: the subscription is dropped, and its key is
    /// not re-registered on a resume.
    fn is_abandoned(&self) -> bool;
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

type Key = (String, WatchKind);

/// The session's subscriptions, several per key (the server holds one watch
/// per key and session).
///
/// Abandoned subscriptions are pruned: the key's own list on each
/// subscribe and event, and the whole map whenever it has doubled since the
/// last full prune, so the cost stays amortized O(1) per subscribe.
#[derive(Debug)]
pub(crate) struct Subscriptions {
    by_key: BTreeMap<Key, Vec<Box<dyn Subscriber>>>,
    count: usize,
    full_prune_at: usize,
}

pub(crate) const FULL_PRUNE_AT_MIN: usize = 64;

impl Default for Subscriptions {
    fn default() -> Self {
        Subscriptions {
            by_key: BTreeMap::new(),
            count: 0,
            full_prune_at: FULL_PRUNE_AT_MIN,
        }
    }
}

impl Subscriptions {
    /// Adds `sub` to the key's followers.
    pub(crate) fn add(&mut self, path: String, kind: WatchKind, sub: Box<dyn Subscriber>) {
        if self.count >= self.full_prune_at {
            self.prune();
            self.full_prune_at = (self.count * 2).max(FULL_PRUNE_AT_MIN);
        }
        let list = self.by_key.entry((path, kind)).or_default();
        let before = list.len();
        list.retain(|s| !s.is_abandoned());
        self.count -= before - list.len();
        list.push(sub);
        self.count += 1;
    }

    /// Adds `sub` as the one follower of a node just created at `path`:
    /// any earlier follower of the key followed a node that is gone, deleted
    /// without this client seeing it (its parent reaped and recreated).
    pub(crate) fn replace(&mut self, path: String, kind: WatchKind, sub: Box<dyn Subscriber>) {
        let key = (path, kind);
        if let Some(old) = self.by_key.remove(&key) {
            self.count -= old.len();
            for mut s in old {
                s.on_gone(None, false);
            }
        }
        self.add(key.0, key.1, sub);
    }

    /// Delivers `event` to every subscription it fires; returns how many
    /// took it.
    pub(crate) fn fire(&mut self, event: &WatchEvent) -> usize {
        let mut delivered = 0;
        let mut key = (event.path.clone(), WatchKind::Data);
        for kind in fired_kinds(event.kind) {
            key.1 = *kind;
            let Some(list) = self.by_key.get_mut(&key) else {
                continue;
            };
            let before = list.len();
            list.retain_mut(|s| {
                if s.is_abandoned() {
                    return false;
                }
                delivered += 1;
                s.on_event(event)
            });
            self.count -= before - list.len();
            if list.is_empty() {
                self.by_key.remove(&key);
            }
        }
        delivered
    }

    /// The node at `path` is gone without an event (see
    /// [`Subscriber::on_gone`]).
    pub(crate) fn gone(&mut self, path: &str, czxid: Option<Zxid>, by_own_delete: bool) {
        let mut key = (path.to_owned(), WatchKind::Data);
        for kind in [
            WatchKind::Data,
            WatchKind::Exist,
            WatchKind::Child,
            WatchKind::Lock,
        ] {
            key.1 = kind;
            let Some(list) = self.by_key.get_mut(&key) else {
                continue;
            };
            let before = list.len();
            list.retain_mut(|s| s.on_gone(czxid, by_own_delete));
            self.count -= before - list.len();
            if list.is_empty() {
                self.by_key.remove(&key);
            }
        }
    }

    /// Ends the subscriptions of these keys (a re-registration the server
    /// refused).
    pub(crate) fn fail_keys(&mut self, keys: &[Key], err: &ClientError) {
        for key in keys {
            if let Some(list) = self.by_key.remove(key) {
                self.count -= list.len();
                for s in list {
                    s.fail(err);
                }
            }
        }
    }

    /// Ends every subscription (the session ended).
    pub(crate) fn fail_all(&mut self, err: &ClientError) {
        for (_, list) in std::mem::take(&mut self.by_key) {
            for s in list {
                s.fail(err);
            }
        }
        self.count = 0;
    }

    fn prune(&mut self) {
        self.by_key.retain(|_, list| {
            list.retain(|s| !s.is_abandoned());
            !list.is_empty()
        });
        self.count = self.by_key.values().map(Vec::len).sum();
    }

    /// Keys with a live subscription, in path order (pruning the rest): what
    /// a resuming session must re-register.
    pub(crate) fn live_keys(&mut self) -> Vec<Key> {
        self.prune();
        self.by_key.keys().cloned().collect()
    }

    /// How many subscriptions are held, abandoned ones included until pruned.
    #[cfg(test)]
    pub(crate) fn count(&self) -> usize {
        self.count
    }
}

/// Splits keys into `SetWatches` batches of at most
/// [`limits::SET_WATCHES_PATHS_MAX`] paths each.
pub(crate) fn set_watches_batches(keys: &[Key], last_zxid: Zxid) -> Vec<Op> {
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
            Op::SetWatches {
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
pub(crate) fn set_watches_keys(op: &Op) -> Vec<Key> {
    match op {
        Op::SetWatches {
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

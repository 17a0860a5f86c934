//! The watch table: one-shot watches keyed by (path, kind), with a
//! per-session index so that a session's watches can be dropped at once.

use std::collections::{BTreeMap, BTreeSet};

use latchkey_client::protocol::{SessionId, WatchEvent, WatchEventKind, WatchKind, Zxid};

#[derive(Default)]
pub(crate) struct WatchTable {
    by_target: BTreeMap<(String, WatchKind), BTreeSet<SessionId>>,
    by_session: BTreeMap<SessionId, BTreeSet<(String, WatchKind)>>,
    /// How many watches all sessions hold, for `Config::watches_max`.
    total: usize,
}

impl WatchTable {
    pub(crate) fn holds(&self, session: SessionId, path: &str, kind: WatchKind) -> bool {
        self.by_session
            .get(&session)
            .is_some_and(|set| set.contains(&(path.to_owned(), kind)))
    }

    pub(crate) fn count(&self, session: SessionId) -> usize {
        self.by_session.get(&session).map_or(0, BTreeSet::len)
    }

    /// How many watches all sessions hold.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Registers a watch; a no-op if the session already holds it.
    pub(crate) fn add(&mut self, session: SessionId, path: &str, kind: WatchKind) {
        self.by_target
            .entry((path.to_owned(), kind))
            .or_default()
            .insert(session);
        let added = self
            .by_session
            .entry(session)
            .or_default()
            .insert((path.to_owned(), kind));
        if added {
            self.total = self.total.saturating_add(1);
        }
    }

    /// Fires the watches one change triggers: each `(path, watch kind,
    /// event kind)` trigger removes those watches and yields an event per
    /// watching session. Events go out in SessionId order; a session gets one
    /// event per distinct (kind, path) even if several of its watches fired.
    pub(crate) fn fire(
        &mut self,
        triggers: &[(&str, WatchKind, WatchEventKind)],
        zxid: Zxid,
    ) -> Vec<(SessionId, WatchEvent)> {
        let mut per_session: BTreeMap<SessionId, Vec<WatchEvent>> = BTreeMap::new();
        for &(path, watch_kind, event_kind) in triggers {
            let key = (path.to_owned(), watch_kind);
            let Some(sessions) = self.by_target.remove(&key) else {
                continue;
            };
            for session in sessions {
                self.total = self.total.saturating_sub(1);
                if let Some(set) = self.by_session.get_mut(&session) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.by_session.remove(&session);
                    }
                }
                let events = per_session.entry(session).or_default();
                if !events
                    .iter()
                    .any(|e| e.kind == event_kind && e.path == path)
                {
                    events.push(WatchEvent {
                        kind: event_kind,
                        path: path.to_owned(),
                        zxid,
                    });
                }
            }
        }
        per_session
            .into_iter()
            .flat_map(|(session, events)| events.into_iter().map(move |e| (session, e)))
            .collect()
    }

    /// Drops every watch the session holds.
    pub(crate) fn drop_session(&mut self, session: SessionId) {
        let Some(keys) = self.by_session.remove(&session) else {
            return;
        };
        self.total = self.total.saturating_sub(keys.len());
        for key in keys {
            if let Some(set) = self.by_target.get_mut(&key) {
                set.remove(&session);
                if set.is_empty() {
                    self.by_target.remove(&key);
                }
            }
        }
    }

    /// All watches as (path, kind, session), in (path, kind) order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, WatchKind, SessionId)> {
        self.by_target.iter().flat_map(|((path, kind), sessions)| {
            sessions.iter().map(move |s| (path.as_str(), *kind, *s))
        })
    }

    /// Checks that the two indexes agree and hold no empty sets.
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut forward = 0usize;
        for ((path, kind), sessions) in &self.by_target {
            if sessions.is_empty() {
                return Err(format!("empty watcher set for {kind:?} on {path}"));
            }
            for session in sessions {
                forward += 1;
                if !self.holds(*session, path, *kind) {
                    return Err(format!(
                        "{kind:?} watch on {path} by {session} is missing from the session index"
                    ));
                }
            }
        }
        let backward: usize = self.by_session.values().map(BTreeSet::len).sum();
        if forward != backward || self.by_session.values().any(BTreeSet::is_empty) {
            return Err(format!(
                "watch indexes disagree: {forward} by target, {backward} by session"
            ));
        }
        if forward != self.total {
            return Err(format!(
                "the watch total is {} but the table holds {forward}",
                self.total
            ));
        }
        Ok(())
    }
}

//! A Jepsen-style history of lock holders and a fenced resource, and a
//! checker over it.
//!
//! Clients record what they saw (acquired, wrote, released, lost) and the
//! fault injector records what it did; every event gets a global sequence
//! number under one mutex, so "before" in the history is a real-time order.
//! The fenced resource lives behind the same mutex: a write and its event are
//! one step.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;

use tokio::sync::watch;

/// One recorded step.
#[derive(Clone, Debug)]
pub enum Event {
    /// `acquire` returned a guard: hold `hold` of `lock` by the client in
    /// `slot` with session `session`.
    Acquired {
        hold: u64,
        slot: usize,
        session: u64,
        lock: usize,
        token: u64,
    },
    /// A write to `lock`'s fenced resource with `token`, and its fate.
    Write {
        hold: u64,
        lock: usize,
        token: u64,
        accepted: bool,
    },
    /// `lost()` fired for the hold.
    Lost { hold: u64, reason: String },
    /// The holder is about to send its release: its hold ends here.
    /// `in_doubt`: a fault touched the client's connection between the
    /// start of the acquire and now, or `lost()` fired.
    Releasing { hold: u64, in_doubt: bool },
    /// The release's outcome.
    Released { hold: u64, ok: bool },
    /// A fault on `slot`'s connection began (`start`) or ended.
    Fault {
        slot: usize,
        kind: &'static str,
        start: bool,
    },
    /// The client in `slot` was dropped without closing; its open hold, if
    /// any, never ends in this history.
    Crashed { slot: usize },
    /// Every fault was healed.
    Healed,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub seq: u64,
    pub event: Event,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{:<6} {:?}", self.seq, self.event)
    }
}

#[derive(Default)]
struct Resource {
    highest: u64,
}

struct Inner {
    entries: Vec<Entry>,
    resources: HashMap<usize, Resource>,
    next_hold: u64,
}

/// The shared history, and the fenced resources (one per lock).
pub struct History {
    inner: Mutex<Inner>,
    /// The number of entries so far, for waiting on progress.
    progress: watch::Sender<u64>,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

impl History {
    pub fn new() -> History {
        History {
            inner: Mutex::new(Inner {
                entries: Vec::new(),
                resources: HashMap::new(),
                next_hold: 0,
            }),
            progress: watch::channel(0).0,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = f(&mut inner);
        let len = inner.entries.len() as u64;
        drop(inner);
        self.progress.send_replace(len);
        result
    }

    fn push(inner: &mut Inner, event: Event) -> u64 {
        let seq = inner.entries.len() as u64;
        inner.entries.push(Entry { seq, event });
        seq
    }

    /// Records an event; returns its sequence number.
    pub fn record(&self, event: Event) -> u64 {
        self.with(|inner| History::push(inner, event))
    }

    /// Records an acquisition and returns the new hold's id.
    pub fn acquired(&self, slot: usize, session: u64, lock: usize, token: u64) -> u64 {
        self.with(|inner| {
            let hold = inner.next_hold;
            inner.next_hold += 1;
            History::push(
                inner,
                Event::Acquired {
                    hold,
                    slot,
                    session,
                    lock,
                    token,
                },
            );
            hold
        })
    }

    /// A write to `lock`'s fenced resource: accepted only if `token` is at
    /// least the highest token it has seen.
    pub fn write(&self, hold: u64, lock: usize, token: u64) -> bool {
        self.with(|inner| {
            let resource = inner.resources.entry(lock).or_default();
            let accepted = token >= resource.highest;
            if accepted {
                resource.highest = token;
            }
            History::push(
                inner,
                Event::Write {
                    hold,
                    lock,
                    token,
                    accepted,
                },
            );
            accepted
        })
    }

    pub fn len(&self) -> u64 {
        self.with(|inner| inner.entries.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A receiver that changes with every new entry.
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// The slots with an acquisition after sequence number `after`.
    pub fn slots_acquired_after(&self, after: u64) -> Vec<usize> {
        self.with(|inner| {
            let mut slots: Vec<usize> = inner
                .entries
                .iter()
                .filter(|e| e.seq > after)
                .filter_map(|e| match e.event {
                    Event::Acquired { slot, .. } => Some(slot),
                    _ => None,
                })
                .collect();
            slots.sort_unstable();
            slots.dedup();
            slots
        })
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.with(|inner| inner.entries.clone())
    }
}

/// What the checker counted.
#[derive(Debug, Default)]
pub struct Counts {
    pub acquisitions: u64,
    pub holds_in_doubt: u64,
    pub writes_accepted: u64,
    pub writes_refused: u64,
    pub lost: u64,
    pub releases_ok: u64,
    pub releases_failed: u64,
    pub crashes: u64,
    pub faults: BTreeMap<&'static str, u64>,
}

/// One broken rule, with the entries that show it.
#[derive(Debug)]
pub struct Violation {
    pub rule: &'static str,
    pub detail: String,
    pub evidence: Vec<Entry>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {}", self.rule, self.detail)?;
        for entry in &self.evidence {
            writeln!(f, "    {entry}")?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Hold {
    slot: usize,
    session: u64,
    lock: usize,
    token: u64,
    acquired: Entry,
    releasing: Option<Entry>,
    in_doubt: bool,
    lost: bool,
    crashed: bool,
    /// Where the holder stopped believing it held: its release, the first
    /// report of its loss, or its crash.
    told: Option<Entry>,
}

impl Hold {
    /// Whether the session was never in doubt during the hold (so it must
    /// have been the only holder).
    fn clean(&self) -> bool {
        !self.in_doubt && !self.lost && !self.crashed && self.releasing.is_some()
    }

    /// The sequence number where the hold ended (or the end of time).
    fn end(&self) -> u64 {
        self.releasing.as_ref().map_or(u64::MAX, |e| e.seq)
    }

    /// The sequence number where the holder stopped believing it held (or
    /// the end of time).
    fn told_at(&self) -> u64 {
        self.told.as_ref().map_or(u64::MAX, |e| e.seq)
    }

    fn tell(&mut self, entry: &Entry) {
        if self.told.is_none() {
            self.told = Some(entry.clone());
        }
    }
}

/// Checks the safety rules over a finished history; returns the counts and
/// every violation found.
pub fn check(entries: &[Entry]) -> (Counts, Vec<Violation>) {
    let mut counts = Counts::default();
    let mut violations = Vec::new();
    let mut holds: BTreeMap<u64, Hold> = BTreeMap::new();
    let mut open_by_slot: HashMap<usize, Vec<u64>> = HashMap::new();
    // Per lock: the highest accepted token and the write that set it.
    let mut newest_write: HashMap<usize, Entry> = HashMap::new();
    // Per lock: the last acquisition.
    let mut last_acquired: HashMap<usize, Entry> = HashMap::new();
    // Token -> first acquisition with it.
    let mut tokens: HashMap<u64, Entry> = HashMap::new();

    for entry in entries {
        match &entry.event {
            Event::Acquired {
                hold,
                slot,
                session,
                lock,
                token,
            } => {
                counts.acquisitions += 1;
                if let Some(first) = tokens.get(token) {
                    violations.push(Violation {
                        rule: "token repeated",
                        detail: format!("token {token} granted to two acquisitions"),
                        evidence: vec![first.clone(), entry.clone()],
                    });
                } else {
                    tokens.insert(*token, entry.clone());
                }
                if let Some(previous) = last_acquired.get(lock) {
                    if let Event::Acquired {
                        token: previous_token,
                        ..
                    } = previous.event
                    {
                        if previous_token >= *token {
                            violations.push(Violation {
                                rule: "token did not rise",
                                detail: format!(
                                    "lock {lock}: token {token} acquired after {previous_token}"
                                ),
                                evidence: vec![previous.clone(), entry.clone()],
                            });
                        }
                    }
                }
                last_acquired.insert(*lock, entry.clone());
                holds.insert(
                    *hold,
                    Hold {
                        slot: *slot,
                        session: *session,
                        lock: *lock,
                        token: *token,
                        acquired: entry.clone(),
                        releasing: None,
                        in_doubt: false,
                        lost: false,
                        crashed: false,
                        told: None,
                    },
                );
                open_by_slot.entry(*slot).or_default().push(*hold);
            }
            Event::Write {
                lock,
                token,
                accepted,
                hold,
            } => {
                if *accepted {
                    counts.writes_accepted += 1;
                    if let Some(newest) = newest_write.get(lock) {
                        if let Event::Write {
                            token: newest_token,
                            hold: newest_hold,
                            ..
                        } = newest.event
                        {
                            if newest_token > *token
                                || (newest_token == *token && newest_hold != *hold)
                            {
                                violations.push(Violation {
                                    rule: "stale write accepted",
                                    detail: format!(
                                        "lock {lock}: token {token} accepted after token \
                                         {newest_token} had written"
                                    ),
                                    evidence: vec![newest.clone(), entry.clone()],
                                });
                            }
                        }
                    }
                    let newer = match newest_write.get(lock) {
                        Some(Entry {
                            event: Event::Write { token: t, .. },
                            ..
                        }) => *t <= *token,
                        _ => true,
                    };
                    if newer {
                        newest_write.insert(*lock, entry.clone());
                    }
                } else {
                    counts.writes_refused += 1;
                }
            }
            Event::Lost { hold, .. } => {
                counts.lost += 1;
                // A loss after the hold ended does not put it in doubt.
                if let Some(h) = holds.get_mut(hold).filter(|h| h.releasing.is_none()) {
                    h.lost = true;
                    h.tell(entry);
                }
            }
            Event::Releasing { hold, in_doubt } => {
                if let Some(h) = holds.get_mut(hold) {
                    h.releasing = Some(entry.clone());
                    h.tell(entry);
                    h.in_doubt |= *in_doubt;
                    if let Some(open) = open_by_slot.get_mut(&h.slot) {
                        open.retain(|o| o != hold);
                    }
                }
            }
            Event::Released { ok, .. } => {
                if *ok {
                    counts.releases_ok += 1;
                } else {
                    counts.releases_failed += 1;
                }
            }
            Event::Fault { kind, start, .. } => {
                if *start {
                    *counts.faults.entry(kind).or_default() += 1;
                }
            }
            Event::Crashed { slot } => {
                counts.crashes += 1;
                for hold in open_by_slot.remove(slot).unwrap_or_default() {
                    if let Some(h) = holds.get_mut(&hold) {
                        h.crashed = true;
                        h.tell(entry);
                    }
                }
            }
            Event::Healed => {}
        }
    }

    // A clean hold whose own write was refused was overlapped by a newer
    // holder that wrote.
    for entry in entries {
        if let Event::Write {
            hold,
            accepted: false,
            ..
        } = entry.event
        {
            if let Some(h) = holds.get(&hold) {
                if h.clean() {
                    violations.push(Violation {
                        rule: "clean holder refused",
                        detail: format!(
                            "hold {hold} (session {}, never in doubt) was refused: a newer \
                             holder wrote during its hold",
                            h.session
                        ),
                        evidence: vec![h.acquired.clone(), entry.clone()],
                    });
                }
            }
        }
    }

    counts.holds_in_doubt = holds.values().filter(|h| !h.clean()).count() as u64;

    // No lock is granted while an earlier holder of it may still act as
    // one: every holder is told of a loss (by its lease estimate, if by
    // nothing else) before the server can give the lock to anyone else,
    // across server restarts too. For exclusive locks only, which is all
    // this history records: shared holders may overlap.
    let mut all_by_lock: HashMap<usize, Vec<&Hold>> = HashMap::new();
    for hold in holds.values() {
        all_by_lock.entry(hold.lock).or_default().push(hold);
    }
    for (lock, mut of_lock) in all_by_lock {
        of_lock.sort_by_key(|h| h.acquired.seq);
        // Bounded by the holds of this lock: each is an earlier one at most
        // once per later acquisition, and only while it believes it holds.
        let mut believing: Vec<&Hold> = Vec::new();
        for b in of_lock {
            believing.retain(|a| a.told_at() > b.acquired.seq);
            if let Some(a) = believing.first() {
                let mut evidence = vec![a.acquired.clone(), b.acquired.clone()];
                evidence.extend(a.told.clone());
                evidence.sort_by_key(|e| e.seq);
                violations.push(Violation {
                    rule: "granted before the holder was told",
                    detail: format!(
                        "lock {lock}: session {} got token {} while session {} (token {}) \
                         had not been told its hold was over",
                        b.session, b.token, a.session, a.token
                    ),
                    evidence,
                });
            }
            believing.push(b);
        }
    }

    // Two clean holds of one lock must not overlap.
    let mut by_lock: HashMap<usize, Vec<&Hold>> = HashMap::new();
    for hold in holds.values().filter(|h| h.clean()) {
        by_lock.entry(hold.lock).or_default().push(hold);
    }
    for (lock, mut clean) in by_lock {
        clean.sort_by_key(|h| h.acquired.seq);
        for pair in clean.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if b.acquired.seq < a.end() {
                let mut evidence = vec![a.acquired.clone(), b.acquired.clone()];
                evidence.extend(a.releasing.clone());
                evidence.extend(b.releasing.clone());
                evidence.sort_by_key(|e| e.seq);
                violations.push(Violation {
                    rule: "clean holders overlapped",
                    detail: format!(
                        "lock {lock}: session {} (token {}) and session {} (token {}) held at \
                         once, neither in doubt",
                        a.session, a.token, b.session, b.token
                    ),
                    evidence,
                });
            }
        }
    }
    (counts, violations)
}

/// The entries around `seq`, for a failure message.
pub fn excerpt(entries: &[Entry], seq: u64, radius: u64) -> String {
    entries
        .iter()
        .filter(|e| e.seq + radius >= seq && e.seq <= seq + radius)
        .map(|e| format!("    {e}\n"))
        .collect()
}

#[test]
fn the_checker_sees_each_broken_rule() {
    let history = History::new();
    // Clean holds 0 and 1 of lock 0 overlap, and 1's token repeats 0's.
    let h0 = history.acquired(0, 10, 0, 5);
    assert!(history.write(h0, 0, 5));
    let h1 = history.acquired(1, 11, 0, 5);
    history.record(Event::Releasing {
        hold: h0,
        in_doubt: false,
    });
    history.record(Event::Releasing {
        hold: h1,
        in_doubt: false,
    });
    // A token that goes down on lock 1, and a stale write accepted by hand.
    let h2 = history.acquired(2, 12, 1, 9);
    let h3 = history.acquired(3, 13, 1, 8);
    assert!(history.write(h2, 1, 9));
    assert!(!history.write(h3, 1, 8));
    let mut entries = history.entries();
    let seq = entries.len() as u64;
    entries.push(Entry {
        seq,
        event: Event::Write {
            hold: h3,
            lock: 1,
            token: 8,
            accepted: true,
        },
    });
    let (counts, violations) = check(&entries);
    let rules: Vec<&str> = violations.iter().map(|v| v.rule).collect();
    for rule in [
        "token repeated",
        "token did not rise",
        "clean holders overlapped",
        "stale write accepted",
    ] {
        assert!(rules.contains(&rule), "{rule} not found in {rules:?}");
    }
    assert_eq!(counts.acquisitions, 4);
    assert_eq!(counts.writes_refused, 1);

    assert!(
        rules.contains(&"granted before the holder was told"),
        "{rules:?}"
    );

    // The same overlap with one hold in doubt is fine, once the first
    // holder has been told of its loss.
    let history = History::new();
    let a = history.acquired(0, 10, 0, 5);
    history.record(Event::Lost {
        hold: a,
        reason: "LeaseEnded".into(),
    });
    let b = history.acquired(1, 11, 0, 6);
    assert!(history.write(b, 0, 6));
    assert!(!history.write(a, 0, 5));
    history.record(Event::Releasing {
        hold: a,
        in_doubt: true,
    });
    history.record(Event::Releasing {
        hold: b,
        in_doubt: false,
    });
    let (counts, violations) = check(&history.entries());
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(counts.holds_in_doubt, 1);
}

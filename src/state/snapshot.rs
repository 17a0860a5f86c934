//! Snapshots: the coordinator's replicated state as bytes, and back.
//!
//! A snapshot is one format byte, then the state's image in postcard, a
//! compact binary serde encoding with a written, stable wire format
//! (chosen over JSON, which repeats every field name for each node, and
//! over bincode, whose 2.x and 3.x lines changed hands and format). The
//! image holds what the commands made and nothing a process chose: nodes
//! in path order, sessions in id order, nodes named by czxid rather than
//! by slab key. So two coordinators that applied the same log give the
//! same bytes, whatever their build or history of allocations, and a
//! restored coordinator answers every later command as the original would.
//!
//! Left out, because they are rebuilt: every index (path, TTL deadlines,
//! lock queues, zombies, session deadlines, reply cache totals), each
//! node's child set, the set of ending sessions. Left out, because they
//! are the server's and not replicated: watches.

use std::sync::atomic::AtomicU64;

use latchkey_client::protocol::Zxid;

use super::sessions::{SessionImage, Sessions};
use super::tree::{NodeImage, Tree};
use super::watches::WatchTable;
use super::{Config, Coordinator, WatchKind};

/// The snapshot format this build writes and reads. A change to the image
/// (a field, a variant, an order) is a new format.
pub const SNAPSHOT_FORMAT: u8 = 1;

/// The state's image, format 1.
#[derive(serde::Serialize, serde::Deserialize)]
struct Image<'a> {
    config: Config,
    configured: bool,
    zxid: Zxid,
    now_ms: u64,
    grants_paused_until_ms: Option<u64>,
    lease_horizon_ms: u64,
    nodes: Vec<NodeImage<'a>>,
    sessions: Vec<SessionImage>,
}

/// Why a snapshot is refused, and what to do.
fn damaged(what: &str) -> String {
    format!(
        "the snapshot is damaged ({what}); restore the data folder from a backup, or move the \
         whole folder away to start empty"
    )
}

impl Coordinator {
    /// The replicated state as bytes (see the module doc): the same for
    /// any two coordinators that applied the same commands at the same
    /// times. Watches are not in it.
    ///
    /// # Errors
    /// Only if a cached reply does not encode, which no reply the
    /// coordinator makes does.
    pub fn snapshot(&self) -> Result<Vec<u8>, String> {
        let image = Image {
            config: self.config.clone(),
            configured: self.configured,
            zxid: self.zxid,
            now_ms: self.now_ms,
            grants_paused_until_ms: self.grants_paused_until_ms,
            lease_horizon_ms: self.lease_horizon_ms,
            nodes: self.tree.image(),
            sessions: self.sessions.image()?,
        };
        let mut bytes = vec![SNAPSHOT_FORMAT];
        postcard::to_io(&image, &mut bytes).map_err(|e| format!("cannot encode: {e}"))?;
        Ok(bytes)
    }

    /// A coordinator holding the state `bytes` were made from by
    /// [`Coordinator::snapshot`], with no watches. It is checked whole
    /// ([`Coordinator::check_invariants`]) before it is returned.
    ///
    /// # Errors
    /// What is wrong with `bytes`: another format, not an image, or an
    /// image of no state the coordinator can reach.
    pub fn restore(bytes: &[u8]) -> Result<Coordinator, String> {
        let body = match bytes.split_first() {
            Some((&SNAPSHOT_FORMAT, body)) => body,
            Some((&format, _)) if format > SNAPSHOT_FORMAT => {
                return Err(format!(
                    "snapshot format {format} is newer than this build's {SNAPSHOT_FORMAT}; \
                     run a newer latchkey"
                ))
            }
            Some((&format, _)) => return Err(damaged(&format!("unknown format {format}"))),
            None => return Err(damaged("it is empty")),
        };
        let image: Image<'static> =
            postcard::from_bytes(body).map_err(|e| damaged(&format!("it does not decode: {e}")))?;
        let (tree, keys) = Tree::from_image(image.nodes).map_err(|e| damaged(&e))?;
        let sessions = Sessions::from_image(image.sessions, &keys).map_err(|e| damaged(&e))?;
        let ending = sessions
            .iter()
            .filter(|(_, s)| s.ending.is_some())
            .map(|(&id, _)| id)
            .collect();
        let coordinator = Coordinator {
            config: image.config,
            tree,
            sessions,
            watches: WatchTable::default(),
            ending,
            zxid: image.zxid,
            grants_paused_until_ms: image.grants_paused_until_ms,
            lease_horizon_ms: image.lease_horizon_ms,
            now_ms: image.now_ms,
            configured: image.configured,
            zxid_checked: AtomicU64::new(image.zxid.0),
            #[cfg(test)]
            deadlock_steps: AtomicU64::new(0),
        };
        coordinator
            .check_invariants()
            .map_err(|e| damaged(&format!("it holds no reachable state: {e}")))?;
        Ok(coordinator)
    }

    /// Replaces the replicated state with the one `bytes` hold, keeping
    /// the watches that still mean what they meant: those of sessions
    /// alive in the new state, on nodes whose presence did not change.
    /// The others are dropped without an event (a client learns of what it
    /// missed by reading when it re-registers them). On an error nothing
    /// changes.
    ///
    /// # Errors
    /// As [`Coordinator::restore`].
    pub fn install(&mut self, bytes: &[u8]) -> Result<(), String> {
        let mut restored = Coordinator::restore(bytes)?;
        let mut watches = WatchTable::default();
        for (path, kind, session) in self.watches.iter() {
            let present = restored.tree.get(path).is_some();
            let holds = match kind {
                WatchKind::Data | WatchKind::Child => present,
                WatchKind::Exist => !present,
                WatchKind::Lock => false,
            };
            if holds && restored.sessions.alive(session) {
                watches.add(session, path, kind);
            }
        }
        restored.watches = watches;
        *self = restored;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use latchkey_client::protocol::{Create, LockMode, LockSpec, NodeKind};

    use super::super::tests::{kind, mk, Harness};
    use super::*;

    /// A small state touching every part of the image: persistent, TTL,
    /// ephemeral and container nodes, a granted lock node and a waiting
    /// one, cached replies, two sessions. No cached error: its message is
    /// prose, which may change without a new format.
    fn small_state() -> Harness {
        let mut h = Harness::new();
        let a = h.open();
        let b = h.open();
        h.create(a, "/config");
        h.create_with(
            a,
            Create {
                ttl_ms: Some(60_000),
                ..mk("/hold")
            },
        );
        h.create_with(b, kind("/b-was-here", NodeKind::Ephemeral));
        h.create_with(a, kind("/locks", NodeKind::Container));
        for session in [a, b] {
            h.create_with(
                session,
                Create {
                    sequential: true,
                    lock: Some(LockSpec {
                        mode: LockMode::Exclusive,
                        delay_ms: None,
                    }),
                    ..kind("/locks/l-", NodeKind::Ephemeral)
                },
            );
        }
        h
    }

    /// The bytes of format 1 for `small_state`. A change to the image (a
    /// field, a variant, their order, in the image or in the protocol or
    /// state types it holds) changes them: it is then a new format, to be
    /// written with a new `SNAPSHOT_FORMAT`, and format 1 must still be
    /// read (or refused as what it is). Only then is this constant
    /// replaced.
    const FORMAT_1: &str = include_str!("snapshot_format_1.hex");

    #[test]
    fn format_1_is_pinned() {
        let bytes = small_state().c.snapshot().expect("encodes");
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            FORMAT_1.trim(),
            "the snapshot format changed: see FORMAT_1"
        );
        let restored = Coordinator::restore(&bytes).expect("restores");
        assert_eq!(restored.snapshot().expect("encodes"), bytes);
    }

    #[test]
    fn damage_and_newer_formats_are_refused_with_what_to_do() {
        let bytes = small_state().c.snapshot().expect("encodes");
        let mut newer = bytes.clone();
        newer[0] = SNAPSHOT_FORMAT + 1;
        let e = Coordinator::restore(&newer).err().expect("refused");
        assert!(
            e.contains("newer") && e.contains("run a newer latchkey"),
            "{e}"
        );
        assert!(!e.contains("move the whole folder away"), "{e}");
        for cut in [1, bytes.len() / 2, bytes.len() - 1] {
            let e = Coordinator::restore(&bytes[..cut]).err().expect("refused");
            assert!(
                e.contains("damaged") && e.contains("restore the data folder"),
                "{e}"
            );
        }
        assert!(Coordinator::restore(&[]).is_err());
    }
}

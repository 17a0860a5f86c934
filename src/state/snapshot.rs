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

use latchkey_client::protocol::{OpResult, Zxid};

use super::sessions::{SessionImage, Sessions};
use super::tree::{NodeImage, Tree};
use super::watches::WatchTable;
use super::{Config, Coordinator, Refusal, WatchKind};

/// The snapshot format this build writes. A change to the image (a field,
/// a variant, an order) is a new format. This build also reads format 1,
/// whose image differs only in its cached refusals: the error replies
/// their clients got (prose of the build that wrote them) rather than a
/// [`super::Refusal`].
pub const SNAPSHOT_FORMAT: u8 = 2;

/// The oldest snapshot format this build reads.
const SNAPSHOT_FORMAT_MIN: u8 = 1;

/// The state's image, formats 1 and 2.
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
        self.snapshot_as(SNAPSHOT_FORMAT, serde_json::to_vec)
    }

    /// The snapshot in `format`, each cached reply's result encoded by
    /// `encode` (the one difference between formats 1 and 2).
    fn snapshot_as(
        &self,
        format: u8,
        encode: impl Fn(&Result<OpResult, Refusal>) -> serde_json::Result<Vec<u8>>,
    ) -> Result<Vec<u8>, String> {
        let image = Image {
            config: self.config.clone(),
            configured: self.configured,
            zxid: self.zxid,
            now_ms: self.now_ms,
            grants_paused_until_ms: self.grants_paused_until_ms,
            lease_horizon_ms: self.lease_horizon_ms,
            nodes: self.tree.image(),
            sessions: self.sessions.image_with(encode)?,
        };
        let mut bytes = vec![format];
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
        let (format, body) = match bytes.split_first() {
            Some((&format, body)) if (SNAPSHOT_FORMAT_MIN..=SNAPSHOT_FORMAT).contains(&format) => {
                (format, body)
            }
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
        let sessions =
            Sessions::from_image(image.sessions, &keys, format).map_err(|e| damaged(&e))?;
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
impl Coordinator {
    /// The snapshot a build of format 1 would have written of this state:
    /// each cached refusal as the error reply its client got.
    fn snapshot_format_1(&self) -> Vec<u8> {
        self.snapshot_as(1, |result| {
            serde_json::to_vec(&result.clone().map_err(|refusal| refusal.to_reply()))
        })
        .expect("encodes")
    }
}

#[cfg(test)]
mod tests {
    use latchkey_client::protocol::{
        Create, ErrorCode, LockMode, LockSpec, MultiOp, NodeKind, Op, SessionId, Xid,
    };

    use super::super::tests::{kind, mk, refused, result, Harness};
    use super::super::Why;
    use super::*;

    /// A small state touching every part of the image: persistent, TTL,
    /// ephemeral and container nodes, a granted lock node and a waiting
    /// one, cached replies, two sessions; no cached refusal, as format 1's
    /// pinned bytes were made without one.
    fn small_state_format_1() -> Harness {
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
            h.create_with(session, lock_node());
        }
        h
    }

    fn lock_node() -> Create {
        Create {
            sequential: true,
            lock: Some(LockSpec {
                mode: LockMode::Exclusive,
                delay_ms: None,
            }),
            ..kind("/locks/l-", NodeKind::Ephemeral)
        }
    }

    /// `small_state_format_1` with two cached refusals, one with a
    /// structured field (the lock node's owner) and one of a multi's
    /// step; each with the session, xid and op that a retry sends.
    fn small_state() -> (Harness, [(SessionId, Xid, Op); 2]) {
        let mut h = small_state_format_1();
        let ids: Vec<SessionId> = h.c.sessions.iter().map(|(&id, _)| id).collect();
        let (a, b) = (ids[0], ids[1]);
        let held = h.children(a, "/locks")[0].clone();
        let delete = Op::Delete {
            path: format!("/locks/{held}"),
            version: None,
            czxid: None,
            force: false,
        };
        h.err(b, delete.clone());
        let refused_delete = (b, h.last_xid(b), delete);
        let multi = Op::Multi {
            ops: vec![
                MultiOp::Create(mk("/fresh")),
                MultiOp::Create(mk("/config")),
            ],
        };
        h.err(a, multi.clone());
        let refused_multi = (a, h.last_xid(a), multi);
        (h, [refused_delete, refused_multi])
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(text: &str) -> Vec<u8> {
        let text = text.trim();
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// The bytes of format 2 for `small_state`. A change to the image (a
    /// field, a variant, their order, in the image or in the protocol or
    /// state types it holds, a refusal's included) changes them: it is then
    /// a new format, to be written with a new `SNAPSHOT_FORMAT`, and
    /// formats 1 and 2 must still be read (or refused as what they are).
    /// Only then is this constant replaced. A refusal's message may change
    /// freely: it is not in the image.
    const FORMAT_2: &str = include_str!("snapshot_format_2.hex");

    /// The bytes format 1 gave for `small_state_format_1`, kept to show
    /// that they are still read.
    const FORMAT_1: &str = include_str!("snapshot_format_1.hex");

    #[test]
    fn format_2_is_pinned() {
        let bytes = small_state().0.c.snapshot().expect("encodes");
        assert_eq!(
            hex(&bytes),
            FORMAT_2.trim(),
            "the snapshot format changed: see FORMAT_2"
        );
        let restored = Coordinator::restore(&bytes).expect("restores");
        assert_eq!(restored.snapshot().expect("encodes"), bytes);
    }

    #[test]
    fn format_1_is_still_read() {
        let old = small_state_format_1();
        assert_eq!(
            hex(&old.c.snapshot_format_1()),
            FORMAT_1.trim(),
            "format 1 as this test writes it is not what format 1 was"
        );
        let restored = Coordinator::restore(&unhex(FORMAT_1)).expect("restores");
        assert_eq!(
            restored.snapshot().expect("encodes"),
            old.c.snapshot().expect("encodes"),
            "format 1 restored is not the state it was made from"
        );
    }

    /// A refusal cached by a format-1 build is answered to a retry as its
    /// client first got it, and keeps through a format-2 snapshot.
    #[test]
    fn a_refusal_cached_in_format_1_is_answered_as_first_given() {
        let (mut h, refused_writes) = small_state();
        let mut first = Vec::new();
        for (session, xid, op) in &refused_writes {
            first.push(result(&h.send_xid(*session, *xid, op.clone())));
        }
        let not_owner = first[0].clone().expect_err("refused");
        assert_eq!(not_owner.code, ErrorCode::NotOwner);
        assert_eq!(not_owner.owner, Some(refused_writes[1].0));
        let exists = first[1].clone().expect_err("refused");
        assert_eq!(
            (exists.code, exists.index),
            (ErrorCode::NodeExists, Some(1))
        );

        let format_1 = h.c.snapshot_format_1();
        let mut restored = h.going_on_with(Coordinator::restore(&format_1).expect("restores"));
        for ((session, xid, op), first) in refused_writes.iter().zip(&first) {
            let out = restored.send_xid(*session, *xid, op.clone());
            assert!(
                matches!(refused(&out), Err(r) if matches!(r.why, Why::Recorded(_))),
                "{:?}",
                refused(&out)
            );
            assert_eq!(&result(&out), first);
        }
        let format_2 = restored.c.snapshot().expect("encodes");
        let again = Coordinator::restore(&format_2).expect("restores");
        assert_eq!(again.snapshot().expect("encodes"), format_2);
    }

    #[test]
    fn damage_and_newer_formats_are_refused_with_what_to_do() {
        let bytes = small_state().0.c.snapshot().expect("encodes");
        let mut newer = bytes.clone();
        newer[0] = SNAPSHOT_FORMAT + 1;
        let e = Coordinator::restore(&newer).err().expect("refused");
        assert!(
            e.contains("newer") && e.contains("run a newer latchkey"),
            "{e}"
        );
        assert!(!e.contains("move the whole folder away"), "{e}");
        let mut older = bytes.clone();
        older[0] = SNAPSHOT_FORMAT_MIN - 1;
        let e = Coordinator::restore(&older).err().expect("refused");
        assert!(e.contains("unknown format 0"), "{e}");
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

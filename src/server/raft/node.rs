//! The server's Raft member: openraft over the log store and a state
//! machine that executes each applied command on the server's core, which
//! answers the clients waiting for it. A single server is a cluster of
//! one member, elected by itself.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use openraft::entry::RaftEntry;
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::{EntryResponder, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::{
    LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf,
};
use openraft::{EntryPayload, OptionalSend, SnapshotPolicy};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tracing::{error, info};

use super::encoding::{decode_command, encode_command, Stamped};
use super::log_store::LogStore;
use super::snapshot_file;
use super::{Encoded, TypeConfig};
use crate::server::core::{flush, Core};

/// This member's id. A single server is member 1; ensembles number their
/// members from the command line.
const MEMBER: u64 = 1;

type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// The log a durable server sends its commands through.
pub(in crate::server) struct Log {
    raft: Raft,
    proposals: mpsc::Sender<Encoded>,
    /// Set by `shutdown`, so that the stop it causes is not reported as a
    /// failure.
    stopping: Arc<AtomicBool>,
}

/// Most commands waiting to be handed to openraft: openraft's own request
/// channel holds as many, so that this queue fills only when the disk
/// cannot keep up.
const PROPOSALS_MAX: usize = 65_536;

impl Log {
    /// Opens the log in `folder` (created if new), starts this member,
    /// restores `core` from the last snapshot if there is one, and waits
    /// until it leads and has applied every committed command after it.
    /// `on_fatal` runs once if the log stops (a failed write or fsync):
    /// nothing after that is acknowledged.
    ///
    /// # Cancel safety
    /// Not cancel-safe: a dropped future leaves the member running.
    pub(in crate::server) async fn open(
        folder: &Path,
        snapshots: Snapshots,
        core: Arc<Mutex<Core>>,
        address: String,
        on_fatal: impl FnOnce(String) + Send + 'static,
    ) -> Result<Log, String> {
        let store = std::fs::create_dir_all(folder)
            .and_then(|()| LogStore::open(folder))
            .map_err(|e| {
                format!(
                    "cannot open the log in {} (its .wal files): {e}; the data folder is damaged: \
                 restore it from a backup (or move it away to start empty)",
                    folder.display()
                )
            })?;
        // A purged log needs its snapshot: without it, openraft's own
        // complaint would not say which file is missing.
        let purged = store
            .clone()
            .get_log_state()
            .await
            .map_err(|e| format!("cannot read the log in {}: {e}", folder.display()))?
            .last_purged_log_id;
        let snapshot = snapshots.folder.join(snapshot_file::SNAPSHOT_FILE);
        if let (Some(purged), false) = (purged, snapshot.exists()) {
            return Err(format!(
                "the log in {} begins after entry {}, which only the snapshot {} holds, and that \
                 file is missing; restore the data folder from a backup, or move the whole \
                 folder away to start empty",
                folder.display(),
                purged.index,
                snapshot.display()
            ));
        }
        let config = openraft::Config {
            cluster_name: "latchkey".into(),
            heartbeat_interval: 100,
            election_timeout_min: 300,
            election_timeout_max: 600,
            snapshot_policy: if snapshots.every == 0 {
                SnapshotPolicy::Never
            } else {
                SnapshotPolicy::LogsSinceLast(snapshots.every)
            },
            // What a snapshot covers is purged at once: a single member has
            // nobody to send older entries to.
            max_in_snapshot_log_to_keep: 0,
            ..Default::default()
        }
        .validate()
        .map_err(|e| format!("invalid Raft settings: {e}"))?;
        let machine = StateMachine {
            core,
            applied: None,
            membership: StoredMembershipOf::<TypeConfig>::default(),
            folder: snapshots.folder,
            on_disk: None,
        };
        let raft = Raft::new(MEMBER, Arc::new(config), NoPeers, store, machine)
            .await
            .map_err(|e| format!("cannot start the log: {e}"))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| format!("cannot start the log: {e}"))?;
        if !initialized {
            let members = BTreeMap::from([(MEMBER, openraft::impls::BasicNode::new(address))]);
            raft.initialize(members)
                .await
                .map_err(|e| format!("cannot start a new log: {e}"))?;
        }
        raft.wait(Some(Duration::from_secs(60)))
            .current_leader(MEMBER, "this member leads")
            .await
            .map_err(|e| format!("the log did not elect this member: {e}"))?;
        raft.wait_for_recovery(Some(Duration::from_secs(600)))
            .await
            .map_err(|e| format!("the log was not replayed: {e}"))?;
        // Everything in the log is committed once a leader's first entry
        // is: wait until it is applied, so that reads see it.
        let blank = raft
            .write_blank()
            .await
            .map_err(|e| format!("the log refused its first write: {e}"))?;
        info!(index = blank.log_id.index, "log replayed");
        let (proposals, receiver) = mpsc::channel(PROPOSALS_MAX);
        tokio::spawn(propose(raft.clone(), receiver));
        let stopping = Arc::new(AtomicBool::new(false));
        tokio::spawn(watch_fatal(raft.clone(), stopping.clone(), on_fatal));
        Ok(Log {
            raft,
            proposals,
            stopping,
        })
    }

    /// Sends a command to the log, in order after every command sent
    /// before; the state machine executes it once it is on disk. Never
    /// blocks.
    ///
    /// # Errors
    /// Why the command was not sent: too many wait for the disk, or the
    /// log has stopped.
    pub(in crate::server) fn propose(&self, stamped: &Stamped) -> Result<(), String> {
        self.proposals
            .try_send(encode_command(stamped))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    format!("{PROPOSALS_MAX} writes are waiting for the disk; retry later")
                }
                mpsc::error::TrySendError::Closed(_) => "the log has stopped".to_owned(),
            })
    }

    /// Writes a command and waits until it has been applied.
    ///
    /// # Cancel safety
    /// Safe to drop: the command may still be applied.
    pub(in crate::server) async fn write(&self, stamped: &Stamped) -> Result<(), String> {
        self.raft
            .client_write(encode_command(stamped))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Stops the member; what is on disk stays.
    ///
    /// # Cancel safety
    /// Safe to drop: the member stops in the background.
    pub(in crate::server) async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.raft.shutdown().await {
            error!("the log did not stop cleanly: {e}");
        }
    }
}

/// Hands proposals to openraft in the order they were sent.
async fn propose(raft: Raft, mut receiver: mpsc::Receiver<Encoded>) {
    while let Some(encoded) = receiver.recv().await {
        if raft.client_write_ff(encoded, None).await.is_err() {
            // Stopped: `watch_fatal` reports why.
            return;
        }
    }
}

/// Calls `on_fatal` once the member stops for a reason of its own (not
/// because `Log::shutdown` stopped it).
async fn watch_fatal(raft: Raft, stopping: Arc<AtomicBool>, on_fatal: impl FnOnce(String)) {
    let stopped = raft
        .wait(None)
        .metrics(|m| m.running_state.is_err(), "the log stops")
        .await;
    let why = match stopped {
        Ok(metrics) => match metrics.running_state {
            Err(fatal) => fatal.to_string(),
            Ok(()) => "the log stopped".to_owned(),
        },
        Err(e) => format!("the log stopped: {e}"),
    };
    if !stopping.load(Ordering::SeqCst) {
        on_fatal(why);
    }
}

/// The coordinator as openraft's state machine: each applied command is
/// executed on the server's core, which delivers its replies and events.
pub(in crate::server) struct StateMachine {
    core: Arc<Mutex<Core>>,
    applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
    /// The data folder, which holds the snapshot file.
    folder: PathBuf,
    /// What the snapshot file covers, once known: an install of that same
    /// snapshot (the restore at start) need not write it again.
    on_disk: Option<LogIdOf<TypeConfig>>,
}

/// Where and how often a durable server snapshots its state.
pub(in crate::server) struct Snapshots {
    /// The data folder.
    pub(in crate::server) folder: PathBuf,
    /// Entries applied between two snapshots; 0 for none.
    pub(in crate::server) every: u64,
}

fn invalid(e: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Builder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let log_id = entry.log_id();
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(encoded) => {
                    let stamped = decode_command(&encoded).map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("log entry {}: {e}", log_id.index),
                        )
                    })?;
                    let queues = {
                        let mut core = self.core.lock();
                        let pending = core.take_pending(stamped.ticket);
                        core.execute(stamped.at_ms, stamped.command, pending);
                        core.take_to_flush()
                    };
                    flush(queues);
                }
                EntryPayload::Membership(membership) => {
                    self.membership =
                        StoredMembershipOf::<TypeConfig>::new(Some(log_id), membership);
                }
            }
            self.applied = Some(log_id);
            if let Some(responder) = responder {
                responder.send(Encoded::default());
            }
        }
        Ok(())
    }

    /// Encodes the state now, between two applies, under the core's lock
    /// (tens of milliseconds at 100,000 nodes); the builder writes it out
    /// on its own task while applies go on.
    async fn get_snapshot_builder(&mut self) -> Builder {
        let started = std::time::Instant::now();
        let state = self.core.lock().coordinator.snapshot();
        Builder {
            encoded_in: started.elapsed(),
            folder: self.folder.clone(),
            meta: SnapshotMetaOf::<TypeConfig> {
                last_log_id: self.applied,
                last_membership: self.membership.clone(),
            },
            state,
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        // Restored first: a snapshot that does not restore must not
        // replace a good file.
        self.core
            .lock()
            .coordinator
            .install(&snapshot)
            .map_err(|e| {
                invalid(format!(
                    "the snapshot in {} cannot be restored: {e}",
                    self.folder.join(snapshot_file::SNAPSHOT_FILE).display()
                ))
            })?;
        if self.on_disk != meta.last_log_id {
            let (folder, meta) = (self.folder.clone(), meta.clone());
            tokio::task::spawn_blocking(move || snapshot_file::write(&folder, &meta, &snapshot))
                .await
                .map_err(io::Error::other)??;
        }
        self.on_disk = meta.last_log_id;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        info!(
            index = meta.last_log_id.map_or(0, |id| id.index),
            "state restored from its snapshot"
        );
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, Vec<u8>>>, io::Error> {
        let folder = self.folder.clone();
        let stored = tokio::task::spawn_blocking(move || snapshot_file::read(&folder))
            .await
            .map_err(io::Error::other)?
            .map_err(invalid)?;
        Ok(stored.map(|stored| {
            self.on_disk = stored.meta.last_log_id;
            SnapshotOf::<TypeConfig, Vec<u8>> {
                meta: stored.meta,
                snapshot: stored.state,
            }
        }))
    }
}

/// Writes one snapshot, encoded when it was asked for.
pub(crate) struct Builder {
    /// How long the coordinator was held to encode it.
    encoded_in: Duration,
    folder: PathBuf,
    meta: SnapshotMetaOf<TypeConfig>,
    state: Result<Vec<u8>, String>,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, Vec<u8>>, io::Error> {
        // Taken, not copied: a snapshot can be as large as the tree, and a
        // builder builds once.
        let state =
            std::mem::replace(&mut self.state, Err("already built".to_owned())).map_err(invalid)?;
        let (folder, meta) = (self.folder.clone(), self.meta.clone());
        let started = std::time::Instant::now();
        let state = tokio::task::spawn_blocking(move || {
            snapshot_file::write(&folder, &meta, &state).map(|()| state)
        })
        .await
        .map_err(io::Error::other)??;
        info!(
            index = self.meta.last_log_id.map_or(0, |id| id.index),
            bytes = state.len(),
            encode_ms = self.encoded_in.as_millis(),
            write_ms = started.elapsed().as_millis(),
            "snapshot written"
        );
        Ok(SnapshotOf::<TypeConfig, Vec<u8>> {
            meta: self.meta.clone(),
            snapshot: state,
        })
    }
}

/// The network of a cluster of one: there is nobody to reach.
struct NoPeers;

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeers;

    async fn new_client(&mut self, _target: u64, _node: &openraft::impls::BasicNode) -> NoPeers {
        NoPeers
    }
}

fn unreachable() -> Unreachable<TypeConfig> {
    Unreachable::from_string("this server has no other members")
}

impl RaftNetworkV2<TypeConfig> for NoPeers {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(unreachable()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(unreachable()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: VoteOf<TypeConfig>,
        _snapshot: SnapshotOf<TypeConfig, Vec<u8>>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        Err(StreamingError::Unreachable(unreachable()))
    }
}

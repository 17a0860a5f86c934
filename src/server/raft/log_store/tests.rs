//! The log store against openraft's storage test suite, and across a
//! reopen of its folder.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{
    EntryResponder, IOFlushed, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine,
};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::alias::{
    EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf,
};
use openraft::{EntryPayload, OptionalSend, StorageError};
use parking_lot::Mutex;

use super::{LogStore, TypeConfig};

/// A folder under the system's temporary folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("latchkey-log-store-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a temporary folder");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The snapshot a state machine last built or installed: its meta and data.
type CurrentSnapshot = Arc<Mutex<Option<(SnapshotMetaOf<TypeConfig>, Vec<u8>)>>>;

/// The suite needs a state machine beside the log store. This one keeps
/// only what the suite checks (the last applied log id, the membership and
/// a snapshot of those); the coordinator's own comes with the durable
/// issue's state machine.
#[derive(Default, Clone)]
struct SuiteStateMachine {
    applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
    current: CurrentSnapshot,
}

fn invalid(e: serde_json::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl RaftSnapshotBuilder<TypeConfig> for SuiteStateMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, Vec<u8>>, io::Error> {
        let meta = SnapshotMetaOf::<TypeConfig> {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
        };
        let data = serde_json::to_vec(&(self.applied, &self.membership)).map_err(invalid)?;
        *self.current.lock() = Some((meta.clone(), data.clone()));
        Ok(SnapshotOf::<TypeConfig, Vec<u8>> {
            meta,
            snapshot: data,
        })
    }
}

impl RaftStateMachine<TypeConfig> for SuiteStateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

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
            self.applied = Some(entry.log_id());
            if let EntryPayload::Membership(membership) = &entry.payload {
                self.membership =
                    openraft::StoredMembership::new(Some(entry.log_id()), membership.clone());
            }
            if let Some(responder) = responder {
                responder.send(super::super::Encoded::default());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let (applied, membership) = serde_json::from_slice(&snapshot).map_err(invalid)?;
        self.applied = applied;
        self.membership = membership;
        *self.current.lock() = Some((meta.clone(), snapshot));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, Vec<u8>>>, io::Error> {
        Ok(self
            .current
            .lock()
            .clone()
            .map(|(meta, snapshot)| SnapshotOf::<TypeConfig, Vec<u8>> { meta, snapshot }))
    }
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, SuiteStateMachine, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, SuiteStateMachine), StorageError<TypeConfig>> {
        let dir = TempDir::new();
        let store = LogStore::open(&dir.0).expect("open a log in a new folder");
        Ok((dir, store, SuiteStateMachine::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_store_passes_openraft_s_storage_suite() {
    Suite::test_all(Builder)
        .await
        .expect("openraft's storage suite passes");
}

fn blank(term: u64, index: u64) -> EntryOf<TypeConfig> {
    EntryOf::<TypeConfig>::new_blank(LogIdOf::<TypeConfig>::new_term_index(term, index))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_acknowledged_is_there_after_a_reopen() {
    let dir = TempDir::new();
    let vote = VoteOf::<TypeConfig>::new_committed(3, 1);
    {
        let mut store = LogStore::open(&dir.0).expect("open");
        store.save_vote(&vote).await.expect("vote");
        let entries = (1..=5).map(|i| blank(3, i));
        store
            .append(entries, IOFlushed::noop())
            .await
            .expect("append");
        store
            .save_committed(Some(LogIdOf::<TypeConfig>::new_term_index(3, 3)))
            .await
            .expect("committed");
        // Flushes go in order: once this one is done, the append and the
        // committed id are on disk.
        store.sync().await.expect("on disk");
        store
            .truncate_after(Some(LogIdOf::<TypeConfig>::new_term_index(3, 4)))
            .await
            .expect("truncate");
    }
    let mut store = LogStore::open(&dir.0).expect("reopen");
    assert_eq!(store.read_vote().await.expect("vote"), Some(vote));
    assert_eq!(
        store.read_committed().await.expect("committed"),
        Some(LogIdOf::<TypeConfig>::new_term_index(3, 3))
    );
    let entries = store.try_get_log_entries(0..10).await.expect("read");
    let indexes: Vec<u64> = entries.iter().map(|e| e.log_id().index).collect();
    assert_eq!(indexes, vec![1, 2, 3, 4]);
    let state = store.get_log_state().await.expect("state");
    assert_eq!(
        state.last_log_id,
        Some(LogIdOf::<TypeConfig>::new_term_index(3, 4))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_vote_replaces_an_uncommitted_one_of_its_term_for_another_node() {
    // After a split vote: this member voted for node 3, then hears that
    // node 2 won the term.
    let dir = TempDir::new();
    let mut store = LogStore::open(&dir.0).expect("open");
    store
        .save_vote(&VoteOf::<TypeConfig>::new(5, 3))
        .await
        .expect("the first vote");
    let won = VoteOf::<TypeConfig>::new_committed(5, 2);
    store.save_vote(&won).await.expect("the winner's vote");
    drop(store);
    let mut store = LogStore::open(&dir.0).expect("reopen");
    assert_eq!(store.read_vote().await.expect("vote"), Some(won));
}

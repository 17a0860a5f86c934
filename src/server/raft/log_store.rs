//! The Raft log and vote on disk, in raft-log (by openraft's author): an
//! append is acknowledged to openraft only once raft-log's flush worker has
//! fsynced it, and appends that arrive while one fsync runs share the next.

use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::OptionalSend;
use parking_lot::Mutex;
use raft_log::api::raft_log_writer::RaftLogWriter;

use super::TypeConfig;

/// raft-log's view of the types: a log id as (term, index), a vote as
/// (term, (committed, voted for)), and an entry as its JSON encoding.
/// raft-log refuses a vote that compares lower than the one it holds, so
/// the tuple orders votes as openraft does wherever openraft saves one: by
/// term, then a committed vote above an uncommitted one of the same term
/// (whoever it is for).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct DiskTypes;

impl raft_log::Types for DiskTypes {
    type LogId = (u64, u64);
    type LogPayload = Vec<u8>;
    type Vote = (u64, (u64, u64));
    type UserData = Vec<u8>;
    type Callback = Flushed;

    fn log_index(log_id: &Self::LogId) -> u64 {
        log_id.1
    }

    fn payload_size(payload: &Self::LogPayload) -> u64 {
        u64::try_from(payload.len()).unwrap_or(u64::MAX)
    }
}

/// Who waits for a flush: openraft (for an append) or this store (for a
/// vote, a truncation or a purge, which must be on disk when they return).
pub(crate) enum Flushed {
    Raft(IOFlushed<TypeConfig>),
    Wait(tokio::sync::oneshot::Sender<io::Result<()>>),
}

impl raft_log::Callback for Flushed {
    fn send(self, result: Result<(), io::Error>) {
        match self {
            Flushed::Raft(callback) => callback.io_completed(result),
            Flushed::Wait(tx) => {
                // The waiter may have been dropped (its task cancelled);
                // the write is on disk either way.
                let _ = tx.send(result);
            }
        }
    }
}

fn disk_log_id(id: &LogIdOf<TypeConfig>) -> (u64, u64) {
    (id.leader_id.term, id.index)
}

fn raft_log_id((term, index): (u64, u64)) -> LogIdOf<TypeConfig> {
    LogIdOf::<TypeConfig>::new_term_index(term, index)
}

fn disk_vote(vote: &VoteOf<TypeConfig>) -> (u64, (u64, u64)) {
    (
        vote.leader_id.term,
        (u64::from(vote.committed), vote.leader_id.voted_for),
    )
}

fn raft_vote((term, (committed, voted_for)): (u64, (u64, u64))) -> VoteOf<TypeConfig> {
    let mut vote = VoteOf::<TypeConfig>::new(term, voted_for);
    vote.committed = committed == 1;
    vote
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
}

/// The log store: one raft-log folder. Cloning shares it (openraft reads
/// through clones while it appends).
#[derive(Clone)]
pub(crate) struct LogStore {
    log: Arc<Mutex<raft_log::RaftLog<DiskTypes>>>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir`. A record torn by a crash
    /// mid-append is cut off by raft-log at open.
    ///
    /// # Errors
    /// The folder cannot be read or written, its path is not UTF-8, or a
    /// record before the last is corrupt.
    pub(crate) fn open(dir: &Path) -> io::Result<LogStore> {
        let dir = dir.to_str().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the log folder {} is not a UTF-8 path", dir.display()),
            )
        })?;
        let mut config = raft_log::Config::new(dir);
        // How long the flush worker gathers writes into one batch (one
        // fsync) before it writes them. Its default, 1 ms, made every write
        // cost 1.4 ms here; but with none at all, each batch is one request,
        // so writes queued during an fsync get one fsync each instead of
        // sharing the next. A few microseconds take everything already
        // queued, and cost an idle write no more than that (with the timer
        // slack `latchkey serve` sets: Linux's default would make it 55 us).
        config.wal.flush_batch_wait = Some(std::time::Duration::from_micros(5));
        let log = raft_log::RaftLog::open(Arc::new(config))?;
        Ok(LogStore {
            log: Arc::new(Mutex::new(log)),
        })
    }

    /// Waits until everything written so far is on disk.
    ///
    /// # Cancel safety
    /// Safe: the writes stay queued for the flush worker either way.
    async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.log.lock().flush(true, Some(Flushed::Wait(tx)))?;
        rx.await
            .map_err(|_| io::Error::other("the log's flush worker stopped"))?
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error>
    where
        RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend,
    {
        let from = match range.start_bound() {
            Bound::Included(&from) => from,
            Bound::Excluded(&from) => from.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(&to) => to.saturating_add(1),
            Bound::Excluded(&to) => to,
            Bound::Unbounded => u64::MAX,
        };
        let log = self.log.lock();
        log.read(from, to)
            .map(|entry| {
                let (log_id, payload) = entry?;
                serde_json::from_slice(&payload)
                    .map_err(|e| corrupt(&format!("log entry {log_id:?}"), e))
            })
            .collect()
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        Ok(self.log.lock().log_state().vote().cloned().map(raft_vote))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let log = self.log.lock();
        let state = log.log_state();
        let purged = state.purged().cloned().map(raft_log_id);
        let last = state.last().cloned().map(raft_log_id).or(purged);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Written without waiting for its own fsync: it goes to disk with the
    /// next flush. A committed id lost in a crash means a restart re-applies
    /// less at once, so until it catches up its state may be older than
    /// what it served before: the server must wait for openraft's recovery
    /// (`Raft::wait_for_recovery`) before it serves reads.
    async fn save_committed(
        &mut self,
        committed: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        if let Some(committed) = committed {
            self.log.lock().commit(disk_log_id(&committed))?;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self
            .log
            .lock()
            .log_state()
            .committed()
            .cloned()
            .map(raft_log_id))
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        self.log.lock().save_vote(disk_vote(vote))?;
        self.sync().await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let records = entries
            .into_iter()
            .map(|entry| {
                let payload =
                    serde_json::to_vec(&entry).map_err(|e| corrupt("encoding a log entry", e))?;
                Ok((disk_log_id(&entry.log_id()), payload))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let mut log = self.log.lock();
        log.append(records)?;
        // Acknowledged by raft-log's flush worker once fsynced, together
        // with whatever else was written meanwhile.
        log.flush(true, Some(Flushed::Raft(callback)))?;
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        {
            let mut log = self.log.lock();
            let end = log.log_state().last().map(|&(_, index)| index);
            // raft-log refuses to truncate past its last entry, where there
            // is nothing to cut.
            if let Some(last) = last {
                if end.is_none_or(|end| last.index >= end) {
                    return Ok(());
                }
            }
            log.truncate(last.map_or(0, |l| l.index.saturating_add(1)))?;
        }
        self.sync().await
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        self.log.lock().purge(disk_log_id(&log_id))?;
        self.sync().await
    }
}

#[cfg(test)]
mod tests;

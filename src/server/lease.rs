//! The lease file: where a server records how long holders of the locks it
//! granted may still act as holders, so that a server restarted on the same
//! address (its state lost, being in memory) waits that out before granting
//! any lock again.
//!
//! The file holds one number, milliseconds since the Unix epoch. It is
//! rewritten before any client can learn of a grant or a heartbeat that
//! moves the horizon past what the file says (under the coordinator's lock,
//! before the reply is queued), with a second of slack so that a busy lock
//! costs about one small write a second. A process crash keeps the file
//! (the kernel has it); a machine crash may lose it, as may a temporary
//! folder cleared at boot.

use std::io::Write;
use std::path::{Path, PathBuf};

use tracing::warn;

/// Slack added to each recorded horizon, so that heartbeats, which move it
/// on a little at a time, rewrite the file about once a second rather than
/// at every request.
const SLACK_MS: u64 = 1_000;

/// Reads the horizon a previous server recorded; `None` if there is no
/// file.
pub(crate) fn read(path: &Path) -> Result<Option<u64>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    text.trim().parse::<u64>().map(Some).map_err(|_| {
        format!(
            "it does not hold a time in milliseconds but {:?}; delete it if no other \
             latchkey server wrote it",
            text.chars().take(40).collect::<String>()
        )
    })
}

/// Keeps the file at or above the coordinator's lease horizon.
pub(crate) struct LeaseRecorder {
    path: PathBuf,
    /// What the file says now.
    written_ms: u64,
    /// A write failed and has not succeeded since (warn once per streak).
    failing: bool,
}

impl LeaseRecorder {
    /// Writes `horizon_ms` to `path` at once, so that an unwritable path
    /// stops the server at start rather than failing quietly later.
    pub(crate) fn create(path: PathBuf, horizon_ms: u64) -> Result<LeaseRecorder, String> {
        write(&path, horizon_ms).map_err(|e| format!("cannot write it: {e}"))?;
        Ok(LeaseRecorder {
            path,
            written_ms: horizon_ms,
            failing: false,
        })
    }

    /// Makes the file say at least `horizon_ms`; writes only when it says
    /// less. A failed write is logged and retried at the next call: the
    /// server keeps serving, but a restart could then grant early.
    pub(crate) fn cover(&mut self, horizon_ms: u64) {
        if horizon_ms <= self.written_ms {
            return;
        }
        let value = horizon_ms.saturating_add(SLACK_MS);
        match write(&self.path, value) {
            Ok(()) => {
                self.written_ms = value;
                self.failing = false;
            }
            Err(e) => {
                if !self.failing {
                    warn!(
                        path = %self.path.display(),
                        "cannot record the lease horizon: {e}; a restart of this server \
                         could grant a lock while its previous holder still believes it \
                         holds (use --startup-grace when restarting)"
                    );
                }
                self.failing = true;
            }
        }
    }
}

/// Writes a temporary file beside `path` and renames it over `path`, so a
/// reader never sees a half-written number.
fn write(path: &Path, value: u64) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::File::create(&temporary)?;
    writeln!(file, "{value}")?;
    drop(file);
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_only_rises_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("latchkey-lease-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary folder");
        let path = dir.join("leases");
        let _ = std::fs::remove_file(&path);
        assert_eq!(read(&path), Ok(None));
        let mut recorder = LeaseRecorder::create(path.clone(), 5_000).expect("writable");
        assert_eq!(read(&path), Ok(Some(5_000)));
        recorder.cover(4_000);
        assert_eq!(read(&path), Ok(Some(5_000)));
        recorder.cover(5_500);
        assert_eq!(read(&path), Ok(Some(5_500 + SLACK_MS)));
        // Within the slack: no rewrite.
        std::fs::write(&path, "7\n").expect("overwrite");
        recorder.cover(6_000);
        assert_eq!(read(&path), Ok(Some(7)));
        std::fs::write(&path, "soon").expect("overwrite");
        let error = read(&path).expect_err("not a number");
        assert!(error.contains("\"soon\""), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

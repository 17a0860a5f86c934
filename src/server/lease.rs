//! The lease file: where a server records how long holders of the locks it
//! granted may still act as holders, so that a server restarted on the same
//! address (its state lost, being in memory) waits that out before granting
//! any lock again.
//!
//! The file holds one number: a time in milliseconds since the Unix epoch by
//! the wall clock, read when it is written (the coordinator's own clock is
//! the wall clock read once at start, advanced by the monotonic clock, and
//! drifts from the wall clock if the wall clock is stepped or the host
//! sleeps; the next run compares with the wall clock). It is rewritten
//! before any client can learn of a grant or a heartbeat that moves the
//! horizon past what the file says (under the coordinator's lock, before
//! the reply is queued), with up to a second of slack so that a busy lock
//! costs about one small write a second. A process crash keeps the file (the
//! kernel has it); a machine crash may lose it.

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

/// The wall clock now, in milliseconds since the Unix epoch.
pub(crate) fn wall_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The folder `latchkey serve` keeps its lease files in unless told
/// otherwise: private to the user that runs it, and kept across a restart
/// of the service (systemd's `$STATE_DIRECTORY`, else
/// `$XDG_STATE_HOME/latchkey`, else `~/.local/state/latchkey`), so that
/// another local user cannot plant or remove it and a private temporary
/// folder is not cleared under it. The temporary folder only when there is
/// no home.
pub fn default_folder() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may list several, separated by colons: take the first.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned();
        return PathBuf::from(first);
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("latchkey");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/state/latchkey");
    }
    std::env::temp_dir().join("latchkey")
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
    /// Writes `horizon_ms` (wall clock) to `path` at once, making its folder
    /// (private to this user) if needed, so that an unwritable path stops
    /// the server at start rather than failing quietly later.
    pub(crate) fn create(path: PathBuf, horizon_ms: u64) -> Result<LeaseRecorder, String> {
        if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(folder)
                .map_err(|e| format!("cannot make its folder: {e}"))?;
        }
        write(&path, horizon_ms).map_err(|e| format!("cannot write it: {e}"))?;
        Ok(LeaseRecorder {
            path,
            written_ms: horizon_ms,
            failing: false,
        })
    }

    /// Makes the file say at least `horizon_ms`, a time by the
    /// coordinator's clock, which reads `clock_now_ms` now; converted to the
    /// wall clock at the moment of writing. Writes only when the file says
    /// less. A failed write is logged and retried at the next call: the
    /// server keeps serving, but a restart could then grant early.
    pub(crate) fn cover(&mut self, horizon_ms: u64, clock_now_ms: u64) {
        // Already past (or no lock ever granted): nothing left to cover,
        // and no clock to read on this path, which every request takes.
        if horizon_ms < clock_now_ms {
            return;
        }
        let horizon_wall_ms = wall_now_ms().saturating_add(horizon_ms - clock_now_ms);
        if horizon_wall_ms <= self.written_ms {
            return;
        }
        let value = horizon_wall_ms.saturating_add(SLACK_MS);
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

/// Writes a temporary file of this process beside `path`, readable by this
/// user only, and renames it over `path`, so a reader never sees a
/// half-written number.
fn write(path: &Path, value: u64) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)?;
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
        let now = wall_now_ms();
        let mut recorder = LeaseRecorder::create(path.clone(), now + 5_000).expect("writable");
        assert_eq!(read(&path), Ok(Some(now + 5_000)));
        // By a coordinator clock 1 s behind the wall clock: a horizon 3 s
        // ahead of it is 3 s ahead of the wall clock too, within what the
        // file says.
        recorder.cover(now - 1_000 + 3_000, now - 1_000);
        assert_eq!(read(&path), Ok(Some(now + 5_000)));
        // 10 s ahead of that clock: about 10 s ahead of the wall clock, plus
        // the slack.
        recorder.cover(now - 1_000 + 10_000, now - 1_000);
        let written = read(&path).expect("readable").expect("present");
        assert!(
            (now + 10_000 + SLACK_MS..now + 11_000 + SLACK_MS).contains(&written),
            "{written} for a horizon 10 s after {now}"
        );
        // Within what was written: no rewrite.
        std::fs::write(&path, "7\n").expect("overwrite");
        recorder.cover(now - 1_000 + 10_500, now - 1_000);
        assert_eq!(read(&path), Ok(Some(7)));
        // A horizon already past writes nothing.
        recorder.cover(now - 5_000, now);
        assert_eq!(read(&path), Ok(Some(7)));
        std::fs::write(&path, "soon").expect("overwrite");
        let error = read(&path).expect_err("not a number");
        assert!(error.contains("\"soon\""), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! A durable server's data folder: locked for one server at a time, with a
//! small file that says which format the folder is in and where its zxids
//! began, beside the log.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The folder format this build writes, and the newest it reads.
pub(crate) const FOLDER_FORMAT: u32 = 1;

/// The name of the file that says the folder's format.
const FORMAT_FILE: &str = "format.json";
/// The name of the file a running server locks.
const LOCK_FILE: &str = "lock";
/// The log's own folder.
const LOG_FOLDER: &str = "log";

#[derive(Serialize, Deserialize)]
struct Format {
    format: u32,
    /// The zxid the coordinator starts from: the wall clock in
    /// microseconds when the folder was made, so that tokens from a new
    /// folder are above those of an in-memory server run before it. From
    /// there on the log, not the clock, keeps them rising.
    zxid_start: u64,
}

/// An open data folder, locked until dropped.
pub(crate) struct DataFolder {
    path: PathBuf,
    /// Holds the lock.
    _lock: File,
    zxid_start: u64,
    new: bool,
}

impl DataFolder {
    /// Opens `path` (made if absent), locks it, and reads or writes its
    /// format file.
    ///
    /// # Errors
    /// A message that names the folder, what is wrong and what to do: it
    /// cannot be made or locked, another server uses it, or it is of a
    /// newer format or not a latchkey folder.
    pub(crate) fn open(path: &Path, zxid_start_if_new: u64) -> Result<DataFolder, String> {
        let shown = path.display();
        std::fs::create_dir_all(path).map_err(|e| {
            format!("cannot make the data folder {shown}: {e}; pass --data with a writable folder")
        })?;
        let lock_path = path.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (process {holder})")
                };
                return Err(format!(
                    "the data folder {shown} is in use by another latchkey server{holder}; \
                     stop it, or give this one another folder with --data"
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(format!("cannot lock {}: {e}", lock_path.display()));
            }
        }
        // For the message above, seen by a second server.
        let _ = lock
            .set_len(0)
            .and_then(|()| write!(lock, "{}", std::process::id()));
        let format_path = path.join(FORMAT_FILE);
        let (zxid_start, new) = match std::fs::read(&format_path) {
            Ok(bytes) => (read_format(&format_path, &bytes)?, false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if path.join(LOG_FOLDER).exists() {
                    return Err(format!(
                        "the data folder {shown} has a log but no {FORMAT_FILE}: it is damaged \
                         or not latchkey's; restore it from a backup, or move it away to start \
                         empty"
                    ));
                }
                let format = Format {
                    format: FOLDER_FORMAT,
                    zxid_start: zxid_start_if_new,
                };
                let bytes = serde_json::to_vec(&format).map_err(|e| e.to_string())?;
                write_atomically(path, FORMAT_FILE, &[&bytes])
                    .map_err(|e| format!("cannot write {}: {e}", format_path.display()))?;
                (zxid_start_if_new, true)
            }
            Err(e) => return Err(format!("cannot read {}: {e}", format_path.display())),
        };
        Ok(DataFolder {
            path: path.to_owned(),
            _lock: lock,
            zxid_start,
            new,
        })
    }

    /// The folder itself.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The log's folder inside this one.
    pub(crate) fn log(&self) -> PathBuf {
        self.path.join(LOG_FOLDER)
    }

    /// The zxid the coordinator starts from.
    pub(crate) fn zxid_start(&self) -> u64 {
        self.zxid_start
    }

    /// Whether this open made the folder.
    pub(crate) fn is_new(&self) -> bool {
        self.new
    }
}

fn read_format(path: &Path, bytes: &[u8]) -> Result<u64, String> {
    #[derive(Deserialize)]
    struct Version {
        format: u32,
    }
    let shown = path.display();
    let version: Version = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "{shown} is not a latchkey format file ({e}): the data folder is damaged; restore it \
             from a backup, or move it away to start empty"
        )
    })?;
    if version.format > FOLDER_FORMAT {
        return Err(format!(
            "the data folder {} is in format {}, written by a newer latchkey; this one reads \
             format {FOLDER_FORMAT} and older: run the newer latchkey, or give this one another \
             folder with --data",
            path.parent().unwrap_or(path).display(),
            version.format
        ));
    }
    let format: Format = serde_json::from_slice(bytes)
        .map_err(|e| format!("{shown} is damaged ({e}); restore the data folder from a backup"))?;
    Ok(format.zxid_start)
}

/// Writes `name` in `folder` (the concatenation of `parts`) so that a crash leaves the old file or the new
/// one, never a part: a temporary file, fsynced, renamed over, and the
/// folder fsynced so that the rename itself is on disk.
pub(crate) fn write_atomically(folder: &Path, name: &str, parts: &[&[u8]]) -> io::Result<()> {
    let temporary = folder.join(format!("{name}.tmp"));
    let mut file = File::create(&temporary)?;
    for part in parts {
        file.write_all(part)?;
    }
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, folder.join(name))?;
    File::open(folder)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("latchkey-folder-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_folder_is_made_once_and_keeps_its_zxid_start() {
        let dir = temp("keeps");
        let folder = DataFolder::open(&dir, 77).expect("a new folder");
        assert!(folder.is_new());
        drop(folder);
        let folder = DataFolder::open(&dir, 99).expect("the same folder");
        assert!(!folder.is_new());
        assert_eq!(folder.zxid_start(), 77);
        drop(folder);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_holds_it() {
        let dir = temp("locked");
        let first = DataFolder::open(&dir, 1).expect("the first");
        let Err(second) = DataFolder::open(&dir, 1) else {
            panic!("two servers opened one folder");
        };
        assert!(
            second.contains("in use by another latchkey server"),
            "{second}"
        );
        assert!(second.contains(&std::process::id().to_string()), "{second}");
        drop(first);
        DataFolder::open(&dir, 1).expect("free once the first is gone");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn a_newer_format_or_a_damaged_file_is_refused_with_what_to_do() {
        let dir = temp("newer");
        drop(DataFolder::open(&dir, 1).expect("a new folder"));
        std::fs::write(dir.join(FORMAT_FILE), br#"{"format":2,"zxid_start":1}"#).expect("write");
        let Err(newer) = DataFolder::open(&dir, 1) else {
            panic!("a newer format was opened");
        };
        assert!(
            newer.contains("format 2") && newer.contains("newer latchkey"),
            "{newer}"
        );
        std::fs::write(dir.join(FORMAT_FILE), b"{").expect("write");
        let Err(damaged) = DataFolder::open(&dir, 1) else {
            panic!("a damaged format file was opened");
        };
        assert!(damaged.contains("damaged"), "{damaged}");
        std::fs::remove_file(dir.join(FORMAT_FILE)).expect("remove");
        std::fs::create_dir_all(dir.join(LOG_FOLDER)).expect("a log");
        let Err(orphan) = DataFolder::open(&dir, 1) else {
            panic!("a log without a format file was opened");
        };
        assert!(orphan.contains("no format.json"), "{orphan}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}

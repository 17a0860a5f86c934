//! The snapshot on disk: one file in the data folder, replaced whole by
//! each new snapshot (see `folder::write_atomically`), so that a crash
//! leaves the old snapshot or the new one.
//!
//! Layout: a format byte (1); a CRC-32 of everything after it, little
//! endian; the length of the metadata, u32 little endian; the metadata
//! (openraft's: the last log id it covers and the membership then) as
//! JSON; the coordinator's snapshot (`Coordinator::snapshot`, which has its
//! own format byte). The checksum catches a damaged byte anywhere, also
//! in a node's data, which no decoder would notice.

use std::io;
use std::path::Path;

use openraft::type_config::alias::SnapshotMetaOf;

use super::folder::write_atomically;
use super::TypeConfig;

/// The name of the snapshot file in the data folder.
pub(crate) const SNAPSHOT_FILE: &str = "snapshot";

/// The file format this build writes, and the only one it reads.
const FILE_FORMAT: u8 = 1;

/// Bytes before the metadata: format, checksum, metadata length.
const HEADER: usize = 1 + 4 + 4;

/// A snapshot as the file holds it.
pub(crate) struct Stored {
    pub(crate) meta: SnapshotMetaOf<TypeConfig>,
    /// The coordinator's snapshot.
    pub(crate) state: Vec<u8>,
}

/// Writes `stored` as the folder's snapshot, durably, replacing the one
/// before.
///
/// # Errors
/// The file or the folder could not be written or synced.
pub(crate) fn write(
    folder: &Path,
    meta: &SnapshotMetaOf<TypeConfig>,
    state: &[u8],
) -> io::Result<()> {
    let meta = serde_json::to_vec(meta).map_err(io::Error::other)?;
    let meta_len = u32::try_from(meta.len()).map_err(io::Error::other)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&meta_len.to_le_bytes());
    hasher.update(&meta);
    hasher.update(state);
    let mut header = Vec::with_capacity(HEADER + meta.len());
    header.push(FILE_FORMAT);
    header.extend_from_slice(&hasher.finalize().to_le_bytes());
    header.extend_from_slice(&meta_len.to_le_bytes());
    header.extend_from_slice(&meta);
    write_atomically(folder, SNAPSHOT_FILE, &[&header, state]).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot write the snapshot {}: {e}; the data folder's disk must be fixed",
                folder.join(SNAPSHOT_FILE).display()
            ),
        )
    })
}

/// Reads the folder's snapshot, if it has one.
///
/// # Errors
/// A message that names the file, what is wrong and what to do.
pub(crate) fn read(folder: &Path) -> Result<Option<Stored>, String> {
    let path = folder.join(SNAPSHOT_FILE);
    let shown = path.display();
    let mut bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read the snapshot {shown}: {e}")),
    };
    let damaged = |what: &str| {
        format!(
            "the snapshot {shown} is damaged ({what}); restore the data folder from a backup, \
             or move the whole folder away to start empty"
        )
    };
    match bytes.first() {
        Some(&FILE_FORMAT) => {}
        Some(&format) if format > FILE_FORMAT => {
            return Err(format!(
                "the snapshot {shown} is in format {format}, written by a newer latchkey; this \
                 one reads format {FILE_FORMAT}: run the newer latchkey"
            ))
        }
        Some(&format) => return Err(damaged(&format!("unknown format {format}"))),
        None => return Err(damaged("it is empty")),
    }
    if bytes.len() < HEADER {
        return Err(damaged("it is shorter than its header"));
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    if crc32fast::hash(&bytes[5..]) != word(1) {
        return Err(damaged("its checksum does not match"));
    }
    let meta_end = usize::try_from(word(5))
        .ok()
        .and_then(|len| HEADER.checked_add(len))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| damaged("its metadata runs past its end"))?;
    let meta = serde_json::from_slice(&bytes[HEADER..meta_end])
        .map_err(|e| damaged(&format!("its metadata does not decode: {e}")))?;
    // In place: a snapshot can be as large as the tree.
    bytes.drain(..meta_end);
    Ok(Some(Stored { meta, state: bytes }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::type_config::alias::{LogIdOf, StoredMembershipOf};

    fn meta(index: u64) -> SnapshotMetaOf<TypeConfig> {
        SnapshotMetaOf::<TypeConfig> {
            last_log_id: Some(LogIdOf::<TypeConfig>::new_term_index(1, index)),
            last_membership: StoredMembershipOf::<TypeConfig>::default(),
        }
    }

    #[test]
    fn a_snapshot_reads_back_as_written_and_replaces_the_one_before() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        assert!(read(dir.path()).expect("no snapshot is fine").is_none());
        write(dir.path(), &meta(5), b"first").expect("written");
        write(dir.path(), &meta(9), b"second").expect("written");
        let stored = read(dir.path()).expect("readable").expect("present");
        assert_eq!(stored.meta, meta(9));
        assert_eq!(stored.state, b"second");
    }

    #[test]
    fn any_damaged_byte_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        write(dir.path(), &meta(5), b"some state").expect("written");
        let path = dir.path().join(SNAPSHOT_FILE);
        let good = std::fs::read(&path).expect("readable");
        for at in 1..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).expect("written");
            let Err(e) = read(dir.path()) else {
                panic!("a flipped byte at {at} was not noticed");
            };
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains("restore the data folder"), "{e}");
        }
        let mut newer = good.clone();
        newer[0] = FILE_FORMAT + 1;
        std::fs::write(&path, &newer).expect("written");
        let e = read(dir.path()).err().expect("refused");
        assert!(e.contains("newer latchkey"), "{e}");
        std::fs::write(&path, &good[..good.len() - 3]).expect("written");
        assert!(read(dir.path()).is_err(), "a cut file was accepted");
    }
}

//! The head's write-ahead journal on disk: `<state dir>/journal`.
//!
//! A header (magic, format, the journal's random id), then records: a 4-byte big-endian
//! length, a 4-byte CRC-32 of the body, and the body — one [`JournalEntry`] as named
//! MessagePack. Records are appended in batches, one `fdatasync` per batch (group commit).
//! Opening reads every whole record; a tail that is cut short or fails its checksum (a write
//! torn by a crash) is dropped — logged with its offset and size — and the file is cut back
//! to the last whole record, so the next append continues a valid journal.
//!
//! Compaction writes a new file beside it — the header (same id), a snapshot record with the
//! head's whole state, the records after it — makes it durable and renames it over the
//! journal: a crash at any point leaves the old journal or the new one, whole.

use chia_head_core::JournalEntry;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "journal";
/// The journal being compacted, until it is renamed over [`FILE_NAME`].
const COMPACTING_NAME: &str = "journal.compacting";
const MAGIC: &[u8; 8] = b"CHIAJNL\0";
/// Bumped when the record layout changes incompatibly.
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8;
/// A record longer than this is corruption, not an entry (frames are capped lower; a
/// snapshot larger than this is not written).
pub(crate) const MAX_RECORD: usize = chia_core::protocol::MAX_FRAME_BYTES + (1 << 20);

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a chia head journal (format {found:?}; this head reads format {FORMAT_VERSION})")]
    Foreign { path: PathBuf, found: Option<u32> },
    #[error(
        "{path}: the whole record at offset {offset} cannot be read ({message}); was it written by another version of chia-head?"
    )]
    Unreadable { path: PathBuf, offset: usize, message: String },
}

/// An open journal, positioned at its end.
pub(crate) struct Journal {
    path: PathBuf,
    file: File,
    id: u64,
    /// Where a failed batch begins when cutting it off failed too.
    torn_at: Option<u64>,
    /// Its size in bytes.
    len: u64,
}

/// What opening found.
pub(crate) struct Opened {
    pub journal: Journal,
    pub entries: Vec<JournalEntry>,
    /// Bytes cut from a torn or corrupt tail.
    pub dropped_bytes: u64,
}

impl Journal {
    /// Opens the journal of `state_dir`, creating a new one (with a new id) if there is none.
    pub(crate) fn open(state_dir: &Path) -> Result<Opened, JournalError> {
        let path = state_dir.join(FILE_NAME);
        // A compaction the previous run did not finish: the journal itself is whole.
        let _ = std::fs::remove_file(state_dir.join(COMPACTING_NAME));
        let io = |source| JournalError::Io { path: path.clone(), source };
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        if bytes.is_empty() {
            let id = new_id();
            file.write_all(&header(id)).map_err(io)?;
            file.sync_all().map_err(io)?;
            sync_dir(&path).map_err(io)?;
            let journal = Journal { path, file, id, torn_at: None, len: HEADER_LEN as u64 };
            return Ok(Opened { journal, entries: Vec::new(), dropped_bytes: 0 });
        }
        let format = bytes.get(8..12).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC || format != Some(FORMAT_VERSION) {
            return Err(JournalError::Foreign { path, found: format.filter(|_| &bytes[..8] == MAGIC) });
        }
        let id = u64::from_be_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let (entries, valid) = read_records(&bytes, &path)?;
        let dropped_bytes = (bytes.len() - valid) as u64;
        if dropped_bytes > 0 {
            tracing::warn!(
                "{}: dropped {dropped_bytes} byte(s) at offset {valid} after the last whole record (a write torn by a crash); {} entries recovered",
                path.display(),
                entries.len()
            );
            file.set_len(valid as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        let journal = Journal { path, file, id, torn_at: None, len: valid as u64 };
        Ok(Opened { journal, entries, dropped_bytes })
    }

    /// The journal's size in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Replaces the journal with one holding `snapshot` (an encoded
    /// [`JournalEntry::Snapshot`] record) and then `records`, durably: on failure the old
    /// journal is left as it was.
    pub(crate) fn start_again(&mut self, snapshot: &[u8], records: &[u8]) -> Result<(), JournalError> {
        let compacting = self.path.with_file_name(COMPACTING_NAME);
        let io = |source| JournalError::Io { path: compacting.clone(), source };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&compacting)
            .map_err(io)?;
        let written = file
            .write_all(&header(self.id))
            .and_then(|()| file.write_all(snapshot))
            .and_then(|()| file.write_all(records))
            .and_then(|()| file.sync_all())
            .and_then(|()| std::fs::rename(&compacting, &self.path))
            .and_then(|()| sync_dir(&self.path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&compacting);
            return Err(io(e));
        }
        self.file = file;
        self.torn_at = None;
        self.len = (HEADER_LEN + snapshot.len() + records.len()) as u64;
        Ok(())
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Appends the encoded records and makes them durable (one `fdatasync`).
    /// On failure the file is cut back to where it was, so a later append does not follow a
    /// torn batch.
    pub(crate) fn append(&mut self, records: &[u8]) -> Result<(), JournalError> {
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        if let Some(cut) = self.torn_at {
            // A failed batch could not be cut off: appending after it would hide every later
            // record behind it at the next start. Try the cut again first.
            self.file
                .set_len(cut)
                .and_then(|()| self.file.seek(SeekFrom::Start(cut)).map(drop))
                .map_err(io)?;
            self.torn_at = None;
        }
        // After the cut: a batch failing again is cut back to it, not to the torn tail.
        let end = self.file.stream_position().map_err(io)?;
        let written = self.file.write_all(records).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            if self.file.set_len(end).and_then(|()| self.file.seek(SeekFrom::Start(end)).map(drop)).is_err() {
                self.torn_at = Some(end);
            }
            return Err(io(e));
        }
        self.len = end + records.len() as u64;
        Ok(())
    }
}

fn header(id: u64) -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    header.extend_from_slice(&id.to_be_bytes());
    header
}

/// Makes the directory entry of `path` durable (a created or renamed file).
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir).and_then(|d| d.sync_all()),
        None => Ok(()),
    }
}

/// Appends one entry as a record to `out`.
pub(crate) fn encode_record(entry: &JournalEntry, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    if let Err(e) = rmp_serde::encode::write_named(out, entry) {
        // Every entry is a message that was decoded or made by the head: it encodes.
        tracing::error!("a journal entry could not be encoded ({e}); it is not kept");
        out.truncate(start);
        return;
    }
    let body = &out[start + 8..];
    let (len, crc) = (body.len() as u32, crc32fast::hash(body));
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

/// The whole records after the header, and where the valid part of the file ends.
fn read_records(bytes: &[u8], path: &Path) -> Result<(Vec<JournalEntry>, usize), JournalError> {
    let mut entries = Vec::new();
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        let Some(prefix) = bytes.get(at..at + 8) else { break };
        let len = u32::from_be_bytes(prefix[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_be_bytes(prefix[4..].try_into().expect("4 bytes"));
        if len > MAX_RECORD {
            break;
        }
        let Some(body) = bytes.get(at + 8..at + 8 + len) else { break };
        if crc32fast::hash(body) != crc {
            break;
        }
        match rmp_serde::from_slice::<JournalEntry>(body) {
            Ok(entry) => entries.push(entry),
            Err(e) => {
                // A whole record with a good checksum that does not decode was written by
                // another version: refuse rather than cut or replay a partial history.
                let (path, message) = (path.to_owned(), e.to_string());
                return Err(JournalError::Unreadable { path, offset: at, message });
            }
        }
        at += 8 + len;
    }
    Ok((entries, at))
}

/// A journal id unlikely to repeat: a peer of an older journal must not take up a session
/// of a newer one.
fn new_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chia_core::SessionId;

    fn closed(n: u64) -> JournalEntry {
        JournalEntry::Closed { session: SessionId(n), reason: format!("reason {n}") }
    }

    fn append(dir: &Path, entries: &[JournalEntry]) -> u64 {
        let mut opened = Journal::open(dir).unwrap();
        let mut records = Vec::new();
        for entry in entries {
            encode_record(entry, &mut records);
        }
        opened.journal.append(&records).unwrap();
        opened.journal.id()
    }

    #[test]
    fn entries_survive_a_reopen_under_the_same_id() {
        let dir = tempfile::tempdir().unwrap();
        let id = append(dir.path(), &[closed(1), closed(2)]);
        assert_eq!(append(dir.path(), &[closed(3)]), id);
        let opened = Journal::open(dir.path()).unwrap();
        assert_eq!(opened.entries, [closed(1), closed(2), closed(3)]);
        assert_eq!((opened.journal.id(), opened.dropped_bytes), (id, 0));
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_dropped_and_cut_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        append(dir.path(), &[closed(1), closed(2)]);
        let path = dir.path().join(FILE_NAME);
        let whole = std::fs::metadata(&path).unwrap().len();
        // Half a record, as a crash in the middle of a write leaves it.
        let mut torn = Vec::new();
        encode_record(&closed(3), &mut torn);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&torn[..torn.len() / 2]).unwrap();
        let opened = Journal::open(dir.path()).unwrap();
        assert_eq!(opened.entries, [closed(1), closed(2)]);
        assert_eq!(opened.dropped_bytes, (torn.len() / 2) as u64);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        drop(opened);
        // A flipped bit in the last record: that record goes, the ones before stay.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let opened = Journal::open(dir.path()).unwrap();
        assert_eq!(opened.entries, [closed(1)]);
        // And appending goes on from the cut.
        let mut journal = opened.journal;
        let mut record = Vec::new();
        encode_record(&closed(4), &mut record);
        journal.append(&record).unwrap();
        assert_eq!(Journal::open(dir.path()).unwrap().entries, [closed(1), closed(4)]);
    }

    #[test]
    fn a_journal_started_again_from_a_snapshot_keeps_its_id_and_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let id = append(dir.path(), &[closed(1), closed(2), closed(3)]);
        let mut opened = Journal::open(dir.path()).unwrap();
        // The journal layer does not look inside: any entry stands for the snapshot here.
        let (mut snapshot, mut after) = (Vec::new(), Vec::new());
        encode_record(&closed(30), &mut snapshot);
        encode_record(&closed(4), &mut after);
        opened.journal.start_again(&snapshot, &after).unwrap();
        let len = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
        assert_eq!(opened.journal.len(), len);
        let mut record = Vec::new();
        encode_record(&closed(5), &mut record);
        opened.journal.append(&record).unwrap();
        let reopened = Journal::open(dir.path()).unwrap();
        assert_eq!(reopened.entries, [closed(30), closed(4), closed(5)]);
        assert_eq!(reopened.journal.id(), id);
        assert!(!dir.path().join(COMPACTING_NAME).exists());
    }

    #[test]
    fn a_file_that_is_not_a_journal_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"something else entirely").unwrap();
        let error = Journal::open(dir.path()).err().expect("refused");
        assert!(error.to_string().contains("is not a chia head journal"), "{error}");
    }
}

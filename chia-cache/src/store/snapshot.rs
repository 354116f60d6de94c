//! The index snapshot, `.chia-index.snapshot`: what a store's index held when it was saved, so
//! that a warm start reads the headers only of the files that changed since.
//!
//! Little-endian; a 24-byte header (`"CHIAIDX\0"`, version 1 as a `u16`, six zero bytes, the
//! number of records as a `u64`), the records, then a CRC-32 of everything before it. A record
//! is the file-name digest (`u64`), the file's size (`u64`), its modification time in
//! nanoseconds since the Unix epoch (`i64`), the expiry in milliseconds (`u64`, 0 for never),
//! the tag's length (`u32`) and the tag. Records are in the order a full scan gives: by
//! modification time, then file name.
//!
//! A snapshot is a hint, never the truth: the warm start checks it against the directory (see
//! `warm_start.rs`), so a snapshot that is stale, damaged or missing costs time, not
//! correctness. It is written to a temporary file renamed into place, without a sync.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::naming::{self, SNAPSHOT_FILE_NAME};

const MAGIC: [u8; 8] = *b"CHIAIDX\0";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 24;
/// Bytes of a record besides its tag.
const RECORD_FIXED_LEN: usize = 36;

/// One entry as saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SavedEntry {
    pub tag: Arc<str>,
    pub digest: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub expires_at: u64,
}

/// Puts `entries` in full-scan order: modification time, then file name (computed only for
/// entries whose times tie).
pub(crate) fn sort_like_a_scan(entries: &mut [SavedEntry]) {
    entries.sort_unstable_by_key(|entry| entry.mtime_ns);
    let mut start = 0;
    while start < entries.len() {
        let mtime = entries[start].mtime_ns;
        let end = start + entries[start..].iter().take_while(|entry| entry.mtime_ns == mtime).count();
        if end - start > 1 {
            entries[start..end]
                .sort_by_cached_key(|entry| naming::name_with_digest(&entry.tag, entry.digest));
        }
        start = end;
    }
}

/// Saves `entries` (in any order) as the snapshot of `dir`, through the temporary file
/// `temp`.
pub(crate) fn save(dir: &Path, mut entries: Vec<SavedEntry>, temp: PathBuf) -> io::Result<()> {
    sort_like_a_scan(&mut entries);
    let tag_bytes: usize = entries.iter().map(|entry| entry.tag.len()).sum();
    let mut bytes = Vec::with_capacity(HEADER_LEN + entries.len() * RECORD_FIXED_LEN + tag_bytes + 4);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&[0u8; 6]);
    bytes.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for entry in &entries {
        bytes.extend_from_slice(&entry.digest.to_le_bytes());
        bytes.extend_from_slice(&entry.size.to_le_bytes());
        bytes.extend_from_slice(&entry.mtime_ns.to_le_bytes());
        bytes.extend_from_slice(&entry.expires_at.to_le_bytes());
        bytes.extend_from_slice(&(entry.tag.len() as u32).to_le_bytes());
        bytes.extend_from_slice(entry.tag.as_bytes());
    }
    let checksum = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    let written = super::permissions::private_file_options()
        .write(true)
        .create_new(true)
        .open(&temp)
        .and_then(|mut file| file.write_all(&bytes))
        .and_then(|()| fs::rename(&temp, dir.join(SNAPSHOT_FILE_NAME)));
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

/// A snapshot as loaded: its records in full-scan order, findable by file-name digest.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// Every record's tag, one after the other.
    tags: String,
    records: Vec<Record>,
    /// The records' digests and what a warm start compares, sorted by digest: a directory
    /// listing sorted the same way is matched against it in one pass, without the cache misses
    /// of a million random lookups.
    by_digest: Vec<Keyed>,
}

/// A record as the directory listing is matched against it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Keyed {
    pub digest: u64,
    pub size: u64,
    pub mtime_ns: i64,
    /// The record's position in [`Snapshot::records`].
    pub index: u32,
}

/// A record, its tag a range of [`Snapshot::tags`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Record {
    pub digest: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub expires_at: u64,
    tag_at: usize,
    tag_len: usize,
}

impl Snapshot {
    /// The snapshot of `dir`; `None` if there is none or it is not valid (logged).
    pub(crate) fn load(dir: &Path) -> Option<Snapshot> {
        let path = dir.join(SNAPSHOT_FILE_NAME);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cache warm start: cannot read the index snapshot; scanning every file");
                return None;
            }
        };
        match Snapshot::parse(bytes) {
            Ok(snapshot) => Some(snapshot),
            Err(reason) => {
                tracing::warn!(path = %path.display(), reason, "cache warm start: ignoring the index snapshot; scanning every file");
                None
            }
        }
    }

    fn parse(bytes: Vec<u8>) -> Result<Snapshot, &'static str> {
        if bytes.len() < HEADER_LEN + 4 || bytes[..8] != MAGIC {
            return Err("not a snapshot");
        }
        if u16::from_le_bytes([bytes[8], bytes[9]]) != VERSION {
            return Err("unknown version");
        }
        let body_end = bytes.len() - 4;
        let stored = u32::from_le_bytes([
            bytes[body_end],
            bytes[body_end + 1],
            bytes[body_end + 2],
            bytes[body_end + 3],
        ]);
        if crc32fast::hash(&bytes[..body_end]) != stored {
            return Err("checksum mismatch");
        }
        let u64_at = |at: usize| {
            let mut field = [0u8; 8];
            field.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(field)
        };
        let count = usize::try_from(u64_at(16)).map_err(|_| "too many records")?;
        if count > (body_end - HEADER_LEN) / RECORD_FIXED_LEN {
            return Err("more records than bytes");
        }
        let mut records = Vec::with_capacity(count);
        let mut tags = String::with_capacity(body_end - HEADER_LEN - count * RECORD_FIXED_LEN);
        let mut by_digest = Vec::with_capacity(count);
        let mut at = HEADER_LEN;
        for index in 0..count {
            if at + RECORD_FIXED_LEN > body_end {
                return Err("truncated");
            }
            let tag_len =
                u32::from_le_bytes([bytes[at + 32], bytes[at + 33], bytes[at + 34], bytes[at + 35]]) as usize;
            let tag_at = at + RECORD_FIXED_LEN;
            if tag_at + tag_len > body_end {
                return Err("truncated");
            }
            let tag =
                std::str::from_utf8(&bytes[tag_at..tag_at + tag_len]).map_err(|_| "a tag is not UTF-8")?;
            let record = Record {
                digest: u64_at(at),
                size: u64_at(at + 8),
                mtime_ns: u64_at(at + 16) as i64,
                expires_at: u64_at(at + 24),
                tag_at: tags.len(),
                tag_len,
            };
            tags.push_str(tag);
            by_digest.push(Keyed {
                digest: record.digest,
                size: record.size,
                mtime_ns: record.mtime_ns,
                index: index as u32,
            });
            records.push(record);
            at = tag_at + tag_len;
        }
        if at != body_end {
            return Err("bytes after the last record");
        }
        by_digest.sort_unstable_by_key(|keyed| keyed.digest);
        Ok(Snapshot { tags, records, by_digest })
    }

    pub(crate) fn records(&self) -> &[Record] {
        &self.records
    }

    pub(crate) fn tag(&self, record: &Record) -> &str {
        &self.tags[record.tag_at..record.tag_at + record.tag_len]
    }

    /// The records sorted by file-name digest.
    pub(crate) fn by_digest(&self) -> &[Keyed] {
        &self.by_digest
    }

    /// The record whose entry file is `name`, if the snapshot has one (a lookup by binary
    /// search; the warm start matches whole listings with [`Snapshot::by_digest`] instead).
    #[cfg(test)]
    pub(crate) fn find(&self, name: &str) -> Option<(usize, &Record)> {
        let digest = naming::digest_of_name(name)?;
        let start = self.by_digest.partition_point(|keyed| keyed.digest < digest);
        self.by_digest[start..].iter().take_while(|keyed| keyed.digest == digest).find_map(|keyed| {
            let record = &self.records[keyed.index as usize];
            naming::is_name_of(name, self.tag(record), digest).then_some((keyed.index as usize, record))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(tag: &str, mtime_ns: i64) -> SavedEntry {
        SavedEntry {
            tag: Arc::from(tag),
            digest: naming::name_digest(tag),
            size: 40,
            mtime_ns,
            expires_at: 7,
        }
    }

    #[test]
    fn a_saved_snapshot_loads_in_scan_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let entries = vec![saved("late", 30), saved("d", 20), saved("b", 20), saved("early", 10)];
        save(dir.path(), entries, dir.path().join("temp")).expect("save");
        let snapshot = Snapshot::load(dir.path()).expect("load");
        let tags: Vec<&str> = snapshot.records().iter().map(|record| snapshot.tag(record)).collect();
        assert_eq!(tags, ["early", "b", "d", "late"]);
        let (index, record) = snapshot.find(&naming::entry_file_name("d")).expect("found by name");
        assert_eq!((index, record.size, record.mtime_ns, record.expires_at), (2, 40, 20, 7));
        assert!(snapshot.find(&naming::entry_file_name("absent")).is_none());
        assert!(!dir.path().join("temp").exists());
    }

    #[test]
    fn a_damaged_snapshot_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        save(dir.path(), vec![saved("a", 1)], dir.path().join("temp")).expect("save");
        let path = dir.path().join(SNAPSHOT_FILE_NAME);
        let mut bytes = fs::read(&path).expect("read");
        bytes[HEADER_LEN + 3] ^= 1;
        fs::write(&path, &bytes).expect("write");
        assert!(Snapshot::load(dir.path()).is_none());
        fs::write(&path, &bytes[..10]).expect("write");
        assert!(Snapshot::load(dir.path()).is_none());
    }
}

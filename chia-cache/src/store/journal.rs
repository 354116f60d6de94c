//! The journal of a store opened with [`crate::Durability::Full`]: the file that group commit
//! makes durable with one data sync per batch, and that an open replays after a crash.
//!
//! A journal is `.chia-journal-<generation>.log`: a 16-byte header (`"CHIAJRNL"`, version 1 as
//! a little-endian `u16`, six zero bytes), then records, each a 24-byte frame and a body:
//!
//! ```text
//! offset  size  field
//!      0     1  kind: 1 put, 2 remove
//!      1     3  zero
//!      4     4  CRC-32 of bytes 0..4 and 8..24, and of the body unless the kind is put
//!      8     8  body length in bytes
//!     16     8  put: the entry file's modification time, nanoseconds since the Unix epoch
//!               (little-endian i64); remove: 0
//!     24        body: put, the entry's complete file (which checks itself); remove, the tag
//! ```
//!
//! - **put**: the entry file of the tag must hold exactly this body. A replay that writes it
//!   again gives it the recorded modification time, so that it keeps its place in the LRU
//!   order (an entry since evicted to make room comes back as old as it was).
//! - **remove**: the tag's entry was removed on request (evict, evict_matching, flush); its
//!   file must not be there.
//!
//! The file is filled with zeros ahead of the records, 4 MiB at a time, so that the sync of
//! a batch writes only the batch's data: appending into blocks already written changes no
//! metadata that `fdatasync` must write too (the file's length, its extents), which on a file
//! system without a journal of its own halves the I/O of each sync. An all-zero frame is the
//! end of the records.
//!
//! Replay reads the generations in order and each one up to its first record that is not
//! complete and valid (a write torn by the crash); for each tag the last record wins. A put
//! whose file is missing or differs is written again, a remove's file is deleted. The
//! rewritten files are synced and the journals deleted before the store serves anything.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, IoSlice, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::format;
use super::naming;

pub(crate) const HEADER_LEN: usize = 16;
const HEADER: [u8; HEADER_LEN] = *b"CHIAJRNL\x01\0\0\0\0\0\0\0";
pub(crate) const FRAME_LEN: usize = 24;
/// How far ahead of the records the file is filled with zeros.
const ZERO_FILL_CHUNK: u64 = 4 << 20;

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Put = 1,
    Remove = 2,
}

/// The frame of a record of `kind` whose body is `body`; `mtime_ns` is a put's file time.
pub(crate) fn frame(kind: Kind, body: &[u8], mtime_ns: i64) -> [u8; FRAME_LEN] {
    let mut frame = [0u8; FRAME_LEN];
    frame[0] = kind as u8;
    frame[8..16].copy_from_slice(&(body.len() as u64).to_le_bytes());
    frame[16..24].copy_from_slice(&mtime_ns.to_le_bytes());
    let checksum = frame_checksum(&frame, kind, body);
    frame[4..8].copy_from_slice(&checksum.to_le_bytes());
    frame
}

fn frame_checksum(frame: &[u8; FRAME_LEN], kind: Kind, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&frame[0..4]);
    hasher.update(&frame[8..24]);
    if kind != Kind::Put {
        hasher.update(body);
    }
    hasher.finalize()
}

/// A remove record, frame and body.
pub(crate) fn tag_record(kind: Kind, tag: &str) -> Vec<u8> {
    let mut record = Vec::with_capacity(FRAME_LEN + tag.len());
    record.extend_from_slice(&frame(kind, tag.as_bytes(), 0));
    record.extend_from_slice(tag.as_bytes());
    record
}

/// The journal being appended to.
#[derive(Debug)]
pub(crate) struct JournalFile {
    file: File,
    path: PathBuf,
    generation: u64,
    /// Bytes of records written so far, the header included: where the next record goes.
    len: u64,
    /// Bytes of the file written (records, then zeros).
    filled: u64,
}

impl JournalFile {
    /// Creates the journal of `generation` in `dir` and makes its name durable (a directory
    /// sync), so that records synced into it are found after a power loss.
    pub(crate) fn create(dir: &Path, generation: u64) -> io::Result<JournalFile> {
        let path = dir.join(naming::journal_file_name(generation));
        let file = super::permissions::private_file_options().write(true).create_new(true).open(&path)?;
        let mut journal = JournalFile { file, path, generation, len: 0, filled: 0 };
        let created = (|| {
            (&journal.file).write_all(&HEADER)?;
            journal.len = HEADER.len() as u64;
            journal.filled = journal.len;
            journal.fill_ahead();
            journal.file.sync_data()?;
            sync_dir(dir)
        })();
        match created {
            Ok(()) => Ok(journal),
            Err(error) => {
                let _ = fs::remove_file(&journal.path);
                Err(error)
            }
        }
    }

    /// Fills the file with zeros to the chunk boundary after the next one. Best effort: if the
    /// disk refuses, the records still go in, their syncs just write the length too.
    fn fill_ahead(&mut self) {
        let end = self.filled.div_ceil(ZERO_FILL_CHUNK) * ZERO_FILL_CHUNK + ZERO_FILL_CHUNK;
        if let Err(error) = self.fill_zeros(end) {
            tracing::debug!(path = %self.path.display(), %error, "cache journal: cannot fill ahead");
        }
    }

    /// Writes zeros from the end of what is filled up to `end`, leaving the file position at
    /// the end of the records.
    fn fill_zeros(&mut self, end: u64) -> io::Result<()> {
        use std::io::Seek;
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        if end <= self.filled {
            return Ok(());
        }
        let mut file: &File = &self.file;
        file.seek(io::SeekFrom::Start(self.filled))?;
        let mut remaining = end - self.filled;
        let outcome = (|| {
            while remaining > 0 {
                let chunk = remaining.min(ZEROS.len() as u64) as usize;
                file.write_all(&ZEROS[..chunk])?;
                remaining -= chunk as u64;
            }
            Ok(())
        })();
        self.filled = end - remaining;
        file.seek(io::SeekFrom::Start(self.len))?;
        outcome
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Appends `slices`, whole. On an error the journal is cut back to where it was, so that
    /// a torn record cannot hide the records appended after it; if even that fails, the error
    /// says so and the caller must start a new generation.
    pub(crate) fn append(&mut self, slices: &[IoSlice<'_>]) -> io::Result<()> {
        let total: usize = slices.iter().map(|slice| slice.len()).sum();
        let end = self.len + total as u64;
        let outcome = (|| {
            write_all_vectored(&self.file, slices)?;
            if end > self.filled {
                // Past the zeros: fill ahead again, so that the syncs after the next one
                // write only data.
                self.filled = end;
                let start = self.len;
                self.len = end;
                self.fill_ahead();
                self.len = start;
            }
            Ok(())
        })();
        match outcome {
            Ok(()) => {
                self.len = end;
                Ok(())
            }
            Err(error) => {
                self.filled = self.filled.max(end);
                self.cut_back();
                Err(error)
            }
        }
    }

    /// Forces what was appended to stable storage.
    #[cfg(test)]
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// A handle of its own to sync a batch's records with (`fdatasync`), while later batches
    /// append. Opened before the batch appends: a write-back error is reported to every file
    /// handle opened before it happened, whereas handles sharing one open file would see it
    /// only once (whichever syncs first), and another batch could take its lost records for
    /// durable.
    pub(crate) fn sync_handle(&self) -> io::Result<File> {
        std::fs::OpenOptions::new().write(true).open(&self.path)
    }

    /// Zeroes whatever was written past the last successful append (best effort), so that a
    /// replay does not take a failed batch's records for written ones.
    pub(crate) fn cut_back(&mut self) {
        use std::io::Seek;
        let end = self.filled;
        self.filled = self.len;
        if let Err(error) =
            self.fill_zeros(end).and_then(|()| (&self.file).seek(io::SeekFrom::Start(self.len)).map(drop))
        {
            tracing::warn!(path = %self.path.display(), %error, "cache journal: cannot cut back a failed append");
        }
    }
}

/// Writes all of `slices` to `file`, in as few system calls as it takes.
pub(crate) fn write_all_vectored(mut file: &File, slices: &[IoSlice<'_>]) -> io::Result<()> {
    let mut owned: Vec<IoSlice<'_>> = slices.to_vec();
    let mut remaining: &mut [IoSlice<'_>] = &mut owned;
    while !remaining.is_empty() {
        match file.write_vectored(remaining) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "a write wrote nothing")),
            Ok(written) => IoSlice::advance_slices(&mut remaining, written),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// fsync of a directory: makes the names created, renamed and removed in it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes every entry file renamed into `dir` so far durable, with its name. On Linux one
/// `syncfs` does it whatever the number of files (the price: it also flushes whatever else is
/// dirty on that file system); elsewhere each of `files` is synced, then the directory.
pub(crate) fn sync_entries(dir: &Path, files: &[PathBuf]) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let _ = files;
        rustix::fs::syncfs(File::open(dir)?).map_err(io::Error::from)
    }
    #[cfg(not(target_os = "linux"))]
    {
        for path in files {
            match File::open(path) {
                Ok(file) => file.sync_all()?,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        sync_dir(dir)
    }
}

/// Whether [`sync_entries`] needs the list of files (everywhere but Linux).
pub(crate) const SYNC_NEEDS_FILE_LIST: bool = !cfg!(target_os = "linux");

/// What a tag's last record says.
#[derive(Debug)]
enum Last {
    /// `(journal, range, mtime_ns)`: the body within that journal's bytes, and the file's
    /// modification time.
    Put(usize, Range<usize>, i64),
    Remove,
}

/// What the journals of a directory hold, read at open.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    journals: Vec<PathBuf>,
    contents: Vec<Vec<u8>>,
    last: HashMap<String, Last>,
    /// Records read, and journals whose tail was torn.
    pub records: usize,
    pub torn: usize,
}

/// What replaying did.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    pub rewritten: usize,
    pub removed: usize,
}

impl Replay {
    /// Reads the journals `generations` of `dir`, oldest first.
    pub(crate) fn read(dir: &Path, mut generations: Vec<u64>) -> io::Result<Replay> {
        generations.sort_unstable();
        let mut replay = Replay::default();
        for generation in generations {
            let path = dir.join(naming::journal_file_name(generation));
            let bytes = fs::read(&path)?;
            let journal = replay.contents.len();
            let (records, complete) = parse(&bytes, |kind, tag, body, mtime_ns| {
                let last = match kind {
                    Kind::Put => Last::Put(journal, body, mtime_ns),
                    Kind::Remove => Last::Remove,
                };
                replay.last.insert(tag, last);
            });
            replay.records += records;
            if !complete {
                replay.torn += 1;
                tracing::warn!(path = %path.display(), records, "cache journal: ignoring a torn tail after the last complete record");
            }
            replay.contents.push(bytes);
            replay.journals.push(path);
        }
        Ok(replay)
    }

    /// Brings the entry files in line with the journals' last word on each tag, makes that
    /// durable, then deletes the journals.
    pub(crate) fn apply(self, dir: &Path, temp_path: &mut dyn FnMut() -> PathBuf) -> io::Result<Replayed> {
        let mut replayed = Replayed::default();
        let mut rewritten = Vec::new();
        for (tag, last) in &self.last {
            let path = dir.join(naming::entry_file_name(tag));
            match last {
                Last::Put(journal, range, mtime_ns) => {
                    let body = &self.contents[*journal][range.clone()];
                    match fs::read(&path) {
                        Ok(existing) if existing == body => continue,
                        Ok(_) => {}
                        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                        Err(error) => return Err(error),
                    }
                    let temp = temp_path();
                    let written = super::permissions::private_file_options()
                        .write(true)
                        .create_new(true)
                        .open(&temp)
                        .and_then(|mut file| {
                            file.write_all(body)?;
                            file.set_modified(time_from_ns(*mtime_ns))
                        })
                        .and_then(|()| fs::rename(&temp, &path));
                    if let Err(error) = written {
                        let _ = fs::remove_file(&temp);
                        return Err(error);
                    }
                    rewritten.push(path);
                    replayed.rewritten += 1;
                }
                Last::Remove => match fs::remove_file(&path) {
                    Ok(()) => replayed.removed += 1,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => return Err(error),
                },
            }
        }
        if !self.journals.is_empty() {
            sync_entries(dir, &rewritten)?;
            for journal in &self.journals {
                fs::remove_file(journal)?;
            }
            sync_dir(dir)?;
        }
        Ok(replayed)
    }
}

/// `nanos` since the Unix epoch (negative before it) as a time.
fn time_from_ns(nanos: i64) -> std::time::SystemTime {
    let epoch = std::time::UNIX_EPOCH;
    let magnitude = std::time::Duration::from_nanos(nanos.unsigned_abs());
    if nanos >= 0 { epoch + magnitude } else { epoch - magnitude }
}

/// Calls `record` with each complete, valid record of a journal's `bytes` (its kind, tag, the
/// body's range and the frame's modification time), in order. Returns how many there were and whether the
/// journal ended cleanly after the last one.
fn parse(bytes: &[u8], mut record: impl FnMut(Kind, String, Range<usize>, i64)) -> (usize, bool) {
    if bytes.len() < HEADER.len() || bytes[..HEADER.len()] != HEADER {
        return (0, bytes.is_empty());
    }
    let mut at = HEADER.len();
    let mut count = 0;
    while at < bytes.len() {
        let Some(frame) = bytes.get(at..at + FRAME_LEN) else { return (count, false) };
        let mut frame_bytes = [0u8; FRAME_LEN];
        frame_bytes.copy_from_slice(frame);
        if frame_bytes == [0u8; FRAME_LEN] {
            // The zeros ahead of the records.
            return (count, true);
        }
        let kind = match frame_bytes[0] {
            1 => Kind::Put,
            2 => Kind::Remove,
            _ => return (count, false),
        };
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&frame_bytes[8..16]);
        let Ok(body_len) = usize::try_from(u64::from_le_bytes(len_bytes)) else { return (count, false) };
        let body_start = at + FRAME_LEN;
        let Some(body_end) = body_start.checked_add(body_len).filter(|end| *end <= bytes.len()) else {
            return (count, false);
        };
        let body = &bytes[body_start..body_end];
        let stored = u32::from_le_bytes([frame_bytes[4], frame_bytes[5], frame_bytes[6], frame_bytes[7]]);
        if frame_bytes[1..4] != [0, 0, 0] || frame_checksum(&frame_bytes, kind, body) != stored {
            return (count, false);
        }
        let tag = match kind {
            Kind::Put => match valid_entry_tag(body) {
                Some(tag) => tag,
                None => return (count, false),
            },
            Kind::Remove => match String::from_utf8(body.to_vec()) {
                Ok(tag) => tag,
                Err(_) => return (count, false),
            },
        };
        let mut mtime = [0u8; 8];
        mtime.copy_from_slice(&frame_bytes[16..24]);
        record(kind, tag, body_start..body_end, i64::from_le_bytes(mtime));
        count += 1;
        at = body_end;
    }
    (count, true)
}

/// The tag of `body` if it is a complete, valid entry file.
fn valid_entry_tag(body: &[u8]) -> Option<String> {
    let mut reader = body;
    let prefix = format::read_prefix(&mut reader).ok()?;
    (prefix.file_len() == body.len() as u64 && prefix.payload_matches(reader)).then_some(prefix.tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_record(tag: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = format::encode_prefix(tag, payload, 0, payload.len());
        body.extend_from_slice(payload);
        let mut record = frame(Kind::Put, &body, 1_700_000_000_000_000_000).to_vec();
        record.extend_from_slice(&body);
        record
    }

    fn journal(records: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = HEADER.to_vec();
        for record in records {
            bytes.extend_from_slice(record);
        }
        bytes
    }

    fn parsed(bytes: &[u8]) -> (Vec<(Kind, String)>, bool) {
        let mut found = Vec::new();
        let (count, complete) = parse(bytes, |kind, tag, _, _| found.push((kind, tag)));
        assert_eq!(count, found.len());
        (found, complete)
    }

    #[test]
    fn records_parse_in_order() {
        let bytes = journal(&[put_record("a", b"1"), tag_record(Kind::Remove, "a"), put_record("b", b"2")]);
        let (found, complete) = parsed(&bytes);
        assert!(complete);
        assert_eq!(
            found,
            [(Kind::Put, "a".to_owned()), (Kind::Remove, "a".to_owned()), (Kind::Put, "b".to_owned())]
        );
        let mut times = Vec::new();
        parse(&bytes, |_, _, _, mtime| times.push(mtime));
        assert_eq!(times, [1_700_000_000_000_000_000, 0, 1_700_000_000_000_000_000]);
    }

    #[test]
    fn zeros_after_the_records_are_a_clean_end() {
        let mut bytes = journal(&[put_record("a", b"1")]);
        bytes.extend_from_slice(&[0u8; 100]);
        assert_eq!(parsed(&bytes), (vec![(Kind::Put, "a".to_owned())], true));
    }

    #[test]
    fn an_appended_journal_reads_back_and_a_failed_append_is_zeroed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut journal = JournalFile::create(dir.path(), 3).expect("create");
        let first = put_record("a", &[1u8; 5000]);
        let second = tag_record(Kind::Remove, "a");
        journal.append(&[IoSlice::new(&first)]).expect("append");
        journal.append(&[IoSlice::new(&second[..5]), IoSlice::new(&second[5..])]).expect("append");
        journal.sync().expect("sync");
        assert_eq!(journal.len(), (HEADER_LEN + first.len() + second.len()) as u64);
        // A record that made it to the file, then was cut back as if its batch had failed.
        let third = put_record("b", b"2");
        journal.append(&[IoSlice::new(&third)]).expect("append");
        journal.len -= third.len() as u64;
        journal.cut_back();
        let bytes = fs::read(journal.path()).expect("read");
        assert!(bytes.len() as u64 >= ZERO_FILL_CHUNK, "filled ahead");
        assert_eq!(parsed(&bytes), (vec![(Kind::Put, "a".to_owned()), (Kind::Remove, "a".to_owned())], true));
        let replay = Replay::read(dir.path(), vec![3]).expect("replay");
        assert_eq!((replay.records, replay.torn), (2, 0));
    }

    #[test]
    fn a_torn_or_damaged_record_ends_the_journal() {
        let records = [put_record("a", &[7u8; 100]), put_record("b", &[8u8; 100])];
        let bytes = journal(&records);
        // Cut anywhere inside the second record: only the first one counts.
        let second = HEADER.len() + records[0].len();
        for cut in [second + 1, second + FRAME_LEN, bytes.len() - 1] {
            let (found, complete) = parsed(&bytes[..cut]);
            assert_eq!((found.len(), complete), (1, false), "cut at {cut}");
        }
        // A flipped byte in the second record's payload, frame or in a remove's tag.
        for at in [second + 2, second + 9, bytes.len() - 3] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert_eq!(parsed(&damaged).0.len(), 1, "flip at {at}");
        }
        let mut removal = journal(&[tag_record(Kind::Remove, "abc")]);
        let last = removal.len() - 1;
        removal[last] ^= 1;
        assert_eq!(parsed(&removal), (vec![], false));
    }
}

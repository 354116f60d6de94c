//! Rebuilding the index from the files a previous store left in the directory.
//!
//! Only headers are read (the header and the tag of each file), so opening takes the same
//! time whatever the payloads weigh; payload checksums are verified when an entry is read.
//! Recency comes from file modification times (a store sets a file's mtime when it writes or
//! reads it), oldest first, ties broken by file name.
//!
//! With an index snapshot (see `snapshot.rs`), even headers are read only for the files that
//! changed: the directory is listed and every entry file's size and modification time looked
//! up (one `stat` each, no open). A file the snapshot lists with that very size and time is
//! taken from it; any other file (newer, changed, or not in the snapshot) has its header read
//! as a full scan would, and a snapshot entry whose file is gone is dropped. The index is then
//! the one a full scan builds: the same entries, sizes, expiries and order. (A change that keeps
//! a file's size and resets its modification time is not seen until the entry is read, where
//! its checksums still catch it.)
//!
//! Journals left by a crash (see `journal.rs`) are replayed first.

use std::cmp::Ordering;
use std::fs::{self, DirEntry, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::format::{self, PrefixError};
use super::index::{EntryMeta, Gauges, LruIndex};
use super::journal::Replay;
use super::naming::{self, FileKind};
use super::snapshot::{Keyed, Record, Snapshot};
use crate::CacheError;

/// What a warm start found.
#[derive(Debug, Default)]
pub(crate) struct WarmStart {
    pub index: LruIndex,
    pub removed_temp_files: usize,
    pub removed_damaged_files: usize,
    pub skipped_files: usize,
    pub evicted_over_budget: usize,
    /// Entries taken from the snapshot without reading their file.
    pub from_snapshot: usize,
    /// Entry files whose header was read.
    pub headers_read: usize,
    /// Journal records replayed, and entry files they rewrote or removed.
    pub journal_records: usize,
    pub journal_rewrites: usize,
}

/// How to open: what `load` needs besides the directory.
pub(crate) struct LoadOptions<'a> {
    pub budget: u64,
    pub gauges: Arc<Gauges>,
    /// Whether to use the index snapshot (tests compare with a full scan).
    pub use_snapshot: bool,
    /// A fresh temporary file name, for journal replay.
    pub temp_path: &'a mut dyn FnMut() -> PathBuf,
}

/// A file's modification time in nanoseconds since the Unix epoch (negative before it,
/// saturating far from it).
pub(crate) fn system_time_ns(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |nanos| -nanos),
    }
}

struct FoundEntry {
    tag: String,
    meta: EntryMeta,
    file_name: String,
}

enum Inspection {
    Found(FoundEntry),
    /// Someone else's file, a newer format, or unreadable now: left alone.
    Skip(String),
    /// One of our entries, damaged: deleted so it does not take space outside the budget.
    Damaged(String),
}

/// What one listing of the directory found.
#[derive(Default)]
struct Listing {
    /// Per snapshot record: its file is there, unchanged.
    trusted: Vec<bool>,
    found: Vec<FoundEntry>,
    journals: Vec<u64>,
    /// Entry files whose header was read.
    inspected: usize,
    removed_temp_files: usize,
    removed_damaged_files: usize,
    skipped_files: usize,
}

/// Replays journals, lists `dir` (removing leftovers of interrupted writes) and returns the
/// index of the valid entries, evicting least recently used ones beyond the budget.
pub(crate) fn load(dir: &Path, options: LoadOptions<'_>) -> Result<WarmStart, CacheError> {
    let open_error = |source| CacheError::OpenDirectory { dir: dir.to_owned(), source };
    let snapshot = if options.use_snapshot { Snapshot::load(dir) } else { None };
    let mut listing = list(dir, snapshot.as_ref()).map_err(open_error)?;
    let mut warm = WarmStart::default();
    if !listing.journals.is_empty() {
        // A crash: bring the files in line with the journals, then look again.
        let replay = Replay::read(dir, std::mem::take(&mut listing.journals)).map_err(open_error)?;
        warm.journal_records = replay.records;
        let replayed = replay.apply(dir, options.temp_path).map_err(open_error)?;
        warm.journal_rewrites = replayed.rewritten + replayed.removed;
        let again = list(dir, snapshot.as_ref()).map_err(open_error)?;
        listing = Listing {
            removed_temp_files: listing.removed_temp_files + again.removed_temp_files,
            removed_damaged_files: listing.removed_damaged_files + again.removed_damaged_files,
            ..again
        };
    }
    warm.removed_temp_files = listing.removed_temp_files;
    warm.removed_damaged_files = listing.removed_damaged_files;
    warm.skipped_files = listing.skipped_files;
    warm.headers_read = listing.inspected;

    let mut found = listing.found;
    found.sort_by(|a, b| (a.meta.mtime_ns, &a.file_name).cmp(&(b.meta.mtime_ns, &b.file_name)));
    let trusted: Vec<&Record> = match &snapshot {
        Some(snapshot) => snapshot
            .records()
            .iter()
            .zip(&listing.trusted)
            .filter_map(|(record, trusted)| trusted.then_some(record))
            .collect(),
        None => Vec::new(),
    };
    warm.from_snapshot = trusted.len();

    let mut index = LruIndex::new(options.gauges);
    index.reserve(found.len() + trusted.len());
    // Merge the two sorted runs by (modification time, file name).
    let mut found = found.into_iter().peekable();
    let mut trusted = trusted.into_iter().peekable();
    loop {
        let take_found = match (found.peek(), trusted.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(entry), Some(record)) => match entry.meta.mtime_ns.cmp(&record.mtime_ns) {
                Ordering::Less => true,
                Ordering::Greater => false,
                Ordering::Equal => {
                    let snapshot = snapshot.as_ref().expect("trusted records come from a snapshot");
                    entry.file_name < naming::name_with_digest(snapshot.tag(record), record.digest)
                }
            },
        };
        // Every tag comes once: one file per tag, taken either from the snapshot or read.
        if take_found {
            let entry = found.next().expect("peeked");
            index.insert_new(&entry.tag, entry.meta);
        } else {
            let record = trusted.next().expect("peeked");
            let snapshot = snapshot.as_ref().expect("trusted records come from a snapshot");
            let meta = EntryMeta {
                size: record.size,
                expires_at: record.expires_at,
                mtime_ns: record.mtime_ns,
                digest: record.digest,
            };
            index.insert_new(snapshot.tag(record), meta);
        }
    }
    index.publish();

    // A restart with a smaller budget (or files copied in) must not leave the store over it.
    for tag in index.evict_to_fit(0, options.budget) {
        let path = dir.join(naming::entry_file_name(&tag));
        match fs::remove_file(&path) {
            Ok(()) => warm.evicted_over_budget += 1,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cache warm start: cannot remove an evicted entry")
            }
        }
    }
    warm.index = index;
    Ok(warm)
}

/// Below this many directory entries, one thread looks at them all.
const ENTRIES_PER_THREAD: usize = 4096;

/// An entry file of the listing, and the snapshot record of the same name, if any.
struct Candidate {
    dir_entry: DirEntry,
    name: String,
    digest: Option<u64>,
    /// Where the snapshot's records of the same digest start in [`Snapshot::by_digest`].
    record: Option<usize>,
}

fn list(dir: &Path, snapshot: Option<&Snapshot>) -> io::Result<Listing> {
    let mut listing = Listing {
        trusted: vec![false; snapshot.map_or(0, |snapshot| snapshot.records().len())],
        ..Listing::default()
    };
    let mut candidates = Vec::new();
    for dir_entry in fs::read_dir(dir)? {
        let dir_entry = match dir_entry {
            Ok(dir_entry) => dir_entry,
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cache warm start: skipping an unreadable directory entry");
                listing.skipped_files += 1;
                continue;
            }
        };
        let file_name = dir_entry.file_name();
        match naming::classify(&file_name) {
            FileKind::Lock | FileKind::Snapshot => {}
            FileKind::Journal(generation) => listing.journals.push(generation),
            FileKind::Temp => {
                // A write or deletion that a crash interrupted; never part of the index.
                let path = dir_entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => listing.removed_temp_files += 1,
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "cache warm start: cannot remove a temporary file")
                    }
                }
            }
            FileKind::Foreign => {
                tracing::warn!(path = %dir_entry.path().display(), "cache warm start: skipping a file that is not a cache entry");
                listing.skipped_files += 1;
            }
            FileKind::Entry => {
                // Entry names are UTF-8 (ASCII, even); one that is not cannot be ours, but is
                // inspected and skipped like any other stranger.
                let name = file_name.into_string().unwrap_or_else(|name| name.to_string_lossy().into_owned());
                let digest = naming::digest_of_name(&name);
                candidates.push(Candidate { dir_entry, name, digest, record: None });
            }
        }
    }
    if let Some(snapshot) = snapshot {
        match_records(&mut candidates, snapshot);
    }

    // One `stat` per entry (and a header read per changed one): spread over a few threads,
    // as a million of them take most of a large warm start.
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, 4)
        .min(candidates.len().div_ceil(ENTRIES_PER_THREAD).max(1));
    let chunk = candidates.len().div_ceil(threads).max(1);
    let seen: Vec<Vec<Seen>> = if threads == 1 {
        vec![candidates.iter().map(|candidate| look_at(candidate, snapshot)).collect()]
    } else {
        std::thread::scope(|scope| {
            let workers: Vec<_> = candidates
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || part.iter().map(|candidate| look_at(candidate, snapshot)).collect())
                })
                .collect();
            workers.into_iter().map(|worker| worker.join().expect("warm start worker")).collect()
        })
    };
    for seen in seen.into_iter().flatten() {
        match seen {
            Seen::Trusted(at) => listing.trusted[at] = true,
            Seen::Found(entry) => {
                listing.inspected += 1;
                listing.found.push(entry);
            }
            Seen::RemovedDamaged => {
                listing.inspected += 1;
                listing.removed_damaged_files += 1;
            }
            Seen::Skipped => {
                listing.inspected += 1;
                listing.skipped_files += 1;
            }
        }
    }
    Ok(listing)
}

/// Gives each candidate the snapshot records of its digest (the first; `look_at` checks the
/// name and tries the others of a collision): both sorted by digest, then matched in one pass.
fn match_records(candidates: &mut [Candidate], snapshot: &Snapshot) {
    // Sorting (digest, position) pairs moves far less memory than sorting the candidates.
    let mut order: Vec<(u64, u32)> = candidates
        .iter()
        .enumerate()
        .filter_map(|(at, candidate)| Some((candidate.digest?, at as u32)))
        .collect();
    order.sort_unstable();
    let records = snapshot.by_digest();
    let mut next = 0;
    for (digest, at) in order {
        while next < records.len() && records[next].digest < digest {
            next += 1;
        }
        if records.get(next).is_some_and(|keyed| keyed.digest == digest) {
            candidates[at as usize].record = Some(next);
        }
    }
}

/// What looking at one entry file found.
enum Seen {
    Trusted(usize),
    Found(FoundEntry),
    RemovedDamaged,
    /// Its header was read, and it is not an entry this store can use.
    Skipped,
}

fn look_at(candidate: &Candidate, snapshot: Option<&Snapshot>) -> Seen {
    let dir_entry = &candidate.dir_entry;
    if let (Some(snapshot), Some(first), Some(digest)) = (snapshot, candidate.record, candidate.digest) {
        // Two tags whose digests collide share a run; the name tells them apart.
        let record =
            snapshot.by_digest()[first..].iter().take_while(|keyed| keyed.digest == digest).find(|keyed| {
                naming::is_name_of(
                    &candidate.name,
                    snapshot.tag(&snapshot.records()[keyed.index as usize]),
                    digest,
                )
            });
        if let Some(record) = record
            && unchanged(dir_entry, record)
        {
            return Seen::Trusted(record.index as usize);
        }
    }
    match inspect(dir_entry) {
        Inspection::Found(entry) => Seen::Found(entry),
        Inspection::Skip(reason) => {
            tracing::warn!(path = %dir_entry.path().display(), reason, "cache warm start: skipping file");
            Seen::Skipped
        }
        Inspection::Damaged(reason) => {
            let path = dir_entry.path();
            tracing::warn!(path = %path.display(), reason, "cache warm start: removing a damaged entry");
            match fs::remove_file(&path) {
                Ok(()) => Seen::RemovedDamaged,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cache warm start: cannot remove a damaged entry");
                    Seen::Skipped
                }
            }
        }
    }
}

/// Whether the file is a regular file with the size and modification time `record` saved.
fn unchanged(dir_entry: &DirEntry, record: &Keyed) -> bool {
    dir_entry.metadata().is_ok_and(|metadata| {
        metadata.is_file()
            && metadata.len() == record.size
            && metadata.modified().is_ok_and(|modified| system_time_ns(modified) == record.mtime_ns)
    })
}

fn inspect(dir_entry: &DirEntry) -> Inspection {
    let name = dir_entry.file_name();
    match dir_entry.file_type() {
        Ok(file_type) if file_type.is_file() => {}
        Ok(_) => return Inspection::Skip("not a regular file".to_owned()),
        Err(error) => return Inspection::Skip(error.to_string()),
    }
    let read = || -> io::Result<Result<FoundEntry, PrefixError>> {
        let mut file = File::open(dir_entry.path())?;
        let metadata = file.metadata()?;
        let prefix = match format::read_prefix(&mut file) {
            Ok(prefix) => prefix,
            Err(error) => return Ok(Err(error)),
        };
        if metadata.len() != prefix.file_len() {
            return Ok(Err(PrefixError::Damaged(format!(
                "file is {} bytes, its header says {}",
                metadata.len(),
                prefix.file_len()
            ))));
        }
        let digest = naming::name_digest(&prefix.tag);
        let file_name = name.to_string_lossy();
        if !naming::is_name_of(&file_name, &prefix.tag, digest) {
            return Ok(Err(PrefixError::NotOurs(format!(
                "holds tag {:?}, whose file name is {}",
                prefix.tag,
                naming::name_with_digest(&prefix.tag, digest)
            ))));
        }
        Ok(Ok(FoundEntry {
            meta: EntryMeta {
                size: metadata.len(),
                expires_at: prefix.expires_at,
                mtime_ns: system_time_ns(metadata.modified()?),
                digest,
            },
            tag: prefix.tag,
            file_name: file_name.into_owned(),
        }))
    };
    match read() {
        Ok(Ok(entry)) => Inspection::Found(entry),
        Ok(Err(PrefixError::Damaged(reason))) => Inspection::Damaged(reason),
        Ok(Err(PrefixError::NotOurs(reason))) => Inspection::Skip(reason),
        Ok(Err(PrefixError::Io(error))) | Err(error) => Inspection::Skip(error.to_string()),
    }
}

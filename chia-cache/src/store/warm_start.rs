//! Rebuilding the index from the files a previous store left in the directory.
//!
//! Only headers are read (`32 + tag length` bytes per file), so opening takes the same time
//! whatever the payloads weigh; payload checksums are verified when an entry is read. Recency
//! comes from file modification times (a store sets a file's mtime when it writes or reads
//! it), oldest first, ties broken by file name.

use std::ffi::OsString;
use std::fs::{self, DirEntry, File};
use std::io;
use std::path::Path;
use std::time::SystemTime;

use super::format::{self, PrefixError};
use super::index::LruIndex;
use super::naming::{self, FileKind};
use crate::CacheError;

/// What a warm start found.
#[derive(Debug, Default)]
pub(crate) struct WarmStart {
    pub index: LruIndex,
    pub removed_temp_files: usize,
    pub removed_damaged_files: usize,
    pub skipped_files: usize,
    pub evicted_over_budget: usize,
}

struct FoundEntry {
    tag: String,
    size: u64,
    modified: SystemTime,
    file_name: OsString,
}

enum Inspection {
    Found(FoundEntry),
    /// Someone else's file, a newer format, or unreadable now: left alone.
    Skip(String),
    /// One of our entries, damaged: deleted so it does not take space outside the budget.
    Damaged(String),
}

/// Scans `dir`, removes leftovers of interrupted writes, and returns the index of the valid
/// entries, evicting least recently used ones beyond `budget`.
pub(crate) fn load(dir: &Path, budget: u64) -> Result<WarmStart, CacheError> {
    let listing =
        fs::read_dir(dir).map_err(|source| CacheError::OpenDirectory { dir: dir.to_owned(), source })?;
    let mut warm = WarmStart::default();
    let mut found = Vec::new();
    for dir_entry in listing {
        let dir_entry = match dir_entry {
            Ok(dir_entry) => dir_entry,
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cache warm start: skipping an unreadable directory entry");
                warm.skipped_files += 1;
                continue;
            }
        };
        let path = dir_entry.path();
        match naming::classify(&dir_entry.file_name()) {
            FileKind::Lock => {}
            FileKind::Temp => {
                // A write or deletion that a crash interrupted; never part of the index.
                match fs::remove_file(&path) {
                    Ok(()) => warm.removed_temp_files += 1,
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "cache warm start: cannot remove a temporary file")
                    }
                }
            }
            FileKind::Foreign => {
                tracing::warn!(path = %path.display(), "cache warm start: skipping a file that is not a cache entry");
                warm.skipped_files += 1;
            }
            FileKind::Entry => match inspect(&dir_entry) {
                Inspection::Found(entry) => found.push(entry),
                Inspection::Skip(reason) => {
                    tracing::warn!(path = %path.display(), reason, "cache warm start: skipping file");
                    warm.skipped_files += 1;
                }
                Inspection::Damaged(reason) => {
                    tracing::warn!(path = %path.display(), reason, "cache warm start: removing a damaged entry");
                    match fs::remove_file(&path) {
                        Ok(()) => warm.removed_damaged_files += 1,
                        Err(error) => {
                            tracing::warn!(path = %path.display(), %error, "cache warm start: cannot remove a damaged entry");
                            warm.skipped_files += 1;
                        }
                    }
                }
            },
        }
    }

    found.sort_by(|a, b| (a.modified, &a.file_name).cmp(&(b.modified, &b.file_name)));
    for entry in &found {
        warm.index.insert(&entry.tag, entry.size);
    }
    // A restart with a smaller budget (or files copied in) must not leave the store over it.
    for tag in warm.index.evict_to_fit(0, budget) {
        let path = dir.join(naming::entry_file_name(&tag));
        match fs::remove_file(&path) {
            Ok(()) => warm.evicted_over_budget += 1,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cache warm start: cannot remove an evicted entry")
            }
        }
    }
    Ok(warm)
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
        if naming::entry_file_name(&prefix.tag) != name.to_string_lossy() {
            return Ok(Err(PrefixError::NotOurs(format!(
                "holds tag {:?}, whose file name is {}",
                prefix.tag,
                naming::entry_file_name(&prefix.tag)
            ))));
        }
        Ok(Ok(FoundEntry {
            tag: prefix.tag,
            size: metadata.len(),
            modified: metadata.modified()?,
            file_name: name.clone(),
        }))
    };
    match read() {
        Ok(Ok(entry)) => Inspection::Found(entry),
        Ok(Err(PrefixError::Damaged(reason))) => Inspection::Damaged(reason),
        Ok(Err(PrefixError::NotOurs(reason))) => Inspection::Skip(reason),
        Ok(Err(PrefixError::Io(error))) | Err(error) => Inspection::Skip(error.to_string()),
    }
}

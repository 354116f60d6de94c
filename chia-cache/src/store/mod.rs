//! [`CacheStore`]: an LRU, byte-budgeted, on-disk key/value store of opaque values.

mod dir_lock;
mod format;
mod index;
mod naming;
mod options;
mod permissions;
mod warm_start;

#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use crate::CacheError;
use dir_lock::DirLock;
use format::PrefixError;
use index::LruIndex;

pub use format::MAX_TAG_LEN;
pub use naming::{ENTRY_EXTENSION, entry_file_name};
pub use options::{Durability, StoreOptions};

/// What a store holds, and how many entries it evicted to make room since it opened
/// ([`CacheStore::stats`]). Explicit [`CacheStore::evict`]s and [`CacheStore::flush`]es are not
/// among them: the caller asked for those.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Entries held.
    pub entries: u64,
    /// Bytes of the entries' files together.
    pub bytes: u64,
    /// Entries evicted (least recently used first) to make room for new ones since the store
    /// opened.
    pub evicted_for_room: u64,
}

/// An LRU, byte-budgeted, on-disk key/value store of opaque serialized values, one file per
/// tag (see [`entry_file_name`]).
///
/// - **Budget**: the accounted size of an entry is its file's length (a 32-byte header, the
///   tag, the payload), as the original counted its pickle file, so the budget bounds the disk
///   space the entries take. While writes are in flight, their temporary files are extra.
/// - **LRU**: a write evicts least recently used entries until the new one fits; [`read`]
///   marks an entry most recently used, [`has`] does not.
/// - **Integrity**: every file carries checksums; a damaged or truncated entry reads as a miss
///   and is dropped, never returned.
/// - **Crash consistency**: writes go to a temporary file renamed into place; leftovers are
///   removed at [`open`]. Durability is set by [`Durability`].
/// - **Warm start**: [`open`] serves the entries already in the directory, in the recency
///   order of their modification times, reading headers only.
/// - **Exclusive**: one store per directory at a time (an advisory lock, on Unix).
///
/// `CacheStore` is `Send + Sync`; share it with an `Arc`.
///
/// # Concurrency
///
/// One mutex guards the index. It is held only for bookkeeping and the constant-time metadata
/// calls that must agree with it (open, rename), never while payload bytes move or an fsync
/// runs, so a large read or write does not stall small operations:
///
/// - `write` writes and syncs a temporary file without the lock, then under the lock renames
///   it over the entry's file, updates the index and renames evicted files aside; evicted files
///   are deleted after the lock is released. The rename is the linearization point.
/// - `read` looks the tag up and opens its file under the lock, then reads and verifies without
///   it. Because every rename happens under the lock, the handle is the file the index named;
///   if the entry is overwritten or evicted meanwhile, the handle still reads that complete
///   older file (an open file outlives its name), so a read returns the old value or the new
///   one, never a mix.
/// - An entry found damaged is dropped only if its generation is still the one the read saw,
///   so a concurrent overwrite is never dropped by mistake.
/// - With [`Durability::Full`], the directory fsync runs after the lock is released: readers
///   see an entry from its rename on, and `write` returns once it is durable.
///
/// # File format
///
/// `<slug>_<16 hex digits of SHA-256(tag)>.chia`, version 1, integers little-endian:
///
/// ```text
/// offset  size  field
///      0     8  magic "CHIACHE\0"
///      8     2  format version (1)
///     10     2  flags, 0 in version 1
///     12     4  tag length in bytes (at most MAX_TAG_LEN)
///     16     8  payload length in bytes
///     24     4  header checksum: CRC-32 of bytes 0..24 and the tag
///     28     4  entry checksum: CRC-32 of bytes 0..24, the tag and the payload
///     32        tag (UTF-8), then the payload
/// ```
///
/// Temporary files are `.chia-tmp-<pid>-<n>.tmp`; the lock file is `.chia-cache.lock`. On Unix
/// the directory is 0700 (created so, or tightened at open) and every file is created 0600:
/// entries are task results, readable by their owner only.
///
/// [`read`]: CacheStore::read
/// [`has`]: CacheStore::has
/// [`open`]: CacheStore::open
pub struct CacheStore {
    dir: PathBuf,
    budget: u64,
    options: StoreOptions,
    index: Mutex<LruIndex>,
    /// Numbers temporary file names.
    temp_sequence: AtomicU64,
    /// Entries evicted to make room (by writes, and at open when the directory held more than
    /// the budget), counted where the index already lists them: nothing extra per write.
    evicted_for_room: AtomicU64,
    _lock: DirLock,
    #[cfg(test)]
    test_hook: Mutex<Option<tests::Hook>>,
}

/// Points in the I/O paths where tests inject failures or pauses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoStage {
    /// Half the payload is in the temporary file.
    PayloadHalfWritten,
    /// Before the temporary file is fsynced (only when durability asks for it).
    SyncTemp,
    /// Under the index lock, before the temporary file is renamed into place.
    Commit,
    /// A read has its file open and the index lock released.
    ReadOpened,
}

/// Why reading an open entry failed.
enum ReadFailure {
    /// The file is not a complete, valid entry for the tag: drop it.
    Damaged(String),
    /// Reading failed in a way that says nothing about the file (e.g. out of memory): a miss.
    Io(io::Error),
}

impl From<io::Error> for ReadFailure {
    fn from(error: io::Error) -> Self {
        ReadFailure::Io(error)
    }
}

impl CacheStore {
    /// Opens (creating it if needed) the store in `dir` with a budget of `budget_bytes`.
    ///
    /// Entries already in the directory are served (warm start); temporary files left by an
    /// interrupted process are removed; damaged entries are removed and files that are not
    /// entries are skipped, each with a warning; if the entries exceed the budget, the least
    /// recently used are evicted. Fails if the directory cannot be created or listed, or if
    /// another store holds it ([`CacheError::DirectoryLocked`]).
    pub fn open(dir: impl AsRef<Path>, budget_bytes: u64, options: StoreOptions) -> Result<Self, CacheError> {
        let dir = dir.as_ref().to_owned();
        permissions::create_private_dir(&dir)
            .map_err(|source| CacheError::OpenDirectory { dir: dir.clone(), source })?;
        let lock = DirLock::acquire(&dir)?;
        let warm = warm_start::load(&dir, budget_bytes)?;
        tracing::info!(
            dir = %dir.display(),
            budget = budget_bytes,
            entries = warm.index.len(),
            bytes = warm.index.total_bytes(),
            removed_temp_files = warm.removed_temp_files,
            removed_damaged_files = warm.removed_damaged_files,
            skipped_files = warm.skipped_files,
            evicted_over_budget = warm.evicted_over_budget,
            "cache store opened"
        );
        Ok(Self {
            dir,
            budget: budget_bytes,
            options,
            index: Mutex::new(warm.index),
            temp_sequence: AtomicU64::new(0),
            evicted_for_room: AtomicU64::new(warm.evicted_over_budget as u64),
            _lock: lock,
            #[cfg(test)]
            test_hook: Mutex::new(None),
        })
    }

    /// Stores `payload` under `tag`, replacing any previous value, and marks it most recently
    /// used, evicting least recently used entries until it fits.
    ///
    /// Returns `Ok(false)` without storing (and leaving any previous value of `tag` in place,
    /// as the original did) if the entry alone is larger than the budget. Returns an error if
    /// the tag is longer than [`MAX_TAG_LEN`] or the file cannot be written (disk full, I/O
    /// error); then no partial file is left and the store is as it was. An error, not
    /// `Ok(false)`, so that callers can tell "too large to cache" from "the disk is failing".
    pub fn write(&self, tag: &str, payload: &[u8]) -> Result<bool, CacheError> {
        if tag.len() > MAX_TAG_LEN {
            return Err(CacheError::TagTooLong { len: tag.len(), max: MAX_TAG_LEN });
        }
        let size = format::entry_file_len(tag.len(), payload.len());
        if size > self.budget {
            tracing::warn!(
                tag,
                size,
                budget = self.budget,
                "cache: entry is larger than the whole budget; not caching"
            );
            return Ok(false);
        }
        let temp_path = self.next_temp_path();
        if let Err(source) = self.write_temp_file(&temp_path, tag, payload) {
            self.remove_quietly(&temp_path);
            return Err(CacheError::Write { tag: tag.to_owned(), path: temp_path, source });
        }

        let final_path = self.entry_path(tag);
        let detached = {
            let mut index = self.lock_index();
            if let Err(source) =
                self.run_hook(IoStage::Commit, tag).and_then(|()| fs::rename(&temp_path, &final_path))
            {
                drop(index);
                self.remove_quietly(&temp_path);
                return Err(CacheError::Write { tag: tag.to_owned(), path: final_path, source });
            }
            // The replaced value's size must not count against the room made for the new one.
            index.remove(tag);
            let evicted = index.evict_to_fit(size, self.budget);
            self.evicted_for_room.fetch_add(evicted.len() as u64, Ordering::Relaxed);
            index.insert(tag, size);
            evicted.iter().filter_map(|victim| self.detach_file(victim)).collect::<Vec<_>>()
        };
        self.delete_detached(detached);

        if self.options.durability == Durability::Full {
            // The entry is already visible; a failure here only weakens the power-loss promise.
            if let Err(error) = File::open(&self.dir).and_then(|dir| dir.sync_all()) {
                tracing::warn!(dir = %self.dir.display(), tag, %error, "cache: cannot fsync the directory after a write");
            }
        }
        Ok(true)
    }

    /// The value stored under `tag`, marking it most recently used; `None` on a miss.
    ///
    /// A file that is damaged, truncated or missing is a miss, and its entry is dropped (with a
    /// warning). Other read errors (e.g. no memory for the payload) are misses that keep the
    /// entry.
    pub fn read(&self, tag: &str) -> Option<Vec<u8>> {
        let path = self.entry_path(tag);
        let (mut file, generation) = {
            let mut index = self.lock_index();
            let entry = index.touch(tag)?;
            match File::open(&path) {
                Ok(file) => (file, entry.generation),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    index.remove(tag);
                    tracing::warn!(tag, path = %path.display(), "cache: entry file vanished; dropping the entry");
                    return None;
                }
                Err(error) => {
                    tracing::warn!(tag, path = %path.display(), %error, "cache: cannot open entry; treating as a miss");
                    return None;
                }
            }
        };

        let outcome = self
            .run_hook(IoStage::ReadOpened, tag)
            .map_err(ReadFailure::Io)
            .and_then(|()| read_entry(&mut file, tag));
        match outcome {
            Ok(payload) => {
                // Persist the recency so a warm start restores it; best effort.
                if let Err(error) = file.set_modified(SystemTime::now()) {
                    tracing::debug!(tag, %error, "cache: cannot update an entry's modification time");
                }
                Some(payload)
            }
            Err(ReadFailure::Damaged(reason)) => {
                tracing::warn!(tag, path = %path.display(), reason, "cache: damaged entry; dropping it");
                self.drop_if_unchanged(tag, generation);
                None
            }
            Err(ReadFailure::Io(error)) => {
                tracing::warn!(tag, path = %path.display(), %error, "cache: cannot read entry; treating as a miss");
                None
            }
        }
    }

    /// Whether `tag` is in the index. Does not change recency and does not read the file.
    pub fn has(&self, tag: &str) -> bool {
        self.lock_index().contains(tag)
    }

    /// Removes `tag`'s entry; returns whether there was one.
    pub fn evict(&self, tag: &str) -> bool {
        let detached = {
            let mut index = self.lock_index();
            if index.remove(tag).is_none() {
                return false;
            }
            self.detach_file(tag)
        };
        self.delete_detached(detached);
        true
    }

    /// Removes every entry.
    pub fn flush(&self) {
        let detached: Vec<PathBuf> = {
            let mut index = self.lock_index();
            index.clear().iter().filter_map(|tag| self.detach_file(tag)).collect()
        };
        self.delete_detached(detached);
    }

    /// Tags from least to most recently used.
    pub fn keys(&self) -> Vec<String> {
        self.lock_index().keys()
    }

    /// Accounted bytes of all entries (their files' lengths).
    pub fn size_bytes(&self) -> u64 {
        self.lock_index().total_bytes()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.lock_index().len()
    }

    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries, their bytes, and the entries evicted to make room so far, read at once (one
    /// look at the index).
    pub fn stats(&self) -> StoreStats {
        let index = self.lock_index();
        StoreStats {
            entries: index.len() as u64,
            bytes: index.total_bytes(),
            evicted_for_room: self.evicted_for_room.load(Ordering::Relaxed),
        }
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The directory the entries' files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The fsync policy the store was opened with.
    pub fn durability(&self) -> Durability {
        self.options.durability
    }

    /// The file that holds (or would hold) `tag`'s entry.
    pub fn entry_path(&self, tag: &str) -> PathBuf {
        self.dir.join(entry_file_name(tag))
    }

    fn lock_index(&self) -> MutexGuard<'_, LruIndex> {
        // The index is consistent between statements that can panic, so a panic elsewhere
        // while holding the lock does not make it unusable.
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_temp_path(&self) -> PathBuf {
        let sequence = self.temp_sequence.fetch_add(1, Ordering::Relaxed);
        self.dir.join(naming::temp_file_name(sequence))
    }

    /// Writes the complete entry to `temp_path`, synced as the durability policy asks.
    fn write_temp_file(&self, temp_path: &Path, tag: &str, payload: &[u8]) -> io::Result<()> {
        let mut file = permissions::private_file_options().write(true).create_new(true).open(temp_path)?;
        file.write_all(&format::encode_prefix(tag, payload))?;
        // Two writes rather than one only so that tests can fail a write half-way through.
        let (first_half, second_half) = payload.split_at(payload.len() / 2);
        file.write_all(first_half)?;
        self.run_hook(IoStage::PayloadHalfWritten, tag)?;
        file.write_all(second_half)?;
        if self.options.durability != Durability::None {
            self.run_hook(IoStage::SyncTemp, tag)?;
            file.sync_data()?;
        }
        Ok(())
    }

    /// Drops `tag`'s entry after a failed read, unless a write replaced it since.
    fn drop_if_unchanged(&self, tag: &str, generation: u64) {
        let detached = {
            let mut index = self.lock_index();
            if index.get(tag).is_none_or(|entry| entry.generation != generation) {
                return;
            }
            index.remove(tag);
            self.detach_file(tag)
        };
        self.delete_detached(detached);
    }

    /// Called under the index lock: moves `tag`'s file to a temporary name so it can be deleted
    /// after the lock is released without racing a new write of the same tag (deleting a large
    /// file can take a while). Returns the new name, or `None` if there was nothing to move.
    fn detach_file(&self, tag: &str) -> Option<PathBuf> {
        let path = self.entry_path(tag);
        let detached = self.next_temp_path();
        match fs::rename(&path, &detached) {
            Ok(()) => Some(detached),
            Err(error) if error.kind() == io::ErrorKind::NotFound => None,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cache: cannot move an entry aside; deleting it in place");
                self.remove_quietly(&path);
                None
            }
        }
    }

    fn delete_detached(&self, paths: impl IntoIterator<Item = PathBuf>) {
        for path in paths {
            self.remove_quietly(&path);
        }
    }

    /// Removes a file that should go; a failure is logged, as the next open cleans up.
    fn remove_quietly(&self, path: &Path) {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(path = %path.display(), %error, "cache: cannot remove file"),
        }
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn run_hook(&self, _stage: IoStage, _tag: &str) -> io::Result<()> {
        Ok(())
    }
}

/// Reads and verifies the entry in `file`, which must hold `tag`.
fn read_entry(file: &mut File, tag: &str) -> Result<Vec<u8>, ReadFailure> {
    let prefix = format::read_prefix(file).map_err(|error| match error {
        PrefixError::Io(error) => ReadFailure::Io(error),
        // At an entry's path, a file that is not a valid entry is damage, whatever it is.
        PrefixError::NotOurs(reason) | PrefixError::Damaged(reason) => ReadFailure::Damaged(reason),
    })?;
    if prefix.tag != tag {
        return Err(ReadFailure::Damaged(format!("file holds tag {:?}", prefix.tag)));
    }
    let actual_len = file.metadata()?.len();
    if actual_len != prefix.file_len() {
        return Err(ReadFailure::Damaged(format!(
            "file is {actual_len} bytes, its header says {}",
            prefix.file_len()
        )));
    }
    let payload_len = usize::try_from(prefix.payload_len)
        .map_err(|_| ReadFailure::Io(io::Error::other("payload does not fit in memory")))?;
    let mut payload = Vec::new();
    payload.try_reserve_exact(payload_len).map_err(|error| ReadFailure::Io(io::Error::other(error)))?;
    file.take(prefix.payload_len).read_to_end(&mut payload)?;
    if payload.len() != payload_len {
        return Err(ReadFailure::Damaged(format!(
            "payload truncated at {} of {payload_len} bytes",
            payload.len()
        )));
    }
    if !prefix.payload_matches(&payload) {
        return Err(ReadFailure::Damaged("checksum mismatch".to_owned()));
    }
    Ok(payload)
}

impl fmt::Debug for CacheStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let index = self.lock_index();
        f.debug_struct("CacheStore")
            .field("dir", &self.dir)
            .field("budget", &self.budget)
            .field("durability", &self.options.durability)
            .field("entries", &index.len())
            .field("size_bytes", &index.total_bytes())
            .finish()
    }
}

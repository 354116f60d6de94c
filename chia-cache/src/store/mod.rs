//! [`CacheStore`]: an LRU, byte-budgeted, on-disk key/value store of opaque values.

mod commit;
mod dir_lock;
mod format;
mod index;
mod journal;
mod naming;
mod options;
mod permissions;
mod snapshot;
mod warm_start;

#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::{self, File};
use std::io::{self, IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{CacheError, TagPatterns};
use commit::{GroupCommit, Op, PutOp};
use dir_lock::DirLock;
use format::PrefixError;
use index::{EntryMeta, Gauges, LruIndex};

pub use format::MAX_TAG_LEN;
pub use naming::{ENTRY_EXTENSION, entry_file_name};
pub use options::{Clock, Durability, ManualClock, StoreOptions, WriteOptions};

/// What a store holds, and what it has done since it opened ([`CacheStore::stats`]). Every
/// field is read from an atomic counter, without the index lock; the fields are read one by
/// one, so under concurrent use they may be a few operations apart. Serializable: the
/// runtime's cache service returns it as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct StoreStats {
    /// Entries held (expired ones included until they are removed).
    pub entries: u64,
    /// Bytes of the entries' files together.
    pub bytes: u64,
    /// Reads that returned a value.
    pub hits: u64,
    /// Reads that returned nothing: the tag was absent, expired, or its file damaged.
    pub misses: u64,
    /// Writes that stored their entry (not those too large for the budget, nor failed ones).
    pub writes: u64,
    /// Entries evicted (least recently used first) to make room for new ones, and at open
    /// when the directory held more than the budget.
    pub evicted_for_room: u64,
    /// Entries removed because the caller asked: [`CacheStore::evict`],
    /// [`CacheStore::evict_matching`] and [`CacheStore::flush`].
    pub evicted_explicitly: u64,
    /// Entries removed because their time to live was over (when read, or by
    /// [`CacheStore::sweep_expired`]).
    pub expired: u64,
    /// Entries dropped because their file was damaged or missing (when read, or by
    /// [`CacheStore::verify`]).
    pub dropped_damaged: u64,
}

/// One entry [`CacheStore::verify`] found bad.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BadEntry {
    /// The entry's tag.
    pub tag: String,
    /// Its file (serialized as text: a name that is not UTF-8 is shown lossily).
    #[serde(with = "path_as_text")]
    pub path: PathBuf,
    /// What is wrong with it (a checksum mismatch, a truncation, a missing file, ...).
    pub reason: String,
}

/// What [`CacheStore::verify`] found. Serializable, as [`StoreStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Entries re-read.
    pub checked: u64,
    /// Entries whose file is complete and whose checksums match.
    pub ok: u64,
    /// Entries whose file is damaged or missing, in the order checked.
    pub bad: Vec<BadEntry>,
    /// Bad entries removed (none on a dry run).
    pub removed: u64,
    /// Entries that could not be read for a reason that says nothing about their file (an
    /// I/O error, no memory): neither ok nor bad, and kept.
    pub unreadable: u64,
}

/// A path as the text a report shows.
mod path_as_text {
    use std::path::{Path, PathBuf};

    pub fn serialize<S: serde::Serializer>(path: &Path, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&path.to_string_lossy())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
        <String as serde::Deserialize>::deserialize(deserializer).map(PathBuf::from)
    }
}

/// One entry as [`CacheStore::entries`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryInfo {
    /// The entry's tag.
    pub tag: String,
    /// Its file's length in bytes, as the budget counts it.
    pub size: u64,
    /// When it expires; `None` if it never does.
    pub expires_at: Option<SystemTime>,
}

/// What [`CacheStore::open`] found and did in the directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenReport {
    /// Entries taken from the index snapshot without opening their file.
    pub from_snapshot: u64,
    /// Entry files whose header was read (all of them without a snapshot).
    pub headers_read: u64,
    /// Journal records a crash left, replayed.
    pub journal_records: u64,
    /// Entry files the replay wrote again or deleted.
    pub journal_rewrites: u64,
    /// Temporary files of interrupted writes, removed.
    pub removed_temp_files: u64,
    /// Damaged entry files, removed.
    pub removed_damaged_files: u64,
    /// Files that are not entries of this store, left alone.
    pub skipped_files: u64,
    /// Entries beyond the budget, evicted.
    pub evicted_over_budget: u64,
    /// How long the open took.
    pub duration: Duration,
}

/// An LRU, byte-budgeted, on-disk key/value store of opaque serialized values, one file per
/// tag (see [`entry_file_name`]).
///
/// - **Budget**: the accounted size of an entry is its file's length (a 32-byte header, 40
///   with an expiry, the tag, the payload), as the original counted its pickle file, so the
///   budget bounds the disk space the entries take. While writes are in flight, their
///   temporary files are extra, as is the journal under [`Durability::Full`].
/// - **LRU**: a write evicts least recently used entries until the new one fits; [`read`]
///   marks an entry most recently used, [`has`] does not.
/// - **Expiry**: an entry written with a time to live ([`write_with`]) is a miss once it has
///   passed, by the [`Clock`] of the store's options, and is removed when read or by
///   [`sweep_expired`]. The expiry is kept in the entry's file.
/// - **Integrity**: every file carries checksums; a damaged or truncated entry reads as a miss
///   and is dropped, never returned. [`verify`] re-checks every entry.
/// - **Crash consistency**: writes go to a temporary file renamed into place; leftovers are
///   removed at [`open`]. Durability is set by [`Durability`].
/// - **Warm start**: [`open`] serves the entries already in the directory, in the recency
///   order of their modification times. With an index snapshot (saved at [`close`], on drop,
///   every [`StoreOptions::snapshot_every_writes`] writes and by [`save_index`]) it reads the
///   header only of the files that changed since the snapshot, and otherwise only lists the
///   directory; without one it reads every file's header. The result is the same.
/// - **Exclusive**: one store per directory at a time (an advisory lock, on Unix).
///
/// `CacheStore` is `Send + Sync`; share it with an `Arc`.
///
/// # Group commit under `Durability::Full`
///
/// A write under [`Durability::Full`] returns only once its entry survives a power loss, yet
/// concurrent writes share the cost: one data sync of a journal per batch, whatever the number
/// of writes in it, and no sync of the entry files at all.
///
/// 1. Each writer writes its entry to a temporary file, without a sync, in parallel with the
///    others, and queues it.
/// 2. A writer that finds nobody appending to the journal leads the next batch: it takes the
///    queued writes and appends every entry's complete bytes to the journal (one vectored
///    write). The other writers wait meanwhile (parked), and queue up the next batch.
/// 3. The leader syncs the journal once (`fdatasync`), which makes the whole batch durable.
///    The next batch's leader appends and syncs meanwhile: up to four batches sync at once,
///    as a disk serves concurrent syncs in parallel.
/// 4. In the order the batches were taken, each leader renames its batch's temporary files
///    into place and updates the index, in queue order, under one hold of the index lock,
///    then wakes its writers, whose entries are now durable (in the journal) and visible.
/// 5. Once the journal holds [`StoreOptions::journal_checkpoint_bytes`], the next leader
///    starts a new one; once every batch of the old one is installed, one `syncfs` makes
///    their files durable and the old journal is deleted. [`close`] (and drop) does the same
///    for the last one.
///
/// An open after a crash replays the journals before anything else: an entry whose file is
/// missing or differs from its last journal record is written again, a removed one deleted.
/// A rename lost with the power is thereby redone; an unsynced one that survived needs
/// nothing. The alternative, syncing each temporary file and the directory for every batch,
/// still costs one sync per write; the journal costs one per batch.
///
/// Explicit removals ([`evict`], [`evict_matching`], [`flush`]) go through the same queue, in
/// batches of their own that run alone: they choose their entries when they run, then
/// journal a record per entry (without a sync) before their callers or the next batch go on,
/// so that the journal tells writes and removals in the order they happened, and a replay
/// after a kill brings back no entry they removed (after a power loss it may: evictions are
/// not made durable). Entries evicted to make room are not journaled at all: a replay may
/// bring one back, with the value and the modification time it had, and the open then evicts
/// for the budget again, oldest first.
///
/// A batch whose journal write or sync fails fails all its writes, which leave the running
/// store as it was; the next batch starts a new journal. (After a crash, a replay may still
/// install such a write, complete and right, if its records did reach the disk.)
///
/// # Concurrency
///
/// One mutex guards the index. It is held only for bookkeeping and the constant-time metadata
/// calls that must agree with it (open, rename), never while payload bytes move or a sync
/// runs, so a large read or write does not stall small operations:
///
/// - `write` writes a temporary file without the lock (under [`Durability::Data`], syncs it),
///   then under the lock renames it over the entry's file, updates the index and renames
///   evicted files aside; evicted files are deleted after the lock is released. The rename is
///   the linearization point. Under [`Durability::Full`] the batch's leader does the renames,
///   after the journal sync.
/// - `read` looks the tag up and opens its file under the lock, then reads and verifies without
///   it. Because every rename happens under the lock, the handle is the file the index named;
///   if the entry is overwritten or evicted meanwhile, the handle still reads that complete
///   older file (an open file outlives its name), so a read returns the old value or the new
///   one, never a mix.
/// - An entry found damaged or expired is dropped only if its generation is still the one the
///   read saw, so a concurrent overwrite is never dropped by mistake.
///
/// # File format
///
/// `<slug>_<16 hex digits of SHA-256(tag)>.chia`, integers little-endian. Version 1, for
/// entries that never expire:
///
/// ```text
/// offset  size  field
///      0     8  magic "CHIACHE\0"
///      8     2  format version (1)
///     10     2  flags, 0
///     12     4  tag length in bytes (at most MAX_TAG_LEN)
///     16     8  payload length in bytes
///     24     4  header checksum: CRC-32 of bytes 0..24 and the tag
///     28     4  entry checksum: CRC-32 of bytes 0..24, the tag and the payload
///     32        tag (UTF-8), then the payload
/// ```
///
/// Version 2, for entries with an expiry: bytes 0..24 as in version 1 (with version 2), then
/// the expiry (8 bytes, milliseconds since the Unix epoch), the header checksum over bytes
/// 0..32 and the tag, the entry checksum over bytes 0..32, the tag and the payload; the tag
/// starts at 40.
///
/// Besides entries the directory holds temporary files `.chia-tmp-<pid>-<n>.tmp`, the lock
/// file `.chia-cache.lock`, the index snapshot `.chia-index.snapshot` and, under
/// [`Durability::Full`], journals `.chia-journal-<n>.log`. On Unix the directory is 0700
/// (created so, or tightened at open) and every file is created 0600: entries are task
/// results, readable by their owner only.
///
/// [`read`]: CacheStore::read
/// [`has`]: CacheStore::has
/// [`open`]: CacheStore::open
/// [`close`]: CacheStore::close
/// [`write_with`]: CacheStore::write_with
/// [`sweep_expired`]: CacheStore::sweep_expired
/// [`verify`]: CacheStore::verify
/// [`save_index`]: CacheStore::save_index
/// [`evict`]: CacheStore::evict
/// [`evict_matching`]: CacheStore::evict_matching
/// [`flush`]: CacheStore::flush
pub struct CacheStore {
    dir: PathBuf,
    budget: u64,
    options: StoreOptions,
    index: Mutex<LruIndex>,
    /// Entries and bytes, kept by the index.
    gauges: Arc<Gauges>,
    counters: Counters,
    /// Numbers temporary file names.
    temp_sequence: AtomicU64,
    /// The write queue and journal, under [`Durability::Full`].
    commit: Option<GroupCommit>,
    /// Writes since the snapshot was last saved.
    writes_since_snapshot: AtomicU64,
    /// Held while a snapshot is being saved.
    saving_snapshot: Mutex<()>,
    /// Set once the store has shut down (by `close`), so that drop does not do it again.
    closed: AtomicBool,
    opened: OpenReport,
    _lock: DirLock,
    #[cfg(test)]
    test_hook: Mutex<Option<tests::Hook>>,
}

/// What [`StoreStats`] counts besides the index's size.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    writes: AtomicU64,
    evicted_for_room: AtomicU64,
    evicted_explicitly: AtomicU64,
    expired: AtomicU64,
    dropped_damaged: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, by: usize) {
        counter.fetch_add(by as u64, Ordering::Relaxed);
    }
}

/// Points in the I/O paths where tests inject failures or pauses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoStage {
    /// Half the payload is in the temporary file.
    PayloadHalfWritten,
    /// Before the temporary file is fsynced (under [`Durability::Data`]).
    SyncTemp,
    /// Before a batch's journal records are written and synced (under [`Durability::Full`]);
    /// the tag is the batch's first write's.
    SyncJournal,
    /// After a batch's records are appended, before the journal is synced for them.
    JournalAppended,
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

/// Which entries a removal takes, decided under the index lock.
type Selector = Box<dyn FnOnce(&LruIndex) -> Vec<String> + Send>;

impl CacheStore {
    /// Opens (creating it if needed) the store in `dir` with a budget of `budget_bytes`.
    ///
    /// Journals left by a crash are replayed; entries already in the directory are served
    /// (warm start, from the index snapshot where it still holds); temporary files left by an
    /// interrupted process are removed; damaged entries are removed and files that are not
    /// entries are skipped, each with a warning; if the entries exceed the budget, the least
    /// recently used are evicted. Fails if the directory cannot be created or listed, if a
    /// journal cannot be replayed, or if another store holds it
    /// ([`CacheError::DirectoryLocked`]).
    pub fn open(dir: impl AsRef<Path>, budget_bytes: u64, options: StoreOptions) -> Result<Self, CacheError> {
        Self::open_with(dir.as_ref(), budget_bytes, options, true)
    }

    fn open_with(
        dir: &Path,
        budget_bytes: u64,
        options: StoreOptions,
        use_snapshot: bool,
    ) -> Result<Self, CacheError> {
        let started = std::time::Instant::now();
        let dir = dir.to_owned();
        let open_error = |source| CacheError::OpenDirectory { dir: dir.clone(), source };
        permissions::create_private_dir(&dir).map_err(open_error)?;
        let lock = DirLock::acquire(&dir)?;
        let gauges = Arc::new(Gauges::default());
        let temp_sequence = AtomicU64::new(0);
        let mut temp_path =
            || dir.join(naming::temp_file_name(temp_sequence.fetch_add(1, Ordering::Relaxed)));
        let warm = warm_start::load(
            &dir,
            warm_start::LoadOptions {
                budget: budget_bytes,
                gauges: Arc::clone(&gauges),
                use_snapshot,
                temp_path: &mut temp_path,
            },
        )?;
        let commit = match options.durability {
            Durability::Full => {
                Some(GroupCommit::start(&dir, options.journal_checkpoint_bytes).map_err(open_error)?)
            }
            Durability::None | Durability::Data => None,
        };
        tracing::info!(
            dir = %dir.display(),
            budget = budget_bytes,
            entries = warm.index.len(),
            bytes = warm.index.total_bytes(),
            from_snapshot = warm.from_snapshot,
            headers_read = warm.headers_read,
            journal_records = warm.journal_records,
            journal_rewrites = warm.journal_rewrites,
            removed_temp_files = warm.removed_temp_files,
            removed_damaged_files = warm.removed_damaged_files,
            skipped_files = warm.skipped_files,
            evicted_over_budget = warm.evicted_over_budget,
            "cache store opened"
        );
        let counters = Counters::default();
        Counters::add(&counters.evicted_for_room, warm.evicted_over_budget);
        let opened = OpenReport {
            from_snapshot: warm.from_snapshot as u64,
            headers_read: warm.headers_read as u64,
            journal_records: warm.journal_records as u64,
            journal_rewrites: warm.journal_rewrites as u64,
            removed_temp_files: warm.removed_temp_files as u64,
            removed_damaged_files: warm.removed_damaged_files as u64,
            skipped_files: warm.skipped_files as u64,
            evicted_over_budget: warm.evicted_over_budget as u64,
            duration: started.elapsed(),
        };
        Ok(Self {
            dir,
            budget: budget_bytes,
            options,
            index: Mutex::new(warm.index),
            gauges,
            counters,
            temp_sequence,
            commit,
            writes_since_snapshot: AtomicU64::new(0),
            saving_snapshot: Mutex::new(()),
            closed: AtomicBool::new(false),
            opened,
            _lock: lock,
            #[cfg(test)]
            test_hook: Mutex::new(None),
        })
    }

    /// Opens the store reading every file's header, as if there were no index snapshot: what
    /// the snapshot must reproduce. For tests and timings.
    #[doc(hidden)]
    pub fn open_full_scan(
        dir: impl AsRef<Path>,
        budget_bytes: u64,
        options: StoreOptions,
    ) -> Result<Self, CacheError> {
        Self::open_with(dir.as_ref(), budget_bytes, options, false)
    }

    /// Stores `payload` under `tag`, replacing any previous value, and marks it most recently
    /// used, evicting least recently used entries until it fits. The entry never expires.
    ///
    /// Returns `Ok(false)` without storing (and leaving any previous value of `tag` in place,
    /// as the original did) if the entry alone is larger than the budget. Returns an error if
    /// the tag is longer than [`MAX_TAG_LEN`] or the file cannot be written (disk full, I/O
    /// error); then no partial file is left and the store is as it was. An error, not
    /// `Ok(false)`, so that callers can tell "too large to cache" from "the disk is failing".
    pub fn write(&self, tag: &str, payload: &[u8]) -> Result<bool, CacheError> {
        self.write_with(tag, payload, &WriteOptions::default())
    }

    /// [`write`](Self::write) with options: a time to live ([`WriteOptions::ttl`]).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use chia_cache::{CacheStore, ManualClock, StoreOptions, WriteOptions};
    ///
    /// # fn main() -> Result<(), chia_cache::CacheError> {
    /// let dir = tempfile::tempdir().expect("temporary directory");
    /// let clock = ManualClock::new(SystemTime::now());
    /// let store = CacheStore::open(dir.path(), 1 << 20, StoreOptions::default().with_clock(clock.clock()))?;
    /// store.write_with("daily", b"report", &WriteOptions::default().with_ttl(Duration::from_secs(86_400)))?;
    /// assert!(store.has("daily"));
    /// clock.advance(Duration::from_secs(86_400));
    /// assert_eq!(store.read("daily"), None);
    /// # Ok(())
    /// # }
    /// ```
    pub fn write_with(&self, tag: &str, payload: &[u8], options: &WriteOptions) -> Result<bool, CacheError> {
        self.write_many([(tag, payload, options)]).pop().unwrap_or(Ok(false))
    }

    /// Several writes at once, each as [`write_with`](Self::write_with) would make it; their
    /// results in order. Under [`Durability::Full`] they share batches and syncs (with one
    /// another and with other threads' writes), so a caller with many values at hand (a
    /// pipelined driver, results arriving together) pays about one sync for all of them, from
    /// one thread. Writes of the same tag land in order: the last one wins.
    ///
    /// ```
    /// # use chia_cache::{CacheStore, StoreOptions, WriteOptions};
    /// # fn main() -> Result<(), chia_cache::CacheError> {
    /// # let dir = tempfile::tempdir().expect("temporary directory");
    /// let store = CacheStore::open(dir.path(), 1 << 20, StoreOptions::default())?;
    /// let options = WriteOptions::default();
    /// let results = store.write_many([("a", &b"1"[..], &options), ("b", &b"2"[..], &options)]);
    /// assert!(results.into_iter().all(|stored| stored.is_ok_and(|stored| stored)));
    /// assert_eq!(store.keys(), ["a", "b"]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn write_many<'a>(
        &self,
        writes: impl IntoIterator<Item = (&'a str, &'a [u8], &'a WriteOptions)>,
    ) -> Vec<Result<bool, CacheError>> {
        let mut results: Vec<Option<Result<bool, CacheError>>> = Vec::new();
        // The writes to make: where their result goes, their tag and file, and the op itself.
        let mut ready: Vec<(usize, String, PathBuf)> = Vec::new();
        let mut puts: Vec<PutOp> = Vec::new();
        for (tag, payload, options) in writes {
            match self.prepare_write(tag, payload, options) {
                Ok(Some(put)) => {
                    ready.push((results.len(), put.tag.clone(), put.final_path.clone()));
                    puts.push(put);
                    results.push(None);
                }
                Ok(None) => results.push(Some(Ok(false))),
                Err(error) => results.push(Some(Err(error))),
            }
        }
        let outcomes: Vec<io::Result<()>> = match &self.commit {
            Some(commit) => commit
                .submit_many(self, puts.into_iter().map(Op::Put).collect())
                .into_iter()
                .map(commit::Outcome::into_put)
                .collect(),
            None => puts
                .into_iter()
                .map(|put| self.install_now(&put.tag, &put.temp_path, &put.final_path, put.meta))
                .collect(),
        };
        for ((at, tag, path), outcome) in ready.into_iter().zip(outcomes) {
            results[at] = Some(match outcome {
                Ok(()) => {
                    Counters::add(&self.counters.writes, 1);
                    self.maybe_save_index();
                    Ok(true)
                }
                Err(source) => Err(CacheError::Write { tag, path, source }),
            });
        }
        results.into_iter().map(|result| result.unwrap_or(Ok(false))).collect()
    }

    /// Checks a write and writes its temporary file; `None` if it is too large to store.
    fn prepare_write(
        &self,
        tag: &str,
        payload: &[u8],
        options: &WriteOptions,
    ) -> Result<Option<PutOp>, CacheError> {
        if tag.len() > MAX_TAG_LEN {
            return Err(CacheError::TagTooLong { len: tag.len(), max: MAX_TAG_LEN });
        }
        let expires_at = match options.ttl {
            // At least 1: 0 means "never".
            Some(ttl) => expiry_ms(self.options.clock.now(), ttl).max(1),
            None => 0,
        };
        let size = format::entry_file_len(tag.len(), payload.len(), expires_at);
        if size > self.budget {
            tracing::warn!(
                tag,
                size,
                budget = self.budget,
                "cache: entry is larger than the whole budget; not caching"
            );
            return Ok(None);
        }
        let digest = naming::name_digest(tag);
        let final_path = self.dir.join(naming::name_with_digest(tag, digest));
        let temp_path = self.next_temp_path();
        // The journal needs the entry's complete bytes; otherwise the payload is not copied.
        let journaled = self.commit.is_some();
        let mut entry =
            format::encode_prefix(tag, payload, expires_at, if journaled { payload.len() } else { 0 });
        let prefix_len = entry.len();
        if journaled {
            entry.extend_from_slice(payload);
        }
        let modified = SystemTime::now();
        let body = if journaled { &entry[prefix_len..] } else { payload };
        if let Err(source) = self.write_temp_file(&temp_path, tag, &entry[..prefix_len], body, modified) {
            self.remove_quietly(&temp_path);
            return Err(CacheError::Write { tag: tag.to_owned(), path: temp_path, source });
        }
        if !journaled {
            entry = Vec::new();
        }
        let meta = EntryMeta { size, expires_at, mtime_ns: warm_start::system_time_ns(modified), digest };
        Ok(Some(PutOp { tag: tag.to_owned(), temp_path, final_path, entry, meta }))
    }

    /// Renames a complete temporary file into place and indexes it (not under
    /// [`Durability::Full`], whose batches do this themselves).
    fn install_now(&self, tag: &str, temp_path: &Path, final_path: &Path, meta: EntryMeta) -> io::Result<()> {
        let detached = {
            let mut index = self.lock_index();
            if let Err(error) =
                self.run_hook(IoStage::Commit, tag).and_then(|()| fs::rename(temp_path, final_path))
            {
                drop(index);
                self.remove_quietly(temp_path);
                return Err(error);
            }
            self.index_installed(&mut index, tag, meta).1
        };
        self.delete_detached(detached);
        Ok(())
    }

    /// Under the index lock, once `tag`'s new file is in place: indexes it, evicting to make
    /// room. Returns the evicted tags and their detached files (to delete once unlocked).
    fn index_installed(
        &self,
        index: &mut LruIndex,
        tag: &str,
        meta: EntryMeta,
    ) -> (Vec<String>, Vec<PathBuf>) {
        // The replaced value's size must not count against the room made for the new one.
        index.remove(tag);
        let evicted = index.evict_to_fit(meta.size, self.budget);
        Counters::add(&self.counters.evicted_for_room, evicted.len());
        index.insert(tag, meta);
        let detached = evicted.iter().filter_map(|victim| self.detach_file(victim)).collect();
        (evicted, detached)
    }

    /// The value stored under `tag`, marking it most recently used; `None` on a miss.
    ///
    /// A file that is damaged, truncated or missing is a miss, and its entry is dropped (with a
    /// warning). So is an expired entry. Other read errors (e.g. no memory for the payload) are
    /// misses that keep the entry.
    pub fn read(&self, tag: &str) -> Option<Vec<u8>> {
        let value = self.read_counted(tag);
        let counter = if value.is_some() { &self.counters.hits } else { &self.counters.misses };
        Counters::add(counter, 1);
        value
    }

    fn read_counted(&self, tag: &str) -> Option<Vec<u8>> {
        let path = self.entry_path(tag);
        let touched_at = SystemTime::now();
        let (mut file, generation) = {
            let mut index = self.lock_index();
            let entry = index.get(tag)?;
            if entry.expires_at != 0 && entry.expired_at(self.options.clock.now_ms()) {
                let detached = self.drop_locked(&mut index, tag, entry.generation);
                drop(index);
                Counters::add(&self.counters.expired, 1);
                self.delete_detached(detached);
                return None;
            }
            index.touch(tag, warm_start::system_time_ns(touched_at));
            match File::open(&path) {
                Ok(file) => (file, entry.generation),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    index.remove(tag);
                    Counters::add(&self.counters.dropped_damaged, 1);
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
                if let Err(error) = file.set_modified(touched_at) {
                    tracing::debug!(tag, %error, "cache: cannot update an entry's modification time");
                }
                Some(payload)
            }
            Err(ReadFailure::Damaged(reason)) => {
                tracing::warn!(tag, path = %path.display(), reason, "cache: damaged entry; dropping it");
                if self.drop_if_unchanged(tag, generation) {
                    Counters::add(&self.counters.dropped_damaged, 1);
                }
                None
            }
            Err(ReadFailure::Io(error)) => {
                tracing::warn!(tag, path = %path.display(), %error, "cache: cannot read entry; treating as a miss");
                None
            }
        }
    }

    /// Whether `tag` is in the index and not expired. Does not change recency and does not
    /// read the file.
    pub fn has(&self, tag: &str) -> bool {
        let Some(entry) = self.lock_index().get(tag) else { return false };
        entry.expires_at == 0 || !entry.expired_at(self.options.clock.now_ms())
    }

    /// When `tag`'s entry expires (`None`: it never does, or there is no such entry).
    pub fn expires_at(&self, tag: &str) -> Option<SystemTime> {
        let entry = self.lock_index().get(tag)?;
        (entry.expires_at != 0).then(|| UNIX_EPOCH + Duration::from_millis(entry.expires_at))
    }

    /// Removes `tag`'s entry; returns whether there was one.
    pub fn evict(&self, tag: &str) -> bool {
        let tag = tag.to_owned();
        let removed =
            self.remove_selected(Box::new(
                move |index: &LruIndex| {
                    if index.contains(&tag) { vec![tag] } else { Vec::new() }
                },
            ));
        !removed.is_empty()
    }

    /// Removes every entry whose whole tag one of `patterns` matches (as the `cache:`
    /// section's `tags:` do); returns their tags, least recently used first.
    ///
    /// ```
    /// # use chia_cache::{CacheStore, StoreOptions, TagPatterns};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let store = CacheStore::open(dir.path(), 1 << 20, StoreOptions::default())?;
    /// for tag in ["iter1_a", "iter1_b", "iter10_a"] {
    ///     store.write(tag, b"v")?;
    /// }
    /// let removed = store.evict_matching(&TagPatterns::new(["iter1_.*"])?);
    /// assert_eq!(removed, ["iter1_a", "iter1_b"]);
    /// assert_eq!(store.keys(), ["iter10_a"]);
    /// # Ok(()) }
    /// ```
    pub fn evict_matching(&self, patterns: &TagPatterns) -> Vec<String> {
        let patterns = patterns.clone();
        self.remove_selected(Box::new(move |index: &LruIndex| {
            index.iter().filter(|(tag, _)| patterns.matches(tag)).map(|(tag, _)| tag.to_string()).collect()
        }))
    }

    /// Removes every entry.
    pub fn flush(&self) {
        self.remove_selected(Box::new(|index: &LruIndex| index.keys()));
    }

    /// Removes the entries whose time to live is over; returns their tags, least recently used
    /// first. Cheap when nothing expires (one pass over the index, no I/O); meant to be called
    /// on a timer.
    pub fn sweep_expired(&self) -> Vec<String> {
        let now_ms = self.options.clock.now_ms();
        let (expired, detached) = {
            let mut index = self.lock_index();
            let expired: Vec<String> = index
                .iter()
                .filter(|(_, entry)| entry.expired_at(now_ms))
                .map(|(tag, _)| tag.to_string())
                .collect();
            for tag in &expired {
                index.remove(tag);
            }
            let detached: Vec<PathBuf> = expired.iter().filter_map(|tag| self.detach_file(tag)).collect();
            (expired, detached)
        };
        Counters::add(&self.counters.expired, expired.len());
        self.delete_detached(detached);
        expired
    }

    /// Re-reads every entry and checks its length and checksums, without changing recency.
    /// Bad entries (damaged or missing files) are removed unless `dry_run`; either way they are
    /// reported. Entries written or evicted meanwhile may or may not be checked.
    pub fn verify(&self, dry_run: bool) -> VerifyReport {
        let mut report = VerifyReport::default();
        let entries: Vec<(String, u64)> =
            self.lock_index().iter().map(|(tag, entry)| (tag.to_string(), entry.generation)).collect();
        for (tag, generation) in entries {
            let path = self.entry_path(&tag);
            let opened = {
                let index = self.lock_index();
                match index.get(&tag) {
                    Some(entry) if entry.generation == generation => Some(File::open(&path)),
                    // Evicted or replaced since the list was taken.
                    _ => None,
                }
            };
            let Some(opened) = opened else { continue };
            report.checked += 1;
            let outcome = match opened {
                Ok(mut file) => read_entry(&mut file, &tag).map(drop),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    Err(ReadFailure::Damaged("file is missing".to_owned()))
                }
                Err(error) => Err(ReadFailure::Io(error)),
            };
            match outcome {
                Ok(()) => report.ok += 1,
                Err(ReadFailure::Io(error)) => {
                    tracing::warn!(tag, path = %path.display(), %error, "cache verify: cannot read entry");
                    report.unreadable += 1;
                }
                Err(ReadFailure::Damaged(reason)) => {
                    tracing::warn!(tag, path = %path.display(), reason, dry_run, "cache verify: bad entry");
                    if !dry_run && self.drop_if_unchanged(&tag, generation) {
                        Counters::add(&self.counters.dropped_damaged, 1);
                        report.removed += 1;
                    }
                    report.bad.push(BadEntry { tag, path, reason });
                }
            }
        }
        report
    }

    /// Every entry with its size and expiry, from least to most recently used (expired
    /// entries included until removed).
    pub fn entries(&self) -> Vec<EntryInfo> {
        self.lock_index()
            .iter()
            .map(|(tag, entry)| EntryInfo {
                tag: tag.to_string(),
                size: entry.size,
                expires_at: (entry.expires_at != 0)
                    .then(|| UNIX_EPOCH + Duration::from_millis(entry.expires_at)),
            })
            .collect()
    }

    /// What the open found in the directory: how much came from the index snapshot, what a
    /// crash left, what was cleaned up, and how long it took.
    pub fn open_report(&self) -> &OpenReport {
        &self.opened
    }

    /// Tags from least to most recently used (expired entries included until removed).
    pub fn keys(&self) -> Vec<String> {
        self.lock_index().keys()
    }

    /// Accounted bytes of all entries (their files' lengths).
    pub fn size_bytes(&self) -> u64 {
        self.gauges.bytes.load(Ordering::Relaxed)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.gauges.entries.load(Ordering::Relaxed) as usize
    }

    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the store holds and has done since it opened; atomics only, no lock.
    pub fn stats(&self) -> StoreStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StoreStats {
            entries: load(&self.gauges.entries),
            bytes: load(&self.gauges.bytes),
            hits: load(&self.counters.hits),
            misses: load(&self.counters.misses),
            writes: load(&self.counters.writes),
            evicted_for_room: load(&self.counters.evicted_for_room),
            evicted_explicitly: load(&self.counters.evicted_explicitly),
            expired: load(&self.counters.expired),
            dropped_damaged: load(&self.counters.dropped_damaged),
        }
    }

    /// Saves the index snapshot now, so that the next open lists the directory instead of
    /// reading every header. Costs a pass over the index (under its lock, briefly) and one file
    /// write of about 40 bytes plus the tag per entry. Also done at [`close`](Self::close), on
    /// drop and every [`StoreOptions::snapshot_every_writes`] writes.
    pub fn save_index(&self) -> Result<(), CacheError> {
        let _saving = self.saving_snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        self.save_index_locked()
    }

    fn save_index_locked(&self) -> Result<(), CacheError> {
        self.writes_since_snapshot.store(0, Ordering::Relaxed);
        let entries: Vec<snapshot::SavedEntry> = self
            .lock_index()
            .iter()
            .map(|(tag, entry)| snapshot::SavedEntry {
                tag: Arc::clone(tag),
                digest: entry.digest,
                size: entry.size,
                mtime_ns: entry.mtime_ns,
                expires_at: entry.expires_at,
            })
            .collect();
        snapshot::save(&self.dir, entries, self.next_temp_path()).map_err(|source| CacheError::SaveIndex {
            path: self.dir.join(naming::SNAPSHOT_FILE_NAME),
            source,
        })
    }

    /// After a write: saves the snapshot if it is due and nobody is saving one already.
    fn maybe_save_index(&self) {
        let Some(every) = self.options.snapshot_every_writes else { return };
        if self.writes_since_snapshot.fetch_add(1, Ordering::Relaxed) + 1 < every {
            return;
        }
        let Ok(_saving) = self.saving_snapshot.try_lock() else { return };
        if let Err(error) = self.save_index_locked() {
            tracing::warn!(%error, "cache: cannot save the index snapshot");
        }
    }

    /// Shuts the store down cleanly: saves the index snapshot and, under
    /// [`Durability::Full`], makes the entries durable and deletes the journal, so that the
    /// next open replays nothing and reads few headers. Drop does the same, logging what fails
    /// instead of returning it.
    pub fn close(self) -> Result<(), CacheError> {
        self.shut_down()
    }

    fn shut_down(&self) -> Result<(), CacheError> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let saved = self.save_index();
        if let Some(commit) = &self.commit {
            commit
                .retire_all(&self.dir)
                .map_err(|source| CacheError::Close { dir: self.dir.clone(), source })?;
        }
        saved
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

    /// Writes the complete entry (`prefix`, then `payload`) to `temp_path`, with `modified` as
    /// its modification time, synced if the durability policy asks for it per file.
    fn write_temp_file(
        &self,
        temp_path: &Path,
        tag: &str,
        prefix: &[u8],
        payload: &[u8],
        modified: SystemTime,
    ) -> io::Result<()> {
        let mut file = permissions::private_file_options().write(true).create_new(true).open(temp_path)?;
        let (first_half, second_half) = payload.split_at(payload.len() / 2);
        if cfg!(test) {
            // Two writes, so that unit tests can fail one half-way through the payload.
            journal::write_all_vectored(&file, &[IoSlice::new(prefix), IoSlice::new(first_half)])?;
            self.run_hook(IoStage::PayloadHalfWritten, tag)?;
            file.write_all(second_half)?;
        } else {
            journal::write_all_vectored(&file, &[IoSlice::new(prefix), IoSlice::new(payload)])?;
        }
        // The time the index records, to the nanosecond: a warm start trusts the snapshot's
        // record of a file only while the file still has it.
        file.set_modified(modified)?;
        if self.options.durability == Durability::Data {
            self.run_hook(IoStage::SyncTemp, tag)?;
            file.sync_data()?;
        }
        Ok(())
    }

    /// Removes the entries `select` picks. Under [`Durability::Full`] the removal goes through
    /// the write queue, so the journal records it in order.
    fn remove_selected(&self, select: Selector) -> Vec<String> {
        let removed = match &self.commit {
            Some(commit) => commit.submit(self, Op::Remove(select)).into_removed(),
            None => {
                let (removed, detached) = {
                    let mut index = self.lock_index();
                    let removed = select(&index);
                    let detached = self.remove_locked(&mut index, &removed);
                    (removed, detached)
                };
                self.delete_detached(detached);
                removed
            }
        };
        Counters::add(&self.counters.evicted_explicitly, removed.len());
        removed
    }

    /// Under the index lock: removes `tags` and detaches their files.
    fn remove_locked(&self, index: &mut LruIndex, tags: &[String]) -> Vec<PathBuf> {
        tags.iter()
            .filter(|tag| index.remove(tag).is_some())
            .filter_map(|tag| self.detach_file(tag))
            .collect()
    }

    /// Under the index lock: drops `tag` if its generation is still `generation`; returns the
    /// detached file to delete.
    fn drop_locked(&self, index: &mut LruIndex, tag: &str, generation: u64) -> Option<PathBuf> {
        if index.get(tag).is_none_or(|entry| entry.generation != generation) {
            return None;
        }
        index.remove(tag);
        self.detach_file(tag)
    }

    /// Drops `tag`'s entry after a failed read, unless a write replaced it since; returns
    /// whether it did.
    fn drop_if_unchanged(&self, tag: &str, generation: u64) -> bool {
        let (dropped, detached) = {
            let mut index = self.lock_index();
            let present = index.get(tag).is_some_and(|entry| entry.generation == generation);
            (present, self.drop_locked(&mut index, tag, generation))
        };
        self.delete_detached(detached);
        dropped
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

impl Drop for CacheStore {
    fn drop(&mut self) {
        if let Err(error) = self.shut_down() {
            tracing::warn!(%error, "cache: could not shut the store down cleanly");
        }
    }
}

/// `now + ttl` in milliseconds since the Unix epoch, saturating.
fn expiry_ms(now: SystemTime, ttl: Duration) -> u64 {
    options::millis_since_epoch(now).saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
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
        f.debug_struct("CacheStore")
            .field("dir", &self.dir)
            .field("budget", &self.budget)
            .field("durability", &self.options.durability)
            .field("entries", &self.len())
            .field("size_bytes", &self.size_bytes())
            .finish()
    }
}

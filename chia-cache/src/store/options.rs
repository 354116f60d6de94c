//! How a [`crate::CacheStore`] trades write latency for durability, where it reads the time,
//! and what one write asks for.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// When a write is forced to stable storage. Whatever the choice, a write is crash-consistent:
/// it goes to a temporary file that is renamed into place when complete, and every entry
/// carries checksums, so a crash or power loss can lose entries but never expose a partial or
/// wrong one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Durability {
    /// No fsync. A killed process loses nothing that `write` returned for (the kernel has it);
    /// a power loss may lose recent entries, and may leave damaged files that reads then treat
    /// as misses.
    None,
    /// fsync the file before renaming it into place: after a power loss an entry is complete
    /// or absent, but the last renames before it may be lost.
    Data,
    /// Once `write` returns `Ok(true)` the entry survives a power loss. Concurrent writes share
    /// their syncs (group commit through a journal in the directory, see
    /// [`crate::CacheStore`]), so many writers cost about one data sync per batch rather than
    /// two syncs each. The default: cached values are outputs of expensive tasks (builds,
    /// simulations) that take far longer than a sync, and the cache exists so reruns do not
    /// repeat them.
    #[default]
    Full,
}

/// Where a store reads the time for expiry ([`WriteOptions::ttl`]): the system clock, or one a
/// test moves by hand ([`ManualClock`]). File modification times, which order a warm start,
/// always come from the system clock.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Clock(Arc::new(SystemTime::now))
    }

    /// A clock that asks `now` for the time.
    pub fn from_fn(now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Clock(Arc::new(now))
    }

    /// The current time by this clock.
    pub fn now(&self) -> SystemTime {
        (self.0)()
    }

    /// The current time in milliseconds since the Unix epoch (0 before it), the unit entries
    /// keep their expiry in.
    pub(crate) fn now_ms(&self) -> u64 {
        millis_since_epoch(self.now())
    }
}

/// Milliseconds from the Unix epoch to `time`, 0 for earlier times, saturating far ahead.
pub(crate) fn millis_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

/// Two clocks are equal if they are the same clock (clones of one another).
impl PartialEq for Clock {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Clock {}

/// A clock that stands still until told to move, for tests of expiry that must not sleep.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use chia_cache::ManualClock;
///
/// let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000));
/// let as_store_sees_it = clock.clock();
/// clock.advance(Duration::from_secs(5));
/// assert_eq!(as_store_sees_it.now(), SystemTime::UNIX_EPOCH + Duration::from_secs(1_005));
/// ```
#[derive(Clone, Debug)]
pub struct ManualClock {
    /// Nanoseconds since the Unix epoch.
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock showing `start` (times before the Unix epoch show as the epoch).
    pub fn new(start: SystemTime) -> Self {
        let nanos = start.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_nanos() as u64);
        ManualClock { nanos: Arc::new(AtomicU64::new(nanos)) }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }

    /// The time it shows.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }

    /// A [`Clock`] reading this one, for [`StoreOptions::with_clock`].
    pub fn clock(&self) -> Clock {
        let nanos = Arc::clone(&self.nanos);
        Clock::from_fn(move || UNIX_EPOCH + Duration::from_nanos(nanos.load(Ordering::SeqCst)))
    }
}

/// Options of [`crate::CacheStore::open`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreOptions {
    /// How far each write is synced to disk before it counts as done (default `Full`).
    pub durability: Durability,
    /// The time expiry is judged by (default: the system clock).
    pub clock: Clock,
    /// Save the index snapshot (see [`crate::CacheStore::save_index`]) after this many writes
    /// since the last one, so that a warm start after a crash reads few headers too. `None`:
    /// only when asked and at close. Default 100,000; saving costs about as much as listing
    /// the entries.
    pub snapshot_every_writes: Option<u64>,
    /// Under [`Durability::Full`], once the journal holds this many bytes the store makes the
    /// entries' files durable (one file-system sync) and starts a new, empty journal. Default
    /// 64 MiB: it bounds the journal's disk space and what an open after a crash replays.
    pub journal_checkpoint_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durability: Durability::default(),
            clock: Clock::system(),
            snapshot_every_writes: Some(100_000),
            journal_checkpoint_bytes: 64 << 20,
        }
    }
}

impl StoreOptions {
    /// These options with `durability` instead.
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// These options with `clock` judging expiry.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// These options saving the index snapshot every `writes` writes (`None`: only when asked
    /// and at close).
    pub fn with_snapshot_every_writes(mut self, writes: Option<u64>) -> Self {
        self.snapshot_every_writes = writes;
        self
    }

    /// These options with a journal checkpoint every `bytes` of journal.
    pub fn with_journal_checkpoint_bytes(mut self, bytes: u64) -> Self {
        self.journal_checkpoint_bytes = bytes;
        self
    }
}

/// What one write asks for beyond its tag and payload ([`crate::CacheStore::write_with`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteOptions {
    /// How long the entry is served: from the write on, by the store's [`Clock`]. After that it
    /// is a miss, removed when next read or by [`crate::CacheStore::sweep_expired`]. Kept in
    /// the entry's file, so it holds across restarts. `None` (the default): until evicted.
    pub ttl: Option<Duration>,
}

impl WriteOptions {
    /// Options of a write that expires `ttl` after it is made.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

//! A live key/value store for the cluster (the original's `chia_kv_store`): settings that an
//! operator or another driver changes while a loop runs, read by drivers and tasks alike.
//!
//! ```
//! # extern crate chia_runtime as chia;
//! # #[tokio::main] async fn main() -> Result<(), chia::Error> {
//! # let cx = chia::Init::new().local_workers(1).connect().await?;
//! use chia::kv;
//! kv::set(&cx, "sweep/parallel", &4u32).await?;
//! let parallel: u32 = kv::get_or(&cx, "sweep/parallel", 2).await?;
//! assert_eq!(parallel, 4);
//! assert_eq!(kv::keys(&cx, "sweep/").await?, ["sweep/parallel"]);
//!
//! let mut knob = kv::watch::<u32>(&cx, "sweep/parallel").await?;
//! assert_eq!(knob.next().await?, kv::Change::Set(4)); // the value as the watch began
//! kv::set(&cx, "sweep/parallel", &8u32).await?;
//! assert_eq!(knob.next().await?, kv::Change::Set(8));
//! assert!(kv::delete(&cx, "sweep/parallel").await?);
//! assert_eq!(knob.next().await?, kv::Change::Unset);
//! # Ok(()) }
//! ```
//!
//! From the command line: `chia kv set sweep/parallel 4` (the value is JSON), `chia kv get
//! sweep/parallel`, `chia kv list [PREFIX]`, `chia kv delete KEY`.
//!
//! # How it is built
//!
//! The store is a built-in service (`chia.Kv`, [`SERVICE_NAME`] in the namespace
//! [`NAMESPACE`], which is the runtime's), detached and pinned to the head's node. Every
//! function here finds it by name through the head, and starts it on first use with
//! get-if-exists, so drivers racing to use it first end up with the same instance. Nothing
//! else is needed: no message of its own on the wire, nothing in the head's core.
//!
//! **Values** are typed by serde on the API and stored as MessagePack with field names, a
//! self-describing encoding, so the command line can show any value as JSON and set one from
//! JSON (`chia kv set n 4` stores an integer, which reads back as any integer type, or `f64`).
//! A value of another type than asked for is [`KvError::WrongType`], naming the key and the
//! type; it never reads as a default.
//!
//! **Persistence.** When the head has a state directory (`chia-head` always has one; an
//! embedded cluster has one only if given `HeadOptions::state_dir`), the store lives in
//! `<state dir>/kv.msgpack` ([`FILE_NAME`], mode 0600): a checksummed image of the whole store,
//! rewritten on every change (temp file, fsync, rename, fsync of the directory), before the
//! change is answered, so a set that returned survives a crash of the head (SIGKILL included)
//! and a crash mid-write leaves the previous image. The head restarts its detached services
//! when it restarts, so the store loads the file again, whether or not anyone uses it yet.
//! A file that cannot be read or does not check is [`KvError::Unreadable`], naming it: the
//! store does not start (every call says why) rather than start empty. Without a state
//! directory the store is kept in memory and ends with the cluster. A rewrite of the whole
//! image costs up to [`MAX_TOTAL_BYTES`] written per change: the store is meant for settings,
//! not for data (use the cache, or results, for that).
//!
//! **Bounds.** A key is 1 to [`MAX_KEY_BYTES`] bytes of UTF-8 without control characters; an
//! encoded value at most [`MAX_VALUE_BYTES`]; the store at most [`MAX_KEYS`] keys and
//! [`MAX_TOTAL_BYTES`] of keys and values. Each is checked where it can be first (keys and
//! sizes by the caller, the totals by the store), with an error naming the key.
//!
//! **Watching.** Service calls are answered one by one, so a call that waits for a change
//! must not hold up the others: the store is a concurrent service, and [`Watch::next`] makes
//! one call that waits inside the store until the key's version differs from the one the watch
//! saw (a change wakes it at once: the latency is one round trip through the head), or for at
//! most 10 s, after which the watch asks again. A watch yields states, not every write: two
//! sets in quick succession may be seen as the second only, and the last state is never
//! missed. It survives a restart of the store or of the head (it finds the store again by name;
//! versions are kept in the file). At most [`MAX_WATCHES`] calls wait at once.
//!
//! The original kept one store per name and namespace; here there is one store per cluster,
//! and a key's prefix (`sweep/parallel`) plays the namespace.

use crate::driver::context::Context;
use crate::error::Error;
use crate::net::tls::write_private;
use crate::services::service::ServiceOptions;
use chia_core::{HEAD_NODE_NAME, TaskError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf as Bytes;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub use crate::error::KvError;
use store::{Entry, KvStoreHandle};

/// The name the store's service is registered under, in [`NAMESPACE`].
pub const SERVICE_NAME: &str = "kv";
/// The namespace of the runtime's own services.
pub const NAMESPACE: &str = "chia";
/// The store's file in the head's state directory.
pub const FILE_NAME: &str = "kv.msgpack";
/// The longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// The largest encoded value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// The most bytes of keys and encoded values the store holds.
pub const MAX_TOTAL_BYTES: usize = 8 << 20;
/// The most keys the store holds.
pub const MAX_KEYS: usize = 10_000;
/// The most watch calls that wait in the store at once.
pub const MAX_WATCHES: usize = 1024;

/// How long one watch call waits in the store before answering "no change".
const WATCH_WAIT: Duration = Duration::from_secs(10);
/// How much longer than that a watch waits for the answer before asking again (the store's
/// node, the head's, may have gone with its head).
const WATCH_SLACK: Duration = Duration::from_secs(10);
/// The longest pause between two tries of a watch whose store is away.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Bumped when the file's layout changes incompatibly.
const FORMAT: u32 = 1;

/// Stores `value` under `key`, replacing what it held. Returns once the store has it (and,
/// when the head has a state directory, once it is on disk).
pub async fn set<T: Serialize + ?Sized>(cx: &Context, key: &str, value: &T) -> Result<(), Error> {
    check_key(key)?;
    let bytes = rmp_serde::to_vec_named(value).map_err(|e| KvError::Encode {
        key: key.to_string(),
        type_name: std::any::type_name::<T>().to_string(),
        message: e.to_string(),
    })?;
    check_value(key, bytes.len())?;
    let bytes = Bytes::from(bytes);
    let version = with_store(cx, |store| store.set(key.to_string(), bytes.clone())).await?.into_result()?;
    tracing::debug!(key, version, "kv set");
    Ok(())
}

/// The value under `key`, or `None` if it holds none.
pub async fn get<T: DeserializeOwned>(cx: &Context, key: &str) -> Result<Option<T>, Error> {
    check_key(key)?;
    let entry = with_store(cx, |store| store.get(key.to_string())).await?;
    entry.map(|entry| decode(key, &entry.value)).transpose()
}

/// The value under `key`, or `default` if it holds none. A value of another type is an error,
/// not the default (the original fell back to the default on any failure).
pub async fn get_or<T: DeserializeOwned>(cx: &Context, key: &str, default: T) -> Result<T, Error> {
    Ok(get(cx, key).await?.unwrap_or(default))
}

/// Removes `key`; whether it held a value.
pub async fn delete(cx: &Context, key: &str) -> Result<bool, Error> {
    check_key(key)?;
    let deleted = with_store(cx, |store| store.delete(key.to_string())).await?.into_result()?;
    tracing::debug!(key, deleted, "kv delete");
    Ok(deleted)
}

/// The keys starting with `prefix` (`""`: all), sorted.
pub async fn keys(cx: &Context, prefix: &str) -> Result<Vec<String>, Error> {
    with_store(cx, |store| store.keys(prefix.to_string())).await
}

/// The keys starting with `prefix` (`""`: all) with their values, sorted by key. Every value
/// must be a `T` (use a type any value decodes as to list values of several types).
pub async fn entries<T: DeserializeOwned>(cx: &Context, prefix: &str) -> Result<Vec<(String, T)>, Error> {
    let entries = with_store(cx, |store| store.entries(prefix.to_string())).await?;
    entries
        .into_iter()
        .map(|(key, entry)| {
            let value = decode(&key, &entry.value)?;
            Ok((key, value))
        })
        .collect()
}

/// Watches `key`: [`Watch::next`] yields the state as the watch began, then each change.
pub async fn watch<T: DeserializeOwned>(cx: &Context, key: &str) -> Result<Watch<T>, Error> {
    check_key(key)?;
    let entry = with_store(cx, |store| store.get(key.to_string())).await?;
    Ok(Watch {
        cx: cx.clone(),
        key: key.to_string(),
        seen: entry.as_ref().map(|entry| entry.version),
        first: Some(entry),
        store: None,
        _type: PhantomData,
    })
}

/// What a key holds, as a [`Watch`] yields it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<T> {
    /// The key holds this value (it was set, or set again).
    Set(T),
    /// The key holds nothing: it was deleted (or, as a watch's first state, never set).
    Unset,
}

impl<T> Change<T> {
    /// The value, if the key holds one.
    pub fn into_option(self) -> Option<T> {
        match self {
            Change::Set(value) => Some(value),
            Change::Unset => None,
        }
    }
}

/// The changes of one key, from [`watch`]: an async iterator (`while let` over
/// [`next`](Watch::next)).
pub struct Watch<T> {
    cx: Context,
    key: String,
    /// The version of the state last yielded (or about to be, as the first); `None`: unset.
    seen: Option<u64>,
    /// The state as the watch began, until yielded.
    first: Option<Option<Entry>>,
    /// The store as last found; found again after a failure.
    store: Option<KvStoreHandle>,
    _type: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Watch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("key", &self.key).field("seen", &self.seen).finish()
    }
}

impl<T: DeserializeOwned> Watch<T> {
    /// The key watched.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The next state of the key: at the first call the state as the watch began, then the
    /// next one that differs from the last yielded (waiting for it). Intermediate states of
    /// quick successive changes may be skipped, never the latest. While the store is away
    /// (its head restarting) it waits and asks again; other failures are returned, and a value
    /// of another type is [`KvError::WrongType`] (the watch then waits for the next change).
    ///
    /// Cancel-safe: dropping the future (in a `select!`) loses no change.
    pub async fn next(&mut self) -> Result<Change<T>, Error> {
        if let Some(first) = self.first.take() {
            return self.yielded(first);
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.ask().await {
                Ok(entry) if entry.as_ref().map(|e| e.version) != self.seen => {
                    self.seen = entry.as_ref().map(|e| e.version);
                    return self.yielded(entry);
                }
                // Nothing changed within the store's wait: ask again.
                Ok(_) => backoff = Duration::from_millis(50),
                Err(error) if store_away(&error) => {
                    tracing::debug!(key = %self.key, "kv watch: the store is away ({error}); asking again");
                    self.store = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn ask(&mut self) -> Result<Option<Entry>, Error> {
        let store = match &self.store {
            Some(store) => store.clone(),
            None => {
                let store = find_or_start(&self.cx).await?;
                self.store = Some(store.clone());
                store
            }
        };
        let wait_ms = WATCH_WAIT.as_millis() as u64;
        let answer = store.changed(self.key.clone(), self.seen, wait_ms);
        Ok(answer.get_timeout(WATCH_WAIT + WATCH_SLACK).await?.into_result()?)
    }

    fn yielded(&self, entry: Option<Entry>) -> Result<Change<T>, Error> {
        match entry {
            Some(entry) => decode(&self.key, &entry.value).map(Change::Set),
            None => Ok(Change::Unset),
        }
    }
}

/// Failures after which a watch finds the store again instead of giving up: it stopped (or
/// its node, the head's, went with a restarting head), or the answer did not come.
fn store_away(error: &Error) -> bool {
    matches!(
        error,
        Error::Timeout { .. }
            | Error::Task(TaskError::ServiceUnavailable { .. } | TaskError::WorkerLost { .. })
    )
}

/// Runs `call` on the store, found by name or started; again once, on a store found afresh,
/// when the one found had just stopped (its call then never reached it).
async fn with_store<T, F>(cx: &Context, call: F) -> Result<T, Error>
where
    T: DeserializeOwned,
    F: Fn(&KvStoreHandle) -> crate::ObjectRef<T>,
{
    let store = find_or_start(cx).await?;
    match call(&store).get().await {
        Err(Error::Task(TaskError::ServiceUnavailable { .. })) => call(&find_or_start(cx).await?).get().await,
        answer => answer,
    }
}

/// The store, looked up by name (not kept by the head's journal, unlike a start), or started
/// with get-if-exists when none runs.
async fn find_or_start(cx: &Context) -> Result<KvStoreHandle, Error> {
    if let Some(store) = KvStoreHandle::lookup(cx, SERVICE_NAME, Some(NAMESPACE)).await? {
        return Ok(store);
    }
    let options =
        ServiceOptions::named(SERVICE_NAME).namespace(NAMESPACE).detached().get_if_exists().on_head();
    KvStoreHandle::start(cx, options).await
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, Error> {
    rmp_serde::from_slice(bytes).map_err(|e| {
        Error::Kv(KvError::WrongType {
            key: key.to_string(),
            expected: std::any::type_name::<T>().to_string(),
            message: e.to_string(),
        })
    })
}

/// Why `key` cannot be a key, if it cannot.
fn check_key(key: &str) -> Result<(), KvError> {
    let reason = if key.is_empty() {
        "it is empty".to_string()
    } else if key.len() > MAX_KEY_BYTES {
        format!("it is {} bytes long; a key has at most {MAX_KEY_BYTES}", key.len())
    } else if let Some((at, c)) = key.char_indices().find(|(_, c)| c.is_control()) {
        format!("it holds the control character {c:?} at byte {at}")
    } else {
        return Ok(());
    };
    Err(KvError::BadKey { key: key.to_string(), reason })
}

fn check_value(key: &str, bytes: usize) -> Result<(), KvError> {
    if bytes > MAX_VALUE_BYTES {
        return Err(KvError::ValueTooLarge {
            key: key.to_string(),
            bytes: bytes as u64,
            limit: MAX_VALUE_BYTES as u64,
        });
    }
    Ok(())
}

/// The store's service and its file, apart: what they define is the runtime's own, not API.
mod store {
    use super::*;

    /// A stored value and the version of the store that wrote it.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Entry {
        pub value: Bytes,
        pub version: u64,
    }

    impl Entry {
        fn size(&self, key: &str) -> usize {
            key.len() + self.value.len()
        }
    }

    /// An answer of the store that may be a refusal. A value, not the method's `Err`, so the
    /// caller gets the typed [`KvError`] rather than its text.
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(transparent)]
    pub struct Reply<T>(Result<T, KvError>);

    impl<T> Reply<T> {
        pub fn into_result(self) -> Result<T, KvError> {
            self.0
        }
    }

    /// What the store holds.
    #[derive(Debug, Default, Serialize, Deserialize)]
    pub struct Contents {
        /// The version the next change gets; versions only grow, across restarts too (they
        /// start from the time in microseconds).
        pub(super) next_version: u64,
        pub(super) entries: BTreeMap<String, Entry>,
    }

    impl Contents {
        pub fn bytes(&self) -> usize {
            self.entries.iter().map(|(key, entry)| entry.size(key)).sum()
        }
    }

    /// The file: the contents' encoding and its checksum.
    #[derive(Serialize, Deserialize)]
    struct Image {
        format: u32,
        crc32: u32,
        contents: Bytes,
    }

    /// The store's service: its contents, its file (if the head has a state directory), and a
    /// signal that wakes the waiting watches.
    pub struct KvStore {
        state: Mutex<State>,
        file: Option<PathBuf>,
        changes: tokio::sync::watch::Sender<u64>,
        watches: AtomicUsize,
    }

    struct State {
        contents: Contents,
        /// Bytes of keys and values, kept as they change.
        bytes: usize,
    }

    // Concurrent: a watch's call waits inside the store without holding up the others. The
    // contents are behind one mutex, held while a change is written to the file, so changes are
    // saved in the order they are made.
    #[chia::service(name = "chia.Kv", concurrent)]
    impl KvStore {
        /// Loads the store from the head's state directory, or starts it empty in memory.
        pub fn new(cx: &Context) -> Result<Self, KvError> {
            let file = state_dir(cx).map(|dir| dir.join(FILE_NAME));
            let mut contents = match &file {
                Some(path) => load(path)?,
                None => Contents::default(),
            };
            let bytes = contents.bytes();
            match &file {
                Some(path) => {
                    tracing::info!(
                        "kv store in {}: {} keys, {bytes} bytes",
                        path.display(),
                        contents.entries.len()
                    )
                }
                None => tracing::info!("kv store in memory (the head has no state directory)"),
            }
            // Versions only grow, also across a store started again without its file (in memory,
            // or after a stop): starting from the time, a watch never takes a new store's version
            // for the one it saw in an earlier store.
            contents.next_version = contents.next_version.max(micros_since_epoch());
            let (changes, _) = tokio::sync::watch::channel(contents.next_version);
            Ok(KvStore {
                state: Mutex::new(State { contents, bytes }),
                file,
                changes,
                watches: AtomicUsize::new(0),
            })
        }

        pub fn get(&self, key: String) -> Option<Entry> {
            self.lock().contents.entries.get(&key).cloned()
        }

        pub fn keys(&self, prefix: String) -> Vec<String> {
            self.lock().contents.entries.keys().filter(|key| key.starts_with(&prefix)).cloned().collect()
        }

        pub fn entries(&self, prefix: String) -> Vec<(String, Entry)> {
            let state = self.lock();
            let matching = state.contents.entries.iter().filter(|(key, _)| key.starts_with(&prefix));
            matching.map(|(key, entry)| (key.clone(), entry.clone())).collect()
        }

        /// Stores `value` under `key`; the version of the change.
        pub fn set(&self, key: String, value: Bytes) -> Reply<u64> {
            Reply(self.change(&key, Some(value)).map(|version| version.unwrap_or_default()))
        }

        /// Removes `key`; whether it held a value.
        pub fn delete(&self, key: String) -> Reply<bool> {
            Reply(self.change(&key, None).map(|version| version.is_some()))
        }

        /// What `key` holds once its version differs from `seen` (`None`: unset), or after
        /// `wait_ms` (at most 10 s) if it does not change.
        pub async fn changed(&self, key: String, seen: Option<u64>, wait_ms: u64) -> Reply<Option<Entry>> {
            let Some(_waiting) = WatchSlot::take(&self.watches) else {
                return Reply(Err(KvError::TooManyWatches { limit: MAX_WATCHES }));
            };
            // Subscribed before looking, so a change between the look and the wait wakes it.
            let mut changes = self.changes.subscribe();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms).min(WATCH_WAIT);
            loop {
                let entry = self.get(key.clone());
                if entry.as_ref().map(|e| e.version) != seen {
                    return Reply(Ok(entry));
                }
                match tokio::time::timeout_at(deadline, changes.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => return Reply(Ok(entry)),
                }
            }
        }
    }

    impl KvStore {
        fn lock(&self) -> std::sync::MutexGuard<'_, State> {
            // The state is never left half-changed (a change is undone if it cannot be saved), so
            // a panic elsewhere while it was held does not spoil it.
            self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
        }

        /// Sets (`Some`) or removes (`None`) `key`, saves, wakes the watches. The version of the
        /// change; `None` when there was nothing to remove.
        fn change(&self, key: &str, value: Option<Bytes>) -> Result<Option<u64>, KvError> {
            check_key(key)?;
            if let Some(value) = &value {
                check_value(key, value.len())?;
            }
            let mut state = self.lock();
            let state = &mut *state;
            let held = state.contents.entries.contains_key(key);
            if value.is_none() && !held {
                return Ok(None);
            }
            let old_size = state.contents.entries.get(key).map_or(0, |entry| entry.size(key));
            let version = state.contents.next_version.max(1);
            let new_entry = value.map(|value| Entry { value, version });
            let new_size = new_entry.as_ref().map_or(0, |entry| entry.size(key));
            let new_bytes = state.bytes - old_size + new_size;
            if new_entry.is_some() && !held && state.contents.entries.len() >= MAX_KEYS {
                return Err(KvError::StoreFull {
                    key: key.to_string(),
                    reason: format!("it holds {MAX_KEYS} keys, the most it may"),
                });
            }
            if new_size > old_size && new_bytes > MAX_TOTAL_BYTES {
                return Err(KvError::StoreFull {
                    key: key.to_string(),
                    reason: format!(
                        "it would hold {new_bytes} bytes of keys and values; it may hold {MAX_TOTAL_BYTES}"
                    ),
                });
            }
            let previous = match new_entry {
                Some(entry) => state.contents.entries.insert(key.to_string(), entry),
                None => state.contents.entries.remove(key),
            };
            let previous_next = state.contents.next_version;
            state.contents.next_version = version + 1;
            if let Some(path) = &self.file
                && let Err(message) = save(path, &state.contents)
            {
                // Undone: what the store holds is what its file holds.
                match previous {
                    Some(entry) => state.contents.entries.insert(key.to_string(), entry),
                    None => state.contents.entries.remove(key),
                };
                state.contents.next_version = previous_next;
                return Err(KvError::Persist { path: path.display().to_string(), message });
            }
            state.bytes = new_bytes;
            self.changes.send_replace(version);
            Ok(Some(version))
        }
    }

    /// One of the [`MAX_WATCHES`] places for a waiting watch call, given back when dropped.
    pub struct WatchSlot<'a>(&'a AtomicUsize);

    impl<'a> WatchSlot<'a> {
        pub fn take(count: &'a AtomicUsize) -> Option<WatchSlot<'a>> {
            let taken = count
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_WATCHES).then_some(n + 1));
            taken.ok().map(|_| WatchSlot(count))
        }
    }

    impl Drop for WatchSlot<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The head's state directory, on the head's own node: [`HeadWithNode`](crate::local::HeadWithNode)
    /// gives that node the state directory as its one protected directory (which the bypass file
    /// server never reads, so neither is the store's file). Elsewhere, or without one, `None`.
    fn state_dir(cx: &Context) -> Option<PathBuf> {
        if cx.node_name() != HEAD_NODE_NAME {
            return None;
        }
        cx.protected_dirs().first().cloned()
    }

    fn micros_since_epoch() -> u64 {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        u64::try_from(since.as_micros()).unwrap_or(u64::MAX / 2)
    }

    fn load(path: &Path) -> Result<Contents, KvError> {
        let unreadable = |message: String| KvError::Unreadable { path: path.display().to_string(), message };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Contents::default()),
            Err(e) => return Err(unreadable(format!("cannot read it: {e}"))),
        };
        decode_image(&bytes).map_err(unreadable)
    }

    pub fn decode_image(bytes: &[u8]) -> Result<Contents, String> {
        let mut reader = bytes;
        let image: Image =
            rmp_serde::from_read(&mut reader).map_err(|e| format!("it is not a kv store file ({e})"))?;
        if !reader.is_empty() {
            return Err(format!("{} bytes follow the store's image", reader.len()));
        }
        if image.format != FORMAT {
            return Err(format!("it has format {}; this chia reads format {FORMAT}", image.format));
        }
        if crc32fast::hash(&image.contents) != image.crc32 {
            return Err("its checksum does not match: it is damaged".to_string());
        }
        let mut contents: Contents = rmp_serde::from_slice(&image.contents)
            .map_err(|e| format!("its contents do not decode ({e})"))?;
        let newest = contents.entries.values().map(|entry| entry.version).max().unwrap_or(0);
        contents.next_version = contents.next_version.max(newest + 1);
        Ok(contents)
    }

    pub fn encode_image(contents: &Contents) -> Result<Vec<u8>, String> {
        let contents = rmp_serde::to_vec_named(contents).map_err(|e| e.to_string())?;
        let image =
            Image { format: FORMAT, crc32: crc32fast::hash(&contents), contents: Bytes::from(contents) };
        rmp_serde::to_vec_named(&image).map_err(|e| e.to_string())
    }

    fn save(path: &Path, contents: &Contents) -> Result<(), String> {
        let image = encode_image(contents)?;
        write_private(path, image).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::store::{Contents, Entry, WatchSlot, decode_image, encode_image};
    use super::*;

    fn entry(value: &[u8], version: u64) -> Entry {
        Entry { value: Bytes::from(value.to_vec()), version }
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("sweep/parallel").is_ok());
        assert!(check_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        for (key, reason) in [
            (String::new(), "empty"),
            ("k".repeat(MAX_KEY_BYTES + 1), "257 bytes"),
            ("a\nb".to_string(), "control character '\\n' at byte 1"),
        ] {
            let error = check_key(&key).unwrap_err().to_string();
            assert!(error.contains(reason), "{key:?}: {error}");
        }
    }

    #[test]
    fn at_most_so_many_watches_wait_and_each_gives_its_place_back() {
        let count = AtomicUsize::new(0);
        let slots: Vec<_> = (0..MAX_WATCHES).map(|_| WatchSlot::take(&count).unwrap()).collect();
        assert!(WatchSlot::take(&count).is_none());
        drop(slots);
        assert_eq!(count.load(Ordering::Acquire), 0);
        assert!(WatchSlot::take(&count).is_some());
    }

    #[test]
    fn the_image_round_trips_and_damage_is_found() {
        let mut contents = Contents::default();
        contents.entries.insert("a".into(), entry(b"\x04", 3));
        contents.next_version = 4;
        let image = encode_image(&contents).unwrap();
        let back = decode_image(&image).unwrap();
        assert_eq!(back.entries, contents.entries);
        assert_eq!(back.next_version, 4);

        // The last byte is the contents' last.
        let mut flipped = image.clone();
        *flipped.last_mut().unwrap() ^= 0x01;
        assert!(decode_image(&flipped).unwrap_err().contains("checksum"));
        assert!(decode_image(&image[..image.len() - 1]).unwrap_err().contains("not a kv store file"));
        let mut longer = image.clone();
        longer.push(0);
        assert!(decode_image(&longer).unwrap_err().contains("follow"));
        assert!(decode_image(b"hello").is_err());
    }
}

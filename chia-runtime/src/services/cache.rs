//! The result cache as a service: `chia-cache`'s store, named, detached and pinned to the head
//! node, so every driver and worker resolves the same one by name (through the head).
//!
//! Writing is automatic: a function configured `cache: true` (YAML `cache:` section) whose
//! call carries a matching tag has its successful result written when it lands on the head,
//! even if no driver ever asks for it. Reading is explicit: [`Cache::read`] (or a bypass
//! provider). Values are the serialized bytes the runtime already has; the cache never decodes
//! or re-encodes them.
//!
//! ```
//! # extern crate chia_runtime as chia;
//! use chia::cache::{CacheOptions, start_cache};
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let cache_dir = dir.path().join("chia_cache");
//! let cx = chia::init().await?;
//! let cache = start_cache(&cx, CacheOptions::in_dir(cache_dir).size(4.0, "GB")).await?;
//! cache.write("iter0", &vec![1u32, 2, 3]).await?;
//! let hit: Option<Vec<u32>> = cache.read("iter0").await?;
//! assert_eq!(hit, Some(vec![1, 2, 3]));
//! # Ok(()) }
//! ```

use crate::driver::context::Context;
use crate::driver::figures::{Figure, FigureKind, ServiceFigureSource};
use crate::error::Error;
use crate::services::service::{ServiceHandle, ServiceOptions, stop_service};
use chia_cache::{CacheStore, StoreOptions, parse_budget};
use chia_core::TaskError;
use chia_core::protocol::WatchRule;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf as Bytes;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

pub use chia_cache::Durability;
/// What [`Cache::get_config`] returns: the `cache:` section, one [`CacheRule`] per function,
/// tags as [`TagPatterns`] (whole-tag regexes); the store's errors ([`CacheError`]) and the
/// section's ([`SectionError`]).
pub use chia_cache::{
    BadEntry, CacheConfig, CacheError, CacheRule, KeyFrom, SectionError, StoreStats, TagPatterns,
    VerifyReport,
};

/// The name the cache service is registered under (as in the original).
pub const CACHE_SERVICE_NAME: &str = "ChiaCacheStore";

/// The cache instance: the store, the static `cache:` configuration, and what it counts for
/// the metrics.
pub struct CacheService {
    store: CacheStore,
    config: CacheConfig,
    /// Reported with the hosting worker's heartbeats while the instance holds it.
    figures: Arc<CacheFigures>,
}

/// What the cache counts of its use, and its size as of its last change. The size is kept
/// here rather than read from the store when a heartbeat asks: the heartbeat must not hold the
/// store (and its directory lock) alive past a stop, however briefly.
#[derive(Debug, Default)]
struct CacheFigures {
    hits: AtomicU64,
    misses: AtomicU64,
    writes: AtomicU64,
    evictions: AtomicU64,
    entries: AtomicU64,
    bytes: AtomicU64,
    evicted_for_room: AtomicU64,
}

impl CacheFigures {
    /// The store changed (or may have: a read drops a damaged entry): take its size again.
    fn note_store(&self, store: &CacheStore) {
        let stats = store.stats();
        self.entries.store(stats.entries, Ordering::Relaxed);
        self.bytes.store(stats.bytes, Ordering::Relaxed);
        self.evicted_for_room.store(stats.evicted_for_room, Ordering::Relaxed);
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl ServiceFigureSource for CacheFigures {
    fn figures(&self) -> Vec<Figure> {
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        let counter = |name, help, value| Figure { name, help, kind: FigureKind::Counter, value };
        let gauge = |name, help, value| Figure { name, help, kind: FigureKind::Gauge, value };
        vec![
            counter("cache_hits_total", "Cache reads that found their tag.", load(&self.hits)),
            counter("cache_misses_total", "Cache reads that did not find their tag.", load(&self.misses)),
            counter(
                "cache_writes_total",
                "Values stored in the cache (automatic writes included).",
                load(&self.writes),
            ),
            counter(
                "cache_evictions_total",
                "Cache entries removed by evict calls or to make room for a write (LRU).",
                load(&self.evictions) + load(&self.evicted_for_room),
            ),
            gauge("cache_entries", "Entries the cache holds.", load(&self.entries)),
            gauge("cache_bytes", "Bytes of the entries the cache holds (their files).", load(&self.bytes)),
        ]
    }
}

// Concurrent: the store is safe to share and does its file I/O outside its index lock, so a
// large read or write does not hold up small ones.
#[chia::service(name = "chia.Cache", concurrent)]
impl CacheService {
    /// Opens (warm-starts) the store in `dir` on the hosting node and registers the automatic
    /// write of the configured functions' results.
    pub fn new(
        cx: &Context,
        dir: CacheDir,
        budget: u64,
        config: CacheConfig,
        durability: Durability,
    ) -> Result<Self, CacheError> {
        let dir = dir.0;
        let store = CacheStore::open(&dir, budget, StoreOptions::default().with_durability(durability))?;
        tracing::info!(
            "cache in {}: {} entries, {} of {budget} bytes",
            dir.display(),
            store.len(),
            store.size_bytes()
        );
        let rules = watch_rules(&config);
        if !rules.is_empty()
            && let Err(e) = cx.watch_results("write", rules)
        {
            tracing::error!("the cache could not register its automatic writes: {e}");
        }
        let figures = Arc::new(CacheFigures::default());
        figures.note_store(&store);
        cx.report_figures(CACHE_SERVICE_NAME, Arc::downgrade(&figures) as Weak<dyn ServiceFigureSource>);
        Ok(CacheService { store, config, figures })
    }

    /// Stores `value` (serialized bytes) under `tag`; false if it is larger than the budget.
    pub fn write(&self, tag: String, value: Bytes) -> Result<bool, CacheError> {
        let stored = self.store.write(&tag, &value)?;
        if stored {
            CacheFigures::count(&self.figures.writes);
            self.figures.note_store(&self.store);
        }
        Ok(stored)
    }

    /// The value under `tag`, marking it most recently used; `None` on a miss.
    pub fn read(&self, tag: String) -> Option<Bytes> {
        let value = self.store.read(&tag).map(Bytes::from);
        match value {
            Some(_) => CacheFigures::count(&self.figures.hits),
            None => {
                CacheFigures::count(&self.figures.misses);
                // A miss may have dropped a damaged entry.
                self.figures.note_store(&self.store);
            }
        }
        value
    }

    /// Whether `tag` is stored; does not change its recency or read its file.
    pub fn has(&self, tag: String) -> bool {
        self.store.has(&tag)
    }

    /// Removes the entry under `tag` (its file too); false if there was none.
    pub fn evict(&self, tag: String) -> bool {
        let evicted = self.store.evict(&tag);
        if evicted {
            CacheFigures::count(&self.figures.evictions);
            self.figures.note_store(&self.store);
        }
        evicted
    }

    /// Removes every entry; the directory and the budget stay.
    pub fn flush(&self) {
        self.store.flush();
        self.figures.note_store(&self.store);
    }

    /// Tags in LRU order, oldest first.
    pub fn keys(&self) -> Vec<String> {
        self.store.keys()
    }

    /// The bytes the entries take (their files' lengths), at most the budget.
    pub fn size_bytes(&self) -> u64 {
        self.store.size_bytes()
    }

    /// The `cache:` configuration the cache was started with.
    pub fn get_config(&self) -> CacheConfig {
        self.config.clone()
    }

    /// What the cache holds and has done since it opened.
    pub fn stats(&self) -> StoreStats {
        self.store.stats()
    }

    /// Removes every entry whose whole tag one of `patterns` matches; the tags removed, in LRU
    /// order.
    pub fn evict_matching(&self, patterns: Vec<String>) -> Result<Vec<String>, TaskError> {
        let patterns = TagPatterns::new(patterns).map_err(|e| TaskError::InvalidCall {
            function: "chia.Cache.evict_matching".into(),
            message: e.to_string(),
        })?;
        let evicted = self.store.evict_matching(&patterns);
        self.figures.evictions.fetch_add(evicted.len() as u64, Ordering::Relaxed);
        self.figures.note_store(&self.store);
        Ok(evicted)
    }

    /// Re-reads every entry and checks its checksums; removes the bad ones unless `dry_run`.
    pub fn verify(&self, dry_run: bool) -> VerifyReport {
        let report = self.store.verify(dry_run);
        self.figures.note_store(&self.store);
        report
    }

    /// The directory and budget the cache was opened with, which a second [`start_cache`]
    /// compares with its own.
    pub fn settings(&self) -> CacheSettings {
        CacheSettings { dir: self.store.dir().to_path_buf(), budget: self.store.budget() }
    }
}

/// Where a running cache keeps its entries (on the head node) and how many bytes it may hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSettings {
    /// The directory as the starting caller named it, a path on the head node.
    #[serde(with = "path_bytes")]
    pub dir: PathBuf,
    /// The byte budget the entries must fit in (least recently used ones go to make room).
    pub budget: u64,
}

/// The cache's directory as it travels to the head: exactly the path the caller named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CacheDir(#[serde(with = "path_bytes")] pub PathBuf);

/// A path on the wire as its bytes: a Unix path is bytes, not text, so a name that is not UTF-8
/// must neither fail to encode (serde's own `PathBuf` refuses it) nor be replaced by its lossy
/// spelling — the cache would open another directory, and `start_cache` would find the running
/// cache's directory different from the very path it asked for. Text is read too (a path
/// encoded as a string by an older caller, or kept in the head's services file).
mod path_bytes {
    use serde::de::{Deserializer, Error, Visitor};
    use serde::ser::Serializer;
    use std::path::{Path, PathBuf};

    pub fn serialize<S: Serializer>(path: &Path, serializer: S) -> Result<S::Ok, S::Error> {
        #[cfg(unix)]
        {
            serializer.serialize_bytes(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        }
        #[cfg(not(unix))]
        {
            match path.to_str() {
                Some(text) => serializer.serialize_str(text),
                None => Err(serde::ser::Error::custom(format!("{} is not valid Unicode", path.display()))),
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
        struct PathVisitor;

        impl Visitor<'_> for PathVisitor {
            type Value = PathBuf;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a path, as bytes or text")
            }

            fn visit_str<E: Error>(self, text: &str) -> Result<PathBuf, E> {
                Ok(PathBuf::from(text))
            }

            fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<PathBuf, E> {
                #[cfg(unix)]
                {
                    Ok(PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(bytes)))
                }
                #[cfg(not(unix))]
                {
                    std::str::from_utf8(bytes).map(PathBuf::from).map_err(E::custom)
                }
            }
        }

        deserializer.deserialize_any(PathVisitor)
    }
}

fn watch_rules(config: &CacheConfig) -> Vec<WatchRule> {
    config
        .functions()
        .map(|(function, rule)| WatchRule {
            function: function.to_string(),
            tags: rule.tags.as_ref().map(|patterns| patterns.patterns().to_vec()),
        })
        .collect()
}

/// A handle on the running cache, with typed reads and writes.
///
/// Like every service handle it is a value: pass it to a remote function (a parameter of type
/// `chia::cache::Cache`) and use it there, instead of looking the cache up in every task.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cache {
    service: CacheServiceHandle,
}

fn cache_error(error: CacheError) -> Error {
    Error::Cache(Arc::new(error))
}

/// How to start the cache: the original's `start_cache(size, cache_dir_path, units, yaml_path,
/// namespace)`, as a builder.
///
/// ```
/// # extern crate chia_runtime as chia;
/// use chia::cache::{CacheOptions, Durability};
/// let options = CacheOptions::in_dir("/data/chia_cache") // `cache_dir_path`, on the head node
///     .size(4.0, "GB")                                   // `size`, `units`: 4 GiB
///     .yaml_path("loop.yaml")                            // the `cache:` section, read by the caller
///     .namespace("co-design")
///     .durability(Durability::Data);
/// ```
#[derive(Clone, Debug)]
pub struct CacheOptions {
    dir: PathBuf,
    size: f64,
    units: String,
    yaml_path: Option<PathBuf>,
    namespace: Option<String>,
    durability: Durability,
}

impl CacheOptions {
    /// The budget when none is given: 10 GiB (sccache's default).
    pub const DEFAULT_SIZE_GIB: f64 = 10.0;

    /// A cache in `cache_dir_path` on the head node, with a budget of
    /// [`DEFAULT_SIZE_GIB`](Self::DEFAULT_SIZE_GIB), no `cache:` section (nothing is written
    /// automatically), the default namespace, and every write fsynced with its directory
    /// ([`Durability::Full`]).
    pub fn in_dir(cache_dir_path: impl Into<PathBuf>) -> CacheOptions {
        CacheOptions {
            dir: cache_dir_path.into(),
            size: Self::DEFAULT_SIZE_GIB,
            units: "GiB".to_string(),
            yaml_path: None,
            namespace: None,
            durability: Durability::default(),
        }
    }

    /// The budget: `size` × `units` (B, KB, MB, GB, TB or KiB…TiB, all powers of 1024, in any
    /// case). Checked when the cache starts; a bad one is [`Error::Cache`] naming it.
    pub fn size(mut self, size: f64, units: &str) -> Self {
        self.size = size;
        self.units = units.to_string();
        self
    }

    /// The YAML file whose `cache:` section says which functions' results are written
    /// automatically (read here, on the caller, when the cache starts).
    pub fn yaml_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.yaml_path = Some(path.into());
        self
    }

    /// The namespace of the cache's name (default: the default namespace).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The fsync policy: `Full` (file and directory, a finished write survives power loss),
    /// `Data` (file only) or `None` (a crash of the machine may lose recent entries; a process
    /// crash loses nothing). No policy ever exposes a partial entry.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }
}

/// Starts the cache on the head node as `options` say, or returns the running one
/// (idempotent).
///
/// A cache already running in another directory or with another budget is
/// [`Error::CacheConflict`], naming both: returning it would send this caller's writes to a
/// directory and budget it did not ask for (the original did so silently).
pub async fn start_cache(cx: &Context, options: CacheOptions) -> Result<Cache, Error> {
    let CacheOptions { dir: requested_dir, size, units, yaml_path, namespace, durability } = options;
    let budget = parse_budget(size, &units).map_err(cache_error)?;
    let config = match &yaml_path {
        Some(path) => CacheConfig::from_file(path).map_err(|e| Error::Config(Arc::new(e)))?,
        None => CacheConfig::default(),
    };
    if let (Some(path), Some((function, field))) = (&yaml_path, not_applied_yet(&config)) {
        return Err(Error::CacheRuleNotApplied { path: path.clone(), function, field });
    }
    let mut service_options = ServiceOptions::named(CACHE_SERVICE_NAME).detached().get_if_exists().on_head();
    if let Some(namespace) = namespace {
        service_options = service_options.namespace(namespace);
    }
    let dir = CacheDir(requested_dir.clone());
    let service =
        CacheServiceHandle::start(cx, service_options, dir, budget, config.clone(), durability).await?;
    // `get_if_exists` may have found a cache started by anyone, with anything: compare. Paths
    // compare as `Path`s, by components of bytes (`/data/cache/` is `/data/cache`; a name that
    // is not UTF-8 equals only itself), not through the file system, which is the head's and
    // may not be this machine's.
    let running = service.settings().get().await?;
    if running.dir != requested_dir || running.budget != budget {
        return Err(Error::CacheConflict {
            running_dir: running.dir,
            running_budget: running.budget,
            requested_dir,
            requested_budget: budget,
        });
    }
    // A YAML given must be the one the running cache follows: its rules would otherwise be
    // silently ignored. Without one, the running cache is taken as it is.
    if let Some(path) = yaml_path
        && service.get_config().get().await? != config
    {
        return Err(Error::CacheConfigConflict { path });
    }
    Ok(Cache { service })
}

/// The first setting of `config` that the `cache:` section reads but the automatic writes do
/// not apply yet (`ttl:`, `key: inputs`, `single_flight:`), by function name: refused at start
/// rather than silently ignored.
fn not_applied_yet(config: &CacheConfig) -> Option<(String, &'static str)> {
    config.functions().find_map(|(function, rule)| {
        let field = if rule.ttl.is_some() {
            "ttl"
        } else if rule.key != chia_cache::KeyFrom::Tag {
            "key"
        } else if rule.single_flight {
            "single_flight"
        } else {
            return None;
        };
        Some((function.to_string(), field))
    })
}

/// The running cache, looked up by name through the head every time; `None` if there is none.
pub async fn get_active_cache(cx: &Context, namespace: Option<&str>) -> Result<Option<Cache>, Error> {
    Ok(CacheServiceHandle::lookup(cx, CACHE_SERVICE_NAME, namespace).await?.map(|service| Cache { service }))
}

/// Stops the cache (its files stay for the next start). Returns whether one was running.
pub async fn stop_cache(cx: &Context, namespace: Option<&str>) -> Result<bool, Error> {
    stop_service(cx, CACHE_SERVICE_NAME, namespace).await
}

/// Whether `function`'s result is cached for a call tagged `tag`, by the running cache's
/// configuration (false when no cache runs).
pub async fn is_cached(cx: &Context, function: &str, tag: Option<&str>) -> Result<bool, Error> {
    match get_active_cache(cx, None).await? {
        Some(cache) => Ok(cache.get_config().await?.is_cached(function, tag)),
        None => Ok(false),
    }
}

impl Cache {
    /// Stores `value` under `tag`. False when it is larger than the whole budget.
    pub async fn write<T: Serialize>(&self, tag: &str, value: &T) -> Result<bool, Error> {
        let bytes = rmp_serde::to_vec_named(value).map_err(|e| {
            Error::Task(TaskError::InvalidCall {
                function: "chia.Cache.write".into(),
                message: e.to_string(),
            })
        })?;
        self.service.write(tag.to_string(), Bytes::from(bytes)).get().await
    }

    /// The value under `tag` (one round trip, no has/read race); `None` on a miss.
    pub async fn read<T: DeserializeOwned>(&self, tag: &str) -> Result<Option<T>, Error> {
        let Some(bytes) = self.service.read(tag.to_string()).get().await? else { return Ok(None) };
        rmp_serde::from_slice(&bytes).map(Some).map_err(|e| Error::Decode {
            task: chia_core::TaskId(0),
            type_name: std::any::type_name::<T>(),
            message: format!("cache entry {tag:?}: {e}"),
        })
    }

    /// The stored bytes under `tag`, as the runtime serialized them.
    pub async fn read_bytes(&self, tag: &str) -> Result<Option<Bytes>, Error> {
        self.service.read(tag.to_string()).get().await
    }

    /// Whether `tag` is stored (does not change its recency).
    pub async fn has(&self, tag: &str) -> Result<bool, Error> {
        self.service.has(tag.to_string()).get().await
    }

    /// Removes the entry under `tag`; `Ok(false)` if there was none.
    pub async fn evict(&self, tag: &str) -> Result<bool, Error> {
        self.service.evict(tag.to_string()).get().await
    }

    /// Removes every entry.
    pub async fn flush(&self) -> Result<(), Error> {
        self.service.flush().get().await
    }

    /// Tags in LRU order, oldest first.
    pub async fn keys(&self) -> Result<Vec<String>, Error> {
        self.service.keys().get().await
    }

    /// Hits, misses, writes, evictions, entries and bytes since the cache opened (the budget:
    /// [`Cache::budget`]).
    pub async fn stats(&self) -> Result<StoreStats, Error> {
        self.service.stats().get().await
    }

    /// The most bytes the entries may take.
    pub async fn budget(&self) -> Result<u64, Error> {
        Ok(self.service.settings().get().await?.budget)
    }

    /// Removes every entry whose whole tag `pattern` (a regex) matches, as `tags:` patterns
    /// match; the tags removed. An invalid pattern is an `InvalidCall` naming it.
    pub async fn evict_matching(&self, pattern: &str) -> Result<Vec<String>, Error> {
        self.service.evict_matching(vec![pattern.to_string()]).get().await
    }

    /// Re-reads every entry and checks its checksums, removing the bad ones (with `dry_run`,
    /// only reporting them).
    pub async fn verify(&self, dry_run: bool) -> Result<VerifyReport, Error> {
        self.service.verify(dry_run).get().await
    }

    /// The bytes the entries take on the head node (their files' lengths), at most the budget.
    pub async fn size_bytes(&self) -> Result<u64, Error> {
        self.service.size_bytes().get().await
    }

    /// The `cache:` configuration the cache was started with.
    pub async fn get_config(&self) -> Result<CacheConfig, Error> {
        self.service.get_config().get().await
    }

    /// The underlying service handle.
    pub fn service(&self) -> &ServiceHandle {
        self.service.service()
    }

    /// The typed service handle, whose methods return `ObjectRef`s (to pipeline many calls).
    pub fn handle(&self) -> &CacheServiceHandle {
        &self.service
    }
}

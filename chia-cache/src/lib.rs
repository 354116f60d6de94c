//! `chia-cache` owns the storage engine and the configuration of chia's result cache, with no
//! network and no dependency on the runtime:
//!
//! - [`CacheStore`]: an LRU, byte-budgeted, on-disk key/value store of opaque serialized values
//!   (bytes in, bytes out; values are never decoded), one checksummed file per tag, with
//!   crash-consistent writes (group-committed under [`Durability::Full`]), expiry, statistics,
//!   verification, and a warm start from the files a previous run left (and the index
//!   snapshot it saved).
//! - [`CacheConfig`]: the `cache:` section of the bypass/cache YAML, which says which
//!   functions' outputs are written to the cache, for which call tags, under what key
//!   ([`KeyFrom`]), for how long and with or without single flight ([`CacheRule`]).
//! - [`parse_budget`]: a budget given as a number and units (`4`, `"GB"`) in bytes;
//!   [`units::parse_duration`]: a duration such as `7d`.
//!
//! Serving the store as a named, head-pinned service is a layer above this crate.
//!
//! ```
//! use chia_cache::{CacheStore, StoreOptions, parse_budget};
//!
//! # fn main() -> Result<(), chia_cache::CacheError> {
//! let dir = tempfile::tempdir().expect("temporary directory");
//! let store = CacheStore::open(dir.path(), parse_budget(64.0, "MiB")?, StoreOptions::default())?;
//!
//! assert!(store.write("iter0", b"serialized output")?);
//! assert_eq!(store.read("iter0").as_deref(), Some(&b"serialized output"[..]));
//! assert_eq!(store.read("iter1"), None);
//! drop(store);
//!
//! // A later run finds the entry again.
//! let store = CacheStore::open(dir.path(), parse_budget(64.0, "MiB")?, StoreOptions::default())?;
//! assert!(store.has("iter0"));
//! # Ok(())
//! # }
//! ```

pub mod config;
mod error;
mod store;
pub mod units;

pub use config::section::SectionError;
pub use config::{CacheConfig, CacheRule, InvalidPattern, KeyFrom, TagPatterns};
pub use error::CacheError;
pub use store::{
    BadEntry, CacheStore, Clock, Durability, ENTRY_EXTENSION, EntryInfo, MAX_TAG_LEN, ManualClock,
    OpenReport, StoreOptions, StoreStats, VerifyReport, WriteOptions, entry_file_name,
};
pub use units::parse_budget;

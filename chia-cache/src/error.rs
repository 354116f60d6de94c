//! The one error type of the crate. Every variant names the thing that is wrong (the file, the
//! function, the pattern, the tag) so a message is actionable without a backtrace.

use std::io;
use std::path::PathBuf;

/// Why a budget or a store operation failed (the `cache:` section's errors are
/// [`SectionError`](crate::SectionError)s).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The budget's size is negative, NaN or infinite.
    #[error("invalid cache size {size}: it must be a finite number >= 0")]
    InvalidSize {
        /// The size as given.
        size: f64,
    },

    /// The budget's units are not one of [`crate::units::UNIT_NAMES`].
    #[error("unknown units {units:?}; choose from {choices:?}")]
    UnknownUnits {
        /// The units as given.
        units: String,
        /// The units that are understood, sorted.
        choices: Vec<&'static str>,
    },

    /// A duration is not a number of seconds, or a number and one of `s`, `m`, `h`, `d`.
    #[error(
        "invalid duration {text:?}: write a number of seconds, or a number and s, m, h or d (30s, 15m, 12h, 7d)"
    )]
    InvalidDuration {
        /// The duration as given.
        text: String,
    },

    /// `size × units` does not fit in 64 bits.
    #[error("cache size {size} {units} is more than {max} bytes", max = u64::MAX)]
    SizeOverflow {
        /// The size as given.
        size: f64,
        /// The units as given.
        units: String,
    },

    /// The cache directory cannot be created, locked or listed.
    #[error("cannot open cache directory {dir}: {source}")]
    OpenDirectory {
        /// The cache directory.
        dir: PathBuf,
        /// Why the file system refused.
        source: io::Error,
    },

    /// Another [`crate::CacheStore`] (in this or another process) holds the directory.
    #[error("cache directory {dir} is already open by another cache store")]
    DirectoryLocked {
        /// The cache directory.
        dir: PathBuf,
    },

    /// The tag is longer than [`crate::MAX_TAG_LEN`] bytes.
    #[error("cache tag of {len} bytes is longer than the {max}-byte limit")]
    TagTooLong {
        /// The tag's length in bytes.
        len: usize,
        /// The longest tag allowed, in bytes.
        max: usize,
    },

    /// Writing an entry failed (disk full, I/O error). Nothing partial is left behind and the
    /// store's previous contents are unchanged.
    #[error("cannot write cache entry {tag:?} to {path}: {source}")]
    Write {
        /// The entry's tag.
        tag: String,
        /// The file that was being written.
        path: PathBuf,
        /// Why the write failed.
        source: io::Error,
    },

    /// The index snapshot cannot be saved ([`crate::CacheStore::save_index`]). The store
    /// works on; the next open reads more headers.
    #[error("cannot save the cache index snapshot {path}: {source}")]
    SaveIndex {
        /// The snapshot file.
        path: PathBuf,
        /// Why the file system refused.
        source: io::Error,
    },

    /// Closing the store could not make its entries durable and retire its journal
    /// ([`crate::CacheStore::close`]). Nothing is lost: the next open replays the journal.
    #[error("cannot sync the cache directory {dir} at close: {source}")]
    Close {
        /// The cache directory.
        dir: PathBuf,
        /// Why the file system refused.
        source: io::Error,
    },
}

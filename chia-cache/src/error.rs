//! The one error type of the crate. Every variant names the thing that is wrong (the file, the
//! function, the pattern, the tag) so a message is actionable without a backtrace.

use std::io;
use std::path::PathBuf;

use crate::config::section::{at_line, unknown_field_hint};

/// Why a budget, a configuration or a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The budget's size is negative, NaN or infinite.
    #[error("invalid cache size {size}: it must be a finite number >= 0")]
    InvalidSize { size: f64 },

    /// The budget's units are not one of [`crate::units::UNIT_NAMES`].
    #[error("unknown units {units:?}; choose from {choices:?}")]
    UnknownUnits { units: String, choices: Vec<&'static str> },

    /// `size × units` does not fit in 64 bits.
    #[error("cache size {size} {units} is more than {max} bytes", max = u64::MAX)]
    SizeOverflow { size: f64, units: String },

    /// The configuration file could not be read.
    #[error("cannot read cache config {path}: {source}")]
    ConfigRead { path: PathBuf, source: io::Error },

    /// The configuration is not YAML, or its top level is not a mapping. `message` (the YAML
    /// parser's) shows the line and column with a snippet; `line` repeats the line for code.
    #[error("cache config {origin} cannot be parsed: {message}")]
    ConfigParse { origin: String, line: Option<u64>, message: String },

    /// The `cache:` section parses but a value has a type the section does not allow.
    #[error("cache config {origin}: {}{message}", function_prefix(function.as_deref()))]
    ConfigShape { origin: String, function: Option<String>, message: String },

    /// A `tags:` pattern is not a valid regular expression (Rust `regex` syntax).
    #[error("cache config {origin}: function {function:?} has an invalid tag pattern {pattern:?}: {source}")]
    InvalidTagPattern { origin: String, function: String, pattern: String, source: regex::Error },

    /// A function's settings hold a field the `cache:` section does not know (a typo, most
    /// likely); `suggestion` is the closest known field, if one is near.
    #[error(
        "cache config {origin}{}: function {function:?}: unknown field `{field}:`{}",
        at_line(*line),
        unknown_field_hint(*suggestion, known)
    )]
    UnknownField {
        origin: String,
        line: Option<u64>,
        function: String,
        field: String,
        suggestion: Option<&'static str>,
        known: &'static [&'static str],
    },

    /// The cache directory cannot be created, locked or listed.
    #[error("cannot open cache directory {dir}: {source}")]
    OpenDirectory { dir: PathBuf, source: io::Error },

    /// Another [`crate::CacheStore`] (in this or another process) holds the directory.
    #[error("cache directory {dir} is already open by another cache store")]
    DirectoryLocked { dir: PathBuf },

    /// The tag is longer than [`crate::MAX_TAG_LEN`] bytes.
    #[error("cache tag of {len} bytes is longer than the {max}-byte limit")]
    TagTooLong { len: usize, max: usize },

    /// Writing an entry failed (disk full, I/O error). Nothing partial is left behind and the
    /// store's previous contents are unchanged.
    #[error("cannot write cache entry {tag:?} to {path}: {source}")]
    Write { tag: String, path: PathBuf, source: io::Error },
}

fn function_prefix(function: Option<&str>) -> String {
    function.map(|function| format!("function {function:?}: ")).unwrap_or_default()
}

//! The one error type of the crate. Every variant names the thing that is wrong (the file, the
//! function, the pattern) so a message is actionable without a backtrace.
//!
//! Not `chia_cache::CacheError`: its messages say "cache config", which would point the user at
//! the wrong section of the file.

use std::io;
use std::path::PathBuf;

use chia_cache::config::section::{at_line, unknown_field_hint};

/// Why a bypass configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BypassError {
    /// The configuration file could not be read.
    #[error("cannot read bypass config {path}: {source}")]
    ConfigRead { path: PathBuf, source: io::Error },

    /// The configuration is not YAML, or its top level is not a mapping. `message` (the YAML
    /// parser's) shows the line and column with a snippet; `line` repeats the line for code.
    #[error("bypass config {origin} cannot be parsed: {message}")]
    ConfigParse { origin: String, line: Option<u64>, message: String },

    /// The `bypass:` section parses but a value has a type the section does not allow.
    #[error("bypass config {origin}: {}{message}", function_prefix(function.as_deref()))]
    ConfigShape { origin: String, function: Option<String>, message: String },

    /// A `tags:` pattern is not a valid regular expression (Rust `regex` syntax).
    #[error("bypass config {origin}: function {function:?} has an invalid tag pattern {pattern:?}: {source}")]
    InvalidTagPattern { origin: String, function: String, pattern: String, source: regex::Error },

    /// A function's settings hold a field the `bypass:` section does not know (a typo, most
    /// likely); `suggestion` is the closest known field, if one is near.
    #[error(
        "bypass config {origin}{}: function {function:?}: unknown field `{field}:`{}",
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
}

fn function_prefix(function: Option<&str>) -> String {
    function.map(|function| format!("function {function:?}: ")).unwrap_or_default()
}

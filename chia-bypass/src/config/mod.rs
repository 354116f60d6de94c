//! The `bypass:` section of the bypass/cache YAML: which functions are bypassed, for which call
//! tags, and which recorded file is served in their place.
//!
//! ```yaml
//! bypass:
//!   simple_add:                  # bypass every call
//!     bypass: true
//!   run_verilator_test:
//!     bypass: true
//!     tags: ["iter0_.*"]         # optional: only calls whose whole tag matches one pattern
//!   simple_multiply: true        # shorthand: bypass every call
//!   summarize_perf:
//!     bypass: true
//!     data: /path/to/recorded_perf.md   # served as the result (a string)
//! cache:                         # other sections of the same file are not read here
//!   simple_add: true
//! ```
//!
//! Reading rules, the same as the `cache:` section's (`chia_cache::CacheConfig`):
//! - `fn: true` bypasses every call; `fn: {bypass: true, tags: ...}` bypasses the calls whose
//!   tag matches; `tags:` is one pattern or a list of them; `tags: []` bypasses nothing.
//! - `fn: false`, `fn: {bypass: false}` or a mapping without `bypass:` leaves the function out,
//!   and the values of its other settings are not checked.
//! - Stricter than the original: a function's settings may hold only `bypass:`, `tags:` and
//!   `data:`; any other field (`tag:`, `bypas:`) is an error naming the file, its line and the
//!   closest known field, even in a function that is off (a misspelt `bypass:` is what turns
//!   it off). Other top-level sections are not read, but one within two edits of `bypass`
//!   (`bypas:`) is warned about.
//! - A spec of another type (a string, a number, a list) is ignored with a warning.
//! - A pattern must match the *whole* tag (Python's `re.fullmatch`), in Rust `regex` syntax; an
//!   invalid pattern is an error at load naming the file, the function and the pattern.
//! - The inner `bypass:` must be a boolean (YAML 1.1 spellings such as `yes`/`no` included, as
//!   PyYAML read them), each tag pattern a string, and `data:` a non-empty string; anything else
//!   is an error naming the function. A relative `data:` path read by
//!   [`BypassConfig::from_file`] is relative to the YAML file's directory; one read from a
//!   string is kept as written. The file is read on the head node, so the path names a file there.
//! - A `bypass:` section that is empty (null) is an empty configuration; one that is not a
//!   mapping is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use chia_cache::TagPatterns;
use serde::{Deserialize, Serialize};

// One YAML reading for the file both sections live in (PyYAML-style booleans included).
use chia_cache::config::section::{self, Section, SectionError};
use chia_cache::config::yaml_value::YamlValue;

/// Which functions are bypassed, for which tags, and with which recorded data. The default is
/// the configuration of a run without YAML: nothing is bypassed.
///
/// Serializes as a map from function name to [`BypassRule`], with patterns as their source
/// strings (compiled again on deserialize), so the runtime can ship it to workers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BypassConfig {
    functions: BTreeMap<String, BypassRule>,
}

/// How one bypassed function is bypassed. Only functions with `bypass: true` have a rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BypassRule {
    /// `None`: every call, tagged or not. Otherwise only calls with a tag that one of the
    /// patterns matches in full.
    pub tags: Option<TagPatterns>,
    /// The recorded file served as the result when no provider is registered.
    pub data: Option<PathBuf>,
}

impl BypassConfig {
    /// An empty configuration: nothing is bypassed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the `bypass:` section of a YAML document. `origin` names the document in errors
    /// and logs: its path, or what the caller calls text that never was a file.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Self, SectionError> {
        let problem = |problem: section::Problem| problem.in_section(Section::Bypass, origin);
        let Some(section) = section::read_section(text, Section::Bypass, origin).map_err(problem)? else {
            return Ok(Self::new());
        };
        let mut config = BypassConfig::new();
        for (function, settings) in
            section::enabled_functions(&section, Section::Bypass, origin).map_err(problem)?
        {
            let setting = |key| settings.and_then(|s| s.get(key));
            let rule = BypassRule {
                tags: section::tag_patterns(function, setting("tags")).map_err(problem)?,
                data: parse_data(function, setting("data")).map_err(problem)?,
            };
            tracing::info!(
                origin,
                function,
                tags = ?rule.tags.as_ref().map(TagPatterns::patterns),
                data = ?rule.data,
                "bypass: configured"
            );
            config.insert(function, rule);
        }
        Ok(config)
    }

    /// Reads the `bypass:` section of the YAML file at `path`.
    /// A relative `data:` path is taken relative to the file's directory, so a configuration
    /// and its recorded data can move together.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SectionError> {
        let path = path.as_ref();
        let text =
            fs::read_to_string(path).map_err(|source| SectionError::read(Section::Bypass, path, source))?;
        let mut config = Self::from_yaml_str(&text, &path.display().to_string())?;
        // Absolute, so the head (which serves the files) does not read them relative to its own
        // working directory.
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let directory = absolute.parent().unwrap_or(Path::new(""));
        for rule in config.functions.values_mut() {
            if let Some(data) = rule.data.as_mut().filter(|data| data.is_relative()) {
                *data = directory.join(&*data);
            }
        }
        Ok(config)
    }

    /// Does the configuration bypass `function` on a call tagged `tag`? The configuration's part
    /// of the bypass decision: the function is `bypass: true`, and if it has `tags:`, the call
    /// has a tag that one of them matches. Whether a provider or `data:` exists, and the
    /// registered condition, are checked by the runtime.
    pub fn matches(&self, function: &str, tag: Option<&str>) -> bool {
        self.functions.get(function).is_some_and(|rule| rule.admits(tag))
    }

    /// The rule for `function`, if it is bypassed at all.
    pub fn rule(&self, function: &str) -> Option<&BypassRule> {
        self.functions.get(function)
    }

    /// Sets the rule for `function`, returning the one it replaces.
    pub fn insert(&mut self, function: impl Into<String>, rule: BypassRule) -> Option<BypassRule> {
        self.functions.insert(function.into(), rule)
    }

    /// Bypassed functions and their rules, by name.
    pub fn functions(&self) -> impl Iterator<Item = (&str, &BypassRule)> {
        self.functions.iter().map(|(name, rule)| (name.as_str(), rule))
    }

    /// Every `data:` path of a bypassed function, once each: the only files the file server
    /// may serve, so a worker cannot ask the head for anything else.
    pub fn data_paths(&self) -> BTreeSet<&Path> {
        self.functions.values().filter_map(|rule| rule.data.as_deref()).collect()
    }

    /// How many functions are bypassed.
    pub fn len(&self) -> usize {
        self.functions.len()
    }

    /// Whether no function is bypassed (no `bypass:` section, or an empty one).
    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }
}

impl BypassRule {
    /// Whether a call tagged `tag` is bypassed under this rule.
    pub fn admits(&self, tag: Option<&str>) -> bool {
        match (&self.tags, tag) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(patterns), Some(tag)) => patterns.matches(tag),
        }
    }
}

/// `data:` as a path; absent or null means none. An empty string is rejected rather than read
/// as the current directory, which cannot be served.
fn parse_data(function: &str, data: Option<&YamlValue>) -> Result<Option<PathBuf>, section::Problem> {
    match data {
        None | Some(YamlValue::Null) => Ok(None),
        Some(YamlValue::String(path)) if !path.is_empty() => Ok(Some(PathBuf::from(path))),
        Some(other) => Err(section::Problem::Shape {
            function: Some(function.to_owned()),
            message: format!("`data:` must be the path of a file, not {}", other.describe()),
        }),
    }
}

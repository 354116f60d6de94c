//! The `cache:` section of the bypass/cache YAML: which functions' outputs are cached, for
//! which call tags, under what key, for how long.
//!
//! ```yaml
//! cache:
//!   run_verilator_test:
//!     cache: true
//!     tags: ["iter.*"]      # optional: only calls whose whole tag matches one pattern
//!     ttl: 7d               # optional: entries expire 7 days after their write
//!   summarize:
//!     cache: true
//!     key: inputs           # optional: keyed by the call's inputs, not its tag
//!     single_flight: true   # optional: concurrent identical calls run once
//!   build_megaboom: true    # shorthand: cache every call, keyed by its tag, until evicted
//! bypass:                   # other sections of the same file are not read here
//!   simple_add: true
//! ```
//!
//! Reading rules, those of the original `_load_cache_config` unless noted:
//! - `fn: true` caches every call; `fn: {cache: true, tags: ...}` caches the calls whose tag
//!   matches; `tags:` is one pattern or a list of them; `tags: []` caches nothing.
//! - `fn: false`, `fn: {cache: false}` or a mapping without `cache:` leaves the function out.
//! - New here, all optional (see [`CacheRule`]): `ttl:` is a number of seconds or a number and
//!   one of `s`, `m`, `h`, `d` (`90`, `30s`, `1.5h`, `7d`), more than zero; `key:` is `tag` (the
//!   default) or `inputs`; `single_flight:` is a boolean (default false). A value of another
//!   shape is an error naming the function.
//! - Stricter than the original: a function's settings may hold only `cache:`, `tags:`,
//!   `ttl:`, `key:` and `single_flight:`; any other field (`tag:`, `cahce:`) is an error
//!   naming the file, its line and the closest known field, even in a function that is off (a
//!   misspelt `cache:` is what turns it off). Other top-level sections are not read, but one
//!   within two edits of `cache` (`cahce:`) is warned about.
//! - A spec of another type (a string, a number, a list) is ignored, as in the original, with
//!   a warning.
//! - A pattern must match the *whole* tag (Python's `re.fullmatch`). Patterns use Rust `regex`
//!   syntax, which is Python's minus look-around and backreferences; an invalid pattern is an
//!   error at load naming the file, the function and the pattern (the original failed only
//!   when a call was checked).
//! - Stricter than the original, which took Python truthiness: the inner `cache:` must be a
//!   boolean (YAML 1.1 spellings such as `yes`/`no` included, as PyYAML read them), and each tag
//!   pattern a string; anything else is an error naming the function rather than a silent
//!   guess. A `cache:` section that is empty (null) is an empty configuration (the original
//!   crashed); one that is not a mapping is an error.

mod rule;
pub mod section;
pub mod yaml_value;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use chia_core::tags::{InvalidPattern, TagPatterns};
pub use rule::{CacheRule, KeyFrom};
use section::{Section, SectionError};

/// Which functions are cached, and how. Serializes as a map from function name to
/// [`CacheRule`], with patterns as their source strings (compiled again on deserialize), so it
/// can be shipped to other processes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CacheConfig {
    functions: BTreeMap<String, CacheRule>,
}

impl CacheConfig {
    /// An empty configuration: nothing is cached.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the `cache:` section of a YAML document. `origin` names the document in errors
    /// and logs: its path, or what the caller calls text that never was a file.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Self, SectionError> {
        let problem = |problem: section::Problem| problem.in_section(Section::Cache, origin);
        let Some(section) = section::read_section(text, Section::Cache, origin).map_err(problem)? else {
            return Ok(Self::new());
        };
        let mut config = CacheConfig::new();
        for (function, settings) in
            section::enabled_functions(&section, Section::Cache, origin).map_err(problem)?
        {
            let setting = |key| settings.and_then(|s| s.get(key));
            let rule = CacheRule {
                tags: section::tag_patterns(function, setting("tags")).map_err(problem)?,
                ttl: rule::ttl(function, setting("ttl")).map_err(problem)?,
                key: rule::key(function, setting("key")).map_err(problem)?,
                single_flight: rule::single_flight(function, setting("single_flight")).map_err(problem)?,
            };
            tracing::info!(
                origin,
                function,
                tags = ?rule.tags.as_ref().map(TagPatterns::patterns),
                ttl = ?rule.ttl,
                key = rule.key.name(),
                single_flight = rule.single_flight,
                "cache: configured"
            );
            config.insert(function, rule);
        }
        Ok(config)
    }

    /// Reads the `cache:` section of the YAML file at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SectionError> {
        let path = path.as_ref();
        let text =
            fs::read_to_string(path).map_err(|source| SectionError::read(Section::Cache, path, source))?;
        Self::from_yaml_str(&text, &path.display().to_string())
    }

    /// Should `function`'s output be cached on a call tagged `tag`? False for a function that is
    /// not configured, and for an untagged call to a function configured with `tags:` and
    /// keyed by its tag (see [`CacheRule::admits`]).
    pub fn is_cached(&self, function: &str, tag: Option<&str>) -> bool {
        self.functions.get(function).is_some_and(|rule| rule.admits(tag))
    }

    /// The rule for `function`, if it is cached at all.
    pub fn rule(&self, function: &str) -> Option<&CacheRule> {
        self.functions.get(function)
    }

    /// Sets the rule for `function`, returning the one it replaces.
    pub fn insert(&mut self, function: impl Into<String>, rule: CacheRule) -> Option<CacheRule> {
        self.functions.insert(function.into(), rule)
    }

    /// Configured functions and their rules, by name.
    pub fn functions(&self) -> impl Iterator<Item = (&str, &CacheRule)> {
        self.functions.iter().map(|(name, rule)| (name.as_str(), rule))
    }

    /// How many functions are cached.
    pub fn len(&self) -> usize {
        self.functions.len()
    }

    /// Whether no function is cached (no `cache:` section, or an empty one).
    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }
}

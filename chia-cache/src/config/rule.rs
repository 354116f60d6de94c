//! [`CacheRule`]: how one function of the `cache:` section is cached, and the readers of its
//! `ttl:`, `key:` and `single_flight:` settings.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::TagPatterns;
use super::section::{Problem, TYPO_DISTANCE};
use super::yaml_value::YamlValue;
use crate::WriteOptions;

/// How one configured function is cached: which of its calls, under what key, for how long,
/// and whether concurrent identical calls run once. The default is the `fn: true` shorthand:
/// every call, keyed by its tag, kept until evicted, no single flight.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheRule {
    /// `tags:`: `None` caches every call; otherwise only calls with a tag that one of the
    /// patterns matches in full (an untagged call is then not cached, unless the key is
    /// [`KeyFrom::Inputs`]: see [`CacheRule::admits`]).
    pub tags: Option<TagPatterns>,
    /// `ttl:`: how long an entry is served after it is written; `None` until evicted.
    pub ttl: Option<Duration>,
    /// `key:`: what a call's entry is found by.
    pub key: KeyFrom,
    /// `single_flight:`: when two calls with the same key run at the same time, the second
    /// waits for the first's result instead of computing it again, and runs itself if the
    /// first fails.
    pub single_flight: bool,
}

/// What a cached call's entry is keyed by (`key:` in the `cache:` section).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyFrom {
    /// `key: tag` (the default): the call's tag, as the original did. An untagged call has no
    /// key and is not cached.
    #[default]
    Tag,
    /// `key: inputs`: the function's name, its signature hash and a hash of the call's encoded
    /// arguments, so that a call with the same inputs hits without a tag (a tag, if any, stays
    /// a label). The runtime computes it; a change of the function's code is not seen unless
    /// its `version = N` attribute changes.
    Inputs,
}

impl KeyFrom {
    /// The spelling in the `cache:` section.
    pub const fn name(self) -> &'static str {
        match self {
            KeyFrom::Tag => "tag",
            KeyFrom::Inputs => "inputs",
        }
    }
}

impl CacheRule {
    /// Every call (the `fn: true` shorthand).
    pub fn all() -> Self {
        Self::default()
    }

    /// Only calls with a tag that one of `patterns` matches in full.
    pub fn tagged(patterns: TagPatterns) -> Self {
        CacheRule { tags: Some(patterns), ..Self::default() }
    }

    /// This rule with entries expiring `ttl` after their write.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// This rule keyed by `key`.
    pub fn with_key(mut self, key: KeyFrom) -> Self {
        self.key = key;
        self
    }

    /// This rule with single flight on or off.
    pub fn with_single_flight(mut self, single_flight: bool) -> Self {
        self.single_flight = single_flight;
        self
    }

    /// Whether a call tagged `tag` is cached under this rule. Without `tags:` every call is;
    /// with them, a tagged call is if one pattern matches its whole tag, and an untagged call
    /// only when the key is [`KeyFrom::Inputs`] (which needs no tag).
    pub fn admits(&self, tag: Option<&str>) -> bool {
        match (&self.tags, tag) {
            (None, _) => true,
            (Some(patterns), Some(tag)) => patterns.matches(tag),
            (Some(_), None) => self.key == KeyFrom::Inputs,
        }
    }

    /// The store options of a write under this rule: its time to live.
    pub fn write_options(&self) -> WriteOptions {
        WriteOptions { ttl: self.ttl, ..WriteOptions::default() }
    }
}

/// A function's `ttl:`: a number of seconds, or a number and one of `s`, `m`, `h`, `d`
/// (`90`, `30s`, `15m`, `1.5h`, `7d`); `None` when absent or null. Zero is refused: it would
/// cache nothing.
pub fn ttl(function: &str, value: Option<&YamlValue>) -> Result<Option<Duration>, Problem> {
    let shape = |message: String| Problem::Shape { function: Some(function.to_owned()), message };
    let seconds = match value {
        None | Some(YamlValue::Null) => return Ok(None),
        Some(YamlValue::Int(seconds)) => *seconds as f64,
        Some(YamlValue::Float(seconds)) => *seconds,
        Some(YamlValue::String(text)) => match crate::units::parse_duration(text) {
            Ok(duration) => return positive(duration).map(Some).map_err(shape),
            Err(error) => return Err(shape(format!("`ttl:` {error}"))),
        },
        Some(other) => {
            return Err(shape(format!(
                "`ttl:` must be a duration such as 30s, 15m, 12h or 7d, or a number of seconds, not {}",
                other.describe()
            )));
        }
    };
    let duration = Duration::try_from_secs_f64(seconds)
        .map_err(|_| shape(format!("`ttl:` must be a positive number of seconds, not {seconds}")))?;
    positive(duration).map(Some).map_err(shape)
}

fn positive(duration: Duration) -> Result<Duration, String> {
    if duration.is_zero() {
        Err("`ttl:` must be longer than zero (leave it out to keep entries until evicted)".to_owned())
    } else {
        Ok(duration)
    }
}

/// A function's `key:` (`tag` or `inputs`); the default when absent or null.
pub fn key(function: &str, value: Option<&YamlValue>) -> Result<KeyFrom, Problem> {
    let choices = [KeyFrom::Tag, KeyFrom::Inputs];
    let text = match value {
        None | Some(YamlValue::Null) => return Ok(KeyFrom::default()),
        Some(YamlValue::String(text)) => text,
        Some(other) => {
            return Err(Problem::Shape {
                function: Some(function.to_owned()),
                message: format!("`key:` must be `tag` or `inputs`, not {}", other.describe()),
            });
        }
    };
    if let Some(key) = choices.into_iter().find(|key| key.name() == text) {
        return Ok(key);
    }
    let hint = match chia_core::names::closest_name(text, choices.map(KeyFrom::name), TYPO_DISTANCE) {
        Some(near) => format!(" — did you mean `{near}`?"),
        None => String::new(),
    };
    Err(Problem::Shape {
        function: Some(function.to_owned()),
        message: format!("`key:` must be `tag` or `inputs`, not {text:?}{hint}"),
    })
}

/// A function's `single_flight:` (a boolean); false when absent or null.
pub fn single_flight(function: &str, value: Option<&YamlValue>) -> Result<bool, Problem> {
    match value {
        None | Some(YamlValue::Null) => Ok(false),
        Some(YamlValue::Bool(on)) => Ok(*on),
        Some(other) => Err(Problem::Shape {
            function: Some(function.to_owned()),
            message: format!("`single_flight:` must be true or false, not {}", other.describe()),
        }),
    }
}

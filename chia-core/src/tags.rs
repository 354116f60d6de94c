//! Tag patterns: the `tags:` of the `cache:` and `bypass:` sections and of the head's
//! result watches. A pattern matches a whole tag (Python's `re.fullmatch`), in Rust `regex`
//! syntax.

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Tag patterns, kept both as written and compiled to match a whole tag.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct TagPatterns {
    sources: Vec<String>,
    /// `^(?:source)$` for each source, in the same order.
    anchored: Vec<Regex>,
}

/// A tag pattern that does not compile.
#[derive(Debug, thiserror::Error)]
#[error("invalid tag pattern {pattern:?}: {source}")]
pub struct InvalidPattern {
    /// The pattern as written.
    pub pattern: String,
    /// The regex compiler's error.
    pub source: regex::Error,
}

impl TagPatterns {
    /// Compiles each pattern to match a whole tag.
    pub fn new<I, S>(patterns: I) -> Result<Self, InvalidPattern>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let sources: Vec<String> = patterns.into_iter().map(Into::into).collect();
        let anchored = sources.iter().map(|source| compile_whole_match(source)).collect::<Result<_, _>>()?;
        Ok(Self { sources, anchored })
    }

    /// The patterns as written.
    pub fn patterns(&self) -> &[String] {
        &self.sources
    }

    /// True if one pattern matches all of `tag`.
    pub fn matches(&self, tag: &str) -> bool {
        self.anchored.iter().any(|pattern| pattern.is_match(tag))
    }
}

impl PartialEq for TagPatterns {
    fn eq(&self, other: &Self) -> bool {
        self.sources == other.sources
    }
}

impl TryFrom<Vec<String>> for TagPatterns {
    type Error = InvalidPattern;

    fn try_from(sources: Vec<String>) -> Result<Self, InvalidPattern> {
        Self::new(sources)
    }
}

impl From<TagPatterns> for Vec<String> {
    fn from(patterns: TagPatterns) -> Self {
        patterns.sources
    }
}

/// `re.fullmatch` semantics. The pattern is compiled alone first so that one which only parses
/// because of the wrapper (`a)|(b` would become `^(?:a)|(b)$`) is still rejected.
fn compile_whole_match(source: &str) -> Result<Regex, InvalidPattern> {
    let invalid = |error| InvalidPattern { pattern: source.to_owned(), source: error };
    Regex::new(source).map_err(invalid)?;
    Regex::new(&format!("^(?:{source})$")).map_err(invalid)
}

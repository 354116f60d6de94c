//! What the `cache:` and `bypass:` sections of the shared YAML file have in common: a mapping
//! of function names to `true`/`false`, or to settings with an on/off flag and `tags:`. Each
//! section reads its own extra settings; both report what is wrong as one [`SectionError`],
//! which names the section, the file and (where known) the line and function.
//!
//! Strictness, which the original did not have: a field a section does not know, inside a
//! function's settings, is an error naming its line and the closest known field, because a
//! typo there (`tag:` for `tags:`, `bypas: true`) otherwise silently caches every call or
//! turns bypass off. The top level stays open (the same file carries the loop's own
//! settings); only a key within [`TYPO_DISTANCE`] edits of the section's name is warned about.

use std::io;
use std::path::{Path, PathBuf};

use chia_core::names::closest_name;

use super::TagPatterns;
use super::yaml_value::YamlValue;

/// How many edits away a key may be from a known name to be taken for a misspelling of it. Two
/// catch a dropped, doubled or swapped letter or two (`bypas`, `chache`, `tgas`) without taking
/// different words for typos (`data` is three edits from `tags`).
pub const TYPO_DISTANCE: usize = 2;

/// A section of the YAML file this crate and `chia-bypass` read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Section {
    /// `cache:`: which functions' results are cached.
    Cache,
    /// `bypass:`: which functions are replayed instead of run.
    Bypass,
}

impl Section {
    /// The section's key in the file, which is also the on/off flag of a function's settings
    /// (`f: {cache: true}`).
    pub const fn key(self) -> &'static str {
        match self {
            Section::Cache => "cache",
            Section::Bypass => "bypass",
        }
    }

    /// The fields a function's settings may hold in this section, its flag first.
    pub const fn fields(self) -> &'static [&'static str] {
        match self {
            Section::Cache => &["cache", "tags", "ttl", "key", "single_flight"],
            Section::Bypass => &["bypass", "tags", "data"],
        }
    }
}

impl std::fmt::Display for Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

/// Why a section (`cache:` or `bypass:`) of the YAML file could not be loaded. Every message
/// starts with the section and the file (`bypass config loop.yaml, line 4: ...`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SectionError {
    /// The file could not be read.
    #[error("cannot read {section} config {path}: {source}")]
    Read {
        /// The section being loaded.
        section: Section,
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: io::Error,
    },

    /// The file is not YAML, or its top level is not a mapping. `message` (the YAML parser's)
    /// shows the line and column with a snippet; `line` repeats the line for code.
    #[error("{section} config {origin} cannot be parsed: {message}")]
    Parse {
        /// The section being loaded.
        section: Section,
        /// The file's path, or what the caller called text that never was a file.
        origin: String,
        /// The 1-based line of the problem, when the parser knows it.
        line: Option<u64>,
        /// The parser's message.
        message: String,
    },

    /// The section parses but a value has a type the section does not allow.
    #[error("{section} config {origin}: {}{message}", function_prefix(function.as_deref()))]
    Shape {
        /// The section being loaded.
        section: Section,
        /// The file's path, or what the caller called text that never was a file.
        origin: String,
        /// The function whose settings are wrong; `None` when the section itself is.
        function: Option<String>,
        /// What is wrong.
        message: String,
    },

    /// A `tags:` pattern is not a valid regular expression (Rust `regex` syntax).
    #[error(
        "{section} config {origin}: function {function:?} has an invalid tag pattern {pattern:?}: {source}"
    )]
    InvalidTagPattern {
        /// The section being loaded.
        section: Section,
        /// The file's path, or what the caller called text that never was a file.
        origin: String,
        /// The function the pattern is for.
        function: String,
        /// The pattern as written.
        pattern: String,
        /// The regex compiler's error.
        source: regex::Error,
    },

    /// A function's settings hold a field the section does not know (a typo, most likely);
    /// `suggestion` is the closest known field, if one is near.
    #[error(
        "{section} config {origin}{}: function {function:?}: unknown field `{field}:`{}",
        at_line(*line),
        unknown_field_hint(*suggestion, section.fields())
    )]
    UnknownField {
        /// The section being loaded.
        section: Section,
        /// The file's path, or what the caller called text that never was a file.
        origin: String,
        /// The 1-based line of the field, when the parser knows it.
        line: Option<u64>,
        /// The function whose settings hold the field.
        function: String,
        /// The field as written.
        field: String,
        /// The known field closest to `field`, if one is within [`TYPO_DISTANCE`] edits.
        suggestion: Option<&'static str>,
    },
}

impl SectionError {
    /// The section's file at `path` could not be read.
    pub fn read(section: Section, path: &Path, source: io::Error) -> SectionError {
        SectionError::Read { section, path: path.to_owned(), source }
    }
}

fn function_prefix(function: Option<&str>) -> String {
    function.map(|function| format!("function {function:?}: ")).unwrap_or_default()
}

/// What is wrong with a section, before [`Problem::in_section`] adds the section's and the
/// file's names.
#[derive(Debug)]
pub enum Problem {
    /// Not YAML, or a top level that is not a mapping.
    Parse {
        /// The 1-based line, when known.
        line: Option<u64>,
        /// The parser's message.
        message: String,
    },
    /// A value of a type the section does not allow.
    Shape {
        /// The function whose settings are wrong; `None` when the section itself is.
        function: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A `tags:` pattern that is not a valid regular expression.
    InvalidTagPattern {
        /// The function the pattern is for.
        function: String,
        /// The pattern as written.
        pattern: String,
        /// The regex compiler's error.
        source: regex::Error,
    },
    /// A key in a function's settings that the section does not know.
    UnknownField {
        /// The function whose settings hold the field.
        function: String,
        /// The field as written.
        field: String,
        /// The 1-based line of the field, when known.
        line: Option<u64>,
        /// The known field closest to `field`, if one is within [`TYPO_DISTANCE`] edits.
        suggestion: Option<&'static str>,
    },
}

impl Problem {
    /// The error this problem is in `section` of the file `origin`.
    pub fn in_section(self, section: Section, origin: &str) -> SectionError {
        let origin = origin.to_owned();
        match self {
            Problem::Parse { line, message } => SectionError::Parse { section, origin, line, message },
            Problem::Shape { function, message } => {
                SectionError::Shape { section, origin, function, message }
            }
            Problem::InvalidTagPattern { function, pattern, source } => {
                SectionError::InvalidTagPattern { section, origin, function, pattern, source }
            }
            Problem::UnknownField { function, field, line, suggestion } => {
                SectionError::UnknownField { section, origin, line, function, field, suggestion }
            }
        }
    }
}

/// A top-level key that looks like a misspelt section name (`bypas:` for `bypass:`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionTypo {
    /// The key as written.
    pub found: String,
    /// The 1-based line of the key, when known.
    pub line: Option<u64>,
    /// The section it is probably meant to be.
    pub section: Section,
}

/// The `section` of a YAML document; `None` when it is absent or empty. Other sections are
/// skipped, with a warning for those that look like a misspelling of its key. `origin` names the
/// document in the parser's message (its snippet header) and in the warnings.
pub fn read_section(text: &str, section: Section, origin: &str) -> Result<Option<YamlValue>, Problem> {
    let document: Option<YamlValue> = serde_saphyr::from_str(text).map_err(|error| Problem::Parse {
        line: error.location().map(|location| location.line()),
        // Rendered with the document's name: the default header says `<input>`.
        message: error.render_with_options(serde_saphyr::render_options! { source_name: Some(origin) }),
    })?;
    match document {
        None | Some(YamlValue::Null) => Ok(None),
        Some(top @ YamlValue::Mapping(_)) => {
            for typo in section_typos(&top, section) {
                tracing::warn!(
                    origin,
                    line = typo.line,
                    "{origin}{}: top-level key `{}:` is not read — did you mean `{}:`?",
                    at_line(typo.line),
                    typo.found,
                    typo.section
                );
            }
            Ok(top.get(section.key()).filter(|s| **s != YamlValue::Null).cloned())
        }
        Some(other) => Err(Problem::Parse {
            line: None,
            message: format!("the top level must be a mapping of sections, not {}", other.describe()),
        }),
    }
}

/// The top-level keys of `document` that are not `section` but within [`TYPO_DISTANCE`] edits
/// of it, in document order.
pub fn section_typos(document: &YamlValue, section: Section) -> Vec<SectionTypo> {
    let YamlValue::Mapping(entries) = document else { return Vec::new() };
    entries
        .iter()
        .filter_map(|entry| {
            let found = entry.key.as_str()?;
            closest_name(found, [section.key()], TYPO_DISTANCE)?;
            Some(SectionTypo { found: found.to_owned(), line: entry.line, section })
        })
        .collect()
}

/// The functions a section turns on, in file order, each with its settings mapping (`None`
/// for the `fn: true` shorthand). `fn: false`, a mapping whose flag (the section's key) is
/// false or absent, and specs of other types (ignored with a warning) are left out. Every
/// settings mapping, on or off, may hold only the section's fields (the flag among them): a
/// misspelt flag is what turns a function off by mistake.
pub fn enabled_functions<'a>(
    section: &'a YamlValue,
    key: Section,
    origin: &str,
) -> Result<Vec<(&'a str, Option<&'a YamlValue>)>, Problem> {
    let (flag, fields) = (key.key(), key.fields());
    let YamlValue::Mapping(entries) = section else {
        return Err(Problem::Shape {
            function: None,
            message: format!(
                "the `{key}:` section must map function names to settings, not {}",
                section.describe()
            ),
        });
    };
    let mut enabled = Vec::new();
    for entry in entries {
        let spec = &entry.value;
        let Some(function) = entry.key.as_str() else {
            tracing::warn!(origin, key = %entry.key.describe(), "{key} config: ignoring a key that is not a function name");
            continue;
        };
        let on = match spec {
            YamlValue::Bool(on) => *on,
            YamlValue::Mapping(settings) => {
                check_fields(function, settings, fields)?;
                match spec.get(flag) {
                    None | Some(YamlValue::Null) => false,
                    Some(YamlValue::Bool(on)) => *on,
                    Some(other) => {
                        return Err(Problem::Shape {
                            function: Some(function.to_owned()),
                            message: format!("`{flag}:` must be true or false, not {}", other.describe()),
                        });
                    }
                }
            }
            other => {
                tracing::warn!(
                    origin,
                    function,
                    spec = %other.describe(),
                    "{key} config: ignoring a function whose setting is neither true/false nor a mapping"
                );
                continue;
            }
        };
        if on {
            enabled.push((function, matches!(spec, YamlValue::Mapping(_)).then_some(spec)));
        }
    }
    Ok(enabled)
}

/// The first key of a function's settings that is not one of `fields`, as an error.
fn check_fields(
    function: &str,
    settings: &[super::yaml_value::MappingEntry],
    fields: &'static [&'static str],
) -> Result<(), Problem> {
    let Some(unknown) =
        settings.iter().find(|entry| entry.key.as_str().is_none_or(|name| !fields.contains(&name)))
    else {
        return Ok(());
    };
    let field = unknown.key.key_text();
    Err(Problem::UnknownField {
        function: function.to_owned(),
        suggestion: closest_name(&field, fields.iter().copied(), TYPO_DISTANCE),
        field,
        line: unknown.line,
    })
}

/// A function's `tags:` (one pattern or a list); `None` when absent or null (every call).
pub fn tag_patterns(function: &str, tags: Option<&YamlValue>) -> Result<Option<TagPatterns>, Problem> {
    let shape = |message: String| Problem::Shape { function: Some(function.to_owned()), message };
    let sources = match tags {
        None | Some(YamlValue::Null) => return Ok(None),
        Some(YamlValue::String(pattern)) => vec![pattern.clone()],
        Some(YamlValue::Sequence(items)) => items
            .iter()
            .map(|item| {
                item.as_str().map(str::to_owned).ok_or_else(|| {
                    shape(format!("each tag pattern must be a string, not {}", item.describe()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(shape(format!(
                "`tags:` must be a pattern or a list of patterns, not {}",
                other.describe()
            )));
        }
    };
    TagPatterns::new(sources).map(Some).map_err(|invalid| Problem::InvalidTagPattern {
        function: function.to_owned(),
        pattern: invalid.pattern,
        source: invalid.source,
    })
}

/// `", line 4"`, or nothing when the line is unknown: for messages that follow the file name.
pub fn at_line(line: Option<u64>) -> String {
    line.map(|line| format!(", line {line}")).unwrap_or_default()
}

/// What follows "unknown field `x:`" in a message: the suggestion when there is one, else the
/// fields the section knows.
pub fn unknown_field_hint(suggestion: Option<&str>, known: &[&str]) -> String {
    match suggestion {
        Some(field) => format!(" — did you mean `{field}:`?"),
        None => {
            let known: Vec<String> = known.iter().map(|field| format!("`{field}:`")).collect();
            format!(" (the known fields are {})", known.join(", "))
        }
    }
}

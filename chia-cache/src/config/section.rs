//! What the `cache:` and `bypass:` sections of the shared YAML file have in common: a mapping
//! of function names to `true`/`false`, or to settings with an on/off flag and `tags:`. Each
//! section reads its own extra settings and turns a [`Problem`] into its own error type (which
//! names the section).

use super::TagPatterns;
use super::yaml_value::YamlValue;

/// What is wrong with a section, before the section's error type adds the file's name.
#[derive(Debug)]
pub enum Problem {
    /// Not YAML, or a top level that is not a mapping.
    Parse { line: Option<u64>, message: String },
    /// A value of a type the section does not allow.
    Shape { function: Option<String>, message: String },
    /// A `tags:` pattern that is not a valid regular expression.
    InvalidTagPattern { function: String, pattern: String, source: regex::Error },
}

/// The section `key` of a YAML document; `None` when it is absent or empty. Other sections are
/// skipped.
pub fn read_section(text: &str, key: &str) -> Result<Option<YamlValue>, Problem> {
    let document: Option<YamlValue> = serde_saphyr::from_str(text).map_err(|error| Problem::Parse {
        line: error.location().map(|location| location.line()),
        message: error.to_string(),
    })?;
    match document {
        None | Some(YamlValue::Null) => Ok(None),
        Some(top @ YamlValue::Mapping(_)) => Ok(top.get(key).filter(|s| **s != YamlValue::Null).cloned()),
        Some(other) => Err(Problem::Parse {
            line: None,
            message: format!("the top level must be a mapping of sections, not {}", other.describe()),
        }),
    }
}

/// The functions a section turns on, in file order, each with its settings mapping (`None`
/// for the `fn: true` shorthand). `fn: false`, a mapping whose `flag` is false or absent, and
/// specs of other types (ignored with a warning) are left out.
pub fn enabled_functions<'a>(
    section: &'a YamlValue,
    key: &str,
    flag: &str,
    origin: &str,
) -> Result<Vec<(&'a str, Option<&'a YamlValue>)>, Problem> {
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
    for (name, spec) in entries {
        let Some(function) = name.as_str() else {
            tracing::warn!(origin, key = %name.describe(), "{key} config: ignoring a key that is not a function name");
            continue;
        };
        let on = match spec {
            YamlValue::Bool(on) => *on,
            YamlValue::Mapping(_) => match spec.get(flag) {
                None | Some(YamlValue::Null) => false,
                Some(YamlValue::Bool(on)) => *on,
                Some(other) => {
                    return Err(Problem::Shape {
                        function: Some(function.to_owned()),
                        message: format!("`{flag}:` must be true or false, not {}", other.describe()),
                    });
                }
            },
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

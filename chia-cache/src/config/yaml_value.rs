//! A minimal untyped YAML value, so the `cache:` and `bypass:` sections can be read with the
//! original's dynamic rules (a function's spec may be a bool or a mapping, `tags` a string or
//! a list) instead of a rigid schema that would reject what the original accepted. Mapping
//! keys keep their line, so an error about a key (a misspelt field) can point at it.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A YAML node as written, without a schema.
#[derive(Clone, Debug, PartialEq)]
pub enum YamlValue {
    /// `~`, `null` or nothing.
    Null,
    /// `true`/`false` (and the YAML 1.1 spellings PyYAML read as booleans).
    Bool(bool),
    /// An integer.
    Int(i128),
    /// A floating-point number.
    Float(f64),
    /// A string, quoted or plain.
    String(String),
    /// A list, in document order.
    Sequence(Vec<YamlValue>),
    /// Entries in document order.
    Mapping(Vec<MappingEntry>),
}

/// One `key: value` of a mapping.
#[derive(Clone, Debug, PartialEq)]
pub struct MappingEntry {
    /// The key (usually a string: a function or field name).
    pub key: YamlValue,
    /// The value under the key.
    pub value: YamlValue,
    /// The 1-based line of the key in its document; `None` when the parser knew none.
    pub line: Option<u64>,
}

impl YamlValue {
    /// The text of a string value; `None` for any other kind.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            YamlValue::String(text) => Some(text),
            _ => None,
        }
    }

    /// The value of `key` in a mapping (the last one if repeated), `None` if absent or if
    /// `self` is not a mapping.
    pub fn get(&self, key: &str) -> Option<&YamlValue> {
        match self {
            YamlValue::Mapping(entries) => {
                entries.iter().rev().find(|entry| entry.key.as_str() == Some(key)).map(|entry| &entry.value)
            }
            _ => None,
        }
    }

    /// A mapping's key as the user wrote it, for messages: a string as is, a scalar as its
    /// text, anything else described.
    pub fn key_text(&self) -> String {
        match self {
            YamlValue::String(text) => text.clone(),
            YamlValue::Bool(flag) => flag.to_string(),
            YamlValue::Int(number) => number.to_string(),
            YamlValue::Float(number) => number.to_string(),
            YamlValue::Null | YamlValue::Sequence(_) | YamlValue::Mapping(_) => self.describe(),
        }
    }

    /// What the value is, for error messages ("a number (5)").
    pub fn describe(&self) -> String {
        match self {
            YamlValue::Null => "null".to_owned(),
            YamlValue::Bool(flag) => format!("a boolean ({flag})"),
            YamlValue::Int(number) => format!("a number ({number})"),
            YamlValue::Float(number) => format!("a number ({number})"),
            YamlValue::String(text) => format!("a string ({text:?})"),
            YamlValue::Sequence(_) => "a list".to_owned(),
            YamlValue::Mapping(_) => "a mapping".to_owned(),
        }
    }
}

impl<'de> Deserialize<'de> for YamlValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(YamlValueVisitor)
    }
}

struct YamlValueVisitor;

impl<'de> Visitor<'de> for YamlValueVisitor {
    type Value = YamlValue;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any YAML value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<YamlValue, E> {
        Ok(YamlValue::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<YamlValue, E> {
        Ok(YamlValue::Int(value.into()))
    }

    fn visit_i128<E>(self, value: i128) -> Result<YamlValue, E> {
        Ok(YamlValue::Int(value))
    }

    fn visit_u64<E>(self, value: u64) -> Result<YamlValue, E> {
        Ok(YamlValue::Int(value.into()))
    }

    fn visit_u128<E: serde::de::Error>(self, value: u128) -> Result<YamlValue, E> {
        i128::try_from(value).map(YamlValue::Int).map_err(|_| E::custom("integer too large"))
    }

    fn visit_f64<E>(self, value: f64) -> Result<YamlValue, E> {
        Ok(YamlValue::Float(value))
    }

    fn visit_str<E>(self, value: &str) -> Result<YamlValue, E> {
        Ok(YamlValue::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<YamlValue, E> {
        Ok(YamlValue::String(value))
    }

    fn visit_unit<E>(self) -> Result<YamlValue, E> {
        Ok(YamlValue::Null)
    }

    fn visit_none<E>(self) -> Result<YamlValue, E> {
        Ok(YamlValue::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<YamlValue, D::Error> {
        YamlValue::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<YamlValue, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(YamlValue::Sequence(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<YamlValue, A::Error> {
        let mut entries = Vec::new();
        while let Some((key, value)) = map.next_entry::<Spanned<YamlValue>, YamlValue>()? {
            // Line 0 is serde-saphyr's "unknown location".
            let line = Some(key.referenced.line()).filter(|line| *line > 0);
            entries.push(MappingEntry { key: key.value, value, line });
        }
        Ok(YamlValue::Mapping(entries))
    }
}

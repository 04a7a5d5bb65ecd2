//! The strict deserializer of one unit of the file (a section, a device, a unit, a tag) and
//! the words of its problems: which key failed and why, and the did-you-mean of an unknown
//! name.
//!
//! A unit is a `toml::Table` deserialized into a `#[serde(deny_unknown_fields)]` raw struct
//! (`raw.rs`) by [`UnitDeserializer`], whose error ([`UnitError`]) names the failing key
//! without parsing serde's messages: the checker drops that key and retries, so that every
//! bad key of a unit is reported.

use std::fmt;

use serde::de::{self, DeserializeOwned, IntoDeserializer};

/// Why a unit did not deserialize; the derived `Deserialize` impls build these through the
/// `de::Error` hooks, so the failing key is known without parsing messages.
#[derive(Debug, thiserror::Error)]
pub(super) enum UnitError {
    #[error("unknown key `{key}`")]
    UnknownKey {
        key: String,
        expected: &'static [&'static str],
    },
    #[error("missing key `{0}`")]
    MissingKey(&'static str),
    #[error("{message}")]
    BadValue { key: String, message: String },
    #[error("{0}")]
    Other(String),
}

impl de::Error for UnitError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        UnitError::Other(msg.to_string())
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        UnitError::UnknownKey {
            key: field.to_owned(),
            expected,
        }
    }

    fn missing_field(field: &'static str) -> Self {
        UnitError::MissingKey(field)
    }
}

/// Deserializes a struct from a table, naming the key whose value failed. When the keys of
/// the unit are given, any other key is unknown, even one the struct has.
pub(super) struct UnitDeserializer<'k>(
    pub(super) toml::Table,
    pub(super) Option<&'k [&'static str]>,
);

impl<'de> de::Deserializer<'de> for UnitDeserializer<'_> {
    type Error = UnitError;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, UnitError> {
        visitor.visit_map(UnitMap {
            entries: self.0.into_iter(),
            known: self.1,
            pending: None,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

struct UnitMap<'k> {
    entries: <toml::Table as IntoIterator>::IntoIter,
    known: Option<&'k [&'static str]>,
    pending: Option<(String, toml::Value)>,
}

impl<'de> de::MapAccess<'de> for UnitMap<'_> {
    type Error = UnitError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, UnitError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        if self
            .known
            .is_some_and(|known| !known.iter().any(|k| *k == key))
        {
            return Err(UnitError::UnknownKey { key, expected: &[] });
        }
        let deserializer: de::value::StrDeserializer<'_, UnitError> =
            key.as_str().into_deserializer();
        let parsed = seed.deserialize(deserializer)?;
        self.pending = Some((key, value));
        Ok(Some(parsed))
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, UnitError> {
        let Some((key, value)) = self.pending.take() else {
            return Err(UnitError::Other("a value without a key".to_owned()));
        };
        seed.deserialize(value).map_err(|e| UnitError::BadValue {
            key,
            message: plain_serde_message(e.message()),
        })
    }
}

/// Serde's messages, in the words of a config file.
pub(super) fn plain_serde_message(message: &str) -> String {
    message
        .replace("unknown variant", "unknown value")
        .replace("expected i64", "expected an integer")
        .replace("expected f64", "expected a number")
        .replace("invalid type: map", "invalid type: table")
        .replace("invalid type: sequence", "invalid type: array")
}

/// The keys of a raw struct, as its derived `Deserialize` knows them: asked for by
/// deserializing a table whose only key no struct has.
pub(super) fn keys_of<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut probe = toml::Table::new();
    probe.insert("\0".to_owned(), toml::Value::Boolean(true));
    match T::deserialize(UnitDeserializer(probe, None)) {
        Err(UnitError::UnknownKey { expected, .. }) => expected,
        _ => &[],
    }
}

// ---- Did you mean ------------------------------------------------------------------------

/// `a, b or c`.
pub(super) fn one_of(words: &[&str]) -> String {
    match words.split_last() {
        Some((last, first)) if !first.is_empty() => format!("{} or {last}", first.join(", ")),
        Some((last, _)) => (*last).to_owned(),
        None => String::new(),
    }
}

/// An unknown name (`what` is `key` or `section`) and the [`suggestion`] for it.
pub(super) fn unknown_key_message(what: &str, key: &str, known: &[&str]) -> String {
    format!("unknown {what} `{key}`; {}", suggestion(key, known))
}

/// `did you mean `x`?` for a likely typo, else the list of known names.
fn suggestion(key: &str, known: &[&str]) -> String {
    match closest(key, known) {
        Some(near) => format!("did you mean `{near}`?"),
        None => format!("expected one of: {}", known.join(", ")),
    }
}

/// The longest name compared letter by letter with the known ones; a longer one is no typo
/// of any of them, and the comparison's cost stays bounded whatever the file holds.
const LONGEST_TYPO: usize = 64;

/// The known name nearest to a misspelt one, if it is near enough to be a likely typo: two
/// edits away at most (Levenshtein distance, in characters), the nearest first, or else the
/// start of a known name (`password` for `password_file`).
fn closest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    let word = word.to_ascii_lowercase();
    let typo = (word.chars().count() <= LONGEST_TYPO)
        .then(|| {
            known
                .iter()
                .filter(|k| k.chars().count() <= LONGEST_TYPO)
                .map(|k| (strsim::levenshtein(&word, k), *k))
                .filter(|&(d, k)| d <= 2 && d < k.len())
                .min_by_key(|&(d, _)| d)
                .map(|(_, k)| k)
        })
        .flatten();
    typo.or_else(|| {
        known
            .iter()
            .find(|k| word.len() >= 4 && k.starts_with(word.as_str()))
            .copied()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_near_name_is_suggested_and_a_far_one_lists_the_known_names() {
        let known = ["keep_alive", "password_file", "max_inflight", "url"];
        for (word, near) in [
            ("keepalive", Some("keep_alive")),
            ("KEEP_ALIVE", Some("keep_alive")),
            ("max_inflght", Some("max_inflight")),
            ("password", Some("password_file")),
            ("urk", Some("url")),
            ("ur", Some("url")),
            ("qos", None),
            ("pass", Some("password_file")),
            ("pas", None),
        ] {
            assert_eq!(closest(word, &known), near, "{word}");
        }
        assert_eq!(
            suggestion("qos", &known),
            "expected one of: keep_alive, password_file, max_inflight, url"
        );
        let long = "k".repeat(LONGEST_TYPO + 1);
        assert_eq!(closest(&long, &known), None);
        assert_eq!(one_of(&["a", "b", "c"]), "a, b or c");
        assert_eq!(one_of(&["a"]), "a");
    }
}

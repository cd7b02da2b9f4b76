//! The key a keyed step gives a record, and a key's JSON text written straight from the
//! record's fields.
//!
//! A dedup needs its key only as text (the state key, a JSON sink key, the upsert id):
//! building it as a map first, to serialize it at once, cost more than the rest of the step
//! (a hash table and a copy of each name and value per record). Steps that read the key's
//! fields later (windows, running aggregates, joins) keep it as a map.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::event_time::field_at;

/// A record's key: its fields, or only their JSON text (as `serde_json` writes the map).
#[derive(Debug, Clone, PartialEq)]
pub enum RecordKey {
    Fields(Map<String, Value>),
    /// The text of a JSON object, as [`key_text_of`] writes it.
    Text(String),
}

impl RecordKey {
    /// The key as a JSON object.
    pub fn fields(&self) -> Cow<'_, Map<String, Value>> {
        match self {
            RecordKey::Fields(fields) => Cow::Borrowed(fields),
            // The text was written from a map of JSON values, so it reads back as one; the
            // empty map is unreachable.
            RecordKey::Text(text) => Cow::Owned(serde_json::from_str(text).unwrap_or_default()),
        }
    }

    /// The key's JSON text.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            RecordKey::Fields(fields) => Cow::Owned(super::key_text(fields)),
            RecordKey::Text(text) => Cow::Borrowed(text),
        }
    }
}

/// The JSON text of the named fields (missing ones as null): the same text as
/// `key_text(&key_of(fields, names))`, written without the map. A name given twice is
/// written once, at its first place, as the map holds it.
pub fn key_text_of(fields: &Map<String, Value>, names: &[String]) -> String {
    let mut text = Vec::with_capacity(16 * names.len() + 2);
    text.push(b'{');
    for (index, name) in names.iter().enumerate() {
        if names[..index].contains(name) {
            continue;
        }
        if index > 0 {
            text.push(b',');
        }
        crate::codec::json::write_string(&mut text, name);
        text.push(b':');
        // Writing JSON into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut text, field_at(fields, name).unwrap_or(&Value::Null));
    }
    text.push(b'}');
    // serde_json writes UTF-8.
    String::from_utf8(text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::operators::{key_of, key_text};

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| name.to_string()).collect()
    }

    /// The text is the map's, for every kind of value, escapes, nested paths and missing
    /// fields.
    #[test]
    fn the_text_is_the_maps_text() {
        let record = json!({
            "id": 12345678901234_i64, "user": "u\"1\\\n\u{1}é", "price": -0.1, "big": 1.5e300,
            "flag": true, "none": null, "list": [1, "a", {"b": 2}], "nested": {"a": {"b": "deep"}, "c": 1},
            "quo\"te": 3
        });
        let fields = record.as_object().unwrap();
        for key in [
            names(&["id"]),
            names(&["user", "id"]),
            names(&["price", "big", "flag", "none", "list"]),
            names(&["nested.a.b", "nested.c", "nested.x", "missing", "nested"]),
            names(&["quo\"te", "id.not"]),
        ] {
            assert_eq!(key_text_of(fields, &key), key_text(&key_of(fields, &key)), "key {key:?}");
            // The text a repartitioned record's placement was hashed from.
            assert_eq!(key_text_of(fields, &key), Value::Object(key_of(fields, &key)).to_string(), "key {key:?}");
        }
    }

    #[test]
    fn repeated_names_are_kept_once_at_their_first_place() {
        let fields = json!({"a": 1, "b": 2});
        let fields = fields.as_object().unwrap();
        for key in [names(&["b", "a", "b"]), names(&["a", "a"]), names(&["b", "b", "a", "a", "b"])] {
            assert_eq!(key_text_of(fields, &key), key_text(&key_of(fields, &key)), "key {key:?}");
        }
        assert_eq!(key_text_of(fields, &names(&["b", "a", "b"])), r#"{"b":2,"a":1}"#);
    }

    #[test]
    fn a_text_key_reads_back_as_its_fields() {
        let fields = json!({"user": "u1", "id": 7, "price": 2.5});
        let fields = fields.as_object().unwrap();
        let key = names(&["user", "price"]);
        let text = RecordKey::Text(key_text_of(fields, &key));
        assert_eq!(text.fields().into_owned(), key_of(fields, &key));
        assert_eq!(text.text(), RecordKey::Fields(key_of(fields, &key)).text());
    }
}

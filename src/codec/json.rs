//! JSON with an explicit schema: the declared fields are read and type-checked, in the
//! schema's order; undeclared fields are dropped; a missing field or `null` is an error
//! unless its type says `?` (then it reads as null).

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::error::Category;
use serde_json::{Map, Value};

use super::DecodeError;
use crate::config::{FieldType, Schema};

pub fn decode(schema: &Schema, bytes: &[u8]) -> Result<Map<String, Value>, DecodeError> {
    // One pass: declared fields are type-checked as they are read, the rest are skipped
    // without being built (no intermediate map of the whole document).
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let fields = ObjectSeed { schema, path: "" }
        .deserialize(&mut deserializer)
        .and_then(|fields| deserializer.end().map(|()| fields))
        .map_err(|error| DecodeError(describe(error)))?;
    Ok(fields)
}

/// serde_json reports our own messages as "data" errors; anything else is malformed JSON.
fn describe(error: serde_json::Error) -> String {
    match error.classify() {
        Category::Data => error.to_string(),
        _ => format!("not valid JSON: {error}"),
    }
}

/// Reads an object of `schema`, in schema order.
struct ObjectSeed<'a> {
    schema: &'a Schema,
    path: &'a str,
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = Map<String, Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut slots: Vec<Option<Value>> = vec![None; self.schema.fields.len()];
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let position = self.schema.fields.iter().position(|(name, _)| name.as_str() == key.as_ref());
            match position {
                Some(index) => {
                    let (name, field_type) = &self.schema.fields[index];
                    slots[index] = Some(map.next_value_seed(FieldSeed::new(field_type, self.path, name))?);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let mut fields = Map::with_capacity(slots.len());
        for ((name, field_type), slot) in self.schema.fields.iter().zip(slots) {
            let value = match slot {
                Some(value) => value,
                None if field_type.is_nullable() => Value::Null,
                None => {
                    let path = if self.path.is_empty() { name.clone() } else { format!("{}.{name}", self.path) };
                    return Err(serde::de::Error::custom(format!(
                        "field '{path}' is missing; {} if it may be absent",
                        crate::config::nullable_hint(name, field_type)
                    )));
                }
            };
            fields.insert(name.clone(), value);
        }
        Ok(fields)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(serde::de::Error::custom(self.found("an array")))
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(E::custom(self.found("a string")))
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(E::custom(self.found("a number")))
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(E::custom(self.found("a number")))
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(E::custom(self.found("a number")))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(E::custom(self.found("a boolean")))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(self.found("null")))
    }
}

impl ObjectSeed<'_> {
    fn found(&self, what: &str) -> String {
        if self.path.is_empty() {
            format!("expected a JSON object, found {what}")
        } else {
            format!("field '{}': expected an object, found {what}", self.path)
        }
    }
}

/// An object key, borrowed from the input when it has no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = std::borrow::Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = std::borrow::Cow<'de, str>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a field name")
    }

    fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(key))
    }

    fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(key.to_string()))
    }
}

/// Reads one declared field, checking its type; null only where the type says `?`.
struct FieldSeed<'a> {
    /// Without its `?`.
    field_type: &'a FieldType,
    nullable: bool,
    /// The path of the object the field is in ("" at the top), and the field's name (or, in
    /// a list, its index): the field's path is only put together when needed (errors,
    /// nested objects).
    parent: &'a str,
    name: &'a str,
    index: Option<usize>,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'a> FieldSeed<'a> {
    fn new(declared: &'a FieldType, parent: &'a str, name: &'a str) -> FieldSeed<'a> {
        FieldSeed { field_type: declared.base(), nullable: declared.is_nullable(), parent, name, index: None }
    }

    fn path(&self) -> String {
        match self.index {
            Some(index) => format!("{}[{index}]", self.parent),
            None if self.parent.is_empty() => self.name.to_string(),
            None => format!("{}.{}", self.parent, self.name),
        }
    }

    fn mismatch<E: serde::de::Error>(&self, found: String) -> E {
        E::custom(format!("field '{}': expected {}, found {found}", self.path(), type_name(self.field_type)))
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(type_name(self.field_type))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        match self.nullable {
            true => Ok(Value::Null),
            false => Err(E::custom(crate::config::null_refused(&self.path(), self.field_type))),
        }
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Value, E> {
        match self.field_type {
            FieldType::String => Ok(Value::String(text.to_string())),
            _ => Err(self.mismatch(kind(&Value::String(text.to_string())))),
        }
    }

    fn visit_i64<E: serde::de::Error>(self, number: i64) -> Result<Value, E> {
        match self.field_type {
            FieldType::Long | FieldType::Timestamp => Ok(Value::from(number)),
            FieldType::Double => Ok(Value::from(number as f64)),
            _ => Err(self.mismatch(kind(&Value::from(number)))),
        }
    }

    fn visit_u64<E: serde::de::Error>(self, number: u64) -> Result<Value, E> {
        match self.field_type {
            FieldType::Long | FieldType::Timestamp => i64::try_from(number)
                .map(Value::from)
                .map_err(|_| self.mismatch(format!("{number}, beyond the range of a long"))),
            FieldType::Double => Ok(Value::from(number as f64)),
            _ => Err(self.mismatch(kind(&Value::from(number)))),
        }
    }

    fn visit_f64<E: serde::de::Error>(self, number: f64) -> Result<Value, E> {
        match self.field_type {
            // Keep doubles doubles, so that `sum` and comparisons see one type.
            FieldType::Double => Ok(Value::from(number)),
            _ => Err(self.mismatch(kind(&Value::from(number)))),
        }
    }

    fn visit_bool<E: serde::de::Error>(self, flag: bool) -> Result<Value, E> {
        match self.field_type {
            FieldType::Boolean => Ok(Value::Bool(flag)),
            _ => Err(self.mismatch(kind(&Value::Bool(flag)))),
        }
    }

    /// A list's elements, each read as a field of the element type; they may be null.
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<Value, A::Error> {
        let FieldType::Array(element) = self.field_type else {
            return Err(self.mismatch("an array".to_string()));
        };
        let path = self.path();
        let mut values = Vec::with_capacity(items.size_hint().unwrap_or(0).min(4096));
        loop {
            let seed = FieldSeed { field_type: element.base(), nullable: true, parent: &path, name: "", index: Some(values.len()) };
            let Some(value) = items.next_element_seed(seed)? else {
                break;
            };
            values.push(value);
        }
        Ok(Value::Array(values))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        let FieldType::Object(schema) = self.field_type else {
            return Err(self.mismatch("an object".to_string()));
        };
        ObjectSeed { schema, path: &self.path() }.visit_map(map).map(Value::Object)
    }
}

fn type_name(field_type: &FieldType) -> &'static str {
    match field_type {
        FieldType::String => "a string",
        FieldType::Long => "a whole number (long)",
        FieldType::Double => "a number (double)",
        FieldType::Boolean => "a boolean",
        FieldType::Timestamp => "epoch milliseconds (timestamp)",
        FieldType::Object(_) => "an object",
        FieldType::Array(_) => "an array",
        FieldType::Nullable(inner) => type_name(inner),
    }
}

fn kind(value: &Value) -> String {
    let shown = value.to_string();
    let shown = if shown.len() > 40 { format!("{}...", &shown[..shown.floor_char_boundary(40)]) } else { shown };
    let name = match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("{name} {shown}")
}

/// The bytes of a JSON object, in field order.
pub fn encode(fields: &Map<String, Value>) -> Vec<u8> {
    // Serializing a map of JSON values cannot fail.
    serde_json::to_vec(fields).unwrap_or_default()
}

/// Appends `text` as a JSON string, byte for byte as serde_json writes it: `\"`, `\\`, the
/// short escapes of backspace, form feed, newline, return and tab, `\u00xx` for the other
/// control characters, every other byte as it is. One pass with one reservation, where
/// serde_json's writer makes a call per run between escapes (the state keys made per record
/// are JSON objects: every other run ends at a quote).
pub fn write_string(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(text.len() + 2);
    out.push(b'"');
    for &byte in text.as_bytes() {
        let short = match byte {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x00..=0x1f => {
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xf)]]);
                continue;
            }
            _ => {
                out.push(byte);
                continue;
            }
        };
        out.extend_from_slice(&[b'\\', short]);
    }
    out.push(b'"');
}

/// Appends `text` as a JSON string, or `null` for none (as serde_json writes an
/// `Option<&str>`).
pub fn write_optional_string(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(text) => write_string(out, text),
        None => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Every string, control characters and non-ASCII text included, is written as
        /// serde_json writes it.
        #[test]
        fn strings_are_written_as_serde_json_writes_them(text in "(\\PC|[\\x00-\\x1f\"\\\\\x7f])*") {
            let mut written = b"[".to_vec();
            write_string(&mut written, &text);
            let expected = [b"[".to_vec(), serde_json::to_vec(&text).unwrap()].concat();
            proptest::prop_assert_eq!(written, expected);
        }
    }

    #[test]
    fn every_ascii_byte_is_written_as_serde_json_writes_it() {
        for byte in 0u8..0x80 {
            let text = format!("a{}b", byte as char);
            let mut written = Vec::new();
            write_string(&mut written, &text);
            assert_eq!(written, serde_json::to_vec(&text).unwrap(), "byte {byte:#x}");
        }
    }

    /// A double passes through weir bit for bit: serde_json's default parser can be one unit
    /// in the last place off (the bad-input properties found 2.0981483000393818e-272 read as
    /// ...815e-272); its `float_roundtrip` feature parses exactly.
    #[test]
    fn doubles_are_read_exactly() {
        for text in ["2.0981483000393818e-272", "1.7976931348623157e308", "5e-324", "0.1", "123456789.12345679"] {
            let amount = Schema { fields: vec![("amount".into(), FieldType::Double)] };
            let fields = decode(&amount, format!(r#"{{"amount":{text}}}"#).as_bytes()).unwrap();
            let expected: f64 = text.parse().unwrap();
            assert_eq!(fields["amount"].as_f64().map(f64::to_bits), Some(expected.to_bits()), "{text}");
        }
    }

    fn schema() -> Schema {
        Schema {
            fields: vec![
                ("id".into(), FieldType::String),
                ("amount".into(), FieldType::Double),
                ("count".into(), FieldType::Long),
                ("user".into(), FieldType::Object(Schema { fields: vec![("name".into(), FieldType::String)] })),
            ],
        }
    }

    #[test]
    fn lists_are_read_element_by_element() {
        let line = FieldType::Object(Schema { fields: vec![("sku".into(), FieldType::String), ("qty".into(), FieldType::Long)] });
        let lists = Schema {
            fields: vec![
                ("tags".into(), FieldType::Array(Box::new(FieldType::String))),
                ("lines".into(), FieldType::Array(Box::new(line))),
            ],
        };
        let fields = decode(&lists, br#"{"lines":[{"qty":1,"sku":"a","x":0},null],"tags":["x",null]}"#).unwrap();
        assert_eq!(Value::Object(fields).to_string(), r#"{"tags":["x",null],"lines":[{"sku":"a","qty":1},null]}"#);
        // Elements may be null; the list itself only where it is declared `tags?: [...]`.
        assert!(decode(&lists, br#"{"tags":null,"lines":[]}"#).unwrap_err().0.starts_with("field 'tags' is null; declare it nullable (`tags?: ...`)"));
        let mut nullable = lists.clone();
        nullable.fields[0].1 = nullable.fields[0].1.clone().nullable();
        assert_eq!(decode(&nullable, br#"{"tags":null,"lines":[]}"#).unwrap()["tags"], Value::Null);
        for (text, error) in [
            (r#"{"tags":"x","lines":[]}"#, "field 'tags': expected an array, found a string"),
            (r#"{"tags":[1],"lines":[]}"#, "field 'tags[0]': expected a string, found a number 1"),
            (r#"{"tags":[],"lines":[{"sku":"a","qty":1},{"sku":"b","qty":"2"}]}"#, "field 'lines[1].qty': expected a whole number (long), found a string \"2\""),
            (r#"{"tags":[],"lines":[{"sku":"a"}]}"#, "field 'lines[0].qty' is missing"),
            (r#"{"tags":[],"lines":{"sku":"a"}}"#, "field 'lines': expected an array, found an object"),
        ] {
            let found = decode(&lists, text.as_bytes()).unwrap_err().0;
            assert!(found.contains(error), "{text}: {found}");
        }
    }

    #[test]
    fn projects_declared_fields_in_schema_order() {
        let fields = decode(&schema(), br#"{"extra":1,"count":3,"amount":2,"id":"a","user":{"name":"x","age":4}}"#).unwrap();
        assert_eq!(String::from_utf8(encode(&fields)).unwrap(), r#"{"id":"a","amount":2.0,"count":3,"user":{"name":"x"}}"#);
    }

    #[test]
    fn only_nullable_fields_may_be_missing_or_null() {
        let error = decode(&schema(), br#"{"id":"a","count":1,"user":{"name":"x"}}"#).unwrap_err();
        assert!(error.0.starts_with("field 'amount' is missing; declare it nullable (`amount: double?`) if it may be absent"), "{error}");
        let error = decode(&schema(), br#"{"id":"a","amount":null,"count":1,"user":{"name":"x"}}"#).unwrap_err();
        assert!(error.0.starts_with("field 'amount' is null; declare it nullable (`amount: double?`) if it may be"), "{error}");
        let error = decode(&schema(), br#"{"id":"a","amount":1,"count":1,"user":{}}"#).unwrap_err();
        assert!(error.0.starts_with("field 'user.name' is missing"), "{error}");
        let error = decode(&schema(), br#"{"id":"a","amount":1,"count":1,"user":null}"#).unwrap_err();
        assert!(error.0.starts_with("field 'user' is null; declare it nullable (`user?: ...`) if it may be"), "{error}");
        let mut nullable = schema();
        for (_, field_type) in &mut nullable.fields {
            *field_type = field_type.clone().nullable();
        }
        let fields = decode(&nullable, br#"{"id":"a","count":null}"#).unwrap();
        assert_eq!(Value::Object(fields).to_string(), r#"{"id":"a","amount":null,"count":null,"user":null}"#);
    }

    #[test]
    fn wrong_types_are_errors_naming_the_field() {
        let error = decode(&schema(), br#"{"id":"a","count":1.5}"#).unwrap_err();
        assert!(error.0.contains("field 'count'"), "{error}");
        let error = decode(&schema(), br#"{"user":{"name":7}}"#).unwrap_err();
        assert!(error.0.contains("field 'user.name'"), "{error}");
        assert!(decode(&schema(), b"[1]").unwrap_err().0.contains("expected a JSON object"));
        assert!(decode(&schema(), b"{not json").unwrap_err().0.contains("not valid JSON"));
        assert!(decode(&schema(), br#"{"id":"a"} trailing"#).is_err());
        let error = decode(&schema(), br#"{"user":"x"}"#).unwrap_err();
        assert!(error.0.contains("field 'user': expected an object"), "{error}");
    }
}

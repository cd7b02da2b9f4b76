//! A fast reader for JSON values that are already in weir's own output form: the declared
//! fields, each once, in schema order, compact, as [`super::json::encode`] writes them. Most
//! producers write records that way (one serializer, one field order, no spaces), and for
//! those the full decoder's work (serde's visitors, a hash per field, then the encoding
//! of the result) can be replaced by one pass over the bytes: the fields are read in place
//! and, where no step changes the record, the input bytes are the output value.
//!
//! The reader only ever answers "these bytes are exactly the encoding of these fields" or
//! "don't know": anything else (whitespace, another order, an undeclared field, an escape in a
//! string, `42` for a double, a nested object, bad bytes) is left to the full decoder, which
//! reads it or says what is wrong. So it never produces an error of its own, and for every
//! input it accepts, [`super::json::decode`] gives the same fields and
//! [`super::json::encode`] gives the same bytes back (the property test below checks both).

use serde_json::{Map, Value};

use crate::config::{FieldType, Schema};

/// Reads the canonical form of one flat schema.
#[derive(Debug, Clone)]
pub struct CanonicalReader {
    fields: Vec<FieldForm>,
    /// The fields kept, each with a null value: cloned per record (an index map's clone
    /// copies its hash table, so the field names are not hashed again), then filled in.
    template: Map<String, Value>,
}

#[derive(Debug, Clone)]
struct FieldForm {
    /// What precedes the value: `{"name":` for the first field, `,"name":` for the others.
    prefix: Vec<u8>,
    kind: Kind,
    nullable: bool,
    /// The value is kept in the fields read (see [`CanonicalReader::keeping_only`]); else it
    /// is checked and left.
    kept: bool,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    String,
    /// Long and timestamp: a whole number in i64.
    Long,
    Double,
    Boolean,
}

impl CanonicalReader {
    /// None when the schema has a field this reader does not handle (objects, lists): such
    /// records always take the full decoder.
    pub fn new(schema: &Schema) -> Option<CanonicalReader> {
        let mut fields = Vec::with_capacity(schema.fields.len());
        let mut template = Map::with_capacity(schema.fields.len());
        for (index, (name, field_type)) in schema.fields.iter().enumerate() {
            let kind = match field_type.base() {
                FieldType::String => Kind::String,
                FieldType::Long | FieldType::Timestamp => Kind::Long,
                FieldType::Double => Kind::Double,
                FieldType::Boolean => Kind::Boolean,
                FieldType::Object(_) | FieldType::Array(_) | FieldType::Nullable(_) => return None,
            };
            let mut prefix = vec![if index == 0 { b'{' } else { b',' }];
            prefix.extend(serde_json::to_vec(name).ok()?);
            prefix.push(b':');
            fields.push(FieldForm { prefix, kind, nullable: field_type.is_nullable(), kept: true });
            template.insert(name.clone(), Value::Null);
        }
        Some(CanonicalReader { fields, template })
    }

    /// The same reader keeping only the fields named in `wanted` in what it reads: the others
    /// are still checked (the bytes must be the encoding of every declared field), not kept.
    /// For a pipeline whose records are written as read and whose steps read a few fields.
    pub fn keeping_only(&self, wanted: &[String]) -> CanonicalReader {
        let mut fields = self.fields.clone();
        let mut template = Map::new();
        for (form, name) in fields.iter_mut().zip(self.template.keys()) {
            form.kept = wanted.contains(name);
            if form.kept {
                template.insert(name.clone(), Value::Null);
            }
        }
        CanonicalReader { fields, template }
    }

    /// Whether every declared field is kept in what it reads.
    pub fn keeps_all(&self) -> bool {
        self.fields.iter().all(|form| form.kept)
    }

    /// The fields of `bytes` (those kept) when the bytes are exactly the encoding of every
    /// declared field; None when they may not be (the full decoder then reads them).
    pub fn read(&self, bytes: &[u8]) -> Option<Map<String, Value>> {
        self.read_into(bytes, None)
    }

    /// [`Self::read`] into `spare`, an earlier record's fields, where it holds the fields this
    /// reader keeps, in its order (its values are all replaced): the field names and the map's
    /// tables are not made again for every record. Any other map is dropped.
    pub fn read_into(&self, bytes: &[u8], spare: Option<Map<String, Value>>) -> Option<Map<String, Value>> {
        let mut fields = match spare {
            Some(spare) if spare.len() == self.template.len() && spare.keys().eq(self.template.keys()) => spare,
            _ => self.template.clone(),
        };
        let mut slots = fields.values_mut();
        let mut at = 0;
        for form in &self.fields {
            if !bytes[at..].starts_with(&form.prefix) {
                return None;
            }
            at += form.prefix.len();
            let rest = &bytes[at..];
            let (value, length) = if rest.starts_with(b"null") {
                if !form.nullable {
                    return None;
                }
                (Value::Null, 4)
            } else {
                match form.kind {
                    Kind::String if !form.kept => (Value::Null, checked_string(rest)?),
                    Kind::String => read_string(rest)?,
                    Kind::Long => read_long(rest)?,
                    Kind::Double => read_double(rest)?,
                    Kind::Boolean if rest.starts_with(b"true") => (Value::Bool(true), 4),
                    Kind::Boolean if rest.starts_with(b"false") => (Value::Bool(false), 5),
                    Kind::Boolean => return None,
                }
            };
            if form.kept
                && let Some(slot) = slots.next()
            {
                *slot = value;
            }
            at += length;
        }
        let end: &[u8] = if self.fields.is_empty() { b"{}" } else { b"}" };
        (&bytes[at..] == end).then_some(fields)
    }
}

/// A string without escapes or control characters, in valid UTF-8: its text and length with
/// the quotes. serde_json writes such text as it is.
fn read_string(rest: &[u8]) -> Option<(Value, usize)> {
    let (body, _) = string_body(rest)?;
    let text = std::str::from_utf8(body).ok()?;
    Some((Value::String(text.to_owned()), body.len() + 2))
}

/// The length of such a string with its quotes, without keeping its text.
fn checked_string(rest: &[u8]) -> Option<usize> {
    let (body, ascii) = string_body(rest)?;
    (ascii || std::str::from_utf8(body).is_ok()).then_some(body.len() + 2)
}

/// The bytes between the quotes, in one pass: an escape or a control character ends it
/// ("don't know"). Also whether every byte is ASCII (then it is UTF-8 without a check).
fn string_body(rest: &[u8]) -> Option<(&[u8], bool)> {
    let body = rest.strip_prefix(b"\"")?;
    let mut seen = 0u8;
    for (end, &byte) in body.iter().enumerate() {
        if byte == b'"' {
            return Some((&body[..end], seen < 0x80));
        }
        if byte == b'\\' || byte < 0x20 {
            return None;
        }
        seen |= byte;
    }
    None
}

/// A whole number as serde_json writes an i64: an optional minus, no leading zeros, not -0.
/// Read digit by digit; out of the i64 range is left to the full decoder.
fn read_long(rest: &[u8]) -> Option<(Value, usize)> {
    let negative = rest.first() == Some(&b'-');
    let digits = &rest[usize::from(negative)..];
    let count = digits.iter().take_while(|byte| byte.is_ascii_digit()).count();
    if count == 0 || (count > 1 && digits[0] == b'0') || (negative && digits[..count] == *b"0") {
        return None;
    }
    // Accumulated on the negative side, which holds i64::MIN.
    let mut number: i64 = 0;
    for &digit in &digits[..count] {
        number = number.checked_mul(10)?.checked_sub(i64::from(digit - b'0'))?;
    }
    let number = if negative { number } else { number.checked_neg()? };
    Some((Value::from(number), usize::from(negative) + count))
}

/// A number as serde_json writes an f64 (its shortest text that reads back as it): anything
/// else (`42` for 42.0, `1e5`, `0.50`) may read as the same double but would not be written
/// back as it was.
fn read_double(rest: &[u8]) -> Option<(Value, usize)> {
    let length = rest.iter().take_while(|byte| matches!(byte, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')).count();
    let token = &rest[..length];
    let number: f64 = std::str::from_utf8(token).ok()?.parse().ok()?;
    if !number.is_finite() {
        return None;
    }
    // The encoder's own text for it, written into the stack (the longest is 24 bytes).
    let mut written = [0u8; 32];
    let mut cursor = &mut written[..];
    serde_json::to_writer(&mut cursor, &number).ok()?;
    let unused = cursor.len();
    (&written[..written.len() - unused] == token).then(|| (Value::from(number), length))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::json;

    fn schema(types: &[FieldType]) -> Schema {
        Schema { fields: types.iter().enumerate().map(|(index, field_type)| (format!("f{index}"), field_type.clone())).collect() }
    }

    fn field_type() -> impl Strategy<Value = FieldType> {
        let base = prop_oneof![Just(FieldType::String), Just(FieldType::Long), Just(FieldType::Double), Just(FieldType::Boolean), Just(FieldType::Timestamp)];
        (base, any::<bool>()).prop_map(|(base, nullable)| if nullable { base.nullable() } else { base })
    }

    /// A value's text, often canonical, often not: escapes, spaces, other number forms,
    /// values of another type, nulls.
    fn value_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|number| number.to_string()),
            (-1000i64..1000).prop_map(|number| number.to_string()),
            any::<f64>().prop_map(|number| serde_json::to_string(&number).unwrap_or_else(|_| "1.5".into())),
            prop_oneof![Just("0.1"), Just("42"), Just("42.0"), Just("-0"), Just("-0.0"), Just("007"), Just("1e5"), Just("1E5"), Just("0.50"),
                Just("1.5e300"), Just("18446744073709551616"), Just("9223372036854775808"), Just("-9223372036854775808"), Just("true"),
                Just("false"), Just("null"), Just("nul"), Just("\"\""), Just("\"a\\\"b\""), Just("\"\\u00e9\""), Just("\"é\""),
                Just("\"tab\there\""), Just("[1]"), Just("{}"), Just(" 1"), Just("+1"), Just(".5"), Just("1."), Just("inf"), Just("NaN")]
            .prop_map(String::from),
            "[a-z/ ]{0,6}".prop_map(|text| format!("\"{text}\"")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Whatever the reader accepts, the full decoder reads as the same fields, and
        /// encoding them gives the input back byte for byte.
        #[test]
        fn what_it_reads_is_what_decode_reads_and_encode_writes(
            types in prop::collection::vec(field_type(), 0..5),
            texts in prop::collection::vec(value_text(), 5),
            drop_one in any::<Option<prop::sample::Index>>(),
            extra in any::<bool>(),
            kept in prop::collection::vec(any::<bool>(), 5),
        ) {
            let schema = schema(&types);
            let mut parts: Vec<String> = types.iter().enumerate().map(|(index, _)| format!("\"f{index}\":{}", texts[index])).collect();
            if let (Some(index), false) = (drop_one, parts.is_empty()) {
                parts.remove(index.index(parts.len()));
            }
            if extra {
                parts.push("\"other\":1".into());
            }
            let bytes = format!("{{{}}}", parts.join(",")).into_bytes();
            let reader = CanonicalReader::new(&schema).unwrap();
            if let Some(fields) = reader.read(&bytes) {
                prop_assert_eq!(json::decode(&schema, &bytes), Ok(fields.clone()));
                prop_assert_eq!(&json::encode(&fields), &bytes);
            }
            // Keeping some fields accepts the same inputs and reads those fields alike.
            let wanted: Vec<String> = (0..types.len()).filter(|&index| kept[index]).map(|index| format!("f{index}")).collect();
            let partial = reader.keeping_only(&wanted).read(&bytes);
            let mut expected = reader.read(&bytes);
            if let Some(fields) = &mut expected {
                fields.retain(|name, _| wanted.contains(name));
            }
            prop_assert_eq!(&partial, &expected);
            // Read into an earlier record's fields (every value another), or into a map of
            // other fields: the same fields either way.
            let earlier = |names: &[String]| -> Map<String, Value> { names.iter().map(|name| (name.clone(), Value::from("earlier"))).collect() };
            let all: Vec<String> = schema.fields.iter().map(|(name, _)| name.clone()).collect();
            prop_assert_eq!(reader.read_into(&bytes, Some(earlier(&all))), reader.read(&bytes));
            prop_assert_eq!(reader.read_into(&bytes, Some(earlier(&["other".to_string()]))), reader.read(&bytes));
            prop_assert_eq!(reader.keeping_only(&wanted).read_into(&bytes, Some(earlier(&wanted))), partial.clone());
            prop_assert_eq!(reader.keeping_only(&wanted).read_into(&bytes, Some(earlier(&all))), partial);
            // And what the encoder writes, the reader reads, unless a string needed an escape.
            if let Ok(decoded) = json::decode(&schema, &bytes) {
                let canonical = json::encode(&decoded);
                if !canonical.contains(&b'\\') {
                    prop_assert_eq!(reader.read(&canonical), Some(decoded));
                }
            }
        }
    }

    #[test]
    fn reads_the_encoders_form_and_nothing_else() {
        let schema = schema(&[FieldType::Long, FieldType::String, FieldType::Double, FieldType::Boolean.nullable(), FieldType::Timestamp]);
        let reader = CanonicalReader::new(&schema).unwrap();
        let fields = reader.read(r#"{"f0":-12,"f1":"a/b é","f2":0.5,"f3":null,"f4":1700000000000}"#.as_bytes()).unwrap();
        assert_eq!(Value::Object(fields).to_string(), r#"{"f0":-12,"f1":"a/b é","f2":0.5,"f3":null,"f4":1700000000000}"#);
        for other in [
            r#"{"f0":-12,"f1":"a","f2":0.5,"f3":null,"f4":1} "#,
            r#"{"f0": -12,"f1":"a","f2":0.5,"f3":null,"f4":1}"#,
            r#"{"f1":"a","f0":-12,"f2":0.5,"f3":null,"f4":1}"#,
            r#"{"f0":-12,"f1":"a","f2":0.5,"f4":1}"#,
            r#"{"f0":-12,"f1":"a\/b","f2":0.5,"f3":null,"f4":1}"#,
            r#"{"f0":-12,"f1":"a","f2":1,"f3":null,"f4":1}"#,
            r#"{"f0":012,"f1":"a","f2":0.5,"f3":null,"f4":1}"#,
            r#"{"f0":-0,"f1":"a","f2":0.5,"f3":null,"f4":1}"#,
            r#"{"f0":-12,"f1":"a","f2":5e-1,"f3":null,"f4":1}"#,
            r#"{"f0":-12,"f1":"a","f2":0.5,"f3":true,"f4":1.0}"#,
            r#"{"f0":-12,"f1":"a","f2":0.5,"f3":null,"f4":9223372036854775808}"#,
            r#"{"f0":-12,"f1":"a","f2":0.5,"f3":null,"f4":1,"x":1}"#,
            r#"{"f0":null,"f1":"a","f2":0.5,"f3":null,"f4":1}"#,
        ] {
            assert_eq!(reader.read(other.as_bytes()), None, "{other}");
        }
        // Bytes that are not UTF-8, in a string that is kept and in one that is only checked:
        // the full decoder says what is wrong with them.
        let strings = Schema { fields: vec![("f0".into(), FieldType::String), ("f1".into(), FieldType::String)] };
        for (kept, bytes) in [(true, &b"{\"f0\":\"a\xff\",\"f1\":\"b\"}"[..]), (false, &b"{\"f0\":\"a\",\"f1\":\"\xc3(\"}"[..])] {
            let reader = CanonicalReader::new(&strings).unwrap();
            let reader = if kept { reader } else { reader.keeping_only(&["f0".to_string()]) };
            assert_eq!(reader.read(bytes), None, "{}", String::from_utf8_lossy(bytes));
            assert!(json::decode(&strings, bytes).is_err());
        }
        let nested = Schema { fields: vec![("o".into(), FieldType::Object(Schema { fields: vec![] }))] };
        assert!(CanonicalReader::new(&nested).is_none(), "objects take the full decoder");
    }
}

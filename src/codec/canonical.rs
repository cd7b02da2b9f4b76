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
    /// The prefix as the first bytes of a 16-byte word and the mask of those bytes, where it
    /// fits: two ANDs and a compare instead of a call to `memcmp` per field.
    word: Option<(u128, u128)>,
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
            let word = prefix_word(&prefix);
            fields.push(FieldForm { prefix, word, kind, nullable: field_type.is_nullable(), kept: true });
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
        let mut rest = bytes;
        for form in &self.fields {
            rest = form.after_prefix(rest)?;
            let length = if form.kept {
                let (value, length) = form.read_value(rest)?;
                if let Some(slot) = slots.next() {
                    *slot = value;
                }
                length
            } else {
                form.value_length(rest)?
            };
            rest = rest.get(length..)?;
        }
        let end: &[u8] = if self.fields.is_empty() { b"{}" } else { b"}" };
        (rest == end).then_some(fields)
    }
}

impl FieldForm {
    /// The bytes after this field's prefix, if they start with it.
    fn after_prefix<'b>(&self, rest: &'b [u8]) -> Option<&'b [u8]> {
        let starts = match (self.word, rest.get(..16)) {
            (Some((word, mask)), Some(head)) => head.try_into().is_ok_and(|head| u128::from_le_bytes(head) & mask == word),
            _ => rest.starts_with(&self.prefix),
        };
        starts.then(|| &rest[self.prefix.len()..])
    }

    /// The value at the start of `rest`, and its length, when it is in canonical form.
    fn read_value(&self, rest: &[u8]) -> Option<(Value, usize)> {
        if rest.first() == Some(&b'n') {
            return (self.nullable && rest.starts_with(b"null")).then_some((Value::Null, 4));
        }
        match self.kind {
            Kind::String => read_string(rest),
            Kind::Long => {
                let length = long_length(rest)?;
                Some((Value::from(long_of(&rest[..length])?), length))
            }
            Kind::Double => read_double(rest),
            Kind::Boolean => boolean_length(rest).map(|length| (Value::Bool(length == 4), length)),
        }
    }

    /// The length of the value at the start of `rest` when it is in canonical form, checked
    /// as [`Self::read_value`] checks it, without making it.
    fn value_length(&self, rest: &[u8]) -> Option<usize> {
        if rest.first() == Some(&b'n') {
            return (self.nullable && rest.starts_with(b"null")).then_some(4);
        }
        match self.kind {
            Kind::String => checked_string(rest),
            Kind::Long => long_length(rest),
            Kind::Double => read_double(rest).map(|(_, length)| length),
            Kind::Boolean => boolean_length(rest),
        }
    }
}

/// A prefix of at most 16 bytes as a little-endian word (unused bytes zero) and its mask.
fn prefix_word(prefix: &[u8]) -> Option<(u128, u128)> {
    if prefix.len() > 16 {
        return None;
    }
    let mut bytes = [0u8; 16];
    bytes[..prefix.len()].copy_from_slice(prefix);
    let mask = if prefix.len() == 16 { u128::MAX } else { (1u128 << (8 * prefix.len())) - 1 };
    Some((u128::from_le_bytes(bytes), mask))
}

fn boolean_length(rest: &[u8]) -> Option<usize> {
    if rest.starts_with(b"true") {
        Some(4)
    } else if rest.starts_with(b"false") {
        Some(5)
    } else {
        None
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

/// Every byte of a word set to `byte`.
const fn splat(byte: u8) -> u64 {
    u64::from_le_bytes([byte; 8])
}

/// The bytes of a word below `limit` (at most 0x80), flagged by their high bit: the lowest
/// flag is exact (the classic "has less" bit trick; a borrow can only flag bytes above a
/// true one), which is all the scans below use.
const fn bytes_below(word: u64, limit: u8) -> u64 {
    word.wrapping_sub(splat(limit)) & !word & splat(0x80)
}

/// The bytes of a word above `limit` (below 0x80), flagged as in [`bytes_below`] (a carry can
/// only flag bytes above a true one).
const fn bytes_above(word: u64, limit: u8) -> u64 {
    (word.wrapping_add(splat(0x7f - limit)) | word) & splat(0x80)
}

/// The place in its word of the lowest flagged byte (8: none).
const fn first_flagged(flags: u64) -> usize {
    (flags.trailing_zeros() / 8) as usize
}

/// The bytes between the quotes: an escape or a control character ends it ("don't know").
/// Also whether every byte is ASCII (then it is UTF-8 without a check). Eight bytes at a
/// time, where eight are left; then byte by byte.
fn string_body(rest: &[u8]) -> Option<(&[u8], bool)> {
    let body = rest.strip_prefix(b"\"")?;
    let mut high = 0u64;
    let mut at = 0;
    while let Some(Ok(chunk)) = body.get(at..at + 8).map(<[u8; 8]>::try_from) {
        let word = u64::from_le_bytes(chunk);
        let quote = first_flagged(bytes_below(word ^ splat(b'"'), 1));
        let refused = first_flagged(bytes_below(word ^ splat(b'\\'), 1) | bytes_below(word, 0x20));
        if quote < refused {
            // The bytes before the quote (none: a shift by 64 is no mask).
            high |= word & u64::MAX.checked_shr(64 - 8 * quote as u32).unwrap_or(0);
            return Some((&body[..at + quote], high & splat(0x80) == 0));
        }
        if refused < 8 {
            return None;
        }
        high |= word;
        at += 8;
    }
    let mut seen = 0u8;
    for (offset, &byte) in body[at..].iter().enumerate() {
        if byte == b'"' {
            let ascii = seen < 0x80 && high & splat(0x80) == 0;
            return Some((&body[..at + offset], ascii));
        }
        if byte == b'\\' || byte < 0x20 {
            return None;
        }
        seen |= byte;
    }
    None
}

/// How many ASCII digits `bytes` starts with: eight at a time, where eight are left.
fn leading_digits(bytes: &[u8]) -> usize {
    let mut count = 0;
    while let Some(Ok(chunk)) = bytes.get(count..count + 8).map(<[u8; 8]>::try_from) {
        let word = u64::from_le_bytes(chunk);
        let first = first_flagged(bytes_below(word, b'0') | bytes_above(word, b'9'));
        count += first;
        if first < 8 {
            return count;
        }
    }
    count + bytes[count..].iter().take_while(|byte| byte.is_ascii_digit()).count()
}

/// The length of a whole number as serde_json writes an i64: an optional minus, no leading
/// zeros, not -0, within the i64 range (checked on the digits, without reading the number).
fn long_length(rest: &[u8]) -> Option<usize> {
    let negative = rest.first() == Some(&b'-');
    let digits = &rest[usize::from(negative)..];
    let count = leading_digits(digits);
    let number = &digits[..count];
    let canonical = match count {
        0 => false,
        1 => !(negative && number[0] == b'0'),
        2..=18 => number[0] != b'0',
        // Equal-length digit strings compare as their numbers do.
        19 => number[0] != b'0' && number <= (if negative { &b"9223372036854775808"[..] } else { &b"9223372036854775807"[..] }),
        _ => false,
    };
    canonical.then_some(usize::from(negative) + count)
}

/// The number of a text [`long_length`] accepted.
fn long_of(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', digits)) => (true, digits),
        _ => (false, text),
    };
    // Accumulated on the negative side, which holds i64::MIN.
    let mut number: i64 = 0;
    for &digit in digits {
        number = number.checked_mul(10)?.checked_sub(i64::from(digit - b'0'))?;
    }
    if negative { Some(number) } else { number.checked_neg() }
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

    /// The byte-by-byte scan the word-wise one must agree with.
    fn string_body_bytewise(rest: &[u8]) -> Option<(&[u8], bool)> {
        let body = rest.strip_prefix(b"\"")?;
        let end = body.iter().position(|&byte| byte == b'"')?;
        let text = &body[..end];
        (!text.iter().any(|&byte| byte == b'\\' || byte < 0x20)).then_some((text, text.is_ascii()))
    }

    /// Every length around the 8-byte words, with each kind of byte at each place: the
    /// word-wise scan ends, refuses and sees non-ASCII where the byte-wise one does.
    #[test]
    fn the_word_wise_string_scan_agrees_with_a_byte_wise_one() {
        let specials: [&[u8]; 9] = [b"\"", b"\\", b"\x00", b"\x1f", b"\x7f", b" ", "é".as_bytes(), b"\xff", b"\x80"];
        for length in 0..40 {
            let plain: Vec<u8> = (0..length).map(|index| b'a' + (index % 26) as u8).collect();
            for at in 0..=length {
                for special in specials {
                    let mut text = b"\"".to_vec();
                    text.extend_from_slice(&plain[..at]);
                    text.extend_from_slice(special);
                    text.extend_from_slice(&plain[at..]);
                    text.extend_from_slice(b"\",\"next\":1}");
                    assert_eq!(string_body(&text), string_body_bytewise(&text), "{}", String::from_utf8_lossy(&text));
                }
            }
        }
    }

    /// The word-wise digit count against a byte-wise one, with each kind of byte after
    /// the digits, around the 8-byte words.
    #[test]
    fn the_word_wise_digit_count_agrees_with_a_byte_wise_one() {
        for length in 0..30 {
            for after in [b'/', b':', b'0' - 1, b'9' + 1, b',', b'}', 0x00, 0x7f, 0x80, 0xba, 0xff] {
                let mut text: Vec<u8> = (0..length).map(|index| b'0' + (index % 10) as u8).collect();
                text.push(after);
                text.extend_from_slice(b"123,\"x\":1}");
                let bytewise = text.iter().take_while(|byte| byte.is_ascii_digit()).count();
                assert_eq!(leading_digits(&text), bytewise, "{}", String::from_utf8_lossy(&text));
            }
            let digits: Vec<u8> = (0..length).map(|index| b'1' + (index % 9) as u8).collect();
            assert_eq!(leading_digits(&digits), length);
        }
    }

    #[test]
    fn long_digits_are_checked_at_the_edges_of_the_range() {
        for (text, canonical) in [
            ("9223372036854775807", true),
            ("9223372036854775808", false),
            ("-9223372036854775808", true),
            ("-9223372036854775809", false),
            ("10000000000000000000", false),
            ("999999999999999999", true),
            ("-999999999999999999", true),
            ("1000000000000000000", true),
            ("0", true),
            ("-0", false),
            ("01", false),
            ("-01", false),
            ("-", false),
            ("", false),
        ] {
            let with_end = format!("{text}}}");
            let length = long_length(with_end.as_bytes());
            assert_eq!(length.is_some(), canonical, "{text}");
            if let Some(length) = length {
                assert_eq!(length, text.len(), "{text}");
                assert_eq!(long_of(text.as_bytes()), text.parse::<i64>().ok(), "{text}");
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

//! Avro in the Confluent wire format: a zero magic byte, the writer schema's id in the schema
//! registry (4 bytes, big-endian), then the Avro binary datum.
//!
//! Reading: each record is decoded with its writer's schema (fetched from the registry by the
//! runtime before the record is processed, see [`WriterSchemas`]), then resolved against the
//! reader schema the source's `schema` declares. Every declared field is optional, as for
//! JSON: Avro's resolution rules with a null default for each reader field. So a writer that
//! added fields is read by an older pipeline (the new fields are ignored), a writer without
//! a declared field reads it as null, and int, long, float and double widen as Avro allows.
//!
//! Writing: the sink's schema is derived from the pipeline's output fields, every field a
//! union with null (default null), registered under `<topic>-value` at start.

use std::sync::Arc;

use apache_avro::types::Value as AvroValue;
use serde_json::{Map, Number, Value};
use tracing::warn;

use super::DecodeError;
use crate::config::{FieldType, Schema};

mod depth;
mod encoder;
mod writer_schemas;

pub use encoder::{avro_name, AvroEncoder};
pub use writer_schemas::{NoWriterSchema, WriterSchema, WriterSchemas};

const MAGIC: u8 = 0;

/// The most apache-avro may reserve for one length it reads from a datum: a string's or
/// bytes' length in bytes, or an array's or map's item count. Its default (512 MiB, counted in
/// items for arrays and maps, while each item takes 40 bytes or more) lets a 10-byte record
/// claiming 500M map entries ask for tens of GiB, and an allocation failure aborts the
/// process, which no `catch_unwind` contains. 16 MiB is far above what a record can hold (1
/// MiB by default on a topic, rarely raised past 10 MiB), so no honest record is refused,
/// and a lie about a length is a decode error (a DLQ record) that reserves little.
pub const MAX_DECODE_ALLOCATION: usize = 16 * 1024 * 1024;

/// Sets apache-avro's allocation limit, process-wide, to [`MAX_DECODE_ALLOCATION`]; returns the
/// limit in force. apache-avro keeps the first value it is given (a `OnceLock`), and its first
/// decode sets its default, so this must run before any datum is decoded: every decoder is
/// built through [`AvroDecoder::new`], which calls it.
pub fn limit_decode_allocations() -> usize {
    apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION)
}

/// The registry id a record's bytes name; None when they are not in the wire format.
pub fn schema_id(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Reads Avro records of one source into its declared fields.
#[derive(Debug, Clone)]
pub struct AvroDecoder {
    schema: Schema,
    writers: Arc<WriterSchemas>,
}

impl AvroDecoder {
    pub fn new(schema: Schema, writers: Arc<WriterSchemas>) -> AvroDecoder {
        let limit = limit_decode_allocations();
        if limit != MAX_DECODE_ALLOCATION {
            warn!(limit, wanted = MAX_DECODE_ALLOCATION, "apache-avro's allocation limit was set before weir's; a record lying about a length may exhaust memory");
        }
        AvroDecoder { schema, writers }
    }

    pub fn writers(&self) -> &Arc<WriterSchemas> {
        &self.writers
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<Map<String, Value>, DecodeError> {
        let Some(id) = schema_id(bytes) else {
            return Err(DecodeError(format!(
                "not in the Confluent Avro wire format: expected a zero magic byte and a 4-byte schema id, found {} byte(s) starting {:02x?}",
                bytes.len(),
                &bytes[..bytes.len().min(5)]
            )));
        };
        let (writer, recursive) = match self.writers.get(id) {
            Some((Ok(writer), recursive)) => (writer, recursive),
            Some((Err(error), _)) => return Err(DecodeError(format!("writer schema id {id}: {error}"))),
            None => return Err(DecodeError(format!("writer schema id {id} was not fetched from the schema registry"))),
        };
        let mut datum = &bytes[5..];
        if let Some(names) = recursive {
            depth::check_depth(&writer, &names, datum, depth::MAX_DEPTH)
                .map_err(|error| DecodeError(format!("not an Avro datum of writer schema id {id}: {error}")))?;
        }
        let value = apache_avro::from_avro_datum(&writer, &mut datum, None)
            .map_err(|error| DecodeError(format!("not an Avro datum of writer schema id {id}: {error}")))?;
        if !datum.is_empty() {
            return Err(DecodeError(format!("{} byte(s) left after the Avro datum of writer schema id {id}", datum.len())));
        }
        resolve_record(&self.schema, value, "")
    }
}

/// Resolves a writer's record against the reader fields `schema`, by field name.
fn resolve_record(schema: &Schema, value: AvroValue, path: &str) -> Result<Map<String, Value>, DecodeError> {
    let mut written = match value {
        AvroValue::Record(fields) => fields,
        AvroValue::Union(_, inner) => return resolve_record(schema, *inner, path),
        other => {
            let what = if path.is_empty() { "the record".to_string() } else { format!("field '{path}'") };
            return Err(DecodeError(format!("{what}: expected an Avro record, found {}", kind(&other))));
        }
    };
    let mut fields = Map::with_capacity(schema.fields.len());
    for (name, field_type) in &schema.fields {
        let field_path = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
        let value = match written.iter().position(|(written_name, _)| written_name == name) {
            Some(position) => resolve_value(field_type, written.swap_remove(position).1, &field_path)?,
            // The reader's default for a nullable field; the others must be written.
            None if field_type.is_nullable() => Value::Null,
            None => {
                return Err(DecodeError(format!(
                    "field '{field_path}' is not in the writer's schema; {} if it may be absent",
                    crate::config::nullable_hint(name, field_type)
                )));
            }
        };
        fields.insert(name.clone(), value);
    }
    Ok(fields)
}

fn resolve_value(field_type: &FieldType, value: AvroValue, path: &str) -> Result<Value, DecodeError> {
    let mismatch = |value: &AvroValue| {
        DecodeError(format!("field '{path}': the writer has {}, which does not resolve to {}", kind(value), type_name(field_type)))
    };
    let value = match value {
        AvroValue::Union(_, inner) => *inner,
        value => value,
    };
    if value == AvroValue::Null {
        return match field_type.is_nullable() {
            true => Ok(Value::Null),
            false => Err(DecodeError(crate::config::null_refused(path, field_type))),
        };
    }
    let field_type = field_type.base();
    Ok(match field_type {
        FieldType::String => match value {
            AvroValue::String(text) | AvroValue::Enum(_, text) => Value::String(text),
            AvroValue::Uuid(uuid) => Value::String(uuid.to_string()),
            // Avro resolves bytes to string.
            AvroValue::Bytes(bytes) => Value::String(String::from_utf8(bytes).map_err(|_| {
                DecodeError(format!("field '{path}': the writer's bytes are not UTF-8 text"))
            })?),
            other => return Err(mismatch(&other)),
        },
        // A plain long reader gets a logical type's underlying number, as Avro resolves it.
        FieldType::Long => match value {
            AvroValue::Int(number) | AvroValue::Date(number) | AvroValue::TimeMillis(number) => Value::from(number),
            AvroValue::Long(number)
            | AvroValue::TimeMicros(number)
            | AvroValue::TimestampMillis(number)
            | AvroValue::TimestampMicros(number)
            | AvroValue::TimestampNanos(number)
            | AvroValue::LocalTimestampMillis(number)
            | AvroValue::LocalTimestampMicros(number)
            | AvroValue::LocalTimestampNanos(number) => Value::from(number),
            other => return Err(mismatch(&other)),
        },
        FieldType::Timestamp => match value {
            AvroValue::Int(number) => Value::from(number),
            AvroValue::Long(number) => Value::from(number),
            other => match epoch_millis(&other) {
                Some(millis) => Value::from(millis),
                None => return Err(mismatch(&other)),
            },
        },
        FieldType::Double => {
            let number = match value {
                AvroValue::Int(number) => f64::from(number),
                AvroValue::Long(number) => number as f64,
                AvroValue::Float(number) => f64::from(number),
                AvroValue::Double(number) => number,
                other => return Err(mismatch(&other)),
            };
            Value::Number(Number::from_f64(number).ok_or_else(|| {
                DecodeError(format!("field '{path}': {number} has no JSON representation"))
            })?)
        }
        FieldType::Boolean => match value {
            AvroValue::Boolean(flag) => Value::Bool(flag),
            other => return Err(mismatch(&other)),
        },
        FieldType::Object(inner) => Value::Object(resolve_record(inner, value, path)?),
        FieldType::Array(element) => match value {
            // A list's elements may be null.
            AvroValue::Array(items) => {
                let element = (**element).clone().nullable();
                Value::Array(
                    items
                        .into_iter()
                        .enumerate()
                        .map(|(index, item)| resolve_value(&element, item, &format!("{path}[{index}]")))
                        .collect::<Result<_, _>>()?,
                )
            }
            other => return Err(mismatch(&other)),
        },
        FieldType::Nullable(inner) => return resolve_value(inner, value, path),
    })
}

/// A timestamp logical type in epoch milliseconds (days for a date).
fn epoch_millis(value: &AvroValue) -> Option<i64> {
    match value {
        AvroValue::TimestampMillis(millis) | AvroValue::LocalTimestampMillis(millis) => Some(*millis),
        AvroValue::TimestampMicros(micros) | AvroValue::LocalTimestampMicros(micros) => Some(micros.div_euclid(1000)),
        AvroValue::TimestampNanos(nanos) | AvroValue::LocalTimestampNanos(nanos) => Some(nanos.div_euclid(1_000_000)),
        AvroValue::Date(days) => Some(i64::from(*days) * 86_400_000),
        _ => None,
    }
}

fn kind(value: &AvroValue) -> &'static str {
    match value {
        AvroValue::Null => "null",
        AvroValue::Boolean(_) => "a boolean",
        AvroValue::Int(_) => "an int",
        AvroValue::Long(_) => "a long",
        AvroValue::Float(_) => "a float",
        AvroValue::Double(_) => "a double",
        AvroValue::Bytes(_) | AvroValue::Fixed(..) => "bytes",
        AvroValue::String(_) => "a string",
        AvroValue::Enum(..) => "an enum",
        AvroValue::Union(..) => "a union",
        AvroValue::Array(_) => "an array",
        AvroValue::Map(_) => "a map",
        AvroValue::Record(_) => "a record",
        AvroValue::Decimal(_) | AvroValue::BigDecimal(_) => "a decimal",
        AvroValue::Uuid(_) => "a uuid",
        _ => "a time value",
    }
}

pub(super) fn type_name(field_type: &FieldType) -> &'static str {
    match field_type {
        FieldType::String => "string",
        FieldType::Long => "long",
        FieldType::Double => "double",
        FieldType::Boolean => "boolean",
        FieldType::Timestamp => "timestamp",
        FieldType::Object(_) => "a record",
        FieldType::Array(_) => "an array",
        FieldType::Nullable(inner) => type_name(inner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::encoder::write_long;
    use super::writer_schemas::*;
    use apache_avro::Schema as AvroSchema;
    use std::time::{Duration, Instant};

    fn schema(fields: &[(&str, FieldType)]) -> Schema {
        Schema { fields: fields.iter().map(|(name, field_type)| (name.to_string(), field_type.clone())).collect() }
    }

    fn wire(id: u32, writer: &AvroSchema, value: AvroValue) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&id.to_be_bytes());
        bytes.extend(apache_avro::to_avro_datum(writer, value).unwrap());
        bytes
    }

    fn decoder(reader: Schema, writers: &[(u32, &str)]) -> AvroDecoder {
        let cache = Arc::new(WriterSchemas::default());
        for (id, text) in writers {
            cache.insert(*id, Ok(Arc::new(AvroSchema::parse_str(text).unwrap())));
        }
        AvroDecoder::new(reader, cache)
    }

    const V1: &str = r#"{"type":"record","name":"Click","fields":[
        {"name":"user","type":"string"},{"name":"amount","type":"int"},
        {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;
    const V2: &str = r#"{"type":"record","name":"Click","fields":[
        {"name":"user","type":"string"},{"name":"amount","type":"int"},
        {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"country","type":"string","default":"NL"}]}"#;

    #[test]
    fn resolves_older_and_newer_writers_against_the_declared_fields() {
        let reader = schema(&[("user", FieldType::String), ("amount", FieldType::Double), ("ts", FieldType::Timestamp)]);
        let decoder = decoder(reader, &[(1, V1), (2, V2)]);
        let v1 = AvroSchema::parse_str(V1).unwrap();
        let v2 = AvroSchema::parse_str(V2).unwrap();
        let old = AvroValue::Record(vec![
            ("user".into(), AvroValue::String("ann".into())),
            ("amount".into(), AvroValue::Int(3)),
            ("ts".into(), AvroValue::TimestampMillis(1_700_000_000_000)),
        ]);
        let new = AvroValue::Record(vec![
            ("user".into(), AvroValue::String("bob".into())),
            ("amount".into(), AvroValue::Int(4)),
            ("ts".into(), AvroValue::TimestampMillis(1_700_000_000_001)),
            ("country".into(), AvroValue::String("FR".into())),
        ]);
        let read = decoder.decode(&wire(1, &v1, old)).unwrap();
        assert_eq!(Value::Object(read), serde_json::json!({"user": "ann", "amount": 3.0, "ts": 1_700_000_000_000i64}));
        let read = decoder.decode(&wire(2, &v2, new.clone())).unwrap();
        assert_eq!(Value::Object(read), serde_json::json!({"user": "bob", "amount": 4.0, "ts": 1_700_000_000_001i64}));

        // A newer reader: a field the old writer lacks reads as null where it is declared
        // nullable, and is a decode error where it is not.
        let strict = decoder_with(schema(&[("user", FieldType::String), ("country", FieldType::String)]), &decoder);
        let old_record = AvroValue::Record(vec![
            ("user".into(), AvroValue::String("ann".into())),
            ("amount".into(), AvroValue::Int(3)),
            ("ts".into(), AvroValue::TimestampMillis(1)),
        ]);
        let error = strict.decode(&wire(1, &v1, old_record)).unwrap_err();
        assert_eq!(error.0, "field 'country' is not in the writer's schema; declare it nullable (`country: string?`) if it may be absent");
        let newer = schema(&[("user", FieldType::String), ("country", FieldType::String.nullable())]);
        let decoder = decoder_with(newer, &decoder);
        let old = AvroValue::Record(vec![
            ("user".into(), AvroValue::String("ann".into())),
            ("amount".into(), AvroValue::Int(3)),
            ("ts".into(), AvroValue::TimestampMillis(1)),
        ]);
        assert_eq!(Value::Object(decoder.decode(&wire(1, &v1, old)).unwrap()), serde_json::json!({"user": "ann", "country": null}));
        assert_eq!(Value::Object(decoder.decode(&wire(2, &v2, new)).unwrap()), serde_json::json!({"user": "bob", "country": "FR"}));
    }

    fn decoder_with(reader: Schema, other: &AvroDecoder) -> AvroDecoder {
        AvroDecoder::new(reader, other.writers.clone())
    }

    #[test]
    fn logical_types_read_as_their_number_into_long_and_as_millis_into_timestamp() {
        const MICROS: &str = r#"{"type":"record","name":"T","fields":[
            {"name":"a","type":{"type":"long","logicalType":"timestamp-micros"}},
            {"name":"b","type":{"type":"long","logicalType":"timestamp-micros"}}]}"#;
        let reader = schema(&[("a", FieldType::Long), ("b", FieldType::Timestamp)]);
        let decoder = decoder(reader, &[(3, MICROS)]);
        let writer = AvroSchema::parse_str(MICROS).unwrap();
        let record = AvroValue::Record(vec![
            ("a".into(), AvroValue::TimestampMicros(1_700_000_000_123_456)),
            ("b".into(), AvroValue::TimestampMicros(1_700_000_000_123_456)),
        ]);
        assert_eq!(
            Value::Object(decoder.decode(&wire(3, &writer, record)).unwrap()),
            serde_json::json!({"a": 1_700_000_000_123_456i64, "b": 1_700_000_000_123i64})
        );
    }

    #[test]
    fn bad_records_say_what_is_wrong() {
        let reader = schema(&[("user", FieldType::Long)]);
        let decoder = decoder(reader, &[(1, V1)]);
        decoder.writers.insert(9, Err("not found in the schema registry".into()));
        let v1 = AvroSchema::parse_str(V1).unwrap();
        let record = AvroValue::Record(vec![
            ("user".into(), AvroValue::String("ann".into())),
            ("amount".into(), AvroValue::Int(3)),
            ("ts".into(), AvroValue::TimestampMillis(1)),
        ]);
        let error = decoder.decode(&wire(1, &v1, record)).unwrap_err().0;
        assert!(error.contains("field 'user'") && error.contains("a string") && error.contains("long"), "{error}");
        let error = decoder.decode(b"{\"user\":1}").unwrap_err().0;
        assert!(error.contains("not in the Confluent Avro wire format"), "{error}");
        let error = decoder.decode(&[0, 0, 0, 0, 9, 2]).unwrap_err().0;
        assert_eq!(error, "writer schema id 9: not found in the schema registry");
        let error = decoder.decode(&[0, 0, 0, 0, 1, 0xff]).unwrap_err().0;
        assert!(error.contains("not an Avro datum of writer schema id 1"), "{error}");
    }

    #[test]
    fn encodes_what_it_decodes() {
        let output = schema(&[
            ("clicks.user", FieldType::String),
            ("window_start", FieldType::Timestamp),
            ("total", FieldType::Double),
            ("n", FieldType::Long),
            ("seen", FieldType::Boolean),
            ("inner", FieldType::Object(schema(&[("x", FieldType::Long)]))),
        ]);
        let mut encoder = AvroEncoder::new(&output, "clicks-per-user").unwrap();
        assert!(encoder.schema_text().contains("\"clicks_user\""), "{}", encoder.schema_text());
        assert!(encoder.encode(&Map::new()).is_err(), "no id yet");
        encoder.set_id(7);
        let record = serde_json::json!({"clicks.user": "ann", "window_start": 60000, "total": 2.5, "n": 2, "seen": null, "inner": {"x": 1}});
        let bytes = encoder.encode(record.as_object().unwrap()).unwrap();
        assert_eq!(schema_id(&bytes), Some(7));
        // Read back through the decoder, with the Avro names as the reader's fields.
        let reader = schema(&[
            ("clicks_user", FieldType::String),
            ("window_start", FieldType::Timestamp),
            ("total", FieldType::Double),
            ("n", FieldType::Long),
            ("seen", FieldType::Boolean.nullable()),
            ("inner", FieldType::Object(schema(&[("x", FieldType::Long)]))),
        ]);
        let decoder = decoder(reader, &[(7, encoder.schema_text())]);
        assert_eq!(
            Value::Object(decoder.decode(&bytes).unwrap()),
            serde_json::json!({"clicks_user": "ann", "window_start": 60000, "total": 2.5, "n": 2, "seen": null, "inner": {"x": 1}})
        );
        let error = encoder.encode(serde_json::json!({"n": "two"}).as_object().unwrap()).unwrap_err();
        assert!(error.0.contains("output field 'n'"), "{error}");
        let error = encoder.encode(serde_json::json!({"n": 1, "extra": 2}).as_object().unwrap()).unwrap_err();
        assert!(error.0.contains("field 'extra'"), "{error}");
    }

    /// apache-avro, reading what the direct writer wrote, is the judge of the binary form:
    /// varint edges, negative numbers, multi-byte text, nulls, absent fields and nesting.
    #[test]
    fn apache_avro_reads_what_is_written() {
        let output = schema(&[
            ("s", FieldType::String),
            ("n", FieldType::Long),
            ("t", FieldType::Timestamp),
            ("d", FieldType::Double),
            ("b", FieldType::Boolean),
            ("o", FieldType::Object(schema(&[("x", FieldType::Long), ("y", FieldType::String)]))),
        ]);
        let mut encoder = AvroEncoder::new(&output, "edges").unwrap();
        encoder.set_id(1);
        // This test decodes without a decoder: set weir's limit before apache-avro sets its own.
        limit_decode_allocations();
        let writer = AvroSchema::parse_str(encoder.schema_text()).unwrap();
        let numbers = [0, 1, -1, 63, -64, 64, -65, 8191, 8192, i64::from(i32::MAX) + 1, i64::MAX, i64::MIN];
        for (index, number) in numbers.into_iter().enumerate() {
            let text = "é😀x".repeat(index * 11);
            let record = serde_json::json!({
                "s": text, "n": number, "t": number / -2, "d": number as f64 / 3.0, "b": index % 2 == 0,
                "o": if index % 3 == 0 { Value::Null } else { serde_json::json!({"x": number, "y": 7}) },
            });
            let bytes = encoder.encode(record.as_object().unwrap()).unwrap();
            let read = apache_avro::from_avro_datum(&writer, &mut &bytes[5..], None).unwrap();
            let some = |value: AvroValue| AvroValue::Union(1, Box::new(value));
            let inner = if index % 3 == 0 {
                AvroValue::Union(0, Box::new(AvroValue::Null))
            } else {
                some(AvroValue::Record(vec![("x".into(), some(AvroValue::Long(number))), ("y".into(), some(AvroValue::String("7".into())))]))
            };
            let expected = AvroValue::Record(vec![
                ("s".into(), some(AvroValue::String(text.clone()))),
                ("n".into(), some(AvroValue::Long(number))),
                ("t".into(), some(AvroValue::TimestampMillis(number / -2))),
                ("d".into(), some(AvroValue::Double(number as f64 / 3.0))),
                ("b".into(), some(AvroValue::Boolean(index % 2 == 0))),
                ("o".into(), inner),
            ]);
            assert_eq!(read, expected, "record {index}");
        }
        // Absent and null fields are both the null branch.
        let bytes = encoder.encode(serde_json::json!({"n": null}).as_object().unwrap()).unwrap();
        assert_eq!(&bytes[5..], &[0, 0, 0, 0, 0, 0]);
    }

    /// Lists (of text, of records, of lists) are written as Avro arrays of nullable items,
    /// which apache-avro reads, and which the decoder reads back into the same JSON.
    #[test]
    fn lists_are_written_and_read_back() {
        let line = FieldType::Object(schema(&[("sku", FieldType::String.nullable()), ("qty", FieldType::Long)]));
        let output = schema(&[
            ("tags", FieldType::Array(Box::new(FieldType::String))),
            ("lines", FieldType::Array(Box::new(line)).nullable()),
            ("grid", FieldType::Array(Box::new(FieldType::Array(Box::new(FieldType::Long))))),
        ]);
        let mut encoder = AvroEncoder::new(&output, "lists").unwrap();
        encoder.set_id(3);
        limit_decode_allocations();
        let writer = AvroSchema::parse_str(encoder.schema_text()).unwrap();
        let decoder = decoder(output.clone(), &[(3, encoder.schema_text())]);
        for record in [
            serde_json::json!({"tags": ["a", null, "ccc"], "lines": [{"sku": "s1", "qty": 2}, null, {"sku": null, "qty": -300}], "grid": [[1, 2], [], null]}),
            serde_json::json!({"tags": [], "lines": null, "grid": [[i64::MIN, i64::MAX]]}),
        ] {
            let bytes = encoder.encode(record.as_object().unwrap()).unwrap();
            apache_avro::from_avro_datum(&writer, &mut &bytes[5..], None).unwrap();
            assert_eq!(Value::Object(decoder.decode(&bytes).unwrap()), record);
        }
        let error = encoder.encode(serde_json::json!({"lines": [{"sku": "s1", "qty": "two"}]}).as_object().unwrap()).unwrap_err();
        assert!(error.0.contains("output field 'lines[0].qty'"), "{error}");
        let error = encoder.encode(serde_json::json!({"tags": "a"}).as_object().unwrap()).unwrap_err();
        assert!(error.0.contains("output field 'tags' holds \"a\""), "{error}");
    }

    #[test]
    fn unknown_ids_are_asked_again_after_a_while_known_ones_never() {
        let schema = Arc::new(AvroSchema::parse_str(r#""long""#).unwrap());
        let cached = WriterSchemas::default();
        assert!(cached.needs_fetch(1));
        cached.insert(1, Err("not found".into()));
        cached.insert(2, Ok(schema.clone()));
        assert!(!cached.needs_fetch(1) && !cached.needs_fetch(2));
        let expired = WriterSchemas::with_unknown_id_retry(Duration::ZERO);
        expired.insert(1, Err("not found".into()));
        expired.insert(2, Ok(schema));
        assert!(expired.needs_fetch(1) && !expired.needs_fetch(2));
    }

    /// A record that claims more items than it holds must be a bad record, not a request for
    /// gigabytes that aborts the process (without the limit, this test's process aborts).
    #[test]
    fn a_datum_lying_about_a_count_is_a_decode_error() {
        const COUNTED: &str = r#"{"type":"record","name":"Counted","fields":[
            {"name":"tags","type":{"type":"map","values":"long"}},
            {"name":"items","type":{"type":"array","items":"long"}}]}"#;
        let reader = schema(&[("tags", FieldType::String)]);
        let decoder = decoder(reader, &[(4, COUNTED)]);
        assert_eq!(limit_decode_allocations(), MAX_DECODE_ALLOCATION, "another decode set apache-avro's limit first");
        let claims = |prefix: &[u8], count: i64| {
            let mut bytes = vec![0, 0, 0, 0, 4];
            bytes.extend_from_slice(prefix);
            write_long(count, &mut bytes);
            bytes
        };
        // A map of 500M entries; after an empty map, an array of 500M items; a map block in
        // the form with a negative count and its byte size.
        let mut sized_block = claims(&[], -500_000_000);
        write_long(1_000, &mut sized_block);
        for bytes in [claims(&[], 500_000_000), claims(&[0], 500_000_000), sized_block] {
            assert!(bytes.len() <= 12, "{bytes:02x?}");
            let error = decoder.decode(&bytes).unwrap_err().0;
            assert!(error.contains("not an Avro datum of writer schema id 4"), "{error}");
        }
        // A count just under the limit passes the check; the datum then ends, and the record is
        // bad all the same.
        let error = decoder.decode(&claims(&[], MAX_DECODE_ALLOCATION as i64)).unwrap_err().0;
        assert!(error.contains("not an Avro datum of writer schema id 4"), "{error}");
    }

    #[test]
    fn unknown_ids_are_capped_and_known_ones_kept() {
        let schema = Arc::new(AvroSchema::parse_str(r#""long""#).unwrap());
        let cached = WriterSchemas::with_limits(UNKNOWN_ID_RETRY, 1_000, LOOKUP_BURST, LOOKUPS_PER_SECOND);
        cached.insert(7, Ok(schema.clone()));
        for id in 100..5_100 {
            cached.insert(id, Err("not found".into()));
        }
        assert_eq!(cached.len(), 1_001, "one known schema and the newest 1,000 unknown ids");
        assert!(!cached.needs_fetch(7), "a known schema is never evicted");
        assert!(!cached.needs_fetch(5_099), "the newest unknown id is kept");
        assert!(cached.needs_fetch(100), "the oldest unknown id went first");
        // An unknown id that becomes known no longer counts against the cap.
        cached.insert(5_099, Ok(schema));
        cached.insert(6_000, Err("not found".into()));
        assert_eq!(cached.len(), 1_002, "two known schemas and 1,000 unknown ids");
        assert!(!cached.needs_fetch(5_099) && !cached.needs_fetch(6_000) && !cached.needs_fetch(4_100));
        cached.insert(6_001, Err("not found".into()));
        assert_eq!(cached.len(), 1_002);
        assert!(cached.needs_fetch(4_100), "the oldest unknown id went");

        // The real cap holds too.
        let cached = WriterSchemas::default();
        for id in 0..(MAX_UNKNOWN_IDS as u32 + 500) {
            cached.insert(id, Err("not found".into()));
        }
        assert_eq!(cached.len(), MAX_UNKNOWN_IDS);
    }

    #[test]
    fn registry_lookups_are_rate_limited_after_a_burst() {
        let start = Instant::now();
        let mut budget = LookupBudget::new(LOOKUP_BURST, LOOKUPS_PER_SECOND, start);
        for lookup in 0..LOOKUP_BURST {
            assert_eq!(budget.take(start), Ok(()), "lookup {lookup} of the burst");
        }
        let wait = budget.take(start).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1) / LOOKUPS_PER_SECOND, "{wait:?}");
        // One second later: the rate's worth of lookups, and no more.
        let later = start + Duration::from_secs(1);
        let allowed = (0..LOOKUP_BURST).filter(|_| budget.take(later).is_ok()).count();
        assert_eq!(allowed, LOOKUPS_PER_SECOND as usize);
        // A long quiet spell refills the burst, not more.
        let much_later = later + Duration::from_secs(3_600);
        let allowed = (0..10 * LOOKUP_BURST).filter(|_| budget.take(much_later).is_ok()).count();
        assert_eq!(allowed, LOOKUP_BURST as usize);
    }

    #[test]
    fn clashing_avro_names_are_refused() {
        let output = schema(&[("a.b", FieldType::String), ("a_b", FieldType::String)]);
        let error = AvroEncoder::new(&output, "x").unwrap_err();
        assert!(error.0.contains("'a.b' and 'a_b'"), "{error}");
    }
}

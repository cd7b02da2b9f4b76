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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use apache_avro::types::Value as AvroValue;
use apache_avro::Schema as AvroSchema;
use serde_json::{Map, Number, Value};
use tracing::warn;

use super::DecodeError;
use crate::config::{FieldType, Schema};

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

/// The writer schemas met so far, by registry id: filled by the runtime (which may block on
/// the registry), read by decoders (which never do). An id the registry does not know is kept
/// as an error, so each of its records is a bad record without asking again, for
/// [`UNKNOWN_ID_RETRY`]: then it is asked again, in case the id was registered since (a
/// registry replica that had not caught up yet).
///
/// Garbage input (a zero byte, then random ids) must not grow memory or flood the registry:
/// at most [`MAX_UNKNOWN_IDS`] unknown ids are kept (the oldest goes first; known schemas are
/// bounded by the registry itself and never evicted), and lookups are rate-limited
/// ([`WriterSchemas::take_lookup`]).
#[derive(Debug)]
pub struct WriterSchemas {
    cache: RwLock<Cache>,
    unknown_id_retry: Duration,
    max_unknown_ids: usize,
    lookups: Mutex<LookupBudget>,
}

#[derive(Debug, Default)]
struct Cache {
    schemas: HashMap<u32, Cached>,
    /// How many of `schemas` are errors (ids the registry did not know).
    unknown: usize,
    /// Counts insertions, so that the oldest entry is known even within one clock tick.
    inserted: u64,
}

#[derive(Debug)]
struct Cached {
    schema: WriterSchema,
    since: Instant,
    sequence: u64,
}

impl Default for WriterSchemas {
    fn default() -> WriterSchemas {
        WriterSchemas::with_unknown_id_retry(UNKNOWN_ID_RETRY)
    }
}

/// A writer schema, or why the registry has none for its id.
pub type WriterSchema = Result<Arc<AvroSchema>, String>;

/// How long an id the registry did not know stays unknown before it is asked again.
pub const UNKNOWN_ID_RETRY: Duration = Duration::from_secs(60);

/// The most unknown ids remembered. At the lookup rate below, ids expire (after
/// [`UNKNOWN_ID_RETRY`]) before this many pile up; the cap holds whatever the rate.
pub const MAX_UNKNOWN_IDS: usize = 10_000;

/// Registry lookups allowed at once, after a quiet spell: a pipeline meets its writers'
/// handful of schema ids at start without waiting.
pub const LOOKUP_BURST: u32 = 100;

/// Registry lookups allowed per second, once the burst is spent.
pub const LOOKUPS_PER_SECOND: u32 = 50;

impl WriterSchemas {
    pub fn with_unknown_id_retry(unknown_id_retry: Duration) -> WriterSchemas {
        WriterSchemas::with_limits(unknown_id_retry, MAX_UNKNOWN_IDS, LOOKUP_BURST, LOOKUPS_PER_SECOND)
    }

    fn with_limits(unknown_id_retry: Duration, max_unknown_ids: usize, burst: u32, per_second: u32) -> WriterSchemas {
        WriterSchemas {
            cache: RwLock::default(),
            unknown_id_retry,
            max_unknown_ids,
            lookups: Mutex::new(LookupBudget::new(burst, per_second, Instant::now())),
        }
    }

    /// Whether the registry must be asked for `id` before a record naming it is decoded.
    pub fn needs_fetch(&self, id: u32) -> bool {
        match self.cache.read().expect("writer schemas lock").schemas.get(&id) {
            None => true,
            Some(Cached { schema: Ok(_), .. }) => false,
            Some(Cached { schema: Err(_), since, .. }) => since.elapsed() >= self.unknown_id_retry,
        }
    }

    /// Takes one registry lookup from the budget; `Err(wait)` when it is spent, with the time
    /// until the next one. The caller waits rather than dead-lettering the record: an id never
    /// seen may be a writer's new schema, and its records must not go to the DLQ because
    /// garbage came first. Waiting costs at most 1/[`LOOKUPS_PER_SECOND`] per lookup, so the
    /// open transaction still commits on time; garbage then flows at the lookup rate instead
    /// of at the registry's, and the registry is spared.
    pub fn take_lookup(&self) -> Result<(), Duration> {
        self.lookups.lock().expect("lookup budget lock").take(Instant::now())
    }

    pub fn insert(&self, id: u32, schema: WriterSchema) {
        let mut cache = self.cache.write().expect("writer schemas lock");
        cache.inserted += 1;
        let sequence = cache.inserted;
        let unknown = schema.is_err();
        let replaced = cache.schemas.insert(id, Cached { schema, since: Instant::now(), sequence });
        if replaced.is_some_and(|replaced| replaced.schema.is_err()) {
            cache.unknown -= 1;
        }
        if unknown {
            cache.unknown += 1;
            if cache.unknown > self.max_unknown_ids {
                cache.forget_oldest_unknown();
            }
        }
    }

    fn get(&self, id: u32) -> Option<WriterSchema> {
        self.cache.read().expect("writer schemas lock").schemas.get(&id).map(|cached| cached.schema.clone())
    }

    pub fn len(&self) -> usize {
        self.cache.read().expect("writer schemas lock").schemas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Cache {
    /// A scan, but it runs at most once per registry lookup, which the budget bounds.
    fn forget_oldest_unknown(&mut self) {
        let oldest = self
            .schemas
            .iter()
            .filter(|(_, cached)| cached.schema.is_err())
            .min_by_key(|(_, cached)| cached.sequence)
            .map(|(id, _)| *id);
        if let Some(id) = oldest {
            self.schemas.remove(&id);
            self.unknown -= 1;
        }
    }
}

/// A token bucket: `burst` lookups at once, refilled at `per_second`.
#[derive(Debug)]
struct LookupBudget {
    tokens: f64,
    burst: f64,
    per_second: f64,
    refilled_at: Instant,
}

impl LookupBudget {
    fn new(burst: u32, per_second: u32, now: Instant) -> LookupBudget {
        LookupBudget { tokens: f64::from(burst), burst: f64::from(burst), per_second: f64::from(per_second.max(1)), refilled_at: now }
    }

    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_second))
        }
    }
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
        let writer = match self.writers.get(id) {
            Some(Ok(writer)) => writer,
            Some(Err(error)) => return Err(DecodeError(format!("writer schema id {id}: {error}"))),
            None => return Err(DecodeError(format!("writer schema id {id} was not fetched from the schema registry"))),
        };
        let mut datum = &bytes[5..];
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
            // The reader's default: every declared field is optional.
            None => Value::Null,
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
        return Ok(Value::Null);
    }
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

fn type_name(field_type: &FieldType) -> &'static str {
    match field_type {
        FieldType::String => "string",
        FieldType::Long => "long",
        FieldType::Double => "double",
        FieldType::Boolean => "boolean",
        FieldType::Timestamp => "timestamp",
        FieldType::Object(_) => "a record",
    }
}

/// Writes the sink's records with a schema derived from the pipeline's output fields.
#[derive(Debug, Clone)]
pub struct AvroEncoder {
    text: String,
    /// Output field name, Avro field name, type: in the schema's order.
    fields: Vec<AvroField>,
    /// The registry id, once registered.
    id: Option<u32>,
}

impl AvroEncoder {
    /// `name` becomes the record's name (in namespace `weir`). Fails when two output fields
    /// map to the same Avro name (Avro names allow only letters, digits and `_`).
    pub fn new(schema: &Schema, name: &str) -> Result<AvroEncoder, String> {
        let (json, fields) = writer_schema(schema, &avro_name(name))?;
        let text = json.to_string();
        // What the registry is given must parse as Avro; records are then written directly.
        AvroSchema::parse_str(&text).map_err(|error| format!("the derived Avro schema does not parse: {error}"))?;
        Ok(AvroEncoder { text, fields, id: None })
    }

    /// The schema in Avro's JSON form, as registered.
    pub fn schema_text(&self) -> &str {
        &self.text
    }

    pub fn set_id(&mut self, id: u32) {
        self.id = Some(id);
    }

    pub fn encode(&self, fields: &Map<String, Value>) -> Result<Vec<u8>, String> {
        let id = self.id.ok_or("the sink's Avro schema is not registered yet")?;
        let mut bytes = Vec::with_capacity(64);
        bytes.push(MAGIC);
        bytes.extend_from_slice(&id.to_be_bytes());
        write_record(&self.fields, fields, "", &mut bytes)?;
        Ok(bytes)
    }
}

/// A valid Avro name for `text`: other characters become `_`, and a leading digit gets one.
pub fn avro_name(text: &str) -> String {
    let mut name: String = text.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if !name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        name.insert(0, '_');
    }
    name
}

/// An output field as the derived schema writes it: its name in the output, its Avro name,
/// its type, and a nested record's fields (worked out once, not per record).
#[derive(Debug, Clone)]
struct AvroField {
    name: String,
    avro_name: String,
    field_type: FieldType,
    nested: Vec<AvroField>,
}

fn writer_schema(schema: &Schema, record_name: &str) -> Result<(Value, Vec<AvroField>), String> {
    let mut names: Vec<AvroField> = Vec::with_capacity(schema.fields.len());
    let mut avro_fields = Vec::with_capacity(schema.fields.len());
    for (name, field_type) in &schema.fields {
        let field_name = avro_name(name);
        if let Some(other) = names.iter().find(|field| field.avro_name == field_name) {
            return Err(format!("output fields '{}' and '{name}' both become the Avro field '{field_name}'", other.name));
        }
        let mut nested = Vec::new();
        let field_schema = match field_type {
            FieldType::String => Value::from("string"),
            FieldType::Long => Value::from("long"),
            FieldType::Double => Value::from("double"),
            FieldType::Boolean => Value::from("boolean"),
            FieldType::Timestamp => serde_json::json!({"type": "long", "logicalType": "timestamp-millis"}),
            FieldType::Object(inner) => {
                let (inner_schema, inner_fields) = writer_schema(inner, &format!("{record_name}_{field_name}"))?;
                nested = inner_fields;
                inner_schema
            }
        };
        avro_fields.push(serde_json::json!({"name": field_name, "type": ["null", field_schema], "default": null}));
        names.push(AvroField { name: name.clone(), avro_name: field_name, field_type: field_type.clone(), nested });
    }
    let json = serde_json::json!({"type": "record", "name": record_name, "namespace": "weir", "fields": avro_fields});
    Ok((json, names))
}

/// Writes a record of the derived schema in Avro binary, straight from the JSON fields. Every
/// field is a union of null (branch 0) and its type (branch 1), so no schema walk or
/// intermediate Avro value is needed (README, "Micro benchmarks", has the gain).
fn write_record(names: &[AvroField], fields: &Map<String, Value>, path: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let mut present = 0;
    for field in names {
        match fields.get(&field.name) {
            None => out.push(0),
            Some(Value::Null) => {
                present += 1;
                out.push(0);
            }
            Some(value) => {
                present += 1;
                out.push(2);
                write_value(field, value, path, out)?;
            }
        }
    }
    // A field the schema lacks would be dropped without a word.
    if present != fields.len()
        && let Some(extra) = fields.keys().find(|name| !names.iter().any(|field| &field.name == *name))
    {
        let at = if path.is_empty() { String::new() } else { format!(" in '{path}'") };
        return Err(format!("field '{extra}'{at} is not in the derived Avro schema"));
    }
    Ok(())
}

fn write_value(field: &AvroField, value: &Value, parent: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let path = || if parent.is_empty() { field.name.clone() } else { format!("{parent}.{}", field.name) };
    let field_type = &field.field_type;
    let mismatch = || format!("output field '{}' holds {value}, which is not a {}", path(), type_name(field_type));
    match field_type {
        FieldType::String => match value {
            Value::String(text) => write_bytes(text.as_bytes(), out),
            other => write_bytes(other.to_string().as_bytes(), out),
        },
        FieldType::Long | FieldType::Timestamp => write_long(whole(value).ok_or_else(mismatch)?, out),
        FieldType::Double => out.extend_from_slice(&value.as_f64().ok_or_else(mismatch)?.to_le_bytes()),
        FieldType::Boolean => out.push(u8::from(value.as_bool().ok_or_else(mismatch)?)),
        FieldType::Object(_) => match value {
            Value::Object(inner_fields) => write_record(&field.nested, inner_fields, &path(), out)?,
            _ => return Err(mismatch()),
        },
    }
    Ok(())
}

/// Avro's `long`: zig-zag, then a little-endian base-128 varint.
fn write_long(number: i64, out: &mut Vec<u8>) {
    let mut zigzag = ((number << 1) ^ (number >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

/// Avro's `string` and `bytes`: the length as a long, then the bytes.
fn write_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    write_long(bytes.len() as i64, out);
    out.extend_from_slice(bytes);
}

/// A JSON number that is a whole number (a double with no fraction counts).
fn whole(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| value.as_f64().filter(|number| number.fract() == 0.0 && number.abs() < 9.2e18).map(|number| number as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

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

        // A newer reader: a field the old writer lacks reads as null.
        let newer = schema(&[("user", FieldType::String), ("country", FieldType::String)]);
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
            ("seen", FieldType::Boolean),
            ("inner", FieldType::Object(schema(&[("x", FieldType::Long)]))),
        ]);
        let decoder = decoder(reader, &[(7, encoder.schema_text())]);
        assert_eq!(
            Value::Object(decoder.decode(&bytes).unwrap()),
            serde_json::json!({"clicks_user": "ann", "window_start": 60000, "total": 2.5, "n": 2, "seen": null, "inner": {"x": 1}})
        );
        let error = encoder.encode(serde_json::json!({"n": "two"}).as_object().unwrap()).unwrap_err();
        assert!(error.contains("output field 'n'"), "{error}");
        let error = encoder.encode(serde_json::json!({"n": 1, "extra": 2}).as_object().unwrap()).unwrap_err();
        assert!(error.contains("field 'extra'"), "{error}");
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
        assert!(error.contains("'a.b' and 'a_b'"), "{error}");
    }
}

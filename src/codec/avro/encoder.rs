//! Writing the sink's records: the Avro schema derived from the output fields (every field a
//! union with null), and the binary datum written straight from the fields.

use apache_avro::Schema as AvroSchema;
use serde_json::{Map, Value};

use super::{type_name, MAGIC};
use crate::codec::{EncodeError, SchemaError};
use crate::config::{FieldType, Schema};

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
    pub fn new(schema: &Schema, name: &str) -> Result<AvroEncoder, SchemaError> {
        let (json, fields) = writer_schema(schema, &avro_name(name))?;
        let text = json.to_string();
        // What the registry is given must parse as Avro; records are then written directly.
        AvroSchema::parse_str(&text).map_err(|error| SchemaError(format!("the derived Avro schema does not parse: {error}")))?;
        Ok(AvroEncoder { text, fields, id: None })
    }

    /// The schema in Avro's JSON form, as registered.
    pub fn schema_text(&self) -> &str {
        &self.text
    }

    pub fn set_id(&mut self, id: u32) {
        self.id = Some(id);
    }

    pub fn encode(&self, fields: &Map<String, Value>) -> Result<Vec<u8>, EncodeError> {
        let id = self.id.ok_or_else(|| EncodeError("the sink's Avro schema is not registered yet".into()))?;
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
    /// Empty for a list's element, whose path is its list's with the index.
    name: String,
    avro_name: String,
    field_type: FieldType,
    nested: Vec<AvroField>,
    /// A list's element.
    element: Option<Box<AvroField>>,
}

fn writer_schema(schema: &Schema, record_name: &str) -> Result<(Value, Vec<AvroField>), SchemaError> {
    let mut names: Vec<AvroField> = Vec::with_capacity(schema.fields.len());
    let mut avro_fields = Vec::with_capacity(schema.fields.len());
    for (name, field_type) in &schema.fields {
        let field_name = avro_name(name);
        if let Some(other) = names.iter().find(|field| field.avro_name == field_name) {
            return Err(SchemaError(format!("output fields '{}' and '{name}' both become the Avro field '{field_name}'", other.name)));
        }
        let (field_schema, nested, element) = value_schema(field_type, &format!("{record_name}_{field_name}"))?;
        avro_fields.push(serde_json::json!({"name": field_name, "type": ["null", field_schema], "default": null}));
        names.push(AvroField { name: name.clone(), avro_name: field_name, field_type: field_type.base().clone(), nested, element });
    }
    let json = serde_json::json!({"type": "record", "name": record_name, "namespace": "weir", "fields": avro_fields});
    Ok((json, names))
}

/// The Avro schema of a value of `field_type` (without the null union around it), with a
/// record's fields or a list's element as the writer needs them.
#[allow(clippy::type_complexity)]
fn value_schema(field_type: &FieldType, record_name: &str) -> Result<(Value, Vec<AvroField>, Option<Box<AvroField>>), SchemaError> {
    // Every value is written in a union with null already.
    Ok(match field_type.base() {
        FieldType::String => (Value::from("string"), Vec::new(), None),
        FieldType::Long => (Value::from("long"), Vec::new(), None),
        FieldType::Double => (Value::from("double"), Vec::new(), None),
        FieldType::Boolean => (Value::from("boolean"), Vec::new(), None),
        FieldType::Timestamp => (serde_json::json!({"type": "long", "logicalType": "timestamp-millis"}), Vec::new(), None),
        FieldType::Object(inner) => {
            let (schema, fields) = writer_schema(inner, record_name)?;
            (schema, fields, None)
        }
        FieldType::Array(element_type) => {
            let (items, nested, inner) = value_schema(element_type, &format!("{record_name}_item"))?;
            let element = AvroField { name: String::new(), avro_name: String::new(), field_type: element_type.base().clone(), nested, element: inner };
            (serde_json::json!({"type": "array", "items": ["null", items]}), Vec::new(), Some(Box::new(element)))
        }
        FieldType::Nullable(inner) => return value_schema(inner, record_name),
    })
}

/// Writes a record of the derived schema in Avro binary, straight from the JSON fields. Every
/// field is a union of null (branch 0) and its type (branch 1), so no schema walk or
/// intermediate Avro value is needed (BENCHMARKS.md, "Micro benchmarks", has the gain).
fn write_record(names: &[AvroField], fields: &Map<String, Value>, path: &str, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let mut present = 0;
    for field in names {
        match crate::codec::field(fields, &field.name) {
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
        return Err(EncodeError(format!("field '{extra}'{at} is not in the derived Avro schema")));
    }
    Ok(())
}

fn write_value(field: &AvroField, value: &Value, parent: &str, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let path = || match (parent.is_empty(), field.name.is_empty()) {
        (_, true) => parent.to_string(),
        (true, false) => field.name.clone(),
        (false, false) => format!("{parent}.{}", field.name),
    };
    let field_type = &field.field_type;
    let mismatch = || EncodeError(format!("output field '{}' holds {value}, which is not a {}", path(), type_name(field_type)));
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
        // One block of every item (null: branch 0 of the element's union), then the end.
        FieldType::Array(_) => match (value, field.element.as_deref()) {
            (Value::Array(items), Some(element)) => {
                if !items.is_empty() {
                    write_long(items.len() as i64, out);
                    for (index, item) in items.iter().enumerate() {
                        if item.is_null() {
                            out.push(0);
                        } else {
                            out.push(2);
                            write_value(element, item, &format!("{}[{index}]", path()), out)?;
                        }
                    }
                }
                write_long(0, out);
            }
            _ => return Err(mismatch()),
        },
        // The writer keeps base types (see `writer_schema`); a nullable one is written as its base.
        FieldType::Nullable(inner) => {
            let base = AvroField { field_type: (**inner).clone(), ..field.clone() };
            write_value(&base, value, parent, out)?;
        }
    }
    Ok(())
}

/// Avro's `long`: zig-zag, then a little-endian base-128 varint.
pub(super) fn write_long(number: i64, out: &mut Vec<u8>) {
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

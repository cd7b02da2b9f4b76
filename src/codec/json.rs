//! JSON with an explicit schema: the declared fields are read and type-checked, in the
//! schema's order; undeclared fields are dropped; a missing field or `null` reads as null.

use serde_json::{Map, Value};

use super::DecodeError;
use crate::config::{FieldType, Schema};

pub fn decode(schema: &Schema, bytes: &[u8]) -> Result<Map<String, Value>, DecodeError> {
    let document: Value = serde_json::from_slice(bytes)
        .map_err(|error| DecodeError(format!("not valid JSON: {error}")))?;
    let Value::Object(object) = document else {
        return Err(DecodeError(format!("expected a JSON object, found {}", kind(&document))));
    };
    project(schema, object, "")
}

fn project(schema: &Schema, mut object: Map<String, Value>, prefix: &str) -> Result<Map<String, Value>, DecodeError> {
    let mut fields = Map::with_capacity(schema.fields.len());
    for (name, field_type) in &schema.fields {
        let value = object.remove(name.as_str()).unwrap_or(Value::Null);
        let path = format!("{prefix}{name}");
        let value = check(field_type, value, &path)?;
        fields.insert(name.clone(), value);
    }
    Ok(fields)
}

fn check(field_type: &FieldType, value: Value, path: &str) -> Result<Value, DecodeError> {
    if value.is_null() {
        return Ok(Value::Null);
    }
    let fits = match (field_type, &value) {
        (FieldType::String, Value::String(_)) => true,
        (FieldType::Long | FieldType::Timestamp, Value::Number(number)) => number.is_i64(),
        (FieldType::Double, Value::Number(number)) => {
            // Keep doubles doubles, so that `sum` and comparisons see one type.
            return Ok(number.as_f64().map(Value::from).unwrap_or(Value::Null));
        }
        (FieldType::Boolean, Value::Bool(_)) => true,
        (FieldType::Object(schema), Value::Object(_)) => {
            let Value::Object(object) = value else { unreachable!("matched as an object") };
            return project(schema, object, &format!("{path}.")).map(Value::Object);
        }
        _ => false,
    };
    if fits {
        Ok(value)
    } else {
        Err(DecodeError(format!(
            "field '{path}': expected {}, found {}",
            type_name(field_type),
            kind(&value)
        )))
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn projects_declared_fields_in_schema_order() {
        let fields = decode(&schema(), br#"{"extra":1,"count":3,"amount":2,"id":"a","user":{"name":"x","age":4}}"#).unwrap();
        assert_eq!(String::from_utf8(encode(&fields)).unwrap(), r#"{"id":"a","amount":2.0,"count":3,"user":{"name":"x"}}"#);
    }

    #[test]
    fn missing_fields_read_as_null() {
        let fields = decode(&schema(), br#"{"id":"a"}"#).unwrap();
        assert_eq!(fields["amount"], Value::Null);
    }

    #[test]
    fn wrong_types_are_errors_naming_the_field() {
        let error = decode(&schema(), br#"{"id":"a","count":1.5}"#).unwrap_err();
        assert!(error.0.contains("field 'count'"), "{error}");
        let error = decode(&schema(), br#"{"user":{"name":7}}"#).unwrap_err();
        assert!(error.0.contains("field 'user.name'"), "{error}");
        assert!(decode(&schema(), b"[1]").is_err());
        assert!(decode(&schema(), b"{not json").is_err());
    }
}

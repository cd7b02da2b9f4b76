//! The explicit field types of a source's records, and the check that fields named by steps
//! are in them.

use serde_yaml_ng::{Mapping, Value as Yaml};

use super::ConfigErrors;

/// The explicit field types of a JSON source; nested objects are schemas themselves.
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    pub fields: Vec<(String, FieldType)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FieldType {
    String,
    Long,
    Double,
    Boolean,
    /// Epoch milliseconds.
    Timestamp,
    Object(Schema),
    /// `[T]`: a list of values of one type (elements may be null).
    Array(Box<FieldType>),
}

impl FieldType {
    /// The type as the pipeline file writes it.
    pub fn describe(&self) -> String {
        match self {
            FieldType::String => "string".to_string(),
            FieldType::Long => "long".to_string(),
            FieldType::Double => "double".to_string(),
            FieldType::Boolean => "boolean".to_string(),
            FieldType::Timestamp => "timestamp".to_string(),
            FieldType::Object(inner) => inner.describe(),
            FieldType::Array(element) => format!("[{}]", element.describe()),
        }
    }
}

impl Schema {
    /// The type of a dotted path; a path the schema lacks (checked elsewhere) as a string.
    pub fn type_or_string(&self, path: &str) -> FieldType {
        self.field_type(path).cloned().unwrap_or(FieldType::String)
    }

    /// The schema of `fields` (dotted paths) taken from this one, in that order.
    pub fn select(&self, fields: &[String]) -> Schema {
        Schema { fields: fields.iter().map(|field| (field.clone(), self.type_or_string(field))).collect() }
    }

    /// The dotted paths of fields whose names Avro does not allow.
    pub fn invalid_avro_names(&self) -> Vec<String> {
        let mut invalid = Vec::new();
        for (name, field_type) in &self.fields {
            let mut chars = name.chars();
            let valid = chars.next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                invalid.push(name.clone());
            }
            let mut element = field_type;
            while let FieldType::Array(inner) = element {
                element = inner;
            }
            if let FieldType::Object(inner) = element {
                invalid.extend(inner.invalid_avro_names().into_iter().map(|path| format!("{name}.{path}")));
            }
        }
        invalid
    }

    /// The fields and their types as the pipeline file writes them, e.g.
    /// `{user: string, at: {ts: long}}`.
    pub fn describe(&self) -> String {
        let fields: Vec<String> = self.fields.iter().map(|(name, field_type)| format!("{name}: {}", field_type.describe())).collect();
        format!("{{{}}}", fields.join(", "))
    }

    /// This schema with the field at a dotted path added (at the end of its object) or its
    /// type replaced; the objects on the way are made when missing. Err: a part of the way
    /// is a field that is not an object.
    pub fn with_field(&self, path: &str, field_type: FieldType) -> Result<Schema, String> {
        let mut schema = self.clone();
        let mut target = &mut schema;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let position = target.fields.iter().position(|(name, _)| name == part);
            if parts.peek().is_none() {
                match position {
                    Some(position) => target.fields[position].1 = field_type,
                    None => target.fields.push((part.to_string(), field_type)),
                }
                break;
            }
            let position = position.unwrap_or_else(|| {
                target.fields.push((part.to_string(), FieldType::Object(Schema { fields: Vec::new() })));
                target.fields.len() - 1
            });
            target = match &mut target.fields[position].1 {
                FieldType::Object(inner) => inner,
                other => return Err(format!("'{part}' is a {}, not an object with fields", other.describe())),
            };
        }
        Ok(schema)
    }

    /// This schema without the field at a dotted path. Err: the schema has no such field.
    pub fn without_field(&self, path: &str) -> Result<Schema, String> {
        if self.field_type(path).is_none() {
            return Err(format!("'{path}' is not a field of the record"));
        }
        let mut schema = self.clone();
        let mut target = &mut schema;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let position = target.fields.iter().position(|(name, _)| name == part).ok_or_else(|| format!("'{path}' is not a field"))?;
            if parts.peek().is_none() {
                target.fields.remove(position);
                break;
            }
            match &mut target.fields[position].1 {
                FieldType::Object(inner) => target = inner,
                _ => return Err(format!("'{path}' is not a field of the record")),
            }
        }
        Ok(schema)
    }

    /// The type of a dotted path such as `user.id`, if the schema has it.
    pub fn field_type(&self, path: &str) -> Option<&FieldType> {
        let mut schema = self;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let (_, field_type) = schema.fields.iter().find(|(name, _)| name == part)?;
            if parts.peek().is_none() {
                return Some(field_type);
            }
            match field_type {
                FieldType::Object(inner) => schema = inner,
                _ => return None,
            }
        }
        None
    }
}

pub fn parse_schema(mapping: &Mapping, location: &str, problems: &mut ConfigErrors) -> Option<Schema> {
    let mut fields = Vec::new();
    let mut valid = true;
    for (key, value) in mapping {
        let Some(name) = key.as_str() else {
            problems.push(location, "field names must be strings");
            valid = false;
            continue;
        };
        match parse_type(value, &format!("{location}.{name}"), problems) {
            Some(field_type) => fields.push((name.to_string(), field_type)),
            None => valid = false,
        }
    }
    if fields.is_empty() && valid {
        problems.push(location, "must declare at least one field");
        return None;
    }
    valid.then_some(Schema { fields })
}

/// One field's type as written: a type name, a nested mapping, or `[T]` (a list of T).
fn parse_type(value: &Yaml, location: &str, problems: &mut ConfigErrors) -> Option<FieldType> {
    const TYPES: &str = "types: string, long, double, boolean, timestamp, a nested mapping, or [T] for a list";
    match value {
        Yaml::String(type_name) => match type_name.as_str() {
            "string" => Some(FieldType::String),
            "long" => Some(FieldType::Long),
            "double" => Some(FieldType::Double),
            "boolean" => Some(FieldType::Boolean),
            "timestamp" => Some(FieldType::Timestamp),
            other => {
                problems.push(location, format!("unknown type '{other}'; {TYPES}"));
                None
            }
        },
        Yaml::Mapping(inner) => parse_schema(inner, location, problems).map(FieldType::Object),
        Yaml::Sequence(items) => match items.as_slice() {
            [element] => parse_type(element, &format!("{location}[]"), problems).map(|element| FieldType::Array(Box::new(element))),
            _ => {
                problems.push(location, "a list type names one element type, e.g. [string] or [{sku: string}]");
                None
            }
        },
        _ => {
            problems.push(location, format!("must be a type; {TYPES}"));
            None
        }
    }
}

/// Records a problem for each field that the records (of this schema; None: not known, after
/// a step with problems) do not have.
pub fn check_fields(fields: &[String], schema: Option<&Schema>, location: &str, problems: &mut ConfigErrors) {
    let Some(schema) = schema else {
        return;
    };
    for field in fields {
        if schema.field_type(field).is_none() {
            problems.push(location, format!("'{field}' is not a field of the record"));
        }
    }
}

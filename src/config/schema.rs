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
    /// `[T]`: a list of values of one type.
    Array(Box<FieldType>),
    /// `T?`: a T, or null (also when absent). A field without `?` must be there and not null.
    Nullable(Box<FieldType>),
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
            FieldType::Nullable(inner) => format!("{}?", inner.describe()),
        }
    }

    /// The type without its `?`.
    pub fn base(&self) -> &FieldType {
        match self {
            FieldType::Nullable(inner) => inner.base(),
            other => other,
        }
    }

    pub fn is_nullable(&self) -> bool {
        matches!(self, FieldType::Nullable(_))
    }

    /// This type, nullable.
    pub fn nullable(self) -> FieldType {
        match self {
            FieldType::Nullable(_) => self,
            other => FieldType::Nullable(Box::new(other)),
        }
    }
}

/// Why a step cannot make its records' schema from the one it receives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("'{0}' is not a field of the record")]
    NoSuchField(String),
    #[error("'{part}' is a {found}, not an object with fields")]
    NotAnObject { part: String, found: String },
    #[error("'{field}' is a {found}, not a list ([T])")]
    NotAList { field: String, found: String },
    #[error("'{path}' cannot be written: {reason}")]
    Unwritable { path: String, reason: Box<ShapeError> },
    #[error("would drop every field; a record needs at least one")]
    NoFieldLeft,
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
            let mut element = field_type.base();
            while let FieldType::Array(inner) = element {
                element = inner.base();
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
    pub fn with_field(&self, path: &str, field_type: FieldType) -> Result<Schema, ShapeError> {
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
            let found = target.fields[position].1.describe();
            target = match object_mut(&mut target.fields[position].1) {
                Some(inner) => inner,
                None => return Err(ShapeError::NotAnObject { part: part.to_string(), found }),
            };
        }
        Ok(schema)
    }

    /// This schema without the field at a dotted path. Err: the schema has no such field.
    pub fn without_field(&self, path: &str) -> Result<Schema, ShapeError> {
        let missing = || ShapeError::NoSuchField(path.to_string());
        if self.field_type(path).is_none() {
            return Err(missing());
        }
        let mut schema = self.clone();
        let mut target = &mut schema;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let position = target.fields.iter().position(|(name, _)| name == part).ok_or_else(missing)?;
            if parts.peek().is_none() {
                target.fields.remove(position);
                break;
            }
            match object_mut(&mut target.fields[position].1) {
                Some(inner) => target = inner,
                None => return Err(missing()),
            }
        }
        Ok(schema)
    }

    /// The type of a dotted path such as `user.id`, if the schema has it.
    /// (Without its `?`: see [`Schema::declared_type`].)
    pub fn field_type(&self, path: &str) -> Option<&FieldType> {
        self.declared_type(path).map(FieldType::base)
    }

    /// The type of a dotted path as declared, `?` included.
    pub fn declared_type(&self, path: &str) -> Option<&FieldType> {
        let mut schema = self;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let (_, field_type) = schema.fields.iter().find(|(name, _)| name == part)?;
            if parts.peek().is_none() {
                return Some(field_type);
            }
            match field_type.base() {
                FieldType::Object(inner) => schema = inner,
                _ => return None,
            }
        }
        None
    }
}

/// How to declare the field `name` of `field_type` nullable, for error messages.
pub fn nullable_hint(name: &str, field_type: &FieldType) -> String {
    match field_type.base() {
        FieldType::Object(_) | FieldType::Array(_) => format!("declare it nullable (`{name}?: ...`)"),
        base => format!("declare it nullable (`{name}: {}?`)", base.describe()),
    }
}

/// The decode error for a null (or absent-as-null) value at `path` whose type has no `?`.
pub fn null_refused(path: &str, field_type: &FieldType) -> String {
    let name = path.rsplit('.').next().unwrap_or(path);
    format!("field '{path}' is null; {} if it may be", nullable_hint(name, field_type))
}

/// The fields of an object type (nullable or not).
fn object_mut(field_type: &mut FieldType) -> Option<&mut Schema> {
    match field_type {
        FieldType::Object(inner) => Some(inner),
        FieldType::Nullable(inner) => object_mut(inner),
        _ => None,
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
        // `coupon: string?`, or `coupon?: ...` for a nested mapping or list.
        let (name, nullable) = match name.strip_suffix('?') {
            Some(name) => (name, true),
            None => (name, false),
        };
        match parse_type(value, &format!("{location}.{name}"), problems) {
            Some(field_type) if nullable => fields.push((name.to_string(), field_type.nullable())),
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
    const TYPES: &str = "types: string, long, double, boolean, timestamp, a nested mapping, or [T] for a list; T? (or name?: T) may be null or absent";
    match value {
        Yaml::String(type_name) if type_name.ends_with('?') && type_name.len() > 1 => {
            parse_type(&Yaml::String(type_name[..type_name.len() - 1].to_string()), location, problems).map(FieldType::nullable)
        }
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

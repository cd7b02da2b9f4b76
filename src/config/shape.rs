//! What each key of the pipeline file and the service settings may hold, written once: the
//! readers ([`super::Fields`]) take their known keys from it, and `weir schema` prints it as
//! a JSON Schema (draft 2020-12) for editors (yaml-language-server, taplo).
//!
//! The readers stay the judge of a file (they check far more than shapes: fields named by
//! steps, expressions, durations' limits). The schema must never refuse what they accept.
//! Debug builds check both ends: [`super::Fields`] asserts that every key it reads is in its
//! section (required ones marked so) and every section key is read, and the plan asserts that
//! [`Shape::accepts`] takes every pipeline it accepts; so each test that plans a pipeline
//! checks the schema too.

use serde_json::{json, Map, Value as Json};
use serde_yaml_ng::Value as Yaml;

/// The keys of one mapping.
#[derive(Debug)]
pub struct Section {
    pub about: &'static str,
    pub keys: &'static [Key],
}

#[derive(Debug)]
pub struct Key {
    pub name: &'static str,
    pub shape: Shape,
    pub required: bool,
    pub about: &'static str,
}

impl Key {
    pub const fn required(name: &'static str, shape: Shape, about: &'static str) -> Key {
        Key { name, shape, required: true, about }
    }

    pub const fn optional(name: &'static str, shape: Shape, about: &'static str) -> Key {
        Key { name, shape, required: false, about }
    }
}

/// What one value may be.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    String,
    Bool,
    /// A whole number at or above zero.
    Count,
    /// A duration such as `500ms`, `5s` or `10m`.
    Duration,
    /// A list of strings (field names, topics).
    Strings,
    /// One of these words.
    OneOf(&'static [&'static str]),
    /// A string, number or boolean (an expression written as a YAML scalar).
    Scalar,
    Section(&'static Section),
    /// A mapping from names of one's choosing to values of one shape.
    MapOf(&'static Shape),
    AnyOf(&'static [Shape]),
    /// A record schema: field name → type (`string`, `long?`, `[string]`, a nested mapping).
    FieldTypes,
    /// The steps of a pipeline: the operators describe their bodies (see [`Context`]).
    Steps,
    /// The `join:` section, which the join operator describes.
    Join,
}

/// What the shapes leave to their users: the pipeline's step kinds, known to the operators
/// and not to this module.
pub struct Context<'a> {
    /// Step kind → the shape of its body.
    pub steps: &'a [(&'static str, Shape)],
    pub join: Shape,
}

/// The JSON Schema document for a top-level section.
pub fn document(title: &str, top: &'static Section, context: &Context) -> Json {
    let mut schema = Shape::Section(top).json(context);
    let object = schema.as_object_mut().expect("a section is an object schema");
    object.insert("$schema".into(), json!("https://json-schema.org/draft/2020-12/schema"));
    object.insert("title".into(), json!(title));
    object.insert(
        "$defs".into(),
        json!({ "field_type": field_type_schema() }),
    );
    schema
}

/// A field's type in a record schema; recursive, so it lives in `$defs`.
fn field_type_schema() -> Json {
    json!({
        "description": "string, long, double, boolean or timestamp (a trailing ? allows null), a nested mapping of fields, or [T] for a list",
        "anyOf": [
            { "type": "string", "pattern": "^(string|long|double|boolean|timestamp)\\??$" },
            { "type": "object", "additionalProperties": { "$ref": "#/$defs/field_type" } },
            { "type": "array", "items": { "$ref": "#/$defs/field_type" }, "minItems": 1, "maxItems": 1 }
        ]
    })
}

impl Shape {
    pub fn json(&self, context: &Context) -> Json {
        match self {
            Shape::String => json!({ "type": "string" }),
            Shape::Bool => json!({ "type": "boolean" }),
            Shape::Count => json!({ "type": "integer", "minimum": 0 }),
            Shape::Duration => json!({ "type": "string", "description": "a duration such as 500ms, 5s, 10m or 2h" }),
            Shape::Strings => json!({ "type": "array", "items": { "type": "string" } }),
            Shape::OneOf(words) => json!({ "enum": words }),
            Shape::Scalar => json!({ "type": ["string", "number", "boolean"] }),
            Shape::Section(section) => section_json(section, context),
            Shape::MapOf(value) => json!({ "type": "object", "additionalProperties": value.json(context) }),
            Shape::AnyOf(shapes) => json!({ "anyOf": shapes.iter().map(|shape| shape.json(context)).collect::<Vec<_>>() }),
            Shape::FieldTypes => json!({
                "type": "object",
                "description": "field name (a trailing ? allows null) → its type",
                "additionalProperties": { "$ref": "#/$defs/field_type" }
            }),
            Shape::Join => context.join.json(context),
            Shape::Steps => {
                let kinds: Map<String, Json> = context.steps.iter().map(|(kind, body)| (kind.to_string(), body.json(context))).collect();
                json!({
                    "type": "array",
                    "items": {
                        "type": "object",
                        "description": "one step: a mapping with one key, its kind",
                        "minProperties": 1,
                        "maxProperties": 1,
                        "additionalProperties": false,
                        "properties": kinds
                    }
                })
            }
        }
    }

    /// Whether the JSON Schema of this shape takes `value` (for the debug check that the
    /// schema takes what the readers take).
    pub fn accepts(&self, value: &Yaml, context: &Context) -> bool {
        match self {
            Shape::String | Shape::Duration => value.is_string(),
            Shape::Bool => value.is_bool(),
            Shape::Count => value.as_u64().is_some(),
            Shape::Strings => value.as_sequence().is_some_and(|items| items.iter().all(Yaml::is_string)),
            Shape::OneOf(words) => value.as_str().is_some_and(|word| words.contains(&word)),
            Shape::Scalar => value.is_string() || value.is_number() || value.is_bool(),
            Shape::Section(section) => value.as_mapping().is_some_and(|mapping| {
                section.keys.iter().all(|key| !key.required || mapping.contains_key(key.name))
                    && mapping.iter().all(|(name, value)| {
                        let key = section.keys.iter().find(|key| Some(key.name) == name.as_str());
                        key.is_some_and(|key| key.shape.accepts(value, context))
                    })
            }),
            Shape::MapOf(shape) => value.as_mapping().is_some_and(|mapping| {
                mapping.iter().all(|(name, value)| name.is_string() && shape.accepts(value, context))
            }),
            Shape::AnyOf(shapes) => shapes.iter().any(|shape| shape.accepts(value, context)),
            Shape::FieldTypes => value.as_mapping().is_some_and(|mapping| mapping.values().all(accepts_field_type)),
            Shape::Join => context.join.accepts(value, context),
            Shape::Steps => value.as_sequence().is_some_and(|steps| {
                steps.iter().all(|step| {
                    let single = step.as_mapping().filter(|mapping| mapping.len() == 1).and_then(|mapping| mapping.iter().next());
                    single.is_some_and(|(kind, body)| {
                        let shape = context.steps.iter().find(|(name, _)| Some(*name) == kind.as_str());
                        shape.is_some_and(|(_, shape)| shape.accepts(body, context))
                    })
                })
            }),
        }
    }
}

fn accepts_field_type(value: &Yaml) -> bool {
    match value {
        Yaml::String(name) => ["string", "long", "double", "boolean", "timestamp"].contains(&name.strip_suffix('?').unwrap_or(name)),
        Yaml::Mapping(fields) => fields.values().all(accepts_field_type),
        Yaml::Sequence(items) => items.len() == 1 && accepts_field_type(&items[0]),
        _ => false,
    }
}

fn section_json(section: &Section, context: &Context) -> Json {
    let properties: Map<String, Json> = section
        .keys
        .iter()
        .map(|key| {
            let mut schema = key.shape.json(context);
            if let Some(object) = schema.as_object_mut() {
                let about = match object.get("description").and_then(Json::as_str) {
                    Some(_) if matches!(key.shape, Shape::Section(_)) && !key.about.is_empty() => key.about.to_string(),
                    Some(shape_about) if !key.about.is_empty() => format!("{} ({shape_about})", key.about),
                    Some(shape_about) => shape_about.to_string(),
                    None => key.about.to_string(),
                };
                if !about.is_empty() {
                    object.insert("description".into(), json!(about));
                }
            }
            (key.name.to_string(), schema)
        })
        .collect();
    let required: Vec<&str> = section.keys.iter().filter(|key| key.required).map(|key| key.name).collect();
    let mut schema = json!({
        "type": "object",
        "description": section.about,
        "properties": properties,
        "additionalProperties": false,
    });
    if !required.is_empty() {
        schema["required"] = json!(required);
    }
    schema
}

impl Section {
    pub fn key(&self, name: &str) -> Option<&Key> {
        self.keys.iter().find(|key| key.name == name)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.keys.iter().map(|key| key.name).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INNER: Section = Section { about: "inner", keys: &[Key::required("gap", Shape::Duration, "")] };
    const OUTER: Section = Section {
        about: "outer",
        keys: &[
            Key::required("name", Shape::String, "its name"),
            Key::optional("kind", Shape::OneOf(&["a", "b"]), ""),
            Key::optional("inner", Shape::Section(&INNER), ""),
        ],
    };

    #[test]
    fn a_section_becomes_a_closed_object_with_its_required_keys() {
        let context = Context { steps: &[], join: Shape::String };
        let schema = Shape::Section(&OUTER).json(&context);
        assert_eq!(schema["additionalProperties"], json!(false));
        assert_eq!(schema["required"], json!(["name"]));
        assert_eq!(schema["properties"]["kind"]["enum"], json!(["a", "b"]));
        assert_eq!(schema["properties"]["inner"]["required"], json!(["gap"]));
        assert_eq!(schema["properties"]["name"]["description"], json!("its name"));
    }

    #[test]
    fn accepts_follows_the_schema() {
        let context = Context { steps: &[], join: Shape::String };
        let take = |text: &str| Shape::Section(&OUTER).accepts(&serde_yaml_ng::from_str(text).unwrap(), &context);
        assert!(take("{name: x, kind: a, inner: {gap: 5s}}"));
        assert!(!take("{kind: a}"), "name is required");
        assert!(!take("{name: x, kind: c}"));
        assert!(!take("{name: x, extra: 1}"));
        assert!(!take("{name: x, inner: {gap: 5s, more: 1}}"));
        assert!(Shape::FieldTypes.accepts(&serde_yaml_ng::from_str("{a: long?, b: [string], c: {d: timestamp}}").unwrap(), &context));
        assert!(!Shape::FieldTypes.accepts(&serde_yaml_ng::from_str("{a: int}").unwrap(), &context));
    }
}

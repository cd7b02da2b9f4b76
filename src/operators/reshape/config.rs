//! `set`, `select` and `drop`: their config and checks, each against the schema of the
//! records the step sees. The schema each one makes is derived here from the types of its
//! expressions, so the steps after it (and an Avro sink) are checked against it.
//!
//! ```yaml
//! - set: { amount_cents: "int(amount * 100.0)", geo.region: "_headers.region" }
//! - drop: [debug, internal.trace]
//! - select: { order_id: order_id, total: "item.qty * item.price", seen_on: _topic }
//! ```

use serde_yaml_ng::Value as Yaml;

use super::super::expression::Expression;
use crate::config::{ConfigErrors, FieldType, Schema, ShapeError};

/// One `path: expression` of a `set` or `select`, with the type the expression gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// A dotted path: `a.b` writes the field `b` of the object `a`.
    pub path: String,
    pub expression: String,
    pub field_type: FieldType,
}

/// A `set` (fields added or replaced, the rest kept) or a `select` (the record becomes
/// exactly these fields, in this order).
#[derive(Debug, Clone, PartialEq)]
pub struct Assignments {
    pub assignments: Vec<Assignment>,
}

/// A `drop`: the fields (dotted paths) removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drop {
    pub paths: Vec<String>,
}

impl Assignments {
    /// Reads the body of a `set` or `select` (`kind`): a mapping of output paths to
    /// expressions over the fields of `input` (None: not known, so only the syntax is checked).
    pub fn parse(kind: &str, body: &Yaml, input: Option<&Schema>, location: &str, problems: &mut ConfigErrors) -> Option<Assignments> {
        let location = format!("{location}.{kind}");
        let Some(mapping) = body.as_mapping().filter(|mapping| !mapping.is_empty()) else {
            problems.push(location, "must be a mapping of field names to expressions, e.g. `total: \"qty * price\"`");
            return None;
        };
        let before = problems.problems.len();
        let mut assignments = Vec::new();
        for (path, expression) in mapping {
            let (Some(path), Some(expression)) = (path.as_str(), yaml_expression(expression)) else {
                problems.push(&location, "each entry is `field: expression` (text, a number or a boolean)");
                continue;
            };
            let entry_location = format!("{location}.{path}");
            if let Some(problem) = path_problem(path) {
                problems.push(&entry_location, problem);
                continue;
            }
            let Some(input) = input else {
                if let Err(problem) = Expression::check_syntax(&expression) {
                    problems.push(&entry_location, problem.to_string());
                }
                continue;
            };
            match Expression::compile(&expression, input).and_then(|compiled| compiled.field_type()) {
                Ok(field_type) => assignments.push(Assignment { path: path.to_string(), expression, field_type }),
                Err(problem) => problems.push(&entry_location, problem.to_string()),
            }
        }
        let parsed = Assignments { assignments };
        // The schema it makes must hold together (`a: ...` then `a.b: ...` does not).
        if let Some(input) = input
            && problems.problems.len() == before
            && let Err(problem) = parsed.output_schema(kind == "select", input)
        {
            problems.push(&location, problem.to_string());
        }
        (problems.problems.len() == before && input.is_some()).then_some(parsed)
    }

    /// The schema of the records it hands on: `input` with the assignments written in
    /// (`set`), or the assignments alone (`select`).
    pub fn output_schema(&self, select: bool, input: &Schema) -> Result<Schema, ShapeError> {
        let mut schema = match select {
            true => Schema { fields: Vec::new() },
            false => input.clone(),
        };
        for assignment in &self.assignments {
            schema = schema
                .with_field(&assignment.path, assignment.field_type.clone())
                .map_err(|problem| ShapeError::Unwritable { path: assignment.path.clone(), reason: Box::new(problem) })?;
        }
        Ok(schema)
    }

    /// Whether it writes `field` or a field inside it or around it.
    pub fn writes(&self, field: &str) -> bool {
        self.assignments.iter().any(|assignment| overlaps(&assignment.path, field))
    }

    /// Whether a `select` keeps `field` as it was (`field: field`).
    pub fn keeps(&self, field: &str) -> bool {
        self.assignments.iter().any(|assignment| assignment.path == field && assignment.expression.trim() == field)
    }
}

impl Drop {
    /// Reads the body of a `drop`: a list of fields of `input`.
    pub fn parse(body: &Yaml, input: Option<&Schema>, location: &str, problems: &mut ConfigErrors) -> Option<Drop> {
        let location = format!("{location}.drop");
        let paths: Option<Vec<String>> = match body {
            Yaml::Sequence(items) if !items.is_empty() => items.iter().map(|item| item.as_str().map(str::to_string)).collect(),
            _ => None,
        };
        let Some(paths) = paths else {
            problems.push(location, "must be a list of field names, e.g. `[debug, internal.trace]`");
            return None;
        };
        let drop = Drop { paths };
        if let Some(input) = input
            && let Err(problem) = drop.output_schema(input)
        {
            problems.push(location, problem.to_string());
            return None;
        }
        input.map(|_| drop)
    }

    pub fn output_schema(&self, input: &Schema) -> Result<Schema, ShapeError> {
        let mut schema = input.clone();
        for path in &self.paths {
            schema = schema.without_field(path)?;
        }
        if schema.fields.is_empty() {
            return Err(ShapeError::NoFieldLeft);
        }
        Ok(schema)
    }

    pub fn removes(&self, field: &str) -> bool {
        self.paths.iter().any(|path| overlaps(path, field))
    }
}

/// An expression as YAML gives it: text, or a bare number or boolean (`rate: 1.5`).
fn yaml_expression(value: &Yaml) -> Option<String> {
    match value {
        Yaml::String(text) => Some(text.clone()),
        Yaml::Number(number) => Some(number.to_string()),
        Yaml::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn path_problem(path: &str) -> Option<String> {
    if path.split('.').any(str::is_empty) {
        return Some("is not a field path: names joined by dots".into());
    }
    if path.starts_with('_') && crate::operators::expression::METADATA_VARIABLES.contains(&path) {
        return Some("is record metadata, which a step cannot write; choose another name".into());
    }
    None
}

/// Whether one path is the other or inside it.
fn overlaps(left: &str, right: &str) -> bool {
    let inside = |outer: &str, inner: &str| inner == outer || inner.starts_with(&format!("{outer}."));
    inside(left, right) || inside(right, left)
}

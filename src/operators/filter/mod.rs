//! `filter`: keeps the records for which a CEL expression is true.
//!
//! The record's fields are CEL variables by name, and so is its metadata: `_topic`,
//! `_partition`, `_offset`, `_timestamp` (epoch ms, or null) and `_headers` (a map of UTF-8
//! text). An expression that does not evaluate to a boolean for a record (a null field
//! compared with a number, say) is a process error for that record, not a crash.

use std::collections::HashMap;
use std::sync::Arc;

use cel::objects::{Key, Value as CelValue};
use cel::{Context, Env, Program};
use serde_json::Value;

use super::{BuildError, Emitted, StepOutcome, ProcessError, Record};
pub mod config;

use crate::config::{Encoding, Source};

const METADATA_VARIABLES: &[&str] = &["_topic", "_partition", "_offset", "_timestamp", "_headers"];

/// A compiled expression, checked against the source's fields.
pub struct FilterExpression {
    program: Program,
}

impl FilterExpression {
    /// Checks only that `expression` parses.
    pub fn check_syntax(expression: &str) -> Result<(), BuildError> {
        parse(expression).map(drop)
    }

    /// Compiles `expression`; the error names what is wrong in words a user can act on.
    pub fn compile(expression: &str, source: &Source) -> Result<FilterExpression, BuildError> {
        let program = parse(expression)?;
        let fields: Vec<&str> = match (&source.schema, source.encoding) {
            (Some(schema), _) => schema.fields.iter().map(|(name, _)| name.as_str()).collect(),
            (None, Encoding::String) => vec!["value"],
            _ => Vec::new(),
        };
        let references = program.references();
        let mut unknown: Vec<&str> = references
            .variables()
            .into_iter()
            .filter(|name| !fields.contains(name) && !METADATA_VARIABLES.contains(name))
            .collect();
        unknown.sort_unstable();
        if !unknown.is_empty() {
            return Err(BuildError(format!(
                "'{expression}' names {} not in the record; fields: {}; metadata: {}",
                unknown.iter().map(|name| format!("'{name}'")).collect::<Vec<_>>().join(", "),
                fields.join(", "),
                METADATA_VARIABLES.join(", ")
            )));
        }
        Ok(FilterExpression { program })
    }
}

fn parse(expression: &str) -> Result<Program, BuildError> {
    Program::compile(expression).map_err(|error| BuildError(format!("'{expression}' is not a valid CEL expression: {error}")))
}

pub struct FilterOperator {
    expression: String,
    compiled: FilterExpression,
    /// The standard functions, shared; a root context over it is cheap to make per record
    /// and, unlike a context kept here, lets the operator move between threads.
    environment: Arc<Env>,
}

impl FilterOperator {
    pub fn new(expression: &str, source: &Source) -> Result<FilterOperator, BuildError> {
        Ok(FilterOperator {
            expression: expression.to_string(),
            compiled: FilterExpression::compile(expression, source)?,
            environment: Arc::new(Env::stdlib()),
        })
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    pub fn process<'a>(&mut self, record: Record<'a>, out: &mut Vec<Emitted<'a>>) -> Result<StepOutcome, ProcessError> {
        let keep = self.matches(&record)?;
        if keep {
            out.push(Emitted::Record(record));
            Ok(StepOutcome::Passed)
        } else {
            Ok(StepOutcome::Dropped)
        }
    }

    fn matches(&self, record: &Record<'_>) -> Result<bool, ProcessError> {
        let root = Context::with_env(self.environment.clone());
        let mut scope = root.new_inner_scope();
        for (name, value) in &record.fields {
            scope.add_variable_from_value(name.as_str(), to_cel(value));
        }
        // Records a step derived (window results) have no Kafka metadata.
        let provenance = record.provenance;
        scope.add_variable_from_value("_topic", provenance.map_or(CelValue::Null, |p| CelValue::from(p.topic)));
        scope.add_variable_from_value("_partition", provenance.map_or(CelValue::Null, |p| CelValue::Int(i64::from(p.partition))));
        scope.add_variable_from_value("_offset", provenance.map_or(CelValue::Null, |p| CelValue::Int(p.offset)));
        scope.add_variable_from_value(
            "_timestamp",
            provenance.and_then(|p| p.timestamp).map(CelValue::Int).unwrap_or(CelValue::Null),
        );
        let headers: HashMap<Key, CelValue> = provenance
            .map(|provenance| provenance.headers)
            .unwrap_or_default()
            .iter()
            .map(|(name, value)| {
                let text = value.map(|bytes| String::from_utf8_lossy(bytes).into_owned());
                (Key::from(name.to_string()), text.map(CelValue::from).unwrap_or(CelValue::Null))
            })
            .collect();
        scope.add_variable_from_value("_headers", headers);
        // The CEL interpreter sees the record's values; a panic there is this record's
        // process error.
        let result = crate::panics::contain(|| self.compiled.program.execute(&scope))
            .map_err(|panic| ProcessError(format!("filter '{}' failed: the expression panicked: {panic}", self.expression)))?;
        match result {
            Ok(CelValue::Bool(keep)) => Ok(keep),
            Ok(other) => Err(ProcessError(format!(
                "filter '{}' gave {other:?}, not a boolean",
                self.expression
            ))),
            Err(error) => Err(ProcessError(format!("filter '{}' failed: {error}", self.expression))),
        }
    }
}

fn to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(flag) => CelValue::Bool(*flag),
        Value::Number(number) => {
            if let Some(whole) = number.as_i64() {
                CelValue::Int(whole)
            } else if let Some(unsigned) = number.as_u64() {
                CelValue::UInt(unsigned)
            } else {
                CelValue::Float(number.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(text) => CelValue::String(Arc::new(text.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(object) => {
            let map: HashMap<Key, CelValue> = object
                .iter()
                .map(|(name, value)| (Key::from(name.clone()), to_cel(value)))
                .collect();
            CelValue::from(map)
        }
    }
}

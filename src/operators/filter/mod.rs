//! `filter`: keeps the records for which a CEL expression is true.
//!
//! The expression sees the record's fields and metadata (see [`super::expression`]). An
//! expression that does not give a boolean for a record (a null field compared with a
//! number, say) is a process error for that record, not a crash.

use std::sync::Arc;

use cel::objects::Value as CelValue;
use cel::Env;

use super::expression::{standard_environment, Bindings, Expression, ValueType};
use super::native::{Native, Plain};
use super::{BuildError, Emitted, ProcessError, Record, StepOutcome};
use crate::config::{FieldType, Schema};
pub mod config;

/// A compiled filter expression, checked against the fields of the records it sees.
pub struct FilterExpression {
    expression: Expression,
    /// The expression evaluated natively, where all of it is plain (see [`Native`]).
    native: Option<Native>,
}

impl FilterExpression {
    /// Checks only that `expression` parses.
    pub fn check_syntax(expression: &str) -> Result<(), BuildError> {
        Expression::check_syntax(expression)
    }

    /// Compiles `expression`; the error names what is wrong in words a user can act on.
    pub fn compile(expression: &str, input: &Schema) -> Result<FilterExpression, BuildError> {
        let compiled = Expression::compile(expression, input)?;
        match compiled.value_type() {
            ValueType::Known(FieldType::Boolean) | ValueType::Unknown => {
                let native = Native::compile(compiled.tree(), &|name| input.field_type(name).is_some());
                Ok(FilterExpression { expression: compiled, native })
            }
            ValueType::Known(other) => {
                Err(BuildError(format!("'{expression}' gives a {}, not a boolean; a filter keeps a record when it is true", other.describe())))
            }
            ValueType::Null | ValueType::Headers => {
                Err(BuildError(format!("'{expression}' does not give a boolean; a filter keeps a record when it is true")))
            }
        }
    }
}

pub struct FilterOperator {
    compiled: FilterExpression,
    /// The standard functions, shared; a root context over it is cheap to make per record
    /// and, unlike a context kept here, lets the operator move between threads.
    environment: Arc<Env>,
}

impl FilterOperator {
    pub fn new(expression: &str, input: &Schema) -> Result<FilterOperator, BuildError> {
        Ok(FilterOperator { compiled: FilterExpression::compile(expression, input)?, environment: standard_environment() })
    }

    pub fn expression(&self) -> &str {
        self.compiled.expression.text()
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
        // Plain records of a plain expression need no interpreter; the rest take it.
        if let Some(Plain::Bool(keep)) = self.compiled.native.as_ref().and_then(|native| native.evaluate(&record.fields)) {
            return Ok(keep);
        }
        let bindings = Bindings::of(record, &self.environment, self.compiled.expression.reads());
        match self.compiled.expression.evaluate(&bindings) {
            Ok(CelValue::Bool(keep)) => Ok(keep),
            Ok(other) => Err(ProcessError(format!("filter '{}' gave {other:?}, not a boolean", self.expression()))),
            Err(error) => Err(ProcessError(format!("filter {}", error.0))),
        }
    }
}

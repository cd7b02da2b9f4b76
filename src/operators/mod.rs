//! The steps of a pipeline. Operators are synchronous and deterministic: they see one record
//! at a time and read time only from records, never from the wall clock. The set is closed,
//! so an enum dispatches to one struct per operator file.

pub mod filter;

use serde_json::{Map, Value};

use crate::config::{Source, Step};
use filter::FilterOperator;

/// Where a record came from, for expressions (`_topic`, ...) and for DLQ provenance.
#[derive(Debug, Clone, Copy)]
pub struct Provenance<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
}

/// A decoded record on its way through the steps.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub fields: Map<String, Value>,
    pub provenance: Provenance<'a>,
}

/// What an operator decided about a record.
#[derive(Debug)]
pub enum Verdict {
    Keep,
    Drop,
}

/// A record-level failure inside a step (bad data, not a bug): goes where `on_error.process`
/// says.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ProcessError(pub String);

pub enum Operator {
    Filter(FilterOperator),
}

impl Operator {
    pub fn build(step: &Step, source: &Source) -> Result<Operator, String> {
        match step {
            Step::Filter(filter) => FilterOperator::new(&filter.expression, source).map(Operator::Filter),
        }
    }

    pub fn apply(&mut self, record: &Record<'_>) -> Result<Verdict, ProcessError> {
        match self {
            Operator::Filter(filter) => filter.apply(record),
        }
    }

    /// A short description for `weir validate`'s plan.
    pub fn describe(&self) -> String {
        match self {
            Operator::Filter(filter) => format!("filter {}", filter.expression()),
        }
    }
}

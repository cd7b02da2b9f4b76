//! The headers of sink records (`sink.headers`): the input record's, where each output comes
//! from one input record and `pass_through` holds, then the `set` ones (replacing headers of
//! the same name), then weir's own (upsert ids, added by the engine).

use std::sync::Arc;

use cel::Env;
use serde_json::Value;

use crate::operators::expression::{standard_environment, Bindings, Expression};
use crate::operators::{BuildError, ProcessError, Record};
use crate::plan::Pipeline;

pub struct SinkHeaders {
    pass_through: bool,
    set: Vec<(String, Expression)>,
    /// The header names the expressions read by name.
    wanted: Vec<String>,
    environment: Arc<Env>,
}

impl SinkHeaders {
    pub fn new(pipeline: &Pipeline) -> Result<SinkHeaders, BuildError> {
        let schema = pipeline.output_schema();
        let set = pipeline
            .sink
            .headers
            .set
            .iter()
            .map(|(name, expression)| Ok((name.clone(), Expression::compile(expression, &schema)?)))
            .collect::<Result<Vec<_>, BuildError>>()?;
        let mut wanted: Vec<String> = set.iter().flat_map(|(_, expression)| expression.headers().iter().cloned()).collect();
        wanted.sort_unstable();
        wanted.dedup();
        Ok(SinkHeaders { pass_through: pipeline.sink.passes_headers(), set, wanted, environment: standard_environment() })
    }

    /// The headers of the sink record made from `record`. Err: a `set` expression failed
    /// for it (a process error of that record).
    pub fn of(&self, record: &Record<'_>) -> Result<Vec<(String, Vec<u8>)>, ProcessError> {
        let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
        if self.pass_through
            && let Some(provenance) = record.provenance
        {
            headers.extend(provenance.headers.iter().filter_map(|(name, value)| Some((name.to_string(), (*value)?.to_vec()))));
        }
        if self.set.is_empty() {
            return Ok(headers);
        }
        let bindings = Bindings::of(record, &self.environment, &self.wanted);
        for (name, expression) in &self.set {
            let value = expression.evaluate_field(&bindings)?;
            replace(&mut headers, name, header_text(value));
        }
        Ok(headers)
    }
}

/// Puts `value` under `name` in place of any header of that name (None: removes them).
pub fn replace(headers: &mut Vec<(String, Vec<u8>)>, name: &str, value: Option<Vec<u8>>) {
    headers.retain(|(existing, _)| existing != name);
    if let Some(value) = value {
        headers.push((name.to_string(), value));
    }
}

/// A header value: text as it is, numbers and booleans as JSON writes them; null: none.
fn header_text(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::Null => None,
        Value::String(text) => Some(text.into_bytes()),
        other => Some(other.to_string().into_bytes()),
    }
}

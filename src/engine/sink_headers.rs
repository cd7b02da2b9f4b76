//! The headers of sink records (`sink.headers`): the input record's, where each output comes
//! from one input record and `pass_through` holds, then the `set` ones (replacing headers of
//! the same name), then weir's own (upsert ids, added by the engine).

use std::sync::Arc;

use cel::Env;
use serde_json::Value;

use crate::operators::expression::{standard_environment, Bindings, Expression, Reads};
use crate::operators::{BuildError, ProcessError, Record};
use crate::plan::Pipeline;

pub struct SinkHeaders {
    pass_through: bool,
    set: Vec<(String, Expression)>,
    /// What the expressions read of a record.
    wanted: Reads,
    environment: Arc<Env>,
}

impl SinkHeaders {
    /// The headers of output `output`'s sink records.
    pub fn new(pipeline: &Pipeline, output: usize) -> Result<SinkHeaders, BuildError> {
        let schema = pipeline.output_schema(output);
        let sink = &pipeline.outputs[output].sink;
        let set = sink
            .headers
            .set
            .iter()
            .map(|(name, expression)| Ok((name.clone(), Expression::compile(expression, &schema)?)))
            .collect::<Result<Vec<_>, BuildError>>()?;
        let wanted = Reads::of(set.iter().map(|(_, expression)| expression));
        Ok(SinkHeaders { pass_through: sink.passes_headers(), set, wanted, environment: standard_environment() })
    }

    /// The headers of the sink record made from `record`. Err: a `set` expression failed
    /// for it (a process error of that record).
    pub fn of(&self, record: &Record<'_>) -> Result<Vec<(String, Vec<u8>)>, ProcessError> {
        let mut headers = match (self.pass_through, record.provenance) {
            (true, Some(provenance)) => provenance.owned_headers(),
            _ => Vec::new(),
        };
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

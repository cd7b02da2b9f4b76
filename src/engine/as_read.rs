//! Records written as they were read. Where every output writes the source's records as
//! decoded (JSON values and keys in and out, only filters and dedups on the way, one stage, no
//! header expressions), a value already in the encoder's form goes out as its input bytes, so of
//! its fields only those something reads need to be kept: the event time, what the
//! filters' expressions name, the dedup keys and the sinks' keys. The others are checked
//! (a value is taken as read only if it is the encoding of every declared field) and left.

use crate::config::{Encoding, EventTime, TimeOrigin};
use crate::operators::Step;
use crate::operators::expression::Expression;
use crate::plan::Pipeline;

/// The fields something reads of a record, when the records of every output are written as
/// read; None when a record's fields may be written, forwarded or shown whole.
pub(super) fn fields_read(pipeline: &Pipeline) -> Option<Vec<String>> {
    let whole = pipeline.join().is_some()
        || pipeline.stages().stages.len() != 1
        // A header expression that fails, or a key the sink's format cannot take, sends the
        // record's fields to the DLQ: they must all be there.
        || (0..pipeline.outputs.len()).any(|output| {
            let sink = &pipeline.outputs[output].sink;
            !pipeline.writes_records_as_read(output) || !sink.headers.set.is_empty() || sink.key_encoding != Encoding::Json
        });
    if whole {
        return None;
    }
    let schema = pipeline.source.schema.as_ref()?;
    let mut wanted = Vec::new();
    if let Some(EventTime { origin: TimeOrigin::Field { path, .. }, .. }) = &pipeline.source.event_time {
        wanted.push(path.split('.').next().unwrap_or(path).to_string());
    }
    for step in &pipeline.steps {
        match step {
            Step::Filter(filter) => wanted.extend(Expression::compile(&filter.expression, schema).ok()?.reads().variables().iter().cloned()),
            Step::Dedup(dedup) => wanted.extend(dedup.key.iter().cloned()),
            _ => return None,
        }
    }
    for output in &pipeline.outputs {
        wanted.extend(output.sink.key.iter().cloned());
    }
    Some(wanted)
}

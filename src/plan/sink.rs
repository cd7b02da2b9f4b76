//! The sink checked against the rest of the plan: its headers (what may pass through, what
//! the `set` expressions give) and what `mode: idempotent_upsert` can run.

use super::Pipeline;
use crate::config::{ConfigErrors, Encoding, FieldType, SourceTopics};
use crate::operators::expression::{Expression, ValueType};
use crate::operators::window::config::EmitMode;
use crate::operators::Step;

/// The position in the file's `steps` of the pipeline's step `index` (a join is step 0 of
/// the pipeline but not in the file's list).
fn file_index(pipeline: &Pipeline, index: usize) -> usize {
    index.saturating_sub(usize::from(pipeline.join().is_some()))
}

/// Settles `sink.headers.pass_through` (default: true where each output comes from one input
/// record, the only place it is allowed) and checks the `set` expressions against the
/// sink's records: each must give text, a number or a boolean.
pub(super) fn settle_sink_headers(pipeline: &mut Pipeline, problems: &mut ConfigErrors) {
    let merging = pipeline.steps.iter().find(|step| matches!(step, Step::Window(_) | Step::Join(_)));
    let headers = &pipeline.sink.headers;
    let pass_through = match (headers.pass_through, merging) {
        (Some(true), Some(step)) => {
            let kind = if matches!(step, Step::Window(_)) { "a window's" } else { "a join's" };
            problems.push(
                "sink.headers.pass_through",
                format!("{kind} results come from several input records, whose headers differ; remove pass_through or set it false"),
            );
            false
        }
        (Some(written), _) => written,
        (None, merging) => merging.is_none(),
    };
    let schema = pipeline.output_schema();
    for (name, expression) in &headers.set {
        let location = format!("sink.headers.set.{name}");
        match Expression::compile(expression, &schema).map(|compiled| compiled.value_type().clone()) {
            Ok(ValueType::Known(FieldType::Object(_)) | ValueType::Headers | ValueType::Unknown) => problems.push(
                location,
                format!("'{expression}' must give text, a number or a boolean; convert it with string()"),
            ),
            Ok(_) => {}
            Err(problem) => problems.push(location, problem.to_string()),
        }
    }
    pipeline.sink.headers.pass_through = Some(pass_through);
}

/// What `mode: idempotent_upsert` runs in this version: at most one repartition. Without
/// transactions a stage-0 task that replays after a crash writes its forwards to the
/// repartition topic again; each carries its place in its sender's sequence (the input
/// offset), and the receiving task drops what it took before. Past a second repartition
/// that sequence depends on how the first one's partitions interleaved. An `emit: update`
/// window's outputs depend on where batches end, so their ids would carry different values
/// across a replay.
pub(super) fn check_upsert(pipeline: &Pipeline, problems: &mut ConfigErrors) {
    const WHY: &str = "idempotent_upsert";
    for (index, step) in pipeline.steps.iter().enumerate() {
        if let Step::Window(window) = step
            && window.emit == EmitMode::Update
        {
            problems.push(
                format!("steps[{index}].window.emit"),
                format!("{WHY} writes each window once, with emit: final; emit: update results depend on batch boundaries"),
            );
        }
    }
    // A window result's id is its group and its `window_start` field as the result leaves
    // the steps: a step after the window must leave that field as it is.
    let first_window = pipeline.steps.iter().position(|step| matches!(step, Step::Window(_)));
    for (index, step) in pipeline.steps.iter().enumerate().skip(first_window.map_or(usize::MAX, |window| window + 1)) {
        if step.rewrites("window_start") {
            problems.push(
                format!("steps[{index}]"),
                format!("{WHY} ids of window results are their group and window_start; leave window_start as the window made it"),
            );
        }
    }
    for (index, step) in pipeline.steps.iter().enumerate() {
        if let Step::Explode(_) = step {
            problems.push(
                format!("steps[{}].explode", file_index(pipeline, index)),
                format!("{WHY} gives each output the id of its input; explode makes several outputs of one input; use transactional"),
            );
        }
    }
    if !pipeline.sink.key.is_empty() {
        problems.push("sink.key", format!("{WHY} keys every output by its id (see README); remove sink.key"));
    }
    let several_topics = match &pipeline.source.topics {
        SourceTopics::List(topics) => topics.len() > 1,
        SourceTopics::Pattern(_) => true,
    };
    if several_topics && pipeline.steps.iter().any(Step::is_stateful) {
        problems.push(
            format!("sources.{}", pipeline.source.name),
            format!("{WHY} ids of window and dedup results are unique within one source topic; read a single topic"),
        );
    }
    if pipeline.sink.key_encoding == Encoding::Avro {
        problems.push("sink.key_format", format!("{WHY} keys every output by its id, as JSON"));
    }
    if pipeline.stages().stages.len() > 2 {
        problems.push(
            "sink.mode",
            format!(
                "{WHY} repartitions at most once: a replayed record is recognised by where its input partition put it, \
                 which a second repartition topic no longer tells. Key the later steps by the first repartition's key, \
                 or use transactional"
            ),
        );
    }
}

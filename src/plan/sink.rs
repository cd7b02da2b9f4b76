//! The sinks checked against the rest of the plan: their headers (what may pass through,
//! what the `set` expressions give), their formats, and what `mode: idempotent_upsert` can
//! run.

use std::collections::BTreeSet;

use super::Pipeline;
use crate::codec::avro::AvroEncoder;
use crate::config::{ConfigErrors, DeliveryMode, Encoding, FieldType, SourceTopics};
use crate::operators::expression::{Expression, ValueType};
use crate::operators::window::config::EmitMode;
use crate::operators::Step;

/// Settles an output's `sink.headers.pass_through` (default: true where each record comes
/// from one input record, the only place it is allowed) and checks the `set` expressions
/// against the sink's records: each must give text, a number or a boolean.
pub(super) fn settle_sink_headers(pipeline: &mut Pipeline, output: usize, problems: &mut ConfigErrors) {
    let chain = pipeline.chain(output);
    let merging = chain
        .iter()
        .map(|index| &pipeline.steps[*index])
        .find(|step| matches!(step, Step::Window(_) | Step::Aggregate(_) | Step::Join(_)));
    let sink = &pipeline.outputs[output].sink;
    let headers = &sink.headers;
    let pass_through = match (headers.pass_through, merging) {
        (Some(true), Some(step)) => {
            let kind = match step {
                Step::Window(_) => "a window's",
                Step::Aggregate(_) => "an aggregate's",
                _ => "a join's",
            };
            problems.push(
                format!("{}.headers.pass_through", sink.location),
                format!("{kind} results come from several input records, whose headers differ; remove pass_through or set it false"),
            );
            false
        }
        (Some(written), _) => written,
        (None, merging) => merging.is_none(),
    };
    let schema = pipeline.output_schema(output);
    for (name, expression) in &headers.set {
        let location = format!("{}.headers.set.{name}", sink.location);
        match Expression::compile(expression, &schema).map(|compiled| compiled.value_type().clone()) {
            Ok(ValueType::Known(FieldType::Object(_)) | ValueType::Headers | ValueType::Unknown) => problems.push(
                location,
                format!("'{expression}' must give text, a number or a boolean; convert it with string()"),
            ),
            Ok(_) => {}
            Err(problem) => problems.push(location, problem.to_string()),
        }
    }
    pipeline.outputs[output].sink.headers.pass_through = Some(pass_through);
}

/// An output's formats against its records: an Avro writer schema must derive from them,
/// and Avro keys need fields to be made from.
pub(super) fn check_formats(pipeline: &Pipeline, output: usize, problems: &mut ConfigErrors) {
    let sink = &pipeline.outputs[output].sink;
    if sink.encoding == Encoding::Avro
        && let Err(problem) = AvroEncoder::new(&pipeline.output_schema(output), &pipeline.avro_record_name(output))
    {
        problems.push(format!("{}.format", sink.location), problem.to_string());
    }
    if sink.key_encoding == Encoding::Avro {
        let location = format!("{}.key_format", sink.location);
        match pipeline.output_key_schema(output) {
            None => problems.push(
                location,
                format!(
                    "avro keys are made from fields: set {}.key, or use a dedup, window or join (whose key it is); \
                     records without one keep each input record's key bytes as they are",
                    sink.location
                ),
            ),
            Some(schema) => {
                if let Err(problem) = AvroEncoder::new(&schema, &format!("{}-key", pipeline.avro_record_name(output))) {
                    problems.push(location, problem.to_string());
                }
            }
        }
    }
}

/// What an output with `mode: idempotent_upsert` can be given. Its records carry ids made
/// from their inputs, the same on every replay: an `emit: update` window's results depend on
/// where batches end, an explode gives one input's id to several records, a step after a
/// window that rewrites `window_start` changes a window result's id, and ids of window and
/// dedup results are unique within one source topic.
///
/// A pipeline whose outputs are all upsert runs without transactions, so it repartitions at
/// most once: a stage-0 task that replays after a crash writes its forwards to the
/// repartition topic again; each carries its place in its sender's sequence (the input
/// offset), and the receiving task drops what it took before. Past a second repartition that
/// sequence depends on how the first one's partitions interleaved. (An upsert output of a
/// pipeline with a transactional one is written in the transaction, with its ids.)
pub(super) fn check_upsert(pipeline: &Pipeline, problems: &mut ConfigErrors) {
    const WHY: &str = "idempotent_upsert";
    let upserting: Vec<usize> =
        (0..pipeline.outputs.len()).filter(|output| pipeline.outputs[*output].sink.mode == DeliveryMode::IdempotentUpsert).collect();
    // The steps the upsert outputs' records pass, each once, in order.
    let steps: BTreeSet<usize> = upserting.iter().flat_map(|output| pipeline.chain(*output)).collect();
    for index in &steps {
        let (step, location) = (&pipeline.steps[*index], &pipeline.step_locations[*index]);
        if let Step::Window(window) = step
            && window.emit == EmitMode::Update
        {
            problems.push(
                format!("{location}.window.emit"),
                format!("{WHY} writes each window once, with emit: final; emit: update results depend on batch boundaries"),
            );
        }
        if let Step::Aggregate(_) = step {
            problems.push(
                format!("{location}.aggregate"),
                format!("{WHY} writes each result once; an aggregate's updates depend on batch boundaries; use transactional"),
            );
        }
        // A window result's id is its group and its `window_start` field as the result
        // leaves the steps: a step after the window must leave that field as it is.
        let after_window = pipeline.lineage(pipeline.parent(*index)).iter().any(|earlier| matches!(pipeline.steps[*earlier], Step::Window(_)));
        if after_window && step.rewrites("window_start") {
            problems.push(
                location.clone(),
                format!("{WHY} ids of window results are their group and window_start; leave window_start as the window made it"),
            );
        }
        if let Step::Explode(_) = step {
            problems.push(
                format!("{location}.explode"),
                format!("{WHY} gives each output the id of its input; explode makes several outputs of one input; use transactional"),
            );
        }
    }
    for sink in upserting.iter().map(|output| &pipeline.outputs[*output].sink) {
        if !sink.key.is_empty() {
            problems.push(format!("{}.key", sink.location), format!("{WHY} keys every output by its id (see README); remove the key"));
        }
        if sink.key_encoding == Encoding::Avro {
            problems.push(format!("{}.key_format", sink.location), format!("{WHY} keys every output by its id, as JSON"));
        }
    }
    let several_topics = match &pipeline.source.topics {
        SourceTopics::List(topics) => topics.len() > 1,
        SourceTopics::Pattern(_) => true,
    };
    if several_topics && steps.iter().any(|index| pipeline.steps[*index].is_stateful()) {
        problems.push(
            format!("sources.{}", pipeline.source.name),
            format!("{WHY} ids of window and dedup results are unique within one source topic; read a single topic"),
        );
    }
    // Without transactions, each repartition is fed by stage 0's tasks, the input
    // partitions'.
    if pipeline.mode() == DeliveryMode::IdempotentUpsert
        && pipeline.stages().stages.iter().any(|stage| stage.parent.is_some_and(|parent| parent > 0))
    {
        problems.push(
            format!("{}.mode", pipeline.outputs[0].sink.location),
            format!(
                "{WHY} repartitions at most once: a replayed record is recognised by where its input partition put it, \
                 which a second repartition topic no longer tells. Key the later steps by the first repartition's key, \
                 or use transactional"
            ),
        );
    }
}

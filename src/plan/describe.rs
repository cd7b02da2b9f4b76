//! The human-readable plan printed by `weir validate`.

use std::fmt::Write;

use super::Loaded;
use crate::config::{DeliveryMode, SourceTopics};

pub fn describe(loaded: &Loaded) -> String {
    let Loaded { settings, pipeline } = loaded;
    let source = &pipeline.source;
    let mut text = String::new();
    let topics = match &source.topics {
        SourceTopics::List(topics) => topics.join(", "),
        SourceTopics::Pattern(pattern) => format!("pattern /{pattern}/"),
    };
    // Writing to a String cannot fail.
    let _ = writeln!(text, "pipeline {}: valid", pipeline.name);
    let _ = writeln!(text, "  source {}: {topics} ({}, read_committed)", source.name, source.encoding.as_str());
    let _ = writeln!(text, "    fields: {}", source.record_schema().describe());
    if let Some(join) = pipeline.join() {
        let _ = writeln!(text, "  source {}: {} ({}, read_committed)", join.right.name, topics_of(&join.right), join.right.encoding.as_str());
        let _ = writeln!(text, "    fields: {}", join.right.record_schema().describe());
    }
    for table in &pipeline.tables {
        let key = table.table.as_deref().unwrap_or_default().join(", ");
        let _ = writeln!(text, "  table {}: {} ({}, latest row per [{key}], read whole)", table.name, topics_of(table), table.encoding.as_str());
        let _ = writeln!(text, "    fields: {}", table.record_schema().describe());
    }
    let main: Vec<usize> = (0..pipeline.main_steps).collect();
    describe_steps(pipeline, &main, "  ", &mut text);
    let named = pipeline.has_named_outputs();
    for (index, output) in pipeline.outputs.iter().enumerate() {
        let indent = match named {
            false => "  ",
            true => {
                let from = output.from.map_or("the source".to_string(), |step| format!("step {step}"));
                let _ = writeln!(text, "  output {}: from {from}", output.name);
                describe_steps(pipeline, &output.steps, "    ", &mut text);
                "    "
            }
        };
        let sink = &output.sink;
        let key = sink_key(pipeline, index);
        let _ = writeln!(text, "{indent}sink: {} ({}, key: {key}, {})", sink.topic, sink.encoding.as_str(), sink.mode.as_str());
        let passed = if sink.passes_headers() { "the input record's" } else { "none of the input record's" };
        let set: Vec<String> = sink.headers.set.iter().map(|(name, expression)| format!("{name} = {expression}")).collect();
        let set = if set.is_empty() { String::new() } else { format!(", then {}", set.join(", ")) };
        let _ = writeln!(text, "{indent}sink headers: {passed}{set}");
    }
    let _ = writeln!(text, "  dlq: {}", pipeline.dlq_topic);
    let _ = writeln!(text, "  consumer group: {}", pipeline.name);
    match settings.runtime.workers.get() {
        1 => {
            let _ = writeln!(text, "  transactional id: {}-<instance>", pipeline.name);
        }
        workers => {
            let _ = writeln!(text, "  workers: {workers}, transactional ids {0}-<instance> and {0}-<instance>-w1 .. -w{1}", pipeline.name, workers - 1);
        }
    }
    let _ = writeln!(
        text,
        "  batches: every {} or {} records",
        humantime::format_duration(settings.runtime.commit_interval),
        settings.runtime.max_batch_records
    );
    let _ = writeln!(text, "  kafka: {}", settings.kafka.bootstrap_servers);
    for step in pipeline.stateful_steps() {
        let _ = writeln!(text, "  state of step {step}: changelog topic {}-{step}-changelog", pipeline.name);
    }
    for (_, topic) in pipeline.repartition_topics() {
        let _ = writeln!(text, "  repartition topic: {topic} (records move to the task that owns their key)");
    }
    text
}

/// The Kafka key an output's records get, in words.
fn sink_key(pipeline: &super::Pipeline, output: usize) -> String {
    match (pipeline.outputs[output].sink.mode, pipeline.output_key_schema(output)) {
        (DeliveryMode::IdempotentUpsert, _) => "each record's id, as in weir-id".to_string(),
        (_, Some(key)) => key.fields.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(", "),
        (_, None) => "the input record's key".to_string(),
    }
}

/// Steps in order, each with the schema it hands on and the repartition in front of it.
fn describe_steps(pipeline: &super::Pipeline, steps: &[usize], indent: &str, text: &mut String) {
    for index in steps {
        if let Some(key) = pipeline.repartitioned_before(*index) {
            let _ = writeln!(text, "{indent}then repartition by [{}]", key.join(", "));
        }
        let _ = writeln!(text, "{indent}step {index}: {}", pipeline.describe_step(*index));
        let _ = writeln!(text, "{indent}  out: {}", pipeline.schema_after(*index).describe());
    }
}

/// What `weir plan --check` found for a stateful step, against the definitions that wrote
/// the pipeline's state.
pub enum StoredState {
    /// Not checked (offline).
    Unknown,
    /// No state recorded for this step: it starts empty.
    New,
    Unchanged,
    /// The state was written by this other definition: a run refuses to start.
    Changed(String),
}

/// The plan printed by `weir plan`: the stages and their tasks, each stateful step's state
/// fingerprint and changelog, and every topic the pipeline reads, writes or owns.
/// `stored` says, per stateful step, how it compares with the state already in Kafka.
pub fn graph(loaded: &Loaded, stored: &dyn Fn(usize) -> StoredState) -> String {
    let Loaded { pipeline, .. } = loaded;
    let source = &pipeline.source;
    let topics = match pipeline.input_topics() {
        Some(topics) => topics.join(", "),
        None => topics_of(source),
    };
    let mut text = String::new();
    let _ = writeln!(text, "pipeline {}", pipeline.name);
    let stages = pipeline.stages();
    for (stage, planned) in stages.stages.iter().enumerate() {
        let (indices, key) = (&planned.steps, &planned.repartition_by);
        match (key, &stages.join_in_place) {
            (None, Some((left, right))) => {
                let _ = writeln!(
                    text,
                    "  stage {stage}: one task per partition number p, reading {left}[p] and {right}[p] (both partitioned by [{}]; the join runs in place)",
                    source.partitioned_by.join(", ")
                );
            }
            (None, None) => {
                let partitioned = match source.partitioned_by.is_empty() {
                    true => String::new(),
                    false => format!(", partitioned by [{}]", source.partitioned_by.join(", ")),
                };
                let _ = writeln!(text, "  stage {stage}: one task per partition of {topics}{partitioned}");
            }
            (Some(key), _) => {
                let first = indices.first().copied().unwrap_or(0);
                let _ = writeln!(
                    text,
                    "  stage {stage}: one task per partition of {}-{first}-repartition, records routed by a hash of [{}]",
                    pipeline.name,
                    key.join(", ")
                );
            }
        }
        for index in indices {
            let _ = writeln!(text, "    step {index}: {}", pipeline.describe_step(*index));
            if pipeline.stateful_steps().contains(index) {
                let verdict = match stored(*index) {
                    StoredState::Unknown => String::new(),
                    StoredState::New => ", no state yet (starts empty)".to_string(),
                    StoredState::Unchanged => ", matches the stored state".to_string(),
                    StoredState::Changed(was) => format!(", CHANGED: the stored state was written by `{was}`"),
                };
                let _ = writeln!(
                    text,
                    "      state fingerprint {}, changelog {}-{index}-changelog{verdict}",
                    pipeline.state_fingerprint(*index),
                    pipeline.name
                );
            }
        }
    }
    for (index, output) in pipeline.outputs.iter().enumerate() {
        let sink = &output.sink;
        let key = sink_key(pipeline, index);
        let name = if pipeline.has_named_outputs() { format!("output {}: ", output.name) } else { String::new() };
        let from = match (pipeline.has_named_outputs(), output.steps.last().copied().or(output.from)) {
            (true, Some(step)) => format!(", after step {step}"),
            _ => String::new(),
        };
        let _ = writeln!(text, "  {name}sink: {} (key: {key}, {}{from})", sink.topic, sink.mode.as_str());
    }
    let _ = writeln!(text, "topics");
    let _ = writeln!(text, "  read: {topics} (read_committed, consumer group {})", pipeline.name);
    for table in &pipeline.tables {
        let _ = writeln!(text, "  read: {} (table {}: every partition by every instance, read_committed)", topics_of(table), table.name);
    }
    let sinks: Vec<&str> = pipeline.sinks().map(|sink| sink.topic.as_str()).collect();
    let _ = writeln!(text, "  written: {} (results), {} (dead letters)", sinks.join(", "), pipeline.dlq_topic);
    let stateful = pipeline.stateful_steps();
    for step in &stateful {
        let _ = writeln!(text, "  internal: {}-{step}-changelog (compacted; the state of step {step})", pipeline.name);
    }
    for (stage, topic) in pipeline.repartition_topics() {
        let _ = writeln!(text, "  internal: {topic} (delete, purged once consumed; feeds stage {stage})");
    }
    if !stateful.is_empty() {
        let _ = writeln!(text, "  internal: {}-definitions (compacted; the step definitions that wrote the state)", pipeline.name);
    }
    text
}

fn topics_of(source: &crate::config::Source) -> String {
    match &source.topics {
        SourceTopics::List(topics) => topics.join(", "),
        SourceTopics::Pattern(pattern) => format!("topics matching /{pattern}/"),
    }
}

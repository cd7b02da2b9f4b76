//! The human-readable plan printed by `weir validate`.

use std::fmt::Write;

use crate::config::{Loaded, SourceTopics};
use crate::engine::Engine;

pub fn describe(loaded: &Loaded, engine: &Engine) -> String {
    let Loaded { settings, pipeline } = loaded;
    let source = &pipeline.source;
    let mut text = String::new();
    let topics = match &source.topics {
        SourceTopics::List(topics) => topics.join(", "),
        SourceTopics::Pattern(pattern) => format!("pattern /{pattern}/"),
    };
    // Writing to a String cannot fail.
    let _ = writeln!(text, "pipeline {}: valid", pipeline.name);
    let _ = writeln!(text, "  source {}: {topics} ({:?}, read_committed)", source.name, source.encoding);
    for (index, step) in engine.describe_steps().iter().enumerate() {
        let _ = writeln!(text, "  step {index}: {step}");
    }
    let key = if pipeline.sink.key.is_empty() { "input key".to_string() } else { pipeline.sink.key.join(", ") };
    let _ = writeln!(text, "  sink: {} (json, key: {key}, {:?})", pipeline.sink.topic, pipeline.sink.mode);
    let _ = writeln!(text, "  dlq: {}", pipeline.dlq_topic);
    let _ = writeln!(text, "  consumer group: {}", pipeline.name);
    let _ = writeln!(text, "  transactional id: {}-<instance>", pipeline.name);
    let _ = writeln!(
        text,
        "  batches: every {} or {} records",
        humantime::format_duration(settings.runtime.commit_interval),
        settings.runtime.max_batch_records
    );
    let _ = writeln!(text, "  kafka: {}", settings.kafka.bootstrap_servers);
    for step in engine.stateful_steps() {
        let _ = writeln!(text, "  state of step {step}: changelog topic {}-{step}-changelog", pipeline.name);
    }
    for (_, topic) in engine.repartition_topics() {
        let _ = writeln!(text, "  repartition topic: {topic} (records move to the task that owns their key)");
    }
    text
}

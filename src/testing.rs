//! `weir test`: runs a pipeline over a file of input records without a broker, through the
//! same engine as production, and prints (or checks) what it would write.
//!
//! Input lines: `{"source": "clicks", "partition": 0, "timestamp": 1700000000000,
//! "key": <json or null>, "value": <json or null>}`; a string key or value is taken as its
//! raw text (so broken JSON can be fed as a string). Records are processed in file order;
//! every `batch_size` lines end a batch (a transaction in production); the end of the input
//! closes everything, as if every watermark reached +infinity.
//! Output lines: `{"topic": ..., "key": ..., "value": ..., "headers": {...}}` for sink and DLQ
//! records; keys and values that are JSON are shown as JSON, others as strings.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::codec::avro;
use crate::config::{Encoding, SourceTopics};
use crate::plan::Pipeline;
use crate::engine::{ChangelogEntry, Clock, Destination, Engine, InputRecord, Output, RecordFailure, TableRecordError};
use crate::operators::{InputHeaders, Provenance};

#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error("input line {line}: {message}")]
    Input { line: usize, message: String },
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    RecordFailed(#[from] RecordFailure),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputLine {
    source: String,
    #[serde(default)]
    partition: i32,
    #[serde(default)]
    timestamp: Option<i64>,
    #[serde(default)]
    key: Value,
    #[serde(default)]
    value: Value,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// Runs `pipeline` over `input` (JSON lines) and returns the output lines.
pub fn run(pipeline: &Pipeline, input: &str, batch_size: usize) -> Result<Vec<String>, TestError> {
    run_with_restarts(pipeline, input, batch_size, None)
}

/// Like [`run`], but after every `restart_every` batches the engine is thrown away and a new
/// one is rebuilt from the changelog written so far (the last value per key, as a compacted
/// topic keeps it): what a process restarted after a crash does. The output must not change.
pub fn run_with_restarts(
    pipeline: &Pipeline,
    input: &str,
    batch_size: usize,
    restart_every: Option<usize>,
) -> Result<Vec<String>, TestError> {
    // Avro records are given and shown as JSON: no registry is involved. Avro sink records
    // are shown with the field names their schema has (`ads.ad` as `ads_ad`).
    let shown_names: Vec<AvroNames> = pipeline
        .sinks()
        .map(|sink| AvroNames { key: sink.key_encoding == Encoding::Avro, value: sink.encoding == Encoding::Avro })
        .collect();
    let pipeline = &pipeline.with_json_codecs();
    // The engine's default state entry limit is `weir run`'s with librdkafka's default
    // message.max.bytes: a record whose state would be too large goes to the DLQ here too.
    let mut engine = Engine::new(pipeline).map_err(|error| TestError::Setup(error.to_string()))?;
    let mut changelog: BTreeMap<(Option<String>, i32, usize, String), Value> = BTreeMap::new();
    let mut batches = 0;
    // Each source's records come from its first topic (a pattern's: one named after it).
    let topics: BTreeMap<String, String> = pipeline
        .sources()
        .into_iter()
        .chain(&pipeline.tables)
        .map(|source| {
            let topic = match &source.topics {
                SourceTopics::List(topics) => topics.first().cloned().unwrap_or_else(|| source.name.clone()),
                SourceTopics::Pattern(_) => source.name.clone(),
            };
            (source.name.clone(), topic)
        })
        .collect();
    // The partitions the file feeds: each holds the watermark after a repartition until it
    // delivers, as an assigned partition would.
    let mut partitions = std::collections::BTreeSet::new();
    // `event_time.max_ahead` reads the wall clock as the largest input timestamp (PIPELINE.md).
    let mut latest_timestamp = None;
    for text in input.lines().filter(|text| !text.trim().is_empty()) {
        if let Ok(line) = serde_json::from_str::<InputLine>(text)
            && let Some(topic) = topics.get(&line.source)
            && !engine.is_table_topic(topic)
        {
            partitions.insert((topic.clone(), line.partition));
            latest_timestamp = latest_timestamp.max(line.timestamp);
        }
    }
    let clock = Clock::Fixed(latest_timestamp.unwrap_or(0));
    let inputs: Vec<(String, i32)> = partitions.into_iter().collect();
    engine.set_input_partitions(inputs.iter().cloned());
    engine.set_clock(clock);
    let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut table_log: Vec<TableLine> = Vec::new();
    let mut outputs = Vec::new();
    let mut lines = Vec::new();
    let mut in_batch = 0;
    for (index, text) in input.lines().enumerate() {
        let line = index + 1;
        if text.trim().is_empty() {
            continue;
        }
        let parsed: InputLine = serde_json::from_str(text)
            .map_err(|error| TestError::Input { line, message: error.to_string() })?;
        let Some(topic) = topics.get(&parsed.source) else {
            let names: Vec<&str> = topics.keys().map(String::as_str).collect();
            return Err(TestError::Input {
                line,
                message: format!("source '{}' is not in the pipeline (it has '{}')", parsed.source, names.join("', '")),
            });
        };
        if parsed.partition < 0 {
            return Err(TestError::Input { line, message: "partition must be 0 or more".into() });
        }
        let offset = offsets.entry((topic.clone(), parsed.partition)).or_insert(0);
        let key = raw_bytes(&parsed.key);
        let value = raw_bytes(&parsed.value);
        let headers: Vec<(&str, Option<&[u8]>)> =
            parsed.headers.iter().map(|(name, value)| (name.as_str(), Some(value.as_bytes()))).collect();
        let input = InputRecord {
            provenance: Provenance {
                topic,
                partition: parsed.partition,
                offset: *offset,
                timestamp: parsed.timestamp,
                headers: InputHeaders::Read(&headers),
                key: key.as_deref(),
            },
            key: key.as_deref(),
            value: value.as_deref(),
        };
        *offset += 1;
        // Table lines are applied in file order, and kept: a restarted engine reads its
        // tables again, as `weir run` reads a table's topic.
        match engine.is_table_topic(topic) {
            true => {
                apply_table_line(&mut engine, &input, true)?;
                table_log.push((topic.clone(), parsed.partition, *offset - 1, key.clone(), value.clone()));
            }
            false => engine.process_kept(&input, &mut outputs)?,
        }
        in_batch += 1;
        if in_batch == batch_size {
            engine.end_batch(&mut outputs)?;
            in_batch = 0;
            for entry in engine.take_changes() {
                let key = (entry.topic, entry.partition, entry.step, entry.key);
                match entry.value {
                    Some(value) => changelog.insert(key, value),
                    None => changelog.remove(&key),
                };
            }
            batches += 1;
            if restart_every.is_some_and(|every| batches % every == 0) {
                engine = Engine::new(pipeline).map_err(|error| TestError::Setup(error.to_string()))?;
                engine.set_input_partitions(inputs.iter().cloned());
                engine.set_clock(clock);
                for (topic, partition, offset, key, value) in &table_log {
                    let provenance =
                        Provenance { topic, partition: *partition, offset: *offset, timestamp: None, headers: InputHeaders::Read(&[]), key: key.as_deref() };
                    apply_table_line(&mut engine, &InputRecord { provenance, key: key.as_deref(), value: value.as_deref() }, false)?;
                }
                for ((entry_topic, partition, step, key), value) in &changelog {
                    let entry = ChangelogEntry {
                        topic: entry_topic.clone(),
                        partition: *partition,
                        step: *step,
                        key: key.clone(),
                        value: Some(value.clone()),
                    };
                    engine
                        .restore(&entry)
                        .map_err(|message| TestError::Setup(format!("restoring state: {message}")))?;
                }
            }
        }
        render(pipeline, &shown_names, outputs.drain(..), &mut lines);
    }
    engine.finish(&mut outputs)?;
    render(pipeline, &shown_names, outputs.drain(..), &mut lines);
    Ok(lines)
}

/// Applies a table line. One that cannot be applied is reported on stderr (`report`: the
/// first time it is read), as `weir run` logs it, and changes nothing.
fn apply_table_line(engine: &mut Engine, input: &InputRecord<'_>, report: bool) -> Result<(), TestError> {
    match engine.apply_table_record(input) {
        Ok(()) => Ok(()),
        Err(TableRecordError::Bad(reason)) => {
            if report {
                let at = &input.provenance;
                eprintln!("skipped a table record at {}[{}]@{}: {reason}", at.topic, at.partition, at.offset);
            }
            Ok(())
        }
        Err(TableRecordError::Store(reason)) => Err(TestError::Setup(reason)),
    }
}

/// A table line read so far, to read the table again after a restart: (topic, partition,
/// offset, key, value).
type TableLine = (String, i32, i64, Option<Vec<u8>>, Option<Vec<u8>>);

fn raw_bytes(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::Null => None,
        Value::String(text) => Some(text.as_bytes().to_vec()),
        other => Some(other.to_string().into_bytes()),
    }
}

fn shown(bytes: Option<&[u8]>) -> Value {
    match bytes {
        None => Value::Null,
        Some(bytes) => serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned())),
    }
}

/// Which parts of sink records the real sink writes in Avro, whose field names are Avro-safe.
#[derive(Clone, Copy)]
struct AvroNames {
    key: bool,
    value: bool,
}

/// `value` with every field name (nested ones too) as the derived Avro schema spells it.
fn with_avro_names(value: Value) -> Value {
    match value {
        Value::Object(fields) => {
            Value::Object(fields.into_iter().map(|(name, value)| (avro::avro_name(&name), with_avro_names(value))).collect())
        }
        other => other,
    }
}

fn render(pipeline: &Pipeline, avro_names: &[AvroNames], outputs: impl Iterator<Item = Output>, lines: &mut Vec<String>) {
    for output in outputs {
        let (topic, avro_names) = match output.destination {
            Destination::Sink(index) => (&pipeline.outputs[index].sink.topic, avro_names[index]),
            Destination::Dlq => (&pipeline.dlq_topic, AvroNames { key: false, value: false }),
            // `weir test` runs every stage in process: nothing is forwarded.
            Destination::Repartition(_) => continue,
        };
        let named = |avro: bool, value: Value| if avro { with_avro_names(value) } else { value };
        let headers: Map<String, Value> = output
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), Value::String(String::from_utf8_lossy(value).into_owned())))
            .collect();
        let mut line = Map::new();
        line.insert("topic".into(), Value::String(topic.clone()));
        line.insert("key".into(), named(avro_names.key, shown(output.key.as_deref())));
        line.insert("value".into(), named(avro_names.value, shown(output.value.own())));
        line.insert("headers".into(), Value::Object(headers));
        lines.push(Value::Object(line).to_string());
    }
}

/// Compares actual output lines with expected ones (as JSON values); None when equal,
/// otherwise a readable report of what differs: a minimal diff (a line missing from the
/// middle is one difference, not a shift of every line after it).
pub fn compare(actual: &[String], expected: &str) -> Result<Option<String>, TestError> {
    let mut wanted = Vec::new();
    for (index, text) in expected.lines().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|error| TestError::Setup(format!("expected line {}: {error}", index + 1)))?;
        wanted.push(value.to_string());
    }
    let got: Vec<String> = actual
        .iter()
        .map(|line| serde_json::from_str::<Value>(line).map(|value| value.to_string()).unwrap_or_else(|_| line.clone()))
        .collect();
    if got == wanted {
        return Ok(None);
    }
    let operations = similar::capture_diff_slices(similar::Algorithm::Myers, &wanted, &got);
    let mut differences = String::new();
    let mut count = 0;
    for operation in operations {
        let (_, expected_lines, actual_lines) = operation.as_tag_tuple();
        let (expected_lines, actual_lines) = (&wanted[expected_lines], &got[actual_lines.clone()]);
        match operation {
            similar::DiffOp::Equal { .. } => continue,
            similar::DiffOp::Delete { old_index, .. } => {
                for (offset, line) in expected_lines.iter().enumerate() {
                    let _ = writeln!(differences, "line {} of the expected output:\n  - missing    {line}", old_index + offset + 1);
                }
            }
            similar::DiffOp::Insert { new_index, .. } => {
                for (offset, line) in actual_lines.iter().enumerate() {
                    let _ = writeln!(differences, "line {} of the output:\n  + unexpected {line}", new_index + offset + 1);
                }
            }
            similar::DiffOp::Replace { old_index, new_index, .. } => {
                let _ = writeln!(
                    differences,
                    "line {} of the expected output, line {} of the output:",
                    old_index + 1,
                    new_index + 1
                );
                for line in expected_lines {
                    let _ = writeln!(differences, "  - expected   {line}");
                }
                for line in actual_lines {
                    let _ = writeln!(differences, "  + actual     {line}");
                }
            }
        }
        count += 1;
    }
    let mut report = String::new();
    let _ = writeln!(
        report,
        "output differs from the expected lines ({} actual, {} expected; {count} difference{}):",
        got.len(),
        wanted.len(),
        if count == 1 { "" } else { "s" }
    );
    report.push_str(&differences);
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::compare;

    fn lines(values: &[u32]) -> Vec<String> {
        values.iter().map(|value| format!(r#"{{"n":{value}}}"#)).collect()
    }

    #[test]
    fn a_line_missing_from_the_middle_is_one_difference() {
        let expected = lines(&[1, 2, 3, 4, 5]).join("\n");
        let report = compare(&lines(&[1, 2, 4, 5]), &expected).unwrap().expect("a difference");
        assert!(report.contains("1 difference)"), "{report}");
        assert!(report.contains("line 3 of the expected output:\n  - missing    {\"n\":3}"), "{report}");
        assert!(!report.contains("{\"n\":4}") && !report.contains("{\"n\":5}"), "{report}");
    }

    #[test]
    fn changed_extra_and_equal_lines() {
        let expected = lines(&[1, 2, 3]).join("\n");
        let report = compare(&lines(&[1, 20, 3, 4]), &expected).unwrap().expect("differences");
        assert!(report.contains("2 differences)"), "{report}");
        assert!(report.contains("line 2 of the expected output, line 2 of the output:\n  - expected   {\"n\":2}\n  + actual     {\"n\":20}"), "{report}");
        assert!(report.contains("line 4 of the output:\n  + unexpected {\"n\":4}"), "{report}");
        // Spacing does not count (field order does: it is what the sink writes).
        assert_eq!(compare(&[r#"{"a":1,"b":2}"#.to_string()], r#"{ "a": 1, "b": 2 }"#).unwrap(), None);
        assert!(compare(&[r#"{"a":1,"b":2}"#.to_string()], r#"{"b":2,"a":1}"#).unwrap().is_some());
    }
}

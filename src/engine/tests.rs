//! Unit tests of the engine: values written as they were read where that cannot be told
//! from encoding them again.

use super::*;
use crate::operators::{InputHeaders, Provenance};

/// Filter and dedup on the way to `kept` (records as read); a `set` on the way to `marked`.
const TWO_OUTPUTS: &str = r#"
outputs:
  kept:
    sink: { topic: kept }
  marked:
    steps:
      - set: { flagged: "true" }
    sink: { topic: marked }
"#;

/// Only `kept`, keyed by a field no step reads: fields are kept only where read.
const KEPT_ONLY: &str = r#"
outputs:
  kept:
    sink: { topic: kept, key: [user] }
"#;

fn engine(outputs: &str) -> Engine {
    engine_partitioned(outputs, "\n    partitioned_by: [id]")
}

fn engine_partitioned(outputs: &str, partitioned_by: &str) -> Engine {
    let pipeline = crate::plan::parse_pipeline(&format!(
        r#"
name: t
sources:
  clicks:
    topics: [clicks]
    format: json
    schema: {{ id: long, user: string, amount: double, note: string?, ts: long }}
    event_time: {{ field: ts }}
    watermark: {{ max_out_of_orderness: 1s }}{partitioned_by}
steps:
  - filter: "amount > 1.0"
  - dedup: {{ key: [id], within: 1h }}
{outputs}"#
    ))
    .unwrap_or_else(|problems| panic!("{problems}"));
    Engine::new(&pipeline).unwrap()
}

/// What the engine writes for each value: (sink or `Dlq`, key, value), in order.
fn run(outputs: &str, values: &[&str]) -> Vec<(String, String, String)> {
    let mut engine = engine(outputs);
    let mut outputs = Vec::new();
    for (offset, value) in values.iter().enumerate() {
        let provenance = Provenance { topic: "clicks", partition: 0, offset: offset as i64, timestamp: Some(0), headers: InputHeaders::Read(&[]), key: None };
        let input = InputRecord { provenance, key: None, value: Some(value.as_bytes()) };
        engine.process_kept(&input, &mut outputs).unwrap();
    }
    rendered(outputs)
}

/// The same, with the source not partitioned by the dedup's key: each record goes through a
/// repartition topic (of one partition) into the dedup's stage, read back as the runtime
/// reads it.
fn run_repartitioned(outputs: &str, values: &[&str]) -> Vec<(String, String, String)> {
    let mut engine = engine_partitioned(outputs, "");
    engine.distribute(1, 1);
    engine.set_input_partitions([("clicks".to_string(), 0)]);
    let mut written = Vec::new();
    for (offset, value) in values.iter().enumerate() {
        let provenance = Provenance { topic: "clicks", partition: 0, offset: offset as i64, timestamp: Some(0), headers: InputHeaders::Read(&[]), key: None };
        let input = InputRecord { provenance, key: None, value: Some(value.as_bytes()) };
        let mut outputs = Vec::new();
        engine.process_kept(&input, &mut outputs).unwrap();
        for output in outputs {
            let Destination::Repartition(stage) = output.destination else {
                written.push(output);
                continue;
            };
            let headers: Vec<(&str, Option<&[u8]>)> = output.headers.iter().map(|(name, value)| (name.as_str(), Some(value.as_slice()))).collect();
            let forwarded = ForwardHeaders::parse(&headers).unwrap();
            let provenance = Provenance { topic: "t-repartition", partition: 0, offset: offset as i64, timestamp: Some(0), headers: InputHeaders::Read(&headers), key: None };
            let input = InputRecord { provenance, key: output.key.as_deref(), value: output.value.own() };
            engine.process_forwarded_kept(&input, stage, 0, &forwarded, &mut written).unwrap();
        }
    }
    rendered(written)
}

fn rendered(outputs: Vec<Output>) -> Vec<(String, String, String)> {
    outputs
        .into_iter()
        .map(|output| {
            let sink = match output.destination {
                Destination::Sink(index) => ["kept", "marked"][index].to_string(),
                other => format!("{other:?}"),
            };
            let text = |bytes: Option<Vec<u8>>| String::from_utf8(bytes.unwrap_or_default()).unwrap();
            (sink, text(output.key), text(output.value.own().map(<[u8]>::to_vec)))
        })
        .collect()
}

/// The same records in several forms: spaces, another order, an undeclared field, a whole
/// number for a double, a missing nullable field, escapes; then one filtered out, a
/// duplicate, and a decode error. Only the first is already in the encoder's form.
const INPUTS: &[&str] = &[
    r#"{"id":1,"user":"ann","amount":2.5,"note":null,"ts":1000}"#,
    r#"{ "id": 2, "user": "bob", "amount": 3.5, "note": "x", "ts": 1000 }"#,
    r#"{"user":"cy","id":3,"amount":4.5,"note":null,"ts":1000}"#,
    r#"{"id":4,"user":"di","amount":5.5,"note":null,"extra":true,"ts":1000}"#,
    r#"{"id":5,"user":"ed","amount":6,"note":null,"ts":1000}"#,
    r#"{"id":6,"user":"fe","amount":7.5,"ts":1000}"#,
    r#"{"id":7,"user":"g\u0069","amount":8.5,"note":"a\/b","ts":1000}"#,
    r#"{"id":8,"user":"hu","amount":0.5,"note":null,"ts":1000}"#,
    r#"{"id":1,"user":"ann","amount":2.5,"note":null,"ts":1000}"#,
    r#"{"id":"9","user":"io","amount":2.5,"note":null,"ts":1000}"#,
];

#[test]
fn a_value_is_written_as_read_only_where_encoding_it_would_give_the_same_bytes() {
    let written = run(TWO_OUTPUTS, INPUTS);
    assert_eq!(values(&written, "kept"), KEPT);
    // The output with a `set` never takes the input's bytes.
    let marked = values(&written, "marked");
    assert_eq!(marked.len(), 7);
    assert_eq!(marked[0], r#"{"id":1,"user":"ann","amount":2.5,"note":null,"ts":1000,"flagged":true}"#);
    assert_eq!(values(&written, "Dlq").len(), 1, "{written:?}");
}

/// With only `kept`, a value in the encoder's form keeps just the fields read (event time,
/// the filter's `amount`, the dedup's `id`, the sink key's `user`): the filter, the dedup and
/// the key see them as before, and the value goes out whole.
#[test]
fn a_record_read_in_part_is_filtered_deduplicated_keyed_and_written_whole() {
    let written = run(KEPT_ONLY, INPUTS);
    assert_eq!(values(&written, "kept"), KEPT);
    let keys: Vec<&str> = written.iter().filter(|(sink, ..)| sink == "kept").map(|(_, key, _)| key.as_str()).collect();
    assert_eq!(keys, [r#"{"user":"ann"}"#, r#"{"user":"bob"}"#, r#"{"user":"cy"}"#, r#"{"user":"di"}"#, r#"{"user":"ed"}"#, r#"{"user":"fe"}"#, r#"{"user":"gi"}"#]);
    assert_eq!(values(&written, "Dlq").len(), 1, "{written:?}");
    assert!(engine(KEPT_ONLY).partial && !engine(TWO_OUTPUTS).partial);
}

/// Through a repartition topic: the forwarded value (the encoder's text of the fields) is
/// read by the canonical reader and written as it came, with the same results.
#[test]
fn a_repartitioned_record_is_written_as_forwarded_with_the_same_results() {
    let written = run_repartitioned(TWO_OUTPUTS, INPUTS);
    assert_eq!(values(&written, "kept"), KEPT);
    let marked = values(&written, "marked");
    assert_eq!(marked.len(), 7);
    assert_eq!(marked[6], r#"{"id":7,"user":"gi","amount":8.5,"note":"a/b","ts":1000,"flagged":true}"#);
    assert_eq!(values(&written, "Dlq").len(), 1, "{written:?}");
}

/// The values written to `sink`, in order.
fn values<'a>(written: &'a [(String, String, String)], sink: &str) -> Vec<&'a str> {
    written.iter().filter(|(to, ..)| to == sink).map(|(.., value)| value.as_str()).collect()
}

/// What `kept` writes of [`INPUTS`]: every value as the encoder writes it.
const KEPT: [&str; 7] = [
    r#"{"id":1,"user":"ann","amount":2.5,"note":null,"ts":1000}"#,
    r#"{"id":2,"user":"bob","amount":3.5,"note":"x","ts":1000}"#,
    r#"{"id":3,"user":"cy","amount":4.5,"note":null,"ts":1000}"#,
    r#"{"id":4,"user":"di","amount":5.5,"note":null,"ts":1000}"#,
    r#"{"id":5,"user":"ed","amount":6.0,"note":null,"ts":1000}"#,
    r#"{"id":6,"user":"fe","amount":7.5,"note":null,"ts":1000}"#,
    r#"{"id":7,"user":"gi","amount":8.5,"note":"a/b","ts":1000}"#,
];

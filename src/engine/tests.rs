//! Unit tests of the engine: values written as they were read where that cannot be told
//! from encoding them again.

use super::*;
use crate::operators::Provenance;

/// Filter and dedup on the way to `kept` (records as read); a `set` on the way to `marked`.
fn engine() -> Engine {
    let pipeline = crate::plan::parse_pipeline(
        r#"
name: t
sources:
  clicks:
    topics: [clicks]
    format: json
    schema: { id: long, user: string, amount: double, note: string?, ts: long }
    event_time: { field: ts }
    watermark: { max_out_of_orderness: 1s }
steps:
  - filter: "amount > 1.0"
  - dedup: { key: [id], within: 1h }
outputs:
  kept:
    sink: { topic: kept }
  marked:
    steps:
      - set: { flagged: "true" }
    sink: { topic: marked }
"#,
    )
    .unwrap_or_else(|problems| panic!("{problems}"));
    Engine::new(&pipeline).unwrap()
}

/// What the engine writes for each value, by sink (DLQ: `dlq`), in order.
fn run(values: &[&str]) -> Vec<(String, String)> {
    let mut engine = engine();
    let mut outputs = Vec::new();
    for (offset, value) in values.iter().enumerate() {
        let provenance = Provenance { topic: "clicks", partition: 0, offset: offset as i64, timestamp: Some(0), headers: &[], key: None };
        let input = InputRecord { provenance, key: None, value: Some(value.as_bytes()) };
        engine.process(&input, &mut outputs).unwrap();
    }
    outputs
        .into_iter()
        .map(|output| {
            let sink = match output.destination {
                Destination::Sink(index) => ["kept", "marked"][index].to_string(),
                other => format!("{other:?}"),
            };
            (sink, String::from_utf8(output.value.unwrap_or_default()).unwrap())
        })
        .collect()
}

#[test]
fn a_value_is_written_as_read_only_where_encoding_it_would_give_the_same_bytes() {
    let written = run(&[
        // Already in the encoder's form: the bytes go out as they are.
        r#"{"id":1,"user":"ann","amount":2.5,"note":null,"ts":1000}"#,
        // Other forms of the same kind of record: spaces, another order, an undeclared field,
        // a whole number for a double, a missing nullable field, an escape.
        r#"{ "id": 2, "user": "bob", "amount": 3.5, "note": "x", "ts": 1000 }"#,
        r#"{"user":"cy","id":3,"amount":4.5,"note":null,"ts":1000}"#,
        r#"{"id":4,"user":"di","amount":5.5,"note":null,"extra":true,"ts":1000}"#,
        r#"{"id":5,"user":"ed","amount":6,"note":null,"ts":1000}"#,
        r#"{"id":6,"user":"fe","amount":7.5,"ts":1000}"#,
        r#"{"id":7,"user":"g\u0069","amount":8.5,"note":"a\/b","ts":1000}"#,
        // Filtered out, a duplicate, and a decode error.
        r#"{"id":8,"user":"hu","amount":0.5,"note":null,"ts":1000}"#,
        r#"{"id":1,"user":"ann","amount":2.5,"note":null,"ts":1000}"#,
        r#"{"id":"9","user":"io","amount":2.5,"note":null,"ts":1000}"#,
    ]);
    let kept: Vec<&str> = written.iter().filter(|(sink, _)| sink == "kept").map(|(_, value)| value.as_str()).collect();
    assert_eq!(
        kept,
        [
            r#"{"id":1,"user":"ann","amount":2.5,"note":null,"ts":1000}"#,
            r#"{"id":2,"user":"bob","amount":3.5,"note":"x","ts":1000}"#,
            r#"{"id":3,"user":"cy","amount":4.5,"note":null,"ts":1000}"#,
            r#"{"id":4,"user":"di","amount":5.5,"note":null,"ts":1000}"#,
            r#"{"id":5,"user":"ed","amount":6.0,"note":null,"ts":1000}"#,
            r#"{"id":6,"user":"fe","amount":7.5,"note":null,"ts":1000}"#,
            r#"{"id":7,"user":"gi","amount":8.5,"note":"a/b","ts":1000}"#,
        ]
    );
    // The output with a `set` never takes the input's bytes.
    let marked: Vec<&str> = written.iter().filter(|(sink, _)| sink == "marked").map(|(_, value)| value.as_str()).collect();
    assert_eq!(marked.len(), 7);
    assert_eq!(marked[0], r#"{"id":1,"user":"ann","amount":2.5,"note":null,"ts":1000,"flagged":true}"#);
    assert_eq!(written.iter().filter(|(sink, _)| sink == "Dlq").count(), 1, "{written:?}");
}

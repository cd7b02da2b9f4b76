//! `set`, `drop` and `select` under `weir run`: expressions read the Kafka record's metadata
//! and headers as a consumer sees them, and a record whose expression fails goes to the DLQ
//! with its provenance while the others flow on.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::*;

#[test]
fn set_drop_and_select_reshape_records_read_from_kafka() {
    let (input, output) = (unique("in"), unique("out"));
    let name = unique("reshape");
    create_topic(&input, 2);
    create_topic(&output, 1);
    // Even ids carry a region header; id 50 makes `ratio` divide by zero (an infinite double,
    // which no field can hold).
    produce(
        &input,
        (0..100u64).map(|id| {
            let record = Input::keyed(format!("k{id}"), event(id));
            match id % 2 {
                0 => record.with_header("region", if id % 4 == 0 { "eu" } else { "us" }),
                _ => record,
            }
        }),
    );
    let steps = "  - set: { cents: \"int(amount * 100.0)\", ratio: \"amount / double(id - 50)\", region: \"_headers.region\" }\n  \
                 - drop: [amount]\n  \
                 - select: { id: id, cents: cents, ratio: ratio, where.region: region, where.from: \"_topic + '/' + string(_partition) + '@' + string(_offset)\", key: _key }";
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, steps));
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(weir.wait(Duration::from_secs(90)).success(), "{}", weir.log_text());

    let read_at: BTreeMap<u64, (i32, i64)> = read_committed(&input)
        .iter()
        .map(|record| (record.value_json()["id"].as_u64().unwrap(), (record.partition, record.offset)))
        .collect();
    let mut seen = BTreeMap::new();
    for record in read_committed(&output) {
        let value = record.value_json();
        // The input's headers pass through (each output comes from one input record).
        let region: Vec<&str> = record.headers.get("region").map(String::as_str).into_iter().collect();
        let expected_region: Vec<&str> = value["where"]["region"].as_str().into_iter().collect();
        assert_eq!(region, expected_region, "{value}");
        seen.insert(value["id"].as_u64().expect("an id"), value);
    }
    assert_eq!(seen.len(), 99, "{seen:?}");
    for (id, value) in &seen {
        let amount = (id % 1000) as f64 + 0.5;
        let (partition, offset) = read_at[id];
        let region = match id % 4 {
            0 => serde_json::json!("eu"),
            2 => serde_json::json!("us"),
            _ => serde_json::Value::Null,
        };
        let expected = serde_json::json!({
            "id": id,
            "cents": (amount * 100.0) as i64,
            "ratio": amount / (*id as f64 - 50.0),
            "where": {"region": region, "from": format!("{input}/{partition}@{offset}")},
            "key": format!("k{id}"),
        });
        assert_eq!(value, &expected);
        // The fields in the order select wrote them.
        let order: Vec<&String> = value.as_object().unwrap().keys().collect();
        assert_eq!(order, ["id", "cents", "ratio", "where", "key"]);
    }
    let dlq = read_committed(&format!("{name}.dlq"));
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let (partition, offset) = read_at[&50];
    assert_eq!(dlq[0].headers["weir-error-stage"], "process");
    assert!(dlq[0].headers["weir-error"].contains("'amount / double(id - 50)' gave inf"), "{:?}", dlq[0].headers);
    assert_eq!(dlq[0].headers["weir-source-partition"], partition.to_string());
    assert_eq!(dlq[0].headers["weir-source-offset"], offset.to_string());
    assert_eq!(dlq[0].headers["region"], "us", "the input's headers travel with its DLQ record");
    assert_eq!(dlq[0].value_text(), event(50));
}

/// A record's headers asked for three times (an output's `when`, and two sinks passing them
/// on) are the same each time, with and without headers on the input record.
#[test]
fn headers_read_by_a_when_and_two_sinks_reach_both_outputs() {
    let (input, tagged, all) = (unique("in"), unique("tagged"), unique("all"));
    let name = unique("headers-twice");
    create_topic(&input, 2);
    create_topic(&tagged, 1);
    create_topic(&all, 1);
    // Even ids carry two headers, odd ids none.
    produce(&input, (0..100u64).map(|id| match id % 2 {
        0 => timed_event(id).with_header("kind", "a").with_header("trace", format!("t{id}")),
        _ => timed_event(id),
    }));
    let outputs = format!(
        "outputs:\n  \
           tagged:\n    when: \"size(_headers) > 0 && _headers.kind == 'a'\"\n    sink: {{ topic: {tagged} }}\n  \
           all:\n    sink: {{ topic: {all} }}\n"
    );
    let text = clicks_pipeline_text(&name, &input, "unused", "  []", "").replace("sink:\n  topic: unused\n", &outputs);
    let pipeline = pipeline_file(&text);
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(weir.wait(Duration::from_secs(120)).success(), "{}", weir.log_text());

    let headers_of = |id: u64| -> BTreeMap<String, String> {
        match id % 2 {
            0 => [("kind".to_string(), "a".to_string()), ("trace".to_string(), format!("t{id}"))].into_iter().collect(),
            _ => BTreeMap::new(),
        }
    };
    let tagged = read_committed(&tagged);
    let mut ids: Vec<u64> = tagged.iter().map(|record| record.value_json()["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..100).step_by(2).collect::<Vec<_>>());
    let all = read_committed(&all);
    assert_eq!(all.len(), 100);
    for record in tagged.iter().chain(&all) {
        let id = record.value_json()["id"].as_u64().unwrap();
        assert_eq!(record.headers, headers_of(id), "id {id}");
    }
}

/// Input headers reach the sink records, also through a repartition topic (a dedup keyed by
/// a field the input is not partitioned by), and `sink.headers.set` adds its own.
#[test]
fn input_headers_pass_through_a_repartition_to_the_sink() {
    let (input, output) = (unique("in"), unique("out"));
    let name = unique("headers");
    create_topic(&input, 2);
    create_topic(&output, 1);
    produce(&input, (0..200u64).map(|id| timed_event(id % 150).with_header("trace", format!("t{id}")).with_header("empty", "")));
    let steps = "  - dedup: { key: [id], within: 1d }";
    let text = clicks_pipeline_text(&name, &input, &output, steps, "").replace(
        "sink:\n  topic:",
        "sink:\n  headers: { set: { user: user, trace-again: \"_headers.trace\" } }\n  topic:",
    );
    assert!(text.contains("headers: { set"), "{text}");
    let pipeline = pipeline_file(&text);
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(weir.wait(Duration::from_secs(120)).success(), "{}", weir.log_text());
    assert!(topic_exists(&format!("{name}-0-repartition")), "the dedup did not repartition");

    let records = read_committed(&output);
    assert_eq!(records.len(), 150);
    for record in records {
        let value = record.value_json();
        let id = value["id"].as_u64().unwrap();
        // Of the two records of an id under 50 (loop ids id and id + 150, in one partition),
        // the first is kept.
        let trace = format!("t{id}");
        let expected: BTreeMap<String, String> = [
            ("trace", trace.as_str()),
            ("empty", ""),
            ("user", value["user"].as_str().unwrap()),
            ("trace-again", trace.as_str()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
        assert_eq!(record.headers, expected, "id {id}");
    }
}

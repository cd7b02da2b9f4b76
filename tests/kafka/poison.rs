use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::*;

/// Records that cannot be decoded (or fail in a step) go to the DLQ with their original
/// bytes and provenance headers, in the same transaction; every other record flows on.
#[test]
fn bad_records_go_to_the_dlq_with_provenance_and_the_rest_flows_on() {
    let (input, output) = (unique("in"), unique("out"));
    let name = unique("poison");
    create_topic(&input, 1);
    create_topic(&output, 1);
    let mut inputs = Vec::new();
    let mut poison = BTreeMap::new(); // offset -> (key, value, expected error fragment)
    for id in 0..200u64 {
        let bad = match id % 50 {
            7 => Some((Some("bad-json"), Some("{not json".to_string()), "not valid JSON")),
            19 => Some((Some("bad-type"), Some(r#"{"id":"x","user":"u","amount":1.0}"#.to_string()), "field 'id'")),
            31 => Some((Some("tombstone"), None, "no value")),
            // A field without `?` is missing: a decode error.
            43 => Some((Some("no-amount"), Some(r#"{"id":1,"user":"u"}"#.to_string()), "field 'amount' is missing")),
            // Decodes, but the filter divides by zero: a process error.
            47 => Some((Some("zero-amount"), Some(r#"{"id":1,"user":"u","amount":-1.0}"#.to_string()), "filter")),
            _ => None,
        };
        match bad {
            Some((key, value, error)) => {
                poison.insert(id as i64, (key, value.clone(), error));
                inputs.push(Input { key: key.map(Into::into), value: value.map(Into::into), partition: None, headers: Vec::new() });
            }
            None => inputs.push(Input::keyed(format!("k{id}"), event(id))),
        }
    }
    produce(&input, inputs);
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  - filter: \"100 / (int(amount) + 1) >= 0\""));
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(weir.wait(Duration::from_secs(90)).success(), "{}", weir.log_text());

    let good = read_committed(&output);
    assert_eq!(good.len(), 200 - poison.len());
    let dlq = read_committed(&format!("{name}.dlq"));
    assert_eq!(dlq.len(), poison.len(), "{dlq:?}");
    for record in &dlq {
        let offset: i64 = record.headers["weir-source-offset"].parse().unwrap();
        let (key, value, error) = &poison[&offset];
        assert_eq!(record.key.as_deref(), key.map(str::as_bytes));
        assert_eq!(record.value.as_deref(), value.as_deref().map(str::as_bytes));
        assert_eq!(record.headers["weir-source-topic"], input);
        assert_eq!(record.headers["weir-source-partition"], "0");
        let stage = if *error == "filter" { "process" } else { "decode" };
        let error = if *error == "filter" { "Division by zero" } else { error };
        assert_eq!(record.headers["weir-error-stage"], stage);
        assert!(record.headers["weir-error"].contains(error), "{:?}", record.headers);
    }
}

/// One bad record per stage, among good ones: each lands in the DLQ with its stage and
/// provenance, in the batch's transaction, and the good records flow on. The produce-stage
/// record's result is over weir's `message.max.bytes`, and so is its original value: its DLQ
/// record goes without the value, saying where the original is.
#[test]
fn every_error_stage_dead_letters_with_its_stage_and_provenance() {
    let (input, output, name) = (unique("in"), unique("out"), unique("stages"));
    create_topic(&input, 1);
    create_topic(&output, 1);
    let t0 = 1_700_000_000_000i64;
    let click = |id: i64, user: &str, amount: &str, ts: i64| format!(r#"{{"id":{id},"user":"{user}","amount":{amount},"ts":{ts}}}"#);
    let mut inputs: Vec<Input> = (0..20).map(|id| Input::keyed(format!("{id}"), click(id, "u", "1", t0 + id * 1000))).collect();
    let huge = "x".repeat(30_000);
    inputs.extend([
        Input::keyed("decode", "{not json"),
        // Decodes, but the filter divides by zero.
        Input::keyed("process", click(100, "u", "0", t0 + 20_000)),
        Input::keyed("late", click(101, "u", "1", t0 - 600_000)),
        Input::keyed("produce", click(102, &huge, "1", t0 + 21_000)),
    ]);
    produce(&input, inputs);
    let steps = "  - filter: \"100 / amount > 0\"\n  - dedup: { key: [id], within: 1m }";
    let pipeline = pipeline_file(&clicks_pipeline_text(&name, &input, &output, steps, "partitioned_by: [id]"));
    let env = vec![("WEIR__KAFKA__OPTIONS__MESSAGE_MAX_BYTES".to_string(), "20000".to_string())];
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { env, ..Default::default() });
    wait_until(Duration::from_secs(90), "four DLQ records", || read_committed(&format!("{name}.dlq")).len() >= 4);
    for stage in ["decode", "process", "late", "produce"] {
        assert_eq!(metric(&weir, "weir_dlq_records_total", &[("stage", stage)]), Some(1.0), "{stage}");
    }
    weir.terminate();
    assert!(weir.wait(Duration::from_secs(30)).success(), "{}", weir.log_text());

    let ids: Vec<i64> = read_committed(&output).iter().map(|record| record.value_json()["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());
    let dlq = read_committed(&format!("{name}.dlq"));
    let by_key: BTreeMap<String, &Seen> =
        dlq.iter().map(|record| (String::from_utf8(record.key.clone().unwrap()).unwrap(), record)).collect();
    assert_eq!(by_key.keys().cloned().collect::<Vec<_>>(), ["decode", "late", "process", "produce"], "{dlq:?}");
    for (key, offset, fragment) in
        [("decode", 20, "not valid json"), ("process", 21, "filter"), ("late", 22, "watermark"), ("produce", 23, "too large")]
    {
        let record = by_key[key];
        assert_eq!(record.headers["weir-error-stage"], key, "{:?}", record.headers);
        assert!(record.headers["weir-error"].to_lowercase().contains(fragment), "{key}: {:?}", record.headers);
        assert_eq!(record.headers["weir-source-topic"], input);
        assert_eq!(record.headers["weir-source-partition"], "0");
        assert_eq!(record.headers["weir-source-offset"], offset.to_string());
    }
    assert_eq!(by_key["late"].value_json()["id"], 101, "the original value");
    assert!(by_key["produce"].value.is_none());
    assert!(by_key["produce"].headers["weir-value-omitted"].starts_with("30"), "{:?}", by_key["produce"].headers);
}

/// A sink topic with a small `max.message.bytes`: the broker would refuse a whole batch
/// over it (aborting every replay). weir keeps its batches under the limit, and a result
/// too large on its own follows on_error.produce while the rest flows on.
#[test]
fn a_sink_with_a_small_record_limit_gets_every_result_that_fits() {
    let (input, output, name) = (unique("in"), unique("out"), unique("small-sink"));
    create_topic(&input, 1);
    create_topic_with(&output, 1, &[("max.message.bytes", "4000")]);
    let mut inputs: Vec<Input> = (0..300).map(|id| Input::keyed(format!("k{id}"), event(id))).collect();
    let big = format!(r#"{{"id":1000,"user":"{}","amount":5.5}}"#, "x".repeat(5_000));
    inputs.insert(150, Input::keyed("big", big.clone()));
    produce(&input, inputs);
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  []"));
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(weir.wait(Duration::from_secs(90)).success(), "{}", weir.log_text());
    assert!(weir.log_text().contains("capping record batches"), "{}", weir.log_text());

    let ids: Vec<u64> = read_committed(&output).iter().map(|record| record.value_json()["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (0..300).collect::<Vec<_>>());
    let dlq = read_committed(&format!("{name}.dlq"));
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].headers["weir-error-stage"], "produce");
    assert_eq!(dlq[0].headers["weir-source-offset"], "150");
    // The DLQ's own limit is the broker's default: the original value fits there.
    assert_eq!(dlq[0].value.as_deref(), Some(big.as_bytes()));
}

/// A record that fits its source topic (here `max.message.bytes` 2,000,000) but whose dedup
/// key is too large for a changelog record under weir's `message.max.bytes` (librdkafka's
/// default, 1,000,000): it goes to the DLQ with stage `process` (without its value, which is
/// too large for the DLQ too), where its changelog entry would fail every commit and weir
/// would crash-loop on it. The records around it reach the sink and the run ends cleanly.
#[test]
fn a_dedup_key_too_large_for_the_changelog_dead_letters_and_the_rest_flows_on() {
    use rdkafka::producer::{BaseRecord, Producer};
    let (input, output, name) = (unique("in"), unique("out"), unique("large-state"));
    create_topic_with(&input, 1, &[("max.message.bytes", "2000000")]);
    create_topic(&output, 1);
    let click = |id: u64, user: &str| format!(r#"{{"id":{id},"user":"{user}","amount":1,"ts":{}}}"#, 1_700_000_000_000 + id);
    let large = "x".repeat(1_100_000);
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker().bootstrap)
        .set("message.max.bytes", "2000000")
        .create()
        .expect("test producer");
    for id in 0..11u64 {
        let value = match id {
            5 => click(id, &large),
            _ => click(id, &format!("u{id}")),
        };
        let key = format!("k{id}");
        producer.send(BaseRecord::to(&input).key(&key).payload(&value)).expect("queue a test record");
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).expect("test records acknowledged");
    let steps = "  - dedup: { key: [user], within: 1m }";
    let pipeline = pipeline_file(&clicks_pipeline_text(&name, &input, &output, steps, "partitioned_by: [user]"));
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(weir.wait(Duration::from_secs(90)).success(), "{}", weir.log_text());

    let ids: Vec<i64> = read_committed(&output).iter().map(|record| record.value_json()["id"].as_i64().unwrap_or(-1)).collect();
    assert_eq!(ids, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]);
    let dlq = read_committed(&format!("{name}.dlq"));
    assert_eq!(dlq.len(), 1, "{:?}", dlq.iter().map(|record| &record.headers).collect::<Vec<_>>());
    assert_eq!(dlq[0].headers["weir-error-stage"], "process", "{:?}", dlq[0].headers);
    assert!(dlq[0].headers["weir-error"].contains("dedup state"), "{:?}", dlq[0].headers);
    assert_eq!(dlq[0].headers["weir-source-offset"], "5");
    assert!(dlq[0].headers.contains_key("weir-value-omitted"), "{:?}", dlq[0].headers);
}

/// A result the broker refuses for good, in the middle of the input (audit R2): here a
/// record without a key for a compacted sink, refused by the broker only in its delivery
/// report, after the transaction took other records. weir aborts, finds the one input whose
/// result was refused (sending suspects alone), writes it to the DLQ with stage `produce`
/// and goes on; the records around it reach the sink exactly once (with the input's keys:
/// a pipeline without keyed steps), and the run ends cleanly instead of crash-looping.
#[test]
fn a_result_the_broker_refuses_goes_to_the_dlq_and_the_rest_flows_on() {
    let (input, output, name) = (unique("in"), unique("out"), unique("refused"));
    create_topic(&input, 1);
    create_topic_with(&output, 1, &[("cleanup.policy", "compact")]);
    let mut inputs: Vec<Input> = (0..3_000).map(|id| Input::keyed(format!("k{id}"), event(id))).collect();
    inputs[1_500].key = None;
    produce(&input, inputs);
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  - filter: \"amount > 10.0\""));
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    let status = weir.wait(Duration::from_secs(180));
    let log = weir.log_text();
    assert!(status.success(), "{log}");
    assert!(log.contains("the broker refused a record"), "the refusal was not seen, so this test proves nothing:\n{log}");

    let mut ids: Vec<u64> = read_committed(&output).iter().map(|record| record.value_json()["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    let expected: Vec<u64> = kept_by_amount_filter(0..3_000).into_iter().filter(|id| *id != 1_500).collect();
    assert_eq!(ids, expected, "every other result exactly once");
    let dlq = read_committed(&format!("{name}.dlq"));
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].headers["weir-error-stage"], "produce");
    assert_eq!(dlq[0].headers["weir-source-offset"], "1500");
    assert!(dlq[0].headers["weir-error"].contains("refused"), "{:?}", dlq[0].headers);
}

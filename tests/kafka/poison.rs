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
            // Decodes, but the filter cannot compare a null amount: a process error.
            43 => Some((Some("null-amount"), Some(r#"{"id":1,"user":"u"}"#.to_string()), "filter")),
            _ => None,
        };
        match bad {
            Some((key, value, error)) => {
                poison.insert(id as i64, (key, value.clone(), error));
                inputs.push(Input { key: key.map(Into::into), value: value.map(Into::into), partition: None });
            }
            None => inputs.push(Input::keyed(format!("k{id}"), event(id))),
        }
    }
    produce(&input, inputs);
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  - filter: \"amount > 0.0\""));
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
        assert_eq!(record.headers["weir-error-stage"], stage);
        assert!(record.headers["weir-error"].contains(error), "{:?}", record.headers);
    }
}

use std::time::Duration;

use crate::support::*;

/// Exactly what was there at start is processed, then weir commits and exits 0; a second
/// run continues from the committed offsets.
#[test]
fn until_end_processes_what_was_there_and_exits_zero() {
    let (input, output) = (unique("in"), unique("out"));
    let name = unique("pass");
    create_topic(&input, 3);
    create_topic(&output, 3);
    produce(&input, (0..300).map(|id| Input::keyed(format!("k{id}"), event(id))));
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  - filter: \"amount > 10.0\""));

    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    let status = weir.wait(Duration::from_secs(90));
    assert!(status.success(), "weir failed: {status}\n{}", weir.log_text());

    let expected: Vec<u64> = (0..300).filter(|id| (id % 1000) as f64 + 0.5 > 10.0).collect();
    let seen = read_committed(&output);

    let mut ids: Vec<u64> = seen.iter().map(|record| record.value_json()["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, expected, "weir's log:\n{}", weir.log_text());
    // The input key is kept when the sink names no key fields.
    let first = seen.iter().find(|record| record.value_json()["id"] == 42).unwrap();
    assert_eq!(first.key.as_deref(), Some(&b"k42"[..]));
    assert_eq!(first.value_text(), r#"{"id":42,"user":"u42","amount":42.5}"#);
    assert_eq!(committed_offsets(&name, &input), end_offsets(&input));

    // More input, a second run: only the new records are processed.
    produce(&input, (300..400).map(|id| Input::keyed(format!("k{id}"), event(id))));
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(weir.wait(Duration::from_secs(90)).success(), "{}", weir.log_text());
    let mut ids: Vec<u64> = read_committed(&output).iter().map(|record| record.value_json()["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    let expected: Vec<u64> = (0..400).filter(|id| (id % 1000) as f64 + 0.5 > 10.0).collect();
    assert_eq!(ids, expected);
    assert_eq!(committed_offsets(&name, &input), end_offsets(&input));
}

use std::time::Duration;

use crate::support::*;

/// `pattern` subscribes to every topic whose whole name matches, and `starting_offsets:
/// {timestamp}` starts each partition at the first record at or after that time.
#[test]
fn pattern_sources_and_timestamp_starting_offsets() {
    let prefix = unique("pat");
    let (first, second, unrelated) = (format!("{prefix}-a"), format!("{prefix}-b"), format!("{prefix}-a-old"));
    let output = unique("out");
    for topic in [&first, &second, &unrelated] {
        create_topic(topic, 2);
    }
    create_topic(&output, 1);
    produce(&first, (0..50).map(|id| Input::keyed(format!("k{id}"), event(id))));
    produce(&unrelated, (5000..5050).map(|id| Input::keyed(format!("k{id}"), event(id))));
    std::thread::sleep(Duration::from_millis(1500));
    let cutoff = chrono::Utc::now() - chrono::Duration::milliseconds(500);
    std::thread::sleep(Duration::from_millis(500));
    produce(&first, (100..150).map(|id| Input::keyed(format!("k{id}"), event(id))));
    produce(&second, (200..250).map(|id| Input::keyed(format!("k{id}"), event(id))));

    let name = unique("pattern");
    let pipeline = pipeline_file(&format!(
        r#"name: {name}
sources:
  events:
    pattern: "{prefix}-[ab]"
    format: json
    schema: {{ id: long, user: string, amount: double }}
    starting_offsets: {{ timestamp: "{}" }}
sink:
  topic: {output}
"#,
        cutoff.to_rfc3339()
    ));
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(weir.wait(Duration::from_secs(90)).success(), "{}", weir.log_text());
    let expected: Vec<u64> = (100..150).chain(200..250).collect();
    assert_exactly_once(&output, &expected);
}

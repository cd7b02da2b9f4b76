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

/// `starting_offsets: latest` starts where a partition ended when the pipeline first got it,
/// and commits that start at once, without waiting for a record: what arrives while weir is
/// down is read after the restart (not skipped by resolving "latest" again), and
/// `--until-end` knows where the end is and stops.
#[test]
fn a_latest_start_is_committed_before_any_record_arrives() {
    let (input, output) = (unique("in"), unique("out"));
    create_topic(&input, 1);
    create_topic(&output, 1);
    // Before the pipeline's first start: skipped, as `latest` says.
    produce(&input, (0..10).map(|id| Input::keyed(format!("k{id}"), event(id))));
    let name = unique("latest");
    let pipeline = pipeline_file(
        &json_pipeline(&name, &input, &output, "  []").replace("    format: json\n", "    format: json\n    starting_offsets: latest\n"),
    );
    let mut first = WeirProcess::start(&pipeline.path, WeirOptions::default());
    wait_ready(&first, Duration::from_secs(60));
    wait_until(Duration::from_secs(30), "the start committed with no record read", || committed_offsets(&name, &input) == vec![10]);
    first.kill();

    produce(&input, (100..200).map(|id| Input::keyed(format!("k{id}"), event(id))));
    let mut second = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(second.wait(Duration::from_secs(60)).success(), "{}", second.log_text());
    let expected: Vec<u64> = (100..200).collect();
    assert_exactly_once(&output, &expected);
    assert_eq!(committed_offsets(&name, &input), vec![110]);
}

/// Deletes the records of `topic`'s partition 0 before `offset`, as retention would.
fn delete_before(topic: &str, offset: i64) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &broker().bootstrap).create().unwrap();
    let mut offsets = rdkafka::TopicPartitionList::new();
    offsets.add_partition_offset(topic, 0, rdkafka::Offset::Offset(offset)).unwrap();
    let deleted = block_on(admin.delete_records(&offsets, &AdminOptions::new())).unwrap();
    assert!(deleted.elements().iter().all(|element| element.error().is_ok()), "{deleted:?}");
    assert_eq!(start_offsets(topic)[0], offset);
}

/// Records after the committed offset that retention deleted are never skipped silently:
/// `on_data_loss: fail` stops with an error naming the partition, `earliest` goes on from
/// the earliest record kept and counts the event.
#[test]
fn a_committed_offset_deleted_by_retention_fails_or_goes_on_as_configured() {
    let (input, output) = (unique("in"), unique("out"));
    create_topic(&input, 1);
    create_topic(&output, 1);
    produce(&input, (0..100).map(|id| Input::keyed(format!("k{id}"), event(id))));
    let name = unique("retention");
    let pipeline = |policy: &str| {
        pipeline_file(&json_pipeline(&name, &input, &output, "  []").replace("    format: json\n", &format!("    format: json\n    on_data_loss: {policy}\n")))
    };
    let fail = pipeline("fail");
    let mut first = WeirProcess::start(&fail.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(first.wait(Duration::from_secs(60)).success(), "{}", first.log_text());
    assert_eq!(committed_offsets(&name, &input), vec![100]);

    // 100 more, of which retention takes the first 50 before weir reads them.
    produce(&input, (100..200).map(|id| Input::keyed(format!("k{id}"), event(id))));
    delete_before(&input, 150);
    let mut stopped = WeirProcess::start(&fail.path, WeirOptions { until_end: true, ..Default::default() });
    let status = stopped.wait(Duration::from_secs(60));
    let log = stopped.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains(&format!("data loss: the committed offset of {input}[0]")), "{log}");
    assert_eq!(committed_offsets(&name, &input), vec![100], "nothing moved");

    let earliest = pipeline("earliest");
    let weir = WeirProcess::start(&earliest.path, WeirOptions::default());
    wait_until(Duration::from_secs(60), "offsets committed to the end", || committed_offsets(&name, &input) == end_offsets(&input));
    assert_eq!(metric(&weir, "weir_data_loss_events_total", &[("policy", "earliest")]), Some(1.0));
    assert!(weir.log_text().contains("data loss: records after the committed offset were deleted"), "{}", weir.log_text());
    let expected: Vec<u64> = (0..100).chain(150..200).collect();
    assert_exactly_once(&output, &expected);
}

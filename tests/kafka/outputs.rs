//! Several outputs under `weir run`: each output's records reach its own topic, and the
//! records of every output, the state changes and the consumed offsets of a batch commit in
//! one transaction.

use std::time::Duration;

use crate::support::*;

/// A pipeline of two outputs off one filter: `all` reshapes every record (stateless), `kept`
/// keeps those over an amount and dedups them behind a repartition topic (state, a
/// changelog). While 60,000 records flow, weir is SIGKILLed at random at least 8 times; each
/// output topic then holds its expected records exactly once: had the outputs committed
/// apart, a kill between the two commits would duplicate or lose one side's records.
#[test]
fn two_outputs_survive_sigkills_exactly_once() {
    let _heavy = heavy_test();
    const RECORDS: u64 = 60_000;
    let (input, all, kept) = (unique("in"), unique("all"), unique("kept"));
    let name = unique("outputs");
    create_topic(&input, 4);
    create_topic(&all, 2);
    create_topic(&kept, 2);
    let outputs = format!(
        "outputs:\n  \
           all:\n    steps: [ {{ select: {{ id: id, user: user }} }} ]\n    sink: {{ topic: {all} }}\n  \
           kept:\n    when: \"amount > 10\"\n    steps: [ {{ dedup: {{ key: [id], within: 1h }} }} ]\n    sink: {{ topic: {kept} }}\n"
    );
    // No `partitioned_by`: the dedup by id repartitions.
    let text = clicks_pipeline_text(&name, &input, "unused", "  - filter: \"amount >= 0\"", "").replace("sink:\n  topic: unused\n", &outputs);
    let pipeline = pipeline_file(&text);
    let feeder = feed_with(&input, 0..RECORDS, 4_000, timed_event);
    // The dedup is step 3 (the filter, the select, the `when`, the dedup).
    let running = |process: &WeirProcess| has_committed_state(process, "3") || (feeder.is_finished() && is_ready(process));
    let (kills, _) = kill_repeatedly(&[pipeline.path.as_path()], 8, running, || feeder.is_finished());
    feeder.join().unwrap();
    let mut last = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(last.wait(Duration::from_secs(300)).success(), "final run failed:\n{}", last.log_text());
    assert!(kills >= 8);

    let every: Vec<u64> = (0..RECORDS).collect();
    assert_exactly_once(&all, &every);
    assert_exactly_once(&kept, &every.iter().copied().filter(|id| id % 1000 > 10).collect::<Vec<_>>());
    // `all` carries the select's fields alone; `kept` the records as read.
    let first = &read_committed(&all)[0].value_json();
    assert_eq!(first.as_object().unwrap().keys().collect::<Vec<_>>(), ["id", "user"], "{first}");
    assert_eq!(committed_offsets(&name, &input), end_offsets(&input));
}

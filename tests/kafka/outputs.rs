//! Several outputs under `weir run`: each output's records reach its own topic, and the
//! records of every output, the state changes and the consumed offsets of a batch commit in
//! one transaction.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::*;

const RECORDS: u64 = 60_000;

/// A click as [`timed_event`] makes it, with a header.
fn tagged_event(id: u64) -> Input {
    timed_event(id).with_header("origin", "feed")
}

/// A pipeline of two outputs off one filter: `all` reshapes every record and sets a header
/// (stateless; the input's headers pass through), `per_user` counts clicks per user in 1 s
/// windows behind a repartition topic (state, a changelog). While 60,000 records flow, weir
/// is SIGKILLed at random at least 8 times; each output topic then holds exactly what it
/// should for a read_committed reader: had the outputs committed apart, a kill between the
/// two commits would duplicate or lose one side's records.
#[test]
fn two_outputs_survive_sigkills_exactly_once() {
    let _heavy = heavy_test();
    let (input, all, per_user) = (unique("in"), unique("all"), unique("per-user"));
    let name = unique("outputs");
    create_topic(&input, 4);
    create_topic(&all, 2);
    create_topic(&per_user, 2);
    let outputs = format!(
        "outputs:\n  \
           all:\n    steps: [ {{ select: {{ id: id, user: user }} }} ]\n    \
             sink: {{ topic: {all}, headers: {{ set: {{ parity: \"string(id % 2)\" }} }} }}\n  \
           per_user:\n    \
             steps: [ {{ window: {{ group_by: [user], tumbling: 1s, aggregates: {{ n: count() }} }} }} ]\n    \
             sink: {{ topic: {per_user} }}\n"
    );
    // No `partitioned_by`: the window by user repartitions.
    let text = clicks_pipeline_text(&name, &input, "unused", "  - filter: \"amount >= 0\"", "").replace("sink:\n  topic: unused\n", &outputs);
    let pipeline = pipeline_file(&text);
    let feeder = feed_with(&input, 0..RECORDS, 4_000, tagged_event);
    // The window is step 2 (the filter, the select, the window).
    let running = |process: &WeirProcess| has_committed_state(process, "2") || (feeder.is_finished() && is_ready(process));
    let (kills, _) = kill_repeatedly(&[pipeline.path.as_path()], 8, running, || feeder.is_finished());
    feeder.join().unwrap();
    let mut last = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(last.wait(Duration::from_secs(300)).success(), "final run failed:\n{}", last.log_text());
    assert!(kills >= 8);

    assert_exactly_once(&all, &(0..RECORDS).collect::<Vec<_>>());
    for record in read_committed(&all) {
        let value = record.value_json();
        assert_eq!(value.as_object().unwrap().keys().collect::<Vec<_>>(), ["id", "user"], "{value}");
        let id = value["id"].as_u64().unwrap();
        assert_eq!(record.headers.get("origin").map(String::as_str), Some("feed"), "the input's header passes through: {value}");
        assert_eq!(record.headers.get("parity"), Some(&(id % 2).to_string()), "{value}");
    }

    // Click id's time is base + id ms, so 1 s window w holds ids w*1000..w*1000+999, and user
    // u's count there is how many of them are u modulo 97.
    let base = 1_700_000_000_000i64;
    let mut expected: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for id in 0..RECORDS {
        *expected.entry((format!("u{}", id % 97), base + (id as i64 / 1000) * 1000)).or_default() += 1;
    }
    let mut seen: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for record in read_committed(&per_user) {
        let value = record.value_json();
        let window = (value["user"].as_str().unwrap().to_string(), value["window_start"].as_i64().unwrap());
        assert!(seen.insert(window.clone(), value["n"].as_u64().unwrap()).is_none(), "window {window:?} written twice");
    }
    for (window, count) in &seen {
        assert_eq!(expected.get(window), Some(count), "window {window:?}");
    }
    // Every window the last watermark (the latest time less 1 s, and less the spread of the
    // partitions) has passed is there.
    let closed = expected.keys().filter(|(_, start)| start + 1000 <= base + RECORDS as i64 - 5_000);
    let missing: Vec<_> = closed.filter(|window| !seen.contains_key(*window)).collect();
    assert!(missing.is_empty(), "{} closed windows missing, first {:?}", missing.len(), missing.first());
    assert!(seen.len() > 50 * 97, "{} windows", seen.len());
    assert_eq!(committed_offsets(&name, &input), end_offsets(&input));
}

//! The interval join in `weir run`: both sources flow into the join's tasks through the
//! repartition topic, and SIGKILLs at random change nothing in the read_committed output.

use std::collections::BTreeMap;
use std::time::Duration;


use crate::support::*;

/// Distinct ad keys: a click's key finds at most one ad inside the join's time bounds.
const ADS: u64 = 2_000;

/// Ad `id`: key `a<id % ADS>`, event time 10 ms per id with up to 400 ms of disorder.
fn ad(id: u64) -> Input {
    let key = format!("a{}", id % ADS);
    let ts = 1_700_000_000_000 + id * 10 + (id * 7919) % 400;
    Input::keyed(key.clone(), format!(r#"{{"ad":"{key}","id":{id},"ts":{ts}}}"#))
}

/// Click `id`: 2 s after ad `id` in event time, for a scattered ad key, so that about a
/// quarter of the clicks find their ad within 5 s and the rest stay unmatched.
fn click(id: u64) -> Input {
    let key = format!("a{}", (id * 13) % ADS);
    let ts = 1_700_000_002_000 + id * 10 + (id * 104_729) % 400;
    Input::keyed(key.clone(), format!(r#"{{"ad":"{key}","id":{id},"ts":{ts}}}"#))
}

fn join_pipeline(name: &str, ads: &str, clicks: &str, output: &str) -> PipelineFile {
    let source = |source: &str, topic: &str| {
        format!(
            "  {source}:\n    topics: [{topic}]\n    format: json\n    schema: {{ ad: string, id: long, ts: long }}\n    \
             event_time: {{ field: ts, unit: millis }}\n    watermark: {{ max_out_of_orderness: 1s }}\n"
        )
    };
    pipeline_file(&format!(
        "name: {name}\nsources:\n{}{}join:\n  left: ads\n  right: clicks\n  type: full\n  on: [ad]\n  \
         within: {{ lower: 0s, upper: 5s }}\nsink:\n  topic: {output}\n",
        source("ads", ads),
        source("clicks", clicks)
    ))
}

/// Every record as read_committed sees it, counted by value.
fn multiset(topic: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for record in read_committed(topic) {
        *counts.entry(record.value_text()).or_default() += 1;
    }
    counts
}

#[test]
fn a_full_join_survives_sigkills_exactly() {
    let _heavy = heavy_test();
    const RECORDS: u64 = 100_000; // per side
    let (ads, clicks) = (unique("ads"), unique("clicks"));
    let (golden, crashed) = (unique("join-golden"), unique("join-crashed"));
    for topic in [&ads, &clicks, &golden, &crashed] {
        create_topic(topic, 4);
    }
    let feeders = [feed_with(&ads, 0..RECORDS, 8_000, ad), feed_with(&clicks, 0..RECORDS, 8_000, click)];

    let file = join_pipeline(&unique("join"), &ads, &clicks, &crashed);
    // Killed at a random moment after it has committed join state (or, once the input is
    // all there, after it is ready): on a loaded machine a process can otherwise be killed
    // before it ever commits, and no restart would have state to restore.
    let fed = || feeders.iter().all(|feeder| feeder.is_finished());
    let running = |process: &WeirProcess| has_committed_state(process, "0") || (fed() && is_ready(process));
    let (kills, mut logs) = kill_repeatedly(&[&file.path], 10, running, fed);
    for feeder in feeders {
        feeder.join().unwrap();
    }
    let mut last = WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(last.wait(Duration::from_secs(600)).success(), "final run failed:\n{}", last.log_text());
    logs.push(last.log_text());

    let reference = join_pipeline(&unique("join-golden"), &ads, &clicks, &golden);
    let mut run = WeirProcess::start(&reference.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(run.wait(Duration::from_secs(600)).success(), "golden run failed:\n{}", run.log_text());

    let expected = multiset(&golden);
    let pairs = expected.keys().filter(|value| !value.contains("null")).count();
    let outer = expected.keys().filter(|value| value.contains("null")).count();
    assert!(pairs > 10_000 && outer > 10_000, "the golden run should have pairs and outer rows: {pairs} and {outer}");
    let actual = multiset(&crashed);
    let missing = expected.iter().filter(|(record, count)| actual.get(*record) != Some(count)).count();
    let extra = actual.iter().filter(|(record, count)| expected.get(*record) != Some(count)).count();
    assert!(missing == 0 && extra == 0, "{missing} golden records missing or miscounted, {extra} unexpected, over {kills} kills");
    let restores: Vec<(u64, u64)> = logs.iter().flat_map(|log| restores(log)).collect();
    assert!(restores.iter().any(|(store, changelog)| store + changelog > 0), "no restart restored join state: {restores:?}");
}

/// Records in are counted per source, and the join's buffered records show as its state.
#[test]
fn a_join_counts_records_per_source_and_its_state() {
    let (ads, clicks, output) = (unique("ads"), unique("clicks"), unique("join-out"));
    for topic in [&ads, &clicks, &output] {
        create_topic(topic, 2);
    }
    produce(&ads, (0..10).map(ad));
    produce(&clicks, (0..20).map(click));
    let name = unique("join-metrics");
    let file = join_pipeline(&name, &ads, &clicks, &output);
    let weir = WeirProcess::start(&file.path, WeirOptions::default());
    wait_until(Duration::from_secs(60), "both sources committed to the end", || {
        committed_offsets(&name, &ads) == end_offsets(&ads) && committed_offsets(&name, &clicks) == end_offsets(&clicks)
    });
    assert_eq!(metric(&weir, "weir_records_in_total", &[("source", "ads")]), Some(10.0));
    assert_eq!(metric(&weir, "weir_records_in_total", &[("source", "clicks")]), Some(20.0));
    // 30 records 10 ms apart: the watermark (1 s behind) has ended none of them yet.
    wait_until(Duration::from_secs(30), "the join's state to show", || {
        metric(&weir, "weir_step_state_keys", &[("step", "0")]) == Some(30.0)
    });
}

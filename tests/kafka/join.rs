//! The interval join in `weir run`: both sources flow into the join's tasks through the
//! repartition topic, or, co-partitioned, meet in place in the tasks of partition pairs;
//! SIGKILLs at random change nothing in the read_committed output, and in
//! `idempotent_upsert` mode the last value of every join result's id is the same.

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
    pipeline_file(&join_pipeline_text(name, ads, clicks, output, ""))
}

/// `source_extra` goes into both sources (e.g. `partitioned_by`); anything after the sink
/// topic follows it.
fn join_pipeline_text(name: &str, ads: &str, clicks: &str, output: &str, source_extra: &str) -> String {
    let source = |source: &str, topic: &str| {
        format!(
            "  {source}:\n    topics: [{topic}]\n    format: json\n    schema: {{ ad: string, id: long, ts: long }}\n    \
             event_time: {{ field: ts, unit: millis }}\n    watermark: {{ max_out_of_orderness: 1s }}\n{source_extra}"
        )
    };
    format!(
        "name: {name}\nsources:\n{}{}join:\n  left: ads\n  right: clicks\n  type: full\n  on: [ad]\n  \
         within: {{ lower: 0s, upper: 5s }}\nsink:\n  topic: {output}\n",
        source("ads", ads),
        source("clicks", clicks)
    )
}

/// Both sources keyed by `ad` (as `ad` and `click` produce them): the join runs in place.
const CO_PARTITIONED: &str = "    partitioned_by: [ad]\n";

/// Every record as read_committed sees it, counted by value.
fn multiset(topic: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for record in read_committed(topic) {
        *counts.entry(record.value_text()).or_default() += 1;
    }
    counts
}

/// The join through a repartition topic, SIGKILLed at random at least 10 times: the
/// transactional output equals an uninterrupted run's, and beside it, the same join in
/// `idempotent_upsert` mode (whose replays forward records again) ends with the same
/// results as the last value of each id.
#[test]
fn a_full_join_survives_sigkills_exactly() {
    let _heavy = heavy_test();
    let (ads, clicks) = (unique("ads"), unique("clicks"));
    let (golden, crashed, upserts) = (unique("join-golden"), unique("join-crashed"), unique("join-upserts"));
    for topic in [&ads, &clicks, &golden, &crashed, &upserts] {
        create_topic(topic, 4);
    }
    let file = join_pipeline(&unique("join"), &ads, &clicks, &crashed);
    let upsert = pipeline_file(&(join_pipeline_text(&unique("join-upsert"), &ads, &clicks, &upserts, "") + "  mode: idempotent_upsert\n"));
    let (kills, logs) = killed_while_fed(&ads, &clicks, &[&file, &upsert]);
    let expected = golden_results(&join_pipeline_text(&unique("join-golden"), &ads, &clicks, &golden, ""), &golden, 10_000);
    assert_same_results(&expected, &multiset(&crashed), "", kills);
    let restores: Vec<(u64, u64)> = logs.iter().flat_map(|log| restores(log)).collect();
    assert!(restores.iter().any(|(store, changelog)| store + changelog > 0), "no restart restored join state: {restores:?}");
    assert_upsert_results(&upserts, &ads, &clicks, &expected, kills);
}

/// Feeds 100,000 ads and 100,000 clicks while the pipelines in `files` are SIGKILLed
/// together at a random moment at least 10 times, then runs each to the end. Returns the
/// kills and every log.
fn killed_while_fed(ads: &str, clicks: &str, files: &[&PipelineFile]) -> (usize, Vec<String>) {
    const RECORDS: u64 = 100_000; // per side
    let feeders = [feed_with(ads, 0..RECORDS, 8_000, ad), feed_with(clicks, 0..RECORDS, 8_000, click)];
    // Killed at a random moment after it has committed join state (or, once the input is
    // all there, after it is ready): on a loaded machine a process can otherwise be killed
    // before it ever commits, and no restart would have state to restore.
    let fed = || feeders.iter().all(|feeder| feeder.is_finished());
    let running = |process: &WeirProcess| has_committed_state(process, "0") || (fed() && is_ready(process));
    let paths: Vec<&std::path::Path> = files.iter().map(|file| file.path.as_path()).collect();
    let (kills, mut logs) = kill_repeatedly(&paths, 10, running, fed);
    for feeder in feeders {
        feeder.join().unwrap();
    }
    for file in files {
        let mut last = WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() });
        assert!(last.wait(Duration::from_secs(600)).success(), "final run failed:\n{}", last.log_text());
        logs.push(last.log_text());
    }
    (kills, logs)
}

/// An uninterrupted run of `pipeline` to the end: its results in `output`, by value, which
/// must hold more than `at_least` pairs and as many outer rows.
fn golden_results(pipeline: &str, output: &str, at_least: usize) -> BTreeMap<String, usize> {
    let file = pipeline_file(pipeline);
    let mut run = WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(run.wait(Duration::from_secs(600)).success(), "golden run failed:\n{}", run.log_text());
    let expected = multiset(output);
    let pairs = expected.keys().filter(|value| !value.contains("null")).count();
    let outer = expected.keys().filter(|value| value.contains("null")).count();
    assert!(pairs > at_least && outer > at_least, "the golden run should have pairs and outer rows: {pairs} and {outer}");
    expected
}

fn assert_same_results(expected: &BTreeMap<String, usize>, actual: &BTreeMap<String, usize>, what: &str, kills: usize) {
    let missing = expected.iter().filter(|(record, count)| actual.get(*record) != Some(count)).count();
    let extra = actual.iter().filter(|(record, count)| expected.get(*record) != Some(count)).count();
    assert!(missing == 0 && extra == 0, "{what}{missing} golden records missing or miscounted, {extra} unexpected, over {kills} kills");
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

/// Co-partitioned sources: the join runs in the tasks of partition pairs, with no
/// repartition topic. Two pipelines read the same input and are SIGKILLed together at least
/// 10 times: a transactional one, whose read_committed output must equal an uninterrupted
/// run's, and one in `idempotent_upsert` mode, whose last value per `weir-id` must give the
/// same results, each id naming where both sides of its result were read.
#[test]
fn a_join_in_place_survives_sigkills_exactly_transactional_and_upsert() {
    let _heavy = heavy_test();
    let (ads, clicks) = (unique("ads"), unique("clicks"));
    let (golden, crashed, upserts) = (unique("join-golden"), unique("join-crashed"), unique("join-upserts"));
    for topic in [&ads, &clicks, &golden, &crashed, &upserts] {
        create_topic(topic, 4);
    }
    let name = unique("join-in-place");
    let transactional = pipeline_file(&join_pipeline_text(&name, &ads, &clicks, &crashed, CO_PARTITIONED));
    let upsert_name = unique("join-upsert");
    let upsert = pipeline_file(&(join_pipeline_text(&upsert_name, &ads, &clicks, &upserts, CO_PARTITIONED) + "  mode: idempotent_upsert\n"));
    let (kills, logs) = killed_while_fed(&ads, &clicks, &[&transactional, &upsert]);
    assert!(logs.iter().all(|log| log.contains("the join runs in place")), "{}", logs.last().unwrap());
    for pipeline in [&name, &upsert_name] {
        assert!(!topic_exists(&format!("{pipeline}-0-repartition")), "{pipeline} made a repartition topic");
    }
    let expected = golden_results(&join_pipeline_text(&unique("join-golden"), &ads, &clicks, &golden, CO_PARTITIONED), &golden, 10_000);
    assert_same_results(&expected, &multiset(&crashed), "transactional: ", kills);
    let restores: Vec<(u64, u64)> = logs.iter().flat_map(|log| restores(log)).collect();
    assert!(restores.iter().any(|(store, changelog)| store + changelog > 0), "no restart restored join state: {restores:?}");

    assert_upsert_results(&upserts, &ads, &clicks, &expected, kills);
}

/// Upsert mode: every value an id ever had is its one value, each id names where the
/// records of its result were read, and the last values are the transactional results.
fn assert_upsert_results(upserts: &str, ads: &str, clicks: &str, expected: &BTreeMap<String, usize>, kills: usize) {
    let mut by_id: BTreeMap<String, String> = BTreeMap::new();
    let mut changed = Vec::new();
    for record in read_committed(upserts) {
        let id = record.headers.get("weir-id").cloned().expect("every upsert output has a weir-id header");
        assert_eq!(record.key.as_deref(), Some(id.as_bytes()), "the Kafka key is the id");
        let value = record.value_json();
        let named: serde_json::Value = serde_json::from_str(&id).expect("the id is JSON");
        for (side, topic) in [("ads", ads), ("clicks", clicks)] {
            match &value[side] {
                serde_json::Value::Null => assert!(named[side].is_null(), "id {id} names a {side} record its result lacks"),
                _ => assert_eq!(named[side]["topic"].as_str(), Some(topic), "id {id} does not say where its {side} record was read"),
            }
        }
        if let Some(previous) = by_id.insert(id.clone(), record.value_text())
            && previous != record.value_text()
        {
            changed.push(id);
        }
    }
    assert!(changed.is_empty(), "{} ids were written with different values, e.g. {:?}", changed.len(), changed.first());
    let mut last_values: BTreeMap<String, usize> = BTreeMap::new();
    for value in by_id.into_values() {
        *last_values.entry(value).or_default() += 1;
    }
    assert_same_results(expected, &last_values, "upsert, last value per id: ", kills);
}

/// A join in place moves between instances by pairs: a second instance joins mid-run,
/// takes partition pairs (both sides, or it stops with an error), restores their state and
/// commits; then it leaves, and the first takes everything back. The output equals an
/// uninterrupted run's.
#[test]
fn a_join_in_place_moves_by_pairs_when_an_instance_joins_and_leaves() {
    const RECORDS: u64 = 30_000; // per side
    let (ads, clicks) = (unique("ads"), unique("clicks"));
    let (golden, moved) = (unique("join-golden"), unique("join-moved"));
    for topic in [&ads, &clicks, &golden, &moved] {
        create_topic(topic, 4);
    }
    let feeders = [feed_with(&ads, 0..RECORDS, 4_000, ad), feed_with(&clicks, 0..RECORDS, 4_000, click)];
    let name = unique("join-rebalanced");
    let file = pipeline_file(&join_pipeline_text(&name, &ads, &clicks, &moved, CO_PARTITIONED));
    let (mut first, mut second) = start_then_join(&file.path, Duration::from_secs(3));
    wait_until(Duration::from_secs(30), "the joining instance to restore and commit", || {
        metric(&second, "weir_batches_total", &[]).unwrap_or(0.0) > 0.0
    });
    // It owns whole pairs: as many partitions of each side.
    let assigned = metric(&second, "weir_assigned_partitions", &[]).unwrap_or(0.0);
    assert!(assigned > 0.0 && (assigned as u64).is_multiple_of(2), "the second instance owns {assigned} partitions:\n{}", second.log_text());
    assert!(metric(&second, "weir_state_restored_records_total", &[]).unwrap_or(0.0) > 0.0, "{}", second.log_text());
    std::thread::sleep(Duration::from_secs(2));
    second.terminate();
    assert!(second.wait(Duration::from_secs(30)).success(), "{}", second.log_text());
    for feeder in feeders {
        feeder.join().unwrap();
    }
    wait_until(Duration::from_secs(120), "the first instance to take everything back and reach the end", || {
        committed_offsets(&name, &ads) == end_offsets(&ads) && committed_offsets(&name, &clicks) == end_offsets(&clicks)
    });
    first.terminate();
    assert!(first.wait(Duration::from_secs(30)).success(), "{}", first.log_text());
    assert!(first.log_text().contains("the join runs in place"), "{}", first.log_text());

    let expected = golden_results(&join_pipeline_text(&unique("join-golden"), &ads, &clicks, &golden, CO_PARTITIONED), &golden, 3_000);
    assert_same_results(&expected, &multiset(&moved), "", 0);
}

/// Sources with different partition counts: declared co-partitioned, they cannot be (equal
/// keys land in differently numbered partitions), and weir stops saying so before reading;
/// undeclared, the join repartitions both into one set of tasks and finds every pair.
#[test]
fn sources_with_different_partition_counts_are_joined_through_a_repartition() {
    const RECORDS: u64 = 5_000;
    let (ads, clicks, output) = (unique("ads"), unique("clicks"), unique("join-out"));
    create_topic(&ads, 2);
    create_topic(&clicks, 3);
    create_topic(&output, 2);
    produce(&ads, (0..RECORDS).map(ad));
    produce(&clicks, (0..RECORDS).map(click));
    let inner = |text: String| text.replace("type: full", "type: inner");

    let declared = pipeline_file(&inner(join_pipeline_text(&unique("join-declared"), &ads, &clicks, &output, CO_PARTITIONED)));
    let mut refused = WeirProcess::start(&declared.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(!refused.wait(Duration::from_secs(60)).success(), "{}", refused.log_text());
    let log = refused.log_text();
    assert!(log.contains(&format!("{ads} has 2 and {clicks} has 3")) && log.contains("drop partitioned_by from one source"), "{log}");
    assert!(read_committed(&output).is_empty());

    let file = pipeline_file(&inner(join_pipeline_text(&unique("join-uneven"), &ads, &clicks, &output, "")));
    let mut run = WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(run.wait(Duration::from_secs(300)).success(), "{}", run.log_text());
    // Every (ad, click) with equal keys and ad.ts <= click.ts <= ad.ts + 5 s, worked out here.
    let parse = |input: Input| serde_json::from_slice::<serde_json::Value>(&input.value.unwrap()).unwrap();
    let ads_by_key: BTreeMap<String, Vec<serde_json::Value>> = (0..RECORDS).map(|id| parse(ad(id))).fold(BTreeMap::new(), |mut by_key, ad| {
        by_key.entry(ad["ad"].as_str().unwrap().to_string()).or_default().push(ad);
        by_key
    });
    let mut expected = BTreeMap::new();
    for click in (0..RECORDS).map(|id| parse(click(id))) {
        for ad in ads_by_key.get(click["ad"].as_str().unwrap()).into_iter().flatten() {
            let (ad_ts, click_ts) = (ad["ts"].as_i64().unwrap(), click["ts"].as_i64().unwrap());
            if ad_ts <= click_ts && click_ts <= ad_ts + 5_000 {
                *expected.entry((ad["id"].as_i64().unwrap(), click["id"].as_i64().unwrap())).or_insert(0) += 1;
            }
        }
    }
    let mut actual = BTreeMap::new();
    for record in read_committed(&output) {
        let value = record.value_json();
        *actual.entry((value["ads"]["id"].as_i64().unwrap(), value["clicks"]["id"].as_i64().unwrap())).or_insert(0) += 1;
    }
    assert!(expected.len() > 500, "the input should have pairs: {}", expected.len());
    assert_eq!(actual, expected);
}

/// A join in place followed by a window keyed otherwise: the pairs' tasks feed the window's
/// through one repartition topic, each pair vouching for its own watermark. The windows
/// equal those of the fully repartitioned plan over the same input.
#[test]
fn a_join_in_place_feeds_a_repartitioned_window() {
    const RECORDS: u64 = 20_000;
    let (ads, clicks) = (unique("ads"), unique("clicks"));
    let (in_place_out, repartitioned_out) = (unique("windows-in-place"), unique("windows-repartitioned"));
    for topic in [&ads, &clicks, &in_place_out, &repartitioned_out] {
        create_topic(topic, 4);
    }
    produce(&ads, (0..RECORDS).map(ad));
    produce(&clicks, (0..RECORDS).map(click));
    let window = "steps:\n  - window: { group_by: [clicks.ad], tumbling: 1s, aggregates: { n: count(), s: sum(ads.id) } }\nsink:";
    let pipeline = |name: &str, output: &str, keyed: &str| {
        join_pipeline_text(name, &ads, &clicks, output, keyed).replace("type: full", "type: inner").replace("sink:", window)
    };
    let in_place_name = unique("join-window");
    let mut results = Vec::new();
    for (name, output, keyed) in [(in_place_name.as_str(), &in_place_out, CO_PARTITIONED), (&unique("join-window-golden"), &repartitioned_out, "")] {
        let file = pipeline_file(&pipeline(name, output, keyed));
        let mut run = WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() });
        assert!(run.wait(Duration::from_secs(300)).success(), "{}", run.log_text());
        results.push(multiset(output));
    }
    assert!(topic_exists(&format!("{in_place_name}-1-repartition")) && !topic_exists(&format!("{in_place_name}-0-repartition")));
    assert!(results[1].len() > 1_000, "the repartitioned plan closed only {} windows", results[1].len());
    assert_same_results(&results[1], &results[0], "windows after the join in place: ", 0);
}

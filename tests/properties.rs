//! Property tests: for input that is not late, `emit: final`, dedup, and the last value per
//! (key, window) of `emit: update` do not depend on batch sizes or on how partitions
//! interleave.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const OUT_OF_ORDERNESS: i64 = 3_000;

fn pipeline(steps: &str) -> weir::config::Pipeline {
    let text = format!(
        r#"name: props
sources:
  events:
    topics: [events]
    format: json
    schema: {{ id: string, k: string, v: long, ts: long }}
    event_time: {{ field: ts, unit: millis }}
    watermark: {{ max_out_of_orderness: 3s }}
steps:
{steps}
sink:
  topic: out
"#
    );
    weir::config::parse_pipeline(&text).unwrap_or_else(|problems| panic!("{problems}"))
}

/// Per partition, records in roughly increasing event time (never behind their own
/// partition's watermark, so nothing is late anywhere), with keys repeating across partitions.
/// A fifth of the events are sent twice, to two partitions, as identical records: the
/// duplicates dedup exists for. (Which of two *different* records with one id comes first
/// depends on interleaving by definition, so those are not generated.)
fn partitions(rng: &mut StdRng) -> Vec<Vec<String>> {
    let mut partitions = vec![Vec::new(); 3];
    let mut base = rng.random_range(0..20_000i64);
    for id in 0..rng.random_range(60..150) {
        base += rng.random_range(0..600);
        let time = base + rng.random_range(0..OUT_OF_ORDERNESS);
        let line = format!(
            r#"{{"source":"events","partition":PARTITION,"value":{{"id":"e{id}","k":"k{}","v":{},"ts":{time}}}}}"#,
            rng.random_range(0..4),
            rng.random_range(-5..50),
        );
        let first = rng.random_range(0..3usize);
        partitions[first].push(line.replace("PARTITION", &first.to_string()));
        if rng.random_range(0..5) == 0 {
            let second = (first + rng.random_range(1..3usize)) % 3;
            partitions[second].push(line.replace("PARTITION", &second.to_string()));
        }
    }
    partitions
}

/// A random interleaving that keeps each partition's own order.
fn interleave(rng: &mut StdRng, partitions: &[Vec<String>]) -> String {
    let mut cursors = vec![0; partitions.len()];
    let mut lines = Vec::new();
    loop {
        let open: Vec<usize> = (0..partitions.len()).filter(|p| cursors[*p] < partitions[*p].len()).collect();
        if open.is_empty() {
            return lines.join("\n");
        }
        let partition = open[rng.random_range(0..open.len())];
        lines.push(partitions[partition][cursors[partition]].clone());
        cursors[partition] += 1;
    }
}

fn sorted(mut lines: Vec<String>) -> Vec<String> {
    lines.sort();
    lines
}

/// The table an upsert reader ends with: last value per key, tombstones deleting.
fn upsert_table(lines: &[String]) -> BTreeMap<String, Value> {
    let mut table = BTreeMap::new();
    for line in lines {
        let record: Value = serde_json::from_str(line).unwrap();
        let key = record["key"].to_string();
        match &record["value"] {
            Value::Null => table.remove(&key),
            value => table.insert(key, value.clone()),
        };
    }
    table
}

fn check(steps: &str, compare_as_upserts: bool) {
    let pipeline = pipeline(steps);
    for seed in 0..25u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let partitions = partitions(&mut rng);
        let reference_input = interleave(&mut rng, &partitions);
        let reference = weir::testing::run(&pipeline, &reference_input, 1000).unwrap();
        assert!(!reference.is_empty(), "seed {seed}: the pipeline produced nothing");
        assert!(reference.iter().all(|line| !line.contains("weir-error-stage")), "seed {seed}: input was meant to be on time");
        for batch_size in [1, 2, 7, 50] {
            let input = interleave(&mut rng, &partitions);
            let output = weir::testing::run(&pipeline, &input, batch_size).unwrap();
            if compare_as_upserts {
                assert_eq!(upsert_table(&output), upsert_table(&reference), "seed {seed}, batch size {batch_size}");
            } else {
                assert_eq!(sorted(output.clone()), sorted(reference.clone()), "seed {seed}, batch size {batch_size}");
            }
        }
    }
}

#[test]
fn dedup_output_is_the_same_set_for_any_batching_and_interleaving() {
    check("  - dedup: { key: [id], within: 5s }", false);
}

#[test]
fn tumbling_final_output_is_the_same_set() {
    check("  - window: { group_by: [k], tumbling: 5s, aggregates: { n: count(), s: sum(v), f: first(id), l: last(id) } }", false);
}

#[test]
fn hopping_final_output_is_the_same_set() {
    check("  - window: { group_by: [k], hopping: { size: 6s, slide: 2s }, aggregates: { n: count(), lo: min(v), hi: max(v) } }", false);
}

#[test]
fn session_final_output_is_the_same_set() {
    check("  - window: { group_by: [k], session: { gap: 2s }, aggregates: { n: count(), s: sum(v), d: count_distinct(id) } }", false);
}

#[test]
fn update_mode_ends_with_the_same_value_per_key_and_window() {
    check("  - window: { group_by: [k], tumbling: 5s, emit: update, aggregates: { n: count(), a: avg(v) } }", true);
    check("  - window: { group_by: [k], session: { gap: 2s }, emit: update, aggregates: { n: count(), s: sum(v) } }", true);
}

#[test]
fn dedup_then_window_is_the_same_set() {
    check("  - dedup: { key: [id], within: 5s }\n  - window: { group_by: [k], tumbling: 5s, aggregates: { n: count() } }", false);
}

/// Rebuilding every step's state from its changelog after each few commits (as a restarted
/// process does) gives exactly the output of the uninterrupted run.
#[test]
fn restoring_state_from_the_changelog_changes_nothing() {
    let cases = [
        "  - dedup: { key: [id], within: 5s }",
        "  - window: { group_by: [k], tumbling: 5s, aggregates: { n: count(), s: sum(v), f: first(id), l: last(id), d: count_distinct(id), a: avg(v) } }",
        "  - window: { group_by: [k], hopping: { size: 6s, slide: 2s }, aggregates: { n: count(), lo: min(v), hi: max(v) } }",
        "  - window: { group_by: [k], session: { gap: 2s }, emit: update, aggregates: { n: count(), s: sum(v) } }",
        "  - dedup: { key: [id], within: 5s }\n  - window: { group_by: [k], tumbling: 5s, emit: update, aggregates: { n: count() } }",
    ];
    for steps in cases {
        let pipeline = pipeline(steps);
        for seed in 0..15u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let partitions = partitions(&mut rng);
            let input = interleave(&mut rng, &partitions);
            for batch_size in [1, 5, 20] {
                let straight = weir::testing::run(&pipeline, &input, batch_size).unwrap();
                for every in [1, 3] {
                    let restarted = weir::testing::run_with_restarts(&pipeline, &input, batch_size, Some(every)).unwrap();
                    if restarted != straight {
                        let only_straight: Vec<_> = straight.iter().filter(|line| !restarted.contains(line)).collect();
                        let only_restarted: Vec<_> = restarted.iter().filter(|line| !straight.contains(line)).collect();
                        panic!("{steps}: seed {seed}, batch size {batch_size}, restart every {every}:\nonly without restarts: {only_straight:?}\nonly with restarts: {only_restarted:?}\n{} vs {} lines", straight.len(), restarted.len());
                    }
                }
            }
        }
    }
}

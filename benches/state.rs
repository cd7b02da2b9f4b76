//! State beyond memory: a dedup, or a running aggregate, over growing numbers of distinct
//! keys (none expire), each in the same run and over the same number of input records (so
//! that what differs is the state, not the length of the run): the rate, the peak resident
//! memory, the store on disk, the restart time to the first new committed output (over the
//! state the run left), and the restore rate of the whole changelog into an empty store (the
//! local state deleted, as on a new owner).
//! Run: `cargo bench --bench state` (`-- --step aggregate --records 3000000 10000 1000000
//! 3000000`: dedup (default) or aggregate, the records per run, default the largest key
//! count, then the key counts).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

const PARTITIONS: i32 = 4;
const USERS: u64 = 1000;
const DEDUP: &str = "  - dedup: { key: [user, id], within: 24h }";
const AGGREGATE: &str = "  - aggregate: { group_by: [user, id], aggregates: { clicks: count(), total: sum(amount) }, ttl: 24h }";

struct Measured {
    keys: u64,
    records: u64,
    seconds: f64,
    peak_rss_mib: f64,
    store_mib: f64,
    restart_seconds: f64,
    restore_entries: u64,
    /// The slowest partition's restore from the changelog, entries per second.
    restore_rate: f64,
}

fn main() {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let option = |name: &str| arguments.iter().position(|argument| argument == name).and_then(|at| arguments.get(at + 1));
    let records_given = option("--records").and_then(|records| records.parse().ok());
    let steps = match option("--step").map(String::as_str) {
        None | Some("dedup") => DEDUP,
        Some("aggregate") => AGGREGATE,
        Some(other) => panic!("--step {other}: dedup or aggregate"),
    };
    let mut counts: Vec<u64> = arguments
        .iter()
        .enumerate()
        .filter(|(at, _)| *at == 0 || arguments[at - 1] != "--records")
        .filter_map(|(_, argument)| argument.parse().ok())
        .collect();
    if counts.is_empty() {
        counts = vec![10_000, 1_000_000, 3_000_000];
    }
    let records = records_given.unwrap_or_else(|| counts.iter().copied().max().unwrap_or(0));
    println!(
        "broker: {}, {} over N distinct keys, {records} input records each (about 80 B, {PARTITIONS} partitions), key counts {counts:?}",
        broker().bootstrap,
        steps.trim()
    );
    let results: Vec<Measured> = counts.iter().map(|keys| measure(steps, *keys, records.max(*keys))).collect();
    println!();
    println!("| distinct keys | records/s | peak RSS (MiB) | store on disk (MiB) | restart to first new output (s) | changelog restore, slowest partition (entries/s) |");
    println!("|---|---|---|---|---|---|");
    for result in &results {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} ({} entries) |",
            result.keys,
            result.records as f64 / result.seconds,
            result.peak_rss_mib,
            result.store_mib,
            result.restart_seconds,
            result.restore_rate,
            result.restore_entries
        );
    }
    if let (Some(first), Some(last)) = (results.first(), results.last())
        && last.keys > first.keys
    {
        let per_million = (last.peak_rss_mib - first.peak_rss_mib) * 1_000_000.0 / (last.keys - first.keys) as f64;
        println!("\nresident memory growth: {per_million:.1} MiB per million keys ({} vs {} keys)", last.keys, first.keys);
        println!(
            "restart: {:.2} s with {} keys, {:.2} s with {} keys",
            first.restart_seconds, first.keys, last.restart_seconds, last.keys
        );
    }
}

/// `records` records over `keys` distinct keys (record n has key n mod keys).
fn measure(steps: &str, keys: u64, records: u64) -> Measured {
    let input = unique("bench-state-in");
    create_topic(&input, PARTITIONS);
    let producer = TestProducer::new();
    for n in 0..records {
        producer.send(&input, &click(n % keys, n));
    }
    producer.flush();
    let name = unique("bench-state");
    let output = format!("{name}-out");
    create_topic(&output, PARTITIONS);
    let file = pipeline_file(&clicks_pipeline_text(&name, &input, &output, steps, "partitioned_by: [user]"));
    let (seconds, peak_rss_mib) = run_until_end_measured(&file);
    // A dedup passes each key once; an aggregate writes each key's value at least once.
    let produced = read_committed(&output);
    let distinct: std::collections::HashSet<&Option<Vec<u8>>> = produced.iter().map(|record| &record.key).collect();
    assert_eq!(distinct.len() as u64, keys, "every key");
    assert!(steps != DEDUP || produced.len() as u64 == keys, "every key once");
    let state = file.path.parent().expect("the pipeline's directory").join("state");
    let store_mib = directory_bytes(&state) as f64 / (1024.0 * 1024.0);
    println!("{keys} keys, {records} records: {:.0} records/s, peak RSS {peak_rss_mib:.0} MiB, store {store_mib:.0} MiB", records as f64 / seconds);

    // The restart over the state the run left, timed from the start of the new process to
    // its first committed output (of 1000 new records, produced before it starts).
    let restart_seconds = restart(&file, &input, &output, keys, records, 1).0;
    // A new owner: the local state is gone, the changelog is read back whole.
    std::fs::remove_dir_all(&state).expect("the state directory is deleted");
    let (_, log) = restart(&file, &input, &output, keys + 1000, records + 1000, 2);
    let restores = restore_lines(&log);
    println!("  restores from the changelog (entries, ms): {restores:?}");
    let restore_entries = restores.iter().map(|(entries, _)| entries).sum();
    let restore_rate = restores
        .iter()
        .filter(|(entries, _)| *entries > 0)
        .map(|(entries, millis)| *entries as f64 * 1000.0 / (*millis).max(1) as f64)
        .fold(f64::INFINITY, f64::min);
    Measured { keys, records, seconds, peak_rss_mib, store_mib, restart_seconds, restore_entries, restore_rate }
}

/// The record with key `id`, the `n`th of the input (its event time).
fn click(id: u64, n: u64) -> Input {
    let user = format!("u{}", id % USERS);
    let value = format!(r#"{{"id":{id},"user":"{user}","amount":{},"ts":{}}}"#, id % 100, 1_700_000_000_000 + n);
    Input::keyed(user, value)
}

/// Produces 1000 records with new ids from `first_id` (the input's `first_n`th on), starts
/// the pipeline over the state its last process left and times it to its first committed
/// output; returns the seconds and the new process's log.
fn restart(file: &PipelineFile, input: &str, output: &str, first_id: u64, first_n: u64, round: u64) -> (f64, String) {
    let producer = TestProducer::new();
    for offset in 0..1000 {
        producer.send(input, &click(first_id + offset, first_n + offset));
    }
    producer.flush();
    let started = Instant::now();
    let restarted = WeirProcess::start(&file.path, WeirOptions::default());
    wait_until(Duration::from_secs(900), "the restarted dedup's first committed output", || {
        metric(&restarted, "weir_records_out_total", &[("sink", output)]).unwrap_or(0.0) > 0.0
    });
    let elapsed = started.elapsed().as_secs_f64();
    let log = restarted.log_text();
    println!("  restart {round}: {elapsed:.2} s to the first committed output");
    (elapsed, log)
}

/// (entries restored from the changelog, milliseconds) of each "restored state" line.
fn restore_lines(log: &str) -> Vec<(u64, u64)> {
    let field = |line: &str, name: &str| -> u64 {
        line.split(&format!("{name}\":")).nth(1).or_else(|| line.split(&format!("{name}=")).nth(1))
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .unwrap_or(0)
    };
    log.lines()
        .filter(|line| line.contains("restored state"))
        .map(|line| (field(line, "from_changelog"), field(line, "elapsed_ms")))
        .collect()
}

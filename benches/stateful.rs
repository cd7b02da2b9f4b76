//! Stateful throughput, memory and restart time, as ratios of weir's own pass-through in the
//! same run: dedup over 1M distinct keys, and a tumbling-window count. Then the time from
//! SIGKILL to the first committed output of a restarted dedup holding 1M keys of state.
//! Run: `cargo bench --bench stateful` (`-- N` sets the record count, default 1,000,000).
//! Every run's output count is checked against the expected answer.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

const PARTITIONS: i32 = 4;
const USERS: u64 = 1000;

struct Run {
    seconds: f64,
    peak_rss_mib: f64,
    /// The pipeline file; its directory also holds the run's local state store.
    file: PipelineFile,
}

fn main() {
    let records: u64 = std::env::args().filter_map(|argument| argument.parse().ok()).next().unwrap_or(1_000_000);
    let input = unique("bench-clicks");
    create_topic(&input, PARTITIONS);
    let producer = TestProducer::new();
    for id in 0..records {
        let user = format!("u{}", id % USERS);
        // 10 ms of event time per record: 1s windows hold 100 records across all users.
        let value = format!(r#"{{"id":{id},"user":"{user}","amount":{},"ts":{}}}"#, id % 100, 1_700_000_000_000 + id * 10);
        producer.send(&input, &Input::keyed(user, value));
    }
    producer.flush();
    println!("broker: {}, {records} input records of about 80 B keyed by {USERS} users", broker().bootstrap);

    let pass = run(&input, "", records);
    let dedup_steps = "  - dedup: { key: [user, id], within: 24h }";
    let dedup_name = unique("bench-dedup");
    let dedup = run_named(&dedup_name, &input, dedup_steps, records, true);
    let windows_total = expected_windows(records);
    let window_steps = "  - window: { group_by: [user], tumbling: 1s, aggregates: { n: count() } }";
    let window = run(&input, window_steps, windows_total);
    // The same window with the input not declared partitioned by user: every record takes
    // the extra hop through the repartition topic.
    let repartitioned = run_named(&unique("bench-repartitioned"), &input, window_steps, windows_total, false);

    println!();
    println!("| pipeline | records/s | ratio to pass-through | peak RSS (MiB) |");
    println!("|---|---|---|---|");
    for (label, result) in [
        ("pass-through (JSON, no steps)", &pass),
        ("dedup, 1M distinct keys", &dedup),
        ("tumbling 1s count by user", &window),
        ("the same, repartitioned by user", &repartitioned),
    ] {
        println!(
            "| {label} | {:.0} | {:.2} | {:.0} |",
            records as f64 / result.seconds,
            pass.seconds / result.seconds,
            result.peak_rss_mib
        );
    }
    println!(
        "\nstate memory: about {:.0} MiB per million dedup keys (peak RSS of dedup minus pass-through)",
        (dedup.peak_rss_mib - pass.peak_rss_mib) * 1_000_000.0 / records as f64
    );
    let store = dedup.file.path.parent().unwrap().join("state");
    println!(
        "local state store: {:.0} MiB per million dedup keys on disk (RocksDB, lz4)",
        directory_bytes(&store) as f64 / (1024.0 * 1024.0) * 1_000_000.0 / records as f64
    );

    // Restarts with the dedup's 1M keys of state, each timed from the moment the old process
    // is gone to the new process's first committed output (of records produced meanwhile).
    // After a clean stop (the run above exited at the end of its input):
    let clean = restart(&dedup.file, &dedup_name, &input, records);
    // After SIGKILL: a process dedups the same input into a fresh state and is killed the
    // moment all of it is committed, so its store has not flushed and replays its log.
    let killed_name = unique("bench-killed");
    create_topic(&format!("{killed_name}-out"), PARTITIONS);
    let killed_file = pipeline_file(&clicks_pipeline_text(&killed_name, &input, &format!("{killed_name}-out"), dedup_steps, "partitioned_by: [user]"));
    let mut doomed = WeirProcess::start(&killed_file.path, WeirOptions::default());
    wait_until(Duration::from_secs(600), "the dedup to commit its whole input", || {
        metric(&doomed, "weir_records_out_total", &[("sink", &format!("{killed_name}-out"))]).unwrap_or(0.0) >= (records + 1000) as f64
    });
    doomed.kill();
    let killed = restart(&killed_file, &killed_name, &input, records + 1000);
    for (label, (elapsed, from_store, from_changelog, milestones)) in [("a clean stop", clean), ("SIGKILL", killed)] {
        println!(
            "restart after {label}: {elapsed:.1} s to the first committed output, with {from_store} state entries from the \
             local store and {from_changelog} from the changelog"
        );
        for line in milestones {
            println!("  {line}");
        }
    }
}

/// Produces 1000 records with new ids from `first_id` on, starts the pipeline of `file` over
/// the state its last process left, and times it to its first committed output.
/// Returns the seconds, the restored entries (from the store, from the changelog) and the
/// milestones of the new process's log.
fn restart(file: &PipelineFile, name: &str, input: &str, first_id: u64) -> (f64, u64, u64, Vec<String>) {
    let producer = TestProducer::new();
    for id in first_id..first_id + 1000 {
        let user = format!("u{}", id % USERS);
        let value = format!(r#"{{"id":{id},"user":"{user}","amount":1,"ts":{}}}"#, 1_700_000_000_000 + id * 10);
        producer.send(input, &Input::keyed(user, value));
    }
    producer.flush();
    let started = Instant::now();
    let restarted = WeirProcess::start(&file.path, WeirOptions::default());
    wait_until(Duration::from_secs(600), "the restarted dedup's first committed output", || {
        metric(&restarted, "weir_records_out_total", &[("sink", &format!("{name}-out"))]).unwrap_or(0.0) > 0.0
    });
    let elapsed = started.elapsed().as_secs_f64();
    let log = restarted.log_text();
    let (from_store, from_changelog) =
        restores(&log).into_iter().fold((0, 0), |(store, changelog), (from_store, from_changelog)| (store + from_store, changelog + from_changelog));
    // Where the time went, from the process's own log.
    let milestones = ["weir starting", "transactions initialized", "subscribed", "partitions assigned", "restored state"];
    let lines = log.lines().filter(|line| milestones.iter().any(|milestone| line.contains(milestone))).map(str::to_string).collect();
    (elapsed, from_store, from_changelog, lines)
}

fn expected_windows(records: u64) -> u64 {
    // Every user has a record in every 1s window but the last few still open at the end.
    let mut windows = std::collections::BTreeSet::new();
    for id in 0..records {
        windows.insert((id % USERS, (id * 10) / 1000));
    }
    let last_time = (records - 1) * 10;
    // A window closes when the watermark (per partition: max time - 1s) reaches its end.
    windows.into_iter().filter(|(_, second)| (second + 1) * 1000 + 1000 <= last_time - 40).count() as u64
}

fn run(input: &str, steps: &str, expected_outputs: u64) -> Run {
    run_named(&unique("bench-stateful"), input, steps, expected_outputs, true)
}

/// Runs a pipeline to the end of the input; `partitioned`: the input is declared partitioned
/// by user (as it is), else keyed steps repartition.
fn run_named(name: &str, input: &str, steps: &str, expected_outputs: u64, partitioned: bool) -> Run {
    let output = format!("{name}-out");
    create_topic(&output, PARTITIONS);
    let steps = if steps.is_empty() { "  []" } else { steps };
    let file = pipeline_file(&clicks_pipeline_text(name, input, &output, steps, if partitioned { "partitioned_by: [user]" } else { "" }));
    let (seconds, peak_rss_mib) = run_until_end_measured(&file);
    let produced = read_committed(&output).len() as u64;
    // The window count depends on per-partition watermarks; check it loosely, the others exactly.
    if steps.contains("window") {
        assert!(produced > 0 && produced.abs_diff(expected_outputs) <= USERS * 3, "{steps}: {produced} outputs, expected about {expected_outputs}");
    } else {
        assert_eq!(produced, expected_outputs, "{steps}: output count");
    }
    Run { seconds, peak_rss_mib, file }
}


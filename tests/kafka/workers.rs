//! Several workers in one process (`runtime.workers`): each a consumer-group member with its
//! own transaction and state store, sharing the input as separate processes would.

use std::time::Duration;

use rand::Rng;
use serde_json::Value;

use crate::support::*;

fn workers(count: usize) -> Vec<(String, String)> {
    let mut env = short_session();
    env.push(("WEIR__RUNTIME__WORKERS".to_string(), count.to_string()));
    env
}

fn status(process: &WeirProcess) -> Value {
    process.http_get("/status").and_then(|(_, body)| serde_json::from_str(&body).ok()).unwrap_or(Value::Null)
}

/// Each group member's `/status` section: (instance, owned partitions, batches committed).
fn worker_sections(process: &WeirProcess) -> Vec<(String, usize, u64)> {
    process
        .member_reports()
        .iter()
        .map(|worker| {
            let instance = worker["instance"].as_str().unwrap_or_default().to_string();
            let partitions = worker["partitions"].as_object().map_or(0, |owned| owned.len());
            (instance, partitions, worker["batches_committed"].as_u64().unwrap_or(0))
        })
        .collect()
}

/// Two workers of one process share four partitions, and their dedup state, each in its own
/// store, survives SIGKILLs of the whole process: every click, sent twice, comes out exactly
/// once, and a final `--until-end` run of both workers stops at the end of the input.
#[test]
fn two_workers_share_the_partitions_and_their_state_survives_sigkills() {
    let _heavy = heavy_test();
    const IDS: u64 = 20_000;
    let (input, output, name) = (unique("clicks"), unique("out"), unique("workers"));
    create_topic(&input, 4);
    create_topic(&output, 4);
    // Keyed within the input's partitioning (by user): no repartition topic.
    let file = clicks_pipeline(&name, &input, &output, "  - dedup: { key: [user, id], within: 1h }");
    // Every click twice in a row: the dedup drops the second, from its batch's state or,
    // when the first was in an earlier batch (or before a kill), from its worker's store.
    let feeder = feed_with(&input, 0..2 * IDS, 2_000, |n| timed_event(n / 2));

    let first = WeirProcess::start(&file.path, WeirOptions { env: workers(2), ..Default::default() });
    wait_ready(&first, Duration::from_secs(90));
    wait_until(Duration::from_secs(60), "both workers to own partitions and commit", || {
        let sections = worker_sections(&first);
        sections.len() == 2 && sections.iter().all(|(_, partitions, batches)| *partitions > 0 && *batches > 0)
    });
    let instances: Vec<String> = worker_sections(&first).into_iter().map(|(instance, ..)| instance).collect();
    assert_eq!(instances, ["0", "0-w1"], "worker 0 keeps the process's instance");
    wait_until(Duration::from_secs(30), "the workers' assigned partitions to add up to the input's", || {
        metric(&first, "weir_assigned_partitions", &[]) == Some(4.0)
    });
    assert_eq!(status(&first)["ready"], Value::Bool(true));
    drop(first);

    let mut rng = rand::rng();
    let mut kills = 1;
    while kills < 4 || !feeder.is_finished() {
        let mut weir = WeirProcess::start(&file.path, WeirOptions { env: workers(2), ..Default::default() });
        // Running again: both own partitions (waiting for commits would wait forever once
        // the feeder is done and every record committed).
        wait_until(Duration::from_secs(120), "both workers to own partitions again", || {
            worker_sections(&weir).iter().filter(|(_, partitions, _)| *partitions > 0).count() == 2
        });
        weir.keep_running_for(Duration::from_millis(rng.random_range(500..4_000)));
        weir.kill();
        kills += 1;
        assert!(kills < 40, "the input never finished flowing");
    }
    feeder.join().unwrap();

    let mut last = WeirProcess::start(&file.path, WeirOptions { until_end: true, env: workers(2), ..Default::default() });
    let exit = last.wait(Duration::from_secs(300));
    assert!(exit.success(), "the final run failed: {exit}\n{}", last.log_text());
    assert_exactly_once(&output, &(0..IDS).collect::<Vec<_>>());
    assert_eq!(committed_offsets(&name, &input), end_offsets(&input));
}

/// More workers than partitions: the idle worker does not hold the process's readiness
/// back, and with `--until-end` the process stops once the workers that own the partitions
/// reach the end.
#[test]
fn with_more_workers_than_partitions_the_process_is_ready_and_until_end_stops() {
    const IDS: u64 = 2_000;
    let (input, output, name) = (unique("in"), unique("out"), unique("idle-worker"));
    create_topic(&input, 2);
    create_topic(&output, 2);
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  - filter: \"amount > 10.0\""));
    feed(&input, 0..IDS, 20_000).join().unwrap();

    let mut running = WeirProcess::start(&pipeline.path, WeirOptions { env: workers(3), ..Default::default() });
    wait_ready(&running, Duration::from_secs(90));
    wait_until(Duration::from_secs(60), "two partitions among three workers", || {
        let mut owned: Vec<usize> = worker_sections(&running).into_iter().map(|(_, partitions, _)| partitions).collect();
        owned.sort_unstable();
        owned == [0, 1, 1]
    });
    assert!(is_ready(&running), "the idle worker does not hold readiness back");
    running.terminate();
    assert!(running.wait(Duration::from_secs(30)).success(), "{}", running.log_text());

    feed(&input, IDS..2 * IDS, 20_000).join().unwrap();
    let mut run = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, env: workers(3), ..Default::default() });
    let exit = run.wait(Duration::from_secs(180));
    assert!(exit.success(), "{exit}\n{}", run.log_text());
    assert_exactly_once(&output, &kept_by_amount_filter(0..2 * IDS));
    assert_eq!(committed_offsets(&name, &input), end_offsets(&input));
}

/// A worker fenced by a newer producer with its transactional id (here a process started as
/// that worker's instance) stops its whole process, which exits non-zero; the newer process
/// goes on, and the output holds every record exactly once.
#[test]
fn a_fenced_worker_stops_its_whole_process() {
    const IDS: u64 = 20_000;
    let (input, output, name) = (unique("in"), unique("out"), unique("fenced-worker"));
    create_topic(&input, 2);
    create_topic(&output, 2);
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  - filter: \"amount > 10.0\""));
    let feeder = feed(&input, 0..IDS, 2_000);

    let mut first = WeirProcess::start(&pipeline.path, WeirOptions { instance: "3", env: workers(2), ..Default::default() });
    wait_until(Duration::from_secs(90), "both workers to commit", || {
        worker_sections(&first).iter().filter(|(_, _, batches)| *batches > 0).count() == 2
    });
    let mut newer = WeirProcess::start(&pipeline.path, WeirOptions { instance: "3-w1", env: short_session(), ..Default::default() });

    let exit = first.wait(Duration::from_secs(90));
    assert!(!exit.success(), "a process with a fenced worker must exit non-zero");
    let log = first.log_text();
    assert!(log.contains("fenced"), "{log}");
    assert!(log.contains("stopping the others"), "{log}");

    feeder.join().unwrap();
    wait_until(Duration::from_secs(120), "the newer process to reach the end", || {
        committed_offsets(&name, &input) == end_offsets(&input)
    });
    newer.terminate();
    assert!(newer.wait(Duration::from_secs(30)).success(), "{}", newer.log_text());
    assert_exactly_once(&output, &kept_by_amount_filter(0..IDS));
}

//! The exactly-once guarantee under crashes, zombies and rebalances.

use std::time::Duration;

use rand::Rng;

use crate::support::*;

/// While 100,000 records flow, weir is SIGKILLed at random moments at least 10 times and
/// restarted each time; the output holds every expected record exactly once and the
/// group's committed offsets reach the end of the input.
#[test]
fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let _heavy = heavy_test();
    const RECORDS: u64 = 100_000;
    let (input, output) = (unique("in"), unique("out"));
    let name = unique("crash");
    create_topic(&input, 4);
    create_topic(&output, 4);
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  - filter: \"amount > 10.0\""));
    let feeder = feed(&input, 0..RECORDS, 4_000);

    let mut rng = rand::rng();
    let mut kills = 0;
    while kills < 10 || !feeder.is_finished() {
        let mut weir = WeirProcess::start(&pipeline.path, WeirOptions::default());
        // Some kills land during start-up and rebalancing, most in the middle of batches.
        weir.keep_running_for(Duration::from_millis(rng.random_range(500..6_000)));
        weir.kill();
        kills += 1;
        assert!(kills < 60, "the input never finished flowing");
    }
    feeder.join().unwrap();

    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    let status = weir.wait(Duration::from_secs(300));
    assert!(status.success(), "final run failed: {status}\n{}", weir.log_text());
    assert!(kills >= 10);
    assert_exactly_once(&output, &kept_by_amount_filter(0..RECORDS));
    assert_eq!(committed_offsets(&name, &input), end_offsets(&input));
}

/// A second process with the same instance id takes over: the first is fenced and exits
/// non-zero, and the output still holds every record exactly once.
#[test]
fn a_zombie_with_the_same_instance_id_is_fenced() {
    const RECORDS: u64 = 20_000;
    let (input, output) = (unique("in"), unique("out"));
    let name = unique("zombie");
    create_topic(&input, 2);
    create_topic(&output, 2);
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  - filter: \"amount > 10.0\""));
    let feeder = feed(&input, 0..RECORDS, 2_000);

    let mut first = WeirProcess::start(&pipeline.path, WeirOptions { instance: "7", ..Default::default() });
    wait_ready(&first, Duration::from_secs(60));
    wait_until(Duration::from_secs(30), "the first process to commit", || {
        metric(&first, "weir_batches_total", &[]).unwrap_or(0.0) > 0.0
    });
    let mut second = WeirProcess::start(&pipeline.path, WeirOptions { instance: "7", ..Default::default() });

    let status = first.wait(Duration::from_secs(60));
    assert!(!status.success(), "the fenced process must exit non-zero");
    assert!(first.log_text().contains("fenced"), "{}", first.log_text());

    feeder.join().unwrap();
    wait_until(Duration::from_secs(120), "the second process to reach the end", || {
        committed_offsets(&name, &input) == end_offsets(&input)
    });
    second.terminate();
    assert!(second.wait(Duration::from_secs(30)).success(), "{}", second.log_text());
    assert_exactly_once(&output, &kept_by_amount_filter(0..RECORDS));
}

/// A second process joins mid-run, takes partitions, and later leaves: the output is still
/// exactly once, and the first process finishes the work.
#[test]
fn a_process_joining_and_leaving_mid_run_keeps_exactly_once() {
    const RECORDS: u64 = 40_000;
    let (input, output) = (unique("in"), unique("out"));
    let name = unique("scale");
    create_topic(&input, 4);
    create_topic(&output, 4);
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  - filter: \"amount > 10.0\""));
    let feeder = feed(&input, 0..RECORDS, 2_500);

    let (mut first, mut second) = start_then_join(&pipeline.path, Duration::from_secs(2));
    wait_until(Duration::from_secs(30), "the joining process to commit records", || {
        metric(&second, "weir_records_in_total", &[("source", "events")]).unwrap_or(0.0) > 0.0
    });
    assert!(metric(&first, "weir_assigned_partitions", &[]).unwrap() < 4.0, "the first process gave partitions away");
    std::thread::sleep(Duration::from_secs(2));
    second.terminate();
    assert!(second.wait(Duration::from_secs(30)).success(), "{}", second.log_text());

    feeder.join().unwrap();
    wait_until(Duration::from_secs(120), "the first process to take everything back and reach the end", || {
        committed_offsets(&name, &input) == end_offsets(&input)
    });
    assert_eq!(metric(&first, "weir_assigned_partitions", &[]), Some(4.0));
    first.terminate();
    assert!(first.wait(Duration::from_secs(30)).success(), "{}", first.log_text());
    assert_exactly_once(&output, &kept_by_amount_filter(0..RECORDS));
}

/// Audit R1: a step that panics on one record must never commit that record's half-applied
/// state. Here a dedup has stored the record's key when the window after it panics (a fail
/// point). Committing then would have made the restarted process drop the record as a
/// duplicate: no result and no DLQ record. The record must come out of the restart, or be
/// in the DLQ, and every other record counted once.
#[test]
fn a_step_that_panics_on_a_record_never_drops_it() {
    let (input, output, name) = (unique("in"), unique("out"), unique("panic"));
    create_topic(&input, 1);
    create_topic(&output, 1);
    let t0 = 1_700_000_000_000i64;
    let click = |id: i64, user: &str, ts: i64| Input::keyed(user.to_string(), format!(r#"{{"id":{id},"user":"{user}","amount":1,"ts":{ts}}}"#));
    let mut inputs: Vec<Input> = (0..10).map(|id| click(id, "a", t0 + id * 1000)).collect();
    inputs.insert(4, click(100, "boom", t0 + 4500));
    // Far enough ahead to close the first minute's windows.
    inputs.push(click(200, "late-closer", t0 + 300_000));
    produce(&input, inputs);
    let steps = "  - dedup: { key: [id], within: 10m }\n  - window: { group_by: [user], tumbling: 1m, aggregates: { clicks: count() } }";
    let pipeline = clicks_pipeline(&name, &input, &output, steps);

    let env = vec![("FAILPOINTS".to_string(), "window=return(user=boom)".to_string())];
    let mut first = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, env, ..Default::default() });
    let first_status = first.wait(Duration::from_secs(90));
    let mut second = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(second.wait(Duration::from_secs(90)).success(), "{}", second.log_text());

    let counts: std::collections::BTreeMap<String, i64> = read_committed(&output)
        .iter()
        .map(|record| {
            let value = record.value_json();
            (value["user"].as_str().unwrap().to_string(), value["clicks"].as_i64().unwrap())
        })
        .collect();
    let dlq = read_committed(&format!("{name}.dlq"));
    assert_eq!(counts.get("a"), Some(&10), "{counts:?}");
    match (counts.get("boom"), dlq.as_slice()) {
        // The panic ended the first run, and the restart processed the record.
        (Some(1), []) => assert!(!first_status.success(), "{}", first.log_text()),
        // The panic was contained: the record went to the DLQ.
        (None, [dead]) => {
            assert_eq!(dead.headers["weir-error-stage"], "process", "{:?}", dead.headers);
            assert_eq!(dead.headers["weir-source-offset"], "4");
        }
        (boom, dlq) => panic!("the panicking record was lost or doubled: window {boom:?}, DLQ {dlq:?}\n{}", first.log_text()),
    }
}

/// librdkafka 2.12 can block in `send_offsets_to_transaction` for good (its issues 5456 and
/// 5511; seen here under broker restarts: a window pipeline stayed alive and silent for
/// minutes). A fail point makes the first such call hang: weir must leave it behind after
/// its timeout, start again with a new producer (which fences the old one and aborts its
/// transaction), and go on without exiting, every record exactly once.
#[test]
fn a_send_offsets_call_that_never_returns_is_left_behind() {
    const RECORDS: u64 = 20_000;
    let (input, output, name) = (unique("in"), unique("out"), unique("stuck-offsets"));
    create_topic(&input, 4);
    create_topic(&output, 4);
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  - filter: \"amount > 10.0\""));
    let env = vec![("FAILPOINTS".to_string(), "send-offsets-hangs=1*return".to_string())];
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { env, ..Default::default() });
    wait_ready(&weir, Duration::from_secs(60));
    feed(&input, 0..RECORDS, 2_000).join().unwrap();
    wait_until(Duration::from_secs(180), "weir to commit the input to its end", || {
        committed_offsets(&name, &input) == end_offsets(&input)
    });
    assert!(weir.child.try_wait().unwrap().is_none(), "weir exited:\n{}", weir.log_text());
    let log = weir.log_text();
    assert!(log.contains("a transactional call did not return"), "the fail point did not hang a call:\n{log}");
    let recoveries = metric(&weir, "weir_recoveries_total", &[("class", "retriable")]);
    assert!(recoveries.is_some_and(|count| count >= 1.0), "recoveries {recoveries:?}:\n{log}");
    weir.terminate();
    assert!(weir.wait(Duration::from_secs(60)).success(), "did not stop cleanly:\n{}", weir.log_text());
    assert_exactly_once(&output, &kept_by_amount_filter(0..RECORDS));
}

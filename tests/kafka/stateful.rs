//! Stateful steps on a real broker: state survives SIGKILLs through its changelog.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;


use crate::support::*;

const USERS: u64 = 40;

/// A click of user `id % USERS`, keyed by user (so the topic is partitioned by user), with
/// event times 5 ms apart give or take 200 ms, and ids repeating every 10,000 (so each
/// (user, id) pair comes 20 times: dedup keeps the first).
fn click(id: u64) -> Input {
    let user = format!("u{}", id % USERS);
    let jitter = (id * 7919) % 400;
    let ts = 1_700_000_000_000 + id * 5 + jitter;
    let value = format!(r#"{{"id":{},"user":"{user}","amount":{},"ts":{ts}}}"#, id % 10_000, id % 100);
    Input::keyed(user, value)
}

/// Every record as read_committed sees it, counted by (key, value).
fn multiset(topic: &str) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for record in read_committed(topic) {
        let key = String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()).into_owned();
        *counts.entry((key, record.value_text())).or_default() += 1;
    }
    counts
}

#[test]
fn windowed_count_dedup_sessions_and_a_repartitioned_window_survive_sigkills_exactly() {
    let _heavy = heavy_test();
    const RECORDS: u64 = 200_000;
    let input = unique("clicks");
    create_topic(&input, 4);
    let window_steps = "  - window: { group_by: [user], tumbling: 1s, aggregates: { clicks: count(), total: sum(amount) } }";
    let dedup_steps = "  - dedup: { key: [user, id], within: 1h }";
    // Grouped by a field the input is not partitioned by: through a repartition topic, with
    // windows closed by watermarks that travel through it.
    let repartitioned_steps = "  - window: { group_by: [amount], tumbling: 10s, aggregates: { clicks: count() } }";
    // Sessions that merge across batches and restarts (a user's clicks come about 200 ms
    // apart, give or take 400 ms).
    let session_steps = "  - window: { group_by: [user], session: { gap: 150ms }, aggregates: { clicks: count(), total: sum(amount) } }";
    let cases: Vec<(&str, String, String)> =
        [("window", window_steps), ("dedup", dedup_steps), ("repartitioned", repartitioned_steps), ("session", session_steps)]
        .into_iter()
        .map(|(kind, steps)| {
            let (golden, crashed) = (unique(&format!("{kind}-golden")), unique(&format!("{kind}-crashed")));
            create_topic(&golden, 4);
            create_topic(&crashed, 4);
            (steps, golden, crashed)
        })
        .collect();
    let feeder = feed_with(&input, 0..RECORDS, 8_000, click);

    // Kill both crashed pipelines at the same random moments while the input flows.
    let crashed: Vec<(PipelineFile, String)> = cases
        .iter()
        .map(|(steps, _, output)| {
            let name = unique("stateful");
            (clicks_pipeline(&name, &input, output, steps), name)
        })
        .collect();
    let files: Vec<&Path> = crashed.iter().map(|(file, _)| file.path.as_path()).collect();
    let (kills, mut logs) = kill_repeatedly(&files, 10, |_| true, || feeder.is_finished());
    feeder.join().unwrap();
    for (file, _) in &crashed {
        let mut last = WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() });
        let status = last.wait(Duration::from_secs(600));
        assert!(status.success(), "final run failed: {status}\n{}", last.log_text());
        logs.push(last.log_text());
    }

    // The same pipelines, uninterrupted, over the same input.
    for (steps, golden, _) in &cases {
        let file = clicks_pipeline(&unique("stateful-golden"), &input, golden, steps);
        let mut run = WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() });
        let status = run.wait(Duration::from_secs(600));
        assert!(status.success(), "golden run failed: {status}\n{}", run.log_text());
    }
    for (steps, golden, crashed_output) in &cases {
        let expected = multiset(golden);
        assert!(expected.len() > 1_000, "{steps}: the golden run produced only {} records", expected.len());
        if steps.contains("dedup") {
            assert_eq!(expected.values().sum::<usize>(), 10_000, "dedup keeps one record per (user, id)");
        }
        let actual = multiset(crashed_output);
        let missing = expected.iter().filter(|(record, count)| actual.get(*record) != Some(count)).count();
        let extra = actual.iter().filter(|(record, count)| expected.get(*record) != Some(count)).count();
        assert!(
            missing == 0 && extra == 0,
            "{steps}: {missing} golden records missing or miscounted, {extra} unexpected, over {kills} kills"
        );
    }
    // Restarts resumed from the local store and the changelog's tail, not from nothing.
    let restores: Vec<(u64, u64)> = logs.iter().flat_map(|log| restores(log)).collect();
    assert!(restores.iter().filter(|(store, changelog)| store + changelog > 0).count() >= 10, "restores seen: {restores:?}");
    assert!(restores.iter().any(|(store, _)| *store > 0), "no restart used the local store: {restores:?}");
}

/// A second instance joins a windowed pipeline mid-run, takes partitions with their state,
/// and later leaves: the output equals the uninterrupted run's.
#[test]
fn state_moves_with_partitions_when_an_instance_joins_and_leaves() {
    const RECORDS: u64 = 60_000;
    let input = unique("clicks");
    create_topic(&input, 4);
    let steps = "  - window: { group_by: [user], tumbling: 1s, aggregates: { clicks: count(), total: sum(amount) } }";
    let (golden, moved) = (unique("golden"), unique("moved"));
    create_topic(&golden, 4);
    create_topic(&moved, 4);
    let feeder = feed_with(&input, 0..RECORDS, 4_000, click);

    let file = clicks_pipeline(&unique("rebalanced"), &input, &moved, steps);
    let (mut first, mut second) = start_then_join(&file.path, Duration::from_secs(3));
    wait_until(Duration::from_secs(30), "the joining instance to restore and commit", || {
        metric(&second, "weir_batches_total", &[]).unwrap_or(0.0) > 0.0
    });
    assert!(metric(&second, "weir_state_restored_records_total", &[]).unwrap_or(0.0) > 0.0, "{}", second.log_text());
    std::thread::sleep(Duration::from_secs(2));
    second.terminate();
    assert!(second.wait(Duration::from_secs(30)).success(), "{}", second.log_text());
    feeder.join().unwrap();
    wait_until(Duration::from_secs(120), "the first instance to take everything back and reach the end", || {
        committed_offsets(&file.name(), &input) == end_offsets(&input)
    });
    // The stateful metrics agree with the input: the highest partition watermark is the
    // last event time minus the 1 s out-of-orderness, and the window holds state.
    let last_event_time = (0..RECORDS).map(|id| 1_700_000_000_000 + id * 5 + (id * 7919) % 400).max().unwrap() as f64;
    let highest = (0..4)
        .filter_map(|partition| metric(&first, "weir_watermark_milliseconds", &[("topic", &input), ("partition", &partition.to_string())]))
        .fold(f64::MIN, f64::max);
    assert_eq!(highest, last_event_time - 1000.0);
    let lag = metric(&first, "weir_event_time_lag_seconds", &[("topic", &input), ("partition", "0")]).unwrap();
    assert!(lag > 3600.0, "the input's event times are from 2023: {lag}");
    assert!(metric(&first, "weir_step_state_keys", &[("step", "0")]).unwrap() > 0.0);
    assert!(metric(&first, "weir_step_state_bytes", &[("step", "0")]).is_some());
    assert_eq!(metric(&first, "weir_late_records_total", &[]), Some(0.0));
    first.terminate();
    assert!(first.wait(Duration::from_secs(30)).success(), "{}", first.log_text());

    let reference = clicks_pipeline(&unique("rebalanced-golden"), &input, &golden, steps);
    let mut run = WeirProcess::start(&reference.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(run.wait(Duration::from_secs(300)).success(), "{}", run.log_text());
    let expected = multiset(&golden);
    assert!(expected.len() > 1_000);
    assert_eq!(multiset(&moved), expected);
}

/// Changing a window's size over existing state is refused (exit 2, saying what changed and
/// what to do); after `weir reset --state` the changed pipeline runs.
#[test]
fn a_changed_window_over_existing_state_is_refused_until_the_state_is_reset() {
    let input = unique("clicks");
    let output = unique("out");
    create_topic(&input, 2);
    create_topic(&output, 2);
    produce(&input, (0..2_000).map(click));
    let name = unique("upgrade");
    // A stopped static member stays in the group for a session timeout, which reset waits out.
    let one_second = clicks_pipeline(&name, &input, &output, "  - window: { group_by: [user], tumbling: 1s, aggregates: { n: count() } }");
    let mut first = WeirProcess::start(&one_second.path, WeirOptions { until_end: true, env: short_session(), ..Default::default() });
    assert!(first.wait(Duration::from_secs(120)).success(), "{}", first.log_text());

    let two_seconds = clicks_pipeline(&name, &input, &output, "  - window: { group_by: [user], tumbling: 2s, aggregates: { n: count() } }");
    // `weir plan --check` tells before a deploy whether a run would take the state.
    let plan = |file: &PipelineFile| {
        std::process::Command::new(weir_binary())
            .args(["plan", "--check", "--pipeline"])
            .arg(&file.path)
            .env("WEIR__KAFKA__BOOTSTRAP_SERVERS", &broker().bootstrap)
            .output()
            .unwrap()
    };
    let same = plan(&one_second);
    let same_text = String::from_utf8_lossy(&same.stdout);
    assert!(same.status.success(), "{same_text}{}", String::from_utf8_lossy(&same.stderr));
    assert!(same_text.contains("matches the stored state") && same_text.contains("a run would accept"), "{same_text}");
    let different = plan(&two_seconds);
    let different_text = String::from_utf8_lossy(&different.stdout);
    assert_eq!(different.status.code(), Some(2), "{different_text}");
    assert!(different_text.contains("CHANGED: the stored state was written by `window tumbling 1000ms"), "{different_text}");
    let mut changed = WeirProcess::start(&two_seconds.path, WeirOptions { until_end: true, env: short_session(), ..Default::default() });
    let status = changed.wait(Duration::from_secs(120));
    let log = changed.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("tumbling 1000ms") && log.contains("tumbling 2000ms"), "{log}");
    assert!(log.contains("weir reset --state"), "{log}");

    let reset = std::process::Command::new(weir_binary())
        .args(["reset", "--state", "--execute", "--pipeline"])
        .arg(&two_seconds.path)
        .env("WEIR__KAFKA__BOOTSTRAP_SERVERS", &broker().bootstrap)
        .env("WEIR__KAFKA__SESSION_TIMEOUT", "6s")
        .output()
        .unwrap();
    let reset_output = String::from_utf8_lossy(&reset.stdout);
    assert!(reset.status.success(), "{reset_output}{}", String::from_utf8_lossy(&reset.stderr));
    assert!(reset_output.contains(&format!("{name}-0-changelog")), "{reset_output}");

    produce(&input, (2_000..3_000).map(click));
    let mut after = WeirProcess::start(&two_seconds.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(after.wait(Duration::from_secs(120)).success(), "{}", after.log_text());
}

/// The clicks of [`click`], keyed by id instead of user: a user's clicks are spread over
/// every partition.
fn click_keyed_by_id(id: u64) -> Input {
    Input { key: Some(format!("k{id}").into_bytes()), ..click(id) }
}

/// One click per partition an hour after the others: every partition's watermark then
/// passes every real window, so both runs close all of them.
fn flush(topic: &str, partitions: i32) {
    // An hour after the clicks: it closes their windows (a time past year 9999 would be a
    // decode error that moves no watermark).
    let value = r#"{"id":0,"user":"flush","amount":0,"ts":1700003600000}"#;
    produce(topic, (0..partitions).map(|partition| Input { partition: Some(partition), ..Input::keyed("flush", value) }));
}

/// A window grouped by user over input that is not partitioned by user goes through a
/// repartition topic, and gives what the same window gives over input keyed by user and
/// declared `partitioned_by: [user]` (which needs no repartition topic).
#[test]
fn a_window_over_input_not_partitioned_by_its_key_equals_the_partitioned_run() {
    const RECORDS: u64 = 30_000;
    let steps = "  - window: { group_by: [user], tumbling: 1s, aggregates: { clicks: count(), total: sum(amount) } }";
    let (by_user, by_id) = (unique("clicks-by-user"), unique("clicks-by-id"));
    let (partitioned_out, repartitioned_out) = (unique("partitioned"), unique("repartitioned"));
    for topic in [&by_user, &by_id, &partitioned_out, &repartitioned_out] {
        create_topic(topic, 4);
    }
    produce(&by_user, (0..RECORDS).map(click));
    produce(&by_id, (0..RECORDS).map(click_keyed_by_id));
    flush(&by_user, 4);
    flush(&by_id, 4);

    let partitioned_name = unique("partitioned");
    let partitioned = clicks_pipeline(&partitioned_name, &by_user, &partitioned_out, steps);
    let repartitioned_name = unique("repartitioned");
    let repartitioned = pipeline_file(&clicks_pipeline_text(&repartitioned_name, &by_id, &repartitioned_out, steps, ""));

    for file in [&partitioned, &repartitioned] {
        let mut run = WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() });
        assert!(run.wait(Duration::from_secs(300)).success(), "{}", run.log_text());
    }
    // The extra hop exists only where it is needed, and what was read from it is deleted.
    let repartition_topic = format!("{repartitioned_name}-0-repartition");
    assert!(topic_exists(&repartition_topic));
    assert!(!topic_exists(&format!("{partitioned_name}-0-repartition")));
    let starts = start_offsets(&repartition_topic);
    assert!(starts.iter().all(|start| *start > 0), "committed records purged from the repartition topic: {starts:?}");

    let expected = multiset(&partitioned_out);
    // 40 users, 150 one-second windows of event time.
    assert!(expected.len() > 5_000, "only {} windows", expected.len());
    let total: u64 = expected.keys().map(|(_, value)| serde_json::from_str::<serde_json::Value>(value).unwrap()["clicks"].as_u64().unwrap()).sum();
    assert_eq!(total, RECORDS, "every click is counted in exactly one closed window");
    assert_eq!(multiset(&repartitioned_out), expected);
}

/// `weir reset --to-earliest` and `--to-datetime` move the committed offsets and clear the
/// state, as the next runs show: a dedup emits everything again from the new positions
/// (over kept state it would emit nothing).
#[test]
fn reset_moves_the_offsets_and_clears_the_state() {
    let (input, output) = (unique("clicks"), unique("out"));
    create_topic(&input, 2);
    create_topic(&output, 2);
    let name = unique("reset");
    let file = clicks_pipeline(&name, &input, &output, "  - dedup: { key: [user, id], within: 24h }");
    let reset = |how: &[&str]| {
        let reset = std::process::Command::new(weir_binary())
            .arg("reset")
            .args(how)
            .arg("--pipeline")
            .arg(&file.path)
            .env("WEIR__KAFKA__BOOTSTRAP_SERVERS", &broker().bootstrap)
            .env("WEIR__KAFKA__SESSION_TIMEOUT", "6s")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&reset.stdout).into_owned();
        assert!(reset.status.success(), "{stdout}{}", String::from_utf8_lossy(&reset.stderr));
        stdout
    };
    // Ids 0..400 (record timestamps before `middle`), then 400..1000.
    produce(&input, (0..400).map(click));
    std::thread::sleep(Duration::from_millis(1500));
    let middle = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(1500));
    produce(&input, (400..1000).map(click));
    let count = || read_committed(&output).len();

    run_to_end(&file);
    assert_eq!(count(), 1000);
    // Without --execute: what it would do, and nothing done.
    let ends = end_offsets(&input);
    let said = reset(&["--to-earliest"]);
    assert!(said.contains("dry run: nothing was changed"), "{said}");
    assert!(said.contains(&format!("would delete the state of pipeline {name}: {name}-0-changelog")), "{said}");
    assert!(said.contains(&format!("would move {input}[0]: committed {} -> next offset 0", ends[0])), "{said}");
    assert_eq!(committed_offsets(&name, &input), ends);
    assert!(topic_exists(&format!("{name}-0-changelog")));

    let said = reset(&["--to-earliest", "--execute"]);
    assert!(said.contains(&format!("{name}-0-changelog")) && said.contains(&format!("{input}[0]: next offset 0 (was {})", ends[0])), "{said}");
    assert_eq!(committed_offsets(&name, &input), vec![0, 0]);
    run_to_end(&file);
    assert_eq!(count(), 2000, "everything again: the dedup state went with the reset");

    // Back to `middle`, given as a duration before now.
    let ago = (chrono::Utc::now() - middle).num_milliseconds();
    let said = reset(&["--by-duration", &format!("{ago}ms"), "--execute"]);
    assert!(said.contains(&format!("{input}[1]: next offset")), "{said}");
    run_to_end(&file);
    assert_eq!(count(), 2600, "the 600 records produced after {middle} once more");
    assert_eq!(committed_offsets(&name, &input), end_offsets(&input));

    // To the end: what is there now is skipped.
    let said = reset(&["--to-datetime", &middle.to_rfc3339(), "--execute"]);
    assert!(said.contains(&format!("{input}[1]: next offset")), "{said}");
    reset(&["--to-latest", "--execute"]);
    assert_eq!(committed_offsets(&name, &input), end_offsets(&input));
    run_to_end(&file);
    assert_eq!(count(), 2600, "nothing again after --to-latest");
}

/// After a repartition, an input partition that never delivers holds every window open;
/// with `idle_timeout` it stops counting once idle that long, and the windows the other
/// partition's watermark passed are emitted.
#[test]
fn idle_timeout_lets_repartitioned_windows_close_past_an_empty_partition() {
    let steps = "  - window: { group_by: [user], tumbling: 1s, aggregates: { clicks: count() } }";
    let input = unique("clicks");
    create_topic(&input, 2);
    // Everything in partition 0: 2,000 clicks over 10 s of event time; partition 1 stays empty.
    produce(&input, (0..2_000).map(|id| Input { partition: Some(0), ..click(id) }));
    let pipeline = |name: &str, output: &str, idle: &str| {
        let text = clicks_pipeline_text(name, &input, output, steps, "");
        let watermark = format!("    watermark: {{ max_out_of_orderness: 1s{idle} }}\n");
        pipeline_file(&text.replace("    watermark: { max_out_of_orderness: 1s }\n", &watermark))
    };
    let (held, released) = (unique("held"), unique("released"));
    create_topic(&held, 1);
    create_topic(&released, 1);
    let without = pipeline(&unique("no-idle"), &held, "");
    // Longer than reading the input takes: the news must go out without records to carry it.
    let with = pipeline(&unique("idle"), &released, ", idle_timeout: 8s");
    let mut processes: Vec<WeirProcess> =
        [&without, &with].iter().map(|file| WeirProcess::start(&file.path, WeirOptions::default())).collect();

    // Partition 0's watermark ends at the last event time minus 1 s: the windows ending by
    // then close, 40 users each.
    let last = (0..2_000u64).map(|id| 1_700_000_000_000 + id * 5 + (id * 7919) % 400).max().unwrap();
    let closed_windows = (1_700_000_001_000..=last - 1_000).step_by(1_000).count() * 40;
    wait_until(Duration::from_secs(60), "the idle partition to stop holding the windows", || {
        read_committed(&released).len() == closed_windows
    });
    assert!(read_committed(&held).is_empty(), "without idle_timeout an empty partition holds every window open");
    // Without idle_timeout the held-back partition is reported, in the log and as a gauge.
    wait_until(Duration::from_secs(90), "the empty partition reported as holding back", || {
        metric(&processes[0], "weir_watermark_held_back_partitions", &[]).is_some_and(|count| count >= 1.0)
    });
    let log = processes[0].log_text();
    let warning = log.lines().find(|line| line.contains("holds back the watermark")).unwrap_or_default().to_string();
    assert!(warning.contains("partition=1") && warning.contains(&input), "{log}");
    let reports = log.lines().filter(|line| line.contains("holds back the watermark") && line.contains("partition=1")).count();
    assert_eq!(reports, 1, "once per silence: {log}");
    assert_eq!(metric(&processes[1], "weir_watermark_held_back_partitions", &[]), Some(0.0), "idle_timeout lets them go on");
    for process in &mut processes {
        process.terminate();
        assert!(process.wait(Duration::from_secs(30)).success(), "{}", process.log_text());
    }
}

/// After a run of a stateful pipeline, every metric family is there and agrees with the
/// run; duplicates dropped by a dedup are counted apart from records a filter drops, in
/// /metrics and in /status's batches.
#[test]
fn every_metric_family_agrees_with_a_stateful_run() {
    let (input, output) = (unique("clicks"), unique("out"));
    create_topic(&input, 2);
    create_topic(&output, 2);
    // 100 ids, each sent 3 times (the same user, so the same key): 200 duplicates; and one
    // record that is not JSON.
    let mut inputs: Vec<Input> = (0..300u64)
        .map(|n| {
            let id = n % 100;
            Input::keyed(format!("u{id}"), format!(r#"{{"id":{id},"user":"u{id}","amount":1,"ts":{}}}"#, 1_700_000_000_000 + n))
        })
        .collect();
    inputs.push(Input::keyed("u0", "not json"));
    produce(&input, inputs);
    let name = unique("metrics");
    let file = clicks_pipeline(&name, &input, &output, "  - filter: \"amount > 0\"\n  - dedup: { key: [user, id], within: 1h }");
    let mut weir = WeirProcess::start(&file.path, WeirOptions::default());
    wait_until(Duration::from_secs(60), "offsets committed to the end", || committed_offsets(&name, &input) == end_offsets(&input));
    assert_eq!(read_committed(&output).len(), 100);
    wait_until(Duration::from_secs(10), "the lag gauges to catch up", || {
        (0..2).all(|partition| metric(&weir, "weir_consumer_lag_records", &[("topic", &input), ("partition", &partition.to_string())]) == Some(0.0))
    });
    let (_, text) = weir.http_get("/metrics").expect("/metrics answers");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_string()))).expect("Prometheus text");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        sample(&scrape, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?} in\n{text}"))
    };
    let sink = output.as_str();
    assert_eq!(value("weir_records_in_total", &[("source", "clicks")]), 301.0);
    assert_eq!(value("weir_records_out_total", &[("sink", sink)]), 100.0);
    assert_eq!(value("weir_duplicates_dropped_total", &[]), 200.0);
    assert_eq!(value("weir_records_filtered_total", &[]), 0.0);
    assert_eq!(value("weir_dlq_records_total", &[("stage", "decode")]), 1.0);
    for stage in ["late", "process", "produce"] {
        assert_eq!(value("weir_dlq_records_total", &[("stage", stage)]), 0.0);
        assert_eq!(value("weir_skipped_records_total", &[("stage", stage)]), 0.0);
    }
    assert_eq!(value("weir_late_records_total", &[]), 0.0);
    let batches = value("weir_batches_total", &[]);
    assert!(batches >= 1.0);
    assert_eq!(value("weir_commit_duration_seconds_count", &[]), batches);
    assert_eq!(value("weir_transaction_aborts_total", &[]), 0.0);
    assert_eq!(value("weir_assigned_partitions", &[]), 2.0);
    assert!(value("weir_rebalances_total", &[("kind", "assign")]) >= 1.0, "{text}");
    assert_eq!(value("weir_state_restored_records_total", &[]), 0.0);
    // A dedup's keys live in the store, which counts them.
    assert_eq!(value("weir_state_keys", &[]), 100.0);
    assert_eq!(value("weir_step_state_keys", &[("step", "1")]), 100.0);
    assert!(value("weir_step_state_bytes", &[("step", "1")]) >= 0.0);
    // Present (their values are checked in the store's unit tests: a run this small keeps
    // its keys in memtables, so the cache may never be asked).
    assert!(value("weir_state_cache_hits_total", &[]) >= 0.0);
    assert!(value("weir_state_cache_misses_total", &[]) >= 0.0);
    assert!(value("weir_state_cache_bytes", &[]) >= 0.0);
    for partition in ["0", "1"] {
        let labels = [("topic", input.as_str()), ("partition", partition)];
        assert_eq!(value("weir_consumer_lag_records", &labels), 0.0);
        assert!(value("weir_event_time_lag_seconds", &labels) > 3600.0, "the input's event times are from 2023");
        // Max event time (the last record of the partition's ids) minus the 1 s out-of-orderness.
        assert!(value("weir_watermark_milliseconds", &labels) >= 1_700_000_000_000.0 - 1000.0);
        assert_eq!(value("weir_watermark_timestamp_seconds", &labels), value("weir_watermark_milliseconds", &labels) / 1000.0);
    }
    let highest = ["0", "1"]
        .iter()
        .map(|partition| value("weir_watermark_milliseconds", &[("topic", input.as_str()), ("partition", partition)]))
        .fold(f64::MIN, f64::max);
    assert_eq!(highest, (1_700_000_000_000u64 + 299 - 1000) as f64);
    assert!(text.contains("weir_data_loss_events_total"), "{text}");

    let (_, body) = weir.http_get("/status").expect("/status answers");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let recent = report["recent_batches"].as_array().unwrap();
    let duplicates: u64 = recent.iter().map(|batch| batch["duplicate_rows"].as_u64().unwrap()).sum();
    assert!(duplicates > 0, "{report:#}");
    // All of them when the run's batches all fit in the recent ones.
    if report["batches_committed"].as_u64() == Some(recent.len() as u64) {
        assert_eq!(duplicates, 200, "{report:#}");
    }
    weir.terminate();
    assert!(weir.wait(Duration::from_secs(30)).success(), "{}", weir.log_text());
    // The key count comes back with the state: from the local store, then, with the store
    // deleted, from the changelog.
    let state = file.path.parent().unwrap().join("state").join(format!("{name}-0"));
    for wiped in [false, true] {
        if wiped {
            std::fs::remove_dir_all(&state).expect("the local state deleted");
        }
        let mut again = WeirProcess::start(&file.path, WeirOptions::default());
        wait_ready(&again, Duration::from_secs(60));
        wait_until(Duration::from_secs(20), "the key count", || metric(&again, "weir_step_state_keys", &[("step", "1")]) == Some(100.0));
        assert_eq!(metric(&again, "weir_state_keys", &[]), Some(100.0), "wiped {wiped}");
        again.terminate();
        assert!(again.wait(Duration::from_secs(30)).success(), "{}", again.log_text());
    }
}

/// `mode: idempotent_upsert`: windowed pipelines SIGKILLed together at random at least 10
/// times, without transactions: one over input partitioned by the window's key, one that
/// repartitions it first (its replays forward records again, which the window's tasks
/// drop). Replays write the same ids again; for both, the last value per id equals the
/// transactional run's result, no id is missing, and no id ever has a value the
/// transactional run does not have.
#[test]
fn an_upsert_window_killed_ten_times_ends_with_the_transactional_results() {
    let _heavy = heavy_test();
    const RECORDS: u64 = 200_000;
    let input = unique("clicks");
    create_topic(&input, 4);
    let (golden, upserts, repartitioned) = (unique("upsert-golden"), unique("upserts"), unique("upserts-repartitioned"));
    for topic in [&golden, &upserts, &repartitioned] {
        create_topic(topic, 4);
    }
    let steps = "  - window: { group_by: [user], tumbling: 1s, aggregates: { clicks: count(), total: sum(amount) } }";
    let upsert_text = |name: &str, output: &str, keyed: &str| clicks_pipeline_text(name, &input, output, steps, keyed) + "  mode: idempotent_upsert\n";
    let feeder = feed_with(&input, 0..RECORDS, 8_000, click);
    let file = pipeline_file(&upsert_text(&unique("upsert"), &upserts, "partitioned_by: [user]"));
    let repartitioned_name = unique("upsert-repartitioned");
    let repartitioned_file = pipeline_file(&upsert_text(&repartitioned_name, &repartitioned, ""));
    let files = [&file, &repartitioned_file];
    let paths: Vec<&std::path::Path> = files.iter().map(|file| file.path.as_path()).collect();
    let (kills, mut logs) = kill_repeatedly(&paths, 10, |_| true, || feeder.is_finished());
    feeder.join().unwrap();
    for file in files {
        let mut last = WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() });
        assert!(last.wait(Duration::from_secs(600)).success(), "final run failed:\n{}", last.log_text());
        logs.push(last.log_text());
    }
    assert!(logs.iter().any(|log| log.contains("idempotent_upsert")), "{}", logs.last().unwrap());
    assert!(topic_exists(&format!("{repartitioned_name}-0-repartition")), "the second pipeline should repartition");

    let file = clicks_pipeline(&unique("upsert-golden"), &input, &golden, steps);
    let mut run = WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(run.wait(Duration::from_secs(600)).success(), "golden run failed:\n{}", run.log_text());

    // The transactional results by id: (group, window start).
    let id_of = |value: &serde_json::Value| serde_json::json!({"user": value["user"], "window_start": value["window_start"]}).to_string();
    let expected: BTreeMap<String, String> =
        read_committed(&golden).iter().map(|record| (id_of(&record.value_json()), record.value_text())).collect();
    assert!(expected.len() > 1_000, "the golden run produced only {} windows", expected.len());
    for output in [&upserts, &repartitioned] {
        let mut last_values: BTreeMap<String, String> = BTreeMap::new();
        let mut foreign = Vec::new();
        for record in read_committed(output) {
            let id = record.headers.get("weir-id").cloned().expect("every upsert output has a weir-id header");
            assert_eq!(record.key.as_deref(), Some(id.as_bytes()), "the Kafka key is the id");
            assert!(record.headers.contains_key("weir-version"));
            if expected.get(&id) != Some(&record.value_text()) {
                foreign.push((id.clone(), record.value_text()));
            }
            last_values.insert(id, record.value_text());
        }
        assert!(foreign.is_empty(), "{output}: {} outputs with a value the transactional run does not have, e.g. {:?}", foreign.len(), foreign.first());
        let missing: Vec<&String> = expected.keys().filter(|id| !last_values.contains_key(*id)).collect();
        assert!(missing.is_empty(), "{output}: {} ids missing over {kills} kills, e.g. {:?}", missing.len(), missing.first());
        assert_eq!(last_values, expected, "{output}");
    }
    // Restarts resumed from the local store.
    let restores: Vec<(u64, u64)> = logs.iter().flat_map(|log| restores(log)).collect();
    assert!(restores.iter().any(|(store, _)| *store > 0), "no restart used the local store: {restores:?}");
}

/// A changelog keeps tombstones for a day whatever the cluster's default, so a local store
/// trusted for twelve hours cannot have missed a deletion that compaction already removed.
/// `kafka.topic_configs` and `kafka.replication_factor` reach the topics weir creates (the
/// changelog and the DLQ), under what each kind needs.
#[test]
fn created_changelogs_keep_tombstones_for_a_day() {
    use rdkafka::admin::{AdminClient, AdminOptions, ConfigSource, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let (input, output) = (unique("clicks"), unique("out"));
    create_topic(&input, 1);
    create_topic(&output, 1);
    produce(&input, (0..10).map(click));
    let name = unique("tombstones");
    let pipeline = clicks_pipeline(&name, &input, &output, "  - dedup: { key: [id], within: 1m }");
    let env = vec![
        ("WEIR__KAFKA__TOPIC_CONFIGS__MIN_INSYNC_REPLICAS".to_string(), "1".to_string()),
        ("WEIR__KAFKA__TOPIC_CONFIGS__RETENTION_BYTES".to_string(), "1073741824".to_string()),
        ("WEIR__KAFKA__REPLICATION_FACTOR".to_string(), "1".to_string()),
    ];
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, env, ..Default::default() });
    assert!(weir.wait(Duration::from_secs(90)).success(), "{}", weir.log_text());
    let changelog = format!("{name}-0-changelog");
    let dlq = format!("{name}.dlq");
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &broker().bootstrap).create().unwrap();
    let described = block_on(admin.describe_configs(&[ResourceSpecifier::Topic(&changelog)], &AdminOptions::new())).unwrap();
    let config = described.into_iter().next().unwrap().unwrap();
    // Set on the topic itself: the cluster's default (24 hours out of the box, but an
    // operator may lower it) does not count.
    let topic_value = |name: &str| {
        config.get(name).filter(|entry| entry.source == ConfigSource::DynamicTopic).and_then(|entry| entry.value.clone())
    };
    assert_eq!(topic_value("delete.retention.ms").as_deref(), Some("86400000"), "{changelog}: {config:?}");
    assert_eq!(topic_value("cleanup.policy").as_deref(), Some("compact"), "{changelog}");
    assert_eq!(topic_value("min.insync.replicas").as_deref(), Some("1"), "{changelog}: {config:?}");
    assert_eq!(topic_value("retention.bytes").as_deref(), Some("1073741824"), "{changelog}");
    let described = block_on(admin.describe_configs(&[ResourceSpecifier::Topic(&dlq)], &AdminOptions::new())).unwrap();
    let dlq_config = described.into_iter().next().unwrap().unwrap();
    let retention = dlq_config.get("retention.bytes").filter(|entry| entry.source == ConfigSource::DynamicTopic);
    assert_eq!(retention.and_then(|entry| entry.value.clone()).as_deref(), Some("1073741824"), "{dlq}");

    // The restart reads the retention back and trusts its fresh local store.
    let mut again = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(again.wait(Duration::from_secs(90)).success(), "{}", again.log_text());
    let log = again.log_text();
    assert!(!log.contains("cannot read the changelogs' delete.retention.ms"), "{log}");
    assert!(restores(&log).iter().any(|(from_store, _)| *from_store > 0), "{log}");
}

/// Two instances deployed at once on a fresh stateful pipeline (a StatefulSet with parallel
/// pod management) may both find no state generation and each write one (audit R23). They
/// must agree on one, or at the next restart one instance's local store counts as "from
/// before a state reset" and is deleted, forcing a full restore.
#[test]
fn instances_started_together_on_a_fresh_pipeline_agree_on_one_state_generation() {
    let input = unique("clicks");
    let output = unique("counts");
    create_topic(&input, 4);
    create_topic(&output, 4);
    let steps = "  - window: { group_by: [user], tumbling: 1s, aggregates: { clicks: count() } }";
    let file = clicks_pipeline(&unique("together"), &input, &output, steps);
    let name = file.name();
    for round in 0..2 {
        let mut instances: Vec<WeirProcess> = ["0", "1"]
            .into_iter()
            .map(|instance| WeirProcess::start(&file.path, WeirOptions { instance, env: short_session(), ..Default::default() }))
            .collect();
        for instance in &instances {
            wait_ready(instance, Duration::from_secs(120));
        }
        for instance in &mut instances {
            instance.terminate();
            assert!(instance.wait(Duration::from_secs(60)).success(), "{}", instance.log_text());
            if round == 1 {
                let log = instance.log_text();
                assert!(!log.contains("before a state reset"), "a restart deleted a store of the current state:\n{log}");
            }
        }
    }
    let generation = |instance: &str| {
        std::fs::read_to_string(file.path.parent().unwrap().join("state").join(format!("{name}-{instance}")).join("GENERATION")).unwrap()
    };
    assert_eq!(generation("0"), generation("1"));
}

/// A local store whose copy of the state does not read back (here: the watermark entries the
/// dedup keeps beside its keys, overwritten with bytes that are not JSON) is cleared and the
/// state read from the changelog instead; the restarted run still drops the duplicates.
#[test]
fn a_store_entry_that_does_not_read_back_is_replaced_from_the_changelog() {
    let (input, output) = (unique("clicks"), unique("out"));
    create_topic(&input, 2);
    create_topic(&output, 2);
    let name = unique("corrupt");
    let file = clicks_pipeline(&name, &input, &output, "  - dedup: { key: [user, id], within: 24h }");
    produce(&input, (0..200).map(click));
    run_to_end(&file);
    assert_eq!(read_committed(&output).len(), 200);
    let directory = file.path.parent().unwrap().join("state").join(format!("{name}-0"));
    let generation = std::fs::read_to_string(directory.join("GENERATION")).expect("the store's generation");
    {
        use weir::runtime::store::{changelog_key, StateStore, StoreMemory, StoreWrite};
        let store = StateStore::open(&directory, &[0], generation.trim(), StoreMemory::default(), true, &|_, _, _| None).expect("the store opens");
        let garbage: Vec<StoreWrite> = (0..2)
            .map(|partition| StoreWrite::state(0, partition, changelog_key(Some(&input), "watermark"), Some(b"not json".to_vec())))
            .collect();
        store.apply(&garbage, &[], &[]).expect("written");
    }
    // 100 copies of earlier ids and 100 new ones.
    produce(&input, (100..300).map(click));
    let log = run_to_end(&file);
    assert!(log.contains("does not read back"), "{log}");
    assert_eq!(read_committed(&output).len(), 300, "the copies were dropped, the new ids kept");
}

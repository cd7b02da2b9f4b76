use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;

/// Readiness turns true once partitions are assigned; /metrics is Prometheus text whose
/// counters match the run; /status reports the run's batches, rates and offsets; SIGTERM
/// drains, commits and exits 0.
#[test]
fn health_metrics_and_graceful_shutdown() {
    let (input, output) = (unique("in"), unique("out"));
    let name = unique("ops");
    create_topic(&input, 2);
    create_topic(&output, 2);
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  - filter: \"amount > 100.0\""));
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions::default());

    wait_until(Duration::from_secs(30), "/health/live", || {
        weir.http_get("/health/live").is_some_and(|(status, _)| status == 200)
    });
    wait_until(Duration::from_secs(60), "/health/ready", || {
        weir.http_get("/health/ready").is_some_and(|(status, _)| status == 200)
    });
    // The group member tells the brokers who it is: `<name>-<instance>`.
    let admin: rdkafka::consumer::BaseConsumer = client_config().create().unwrap();
    let groups = rdkafka::consumer::Consumer::fetch_group_list(&admin, Some(&name), Duration::from_secs(10)).unwrap();
    let clients: Vec<&str> = groups.groups().iter().flat_map(|group| group.members()).map(|member| member.client_id()).collect();
    assert_eq!(clients, vec![format!("{name}-0")], "the group's members' client ids");

    // 1000 records: ids whose amount (id % 1000 + 0.5) > 100 pass; every 100th is poison.
    let inputs: Vec<Input> = (0..1000u64)
        .map(|id| if id % 100 == 99 { Input::keyed(format!("k{id}"), "oops") } else { Input::keyed(format!("k{id}"), event(id)) })
        .collect();
    let poison = inputs.iter().filter(|input| input.value.as_deref() == Some(&b"oops"[..])).count() as f64;
    let passed = (0..1000u64).filter(|id| id % 100 != 99 && (id % 1000) as f64 + 0.5 > 100.0).count() as f64;
    produce(&input, inputs);
    wait_until(Duration::from_secs(60), "offsets committed to the end", || {
        committed_offsets(&name, &input) == end_offsets(&input)
    });

    let (status, text) = weir.http_get("/metrics").expect("metrics answer");
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_string()))).expect("Prometheus text");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        sample(&scrape, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?} in\n{text}"))
    };
    assert_eq!(value("weir_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert_eq!(value("weir_ready", &[]), 1.0);
    let now = chrono::Utc::now().timestamp() as f64;
    let last_commit = value("weir_last_commit_timestamp_seconds", &[]);
    assert!(last_commit > now - 120.0 && last_commit <= now + 1.0, "{last_commit} vs {now}");
    assert!(value("process_resident_memory_bytes", &[]) > 1e6);
    assert_eq!(value("weir_records_in_total", &[("source", "events")]), 1000.0);
    assert_eq!(value("weir_records_out_total", &[("sink", output.as_str())]), passed);
    assert_eq!(value("weir_dlq_records_total", &[("stage", "decode")]), poison);
    assert_eq!(value("weir_records_filtered_total", &[]), 1000.0 - passed - poison);
    assert!(value("weir_batches_total", &[]) >= 1.0);
    assert_eq!(value("weir_assigned_partitions", &[]), 2.0);
    let families: HashMap<&str, ()> = scrape.docs.keys().map(|name| (name.as_str(), ())).collect();
    assert!(families.contains_key("weir_commit_duration_seconds"), "{text}");
    // End-to-end latency: one observation per committed batch with input, from its oldest
    // record's Kafka timestamp (produced moments ago) to the commit.
    let line_value = |prefix: &str| -> f64 {
        let line = text.lines().find(|line| line.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
        line[prefix.len()..].trim().parse().unwrap()
    };
    let (latencies, latency_sum) = (line_value("weir_end_to_end_latency_seconds_count "), line_value("weir_end_to_end_latency_seconds_sum "));
    assert!(latencies >= 1.0 && latencies <= value("weir_batches_total", &[]), "{text}");
    assert!(latency_sum > 0.0 && latency_sum / latencies < 60.0, "{latency_sum} over {latencies} batches");
    assert_eq!(read_committed(&output).len() as f64, passed);
    wait_until(Duration::from_secs(10), "consumer lag gauges at zero", || {
        let (_, text) = weir.http_get("/metrics").unwrap();
        text.lines().filter(|line| line.starts_with("weir_consumer_lag_records{")).count() == 2
            && text.lines().filter(|line| line.starts_with("weir_consumer_lag_records{")).all(|line| line.ends_with(" 0"))
    });

    // /status: the batches the run committed, their rates, and each partition's offsets.
    let (code, body) = weir.http_get("/status").expect("status answers");
    assert_eq!(code, 200);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|error| panic!("{error}: {body}"));
    assert_eq!(report["pipeline"], name.as_str(), "{report:#}");
    assert_eq!(report["ready"], true, "{report:#}");
    assert_eq!(report["records_in"], 1000, "{report:#}");
    assert_eq!(report["records_out"].as_f64(), Some(passed), "{report:#}");
    let batches = report["recent_batches"].as_array().expect("recent_batches");
    assert!(!batches.is_empty() && report["batches_committed"].as_u64() >= Some(batches.len() as u64), "{report:#}");
    let last = batches.last().unwrap();
    for field in ["input_rows_per_second", "processed_rows_per_second"] {
        assert!(batches.iter().any(|batch| batch[field].as_f64() > Some(0.0)), "{field}: {report:#}");
    }
    assert!(last["duration_ms"].is_u64() && last["committed_at"].is_string(), "{report:#}");
    let ends = end_offsets(&input);
    for (partition, end) in ends.iter().enumerate() {
        let progress = &report["partitions"][format!("{input}[{partition}]")];
        assert_eq!(progress["committed_offset"], *end, "{report:#}");
        assert_eq!(progress["lag"], 0, "{report:#}");
    }
    assert!(report["last_error"].is_null(), "{report:#}");

    weir.terminate();
    let status = weir.wait(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM should drain and exit 0: {status}\n{}", weir.log_text());
    assert!(weir.log_text().contains("shutting down"));
}

/// With `logging.format: json` every line weir writes is a JSON object, down to the reason
/// it stopped (here a sink topic that does not exist).
#[test]
fn json_logs_are_json_to_the_last_line() {
    let input = unique("in");
    create_topic(&input, 1);
    let pipeline = pipeline_file(&json_pipeline(&unique("json-logs"), &input, &unique("missing-out"), "  - filter: \"amount > 0.0\""));
    let mut process =
        WeirProcess::start(&pipeline.path, WeirOptions { env: vec![("WEIR__LOGGING__FORMAT".into(), "json".into())], ..Default::default() });
    let status = process.wait(Duration::from_secs(60));
    let log = process.log_text();
    assert!(!status.success(), "{log}");
    for line in log.lines() {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok_and(|value| value.is_object()), "not a JSON object: {line}");
    }
    let last: serde_json::Value = serde_json::from_str(log.lines().last().expect("a log")).unwrap();
    assert!(last.to_string().contains("weir stopped") && last.to_string().contains("does not exist"), "{log}");
}

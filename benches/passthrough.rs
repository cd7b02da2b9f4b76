//! Pass-through throughput: weir (exactly-once, JSON decode + encode, no steps) against a raw
//! rdkafka consume→produce loop (no transactions, bytes copied as they are), on the same
//! broker, in one run, at 100 B and 1 KB values. Run: `cargo bench --bench passthrough`.
//!
//! Each run reads a freshly produced input topic from the beginning and is checked: the
//! output must hold exactly the input's record count (read_committed for weir).
//! Times start when the reader owns its partitions (weir: /health/ready) and end when the
//! last output is acknowledged (raw) or weir has committed and exited (`--until-end`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

const PARTITIONS: i32 = 4;

struct Measured {
    seconds: f64,
    cpu_seconds: f64,
}

fn main() {
    // `cargo bench` passes --bench; a number picks the record count for 100 B values.
    let records_100b: u64 = std::env::args().filter_map(|argument| argument.parse().ok()).next().unwrap_or(1_000_000);
    println!("broker: {}", broker().bootstrap);
    println!();
    println!("| value size | records | raw rdkafka (records/s) | weir exactly-once (records/s) | weir / raw | raw records per CPU-second | weir records per CPU-second |");
    println!("|---|---|---|---|---|---|---|");
    for (value_size, records) in [(100usize, records_100b), (1000, records_100b / 5)] {
        let input = unique("bench-in");
        create_topic(&input, PARTITIONS);
        produce_input(&input, records, value_size);

        let raw_output = unique("bench-raw");
        create_topic(&raw_output, PARTITIONS);
        let raw = raw_passthrough(&input, &raw_output, records);
        assert_eq!(count(&raw_output), records, "raw pass-through lost or duplicated records");

        let weir_output = unique("bench-weir");
        create_topic(&weir_output, PARTITIONS);
        let weir = weir_passthrough(&input, &weir_output);
        assert_eq!(count(&weir_output), records, "weir lost or duplicated records");

        let rate = |measured: &Measured| records as f64 / measured.seconds;
        let per_cpu = |measured: &Measured| records as f64 / measured.cpu_seconds;
        println!(
            "| {value_size} B | {records} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} |",
            rate(&raw),
            rate(&weir),
            rate(&weir) / rate(&raw),
            per_cpu(&raw),
            per_cpu(&weir),
        );
    }
}

/// JSON events padded to about `value_size` bytes.
fn produce_input(topic: &str, records: u64, value_size: usize) {
    let producer = TestProducer::new();
    for id in 0..records {
        let head = format!(r#"{{"id":{id},"user":"u{}","amount":{}.5,"pad":""#, id % 9973, id % 1000);
        let pad = "x".repeat(value_size.saturating_sub(head.len() + 2));
        let value = format!("{head}{pad}\"}}");
        producer.send(topic, &Input::keyed(format!("k{id}"), value));
    }
    producer.flush();
}

/// The physical baseline, at-least-once ([`support::raw_loop`]).
fn raw_passthrough(input: &str, output: &str, records: u64) -> Measured {
    let (seconds, cpu_seconds) = raw_loop(input, output, PARTITIONS, records, None, false);
    Measured { seconds, cpu_seconds }
}

fn weir_passthrough(input: &str, output: &str) -> Measured {
    let name = unique("bench-weir");
    let pipeline = pipeline_file(&format!(
        r#"name: {name}
sources:
  events:
    topics: [{input}]
    format: json
    schema: {{ id: long, user: string, amount: double, pad: string }}
sink:
  topic: {output}
"#
    ));
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    let pid = weir.child.id();
    wait_ready(&weir, Duration::from_secs(60));
    let cpu_at_ready = process_cpu_seconds(pid);
    let started = Instant::now();
    let mut cpu_at_exit = cpu_at_ready;
    // Sample CPU time until the process is gone (/proc disappears with it).
    loop {
        if let Some(status) = weir.child.try_wait().unwrap() {
            assert!(status.success(), "weir failed: {status}\n{}", weir.log_text());
            break;
        }
        cpu_at_exit = process_cpu_seconds(pid).max(cpu_at_exit);
        std::thread::sleep(Duration::from_millis(5));
    }
    Measured { seconds: started.elapsed().as_secs_f64(), cpu_seconds: cpu_at_exit - cpu_at_ready }
}

fn count(topic: &str) -> u64 {
    read_committed(topic).len() as u64
}

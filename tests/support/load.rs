//! Continuous input, the exactly-once check over it, and process measurements (CPU, memory,
//! disk) for benches and tests.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::message::Headers;
use rdkafka::producer::{BaseProducer, Producer};

use super::*;

pub fn event(id: u64) -> String {
    format!(r#"{{"id":{id},"user":"u{}","amount":{}.5}}"#, id % 97, id % 1000)
}

/// A click `{id, user, amount, ts}` for [`clicks_pipeline_text`], keyed `k<id>`, 1 ms of
/// event time after the one before.
pub fn timed_event(id: u64) -> Input {
    let ts = 1_700_000_000_000 + id;
    Input::keyed(format!("k{id}"), format!(r#"{{"id":{id},"user":"u{}","amount":{},"ts":{ts}}}"#, id % 97, id % 1000))
}

/// Produces `event(id)` for each id in `ids`, keyed `k<id>`, at about `per_second`, on a
/// thread of its own (input that flows while processes come and go).
pub fn feed(topic: &str, ids: std::ops::Range<u64>, per_second: u64) -> std::thread::JoinHandle<()> {
    feed_with(topic, ids, per_second, |id| Input::keyed(format!("k{id}"), event(id)))
}

/// Like [`feed`], with each record made by `make`.
pub fn feed_with(
    topic: &str,
    ids: std::ops::Range<u64>,
    per_second: u64,
    make: fn(u64) -> Input,
) -> std::thread::JoinHandle<()> {
    let topic = topic.to_string();
    std::thread::spawn(move || {
        let producer = TestProducer::new();
        let chunk = (per_second / 20).max(1);
        let started = Instant::now();
        let mut next = ids.start;
        while next < ids.end {
            let end = (next + chunk).min(ids.end);
            for id in next..end {
                producer.send(&topic, &make(id));
            }
            producer.flush();
            next = end;
            let due = started + Duration::from_secs_f64((next - ids.start) as f64 / per_second as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    })
}

/// The ids that the standard test filter (`amount > 10.0`) keeps.
pub fn kept_by_amount_filter(ids: std::ops::Range<u64>) -> Vec<u64> {
    ids.filter(|id| (id % 1000) as f64 + 0.5 > 10.0).collect()
}

/// Asserts that a read_committed reader of `output` sees each expected id exactly once and
/// nothing else.
pub fn assert_exactly_once(output: &str, expected: &[u64]) {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for record in read_committed(output) {
        let id = record.value_json()["id"].as_u64().expect("output has an id");
        *counts.entry(id).or_default() += 1;
    }
    let duplicated: Vec<(u64, usize)> = counts.iter().filter(|(_, count)| **count > 1).map(|(id, count)| (*id, *count)).collect();
    let missing: Vec<u64> = expected.iter().copied().filter(|id| !counts.contains_key(id)).collect();
    let expected_set: std::collections::BTreeSet<u64> = expected.iter().copied().collect();
    let unexpected: Vec<u64> = counts.keys().copied().filter(|id| !expected_set.contains(id)).collect();
    assert!(
        duplicated.is_empty() && missing.is_empty() && unexpected.is_empty(),
        "not exactly once: {} duplicated (first {:?}), {} missing (first {:?}), {} unexpected (first {:?})",
        duplicated.len(),
        &duplicated[..duplicated.len().min(10)],
        missing.len(),
        &missing[..missing.len().min(10)],
        unexpected.len(),
        &unexpected[..unexpected.len().min(10)],
    );
}

/// Serves the producer's delivery reports that are ready; if none was, sleeps 100 µs.
/// rust-rdkafka's `poll(1 ms)` would spin for the whole millisecond (it hands librdkafka
/// the time left in whole milliseconds, 0), taking CPU from a broker on the same cores;
/// weir's own loop waits the same way (`Transaction::serve_or_pause`).
pub fn serve_or_pause(producer: &BaseProducer) {
    let before = producer.in_flight_count();
    producer.poll(Duration::ZERO);
    if producer.in_flight_count() == before {
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// User + system CPU time of a process, in seconds, from /proc.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|t| t.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|t| t.parse().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// The bytes of the files under `path` (0 when it is missing).
pub fn directory_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => directory_bytes(&entry.path()),
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        })
        .sum()
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

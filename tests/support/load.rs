//! Continuous input, the exactly-once check over it, and process measurements (CPU, memory,
//! disk) for benches and tests.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

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

/// The physical baseline: consume→produce with rdkafka, bytes as they are, no state, as fast
/// as a plain loop goes here (DESIGN.md "Performance"): the consumer prefetches large
/// batches, each record is handed to the producer without waiting for it (delivery reports
/// are served every 1,024 records), and the producer batches freely. `transactional`: the
/// same loop inside transactions, committing the consumed offsets with the records every
/// 100 ms as weir does (serve the delivery reports, `send_offsets_to_transaction`,
/// `commit_transaction`), the fair baseline for weir's exactly-once pass-through. Stops after `records`; with `stop`, runs
/// until told and returns no measure worth reading. Returns (seconds, CPU seconds of this
/// process, where librdkafka's threads run).
pub fn raw_loop(input: &str, output: &str, partitions: i32, records: u64, stop: Option<Arc<AtomicBool>>, transactional: bool) -> (f64, f64) {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &broker().bootstrap);
    let consumer: BaseConsumer = config
        .clone()
        .set("group.id", unique("bench-raw"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .set("queued.min.messages", "200000")
        // As weir's consumer: no 1 s pause in fetching once the prefetch queue was full.
        .set("fetch.queue.backoff.ms", "10")
        .create()
        .unwrap();
    let mut producer_config = config;
    producer_config.set("linger.ms", "5").set("batch.num.messages", "10000").set("queue.buffering.max.messages", "1000000");
    if transactional {
        producer_config.set("transactional.id", unique("bench-raw-tx"));
    }
    let producer: BaseProducer = producer_config.create().unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment.add_partition_offset(input, partition, Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
    let timeout = Duration::from_secs(30);
    if transactional {
        producer.init_transactions(timeout).unwrap();
        producer.begin_transaction().unwrap();
    }
    // The next offset of each partition, for the transaction's offsets.
    let mut next: HashMap<i32, i64> = HashMap::new();
    // Commits the open transaction with the consumed offsets; `again`: opens the next.
    // rust-rdkafka's commit_transaction flushes first with poll(100 ms), which runs to its
    // deadline whatever it serves: every commit would wait 100 ms or more. The delivery
    // reports are served here first (as weir does), so that flush has nothing to wait for.
    let commit = |next: &HashMap<i32, i64>, again: bool| {
        while producer.in_flight_count() > 0 {
            serve_or_pause(&producer);
        }
        let mut offsets = TopicPartitionList::new();
        for (partition, offset) in next {
            offsets.add_partition_offset(input, *partition, Offset::Offset(*offset)).unwrap();
        }
        producer.send_offsets_to_transaction(&offsets, &consumer.group_metadata().unwrap(), timeout).unwrap();
        producer.commit_transaction(timeout).unwrap();
        if again {
            producer.begin_transaction().unwrap();
        }
    };
    let cpu_before = process_cpu_seconds(std::process::id());
    let started = Instant::now();
    let mut last_commit = Instant::now();
    let mut forwarded = 0u64;
    while forwarded < records && !stop.as_ref().is_some_and(|stop| stop.load(Ordering::Relaxed)) {
        if transactional && last_commit.elapsed() >= COMMIT_INTERVAL && !next.is_empty() {
            commit(&next, true);
            last_commit = Instant::now();
        }
        let Some(message) = consumer.poll(Duration::from_millis(20)) else {
            producer.poll(Duration::ZERO);
            continue;
        };
        let message = message.unwrap();
        let mut record = BaseRecord::<[u8], [u8]>::to(output);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, returned)) => {
                    record = returned;
                    serve_or_pause(&producer);
                }
            }
        }
        next.insert(message.partition(), message.offset() + 1);
        forwarded += 1;
        if forwarded.is_multiple_of(1024) {
            producer.poll(Duration::ZERO);
        }
    }
    if transactional {
        commit(&next, false);
    }
    while producer.in_flight_count() > 0 {
        serve_or_pause(&producer);
    }
    (started.elapsed().as_secs_f64(), process_cpu_seconds(std::process::id()) - cpu_before)
}

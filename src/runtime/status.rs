//! The `/status` progress report, in the spirit of Spark's StreamingQueryProgress: the
//! recent batches (rows in and out, rates, durations, the offsets they committed), each
//! partition's committed offset, lag and watermark, the state size, and the last error.
//! Updated by the loop at each commit; read by the HTTP server.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::runtime::TopicPartitionOffset;
use crate::config::redact;
use crate::engine::BatchCounts;

/// How many recent batches the report keeps.
const RECENT: usize = 10;

pub struct Status {
    report: Mutex<Report>,
    last_commit: Mutex<Option<Instant>>,
    secrets: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pipeline: String,
    pub instance: String,
    pub started_at: String,
    pub batches_committed: u64,
    pub batches_aborted: u64,
    pub records_in: u64,
    pub records_out: u64,
    pub state_keys: usize,
    /// Newest last.
    pub recent_batches: VecDeque<BatchProgress>,
    /// By `topic[partition]`, for the partitions this process owns.
    pub partitions: BTreeMap<String, PartitionProgress>,
    pub last_error: Option<ErrorReport>,
    /// Set while weir waits out a fault: the run stopped, and starts again from the committed
    /// state until a batch commits.
    pub recovering: Option<RecoveryReport>,
    /// The changelog partitions being read back into state right now, by `topic[partition]`.
    pub restoring: BTreeMap<String, RestoreProgress>,
    /// The table sources, by name.
    pub tables: BTreeMap<String, TableProgress>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TableProgress {
    /// bootstrapping (read before the first stream record) or live.
    pub state: String,
    /// Where this run started reading: the beginning, or the stored positions.
    pub read_from: String,
    /// Records between the start positions and the ends seen at start.
    pub bootstrap_records: u64,
    /// Records read by this run.
    pub records_read: u64,
    /// While bootstrapping: records read per second.
    pub records_per_second: f64,
    pub bootstrap_seconds: Option<f64>,
    /// Records written to the table's topic and not read yet.
    pub lag: i64,
    /// The store's estimate.
    pub rows_estimated: u64,
    /// Records that could not be applied (see the log), and the last one.
    pub skipped_records: u64,
    pub last_skipped: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreProgress {
    pub started_at: String,
    /// Entries read so far.
    pub restored: u64,
    /// The next offset to read, once one was read.
    pub position: Option<i64>,
    /// The offset the restore reads to.
    pub end: i64,
    pub records_per_second: f64,
    /// Bytes read so far (keys and values).
    pub bytes: u64,
    /// Offsets left to read (an upper bound on the entries: compaction and transaction
    /// markers leave gaps), and at the rate so far, about how long that takes.
    pub remaining: i64,
    pub remaining_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecoveryReport {
    /// When the first failed run of this fault ended.
    pub since: String,
    /// Runs started again since then.
    pub attempts: u32,
    /// retriable (the cluster may answer later) or abort (the batch is replayed).
    pub class: String,
    pub reason: String,
    /// The wait before the next run.
    pub next_attempt_in_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchProgress {
    pub batch: u64,
    pub committed_at: String,
    pub input_rows: u64,
    pub output_rows: u64,
    pub dlq_rows: u64,
    pub filtered_rows: u64,
    pub duplicate_rows: u64,
    /// From the batch's first record to its commit.
    pub duration_ms: u64,
    pub commit_ms: u64,
    /// Input rows over the time since the previous commit (or the start).
    pub input_rows_per_second: f64,
    /// Input rows over the batch's own duration.
    pub processed_rows_per_second: f64,
    pub state_keys: usize,
    /// The next offset to read, as committed, by `topic[partition]`.
    pub offsets: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PartitionProgress {
    pub committed_offset: Option<i64>,
    pub lag: Option<i64>,
    /// Event-time watermark in epoch milliseconds, for pipelines with event time.
    pub watermark: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorReport {
    pub at: String,
    pub message: String,
}

/// What a committed batch did, from the transaction.
#[derive(Debug, Clone)]
pub struct BatchSummary {
    pub counts: BatchCounts,
    pub offsets: Vec<TopicPartitionOffset>,
    pub opened_at: Option<Instant>,
    pub commit_duration: Duration,
}

fn now_text() -> String {
    chrono::DateTime::<chrono::Utc>::from(SystemTime::now()).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn partition_name(topic: &str, partition: i32) -> String {
    format!("{topic}[{partition}]")
}

impl Status {
    /// `secrets`: credentials (from the Kafka options) that an error message must never show.
    pub fn new(pipeline: &str, instance: &str, secrets: Vec<String>) -> Status {
        Status {
            secrets,
            report: Mutex::new(Report {
                pipeline: pipeline.to_string(),
                instance: instance.to_string(),
                started_at: now_text(),
                batches_committed: 0,
                batches_aborted: 0,
                records_in: 0,
                records_out: 0,
                state_keys: 0,
                recent_batches: VecDeque::new(),
                partitions: BTreeMap::new(),
                last_error: None,
                recovering: None,
                restoring: BTreeMap::new(),
                tables: BTreeMap::new(),
            }),
            last_commit: Mutex::new(Some(Instant::now())),
        }
    }

    fn report(&self) -> std::sync::MutexGuard<'_, Report> {
        self.report.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn snapshot(&self) -> Report {
        self.report().clone()
    }

    /// A restore of `changelog[partition]` has read `restored` entries since `started`.
    pub fn restoring(&self, changelog: &str, partition: i32, restored: (u64, u64), position: Option<i64>, end: i64, started: Instant) {
        let (restored, bytes) = restored;
        let seconds = started.elapsed().as_secs_f64();
        let rate = if seconds > 0.0 { restored as f64 / seconds } else { 0.0 };
        let remaining = position.map_or(end, |position| end - position).max(0);
        let name = partition_name(changelog, partition);
        let mut report = self.report();
        let started_at = report.restoring.get(&name).map_or_else(now_text, |progress| progress.started_at.clone());
        report.restoring.insert(
            name,
            RestoreProgress {
                started_at,
                restored,
                position,
                end,
                records_per_second: rate,
                bytes,
                remaining,
                remaining_seconds: (rate > 0.0).then(|| remaining as f64 / rate),
            },
        );
    }

    /// Updates the progress of table `name`.
    pub fn table(&self, name: &str, update: impl FnOnce(&mut TableProgress)) {
        update(self.report().tables.entry(name.to_string()).or_default());
    }

    /// The restore of `changelog[partition]` ended (done or failed).
    pub fn restored(&self, changelog: &str, partition: i32) {
        self.report().restoring.remove(&partition_name(changelog, partition));
    }

    /// A batch committed; `watermarks` are the input partitions' after it.
    pub fn committed(&self, summary: &BatchSummary, state_keys: usize, watermarks: &[((String, i32), i64)]) {
        let now = Instant::now();
        let since_previous = {
            let mut last = self.last_commit.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let since = last.map_or(Duration::ZERO, |at| now.duration_since(at));
            *last = Some(now);
            since
        };
        let duration = summary.opened_at.map_or(summary.commit_duration, |at| now.duration_since(at));
        let counts = &summary.counts;
        let rate = |elapsed: Duration| match elapsed.as_secs_f64() {
            seconds if seconds > 0.0 => counts.records_in as f64 / seconds,
            _ => 0.0,
        };
        let mut report = self.report();
        report.recovering = None;
        report.batches_committed += 1;
        report.records_in += counts.records_in;
        report.records_out += counts.records_out();
        report.state_keys = state_keys;
        let batch = BatchProgress {
            batch: report.batches_committed,
            committed_at: now_text(),
            input_rows: counts.records_in,
            output_rows: counts.records_out(),
            dlq_rows: counts.dlq_records.iter().sum(),
            filtered_rows: counts.records_filtered,
            duplicate_rows: counts.duplicates_dropped,
            duration_ms: duration.as_millis() as u64,
            commit_ms: summary.commit_duration.as_millis() as u64,
            input_rows_per_second: rate(since_previous),
            processed_rows_per_second: rate(duration),
            state_keys,
            offsets: summary.offsets.iter().map(|position| (partition_name(&position.topic, position.partition), position.offset)).collect(),
        };
        for TopicPartitionOffset { topic, partition, offset } in &summary.offsets {
            report.partitions.entry(partition_name(topic, *partition)).or_default().committed_offset = Some(*offset);
        }
        for ((topic, partition), watermark) in watermarks {
            if *watermark > i64::MIN
                && let Some(progress) = report.partitions.get_mut(&partition_name(topic, *partition))
            {
                progress.watermark = Some(*watermark);
            }
        }
        report.recent_batches.push_back(batch);
        while report.recent_batches.len() > RECENT {
            report.recent_batches.pop_front();
        }
    }

    pub fn aborted(&self, reason: &str) {
        let mut report = self.report();
        report.batches_aborted += 1;
        report.last_error = Some(ErrorReport { at: now_text(), message: redact(reason, self.secrets.iter().map(String::as_str)) });
    }

    pub fn failed(&self, message: &str) {
        let message = redact(message, self.secrets.iter().map(String::as_str));
        self.report().last_error = Some(ErrorReport { at: now_text(), message });
    }

    /// A fault stopped the run; it starts again in `wait`. Also the last error.
    pub fn recovering(&self, class: &str, reason: &str, wait: Duration) {
        let reason = redact(reason, self.secrets.iter().map(String::as_str));
        let mut report = self.report();
        let now = now_text();
        let (since, attempts) = report.recovering.as_ref().map_or((now.clone(), 1), |earlier| (earlier.since.clone(), earlier.attempts + 1));
        report.last_error = Some(ErrorReport { at: now, message: reason.clone() });
        report.recovering = Some(RecoveryReport {
            since,
            attempts,
            class: class.to_string(),
            reason,
            next_attempt_in_ms: wait.as_millis() as u64,
        });
    }

    /// The run that followed a fault is at work again.
    pub fn recovered(&self) {
        let mut report = self.report();
        if report.recovering.is_some() {
            report.recovering = None;
        }
    }

    /// Batches committed since the start of the process.
    pub fn batches_committed(&self) -> u64 {
        self.report().batches_committed
    }

    pub fn assigned(&self, topic: &str, partition: i32) {
        self.report().partitions.entry(partition_name(topic, partition)).or_default();
    }

    pub fn revoked(&self, topic: &str, partition: i32) {
        self.report().partitions.remove(&partition_name(topic, partition));
    }

    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        if let Some(progress) = self.report().partitions.get_mut(&partition_name(topic, partition)) {
            progress.lag = Some(lag);
        }
    }
}

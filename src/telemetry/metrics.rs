//! Every metric weir exports, declared in one place (Prometheus conventions: `weir_` prefix,
//! counters end in `_total`, durations are in seconds; labels have bounded values).

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::engine::{BatchCounts, ErrorStage};

pub struct Metrics {
    registry: Registry,
    /// Records read from a source and committed as processed, by source name.
    pub records_in: IntCounterVec,
    /// Records written to the sink in committed batches, by sink topic.
    pub records_out: IntCounterVec,
    /// Records dropped by a filter step, in committed batches.
    pub records_filtered: IntCounter,
    /// Records a dedup step dropped as duplicates, in committed batches.
    pub duplicates_dropped: IntCounter,
    /// Records written to the DLQ in committed batches, by error stage.
    pub dlq_records: IntCounterVec,
    /// Bad records dropped because `on_error.<stage>` is `skip`.
    pub skipped_records: IntCounterVec,
    /// Committed batches (transactions).
    pub batches: IntCounter,
    /// Aborted transactions (their records are read and processed again).
    pub aborts: IntCounter,
    /// Runs of the loop ended by a fault and started again in place, by failure class.
    pub recoveries: IntCounterVec,
    /// 1 while the loop waits out a fault (between a failed run and the next that commits).
    pub recovering: IntGauge,
    /// Time from the end of a batch to its committed transaction.
    pub commit_duration: Histogram,
    pub end_to_end_latency: Histogram,
    /// Records between the committed position and the end of each assigned partition.
    pub consumer_lag: IntGaugeVec,
    pub assigned_partitions: IntGauge,
    /// Owned source partitions silent for a while that, with no `idle_timeout`, hold back
    /// the watermark of the stages or join pairs that depend on them.
    pub watermark_held_back_partitions: IntGauge,
    /// Rebalances seen, by kind (assign, revoke, lost).
    pub rebalances: IntCounterVec,
    /// Committed offsets that had fallen out of retention, by how weir went on.
    pub data_loss_events: IntCounterVec,
    /// State entries read back from changelogs (on assignment and after aborts).
    pub state_restored_records: IntCounter,
    /// Keys, groups, windows and join records held in state by this process.
    pub state_keys: IntGauge,
    /// The same, by stateful step (its index in the pipeline).
    pub step_state_keys: IntGaugeVec,
    /// The local store's estimate of its live data, by stateful step.
    pub step_state_bytes: IntGaugeVec,
    /// Lookups of the local store's block cache that found their block, and that did not.
    pub state_cache_hits: IntCounter,
    pub state_cache_misses: IntCounter,
    /// What the local store's block cache holds, in bytes.
    pub state_cache_bytes: IntGauge,
    /// Each owned input partition's event-time watermark (epoch milliseconds; kept beside
    /// the seconds one, which follows Prometheus' base units, until dashboards move).
    pub watermark: IntGaugeVec,
    /// The same in Unix seconds (`_timestamp_seconds`, Prometheus' convention).
    pub watermark_seconds: GaugeVec,
    /// Wall-clock time minus each owned input partition's watermark.
    pub event_time_lag: GaugeVec,
    /// Records that came too late (after the watermark closed what they belong to), whatever
    /// `on_error.late` did with them.
    pub late_records: IntCounter,
    /// Table sources: rows (the store's estimate), records not read yet, records read and
    /// records that could not be applied, by table; and how long the last bootstrap took.
    pub table_rows: IntGaugeVec,
    pub table_lag: IntGaugeVec,
    pub table_records: IntCounterVec,
    pub table_records_skipped: IntCounterVec,
    pub table_bootstrap_seconds: GaugeVec,
    /// 1, labelled with weir's version (`weir_build_info`).
    pub build_info: IntGaugeVec,
    /// When the last batch committed, Unix seconds: alert on it not moving.
    pub last_commit_timestamp: prometheus::Gauge,
    /// 1 while /health/ready says ready (set when /metrics is scraped).
    pub ready: IntGauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definitions are static and valid");
            registry.register(Box::new(metric.clone())).expect("each metric is registered once");
            metric
        };
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("metric definitions are static and valid");
            registry.register(Box::new(metric.clone())).expect("each metric is registered once");
            metric
        };
        let records_in = counter_vec("weir_records_in_total", "Records read and committed as processed, by source.", &["source"]);
        let records_out = counter_vec("weir_records_out_total", "Records written to the sink in committed batches.", &["sink"]);
        let records_filtered = counter("weir_records_filtered_total", "Records dropped by a filter step in committed batches.");
        let duplicates_dropped =
            counter("weir_duplicates_dropped_total", "Records a dedup step dropped as duplicates, in committed batches.");
        let dlq_records = counter_vec("weir_dlq_records_total", "Records written to the DLQ in committed batches, by error stage.", &["stage"]);
        let skipped_records = counter_vec("weir_skipped_records_total", "Bad records dropped by on_error: skip, by stage.", &["stage"]);
        let batches = counter("weir_batches_total", "Committed batches (Kafka transactions).");
        let aborts = counter("weir_transaction_aborts_total", "Aborted transactions; their records are processed again.");
        let recoveries = counter_vec(
            "weir_recoveries_total",
            "Times the loop was stopped by a fault (broker away, transaction timed out, aborted batch) and started again from the committed state, by class.",
            &["class"],
        );
        let recovering = IntGauge::new("weir_recovering", "1 while weir waits out a fault and starts again from the committed state.")
            .expect("metric definitions are static and valid");
        registry.register(Box::new(recovering.clone())).expect("each metric is registered once");
        let commit_duration = Histogram::with_opts(
            HistogramOpts::new("weir_commit_duration_seconds", "Time to commit a batch's transaction.")
                .buckets(vec![0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]),
        )
        .expect("metric definitions are static and valid");
        registry.register(Box::new(commit_duration.clone())).expect("each metric is registered once");
        let end_to_end_latency = Histogram::with_opts(
            HistogramOpts::new(
                "weir_end_to_end_latency_seconds",
                "Per committed batch: from the Kafka timestamp of its oldest input record to the commit that made its results visible to read_committed readers.",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0]),
        )
        .expect("metric definitions are static and valid");
        registry.register(Box::new(end_to_end_latency.clone())).expect("each metric is registered once");
        let consumer_lag = IntGaugeVec::new(
            Opts::new("weir_consumer_lag_records", "Records between the consumer position and the end of the partition."),
            &["topic", "partition"],
        )
        .expect("metric definitions are static and valid");
        registry.register(Box::new(consumer_lag.clone())).expect("each metric is registered once");
        let assigned_partitions = IntGauge::new("weir_assigned_partitions", "Input partitions this process owns.")
            .expect("metric definitions are static and valid");
        registry.register(Box::new(assigned_partitions.clone())).expect("each metric is registered once");
        let watermark_held_back_partitions = IntGauge::new(
            "weir_watermark_held_back_partitions",
            "Owned source partitions that delivered nothing for a while and, with no idle_timeout, hold back watermarks.",
        )
        .expect("metric definitions are static and valid");
        registry.register(Box::new(watermark_held_back_partitions.clone())).expect("each metric is registered once");
        let rebalances = counter_vec("weir_rebalances_total", "Consumer group rebalance events, by kind.", &["kind"]);
        let data_loss_events = counter_vec(
            "weir_data_loss_events_total",
            "Committed offsets found out of retention, by policy applied.",
            &["policy"],
        );
        let state_restored_records = counter(
            "weir_state_restored_records_total",
            "State entries read back from changelog topics.",
        );
        let state_cache_hits = counter("weir_state_cache_hits_total", "Lookups of the local state store's block cache that found their block.");
        let state_cache_misses = counter("weir_state_cache_misses_total", "Lookups of the local state store's block cache that read from disk.");
        let state_cache_bytes = IntGauge::new("weir_state_cache_bytes", "Bytes held in the local state store's block cache (state.cache_mib at most).")
            .expect("metric definitions are static and valid");
        registry.register(Box::new(state_cache_bytes.clone())).expect("each metric is registered once");
        let state_keys = IntGauge::new("weir_state_keys", "Keys, groups, windows and join records held in state.")
            .expect("metric definitions are static and valid");
        registry.register(Box::new(state_keys.clone())).expect("each metric is registered once");
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definitions are static and valid");
            registry.register(Box::new(metric.clone())).expect("each metric is registered once");
            metric
        };
        let float_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = GaugeVec::new(Opts::new(name, help), labels).expect("metric definitions are static and valid");
            registry.register(Box::new(metric.clone())).expect("each metric is registered once");
            metric
        };
        let step_state_keys = gauge_vec("weir_step_state_keys", "Keys, groups, windows and join records held in state, by stateful step.", &["step"]);
        let step_state_bytes =
            gauge_vec("weir_step_state_bytes", "Estimated live bytes of the local state store, by stateful step.", &["step"]);
        let watermark = gauge_vec(
            "weir_watermark_milliseconds",
            "Event-time watermark of each owned input partition, epoch milliseconds.",
            &["topic", "partition"],
        );
        let watermark_seconds = float_gauge_vec(
            "weir_watermark_timestamp_seconds",
            "Event-time watermark of each owned input partition, Unix seconds.",
            &["topic", "partition"],
        );
        let event_time_lag =
            float_gauge_vec("weir_event_time_lag_seconds", "Wall-clock time minus the watermark, by owned input partition.", &["topic", "partition"]);
        let late_records = counter("weir_late_records_total", "Records too late for the watermark, in committed batches.");
        let table_rows = gauge_vec("weir_table_rows", "Rows of each table source (the local store's estimate).", &["table"]);
        let table_lag = gauge_vec("weir_table_lag_records", "Records of each table's topic not read yet.", &["table"]);
        let table_records = counter_vec("weir_table_records_total", "Records of each table's topic read (applied, or skipped as weir_table_records_skipped_total counts).", &["table"]);
        let table_records_skipped = counter_vec(
            "weir_table_records_skipped_total",
            "Records of a table's topic that could not be applied (no key, not decodable); the log says which.",
            &["table"],
        );
        let table_bootstrap_seconds = float_gauge_vec(
            "weir_table_bootstrap_seconds",
            "How long reading each table before the first stream record took, last time.",
            &["table"],
        );
        // process_cpu_seconds_total, process_resident_memory_bytes, open fds, start time.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("the process collector is registered once");
        let build_info = gauge_vec("weir_build_info", "Always 1; the labels say which weir this is.", &["version"]);
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let last_commit_timestamp = prometheus::Gauge::new(
            "weir_last_commit_timestamp_seconds",
            "When the last batch committed (Unix time); 0 before the first.",
        )
        .expect("metric definitions are static and valid");
        registry.register(Box::new(last_commit_timestamp.clone())).expect("each metric is registered once");
        let ready = IntGauge::new("weir_ready", "1 while /health/ready answers 200.").expect("metric definitions are static and valid");
        registry.register(Box::new(ready.clone())).expect("each metric is registered once");
        // Known label values start at zero, so that a dashboard sees them before they happen.
        for policy in ["fail", "earliest"] {
            data_loss_events.with_label_values(&[policy]);
        }
        for class in ["retriable", "abort"] {
            recoveries.with_label_values(&[class]);
        }
        for kind in ["assign", "revoke", "lost"] {
            rebalances.with_label_values(&[kind]);
        }
        for stage in ErrorStage::ALL {
            dlq_records.with_label_values(&[stage.as_str()]);
            skipped_records.with_label_values(&[stage.as_str()]);
        }
        Metrics {
            registry,
            records_in,
            records_out,
            records_filtered,
            duplicates_dropped,
            dlq_records,
            skipped_records,
            batches,
            aborts,
            recoveries,
            recovering,
            commit_duration,
            end_to_end_latency,
            consumer_lag,
            assigned_partitions,
            watermark_held_back_partitions,
            rebalances,
            data_loss_events,
            state_restored_records,
            state_keys,
            step_state_keys,
            step_state_bytes,
            state_cache_hits,
            state_cache_misses,
            state_cache_bytes,
            watermark,
            watermark_seconds,
            event_time_lag,
            late_records,
            table_rows,
            table_lag,
            table_records,
            table_records_skipped,
            table_bootstrap_seconds,
            build_info,
            last_commit_timestamp,
            ready,
        }
    }

    /// Sets the watermark gauges of the input partitions (those without one yet are left out).
    pub fn record_watermarks(&self, watermarks: &[((String, i32), i64)]) {
        let now = chrono::Utc::now().timestamp_millis();
        for ((topic, partition), watermark) in watermarks {
            if *watermark == i64::MIN || *watermark == i64::MAX {
                continue;
            }
            let labels = [topic.as_str(), &partition.to_string()];
            self.watermark.with_label_values(&labels).set(*watermark);
            self.watermark_seconds.with_label_values(&labels).set(*watermark as f64 / 1000.0);
            self.event_time_lag.with_label_values(&labels).set(now.saturating_sub(*watermark) as f64 / 1000.0);
        }
    }

    /// Forgets the per-partition gauges of a partition no longer owned.
    pub fn forget_partition(&self, topic: &str, partition: i32) {
        let labels = [topic, &partition.to_string()];
        self.consumer_lag.remove_label_values(&labels).ok();
        self.watermark.remove_label_values(&labels).ok();
        self.watermark_seconds.remove_label_values(&labels).ok();
        self.event_time_lag.remove_label_values(&labels).ok();
    }

    /// Adds a committed batch's counts.
    /// `sources`: the source, and a join's right source, whose records `right_records_in` counts.
    /// Adds a committed batch's counts; `sinks`: each output's sink topic, by output index.
    pub fn record_batch(&self, sources: (&str, Option<&str>), sinks: &[String], counts: &BatchCounts) {
        let (left, right) = sources;
        self.records_in.with_label_values(&[left]).inc_by(counts.records_in - counts.right_records_in);
        if let Some(right) = right {
            self.records_in.with_label_values(&[right]).inc_by(counts.right_records_in);
        }
        for (sink, count) in sinks.iter().zip(&counts.records_out_by_output) {
            self.records_out.with_label_values(&[sink]).inc_by(*count);
        }
        self.records_filtered.inc_by(counts.records_filtered);
        self.duplicates_dropped.inc_by(counts.duplicates_dropped);
        self.late_records.inc_by(counts.dlq_records(ErrorStage::Late) + counts.skipped(ErrorStage::Late));
        for stage in ErrorStage::ALL {
            self.dlq_records.with_label_values(&[stage.as_str()]).inc_by(counts.dlq_records(stage));
            self.skipped_records.with_label_values(&[stage.as_str()]).inc_by(counts.skipped(stage));
        }
        self.batches.inc();
        let now = chrono::Utc::now().timestamp_millis();
        self.last_commit_timestamp.set(now as f64 / 1000.0);
        if let Some(oldest) = counts.oldest_input {
            // A producer clock ahead of ours would make it negative.
            self.end_to_end_latency.observe(now.saturating_sub(oldest).max(0) as f64 / 1000.0);
        }
    }
}

/// The metrics of every worker of the process (`runtime.workers`) as one Prometheus text: each
/// worker keeps its own, and a scrape adds them up, label set by label set: counters,
/// histograms and gauges of what each worker holds (partitions, keys, cache bytes) are sums.
/// What every worker reports the same of (the process, the build, the tables each reads
/// whole) or where the newest counts (the last commit) takes the largest value.
pub fn render_all(workers: &[std::sync::Arc<Metrics>]) -> String {
    let mut merged: Vec<prometheus::proto::MetricFamily> = Vec::new();
    for worker in workers {
        for family in worker.registry.gather() {
            match merged.iter_mut().find(|existing| existing.name() == family.name()) {
                Some(existing) => merge_family(existing, family),
                None => merged.push(family),
            }
        }
    }
    let mut buffer = Vec::new();
    // Encoding gathered families into a Vec cannot fail.
    let _ = TextEncoder::new().encode(&merged, &mut buffer);
    String::from_utf8(buffer).unwrap_or_default()
}

/// Families whose workers' values are not added up (see [`render_all`]).
fn takes_largest(name: &str) -> bool {
    name.starts_with("process_")
        || name.starts_with("weir_table_") && !name.ends_with("_total")
        || matches!(name, "weir_build_info" | "weir_last_commit_timestamp_seconds" | "weir_ready")
}

fn merge_family(into: &mut prometheus::proto::MetricFamily, family: prometheus::proto::MetricFamily) {
    use prometheus::proto::MetricType;
    let largest = takes_largest(family.name());
    let combine = |a: f64, b: f64| if largest { a.max(b) } else { a + b };
    let kind = family.get_field_type();
    let mut family = family;
    for metric in family.take_metric() {
        let Some(existing) = into.mut_metric().iter_mut().find(|existing| existing.get_label() == metric.get_label()) else {
            into.mut_metric().push(metric);
            continue;
        };
        match kind {
            MetricType::GAUGE => {
                let mut gauge = existing.get_gauge().clone();
                gauge.set_value(combine(gauge.get_value(), metric.get_gauge().get_value()));
                existing.set_gauge(gauge);
            }
            MetricType::COUNTER => {
                let mut counter = existing.get_counter().clone();
                counter.set_value(combine(counter.get_value(), metric.get_counter().get_value()));
                existing.set_counter(counter);
            }
            MetricType::HISTOGRAM => {
                let (mut histogram, other) = (existing.get_histogram().clone(), metric.get_histogram());
                histogram.set_sample_count(histogram.get_sample_count() + other.get_sample_count());
                histogram.set_sample_sum(histogram.get_sample_sum() + other.get_sample_sum());
                let buckets = histogram
                    .get_bucket()
                    .iter()
                    .zip(other.get_bucket())
                    .map(|(mine, theirs)| {
                        let mut bucket = mine.clone();
                        bucket.set_cumulative_count(mine.cumulative_count() + theirs.cumulative_count());
                        bucket
                    })
                    .collect();
                histogram.set_bucket(buckets);
                existing.set_histogram(histogram);
            }
            // weir declares no summaries or untyped metrics.
            MetricType::SUMMARY | MetricType::UNTYPED => {}
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn workers_metrics_add_up_except_what_each_reports_the_same_of() {
        let (first, second) = (Arc::new(Metrics::new()), Arc::new(Metrics::new()));
        first.assigned_partitions.set(2);
        second.assigned_partitions.set(3);
        first.batches.inc();
        second.batches.inc_by(4);
        first.records_out.with_label_values(&["out"]).inc_by(10);
        second.records_out.with_label_values(&["out"]).inc_by(5);
        second.records_out.with_label_values(&["other"]).inc();
        first.commit_duration.observe(0.004);
        second.commit_duration.observe(0.5);
        first.last_commit_timestamp.set(100.0);
        second.last_commit_timestamp.set(200.0);
        first.table_rows.with_label_values(&["users"]).set(7);
        second.table_rows.with_label_values(&["users"]).set(7);
        let text = render_all(&[first.clone(), second]);
        assert_eq!(sample(&text, "weir_assigned_partitions"), Some(5.0));
        assert_eq!(sample(&text, "weir_batches_total"), Some(5.0));
        assert_eq!(sample(&text, "weir_records_out_total{sink=\"out\"}"), Some(15.0));
        assert_eq!(sample(&text, "weir_records_out_total{sink=\"other\"}"), Some(1.0));
        assert_eq!(sample(&text, "weir_commit_duration_seconds_count"), Some(2.0));
        assert_eq!(sample(&text, "weir_commit_duration_seconds_sum"), Some(0.504));
        assert_eq!(sample(&text, "weir_last_commit_timestamp_seconds"), Some(200.0), "the newest commit");
        assert_eq!(sample(&text, "weir_table_rows{table=\"users\"}"), Some(7.0), "each worker reads the whole table");
        let build = format!("weir_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
        assert_eq!(sample(&text, &build), Some(1.0));
        assert_eq!(render_all(&[first]).lines().filter(|line| line.starts_with("weir_batches_total ")).collect::<Vec<_>>(), ["weir_batches_total 1"]);
    }
}

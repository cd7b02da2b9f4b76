//! The open batch: one Kafka transaction holding the batch's outputs and consumed offsets.
//!
//! # Failure handling
//! Each transactional call's error is classified ([`classify`]): retriable errors repeat the
//! same call (a commit that timed out without a verdict is retried, never assumed lost);
//! errors that require an abort abort the transaction and hand back the batch's first offsets
//! so the loop rewinds and processes the batch again; fatal errors (fencing) end the process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::status::BatchSummary;
use super::error::{classify, fatal, ErrorClass, RuntimeError};
use crate::engine::{BatchCounts, Output};
use crate::telemetry::metrics::Metrics;

/// How long the loop sleeps while it waits for delivery reports (see `serve_or_pause`):
/// short next to a broker round trip, long enough to leave the cores to the broker.
const REPORT_PAUSE: Duration = Duration::from_micros(100);

/// Counts failed deliveries; a failed delivery makes the transaction abortable, so the commit
/// will report it and the batch is replayed.
#[derive(Default)]
pub struct DeliveryWatch {
    pub failures: AtomicU64,
    /// The topics whose delivered offsets matter (the changelogs).
    tracked: Vec<String>,
    /// The highest offset delivered per tracked (topic, partition) since the last take.
    delivered: std::sync::Mutex<std::collections::HashMap<(String, i32), i64>>,
}

impl DeliveryWatch {
    /// Watches deliveries, remembering the offsets reached in `tracked` topics.
    pub fn new(tracked: Vec<String>) -> DeliveryWatch {
        DeliveryWatch { tracked, ..DeliveryWatch::default() }
    }

    /// The highest offset delivered per (topic, partition) since the last call.
    pub fn take_delivered(&self) -> std::collections::HashMap<(String, i32), i64> {
        std::mem::take(&mut *self.delivered.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

impl ClientContext for DeliveryWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        warn!(%error, reason, "producer client error");
    }
}

impl ProducerContext for DeliveryWatch {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _opaque: ()) {
        match result {
            Err((error, _)) => {
                if self.failures.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!(%error, "delivery failed; the transaction will abort and the batch will be replayed");
                }
            }
            Ok(message) if !self.tracked.is_empty() => {
                if let Some(topic) = self.tracked.iter().find(|topic| topic.as_str() == message.topic()) {
                    let mut delivered = self.delivered.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    let reached = delivered.entry((topic.clone(), message.partition())).or_insert(message.offset());
                    *reached = (*reached).max(message.offset());
                }
            }
            Ok(_) => {}
        }
    }
}

/// Offsets of one input partition within the open batch.
#[derive(Debug, Clone)]
struct PartitionBatch {
    topic: String,
    partition: i32,
    /// The first offset read in this batch: where to rewind to if it aborts.
    first: i64,
    /// The offset after the last one processed: what to commit.
    next: i64,
}

/// What became of a batch.
#[derive(Debug)]
pub enum Outcome {
    Committed { records: u64 },
    /// The transaction was aborted; each (topic, partition, offset) must be read again.
    Aborted { rewind: Vec<(String, i32, i64)> },
}

pub struct Transaction {
    producer: BaseProducer<DeliveryWatch>,
    transactional_id: String,
    /// False in `mode: idempotent_upsert`: a batch is then what was produced and
    /// acknowledged, and its offsets go to the state store, not into a transaction.
    transactional: bool,
    /// Topics whose records must stay under a size (their max.message.bytes, less framing).
    record_limits: Vec<(String, usize)>,
    open: bool,
    opened_at: Option<Instant>,
    partitions: Vec<PartitionBatch>,
    counts: BatchCounts,
    records: usize,
    call_timeout: Duration,
    metrics: Arc<Metrics>,
    /// The source's name, and a join's right source's.
    source_names: (String, Option<String>),
    sink_topic: String,
    /// What the last committed batch did, for the progress report.
    last_summary: Option<BatchSummary>,
    /// Start positions resolved from a partition's end (`starting_offsets: latest`, or a
    /// timestamp after every record) that no batch has committed yet: (topic, partition,
    /// offset). Until one is committed, a restart would resolve the end again and skip what
    /// arrived meanwhile, so the next commit carries them, with or without records.
    pinned_starts: Vec<(String, i32, i64)>,
}

impl Transaction {
    pub fn new(
        producer: BaseProducer<DeliveryWatch>,
        transactional_id: String,
        call_timeout: Duration,
        metrics: Arc<Metrics>,
        source_names: (String, Option<String>),
        sink_topic: String,
    ) -> Transaction {
        Transaction {
            producer,
            transactional_id,
            transactional: true,
            record_limits: Vec::new(),
            open: false,
            opened_at: None,
            partitions: Vec::new(),
            counts: BatchCounts::default(),
            last_summary: None,
            pinned_starts: Vec::new(),
            records: 0,
            call_timeout,
            metrics,
            source_names,
            sink_topic,
        }
    }

    /// `mode: idempotent_upsert`: the producer is idempotent, without transactions.
    pub fn without_transactions(mut self) -> Transaction {
        self.transactional = false;
        self
    }

    /// Records to each topic over its limit (bytes) fail in `send`, as librdkafka fails its
    /// own too-large records.
    pub fn with_record_limits(mut self, limits: Vec<(String, usize)>) -> Transaction {
        self.record_limits = limits;
        self
    }

    pub fn is_transactional(&self) -> bool {
        self.transactional
    }

    pub fn transactional_id(&self) -> &str {
        &self.transactional_id
    }

    /// Registers the producer with the transaction coordinator, fencing any older process with
    /// the same transactional id and aborting its open transaction. Retried until it answers
    /// or `keep_trying` says stop.
    pub fn initialize(&self, keep_trying: impl Fn() -> bool) -> Result<(), RuntimeError> {
        if !self.transactional {
            return Ok(());
        }
        loop {
            match self.producer.init_transactions(self.call_timeout) {
                Ok(()) => return Ok(()),
                Err(error) if classify(&error) == ErrorClass::Retriable && keep_trying() => {
                    warn!(%error, transactional_id = %self.transactional_id, "initializing transactions; retrying");
                }
                Err(error) => return Err(fatal(&error, &self.transactional_id)),
            }
        }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }


    /// Whether the open batch has run for `interval` or holds `max_records` records; or no
    /// batch is open but a pinned start waits to be committed.
    pub fn is_due(&self, interval: Duration, max_records: usize) -> bool {
        if !self.open {
            return !self.pinned_starts.is_empty();
        }
        self.records >= max_records || self.opened_at.is_some_and(|at| at.elapsed() >= interval)
    }

    /// Commits `offset` as where `partition` of `topic` starts, with the next batch even if
    /// that batch has no records. The transaction is begun only at that commit, so an
    /// assignment does not hold one open through the restore of its state.
    pub fn pin_start(&mut self, topic: &str, partition: i32, offset: i64) {
        self.unpin_start(topic, partition);
        self.pinned_starts.push((topic.to_string(), partition, offset));
    }

    /// Forgets a pinned start (its partition was revoked).
    pub fn unpin_start(&mut self, topic: &str, partition: i32) {
        self.pinned_starts.retain(|(pinned, pinned_partition, _)| (pinned.as_str(), *pinned_partition) != (topic, partition));
    }

    pub fn has_pinned_starts(&self) -> bool {
        !self.pinned_starts.is_empty()
    }

    /// Begins a transaction if none is open; called before the first output of a batch.
    pub fn ensure_open(&mut self) -> Result<(), RuntimeError> {
        if self.open {
            return Ok(());
        }
        if self.transactional {
            self.producer
                .begin_transaction()
                .map_err(|error| fatal(&error, &self.transactional_id))?;
        }
        self.open = true;
        self.opened_at = Some(Instant::now());
        Ok(())
    }

    /// Records that `offset` of a partition was processed, with what processing it counted.
    pub fn consumed(&mut self, topic: &str, partition: i32, offset: i64, counts: &BatchCounts) {
        match self.partitions.iter_mut().find(|p| p.partition == partition && p.topic == topic) {
            Some(batch) => batch.next = offset + 1,
            None => self.partitions.push(PartitionBatch {
                topic: topic.to_string(),
                partition,
                first: offset,
                next: offset + 1,
            }),
        }
        self.counts.add(counts);
        self.records += 1;
    }

    /// Queues one output in the open transaction. Errors are about this record (too large,
    /// for instance) or fatal; a full queue is waited out.
    pub fn send(&self, topic: &str, output: &Output) -> KafkaResult<()> {
        if let Some((_, limit)) = self.record_limits.iter().find(|(limited, _)| limited == topic) {
            let size = output.key.as_ref().map_or(0, Vec::len)
                + output.value.as_ref().map_or(0, Vec::len)
                + output.headers.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>();
            if size > *limit {
                return Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge));
            }
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        // An empty header list is still a librdkafka allocation and free per record.
        if !output.headers.is_empty() {
            let mut headers = OwnedHeaders::new_with_capacity(output.headers.len());
            for (name, value) in &output.headers {
                headers = headers.insert(Header { key: name, value: Some(value) });
            }
            record = record.headers(headers);
        }
        if let Some(partition) = output.partition {
            record = record.partition(partition);
        }
        if let Some(key) = &output.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &output.value {
            record = record.payload(value.as_slice());
        }
        self.enqueue(record)
    }

    /// Hands a record to librdkafka, waiting out a full queue.
    fn enqueue(&self, mut record: BaseRecord<'_, [u8], [u8]>) -> KafkaResult<()> {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    self.serve_or_pause();
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    /// Adds counts of work done outside `consumed` (results emitted at the end of a batch).
    pub fn add_counts(&mut self, counts: &BatchCounts) {
        self.counts.add(counts);
    }

    /// Queues a changelog record for one partition in the open transaction.
    pub fn send_to_partition(&self, topic: &str, partition: i32, key: &[u8], value: Option<&[u8]>) -> KafkaResult<()> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).partition(partition).key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        self.enqueue(record)
    }

    /// The highest offset delivered per (topic, partition) since the last call; after a
    /// commit, what the batch's records reached.
    pub fn take_delivered(&self) -> std::collections::HashMap<(String, i32), i64> {
        self.producer.context().take_delivered()
    }

    /// The input offsets (topic, partition, next) the last committed batch reached.
    pub fn last_offsets(&self) -> Vec<(String, i32, i64)> {
        self.last_summary.as_ref().map(|summary| summary.offsets.clone()).unwrap_or_default()
    }

    /// What the last committed batch did (once).
    pub fn take_summary(&mut self) -> Option<BatchSummary> {
        self.last_summary.take()
    }

    /// The partitions read in the open batch.
    pub fn batch_partitions(&self) -> Vec<(String, i32)> {
        self.partitions.iter().map(|batch| (batch.topic.clone(), batch.partition)).collect()
    }

    /// Serves delivery reports; cheap, called once per loop turn.
    pub fn poll(&self) {
        self.producer.poll(Duration::ZERO);
    }

    /// Commits the open batch with its offsets. `positions` gives, per partition, the
    /// consumer's position where it is past the last processed offset (control records of
    /// transactional inputs take offsets too), so committed offsets reach the end.
    pub fn commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        deadline: Option<Instant>,
    ) -> Result<Option<Outcome>, RuntimeError> {
        if !self.open {
            if self.pinned_starts.is_empty() {
                return Ok(None);
            }
            // A transaction with offsets alone is what pins a start (see `pin_start`).
            self.ensure_open()?;
        }
        let started = Instant::now();
        let positions = consumer.position().ok();
        let mut offsets = TopicPartitionList::with_capacity(self.partitions.len());
        let mut committed_offsets = Vec::with_capacity(self.partitions.len());
        for batch in &self.partitions {
            let position = positions
                .as_ref()
                .and_then(|list| list.find_partition(&batch.topic, batch.partition))
                .and_then(|element| match element.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                })
                .unwrap_or(batch.next);
            let next = batch.next.max(position);
            committed_offsets.push((batch.topic.clone(), batch.partition, next));
            offsets
                .add_partition_offset(&batch.topic, batch.partition, Offset::Offset(next))
                .map_err(|error| RuntimeError::Fatal(error.to_string()))?;
        }
        // A partition read in this batch commits where its records reached, past its start.
        for (topic, partition, offset) in &self.pinned_starts {
            if !self.partitions.iter().any(|batch| batch.partition == *partition && &batch.topic == topic) {
                committed_offsets.push((topic.clone(), *partition, *offset));
                offsets
                    .add_partition_offset(topic, *partition, Offset::Offset(*offset))
                    .map_err(|error| RuntimeError::Fatal(error.to_string()))?;
            }
        }
        self.drain_delivery_reports();
        if !self.transactional {
            return self.acknowledged(started, committed_offsets).map(Some);
        }
        let Some(group) = consumer.group_metadata() else {
            return Err(RuntimeError::Fatal("the consumer has no group metadata".into()));
        };
        let timeout = self.call_timeout;
        let sent = self.retry("send offsets", deadline, |producer| {
            producer.send_offsets_to_transaction(&offsets, &group, timeout)
        })?;
        if !sent {
            return self.abort(deadline).map(Some);
        }
        let committed = self.retry("commit", deadline, |producer| producer.commit_transaction(timeout))?;
        if !committed {
            return self.abort(deadline).map(Some);
        }
        Ok(Some(self.committed(started, committed_offsets)))
    }

    /// Upsert mode: the batch is done when the broker has every record. A failed delivery
    /// cannot be taken back: the run stops, and the restart replays from the stored offsets,
    /// writing the same ids again.
    fn acknowledged(&mut self, started: Instant, offsets: Vec<(String, i32, i64)>) -> Result<Outcome, RuntimeError> {
        if self.producer.in_flight_count() > 0 {
            return Err(RuntimeError::Fatal(format!(
                "{} records were not acknowledged within {:?}; the restart replays them",
                self.producer.in_flight_count(),
                self.call_timeout
            )));
        }
        let failures = self.producer.context().failures.swap(0, Ordering::Relaxed);
        if failures > 0 {
            return Err(RuntimeError::Fatal(format!(
                "{failures} records of the batch could not be delivered; the restart replays the batch from the stored offsets"
            )));
        }
        Ok(self.committed(started, offsets))
    }

    fn committed(&mut self, started: Instant, committed_offsets: Vec<(String, i32, i64)>) -> Outcome {
        let counts = std::mem::take(&mut self.counts);
        let records = self.records as u64;
        let (left, right) = &self.source_names;
        self.metrics.record_batch((left, right.as_deref()), &self.sink_topic, &counts);
        self.metrics.commit_duration.observe(started.elapsed().as_secs_f64());
        debug!(records, partitions = self.partitions.len(), "batch committed");
        self.last_summary = Some(BatchSummary {
            counts,
            offsets: committed_offsets,
            opened_at: self.opened_at,
            commit_duration: started.elapsed(),
        });
        self.pinned_starts.clear();
        self.close();
        Outcome::Committed { records }
    }

    /// Waits until every produced record is acknowledged and its report served.
    /// rust-rdkafka's commit_transaction flushes with poll(100 ms), and its poll always runs
    /// to its deadline, so flushing there costs at least 100 ms per commit; serving reports
    /// here as they come leaves it nothing to wait for.
    fn drain_delivery_reports(&self) {
        let deadline = Instant::now() + self.call_timeout;
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
            self.serve_or_pause();
        }
    }

    /// Serves the delivery reports that are ready; if none was, sleeps a moment.
    /// rust-rdkafka's poll(timeout) passes librdkafka the time left in whole milliseconds and
    /// runs to its deadline: poll(1 ms) asks for 0 ms again and again, a busy spin for the
    /// whole millisecond. With the broker on the same cores (as in the benchmarks), that
    /// spin took CPU from the broker whose acknowledgement it was waiting for.
    fn serve_or_pause(&self) {
        let before = self.producer.in_flight_count();
        self.producer.poll(Duration::ZERO);
        if self.producer.in_flight_count() == before {
            std::thread::sleep(REPORT_PAUSE);
        }
    }

    /// Aborts the open batch; its records will be read again from the returned offsets.
    pub fn abort(&mut self, deadline: Option<Instant>) -> Result<Outcome, RuntimeError> {
        // librdkafka's abort waits until every queued delivery report has been served, and
        // rust-rdkafka's abort_transaction (unlike its commit) does not serve them: drop what
        // is queued and serve the reports first, or the abort blocks until it times out.
        self.producer.purge(PurgeConfig::default().queue().inflight());
        self.drain_delivery_reports();
        // Upsert mode: what was written stays written; the replay writes the same ids.
        if self.transactional {
            let timeout = self.call_timeout;
            let aborted = self.retry("abort", deadline, |producer| producer.abort_transaction(timeout))?;
            if !aborted {
                return Err(RuntimeError::Fatal("the transaction could not be aborted".into()));
            }
        } else {
            self.producer.context().failures.store(0, Ordering::Relaxed);
        }
        let rewind = self
            .partitions
            .iter()
            .map(|batch| (batch.topic.clone(), batch.partition, batch.first))
            .collect();
        self.metrics.aborts.inc();
        info!(records = self.records, "transaction aborted; the batch will be processed again");
        self.close();
        Ok(Outcome::Aborted { rewind })
    }

    fn close(&mut self) {
        self.open = false;
        self.opened_at = None;
        self.partitions.clear();
        self.counts = BatchCounts::default();
        self.records = 0;
    }

    /// Runs a transactional call until it succeeds (true), needs an abort (false) or fails
    /// fatally (error). Retriable errors repeat the same call until `deadline`.
    fn retry(
        &self,
        what: &str,
        deadline: Option<Instant>,
        call: impl Fn(&BaseProducer<DeliveryWatch>) -> KafkaResult<()>,
    ) -> Result<bool, RuntimeError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let error = match call(&self.producer) {
                Ok(()) => return Ok(true),
                Err(error) => error,
            };
            match classify(&error) {
                ErrorClass::Retriable if deadline.is_none_or(|deadline| Instant::now() < deadline) => {
                    warn!(%error, call = what, transactional_id = %self.transactional_id, "transactional call failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                ErrorClass::Retriable => return Err(RuntimeError::DrainDeadline),
                ErrorClass::Abort => {
                    warn!(%error, call = what, "transaction must be aborted");
                    return Ok(false);
                }
                ErrorClass::Fatal => return Err(fatal(&error, &self.transactional_id)),
            }
        }
    }
}

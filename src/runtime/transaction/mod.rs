//! The commit path: how a batch's outputs, state changes and consumed offsets reach Kafka
//! together, and what happens when a step of that fails. Everything about "what if the commit
//! fails" is in this module.
//!
//! # Design
//! ```text
//! start:  init_transactions ──► fences an older process with the same transactional id
//!                               (`<name>-<instance>`) and aborts its open transaction,
//!                               before any offset is read or any state restored
//! batch:  begin (at the first output) ─► produce results, DLQ and repartition records
//!         ─► batch end: update-mode windows emit; state changes go to the changelogs
//!         ─► send_offsets_to_transaction (the next offsets to read, with group metadata)
//!         ─► commit_transaction ─► the batch's state goes to the store in one WriteBatch,
//!                                  with the changelog offsets it reaches
//! ```
//! [`BatchProducer`] is one Kafka transaction (or, in `idempotent_upsert` mode, one batch of an
//! idempotent producer: see [`DeliveryMode`]); `batch` drives it for the session as a whole
//! (engine, changelogs, store).
//!
//! # Failure handling
//! Each call's error is classified ([`classify`], librdkafka's classes):
//! - **retriable**: the same call again (a commit that timed out without a verdict is
//!   retried, never assumed lost or done);
//! - **abort and rewind**: the transaction is aborted and the batch's first offsets are
//!   handed back, so the loop seeks there, drops the batch's in-memory state, restores it
//!   from the changelog and processes the batch again;
//! - **fatal** (fenced by a newer process or by the group): the run stops without
//!   committing; the next process with the same instance id aborts what was open. Fencing
//!   of a transaction older than the transaction timeout is the coordinator ending it, not a
//!   twin: `recovery` starts the run again with a new producer. Retries stop once the
//!   transaction is past its timeout, for the same reason.
//!
//! A record the broker refuses for good (seen in its delivery report) makes the transaction
//! abortable; `refused` finds the input it came from, so that the replay sends that input to
//! `on_error.produce` instead.
//!
//! In `idempotent_upsert` mode nothing is transactional: a batch is done when the broker
//! acknowledged every record, and then its state and input offsets go to the store together;
//! a failed delivery stops the run, and the restart replays from the stored offsets, writing
//! the same ids again.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::producer::{BaseProducer, Producer, PurgeConfig};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::status::BatchSummary;
mod batch;
mod bounded;
mod cadence;
mod classes;
mod produce;
mod refused;
mod retry;

use cadence::batch_due;
pub use classes::{classify, fatal, moves_group_on, ErrorClass};
pub use refused::{refuses_record, Origin, Refusal, RefusedInputs};
use refused::Origins;

use super::delivery::DeliveryWatch;
use super::health::{self, Health};
use super::error::RuntimeError;
use crate::runtime::TopicPartitionOffset;
use crate::config::DeliveryMode;
use crate::engine::BatchCounts;
use crate::telemetry::metrics::Metrics;

/// How long the loop sleeps while it waits for delivery reports (see `serve_or_pause`):
/// short next to a broker round trip, long enough to leave the cores to the broker.
const REPORT_PAUSE: Duration = Duration::from_micros(100);

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
pub enum BatchOutcome {
    Committed { records: u64 },
    /// The transaction was aborted; each (topic, partition, offset) must be read again.
    Aborted { rewind: Vec<TopicPartitionOffset> },
}

pub struct BatchProducer {
    /// Shared only with a call left behind (see `bounded`).
    producer: Arc<BaseProducer<DeliveryWatch>>,
    /// A call on `producer` never returned: it can do nothing more, not even abort.
    wedged: bool,
    /// The last abort was the group's doing: the offsets went with a generation that a
    /// rebalance had ended (see `group_moved_on`).
    group_moved_on: bool,
    transactional_id: String,
    /// False in `mode: idempotent_upsert`: a batch is then what was produced and
    /// acknowledged, and its offsets go to the state store, not into a transaction.
    /// Transactions, or an idempotent producer without them (`idempotent_upsert`).
    mode: DeliveryMode,
    /// Topics whose records must stay under a size (their max.message.bytes, less framing).
    record_limits: Vec<(String, usize)>,
    open: bool,
    opened_at: Option<Instant>,
    /// When the last commit began: batches commit once per interval, start to start.
    last_commit_began: Option<Instant>,
    partitions: Vec<PartitionBatch>,
    counts: BatchCounts,
    records: usize,
    call_timeout: Duration,
    /// `kafka.transaction_timeout`: a transaction open longer than this has been, or will
    /// be, ended by the coordinator; retrying its calls is pointless.
    transaction_timeout: Duration,
    metrics: Arc<Metrics>,
    health: Option<Arc<Health>>,
    /// The source's name, and a join's right source's.
    source_names: (String, Option<String>),
    /// Each output's sink topic, by output index.
    sink_topics: Vec<String>,
    /// Where the open batch's sink records came from, and the inputs whose records the
    /// broker refused (kept across runs): see `refused`.
    origins: Origins,
    refused: Arc<RefusedInputs>,
    /// The open transaction holds one suspect input's records alone (see `refused`).
    alone: Option<TopicPartitionOffset>,
    /// What the last committed batch did, for the progress report.
    last_summary: Option<BatchSummary>,
    /// Start positions resolved from a partition's end (`starting_offsets: latest`, or a
    /// timestamp after every record) that no batch has committed yet: (topic, partition,
    /// offset). Until one is committed, a restart would resolve the end again and skip what
    /// arrived meanwhile, so the next commit carries them, with or without records.
    pinned_starts: Vec<TopicPartitionOffset>,
}

impl BatchProducer {
    pub fn new(
        producer: BaseProducer<DeliveryWatch>,
        transactional_id: String,
        transaction_timeout: Duration,
        metrics: Arc<Metrics>,
        source_names: (String, Option<String>),
        sink_topics: Vec<String>,
    ) -> BatchProducer {
        BatchProducer {
            producer: Arc::new(producer),
            wedged: false,
            group_moved_on: false,
            transactional_id,
            mode: DeliveryMode::Transactional,
            record_limits: Vec::new(),
            open: false,
            opened_at: None,
            last_commit_began: None,
            partitions: Vec::new(),
            counts: BatchCounts::default(),
            last_summary: None,
            origins: Origins::default(),
            refused: Arc::default(),
            alone: None,
            pinned_starts: Vec::new(),
            records: 0,
            // A call waits at least 10 s: short timeouts make a slow broker look like an outage.
            call_timeout: transaction_timeout.max(Duration::from_secs(10)),
            transaction_timeout,
            metrics,
            health: None,
            source_names,
            sink_topics,
        }
    }

    /// How batches are delivered: the producer must have been made for that mode
    /// (`clients::producer_config` or `upsert_producer_config`).
    pub fn with_mode(mut self, mode: DeliveryMode) -> BatchProducer {
        self.mode = mode;
        self
    }

    /// Records to each topic over its limit (bytes) fail in `send`, as librdkafka fails its
    /// own too-large records.
    pub fn with_record_limits(mut self, limits: Vec<(String, usize)>) -> BatchProducer {
        self.record_limits = limits;
        self
    }

    /// Inputs whose records the broker refused, shared with the runs before and after this one.
    pub fn with_refused(mut self, refused: Arc<RefusedInputs>) -> BatchProducer {
        self.refused = refused;
        self
    }

    /// What the broker said about the sink records of this input before, if it refused them.
    pub fn refusal(&self, topic: &str, partition: i32, offset: i64) -> Option<Refusal> {
        self.refused.refusal(topic, partition, offset)
    }

    /// The open transaction (nothing else in it yet) is for this suspect input alone.
    pub fn send_alone(&mut self, input: TopicPartitionOffset) {
        self.alone = Some(input);
    }

    /// The origin to give the sink records of the input at `offset` of `partition` of `topic`.
    pub fn origin(&mut self, topic: &str, partition: i32, offset: i64) -> Origin {
        self.origins.push(topic, partition, offset)
    }

    /// Remembers the inputs of the records the broker refused (before the batch's origins
    /// are forgotten).
    fn note_refused(&mut self) {
        for (origin, reason) in self.producer.context().take_refused() {
            if let Some(input) = self.origins.get(origin) {
                let alone = self.alone.as_ref() == Some(&input);
                warn!(%input, %reason, alone, "the broker refused a record made from this input");
                self.refused.insert(input, reason, alone);
            }
        }
    }

    /// Readiness goes false while a transactional call is being retried.
    pub fn with_health(mut self, health: Arc<Health>) -> BatchProducer {
        self.health = Some(health);
        self
    }

    pub fn mode(&self) -> DeliveryMode {
        self.mode
    }

    pub fn transactional_id(&self) -> &str {
        &self.transactional_id
    }

    /// Registers the producer with the transaction coordinator, fencing any older process with
    /// the same transactional id and aborting its open transaction (or completing one whose
    /// commit had begun). A retriable failure is returned as such: the run starts again.
    pub fn initialize(&self) -> Result<(), RuntimeError> {
        if self.mode == DeliveryMode::IdempotentUpsert {
            return Ok(());
        }
        match self.producer.init_transactions(self.call_timeout) {
            Ok(()) => Ok(()),
            Err(error) if classify(&error) == ErrorClass::Retriable => Err(RuntimeError::kafka("initializing transactions", error)),
            Err(error) => Err(fatal(&error, &self.transactional_id)),
        }
    }

    /// How long the open transaction has been open.
    pub fn open_for(&self) -> Option<Duration> {
        self.opened_at.map(|at| at.elapsed())
    }

    /// The transaction timeout the producer was made with.
    pub fn transaction_timeout(&self) -> Duration {
        self.transaction_timeout
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// A call on the producer never returned (see `bounded`): nothing can be aborted with it.
    pub fn is_wedged(&self) -> bool {
        self.wedged
    }

    /// Whether the batch just aborted because a rebalance had moved the group to a new
    /// generation (its offsets were refused as "generation id is not valid" or from an unknown
    /// member); asking clears it. The new generation's assignment is then on its way to this
    /// consumer, and a run that stops must wait for it before closing (see
    /// `rebalance::finish_hand_over`).
    pub fn take_group_moved_on(&mut self) -> bool {
        std::mem::take(&mut self.group_moved_on)
    }

    /// Whether the open batch should commit: it holds `max_records` records, or its time
    /// came (`batch_due`; the clock is read only when `look_at_clock`: the loop does so every
    /// few records); or no batch is open but a pinned start waits to be committed.
    pub fn is_due(&self, interval: Duration, max_records: usize, look_at_clock: bool) -> bool {
        if !self.open {
            return !self.pinned_starts.is_empty();
        }
        self.records >= max_records
            || (look_at_clock
                && self.opened_at.is_some_and(|opened| batch_due(Instant::now(), opened, self.last_commit_began, interval)))
    }

    /// Commits `offset` as where `partition` of `topic` starts, with the next batch even if
    /// that batch has no records. The transaction is begun only at that commit, so an
    /// assignment does not hold one open through the restore of its state.
    pub fn pin_start(&mut self, topic: &str, partition: i32, offset: i64) {
        self.unpin_start(topic, partition);
        self.pinned_starts.push(TopicPartitionOffset::new(topic, partition, offset));
    }

    /// Forgets a pinned start (its partition was revoked).
    pub fn unpin_start(&mut self, topic: &str, partition: i32) {
        self.pinned_starts.retain(|pinned| !pinned.is_in(topic, partition));
    }

    pub fn has_pinned_starts(&self) -> bool {
        !self.pinned_starts.is_empty()
    }

    /// Begins a transaction if none is open; called before the first output of a batch.
    pub fn ensure_open(&mut self) -> Result<(), RuntimeError> {
        if self.open {
            return Ok(());
        }
        if self.mode == DeliveryMode::Transactional {
            self.producer
                .begin_transaction()
                .map_err(|error| fatal(&error, &self.transactional_id))?;
        }
        self.open = true;
        self.opened_at = Some(Instant::now());
        Ok(())
    }

    /// Records that `offset` of a partition was processed (what processing counted goes to
    /// [`BatchProducer::counts_mut`]).
    pub fn consumed(&mut self, topic: &str, partition: i32, offset: i64) {
        match self.partitions.iter_mut().find(|p| p.partition == partition && p.topic == topic) {
            Some(batch) => batch.next = offset + 1,
            None => self.partitions.push(PartitionBatch {
                topic: topic.to_string(),
                partition,
                first: offset,
                next: offset + 1,
            }),
        }
        self.records += 1;
    }

    /// What the open batch's processing counted so far.
    pub fn counts_mut(&mut self) -> &mut BatchCounts {
        &mut self.counts
    }

    /// Adds counts of work done outside `consumed` (results emitted at the end of a batch).
    pub fn add_counts(&mut self, counts: &BatchCounts) {
        self.counts.add(counts);
    }

    /// The highest offset delivered per (topic, partition) since the last call; after a
    /// commit, what the batch's records reached.
    pub fn take_delivered(&self) -> std::collections::HashMap<(String, i32), i64> {
        self.producer.context().take_delivered()
    }

    /// The input offsets (topic, partition, next) the last committed batch reached.
    pub fn last_offsets(&self) -> Vec<TopicPartitionOffset> {
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
    ) -> Result<Option<BatchOutcome>, RuntimeError> {
        if !self.open {
            if self.pinned_starts.is_empty() {
                return Ok(None);
            }
            // A transaction with offsets alone is what pins a start (see `pin_start`).
            self.ensure_open()?;
        }
        let started = Instant::now();
        self.last_commit_began = Some(started);
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
            committed_offsets.push(TopicPartitionOffset::new(batch.topic.clone(), batch.partition, next));
            offsets
                .add_partition_offset(&batch.topic, batch.partition, Offset::Offset(next))
                .map_err(|error| RuntimeError::kafka(format!("listing the offset of {}[{}]", batch.topic, batch.partition), error))?;
        }
        // A partition read in this batch commits where its records reached, past its start.
        for TopicPartitionOffset { topic, partition, offset } in &self.pinned_starts {
            if !self.partitions.iter().any(|batch| batch.partition == *partition && &batch.topic == topic) {
                committed_offsets.push(TopicPartitionOffset::new(topic.clone(), *partition, *offset));
                offsets
                    .add_partition_offset(topic, *partition, Offset::Offset(*offset))
                    .map_err(|error| RuntimeError::kafka(format!("listing the offset of {topic}[{partition}]"), error))?;
            }
        }
        if self.mode == DeliveryMode::IdempotentUpsert {
            return self.acknowledged(started, committed_offsets).map(Some);
        }
        self.drain_delivery_reports(deadline);
        let Some(group) = consumer.group_metadata() else {
            return Err(RuntimeError::Assignment("the consumer has no group metadata to send offsets with".into()));
        };
        // Stands in for a commit slow enough that a rebalance moves the group on between
        // taking its metadata and sending the offsets with it.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("offsets-sent-late");
        let timeout = self.call_timeout_within(deadline);
        let (offsets, group) = (Arc::new(offsets), Arc::new(group));
        let sent = self.retry("send offsets", deadline, |producer| bounded::send_offsets(producer, &offsets, &group, timeout))?;
        if !sent {
            return self.abort(deadline).map(Some);
        }
        let committed = self.retry("commit", deadline, |producer| Ok(producer.commit_transaction(timeout)?))?;
        if !committed {
            return self.abort(deadline).map(Some);
        }
        Ok(Some(self.committed(started, committed_offsets)))
    }

    /// Upsert mode: the batch is done when the broker has every record. A failed delivery
    /// cannot be taken back: the run stops, and the restart replays from the stored offsets,
    /// writing the same ids again.
    /// The producer retries each record for `message.timeout.ms` (5 minutes by default), so a
    /// broker that is away is waited out here, not ready meanwhile (audit R9); only records it
    /// gave up on stop the run.
    fn acknowledged(&mut self, started: Instant, offsets: Vec<TopicPartitionOffset>) -> Result<BatchOutcome, RuntimeError> {
        let patient_until = Instant::now() + self.call_timeout;
        while self.producer.in_flight_count() > 0 && self.producer.context().failures.load(Ordering::Relaxed) == 0 {
            health::beat();
            if let Some(health) = self.health.as_ref().filter(|_| Instant::now() > patient_until) {
                health.set_recovering(true);
            }
            self.serve_or_pause();
        }
        if let Some(health) = &self.health {
            health.set_recovering(false);
        }
        if self.producer.in_flight_count() > 0 {
            return Err(RuntimeError::Undelivered(format!(
                "{} records were not acknowledged within {:?}",
                self.producer.in_flight_count(),
                self.call_timeout
            )));
        }
        let failures = self.producer.context().failures.swap(0, Ordering::Relaxed);
        if failures > 0 {
            return Err(RuntimeError::Undelivered(format!("{failures} records of the batch could not be delivered")));
        }
        Ok(self.committed(started, offsets))
    }

    fn committed(&mut self, started: Instant, committed_offsets: Vec<TopicPartitionOffset>) -> BatchOutcome {
        let counts = std::mem::take(&mut self.counts);
        let records = self.records as u64;
        let (left, right) = &self.source_names;
        self.metrics.record_batch((left, right.as_deref()), &self.sink_topics, &counts);
        self.metrics.commit_duration.observe(started.elapsed().as_secs_f64());
        debug!(records, partitions = self.partitions.len(), "batch committed");
        self.last_summary = Some(BatchSummary {
            counts,
            offsets: committed_offsets,
            opened_at: self.opened_at,
            commit_duration: started.elapsed(),
        });
        self.pinned_starts.clear();
        if let Some(input) = &self.alone {
            self.refused.accepted(input);
        }
        self.close();
        BatchOutcome::Committed { records }
    }

    /// Waits until every produced record is acknowledged and its report served.
    /// rust-rdkafka's commit_transaction flushes with poll(100 ms), and its poll always runs
    /// to its deadline, so flushing there costs at least 100 ms per commit; serving reports
    /// here as they come leaves it nothing to wait for.
    fn drain_delivery_reports(&self, deadline: Option<Instant>) {
        let deadline = (Instant::now() + self.call_timeout).min(deadline.unwrap_or(Instant::now() + self.call_timeout));
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
    pub fn abort(&mut self, deadline: Option<Instant>) -> Result<BatchOutcome, RuntimeError> {
        // librdkafka's abort waits until every queued delivery report has been served, and
        // rust-rdkafka's abort_transaction (unlike its commit) does not serve them: drop what
        // is queued and serve the reports first, or the abort blocks until it times out.
        // Only the queue: a request already at the broker that is purged here (without an
        // epoch bump) can still land after the abort, in the next transaction if that one
        // has added the partition (audit R6). Those are waited for instead.
        self.producer.purge(PurgeConfig::default().queue());
        self.drain_delivery_reports(deadline);
        self.note_refused();
        if self.mode == DeliveryMode::Transactional && self.producer.in_flight_count() > 0 {
            // Still unanswered: stop rather than begin a transaction they could land in.
            // The restart's init_transactions bumps the epoch, which fences them.
            return Err(RuntimeError::Replay(format!(
                "{} records of an aborted batch were still unanswered after {:?}; stopping so that none lands in a later transaction",
                self.producer.in_flight_count(),
                self.call_timeout
            )));
        }
        // Upsert mode: what was written stays written; the replay writes the same ids.
        if self.mode == DeliveryMode::Transactional {
            let timeout = self.call_timeout_within(deadline);
            let aborted = self.retry("abort", deadline, |producer| Ok(producer.abort_transaction(timeout)?))?;
            if !aborted {
                return Err(RuntimeError::Replay("the transaction could not be aborted; the restart replays the batch".into()));
            }
        } else {
            self.producer.context().failures.store(0, Ordering::Relaxed);
        }
        let rewind = self
            .partitions
            .iter()
            .map(|batch| TopicPartitionOffset::new(batch.topic.clone(), batch.partition, batch.first))
            .collect();
        self.metrics.aborts.inc();
        info!(records = self.records, "transaction aborted; the batch will be processed again");
        self.close();
        Ok(BatchOutcome::Aborted { rewind })
    }

    fn close(&mut self) {
        self.origins.clear();
        self.alone = None;
        self.open = false;
        self.opened_at = None;
        self.partitions.clear();
        self.counts = BatchCounts::default();
        self.records = 0;
    }

}

//! The consumer context: rebalance callbacks and statistics.
//!
//! librdkafka runs these callbacks inside `poll`, on the loop's own thread, so they can use
//! the open transaction without racing the loop. On revocation the open batch is committed
//! (or aborted, if the partitions were lost) before the partitions are given up; on
//! assignment every new partition gets an explicit start position: its committed offset, or
//! the source's `starting_offsets` when it has none.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{info, warn};

use super::error::RuntimeError;
use super::health::Health;
use super::state::{self, Changelogs};
use super::purge::Purger;
use super::status::Status;
use super::store::{StateStore, StoreWrite};
use super::transaction::{Outcome, Transaction};
use crate::engine::{Destination, Engine};
use crate::config::{DataLossPolicy, StartingOffsets};
use crate::telemetry::metrics::Metrics;

/// How long an assignment may wait for committed offsets. Under read_committed the broker
/// holds the answer while the previous owner's transactional offset commit is pending
/// (KIP-447), which lasts at most the transaction timeout.
const COMMITTED_OFFSETS_TIMEOUT: Duration = Duration::from_secs(60);
const METADATA_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a source partition may deliver nothing before it counts as holding back the
/// watermarks that depend on it (where no `idle_timeout` lets them go on without it).
const HELD_BACK_AFTER: Duration = Duration::from_secs(30);

/// An input partition this process owns.
#[derive(Debug, Clone)]
pub struct OwnedPartition {
    pub topic: String,
    pub partition: i32,
    /// With `--until-end`: the (low, end) offsets seen when the partition was assigned.
    pub bounds_at_start: Option<(i64, i64)>,
    /// The position reading starts from, when it is a concrete offset.
    pub start: Option<i64>,
    /// When it was assigned or last had records in a committed batch (for `idle_timeout`).
    pub active: Instant,
    /// Whether its silence holding back watermarks was reported (once per silence).
    pub reported_held_back: bool,
}

/// State shared by the loop and the callbacks; only ever locked on the loop's thread.
pub struct Session {
    pub transaction: Transaction,
    pub engine: Engine,
    pub topics: OutputTopics,
    /// The local cache of the changelogs, for pipelines with state.
    pub store: Option<StateStore>,
    /// Input partitions whose state must be rebuilt from the changelog before their next
    /// record is processed (just assigned, or their batch aborted).
    pub pending_restore: Vec<(String, i32)>,
    pub owned: BTreeMap<(String, i32), OwnedPartition>,
    /// An error raised inside a callback, for the loop to stop with.
    pub failure: Option<RuntimeError>,
    /// Positions to seek back to after an abort inside a callback.
    pub rewind: Vec<(String, i32, i64)>,
    /// The loop stopped on an error: callbacks must not commit anything any more.
    pub abandoned: bool,
    /// Keys and windows in state after the last commit, for the gauge.
    pub metrics_state_keys: usize,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    /// Deletes committed records from the repartition topics (pipelines that have them).
    pub purger: Option<Purger>,
}

pub struct LoopContext {
    session: Mutex<Session>,
    starting_offsets: StartingOffsets,
    on_data_loss: DataLossPolicy,
    until_end: bool,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl LoopContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        transaction: Transaction,
        engine: Engine,
        topics: OutputTopics,
        store: Option<StateStore>,
        (starting_offsets, on_data_loss): (StartingOffsets, DataLossPolicy),
        until_end: bool,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        status: Arc<Status>,
        purger: Option<Purger>,
    ) -> LoopContext {
        LoopContext {
            session: Mutex::new(Session {
                transaction,
                engine,
                topics,
                store,
                pending_restore: Vec::new(),
                owned: BTreeMap::new(),
                failure: None,
                rewind: Vec::new(),
                abandoned: false,
                metrics_state_keys: 0,
                status,
                metrics: metrics.clone(),
                purger,
            }),
            starting_offsets,
            on_data_loss,
            until_end,
            metrics,
            health,
        }
    }

    pub fn session(&self) -> MutexGuard<'_, Session> {
        // A poisoned lock means a panic on the loop thread, which already ends the process.
        self.session.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn on_revoke(&self, consumer: &BaseConsumer<LoopContext>, revoked: &TopicPartitionList) {
        let lost = consumer.assignment_lost();
        let mut session = self.session();
        // Pinned starts are committed before a partition moves, or its next owner would
        // resolve the end again and skip what arrived meanwhile (lost partitions are
        // someone else's already).
        let pinned = !lost && session.transaction.has_pinned_starts();
        if (session.transaction.is_open() || pinned) && !session.abandoned {
            // Lost partitions may already belong to someone else: committing would be fenced.
            let outcome = if lost {
                session.abort(None)
            } else {
                session.commit(consumer, None).map(|outcome| outcome.unwrap_or(Outcome::Committed { records: 0 }))
            };
            match outcome {
                Ok(Outcome::Committed { records }) => info!(records, "committed the open batch before giving up partitions"),
                Ok(Outcome::Aborted { rewind }) => session.rewind.extend(rewind),
                Err(error) => session.failure = Some(error),
            }
        }
        for element in revoked.elements() {
            let key = (element.topic().to_string(), element.partition());
            session.engine.drop_input_partition(&key.0, key.1);
            let task = session.engine.task_input(&key.0, key.1);
            session.pending_restore.retain(|pending| pending != &task);
            session.owned.remove(&key);
            session.transaction.unpin_start(&key.0, key.1);
            session.status.revoked(&key.0, key.1);
            session.rewind.retain(|(topic, partition, _)| (topic.as_str(), *partition) != (key.0.as_str(), key.1));
            self.metrics.forget_partition(element.topic(), element.partition());
        }
        let owned = session.owned.len();
        drop(session);
        self.metrics.rebalances.with_label_values(&[if lost { "lost" } else { "revoke" }]).inc();
        self.metrics.assigned_partitions.set(owned as i64);
        self.health.set_assigned(owned);
        info!(revoked = revoked.count(), lost, owned, "partitions revoked");
        // A join run in place uses the eager range assignor (see `clients::consumer_config`).
        let unassigned = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(revoked),
            _ => consumer.unassign(),
        };
        if let Err(error) = unassigned {
            warn!(%error, "unassign failed");
        }
    }

    fn on_assign(&self, consumer: &BaseConsumer<LoopContext>, assigned: &mut TopicPartitionList) {
        let pinned_starts = match self.set_start_positions(consumer, assigned) {
            Ok(pinned_starts) => pinned_starts,
            Err(error) => {
                self.session().failure = Some(error);
                return;
            }
        };
        let mut session = self.session();
        for (topic, partition, offset) in pinned_starts {
            info!(topic, partition, offset, "no committed offset: starting at the end, committed as this partition's start");
            session.transaction.pin_start(&topic, partition, offset);
        }
        for element in assigned.elements() {
            let bounds_at_start = if self.until_end {
                match consumer.fetch_watermarks(element.topic(), element.partition(), METADATA_TIMEOUT) {
                    Ok(bounds) => Some(bounds),
                    Err(error) => {
                        session.failure = Some(RuntimeError::Fatal(format!(
                            "reading the end offset of {}[{}]: {error}",
                            element.topic(),
                            element.partition()
                        )));
                        return;
                    }
                }
            } else {
                None
            };
            session.queue_restore(element.topic(), element.partition());
            session.status.assigned(element.topic(), element.partition());
            session.owned.insert(
                (element.topic().to_string(), element.partition()),
                OwnedPartition {
                    topic: element.topic().to_string(),
                    partition: element.partition(),
                    bounds_at_start,
                    start: match element.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    },
                    active: Instant::now(),
                    reported_held_back: false,
                },
            );
        }
        if let Some(unpaired) = session.unpaired_partition() {
            session.failure = Some(unpaired);
            return;
        }
        let owned = session.owned.len();
        drop(session);
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(assigned),
            _ => consumer.assign(assigned),
        };
        if let Err(error) = result {
            self.session().failure = Some(RuntimeError::Fatal(format!("assigning partitions failed: {error}")));
            return;
        }
        self.metrics.rebalances.with_label_values(&["assign"]).inc();
        self.metrics.assigned_partitions.set(owned as i64);
        self.health.set_assigned(owned);
        info!(assigned = assigned.count(), owned, "partitions assigned");
    }

    /// Where to start from a committed offset: there, unless retention has deleted it (and
    /// records after it), which `on_data_loss` decides about: stop, or count it, say it and
    /// go on from the earliest record kept. Never silently.
    fn check_retention(
        &self,
        consumer: &BaseConsumer<LoopContext>,
        topic: &str,
        partition: i32,
        committed: i64,
    ) -> Result<Offset, RuntimeError> {
        let (low, _) = consumer
            .fetch_watermarks(topic, partition, METADATA_TIMEOUT)
            .map_err(|error| RuntimeError::Fatal(format!("reading the start offset of {topic}[{partition}]: {error}")))?;
        if committed >= low {
            return Ok(Offset::Offset(committed));
        }
        match self.on_data_loss {
            DataLossPolicy::Fail => {
                self.metrics.data_loss_events.with_label_values(&["fail"]).inc();
                Err(RuntimeError::DataLoss { topic: topic.to_string(), partition })
            }
            DataLossPolicy::Earliest => {
                self.metrics.data_loss_events.with_label_values(&["earliest"]).inc();
                warn!(
                    topic,
                    partition,
                    committed,
                    earliest = low,
                    lost = low - committed,
                    "data loss: records after the committed offset were deleted by retention; going on from the earliest kept (on_data_loss: earliest)"
                );
                Ok(Offset::Offset(low))
            }
        }
    }

    /// Upsert mode with state: where the local store says each partition's state is. A
    /// partition the group has read before but whose state is not here cannot go on: its
    /// state lives only in the store of the instance that had it.
    fn upsert_positions(
        &self,
        consumer: &BaseConsumer<LoopContext>,
        committed: &TopicPartitionList,
    ) -> Result<BTreeMap<(String, i32), i64>, RuntimeError> {
        let session = self.session();
        let mut positions = BTreeMap::new();
        let (false, Some(store)) = (session.transaction.is_transactional(), &session.store) else {
            return Ok(positions);
        };
        for element in committed.elements() {
            match (store.input_offset(element.topic(), element.partition())?, element.offset()) {
                (Some(offset), _) => {
                    positions.insert((element.topic().to_string(), element.partition()), offset);
                }
                (None, Offset::Offset(offset)) => {
                    // Committed at the start of the log (a reset to the earliest): nothing
                    // read is missing.
                    let (low, _) = consumer
                        .fetch_watermarks(element.topic(), element.partition(), METADATA_TIMEOUT)
                        .map_err(|error| RuntimeError::Fatal(format!("reading the start of {}[{}]: {error}", element.topic(), element.partition())))?;
                    if offset <= low {
                        continue;
                    }
                    return Err(RuntimeError::Setup(format!(
                        "{}[{}] was read up to offset {offset} by this pipeline, but its state is not in this instance's \
                         state store: in mode idempotent_upsert state lives only in the store of the instance that built it. \
                         Give the instance its state volume back, or start over with `weir reset --state --to-earliest`",
                        element.topic(),
                        element.partition()
                    )));
                }
                (None, _) => {}
            }
        }
        Ok(positions)
    }

    /// Gives every newly assigned partition its committed offset, or the source's
    /// `starting_offsets` where nothing was committed yet. Returns the starts resolved from a
    /// partition's end, which must be committed (see `Transaction::pin_start`).
    fn set_start_positions(
        &self,
        consumer: &BaseConsumer<LoopContext>,
        assigned: &mut TopicPartitionList,
    ) -> Result<Vec<(String, i32, i64)>, RuntimeError> {
        let mut pinned_starts = Vec::new();
        let committed = consumer
            .committed_offsets(assigned.clone(), COMMITTED_OFFSETS_TIMEOUT)
            .map_err(|error| RuntimeError::Fatal(format!("reading committed offsets: {error}")))?;
        let mut by_time = TopicPartitionList::new();
        let stored = self.upsert_positions(consumer, &committed)?;
        for element in committed.elements() {
            let key = (element.topic().to_string(), element.partition());
            let committed_offset = match stored.get(&key) {
                Some(offset) => Offset::Offset(*offset),
                None => element.offset(),
            };
            let start = match committed_offset {
                Offset::Offset(offset) => self.check_retention(consumer, element.topic(), element.partition(), offset)?,
                _ => match self.starting_offsets {
                    StartingOffsets::Earliest => Offset::Beginning,
                    StartingOffsets::Latest => {
                        let end = self.end_offset(consumer, element.topic(), element.partition())?;
                        pinned_starts.push((element.topic().to_string(), element.partition(), end));
                        Offset::Offset(end)
                    }
                    StartingOffsets::Timestamp(millis) => {
                        by_time
                            .add_partition_offset(element.topic(), element.partition(), Offset::Offset(millis))
                            .map_err(|error| RuntimeError::Fatal(error.to_string()))?;
                        continue;
                    }
                },
            };
            assigned
                .set_partition_offset(element.topic(), element.partition(), start)
                .map_err(|error| RuntimeError::Fatal(error.to_string()))?;
        }
        if by_time.count() > 0 {
            let found = consumer
                .offsets_for_times(by_time, METADATA_TIMEOUT)
                .map_err(|error| RuntimeError::Fatal(format!("looking up offsets by timestamp: {error}")))?;
            for element in found.elements() {
                // No record at or after the time: start at the end.
                let start = match element.offset() {
                    Offset::Offset(offset) if offset >= 0 => offset,
                    _ => {
                        let end = self.end_offset(consumer, element.topic(), element.partition())?;
                        pinned_starts.push((element.topic().to_string(), element.partition(), end));
                        end
                    }
                };
                let start = Offset::Offset(start);
                assigned
                    .set_partition_offset(element.topic(), element.partition(), start)
                    .map_err(|error| RuntimeError::Fatal(error.to_string()))?;
            }
        }
        Ok(pinned_starts)
    }

    /// A partition's end as a concrete offset, where `Offset::End` would be resolved anew at
    /// each assignment. The consumer reads read_committed, so librdkafka's ListOffsets asks
    /// for the last stable offset: records of a transaction still open are not skipped.
    fn end_offset(&self, consumer: &BaseConsumer<LoopContext>, topic: &str, partition: i32) -> Result<i64, RuntimeError> {
        let (_, end) = consumer
            .fetch_watermarks(topic, partition, METADATA_TIMEOUT)
            .map_err(|error| RuntimeError::Fatal(format!("reading the end offset of {topic}[{partition}]: {error}")))?;
        Ok(end)
    }
}

/// Where outputs go.
#[derive(Debug, Clone)]
pub struct OutputTopics {
    pub sink: String,
    pub dlq: String,
    pub changelogs: Changelogs,
    /// The repartition topic in front of each stage after the first.
    pub repartitions: BTreeMap<usize, String>,
}

impl OutputTopics {
    pub fn of(&self, destination: Destination) -> &str {
        match destination {
            Destination::Sink => &self.sink,
            Destination::Dlq => &self.dlq,
            Destination::Repartition(stage) => self.repartitions.get(&stage).map_or("", String::as_str),
        }
    }
}

impl Session {
    /// Commits the open batch: first what the batch end emits (update-mode windows) and the
    /// state changes for the changelogs, then the offsets and the transaction.
    pub fn commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        deadline: Option<Instant>,
    ) -> Result<Option<Outcome>, RuntimeError> {
        let mut store_writes = Vec::new();
        if self.transaction.is_open() {
            self.note_idle_inputs();
            let mut outputs = Vec::new();
            self.engine.end_batch(&mut outputs)?;
            for output in &outputs {
                let topic = self.topics.of(output.destination).to_string();
                self.transaction
                    .send(&topic, output)
                    .map_err(|error| RuntimeError::Fatal(format!("producing to {topic}: {error}")))?;
            }
            for entry in self.engine.take_changes() {
                let (key, value) = state::encode(&entry);
                // Upsert mode keeps state in the local store alone, with the input offsets.
                if self.transaction.is_transactional() {
                    let Some(changelog) = self.topics.changelogs.topic(entry.step) else {
                        return Err(RuntimeError::Fatal(format!("no changelog for step {}", entry.step)));
                    };
                    self.transaction
                        .send_to_partition(changelog, entry.partition, &key, value.as_deref())
                        .map_err(|error| RuntimeError::Fatal(format!("producing to {changelog}: {error}")))?;
                }
                store_writes.push(StoreWrite { step: entry.step, partition: entry.partition, key, value });
            }
            let counts = self.engine.take_counts();
            self.transaction.add_counts(&counts);
        }
        let outcome = self.transaction.commit(consumer, deadline)?;
        let delivered = self.transaction.take_delivered();
        if let (Some(Outcome::Committed { .. }), false) = (&outcome, self.transaction.is_transactional()) {
            self.acknowledged(consumer, &store_writes)?;
        } else if let (Some(Outcome::Committed { .. }), Some(store)) = (&outcome, &self.store) {
            // Committed: the cache may now hold these changes, with the changelog offsets
            // they reach (the next offset to read; the commit marker follows).
            // Only where this process is the changelog partition's one writer: otherwise others'
            // entries lie between ours, and the store keeps the older offset (a restore then
            // replays from there, which ours survive).
            let offsets: Vec<(usize, i32, i64)> = delivered
                .iter()
                .filter_map(|((topic, partition), offset)| {
                    let step = self.topics.changelogs.step(topic)?;
                    let writers = self.engine.changelog_writers(step, *partition);
                    writers.iter().all(|writer| self.owned.contains_key(writer)).then_some((step, *partition, offset + 1))
                })
                .collect();
            store.apply(&store_writes, &offsets, &[])?;
        }
        self.after_outcome(outcome.as_ref());
        if let (Some(Outcome::Committed { .. }), Some(summary)) = (&outcome, self.transaction.take_summary()) {
            let watermarks = self.engine.input_watermarks();
            self.status.committed(&summary, self.metrics_state_keys, &watermarks);
            if let Some(purger) = &mut self.purger {
                for (topic, partition, next) in &summary.offsets {
                    if self.engine.stage_of_topic(topic).is_some() {
                        purger.committed(topic, *partition, *next);
                    }
                }
                purger.maybe_purge(false);
            }
            self.metrics.record_watermarks(&watermarks);
            for (step, keys) in self.engine.state_keys_by_step() {
                let label = step.to_string();
                self.metrics.step_state_keys.with_label_values(&[&label]).set(keys as i64);
                if let Some(bytes) = self.store.as_ref().and_then(|store| store.live_bytes(step)) {
                    self.metrics.step_state_bytes.with_label_values(&[&label]).set(bytes as i64);
                }
            }
        }
        Ok(outcome)
    }

    /// Upsert mode, after every record of the batch is acknowledged: the state and the input
    /// offsets it is at go to the store in one WriteBatch; then the offsets go to the group
    /// too, for lag monitoring and for stateless pipelines (which have no store).
    fn acknowledged<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, writes: &[StoreWrite]) -> Result<(), RuntimeError> {
        let offsets = self.transaction.last_offsets();
        if let Some(store) = &self.store {
            store.apply(writes, &[], &offsets)?;
        }
        let mut list = TopicPartitionList::with_capacity(offsets.len());
        for (topic, partition, next) in &offsets {
            list.add_partition_offset(topic, *partition, Offset::Offset(*next))
                .map_err(|error| RuntimeError::Fatal(error.to_string()))?;
        }
        if list.count() > 0
            && let Err(error) = consumer.commit(&list, rdkafka::consumer::CommitMode::Async)
        {
            warn!(%error, "committing offsets to the group (upsert mode; the store has them)");
        }
        Ok(())
    }

    /// A source partition has become idle since the engine last heard: a batch must carry
    /// the news to the later stages even if no record is waiting.
    pub fn idle_news(&self) -> bool {
        let Some(timeout) = self.engine.idle_timeout() else {
            return false;
        };
        self.idle_inputs(timeout, Instant::now())
            .any(|owned| !self.engine.is_idle_input(&owned.topic, owned.partition))
    }

    /// The owned source partitions without records for `timeout` as of `now`.
    fn idle_inputs(&self, timeout: Duration, now: Instant) -> impl Iterator<Item = &OwnedPartition> {
        self.owned.values().filter(move |owned| {
            self.engine.stage_of_topic(&owned.topic).is_none() && now.duration_since(owned.active) >= timeout
        })
    }

    /// Tells the engine which source partitions have been idle for `idle_timeout`, before the
    /// batch end broadcasts watermarks.
    fn note_idle_inputs(&mut self) {
        // Kept with or without idle_timeout: `report_held_back_inputs` reads it too.
        let now = Instant::now();
        for (topic, partition) in self.transaction.batch_partitions() {
            if let Some(owned) = self.owned.get_mut(&(topic, partition)) {
                owned.active = now;
                owned.reported_held_back = false;
            }
        }
        let Some(timeout) = self.engine.idle_timeout() else {
            return;
        };
        let idle: Vec<(String, i32)> =
            self.idle_inputs(timeout, now).map(|owned| (owned.topic.clone(), owned.partition)).collect();
        self.engine.set_idle_inputs(idle);
    }

    /// A source partition that delivers nothing holds back the watermark of every later
    /// stage and join pair that depends on it, for good unless `idle_timeout` is set: their
    /// windows stay open and their state grows (audit R22). Counts such partitions in
    /// `weir_watermark_held_back_partitions` and warns once per partition per silence.
    /// Cheap (a walk over the owned partitions); the loop calls it every turn.
    pub fn report_held_back_inputs(&mut self) {
        let depends_on_several = self.engine.stage_count() > 1 || self.engine.join_in_place().is_some();
        if !depends_on_several || self.engine.idle_timeout().is_some() {
            return;
        }
        let now = Instant::now();
        let Session { owned, engine, metrics, .. } = self;
        let mut held_back = 0;
        for partition in owned.values_mut() {
            if engine.stage_of_topic(&partition.topic).is_some() {
                continue;
            }
            let silent_for = now.saturating_duration_since(partition.active);
            if silent_for < HELD_BACK_AFTER {
                continue;
            }
            held_back += 1;
            if !partition.reported_held_back {
                partition.reported_held_back = true;
                warn!(
                    topic = %partition.topic,
                    partition = partition.partition,
                    silent_for_seconds = silent_for.as_secs(),
                    "a source partition delivers nothing and holds back the watermark of the steps after it: their \
                     windows stay open and their state grows until it delivers; set the source's watermark.idle_timeout \
                     to go on without it"
                );
            }
        }
        metrics.watermark_held_back_partitions.set(held_back);
    }

    /// Marks the state of the task `topic`'s partition feeds for rebuilding before its next
    /// record (a join's pair of partitions once).
    fn queue_restore(&mut self, topic: &str, partition: i32) {
        let task = self.engine.task_input(topic, partition);
        if !self.pending_restore.contains(&task) {
            self.pending_restore.push(task);
        }
    }

    /// A join run in place needs partition p of both inputs in the same process. The range
    /// assignor gives them together when every member subscribes to both topics; a member
    /// running another pipeline file (a rolling change of `partitioned_by`) may not.
    fn unpaired_partition(&self) -> Option<RuntimeError> {
        let (left, right) = self.engine.join_in_place()?;
        let (topic, partition, missing) = self.owned.keys().find_map(|(topic, partition)| {
            let partner = match topic.as_str() {
                topic if topic == left => right,
                topic if topic == right => left,
                _ => return None,
            };
            (!self.owned.contains_key(&(partner.to_string(), *partition))).then(|| (topic.clone(), *partition, partner))
        })?;
        Some(RuntimeError::Fatal(format!(
            "the join runs in place (both sources are partitioned_by its key), so partition {partition} of {topic} \
             must come with partition {partition} of {missing}, but the group assigned it alone: every member of \
             the consumer group must run the same pipeline file, with partition.assignment.strategy range"
        )))
    }

    /// Aborts the open batch; its partitions' state is rebuilt from the changelog.
    pub fn abort(&mut self, deadline: Option<Instant>) -> Result<Outcome, RuntimeError> {
        let outcome = self.transaction.abort(deadline)?;
        self.transaction.take_delivered();
        self.after_outcome(Some(&outcome));
        Ok(outcome)
    }

    fn after_outcome(&mut self, outcome: Option<&Outcome>) {
        if let Some(Outcome::Aborted { rewind }) = outcome {
            self.status.aborted(&format!("a batch was aborted; {} partitions are replayed from its first offsets", rewind.len()));
            // The aborted records changed in-memory state that was never committed.
            self.engine.take_counts();
            for (topic, partition, _) in rewind {
                self.engine.drop_input_partition(topic, *partition);
                self.queue_restore(topic, *partition);
            }
        }
        self.metrics_state_keys = self.engine.state_keys();
    }
}

impl ClientContext for LoopContext {
    fn stats(&self, statistics: Statistics) {
        let session = self.session();
        let mut max_lag = 0;
        for owned in session.owned.values() {
            // librdkafka's own consumer_lag is measured from the consumer's committed offset,
            // which it never sees move: weir commits offsets through the producer.
            let lag = statistics
                .topics
                .get(&owned.topic)
                .and_then(|topic| topic.partitions.get(&owned.partition))
                .and_then(|partition| {
                    let end = if partition.ls_offset >= 0 { partition.ls_offset } else { partition.hi_offset };
                    let position = if partition.app_offset >= 0 { partition.app_offset } else { partition.committed_offset };
                    (end >= 0 && position >= 0).then(|| (end - position).max(0))
                });
            if let Some(lag) = lag {
                self.metrics
                    .consumer_lag
                    .with_label_values(&[&owned.topic, &owned.partition.to_string()])
                    .set(lag);
                session.status.set_lag(&owned.topic, owned.partition, lag);
                max_lag = max_lag.max(lag);
            }
        }
        self.health.set_max_lag(max_lag);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(%error, reason, "consumer client error");
    }
}

impl ConsumerContext for LoopContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, error: RDKafkaRespErr, partitions: &mut TopicPartitionList) {
        match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.on_assign(consumer, partitions),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.on_revoke(consumer, partitions),
            other => {
                warn!(error = ?other, "rebalance failed; giving up the partitions in question");
                self.on_revoke(consumer, partitions);
            }
        }
    }
}

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
use super::purge::Purger;
use super::status::Status;
use super::store::StateStore;
use super::loop_state::{OutputTopics, OwnedPartition, LoopState};
use super::transaction::{BatchOutcome, BatchProducer};
use crate::runtime::TopicPartitionOffset;
use crate::engine::Engine;
use crate::config::{DataLossPolicy, DeliveryMode, StartingOffsets};
use crate::telemetry::metrics::Metrics;

/// How long an assignment may wait for committed offsets beyond the transaction timeout.
/// Under read_committed the broker holds the answer while the previous owner's
/// transactional offset commit is pending (KIP-447), which lasts at most the transaction
/// timeout (audit R12).
const COMMITTED_OFFSETS_SLACK: Duration = Duration::from_secs(30);
const COMMITTED_OFFSETS_AT_LEAST: Duration = Duration::from_secs(60);
const METADATA_TIMEOUT: Duration = Duration::from_secs(30);

pub struct LoopContext {
    session: Mutex<LoopState>,
    starting_offsets: StartingOffsets,
    on_data_loss: DataLossPolicy,
    until_end: bool,
    /// How long an assignment waits for its committed offsets (see `COMMITTED_OFFSETS_SLACK`).
    committed_offsets_timeout: Duration,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl LoopContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        transaction: BatchProducer,
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
        let committed_offsets_timeout = (transaction.transaction_timeout() + COMMITTED_OFFSETS_SLACK).max(COMMITTED_OFFSETS_AT_LEAST);
        LoopContext {
            session: Mutex::new(LoopState {
                transaction,
                engine,
                topics,
                store,
                pending_restore: Vec::new(),
                owned: BTreeMap::new(),
                failure: None,
                rewind: Vec::new(),
                abandoned: false,
                hand_over: HandOver::Idle,
                metrics_state_keys: 0,
                status,
                metrics: metrics.clone(),
                purger,
            }),
            starting_offsets,
            on_data_loss,
            until_end,
            committed_offsets_timeout,
            metrics,
            health,
        }
    }

    pub fn session(&self) -> MutexGuard<'_, LoopState> {
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
                session.commit(consumer, None).map(|outcome| outcome.unwrap_or(BatchOutcome::Committed { records: 0 }))
            };
            match outcome {
                Ok(BatchOutcome::Committed { records }) => info!(records, "committed the open batch before giving up partitions"),
                Ok(BatchOutcome::Aborted { rewind }) => session.rewind.extend(rewind),
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
            session.rewind.retain(|position| !position.is_in(&key.0, key.1));
            self.metrics.forget_partition(element.topic(), element.partition());
        }
        let owned = session.owned.len();
        drop(session);
        self.metrics.rebalances.with_label_values(&[if lost { "lost" } else { "revoke" }]).inc();
        self.metrics.assigned_partitions.set(owned as i64);
        self.health.set_assigned(owned);
        info!(revoked = revoked.count(), lost, owned, "partitions revoked");
        // A join run in place uses the eager range assignor (see `clients::consumer_config`).
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let unassigned = match cooperative {
            true => consumer.incremental_unassign(revoked),
            false => consumer.unassign(),
        };
        if let Err(error) = unassigned {
            warn!(%error, "unassign failed");
        }
        // Cooperatively, the partitions reach their new owner only in a second round, which
        // this member starts by joining again once it has taken this round's assignment
        // (see `HandOver`).
        if cooperative && !lost && revoked.count() > 0 {
            self.session().hand_over = HandOver::Revoked;
        }
        #[cfg(feature = "failpoints")]
        if fail::eval("revoked", |_| ()).is_some() {
            self.session().failure = Some(RuntimeError::Replay("fail point `revoked`: the run stops right after a revocation".into()));
        }
    }

    fn on_assign(&self, consumer: &BaseConsumer<LoopContext>, assigned: &mut TopicPartitionList) {
        let abandoned = {
            let mut session = self.session();
            session.hand_over = session.hand_over.after_assign();
            session.abandoned
        };
        if abandoned {
            // The run has stopped and only waits for the group to finish handing over what it
            // gave up (`finish_hand_over`): these partitions are the next run's to take.
            take_assignment(consumer, assigned, "while stopping");
            return;
        }
        let owned = match self.prepare_assignment(consumer, assigned) {
            Ok(owned) => owned,
            Err(error) => {
                self.session().failure = Some(error);
                // The run stops on the failure, but librdkafka goes on with the rebalance only
                // once the assignment is taken (after a cooperative revocation it rejoins then,
                // which hands the partitions given up to their new owner): take it, unread.
                take_assignment(consumer, assigned, "after a failed assignment");
                return;
            }
        };
        if let Err(error) = assign(consumer, assigned) {
            self.session().failure = Some(RuntimeError::kafka("assigning partitions failed", error));
            return;
        }
        self.metrics.rebalances.with_label_values(&["assign"]).inc();
        self.metrics.assigned_partitions.set(owned as i64);
        self.health.set_assigned(owned);
        info!(assigned = assigned.count(), owned, "partitions assigned");
    }

    /// Gives each newly assigned partition its start and takes it into the session (its state
    /// to restore, its status). Returns how many partitions the session owns now.
    fn prepare_assignment(&self, consumer: &BaseConsumer<LoopContext>, assigned: &mut TopicPartitionList) -> Result<usize, RuntimeError> {
        let pinned_starts = self.set_start_positions(consumer, assigned)?;
        let mut session = self.session();
        for TopicPartitionOffset { topic, partition, offset } in pinned_starts {
            info!(topic, partition, offset, "no committed offset: starting at the end, committed as this partition's start");
            session.transaction.pin_start(&topic, partition, offset);
        }
        for element in assigned.elements() {
            let bounds_at_start = match self.until_end {
                true => Some(consumer.fetch_watermarks(element.topic(), element.partition(), METADATA_TIMEOUT).map_err(|error| {
                    RuntimeError::kafka(format!("reading the end offset of {}[{}]", element.topic(), element.partition()), error)
                })?),
                false => None,
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
        match session.unpaired_partition() {
            Some(unpaired) => Err(unpaired),
            None => Ok(session.owned.len()),
        }
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
            .map_err(|error| RuntimeError::kafka(format!("reading the start offset of {topic}[{partition}]"), error))?;
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
        let (DeliveryMode::IdempotentUpsert, Some(store)) = (session.transaction.mode(), &session.store) else {
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
                        .map_err(|error| RuntimeError::kafka(format!("reading the start of {}[{}]", element.topic(), element.partition()), error))?;
                    if offset <= low {
                        continue;
                    }
                    return Err(RuntimeError::Setup(format!(
                        "{}[{}] was read up to offset {offset} by this pipeline, but its state is not in this instance's \
                         state store: in mode idempotent_upsert state lives only in the store of the instance that built it. \
                         Give the instance its state volume back, or start over with `weir reset --state --to-earliest --execute`",
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
    /// partition's end, which must be committed (see `BatchProducer::pin_start`).
    fn set_start_positions(
        &self,
        consumer: &BaseConsumer<LoopContext>,
        assigned: &mut TopicPartitionList,
    ) -> Result<Vec<TopicPartitionOffset>, RuntimeError> {
        let mut pinned_starts = Vec::new();
        let committed = consumer
            .committed_offsets(assigned.clone(), self.committed_offsets_timeout)
            .map_err(|error| RuntimeError::kafka("reading committed offsets", error))?;
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
                        pinned_starts.push(TopicPartitionOffset::new(element.topic(), element.partition(), end));
                        Offset::Offset(end)
                    }
                    StartingOffsets::Timestamp(millis) => {
                        by_time
                            .add_partition_offset(element.topic(), element.partition(), Offset::Offset(millis))
                            .map_err(|error| RuntimeError::kafka(format!("setting the start of {}[{}]", element.topic(), element.partition()), error))?;
                        continue;
                    }
                },
            };
            assigned
                .set_partition_offset(element.topic(), element.partition(), start)
                .map_err(|error| RuntimeError::kafka(format!("setting the start of {}[{}]", element.topic(), element.partition()), error))?;
        }
        if by_time.count() > 0 {
            let found = consumer
                .offsets_for_times(by_time, METADATA_TIMEOUT)
                .map_err(|error| RuntimeError::kafka("looking up offsets by timestamp", error))?;
            for element in found.elements() {
                // No record at or after the time: start at the end.
                let start = match element.offset() {
                    Offset::Offset(offset) if offset >= 0 => offset,
                    _ => {
                        let end = self.end_offset(consumer, element.topic(), element.partition())?;
                        pinned_starts.push(TopicPartitionOffset::new(element.topic(), element.partition(), end));
                        end
                    }
                };
                let start = Offset::Offset(start);
                assigned
                    .set_partition_offset(element.topic(), element.partition(), start)
                    .map_err(|error| RuntimeError::kafka(format!("setting the start of {}[{}]", element.topic(), element.partition()), error))?;
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
            .map_err(|error| RuntimeError::kafka(format!("reading the end offset of {topic}[{partition}]"), error))?;
        Ok(end)
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
        // Back in touch with the cluster once a broker connection is up again.
        if statistics.brokers.values().any(|broker| broker.nodeid >= 0 && broker.state == "UP") {
            self.health.set_cluster_unreachable(false);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // No broker answers: not ready until one does (see `stats`).
        self.health.note_client_error(&error);
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

/// Where this member is in handing partitions over after a cooperative revocation. The
/// revocation is followed by an assignment in the same round (often empty), after which
/// librdkafka joins again; the assignment of that second round is what gives the partitions
/// given up to their new owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    Idle,
    /// A commit found the group in a new generation: that round's callbacks (a revocation,
    /// an assignment) have not been served yet.
    Expected,
    /// Partitions were revoked; the assignment of the same round has not come yet.
    Revoked,
    /// That assignment came; the second round's has not.
    Rejoining,
}

impl HandOver {
    fn after_assign(self) -> HandOver {
        match self {
            HandOver::Revoked => HandOver::Rejoining,
            HandOver::Rejoining | HandOver::Expected | HandOver::Idle => HandOver::Idle,
        }
    }
}

/// Takes `assigned` as the group's protocol wants it: added to what is owned (cooperative),
/// or in place of it (eager, for a join run in place).
fn assign(consumer: &BaseConsumer<LoopContext>, assigned: &TopicPartitionList) -> rdkafka::error::KafkaResult<()> {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_assign(assigned),
        _ => consumer.assign(assigned),
    }
}

/// Takes `assigned` without reading it (the run is stopping): librdkafka waits for the call
/// before it goes on with the rebalance.
fn take_assignment(consumer: &BaseConsumer<LoopContext>, assigned: &TopicPartitionList, when: &str) {
    if let Err(error) = assign(consumer, assigned) {
        warn!(%error, when, "taking the assignment failed");
    }
}

/// Before a run that stopped on a fault closes its consumer: if it gave up partitions in a
/// cooperative rebalance whose second round has not assigned yet, or a commit found the group
/// in a generation whose callbacks have not been served, polls until that is done (at most
/// `limit`). The second round is what hands those partitions to their new owner, and this
/// member starts it by joining again after the first round's assignment. Closed before that,
/// a static member never sends it: its next run rejoins under the same `group.instance.id`,
/// the coordinator answers with the stored assignment without a new round, and the
/// partitions it gave up stay with nobody (seen: an instance that joined while the other's
/// batch aborted got none for good). If the group does not get there in time, the consumer
/// leaves the group (a static member's close does not), so that the coordinator assigns
/// afresh rather than handing the next run a stale share. Records polled meanwhile are
/// dropped unread; the next run starts from the committed offsets.
pub fn finish_hand_over(consumer: &BaseConsumer<LoopContext>, limit: Duration, shutdown: &tokio_util::sync::CancellationToken) {
    let handing_over = || consumer.context().session().hand_over != HandOver::Idle;
    if !handing_over() {
        return;
    }
    let started = Instant::now();
    info!("waiting for the group to hand over the partitions this run gave up before closing");
    while handing_over() {
        if shutdown.is_cancelled() {
            return;
        }
        if started.elapsed() >= limit {
            warn!(waited_ms = started.elapsed().as_millis() as u64, "the group did not finish handing over the partitions given up; leaving it");
            consumer.unsubscribe();
            let left = Instant::now();
            while left.elapsed() < Duration::from_secs(2) {
                super::health::beat();
                let _ = consumer.poll(Duration::from_millis(100));
            }
            return;
        }
        super::health::beat();
        let _ = consumer.poll(Duration::from_millis(100));
    }
    info!(waited_ms = started.elapsed().as_millis() as u64, "the group handed over the partitions this run gave up");
}

#[cfg(test)]
mod tests {
    use super::HandOver;

    #[test]
    fn a_hand_over_ends_with_the_assignment_that_follows_it() {
        // Gave partitions up: the same round's assignment, then the second round's.
        assert_eq!(HandOver::Revoked.after_assign(), HandOver::Rejoining);
        assert_eq!(HandOver::Rejoining.after_assign(), HandOver::Idle);
        // A commit met a new generation and nothing was revoked in it: its one assignment.
        assert_eq!(HandOver::Expected.after_assign(), HandOver::Idle);
        assert_eq!(HandOver::Idle.after_assign(), HandOver::Idle);
    }
}

//! The state the loop and the rebalance callbacks share ([`LoopState`]): the open
//! transaction, the engine, the store, the owned partitions and what the callbacks leave for
//! the loop. Only ever locked on the loop's thread. Committing and aborting it is the commit
//! path's business (`super::transaction`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use super::error::RuntimeError;
use super::rebalance::HandOver;
use super::purge::Purger;
use super::state::Changelogs;
use super::status::Status;
use super::store::StateStore;
use super::transaction::BatchProducer;
use crate::runtime::TopicPartitionOffset;
use crate::engine::{Destination, Engine};
use crate::telemetry::metrics::Metrics;

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
pub struct LoopState {
    pub transaction: BatchProducer,
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
    pub rewind: Vec<TopicPartitionOffset>,
    /// The loop stopped on an error: callbacks must not commit anything any more.
    pub abandoned: bool,
    /// Where this member is in handing over partitions it gave up in a cooperative rebalance.
    pub hand_over: HandOver,
    /// Keys and windows in state after the last commit, for the gauge.
    pub metrics_state_keys: usize,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    /// Deletes committed records from the repartition topics (pipelines that have them).
    pub purger: Option<Purger>,
}

/// Where outputs go.
#[derive(Debug, Clone)]
pub struct OutputTopics {
    /// Each output's sink topic, by output index.
    pub sinks: Vec<String>,
    pub dlq: String,
    pub changelogs: Changelogs,
    /// The repartition topic in front of each stage after the first.
    pub repartitions: BTreeMap<usize, String>,
}

impl OutputTopics {
    pub fn of(&self, destination: Destination) -> &str {
        match destination {
            Destination::Sink(output) => self.sinks.get(output).map_or("", String::as_str),
            Destination::Dlq => &self.dlq,
            Destination::Repartition(stage) => self.repartitions.get(&stage).map_or("", String::as_str),
        }
    }
}

impl LoopState {
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
    pub(super) fn note_idle_inputs(&mut self) {
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
    /// A walk over the owned partitions; the loop calls it when a batch is due or a poll
    /// found nothing.
    pub fn report_held_back_inputs(&mut self) {
        let depends_on_several = self.engine.stage_count() > 1 || self.engine.join_in_place().is_some();
        if !depends_on_several || self.engine.idle_timeout().is_some() {
            return;
        }
        let now = Instant::now();
        let LoopState { owned, engine, metrics, .. } = self;
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

    /// Keys or windows in state by stateful step: counted in memory, or, for a step that
    /// reads through the store, the store's count of its keys in the changelog partitions
    /// this instance owns.
    pub(super) fn state_keys_by_step(&self) -> std::collections::BTreeMap<usize, usize> {
        let mut keys = self.engine.state_keys_by_step();
        let Some(store) = &self.store else { return keys };
        // With a store, every stateful step reads through it.
        for (step, count) in keys.iter_mut() {
            let partitions: std::collections::BTreeSet<i32> = self
                .owned
                .keys()
                .filter(|(topic, partition)| {
                    let writers = self.engine.changelog_writers(*step, *partition);
                    // A source named by a pattern: its partitions write stage 0's changelogs.
                    writers.iter().any(|(writer, _)| writer == topic) || (writers.is_empty() && self.engine.stage_of_topic(topic).is_none())
                })
                .map(|(_, partition)| *partition)
                .collect();
            *count += partitions.iter().map(|partition| store.key_count(*step, *partition).unwrap_or(0) as usize).sum::<usize>();
        }
        keys
    }

    /// Counts the keys or windows in state (see [`Self::state_keys_by_step`]) once, into
    /// the per-step and total gauges and `metrics_state_keys` (for /status): after a commit
    /// or an abort, and after a restore (a restarted process shows its state before any
    /// new record).
    pub(super) fn publish_state_keys(&mut self) {
        let mut total = 0;
        for (step, keys) in self.state_keys_by_step() {
            self.metrics.step_state_keys.with_label_values(&[&step.to_string()]).set(keys as i64);
            total += keys;
        }
        self.metrics_state_keys = total;
        self.metrics.state_keys.set(total as i64);
    }

    /// Marks the state of the task `topic`'s partition feeds for rebuilding before its next
    /// record (a join's pair of partitions once).
    pub(super) fn queue_restore(&mut self, topic: &str, partition: i32) {
        let task = self.engine.task_input(topic, partition);
        if !self.pending_restore.contains(&task) {
            self.pending_restore.push(task);
        }
    }

    /// A join run in place needs partition p of both inputs in the same process. The range
    /// assignor gives them together when every member subscribes to both topics; a member
    /// running another pipeline file (a rolling change of `partitioned_by`) may not.
    pub(super) fn unpaired_partition(&self) -> Option<RuntimeError> {
        let (left, right) = self.engine.join_in_place()?;
        let (topic, partition, missing) = self.owned.keys().find_map(|(topic, partition)| {
            let partner = match topic.as_str() {
                topic if topic == left => right,
                topic if topic == right => left,
                _ => return None,
            };
            (!self.owned.contains_key(&(partner.to_string(), *partition))).then(|| (topic.clone(), *partition, partner))
        })?;
        Some(RuntimeError::Assignment(format!(
            "the join runs in place (both sources are partitioned_by its key), so partition {partition} of {topic} \
             must come with partition {partition} of {missing}, but the group assigned it alone: every member of \
             the consumer group must run the same pipeline file, with partition.assignment.strategy range"
        )))
    }
}

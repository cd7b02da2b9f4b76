//! The batch as a whole: what the batch end emits, the state changes for the changelogs,
//! the offsets and the transaction, then the store; or the abort and the replay.

use std::time::Instant;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use super::BatchOutcome;
use crate::runtime::TopicPartitionOffset;
use crate::config::DeliveryMode;
use crate::runtime::error::RuntimeError;
use crate::runtime::loop_state::LoopState;
use crate::runtime::rebalance::HandOver;
use crate::runtime::commit_writes;
use crate::runtime::store::StoreWrite;

impl LoopState {
    /// Commits the open batch: first what the batch end emits (update-mode windows) and the
    /// state changes for the changelogs, then the offsets and the transaction.
    pub fn commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        deadline: Option<Instant>,
    ) -> Result<Option<BatchOutcome>, RuntimeError> {
        let mut store_writes = Vec::new();
        if self.transaction.is_open() {
            self.note_idle_inputs();
            let mut outputs = Vec::new();
            self.engine.end_batch(&mut outputs)?;
            for output in &outputs {
                let topic = self.topics.of(output.destination).to_string();
                self.transaction
                    .send(&topic, output, None, 0)
                    .map_err(|error| RuntimeError::kafka(format!("producing to {topic}"), error))?;
            }
            store_writes = commit_writes::take(&mut self.engine);
            // Upsert mode keeps state in the local store alone, with the input offsets.
            if self.transaction.mode() == DeliveryMode::Transactional {
                for entry in commit_writes::changelog_entries(&store_writes) {
                    let Some(changelog) = self.topics.changelogs.topic(entry.step) else {
                        return Err(RuntimeError::Assignment(format!("no changelog for step {}", entry.step)));
                    };
                    self.transaction
                        .send_to_partition(changelog, entry.partition, &entry.key, entry.value.as_deref())
                        .map_err(|error| RuntimeError::kafka(format!("producing to {changelog}"), error))?;
                }
            }
            // A read the steps could not make: this batch saw a store it cannot trust.
            if let Some(failure) = self.store.as_ref().and_then(|store| store.failure()) {
                return Err(RuntimeError::store("processing the batch", failure));
            }
            let counts = self.engine.take_counts();
            self.transaction.add_counts(&counts);
        }
        let outcome = self.transaction.commit(consumer, deadline)?;
        if self.transaction.take_group_moved_on() && self.hand_over == HandOver::Idle {
            self.hand_over = HandOver::Expected;
        }
        let delivered = self.transaction.take_delivered();
        if let (Some(BatchOutcome::Committed { .. }), DeliveryMode::IdempotentUpsert) = (&outcome, self.transaction.mode()) {
            self.acknowledged(consumer, &store_writes)?;
        } else if let (Some(BatchOutcome::Committed { .. }), Some(store)) = (&outcome, &self.store) {
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
        if let (Some(BatchOutcome::Committed { .. }), Some(summary)) = (&outcome, self.transaction.take_summary()) {
            let watermarks = self.engine.input_watermarks();
            self.status.committed(&summary, self.metrics_state_keys, &watermarks);
            if let Some(purger) = &mut self.purger {
                for TopicPartitionOffset { topic, partition, offset: next } in &summary.offsets {
                    if self.engine.stage_of_topic(topic).is_some() {
                        purger.committed(topic, *partition, *next);
                    }
                }
                purger.maybe_purge(false);
            }
            self.metrics.record_watermarks(&watermarks);
            if let Some(store) = &self.store {
                let (hits, misses) = store.take_cache_counts();
                self.metrics.state_cache_hits.inc_by(hits);
                self.metrics.state_cache_misses.inc_by(misses);
                self.metrics.state_cache_bytes.set(store.cache_bytes() as i64);
            }
            if let Some(store) = &self.store {
                for step in self.engine.stateful_steps() {
                    if let Some(bytes) = store.live_bytes(step) {
                        self.metrics.step_state_bytes.with_label_values(&[&step.to_string()]).set(bytes as i64);
                    }
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
        for TopicPartitionOffset { topic, partition, offset: next } in &offsets {
            list.add_partition_offset(topic, *partition, Offset::Offset(*next))
                .map_err(|error| RuntimeError::kafka(format!("listing the offset of {topic}[{partition}]"), error))?;
        }
        if list.count() > 0
            && let Err(error) = consumer.commit(&list, rdkafka::consumer::CommitMode::Async)
        {
            warn!(%error, "committing offsets to the group (upsert mode; the store has them)");
        }
        Ok(())
    }

    /// Aborts the open batch; its partitions' state is rebuilt from the changelog.
    pub fn abort(&mut self, deadline: Option<Instant>) -> Result<BatchOutcome, RuntimeError> {
        let outcome = self.transaction.abort(deadline)?;
        self.transaction.take_delivered();
        self.after_outcome(Some(&outcome));
        Ok(outcome)
    }

    fn after_outcome(&mut self, outcome: Option<&BatchOutcome>) {
        if let Some(BatchOutcome::Aborted { rewind }) = outcome {
            self.status.aborted(&format!("a batch was aborted; {} partitions are replayed from its first offsets", rewind.len()));
            // The aborted records changed in-memory state that was never committed.
            self.engine.take_counts();
            for TopicPartitionOffset { topic, partition, .. } in rewind {
                self.engine.drop_input_partition(topic, *partition);
                self.queue_restore(topic, *partition);
            }
        }
        self.publish_state_keys();
    }
}


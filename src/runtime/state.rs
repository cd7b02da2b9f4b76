//! Crash-proof state: every stateful step has a compacted changelog topic,
//! `<pipeline>-<step>-changelog`, with as many partitions as the input; the state of the task
//! for input partition p lives in changelog partition p. A batch's state changes are produced
//! in the batch's transaction, so the changelog holds exactly the state of the committed
//! offsets. A partition's state is rebuilt from its changelog when the partition is assigned
//! and after an abort (which drops the aborted batch's in-memory changes).
//! (Keeping the state in RocksDB, so a restart reads only the changelog's tail, comes next.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use tracing::info;

use super::clients;
use super::error::RuntimeError;
use crate::config::Settings;
use crate::engine::{ChangelogEntry, Engine};
use crate::telemetry::metrics::Metrics;

/// The changelog topic of each stateful step.
#[derive(Debug, Clone, Default)]
pub struct Changelogs {
    topics: BTreeMap<usize, String>,
}

impl Changelogs {
    pub fn new(pipeline_name: &str, stateful_steps: &[usize]) -> Changelogs {
        Changelogs {
            topics: stateful_steps.iter().map(|step| (*step, format!("{pipeline_name}-{step}-changelog"))).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    pub fn topics(&self) -> impl Iterator<Item = &String> {
        self.topics.values()
    }

    pub fn topic(&self, step: usize) -> Option<&str> {
        self.topics.get(&step).map(String::as_str)
    }

    fn step(&self, topic: &str) -> Option<usize> {
        self.topics.iter().find(|(_, name)| name.as_str() == topic).map(|(step, _)| *step)
    }
}

/// The Kafka key and value of a changelog record: key `[input topic or null, state key]`
/// (what compaction keeps the last value of), value the state as JSON, or none to delete.
pub fn encode(entry: &ChangelogEntry) -> (Vec<u8>, Option<Vec<u8>>) {
    let key = Value::from(vec![
        entry.topic.clone().map_or(Value::Null, Value::String),
        Value::String(entry.key.clone()),
    ]);
    (key.to_string().into_bytes(), entry.value.as_ref().map(|value| value.to_string().into_bytes()))
}

fn decode(step: usize, partition: i32, key: &[u8], value: Option<&[u8]>) -> Result<ChangelogEntry, String> {
    let (topic, state_key): (Option<String>, String) =
        serde_json::from_slice(key).map_err(|error| format!("changelog key is not [topic, key]: {error}"))?;
    let value = match value {
        None => None,
        Some(bytes) => Some(serde_json::from_slice(bytes).map_err(|error| format!("changelog value is not JSON: {error}"))?),
    };
    Ok(ChangelogEntry { topic, partition, step, key: state_key, value })
}

/// Reads changelog partitions back into the engine.
pub struct Restorer {
    consumer: BaseConsumer,
    changelogs: Changelogs,
    metrics: Arc<Metrics>,
    /// How long an open transaction (of a crashed process) may hold the end of a changelog.
    patience: Duration,
}

impl Restorer {
    pub fn new(settings: &Settings, pipeline_name: &str, changelogs: Changelogs, metrics: Arc<Metrics>) -> Result<Restorer, RuntimeError> {
        let mut config = clients::admin_config(settings);
        config
            // librdkafka's assign needs a group id; this consumer never joins or commits.
            .set("group.id", format!("{pipeline_name}-state-restore"))
            // Only committed state: an aborted batch's changes must never come back.
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false");
        let consumer = config
            .create()
            .map_err(|error| RuntimeError::Setup(format!("creating the changelog reader: {error}")))?;
        Ok(Restorer { consumer, changelogs, metrics, patience: settings.kafka.transaction_timeout * 3 + Duration::from_secs(30) })
    }

    /// Rebuilds the state of input partition (`topic`, `partition`) from its changelogs.
    pub fn restore(&self, engine: &mut Engine, topic: &str, partition: i32) -> Result<u64, RuntimeError> {
        let started = Instant::now();
        let mut assignment = TopicPartitionList::new();
        let mut ends = Vec::new();
        for changelog in self.changelogs.topics() {
            let (low, high) = self
                .consumer
                .fetch_watermarks(changelog, partition, Duration::from_secs(30))
                .map_err(|error| RuntimeError::Fatal(format!("reading the end of {changelog}[{partition}]: {error}")))?;
            if high > low {
                assignment
                    .add_partition_offset(changelog, partition, Offset::Beginning)
                    .map_err(|error| RuntimeError::Fatal(error.to_string()))?;
                ends.push((changelog.clone(), high));
            }
        }
        engine.drop_input_partition(topic, partition);
        if ends.is_empty() {
            return Ok(0);
        }
        self.consumer
            .assign(&assignment)
            .map_err(|error| RuntimeError::Fatal(format!("assigning changelogs: {error}")))?;
        let mut restored = 0u64;
        let deadline = Instant::now() + self.patience;
        loop {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    let step = self.changelogs.step(message.topic()).unwrap_or(usize::MAX);
                    let entry = decode(step, partition, message.key().unwrap_or_default(), message.payload())
                        .map_err(|error| RuntimeError::Fatal(format!("{}[{partition}]@{}: {error}", message.topic(), message.offset())))?;
                    // Several input topics share changelog partition numbers.
                    if entry.topic.as_deref() == Some(topic) {
                        engine.restore(&entry).map_err(|error| RuntimeError::Fatal(format!("restoring state: {error}")))?;
                        restored += 1;
                    }
                    continue;
                }
                Some(Err(error)) => return Err(RuntimeError::Fatal(format!("reading a changelog: {error}"))),
                None => {}
            }
            // Positions move past transaction markers; under read_committed they stop at the
            // last stable offset, so this waits for any open transaction to end.
            let positions = self.consumer.position().map_err(|error| RuntimeError::Fatal(error.to_string()))?;
            let done = ends.iter().all(|(changelog, end)| {
                matches!(positions.find_partition(changelog, partition).map(|element| element.offset()),
                    Some(Offset::Offset(position)) if position >= *end)
            });
            if done {
                break;
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::Fatal(format!(
                    "restoring {topic}[{partition}] did not reach the end of its changelog in {:?}; an open transaction may hold it",
                    self.patience
                )));
            }
        }
        let _ = self.consumer.unassign();
        self.metrics.state_restored_records.inc_by(restored);
        info!(%topic, partition, restored, elapsed_ms = started.elapsed().as_millis() as u64, "restored state from the changelog");
        Ok(restored)
    }
}

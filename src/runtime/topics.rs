//! Topic checks before the loop starts: the source and sink topics must exist (weir does not
//! guess their partition counts or retention); the DLQ topic is created when missing, with
//! the broker's defaults and as many partitions as the first source topic; the internal
//! topics (changelogs, repartition topics) are created with the source's partition count.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use tracing::info;

use super::backoff::Backoff;
use super::clients;
use super::state::Changelogs;
use super::error::RuntimeError;
use crate::config::Settings;
use crate::plan::Pipeline;
use crate::engine::Engine;

const METADATA_TIMEOUT: Duration = Duration::from_secs(30);

/// A changelog keeps the last value per key; tombstones are kept 24 hours (set here, not
/// left to the cluster's `log.cleaner.delete.retention.ms`, which may be far shorter): a
/// local store older than the tombstones' retention may have missed deletions, so the store
/// is trusted for half of it (see `state::store_trusted_for`).
const CHANGELOG_CONFIG: &[(&str, &str)] = &[("cleanup.policy", "compact"), ("delete.retention.ms", "86400000")];
const REPARTITION_CONFIG: &[(&str, &str)] = &[("cleanup.policy", "delete")];

/// How long a missing source or sink topic is looked for before weir gives up.
const MISSING_TOPIC_PATIENCE: Duration = Duration::from_secs(5);

/// How the input is laid out, as far as repartitioning cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLayout {
    /// Partitions per source topic (they must agree for stateful steps).
    pub partitions: i32,
    /// Partitions over all source topics.
    pub total: usize,
}

pub fn prepare(
    settings: &Settings,
    pipeline: &Pipeline,
    engine: &Engine,
    changelogs: &Changelogs,
    repartitions: &[String],
) -> Result<Option<InputLayout>, RuntimeError> {
    let client: BaseConsumer = clients::admin_config(settings)
        .create()
        .map_err(|error| RuntimeError::Setup(format!("creating a metadata client: {error}")))?;
    // A topic created just before weir started may take a moment to show in a broker's
    // metadata: missing topics are looked for again for a few seconds.
    // The partition count of each source topic (a pattern's are not known up front).
    let topics = pipeline.input_topics();
    let deadline = Instant::now() + MISSING_TOPIC_PATIENCE;
    let mut pauses = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    let (missing, counts) = loop {
        let mut missing = Vec::new();
        let mut counts = Vec::new();
        for topic in topics.iter().flatten() {
            match partition_count(&client, topic)? {
                Some(count) => counts.push(count),
                None => missing.push(format!("source topic '{topic}'")),
            }
        }
        for sink in pipeline.sinks() {
            if partition_count(&client, &sink.topic)?.is_none() {
                missing.push(format!("sink topic '{}'", sink.topic));
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break (missing, counts);
        }
        std::thread::sleep(pauses.pause());
    };
    if !missing.is_empty() {
        return Err(RuntimeError::Setup(format!(
            "{} do{} not exist on {}; create {} first",
            missing.join(" and "),
            if missing.len() == 1 { "es" } else { "" },
            settings.kafka.bootstrap_servers,
            if missing.len() == 1 { "it" } else { "them" },
        )));
    }
    if partition_count(&client, &pipeline.dlq_topic)?.is_none() {
        create_topic(settings, &client, &pipeline.dlq_topic, counts.first().copied().unwrap_or(1), &[])?;
    }
    if changelogs.is_empty() && repartitions.is_empty() {
        return Ok(None);
    }
    // State of input partition p lives in changelog partition p, so with state in the input
    // partitions' tasks every source topic must have the same partition count. A
    // repartitioned task p reads repartition partition p and keeps its state in changelog
    // partition p: the internal topics have the largest count.
    let Some(topics) = topics else {
        return Err(RuntimeError::Setup("stateful steps need a source with a topic list, not a pattern".into()));
    };
    let partitions = counts.iter().copied().max().unwrap_or(1);
    if counts.iter().any(|count| *count != partitions) {
        let listed: Vec<String> = topics.iter().zip(&counts).map(|(topic, count)| format!("{topic} has {count}")).collect();
        if let Some((left, right)) = engine.join_in_place() {
            return Err(RuntimeError::Setup(format!(
                "the join's sources are declared co-partitioned (the same partitioned_by on both), but {}: equal keys \
                 land in differently numbered partitions ({left} and {right} would need the same count). Give them the \
                 same partition count, or drop partitioned_by from one source so that the join repartitions",
                listed.join(" and ")
            )));
        }
        if engine.has_input_state() {
            return Err(RuntimeError::Setup(format!(
                "the source topics have different partition counts ({}); steps that keep state in the input \
                 partitions' tasks need them equal",
                listed.join(", ")
            )));
        }
    }
    // A changelog takes every record the producer may send: a cluster whose default
    // max.message.bytes is lower would otherwise refuse a state entry weir let through
    // (and one whose default is higher gains nothing, as the producer's limit holds).
    let message_max_bytes = clients::producer_message_max_bytes(settings).to_string();
    let changelog_config: Vec<(&str, &str)> =
        CHANGELOG_CONFIG.iter().copied().chain([("max.message.bytes", message_max_bytes.as_str())]).collect();
    let internal = changelogs
        .topics()
        .map(|topic| (topic.as_str(), "changelog", changelog_config.as_slice()))
        .chain(repartitions.iter().map(|topic| (topic.as_str(), "repartition topic", REPARTITION_CONFIG)));
    for (topic, kind, config) in internal {
        match partition_count(&client, topic)? {
            None => create_topic(settings, &client, topic, partitions, config)?,
            Some(count) if count == partitions => {}
            Some(count) => {
                return Err(RuntimeError::Setup(format!(
                    "{kind} {topic} has {count} partitions but the input has {partitions}; \
                     its state no longer matches the input's partitions (reset the state or use a new pipeline name)"
                )));
            }
        }
    }
    Ok(Some(InputLayout { partitions, total: counts.iter().map(|count| *count as usize).sum() }))
}

/// Creates `topic` unless it exists.
pub fn ensure_topic(settings: &Settings, topic: &str, partitions: i32, config: &[(&str, &str)]) -> Result<(), RuntimeError> {
    let client: BaseConsumer = clients::admin_config(settings)
        .create()
        .map_err(|error| RuntimeError::Setup(format!("creating a metadata client: {error}")))?;
    if partition_count(&client, topic)?.is_none() {
        create_topic(settings, &client, topic, partitions, config)?;
    }
    Ok(())
}

/// Whether `topic` exists.
pub fn exists(settings: &Settings, topic: &str) -> Result<bool, RuntimeError> {
    let client: BaseConsumer = clients::admin_config(settings)
        .create()
        .map_err(|error| RuntimeError::Setup(format!("creating a metadata client: {error}")))?;
    Ok(partition_count(&client, topic)?.is_some())
}

fn partition_count(client: &BaseConsumer, topic: &str) -> Result<Option<i32>, RuntimeError> {
    let metadata: Metadata = client
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .map_err(|error| RuntimeError::kafka(format!("reading metadata of topic '{topic}'"), error))?;
    let Some(found) = metadata.topics().iter().find(|found| found.name() == topic) else {
        return Ok(None);
    };
    match found.error() {
        None => Ok(Some(found.partitions().len() as i32)),
        Some(error) if RDKafkaErrorCode::from(error) == RDKafkaErrorCode::UnknownTopicOrPartition => Ok(None),
        Some(error) => Err(RuntimeError::kafka(format!("reading metadata of topic '{topic}'"), KafkaError::MetadataFetch(RDKafkaErrorCode::from(error)))),
    }
}

/// Creates `topic`, then waits until `client`'s metadata shows it.
fn create_topic(
    settings: &Settings,
    client: &BaseConsumer,
    topic: &str,
    partitions: i32,
    config: &[(&str, &str)],
) -> Result<(), RuntimeError> {
    let admin: AdminClient<DefaultClientContext> = clients::admin_config(settings)
        .create()
        .map_err(|error| RuntimeError::Setup(format!("creating an admin client: {error}")))?;
    // -1: the broker's default replication factor.
    let replication = settings.kafka.replication_factor.unwrap_or(-1);
    let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    // The user's configs first, then what this kind of topic needs (which wins).
    let mut configs: std::collections::BTreeMap<&str, &str> = settings.kafka.topic_configs.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect();
    configs.extend(config.iter().copied());
    for (key, value) in configs {
        new_topic = new_topic.set(key, value);
    }
    let options = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| RuntimeError::Setup("topic creation needs the tokio runtime".into()))?;
    let results = runtime
        .block_on(admin.create_topics([&new_topic], &options))
        .map_err(|error| RuntimeError::kafka(format!("creating topic '{topic}'"), error))?;
    for result in results {
        match result {
            Ok(_) => info!(topic, partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(RuntimeError::kafka(format!("creating topic '{name}'"), KafkaError::AdminOp(code)));
            }
        }
    }
    // The controller has the topic; a broker's metadata may not show it for a moment, and
    // reading it before then fails with an unknown partition.
    let deadline = Instant::now() + METADATA_TIMEOUT;
    let mut pauses = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    while partition_count(client, topic)?.is_none_or(|count| count < partitions) {
        if Instant::now() > deadline {
            return Err(RuntimeError::TimedOut { action: format!("waiting for the metadata of the new topic '{topic}'"), waited: METADATA_TIMEOUT });
        }
        std::thread::sleep(pauses.pause());
    }
    Ok(())
}

/// The `max.message.bytes` of each of `topics` (the sink and the DLQ): the broker refuses a
/// record batch over it, for every record in it, so the producer must stay under it.
pub fn max_message_bytes(settings: &Settings, topics: &[&str]) -> Result<Vec<(String, usize)>, RuntimeError> {
    topic_config(settings, topics, "max.message.bytes")
}

/// The effective `delete.retention.ms` of each of `topics` (the changelogs): how long
/// compaction keeps a tombstone.
pub fn delete_retention(settings: &Settings, topics: &[&str]) -> Result<Vec<(String, Duration)>, RuntimeError> {
    let found: Vec<(String, u64)> = topic_config(settings, topics, "delete.retention.ms")?;
    Ok(found.into_iter().map(|(topic, millis)| (topic, Duration::from_millis(millis))).collect())
}

/// One config value of each of `topics`, where it is set and parses (the broker's default
/// counts: describe_configs gives the effective value).
fn topic_config<T: std::str::FromStr>(settings: &Settings, topics: &[&str], name: &str) -> Result<Vec<(String, T)>, RuntimeError> {
    let admin: AdminClient<DefaultClientContext> = clients::admin_config(settings)
        .create()
        .map_err(|error| RuntimeError::Setup(format!("creating an admin client: {error}")))?;
    let specifiers: Vec<ResourceSpecifier<'_>> = topics.iter().map(|topic| ResourceSpecifier::Topic(topic)).collect();
    let options = AdminOptions::new().request_timeout(Some(METADATA_TIMEOUT));
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| RuntimeError::Setup("reading topic configs needs the tokio runtime".into()))?;
    let results = runtime
        .block_on(admin.describe_configs(&specifiers, &options))
        .map_err(|error| RuntimeError::kafka(format!("reading the configs of {topics:?}"), error))?;
    let mut values = Vec::new();
    for (topic, result) in topics.iter().zip(results) {
        let resource = result.map_err(|code| RuntimeError::kafka(format!("reading the config of topic '{topic}'"), KafkaError::AdminOp(code)))?;
        let value = resource.get(name).and_then(|entry| entry.value.as_deref()).and_then(|value| value.parse().ok());
        if let Some(value) = value {
            values.push((topic.to_string(), value));
        }
    }
    Ok(values)
}

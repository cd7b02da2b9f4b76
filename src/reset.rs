//! `weir reset`: `--state` drops a pipeline's state (its changelog and repartition topics
//! and step definitions); `--to-earliest`, `--to-latest`, `--to-datetime` and
//! `--by-duration` move its committed source offsets. [`plan`] finds what a reset would do
//! and changes nothing (the dry run); [`execute`] does it, and refuses while any process
//! of the pipeline is still a member of its consumer group.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::plan::Loaded;
use crate::engine::Engine;
use crate::runtime::backoff::Backoff;
use crate::runtime::{clients, definitions, RuntimeError, TopicPartitionOffset};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Where `reset_offsets` moves the committed offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetTarget {
    Earliest,
    /// The end of each partition: what is there now is skipped.
    Latest,
    /// The first record at or after this time (epoch millis).
    Time(i64),
}

/// Why a reset did not happen (or not all of it).
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// Instances of the pipeline still run: a reset under them would be undone.
    #[error("{0}")]
    GroupActive(String),
    /// What the reset needs is not there (a topic list, a topic, a deletion).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Setup(#[from] crate::engine::SetupError),
    /// A call to the cluster failed (`RuntimeError::Kafka`), or the connection check did.
    #[error("{0}")]
    Runtime(#[from] RuntimeError),
}

/// What a reset would do, found without changing anything.
#[derive(Debug)]
pub struct ResetPlan {
    /// Members of the pipeline's consumer group now (`execute` waits for none).
    pub live_members: usize,
    /// The state topics that exist and would be deleted.
    pub state_topics: Vec<String>,
    /// Where the committed offsets would go.
    pub offsets: Vec<OffsetMove>,
}

/// One partition's committed offset, and the one a reset commits instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetMove {
    pub topic: String,
    pub partition: i32,
    /// None: the group has committed nothing for it.
    pub committed: Option<i64>,
    pub next: i64,
}

/// Finds what a reset would do: the state topics (with `state`, or any `target`: replayed
/// input over old state would be dropped as duplicates or late) and the offsets `target`
/// names. Changes nothing.
pub fn plan(loaded: &Loaded, state: bool, target: Option<OffsetTarget>) -> Result<ResetPlan, ResetError> {
    let client: BaseConsumer = clients::admin_config(&loaded.settings).create().map_err(|error| RuntimeError::kafka("creating a Kafka client", error))?;
    let live_members = live_members(&client, &loaded.pipeline.name)?;
    let state_topics = match state || target.is_some() {
        true => state_topics(loaded)?,
        false => Vec::new(),
    };
    let offsets = match target {
        Some(target) => offset_moves(loaded, target)?,
        None => Vec::new(),
    };
    Ok(ResetPlan { live_members, state_topics, offsets })
}

/// Does the reset: waits for the group to empty (or refuses), then finds what to do as
/// [`plan`] does (the offsets a target names are read once nobody reads any more), deletes
/// the state topics first (offsets moved over old state would replay into it) and commits
/// the new offsets. Returns what it did.
pub fn execute(loaded: &Loaded, state: bool, target: Option<OffsetTarget>) -> Result<ResetPlan, ResetError> {
    wait_for_an_empty_group(loaded)?;
    let plan = plan(loaded, state, target)?;
    delete_topics(loaded, &plan.state_topics)?;
    commit_offsets(loaded, &plan.offsets)?;
    Ok(plan)
}

/// Waits for the pipeline's consumer group to have no members. A stopped instance stays a
/// static member until its session times out, so that long is waited out before deciding
/// that an instance is still running.
fn wait_for_an_empty_group(loaded: &Loaded) -> Result<(), ResetError> {
    let Loaded { settings, pipeline } = loaded;
    let client: BaseConsumer = clients::admin_config(&loaded.settings).create().map_err(|error| RuntimeError::kafka("creating a Kafka client", error))?;
    let patience = Instant::now() + settings.kafka.session_timeout + Duration::from_secs(5);
    let mut members = live_members(&client, &pipeline.name)?;
    if members > 0 {
        eprintln!(
            "weir: waiting up to {} for the members of group {} to leave",
            humantime::format_duration(settings.kafka.session_timeout),
            pipeline.name
        );
    }
    let mut pauses = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
    while members > 0 && Instant::now() < patience {
        std::thread::sleep(pauses.pause());
        members = live_members(&client, &pipeline.name)?;
    }
    if members > 0 {
        return Err(ResetError::GroupActive(format!(
            "consumer group {} still has {members} live member(s): stop every instance of the pipeline first",
            pipeline.name
        )));
    }
    Ok(())
}

/// A client of the pipeline's group, to read and commit its offsets (it never joins).
fn group_client(loaded: &Loaded) -> Result<BaseConsumer, ResetError> {
    Ok(clients::admin_config(&loaded.settings)
        .set("group.id", &loaded.pipeline.name)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|error| RuntimeError::kafka("creating a Kafka client", error))?)
}

/// The offsets `target` names on every partition of the source topics, beside the ones the
/// group has committed.
fn offset_moves(loaded: &Loaded, target: OffsetTarget) -> Result<Vec<OffsetMove>, ResetError> {
    let pipeline = &loaded.pipeline;
    let Some(topics) = pipeline.input_topics() else {
        return Err(ResetError::Refused("resetting offsets needs a source with a topic list, not a pattern".into()));
    };
    let consumer = group_client(loaded)?;
    let mut chosen = Vec::new();
    for topic in &topics {
        let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT).map_err(|error| RuntimeError::kafka(format!("reading metadata of {topic}"), error))?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|found| found.name() == topic && found.error().is_none())
            .map(|found| found.partitions().len() as i32)
            .ok_or_else(|| ResetError::Refused(format!("source topic {topic} does not exist")))?;
        for partition in 0..partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, TIMEOUT)
                .map_err(|error| RuntimeError::kafka(format!("reading the offsets of {topic}[{partition}]"), error))?;
            let offset = match target {
                OffsetTarget::Earliest => low,
                OffsetTarget::Latest => high,
                OffsetTarget::Time(millis) => {
                    let mut query = TopicPartitionList::new();
                    query.add_partition_offset(topic, partition, Offset::Offset(millis)).map_err(|error| RuntimeError::kafka("listing offsets", error))?;
                    let found = consumer
                        .offsets_for_times(query, TIMEOUT)
                        .map_err(|error| RuntimeError::kafka(format!("looking up {topic}[{partition}] by time"), error))?;
                    match found.find_partition(topic, partition).map(|element| element.offset()) {
                        Some(Offset::Offset(offset)) if offset >= 0 => offset,
                        // No record at or after the time.
                        _ => high,
                    }
                }
            };
            chosen.push(TopicPartitionOffset::new(topic.clone(), partition, offset));
        }
    }
    let mut list = TopicPartitionList::new();
    for TopicPartitionOffset { topic, partition, .. } in &chosen {
        list.add_partition(topic, *partition);
    }
    let committed = consumer
        .committed_offsets(list, TIMEOUT)
        .map_err(|error| RuntimeError::kafka(format!("reading the committed offsets of group {}", pipeline.name), error))?;
    Ok(chosen
        .into_iter()
        .map(|TopicPartitionOffset { topic, partition, offset }| {
            let committed = match committed.find_partition(&topic, partition).map(|element| element.offset()) {
                Some(Offset::Offset(offset)) => Some(offset),
                _ => None,
            };
            OffsetMove { topic, partition, committed, next: offset }
        })
        .collect())
}

/// Commits the new offsets for the pipeline's group.
fn commit_offsets(loaded: &Loaded, moves: &[OffsetMove]) -> Result<(), ResetError> {
    if moves.is_empty() {
        return Ok(());
    }
    let mut list = TopicPartitionList::new();
    for OffsetMove { topic, partition, next, .. } in moves {
        list.add_partition_offset(topic, *partition, Offset::Offset(*next)).map_err(|error| RuntimeError::kafka("listing offsets", error))?;
    }
    group_client(loaded)?
        .commit(&list, CommitMode::Sync)
        .map_err(|error| RuntimeError::kafka(format!("committing the new offsets of group {}", loaded.pipeline.name), error))?;
    Ok(())
}

/// The state topics of the pipeline that exist. Records in flight between stages (in
/// repartition topics) belong to the old state and go with it.
fn state_topics(loaded: &Loaded) -> Result<Vec<String>, ResetError> {
    let Loaded { pipeline, .. } = loaded;
    let engine = Engine::new(pipeline)?;
    let client: BaseConsumer = clients::admin_config(&loaded.settings).create().map_err(|error| RuntimeError::kafka("creating a Kafka client", error))?;

    let mut candidates: Vec<String> = engine
        .stateful_steps()
        .into_iter()
        .map(|step| format!("{}-{step}-changelog", pipeline.name))
        .collect();
    candidates.extend(engine.repartition_topics().into_iter().map(|(_, topic)| topic));
    candidates.push(definitions::topic_name(&pipeline.name));
    Ok(candidates.into_iter().filter(|topic| exists(&client, topic)).collect())
}

/// Deletes `existing` and waits until they are gone.
fn delete_topics(loaded: &Loaded, existing: &[String]) -> Result<(), ResetError> {
    if existing.is_empty() {
        return Ok(());
    }
    let config = clients::admin_config(&loaded.settings);
    let client: BaseConsumer = config.create().map_err(|error| RuntimeError::kafka("creating a Kafka client", error))?;
    let admin: AdminClient<DefaultClientContext> = config.create().map_err(|error| RuntimeError::kafka("creating an admin client", error))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| ResetError::Refused(format!("starting a runtime: {error}")))?;
    let names: Vec<&str> = existing.iter().map(String::as_str).collect();
    let results = runtime
        .block_on(admin.delete_topics(&names, &AdminOptions::new().operation_timeout(Some(TIMEOUT))))
        .map_err(|error| RuntimeError::kafka(format!("deleting {names:?}"), error))?;
    for result in results {
        result.map_err(|(topic, code)| ResetError::Refused(format!("deleting {topic}: {code}")))?;
    }
    // Deletion completes in the background; the next run must not find the old topics.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pauses = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    while existing.iter().any(|topic| exists(&client, topic)) {
        if Instant::now() > deadline {
            return Err(ResetError::Refused(format!("the topics {existing:?} were not gone within a minute")));
        }
        std::thread::sleep(pauses.pause());
    }
    Ok(())
}

fn live_members(client: &BaseConsumer, group: &str) -> Result<usize, ResetError> {
    let groups = client
        .fetch_group_list(Some(group), TIMEOUT)
        .map_err(|error| RuntimeError::kafka(format!("describing consumer group {group}"), error))?;
    Ok(groups.groups().iter().map(|group| group.members().len()).sum())
}

fn exists(client: &BaseConsumer, topic: &str) -> bool {
    client
        .fetch_metadata(Some(topic), TIMEOUT)
        .map(|metadata| metadata.topics().iter().any(|found| found.name() == topic && found.error().is_none()))
        .unwrap_or(false)
}

//! Upgrade safety: the definition of every stateful step is kept in a compacted topic,
//! `<pipeline>-definitions` (key: the step's index, value: its definition). On start, before
//! anything is read, a pipeline whose stateful steps differ from the ones that wrote the state
//! is refused with what changed, instead of reading state in a layout it does not have.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::info;

use super::clients;
use super::error::RuntimeError;
use crate::config::Settings;
use crate::plan::Pipeline;

const TIMEOUT: Duration = Duration::from_secs(30);

pub fn topic_name(pipeline_name: &str) -> String {
    format!("{pipeline_name}-definitions")
}

/// The key of the state generation: an id made when the state starts from nothing, so that
/// local caches of an older generation (before a `weir reset --state`) are thrown away.
/// Written as `generation/<id>`, so that compaction keeps every one written: instances that
/// start together on a fresh pipeline may each write one, and all take the first (R23).
/// Earlier versions wrote the bare key.
const GENERATION_KEY: &str = "generation";

/// Compares the pipeline's stateful steps with the definitions that wrote the state, records
/// the definitions of steps that have no state yet, and returns the state generation (None
/// for a pipeline without state).
pub fn check(settings: &Settings, pipeline: &Pipeline) -> Result<Option<String>, RuntimeError> {
    let current: BTreeMap<usize, String> =
        pipeline.stateful_steps().into_iter().map(|step| (step, pipeline.step_definition(step))).collect();
    if current.is_empty() {
        return Ok(None);
    }
    let topic = topic_name(&pipeline.name);
    super::topics::ensure_topic(settings, &topic, 1, &[("cleanup.policy", "compact")])?;
    let (stored, generation) = read(settings, &topic)?;
    let mut changed = Vec::new();
    for (step, definition) in &stored {
        match current.get(step) {
            Some(now) if now == definition => {}
            Some(now) => changed.push(format!("step {step} was `{definition}` and is now `{now}`")),
            None => changed.push(format!("step {step} was `{definition}` and is no longer a stateful step")),
        }
    }
    if !changed.is_empty() {
        return Err(RuntimeError::Incompatible(format!(
            "the pipeline '{name}' has state written by different step definitions: {}. The saved state cannot be read \
             by the new definitions. To drop the state and start the changed steps empty from the committed offsets, \
             stop every instance and run `weir reset --state --execute --pipeline <file>`; to start over from the input's \
             starting offsets, give the pipeline a new name",
            changed.join("; "),
            name = pipeline.name
        )));
    }
    let mut missing: Vec<(String, String)> = current
        .iter()
        .filter(|(step, _)| !stored.contains_key(step))
        .map(|(step, definition)| (step.to_string(), definition.clone()))
        .collect();
    if generation.is_none() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_nanos());
        let generation = format!("{nanos:x}-{:x}", std::process::id());
        missing.push((format!("{GENERATION_KEY}/{generation}"), generation));
    }
    if !missing.is_empty() {
        let producer: BaseProducer = clients::admin_config(settings)
            .set("enable.idempotence", "true")
            .create()
            .map_err(|error| RuntimeError::Setup(format!("creating a producer for {topic}: {error}")))?;
        let action = format!("recording step definitions in {topic}");
        for (key, definition) in &missing {
            producer
                .send(BaseRecord::to(&topic).key(key).payload(definition))
                .map_err(|(error, _)| RuntimeError::kafka(action.clone(), error))?;
        }
        producer.flush(TIMEOUT).map_err(|error| RuntimeError::kafka(action.clone(), error))?;
        info!(%topic, "recorded the definitions of the stateful steps");
    }
    match generation {
        Some(generation) => Ok(Some(generation)),
        // Read back: another instance may have written its generation first.
        None => match read(settings, &topic)?.1 {
            Some(generation) => Ok(Some(generation)),
            None => Err(RuntimeError::TimedOut { action: format!("reading back the state generation written to {topic}"), waited: TIMEOUT }),
        },
    }
}

/// The definitions that wrote the pipeline's state, by step, without changing anything
/// (none: the pipeline has no recorded state).
pub fn stored(settings: &Settings, pipeline: &Pipeline) -> Result<BTreeMap<usize, String>, RuntimeError> {
    let topic = topic_name(&pipeline.name);
    if !super::topics::exists(settings, &topic)? {
        return Ok(BTreeMap::new());
    }
    Ok(read(settings, &topic)?.0)
}

/// The stored definitions by step, and the state generation.
fn read(settings: &Settings, topic: &str) -> Result<(BTreeMap<usize, String>, Option<String>), RuntimeError> {
    let consumer: BaseConsumer = clients::admin_config(settings)
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|error| RuntimeError::Setup(format!("reading {topic}: {error}")))?;
    let action = format!("reading {topic}");
    let (low, high) = consumer.fetch_watermarks(topic, 0, TIMEOUT).map_err(|error| RuntimeError::kafka(action.clone(), error))?;
    let mut stored = BTreeMap::new();
    let mut generation = None;
    if high <= low {
        return Ok((stored, generation));
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|error| RuntimeError::Setup(error.to_string()))?;
    consumer.assign(&assignment).map_err(|error| RuntimeError::kafka(action.clone(), error))?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.map_err(|error| RuntimeError::kafka(action.clone(), error))?;
            let key = message.key().and_then(|key| std::str::from_utf8(key).ok()).unwrap_or_default();
            let value = message.payload().map(|value| String::from_utf8_lossy(value).into_owned());
            if key.strip_prefix(GENERATION_KEY).is_some_and(|rest| rest.is_empty() || rest.starts_with('/')) {
                // The first one written is the generation (see GENERATION_KEY).
                generation = generation.or(value);
            } else if let Ok(step) = key.parse::<usize>() {
                match value {
                    Some(definition) => stored.insert(step, definition),
                    None => stored.remove(&step),
                };
            }
            if message.offset() + 1 >= high {
                return Ok((stored, generation));
            }
            continue;
        }
        if Instant::now() > deadline {
            return Err(RuntimeError::TimedOut { action: format!("reading {topic} to its end"), waited: TIMEOUT });
        }
    }
}

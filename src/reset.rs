//! `weir reset --state`: drops a pipeline's state (its changelog topics and step definitions),
//! refusing while any process of the pipeline is still a member of its consumer group.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::config::Loaded;
use crate::engine::Engine;
use crate::runtime::definitions;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Deletes the state topics of the pipeline and returns their names.
pub fn reset_state(loaded: &Loaded) -> Result<Vec<String>, String> {
    let Loaded { settings, pipeline } = loaded;
    let engine = Engine::new(pipeline)?;
    let mut config = ClientConfig::new();
    for (key, value) in &settings.kafka.options {
        config.set(key, value);
    }
    config.set("bootstrap.servers", &settings.kafka.bootstrap_servers);
    let client: BaseConsumer = config.create().map_err(|error| format!("creating a Kafka client: {error}"))?;

    // A stopped instance stays a static member until its session times out: wait that long
    // for the group to empty before deciding that an instance is still running.
    let patience = Instant::now() + settings.kafka.session_timeout + Duration::from_secs(5);
    let mut members = live_members(&client, &pipeline.name)?;
    if members > 0 {
        eprintln!(
            "weir: waiting up to {} for the members of group {} to leave",
            humantime::format_duration(settings.kafka.session_timeout),
            pipeline.name
        );
    }
    while members > 0 && Instant::now() < patience {
        std::thread::sleep(Duration::from_millis(500));
        members = live_members(&client, &pipeline.name)?;
    }
    if members > 0 {
        return Err(format!(
            "consumer group {} still has {members} live member(s): stop every instance of the pipeline first",
            pipeline.name
        ));
    }

    let mut candidates: Vec<String> = engine
        .stateful_steps()
        .into_iter()
        .map(|step| format!("{}-{step}-changelog", pipeline.name))
        .collect();
    candidates.push(definitions::topic_name(&pipeline.name));
    let existing: Vec<String> = candidates.into_iter().filter(|topic| exists(&client, topic)).collect();
    if existing.is_empty() {
        return Ok(existing);
    }
    let admin: AdminClient<DefaultClientContext> = config.create().map_err(|error| format!("creating an admin client: {error}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("starting a runtime: {error}"))?;
    let names: Vec<&str> = existing.iter().map(String::as_str).collect();
    let results = runtime
        .block_on(admin.delete_topics(&names, &AdminOptions::new().operation_timeout(Some(TIMEOUT))))
        .map_err(|error| format!("deleting {names:?}: {error}"))?;
    for result in results {
        result.map_err(|(topic, code)| format!("deleting {topic}: {code}"))?;
    }
    // Deletion completes in the background; the next run must not find the old topics.
    let deadline = Instant::now() + Duration::from_secs(60);
    while existing.iter().any(|topic| exists(&client, topic)) {
        if Instant::now() > deadline {
            return Err(format!("the topics {existing:?} were not gone within a minute"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(existing)
}

fn live_members(client: &BaseConsumer, group: &str) -> Result<usize, String> {
    let groups = client
        .fetch_group_list(Some(group), TIMEOUT)
        .map_err(|error| format!("describing consumer group {group}: {error}"))?;
    Ok(groups.groups().iter().map(|group| group.members().len()).sum())
}

fn exists(client: &BaseConsumer, topic: &str) -> bool {
    client
        .fetch_metadata(Some(topic), TIMEOUT)
        .map(|metadata| metadata.topics().iter().any(|found| found.name() == topic && found.error().is_none()))
        .unwrap_or(false)
}

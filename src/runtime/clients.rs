//! librdkafka client configuration. Every option weir sets itself has a reason next to it;
//! the user's `kafka.options` come first so that these win where exactly-once depends on them.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext};
use tokio_util::sync::CancellationToken;

use super::error::RuntimeError;
use crate::config::{DataLossPolicy, Settings};
use crate::operators::StateEntryLimit;
use crate::plan::Pipeline;

fn base(settings: &Settings) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in &settings.kafka.options {
        config.set(key, value);
    }
    config.set("bootstrap.servers", &settings.kafka.bootstrap_servers);
    config
}

/// Names the client to the brokers (their logs, quotas and request metrics), as Kafka
/// Streams names its clients after the application: `<name>-<instance>`, with a suffix for
/// the table readers. A `client.id` in `kafka.options` wins.
pub fn name_client(config: &mut ClientConfig, settings: &Settings, id: &str) {
    set_unless_given(config, settings, "client.id", id);
}

/// The transactional producer: one per process, its id stable across restarts so that a
/// restarted process aborts its own dangling transaction at once.
pub fn producer_config(settings: &Settings, transactional_id: &str) -> ClientConfig {
    let mut config = base(settings);
    name_client(&mut config, settings, transactional_id);
    config
        .set("transactional.id", transactional_id)
        // Bounds how long a crashed process's open transaction blocks read_committed readers.
        .set("transaction.timeout.ms", millis(settings.kafka.transaction_timeout))
        // Implied by transactional.id; stated so nobody wonders.
        .set("enable.idempotence", "true");
    config
}

/// `mode: idempotent_upsert`: an idempotent producer (no duplicates or reordering from its
/// own retries), without transactions.
pub fn upsert_producer_config(settings: &Settings, client_id: &str) -> ClientConfig {
    let mut config = base(settings);
    name_client(&mut config, settings, client_id);
    config.set("enable.idempotence", "true").set("acks", "all");
    config
}

/// The consumer: manual offsets that are only ever committed inside our transactions.
/// `co_partitioned`: a join runs in place, so partition p of both its inputs must be given
/// to the same process. The range assignor does that when all members subscribe to the same
/// topics of equal partition counts; it is eager (every rebalance revokes everything).
pub fn consumer_config(settings: &Settings, pipeline: &Pipeline, instance: &str, co_partitioned: bool) -> ClientConfig {
    let mut config = base(settings);
    config
        .set("group.id", &pipeline.name)
        // Offsets are committed by the producer, in the batch's transaction, never by the consumer.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Never read records of aborted or still-open transactions.
        .set("isolation.level", "read_committed")
        // Partitions that stay with this process keep flowing during a rebalance.
        .set("partition.assignment.strategy", if co_partitioned { "range" } else { "cooperative-sticky" })
        .set("session.timeout.ms", millis(settings.kafka.session_timeout))
        // Start positions are set explicitly on assignment; this only applies when a committed
        // offset has fallen out of retention.
        .set(
            "auto.offset.reset",
            match pipeline.source.on_data_loss {
                DataLossPolicy::Fail => "error",
                DataLossPolicy::Earliest => "earliest",
            },
        )
        .set("enable.partition.eof", "false")
        // Feeds the consumer lag gauges.
        .set("statistics.interval.ms", "1000");
    keep_fetching(&mut config, settings);
    // A cooperative hand-over takes two rounds, and every member but the one that gave
    // partitions up learns of the second only at its next heartbeat: with librdkafka's
    // default 3 s the moved partitions sat with nobody for 3.0 s each time (measured, workers
    // joining a group). A heartbeat a second costs the coordinator little.
    let heartbeat = (settings.kafka.session_timeout / 3).min(HEARTBEAT_INTERVAL);
    set_unless_given(&mut config, settings, "heartbeat.interval.ms", &millis(heartbeat));
    name_client(&mut config, settings, &format!("{}-{instance}", pipeline.name));
    if settings.kafka.static_membership {
        config.set("group.instance.id", format!("{}-{}", pipeline.name, instance));
    }
    config
}

/// librdkafka stops fetching a partition for `fetch.queue.backoff.ms` (1 s by default) once
/// its prefetch queue is full. A loop that empties the queue in less than that then waits
/// with nothing to do: measured, weir's pass-through went from 110k to 142k records/s, and a
/// million-row table read from 9.9 s to 4.6 s, with 10 ms. The user's value wins.
pub fn keep_fetching(config: &mut ClientConfig, settings: &Settings) {
    set_unless_given(config, settings, "fetch.queue.backoff.ms", "10");
}

/// For a reader that reads to a known end and stops (a restore): a fetch that finds nothing
/// new (past the last entry there are often only transaction markers left) comes back after
/// 10 ms rather than librdkafka's 500 ms (`fetch.wait.max.ms`), which a restore otherwise
/// waited out once per partition. The user's value wins.
pub fn read_to_end(config: &mut ClientConfig, settings: &Settings) {
    keep_fetching(config, settings);
    set_unless_given(config, settings, "fetch.wait.max.ms", "10");
}

/// The consumer's `heartbeat.interval.ms` (a third of the session timeout, if that is less).
const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Sets a librdkafka option weir chooses a default for, unless `kafka.options` gives it.
fn set_unless_given(config: &mut ClientConfig, settings: &Settings, name: &str, value: &str) {
    if !settings.kafka.options.contains_key(name) {
        config.set(name, value);
    }
}

/// A plain client for metadata and topic administration.
pub fn admin_config(settings: &Settings) -> ClientConfig {
    base(settings)
}

/// The producer's `message.max.bytes`: the user's, or librdkafka's default, which weir leaves
/// alone (raising it would let a sink record over the sink topic's limit reach the broker,
/// which refuses it and makes the transaction abortable, where librdkafka refuses it at once).
pub fn producer_message_max_bytes(settings: &Settings) -> usize {
    settings
        .kafka
        .options
        .get("message.max.bytes")
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(StateEntryLimit::LIBRDKAFKA_MESSAGE_MAX_BYTES)
}

/// The largest state entry a stateful step may keep: one whose changelog record the producer
/// would refuse fails every commit (audit R8), so the step sends its record to the DLQ instead.
pub fn state_entry_limit(settings: &Settings) -> StateEntryLimit {
    StateEntryLimit::under_message_max_bytes(producer_message_max_bytes(settings))
}

fn millis(duration: std::time::Duration) -> String {
    duration.as_millis().to_string()
}

/// Keeps the last error librdkafka reported, which says why a broker cannot be used (refused
/// connections, a failed SASL handshake, a TLS problem) where a request only times out.
#[derive(Default)]
struct LastError {
    last: Mutex<Option<(RDKafkaErrorCode, String)>>,
}

impl ClientContext for LastError {
    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
        if let Ok(mut last) = self.last.lock() {
            *last = Some((code, reason.to_string()));
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LastError {}

/// How long the first contact with the cluster may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Reaches the cluster once, before anything else, so that a wrong address, failed
/// authentication or a TLS mistake ends the run with the reason rather than a time-out.
/// Authentication failures end it at once: retrying does not fix credentials.
pub fn check_connection(settings: &Settings) -> Result<(), RuntimeError> {
    check_connection_unless(settings, &CancellationToken::new()).map(drop)
}

/// [`check_connection`], giving up when `shutdown` is cancelled meanwhile (false then), so a
/// SIGTERM during start-up is not held for the whole wait.
pub fn check_connection_unless(settings: &Settings, shutdown: &CancellationToken) -> Result<bool, RuntimeError> {
    let client: BaseConsumer<LastError> = admin_config(settings)
        .create_with_context(LastError::default())
        .map_err(|error| RuntimeError::Setup(format!("creating a Kafka client: {error}")))?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        if shutdown.is_cancelled() {
            return Ok(false);
        }
        let attempt = client.fetch_metadata(None, Duration::from_secs(1));
        // Serves the error events behind a failed attempt.
        let _ = client.poll(Duration::from_millis(100));
        let last = client.context().last.lock().ok().and_then(|last| last.clone());
        match (attempt, last) {
            (Ok(_), _) => return Ok(true),
            (Err(_), Some((code, reason))) if is_permanent(code) => {
                return Err(RuntimeError::Setup(format!(
                    "cannot use the Kafka cluster at {}: {reason}",
                    settings.kafka.bootstrap_servers
                )));
            }
            (Err(error), last) if Instant::now() >= deadline => {
                let reason = last.map_or_else(|| error.to_string(), |(_, reason)| reason);
                return Err(RuntimeError::Unreachable {
                    servers: settings.kafka.bootstrap_servers.clone(),
                    waited: CONNECT_TIMEOUT,
                    reason,
                });
            }
            (Err(_), _) => {}
        }
    }
}

fn is_permanent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::SSL
            | RDKafkaErrorCode::UnsupportedSASLMechanism
            | RDKafkaErrorCode::IllegalSASLState
            | RDKafkaErrorCode::InvalidArgument
    )
}

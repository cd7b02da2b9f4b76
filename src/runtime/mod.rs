//! The exactly-once loop.
//!
//! ```text
//! poll (read_committed, manual offsets) ─► decode ─► steps (sync, deterministic)
//!         ▲                                             │ outputs and DLQ records,
//!         │                                             ▼ produced into the open transaction
//!    next batch ◄── commit_transaction ◄── send_offsets_to_transaction (with group metadata)
//! ```
//! One consumer-group member and one transactional producer per process, driven from one
//! thread: no per-record hand-off between tasks. A batch is one transaction; it is begun on
//! the first record and committed after `commit_interval` or `max_batch_records`.
//!
//! # Failure handling
//! - A transactional call's retriable error repeats the call; an abortable one aborts the
//!   transaction and rewinds the batch's partitions to its first offsets, so the batch is
//!   processed again; a fatal one (fencing by a newer process with the same instance id, or
//!   by the group) ends the process with a non-zero status.
//! - A crash at any point leaves the transaction open; the next process with the same
//!   transactional id aborts it in `init_transactions`, and reading resumes from the offsets
//!   committed with the last committed batch, so every output is seen exactly once by
//!   read_committed readers.
//! - Revoked partitions: the open batch is committed before they are given up (aborted if
//!   they were lost), see [`rebalance`].
//! - A record that cannot be decoded or processed follows `on_error` (DLQ by default), in the
//!   same transaction; `fail` aborts the batch and stops.
//! - Shutdown (SIGTERM/SIGINT): the open batch is committed within `drain_timeout`, then the
//!   consumer closes and leaves the group.

pub(crate) mod clients;
pub use clients::check_connection;
pub mod definitions;
pub mod error;
pub mod health;
mod purge;
mod rebalance;
mod schemas;
mod state;
pub mod status;
pub mod store;
pub mod topics;
mod transaction;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::BaseProducer;
use rdkafka::Offset;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::codec::avro;
use crate::codec::registry::Registry;
use crate::config::{SinkMode, SourceTopics};
use crate::plan::Loaded;
use crate::engine::{Destination, Engine, ForwardHeaders, InputRecord, Output, Stage};
use state::{Changelogs, Restorer};
use store::StateStore;
use crate::operators::Provenance;
use crate::telemetry::metrics::Metrics;
pub use error::RuntimeError;
use health::Health;
use rebalance::{LoopContext, OutputTopics, Session};
use transaction::{DeliveryWatch, Outcome, Transaction};

const POLL_TIMEOUT: Duration = Duration::from_millis(100);
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the loop waits for the registry before polling the consumer again.
const REGISTRY_WAIT: Duration = Duration::from_secs(30);

/// Per-process options from the command line.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stable across restarts; makes the transactional id `<name>-<instance>`.
    pub instance: String,
    /// Stop once every owned partition reaches the end offset seen when it was assigned.
    pub until_end: bool,
}

/// Runs the pipeline until shutdown (or, with `--until-end`, until caught up). Blocking: call
/// it from a thread of its own.
pub fn run(
    loaded: &Loaded,
    options: &RunOptions,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    status: Arc<status::Status>,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let Loaded { settings, pipeline } = loaded;
    let mut engine = Engine::new(pipeline).map_err(RuntimeError::Setup)?;
    let transactional_id = format!("{}-{}", pipeline.name, options.instance);
    // Upsert mode keeps state in the local store alone, with the input offsets it is at.
    let upsert = pipeline.sink.mode == SinkMode::IdempotentUpsert;
    let changelog_steps = if upsert { Vec::new() } else { engine.stateful_steps() };
    let changelogs = Changelogs::new(&pipeline.name, &changelog_steps);

    let repartitions: BTreeMap<usize, String> = engine.repartition_topics().into_iter().collect();
    clients::check_connection(settings)?;
    let registry = match pipeline.avro_user() {
        None => None,
        Some(_) => Some(Registry::new(&settings.schema_registry).map_err(RuntimeError::Setup)?),
    };
    if let Some(registry) = &registry {
        for (subject, encoder) in engine.avro_sink() {
            let Some(id) = schemas::register_sink(registry, &subject, encoder.schema_text(), &health, &status, &shutdown)? else {
                return Ok(());
            };
            encoder.set_id(id);
            info!(%subject, id, "the sink's Avro schema is registered");
        }
    }
    let layout = topics::prepare(settings, pipeline, &engine, &changelogs, &repartitions.values().cloned().collect::<Vec<_>>())?;
    if let (Some(layout), false) = (layout, repartitions.is_empty()) {
        engine.distribute(layout.partitions as u32, layout.total);
        info!(topics = ?repartitions.values().collect::<Vec<_>>(), partitions = layout.partitions, "repartitioning through internal topics");
    }
    let generation = definitions::check(settings, pipeline, &engine)?;
    let store = match &generation {
        None => None,
        Some(generation) => {
            let directory = settings.state.dir.join(format!("{}-{}", pipeline.name, options.instance));
            Some(StateStore::open(&directory, &engine.stateful_steps(), generation)?)
        }
    };
    let restorer = match changelogs.is_empty() {
        true => None,
        false => Some(Restorer::new(settings, &pipeline.name, changelogs.clone(), metrics.clone())?),
    };

    let mut producer_config = match upsert {
        true => clients::upsert_producer_config(settings),
        false => clients::producer_config(settings, &transactional_id),
    };
    let record_limits = cap_batches(&mut producer_config, settings, &[&pipeline.sink.topic, &pipeline.dlq_topic]);
    let producer: BaseProducer<DeliveryWatch> = producer_config
        .create_with_context(DeliveryWatch::new(changelogs.topics().cloned().collect()))
        .map_err(|error| RuntimeError::Setup(format!("creating the producer: {error}")))?;
    let transaction = Transaction::new(
        producer,
        transactional_id.clone(),
        settings.kafka.transaction_timeout.max(Duration::from_secs(10)),
        metrics.clone(),
        (pipeline.source.name.clone(), pipeline.join().map(|join| join.right.name.clone())),
        pipeline.sink.topic.clone(),
    );
    let transaction = if upsert { transaction.without_transactions() } else { transaction };
    let transaction = transaction.with_record_limits(record_limits);
    // Fence first: this aborts whatever a previous incarnation left open before we read
    // any offsets.
    transaction.initialize(|| !shutdown.is_cancelled())?;
    health.set_transactions_ready(true);
    match upsert {
        true => info!("idempotent_upsert: an idempotent producer without transactions; offsets kept with the state"),
        false => info!(transactional_id = %transactional_id, "transactions initialized"),
    }

    let topics = OutputTopics {
        sink: pipeline.sink.topic.clone(),
        dlq: pipeline.dlq_topic.clone(),
        changelogs,
        repartitions: repartitions.clone(),
    };
    let co_partitioned = engine.join_in_place().is_some();
    if let Some((left, right)) = engine.join_in_place() {
        info!(%left, %right, "the join runs in place: partition p of both inputs goes to the same task (range assignor)");
    }
    let context = LoopContext::new(
        transaction,
        engine,
        topics,
        store,
        (pipeline.source.starting_offsets, pipeline.source.on_data_loss),
        options.until_end,
        metrics.clone(),
        health.clone(),
        status.clone(),
        match repartitions.is_empty() {
            true => None,
            false => Some(purge::Purger::new(settings)?),
        },
    );
    let consumer: BaseConsumer<LoopContext> = clients::consumer_config(settings, pipeline, &options.instance, co_partitioned)
        .create_with_context(context)
        .map_err(|error| RuntimeError::Setup(format!("creating the consumer: {error}")))?;
    let subscription = match (&pipeline.source.topics, pipeline.input_topics()) {
        (_, Some(topics)) => topics,
        // librdkafka treats a subscription starting with ^ as a regex (its own engine: no
        // (?:...) groups); anchor both ends so the pattern matches whole topic names.
        (SourceTopics::Pattern(pattern), None) => vec![format!("^({pattern})$")],
        (SourceTopics::List(topics), None) => topics.clone(),
    };
    // Repartitioned stages read their topics in the same group and the same transactions.
    let subscription: Vec<&str> =
        subscription.iter().map(String::as_str).chain(repartitions.values().map(String::as_str)).collect();
    consumer
        .subscribe(&subscription)
        .map_err(|error| RuntimeError::Setup(format!("subscribing to {subscription:?}: {error}")))?;
    info!(group = %pipeline.name, topics = ?subscription, "subscribed");

    // With --until-end, the repartition topics must be drained to their real end: the last
    // stable offset a read_committed client would report stays at the start of a batch
    // that has committed but whose markers are not written yet.
    let repartition_ends: Option<BaseConsumer> = match options.until_end && !repartitions.is_empty() {
        false => None,
        true => Some(
            clients::admin_config(settings)
                .set("isolation.level", "read_uncommitted")
                .create()
                .map_err(|error| RuntimeError::Setup(format!("creating a metadata client: {error}")))?,
        ),
    };
    // A panic on this thread must never commit: unwinding would drop the consumer, whose
    // close delivers a revoke, and the revoke callback commits the open batch, including the
    // panicking record's half-applied state but not its offset (audit R1). The guard marks
    // the session abandoned first; catch_unwind turns the panic into an ordinary error, so
    // the path below aborts the transaction before the consumer closes.
    let abandon_on_unwind = AbandonOnUnwind(&consumer);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Loop {
        consumer: &consumer,
        repartition_ends: repartition_ends.as_ref(),
        restorer: restorer.as_ref(),
        registry: registry.as_ref(),
        metrics: &metrics,
        health: &health,
        status: &status,
        commit_interval: settings.runtime.commit_interval,
        max_batch_records: settings.runtime.max_batch_records.get(),
        until_end: options.until_end,
        shutdown: &shutdown,
        outputs: Vec::with_capacity(8),
        }
        .run(settings.runtime.drain_timeout)
    }))
    .unwrap_or_else(|panic| Err(RuntimeError::Panicked(crate::panics::message(panic.as_ref()))));

    health.set_assigned(0);
    if let Some(purger) = &mut consumer.context().session().purger {
        purger.maybe_purge(true);
    }
    if let Err(error) = &result {
        status.failed(&error.to_string());
        // Whatever is open can only be aborted now; the next process replays it.
        let mut session = consumer.context().session();
        session.abandoned = true;
        if session.transaction.is_open() && !matches!(error, RuntimeError::Fenced { .. }) {
            let _ = session.abort(Some(Instant::now() + Duration::from_secs(5)));
        }
    }
    // Dropping the consumer closes it: with cooperative rebalancing that revokes what is left
    // (nothing is open by now) and leaves the group.
    drop(abandon_on_unwind);
    drop(consumer);
    result
}

/// Marks the session abandoned if it is dropped while the thread unwinds from a panic, so
/// that no rebalance callback run by the consumer's close commits the open batch.
struct AbandonOnUnwind<'a>(&'a BaseConsumer<LoopContext>);

impl Drop for AbandonOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.context().session().abandoned = true;
        }
    }
}


struct Loop<'a> {
    consumer: &'a BaseConsumer<LoopContext>,
    /// Reads the repartition topics' end offsets for `--until-end`.
    repartition_ends: Option<&'a BaseConsumer>,
    restorer: Option<&'a Restorer>,
    registry: Option<&'a Registry>,
    metrics: &'a Metrics,
    health: &'a Health,
    status: &'a status::Status,
    commit_interval: Duration,
    max_batch_records: usize,
    until_end: bool,
    shutdown: &'a CancellationToken,
    outputs: Vec<Output>,
}

impl Loop<'_> {
    fn run(mut self, drain_timeout: Duration) -> Result<(), RuntimeError> {
        loop {
            if self.shutdown.is_cancelled() {
                info!("shutting down: committing the open batch");
                let deadline = Instant::now() + drain_timeout;
                return self.commit(Some(deadline)).map(drop);
            }
            let message = self.consumer.poll(POLL_TIMEOUT);
            self.after_callbacks()?;
            let idle = message.is_none();
            match message {
                None => {}
                Some(Ok(message)) if self.fetch_writer_schema(&message)? => self.process(&message)?,
                Some(Ok(_)) => {}
                Some(Err(error)) => self.consumer_error(error)?,
            }
            let due = {
                let mut session = self.consumer.context().session();
                session.transaction.poll();
                session.report_held_back_inputs();
                if idle && !session.transaction.is_open() && session.idle_news() {
                    // Nothing to read, but a partition went idle: a batch of watermarks alone.
                    session.transaction.ensure_open()?;
                }
                session.transaction.is_due(self.commit_interval, self.max_batch_records)
            };
            if due {
                self.commit(None)?;
            }
            if self.until_end && (idle || due) && self.reached_end() {
                self.commit(None)?;
                if self.reached_end() {
                    info!("reached the end offsets seen at start; stopping");
                    return Ok(());
                }
            }
        }
    }

    /// Acts on what the rebalance callbacks left behind during the last poll.
    fn after_callbacks(&mut self) -> Result<(), RuntimeError> {
        let (failure, rewind) = {
            let mut session = self.consumer.context().session();
            (session.failure.take(), std::mem::take(&mut session.rewind))
        };
        if let Some(failure) = failure {
            return Err(failure);
        }
        self.rewind(rewind)?;
        self.restore_pending()
    }

    /// Rebuilds from the changelog the state of partitions just assigned or just aborted,
    /// before any of their records is processed. Not ready meanwhile.
    fn restore_pending(&mut self) -> Result<(), RuntimeError> {
        let mut session = self.consumer.context().session();
        let pending = std::mem::take(&mut session.pending_restore);
        if pending.is_empty() {
            return Ok(());
        }
        if !session.transaction.is_transactional() {
            // Upsert mode: the local store has the state, at the offsets reading resumes from.
            let Session { engine, store, owned, .. } = &mut *session;
            if let Some(store) = store {
                self.health.set_restoring(true);
                for (topic, partition) in pending {
                    if owned.contains_key(&(topic.clone(), partition)) {
                        state::restore_local(engine, store, &topic, partition)?;
                    }
                }
                self.health.set_restoring(false);
            }
            self.metrics.state_keys.set(session.engine.state_keys() as i64);
            return Ok(());
        }
        let Some(restorer) = self.restorer else {
            return Ok(());
        };
        self.health.set_restoring(true);
        for (topic, partition) in pending {
            if session.owned.contains_key(&(topic.clone(), partition)) {
                let Session { engine, store, .. } = &mut *session;
                restorer.restore(engine, store.as_ref(), &topic, partition)?;
            }
        }
        self.health.set_restoring(false);
        self.metrics.state_keys.set(session.engine.state_keys() as i64);
        Ok(())
    }

    /// Seeks the partitions of an aborted batch back to its first offsets. librdkafka drops
    /// what it had fetched past them (a seek raises the partition's version barrier), so
    /// the next records polled from them are the replay.
    fn rewind(&mut self, positions: Vec<(String, i32, i64)>) -> Result<(), RuntimeError> {
        for (topic, partition, offset) in positions {
            match self.consumer.seek(&topic, partition, Offset::Offset(offset), SEEK_TIMEOUT) {
                Ok(()) => info!(%topic, partition, offset, "rewound after abort"),
                Err(error) => {
                    let owned = self.consumer.context().session().owned.contains_key(&(topic.clone(), partition));
                    // Not ours any more: the next owner starts from the committed offset anyway.
                    if !owned {
                        warn!(%topic, partition, %error, "could not rewind a partition no longer owned");
                        continue;
                    }
                    // Reading on would skip the aborted records: stop, and let the restart
                    // resume from the committed offsets.
                    return Err(RuntimeError::Fatal(format!(
                        "rewinding {topic}[{partition}] to {offset} after an abort failed: {error}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Before an Avro record is decoded: fetches the writer schema it names, the first time
    /// an id is met. False when the record must not be processed now: the wait for the
    /// registry ended in a shutdown, or its batch was aborted (it is read again).
    fn fetch_writer_schema(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) -> Result<bool, RuntimeError> {
        let Some(registry) = self.registry else {
            return Ok(true);
        };
        let Some(id) = message.payload().and_then(avro::schema_id) else {
            return Ok(true);
        };
        let writers = {
            let session = self.consumer.context().session();
            if !session.engine.reads_avro(message.topic()) {
                return Ok(true);
            }
            session.engine.writer_schemas().clone()
        };
        if !writers.needs_fetch(id) {
            return Ok(true);
        }
        // The wait is short (one lookup's share of the rate), so the open batch stays open:
        // the record waits its turn rather than going to the DLQ unlooked-up (see
        // `WriterSchemas::take_lookup`).
        while let Err(wait) = writers.take_lookup() {
            tracing::debug!(id, ?wait, "registry lookups are rate-limited; waiting");
            std::thread::sleep(wait);
        }
        let what = format!("fetching writer schema id {id}");
        let (health, status, shutdown) = (self.health, self.status, self.shutdown);
        let (topic, partition, offset) = (message.topic().to_string(), message.partition(), message.offset());
        let mut waited = false;
        // The registry is away: this record goes back to be read again (so no offset past
        // it is committed), and the open batch commits, so no transaction stays open while
        // we wait. The wait is bounded, so the consumer is polled well within
        // max.poll.interval.ms; the record comes back at once and the wait goes on.
        let set_aside = || {
            waited = true;
            self.consumer
                .seek(&topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)
                .map_err(|error| RuntimeError::Fatal(format!("seeking {topic}[{partition}] back to {offset}: {error}")))?;
            self.commit(None).map(drop)
        };
        let fetched = schemas::until_answered(&what, health, status, shutdown, Some(REGISTRY_WAIT), set_aside, || {
            registry.writer_schema(id)
        });
        match fetched {
            Ok(Some(schema)) => {
                if let Err(reason) = &schema {
                    warn!(id, %reason, "a writer schema id the registry does not know; its records are bad records");
                }
                writers.insert(id, schema);
                // Set aside while waiting: it is read again, behind the rewind.
                Ok(!waited)
            }
            Ok(None) => Ok(false),
            Err(schemas::WaitError::Runtime(error)) => Err(error),
            Err(schemas::WaitError::Registry(error)) => Err(RuntimeError::Setup(format!("{what}: {error}"))),
        }
    }

    fn process(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) -> Result<(), RuntimeError> {
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        let headers: Vec<(&str, Option<&[u8]>)> = message
            .headers()
            .map(|headers| headers.iter().map(|header| (header.key, header.value)).collect())
            .unwrap_or_default();
        let mut guard = self.consumer.context().session();
        let Session { transaction, engine, topics, .. } = &mut *guard;
        // From a repartition topic: our own records, so a malformed one is a bug, not bad input.
        let forwarded = match engine.stage_of_topic(topic) {
            None => None,
            Some(stage) => Some((
                stage,
                ForwardHeaders::parse(&headers)
                    .map_err(|error| RuntimeError::Fatal(format!("{topic}[{partition}]@{offset}: {error}")))?,
            )),
        };
        // A forwarded record answers for the source record it came from.
        let source = forwarded.as_ref().and_then(|(_, headers)| headers.source.clone());
        let provenance = match &source {
            Some((topic, partition, offset, timestamp)) => Provenance {
                topic,
                partition: *partition,
                offset: *offset,
                timestamp: *timestamp,
                headers: &[],
                key: message.key(),
            },
            None => Provenance {
                topic,
                partition,
                offset,
                timestamp: message.timestamp().to_millis(),
                headers: &headers,
                key: message.key(),
            },
        };
        let input = InputRecord { provenance, key: message.key(), value: message.payload() };
        transaction.ensure_open()?;
        self.outputs.clear();
        let processed = match &forwarded {
            None => engine.process(&input, &mut self.outputs),
            Some((stage, headers)) => engine.process_forwarded(&input, *stage, partition, headers, &mut self.outputs),
        };
        if let Err(failure) = processed {
            engine.take_counts();
            return Err(failure.into());
        }
        for output in self.outputs.drain(..) {
            let destination = topics.of(output.destination);
            if output.destination == Destination::Dlq {
                send_dead_letter(transaction, destination, &output)?;
                continue;
            }
            let Err(error) = transaction.send(destination, &output) else {
                continue;
            };
            let record_specific = matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
            );
            if !record_specific {
                return Err(RuntimeError::Fatal(format!("producing to {destination}: {error}")));
            }
            // The result itself cannot be written: the input goes where on_error.produce says.
            engine.unproduce();
            let mut dead_letters = Vec::with_capacity(1);
            engine.reject(&input, Stage::Produce, &error.to_string(), &mut dead_letters)?;
            for dead_letter in &dead_letters {
                send_dead_letter(transaction, &topics.dlq, dead_letter)?;
            }
        }
        let counts = engine.take_counts();
        transaction.consumed(topic, partition, offset, &counts);
        Ok(())
    }

    fn consumer_error(&mut self, error: KafkaError) -> Result<(), RuntimeError> {
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::AutoOffsetReset) {
            return Err(self.data_loss(&error));
        }
        if let KafkaError::MessageConsumptionFatal(_) = error {
            let transactional_id = self.consumer.context().session().transaction.transactional_id().to_string();
            return Err(error::fatal(&error, &transactional_id));
        }
        if code == Some(RDKafkaErrorCode::FencedInstanceId) {
            let transactional_id = self.consumer.context().session().transaction.transactional_id().to_string();
            return Err(error::fatal(&error, &transactional_id));
        }
        warn!(%error, "consumer error; continuing");
        Ok(())
    }

    fn data_loss(&self, error: &KafkaError) -> RuntimeError {
        // librdkafka names the partition only in the message text.
        warn!(%error, "committed offset out of range");
        let session = self.consumer.context().session();
        let text = error.to_string();
        let owned = session
            .owned
            .values()
            .find(|owned| text.contains(&format!("{} [{}]", owned.topic, owned.partition)))
            .or_else(|| session.owned.values().next());
        RuntimeError::DataLoss {
            topic: owned.map(|owned| owned.topic.clone()).unwrap_or_default(),
            partition: owned.map_or(-1, |owned| owned.partition),
        }
    }

    fn commit(&mut self, deadline: Option<Instant>) -> Result<Option<Outcome>, RuntimeError> {
        let outcome = {
            let mut session = self.consumer.context().session();
            let outcome = session.commit(self.consumer, deadline)?;
            self.metrics.state_keys.set(session.metrics_state_keys as i64);
            outcome
        };
        if let Some(Outcome::Aborted { rewind }) = &outcome {
            self.rewind(rewind.clone())?;
        }
        Ok(outcome)
    }

    /// With `--until-end`: every owned partition has been read up to the end offset it had
    /// when it was assigned.
    fn reached_end(&self) -> bool {
        let session = self.consumer.context().session();
        if session.owned.is_empty() {
            return false;
        }
        let Ok(positions) = self.consumer.position() else {
            return false;
        };
        session.owned.values().all(|owned| {
            // A repartition topic is fed by this run itself: drained means up to its end now.
            let bounds = match (session.engine.stage_of_topic(&owned.topic), self.repartition_ends) {
                (Some(_), Some(ends)) => ends.fetch_watermarks(&owned.topic, owned.partition, SEEK_TIMEOUT).ok(),
                (Some(_), None) => None,
                (None, _) => owned.bounds_at_start,
            };
            let Some((low, end)) = bounds else {
                return false;
            };
            let position = positions
                .find_partition(&owned.topic, owned.partition)
                .and_then(|element| match element.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                });
            tracing::debug!(topic = %owned.topic, partition = owned.partition, low, end, ?position, start = ?owned.start, "until-end check");
            low >= end || position.max(owned.start).is_some_and(|position| position >= end)
        })
    }
}

/// librdkafka's default `batch.size`.
const LIBRDKAFKA_BATCH_BYTES: usize = 1_000_000;
/// Room for a record batch's framing (61 bytes) and per-record overhead.
const FRAMING_MARGIN: usize = 512;

/// Keeps record batches under the smallest `max.message.bytes` of the topics weir writes
/// results to: the broker refuses a whole batch over it, and the abort would repeat on
/// every replay. Returns each topic's per-record limit where it is under librdkafka's
/// batch size: `Transaction::send` fails a record over it at once, so it follows
/// on_error.produce. Changelog and repartition records keep librdkafka's limits.
/// Without permission to read topic configs, nothing is capped (and a too-large batch
/// shows as repeated aborts, with the broker's reason in the log).
fn cap_batches(config: &mut rdkafka::ClientConfig, settings: &crate::config::Settings, topics: &[&str]) -> Vec<(String, usize)> {
    let limits = match topics::max_message_bytes(settings, topics) {
        Ok(limits) => limits,
        Err(error) => {
            warn!(%error, "cannot read the sink's and DLQ's max.message.bytes; record batches are not capped under them");
            return Vec::new();
        }
    };
    let batch = settings.kafka.options.get("batch.size").and_then(|value| value.parse::<usize>().ok()).unwrap_or(LIBRDKAFKA_BATCH_BYTES);
    let capped: Vec<(String, usize)> = limits
        .into_iter()
        .filter(|(_, limit)| batch + FRAMING_MARGIN > *limit)
        .map(|(topic, limit)| (topic, limit.saturating_sub(FRAMING_MARGIN).max(1000)))
        .collect();
    if let Some(smallest) = capped.iter().map(|(_, limit)| *limit).min() {
        info!(limits = ?capped, batch_size = smallest, "capping record batches (and these topics' records) under their max.message.bytes");
        config.set("batch.size", smallest.to_string());
    }
    capped
}

/// Writes a DLQ record. One too large for the producer (the original value was under the
/// source topic's limit, the DLQ's or weir's `message.max.bytes` is lower) goes without its
/// value, saying so: its provenance headers point at the original, which stays in the source.
fn send_dead_letter(transaction: &Transaction, dlq: &str, dead_letter: &Output) -> Result<(), RuntimeError> {
    let fatal = |error: KafkaError| RuntimeError::Fatal(format!("producing to {dlq}: {error}"));
    let Err(error) = transaction.send(dlq, dead_letter) else {
        return Ok(());
    };
    if !matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)) {
        return Err(fatal(error));
    }
    let size = dead_letter.value.as_ref().map_or(0, Vec::len);
    warn!(dlq, size, "a DLQ record is larger than message.max.bytes; writing it without its value");
    let mut slim = dead_letter.clone();
    slim.value = None;
    slim.headers.push((
        "weir-value-omitted".into(),
        format!("{size} bytes, over message.max.bytes; the original is at weir-source-topic/-partition/-offset").into_bytes(),
    ));
    transaction.send(dlq, &slim).map_err(fatal)
}

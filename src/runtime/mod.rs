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

mod clients;
pub mod definitions;
pub mod error;
pub mod health;
mod rebalance;
mod state;
pub mod topics;
mod transaction;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::BaseProducer;
use rdkafka::Offset;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Loaded, SourceTopics};
use crate::engine::{Destination, Engine, InputRecord, Output, Stage};
use state::{Changelogs, Restorer};
use crate::operators::Provenance;
use crate::telemetry::metrics::Metrics;
pub use error::RuntimeError;
use health::Health;
use rebalance::{LoopContext, OutputTopics, Session};
use transaction::{DeliveryWatch, Outcome, Transaction};

const POLL_TIMEOUT: Duration = Duration::from_millis(100);
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

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
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let Loaded { settings, pipeline } = loaded;
    let engine = Engine::new(pipeline).map_err(RuntimeError::Setup)?;
    let transactional_id = format!("{}-{}", pipeline.name, options.instance);
    let changelogs = Changelogs::new(&pipeline.name, &engine.stateful_steps());

    topics::prepare(settings, pipeline, &changelogs)?;
    definitions::check(settings, pipeline, &engine)?;
    let restorer = match changelogs.is_empty() {
        true => None,
        false => Some(Restorer::new(settings, &pipeline.name, changelogs.clone(), metrics.clone())?),
    };

    let producer: BaseProducer<DeliveryWatch> = clients::producer_config(settings, &transactional_id)
        .create_with_context(DeliveryWatch::default())
        .map_err(|error| RuntimeError::Setup(format!("creating the producer: {error}")))?;
    let transaction = Transaction::new(
        producer,
        transactional_id.clone(),
        settings.kafka.transaction_timeout.max(Duration::from_secs(10)),
        metrics.clone(),
        pipeline.source.name.clone(),
        pipeline.sink.topic.clone(),
    );
    // Fence first: this aborts whatever a previous incarnation left open before we read
    // any offsets.
    transaction.initialize(|| !shutdown.is_cancelled())?;
    health.set_transactions_ready(true);
    info!(transactional_id = %transactional_id, "transactions initialized");

    let topics = OutputTopics { sink: pipeline.sink.topic.clone(), dlq: pipeline.dlq_topic.clone(), changelogs };
    let context = LoopContext::new(
        transaction,
        engine,
        topics,
        pipeline.source.starting_offsets,
        options.until_end,
        metrics.clone(),
        health.clone(),
    );
    let consumer: BaseConsumer<LoopContext> = clients::consumer_config(settings, pipeline, &options.instance)
        .create_with_context(context)
        .map_err(|error| RuntimeError::Setup(format!("creating the consumer: {error}")))?;
    let subscription = match &pipeline.source.topics {
        SourceTopics::List(topics) => topics.clone(),
        // librdkafka treats a subscription starting with ^ as a regex (its own engine: no
        // (?:...) groups); anchor both ends so the pattern matches whole topic names.
        SourceTopics::Pattern(pattern) => vec![format!("^({pattern})$")],
    };
    let subscription: Vec<&str> = subscription.iter().map(String::as_str).collect();
    consumer
        .subscribe(&subscription)
        .map_err(|error| RuntimeError::Setup(format!("subscribing to {subscription:?}: {error}")))?;
    info!(group = %pipeline.name, topics = ?subscription, "subscribed");

    let result = Loop {
        consumer: &consumer,
        restorer: restorer.as_ref(),
        metrics: &metrics,
        health: &health,
        commit_interval: settings.runtime.commit_interval,
        max_batch_records: settings.runtime.max_batch_records.get(),
        until_end: options.until_end,
        shutdown: &shutdown,
        outputs: Vec::with_capacity(8),
        rewound: Vec::new(),
    }
    .run(settings.runtime.drain_timeout);

    health.set_assigned(0);
    if let Err(error) = &result {
        // Whatever is open can only be aborted now; the next process replays it.
        let mut session = consumer.context().session();
        session.abandoned = true;
        if session.transaction.is_open() && !matches!(error, RuntimeError::Fenced { .. }) {
            let _ = session.abort(Some(Instant::now() + Duration::from_secs(5)));
        }
    }
    // Dropping the consumer closes it: with cooperative rebalancing that revokes what is left
    // (nothing is open by now) and leaves the group.
    drop(consumer);
    result
}

struct Loop<'a> {
    consumer: &'a BaseConsumer<LoopContext>,
    restorer: Option<&'a Restorer>,
    metrics: &'a Metrics,
    health: &'a Health,
    commit_interval: Duration,
    max_batch_records: usize,
    until_end: bool,
    shutdown: &'a CancellationToken,
    outputs: Vec<Output>,
    /// Partitions sought back after an abort: a record already polled from them is stale.
    rewound: Vec<(String, i32)>,
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
                Some(Ok(message)) => self.process(&message)?,
                Some(Err(error)) => self.consumer_error(error)?,
            }
            let due = {
                let session = self.consumer.context().session();
                session.transaction.poll();
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
        let Some(restorer) = self.restorer else {
            return Ok(());
        };
        if pending.is_empty() {
            return Ok(());
        }
        self.health.set_restoring(true);
        for (topic, partition) in pending {
            if session.owned.contains_key(&(topic.clone(), partition)) {
                restorer.restore(&mut session.engine, &topic, partition)?;
            }
        }
        self.health.set_restoring(false);
        self.metrics.state_keys.set(session.engine.state_keys() as i64);
        Ok(())
    }

    fn rewind(&mut self, positions: Vec<(String, i32, i64)>) -> Result<(), RuntimeError> {
        self.rewound.clear();
        for (topic, partition, offset) in positions {
            match self.consumer.seek(&topic, partition, Offset::Offset(offset), SEEK_TIMEOUT) {
                Ok(()) => info!(%topic, partition, offset, "rewound after abort"),
                // Not ours any more: the next owner starts from the committed offset anyway.
                Err(error) => warn!(%topic, partition, %error, "could not rewind partition"),
            }
            self.rewound.push((topic, partition));
        }
        Ok(())
    }

    fn process(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) -> Result<(), RuntimeError> {
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        if self.rewound.iter().any(|(t, p)| t == topic && *p == partition) {
            // Polled before the seek took effect: it will be read again from the rewound position.
            return Ok(());
        }
        let headers: Vec<(&str, Option<&[u8]>)> = message
            .headers()
            .map(|headers| headers.iter().map(|header| (header.key, header.value)).collect())
            .unwrap_or_default();
        let input = InputRecord {
            provenance: Provenance {
                topic,
                partition,
                offset,
                timestamp: message.timestamp().to_millis(),
                headers: &headers,
                key: message.key(),
            },
            key: message.key(),
            value: message.payload(),
        };
        let mut guard = self.consumer.context().session();
        let Session { transaction, engine, topics, .. } = &mut *guard;
        transaction.ensure_open()?;
        self.outputs.clear();
        if let Err(failure) = engine.process(&input, &mut self.outputs) {
            engine.take_counts();
            return Err(failure.into());
        }
        for output in self.outputs.drain(..) {
            let destination = topics.of(output.destination);
            let Err(error) = transaction.send(destination, &output) else {
                continue;
            };
            let record_specific = matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
            );
            if !record_specific || output.destination == Destination::Dlq {
                return Err(RuntimeError::Fatal(format!("producing to {destination}: {error}")));
            }
            // The result itself cannot be written: the input goes where on_error.produce says.
            engine.unproduce();
            let mut dead_letters = Vec::with_capacity(1);
            engine.reject(&input, Stage::Produce, &error.to_string(), &mut dead_letters)?;
            for dead_letter in &dead_letters {
                transaction
                    .send(&topics.dlq, dead_letter)
                    .map_err(|error| RuntimeError::Fatal(format!("producing to {}: {error}", topics.dlq)))?;
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
        } else {
            self.rewound.clear();
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
            let Some((low, end)) = owned.bounds_at_start else {
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

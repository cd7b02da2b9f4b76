//! The loop itself: poll a record, decode and run it through the steps, produce what comes
//! out into the open transaction, and commit when the batch is due; act between polls on
//! what the rebalance callbacks left (failures, rewinds, restores).

use std::borrow::Cow;
use std::cell::OnceCell;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::Offset;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::error::RuntimeError;
use super::health::Health;
use super::rebalance::LoopContext;
use super::loop_state::LoopState;
use super::state::{self, Restorer};
use super::tables::TableFeed;
use super::transaction::{self, BatchOutcome, BatchProducer, Refusal};
use super::{schemas, status};
use crate::runtime::TopicPartitionOffset;
use crate::codec::avro;
use crate::codec::registry::Registry;
use crate::config::DeliveryMode;
use crate::engine::{Destination, ForwardHeaders, InputRecord, Output, Payload, ErrorStage};
use crate::operators::{HeaderList, HeaderSource, InputHeaders, Provenance};
use crate::telemetry::metrics::Metrics;

const POLL_TIMEOUT: Duration = Duration::from_millis(100);
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);
/// While records flow, the loop's upkeep (the heartbeat, serving the producer's delivery
/// reports, the clock behind the commit interval) is done once per this many records, not
/// per record: each costs a clock read or a trip through librdkafka's queues, together about
/// a tenth of a pass-through's CPU. At 100k records/s that is every 0.6 ms.
const UPKEEP_EVERY: u32 = 64;
/// A group fencing this soon after the consumer could not reach the cluster is taken for a
/// session that ran out while the brokers were away (librdkafka issue 3437), not for a twin:
/// the rejoin that is fenced follows the broker's return within seconds, and librdkafka
/// reports a broker it cannot reach every reconnect backoff (10 s at most) until then.
const FENCING_AFTER_A_FAULT: Duration = Duration::from_secs(120);
/// How long the loop waits for the registry before polling the consumer again.
const REGISTRY_WAIT: Duration = Duration::from_secs(30);

pub(super) struct Loop<'a> {
    pub(super) consumer: &'a BaseConsumer<LoopContext>,
    /// Reads the repartition topics' end offsets for `--until-end`.
    pub(super) repartition_ends: Option<&'a BaseConsumer>,
    pub(super) restorer: Option<&'a Restorer>,
    /// The table sources' readers, applied between batches.
    pub(super) tables: Option<TableFeed>,
    pub(super) registry: Option<&'a Registry>,
    pub(super) metrics: &'a Metrics,
    pub(super) health: &'a Health,
    pub(super) status: &'a status::Status,
    pub(super) commit_interval: Duration,
    pub(super) max_batch_records: usize,
    pub(super) until_end: bool,
    pub(super) peers: &'a super::workers::Peers,
    /// Stateful steps or repartitions: an abort restarts the run (see `after_abort`).
    pub(super) restart_on_abort: bool,
    pub(super) shutdown: &'a CancellationToken,
    pub(super) outputs: Vec<Output>,
    /// Records since the last upkeep (see [`UPKEEP_EVERY`]).
    pub(super) since_upkeep: u32,
    /// The topic every record comes from, when the subscription names only one: rdkafka's
    /// `topic()` measures and checks the name anew for each record (166 instructions).
    pub(super) only_topic: Option<&'a str>,
}

impl Loop<'_> {
    pub(super) fn run(mut self, drain_timeout: Duration) -> Result<(), RuntimeError> {
        loop {
            if self.shutdown.is_cancelled() {
                info!("shutting down: committing the open batch");
                let deadline = Instant::now() + drain_timeout;
                return self.commit(Some(deadline)).map(drop);
            }
            let message = self.consumer.poll(POLL_TIMEOUT);
            self.after_callbacks()?;
            let idle = message.is_none();
            self.since_upkeep += 1;
            let upkeep = idle || self.since_upkeep >= UPKEEP_EVERY;
            if upkeep {
                self.since_upkeep = 0;
                super::health::beat();
            }
            match message {
                None => {}
                Some(Ok(message)) if self.fetch_writer_schema(&message)? => self.process(&message)?,
                Some(Ok(_)) => {}
                Some(Err(error)) => self.consumer_error(error)?,
            }
            let due = {
                let mut session = self.consumer.context().session();
                if upkeep {
                    session.transaction.poll();
                }
                if idle && !session.transaction.is_open() && session.idle_news() {
                    // Nothing to read, but a partition went idle: a batch of watermarks alone.
                    session.transaction.ensure_open()?;
                }
                let due = session.transaction.is_due(self.commit_interval, self.max_batch_records, upkeep);
                // A partition's activity changes only at commits: looking once a batch (or
                // once an empty poll) is enough, and keeps the walk off the per-record path.
                if idle || due {
                    session.report_held_back_inputs();
                    // Back at work after a fault: assigned, restored, transactions ready.
                    if self.health.is_ready() {
                        self.status.recovered();
                        self.metrics.recovering.set(0);
                    }
                }
                due
            };
            if due {
                self.commit(None)?;
            }
            if (idle || due) && !self.apply_table_updates()? {
                // Shut down while waiting for the schema registry: commit and stop above.
                continue;
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

    /// Applies what arrived on the tables' topics since the last batch. False when shut
    /// down while waiting for the schema registry.
    fn apply_table_updates(&mut self) -> Result<bool, RuntimeError> {
        let Some(tables) = &mut self.tables else {
            return Ok(true);
        };
        let mut session = self.consumer.context().session();
        tables.drain(&mut session.engine, self.registry, self.health, self.shutdown)
    }

    /// Acts on what the rebalance callbacks left behind during the last poll.
    fn after_callbacks(&mut self) -> Result<(), RuntimeError> {
        let (failure, rewind, restores) = {
            let mut session = self.consumer.context().session();
            (session.failure.take(), std::mem::take(&mut session.rewind), !session.pending_restore.is_empty())
        };
        if let Some(failure) = failure {
            return Err(failure);
        }
        // The usual case, once per record: nothing happened.
        if rewind.is_empty() && !restores {
            return Ok(());
        }
        if !rewind.is_empty() {
            self.after_abort()?;
        }
        self.rewind(rewind)?;
        // Newly assigned partitions restore their state first. Commit the open batch before
        // that: a restore can outlast the transaction timeout, and the coordinator would end
        // the transaction under it (audit R4).
        let restores_wait = {
            let session = self.consumer.context().session();
            !session.pending_restore.is_empty() && session.transaction.is_open()
        };
        if restores_wait {
            self.commit(None)?;
        }
        self.restore_pending()
    }

    /// A stateful pipeline's aborted batch may have changed tasks that read no record in it
    /// (a join's idle partner evicting rows, the news that a partition went idle, audit R13
    /// and R14), so dropping only its partitions' state is not enough. Aborts are rare: the
    /// run stops, and `recovery` starts it again with every task rebuilt from the committed
    /// state. A stateless pipeline replays from the rewind in place.
    fn after_abort(&self) -> Result<(), RuntimeError> {
        match self.restart_on_abort {
            true => Err(RuntimeError::Replay(
                "a batch was aborted; every task's state is rebuilt from the committed state and the batch replayed".into(),
            )),
            false => Ok(()),
        }
    }

    /// Rebuilds from the changelog the state of partitions just assigned or just aborted,
    /// before any of their records is processed. Not ready meanwhile.
    fn restore_pending(&mut self) -> Result<(), RuntimeError> {
        let mut session = self.consumer.context().session();
        let pending = std::mem::take(&mut session.pending_restore);
        if pending.is_empty() {
            return Ok(());
        }
        if session.transaction.mode() == DeliveryMode::IdempotentUpsert {
            // Upsert mode: the local store has the state, at the offsets reading resumes from.
            let LoopState { engine, store, owned, .. } = &mut *session;
            if let Some(store) = store {
                self.health.set_restoring(true);
                for (topic, partition) in pending {
                    if owned.contains_key(&(topic.clone(), partition)) {
                        state::restore_local(engine, store, &topic, partition)?;
                    }
                }
                self.health.set_restoring(false);
            }
            session.publish_state_keys();
            return Ok(());
        }
        let Some(restorer) = self.restorer else {
            return Ok(());
        };
        self.health.set_restoring(true);
        for (topic, partition) in pending {
            if session.owned.contains_key(&(topic.clone(), partition)) {
                let LoopState { engine, store, .. } = &mut *session;
                restorer.restore(engine, store.as_ref(), &topic, partition)?;
            }
        }
        self.health.set_restoring(false);
        session.publish_state_keys();
        Ok(())
    }

    /// Seeks the partitions of an aborted batch back to its first offsets. librdkafka drops
    /// what it had fetched past them (a seek raises the partition's version barrier), so
    /// the next records polled from them are the replay.
    fn rewind(&mut self, positions: Vec<TopicPartitionOffset>) -> Result<(), RuntimeError> {
        for TopicPartitionOffset { topic, partition, offset } in positions {
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
                    return Err(RuntimeError::kafka(format!("rewinding {topic}[{partition}] to {offset} after an abort"), error));
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
                .map_err(|error| RuntimeError::kafka(format!("seeking {topic}[{partition}] back to {offset}"), error))?;
            self.commit(None).map(drop)
        };
        let fetched = schemas::fetch_writer_schema(registry, &writers, id, &what, health, status, shutdown, Some(REGISTRY_WAIT), set_aside)?;
        // Set aside while waiting: it is read again, behind the rewind.
        Ok(fetched && !waited)
    }

    fn process(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) -> Result<(), RuntimeError> {
        let topic = self.only_topic.unwrap_or_else(|| message.topic());
        let (partition, offset) = (message.partition(), message.offset());
        // The broker refused a record batch this input's results were in (audit R2): its
        // results go alone, in a transaction of their own, after what comes before commits.
        let refusal = self.consumer.context().session().transaction.refusal(topic, partition, offset);
        let alone = refusal == Some(Refusal::Suspect);
        if alone && matches!(self.commit(None)?, Some(BatchOutcome::Aborted { .. })) {
            // Rewound to before this record: it comes again.
            return Ok(());
        }
        self.process_record(message, topic, refusal)?;
        if alone {
            self.commit(None)?;
        }
        Ok(())
    }

    /// `topic`: the message's (read once: librdkafka hands it over as a C string).
    fn process_record(&mut self, message: &rdkafka::message::BorrowedMessage<'_>, topic: &str, refusal: Option<Refusal>) -> Result<(), RuntimeError> {
        let (partition, offset) = (message.partition(), message.offset());
        let mut guard = self.consumer.context().session();
        let LoopState { transaction, engine, topics, .. } = &mut *guard;
        // A source record's headers are read only if something asks for them; a forwarded
        // record's carry where it came from.
        let stage = engine.stage_of_topic(topic);
        let headers = if stage.is_some() { read_headers(message) } else { Vec::new() };
        // From a repartition topic: our own records, so a malformed one is a bug, not bad input.
        let forwarded = match stage {
            None => None,
            Some(stage) => Some((
                stage,
                ForwardHeaders::parse(&headers)
                    .map_err(|error| RuntimeError::Replay(format!("a record of {topic}[{partition}]@{offset} has broken repartition headers: {error}")))?,
            )),
        };
        // A forwarded record answers for the source record it came from.
        let source = forwarded.as_ref().and_then(|(_, forward)| Some((forward.source.clone()?, forward.input_headers)));
        let unread = MessageHeaders { message, read: OnceCell::new() };
        let provenance = match &source {
            Some(((topic, partition, offset, timestamp), input_headers)) => Provenance {
                topic,
                partition: *partition,
                offset: *offset,
                timestamp: *timestamp,
                headers: InputHeaders::Read(&headers[..*input_headers]),
                key: message.key(),
            },
            None => Provenance {
                topic,
                partition,
                offset,
                timestamp: message.timestamp().to_millis(),
                headers: InputHeaders::Unread(&unread),
                key: message.key(),
            },
        };
        let input = InputRecord { provenance, key: message.key(), value: message.payload() };
        transaction.ensure_open()?;
        if refusal == Some(Refusal::Suspect) {
            transaction.send_alone(TopicPartitionOffset::new(topic, partition, offset));
        }
        self.outputs.clear();
        let processed = match &forwarded {
            None => engine.process(&input, &mut self.outputs),
            Some((stage, headers)) => engine.process_forwarded(&input, *stage, partition, headers, &mut self.outputs),
        };
        if let Err(failure) = processed {
            engine.take_counts();
            return Err(failure.into());
        }
        // The broker refused this input's results when they were sent alone (the batch was
        // aborted and is being replayed): the input goes where on_error.produce says instead.
        let refused = match refusal {
            Some(Refusal::Refused(reason)) => Some(reason),
            _ => None,
        };
        let origin = match (&refused, self.outputs.is_empty()) {
            (None, false) => transaction.origin(topic, partition, offset),
            _ => 0,
        };
        for output in self.outputs.drain(..) {
            let destination = topics.of(output.destination);
            if output.destination == Destination::Dlq {
                send_dlq_record(transaction, destination, &output)?;
                continue;
            }
            if refused.is_some() {
                engine.unproduce(output.destination);
                continue;
            }
            let Err(error) = transaction.send(destination, &output, input.value, origin) else {
                continue;
            };
            let record_specific = matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
            );
            if !record_specific {
                return Err(RuntimeError::kafka(format!("producing to {destination}"), error));
            }
            // The result itself cannot be written: the input goes where on_error.produce says.
            engine.unproduce(output.destination);
            let mut dlq_records_made = Vec::with_capacity(1);
            engine.on_error(&input, ErrorStage::Produce, &error.to_string(), &mut dlq_records_made)?;
            for dlq_record in &dlq_records_made {
                send_dlq_record(transaction, &topics.dlq, dlq_record)?;
            }
        }
        if let Some(reason) = refused {
            let mut dlq_records_made = Vec::with_capacity(1);
            let error = format!("the broker refused the record made from this input: {reason}");
            engine.on_error(&input, ErrorStage::Produce, &error, &mut dlq_records_made)?;
            for dlq_record in &dlq_records_made {
                send_dlq_record(transaction, &topics.dlq, dlq_record)?;
            }
        }
        engine.pass_counts(transaction.counts_mut());
        transaction.consumed(topic, partition, offset);
        Ok(())
    }

    fn consumer_error(&mut self, error: KafkaError) -> Result<(), RuntimeError> {
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::AutoOffsetReset) {
            return Err(self.data_loss(&error));
        }
        let fenced_by_group = code == Some(RDKafkaErrorCode::FencedInstanceId);
        if fenced_by_group && self.health.take_recent_cluster_fault(FENCING_AFTER_A_FAULT) {
            warn!(%error, "fenced by the group right after the cluster was away; a new consumer joins");
            return Err(RuntimeError::GroupSessionLost { detail: error.to_string() });
        }
        if fenced_by_group || matches!(error, KafkaError::MessageConsumptionFatal(_)) {
            let transactional_id = self.consumer.context().session().transaction.transactional_id().to_string();
            return Err(transaction::fatal(&error, &transactional_id));
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

    fn commit(&mut self, deadline: Option<Instant>) -> Result<Option<BatchOutcome>, RuntimeError> {
        let outcome = {
            let mut session = self.consumer.context().session();
            session.commit(self.consumer, deadline)?
        };
        if let Some(BatchOutcome::Aborted { rewind }) = &outcome {
            self.after_abort()?;
            self.rewind(rewind.clone())?;
        }
        Ok(outcome)
    }

    /// With `--until-end`: every owned partition has been read up to the end offset it had
    /// when it was assigned.
    fn reached_end(&self) -> bool {
        let session = self.consumer.context().session();
        if session.owned.is_empty() {
            // Nothing assigned yet, or more workers than partitions: done once the workers
            // that own them are.
            return self.peers.others_finished();
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

/// Writes a DLQ record. One too large for the producer (the original value was under the
/// source topic's limit, the DLQ's or weir's `message.max.bytes` is lower) goes without its
/// value, saying so: its provenance headers point at the original, which stays in the source.
fn send_dlq_record(transaction: &BatchProducer, dlq: &str, dlq_record: &Output) -> Result<(), RuntimeError> {
    let fatal = |error: KafkaError| RuntimeError::kafka(format!("producing to {dlq}"), error);
    let Err(error) = transaction.send(dlq, dlq_record, None, 0) else {
        return Ok(());
    };
    if !matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)) {
        return Err(fatal(error));
    }
    let size = dlq_record.value.own().map_or(0, <[u8]>::len);
    warn!(dlq, size, "a DLQ record is larger than message.max.bytes; writing it without its value");
    let mut slim = dlq_record.clone();
    slim.value = Payload::None;
    slim.headers.push((
        "weir-value-omitted".into(),
        format!("{size} bytes, over message.max.bytes; the original is at weir-source-topic/-partition/-offset").into_bytes(),
    ));
    transaction.send(dlq, &slim, None, 0).map_err(fatal)
}

/// A message's headers as read from it, borrowing their names and values.
type ReadHeaders<'m> = Vec<(&'m str, Option<&'m [u8]>)>;

fn read_headers<'m>(message: &'m BorrowedMessage<'_>) -> ReadHeaders<'m> {
    message.headers().map(|headers| headers.iter().map(|header| (header.key, header.value)).collect()).unwrap_or_default()
}

/// A consumed message's headers, read at the first ask and kept for the others (each output
/// passing headers on, a DLQ record, each `_headers` expression): librdkafka keeps no parsed
/// list for a message without headers and reads, allocating, at every ask.
struct MessageHeaders<'m> {
    message: &'m BorrowedMessage<'m>,
    read: OnceCell<ReadHeaders<'m>>,
}

impl HeaderSource for MessageHeaders<'_> {
    fn read_headers(&self) -> Cow<'_, HeaderList<'_>> {
        Cow::Borrowed(self.read.get_or_init(|| read_headers(self.message)))
    }
}

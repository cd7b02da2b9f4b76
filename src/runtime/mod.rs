//! The exactly-once loop.
//!
//! ```text
//! poll (read_committed, manual offsets) ─► decode ─► steps (sync, deterministic)
//!         ▲                                             │ outputs and DLQ records,
//!         │                                             ▼ produced into the open transaction
//!    next batch ◄── commit_transaction ◄── send_offsets_to_transaction (with group metadata)
//! ```
//! One consumer-group member and one transactional producer per worker (one per process
//! unless `runtime.workers` says more, see `workers`), driven from one thread: no
//! per-record hand-off between tasks. A batch is one transaction; it is begun on
//! the first record and committed once per `commit_interval` (start to start, see
//! `transaction::cadence`) or after `max_batch_records`.
//!
//! Where things are:
//! - start-up ([`run`], here): topics, schemas, state definitions, the store, the producer
//!   and `init_transactions` (fencing), the consumer and its subscription;
//! - the loop (`poll_loop`): poll, decode, steps, produce, commit when due;
//! - the commit path and its failure classes (`transaction`): begin, produce, send offsets,
//!   commit or abort and rewind;
//! - what the loop and the callbacks share (`loop_state`), and the rebalance callbacks with the
//!   start positions of newly assigned partitions (`rebalance`);
//! - restoring state from changelogs (`state`) into the local RocksDB cache (`store`);
//! - table sources (`tables`), read whole before the first stream record and then between
//!   batches, into their local store (`table_store`).
//!
//! # Failure handling
//! - A transactional call's retriable error repeats the call (while the transaction is younger
//!   than its timeout); an abortable one aborts the transaction and rewinds the batch's
//!   partitions to its first offsets, so the batch is processed again. See `transaction`.
//! - Any other retriable or abortable failure (the cluster away at start, during a restore, a
//!   rebalance or a commit; the coordinator ending a transaction that ran past its timeout)
//!   stops the run, and `recovery` starts it again in place from the committed state after a
//!   pause, not ready meanwhile. Fencing by a newer process with the same instance id (or by
//!   the group), a panic, a broken store and configuration problems end the process with a
//!   non-zero status.
//! - A crash at any point leaves the transaction open; the next process with the same
//!   transactional id aborts it in `init_transactions`, and reading resumes from the offsets
//!   committed with the last committed batch, so every output is seen exactly once by
//!   read_committed readers.
//! - A panic on the loop thread aborts the open batch (never commits it) and stops.
//! - Revoked partitions: the open batch is committed before they are given up (aborted if
//!   they were lost), see `rebalance`.
//! - A record that cannot be decoded or processed follows `on_error` (DLQ by default), in the
//!   same transaction; `fail` aborts the batch and stops.
//! - Shutdown (SIGTERM/SIGINT): the open batch is committed within `drain_timeout`, then the
//!   consumer closes and leaves the group.

pub(crate) mod clients;
pub use clients::check_connection;
pub mod definitions;
mod delivery;
pub mod backoff;
pub mod commit_writes;
pub mod error;
pub mod health;
mod purge;
mod rebalance;
mod recovery;
mod poll_loop;
mod positions;
pub use positions::TopicPartitionOffset;
mod schemas;
mod loop_state;
mod restore_chunk;
mod state;
pub mod status;
mod rocks;
pub mod store;
mod table_store;
mod tables;
pub mod topics;
mod transaction;
pub mod workers;

use poll_loop::Loop;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::BaseProducer;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::codec::registry::Registry;
use crate::config::{DeliveryMode, SourceTopics};
use crate::plan::Loaded;
use crate::engine::Engine;
use state::{Changelogs, Restorer};
use store::{StateStore, StoreMemory};
use crate::telemetry::metrics::Metrics;
pub use error::RuntimeError;
use health::Health;
use delivery::DeliveryWatch;
use rebalance::LoopContext;
use loop_state::OutputTopics;
use transaction::BatchProducer;

/// Per-process options from the command line.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stable across restarts; makes the transactional id `<name>-<instance>`.
    pub instance: String,
    /// Stop once every owned partition reaches the end offset seen when it was assigned.
    pub until_end: bool,
    /// The other workers of the process (see `workers`).
    pub peers: workers::Peers,
}

/// Runs the pipeline until shutdown (or, with `--until-end`, until caught up), waiting out
/// faults (see `recovery`). Blocking: call it from a thread of its own.
pub fn run(
    loaded: &Loaded,
    options: &RunOptions,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    status: Arc<status::Status>,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let settings = &loaded.settings;
    health.attach();
    // Longer than any one call the loop makes to the cluster (a commit, a restore's wait for
    // an open transaction, the first contact), so only a stuck loop fails liveness.
    health.set_live_within((settings.kafka.transaction_timeout * 4).max(Duration::from_secs(120)));
    // Inputs whose results the broker refused, remembered from one run to the next.
    let refused = Arc::new(transaction::RefusedInputs::default());
    recovery::supervise(
        || run_once(loaded, options, metrics.clone(), health.clone(), status.clone(), shutdown.clone(), refused.clone()),
        recovery::Policy::new(settings.runtime.give_up_after),
        &metrics,
        &health,
        &status,
        &shutdown,
    )
}

/// One run: start-up (topics, schemas, the store, `init_transactions`, the subscription),
/// then the loop, until it ends or fails. Whatever fails, the open transaction is aborted (or
/// left to the coordinator) and nothing is committed on the way out.
fn run_once(
    loaded: &Loaded,
    options: &RunOptions,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    status: Arc<status::Status>,
    shutdown: CancellationToken,
    refused: Arc<transaction::RefusedInputs>,
) -> Result<(), RuntimeError> {
    let Loaded { settings, pipeline } = loaded;
    let mut engine = Engine::new(pipeline).map_err(|error| RuntimeError::Setup(error.to_string()))?;
    engine.set_state_entry_limit(clients::state_entry_limit(settings));
    let transactional_id = format!("{}-{}", pipeline.name, options.instance);
    let mode = pipeline.mode();
    let changelog_steps = match mode {
        DeliveryMode::Transactional => engine.stateful_steps(),
        // Upsert mode keeps state in the local store alone, with the input offsets it is at.
        DeliveryMode::IdempotentUpsert => Vec::new(),
    };
    let changelogs = Changelogs::new(&pipeline.name, &changelog_steps);

    let repartitions: BTreeMap<usize, String> = engine.repartition_topics().into_iter().collect();
    if !clients::check_connection_unless(settings, &shutdown)? {
        return Ok(());
    }
    let registry = match pipeline.avro_user() {
        None => None,
        Some(_) => Some(Registry::new(&settings.schema_registry).map_err(|error| RuntimeError::Setup(error.to_string()))?),
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
    let generation = definitions::check(settings, pipeline)?;
    let store = match &generation {
        None => None,
        Some(generation) => {
            let directory = settings.state.dir.join(format!("{}-{}", pipeline.name, options.instance));
            let timer_of = |step: usize, key: &str, value: &[u8]| engine.timer_of(step, key, value);
            let store = StateStore::open(&directory, &engine.stateful_steps(), generation, StoreMemory::of(&settings.state), mode == DeliveryMode::Transactional, &timer_of)?;
            engine.set_backing(store.backing());
            Some(store)
        }
    };
    let restorer = match changelogs.is_empty() {
        true => None,
        false => Some(Restorer::new(settings, &pipeline.name, changelogs.clone(), metrics.clone(), status.clone())?),
    };

    let mut producer_config = match mode {
        DeliveryMode::IdempotentUpsert => clients::upsert_producer_config(settings, &transactional_id),
        DeliveryMode::Transactional => clients::producer_config(settings, &transactional_id),
    };
    let sink_topics: Vec<String> = pipeline.sinks().map(|sink| sink.topic.clone()).collect();
    let written: Vec<&str> = sink_topics.iter().chain([&pipeline.dlq_topic]).map(String::as_str).collect();
    let record_limits = cap_batches(&mut producer_config, settings, &written);
    let producer: BaseProducer<DeliveryWatch> = producer_config
        .create_with_context(DeliveryWatch::new(changelogs.topics().cloned().collect()).with_health(health.clone()))
        .map_err(|error| RuntimeError::Setup(format!("creating the producer: {error}")))?;
    let transaction = BatchProducer::new(
        producer,
        transactional_id.clone(),
        settings.kafka.transaction_timeout,
        metrics.clone(),
        (pipeline.source.name.clone(), pipeline.join().map(|join| join.right.name.clone())),
        sink_topics.clone(),
    );
    let transaction = transaction.with_mode(mode).with_record_limits(record_limits).with_health(health.clone()).with_refused(refused);
    // Fence first: this aborts whatever a previous incarnation (or a failed run of this
    // process) left open before we read any offsets.
    transaction.initialize()?;
    health.set_transactions_ready(true);
    match mode {
        DeliveryMode::IdempotentUpsert => info!("idempotent_upsert: an idempotent producer without transactions; offsets kept with the state"),
        DeliveryMode::Transactional => info!(transactional_id = %transactional_id, "transactions initialized"),
    }

    // Tables are read before the group subscription: the first stream record meets them
    // whole, and a long first read keeps no group member from polling.
    let mut tables = match pipeline.tables.is_empty() {
        true => None,
        false => Some(tables::TableFeed::open(settings, pipeline, &options.instance, &mut engine, metrics.clone(), status.clone())?),
    };
    if let Some(tables) = &mut tables
        && !tables.bootstrap(&mut engine, registry.as_ref(), &health, &shutdown)?
    {
        return Ok(());
    }

    let topics = OutputTopics {
        sinks: sink_topics,
        dlq: pipeline.dlq_topic.clone(),
        changelogs,
        repartitions: repartitions.clone(),
    };
    let co_partitioned = engine.join_in_place().is_some();
    let restart_on_abort = !engine.stateful_steps().is_empty() || !repartitions.is_empty();
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
    // One topic named (not a pattern): every record is from it.
    let only_topic = match subscription.as_slice() {
        [topic] if !topic.starts_with('^') => Some(topic.to_string()),
        _ => None,
    };

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
        tables,
        registry: registry.as_ref(),
        metrics: &metrics,
        health: &health,
        status: &status,
        commit_interval: settings.runtime.commit_interval,
        max_batch_records: settings.runtime.max_batch_records.get(),
        until_end: options.until_end,
        peers: &options.peers,
        restart_on_abort,
        shutdown: &shutdown,
        outputs: Vec::with_capacity(8),
        since_upkeep: 0,
        only_topic: only_topic.as_deref(),
        }
        .run(settings.runtime.drain_timeout)
    }))
    .unwrap_or_else(|panic| Err(RuntimeError::Panicked(crate::panics::message(panic.as_ref()))));

    health.set_assigned(0);
    health.set_transactions_ready(false);
    health.set_cluster_unreachable(false);
    if let Some(purger) = &mut consumer.context().session().purger {
        purger.maybe_purge(true);
    }
    let result = result.map_err(|error| timed_out_or(error, &consumer.context().session().transaction));
    if let Err(error) = &result {
        status.failed(&error.to_string());
        // Whatever is open can only be aborted now; the next run replays it.
        let mut session = consumer.context().session();
        session.abandoned = true;
        let fenced = error.is_producer_fencing() || matches!(error, RuntimeError::Fenced { .. } | RuntimeError::TransactionTimedOut { .. });
        // A wedged producer (a call that never returned) cannot abort; the next run's
        // producer fences it and aborts its transaction.
        if session.transaction.is_open() && !fenced && !session.transaction.is_wedged() {
            let _ = session.abort(Some(Instant::now() + Duration::from_secs(5)));
        }
        drop(session);
        rebalance::finish_hand_over(&consumer, settings.kafka.session_timeout, &shutdown);
    }
    // Dropping the consumer closes it: with cooperative rebalancing that revokes what is left
    // (nothing is open by now) and leaves the group.
    drop(abandon_on_unwind);
    drop(consumer);
    result
}

/// Producer fencing while the transaction has been open for longer than the transaction
/// timeout is the coordinator ending that transaction (a broker that was away or paused, a
/// stall): nobody took over, and a new producer goes on (audit R5). librdkafka reports both
/// alike (it has no KIP-890 "transaction version 2"); only a transaction younger than the
/// timeout can have been fenced by another process.
fn timed_out_or(error: RuntimeError, transaction: &BatchProducer) -> RuntimeError {
    match transaction.open_for() {
        Some(open_for) if error.is_producer_fencing() && open_for >= transaction.transaction_timeout() => {
            RuntimeError::TransactionTimedOut {
                transactional_id: transaction.transactional_id().to_string(),
                open_for,
                detail: error.to_string(),
            }
        }
        _ => error,
    }
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


/// librdkafka's default `batch.size`.
const LIBRDKAFKA_BATCH_BYTES: usize = 1_000_000;
/// Room for a record batch's framing (61 bytes) and per-record overhead.
const FRAMING_MARGIN: usize = 512;

/// Keeps record batches under the smallest `max.message.bytes` of the topics weir writes
/// results to: the broker refuses a whole batch over it, and the abort would repeat on
/// every replay. Returns each topic's per-record limit where it is under librdkafka's
/// batch size: `BatchProducer::send` fails a record over it at once, so it follows
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

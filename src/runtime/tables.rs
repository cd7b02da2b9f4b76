//! Table sources under `weir run`: every instance reads every partition of a table's topic
//! (read_committed, no consumer group) into its local table store, and the pipeline's
//! lookups read the rows from there.
//!
//! - Bootstrap: before the first stream record (before the group subscription), each table
//!   is read up to the end its partitions report, from the store's recorded positions (a
//!   restart reads only what came since) or from the beginning. Not ready meanwhile;
//!   `/status` shows the progress.
//! - Then the loop applies what arrived between batches (`drain`), so a lookup sees the
//!   table as of the table records applied before it, as Kafka Streams' global tables do.
//! - A table record that cannot be applied changes nothing and is reported (a log line with
//!   its topic, partition and offset, `weir_table_records_skipped_total`, `/status`), not
//!   written to the DLQ: every instance reads it, and reads it again after losing its store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::backoff::Backoff;
use super::error::RuntimeError;
use super::health::{self, Health};
use super::status::Status;
use super::table_store::TableStore;
use super::{clients, schemas};
use crate::codec::avro;
use crate::codec::registry::Registry;
use crate::config::{Encoding, Settings, Source, SourceTopics};
use crate::engine::{Engine, InputRecord, TableRecordError};
use crate::operators::{InputHeaders, Provenance};
use crate::plan::Pipeline;
use crate::telemetry::metrics::Metrics;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a table topic created just before the start may take to show in metadata.
const MISSING_TOPIC_PATIENCE: Duration = Duration::from_secs(5);
/// Between batches the loop applies at most this many table records per topic, so that a
/// burst of table updates delays the stream by a bounded amount; the rest waits a batch.
const DRAIN_RECORDS: usize = 20_000;
/// How often positions, gauges and `/status` are brought up to date.
const REPORT_EVERY: Duration = Duration::from_secs(1);

pub struct TableFeed {
    readers: Vec<TopicReader>,
    store: TableStore,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    last_report: Instant,
}

/// One topic of a table, read by a consumer of its own (end-of-partition events name only
/// the partition).
struct TopicReader {
    table: String,
    topic: String,
    avro: bool,
    consumer: BaseConsumer<Ends>,
    partitions: BTreeMap<i32, TablePartition>,
}

/// The end offsets of a table topic's partitions, from the consumer's statistics (the last
/// stable offset, which is where a read_committed reader ends).
#[derive(Default)]
struct Ends {
    by_partition: Mutex<BTreeMap<i32, i64>>,
}

impl ClientContext for Ends {
    fn stats(&self, statistics: Statistics) {
        let mut ends = self.by_partition.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for topic in statistics.topics.values() {
            for (partition, stats) in &topic.partitions {
                let end = if stats.ls_offset >= 0 { stats.ls_offset } else { stats.hi_offset };
                if *partition >= 0 && end >= 0 {
                    ends.insert(*partition, end);
                }
            }
        }
    }
}

impl ConsumerContext for Ends {}

struct TablePartition {
    /// The next offset to read: after the last record read, or where reading started.
    next: i64,
    /// The position last written to the store.
    saved: i64,
    /// Where this run started reading, and the end the partition had then.
    start: i64,
    end_at_start: i64,
    /// Read to its end at least once in this run.
    caught_up: bool,
}

/// What reading a table record did.
enum Applied {
    Record,
    EndOfPartition,
    Nothing,
    /// Shut down while waiting for the schema registry.
    Stopped,
}

impl TableFeed {
    /// Opens the table store, puts the engine's tables in it, and assigns every partition of
    /// every table topic to this process, from the stored positions (or the beginning).
    pub fn open(
        settings: &Settings,
        pipeline: &Pipeline,
        instance: &str,
        engine: &mut Engine,
        metrics: Arc<Metrics>,
        status: Arc<Status>,
    ) -> Result<TableFeed, RuntimeError> {
        let directory = settings.state.dir.join(format!("{}-{}-tables", pipeline.name, instance));
        let store = TableStore::open(&directory, &pipeline.tables)?;
        engine.store_tables(|source| store.rows(&source.name));
        let mut readers = Vec::new();
        let names = (format!("{}-tables", pipeline.name), format!("{}-{instance}", pipeline.name));
        for source in &pipeline.tables {
            readers.extend(open_table(settings, source, &store, &names)?);
        }
        Ok(TableFeed { readers, store, metrics, status, last_report: Instant::now() })
    }

    /// Reads every table up to the end its partitions had at start (or later). False when
    /// shut down first.
    pub fn bootstrap(
        &mut self,
        engine: &mut Engine,
        registry: Option<&Registry>,
        health: &Health,
        shutdown: &CancellationToken,
    ) -> Result<bool, RuntimeError> {
        let started = Instant::now();
        health.set_tables_loading(true);
        for reader in &self.readers {
            let (to_read, stored) = reader.partitions.values().fold((0, false), |(sum, stored), partition| {
                (sum + (partition.end_at_start - partition.start).max(0) as u64, stored || partition.start > 0)
            });
            let read_from = if stored { "the stored positions" } else { "the beginning" };
            info!(table = %reader.table, topic = %reader.topic, records = to_read, from = %read_from, "reading the table before the first stream record");
            self.status.table(&reader.table, |progress| {
                progress.state = "bootstrapping".into();
                progress.read_from = read_from.into();
                progress.bootstrap_records += to_read;
            });
        }
        while !self.readers.iter().all(TopicReader::caught_up) {
            if shutdown.is_cancelled() {
                return Ok(false);
            }
            health::beat();
            for index in 0..self.readers.len() {
                if self.readers[index].caught_up() {
                    continue;
                }
                let timeout = Duration::from_millis(50);
                if !self.read(index, engine, registry, health, shutdown, timeout, DRAIN_RECORDS)? {
                    return Ok(false);
                }
            }
            if self.last_report.elapsed() >= REPORT_EVERY {
                self.report(Some(started))?;
            }
        }
        self.report(Some(started))?;
        let seconds = started.elapsed().as_secs_f64();
        for reader in &self.readers {
            self.status.table(&reader.table, |progress| {
                progress.state = "live".into();
                progress.bootstrap_seconds = Some(seconds);
            });
            self.metrics.table_bootstrap_seconds.with_label_values(&[&reader.table]).set(seconds);
        }
        let rows: Vec<(String, u64)> = self.tables().map(|table| (table.to_string(), self.store.estimated_rows(table))).collect();
        info!(seconds, rows = ?rows, "tables read");
        health.set_tables_loading(false);
        Ok(true)
    }

    /// Applies the table records that arrived since the last call (a bounded number). False
    /// when shut down while waiting for the schema registry.
    pub fn drain(
        &mut self,
        engine: &mut Engine,
        registry: Option<&Registry>,
        health: &Health,
        shutdown: &CancellationToken,
    ) -> Result<bool, RuntimeError> {
        for index in 0..self.readers.len() {
            if !self.read(index, engine, registry, health, shutdown, Duration::ZERO, DRAIN_RECORDS)? {
                return Ok(false);
            }
        }
        if self.last_report.elapsed() >= REPORT_EVERY {
            self.report(None)?;
        }
        Ok(true)
    }

    fn tables(&self) -> impl Iterator<Item = &str> {
        let mut names: Vec<&str> = self.readers.iter().map(|reader| reader.table.as_str()).collect();
        names.dedup();
        names.into_iter()
    }

    /// Reads up to `limit` records of one topic, waiting `first_wait` for the first.
    #[allow(clippy::too_many_arguments)]
    fn read(
        &mut self,
        index: usize,
        engine: &mut Engine,
        registry: Option<&Registry>,
        health: &Health,
        shutdown: &CancellationToken,
        first_wait: Duration,
        limit: usize,
    ) -> Result<bool, RuntimeError> {
        let mut wait = first_wait;
        let mut stopped = false;
        let TopicReader { table, topic, avro, consumer, partitions } = &mut self.readers[index];
        let context = Context { registry, health, status: &self.status, metrics: &self.metrics, shutdown };
        for _ in 0..limit {
            let Some(polled) = consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            let applied = match polled {
                Ok(message) => apply(table, *avro, partitions, &message, engine, &context)?,
                Err(KafkaError::PartitionEOF(partition)) => {
                    if let Some(state) = partitions.get_mut(&partition) {
                        state.caught_up = true;
                    }
                    Applied::EndOfPartition
                }
                Err(error) if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) => {
                    // Records not read yet were deleted: the rows may miss their updates.
                    // The next run finds its position out of range and reads the table anew.
                    return Err(RuntimeError::Replay(format!(
                        "table {table} lost records it had not read from {topic} ({error}); reading it again"
                    )));
                }
                Err(error) => {
                    warn!(%table, %topic, %error, "table consumer error; continuing");
                    Applied::Nothing
                }
            };
            match applied {
                Applied::Record => self.metrics.table_records.with_label_values(&[table.as_str()]).inc(),
                Applied::Stopped => {
                    stopped = true;
                    break;
                }
                Applied::EndOfPartition | Applied::Nothing => {}
            }
        }
        engine.flush_tables().map_err(|error| RuntimeError::store("writing table rows", error))?;
        Ok(!stopped)
    }

    /// Writes the positions reached and brings gauges and `/status` up to date.
    fn report(&mut self, bootstrap_started: Option<Instant>) -> Result<(), RuntimeError> {
        self.last_report = Instant::now();
        for reader in &mut self.readers {
            let moved: Vec<(String, i32, i64)> = reader
                .partitions
                .iter()
                .filter(|(_, state)| state.next != state.saved)
                .map(|(partition, state)| (reader.topic.clone(), *partition, state.next))
                .collect();
            if !moved.is_empty() {
                self.store.save_positions(&reader.table, &moved)?;
                for (_, partition, next) in moved {
                    if let Some(state) = reader.partitions.get_mut(&partition) {
                        state.saved = next;
                    }
                }
            }
        }
        let mut by_table: BTreeMap<&str, (i64, u64)> = BTreeMap::new();
        for reader in &self.readers {
            let entry = by_table.entry(&reader.table).or_default();
            entry.0 += reader.lag();
            entry.1 += reader.partitions.values().map(|state| (state.next - state.start).max(0) as u64).sum::<u64>();
        }
        for (table, (lag, read)) in by_table {
            let rows = self.store.estimated_rows(table);
            self.metrics.table_lag.with_label_values(&[table]).set(lag);
            self.metrics.table_rows.with_label_values(&[table]).set(rows as i64);
            self.status.table(table, |progress| {
                progress.lag = lag;
                progress.rows_estimated = rows;
                progress.records_read = read;
                if let Some(started) = bootstrap_started {
                    let seconds = started.elapsed().as_secs_f64();
                    progress.records_per_second = if seconds > 0.0 { read as f64 / seconds } else { 0.0 };
                }
            });
        }
        Ok(())
    }
}

impl TopicReader {
    fn caught_up(&self) -> bool {
        self.partitions.values().all(|state| state.caught_up)
    }

    /// Records between the positions and the ends the consumer last heard of.
    fn lag(&self) -> i64 {
        let ends = self.consumer.context().by_partition.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.partitions
            .iter()
            .map(|(partition, state)| ends.get(partition).map_or(0, |end| (end - state.next).max(0)))
            .sum()
    }
}

/// What applying a table record may need besides the record.
struct Context<'a> {
    registry: Option<&'a Registry>,
    health: &'a Health,
    status: &'a Status,
    metrics: &'a Metrics,
    shutdown: &'a CancellationToken,
}

/// Applies one record of `table` (fetching its Avro writer schema first, the first time its
/// id is met).
fn apply(
    table: &str,
    avro: bool,
    partitions: &mut BTreeMap<i32, TablePartition>,
    message: &BorrowedMessage<'_>,
    engine: &mut Engine,
    context: &Context<'_>,
) -> Result<Applied, RuntimeError> {
    let Context { registry, health, status, metrics, shutdown } = *context;
    let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
    if let (true, Some(registry), Some(id)) = (avro, registry, message.payload().and_then(avro::schema_id)) {
        let writers = engine.writer_schemas().clone();
        if writers.needs_fetch(id) {
            let what = format!("fetching writer schema id {id} of table {table}");
            if !schemas::fetch_writer_schema(registry, &writers, id, &what, health, status, shutdown, None, || Ok(()))? {
                return Ok(Applied::Stopped);
            }
        }
    }
    let provenance = Provenance { topic, partition, offset, timestamp: message.timestamp().to_millis(), headers: InputHeaders::Read(&[]), key: message.key() };
    let input = InputRecord { provenance, key: message.key(), value: message.payload() };
    match engine.apply_table_record(&input) {
        Ok(()) => {}
        Err(TableRecordError::Bad(reason)) => {
            warn!(table, topic, partition, offset, %reason, "skipped a table record: the table keeps the key's row as it was");
            metrics.table_records_skipped.with_label_values(&[table]).inc();
            status.table(table, |progress| {
                progress.skipped_records += 1;
                progress.last_skipped = Some(format!("{topic}[{partition}]@{offset}: {reason}"));
            });
        }
        Err(TableRecordError::Store(reason)) => return Err(RuntimeError::store("writing a table row", reason)),
    }
    if let Some(state) = partitions.get_mut(&partition) {
        state.next = offset + 1;
    }
    Ok(Applied::Record)
}

/// A consumer per topic of `source`, assigned every partition from the stored position (or
/// the beginning, for a table read for the first time or whose stored position no longer
/// fits its topic).
/// `names`: the group id the consumers carry (never joined) and the prefix of their client ids.
fn open_table(settings: &Settings, source: &Source, store: &TableStore, names: &(String, String)) -> Result<Vec<TopicReader>, RuntimeError> {
    let (group, client_prefix) = names;
    let metadata_client: BaseConsumer = clients::admin_config(settings)
        .create()
        .map_err(|error| RuntimeError::Setup(format!("creating a metadata client: {error}")))?;
    let topics: Vec<String> = match &source.topics {
        SourceTopics::List(topics) => topics.clone(),
        SourceTopics::Pattern(pattern) => {
            let metadata = metadata_client
                .fetch_metadata(None, METADATA_TIMEOUT)
                .map_err(|error| RuntimeError::kafka(format!("listing the topics of table {}", source.name), error))?;
            metadata.topics().iter().map(|topic| topic.name().to_string()).filter(|name| pattern.matches(name)).collect()
        }
    };
    let mut layouts = Vec::new();
    let mut out_of_range = false;
    for topic in &topics {
        let partitions = partitions_of(&metadata_client, topic, &source.name)?;
        let mut layout = Vec::new();
        for partition in partitions {
            let (low, high) = metadata_client
                .fetch_watermarks(topic, partition, METADATA_TIMEOUT)
                .map_err(|error| RuntimeError::kafka(format!("reading the end offsets of table topic {topic}"), error))?;
            let stored = store.position(&source.name, topic, partition)?;
            if stored.is_some_and(|position| position < low || position > high) {
                warn!(table = %source.name, topic, partition, ?stored, low, high, "the table's stored position is outside its topic (deleted records, or a topic made anew); reading the table again");
                out_of_range = true;
            }
            layout.push((partition, stored, high));
        }
        layouts.push((topic.clone(), layout));
    }
    if out_of_range {
        store.clear(&source.name)?;
    }
    let mut readers = Vec::new();
    for (topic, layout) in layouts {
        let mut config = clients::admin_config(settings);
        config
            // librdkafka assigns only with a group id; this one never joins (no subscription)
            // and never commits.
            .set("group.id", group)
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // The end of a partition, for the bootstrap to know it read everything.
            .set("enable.partition.eof", "true")
            // A position that fell out of retention is reported (and the table read anew).
            .set("auto.offset.reset", "error")
            // Feeds the lag gauge.
            .set("statistics.interval.ms", "1000");
        clients::keep_fetching(&mut config, settings);
        clients::name_client(&mut config, settings, &format!("{client_prefix}-table-{}", source.name));
        let consumer: BaseConsumer<Ends> = config
            .create_with_context(Ends::default())
            .map_err(|error| RuntimeError::Setup(format!("creating the consumer of table {}: {error}", source.name)))?;
        let mut assignment = TopicPartitionList::new();
        let mut partitions = BTreeMap::new();
        for (partition, stored, end) in layout {
            let stored = stored.filter(|_| !out_of_range);
            let start = stored.unwrap_or(0);
            let offset = stored.map_or(Offset::Beginning, Offset::Offset);
            assignment
                .add_partition_offset(&topic, partition, offset)
                .map_err(|error| RuntimeError::Setup(format!("assigning table topic {topic}: {error}")))?;
            // An empty partition, or one read to its end before, has nothing to wait for.
            let caught_up = start >= end;
            partitions.insert(partition, TablePartition { next: start, saved: start, start, end_at_start: end, caught_up });
        }
        consumer.assign(&assignment).map_err(|error| RuntimeError::kafka(format!("assigning table topic {topic}"), error))?;
        readers.push(TopicReader {
            table: source.name.clone(),
            topic,
            avro: source.encoding == Encoding::Avro,
            consumer,
            partitions,
        });
    }
    Ok(readers)
}

/// The partitions of a table topic, waiting a moment for one created just before.
fn partitions_of(client: &BaseConsumer, topic: &str, table: &str) -> Result<Vec<i32>, RuntimeError> {
    let deadline = Instant::now() + MISSING_TOPIC_PATIENCE;
    let mut pauses = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        let metadata = client
            .fetch_metadata(Some(topic), METADATA_TIMEOUT)
            .map_err(|error| RuntimeError::kafka(format!("reading the metadata of table topic {topic}"), error))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|found| found.name() == topic && found.error().is_none())
            .flat_map(|found| found.partitions().iter().map(|partition| partition.id()))
            .collect();
        if !partitions.is_empty() {
            return Ok(partitions);
        }
        if Instant::now() > deadline {
            return Err(RuntimeError::Setup(format!("table topic '{topic}' (of table {table}) does not exist; create it first")));
        }
        std::thread::sleep(pauses.pause());
    }
}

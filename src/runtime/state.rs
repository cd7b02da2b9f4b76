//! Crash-proof state: every stateful step has a compacted changelog topic,
//! `<pipeline>-<step>-changelog`, with as many partitions as the input; the state of the task
//! for input partition p lives in changelog partition p. A batch's state changes are produced
//! in the batch's transaction, so the changelog holds exactly the state of the committed
//! offsets. A partition's state is rebuilt from its changelog when the partition is assigned
//! and after an abort (which drops the aborted batch's in-memory changes): first from the
//! local RocksDB cache (`super::store`), which records the changelog offsets it reaches, then
//! from the changelog's tail past them. The operators still hold their state in memory while
//! they run (issue: state beyond memory).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use super::clients;
use super::health;
use super::status::Status;
use super::error::RuntimeError;
use super::store::{counts_as_key, StateStore, StoreWrite};
use super::topics;
use crate::config::Settings;
use crate::operators::CorruptState;
use crate::engine::{ChangelogEntry, Engine, WATERMARK_KEY};
use crate::telemetry::metrics::Metrics;

/// The changelog topic of each stateful step.
#[derive(Debug, Clone, Default)]
pub struct Changelogs {
    topics: BTreeMap<usize, String>,
}

impl Changelogs {
    pub fn new(pipeline_name: &str, stateful_steps: &[usize]) -> Changelogs {
        Changelogs {
            topics: stateful_steps.iter().map(|step| (*step, format!("{pipeline_name}-{step}-changelog"))).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    pub fn topics(&self) -> impl Iterator<Item = &String> {
        self.topics.values()
    }

    pub fn topic(&self, step: usize) -> Option<&str> {
        self.topics.get(&step).map(String::as_str)
    }

    pub fn step(&self, topic: &str) -> Option<usize> {
        self.topics.iter().find(|(_, name)| name.as_str() == topic).map(|(step, _)| *step)
    }
}

/// The Kafka key and value of a changelog record: key `[input topic or null, state key]`
/// (what compaction keeps the last value of), value the state as JSON, or none to delete.
pub fn encode(entry: &ChangelogEntry) -> (Vec<u8>, Option<Vec<u8>>) {
    let key = super::store::changelog_key(entry.topic.as_deref(), &entry.key);
    // The same text as `to_string`, without the formatter between (Display goes through
    // `fmt::Write`); serializing a JSON value cannot fail.
    (key, entry.value.as_ref().map(|value| serde_json::to_vec(value).unwrap_or_default()))
}

/// A changelog key, `[owner topic or null, state key]`, borrowed where it has no escapes
/// (a topic name never has any).
#[derive(serde::Deserialize)]
struct ChangelogKey<'a>(#[serde(borrow)] Option<Cow<'a, str>>, #[serde(borrow)] Cow<'a, str>);

fn decode_key(key: &[u8]) -> Result<ChangelogKey<'_>, CorruptState> {
    serde_json::from_slice(key).map_err(|error| CorruptState(format!("changelog key is not [topic, key]: {error}")))
}

fn decode(step: usize, partition: i32, key: &[u8], value: Option<&[u8]>) -> Result<ChangelogEntry, CorruptState> {
    let ChangelogKey(topic, state_key) = decode_key(key)?;
    let (topic, state_key) = (topic.map(Cow::into_owned), state_key.into_owned());
    let value = match value {
        None => None,
        Some(bytes) => Some(serde_json::from_slice(bytes).map_err(|error| CorruptState(format!("changelog value is not JSON: {error}")))?),
    };
    Ok(ChangelogEntry { topic, partition, step, key: state_key, value })
}

/// The longest a local store's position in a changelog stays trustworthy: half the 24 hours
/// of `delete.retention.ms` weir gives the changelogs it creates.
const STORE_TRUSTED_FOR: Duration = Duration::from_secs(12 * 3600);

/// How long a local store's position in a changelog whose tombstones are kept for
/// `delete_retention` stays trustworthy. A store older than that may have missed a deletion
/// that compaction has since removed from the changelog, and would bring the deleted state
/// back (a closed window emitted twice, an expired dedup key dropping new records); half the
/// retention leaves room for clocks and for a store written just before a tombstone.
pub fn store_trusted_for(delete_retention: Duration) -> Duration {
    STORE_TRUSTED_FOR.min(delete_retention / 2)
}

/// How often a long restore logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// How often a restore's progress on /status is brought up to date.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// A restore shown on /status, taken off when it ends.
struct ShownRestore<'a> {
    status: &'a Status,
    changelog: &'a str,
    partition: i32,
}

impl Drop for ShownRestore<'_> {
    fn drop(&mut self) {
        self.status.restored(self.changelog, self.partition);
    }
}

/// Changelog entries read between looks at the clock while restoring.
const CLOCK_EVERY: u32 = 256;

/// Changelog entries written to the store at a time while restoring.
const STORE_CHUNK: usize = 10_000;

/// The store's trust window per stateful step, from its changelog's effective
/// `delete.retention.ms` (which someone may have lowered, or which a changelog created before
/// weir set it has from the cluster's default). Unreadable configs (no DescribeConfigs
/// permission) leave the longest window, which matches the retention weir sets itself.
fn trust_windows(settings: &Settings, changelogs: &Changelogs) -> BTreeMap<usize, Duration> {
    let topics: Vec<&str> = changelogs.topics().map(String::as_str).collect();
    if topics.is_empty() {
        return BTreeMap::new();
    }
    let retention = match topics::delete_retention(settings, &topics) {
        Ok(retention) => retention,
        Err(error) => {
            warn!(%error, trusted_for = ?STORE_TRUSTED_FOR, "cannot read the changelogs' delete.retention.ms; trusting the local store for the longest window");
            return BTreeMap::new();
        }
    };
    let mut windows = BTreeMap::new();
    for (topic, delete_retention) in retention {
        let Some(step) = changelogs.step(&topic) else { continue };
        let trusted_for = store_trusted_for(delete_retention);
        if trusted_for < STORE_TRUSTED_FOR {
            info!(changelog = %topic, ?delete_retention, ?trusted_for, "the changelog keeps tombstones for less than a day; the local store is trusted for half of that");
        }
        windows.insert(step, trusted_for);
    }
    windows
}

/// Reads changelog partitions back into the engine.
pub struct Restorer {
    consumer: BaseConsumer,
    /// Reads the changelogs' end offsets (see `new`).
    bounds: BaseConsumer,
    changelogs: Changelogs,
    metrics: Arc<Metrics>,
    /// Where a restore shows its progress (`/status`).
    status: Arc<Status>,
    /// How long a restore may make no progress: an open transaction (of a crashed process)
    /// may hold the end of a changelog that long.
    patience: Duration,
    /// How long the local store is trusted, per stateful step (see [`store_trusted_for`]).
    trusted_for: BTreeMap<usize, Duration>,
}

impl Restorer {
    pub fn new(
        settings: &Settings,
        pipeline_name: &str,
        changelogs: Changelogs,
        metrics: Arc<Metrics>,
        status: Arc<Status>,
    ) -> Result<Restorer, RuntimeError> {
        let mut config = clients::admin_config(settings);
        config
            // librdkafka's assign needs a group id; this consumer never joins or commits.
            .set("group.id", format!("{pipeline_name}-state-restore"))
            // Only committed state: an aborted batch's changes must never come back.
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // A start outside the changelog (records deleted under it) is an error the restore
            // answers by reading again from the start, never a silent jump to the end (R20).
            .set("auto.offset.reset", "error");
        // A restore empties the prefetch queue faster than librdkafka's 1 s backoff once it
        // is full (without this, the read stood idle most of the time), and ends at a known
        // end, where a fetch must not wait for more.
        clients::read_to_end(&mut config, settings);
        let consumer = config
            .create()
            .map_err(|error| RuntimeError::Setup(format!("creating the changelog reader: {error}")))?;
        // Its connection and metadata, made now: left to the first assign, they cost that
        // partition's restore about half a second (measured: 500 ms there, 50 ms here).
        // Unreachable, the restore itself reports it.
        if let Some(changelog) = changelogs.topics.values().next() {
            let _ = rdkafka::consumer::Consumer::fetch_metadata(&consumer, Some(changelog), Duration::from_secs(5));
        }
        // A read_committed client's end offset is the last stable offset, which stays at the
        // start of a just-committed transaction until its markers are written (after the
        // commit returned): a restore must read to the real end, waiting for them.
        let bounds = clients::admin_config(settings)
            .set("isolation.level", "read_uncommitted")
            .create()
            .map_err(|error| RuntimeError::Setup(format!("creating the changelog reader: {error}")))?;
        let trusted_for = trust_windows(settings, &changelogs);
        Ok(Restorer {
            consumer,
            bounds,
            changelogs,
            metrics,
            status,
            patience: settings.kafka.transaction_timeout * 3 + Duration::from_secs(30),
            trusted_for,
        })
    }

    /// Rebuilds the state of input partition (`topic`, `partition`): from the local store,
    /// then the changelog from the offset the store reached (or all of it).
    pub fn restore(
        &self,
        engine: &mut Engine,
        store: Option<&StateStore>,
        topic: &str,
        partition: i32,
    ) -> Result<(u64, u64), RuntimeError> {
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            match self.restore_once(engine, store, topic, partition)? {
                Restored::Reached { from_store, from_changelog } => {
                    info!(
                        %topic, partition, from_store, from_changelog,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "restored state"
                    );
                    return Ok((from_store, from_changelog));
                }
                Restored::OutOfRange { step, changelog } if attempts < OUT_OF_RANGE_ATTEMPTS => {
                    attempts += 1;
                    warn!(
                        %changelog, partition,
                        "the changelog no longer holds the offset the restore reads from (records were deleted under it); \
                         restoring again from its start, without the local store's copy of it. State only the deleted records held is lost"
                    );
                    if let Some(store) = store {
                        store.clear(step, partition)?;
                    }
                }
                // Cleared, the store cannot fail the same way twice: one more attempt reads
                // the changelog whole.
                Restored::StoreCorrupt { step, changelog, reason } if attempts < OUT_OF_RANGE_ATTEMPTS => {
                    attempts += 1;
                    warn!(
                        %changelog, partition, %reason,
                        "the local store's copy of this state does not read back; deleting it and restoring from the changelog"
                    );
                    if let Some(store) = store {
                        store.clear(step, partition)?;
                    }
                }
                Restored::StoreCorrupt { reason, .. } => return Err(RuntimeError::CorruptState(reason)),
                Restored::OutOfRange { changelog, .. } => {
                    return Err(RuntimeError::Replay(format!(
                        "restoring partition {partition} from {changelog}: its start moved {OUT_OF_RANGE_ATTEMPTS} times while it was read; \
                         the run starts again"
                    )));
                }
            }
        }
    }

    /// One attempt of [`Self::restore`].
    fn restore_once(
        &self,
        engine: &mut Engine,
        store: Option<&StateStore>,
        topic: &str,
        partition: i32,
    ) -> Result<Restored, RuntimeError> {
        engine.drop_input_partition(topic, partition);
        let (mut from_store, mut from_changelog) = (0u64, 0u64);
        // The state behind `topic`: these steps' entries made for its owners (the source
        // topic, both of a join's pair, or None after a repartition).
        let (steps, owners) = engine.restore_scope(topic);
        let changelogs: Vec<(usize, String)> = self
            .changelogs
            .topics
            .iter()
            .filter(|(step, _)| steps.contains(step))
            .map(|(step, name)| (*step, name.clone()))
            .collect();
        for (step, changelog) in changelogs {
            let (low, high) = self
                .bounds
                .fetch_watermarks(&changelog, partition, Duration::from_secs(30))
                .map_err(|error| RuntimeError::kafka(format!("reading the end of {changelog}[{partition}]"), error))?;
            let mut start = Offset::Beginning;
            if let Some(store) = store {
                match store.offset(step, partition)? {
                    // Older than that, compaction may have dropped tombstones the cache never
                    // saw (delete.retention.ms, 24 hours by default): rebuild instead.
                    Some((reached, age))
                        if reached >= low && reached <= high && age < self.trusted_for.get(&step).copied().unwrap_or(STORE_TRUSTED_FOR) =>
                    {
                        let loaded = match load_from_store(engine, store, step, partition, &owners) {
                            Err(RuntimeError::CorruptState(reason)) => return Ok(Restored::StoreCorrupt { step, changelog, reason }),
                            loaded => loaded?,
                        };
                        from_store += loaded;
                        self.metrics.state_restored_records.inc_by(loaded);
                        start = Offset::Offset(reached);
                    }
                    // The changelog was recreated or truncated since: the cache is worthless.
                    // With no offset, what the store holds is a read that stopped before
                    // its end (`read_changelog`): it is cleared too, since the changelog
                    // may have compacted away a key it holds, with its tombstone.
                    Some(_) | None => store.clear(step, partition)?,
                }
            }
            let begin = match start {
                Offset::Offset(offset) => offset,
                _ => low,
            };
            if high <= begin {
                continue;
            }
            match self.read_changelog(engine, store, &owners, step, &changelog, partition, start, high)? {
                Some(restored) => from_changelog += restored,
                None => return Ok(Restored::OutOfRange { step, changelog }),
            }
        }
        Ok(Restored::Reached { from_store, from_changelog })
    }

    /// Reads one changelog partition from `start` to `end` into the engine and the store.
    /// Gives up only when it makes no progress for `patience`; a long read records its
    /// position in the store every chunk, so a read cut short goes on from there (R3). None:
    /// `start` is no longer in the changelog.
    #[allow(clippy::too_many_arguments)]
    fn read_changelog(
        &self,
        engine: &mut Engine,
        store: Option<&StateStore>,
        owners: &[Option<String>],
        step: usize,
        changelog: &str,
        partition: i32,
        start: Offset,
        end: i64,
    ) -> Result<Option<u64>, RuntimeError> {
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(changelog, partition, start)
            .map_err(|error| RuntimeError::kafka(format!("assigning {changelog}[{partition}]"), error))?;
        self.consumer
            .assign(&assignment)
            .map_err(|error| RuntimeError::kafka(format!("assigning {changelog}"), error))?;
        let (mut restored, mut bytes) = (0u64, 0u64);
        let mut writes = Vec::new();
        let through = engine.reads_through_store(step);
        // The store's key count of a step reading through it: where one is kept (a read of
        // the tail), each entry moves it, by whether its key existed before (this chunk's
        // keys, then the store answer for that, which also gives the timer to clear);
        // where none is (a read of the whole changelog), the keys are counted once the read
        // ends, which is cheaper.
        let counted = match store {
            Some(store) if through => store.kept_count(step, partition)?.is_some(),
            _ => false,
        };
        // A read that counts the keys at its end rewrites nothing it cannot rewrite again:
        // its entries skip the store's write-ahead log (a fifth of the read's time) and are
        // flushed at the end, before the offset they reach is written. A crash before that
        // leaves the offset where it was, and the read starts over from there.
        let unlogged = store.is_some() && through && !counted;
        let mut chunk = super::restore_chunk::ChunkKeys::default();
        // The offset after the last entry read, and when the read last moved.
        let mut next = match start {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        };
        let mut position_seen = None;
        let started = Instant::now();
        let mut progressed = Instant::now();
        let mut next_report = Instant::now() + PROGRESS_EVERY;
        let mut next_status = Instant::now();
        // Off /status however the read ends.
        let _shown = ShownRestore { status: &self.status, changelog, partition };
        // Entries read since the clock was last looked at: once per CLOCK_EVERY entries, and
        // whenever the read waits.
        let mut unclocked = 0u32;
        let reached = loop {
            if unclocked == 0 || unclocked >= CLOCK_EVERY {
                let now = Instant::now();
                if unclocked > 0 {
                    progressed = now;
                }
                unclocked = 0;
                // A long restore is the loop at work, not a stuck loop.
                health::beat();
                if now >= next_status {
                    next_status = now + STATUS_EVERY;
                    self.status.restoring(changelog, partition, (restored, bytes), next, end, started);
                }
                if now >= next_report {
                    next_report = now + PROGRESS_EVERY;
                    info!(%changelog, partition, restored, position = next, end, "restoring state");
                }
            }
            if let (Some(store), true) = (store, writes.len() >= STORE_CHUNK) {
                chunk.flush(step, partition, counted, &mut writes);
                if unlogged {
                    store.apply_unlogged(&std::mem::take(&mut writes))?;
                } else {
                    let reached: Vec<(usize, i32, i64)> = next.map(|next| (step, partition, next)).into_iter().collect();
                    store.apply(&std::mem::take(&mut writes), &reached, &[])?;
                }
            }
            // Read to the end: nothing is left to wait for.
            if let Some(next) = next
                && next >= end
            {
                break next;
            }
            // Short waits: past the last entry there may be only transaction markers, which
            // the position below moves over, and a long poll would idle for its whole length.
            match self.consumer.poll(Duration::from_millis(10)) {
                Some(Ok(message)) => {
                    let (key, value) = (message.key().unwrap_or_default(), message.payload());
                    bytes += (key.len() + value.map_or(0, <[u8]>::len)) as u64;
                    let corrupt = |error: CorruptState| RuntimeError::CorruptState(format!("{changelog}[{partition}]@{}: {error}", message.offset()));
                    writes.push(StoreWrite::state(step, partition, key.to_vec(), value.map(<[u8]>::to_vec)));
                    next = Some(message.offset() + 1);
                    unclocked += 1;
                    if through {
                        // The step reads the store: it needs the entry's timer there, not
                        // the entry in memory (only the input watermarks go to the engine).
                        let ChangelogKey(owner, state_key) = decode_key(key).map_err(corrupt)?;
                        let is_watermark = state_key == WATERMARK_KEY;
                        if counts_as_key(&state_key) {
                            let timer = value.and_then(|value| engine.timer_of(step, &state_key, value));
                            // On a read of the tail, what the store held before this chunk.
                            let stored = |state_key: &str| match (store, counted) {
                                (Some(store), true) => {
                                    let old = store.entry(step, partition, key)?;
                                    Ok(Some((old.is_some(), old.and_then(|old| engine.timer_of(step, state_key, &old)))))
                                }
                                _ => Ok(None),
                            };
                            chunk.note(key, (owner, state_key), timer, value.is_some(), stored)?;
                        }
                        if !is_watermark {
                            restored += 1;
                            self.metrics.state_restored_records.inc();
                            continue;
                        }
                    }
                    let entry = decode(step, partition, key, value).map_err(corrupt)?;
                    // Several owners share changelog partition numbers.
                    if owners.contains(&entry.topic) {
                        engine.restore(&entry).map_err(|error| RuntimeError::CorruptState(error.0))?;
                        restored += 1;
                        self.metrics.state_restored_records.inc();
                    }
                    continue;
                }
                Some(Err(error)) if is_out_of_range(&error) => {
                    let _ = self.consumer.unassign();
                    return Ok(None);
                }
                Some(Err(error)) => return Err(RuntimeError::kafka(format!("reading {changelog}"), error)),
                None => {}
            }
            if unclocked > 0 {
                progressed = Instant::now();
                unclocked = 0;
            }
            // Positions move past transaction markers; under read_committed they stop at the
            // last stable offset, so this waits for any open transaction to end.
            let positions = self.consumer.position().map_err(|error| RuntimeError::kafka(format!("reading the position in {changelog}"), error))?;
            let position = match positions.find_partition(changelog, partition).map(|element| element.offset()) {
                Some(Offset::Offset(position)) => Some(position),
                _ => None,
            };
            if let Some(position) = position
                && position >= end
            {
                break position;
            }
            if position != position_seen {
                position_seen = position;
                progressed = Instant::now();
            }
            if progressed.elapsed() > self.patience {
                return Err(RuntimeError::ChangelogStuck { changelog: changelog.to_string(), partition, waited: self.patience });
            }
        };
        let _ = self.consumer.unassign();
        if let Some(store) = store {
            chunk.flush(step, partition, counted, &mut writes);
            if unlogged {
                store.apply_unlogged(&writes)?;
                store.flush_step(step)?;
                store.apply(&[], &[(step, partition, reached)], &[])?;
            } else {
                store.apply(&writes, &[(step, partition, reached)], &[])?;
            }
            if through && !counted {
                store.recount(step, partition)?;
            }
        }
        Ok(Some(restored))
    }
}

/// How often a restore starts again when the changelog's start moves past its position.
const OUT_OF_RANGE_ATTEMPTS: u32 = 3;

/// How one restore attempt ended.
enum Restored {
    Reached { from_store: u64, from_changelog: u64 },
    /// `step`'s changelog no longer holds the offset the read was at.
    OutOfRange { step: usize, changelog: String },
    /// The local store's copy of `step`'s state does not decode.
    StoreCorrupt { step: usize, changelog: String, reason: String },
}

/// The restore consumer's answer to a position outside the log (`auto.offset.reset=error`).
fn is_out_of_range(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode;
    matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange))
}

/// Puts back what a step needs in memory of its committed state for one changelog
/// partition, for the tasks of `owners`: every stateful step reads its entries through the
/// store, so only the input watermarks kept beside them. Returns the entries put back.
fn load_from_store(engine: &mut Engine, store: &StateStore, step: usize, partition: i32, owners: &[Option<String>]) -> Result<u64, RuntimeError> {
    let mut loaded = 0u64;
    for owner in owners {
        let Some(value) = store.get(step, partition, owner.as_deref(), WATERMARK_KEY)? else { continue };
        let key = super::store::changelog_key(owner.as_deref(), WATERMARK_KEY);
        let entry = decode(step, partition, &key, Some(&value)).map_err(|error| RuntimeError::CorruptState(error.0))?;
        if owners.contains(&entry.topic) {
            engine.restore(&entry).map_err(|error| RuntimeError::CorruptState(error.0))?;
            loaded += 1;
        }
    }
    Ok(loaded)
}

/// `mode: idempotent_upsert`: the state behind an input partition, from the local store
/// alone (there are no changelogs; the store holds the offsets the state is at).
pub fn restore_local(engine: &mut Engine, store: &StateStore, topic: &str, partition: i32) -> Result<u64, RuntimeError> {
    let started = Instant::now();
    engine.drop_input_partition(topic, partition);
    let (steps, owners) = engine.restore_scope(topic);
    let mut restored = 0u64;
    for step in steps {
        restored += load_from_store(engine, store, step, partition, &owners)?;
    }
    info!(%topic, partition, from_store = restored, elapsed_ms = started.elapsed().as_millis() as u64, "restored state");
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_is_trusted_for_half_the_tombstone_retention_and_never_over_twelve_hours() {
        let hours = |hours: u64| Duration::from_secs(hours * 3600);
        assert_eq!(store_trusted_for(hours(24)), hours(12), "the retention weir sets itself");
        assert_eq!(store_trusted_for(hours(24 * 7)), hours(12), "a longer retention does not lengthen trust");
        assert_eq!(store_trusted_for(Duration::from_secs(60)), Duration::from_secs(30));
        assert_eq!(store_trusted_for(Duration::ZERO), Duration::ZERO, "tombstones dropped at once: never trusted");
    }
}

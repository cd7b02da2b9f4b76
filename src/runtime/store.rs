//! The local state store: RocksDB under `state.dir`, a cache of the changelog topics.
//!
//! One column family per stateful step holds the committed state of every partition this
//! process has owned (keys prefixed by the partition number); the `offsets` family records,
//! per (step, changelog partition), the changelog offset the cache has reached. A batch's
//! state changes are written in one WriteBatch together with those offsets, only after its
//! transaction committed, so the cache never holds uncommitted state. Restoring a partition
//! loads the cache and then reads only the changelog from the recorded offset on; a crash at
//! any point leaves the cache at or behind the changelog, never ahead, and never wiped.
//!
//! Steps that read their committed state in place ([`crate::operators::committed`]) do so
//! through a [`StoreView`], and keep their timers in a `timers-<step>` family, ordered by
//! time under each (partition, owner topic). Timers are not in the changelog: they follow
//! from the state, and whatever writes state here (a commit, a restore) writes them too. A
//! store made before timers existed (no `format` entry) gets them built once when it opens.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rocksdb::{BlockBasedIndexType, BlockBasedOptions, Cache, DBCompressionType, LruCacheOptions, Options, ReadOptions, WriteBatch, WriteBufferManager, DB};
use tracing::warn;

use super::error::RuntimeError;
use super::rocks::{is_lock_held, open_waiting_for_lock};
use crate::codec::json;
use crate::operators::committed::StateBacking;
use crate::runtime::TopicPartitionOffset;

const OFFSETS: &str = "offsets";

/// The entry of the `offsets` family that says how the store is laid out: none, made before
/// timers were kept; "2", with timers for dedups only; "3", for running aggregates too; "4",
/// for tumbling and hopping windows too, with each step's key count per partition; "5", for
/// session windows and joins too (see [`StateStore::open`]); "6", with dedup's group timers
/// ([`crate::operators::committed::StoreTimers::set_group`]), unknown to format 5 (which,
/// seeing "6", builds its own timers again). A store of "5" needs nothing built for "6".
const FORMAT_KEY: &[u8] = b"format";
const FORMAT: &[u8] = b"6";
const FORMAT_5: &[u8] = b"5";

/// Memtable size per column family, and the write-ahead log size that forces flushes.
const MEMTABLE_BYTES: usize = 16 << 20;
const WAL_LIMIT: u64 = 64 << 20;

/// How much memory the store may use (`state.cache_mib`, `state.write_buffers_mib`).
#[derive(Debug, Clone, Copy)]
pub struct StoreMemory {
    /// The block cache all families share: what state reads keep in memory, with the index
    /// and filter blocks.
    pub cache_bytes: usize,
    /// All memtables together; a family's memtable is flushed early to stay under it.
    pub write_buffer_bytes: usize,
}

impl Default for StoreMemory {
    fn default() -> StoreMemory {
        StoreMemory { cache_bytes: 32 << 20, write_buffer_bytes: 64 << 20 }
    }
}

impl StoreMemory {
    pub fn of(settings: &crate::config::StateSettings) -> StoreMemory {
        StoreMemory { cache_bytes: settings.cache_mib << 20, write_buffer_bytes: settings.write_buffers_mib << 20 }
    }
}

/// Each family's options: bloom filters (a dedup asks mostly for keys that are not there) and
/// the shared block cache, which also holds the index and filter blocks, so that memory stays
/// bounded however large the state grows. Filters and indexes are partitioned: a whole-file
/// filter of a large file (megabytes) does not fit a shard of the cache, and was read back
/// from disk on every lookup.
fn family_options(name: &str, cache: &Cache, memory: StoreMemory) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    // Timers are only scanned, never looked up one by one: no filter for them.
    if !name.starts_with("timers-") {
        table.set_bloom_filter(10.0, false);
    }
    table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_partition_filters(true);
    table.set_metadata_block_size(4096);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_top_level_index_and_filter(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    table.set_optimize_filters_for_memory(true);
    let mut options = Options::default();
    options.set_write_buffer_size(MEMTABLE_BYTES.min(memory.write_buffer_bytes / 2).max(1 << 20));
    options.set_block_based_table_factory(&table);
    // Level 0 takes every flush, and its files are soon compacted into level 1: left
    // uncompressed (one compression and one decompression less per entry written). Every
    // level below it takes the list's last entry, LZ4. Timers from level 0 on: a dedup's
    // group timers hold a batch's keys in one value, which no key prefix sharing shrinks.
    let level_zero = if name.starts_with("timers-") { DBCompressionType::Lz4 } else { DBCompressionType::None };
    options.set_compression_per_level(&[level_zero, DBCompressionType::Lz4]);
    if name == OFFSETS {
        options.set_merge_operator_associative("weir-add-counts", add_counts);
    }
    options
}

/// The merge of key counts (the only entries of `offsets` ever merged): the sum of the
/// deltas, as a little-endian i64.
fn add_counts(_key: &[u8], existing: Option<&[u8]>, deltas: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    let sum = existing.into_iter().chain(deltas).map(count_of).fold(0i64, i64::saturating_add);
    Some(sum.to_le_bytes().to_vec())
}

fn count_of(bytes: &[u8]) -> i64 {
    bytes.try_into().map(i64::from_le_bytes).unwrap_or(0)
}

/// Whether a state key is a step's own entry (dedup keys and aggregate groups are JSON
/// objects, windows JSON arrays), not the bookkeeping beside them (input watermarks, the
/// processing sequence).
pub fn counts_as_key(state_key: &str) -> bool {
    state_key.starts_with(['{', '['])
}

pub struct StateStore {
    db: Arc<DB>,
    /// The database's options, which carry its statistics (block cache hits and misses).
    options: Options,
    cache: Cache,
    /// The cache hits and misses reported so far.
    reported: Mutex<(u64, u64)>,
    path: PathBuf,
    /// Every column family's name.
    families: Vec<String>,
    /// The first read a [`StoreView`] could not make (a broken store): the batch it served
    /// must not commit.
    failure: Arc<Mutex<Option<String>>>,
    /// Which state keys each step's family may hold, so that views skip reading absent ones.
    filters: Arc<KeyFilters>,
}

/// Which family a write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// A step's state, by changelog key.
    State,
    /// A step's timers, by [`timer_key`].
    Timers,
    /// A change in the number of a step's keys in one partition (the value: an i64 delta).
    Count,
}

/// One committed write: the step's changelog key (or timer key), and the value (None
/// deletes).
pub struct StoreWrite {
    pub step: usize,
    pub partition: i32,
    pub family: Family,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

impl StoreWrite {
    /// A state entry, by its changelog key.
    pub fn state(step: usize, partition: i32, key: Vec<u8>, value: Option<Vec<u8>>) -> StoreWrite {
        StoreWrite { step, partition, family: Family::State, key, value }
    }

    /// Keys added (or, negative, removed) in a step's state of one partition.
    pub fn count(step: usize, partition: i32, delta: i64) -> StoreWrite {
        StoreWrite { step, partition, family: Family::Count, key: Vec::new(), value: Some(delta.to_le_bytes().to_vec()) }
    }

    /// A timer at `time` for `key`, set (holding `value`: nothing, or a group's members) or
    /// cleared.
    pub fn timer(step: usize, partition: i32, owner: Option<&str>, time: i64, key: &str, set: bool, value: Vec<u8>) -> StoreWrite {
        let value = set.then_some(value);
        StoreWrite { step, partition, family: Family::Timers, key: timer_key(owner, time, key), value }
    }
}

fn family(step: usize) -> String {
    format!("step-{step}")
}

fn timer_family(step: usize) -> String {
    format!("timers-{step}")
}

fn partition_prefix(partition: i32) -> Vec<u8> {
    format!("{partition:010}/").into_bytes()
}

/// The first key after every key of a partition.
fn partition_end(partition: i32) -> Vec<u8> {
    format!("{partition:010}0").into_bytes()
}

/// `writes` by family and store key (a partition's prefix sorts as its number), for the
/// memtables: RocksDB's skip list looks for an entry's place from where it put the last one,
/// so entries in key order take a few comparisons each, where entries in the order the steps
/// gave them (the changelog's) took a search from the top each. The sort is stable: two
/// writes of one key keep their order, and the later one still wins.
fn in_key_order(writes: &[StoreWrite]) -> Vec<&StoreWrite> {
    let mut sorted: Vec<&StoreWrite> = writes.iter().collect();
    sorted.sort_by(|a, b| (a.step, a.family, a.partition, &a.key).cmp(&(b.step, b.family, b.partition, &b.key)));
    sorted
}

/// The changelog key of a state entry, `[owner topic or null, state key]`: the key the
/// changelog record and the store use.
pub fn changelog_key(owner: Option<&str>, key: &str) -> Vec<u8> {
    // What `serde_json::to_vec(&(owner, key))` writes, written in place: room for the quotes
    // and a few escapes, then the two strings.
    let mut bytes = Vec::with_capacity(owner.map_or(4, str::len) + key.len() + key.len() / 2 + 8);
    bytes.push(b'[');
    json::write_optional_string(&mut bytes, owner);
    bytes.push(b',');
    json::write_string(&mut bytes, key);
    bytes.push(b']');
    bytes
}

/// A timer's key under its partition: the owner topic as JSON (which holds no NUL), a NUL,
/// the time as big-endian bytes with the sign flipped (so bytes sort as times do), the state
/// key.
fn timer_key(owner: Option<&str>, time: i64, key: &str) -> Vec<u8> {
    // Made once per timer set or cleared: one allocation, the owner's quotes and NUL, the time.
    let mut bytes = Vec::with_capacity(owner.map_or(4, str::len) + 3 + 8 + key.len());
    push_timer_owner(&mut bytes, owner);
    bytes.extend_from_slice(&time_bytes(time));
    bytes.extend_from_slice(key.as_bytes());
    bytes
}

/// The owner topic as JSON and a NUL: what every timer key of a task starts with (after its
/// partition's prefix).
fn push_timer_owner(bytes: &mut Vec<u8>, owner: Option<&str>) {
    json::write_optional_string(bytes, owner);
    bytes.push(0);
}

fn time_bytes(time: i64) -> [u8; 8] {
    ((time as u64) ^ (1 << 63)).to_be_bytes()
}

fn time_of(bytes: &[u8]) -> Option<i64> {
    Some((u64::from_be_bytes(bytes.try_into().ok()?) ^ (1 << 63)) as i64)
}

fn now_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

fn offset_key(step: usize, partition: i32) -> Vec<u8> {
    format!("{step}/{partition}").into_bytes()
}

/// A step's key count in one partition (see [`StateStore::key_count`]).
fn count_key(step: usize, partition: i32) -> Vec<u8> {
    format!("count/{step}/{partition}").into_bytes()
}

/// `mode: idempotent_upsert`: the next input offset to read, kept with the state it produced.
fn input_key(topic: &str, partition: i32) -> Vec<u8> {
    format!("input/{partition}/{topic}").into_bytes()
}

/// The timer a step needs for a committed entry (its state key and the JSON text of its
/// value), or None.
pub type TimerOf<'a> = &'a dyn Fn(usize, &str, &[u8]) -> Option<i64>;

impl StateStore {
    /// Opens (or creates) the store. Another process with the same instance may still hold
    /// it for a moment (a zombie being fenced), so a held lock is waited for.
    /// A store of another state generation (the state was reset since) is a stale cache and
    /// is deleted first.
    /// `timer_of` gives the timer a step's committed value needs (steps that read through
    /// the store), for building the timers of a store made before they were kept.
    /// `rebuildable`: the changelogs hold the state (not in upsert mode), so a store that
    /// cannot be opened (corrupt files) is deleted, with a warning, and rebuilt from them.
    pub fn open(
        directory: &Path,
        steps: &[usize],
        generation: &str,
        memory: StoreMemory,
        rebuildable: bool,
        timer_of: TimerOf,
    ) -> Result<StateStore, RuntimeError> {
        let generation_file = directory.join("GENERATION");
        let cached = std::fs::read_to_string(&generation_file).ok();
        if cached.as_deref().is_some_and(|cached| cached.trim() != generation) {
            warn!(path = %directory.display(), "the local state is from before a state reset; deleting it");
            std::fs::remove_dir_all(directory)
                .map_err(|error| RuntimeError::Setup(format!("deleting the stale state {}: {error}", directory.display())))?;
        }
        std::fs::create_dir_all(directory)
            .map_err(|error| RuntimeError::Setup(format!("creating the state directory {}: {error}", directory.display())))?;
        if cached.as_deref().map(str::trim) != Some(generation) {
            std::fs::write(&generation_file, generation)
                .map_err(|error| RuntimeError::Setup(format!("writing {}: {error}", generation_file.display())))?;
        }
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        // What a restart after a crash replays is the write-ahead log of what was not yet
        // flushed: small memtables and a bounded log keep that to a fraction of a second.
        // (The `offsets` family takes a tiny write every batch and would otherwise keep
        // every log file alive.)
        options.set_max_total_wal_size(WAL_LIMIT);
        // For the cache's hit ratio: counters only, no timers.
        options.enable_statistics();
        options.set_statistics_level(rocksdb::statistics::StatsLevel::ExceptHistogramOrTimers);
        let names: Vec<String> = steps
            .iter()
            .flat_map(|step| [family(*step), timer_family(*step)])
            .chain([OFFSETS.to_string()])
            .collect();
        // 16 shards rather than 64: each shard holds a sixteenth of the cache.
        let mut cache_options = LruCacheOptions::default();
        cache_options.set_capacity(memory.cache_bytes);
        cache_options.set_num_shard_bits(4);
        let cache = Cache::new_lru_cache_opts(&cache_options);
        let manager = WriteBufferManager::new_write_buffer_manager(memory.write_buffer_bytes, false);
        options.set_write_buffer_manager(&manager);
        let open = || open_waiting_for_lock(&options, directory, &names, &|name| family_options(name, &cache, memory), "the state store");
        let opened = match open() {
            Err(error) if rebuildable && !is_lock_held(&error) => {
                warn!(
                    path = %directory.display(), %error,
                    "the local state store cannot be opened; deleting it: the state is rebuilt from the changelogs"
                );
                std::fs::remove_dir_all(directory)
                    .and_then(|()| std::fs::create_dir_all(directory))
                    .and_then(|()| std::fs::write(&generation_file, generation))
                    .map_err(|error| RuntimeError::Setup(format!("deleting the broken state store {}: {error}", directory.display())))?;
                open()
            }
            opened => opened,
        };
        let store = match opened.and_then(|db| Ok((KeyFilters::build(&db, steps)?, db))) {
            Ok((filters, db)) => StateStore {
                db: Arc::new(db),
                filters: Arc::new(filters),
                options,
                cache,
                reported: Mutex::new((0, 0)),
                path: directory.to_path_buf(),
                families: names,
                failure: Arc::default(),
            },
            Err(error) => return Err(RuntimeError::Setup(format!("opening the state store {}: {error}", directory.display()))),
        };
        store.upgrade(steps, timer_of)?;
        Ok(store)
    }

    /// What steps that read through the store read it with.
    pub fn backing(&self) -> Arc<dyn StateBacking> {
        Arc::new(Backing { db: self.db.clone(), failure: self.failure.clone(), filters: self.filters.clone() })
    }

    /// The first read a view of this store could not make, if any: the batch it served must
    /// not commit.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok()?.clone()
    }

    /// The committed value of one state entry (an input watermark, read on restore).
    pub fn get(&self, step: usize, partition: i32, owner: Option<&str>, key: &str) -> Result<Option<Vec<u8>>, RuntimeError> {
        self.entry(step, partition, &changelog_key(owner, key))
    }

    /// Block cache hits and misses since the last call.
    pub fn take_cache_counts(&self) -> (u64, u64) {
        use rocksdb::statistics::Ticker;
        let now = (self.options.get_ticker_count(Ticker::BlockCacheHit), self.options.get_ticker_count(Ticker::BlockCacheMiss));
        let Ok(mut reported) = self.reported.lock() else { return (0, 0) };
        let delta = (now.0.saturating_sub(reported.0), now.1.saturating_sub(reported.1));
        *reported = now;
        delta
    }

    /// The bytes the block cache holds.
    pub fn cache_bytes(&self) -> usize {
        self.cache.get_usage()
    }

    /// The keys of a step's state in one partition (kept for the steps that read through
    /// the store: each batch and restore adds what it changed).
    pub fn key_count(&self, step: usize, partition: i32) -> Result<u64, RuntimeError> {
        Ok(self.kept_count(step, partition)?.map_or(0, |count| count.max(0) as u64))
    }

    /// The key count kept for (step, partition), if one is.
    pub fn kept_count(&self, step: usize, partition: i32) -> Result<Option<i64>, RuntimeError> {
        let value = self
            .db
            .get_pinned_cf(self.handle(OFFSETS)?, count_key(step, partition))
            .map_err(|error| RuntimeError::store("reading the state store", error))?;
        Ok(value.map(|bytes| count_of(&bytes)))
    }

    /// Counts a step's keys in one partition by reading them (not their values), and keeps
    /// the count: after a restore that did not count as it went.
    pub fn recount(&self, step: usize, partition: i32) -> Result<u64, RuntimeError> {
        let (prefix, end) = (partition_prefix(partition), partition_end(partition));
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(end);
        let mut iterator = self.db.raw_iterator_cf_opt(self.handle(&family(step))?, options);
        iterator.seek(&prefix);
        let mut count = 0i64;
        while let Some(key) = iterator.key() {
            // `["owner","<state key>"]` (or `[null,...`): a quote in the owner is escaped, so
            // the first `,"` ends it.
            let changelog = &key[prefix.len()..];
            let state_key = changelog.windows(2).position(|pair| pair == b",\"").and_then(|at| changelog.get(at + 2));
            if matches!(state_key, Some(b'{' | b'[')) {
                count += 1;
            }
            iterator.next();
        }
        iterator.status().map_err(|error| RuntimeError::store("reading the state store", error))?;
        self.db
            .put_cf(self.handle(OFFSETS)?, count_key(step, partition), count.to_le_bytes())
            .map_err(|error| RuntimeError::store("writing the state store", error))?;
        Ok(count as u64)
    }

    /// A state entry's value, by its changelog key.
    pub fn entry(&self, step: usize, partition: i32, key: &[u8]) -> Result<Option<Vec<u8>>, RuntimeError> {
        let mut full = partition_prefix(partition);
        full.extend_from_slice(key);
        let value = self.db.get_pinned_cf(self.handle(&family(step))?, full);
        Ok(value.map_err(|error| RuntimeError::store("reading the state store", error))?.map(|value| value.to_vec()))
    }

    fn handle(&self, name: &str) -> Result<&rocksdb::ColumnFamily, RuntimeError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| RuntimeError::store(format!("reading the state store {}", self.path.display()), format!("it has no column family {name}")))
    }

    /// The changelog offset the cache of (step, partition) has reached, and how long ago.
    pub fn offset(&self, step: usize, partition: i32) -> Result<Option<(i64, Duration)>, RuntimeError> {
        let value = self
            .db
            .get_cf(self.handle(OFFSETS)?, offset_key(step, partition))
            .map_err(|error| RuntimeError::store("reading the state store", error))?;
        Ok(value.and_then(|bytes| {
            let (offset, written) = std::str::from_utf8(&bytes).ok()?.split_once('@')?;
            let age = now_millis().saturating_sub(written.parse().ok()?);
            Some((offset.parse().ok()?, Duration::from_millis(age)))
        }))
    }

    /// `mode: idempotent_upsert`: the next offset of an input partition, as of the state
    /// stored with it.
    pub fn input_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, RuntimeError> {
        let value = self
            .db
            .get_cf(self.handle(OFFSETS)?, input_key(topic, partition))
            .map_err(|error| RuntimeError::store("reading the state store", error))?;
        Ok(value.and_then(|bytes| std::str::from_utf8(&bytes).ok()?.parse().ok()))
    }

    /// Writes committed changes and the changelog offsets they reach, atomically; in upsert
    /// mode also the input offsets (topic, partition, next) the state is at.
    pub fn apply(&self, writes: &[StoreWrite], offsets: &[(usize, i32, i64)], inputs: &[TopicPartitionOffset]) -> Result<(), RuntimeError> {
        self.write(writes, offsets, inputs, &rocksdb::WriteOptions::default())
    }

    /// Writes a restore's entries past the write-ahead log, and no offset: they last only
    /// once [`Self::flush_step`] has written them to disk, so the offset they reach is
    /// applied after that. Until then a crash loses some of them and leaves the offset
    /// where it was, from which the restore reads them again.
    pub fn apply_unlogged(&self, writes: &[StoreWrite]) -> Result<(), RuntimeError> {
        let mut options = rocksdb::WriteOptions::default();
        options.disable_wal(true);
        self.write(writes, &[], &[], &options)
    }

    /// Writes a step's memtables (its entries and timers) to disk and waits for it.
    pub fn flush_step(&self, step: usize) -> Result<(), RuntimeError> {
        let handles = [self.handle(&family(step))?, self.handle(&timer_family(step))?];
        self.db
            .flush_cfs_opt(&handles, &rocksdb::FlushOptions::default())
            .map_err(|error| RuntimeError::store(format!("flushing the state store {}", self.path.display()), error))
    }

    fn write(&self, writes: &[StoreWrite], offsets: &[(usize, i32, i64)], inputs: &[TopicPartitionOffset], options: &rocksdb::WriteOptions) -> Result<(), RuntimeError> {
        let mut batch = WriteBatch::default();
        // A batch touches few families and partitions: each handle is looked up, and each
        // prefix formatted, once.
        let mut handles: Vec<((usize, Family), &rocksdb::ColumnFamily)> = Vec::new();
        let mut prefixes: Vec<(i32, Vec<u8>)> = Vec::new();
        let mut key = Vec::new();
        let offsets_handle = self.handle(OFFSETS)?;
        // Every state key is in its filter before it is in the store: a view never reads
        // "absent" past the filter for a key that is there.
        let mut filters = self.filters.adding();
        for write in in_key_order(writes) {
            // A count is merged into the offsets family, never written to a step's own.
            if write.family == Family::Count {
                if let Some(delta) = &write.value {
                    batch.merge_cf(offsets_handle, count_key(write.step, write.partition), delta);
                }
                continue;
            }
            let handle = match handles.iter().find(|(at, _)| *at == (write.step, write.family)) {
                Some((_, handle)) => *handle,
                None => {
                    let name = match write.family {
                        Family::State | Family::Count => family(write.step),
                        Family::Timers => timer_family(write.step),
                    };
                    let handle = self.handle(&name)?;
                    handles.push(((write.step, write.family), handle));
                    handle
                }
            };
            key.clear();
            match prefixes.iter().find(|(partition, _)| *partition == write.partition) {
                Some((_, prefix)) => key.extend_from_slice(prefix),
                None => {
                    let prefix = partition_prefix(write.partition);
                    key.extend_from_slice(&prefix);
                    prefixes.push((write.partition, prefix));
                }
            }
            key.extend_from_slice(&write.key);
            if write.family == Family::State && write.value.is_some() {
                filters.add(write.step, &key);
            }
            match &write.value {
                Some(value) => batch.put_cf(handle, &key, value),
                None => batch.delete_cf(handle, &key),
            }
        }
        let written = now_millis();
        for (step, partition, offset) in offsets {
            batch.put_cf(offsets_handle, offset_key(*step, *partition), format!("{offset}@{written}"));
        }
        for TopicPartitionOffset { topic, partition, offset: next } in inputs {
            batch.put_cf(offsets_handle, input_key(topic, *partition), next.to_string());
        }
        self.db
            .write_opt(batch, options)
            .map_err(|error| RuntimeError::store(format!("writing the state store {}", self.path.display()), error))?;
        drop(filters);
        self.filters.rebuild_full(&self.db);
        Ok(())
    }

    /// RocksDB's estimate of a step's live data, in bytes.
    pub fn live_bytes(&self, step: usize) -> Option<u64> {
        let handle = self.handle(&family(step)).ok()?;
        self.db.property_int_value_cf(handle, "rocksdb.estimate-live-data-size").ok().flatten()
    }

    /// Writes the memtables to disk, so that the next start has no log to replay.
    fn flush(&self) -> Result<(), rocksdb::Error> {
        let handles: Vec<&rocksdb::ColumnFamily> = self.families.iter().filter_map(|name| self.db.cf_handle(name)).collect();
        self.db.flush_cfs_opt(&handles, &rocksdb::FlushOptions::default())
    }

    /// Forgets a partition's cache of a step (its recorded offset no longer fits the changelog).
    pub fn clear(&self, step: usize, partition: i32) -> Result<(), RuntimeError> {
        let mut batch = WriteBatch::default();
        for name in [family(step), timer_family(step)] {
            batch.delete_range_cf(self.handle(&name)?, partition_prefix(partition), partition_end(partition));
        }
        batch.delete_cf(self.handle(OFFSETS)?, offset_key(step, partition));
        batch.delete_cf(self.handle(OFFSETS)?, count_key(step, partition));
        self.db.write(batch).map_err(|error| RuntimeError::store("writing the state store", error))
    }
}

/// A clean stop flushes: a restart then opens the store without replaying its log.
impl Drop for StateStore {
    fn drop(&mut self) {
        if let Err(error) = self.flush() {
            warn!(path = %self.path.display(), %error, "flushing the state store at stop; the next start replays its log");
        }
    }
}

#[path = "store_view.rs"]
mod view;
use view::Backing;

#[path = "key_filter.rs"]
mod key_filter;
use key_filter::KeyFilters;

#[path = "store_upgrade.rs"]
mod upgrade;

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "store_step_tests.rs"]
mod step_tests;

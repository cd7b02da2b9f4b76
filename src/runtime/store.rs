//! The local state store: RocksDB under `state.dir`, a cache of the changelog topics.
//!
//! One column family per stateful step holds the committed state of every partition this
//! process has owned (keys prefixed by the partition number); the `offsets` family records,
//! per (step, changelog partition), the changelog offset the cache has reached. A batch's
//! state changes are written in one WriteBatch together with those offsets, only after its
//! transaction committed, so the cache never holds uncommitted state. Restoring a partition
//! loads the cache and then reads only the changelog from the recorded offset on; a crash at
//! any point leaves the cache at or behind the changelog, never ahead, and never wiped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, DB};
use tracing::warn;

use super::backoff::Backoff;
use super::error::RuntimeError;
use crate::runtime::TopicPartitionOffset;

const OFFSETS: &str = "offsets";

/// Memtable size per column family, and the write-ahead log size that forces flushes.
const MEMTABLE_BYTES: usize = 16 << 20;
const WAL_LIMIT: u64 = 64 << 20;

fn family_options() -> Options {
    let mut options = Options::default();
    options.set_write_buffer_size(MEMTABLE_BYTES);
    options
}

pub struct StateStore {
    db: DB,
    path: PathBuf,
    /// Every column family's name.
    families: Vec<String>,
}

/// One committed write: the step's changelog key, and the value (None deletes).
pub struct StoreWrite {
    pub step: usize,
    pub partition: i32,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

fn family(step: usize) -> String {
    format!("step-{step}")
}

fn partition_prefix(partition: i32) -> Vec<u8> {
    format!("{partition:010}/").into_bytes()
}

fn now_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

fn offset_key(step: usize, partition: i32) -> Vec<u8> {
    format!("{step}/{partition}").into_bytes()
}

/// `mode: idempotent_upsert`: the next input offset to read, kept with the state it produced.
fn input_key(topic: &str, partition: i32) -> Vec<u8> {
    format!("input/{partition}/{topic}").into_bytes()
}

impl StateStore {
    /// Opens (or creates) the store. Another process with the same instance may still hold
    /// it for a moment (a zombie being fenced), so a held lock is waited for.
    /// A store of another state generation (the state was reset since) is a stale cache and
    /// is deleted first.
    pub fn open(directory: &Path, steps: &[usize], generation: &str) -> Result<StateStore, RuntimeError> {
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
        let names: Vec<String> = steps.iter().map(|step| family(*step)).chain([OFFSETS.to_string()]).collect();
        match open_waiting_for_lock(&options, directory, &names, family_options, "the state store") {
            Ok(db) => Ok(StateStore { db, path: directory.to_path_buf(), families: names }),
            Err(error) => Err(RuntimeError::Setup(format!("opening the state store {}: {error}", directory.display()))),
        }
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

    /// Calls `each` with every cached (key, value) of a step for one changelog partition.
    pub fn for_each_entry(
        &self,
        step: usize,
        partition: i32,
        mut each: impl FnMut(&[u8], &[u8]) -> Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        let prefix = partition_prefix(partition);
        for item in self.db.iterator_cf(self.handle(&family(step))?, IteratorMode::From(&prefix, Direction::Forward)) {
            let (key, value) = item.map_err(|error| RuntimeError::store("reading the state store", error))?;
            if !key.starts_with(&prefix) {
                break;
            }
            each(&key[prefix.len()..], &value)?;
        }
        Ok(())
    }

    /// Writes committed changes and the changelog offsets they reach, atomically; in upsert
    /// mode also the input offsets (topic, partition, next) the state is at.
    pub fn apply(&self, writes: &[StoreWrite], offsets: &[(usize, i32, i64)], inputs: &[TopicPartitionOffset]) -> Result<(), RuntimeError> {
        let mut batch = WriteBatch::default();
        for write in writes {
            let mut key = partition_prefix(write.partition);
            key.extend_from_slice(&write.key);
            let handle = self.handle(&family(write.step))?;
            match &write.value {
                Some(value) => batch.put_cf(handle, key, value),
                None => batch.delete_cf(handle, key),
            }
        }
        let offsets_handle = self.handle(OFFSETS)?;
        let written = now_millis();
        for (step, partition, offset) in offsets {
            batch.put_cf(offsets_handle, offset_key(*step, *partition), format!("{offset}@{written}"));
        }
        for TopicPartitionOffset { topic, partition, offset: next } in inputs {
            batch.put_cf(offsets_handle, input_key(topic, *partition), next.to_string());
        }
        self.db
            .write(batch)
            .map_err(|error| RuntimeError::store(format!("writing the state store {}", self.path.display()), error))
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
        let mut writes = Vec::new();
        self.for_each_entry(step, partition, |key, _| {
            writes.push(StoreWrite { step, partition, key: key.to_vec(), value: None });
            Ok(())
        })?;
        self.apply(&writes, &[], &[])?;
        self.db
            .delete_cf(self.handle(OFFSETS)?, offset_key(step, partition))
            .map_err(|error| RuntimeError::store("writing the state store", error))
    }
}

/// How long a store held by another process is waited for.
const LOCK_PATIENCE: Duration = Duration::from_secs(60);

/// Opens the RocksDB database in `directory` with `families` (each with `family_options`).
/// Another process with the same instance may still hold it for a moment (a zombie being
/// fenced), so a held lock is waited for, up to a minute; any other error comes back at once.
pub(super) fn open_waiting_for_lock(
    options: &Options,
    directory: &Path,
    families: &[String],
    family_options: fn() -> Options,
    what: &str,
) -> Result<DB, rocksdb::Error> {
    let deadline = Instant::now() + LOCK_PATIENCE;
    let mut pauses = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    loop {
        let descriptors = families.iter().map(|name| ColumnFamilyDescriptor::new(name, family_options()));
        match DB::open_cf_descriptors(options, directory, descriptors) {
            Err(error) if is_lock_held(&error) && Instant::now() < deadline => {
                warn!(path = %directory.display(), %error, "{what} is locked by another process; waiting");
                std::thread::sleep(pauses.pause());
            }
            opened => return opened,
        }
    }
}

/// Whether opening failed because another process holds the database's lock (RocksDB says
/// so only in the message).
pub(super) fn is_lock_held(error: &rocksdb::Error) -> bool {
    error.to_string().contains("lock")
}

/// A clean stop flushes: a restart then opens the store without replaying its log.
impl Drop for StateStore {
    fn drop(&mut self) {
        if let Err(error) = self.flush() {
            warn!(path = %self.path.display(), %error, "flushing the state store at stop; the next start replays its log");
        }
    }
}

//! The local store of the table sources' rows: RocksDB under `state.dir`, one column family
//! per table (key text → row as JSON) and a `positions` family with, per table partition,
//! the next offset to read and, per table, the definition its rows were read with.
//!
//! A table's topic is its changelog, and applying a table record is idempotent (the row of
//! a key is the last value read for it), so the rows may run ahead of the recorded
//! positions, never behind: a restart reads on from the recorded positions and ends with the
//! same rows. Rows read under another definition (key fields, schema, topics) are dropped
//! and the table is read again from the beginning; a store that cannot be opened is rebuilt
//! from the topics, with a log line saying why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rocksdb::{Options, WriteBatch, DB};
use tracing::warn;

use super::error::RuntimeError;
use crate::config::Source;
use crate::operators::lookup::RowStore;

const POSITIONS: &str = "positions";

pub struct TableStore {
    db: Arc<DB>,
    path: PathBuf,
    /// The families to flush at stop.
    families: Vec<String>,
}

fn family(table: &str) -> String {
    format!("table-{table}")
}

fn position_key(table: &str, topic: &str, partition: i32) -> Vec<u8> {
    format!("position/{table}/{partition}/{topic}").into_bytes()
}

fn definition_key(table: &str) -> Vec<u8> {
    format!("definition/{table}").into_bytes()
}

/// What a table's rows depend on: a change to any of it makes the stored rows stale.
fn definition(source: &Source) -> String {
    format!("{:?} {:?} {:?} {:?}", source.topics, source.table, source.encoding, source.schema)
}

impl TableStore {
    /// Opens (or creates) the store for `tables`. Rows kept under another definition are
    /// dropped; a store RocksDB cannot open (corrupt, or of an unknown format) is deleted
    /// and made anew: the tables' topics hold everything it had.
    pub fn open(directory: &Path, tables: &[Source]) -> Result<TableStore, RuntimeError> {
        let db = match open_db(directory, tables) {
            Ok(db) => db,
            Err(OpenError::Runtime(error)) => return Err(error),
            Err(OpenError::Unusable(reason)) => {
                warn!(path = %directory.display(), %reason, "the table store cannot be opened; reading the tables from their topics again");
                std::fs::remove_dir_all(directory)
                    .map_err(|error| RuntimeError::Setup(format!("deleting the table store {}: {error}", directory.display())))?;
                open_db(directory, tables).map_err(|error| match error {
                    OpenError::Runtime(error) => error,
                    OpenError::Unusable(reason) => RuntimeError::store(format!("opening the table store {}", directory.display()), reason),
                })?
            }
        };
        let families = tables.iter().map(|source| family(&source.name)).chain([POSITIONS.to_string()]).collect();
        let store = TableStore { db: Arc::new(db), path: directory.to_path_buf(), families };
        for source in tables {
            let wanted = definition(source);
            let stored = store
                .db
                .get_cf(store.positions()?, definition_key(&source.name))
                .map_err(|error| RuntimeError::store("reading the table store", error))?;
            if stored.as_deref() == Some(wanted.as_bytes()) {
                continue;
            }
            if stored.is_some() {
                warn!(table = %source.name, "the table's definition changed since its rows were stored; reading it again from the beginning");
            }
            store.clear(&source.name)?;
            store
                .db
                .put_cf(store.positions()?, definition_key(&source.name), wanted.as_bytes())
                .map_err(|error| RuntimeError::store(format!("writing the table store {}", directory.display()), error))?;
        }
        Ok(store)
    }

    /// Where `table`'s rows are read and written.
    pub fn rows(&self, table: &str) -> Box<dyn RowStore> {
        Box::new(StoredRows { db: self.db.clone(), family: family(table), pending: Mutex::new(WriteBatch::default()) })
    }

    /// The next offset to read of a table partition, as recorded.
    pub fn position(&self, table: &str, topic: &str, partition: i32) -> Result<Option<i64>, RuntimeError> {
        let value = self
            .db
            .get_cf(self.positions()?, position_key(table, topic, partition))
            .map_err(|error| RuntimeError::store("reading the table store", error))?;
        Ok(value.and_then(|bytes| std::str::from_utf8(&bytes).ok()?.parse().ok()))
    }

    /// Records the next offsets to read, after the rows they follow were written.
    pub fn save_positions(&self, table: &str, positions: &[(String, i32, i64)]) -> Result<(), RuntimeError> {
        let handle = self.positions()?;
        let mut batch = WriteBatch::default();
        for (topic, partition, next) in positions {
            batch.put_cf(handle, position_key(table, topic, *partition), next.to_string());
        }
        self.db.write(batch).map_err(|error| RuntimeError::store(format!("writing the table store {}", self.path.display()), error))
    }

    /// Forgets a table's rows and positions (its topic no longer fits them).
    pub fn clear(&self, table: &str) -> Result<(), RuntimeError> {
        let store_error = |error: rocksdb::Error| RuntimeError::store(format!("clearing table {table} in the store"), error);
        let rows = self.db.cf_handle(&family(table)).ok_or_else(|| RuntimeError::store("clearing a table", "no family"))?;
        let positions = self.positions()?;
        let mut batch = WriteBatch::default();
        // Every key sorts after the empty one and before 0xff: row keys are JSON text.
        batch.delete_range_cf(rows, b"".as_slice(), b"\xff".as_slice());
        let prefix = format!("position/{table}/");
        let mut end = prefix.clone().into_bytes();
        end.push(0xff);
        batch.delete_range_cf(positions, prefix.as_bytes(), end.as_slice());
        self.db.write(batch).map_err(store_error)
    }

    /// RocksDB's estimate of a table's row count.
    pub fn estimated_rows(&self, table: &str) -> u64 {
        let Some(handle) = self.db.cf_handle(&family(table)) else {
            return 0;
        };
        self.db.property_int_value_cf(handle, "rocksdb.estimate-num-keys").ok().flatten().unwrap_or(0)
    }

    fn positions(&self) -> Result<&rocksdb::ColumnFamily, RuntimeError> {
        self.db.cf_handle(POSITIONS).ok_or_else(|| RuntimeError::store("reading the table store", "it has no positions family"))
    }
}

/// A clean stop flushes, so the next start has no log to replay.
impl Drop for TableStore {
    fn drop(&mut self) {
        let handles: Vec<&rocksdb::ColumnFamily> = self.families.iter().filter_map(|name| self.db.cf_handle(name)).collect();
        if let Err(error) = self.db.flush_cfs_opt(&handles, &rocksdb::FlushOptions::default()) {
            warn!(path = %self.path.display(), %error, "flushing the table store at stop; the next start replays its log");
        }
    }
}

enum OpenError {
    Runtime(RuntimeError),
    Unusable(String),
}

fn open_db(directory: &Path, tables: &[Source]) -> Result<DB, OpenError> {
    std::fs::create_dir_all(directory).map_err(|error| {
        OpenError::Runtime(RuntimeError::Setup(format!("creating the table store directory {}: {error}", directory.display())))
    })?;
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    // Families of tables the pipeline no longer has are opened (RocksDB needs every one)
    // and dropped below.
    let existing = DB::list_cf(&options, directory).unwrap_or_default();
    let mut names: Vec<String> = tables.iter().map(|source| family(&source.name)).chain([POSITIONS.to_string()]).collect();
    let stale: Vec<String> = existing.iter().filter(|name| !names.contains(name) && *name != "default").cloned().collect();
    names.extend(stale.iter().cloned());
    let mut db = match super::rocks::open_waiting_for_lock(&options, directory, &names, &|_| Options::default(), "the table store") {
        Ok(db) => db,
        Err(error) if super::rocks::is_lock_held(&error) => {
            return Err(OpenError::Runtime(RuntimeError::Setup(format!("opening the table store {}: {error}", directory.display()))));
        }
        Err(error) => return Err(OpenError::Unusable(error.to_string())),
    };
    for name in stale {
        if let Err(error) = db.drop_cf(&name) {
            warn!(family = %name, %error, "could not drop the rows of a table the pipeline no longer has");
        }
    }
    Ok(db)
}

/// One table's rows in the store. Writes are gathered into one WriteBatch until `flush`
/// (a write per record would be a write-ahead-log append, a system call, each).
struct StoredRows {
    db: Arc<DB>,
    family: String,
    pending: Mutex<WriteBatch>,
}

impl StoredRows {
    fn handle(&self) -> Result<&rocksdb::ColumnFamily, String> {
        self.db.cf_handle(&self.family).ok_or_else(|| format!("the table store has no family {}", self.family))
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, WriteBatch> {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Rows applied but not yet written are written when the engine lets go of its tables.
impl Drop for StoredRows {
    fn drop(&mut self) {
        if let Err(error) = self.flush() {
            warn!(family = %self.family, %error, "writing the last table rows at stop; the next start reads them again");
        }
    }
}

impl RowStore for StoredRows {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        if !self.pending().is_empty() {
            self.flush()?;
        }
        self.db.get_cf(self.handle()?, key).map_err(|error| error.to_string())
    }

    fn put(&self, key: &str, row: &[u8]) -> Result<(), String> {
        let handle = self.handle()?;
        self.pending().put_cf(handle, key, row);
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<(), String> {
        let handle = self.handle()?;
        self.pending().delete_cf(handle, key);
        Ok(())
    }

    fn flush(&self) -> Result<(), String> {
        let batch = std::mem::take(&mut *self.pending());
        match batch.is_empty() {
            true => Ok(()),
            false => self.db.write(batch).map_err(|error| error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Encoding, SourceTopics};

    fn customers(key: &str) -> Source {
        let text = format!(
            "name: t\nsources:\n  orders:\n    topics: [orders]\n    format: json\n    schema: {{ id: string }}\n  customers:\n    topics: [customers]\n    format: json\n    schema: {{ id: string, region: string }}\n    table: {{ key: [{key}] }}\nsink:\n  topic: out\n"
        );
        let pipeline = crate::plan::parse_pipeline(&text).expect("a valid pipeline");
        let source = pipeline.tables[0].clone();
        assert_eq!((source.encoding, &source.topics), (Encoding::Json, &SourceTopics::List(vec!["customers".into()])));
        source
    }

    #[test]
    fn rows_and_positions_survive_a_reopen_and_a_changed_definition_drops_them() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("tables");
        {
            let store = TableStore::open(&path, &[customers("id")]).unwrap();
            store.rows("customers").put(r#"{"id":"c1"}"#, br#"{"id":"c1","region":"eu"}"#).unwrap();
            store.save_positions("customers", &[("customers".into(), 0, 17)]).unwrap();
        }
        let store = TableStore::open(&path, &[customers("id")]).unwrap();
        assert_eq!(store.position("customers", "customers", 0).unwrap(), Some(17));
        assert_eq!(store.rows("customers").get(r#"{"id":"c1"}"#).unwrap().as_deref(), Some(br#"{"id":"c1","region":"eu"}"#.as_slice()));
        store.clear("customers").unwrap();
        assert_eq!(store.position("customers", "customers", 0).unwrap(), None);
        assert_eq!(store.rows("customers").get(r#"{"id":"c1"}"#).unwrap(), None);
        store.rows("customers").put(r#"{"id":"c2"}"#, b"{}").unwrap();
        store.save_positions("customers", &[("customers".into(), 0, 3)]).unwrap();
        drop(store);

        // Keyed by region now: the rows stored under the id are of no use.
        let store = TableStore::open(&path, &[customers("region")]).unwrap();
        assert_eq!(store.position("customers", "customers", 0).unwrap(), None);
        assert_eq!(store.rows("customers").get(r#"{"id":"c2"}"#).unwrap(), None);
    }

    #[test]
    fn a_store_that_cannot_be_opened_is_made_anew() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("tables");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("CURRENT"), "MANIFEST-garbage\n").unwrap();
        let store = TableStore::open(&path, &[customers("id")]).unwrap();
        assert_eq!(store.position("customers", "customers", 0).unwrap(), None);
        store.rows("customers").put("k", b"{}").unwrap();
    }
}

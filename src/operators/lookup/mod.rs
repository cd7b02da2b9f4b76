//! `lookup`: joins each record with a table (a table source read as the latest value per
//! key) as of the table records applied before it. The tables are global: every task of
//! every stage reads the same rows, so a lookup never needs a repartition and keeps no state
//! of its own; the table's topic is its changelog.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};

use super::event_time::field_at;
use super::{Emitted, ProcessError, Record, StepOutcome};
pub mod config;

use config::{Lookup, LookupKind};

/// Where a table's rows are kept outside memory (`weir run` keeps them in a local RocksDB,
/// so a table need not fit in memory and a restart need not read its topic again). Rows
/// are stored as JSON objects under their key text.
/// Writes may be buffered until [`RowStore::flush`]; a `get` sees every write before it.
pub trait RowStore: Send + Sync {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String>;
    fn put(&self, key: &str, row: &[u8]) -> Result<(), String>;
    fn delete(&self, key: &str) -> Result<(), String>;
    fn flush(&self) -> Result<(), String>;
}

/// One table's rows: key (the key fields as a JSON object, in the table's key order) → row;
/// in memory (`weir test`, `weir validate`) or in a [`RowStore`] (`weir run`).
pub enum Rows {
    Memory(HashMap<String, Map<String, Value>>),
    Stored(Box<dyn RowStore>),
}

impl Default for Rows {
    fn default() -> Self {
        Rows::Memory(HashMap::new())
    }
}

impl Rows {
    /// The row under `key`. A stored row that cannot be read is an error of the store, not
    /// of the record looking it up.
    pub fn get(&self, key: &str) -> Result<Option<Map<String, Value>>, String> {
        match self {
            Rows::Memory(rows) => Ok(rows.get(key).cloned()),
            Rows::Stored(store) => match store.get(key)? {
                None => Ok(None),
                Some(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(Value::Object(row)) => Ok(Some(row)),
                    Ok(_) | Err(_) => Err(format!("the stored row under {key} is not a JSON object")),
                },
            },
        }
    }

    pub fn put(&mut self, key: String, row: Map<String, Value>) -> Result<(), String> {
        match self {
            Rows::Memory(rows) => {
                rows.insert(key, row);
                Ok(())
            }
            Rows::Stored(store) => store.put(&key, Value::Object(row).to_string().as_bytes()),
        }
    }

    pub fn delete(&mut self, key: &str) -> Result<(), String> {
        match self {
            Rows::Memory(rows) => {
                rows.remove(key);
                Ok(())
            }
            Rows::Stored(store) => store.delete(key),
        }
    }

    /// Writes what is buffered (a stored table's rows are written a read at a time).
    pub fn flush(&self) -> Result<(), String> {
        match self {
            Rows::Memory(_) => Ok(()),
            Rows::Stored(store) => store.flush(),
        }
    }
}

/// A table's rows, shared by the engine that applies its records and the lookups that read
/// them.
pub type Table = Arc<RwLock<Rows>>;

/// Every table of a pipeline, by source name.
#[derive(Clone, Default)]
pub struct Tables {
    tables: HashMap<String, Table>,
}

impl Tables {
    /// The table named `name`, made empty when it is not there yet.
    pub fn table(&mut self, name: &str) -> Table {
        self.tables.entry(name.to_string()).or_default().clone()
    }
}

/// The rows, also after a panic elsewhere poisoned the lock (rows are replaced whole, never
/// left half written).
pub fn read(table: &Table) -> std::sync::RwLockReadGuard<'_, Rows> {
    table.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn write(table: &Table) -> std::sync::RwLockWriteGuard<'_, Rows> {
    table.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The text a row is kept under: the key fields as a JSON object, in `key`'s order; None
/// when one of them is absent or null.
pub fn row_key<'v>(key: impl Iterator<Item = (&'v str, Option<&'v Value>)>) -> Option<String> {
    let mut object = Map::new();
    for (name, value) in key {
        match value {
            None | Some(Value::Null) => return None,
            Some(value) => object.insert(name.to_string(), value.clone()),
        };
    }
    Some(Value::Object(object).to_string())
}

pub struct LookupOperator {
    table_name: String,
    table: Table,
    on: Vec<(String, String)>,
    kind: LookupKind,
    name: String,
}

impl LookupOperator {
    pub fn new(spec: &Lookup, tables: &mut Tables) -> LookupOperator {
        LookupOperator {
            table_name: spec.table.clone(),
            table: tables.table(&spec.table),
            on: spec.on.clone(),
            kind: spec.kind,
            name: spec.name.clone(),
        }
    }

    pub fn describe(&self) -> String {
        let on: Vec<String> = self.on.iter().map(|(stream, table)| format!("{stream} = {}.{table}", self.table_name)).collect();
        let kind = match self.kind {
            LookupKind::Inner => "inner",
            LookupKind::Left => "left",
        };
        format!("lookup {kind} in table {} on {} as {}", self.table_name, on.join(" and "), self.name)
    }

    pub fn process<'a>(&mut self, mut record: Record<'a>, out: &mut Vec<Emitted<'a>>) -> Result<StepOutcome, ProcessError> {
        let key = row_key(self.on.iter().map(|(stream, table)| (table.as_str(), field_at(&record.fields, stream))));
        let row = match key {
            None => None,
            Some(key) => read(&self.table)
                .get(&key)
                .map_err(|error| ProcessError(format!("looking up table {}: {error}", self.table_name)))?,
        };
        let value = match (row, self.kind) {
            (Some(row), _) => Value::Object(row),
            (None, LookupKind::Inner) => return Ok(StepOutcome::Dropped),
            (None, LookupKind::Left) => Value::Null,
        };
        record.fields.insert(self.name.clone(), value);
        out.push(Emitted::Record(record));
        Ok(StepOutcome::Passed)
    }
}

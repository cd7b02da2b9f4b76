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

/// One table's rows: key (the key fields as a JSON object, in the table's key order) → row.
pub type Rows = HashMap<String, Map<String, Value>>;

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
        let row = key.and_then(|key| read(&self.table).get(&key).cloned());
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

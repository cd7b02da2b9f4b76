//! Table sources: each record of a table's topic replaces its key's row (a null value
//! deletes it) in the rows the pipeline's lookups read.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::{Engine, InputRecord, SetupError};
use crate::codec::avro::WriterSchemas;
use crate::codec::Decoder;
use crate::config::Source;
use crate::operators::event_time::field_at;
use crate::operators::lookup::{row_key, write, RowStore, Rows, Table, Tables};
use crate::plan::Pipeline;

pub(super) struct TableReader {
    source: Source,
    decoder: Decoder,
    rows: Table,
}

/// A reader for every table source, and the rows they fill.
pub(super) fn table_readers(pipeline: &Pipeline, writers: &Arc<WriterSchemas>) -> Result<(Vec<TableReader>, Tables), SetupError> {
    let mut tables = Tables::default();
    let mut readers = Vec::with_capacity(pipeline.tables.len());
    for source in &pipeline.tables {
        let decoder = Decoder::new(source.encoding, source.schema.as_ref(), writers)
            .ok_or_else(|| SetupError::NoDecoder(source.name.clone()))?;
        readers.push(TableReader {
            rows: tables.table(&source.name),
            source: source.clone(),
            decoder,
        });
    }
    Ok((readers, tables))
}

impl TableReader {
    /// The table's key fields.
    fn key(&self) -> &[String] {
        self.source.table.as_deref().unwrap_or_default()
    }

    /// The key a tombstone deletes, read from the Kafka key: a JSON object with the key
    /// fields, or (for a one-field key) the bare value, as JSON or as text.
    fn key_of_tombstone(&self, key: Option<&[u8]>) -> Option<String> {
        let bytes = key?;
        let parsed: Option<Value> = serde_json::from_slice(bytes).ok();
        match (parsed, self.key()) {
            (Some(Value::Object(object)), _) => row_key(self.key().iter().map(|name| (name.as_str(), object.get(name)))),
            (Some(value), [only]) => row_key(std::iter::once((only.as_str(), Some(&value)))),
            (None, [only]) => {
                let text = Value::String(std::str::from_utf8(bytes).ok()?.to_string());
                row_key(std::iter::once((only.as_str(), Some(&text))))
            }
            _ => None,
        }
    }
}

/// Why a table record was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableRecordError {
    /// The record itself: it does not decode, or does not name its key. The table keeps
    /// the key's row as it was; the record stays in its topic.
    #[error("{0}")]
    Bad(String),
    /// The store that holds the rows failed: not the record's fault.
    #[error("{0}")]
    Store(String),
}

impl Engine {
    /// Whether `topic` is read by a table source.
    pub fn is_table_topic(&self, topic: &str) -> bool {
        self.tables.iter().any(|table| table.source.reads(topic))
    }

    /// Puts each table's rows in the store `store_for` gives for its source (`weir run`
    /// keeps them on disk), in place of memory. Before any table record is applied.
    pub fn store_tables(&mut self, mut store_for: impl FnMut(&Source) -> Box<dyn RowStore>) {
        for table in &self.tables {
            *write(&table.rows) = Rows::Stored(store_for(&table.source));
        }
    }

    /// Writes the table rows applied so far to their store (`weir run` gathers a read's
    /// worth into one write), before the positions after them are recorded.
    pub fn flush_tables(&self) -> Result<(), TableRecordError> {
        for table in &self.tables {
            write(&table.rows).flush().map_err(|error| TableRecordError::Store(format!("table {}: {error}", table.source.name)))?;
        }
        Ok(())
    }

    /// Applies one record of a table's topic: its row replaces the key's, and a null value
    /// (a tombstone) deletes the key named by the Kafka key. A record that does not decode,
    /// or whose key cannot be told, changes nothing and says why: every instance reads every
    /// table record (and reads them again after its store is lost), so such a record is
    /// reported by whoever reads it (a log line and a metric), not written to the DLQ.
    pub fn apply_table_record(&mut self, input: &InputRecord<'_>) -> Result<(), TableRecordError> {
        let Some(table) = self.tables.iter().find(|table| table.source.reads(input.provenance.topic)) else {
            return Ok(());
        };
        let name = &table.source.name;
        let (key, row): (Option<String>, Option<Map<String, Value>>) = match input.value {
            None => (table.key_of_tombstone(input.key), None),
            Some(_) => match table.decoder.decode(input.value) {
                Ok(fields) => (row_key(table.key().iter().map(|name| (name.as_str(), field_at(&fields, name)))), Some(fields)),
                Err(error) => return Err(TableRecordError::Bad(format!("table {name}: {error}"))),
            },
        };
        let Some(key) = key else {
            return Err(TableRecordError::Bad(format!(
                "table {name}: the record does not name its key ({}): a row needs every key field, a tombstone a Kafka key",
                table.key().join(", ")
            )));
        };
        let mut rows = write(&table.rows);
        let written = match row {
            Some(row) => rows.put(key, row),
            None => rows.delete(&key),
        };
        written.map_err(|error| TableRecordError::Store(format!("table {name}: {error}")))
    }
}

//! Table sources: each record of a table's topic replaces its key's row (a null value
//! deletes it) in the rows the pipeline's lookups read.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::{Engine, ErrorStage, InputRecord, Output, RecordFailure, SetupError};
use crate::codec::avro::WriterSchemas;
use crate::codec::Decoder;
use crate::config::Source;
use crate::operators::event_time::field_at;
use crate::operators::lookup::{row_key, write, Table, Tables};
use crate::plan::Pipeline;

pub(super) struct TableReader {
    source: Source,
    key: Vec<String>,
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
            key: source.table.clone().unwrap_or_default(),
            rows: tables.table(&source.name),
            source: source.clone(),
            decoder,
        });
    }
    Ok((readers, tables))
}

impl TableReader {
    /// The key a tombstone deletes, read from the Kafka key: a JSON object with the key
    /// fields, or (for a one-field key) the bare value, as JSON or as text.
    fn key_of_tombstone(&self, key: Option<&[u8]>) -> Option<String> {
        let bytes = key?;
        let parsed: Option<Value> = serde_json::from_slice(bytes).ok();
        match (parsed, self.key.as_slice()) {
            (Some(Value::Object(object)), _) => row_key(self.key.iter().map(|name| (name.as_str(), object.get(name)))),
            (Some(value), [only]) => row_key(std::iter::once((only.as_str(), Some(&value)))),
            (None, [only]) => {
                let text = Value::String(std::str::from_utf8(bytes).ok()?.to_string());
                row_key(std::iter::once((only.as_str(), Some(&text))))
            }
            _ => None,
        }
    }
}

impl Engine {
    /// Whether `topic` is read by a table source.
    pub fn is_table_topic(&self, topic: &str) -> bool {
        self.tables.iter().any(|table| table.source.reads(topic))
    }

    /// Applies one record of a table's topic: its row replaces the key's, and a null value
    /// (a tombstone) deletes the key named by the Kafka key. A record that does not decode,
    /// or whose key cannot be told, goes where `on_error.decode` says.
    pub fn apply_table_record(&mut self, input: &InputRecord<'_>, outputs: &mut Vec<Output>) -> Result<(), RecordFailure> {
        let Some(table) = self.tables.iter().find(|table| table.source.reads(input.provenance.topic)) else {
            return Ok(());
        };
        let (key, row): (Option<String>, Option<Map<String, Value>>) = match input.value {
            None => (table.key_of_tombstone(input.key), None),
            Some(_) => match table.decoder.decode(input.value) {
                Ok(fields) => (row_key(table.key.iter().map(|name| (name.as_str(), field_at(&fields, name)))), Some(fields)),
                Err(error) => return self.on_error(input, ErrorStage::Decode, &format!("table {}: {error}", table.source.name), outputs),
            },
        };
        let Some(key) = key else {
            let why = format!(
                "table {}: the record does not name its key ({}): a row needs every key field, a tombstone a Kafka key",
                table.source.name,
                table.key.join(", ")
            );
            return self.on_error(input, ErrorStage::Decode, &why, outputs);
        };
        let mut rows = write(&table.rows);
        match row {
            Some(row) => rows.insert(key, row),
            None => rows.remove(&key),
        };
        self.counts.table_records_in += 1;
        Ok(())
    }
}

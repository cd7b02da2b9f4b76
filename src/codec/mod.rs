//! Turning Kafka record bytes into field maps and back. Decoding is strict: a record that
//! does not fit the declared schema is a decode error (and goes where `on_error.decode` says),
//! never a silently half-filled record.

pub mod avro;
pub mod canonical;
pub mod json;
pub mod registry;

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::{Encoding, Schema};
use avro::{AvroDecoder, AvroEncoder, WriterSchemas};

/// Why a record's bytes could not be read; the message goes into the `weir-error` header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// Why a result cannot be written in the sink's format; that result goes where
/// `on_error.produce` says.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct EncodeError(pub String);

/// Why the sink's Avro schema cannot be derived from the output fields, or the schema
/// registry cannot be used as configured: a configuration problem.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct SchemaError(pub String);

/// Decodes record values of one source.
#[derive(Debug, Clone)]
pub enum Decoder {
    /// The schema, and the fast reader of its canonical form where the schema is flat.
    Json(Schema, Option<Box<canonical::CanonicalReader>>),
    /// Confluent wire format, resolved against the declared fields.
    Avro(AvroDecoder),
    /// The whole value as UTF-8 text, seen by steps as the field `value`.
    String,
}

impl Decoder {
    /// `writers` holds the Avro writer schemas fetched from the registry.
    pub fn new(encoding: Encoding, schema: Option<&Schema>, writers: &Arc<WriterSchemas>) -> Option<Decoder> {
        match (encoding, schema) {
            (Encoding::Json, Some(schema)) => Some(Decoder::Json(schema.clone(), canonical::CanonicalReader::new(schema).map(Box::new))),
            (Encoding::Avro, Some(schema)) => Some(Decoder::Avro(AvroDecoder::new(schema.clone(), writers.clone()))),
            (Encoding::String, _) => Some(Decoder::String),
            _ => None,
        }
    }

    /// Values in canonical JSON keep only the fields named in `wanted` (the rest are checked,
    /// not kept); others are still decoded whole. Returns whether it applies (a JSON source
    /// of a flat schema).
    pub fn keep_only(&mut self, wanted: &[String]) -> bool {
        match self {
            Decoder::Json(_, Some(reader)) => {
                **reader = reader.keeping_only(wanted);
                true
            }
            _ => false,
        }
    }

    /// The fields of JSON bytes in canonical form of this decoder's schema, all of them;
    /// None for anything else (or once [`Decoder::keep_only`] applies).
    pub fn read_canonical(&self, bytes: &[u8]) -> Option<Map<String, Value>> {
        match self {
            Decoder::Json(_, Some(reader)) if reader.keeps_all() => reader.read(bytes),
            _ => None,
        }
    }

    pub fn decode(&self, value: Option<&[u8]>) -> Result<Map<String, Value>, DecodeError> {
        self.decode_verbatim(value, None).map(|(fields, _)| fields)
    }

    /// The fields, and whether the value's bytes are exactly what [`Encoder::Json`] writes for
    /// them (JSON already in canonical form: such a value can be written out as it came).
    /// Canonical JSON is read into `spare` (an earlier record's fields) where it fits (see
    /// [`canonical::CanonicalReader::read_into`]).
    pub fn decode_verbatim(&self, value: Option<&[u8]>, spare: Option<Map<String, Value>>) -> Result<(Map<String, Value>, bool), DecodeError> {
        let Some(bytes) = value else {
            return Err(DecodeError("the record has no value (a tombstone)".into()));
        };
        if let Decoder::Json(_, Some(reader)) = self
            && let Some(fields) = reader.read_into(bytes, spare)
        {
            return Ok((fields, true));
        }
        let fields = match self {
            Decoder::Json(schema, _) => json::decode(schema, bytes),
            // apache-avro reads lengths and counts from the bytes; a panic on a hostile
            // record is that record's decode error.
            Decoder::Avro(decoder) => crate::panics::contain(|| decoder.decode(bytes))
                .unwrap_or_else(|panic| Err(DecodeError(format!("the Avro decoder failed on this record: {panic}")))),
            Decoder::String => {
                let text = std::str::from_utf8(bytes)
                    .map_err(|error| DecodeError(format!("the value is not UTF-8 text: {error}")))?;
                let mut fields = Map::with_capacity(1);
                fields.insert("value".into(), Value::String(text.to_string()));
                Ok(fields)
            }
        };
        fields.map(|fields| (fields, false))
    }
}

/// A field by name. serde_json's map hashes the name with SipHash to find it, a few hundred
/// instructions; in a record of a few fields, comparing the names (most at their length
/// alone) costs a fraction of that. Names are unique in a map, so both find the same field.
pub fn field<'v>(fields: &'v Map<String, Value>, name: &str) -> Option<&'v Value> {
    const SCANNED: usize = 12;
    if fields.len() <= SCANNED {
        fields.iter().find_map(|(key, value)| (key == name).then_some(value))
    } else {
        fields.get(name)
    }
}

/// Encodes the sink's record values.
#[derive(Debug, Clone)]
pub enum Encoder {
    Json,
    Avro(AvroEncoder),
}

impl Encoder {
    pub fn encode(&self, fields: &Map<String, Value>) -> Result<Vec<u8>, EncodeError> {
        match self {
            Encoder::Json => Ok(json::encode(fields)),
            Encoder::Avro(encoder) => encoder.encode(fields),
        }
    }
}

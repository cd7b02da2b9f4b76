//! How one output's records become sink records: the encoders of its values and keys, its
//! key fields, headers and delivery mode.

use crate::codec::Encoder;
use crate::codec::avro::AvroEncoder;
use crate::config::DeliveryMode;
use crate::plan::Pipeline;

use super::SetupError;
use super::sink_headers::SinkHeaders;

/// How one output's records become sink records: its encoders, key fields and headers.
pub(super) struct OutputWriter {
    pub(super) topic: String,
    /// Where its sink is written in the file, for errors to name.
    pub(super) location: String,
    pub(super) encoder: Encoder,
    /// For the keys weir makes from fields.
    pub(super) key_encoder: Encoder,
    /// `sink.key`: empty keeps the key a step gave (or the input's).
    pub(super) key: Vec<String>,
    pub(super) headers: SinkHeaders,
    /// `idempotent_upsert`: each record is keyed by its id.
    pub(super) mode: DeliveryMode,
    /// Its records are the source's as decoded ([`Pipeline::writes_records_as_read`]): an
    /// input value already in the encoder's form is written as it came, not encoded again.
    pub(super) as_read: bool,
}

impl OutputWriter {
    pub(super) fn new(pipeline: &Pipeline, output: usize) -> Result<OutputWriter, SetupError> {
        let sink = &pipeline.outputs[output].sink;
        let name = pipeline.avro_record_name(output);
        let encoder = match sink.encoding {
            crate::config::Encoding::Avro => Encoder::Avro(AvroEncoder::new(&pipeline.output_schema(output), &name)?),
            _ => Encoder::Json,
        };
        let key_encoder = match (sink.key_encoding, pipeline.output_key_schema(output)) {
            (crate::config::Encoding::Avro, Some(schema)) => Encoder::Avro(AvroEncoder::new(&schema, &format!("{name}-key"))?),
            (crate::config::Encoding::Avro, None) => return Err(SetupError::NoKeySchema),
            _ => Encoder::Json,
        };
        Ok(OutputWriter {
            topic: sink.topic.clone(),
            location: sink.location.clone(),
            encoder,
            key_encoder,
            key: sink.key.clone(),
            headers: SinkHeaders::new(pipeline, output)?,
            mode: sink.mode,
            as_read: pipeline.writes_records_as_read(output),
        })
    }
}

//! The synchronous core of a pipeline: decode → steps → encode, with every failure routed by
//! `on_error`. It knows nothing of Kafka clients or transactions: it turns one input record
//! into zero or more outputs (sink or DLQ) and counts what it did, so the exactly-once loop
//! and a broker-less test harness can drive the same code.

mod as_read;
mod clock;
mod forward;
mod placement;
mod records;
mod sink_headers;
mod state;
mod tables;
mod topology;
mod writer;

#[cfg(test)]
mod tests;

pub use clock::Clock;
pub use tables::TableRecordError;
pub use forward::{ForwardHeaders, ID_HEADER, VERSION_HEADER};
use forward::{forwarded, upsert_id};
pub use records::{BatchCounts, Destination, InputRecord, InputValueMissing, Output, Payload, ErrorStage, RecordFailure};

use std::sync::Arc;

use crate::codec::avro::{AvroEncoder, WriterSchemas};
use crate::codec::{Decoder, EncodeError, Encoder, SchemaError};
use crate::config::{ErrorAction, EventTime, DeliveryMode};
use crate::plan::Pipeline;
use crate::operators::record_key::key_text_of;
use crate::operators::{event_time, key_of, Provenance, Record, RecordKey, StateEntryLimit};
pub use topology::{ChangelogEntry, TimerEntry, WATERMARK_KEY};
use topology::{ChainResult, Leaving, Topology};
use writer::OutputWriter;

pub struct Engine {
    pipeline: Pipeline,
    decoder: Decoder,
    event_time: Option<EventTime>,
    /// A join's right source: its decoder and event time.
    right: Option<(Decoder, Option<EventTime>)>,
    /// Avro writer schemas by registry id, shared by both sources' decoders.
    writers: Arc<WriterSchemas>,
    /// One per output, in the outputs' order.
    sinks: Vec<OutputWriter>,
    topology: Topology,
    counts: BatchCounts,
    /// The repartition topic in front of each stage after the first, by stage.
    repartition_topics: Vec<(usize, String)>,
    /// What `event_time.max_ahead` measures against.
    clock: Clock,
    /// The table sources' readers, which fill the rows lookups read.
    tables: Vec<tables::TableReader>,
    /// A source record in the encoder's form keeps only the fields something reads
    /// ([`as_read`]): its value must go out as it came, never be encoded from them.
    partial: bool,
    /// The fields of the last record written out, for the next record's decoder to fill in
    /// place of a fresh map (one for a record that passes unchanged: its names, tables and
    /// their allocations).
    spare: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Why an engine cannot be built for a pipeline. The plan checks all of this first, so a
/// planned pipeline builds; `weir run` reports it as a setup failure if one ever does not.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("source '{0}': no decoder for its format")]
    NoDecoder(String),
    #[error("the sink's schema: {0}")]
    Schema(#[from] SchemaError),
    #[error("avro keys need sink.key or a keyed step")]
    NoKeySchema,
    #[error("{0}")]
    Step(#[from] crate::operators::BuildError),
}

impl Engine {
    pub fn new(pipeline: &Pipeline) -> Result<Engine, SetupError> {
        let source = &pipeline.source;
        let writers = Arc::new(WriterSchemas::default());
        let decoder_of = |source: &crate::config::Source| {
            Decoder::new(source.encoding, source.schema.as_ref(), &writers)
                .ok_or_else(|| SetupError::NoDecoder(source.name.clone()))
        };
        let sinks = (0..pipeline.outputs.len()).map(|output| OutputWriter::new(pipeline, output)).collect::<Result<_, _>>()?;
        let mut decoder = decoder_of(source)?;
        let partial = match as_read::fields_read(pipeline) {
            Some(wanted) => decoder.keep_only(&wanted),
            None => false,
        };
        let right = match pipeline.join() {
            Some(join) => Some((decoder_of(&join.right)?, join.right.event_time.clone())),
            None => None,
        };
        let (tables, rows) = tables::table_readers(pipeline, &writers)?;
        let topology = Topology::new(pipeline, rows)?;
        let repartition_topics = pipeline.repartition_topics();
        Ok(Engine {
            pipeline: pipeline.clone(),
            decoder,
            event_time: source.event_time.clone(),
            right,
            writers,
            sinks,
            topology,
            counts: BatchCounts::default(),
            repartition_topics,
            clock: Clock::Wall,
            tables,
            partial,
            spare: None,
        })
    }

    /// Sets the largest state entry a stateful step may keep (the producer's limit for a
    /// changelog record); the default fits librdkafka's default `message.max.bytes`. Set it
    /// before the first record: tasks keep the limit they were built with.
    pub fn set_state_entry_limit(&mut self, limit: StateEntryLimit) {
        self.topology.set_state_entry_limit(limit);
    }

    /// Sets the clock `event_time.max_ahead` measures against (`weir test` fixes it).
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    /// The Avro writer schemas the decoders read: the runtime adds each id it meets.
    pub fn writer_schemas(&self) -> &Arc<WriterSchemas> {
        &self.writers
    }

    /// Whether records of `topic` are Avro (so name a writer schema to fetch first).
    pub fn reads_avro(&self, topic: &str) -> bool {
        self.stage_of_topic(topic).is_none() && self.pipeline.source_of_topic(topic).encoding == crate::config::Encoding::Avro
    }

    /// The sinks' Avro encoders, to register their schemas and set the ids: each output's
    /// value's (subject `<topic>-value`) and key's (`<topic>-key`).
    pub fn avro_sink(&mut self) -> Vec<(String, &mut AvroEncoder)> {
        let mut encoders = Vec::new();
        for writer in &mut self.sinks {
            let topic = &writer.topic;
            if let Encoder::Avro(encoder) = &mut writer.encoder {
                encoders.push((format!("{topic}-value"), encoder));
            }
            if let Encoder::Avro(encoder) = &mut writer.key_encoder {
                encoders.push((format!("{topic}-key"), encoder));
            }
        }
        encoders
    }

    /// Declares the input partitions that feed this engine: each holds the watermark after a
    /// repartition at -infinity until it delivers, and their count is the repartition width.
    pub fn set_input_partitions(&mut self, partitions: impl IntoIterator<Item = (String, i32)>) {
        self.topology.set_input_partitions(partitions);
    }

    /// How many stages the steps form; more than one means repartitioning.
    pub fn stage_count(&self) -> usize {
        self.topology.stage_count()
    }

    /// The pipeline indices of the stateful steps (each has a changelog topic).
    pub fn stateful_steps(&self) -> Vec<usize> {
        self.pipeline.stateful_steps()
    }

    /// Forgets the state of a partition read (a source partition, or a repartition topic's).
    pub fn drop_input_partition(&mut self, topic: &str, partition: i32) {
        match self.stage_of_topic(topic) {
            Some(stage) => self.topology.drop_repartitioned(stage, partition),
            None => self.topology.drop_input_partition(topic, partition),
        }
    }

    /// The source partitions idle for `idle_timeout` (see PIPELINE.md).
    pub fn set_idle_inputs(&mut self, idle: impl IntoIterator<Item = (String, i32)>) {
        self.topology.set_idle_inputs(idle);
    }

    /// Whether a source partition is currently counted as idle.
    pub fn is_idle_input(&self, topic: &str, partition: i32) -> bool {
        self.topology.is_idle_input(topic, partition)
    }

    /// The sources' `idle_timeout`, where repartitioning or a join run in place makes it
    /// matter.
    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        if self.stage_count() == 1 && self.join_in_place().is_none() {
            return None;
        }
        // A join's sources may each set one: the shorter applies.
        self.pipeline.sources().iter().filter_map(|source| source.watermark.as_ref()?.idle_timeout).min()
    }

    /// Each known input partition's watermark (`i64::MIN`: none yet).
    pub fn input_watermarks(&self) -> Vec<((String, i32), i64)> {
        self.topology.input_watermarks()
    }

    /// Keys or windows in state by stateful step (pipeline index).
    pub fn state_keys_by_step(&self) -> std::collections::BTreeMap<usize, usize> {
        self.topology.state_keys_by_step()
    }

    /// Keys or windows held in state, over every task and step.
    pub fn state_keys(&self) -> usize {
        self.topology.state_keys()
    }

    /// Runs one record through the pipeline, appending what should be produced to `outputs`.
    pub fn process(&mut self, input: &InputRecord<'_>, outputs: &mut Vec<Output>) -> Result<(), RecordFailure> {
        self.counts.records_in += 1;
        self.counts.input_at(input.provenance.timestamp);
        // A join's right records have their own format and event time.
        let (decoder, event_time) = match &self.right {
            Some((decoder, event_time)) if self.pipeline.join().is_some_and(|join| join.right.reads(input.provenance.topic)) => {
                self.counts.right_records_in += 1;
                (decoder, event_time)
            }
            _ => (&self.decoder, &self.event_time),
        };
        let (fields, canonical) = match decoder.decode_verbatim(input.value, self.spare.take()) {
            Ok(decoded) => decoded,
            Err(error) => return self.on_error(input, ErrorStage::Decode, &error.to_string(), outputs),
        };
        let event_time = match event_time {
            None => None,
            Some(spec) => match event_time::extract(spec, &fields, input.provenance.timestamp, self.clock.now_if(spec.max_ahead.is_some())) {
                Ok(time) => Some(time),
                Err(error) => return self.on_error(input, ErrorStage::Decode, &error.to_string(), outputs),
            },
        };
        let record = Record {
            fields,
            event_time: event_time.unwrap_or(i64::MIN),
            provenance: Some(input.provenance),
            key: None,
            upsert: false,
            id: None,
        };
        let mut emitted: Vec<Leaving<'_>> = Vec::new();
        let provenance = &input.provenance;
        let result = self.topology.process(record, provenance.topic, provenance.partition, event_time, &mut emitted);
        self.settle(input, result, emitted, canonical, outputs)
    }

    /// Counts or routes what became of `input` across the steps, then emits what they made.
    /// `canonical`: the input's value is already in the JSON encoder's form.
    fn settle(
        &mut self,
        input: &InputRecord<'_>,
        result: Result<ChainResult, crate::operators::ProcessError>,
        emitted: Vec<Leaving<'_>>,
        canonical: bool,
        outputs: &mut Vec<Output>,
    ) -> Result<(), RecordFailure> {
        match result {
            Ok(ChainResult::Passed) => {}
            Ok(ChainResult::Dropped) => self.counts.records_filtered += 1,
            Ok(ChainResult::Duplicate) => self.counts.duplicates_dropped += 1,
            Ok(ChainResult::Late(reason)) => self.on_error(input, ErrorStage::Late, &reason, outputs)?,
            Err(error) => return self.on_error(input, ErrorStage::Process, &error.to_string(), outputs),
        }
        self.emit(emitted, canonical.then_some(input), outputs)
    }

    /// [`Engine::process`] for a caller that keeps the outputs after `input` is gone (`weir
    /// test`, tests): a value written as read becomes the output's own copy.
    pub fn process_kept(&mut self, input: &InputRecord<'_>, outputs: &mut Vec<Output>) -> Result<(), RecordFailure> {
        kept(input, outputs, |outputs| self.process(input, outputs))
    }

    /// [`Engine::process_forwarded`] for a caller that keeps the outputs after `input` is gone
    /// (tests that play the repartition topics): a forward's value can be written as read too.
    pub fn process_forwarded_kept(
        &mut self,
        input: &InputRecord<'_>,
        stage: usize,
        partition: i32,
        forwarded: &ForwardHeaders,
        outputs: &mut Vec<Output>,
    ) -> Result<(), RecordFailure> {
        kept(input, outputs, |outputs| self.process_forwarded(input, stage, partition, forwarded, outputs))
    }

    /// Runs a record read from a repartition topic (or a watermark alone) through the stage
    /// it feeds. `input` carries the original record's provenance (for the DLQ) and the
    /// forwarded value.
    pub fn process_forwarded(
        &mut self,
        input: &InputRecord<'_>,
        stage: usize,
        partition: i32,
        forwarded: &ForwardHeaders,
        outputs: &mut Vec<Output>,
    ) -> Result<(), RecordFailure> {
        self.counts.input_at(input.provenance.timestamp);
        // A forward's value is the encoder's text of the record's fields: when those are the
        // source's, the canonical reader reads it (and an output writing records as read can
        // write it as it came); else it is read as any JSON object.
        let mut canonical = false;
        let record = match input.value {
            None => None,
            Some(value) => {
                let read = self.decoder.read_canonical(value);
                canonical = read.is_some();
                let fields: serde_json::Map<String, serde_json::Value> = match read.map_or_else(|| serde_json::from_slice(value), Ok) {
                    Ok(fields) => fields,
                    Err(error) => {
                        return self.on_error(input, ErrorStage::Decode, &format!("a repartitioned record that is not a JSON object: {error}"), outputs);
                    }
                };
                Some(Record {
                    fields,
                    event_time: forwarded.event_time,
                    provenance: Some(input.provenance),
                    key: forwarded.key.clone().map(|key| Box::new(RecordKey::Fields(key))),
                    upsert: forwarded.upsert,
                    // Upsert mode has no repartition topics.
                    id: None,
                })
            }
        };
        let mut emitted: Vec<Leaving<'_>> = Vec::new();
        let result = self.topology.process_forwarded(
            stage,
            partition,
            &forwarded.sender,
            forwarded.watermark,
            forwarded.idle,
            record,
            forwarded.position,
            &mut emitted,
        );
        self.settle(input, result, emitted, canonical, outputs)
    }

    /// The end of a batch (a commit): update-mode windows emit what changed.
    pub fn end_batch(&mut self, outputs: &mut Vec<Output>) -> Result<(), RecordFailure> {
        let mut emitted: Vec<Leaving<'_>> = Vec::new();
        self.topology.end_batch(&mut emitted);
        self.emit(emitted, None, outputs)
    }

    /// The end of a bounded input (`weir test`): every watermark goes to +infinity, closing
    /// every window and ending all state, then the last batch ends.
    pub fn finish(&mut self, outputs: &mut Vec<Output>) -> Result<(), RecordFailure> {
        let mut emitted: Vec<Leaving<'_>> = Vec::new();
        self.topology.finish(&mut emitted);
        self.emit(emitted, None, outputs)
    }

    fn emit(&mut self, emitted: Vec<Leaving<'_>>, verbatim: Option<&InputRecord<'_>>, outputs: &mut Vec<Output>) -> Result<(), RecordFailure> {
        for item in emitted {
            let output = match item {
                Leaving::Record(index, record) => match self.sink_record(index, &record, verbatim) {
                    Ok(output) => {
                        self.spare = Some(record.fields);
                        output
                    }
                    Err(Unwritable { key, stage, error }) => {
                        self.failed_at_sink(key, &record, stage, &error, outputs)?;
                        continue;
                    }
                },
                Leaving::Tombstone(index, key) => match self.sinks[index].key_encoder.encode(&key) {
                    Ok(bytes) => Output { destination: Destination::Sink(index), partition: None, key: Some(bytes), value: Payload::None, headers: Vec::new() },
                    // Keys are derived from typed fields; only a bug gets here. The tombstone
                    // is then not written: the merged-away session's last value stays.
                    Err(error) => {
                        tracing::error!(%error, "a session tombstone's key cannot be encoded; it is not written");
                        continue;
                    }
                },
                Leaving::Forward(forward) => {
                    // Internal traffic: not counted as output.
                    outputs.push(forwarded(*forward));
                    continue;
                }
            };
            if let Destination::Sink(index) = output.destination {
                self.counts.count_out(index, 1);
            }
            outputs.push(output);
        }
        Ok(())
    }

    /// The record output `index` writes for `record`: its key (in upsert mode its id; else the
    /// output's `sink.key`, else the key a step gave it, else the input's), headers and
    /// encoded value. `verbatim`: an input whose value is in the encoder's form, written as it
    /// came where `record` is that input passed on unchanged.
    fn sink_record(&self, index: usize, record: &Record<'_>, verbatim: Option<&InputRecord<'_>>) -> Result<Output, Unwritable> {
        let writer = &self.sinks[index];
        // Upsert mode: the key is the output's id, also in a header with its version.
        let upsert = (writer.mode == DeliveryMode::IdempotentUpsert).then(|| upsert_id(record));
        let key = if let Some((id, _)) = &upsert {
            Ok(Some(id.clone()))
        } else if record.upsert || writer.key.is_empty() {
            match &record.key {
                Some(key) => match (&**key, &writer.key_encoder) {
                    (RecordKey::Text(text), Encoder::Json) => Ok(Some(text.clone().into_bytes())),
                    (key, encoder) => encoder.encode(&key.fields()).map(Some),
                },
                None => Ok(record.provenance.and_then(|provenance| provenance.key).map(<[u8]>::to_vec)),
            }
        } else {
            match &writer.key_encoder {
                // The key's text, written without making the map.
                Encoder::Json => Ok(Some(key_text_of(&record.fields, &writer.key).into_bytes())),
                encoder => encoder.encode(&key_of(&record.fields, &writer.key)).map(Some),
            }
        };
        let key = key.map_err(|error| Unwritable::encoding(None, format!("the key: {error}")))?;
        let mut headers = writer.headers.of(record).map_err(|error| Unwritable {
            key: key.clone(),
            stage: ErrorStage::Process,
            error: format!("{}.headers: {error}", writer.location),
        })?;
        if let Some((id, version)) = upsert {
            sink_headers::replace(&mut headers, ID_HEADER, Some(id));
            sink_headers::replace(&mut headers, VERSION_HEADER, Some(itoa::Buffer::new().format(version).as_bytes().to_vec()));
        }
        let as_read = verbatim
            .filter(|input| writer.as_read && record.provenance.is_some_and(|provenance| provenance.same_record(&input.provenance)))
            .and_then(|input| input.value);
        let value = match as_read {
            Some(_) => Ok(Payload::Input),
            // Only a bug gets here: the record is not the input it was read in part from.
            None if self.partial && verbatim.is_some() => {
                Err(EncodeError("weir read only part of this record's fields and cannot write it (a bug: please report it)".into()))
            }
            None => writer.encoder.encode(&record.fields).map(Payload::Own),
        };
        match value {
            Ok(value) => Ok(Output { destination: Destination::Sink(index), partition: None, key, value, headers }),
            Err(error) => Err(Unwritable::encoding(key, error.to_string())),
        }
    }

    /// A result that cannot become a sink record goes where the stage's `on_error` says, as
    /// JSON with the provenance of the input it came from.
    fn failed_at_sink(
        &mut self,
        key: Option<Vec<u8>>,
        record: &Record<'_>,
        stage: ErrorStage,
        error: &str,
        outputs: &mut Vec<Output>,
    ) -> Result<(), RecordFailure> {
        let provenance = record.provenance;
        self.route(stage, error, provenance.as_ref(), outputs, || Output::unencodable(key, &record.fields, stage, error, provenance.as_ref()))
    }

    /// Applies the stage's `on_error` action to a bad record.
    pub fn on_error(
        &mut self,
        input: &InputRecord<'_>,
        stage: ErrorStage,
        error: &str,
        outputs: &mut Vec<Output>,
    ) -> Result<(), RecordFailure> {
        self.route(stage, error, Some(&input.provenance), outputs, || Output::dlq_record(input, stage, error))
    }

    /// Follows the stage's `on_error`: the DLQ record `dlq_record` makes, a skip, or a
    /// failure naming where the input was read (-1 when no single input made it).
    fn route(
        &mut self,
        stage: ErrorStage,
        error: &str,
        provenance: Option<&Provenance<'_>>,
        outputs: &mut Vec<Output>,
        dlq_record: impl FnOnce() -> Output,
    ) -> Result<(), RecordFailure> {
        match stage.action(&self.pipeline.on_error) {
            ErrorAction::Dlq => {
                outputs.push(dlq_record());
                self.counts.dlq_records[stage.index()] += 1;
                Ok(())
            }
            ErrorAction::Skip => {
                self.counts.skipped[stage.index()] += 1;
                Ok(())
            }
            ErrorAction::Fail => Err(RecordFailure {
                stage,
                error: error.to_string(),
                topic: provenance.map(|provenance| provenance.topic.to_string()).unwrap_or_default(),
                partition: provenance.map_or(-1, |provenance| provenance.partition),
                offset: provenance.map_or(-1, |provenance| provenance.offset),
            }),
        }
    }

    /// Undoes the counting of a produced record that was turned into a DLQ record or skipped
    /// after all (produce-stage errors).
    pub fn unproduce(&mut self, destination: Destination) {
        if let Destination::Sink(output) = destination {
            self.counts.count_out(output, -1);
        }
    }

    /// The counts since the last call; called when a batch commits or aborts.
    pub fn take_counts(&mut self) -> BatchCounts {
        std::mem::take(&mut self.counts)
    }

    /// Adds the counts since the last call to `total` and starts again from zero, keeping
    /// what they hold (called after each record: taking them would allocate per record).
    pub fn pass_counts(&mut self, total: &mut BatchCounts) {
        total.add(&self.counts);
        self.counts.clear();
    }
}

/// Why a result cannot become a sink record: its key (when made), the stage whose
/// `on_error` applies, and the error.
struct Unwritable {
    key: Option<Vec<u8>>,
    stage: ErrorStage,
    error: String,
}

impl Unwritable {
    /// A result the sink's format cannot encode: it follows `on_error.produce`.
    fn encoding(key: Option<Vec<u8>>, error: String) -> Unwritable {
        Unwritable { key, stage: ErrorStage::Produce, error: format!("encoding the result for the sink: {error}") }
    }
}

/// Runs `run` (which appends to `outputs`), then makes each new output's value that is
/// `input`'s its own copy.
fn kept(input: &InputRecord<'_>, outputs: &mut Vec<Output>, run: impl FnOnce(&mut Vec<Output>) -> Result<(), RecordFailure>) -> Result<(), RecordFailure> {
    let before = outputs.len();
    run(outputs)?;
    outputs[before..].iter_mut().for_each(|output| output.own_value(input));
    Ok(())
}

// The engine lives in the loop's session, which the rebalance callbacks reach.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Engine>();
};

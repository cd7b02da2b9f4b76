//! The synchronous core of a pipeline: decode → steps → encode, with every failure routed by
//! `on_error`. It knows nothing of Kafka clients or transactions: it turns one input record
//! into zero or more outputs (sink or DLQ) and counts what it did, so the exactly-once loop
//! and a broker-less test harness can drive the same code.

mod topology;

use std::sync::Arc;

use crate::codec::avro::{AvroEncoder, WriterSchemas};
use crate::codec::{json, Decoder, Encoder};
use crate::config::{ErrorAction, ErrorPolicy, EventTime, DeliveryMode};
use crate::plan::Pipeline;
use crate::operators::{event_time, key_of, Emitted, Forward, Provenance, Record, StateEntryLimit};
pub use topology::ChangelogEntry;
use topology::{ChainResult, Topology};

/// Where an error happened; the value of the `weir-error-stage` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Decode,
    Late,
    Process,
    Produce,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Decode, Stage::Late, Stage::Process, Stage::Produce];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Late => "late",
            Stage::Process => "process",
            Stage::Produce => "produce",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    pub fn action(self, policy: &ErrorPolicy) -> ErrorAction {
        match self {
            Stage::Decode => policy.decode,
            Stage::Late => policy.late,
            Stage::Process => policy.process,
            Stage::Produce => policy.produce,
        }
    }
}

/// One input record as read from Kafka, borrowed from the consumer's buffer.
#[derive(Debug, Clone, Copy)]
pub struct InputRecord<'a> {
    pub provenance: Provenance<'a>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Sink,
    Dlq,
    /// The repartition topic in front of this stage.
    Repartition(usize),
}

/// A record to produce, owned.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub destination: Destination,
    /// Set for repartition topics (routed by a hash of the step's key); else by the key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Output {
    /// The DLQ record for `input`: its original key, value and headers, plus the provenance
    /// headers of PIPELINE.md.
    pub fn dead_letter(input: &InputRecord<'_>, stage: Stage, error: &str) -> Output {
        let provenance = &input.provenance;
        let mut headers: Vec<(String, Vec<u8>)> = provenance
            .headers
            .iter()
            .filter_map(|(name, value)| value.map(|bytes| (name.to_string(), bytes.to_vec())))
            .collect();
        error_headers(&mut headers, stage, error, Some(provenance));
        Output {
            destination: Destination::Dlq,
            partition: None,
            key: input.key.map(<[u8]>::to_vec),
            value: input.value.map(<[u8]>::to_vec),
            headers,
        }
    }

    /// The DLQ record for a result the sink's format cannot encode: the result as JSON, with
    /// the provenance headers of the input it came from, when it came from one.
    fn unencodable(key: Option<Vec<u8>>, fields: &serde_json::Map<String, serde_json::Value>, error: &str, provenance: Option<&Provenance<'_>>) -> Output {
        let mut headers = Vec::with_capacity(5);
        error_headers(&mut headers, Stage::Produce, error, provenance);
        Output { destination: Destination::Dlq, partition: None, key, value: Some(json::encode(fields)), headers }
    }
}

/// The DLQ headers of PIPELINE.md: the stage, the error, and where the input was read.
fn error_headers(headers: &mut Vec<(String, Vec<u8>)>, stage: Stage, error: &str, provenance: Option<&Provenance<'_>>) {
    headers.push(("weir-error-stage".into(), stage.as_str().as_bytes().to_vec()));
    headers.push(("weir-error".into(), error.as_bytes().to_vec()));
    if let Some(provenance) = provenance {
        headers.push(("weir-source-topic".into(), provenance.topic.as_bytes().to_vec()));
        headers.push(("weir-source-partition".into(), provenance.partition.to_string().into_bytes()));
        headers.push(("weir-source-offset".into(), provenance.offset.to_string().into_bytes()));
    }
}

/// What one batch did, added to the metrics only when the batch commits, so that counters
/// agree with what a read_committed reader sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchCounts {
    pub records_in: u64,
    /// Of `records_in`, those read from a join's right source.
    pub right_records_in: u64,
    pub records_out: u64,
    pub records_filtered: u64,
    /// Records a dedup step dropped as duplicates.
    pub duplicates_dropped: u64,
    pub dead_lettered: [u64; 4],
    pub skipped: [u64; 4],
}

impl BatchCounts {
    pub fn dead_lettered(&self, stage: Stage) -> u64 {
        self.dead_lettered[stage.index()]
    }

    pub fn skipped(&self, stage: Stage) -> u64 {
        self.skipped[stage.index()]
    }
}

/// A record failed at a stage whose policy is `fail`: the batch must not commit.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{stage} error at {topic}[{partition}]@{offset} with on_error.{stage}: fail: {error}", stage = stage.as_str())]
pub struct StageFailure {
    pub stage: Stage,
    pub error: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

pub struct Engine {
    pipeline: Pipeline,
    decoder: Decoder,
    event_time: Option<EventTime>,
    /// A join's right source: its decoder and event time.
    right: Option<(Decoder, Option<EventTime>)>,
    /// Avro writer schemas by registry id, shared by both sources' decoders.
    writers: Arc<WriterSchemas>,
    encoder: Encoder,
    /// For the keys weir makes from fields.
    key_encoder: Encoder,
    topology: Topology,
    counts: BatchCounts,
    /// The repartition topic in front of each stage after the first, by stage.
    repartition_topics: Vec<(usize, String)>,
    /// What `event_time.max_ahead` measures against.
    clock: Clock,
}

/// The wall clock that `event_time.max_ahead` compares event times with: the real one, or
/// (in `weir test`) a fixed instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Clock {
    #[default]
    Wall,
    /// Epoch milliseconds.
    Fixed(i64),
}

impl Clock {
    /// Epoch milliseconds, read only when `needed` (the wall clock is a system call).
    fn now_if(self, needed: bool) -> i64 {
        match (self, needed) {
            (_, false) => 0,
            (Clock::Fixed(now), true) => now,
            (Clock::Wall, true) => chrono::Utc::now().timestamp_millis(),
        }
    }
}

impl Engine {
    pub fn new(pipeline: &Pipeline) -> Result<Engine, String> {
        let source = &pipeline.source;
        let writers = Arc::new(WriterSchemas::default());
        let decoder_of = |source: &crate::config::Source| {
            Decoder::new(source.encoding, source.schema.as_ref(), &writers)
                .ok_or_else(|| format!("source '{}': no decoder for its format", source.name))
        };
        let encoder = match pipeline.sink.encoding {
            crate::config::Encoding::Avro => Encoder::Avro(AvroEncoder::new(&pipeline.output_schema(), &pipeline.name)?),
            _ => Encoder::Json,
        };
        let key_encoder = match (pipeline.sink.key_encoding, pipeline.output_key_schema()) {
            (crate::config::Encoding::Avro, Some(schema)) => {
                Encoder::Avro(AvroEncoder::new(&schema, &format!("{}-key", pipeline.name))?)
            }
            (crate::config::Encoding::Avro, None) => return Err("avro keys need sink.key or a keyed step".into()),
            _ => Encoder::Json,
        };
        let decoder = decoder_of(source)?;
        let right = match pipeline.join() {
            Some(join) => Some((decoder_of(&join.right)?, join.right.event_time.clone())),
            None => None,
        };
        let topology = Topology::new(pipeline)?;
        let repartition_topics = topology
            .stage_first_steps()
            .into_iter()
            .enumerate()
            .skip(1)
            .map(|(stage, step)| (stage, format!("{}-{step}-repartition", pipeline.name)))
            .collect();
        Ok(Engine {
            pipeline: pipeline.clone(),
            decoder,
            event_time: source.event_time.clone(),
            right,
            writers,
            encoder,
            key_encoder,
            topology,
            counts: BatchCounts::default(),
            repartition_topics,
            clock: Clock::Wall,
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

    /// The sink's Avro encoders, to register their schemas and set the ids: the value's
    /// (subject `<topic>-value`) and the key's (`<topic>-key`).
    pub fn avro_sink(&mut self) -> Vec<(String, &mut AvroEncoder)> {
        let topic = &self.pipeline.sink.topic;
        let mut encoders = Vec::new();
        if let Encoder::Avro(encoder) = &mut self.encoder {
            encoders.push((format!("{topic}-value"), encoder));
        }
        if let Encoder::Avro(encoder) = &mut self.key_encoder {
            encoders.push((format!("{topic}-key"), encoder));
        }
        encoders
    }

    /// Declares the input partitions that feed this engine: each holds the watermark after a
    /// repartition at -infinity until it delivers, and their count is the repartition width.
    pub fn set_input_partitions(&mut self, partitions: impl IntoIterator<Item = (String, i32)>) {
        self.topology.set_input_partitions(partitions);
    }

    pub fn describe_steps(&self) -> Vec<String> {
        self.topology.describe()
    }

    /// How many stages the steps form; more than one means repartitioning.
    pub fn stage_count(&self) -> usize {
        self.topology.stage_count()
    }

    /// Each stage's steps (pipeline indices) and the key that routes records into it (None
    /// for stage 0, whose tasks are the input partitions).
    pub fn stages(&self) -> Vec<(Vec<usize>, Option<Vec<String>>)> {
        self.topology.stages()
    }

    /// See [`Pipeline::state_fingerprint`].
    pub fn state_fingerprint(&self, step: usize) -> String {
        self.pipeline.state_fingerprint(step)
    }

    /// The pipeline indices of the stateful steps (each has a changelog topic).
    pub fn stateful_steps(&self) -> Vec<usize> {
        self.topology.stateful_steps()
    }

    /// See [`Pipeline::step_definition`].
    pub fn step_definition(&self, step: usize) -> String {
        self.pipeline.step_definition(step)
    }

    /// Changed state for the changelogs; call after `end_batch`, before committing.
    pub fn take_changes(&mut self) -> Vec<ChangelogEntry> {
        self.topology.take_changes()
    }

    pub fn restore(&mut self, entry: &ChangelogEntry) -> Result<(), String> {
        self.topology.restore(entry.topic.as_deref(), entry.partition, entry.step, &entry.key, entry.value.as_ref())
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

    /// Production: stages after the first are fed through repartition topics of `width`
    /// partitions, from `input_partitions` source partitions in all.
    /// Without transactions (upsert mode), forwards carry their position, so that what a
    /// replaying sender sends again is dropped.
    pub fn distribute(&mut self, width: u32, input_partitions: usize) {
        let positioned = self.pipeline.sink.mode == DeliveryMode::IdempotentUpsert;
        self.topology.distribute(width, input_partitions, positioned);
    }

    /// The repartition topic in front of each stage after the first, by stage.
    pub fn repartition_topics(&self) -> Vec<(usize, String)> {
        self.repartition_topics.clone()
    }

    /// The stage a repartition topic feeds; None for other topics. Called for every record
    /// read, so it allocates nothing.
    pub fn stage_of_topic(&self, topic: &str) -> Option<usize> {
        self.repartition_topics.iter().find(|(_, name)| name == topic).map(|(stage, _)| *stage)
    }

    /// Which changelog entries make up the state behind a partition read: those of `steps`
    /// whose entry topic is one of the owners (the source topic, both of a join run in
    /// place; None after a repartition).
    pub fn restore_scope(&self, topic: &str) -> (Vec<usize>, Vec<Option<String>>) {
        match self.stage_of_topic(topic) {
            Some(stage) => (self.topology.stage_stateful_steps(stage), vec![None]),
            // Stage 0's state, with the input watermarks.
            None => (self.topology.stage_stateful_steps(0), self.topology.task_topics(topic).into_iter().map(Some).collect()),
        }
    }

    /// The partition read that names the task `topic`'s partition feeds: itself, or for a
    /// join run in place, the left partition of the pair. State is restored (and an abort
    /// replayed) per task, so a pair's two partitions go as one.
    pub fn task_input(&self, topic: &str, partition: i32) -> (String, i32) {
        match self.stage_of_topic(topic) {
            Some(_) => (topic.to_string(), partition),
            None => self.topology.task_input(topic, partition),
        }
    }

    /// Whether stateful steps run in the input partitions' tasks (so the changelogs are
    /// numbered like the input partitions, and all source topics need one partition count).
    pub fn has_input_state(&self) -> bool {
        !self.topology.stage_stateful_steps(0).is_empty()
    }

    /// The join run in place, as (left topic, right topic): the consumer must be given
    /// partition p of both together.
    pub fn join_in_place(&self) -> Option<(&str, &str)> {
        self.topology.join_in_place()
    }

    /// The partitions read whose state shares changelog partition `partition` of `step`:
    /// while this process does not own them all, others write there too.
    pub fn changelog_writers(&self, step: usize, partition: i32) -> Vec<(String, i32)> {
        if let Some((_, topic)) =
            self.repartition_topics.iter().find(|(stage, _)| self.topology.stage_stateful_steps(*stage).contains(&step))
        {
            return vec![(topic.clone(), partition)];
        }
        let mut writers: Vec<(String, i32)> = match &self.pipeline.source.topics {
            crate::config::SourceTopics::List(topics) => topics.iter().map(|topic| (topic.clone(), partition)).collect(),
            crate::config::SourceTopics::Pattern(_) => Vec::new(),
        };
        // A join run in place keeps the right input's watermark there too.
        if let Some((_, right)) = self.join_in_place() {
            writers.push((right.to_string(), partition));
        }
        writers
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
    pub fn process(&mut self, input: &InputRecord<'_>, outputs: &mut Vec<Output>) -> Result<(), StageFailure> {
        self.counts.records_in += 1;
        // A join's right records have their own format and event time.
        let (decoder, event_time) = match &self.right {
            Some((decoder, event_time)) if self.pipeline.join().is_some_and(|join| join.right.reads(input.provenance.topic)) => {
                self.counts.right_records_in += 1;
                (decoder, event_time)
            }
            _ => (&self.decoder, &self.event_time),
        };
        let fields = match decoder.decode(input.value) {
            Ok(fields) => fields,
            Err(error) => return self.reject(input, Stage::Decode, &error.to_string(), outputs),
        };
        let event_time = match event_time {
            None => None,
            Some(spec) => match event_time::extract(spec, &fields, input.provenance.timestamp, self.clock.now_if(spec.max_ahead.is_some())) {
                Ok(time) => Some(time),
                Err(error) => return self.reject(input, Stage::Decode, &error, outputs),
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
        let mut emitted = Vec::new();
        let provenance = &input.provenance;
        let result = self.topology.process(record, provenance.topic, provenance.partition, event_time, &mut emitted);
        self.settle(input, result, emitted, outputs)
    }

    /// Counts or routes what became of `input` across the steps, then emits what they made.
    fn settle(
        &mut self,
        input: &InputRecord<'_>,
        result: Result<ChainResult, crate::operators::ProcessError>,
        emitted: Vec<Emitted<'_>>,
        outputs: &mut Vec<Output>,
    ) -> Result<(), StageFailure> {
        match result {
            Ok(ChainResult::Passed) => {}
            Ok(ChainResult::Dropped) => self.counts.records_filtered += 1,
            Ok(ChainResult::Duplicate) => self.counts.duplicates_dropped += 1,
            Ok(ChainResult::Late(reason)) => self.reject(input, Stage::Late, &reason, outputs)?,
            Err(error) => return self.reject(input, Stage::Process, &error.to_string(), outputs),
        }
        self.emit(emitted, outputs)
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
    ) -> Result<(), StageFailure> {
        let record = match input.value {
            None => None,
            Some(value) => {
                let fields: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(value) {
                    Ok(fields) => fields,
                    Err(error) => {
                        return self.reject(input, Stage::Decode, &format!("a repartitioned record that is not a JSON object: {error}"), outputs);
                    }
                };
                Some(Record {
                    fields,
                    event_time: forwarded.event_time,
                    provenance: Some(input.provenance),
                    key: forwarded.key.clone(),
                    upsert: forwarded.upsert,
                    // Upsert mode has no repartition topics.
                    id: None,
                })
            }
        };
        let mut emitted = Vec::new();
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
        self.settle(input, result, emitted, outputs)
    }

    /// The end of a batch (a commit): update-mode windows emit what changed.
    pub fn end_batch(&mut self, outputs: &mut Vec<Output>) -> Result<(), StageFailure> {
        let mut emitted = Vec::new();
        self.topology.end_batch(&mut emitted);
        self.emit(emitted, outputs)
    }

    /// The end of a bounded input (`weir test`): every watermark goes to +infinity, closing
    /// every window and ending all state, then the last batch ends.
    pub fn finish(&mut self, outputs: &mut Vec<Output>) -> Result<(), StageFailure> {
        let mut emitted = Vec::new();
        self.topology.finish(&mut emitted);
        self.emit(emitted, outputs)
    }

    fn emit(&mut self, emitted: Vec<Emitted<'_>>, outputs: &mut Vec<Output>) -> Result<(), StageFailure> {
        for item in emitted {
            let output = match item {
                Emitted::Record(record) => {
                    let key = if record.upsert || self.pipeline.sink.key.is_empty() {
                        match &record.key {
                            Some(key) => self.key_encoder.encode(key).map(Some),
                            None => Ok(record.provenance.and_then(|provenance| provenance.key).map(<[u8]>::to_vec)),
                        }
                    } else {
                        self.key_encoder.encode(&key_of(&record.fields, &self.pipeline.sink.key)).map(Some)
                    };
                    let key = match key {
                        Ok(key) => key,
                        Err(error) => {
                            self.unencodable(None, &record, &format!("the key: {error}"), outputs)?;
                            continue;
                        }
                    };
                    // Upsert mode: the key is the output's id, also in a header with its version.
                    let (key, headers) = match self.pipeline.sink.mode {
                        DeliveryMode::IdempotentUpsert => {
                            let (id, version) = upsert_id(&record);
                            let id = json::encode(&id);
                            (Some(id.clone()), vec![(ID_HEADER.to_string(), id), (VERSION_HEADER.to_string(), version.to_string().into_bytes())])
                        }
                        DeliveryMode::Transactional => (key, Vec::new()),
                    };
                    match self.encoder.encode(&record.fields) {
                        Ok(value) => Output { destination: Destination::Sink, partition: None, key, value: Some(value), headers },
                        Err(error) => {
                            self.unencodable(key, &record, &error, outputs)?;
                            continue;
                        }
                    }
                }
                Emitted::Tombstone(key) => match self.key_encoder.encode(&key) {
                    Ok(bytes) => Output { destination: Destination::Sink, partition: None, key: Some(bytes), value: None, headers: Vec::new() },
                    // Keys are derived from typed fields; only a bug gets here. The tombstone
                    // is then not written: the merged-away session's last value stays.
                    Err(error) => {
                        tracing::error!(%error, "a session tombstone's key cannot be encoded; it is not written");
                        continue;
                    }
                },
                Emitted::Forward(forward) => {
                    // Internal traffic: not counted as output.
                    outputs.push(forwarded(forward));
                    continue;
                }
            };
            outputs.push(output);
            self.counts.records_out += 1;
        }
        Ok(())
    }

    /// A result the sink's format cannot encode follows `on_error.produce`.
    fn unencodable(&mut self, key: Option<Vec<u8>>, record: &Record<'_>, error: &str, outputs: &mut Vec<Output>) -> Result<(), StageFailure> {
        let error = format!("encoding the result for the sink: {error}");
        let provenance = record.provenance;
        self.route(Stage::Produce, &error, provenance.as_ref(), outputs, || {
            Output::unencodable(key, &record.fields, &error, provenance.as_ref())
        })
    }

    /// Applies the stage's `on_error` action to a bad record.
    pub fn reject(
        &mut self,
        input: &InputRecord<'_>,
        stage: Stage,
        error: &str,
        outputs: &mut Vec<Output>,
    ) -> Result<(), StageFailure> {
        self.route(stage, error, Some(&input.provenance), outputs, || Output::dead_letter(input, stage, error))
    }

    /// Follows the stage's `on_error`: the DLQ record `dead_letter` makes, a skip, or a
    /// failure naming where the input was read (-1 when no single input made it).
    fn route(
        &mut self,
        stage: Stage,
        error: &str,
        provenance: Option<&Provenance<'_>>,
        outputs: &mut Vec<Output>,
        dead_letter: impl FnOnce() -> Output,
    ) -> Result<(), StageFailure> {
        match stage.action(&self.pipeline.on_error) {
            ErrorAction::Dlq => {
                outputs.push(dead_letter());
                self.counts.dead_lettered[stage.index()] += 1;
                Ok(())
            }
            ErrorAction::Skip => {
                self.counts.skipped[stage.index()] += 1;
                Ok(())
            }
            ErrorAction::Fail => Err(StageFailure {
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
    pub fn unproduce(&mut self) {
        self.counts.records_out = self.counts.records_out.saturating_sub(1);
    }

    /// The counts since the last call; called when a batch commits or aborts.
    pub fn take_counts(&mut self) -> BatchCounts {
        std::mem::take(&mut self.counts)
    }
}

/// The headers of an output's id and version in `mode: idempotent_upsert`.
pub const ID_HEADER: &str = "weir-id";
pub const VERSION_HEADER: &str = "weir-version";

/// A sink record's deterministic id in upsert mode, from its inputs, and its version:
/// - a window's result: the group and `window_start`; version: its event time (window end - 1);
/// - a dedup's output: the dedup key; version: the input offset;
/// - a join's result: where each side was read (`{<left>: {topic, partition, offset} | null,
///   <right>: ...}`); version: its event time;
/// - anything else (pass-through, filter): the input's topic, partition and offset; version:
///   the offset.
///
/// A replay from the same offsets rebuilds the same state, so it writes the same ids with
/// the same values.
fn upsert_id(record: &Record<'_>) -> (serde_json::Map<String, serde_json::Value>, i64) {
    if let Some(id) = &record.id {
        return (id.clone(), record.event_time);
    }
    match (&record.key, record.provenance) {
        (Some(key), None) => {
            let mut id = key.clone();
            if let Some(start) = record.fields.get("window_start") {
                id.insert("window_start".into(), start.clone());
            }
            (id, record.event_time)
        }
        (Some(key), Some(provenance)) => (key.clone(), provenance.offset),
        (None, Some(provenance)) => {
            (crate::operators::join::coordinates(provenance.topic, provenance.partition, provenance.offset), provenance.offset)
        }
        (None, None) => (serde_json::Map::new(), record.event_time),
    }
}

/// What a record read from a repartition topic carries besides its value, in headers.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardHeaders {
    pub sender: String,
    pub watermark: i64,
    pub idle: bool,
    pub event_time: i64,
    pub key: Option<serde_json::Map<String, serde_json::Value>>,
    pub upsert: bool,
    /// Where the record entered the pipeline: (topic, partition, offset, timestamp).
    pub source: Option<(String, i32, i64, Option<i64>)>,
    /// Upsert mode: the forward's position in its sender's sequence.
    pub position: Option<(i64, u32)>,
}

const SENDER: &str = "weir-sender";
const WATERMARK: &str = "weir-watermark";
const EVENT_TIME: &str = "weir-event-time";
const RECORD_KEY: &str = "weir-record-key";
const UPSERT: &str = "weir-upsert";
const IDLE: &str = "weir-idle";
const SOURCE: &str = "weir-source";
const POSITION: &str = "weir-position";

/// The repartition-topic record of a forward: the input's Kafka key, the fields as JSON (no
/// value: a watermark alone), and the rest in headers.
fn forwarded(forward: Forward<'_>) -> Output {
    let mut headers = vec![
        (SENDER.to_string(), forward.sender.into_bytes()),
        (WATERMARK.to_string(), forward.watermark.to_string().into_bytes()),
    ];
    if forward.idle {
        headers.push((IDLE.to_string(), b"1".to_vec()));
    }
    if let Some((offset, made)) = forward.position {
        headers.push((POSITION.to_string(), format!("{offset}/{made}").into_bytes()));
    }
    let (mut key, mut value) = (None, None);
    if let Some(record) = forward.record {
        headers.push((EVENT_TIME.to_string(), record.event_time.to_string().into_bytes()));
        if let Some(record_key) = &record.key {
            headers.push((RECORD_KEY.to_string(), json::encode(record_key)));
        }
        if record.upsert {
            headers.push((UPSERT.to_string(), b"1".to_vec()));
        }
        if let Some(provenance) = record.provenance {
            let source = serde_json::json!([provenance.topic, provenance.partition, provenance.offset, provenance.timestamp]);
            headers.push((SOURCE.to_string(), source.to_string().into_bytes()));
            key = provenance.key.map(<[u8]>::to_vec);
        }
        value = Some(json::encode(&record.fields));
    }
    Output { destination: Destination::Repartition(forward.stage), partition: Some(forward.partition as i32), key, value, headers }
}

impl ForwardHeaders {
    /// Reads the headers `forwarded` wrote.
    pub fn parse(headers: &[(&str, Option<&[u8]>)]) -> Result<ForwardHeaders, String> {
        let find = |name: &str| headers.iter().find(|(key, _)| *key == name).and_then(|(_, value)| *value);
        let text = |name: &str| find(name).and_then(|bytes| std::str::from_utf8(bytes).ok());
        let number = |name: &str| text(name).and_then(|text| text.parse::<i64>().ok());
        let sender = text(SENDER).ok_or("a repartitioned record without its weir-sender header")?.to_string();
        let watermark = number(WATERMARK).ok_or("a repartitioned record without a numeric weir-watermark header")?;
        let key = match find(RECORD_KEY) {
            None => None,
            Some(bytes) => Some(serde_json::from_slice(bytes).map_err(|error| format!("weir-record-key is not a JSON object: {error}"))?),
        };
        let source = match find(SOURCE) {
            None => None,
            Some(bytes) => Some(serde_json::from_slice(bytes).map_err(|error| format!("weir-source is not [topic, partition, offset, timestamp]: {error}"))?),
        };
        let position = match text(POSITION) {
            None => None,
            Some(text) => Some(
                text.split_once('/')
                    .and_then(|(offset, made)| Some((offset.parse::<i64>().ok()?, made.parse::<u32>().ok()?)))
                    .ok_or_else(|| format!("weir-position is not <offset>/<count>: {text}"))?,
            ),
        };
        Ok(ForwardHeaders {
            position,
            sender,
            watermark,
            idle: find(IDLE).is_some(),
            event_time: number(EVENT_TIME).unwrap_or(i64::MIN),
            key,
            upsert: find(UPSERT).is_some(),
            source,
        })
    }
}

impl BatchCounts {
    pub fn add(&mut self, other: &BatchCounts) {
        self.records_in += other.records_in;
        self.right_records_in += other.right_records_in;
        self.records_out += other.records_out;
        self.records_filtered += other.records_filtered;
        self.duplicates_dropped += other.duplicates_dropped;
        for index in 0..4 {
            self.dead_lettered[index] += other.dead_lettered[index];
            self.skipped[index] += other.skipped[index];
        }
    }
}

// The engine lives in the loop's session, which the rebalance callbacks reach.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Engine>();
};

//! What goes into the engine and what comes out: an input record, the outputs (sink, DLQ,
//! repartition records), the stage a failure happened at, and what a batch did.

use crate::codec::json;
use crate::config::{ErrorAction, ErrorPolicy};
use crate::operators::Provenance;

/// Where an error happened; the value of the `weir-error-stage` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorStage {
    Decode,
    Late,
    Process,
    Produce,
}

impl ErrorStage {
    pub const ALL: [ErrorStage; 4] = [ErrorStage::Decode, ErrorStage::Late, ErrorStage::Process, ErrorStage::Produce];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorStage::Decode => "decode",
            ErrorStage::Late => "late",
            ErrorStage::Process => "process",
            ErrorStage::Produce => "produce",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }

    pub fn action(self, policy: &ErrorPolicy) -> ErrorAction {
        match self {
            ErrorStage::Decode => policy.decode,
            ErrorStage::Late => policy.late,
            ErrorStage::Process => policy.process,
            ErrorStage::Produce => policy.produce,
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
    /// The sink of the output with this index.
    Sink(usize),
    Dlq,
    /// The repartition topic in front of this stage.
    Repartition(usize),
}

/// A record to produce, owned (but for a value that is the input's, see [`Payload::Input`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub destination: Destination,
    /// Set for repartition topics (routed by a hash of the step's key); else by the key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub value: Payload,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// An output record's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// No value: a tombstone (or a repartition record carrying a watermark alone).
    None,
    Own(Vec<u8>),
    /// The value of the input record being processed, unchanged (a record written as read):
    /// the loop hands the consumer's bytes to the producer, which copies them anyway, rather
    /// than copying them into the output first.
    Input,
}

impl From<Option<Vec<u8>>> for Payload {
    fn from(value: Option<Vec<u8>>) -> Payload {
        value.map_or(Payload::None, Payload::Own)
    }
}

impl Payload {
    /// The value's bytes, where `input` is the value of the input being processed. Err: the
    /// value is the input's and no input value is given (a bug of the caller).
    pub fn bytes<'a>(&'a self, input: Option<&'a [u8]>) -> Result<Option<&'a [u8]>, InputValueMissing> {
        match self {
            Payload::None => Ok(None),
            Payload::Own(bytes) => Ok(Some(bytes)),
            Payload::Input => input.map(Some).ok_or(InputValueMissing),
        }
    }

    /// The bytes of a value that is not the input's (None for a tombstone or the input's).
    pub fn own(&self) -> Option<&[u8]> {
        match self {
            Payload::Own(bytes) => Some(bytes),
            Payload::None | Payload::Input => None,
        }
    }
}

/// An output whose value is the input's was sent without the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an output written as read was sent without its input record (a bug: please report it)")]
pub struct InputValueMissing;

impl Output {
    /// Makes a value that is `input`'s the output's own copy, for outputs kept after the
    /// input is gone (`weir test`, tests).
    pub(super) fn own_value(&mut self, input: &InputRecord<'_>) {
        if self.value == Payload::Input {
            // Only an input with a value is written as read.
            debug_assert!(input.value.is_some(), "{InputValueMissing}");
            self.value = input.value.map(<[u8]>::to_vec).into();
        }
    }

    /// The DLQ record for `input`: its original key, value and headers, plus the provenance
    /// headers of PIPELINE.md.
    pub fn dlq_record(input: &InputRecord<'_>, stage: ErrorStage, error: &str) -> Output {
        let provenance = &input.provenance;
        let mut headers = provenance.owned_headers();
        error_headers(&mut headers, stage, error, Some(provenance));
        Output {
            destination: Destination::Dlq,
            partition: None,
            key: input.key.map(<[u8]>::to_vec),
            value: input.value.map(<[u8]>::to_vec).into(),
            headers,
        }
    }

    /// The DLQ record for a result that cannot become a sink record (its format cannot encode
    /// it, a header expression failed): the result as JSON, with the provenance headers of the
    /// input it came from, when it came from one.
    pub(super) fn unencodable(
        key: Option<Vec<u8>>,
        fields: &serde_json::Map<String, serde_json::Value>,
        stage: ErrorStage,
        error: &str,
        provenance: Option<&Provenance<'_>>,
    ) -> Output {
        // The input's own headers first, as for an input sent to the DLQ as it was.
        let mut headers = provenance.map(Provenance::owned_headers).unwrap_or_default();
        error_headers(&mut headers, stage, error, provenance);
        Output { destination: Destination::Dlq, partition: None, key, value: Payload::Own(json::encode(fields)), headers }
    }
}

/// The DLQ headers of PIPELINE.md: the stage, the error, and where the input was read.
fn error_headers(headers: &mut Vec<(String, Vec<u8>)>, stage: ErrorStage, error: &str, provenance: Option<&Provenance<'_>>) {
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
    /// How many records each output wrote (by output index).
    pub records_out_by_output: Vec<u64>,
    pub records_filtered: u64,
    /// Records a dedup step dropped as duplicates.
    pub duplicates_dropped: u64,
    pub dlq_records: [u64; 4],
    pub skipped: [u64; 4],
    /// The earliest Kafka timestamp (epoch ms) of the batch's input records (of a
    /// forwarded record: its source record's), for the end-to-end latency.
    pub oldest_input: Option<i64>,
}

impl BatchCounts {
    pub fn dlq_records(&self, stage: ErrorStage) -> u64 {
        self.dlq_records[stage.index()]
    }

    pub fn skipped(&self, stage: ErrorStage) -> u64 {
        self.skipped[stage.index()]
    }

    /// Notes an input record's Kafka timestamp.
    pub fn input_at(&mut self, timestamp: Option<i64>) {
        if let Some(timestamp) = timestamp {
            self.oldest_input = Some(self.oldest_input.map_or(timestamp, |oldest| oldest.min(timestamp)));
        }
    }

    /// Back to zero, keeping the per-output list's room.
    pub fn clear(&mut self) {
        let mut by_output = std::mem::take(&mut self.records_out_by_output);
        by_output.fill(0);
        *self = BatchCounts { records_out_by_output: by_output, ..BatchCounts::default() };
    }

    /// The records written, over every output.
    pub fn records_out(&self) -> u64 {
        self.records_out_by_output.iter().sum()
    }

    /// Counts a record written by output `output` (`by` -1: one taken back).
    pub(super) fn count_out(&mut self, output: usize, by: i64) {
        if self.records_out_by_output.len() <= output {
            self.records_out_by_output.resize(output + 1, 0);
        }
        let count = &mut self.records_out_by_output[output];
        *count = count.saturating_add_signed(by);
    }
}

/// A record failed at a stage whose policy is `fail`: the batch must not commit.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{stage} error at {topic}[{partition}]@{offset} with on_error.{stage}: fail: {error}", stage = stage.as_str())]
pub struct RecordFailure {
    pub stage: ErrorStage,
    pub error: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl BatchCounts {
    pub fn add(&mut self, other: &BatchCounts) {
        self.records_in += other.records_in;
        self.right_records_in += other.right_records_in;
        if self.records_out_by_output.len() < other.records_out_by_output.len() {
            self.records_out_by_output.resize(other.records_out_by_output.len(), 0);
        }
        for (mine, theirs) in self.records_out_by_output.iter_mut().zip(&other.records_out_by_output) {
            *mine += theirs;
        }
        self.records_filtered += other.records_filtered;
        self.duplicates_dropped += other.duplicates_dropped;
        self.input_at(other.oldest_input);
        for index in 0..4 {
            self.dlq_records[index] += other.dlq_records[index];
            self.skipped[index] += other.skipped[index];
        }
    }
}

//! The steps of a pipeline. Operators are synchronous and deterministic: they see one record
//! at a time and read time only from event times and the watermark, never from the wall
//! clock. The set is closed, so an enum dispatches to one struct per operator file.
//!
//! Lifecycle, driven per task by [`crate::engine`]: `process` each record (judged against the
//! watermark as it was just before it), then `advance` when the watermark moves (windows close,
//! dedup state ends), and `commit` at the end of each batch (update-mode windows emit).

pub mod aggregate;
pub mod committed;
pub mod dedup;
pub mod event_time;
pub mod explode;
pub mod expression;
pub mod filter;
pub mod join;
pub mod lookup;
pub mod native;
pub mod record_key;
pub mod reshape;
mod state_entry;
pub mod window;

pub use record_key::RecordKey;
pub use state_entry::StateEntryLimit;
pub(crate) use state_entry::{json_len, quoted_len};

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::config::{ConfigErrors, Schema, Shape, Source, StepEntry};
use aggregate::config::RunningAggregate;
use aggregate::AggregateOperator;
use committed::{CommittedState, TimerChange};
use explode::config::Explode;
use explode::ExplodeOperator;
use reshape::config::{Assignments, Drop};
use reshape::ReshapeOperator;
use dedup::config::Dedup;
use dedup::DedupOperator;
use event_time::field_at;
use filter::config::Filter;
use filter::FilterOperator;
use join::config::Join;
use join::{JoinOperator, JoinSpec, Side};
use lookup::config::Lookup;
use lookup::{LookupOperator, Tables};
use window::config::Window;
use window::WindowOperator;

/// Where a record came from, for expressions (`_topic`, ...) and for DLQ provenance.
#[derive(Debug, Clone, Copy)]
pub struct Provenance<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub headers: InputHeaders<'a>,
    /// The input record's Kafka key, kept as the output key when no step sets one.
    pub key: Option<&'a [u8]>,
}

/// A header list not read yet: a Kafka message's, read only when something asks (most
/// records are never asked, and librdkafka allocates to read a message's headers, even none).
pub trait HeaderSource {
    /// Borrowed where the source keeps what it read (the poll loop reads a message's once).
    fn read_headers(&self) -> Cow<'_, HeaderList<'_>>;
}

/// Headers as (name, value) pairs, in order, as Kafka keeps them.
pub type HeaderList<'a> = [(&'a str, Option<&'a [u8]>)];

/// The input record's headers.
#[derive(Clone, Copy)]
pub enum InputHeaders<'a> {
    Read(&'a HeaderList<'a>),
    Unread(&'a dyn HeaderSource),
}

impl<'a> InputHeaders<'a> {
    pub fn list(&self) -> Cow<'a, HeaderList<'a>> {
        match *self {
            InputHeaders::Read(headers) => Cow::Borrowed(headers),
            InputHeaders::Unread(source) => source.read_headers(),
        }
    }
}

impl std::fmt::Debug for InputHeaders<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_list().entries(self.list().iter()).finish()
    }
}

impl Provenance<'_> {
    /// Whether both name the same input record (topic, partition, offset).
    pub fn same_record(&self, other: &Provenance<'_>) -> bool {
        self.offset == other.offset && self.partition == other.partition && self.topic == other.topic
    }

    /// The input record's headers, owned, as an output carries them (a header without a
    /// value has nothing to carry and is left out).
    pub fn owned_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.headers.list().iter().filter_map(|(name, value)| Some((name.to_string(), (*value)?.to_vec()))).collect()
    }
}

/// A decoded record on its way through the steps.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub fields: Map<String, Value>,
    /// Epoch milliseconds; `i64::MIN` for a pipeline without event time.
    pub event_time: i64,
    /// The input record; None for records a step derived (window results).
    pub provenance: Option<Provenance<'a>>,
    /// The key a keyed step gives the record (dedup key, window group): the default sink key.
    /// Boxed, as `id` is: most records have neither, and records are moved several times on
    /// their way through the steps.
    pub key: Option<Box<RecordKey>>,
    /// The key is part of an upsert stream and overrides `sink.key` (update-mode windows).
    pub upsert: bool,
    /// Upsert mode: the output's id where neither the key nor one input names it (a join's
    /// result: where both sides were read).
    pub id: Option<Box<Map<String, Value>>>,
}

/// What a step hands downstream.
#[derive(Debug, Clone)]
pub enum Emitted<'a> {
    Record(Record<'a>),
    /// Deletes an earlier upsert under this key (a merged-away session window).
    Tombstone(Map<String, Value>),
    /// Bound for a later stage through its repartition topic (production only; steps never
    /// emit this, the engine routes it). Boxed: what steps emit is moved several times per
    /// record, at the size of its largest kind.
    Forward(Box<Forward<'a>>),
}

/// A record, or a watermark alone, on its way to the task of a later stage through a
/// repartition topic. The sender (the task it leaves) vouches that its own later records
/// are at or after `watermark`.
#[derive(Debug, Clone)]
pub struct Forward<'a> {
    pub stage: usize,
    pub partition: u32,
    pub sender: String,
    pub watermark: i64,
    /// The sender's input has been idle for `idle_timeout`: leave it out of the minimum
    /// until it speaks again.
    pub idle: bool,
    pub record: Option<Record<'a>>,
    /// Upsert mode, from a stage-0 task: (input offset, forwards made for that input so
    /// far), increasing with every forward of the sender; a receiver drops what it has
    /// taken already.
    pub position: Option<(i64, u32)>,
}

/// What became of a record given to a step.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// Kept (and possibly emitted now or later).
    Passed,
    /// Dropped by a filter.
    Dropped,
    /// Dropped by a dedup: its key was seen within `within`.
    Duplicate,
    /// Behind the watermark: handled by `on_error.late`.
    Late(String),
}

/// One changed entry of a step's state, for its changelog: the value, or None once gone.
#[derive(Debug, Clone, PartialEq)]
pub struct StateChange {
    pub key: String,
    pub value: Option<Value>,
}

/// A record-level failure inside a step (bad data, not a bug): goes where `on_error.process`
/// says.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ProcessError(pub String);

/// A step that cannot be built from its config: an expression that does not compile.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(pub String);

/// State read back from a changelog or the local store that does not fit the step reading it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct CorruptState(pub String);

/// The named fields of a record, as a JSON object (missing ones as null).
pub fn key_of(fields: &Map<String, Value>, names: &[String]) -> Map<String, Value> {
    names
        .iter()
        .map(|name| (name.clone(), field_at(fields, name).cloned().unwrap_or(Value::Null)))
        .collect()
}

/// A key's JSON text (as state keys hold it), written from the map itself.
pub fn key_text(key: &Map<String, Value>) -> String {
    // Serializing a map of JSON values cannot fail.
    serde_json::to_string(key).unwrap_or_default()
}

/// A record with these fields at this event time, as a step's unit tests give one.
#[cfg(test)]
pub(crate) fn test_record(fields: Value, event_time: i64) -> Record<'static> {
    let fields = fields.as_object().cloned().unwrap_or_default();
    Record { fields, event_time, provenance: None, key: None, upsert: false, id: None }
}

/// A step of the pipeline, as configured: the closed set of kinds, each read and checked by
/// its own config (`<kind>/config.rs`) and run by its operator (`<kind>/mod.rs`).
#[derive(Debug, Clone)]
pub enum Step {
    Filter(Filter),
    Set(Assignments),
    Select(Assignments),
    Drop(Drop),
    Explode(Explode),
    Dedup(Dedup),
    Window(Window),
    Aggregate(RunningAggregate),
    Lookup(Lookup),
    /// The `join` of a two-source pipeline: always step 0, before the file's steps.
    Join(Box<Join>),
}

impl Step {
    /// The kinds a pipeline file's `steps` may hold, each with the shape of its body.
    pub const BODIES: &[(&str, Shape)] = &[
        ("filter", Shape::String),
        ("set", Shape::MapOf(&Shape::Scalar)),
        ("drop", Shape::Strings),
        ("select", Shape::MapOf(&Shape::Scalar)),
        ("explode", Shape::Section(&explode::config::SECTION)),
        ("dedup", Shape::Section(&dedup::config::SECTION)),
        ("window", Shape::Section(&window::config::SECTION)),
        ("aggregate", Shape::Section(&aggregate::config::SECTION)),
        ("lookup", Shape::Section(&lookup::config::SECTION)),
    ];

    /// Reads one entry of `steps` by its kind; `input` is the schema of the records it sees
    /// (None: not known, after a step with problems); `tables` are the table sources (None:
    /// not known, the sources had problems).
    pub fn parse(entry: &StepEntry, input: Option<&Schema>, tables: Option<&[Source]>, problems: &mut ConfigErrors) -> Option<Step> {
        let (body, location) = (&entry.body, entry.location.as_str());
        match entry.kind.as_str() {
            "filter" => Filter::parse(body, input, location, problems).map(Step::Filter),
            "set" => Assignments::parse("set", body, input, location, problems).map(Step::Set),
            "select" => Assignments::parse("select", body, input, location, problems).map(Step::Select),
            "drop" => Drop::parse(body, input, location, problems).map(Step::Drop),
            "explode" => Explode::parse(body, input, location, problems).map(Step::Explode),
            "dedup" => Dedup::parse(body, input, location, problems).map(Step::Dedup),
            "window" => Window::parse(body, input, location, problems).map(Step::Window),
            "aggregate" => RunningAggregate::parse(body, input, location, problems).map(Step::Aggregate),
            "lookup" => Lookup::parse(body, input, tables, location, problems).map(Step::Lookup),
            other => {
                let kinds: Vec<&str> = Self::BODIES.iter().map(|(kind, _)| *kind).collect();
                problems.push(location, crate::config::unknown("step kind", other, &kinds));
                None
            }
        }
    }

    /// Whether the step reads its committed state through the local store (see
    /// [`committed`]) rather than holding it in memory.
    pub fn reads_through_store(&self) -> bool {
        // Every stateful step does.
        self.is_stateful()
    }

    /// The timer a committed state entry of this step needs in the store (for a step that
    /// reads through it), from the entry's state key and its value as the changelog holds it
    /// (JSON text): a dedup key's expiry, an aggregate group's end (with a ttl), a window's
    /// close, a join record's eviction. None for other steps, or an entry that is not the
    /// step's state.
    pub fn timer_of(&self, key: &str, value: &[u8]) -> Option<i64> {
        match self {
            Step::Dedup(dedup) => {
                let time = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
                Some(DedupOperator::expiry(crate::config::millis(dedup.within), time))
            }
            Step::Aggregate(aggregate) => AggregateOperator::timer_of(aggregate, value),
            Step::Window(window) => WindowOperator::timer_of(window, value),
            Step::Join(join) => JoinOperator::timer_of(join, key, value),
            _ => None,
        }
    }

    pub fn is_stateful(&self) -> bool {
        matches!(self, Step::Dedup(_) | Step::Window(_) | Step::Aggregate(_) | Step::Join(_))
    }

    /// Whether a step as written reads event times and the watermark: dedup and window
    /// steps, and an aggregate with a ttl (without one, it keeps every key for good).
    pub fn entry_needs_event_time(entry: &StepEntry) -> bool {
        match entry.kind.as_str() {
            "dedup" | "window" => true,
            "aggregate" => entry.body.get("ttl").is_some(),
            _ => false,
        }
    }

    /// Whether steps of this kind hand on the records' fields as they received them.
    pub fn kind_keeps_schema(kind: &str) -> bool {
        matches!(kind, "filter" | "dedup")
    }

    /// The fields of the records it hands on, given those it receives (checked when the step
    /// was read, so a problem cannot come back here; should one, the input goes on).
    pub fn output_schema(&self, input: Schema) -> Schema {
        match self {
            Step::Filter(_) | Step::Dedup(_) => input,
            Step::Set(assignments) => assignments.output_schema(false, &input).unwrap_or(input),
            Step::Select(assignments) => assignments.output_schema(true, &input).unwrap_or(input),
            Step::Drop(drop) => drop.output_schema(&input).unwrap_or(input),
            Step::Explode(explode) => explode.output_schema(&input).unwrap_or(input),
            Step::Join(join) => join.output.record_schema(),
            Step::Window(window) => window.output_schema(&input),
            Step::Aggregate(aggregate) => aggregate.output_schema(&input),
            Step::Lookup(lookup) => lookup.output_schema(&input),
        }
    }

    /// Whether the records it hands on may hold another value in `field` than those it
    /// received (so they are no longer partitioned by it).
    pub fn rewrites(&self, field: &str) -> bool {
        match self {
            Step::Set(assignments) => assignments.writes(field),
            Step::Select(assignments) => !assignments.keeps(field),
            Step::Drop(drop) => drop.removes(field),
            Step::Explode(explode) => field == explode.field || field == explode.name,
            Step::Lookup(lookup) => field == lookup.name || field.starts_with(&format!("{}.", lookup.name)),
            Step::Filter(_) | Step::Dedup(_) | Step::Window(_) | Step::Aggregate(_) | Step::Join(_) => false,
        }
    }
}

pub enum Operator {
    Filter(FilterOperator),
    /// `set`, `select` and `drop`.
    Reshape(ReshapeOperator),
    Explode(ExplodeOperator),
    Dedup(DedupOperator),
    Window(WindowOperator),
    Aggregate(AggregateOperator),
    Lookup(LookupOperator),
    /// With the right source, which tells a record's side by its topic.
    Join(JoinOperator, Source),
}

impl Operator {
    /// `input` is the schema of the records the step sees; `limit` bounds the state entries
    /// a stateful step keeps (see [`StateEntryLimit`]); `tables` holds the rows lookups read.
    pub fn build(step: &Step, input: &Schema, limit: StateEntryLimit, tables: &mut Tables) -> Result<Operator, BuildError> {
        match step {
            Step::Filter(filter) => FilterOperator::new(&filter.expression, input).map(Operator::Filter),
            Step::Set(assignments) => ReshapeOperator::assign(assignments, false, input).map(Operator::Reshape),
            Step::Select(assignments) => ReshapeOperator::assign(assignments, true, input).map(Operator::Reshape),
            Step::Drop(drop) => Ok(Operator::Reshape(ReshapeOperator::drop(drop))),
            Step::Explode(explode) => Ok(Operator::Explode(ExplodeOperator::new(explode))),
            Step::Dedup(dedup) => Ok(Operator::Dedup(DedupOperator::new(dedup, limit))),
            Step::Window(window) => Ok(Operator::Window(WindowOperator::new(window, Some(input), limit))),
            Step::Aggregate(aggregate) => Ok(Operator::Aggregate(AggregateOperator::new(aggregate, Some(input), limit))),
            Step::Lookup(lookup) => Ok(Operator::Lookup(LookupOperator::new(lookup, tables))),
            Step::Join(join) => Ok(Operator::Join(JoinOperator::new(JoinSpec::of(join), limit), join.right.clone())),
        }
    }

    pub fn process<'a>(
        &mut self,
        record: Record<'a>,
        watermark: i64,
        out: &mut Vec<Emitted<'a>>,
    ) -> Result<StepOutcome, ProcessError> {
        #[cfg(feature = "failpoints")]
        panic_at_failpoint(self.kind(), &record);
        match self {
            Operator::Filter(filter) => filter.process(record, out),
            Operator::Reshape(reshape) => reshape.process(record, out),
            Operator::Explode(explode) => explode.process(record, out),
            Operator::Dedup(dedup) => dedup.process(record, watermark, out),
            Operator::Window(window) => window.process(record, watermark, out),
            Operator::Aggregate(aggregate) => aggregate.process(record, watermark, out),
            Operator::Lookup(lookup) => lookup.process(record, out),
            Operator::Join(join, right) => {
                let side = match record.provenance.is_some_and(|provenance| right.reads(provenance.topic)) {
                    true => Side::Right,
                    false => Side::Left,
                };
                join.process(record, side, watermark, out)
            }
        }
    }

    pub fn advance<'a>(&mut self, watermark: i64, out: &mut Vec<Emitted<'a>>) {
        match self {
            Operator::Filter(_) | Operator::Reshape(_) | Operator::Explode(_) | Operator::Lookup(_) => {}
            Operator::Dedup(dedup) => dedup.advance(watermark),
            Operator::Window(window) => window.advance(watermark, out),
            Operator::Aggregate(aggregate) => aggregate.advance(watermark, out),
            Operator::Join(join, _) => join.advance(watermark, out),
        }
    }

    pub fn commit<'a>(&mut self, out: &mut Vec<Emitted<'a>>) {
        match self {
            Operator::Window(window) => window.commit(out),
            Operator::Aggregate(aggregate) => aggregate.commit(out),
            _ => {}
        }
    }

    /// State entries changed since the last call (stateless steps have none).
    pub fn take_changes(&mut self) -> Vec<StateChange> {
        match self {
            Operator::Filter(_) | Operator::Reshape(_) | Operator::Explode(_) | Operator::Lookup(_) => Vec::new(),
            Operator::Dedup(dedup) => dedup.take_changes(),
            Operator::Window(window) => window.take_changes(),
            Operator::Aggregate(aggregate) => aggregate.take_changes(),
            Operator::Join(join, _) => join.take_changes(),
        }
    }

    /// Reads committed state through `view` from now on, if the step can (see
    /// [`Step::reads_through_store`]); call before the first record.
    pub fn read_through(&mut self, view: Box<dyn CommittedState>) {
        match self {
            Operator::Dedup(dedup) => dedup.read_through(view),
            Operator::Aggregate(aggregate) => aggregate.read_through(view),
            Operator::Window(window) => window.read_through(view),
            Operator::Join(join, _) => join.read_through(view),
            _ => {}
        }
    }

    /// The store's timer changes since the last `take_changes` (steps reading through it).
    pub fn take_timers(&mut self) -> Vec<TimerChange> {
        match self {
            Operator::Dedup(dedup) => dedup.take_timers(),
            Operator::Aggregate(aggregate) => aggregate.take_timers(),
            Operator::Window(window) => window.take_timers(),
            Operator::Join(join, _) => join.take_timers(),
            _ => Vec::new(),
        }
    }

    /// Keys (or windows) added less those ended since the last call, for the store's count
    /// of a step reading through it (see [`Step::reads_through_store`]).
    pub fn take_key_delta(&mut self) -> i64 {
        match self {
            Operator::Dedup(dedup) => dedup.take_key_delta(),
            Operator::Aggregate(aggregate) => aggregate.take_key_delta(),
            Operator::Window(window) => window.take_key_delta(),
            Operator::Join(join, _) => join.take_key_delta(),
            _ => 0,
        }
    }

    /// Puts back one state entry read from the changelog (None deletes it).
    pub fn restore(&mut self, key: &str, value: Option<&Value>) -> Result<(), CorruptState> {
        match self {
            Operator::Filter(_) | Operator::Reshape(_) | Operator::Explode(_) | Operator::Lookup(_) => Ok(()),
            Operator::Dedup(dedup) => dedup.restore(key, value),
            Operator::Window(window) => window.restore(key, value),
            Operator::Aggregate(aggregate) => aggregate.restore(key, value),
            Operator::Join(join, _) => join.restore(key, value),
        }
    }

    /// Keys (dedup) or windows held in state.
    pub fn state_keys(&self) -> usize {
        match self {
            Operator::Filter(_) | Operator::Reshape(_) | Operator::Explode(_) | Operator::Lookup(_) => 0,
            Operator::Dedup(dedup) => dedup.state_keys(),
            Operator::Window(window) => window.state_keys(),
            Operator::Aggregate(aggregate) => aggregate.state_keys(),
            Operator::Join(join, _) => join.state_keys(),
        }
    }

    /// The step's kind, as in the pipeline file.
    pub fn kind(&self) -> &'static str {
        match self {
            Operator::Filter(_) => "filter",
            Operator::Reshape(reshape) => reshape.kind(),
            Operator::Explode(_) => "explode",
            Operator::Dedup(_) => "dedup",
            Operator::Window(_) => "window",
            Operator::Aggregate(_) => "aggregate",
            Operator::Lookup(_) => "lookup",
            Operator::Join(..) => "join",
        }
    }

    /// A short description for `weir validate`'s plan.
    pub fn describe(&self) -> String {
        match self {
            Operator::Filter(filter) => format!("filter {}", filter.expression()),
            Operator::Reshape(reshape) => reshape.describe(),
            Operator::Explode(explode) => explode.describe(),
            Operator::Dedup(dedup) => dedup.describe(),
            Operator::Window(window) => window.describe(),
            Operator::Aggregate(aggregate) => aggregate.describe(),
            Operator::Lookup(lookup) => lookup.describe(),
            Operator::Join(join, _) => join.describe(),
        }
    }
}

/// Test builds only (feature `failpoints`): `FAILPOINTS='window=return(user=boom)'` makes the
/// window step panic on a record whose field `user` is `boom`, so that tests can prove a
/// panic in a step loses and duplicates nothing.
#[cfg(feature = "failpoints")]
fn panic_at_failpoint(kind: &str, record: &Record<'_>) {
    let Some(Some(condition)) = fail::eval(kind, |argument| argument) else {
        return;
    };
    let Some((path, expected)) = condition.split_once('=') else {
        return;
    };
    if field_at(&record.fields, path).and_then(Value::as_str) == Some(expected) {
        panic!("failpoint '{kind}' fired on {path}={expected}");
    }
}

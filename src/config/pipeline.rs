//! The pipeline file: sources, steps, sink and error policy (see PIPELINE.md).
//!
//! The YAML is parsed section by section, so a mistake in one source or step does not hide
//! the mistakes in the others; then the parts are checked against each other (fields named
//! by steps must be in the schema, expressions must compile).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value as Yaml};

use super::ConfigErrors;
use crate::operators::filter::FilterExpression;

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub source: Source,
    pub steps: Vec<Step>,
    pub sink: Sink,
    pub on_error: ErrorPolicy,
    pub dlq_topic: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub name: String,
    pub topics: SourceTopics,
    pub encoding: Encoding,
    pub schema: Option<Schema>,
    pub event_time: Option<EventTime>,
    pub watermark: Option<Watermark>,
    pub starting_offsets: StartingOffsets,
    pub on_data_loss: DataLossPolicy,
    pub partitioned_by: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceTopics {
    List(Vec<String>),
    /// A regular expression matched against whole topic names.
    Pattern(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Json,
    Avro,
    String,
}

/// The explicit field types of a JSON source; nested objects are schemas themselves.
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    pub fields: Vec<(String, FieldType)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FieldType {
    String,
    Long,
    Double,
    Boolean,
    /// Epoch milliseconds.
    Timestamp,
    Object(Schema),
}

impl Schema {
    /// The type of a dotted path; a path the schema lacks (checked elsewhere) as a string.
    fn type_or_string(&self, path: &str) -> FieldType {
        self.field_type(path).cloned().unwrap_or(FieldType::String)
    }

    /// The schema of `fields` (dotted paths) taken from this one, in that order.
    fn select(&self, fields: &[String]) -> Schema {
        Schema { fields: fields.iter().map(|field| (field.clone(), self.type_or_string(field))).collect() }
    }

    /// The dotted paths of fields whose names Avro does not allow.
    pub fn invalid_avro_names(&self) -> Vec<String> {
        let mut invalid = Vec::new();
        for (name, field_type) in &self.fields {
            let mut chars = name.chars();
            let valid = chars.next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                invalid.push(name.clone());
            }
            if let FieldType::Object(inner) = field_type {
                invalid.extend(inner.invalid_avro_names().into_iter().map(|path| format!("{name}.{path}")));
            }
        }
        invalid
    }

    /// The type of a dotted path such as `user.id`, if the schema has it.
    pub fn field_type(&self, path: &str) -> Option<&FieldType> {
        let mut schema = self;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let (_, field_type) = schema.fields.iter().find(|(name, _)| name == part)?;
            if parts.peek().is_none() {
                return Some(field_type);
            }
            match field_type {
                FieldType::Object(inner) => schema = inner,
                _ => return None,
            }
        }
        None
    }
}

/// Where a source's records carry their event time, and how far ahead of the wall clock
/// one may be.
#[derive(Debug, Clone, PartialEq)]
pub struct EventTime {
    pub origin: TimeOrigin,
    /// A record further ahead of the wall clock than this is a decode error and does not
    /// move the watermark (PIPELINE.md "Limits").
    pub max_ahead: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TimeOrigin {
    Field { path: String, unit: EventTimeUnit },
    KafkaTimestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EventTimeUnit {
    #[default]
    Millis,
    Seconds,
    Rfc3339,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watermark {
    #[serde(with = "humantime_serde")]
    pub max_out_of_orderness: Duration,
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartingOffsets {
    #[default]
    Earliest,
    Latest,
    /// The first offset whose record timestamp is at or after this instant (epoch ms).
    Timestamp(i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataLossPolicy {
    #[default]
    Fail,
    Earliest,
}

#[derive(Debug, Clone)]
pub enum Step {
    Filter(Filter),
    Dedup(Dedup),
    Window(Window),
    /// The `join` of a two-source pipeline: always step 0, before the file's steps.
    Join(Box<Join>),
}

impl Step {
    pub fn is_stateful(&self) -> bool {
        !matches!(self, Step::Filter(_))
    }
}

/// A stream-stream interval join (PIPELINE.md, "join"): `pipeline.source` is its left
/// input, `right` its right one. A left record l and a right record r with equal `on` fields
/// match when `l.t + lower <= r.t <= l.t + upper`.
#[derive(Debug, Clone)]
pub struct Join {
    pub left: String,
    pub right: Source,
    pub kind: JoinKind,
    pub on: Vec<String>,
    /// Milliseconds; either may be negative.
    pub lower: i64,
    pub upper: i64,
    /// `mode: idempotent_upsert`: results' ids name where both sides were read, so the
    /// buffered records keep it.
    pub keep_sources: bool,
    /// What the steps after the join see: `{<left>: {...}, <right>: {...}}`.
    pub output: Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JoinKind {
    #[default]
    Inner,
    Left,
    Right,
    Full,
}

impl Pipeline {
    /// The join, in a two-source pipeline.
    pub fn join(&self) -> Option<&Join> {
        match self.steps.first() {
            Some(Step::Join(join)) => Some(join.as_ref()),
            _ => None,
        }
    }

    /// The records a step (by pipeline index) sees: the source's, or the joined ones.
    pub fn step_source(&self, index: usize) -> &Source {
        match self.join() {
            Some(join) if index > 0 => &join.output,
            _ => &self.source,
        }
    }

    /// Every source: the one, or a join's left and right.
    pub fn sources(&self) -> Vec<&Source> {
        std::iter::once(&self.source).chain(self.join().map(|join| &join.right)).collect()
    }

    /// Every source topic, of both sides of a join; None when a source has a pattern.
    pub fn input_topics(&self) -> Option<Vec<String>> {
        let mut topics = Vec::new();
        for source in self.sources() {
            match &source.topics {
                SourceTopics::List(names) => topics.extend(names.iter().cloned()),
                SourceTopics::Pattern(_) => return None,
            }
        }
        Some(topics)
    }

    /// The same pipeline reading and writing JSON where it has Avro (`weir test`, whose
    /// records are JSON lines).
    pub fn with_json_codecs(&self) -> Pipeline {
        let mut pipeline = self.clone();
        let to_json = |encoding: &mut Encoding| {
            if *encoding == Encoding::Avro {
                *encoding = Encoding::Json;
            }
        };
        to_json(&mut pipeline.source.encoding);
        to_json(&mut pipeline.sink.encoding);
        to_json(&mut pipeline.sink.key_encoding);
        if let Some(Step::Join(join)) = pipeline.steps.first_mut() {
            to_json(&mut join.right.encoding);
        }
        pipeline
    }

    /// The first part of the pipeline that reads or writes Avro, in words; None without Avro.
    pub fn avro_user(&self) -> Option<String> {
        self.sources()
            .into_iter()
            .find(|source| source.encoding == Encoding::Avro)
            .map(|source| format!("source '{}'", source.name))
            .or_else(|| (self.sink.encoding == Encoding::Avro).then(|| "the sink".to_string()))
            .or_else(|| (self.sink.key_encoding == Encoding::Avro).then(|| "the sink's key".to_string()))
    }

    /// The fields of the records the sink receives, with their types: the last step's
    /// output (a window's group_by fields, window bounds and aggregates), else its input.
    pub fn output_schema(&self) -> Schema {
        self.schema_seen_by(self.steps.len())
    }

    /// The fields of the records step `index` receives (`steps.len()`: the sink's).
    fn schema_seen_by(&self, index: usize) -> Schema {
        let mut schema = self.source.record_schema();
        for step in &self.steps[..index.min(self.steps.len())] {
            match step {
                Step::Filter(_) | Step::Dedup(_) => {}
                Step::Join(join) => schema = join.output.record_schema(),
                Step::Window(window) => {
                    let input = schema;
                    let type_of = |field: &str| input.type_or_string(field);
                    let mut fields = input.select(&window.group_by).fields;
                    fields.push(("window_start".into(), FieldType::Timestamp));
                    fields.push(("window_end".into(), FieldType::Timestamp));
                    for (name, aggregate) in &window.aggregates {
                        let field_type = match aggregate {
                            Aggregate::Count | Aggregate::CountDistinct(_) => FieldType::Long,
                            Aggregate::Avg(_) => FieldType::Double,
                            Aggregate::Sum(field) => match type_of(field) {
                                FieldType::Long | FieldType::Timestamp => FieldType::Long,
                                _ => FieldType::Double,
                            },
                            Aggregate::Min(field) | Aggregate::Max(field) | Aggregate::First(field) | Aggregate::Last(field) => {
                                type_of(field)
                            }
                        };
                        fields.push((name.clone(), field_type));
                    }
                    schema = Schema { fields };
                }
            }
        }
        schema
    }

    /// The fields of the Kafka keys weir makes for the sink, with their types: `sink.key`, or
    /// the key of the last step that sets one (a dedup's or join's key, a window's group,
    /// plus `window_start` under `emit: update`). None: each input record's key is kept as
    /// it is (no keyed step and no `sink.key`).
    pub fn output_key_schema(&self) -> Option<Schema> {
        let mut key = None;
        // Whether the records are an update-mode window's: they keep their window's key,
        // whatever sink.key says (as the engine's emit does).
        let mut upsert = false;
        for (index, step) in self.steps.iter().enumerate() {
            let input = self.schema_seen_by(index);
            match step {
                Step::Filter(_) => {}
                Step::Dedup(dedup) => key = Some(input.select(&dedup.key)),
                Step::Join(join) => {
                    key = Some(self.source.record_schema().select(&join.on));
                    upsert = false;
                }
                Step::Window(window) => {
                    let mut schema = input.select(&window.group_by);
                    upsert = window.emit == EmitMode::Update;
                    if upsert {
                        schema.fields.push(("window_start".into(), FieldType::Timestamp));
                    }
                    key = Some(schema);
                }
            }
        }
        match upsert || self.sink.key.is_empty() {
            true => key,
            false => Some(self.output_schema().select(&self.sink.key)),
        }
    }

    /// The source that reads `topic` (by name, or the pattern's match).
    pub fn source_of_topic(&self, topic: &str) -> &Source {
        match self.join() {
            Some(join) if join.right.reads(topic) => &join.right,
            _ => &self.source,
        }
    }
}

impl Source {
    /// The fields its records have: the schema, or `{value: string}` for format string.
    pub fn record_schema(&self) -> Schema {
        match &self.schema {
            Some(schema) => schema.clone(),
            None => Schema { fields: vec![("value".into(), FieldType::String)] },
        }
    }

    /// Whether this source reads `topic`.
    pub fn reads(&self, topic: &str) -> bool {
        match &self.topics {
            SourceTopics::List(topics) => topics.iter().any(|name| name == topic),
            SourceTopics::Pattern(pattern) => {
                regex::Regex::new(&format!("^({pattern})$")).is_ok_and(|regex| regex.is_match(topic))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dedup {
    pub key: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub within: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub group_by: Vec<String>,
    pub kind: WindowKind,
    pub allowed_lateness: Duration,
    pub aggregates: Vec<(String, Aggregate)>,
    pub emit: EmitMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    Tumbling { size: Duration },
    Hopping { size: Duration, slide: Duration },
    Session { gap: Duration },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Aggregate {
    Count,
    Sum(String),
    Avg(String),
    Min(String),
    Max(String),
    First(String),
    Last(String),
    CountDistinct(String),
}

impl Aggregate {
    pub fn field(&self) -> Option<&str> {
        match self {
            Aggregate::Count => None,
            Aggregate::Sum(field)
            | Aggregate::Avg(field)
            | Aggregate::Min(field)
            | Aggregate::Max(field)
            | Aggregate::First(field)
            | Aggregate::Last(field)
            | Aggregate::CountDistinct(field) => Some(field),
        }
    }

    fn parse(text: &str) -> Result<Aggregate, String> {
        let expected = "count(), sum(f), avg(f), min(f), max(f), first(f), last(f) or count_distinct(f)";
        let text = text.trim();
        let Some((function, rest)) = text.split_once('(') else {
            return Err(format!("'{text}' is not an aggregate; use {expected}"));
        };
        let Some(argument) = rest.strip_suffix(')').map(str::trim) else {
            return Err(format!("'{text}' is missing its closing parenthesis"));
        };
        let field = || {
            if argument.is_empty() {
                Err(format!("{function}() needs a field, e.g. {function}(amount)"))
            } else {
                Ok(argument.to_string())
            }
        };
        match function.trim() {
            "count" if argument.is_empty() => Ok(Aggregate::Count),
            "count" => Err("count() takes no field; use count_distinct(field) to count values".into()),
            "sum" => field().map(Aggregate::Sum),
            "avg" => field().map(Aggregate::Avg),
            "min" => field().map(Aggregate::Min),
            "max" => field().map(Aggregate::Max),
            "first" => field().map(Aggregate::First),
            "last" => field().map(Aggregate::Last),
            "count_distinct" => field().map(Aggregate::CountDistinct),
            other => Err(format!("unknown aggregate '{other}'; use {expected}")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EmitMode {
    #[default]
    Final,
    Update,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    #[serde(default)]
    group_by: Vec<String>,
    #[serde(default, with = "humantime_serde")]
    tumbling: Option<Duration>,
    hopping: Option<RawHopping>,
    session: Option<RawSession>,
    #[serde(default, with = "humantime_serde")]
    allowed_lateness: Option<Duration>,
    aggregates: serde_yaml_ng::Mapping,
    #[serde(default)]
    emit: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHopping {
    #[serde(with = "humantime_serde")]
    size: Duration,
    #[serde(with = "humantime_serde")]
    slide: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
    #[serde(with = "humantime_serde")]
    gap: Duration,
}

#[derive(Debug, Clone)]
pub struct Filter {
    pub expression: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SinkMode {
    #[default]
    Transactional,
    IdempotentUpsert,
}

#[derive(Debug, Clone)]
pub struct Sink {
    pub topic: String,
    pub encoding: Encoding,
    /// Fields forming the Kafka key; empty keeps each input record's key.
    pub key: Vec<String>,
    /// How keys that weir makes (from fields) are written: json or avro.
    pub key_encoding: Encoding,
    pub mode: SinkMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ErrorAction {
    #[default]
    Dlq,
    Skip,
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorPolicy {
    pub decode: ErrorAction,
    pub late: ErrorAction,
    pub process: ErrorAction,
    pub produce: ErrorAction,
}

// ---- raw shapes, as written in YAML -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    topics: Option<Vec<String>>,
    pattern: Option<String>,
    format: Encoding,
    schema: Option<Mapping>,
    event_time: Option<RawEventTime>,
    watermark: Option<Watermark>,
    #[serde(default)]
    starting_offsets: Option<Yaml>,
    #[serde(default)]
    on_data_loss: DataLossPolicy,
    #[serde(default)]
    partitioned_by: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEventTime {
    field: Option<String>,
    #[serde(default)]
    unit: EventTimeUnit,
    #[serde(default)]
    kafka_timestamp: bool,
    #[serde(default, with = "humantime_serde")]
    max_ahead: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    topic: String,
    #[serde(default = "json_encoding")]
    format: Encoding,
    #[serde(default)]
    key: Vec<String>,
    #[serde(default = "json_encoding")]
    key_format: Encoding,
    #[serde(default)]
    mode: SinkMode,
}

fn json_encoding() -> Encoding {
    Encoding::Json
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDlq {
    topic: Option<String>,
}

const TOP_LEVEL_KEYS: &[&str] = &["name", "sources", "steps", "join", "sink", "on_error", "dlq"];

pub(super) fn load(path: &Path, problems: &mut ConfigErrors) -> Option<Pipeline> {
    let file = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            problems.push("--pipeline (env WEIR_PIPELINE)", format!("cannot read {file}: {error}"));
            return None;
        }
    };
    parse(&text, problems)
}

/// Parses and checks a pipeline document; every problem goes into `problems`.
pub fn parse(text: &str, problems: &mut ConfigErrors) -> Option<Pipeline> {
    let document: Yaml = match serde_yaml_ng::from_str(text) {
        Ok(document) => document,
        Err(error) => {
            problems.push("pipeline", format!("not valid YAML: {error}"));
            return None;
        }
    };
    let Yaml::Mapping(top) = document else {
        problems.push("pipeline", "must be a mapping with name, sources, steps and sink");
        return None;
    };
    for key in top.keys() {
        let key = key.as_str().unwrap_or("?");
        if !TOP_LEVEL_KEYS.contains(&key) {
            problems.push(key, format!("unknown key; known keys: {}", TOP_LEVEL_KEYS.join(", ")));
        }
    }

    let name = parse_name(top.get("name"), problems);
    let sources = parse_sources(top.get("sources"), problems);
    let (source, join) = match (sources, top.get("join")) {
        (None, _) => (None, None),
        (Some(mut sources), None) if sources.len() == 1 => (sources.pop(), None),
        (Some(sources), None) => {
            let names: Vec<&str> = sources.iter().map(|source| source.name.as_str()).collect();
            problems.push("join", format!("is required with two sources ({}): say how they join", names.join(", ")));
            (None, None)
        }
        (Some(sources), Some(_)) if sources.len() != 2 => {
            problems.push("sources", "a join needs exactly two sources");
            (None, None)
        }
        (Some(sources), Some(value)) => match parse_join(value, sources, problems) {
            Some((left, join)) => (Some(left), Some(join)),
            None => (None, None),
        },
    };
    // The steps see the joined records after a join.
    let steps_source = join.as_ref().map(|join| &join.output).or(source.as_ref());
    let steps = parse_steps(top.get("steps"), steps_source, problems);
    let sink = section::<RawSink>(top.get("sink"), "sink", problems);
    let on_error = match top.get("on_error") {
        None => Some(ErrorPolicy::default()),
        value => section::<ErrorPolicy>(value, "on_error", problems),
    };
    let dlq = match top.get("dlq") {
        None => Some(RawDlq { topic: None }),
        value => section::<RawDlq>(value, "dlq", problems),
    };

    let sink = sink.map(|raw| check_sink(raw, steps_source, problems));
    if let (Some(steps), Some(source), None) = (&steps, &source, &join)
        && steps.iter().any(Step::is_stateful) {
            if source.event_time.is_none() {
                problems.push(format!("sources.{}.event_time", source.name), "is required by dedup and window steps");
            }
            if source.watermark.is_none() {
                problems.push(format!("sources.{}.watermark", source.name), "is required by dedup and window steps");
            }
        }
    let (name, source, mut steps, sink, on_error, dlq) = (name?, source?, steps?, sink?, on_error?, dlq?);
    if let Some(mut join) = join {
        join.keep_sources = sink.mode == SinkMode::IdempotentUpsert;
        steps.insert(0, Step::Join(Box::new(join)));
    }
    let dlq_topic = dlq.topic.unwrap_or_else(|| format!("{name}.dlq"));
    if dlq_topic == sink.topic {
        problems.push("dlq.topic", "must differ from sink.topic");
    }
    let pipeline = Pipeline { name, source, steps, sink, on_error, dlq_topic };
    if pipeline.sink.encoding == Encoding::Avro
        && let Err(problem) = crate::codec::avro::AvroEncoder::new(&pipeline.output_schema(), &pipeline.name)
    {
        problems.push("sink.format", problem);
    }
    if pipeline.sink.mode == SinkMode::IdempotentUpsert {
        check_upsert(&pipeline, problems);
    }
    if pipeline.sink.key_encoding == Encoding::Avro {
        match pipeline.output_key_schema() {
            None => problems.push(
                "sink.key_format",
                "avro keys are made from fields: set sink.key, or use a dedup, window or join (whose key it is); \
                 a pipeline without one keeps each input record's key bytes as they are",
            ),
            Some(schema) => {
                if let Err(problem) = crate::codec::avro::AvroEncoder::new(&schema, &format!("{}-key", pipeline.name)) {
                    problems.push("sink.key_format", problem);
                }
            }
        }
    }
    Some(pipeline)
}

/// What `mode: idempotent_upsert` runs in this version: at most one repartition. Without
/// transactions a stage-0 task that replays after a crash writes its forwards to the
/// repartition topic again; each carries its place in its sender's sequence (the input
/// offset), and the receiving task drops what it took before. Past a second repartition
/// that sequence depends on how the first one's partitions interleaved. An `emit: update`
/// window's outputs depend on where batches end, so their ids would carry different values
/// across a replay.
fn check_upsert(pipeline: &Pipeline, problems: &mut ConfigErrors) {
    const WHY: &str = "idempotent_upsert";
    for (index, step) in pipeline.steps.iter().enumerate() {
        if let Step::Window(window) = step
            && window.emit == EmitMode::Update
        {
            problems.push(
                format!("steps[{index}].window.emit"),
                format!("{WHY} writes each window once, with emit: final; emit: update results depend on batch boundaries"),
            );
        }
    }
    if !pipeline.sink.key.is_empty() {
        problems.push("sink.key", format!("{WHY} keys every output by its id (see README); remove sink.key"));
    }
    let several_topics = match &pipeline.source.topics {
        SourceTopics::List(topics) => topics.len() > 1,
        SourceTopics::Pattern(_) => true,
    };
    if several_topics && pipeline.steps.iter().any(Step::is_stateful) {
        problems.push(
            format!("sources.{}", pipeline.source.name),
            format!("{WHY} ids of window and dedup results are unique within one source topic; read a single topic"),
        );
    }
    if pipeline.sink.key_encoding == Encoding::Avro {
        problems.push("sink.key_format", format!("{WHY} keys every output by its id, as JSON"));
    }
    if let Ok(engine) = crate::engine::Engine::new(pipeline)
        && engine.stage_count() > 2
    {
        problems.push(
            "sink.mode",
            format!(
                "{WHY} repartitions at most once: a replayed record is recognised by where its input partition put it, \
                 which a second repartition topic no longer tells. Key the later steps by the first repartition's key, \
                 or use transactional"
            ),
        );
    }
}

/// Deserializes one section, recording a problem located at `location` when it does not fit.
fn section<T: serde::de::DeserializeOwned>(
    value: Option<&Yaml>,
    location: &str,
    problems: &mut ConfigErrors,
) -> Option<T> {
    let Some(value) = value else {
        problems.push(location, "is required");
        return None;
    };
    match serde_yaml_ng::from_value(value.clone()) {
        Ok(parsed) => Some(parsed),
        Err(error) => {
            problems.push(location, error.to_string());
            None
        }
    }
}

fn parse_name(value: Option<&Yaml>, problems: &mut ConfigErrors) -> Option<String> {
    let name: String = section(value, "name", problems)?;
    let valid = !name.is_empty()
        && name.len() <= 100
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    if !valid {
        problems.push(
            "name",
            format!("'{name}' must be 1-100 characters of a-z, 0-9 and '-', not starting with '-'"),
        );
        return None;
    }
    Some(name)
}

/// One source, or two for a join; None if any is bad (each problem recorded).
fn parse_sources(value: Option<&Yaml>, problems: &mut ConfigErrors) -> Option<Vec<Source>> {
    let sources: BTreeMap<String, Yaml> = section(value, "sources", problems)?;
    if sources.is_empty() || sources.len() > 2 {
        problems.push("sources", "must name one source, or two with a join");
        return None;
    }
    let mut parsed = Vec::new();
    let mut valid = true;
    for (name, raw) in sources {
        let location = format!("sources.{name}");
        match section::<RawSource>(Some(&raw), &location, problems).and_then(|raw| check_source(name, raw, &location, problems)) {
            Some(source) => parsed.push(source),
            None => valid = false,
        }
    }
    valid.then_some(parsed)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJoin {
    left: String,
    right: String,
    #[serde(rename = "type", default)]
    kind: JoinKind,
    on: Vec<String>,
    within: RawWithin,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWithin {
    lower: String,
    upper: String,
}

/// A duration that may be negative, such as `-5m`, in milliseconds.
fn signed_millis(text: &str) -> Result<i64, String> {
    let (sign, magnitude) = match text.trim().strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text.trim()),
    };
    let duration = humantime::parse_duration(magnitude)
        .map_err(|error| format!("'{text}' is not a duration such as 0s, 10m or -5m ({error})"))?;
    let mut problems = ConfigErrors::default();
    if !check_duration(duration, Zero::Allowed, "", &mut problems) {
        return Err(problems.problems.into_iter().map(|problem| problem.message).collect());
    }
    Ok(sign * millis(duration))
}

/// The longest duration a pipeline may name: 100 years of 365.25 days (PIPELINE.md
/// "Limits"). With event times inside years 0001-9999, every sum of an event time and such
/// durations stays far inside i64 milliseconds.
pub const MAX_DURATION: Duration = Duration::from_secs(3_155_760_000);

/// Whether a duration may be zero where it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zero {
    Allowed,
    /// Zero means nothing there (a window size, `within`, a gap): at least 1ms.
    Refused,
}

/// Records a problem unless `duration` is whole milliseconds, at most 100 years, and (where
/// zero means nothing) at least 1ms. True when it is fine.
fn check_duration(duration: Duration, zero: Zero, location: &str, problems: &mut ConfigErrors) -> bool {
    let shown = humantime::format_duration(duration);
    let message = if !duration.subsec_nanos().is_multiple_of(1_000_000) {
        format!("'{shown}' is not a whole number of milliseconds; durations are whole milliseconds (e.g. 500ms, 2s)")
    } else if zero == Zero::Refused && duration.is_zero() {
        "must be at least 1ms".to_string()
    } else if duration > MAX_DURATION {
        format!("'{shown}' is longer than the limit of 100 years")
    } else {
        return true;
    };
    problems.push(location, message);
    false
}

/// Milliseconds of a duration that [`check_duration`] accepted (so it fits).
pub fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The most windows one record may fall into (hopping `size / slide`): each is a piece of
/// state and an output per key.
pub const MAX_WINDOWS_PER_RECORD: u128 = 1_000;

/// The join section, given the two sources: (left source, join).
fn parse_join(value: &Yaml, mut sources: Vec<Source>, problems: &mut ConfigErrors) -> Option<(Source, Join)> {
    let raw: RawJoin = section(Some(value), "join", problems)?;
    let before = problems.problems.len();
    let names: Vec<String> = sources.iter().map(|source| source.name.clone()).collect();
    for (location, name) in [("join.left", &raw.left), ("join.right", &raw.right)] {
        if !names.contains(name) {
            problems.push(location, format!("'{name}' is not a source; sources: {}", names.join(", ")));
        }
    }
    if raw.left == raw.right {
        problems.push("join.right", "must name the other source than join.left");
    }
    if raw.on.is_empty() {
        problems.push("join.on", "must name at least one field (the same name on both sides)");
    }
    let lower = signed_millis(&raw.within.lower).map_err(|message| problems.push("join.within.lower", message)).ok();
    let upper = signed_millis(&raw.within.upper).map_err(|message| problems.push("join.within.upper", message)).ok();
    if let (Some(lower), Some(upper)) = (lower, upper)
        && lower > upper
    {
        problems.push("join.within", format!("lower ({}) must not be after upper ({})", raw.within.lower, raw.within.upper));
    }
    if problems.problems.len() > before {
        return None;
    }
    let right_index = sources.iter().position(|source| source.name == raw.right)?;
    let right = sources.remove(right_index);
    let left = sources.pop()?;
    for source in [&left, &right] {
        let location = format!("sources.{}", source.name);
        check_fields(&raw.on, Some(source), "join.on", problems);
        if source.event_time.is_none() {
            problems.push(format!("{location}.event_time"), "is required by the join");
        }
        if source.watermark.is_none() {
            problems.push(format!("{location}.watermark"), "is required by the join");
        }
        if matches!(source.topics, SourceTopics::Pattern(_)) {
            problems.push(format!("{location}.pattern"), "a join's sources name their topics (topics: [...])");
        }
    }
    if let (SourceTopics::List(left_topics), SourceTopics::List(right_topics)) = (&left.topics, &right.topics)
        && let Some(shared) = left_topics.iter().find(|topic| right_topics.contains(topic))
    {
        problems.push("join", format!("topic '{shared}' is read by both sources; each side needs its own topics"));
    }
    if problems.problems.len() > before {
        return None;
    }
    let side_schema = |source: &Source| match &source.schema {
        Some(schema) => schema.clone(),
        None => Schema { fields: vec![("value".to_string(), FieldType::String)] },
    };
    let output = Source {
        name: format!("{}+{}", left.name, right.name),
        schema: Some(Schema {
            fields: vec![
                (left.name.clone(), FieldType::Object(side_schema(&left))),
                (right.name.clone(), FieldType::Object(side_schema(&right))),
            ],
        }),
        encoding: Encoding::Json,
        // Keyed steps after the join are co-partitioned when their key holds the join key.
        partitioned_by: raw.on.iter().map(|field| format!("{}.{field}", left.name)).collect(),
        ..left.clone()
    };
    let join = Join {
        left: left.name.clone(),
        right,
        kind: raw.kind,
        on: raw.on,
        lower: lower?,
        upper: upper?,
        keep_sources: false,
        output,
    };
    Some((left, join))
}

fn check_source(name: String, raw: RawSource, location: &str, problems: &mut ConfigErrors) -> Option<Source> {
    let before = problems.problems.len();
    let topics = match (raw.topics, raw.pattern) {
        (Some(topics), None) if !topics.is_empty() => Some(SourceTopics::List(topics)),
        (None, Some(pattern)) => match regex::Regex::new(&pattern) {
            Ok(_) => Some(SourceTopics::Pattern(pattern)),
            Err(error) => {
                problems.push(format!("{location}.pattern"), format!("not a valid regular expression: {error}"));
                None
            }
        },
        (Some(_), Some(_)) => {
            problems.push(location, "give either topics or pattern, not both");
            None
        }
        _ => {
            problems.push(location, "needs topics (a non-empty list) or pattern");
            None
        }
    };
    let schema = match (raw.format, raw.schema) {
        (Encoding::Json, None) => {
            problems.push(format!("{location}.schema"), "is required for format json (field: type)");
            None
        }
        (Encoding::Avro, None) => {
            problems.push(
                format!("{location}.schema"),
                "is required for format avro: the fields to read (field: type), resolved against each record's writer schema",
            );
            None
        }
        (Encoding::Json, Some(mapping)) => parse_schema(&mapping, &format!("{location}.schema"), problems),
        (Encoding::Avro, Some(mapping)) => {
            let schema = parse_schema(&mapping, &format!("{location}.schema"), problems);
            if let Some(schema) = &schema {
                for path in schema.invalid_avro_names() {
                    problems.push(
                        format!("{location}.schema.{path}"),
                        "is not an Avro field name (letters, digits and _, not starting with a digit)",
                    );
                }
            }
            schema
        }
        (Encoding::String, Some(_)) => {
            problems.push(format!("{location}.schema"), "format string has no schema: the record is {value: string}");
            None
        }
        _ => None,
    };
    let field_type = |path: &str| -> Option<FieldType> {
        match raw.format {
            Encoding::String => (path == "value").then_some(FieldType::String),
            _ => schema.as_ref().and_then(|schema| schema.field_type(path).cloned()),
        }
    };
    let max_ahead = raw.event_time.as_ref().and_then(|event_time| event_time.max_ahead);
    if let Some(max_ahead) = max_ahead {
        check_duration(max_ahead, Zero::Refused, &format!("{location}.event_time.max_ahead"), problems);
    }
    let origin = match raw.event_time {
        None => None,
        Some(RawEventTime { field: Some(path), unit, kafka_timestamp: false, .. }) => {
            match field_type(&path) {
                None => problems.push(format!("{location}.event_time.field"), format!("'{path}' is not a field of the schema")),
                Some(FieldType::Object(_) | FieldType::Boolean) => problems.push(
                    format!("{location}.event_time.field"),
                    format!("'{path}' must be a long, double, timestamp or string (rfc3339) field"),
                ),
                Some(_) => {}
            }
            Some(TimeOrigin::Field { path, unit })
        }
        Some(RawEventTime { field: None, kafka_timestamp: true, .. }) => Some(TimeOrigin::KafkaTimestamp),
        Some(_) => {
            problems.push(
                format!("{location}.event_time"),
                "give either field (with unit) or kafka_timestamp: true",
            );
            None
        }
    };
    let event_time = origin.map(|origin| EventTime { origin, max_ahead });
    if let Some(watermark) = &raw.watermark {
        let location = format!("{location}.watermark");
        check_duration(watermark.max_out_of_orderness, Zero::Allowed, &format!("{location}.max_out_of_orderness"), problems);
        if let Some(idle_timeout) = watermark.idle_timeout {
            check_duration(idle_timeout, Zero::Refused, &format!("{location}.idle_timeout"), problems);
        }
    }
    let starting_offsets = parse_starting_offsets(raw.starting_offsets.as_ref(), location, problems);
    for field in &raw.partitioned_by {
        if field_type(field).is_none() {
            problems.push(format!("{location}.partitioned_by"), format!("'{field}' is not a field of the schema"));
        }
    }
    if problems.problems.len() > before {
        return None;
    }
    Some(Source {
        name,
        topics: topics?,
        encoding: raw.format,
        schema,
        event_time,
        watermark: raw.watermark,
        starting_offsets: starting_offsets?,
        on_data_loss: raw.on_data_loss,
        partitioned_by: raw.partitioned_by,
    })
}

fn parse_starting_offsets(value: Option<&Yaml>, location: &str, problems: &mut ConfigErrors) -> Option<StartingOffsets> {
    let location = format!("{location}.starting_offsets");
    let expected = "must be earliest, latest or {timestamp: <RFC 3339 time>}";
    match value {
        None => Some(StartingOffsets::Earliest),
        Some(Yaml::String(word)) if word == "earliest" => Some(StartingOffsets::Earliest),
        Some(Yaml::String(word)) if word == "latest" => Some(StartingOffsets::Latest),
        Some(Yaml::Mapping(mapping)) if mapping.len() == 1 => {
            let Some(text) = mapping.get("timestamp").and_then(Yaml::as_str) else {
                problems.push(location, expected);
                return None;
            };
            match chrono::DateTime::parse_from_rfc3339(text) {
                Ok(instant) => Some(StartingOffsets::Timestamp(instant.timestamp_millis())),
                Err(error) => {
                    problems.push(location, format!("'{text}' is not an RFC 3339 time: {error}"));
                    None
                }
            }
        }
        Some(_) => {
            problems.push(location, expected);
            None
        }
    }
}

fn parse_schema(mapping: &Mapping, location: &str, problems: &mut ConfigErrors) -> Option<Schema> {
    let mut fields = Vec::new();
    let mut valid = true;
    for (key, value) in mapping {
        let Some(name) = key.as_str() else {
            problems.push(location, "field names must be strings");
            valid = false;
            continue;
        };
        let field_location = format!("{location}.{name}");
        let field_type = match value {
            Yaml::String(type_name) => match type_name.as_str() {
                "string" => FieldType::String,
                "long" => FieldType::Long,
                "double" => FieldType::Double,
                "boolean" => FieldType::Boolean,
                "timestamp" => FieldType::Timestamp,
                other => {
                    problems.push(
                        field_location,
                        format!("unknown type '{other}'; types: string, long, double, boolean, timestamp, or a nested mapping"),
                    );
                    valid = false;
                    continue;
                }
            },
            Yaml::Mapping(inner) => match parse_schema(inner, &field_location, problems) {
                Some(schema) => FieldType::Object(schema),
                None => {
                    valid = false;
                    continue;
                }
            },
            _ => {
                problems.push(field_location, "must be a type name or a nested mapping");
                valid = false;
                continue;
            }
        };
        fields.push((name.to_string(), field_type));
    }
    if fields.is_empty() && valid {
        problems.push(location, "must declare at least one field");
        return None;
    }
    valid.then_some(Schema { fields })
}

fn parse_steps(value: Option<&Yaml>, source: Option<&Source>, problems: &mut ConfigErrors) -> Option<Vec<Step>> {
    let Some(value) = value else {
        return Some(Vec::new());
    };
    let Yaml::Sequence(items) = value else {
        problems.push("steps", "must be a list of steps such as `- filter: \"amount > 0\"`");
        return None;
    };
    let mut steps = Vec::new();
    let mut valid = true;
    for (index, item) in items.iter().enumerate() {
        let location = format!("steps[{index}]");
        let Some((kind, body)) = item.as_mapping().filter(|m| m.len() == 1).and_then(|m| m.iter().next()) else {
            problems.push(location, "each step is a mapping with one key: its kind (filter, dedup, window)");
            valid = false;
            continue;
        };
        match kind.as_str().unwrap_or("") {
            "filter" => match body.as_str() {
                Some(expression) => {
                    // Without a valid source, the syntax can still be checked.
                    let checked = match source {
                        Some(source) => FilterExpression::compile(expression, source).map(drop),
                        None => FilterExpression::check_syntax(expression),
                    };
                    if let Err(message) = checked {
                        problems.push(format!("{location}.filter"), message);
                        valid = false;
                        continue;
                    }
                    steps.push(Step::Filter(Filter { expression: expression.to_string() }));
                }
                None => {
                    problems.push(format!("{location}.filter"), "must be an expression string");
                    valid = false;
                }
            },
            "dedup" => match section::<Dedup>(Some(body), &format!("{location}.dedup"), problems) {
                Some(dedup) => {
                    let before = problems.problems.len();
                    if dedup.key.is_empty() {
                        problems.push(format!("{location}.dedup.key"), "must name at least one field");
                    }
                    check_fields(&dedup.key, source, &format!("{location}.dedup.key"), problems);
                    check_duration(dedup.within, Zero::Refused, &format!("{location}.dedup.within"), problems);
                    if problems.problems.len() > before {
                        valid = false;
                    } else {
                        steps.push(Step::Dedup(dedup));
                    }
                }
                None => valid = false,
            },
            "window" => match section::<RawWindow>(Some(body), &format!("{location}.window"), problems)
                .and_then(|raw| check_window(raw, source, &format!("{location}.window"), problems))
            {
                Some(window) => steps.push(Step::Window(window)),
                None => valid = false,
            },
            other => {
                problems.push(location, format!("unknown step kind '{other}'; kinds: filter, dedup, window"));
                valid = false;
            }
        }
    }
    valid.then_some(steps)
}

/// Records a problem for each field that the source's records do not have.
fn check_fields(fields: &[String], source: Option<&Source>, location: &str, problems: &mut ConfigErrors) {
    let Some(source) = source else {
        return;
    };
    for field in fields {
        let known = match (&source.schema, source.encoding) {
            (Some(schema), _) => schema.field_type(field).is_some(),
            (None, Encoding::String) => field == "value",
            _ => true,
        };
        if !known {
            problems.push(location, format!("'{field}' is not a field of the record"));
        }
    }
}

fn check_window(raw: RawWindow, source: Option<&Source>, location: &str, problems: &mut ConfigErrors) -> Option<Window> {
    let before = problems.problems.len();
    check_fields(&raw.group_by, source, &format!("{location}.group_by"), problems);
    let kind = match (raw.tumbling, raw.hopping, raw.session) {
        (Some(size), None, None) => {
            check_duration(size, Zero::Refused, &format!("{location}.tumbling"), problems);
            Some(WindowKind::Tumbling { size })
        }
        (None, Some(RawHopping { size, slide }), None) => {
            let size_fine = check_duration(size, Zero::Refused, &format!("{location}.hopping.size"), problems);
            let slide_fine = check_duration(slide, Zero::Refused, &format!("{location}.hopping.slide"), problems);
            if size_fine && slide_fine {
                let windows = size.as_millis().div_ceil(slide.as_millis());
                if slide > size {
                    problems.push(format!("{location}.hopping.slide"), "must be at most size");
                } else if windows > MAX_WINDOWS_PER_RECORD {
                    problems.push(
                        format!("{location}.hopping"),
                        format!(
                            "size / slide puts each record in {windows} windows, over the limit of {MAX_WINDOWS_PER_RECORD} \
                             (each is state and a result per key); use a longer slide"
                        ),
                    );
                }
            }
            Some(WindowKind::Hopping { size, slide })
        }
        (None, None, Some(RawSession { gap })) => {
            check_duration(gap, Zero::Refused, &format!("{location}.session.gap"), problems);
            Some(WindowKind::Session { gap })
        }
        _ => {
            problems.push(location, "give exactly one of tumbling, hopping or session");
            None
        }
    };
    if let Some(lateness) = raw.allowed_lateness {
        check_duration(lateness, Zero::Allowed, &format!("{location}.allowed_lateness"), problems);
    }
    let emit = match raw.emit.as_deref() {
        None | Some("final") => EmitMode::Final,
        Some("update") => EmitMode::Update,
        Some("complete") => {
            problems.push(
                format!("{location}.emit"),
                "complete mode keeps every window forever (state grows without bound); use final or update",
            );
            EmitMode::Final
        }
        Some(other) => {
            problems.push(format!("{location}.emit"), format!("'{other}' is not final or update"));
            EmitMode::Final
        }
    };
    let mut aggregates = Vec::new();
    for (name, definition) in &raw.aggregates {
        let (Some(name), Some(definition)) = (name.as_str(), definition.as_str()) else {
            problems.push(format!("{location}.aggregates"), "each aggregate is `name: function(field)`");
            continue;
        };
        let aggregate_location = format!("{location}.aggregates.{name}");
        if raw.group_by.iter().any(|field| field == name) || name == "window_start" || name == "window_end" {
            problems.push(&aggregate_location, "clashes with a group_by field or window_start/window_end");
        }
        match Aggregate::parse(definition) {
            Ok(aggregate) => {
                if let Some(field) = aggregate.field() {
                    check_fields(&[field.to_string()], source, &aggregate_location, problems);
                }
                aggregates.push((name.to_string(), aggregate));
            }
            Err(message) => problems.push(aggregate_location, message),
        }
    }
    if aggregates.is_empty() && problems.problems.len() == before {
        problems.push(format!("{location}.aggregates"), "must define at least one aggregate");
    }
    if problems.problems.len() > before {
        return None;
    }
    Some(Window {
        group_by: raw.group_by,
        kind: kind?,
        allowed_lateness: raw.allowed_lateness.unwrap_or_default(),
        aggregates,
        emit,
    })
}

fn check_sink(raw: RawSink, source: Option<&Source>, problems: &mut ConfigErrors) -> Sink {
    if raw.topic.trim().is_empty() {
        problems.push("sink.topic", "must name a topic");
    }
    if raw.format == Encoding::String {
        problems.push("sink.format", "a sink writes json or avro");
    }
    if raw.key_format == Encoding::String {
        problems.push("sink.key_format", "keys are written as json or avro");
    }
    check_fields(&raw.key, source, "sink.key", problems);
    Sink { topic: raw.topic, encoding: raw.format, key: raw.key, key_encoding: raw.key_format, mode: raw.mode }
}

//! A source of the pipeline file: its topics, format, schema, event time, watermark and where
//! reading starts.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value as Yaml};

use super::duration::{check_duration, Zero};
use super::fields::Fields;
use super::pipeline::section;
use super::schema::{parse_schema, FieldType, Schema};
use super::shape::{Key, Section, Shape};
use super::ConfigErrors;

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
    /// `table: {key: [...]}`: read as the latest value per key (a lookup's table), not as a
    /// stream; the key fields, in the order written.
    pub table: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceTopics {
    List(Vec<String>),
    /// A regular expression matched against whole topic names.
    Pattern(TopicPattern),
}

/// A source's `pattern`, compiled once: which topics a record came from is asked per record.
#[derive(Debug, Clone)]
pub struct TopicPattern {
    text: String,
    /// `^(text)$`: the pattern matches whole topic names.
    whole: regex::Regex,
}

impl TopicPattern {
    pub fn new(text: &str) -> Result<TopicPattern, regex::Error> {
        regex::Regex::new(text)?;
        Ok(TopicPattern { text: text.to_string(), whole: regex::Regex::new(&format!("^({text})$"))? })
    }

    pub fn matches(&self, topic: &str) -> bool {
        self.whole.is_match(topic)
    }
}

impl PartialEq for TopicPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for TopicPattern {}

impl std::fmt::Display for TopicPattern {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.text)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Json,
    Avro,
    String,
}

impl Encoding {
    /// As written in the pipeline file.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Avro => "avro",
            Encoding::String => "string",
        }
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watermark {
    pub max_out_of_orderness: Duration,
    pub idle_timeout: Option<Duration>,
}

impl Watermark {
    fn read(value: &Yaml, location: &str, problems: &mut ConfigErrors) -> Option<Watermark> {
        let mut fields = Fields::of(value, location, &WATERMARK, problems)?;
        let max_out_of_orderness = fields.required_duration("max_out_of_orderness", problems);
        let idle_timeout = fields.duration("idle_timeout", problems);
        // Each duration's limits are checked whatever became of the other.
        if let Some(max_out_of_orderness) = max_out_of_orderness {
            check_duration(max_out_of_orderness, Zero::Allowed, &fields.location_of("max_out_of_orderness"), problems);
        }
        if let Some(idle_timeout) = idle_timeout {
            check_duration(idle_timeout, Zero::Refused, &fields.location_of("idle_timeout"), problems);
        }
        let fine = fields.finish(problems);
        let max_out_of_orderness = max_out_of_orderness?;
        fine.then_some(Watermark { max_out_of_orderness, idle_timeout })
    }
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
            SourceTopics::Pattern(pattern) => pattern.matches(topic),
        }
    }
}

/// `sources.<name>`.
pub const SOURCE: Section = Section {
    about: "a source: the topics it reads and how their records are written",
    keys: &[
        Key::optional("topics", Shape::Strings, "the topics it reads (or `pattern`)"),
        Key::optional("pattern", Shape::String, "a regular expression over topic names, instead of `topics`"),
        Key::required("format", Shape::OneOf(&["json", "avro", "string"]), "how record values are written"),
        Key::optional("schema", Shape::FieldTypes, "the fields of a json source's records and their types"),
        Key::optional("event_time", Shape::Section(&EVENT_TIME), "where a record's event time is"),
        Key::optional("watermark", Shape::Section(&WATERMARK), "how far event times may be out of order"),
        Key::optional(
            "starting_offsets",
            Shape::AnyOf(&[Shape::OneOf(&["earliest", "latest"]), Shape::Section(&STARTING_AT)]),
            "where a group without committed offsets starts (default earliest)",
        ),
        Key::optional("on_data_loss", Shape::OneOf(&["fail", "earliest"]), "when committed offsets were deleted by retention (default fail)"),
        Key::optional("partitioned_by", Shape::Strings, "fields the input topics are already partitioned by"),
        Key::optional("table", Shape::Section(&TABLE), "read this source as a table (latest row per key) for lookups"),
    ],
};

const EVENT_TIME: Section = Section {
    about: "where a record's event time is: a field, or the Kafka timestamp",
    keys: &[
        Key::optional("field", Shape::String, "the field (a dotted path) holding the event time"),
        Key::optional("unit", Shape::OneOf(&["millis", "seconds", "rfc3339"]), "how the field writes it (default millis)"),
        Key::optional("kafka_timestamp", Shape::Bool, "use the Kafka record timestamp instead of a field"),
        Key::optional("max_ahead", Shape::Duration, "a record further ahead of the wall clock is a decode error"),
    ],
};

const WATERMARK: Section = Section {
    about: "the watermark: the event time below which no more records are expected",
    keys: &[
        Key::required("max_out_of_orderness", Shape::Duration, "how far behind the highest event time seen records may still arrive"),
        Key::optional("idle_timeout", Shape::Duration, "a partition silent this long no longer holds the watermark back"),
    ],
};

const STARTING_AT: Section = Section {
    about: "start at the first record at or after this time",
    keys: &[Key::required("timestamp", Shape::String, "an RFC 3339 time, e.g. 2026-01-01T00:00:00Z")],
};

const TABLE: Section = Section {
    about: "a table source: the latest record per key, for lookup steps",
    keys: &[Key::required("key", Shape::Strings, "the fields forming a row's key")],
};

/// A source as written; a key that did not fit is None here, with its problem recorded.
struct RawSource {
    topics: Option<Vec<String>>,
    pattern: Option<String>,
    format: Option<Encoding>,
    schema: Option<Mapping>,
    event_time: Option<RawEventTime>,
    watermark: Option<Watermark>,
    starting_offsets: Option<Yaml>,
    on_data_loss: Option<DataLossPolicy>,
    partitioned_by: Vec<String>,
    /// `table.key`, when `table` is there (an empty list when it did not read).
    table: Option<Vec<String>>,
}

impl RawSource {
    fn read(value: &Yaml, location: &str, problems: &mut ConfigErrors) -> Option<RawSource> {
        let mut fields = Fields::of(value, location, &SOURCE, problems)?;
        let raw = RawSource {
            topics: fields.optional("topics", problems),
            pattern: fields.optional("pattern", problems),
            format: fields.required("format", problems),
            schema: fields.optional("schema", problems),
            event_time: fields.raw("event_time").and_then(|value| RawEventTime::read(value, &format!("{location}.event_time"), problems)),
            watermark: fields.raw("watermark").and_then(|value| Watermark::read(value, &format!("{location}.watermark"), problems)),
            starting_offsets: fields.raw("starting_offsets").cloned(),
            on_data_loss: fields.optional("on_data_loss", problems),
            partitioned_by: fields.or_default("partitioned_by", problems),
            table: fields.raw("table").map(|value| read_table(value, &format!("{location}.table"), problems)),
        };
        fields.finish(problems);
        Some(raw)
    }
}

struct RawEventTime {
    field: Option<String>,
    unit: EventTimeUnit,
    kafka_timestamp: bool,
    max_ahead: Option<Duration>,
}

impl RawEventTime {
    fn read(value: &Yaml, location: &str, problems: &mut ConfigErrors) -> Option<RawEventTime> {
        let mut fields = Fields::of(value, location, &EVENT_TIME, problems)?;
        let raw = RawEventTime {
            field: fields.optional("field", problems),
            unit: fields.or_default("unit", problems),
            kafka_timestamp: fields.or_default("kafka_timestamp", problems),
            max_ahead: fields.duration("max_ahead", problems),
        };
        fields.finish(problems).then_some(raw)
    }
}

/// `table: {key: [...]}`: the key fields (an empty list, with a problem, when they did not
/// read).
fn read_table(value: &Yaml, location: &str, problems: &mut ConfigErrors) -> Vec<String> {
    let Some(mut fields) = Fields::of(value, location, &TABLE, problems) else {
        return Vec::new();
    };
    let key: Vec<String> = fields.required("key", problems).unwrap_or_default();
    let fine = fields.finish(problems);
    if fine && key.is_empty() {
        problems.push(format!("{location}.key"), "must name at least one field");
    }
    key
}

/// One source, or two for a join, and any tables; None if any is bad (each problem
/// recorded).
pub fn parse_sources(value: Option<&Yaml>, problems: &mut ConfigErrors) -> Option<Vec<Source>> {
    let sources: BTreeMap<String, Yaml> = section(value, "sources", problems)?;
    let streams = sources.values().filter(|source| source.get("table").is_none()).count();
    if streams == 0 || streams > 2 {
        problems.push("sources", "must name one source read as a stream, or two with a join (and any tables)");
        return None;
    }
    let mut parsed = Vec::new();
    let mut valid = true;
    for (name, raw) in sources {
        let location = format!("sources.{name}");
        let before = problems.problems.len();
        match RawSource::read(&raw, &location, problems).and_then(|raw| check_source(name, raw, &location, problems)) {
            Some(source) if problems.problems.len() == before => parsed.push(source),
            _ => valid = false,
        }
    }
    valid.then_some(parsed)
}

fn check_source(name: String, raw: RawSource, location: &str, problems: &mut ConfigErrors) -> Option<Source> {
    let before = problems.problems.len();
    let topics = match (raw.topics, raw.pattern) {
        (Some(topics), None) if !topics.is_empty() => Some(SourceTopics::List(topics)),
        (None, Some(pattern)) => match TopicPattern::new(&pattern) {
            Ok(pattern) => Some(SourceTopics::Pattern(pattern)),
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
        (Some(Encoding::Json), None) => {
            problems.push(format!("{location}.schema"), "is required for format json (field: type)");
            None
        }
        (Some(Encoding::Avro), None) => {
            problems.push(
                format!("{location}.schema"),
                "is required for format avro: the fields to read (field: type), resolved against each record's writer schema",
            );
            None
        }
        (Some(Encoding::Json), Some(mapping)) => parse_schema(&mapping, &format!("{location}.schema"), problems),
        (Some(Encoding::Avro), Some(mapping)) => {
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
        // The format did not read: the fields can still be checked.
        (None, Some(mapping)) => parse_schema(&mapping, &format!("{location}.schema"), problems),
        (Some(Encoding::String), Some(_)) => {
            problems.push(format!("{location}.schema"), "format string has no schema: the record is {value: string}");
            None
        }
        _ => None,
    };
    let field_type = |path: &str| -> Option<FieldType> {
        match raw.format {
            Some(Encoding::String) => (path == "value").then_some(FieldType::String),
            _ => schema.as_ref().and_then(|schema| schema.field_type(path).cloned()),
        }
    };
    // A table is read whole, from its beginning, without event time: what streams are read
    // by has no place there.
    if raw.table.is_some() {
        let written = [
            ("event_time", raw.event_time.is_some()),
            ("watermark", raw.watermark.is_some()),
            ("partitioned_by", !raw.partitioned_by.is_empty()),
            ("starting_offsets", raw.starting_offsets.is_some()),
            ("on_data_loss", raw.on_data_loss.is_some()),
        ];
        for (key, _) in written.iter().filter(|(_, written)| *written) {
            problems.push(format!("{location}.{key}"), "a table is read whole, from its beginning, as the latest value per key: remove it");
        }
        if raw.format == Some(Encoding::String) {
            problems.push(format!("{location}.format"), "a table needs a schema to find its key in: use json or avro");
        }
        for field in raw.table.iter().flatten() {
            match schema.as_ref().and_then(|schema| schema.declared_type(field)) {
                None => problems.push(format!("{location}.table.key"), format!("'{field}' is not a field of the schema")),
                Some(FieldType::Object(_) | FieldType::Array(_) | FieldType::Nullable(_)) => problems.push(
                    format!("{location}.table.key"),
                    format!("'{field}' must be a string, long, double, boolean or timestamp that is always there (no ?)"),
                ),
                Some(_) => {}
            }
        }
    }
    let max_ahead = raw.event_time.as_ref().and_then(|event_time| event_time.max_ahead);
    if let Some(max_ahead) = max_ahead {
        check_duration(max_ahead, Zero::Refused, &format!("{location}.event_time.max_ahead"), problems);
    }
    let origin = match raw.event_time {
        None => None,
        Some(RawEventTime { field: Some(path), unit, kafka_timestamp: false, .. }) => {
            match field_type(&path) {
                None => problems.push(format!("{location}.event_time.field"), format!("'{path}' is not a field of the schema")),
                Some(FieldType::Object(_) | FieldType::Array(_) | FieldType::Boolean) => problems.push(
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
        encoding: raw.format?,
        schema,
        event_time,
        watermark: raw.watermark,
        starting_offsets: starting_offsets?,
        on_data_loss: raw.on_data_loss.unwrap_or_default(),
        partitioned_by: raw.partitioned_by,
        table: raw.table,
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

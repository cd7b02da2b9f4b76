//! The `join:` section: a stream-stream interval join of the pipeline's two sources; its
//! config and checks.

use serde::Deserialize;
use serde_yaml_ng::Value as Yaml;

use crate::config::{check_fields, signed_millis, ConfigErrors, Encoding, FieldType, Fields, Key, Schema, Section, Shape, Source, SourceTopics};

/// The `join:` section.
pub const SECTION: Section = Section {
    about: "a stream-stream interval join of the pipeline's two stream sources",
    keys: &[
        Key::required("left", Shape::String, "the left source's name"),
        Key::required("right", Shape::String, "the right source's name"),
        Key::optional("type", Shape::OneOf(&["inner", "left", "right", "full"]), "which unmatched records are kept (default inner)"),
        Key::required("on", Shape::Strings, "the fields (same name on both sides) that must be equal"),
        Key::required("within", Shape::Section(&WITHIN), "how far the right record's time may be from the left's"),
    ],
};

const WITHIN: Section = Section {
    about: "l.t + lower <= r.t <= l.t + upper",
    keys: &[
        Key::required("lower", Shape::String, "a duration, which may be negative (e.g. -5m)"),
        Key::required("upper", Shape::String, "a duration, which may be negative"),
    ],
};

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

struct RawJoin {
    left: String,
    right: String,
    kind: JoinKind,
    on: Vec<String>,
    /// `within` in milliseconds: (lower, upper); None when it has problems (recorded).
    within: Option<(i64, i64)>,
}

impl RawJoin {
    /// The join section's keys, every one that is missing or does not fit reported.
    fn read(value: &Yaml, problems: &mut ConfigErrors) -> Option<RawJoin> {
        let mut fields = Fields::of(value, "join", &SECTION, problems)?;
        let left = fields.required("left", problems);
        let right = fields.required("right", problems);
        let kind = fields.or_default("type", problems);
        let on = fields.required("on", problems);
        let within = fields.raw("within");
        if within.is_none() {
            problems.push("join.within", "is required: {lower: <duration>, upper: <duration>}");
        }
        let fine = fields.finish(problems);
        // Read after the section's own keys: its problems are its own.
        let within = within.and_then(|value| read_within(value, problems));
        let join = RawJoin { left: left?, right: right?, kind, on: on?, within };
        fine.then_some(join)
    }
}

/// `within: {lower, upper}` in milliseconds, each bound's problems reported whatever the
/// other's are.
fn read_within(value: &Yaml, problems: &mut ConfigErrors) -> Option<(i64, i64)> {
    let before = problems.problems.len();
    let mut fields = Fields::of(value, "join.within", &WITHIN, problems)?;
    let (lower, upper): (Option<String>, Option<String>) = (fields.required("lower", problems), fields.required("upper", problems));
    fields.finish(problems);
    let millis = |text: &Option<String>, location: &str, problems: &mut ConfigErrors| {
        text.as_deref().and_then(|text| signed_millis(text, location, problems))
    };
    let (lower_millis, upper_millis) = (millis(&lower, "join.within.lower", problems), millis(&upper, "join.within.upper", problems));
    let (lower_millis, upper_millis) = (lower_millis?, upper_millis?);
    if lower_millis > upper_millis {
        let (lower, upper) = (lower.unwrap_or_default(), upper.unwrap_or_default());
        problems.push("join.within", format!("lower ({lower}) must not be after upper ({upper})"));
    }
    (problems.problems.len() == before).then_some((lower_millis, upper_millis))
}

/// Checks the join section on its own, where the sources have problems of their own: what
/// can be said of it without them is said.
pub fn check_section(value: &Yaml, problems: &mut ConfigErrors) {
    read_section(value, problems);
}

/// The join section's keys and what they say on their own: (raw section, lower, upper) in
/// milliseconds, or None with every problem recorded.
fn read_section(value: &Yaml, problems: &mut ConfigErrors) -> Option<RawJoin> {
    let raw = RawJoin::read(value, problems)?;
    if raw.left == raw.right {
        problems.push("join.right", "must name the other source than join.left");
    }
    if raw.on.is_empty() {
        problems.push("join.on", "must name at least one field (the same name on both sides)");
    }
    Some(raw)
}

/// The join section, given the two sources: (left source, join).
pub fn parse_join(value: &Yaml, mut sources: Vec<Source>, problems: &mut ConfigErrors) -> Option<(Source, Join)> {
    let before = problems.problems.len();
    let section = read_section(value, problems);
    let names: Vec<String> = sources.iter().map(|source| source.name.clone()).collect();
    let raw = section?;
    for (location, name) in [("join.left", &raw.left), ("join.right", &raw.right)] {
        if !names.contains(name) {
            problems.push(location, format!("'{name}' is not a source; sources: {}", names.join(", ")));
        }
    }
    let (lower, upper) = raw.within?;
    if problems.problems.len() > before {
        return None;
    }
    let right_index = sources.iter().position(|source| source.name == raw.right)?;
    let right = sources.remove(right_index);
    let left = sources.pop()?;
    for source in [&left, &right] {
        let location = format!("sources.{}", source.name);
        check_fields(&raw.on, Some(&source.record_schema()), "join.on", problems);
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
        lower,
        upper,
        keep_sources: false,
        output,
    };
    Some((left, join))
}

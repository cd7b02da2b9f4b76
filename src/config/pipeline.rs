//! The pipeline file as written (PIPELINE.md "Shape"): its name, sources, steps, sink, error
//! policy and DLQ, each checked on its own.
//!
//! The YAML is read section by section, so a mistake in one source or step does not hide the
//! mistakes in the others. What a step's body means is its own config's business (beside each
//! operator); checking the parts against each other (fields named by steps, expressions,
//! formats, modes) is the plan's. Nothing here knows the engine, the codecs or the operators.

use std::path::Path;

use serde::Deserialize;
use serde_yaml_ng::Value as Yaml;

use super::fields::Fields;
use super::shape::{Key, Section, Shape};
use super::source::{parse_sources, Encoding, Source};
use super::ConfigErrors;

/// The pipeline file, each part checked on its own. A part is None when it had problems
/// (recorded in the [`ConfigErrors`]); the plan checks the parts against each other.
#[derive(Debug, Clone)]
pub struct PipelineFile {
    pub name: Option<String>,
    /// One source, or two with a join; None when any of them is bad.
    pub sources: Option<Vec<Source>>,
    /// The `join` section, for the join step's own config to read.
    pub join: Option<Yaml>,
    /// The steps whose shape is right (one key: the kind).
    pub steps: Vec<StepEntry>,
    /// `sink:` (one output) or the entries of `outputs:`; None when any of them is bad.
    pub outputs: Option<Vec<OutputEntry>>,
    pub on_error: Option<ErrorPolicy>,
    /// `dlq.topic`: Some(None) when the DLQ topic is left to its default.
    pub dlq_topic: Option<Option<String>>,
    /// The document as read, for debug builds to check that the JSON Schema takes it.
    pub document: Yaml,
}

/// One entry of `steps`: its kind and the body that kind's config reads.
#[derive(Debug, Clone)]
pub struct StepEntry {
    pub kind: String,
    pub body: Yaml,
    /// Where it is in the file, e.g. `steps[2]`.
    pub location: String,
}

/// One output: a branch of the steps ending in a sink. `sink:` alone is one output whose
/// records are the last step's.
#[derive(Debug, Clone)]
pub struct OutputEntry {
    /// Its name under `outputs:`; `sink` for a lone `sink:`.
    pub name: String,
    /// The step whose results it takes, as written; None: the last of `steps`.
    pub from: Option<StepRef>,
    /// A CEL expression a record must satisfy to enter this output.
    pub when: Option<String>,
    /// Its own steps, run after `from` on the records that enter it.
    pub steps: Vec<StepEntry>,
    pub sink: Sink,
    /// Where it is in the file: `outputs.<name>`, or `` for a lone `sink:`.
    pub location: String,
}

/// A step named by `from:`: its number as `weir validate` prints it, or its kind (when one
/// step has it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum StepRef {
    Number(usize),
    Kind(String),
}

impl std::fmt::Display for StepRef {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepRef::Number(number) => write!(formatter, "{number}"),
            StepRef::Kind(kind) => formatter.write_str(kind),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    #[default]
    Transactional,
    IdempotentUpsert,
}

impl DeliveryMode {
    /// As written in the pipeline file (`sink.mode`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::Transactional => "transactional",
            DeliveryMode::IdempotentUpsert => "idempotent_upsert",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sink {
    /// Where it is in the file (`sink`, `outputs.<name>.sink`), for problems to name.
    pub location: String,
    pub topic: String,
    pub encoding: Encoding,
    /// Fields forming the Kafka key; empty keeps each input record's key.
    pub key: Vec<String>,
    /// How keys that weir makes (from fields) are written: json or avro.
    pub key_encoding: Encoding,
    pub mode: DeliveryMode,
    pub headers: SinkHeaders,
}

impl Sink {
    /// Whether sink records carry their input record's headers (the plan settles the default).
    pub fn passes_headers(&self) -> bool {
        self.headers.pass_through.unwrap_or(false)
    }
}

/// `sink.headers`: which headers the sink records carry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SinkHeaders {
    /// Copy the input record's headers; None as written means the default (true where each
    /// output comes from one input record), which the plan settles.
    pub pass_through: Option<bool>,
    /// Header name → CEL expression over the sink's records, in the order written.
    pub set: Vec<(String, String)>,
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

/// The sink as written; a key that did not fit is None or its default here, with its
/// problem recorded.
struct RawSink {
    topic: Option<String>,
    format: Encoding,
    key: Vec<String>,
    key_format: Encoding,
    mode: DeliveryMode,
    headers: SinkHeaders,
}

impl RawSink {
    fn read(value: Option<&Yaml>, location: &str, problems: &mut ConfigErrors) -> Option<RawSink> {
        let Some(value) = value else {
            problems.push(location, "is required");
            return None;
        };
        let mut fields = Fields::of(value, location, &SINK, problems)?;
        let raw = RawSink {
            topic: fields.required("topic", problems),
            format: fields.optional("format", problems).unwrap_or(Encoding::Json),
            key: fields.or_default("key", problems),
            key_format: fields.optional("key_format", problems).unwrap_or(Encoding::Json),
            mode: fields.or_default("mode", problems),
            headers: fields.raw("headers").map(|value| read_sink_headers(value, location, problems)).unwrap_or_default(),
        };
        fields.finish(problems);
        Some(raw)
    }
}

/// `sink.headers: {pass_through: <bool>, set: {<name>: <expression>}}`.
fn read_sink_headers(value: &Yaml, sink: &str, problems: &mut ConfigErrors) -> SinkHeaders {
    let location = format!("{sink}.headers");
    let Some(mut fields) = Fields::of(value, &location, &HEADERS, problems) else {
        return SinkHeaders::default();
    };
    let pass_through = fields.optional("pass_through", problems);
    let mut set = Vec::new();
    if let Some(written) = fields.raw("set") {
        match written.as_mapping() {
            Some(mapping) => {
                for (name, expression) in mapping {
                    match (name.as_str(), expression.as_str()) {
                        (Some(name), Some(expression)) if !name.is_empty() => set.push((name.to_string(), expression.to_string())),
                        _ => problems.push(format!("{location}.set"), "each entry is `header-name: \"<expression>\"`"),
                    }
                }
            }
            None => problems.push(format!("{location}.set"), "must be a mapping of header names to expressions"),
        }
    }
    fields.finish(problems);
    SinkHeaders { pass_through, set }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDlq {
    topic: Option<String>,
}

/// The pipeline file's top level.
pub const PIPELINE: Section = Section {
    about: "a weir pipeline: its sources, steps and sink (or outputs)",
    keys: &[
        Key::required("name", Shape::String, "1-100 characters of a-z, 0-9 and '-': names the group, transactional ids and internal topics"),
        Key::required("sources", Shape::MapOf(&Shape::Section(&super::source::SOURCE)), "source name → source: one stream, or two with a join, and any tables"),
        Key::optional("steps", Shape::Steps, "the steps every record goes through, in order"),
        Key::optional("join", Shape::Join, "a stream-stream interval join of the two stream sources"),
        Key::optional("sink", Shape::Section(&SINK), "where the results go (or `outputs`, for several)"),
        Key::optional("outputs", Shape::MapOf(&Shape::Section(&OUTPUT)), "output name → output, instead of `sink`"),
        Key::optional("on_error", Shape::Section(&ON_ERROR), "what happens to a record that fails"),
        Key::optional("dlq", Shape::Section(&DLQ), "the dead-letter topic"),
    ],
};

const SINK: Section = Section {
    about: "the topic results are written to",
    keys: &[
        Key::required("topic", Shape::String, "the output topic"),
        Key::optional("format", Shape::OneOf(&["json", "avro"]), "how record values are written (default json)"),
        Key::optional("key", Shape::Strings, "fields forming the Kafka key (default: each input record's key)"),
        Key::optional("key_format", Shape::OneOf(&["json", "avro"]), "how keys made from fields are written (default json)"),
        Key::optional("mode", Shape::OneOf(&["transactional", "idempotent_upsert"]), "how results are delivered (default transactional)"),
        Key::optional("headers", Shape::Section(&HEADERS), "the headers results carry"),
    ],
};

const HEADERS: Section = Section {
    about: "the headers results carry",
    keys: &[
        Key::optional("pass_through", Shape::Bool, "copy the input record's headers"),
        Key::optional("set", Shape::MapOf(&Shape::String), "header name → expression over the result"),
    ],
};

const OUTPUT: Section = Section {
    about: "one output: a branch of the steps ending in a sink",
    keys: &[
        Key::optional("from", Shape::AnyOf(&[Shape::Count, Shape::String]), "the step whose results it takes: its number or kind (default the last step)"),
        Key::optional("when", Shape::String, "an expression a record must satisfy to enter this output"),
        Key::optional("steps", Shape::Steps, "this output's own steps"),
        Key::required("sink", Shape::Section(&SINK), "where this output's results go"),
    ],
};

const ERROR_ACTIONS: Shape = Shape::OneOf(&["dlq", "skip", "fail"]);

const ON_ERROR: Section = Section {
    about: "what happens to a record that fails, per kind of failure (each defaults to dlq)",
    keys: &[
        Key::optional("decode", ERROR_ACTIONS, "a record that cannot be decoded or does not fit the schema"),
        Key::optional("late", ERROR_ACTIONS, "a record behind the watermark"),
        Key::optional("process", ERROR_ACTIONS, "a step failing on a record"),
        Key::optional("produce", ERROR_ACTIONS, "a result the broker refuses"),
    ],
};

const DLQ: Section = Section {
    about: "the dead-letter topic",
    keys: &[Key::optional("topic", Shape::String, "its name (default <name>.dlq)")],
};

/// The pipeline file's text; None (with a problem) when it cannot be read.
pub(super) fn read(path: &Path, problems: &mut ConfigErrors) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(error) => {
            problems.push("--pipeline (env WEIR_PIPELINE)", format!("cannot read {}: {error}", path.display()));
            None
        }
    }
}

/// Reads a pipeline document; every problem goes into `problems`. None only when the
/// document is not a YAML mapping at all.
pub fn parse(text: &str, problems: &mut ConfigErrors) -> Option<PipelineFile> {
    let document: Yaml = match serde_yaml_ng::from_str(text) {
        Ok(document) => document,
        Err(error) => {
            problems.push("pipeline", format!("not valid YAML: {error}"));
            return None;
        }
    };
    let Yaml::Mapping(top) = &document else {
        problems.push("pipeline", "must be a mapping with name, sources, steps and sink");
        return None;
    };
    for key in top.keys() {
        let key = key.as_str().unwrap_or("?");
        if PIPELINE.key(key).is_none() {
            problems.push(key, super::error::unknown("key", key, &PIPELINE.names()));
        }
    }
    let name = parse_name(top.get("name"), problems);
    let sources = parse_sources(top.get("sources"), problems);
    let steps = parse_steps(top.get("steps"), "steps", problems);
    let outputs = parse_outputs(top.get("sink"), top.get("outputs"), problems);
    let on_error = match top.get("on_error") {
        None => Some(ErrorPolicy::default()),
        value => section::<ErrorPolicy>(value, "on_error", problems),
    };
    let dlq_topic = match top.get("dlq") {
        None => Some(None),
        value => section::<RawDlq>(value, "dlq", problems).map(|dlq| dlq.topic),
    };
    let join = top.get("join").cloned();
    Some(PipelineFile { name, sources, join, steps, outputs, on_error, dlq_topic, document })
}

/// Deserializes one section, recording a problem located at `location` when it does not fit.
pub fn section<T: serde::de::DeserializeOwned>(
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

/// The entries of `steps` whose shape is right; a problem for each other one.
fn parse_steps(value: Option<&Yaml>, at: &str, problems: &mut ConfigErrors) -> Vec<StepEntry> {
    let Some(value) = value else {
        return Vec::new();
    };
    let Yaml::Sequence(items) = value else {
        problems.push(at, "must be a list of steps such as `- filter: \"amount > 0\"`");
        return Vec::new();
    };
    let mut entries = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let location = format!("{at}[{index}]");
        match item.as_mapping().filter(|mapping| mapping.len() == 1).and_then(|mapping| mapping.iter().next()) {
            Some((kind, body)) => {
                entries.push(StepEntry { kind: kind.as_str().unwrap_or("").to_string(), body: body.clone(), location });
            }
            None => problems.push(location, "each step is a mapping with one key: its kind (filter, dedup, window)"),
        }
    }
    entries
}

/// `sink:` (one output) or `outputs:` (several), each output on its own; None when any is
/// bad (its problems recorded).
fn parse_outputs(sink: Option<&Yaml>, outputs: Option<&Yaml>, problems: &mut ConfigErrors) -> Option<Vec<OutputEntry>> {
    let written = match (sink, outputs) {
        (Some(_), Some(_)) => {
            problems.push("outputs", "a pipeline has `sink:` (one output) or `outputs:` (several), not both");
            return None;
        }
        (None, None) => {
            problems.push("sink", "is required (or `outputs:`, for several)");
            return None;
        }
        (Some(sink), None) => {
            let sink = read_sink(sink, "sink", problems)?;
            let lone = OutputEntry { name: "sink".into(), from: None, when: None, steps: Vec::new(), sink, location: String::new() };
            return Some(vec![lone]);
        }
        (None, Some(outputs)) => outputs,
    };
    let Some(mapping) = written.as_mapping().filter(|mapping| !mapping.is_empty()) else {
        problems.push("outputs", "must map output names to outputs, e.g. `outputs: { big: { when: \"total > 100.0\", sink: { topic: big } } }`");
        return None;
    };
    let mut entries = Some(Vec::with_capacity(mapping.len()));
    for (name, body) in mapping {
        let entry = read_output(name.as_str().unwrap_or(""), body, problems);
        entries = entries.zip(entry).map(|(mut entries, entry)| {
            entries.push(entry);
            entries
        });
    }
    entries
}

/// One entry of `outputs:`.
fn read_output(name: &str, body: &Yaml, problems: &mut ConfigErrors) -> Option<OutputEntry> {
    let location = format!("outputs.{name}");
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        problems.push(location, "an output's name is letters, digits, '_' and '-'");
        return None;
    }
    let mut fields = Fields::of(body, &location, &OUTPUT, problems)?;
    let from = fields.optional("from", problems);
    let when = fields.optional("when", problems);
    let steps = fields.raw("steps").map(|steps| parse_steps(Some(steps), &format!("{location}.steps"), problems)).unwrap_or_default();
    let sink = match fields.raw("sink") {
        Some(sink) => read_sink(sink, &format!("{location}.sink"), problems),
        None => {
            problems.push(format!("{location}.sink"), "is required");
            None
        }
    };
    fields.finish(problems);
    Some(OutputEntry { name: name.to_string(), from, when, steps, sink: sink?, location })
}

fn read_sink(value: &Yaml, location: &str, problems: &mut ConfigErrors) -> Option<Sink> {
    RawSink::read(Some(value), location, problems).map(|raw| check_sink(raw, location, problems))
}

/// The sink on its own; that `sink.key` names fields of the records is the plan's check.
fn check_sink(raw: RawSink, location: &str, problems: &mut ConfigErrors) -> Sink {
    if raw.topic.as_ref().is_some_and(|topic| topic.trim().is_empty()) {
        problems.push(format!("{location}.topic"), "must name a topic");
    }
    if raw.format == Encoding::String {
        problems.push(format!("{location}.format"), "a sink writes json or avro");
    }
    if raw.key_format == Encoding::String {
        problems.push(format!("{location}.key_format"), "keys are written as json or avro");
    }
    Sink {
        location: location.to_string(),
        topic: raw.topic.unwrap_or_default(),
        encoding: raw.format,
        key: raw.key,
        key_encoding: raw.key_format,
        mode: raw.mode,
        headers: raw.headers,
    }
}

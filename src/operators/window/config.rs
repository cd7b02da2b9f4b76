//! `- window: {...}`: tumbling, hopping and session windows with their aggregates; the
//! config, its checks and the schema of the results.

use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value as Yaml};

use crate::config::{check_duration, check_fields, ConfigErrors, FieldType, Fields, Key, Schema, Section, Shape, Zero};

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

/// Why an aggregate's text is not one (its message becomes a config problem).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AggregateError(pub String);

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

/// As written in the pipeline file: `count()`, `sum(amount)`, ...
impl std::fmt::Display for Aggregate {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let function = match self {
            Aggregate::Count => "count",
            Aggregate::Sum(_) => "sum",
            Aggregate::Avg(_) => "avg",
            Aggregate::Min(_) => "min",
            Aggregate::Max(_) => "max",
            Aggregate::First(_) => "first",
            Aggregate::Last(_) => "last",
            Aggregate::CountDistinct(_) => "count_distinct",
        };
        write!(formatter, "{function}({})", self.field().unwrap_or(""))
    }
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

    /// Reads `function(field)`; None with a problem at `location` when it is not one.
    pub(crate) fn parse(text: &str, location: &str, problems: &mut ConfigErrors) -> Option<Aggregate> {
        let parsed = Self::read(text);
        if let Err(message) = &parsed {
            problems.push(location, message.to_string());
        }
        parsed.ok()
    }

    /// The type of its result over records of `input`: counts are longs, averages doubles,
    /// sums keep a long field's type, and the others the field's.
    pub fn output_type(&self, input: &Schema) -> FieldType {
        match self {
            Aggregate::Count | Aggregate::CountDistinct(_) => FieldType::Long,
            Aggregate::Avg(_) => FieldType::Double,
            Aggregate::Sum(field) => match input.type_or_string(field) {
                FieldType::Long | FieldType::Timestamp => FieldType::Long,
                _ => FieldType::Double,
            },
            Aggregate::Min(field) | Aggregate::Max(field) | Aggregate::First(field) | Aggregate::Last(field) => {
                input.type_or_string(field)
            }
        }
    }

    /// Whether it is a `sum` of whole numbers (a long field) rather than of doubles.
    pub fn sums_whole(&self, input: Option<&Schema>) -> bool {
        match self {
            Aggregate::Sum(field) => {
                matches!(input.and_then(|schema| schema.field_type(field)), Some(FieldType::Long | FieldType::Timestamp))
            }
            _ => false,
        }
    }

    fn read(text: &str) -> Result<Aggregate, AggregateError> {
        let expected = "count(), sum(f), avg(f), min(f), max(f), first(f), last(f) or count_distinct(f)";
        let text = text.trim();
        let Some((function, rest)) = text.split_once('(') else {
            return Err(AggregateError(format!("'{text}' is not an aggregate; use {expected}")));
        };
        let Some(argument) = rest.strip_suffix(')').map(str::trim) else {
            return Err(AggregateError(format!("'{text}' is missing its closing parenthesis")));
        };
        let field = || {
            if argument.is_empty() {
                Err(AggregateError(format!("{function}() needs a field, e.g. {function}(amount)")))
            } else {
                Ok(argument.to_string())
            }
        };
        match function.trim() {
            "count" if argument.is_empty() => Ok(Aggregate::Count),
            "count" => Err(AggregateError("count() takes no field; use count_distinct(field) to count values".into())),
            "sum" => field().map(Aggregate::Sum),
            "avg" => field().map(Aggregate::Avg),
            "min" => field().map(Aggregate::Min),
            "max" => field().map(Aggregate::Max),
            "first" => field().map(Aggregate::First),
            "last" => field().map(Aggregate::Last),
            "count_distinct" => field().map(Aggregate::CountDistinct),
            other => Err(AggregateError(format!("unknown aggregate '{other}'; use {expected}"))),
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

impl Window {
    /// Reads a window step's body.
    pub fn parse(body: &Yaml, input: Option<&Schema>, location: &str, problems: &mut ConfigErrors) -> Option<Window> {
        let location = format!("{location}.window");
        let before = problems.problems.len();
        let window = RawWindow::read(body, &location, problems).and_then(|raw| check_window(raw, input, &location, problems));
        window.filter(|_| problems.problems.len() == before)
    }

    /// The fields of its results: the group_by fields, the window bounds, then the
    /// aggregates in the order written.
    pub fn output_schema(&self, input: &Schema) -> Schema {
        let mut fields = input.select(&self.group_by).fields;
        fields.push(("window_start".into(), FieldType::Timestamp));
        fields.push(("window_end".into(), FieldType::Timestamp));
        for (name, aggregate) in &self.aggregates {
            fields.push((name.clone(), aggregate.output_type(input)));
        }
        Schema { fields }
    }
}

/// The body of a `window` step.
pub const SECTION: Section = Section {
    about: "event-time windowed aggregates per key: tumbling, hopping or session",
    keys: &[
        Key::optional("group_by", Shape::Strings, "the fields forming the key (default: one window for all records)"),
        Key::optional("tumbling", Shape::Duration, "fixed windows of this size"),
        Key::optional("hopping", Shape::Section(&HOPPING), "windows of `size` starting every `slide`"),
        Key::optional("session", Shape::Section(&SESSION), "a key's window ends after a `gap` without records"),
        Key::optional("allowed_lateness", Shape::Duration, "how long after its end a window still takes late records"),
        Key::required("aggregates", Shape::MapOf(&Shape::String), "result field → aggregate, e.g. count(), sum(amount), avg(price)"),
        Key::optional("emit", Shape::OneOf(&["final", "update"]), "final: once, when the window closes; update: at every commit while open (default final)"),
    ],
};

const HOPPING: Section = Section {
    about: "hopping windows",
    keys: &[Key::required("size", Shape::Duration, "each window's length"), Key::required("slide", Shape::Duration, "how often a window starts")],
};

const SESSION: Section = Section {
    about: "session windows",
    keys: &[Key::required("gap", Shape::Duration, "the silence that ends a key's session")],
};

/// A window as written; a key that did not fit is None or its default here, with its
/// problem recorded.
struct RawWindow {
    group_by: Vec<String>,
    tumbling: Option<Duration>,
    hopping: Option<RawHopping>,
    session: Option<RawSession>,
    /// How many of tumbling, hopping and session were written (read or not).
    kinds_written: usize,
    allowed_lateness: Option<Duration>,
    aggregates: Option<Mapping>,
    emit: Option<String>,
}

impl RawWindow {
    fn read(value: &Yaml, location: &str, problems: &mut ConfigErrors) -> Option<RawWindow> {
        let mut fields = Fields::of(value, location, &SECTION, problems)?;
        let kinds_written = ["tumbling", "hopping", "session"].iter().filter(|kind| value.get(**kind).is_some()).count();
        let raw = RawWindow {
            group_by: fields.or_default("group_by", problems),
            tumbling: fields.duration("tumbling", problems),
            hopping: fields.raw("hopping").and_then(|value| RawHopping::read(value, &format!("{location}.hopping"), problems)),
            session: fields.raw("session").and_then(|value| RawSession::read(value, &format!("{location}.session"), problems)),
            kinds_written,
            allowed_lateness: fields.duration("allowed_lateness", problems),
            aggregates: fields.required("aggregates", problems),
            emit: fields.optional("emit", problems),
        };
        fields.finish(problems);
        Some(raw)
    }
}

struct RawHopping {
    size: Duration,
    slide: Duration,
}

impl RawHopping {
    fn read(value: &Yaml, location: &str, problems: &mut ConfigErrors) -> Option<RawHopping> {
        let mut fields = Fields::of(value, location, &HOPPING, problems)?;
        let (size, slide) = (fields.required_duration("size", problems), fields.required_duration("slide", problems));
        let fine = fields.finish(problems);
        let hopping = RawHopping { size: size?, slide: slide? };
        fine.then_some(hopping)
    }
}

struct RawSession {
    gap: Duration,
}

impl RawSession {
    fn read(value: &Yaml, location: &str, problems: &mut ConfigErrors) -> Option<RawSession> {
        let mut fields = Fields::of(value, location, &SESSION, problems)?;
        let gap = fields.required_duration("gap", problems);
        let fine = fields.finish(problems);
        let session = RawSession { gap: gap? };
        fine.then_some(session)
    }
}

/// The most windows one record may fall into (hopping `size / slide`): each is a piece of
/// state and an output per key.
pub const MAX_WINDOWS_PER_RECORD: u128 = 1_000;

fn check_window(raw: RawWindow, input: Option<&Schema>, location: &str, problems: &mut ConfigErrors) -> Option<Window> {
    let before = problems.problems.len();
    check_fields(&raw.group_by, input, &format!("{location}.group_by"), problems);
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
        // A kind that was written but did not read is reported already.
        _ if raw.kinds_written == 1 => None,
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
    let mut reserved: Vec<&str> = raw.group_by.iter().map(String::as_str).collect();
    reserved.extend(["window_start", "window_end"]);
    let aggregates = parse_aggregates(raw.aggregates.as_ref(), &reserved, input, location, problems);
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

/// Reads an `aggregates:` mapping of `name: function(field)` (a window's or an aggregate
/// step's), checking each field against `input` and each name against the `reserved` ones the
/// results already have. Problems go to `<location>.aggregates...`.
pub(crate) fn parse_aggregates(
    written: Option<&Mapping>,
    reserved: &[&str],
    input: Option<&Schema>,
    location: &str,
    problems: &mut ConfigErrors,
) -> Vec<(String, Aggregate)> {
    let before = problems.problems.len();
    let mut aggregates = Vec::new();
    for (name, definition) in written.into_iter().flatten() {
        let (Some(name), Some(definition)) = (name.as_str(), definition.as_str()) else {
            problems.push(format!("{location}.aggregates"), "each aggregate is `name: function(field)`");
            continue;
        };
        let aggregate_location = format!("{location}.aggregates.{name}");
        if reserved.contains(&name) {
            problems.push(&aggregate_location, format!("clashes with a field the results already have ({})", reserved.join(", ")));
        }
        if let Some(aggregate) = Aggregate::parse(definition, &aggregate_location, problems) {
            if let Some(field) = aggregate.field() {
                check_fields(&[field.to_string()], input, &aggregate_location, problems);
                // Sums, means and extremes are over numbers (min and max over text too).
                let numeric = matches!(aggregate, Aggregate::Sum(_) | Aggregate::Avg(_));
                let ordered = matches!(aggregate, Aggregate::Min(_) | Aggregate::Max(_));
                match input.and_then(|schema| schema.field_type(field)) {
                    Some(FieldType::Object(_) | FieldType::Array(_) | FieldType::Boolean) if numeric || ordered => {
                        problems.push(&aggregate_location, format!("'{field}' is not a number; {definition} needs one"))
                    }
                    Some(FieldType::String) if numeric => problems.push(&aggregate_location, format!("'{field}' is text; {definition} needs a number")),
                    _ => {}
                }
            }
            aggregates.push((name.to_string(), aggregate));
        }
    }
    if aggregates.is_empty() && written.is_some() && problems.problems.len() == before {
        problems.push(format!("{location}.aggregates"), "must define at least one aggregate");
    }
    aggregates
}

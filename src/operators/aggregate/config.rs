//! `- aggregate: {group_by: [...], aggregates: {...}, ttl: 30d, on_expire: keep}`: a running,
//! non-windowed aggregate per key; its config, its checks and the schema of its results.

use std::time::Duration;

use serde_yaml_ng::{Mapping, Value as Yaml};

use crate::config::{check_duration, check_fields, ConfigErrors, Fields, Key, Schema, Section, Shape, Zero};

/// The body of an `aggregate` step.
pub const SECTION: Section = Section {
    about: "a running aggregate per key, updated at every commit",
    keys: &[
        Key::required("group_by", Shape::Strings, "the fields forming the key"),
        Key::required("aggregates", Shape::MapOf(&Shape::String), "result field → aggregate, e.g. count(), sum(amount), max(price), last(status)"),
        Key::optional("ttl", Shape::Duration, "a key's state ends when the watermark passes its last event time + ttl"),
        Key::optional("on_expire", Shape::OneOf(&["keep", "tombstone"]), "what downstream sees when a key's state ends (default keep)"),
        Key::optional("emit", Shape::OneOf(&["update"]), "an aggregate emits each changed key's value at every commit"),
    ],
};
use crate::operators::window::config::{parse_aggregates, Aggregate};

#[derive(Debug, Clone, PartialEq)]
pub struct RunningAggregate {
    pub group_by: Vec<String>,
    pub aggregates: Vec<(String, Aggregate)>,
    /// A key's state ends when the watermark passes its last event time + ttl.
    pub ttl: Option<Duration>,
    pub on_expire: OnExpire,
}

/// What downstream sees when a key's state ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExpire {
    /// Nothing more: downstream keeps the last value.
    Keep,
    /// A tombstone (null value) under the key.
    Tombstone,
}

impl RunningAggregate {
    /// Reads an aggregate step's body.
    pub fn parse(body: &Yaml, input: Option<&Schema>, location: &str, problems: &mut ConfigErrors) -> Option<RunningAggregate> {
        let location = format!("{location}.aggregate");
        let before = problems.problems.len();
        let mut fields = Fields::of(body, &location, &SECTION, problems)?;
        let group_by: Option<Vec<String>> = fields.required("group_by", problems);
        let written: Option<Mapping> = fields.required("aggregates", problems);
        let ttl = fields.duration("ttl", problems);
        let on_expire: Option<String> = fields.optional("on_expire", problems);
        let emit: Option<String> = fields.optional("emit", problems);
        fields.finish(problems);
        if let Some(group_by) = &group_by {
            if group_by.is_empty() {
                problems.push(format!("{location}.group_by"), "must name at least one field");
            }
            check_fields(group_by, input, &format!("{location}.group_by"), problems);
        }
        let reserved: Vec<&str> = group_by.iter().flatten().map(String::as_str).collect();
        let aggregates = parse_aggregates(written.as_ref(), &reserved, input, &location, problems);
        if let Some(ttl) = ttl {
            check_duration(ttl, Zero::Refused, &format!("{location}.ttl"), problems);
        }
        let on_expire = match on_expire.as_deref() {
            None | Some("keep") => OnExpire::Keep,
            Some("tombstone") => OnExpire::Tombstone,
            Some(other) => {
                problems.push(format!("{location}.on_expire"), format!("'{other}' is not keep or tombstone"));
                OnExpire::Keep
            }
        };
        if on_expire == OnExpire::Tombstone && ttl.is_none() {
            problems.push(format!("{location}.on_expire"), "a key expires only with a ttl; set ttl or remove on_expire");
        }
        match emit.as_deref() {
            None | Some("update") => {}
            Some(other) => problems.push(
                format!("{location}.emit"),
                format!(
                    "'{other}': an aggregate emits updates only (each changed key's value at every commit); \
                     for results that are final once, use a window"
                ),
            ),
        }
        let aggregate = RunningAggregate { group_by: group_by?, aggregates, ttl, on_expire };
        (problems.problems.len() == before).then_some(aggregate)
    }

    /// The fields of its results: the group_by fields, then the aggregates in the order
    /// written.
    pub fn output_schema(&self, input: &Schema) -> Schema {
        let mut fields = input.select(&self.group_by).fields;
        for (name, aggregate) in &self.aggregates {
            fields.push((name.clone(), aggregate.output_type(input)));
        }
        Schema { fields }
    }
}

#[cfg(test)]
mod tests {
    use crate::plan::parse_pipeline;

    fn problems_of(step: &str, sink: &str) -> Vec<String> {
        let text = format!(
            "name: p\nsources:\n  clicks:\n    topics: [clicks]\n    format: json\n    schema: {{ user: string, page: string, amount: double, ts: long }}\n    \
             event_time: {{ field: ts }}\n    watermark: {{ max_out_of_orderness: 1s }}\nsteps:\n  - aggregate: {step}\nsink: {sink}\n"
        );
        match parse_pipeline(&text) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.problems.iter().map(|problem| format!("{}: {}", problem.location, problem.message)).collect(),
        }
    }

    /// Every wrong key of an aggregate is reported, naming it; a right one plans, keyed by
    /// its group whatever `sink.key` says.
    #[test]
    fn an_aggregate_is_checked_key_by_key() {
        let fine = "{ group_by: [user], aggregates: { n: count(), total: sum(amount) }, ttl: 1h, on_expire: tombstone }";
        assert_eq!(problems_of(fine, "{ topic: out }"), Vec::<String>::new());
        let wrong = "{ group_by: [user, nobody], aggregates: { user: count(), s: sum(page) }, on_expire: tombstone, emit: final, every: 1s }";
        let problems = problems_of(wrong, "{ topic: out }");
        let locations: Vec<&str> = problems.iter().map(|problem| problem.split(':').next().unwrap_or_default()).collect();
        assert_eq!(
            locations,
            [
                "steps[0].aggregate.every",
                "steps[0].aggregate.group_by",
                "steps[0].aggregate.aggregates.user",
                "steps[0].aggregate.aggregates.s",
                "steps[0].aggregate.on_expire",
                "steps[0].aggregate.emit",
            ],
            "{problems:#?}"
        );
        assert!(problems.iter().any(|problem| problem.contains("only with a ttl")), "{problems:#?}");
        let ttl = problems_of("{ group_by: [user], aggregates: { n: count() }, ttl: 0s }", "{ topic: out }");
        assert_eq!(ttl, ["steps[0].aggregate.ttl: must be at least 1ms"]);
        // Its results come from many records, and its updates from where batches end.
        let upsert = problems_of("{ group_by: [user], aggregates: { n: count() } }", "{ topic: out, mode: idempotent_upsert }");
        assert!(upsert.len() == 1 && upsert[0].starts_with("steps[0].aggregate: "), "{upsert:#?}");
        let headers = problems_of("{ group_by: [user], aggregates: { n: count() } }", "{ topic: out, headers: { pass_through: true } }");
        assert!(headers.len() == 1 && headers[0].contains("an aggregate's results"), "{headers:#?}");
        // Without a ttl, no event time is needed.
        let keyed = "name: p\nsources:\n  clicks:\n    topics: [clicks]\n    format: json\n    schema: { user: string, n: long }\n\
                     steps:\n  - aggregate: { group_by: [user], aggregates: { n2: sum(n) } }\nsink: { topic: out, key: [n2] }\n";
        let pipeline = parse_pipeline(keyed).unwrap_or_else(|problems| panic!("{problems}"));
        let key = pipeline.output_key_schema(0).map(|schema| schema.describe());
        assert_eq!(key.as_deref(), Some("{user: string}"));
    }
}

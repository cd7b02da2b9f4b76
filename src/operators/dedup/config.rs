//! `- dedup: {key: [...], within: 10m}`: its config and checks.

use std::time::Duration;

use serde_yaml_ng::Value as Yaml;

use crate::config::{check_duration, check_fields, ConfigErrors, Fields, Key, Schema, Section, Shape, Zero};

/// The body of a `dedup` step.
pub const SECTION: Section = Section {
    about: "drop a record whose key was seen within the time given (event time)",
    keys: &[
        Key::required("key", Shape::Strings, "the fields that make two records the same"),
        Key::required("within", Shape::Duration, "how long (event time) a key is remembered"),
    ],
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dedup {
    pub key: Vec<String>,
    pub within: Duration,
}

impl Dedup {
    /// Reads a dedup step's body: a key of fields the records have, and a `within` of at
    /// least 1ms.
    pub fn parse(body: &Yaml, input: Option<&Schema>, location: &str, problems: &mut ConfigErrors) -> Option<Dedup> {
        let location = format!("{location}.dedup");
        let before = problems.problems.len();
        let mut fields = Fields::of(body, &location, &SECTION, problems)?;
        let key: Option<Vec<String>> = fields.required("key", problems);
        let within = fields.required_duration("within", problems);
        fields.finish(problems);
        if let Some(key) = &key {
            if key.is_empty() {
                problems.push(format!("{location}.key"), "must name at least one field");
            }
            check_fields(key, input, &format!("{location}.key"), problems);
        }
        if let Some(within) = within {
            check_duration(within, Zero::Refused, &format!("{location}.within"), problems);
        }
        let dedup = Dedup { key: key?, within: within? };
        (problems.problems.len() == before).then_some(dedup)
    }
}

//! `- dedup: {key: [...], within: 10m}`: its config and checks.

use std::time::Duration;

use serde_yaml_ng::Value as Yaml;

use crate::config::{check_duration, check_fields, ConfigErrors, Fields, Schema, Zero};

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
        let mut fields = Fields::of(body, &location, problems)?;
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

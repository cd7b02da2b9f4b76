//! `- dedup: {key: [...], within: 10m}`: its config and checks.

use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value as Yaml;

use crate::config::{check_duration, check_fields, section, ConfigErrors, Source, Zero};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dedup {
    pub key: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub within: Duration,
}

impl Dedup {
    /// Reads a dedup step's body: a key of fields the records have, and a `within` of at
    /// least 1ms.
    pub fn parse(body: &Yaml, source: Option<&Source>, location: &str, problems: &mut ConfigErrors) -> Option<Dedup> {
        let location = format!("{location}.dedup");
        let dedup = section::<Dedup>(Some(body), &location, problems)?;
        let before = problems.problems.len();
        if dedup.key.is_empty() {
            problems.push(format!("{location}.key"), "must name at least one field");
        }
        check_fields(&dedup.key, source, &format!("{location}.key"), problems);
        check_duration(dedup.within, Zero::Refused, &format!("{location}.within"), problems);
        (problems.problems.len() == before).then_some(dedup)
    }
}

//! Reading a mapping key by key, so that every wrong key of one struct is reported: serde
//! stops at the first. Each read records its own problem, located at `<mapping>.<key>`, and
//! [`Fields::finish`] reports the keys its section lacks (unknown keys) and whether the mapping was
//! free of problems. The keys a mapping may have are its [`Section`]'s, the one description
//! that `weir schema` prints too.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value as Yaml};

use super::shape::Section;
use super::ConfigErrors;

pub struct Fields<'a> {
    mapping: &'a Mapping,
    location: String,
    section: &'static Section,
    problems_before: usize,
    /// The keys asked for: each of the section's must be (debug builds check), so that a
    /// section never lists a key its reader ignores.
    asked: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    /// The keys of `value` at `location`, which `section` describes; None (with a problem)
    /// when it is not a mapping.
    pub fn of(value: &'a Yaml, location: &str, section: &'static Section, problems: &mut ConfigErrors) -> Option<Fields<'a>> {
        let problems_before = problems.problems.len();
        match value {
            Yaml::Mapping(mapping) => Some(Fields { mapping, location: location.to_string(), section, problems_before, asked: Vec::new() }),
            _ => {
                problems.push(location, "must be a mapping of keys to values");
                None
            }
        }
    }

    /// Where `key` is, for problems about its value.
    pub fn location_of(&self, key: &str) -> String {
        format!("{}.{key}", self.location)
    }

    /// The raw value of `key`, if present.
    pub fn raw(&mut self, key: &'static str) -> Option<&'a Yaml> {
        debug_assert!(self.section.key(key).is_some(), "{}: '{key}' is read but not in its section", self.location);
        self.asked.push(key);
        self.mapping.get(key)
    }

    /// The value of `key`: None when it is absent (no problem) or does not fit (a problem).
    pub fn optional<T: DeserializeOwned>(&mut self, key: &'static str, problems: &mut ConfigErrors) -> Option<T> {
        let value = self.raw(key)?;
        match serde_yaml_ng::from_value(value.clone()) {
            Ok(parsed) => Some(parsed),
            Err(error) => {
                problems.push(self.location_of(key), error.to_string());
                None
            }
        }
    }

    /// The value of `key`, which must be there.
    pub fn required<T: DeserializeOwned>(&mut self, key: &'static str, problems: &mut ConfigErrors) -> Option<T> {
        self.is_there(key, problems).then(|| self.optional(key, problems)).flatten()
    }

    /// Whether `key` is there; a problem when it is not.
    fn is_there(&mut self, key: &'static str, problems: &mut ConfigErrors) -> bool {
        debug_assert!(self.section.key(key).is_some_and(|key| key.required), "{}: '{key}' is required but not so in its section", self.location);
        self.asked.push(key);
        if self.mapping.contains_key(key) {
            return true;
        }
        problems.push(self.location_of(key), "is required");
        false
    }

    /// The value of `key`, or the type's default when it is absent or does not fit (then with
    /// a problem, so the mapping is refused all the same).
    pub fn or_default<T: DeserializeOwned + Default>(&mut self, key: &'static str, problems: &mut ConfigErrors) -> T {
        self.optional(key, problems).unwrap_or_default()
    }

    /// A duration such as `5s` or `10m`, if present and readable.
    pub fn duration(&mut self, key: &'static str, problems: &mut ConfigErrors) -> Option<Duration> {
        let value = self.raw(key)?;
        match value.as_str().map(humantime::parse_duration) {
            Some(Ok(duration)) => Some(duration),
            Some(Err(error)) => {
                problems.push(self.location_of(key), format!("'{}' is not a duration such as 500ms, 5s or 10m ({error})", value.as_str().unwrap_or("")));
                None
            }
            None => {
                problems.push(self.location_of(key), "must be a duration such as 500ms, 5s or 10m");
                None
            }
        }
    }

    /// A duration that must be there.
    pub fn required_duration(&mut self, key: &'static str, problems: &mut ConfigErrors) -> Option<Duration> {
        self.is_there(key, problems).then(|| self.duration(key, problems)).flatten()
    }

    /// Reports every key that was not read, and says whether this mapping had no problem.
    pub fn finish(self, problems: &mut ConfigErrors) -> bool {
        debug_assert!(
            self.section.keys.iter().all(|key| self.asked.contains(&key.name)),
            "{}: a key of its section is never read",
            self.location
        );
        for key in self.mapping.keys() {
            let name = key.as_str().unwrap_or("?");
            if self.section.key(name).is_none() {
                problems.push(format!("{}.{name}", self.location), super::error::unknown("key", name, &self.section.names()));
            }
        }
        problems.problems.len() == self.problems_before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::shape::{Key, Shape};

    const THING: Section = Section {
        about: "",
        keys: &[
            Key::optional("count", Shape::Count, ""),
            Key::optional("every", Shape::Duration, ""),
            Key::required("name", Shape::String, ""),
            Key::required("topic", Shape::String, ""),
        ],
    };

    #[test]
    fn every_wrong_key_of_one_mapping_is_reported() {
        let value: Yaml = serde_yaml_ng::from_str("{ count: many, every: five seconds, extra: 1, name: ok }").unwrap();
        let mut problems = ConfigErrors::default();
        let mut fields = Fields::of(&value, "thing", &THING, &mut problems).unwrap();
        assert_eq!(fields.optional::<u32>("count", &mut problems), None);
        assert_eq!(fields.duration("every", &mut problems), None);
        assert_eq!(fields.required::<String>("name", &mut problems), Some("ok".to_string()));
        assert_eq!(fields.required::<String>("topic", &mut problems), None);
        assert!(!fields.finish(&mut problems));
        let locations: Vec<&str> = problems.problems.iter().map(|problem| problem.location.as_str()).collect();
        assert_eq!(locations, ["thing.count", "thing.every", "thing.topic", "thing.extra"]);
    }
}

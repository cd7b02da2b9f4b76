//! `dedup`: the first record of each key passes; later records with the same key are dropped
//! while the key's state lives, which ends when the watermark reaches the first record's
//! event time + `within` (Spark's dropDuplicatesWithinWatermark).

use std::collections::BTreeSet;

use foldhash::{HashMap, HashMapExt};

use serde_json::{Map, Value};

use super::{CorruptState, Emitted, StepOutcome, ProcessError, Record, StateChange, StateEntryLimit, key_of, quoted_len};
pub mod config;

use config::Dedup;

pub struct DedupOperator {
    key: Vec<String>,
    within: i64,
    /// Key (as JSON text) → event time of its first record. A fast hash with a random
    /// seed per map: keys come from the input, so they must not be able to collide on purpose.
    first_seen: HashMap<String, i64>,
    /// (expiry, key), to evict in watermark order.
    expiries: BTreeSet<(i64, String)>,
    /// Restoring fills `first_seen` alone; `expiries` is then built once, in bulk (sorting
    /// beats a B-tree insert per entry several times over), before it is next used.
    expiries_stale: bool,
    /// Keys added or ended since the last `take_changes`.
    changed: BTreeSet<String>,
    limit: StateEntryLimit,
}

/// A dedup entry's value: the first event time, at most 20 digits.
const TIME_BYTES: usize = 20;

impl DedupOperator {
    pub fn new(spec: &Dedup, limit: StateEntryLimit) -> DedupOperator {
        DedupOperator {
            key: spec.key.clone(),
            within: crate::config::millis(spec.within),
            first_seen: HashMap::new(),
            expiries: BTreeSet::new(),
            expiries_stale: false,
            changed: BTreeSet::new(),
            limit,
        }
    }

    pub fn describe(&self) -> String {
        format!("dedup key [{}] within {}ms", self.key.join(", "), self.within)
    }

    pub fn state_keys(&self) -> usize {
        self.first_seen.len()
    }

    pub fn process<'a>(
        &mut self,
        mut record: Record<'a>,
        watermark: i64,
        out: &mut Vec<Emitted<'a>>,
    ) -> Result<StepOutcome, ProcessError> {
        if record.event_time.saturating_add(self.within) <= watermark {
            return Ok(StepOutcome::Late(format!(
                "event time {} + within {}ms is at or before the watermark {watermark}",
                record.event_time, self.within
            )));
        }
        let key: Map<String, Value> = key_of(&record.fields, &self.key);
        let key_text = Value::Object(key.clone()).to_string();
        if self.first_seen.contains_key(&key_text) {
            return Ok(StepOutcome::Duplicate);
        }
        // Quoting at most doubles the key: only a key near the limit is measured.
        if 2 * key_text.len() + 2 + TIME_BYTES > self.limit.bytes() {
            self.limit.check("dedup", quoted_len(&key_text) + TIME_BYTES)?;
        }
        let expiry = record.event_time.saturating_add(self.within);
        self.rebuild_expiries();
        self.expiries.insert((expiry, key_text.clone()));
        self.changed.insert(key_text.clone());
        self.first_seen.insert(key_text, record.event_time);
        // Its id in upsert mode is this key.
        record.key = Some(key);
        record.id = None;
        out.push(Emitted::Record(record));
        Ok(StepOutcome::Passed)
    }

    /// Forgets the keys whose state ended at this watermark.
    pub fn advance(&mut self, watermark: i64) {
        self.rebuild_expiries();
        while let Some((expiry, _)) = self.expiries.first() {
            if *expiry > watermark {
                break;
            }
            if let Some((_, key)) = self.expiries.pop_first() {
                self.first_seen.remove(&key);
                self.changed.insert(key);
            }
        }
    }

    /// What changed since the last call: (key, first event time, or None once ended).
    pub fn take_changes(&mut self) -> Vec<StateChange> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(|key| {
                let value = self.first_seen.get(&key).map(|time| Value::from(*time));
                StateChange { key, value }
            })
            .collect()
    }

    pub fn restore(&mut self, key: &str, value: Option<&Value>) -> Result<(), CorruptState> {
        self.expiries_stale = true;
        let Some(value) = value else {
            self.first_seen.remove(key);
            return Ok(());
        };
        let time = value.as_i64().ok_or_else(|| CorruptState(format!("dedup state for {key} is not a time: {value}")))?;
        self.first_seen.insert(key.to_string(), time);
        Ok(())
    }

    /// Rebuilds the expiry index from `first_seen` after restores.
    fn rebuild_expiries(&mut self) {
        if std::mem::take(&mut self.expiries_stale) {
            let within = self.within;
            self.expiries = self.first_seen.iter().map(|(key, time)| (time.saturating_add(within), key.clone())).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn record(id: &str, time: i64) -> Record<'static> {
        crate::operators::test_record(serde_json::json!({ "id": id }), time)
    }

    /// A key whose changelog entry the producer could not send goes to `on_error.process`
    /// and leaves the state as it was; the records after it are deduplicated as before.
    #[test]
    fn a_key_too_large_for_the_changelog_is_refused_and_the_state_left_alone() {
        let spec = Dedup { key: vec!["id".into()], within: Duration::from_secs(60) };
        let limit = StateEntryLimit::under_message_max_bytes(2000);
        let mut dedup = DedupOperator::new(&spec, limit);
        let mut out = Vec::new();
        assert_eq!(dedup.process(record("a", 1), i64::MIN, &mut out), Ok(StepOutcome::Passed));
        dedup.take_changes();
        let large = "x".repeat(limit.bytes());
        let refused = dedup.process(record(&large, 2), i64::MIN, &mut out);
        assert!(refused.is_err_and(|error| error.0.contains("dedup state")), "refused");
        assert_eq!((dedup.state_keys(), out.len()), (1, 1), "nothing kept or emitted");
        assert_eq!(dedup.take_changes(), Vec::new(), "no changelog entry");
        // Quotes are escaped once more in the changelog key: a key that fits only before
        // that is refused too.
        let quotes = "\"".repeat(limit.bytes() / 3);
        assert!(dedup.process(record(&quotes, 3), i64::MIN, &mut out).is_err(), "escaped size counts");
        let fitting = "y".repeat(limit.bytes() / 2 - 40);
        assert_eq!(dedup.process(record(&fitting, 4), i64::MIN, &mut out), Ok(StepOutcome::Passed));
        assert_eq!(dedup.process(record("b", 5), i64::MIN, &mut out), Ok(StepOutcome::Passed));
        assert_eq!(dedup.process(record("a", 6), i64::MIN, &mut out), Ok(StepOutcome::Duplicate));
        assert_eq!(dedup.state_keys(), 3);
    }
}

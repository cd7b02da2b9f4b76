//! `dedup`: the first record of each key passes; later records with the same key are dropped
//! while the key's state lives, which ends when the watermark reaches the first record's
//! event time + `within` (Spark's dropDuplicatesWithinWatermark).

use std::collections::BTreeSet;

use foldhash::{HashMap, HashMapExt};

use serde_json::{Map, Value};

use super::{Emitted, Outcome, Record, StateChange, key_of};
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
}

impl DedupOperator {
    pub fn new(spec: &Dedup) -> DedupOperator {
        DedupOperator {
            key: spec.key.clone(),
            within: crate::config::millis(spec.within),
            first_seen: HashMap::new(),
            expiries: BTreeSet::new(),
            expiries_stale: false,
            changed: BTreeSet::new(),
        }
    }

    pub fn describe(&self) -> String {
        format!("dedup key [{}] within {}ms", self.key.join(", "), self.within)
    }

    pub fn state_keys(&self) -> usize {
        self.first_seen.len()
    }

    pub fn process<'a>(&mut self, mut record: Record<'a>, watermark: i64, out: &mut Vec<Emitted<'a>>) -> Outcome {
        if record.event_time.saturating_add(self.within) <= watermark {
            return Outcome::Late(format!(
                "event time {} + within {}ms is at or before the watermark {watermark}",
                record.event_time, self.within
            ));
        }
        let key: Map<String, Value> = key_of(&record.fields, &self.key);
        let key_text = Value::Object(key.clone()).to_string();
        if self.first_seen.contains_key(&key_text) {
            return Outcome::Duplicate;
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
        Outcome::Passed
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

    pub fn restore(&mut self, key: &str, value: Option<&Value>) -> Result<(), String> {
        self.expiries_stale = true;
        let Some(value) = value else {
            self.first_seen.remove(key);
            return Ok(());
        };
        let time = value.as_i64().ok_or_else(|| format!("dedup state for {key} is not a time: {value}"))?;
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

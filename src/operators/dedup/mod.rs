//! `dedup`: the first record of each key passes; later records with the same key are dropped
//! while the key's state lives, which ends when the watermark reaches the first record's
//! event time + `within` (Spark's dropDuplicatesWithinWatermark).
//!
//! With a [`CommittedState`] view (production) the keys of earlier batches are read from the
//! local store and their expiries come from its timers; memory holds only this batch's keys.
//! Without one (`weir test`), every key is kept in memory.
//!
//! In the store, a key's expiry is checked as it is read, and its entry is removed a little
//! later, in bulk: a batch's new keys get one timer per expiry bucket (a 64th of `within`),
//! not one each, which halves the entries a new key costs the store (written, logged,
//! flushed). A key read between its expiry and its removal is absent; if it comes again it
//! starts a new life in the same entry.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use foldhash::fast::RandomState;
use indexmap::IndexMap;

use serde_json::Value;

use super::committed::{CommittedState, StoreTimers, TimerChange, GROUP_MEMBERS};
use super::record_key::key_text_of;
use super::{CorruptState, Emitted, StepOutcome, ProcessError, Record, RecordKey, StateChange, StateEntryLimit, quoted_len};
pub mod config;

use config::Dedup;

pub struct DedupOperator {
    key: Vec<String>,
    within: i64,
    /// Key (as JSON text) → event time of its first record, or None once its state ended. A
    /// fast hash with a random seed per map: keys come from the input, so they must not be
    /// able to collide on purpose. With a committed view, only what this batch changed
    /// (emptied at each `take_changes`, in the order the keys first changed: the changelog's
    /// order, the same in every run whatever the seed); without one, every live key (never
    /// None).
    pending: IndexMap<String, Option<i64>, RandomState>,
    /// The committed state and its timers, when they live in the store.
    committed: Option<StoreTimers>,
    /// (expiry, key) of the keys in `pending`, to evict in watermark order: a heap, whose
    /// push compares once, with its parent, when keys come in event-time order (a B-tree's
    /// insert compares its way down every time).
    expiries: BinaryHeap<Reverse<(i64, String)>>,
    /// Restoring fills `pending` alone; `expiries` is then built once, in bulk (a heap made
    /// from a whole list in linear time), before it is next used.
    expiries_stale: bool,
    /// Keys added or ended since the last `take_changes`, without a committed view (with
    /// one, `pending` holds exactly those).
    changed: BTreeSet<String>,
    limit: StateEntryLimit,
}

/// A dedup entry's value: the first event time, at most 20 digits.
const TIME_BYTES: usize = 20;

/// When the store removes a key whose state ends at `expiry`: at the end of its bucket, a
/// 64th of `within` wide. Each batch's keys get one timer per bucket, so a key's entry
/// outlives its expiry by less than a bucket; whether a key is live is checked against the
/// watermark as it is read, so what passes does not depend on when it is removed.
fn removal_in_store(within: i64, expiry: i64) -> i64 {
    let bucket = (within / 64).max(1);
    match expiry.rem_euclid(bucket) {
        0 => expiry,
        past => expiry.saturating_add(bucket - past),
    }
}

impl DedupOperator {
    pub fn new(spec: &Dedup, limit: StateEntryLimit) -> DedupOperator {
        DedupOperator {
            key: spec.key.clone(),
            within: crate::config::millis(spec.within),
            pending: IndexMap::default(),
            committed: None,
            expiries: BinaryHeap::new(),
            expiries_stale: false,
            changed: BTreeSet::new(),
            limit,
        }
    }

    /// Reads earlier batches' state through `view` from now on (call before the first
    /// record).
    pub fn read_through(&mut self, view: Box<dyn CommittedState>) {
        self.committed = Some(StoreTimers::new(view));
    }

    /// When the state of a key first seen at `time` ends.
    pub fn expiry(within: i64, time: i64) -> i64 {
        time.saturating_add(within)
    }

    pub fn describe(&self) -> String {
        format!("dedup key [{}] within {}ms", self.key.join(", "), self.within)
    }

    /// Keys held in memory: all of them without a committed view, this batch's with one
    /// (the store estimates the rest).
    pub fn state_keys(&self) -> usize {
        self.pending.values().filter(|time| time.is_some()).count()
    }

    /// When the state of a key that ends at `expiry` is removed: at once in memory, at the
    /// end of its bucket in the store ([`removal_in_store`]).
    fn removal(&self, expiry: i64) -> i64 {
        match self.committed {
            Some(_) => removal_in_store(self.within, expiry),
            None => expiry,
        }
    }

    /// The first event time of a key's state, live or ended but not yet removed.
    fn stored(&self, key: &str) -> Option<i64> {
        if let Some(time) = self.pending.get(key) {
            return *time;
        }
        let bytes = self.committed.as_ref()?.get(key)?;
        // A value that is not a time was refused when it was restored or written; read as
        // absent, the key passes once more rather than blocking every later record.
        std::str::from_utf8(&bytes).ok()?.trim().parse().ok()
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
        let key_text = key_text_of(&record.fields, &self.key);
        let stored = self.stored(&key_text);
        if stored.is_some_and(|time| Self::expiry(self.within, time) > watermark) {
            return Ok(StepOutcome::Duplicate);
        }
        // Quoting at most doubles the key: only a key near the limit is measured.
        if 2 * key_text.len() + 2 + TIME_BYTES > self.limit.bytes() {
            self.limit.check("dedup", quoted_len(&key_text) + TIME_BYTES)?;
        }
        let expiry = Self::expiry(self.within, record.event_time);
        self.rebuild_expiries();
        self.expiries.push(Reverse((expiry, key_text.clone())));
        match &mut self.committed {
            // A key whose state ended and is not yet removed is counted still.
            Some(committed) if stored.is_none() => committed.count(1),
            Some(_) => {}
            None => {
                self.changed.insert(key_text.clone());
            }
        }
        self.pending.insert(key_text.clone(), Some(record.event_time));
        // Its id in upsert mode is this key.
        record.key = Some(Box::new(RecordKey::Text(key_text)));
        record.id = None;
        out.push(Emitted::Record(record));
        Ok(StepOutcome::Passed)
    }

    /// Forgets the keys whose state ended at this watermark.
    pub fn advance(&mut self, watermark: i64) {
        self.rebuild_expiries();
        while let Some(Reverse((expiry, _))) = self.expiries.peek() {
            if self.removal(*expiry) > watermark {
                break;
            }
            if let Some(Reverse((expiry, key))) = self.expiries.pop() {
                self.end(expiry, key);
            }
        }
        let Some(committed) = &mut self.committed else { return };
        for (time, key) in committed.due(watermark) {
            self.end(time, key);
        }
    }

    /// Removes a key's state for a timer at `expiry`, unless the timer is stale (the key ended
    /// and came back since, with another expiry).
    fn end(&mut self, expiry: i64, key: String) {
        if self.stored(&key).map(|time| Self::expiry(self.within, time)) != Some(expiry) {
            return;
        }
        match &mut self.committed {
            Some(committed) => {
                committed.count(-1);
                self.pending.insert(key, None);
            }
            None => {
                self.pending.swap_remove(&key);
                self.changed.insert(key);
            }
        }
    }

    /// What changed since the last call: (key, first event time, or None once ended). With a
    /// committed view, the batch's memory is handed over here: the store holds it once the
    /// batch commits, and a batch that fails drops this task.
    pub fn take_changes(&mut self) -> Vec<StateChange> {
        let Some(committed) = &mut self.committed else {
            return std::mem::take(&mut self.changed)
                .into_iter()
                .map(|key| {
                    let value = self.pending.get(&key).copied().flatten().map(Value::from);
                    StateChange { key, value }
                })
                .collect();
        };
        let changes = self.pending.drain(..).map(|(key, time)| StateChange { key, value: time.map(Value::from) }).collect();
        // The batch's keys by the bucket their removal falls in: one group timer each.
        let mut groups: BTreeMap<i64, Vec<(i64, String)>> = BTreeMap::new();
        for Reverse((expiry, key)) in std::mem::take(&mut self.expiries).into_vec() {
            let removal = removal_in_store(self.within, expiry);
            let members = groups.entry(removal).or_default();
            members.push((expiry, key));
            if members.len() == GROUP_MEMBERS {
                committed.set_group(removal, &std::mem::take(members));
            }
        }
        for (removal, members) in groups {
            committed.set_group(removal, &members);
        }
        committed.clear_fired();
        changes
    }

    /// The timers set and cleared since the last call (with a committed view only).
    pub fn take_timers(&mut self) -> Vec<TimerChange> {
        self.committed.as_mut().map(StoreTimers::take_timers).unwrap_or_default()
    }

    /// Keys added less keys ended since the last call (with a committed view only).
    pub fn take_key_delta(&mut self) -> i64 {
        self.committed.as_mut().map_or(0, StoreTimers::take_key_delta)
    }

    pub fn restore(&mut self, key: &str, value: Option<&Value>) -> Result<(), CorruptState> {
        self.expiries_stale = true;
        let Some(value) = value else {
            self.pending.swap_remove(key);
            return Ok(());
        };
        let time = value.as_i64().ok_or_else(|| CorruptState(format!("dedup state for {key} is not a time: {value}")))?;
        self.pending.insert(key.to_string(), Some(time));
        Ok(())
    }

    /// Rebuilds the expiry index from `pending` after restores.
    fn rebuild_expiries(&mut self) {
        if std::mem::take(&mut self.expiries_stale) {
            let within = self.within;
            self.expiries = self
                .pending
                .iter()
                .filter_map(|(key, time)| Some(Reverse((Self::expiry(within, (*time)?), key.clone()))))
                .collect();
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

//! `aggregate`: a running aggregate per group, without windows (Spark's `groupBy().agg()` in
//! update mode, Kafka Streams' `groupByKey().aggregate()`).
//!
//! Each record adds to its group's aggregates; at each commit the current value of every
//! group changed since the last one is emitted, keyed by the group. With a `ttl`, a group's
//! state ends when the watermark passes its last event time + ttl: a value not yet emitted is
//! emitted then, followed by a tombstone under `on_expire: tombstone`; a later record of the
//! group starts it afresh. A record whose event time + ttl is at or before the watermark would
//! start state that has ended already: it is late. So which records share a group's state
//! follows the watermark, as for dedup, and the last value per group does not depend on where
//! batches end.

use std::collections::{BTreeSet, HashMap};

use serde_json::{Map, Value};

use super::committed::{CommittedState, StoreTimers, TimerChange};
use super::window::aggregates::{accumulate, growth_bound, initial, AggregateState, Sequence};
use super::window::config::Aggregate;
use super::window::NUMBERS_RESERVE;
use super::record_key::key_text_of;
use super::{json_len, key_of, quoted_len, CorruptState, RecordKey, Emitted, ProcessError, Record, StateChange, StateEntryLimit, StepOutcome};
use crate::config::Schema;
pub mod config;

use config::{OnExpire, RunningAggregate};

pub struct AggregateOperator {
    group_by: Vec<String>,
    aggregates: Vec<(String, Aggregate)>,
    /// Whether each `sum` adds whole numbers (a long field) or doubles.
    sums_whole: Vec<bool>,
    ttl: Option<i64>,
    on_expire: OnExpire,
    /// Group (JSON text) → its state. Without a committed view, every live group; with one,
    /// the groups this batch read or changed (emptied at each `take_changes`), None for a
    /// group that has no state (never had, or ended in this batch).
    groups: HashMap<String, Held>,
    /// The committed state and its timers, when they live in the store.
    committed: Option<StoreTimers>,
    /// Whether the committed sequence has been read (with a committed view).
    sequence_read: bool,
    /// (last event time + ttl, group): the groups of `groups` in the order the watermark ends
    /// them (with a ttl). The committed groups' are the store's timers.
    expiries: BTreeSet<(i64, String)>,
    /// Groups changed since the last commit, to emit then (sorted: a stable output order).
    changed: BTreeSet<String>,
    /// Groups changed or ended since the last `take_changes`.
    dirty: BTreeSet<String>,
    sequence: Sequence,
    limit: StateEntryLimit,
}

/// A group in memory: its state, and the expiry its committed state has a store timer for.
struct Held {
    state: Option<GroupState>,
    stored_timer: Option<i64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct GroupState {
    group: Map<String, Value>,
    aggregates: Vec<AggregateState>,
    /// The largest event time added: the results' event time, and where the ttl counts from.
    last: i64,
    /// A running estimate of its changelog entry's size, at or above the real one (None
    /// until measured: after a restore).
    #[serde(skip)]
    bytes: Option<usize>,
}

/// The part of a committed group's entry its timer follows from.
#[derive(serde::Deserialize)]
struct LastSeen {
    last: i64,
}

impl AggregateOperator {
    pub fn new(spec: &RunningAggregate, schema: Option<&Schema>, limit: StateEntryLimit) -> AggregateOperator {
        AggregateOperator {
            group_by: spec.group_by.clone(),
            aggregates: spec.aggregates.clone(),
            sums_whole: spec.aggregates.iter().map(|(_, aggregate)| aggregate.sums_whole(schema)).collect(),
            ttl: spec.ttl.map(crate::config::millis),
            on_expire: spec.on_expire,
            groups: HashMap::new(),
            committed: None,
            sequence_read: false,
            expiries: BTreeSet::new(),
            changed: BTreeSet::new(),
            dirty: BTreeSet::new(),
            sequence: Sequence::default(),
            limit,
        }
    }

    /// Reads earlier batches' state through `view` from now on (call before the first
    /// record).
    pub fn read_through(&mut self, view: Box<dyn CommittedState>) {
        self.committed = Some(StoreTimers::new(view));
    }

    /// The store timer a committed entry needs (its value as JSON text): when a group's state
    /// ends, with a ttl. None without one, or for the sequence entry.
    pub fn timer_of(spec: &RunningAggregate, value: &[u8]) -> Option<i64> {
        let ttl = crate::config::millis(spec.ttl?);
        let seen: LastSeen = serde_json::from_slice(value).ok()?;
        Some(seen.last.saturating_add(ttl))
    }

    pub fn describe(&self) -> String {
        let aggregates: Vec<String> = self.aggregates.iter().map(|(name, aggregate)| format!("{name}={aggregate}")).collect();
        let ttl = match (self.ttl, self.on_expire) {
            (None, _) => "no ttl".to_string(),
            (Some(ttl), OnExpire::Keep) => format!("ttl {ttl}ms"),
            (Some(ttl), OnExpire::Tombstone) => format!("ttl {ttl}ms then a tombstone"),
        };
        format!("aggregate by [{}], {ttl}, emit update: {}", self.group_by.join(", "), aggregates.join(", "))
    }

    /// Groups held in memory: all of them without a committed view, this batch's with one
    /// (the store estimates the rest).
    pub fn state_keys(&self) -> usize {
        self.groups.values().filter(|held| held.state.is_some()).count()
    }

    /// Brings a committed group into memory, if it is not there and there is one. A value
    /// that does not read as this step's state (refused when it was restored or written) is
    /// read as absent: the group starts afresh rather than failing every later record.
    fn load(&mut self, group_text: &str) {
        if self.groups.contains_key(group_text) {
            return;
        }
        let Some(committed) = &self.committed else { return };
        let state = committed
            .get(group_text)
            .and_then(|bytes| serde_json::from_slice::<GroupState>(&bytes).ok())
            .filter(|state| state.aggregates.len() == self.aggregates.len());
        let stored_timer = self.ttl.zip(state.as_ref()).map(|(ttl, state)| state.last.saturating_add(ttl));
        self.groups.insert(group_text.to_string(), Held { state, stored_timer });
    }

    fn state_mut(&mut self, group_text: &str) -> Option<&mut GroupState> {
        self.groups.get_mut(group_text)?.state.as_mut()
    }

    /// Adds a record to its group. One that would make the group's changelog entry larger
    /// than the limit is refused, and the group left as it was.
    pub fn process<'a>(&mut self, record: Record<'a>, watermark: i64, _out: &mut Vec<Emitted<'a>>) -> Result<StepOutcome, ProcessError> {
        let time = record.event_time;
        if let Some(ttl) = self.ttl
            && time.saturating_add(ttl) <= watermark
        {
            return Ok(StepOutcome::Late(format!("event time {time} + ttl {ttl}ms is at or before the watermark {watermark}")));
        }
        if let (Some(committed), false) = (&self.committed, self.sequence_read) {
            self.sequence.read_committed(committed.view());
            self.sequence_read = true;
        }
        // The group's text, written from the fields: its map is made only for a new group.
        let group_text = key_text_of(&record.fields, &self.group_by);
        self.load(&group_text);
        self.check_size(&group_text, &record)?;
        let sequence = self.sequence.next();
        let held = self.groups.entry(group_text.clone()).or_insert(Held { state: None, stored_timer: None });
        if let (Some(committed), true) = (&mut self.committed, held.state.is_none()) {
            committed.count(1);
        }
        let state = held.state.get_or_insert_with(|| GroupState {
            aggregates: initial(&self.aggregates, &self.sums_whole),
            last: i64::MIN,
            bytes: None,
            group: key_of(&record.fields, &self.group_by),
        });
        let before = estimate(state, &group_text, self.aggregates.len());
        let growth = accumulate(&mut state.aggregates, &self.aggregates, &record, sequence);
        state.bytes = Some(before.saturating_add_signed(growth));
        if time > state.last {
            if let Some(ttl) = self.ttl {
                self.expiries.remove(&(state.last.saturating_add(ttl), group_text.clone()));
                self.expiries.insert((time.saturating_add(ttl), group_text.clone()));
            }
            state.last = time;
        }
        self.dirty.insert(group_text.clone());
        self.changed.insert(group_text);
        Ok(StepOutcome::Passed)
    }

    /// Refuses a record that would take its group's entry over the limit: by the running
    /// estimate where that leaves room, else by measuring the state the record would make.
    fn check_size(&mut self, group_text: &str, record: &Record<'_>) -> Result<(), ProcessError> {
        let growth = growth_bound(&self.aggregates, record);
        let aggregates = self.aggregates.len();
        let current = match self.state_mut(group_text) {
            Some(state) => estimate(state, group_text, aggregates),
            None => 4 * group_text.len() + 100 + aggregates * (NUMBERS_RESERVE + 32),
        };
        if current.saturating_add(growth) <= self.limit.bytes() {
            return Ok(());
        }
        let mut trial = match self.groups.get(group_text).and_then(|held| held.state.as_ref()) {
            Some(state) => GroupState { group: state.group.clone(), aggregates: state.aggregates.clone(), last: state.last, bytes: None },
            None => GroupState { group: key_of(&record.fields, &self.group_by), aggregates: initial(&self.aggregates, &self.sums_whole), last: i64::MIN, bytes: None },
        };
        accumulate(&mut trial.aggregates, &self.aggregates, record, self.sequence.peek());
        self.limit.check("aggregate", measure(&trial, group_text))
    }

    /// Ends the groups whose ttl the watermark passed, in (expiry, group) order, whether their
    /// state is in memory or in the store. The end of a bounded input (`weir test`, whose
    /// watermark then reaches +infinity; real event times end in year 9999) ends none: a
    /// running aggregate has no last word to say.
    pub fn advance<'a>(&mut self, watermark: i64, out: &mut Vec<Emitted<'a>>) {
        if watermark == i64::MAX || self.ttl.is_none() {
            return;
        }
        let mut due = Vec::new();
        while self.expiries.first().is_some_and(|(expiry, _)| *expiry <= watermark) {
            due.extend(self.expiries.pop_first());
        }
        if let Some(committed) = &mut self.committed {
            let fired = committed.due(watermark);
            if !fired.is_empty() {
                due.extend(fired);
                due.sort();
            }
        }
        for (expiry, group_text) in due {
            self.end(expiry, group_text, out);
        }
    }

    /// Ends a group's state for a timer at `expiry`, unless the timer is stale (the group
    /// moved on since). A value not emitted yet is emitted before the group ends, so that
    /// what downstream last sees does not depend on where the batch ended.
    fn end<'a>(&mut self, expiry: i64, group_text: String, out: &mut Vec<Emitted<'a>>) {
        self.load(&group_text);
        let ttl = self.ttl.unwrap_or(i64::MAX);
        let Some(held) = self.groups.get_mut(&group_text) else { return };
        if held.state.as_ref().map(|state| state.last.saturating_add(ttl)) != Some(expiry) {
            return;
        }
        let state = match self.committed {
            Some(_) => held.state.take(),
            None => self.groups.remove(&group_text).and_then(|held| held.state),
        };
        let Some(state) = state else { return };
        if let Some(committed) = &mut self.committed {
            committed.count(-1);
        }
        if self.changed.remove(&group_text) {
            out.push(Emitted::Record(self.result(&state)));
        }
        self.dirty.insert(group_text);
        if self.on_expire == OnExpire::Tombstone {
            out.push(Emitted::Tombstone(state.group));
        }
    }

    /// The current value of every group changed since the last commit.
    pub fn commit<'a>(&mut self, out: &mut Vec<Emitted<'a>>) {
        for group_text in std::mem::take(&mut self.changed) {
            if let Some(state) = self.groups.get(&group_text).and_then(|held| held.state.as_ref()) {
                out.push(Emitted::Record(self.result(state)));
            }
        }
    }

    fn result(&self, state: &GroupState) -> Record<'static> {
        let mut fields = Map::with_capacity(self.group_by.len() + self.aggregates.len());
        for field in &self.group_by {
            fields.insert(field.clone(), state.group.get(field).cloned().unwrap_or(Value::Null));
        }
        for ((name, _), aggregate) in self.aggregates.iter().zip(&state.aggregates) {
            fields.insert(name.clone(), aggregate.value());
        }
        Record { fields, event_time: state.last, provenance: None, key: Some(Box::new(RecordKey::Fields(state.group.clone()))), upsert: true, id: None }
    }

    /// What changed since the last call, as changelog entries: each group under its key
    /// (None once ended), and the processing sequence. Called after `commit`. With a
    /// committed view, the batch's memory is handed over here, with the timers its changes
    /// move: the store holds them once the batch commits, and a batch that fails drops this
    /// task.
    pub fn take_changes(&mut self) -> Vec<StateChange> {
        let mut changes = Vec::with_capacity(self.dirty.len() + 1);
        for group_text in std::mem::take(&mut self.dirty) {
            let value = self.state_mut(&group_text).map(|state| serde_json::to_value(&*state).unwrap_or(Value::Null));
            changes.push(StateChange { key: group_text, value });
        }
        changes.extend(self.sequence.take_change());
        if let Some(committed) = &mut self.committed {
            self.expiries.clear();
            // Cleared first: a timer both fired and set again stays set.
            committed.clear_fired();
            for (key, held) in self.groups.drain() {
                let Some(ttl) = self.ttl else { continue };
                let timer = held.state.map(|state| state.last.saturating_add(ttl));
                if timer == held.stored_timer {
                    continue;
                }
                if let Some(time) = held.stored_timer {
                    committed.clear(time, key.clone());
                }
                if let Some(time) = timer {
                    committed.set(time, key);
                }
            }
        }
        changes
    }

    /// The timers set and cleared since the last call (with a committed view only).
    pub fn take_timers(&mut self) -> Vec<TimerChange> {
        self.committed.as_mut().map(StoreTimers::take_timers).unwrap_or_default()
    }

    /// Groups started less groups ended since the last call (with a committed view only).
    pub fn take_key_delta(&mut self) -> i64 {
        self.committed.as_mut().map_or(0, StoreTimers::take_key_delta)
    }

    pub fn restore(&mut self, key: &str, value: Option<&Value>) -> Result<(), CorruptState> {
        if self.sequence.restore(key, value) {
            return Ok(());
        }
        if let Some(old) = self.groups.remove(key).and_then(|held| held.state)
            && let Some(ttl) = self.ttl
        {
            self.expiries.remove(&(old.last.saturating_add(ttl), key.to_string()));
        }
        let Some(value) = value else {
            return Ok(());
        };
        let state: GroupState =
            serde_json::from_value(value.clone()).map_err(|error| CorruptState(format!("aggregate state {key}: {error}")))?;
        if state.aggregates.len() != self.aggregates.len() {
            return Err(CorruptState(format!(
                "aggregate state {key} has {} aggregates, the step {}",
                state.aggregates.len(),
                self.aggregates.len()
            )));
        }
        if let Some(ttl) = self.ttl {
            self.expiries.insert((state.last.saturating_add(ttl), key.to_string()));
        }
        self.groups.insert(key.to_string(), Held { state: Some(state), stored_timer: None });
        Ok(())
    }
}

/// A group's changelog entry size as `take_changes` writes it: the group text quoted as the
/// state key, and the state with the group in it. Writes the state out (counted, not kept).
fn measure(state: &GroupState, group_text: &str) -> usize {
    quoted_len(group_text) + json_len(state)
}

/// The group's running estimate, measured (with room for its numbers to grow) if unknown.
fn estimate(state: &mut GroupState, group_text: &str, aggregates: usize) -> usize {
    let bytes = state.bytes.unwrap_or_else(|| measure(state, group_text) + aggregates * NUMBERS_RESERVE);
    state.bytes = Some(bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spec(ttl: Option<u64>, on_expire: OnExpire) -> RunningAggregate {
        RunningAggregate {
            group_by: vec!["user".into()],
            aggregates: vec![
                ("n".into(), Aggregate::Count),
                ("tags".into(), Aggregate::CountDistinct("tag".into())),
                ("last".into(), Aggregate::Last("tag".into())),
            ],
            ttl: ttl.map(Duration::from_millis),
            on_expire,
        }
    }

    fn record(user: &str, tag: &str, time: i64) -> Record<'static> {
        crate::operators::test_record(serde_json::json!({ "user": user, "tag": tag }), time)
    }

    /// (user, n, last) of each result, or (user, null, null) for a tombstone.
    fn shown(out: &[Emitted<'_>]) -> Vec<(Value, Value, Value)> {
        out.iter()
            .filter_map(|item| match item {
                Emitted::Record(record) => {
                    Some((record.fields["user"].clone(), record.fields["n"].clone(), record.fields["last"].clone()))
                }
                Emitted::Tombstone(key) => Some((key["user"].clone(), Value::Null, Value::Null)),
                Emitted::Forward(_) => None,
            })
            .collect()
    }

    /// A step restored from its changelog entries in the middle of the input goes on as the
    /// one that never stopped: same results, same state (the processing order included, so
    /// `last` breaks an event-time tie the same way).
    #[test]
    fn a_restored_aggregate_goes_on_as_if_it_never_stopped() {
        let input = [("a", "x", 10), ("b", "y", 10), ("a", "z", 20), ("a", "w", 20), ("b", "y", 5), ("a", "v", 15)];
        let run = |stop_at: Option<usize>| {
            let mut operator = AggregateOperator::new(&spec(None, OnExpire::Keep), None, StateEntryLimit::default());
            let mut changelog: Vec<StateChange> = Vec::new();
            let mut out = Vec::new();
            for (index, (user, tag, time)) in input.iter().enumerate() {
                if stop_at == Some(index) {
                    operator = AggregateOperator::new(&spec(None, OnExpire::Keep), None, StateEntryLimit::default());
                    for change in &changelog {
                        operator.restore(&change.key, change.value.as_ref()).unwrap();
                    }
                }
                operator.process(record(user, tag, *time), i64::MIN, &mut out).unwrap();
                operator.commit(&mut out);
                changelog.extend(operator.take_changes());
            }
            shown(&out)
        };
        let whole = run(None);
        assert_eq!(whole.last(), Some(&("a".into(), 4.into(), "w".into())), "ties go to the later record: {whole:?}");
        for stop in 1..input.len() {
            assert_eq!(run(Some(stop)), whole, "restored before record {stop}");
        }
    }

    /// With a ttl, a group ends when the watermark passes its last event time + ttl: its
    /// unsent value goes out first, then (on_expire: tombstone) a tombstone; a record that
    /// would start state already ended is late; a later record starts the group afresh; the
    /// end of a bounded input ends nothing.
    #[test]
    fn a_group_ends_with_its_ttl_and_starts_afresh() {
        for on_expire in [OnExpire::Keep, OnExpire::Tombstone] {
            let mut operator = AggregateOperator::new(&spec(Some(100), on_expire), None, StateEntryLimit::default());
            let mut out = Vec::new();
            operator.process(record("a", "x", 10), i64::MIN, &mut out).unwrap();
            operator.process(record("a", "y", 50), 10, &mut out).unwrap();
            operator.advance(149, &mut out);
            assert!(out.is_empty(), "{on_expire:?}: 50 + 100 is after 149");
            operator.advance(150, &mut out);
            let mut expected = vec![("a".into(), 2.into(), "y".into())];
            if on_expire == OnExpire::Tombstone {
                expected.push(("a".into(), Value::Null, Value::Null));
            }
            assert_eq!(shown(&out), expected, "{on_expire:?}");
            assert_eq!(operator.state_keys(), 0);
            let late = operator.process(record("a", "z", 50), 150, &mut out);
            assert!(matches!(late, Ok(StepOutcome::Late(_))), "{on_expire:?}: {late:?}");
            out.clear();
            operator.process(record("a", "z", 151), 150, &mut out).unwrap();
            operator.advance(i64::MAX, &mut out);
            operator.commit(&mut out);
            assert_eq!(shown(&out), [("a".into(), 1.into(), "z".into())], "{on_expire:?}: afresh, and not ended by the end");
        }
    }

    /// A group whose changelog entry would outgrow what the producer can send refuses the
    /// record that would do it and keeps its state as it was.
    #[test]
    fn a_record_that_would_make_a_group_too_large_is_refused() {
        let limit = StateEntryLimit::under_message_max_bytes(5000);
        let mut operator = AggregateOperator::new(&spec(None, OnExpire::Keep), None, limit);
        let mut out = Vec::new();
        let tag = |index: usize| format!("{index:04}{}", "t".repeat(600));
        let refused_at = (0..10).find(|index| operator.process(record("u", &tag(*index), 1), i64::MIN, &mut out).is_err());
        assert!(refused_at.is_some_and(|index| index >= 2), "{refused_at:?}");
        for change in operator.take_changes() {
            let size = quoted_len(&change.key) + change.value.map_or(0, |value| value.to_string().len());
            assert!(size <= limit.bytes(), "an entry of {size} bytes");
        }
        operator.process(record("u", "a", 2), i64::MIN, &mut out).unwrap();
        operator.commit(&mut out);
        let kept = refused_at.unwrap_or(0) as i64;
        assert_eq!(shown(&out), [("u".into(), (kept + 1).into(), "a".into())]);
    }
}

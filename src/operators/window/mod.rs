//! `window`: event-time aggregates per group over tumbling, hopping or session windows.
//!
//! Tumbling windows are `[start, start + size)` aligned to the epoch; hopping windows of `size`
//! start every `slide`; a record's session window is `[t, t + gap)` and overlapping sessions of
//! a group merge. A (record, window) pair is dropped when the window's end + allowed lateness is
//! at or before the watermark; a record dropped from all its windows is late.
//! `emit: final` emits each window once, when the watermark reaches its end + allowed lateness,
//! then forgets it. `emit: update` emits, at each commit, every window that changed since the
//! last one, keyed `{group fields..., window_start}`; a session merged away gets a tombstone.
//!
//! With a committed view (production), windows live in the local store (see [`stored`]);
//! without one (`weir test`), every window is in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde_json::{Map, Value};

use super::event_time::field_at;
use super::committed::StoreTimers;
use super::record_key::key_text_of;
use super::{CorruptState, Emitted, StepOutcome, ProcessError, Record, RecordKey, StateChange, StateEntryLimit, json_len, key_of, quoted_len};
pub mod config;
mod stored;

pub(crate) mod aggregates;
use aggregates::*;
use config::{Aggregate, EmitMode, Window, WindowKind};
use crate::config::Schema;

pub struct WindowOperator {
    group_by: Vec<String>,
    kind: WindowKind,
    lateness: i64,
    aggregates: Vec<(String, Aggregate)>,
    /// Whether each `sum` adds whole numbers (a long field) or doubles.
    sums_whole: Vec<bool>,
    emit: EmitMode,
    /// Group (JSON text) → window start → window. With a committed view, the windows this
    /// batch read or made (emptied at each `take_changes`).
    groups: HashMap<String, Group>,
    /// (close time = end + lateness, group, start): the windows of `groups` not yet committed,
    /// in the order the watermark closes them (the committed ones close by store timers).
    closing: BTreeSet<(i64, String, i64)>,
    /// The committed windows and their timers, when they live in the store, and whether the
    /// committed sequence has been read from it.
    committed: Option<StoreTimers>,
    sequence_read: bool,
    /// Sessions: the groups whose committed sessions this batch has read in.
    scanned: HashSet<String>,
    /// Windows changed since the last commit (update mode), in a stable order.
    changed: BTreeSet<(String, i64)>,
    /// Sessions merged away since the last commit that had been emitted: (group, start).
    merged_away: Vec<(Map<String, Value>, i64)>,
    sequence: Sequence,
    /// Windows added, updated or closed since the last `take_changes` (a window is listed
    /// once while it lives, by its `dirty` flag; closed ones may repeat).
    dirty: Vec<(String, i64)>,
    limit: StateEntryLimit,
}

/// What an aggregate's entry may grow by besides the values it keeps: counts, sums and the
/// event time and sequence of first/last, as digits. Reserved in every window's estimate.
pub(crate) const NUMBERS_RESERVE: usize = 48;


struct Group {
    key: Map<String, Value>,
    windows: BTreeMap<i64, WindowState>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct WindowState {
    end: i64,
    aggregates: Vec<AggregateState>,
    /// Emitted at least once (update mode): merging it away needs a tombstone.
    emitted: bool,
    /// Listed in `dirty` since the last `take_changes`.
    #[serde(skip)]
    dirty: bool,
    /// A running estimate of its changelog entry's size, at or above the real one: measured
    /// when the window is made or first touched after a restore (None until then), then
    /// moved by what each record adds, so records are not measured against the whole state.
    #[serde(skip)]
    bytes: Option<usize>,
    /// Read from the store: committed, with a store timer at its close.
    #[serde(skip)]
    stored: bool,
}

/// Lists a live window as changed, once per `take_changes`.
fn mark(dirty: &mut Vec<(String, i64)>, window: &mut WindowState, group_text: &str, start: i64) {
    if !window.dirty {
        window.dirty = true;
        dirty.push((group_text.to_string(), start));
    }
}

/// A record about to be added to one or more of its group's windows, for the size checks.
#[derive(Clone, Copy)]
struct Addition<'a, 'r> {
    group_text: &'a str,
    record: &'a Record<'r>,
    sequence: u64,
    /// At most how much the record makes a window's state grow (`growth_bound`).
    growth: usize,
}

impl WindowOperator {
    pub fn new(spec: &Window, schema: Option<&Schema>, limit: StateEntryLimit) -> WindowOperator {
        let sums_whole = spec.aggregates.iter().map(|(_, aggregate)| aggregate.sums_whole(schema)).collect();
        WindowOperator {
            group_by: spec.group_by.clone(),
            kind: spec.kind,
            lateness: crate::config::millis(spec.allowed_lateness),
            aggregates: spec.aggregates.clone(),
            sums_whole,
            emit: spec.emit,
            groups: HashMap::new(),
            closing: BTreeSet::new(),
            committed: None,
            sequence_read: false,
            scanned: HashSet::new(),
            changed: BTreeSet::new(),
            merged_away: Vec::new(),
            sequence: Sequence::default(),
            dirty: Vec::new(),
            limit,
        }
    }

    pub fn describe(&self) -> String {
        let kind = match self.kind {
            WindowKind::Tumbling { size } => format!("tumbling {}ms", size.as_millis()),
            WindowKind::Hopping { size, slide } => format!("hopping {}ms every {}ms", size.as_millis(), slide.as_millis()),
            WindowKind::Session { gap } => format!("session gap {}ms", gap.as_millis()),
        };
        let aggregates: Vec<String> = self.aggregates.iter().map(|(name, aggregate)| format!("{name}={aggregate}")).collect();
        format!(
            "window {kind} by [{}], lateness {}ms, emit {}: {}",
            self.group_by.join(", "),
            self.lateness,
            match self.emit {
                EmitMode::Final => "final",
                EmitMode::Update => "update",
            },
            aggregates.join(", ")
        )
    }

    pub fn state_keys(&self) -> usize {
        self.groups.values().map(|group| group.windows.len()).sum()
    }

    /// Adds a record to its windows. One that would make a window's changelog entry larger
    /// than the limit is refused before any window changes.
    pub fn process<'a>(&mut self, record: Record<'a>, watermark: i64, _out: &mut Vec<Emitted<'a>>) -> Result<StepOutcome, ProcessError> {
        let time = record.event_time;
        let lateness = self.lateness;
        let open = move |end: i64| end.saturating_add(lateness) > watermark;
        self.read_sequence();
        let sequence_before = self.sequence;
        let sequence = self.sequence.next();
        // The group's text, written from the fields: its map is made only for a new group.
        let group_text = key_text_of(&record.fields, &self.group_by);
        let growth = growth_bound(&self.aggregates, &record);
        let addition = Addition { group_text: &group_text, record: &record, sequence, growth };
        let fits = match self.kind {
            WindowKind::Tumbling { size } => {
                let size = crate::config::millis(size);
                let start = time.div_euclid(size).saturating_mul(size);
                let end = start.saturating_add(size);
                if !open(end) {
                    return Ok(self.late(time, watermark));
                }
                self.check_window(&addition, start, end).map(|()| self.add(&group_text, start, end, &record, sequence))
            }
            WindowKind::Hopping { size, slide } => {
                let (size, slide) = (crate::config::millis(size), crate::config::millis(slide));
                // Windows [s, s + size) with s a multiple of slide and s <= time < s + size.
                // At most size / slide windows: the configuration bounds that.
                let last_start = time.div_euclid(slide).saturating_mul(slide);
                let windows = std::iter::successors(Some(last_start), |start| Some(start.saturating_sub(slide)))
                    .take_while(|start| *start > time.saturating_sub(size))
                    .map(|start| (start, start.saturating_add(size)))
                    .filter(|(_, end)| open(*end));
                if windows.clone().next().is_none() {
                    return Ok(self.late(time, watermark));
                }
                // Every window is checked before any is changed.
                windows
                    .clone()
                    .try_for_each(|(start, end)| self.check_window(&addition, start, end))
                    .map(|()| windows.for_each(|(start, end)| self.add(&group_text, start, end, &record, sequence)))
            }
            WindowKind::Session { gap } => {
                self.load_group(&group_text);
                let end = time.saturating_add(crate::config::millis(gap));
                if !open(end) {
                    return Ok(self.late(time, watermark));
                }
                self.check_session(&addition, time, end)
                    .map(|()| self.add_to_session(&group_text, time, end, &record, sequence))
            }
        };
        if let Err(error) = fits {
            // Refused: nothing changed, not even the processing order.
            self.sequence = sequence_before;
            return Err(error);
        }
        Ok(StepOutcome::Passed)
    }

    /// Refuses a record that would take the window `[start, end)` of the group over the limit:
    /// by its running estimate where that leaves room, else by measuring the window the
    /// record would make.
    fn check_window(&mut self, addition: &Addition<'_, '_>, start: i64, end: i64) -> Result<(), ProcessError> {
        let Addition { group_text, record, sequence, growth } = *addition;
        // Every window a record is added to is checked first: this reads it in.
        self.load(group_text, start);
        let new_window = self.new_window_estimate(group_text);
        let existing = self.groups.get_mut(group_text).and_then(|group| group.windows.get_mut(&start));
        let estimate = match existing {
            Some(window) => estimate(window, group_text, self.aggregates.len()),
            None => new_window,
        };
        if estimate.saturating_add(growth) <= self.limit.bytes() {
            return Ok(());
        }
        let mut trial = match self.groups.get(group_text).and_then(|group| group.windows.get(&start)) {
            Some(window) => WindowState { aggregates: window.aggregates.clone(), ..WindowState::new(window.end, Vec::new()) },
            None => WindowState::new(end, initial(&self.aggregates, &self.sums_whole)),
        };
        accumulate(&mut trial.aggregates, &self.aggregates, record, sequence);
        self.limit.check("window", measure(&trial, group_text, start))
    }

    /// As `check_window`, for the session the record makes with those it overlaps.
    fn check_session(&mut self, addition: &Addition<'_, '_>, start: i64, end: i64) -> Result<(), ProcessError> {
        let Addition { group_text, record, sequence, growth } = *addition;
        let aggregates = self.aggregates.len();
        let mut estimate_sum = self.new_window_estimate(group_text) + growth;
        let Some(group) = self.groups.get_mut(group_text) else {
            return match estimate_sum <= self.limit.bytes() {
                true => Ok(()),
                false => self.check_window(addition, start, end),
            };
        };
        for (_, window) in group.windows.range_mut(..end).filter(|(_, window)| window.end > start) {
            estimate_sum = estimate_sum.saturating_add(estimate(window, group_text, aggregates));
        }
        if estimate_sum <= self.limit.bytes() {
            return Ok(());
        }
        let mut merged = WindowState::new(end, initial(&self.aggregates, &self.sums_whole));
        let mut merged_start = start;
        for (session_start, window) in group.windows.range(..end).filter(|(_, window)| window.end > start) {
            merged_start = merged_start.min(*session_start);
            merged.end = merged.end.max(window.end);
            merge(&mut merged.aggregates, window.aggregates.clone());
        }
        accumulate(&mut merged.aggregates, &self.aggregates, record, sequence);
        self.limit.check("window", measure(&merged, group_text, merged_start))
    }

    /// What a new window of the group takes before any record: its key, the group in its
    /// value and the empty aggregates.
    fn new_window_estimate(&self, group_text: &str) -> usize {
        4 * group_text.len() + 200 + self.aggregates.len() * (NUMBERS_RESERVE + 32)
    }

    fn late(&self, time: i64, watermark: i64) -> StepOutcome {
        StepOutcome::Late(format!(
            "event time {time}: every window it belongs to closed (end + allowed lateness {}ms at or before the watermark {watermark})",
            self.lateness
        ))
    }

    fn add(&mut self, group_text: &str, start: i64, end: i64, record: &Record<'_>, sequence: u64) {
        // The group's text and map are allocated only for a new group or window, not per record.
        if !self.groups.contains_key(group_text) {
            let key = key_of(&record.fields, &self.group_by);
            self.groups.insert(group_text.to_string(), Group { key, windows: BTreeMap::new() });
        }
        let group = self.groups.get_mut(group_text).expect("inserted above");
        let window = group.windows.entry(start).or_insert_with(|| {
            if let Some(committed) = &mut self.committed {
                committed.count(1);
            }
            self.closing.insert((end.saturating_add(self.lateness), group_text.to_string(), start));
            WindowState::new(end, initial(&self.aggregates, &self.sums_whole))
        });
        let before = estimate(window, group_text, self.aggregates.len());
        let growth = accumulate(&mut window.aggregates, &self.aggregates, record, sequence);
        window.bytes = Some(before.saturating_add_signed(growth));
        mark(&mut self.dirty, window, group_text, start);
        if self.emit == EmitMode::Update {
            self.changed.insert((group_text.to_string(), start));
        }
    }

    fn add_to_session(&mut self, group_text: &str, start: i64, end: i64, record: &Record<'_>, sequence: u64) {
        let group = self
            .groups
            .entry(group_text.to_string())
            .or_insert_with(|| Group { key: key_of(&record.fields, &self.group_by), windows: BTreeMap::new() });
        // Sessions overlapping [start, end): those starting before `end` and ending after `start`.
        let overlapping: Vec<i64> = group
            .windows
            .range(..end)
            .filter(|(_, window)| window.end > start)
            .map(|(session_start, _)| *session_start)
            .collect();
        let mut merged = WindowState::new(end, initial(&self.aggregates, &self.sums_whole));
        // Merging keeps at most what the parts held, so their estimates add up to one.
        let mut merged_bytes = estimate(&mut merged, group_text, self.aggregates.len());
        let merged_start = overlapping.first().map_or(start, |first| (*first).min(start));
        let mut stored = Vec::new();
        for session_start in &overlapping {
            let Some(old) = group.windows.remove(session_start) else { continue };
            if old.stored {
                stored.push((*session_start, old.end));
            }
            self.closing.remove(&(old.end.saturating_add(self.lateness), group_text.to_string(), *session_start));
            self.changed.remove(&(group_text.to_string(), *session_start));
            self.dirty.push((group_text.to_string(), *session_start));
            merged.end = merged.end.max(old.end);
            merged_bytes = merged_bytes.saturating_add(old.bytes.unwrap_or_else(|| measure(&old, group_text, *session_start)));
            merge(&mut merged.aggregates, old.aggregates);
            if old.emitted {
                if *session_start == merged_start {
                    // The merged session keeps this one's key: an update, not a tombstone.
                    merged.emitted = true;
                } else {
                    self.merged_away.push((group.key.clone(), *session_start));
                }
            }
        }
        let growth = accumulate(&mut merged.aggregates, &self.aggregates, record, sequence);
        merged.bytes = Some(merged_bytes.saturating_add_signed(growth));
        self.closing.insert((merged.end.saturating_add(self.lateness), group_text.to_string(), merged_start));
        // The merged session may take the key of one listed as removed just above.
        self.dirty.push((group_text.to_string(), merged_start));
        merged.dirty = true;
        group.windows.insert(merged_start, merged);
        if self.emit == EmitMode::Update {
            self.changed.insert((group_text.to_string(), merged_start));
        }
        for (session_start, end) in stored {
            self.merged_stored(group_text, session_start, end);
        }
        if let Some(committed) = &mut self.committed {
            committed.count(1 - overlapping.len() as i64);
        }
    }

    /// Emits (final) or flushes (update) and forgets the windows the watermark closed.
    pub fn advance<'a>(&mut self, watermark: i64, out: &mut Vec<Emitted<'a>>) {
        if self.emit == EmitMode::Update {
            self.emit_tombstones(out);
        }
        let mut due = Vec::new();
        while self.closing.first().is_some_and(|(close, _, _)| *close <= watermark) {
            due.extend(self.closing.pop_first());
        }
        let mut due: Vec<(i64, String, i64, bool)> = due.into_iter().map(|(close, group, start)| (close, group, start, false)).collect();
        let stored = self.due_from_store(watermark);
        if !stored.is_empty() {
            due.extend(stored.into_iter().map(|(close, group, start)| (close, group, start, true)));
            due.sort();
        }
        for (_, group_text, start, by_store_timer) in due {
            self.load(&group_text, start);
            let Some(group) = self.groups.get_mut(&group_text) else { continue };
            // A store timer ends only the committed window it was set for: a session merged
            // in this batch into one with the same start closes by its own, later close.
            if by_store_timer && group.windows.get(&start).is_none_or(|window| !window.stored) {
                continue;
            }
            let Some(window) = group.windows.remove(&start) else { continue };
            if let Some(committed) = &mut self.committed {
                committed.count(-1);
            }
            self.dirty.push((group_text.clone(), start));
            let changed = self.changed.remove(&(group_text.clone(), start));
            if self.emit == EmitMode::Final || changed {
                let record = output_record(&self.group_by, &self.aggregates, &group.key, start, &window, self.emit);
                out.push(Emitted::Record(record));
            }
            if group.windows.is_empty() {
                self.groups.remove(&group_text);
            }
        }
    }

    /// Update mode: the current value of every window changed since the last commit.
    pub fn commit<'a>(&mut self, out: &mut Vec<Emitted<'a>>) {
        if self.emit != EmitMode::Update {
            return;
        }
        self.emit_tombstones(out);
        for (group_text, start) in std::mem::take(&mut self.changed) {
            let Some(group) = self.groups.get_mut(&group_text) else { continue };
            let Some(window) = group.windows.get_mut(&start) else { continue };
            window.emitted = true;
            mark(&mut self.dirty, window, &group_text, start);
            let record = output_record(&self.group_by, &self.aggregates, &group.key, start, window, self.emit);
            out.push(Emitted::Record(record));
        }
    }

    /// What changed since the last call, as changelog entries: each window under
    /// `[group, start]` (None once closed or merged away), and the processing sequence.
    /// Called at a commit, after `commit`, so no update is pending in what is saved.
    pub fn take_changes(&mut self) -> Vec<StateChange> {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        let mut changes = Vec::with_capacity(dirty.len() + 1);
        for (group_text, start) in dirty {
            let key = Value::from(vec![Value::String(group_text.clone()), Value::from(start)]).to_string();
            let value = self.groups.get_mut(&group_text).and_then(|group| {
                let window = group.windows.get_mut(&start)?;
                window.dirty = false;
                let mut saved = serde_json::to_value(&*window).unwrap_or(Value::Null);
                if let Value::Object(saved) = &mut saved {
                    saved.insert("group".into(), Value::Object(group.key.clone()));
                }
                Some(saved)
            });
            changes.push(StateChange { key, value });
        }
        changes.extend(self.sequence.take_change());
        self.hand_over();
        changes
    }

    pub fn restore(&mut self, key: &str, value: Option<&Value>) -> Result<(), CorruptState> {
        if self.sequence.restore(key, value) {
            return Ok(());
        }
        let (group_text, start): (String, i64) =
            serde_json::from_str(key).map_err(|error| CorruptState(format!("window state key {key}: {error}")))?;
        if let Some(group) = self.groups.get_mut(&group_text) {
            if let Some(old) = group.windows.remove(&start) {
                self.closing.remove(&(old.end.saturating_add(self.lateness), group_text.clone(), start));
            }
            if group.windows.is_empty() {
                self.groups.remove(&group_text);
            }
        }
        let Some(value) = value else {
            return Ok(());
        };
        let group_key = match value.get("group") {
            Some(Value::Object(key)) => key.clone(),
            _ => return Err(CorruptState(format!("window state {key} has no group"))),
        };
        let window: WindowState =
            serde_json::from_value(value.clone()).map_err(|error| CorruptState(format!("window state {key}: {error}")))?;
        self.closing.insert((window.end.saturating_add(self.lateness), group_text.clone(), start));
        self.groups
            .entry(group_text)
            .or_insert_with(|| Group { key: group_key, windows: BTreeMap::new() })
            .windows
            .insert(start, window);
        Ok(())
    }

    fn emit_tombstones<'a>(&mut self, out: &mut Vec<Emitted<'a>>) {
        for (key, start) in self.merged_away.drain(..) {
            out.push(Emitted::Tombstone(upsert_key(&key, start)));
        }
    }

}

fn upsert_key(key: &Map<String, Value>, start: i64) -> Map<String, Value> {
    let mut upsert = key.clone();
    upsert.insert("window_start".into(), Value::from(start));
    upsert
}

fn output_record(
    group_by: &[String],
    aggregates: &[(String, Aggregate)],
    key: &Map<String, Value>,
    start: i64,
    window: &WindowState,
    emit: EmitMode,
) -> Record<'static> {
    let mut fields = Map::with_capacity(group_by.len() + 2 + aggregates.len());
    for field in group_by {
        fields.insert(field.clone(), key.get(field).cloned().unwrap_or(Value::Null));
    }
    fields.insert("window_start".into(), Value::from(start));
    fields.insert("window_end".into(), Value::from(window.end));
    for ((name, _), state) in aggregates.iter().zip(&window.aggregates) {
        fields.insert(name.clone(), state.value());
    }
    let (record_key, upsert) = match emit {
        EmitMode::Final => (key.clone(), false),
        EmitMode::Update => (upsert_key(key, start), true),
    };
    Record { fields, event_time: window.end.saturating_sub(1), provenance: None, key: Some(Box::new(RecordKey::Fields(record_key))), upsert, id: None }
}

impl WindowState {
    fn new(end: i64, aggregates: Vec<AggregateState>) -> WindowState {
        WindowState { end, aggregates, emitted: false, dirty: false, bytes: None, stored: false }
    }
}

#[cfg(test)]
mod tests;

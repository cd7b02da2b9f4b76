//! `join`: a stream-stream interval join (PIPELINE.md, "join").
//!
//! A left record l and a right record r with equal `on` fields match when
//! `l.t + lower <= r.t <= l.t + upper` (bounds inclusive). Every matching pair is emitted
//! when its second record arrives, as `{ "<left>": {...}, "<right>": {...} }` with the later
//! event time. Each record is buffered until the watermark proves no partner can still come:
//! a left record once the watermark passes `l.t + upper`, a right record once it passes
//! `r.t - lower` (a record is late when its event time is below the watermark, so nothing
//! not late can match after that). A record that never matched is then emitted with the other
//! side null, for the outer sides of the join type. State is therefore bounded by the
//! watermark whatever the run length.
//!
//! This operator is the join's logic alone: which side a record is on is the caller's to say
//! (the engine knows which source decoded it), and so is co-partitioning the two inputs.
//!
//! State entries (for the changelog): key `[<on key as JSON text>, "left"|"right", <seq>]`,
//! value `{"t": <event time>, "fields": {...}, "matched": bool}`. `seq` numbers the records of
//! a task in processing order, so pairs come out in a stable order after a restore too; the
//! next one is kept under the key `sequence`.
//!
//! With a committed view (production), the buffered records live in the local store (see
//! [`stored`]); without one (`weir test`), all of them are in memory.

use std::collections::BTreeSet;

use foldhash::{HashMap, HashMapExt};
use serde_json::{Map, Value};

use super::{CorruptState, Emitted, StepOutcome, ProcessError, Record, RecordKey, StateChange, StateEntryLimit, json_len, key_of, key_text, quoted_len};
pub mod config;
mod stored;

use super::committed::StoreTimers;
use config::{Join, JoinKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Left,
    Right,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Left => "left",
            Side::Right => "right",
        }
    }

    fn parse(text: &str) -> Option<Side> {
        match text {
            "left" => Some(Side::Left),
            "right" => Some(Side::Right),
            _ => None,
        }
    }
}

/// Whether an unmatched record of `side` is emitted with the other side null.
fn keeps_unmatched(kind: JoinKind, side: Side) -> bool {
    matches!((kind, side), (JoinKind::Full, _) | (JoinKind::Left, Side::Left) | (JoinKind::Right, Side::Right))
}

/// What a join needs to know: the names its output uses for each side, the type, the key
/// fields (the same names on both sides) and the bounds in milliseconds.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    pub left: String,
    pub right: String,
    pub kind: JoinKind,
    pub on: Vec<String>,
    pub lower: i64,
    pub upper: i64,
    /// Upsert mode: buffered records keep where they were read, for their results' ids.
    pub keep_sources: bool,
}

impl JoinSpec {
    pub fn of(join: &Join) -> JoinSpec {
        JoinSpec {
            left: join.left.clone(),
            right: join.right.name.clone(),
            kind: join.kind,
            on: join.on.clone(),
            lower: join.lower,
            upper: join.upper,
            keep_sources: join.keep_sources,
        }
    }
}

struct Buffered {
    seq: u64,
    time: i64,
    fields: Map<String, Value>,
    matched: bool,
    /// Where it was read, as `{topic, partition, offset}` (upsert mode only).
    source: Option<Map<String, Value>>,
    /// Read from the store: committed, with a store timer at its end.
    stored: bool,
}

#[derive(Default)]
struct KeyState {
    /// The `on` fields, for the output key.
    key: Map<String, Value>,
    left: Vec<Buffered>,
    right: Vec<Buffered>,
    /// With a committed view: whether every committed record of a side (left, right) is
    /// in memory, or only some (those this batch buffered or ended).
    complete: [bool; 2],
    /// With a committed view: touched by this batch, and the committed records it ended
    /// (the store holds them until it commits: they are not read in again).
    touched: bool,
    ended: Vec<(Side, u64)>,
}

impl KeyState {
    fn new(key: Map<String, Value>) -> KeyState {
        KeyState { key, ..KeyState::default() }
    }

    fn side(&mut self, side: Side) -> &mut Vec<Buffered> {
        match side {
            Side::Left => &mut self.left,
            Side::Right => &mut self.right,
        }
    }

    /// Whether the record `seq` of `side` is in memory, or needs no reading in (every
    /// committed record of that side is).
    fn holds(&self, side: Side, seq: u64) -> bool {
        let buffered = match side {
            Side::Left => &self.left,
            Side::Right => &self.right,
        };
        self.complete[side as usize] || buffered.iter().any(|entry| entry.seq == seq)
    }

    /// Puts a committed record in its place (by seq), unless it is there or was ended.
    fn take_in(&mut self, side: Side, entry: Buffered) {
        if self.ended.contains(&(side, entry.seq)) {
            return;
        }
        let buffered = self.side(side);
        let position = buffered.partition_point(|other| other.seq < entry.seq);
        if buffered.get(position).is_none_or(|other| other.seq != entry.seq) {
            buffered.insert(position, entry);
        }
    }
}

pub struct JoinOperator {
    spec: JoinSpec,
    /// `on` key (JSON text) → what is buffered under it.
    keys: HashMap<String, KeyState>,
    /// (end, key, side, seq): buffered records in the order the watermark ends them (with a
    /// committed view, those not committed yet: the others end by store timers).
    ends: BTreeSet<(i64, String, Side, u64)>,
    /// Restores fill `keys` alone; `ends` is rebuilt once before it is next used.
    ends_stale: bool,
    next_seq: u64,
    /// `next_seq` moved since the last `take_changes`.
    seq_moved: bool,
    /// The committed records and their timers, when they live in the store, and whether
    /// the committed sequence was read.
    committed: Option<StoreTimers>,
    sequence_read: bool,
    /// Entries added, changed (matched) or ended since the last `take_changes`.
    dirty: BTreeSet<(String, Side, u64)>,
    limit: StateEntryLimit,
}

/// What a buffered record's changelog entry holds besides its key text and fields: the side,
/// the sequence number, the event time, `matched` and the JSON around them.
const ENTRY_OVERHEAD: usize = 120;

impl JoinOperator {
    pub fn new(spec: JoinSpec, limit: StateEntryLimit) -> JoinOperator {
        JoinOperator {
            spec,
            keys: HashMap::new(),
            ends: BTreeSet::new(),
            ends_stale: false,
            next_seq: 0,
            seq_moved: false,
            committed: None,
            sequence_read: false,
            dirty: BTreeSet::new(),
            limit,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "join {:?} {} with {} on [{}] within [{}ms, {}ms]",
            self.spec.kind,
            self.spec.left,
            self.spec.right,
            self.spec.on.join(", "),
            self.spec.lower,
            self.spec.upper
        )
    }

    /// Buffered records, both sides (with a committed view, those not committed yet: the
    /// store counts the others).
    pub fn state_keys(&self) -> usize {
        self.keys.values().flat_map(|state| state.left.iter().chain(&state.right)).filter(|entry| !entry.stored).count()
    }

    fn end_of(&self, side: Side, time: i64) -> i64 {
        end_of(self.spec.lower, self.spec.upper, side, time)
    }

    /// Joins `record` (from `side`) with what the other side buffered under its key, then
    /// buffers it. Judged against `watermark`, the watermark just before it. A record whose
    /// changelog entry would be over the limit is refused before it changes anything.
    pub fn process<'a>(
        &mut self,
        record: Record<'a>,
        side: Side,
        watermark: i64,
        out: &mut Vec<Emitted<'a>>,
    ) -> Result<StepOutcome, ProcessError> {
        if record.event_time < watermark {
            return Ok(StepOutcome::Late(format!("event time {} is before the watermark {watermark}", record.event_time)));
        }
        let key = key_of(&record.fields, &self.spec.on);
        let key_text = key_text(&key);
        self.check_entry_size(&key_text, &record)?;
        self.rebuild_ends();
        self.read_sequence();
        let (lower, upper) = (self.spec.lower, self.spec.upper);
        let time = record.event_time;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.seq_moved = true;
        if let Some(committed) = &mut self.committed {
            committed.count(1);
        }
        let end = self.end_of(side, time);
        let source = match self.spec.keep_sources {
            true => record.provenance.map(|provenance| coordinates(provenance.topic, provenance.partition, provenance.offset)),
            false => None,
        };
        let other_side = match side {
            Side::Left => Side::Right,
            Side::Right => Side::Left,
        };
        self.load_side(&key_text, &key, other_side);
        let state = self.keys.entry(key_text.clone()).or_insert_with(|| KeyState::new(key.clone()));
        state.touched = true;
        let mut matched = false;
        for other in state.side(other_side).iter_mut() {
            let (left_time, right_time) = match side {
                Side::Left => (time, other.time),
                Side::Right => (other.time, time),
            };
            if left_time.saturating_add(lower) <= right_time && right_time <= left_time.saturating_add(upper) {
                matched = true;
                // Only an outer side's records need it in state (an inner side's are never
                // emitted alone): no changelog write for the others.
                if !other.matched && keeps_unmatched(self.spec.kind, other_side) {
                    other.matched = true;
                    self.dirty.insert((key_text.clone(), other_side, other.seq));
                }
                let (left, right) = match side {
                    Side::Left => ((Some(&record.fields), source.as_ref()), (Some(&other.fields), other.source.as_ref())),
                    Side::Right => ((Some(&other.fields), other.source.as_ref()), (Some(&record.fields), source.as_ref())),
                };
                out.push(Emitted::Record(joined(&self.spec, left, right, left_time.max(right_time), &key, record.provenance)));
            }
        }
        state.side(side).push(Buffered { seq, time, fields: record.fields, matched, source, stored: false });
        self.ends.insert((end, key_text.clone(), side, seq));
        self.dirty.insert((key_text, side, seq));
        Ok(StepOutcome::Passed)
    }

    /// Refuses a record whose buffered entry (`take_changes`) would be over the limit. The
    /// fields are counted as JSON without writing them, once per record; the key text is
    /// quoted twice on its way into the changelog key (inside the `[key, side, seq]` array,
    /// then as the state key string), which at most quadruples it.
    fn check_entry_size(&self, key_text: &str, record: &Record<'_>) -> Result<(), ProcessError> {
        let fields = json_len(&record.fields);
        let source = match (self.spec.keep_sources, record.provenance) {
            (true, Some(provenance)) => quoted_len(provenance.topic) + 60,
            _ => 0,
        };
        let rest = fields + source + ENTRY_OVERHEAD;
        if 4 * key_text.len() + rest <= self.limit.bytes() {
            return Ok(());
        }
        // Each quote or backslash of the key text takes 2 bytes in the array's text and 4 in
        // the state key string; the key's own 2 quotes take 4 there.
        let escaped = quoted_len(key_text) - key_text.len() - 2;
        let key = key_text.len() + 4 + 3 * escaped;
        self.limit.check("join", key + rest)
    }

    /// Ends the buffered records the watermark has passed, emitting the unmatched ones of
    /// the outer sides with the other side null.
    pub fn advance<'a>(&mut self, watermark: i64, out: &mut Vec<Emitted<'a>>) {
        self.rebuild_ends();
        let mut due = Vec::new();
        while self.ends.first().is_some_and(|(end, _, _, _)| *end < watermark) {
            due.extend(self.ends.pop_first());
        }
        let stored = self.due_from_store(watermark);
        if !stored.is_empty() {
            due.extend(stored);
            due.sort();
        }
        for (_, key_text, side, seq) in due {
            if self.end_unread(&key_text, side, seq) {
                continue;
            }
            self.load_entry(&key_text, side, seq);
            let Some(state) = self.keys.get_mut(&key_text) else { continue };
            let buffered = state.side(side);
            let Some(position) = buffered.iter().position(|entry| entry.seq == seq) else { continue };
            let entry = buffered.remove(position);
            if let Some(committed) = &mut self.committed {
                committed.count(-1);
                state.touched = true;
                if entry.stored {
                    state.ended.push((side, seq));
                }
            }
            self.dirty.insert((key_text.clone(), side, seq));
            if !entry.matched && keeps_unmatched(self.spec.kind, side) {
                let (left, right) = match side {
                    Side::Left => ((Some(&entry.fields), entry.source.as_ref()), (None, None)),
                    Side::Right => ((None, None), (Some(&entry.fields), entry.source.as_ref())),
                };
                out.push(Emitted::Record(joined(&self.spec, left, right, entry.time, &state.key, None)));
            }
            // With a committed view the key stays until the commit, for what it ended.
            if self.committed.is_none() && state.left.is_empty() && state.right.is_empty() {
                self.keys.remove(&key_text);
            }
        }
    }

    /// What changed since the last call: each buffered record under `[key, side, seq]`, None
    /// once ended, and the sequence.
    pub fn take_changes(&mut self) -> Vec<StateChange> {
        let mut changes: Vec<StateChange> = std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|(key_text, side, seq)| {
                let value = self.keys.get(&key_text).and_then(|state| {
                    let buffered = match side {
                        Side::Left => &state.left,
                        Side::Right => &state.right,
                    };
                    buffered.iter().find(|entry| entry.seq == seq).map(|entry| {
                        let mut value = serde_json::json!({ "t": entry.time, "fields": entry.fields, "matched": entry.matched });
                        if let Some(source) = &entry.source {
                            value["src"] = Value::Object(source.clone());
                        }
                        value
                    })
                });
                StateChange { key: state_key(&key_text, side, seq), value }
            })
            .collect();
        if std::mem::take(&mut self.seq_moved) {
            changes.push(StateChange { key: SEQUENCE_KEY.into(), value: Some(Value::from(self.next_seq)) });
        }
        self.hand_over();
        changes
    }

    /// Puts back one changelog entry (None deletes it).
    pub fn restore(&mut self, key: &str, value: Option<&Value>) -> Result<(), CorruptState> {
        if key == SEQUENCE_KEY {
            self.next_seq = self.next_seq.max(value.and_then(Value::as_u64).unwrap_or(0));
            return Ok(());
        }
        let (key_text, side, seq) = parse_key(key)?;
        self.ends_stale = true;
        self.next_seq = self.next_seq.max(seq + 1);
        let state = self.keys.entry(key_text.clone()).or_default();
        state.side(side).retain(|entry| entry.seq != seq);
        if let Some(value) = value {
            let entry = buffered_of(key, seq, value)?;
            if state.key.is_empty() {
                let parsed: Value = serde_json::from_str(&key_text).map_err(|error| CorruptState(format!("join state key {key}: {error}")))?;
                if let Value::Object(parsed) = parsed {
                    state.key = parsed;
                }
            }
            let buffered = state.side(side);
            let position = buffered.partition_point(|entry| entry.seq < seq);
            buffered.insert(position, entry);
        }
        if state.left.is_empty() && state.right.is_empty() {
            self.keys.remove(&key_text);
        }
        Ok(())
    }

    /// Rebuilds the end index from `keys` after restores.
    fn rebuild_ends(&mut self) {
        if !std::mem::take(&mut self.ends_stale) {
            return;
        }
        let mut ends = Vec::with_capacity(self.state_keys());
        for (key_text, state) in &self.keys {
            for (side, buffered) in [(Side::Left, &state.left), (Side::Right, &state.right)] {
                for entry in buffered {
                    ends.push((self.end_of(side, entry.time), key_text.clone(), side, entry.seq));
                }
            }
        }
        self.ends = ends.into_iter().collect();
    }
}

/// The key the next sequence number is kept under.
const SEQUENCE_KEY: &str = "sequence";

/// When the watermark ends a buffered record of `side` with event time `time`: it stays
/// while the watermark is at or below this.
fn end_of(lower: i64, upper: i64, side: Side, time: i64) -> i64 {
    match side {
        Side::Left => time.saturating_add(upper),
        Side::Right => time.saturating_sub(lower),
    }
}

/// A buffered record's state key.
fn state_key(key_text: &str, side: Side, seq: u64) -> String {
    Value::from(vec![Value::from(key_text), Value::from(side.as_str()), Value::from(seq)]).to_string()
}

/// A buffered record's state key read back as (`on` key text, side, seq).
fn parse_key(key: &str) -> Result<(String, Side, u64), CorruptState> {
    let (key_text, side, seq): (String, String, u64) =
        serde_json::from_str(key).map_err(|error| CorruptState(format!("join state key {key}: {error}")))?;
    let side = Side::parse(&side).ok_or_else(|| CorruptState(format!("join state key {key}: no side {side}")))?;
    Ok((key_text, side, seq))
}

/// A buffered record read back from its changelog value.
fn buffered_of(key: &str, seq: u64, value: &Value) -> Result<Buffered, CorruptState> {
    let time = value["t"].as_i64().ok_or_else(|| CorruptState(format!("join state {key} has no time: {value}")))?;
    let Some(Value::Object(fields)) = value.get("fields") else {
        return Err(CorruptState(format!("join state {key} has no fields: {value}")));
    };
    let matched = value["matched"].as_bool().unwrap_or(false);
    let source = value.get("src").and_then(Value::as_object).cloned();
    Ok(Buffered { seq, time, fields: fields.clone(), matched, source, stored: false })
}

/// One side of an output record: its fields and where they were read (upsert mode).
type SideOf<'s> = (Option<&'s Map<String, Value>>, Option<&'s Map<String, Value>>);

/// The output record: `{ "<left>": {...} | null, "<right>": {...} | null }`, keyed by the
/// `on` fields. In upsert mode its id names where both sides were read.
fn joined<'a>(
    spec: &JoinSpec,
    (left, left_source): SideOf<'_>,
    (right, right_source): SideOf<'_>,
    event_time: i64,
    key: &Map<String, Value>,
    provenance: Option<super::Provenance<'a>>,
) -> Record<'a> {
    let mut fields = Map::new();
    fields.insert(spec.left.clone(), left.map_or(Value::Null, |fields| Value::Object(fields.clone())));
    fields.insert(spec.right.clone(), right.map_or(Value::Null, |fields| Value::Object(fields.clone())));
    let id = spec.keep_sources.then(|| {
        let mut id = Map::new();
        id.insert(spec.left.clone(), left_source.map_or(Value::Null, |source| Value::Object(source.clone())));
        id.insert(spec.right.clone(), right_source.map_or(Value::Null, |source| Value::Object(source.clone())));
        id
    });
    Record { fields, event_time, provenance, key: Some(Box::new(RecordKey::Fields(key.clone()))), upsert: false, id: id.map(Box::new) }
}

/// Where a record was read, as an upsert id names it.
pub fn coordinates(topic: &str, partition: i32, offset: i64) -> Map<String, Value> {
    let mut id = Map::with_capacity(3);
    id.insert("topic".into(), topic.into());
    id.insert("partition".into(), partition.into());
    id.insert("offset".into(), offset.into());
    id
}

#[cfg(test)]
mod tests;

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
//! a task in processing order, so pairs come out in a stable order after a restore too.

use std::collections::BTreeSet;

use foldhash::{HashMap, HashMapExt};
use serde_json::{Map, Value};

use super::{CorruptState, Emitted, StepOutcome, ProcessError, Record, StateChange, StateEntryLimit, json_len, key_of, quoted_len};
pub mod config;

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
}

#[derive(Default)]
struct KeyState {
    /// The `on` fields, for the output key.
    key: Map<String, Value>,
    left: Vec<Buffered>,
    right: Vec<Buffered>,
}

impl KeyState {
    fn side(&mut self, side: Side) -> &mut Vec<Buffered> {
        match side {
            Side::Left => &mut self.left,
            Side::Right => &mut self.right,
        }
    }
}

pub struct JoinOperator {
    spec: JoinSpec,
    /// `on` key (JSON text) → what is buffered under it.
    keys: HashMap<String, KeyState>,
    /// (end, key, side, seq): buffered records in the order the watermark ends them.
    ends: BTreeSet<(i64, String, Side, u64)>,
    /// Restores fill `keys` alone; `ends` is rebuilt once before it is next used.
    ends_stale: bool,
    next_seq: u64,
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

    /// Buffered records, both sides.
    pub fn state_keys(&self) -> usize {
        self.keys.values().map(|state| state.left.len() + state.right.len()).sum()
    }

    /// When the watermark ends a buffered record of `side` with event time `time`: it stays
    /// while the watermark is at or below this.
    fn end_of(&self, side: Side, time: i64) -> i64 {
        match side {
            Side::Left => time.saturating_add(self.spec.upper),
            Side::Right => time.saturating_sub(self.spec.lower),
        }
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
        let key_text = Value::Object(key.clone()).to_string();
        self.check_entry_size(&key_text, &record)?;
        self.rebuild_ends();
        let (lower, upper) = (self.spec.lower, self.spec.upper);
        let time = record.event_time;
        let seq = self.next_seq;
        self.next_seq += 1;
        let end = self.end_of(side, time);
        let source = match self.spec.keep_sources {
            true => record.provenance.map(|provenance| coordinates(provenance.topic, provenance.partition, provenance.offset)),
            false => None,
        };
        let state = self.keys.entry(key_text.clone()).or_insert_with(|| KeyState { key: key.clone(), ..KeyState::default() });
        let mut matched = false;
        let other_side = match side {
            Side::Left => Side::Right,
            Side::Right => Side::Left,
        };
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
        state.side(side).push(Buffered { seq, time, fields: record.fields, matched, source });
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
        while let Some((end, _, _, _)) = self.ends.first() {
            if *end >= watermark {
                break;
            }
            let Some((_, key_text, side, seq)) = self.ends.pop_first() else { break };
            let Some(state) = self.keys.get_mut(&key_text) else { continue };
            let buffered = state.side(side);
            let Some(position) = buffered.iter().position(|entry| entry.seq == seq) else { continue };
            let entry = buffered.remove(position);
            self.dirty.insert((key_text.clone(), side, seq));
            if !entry.matched && keeps_unmatched(self.spec.kind, side) {
                let (left, right) = match side {
                    Side::Left => ((Some(&entry.fields), entry.source.as_ref()), (None, None)),
                    Side::Right => ((None, None), (Some(&entry.fields), entry.source.as_ref())),
                };
                out.push(Emitted::Record(joined(&self.spec, left, right, entry.time, &state.key, None)));
            }
            if state.left.is_empty() && state.right.is_empty() {
                self.keys.remove(&key_text);
            }
        }
    }

    /// What changed since the last call: each buffered record under `[key, side, seq]`, None
    /// once ended.
    pub fn take_changes(&mut self) -> Vec<StateChange> {
        std::mem::take(&mut self.dirty)
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
                let key = Value::from(vec![Value::String(key_text), Value::from(side.as_str()), Value::from(seq)]).to_string();
                StateChange { key, value }
            })
            .collect()
    }

    /// Puts back one changelog entry (None deletes it).
    pub fn restore(&mut self, key: &str, value: Option<&Value>) -> Result<(), CorruptState> {
        let (key_text, side, seq): (String, String, u64) =
            serde_json::from_str(key).map_err(|error| CorruptState(format!("join state key {key}: {error}")))?;
        let side = Side::parse(&side).ok_or_else(|| CorruptState(format!("join state key {key}: no side {side}")))?;
        self.ends_stale = true;
        self.next_seq = self.next_seq.max(seq + 1);
        let state = self.keys.entry(key_text.clone()).or_default();
        state.side(side).retain(|entry| entry.seq != seq);
        if let Some(value) = value {
            let time = value["t"].as_i64().ok_or_else(|| CorruptState(format!("join state {key} has no time: {value}")))?;
            let Some(Value::Object(fields)) = value.get("fields") else {
                return Err(CorruptState(format!("join state {key} has no fields: {value}")));
            };
            if state.key.is_empty() {
                let parsed: Value = serde_json::from_str(&key_text).map_err(|error| CorruptState(format!("join state key {key}: {error}")))?;
                if let Value::Object(parsed) = parsed {
                    state.key = parsed;
                }
            }
            let matched = value["matched"].as_bool().unwrap_or(false);
            let source = value.get("src").and_then(Value::as_object).cloned();
            let buffered = state.side(side);
            let position = buffered.partition_point(|entry| entry.seq < seq);
            buffered.insert(position, Buffered { seq, time, fields: fields.clone(), matched, source });
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
    Record { fields, event_time, provenance, key: Some(key.clone()), upsert: false, id }
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
mod tests {
    use super::*;

    fn spec(kind: JoinKind, lower: i64, upper: i64) -> JoinSpec {
        JoinSpec { left: "ads".into(), right: "clicks".into(), kind, on: vec!["ad".into()], lower, upper, keep_sources: false }
    }

    fn record(ad: &str, id: u64, time: i64) -> Record<'static> {
        let fields = serde_json::json!({ "ad": ad, "id": id }).as_object().cloned().unwrap();
        Record { fields, event_time: time, provenance: None, key: None, upsert: false, id: None }
    }

    /// Each emitted record as `(left id or null, right id or null, event time)`.
    fn pairs(out: &[Emitted<'_>]) -> Vec<(Value, Value, i64)> {
        out.iter()
            .map(|item| match item {
                Emitted::Record(record) => (
                    record.fields["ads"].get("id").cloned().unwrap_or(Value::Null),
                    record.fields["clicks"].get("id").cloned().unwrap_or(Value::Null),
                    record.event_time,
                ),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn pairs_match_at_both_bounds_inclusive_and_not_beyond() {
        let mut join = JoinOperator::new(spec(JoinKind::Inner, 0, 10), StateEntryLimit::default());
        let mut out = Vec::new();
        join.process(record("a", 1, 100), Side::Left, i64::MIN, &mut out).unwrap();
        for (id, time) in [(10, 99), (11, 100), (12, 110), (13, 111)] {
            join.process(record("a", id, time), Side::Right, i64::MIN, &mut out).unwrap();
        }
        assert_eq!(pairs(&out), vec![(1.into(), 11.into(), 100), (1.into(), 12.into(), 110)]);
    }

    #[test]
    fn every_pair_when_keys_repeat_on_both_sides_whatever_the_order() {
        let mut join = JoinOperator::new(spec(JoinKind::Inner, -5, 5), StateEntryLimit::default());
        let mut out = Vec::new();
        join.process(record("a", 1, 100), Side::Left, i64::MIN, &mut out).unwrap();
        join.process(record("a", 10, 103), Side::Right, i64::MIN, &mut out).unwrap();
        join.process(record("b", 11, 100), Side::Right, i64::MIN, &mut out).unwrap();
        join.process(record("a", 2, 98), Side::Left, i64::MIN, &mut out).unwrap();
        join.process(record("a", 12, 96), Side::Right, i64::MIN, &mut out).unwrap();
        let mut found = pairs(&out);
        found.sort_by_key(|(left, right, _)| (left.as_u64(), right.as_u64()));
        assert_eq!(
            found,
            vec![(1.into(), 10.into(), 103), (1.into(), 12.into(), 100), (2.into(), 10.into(), 103), (2.into(), 12.into(), 98)]
        );
    }

    #[test]
    fn outer_rows_come_when_the_watermark_proves_no_match_can_come() {
        let mut join = JoinOperator::new(spec(JoinKind::Full, 0, 10), StateEntryLimit::default());
        let mut out = Vec::new();
        join.process(record("a", 1, 100), Side::Left, i64::MIN, &mut out).unwrap();
        join.process(record("b", 20, 105), Side::Right, i64::MIN, &mut out).unwrap();
        join.process(record("c", 2, 100), Side::Left, i64::MIN, &mut out).unwrap();
        join.process(record("c", 21, 104), Side::Right, i64::MIN, &mut out).unwrap();
        assert_eq!(pairs(&out), vec![(2.into(), 21.into(), 104)]);
        out.clear();
        // At 110 a right record at 110 could still match the left one at 100.
        join.advance(110, &mut out);
        assert_eq!(pairs(&out), vec![(Value::Null, 20.into(), 105)], "b's right record (ends at 105) is over");
        out.clear();
        join.advance(111, &mut out);
        assert_eq!(pairs(&out), vec![(1.into(), Value::Null, 100)], "a's left record; c's matched ones end silently");
        assert_eq!(join.state_keys(), 0);
    }

    #[test]
    fn inner_and_one_sided_joins_emit_only_their_outer_rows() {
        for (kind, expected) in [
            (JoinKind::Inner, vec![]),
            (JoinKind::Left, vec![(1.into(), Value::Null, 100)]),
            (JoinKind::Right, vec![(Value::Null, 20.into(), 100)]),
        ] {
            let mut join = JoinOperator::new(spec(kind, 0, 0), StateEntryLimit::default());
            let mut out = Vec::new();
            join.process(record("a", 1, 100), Side::Left, i64::MIN, &mut out).unwrap();
            join.process(record("b", 20, 100), Side::Right, i64::MIN, &mut out).unwrap();
            join.advance(i64::MAX, &mut out);
            assert_eq!(pairs(&out), expected, "{kind:?}");
        }
    }

    #[test]
    fn a_record_before_the_watermark_is_late() {
        let mut join = JoinOperator::new(spec(JoinKind::Full, 0, 10), StateEntryLimit::default());
        let mut out = Vec::new();
        assert_eq!(join.process(record("a", 1, 100), Side::Left, 100, &mut out), Ok(StepOutcome::Passed));
        assert!(matches!(join.process(record("a", 2, 99), Side::Right, 100, &mut out), Ok(StepOutcome::Late(_))));
        assert_eq!(join.state_keys(), 1);
    }

    /// A restored operator matches, ends and emits exactly as the one whose changes it read.
    #[test]
    fn a_restored_join_goes_on_as_the_original() {
        let mut original = JoinOperator::new(spec(JoinKind::Full, -5, 5), StateEntryLimit::default());
        let mut changelog: std::collections::BTreeMap<String, Value> = Default::default();
        let mut out = Vec::new();
        let inputs = [("a", 1, 100, Side::Left), ("a", 10, 104, Side::Right), ("b", 2, 100, Side::Left), ("c", 11, 101, Side::Right)];
        for (ad, id, time, side) in inputs {
            original.process(record(ad, id, time), side, i64::MIN, &mut out).unwrap();
        }
        original.advance(100, &mut out);
        for change in original.take_changes() {
            match change.value {
                Some(value) => changelog.insert(change.key, value),
                None => changelog.remove(&change.key),
            };
        }
        let mut restored = JoinOperator::new(spec(JoinKind::Full, -5, 5), StateEntryLimit::default());
        for (key, value) in &changelog {
            restored.restore(key, Some(value)).unwrap();
        }
        assert_eq!(restored.state_keys(), original.state_keys());
        let (mut from_original, mut from_restored) = (Vec::new(), Vec::new());
        for (join, out) in [(&mut original, &mut from_original), (&mut restored, &mut from_restored)] {
            join.process(record("b", 12, 103), Side::Right, 100, out).unwrap();
            join.advance(i64::MAX, out);
        }
        assert_eq!(pairs(&from_restored), pairs(&from_original));
        assert_eq!(
            pairs(&from_original),
            vec![(2.into(), 12.into(), 103), (Value::Null, 11.into(), 101)],
            "a's pair was emitted before; c's right record is unmatched"
        );
    }

    /// A record whose buffered entry the producer could not send goes to `on_error.process`:
    /// it neither matches nor is buffered, and the records after it join as before.
    #[test]
    fn a_record_too_large_for_the_changelog_is_refused_and_the_state_left_alone() {
        let limit = StateEntryLimit::under_message_max_bytes(3000);
        let mut join = JoinOperator::new(spec(JoinKind::Full, 0, 10), limit);
        let mut out = Vec::new();
        join.process(record("a", 1, 100), Side::Left, i64::MIN, &mut out).unwrap();
        join.take_changes();
        let mut large = record("a", 2, 101);
        large.fields.insert("payload".into(), Value::from("p".repeat(limit.bytes())));
        let refused = join.process(large, Side::Right, i64::MIN, &mut out);
        assert!(refused.is_err_and(|error| error.0.contains("join state")), "refused");
        assert!(out.is_empty(), "it matched nothing");
        assert_eq!(join.state_keys(), 1, "nothing buffered");
        assert_eq!(join.take_changes(), Vec::new(), "no changelog entry, not even the left record's `matched`");
        // A key of quotes is escaped twice on its way into the changelog key.
        let quotes = "\"".repeat(limit.bytes() / 5);
        assert!(join.process(record(&quotes, 3, 101), Side::Right, i64::MIN, &mut out).is_err(), "escaped size counts");
        join.process(record("a", 4, 102), Side::Right, i64::MIN, &mut out).unwrap();
        assert_eq!(pairs(&out), vec![(1.into(), 4.into(), 102)]);
        assert_eq!(join.state_keys(), 2);
    }
}

//! A join whose buffered records live in the local store (see
//! [`crate::operators::committed`]): the first record of a batch under an `on` key reads the
//! committed records of the other side of that key into memory (one prefix scan of
//! `[key, side, ...`), and each committed record has a timer just after its end, so ending
//! records is a scan of the timers from the last watermark and a point read of each. A
//! record's end never moves, so its timer is set once, when the batch that buffered it
//! commits, and cleared once, when it fires.
//!
//! A side of a key is read whole, and a busy key comes up in batch after batch: the keys a
//! batch touched stay in memory after it commits (they are then what the store holds), up
//! to [`KEPT_RECORDS`] records, so that the next batch need not read them again.

use foldhash::HashMap;
use serde_json::{Map, Value};

use super::config::Join;
use super::{JoinOperator, KeyState, SEQUENCE_KEY, Side, buffered_of, end_of, keeps_unmatched, parse_key, state_key};
use crate::operators::committed::{CommittedState, StoreTimers, TimerChange, array_prefix};

/// At most how many committed records a task keeps in memory between batches (few in unit
/// tests, so that they see keys both kept and dropped).
const KEPT_RECORDS: usize = if cfg!(test) { 20 } else { 10_000 };

/// The prefix of the state keys of one side of an `on` key: `["<key>","<side>",`.
fn side_prefix(key_text: &str, side: Side) -> String {
    let mut prefix = array_prefix(key_text);
    prefix.push_str(&format!("\"{}\",", side.as_str()));
    prefix
}

/// A record ends once the watermark is past its end; a store timer fires once the watermark
/// reaches it: the timer is one after the end (None for a record that never ends).
fn timer_after(end: i64) -> Option<i64> {
    (end < i64::MAX).then(|| end + 1)
}

impl JoinOperator {
    /// Reads earlier batches' buffered records through `view` from now on (call before the
    /// first record).
    pub fn read_through(&mut self, view: Box<dyn CommittedState>) {
        self.committed = Some(StoreTimers::new(view));
    }

    /// The store timer a committed buffered record needs (its state key and its value as
    /// JSON text): one past its end.
    pub fn timer_of(spec: &Join, key: &str, value: &[u8]) -> Option<i64> {
        let (_, side, _) = parse_key(key).ok()?;
        let time = serde_json::from_slice::<Value>(value).ok()?.get("t")?.as_i64()?;
        timer_after(end_of(spec.lower, spec.upper, side, time))
    }

    /// Reads the committed sequence before the first record, with a committed view. A store
    /// kept before the sequence was (an earlier weir) has none: the next number is then one
    /// past the highest of the committed records, found once.
    pub(super) fn read_sequence(&mut self) {
        let Some(committed) = &self.committed else { return };
        if std::mem::replace(&mut self.sequence_read, true) {
            return;
        }
        match committed.get(SEQUENCE_KEY).and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok()) {
            Some(value) => self.next_seq = self.next_seq.max(value.as_u64().unwrap_or(0)),
            None => committed.scan("[", &mut |key, _| {
                if let Ok((_, _, seq)) = parse_key(key) {
                    self.next_seq = self.next_seq.max(seq + 1);
                }
            }),
        }
    }

    /// Brings the committed records of one side of an `on` key into memory (those a record
    /// of the other side may match), unless they all are already: one prefix scan of
    /// `[key, side, ...`. An entry that does not read as this step's record (refused when it
    /// was restored) is left out.
    pub(super) fn load_side(&mut self, key_text: &str, key: &Map<String, Value>, side: Side) {
        let Some(committed) = &self.committed else { return };
        if self.keys.get(key_text).is_some_and(|state| state.complete[side as usize]) {
            return;
        }
        let mut found = Vec::new();
        committed.scan(&side_prefix(key_text, side), &mut |key, value| {
            let Ok((_, _, seq)) = parse_key(key) else { return };
            let Ok(value) = serde_json::from_slice::<Value>(value) else { return };
            if let Ok(mut entry) = buffered_of(key, seq, &value) {
                entry.stored = true;
                found.push(entry);
            }
        });
        let state = self.keys.entry(key_text.to_string()).or_insert_with(|| KeyState::new(key.clone()));
        state.complete[side as usize] = true;
        for entry in found {
            state.take_in(side, entry);
        }
    }

    /// Brings one committed record into memory, for its timer to end it: one point read,
    /// unless it is in memory (or its side is, whole).
    pub(super) fn load_entry(&mut self, key_text: &str, side: Side, seq: u64) {
        let Some(committed) = &self.committed else { return };
        if let Some(state) = self.keys.get_mut(key_text) {
            state.touched = true;
            if state.holds(side, seq) {
                return;
            }
        }
        let key = state_key(key_text, side, seq);
        let Some(value) = committed.get(&key).and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok()) else { return };
        let Ok(mut entry) = buffered_of(&key, seq, &value) else { return };
        entry.stored = true;
        if let Some(state) = touched_key(&mut self.keys, key_text) {
            state.take_in(side, entry);
        }
    }

    /// Ends a committed record that is not in memory and is never emitted alone (an inner
    /// side's) without reading its value: a point read says whether it is still there (a
    /// timer may outlive its record after a restore), and the ending deletes it. False when
    /// the record must be read in instead (`load_entry`).
    pub(super) fn end_unread(&mut self, key_text: &str, side: Side, seq: u64) -> bool {
        let Some(committed) = &mut self.committed else { return false };
        if keeps_unmatched(self.spec.kind, side) {
            return false;
        }
        if let Some(state) = self.keys.get(key_text) {
            if state.ended.contains(&(side, seq)) {
                return true;
            }
            if state.holds(side, seq) {
                return false;
            }
        }
        if committed.get(&state_key(key_text, side, seq)).is_none() {
            return true;
        }
        let Some(state) = touched_key(&mut self.keys, key_text) else { return true };
        committed.count(-1);
        state.ended.push((side, seq));
        self.dirty.insert((key_text.to_string(), side, seq));
        true
    }

    /// The committed records whose timers are due at `watermark`, as (end, key, side, seq).
    pub(super) fn due_from_store(&mut self, watermark: i64) -> Vec<(i64, String, Side, u64)> {
        let Some(committed) = &mut self.committed else { return Vec::new() };
        committed
            .due(watermark)
            .into_iter()
            .filter_map(|(time, key)| parse_key(&key).ok().map(|(key_text, side, seq)| (time - 1, key_text, side, seq)))
            .collect()
    }

    /// With a committed view, hands the batch's records over to the store once their
    /// changes are taken: a timer for each record this batch buffered that is still
    /// buffered, the fired ones cleared. The keys this batch touched stay in memory, as
    /// committed, up to [`KEPT_RECORDS`] records; the others are dropped.
    pub(super) fn hand_over(&mut self) {
        let Some(committed) = &mut self.committed else { return };
        committed.clear_fired();
        let (lower, upper) = (self.spec.lower, self.spec.upper);
        let mut kept = 0;
        for (key_text, mut state) in std::mem::take(&mut self.keys) {
            for (side, buffered) in [(Side::Left, &mut state.left), (Side::Right, &mut state.right)] {
                for entry in buffered.iter_mut().filter(|entry| !entry.stored) {
                    if let Some(time) = timer_after(end_of(lower, upper, side, entry.time)) {
                        committed.set(time, state_key(&key_text, side, entry.seq));
                    }
                    entry.stored = true;
                }
            }
            let size = state.left.len() + state.right.len();
            if state.touched && size > 0 && kept + size <= KEPT_RECORDS {
                kept += size;
                state.touched = false;
                state.ended.clear();
                self.keys.insert(key_text, state);
            }
        }
        self.ends.clear();
    }

    /// The timers set and cleared since the last call (with a committed view only).
    pub fn take_timers(&mut self) -> Vec<TimerChange> {
        self.committed.as_mut().map(StoreTimers::take_timers).unwrap_or_default()
    }

    /// Records buffered less records ended since the last call.
    pub fn take_key_delta(&mut self) -> i64 {
        self.committed.as_mut().map_or(0, StoreTimers::take_key_delta)
    }
}

/// The key's state, marked touched by this batch; made from the key's text (its `on`
/// fields) when it is not in memory. None if that text is not a JSON object.
fn touched_key<'a>(keys: &'a mut HashMap<String, KeyState>, key_text: &str) -> Option<&'a mut KeyState> {
    if !keys.contains_key(key_text) {
        let Ok(Value::Object(on)) = serde_json::from_str::<Value>(key_text) else { return None };
        keys.insert(key_text.to_string(), KeyState::new(on));
    }
    let state = keys.get_mut(key_text)?;
    state.touched = true;
    Some(state)
}

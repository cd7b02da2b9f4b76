//! A window's aggregates: their state, adding a record to them, merging two sessions' and
//! measuring how large they are (for the state entry limit).

use std::collections::HashSet;

use serde_json::Value;

use super::*;

#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub(crate) enum AggregateState {
    Count(i64),
    SumWhole(Option<i64>),
    SumDouble(Option<f64>),
    Avg { sum: f64, count: u64 },
    Min(Option<Value>),
    Max(Option<Value>),
    /// (event time, processing sequence, value)
    First(Option<(i64, u64, Value)>),
    Last(Option<(i64, u64, Value)>),
    CountDistinct(HashSet<String>),
}

/// The order records were processed in, which breaks event-time ties in first/last; kept
/// in the step's changelog under [`Sequence::KEY`] (state keys are JSON arrays or objects).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sequence {
    last: u64,
    changed: bool,
}

impl Sequence {
    const KEY: &str = "sequence";

    /// The next record's place.
    pub(crate) fn next(&mut self) -> u64 {
        self.last += 1;
        self.changed = true;
        self.last
    }

    /// The place the next record will get, without taking it.
    pub(crate) fn peek(&self) -> u64 {
        self.last + 1
    }

    /// Its changelog entry, when it moved since the last call.
    pub(crate) fn take_change(&mut self) -> Option<StateChange> {
        std::mem::take(&mut self.changed).then(|| StateChange { key: Self::KEY.into(), value: Some(Value::from(self.last)) })
    }

    /// Reads the committed sequence through a store view (a step reading through the store
    /// does this before its first record instead of restoring the entry).
    pub(crate) fn read_committed(&mut self, committed: &dyn crate::operators::committed::CommittedState) {
        let value = committed.get(Self::KEY).and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
        self.restore(Self::KEY, value.as_ref());
    }

    /// Takes a changelog entry back if it is the sequence's; false for any other key.
    pub(crate) fn restore(&mut self, key: &str, value: Option<&Value>) -> bool {
        if key != Self::KEY {
            return false;
        }
        self.last = value.and_then(Value::as_u64).unwrap_or(0);
        true
    }
}

pub(crate) fn initial(aggregates: &[(String, Aggregate)], sums_whole: &[bool]) -> Vec<AggregateState> {
    aggregates
        .iter()
        .zip(sums_whole)
        .map(|((_, aggregate), whole)| match aggregate {
            Aggregate::Count => AggregateState::Count(0),
            Aggregate::Sum(_) if *whole => AggregateState::SumWhole(None),
            Aggregate::Sum(_) => AggregateState::SumDouble(None),
            Aggregate::Avg(_) => AggregateState::Avg { sum: 0.0, count: 0 },
            Aggregate::Min(_) => AggregateState::Min(None),
            Aggregate::Max(_) => AggregateState::Max(None),
            Aggregate::First(_) => AggregateState::First(None),
            Aggregate::Last(_) => AggregateState::Last(None),
            Aggregate::CountDistinct(_) => AggregateState::CountDistinct(HashSet::new()),
        })
        .collect()
}

/// Adds one record; nulls are ignored by every aggregate but count(). Returns by how much the
/// values kept grew (or shrank), as `value_len` counts them, for the window's estimate.
pub(crate) fn accumulate(states: &mut [AggregateState], aggregates: &[(String, Aggregate)], record: &Record<'_>, sequence: u64) -> isize {
    let mut growth = 0isize;
    // A kept value replaced by another: the difference of their lengths.
    let replaced = |old: Option<&Value>, new: &Value| value_len(new) as isize - old.map_or(0, value_len) as isize;
    for (state, (_, aggregate)) in states.iter_mut().zip(aggregates) {
        let value = aggregate.field().and_then(|field| field_at(&record.fields, field)).filter(|value| !value.is_null());
        match (state, value) {
            (AggregateState::Count(count), _) => *count += 1,
            (_, None) => {}
            (AggregateState::SumWhole(sum), Some(value)) => {
                *sum = Some(sum.unwrap_or(0).wrapping_add(value.as_i64().unwrap_or(0)));
            }
            (AggregateState::SumDouble(sum), Some(value)) => {
                *sum = Some(sum.unwrap_or(0.0) + value.as_f64().unwrap_or(0.0));
            }
            (AggregateState::Avg { sum, count }, Some(value)) => {
                *sum += value.as_f64().unwrap_or(0.0);
                *count += 1;
            }
            (AggregateState::Min(current), Some(value)) => {
                if current.as_ref().is_none_or(|current| compare(value, current).is_lt()) {
                    growth += replaced(current.as_ref(), value);
                    *current = Some(value.clone());
                }
            }
            (AggregateState::Max(current), Some(value)) => {
                if current.as_ref().is_none_or(|current| compare(value, current).is_gt()) {
                    growth += replaced(current.as_ref(), value);
                    *current = Some(value.clone());
                }
            }
            (AggregateState::First(current), Some(value)) => {
                let candidate = (record.event_time, sequence);
                if current.as_ref().is_none_or(|(time, seq, _)| candidate < (*time, *seq)) {
                    growth += replaced(current.as_ref().map(|(_, _, old)| old), value);
                    *current = Some((record.event_time, sequence, value.clone()));
                }
            }
            (AggregateState::Last(current), Some(value)) => {
                let candidate = (record.event_time, sequence);
                if current.as_ref().is_none_or(|(time, seq, _)| candidate > (*time, *seq)) {
                    growth += replaced(current.as_ref().map(|(_, _, old)| old), value);
                    *current = Some((record.event_time, sequence, value.clone()));
                }
            }
            (AggregateState::CountDistinct(values), Some(value)) => {
                let text = value.to_string();
                let len = quoted_len(&text) + 1;
                if values.insert(text) {
                    growth += len as isize;
                }
            }
        }
    }
    growth
}

/// The most `record` can add to the entry of one piece of state (a window, a running
/// aggregate's key): each value it gives first, last, min or max (which keep one value: at
/// most all of it when the old one was empty), and each value count_distinct keeps as a quoted
/// JSON text. Counts, sums and averages only change digits, reserved when the state is made.
pub(crate) fn growth_bound(aggregates: &[(String, Aggregate)], record: &Record<'_>) -> usize {
    aggregates
        .iter()
        .map(|(_, aggregate)| {
            let value = || aggregate.field().and_then(|field| field_at(&record.fields, field)).map_or(0, value_len);
            match aggregate {
                Aggregate::Count | Aggregate::Sum(_) | Aggregate::Avg(_) => 0,
                Aggregate::Min(_) | Aggregate::Max(_) | Aggregate::First(_) | Aggregate::Last(_) => value(),
                Aggregate::CountDistinct(_) => 2 * value() + 3,
            }
        })
        .sum()
}

/// A value's length as JSON, or a little more: strings by a scan, scalars by their longest
/// form, and only arrays and objects written out (counted, not kept).
pub(crate) fn value_len(value: &Value) -> usize {
    match value {
        Value::String(text) => quoted_len(text),
        Value::Null | Value::Bool(_) | Value::Number(_) => 24,
        Value::Array(_) | Value::Object(_) => json_len(value),
    }
}

/// A window's changelog entry size as `take_changes` writes it: the key `[group, start]`
/// quoted as a state key (the group text is quoted twice: each quote or backslash of it
/// takes 4 bytes), and the value with the group in it. Writes the window out (counted, not
/// kept): for new, restored and near-limit windows only.
pub(super) fn measure(window: &WindowState, group_text: &str, start: i64) -> usize {
    let escaped = quoted_len(group_text) - group_text.len() - 2;
    let state_key = group_text.len() + 4 + 3 * escaped + json_len(&start) + 4;
    // The group in the value is the group's text as it is.
    state_key + json_len(window) + group_text.len() + r#","group":"#.len()
}

/// The window's running estimate, measured (with room for its numbers to grow) if unknown.
pub(super) fn estimate(window: &mut WindowState, group_text: &str, aggregates: usize) -> usize {
    // The start does not change the estimate by more than the reserve.
    let bytes = window.bytes.unwrap_or_else(|| measure(window, group_text, i64::MIN) + aggregates * NUMBERS_RESERVE);
    window.bytes = Some(bytes);
    bytes
}

/// Folds `other` (a session merged away) into `states`.
pub(super) fn merge(states: &mut [AggregateState], other: Vec<AggregateState>) {
    for (state, other) in states.iter_mut().zip(other) {
        match (state, other) {
            (AggregateState::Count(count), AggregateState::Count(more)) => *count += more,
            (AggregateState::SumWhole(sum), AggregateState::SumWhole(Some(more))) => {
                *sum = Some(sum.unwrap_or(0).wrapping_add(more));
            }
            (AggregateState::SumDouble(sum), AggregateState::SumDouble(Some(more))) => {
                *sum = Some(sum.unwrap_or(0.0) + more);
            }
            (AggregateState::Avg { sum, count }, AggregateState::Avg { sum: more_sum, count: more_count }) => {
                *sum += more_sum;
                *count += more_count;
            }
            (AggregateState::Min(current), AggregateState::Min(Some(value)))
                if current.as_ref().is_none_or(|current| compare(&value, current).is_lt()) => {
                    *current = Some(value);
                }
            (AggregateState::Max(current), AggregateState::Max(Some(value)))
                if current.as_ref().is_none_or(|current| compare(&value, current).is_gt()) => {
                    *current = Some(value);
                }
            (AggregateState::First(current), AggregateState::First(Some(candidate)))
                if current.as_ref().is_none_or(|(time, seq, _)| (candidate.0, candidate.1) < (*time, *seq)) => {
                    *current = Some(candidate);
                }
            (AggregateState::Last(current), AggregateState::Last(Some(candidate)))
                if current.as_ref().is_none_or(|(time, seq, _)| (candidate.0, candidate.1) > (*time, *seq)) => {
                    *current = Some(candidate);
                }
            (AggregateState::CountDistinct(values), AggregateState::CountDistinct(more)) => values.extend(more),
            _ => {}
        }
    }
}

/// Orders numbers numerically, strings and booleans naturally; other kinds by their text.
pub(super) fn compare(left: &Value, right: &Value) -> std::cmp::Ordering {
    match (left, right) {
        (Value::Number(left), Value::Number(right)) => match (left.as_i64(), right.as_i64()) {
            (Some(left), Some(right)) => left.cmp(&right),
            _ => left.as_f64().unwrap_or(f64::NAN).total_cmp(&right.as_f64().unwrap_or(f64::NAN)),
        },
        (Value::String(left), Value::String(right)) => left.cmp(right),
        (Value::Bool(left), Value::Bool(right)) => left.cmp(right),
        _ => left.to_string().cmp(&right.to_string()),
    }
}

impl AggregateState {
    pub(crate) fn value(&self) -> Value {
        match self {
            AggregateState::Count(count) => Value::from(*count),
            AggregateState::SumWhole(sum) => sum.map_or(Value::Null, Value::from),
            AggregateState::SumDouble(sum) => sum.map_or(Value::Null, Value::from),
            AggregateState::Avg { count: 0, .. } => Value::Null,
            AggregateState::Avg { sum, count } => Value::from(sum / *count as f64),
            AggregateState::Min(value) | AggregateState::Max(value) => value.clone().unwrap_or(Value::Null),
            AggregateState::First(value) | AggregateState::Last(value) => {
                value.as_ref().map_or(Value::Null, |(_, _, value)| value.clone())
            }
            AggregateState::CountDistinct(values) => Value::from(values.len() as u64),
        }
    }
}

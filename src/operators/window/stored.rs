//! A tumbling or hopping window step whose state lives in the local store (see
//! [`crate::operators::committed`]): the windows a batch touches are read from the store
//! into memory, and each committed window has a timer at its close (end + allowed lateness),
//! so closing is a scan of the timers from the last watermark. A window's close never
//! moves, so its timer is set once, when the batch that made the window commits, and
//! cleared once, when it fires. Session windows merge by range and stay in memory.

use std::collections::BTreeMap;

use serde_json::Value;

use super::config::{Window, WindowKind};
use super::{Group, WindowOperator, WindowState};
use crate::operators::committed::{CommittedState, TimerChange};

/// The part of a committed window's entry its timer follows from.
#[derive(serde::Deserialize)]
struct WindowEnd {
    end: i64,
}

impl WindowOperator {
    /// Reads earlier batches' windows through `view` from now on (call before the first
    /// record; tumbling and hopping windows only).
    pub fn read_through(&mut self, view: Box<dyn CommittedState>) {
        if !matches!(self.kind, WindowKind::Session { .. }) {
            self.committed = Some(view);
        }
    }

    /// Whether a window step keeps its windows in the store (tumbling and hopping).
    pub fn reads_through_store(spec: &Window) -> bool {
        !matches!(spec.kind, WindowKind::Session { .. })
    }

    /// The store timer a committed window needs (its entry's value as JSON text): its close.
    pub fn timer_of(spec: &Window, value: &[u8]) -> Option<i64> {
        let window: WindowEnd = serde_json::from_slice(value).ok()?;
        Some(window.end.saturating_add(crate::config::millis(spec.allowed_lateness)))
    }

    /// The changelog (and store) key of a window.
    pub(super) fn state_key(group_text: &str, start: i64) -> String {
        Value::from(vec![Value::String(group_text.to_string()), Value::from(start)]).to_string()
    }

    /// Reads the committed sequence before the first record, with a committed view.
    pub(super) fn read_sequence(&mut self) {
        if let (Some(committed), false) = (&self.committed, self.sequence_read) {
            self.sequence.read_committed(committed.as_ref());
            self.sequence_read = true;
        }
    }

    /// Brings a committed window into memory, if it is not there and there is one. An entry
    /// that does not read as this step's window (refused when it was restored or written)
    /// is read as absent.
    pub(super) fn load(&mut self, group_text: &str, start: i64) {
        let Some(committed) = &self.committed else { return };
        if self.groups.get(group_text).is_some_and(|group| group.windows.contains_key(&start)) {
            return;
        }
        let Some(mut value) = committed.get(&Self::state_key(group_text, start)).and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        else {
            return;
        };
        let Some(Value::Object(key)) = value.as_object_mut().and_then(|fields| fields.remove("group")) else { return };
        let Ok(mut window) = serde_json::from_value::<WindowState>(value) else { return };
        if window.aggregates.len() != self.aggregates.len() {
            return;
        }
        window.stored = true;
        self.groups
            .entry(group_text.to_string())
            .or_insert_with(|| Group { key, windows: BTreeMap::new() })
            .windows
            .insert(start, window);
    }

    /// The committed windows whose timers are due at `watermark`, as (close, group, start),
    /// in that order; the store is asked only once the watermark reaches its earliest timer.
    pub(super) fn due_from_store(&mut self, watermark: i64) -> Vec<(i64, String, i64)> {
        let Some(committed) = &self.committed else { return Vec::new() };
        if watermark <= self.scanned_to {
            return Vec::new();
        }
        let mut due = Vec::new();
        if self.next_due.is_none_or(|next| watermark >= next) {
            let mut fired = Vec::new();
            let next = committed.due_timers(self.scanned_to, watermark, &mut |time, key| fired.push((time, key.to_string())));
            self.next_due = Some(next.unwrap_or(i64::MAX));
            for (time, key) in fired {
                if let Ok((group_text, start)) = serde_json::from_str::<(String, i64)>(&key) {
                    due.push((time, group_text, start));
                }
                self.fired.push((time, key));
            }
        }
        self.scanned_to = watermark;
        due
    }

    /// With a committed view, hands the batch's windows over to the store once their
    /// changes are taken: a timer for each window this batch made that is still open, the
    /// fired ones cleared.
    pub(super) fn hand_over(&mut self) {
        if self.committed.is_none() {
            return;
        }
        self.timer_changes.extend(self.fired.drain(..).map(|(time, key)| TimerChange { time, key, set: false }));
        for (group_text, group) in self.groups.drain() {
            for (start, window) in group.windows {
                if window.stored {
                    continue;
                }
                let time = window.end.saturating_add(self.lateness);
                // Committed with this batch: it may come before the one the store was last
                // asked for.
                self.next_due = self.next_due.map(|next| next.min(time));
                self.timer_changes.push(TimerChange { time, key: Self::state_key(&group_text, start), set: true });
            }
        }
        self.closing.clear();
    }

    /// The timers set and cleared since the last call (with a committed view only).
    pub fn take_timers(&mut self) -> Vec<TimerChange> {
        std::mem::take(&mut self.timer_changes)
    }

    /// Windows made less windows closed since the last call (tumbling and hopping; sessions,
    /// which merge, are counted in memory).
    pub fn take_key_delta(&mut self) -> i64 {
        let delta = std::mem::take(&mut self.key_delta);
        if self.committed.is_some() { delta } else { 0 }
    }

}

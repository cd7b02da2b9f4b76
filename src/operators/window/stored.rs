//! A window step whose state lives in the local store (see [`crate::operators::committed`]):
//! the windows a batch touches are read from the store into memory, and each committed
//! window has a timer at its close (end + allowed lateness), so closing is a scan of the
//! timers from the last watermark. A tumbling or hopping window's close never moves, so its
//! timer is set once, when the batch that made the window commits, and cleared once, when
//! it fires. A session window is read with all the committed sessions of its group (one
//! prefix scan of `[group, ...`), since a record may merge any of them; a session that a
//! merge removes has its timer cleared, and the merged one is new, with a timer of its own.

use std::collections::BTreeMap;

use serde_json::Value;

use super::config::{Window, WindowKind};
use super::{Group, WindowOperator, WindowState};
use crate::operators::committed::{CommittedState, StoreTimers, TimerChange, array_prefix};

/// The part of a committed window's entry its timer follows from.
#[derive(serde::Deserialize)]
struct WindowEnd {
    end: i64,
}

impl WindowOperator {
    /// Reads earlier batches' windows through `view` from now on (call before the first
    /// record).
    pub fn read_through(&mut self, view: Box<dyn CommittedState>) {
        self.committed = Some(StoreTimers::new(view));
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
            self.sequence.read_committed(committed.view());
            self.sequence_read = true;
        }
    }

    /// Brings a committed window into memory, if it is not there and there is one. An entry
    /// that does not read as this step's window (refused when it was restored or written)
    /// is read as absent.
    pub(super) fn load(&mut self, group_text: &str, start: i64) {
        if matches!(self.kind, WindowKind::Session { .. }) {
            return self.load_group(group_text);
        }
        let Some(committed) = &self.committed else { return };
        if self.groups.get(group_text).is_some_and(|group| group.windows.contains_key(&start)) {
            return;
        }
        if let Some(bytes) = committed.get(&Self::state_key(group_text, start)) {
            self.take_in(group_text, start, &bytes);
        }
    }

    /// Brings every committed session of a group into memory, once per batch (sessions
    /// only: a record may merge with any of them). Once per batch, so that a session this
    /// batch closed or merged away (the store holds it until the batch commits) is not read
    /// in again.
    pub(super) fn load_group(&mut self, group_text: &str) {
        let Some(committed) = &self.committed else { return };
        if !self.scanned.insert(group_text.to_string()) {
            return;
        }
        let mut found = Vec::new();
        committed.scan(&array_prefix(group_text), &mut |key, value| {
            if let Ok((_, start)) = serde_json::from_str::<(String, i64)>(key) {
                found.push((start, value.to_vec()));
            }
        });
        for (start, value) in found {
            if !self.groups.get(group_text).is_some_and(|group| group.windows.contains_key(&start)) {
                self.take_in(group_text, start, &value);
            }
        }
    }

    /// Puts a committed window (its entry's JSON text) in memory. An entry that does not
    /// read as this step's window (refused when it was restored or written) is left out.
    fn take_in(&mut self, group_text: &str, start: i64, bytes: &[u8]) {
        let Ok(mut value) = serde_json::from_slice::<Value>(bytes) else { return };
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

    /// A committed session a merge removed: its timer goes.
    pub(super) fn merged_stored(&mut self, group_text: &str, start: i64, end: i64) {
        if let Some(committed) = &mut self.committed {
            committed.clear(end.saturating_add(self.lateness), Self::state_key(group_text, start));
        }
    }

    /// The committed windows whose timers are due at `watermark`, as (close, group, start),
    /// in that order; the store is asked only once the watermark reaches its earliest timer.
    pub(super) fn due_from_store(&mut self, watermark: i64) -> Vec<(i64, String, i64)> {
        let Some(committed) = &mut self.committed else { return Vec::new() };
        let fired = committed.due(watermark);
        fired
            .into_iter()
            .filter_map(|(time, key)| serde_json::from_str::<(String, i64)>(&key).ok().map(|(group_text, start)| (time, group_text, start)))
            .collect()
    }

    /// With a committed view, hands the batch's windows over to the store once their
    /// changes are taken: a timer for each window this batch made that is still open, the
    /// fired ones cleared.
    pub(super) fn hand_over(&mut self) {
        let Some(committed) = &mut self.committed else { return };
        committed.clear_fired();
        for (group_text, group) in self.groups.drain() {
            for (start, window) in group.windows {
                if !window.stored {
                    committed.set(window.end.saturating_add(self.lateness), Self::state_key(&group_text, start));
                }
            }
        }
        self.closing.clear();
        self.scanned.clear();
    }

    /// The timers set and cleared since the last call (with a committed view only).
    pub fn take_timers(&mut self) -> Vec<TimerChange> {
        self.committed.as_mut().map(StoreTimers::take_timers).unwrap_or_default()
    }

    /// Windows made less windows closed or merged away since the last call.
    pub fn take_key_delta(&mut self) -> i64 {
        self.committed.as_mut().map_or(0, StoreTimers::take_key_delta)
    }

}

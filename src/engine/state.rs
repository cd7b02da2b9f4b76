//! The engine's state: what a batch changed (for the changelogs and the store), where steps
//! read committed state, and putting state back on restore.

use std::sync::Arc;

use super::{ChangelogEntry, Engine, TimerEntry};
use crate::operators::committed::StateBacking;
use crate::operators::CorruptState;

impl Engine {
    /// Changed state for the changelogs; call after `end_batch`, before committing.
    pub fn take_changes(&mut self) -> Vec<ChangelogEntry> {
        self.topology.take_changes()
    }

    /// Store timers set and cleared by the batch, and the changes in the key counts of
    /// (step, changelog partition); call after `take_changes`.
    pub fn take_timers(&mut self) -> (Vec<TimerEntry>, Vec<(usize, i32, i64)>) {
        self.topology.take_timers()
    }

    /// From now on, steps that can read their committed state in place do, through
    /// `backing` (the local store). Set before the first record.
    pub fn set_backing(&mut self, backing: Arc<dyn StateBacking>) {
        self.topology.set_backing(backing);
    }

    /// Whether `step` reads its committed state through the store (a restore then fills the
    /// store, not the step).
    pub fn reads_through_store(&self, step: usize) -> bool {
        self.topology.reads_through_store(step)
    }

    /// The store timer a committed state entry of `step` needs, from its changelog value
    /// (None: the step has none, or the value is not the step's state).
    pub fn timer_of(&self, step: usize, key: &str, value: &[u8]) -> Option<i64> {
        self.topology.timer_of(step, key, value)
    }

    pub fn restore(&mut self, entry: &ChangelogEntry) -> Result<(), CorruptState> {
        self.topology.restore(entry.topic.as_deref(), entry.partition, entry.step, &entry.key, entry.value.as_ref())
    }
}

//! What a batch's end leaves to write besides its outputs: the state changes the steps took
//! (for the changelogs and the local store), their store timers and the changes in their key
//! counts, as store writes.

use crate::engine::Engine;
use crate::runtime::state;
use crate::runtime::store::{Family, StoreWrite};

/// The batch's store writes, taken from `engine` (call after `end_batch`): its state entries
/// first, in the order the steps gave them, then timers, then key counts. The state entries
/// are also what goes to the changelogs ([`changelog_entries`]).
pub fn take(engine: &mut Engine) -> Vec<StoreWrite> {
    let changes = engine.take_changes();
    let (timers, counts) = engine.take_timers();
    let mut writes = Vec::with_capacity(changes.len() + timers.len() + counts.len());
    writes.extend(changes.iter().map(|entry| {
        let (key, value) = state::encode(entry);
        StoreWrite::state(entry.step, entry.partition, key, value)
    }));
    writes.extend(timers.into_iter().map(|timer| {
        let change = timer.change;
        StoreWrite::timer(timer.step, timer.partition, timer.topic.as_deref(), change.time, &change.key, change.set, change.value)
    }));
    writes.extend(counts.into_iter().map(|(step, partition, delta)| StoreWrite::count(step, partition, delta)));
    writes
}

/// The writes among `writes` that are changelog records: state entries.
pub fn changelog_entries(writes: &[StoreWrite]) -> impl Iterator<Item = &StoreWrite> {
    writes.iter().filter(|write| write.family == Family::State)
}

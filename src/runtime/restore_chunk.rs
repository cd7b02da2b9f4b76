//! A restore's chunk of changelog entries for a step that reads through the store: what it
//! did to each key, so that a key rewritten in the chunk gets one timer (its last entry's),
//! the store's old timer of a key is cleared where it moved, and the store's key count moves
//! by what the chunk changed.
//!
//! The store's old value is known only on a read of the tail (where a key count is kept and
//! each key's first entry in a chunk is checked against the store). A read of the whole
//! changelog does not look: a key rewritten across chunks keeps the earlier chunk's timer
//! too, a stale one that its step drops (checking it against the key's state) when it
//! fires, and the keys are counted once the read ends.

use std::borrow::Cow;

use foldhash::HashMap;

use super::error::RuntimeError;
use super::store::StoreWrite;

#[derive(Default)]
pub struct ChunkKeys {
    keys: HashMap<Vec<u8>, ChunkKey>,
    /// Keys made less keys deleted by the chunk, where the store's old values were known.
    delta: i64,
}

struct ChunkKey {
    owner: Option<String>,
    state_key: String,
    /// The timer of its last entry in the chunk, and that of the store's value before the
    /// chunk (known on a read of the tail only).
    timer: Option<i64>,
    stored_timer: Option<i64>,
    exists: bool,
}

impl ChunkKeys {
    /// One changelog entry of `key` (its raw changelog key; `owner`, `state_key` decoded from
    /// it): its timer, and whether it sets (true) or deletes the key. `stored` answers, for
    /// a key's first entry in the chunk (given its state key), whether the store holds it and with which timer
    /// (None: not known).
    pub fn note(
        &mut self,
        key: &[u8],
        (owner, state_key): (Option<Cow<'_, str>>, Cow<'_, str>),
        timer: Option<i64>,
        exists: bool,
        stored: impl FnOnce(&str) -> Result<Option<(bool, Option<i64>)>, RuntimeError>,
    ) -> Result<(), RuntimeError> {
        if let Some(seen) = self.keys.get_mut(key) {
            self.delta += i64::from(exists) - i64::from(seen.exists);
            (seen.timer, seen.exists) = (timer, exists);
            return Ok(());
        }
        let (existed, stored_timer) = stored(&state_key)?.unwrap_or((false, None));
        self.delta += i64::from(exists) - i64::from(existed);
        let (owner, state_key) = (owner.map(Cow::into_owned), state_key.into_owned());
        self.keys.insert(key.to_vec(), ChunkKey { owner, state_key, timer, stored_timer, exists });
        Ok(())
    }

    /// Adds the chunk's timers (the store's old one cleared where it moved) and, where the
    /// key count is kept (`counted`), its change to the chunk's writes; empties itself.
    pub fn flush(&mut self, step: usize, partition: i32, counted: bool, writes: &mut Vec<StoreWrite>) {
        // Drained, not taken: the next chunk reuses the table's room.
        for ChunkKey { owner, state_key, timer, stored_timer, .. } in self.keys.drain().map(|(_, key)| key) {
            if timer == stored_timer {
                continue;
            }
            if let Some(time) = stored_timer {
                writes.push(StoreWrite::timer(step, partition, owner.as_deref(), time, &state_key, false, Vec::new()));
            }
            if let Some(time) = timer {
                writes.push(StoreWrite::timer(step, partition, owner.as_deref(), time, &state_key, true, Vec::new()));
            }
        }
        if counted {
            writes.push(StoreWrite::count(step, partition, self.delta));
        }
        self.delta = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::store::Family;

    /// (timer key, set) of a chunk's timer writes, sorted, and its count change.
    fn flushed(chunk: &mut ChunkKeys, counted: bool) -> (Vec<(Vec<u8>, bool)>, Option<i64>) {
        let mut writes = Vec::new();
        chunk.flush(0, 1, counted, &mut writes);
        let mut timers = Vec::new();
        let mut count = None;
        for write in writes {
            match write.family {
                Family::Timers => timers.push((write.key, write.value.is_some())),
                Family::Count => count = write.value.map(|bytes| i64::from_le_bytes(bytes.try_into().unwrap_or_default())),
                Family::State => {}
            }
        }
        timers.sort();
        (timers, count)
    }

    fn note(chunk: &mut ChunkKeys, key: &str, timer: Option<i64>, stored: Option<(bool, Option<i64>)>) {
        let exists = timer.is_some();
        chunk.note(key.as_bytes(), (Some(Cow::Borrowed("input")), Cow::Borrowed(key)), timer, exists, |_| Ok(stored)).expect("noted");
    }

    /// A key rewritten in a chunk gets its last entry's timer once; where the store's old
    /// timer is known (a read of the tail) it is cleared when it moved and left when it did
    /// not; a deleted key's timer is cleared; the count moves by what the store did not hold.
    #[test]
    fn a_chunk_writes_each_keys_last_timer_and_clears_the_stored_one() {
        let mut chunk = ChunkKeys::default();
        // The store is asked once per key: later entries would get a wrong answer.
        note(&mut chunk, "a", Some(10), Some((false, None)));
        note(&mut chunk, "a", Some(20), Some((true, Some(999))));
        note(&mut chunk, "a", Some(30), None);
        note(&mut chunk, "moved", Some(50), Some((true, Some(40))));
        note(&mut chunk, "same", Some(60), Some((true, Some(60))));
        note(&mut chunk, "gone", None, Some((true, Some(70))));
        note(&mut chunk, "brief", Some(80), Some((false, None)));
        note(&mut chunk, "brief", None, None);
        note(&mut chunk, "new", Some(90), Some((false, None)));
        let (timers, count) = flushed(&mut chunk, true);
        let mut expected: Vec<(Vec<u8>, bool)> = [("a", 30, true), ("moved", 40, false), ("moved", 50, true), ("gone", 70, false), ("new", 90, true)]
            .into_iter()
            .map(|(key, time, set)| (StoreWrite::timer(0, 1, Some("input"), time, key, set, Vec::new()).key, set))
            .collect();
        expected.sort();
        assert_eq!(timers, expected, "a: 30 set; moved: 40 cleared, 50 set; same: nothing; gone: 70 cleared; brief: nothing; new: 90 set");
        // a and new made, gone deleted, brief made and deleted; moved and same were there.
        assert_eq!(count, Some(1));
        // Emptied: a new chunk starts from nothing.
        assert_eq!(flushed(&mut chunk, true), (Vec::new(), Some(0)));
        // A read of the whole changelog: no count written.
        note(&mut chunk, "a", Some(10), None);
        assert_eq!(flushed(&mut chunk, false).1, None);
    }
}

//! Opening a store of an earlier format: its timers and key counts are built once.

use std::time::Instant;

use rocksdb::IteratorMode;
use tracing::info;

use super::{count_key, counts_as_key, family, RuntimeError, StateStore, StoreWrite, TimerOf, FORMAT, FORMAT_5, FORMAT_KEY, OFFSETS};

impl StateStore {
    /// A store of an earlier format was made before (some) timers and the key counts were
    /// kept: builds the timers of every committed entry (again, for those that had them) and
    /// counts the keys once, then records the format.
    pub(super) fn upgrade(&self, steps: &[usize], timer_of: TimerOf) -> Result<(), RuntimeError> {
        let offsets = self.handle(OFFSETS)?;
        let format = self.db.get_cf(offsets, FORMAT_KEY).map_err(|error| RuntimeError::store("reading the state store", error))?;
        if format.as_deref() == Some(FORMAT) {
            return Ok(());
        }
        // Format 5's timers (one per key) are timers of format 6 too, which only adds dedup's
        // groups: nothing to build, however large the store.
        if format.as_deref() == Some(FORMAT_5) {
            return self.db.put_cf(offsets, FORMAT_KEY, FORMAT).map_err(|error| RuntimeError::store("writing the state store", error));
        }
        let started = Instant::now();
        let mut built = 0u64;
        for step in steps {
            let mut writes = Vec::new();
            let mut counts: std::collections::BTreeMap<i32, i64> = Default::default();
            for item in self.db.iterator_cf(self.handle(&family(*step))?, IteratorMode::Start) {
                let (key, value) = item.map_err(|error| RuntimeError::store("reading the state store", error))?;
                // `0000000003/` then the changelog key.
                let Some((partition, changelog)) = key.split_at_checked(11) else { continue };
                let Some(partition) = std::str::from_utf8(&partition[..10]).ok().and_then(|digits| digits.parse().ok()) else { continue };
                let Ok((owner, state_key)) = serde_json::from_slice::<(Option<String>, String)>(changelog) else { continue };
                if counts_as_key(&state_key) {
                    *counts.entry(partition).or_default() += 1;
                }
                let Some(time) = timer_of(*step, &state_key, &value) else { continue };
                writes.push(StoreWrite::timer(*step, partition, owner.as_deref(), time, &state_key, true, Vec::new()));
                if writes.len() >= 10_000 {
                    built += writes.len() as u64;
                    self.apply(&std::mem::take(&mut writes), &[], &[])?;
                }
            }
            built += writes.len() as u64;
            self.apply(&writes, &[], &[])?;
            for (partition, count) in counts {
                let key = count_key(*step, partition);
                self.db.put_cf(offsets, key, count.to_le_bytes()).map_err(|error| RuntimeError::store("writing the state store", error))?;
            }
        }
        if built > 0 {
            info!(path = %self.path.display(), timers = built, elapsed_ms = started.elapsed().as_millis() as u64, "the local state store was made by an earlier weir: its timers are built once");
        }
        self.db.put_cf(offsets, FORMAT_KEY, FORMAT).map_err(|error| RuntimeError::store("writing the state store", error))
    }
}

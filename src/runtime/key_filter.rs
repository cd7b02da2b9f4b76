//! Which keys a step's state family may hold, answered in memory: a blocked Bloom filter per
//! family, so that a read of a key the store does not have (every new key of a dedup) skips
//! RocksDB. Profiled, those reads were 16% of an end-to-end dedup's CPU: RocksDB looks in
//! the memtable and checks the filter of every level's file before it can say "absent".
//!
//! A filter may say "maybe" of a key that is not there (about 1-2% of absent keys, which
//! then read RocksDB as before), never "no" of a key that is: the store adds every state key
//! it writes before writing it, and builds the filter from the family's keys when it opens.
//! Keys deleted since stay in the filter until it is rebuilt, which happens when more new
//! keys were added than it was sized for; a family too large for [`MAX_KEYS`] gets none.
//!
//! A rebuild scans the family on a thread of its own (seconds for millions of keys), while
//! the full filter goes on answering and every key added meanwhile is kept aside too; the
//! new filter takes those keys and replaces the full one at the next write after the scan.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use rocksdb::{ReadOptions, DB};
use tracing::{info, warn};

/// Bits per key the filter is sized for: about 1.5% false positives with [`PROBES`] bits in
/// one 512-bit block (a single cache line per lookup).
const BITS_PER_KEY: usize = 10;
const PROBES: u32 = 6;
/// Each filter is sized for twice the keys it was built from, and for this many at least.
#[cfg(not(test))]
pub const MIN_KEYS: usize = 1 << 20;
#[cfg(test)]
pub const MIN_KEYS: usize = 64;
/// Families with more keys than this get no filter (their reads go to RocksDB): at
/// [`BITS_PER_KEY`], 20 MiB of memory, and the scan that builds it takes seconds.
pub const MAX_KEYS: usize = 16 << 20;

type Block = [u64; 8];
type Hasher = foldhash::quality::RandomState;

pub struct KeyFilter {
    blocks: Vec<Block>,
    hasher: Hasher,
    /// Keys added since it was built that it did not already (maybe) hold.
    added: usize,
    /// How many it was sized for.
    capacity: usize,
}

impl KeyFilter {
    /// An empty filter for a family of `keys` keys (see [`MIN_KEYS`]); None beyond
    /// [`MAX_KEYS`].
    #[cfg(test)]
    pub fn sized_for(keys: usize) -> Option<KeyFilter> {
        KeyFilter::hashing_with(keys, Hasher::default())
    }

    /// As [`KeyFilter::sized_for`], hashing keys with `hasher`.
    fn hashing_with(keys: usize, hasher: Hasher) -> Option<KeyFilter> {
        if keys > MAX_KEYS / 2 {
            return None;
        }
        let capacity = keys.saturating_mul(2).max(MIN_KEYS);
        let blocks = (capacity * BITS_PER_KEY).div_ceil(512);
        Some(KeyFilter { blocks: vec![[0; 8]; blocks], hasher, added: 0, capacity })
    }

    /// The block and the bits of a key of hash `hash`: the block from the hash's high bits,
    /// the bits within it from 9-bit slices of a second mix of it.
    fn place(&self, hash: u64) -> (usize, u64) {
        let block = ((u128::from(hash) * self.blocks.len() as u128) >> 64) as usize;
        (block, hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (hash >> 29))
    }

    pub fn may_contain(&self, key: &[u8]) -> bool {
        let (block, bits) = self.place(self.hasher.hash_one(key));
        let block = &self.blocks[block];
        probes(bits).all(|(word, mask)| block[word] & mask != 0)
    }

    /// Adds a key; counts it as new unless the filter (maybe) held it already.
    pub fn insert(&mut self, key: &[u8]) {
        self.insert_hash(self.hasher.hash_one(key));
    }

    /// Adds a key by its hash under this filter's hasher.
    fn insert_hash(&mut self, hash: u64) {
        let (block, bits) = self.place(hash);
        let block = &mut self.blocks[block];
        let mut new = false;
        for (word, mask) in probes(bits) {
            new |= block[word] & mask == 0;
            block[word] |= mask;
        }
        self.added += usize::from(new);
    }

    /// More new keys were added than it was sized for: its false positives grow; rebuild it.
    pub fn is_full(&self) -> bool {
        self.added > self.capacity
    }

    /// Memory held, in bytes.
    pub fn bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<Block>()
    }
}

/// A key's [`PROBES`] bits in its block, as (word, mask): 9-bit slices of `bits`.
fn probes(bits: u64) -> impl Iterator<Item = (usize, u64)> {
    (0..PROBES).map(move |probe| {
        let bit = (bits >> (9 * probe)) & 511;
        ((bit >> 6) as usize, 1 << (bit & 63))
    })
}

/// The filters of a store's step families: the store adds every state key it writes, its
/// views ask before they read. Only ever used from the loop's thread (and by rebuild scans,
/// which touch none of it); the lock makes them shareable with the views. A poisoned lock
/// answers "maybe" to everything.
pub struct KeyFilters {
    by_step: Mutex<ByStep>,
    /// Tells running rebuild scans to stop (the store is closing).
    stop: Arc<AtomicBool>,
}

/// Each step's filter (None: the step's family has none, see [`MAX_KEYS`]).
type ByStep = Vec<StepFilter>;

struct StepFilter {
    step: usize,
    filter: Option<KeyFilter>,
    rebuild: Option<Rebuild>,
    /// After a rebuild that failed, none is tried again before this.
    retry_after: Option<Instant>,
}

/// How long after a failed rebuild the next is tried (the full filter serves meanwhile).
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// A scan building a step's filter anew, and the keys added since it began, by their hash
/// under the new filter's hasher (8 bytes each, whatever a key's length).
struct Rebuild {
    scan: JoinHandle<Result<Option<KeyFilter>, rocksdb::Error>>,
    hasher: Hasher,
    added: Vec<u64>,
}

/// The filters, locked for a batch of writes.
pub struct Adding<'a>(Option<MutexGuard<'a, ByStep>>);

impl Adding<'_> {
    /// Adds a state key of `step` (its full store key, partition prefix included).
    pub fn add(&mut self, step: usize, key: &[u8]) {
        let Some(filters) = &mut self.0 else { return };
        let Some(at) = filters.iter_mut().find(|at| at.step == step) else { return };
        if let Some(filter) = &mut at.filter {
            filter.insert(key);
        }
        if let Some(rebuild) = &mut at.rebuild {
            rebuild.added.push(rebuild.hasher.hash_one(key));
        }
    }
}

impl KeyFilters {
    /// Builds each step's filter from the keys its family holds.
    pub fn build(db: &DB, steps: &[usize]) -> Result<KeyFilters, rocksdb::Error> {
        let never = AtomicBool::new(false);
        let by_step = steps
            .iter()
            .map(|step| Ok(StepFilter { step: *step, filter: scan(db, *step, Hasher::default(), &never)?, rebuild: None, retry_after: None }))
            .collect::<Result<_, rocksdb::Error>>()?;
        Ok(KeyFilters { by_step: Mutex::new(by_step), stop: Arc::new(AtomicBool::new(false)) })
    }

    /// Whether `step`'s family may hold `key` (false: it certainly does not).
    pub fn may_contain(&self, step: usize, key: &[u8]) -> bool {
        let Ok(filters) = self.by_step.lock() else { return true };
        match filters.iter().find(|at| at.step == step) {
            Some(StepFilter { filter: Some(filter), .. }) => filter.may_contain(key),
            _ => true,
        }
    }

    /// The filters, to add a batch's keys to before it is written.
    pub fn adding(&self) -> Adding<'_> {
        Adding(self.by_step.lock().ok())
    }

    /// Call after each write: puts in place the filters whose rebuild scan has ended (with
    /// the keys added since it began), and starts a scan for each filter that more new keys
    /// reached than it was sized for. A scan that fails keeps the full filter, which still
    /// holds every key (only its false positives grow); the written batch stands.
    pub fn rebuild_full(&self, db: &Arc<DB>) {
        let Ok(mut filters) = self.by_step.lock() else { return };
        for at in filters.iter_mut() {
            if at.rebuild.as_ref().is_some_and(|rebuild| rebuild.scan.is_finished()) {
                at.finish_rebuild();
            }
            let waiting = at.retry_after.is_some_and(|after| Instant::now() < after);
            if at.rebuild.is_none() && !waiting && at.filter.as_ref().is_some_and(KeyFilter::is_full) {
                // Keys are kept aside from now on: every key the scan's snapshot misses.
                let (db, step, stop, hasher) = (db.clone(), at.step, self.stop.clone(), Hasher::default());
                let scan = {
                    let hasher = hasher.clone();
                    std::thread::Builder::new().name(format!("filter-{step}")).spawn(move || scan(&db, step, hasher, &stop))
                };
                match scan {
                    Ok(scan) => at.rebuild = Some(Rebuild { scan, hasher, added: Vec::new() }),
                    Err(error) => {
                        warn!(step, %error, "starting the rebuild of the filter of the state keys; the full one is kept");
                        at.retry_later();
                    }
                }
            }
        }
    }
}

impl StepFilter {
    /// Takes the rebuilt filter (waiting for its scan), with the keys added meanwhile.
    fn finish_rebuild(&mut self) {
        let Some(Rebuild { scan, added, .. }) = self.rebuild.take() else { return };
        match scan.join() {
            Ok(Ok(mut built)) => {
                if let Some(filter) = &mut built {
                    for hash in added {
                        filter.insert_hash(hash);
                    }
                }
                self.filter = built;
            }
            Ok(Err(error)) => {
                warn!(step = self.step, %error, "rebuilding the filter of the state keys; the full one is kept");
                self.retry_later();
            }
            Err(_) => {
                warn!(step = self.step, "the rebuild of the filter of the state keys panicked; the full one is kept");
                self.retry_later();
            }
        }
    }

    /// A rebuild failed: the next waits [`RETRY_AFTER`].
    fn retry_later(&mut self) {
        self.retry_after = Some(Instant::now() + RETRY_AFTER);
    }
}

impl Drop for KeyFilters {
    /// Stops running scans and waits for them: they hold the database open, which a store
    /// opened again in this process (a run starting over) needs to itself.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let filters = self.by_step.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        for at in filters.iter_mut() {
            if let Some(rebuild) = at.rebuild.take() {
                let _ = rebuild.scan.join();
            }
        }
    }
}

/// A filter of the keys in `step`'s family (None: it has too many, no family, or `stop` was
/// set), sized by RocksDB's estimate of them, and once more by their count if that was too low.
fn scan(db: &DB, step: usize, hasher: Hasher, stop: &AtomicBool) -> Result<Option<KeyFilter>, rocksdb::Error> {
    let Some(handle) = db.cf_handle(&super::family(step)) else { return Ok(None) };
    let estimate = db.property_int_value_cf(handle, "rocksdb.estimate-num-keys")?.unwrap_or(0);
    let started = Instant::now();
    let mut sized_for = usize::try_from(estimate).unwrap_or(usize::MAX);
    loop {
        let Some(mut filter) = KeyFilter::hashing_with(sized_for, hasher.clone()) else { return Ok(None) };
        let mut options = ReadOptions::default();
        // A scan of everything once: not what the block cache should keep.
        options.fill_cache(false);
        let mut iterator = db.raw_iterator_cf_opt(handle, options);
        iterator.seek_to_first();
        let mut keys = 0usize;
        while let Some(key) = iterator.key() {
            filter.insert(key);
            keys += 1;
            if keys.is_multiple_of(4096) && stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            iterator.next();
        }
        iterator.status()?;
        if !filter.is_full() {
            if keys > 0 {
                info!(step, keys, bytes = filter.bytes(), elapsed_ms = started.elapsed().as_millis() as u64, "built the filter of the state keys");
            }
            return Ok(Some(filter));
        }
        sized_for = keys;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_says_no_to_a_key_it_was_given_and_rarely_yes_to_others() {
        let keys = 100_000;
        let store_key = |index: usize| format!("[\"bids\",\"{{\\\"id\\\":{index}}}\"]").into_bytes();
        let mut filter = KeyFilter::sized_for(keys / 2).expect("a filter");
        for key in 0..keys {
            filter.insert(&store_key(key));
        }
        assert!(!filter.is_full(), "sized for {keys}");
        for key in 0..keys {
            assert!(filter.may_contain(&store_key(key)), "key {key}");
        }
        let false_positives = (keys..2 * keys).filter(|key| filter.may_contain(&store_key(*key))).count();
        // 1-2% expected at 10 bits per key.
        assert!(false_positives < keys * 3 / 100, "{false_positives} false positives of {keys}");
    }

    #[test]
    fn is_full_once_more_new_keys_came_than_it_was_sized_for() {
        let mut filter = KeyFilter::sized_for(0).expect("a filter");
        for _ in 0..10 * MIN_KEYS {
            filter.insert(b"the same key");
        }
        assert!(!filter.is_full(), "one key added again and again is one key");
        for key in 0..2 * MIN_KEYS {
            filter.insert(key.to_string().as_bytes());
        }
        assert!(filter.is_full());
    }

    #[test]
    fn a_family_beyond_the_limit_gets_none() {
        assert!(KeyFilter::sized_for(MAX_KEYS).is_none());
        assert!(KeyFilter::sized_for(MAX_KEYS / 2).is_some_and(|filter| filter.bytes() <= MAX_KEYS * BITS_PER_KEY / 8 + 64));
    }

    /// Keys written while a rebuild scans (after its snapshot) reach the rebuilt filter
    /// through the hashes kept aside, and the full filter answers for them meanwhile.
    #[test]
    fn a_rebuilt_filter_holds_the_keys_written_while_its_scan_ran() {
        let dir = tempfile::tempdir().expect("a directory");
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let db = Arc::new(DB::open_cf(&options, dir.path(), [super::super::family(0)]).expect("a database"));
        let filters = KeyFilters::build(&db, &[0]).expect("filters");
        let key = |index: usize| format!("{index:08}").into_bytes();
        // As the store writes: each key into the filters, then into the family.
        let write = |keys: std::ops::Range<usize>| {
            let mut adding = filters.adding();
            let handle = db.cf_handle(&super::super::family(0)).expect("the family");
            for index in keys {
                adding.add(0, &key(index));
                db.put_cf(handle, key(index), b"").expect("a put");
            }
        };
        let in_flight = |filters: &KeyFilters| filters.by_step.lock().expect("the lock")[0].rebuild.as_ref().map(|rebuild| rebuild.scan.is_finished());
        let mut rounds = 0;
        let mut written = 0;
        while rounds < 3 {
            // Enough new keys to fill the filter, then the write's end starts a scan.
            let fill = filters.by_step.lock().expect("the lock")[0].filter.as_ref().map_or(0, |filter| filter.capacity) + 1;
            write(written..written + fill);
            written += fill;
            filters.rebuild_full(&db);
            assert_eq!(in_flight(&filters).map(|_| ()), Some(()), "a rebuild started in round {rounds}");
            while in_flight(&filters) == Some(false) {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            // The scan's snapshot is taken: these keys are not in it.
            write(written..written + MIN_KEYS / 2);
            written += MIN_KEYS / 2;
            assert!((0..written).all(|index| filters.may_contain(0, &key(index))), "the full filter, round {rounds}");
            filters.rebuild_full(&db);
            assert_eq!(in_flight(&filters), None, "the rebuilt filter is in place");
            assert!((0..written).all(|index| filters.may_contain(0, &key(index))), "the rebuilt filter, round {rounds}");
            rounds += 1;
        }
        let absent = (written..written + 10_000).filter(|index| filters.may_contain(0, &key(*index))).count();
        assert!(absent < 300, "the rebuilt filter still rules out most absent keys: {absent} of 10000 maybe");
    }
}

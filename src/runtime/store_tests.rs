//! A dedup reading through the store, committing, aborting and restarting at random points,
//! against a plain model of dedup's semantics.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::*;
use crate::operators::dedup::config::Dedup;
use crate::operators::dedup::DedupOperator;
use crate::operators::committed::TimerChange;
use crate::operators::{Emitted, StateChange, StateEntryLimit, StepOutcome};

const WITHIN: i64 = 100;
const OWNER: &str = "input";
const PARTITION: i32 = 3;

fn spec() -> Dedup {
    spec_within(WITHIN)
}

fn spec_within(within: i64) -> Dedup {
    Dedup { key: vec!["id".into()], within: Duration::from_millis(within as u64) }
}

fn timer_of(_step: usize, _key: &str, value: &[u8]) -> Option<i64> {
    let time: i64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    Some(DedupOperator::expiry(WITHIN, time))
}

fn open(directory: &Path) -> StateStore {
    StateStore::open(directory, &[0], "generation", StoreMemory::default(), true, &timer_of).expect("the store opens")
}

fn reading_through(store: &StateStore) -> DedupOperator {
    reading_through_within(store, WITHIN)
}

fn reading_through_within(store: &StateStore, within: i64) -> DedupOperator {
    let mut dedup = DedupOperator::new(&spec_within(within), StateEntryLimit::default());
    dedup.read_through(store.backing().view(0, PARTITION, Some(OWNER)));
    dedup
}

/// What the runtime does when a batch commits: the changes, timers and key count of step 0
/// (one task: `partition`, `owner`) go to the store.
pub(super) fn write_batch(store: &StateStore, (partition, owner): (i32, &str), changes: &[StateChange], timers: Vec<TimerChange>, delta: i64) {
    let mut writes: Vec<StoreWrite> = changes
        .iter()
        .map(|change| {
            let value = change.value.as_ref().map(|value| value.to_string().into_bytes());
            StoreWrite::state(0, partition, changelog_key(Some(owner), &change.key), value)
        })
        .collect();
    for timer in timers {
        writes.push(StoreWrite::timer(0, partition, Some(owner), timer.time, &timer.key, timer.set, timer.value));
    }
    writes.push(StoreWrite::count(0, partition, delta));
    store.apply(&writes, &[], &[]).expect("the store takes the batch");
    assert_eq!(store.failure(), None);
}

fn commit(store: &StateStore, dedup: &mut DedupOperator) {
    let changes = dedup.take_changes();
    write_batch(store, (PARTITION, OWNER), &changes, dedup.take_timers(), dedup.take_key_delta());
}

/// Dedup's contract, kept plainly: key -> first event time, ended once the watermark reaches
/// it + within. `kept`: each key's latest first event time, until the watermark is a 64th of
/// `within` past its end (the store may keep an ended key's entry that long).
#[derive(Clone)]
struct Model {
    within: i64,
    first_seen: BTreeMap<String, i64>,
    kept: BTreeMap<String, i64>,
    watermark: i64,
}

impl Model {
    fn new(within: i64) -> Model {
        Model { within, first_seen: BTreeMap::new(), kept: BTreeMap::new(), watermark: i64::MIN }
    }

    fn process(&mut self, key: &str, time: i64) -> StepOutcome {
        if time + self.within <= self.watermark {
            return StepOutcome::Late(String::new());
        }
        if self.first_seen.contains_key(key) {
            return StepOutcome::Duplicate;
        }
        self.first_seen.insert(key.to_string(), time);
        self.kept.insert(key.to_string(), time);
        StepOutcome::Passed
    }

    fn advance(&mut self, watermark: i64) {
        self.watermark = self.watermark.max(watermark);
        let (now, within) = (self.watermark, self.within);
        self.first_seen.retain(|_, time| *time + within > now);
        self.kept.retain(|_, time| *time + within + (within / 64).max(1) > now);
    }
}

fn kind(outcome: &StepOutcome) -> &'static str {
    match outcome {
        StepOutcome::Passed => "passed",
        StepOutcome::Duplicate => "duplicate",
        StepOutcome::Late(_) => "late",
        StepOutcome::Dropped => "dropped",
    }
}

/// Random keys and out-of-order times, processed in batches that commit, abort (the batch
/// replays from the last commit with a fresh operator) or end in a restart (the store is
/// closed and opened again): every outcome matches the model's, and the store's key count
/// is the live keys' (`within` 100 ms: ended keys are removed at once) or between the live
/// keys' and those ended less than a 64th of `within` ago (6.4 s, scaled times: removal a
/// bucket late).
#[test]
fn a_dedup_reading_through_the_store_matches_the_model_across_commits_aborts_and_restarts() {
    for scale in [1, 64] {
        for seed in 0..10u64 {
            matches_the_model(seed, scale);
        }
    }
}

fn matches_the_model(seed: u64, scale: i64) {
    let within = WITHIN * scale;
    let mut random = StdRng::seed_from_u64(seed);
    let directory = tempfile::tempdir().expect("a temporary directory");
    // Now and then event time jumps past every key's expiry, so that the store is left
    // without timers and then gets new ones.
    let mut jump = 0;
    let records: Vec<(String, i64)> = (0..3000)
        .map(|index| {
            if random.random_range(0..200) == 0 {
                jump += 500;
            }
            (format!("k{}", random.random_range(0..60)), scale * (jump + index as i64 / 4 + random.random_range(-30..30)))
        })
        .collect();
    let mut store = Some(open(directory.path()));
    let mut dedup = reading_through_within(store.as_ref().expect("open"), within);
    let (mut model, mut committed_model) = (Model::new(within), None::<(usize, Model)>);
    let mut position = 0;
    let mut checked = 0;
    while position < records.len() {
        let (key, time) = &records[position];
        let mut out = Vec::new();
        let record = crate::operators::test_record(json!({ "id": key }), *time);
        let outcome = dedup.process(record, model.watermark, &mut out).expect("no record is refused");
        let expected = model.process(&Value::Object(crate::operators::key_of(&json!({ "id": key }).as_object().cloned().unwrap_or_default(), &["id".into()])).to_string(), *time);
        assert_eq!(kind(&outcome), kind(&expected), "seed {seed}, record {position} ({key} at {time})");
        assert_eq!(out.iter().filter(|emitted| matches!(emitted, Emitted::Record(_))).count(), usize::from(outcome == StepOutcome::Passed));
        checked += 1;
        position += 1;
        let watermark = model.watermark.max(time - 20 * scale);
        if watermark > model.watermark {
            dedup.advance(watermark);
            model.advance(watermark);
        }
        match random.random_range(0..100) {
            0..=5 => {
                commit(store.as_ref().expect("open"), &mut dedup);
                let count = store.as_ref().expect("open").key_count(0, PARTITION).expect("readable") as usize;
                let (live, kept) = (model.first_seen.len(), model.kept.len());
                assert!(live <= count && count <= kept, "seed {seed}, scale {scale}, record {position}: {count} keys, {live} live, {kept} kept");
                if scale == 1 {
                    assert_eq!(count, live, "seed {seed}, record {position}: ended keys are removed at once");
                }
                committed_model = Some((position, model.clone()));
            }
            6 => {
                // Abort: the batch's changes are dropped with the task; replay from the
                // last commit.
                let (at, state) = committed_model.clone().unwrap_or((0, Model::new(within)));
                (position, model) = (at, state);
                dedup = reading_through_within(store.as_ref().expect("open"), within);
            }
            7 => {
                commit(store.as_ref().expect("open"), &mut dedup);
                committed_model = Some((position, model.clone()));
                drop(dedup);
                drop(store.take());
                store = Some(open(directory.path()));
                dedup = reading_through_within(store.as_ref().expect("open"), within);
            }
            _ => {}
        }
    }
    assert!(checked >= records.len());
}

/// A batch's new keys cost the store one timer per expiry bucket (a 64th of `within`), not
/// one each; a key past its expiry is absent at once, though its entry is removed only when
/// the watermark reaches the end of its bucket, and a key that comes back in between starts
/// a new life in the same entry (counted once).
#[test]
fn a_batch_of_new_keys_gets_one_timer_per_expiry_bucket() {
    const WIDE: i64 = 6400;
    let directory = tempfile::tempdir().expect("a temporary directory");
    let store = open(directory.path());
    let mut dedup = reading_through_within(&store, WIDE);
    let mut out = Vec::new();
    let record = |index: i64, time: i64| crate::operators::test_record(json!({ "id": format!("k{index}") }), time);
    for index in 0..10_000 {
        assert_eq!(dedup.process(record(index, index), i64::MIN, &mut out), Ok(StepOutcome::Passed));
    }
    let changes = dedup.take_changes();
    let timers = dedup.take_timers();
    // Expiries 6,400..16,399 in buckets of 100 ending at 6,400, 6,500, ..., 16,400.
    assert_eq!(timers.len(), 101, "one timer per bucket");
    assert!(timers.iter().all(|timer| timer.set && timer.time % 100 == 0));
    write_batch(&store, (PARTITION, OWNER), &changes, timers, dedup.take_key_delta());
    assert_eq!(store.key_count(0, PARTITION).expect("readable"), 10_000);

    // k10 ended at 6,410, k60 ends at 6,460: at 6,450 one passes again and the other not.
    dedup.advance(6_450);
    assert_eq!(dedup.process(record(10, 6_450), 6_450, &mut out), Ok(StepOutcome::Passed), "ended, not yet removed");
    assert_eq!(dedup.process(record(60, 6_450), 6_450, &mut out), Ok(StepOutcome::Duplicate));
    let removed = |changes: &[StateChange]| changes.iter().filter(|change| change.value.is_none()).count();
    let changes = dedup.take_changes();
    assert_eq!(removed(&changes), 1, "only k0's bucket (ending at 6,400) was removed");
    write_batch(&store, (PARTITION, OWNER), &changes, dedup.take_timers(), dedup.take_key_delta());
    assert_eq!(store.key_count(0, PARTITION).expect("readable"), 9_999, "k10 counted once");

    // The bucket ending at 6,500 removes k1..k100, but not k10's new life.
    dedup.advance(6_500);
    let changes = dedup.take_changes();
    assert_eq!(removed(&changes), 99);
    write_batch(&store, (PARTITION, OWNER), &changes, dedup.take_timers(), dedup.take_key_delta());
    assert_eq!(store.key_count(0, PARTITION).expect("readable"), 9_900);
    assert_eq!(dedup.process(record(10, 6_500), 6_500, &mut out), Ok(StepOutcome::Duplicate), "k10's new life");
    assert_eq!(dedup.process(record(100, 6_500), 6_500, &mut out), Ok(StepOutcome::Passed));
}

/// Only this batch's keys are in memory once a batch commits; the rest is read from disk.
#[test]
fn committed_keys_leave_memory_and_are_still_seen() {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let store = open(directory.path());
    let mut dedup = reading_through(&store);
    let mut out = Vec::new();
    for index in 0..1000 {
        let record = crate::operators::test_record(json!({ "id": format!("k{index}") }), 10);
        assert_eq!(dedup.process(record, i64::MIN, &mut out), Ok(StepOutcome::Passed));
    }
    assert_eq!(dedup.state_keys(), 1000);
    commit(&store, &mut dedup);
    assert_eq!(dedup.state_keys(), 0, "committed keys are in the store only");
    // On disk, read through the block cache.
    store.flush().expect("flushed");
    store.take_cache_counts();
    let again = crate::operators::test_record(json!({ "id": "k7" }), 20);
    assert_eq!(dedup.process(again, i64::MIN, &mut out), Ok(StepOutcome::Duplicate));
    let (hits, misses) = store.take_cache_counts();
    assert!(hits + misses > 0, "the lookup went through the block cache");
    assert!(store.cache_bytes() > 0);
    // Another task's view (another partition) sees none of them.
    let mut other = DedupOperator::new(&spec(), StateEntryLimit::default());
    other.read_through(store.backing().view(0, PARTITION + 1, Some(OWNER)));
    let record = crate::operators::test_record(json!({ "id": "k7" }), 20);
    assert_eq!(other.process(record, i64::MIN, &mut out), Ok(StepOutcome::Passed));
    // The watermark passing their expiry ends them all, from the store's timers.
    dedup.advance(10 + WITHIN);
    let changes = dedup.take_changes();
    assert_eq!(changes.iter().filter(|change| change.value.is_none()).count(), 1000, "every key ended");
}

/// A batch's changelog lists its keys in the order they first changed (a key that came and
/// ended in the batch once, at its first place): the same records give the same changelog in
/// every instance, whatever seed its hash maps got.
#[test]
fn a_batch_changelog_follows_the_records_not_the_hash_seed() {
    let records: Vec<(String, i64)> = (0..200).map(|index| (format!("k{}", (index * 7919) % 200), index)).collect();
    let changelog = || {
        let directory = tempfile::tempdir().expect("a temporary directory");
        let store = open(directory.path());
        let mut dedup = reading_through(&store);
        let mut out = Vec::new();
        for (key, time) in &records {
            let record = crate::operators::test_record(json!({ "id": key }), *time);
            assert_eq!(dedup.process(record, i64::MIN, &mut out), Ok(StepOutcome::Passed));
        }
        // The first keys' state ends within the batch.
        dedup.advance(10 + WITHIN);
        dedup.take_changes().into_iter().map(|change| (change.key, change.value)).collect::<Vec<_>>()
    };
    let expected: Vec<(String, Option<Value>)> = records
        .iter()
        .map(|(key, time)| (json!({ "id": key }).to_string(), (*time > 10).then(|| json!(time))))
        .collect();
    for _ in 0..3 {
        assert_eq!(changelog(), expected);
    }
}

/// A batch's writes reach RocksDB in key order (for its memtables), yet of two writes of one
/// key in a batch the later still wins, whatever keys and partitions come between them.
#[test]
fn the_later_of_two_writes_of_a_key_in_one_batch_wins() {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let store = open(directory.path());
    let entry = |partition: i32, id: &str, value: Option<&str>| {
        let key = json!({ "id": id }).to_string();
        StoreWrite::state(0, partition, changelog_key(Some(OWNER), &key), value.map(|value| value.as_bytes().to_vec()))
    };
    let writes = [
        entry(5, "z", Some("1")),
        entry(2, "b", Some("2")),
        entry(5, "a", Some("3")),
        entry(5, "z", None),
        entry(2, "b", Some("4")),
        entry(5, "a", None),
        entry(2, "c", Some("6")),
        entry(5, "a", Some("5")),
    ];
    store.apply(&writes, &[], &[]).expect("the store takes the batch");
    let read = |partition: i32, id: &str| {
        let value = store.backing().view(0, partition, Some(OWNER)).get(&json!({ "id": id }).to_string());
        value.map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    };
    assert_eq!(read(5, "z"), None, "put, then deleted");
    assert_eq!(read(5, "a").as_deref(), Some("5"), "put, deleted, put again");
    assert_eq!(read(2, "b").as_deref(), Some("4"), "put twice");
    assert_eq!(read(2, "c").as_deref(), Some("6"));
    assert_eq!(read(2, "a"), None, "another partition's key");
}

/// A store made before timers were kept gets them when it opens, and its keys still expire.
#[test]
fn a_store_without_timers_gets_them_built_when_it_opens() {
    let directory = tempfile::tempdir().expect("a temporary directory");
    {
        let store = open(directory.path());
        let writes: Vec<StoreWrite> = (0..50)
            .map(|index| StoreWrite::state(0, PARTITION, changelog_key(Some(OWNER), &format!("{{\"id\":\"k{index}\"}}")), Some(b"5".to_vec())))
            .collect();
        store.apply(&writes, &[], &[]).expect("written");
        // As an earlier weir left it: no format entry, no timers.
        store.db.delete_cf(store.handle(OFFSETS).expect("offsets"), FORMAT_KEY).expect("deleted");
    }
    let store = open(directory.path());
    assert_eq!(store.key_count(0, PARTITION).expect("readable"), 50, "the keys are counted");
    let mut dedup = reading_through(&store);
    let mut out = Vec::new();
    let record = crate::operators::test_record(json!({ "id": "k3" }), 50);
    assert_eq!(dedup.process(record, i64::MIN, &mut out), Ok(StepOutcome::Duplicate), "the old state is read");
    dedup.advance(5 + WITHIN);
    let ended = dedup.take_changes().into_iter().filter(|change| change.value.is_none()).count();
    assert_eq!(ended, 50, "the built timers end every old key");
}

/// A store of format 5 (one timer per key) opens as format 6 without its timers built
/// again: they are valid as they are, and building them means reading the whole store.
#[test]
fn a_store_of_format_5_opens_without_building_its_timers() {
    let directory = tempfile::tempdir().expect("a temporary directory");
    {
        let store = open(directory.path());
        let entry = StoreWrite::state(0, PARTITION, changelog_key(Some(OWNER), "{\"id\":\"k1\"}"), Some(b"5".to_vec()));
        store.apply(&[entry], &[], &[]).expect("written");
        store.db.put_cf(store.handle(OFFSETS).expect("offsets"), FORMAT_KEY, b"5").expect("written");
    }
    let store = open(directory.path());
    let format = store.db.get_cf(store.handle(OFFSETS).expect("offsets"), FORMAT_KEY).expect("readable");
    assert_eq!(format.as_deref(), Some(FORMAT));
    let mut timers = 0;
    store.backing().view(0, PARTITION, Some(OWNER)).due_timers(i64::MIN, i64::MAX, &mut |_, _, _| timers += 1);
    assert_eq!(timers, 0, "the entry written without a timer has none built");
}

#[test]
fn timer_keys_sort_as_their_times() {
    let times = [i64::MIN, -5, -1, 0, 1, 7, 1 << 40, i64::MAX];
    let keys: Vec<Vec<u8>> = times.iter().map(|time| timer_key(Some(OWNER), *time, "k")).collect();
    assert!(keys.windows(2).all(|pair| pair[0] < pair[1]));
    for time in times {
        assert_eq!(time_of(&time_bytes(time)), Some(time));
    }
}


/// A store whose files are broken is deleted and opened empty where the changelogs hold the
/// state (a restore then reads them whole); where the store is the only copy (upsert mode)
/// opening it fails instead.
#[test]
fn a_broken_store_is_rebuilt_where_the_changelogs_hold_the_state_and_refused_where_not() {
    let directory = tempfile::tempdir().expect("a temporary directory");
    {
        let store = open(directory.path());
        let write = StoreWrite::state(0, PARTITION, changelog_key(Some(OWNER), "k"), Some(b"5".to_vec()));
        store.apply(&[write], &[(0, PARTITION, 10)], &[]).expect("written");
    }
    std::fs::write(directory.path().join("CURRENT"), "MANIFEST-999999\n").expect("CURRENT broken");
    let refused = StateStore::open(directory.path(), &[0], "generation", StoreMemory::default(), false, &timer_of);
    assert!(refused.is_err_and(|error| error.to_string().contains("opening the state store")));
    let store = open(directory.path());
    assert_eq!(store.offset(0, PARTITION).expect("readable"), None, "rebuilt empty: the restore reads the whole changelog");
    assert_eq!(store.get(0, PARTITION, Some(OWNER), "k").expect("readable"), None);
}

/// A count made by reading the keys counts a step's own entries, of every owner, and not
/// the bookkeeping beside them (input watermarks, the processing sequence) or another
/// partition's; batches then move it from there.
#[test]
fn a_recount_counts_the_state_keys_of_one_partition() {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let store = open(directory.path());
    let mut writes = Vec::new();
    for owner in [Some(OWNER), Some("other, \"quoted\""), None] {
        for index in 0..10 {
            writes.push(StoreWrite::state(0, PARTITION, changelog_key(owner, &format!("{{\"id\":\"k{index}\"}}")), Some(b"5".to_vec())));
            writes.push(StoreWrite::state(0, PARTITION, changelog_key(owner, &format!("[\"{{}}\",{index}]")), Some(b"{}".to_vec())));
        }
        writes.push(StoreWrite::state(0, PARTITION, changelog_key(owner, "watermark"), Some(b"5".to_vec())));
        writes.push(StoreWrite::state(0, PARTITION, changelog_key(owner, "sequence"), Some(b"5".to_vec())));
        writes.push(StoreWrite::state(0, PARTITION + 1, changelog_key(owner, "{\"id\":\"elsewhere\"}"), Some(b"5".to_vec())));
    }
    store.apply(&writes, &[], &[]).expect("written");
    assert_eq!(store.kept_count(0, PARTITION).expect("readable"), None, "nothing counted yet");
    assert_eq!(store.recount(0, PARTITION).expect("counted"), 60);
    store.apply(&[StoreWrite::count(0, PARTITION, -3)], &[], &[]).expect("written");
    assert_eq!(store.key_count(0, PARTITION).expect("readable"), 57);
    store.clear(0, PARTITION).expect("cleared");
    assert_eq!(store.kept_count(0, PARTITION).expect("readable"), None, "a clear drops the count");
}

/// The in-memory filter of state keys (key_filter.rs) never hides a key the store holds:
/// written by commits, by a restore (past the write-ahead log), found again after a reopen,
/// and across the rebuilds that many more keys than the filter's first size cause.
#[test]
fn every_state_key_written_is_read_back_through_a_view() {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let key = |index: usize| format!("{{\"id\":{index}}}");
    let entry = |index: usize| StoreWrite::state(0, PARTITION, changelog_key(Some(OWNER), &key(index)), Some(index.to_string().into_bytes()));
    let keys = 40 * key_filter::MIN_KEYS;
    let check = |store: &StateStore, written: usize| {
        let view = store.backing().view(0, PARTITION, Some(OWNER));
        for index in 0..written {
            assert_eq!(view.get(&key(index)), Some(index.to_string().into_bytes()), "key {index} of {written}");
        }
        let absent = (written..written + 1000).filter(|index| view.get(&key(*index)).is_some()).count();
        assert_eq!(absent, 0, "keys never written read as absent");
        assert_eq!(store.failure(), None);
    };
    let store = open(directory.path());
    // Commits of 7 keys each, then a restore's unlogged chunks of 50.
    for start in (0..keys / 2).step_by(7) {
        let writes: Vec<StoreWrite> = (start..(start + 7).min(keys / 2)).map(entry).collect();
        store.apply(&writes, &[], &[]).expect("a commit");
    }
    check(&store, keys / 2);
    for start in (keys / 2..keys).step_by(50) {
        let writes: Vec<StoreWrite> = (start..(start + 50).min(keys)).map(entry).collect();
        store.apply_unlogged(&writes).expect("a restore chunk");
    }
    check(&store, keys);
    drop(store);
    let store = open(directory.path());
    check(&store, keys);
    // A key written to another partition is not this view's.
    store.apply(&[StoreWrite::state(0, PARTITION + 1, changelog_key(Some(OWNER), &key(keys)), Some(b"1".to_vec()))], &[], &[]).expect("a commit");
    check(&store, keys);
}

/// The changelog key is the JSON pair `[owner, key]` as serde_json writes it: the key of
/// every changelog record and store entry written before it was written in place.
#[test]
fn changelog_keys_are_the_json_pair() {
    for owner in [None, Some("clicks"), Some("we\"ird\\topic")] {
        for key in ["", "k", r#"{"id":1,"user":"u\"1"}"#, "é\u{1}\n\t", &"x".repeat(300)] {
            assert_eq!(changelog_key(owner, key), serde_json::to_vec(&(owner, key)).unwrap(), "{owner:?} {key:?}");
        }
    }
}

//! A running aggregate reading through the store, committing, aborting and restarting at
//! random points, against the same step holding all its state in memory (restored from its
//! changelog entries after an abort).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::*;
use crate::operators::aggregate::config::{OnExpire, RunningAggregate};
use crate::operators::aggregate::AggregateOperator;
use crate::operators::window::config::Aggregate;
use crate::operators::{Emitted, StateChange, StateEntryLimit};

const OWNER: &str = "input";
const PARTITION: i32 = 1;

fn spec(ttl: Option<u64>, on_expire: OnExpire) -> RunningAggregate {
    RunningAggregate {
        group_by: vec!["user".into()],
        aggregates: vec![("n".into(), Aggregate::Count), ("last".into(), Aggregate::Last("tag".into()))],
        ttl: ttl.map(Duration::from_millis),
        on_expire,
    }
}

fn open(directory: &Path, spec: &RunningAggregate) -> StateStore {
    let timer_of = |_step: usize, value: &[u8]| AggregateOperator::timer_of(spec, value);
    StateStore::open(directory, &[0], "generation", StoreMemory::default(), true, &timer_of).expect("the store opens")
}

fn reading_through(store: &StateStore, spec: &RunningAggregate) -> AggregateOperator {
    let mut operator = AggregateOperator::new(spec, None, StateEntryLimit::default());
    operator.read_through(store.backing().view(0, PARTITION, Some(OWNER)));
    operator
}

/// What the runtime does when a batch commits: the changes and timers go to the store.
fn commit(store: &StateStore, operator: &mut AggregateOperator) -> Vec<StateChange> {
    let changes = operator.take_changes();
    let mut writes: Vec<StoreWrite> = changes
        .iter()
        .map(|change| {
            let value = change.value.as_ref().map(|value| value.to_string().into_bytes());
            StoreWrite::state(0, PARTITION, changelog_key(Some(OWNER), &change.key), value)
        })
        .collect();
    for timer in operator.take_timers() {
        writes.push(StoreWrite::timer(0, PARTITION, Some(OWNER), timer.time, &timer.key, timer.set));
    }
    store.apply(&writes, &[], &[]).expect("the store takes the batch");
    assert_eq!(store.failure(), None);
    changes
}

/// What downstream sees: (user, count, last tag, event time), or (user, tombstone).
fn shown(out: &[Emitted<'_>]) -> Vec<String> {
    out.iter()
        .map(|item| match item {
            Emitted::Record(record) => {
                format!("{} n={} last={} at {}", record.fields["user"], record.fields["n"], record.fields["last"], record.event_time)
            }
            Emitted::Tombstone(key) => format!("{} tombstone", key["user"]),
            Emitted::Forward(_) => "forward".to_string(),
        })
        .collect()
}

/// Random groups, out-of-order times with ties (so that `last` needs the processing sequence
/// across batches) and jumps past every ttl, in batches that commit, abort (the batch replays
/// from the last commit) or end in a restart: what the store-backed step emits, and the
/// changelog entries it writes, match the in-memory step's.
#[test]
fn an_aggregate_reading_through_the_store_matches_the_one_in_memory() {
    for (seed, ttl, on_expire) in
        [(0, Some(100), OnExpire::Tombstone), (1, Some(100), OnExpire::Keep), (2, None, OnExpire::Keep), (3, Some(40), OnExpire::Tombstone)]
    {
        let spec = spec(ttl, on_expire);
        let mut random = StdRng::seed_from_u64(seed);
        let directory = tempfile::tempdir().expect("a temporary directory");
        let mut jump = 0;
        let records: Vec<(String, String, i64)> = (0..3000)
            .map(|index| {
                if random.random_range(0..300) == 0 {
                    jump += 500;
                }
                let time = jump + index as i64 / 8 + random.random_range(-10..10);
                (format!("u{}", random.random_range(0..40)), format!("t{index}"), time)
            })
            .collect();
        let mut store = Some(open(directory.path(), &spec));
        let mut through = reading_through(store.as_ref().expect("open"), &spec);
        let mut memory = AggregateOperator::new(&spec, None, StateEntryLimit::default());
        // The committed changelog, the position and watermark it reached.
        let (mut changelog, mut committed_at) = (Vec::<StateChange>::new(), (0usize, i64::MIN));
        let (mut position, mut watermark, mut emitted) = (0, i64::MIN, 0usize);
        while position < records.len() {
            let (user, tag, time) = &records[position];
            let record = || crate::operators::test_record(json!({ "user": user, "tag": tag }), *time);
            let (mut expected, mut seen) = (Vec::new(), Vec::new());
            let outcome = memory.process(record(), watermark, &mut expected);
            assert_eq!(through.process(record(), watermark, &mut seen), outcome, "seed {seed}, record {position}");
            position += 1;
            if time - 20 > watermark {
                watermark = time - 20;
                memory.advance(watermark, &mut expected);
                through.advance(watermark, &mut seen);
            }
            let action = random.random_range(0..100);
            if action <= 7 {
                memory.commit(&mut expected);
                through.commit(&mut seen);
            }
            assert_eq!(shown(&seen), shown(&expected), "seed {seed}, record {position}");
            emitted += seen.len();
            match action {
                0..=5 => {
                    let changes = commit(store.as_ref().expect("open"), &mut through);
                    assert_eq!(changes, memory.take_changes(), "seed {seed}, record {position}: the changelog entries");
                    changelog.extend(changes);
                    committed_at = (position, watermark);
                }
                6 => {
                    // Abort: both drop the batch and go on from the last commit.
                    (position, watermark) = committed_at;
                    through = reading_through(store.as_ref().expect("open"), &spec);
                    memory = AggregateOperator::new(&spec, None, StateEntryLimit::default());
                    for change in &changelog {
                        memory.restore(&change.key, change.value.as_ref()).expect("restores");
                    }
                }
                7 => {
                    changelog.extend(commit(store.as_ref().expect("open"), &mut through));
                    memory.take_changes();
                    committed_at = (position, watermark);
                    drop(through);
                    drop(store.take());
                    store = Some(open(directory.path(), &spec));
                    through = reading_through(store.as_ref().expect("open"), &spec);
                }
                _ => {}
            }
        }
        assert!(emitted > 1000, "seed {seed}: {emitted} results");
        if ttl.is_some() {
            assert!(changelog.iter().any(|change| change.value.is_none()), "seed {seed}: groups ended");
        }
    }
}

/// Only this batch's groups are in memory once a batch commits; a committed group goes on
/// from its stored state, and its store timer ends it.
#[test]
fn committed_groups_leave_memory_and_end_by_their_timers() {
    let spec = spec(Some(100), OnExpire::Tombstone);
    let directory = tempfile::tempdir().expect("a temporary directory");
    let store = open(directory.path(), &spec);
    let mut operator = reading_through(&store, &spec);
    let mut out = Vec::new();
    for index in 0..500 {
        let record = crate::operators::test_record(json!({ "user": format!("u{}", index % 250), "tag": "a" }), 10);
        operator.process(record, i64::MIN, &mut out).expect("added");
    }
    operator.commit(&mut out);
    assert_eq!(operator.state_keys(), 250);
    commit(&store, &mut operator);
    assert_eq!(operator.state_keys(), 0, "committed groups are in the store only");
    out.clear();
    let record = crate::operators::test_record(json!({ "user": "u7", "tag": "b" }), 50);
    operator.process(record, i64::MIN, &mut out).expect("added");
    operator.commit(&mut out);
    assert_eq!(shown(&out), ["\"u7\" n=3 last=\"b\" at 50"]);
    commit(&store, &mut operator);
    out.clear();
    operator.advance(110, &mut out);
    assert_eq!(out.len(), 249, "every group but u7 ends at 10 + 100: {:?}", &shown(&out)[..3]);
    let changes = commit(&store, &mut operator);
    assert_eq!(changes.iter().filter(|change| change.value.is_none()).count(), 249);
    out.clear();
    operator.advance(150, &mut out);
    assert_eq!(shown(&out), ["\"u7\" tombstone"], "u7's moved timer");
    commit(&store, &mut operator);
    out.clear();
    operator.advance(10_000, &mut out);
    assert!(out.is_empty(), "nothing is left to end: {:?}", shown(&out));
    commit(&store, &mut operator);
    let timers = store.db.iterator_cf(store.handle(&timer_family(0)).expect("the timers"), IteratorMode::Start).count();
    assert_eq!(timers, 0, "a moved timer's old place is cleared, every fired one too");
}

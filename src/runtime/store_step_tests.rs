//! Running aggregates, windows and joins reading through the store, committing, aborting
//! and restarting at random points, against the same steps holding all their state in
//! memory (restored from their changelog entries after an abort).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rocksdb::IteratorMode;
use serde_json::json;

use super::*;
use crate::config::{FieldType, Schema};
use crate::operators::aggregate::config::{OnExpire, RunningAggregate};
use crate::operators::lookup::Tables;
use crate::operators::window::config::{Aggregate, EmitMode, Window, WindowKind};
use crate::operators::{Emitted, InputHeaders, Operator, Provenance, StateChange, StateEntryLimit, Step};

const OWNER: &str = "input";
const PARTITION: i32 = 1;

fn aggregates() -> Vec<(String, Aggregate)> {
    vec![("n".into(), Aggregate::Count), ("last".into(), Aggregate::Last("tag".into()))]
}

fn aggregate(ttl: Option<u64>, on_expire: OnExpire) -> Step {
    Step::Aggregate(RunningAggregate { group_by: vec!["user".into()], aggregates: aggregates(), ttl: ttl.map(Duration::from_millis), on_expire })
}

fn window(kind: WindowKind, lateness: u64, emit: EmitMode) -> Step {
    Step::Window(Window { group_by: vec!["user".into()], kind, allowed_lateness: Duration::from_millis(lateness), aggregates: aggregates(), emit })
}

/// A join of `left` and `right` records on `user` (the records' topic says their side).
fn join(kind: &str, lower: &str, upper: &str) -> Step {
    let source = |name: &str| {
        format!("  {name}:\n    topics: [{name}]\n    format: json\n    schema: {{ user: string, tag: string, ts: long }}\n    event_time: {{ field: ts, unit: millis }}\n    watermark: {{ max_out_of_orderness: 1s }}\n")
    };
    let text = format!(
        "name: t\nsources:\n{}{}join:\n  left: left\n  right: right\n  type: {kind}\n  on: [user]\n  within: {{ lower: {lower}, upper: {upper} }}\nsink:\n  topic: out\n",
        source("left"),
        source("right")
    );
    let pipeline = crate::plan::parse_pipeline(&text).expect("a valid pipeline");
    pipeline.steps.into_iter().find(|step| matches!(step, Step::Join(_))).expect("a join step")
}

fn build(step: &Step) -> Operator {
    let schema = Schema { fields: vec![("user".into(), FieldType::String), ("tag".into(), FieldType::String)] };
    Operator::build(step, &schema, StateEntryLimit::default(), &mut Tables::default()).expect("the step builds")
}

fn open(directory: &Path, step: &Step) -> StateStore {
    let timer_of = |_step: usize, key: &str, value: &[u8]| step.timer_of(key, value);
    StateStore::open(directory, &[0], "generation", StoreMemory::default(), true, &timer_of).expect("the store opens")
}

fn reading_through(store: &StateStore, step: &Step) -> Operator {
    assert!(step.reads_through_store());
    let mut operator = build(step);
    operator.read_through(store.backing().view(0, PARTITION, Some(OWNER)));
    operator
}

/// What the runtime does when a batch commits (see [`super::tests::write_batch`]).
fn commit(store: &StateStore, operator: &mut Operator) -> Vec<StateChange> {
    let changes = operator.take_changes();
    super::tests::write_batch(store, (PARTITION, OWNER), &changes, operator.take_timers(), operator.take_key_delta());
    changes
}

fn timers(store: &StateStore) -> usize {
    store.db.iterator_cf(store.handle(&timer_family(0)).expect("the timers"), IteratorMode::Start).count()
}

/// What downstream sees: each result's key, fields and event time, or a tombstone's key.
fn shown(out: &[Emitted<'_>]) -> Vec<String> {
    out.iter()
        .map(|item| match item {
            Emitted::Record(record) => format!("{:?} {:?} at {}", record.key, record.fields, record.event_time),
            Emitted::Tombstone(key) => format!("{key:?} tombstone"),
            Emitted::Forward(_) => "forward".to_string(),
        })
        .collect()
}

/// Random groups, out-of-order times with ties (so that `last` needs the processing
/// sequence across batches) and jumps past every ttl and window, in batches that commit,
/// abort (the batch replays from the last commit) or end in a restart: what the
/// store-backed step emits, and the changelog entries it writes, match the in-memory
/// step's; and once everything has ended, no timer is left in the store.
#[test]
fn steps_reading_through_the_store_match_the_ones_in_memory() {
    let tumbling = WindowKind::Tumbling { size: Duration::from_millis(50) };
    let hopping = WindowKind::Hopping { size: Duration::from_millis(60), slide: Duration::from_millis(20) };
    let session = |gap| WindowKind::Session { gap: Duration::from_millis(gap) };
    let steps = [
        aggregate(Some(100), OnExpire::Tombstone),
        aggregate(Some(40), OnExpire::Keep),
        aggregate(None, OnExpire::Keep),
        window(tumbling, 0, EmitMode::Final),
        window(tumbling, 30, EmitMode::Update),
        window(hopping, 10, EmitMode::Final),
        window(hopping, 0, EmitMode::Update),
        window(session(8), 0, EmitMode::Final),
        window(session(5), 15, EmitMode::Update),
        join("full", "-20ms", "20ms"),
        join("inner", "0ms", "10ms"),
        join("left", "-5ms", "0ms"),
    ];
    for (seed, step) in steps.iter().enumerate() {
        let mut random = StdRng::seed_from_u64(seed as u64);
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
        let mut store = Some(open(directory.path(), step));
        let mut through = reading_through(store.as_ref().expect("open"), step);
        let mut memory = build(step);
        // The committed changelog, the position and watermark it reached.
        let (mut changelog, mut committed_at) = (Vec::<StateChange>::new(), (0usize, i64::MIN));
        let (mut position, mut watermark, mut emitted) = (0, i64::MIN, 0usize);
        while position < records.len() {
            let (user, tag, time) = &records[position];
            let (offset, topic) = (position as i64, if position % 3 == 0 { "right" } else { "left" });
            let record = || {
                let mut record = crate::operators::test_record(json!({ "user": user, "tag": tag, "ts": time }), *time);
                record.provenance = Some(Provenance { topic, partition: 0, offset, timestamp: None, headers: InputHeaders::Read(&[]), key: None });
                record
            };
            let (mut expected, mut seen) = (Vec::new(), Vec::new());
            let outcome = memory.process(record(), watermark, &mut expected);
            assert_eq!(through.process(record(), watermark, &mut seen), outcome, "step {seed}, record {position}");
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
            assert_eq!(shown(&seen), shown(&expected), "step {seed}, record {position}");
            emitted += seen.len();
            match action {
                0..=5 => {
                    let changes = commit(store.as_ref().expect("open"), &mut through);
                    assert_eq!(changes, memory.take_changes(), "step {seed}, record {position}: the changelog entries");
                    let count = store.as_ref().expect("open").key_count(0, PARTITION).expect("readable");
                    assert_eq!(count as usize, memory.state_keys(), "step {seed}, record {position}: the store's key count");
                    changelog.extend(changes);
                    committed_at = (position, watermark);
                }
                6 => {
                    // Abort: both drop the batch and go on from the last commit.
                    (position, watermark) = committed_at;
                    through = reading_through(store.as_ref().expect("open"), step);
                    memory = build(step);
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
                    store = Some(open(directory.path(), step));
                    through = reading_through(store.as_ref().expect("open"), step);
                }
                _ => {}
            }
        }
        assert!(emitted > 500, "step {seed}: {emitted} results");
        let ends = !matches!(step, Step::Aggregate(aggregate) if aggregate.ttl.is_none());
        if ends {
            assert!(changelog.iter().any(|change| change.value.is_none()), "step {seed}: state ended");
            // Everything ends once the watermark is far past the last record.
            let store = store.as_ref().expect("open");
            commit(store, &mut through);
            through.advance(jump + 10_000, &mut Vec::new());
            through.commit(&mut Vec::new());
            commit(store, &mut through);
            assert_eq!(timers(store), 0, "step {seed}: every timer fired and was cleared");
            assert_eq!(store.key_count(0, PARTITION).expect("readable"), 0, "step {seed}: no key is left");
        }
    }
}

/// Only this batch's groups are in memory once a batch commits; a committed group goes on
/// from its stored state, and its store timer ends it.
#[test]
fn committed_groups_leave_memory_and_end_by_their_timers() {
    let step = aggregate(Some(100), OnExpire::Tombstone);
    let directory = tempfile::tempdir().expect("a temporary directory");
    let store = open(directory.path(), &step);
    let mut operator = reading_through(&store, &step);
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
    assert_eq!(out.len(), 1);
    let Some(Emitted::Record(result)) = out.first() else { panic!("{:?}", shown(&out)) };
    assert_eq!((&result.fields["n"], &result.fields["last"], result.event_time), (&json!(3), &json!("b"), 50), "from the stored state");
    commit(&store, &mut operator);
    out.clear();
    operator.advance(110, &mut out);
    assert_eq!(out.len(), 249, "every group but u7 ends at 10 + 100");
    let changes = commit(&store, &mut operator);
    assert_eq!(changes.iter().filter(|change| change.value.is_none()).count(), 249);
    out.clear();
    operator.advance(150, &mut out);
    assert_eq!(shown(&out).len(), 1, "u7's moved timer: {:?}", shown(&out));
    assert!(matches!(out.first(), Some(Emitted::Tombstone(key)) if key["user"] == "u7"));
    commit(&store, &mut operator);
    out.clear();
    operator.advance(10_000, &mut out);
    assert!(out.is_empty(), "nothing is left to end: {:?}", shown(&out));
    commit(&store, &mut operator);
    assert_eq!(timers(&store), 0, "a moved timer's old place is cleared, every fired one too");
}

/// A store an earlier weir kept holds a join's buffered records but no `sequence` entry: the
/// join numbers its next records past the highest committed one, never over one of them.
#[test]
fn a_join_without_a_committed_sequence_numbers_past_its_committed_records() {
    let step = join("full", "-1s", "1s");
    let directory = tempfile::tempdir().expect("a temporary directory");
    let store = open(directory.path(), &step);
    let mut operator = reading_through(&store, &step);
    let record = |user: &str, offset: i64| {
        let mut record = crate::operators::test_record(json!({ "user": user, "tag": "a", "ts": 10 }), 10);
        record.provenance = Some(Provenance { topic: "left", partition: 0, offset, timestamp: None, headers: InputHeaders::Read(&[]), key: None });
        record
    };
    for offset in 0..5 {
        operator.process(record(if offset == 4 { "v" } else { "u" }, offset), i64::MIN, &mut Vec::new()).expect("buffered");
    }
    let changes = commit(&store, &mut operator);
    assert!(changes.iter().any(|change| change.key == "sequence"));
    let mut sequence_key = partition_prefix(PARTITION);
    sequence_key.extend_from_slice(&changelog_key(Some(OWNER), "sequence"));
    store.db.delete_cf(store.handle(&family(0)).expect("the family"), sequence_key).expect("deleted");
    let mut operator = reading_through(&store, &step);
    operator.process(record("u", 5), i64::MIN, &mut Vec::new()).expect("buffered");
    let changes = operator.take_changes();
    let keys: Vec<&str> = changes.iter().map(|change| change.key.as_str()).collect();
    assert_eq!(keys, [r#"["{\"user\":\"u\"}","left",5]"#, "sequence"], "the highest committed was 4 (under v: found by a scan of every key)");
}

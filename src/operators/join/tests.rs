//! Unit tests of the join step.

use super::*;

fn spec(kind: JoinKind, lower: i64, upper: i64) -> JoinSpec {
    JoinSpec { left: "ads".into(), right: "clicks".into(), kind, on: vec!["ad".into()], lower, upper, keep_sources: false }
}

fn record(ad: &str, id: u64, time: i64) -> Record<'static> {
    let fields = serde_json::json!({ "ad": ad, "id": id }).as_object().cloned().unwrap();
    Record { fields, event_time: time, provenance: None, key: None, upsert: false, id: None }
}

/// Each emitted record as `(left id or null, right id or null, event time)`.
fn pairs(out: &[Emitted<'_>]) -> Vec<(Value, Value, i64)> {
    out.iter()
        .map(|item| match item {
            Emitted::Record(record) => (
                record.fields["ads"].get("id").cloned().unwrap_or(Value::Null),
                record.fields["clicks"].get("id").cloned().unwrap_or(Value::Null),
                record.event_time,
            ),
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

#[test]
fn pairs_match_at_both_bounds_inclusive_and_not_beyond() {
    let mut join = JoinOperator::new(spec(JoinKind::Inner, 0, 10), StateEntryLimit::default());
    let mut out = Vec::new();
    join.process(record("a", 1, 100), Side::Left, i64::MIN, &mut out).unwrap();
    for (id, time) in [(10, 99), (11, 100), (12, 110), (13, 111)] {
        join.process(record("a", id, time), Side::Right, i64::MIN, &mut out).unwrap();
    }
    assert_eq!(pairs(&out), vec![(1.into(), 11.into(), 100), (1.into(), 12.into(), 110)]);
}

#[test]
fn every_pair_when_keys_repeat_on_both_sides_whatever_the_order() {
    let mut join = JoinOperator::new(spec(JoinKind::Inner, -5, 5), StateEntryLimit::default());
    let mut out = Vec::new();
    join.process(record("a", 1, 100), Side::Left, i64::MIN, &mut out).unwrap();
    join.process(record("a", 10, 103), Side::Right, i64::MIN, &mut out).unwrap();
    join.process(record("b", 11, 100), Side::Right, i64::MIN, &mut out).unwrap();
    join.process(record("a", 2, 98), Side::Left, i64::MIN, &mut out).unwrap();
    join.process(record("a", 12, 96), Side::Right, i64::MIN, &mut out).unwrap();
    let mut found = pairs(&out);
    found.sort_by_key(|(left, right, _)| (left.as_u64(), right.as_u64()));
    assert_eq!(
        found,
        vec![(1.into(), 10.into(), 103), (1.into(), 12.into(), 100), (2.into(), 10.into(), 103), (2.into(), 12.into(), 98)]
    );
}

#[test]
fn outer_rows_come_when_the_watermark_proves_no_match_can_come() {
    let mut join = JoinOperator::new(spec(JoinKind::Full, 0, 10), StateEntryLimit::default());
    let mut out = Vec::new();
    join.process(record("a", 1, 100), Side::Left, i64::MIN, &mut out).unwrap();
    join.process(record("b", 20, 105), Side::Right, i64::MIN, &mut out).unwrap();
    join.process(record("c", 2, 100), Side::Left, i64::MIN, &mut out).unwrap();
    join.process(record("c", 21, 104), Side::Right, i64::MIN, &mut out).unwrap();
    assert_eq!(pairs(&out), vec![(2.into(), 21.into(), 104)]);
    out.clear();
    // At 110 a right record at 110 could still match the left one at 100.
    join.advance(110, &mut out);
    assert_eq!(pairs(&out), vec![(Value::Null, 20.into(), 105)], "b's right record (ends at 105) is over");
    out.clear();
    join.advance(111, &mut out);
    assert_eq!(pairs(&out), vec![(1.into(), Value::Null, 100)], "a's left record; c's matched ones end silently");
    assert_eq!(join.state_keys(), 0);
}

#[test]
fn inner_and_one_sided_joins_emit_only_their_outer_rows() {
    for (kind, expected) in [
        (JoinKind::Inner, vec![]),
        (JoinKind::Left, vec![(1.into(), Value::Null, 100)]),
        (JoinKind::Right, vec![(Value::Null, 20.into(), 100)]),
    ] {
        let mut join = JoinOperator::new(spec(kind, 0, 0), StateEntryLimit::default());
        let mut out = Vec::new();
        join.process(record("a", 1, 100), Side::Left, i64::MIN, &mut out).unwrap();
        join.process(record("b", 20, 100), Side::Right, i64::MIN, &mut out).unwrap();
        join.advance(i64::MAX, &mut out);
        assert_eq!(pairs(&out), expected, "{kind:?}");
    }
}

#[test]
fn a_record_before_the_watermark_is_late() {
    let mut join = JoinOperator::new(spec(JoinKind::Full, 0, 10), StateEntryLimit::default());
    let mut out = Vec::new();
    assert_eq!(join.process(record("a", 1, 100), Side::Left, 100, &mut out), Ok(StepOutcome::Passed));
    assert!(matches!(join.process(record("a", 2, 99), Side::Right, 100, &mut out), Ok(StepOutcome::Late(_))));
    assert_eq!(join.state_keys(), 1);
}

/// A restored operator matches, ends and emits exactly as the one whose changes it read.
#[test]
fn a_restored_join_goes_on_as_the_original() {
    let mut original = JoinOperator::new(spec(JoinKind::Full, -5, 5), StateEntryLimit::default());
    let mut changelog: std::collections::BTreeMap<String, Value> = Default::default();
    let mut out = Vec::new();
    let inputs = [("a", 1, 100, Side::Left), ("a", 10, 104, Side::Right), ("b", 2, 100, Side::Left), ("c", 11, 101, Side::Right)];
    for (ad, id, time, side) in inputs {
        original.process(record(ad, id, time), side, i64::MIN, &mut out).unwrap();
    }
    original.advance(100, &mut out);
    for change in original.take_changes() {
        match change.value {
            Some(value) => changelog.insert(change.key, value),
            None => changelog.remove(&change.key),
        };
    }
    let mut restored = JoinOperator::new(spec(JoinKind::Full, -5, 5), StateEntryLimit::default());
    for (key, value) in &changelog {
        restored.restore(key, Some(value)).unwrap();
    }
    assert_eq!(restored.state_keys(), original.state_keys());
    let (mut from_original, mut from_restored) = (Vec::new(), Vec::new());
    for (join, out) in [(&mut original, &mut from_original), (&mut restored, &mut from_restored)] {
        join.process(record("b", 12, 103), Side::Right, 100, out).unwrap();
        join.advance(i64::MAX, out);
    }
    assert_eq!(pairs(&from_restored), pairs(&from_original));
    assert_eq!(
        pairs(&from_original),
        vec![(2.into(), 12.into(), 103), (Value::Null, 11.into(), 101)],
        "a's pair was emitted before; c's right record is unmatched"
    );
}

/// A record whose buffered entry the producer could not send goes to `on_error.process`:
/// it neither matches nor is buffered, and the records after it join as before.
#[test]
fn a_record_too_large_for_the_changelog_is_refused_and_the_state_left_alone() {
    let limit = StateEntryLimit::under_message_max_bytes(3000);
    let mut join = JoinOperator::new(spec(JoinKind::Full, 0, 10), limit);
    let mut out = Vec::new();
    join.process(record("a", 1, 100), Side::Left, i64::MIN, &mut out).unwrap();
    join.take_changes();
    let mut large = record("a", 2, 101);
    large.fields.insert("payload".into(), Value::from("p".repeat(limit.bytes())));
    let refused = join.process(large, Side::Right, i64::MIN, &mut out);
    assert!(refused.is_err_and(|error| error.0.contains("join state")), "refused");
    assert!(out.is_empty(), "it matched nothing");
    assert_eq!(join.state_keys(), 1, "nothing buffered");
    assert_eq!(join.take_changes(), Vec::new(), "no changelog entry, not even the left record's `matched`");
    // A key of quotes is escaped twice on its way into the changelog key.
    let quotes = "\"".repeat(limit.bytes() / 5);
    assert!(join.process(record(&quotes, 3, 101), Side::Right, i64::MIN, &mut out).is_err(), "escaped size counts");
    join.process(record("a", 4, 102), Side::Right, i64::MIN, &mut out).unwrap();
    assert_eq!(pairs(&out), vec![(1.into(), 4.into(), 102)]);
    assert_eq!(join.state_keys(), 2);
}

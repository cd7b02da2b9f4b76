//! Unit tests of the window step.

use std::time::Duration;

use super::*;

fn window(kind: WindowKind, aggregates: &[(&str, Aggregate)]) -> Window {
    Window {
        group_by: vec!["user".into()],
        kind,
        allowed_lateness: Duration::ZERO,
        aggregates: aggregates.iter().map(|(name, aggregate)| (name.to_string(), aggregate.clone())).collect(),
        emit: EmitMode::Final,
    }
}

fn record(user: &str, tag: &str, time: i64) -> Record<'static> {
    crate::operators::test_record(serde_json::json!({ "user": user, "tag": tag }), time)
}

/// The closed windows' results, as (user, tags, last tag).
fn results(out: &[Emitted<'_>]) -> Vec<(Value, Value, Value)> {
    out.iter()
        .filter_map(|item| match item {
            Emitted::Record(record) => {
                Some((record.fields["user"].clone(), record.fields["tags"].clone(), record.fields["last"].clone()))
            }
            _ => None,
        })
        .collect()
}

/// A window whose changelog entry would outgrow what the producer can send refuses the
/// record that would do it, in every window it belongs to, and goes on with the others:
/// a single value too large, and a count_distinct set that grows past the limit.
#[test]
fn a_record_that_would_make_a_window_too_large_is_refused_and_the_windows_left_alone() {
    let limit = StateEntryLimit::under_message_max_bytes(5000);
    let aggregates =
        [("tags", Aggregate::CountDistinct("tag".into())), ("last", Aggregate::Last("tag".into()))];
    let kinds = [
        WindowKind::Tumbling { size: Duration::from_millis(100) },
        WindowKind::Hopping { size: Duration::from_millis(100), slide: Duration::from_millis(50) },
        WindowKind::Session { gap: Duration::from_millis(100) },
    ];
    for kind in kinds {
        let mut operator = WindowOperator::new(&window(kind, &aggregates), None, limit);
        let mut out = Vec::new();
        assert_eq!(operator.process(record("u", "a", 10), i64::MIN, &mut out), Ok(StepOutcome::Passed));
        let windows = operator.state_keys();
        operator.take_changes();
        // One value over the limit alone.
        let refused = operator.process(record("u", &"x".repeat(limit.bytes()), 20, ), i64::MIN, &mut out);
        assert!(refused.is_err_and(|error| error.0.contains("window state")), "{kind:?}: one large value");
        assert_eq!(operator.take_changes(), Vec::new(), "{kind:?}: nothing changed, not even the sequence");
        // Distinct values that fit one by one, until the set would not.
        let tag = |index: usize| format!("{index:04}{}", "t".repeat(600));
        let mut kept = 1;
        let mut refused_at = None;
        for index in 0..10 {
            match operator.process(record("u", &tag(index), 30), i64::MIN, &mut out) {
                Ok(StepOutcome::Passed) => kept += 1,
                Ok(other) => panic!("{kind:?}: {other:?}"),
                Err(_) => {
                    refused_at = Some(index);
                    break;
                }
            }
        }
        let refused_at = refused_at.unwrap_or_else(|| panic!("{kind:?}: the set never reached the limit"));
        // Five 600-byte tags and the last one fit under 3,976 bytes; a sixth does not.
        assert_eq!(refused_at, 5, "{kind:?}: refused at {refused_at}");
        // Whatever was refused, each entry written fits, as the producer will see it.
        for change in operator.take_changes() {
            let Some(value) = change.value else { continue };
            let size = quoted_len(&change.key) + value.to_string().len();
            assert!(size <= limit.bytes(), "{kind:?}: an entry of {size} bytes");
        }
        assert_eq!(operator.state_keys(), windows, "{kind:?}");
        // A record that adds nothing new still counts, and the windows close as before.
        assert_eq!(operator.process(record("u", "a", 40), i64::MIN, &mut out), Ok(StepOutcome::Passed));
        operator.advance(i64::MAX, &mut out);
        let found = results(&out);
        assert!(!found.is_empty(), "{kind:?}");
        for (user, tags, last) in found {
            assert_eq!((user, tags, last), ("u".into(), kept.into(), "a".into()), "{kind:?}");
        }
    }
}

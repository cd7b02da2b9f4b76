//! Unit tests of the topology: stages, watermarks across a repartition, late records, dropped partitions.

use serde_json::json;

use super::*;

/// A window by user over input not partitioned by user: one repartition, so two stages.
fn repartitioned_window() -> Topology {
    let pipeline = crate::plan::parse_pipeline(
        r#"
name: t
sources:
  clicks:
    topics: [clicks]
    format: json
    schema: { user: string, ts: long }
    event_time: { field: ts }
    watermark: { max_out_of_orderness: 0s, idle_timeout: 1m }
steps:
  - window: { group_by: [user], tumbling: 10s, aggregates: { n: count() } }
sink:
  topic: out
"#,
    )
    .unwrap();
    Topology::new(&pipeline, Default::default()).unwrap()
}

fn click(user: &str, ts: i64) -> Record<'static> {
    let fields = json!({"user": user, "ts": ts}).as_object().cloned().unwrap_or_default();
    Record { fields, event_time: ts, provenance: None, key: None, upsert: false, id: None }
}

fn results(out: &[Leaving<'_>]) -> Vec<(String, i64, i64)> {
    out.iter()
        .filter_map(|emitted| match emitted {
            Leaving::Record(_, record) => Some((
                record.fields["user"].as_str().unwrap_or_default().to_string(),
                record.fields["window_start"].as_i64().unwrap_or_default(),
                record.fields["n"].as_i64().unwrap_or_default(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn a_partition_that_has_delivered_nothing_holds_a_repartitioned_window_open() {
    let mut topology = repartitioned_window();
    assert_eq!(topology.stage_count(), 2);
    topology.set_input_partitions([("clicks".to_string(), 0), ("clicks".to_string(), 1)]);
    let mut out = Vec::new();
    topology.process(click("ann", 1_000), "clicks", 0, Some(1_000), &mut out).unwrap();
    topology.process(click("ann", 30_000), "clicks", 0, Some(30_000), &mut out).unwrap();
    // Partition 1 has said nothing: the shared watermark stays at -infinity.
    assert_eq!(results(&out), []);
    topology.process(click("bob", 40_000), "clicks", 1, Some(40_000), &mut out).unwrap();
    // Now the minimum is partition 0's 30s: ann's first window closes, nothing else.
    assert_eq!(results(&out), [("ann".to_string(), 0, 1)]);
}

#[test]
fn a_record_behind_every_window_it_belongs_to_is_late_and_changes_nothing() {
    let mut topology = repartitioned_window();
    topology.set_input_partitions([("clicks".to_string(), 0)]);
    let mut out = Vec::new();
    topology.process(click("ann", 50_000), "clicks", 0, Some(50_000), &mut out).unwrap();
    let keys = topology.state_keys();
    let outcome = topology.process(click("ann", 1_000), "clicks", 0, Some(1_000), &mut out).unwrap();
    assert!(matches!(outcome, ChainResult::Late(_)), "{outcome:?}");
    assert_eq!(topology.state_keys(), keys);
    topology.finish(&mut out);
    assert_eq!(results(&out), [("ann".to_string(), 50_000, 1)]);
}

#[test]
fn dropping_an_input_partition_forgets_its_watermark_and_stage_zero_state() {
    let mut topology = repartitioned_window();
    topology.set_input_partitions([("clicks".to_string(), 0), ("clicks".to_string(), 1)]);
    let mut out = Vec::new();
    topology.process(click("ann", 5_000), "clicks", 1, Some(5_000), &mut out).unwrap();
    assert!(topology.input_watermarks().iter().any(|((topic, partition), watermark)| topic == "clicks" && *partition == 1 && *watermark == 5_000));
    topology.drop_input_partition("clicks", 1);
    assert!(topology.input_watermarks().iter().all(|((_, partition), _)| *partition != 1), "{:?}", topology.input_watermarks());
}

//! Running aggregates under `weir run`: the last value per key a read_committed reader sees
//! is the one the input makes, whatever SIGKILLs happen.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::*;

const RECORDS: u64 = 60_000;
const USERS: u64 = 40;

/// A click of user `id % USERS`, keyed by user, with event times 5 ms apart give or take
/// 200 ms (so they arrive out of order), and `amount` `id % 100`.
fn click(id: u64) -> Input {
    let user = format!("u{}", id % USERS);
    let ts = 1_700_000_000_000 + id * 5 + (id * 7919) % 400;
    Input::keyed(user.clone(), format!(r#"{{"id":{id},"user":"{user}","amount":{},"ts":{ts}}}"#, id % 100))
}

/// What a compacted topic would keep: the last value per key, in offset order per partition
/// (a key always lands in one partition); a tombstone as null.
fn last_per_key(topic: &str) -> BTreeMap<String, serde_json::Value> {
    read_committed(topic)
        .into_iter()
        .map(|record| {
            let value = if record.value.is_some() { record.value_json() } else { serde_json::Value::Null };
            (String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()).into_owned(), value)
        })
        .collect()
}

/// Two running aggregates in one pipeline, one per output: per user (the input's
/// partitioning, in place) and per amount (through a repartition topic). While 60,000
/// records flow, weir is SIGKILLed at random at least 8 times; then the last value per key
/// equals the counts, sums and latest event times the generator's arithmetic gives: a batch
/// counted twice or lost across a crash would show in them.
#[test]
fn running_aggregates_survive_sigkills_with_the_right_last_values() {
    let _heavy = heavy_test();
    let (input, per_user, per_amount) = (unique("in"), unique("per-user"), unique("per-amount"));
    let name = unique("aggregate");
    create_topic(&input, 4);
    create_topic(&per_user, 2);
    create_topic(&per_amount, 2);
    let outputs = format!(
        "outputs:\n  \
           per_user:\n    \
             steps: [ {{ aggregate: {{ group_by: [user], aggregates: {{ clicks: count(), total: sum(amount), latest: max(ts) }} }} }} ]\n    \
             sink: {{ topic: {per_user} }}\n  \
           per_amount:\n    \
             steps: [ {{ aggregate: {{ group_by: [amount], aggregates: {{ clicks: count(), users: count_distinct(user) }} }} }} ]\n    \
             sink: {{ topic: {per_amount} }}\n"
    );
    let text = clicks_pipeline_text(&name, &input, "unused", "  - filter: \"amount >= 0\"", "partitioned_by: [user]")
        .replace("sink:\n  topic: unused\n", &outputs);
    let pipeline = pipeline_file(&text);
    let feeder = feed_with(&input, 0..RECORDS, 4_000, click);
    // Step 1 is the per-user aggregate.
    let running = |process: &WeirProcess| has_committed_state(process, "1") || (feeder.is_finished() && is_ready(process));
    let (kills, _) = kill_repeatedly(&[pipeline.path.as_path()], 8, running, || feeder.is_finished());
    feeder.join().unwrap();
    let mut last = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(last.wait(Duration::from_secs(300)).success(), "final run failed:\n{}", last.log_text());
    assert!(kills >= 8);

    let mut users: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut amounts: BTreeMap<String, (u64, std::collections::BTreeSet<u64>)> = BTreeMap::new();
    for id in 0..RECORDS {
        let ts = 1_700_000_000_000 + id * 5 + (id * 7919) % 400;
        let user = users.entry(format!(r#"{{"user":"u{}"}}"#, id % USERS)).or_default();
        user.0 += 1;
        user.1 += id % 100;
        user.2 = user.2.max(ts);
        let amount = amounts.entry(format!(r#"{{"amount":{}}}"#, id % 100)).or_default();
        amount.0 += 1;
        amount.1.insert(id % USERS);
    }
    let expected_users: BTreeMap<String, serde_json::Value> = users
        .into_iter()
        .map(|(key, (clicks, total, latest))| {
            let user = key.trim_start_matches(r#"{"user":""#).trim_end_matches(r#""}"#).to_string();
            (key, serde_json::json!({ "user": user, "clicks": clicks, "total": total, "latest": latest }))
        })
        .collect();
    assert_eq!(last_per_key(&per_user), expected_users, "over {kills} kills");
    let expected_amounts: BTreeMap<String, serde_json::Value> = amounts
        .into_iter()
        .map(|(key, (clicks, users))| {
            let amount: u64 = key.trim_start_matches(r#"{"amount":"#).trim_end_matches('}').parse().unwrap();
            (key, serde_json::json!({ "amount": amount, "clicks": clicks, "users": users.len() }))
        })
        .collect();
    assert_eq!(last_per_key(&per_amount), expected_amounts, "over {kills} kills");
    assert_eq!(committed_offsets(&name, &input), end_offsets(&input));
}

/// Without a ttl an aggregate needs no event time: a source without `event_time` or
/// `watermark`, repartitioned by a field it is not keyed by, ends with the right value per
/// key under `weir run --until-end`.
#[test]
fn a_running_aggregate_without_event_time_runs() {
    const RECORDS: u64 = 4_000;
    let (input, output) = (unique("in"), unique("per-amount"));
    create_topic(&input, 4);
    create_topic(&output, 2);
    let text = format!(
        "name: {}\nsources:\n  clicks:\n    topics: [{input}]\n    format: json\n    schema: {{ id: long, user: string, amount: long, ts: long }}\n\
         steps:\n  - aggregate: {{ group_by: [amount], aggregates: {{ clicks: count(), first_id: first(id) }} }}\nsink:\n  topic: {output}\n",
        unique("no-time")
    );
    let pipeline = pipeline_file(&text);
    feed_with(&input, 0..RECORDS, 20_000, click).join().unwrap();
    let mut run = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(run.wait(Duration::from_secs(300)).success(), "run failed:\n{}", run.log_text());
    let found = last_per_key(&output);
    assert_eq!(found.len(), 100, "{found:?}");
    for (key, value) in found {
        let amount = value["amount"].as_u64().unwrap();
        assert_eq!(key, format!(r#"{{"amount":{amount}}}"#));
        assert_eq!(value["clicks"], RECORDS / 100, "{value}");
        // Without event times, first() is the first in processing order, which a
        // repartition may interleave: any id with this amount.
        assert_eq!(value["first_id"].as_u64().unwrap() % 100, amount, "{value}");
    }
}

/// A group's ttl outlives the process: groups written by one run end (a tombstone each) in a
/// later run whose input moves the watermark past their ttl, whether the later run reads its
/// state from the local store or, with the store deleted, from the changelog.
#[test]
fn a_ttl_ends_groups_of_an_earlier_run_from_the_store_or_the_changelog() {
    for wiped in [false, true] {
        let (input, output) = (unique("in"), unique("per-user"));
        create_topic(&input, 2);
        create_topic(&output, 2);
        let name = unique("ttl");
        let step = "  - aggregate: { group_by: [user], aggregates: { clicks: count() }, ttl: 10m, on_expire: tombstone }";
        let file = clicks_pipeline(&name, &input, &output, step);
        produce(&input, (0..400).map(click));
        run_to_end(&file);
        let first = last_per_key(&output);
        assert_eq!(first.len() as u64, USERS, "wiped {wiped}: {first:?}");
        assert!(first.values().all(|value| value["clicks"] == 10), "wiped {wiped}: {first:?}");
        if wiped {
            let directory = file.path.parent().unwrap().join("state").join(format!("{name}-0"));
            std::fs::remove_dir_all(&directory).expect("the local state deleted");
        }
        // An hour later on both partitions: every user's ttl has passed.
        produce(
            &input,
            (0..2).map(|partition| {
                let value = format!(r#"{{"id":0,"user":"later{partition}","amount":0,"ts":1700003600000}}"#);
                Input { partition: Some(partition), ..Input::keyed(format!("later{partition}"), value) }
            }),
        );
        let log = run_to_end(&file);
        let last = last_per_key(&output);
        let ended: Vec<&String> = last.iter().filter(|(_, value)| value.is_null()).map(|(key, _)| key).collect();
        assert_eq!(ended.len() as u64, USERS, "wiped {wiped}: every earlier group ends: {last:?}\n{log}");
        assert_eq!(last[r#"{"user":"later1"}"#]["clicks"], 1, "wiped {wiped}: {last:?}");
    }
}

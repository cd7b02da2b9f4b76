//! Avro through a real schema registry (see `schema_registry` in tests/support).

use std::collections::BTreeMap;
use std::time::Duration;

use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use serde_json::json;

use crate::support::*;

const CLICK_V1: &str = r#"{"type":"record","name":"Click","namespace":"test","fields":[
    {"name":"user","type":"string"},
    {"name":"amount","type":"double"},
    {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;

/// v1 plus a field with a default: a compatible evolution under the registry's default
/// (BACKWARD) rule.
const CLICK_V2: &str = r#"{"type":"record","name":"Click","namespace":"test","fields":[
    {"name":"user","type":"string"},
    {"name":"amount","type":"double"},
    {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}},
    {"name":"country","type":"string","default":"NL"}]}"#;

fn click_v1(user: &str, amount: f64, ts: i64) -> Avro {
    Avro::Record(vec![
        ("user".into(), Avro::String(user.into())),
        ("amount".into(), Avro::Double(amount)),
        ("ts".into(), Avro::TimestampMillis(ts)),
    ])
}

fn click_v2(user: &str, amount: f64, ts: i64, country: &str) -> Avro {
    let Avro::Record(mut fields) = click_v1(user, amount, ts) else { unreachable!() };
    fields.push(("country".into(), Avro::String(country.into())));
    Avro::Record(fields)
}

/// A pipeline reading Avro clicks from `input` with the declared `fields` (YAML flow
/// mapping body), with extra YAML for the source, the steps, and the sink.
fn avro_pipeline(name: &str, input: &str, output: &str, fields: &str, source_extra: &str, steps: &str, sink_extra: &str) -> PipelineFile {
    pipeline_file(&format!(
        "name: {name}\nsources:\n  clicks:\n    topics: [{input}]\n    format: avro\n    schema: {{ {fields} }}\n{source_extra}{steps}sink:\n  topic: {output}\n{sink_extra}"
    ))
}

fn registry_env() -> Vec<(String, String)> {
    vec![("WEIR__SCHEMA_REGISTRY__URL".into(), schema_registry().url.clone())]
}

/// Avro in → tumbling window → Avro out, through the registry: records written with two
/// versions of the writer schema are read by the pipeline's declared fields; the results are
/// written with a schema weir registers under `<output>-value`, and their keys (the group)
/// with one under `<output>-key`.
#[test]
fn avro_in_window_avro_out_through_the_registry() {
    let (input, output, name) = (unique("avro-in"), unique("avro-out"), unique("avro-window"));
    // One partition: one watermark, so which windows close is known.
    create_topic(&input, 1);
    create_topic(&output, 1);
    let v1_id = register_schema(&format!("{input}-value"), CLICK_V1);
    let v2_id = register_schema(&format!("{input}-value"), CLICK_V2);
    assert_ne!(v1_id, v2_id);
    let (v1, v2) = (Schema::parse_str(CLICK_V1).unwrap(), Schema::parse_str(CLICK_V2).unwrap());

    // 3 users, 400 clicks over 4 minutes; every third is written with the evolved schema.
    let mut inputs = Vec::new();
    let mut expected: BTreeMap<(String, i64), (i64, f64)> = BTreeMap::new();
    for n in 0..400i64 {
        let user = format!("u{}", n % 3);
        let ts = 1_700_000_000_000 + n * 600;
        let amount = (n % 7) as f64 + 0.5;
        let value = match n % 3 {
            0 => avro_record(v2_id, &v2, click_v2(&user, amount, ts, "FR")),
            _ => avro_record(v1_id, &v1, click_v1(&user, amount, ts)),
        };
        inputs.push(Input::keyed(user.clone(), value));
        let entry = expected.entry((user, ts - ts.rem_euclid(60_000))).or_default();
        entry.0 += 1;
        entry.1 += amount;
    }
    produce(&input, inputs);
    let pipeline = avro_pipeline(&name, &input, &output, "user: string, amount: double, ts: timestamp", "    event_time: { field: ts }\n    watermark: { max_out_of_orderness: 1s }\n    partitioned_by: [user]\n", "steps:\n  - window:\n      group_by: [user]\n      tumbling: 1m\n      aggregates: { clicks: count(), total: sum(amount) }\n", "  format: avro\n  key_format: avro\n");
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, env: registry_env(), ..Default::default() });
    assert!(weir.wait(Duration::from_secs(120)).success(), "{}", weir.log_text());

    // --until-end keeps the last minute's windows open: every closed window is in the output.
    let results = read_committed(&output);
    assert!(!results.is_empty(), "{}", weir.log_text());
    let mut ids = std::collections::BTreeSet::new();
    let mut key_ids = std::collections::BTreeSet::new();
    for record in &results {
        let (id, value) = read_avro(record.value.as_deref().unwrap());
        ids.insert(id);
        let (key_id, key) = read_avro(record.key.as_deref().unwrap());
        key_ids.insert(key_id);
        assert_eq!(key, json!({"user": value["user"]}));
        let user = value["user"].as_str().unwrap().to_string();
        let start = value["window_start"].as_i64().unwrap();
        let (count, total) = expected[&(user.clone(), start)];
        assert_eq!(value, json!({"user": user, "window_start": start, "window_end": start + 60_000, "clicks": count, "total": total}));
    }
    let closed = expected.keys().filter(|(_, start)| *start + 60_000 <= 1_700_000_000_000 + 399 * 600 - 1_000).count();
    assert_eq!(results.len(), closed);
    // One schema each, the ones registered under the output's subjects.
    assert_eq!(ids.len(), 1);
    assert_eq!(latest_schema_id(&output, false), *ids.first().unwrap());
    assert_eq!(key_ids.len(), 1);
    assert_eq!(latest_schema_id(&output, true), *key_ids.first().unwrap());
    assert!(read_committed(&format!("{name}.dlq")).is_empty());
}

/// Schema evolution both ways, as the pipeline sees it: a field the writer added is ignored by
/// an older reader; a declared field an older writer lacks reads as null. Records that cannot
/// be read (an id the registry does not know, bytes not in the wire format) go to the DLQ as
/// decode errors while the rest flows on.
#[test]
fn evolved_writers_are_resolved_and_unreadable_records_go_to_the_dlq() {
    let (input, output, name) = (unique("avro-in"), unique("avro-out"), unique("avro-evolve"));
    create_topic(&input, 1);
    create_topic(&output, 1);
    let v1_id = register_schema(&format!("{input}-value"), CLICK_V1);
    let v2_id = register_schema(&format!("{input}-value"), CLICK_V2);
    let (v1, v2) = (Schema::parse_str(CLICK_V1).unwrap(), Schema::parse_str(CLICK_V2).unwrap());
    let unknown_id: u32 = 987_654_321;
    let mut unknown = avro_record(v1_id, &v1, click_v1("x", 1.0, 1));
    unknown[1..5].copy_from_slice(&unknown_id.to_be_bytes());
    produce(
        &input,
        [
            Input::keyed("a", avro_record(v1_id, &v1, click_v1("ann", 1.5, 1_000))),
            Input::keyed("b", avro_record(v2_id, &v2, click_v2("bob", 2.5, 2_000, "FR"))),
            Input::keyed("c", unknown.clone()),
            Input::keyed("d", br#"{"user":"json"}"#.to_vec()),
            Input::keyed("e", avro_record(v2_id, &v2, click_v2("eve", 3.5, 3_000, "DE"))),
        ],
    );
    // Declares `country` (only v2 has it, so it may be absent: `?`) and not `ts` (both have it).
    let pipeline = avro_pipeline(&name, &input, &output, "user: string, amount: double, country: string?", "", "", "");
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, env: registry_env(), ..Default::default() });
    assert!(weir.wait(Duration::from_secs(90)).success(), "{}", weir.log_text());

    let values: Vec<serde_json::Value> = read_committed(&output).iter().map(Seen::value_json).collect();
    assert_eq!(
        values,
        vec![
            json!({"user": "ann", "amount": 1.5, "country": null}),
            json!({"user": "bob", "amount": 2.5, "country": "FR"}),
            json!({"user": "eve", "amount": 3.5, "country": "DE"}),
        ]
    );
    let dlq = read_committed(&format!("{name}.dlq"));
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    assert_eq!(dlq[0].key.as_deref(), Some(&b"c"[..]));
    assert_eq!(dlq[0].value.as_deref(), Some(&unknown[..]));
    assert_eq!(dlq[0].headers["weir-error-stage"], "decode");
    assert!(dlq[0].headers["weir-error"].contains(&format!("writer schema id {unknown_id}")), "{:?}", dlq[0].headers);
    assert_eq!(dlq[0].headers["weir-source-offset"], "2");
    assert_eq!(dlq[1].headers["weir-error-stage"], "decode");
    assert!(dlq[1].headers["weir-error"].contains("not in the Confluent Avro wire format"), "{:?}", dlq[1].headers);
}

/// An unreachable registry is waited for, not a reason to dead-letter anything: weir is not
/// ready and says why in /status; once a registry answers (a second instance over the same
/// schemas), every record is processed.
#[test]
fn an_unreachable_registry_is_waited_for_and_nothing_is_dead_lettered() {
    let (input, output, name) = (unique("avro-in"), unique("avro-out"), unique("avro-wait"));
    create_topic(&input, 1);
    create_topic(&output, 1);
    let v1_id = register_schema(&format!("{input}-value"), CLICK_V1);
    let v1 = Schema::parse_str(CLICK_V1).unwrap();
    produce(&input, (0..50).map(|n| Input::keyed(format!("k{n}"), avro_record(v1_id, &v1, click_v1("ann", n as f64, n)))));
    let pipeline = avro_pipeline(&name, &input, &output, "user: string, amount: double", "", "", "");
    let port = free_port();
    let env = vec![("WEIR__SCHEMA_REGISTRY__URL".to_string(), format!("http://127.0.0.1:{port}"))];
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, env, ..Default::default() });
    wait_until(Duration::from_secs(60), "weir reports the unreachable registry", || {
        weir.http_get("/status").is_some_and(|(_, body)| body.contains("schema registry is unreachable"))
    });
    assert_eq!(weir.http_get("/health/ready").map(|(status, _)| status), Some(503));
    std::thread::sleep(Duration::from_secs(2));
    assert!(weir.child.try_wait().unwrap().is_none(), "weir gave up: {}", weir.log_text());
    assert!(read_uncommitted(&format!("{name}.dlq")).is_empty());

    let Some(schemas_topic) = &schema_registry().schemas_topic else {
        return; // An external registry: no second instance to start here.
    };
    start_schema_registry_on(port, schemas_topic, &[]);
    assert!(weir.wait(Duration::from_secs(90)).success(), "{}", weir.log_text());
    assert_eq!(read_committed(&output).len(), 50);
    assert!(read_committed(&format!("{name}.dlq")).is_empty());
}

/// A record whose writer schema cannot be fetched (the registry went away after the first
/// records) is set aside and read again, never skipped: the records before it commit, a stop
/// during the wait loses nothing, and after a restart with the registry back every record is
/// in the output once.
#[test]
fn a_record_met_while_the_registry_is_away_is_read_again_not_skipped() {
    let Some(schemas_topic) = &schema_registry().schemas_topic else {
        return; // An external registry cannot be stopped from here.
    };
    let (input, output, name) = (unique("avro-in"), unique("avro-out"), unique("avro-aside"));
    create_topic(&input, 1);
    create_topic(&output, 1);
    let a_id = register_schema(&format!("{input}-value"), CLICK_V1);
    let b_id = register_schema(&format!("{input}-value"), CLICK_V2);
    let (v1, v2) = (Schema::parse_str(CLICK_V1).unwrap(), Schema::parse_str(CLICK_V2).unwrap());
    let a = |n: u32| Input::keyed(format!("a{n}"), avro_record(a_id, &v1, click_v1(&format!("a{n}"), 1.0, i64::from(n))));
    // weir's own registry over the same schemas, to stop and start.
    let port = free_port();
    let registry = start_schema_registry_on(port, schemas_topic, &[]);
    let pipeline = avro_pipeline(&name, &input, &output, "user: string", "", "", "");
    let env = vec![
        ("WEIR__SCHEMA_REGISTRY__URL".to_string(), format!("http://127.0.0.1:{port}")),
        // One batch holds the records before the one that cannot be read yet.
        ("WEIR__RUNTIME__COMMIT_INTERVAL".to_string(), "3s".to_string()),
        ("WEIR__KAFKA__TRANSACTION_TIMEOUT".to_string(), "30s".to_string()),
    ];
    let users = |topic: &str| -> Vec<String> {
        read_committed(topic).iter().map(|record| record.value_json()["user"].as_str().unwrap().to_string()).collect()
    };
    produce(&input, (0..10).map(a));
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { env: env.clone(), ..Default::default() });
    wait_until(Duration::from_secs(60), "the first records", || users(&output).len() == 10);

    assert!(std::process::Command::new("kill").args(["-9", &registry.to_string()]).status().unwrap().success());
    let b = Input::keyed("b", avro_record(b_id, &v2, click_v2("b", 2.0, 100, "FR")));
    produce(&input, (10..15).map(a).chain([b]).chain((15..20).map(a)));
    wait_until(Duration::from_secs(60), "weir reports the unreachable registry", || {
        weir.http_get("/status").is_some_and(|(_, body)| body.contains("schema registry is unreachable"))
    });
    weir.terminate();
    assert!(weir.wait(Duration::from_secs(30)).success(), "{}", weir.log_text());
    let expected_before: Vec<String> = (0..15).map(|n| format!("a{n}")).collect();
    assert_eq!(users(&output), expected_before, "the records before the unreadable one, once");

    start_schema_registry_on(port, schemas_topic, &[]);
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, env, ..Default::default() });
    assert!(weir.wait(Duration::from_secs(90)).success(), "{}", weir.log_text());
    let mut expected: Vec<String> = (0..15).map(|n| format!("a{n}")).collect();
    expected.push("b".into());
    expected.extend((15..20).map(|n| format!("a{n}")));
    assert_eq!(users(&output), expected);
    assert!(read_committed(&format!("{name}.dlq")).is_empty());
}

/// A registry that requires HTTP basic auth: the password from a file works, a wrong one
/// ends the run saying the registry refused the credentials, and neither password shows in
/// the log.
#[test]
fn registry_basic_auth_with_the_password_from_a_file() {
    let Some(schemas_topic) = &schema_registry().schemas_topic else {
        return; // An external registry: its auth is not ours to set up.
    };
    let password = format!("pw-{}", unique("secret"));
    let port = start_schema_registry(schemas_topic, &["--require-auth", "--basic-user", &format!("weir:{password}")]);
    let (input, output, name) = (unique("avro-in"), unique("avro-out"), unique("avro-auth"));
    create_topic(&input, 1);
    create_topic(&output, 1);
    let id = register_schema(&format!("{input}-value"), CLICK_V1);
    let v1 = Schema::parse_str(CLICK_V1).unwrap();
    produce(&input, (0..5).map(|n| Input::keyed(format!("k{n}"), avro_record(id, &v1, click_v1("ann", f64::from(n), 1)))));
    let pipeline = avro_pipeline(&name, &input, &output, "user: string, amount: double", "", "", "  format: avro\n");
    let secrets = tempfile::tempdir().unwrap();
    let run = |password: &str| {
        let file = secrets.path().join(unique("password"));
        std::fs::write(&file, format!("{password}\n")).unwrap();
        let env = vec![
            ("WEIR__SCHEMA_REGISTRY__URL".to_string(), format!("http://127.0.0.1:{port}")),
            ("WEIR__SCHEMA_REGISTRY__USERNAME".to_string(), "weir".to_string()),
            ("WEIR__SCHEMA_REGISTRY__PASSWORD_FILE".to_string(), file.display().to_string()),
            ("WEIR__LOGGING__LEVEL".to_string(), "debug".to_string()),
        ];
        let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, env, ..Default::default() });
        let status = weir.wait(Duration::from_secs(90));
        (status, weir.log_text())
    };
    let wrong = format!("wrong-{}", unique("pw"));
    let (status, log) = run(&wrong);
    assert!(!status.success(), "{log}");
    assert!(log.contains("the schema registry refused weir's credentials"), "{log}");
    assert!(!log.contains(&wrong), "the wrong password shows in the log");
    assert!(read_committed(&output).is_empty());

    let (status, log) = run(&password);
    assert!(status.success(), "{log}");
    assert!(!log.contains(&password), "the password shows in the log");
    let values: Vec<serde_json::Value> = read_committed(&output).iter().map(|record| read_avro(record.value.as_deref().unwrap()).1).collect();
    assert_eq!(values.len(), 5);
    assert_eq!(values[4], json!({"user": "ann", "amount": 4.0}));
}

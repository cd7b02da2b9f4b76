//! The command line without a broker: bad settings and pipelines exit 2 listing every
//! problem before any connection to Kafka; `validate` prints the plan.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn weir(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
    command.args(args);
    // Nothing listens here: a connection attempt would hang or fail, not exit 2 at once.
    command.env("WEIR__KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run weir")
}

fn write(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipeline.yaml");
    std::fs::write(&path, text).unwrap();
    let path = path.display().to_string();
    (dir, path)
}

const GOOD: &str = r#"
name: clicks-filter
sources:
  clicks:
    topics: [clicks]
    format: json
    schema: { event_id: string, user_id: string, amount: double, ts: long }
    event_time: { field: ts, unit: millis }
    watermark: { max_out_of_orderness: 5s }
steps:
  - filter: "amount > 0.0 && user_id != 'bot'"
sink:
  topic: clicks-filtered
  key: [user_id]
"#;

#[test]
fn a_pipeline_with_three_mistakes_exits_2_naming_all_three() {
    let (_dir, path) = write(
        r#"
name: Clicks_Per_User
sources:
  clicks:
    topics: [clicks]
    format: json
    schema: { user_id: string, amount: dubble }
steps:
  - filter: "amount >"
sink:
  topic: out
"#,
    );
    let started = Instant::now();
    let output = weir(&["run", "--pipeline", &path], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(started.elapsed() < Duration::from_secs(5), "config errors are reported before touching Kafka");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("name: 'Clicks_Per_User'"), "{stderr}");
    assert!(stderr.contains("sources.clicks.schema.amount: unknown type 'dubble'"), "{stderr}");
    assert!(stderr.contains("steps[0].filter"), "{stderr}");
    assert!(stderr.contains("3 configuration problems"), "{stderr}");
}

#[test]
fn settings_problems_name_the_key_and_the_env_var_together_with_pipeline_problems() {
    let (_dir, path) = write(&GOOD.replace("amount > 0.0", "amount > 0.0 && colour == 'red'"));
    let output = weir(
        &["run", "--pipeline", &path],
        &[
            ("WEIR__RUNTIME__COMMIT_INTERVAL", "soon"),
            ("WEIR__KAFKA__OPTIONS__ENABLE_AUTO_COMMIT", "true"),
            ("WEIR__HTTP__PORT", "80"),
        ],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("runtime.commit_interval (env WEIR__RUNTIME__COMMIT_INTERVAL): 'soon' is not a duration"), "{stderr}");
    assert!(stderr.contains("kafka.options.enable.auto.commit (env WEIR__KAFKA__OPTIONS__ENABLE_AUTO_COMMIT)"), "{stderr}");
    assert!(stderr.contains("exactly-once depends on it"), "{stderr}");
    assert!(stderr.contains("http.port (env WEIR__HTTP__PORT): unknown setting"), "{stderr}");
    assert!(stderr.contains("'colour'"), "{stderr}");
}

/// librdkafka options are checked when the settings load, and a secret read from a file
/// that is not there is a settings problem, all reported together before touching Kafka.
#[test]
fn kafka_options_are_checked_before_touching_kafka() {
    let (dir, path) = write(GOOD);
    let missing = dir.path().join("no-such-secret");
    let output = weir(
        &["run", "--pipeline", &path],
        &[
            ("WEIR__KAFKA__OPTIONS__SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
            ("WEIR__KAFKA__OPTIONS__SASL_MECHANISM", "SCRAM-SHA-999"),
            ("WEIR__KAFKA__OPTIONS__SASL_USERNAME", "weir"),
            ("WEIR__KAFKA__OPTIONS__SASL_PASSWORD", "hunter2-but-longer"),
            ("WEIR__KAFKA__OPTIONS__FETCH_MAX_BYTEZ", "1000"),
            ("WEIR__KAFKA__OPTION_FILES__SSL_KEY_PASSWORD", &missing.display().to_string()),
        ],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SCRAM-SHA-999"), "{stderr}");
    assert!(stderr.contains("kafka.options.fetch.max.bytez"), "{stderr}");
    assert!(
        stderr.contains("kafka.option_files.ssl.key.password (env WEIR__KAFKA__OPTION_FILES__SSL_KEY_PASSWORD): cannot read"),
        "{stderr}"
    );
    assert!(stderr.contains("3 configuration problems"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn validate_prints_the_plan_for_a_good_pipeline() {
    let (_dir, path) = write(GOOD);
    let output = weir(&["validate", "--pipeline", &path], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("pipeline clicks-filter: valid"), "{stdout}");
    assert!(stdout.contains("step 0: filter amount > 0.0 && user_id != 'bot'"), "{stdout}");
    assert!(stdout.contains("sink: clicks-filtered (json, key: user_id, transactional)"), "{stdout}");
    assert!(stdout.contains("dlq: clicks-filter.dlq"), "{stdout}");
    // The schema of the source and of what each step hands on.
    assert!(stdout.contains("fields: {event_id: string, user_id: string, amount: double, ts: long}"), "{stdout}");
    assert!(stdout.contains("out: {event_id: string, user_id: string, amount: double, ts: long}"), "{stdout}");
}

/// A window's results have their own schema, and `validate` shows it under the step, with
/// the format and mode as the file spells them.
#[test]
fn validate_prints_the_schema_each_step_hands_on() {
    let steps = "  - window: { group_by: [user_id], tumbling: 1m, aggregates: { n: count(), total: sum(amount), first_ts: first(ts) } }";
    let (_dir, path) = write(&windowed(steps, "").replace("  topic: out", "  topic: out\n  format: avro\n  mode: idempotent_upsert"));
    let output = weir(&["validate", "--pipeline", &path], &[("WEIR__SCHEMA_REGISTRY__URL", "http://127.0.0.1:9")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        stdout.contains("out: {user_id: string, window_start: timestamp, window_end: timestamp, n: long, total: double, first_ts: long}"),
        "{stdout}"
    );
    assert!(stdout.contains("sink: out (avro, key: each record's id, as in weir-id, idempotent_upsert)"), "{stdout}");
}

/// `plan` without a broker: the stages and their tasks, the repartition a keyed step needs,
/// each stateful step's fingerprint and changelog, and every topic the pipeline touches.
#[test]
fn plan_shows_the_stages_state_fingerprints_and_topics() {
    let (_dir, path) = write(&GOOD.replace(
        "  - filter: \"amount > 0.0 && user_id != 'bot'\"",
        "  - filter: \"amount > 0.0\"\n  - dedup: { key: [event_id], within: 1h }\n  - window: { group_by: [user_id], tumbling: 1m, aggregates: { n: count() } }",
    ));
    let output = weir(&["plan", "--pipeline", &path], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    for expected in [
        "stage 0: one task per partition of clicks",
        "step 0: filter amount > 0.0",
        "stage 1: one task per partition of clicks-filter-1-repartition, records routed by a hash of [event_id]",
        "stage 2: one task per partition of clicks-filter-2-repartition, records routed by a hash of [user_id]",
        "internal: clicks-filter-1-changelog",
        "internal: clicks-filter-2-changelog",
        "internal: clicks-filter-definitions",
        "written: clicks-filtered (results), clicks-filter.dlq (dead letters)",
    ] {
        assert!(stdout.contains(expected), "no '{expected}' in\n{stdout}");
    }
    let fingerprints: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.trim().strip_prefix("state fingerprint "))
        .map(|rest| rest.split(',').next().unwrap_or_default())
        .collect();
    assert_eq!(fingerprints.len(), 2, "{stdout}");
    assert_ne!(fingerprints[0], fingerprints[1], "{stdout}");
    // The fingerprint follows the definition: a longer window is another state layout.
    let (_dir2, changed) = write(&std::fs::read_to_string(&path).unwrap().replace("tumbling: 1m", "tumbling: 2m"));
    let changed_out = weir(&["plan", "--pipeline", &changed], &[]);
    let changed_text = String::from_utf8_lossy(&changed_out.stdout);
    assert!(changed_text.contains(fingerprints[0]) && !changed_text.contains(fingerprints[1]), "{changed_text}");
}

/// Every example in config/examples validates, and has an input and the output it makes
/// beside it (`<name>.input.jsonl`, `<name>.expected.jsonl`): `weir test --expect` agrees,
/// so the examples the docs point to keep working.
#[test]
fn the_shipped_examples_validate_and_make_their_expected_output() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|extension| extension == "yaml") {
            let output = weir(&["validate", "--pipeline", path.to_str().unwrap()], &[]);
            assert!(output.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&output.stderr));
            let (input, expected) = (path.with_extension("input.jsonl"), path.with_extension("expected.jsonl"));
            assert!(input.is_file() && expected.is_file(), "{} has no {} and {}", path.display(), input.display(), expected.display());
            let output = weir(
                &["test", "--pipeline", path.to_str().unwrap(), "--input", input.to_str().unwrap(), "--expect", expected.to_str().unwrap()],
                &[],
            );
            assert!(output.status.success(), "{}:\n{}{}", path.display(), String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
            let expected_lines = std::fs::read_to_string(&expected).unwrap().lines().filter(|line| !line.trim().is_empty()).count();
            assert!(expected_lines > 0, "{}: an example should show some output", expected.display());
            checked += 1;
        }
    }
    assert!(checked >= 4, "examples missing in {}", examples.display());
}

#[test]
fn a_missing_pipeline_file_is_a_config_error() {
    let output = weir(&["validate", "--pipeline", "/nonexistent/pipeline.yaml"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read /nonexistent/pipeline.yaml"));
}

#[test]
fn an_empty_instance_id_is_refused() {
    let (_dir, path) = write(GOOD);
    let output = weir(&["run", "--pipeline", &path], &[("WEIR_INSTANCE", "")]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--instance (env WEIR_INSTANCE)"));
}

#[test]
fn reset_needs_to_be_told_what_to_reset() {
    let (_dir, path) = write(GOOD);
    let output = weir(&["reset", "--pipeline", &path], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--state"));
}

#[test]
fn reset_takes_one_target_and_a_duration_it_can_read() {
    let (_dir, path) = write(GOOD);
    let output = weir(&["reset", "--to-earliest", "--to-latest", "--pipeline", &path], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot be used with"), "{}", String::from_utf8_lossy(&output.stderr));
    let output = weir(&["reset", "--by-duration", "a while", "--pipeline", &path], &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--by-duration") && stderr.contains("'a while'") && stderr.contains("30m"), "{stderr}");
    let output = weir(&["reset", "--state", "--dry-run", "--execute", "--pipeline", &path], &[]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn reset_refuses_a_time_that_is_not_rfc_3339_before_touching_kafka() {
    let (_dir, path) = write(GOOD);
    let output = weir(&["reset", "--to-datetime", "yesterday", "--pipeline", &path], &[("WEIR__KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--to-datetime") && stderr.contains("'yesterday'") && stderr.contains("RFC 3339"), "{stderr}");
}

/// A join's mistakes are all reported together, before touching Kafka.
#[test]
fn a_bad_join_lists_every_problem() {
    let (_dir, path) = write(
        r#"
name: bad-join
sources:
  ads:
    topics: [ads]
    format: json
    schema: { ad: string, ts: long }
    event_time: { field: ts, unit: millis }
    watermark: { max_out_of_orderness: 1s }
  clicks:
    topics: [clicks]
    format: json
    schema: { ad_id: string, ts: long }
    event_time: { field: ts, unit: millis }
join:
  left: ads
  right: clickz
  type: full
  on: [ad]
  within: { lower: 10s, upper: -5s }
sink:
  topic: out
"#,
    );
    let output = weir(&["run", "--pipeline", &path], &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("join.right: 'clickz' is not a source; sources: ads, clicks"), "{stderr}");
    assert!(stderr.contains("join.within: lower (10s) must not be after upper (-5s)"), "{stderr}");

    let fixed = std::fs::read_to_string(&path).unwrap().replace("clickz", "clicks").replace("lower: 10s", "lower: -10s");
    let (_dir2, path2) = write(&fixed);
    let output = weir(&["run", "--pipeline", &path2], &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("join.on: 'ad' is not a field of the record"), "{stderr}");
    assert!(stderr.contains("sources.clicks.watermark: is required by the join"), "{stderr}");

    // Two sources without a join say so.
    let (_dir3, unjoined) = write(&format!("{}sink:\n  topic: out\n", fixed.split("join:").next().unwrap()));
    let output = weir(&["run", "--pipeline", &unjoined], &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("join: is required with two sources (ads, clicks)"), "{stderr}");
}

/// `weir test` runs a join: the golden cases under tests/golden/join-* show each type; here
/// the steps after a join address the joined record's fields by dotted path.
#[test]
fn steps_after_a_join_use_dotted_paths() {
    let case = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/join-inner");
    let pipeline = std::fs::read_to_string(case.join("pipeline.yaml"))
        .unwrap()
        .replace("sink:", "steps:\n  - filter: \"clicks.id != 'c1'\"\n  - window: { group_by: [ads.ad], tumbling: 1m, aggregates: { n: count(), first_ad: first(ads.id) } }\nsink:");
    let (dir, path) = write(&pipeline);
    let output = weir(&["test", "--pipeline", &path, "--input", case.join("input.jsonl").to_str().unwrap()], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    // Ad a's inner pairs a1+c1, a1+c2, a2+c2, a2+c3 without a1+c1: three; ad c's a5+c7.
    let window = |ad: &str| {
        stdout.lines().find(|line| line.contains(&format!(r#""value":{{"ads.ad":"{ad}""#))).unwrap_or_else(|| panic!("{stdout}"))
    };
    assert!(window("a").contains(r#""n":3"#) && window("a").contains(r#""first_ad":"a1""#), "{stdout}");
    assert!(window("c").contains(r#""n":1"#) && window("c").contains(r#""first_ad":"a5""#), "{stdout}");

    // With an Avro sink, results show the field names the derived Avro schema writes.
    let avro = pipeline.replace("format: json", "format: avro").replace("  topic: out", "  topic: out\n  format: avro\n  key_format: avro");
    let (_avro_dir, avro_path) = write(&avro);
    let lines = weir_test_lines_from(&avro_path, &case.join("input.jsonl"));
    let result = lines.iter().find(|line| line["topic"] == "out" && line["value"]["ads_ad"] == "a").unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(result["value"]["n"], 3, "{result}");
    assert_eq!(result["key"]["ads_ad"], "a", "{result}");
    assert!(lines.iter().all(|line| !line.to_string().contains("ads.ad")), "{lines:?}");
    drop(dir);
}

/// Avro needs a registry, a declared schema with Avro field names, and output fields that
/// stay distinct as Avro names; all reported at once, before touching Kafka.
#[test]
fn avro_config_problems_are_listed_together() {
    let (dir, path) = write(
        r#"
name: avro-problems
sources:
  clicks:
    topics: [clicks]
    format: avro
    schema: { user-id: string, amount: double }
  views:
    topics: [views]
    format: avro
join:
  left: clicks
  right: views
  on: [user-id]
  within: { lower: 0s, upper: 1m }
sink:
  topic: out
  format: avro
"#,
    );
    let missing = dir.path().join("no-such-password");
    let output = weir(
        &["run", "--pipeline", &path],
        &[
            ("WEIR__SCHEMA_REGISTRY__URL", "registry:8081"),
            ("WEIR__SCHEMA_REGISTRY__PASSWORD_FILE", &missing.display().to_string()),
        ],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sources.clicks.schema.user-id: is not an Avro field name"), "{stderr}");
    assert!(stderr.contains("sources.views.schema: is required for format avro"), "{stderr}");
    assert!(stderr.contains("schema_registry.url (env WEIR__SCHEMA_REGISTRY__URL): 'registry:8081' is not an http"), "{stderr}");
    assert!(stderr.contains("schema_registry.password_file (env WEIR__SCHEMA_REGISTRY__PASSWORD_FILE): cannot read"), "{stderr}");

    // Avro keys are made from fields: a pass-through without sink.key has none.
    let (_dir, path) = write(&GOOD.replace("  key: [user_id]\n", "  key_format: avro\n"));
    let output = weir(&["validate", "--pipeline", &path], &[("WEIR__SCHEMA_REGISTRY__URL", "http://registry:8081")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sink.key_format: avro keys are made from fields"), "{stderr}");

    // A good Avro pipeline, but no registry configured.
    let (_dir, path) = write(&GOOD.replace("format: json", "format: avro"));
    let output = weir(&["run", "--pipeline", &path], &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("schema_registry.url (env WEIR__SCHEMA_REGISTRY__URL): is required: source 'clicks' uses format avro"),
        "{stderr}"
    );
}

/// What `weir test` prints for `inputs` (input lines) through the pipeline at `path`.
/// A password written into the registry URL would be shown wherever the URL is (errors,
/// logs, /status): it is refused before anything connects, and never repeated.
#[test]
fn credentials_in_the_registry_url_are_refused_without_repeating_them() {
    let (_dir, path) = write(GOOD);
    for url in ["https://alice:hunter2-secret@registry:8081", "http://alice:hunter2%40secret@registry:8081/", "alice:hunter2-secret@registry:8081"] {
        let started = Instant::now();
        let output = weir(&["validate", "--pipeline", &path], &[("WEIR__SCHEMA_REGISTRY__URL", url)]);
        assert_eq!(output.status.code(), Some(2), "{url}");
        assert!(started.elapsed() < Duration::from_secs(10), "{url}: took {:?}", started.elapsed());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("schema_registry.url (env WEIR__SCHEMA_REGISTRY__URL): holds credentials"), "{url}: {stderr}");
        assert!(stderr.contains("schema_registry.username") && stderr.contains("schema_registry.password_file"), "{url}: {stderr}");
        assert!(!stderr.contains("hunter2") && !String::from_utf8_lossy(&output.stdout).contains("hunter2"), "{url}: {stderr}");
    }
    // The same registry without credentials in its URL is fine.
    let output = weir(&["validate", "--pipeline", &path], &[("WEIR__SCHEMA_REGISTRY__URL", "https://registry:8081")]);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
}

fn weir_test_lines(path: &str, inputs: &[&str]) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    std::fs::write(&input, inputs.join("\n") + "\n").unwrap();
    weir_test_lines_from(path, &input)
}

fn weir_test_lines_from(path: &str, input: &std::path::Path) -> Vec<serde_json::Value> {
    let output = weir(&["test", "--pipeline", path, "--input", input.to_str().unwrap()], &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

/// `weir test` runs an Avro pipeline on JSON lines: no registry is involved.
#[test]
fn weir_test_takes_avro_records_as_json() {
    let pipeline = GOOD.replace("format: json", "format: avro").replace("key: [user_id]", "key: [user_id]\n  format: avro");
    let (_dir, path) = write(&pipeline);
    let lines = weir_test_lines(
        &path,
        &[
            r#"{"source":"clicks","partition":0,"key":null,"value":{"event_id":"e1","user_id":"ann","amount":2.5,"ts":1000}}"#,
            r#"{"source":"clicks","partition":0,"key":null,"value":{"event_id":"e2","user_id":"bot","amount":1.0,"ts":2000}}"#,
        ],
    );
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["value"], serde_json::json!({"event_id": "e1", "user_id": "ann", "amount": 2.5, "ts": 1000}));
}

/// What idempotent_upsert runs in this version (one repartition at most), and what it
/// refuses, all at once.
#[test]
fn idempotent_upsert_refuses_what_needs_transactions() {
    let text = r#"
name: upsert-problems
sources:
  clicks:
    topics: [clicks]
    format: json
    schema: { user: string, amount: double, ts: long }
    event_time: { field: ts }
    watermark: { max_out_of_orderness: 1s }
    partitioned_by: [user]
steps:
  - window: { group_by: [user], tumbling: 1m, aggregates: { n: count() }, emit: update }
  - dedup: { key: [n], within: 1m }
  - dedup: { key: [window_start], within: 1m }
sink:
  topic: out
  key: [user]
  mode: idempotent_upsert
"#;
    let (_dir, path) = write(text);
    let output = weir(&["validate", "--pipeline", &path], &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("steps[0].window.emit: idempotent_upsert writes each window once, with emit: final"), "{stderr}");
    assert!(stderr.contains("sink.key: idempotent_upsert keys every output by its id"), "{stderr}");
    assert!(stderr.contains("sink.mode: idempotent_upsert repartitions at most once"), "{stderr}");

    // Several topics: ids of keyed results would collide; avro keys: the key is the id.
    let several = text
        .replace("topics: [clicks]", "topics: [clicks, more-clicks]")
        .replace("  - window: { group_by: [user], tumbling: 1m, aggregates: { n: count() }, emit: update }\n", "")
        .replace("  - dedup: { key: [n], within: 1m }\n  - dedup: { key: [window_start], within: 1m }", "  - dedup: { key: [user], within: 1m }")
        .replace("  key: [user]\n", "  key_format: avro\n");
    let (_dir, path) = write(&several);
    let output = weir(&["validate", "--pipeline", &path], &[("WEIR__SCHEMA_REGISTRY__URL", "http://registry:8081")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sources.clicks: idempotent_upsert ids of window and dedup results are unique within one source topic"), "{stderr}");
    assert!(stderr.contains("sink.key_format: idempotent_upsert keys every output by its id, as JSON"), "{stderr}");
    assert!(stderr.contains("2 configuration problems"), "{stderr}");

    // A join whose sources are not co-partitioned goes through a repartition topic, once.
    let join = r#"
name: upsert-join
sources:
  ads: { topics: [ads], format: json, schema: { ad: string, ts: long }, event_time: { field: ts }, watermark: { max_out_of_orderness: 1s } }
  clicks: { topics: [clicks], format: json, schema: { ad: string, ts: long }, event_time: { field: ts }, watermark: { max_out_of_orderness: 1s } }
join: { left: ads, right: clicks, on: [ad], within: { lower: 0s, upper: 1m } }
sink: { topic: out, mode: idempotent_upsert }
"#;
    let (_dir, path) = write(join);
    let output = weir(&["validate", "--pipeline", &path], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("repartition topic: upsert-join-0-repartition"), "{stdout}");

    // Co-partitioned, it runs in place, and the plan says so.
    let (_dir, path) = write(&co_partitioned(join));
    let output = weir(&["validate", "--pipeline", &path], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("in place: partition p of ads joins partition p of clicks"), "{stdout}");
    assert!(!stdout.contains("repartition"), "{stdout}");
}

/// Both sources of a one-line-per-source join declare `partitioned_by: [ad]`.
fn co_partitioned(join: &str) -> String {
    join.replace("watermark: { max_out_of_orderness: 1s } }", "watermark: { max_out_of_orderness: 1s }, partitioned_by: [ad] }")
}

/// A join in upsert mode: each result's id names where both of its records were read (an
/// outer row's missing side is null), and its version is the result's event time.
#[test]
fn weir_test_shows_a_joins_upsert_ids() {
    let join = co_partitioned(
        r#"
name: upsert-join
sources:
  ads: { topics: [ads], format: json, schema: { ad: string, ts: long }, event_time: { field: ts }, watermark: { max_out_of_orderness: 1s } }
  clicks: { topics: [clicks], format: json, schema: { ad: string, ts: long }, event_time: { field: ts }, watermark: { max_out_of_orderness: 1s } }
join: { left: ads, right: clicks, type: left, on: [ad], within: { lower: 0s, upper: 1m } }
sink: { topic: out, mode: idempotent_upsert }
"#,
    );
    let (_dir, path) = write(&join);
    let inputs = [
        r#"{"source":"ads","partition":1,"key":"a","value":{"ad":"a","ts":1000}}"#,
        r#"{"source":"ads","partition":1,"key":"b","value":{"ad":"b","ts":2000}}"#,
        r#"{"source":"clicks","partition":1,"key":"a","value":{"ad":"a","ts":5000}}"#,
    ];
    let lines = weir_test_lines(&path, &inputs);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let pair = serde_json::json!({"ads": {"topic": "ads", "partition": 1, "offset": 0}, "clicks": {"topic": "clicks", "partition": 1, "offset": 0}});
    assert_eq!(lines[0]["key"], pair);
    assert_eq!(lines[0]["headers"]["weir-id"], pair.to_string());
    assert_eq!(lines[0]["headers"]["weir-version"], "5000");
    let outer = serde_json::json!({"ads": {"topic": "ads", "partition": 1, "offset": 1}, "clicks": null});
    assert_eq!(lines[1]["key"], outer, "{lines:?}");
    assert_eq!(lines[1]["value"]["clicks"], serde_json::Value::Null);
}

/// `weir test` shows upsert ids: the input's position for a pass-through, the group and
/// window start for a window, each with a version.
#[test]
fn weir_test_shows_upsert_ids_and_versions() {
    let pass = GOOD.replace("  key: [user_id]\n", "  mode: idempotent_upsert\n");
    let (_dir, path) = write(&pass);
    let inputs = [
        r#"{"source":"clicks","partition":2,"key":null,"value":{"event_id":"e1","user_id":"ann","amount":2.5,"ts":61000}}"#,
        r#"{"source":"clicks","partition":2,"key":null,"value":{"event_id":"e2","user_id":"ann","amount":1.0,"ts":62000}}"#,
    ];
    let lines = weir_test_lines(&path, &inputs);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["key"], serde_json::json!({"topic": "clicks", "partition": 2, "offset": 1}));
    assert_eq!(lines[1]["headers"]["weir-id"], r#"{"topic":"clicks","partition":2,"offset":1}"#);
    assert_eq!(lines[1]["headers"]["weir-version"], "1");

    let window = pass
        .replace(
            "  - filter: \"amount > 0.0 && user_id != 'bot'\"",
            "  - window: { group_by: [user_id], tumbling: 1m, aggregates: { total: sum(amount) } }",
        )
        .replace("    watermark: { max_out_of_orderness: 5s }\n", "    watermark: { max_out_of_orderness: 5s }\n    partitioned_by: [user_id]\n");
    std::fs::write(&path, &window).unwrap();
    let lines = weir_test_lines(&path, &inputs);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["key"], serde_json::json!({"user_id": "ann", "window_start": 60000}));
    assert_eq!(lines[0]["headers"]["weir-id"], r#"{"user_id":"ann","window_start":60000}"#);
    assert_eq!(lines[0]["headers"]["weir-version"], "119999");
    assert_eq!(lines[0]["value"]["total"], 3.5);
}

/// A windowed pipeline over clicks with `steps` (YAML lines) and source lines `extra`.
fn windowed(steps: &str, extra: &str) -> String {
    format!(
        r#"
name: limits
sources:
  clicks:
    topics: [clicks]
    format: json
    schema: {{ user_id: string, amount: double, ts: long }}
    event_time: {{ field: ts, unit: millis{extra} }}
    watermark: {{ max_out_of_orderness: 5s }}
steps:
{steps}
sink:
  topic: out
"#
    )
}

/// Durations the runtime cannot honour (under 1ms where zero means nothing, fractions of a
/// millisecond, over 100 years) and hopping windows that put a record in more than 1,000
/// windows are config errors naming the key, all reported at once, exit 2.
#[test]
fn durations_and_hopping_windows_outside_the_limits_are_config_errors() {
    let steps = r#"  - dedup: { key: [user_id], within: 100000000000d }
  - window: { group_by: [user_id], hopping: { size: 1s, slide: 500us }, aggregates: { n: count() } }
  - window: { group_by: [user_id], hopping: { size: 1d, slide: 1ms }, aggregates: { n: count() } }
  - window: { group_by: [user_id], tumbling: 1500us, aggregates: { n: count() } }
  - window: { group_by: [user_id], session: { gap: 0s }, aggregates: { n: count() } }"#;
    let (_dir, path) = write(&windowed(steps, ", max_ahead: 0s"));
    let output = weir(&["validate", "--pipeline", &path], &[]);
    assert_config_problems(
        &output,
        6,
        &[
            "steps[0].dedup.within: '",
            "is longer than the limit of 100 years",
            "steps[1].window.hopping.slide: '500us' is not a whole number of milliseconds",
            "steps[2].window.hopping: size / slide puts each record in 86400000 windows, over the limit of 1000",
            "steps[3].window.tumbling: '1ms 500us' is not a whole number of milliseconds",
            "steps[4].window.session.gap: must be at least 1ms",
            "sources.clicks.event_time.max_ahead: must be at least 1ms",
        ],
    );

    // The limits themselves are fine.
    let steps = "  - dedup: { key: [user_id], within: 100y }\n  - window: { group_by: [user_id], hopping: { size: 1s, slide: 1ms }, aggregates: { n: count() } }";
    let (_dir, path) = write(&windowed(steps, ""));
    let output = weir(&["validate", "--pipeline", &path], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
}

/// An event time outside years 0001-9999 is a decode error (a DLQ record) that does not move
/// the watermark: the records after it are processed as if it had not come, and no window
/// end wraps around.
#[test]
fn an_event_time_at_the_end_of_i64_is_a_dlq_record_and_later_records_flow_on() {
    let steps = "  - window: { group_by: [user_id], tumbling: 1m, aggregates: { n: count() } }";
    let (_dir, path) = write(&windowed(steps, ""));
    let lines = weir_test_lines(
        &path,
        &[
            r#"{"source":"clicks","partition":0,"key":null,"value":{"user_id":"ann","amount":1.0,"ts":1000}}"#,
            r#"{"source":"clicks","partition":0,"key":null,"value":{"user_id":"ann","amount":1.0,"ts":9223372036854775807}}"#,
            r#"{"source":"clicks","partition":0,"key":null,"value":{"user_id":"ann","amount":1.0,"ts":2000}}"#,
            r#"{"source":"clicks","partition":0,"key":null,"value":{"user_id":"ann","amount":1.0,"ts":-9223372036854775808}}"#,
        ],
    );
    let (dlq, results) = (on_topic(&lines, "limits.dlq"), on_topic(&lines, "out"));
    assert_eq!(dlq.len(), 2, "{lines:?}");
    for dead in &dlq {
        assert_eq!(dead["headers"]["weir-error-stage"], "decode", "{dead}");
        assert!(dead["headers"]["weir-error"].as_str().unwrap().contains("outside years 0001-9999"), "{dead}");
    }
    assert_eq!(results.len(), 1, "{lines:?}");
    assert_eq!(results[0]["value"]["n"], 2, "the record after the bad one is not late: {lines:?}");
    assert_eq!(results[0]["value"]["window_end"], 60_000);
}

/// `event_time.max_ahead`: a record further ahead of the clock (in `weir test`, the largest
/// input timestamp) is a decode error and does not move the watermark.
#[test]
fn max_ahead_sends_records_from_the_far_future_to_the_dlq() {
    let steps = "  - window: { group_by: [user_id], tumbling: 1m, aggregates: { n: count() } }";
    let (_dir, path) = write(&windowed(steps, ", max_ahead: 1h"));
    let lines = weir_test_lines(
        &path,
        &[
            r#"{"source":"clicks","partition":0,"timestamp":1000,"key":null,"value":{"user_id":"ann","amount":1.0,"ts":1000}}"#,
            r#"{"source":"clicks","partition":0,"timestamp":1000,"key":null,"value":{"user_id":"ann","amount":1.0,"ts":86400000000}}"#,
            r#"{"source":"clicks","partition":0,"timestamp":2000,"key":null,"value":{"user_id":"ann","amount":1.0,"ts":2000}}"#,
        ],
    );
    let (dlq, results) = (on_topic(&lines, "limits.dlq"), on_topic(&lines, "out"));
    assert_eq!(dlq.len(), 1, "{lines:?}");
    assert!(dlq[0]["headers"]["weir-error"].as_str().unwrap().contains("max_ahead"), "{}", dlq[0]);
    assert_eq!(results.len(), 1, "{lines:?}");
    assert_eq!(results[0]["value"]["n"], 2, "{lines:?}");
}

/// Four mistakes, two of them in one source: every one is reported with its key path, exit
/// 2, before any connection to Kafka (serde alone stops at the first mistake of a mapping).
#[test]
fn four_mistakes_two_in_one_source_are_all_reported() {
    let (_dir, path) = write(
        r#"
name: Clicks_Per_User
sources:
  clicks:
    topics: [clicks]
    format: jsn
    schema: { user: string, ts: long }
    event_time: { field: ts }
    watermark: { max_out_of_orderness: five seconds }
steps:
  - dedup: { key: [user], within: 10m }
sink:
  format: json
"#,
    );
    let started = Instant::now();
    let output = weir(&["validate", "--pipeline", &path], &[]);
    assert!(started.elapsed() < Duration::from_secs(5), "validation must not wait for Kafka");
    assert_config_problems(
        &output,
        4,
        &[
            "name: 'Clicks_Per_User' must be",
            "sources.clicks.format: unknown variant `jsn`",
            "sources.clicks.watermark.max_out_of_orderness: 'five seconds' is not a duration",
            "sink.topic: is required",
        ],
    );
}

/// The lines of `weir test`'s output written to `topic`.
fn on_topic<'l>(lines: &'l [serde_json::Value], topic: &str) -> Vec<&'l serde_json::Value> {
    lines.iter().filter(|line| line["topic"] == topic).collect()
}

/// `weir validate` of a pipeline text.
fn validate(text: &str) -> Output {
    let (_dir, path) = write(text);
    weir(&["validate", "--pipeline", &path], &[])
}

/// Exit 2 with exactly one configuration problem, starting with `expected`.
fn assert_one_config_problem(output: &Output, expected: &str) {
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("1 configuration problem:\n  - {expected}")), "{stderr}");
}

/// Exit 2 with exactly `count` configuration problems, among them each of `expected`.
fn assert_config_problems(output: &Output, count: usize, expected: &[&str]) {
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in expected {
        assert!(stderr.contains(expected), "missing '{expected}' in:\n{stderr}");
    }
    assert!(stderr.contains(&format!("{count} configuration problems")), "{stderr}");
}

/// A dedup key too large for a changelog record (a ~1.1 MB key field, over librdkafka's
/// default message.max.bytes) sends its record to the DLQ with stage `process`, as `weir
/// run` does, where it would otherwise fail every commit; the records after it flow on and
/// are deduplicated as before.
#[test]
fn a_dedup_key_too_large_for_the_changelog_is_a_dlq_record_and_later_records_flow_on() {
    let steps = "  - dedup: { key: [user_id], within: 10m }";
    let (_dir, path) = write(&windowed(steps, ""));
    let large = "x".repeat(1_100_000);
    let record = |user: &str, ts: u64| {
        serde_json::json!({ "source": "clicks", "partition": 0, "key": null, "value": { "user_id": user, "amount": 1.0, "ts": ts } })
            .to_string()
    };
    let inputs = [record("ann", 1000), record(&large, 2000), record("bob", 3000), record("ann", 4000)];
    let lines = weir_test_lines(&path, &inputs.iter().map(String::as_str).collect::<Vec<_>>());
    let dlq: Vec<&serde_json::Value> = lines.iter().filter(|line| line["topic"] == "limits.dlq").collect();
    assert_eq!(dlq.len(), 1, "one DLQ record");
    assert_eq!(dlq[0]["headers"]["weir-error-stage"], "process");
    let error = dlq[0]["headers"]["weir-error"].as_str().unwrap_or_default();
    assert!(error.contains("dedup state") && error.contains("message.max.bytes"), "{error}");
    let users: Vec<&serde_json::Value> =
        lines.iter().filter(|line| line["topic"] == "out").map(|line| &line["value"]["user_id"]).collect();
    assert_eq!(users, ["ann", "bob"], "the later records flow on; ann's second record is a duplicate");
}

/// Each step is checked against the schema the step before it made: a filter reads a
/// window's results, `validate` prints what set, drop and select make, and a field a step
/// took away, an expression mixing int and double or a type no field can hold are config
/// problems naming the step and the field, all reported at once.
#[test]
fn steps_see_the_schema_the_step_before_made() {
    let steps = "  - window: { group_by: [user_id], tumbling: 1m, aggregates: { n: count(), total: sum(amount) } }\n  \
                 - filter: \"n > 2\"\n  \
                 - set: { mean: \"total / double(n)\", user.id: user_id }\n  \
                 - drop: [total]\n  \
                 - select: { who: user.id, clicks: n, mean: mean, topic: _topic }";
    let (_dir, path) = write(&windowed(steps, ""));
    let output = weir(&["validate", "--pipeline", &path], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    for expected in [
        "step 2: set mean = total / double(n), user.id = user_id\n    \
         out: {user_id: string, window_start: timestamp, window_end: timestamp, n: long, total: double, mean: double, user: {id: string}}",
        "step 3: drop total\n    out: {user_id: string, window_start: timestamp, window_end: timestamp, n: long, mean: double, user: {id: string}}",
        "out: {who: string, clicks: long, mean: double, topic: string}",
    ] {
        assert!(stdout.contains(expected), "missing '{expected}' in:\n{stdout}");
    }

    let steps = "  - drop: [amount]\n  \
                 - filter: \"amount > 1.0\"\n  \
                 - select: { uid: user_id, ts: ts }\n  \
                 - dedup: { key: [user_id], within: 1m }";
    let (_dir, path) = write(&windowed(steps, "").replace("  topic: out", "  topic: out\n  key: [user_id]"));
    let output = weir(&["validate", "--pipeline", &path], &[]);
    assert_config_problems(
        &output,
        3,
        &[
            "steps[1].filter: 'amount > 1.0' names 'amount' not in the record; fields: user_id, ts",
            "steps[3].dedup.key: 'user_id' is not a field of the record",
            "sink.key: 'user_id' is not a field of the record",
        ],
    );
    let steps = "  - set: { cents: \"amount * 100\", tags: \"[1, 2]\", ratio: \"ts * 1.5\", user_id.first: \"'x'\" }";
    let (_dir, path) = write(&windowed(steps, ""));
    let output = weir(&["validate", "--pipeline", &path], &[]);
    assert_config_problems(
        &output,
        3,
        &[
            "steps[0].set.cents: 'amount * 100': mixes int and double, which CEL does not do on its own",
            "steps[0].set.tags: '[1, 2]' gives a type known only at run time, which a record field cannot hold; convert it with",
            "steps[0].set.ratio: 'ts * 1.5': mixes int and double",
        ],
    );
}

/// A step that rewrites the field the input is partitioned by makes the next keyed step
/// repartition, where it would otherwise have run in place.
#[test]
fn rewriting_the_partitioning_field_makes_a_keyed_step_repartition() {
    let dedup = "  - dedup: { key: [user_id], within: 1m }";
    let plan_of = |steps: &str| {
        let (_dir, path) = write(&windowed(steps, "").replace("    watermark:", "    partitioned_by: [user_id]\n    watermark:"));
        let output = weir(&["plan", "--pipeline", &path], &[]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(!plan_of(dedup).contains("repartition"), "{}", plan_of(dedup));
    let kept = plan_of(&format!("  - select: {{ user_id: user_id, ts: ts }}\n{dedup}"));
    assert!(!kept.contains("repartition"), "{kept}");
    let rewritten = plan_of(&format!("  - set: {{ user_id: \"'u-' + user_id\" }}\n{dedup}"));
    assert!(rewritten.contains("records routed by a hash of [user_id]"), "{rewritten}");
}

/// In upsert mode a window result's id includes its `window_start`: a step after the window
/// that changes or removes that field would give results of different windows one id.
#[test]
fn idempotent_upsert_keeps_window_start_after_a_window() {
    let window = "  - window: { group_by: [user_id], tumbling: 1m, aggregates: { n: count() } }";
    let upsert = |steps: &str| windowed(&format!("{window}\n{steps}"), "").replace("  topic: out", "  topic: out\n  mode: idempotent_upsert");
    let output = validate(&upsert("  - select: { user_id: user_id, n: n }"));
    assert_one_config_problem(&output, "steps[1]: idempotent_upsert ids of window results are their group and window_start");
    let output = validate(&upsert("  - select: { user_id: user_id, window_start: window_start, n: n }\n  - set: { doubled: \"n * 2\" }"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// `sink.headers`: pass-through is refused where outputs merge several inputs (a window's
/// results), and a header expression must give text, a number or a boolean.
#[test]
fn sink_headers_are_checked_against_what_the_sink_receives() {
    let steps = "  - window: { group_by: [user_id], tumbling: 1m, aggregates: { n: count() } }";
    let text = windowed(steps, "").replace(
        "  topic: out",
        "  topic: out\n  headers:\n    pass_through: true\n    set: { user: user_id, count: n, all: _headers, later: amount }",
    );
    let (_dir, path) = write(&text);
    let output = weir(&["validate", "--pipeline", &path], &[]);
    assert_config_problems(
        &output,
        3,
        &[
            "sink.headers.pass_through: a window's results come from several input records, whose headers differ",
            "sink.headers.set.all: '_headers' must give text, a number or a boolean",
            "sink.headers.set.later: 'amount' names 'amount' not in the record; fields: user_id, window_start, window_end, n",
        ],
    );
    let (_dir, path) = write(&text.replace("    pass_through: true\n", "").replace(", all: _headers, later: amount", ""));
    let output = weir(&["validate", "--pipeline", &path], &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("  sink headers: none of the input record's, then user = user_id, count = n\n"), "{stdout}");
}

/// List types: `[T]` in a schema, an explode of a list, and the problems of each spelled
/// out: a list of two types, an explode of a field that is not a list, explode in upsert
/// mode (one id for several outputs).
#[test]
fn list_types_and_explode_are_checked() {
    let text = r#"
name: lists
sources:
  orders:
    topics: [orders]
    format: json
    schema: { id: string, tags: [string], pairs: [string, long], lines: [{ sku: string }] }
steps:
  - explode: { field: id }
  - explode: { field: lines }
sink:
  topic: out
  mode: idempotent_upsert
"#;
    assert_one_config_problem(&validate(text), "sources.orders.schema.pairs: a list type names one element type");
    let text = text.replace(" pairs: [string, long],", "");
    assert_one_config_problem(&validate(&text), "steps[0].explode.field: 'id' is a string, not a list ([T])");
    let text = text.replace("  - explode: { field: id }\n", "");
    assert_one_config_problem(&validate(&text), "steps[0].explode: idempotent_upsert gives each output the id of its input");
    let output = validate(&text.replace("  mode: idempotent_upsert\n", ""));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("step 0: explode lines as lines\n    out: {id: string, tags: [string], lines: {sku: string}}"), "{stdout}");
}

/// `T?` (or `name?:` for a mapping or list) declares a field that may be null or absent;
/// `validate` prints it with its `?`.
#[test]
fn nullable_fields_are_declared_with_a_question_mark() {
    let text = r#"
name: nullable
sources:
  orders:
    topics: [orders]
    format: json
    schema: { id: string, coupon: string?, user?: { name: string }, tags?: [string], price: doubel? }
steps:
  - set: { code: "coupon == null ? 'none' : coupon" }
sink:
  topic: out
"#;
    assert_one_config_problem(&validate(text), "sources.orders.schema.price: unknown type 'doubel'");
    let output = validate(&text.replace("doubel?", "double?"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("fields: {id: string, coupon: string?, user: {name: string}?, tags: [string]?, price: double?}"), "{stdout}");
    assert!(stdout.contains("code: string}"), "{stdout}");
}

/// `outputs:` under `weir validate`: each output with where it branches off, its own steps
/// numbered after the main ones, the schema each hands on, and its sink; the example the
/// quickstart runs validates.
#[test]
fn validate_prints_each_output_with_its_steps_and_sink() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/clicks-filter.yaml");
    let output = weir(&["validate", "--pipeline", example.to_str().unwrap()], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let expected = [
        "  output paid: from step 1\n    sink: clicks-filtered (json, key: user_id, transactional)\n",
        "  output big: from step 1\n    step 2: when amount >= 5.0\n",
        "    step 3: set cents = int(amount * 100.0)\n      out: {user_id: string, event_id: string, amount: double, read_from: string, cents: long}\n    sink: clicks-big (json, key: user_id, transactional)\n",
    ];
    for part in expected {
        assert!(stdout.contains(part), "missing\n{part}in\n{stdout}");
    }
}

/// Every problem of every output, each named by where it is, in one run (exit 2).
#[test]
fn output_problems_are_listed_together() {
    let outputs = "outputs:\n  a:\n    from: dedup\n    sink: { topic: a }\n  b:\n    when: \"ghost > 1\"\n    sink: { topic: b, format: text }\n  c:\n    steps: [ { window: { group_by: [user_id], tumbling: 1m, aggregates: { n: count() } } } ]\n    sink: { topic: c, headers: { pass_through: true } }\n";
    let text = GOOD.replace("sink:\n  topic: clicks-filtered\n  key: [user_id]\n", outputs);
    let output = validate(&text);
    assert_config_problems(
        &output,
        4,
        &[
            "outputs.a.from: no step is a dedup (the steps: filter); name a step by its kind or number",
            "outputs.b.when:",
            "outputs.b.sink.format:",
            "outputs.c.sink.headers.pass_through: a window's results come from several input records",
        ],
    );
    // `sink:` and `outputs:` together, or neither.
    let both = format!("{GOOD}outputs:\n  a:\n    sink: {{ topic: a }}\n");
    assert_one_config_problem(&validate(&both), "outputs: a pipeline has `sink:` (one output) or `outputs:` (several), not both");
}

/// A table record that cannot be applied (no key field; a tombstone without a Kafka key)
/// changes nothing and is reported with where it was read, on stderr under `weir test` as
/// in the log under `weir run`; it is not a DLQ record (every instance reads every table
/// record) and the run succeeds.
#[test]
fn weir_test_reports_table_records_it_cannot_apply() {
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/lookup");
    let pipeline = golden.join("pipeline.yaml");
    let input = golden.join("input.jsonl");
    let output = weir(&["test", "--pipeline", pipeline.to_str().unwrap(), "--input", input.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let skipped: Vec<&str> = stderr.lines().filter(|line| line.starts_with("skipped a table record")).collect();
    assert_eq!(skipped.len(), 2, "{stderr}");
    assert!(skipped[0].contains("customers[0]@4") && skipped[0].contains("'customer_id' is missing"), "{stderr}");
    assert!(skipped[1].contains("customers[0]@5") && skipped[1].contains("does not name its key"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains(".dlq"));
}

/// SIGTERM while `weir run` is still trying to reach the cluster (nothing listens on the
/// address) stops it at once, cleanly, instead of after the start-up wait.
#[test]
fn run_stops_on_sigterm_while_it_waits_for_the_cluster() {
    let (dir, path) = write(GOOD);
    let state = dir.path().join("state");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", "--pipeline", &path])
        .env("WEIR__KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9")
        .env("WEIR__HTTP__LISTEN", "127.0.0.1:0")
        .env("WEIR__STATE__DIR", &state)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(child.try_wait().unwrap().is_none(), "weir should still be waiting for the cluster");
    let signalled = std::time::Instant::now();
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let deadline = signalled + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "weir did not stop within 10 s of SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(signalled.elapsed() < std::time::Duration::from_secs(5), "took {:?}", signalled.elapsed());
}

/// `weir plan --emit acls` prints a Strimzi KafkaUser with every ACL the pipeline needs:
/// read on its source and table topics, write on its sink and DLQ (created if missing),
/// the internal topics and transactional ids under the `<name>-` prefix, and its group.
#[test]
fn plan_emits_the_acls_a_pipeline_needs() {
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/revenue-by-country/pipeline.yaml");
    let output = weir(&["plan", "--emit", "acls", "--pipeline", golden.to_str().unwrap()], &[]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}{}", String::from_utf8_lossy(&output.stderr));
    let user: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap_or_else(|error| panic!("{error}:\n{text}"));
    assert_eq!(user["kind"].as_str(), Some("KafkaUser"));
    let acls = user["spec"]["authorization"]["acls"].as_sequence().expect("acls");
    let rule = |kind: &str, name: &str| -> (String, Vec<String>) {
        let found = acls
            .iter()
            .find(|acl| acl["resource"]["type"].as_str() == Some(kind) && acl["resource"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no {kind} {name} in\n{text}"));
        let operations = found["operations"].as_sequence().unwrap().iter().map(|op| op.as_str().unwrap().to_string()).collect();
        (found["resource"]["patternType"].as_str().unwrap().to_string(), operations)
    };
    let has = |kind: &str, name: &str, pattern: &str, wanted: &[&str]| {
        let (found_pattern, operations) = rule(kind, name);
        assert_eq!(found_pattern, pattern, "{kind} {name}");
        for operation in wanted {
            assert!(operations.iter().any(|found| found == operation), "{kind} {name} lacks {operation}: {operations:?}");
        }
    };
    has("topic", "orders", "literal", &["Read", "Describe"]);
    has("topic", "customers", "literal", &["Read"]);
    has("topic", "revenue-by-country", "literal", &["Write", "DescribeConfigs"]);
    has("topic", "revenue-by-country.dlq", "literal", &["Write", "Create"]);
    has("topic", "revenue-by-country-", "prefix", &["Read", "Write", "Create", "DeleteRecords", "Delete"]);
    has("group", "revenue-by-country", "literal", &["Read"]);
    has("group", "revenue-by-country-tables", "literal", &["Read"]);
    has("transactionalId", "revenue-by-country-", "prefix", &["Write", "Describe"]);
    assert_eq!(acls.len(), 8, "{text}");
}

/// A misspelt key, step kind or setting gets the name it was probably meant to be.
#[test]
fn misspelt_names_get_a_suggestion() {
    let text = GOOD.replace("  - filter:", "  - filtre:").replace("  key: [user_id]", "  kee: [user_id]").replace("    format: json", "    fromat: json");
    let (_dir, path) = write(&text);
    let output = weir(&["validate", "--pipeline", &path], &[("WEIR__KAFKA__BOOTSTRAP_SERVER", "x:9092"), ("WEIR__LOGING__LEVEL", "info")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "unknown step kind 'filtre'; did you mean 'filter'?",
        "sink.kee: unknown key 'kee'; did you mean 'key'?",
        "sources.clicks.fromat: unknown key 'fromat'; did you mean 'format'?",
        "unknown setting 'bootstrap_server'; did you mean 'bootstrap_servers'?",
        "unknown section 'loging'; did you mean 'logging'?",
    ] {
        assert!(stderr.contains(expected), "no {expected:?} in\n{stderr}");
    }
    // Nothing near enough: no suggestion, only the list.
    let (_dir, path) = write(&GOOD.replace("  key: [user_id]", "  compression: zstd"));
    let stderr = String::from_utf8_lossy(&weir(&["validate", "--pipeline", &path], &[]).stderr).into_owned();
    assert!(stderr.contains("unknown key 'compression'; known keys:") && !stderr.contains("did you mean"), "{stderr}");
}

/// A pipeline problem says where in the file it is (line and column, both from 1), found from
/// its key path; a settings problem names its environment variable instead.
#[test]
fn pipeline_problems_name_their_line_and_column() {
    let text = GOOD.replace("  key: [user_id]", "  kee: [user_id]");
    let (_dir, path) = write(&text);
    let output = weir(&["validate", "--pipeline", &path], &[("WEIR__RUNTIME__COMMIT_INTERVAL", "soon")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let (line, written) = text.lines().enumerate().find(|(_, line)| line.contains("kee:")).unwrap();
    let column = written.find("kee").unwrap() + 1;
    let expected = format!("sink.kee: unknown key 'kee'; did you mean 'key'? known keys: topic, format, key, key_format, mode, headers (line {}, column {column})", line + 1);
    assert!(stderr.contains(&expected), "no {expected:?} in\n{stderr}");
    let setting = stderr.lines().find(|line| line.contains("runtime.commit_interval")).unwrap();
    assert!(!setting.contains("(line "), "{setting}");
}

/// A function the CEL interpreter does not have is refused by `weir validate` (it used to
/// pass and send every record to the DLQ); the functions it has still pass.
#[test]
fn functions_the_interpreter_lacks_are_config_errors() {
    for (expression, missing) in [("user_id.lowerAscii() != 'bot'", "lowerAscii"), ("max(amount, 1.0) > 2.0", "max"), ("shout(user_id)", "shout")] {
        let (_dir, path) = write(&GOOD.replace("amount > 0.0 && user_id != 'bot'", expression));
        let output = weir(&["validate", "--pipeline", &path], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{expression}: {stderr}");
        assert!(stderr.contains(&format!("calls '{missing}', which weir's CEL interpreter does not have")), "{stderr}");
    }
    let works = "user_id.startsWith('u') && size(user_id) > 1 && user_id.matches('^u') && int(amount) >= 0 && timestamp('2026-01-01T00:00:00Z') > timestamp('2025-01-01T00:00:00Z')";
    let (_dir, path) = write(&GOOD.replace("amount > 0.0 && user_id != 'bot'", works));
    let output = weir(&["validate", "--pipeline", &path], &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// A topic pattern with stateful steps is refused by `weir validate` (state is numbered like
/// the input partitions, which a pattern does not fix); it used to pass and fail at `weir run`.
#[test]
fn a_pattern_source_with_stateful_steps_is_a_config_error() {
    let text = GOOD.replace("topics: [clicks]", "pattern: \"clicks-.*\"").replace("  - filter:", "  - dedup: { key: [event_id], within: 10m }\n  - filter:");
    let (_dir, path) = write(&text);
    assert_one_config_problem(&weir(&["validate", "--pipeline", &path], &[]), "sources.clicks.pattern: 'clicks-.*': stateful steps");
    // Without the dedup the pattern is fine.
    let (_dir, path) = write(&GOOD.replace("topics: [clicks]", "pattern: \"clicks-.*\""));
    assert!(weir(&["validate", "--pipeline", &path], &[]).status.success());
}

/// Topic configs for the topics weir creates are checked with the other settings:
/// cleanup.policy is weir's, and the replication factor is a number.
#[test]
fn topic_settings_are_checked_before_touching_kafka() {
    let (_dir, path) = write(GOOD);
    let output = weir(
        &["validate", "--pipeline", &path],
        &[("WEIR__KAFKA__TOPIC_CONFIGS__CLEANUP_POLICY", "delete"), ("WEIR__KAFKA__REPLICATION_FACTOR", "two")],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("kafka.topic_configs.cleanup.policy (env WEIR__KAFKA__TOPIC_CONFIGS__CLEANUP_POLICY): weir sets it"), "{stderr}");
    assert!(stderr.contains("kafka.replication_factor") && stderr.contains("'two'"), "{stderr}");
}

/// `runtime.workers` from 1 to 64: zero, too many and a word are each a configuration
/// problem, exit 2 before touching Kafka; `weir validate` names the workers' transactional
/// ids.
#[test]
fn workers_out_of_range_are_configuration_problems_and_validate_names_their_ids() {
    let (_dir, path) = write(GOOD);
    for (value, expected) in [
        ("0", "runtime.workers (env WEIR__RUNTIME__WORKERS): '0' is not a whole number greater than zero"),
        ("65", "runtime.workers (env WEIR__RUNTIME__WORKERS): 65 is more than 64"),
        ("many", "runtime.workers (env WEIR__RUNTIME__WORKERS): 'many' is not a whole number greater than zero"),
    ] {
        let output = weir(&["run", "--pipeline", &path], &[("WEIR__RUNTIME__WORKERS", value)]);
        assert_one_config_problem(&output, expected);
    }
    let output = weir(&["validate", "--pipeline", &path], &[("WEIR__RUNTIME__WORKERS", "3")]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("workers: 3, transactional ids "), "{stdout}");
    assert!(stdout.contains("-<instance>-w1 .. -w2"), "{stdout}");
}

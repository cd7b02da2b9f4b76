//! `weir schema pipeline|settings` as an editor uses them: the shipped examples, the golden
//! pipelines and the default settings pass a JSON Schema validator, wrong files fail it at
//! the wrong key, and the schema files in config/schemas are what `weir schema` prints.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn schema(of: &str) -> Json {
    let output = Command::new(env!("CARGO_BIN_EXE_weir")).args(["schema", of]).output().expect("run weir");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("weir schema prints JSON")
}

fn yaml_as_json(text: &str) -> Json {
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).expect("YAML");
    serde_json::to_value(yaml).expect("YAML with string keys")
}

/// The validation errors, each as `<instance path>: <message>`; empty when valid.
fn problems(validator: &jsonschema::Validator, document: &Json) -> Vec<String> {
    validator.iter_errors(document).map(|error| format!("{}: {error}", error.instance_path())).collect()
}

fn pipeline_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(repository().join("config/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|extension| extension == "yaml") {
            files.push(path);
        }
    }
    for entry in std::fs::read_dir(repository().join("tests/golden")).unwrap() {
        let path = entry.unwrap().path().join("pipeline.yaml");
        if path.is_file() {
            files.push(path);
        }
    }
    files
}

#[test]
fn every_example_and_golden_pipeline_passes_the_pipeline_schema() {
    let validator = jsonschema::validator_for(&schema("pipeline")).expect("a valid JSON Schema");
    let files = pipeline_files();
    assert!(files.len() >= 20, "pipelines missing: {files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let found = problems(&validator, &yaml_as_json(&text));
        assert!(found.is_empty(), "{}: {found:#?}", path.display());
    }
}

#[test]
fn the_examples_name_the_shipped_schema_for_their_editors() {
    for path in pipeline_files().iter().filter(|path| path.starts_with(repository().join("config/examples"))) {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            text.starts_with("# yaml-language-server: $schema=../schemas/pipeline.schema.json\n"),
            "{} does not start with the $schema header",
            path.display()
        );
    }
}

#[test]
fn wrong_pipelines_fail_the_schema_at_the_wrong_key() {
    let validator = jsonschema::validator_for(&schema("pipeline")).expect("a valid JSON Schema");
    let good = std::fs::read_to_string(repository().join("tests/golden/dedup/pipeline.yaml")).unwrap();
    assert!(problems(&validator, &yaml_as_json(&good)).is_empty());
    let cases = [
        // A misspelt key of a step.
        (good.replace("within:", "withn:"), "/steps/0/dedup"),
        // A word outside a key's words.
        (good.replace("format: json", "format: xml"), "/sources/"),
        // A step kind weir does not have.
        (good.replace("- dedup:", "- dedupe:"), "/steps/0"),
        // A key at the top level weir does not know.
        (format!("{good}\nsinks: {{topic: out}}\n"), ""),
        // A field type weir does not have.
        (good.replace(": long", ": int"), "/sources/"),
    ];
    for (wrong, at) in cases {
        assert_ne!(wrong, good, "the case changed nothing");
        let found = problems(&validator, &yaml_as_json(&wrong));
        assert!(found.iter().any(|problem| problem.starts_with(at)), "expected a problem at {at}: {found:#?}\n{wrong}");
    }
}

#[test]
fn the_default_settings_pass_the_settings_schema_and_a_misspelt_one_fails() {
    let validator = jsonschema::validator_for(&schema("settings")).expect("a valid JSON Schema");
    let defaults: Json = toml::from_str(&std::fs::read_to_string(repository().join("config/default.toml")).unwrap()).unwrap();
    assert_eq!(problems(&validator, &defaults), Vec::<String>::new());
    let written: Json = toml::from_str("[runtime]\ncommit_interval = \"50ms\"\nmax_batch_records = \"500\"\n[kafka.options]\n\"linger.ms\" = 5\n").unwrap();
    assert_eq!(problems(&validator, &written), Vec::<String>::new());
    let misspelt: Json = toml::from_str("[runtime]\ncommit_intervall = \"50ms\"\n").unwrap();
    let found = problems(&validator, &misspelt);
    assert!(found.iter().any(|problem| problem.starts_with("/runtime") && problem.contains("commit_intervall")), "{found:#?}");
}

#[test]
fn the_shipped_schema_files_are_what_weir_schema_prints() {
    for of in ["pipeline", "settings"] {
        let path = repository().join(format!("config/schemas/{of}.schema.json"));
        let shipped: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_default()).unwrap_or_default();
        assert!(
            shipped == schema(of),
            "{} is out of date: run `cargo run -- schema {of} > config/schemas/{of}.schema.json`",
            path.display()
        );
    }
}

/// docs/settings.md's table and the settings schema (the keys weir reads) name the same
/// settings, each with its environment variable, so neither drifts from the other.
#[test]
fn the_settings_table_lists_exactly_the_settings_weir_reads() {
    let settings = schema("settings");
    let mut known = Vec::new();
    for (section, body) in settings["properties"].as_object().unwrap() {
        for key in body["properties"].as_object().unwrap().keys() {
            known.push(format!("{section}.{key}"));
        }
    }
    let table = std::fs::read_to_string(repository().join("docs/settings.md")).unwrap();
    let rows: Vec<(String, String)> = table
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|row| {
            let (name, rest) = row.split_once('`')?;
            let env = rest.split('`').nth(1)?.to_string();
            // `kafka.options.<option>`: the key is the map.
            let name = name.split(".<").next()?.to_string();
            Some((name, env))
        })
        .filter(|(_, env)| env.starts_with("WEIR__"))
        .collect();
    let listed: Vec<&str> = rows.iter().map(|(name, _)| name.as_str()).collect();
    for key in &known {
        assert!(listed.contains(&key.as_str()), "docs/settings.md does not list {key}");
    }
    for (name, env) in &rows {
        assert!(known.contains(name), "docs/settings.md lists {name}, which weir does not read");
        let expected = format!("WEIR__{}", name.replace('.', "__").to_uppercase());
        assert!(env.starts_with(&expected), "{name}: {env} is not {expected}");
    }
}

/// Where the settings schema's help names a default (`(default 10s)`), it is the value in
/// config/default.toml, the one weir starts from.
#[test]
fn the_defaults_the_settings_schema_names_are_config_default_toml_s() {
    let settings = schema("settings");
    let defaults: Json = toml::from_str(&std::fs::read_to_string(repository().join("config/default.toml")).unwrap()).unwrap();
    let mut checked = 0;
    for (section, body) in settings["properties"].as_object().unwrap() {
        for (key, property) in body["properties"].as_object().unwrap() {
            let about = property["description"].as_str().unwrap_or_default();
            let Some(named) = about.split("(default ").nth(1).and_then(|rest| rest.split(')').next()) else {
                continue;
            };
            let written = match &defaults[section][key] {
                Json::String(text) => text.clone(),
                other => other.to_string(),
            };
            assert_eq!(named, written, "{section}.{key}: the schema says default {named}, config/default.toml {written}");
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} defaults named");
}

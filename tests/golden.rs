//! Golden outputs through `weir test`, as a user runs it: each directory under tests/golden
//! holds a pipeline, an input, the expected output (worked out by hand from PIPELINE.md's
//! semantics; the walkthrough is in the pipeline's comments) and optional extra arguments.
//! Each case runs at several batch sizes: where batches end changes nothing but updates
//! (`emit: update` windows, running aggregates), whose last value per key stays the same.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

#[test]
fn every_golden_case_matches_its_expected_output() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<_> = std::fs::read_dir(&root).unwrap().map(|entry| entry.unwrap().path()).collect();
    cases.sort();
    assert!(cases.len() >= 6, "golden cases missing in {}", root.display());
    let mut failures = Vec::new();
    for case in &cases {
        let extra = std::fs::read_to_string(case.join("args")).unwrap_or_default();
        let pipeline = std::fs::read_to_string(case.join("pipeline.yaml")).unwrap();
        // Updates (`emit: update` windows, running aggregates) show values that depend on
        // where batches end: those cases name their batch size (or take the default) for the
        // exact output, and at every other size must leave the same last value per key.
        let updates = pipeline.contains("emit: update") || pipeline.contains("- aggregate:");
        let sizes: &[&str] = match extra.contains("--batch-size") || updates {
            true => &[""],
            false => &["", "--batch-size 1", "--batch-size 7"],
        };
        for size in sizes {
            let output = weir_test(case, &extra, size, true);
            if !output.status.success() {
                failures.push(format!(
                    "{} {size}:\n{}{}",
                    case.display(),
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
        }
        if updates {
            let expected = last_per_key(&std::fs::read_to_string(case.join("expected.jsonl")).unwrap());
            let others: String = extra.split("--batch-size").next().unwrap_or_default().to_string();
            for size in ["--batch-size 1", "--batch-size 7", "--batch-size 1000"] {
                let output = weir_test(case, &others, size, false);
                let found = last_per_key(&String::from_utf8_lossy(&output.stdout));
                if !output.status.success() || found != expected {
                    failures.push(format!(
                        "{} {size}: the last value per key differs\nexpected {expected:#?}\nfound {found:#?}\n{}",
                        case.display(),
                        String::from_utf8_lossy(&output.stderr)
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `weir test` on a golden case, with `--expect` its expected output or printing its own.
fn weir_test(case: &Path, extra: &str, size: &str, expect: bool) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
    command.arg("test").arg("--pipeline").arg(case.join("pipeline.yaml")).arg("--input").arg(case.join("input.jsonl"));
    if expect {
        command.arg("--expect").arg(case.join("expected.jsonl"));
    }
    command.args(extra.split_whitespace()).args(size.split_whitespace()).output().unwrap()
}

/// What a compacted topic keeps of an output: per (topic, key), the last value, a null
/// value deleting the key. Records without a key (DLQ records of unkeyed input) are kept
/// all, as a sorted list.
fn last_per_key(output: &str) -> (BTreeMap<(String, String), String>, Vec<String>) {
    let mut last = BTreeMap::new();
    let mut unkeyed = Vec::new();
    for line in output.lines().filter(|line| !line.trim().is_empty()) {
        let record: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|error| panic!("{line}: {error}"));
        let (topic, key, value) = (record["topic"].to_string(), &record["key"], &record["value"]);
        match (key.is_null(), value.is_null()) {
            (true, _) => unkeyed.push(line.to_string()),
            (false, true) => {
                last.remove(&(topic, key.to_string()));
            }
            (false, false) => {
                last.insert((topic, key.to_string()), value.to_string());
            }
        }
    }
    unkeyed.sort();
    (last, unkeyed)
}

#[test]
fn a_difference_is_reported_with_exit_status_1() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/dedup");
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("expected.jsonl");
    let expected = std::fs::read_to_string(case.join("expected.jsonl")).unwrap();
    std::fs::write(&wrong, expected.replace(r#""n":8"#, r#""n":80"#)).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["test", "--pipeline"])
        .arg(case.join("pipeline.yaml"))
        .arg("--input")
        .arg(case.join("input.jsonl"))
        .arg("--expect")
        .arg(&wrong)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.contains("line 5 of the expected output") && report.contains(r#""n":80"#) && report.contains(r#""n":8"#), "{report}");
}

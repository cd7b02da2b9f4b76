//! Golden outputs through `weir test`, as a user runs it: each directory under tests/golden
//! holds a pipeline, an input, the expected output (worked out by hand from PIPELINE.md's
//! semantics; the walkthrough is in the pipeline's comments) and optional extra arguments.
//! Each case runs at several batch sizes: where batches end changes nothing but `emit:
//! update` results.

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
        // The output does not depend on where batches end, except for `emit: update` (whose
        // cases name their batch size): each case runs at the default size, 1 and 7 too.
        let pipeline = std::fs::read_to_string(case.join("pipeline.yaml")).unwrap();
        let sizes: &[&str] = match extra.contains("--batch-size") || pipeline.contains("emit: update") {
            true => &[""],
            false => &["", "--batch-size 1", "--batch-size 7"],
        };
        for size in sizes {
            let output = Command::new(env!("CARGO_BIN_EXE_weir"))
                .arg("test")
                .arg("--pipeline")
                .arg(case.join("pipeline.yaml"))
                .arg("--input")
                .arg(case.join("input.jsonl"))
                .arg("--expect")
                .arg(case.join("expected.jsonl"))
                .args(extra.split_whitespace())
                .args(size.split_whitespace())
                .output()
                .unwrap();
            if !output.status.success() {
                failures.push(format!(
                    "{} {size}:\n{}{}",
                    case.display(),
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
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
    assert!(report.contains("line 5:") && report.contains(r#""n":80"#) && report.contains(r#""n":8"#), "{report}");
}

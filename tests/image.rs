//! The container image: docker/Dockerfile's runtime stage, built by scripts/image from Debian's
//! packages and this test's weir binary (no container registry), starts as uid 10001 with its
//! entrypoint, answers /health/ready against the test broker, runs the quickstart pipeline
//! and stops cleanly on SIGTERM. Needs podman, buildah and mmdebstrap (`scripts/image
//! install`; .ci/run installs them): without them it is skipped, unless WEIR_IMAGE_TEST=1.

#[path = "support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn script() -> std::path::PathBuf {
    repo_root().join("scripts/image")
}

fn tools_present() -> bool {
    ["podman", "buildah", "mmdebstrap"].iter().all(|tool| {
        Command::new("sh").args(["-c", &format!("command -v {tool}")]).stdout(Stdio::null()).status().is_ok_and(|status| status.success())
    })
}

/// Removes the test's image and container however the test ends.
struct Cleanup {
    tag: String,
    container: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "--force", &self.container]).output();
        let _ = Command::new("podman").args(["rmi", "--force", &self.tag]).output();
    }
}

#[test]
fn image_starts_answers_ready_and_runs_the_quickstart() {
    if !tools_present() {
        assert!(std::env::var("WEIR_IMAGE_TEST").as_deref() != Ok("1"), "WEIR_IMAGE_TEST=1 but podman, buildah or mmdebstrap is missing (scripts/image install)");
        eprintln!("skipped: podman, buildah or mmdebstrap missing (scripts/image install)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("localhost/{}:test", unique("weir-image"));
    let container = unique("weir-image");
    let _cleanup = Cleanup { tag: tag.clone(), container: container.clone() };

    // Build: the base is reused between runs of scripts/image on one machine.
    let started = Instant::now();
    let output = Command::new(script())
        .args(["build", "--tag", &tag, "--binary"])
        .arg(weir_binary())
        .arg("--output")
        .arg(dir.path().join("weir-oci.tar"))
        .output()
        .unwrap();
    assert!(output.status.success(), "scripts/image build failed:\n{}", String::from_utf8_lossy(&output.stderr));
    eprintln!("image built in {:?}", started.elapsed());

    // The image's configuration is the Dockerfile's.
    let inspect = |format: &str| -> String {
        let output = Command::new("podman").args(["image", "inspect", "--format", format, &tag]).output().unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    };
    assert_eq!(inspect("{{.Config.User}}"), "10001:10001");
    assert_eq!(inspect("{{json .Config.Entrypoint}}"), r#"["weir"]"#);
    assert_eq!(inspect("{{json .Config.Cmd}}"), r#"["run"]"#);
    assert!(inspect("{{json .Config.Env}}").contains("WEIR__STATE__DIR=/var/lib/weir"));

    // The quickstart pipeline as shipped, on topics of this test's own.
    let clicks = unique("clicks");
    let name = unique("clicks-filter");
    let example = std::fs::read_to_string(repo_root().join("config/examples/clicks-filter.yaml")).unwrap();
    let mut pipeline = example.clone();
    for (from, to) in [
        ("name: clicks-filter", format!("name: {name}")),
        ("topics: [clicks]", format!("topics: [{clicks}]")),
        ("topic: clicks-filtered", format!("topic: {clicks}-filtered")),
        ("topic: clicks-big", format!("topic: {clicks}-big")),
    ] {
        assert!(pipeline.contains(from), "config/examples/clicks-filter.yaml no longer has `{from}`");
        pipeline = pipeline.replace(from, &to);
    }
    let pipeline_path = dir.path().join("pipeline.yaml");
    std::fs::write(&pipeline_path, pipeline).unwrap();
    for topic in [clicks.clone(), format!("{clicks}-filtered"), format!("{clicks}-big")] {
        create_topic(&topic, 2);
    }

    // Start: scripts/image run execs podman run (SIGTERM is proxied to weir).
    let http_port = free_port();
    let log = dir.path().join("weir.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(script())
        .args(["run", "--tag", &tag, "--name", &container, "-v"])
        .arg(format!("{}:/etc/weir/pipeline.yaml:ro", pipeline_path.display()))
        .args(["-e", "WEIR_PIPELINE=/etc/weir/pipeline.yaml"])
        .args(["-e", &format!("WEIR__KAFKA__BOOTSTRAP_SERVERS={}", broker().bootstrap)])
        .args(["-e", &format!("WEIR__HTTP__LISTEN=127.0.0.1:{http_port}")])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(90);
    while http_get(http_port, "/health/ready").map(|(status, _)| status) != Some(200) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the container exited ({status}) before it was ready; log:\n{}", log_text());
        }
        assert!(Instant::now() < deadline, "/health/ready not 200 within 90 s; log:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    let top = Command::new("podman").args(["top", &container, "huser", "args"]).output().unwrap();
    assert!(String::from_utf8_lossy(&top.stdout).contains("10001"), "weir runs as uid 10001: {}", String::from_utf8_lossy(&top.stdout));

    // The quickstart's input through the container, read back read_committed.
    let inputs: Vec<Input> = std::fs::read_to_string(repo_root().join("config/examples/clicks-filter.input.jsonl"))
        .unwrap()
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            let value = match &record["value"] {
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            Input {
                key: record["key"].as_str().map(|key| key.as_bytes().to_vec()),
                value: Some(value.into_bytes()),
                partition: record["partition"].as_i64().map(|partition| partition as i32),
                headers: Vec::new(),
            }
        })
        .collect();
    produce(&clicks, inputs);
    let filtered = format!("{clicks}-filtered");
    wait_until(Duration::from_secs(60), "2 records in the filtered output", || read_committed(&filtered).len() >= 2);
    let mut users: Vec<String> = read_committed(&filtered).iter().map(|seen| seen.value_json()["user_id"].as_str().unwrap().to_string()).collect();
    users.sort();
    assert_eq!(users, ["u1", "u2"], "log:\n{}", log_text());
    let big = read_committed(&format!("{clicks}-big"));
    assert_eq!(big.len(), 1);
    assert_eq!(big[0].value_json()["cents"], 725);

    // SIGTERM: weir drains, commits and exits 0; podman run passes the status on.
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit within 60 s of SIGTERM; log:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit {status}; log:\n{}", log_text());
    assert!(log_text().contains("weir stopped cleanly"), "{}", log_text());
}

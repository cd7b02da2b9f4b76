//! The Helm chart: `helm lint` passes and the rendered StatefulSet has what running weir
//! needs (probes on the health endpoints, the state volume, the instance id from the pod,
//! the pipeline mounted from the ConfigMap). Needs helm (scripts/test installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml_ng::Value;

fn helm() -> PathBuf {
    if let Ok(path) = std::env::var("HELM") {
        return PathBuf::from(path);
    }
    let in_go_bin = std::env::var("HOME").map(|home| Path::new(&home).join("go/bin/helm")).ok();
    match in_go_bin {
        Some(path) if path.exists() => path,
        _ => PathBuf::from("helm"),
    }
}

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/weir")
}

fn run(arguments: &[&str]) -> String {
    let output = Command::new(helm())
        .args(arguments)
        .output()
        .unwrap_or_else(|error| panic!("cannot run helm ({error}); scripts/test installs it"));
    assert!(
        output.status.success(),
        "helm {arguments:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_chart_lints() {
    let chart = chart();
    run(&["lint", "--strict", chart.to_str().unwrap(), "--kube-version", "1.30"]);
}

#[test]
fn the_rendered_statefulset_has_probes_state_volume_instance_and_pipeline() {
    let chart = chart();
    let rendered = run(&["template", "clicks", chart.to_str().unwrap(), "--kube-version", "1.30"]);
    let documents: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&rendered)
        .map(|document| Value::deserialize(document).unwrap())
        .filter(|document| !document.is_null())
        .collect();
    let kinds: Vec<&str> = documents.iter().filter_map(|document| document["kind"].as_str()).collect();
    for kind in ["StatefulSet", "ConfigMap", "Service", "PodDisruptionBudget"] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
    let statefulset = documents.iter().find(|document| document["kind"] == "StatefulSet").unwrap();
    let container = &statefulset["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health/live");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/health/ready");
    let env = container["env"].as_sequence().unwrap();
    let variable = |name: &str| env.iter().find(|variable| variable["name"] == name).unwrap_or_else(|| panic!("no {name}"));
    // The instance (and so the transactional id) comes from the pod's stable ordinal.
    assert!(
        variable("WEIR_INSTANCE")["valueFrom"]["fieldRef"]["fieldPath"]
            .as_str()
            .unwrap()
            .contains("pod-index")
    );
    let pipeline = variable("WEIR_PIPELINE")["value"].as_str().unwrap().to_string();
    assert!(variable("WEIR__KAFKA__BOOTSTRAP_SERVERS")["value"].is_string());
    let state_dir = variable("WEIR__STATE__DIR")["value"].as_str().unwrap().to_string();
    let mounts = container["volumeMounts"].as_sequence().unwrap();
    let config_mount = mounts.iter().find(|mount| pipeline.starts_with(mount["mountPath"].as_str().unwrap())).unwrap();
    let volumes = statefulset["spec"]["template"]["spec"]["volumes"].as_sequence().unwrap();
    let config_volume = volumes.iter().find(|volume| volume["name"] == config_mount["name"]).unwrap();
    let config_map_name = config_volume["configMap"]["name"].as_str().unwrap();
    let config_map = documents
        .iter()
        .find(|document| document["kind"] == "ConfigMap" && document["metadata"]["name"] == config_map_name)
        .expect("the mounted ConfigMap is rendered");
    let file_name = Path::new(&pipeline).file_name().unwrap().to_str().unwrap();
    let pipeline_text = config_map["data"][file_name].as_str().unwrap();
    assert!(pipeline_text.contains("sources:"), "the ConfigMap holds the pipeline");
    // The chart's default pipeline is one weir accepts.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, pipeline_text).unwrap();
    let validated = Command::new(env!("CARGO_BIN_EXE_weir")).arg("validate").arg("--pipeline").arg(&file).output().unwrap();
    assert!(validated.status.success(), "{}", String::from_utf8_lossy(&validated.stderr));
    let claims = statefulset["spec"]["volumeClaimTemplates"].as_sequence().unwrap();
    assert!(
        claims.iter().any(|claim| mounts
            .iter()
            .any(|mount| mount["name"] == claim["metadata"]["name"] && mount["mountPath"].as_str() == Some(state_dir.as_str()))),
        "the state volume is mounted at state.dir"
    );
}

/// Secrets listed in `secretVolumes` are mounted read-only where the values say, for TLS
/// files and `kafka.option_files`.
#[test]
fn secret_volumes_are_mounted_read_only() {
    let chart = chart();
    let rendered = run(&[
        "template",
        "clicks",
        chart.to_str().unwrap(),
        "--kube-version",
        "1.30",
        "--set-json",
        r#"secretVolumes=[{"name":"kafka-credentials","secretName":"weir-kafka","mountPath":"/etc/weir/kafka"}]"#,
    ]);
    let statefulset = serde_yaml_ng::Deserializer::from_str(&rendered)
        .map(|document| Value::deserialize(document).unwrap())
        .find(|document| document["kind"] == "StatefulSet")
        .expect("a StatefulSet");
    let spec = &statefulset["spec"]["template"]["spec"];
    let mount = spec["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|mount| mount["name"] == "kafka-credentials")
        .expect("the Secret is mounted")
        .clone();
    assert_eq!(mount["mountPath"], "/etc/weir/kafka");
    assert_eq!(mount["readOnly"], true);
    let volume = spec["volumes"].as_sequence().unwrap().iter().find(|volume| volume["name"] == "kafka-credentials").expect("a volume");
    assert_eq!(volume["secret"]["secretName"], "weir-kafka");
}

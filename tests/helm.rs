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

fn render(extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut arguments = vec!["template", "clicks", chart.to_str().unwrap(), "--kube-version", "1.30"];
    arguments.extend_from_slice(extra);
    let rendered = run(&arguments);
    serde_yaml_ng::Deserializer::from_str(&rendered)
        .map(|document| Value::deserialize(document).unwrap())
        .filter(|document| !document.is_null())
        .collect()
}

fn kind<'a>(documents: &'a [Value], kind: &str) -> Option<&'a Value> {
    documents.iter().find(|document| document["kind"] == kind)
}

/// values.schema.json: a misspelt key or a mistyped value fails the render (and so install
/// and upgrade) with the path, instead of being ignored.
#[test]
fn the_values_schema_refuses_misspelt_and_mistyped_values() {
    let chart = chart();
    for (setting, said) in [
        ("serviceMonitor.enable=true", "additional properties 'enable' not allowed"),
        ("replicaCount=three", "/replicaCount"),
        ("instanceId.source=hostname", "/instanceId/source"),
    ] {
        let output = Command::new(helm())
            .args(["template", "clicks", chart.to_str().unwrap(), "--kube-version", "1.30", "--set", setting])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{setting} rendered");
        assert!(stderr.contains(said), "{setting}: {stderr}");
    }
}

/// The defaults: no service account token in the pod, a PDB that never holds a drain for
/// unready pods, the grace period derived from the drain timeout weir is given, and a
/// `helm test` pod that asks for /health/ready.
#[test]
fn the_defaults_are_hardened() {
    let documents = render(&[]);
    let pdb = kind(&documents, "PodDisruptionBudget").expect("a PDB");
    assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
    let pod = &kind(&documents, "StatefulSet").expect("a StatefulSet")["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"], true);
    let env = pod["containers"][0]["env"].as_sequence().unwrap();
    let drain = env.iter().find(|variable| variable["name"] == "WEIR__RUNTIME__DRAIN_TIMEOUT").expect("the drain timeout");
    assert_eq!(drain["value"], "8s");
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    let test = documents.iter().find(|document| document["metadata"]["annotations"]["helm.sh/hook"] == "test").expect("a test pod");
    let command = test["spec"]["containers"][0]["command"].as_sequence().unwrap();
    assert!(command.iter().any(|part| part.as_str().is_some_and(|part| part.ends_with(":8080/health/ready"))), "{command:?}");
}

/// What the review asked to be values: probes, security contexts, a service account, extra
/// volumes, topology spread, an existing ConfigMap for the pipeline, the drain timeout.
#[test]
fn overrides_reach_the_pod() {
    let documents = render(&[
        // Helm merges maps with the defaults: a key is dropped by setting it to null.
        "--set-json",
        r#"podSecurityContext={"runAsUser":null,"runAsGroup":null,"fsGroup":null}"#,
        "--set-json",
        r#"livenessProbe={"httpGet":{"path":"/health/live","port":"http"},"initialDelaySeconds":20}"#,
        "--set",
        "serviceAccount.create=true",
        "--set",
        "serviceAccount.annotations.team=streams",
        "--set-json",
        r#"extraVolumes=[{"name":"certs","csi":{"driver":"secrets-store.csi.k8s.io"}}]"#,
        "--set-json",
        r#"extraVolumeMounts=[{"name":"certs","mountPath":"/etc/certs"}]"#,
        "--set-json",
        r#"topologySpreadConstraints=[{"maxSkew":1,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"ScheduleAnyway"}]"#,
        "--set",
        "existingConfigMap=clicks-pipeline-from-git",
        "--set",
        "drainTimeoutSeconds=5",
    ]);
    assert!(kind(&documents, "ConfigMap").is_none(), "no ConfigMap of the chart's own with existingConfigMap");
    let account = kind(&documents, "ServiceAccount").expect("a ServiceAccount");
    assert_eq!(account["metadata"]["annotations"]["team"], "streams");
    let statefulset = kind(&documents, "StatefulSet").unwrap();
    let pod = &statefulset["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
    assert!(pod["securityContext"]["runAsUser"].is_null(), "OpenShift-style: no fixed user");
    let container = &pod["containers"][0];
    assert_eq!(container["livenessProbe"]["initialDelaySeconds"], 20);
    assert!(container["volumeMounts"].as_sequence().unwrap().iter().any(|mount| mount["mountPath"] == "/etc/certs"));
    let volumes = pod["volumes"].as_sequence().unwrap();
    assert!(volumes.iter().any(|volume| volume["name"] == "certs"));
    assert!(volumes.iter().any(|volume| volume["configMap"]["name"] == "clicks-pipeline-from-git"));
    assert!(statefulset["spec"]["template"]["metadata"]["annotations"]["checksum/pipeline"].is_null());
    assert_eq!(pod["topologySpreadConstraints"][0]["topologyKey"], "topology.kubernetes.io/zone");
    assert_eq!(pod["terminationGracePeriodSeconds"], 27);
}

/// `prometheusRule.enabled` renders every alert the operations review asked for, each with
/// a runbook link to its section of docs/runbooks.md; `dashboards.enabled` renders the
/// Grafana dashboard as JSON in a ConfigMap labelled for the Grafana sidecar.
#[test]
fn alerts_link_their_runbooks_and_the_dashboard_is_labelled_for_grafana() {
    let documents = render(&["--set", "prometheusRule.enabled=true", "--set", "dashboards.enabled=true"]);
    let rule = kind(&documents, "PrometheusRule").expect("a PrometheusRule");
    let rules = rule["spec"]["groups"][0]["rules"].as_sequence().unwrap();
    let runbooks = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/runbooks.md")).unwrap();
    let alerts: Vec<&str> = rules.iter().map(|rule| rule["alert"].as_str().unwrap()).collect();
    for alert in ["WeirNoCommit", "WeirLagRising", "WeirAborts", "WeirDeadLetters", "WeirNotReady", "WeirEventTimeLag", "WeirDataLoss"] {
        assert!(alerts.contains(&alert), "no {alert} in {alerts:?}");
    }
    for rule in rules {
        assert!(rule["expr"].as_str().unwrap().contains(r#"job="clicks-weir""#), "{rule:?}");
        let url = rule["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = url.split_once('#').expect("an anchor").1;
        assert!(url.starts_with("docs/runbooks.md#"), "{url}");
        assert!(runbooks.contains(&format!("<a id=\"{anchor}\"></a>")), "docs/runbooks.md has no section {anchor}");
    }
    let dashboards = documents
        .iter()
        .find(|document| document["kind"] == "ConfigMap" && document["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("a dashboard ConfigMap for the sidecar");
    let dashboard: serde_json::Value = serde_json::from_str(dashboards["data"]["weir.json"].as_str().unwrap()).unwrap();
    assert_eq!(dashboard["title"], "weir");
    let metrics = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/telemetry/metrics.rs")).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            // Every weir metric a panel reads is one weir exports.
            for name in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|word| word.starts_with("weir_")) {
                let exported = name.trim_end_matches("_bucket");
                assert!(metrics.contains(&format!("\"{exported}\"")), "panel {} reads {name}, which weir does not export", panel["title"]);
            }
        }
    }
}

/// The memory request and limit follow the store's memory settings and the workers (each with
/// its own store), which reach weir as environment variables; a memory the user sets wins.
#[test]
fn the_memory_request_and_limit_follow_the_state_store_settings() {
    let container = |extra: &[&str]| {
        let documents = render(extra);
        kind(&documents, "StatefulSet").unwrap()["spec"]["template"]["spec"]["containers"][0].clone()
    };
    let env = |container: &Value, name: &str| {
        container["env"].as_sequence().unwrap().iter().find(|variable| variable["name"] == name).map(|variable| variable["value"].clone())
    };
    let defaults = container(&[]);
    assert_eq!(defaults["resources"]["requests"]["memory"], "256Mi", "160 base + 32 cache + 64 write buffers");
    assert_eq!(defaults["resources"]["limits"]["memory"], "384Mi");
    assert_eq!(env(&defaults, "WEIR__STATE__CACHE_MIB"), Some(Value::from("32")));
    let larger = container(&["--set", "stateMemory.cacheMiB=512", "--set", "stateMemory.writeBuffersMiB=128"]);
    assert_eq!(larger["resources"]["requests"]["memory"], "800Mi");
    assert_eq!(larger["resources"]["limits"]["memory"], "1200Mi");
    assert_eq!(env(&larger, "WEIR__STATE__CACHE_MIB"), Some(Value::from("512")));
    assert_eq!(env(&larger, "WEIR__STATE__WRITE_BUFFERS_MIB"), Some(Value::from("128")));
    let workers = container(&["--set", "workers=3"]);
    assert_eq!(workers["resources"]["requests"]["memory"], "448Mi", "160 base + 3 workers x (32 + 64)");
    assert_eq!(env(&workers, "WEIR__RUNTIME__WORKERS"), Some(Value::from("3")));
    assert_eq!(env(&defaults, "WEIR__RUNTIME__WORKERS"), Some(Value::from("1")));
    let set = container(&["--set", "resources.limits.memory=2Gi", "--set", "resources.requests.memory=1Gi"]);
    assert_eq!(set["resources"]["requests"]["memory"], "1Gi");
    assert_eq!(set["resources"]["limits"]["memory"], "2Gi");
    assert_eq!(set["resources"]["requests"]["cpu"], "100m");
}

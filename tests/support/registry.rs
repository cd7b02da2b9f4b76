//! A schema registry for the Avro tests, and Avro records in the Confluent wire format.

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};


use super::*;

/// A Confluent-API-compatible schema registry: `SCHEMA_REGISTRY_URL`, or one started for this
/// test process (`scripts/schema-registry`, against the test broker, with schemas in a topic
/// of its own) and stopped when the process ends.
pub struct SchemaRegistry {
    pub url: String,
    /// The topic its schemas live in (None: an external registry).
    pub schemas_topic: Option<String>,
}

pub static SCHEMA_REGISTRY: OnceLock<SchemaRegistry> = OnceLock::new();

pub fn schema_registry() -> &'static SchemaRegistry {
    SCHEMA_REGISTRY.get_or_init(|| {
        if let Ok(url) = std::env::var("SCHEMA_REGISTRY_URL")
            && !url.trim().is_empty()
        {
            return SchemaRegistry { url: url.trim_end_matches('/').to_string(), schemas_topic: None };
        }
        let topic = unique("_schemas");
        let port = start_schema_registry(&topic, &[]);
        SchemaRegistry { url: format!("http://127.0.0.1:{port}"), schemas_topic: Some(topic) }
    })
}

/// Starts a registry process over `schemas_topic` (another instance can share it: it reads
/// the schemas the first one wrote), waits until it answers, and returns its port. It is
/// stopped when this test process ends.
pub fn start_schema_registry(schemas_topic: &str, extra: &[&str]) -> u16 {
    let port = free_port();
    start_schema_registry_on(port, schemas_topic, extra);
    port
}

pub fn start_schema_registry_on(port: u16, schemas_topic: &str, extra: &[&str]) -> u32 {
    let script = repo_root().join("scripts/schema-registry");
    let installed = Command::new(&script).arg("install").stderr(Stdio::inherit()).output().expect("run scripts/schema-registry install");
    assert!(installed.status.success(), "scripts/schema-registry install failed");
    let log = std::env::temp_dir().join(format!("{}.log", unique("schema-registry")));
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new(&script)
        .args(["run", &broker().bootstrap, &port.to_string(), "--schemas-topic", schemas_topic, "--group-id", &unique("sr")])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("start the schema registry");
    let pid = child.id();
    when_this_process_ends(&format!("kill {pid} 2>/dev/null"));
    std::mem::forget(child);
    // Up, and able to write: a registry that just joined its group answers 503 for a while.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answered = http_get(port, "/subjects").is_some_and(|(status, _)| status == 200 || status == 401);
        if answered {
            break;
        }
        assert!(Instant::now() < deadline, "the schema registry did not answer in 60 s; its log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    pid
}

/// Registers an Avro schema under `subject` in the test registry; returns its id.
pub fn register_schema(subject: &str, schema: &str) -> u32 {
    use schema_registry_converter::async_impl::schema_registry::{post_schema, SrSettings};
    let settings = SrSettings::new(schema_registry().url.clone());
    let supplied = weir::codec::registry::avro_schema(schema);
    // A registry that just started may still be electing its writer (503): try for a while.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match block_on(post_schema(&settings, subject.to_string(), supplied.clone())) {
            Ok(registered) => return registered.id,
            Err(error) if error.retriable && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(250)),
            Err(error) => panic!("registering a schema under {subject}: {error:?}"),
        }
    }
}

/// The Avro schema registered under `id`.
pub fn schema_by_id(id: u32) -> apache_avro::Schema {
    use schema_registry_converter::async_impl::schema_registry::{get_schema_by_id, SrSettings};
    let settings = SrSettings::new(schema_registry().url.clone());
    let registered = block_on(get_schema_by_id(id, &settings)).unwrap();
    apache_avro::Schema::parse_str(&registered.schema).unwrap()
}

/// The id of the latest schema under `<topic>-value` (`<topic>-key` for keys).
pub fn latest_schema_id(topic: &str, key: bool) -> u32 {
    use schema_registry_converter::async_impl::schema_registry::{get_schema_by_subject, SrSettings};
    use schema_registry_converter::schema_registry_common::SubjectNameStrategy;
    let settings = SrSettings::new(schema_registry().url.clone());
    block_on(get_schema_by_subject(&settings, &SubjectNameStrategy::TopicNameStrategy(topic.to_string(), key))).unwrap().id
}

/// `value` in the Confluent wire format, for the writer schema `id`.
pub fn avro_record(id: u32, schema: &apache_avro::Schema, value: apache_avro::types::Value) -> Vec<u8> {
    let mut bytes = vec![0];
    bytes.extend_from_slice(&id.to_be_bytes());
    bytes.extend(apache_avro::to_avro_datum(schema, value).unwrap());
    bytes
}

/// Decodes a Confluent-wire-format value with the writer schema it names, as JSON-like
/// fields (unions unwrapped); the schema id comes along.
pub fn read_avro(bytes: &[u8]) -> (u32, serde_json::Value) {
    assert_eq!(bytes.first(), Some(&0), "not the Confluent wire format: {bytes:02x?}");
    let id = u32::from_be_bytes(bytes[1..5].try_into().unwrap());
    let schema = schema_by_id(id);
    let value = apache_avro::from_avro_datum(&schema, &mut &bytes[5..], None).unwrap();
    (id, avro_to_json(value))
}

pub fn avro_to_json(value: apache_avro::types::Value) -> serde_json::Value {
    use apache_avro::types::Value as Avro;
    match value {
        Avro::Null => serde_json::Value::Null,
        Avro::Boolean(flag) => flag.into(),
        Avro::Int(number) => number.into(),
        Avro::Long(number) | Avro::TimestampMillis(number) => number.into(),
        Avro::Float(number) => f64::from(number).into(),
        Avro::Double(number) => number.into(),
        Avro::String(text) => text.into(),
        Avro::Union(_, inner) => avro_to_json(*inner),
        Avro::Record(fields) => fields.into_iter().map(|(name, value)| (name, avro_to_json(value))).collect::<serde_json::Map<_, _>>().into(),
        other => panic!("unexpected Avro value in weir's output: {other:?}"),
    }
}

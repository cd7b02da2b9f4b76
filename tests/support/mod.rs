//! Test harness: a real Apache Kafka broker (one per test process, started by
//! `scripts/kafka` unless `KAFKA_BOOTSTRAP_SERVERS` names one), topic and record helpers, and
//! weir processes started from the built binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub struct Broker {
    pub bootstrap: String,
    /// The listener that takes SASL (PLAIN, SCRAM-SHA-256/512), and its user.
    pub sasl: Option<SaslListener>,
    /// The listener that takes the same SASL over TLS, and the CA certificate (PEM file)
    /// that verifies it.
    pub tls: Option<TlsListener>,
}

pub struct TlsListener {
    pub bootstrap: String,
    pub ca_location: PathBuf,
}

impl TlsListener {
    fn read(run_dir: &Path) -> Option<TlsListener> {
        let bootstrap = std::fs::read_to_string(run_dir.join("tls_bootstrap")).ok()?.trim().to_string();
        Some(TlsListener { bootstrap, ca_location: run_dir.join("tls/ca.pem") })
    }

    /// `KAFKA_TLS_BOOTSTRAP_SERVERS` and `KAFKA_TLS_CA_LOCATION` (with the SASL user above).
    fn from_env() -> Option<TlsListener> {
        let variable = |name: &str| std::env::var(name).ok().filter(|value| !value.trim().is_empty());
        Some(TlsListener {
            bootstrap: variable("KAFKA_TLS_BOOTSTRAP_SERVERS")?,
            ca_location: variable("KAFKA_TLS_CA_LOCATION")?.into(),
        })
    }
}

pub struct SaslListener {
    pub bootstrap: String,
    pub user: String,
    pub password: String,
}

impl SaslListener {
    /// From `scripts/kafka`'s run dir: `sasl_bootstrap` and `sasl_user`.
    fn read(run_dir: &Path) -> Option<SaslListener> {
        let bootstrap = std::fs::read_to_string(run_dir.join("sasl_bootstrap")).ok()?.trim().to_string();
        let user_file = std::fs::read_to_string(run_dir.join("sasl_user")).ok()?;
        let field = |name: &str| user_file.lines().find_map(|line| line.strip_prefix(&format!("{name}="))).map(str::to_string);
        Some(SaslListener { bootstrap, user: field("user")?, password: field("password")? })
    }

    /// `KAFKA_SASL_BOOTSTRAP_SERVERS`, `KAFKA_SASL_USERNAME` and `KAFKA_SASL_PASSWORD`, for a
    /// broker the tests did not start.
    fn from_env() -> Option<SaslListener> {
        let variable = |name: &str| std::env::var(name).ok().filter(|value| !value.trim().is_empty());
        Some(SaslListener {
            bootstrap: variable("KAFKA_SASL_BOOTSTRAP_SERVERS")?,
            user: variable("KAFKA_SASL_USERNAME")?,
            password: variable("KAFKA_SASL_PASSWORD")?,
        })
    }
}

static BROKER: OnceLock<Broker> = OnceLock::new();

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The broker for this test process: `KAFKA_BOOTSTRAP_SERVERS`, or one started now and
/// stopped by a watchdog when this process ends.
pub fn broker() -> &'static Broker {
    BROKER.get_or_init(|| {
        if let Ok(bootstrap) = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
            && !bootstrap.trim().is_empty() {
                return Broker { bootstrap, sasl: SaslListener::from_env(), tls: TlsListener::from_env() };
            }
        let run_dir = std::env::temp_dir().join(format!("weir-test-kafka-{}", std::process::id()));
        let script = repo_root().join("scripts/kafka");
        let output = Command::new(&script)
            .args(["start", "--dir"])
            .arg(&run_dir)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/kafka start");
        assert!(output.status.success(), "scripts/kafka start failed");
        let bootstrap = String::from_utf8(output.stdout).unwrap().trim().to_string();
        when_this_process_ends(&format!("'{}' clean --dir '{}' >/dev/null 2>&1", script.display(), run_dir.display()));
        Broker { bootstrap, sasl: SaslListener::read(&run_dir), tls: TlsListener::read(&run_dir) }
    })
}

/// Runs the shell `command` once this test process is gone, however it ends (stopping the
/// broker or a registry it started). The watchdog outlives us on purpose, so it is never
/// waited for.
fn when_this_process_ends(command: &str) {
    let watchdog = format!("while kill -0 {} 2>/dev/null; do sleep 1; done; {command}", std::process::id());
    #[allow(clippy::zombie_processes)]
    Command::new("setsid")
        .args(["bash", "-c", &watchdog])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a watchdog");
}

/// A fresh name, so tests never share topics, groups or transactional ids.
pub fn unique(prefix: &str) -> String {
    let suffix: u64 = rand::rng().random();
    format!("{prefix}-{:012x}", suffix & 0xffff_ffff_ffff)
}

fn client_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &broker().bootstrap);
    config
}

pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

pub fn create_topic(name: &str, partitions: i32) {
    create_topic_with(name, partitions, &[]);
}

/// Creates a topic with topic configs, e.g. `("max.message.bytes", "4000")`.
pub fn create_topic_with(name: &str, partitions: i32, config: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = client_config().create().unwrap();
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in config {
        topic = topic.set(key, value);
    }
    let results = block_on(admin.create_topics([&topic], &AdminOptions::new())).unwrap();
    for result in results {
        result.unwrap();
    }
}

/// One record to produce (partition None: by key).
#[derive(Debug, Clone)]
pub struct Input {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub partition: Option<i32>,
}

impl Input {
    pub fn value(value: impl Into<Vec<u8>>) -> Input {
        Input { key: None, value: Some(value.into()), partition: None }
    }

    pub fn keyed(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Input {
        Input { key: Some(key.into()), value: Some(value.into()), partition: None }
    }
}

/// An idempotent producer for test input.
pub struct TestProducer {
    producer: BaseProducer,
}

impl TestProducer {
    pub fn new() -> TestProducer {
        let producer = client_config()
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        TestProducer { producer }
    }

    pub fn send(&self, topic: &str, input: &Input) {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(key) = &input.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &input.value {
            record = record.payload(value.as_slice());
        }
        if let Some(partition) = input.partition {
            record = record.partition(partition);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((_, returned)) => {
                    record = returned;
                    self.producer.poll(Duration::from_millis(50));
                }
            }
        }
        self.producer.poll(Duration::ZERO);
    }

    /// Waits until everything sent is acknowledged.
    pub fn flush(&self) {
        self.producer.flush(Duration::from_secs(60)).unwrap();
    }
}

/// Produces records and waits until all are acknowledged.
pub fn produce(topic: &str, inputs: impl IntoIterator<Item = Input>) {
    let producer = TestProducer::new();
    for input in inputs {
        producer.send(topic, &input);
    }
    producer.flush();
}

/// A record as a read_committed consumer of an output topic sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seen {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
}

impl Seen {
    pub fn value_text(&self) -> String {
        String::from_utf8_lossy(self.value.as_deref().unwrap_or_default()).into_owned()
    }

    pub fn value_json(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().unwrap_or_default()).expect("output value is JSON")
    }
}

pub fn partition_count(topic: &str) -> i32 {
    let consumer: BaseConsumer = client_config().create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    metadata.topics()[0].partitions().len() as i32
}

/// Whether `topic` exists on the broker.
pub fn topic_exists(topic: &str) -> bool {
    let consumer: BaseConsumer = client_config().create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    metadata.topics().iter().any(|found| found.name() == topic && found.error().is_none() && !found.partitions().is_empty())
}

/// Reads every committed record of `topic` (read_committed), from the beginning to the
/// current end of each partition. Call it when the writers are done or fenced.
pub fn read_committed(topic: &str) -> Vec<Seen> {
    read_topic(topic, "read_committed")
}

pub fn read_uncommitted(topic: &str) -> Vec<Seen> {
    read_topic(topic, "read_uncommitted")
}

/// Reads until the consumer's position reaches each partition's end offset as it was when
/// reading began. The position moves past transaction markers, and under read_committed it
/// waits for a just-committed transaction's markers, which the coordinator writes after
/// `commit_transaction` returns (EOF events would fire too early there).
fn read_topic(topic: &str, isolation: &str) -> Vec<Seen> {
    let consumer: BaseConsumer = client_config()
        .set("group.id", unique("reader"))
        .set("isolation.level", isolation)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    let mut ends = Vec::new();
    // The bounds come from a read_uncommitted client: a read_committed one gets the last
    // stable offset, which stays at the start of a just-committed transaction until its
    // markers are written (after commit returns), and would skip the partition entirely.
    let bounds: BaseConsumer = client_config().set("isolation.level", "read_uncommitted").create().unwrap();
    for partition in 0..partition_count(topic) {
        let (low, high) = bounds.fetch_watermarks(topic, partition, Duration::from_secs(10)).unwrap();
        if high > low {
            ends.push((partition, high));
            assignment.add_partition_offset(topic, partition, Offset::Beginning).unwrap();
        }
    }
    let mut seen = Vec::new();
    if ends.is_empty() {
        return seen;
    }
    consumer.assign(&assignment).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|header| {
                                (
                                    header.key.to_string(),
                                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                seen.push(Seen {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                    headers,
                });
                continue;
            }
            Some(Err(error)) => panic!("reading {topic}: {error}"),
            None => {}
        }
        let positions = consumer.position().unwrap();
        let done = ends.iter().all(|(partition, end)| {
            matches!(
                positions.find_partition(topic, *partition).map(|element| element.offset()),
                Some(Offset::Offset(position)) if position >= *end
            )
        });
        if done {
            return seen;
        }
        assert!(Instant::now() < deadline, "reading {topic} did not reach the end offsets {ends:?} in time");
    }
}

/// The group's committed offset for each partition of `topic` (-1: none).
pub fn committed_offsets(group: &str, topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = client_config().set("group.id", group).create().unwrap();
    let mut list = TopicPartitionList::new();
    for partition in 0..partition_count(topic) {
        list.add_partition(topic, partition);
    }
    // A coordinator that is still loading (a fresh broker, a new group) answers with a
    // retriable error; ask again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let committed = loop {
        match consumer.committed_offsets(list.clone(), Duration::from_secs(10)) {
            Ok(committed) => break committed,
            Err(error) if Instant::now() < deadline => {
                eprintln!("committed offsets of {group}: {error}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(error) => panic!("committed offsets of {group}: {error}"),
        }
    };
    committed
        .elements()
        .iter()
        .map(|element| match element.offset() {
            Offset::Offset(offset) => offset,
            _ => -1,
        })
        .collect()
}

/// The first offset still held in each partition of `topic`.
pub fn start_offsets(topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = client_config().create().unwrap();
    (0..partition_count(topic))
        .map(|partition| consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)).unwrap().0)
        .collect()
}

/// The end offset of each partition of `topic`.
pub fn end_offsets(topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = client_config().create().unwrap();
    (0..partition_count(topic))
        .map(|partition| consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)).unwrap().1)
        .collect()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pipeline file in a temporary directory.
pub struct PipelineFile {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

pub fn pipeline_file(text: &str) -> PipelineFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipeline.yaml");
    std::fs::write(&path, text).unwrap();
    PipelineFile { _dir: dir, path }
}

pub fn weir_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_weir"))
}

/// A running `weir run` process, its output captured in a log file.
pub struct WeirProcess {
    pub child: Child,
    pub http_port: u16,
    pub log: PathBuf,
}

pub struct WeirOptions<'a> {
    pub instance: &'a str,
    pub until_end: bool,
    pub env: Vec<(String, String)>,
}

impl Default for WeirOptions<'_> {
    fn default() -> Self {
        WeirOptions { instance: "0", until_end: false, env: Vec::new() }
    }
}

impl WeirProcess {
    pub fn start(pipeline: &Path, options: WeirOptions<'_>) -> WeirProcess {
        let http_port = free_port();
        let log = std::env::temp_dir().join(format!("{}.log", unique("weir-run")));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(weir_binary());
        command
            .arg("run")
            .arg("--pipeline")
            .arg(pipeline)
            .args(["--instance", options.instance])
            .env("WEIR__KAFKA__BOOTSTRAP_SERVERS", &broker().bootstrap)
            .env("WEIR__HTTP__LISTEN", format!("127.0.0.1:{http_port}"))
            // Beside the pipeline file: kept across restarts of the same pipeline, per test.
            .env("WEIR__STATE__DIR", pipeline.parent().unwrap_or(Path::new(".")).join("state"))
            .env("WEIR__LOGGING__LEVEL", std::env::var("WEIR_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        if options.until_end {
            command.arg("--until-end");
        }
        for (key, value) in &options.env {
            command.env(key, value);
        }
        WeirProcess { child: command.spawn().unwrap(), http_port, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit; panics with its log after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("weir did not exit within {timeout:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
    }

    /// GET on the process's HTTP port: (status, body), or None while it does not answer.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http_port, path)
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
    Some((status, body))
}

/// A JSON-source pipeline reading `input`, writing `output`, with extra YAML lines for steps.
pub fn json_pipeline(name: &str, input: &str, output: &str, steps: &str) -> String {
    format!(
        r#"name: {name}
sources:
  events:
    topics: [{input}]
    format: json
    schema:
      id: long
      user: string
      amount: double
steps:
{steps}
sink:
  topic: {output}
  format: json
"#
    )
}

/// A pipeline over click events `{id, user, amount, ts}` from a topic keyed (so partitioned)
/// by user, with event time and a 1s watermark, running `steps` (YAML lines).
pub fn clicks_pipeline(name: &str, input: &str, output: &str, steps: &str) -> PipelineFile {
    pipeline_file(&clicks_pipeline_text(name, input, output, steps, "partitioned_by: [user]"))
}

/// The text of [`clicks_pipeline`] with `source_extra` (a YAML line of the source, or
/// nothing: no `partitioned_by`, so keyed steps repartition) in place of its
/// `partitioned_by`.
pub fn clicks_pipeline_text(name: &str, input: &str, output: &str, steps: &str, source_extra: &str) -> String {
    let extra = if source_extra.is_empty() { String::new() } else { format!("    {source_extra}\n") };
    format!(
        r#"name: {name}
sources:
  clicks:
    topics: [{input}]
    format: json
    schema: {{ id: long, user: string, amount: long, ts: long }}
    event_time: {{ field: ts, unit: millis }}
    watermark: {{ max_out_of_orderness: 1s }}
{extra}steps:
{steps}
sink:
  topic: {output}
"#
    )
}

/// `(from_store, from_changelog)` of every `restored state` line of a weir log.
pub fn restores(log: &str) -> Vec<(u64, u64)> {
    let field = |line: &str, name: &str| -> u64 {
        line.split(&format!("{name}=")).nth(1).and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()).unwrap_or(0)
    };
    log.lines()
        .filter(|line| line.contains("restored state"))
        .map(|line| (field(line, "from_store"), field(line, "from_changelog")))
        .collect()
}

pub fn event(id: u64) -> String {
    format!(r#"{{"id":{id},"user":"u{}","amount":{}.5}}"#, id % 97, id % 1000)
}

/// Produces `event(id)` for each id in `ids`, keyed `k<id>`, at about `per_second`, on a
/// thread of its own (input that flows while processes come and go).
pub fn feed(topic: &str, ids: std::ops::Range<u64>, per_second: u64) -> std::thread::JoinHandle<()> {
    feed_with(topic, ids, per_second, |id| Input::keyed(format!("k{id}"), event(id)))
}

/// Like [`feed`], with each record made by `make`.
pub fn feed_with(
    topic: &str,
    ids: std::ops::Range<u64>,
    per_second: u64,
    make: fn(u64) -> Input,
) -> std::thread::JoinHandle<()> {
    let topic = topic.to_string();
    std::thread::spawn(move || {
        let producer = TestProducer::new();
        let chunk = (per_second / 20).max(1);
        let started = Instant::now();
        let mut next = ids.start;
        while next < ids.end {
            let end = (next + chunk).min(ids.end);
            for id in next..end {
                producer.send(&topic, &make(id));
            }
            producer.flush();
            next = end;
            let due = started + Duration::from_secs_f64((next - ids.start) as f64 / per_second as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    })
}

/// The ids that the standard test filter (`amount > 10.0`) keeps.
pub fn kept_by_amount_filter(ids: std::ops::Range<u64>) -> Vec<u64> {
    ids.filter(|id| (id % 1000) as f64 + 0.5 > 10.0).collect()
}

/// Asserts that a read_committed reader of `output` sees each expected id exactly once and
/// nothing else.
pub fn assert_exactly_once(output: &str, expected: &[u64]) {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for record in read_committed(output) {
        let id = record.value_json()["id"].as_u64().expect("output has an id");
        *counts.entry(id).or_default() += 1;
    }
    let duplicated: Vec<(u64, usize)> = counts.iter().filter(|(_, count)| **count > 1).map(|(id, count)| (*id, *count)).collect();
    let missing: Vec<u64> = expected.iter().copied().filter(|id| !counts.contains_key(id)).collect();
    let expected_set: std::collections::BTreeSet<u64> = expected.iter().copied().collect();
    let unexpected: Vec<u64> = counts.keys().copied().filter(|id| !expected_set.contains(id)).collect();
    assert!(
        duplicated.is_empty() && missing.is_empty() && unexpected.is_empty(),
        "not exactly once: {} duplicated (first {:?}), {} missing (first {:?}), {} unexpected (first {:?})",
        duplicated.len(),
        &duplicated[..duplicated.len().min(10)],
        missing.len(),
        &missing[..missing.len().min(10)],
        unexpected.len(),
        &unexpected[..unexpected.len().min(10)],
    );
}

/// The value of one sample in a parsed Prometheus scrape, if it is there.
pub fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|sample| sample.metric == name && labels.iter().all(|(key, value)| sample.labels.get(key) == Some(*value)))
        .and_then(|sample| match sample.value {
            prometheus_parse::Value::Counter(value) | prometheus_parse::Value::Gauge(value) | prometheus_parse::Value::Untyped(value) => Some(value),
            _ => None,
        })
}

/// Reads one sample of a metric from a process's /metrics, if it is there.
pub fn metric(process: &WeirProcess, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (_, text) = process.http_get("/metrics")?;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_string()))).ok()?;
    sample(&scrape, name, labels)
}

/// Whether the process has committed state for the stateful step `step` (its gauge is set
/// at each commit).
pub fn has_committed_state(process: &WeirProcess, step: &str) -> bool {
    metric(process, "weir_step_state_keys", &[("step", step)]).is_some_and(|keys| keys > 0.0)
}

pub fn is_ready(process: &WeirProcess) -> bool {
    process.http_get("/health/ready").is_some_and(|(status, _)| status == 200)
}

pub fn wait_ready(process: &WeirProcess, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !is_ready(process) {
        assert!(Instant::now() < deadline, "weir not ready within {timeout:?}; log:\n{}", process.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the pipeline of `file` with `--until-end` over what its topics hold: the seconds
/// from ready (partitions assigned) to a successful exit, and the peak resident memory in MiB.
pub fn run_until_end_measured(file: &PipelineFile) -> (f64, f64) {
    let mut weir = WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() });
    let pid = weir.child.id();
    wait_ready(&weir, Duration::from_secs(120));
    let started = Instant::now();
    let mut peak_kib = 0u64;
    loop {
        if let Some(status) = weir.child.try_wait().unwrap() {
            assert!(status.success(), "weir failed: {status}\n{}", weir.log_text());
            break;
        }
        peak_kib = peak_kib.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    (started.elapsed().as_secs_f64(), peak_kib as f64 / 1024.0)
}

/// The resident memory of process `pid` in KiB (0 once it is gone).
/// A 6 s session timeout: a static member that stops hands its partitions on quickly.
pub fn short_session() -> Vec<(String, String)> {
    vec![("WEIR__KAFKA__SESSION_TIMEOUT".to_string(), "6s".to_string())]
}

/// Instance 0 of `pipeline`, ready, then after `head_start` instance 1, ready too: the
/// second joins the group and takes partitions from the first. Both use `short_session`.
pub fn start_then_join(pipeline: &Path, head_start: Duration) -> (WeirProcess, WeirProcess) {
    let first = WeirProcess::start(pipeline, WeirOptions { instance: "0", env: short_session(), ..Default::default() });
    wait_ready(&first, Duration::from_secs(60));
    std::thread::sleep(head_start);
    let second = WeirProcess::start(pipeline, WeirOptions { instance: "1", env: short_session(), ..Default::default() });
    wait_ready(&second, Duration::from_secs(60));
    (first, second)
}

/// Serves the producer's delivery reports that are ready; if none was, sleeps 100 µs.
/// rust-rdkafka's `poll(1 ms)` would spin for the whole millisecond (it hands librdkafka
/// the time left in whole milliseconds, 0), taking CPU from a broker on the same cores;
/// weir's own loop waits the same way (`Transaction::serve_or_pause`).
pub fn serve_or_pause(producer: &BaseProducer) {
    let before = producer.in_flight_count();
    producer.poll(Duration::ZERO);
    if producer.in_flight_count() == before {
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// User + system CPU time of a process, in seconds, from /proc.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|t| t.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|t| t.parse().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// The bytes of the files under `path` (0 when it is missing).
pub fn directory_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => directory_bytes(&entry.path()),
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        })
        .sum()
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// A Confluent-API-compatible schema registry: `SCHEMA_REGISTRY_URL`, or one started for this
/// test process (`scripts/schema-registry`, against the test broker, with schemas in a topic
/// of its own) and stopped when the process ends.
pub struct SchemaRegistry {
    pub url: String,
    /// The topic its schemas live in (None: an external registry).
    pub schemas_topic: Option<String>,
}

static SCHEMA_REGISTRY: OnceLock<SchemaRegistry> = OnceLock::new();

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

fn avro_to_json(value: apache_avro::types::Value) -> serde_json::Value {
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

static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Held by the tests that feed 200,000 records while killing processes: two of them at
/// once on 2 shared cores starve each other's processes (killed before they ever commit).
pub fn heavy_test() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts the pipelines in `files` together and SIGKILLs them 1-7 s after each one is
/// `running` (say, has committed state), again and again, until at least `min_kills`
/// rounds are done and `finished()` says the input is all there. Returns the rounds and
/// every log.
pub fn kill_repeatedly(
    files: &[&Path],
    min_kills: usize,
    running: impl Fn(&WeirProcess) -> bool,
    finished: impl Fn() -> bool,
) -> (usize, Vec<String>) {
    let mut rng = rand::rng();
    let mut kills = 0;
    let mut logs = Vec::new();
    while kills < min_kills || !finished() {
        let mut processes: Vec<WeirProcess> = files.iter().map(|file| WeirProcess::start(file, WeirOptions::default())).collect();
        // The random moment counts from when it runs, so that every incarnation gets to
        // do something, on a loaded machine too.
        for process in &processes {
            wait_until(Duration::from_secs(120), "the process runs", || running(process));
        }
        let deadline = Instant::now() + Duration::from_millis(rng.random_range(1_000..7_000));
        while Instant::now() < deadline {
            for process in &mut processes {
                if let Some(status) = process.child.try_wait().unwrap() {
                    panic!("weir exited on its own with {status}:\n{}", process.log_text());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for process in &mut processes {
            process.kill();
            logs.push(process.log_text());
        }
        kills += 1;
        assert!(kills < 80, "the input never finished flowing");
    }
    (kills, logs)
}

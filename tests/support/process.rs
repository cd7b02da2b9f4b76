//! weir processes started from the built binary, pipeline files, and what their HTTP
//! endpoints and logs say.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::message::Headers;

use super::*;

/// A pipeline file in a temporary directory.
pub struct PipelineFile {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl PipelineFile {
    /// The pipeline's name, its first line (the consumer group).
    pub fn name(&self) -> String {
        let text = std::fs::read_to_string(&self.path).unwrap();
        text.lines().next().unwrap().trim_start_matches("name: ").to_string()
    }
}

pub fn pipeline_file(text: &str) -> PipelineFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipeline.yaml");
    std::fs::write(&path, text).unwrap();
    PipelineFile { _dir: dir, path }
}

/// The weir binary the tests and benchmarks run: this build's, or `WEIR_BINARY` (another
/// build's, to compare two trees side by side in one benchmark session).
pub fn weir_binary() -> PathBuf {
    std::env::var_os("WEIR_BINARY").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_weir")), PathBuf::from)
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

    /// Lets the process run for `lifetime`; panics with its log if it exits on its own
    /// meanwhile.
    pub fn keep_running_for(&mut self, lifetime: Duration) {
        let deadline = Instant::now() + lifetime;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("weir exited on its own with {status}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
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

    /// The `/status` report of each consumer-group member the process runs: each worker's,
    /// under `workers`, or the whole report for a process of one worker (Null while the
    /// process does not answer).
    pub fn member_reports(&self) -> Vec<serde_json::Value> {
        let report: serde_json::Value =
            self.http_get("/status").and_then(|(_, body)| serde_json::from_str(&body).ok()).unwrap_or_default();
        match report["workers"].as_array() {
            Some(workers) => workers.clone(),
            None => vec![report],
        }
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
    wait_for_joiner(&first, &second, "ready", is_ready);
    (first, second)
}

/// Waits up to 60 s until `joiner`, which joined `first`'s group, is `what` (`done`). It
/// gets partitions only once `first` has revoked them for it: when it does not, the failure
/// shows both logs, for the first's tells why.
pub fn wait_for_joiner(first: &WeirProcess, joiner: &WeirProcess, what: &str, done: impl Fn(&WeirProcess) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(joiner) {
        assert!(
            Instant::now() < deadline,
            "the joining instance was not {what} within 60 s; its log:\n{}\nthe first instance's log:\n{}",
            joiner.log_text(),
            first.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

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

/// Runs the pipeline to the end of its input (`--until-end`), expecting success; returns its
/// log.
pub fn run_to_end(file: &PipelineFile) -> String {
    let mut run = WeirProcess::start(&file.path, WeirOptions { until_end: true, env: short_session(), ..Default::default() });
    assert!(run.wait(Duration::from_secs(120)).success(), "{}", run.log_text());
    run.log_text()
}

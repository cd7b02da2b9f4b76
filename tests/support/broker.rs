//! The broker for a test process, unique names, and waiting for conditions.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::ClientConfig;


pub struct Broker {
    pub bootstrap: String,
    /// The listener that takes SASL (PLAIN, SCRAM-SHA-256/512), and its user.
    pub sasl: Option<SaslListener>,
    /// The listener that takes the same SASL over TLS, and the CA certificate (PEM file)
    /// that verifies it.
    pub tls: Option<TlsListener>,
    /// `scripts/kafka`'s run dir, for a broker these tests started (and may restart).
    pub run_dir: Option<PathBuf>,
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

pub static BROKER: OnceLock<Broker> = OnceLock::new();

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The broker for this test process: `KAFKA_BOOTSTRAP_SERVERS`, or one started now and
/// stopped by a watchdog when this process ends.
pub fn broker() -> &'static Broker {
    BROKER.get_or_init(|| {
        if let Ok(bootstrap) = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
            && !bootstrap.trim().is_empty() {
                return Broker { bootstrap, sasl: SaslListener::from_env(), tls: TlsListener::from_env(), run_dir: None };
            }
        start_broker()
    })
}

/// A broker of this test process's own, even where `KAFKA_BOOTSTRAP_SERVERS` names one: for
/// tests that restart or pause it.
pub fn own_broker() -> &'static Broker {
    let broker = BROKER.get_or_init(start_broker);
    assert!(broker.run_dir.is_some(), "this test binary restarts its broker: run it before anything reads KAFKA_BOOTSTRAP_SERVERS");
    broker
}

fn start_broker() -> Broker {
    {
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
        Broker { bootstrap, sasl: SaslListener::read(&run_dir), tls: TlsListener::read(&run_dir), run_dir: Some(run_dir) }
    }
}

/// Stops the test broker and starts it again on the same port with the same data.
pub fn restart_broker() {
    broker_script("restart");
}

/// Stops the test broker (as `restart` does first); [`start_broker_again`] brings it back.
pub fn stop_broker() {
    broker_script("stop");
}

/// Starts the stopped test broker again on the same port with the same data.
pub fn start_broker_again() {
    broker_script("start");
}

fn broker_script(command: &str) {
    let run_dir = own_broker().run_dir.as_ref().expect("a broker of our own");
    let output = Command::new(repo_root().join("scripts/kafka"))
        .args([command, "--dir"])
        .arg(run_dir)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/kafka");
    assert!(output.status.success(), "scripts/kafka {command} failed");
}

/// Freezes the test broker's process (SIGSTOP) for `pause`, then lets it go on (SIGCONT):
/// its connections stay open and nothing answers, as with a broker stuck in a long GC.
pub fn pause_broker(pause: Duration) {
    let run_dir = own_broker().run_dir.as_ref().expect("a broker of our own");
    let pid = std::fs::read_to_string(run_dir.join("kafka.pid")).expect("the broker's pid").trim().to_string();
    let signal = |name: &str| {
        assert!(Command::new("kill").args([name, &pid]).status().expect("run kill").success(), "kill {name} {pid}");
    };
    signal("-STOP");
    std::thread::sleep(pause);
    signal("-CONT");
}

/// Limits every client of the test broker to fetching `bytes_per_second` (a default
/// `consumer_byte_rate` quota, as an operator's `kafka-configs` would set) until the guard is
/// dropped: a slow network or a busy broker for the changelog reads of a restore.
pub fn throttle_fetches(bytes_per_second: u64) -> FetchThrottle {
    set_default_quota(&format!("--add-config=consumer_byte_rate={bytes_per_second}"));
    FetchThrottle
}

pub struct FetchThrottle;

impl Drop for FetchThrottle {
    fn drop(&mut self) {
        set_default_quota("--delete-config=consumer_byte_rate");
    }
}

/// Alters the default client quota with Kafka's own ConfigCommand, from the jars
/// `scripts/kafka install` fetched.
fn set_default_quota(change: &str) {
    let home = std::env::var("WEIR_KAFKA_HOME").map(PathBuf::from).unwrap_or_else(|_| repo_root().join(".kafka"));
    let home = if home.is_absolute() { home } else { repo_root().join(home) };
    let libs = std::fs::read_dir(&home)
        .expect("the Kafka jars (scripts/kafka install)")
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("libs"))
        .find(|libs| libs.is_dir())
        .expect("a kafka-<version>/libs directory");
    let java = std::env::var("JAVA_HOME").map(|java_home| format!("{java_home}/bin/java")).unwrap_or_else(|_| "java".into());
    let output = Command::new(java)
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .args(["kafka.admin.ConfigCommand", "--bootstrap-server", &own_broker().bootstrap, "--alter", "--entity-type", "clients", "--entity-default", change])
        .output()
        .expect("run kafka.admin.ConfigCommand");
    assert!(output.status.success(), "ConfigCommand {change} failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// Runs the shell `command` once this test process is gone, however it ends (stopping the
/// broker or a registry it started). The watchdog outlives us on purpose, so it is never
/// waited for.
pub fn when_this_process_ends(command: &str) {
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

pub fn client_config() -> ClientConfig {
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

/// A port nothing listens on now, for a weir process's HTTP server. Taken outside Linux's
/// ephemeral range (32768-60999): a port the kernel hands out there can be taken by any
/// outgoing connection (a Kafka client's) before weir binds it, which failed a test with
/// "Address already in use".
pub fn free_port() -> u16 {
    let mut rng = rand::rng();
    loop {
        let port = rng.random_range(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

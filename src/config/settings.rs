//! Service settings: how weir connects to Kafka, batches, serves HTTP and logs.
//!
//! Layers, later ones winning: `config/default.toml` (compiled in), the optional `--config`
//! file, then `WEIR__<SECTION>__<KEY>` environment variables. Each key is read on its own so
//! that every bad value is reported, each named with the environment variable that sets it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};

use super::secrets::{has_user_info, kafka_option_problem, redact, secret_values};
use super::shape::{Key, Section, Shape};
use super::ConfigErrors;

const DEFAULTS: &str = include_str!("../../config/default.toml");

/// librdkafka options that the exactly-once loop sets itself; a user value would silently
/// break the guarantee, so they are refused rather than overridden.
const RESERVED_KAFKA_OPTIONS: &[&str] = &[
    "enable.auto.commit",
    "isolation.level",
    "transactional.id",
    "enable.idempotence",
];

#[derive(Debug, Clone)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub runtime: RuntimeSettings,
    pub http: HttpSettings,
    pub logging: LoggingSettings,
    pub state: StateSettings,
    pub schema_registry: RegistrySettings,
}

/// The Confluent-compatible schema registry of Avro sources and sinks.
#[derive(Clone)]
pub struct RegistrySettings {
    /// Base URLs, tried in order; empty when no registry is configured.
    pub urls: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Per request; an unreachable registry is retried, never a reason to drop a record.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct StateSettings {
    pub dir: std::path::PathBuf,
    /// The block cache every step's state shares, in MiB.
    pub cache_mib: usize,
    /// All memtables together (writes not yet flushed), in MiB.
    pub write_buffers_mib: usize,
}

#[derive(Clone)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub transaction_timeout: Duration,
    pub static_membership: bool,
    pub session_timeout: Duration,
    pub options: BTreeMap<String, String>,
    /// The replication factor of the topics weir creates (DLQ, changelogs, repartition and
    /// definitions topics); None: the broker's default.
    pub replication_factor: Option<i32>,
    /// Topic configs for the topics weir creates (e.g. min.insync.replicas), under the
    /// ones each kind needs (a changelog is compacted whatever this says).
    pub topic_configs: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    pub commit_interval: Duration,
    pub max_batch_records: NonZeroUsize,
    pub drain_timeout: Duration,
    /// Exit once one fault (the cluster away, transactions timing out) has lasted this long;
    /// None (`0s`, the default): keep waiting, not ready meanwhile.
    pub give_up_after: Option<Duration>,
    /// Loops run by this process, each its own consumer-group member, transactional
    /// producer and state store (see `runtime::workers`).
    pub workers: NonZeroUsize,
}

#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    /// Readiness also needs every owned partition's lag at or under this (0: no limit).
    pub ready_max_lag: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LoggingSettings {
    pub format: LogFormat,
    pub level: String,
}

/// `runtime.workers` at most: each worker holds a consumer, a producer, a state store and
/// a thread, and a process has few cores to give them.
pub const MAX_WORKERS: usize = 64;

/// A number or a boolean may be written as one or as a string (environment variables are
/// strings).
const WHOLE: Shape = Shape::AnyOf(&[Shape::Count, Shape::String]);
const FLAG: Shape = Shape::AnyOf(&[Shape::Bool, Shape::String]);
const OPTIONS: Shape = Shape::MapOf(&Shape::Scalar);

/// The settings file: its sections and keys; anything else in a file or the environment is
/// an error. `weir schema settings` prints it.
pub const SETTINGS: Section = Section {
    about: "weir's service settings (a --config TOML file; each key also WEIR__<SECTION>__<KEY>)",
    keys: &[
        Key::optional("kafka", Shape::Section(&KAFKA), ""),
        Key::optional("runtime", Shape::Section(&RUNTIME), ""),
        Key::optional("http", Shape::Section(&HTTP), ""),
        Key::optional("state", Shape::Section(&STATE), ""),
        Key::optional("logging", Shape::Section(&LOGGING), ""),
        Key::optional("schema_registry", Shape::Section(&REGISTRY), ""),
    ],
};

const KAFKA: Section = Section {
    about: "the Kafka cluster weir reads from and writes to",
    keys: &[
        Key::optional("bootstrap_servers", Shape::String, "comma-separated host:port list (default 127.0.0.1:9092)"),
        Key::optional("transaction_timeout", Shape::Duration, "how long a crashed process's open transaction can hold readers back (default 10s)"),
        Key::optional("static_membership", FLAG, "group.instance.id = <name>-<instance> (default true)"),
        Key::optional("session_timeout", Shape::Duration, "how long a static member may be away before its partitions move (default 30s)"),
        Key::optional("options", OPTIONS, "librdkafka options passed through as given"),
        Key::optional("option_files", Shape::MapOf(&Shape::String), "librdkafka options read from files (e.g. sasl.password from a mounted Secret)"),
        Key::optional("replication_factor", WHOLE, "of the topics weir creates; 0: the broker's default"),
        Key::optional("topic_configs", OPTIONS, "topic configs for the topics weir creates, e.g. min.insync.replicas"),
    ],
};

const RUNTIME: Section = Section {
    about: "batches, shutdown and faults",
    keys: &[
        Key::optional("commit_interval", Shape::Duration, "a batch (one transaction) commits once per this long, start to start (default 100ms)"),
        Key::optional("max_batch_records", WHOLE, "or after this many records (default 100000)"),
        Key::optional("drain_timeout", Shape::Duration, "on SIGTERM: finish the batch, commit and leave within this (default 8s)"),
        Key::optional("give_up_after", Shape::Duration, "exit after one fault has lasted this long; 0s keeps waiting (default)"),
        Key::optional("workers", WHOLE, "loops in this process, each its own group member and transaction (default 1)"),
    ],
};

const HTTP: Section = Section {
    about: "/health/live, /health/ready, /metrics and /status",
    keys: &[
        Key::optional("listen", Shape::String, "address to serve on (default 0.0.0.0:8080)"),
        Key::optional("ready_max_lag", WHOLE, "ready also needs every owned partition's lag at or under this; 0: no limit"),
    ],
};

const STATE: Section = Section {
    about: "the local state store (RocksDB)",
    keys: &[
        Key::optional("dir", Shape::String, "where it lives (default weir-state)"),
        Key::optional("cache_mib", WHOLE, "the block cache all steps' state shares, MiB (default 32)"),
        Key::optional("write_buffers_mib", WHOLE, "all memtables together (writes not yet flushed), MiB (default 64)"),
    ],
};

const LOGGING: Section = Section {
    about: "logs on stderr",
    keys: &[
        Key::optional("format", Shape::OneOf(&["text", "json"]), "default text"),
        Key::optional("level", Shape::String, "a level (info, debug, ...) or directives such as weir=debug,rdkafka=warn"),
    ],
};

const REGISTRY: Section = Section {
    about: "the Confluent-compatible schema registry of Avro sources and sinks",
    keys: &[
        Key::optional("url", Shape::String, "comma-separated base URLs, tried in order"),
        Key::optional("username", Shape::String, "HTTP basic auth"),
        Key::optional("password", Shape::String, "HTTP basic auth (or password_file)"),
        Key::optional("password_file", Shape::String, "a file holding the password"),
        Key::optional("timeout", Shape::Duration, "per request (default 10s)"),
    ],
};

/// Names a key the way a user can set it: the dotted key and its environment variable.
fn location(key: &str) -> String {
    let env = format!("WEIR__{}", key.replace('.', "__").to_uppercase());
    format!("{key} (env {env})")
}

pub(super) fn load(config_file: Option<&Path>, problems: &mut ConfigErrors) -> Option<Settings> {
    let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
    if let Some(path) = config_file {
        if !path.is_file() {
            problems.push("--config (env WEIR_CONFIG)", format!("no such file: {}", path.display()));
            return None;
        }
        builder = builder.add_source(File::from(path).format(FileFormat::Toml));
    }
    builder = builder.add_source(
        Environment::with_prefix("WEIR")
            .prefix_separator("__")
            .separator("__"),
    );
    let layered = match builder.build() {
        Ok(layered) => layered,
        Err(error) => {
            let source = config_file.map_or("settings".to_string(), |path| path.display().to_string());
            problems.push(source, error.to_string());
            return None;
        }
    };

    report_unknown_keys(&layered, problems);
    let mut reader = KeyReader { layered: &layered, problems };

    let kafka = KafkaSettings {
        bootstrap_servers: reader.string("kafka.bootstrap_servers"),
        transaction_timeout: reader.duration("kafka.transaction_timeout"),
        static_membership: reader.boolean("kafka.static_membership"),
        session_timeout: reader.duration("kafka.session_timeout"),
        options: reader.kafka_options(),
        replication_factor: reader
            .parsed::<i32>("kafka.replication_factor", "a whole number (0: the broker's default)")
            .filter(|factor| *factor > 0),
        topic_configs: reader.topic_configs(),
    };
    let runtime = RuntimeSettings {
        commit_interval: reader.duration("runtime.commit_interval"),
        max_batch_records: reader.non_zero("runtime.max_batch_records"),
        drain_timeout: reader.duration("runtime.drain_timeout"),
        give_up_after: Some(reader.duration("runtime.give_up_after")).filter(|limit| !limit.is_zero()),
        workers: reader.non_zero("runtime.workers"),
    };
    let http = HttpSettings {
        listen: reader
            .parsed("http.listen", "an address such as 0.0.0.0:8080")
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8080))),
        ready_max_lag: reader.parsed("http.ready_max_lag", "a whole number of records (0: no limit)").unwrap_or(0),
    };
    let logging = LoggingSettings {
        format: match reader.string("logging.format").as_str() {
            "json" => LogFormat::Json,
            "text" | "" => LogFormat::Text,
            other => {
                reader.problem("logging.format", format!("'{other}' is not one of: text, json"));
                LogFormat::Text
            }
        },
        level: reader.string("logging.level"),
    };
    if tracing_subscriber::EnvFilter::try_new(&logging.level).is_err() {
        reader.problem("logging.level", format!("'{}' is not a level or filter directive", logging.level));
    }
    if kafka.bootstrap_servers.trim().is_empty() {
        reader.problem("kafka.bootstrap_servers", "must name at least one broker (host:port)");
    }
    if runtime.workers.get() > MAX_WORKERS {
        reader.problem("runtime.workers", format!("{} is more than {MAX_WORKERS}", runtime.workers));
    }
    if runtime.commit_interval.is_zero() {
        reader.problem("runtime.commit_interval", "must be longer than zero");
    }
    if !runtime.drain_timeout.is_zero() && runtime.drain_timeout >= kafka.transaction_timeout {
        reader.problem(
            "runtime.drain_timeout",
            format!(
                "must be shorter than kafka.transaction_timeout ({}), or a slow shutdown outlives its own transaction",
                humantime::format_duration(kafka.transaction_timeout)
            ),
        );
    }
    if !kafka.transaction_timeout.is_zero() && kafka.transaction_timeout <= runtime.commit_interval {
        reader.problem(
            "kafka.transaction_timeout",
            "must be longer than runtime.commit_interval, or every batch times out",
        );
    }

    let state = StateSettings {
        dir: reader.string("state.dir").into(),
        cache_mib: reader.non_zero("state.cache_mib").get(),
        write_buffers_mib: reader.non_zero("state.write_buffers_mib").get(),
    };
    if state.dir.as_os_str().is_empty() {
        reader.problem("state.dir", "must name a directory");
    }

    let schema_registry = reader.registry();

    Some(Settings { kafka, runtime, http, logging, state, schema_registry })
}

fn report_unknown_keys(layered: &Config, problems: &mut ConfigErrors) {
    let Ok(top) = layered.clone().try_deserialize::<BTreeMap<String, config::Value>>() else {
        return;
    };
    for (section, value) in top {
        let Some(Shape::Section(keys)) = SETTINGS.key(&section).map(|key| key.shape) else {
            problems.push(location(&section), super::error::unknown("section", &section, &SETTINGS.names()));
            continue;
        };
        let Ok(table) = value.into_table() else {
            problems.push(location(&section), "must be a table of settings");
            continue;
        };
        for key in table.keys() {
            if keys.key(key).is_none() {
                problems.push(location(&format!("{section}.{key}")), super::error::unknown("setting", key, &keys.names()));
            }
        }
    }
}

/// Reads one key at a time, recording a problem (and returning a harmless default) for each
/// bad value, so that loading goes on to find the others.
struct KeyReader<'a> {
    layered: &'a Config,
    problems: &'a mut ConfigErrors,
}

impl KeyReader<'_> {
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(location(key), message);
    }

    fn string(&mut self, key: &str) -> String {
        match self.layered.get_string(key) {
            Ok(value) => value,
            Err(error) => {
                self.problem(key, error.to_string());
                String::new()
            }
        }
    }

    fn boolean(&mut self, key: &str) -> bool {
        let text = self.string(key);
        match text.to_ascii_lowercase().as_str() {
            "true" => true,
            "false" => false,
            _ => {
                self.problem(key, format!("'{text}' is not true or false"));
                false
            }
        }
    }

    fn duration(&mut self, key: &str) -> Duration {
        let text = self.string(key);
        match humantime::parse_duration(&text) {
            Ok(duration) => duration,
            Err(error) => {
                self.problem(key, format!("'{text}' is not a duration such as 100ms, 10s or 5m ({error})"));
                Duration::ZERO
            }
        }
    }

    fn non_zero(&mut self, key: &str) -> NonZeroUsize {
        self.parsed::<NonZeroUsize>(key, "a whole number greater than zero")
            .unwrap_or(NonZeroUsize::MIN)
    }

    fn parsed<T: std::str::FromStr>(&mut self, key: &str, expected: &str) -> Option<T> {
        let text = self.string(key);
        match text.trim().parse() {
            Ok(value) => Some(value),
            Err(_) => {
                self.problem(key, format!("'{text}' is not {expected}"));
                None
            }
        }
    }

    /// A key that may be absent (no default in `config/default.toml`).
    fn optional_string(&mut self, key: &str) -> Option<String> {
        match self.layered.get_string(key) {
            Ok(value) if value.is_empty() => None,
            Ok(value) => Some(value),
            Err(config::ConfigError::NotFound(_)) => None,
            Err(error) => {
                self.problem(key, error.to_string());
                None
            }
        }
    }

    fn registry(&mut self) -> RegistrySettings {
        let urls: Vec<String> = self
            .string("schema_registry.url")
            .split(',')
            .map(|url| url.trim().trim_end_matches('/').to_string())
            .filter(|url| !url.is_empty())
            .collect();
        for url in &urls {
            // Credentials in the URL would travel with it into registry errors, logs and
            // /status, where redaction by substring misses their URL-encoded forms: they have
            // their own keys, whose values are never shown. The URL itself is not shown
            // either, since it holds the password.
            if has_user_info(url) {
                self.problem(
                    "schema_registry.url",
                    "holds credentials (user info before '@'); remove them from the URL and set schema_registry.username and schema_registry.password_file (or schema_registry.password)",
                );
            } else if !(url.starts_with("http://") || url.starts_with("https://")) {
                self.problem("schema_registry.url", format!("'{url}' is not an http:// or https:// URL"));
            }
        }
        let username = self.optional_string("schema_registry.username");
        let password = match (self.optional_string("schema_registry.password"), self.optional_string("schema_registry.password_file")) {
            (Some(_), Some(_)) => {
                self.problem("schema_registry.password_file", "is also given as schema_registry.password; set it in one place");
                None
            }
            (Some(password), None) => Some(password),
            (None, Some(path)) => match std::fs::read_to_string(&path) {
                Ok(content) => Some(content.trim_end_matches(['\n', '\r']).to_string()),
                Err(error) => {
                    self.problem("schema_registry.password_file", format!("cannot read {path}: {error}"));
                    None
                }
            },
            (None, None) => None,
        };
        if password.is_some() && username.is_none() {
            self.problem("schema_registry.username", "is required with a password (HTTP basic auth)");
        }
        let timeout = self.duration("schema_registry.timeout");
        if timeout.is_zero() {
            self.problem("schema_registry.timeout", "must be longer than zero");
        }
        RegistrySettings { urls, username, password, timeout }
    }

    /// `kafka.topic_configs`: configs for the topics weir creates. `cleanup.policy` is
    /// weir's to choose per kind of topic (a changelog must be compacted).
    fn topic_configs(&mut self) -> BTreeMap<String, String> {
        let mut configs = BTreeMap::new();
        let Ok(table) = self.layered.get_table("kafka.topic_configs") else {
            return configs;
        };
        for (key, value) in table {
            // As with kafka.options: MIN_INSYNC_REPLICAS stands for min.insync.replicas.
            let name = key.replace('_', ".");
            let location = format!("kafka.topic_configs.{name} (env WEIR__KAFKA__TOPIC_CONFIGS__{})", name.replace('.', "_").to_uppercase());
            match value.into_string() {
                Err(_) => self.problems.push(location, "must be a string, number or boolean"),
                Ok(_) if name == "cleanup.policy" => {
                    self.problems.push(location, "weir sets it per topic (changelogs are compacted, repartition topics not); remove it")
                }
                Ok(text) => {
                    configs.insert(name, text);
                }
            }
        }
        configs
    }

    /// `kafka.options`, plus `kafka.option_files` (an option's value read from a file, such
    /// as a mounted Secret), each checked against librdkafka without connecting anywhere.
    fn kafka_options(&mut self) -> BTreeMap<String, String> {
        let mut options = BTreeMap::new();
        for (section, from_file) in [("options", false), ("option_files", true)] {
            let Ok(table) = self.layered.get_table(&format!("kafka.{section}")) else {
                continue;
            };
            for (key, value) in table {
                // Environment keys cannot hold dots, so FETCH_MAX_BYTES stands for
                // fetch.max.bytes; librdkafka option names never contain underscores.
                let name = key.replace('_', ".");
                let option_location = format!(
                    "kafka.{section}.{name} (env WEIR__KAFKA__{}__{})",
                    section.to_uppercase(),
                    name.replace('.', "_").to_uppercase()
                );
                let Ok(text) = value.into_string() else {
                    self.problems.push(option_location, "must be a string, number or boolean");
                    continue;
                };
                if RESERVED_KAFKA_OPTIONS.contains(&name.as_str()) {
                    self.problems
                        .push(option_location, "is set by weir itself because exactly-once depends on it; remove it");
                    continue;
                }
                if options.contains_key(&name) {
                    self.problems.push(option_location, "is also in kafka.options; set it in one place");
                    continue;
                }
                let value = if from_file {
                    match std::fs::read_to_string(&text) {
                        // A file written by `echo` or a text editor ends with a newline that is
                        // not part of the secret.
                        Ok(content) => content.trim_end_matches(['\n', '\r']).to_string(),
                        Err(error) => {
                            self.problems.push(option_location, format!("cannot read {text}: {error}"));
                            continue;
                        }
                    }
                } else {
                    text
                };
                if let Some(problem) = kafka_option_problem(&name, &value) {
                    self.problems.push(option_location, problem);
                    continue;
                }
                options.insert(name, value);
            }
        }
        // Some values are only checked together, when a client is made (sasl.mechanism needs
        // a build with SASL, TLS files must load). Without bootstrap servers it connects nowhere.
        let mut config = rdkafka::ClientConfig::new();
        for (name, value) in &options {
            config.set(name, value);
        }
        if let Err(error) = config.create::<rdkafka::producer::BaseProducer>() {
            self.problems.push("kafka.options (env WEIR__KAFKA__OPTIONS__*)", redact(&error.to_string(), secret_values(&options)));
        }
        options
    }
}

//! Credentials in settings: which librdkafka options and registry URLs hold them, and
//! keeping their values out of everything weir prints (errors, /status, debug output).

use std::collections::BTreeMap;

use super::settings::{KafkaSettings, RegistrySettings, Settings};

/// Whether a URL names a user (and maybe a password) before its host: `https://user:pw@host`.
/// A URL without a scheme is read as if it had one, so `user:pw@host` counts too.
pub(super) fn has_user_info(url: &str) -> bool {
    let with_scheme = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    match url::Url::parse(&with_scheme) {
        Ok(parsed) => !parsed.username().is_empty() || parsed.password().is_some(),
        // Not a URL at all: an '@' before the path is still taken for credentials, so that a
        // malformed URL is never echoed with a password in it.
        Err(_) => with_scheme.split("://").nth(1).is_some_and(|rest| rest.split(['/', '?', '#']).next().is_some_and(|authority| authority.contains('@'))),
    }
}

/// The values of the options that hold credentials.
pub(super) fn secret_values(options: &BTreeMap<String, String>) -> Vec<&str> {
    options.iter().filter(|(name, _)| is_secret_option(name)).map(|(_, value)| value.as_str()).collect()
}

/// Whether an option holds a credential, whose value is never shown.
pub fn is_secret_option(name: &str) -> bool {
    ["password", "secret", "jaas", ".pem", "token", "oauthbearer.config"].iter().any(|word| name.contains(word))
}

/// What librdkafka says of one option (an unknown name, a bad value), with the value of a
/// secret never repeated.
/// What librdkafka says is wrong with an option, if anything (a secret's value redacted).
pub(super) fn kafka_option_problem(name: &str, value: &str) -> Option<String> {
    let mut config = rdkafka::ClientConfig::new();
    config.set(name, value);
    match config.create_native_config() {
        Ok(_) => None,
        Err(rdkafka::error::KafkaError::ClientConfig(_, description, _, _)) => {
            Some(if is_secret_option(name) { redact(&description, [value]) } else { description })
        }
        Err(error) => Some(error.to_string()),
    }
}

/// `text` with every occurrence of the given secrets replaced.
pub fn redact<'a>(text: &str, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let mut text = text.to_string();
    for secret in secrets {
        if !secret.is_empty() {
            text = text.replace(secret, "[redacted]");
        }
    }
    text
}

/// Never shows a credential, wherever settings end up printed.
impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: BTreeMap<&str, &str> = self
            .options
            .iter()
            .map(|(name, value)| (name.as_str(), if is_secret_option(name) { "[redacted]" } else { value.as_str() }))
            .collect();
        formatter
            .debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("transaction_timeout", &self.transaction_timeout)
            .field("static_membership", &self.static_membership)
            .field("session_timeout", &self.session_timeout)
            .field("options", &options)
            .field("replication_factor", &self.replication_factor)
            .field("topic_configs", &self.topic_configs)
            .finish()
    }
}

impl KafkaSettings {
    /// The values of the options that hold credentials.
    pub fn secrets(&self) -> Vec<&str> {
        secret_values(&self.options)
    }
}

impl std::fmt::Debug for RegistrySettings {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RegistrySettings")
            .field("urls", &self.urls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Settings {
    /// Every credential in the settings, for redaction.
    pub fn secrets(&self) -> Vec<&str> {
        let mut secrets = self.kafka.secrets();
        secrets.extend(self.schema_registry.password.as_deref());
        secrets
    }
}

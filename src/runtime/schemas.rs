//! Talking to the schema registry from the loop: registering the sink's schema at start and
//! fetching each writer schema the first time a record names it. An unreachable registry is
//! waited for (not ready, the reason in /status), never a reason to dead-letter a record.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::backoff::Backoff;
use super::health::Health;
use super::status::Status;
use crate::codec::avro::WriterSchemas;
use crate::codec::registry::{Registry, RegistryError};

const FIRST_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// Makes `call` until the registry answers; `Ok(None)` when shut down meanwhile or after
/// `max_wait`. `on_wait` runs once, before the first wait (the loop sets the record aside
/// and commits its open batch there). Not ready from the first failure until an answer.
pub fn until_answered<T>(
    what: &str,
    health: &Health,
    status: &Status,
    shutdown: &CancellationToken,
    max_wait: Option<Duration>,
    mut on_wait: impl FnMut() -> Result<(), super::RuntimeError>,
    mut call: impl FnMut() -> Result<T, RegistryError>,
) -> Result<Option<T>, WaitError> {
    let started = Instant::now();
    let mut delays = Backoff::new(FIRST_DELAY, MAX_DELAY);
    let mut waited = false;
    loop {
        match call() {
            Ok(answer) => {
                if health.is_waiting_for_registry() {
                    health.set_waiting_for_registry(false);
                    info!(what, "the schema registry answers again");
                }
                return Ok(Some(answer));
            }
            Err(error) if error.is_retriable() => {
                let delay = delays.pause();
                warn!(what, %error, retry_in_ms = delay.as_millis() as u64, "waiting for the schema registry");
                status.failed(&format!("{what}: {error}"));
                if !waited {
                    waited = true;
                    health.set_waiting_for_registry(true);
                    on_wait().map_err(WaitError::Runtime)?;
                }
                let wake = Instant::now() + delay;
                if max_wait.is_some_and(|max_wait| wake > started + max_wait) {
                    return Ok(None);
                }
                while Instant::now() < wake {
                    if shutdown.is_cancelled() {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Err(error) => return Err(WaitError::Registry(error)),
        }
    }
}

/// Fetches writer schema `id` into `writers` (a schema the registry does not know is cached
/// as such: its records are bad records), within the registry lookup budget, waiting for the
/// registry as [`until_answered`] does. `Ok(false)`: shut down or `max_wait` passed first.
#[allow(clippy::too_many_arguments)]
pub fn fetch_writer_schema(
    registry: &Registry,
    writers: &WriterSchemas,
    id: u32,
    what: &str,
    health: &Health,
    status: &Status,
    shutdown: &CancellationToken,
    max_wait: Option<Duration>,
    on_wait: impl FnMut() -> Result<(), super::RuntimeError>,
) -> Result<bool, super::RuntimeError> {
    // The wait is short (one lookup's share of the rate): the record waits its turn rather
    // than going to the DLQ unlooked-up (see `WriterSchemas::take_lookup`).
    while let Err(wait) = writers.take_lookup() {
        tracing::debug!(id, ?wait, "registry lookups are rate-limited; waiting");
        std::thread::sleep(wait);
    }
    match until_answered(what, health, status, shutdown, max_wait, on_wait, || registry.writer_schema(id)) {
        Ok(Some(schema)) => {
            if let Err(reason) = &schema {
                warn!(id, %reason, "a writer schema id the registry does not know; its records are bad records");
            }
            writers.insert(id, schema);
            Ok(true)
        }
        Ok(None) => Ok(false),
        Err(WaitError::Runtime(error)) => Err(error),
        Err(WaitError::Registry(error)) => Err(super::RuntimeError::Setup(format!("{what}: {error}"))),
    }
}

#[derive(Debug)]
pub enum WaitError {
    Registry(RegistryError),
    Runtime(super::RuntimeError),
}

/// Registers one of the sink's schemas (value or key) under `subject`; returns its id
/// (None: shut down).
pub fn register_sink(
    registry: &Registry,
    subject: &str,
    schema: &str,
    health: &Health,
    status: &Status,
    shutdown: &CancellationToken,
) -> Result<Option<u32>, super::RuntimeError> {
    let what = format!("registering the sink's schema under subject '{subject}'");
    match until_answered(&what, health, status, shutdown, None, || Ok(()), || registry.register(subject, schema)) {
        Ok(id) => Ok(id),
        Err(WaitError::Runtime(error)) => Err(error),
        Err(WaitError::Registry(error)) => Err(super::RuntimeError::Setup(format!("{what}: {error}"))),
    }
}

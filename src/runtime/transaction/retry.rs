//! Retrying a transactional call: how long, and when retrying is pointless (the transaction
//! is past its timeout, or a shutdown's deadline passed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::BaseProducer;
use tracing::{error, warn};

use super::bounded::CallFailure;
use super::{classify, fatal, moves_group_on, BatchProducer, ErrorClass};
use crate::runtime::backoff::Backoff;
use crate::runtime::delivery::DeliveryWatch;
use crate::runtime::error::RuntimeError;
use crate::runtime::health;

impl BatchProducer {
    /// The time a transactional call may take: the usual, or what is left before `deadline`
    /// (a shutdown's drain deadline, audit R19).
    pub(super) fn call_timeout_within(&self, deadline: Option<Instant>) -> Duration {
        match deadline {
            None => self.call_timeout,
            Some(deadline) => deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(1), self.call_timeout),
        }
    }

    /// Runs a transactional call until it succeeds (true), needs an abort (false) or fails
    /// fatally (error). Retriable errors repeat the same call until `deadline`, and only while
    /// the transaction is younger than the transaction timeout: past it the coordinator ends
    /// the transaction anyway, and the way on is a new producer, whose `init_transactions`
    /// resolves this one (audit R16). Not ready while it retries. A call that never returned
    /// (see `bounded`) leaves this producer wedged: the run stops as timed out.
    pub(super) fn retry(
        &mut self,
        what: &str,
        deadline: Option<Instant>,
        call: impl Fn(&Arc<BaseProducer<DeliveryWatch>>) -> Result<(), CallFailure>,
    ) -> Result<bool, RuntimeError> {
        let result = self.retry_calls(what, deadline, call);
        if let Some(health) = &self.health {
            health.set_recovering(false);
        }
        result
    }

    fn retry_calls(
        &mut self,
        what: &str,
        deadline: Option<Instant>,
        call: impl Fn(&Arc<BaseProducer<DeliveryWatch>>) -> Result<(), CallFailure>,
    ) -> Result<bool, RuntimeError> {
        let mut pauses = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            health::beat();
            let error = match call(&self.producer) {
                Ok(()) => return Ok(true),
                Err(CallFailure::Kafka(error)) => error,
                Err(CallFailure::Stuck { waited }) => {
                    self.wedged = true;
                    error!(call = what, waited_ms = waited.as_millis() as u64, transactional_id = %self.transactional_id,
                        "a transactional call did not return (librdkafka issue 5456); leaving this producer behind, \
                         the next one fences it and aborts its transaction");
                    return Err(RuntimeError::TimedOut { action: format!("{what} (librdkafka did not return)"), waited });
                }
            };
            match classify(&error) {
                ErrorClass::Retriable if self.open_for().is_some_and(|open_for| open_for > self.transaction_timeout) => {
                    return Err(RuntimeError::TransactionTimedOut {
                        transactional_id: self.transactional_id.clone(),
                        open_for: self.open_for().unwrap_or_default(),
                        detail: format!("{what} kept failing: {error}"),
                    });
                }
                ErrorClass::Retriable if deadline.is_none_or(|deadline| Instant::now() < deadline) => {
                    warn!(%error, call = what, transactional_id = %self.transactional_id, "transactional call failed; retrying");
                    if let Some(health) = &self.health {
                        health.set_recovering(true);
                    }
                    std::thread::sleep(pauses.pause());
                }
                ErrorClass::Retriable => return Err(RuntimeError::DrainDeadline),
                ErrorClass::Abort => {
                    warn!(%error, call = what, "transaction must be aborted");
                    self.group_moved_on |= moves_group_on(&error);
                    return Ok(false);
                }
                ErrorClass::Fatal => return Err(fatal(&error, &self.transactional_id)),
            }
        }
    }
}

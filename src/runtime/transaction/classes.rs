//! librdkafka's failure classes for transactional calls, and what each means here.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::runtime::error::RuntimeError;

/// How a failed transactional call must be handled (librdkafka's error classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Call the same function again.
    Retriable,
    /// Abort the transaction, rewind to the batch's first offsets and go on.
    Abort,
    /// This producer can do nothing more: exit and let the supervisor restart the process.
    Fatal,
}

pub fn classify(error: &KafkaError) -> ErrorClass {
    match error {
        KafkaError::Transaction(inner) if inner.is_fatal() => ErrorClass::Fatal,
        KafkaError::Transaction(inner) if inner.txn_requires_abort() => ErrorClass::Abort,
        KafkaError::Transaction(inner) if inner.is_retriable() => ErrorClass::Retriable,
        _ => ErrorClass::Fatal,
    }
}

pub fn is_fencing(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::FencedInstanceId
                | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
        )
    ) || matches!(error, KafkaError::Transaction(inner) if inner.is_fatal() && inner.string().to_lowercase().contains("fenced"))
}

/// The error to stop with for a fatal Kafka error.
pub fn fatal(error: &KafkaError, transactional_id: &str) -> RuntimeError {
    if is_fencing(error) {
        RuntimeError::Fenced {
            transactional_id: transactional_id.to_string(),
            detail: error.to_string(),
        }
    } else {
        RuntimeError::kafka("a transactional call failed for good", error.clone())
    }
}

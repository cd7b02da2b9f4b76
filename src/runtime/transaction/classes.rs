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
        // rust-rdkafka's commit_transaction flushes first; records still unacknowledged when
        // the flush times out say nothing about the transaction: call commit again (audit R18).
        KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut) => ErrorClass::Retriable,
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

/// Offsets refused because the group is in a newer generation than the consumer's metadata
/// says: a rebalance is under way, and this consumer has not yet served its callbacks.
pub fn moves_group_on(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::IllegalGeneration | RDKafkaErrorCode::UnknownMemberId | RDKafkaErrorCode::RebalanceInProgress)
    )
}

/// The error to stop with for a fatal Kafka error.
pub fn fatal(error: &KafkaError, transactional_id: &str) -> RuntimeError {
    if is_fencing(error) {
        RuntimeError::Fenced {
            transactional_id: transactional_id.to_string(),
            detail: error.to_string(),
            by_group: error.rdkafka_error_code() == Some(RDKafkaErrorCode::FencedInstanceId),
        }
    } else {
        RuntimeError::kafka("a transactional call failed for good", error.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_that_timed_out_inside_commit_is_retried() {
        assert_eq!(classify(&KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)), ErrorClass::Retriable);
        assert_eq!(classify(&KafkaError::Flush(RDKafkaErrorCode::Fenced)), ErrorClass::Fatal);
    }

    #[test]
    fn fencing_errors_say_fenced_and_others_keep_their_kafka_error() {
        let fenced = KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced);
        assert!(is_fencing(&fenced));
        assert!(matches!(fatal(&fenced, "p-0"), RuntimeError::Fenced { transactional_id, .. } if transactional_id == "p-0"));
        let refused = KafkaError::MessageProduction(RDKafkaErrorCode::InvalidRecord);
        assert!(!is_fencing(&refused));
        assert!(matches!(fatal(&refused, "p-0"), RuntimeError::Kafka { source: KafkaError::MessageProduction(RDKafkaErrorCode::InvalidRecord), .. }));
    }

    #[test]
    fn offsets_refused_for_an_old_generation_say_the_group_moved_on() {
        assert!(moves_group_on(&KafkaError::MessageProduction(RDKafkaErrorCode::IllegalGeneration)));
        assert!(moves_group_on(&KafkaError::MessageProduction(RDKafkaErrorCode::UnknownMemberId)));
        assert!(!moves_group_on(&KafkaError::MessageProduction(RDKafkaErrorCode::InvalidRecord)));
        assert!(!moves_group_on(&KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)));
    }
}

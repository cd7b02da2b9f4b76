//! Delivery reports of the producer: which records the broker acknowledged, and whether one
//! failed (which makes the open transaction abortable, so its commit reports it); and the
//! producer's word that no broker answers, for readiness.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::ClientContext;
use tracing::warn;

use super::health::Health;
use super::transaction::refuses_record;

/// Counts failed deliveries; a failed delivery makes the transaction abortable, so the commit
/// will report it and the batch is replayed.
#[derive(Default)]
pub struct DeliveryWatch {
    pub failures: AtomicU64,
    /// The topics whose delivered offsets matter (the changelogs).
    tracked: Vec<String>,
    /// The highest offset delivered per tracked (topic, partition) since the last take.
    delivered: std::sync::Mutex<std::collections::HashMap<(String, i32), i64>>,
    /// Records the broker refused for good, by origin (see `transaction::refused`), with
    /// its reason, since the last take.
    refused: std::sync::Mutex<Vec<(usize, String)>>,
    health: Option<Arc<Health>>,
}

impl DeliveryWatch {
    /// Watches deliveries, remembering the offsets reached in `tracked` topics.
    pub fn new(tracked: Vec<String>) -> DeliveryWatch {
        DeliveryWatch { tracked, ..DeliveryWatch::default() }
    }

    /// Readiness goes false when the producer finds no broker answering. The loop waits on
    /// the producer while the brokers are away (a commit, a full queue) and does not poll the
    /// consumer then, whose own report of it would come only after; the consumer's
    /// statistics say when a broker is back.
    pub fn with_health(mut self, health: Arc<Health>) -> DeliveryWatch {
        self.health = Some(health);
        self
    }

    /// The highest offset delivered per (topic, partition) since the last call.
    pub fn take_delivered(&self) -> std::collections::HashMap<(String, i32), i64> {
        std::mem::take(&mut *self.delivered.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// The origins of records the broker refused for good since the last call, with why.
    pub fn take_refused(&self) -> Vec<(usize, String)> {
        std::mem::take(&mut *self.refused.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

impl ClientContext for DeliveryWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(health) = &self.health {
            health.note_client_error(&error);
        }
        warn!(%error, reason, "producer client error");
    }
}

impl ProducerContext for DeliveryWatch {
    /// The record's origin in the batch (`transaction::refused::Origin`).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, origin: usize) {
        match result {
            Err((error, message)) => {
                if let Some(code) = error.rdkafka_error_code()
                    && origin != 0
                    && refuses_record(code)
                {
                    warn!(%error, topic = message.topic(), "the broker refused a record; its input goes where on_error.produce says on the replay");
                    self.refused.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push((origin, error.to_string()));
                }
                if self.failures.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!(%error, "delivery failed; the transaction will abort and the batch will be replayed");
                }
            }
            Ok(message) if !self.tracked.is_empty() => {
                if let Some(topic) = self.tracked.iter().find(|topic| topic.as_str() == message.topic()) {
                    let mut delivered = self.delivered.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    let reached = delivered.entry((topic.clone(), message.partition())).or_insert(message.offset());
                    *reached = (*reached).max(message.offset());
                }
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::RDKafkaErrorCode;

    use super::*;

    fn ready_health() -> Arc<Health> {
        let health = Arc::new(Health::default());
        health.set_transactions_ready(true);
        health.set_assigned(4);
        health
    }

    #[test]
    fn the_producer_finding_no_broker_makes_the_process_not_ready() {
        let health = ready_health();
        let watch = DeliveryWatch::new(Vec::new()).with_health(health.clone());
        watch.error(KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure), "one connection failed");
        assert!(health.is_ready(), "one failed connection is not the cluster being away");
        watch.error(KafkaError::Global(RDKafkaErrorCode::AllBrokersDown), "2/2 brokers are down");
        assert!(!health.is_ready());
    }
}

//! Delivery reports of the producer: which records the broker acknowledged, and whether one
//! failed (which makes the open transaction abortable, so its commit reports it).

use std::sync::atomic::{AtomicU64, Ordering};

use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::ClientContext;
use tracing::warn;

/// Counts failed deliveries; a failed delivery makes the transaction abortable, so the commit
/// will report it and the batch is replayed.
#[derive(Default)]
pub struct DeliveryWatch {
    pub failures: AtomicU64,
    /// The topics whose delivered offsets matter (the changelogs).
    tracked: Vec<String>,
    /// The highest offset delivered per tracked (topic, partition) since the last take.
    delivered: std::sync::Mutex<std::collections::HashMap<(String, i32), i64>>,
}

impl DeliveryWatch {
    /// Watches deliveries, remembering the offsets reached in `tracked` topics.
    pub fn new(tracked: Vec<String>) -> DeliveryWatch {
        DeliveryWatch { tracked, ..DeliveryWatch::default() }
    }

    /// The highest offset delivered per (topic, partition) since the last call.
    pub fn take_delivered(&self) -> std::collections::HashMap<(String, i32), i64> {
        std::mem::take(&mut *self.delivered.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

impl ClientContext for DeliveryWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        warn!(%error, reason, "producer client error");
    }
}

impl ProducerContext for DeliveryWatch {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _opaque: ()) {
        match result {
            Err((error, _)) => {
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

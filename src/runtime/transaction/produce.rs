//! Handing records to librdkafka inside the open batch: outputs (with their headers, the
//! sink's record size limit checked first) and changelog entries; a full local queue is
//! waited out, serving delivery reports meanwhile.

use std::time::Instant;

use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;

use super::{BatchProducer, Origin};
use crate::engine::Output;

impl BatchProducer {
    /// Queues one output in the open transaction. Errors are about this record (too large,
    /// for instance) or fatal; a full queue is waited out. `origin`: the input it came from;
    /// `input_value`: that input's value, for an output written as read.
    pub fn send(&self, topic: &str, output: &Output, input_value: Option<&[u8]>, origin: Origin) -> KafkaResult<()> {
        let value = output.value.bytes(input_value).map_err(|error| {
            tracing::error!(%error, topic, "not produced");
            KafkaError::MessageProduction(RDKafkaErrorCode::InvalidArgument)
        })?;
        if let Some((_, limit)) = self.record_limits.iter().find(|(limited, _)| limited == topic) {
            let size = output.key.as_ref().map_or(0, Vec::len)
                + value.map_or(0, <[u8]>::len)
                + output.headers.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>();
            if size > *limit {
                return Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge));
            }
        }
        let mut record: BaseRecord<'_, [u8], [u8], Origin> = BaseRecord::with_opaque_to(topic, origin);
        // An empty header list is still a librdkafka allocation and free per record.
        if !output.headers.is_empty() {
            let mut headers = OwnedHeaders::new_with_capacity(output.headers.len());
            for (name, value) in &output.headers {
                headers = headers.insert(Header { key: name, value: Some(value) });
            }
            record = record.headers(headers);
        }
        if let Some(partition) = output.partition {
            record = record.partition(partition);
        }
        if let Some(key) = &output.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = value {
            record = record.payload(value);
        }
        self.enqueue(record)
    }

    /// Hands a record to librdkafka, waiting out a full queue for as long as a transactional
    /// call may take. A queue still full after that holds records no broker takes (the
    /// brokers are away, and librdkafka has not timed them out yet): the queue-full error
    /// ends the run, which starts again once the cluster answers, instead of waiting here
    /// unseen.
    fn enqueue(&self, mut record: BaseRecord<'_, [u8], [u8], Origin>) -> KafkaResult<()> {
        let mut full_since: Option<Instant> = None;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    if full_since.get_or_insert_with(Instant::now).elapsed() > self.call_timeout {
                        return Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull));
                    }
                    record = returned;
                    self.serve_or_pause();
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    /// Queues a changelog record for one partition in the open transaction.
    pub fn send_to_partition(&self, topic: &str, partition: i32, key: &[u8], value: Option<&[u8]>) -> KafkaResult<()> {
        let mut record: BaseRecord<'_, [u8], [u8], Origin> = BaseRecord::with_opaque_to(topic, 0).partition(partition).key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        self.enqueue(record)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::producer::BaseProducer;
    use rdkafka::ClientConfig;

    use super::super::BatchProducer;
    use crate::runtime::delivery::DeliveryWatch;
    use crate::telemetry::metrics::Metrics;

    /// No broker listens, and librdkafka's queue holds one record: the second record waits
    /// for room that never comes, and gives up after the call timeout (10 s at least).
    #[test]
    fn a_queue_that_stays_full_ends_the_wait_with_its_error() {
        let producer: BaseProducer<DeliveryWatch> = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("queue.buffering.max.messages", "1")
            .set("message.timeout.ms", "600000")
            .set("log_level", "0")
            .create_with_context(DeliveryWatch::default())
            .expect("a producer");
        let metrics = Arc::new(Metrics::new());
        let batch = BatchProducer::new(producer, "t-0".into(), Duration::from_secs(1), metrics, ("s".into(), None), vec!["out".into()]);
        batch.send_to_partition("out", 0, b"k", Some(b"first")).expect("room for one record");
        let started = Instant::now();
        let second = batch.send_to_partition("out", 0, b"k", Some(b"second"));
        assert!(matches!(second, Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))), "{second:?}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(10) && waited < Duration::from_secs(20), "waited {waited:?}");
    }
}

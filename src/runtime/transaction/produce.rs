//! Handing records to librdkafka inside the open batch: outputs (with their headers, the
//! sink's record size limit checked first) and changelog entries; a full local queue is
//! waited out, serving delivery reports meanwhile.

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

    /// Hands a record to librdkafka, waiting out a full queue.
    fn enqueue(&self, mut record: BaseRecord<'_, [u8], [u8], Origin>) -> KafkaResult<()> {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
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

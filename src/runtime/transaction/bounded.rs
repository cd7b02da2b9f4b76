//! `send_offsets_to_transaction` with a bound that holds. librdkafka 2.12 waits for this call
//! without a limit of its own, and the timeout it passes to the coordinator request inside is
//! never checked (librdkafka issue 5456); the request moves on only when some broker's state
//! changes. A cached coordinator that librdkafka has retired (it drops brokers missing from a
//! metadata answer, issue 5511) never changes state again. Seen here under broker restarts,
//! with partitions whose leader librdkafka could not find in the log just before: a window
//! pipeline stayed alive and silent for minutes, its loop (gdb) inside this call.
//!
//! So the call runs on a thread of its own, and the loop waits for it a little longer than
//! its timeout. A call that does not return by then is left behind with its producer (the
//! thread holds the producer until the call returns, if it ever does): the run stops as
//! timed out, and the next run's producer, with the same transactional id, fences it and
//! aborts its transaction in `init_transactions`.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::TopicPartitionList;

use crate::runtime::delivery::DeliveryWatch;

/// How much longer than its own timeout the loop waits for the call.
const SLACK: Duration = Duration::from_secs(5);

/// Why a transactional call did not succeed.
#[derive(Debug)]
pub enum CallFailure {
    Kafka(KafkaError),
    /// The call had not returned `waited` after it began; it is left behind.
    Stuck { waited: Duration },
}

impl From<KafkaError> for CallFailure {
    fn from(error: KafkaError) -> CallFailure {
        CallFailure::Kafka(error)
    }
}

/// `producer.send_offsets_to_transaction(offsets, group, timeout)`, waited for at most
/// `timeout` and [`SLACK`].
pub fn send_offsets(
    producer: &Arc<BaseProducer<DeliveryWatch>>,
    offsets: &Arc<TopicPartitionList>,
    group: &Arc<ConsumerGroupMetadata>,
    timeout: Duration,
) -> Result<(), CallFailure> {
    let (producer, offsets, group) = (producer.clone(), offsets.clone(), group.clone());
    within(timeout + SLACK, move || {
        #[cfg(feature = "failpoints")]
        if fail::eval("send-offsets-hangs", |_| ()).is_some() {
            // Stands in for librdkafka's endless wait (the thread is left behind).
            std::thread::sleep(Duration::from_secs(3_600));
        }
        producer.send_offsets_to_transaction(&offsets, &group, timeout)
    })
}

/// Runs `call` on a thread of its own and waits for it at most `limit`.
fn within(limit: Duration, call: impl FnOnce() -> Result<(), KafkaError> + Send + 'static) -> Result<(), CallFailure> {
    let started = Instant::now();
    let (sender, receiver) = mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new().name("weir-txn-call".into()).spawn(move || {
        // The loop may have stopped waiting: then nobody hears the answer.
        let _ = sender.send(call());
    });
    if let Err(error) = spawned {
        // No thread to spare: the call cannot be bounded, and the run starts again.
        tracing::warn!(%error, "cannot start a thread for a transactional call");
        return Err(CallFailure::Stuck { waited: started.elapsed() });
    }
    match receiver.recv_timeout(limit) {
        Ok(result) => result.map_err(CallFailure::Kafka),
        // Timed out, or the thread ended without an answer (a panic in the call).
        Err(_) => Err(CallFailure::Stuck { waited: started.elapsed() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_that_returns_in_time_gives_its_answer() {
        assert!(within(Duration::from_secs(5), || Ok(())).is_ok());
        let failed = within(Duration::from_secs(5), || Err(KafkaError::Canceled));
        assert!(matches!(failed, Err(CallFailure::Kafka(KafkaError::Canceled))));
    }

    #[test]
    fn a_call_that_does_not_return_is_left_behind_after_the_limit() {
        let started = Instant::now();
        let stuck = within(Duration::from_millis(200), || {
            std::thread::sleep(Duration::from_secs(30));
            Ok(())
        });
        assert!(matches!(stuck, Err(CallFailure::Stuck { waited }) if waited >= Duration::from_millis(200)));
        assert!(started.elapsed() < Duration::from_secs(5), "waited for the stuck call: {:?}", started.elapsed());
    }

    #[test]
    fn a_call_that_panics_is_a_call_without_an_answer() {
        let panicked = within(Duration::from_secs(5), || panic!("inside the call"));
        assert!(matches!(panicked, Err(CallFailure::Stuck { .. })));
    }
}

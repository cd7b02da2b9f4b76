//! Records the broker refuses for good (audit R2): a null key on a compacted sink, a record
//! over the topic's `max.message.bytes` where weir could not read it, a timestamp the topic
//! will not take. librdkafka reports the refusal in the record's delivery report, after the
//! record left the loop; the transaction can then only abort, and replaying the batch would
//! meet the same refusal forever.
//!
//! So each sink record carries its input's place in the batch as its delivery opaque
//! ([`Origin`]). A refusal is remembered by input position ([`RefusedInputs`], kept across
//! aborts and across the in-place restarts of `recovery`). The broker refuses a whole record
//! batch for one bad record, so every input in it is first only a suspect: the replay commits
//! what comes before a suspect, then sends the suspect's records alone in a transaction of
//! their own. Taken, the suspect is cleared; refused again, alone, it is the culprit, and its
//! next replay sends the input where `on_error.produce` says (the DLQ by default) instead of
//! to the sink, in a batch that can commit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use rdkafka::error::RDKafkaErrorCode;

use crate::runtime::TopicPartitionOffset;

/// Which input record of the open batch a produced record came from: 0 for none (records
/// emitted at the end of a batch, changelog records), else an index into [`Origins`] plus 1.
pub type Origin = usize;

/// The input positions of the open batch's records that produced sink records, so that a
/// delivery report's [`Origin`] leads back to its input.
#[derive(Debug, Default)]
pub struct Origins {
    topics: Vec<String>,
    records: Vec<(u32, i32, i64)>,
}

impl Origins {
    /// The origin for the input at `offset` of `partition` of `topic`.
    pub fn push(&mut self, topic: &str, partition: i32, offset: i64) -> Origin {
        let topic = match self.topics.iter().position(|known| known == topic) {
            Some(index) => index,
            None => {
                self.topics.push(topic.to_string());
                self.topics.len() - 1
            }
        };
        self.records.push((topic as u32, partition, offset));
        self.records.len()
    }

    pub fn get(&self, origin: Origin) -> Option<TopicPartitionOffset> {
        let (topic, partition, offset) = *self.records.get(origin.checked_sub(1)?)?;
        Some(TopicPartitionOffset::new(self.topics.get(topic as usize)?.clone(), partition, offset))
    }

    pub fn clear(&mut self) {
        self.records.clear();
    }
}

/// Whether a failed delivery means the broker will never take this record (rather than that it
/// could not be reached, or that the transaction failed as a whole).
pub fn refuses_record(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidTimestamp
    )
}

/// What the broker said about an input's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Refused in a produce request shared with other inputs' records: the broker refuses a
    /// whole record batch for one bad record, so this one may be innocent. Its replay sends it
    /// alone, in a transaction of its own.
    Suspect,
    /// Refused when sent alone: it goes where `on_error.produce` says.
    Refused(String),
}

/// Inputs whose sink records the broker refused, with its reason. Shared by every run of the
/// process; small (one entry per input of a refused record batch).
#[derive(Debug, Default)]
pub struct RefusedInputs {
    any: AtomicBool,
    inputs: Mutex<HashMap<TopicPartitionOffset, Refusal>>,
}

impl RefusedInputs {
    /// The broker refused this input's records; `alone`: in a transaction of their own.
    pub fn insert(&self, input: TopicPartitionOffset, reason: String, alone: bool) {
        let mut inputs = self.inputs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let refusal = inputs.entry(input).or_insert(Refusal::Suspect);
        if alone {
            *refusal = Refusal::Refused(reason);
        }
        self.any.store(true, Ordering::Relaxed);
    }

    /// The input's records went through, alone: it is cleared.
    pub fn accepted(&self, input: &TopicPartitionOffset) {
        let mut inputs = self.inputs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if inputs.get(input) == Some(&Refusal::Suspect) {
            inputs.remove(input);
        }
    }

    /// What the broker said about this input's records before, if it refused them. One
    /// relaxed load while nothing was ever refused.
    pub fn refusal(&self, topic: &str, partition: i32, offset: i64) -> Option<Refusal> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let inputs = self.inputs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        inputs.get(&TopicPartitionOffset::new(topic, partition, offset)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origin_leads_back_to_its_input() {
        let mut origins = Origins::default();
        let first = origins.push("in", 0, 5);
        let second = origins.push("other", 3, 7);
        assert_eq!(origins.get(first), Some(TopicPartitionOffset::new("in", 0, 5)));
        assert_eq!(origins.get(second), Some(TopicPartitionOffset::new("other", 3, 7)));
        assert_eq!(origins.get(0), None, "records without an input");
        origins.clear();
        assert_eq!(origins.get(first), None);
    }

    #[test]
    fn only_refusals_of_the_record_itself_count() {
        assert!(refuses_record(RDKafkaErrorCode::InvalidRecord));
        assert!(refuses_record(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(!refuses_record(RDKafkaErrorCode::MessageTimedOut));
        assert!(!refuses_record(RDKafkaErrorCode::PurgeQueue));
        assert!(!refuses_record(RDKafkaErrorCode::NotLeaderForPartition));
    }

    #[test]
    fn a_refusal_in_company_is_a_suspicion_and_alone_a_verdict() {
        let refused = RefusedInputs::default();
        let input = TopicPartitionOffset::new("in", 0, 5);
        assert_eq!(refused.refusal("in", 0, 5), None);
        refused.insert(input.clone(), "Broker: Invalid record".into(), false);
        assert_eq!(refused.refusal("in", 0, 5), Some(Refusal::Suspect));
        refused.insert(input.clone(), "Broker: Invalid record".into(), true);
        assert_eq!(refused.refusal("in", 0, 5), Some(Refusal::Refused("Broker: Invalid record".into())));
        refused.accepted(&input);
        assert!(matches!(refused.refusal("in", 0, 5), Some(Refusal::Refused(_))), "a verdict stays");
        let innocent = TopicPartitionOffset::new("in", 0, 6);
        refused.insert(innocent.clone(), "Broker: Invalid record".into(), false);
        refused.accepted(&innocent);
        assert_eq!(refused.refusal("in", 0, 6), None, "sent alone and taken");
    }
}

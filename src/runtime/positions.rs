//! Places in topic partitions: where a batch's partitions rewind to, what a batch committed,
//! where reading starts.

use std::fmt;

/// An offset in a partition of a topic (the next offset to read, wherever it is a position).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartitionOffset {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl TopicPartitionOffset {
    pub fn new(topic: impl Into<String>, partition: i32, offset: i64) -> TopicPartitionOffset {
        TopicPartitionOffset { topic: topic.into(), partition, offset }
    }

    /// Whether it is in `partition` of `topic`.
    pub fn is_in(&self, topic: &str, partition: i32) -> bool {
        self.partition == partition && self.topic == topic
    }
}

impl fmt::Display for TopicPartitionOffset {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}[{}]@{}", self.topic, self.partition, self.offset)
    }
}

//! Where a pipeline's tasks and their state live: the stages after the first fed through
//! repartition topics, which partitions read make up a task, and who writes each changelog
//! partition.

use super::Engine;
use crate::config::DeliveryMode;

impl Engine {
    /// Production: stages after the first are fed through repartition topics of `width`
    /// partitions, from `input_partitions` source partitions in all.
    /// Without transactions (upsert mode), forwards carry their position, so that what a
    /// replaying sender sends again is dropped.
    pub fn distribute(&mut self, width: u32, input_partitions: usize) {
        let positioned = self.pipeline.mode() == DeliveryMode::IdempotentUpsert;
        self.topology.distribute(width, input_partitions, positioned);
    }

    /// The repartition topic in front of each stage after the first, by stage.
    pub fn repartition_topics(&self) -> Vec<(usize, String)> {
        self.repartition_topics.clone()
    }

    /// The stage a repartition topic feeds; None for other topics. Called for every record
    /// read, so it allocates nothing.
    pub fn stage_of_topic(&self, topic: &str) -> Option<usize> {
        self.repartition_topics.iter().find(|(_, name)| name == topic).map(|(stage, _)| *stage)
    }

    /// Which changelog entries make up the state behind a partition read: those of `steps`
    /// whose entry topic is one of the owners (the source topic, both of a join run in
    /// place; None after a repartition).
    pub fn restore_scope(&self, topic: &str) -> (Vec<usize>, Vec<Option<String>>) {
        match self.stage_of_topic(topic) {
            Some(stage) => (self.topology.stage_stateful_steps(stage), vec![None]),
            // Stage 0's state, with the input watermarks.
            None => (self.topology.stage_stateful_steps(0), self.topology.task_topics(topic).into_iter().map(Some).collect()),
        }
    }

    /// The partition read that names the task `topic`'s partition feeds: itself, or for a
    /// join run in place, the left partition of the pair. State is restored (and an abort
    /// replayed) per task, so a pair's two partitions go as one.
    pub fn task_input(&self, topic: &str, partition: i32) -> (String, i32) {
        match self.stage_of_topic(topic) {
            Some(_) => (topic.to_string(), partition),
            None => self.topology.task_input(topic, partition),
        }
    }

    /// Whether stateful steps run in the input partitions' tasks (so the changelogs are
    /// numbered like the input partitions, and all source topics need one partition count).
    pub fn has_input_state(&self) -> bool {
        !self.topology.stage_stateful_steps(0).is_empty()
    }

    /// The join run in place, as (left topic, right topic): the consumer must be given
    /// partition p of both together.
    pub fn join_in_place(&self) -> Option<(&str, &str)> {
        self.topology.join_in_place()
    }

    /// The partitions read whose state shares changelog partition `partition` of `step`:
    /// while this process does not own them all, others write there too.
    pub fn changelog_writers(&self, step: usize, partition: i32) -> Vec<(String, i32)> {
        if let Some((_, topic)) =
            self.repartition_topics.iter().find(|(stage, _)| self.topology.stage_stateful_steps(*stage).contains(&step))
        {
            return vec![(topic.clone(), partition)];
        }
        let mut writers: Vec<(String, i32)> = match &self.pipeline.source.topics {
            crate::config::SourceTopics::List(topics) => topics.iter().map(|topic| (topic.clone(), partition)).collect(),
            crate::config::SourceTopics::Pattern(_) => Vec::new(),
        };
        // A join run in place keeps the right input's watermark there too.
        if let Some((_, right)) = self.join_in_place() {
            writers.push((right.to_string(), partition));
        }
        writers
    }
}

//! How the steps are cut into stages (PIPELINE.md "Partitioning"): each stage after the
//! first is fed through a repartition topic, routed by its key. The steps form a tree (the
//! outputs branch off the main steps), and so do the stages: each later stage is fed by the
//! stage its first step's records come from.

use super::Pipeline;
use crate::config::{DeliveryMode, SourceTopics};
use crate::operators::Step;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stages {
    pub stages: Vec<Stage>,
    /// The join, run in place: (left topic, right topic).
    pub join_in_place: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The pipeline indices of its steps, in index order: the first is the one records enter
    /// by (for stage 0: the steps fed by the source), the others follow it in the tree.
    pub steps: Vec<usize>,
    /// The key records are routed by into this stage; None for stage 0, whose tasks are
    /// the input partitions.
    pub repartition_by: Option<Vec<String>>,
    /// The stage whose tasks send records into this one; None for stage 0.
    pub parent: Option<usize>,
}

impl Pipeline {
    /// The stages, and whether the join runs in place.
    pub fn stages(&self) -> Stages {
        // A co-partitioned join runs in the input partitions' tasks.
        let in_place = co_partitioned_join(self).filter(|_| {
            // Upsert mode's replay drops need a sender's forwards in its input's order, which
            // a pair task, taking two inputs in whatever order they come, does not keep.
            self.mode() != DeliveryMode::IdempotentUpsert || cut_stages(self, true).len() == 1
        });
        Stages {
            stages: cut_stages(self, in_place.is_some()),
            join_in_place: in_place.map(|(left, right)| (left.to_string(), right.to_string())),
        }
    }

    /// The repartition topic in front of each stage after the first: `<name>-<its first
    /// step>-repartition`.
    pub fn repartition_topics(&self) -> Vec<(usize, String)> {
        self.stages()
            .stages
            .iter()
            .enumerate()
            .skip(1)
            .map(|(stage, planned)| (stage, format!("{}-{}-repartition", self.name, planned.steps.first().copied().unwrap_or(0))))
            .collect()
    }

    /// The key records are repartitioned by on their way into step `index`, when a stage
    /// starts there.
    pub fn repartitioned_before(&self, index: usize) -> Option<Vec<String>> {
        self.stages().stages.into_iter().find(|stage| stage.steps.first() == Some(&index)).and_then(|stage| stage.repartition_by)
    }

    /// A step in words, as `weir validate` and `weir plan` show it.
    pub fn describe_step(&self, index: usize) -> String {
        let described = self.operator_description(index);
        if let (Step::Filter(filter), true) = (&self.steps[index], self.step_locations[index].ends_with(".when")) {
            return format!("when {}", filter.expression);
        }
        match (&self.steps[index], self.stages().join_in_place) {
            (Step::Join(_), Some((left, right))) => format!("{described}, in place: partition p of {left} joins partition p of {right}"),
            _ => described,
        }
    }

    /// What a stateful step's state depends on, in words (kept to detect changed steps).
    /// Whether it runs after a repartition is part of it: that decides which task (input
    /// partition or repartitioned key) each piece of state belongs to.
    pub fn step_definition(&self, index: usize) -> String {
        let described = self.operator_description(index);
        let stage = self.stages().stages.iter().position(|stage| stage.steps.contains(&index));
        match stage {
            Some(stage) if stage > 0 => format!("{described}, after a repartition"),
            _ => described,
        }
    }

    /// A short, stable fingerprint of a stateful step's definition: equal fingerprints read
    /// each other's state.
    pub fn state_fingerprint(&self, index: usize) -> String {
        format!("{:016x}", stable_hash(self.step_definition(index).as_bytes()))
    }
}

/// A stable hash (FNV-1a, 64 bits): the same on every run and machine, for routing keys to
/// repartition topic partitions and for state fingerprints.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

/// Cuts the steps into stages: a keyed step whose key the records are not partitioned by
/// starts a new one. A join starts one too, unless it runs `in_place` (its inputs are
/// co-partitioned by its key). Steps are visited in index order, which puts every step after
/// the one feeding it.
fn cut_stages(pipeline: &Pipeline, in_place: bool) -> Vec<Stage> {
    let mut stages = vec![Stage { steps: Vec::new(), repartition_by: None, parent: None }];
    let source = &pipeline.source;
    let start = (0, (!source.partitioned_by.is_empty()).then(|| source.partitioned_by.clone()));
    // After each step: the stage it runs in and the fields its records are partitioned by.
    let mut after: Vec<(usize, Option<Vec<String>>)> = Vec::with_capacity(pipeline.steps.len());
    for (index, step) in pipeline.steps.iter().enumerate() {
        let (stage, mut partitioned_by) = match pipeline.parent(index) {
            Some(parent) => after[parent].clone(),
            None => start.clone(),
        };
        // A step that writes a partitioning field leaves the records partitioned by nothing
        // weir can name.
        if partitioned_by.as_ref().is_some_and(|fields| fields.iter().any(|field| step.rewrites(field))) {
            partitioned_by = None;
        }
        let key = match step {
            Step::Filter(_) | Step::Set(_) | Step::Select(_) | Step::Drop(_) | Step::Explode(_) | Step::Lookup(_) => None,
            Step::Dedup(dedup) => Some(&dedup.key),
            Step::Window(window) => Some(&window.group_by),
            Step::Aggregate(aggregate) => Some(&aggregate.group_by),
            Step::Join(join) => {
                let partitioned_by = Some(join.output.partitioned_by.clone());
                match in_place {
                    true => {
                        stages[0].steps.push(index);
                        after.push((0, partitioned_by));
                    }
                    // Both inputs meet in the tasks of a new stage, routed by the join key.
                    false => {
                        stages.push(Stage { steps: vec![index], repartition_by: Some(join.on.clone()), parent: Some(0) });
                        after.push((stages.len() - 1, partitioned_by));
                    }
                }
                continue;
            }
        };
        // Records with equal keys share a task when they share the partitioning fields.
        let co_partitioned = match (key, &partitioned_by) {
            (None, _) => true,
            (Some(key), Some(fields)) => fields.iter().all(|field| key.contains(field)),
            (Some(_), None) => false,
        };
        if co_partitioned {
            stages[stage].steps.push(index);
            after.push((stage, partitioned_by));
        } else {
            stages.push(Stage { steps: vec![index], repartition_by: key.cloned(), parent: Some(stage) });
            after.push((stages.len() - 1, key.cloned()));
        }
    }
    stages
}

/// A join whose inputs are co-partitioned by its key, as (left topic, right topic): one topic
/// each, both declaring the same `partitioned_by`, made of `on` fields. Records with equal
/// keys then sit in equally numbered partitions (the partition counts are checked when the
/// topics are known).
fn co_partitioned_join(pipeline: &Pipeline) -> Option<(&str, &str)> {
    let join = pipeline.join()?;
    let (left, right) = (&pipeline.source, &join.right);
    let (SourceTopics::List(left_topics), SourceTopics::List(right_topics)) = (&left.topics, &right.topics) else {
        return None;
    };
    let ([left_topic], [right_topic]) = (left_topics.as_slice(), right_topics.as_slice()) else {
        return None;
    };
    let keyed = !left.partitioned_by.is_empty()
        && left.partitioned_by == right.partitioned_by
        && left.partitioned_by.iter().all(|field| join.on.contains(field));
    keyed.then_some((left_topic.as_str(), right_topic.as_str()))
}

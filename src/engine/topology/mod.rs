//! Tasks, repartitioning and watermarks (PIPELINE.md, "Partitioning", "Tasks", "Watermark").
//!
//! The steps are cut into stages. Stage 0 runs in one task per input partition. A keyed step
//! (dedup key, window group_by) whose key the records are not already partitioned by (the
//! source's `partitioned_by`, or the key of an earlier repartition) starts a new stage: its
//! records are routed by a hash of the key to one of as many tasks as there are input
//! partitions, as a repartition topic would route them. Each task has its own instance of
//! every step of its stage.
//!
//! The steps form a tree (outputs branch off the main steps, see [`crate::plan`]), so do the
//! stages: a record is delivered along the tree ([`Target`]s), copied where it forks, and
//! leaves as a [`Leaving`] for an output's sink or for a later stage's repartition topic.
//!
//! Watermarks: an input partition's is its max event time minus `max_out_of_orderness`; the
//! watermark of a stage-0 task is its partition's. A repartitioned stage is fed by every input
//! partition, so its tasks share the minimum over all input partitions, where one that has
//! delivered nothing holds it at -infinity. Here that minimum reaches the later stages as soon
//! as a record moves it (the in-process equivalent of watermarks travelling with the data).
//!
//! Distributed (`weir run`): a stage boundary is a repartition topic. What a stage hands to the
//! next leaves as [`Forward`]s (records, and at each batch end every changed task watermark,
//! broadcast to every partition of the topic) and comes back, maybe in another process, through
//! [`Topology::process_forwarded`]. A later-stage task's watermark is the minimum over the
//! watermarks its senders (the tasks of the stage feeding it) vouched for, once all have spoken,
//! and never goes back: it is kept in the changelog of the stage's first step.

mod delivery;
mod state;
mod topic;
mod watermarks;

use std::collections::BTreeMap;
use std::sync::Arc;

use topic::Topic;

use serde_json::{Map, Value};

use crate::operators::committed::{StateBacking, TimerChange};
use crate::operators::lookup::Tables;
use crate::operators::Step;
use crate::plan::{Pipeline, Target};
use crate::operators::{BuildError, CorruptState, Emitted, Forward, Operator, StepOutcome, ProcessError, Record, StateEntryLimit};

/// What leaves the steps: a record or tombstone for an output's sink (by output index), or a
/// forward to a later stage's repartition topic.
#[derive(Debug)]
pub enum Leaving<'a> {
    Record(usize, Record<'a>),
    /// Deletes an earlier upsert under this key in the output's sink.
    Tombstone(usize, Map<String, Value>),
    /// Boxed, as in [`Emitted`].
    Forward(Box<Forward<'a>>),
}

/// What became of the input record across all stages.
#[derive(Debug, Clone, PartialEq)]
pub enum ChainResult {
    Passed,
    Dropped,
    Duplicate,
    Late(String),
}

impl ChainResult {
    /// Keeps the most telling outcome: late over dropped (by a filter or as a duplicate)
    /// over passed.
    fn merge(&mut self, other: ChainResult) {
        match (&*self, &other) {
            (ChainResult::Late(_), _) => {}
            (_, ChainResult::Late(_)) => *self = other,
            (ChainResult::Passed, ChainResult::Dropped | ChainResult::Duplicate) => *self = other,
            _ => {}
        }
    }
}

/// An input partition: its topic, shared with every other mention of it (see
/// [`Topology::input`]: naming the input of each record must not allocate), and its number.
type InputPartition = (Topic, i32);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TaskPartition {
    Input(Topic, i32),
    Repartitioned(u32),
}

impl TaskPartition {
    /// Where the task's state goes: the owner topic its changelog entries carry (None after
    /// a repartition) and the changelog partition.
    fn changelog_place(&self) -> (Option<&str>, i32) {
        match self {
            TaskPartition::Input(topic, partition) => (Some(topic.as_ref()), *partition),
            TaskPartition::Repartitioned(partition) => (None, *partition as i32),
        }
    }
}

struct StageSpec {
    steps: Vec<Step>,
    /// Each step's index in the pipeline (what names its changelog).
    indices: Vec<usize>,
    /// The key records are routed by into this stage; None for stage 0.
    repartition_by: Option<Vec<String>>,
    /// The stage that sends records here; None for stage 0.
    parent: Option<usize>,
    /// The stages this one sends records to.
    children: Vec<usize>,
}

struct Task {
    operators: Vec<Operator>,
    /// The watermark this task's operators have been advanced to.
    watermark: i64,
    /// Distributed, after a repartition: the watermark each sender vouched for, and whether
    /// it is idle.
    senders: BTreeMap<String, (i64, bool)>,
    /// Upsert mode: the position of the last record taken from each sender (see
    /// [`Forward::position`]); a replay's copies of earlier ones are dropped.
    received: BTreeMap<String, (i64, u32)>,
}

/// How stage boundaries are crossed in production (see the module documentation).
struct Distribution {
    /// How many tasks feed each stage's tasks (index = stage; stage 0 has none).
    senders: Vec<usize>,
    /// The watermark (and idleness) each (stage, sender) last broadcast to the next stage.
    broadcast: BTreeMap<(usize, String), (i64, bool)>,
    /// Repartitioned tasks' watermarks (with their senders') last handed out for the changelog.
    saved: BTreeMap<(usize, u32), Value>,
    /// Upsert mode, without transactions: a stage-0 task that replays after a crash sends
    /// again what it sent before, so forwards carry their position and receivers drop
    /// copies.
    positioned: bool,
}

/// One changed state entry of one task, bound for the changelog of its step, in the
/// changelog partition numbered like the task's partition.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangelogEntry {
    /// The input topic of an input-partition task; None for a task after a repartition.
    pub topic: Option<String>,
    pub partition: i32,
    pub step: usize,
    pub key: String,
    pub value: Option<Value>,
}

/// A store timer of one task's step, set or cleared by a batch (see
/// [`crate::operators::committed`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TimerEntry {
    /// As in [`ChangelogEntry`].
    pub topic: Option<String>,
    pub partition: i32,
    pub step: usize,
    pub change: TimerChange,
}

/// The changelog key under which an input partition's watermark is kept, in the changelog of
/// the first stateful step (state keys are JSON, so they never look like this).
pub const WATERMARK_KEY: &str = "watermark";

pub struct Topology {
    /// Its sources (a join's two, each with its own out-of-orderness) and what each step sees.
    pipeline: Pipeline,
    stages: Vec<StageSpec>,
    /// Ordered (stage, partition), so that what tasks emit together comes out stably.
    tasks: BTreeMap<(usize, TaskPartition), Task>,
    /// Each known input partition's watermark.
    input_watermarks: BTreeMap<InputPartition, i64>,
    /// The minimum over `input_watermarks`: the watermark of every repartitioned task.
    shared_watermark: i64,
    /// The watermarks last handed out for the changelog.
    saved_watermarks: BTreeMap<InputPartition, i64>,
    width: u32,
    /// Set in production, where stages are joined by repartition topics.
    distribution: Option<Distribution>,
    /// A join run in place, (left topic, right topic): the task of left partition p also
    /// takes right partition p, and its watermark is the minimum of the two.
    in_place: Option<(String, String)>,
    /// Input partitions that delivered nothing for `idle_timeout` (the runtime decides).
    idle_inputs: std::collections::BTreeSet<InputPartition>,
    /// Every input topic met so far, each once: what [`InputPartition`]s share.
    topics: Vec<Topic>,
    /// The input record being processed, as (offset, forwards it has made so far): the
    /// position its stage-0 task's next forward carries.
    position: Option<(i64, u32)>,
    /// What the stateful steps of tasks built from now on may keep per state entry.
    state_entry_limit: StateEntryLimit,
    /// Where records go after the source (slot 0) and after each step (slot step + 1).
    targets: Vec<Vec<Target>>,
    /// Each step's stage, and its position among the stage's steps (its task's operators).
    stage_of: Vec<usize>,
    position_of: Vec<usize>,
    /// The rows every task's lookups read.
    tables: Tables,
    /// Where steps that can read their committed state in place find it (production: the
    /// local store); None keeps all state in memory.
    backing: Option<Arc<dyn StateBacking>>,
}

impl Topology {
    /// `tables`: the rows its lookups read (the engine applies the tables' records to them).
    pub fn new(pipeline: &Pipeline, mut tables: Tables) -> Result<Topology, BuildError> {
        let planned = pipeline.stages();
        let parents: Vec<Option<usize>> = planned.stages.iter().map(|stage| stage.parent).collect();
        let (mut stage_of, mut position_of) = (vec![0; pipeline.steps.len()], vec![0; pipeline.steps.len()]);
        let stages = planned
            .stages
            .into_iter()
            .enumerate()
            .map(|(number, stage)| {
                for (position, index) in stage.steps.iter().enumerate() {
                    (stage_of[*index], position_of[*index]) = (number, position);
                }
                StageSpec {
                    steps: stage.steps.iter().map(|index| pipeline.steps[*index].clone()).collect(),
                    indices: stage.steps,
                    repartition_by: stage.repartition_by,
                    parent: stage.parent,
                    children: (0..parents.len()).filter(|child| parents[*child] == Some(number)).collect(),
                }
            })
            .collect();
        let targets = std::iter::once(None).chain((0..pipeline.steps.len()).map(Some)).map(|from| pipeline.targets(from)).collect();
        // Every step must build (expressions compile) before any record arrives.
        for (index, step) in pipeline.steps.iter().enumerate() {
            Operator::build(step, &pipeline.schema_seen_by(index), StateEntryLimit::default(), &mut tables)?;
        }
        Ok(Topology {
            pipeline: pipeline.clone(),
            stages,
            tasks: BTreeMap::new(),
            input_watermarks: BTreeMap::new(),
            shared_watermark: i64::MIN,
            saved_watermarks: BTreeMap::new(),
            width: 1,
            distribution: None,
            in_place: planned.join_in_place,
            idle_inputs: Default::default(),
            topics: Vec::new(),
            position: None,
            state_entry_limit: StateEntryLimit::default(),
            targets,
            stage_of,
            position_of,
            tables,
            backing: None,
        })
    }

    /// See `Engine::set_state_entry_limit`.
    pub fn set_state_entry_limit(&mut self, limit: StateEntryLimit) {
        self.state_entry_limit = limit;
    }

    /// From now on, tasks' steps that can read their committed state through `backing` do.
    pub fn set_backing(&mut self, backing: Arc<dyn StateBacking>) {
        self.backing = Some(backing);
    }

    /// Whether `step` (a pipeline index) reads its committed state through the backing.
    pub fn reads_through_store(&self, step: usize) -> bool {
        self.backing.is_some() && self.pipeline.steps.get(step).is_some_and(Step::reads_through_store)
    }

    /// The store timer a committed entry of `step` needs, where it reads through the store.
    pub fn timer_of(&self, step: usize, key: &str, value: &[u8]) -> Option<i64> {
        self.pipeline.steps.get(step)?.timer_of(key, value)
    }

    /// The join run in place, as (left topic, right topic); None when it is repartitioned
    /// (or there is none).
    pub fn join_in_place(&self) -> Option<(&str, &str)> {
        self.in_place.as_ref().map(|(left, right)| (left.as_str(), right.as_str()))
    }

    /// The stage-0 task an input partition feeds: its own, or for a join run in place, the
    /// pair's (named by the left partition).
    fn task_of_input(&self, topic: &str, partition: i32) -> TaskPartition {
        let (topic, partition) = self.input(self.task_topic(topic), partition);
        TaskPartition::Input(topic, partition)
    }

    /// The topic that names the task `topic`'s partitions feed: its own, or for the right
    /// side of a join run in place, the left's.
    fn task_topic<'t>(&'t self, topic: &'t str) -> &'t str {
        match &self.in_place {
            Some((left, right)) if right == topic => left,
            _ => topic,
        }
    }

    /// The input partitions that feed a stage-0 task.
    fn inputs_of_task(&self, topic: &str, partition: i32) -> Vec<InputPartition> {
        match &self.in_place {
            Some((left, right)) if left == topic || right == topic => vec![self.input(left, partition), self.input(right, partition)],
            _ => vec![self.input(topic, partition)],
        }
    }

    /// `topic`'s `partition`, naming the topic as every other mention of it does (without
    /// allocating, once the topic has been met: see [`Topology::meet`]).
    fn input(&self, topic: &str, partition: i32) -> InputPartition {
        let shared = self.topics.iter().find(|known| known.is(topic)).cloned();
        (shared.unwrap_or_else(|| Topic::new(topic)), partition)
    }

    /// `topic`'s `partition`, the topic from now on shared by every mention of it.
    fn meet(&mut self, topic: &str, partition: i32) -> InputPartition {
        if !self.topics.iter().any(|known| known.is(topic)) {
            self.topics.push(Topic::new(topic));
        }
        self.input(topic, partition)
    }

    /// The input partition that names the task `topic`'s partition feeds (the left one of a
    /// pair); its state is restored and dropped as one.
    pub fn task_input(&self, topic: &str, partition: i32) -> (String, i32) {
        (self.task_topic(topic).to_string(), partition)
    }

    /// The topics whose changelog entries make up the state of the task `topic` feeds.
    pub fn task_topics(&self, topic: &str) -> Vec<String> {
        self.inputs_of_task(topic, 0).into_iter().map(|(topic, _)| topic.to_string()).collect()
    }

    /// A stage-0 task's watermark: the minimum over its input partitions (one that has
    /// delivered nothing holds it at -infinity), leaving out idle ones unless all are.
    fn input_task_watermark(&self, topic: &str, partition: i32) -> i64 {
        let watermark = |input: &InputPartition| self.input_watermarks.get(input).copied().unwrap_or(i64::MIN);
        match &self.in_place {
            Some((left, right)) if left == topic || right == topic => {}
            // One input: its own watermark, without building a list (called for every record).
            _ => return watermark(&self.input(topic, partition)),
        }
        let inputs = self.inputs_of_task(topic, partition);
        let active = inputs.iter().filter(|input| !self.idle_inputs.contains(*input)).map(watermark).min();
        active.unwrap_or_else(|| inputs.iter().map(watermark).min().unwrap_or(i64::MIN))
    }

    /// Production mode: stages hand records on through repartition topics of `width`
    /// partitions, read from `input_partitions` input partitions in all. `positioned`:
    /// without transactions, forwards carry positions so that replays are dropped.
    pub fn distribute(&mut self, width: u32, input_partitions: usize, positioned: bool) {
        self.width = width.max(1);
        // A stage fed by stage 0 hears from every stage-0 task: one per input partition, or
        // per pair of a join in place (whose sources have `width` partitions each).
        let pairs = if self.in_place.is_some() { self.width as usize } else { 0 };
        let senders = self
            .stages
            .iter()
            .map(|stage| match stage.parent {
                None => 0,
                Some(0) => input_partitions.saturating_sub(pairs),
                Some(_) => self.width as usize,
            })
            .collect();
        self.distribution = Some(Distribution { senders, broadcast: BTreeMap::new(), saved: BTreeMap::new(), positioned });
    }

    /// Whether an input partition is currently counted as idle.
    pub fn is_idle_input(&self, topic: &str, partition: i32) -> bool {
        self.idle_inputs.contains(&self.input(topic, partition))
    }

    /// The input partitions that have been idle for `idle_timeout`; they stop holding back
    /// the watermarks of a join's pair tasks and of the later stages until their next record
    /// (the batch end moves what this frees).
    pub fn set_idle_inputs(&mut self, idle: impl IntoIterator<Item = (String, i32)>) {
        self.idle_inputs = idle.into_iter().map(|(topic, partition)| self.meet(&topic, partition)).collect();
    }

    /// The stateful steps whose state belongs to the tasks of `stage`.
    pub fn stage_stateful_steps(&self, stage: usize) -> Vec<usize> {
        self.stages.get(stage).map_or_else(Vec::new, |spec| {
            spec.steps.iter().zip(&spec.indices).filter(|(step, _)| step.is_stateful()).map(|(_, index)| *index).collect()
        })
    }

    pub fn set_input_partitions(&mut self, partitions: impl IntoIterator<Item = (String, i32)>) {
        for (topic, partition) in partitions {
            let input = self.meet(&topic, partition);
            self.input_watermarks.entry(input).or_insert(i64::MIN);
        }
        if self.distribution.is_none() {
            self.width = (self.input_watermarks.len() as u32).max(1);
        }
        self.shared_watermark = self.minimum_input_watermark();
    }

    /// How many stages (1 + repartitions) the steps form.
    pub fn stage_count(&self) -> usize {
        self.stages.len()
    }

    /// The pipeline indices of the stateful steps, which have changelogs.
    pub fn stateful_steps(&self) -> Vec<usize> {
        self.pipeline.stateful_steps()
    }

    /// Runs an input record from its input partition through every stage, then moves the
    /// watermarks it moved.
    pub fn process<'a>(
        &mut self,
        record: Record<'a>,
        topic: &str,
        partition: i32,
        event_time: Option<i64>,
        out: &mut Vec<Leaving<'a>>,
    ) -> Result<ChainResult, ProcessError> {
        let input = self.input(topic, partition);
        if !self.input_watermarks.contains_key(&input) {
            self.set_input_partitions([(topic.to_string(), partition)]);
        }
        if !self.idle_inputs.is_empty() {
            self.idle_inputs.remove(&input);
        }
        // One input per task (no join in place): the task is named by the input, and a task
        // not made yet (a pipeline without steps makes none) starts at the input's watermark,
        // found without looking up the topic again (this runs for every record).
        let (task, watermark) = match &self.in_place {
            None => {
                let task = TaskPartition::Input(input.0.clone(), partition);
                let watermark = match self.tasks.get(&(0, task.clone())) {
                    Some(task) => task.watermark,
                    None => self.input_watermarks.get(&input).copied().unwrap_or(i64::MIN),
                };
                (task, watermark)
            }
            Some(_) => {
                let task = self.task_of_input(topic, partition);
                let watermark = self.task_watermark(0, &task);
                (task, watermark)
            }
        };
        let mut result = ChainResult::Passed;
        self.position = record.provenance.map(|provenance| (provenance.offset, 0));
        self.deliver(0, &task, None, Emitted::Record(record), watermark, out, &mut result)?;

        // The record is in; now the watermarks move and close what they close.
        let Some(time) = event_time else {
            return Ok(result);
        };
        let candidate = time.saturating_sub(self.out_of_orderness(topic));
        // One lookup: the watermark moves for most records of an input in time order.
        let moved = match self.input_watermarks.get_mut(&input) {
            Some(current) if candidate > *current => {
                *current = candidate;
                true
            }
            Some(_) => false,
            None => self.input_watermarks.insert(input, candidate).is_none(),
        };
        if moved {
            let watermark = match self.in_place {
                Some(_) => self.input_task_watermark(topic, partition),
                None => candidate,
            };
            self.advance_task(0, &task, watermark, out);
            let shared = self.minimum_input_watermark();
            if shared > self.shared_watermark && self.distribution.is_none() {
                self.shared_watermark = shared;
                self.advance_stages_from(1, shared, out);
            }
        }
        Ok(result)
    }

    /// A record (or a watermark alone) that reached a later stage through its repartition
    /// topic, from `sender`, which vouched for `watermark`.
    #[allow(clippy::too_many_arguments)]
    pub fn process_forwarded<'a>(
        &mut self,
        stage: usize,
        partition: i32,
        sender: &str,
        watermark: i64,
        idle: bool,
        record: Option<Record<'a>>,
        position: Option<(i64, u32)>,
        out: &mut Vec<Leaving<'a>>,
    ) -> Result<ChainResult, ProcessError> {
        if stage == 0 || stage >= self.stages.len() {
            return Err(ProcessError(format!("a forwarded record for stage {stage}, which this pipeline does not have")));
        }
        let id = TaskPartition::Repartitioned(partition as u32);
        let mut result = ChainResult::Passed;
        // A sender replaying after a crash (upsert mode) sends again what this task took.
        let replayed = match position {
            Some(position) => {
                let task = self.task(stage, &id)?;
                let taken = task.received.get(sender).is_some_and(|last| *last >= position);
                if !taken {
                    task.received.insert(sender.to_string(), position);
                }
                taken
            }
            None => false,
        };
        if let (Some(record), false) = (record, replayed) {
            self.enter(stage, &id, record, out, &mut result)?;
        }
        let expected = self.distribution.as_ref().map_or(0, |distribution| distribution.senders[stage]);
        let task = self.task(stage, &id)?;
        let known = task.senders.entry(sender.to_string()).or_insert((i64::MIN, false));
        *known = (known.0.max(watermark), idle);
        // Every sender must have spoken; idle ones do not count (all idle: nothing moves).
        let candidate = match task.senders.len() >= expected {
            true => task.senders.values().filter(|(_, idle)| !idle).map(|(watermark, _)| *watermark).min().unwrap_or(i64::MIN),
            false => i64::MIN,
        };
        self.advance_task(stage, &id, candidate, out);
        Ok(result)
    }

    fn task_watermark(&self, stage: usize, id: &TaskPartition) -> i64 {
        match id {
            // The task's own, which never goes back (a pair's inputs' minimum can, when an
            // idle side speaks again); a task not made yet starts at its inputs'.
            TaskPartition::Input(topic, partition) if stage == 0 => match self.tasks.get(&(0, id.clone())) {
                Some(task) => task.watermark,
                None => self.input_task_watermark(topic, *partition),
            },
            _ if self.distribution.is_some() => self.tasks.get(&(stage, id.clone())).map_or(i64::MIN, |task| task.watermark),
            _ => self.shared_watermark,
        }
    }

    /// The `max_out_of_orderness` of the source that reads `topic`, in milliseconds.
    fn out_of_orderness(&self, topic: &str) -> i64 {
        let source = self.pipeline.source_of_topic(topic);
        source.watermark.as_ref().map_or(0, |watermark| crate::config::millis(watermark.max_out_of_orderness))
    }

    fn task(&mut self, stage: usize, id: &TaskPartition) -> Result<&mut Task, ProcessError> {
        let key = (stage, id.clone());
        if !self.tasks.contains_key(&key) {
            let spec = &self.stages[stage];
            let operators = spec
                .steps
                .iter()
                .zip(&spec.indices)
                .map(|(step, index)| Operator::build(step, &self.pipeline.schema_seen_by(*index), self.state_entry_limit, &mut self.tables))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| ProcessError(error.0))?;
            let mut operators = operators;
            if let Some(backing) = &self.backing {
                let (owner, partition) = id.changelog_place();
                for ((operator, step), index) in operators.iter_mut().zip(&spec.steps).zip(&spec.indices) {
                    if step.reads_through_store() {
                        operator.read_through(backing.view(*index, partition, owner));
                    }
                }
            }
            let watermark = self.task_watermark(stage, id);
            self.tasks.insert(key.clone(), Task { operators, watermark, senders: BTreeMap::new(), received: BTreeMap::new() });
        }
        self.tasks.get_mut(&key).ok_or_else(|| ProcessError("task vanished".into()))
    }
}

/// How a stage-0 task names itself to the tasks it forwards to.
fn input_sender(topic: &str, partition: i32) -> String {
    format!("{topic}:{partition}")
}

/// The first stateful step of a stage (a repartitioned stage starts with one).
fn stage_first_stateful(stage: &StageSpec) -> Option<usize> {
    stage.steps.iter().zip(&stage.indices).find(|(step, _)| step.is_stateful()).map(|(_, index)| *index)
}


#[cfg(test)]
mod tests;

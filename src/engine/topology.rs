//! Tasks, repartitioning and watermarks (PIPELINE.md, "Partitioning", "Tasks", "Watermark").
//!
//! The steps are cut into stages. Stage 0 runs in one task per input partition. A keyed step
//! (dedup key, window group_by) whose key the records are not already partitioned by (the
//! source's `partitioned_by`, or the key of an earlier repartition) starts a new stage: its
//! records are routed by a hash of the key to one of as many tasks as there are input
//! partitions, as a repartition topic would route them. Each task has its own instance of
//! every step of its stage.
//!
//! Watermarks: an input partition's is its max event time minus `max_out_of_orderness`; the
//! watermark of a stage-0 task is its partition's. A repartitioned stage is fed by every input
//! partition, so its tasks share the minimum over all input partitions, where one that has
//! delivered nothing holds it at -infinity. Here that minimum reaches the later stages as soon
//! as a record moves it (the in-process equivalent of watermarks travelling with the data).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::config::{Pipeline, Source, Step};
use crate::operators::{key_of, Emitted, Operator, Outcome, ProcessError, Record};

/// What became of the input record across all stages.
#[derive(Debug, Clone, PartialEq)]
pub enum ChainResult {
    Passed,
    Dropped,
    Late(String),
}

impl ChainResult {
    /// Keeps the most telling outcome: late over dropped over passed.
    fn merge(&mut self, other: ChainResult) {
        match (&*self, &other) {
            (ChainResult::Late(_), _) => {}
            (_, ChainResult::Late(_)) => *self = other,
            (ChainResult::Passed, ChainResult::Dropped) => *self = other,
            _ => {}
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TaskPartition {
    Input(String, i32),
    Repartitioned(u32),
}

struct StageSpec {
    steps: Vec<Step>,
    /// Each step's index in the pipeline (what names its changelog).
    indices: Vec<usize>,
    /// The key records are routed by into this stage; None for stage 0.
    repartition_by: Option<Vec<String>>,
}

struct Task {
    operators: Vec<Operator>,
    /// The watermark this task's operators have been advanced to.
    watermark: i64,
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

/// The changelog key under which an input partition's watermark is kept, in the changelog of
/// the first stateful step (state keys are JSON, so they never look like this).
pub const WATERMARK_KEY: &str = "watermark";

pub struct Topology {
    source: Source,
    max_out_of_orderness: i64,
    stages: Vec<StageSpec>,
    /// Ordered (stage, partition), so that what tasks emit together comes out stably.
    tasks: BTreeMap<(usize, TaskPartition), Task>,
    /// Each known input partition's watermark.
    input_watermarks: BTreeMap<(String, i32), i64>,
    /// The minimum over `input_watermarks`: the watermark of every repartitioned task.
    shared_watermark: i64,
    /// The watermarks last handed out for the changelog.
    saved_watermarks: BTreeMap<(String, i32), i64>,
    width: u32,
}

impl Topology {
    pub fn new(pipeline: &Pipeline) -> Result<Topology, String> {
        let source = &pipeline.source;
        let mut stages = vec![StageSpec { steps: Vec::new(), indices: Vec::new(), repartition_by: None }];
        let mut partitioned_by: Option<Vec<String>> =
            (!source.partitioned_by.is_empty()).then(|| source.partitioned_by.clone());
        for (index, step) in pipeline.steps.iter().enumerate() {
            let key = match step {
                Step::Filter(_) => None,
                Step::Dedup(dedup) => Some(&dedup.key),
                Step::Window(window) => Some(&window.group_by),
            };
            // Records with equal keys share a task when they share the partitioning fields.
            let co_partitioned = match (key, &partitioned_by) {
                (None, _) => true,
                (Some(key), Some(fields)) => fields.iter().all(|field| key.contains(field)),
                (Some(_), None) => false,
            };
            if co_partitioned {
                if let Some(stage) = stages.last_mut() {
                    stage.steps.push(step.clone());
                    stage.indices.push(index);
                }
            } else {
                stages.push(StageSpec { steps: vec![step.clone()], indices: vec![index], repartition_by: key.cloned() });
                partitioned_by = key.cloned();
            }
        }
        // Every step must build (expressions compile) before any record arrives.
        for step in &pipeline.steps {
            Operator::build(step, source)?;
        }
        Ok(Topology {
            source: source.clone(),
            max_out_of_orderness: source
                .watermark
                .as_ref()
                .map_or(0, |watermark| watermark.max_out_of_orderness.as_millis() as i64),
            stages,
            tasks: BTreeMap::new(),
            input_watermarks: BTreeMap::new(),
            shared_watermark: i64::MIN,
            saved_watermarks: BTreeMap::new(),
            width: 1,
        })
    }

    pub fn set_input_partitions(&mut self, partitions: impl IntoIterator<Item = (String, i32)>) {
        for partition in partitions {
            self.input_watermarks.entry(partition).or_insert(i64::MIN);
        }
        self.width = (self.input_watermarks.len() as u32).max(1);
        self.shared_watermark = self.minimum_input_watermark();
    }

    pub fn describe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for stage in &self.stages {
            if let Some(key) = &stage.repartition_by {
                lines.push(format!("repartition by [{}]", key.join(", ")));
            }
            for step in &stage.steps {
                // Steps were checked to build in `new`.
                if let Ok(operator) = Operator::build(step, &self.source) {
                    lines.push(operator.describe());
                }
            }
        }
        lines
    }

    /// How many stages (1 + repartitions) the steps form.
    pub fn stage_count(&self) -> usize {
        self.stages.len()
    }

    /// The pipeline indices of the stateful steps, which have changelogs.
    pub fn stateful_steps(&self) -> Vec<usize> {
        self.stages
            .iter()
            .flat_map(|stage| stage.steps.iter().zip(&stage.indices))
            .filter(|(step, _)| step.is_stateful())
            .map(|(_, index)| *index)
            .collect()
    }

    /// State entries changed since the last call, for every task, with each changed input
    /// watermark. Call after `end_batch`.
    pub fn take_changes(&mut self) -> Vec<ChangelogEntry> {
        let Some(first_stateful) = self.stateful_steps().first().copied() else {
            return Vec::new();
        };
        let mut entries = Vec::new();
        for ((stage, id), task) in self.tasks.iter_mut() {
            let (topic, partition) = match id {
                TaskPartition::Input(topic, partition) => (Some(topic.clone()), *partition),
                TaskPartition::Repartitioned(partition) => (None, *partition as i32),
            };
            for (operator, step) in task.operators.iter_mut().zip(&self.stages[*stage].indices) {
                for change in operator.take_changes() {
                    entries.push(ChangelogEntry {
                        topic: topic.clone(),
                        partition,
                        step: *step,
                        key: change.key,
                        value: change.value,
                    });
                }
            }
        }
        for ((topic, partition), watermark) in &self.input_watermarks {
            let input = (topic.clone(), *partition);
            if *watermark > i64::MIN && self.saved_watermarks.get(&input) != Some(watermark) {
                self.saved_watermarks.insert(input, *watermark);
                entries.push(ChangelogEntry {
                    topic: Some(topic.clone()),
                    partition: *partition,
                    step: first_stateful,
                    key: WATERMARK_KEY.into(),
                    value: Some(Value::from(*watermark)),
                });
            }
        }
        entries
    }

    /// Puts back one changelog entry.
    pub fn restore(&mut self, entry_topic: Option<&str>, partition: i32, step: usize, key: &str, value: Option<&Value>) -> Result<(), String> {
        if key == WATERMARK_KEY {
            let topic = entry_topic.ok_or("a watermark entry without its input topic")?;
            let input = (topic.to_string(), partition);
            let watermark = value.and_then(Value::as_i64).unwrap_or(i64::MIN);
            self.input_watermarks.insert(input.clone(), watermark);
            self.saved_watermarks.insert(input.clone(), watermark);
            if let Some(task) = self.tasks.get_mut(&(0, TaskPartition::Input(input.0, input.1))) {
                task.watermark = watermark;
            }
            self.shared_watermark = self.minimum_input_watermark();
            return Ok(());
        }
        let Some((stage, position)) = self
            .stages
            .iter()
            .enumerate()
            .find_map(|(stage, spec)| spec.indices.iter().position(|index| *index == step).map(|position| (stage, position)))
        else {
            return Err(format!("a changelog entry of step {step}, which this pipeline does not have"));
        };
        let id = match (stage, entry_topic) {
            (0, Some(topic)) => TaskPartition::Input(topic.to_string(), partition),
            (stage, None) if stage > 0 => TaskPartition::Repartitioned(partition as u32),
            _ => return Err(format!("a changelog entry of step {step} for the wrong kind of task")),
        };
        let task = self.task(stage, &id).map_err(|error| error.0)?;
        task.operators[position].restore(key, value)
    }

    /// Forgets an input partition's tasks and watermark (it was revoked, or its uncommitted
    /// state must be replaced from the changelog).
    pub fn drop_input_partition(&mut self, topic: &str, partition: i32) {
        let input = (topic.to_string(), partition);
        self.tasks.remove(&(0, TaskPartition::Input(input.0.clone(), input.1)));
        self.input_watermarks.remove(&input);
        self.saved_watermarks.remove(&input);
        self.shared_watermark = self.minimum_input_watermark();
    }

    pub fn state_keys(&self) -> usize {
        self.tasks.values().flat_map(|task| &task.operators).map(Operator::state_keys).sum()
    }

    /// Runs an input record from its input partition through every stage, then moves the
    /// watermarks it moved.
    pub fn process<'a>(
        &mut self,
        record: Record<'a>,
        topic: &str,
        partition: i32,
        event_time: Option<i64>,
        out: &mut Vec<Emitted<'a>>,
    ) -> Result<ChainResult, ProcessError> {
        let input = (topic.to_string(), partition);
        if !self.input_watermarks.contains_key(&input) {
            self.set_input_partitions([input.clone()]);
        }
        let task = TaskPartition::Input(input.0.clone(), input.1);
        let mut result = ChainResult::Passed;
        self.run(0, task.clone(), Emitted::Record(record), out, &mut result)?;

        // The record is in; now the watermarks move and close what they close.
        let Some(time) = event_time else {
            return Ok(result);
        };
        let candidate = time.saturating_sub(self.max_out_of_orderness);
        let current = self.input_watermarks.get(&input).copied().unwrap_or(i64::MIN);
        if candidate > current {
            self.input_watermarks.insert(input, candidate);
            self.advance_task(0, &task, candidate, out);
            let shared = self.minimum_input_watermark();
            if shared > self.shared_watermark {
                self.shared_watermark = shared;
                self.advance_stages_from(1, shared, out);
            }
        }
        Ok(result)
    }

    /// The end of a batch: update-mode steps emit, stage by stage.
    pub fn end_batch<'a>(&mut self, out: &mut Vec<Emitted<'a>>) {
        for stage in 0..self.stages.len() {
            let ids: Vec<TaskPartition> = self.task_ids(stage);
            for id in ids {
                self.for_each_step(stage, &id, out, |operator, produced| operator.commit(produced));
            }
        }
    }

    /// The end of a bounded input: every watermark reaches +infinity.
    pub fn finish<'a>(&mut self, out: &mut Vec<Emitted<'a>>) {
        for watermark in self.input_watermarks.values_mut() {
            *watermark = i64::MAX;
        }
        for id in self.task_ids(0) {
            self.advance_task(0, &id, i64::MAX, out);
        }
        self.shared_watermark = i64::MAX;
        self.advance_stages_from(1, i64::MAX, out);
        self.end_batch(out);
    }

    fn minimum_input_watermark(&self) -> i64 {
        self.input_watermarks.values().copied().min().unwrap_or(i64::MIN)
    }

    fn task_ids(&self, stage: usize) -> Vec<TaskPartition> {
        self.tasks.keys().filter(|(task_stage, _)| *task_stage == stage).map(|(_, id)| id.clone()).collect()
    }

    fn advance_stages_from<'a>(&mut self, first: usize, watermark: i64, out: &mut Vec<Emitted<'a>>) {
        for stage in first..self.stages.len() {
            for id in self.task_ids(stage) {
                self.advance_task(stage, &id, watermark, out);
            }
        }
    }

    fn advance_task<'a>(&mut self, stage: usize, id: &TaskPartition, watermark: i64, out: &mut Vec<Emitted<'a>>) {
        let Some(task) = self.tasks.get_mut(&(stage, id.clone())) else {
            return;
        };
        if watermark <= task.watermark {
            return;
        }
        task.watermark = watermark;
        self.for_each_step(stage, id, out, |operator, produced| operator.advance(watermark, produced));
    }

    /// Calls `action` on each step of a task in order; what a step produces goes through the
    /// steps after it and on to the next stages.
    fn for_each_step<'a>(
        &mut self,
        stage: usize,
        id: &TaskPartition,
        out: &mut Vec<Emitted<'a>>,
        action: impl Fn(&mut Operator, &mut Vec<Emitted<'a>>),
    ) {
        let steps = self.stages[stage].steps.len();
        for index in 0..steps {
            let mut produced = Vec::new();
            let Some(task) = self.tasks.get_mut(&(stage, id.clone())) else {
                return;
            };
            action(&mut task.operators[index], &mut produced);
            let watermark = task.watermark;
            for item in produced {
                let mut ignored = ChainResult::Passed;
                // Results a step derives on its own (closed windows) have no input record to
                // send to the DLQ; a failure or lateness downstream drops them.
                let _ = self.run_from(stage, id.clone(), index + 1, item, watermark, out, &mut ignored);
            }
        }
    }

    /// Runs `item` through the whole of `stage` in task `id`, then routes what comes out.
    fn run<'a>(
        &mut self,
        stage: usize,
        id: TaskPartition,
        item: Emitted<'a>,
        out: &mut Vec<Emitted<'a>>,
        result: &mut ChainResult,
    ) -> Result<(), ProcessError> {
        let watermark = self.task_watermark(stage, &id);
        self.run_from(stage, id, 0, item, watermark, out, result)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_from<'a>(
        &mut self,
        stage: usize,
        id: TaskPartition,
        first_step: usize,
        item: Emitted<'a>,
        watermark: i64,
        out: &mut Vec<Emitted<'a>>,
        result: &mut ChainResult,
    ) -> Result<(), ProcessError> {
        let task = self.task(stage, &id)?;
        let mut current = vec![item];
        for operator in task.operators.iter_mut().skip(first_step) {
            let mut next = Vec::new();
            for item in current.drain(..) {
                match item {
                    // Tombstones delete earlier upserts downstream; no step reinterprets them.
                    Emitted::Tombstone(_) => next.push(item),
                    Emitted::Record(record) => match operator.process(record, watermark, &mut next)? {
                        Outcome::Passed => {}
                        Outcome::Dropped => result.merge(ChainResult::Dropped),
                        Outcome::Late(reason) => result.merge(ChainResult::Late(reason)),
                    },
                }
            }
            current = next;
            if current.is_empty() {
                return Ok(());
            }
        }
        self.route(stage + 1, current, out, result)
    }

    /// Sends what a stage produced to the next stage's tasks by key, or out after the last.
    fn route<'a>(
        &mut self,
        stage: usize,
        items: Vec<Emitted<'a>>,
        out: &mut Vec<Emitted<'a>>,
        result: &mut ChainResult,
    ) -> Result<(), ProcessError> {
        let Some(spec) = self.stages.get(stage) else {
            out.extend(items);
            return Ok(());
        };
        let key_fields = spec.repartition_by.clone().unwrap_or_default();
        for item in items {
            let record = match item {
                Emitted::Tombstone(_) => {
                    out.push(item);
                    continue;
                }
                Emitted::Record(record) => record,
            };
            let key = Value::Object(key_of(&record.fields, &key_fields)).to_string();
            let id = TaskPartition::Repartitioned((fnv1a(key.as_bytes()) % u64::from(self.width)) as u32);
            self.run(stage, id, Emitted::Record(record), out, result)?;
        }
        Ok(())
    }

    fn task_watermark(&self, stage: usize, id: &TaskPartition) -> i64 {
        match id {
            TaskPartition::Input(topic, partition) if stage == 0 => {
                self.input_watermarks.get(&(topic.clone(), *partition)).copied().unwrap_or(i64::MIN)
            }
            _ => self.shared_watermark,
        }
    }

    fn task(&mut self, stage: usize, id: &TaskPartition) -> Result<&mut Task, ProcessError> {
        let key = (stage, id.clone());
        if !self.tasks.contains_key(&key) {
            let operators = self.stages[stage]
                .steps
                .iter()
                .map(|step| Operator::build(step, &self.source))
                .collect::<Result<Vec<_>, _>>()
                .map_err(ProcessError)?;
            let watermark = self.task_watermark(stage, id);
            self.tasks.insert(key.clone(), Task { operators, watermark });
        }
        self.tasks.get_mut(&key).ok_or_else(|| ProcessError("task vanished".into()))
    }
}

/// A stable hash for routing keys (the same on every run and machine).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

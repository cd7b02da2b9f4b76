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
    /// The key records are routed by into this stage; None for stage 0.
    repartition_by: Option<Vec<String>>,
}

struct Task {
    operators: Vec<Operator>,
    /// The watermark this task's operators have been advanced to.
    watermark: i64,
}

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
    width: u32,
}

impl Topology {
    pub fn new(pipeline: &Pipeline) -> Result<Topology, String> {
        let source = &pipeline.source;
        let mut stages = vec![StageSpec { steps: Vec::new(), repartition_by: None }];
        let mut partitioned_by: Option<Vec<String>> =
            (!source.partitioned_by.is_empty()).then(|| source.partitioned_by.clone());
        for step in &pipeline.steps {
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
                }
            } else {
                stages.push(StageSpec { steps: vec![step.clone()], repartition_by: key.cloned() });
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

//! How a record moves along the tree of steps inside the topology: through each step of its
//! task, copied where the tree forks, into the task of a later stage that owns its key (or
//! out as a forward, distributed), and out to the outputs.

use super::*;
use crate::operators::record_key::key_text_of;

impl Topology {
    /// Calls `action` on each step of a task in order; what a step produces goes through the
    /// steps after it and on to the next stages and the outputs.
    pub(super) fn for_each_step<'a>(
        &mut self,
        stage: usize,
        id: &TaskPartition,
        out: &mut Vec<Leaving<'a>>,
        action: impl Fn(&mut Operator, &mut Vec<Emitted<'a>>),
    ) {
        for position in 0..self.stages[stage].indices.len() {
            // Only a step with state does anything as time moves or a batch ends; a filter's
            // task is not looked up again for each record that moves the watermark.
            if !self.stages[stage].steps[position].is_stateful() {
                continue;
            }
            let step = self.stages[stage].indices[position];
            let mut produced = Vec::new();
            let Some(task) = self.tasks.get_mut(&(stage, id.clone())) else {
                return;
            };
            action(&mut task.operators[position], &mut produced);
            let watermark = task.watermark;
            for item in produced {
                let mut ignored = ChainResult::Passed;
                // Results a step derives on its own (closed windows) have no input record to
                // send to the DLQ; a failure or lateness downstream drops them.
                let _ = self.deliver(stage, id, Some(step), item, watermark, out, &mut ignored);
            }
        }
    }

    /// Runs a record that reached task `id` of a later stage through the stage's first step.
    pub(super) fn enter<'a>(
        &mut self,
        stage: usize,
        id: &TaskPartition,
        record: Record<'a>,
        out: &mut Vec<Leaving<'a>>,
        result: &mut ChainResult,
    ) -> Result<(), ProcessError> {
        let Some(first) = self.stages.get(stage).and_then(|spec| spec.indices.first().copied()) else {
            return Err(ProcessError(format!("stage {stage} has no steps")));
        };
        let watermark = self.task_watermark(stage, id);
        self.run_step(stage, id, first, record, watermark, out, result)
    }

    /// Hands `item`, made by step `from` (None: read from the source) in task (`stage`, `id`),
    /// to every target after it: the steps it feeds (moving to their task when they run in
    /// another stage) and the outputs whose last step it is. Several targets get copies.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn deliver<'a>(
        &mut self,
        stage: usize,
        id: &TaskPartition,
        from: Option<usize>,
        item: Emitted<'a>,
        watermark: i64,
        out: &mut Vec<Leaving<'a>>,
        result: &mut ChainResult,
    ) -> Result<(), ProcessError> {
        let slot = from.map_or(0, |step| step + 1);
        let count = self.targets[slot].len();
        let mut item = Some(item);
        for index in 0..count {
            let target = self.targets[slot][index];
            let copy = if index + 1 == count { item.take() } else { item.clone() };
            let Some(copy) = copy else {
                break;
            };
            match (target, copy) {
                (_, Emitted::Forward(forward)) => out.push(Leaving::Forward(forward)),
                (Target::Output(output), Emitted::Record(record)) => out.push(Leaving::Record(output, record)),
                (Target::Output(output), Emitted::Tombstone(key)) => out.push(Leaving::Tombstone(output, key)),
                // Tombstones delete earlier upserts downstream; no step reinterprets them.
                (Target::Step(step), tombstone @ Emitted::Tombstone(_)) => {
                    self.deliver(stage, id, Some(step), tombstone, watermark, out, result)?;
                }
                (Target::Step(step), Emitted::Record(record)) if self.stage_of[step] != stage => {
                    self.route(self.stage_of[step], id, watermark, record, out, result)?;
                }
                (Target::Step(step), Emitted::Record(record)) => self.run_step(stage, id, step, record, watermark, out, result)?,
            }
        }
        Ok(())
    }

    /// Runs a record through step `step` of task (`stage`, `id`), then hands on what it made.
    #[allow(clippy::too_many_arguments)]
    fn run_step<'a>(
        &mut self,
        stage: usize,
        id: &TaskPartition,
        step: usize,
        record: Record<'a>,
        watermark: i64,
        out: &mut Vec<Leaving<'a>>,
        result: &mut ChainResult,
    ) -> Result<(), ProcessError> {
        let position = self.position_of[step];
        let task = self.task(stage, id)?;
        let mut produced = Vec::new();
        match task.operators[position].process(record, watermark, &mut produced)? {
            StepOutcome::Passed => {}
            StepOutcome::Dropped => result.merge(ChainResult::Dropped),
            StepOutcome::Duplicate => result.merge(ChainResult::Duplicate),
            StepOutcome::Late(reason) => result.merge(ChainResult::Late(reason)),
        }
        for item in produced {
            self.deliver(stage, id, Some(step), item, watermark, out, result)?;
        }
        Ok(())
    }

    /// Sends a record into task of `stage` that owns its key. Distributed, it leaves as a
    /// forward from task `from`, stamped with its watermark.
    fn route<'a>(
        &mut self,
        stage: usize,
        from: &TaskPartition,
        watermark: i64,
        record: Record<'a>,
        out: &mut Vec<Leaving<'a>>,
        result: &mut ChainResult,
    ) -> Result<(), ProcessError> {
        let key_fields = self.stages[stage].repartition_by.as_deref().unwrap_or_default();
        // The key map's text, written without the map: its hash places the record.
        let key = key_text_of(&record.fields, key_fields);
        let partition = (crate::plan::stable_hash(key.as_bytes()) % u64::from(self.width)) as u32;
        if let Some(distribution) = &self.distribution {
            let (sender, position) = match from {
                TaskPartition::Input(topic, partition) => {
                    let position = self.position.filter(|_| distribution.positioned);
                    if let Some((offset, made)) = position {
                        self.position = Some((offset, made + 1));
                    }
                    (input_sender(topic, *partition), position)
                }
                TaskPartition::Repartitioned(partition) => (partition.to_string(), None),
            };
            out.push(Leaving::Forward(Box::new(Forward { stage, partition, sender, watermark, idle: false, record: Some(record), position })));
            return Ok(());
        }
        self.enter(stage, &TaskPartition::Repartitioned(partition), record, out, result)
    }
}

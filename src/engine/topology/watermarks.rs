//! How watermarks move between batches: the batch end, the broadcast of changed task
//! watermarks to the next stage, the end of a bounded input, and advancing tasks.

use super::*;

impl Topology {
    /// The end of a batch: update-mode steps emit, stage by stage; distributed, every task
    /// whose watermark moved tells the tasks of the stages it sends to.
    pub fn end_batch<'a>(&mut self, out: &mut Vec<Leaving<'a>>) {
        // A pair whose other side went idle moves on without it.
        if self.in_place.is_some() && !self.idle_inputs.is_empty() {
            for id in self.task_ids(0) {
                if let TaskPartition::Input(topic, partition) = &id {
                    let watermark = self.input_task_watermark(topic, *partition);
                    self.advance_task(0, &id, watermark, out);
                }
            }
        }
        for stage in 0..self.stages.len() {
            let ids: Vec<TaskPartition> = self.task_ids(stage);
            for id in ids {
                self.for_each_step(stage, &id, out, |operator, produced| operator.commit(produced));
            }
        }
        self.broadcast_watermarks(out);
    }

    pub(super) fn broadcast_watermarks<'a>(&mut self, out: &mut Vec<Leaving<'a>>) {
        if self.distribution.is_none() || self.stages.len() < 2 {
            return;
        }
        // Stage 0's senders are its tasks: an input partition's, or a join pair's, with the
        // pair's watermark; idle when all their inputs are.
        let inputs: std::collections::BTreeSet<&InputPartition> = self.input_watermarks.keys().chain(&self.idle_inputs).collect();
        let tasks: std::collections::BTreeSet<(String, i32)> = inputs.into_iter().map(|(topic, partition)| self.task_input(topic, *partition)).collect();
        let mut senders: Vec<(usize, String, (i64, bool))> = tasks
            .into_iter()
            .map(|(topic, partition)| {
                let idle = self.inputs_of_task(&topic, partition).iter().all(|input| self.idle_inputs.contains(input));
                (0, input_sender(&topic, partition), (self.input_task_watermark(&topic, partition), idle))
            })
            .collect();
        let Some(distribution) = &mut self.distribution else {
            return;
        };
        for ((stage, id), task) in &self.tasks {
            if let TaskPartition::Repartitioned(partition) = id
                && !self.stages[*stage].children.is_empty()
            {
                senders.push((*stage, partition.to_string(), (task.watermark, false)));
            }
        }
        for (stage, sender, state) in senders {
            let (watermark, idle) = state;
            if (watermark == i64::MIN && !idle) || distribution.broadcast.get(&(stage, sender.clone())) == Some(&state) {
                continue;
            }
            distribution.broadcast.insert((stage, sender.clone()), state);
            for child in &self.stages[stage].children {
                for partition in 0..self.width {
                    out.push(Leaving::Forward(Box::new(Forward {
                        stage: *child,
                        partition,
                        sender: sender.clone(),
                        watermark,
                        idle,
                        record: None,
                        position: None,
                    })));
                }
            }
        }
    }

    /// The end of a bounded input: every watermark reaches +infinity.
    pub fn finish<'a>(&mut self, out: &mut Vec<Leaving<'a>>) {
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

    pub(super) fn minimum_input_watermark(&self) -> i64 {
        self.input_watermarks.values().copied().min().unwrap_or(i64::MIN)
    }

    pub(super) fn task_ids(&self, stage: usize) -> Vec<TaskPartition> {
        self.tasks.keys().filter(|(task_stage, _)| *task_stage == stage).map(|(_, id)| id.clone()).collect()
    }

    pub(super) fn advance_stages_from<'a>(&mut self, first: usize, watermark: i64, out: &mut Vec<Leaving<'a>>) {
        for stage in first..self.stages.len() {
            for id in self.task_ids(stage) {
                self.advance_task(stage, &id, watermark, out);
            }
        }
    }

    pub(super) fn advance_task<'a>(&mut self, stage: usize, id: &TaskPartition, watermark: i64, out: &mut Vec<Leaving<'a>>) {
        let Some(task) = self.tasks.get_mut(&(stage, id.clone())) else {
            return;
        };
        if watermark <= task.watermark {
            return;
        }
        task.watermark = watermark;
        self.for_each_step(stage, id, out, |operator, produced| operator.advance(watermark, produced));
    }
}

//! A topology's state: the changes for the changelogs, restoring from them, dropping a
//! partition's tasks, and how much state there is.

use std::collections::BTreeMap;

use serde_json::Value;

use super::*;

impl Topology {
    /// State entries changed since the last call, for every task, with each changed input
    /// watermark. Call after `end_batch`.
    pub fn take_changes(&mut self) -> Vec<ChangelogEntry> {
        let Some(mut first_stateful) = self.stateful_steps().first().copied() else {
            return Vec::new();
        };
        // Distributed, a changelog partition of a later stage belongs to one repartitioned
        // task, so input watermarks stay with stage 0's state; without any, they need no
        // keeping: the later stages keep their own, which never go back.
        let keep_input_watermarks = match self.distribution {
            None => true,
            Some(_) => match stage_first_stateful(&self.stages[0]) {
                Some(step) => {
                    first_stateful = step;
                    true
                }
                None => false,
            },
        };
        let mut entries = Vec::new();
        for ((stage, id), task) in self.tasks.iter_mut() {
            let (topic, partition) = id.changelog_place();
            for (operator, step) in task.operators.iter_mut().zip(&self.stages[*stage].indices) {
                let changes = operator.take_changes();
                entries.reserve(changes.len());
                for change in changes {
                    entries.push(ChangelogEntry {
                        topic: topic.map(str::to_string),
                        partition,
                        step: *step,
                        key: change.key,
                        value: change.value,
                    });
                }
            }
        }
        if let Some(distribution) = &mut self.distribution {
            for ((stage, id), task) in &self.tasks {
                let TaskPartition::Repartitioned(partition) = id else { continue };
                let Some(step) = stage_first_stateful(&self.stages[*stage]) else { continue };
                // The senders' watermarks too: a sender with nothing more to send would
                // otherwise hold a restarted task back for good.
                let senders: serde_json::Map<String, Value> = task
                    .senders
                    .iter()
                    .map(|(sender, (watermark, idle))| (sender.clone(), serde_json::json!([watermark, idle])))
                    .collect();
                let mut value = serde_json::json!({ "watermark": task.watermark, "senders": senders });
                if !task.received.is_empty() {
                    let received: serde_json::Map<String, Value> =
                        task.received.iter().map(|(sender, (offset, made))| (sender.clone(), serde_json::json!([offset, made]))).collect();
                    value["received"] = Value::Object(received);
                }
                if (task.watermark > i64::MIN || !task.senders.is_empty())
                    && distribution.saved.get(&(*stage, *partition)) != Some(&value)
                {
                    distribution.saved.insert((*stage, *partition), value.clone());
                    entries.push(ChangelogEntry {
                        topic: None,
                        partition: *partition as i32,
                        step,
                        key: WATERMARK_KEY.into(),
                        value: Some(value),
                    });
                }
            }
        }
        for (input, watermark) in &self.input_watermarks {
            let (topic, partition) = input;
            if keep_input_watermarks && *watermark > i64::MIN && self.saved_watermarks.get(input) != Some(watermark) {
                self.saved_watermarks.insert(input.clone(), *watermark);
                entries.push(ChangelogEntry {
                    topic: Some(topic.to_string()),
                    partition: *partition,
                    step: first_stateful,
                    key: WATERMARK_KEY.into(),
                    value: Some(Value::from(*watermark)),
                });
            }
        }
        entries
    }

    /// The store timers set and cleared since the last call, by task: (owner topic,
    /// partition, step, change); and the change in each (step, changelog partition)'s count
    /// of keys, where it is not zero. Call after `take_changes`.
    pub fn take_timers(&mut self) -> (Vec<TimerEntry>, Vec<(usize, i32, i64)>) {
        let (mut timers, mut counts) = (Vec::new(), Vec::new());
        for ((stage, id), task) in self.tasks.iter_mut() {
            let (topic, partition) = id.changelog_place();
            for (operator, step) in task.operators.iter_mut().zip(&self.stages[*stage].indices) {
                for change in operator.take_timers() {
                    timers.push(TimerEntry { topic: topic.map(str::to_string), partition, step: *step, change });
                }
                let delta = operator.take_key_delta();
                if delta != 0 {
                    counts.push((*step, partition, delta));
                }
            }
        }
        (timers, counts)
    }

    /// Puts back one changelog entry.
    pub fn restore(&mut self, entry_topic: Option<&str>, partition: i32, step: usize, key: &str, value: Option<&Value>) -> Result<(), CorruptState> {
        if key == WATERMARK_KEY && entry_topic.is_none() {
            // A repartitioned task's watermark: where it restarts, never going back.
            let stage = self.stage_of_step(step).ok_or_else(|| CorruptState(format!("a watermark of step {step}, which this pipeline does not have")))?;
            let watermark = value.and_then(|value| value["watermark"].as_i64()).unwrap_or(i64::MIN);
            let mut senders = BTreeMap::new();
            for (sender, state) in value.and_then(|value| value["senders"].as_object()).into_iter().flatten() {
                let sender_watermark = state[0].as_i64().ok_or_else(|| CorruptState(format!("a watermark entry with a bad sender {sender}: {state}")))?;
                senders.insert(sender.clone(), (sender_watermark, state[1].as_bool().unwrap_or(false)));
            }
            let mut received = BTreeMap::new();
            for (sender, position) in value.and_then(|value| value["received"].as_object()).into_iter().flatten() {
                let (Some(offset), Some(made)) = (position[0].as_i64(), position[1].as_u64()) else {
                    return Err(CorruptState(format!("a watermark entry with a bad position for sender {sender}: {position}")));
                };
                received.insert(sender.clone(), (offset, made as u32));
            }
            let id = TaskPartition::Repartitioned(partition as u32);
            if let (Some(distribution), Some(value)) = (&mut self.distribution, value) {
                distribution.saved.insert((stage, partition as u32), value.clone());
            }
            let task = self.task(stage, &id).map_err(|error| CorruptState(error.0))?;
            task.watermark = task.watermark.max(watermark);
            task.senders = senders;
            task.received = received;
            return Ok(());
        }
        if key == WATERMARK_KEY {
            let topic = entry_topic.ok_or_else(|| CorruptState("a watermark entry without its input topic".into()))?;
            let input = self.meet(topic, partition);
            let watermark = value.and_then(Value::as_i64).unwrap_or(i64::MIN);
            self.input_watermarks.insert(input.clone(), watermark);
            self.saved_watermarks.insert(input, watermark);
            let task_watermark = self.input_task_watermark(topic, partition);
            if let Some(task) = self.tasks.get_mut(&(0, self.task_of_input(topic, partition))) {
                task.watermark = task_watermark;
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
            return Err(CorruptState(format!("a changelog entry of step {step}, which this pipeline does not have")));
        };
        let id = match (stage, entry_topic) {
            (0, Some(topic)) => self.task_of_input(topic, partition),
            (stage, None) if stage > 0 => TaskPartition::Repartitioned(partition as u32),
            _ => return Err(CorruptState(format!("a changelog entry of step {step} for the wrong kind of task"))),
        };
        let task = self.task(stage, &id).map_err(|error| CorruptState(error.0))?;
        task.operators[position].restore(key, value)
    }

    /// Forgets an input partition's tasks and watermark (it was revoked, or its uncommitted
    /// state must be replaced from the changelog).
    /// A join's pair of partitions goes as one: both are restored together.
    pub fn drop_input_partition(&mut self, topic: &str, partition: i32) {
        self.tasks.remove(&(0, self.task_of_input(topic, partition)));
        for input in self.inputs_of_task(topic, partition) {
            self.input_watermarks.remove(&input);
            self.saved_watermarks.remove(&input);
            if let Some(distribution) = &mut self.distribution {
                // What it broadcast may have been aborted: say it again once restored.
                distribution.broadcast.remove(&(0, input_sender(&input.0, input.1)));
            }
        }
        self.shared_watermark = self.minimum_input_watermark();
    }

    /// Forgets the task of a repartitioned stage (its partition of the repartition topic was
    /// revoked, or its uncommitted state must be replaced from the changelog).
    pub fn drop_repartitioned(&mut self, stage: usize, partition: i32) {
        self.tasks.remove(&(stage, TaskPartition::Repartitioned(partition as u32)));
        if let Some(distribution) = &mut self.distribution {
            distribution.broadcast.remove(&(stage, partition.to_string()));
            distribution.saved.remove(&(stage, partition as u32));
        }
    }

    /// The stage a step (pipeline index) runs in; 0 means no repartition before it.
    pub fn stage_of_step(&self, step: usize) -> Option<usize> {
        self.stages.iter().position(|spec| spec.indices.contains(&step))
    }

    /// Each known input partition's watermark (`i64::MIN`: none yet).
    pub fn input_watermarks(&self) -> Vec<((String, i32), i64)> {
        self.input_watermarks.iter().map(|((topic, partition), watermark)| ((topic.to_string(), *partition), *watermark)).collect()
    }

    /// Keys or windows in state by stateful step (pipeline index), over every task.
    pub fn state_keys_by_step(&self) -> BTreeMap<usize, usize> {
        let mut keys: BTreeMap<usize, usize> = self.stateful_steps().into_iter().map(|step| (step, 0)).collect();
        for ((stage, _), task) in &self.tasks {
            for (operator, step) in task.operators.iter().zip(&self.stages[*stage].indices) {
                if let Some(count) = keys.get_mut(step) {
                    *count += operator.state_keys();
                }
            }
        }
        keys
    }

    pub fn state_keys(&self) -> usize {
        self.tasks.values().flat_map(|task| &task.operators).map(Operator::state_keys).sum()
    }
}

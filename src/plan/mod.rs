//! The plan: the pipeline file's parts checked against each other and built into what the
//! runtime executes (DESIGN.md "Shape of the code": config → plan → runtime).
//!
//! [`build`] reads each step's body through the step's own config (beside its operator),
//! checks the fields steps and the sink name against the schema each step sees, the formats
//! and the delivery mode, and cuts the steps into stages ([`Pipeline::stages`]: where records
//! move through repartition topics). [`describe`] prints it for `weir validate` and
//! `weir plan`. Nothing here touches Kafka.

pub mod describe;
mod sink;

use sink::{check_upsert, settle_sink_headers};

use std::path::Path;

use crate::codec::avro::AvroEncoder;
use crate::config::{
    self, check_fields, ConfigErrors, Encoding, ErrorPolicy, FieldType, PipelineFile, Schema, Settings, Sink, DeliveryMode, Source,
    SourceTopics,
};
use crate::operators::join::config::{check_section, parse_join, Join};
use crate::operators::window::config::EmitMode;
use crate::operators::{Operator, StateEntryLimit, Step};
pub use describe::{describe, graph, StoredState};

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub source: Source,
    pub steps: Vec<Step>,
    pub sink: Sink,
    pub on_error: ErrorPolicy,
    pub dlq_topic: String,
}

impl Pipeline {
    /// The join, in a two-source pipeline.
    pub fn join(&self) -> Option<&Join> {
        match self.steps.first() {
            Some(Step::Join(join)) => Some(join.as_ref()),
            _ => None,
        }
    }

    /// Every source: the one, or a join's left and right.
    pub fn sources(&self) -> Vec<&Source> {
        std::iter::once(&self.source).chain(self.join().map(|join| &join.right)).collect()
    }

    /// Every source topic, of both sides of a join; None when a source has a pattern.
    pub fn input_topics(&self) -> Option<Vec<String>> {
        let mut topics = Vec::new();
        for source in self.sources() {
            match &source.topics {
                SourceTopics::List(names) => topics.extend(names.iter().cloned()),
                SourceTopics::Pattern(_) => return None,
            }
        }
        Some(topics)
    }

    /// The same pipeline reading and writing JSON where it has Avro (`weir test`, whose
    /// records are JSON lines).
    pub fn with_json_codecs(&self) -> Pipeline {
        let mut pipeline = self.clone();
        let to_json = |encoding: &mut Encoding| {
            if *encoding == Encoding::Avro {
                *encoding = Encoding::Json;
            }
        };
        to_json(&mut pipeline.source.encoding);
        to_json(&mut pipeline.sink.encoding);
        to_json(&mut pipeline.sink.key_encoding);
        if let Some(Step::Join(join)) = pipeline.steps.first_mut() {
            to_json(&mut join.right.encoding);
        }
        pipeline
    }

    /// The first part of the pipeline that reads or writes Avro, in words; None without Avro.
    pub fn avro_user(&self) -> Option<String> {
        self.sources()
            .into_iter()
            .find(|source| source.encoding == Encoding::Avro)
            .map(|source| format!("source '{}'", source.name))
            .or_else(|| (self.sink.encoding == Encoding::Avro).then(|| "the sink".to_string()))
            .or_else(|| (self.sink.key_encoding == Encoding::Avro).then(|| "the sink's key".to_string()))
    }

    /// The fields of the records the sink receives, with their types: the last step's
    /// output (a window's group_by fields, window bounds and aggregates), else its input.
    pub fn output_schema(&self) -> Schema {
        self.schema_seen_by(self.steps.len())
    }

    /// The fields of the records step `index` receives (`steps.len()`: the sink's).
    pub fn schema_seen_by(&self, index: usize) -> Schema {
        let mut schema = self.source.record_schema();
        for step in &self.steps[..index.min(self.steps.len())] {
            schema = step.output_schema(schema);
        }
        schema
    }

    /// The fields of the Kafka keys weir makes for the sink, with their types: `sink.key`, or
    /// the key of the last step that sets one (a dedup's or join's key, a window's group,
    /// plus `window_start` under `emit: update`). None: each input record's key is kept as
    /// it is (no keyed step and no `sink.key`).
    pub fn output_key_schema(&self) -> Option<Schema> {
        let mut key = None;
        // Whether the records are an update-mode window's: they keep their window's key,
        // whatever sink.key says (as the engine's emit does).
        let mut upsert = false;
        let mut input = self.source.record_schema();
        for step in &self.steps {
            match step {
                Step::Filter(_) | Step::Set(_) | Step::Select(_) | Step::Drop(_) | Step::Explode(_) => {}
                Step::Dedup(dedup) => key = Some(input.select(&dedup.key)),
                Step::Join(join) => {
                    key = Some(self.source.record_schema().select(&join.on));
                    upsert = false;
                }
                Step::Window(window) => {
                    let mut schema = input.select(&window.group_by);
                    upsert = window.emit == EmitMode::Update;
                    if upsert {
                        schema.fields.push(("window_start".into(), FieldType::Timestamp));
                    }
                    key = Some(schema);
                }
            }
            input = step.output_schema(input);
        }
        match upsert || self.sink.key.is_empty() {
            true => key,
            false => Some(self.output_schema().select(&self.sink.key)),
        }
    }

    /// The source that reads `topic` (by name, or the pattern's match).
    pub fn source_of_topic(&self, topic: &str) -> &Source {
        match self.join() {
            Some(join) if join.right.reads(topic) => &join.right,
            _ => &self.source,
        }
    }
}

/// How the steps are cut into stages (PIPELINE.md "Partitioning"): each stage after the
/// first is fed through a repartition topic, routed by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stages {
    pub stages: Vec<Stage>,
    /// The join, run in place: (left topic, right topic).
    pub join_in_place: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The pipeline indices of its steps.
    pub steps: Vec<usize>,
    /// The key records are routed by into this stage; None for stage 0, whose tasks are
    /// the input partitions.
    pub repartition_by: Option<Vec<String>>,
}

impl Pipeline {
    /// The pipeline indices of the stateful steps (each has a changelog topic).
    pub fn stateful_steps(&self) -> Vec<usize> {
        self.steps.iter().enumerate().filter(|(_, step)| step.is_stateful()).map(|(index, _)| index).collect()
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

    /// One line per step (and per repartition in front of a stage), as `weir validate` and
    /// `weir plan` show them.
    pub fn describe_steps(&self) -> Vec<String> {
        let stages = self.stages();
        let mut lines = Vec::new();
        for stage in &stages.stages {
            if let Some(key) = &stage.repartition_by {
                lines.push(format!("repartition by [{}]", key.join(", ")));
            }
            for index in &stage.steps {
                let described = self.describe_step(*index);
                match (&self.steps[*index], &stages.join_in_place) {
                    (Step::Join(_), Some((left, right))) => {
                        lines.push(format!("{described}, in place: partition p of {left} joins partition p of {right}"));
                    }
                    _ => lines.push(described),
                }
            }
        }
        lines
    }

    /// A step in words, as its operator describes itself.
    fn describe_step(&self, index: usize) -> String {
        self.steps
            .get(index)
            .and_then(|step| Operator::build(step, &self.schema_seen_by(index), StateEntryLimit::default()).ok())
            .map(|operator| operator.describe())
            .unwrap_or_default()
    }

    /// What a stateful step's state depends on, in words (kept to detect changed steps).
    /// Whether it runs after a repartition is part of it: that decides which task (input
    /// partition or repartitioned key) each piece of state belongs to.
    pub fn step_definition(&self, index: usize) -> String {
        let described = self.describe_step(index);
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

    /// The stages, and whether the join runs in place.
    pub fn stages(&self) -> Stages {
        // A co-partitioned join runs in the input partitions' tasks.
        let in_place = co_partitioned_join(self).filter(|_| {
            // Upsert mode's replay drops need a sender's forwards in its input's order, which
            // a pair task, taking two inputs in whatever order they come, does not keep.
            self.sink.mode != DeliveryMode::IdempotentUpsert || cut_stages(self, true).len() == 1
        });
        Stages {
            stages: cut_stages(self, in_place.is_some()),
            join_in_place: in_place.map(|(left, right)| (left.to_string(), right.to_string())),
        }
    }
}

/// A stable hash (FNV-1a, 64 bits): the same on every run and machine, for routing keys to
/// repartition topic partitions and for state fingerprints.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

/// Cuts the steps into stages: a keyed step whose key the records are not partitioned by
/// starts a new one. A join starts one too, unless it runs `in_place` (its inputs are
/// co-partitioned by its key).
fn cut_stages(pipeline: &Pipeline, in_place: bool) -> Vec<Stage> {
    let mut stages = vec![Stage { steps: Vec::new(), repartition_by: None }];
    let source = &pipeline.source;
    let mut partitioned_by: Option<Vec<String>> = (!source.partitioned_by.is_empty()).then(|| source.partitioned_by.clone());
    for (index, step) in pipeline.steps.iter().enumerate() {
        // A step that writes a partitioning field leaves the records partitioned by nothing
        // weir can name.
        if partitioned_by.as_ref().is_some_and(|fields| fields.iter().any(|field| step.rewrites(field))) {
            partitioned_by = None;
        }
        let key = match step {
            Step::Filter(_) | Step::Set(_) | Step::Select(_) | Step::Drop(_) | Step::Explode(_) => None,
            Step::Dedup(dedup) => Some(&dedup.key),
            Step::Window(window) => Some(&window.group_by),
            Step::Join(join) => {
                partitioned_by = Some(join.output.partitioned_by.clone());
                match in_place {
                    true => stages[0] = Stage { steps: vec![index], repartition_by: None },
                    // Both inputs meet in the tasks of a new stage, routed by the join key.
                    false => stages.push(Stage { steps: vec![index], repartition_by: Some(join.on.clone()) }),
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
            if let Some(stage) = stages.last_mut() {
                stage.steps.push(index);
            }
        } else {
            stages.push(Stage { steps: vec![index], repartition_by: key.cloned() });
            partitioned_by = key.cloned();
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

/// Everything `weir run` needs, validated.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    pub pipeline: Pipeline,
}

/// Plans a pipeline document on its own (tests, tools).
pub fn parse_pipeline(text: &str) -> Result<Pipeline, ConfigErrors> {
    let mut problems = ConfigErrors::default();
    let pipeline = config::parse_pipeline_file(text, &mut problems).and_then(|file| build(file, &mut problems));
    match pipeline {
        Some(pipeline) if problems.is_empty() => Ok(pipeline),
        _ => Err(problems),
    }
}

/// Loads and plans the pipeline file alone (`weir test`: no service settings apply).
pub fn load_pipeline(pipeline_file: &Path) -> Result<Pipeline, ConfigErrors> {
    let mut problems = ConfigErrors::default();
    let pipeline = config::read_pipeline_file(pipeline_file, &mut problems).and_then(|file| build(file, &mut problems));
    match pipeline {
        Some(pipeline) if problems.is_empty() => Ok(pipeline),
        _ => Err(problems),
    }
}

/// Loads the settings and plans the pipeline together, so that one run reports the problems
/// of both.
pub fn load(config_file: Option<&Path>, pipeline_file: &Path) -> Result<Loaded, ConfigErrors> {
    let mut problems = ConfigErrors::default();
    let settings = config::load_settings(config_file, &mut problems);
    let pipeline = config::read_pipeline_file(pipeline_file, &mut problems).and_then(|file| build(file, &mut problems));
    if let (Some(settings), Some(pipeline)) = (&settings, &pipeline)
        && settings.schema_registry.urls.is_empty()
        && let Some(user) = pipeline.avro_user()
    {
        problems.push(
            "schema_registry.url (env WEIR__SCHEMA_REGISTRY__URL)",
            format!("is required: {user} uses format avro"),
        );
    }
    match (settings, pipeline) {
        (Some(settings), Some(pipeline)) if problems.is_empty() => Ok(Loaded { settings, pipeline }),
        _ => Err(problems),
    }
}

/// Checks the parts of a pipeline file against each other and builds the pipeline: each
/// step's config from its body (read by the step's own config), the fields steps and the sink
/// name, the formats, the mode. Every problem goes into `problems`; None when any part is
/// missing.
pub fn build(file: PipelineFile, problems: &mut ConfigErrors) -> Option<Pipeline> {
    let PipelineFile { name, sources, join, steps: entries, sink, on_error, dlq_topic } = file;
    let (source, join) = match (sources, join.as_ref()) {
        (None, Some(value)) => {
            check_section(value, problems);
            (None, None)
        }
        (None, None) => (None, None),
        (Some(mut sources), None) if sources.len() == 1 => (sources.pop(), None),
        (Some(sources), None) => {
            let names: Vec<&str> = sources.iter().map(|source| source.name.as_str()).collect();
            problems.push("join", format!("is required with two sources ({}): say how they join", names.join(", ")));
            (None, None)
        }
        (Some(sources), Some(_)) if sources.len() != 2 => {
            problems.push("sources", "a join needs exactly two sources");
            (None, None)
        }
        (Some(sources), Some(value)) => match parse_join(value, sources, problems) {
            Some((left, join)) => (Some(left), Some(join)),
            None => (None, None),
        },
    };
    // The steps see the joined records after a join.
    let steps_source = join.as_ref().map(|join| &join.output).or(source.as_ref());
    // Each step is read against the schema of the records it sees: the one the step before
    // it makes (not known after a step with problems, whose followers are then checked less).
    let mut input = steps_source.map(Source::record_schema);
    let mut steps: Vec<Option<Step>> = Vec::with_capacity(entries.len());
    for entry in &entries {
        let step = Step::parse(entry, input.as_ref(), problems);
        input = match (&step, input) {
            (Some(step), Some(schema)) => Some(step.output_schema(schema)),
            (None, Some(schema)) if Step::kind_keeps_schema(&entry.kind) => Some(schema),
            _ => None,
        };
        steps.push(step);
    }
    // Whether a stateful step is there, even one whose body has problems of its own.
    let stateful = entries.iter().any(|entry| Step::kind_is_stateful(&entry.kind));
    let steps: Option<Vec<Step>> = steps.into_iter().collect();
    if let Some(sink) = &sink {
        check_fields(&sink.key, input.as_ref(), "sink.key", problems);
    }
    if let (true, Some(source), None) = (stateful, &source, &join) {
        if source.event_time.is_none() {
            problems.push(format!("sources.{}.event_time", source.name), "is required by dedup and window steps");
        }
        if source.watermark.is_none() {
            problems.push(format!("sources.{}.watermark", source.name), "is required by dedup and window steps");
        }
    }
    let (name, source, mut steps, sink, on_error, dlq_topic) = (name?, source?, steps?, sink?, on_error?, dlq_topic?);
    if let Some(mut join) = join {
        join.keep_sources = sink.mode == DeliveryMode::IdempotentUpsert;
        steps.insert(0, Step::Join(Box::new(join)));
    }
    let dlq_topic = dlq_topic.unwrap_or_else(|| format!("{name}.dlq"));
    if dlq_topic == sink.topic {
        problems.push("dlq.topic", "must differ from sink.topic");
    }
    let mut pipeline = Pipeline { name, source, steps, sink, on_error, dlq_topic };
    settle_sink_headers(&mut pipeline, problems);
    if pipeline.sink.encoding == Encoding::Avro {
        let output = pipeline.output_schema();
        if let Err(problem) = AvroEncoder::new(&output, &pipeline.name) {
            problems.push("sink.format", problem.to_string());
        }
    }
    if pipeline.sink.mode == DeliveryMode::IdempotentUpsert {
        check_upsert(&pipeline, problems);
    }
    if pipeline.sink.key_encoding == Encoding::Avro {
        match pipeline.output_key_schema() {
            None => problems.push(
                "sink.key_format",
                "avro keys are made from fields: set sink.key, or use a dedup, window or join (whose key it is); \
                 a pipeline without one keeps each input record's key bytes as they are",
            ),
            Some(schema) => {
                if let Err(problem) = AvroEncoder::new(&schema, &format!("{}-key", pipeline.name)) {
                    problems.push("sink.key_format", problem.to_string());
                }
            }
        }
    }
    Some(pipeline)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(source_extra: &str, steps: &str) -> Pipeline {
        let text = format!(
            r#"
name: p
sources:
  clicks:
    topics: [clicks]
    format: json
    schema: {{ user: string, page: string, amount: long, ts: long }}
    event_time: {{ field: ts }}
    watermark: {{ max_out_of_orderness: 1s }}
{source_extra}
steps:
{steps}
sink:
  topic: out
"#
        );
        parse_pipeline(&text).unwrap_or_else(|problems| panic!("{problems}"))
    }

    #[test]
    fn a_keyed_step_not_partitioned_by_its_key_starts_a_stage() {
        let steps = "  - filter: \"amount > 0\"\n  - dedup: { key: [user], within: 1m }\n  - window: { group_by: [user], tumbling: 1m, aggregates: { n: count() } }\n  - window: { group_by: [n], tumbling: 1h, aggregates: { users: count() } }";
        let stages = planned("", steps).stages();
        let cut: Vec<(Vec<usize>, Option<Vec<String>>)> = stages.stages.into_iter().map(|stage| (stage.steps, stage.repartition_by)).collect();
        assert_eq!(
            cut,
            [
                (vec![0], None),
                (vec![1, 2], Some(vec!["user".to_string()])),
                (vec![3], Some(vec!["n".to_string()])),
            ]
        );
        assert_eq!(stages.join_in_place, None);
    }

    #[test]
    fn steps_keyed_by_the_declared_partitioning_stay_in_stage_zero() {
        let steps = "  - dedup: { key: [user, page], within: 1m }\n  - window: { group_by: [user], tumbling: 1m, aggregates: { n: count() } }";
        let stages = planned("    partitioned_by: [user]", steps).stages();
        assert_eq!(stages.stages.len(), 1);
        assert_eq!(stages.stages[0].steps, [0, 1]);
    }

    #[test]
    fn each_step_hands_on_the_schema_its_kind_makes() {
        let steps = "  - filter: \"amount > 0\"\n  - window: { group_by: [user], tumbling: 1m, aggregates: { n: count(), total: sum(amount), mean: avg(amount) } }";
        let pipeline = planned("", steps);
        assert_eq!(pipeline.schema_seen_by(1).describe(), "{user: string, page: string, amount: long, ts: long}");
        assert_eq!(
            pipeline.output_schema().describe(),
            "{user: string, window_start: timestamp, window_end: timestamp, n: long, total: long, mean: double}"
        );
        let key: Vec<String> = pipeline.output_key_schema().unwrap().fields.into_iter().map(|(name, _)| name).collect();
        assert_eq!(key, ["user"]);
    }

    #[test]
    fn problems_of_every_part_come_together() {
        let text = r#"
name: p
sources:
  clicks:
    topics: [clicks]
    format: json
    schema: { user: string, ts: long }
steps:
  - dedup: { key: [nobody], within: 1m }
  - window: { group_by: [user], tumbling: 0s, aggregates: { n: count() } }
  - lookup: { table: customers }
sink:
  topic: out
  key: [missing]
"#;
        let problems = parse_pipeline(text).unwrap_err();
        let locations: Vec<&str> = problems.problems.iter().map(|problem| problem.location.as_str()).collect();
        for expected in ["steps[0].dedup.key", "steps[1].window.tumbling", "steps[2]", "sources.clicks.event_time"] {
            assert!(locations.contains(&expected), "no problem at {expected}: {problems}");
        }
        // Fields are checked against the schema the steps make, while it is known: a filter
        // or dedup with problems hands on what it received.
        let text = text.replace("  - window: { group_by: [user], tumbling: 0s, aggregates: { n: count() } }\n  - lookup: { table: customers }\n", "");
        let problems = parse_pipeline(&text.replace("dedup: {", "filter: \"nobody > 1\"\n  - dedup: {")).unwrap_err();
        let locations: Vec<&str> = problems.problems.iter().map(|problem| problem.location.as_str()).collect();
        assert_eq!(locations, ["steps[0].filter", "steps[1].dedup.key", "sink.key", "sources.clicks.event_time", "sources.clicks.watermark"], "{problems}");
    }

    #[test]
    fn an_upsert_pipeline_repartitions_at_most_once() {
        let steps = "  - window: { group_by: [user], tumbling: 1m, aggregates: { n: count() } }\n  - window: { group_by: [n], tumbling: 1h, aggregates: { users: count() } }";
        let text = planned("", steps);
        assert_eq!(text.stages().stages.len(), 3);
        let mut upsert = text.clone();
        upsert.sink.mode = DeliveryMode::IdempotentUpsert;
        let mut problems = ConfigErrors::default();
        check_upsert(&upsert, &mut problems);
        assert!(problems.problems.iter().any(|problem| problem.location == "sink.mode"), "{problems}");
    }
}

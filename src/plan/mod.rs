//! The plan: the pipeline file's parts checked against each other and built into what the
//! runtime executes (DESIGN.md "Shape of the code": config → plan → runtime).
//!
//! [`build`] reads each step's body through the step's own config (beside its operator),
//! checks the fields steps and sinks name against the schema each step sees, the formats
//! and the delivery mode. The steps form a tree: the main steps in a line, then each
//! output's own steps, branching off the step its `from` names and ending in its sink
//! ([`Pipeline::targets`]). [`stages`] cuts the tree where records move through repartition
//! topics. [`describe`] prints it for `weir validate` and `weir plan`. Nothing here touches
//! Kafka.

pub mod acls;
mod build;
pub mod describe;
pub mod schema;
mod sink;
mod stages;

pub use build::build;
pub use describe::{describe, graph, StoredState};
pub use stages::{stable_hash, Stage, Stages};

use std::path::Path;

use crate::config::{self, ConfigErrors, DeliveryMode, Encoding, ErrorPolicy, FieldType, Schema, Settings, Sink, Source, SourceTopics};
use crate::operators::join::config::Join;
use crate::operators::window::config::EmitMode;
use crate::operators::{Operator, StateEntryLimit, Step};

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub source: Source,
    /// Every step: the main ones (a join first, then the file's `steps`), then each output's
    /// own, output after output. A step's index here names its changelog and state.
    pub steps: Vec<Step>,
    /// How many of `steps` are the main ones.
    pub main_steps: usize,
    /// Where each step is written in the file (`steps[2]`, `outputs.big.when`, `join`).
    pub step_locations: Vec<String>,
    /// At least one; all with the same delivery mode.
    pub outputs: Vec<Output>,
    pub on_error: ErrorPolicy,
    pub dlq_topic: String,
    /// The table sources (`table: {key: [...]}`), read whole for lookups.
    pub tables: Vec<Source>,
}

/// One output: the records of step `from`, through the output's own steps, to its sink.
#[derive(Debug, Clone)]
pub struct Output {
    /// `sink` for a pipeline written with `sink:` alone.
    pub name: String,
    /// The main step whose results it takes; None: the records as read (no main steps).
    pub from: Option<usize>,
    /// Its own steps (indices into [`Pipeline::steps`]); its `when` is the first, a filter.
    pub steps: Vec<usize>,
    pub sink: Sink,
}

/// Where records go after a step (or after the source): into a step, or out to an output's
/// sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Step(usize),
    Output(usize),
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

    /// Every output's sink, in the outputs' order.
    pub fn sinks(&self) -> impl Iterator<Item = &Sink> {
        self.outputs.iter().map(|output| &output.sink)
    }

    /// How the pipeline commits: in transactions when any output is transactional (an
    /// upsert output is then written in the transaction too, with its ids); without (an
    /// idempotent producer) when every output is `idempotent_upsert`.
    pub fn mode(&self) -> DeliveryMode {
        match self.sinks().all(|sink| sink.mode == DeliveryMode::IdempotentUpsert) {
            true => DeliveryMode::IdempotentUpsert,
            false => DeliveryMode::Transactional,
        }
    }

    /// Whether the pipeline was written with `outputs:` rather than one `sink:`.
    pub fn has_named_outputs(&self) -> bool {
        !(self.outputs.len() == 1 && self.outputs[0].name == "sink" && self.outputs[0].sink.location == "sink")
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
        for output in &mut pipeline.outputs {
            to_json(&mut output.sink.encoding);
            to_json(&mut output.sink.key_encoding);
        }
        if let Some(Step::Join(join)) = pipeline.steps.first_mut() {
            to_json(&mut join.right.encoding);
        }
        pipeline
    }

    /// The first part of the pipeline that reads or writes Avro, in words; None without Avro.
    pub fn avro_user(&self) -> Option<String> {
        let source = self.sources().into_iter().chain(&self.tables).find(|source| source.encoding == Encoding::Avro);
        if let Some(source) = source {
            return Some(format!("source '{}'", source.name));
        }
        self.sinks().find_map(|sink| match (sink.encoding, sink.key_encoding) {
            (Encoding::Avro, _) => Some(sink.location.clone()),
            (_, Encoding::Avro) => Some(format!("{}.key_format", sink.location)),
            _ => None,
        })
    }

    /// The name an output's derived Avro schemas carry: the pipeline's, for a lone `sink:`
    /// (as before outputs existed, so registered schemas stay compatible), else
    /// `<pipeline>-<output>`.
    pub fn avro_record_name(&self, output: usize) -> String {
        match self.has_named_outputs() {
            false => self.name.clone(),
            true => format!("{}-{}", self.name, self.outputs[output].name),
        }
    }

    /// The step whose records step `index` receives; None: the source's.
    pub fn parent(&self, index: usize) -> Option<usize> {
        if index < self.main_steps {
            return index.checked_sub(1);
        }
        self.outputs.iter().find_map(|output| {
            let position = output.steps.iter().position(|step| *step == index)?;
            Some(match position {
                0 => output.from,
                _ => Some(output.steps[position - 1]),
            })
        })?
    }

    /// The steps a record passes on its way to and through `step`, in order (empty for None).
    pub fn lineage(&self, step: Option<usize>) -> Vec<usize> {
        let mut lineage = Vec::new();
        let mut current = step;
        while let Some(index) = current {
            lineage.push(index);
            current = self.parent(index);
        }
        lineage.reverse();
        lineage
    }

    /// Every step the records of output `output` pass, in order.
    pub fn chain(&self, output: usize) -> Vec<usize> {
        let output = &self.outputs[output];
        let mut chain = self.lineage(output.from);
        chain.extend(&output.steps);
        chain
    }

    /// Whether output `output` writes each record as the source decoded it: JSON in and out,
    /// and only steps that drop records or let them pass (filters, dedups) on the way. Its
    /// values can then be the input's bytes where those are already the encoder's form.
    pub fn writes_records_as_read(&self, output: usize) -> bool {
        let json = |encoding: Encoding| encoding == Encoding::Json;
        json(self.source.encoding)
            && json(self.outputs[output].sink.encoding)
            && self.chain(output).iter().all(|&index| matches!(self.steps[index], Step::Filter(_) | Step::Dedup(_)))
    }

    /// Where the records leaving step `from` (None: the source) go: the steps fed by it and
    /// the outputs whose last step it is, in the order of the outputs they lead to (so that
    /// what one record makes comes out in the order the outputs are written).
    pub fn targets(&self, from: Option<usize>) -> Vec<Target> {
        let steps = (0..self.steps.len()).filter(|index| self.parent(*index) == from).map(Target::Step);
        let outputs = self.outputs.iter().enumerate().filter(|(_, output)| output.steps.last().copied().or(output.from) == from);
        let mut targets: Vec<Target> = steps.chain(outputs.map(|(index, _)| Target::Output(index))).collect();
        let first_output = |target: &Target| match target {
            Target::Output(output) => *output,
            Target::Step(step) => (0..self.outputs.len()).find(|output| self.chain(*output).contains(step)).unwrap_or(usize::MAX),
        };
        targets.sort_by_key(first_output);
        targets
    }

    fn schema_through(&self, steps: &[usize]) -> Schema {
        steps.iter().fold(self.source.record_schema(), |schema, index| self.steps[*index].output_schema(schema))
    }

    /// The fields of the records step `index` receives.
    pub fn schema_seen_by(&self, index: usize) -> Schema {
        self.schema_through(&self.lineage(self.parent(index)))
    }

    /// The fields of the records step `index` hands on.
    pub fn schema_after(&self, index: usize) -> Schema {
        self.schema_through(&self.lineage(Some(index)))
    }

    /// The fields of the records output `output` writes, with their types.
    pub fn output_schema(&self, output: usize) -> Schema {
        self.schema_through(&self.chain(output))
    }

    /// The fields of the Kafka keys weir makes for output `output`'s sink, with their types:
    /// `sink.key`, or the key of the last step that sets one (a dedup's or join's key, a
    /// window's group, plus `window_start` under `emit: update`; an aggregate's group).
    /// None: each input record's key is kept as it is (no keyed step and no `sink.key`).
    pub fn output_key_schema(&self, output: usize) -> Option<Schema> {
        let mut key = None;
        // Whether the records are an update-mode window's or an aggregate's: they keep
        // their group's key, whatever sink.key says (as the engine's emit does).
        let mut upsert = false;
        let mut input = self.source.record_schema();
        for index in self.chain(output) {
            let step = &self.steps[index];
            match step {
                Step::Filter(_) | Step::Set(_) | Step::Select(_) | Step::Drop(_) | Step::Explode(_) | Step::Lookup(_) => {}
                Step::Dedup(dedup) => key = Some(input.select(&dedup.key)),
                Step::Join(join) => {
                    key = Some(self.source.record_schema().select(&join.on));
                    upsert = false;
                }
                Step::Aggregate(aggregate) => {
                    key = Some(input.select(&aggregate.group_by));
                    upsert = true;
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
        let sink = &self.outputs[output].sink;
        match upsert || sink.key.is_empty() {
            true => key,
            false => Some(input.select(&sink.key)),
        }
    }

    /// The source that reads `topic` (by name, or the pattern's match).
    pub fn source_of_topic(&self, topic: &str) -> &Source {
        match self.join() {
            Some(join) if join.right.reads(topic) => &join.right,
            _ => &self.source,
        }
    }

    /// The pipeline indices of the stateful steps (each has a changelog topic).
    pub fn stateful_steps(&self) -> Vec<usize> {
        self.steps.iter().enumerate().filter(|(_, step)| step.is_stateful()).map(|(index, _)| index).collect()
    }

    /// A step in words, as its operator describes itself.
    fn operator_description(&self, index: usize) -> String {
        self.steps
            .get(index)
            .and_then(|step| Operator::build(step, &self.schema_seen_by(index), StateEntryLimit::default(), &mut Default::default()).ok())
            .map(|operator| operator.describe())
            .unwrap_or_default()
    }
}

/// Everything `weir run` needs, validated.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    pub pipeline: Pipeline,
}

/// Reads and plans a pipeline document; its problems (after any already in `problems`) get
/// their line and column in `text`.
fn plan_text(text: &str, problems: &mut ConfigErrors) -> Option<Pipeline> {
    let before = problems.problems.len();
    let pipeline = config::parse_pipeline_file(text, problems).and_then(|file| build(file, problems));
    config::place(text, &mut problems.problems[before..]);
    pipeline
}

/// Plans a pipeline document on its own (tests, tools).
pub fn parse_pipeline(text: &str) -> Result<Pipeline, ConfigErrors> {
    let mut problems = ConfigErrors::default();
    let pipeline = plan_text(text, &mut problems);
    match pipeline {
        Some(pipeline) if problems.is_empty() => Ok(pipeline),
        _ => Err(problems),
    }
}

/// Loads and plans the pipeline file alone (`weir test`: no service settings apply).
pub fn load_pipeline(pipeline_file: &Path) -> Result<Pipeline, ConfigErrors> {
    let mut problems = ConfigErrors::default();
    let pipeline = config::read_pipeline_text(pipeline_file, &mut problems).and_then(|text| plan_text(&text, &mut problems));
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
    let pipeline = config::read_pipeline_text(pipeline_file, &mut problems).and_then(|text| plan_text(&text, &mut problems));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipeline over clicks with `steps` and `ending` (its sink or outputs section).
    fn text(source_extra: &str, steps: &str, ending: &str) -> String {
        format!(
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
{ending}
"#
        )
    }

    fn planned(source_extra: &str, steps: &str) -> Pipeline {
        parse_pipeline(&text(source_extra, steps, "sink:\n  topic: out")).unwrap_or_else(|problems| panic!("{problems}"))
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
            pipeline.output_schema(0).describe(),
            "{user: string, window_start: timestamp, window_end: timestamp, n: long, total: long, mean: double}"
        );
        let key: Vec<String> = pipeline.output_key_schema(0).unwrap().fields.into_iter().map(|(name, _)| name).collect();
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
  - enrich: { table: customers }
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
        let text = text.replace("  - window: { group_by: [user], tumbling: 0s, aggregates: { n: count() } }\n  - enrich: { table: customers }\n", "");
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
        upsert.outputs[0].sink.mode = DeliveryMode::IdempotentUpsert;
        let mut problems = ConfigErrors::default();
        sink::check_upsert(&upsert, &mut problems);
        assert!(problems.problems.iter().any(|problem| problem.location == "sink.mode"), "{problems}");
    }

    fn with_outputs(steps: &str, outputs: &str) -> Result<Pipeline, ConfigErrors> {
        parse_pipeline(&text("", steps, &format!("outputs:\n{outputs}")))
    }

    fn locations(problems: &ConfigErrors) -> Vec<&str> {
        problems.problems.iter().map(|problem| problem.location.as_str()).collect()
    }

    #[test]
    fn outputs_branch_off_the_step_their_from_names() {
        let steps = "  - filter: \"amount > 0\"\n  - set: { cents: \"amount * 100\" }";
        let outputs = "  all:\n    sink: { topic: all }\n  raw:\n    from: filter\n    when: \"amount > 10\"\n    steps: [ { select: { user: user } } ]\n    sink: { topic: raw }\n  first:\n    from: 0\n    steps: [ { dedup: { key: [user], within: 1m } } ]\n    sink: { topic: firsts }";
        let pipeline = with_outputs(steps, outputs).unwrap_or_else(|problems| panic!("{problems}"));
        // The main steps, then each output's own (a `when` is a filter step).
        assert_eq!(pipeline.main_steps, 2);
        let own: Vec<(Option<usize>, Vec<usize>)> = pipeline.outputs.iter().map(|output| (output.from, output.steps.clone())).collect();
        assert_eq!(own, [(Some(1), vec![]), (Some(0), vec![2, 3]), (Some(0), vec![4])]);
        assert_eq!(pipeline.chain(1), [0, 2, 3]);
        assert_eq!(pipeline.output_schema(0).describe(), "{user: string, page: string, amount: long, ts: long, cents: long}");
        assert_eq!(pipeline.output_schema(1).describe(), "{user: string}");
        // Records leaving the filter go on in the order of the outputs they lead to.
        assert_eq!(pipeline.targets(Some(0)), [Target::Step(1), Target::Step(2), Target::Step(4)]);
        assert_eq!(pipeline.targets(Some(1)), [Target::Output(0)]);
        // The dedup (keyed by user, not how the input is partitioned) starts a stage of its
        // own, fed by stage 0.
        let stages = pipeline.stages().stages;
        assert_eq!(stages.len(), 2);
        assert_eq!((stages[0].steps.clone(), stages[1].steps.clone(), stages[1].parent), (vec![0, 1, 2, 3], vec![4], Some(0)));
        assert_eq!(pipeline.step_locations[2], "outputs.raw.when");
    }

    #[test]
    fn a_lone_sink_keeps_its_steps_and_fingerprints() {
        let steps = "  - dedup: { key: [user], within: 1m }";
        let lone = planned("", steps);
        let named = with_outputs(steps, "  only:\n    sink: { topic: out }").unwrap_or_else(|problems| panic!("{problems}"));
        assert_eq!(lone.state_fingerprint(0), named.state_fingerprint(0));
        assert!(!lone.has_named_outputs() && named.has_named_outputs());
        assert_eq!(lone.avro_record_name(0), "p");
        assert_eq!(named.avro_record_name(0), "p-only");
    }

    #[test]
    fn output_problems_name_the_output() {
        let steps = "  - filter: \"amount > 0\"\n  - filter: \"amount < 9\"";
        let outputs = "  a:\n    from: filter\n    sink: { topic: x }\n  b:\n    from: 7\n    sink: { topic: y }\n  c:\n    from: window\n    sink: { topic: z }\n  d:\n    when: \"nobody > 1\"\n    steps: [ { drop: [ghost] } ]\n    sink: { topic: w }\n  e:\n    sink: { topic: v, key: [ghost] }";
        let problems = with_outputs(steps, outputs).unwrap_err();
        assert_eq!(
            locations(&problems),
            ["outputs.a.from", "outputs.b.from", "outputs.c.from", "outputs.d.when", "outputs.d.steps[0].drop", "outputs.e.sink.key"],
            "{problems}"
        );
        let text = problems.to_string();
        assert!(text.contains("steps 0 and 1 are all filters") && text.contains("there is no step 7"), "{text}");
        // Outputs never share a topic, nor write the DLQ's.
        let outputs = "  a:\n    sink: { topic: x }\n  b:\n    sink: { topic: x }\n  c:\n    sink: { topic: p.dlq }";
        let problems = with_outputs(steps, outputs).unwrap_err();
        assert_eq!(locations(&problems), ["outputs.b.sink.topic", "dlq.topic"], "{problems}");
    }

    #[test]
    fn an_upsert_output_is_checked_along_its_own_steps() {
        let steps = "  - window: { group_by: [user], tumbling: 1m, aggregates: { n: count() }, emit: update }";
        // A transactional output may follow an update-mode window; an upsert one may not.
        let outputs = "  live:\n    sink: { topic: live }\n  ids:\n    sink: { topic: ids, mode: idempotent_upsert, key: [user] }";
        let problems = with_outputs(steps, outputs).unwrap_err();
        assert_eq!(locations(&problems), ["steps[0].window.emit", "outputs.ids.sink.key"], "{problems}");
        // With one transactional output, the pipeline commits in transactions: an upsert
        // output there may sit behind two repartitions.
        let steps = "  - dedup: { key: [page], within: 1m }\n  - window: { group_by: [user], tumbling: 1m, aggregates: { n: count() } }";
        let outputs = "  all:\n    sink: { topic: all }\n  ids:\n    sink: { topic: ids, mode: idempotent_upsert }";
        let mixed = with_outputs(steps, outputs).unwrap_or_else(|problems| panic!("{problems}"));
        assert_eq!(mixed.mode(), DeliveryMode::Transactional);
        let alone = with_outputs(steps, "  ids:\n    sink: { topic: ids, mode: idempotent_upsert }").unwrap_err();
        assert_eq!(locations(&alone), ["outputs.ids.sink.mode"], "{alone}");
    }
}

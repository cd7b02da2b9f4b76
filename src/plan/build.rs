//! Building the plan from a pipeline file: each step's config read from its body against the
//! schema of the records it sees, the outputs hung off the main steps, and the parts checked
//! against each other.

use super::sink::{check_formats, check_upsert, settle_sink_headers};
use super::{Output, Pipeline};
use crate::config::{check_fields, ConfigErrors, DeliveryMode, OutputEntry, PipelineFile, Schema, Source, SourceTopics, StepEntry, StepRef};
use crate::operators::filter::config::Filter;
use crate::operators::join::config::{check_section, parse_join};
use crate::operators::Step;

/// Checks the parts of a pipeline file against each other and builds the pipeline: each
/// step's config from its body (read by the step's own config), the fields steps and sinks
/// name, the outputs' `from` and `when`, the formats, the mode. Every problem goes into
/// `problems`; None when any part is missing.
pub fn build(file: PipelineFile, problems: &mut ConfigErrors) -> Option<Pipeline> {
    let PipelineFile { name, sources, join, steps: entries, outputs, on_error, dlq_topic, document } = file;
    // Tables are read whole for lookups; the other sources are the streams.
    let (tables, sources): (Option<Vec<Source>>, Option<Vec<Source>>) = match sources {
        Some(sources) => {
            let (tables, streams) = sources.into_iter().partition(|source| source.table.is_some());
            (Some(tables), Some(streams))
        }
        None => (None, None),
    };
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
    let start = steps_source.map(Source::record_schema);
    let outputs = outputs.unwrap_or_default();
    // Upsert outputs' ids of join results name where each side was read.
    let upsert = outputs.iter().any(|output| output.sink.mode == DeliveryMode::IdempotentUpsert);
    // The main steps, each with the schema of the records it hands on; a join is step 0, its
    // own step, not read from `steps`.
    let mut main = Branch::default();
    let joined = join.is_some();
    if let Some(mut join) = join {
        join.keep_sources = upsert;
        main.push(Some(Step::Join(Box::new(join))), "join", "join".to_string(), start.clone());
    }
    main.read(&entries, start.clone(), tables.as_deref(), problems);
    let mut branches = Vec::with_capacity(outputs.len());
    for output in &outputs {
        let from = resolve_from(output, &main.kinds, problems);
        let input = match from {
            Ok(Some(step)) => main.schemas[step].clone(),
            Ok(None) => start.clone(),
            Err(()) => None,
        };
        let mut branch = Branch::default();
        if let Some(when) = &output.when {
            let location = format!("{}.when", output.location);
            let filter = Filter::check(when, input.as_ref(), &location, problems).map(Step::Filter);
            branch.push(filter, "filter", location, input.clone());
        }
        branch.read(&output.steps, input.clone(), tables.as_deref(), problems);
        let schema = branch.schemas.last().cloned().unwrap_or(input);
        check_fields(&output.sink.key, schema.as_ref(), &format!("{}.key", output.sink.location), problems);
        branches.push((from, branch));
    }
    // Whether a step that reads the watermark is there, even one whose body has problems of
    // its own.
    let timed = entries.iter().chain(outputs.iter().flat_map(|output| &output.steps)).any(Step::entry_needs_event_time);
    if let (true, Some(source), false) = (timed, &source, joined) {
        const WHY: &str = "is required by dedup and window steps and an aggregate's ttl";
        if source.event_time.is_none() {
            problems.push(format!("sources.{}.event_time", source.name), WHY);
        }
        if source.watermark.is_none() {
            problems.push(format!("sources.{}.watermark", source.name), WHY);
        }
    }
    let (name, source, on_error, dlq_topic) = (name?, source?, on_error?, dlq_topic?);
    let (mut steps, mut step_locations) = (Vec::new(), Vec::new());
    main.take_into(&mut steps, &mut step_locations)?;
    let main_steps = steps.len();
    // An output with problems of its own is left out, so that the others are still checked
    // against each other; the pipeline is then not built.
    let mut planned = Vec::with_capacity(outputs.len());
    let mut complete = true;
    for (output, (from, branch)) in outputs.into_iter().zip(branches) {
        let first = steps.len();
        match (from, branch.take_into(&mut steps, &mut step_locations)) {
            (Ok(from), Some(())) => {
                let OutputEntry { name, sink, .. } = output;
                planned.push(Output { name, from, steps: (first..steps.len()).collect(), sink });
            }
            _ => complete = false,
        }
    }
    if planned.is_empty() {
        return None;
    }
    let dlq_topic = dlq_topic.unwrap_or_else(|| format!("{name}.dlq"));
    for (index, output) in planned.iter().enumerate() {
        let sink = &output.sink;
        if dlq_topic == sink.topic {
            problems.push("dlq.topic", format!("must differ from {}.topic", sink.location));
        }
        if let Some(other) = planned[..index].iter().find(|other| other.sink.topic == sink.topic) {
            problems.push(
                format!("{}.topic", sink.location),
                format!("output '{}' writes '{}' too: give each output its own topic", other.name, sink.topic),
            );
        }
    }
    let mut pipeline = Pipeline { name, source, steps, main_steps, step_locations, outputs: planned, on_error, dlq_topic, tables: tables.unwrap_or_default() };
    for output in 0..pipeline.outputs.len() {
        settle_sink_headers(&mut pipeline, output, problems);
        check_formats(&pipeline, output, problems);
    }
    if upsert {
        check_upsert(&pipeline, problems);
    }
    check_patterns(&pipeline, problems);
    // `weir schema pipeline` must take every file weir takes (tests run debug builds).
    debug_assert!(
        !(complete && problems.is_empty()) || super::schema::pipeline_accepts(&document),
        "the JSON Schema refuses a pipeline weir takes: {document:?}"
    );
    complete.then_some(pipeline)
}

/// State lives in changelog partitions numbered like the input's partitions, which a topic
/// pattern does not fix (a topic that appears later may have another count): stateful steps
/// need a topic list. Said here rather than when `weir run` reaches the cluster.
fn check_patterns(pipeline: &Pipeline, problems: &mut ConfigErrors) {
    if pipeline.stateful_steps().is_empty() {
        return;
    }
    for source in pipeline.sources() {
        if let SourceTopics::Pattern(pattern) = &source.topics {
            problems.push(
                format!("sources.{}.pattern", source.name),
                format!("'{pattern}': stateful steps (dedup, window, aggregate, join) need the source's topics listed (`topics: [...]`), not a pattern"),
            );
        }
    }
}

/// Steps read in a line, each against the schema of the records the one before it hands on.
#[derive(Default)]
struct Branch {
    steps: Vec<Option<Step>>,
    kinds: Vec<String>,
    locations: Vec<String>,
    /// The schema each step hands on; None where it is not known (after a step with
    /// problems, whose followers are then checked less).
    schemas: Vec<Option<Schema>>,
}

impl Branch {
    fn read(&mut self, entries: &[StepEntry], input: Option<Schema>, tables: Option<&[Source]>, problems: &mut ConfigErrors) {
        let mut input = input;
        for entry in entries {
            let step = Step::parse(entry, input.as_ref(), tables, problems);
            input = match (&step, input) {
                (Some(step), Some(schema)) => Some(step.output_schema(schema)),
                (None, Some(schema)) if Step::kind_keeps_schema(&entry.kind) => Some(schema),
                _ => None,
            };
            self.push(step, &entry.kind, entry.location.clone(), input.clone());
        }
    }

    fn push(&mut self, step: Option<Step>, kind: &str, location: String, after: Option<Schema>) {
        self.steps.push(step);
        self.kinds.push(kind.to_string());
        self.locations.push(location);
        self.schemas.push(after);
    }

    /// Appends the steps; None (appending nothing) when one of them had problems.
    fn take_into(self, steps: &mut Vec<Step>, locations: &mut Vec<String>) -> Option<()> {
        if self.steps.iter().any(Option::is_none) {
            return None;
        }
        for (step, location) in self.steps.into_iter().zip(self.locations) {
            steps.push(step?);
            locations.push(location);
        }
        Some(())
    }
}

/// The main step an output's `from` names (its number as `weir validate` prints it, or its
/// kind when one main step has it); by default the last. Ok(None): there are no main steps,
/// the output takes the records as read.
fn resolve_from(output: &OutputEntry, kinds: &[String], problems: &mut ConfigErrors) -> Result<Option<usize>, ()> {
    let location = format!("{}.from", output.location);
    let numbers = match kinds.len() {
        0 => "there are no steps".to_string(),
        1 => "the only step is 0".to_string(),
        count => format!("the steps are 0 to {}", count - 1),
    };
    match &output.from {
        None => Ok(kinds.len().checked_sub(1)),
        Some(StepRef::Number(number)) if *number < kinds.len() => Ok(Some(*number)),
        Some(StepRef::Number(number)) => {
            problems.push(location, format!("there is no step {number}: {numbers} (as `weir validate` numbers them)"));
            Err(())
        }
        Some(StepRef::Kind(kind)) => {
            let matching: Vec<usize> = kinds.iter().enumerate().filter(|(_, written)| *written == kind).map(|(index, _)| index).collect();
            match matching.as_slice() {
                [step] => Ok(Some(*step)),
                [] => {
                    let written: Vec<&str> = kinds.iter().map(String::as_str).collect();
                    problems.push(location, format!("no step is a {kind} (the steps: {}); name a step by its kind or number", written.join(", ")));
                    Err(())
                }
                several => {
                    let numbers: Vec<String> = several.iter().map(usize::to_string).collect();
                    problems.push(location, format!("steps {} are all {kind}s: name one by its number", numbers.join(" and ")));
                    Err(())
                }
            }
        }
    }
}

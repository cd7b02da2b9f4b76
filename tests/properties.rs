//! Property tests: for input that is not late, `emit: final`, dedup, and the last value per
//! (key, window) of `emit: update` and per key of a running aggregate do not depend on batch
//! sizes or on how partitions interleave.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const OUT_OF_ORDERNESS: i64 = 3_000;

fn pipeline(steps: &str) -> weir::plan::Pipeline {
    pipeline_with(steps, "")
}

/// `sink_extra`: more lines of the sink section (e.g. its mode).
fn pipeline_with(steps: &str, sink_extra: &str) -> weir::plan::Pipeline {
    let text = pipeline_text(steps, sink_extra);
    weir::plan::parse_pipeline(&text).unwrap_or_else(|problems| panic!("{problems}"))
}

fn pipeline_text(steps: &str, sink_extra: &str) -> String {
    format!(
        r#"name: props
sources:
  events:
    topics: [events]
    format: json
    schema: {{ id: string, k: string, v: long, ts: long }}
    event_time: {{ field: ts, unit: millis }}
    watermark: {{ max_out_of_orderness: 3s }}
steps:
{steps}
sink:
  topic: out
{sink_extra}"#
    )
}

/// Per partition, records in roughly increasing event time (never behind their own
/// partition's watermark, so nothing is late anywhere), with keys repeating across partitions.
/// A fifth of the events are sent twice, to two partitions, as identical records: the
/// duplicates dedup exists for. (Which of two *different* records with one id comes first
/// depends on interleaving by definition, so those are not generated.)
fn partitions(rng: &mut StdRng) -> Vec<Vec<String>> {
    let mut partitions = vec![Vec::new(); 3];
    let mut base = rng.random_range(0..20_000i64);
    for id in 0..rng.random_range(60..150) {
        base += rng.random_range(0..600);
        let time = base + rng.random_range(0..OUT_OF_ORDERNESS);
        let line = format!(
            r#"{{"source":"events","partition":PARTITION,"value":{{"id":"e{id}","k":"k{}","v":{},"ts":{time}}}}}"#,
            rng.random_range(0..4),
            rng.random_range(-5..50),
        );
        let first = rng.random_range(0..3usize);
        partitions[first].push(line.replace("PARTITION", &first.to_string()));
        if rng.random_range(0..5) == 0 {
            let second = (first + rng.random_range(1..3usize)) % 3;
            partitions[second].push(line.replace("PARTITION", &second.to_string()));
        }
    }
    partitions
}

/// A random interleaving that keeps each partition's own order.
fn interleave(rng: &mut StdRng, partitions: &[Vec<String>]) -> String {
    let mut cursors = vec![0; partitions.len()];
    let mut lines = Vec::new();
    loop {
        let open: Vec<usize> = (0..partitions.len()).filter(|p| cursors[*p] < partitions[*p].len()).collect();
        if open.is_empty() {
            return lines.join("\n");
        }
        let partition = open[rng.random_range(0..open.len())];
        lines.push(partitions[partition][cursors[partition]].clone());
        cursors[partition] += 1;
    }
}

fn sorted(mut lines: Vec<String>) -> Vec<String> {
    lines.sort();
    lines
}

/// The table an upsert reader ends with: last value per key, tombstones deleting.
fn upsert_table(lines: &[String]) -> BTreeMap<String, Value> {
    let mut table = BTreeMap::new();
    for line in lines {
        let record: Value = serde_json::from_str(line).unwrap();
        let key = record["key"].to_string();
        match &record["value"] {
            Value::Null => table.remove(&key),
            value => table.insert(key, value.clone()),
        };
    }
    table
}

fn check(steps: &str, compare_as_upserts: bool) {
    let pipeline = pipeline(steps);
    for seed in 0..25u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let partitions = partitions(&mut rng);
        let reference_input = interleave(&mut rng, &partitions);
        let reference = weir::testing::run(&pipeline, &reference_input, 1000).unwrap();
        assert!(!reference.is_empty(), "seed {seed}: the pipeline produced nothing");
        assert!(reference.iter().all(|line| !line.contains("weir-error-stage")), "seed {seed}: input was meant to be on time");
        for batch_size in [1, 2, 7, 50] {
            let input = interleave(&mut rng, &partitions);
            let output = weir::testing::run(&pipeline, &input, batch_size).unwrap();
            if compare_as_upserts {
                assert_eq!(upsert_table(&output), upsert_table(&reference), "seed {seed}, batch size {batch_size}");
            } else {
                assert_eq!(sorted(output.clone()), sorted(reference.clone()), "seed {seed}, batch size {batch_size}");
            }
        }
    }
}

#[test]
fn dedup_output_is_the_same_set_for_any_batching_and_interleaving() {
    check("  - dedup: { key: [id], within: 5s }", false);
}

#[test]
fn tumbling_final_output_is_the_same_set() {
    check("  - window: { group_by: [k], tumbling: 5s, aggregates: { n: count(), s: sum(v), f: first(id), l: last(id) } }", false);
}

#[test]
fn hopping_final_output_is_the_same_set() {
    check("  - window: { group_by: [k], hopping: { size: 6s, slide: 2s }, aggregates: { n: count(), lo: min(v), hi: max(v) } }", false);
}

#[test]
fn session_final_output_is_the_same_set() {
    check("  - window: { group_by: [k], session: { gap: 2s }, aggregates: { n: count(), s: sum(v), d: count_distinct(id) } }", false);
}

#[test]
fn update_mode_ends_with_the_same_value_per_key_and_window() {
    check("  - window: { group_by: [k], tumbling: 5s, emit: update, aggregates: { n: count(), a: avg(v) } }", true);
    check("  - window: { group_by: [k], session: { gap: 2s }, emit: update, aggregates: { n: count(), s: sum(v) } }", true);
}

/// A running aggregate's last value per key (every function: `first`/`last` follow event
/// time, so neither interleaving nor batching changes them) whatever the batches and the
/// interleaving; the same after a dedup.
#[test]
fn running_aggregates_end_with_the_same_value_per_key() {
    check("  - aggregate: { group_by: [k], aggregates: { n: count(), s: sum(v), a: avg(v), lo: min(v), hi: max(v), d: count_distinct(id) } }", true);
    check("  - dedup: { key: [id], within: 5s }\n  - aggregate: { group_by: [k], aggregates: { n: count(), s: sum(v) } }", true);
}

#[test]
fn dedup_then_window_is_the_same_set() {
    check("  - dedup: { key: [id], within: 5s }\n  - window: { group_by: [k], tumbling: 5s, aggregates: { n: count() } }", false);
}

/// Rebuilding every step's state from its changelog after each few commits (as a restarted
/// process does) gives exactly the output of the uninterrupted run.
#[test]
fn restoring_state_from_the_changelog_changes_nothing() {
    let cases = [
        "  - dedup: { key: [id], within: 5s }",
        "  - window: { group_by: [k], tumbling: 5s, aggregates: { n: count(), s: sum(v), f: first(id), l: last(id), d: count_distinct(id), a: avg(v) } }",
        "  - window: { group_by: [k], hopping: { size: 6s, slide: 2s }, aggregates: { n: count(), lo: min(v), hi: max(v) } }",
        "  - window: { group_by: [k], session: { gap: 2s }, emit: update, aggregates: { n: count(), s: sum(v) } }",
        "  - dedup: { key: [id], within: 5s }\n  - window: { group_by: [k], tumbling: 5s, emit: update, aggregates: { n: count() } }",
        "  - aggregate: { group_by: [k], aggregates: { n: count(), s: sum(v), f: first(id), l: last(id), d: count_distinct(id), a: avg(v) } }",
        "  - aggregate: { group_by: [k], aggregates: { n: count(), l: last(id) }, ttl: 4s, on_expire: tombstone }",
    ];
    for steps in cases {
        let pipeline = pipeline(steps);
        for seed in 0..15u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let partitions = partitions(&mut rng);
            let input = interleave(&mut rng, &partitions);
            for batch_size in [1, 5, 20] {
                let straight = weir::testing::run(&pipeline, &input, batch_size).unwrap();
                for every in [1, 3] {
                    let restarted = weir::testing::run_with_restarts(&pipeline, &input, batch_size, Some(every)).unwrap();
                    if restarted != straight {
                        let only_straight: Vec<_> = straight.iter().filter(|line| !restarted.contains(line)).collect();
                        let only_restarted: Vec<_> = restarted.iter().filter(|line| !straight.contains(line)).collect();
                        panic!("{steps}: seed {seed}, batch size {batch_size}, restart every {every}:\nonly without restarts: {only_straight:?}\nonly with restarts: {only_restarted:?}\n{} vs {} lines", straight.len(), restarted.len());
                    }
                }
            }
        }
    }
}

/// What `weir run` does with a pipeline that repartitions, in memory: later stages read
/// what earlier ones forward through (simulated) repartition topics, which a batch makes
/// visible only when it commits, with watermarks travelling alongside; input and forwarded
/// records interleave at random, and every few batches the engine restarts from its
/// changelog. The closed results equal `weir test`'s.
mod distributed {
    use std::collections::{BTreeMap, VecDeque};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::Value;
    use weir::engine::{ChangelogEntry, Destination, Engine, ForwardHeaders, InputRecord, Output};
    use weir::operators::{InputHeaders, Provenance};

    const PARTITIONS: usize = 3;

    /// One record per partition an hour after the rest: every real window closes.
    fn with_flush(mut partitions: Vec<Vec<String>>) -> Vec<Vec<String>> {
        for (partition, lines) in partitions.iter_mut().enumerate() {
            lines.push(format!(
                r#"{{"source":"events","partition":{partition},"value":{{"id":"flush","k":"flush","v":0,"ts":99999999999}}}}"#
            ));
        }
        partitions
    }

    /// Sink values as JSON text, without anything the flush records made.
    fn closed_results(values: impl Iterator<Item = Value>) -> Vec<String> {
        let mut results: Vec<String> = values.map(|value| value.to_string()).filter(|text| !text.contains("flush")).collect();
        results.sort();
        results
    }

    fn local(pipeline: &weir::plan::Pipeline, partitions: &[Vec<String>], rng: &mut StdRng) -> Vec<String> {
        let input = super::interleave(rng, partitions);
        let lines = weir::testing::run(pipeline, &input, 10).unwrap();
        let values = lines.iter().map(|line| serde_json::from_str::<Value>(line).unwrap()).filter(|line| line["topic"] == "out");
        closed_results(values.map(|line| line["value"].clone()))
    }

    struct Simulation<'p> {
        pipeline: &'p weir::plan::Pipeline,
        engine: Engine,
        /// Committed records of each (stage, repartition partition), not yet read.
        topics: BTreeMap<(usize, i32), VecDeque<Output>>,
        /// Forwarded in the open batch: visible once it commits.
        pending: Vec<Output>,
        changelog: BTreeMap<(Option<String>, i32, usize, String), Value>,
        /// (output index, value) of every sink record.
        sink: Vec<(usize, Value)>,
        dlq: Vec<Output>,
    }

    impl Simulation<'_> {
        fn engine(pipeline: &weir::plan::Pipeline) -> Engine {
            let mut engine = Engine::new(pipeline).unwrap();
            engine.distribute(PARTITIONS as u32, PARTITIONS);
            engine
        }

        fn collect(&mut self, outputs: Vec<Output>) {
            for output in outputs {
                match output.destination {
                    Destination::Repartition(_) => self.pending.push(output),
                    Destination::Sink(index) => self.sink.push((index, serde_json::from_slice(output.value.own().unwrap()).unwrap())),
                    Destination::Dlq => self.dlq.push(output),
                }
            }
        }

        fn read_input(&mut self, partition: usize, offset: i64, line: &str) {
            let line: Value = serde_json::from_str(line).unwrap();
            let value = line["value"].to_string().into_bytes();
            let input = InputRecord {
                provenance: Provenance { topic: "events", partition: partition as i32, offset, timestamp: None, headers: InputHeaders::Read(&[]), key: None },
                key: None,
                value: Some(&value),
            };
            let mut outputs = Vec::new();
            self.engine.process_kept(&input, &mut outputs).unwrap();
            self.collect(outputs);
        }

        fn read_forwarded(&mut self, stage: usize, partition: i32) {
            let Some(record) = self.topics.get_mut(&(stage, partition)).and_then(VecDeque::pop_front) else { return };
            let outputs = run_forwarded(&mut self.engine, stage, partition, &record);
            self.collect(outputs);
        }

        fn commit(&mut self) {
            let mut outputs = Vec::new();
            self.engine.end_batch(&mut outputs).unwrap();
            self.collect(outputs);
            for output in self.pending.drain(..) {
                let Destination::Repartition(stage) = output.destination else { unreachable!() };
                self.topics.entry((stage, output.partition.unwrap())).or_default().push_back(output);
            }
            for entry in self.engine.take_changes() {
                let key = (entry.topic, entry.partition, entry.step, entry.key);
                match entry.value {
                    Some(value) => self.changelog.insert(key, value),
                    None => self.changelog.remove(&key),
                };
            }
        }

        fn restart(&mut self) {
            self.engine = Simulation::engine(self.pipeline);
            for ((topic, partition, step, key), value) in &self.changelog {
                let entry =
                    ChangelogEntry { topic: topic.clone(), partition: *partition, step: *step, key: key.clone(), value: Some(value.clone()) };
                self.engine.restore(&entry).unwrap();
            }
        }

        fn waiting(&self) -> Vec<(usize, i32)> {
            self.topics.iter().filter(|(_, records)| !records.is_empty()).map(|(at, _)| *at).collect()
        }
    }

    /// Runs a record read from a repartition topic through `engine`, as the loop does.
    fn run_forwarded(engine: &mut Engine, stage: usize, partition: i32, record: &Output) -> Vec<Output> {
        let headers: Vec<(&str, Option<&[u8]>)> = record.headers.iter().map(|(name, value)| (name.as_str(), Some(value.as_slice()))).collect();
        let forwarded = ForwardHeaders::parse(&headers).unwrap();
        let (topic, source_partition, offset, _) = forwarded.source.clone().unwrap_or(("events".into(), 0, 0, None));
        let input = InputRecord {
            provenance: Provenance { topic: &topic, partition: source_partition, offset, timestamp: None, headers: InputHeaders::Read(&[]), key: None },
            key: None,
            value: record.value.own(),
        };
        let mut outputs = Vec::new();
        engine.process_forwarded_kept(&input, stage, partition, &forwarded, &mut outputs).unwrap();
        outputs
    }

    fn distributed(pipeline: &weir::plan::Pipeline, partitions: &[Vec<String>], rng: &mut StdRng) -> Vec<String> {
        let mut simulation = Simulation {
            pipeline,
            engine: Simulation::engine(pipeline),
            topics: BTreeMap::new(),
            pending: Vec::new(),
            changelog: BTreeMap::new(),
            sink: Vec::new(),
            dlq: Vec::new(),
        };
        let mut cursors = [0usize; PARTITIONS];
        let (batch, restart_every) = (rng.random_range(1..12), rng.random_range(2..6));
        let mut steps = 0;
        let mut commits = 0;
        loop {
            let inputs: Vec<usize> = (0..PARTITIONS).filter(|p| cursors[*p] < partitions[*p].len()).collect();
            let waiting = simulation.waiting();
            if inputs.is_empty() && waiting.is_empty() {
                simulation.commit();
                if simulation.waiting().is_empty() {
                    break;
                }
                continue;
            }
            if !waiting.is_empty() && (inputs.is_empty() || rng.random_bool(0.5)) {
                let (stage, partition) = waiting[rng.random_range(0..waiting.len())];
                simulation.read_forwarded(stage, partition);
            } else {
                let partition = inputs[rng.random_range(0..inputs.len())];
                simulation.read_input(partition, cursors[partition] as i64, &partitions[partition][cursors[partition]]);
                cursors[partition] += 1;
            }
            steps += 1;
            if steps % batch == 0 {
                simulation.commit();
                commits += 1;
                // Not once the input is spent: a restart repeats its watermark broadcasts.
                if commits % restart_every == 0 && !inputs.is_empty() {
                    simulation.restart();
                }
            }
        }
        assert!(simulation.dlq.is_empty(), "nothing is late here: {:?}", simulation.dlq);
        closed_results(simulation.sink.into_iter().map(|(output, value)| match pipeline.outputs.len() {
            1 => value,
            _ => serde_json::json!([output, value]),
        }))
    }

    fn check(steps: &str) {
        let pipeline = super::pipeline(steps);
        for seed in 0..20u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let partitions = with_flush(super::partitions(&mut rng));
            let expected = local(&pipeline, &partitions, &mut rng);
            assert!(!expected.is_empty(), "seed {seed}: nothing to compare");
            for run in 0..3 {
                assert_eq!(distributed(&pipeline, &partitions, &mut rng), expected, "{steps}: seed {seed}, run {run}");
            }
        }
    }

    /// A partition that delivers nothing holds every repartitioned window open, until the
    /// runtime declares it idle (`idle_timeout`); its next record makes it count again.
    #[test]
    fn an_idle_partition_stops_holding_back_the_watermark() {
        let pipeline = super::pipeline("  - window: { group_by: [k], tumbling: 5s, aggregates: { n: count() } }");
        let mut simulation = Simulation {
            pipeline: &pipeline,
            engine: Simulation::engine(&pipeline),
            topics: BTreeMap::new(),
            pending: Vec::new(),
            changelog: BTreeMap::new(),
            sink: Vec::new(),
            dlq: Vec::new(),
        };
        let line = |id: u64, ts: u64| format!(r#"{{"value":{{"id":"e{id}","k":"k{}","v":1,"ts":{ts}}}}}"#, id % 2);
        let drain = |simulation: &mut Simulation| loop {
            simulation.commit();
            let waiting = simulation.waiting();
            if waiting.is_empty() {
                break;
            }
            for (stage, partition) in waiting {
                simulation.read_forwarded(stage, partition);
            }
        };
        // Partitions 0 and 1 deliver 60 s of event time; partition 2 nothing.
        for id in 0..120u64 {
            simulation.read_input((id % 2) as usize, id as i64, &line(id, id * 500));
        }
        drain(&mut simulation);
        assert!(simulation.sink.is_empty(), "closed while a partition had not spoken: {:?}", simulation.sink);

        simulation.engine.set_idle_inputs([("events".to_string(), 2)]);
        drain(&mut simulation);
        // The watermark is 59.5 s - 3 s: windows up to [50 s, 55 s) close, for both keys.
        assert_eq!(simulation.sink.len(), 22, "{:?}", simulation.sink);
        assert!(simulation.sink.iter().all(|(_, result)| result["window_end"].as_i64().unwrap() <= 55_000));

        // Partition 2 speaks again, far behind: the watermark does not go back (its record is
        // late). Once its messages reach every task it counts again: with it at 77 s and the
        // others at 66.5 s, windows up to [60 s, 65 s) are closed, each once.
        simulation.read_input(2, 0, &line(1000, 10_000));
        for id in 120..140u64 {
            simulation.read_input((id % 2) as usize, id as i64, &line(id, id * 500));
        }
        drain(&mut simulation);
        assert_eq!(simulation.dlq.len(), 1, "the waking partition's old record is late");
        simulation.read_input(2, 1, &line(1001, 80_000));
        drain(&mut simulation);
        let mut windows: Vec<(String, i64)> = simulation
            .sink
            .iter()
            .map(|(_, result)| (result["k"].as_str().unwrap().to_string(), result["window_end"].as_i64().unwrap()))
            .collect();
        windows.sort();
        windows.dedup();
        assert_eq!((windows.len(), simulation.sink.len()), (26, 26), "{:?}", simulation.sink);
    }

    /// `mode: idempotent_upsert`, where nothing is transactional: a forward is in its
    /// repartition topic once sent, and a crash loses what the store has not got, the state
    /// and offsets of the batch under way. The stage-0 tasks then replay it, forwarding again
    /// what they forwarded before, and the receiving tasks drop the copies. Returns the last
    /// value of every id, and how many crashes there were.
    fn upserted(pipeline: &weir::plan::Pipeline, partitions: &[Vec<String>], rng: &mut StdRng) -> (Vec<String>, usize) {
        type Store = BTreeMap<(Option<String>, i32, usize, String), Value>;
        let restored = |store: &Store| {
            let mut engine = Simulation::engine(pipeline);
            for ((topic, partition, step, key), value) in store {
                let entry = ChangelogEntry { topic: topic.clone(), partition: *partition, step: *step, key: key.clone(), value: Some(value.clone()) };
                engine.restore(&entry).unwrap();
            }
            engine
        };
        let mut engine = Simulation::engine(pipeline);
        let mut topics: BTreeMap<(usize, i32), Vec<Output>> = BTreeMap::new();
        // Records read so far from each (stage, repartition partition): now, and as stored.
        let (mut read, mut saved_read) = (BTreeMap::<(usize, i32), usize>::new(), BTreeMap::<(usize, i32), usize>::new());
        let (mut cursors, mut saved_cursors) = ([0usize; PARTITIONS], [0usize; PARTITIONS]);
        let mut store = Store::new();
        let mut last: BTreeMap<String, Value> = BTreeMap::new();
        let collect = |outputs: Vec<Output>, topics: &mut BTreeMap<(usize, i32), Vec<Output>>, last: &mut BTreeMap<String, Value>| {
            for output in outputs {
                match output.destination {
                    Destination::Repartition(stage) => topics.entry((stage, output.partition.unwrap())).or_default().push(output),
                    Destination::Sink(_) => {
                        let id = output.headers.iter().find(|(name, _)| name == "weir-id").expect("an upsert output has an id");
                        last.insert(String::from_utf8(id.1.clone()).unwrap(), serde_json::from_slice(output.value.own().unwrap()).unwrap());
                    }
                    Destination::Dlq => panic!("nothing is late here: {output:?}"),
                }
            }
        };
        let (batch, mut steps, mut crashes) = (rng.random_range(1..12), 0, 0);
        loop {
            let inputs: Vec<usize> = (0..PARTITIONS).filter(|p| cursors[*p] < partitions[*p].len()).collect();
            let waiting: Vec<(usize, i32)> =
                topics.iter().filter(|(at, records)| read.get(*at).copied().unwrap_or(0) < records.len()).map(|(at, _)| *at).collect();
            let mut outputs = Vec::new();
            if !waiting.is_empty() && (inputs.is_empty() || rng.random_bool(0.5)) {
                let at = waiting[rng.random_range(0..waiting.len())];
                let position = read.entry(at).or_insert(0);
                outputs = run_forwarded(&mut engine, at.0, at.1, &topics[&at][*position]);
                *position += 1;
            } else if let Some(&partition) = inputs.get(rng.random_range(0..inputs.len().max(1))) {
                let line: Value = serde_json::from_str(&partitions[partition][cursors[partition]]).unwrap();
                let value = line["value"].to_string().into_bytes();
                let provenance = Provenance { topic: "events", partition: partition as i32, offset: cursors[partition] as i64, timestamp: None, headers: InputHeaders::Read(&[]), key: None };
                let input = InputRecord { provenance, key: None, value: Some(&value) };
                engine.process_kept(&input, &mut outputs).unwrap();
                cursors[partition] += 1;
            }
            collect(outputs, &mut topics, &mut last);
            steps += 1;
            let spent = inputs.is_empty() && waiting.is_empty();
            if steps % batch == 0 || spent {
                // A crash before the batch is stored (never once the input is spent).
                if !spent && rng.random_bool(0.25) {
                    engine = restored(&store);
                    (cursors, read) = (saved_cursors, saved_read.clone());
                    crashes += 1;
                    continue;
                }
                let mut outputs = Vec::new();
                engine.end_batch(&mut outputs).unwrap();
                collect(outputs, &mut topics, &mut last);
                for entry in engine.take_changes() {
                    let key = (entry.topic, entry.partition, entry.step, entry.key);
                    match entry.value {
                        Some(value) => store.insert(key, value),
                        None => store.remove(&key),
                    };
                }
                (saved_cursors, saved_read) = (cursors, read.clone());
                let unread = topics.iter().any(|(at, records)| read.get(at).copied().unwrap_or(0) < records.len());
                if spent && !unread {
                    break;
                }
            }
        }
        (closed_results(last.into_values()), crashes)
    }

    /// Upsert mode repartitions once: crashes that make stage-0 tasks forward again leave
    /// the last value per id equal to the local run's results.
    #[test]
    fn upsert_replays_through_a_repartition_change_no_last_value() {
        for steps in [
            "  - window: { group_by: [k], tumbling: 5s, aggregates: { n: count(), s: sum(v), f: first(id), l: last(id) } }",
            "  - window: { group_by: [k], session: { gap: 2s }, aggregates: { n: count(), d: count_distinct(id) } }",
        ] {
            let (reference, upsert) = (super::pipeline(steps), super::pipeline_with(steps, "  mode: idempotent_upsert\n"));
            assert_eq!(Engine::new(&upsert).unwrap().stage_count(), 2);
            let mut crashes = 0;
            for seed in 0..20u64 {
                let mut rng = StdRng::seed_from_u64(seed);
                let partitions = with_flush(super::partitions(&mut rng));
                let expected = local(&reference, &partitions, &mut rng);
                assert!(!expected.is_empty(), "seed {seed}: nothing to compare");
                for run in 0..3 {
                    let (results, crashed) = upserted(&upsert, &partitions, &mut rng);
                    assert_eq!(results, expected, "{steps}: seed {seed}, run {run}, {crashed} crashes");
                    crashes += crashed;
                }
            }
            assert!(crashes > 100, "too few crashes to tell: {crashes}");
        }
    }

    #[test]
    fn a_repartitioned_dedup_equals_the_local_run() {
        check("  - dedup: { key: [id], within: 5s }");
    }

    #[test]
    fn repartitioned_windows_equal_the_local_run() {
        check("  - window: { group_by: [k], tumbling: 5s, aggregates: { n: count(), s: sum(v), f: first(id), l: last(id) } }");
        check("  - window: { group_by: [k], session: { gap: 2s }, aggregates: { n: count(), d: count_distinct(id) } }");
    }

    /// Outputs branching off one filter, each with its own steps (a dedup and a window, each
    /// repartitioned on its own, and a stateless `when`), run distributed with restarts:
    /// each output's records are those of its steps written as a pipeline of their own.
    #[test]
    fn each_output_equals_its_steps_run_alone() {
        let main = "  - filter: \"v >= 0\"";
        let branches = [
            ("  - dedup: { key: [id], within: 5s }", ""),
            ("  - window: { group_by: [k], tumbling: 5s, aggregates: { n: count(), s: sum(v) } }", ""),
            ("", "\"v > 25\""),
        ];
        let mut outputs = String::new();
        for (index, (steps, when)) in branches.iter().enumerate() {
            outputs.push_str(&format!("  o{index}:\n    sink: {{ topic: out-{index} }}\n"));
            if !when.is_empty() {
                outputs.push_str(&format!("    when: {when}\n"));
            }
            if !steps.is_empty() {
                outputs.push_str(&format!("    steps:\n{}\n", steps.replace("  - ", "      - ")));
            }
        }
        let text = super::pipeline_text(main, "").replace("sink:\n  topic: out\n", &format!("outputs:\n{outputs}"));
        let branched = weir::plan::parse_pipeline(&text).unwrap_or_else(|problems| panic!("{problems}\n{text}"));
        assert_eq!(branched.stages().stages.len(), 3, "{text}");
        let alone: Vec<weir::plan::Pipeline> = branches
            .iter()
            .map(|(steps, when)| {
                let when = if when.is_empty() { String::new() } else { format!("\n  - filter: {when}") };
                super::pipeline(&format!("{main}{when}\n{steps}").trim_end().replace("\n\n", "\n"))
            })
            .collect();
        for seed in 0..12u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let partitions = with_flush(super::partitions(&mut rng));
            let mut expected: Vec<String> = Vec::new();
            for (index, pipeline) in alone.iter().enumerate() {
                let values = local(pipeline, &partitions, &mut rng);
                assert!(!values.is_empty(), "seed {seed}: output {index} has nothing to compare");
                expected.extend(values.iter().map(|value| serde_json::json!([index, serde_json::from_str::<Value>(value).unwrap()]).to_string()));
            }
            expected.sort();
            for run in 0..2 {
                assert_eq!(distributed(&branched, &partitions, &mut rng), expected, "seed {seed}, run {run}");
            }
        }
    }

    #[test]
    fn two_repartitions_in_a_row_equal_the_local_run() {
        check("  - dedup: { key: [id], within: 5s }\n  - window: { group_by: [k], tumbling: 5s, aggregates: { n: count(), s: sum(v) } }");
    }
}

/// The interval join: its output set does not depend on batch sizes or interleaving, and a
/// join restored from its changelog goes on exactly as the uninterrupted one.
mod join {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn pipeline(kind: &str, steps: &str) -> weir::plan::Pipeline {
        pipeline_of(kind, steps, false)
    }

    /// `in_place`: both sources say their producers key them by `k`, so the join runs in
    /// the tasks of the partition pairs instead of after a repartition.
    fn pipeline_of(kind: &str, steps: &str, in_place: bool) -> weir::plan::Pipeline {
        let keyed = if in_place { "    partitioned_by: [k]\n" } else { "" };
        let source = |name: &str| {
            format!(
                "  {name}:\n    topics: [{name}]\n    format: json\n    schema: {{ id: string, k: string, v: long, ts: long }}\n    \
                 event_time: {{ field: ts, unit: millis }}\n    watermark: {{ max_out_of_orderness: 3s }}\n{keyed}"
            )
        };
        let text = format!(
            "name: join-props\nsources:\n{}{}join:\n  left: ads\n  right: clicks\n  type: {kind}\n  on: [k]\n  \
             within: {{ lower: -2s, upper: 4s }}\nsteps:\n{steps}\nsink:\n  topic: out\n",
            source("ads"),
            source("clicks")
        );
        weir::plan::parse_pipeline(&text).unwrap_or_else(|problems| panic!("{problems}"))
    }

    /// Two partitions per side, each in roughly increasing event time (never behind its own
    /// watermark, so never behind the join's), keys repeating on both sides.
    /// Keys k0..k4 anywhere; or, `co_partitioned`, k0..k5 with key n in partition n % 2 of
    /// both sides.
    fn partitions_of(rng: &mut StdRng, co_partitioned: bool) -> Vec<Vec<String>> {
        let mut partitions = vec![Vec::new(); 4];
        for (index, lines) in partitions.iter_mut().enumerate() {
            let source = if index < 2 { "ads" } else { "clicks" };
            let mut base = rng.random_range(0..5_000i64);
            for id in 0..rng.random_range(20..60) {
                base += rng.random_range(0..800);
                let time = base + rng.random_range(0..3_000);
                let key = match co_partitioned {
                    true => 2 * rng.random_range(0..3) + index % 2,
                    false => rng.random_range(0..5),
                };
                lines.push(format!(
                    r#"{{"source":"{source}","partition":{},"value":{{"id":"{source}{index}-{id}","k":"k{key}","v":{},"ts":{time}}}}}"#,
                    index % 2,
                    rng.random_range(0..50),
                ));
            }
        }
        partitions
    }

    fn check(kind: &str, steps: &str) {
        let pipeline = pipeline(kind, steps);
        check_against(&pipeline, &pipeline, false, kind);
    }

    /// `pipeline`'s output over random interleavings and batch sizes, and with restores
    /// every 2 batches, is `reference`'s output over one interleaving in large batches.
    fn check_against(pipeline: &weir::plan::Pipeline, reference_pipeline: &weir::plan::Pipeline, co_partitioned: bool, label: &str) {
        for seed in 0..12u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let partitions = partitions_of(&mut rng, co_partitioned);
            let reference = weir::testing::run(reference_pipeline, &super::interleave(&mut rng, &partitions), 1000).unwrap();
            assert!(reference.len() > 5, "seed {seed}: the join produced little: {reference:?}");
            assert!(reference.iter().all(|line| !line.contains("weir-error-stage")), "seed {seed}: input was meant to be on time");
            for batch_size in [1, 3, 50] {
                let input = super::interleave(&mut rng, &partitions);
                let output = weir::testing::run(pipeline, &input, batch_size).unwrap();
                assert_eq!(super::sorted(output.clone()), super::sorted(reference.clone()), "{label} join, seed {seed}, batch size {batch_size}");
                let restarted = weir::testing::run_with_restarts(pipeline, &input, batch_size, Some(2)).unwrap();
                assert_eq!(super::sorted(restarted), super::sorted(output), "{label} join restored every 2 batches, seed {seed}, batch size {batch_size}");
            }
        }
    }

    /// Co-partitioned inputs: the join run in place (tasks of partition pairs, each with its
    /// own watermark) gives the set the repartitioned join gives, for any batching and
    /// interleaving, and after restores.
    #[test]
    fn a_join_in_place_gives_the_repartitioned_joins_set() {
        for kind in ["inner", "left", "right", "full"] {
            let (in_place, repartitioned) = (pipeline_of(kind, "  []", true), pipeline_of(kind, "  []", false));
            let plan = weir::engine::Engine::new(&in_place).unwrap();
            assert!(plan.join_in_place().is_some() && plan.stage_count() == 1, "{kind}: not in place");
            assert_eq!(weir::engine::Engine::new(&repartitioned).unwrap().stage_count(), 2);
            check_against(&in_place, &repartitioned, true, &format!("{kind} in place"));
        }
        // A later step that repartitions: the join stays in place, its pairs feeding the
        // window's tasks. (Inner: an outer row can be late for the window, at a point that
        // depends on the join's watermark, which differs between the plans.)
        let window = "  - window: { group_by: [clicks.v], tumbling: 5s, aggregates: { n: count(), s: sum(ads.v), d: count_distinct(clicks.id) } }";
        let (in_place, repartitioned) = (pipeline_of("inner", window, true), pipeline_of("inner", window, false));
        let plan = weir::engine::Engine::new(&in_place).unwrap();
        assert!(plan.join_in_place().is_some() && plan.stage_count() == 2, "a window after the join in place");
        assert_eq!(weir::engine::Engine::new(&repartitioned).unwrap().stage_count(), 3);
        check_against(&in_place, &repartitioned, true, "inner in place, then a repartitioned window,");
    }

    #[test]
    fn every_join_type_gives_the_same_set_for_any_batching_and_interleaving() {
        for kind in ["inner", "left", "right", "full"] {
            check(kind, "  []");
        }
    }

    /// In place, a pair whose right partition says nothing holds the pair's watermark until
    /// the runtime declares that partition idle (`idle_timeout`); the batch end then moves
    /// the pair on its left partition alone, and the watermark ends what it passed.
    #[test]
    fn an_idle_side_stops_holding_back_its_pair() {
        use weir::engine::{Engine, InputRecord};
        use weir::operators::{InputHeaders, Provenance};
        let mut engine = Engine::new(&pipeline_of("left", "  []", true)).unwrap();
        assert!(engine.join_in_place().is_some());
        assert!(engine.idle_timeout().is_none(), "no idle_timeout configured here");
        let mut outputs = Vec::new();
        for (offset, ts) in [(0, 1_000), (1, 2_000), (2, 30_000)] {
            let value = format!(r#"{{"id":"a{offset}","k":"k1","v":1,"ts":{ts}}}"#);
            let provenance = Provenance { topic: "ads", partition: 1, offset, timestamp: None, headers: InputHeaders::Read(&[]), key: None };
            engine.process(&InputRecord { provenance, key: None, value: Some(value.as_bytes()) }, &mut outputs).unwrap();
        }
        engine.end_batch(&mut outputs).unwrap();
        assert!(outputs.is_empty(), "clicks partition 1 has not spoken: the pair waits: {outputs:?}");
        engine.set_idle_inputs([("clicks".to_string(), 1)]);
        engine.end_batch(&mut outputs).unwrap();
        // The pair's watermark is now ads' alone, 30 s - 3 s: the ads at 1 s and 2 s end
        // (past t + 4 s) unmatched, as left outer rows; the one at 30 s stays.
        let ended: Vec<String> = outputs
            .iter()
            .map(|output| serde_json::from_slice::<serde_json::Value>(output.value.own().unwrap()).unwrap()["ads"]["id"].to_string())
            .collect();
        assert_eq!(ended, [r#""a0""#, r#""a1""#]);
        assert_eq!(engine.state_keys(), 1);
    }

    /// A million records over keys that keep changing: the join's state follows the
    /// watermark, not the input's length. Its state-keys count (what the
    /// `weir_step_state_keys` metric reports) stays flat from the first tenth of the run on.
    #[test]
    fn join_state_stays_bounded_over_a_million_records_with_churning_keys() {
        use weir::engine::{Engine, InputRecord};
        use weir::operators::{InputHeaders, Provenance};
        let pipeline = pipeline("full", "  []");
        let mut engine = Engine::new(&pipeline).unwrap();
        engine.set_input_partitions([("ads".to_string(), 0), ("clicks".to_string(), 0)]);
        let mut outputs = Vec::new();
        let mut samples = Vec::new();
        const RECORDS: u64 = 1_000_000;
        for n in 0..RECORDS {
            let (topic, offset) = if n % 2 == 0 { ("ads", n / 2) } else { ("clicks", n / 2) };
            // Keys churn: each key lives for about 2 s of event time (1,000 records), then
            // is never seen again. 1 ms of event time per record.
            let value = format!(r#"{{"id":"{n}","k":"k{}","v":1,"ts":{}}}"#, n / 1_000 * 100 + n % 100, 1_000_000 + n);
            let input = InputRecord {
                provenance: Provenance { topic, partition: 0, offset: offset as i64, timestamp: None, headers: InputHeaders::Read(&[]), key: None },
                key: None,
                value: Some(value.as_bytes()),
            };
            engine.process(&input, &mut outputs).unwrap();
            if n % 1_000 == 999 {
                engine.end_batch(&mut outputs).unwrap();
                outputs.clear();
                engine.take_changes();
                samples.push(engine.state_keys_by_step().get(&0).copied().unwrap_or(0));
            }
        }
        let early = *samples[..samples.len() / 10].iter().max().unwrap();
        let late = *samples[samples.len() / 10..].iter().max().unwrap();
        assert!(early > 0 && early < 20_000, "state after the first tenth: {early}");
        assert!(late <= early + early / 10, "join state grew with the input: {early} early, {late} at most later");
    }

    #[test]
    fn steps_after_a_join_see_the_joined_records() {
        check("inner", "  - filter: \"clicks.v >= 10\"\n  - window: { group_by: [ads.k], tumbling: 5s, aggregates: { n: count(), s: sum(clicks.v) } }");
    }
}

/// A restarted engine reads its tables again (as `weir run` reads a table's topic) and its
/// other state from the changelog: lookups and what follows them give what the
/// uninterrupted run gives.
#[test]
fn restarts_keep_the_tables_lookups_read() {
    for case in ["lookup", "revenue-by-country"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(case);
        let pipeline = weir::plan::load_pipeline(&dir.join("pipeline.yaml")).unwrap_or_else(|problems| panic!("{problems}"));
        let input = std::fs::read_to_string(dir.join("input.jsonl")).unwrap();
        for batch_size in [1, 2, 3] {
            let straight = weir::testing::run(&pipeline, &input, batch_size).unwrap();
            assert!(straight.len() >= 2, "{case}: {straight:?}");
            for every in [1, 2] {
                let restarted = weir::testing::run_with_restarts(&pipeline, &input, batch_size, Some(every)).unwrap();
                assert_eq!(restarted, straight, "{case}: batch size {batch_size}, restart every {every}");
            }
        }
    }
}

//! Micro benchmarks (criterion) of the parts every record goes through: JSON and Avro
//! decoding and encoding, each step kind through the engine (filter, set, select, a
//! projection of the three, dedup, tumbling window, interval join), and the local state
//! store's writes and reads. Run: `cargo bench --bench micro`.
//! Figures are per record (or per entry) on this machine; compare ratios within one run.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use weir::codec::Decoder;
use weir::config::Encoding;
use weir::plan::parse_pipeline;
use weir::engine::{Engine, InputRecord};
use weir::operators::{InputHeaders, Provenance};
use weir::runtime::store::{StateStore, StoreWrite};

/// As weir's binary: the allocator is part of what each record costs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CLICK: &[u8] = br#"{"id":123456,"user":"u123","amount":42,"ts":1700000001234}"#;

const BID: &[u8] = br#"{"id":1234567,"auction":20931,"bidder":8811,"price":1520,"channel":"apple","url":"https://qwertyu.com/asdfghjkl","ts":1700000001234,"extra":"zxcvbnmlkjhgfdsa"}"#;

const CLICK_SOURCE: &str = "clicks:\n    topics: [clicks]\n    format: json\n    \
     schema: { id: long, user: string, amount: long, ts: long }\n    event_time: { field: ts, unit: millis }\n    \
     watermark: { max_out_of_orderness: 1s }\n    partitioned_by: [user]";

const BID_SOURCE: &str = "bids:\n    topics: [bids]\n    format: json\n    \
     schema: { id: long, auction: long, bidder: long, price: long, channel: string, url: string, ts: long, extra: string }\n    \
     event_time: { field: ts, unit: millis }";

fn pipeline(steps: &str) -> weir::plan::Pipeline {
    pipeline_of(CLICK_SOURCE, steps)
}

fn pipeline_of(source: &str, steps: &str) -> weir::plan::Pipeline {
    parse_pipeline(&format!("name: micro\nsources:\n  {source}\nsteps:\n{steps}\nsink:\n  topic: out\n"))
        .unwrap_or_else(|problems| panic!("{problems}"))
}

fn codec(c: &mut Criterion) {
    let schema = pipeline("  []").source.schema.unwrap();
    let decoder = Decoder::new(Encoding::Json, Some(&schema), &Default::default()).unwrap();
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    group.bench_function("json decode (4 fields, 60 B)", |b| b.iter(|| decoder.decode(black_box(Some(CLICK))).unwrap()));
    // A Nexmark bid (as benches/e2e.rs writes them) where only the event time is read: the
    // check of a value written as read.
    let bids = pipeline_of(BID_SOURCE, "  []").source.schema.unwrap();
    let mut checker = Decoder::new(Encoding::Json, Some(&bids), &Default::default()).unwrap();
    assert!(checker.keep_only(&["ts".to_string()]));
    assert_eq!(checker.decode(Some(BID)).unwrap().len(), 1);
    group.bench_function(format!("json check, one field kept (8 fields, {} B)", BID.len()), |b| {
        b.iter(|| checker.decode(black_box(Some(BID))).unwrap())
    });
    let fields = decoder.decode(Some(CLICK)).unwrap();
    group.bench_function("json encode (4 fields)", |b| b.iter(|| weir::codec::json::encode(black_box(&fields))));

    // The same record in Avro (Confluent wire format), written by weir's own encoder and
    // read back with that schema as the writer's: resolution by name into the declared fields.
    let mut encoder = weir::codec::avro::AvroEncoder::new(&schema, "micro").unwrap();
    encoder.set_id(1);
    let avro = encoder.encode(&fields).unwrap();
    let writers = std::sync::Arc::new(weir::codec::avro::WriterSchemas::default());
    writers.insert(1, Ok(std::sync::Arc::new(apache_avro::Schema::parse_str(encoder.schema_text()).unwrap())));
    let avro_decoder = Decoder::new(Encoding::Avro, Some(&schema), &writers).unwrap();
    assert_eq!(avro_decoder.decode(Some(&avro)).unwrap(), fields);
    let size = avro.len();
    group.bench_function(format!("avro decode (4 fields, {size} B)"), |b| b.iter(|| avro_decoder.decode(black_box(Some(&avro))).unwrap()));
    group.bench_function("avro encode (4 fields)", |b| b.iter(|| encoder.encode(black_box(&fields)).unwrap()));
    // Baseline for the encoder: the same datum through apache-avro's writer, from a `Value`
    // tree built per record (what weir did before writing the binary itself).
    let writer = apache_avro::Schema::parse_str(encoder.schema_text()).unwrap();
    let via_library = |fields: &serde_json::Map<String, serde_json::Value>| {
        use apache_avro::types::Value as Avro;
        let some = |value: Avro| Avro::Union(1, Box::new(value));
        let long = |name: &str| some(Avro::Long(fields[name].as_i64().unwrap()));
        let record = Avro::Record(vec![
            ("id".into(), long("id")),
            ("user".into(), some(Avro::String(fields["user"].as_str().unwrap().to_string()))),
            ("amount".into(), long("amount")),
            ("ts".into(), long("ts")),
        ]);
        apache_avro::to_avro_datum(&writer, record).unwrap()
    };
    assert_eq!(via_library(&fields), avro[5..], "the same bytes either way");
    group.bench_function("avro encode via apache-avro Value (4 fields)", |b| b.iter(|| via_library(black_box(&fields))));
    group.finish();
}

/// One record through a whole engine: decode, the steps, encode of what comes out.
fn steps(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(1));
    for (label, mut record) in engine_cases() {
        group.bench_function(label, |b| b.iter(&mut record));
    }
    group.finish();
}

/// An engine case: its name and the work of its next record, set up.
type EngineCase = (&'static str, Box<dyn FnMut()>);

/// Each engine case. Record n has id n, user n % 1000, and 1 ms of event time per record.
fn engine_cases() -> Vec<EngineCase> {
    let mut cases: Vec<EngineCase> = Vec::new();
    for (label, steps) in [
        ("no steps", "  []"),
        ("filter", "  - filter: \"amount > 10 && user != 'bot'\""),
        ("set", "  - set: { cents: \"amount * 100\" }"),
        ("select (3 fields)", "  - select: { id: id, user: user, cents: \"amount * 100\" }"),
        (
            "projection: filter + set + select",
            "  - filter: \"id % 10 < 7\"\n  - set: { cents: \"amount * 908 / 1000\" }\n  - select: { id: id, user: user, cents: cents, ts: ts }",
        ),
        ("dedup (new keys)", "  - dedup: { key: [user, id], within: 10s }"),
        ("tumbling 1s count by user", "  - window: { group_by: [user], tumbling: 1s, aggregates: { n: count(), s: sum(amount) } }"),
    ] {
        let mut engine = Engine::new(&pipeline(steps)).unwrap();
        engine.set_input_partitions([("clicks".to_string(), 0)]);
        let mut n: u64 = 0;
        let mut outputs = Vec::new();
        cases.push((
            label,
            Box::new(move || {
                n += 1;
                let value = format!(r#"{{"id":{n},"user":"u{}","amount":{},"ts":{}}}"#, n % 1000, n % 100, 1_700_000_000_000 + n);
                feed(&mut engine, "clicks", n, &value, &mut outputs);
            }),
        ));
    }
    // The interval join: ads and clicks alternate, each click 2 s after an ad of its key.
    let join = parse_pipeline(
        "name: micro-join\nsources:\n  ads:\n    topics: [ads]\n    format: json\n    schema: { ad: string, id: long, ts: long }\n    \
         event_time: { field: ts, unit: millis }\n    watermark: { max_out_of_orderness: 1s }\n  clicks:\n    topics: [clicks]\n    \
         format: json\n    schema: { ad: string, id: long, ts: long }\n    event_time: { field: ts, unit: millis }\n    \
         watermark: { max_out_of_orderness: 1s }\njoin:\n  left: ads\n  right: clicks\n  type: inner\n  on: [ad]\n  \
         within: { lower: 0s, upper: 5s }\nsink:\n  topic: out\n",
    )
    .unwrap_or_else(|problems| panic!("{problems}"));
    let mut engine = Engine::new(&join).unwrap();
    engine.set_input_partitions([("ads".to_string(), 0), ("clicks".to_string(), 0)]);
    let mut n: u64 = 0;
    let mut outputs = Vec::new();
    cases.push((
        "interval join (half ads, half clicks)",
        Box::new(move || {
            n += 1;
            let (topic, ts) = if n.is_multiple_of(2) { ("ads", n * 5) } else { ("clicks", n * 5 + 2000) };
            let value = format!(r#"{{"ad":"a{}","id":{n},"ts":{}}}"#, (n / 2) % 5000, 1_700_000_000_000 + ts);
            feed(&mut engine, topic, n, &value, &mut outputs);
        }),
    ));
    // A dedup as it runs for real: earlier batches' keys in the local store, each batch's
    // changes, timers and key counts written to it when the batch ends. As in the end-to-end
    // benchmark, no key's state ends while it runs (within 24h).
    let dir = tempfile::tempdir().unwrap();
    let dedup = pipeline("  - dedup: { key: [user, id], within: 24h }");
    let timer_of = |_step: usize, key: &str, value: &[u8]| dedup.steps[0].timer_of(key, value);
    let store = StateStore::open(dir.path(), &[0], "bench", weir::runtime::store::StoreMemory::default(), true, &timer_of).unwrap();
    let mut engine = Engine::new(&dedup).unwrap();
    engine.set_input_partitions([("clicks".to_string(), 0)]);
    engine.set_backing(store.backing());
    let mut n: u64 = 0;
    let mut outputs = Vec::new();
    cases.push((
        "dedup through the store (new keys, a batch per 1,000)",
        Box::new(move || {
            // The store's directory lasts as long as the case.
            let _dir = &dir;
            n += 1;
            let value = format!(r#"{{"id":{n},"user":"u{}","amount":{},"ts":{}}}"#, n % 1000, n % 100, 1_700_000_000_000 + n);
            let input = InputRecord {
                provenance: Provenance { topic: "clicks", partition: 0, offset: n as i64, timestamp: None, headers: InputHeaders::Read(&[]), key: None },
                key: None,
                value: Some(value.as_bytes()),
            };
            engine.process(&input, &mut outputs).unwrap();
            if n.is_multiple_of(1000) {
                engine.end_batch(&mut outputs).unwrap();
                let writes = weir::runtime::commit_writes::take(&mut engine);
                store.apply(&writes, &[(0, 0, n as i64)], &[]).unwrap();
                outputs.clear();
            }
        }),
    ));
    cases
}

/// Record `n` (`value`, from `topic`) through the engine; every 1,000 records a batch ends
/// as a commit would end it.
fn feed(engine: &mut Engine, topic: &str, n: u64, value: &str, outputs: &mut Vec<weir::engine::Output>) {
    let input = InputRecord {
        provenance: Provenance { topic, partition: 0, offset: n as i64, timestamp: None, headers: InputHeaders::Read(&[]), key: None },
        key: None,
        value: Some(value.as_bytes()),
    };
    engine.process(&input, outputs).unwrap();
    if n.is_multiple_of(1000) {
        engine.end_batch(outputs).unwrap();
        engine.take_changes();
        outputs.clear();
    }
}

/// The local store: a commit's WriteBatch of 1,000 dedup entries, and reading 1,000 of them
/// back by key.
fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), &[0], "bench", weir::runtime::store::StoreMemory::default(), true, &|_, _, _| None).unwrap();
    let mut group = c.benchmark_group("state store");
    group.throughput(Throughput::Elements(1000));
    let entries = |batch: u64| {
        (0..1000u64)
            .map(|i| {
                let key = format!(r#"["clicks","{{\"id\":{},\"user\":\"u{}\"}}"]"#, batch * 1000 + i, i).into_bytes();
                StoreWrite::state(0, 0, key, Some(b"1700000000000".to_vec()))
            })
            .collect::<Vec<_>>()
    };
    // The entries the reads below look for.
    store.apply(&entries(0), &[(0, 0, 0)], &[]).unwrap();
    assert!(store.get(0, 0, Some("clicks"), r#"{"id":999,"user":"u999"}"#).unwrap().is_some(), "the keys read are there");
    let mut batch = 0u64;
    group.bench_function("put 1000 entries in one WriteBatch", |b| {
        b.iter_batched(
            || {
                batch += 1;
                (entries(batch), batch as i64)
            },
            |(writes, offset)| store.apply(&writes, &[(0, 0, offset)], &[]).unwrap(),
            BatchSize::SmallInput,
        )
    });
    // What a stateful step does for each record it has not seen in this batch: a point read.
    group.bench_function("read 1000 entries by key", |b| {
        b.iter(|| {
            for i in 0..1000u64 {
                let state_key = format!(r#"{{"id":{i},"user":"u{i}"}}"#);
                black_box(store.get(0, 0, Some("clicks"), &state_key).unwrap());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, codec, steps, store);

/// `WEIR_MICRO_COUNT=N WEIR_MICRO_CASE=name`: runs N records of the engine case whose name
/// starts with `name` and nothing else, no timing: for counting instructions, which a shared
/// machine does not blur as it does time. Under `valgrind --tool=callgrind`, two counts (N
/// and 2N) give one record's instructions as their difference over N, set-up left out.
fn main() {
    if let Ok(count) = std::env::var("WEIR_MICRO_COUNT") {
        let count: u64 = count.parse().expect("WEIR_MICRO_COUNT is a number of records");
        let wanted = std::env::var("WEIR_MICRO_CASE").unwrap_or_default();
        let (label, mut record) = engine_cases()
            .into_iter()
            .find(|(label, _)| label.starts_with(&wanted))
            .unwrap_or_else(|| panic!("no engine case starts with {wanted:?}"));
        for _ in 0..count {
            record();
        }
        println!("{label}: {count} records");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

//! Bad input never panics (issue 18, item 6). Arbitrary bytes go into every decoder,
//! arbitrary event times through windows and dedup, arbitrary durations and filter expressions
//! through `parse_pipeline`; each failure must be what PIPELINE.md promises a user: a DLQ
//! record with its `weir-error-stage`, or a configuration problem located at the key.
//!
//! Case counts are small so the file runs in seconds in a debug build; set PROPTEST_CASES to
//! hunt longer (e.g. `PROPTEST_CASES=5000 cargo test --features failpoints --test bad_input`).

use proptest::test_runner::Config as ProptestConfig;
use weir::engine::Output;
use weir::operators::event_time::{MAX_EVENT_TIME, MIN_EVENT_TIME};

/// `cases` unless PROPTEST_CASES says otherwise; failures are printed (shrunk), not written
/// to a regressions file: the ones worth keeping become named tests below.
/// `cases` cases from a fixed seed, so that a CI run is repeatable; `PROPTEST_CASES` and
/// `PROPTEST_RNG_SEED` explore further (a failure prints the seed that found it).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|text| text.parse().ok()).unwrap_or(cases);
    let seed = std::env::var("PROPTEST_RNG_SEED").ok().and_then(|text| text.parse().ok()).unwrap_or(0x005e_ed0f_0e1c);
    ProptestConfig { cases, failure_persistence: None, rng_seed: proptest::test_runner::RngSeed::Fixed(seed), ..ProptestConfig::default() }
}

fn header<'o>(output: &'o Output, name: &str) -> Option<&'o str> {
    output.headers.iter().find(|(header, _)| header == name).and_then(|(_, value)| std::str::from_utf8(value).ok())
}

/// Builds a pipeline that must be valid, with its problems shown if it is not.
fn pipeline(text: &str) -> weir::plan::Pipeline {
    weir::plan::parse_pipeline(text).unwrap_or_else(|problems| panic!("{problems}\n{text}"))
}

mod decoders {
    use std::sync::Arc;

    use apache_avro::types::Value as AvroValue;
    use apache_avro::Schema as AvroSchema;
    use proptest::prelude::*;
    use serde_json::{Map, Value};
    use weir::codec::avro::WriterSchemas;
    use weir::codec::Decoder;
    use weir::config::{Encoding, FieldType, Schema};

    use super::config;

    fn fields(fields: &[(&str, FieldType)]) -> Schema {
        Schema { fields: fields.iter().map(|(name, field_type)| (name.to_string(), field_type.clone())).collect() }
    }

    /// The declared fields both the JSON and the Avro decoder read: every type, nested twice,
    /// each nullable (`?`), so that null or absent reads as null (strict fields are checked
    /// by the decoders' own tests).
    fn declared() -> Schema {
        nullable(declared_strict())
    }

    fn nullable(schema: Schema) -> Schema {
        Schema {
            fields: schema
                .fields
                .into_iter()
                .map(|(name, field_type)| {
                    let field_type = match field_type {
                        FieldType::Object(inner) => FieldType::Object(nullable(inner)),
                        FieldType::Array(element) => FieldType::Array(Box::new(match *element {
                            FieldType::Object(inner) => FieldType::Object(nullable(inner)),
                            other => other,
                        })),
                        other => other,
                    };
                    (name, field_type.nullable())
                })
                .collect(),
        }
    }

    fn declared_strict() -> Schema {
        let address = fields(&[("city", FieldType::String)]);
        let user = fields(&[("name", FieldType::String), ("address", FieldType::Object(address))]);
        fields(&[
            ("id", FieldType::String),
            ("amount", FieldType::Double),
            ("count", FieldType::Long),
            ("ok", FieldType::Boolean),
            ("ts", FieldType::Timestamp),
            ("user", FieldType::Object(user.clone())),
            ("tags", FieldType::Array(Box::new(FieldType::Long))),
            ("users", FieldType::Array(Box::new(FieldType::Object(user)))),
        ])
    }

    const NAMES: &[&str] = &["id", "amount", "count", "ok", "ts", "user", "name", "address", "city", "tags", "users"];

    /// Numbers at the edges of what JSON, i64, u64 and f64 hold, as JSON text.
    const EDGE_NUMBERS: &[&str] = &[
        "9223372036854775807", "9223372036854775808", "-9223372036854775808", "-9223372036854775809",
        "18446744073709551615", "18446744073709551616", "1e308", "-1e308", "1.7976931348623157e308", "1e309",
        "-1e400", "5e-324", "1e-400", "-0", "-0.0", "0e0", "123456789012345678901234567890", "1E+2", "-1e-7",
    ];

    fn json_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            // NaN and infinities become null, as serde_json has no other way to hold them.
            any::<f64>().prop_map(Value::from),
            prop::sample::select(EDGE_NUMBERS)
                .prop_filter_map("not a number serde_json holds", |text| serde_json::from_str::<Value>(text).ok()),
            any::<String>().prop_map(Value::from),
            prop::sample::select(NAMES).prop_map(Value::from),
        ]
    }

    fn json_key() -> impl Strategy<Value = String> {
        prop_oneof![3 => prop::sample::select(NAMES).prop_map(String::from), 1 => any::<String>()]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        json_leaf().prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((json_key(), inner), 0..6).prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    /// Mostly objects, since that is where the declared fields are checked.
    fn json_document() -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => prop::collection::vec((json_key(), json_value()), 0..8).prop_map(|entries| Value::Object(entries.into_iter().collect())),
            1 => json_value(),
        ]
    }

    /// What the JSON decoder must make of a document: the declared fields in schema order
    /// (missing ones null, doubles from whole numbers as doubles), or None when a declared
    /// field has the wrong type or the document is not an object (PIPELINE.md: strict).
    fn projected(schema: &Schema, document: &Value) -> Option<Map<String, Value>> {
        let object = document.as_object()?;
        let mut fields = Map::new();
        for (name, field_type) in &schema.fields {
            fields.insert(name.clone(), project_value(field_type, object.get(name).unwrap_or(&Value::Null))?);
        }
        Some(fields)
    }

    fn project_value(field_type: &FieldType, value: &Value) -> Option<Value> {
        Some(match (field_type, value) {
            (_, Value::Null) => Value::Null,
            (FieldType::String, Value::String(_)) | (FieldType::Boolean, Value::Bool(_)) => value.clone(),
            // A long is a whole number within i64, written without a fraction.
            (FieldType::Long | FieldType::Timestamp, Value::Number(number)) => Value::from(number.as_i64()?),
            (FieldType::Double, Value::Number(number)) => Value::from(number.as_f64()?),
            (FieldType::Object(inner), Value::Object(_)) => Value::Object(projected(inner, value)?),
            (FieldType::Array(element), Value::Array(items)) => {
                Value::Array(items.iter().map(|item| project_value(element, item)).collect::<Option<Vec<_>>>()?)
            }
            (FieldType::Nullable(inner), _) => project_value(inner, value)?,
            _ => return None,
        })
    }

    fn json_decoder() -> Decoder {
        Decoder::new(Encoding::Json, Some(&declared()), &Arc::new(WriterSchemas::default())).unwrap()
    }

    /// Brackets and braces opened `depth` times (and maybe closed), inside a declared
    /// object field or at the top.
    fn nested(depth: usize, kinds: &[bool], closed: bool, inside_user: bool) -> Vec<u8> {
        let mut text = String::new();
        if inside_user {
            text.push_str(r#"{"user":"#);
        }
        for index in 0..depth {
            text.push_str(if kinds[index % kinds.len()] { "[" } else { r#"{"user":"# });
        }
        text.push('1');
        if closed {
            for index in (0..depth).rev() {
                text.push(if kinds[index % kinds.len()] { ']' } else { '}' });
            }
            if inside_user {
                text.push('}');
            }
        }
        text.into_bytes()
    }

    proptest! {
        #![proptest_config(config(512))]

        #[test]
        fn string_decoder_takes_exactly_the_utf8_values(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let decoded = Decoder::String.decode(Some(&bytes));
            match std::str::from_utf8(&bytes) {
                Ok(text) => prop_assert_eq!(decoded.unwrap().get("value").cloned(), Some(Value::from(text))),
                Err(_) => prop_assert!(decoded.unwrap_err().0.contains("not UTF-8")),
            }
        }

        #[test]
        fn json_decoder_reads_arbitrary_bytes_as_fields_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let decoded = json_decoder().decode(Some(&bytes));
            // Bytes that happen to be a JSON document must decode as the oracle says.
            if let Ok(document) = serde_json::from_slice::<Value>(&bytes) {
                prop_assert_eq!(decoded.ok(), projected(&declared(), &document));
            }
        }

    }

    proptest! {
        #![proptest_config(config(128))]

        #[test]
        fn json_decoder_projects_arbitrary_documents_or_names_the_field(document in json_document()) {
            let bytes = serde_json::to_vec(&document).unwrap();
            let decoded = json_decoder().decode(Some(&bytes));
            match (decoded, projected(&declared(), &document)) {
                (Ok(fields), Some(expected)) => {
                    prop_assert_eq!(fields.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
                    prop_assert_eq!(fields, expected);
                }
                (Err(error), None) => {
                    // Not an object, or a declared field of the wrong type, named.
                    prop_assert!(error.0.contains("expected a JSON object") || error.0.contains("field '"), "{}", error);
                }
                (decoded, expected) => prop_assert!(false, "decoded {:?}, expected {:?}", decoded, expected),
            }
        }

        /// Arrays and objects nested far deeper than any record needs: an error, not a stack
        /// overflow (which would abort the process, uncatchable).
        #[test]
        fn deep_nesting_is_an_error_not_a_stack_overflow(
            depth in 0usize..5_000,
            kinds in prop::collection::vec(any::<bool>(), 1..4),
            closed in any::<bool>(),
            inside_user in any::<bool>(),
        ) {
            let bytes = nested(depth, &kinds, closed, inside_user);
            let decoded = json_decoder().decode(Some(&bytes));
            // Undeclared fields are skipped without recursion, however deep; what serde_json
            // can read back (its limit is 128 levels) must decode as the oracle says.
            if let Ok(document) = serde_json::from_slice::<Value>(&bytes) {
                prop_assert_eq!(decoded.ok(), projected(&declared(), &document));
            } else if !closed {
                prop_assert!(decoded.is_err());
            }
        }

    }

    /// A million levels, far past any stack, in a declared object field and at the top.
    #[test]
    fn a_million_levels_of_nesting_are_an_error() {
        for inside_user in [false, true] {
            for kinds in [[true], [false]] {
                let decoded = json_decoder().decode(Some(&nested(1_000_000, &kinds, true, inside_user)));
                // Arrays where an object is declared are wrong at once; objects nested in
                // undeclared fields are skipped, however deep.
                assert_eq!(decoded.is_err(), kinds[0], "{decoded:?}");
            }
        }
    }

    #[test]
    fn a_tombstone_is_a_decode_error_for_every_decoder() {
        let writers = Arc::new(WriterSchemas::default());
        for decoder in [json_decoder(), Decoder::String, Decoder::new(Encoding::Avro, Some(&declared()), &writers).unwrap()] {
            assert!(decoder.decode(None).unwrap_err().0.contains("tombstone"));
        }
    }

    /// A writer schema with every Avro type and the logical types weir resolves.
    const EVERYTHING: &str = r#"{"type":"record","name":"Everything","fields":[
        {"name":"id","type":"string"},
        {"name":"amount","type":"double"},
        {"name":"count","type":"long"},
        {"name":"small","type":"int"},
        {"name":"ratio","type":"float"},
        {"name":"ok","type":"boolean"},
        {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"micros","type":{"type":"long","logicalType":"timestamp-micros"}},
        {"name":"day","type":{"type":"int","logicalType":"date"}},
        {"name":"raw","type":"bytes"},
        {"name":"digest","type":{"type":"fixed","name":"Digest","size":4}},
        {"name":"color","type":{"type":"enum","name":"Color","symbols":["red","green"]}},
        {"name":"tags","type":{"type":"map","values":"long"}},
        {"name":"items","type":{"type":"array","items":"string"}},
        {"name":"maybe","type":["null","string","long"]},
        {"name":"price","type":{"type":"bytes","logicalType":"decimal","precision":10,"scale":2}},
        {"name":"uuid","type":{"type":"string","logicalType":"uuid"}},
        {"name":"user","type":{"type":"record","name":"User","fields":[
            {"name":"name","type":"string"},
            {"name":"address","type":["null",{"type":"record","name":"Address","fields":[{"name":"city","type":"string"}]}]}]}}]}"#;

    /// What a reader with the declared fields sees of writers whose types differ (Avro resolves
    /// by name): `id` a long, `amount` a string, `ts` a date.
    const MISMATCHED: &str = r#"{"type":"record","name":"Other","fields":[
        {"name":"id","type":"long"},
        {"name":"amount","type":"string"},
        {"name":"ts","type":{"type":"int","logicalType":"date"}},
        {"name":"user","type":"string"}]}"#;

    /// A recursive schema: a linked list, as trees and lists are written.
    const LIST: &str = r#"{"type":"record","name":"Node","fields":[
        {"name":"id","type":"string"},
        {"name":"next","type":["null","Node"]}]}"#;

    const EVERYTHING_ID: u32 = 1;
    const MISMATCHED_ID: u32 = 2;
    const LIST_ID: u32 = 3;
    /// An id the registry said it does not know.
    const UNKNOWN_ID: u32 = 9;

    fn avro_decoder() -> Decoder {
        let writers = Arc::new(WriterSchemas::default());
        for (id, text) in [(EVERYTHING_ID, EVERYTHING), (MISMATCHED_ID, MISMATCHED), (LIST_ID, LIST)] {
            writers.insert(id, Ok(Arc::new(AvroSchema::parse_str(text).unwrap())));
        }
        writers.insert(UNKNOWN_ID, Err("not found in the schema registry".into()));
        let reader = fields(&[
            ("id", FieldType::String),
            ("amount", FieldType::Double),
            ("count", FieldType::Long),
            ("ok", FieldType::Boolean),
            ("ts", FieldType::Timestamp),
            ("micros", FieldType::Timestamp),
            ("day", FieldType::Timestamp),
            ("raw", FieldType::String),
            ("color", FieldType::String),
            ("maybe", FieldType::String),
            ("uuid", FieldType::String),
            ("user", FieldType::Object(fields(&[("name", FieldType::String), ("address", FieldType::Object(fields(&[("city", FieldType::String)])))]))),
        ]);
        Decoder::new(Encoding::Avro, Some(&nullable(reader)), &writers).unwrap()
    }

    fn wire(id: u32, datum: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&id.to_be_bytes());
        bytes.extend_from_slice(datum);
        bytes
    }

    /// Valid datums of each writer schema, for the mutations to start from.
    fn valid_datums() -> Vec<(u32, Vec<u8>)> {
        let everything = AvroSchema::parse_str(EVERYTHING).unwrap();
        let record = AvroValue::Record(vec![
            ("id".into(), AvroValue::String("e1".into())),
            ("amount".into(), AvroValue::Double(2.5)),
            ("count".into(), AvroValue::Long(-3)),
            ("small".into(), AvroValue::Int(7)),
            ("ratio".into(), AvroValue::Float(0.5)),
            ("ok".into(), AvroValue::Boolean(true)),
            ("ts".into(), AvroValue::TimestampMillis(1_700_000_000_000)),
            ("micros".into(), AvroValue::TimestampMicros(1_700_000_000_000_000)),
            ("day".into(), AvroValue::Date(19_000)),
            ("raw".into(), AvroValue::Bytes(b"raw".to_vec())),
            ("digest".into(), AvroValue::Fixed(4, vec![1, 2, 3, 4])),
            ("color".into(), AvroValue::Enum(1, "green".into())),
            ("tags".into(), AvroValue::Map([("a".to_string(), AvroValue::Long(1))].into_iter().collect())),
            ("items".into(), AvroValue::Array(vec![AvroValue::String("x".into()), AvroValue::String("y".into())])),
            ("maybe".into(), AvroValue::Union(1, Box::new(AvroValue::String("m".into())))),
            ("price".into(), AvroValue::Decimal(apache_avro::Decimal::from(vec![1, 0]))),
            ("uuid".into(), AvroValue::Uuid(apache_avro::Uuid::from_u128(7))),
            ("user".into(), AvroValue::Record(vec![
                ("name".into(), AvroValue::String("ann".into())),
                ("address".into(), AvroValue::Union(1, Box::new(AvroValue::Record(vec![("city".into(), AvroValue::String("Delft".into()))])))),
            ])),
        ]);
        let mismatched = AvroSchema::parse_str(MISMATCHED).unwrap();
        let other = AvroValue::Record(vec![
            ("id".into(), AvroValue::Long(5)),
            ("amount".into(), AvroValue::String("1.5".into())),
            ("ts".into(), AvroValue::Date(3)),
            ("user".into(), AvroValue::String("bob".into())),
        ]);
        let list = AvroSchema::parse_str(LIST).unwrap();
        let node = |id: &str, next: AvroValue| AvroValue::Record(vec![("id".into(), AvroValue::String(id.into())), ("next".into(), next)]);
        let two = node("a", AvroValue::Union(1, Box::new(node("b", AvroValue::Union(0, Box::new(AvroValue::Null))))));
        vec![
            (EVERYTHING_ID, apache_avro::to_avro_datum(&everything, record).unwrap()),
            (MISMATCHED_ID, apache_avro::to_avro_datum(&mismatched, other).unwrap()),
            (LIST_ID, apache_avro::to_avro_datum(&list, two).unwrap()),
        ]
    }

    /// One change to a byte string: overwrite, insert, remove, or cut it short.
    #[derive(Debug, Clone)]
    enum Mutation {
        Set(usize, u8),
        Insert(usize, u8),
        Remove(usize),
        Truncate(usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            4 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set(at, byte)),
            // Bytes that read as huge or negative zig-zag lengths and counts.
            2 => (any::<usize>(), prop::sample::select(vec![0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff])).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
            1 => any::<usize>().prop_map(Mutation::Remove),
            1 => any::<usize>().prop_map(Mutation::Truncate),
        ]
    }

    fn mutate(bytes: &mut Vec<u8>, mutation: &Mutation) {
        let length = bytes.len();
        match *mutation {
            Mutation::Set(at, byte) if length > 0 => bytes[at % length] = byte,
            Mutation::Insert(at, byte) => bytes.insert(at % (length + 1), byte),
            Mutation::Remove(at) if length > 0 => drop(bytes.remove(at % length)),
            Mutation::Truncate(at) => bytes.truncate(at % (length + 1)),
            _ => {}
        }
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn avro_decoder_reads_arbitrary_bytes_as_fields_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
            let _ = avro_decoder().decode(Some(&bytes));
        }

        /// The wire format's header right, the datum arbitrary: apache-avro reads lengths,
        /// counts and union branches from it.
        #[test]
        fn avro_decoder_reads_arbitrary_datums_of_known_schemas(
            id in prop::sample::select(vec![EVERYTHING_ID, MISMATCHED_ID, LIST_ID, UNKNOWN_ID, 4]),
            datum in prop::collection::vec(any::<u8>(), 0..128),
        ) {
            let decoded = avro_decoder().decode(Some(&wire(id, &datum)));
            if let Err(error) = decoded {
                prop_assert!(!error.0.contains("the Avro decoder failed"), "apache-avro panicked (contained): {}", error);
            }
        }

        /// Valid datums with a few bytes changed: deep inside the structure, where random
        /// bytes seldom get.
        #[test]
        fn avro_decoder_reads_mutated_datums(
            which in 0usize..3,
            mutations in prop::collection::vec(mutation(), 1..4),
        ) {
            let (id, mut datum) = valid_datums().swap_remove(which);
            for mutation in &mutations {
                mutate(&mut datum, mutation);
            }
            let decoded = avro_decoder().decode(Some(&wire(id, &datum)));
            if let Err(error) = decoded {
                prop_assert!(!error.0.contains("the Avro decoder failed"), "apache-avro panicked (contained): {}", error);
            }
        }
    }

    /// BUG (found here): apache-avro 0.21 decodes recursively with no depth limit, so a datum
    /// of a recursive writer schema (a linked list, a tree) nested deep enough overflows the
    /// decoding thread's stack: the process aborts (SIGABRT), which `panics::contain` cannot
    /// catch, and the record is read again after every restart. In a debug build 30 levels
    /// (67 bytes) abort a 2 MiB test thread; the runtime decodes on a tokio blocking thread
    /// (2 MiB too). The datum below is 200 KB, well under Kafka's default 1 MiB record limit.
    /// The check runs in a child process so that the abort fails this test, not the binary.
    #[test]
    fn a_deeply_nested_avro_datum_is_a_decode_error_not_an_abort() {
        const CHILD: &str = "WEIR_BAD_INPUT_DEEP_AVRO_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let mut datum = Vec::new();
            for _ in 0..100_000 {
                // A node: id "" (length 0), next: union branch 1 (another node).
                datum.extend_from_slice(&[0x00, 0x02]);
            }
            datum.extend_from_slice(&[0x00, 0x00]);
            let decoded = avro_decoder().decode(Some(&wire(LIST_ID, &datum)));
            assert!(decoded.is_err(), "{decoded:?}");
            return;
        }
        let name = "decoders::a_deeply_nested_avro_datum_is_a_decode_error_not_an_abort";
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--include-ignored", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert!(child.status.success(), "{:?}\n{}", child.status, String::from_utf8_lossy(&child.stderr));
    }

    #[test]
    fn valid_avro_datums_decode_to_the_declared_fields() {
        let decoder = avro_decoder();
        let datums = valid_datums();
        let everything = decoder.decode(Some(&wire(EVERYTHING_ID, &datums[0].1))).unwrap();
        assert_eq!(everything["id"], "e1");
        assert_eq!(everything["ts"], 1_700_000_000_000i64);
        assert_eq!(everything["micros"], 1_700_000_000_000i64);
        assert_eq!(everything["user"]["address"]["city"], "Delft");
        let error = decoder.decode(Some(&wire(MISMATCHED_ID, &datums[1].1))).unwrap_err();
        assert!(error.0.contains("field '"), "{error}");
        let list = decoder.decode(Some(&wire(LIST_ID, &datums[2].1))).unwrap();
        assert_eq!(list["id"], "a");
    }
}


/// Drives an engine over records of one partition, as the loop does with `on_error: dlq`.
mod drive {
    use weir::engine::{BatchCounts, Clock, Engine, InputRecord, Output, RecordFailure};
    use weir::operators::{InputHeaders, Provenance};

    /// A record's value bytes and Kafka timestamp.
    pub type Input = (Vec<u8>, Option<i64>);

    pub struct Run {
        /// Each output with the offset of the input it came from (None: the end of input).
        pub outputs: Vec<(Option<i64>, Output)>,
        pub counts: BatchCounts,
    }

    /// Runs records of the topic `events`; a batch ends every `batch` records; the end of the
    /// input closes everything.
    pub fn run(pipeline: &weir::plan::Pipeline, records: &[Input], now: i64, batch: usize) -> Result<Run, RecordFailure> {
        let records: Vec<(&str, Input)> = records.iter().map(|record| ("events", record.clone())).collect();
        run_topics(pipeline, &records, now, batch)
    }

    /// Like [`run`], each record from its own topic (partition 0). Offsets count over all
    /// topics, so that each names one input.
    pub fn run_topics(pipeline: &weir::plan::Pipeline, records: &[(&str, Input)], now: i64, batch: usize) -> Result<Run, RecordFailure> {
        let mut engine = Engine::new(pipeline).unwrap_or_else(|error| panic!("a valid pipeline builds no engine: {error}"));
        let mut topics: Vec<(String, i32)> = records.iter().map(|(topic, _)| (topic.to_string(), 0)).collect();
        topics.sort();
        topics.dedup();
        engine.set_input_partitions(topics);
        engine.set_clock(Clock::Fixed(now));
        let mut all = Vec::new();
        for (offset, (topic, (value, timestamp))) in records.iter().enumerate() {
            let provenance = Provenance { topic, partition: 0, offset: offset as i64, timestamp: *timestamp, headers: InputHeaders::Read(&[]), key: None };
            let mut outputs = Vec::new();
            let input = InputRecord { provenance, key: None, value: Some(value) };
            engine.process_kept(&input, &mut outputs)?;
            if offset % batch == batch - 1 {
                engine.end_batch(&mut outputs)?;
            }
            all.extend(outputs.into_iter().map(|output| (Some(offset as i64), output)));
        }
        let mut outputs = Vec::new();
        engine.finish(&mut outputs)?;
        all.extend(outputs.into_iter().map(|output| (None, output)));
        Ok(Run { outputs: all, counts: engine.take_counts() })
    }
}

mod event_times {
    use proptest::prelude::*;
    use serde_json::Value;
    use weir::engine::{Destination, ErrorStage};

    use super::drive::{run, Input, Run};
    use super::{config, header, pipeline, MAX_EVENT_TIME, MIN_EVENT_TIME};

    /// The wall clock of these runs (2023-11-14), for `max_ahead: 1h`.
    const NOW: i64 = 1_700_000_000_000;
    const HOUR: i64 = 3_600_000;
    const YEAR: i64 = 31_557_600_000;

    /// Where the event time comes from: the unit and the schema type of `ts`.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Origin {
        Millis(&'static str),
        Seconds(&'static str),
        Rfc3339,
        KafkaTimestamp,
    }

    impl Origin {
        fn yaml(self) -> (String, &'static str) {
            match self {
                Origin::Millis(kind) => ("field: ts, unit: millis".into(), kind),
                Origin::Seconds(kind) => ("field: ts, unit: seconds".into(), kind),
                Origin::Rfc3339 => ("field: ts, unit: rfc3339".into(), "string"),
                Origin::KafkaTimestamp => ("kafka_timestamp: true".into(), "string"),
            }
        }
    }

    /// A window step and how long its windows are (ms): their size, or a session's gap.
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Tumbling,
        Hopping,
        Session,
    }

    const WINDOWS: &[(Kind, &str, i64)] = &[
        (Kind::Tumbling, "tumbling: 1s", 1_000),
        (Kind::Tumbling, "tumbling: 1d", 86_400_000),
        (Kind::Tumbling, "tumbling: 100y", 100 * YEAR),
        (Kind::Hopping, "hopping: { size: 3s, slide: 1s }", 3_000),
        (Kind::Hopping, "hopping: { size: 1d, slide: 6h }", 86_400_000),
        (Kind::Hopping, "hopping: { size: 100y, slide: 1y }", 100 * YEAR),
        (Kind::Session, "session: { gap: 1s }", 1_000),
        (Kind::Session, "session: { gap: 100y }", 100 * YEAR),
    ];

    #[derive(Debug, Clone)]
    struct Setup {
        origin: Origin,
        window: usize,
        out_of_orderness: &'static str,
        within: &'static str,
        lateness: &'static str,
        max_ahead: bool,
    }

    impl Setup {
        fn pipeline(&self) -> weir::plan::Pipeline {
            let (event_time, ts_type) = self.origin.yaml();
            let max_ahead = if self.max_ahead { ", max_ahead: 1h" } else { "" };
            pipeline(&format!(
                "name: bad-times
sources:
  events:
    topics: [events]
    format: json
    schema: {{ id: string, k: string, ts: {ts_type}? }}
    event_time: {{ {event_time}{max_ahead} }}
    watermark: {{ max_out_of_orderness: {} }}
steps:
  - dedup: {{ key: [id], within: {} }}
  - window: {{ group_by: [k], {}, allowed_lateness: {}, aggregates: {{ n: count(), first_id: first(id), last_id: last(id) }} }}
sink:
  topic: out
",
                self.out_of_orderness, self.within, WINDOWS[self.window].1, self.lateness
            ))
        }
    }

    fn setup() -> impl Strategy<Value = Setup> {
        let origin = prop::sample::select(vec![
            Origin::Millis("long"),
            Origin::Millis("double"),
            Origin::Millis("timestamp"),
            Origin::Seconds("long"),
            Origin::Seconds("double"),
            Origin::Rfc3339,
            Origin::KafkaTimestamp,
        ]);
        (
            origin,
            0..WINDOWS.len(),
            prop::sample::select(vec!["0s", "1s", "100y"]),
            prop::sample::select(vec!["1ms", "1h", "100y"]),
            prop::sample::select(vec!["0s", "1d", "100y"]),
            any::<bool>(),
        )
            .prop_map(|(origin, window, out_of_orderness, within, lateness, max_ahead)| Setup { origin, window, out_of_orderness, within, lateness, max_ahead })
    }

    /// Epoch milliseconds at and around every limit, and anywhere.
    fn millis() -> impl Strategy<Value = i64> {
        prop_oneof![
            prop::sample::select(vec![
                i64::MIN, i64::MIN + 1, i64::MAX, i64::MAX - 1, 0, -1,
                MIN_EVENT_TIME - 1, MIN_EVENT_TIME, MIN_EVENT_TIME + 1, MAX_EVENT_TIME - 1, MAX_EVENT_TIME, MAX_EVENT_TIME + 1,
                MIN_EVENT_TIME / 1000, MAX_EVENT_TIME / 1000, MAX_EVENT_TIME / 1000 + 1, MIN_EVENT_TIME / 1000 - 1,
                i64::MAX / 1000, i64::MAX / 1000 + 1, i64::MIN / 1000 - 1,
                NOW + HOUR, NOW + HOUR + 1,
            ]),
            NOW - 10_000..NOW + 10_000,
            NOW / 1000 - 10..NOW / 1000 + 10,
            MIN_EVENT_TIME..=MAX_EVENT_TIME,
            any::<i64>(),
        ]
    }

    fn double_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<f64>().prop_filter("JSON has no NaN or infinity", |number| number.is_finite()).prop_map(|number| format!("{number:?}")),
            millis().prop_map(|number| format!("{:?}", number as f64)),
            millis().prop_map(|number| format!("{}.5", number)),
            prop::sample::select(vec![
                "1e308", "-1e308", "1.7976931348623157e308", "5e-324", "-0.0", "9.223372036854776e18", "-9.223372036854776e18",
                "2.5340230079999999e14", "2.534023008e14", "-6.21355968e13", "-6.2135596800001e13", "1e400", "NaN", "-Infinity",
            ])
            .prop_map(String::from),
        ]
    }

    fn rfc3339_text() -> impl Strategy<Value = String> {
        let offset = prop_oneof![
            Just("Z".to_string()),
            (any::<bool>(), 0u32..=25, 0u32..=60).prop_map(|(east, hours, minutes)| format!("{}{hours:02}:{minutes:02}", if east { '+' } else { '-' })),
        ];
        let structured = (0u32..=10_000, 0u32..=13, 0u32..=32, 0u32..=24, 0u32..=60, 0u32..=61, prop::option::of(0u32..1_000_000_000), offset).prop_map(
            |(year, month, day, hour, minute, second, fraction, offset)| {
                let fraction = fraction.map(|fraction| format!(".{fraction:09}")).unwrap_or_default();
                format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{fraction}{offset}")
            },
        );
        prop_oneof![
            4 => structured,
            1 => prop::sample::select(vec!["0001-01-01T00:00:00Z", "0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59.999Z", "9999-12-31T23:59:59-00:01", "10000-01-01T00:00:00Z", "2023-11-14T22:13:20Z"])
                .prop_map(String::from),
            1 => any::<String>(),
        ]
        .prop_map(|text| Value::from(text).to_string())
    }

    /// The JSON text of `ts` (any kind, to reach the decoder's type checks too), and the
    /// Kafka timestamp.
    fn time(origin: Origin) -> BoxedStrategy<(String, Option<i64>)> {
        let text = match origin {
            Origin::Millis("double") | Origin::Seconds("double") => double_text().boxed(),
            Origin::Millis(_) => millis().prop_map(|number| number.to_string()).boxed(),
            Origin::Seconds(_) => prop_oneof![millis().prop_map(|number| (number / 1000).to_string()), millis().prop_map(|number| number.to_string())].boxed(),
            Origin::Rfc3339 | Origin::KafkaTimestamp => rfc3339_text().boxed(),
        };
        let text = prop_oneof![
            8 => text,
            1 => prop::sample::select(vec!["null", "true", "\"12\"", "{}", "[1]", "18446744073709551615", "1.0", "1e3", "-"]).prop_map(String::from),
        ];
        (text, prop::option::of(millis())).boxed()
    }

    /// The event time PIPELINE.md gives a record, or None when it must be a decode error.
    fn expected_time(setup: &Setup, text: &str, kafka_timestamp: Option<i64>) -> Option<i64> {
        let value: Value = serde_json::from_str(text).ok()?;
        let millis: i128 = match (setup.origin, &value) {
            (Origin::KafkaTimestamp, Value::String(_) | Value::Null) => i128::from(kafka_timestamp?),
            (Origin::Millis("double") | Origin::Seconds("double"), Value::Number(number)) => {
                let scale = if matches!(setup.origin, Origin::Seconds(_)) { 1000.0 } else { 1.0 };
                let millis = number.as_f64()? * scale;
                if !millis.is_finite() {
                    return None;
                }
                // Whole milliseconds toward zero; the range check below works on the exact value.
                millis.trunc() as i128
            }
            (Origin::Millis(_), Value::Number(number)) => i128::from(number.as_i64()?),
            (Origin::Seconds(_), Value::Number(number)) => i128::from(number.as_i64()?) * 1000,
            (Origin::Rfc3339, Value::String(text)) => i128::from(chrono::DateTime::parse_from_rfc3339(text).ok()?.timestamp_millis()),
            _ => return None,
        };
        let time = i64::try_from(millis).ok().filter(|time| (MIN_EVENT_TIME..=MAX_EVENT_TIME).contains(time))?;
        if setup.max_ahead && time > NOW + HOUR {
            return None;
        }
        Some(time)
    }

    fn record(id: usize, key: usize, ts: &str) -> Vec<u8> {
        format!(r#"{{"id":"e{id}","k":"k{key}","ts":{ts}}}"#).into_bytes()
    }

    fn window_bounds(value: &Value) -> (i64, i64) {
        let start = value["window_start"].as_i64().unwrap_or_else(|| panic!("window_start in {value}"));
        let end = value["window_end"].as_i64().unwrap_or_else(|| panic!("window_end in {value}"));
        (start, end)
    }

    /// What every run must show: the DLQ records PIPELINE.md promises, windows whose bounds
    /// hold what they say, and every record that is not in the DLQ counted in the windows.
    fn check(setup: &Setup, expected: &[Option<i64>], run: &Run) -> Result<(), TestCaseError> {
        let (kind, _, length) = WINDOWS[setup.window];
        let mut late = 0;
        for (offset, expected) in expected.iter().enumerate() {
            let dead: Vec<_> = run
                .outputs
                .iter()
                .filter(|(from, output)| *from == Some(offset as i64) && output.destination == Destination::Dlq)
                .map(|(_, output)| (header(output, "weir-error-stage").unwrap_or("none"), header(output, "weir-error").unwrap_or("")))
                .collect();
            prop_assert!(dead.iter().all(|(_, error)| !error.is_empty()), "record {}: a DLQ record without its error", offset);
            match expected {
                None => prop_assert!(
                    dead.len() == 1 && dead[0].0 == ErrorStage::Decode.as_str(),
                    "record {} has no event time in range, yet its DLQ records are {:?}", offset, dead
                ),
                Some(_) => {
                    prop_assert!(dead.iter().all(|(stage, _)| *stage == ErrorStage::Late.as_str()), "record {} (in range): {:?}", offset, dead);
                    prop_assert!(dead.len() <= 1, "record {}: {:?}", offset, dead);
                    late += dead.len();
                }
            }
        }
        let mut counted = 0;
        for (_, output) in run.outputs.iter().filter(|(_, output)| output.destination == Destination::Sink(0)) {
            let value: Value = serde_json::from_slice(output.value.own().unwrap_or(b"null")).unwrap();
            let (start, end) = window_bounds(&value);
            prop_assert!(end > start, "{}", value);
            match kind {
                Kind::Tumbling | Kind::Hopping => prop_assert_eq!(end - start, length, "{}", value),
                Kind::Session => prop_assert!(end - start >= length, "{}", value),
            }
            // A window holds a record, so it overlaps years 0001-9999 and reaches past them by
            // less than its own length (windows are aligned to the epoch).
            prop_assert!(start <= MAX_EVENT_TIME && end > MIN_EVENT_TIME, "{}", value);
            prop_assert!(start > MIN_EVENT_TIME - length && end <= MAX_EVENT_TIME + length, "{}", value);
            counted += value["n"].as_i64().unwrap();
        }
        let accepted = expected.iter().filter(|time| time.is_some()).count() as i64 - late as i64 - run.counts.duplicates_dropped as i64;
        match kind {
            Kind::Tumbling | Kind::Session => prop_assert_eq!(counted, accepted, "records counted in windows"),
            // A record counts once in each of its windows that was still open.
            Kind::Hopping => prop_assert!(counted >= accepted, "{} counted, {} accepted", counted, accepted),
        }
        Ok(())
    }

    /// A record as generated: its id and key numbers, the JSON text of `ts`, its timestamp.
    type Generated = (usize, usize, String, Option<i64>);

    fn setup_and_records() -> impl Strategy<Value = (Setup, Vec<Generated>)> {
        setup().prop_flat_map(|setup| {
            let records = prop::collection::vec((0usize..12, 0usize..3, time(setup.origin)), 1..24)
                .prop_map(|records| records.into_iter().map(|(id, key, (text, timestamp))| (id, key, text, timestamp)).collect());
            (Just(setup), records)
        })
    }

    proptest! {
        #![proptest_config(config(128))]

        /// Any event time, through dedup and a window: a decode DLQ record exactly when the
        /// time is unreadable or outside years 0001-9999 (or too far ahead), else a late DLQ
        /// record or a place in the windows; never a panic or a batch failure.
        #[test]
        fn any_event_time_is_windowed_or_dead_lettered((setup, records) in setup_and_records(), batch in 1usize..5) {
            let inputs: Vec<Input> = records.iter().map(|(id, key, text, timestamp)| (record(*id, *key, text), *timestamp)).collect();
            let expected: Vec<Option<i64>> = records.iter().map(|(_, _, text, timestamp)| expected_time(&setup, text, *timestamp)).collect();
            let outcome = run(&setup.pipeline(), &inputs, NOW, batch);
            let outcome = outcome.map_err(|failure| TestCaseError::fail(format!("a batch failed with on_error dlq: {failure}")))?;
            check(&setup, &expected, &outcome)?;
        }

        /// Records out of range (or too far ahead) never touch the watermark: in-range records
        /// in order around them are all on time, whatever came before.
        #[test]
        fn out_of_range_times_do_not_make_later_records_late(
            setup in setup(),
            steps in prop::collection::vec((0i64..5_000, prop::option::of(millis())), 1..24),
        ) {
            let mut time = NOW - 100_000;
            let mut inputs = Vec::new();
            let mut expected = Vec::new();
            for (index, (step, bad)) in steps.iter().enumerate() {
                time += step;
                let good = match setup.origin {
                    Origin::Millis(_) => time.to_string(),
                    Origin::Seconds(_) => (time / 1000).to_string(),
                    Origin::Rfc3339 | Origin::KafkaTimestamp => Value::from(chrono::DateTime::from_timestamp_millis(time).unwrap().to_rfc3339()).to_string(),
                };
                let good_timestamp = matches!(setup.origin, Origin::KafkaTimestamp).then_some(time);
                if let Some(bad) = bad.filter(|bad| !(MIN_EVENT_TIME..=NOW + HOUR).contains(bad) && (setup.max_ahead || *bad > MAX_EVENT_TIME || *bad < MIN_EVENT_TIME)) {
                    // A time past the limits, written as the unit reads it.
                    let text = match setup.origin {
                        Origin::Millis(_) | Origin::KafkaTimestamp => bad.to_string(),
                        Origin::Seconds(_) => format!("{}", i128::from(bad) * 2),
                        Origin::Rfc3339 => Value::from(if bad < 0 { "0000-12-31T23:59:59Z" } else { "10000-01-01T00:00:00Z" }).to_string(),
                    };
                    let bad_timestamp = matches!(setup.origin, Origin::KafkaTimestamp).then_some(bad);
                    let text = if setup.origin == Origin::KafkaTimestamp { Value::from("x").to_string() } else { text };
                    expected.push(expected_time(&setup, &text, bad_timestamp));
                    inputs.push((record(1_000 + index, index % 3, &text), bad_timestamp));
                }
                expected.push(Some(time));
                inputs.push((record(index, index % 3, &good), good_timestamp));
            }
            let outcome = run(&setup.pipeline(), &inputs, NOW, 4)
                .map_err(|failure| TestCaseError::fail(format!("a batch failed with on_error dlq: {failure}")))?;
            for (_, output) in &outcome.outputs {
                prop_assert_ne!(header(output, "weir-error-stage"), Some("late"), "an in-order record went late: {:?}", output);
            }
            check(&setup, &expected, &outcome)?;
        }
    }

    /// The example in issue 18: `ts: 9223372036854775807` is a decode error, and the
    /// partition's next records are windowed as if it had never come.
    #[test]
    fn the_end_of_time_is_a_decode_error_and_later_records_are_on_time() {
        let setup = Setup { origin: Origin::Millis("long"), window: 0, out_of_orderness: "0s", within: "1h", lateness: "0s", max_ahead: false };
        let inputs: Vec<Input> = [NOW.to_string(), i64::MAX.to_string(), (NOW + 10).to_string(), (NOW + 5_000).to_string()]
            .iter()
            .enumerate()
            .map(|(id, text)| (record(id, 0, text), None))
            .collect();
        let outcome = run(&setup.pipeline(), &inputs, NOW, 1).unwrap();
        let dead: Vec<_> = outcome.outputs.iter().filter(|(_, output)| output.destination == Destination::Dlq).collect();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].0, Some(1));
        assert_eq!(header(&dead[0].1, "weir-error-stage"), Some("decode"));
        assert!(header(&dead[0].1, "weir-error").unwrap().contains("outside years 0001-9999"));
        let windows: Vec<Value> = outcome
            .outputs
            .iter()
            .filter(|(_, output)| output.destination == Destination::Sink(0))
            .map(|(_, output)| serde_json::from_slice(output.value.own().unwrap()).unwrap())
            .collect();
        let counts: Vec<i64> = windows.iter().map(|window| window["n"].as_i64().unwrap()).collect();
        assert_eq!(counts, [2, 1], "{windows:?}");
    }
}

mod durations {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use proptest::prelude::*;
    use serde_json::Value;
    use weir::config::MAX_DURATION;
    use weir::engine::{Destination, ErrorStage};

    use super::drive::{run_topics, Input};
    use super::{config, header, MAX_EVENT_TIME, MIN_EVENT_TIME};

    const NOW: i64 = 1_700_000_000_000;

    /// A duration as written in YAML: a string, or another YAML value (a number, a list...).
    #[derive(Debug, Clone)]
    enum Written {
        Text(String),
        Other(&'static str),
    }

    impl Written {
        fn yaml(&self) -> String {
            match self {
                // A JSON string is a YAML double-quoted scalar.
                Written::Text(text) => Value::from(text.as_str()).to_string(),
                Written::Other(yaml) => yaml.to_string(),
            }
        }
    }

    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => (0u64..3).prop_map(|number| number.to_string()),
            3 => (1u64..2_000).prop_map(|number| number.to_string()),
            2 => prop::sample::select(vec![
                "18446744073709551615", "18446744073709551616", "99999999999999999999999", "9223372036854775807",
                "3155760000", "3155760001", "36524", "36525", "1200", "1201", "100", "101", "1000000000000", "1000000", "999999", "1000001",
            ])
            .prop_map(String::from),
        ]
    }

    fn unit() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "ns", "nsec", "us", "µs", "usec", "ms", "msec", "s", "sec", "seconds", "m", "min", "h", "hr", "hours", "d", "days", "w", "week", "M",
            "month", "y", "year", "years", "", "x", " ",
        ])
    }

    fn written() -> impl Strategy<Value = Written> {
        let part = (number(), unit()).prop_map(|(number, unit)| format!("{number}{unit}"));
        let parts = (prop::collection::vec(part, 1..4), prop::sample::select(vec![" ", ""]), prop::bool::weighted(0.15))
            .prop_map(|(parts, separator, negative)| format!("{}{}", if negative { "-" } else { "" }, parts.join(separator)));
        prop_oneof![
            10 => parts.prop_map(Written::Text),
            1 => any::<String>().prop_map(Written::Text),
            1 => prop::sample::select(vec!["5", "-1", "0", "1.5", "true", "null", "~", "[]", "{}", "[1s]", "{s: 1}", "''"]).prop_map(Written::Other),
        ]
    }

    /// Whether the place a duration is written may hold zero, or a negative duration.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Allows {
        Zero,
        PositiveOnly,
        Negative,
    }

    /// What PIPELINE.md "Limits" makes of a written duration: its milliseconds, or None when
    /// `validate` must refuse it (naming its key).
    fn verdict(written: &Written, allows: Allows) -> Option<i64> {
        let Written::Text(text) = written else { return None };
        let (sign, magnitude) = match (allows, text.trim().strip_prefix('-')) {
            (Allows::Negative, Some(rest)) => (-1, rest),
            (Allows::Negative, None) => (1, text.trim()),
            _ => (1, text.as_str()),
        };
        let duration = humantime::parse_duration(magnitude).ok()?;
        let whole = duration.subsec_nanos() % 1_000_000 == 0;
        let fine = whole && duration <= MAX_DURATION && !(allows == Allows::PositiveOnly && duration == Duration::ZERO);
        fine.then(|| sign * i64::try_from(duration.as_millis()).unwrap())
    }

    /// Whether a written duration does not read as a duration at all (as opposed to one
    /// outside the limits).
    fn unreadable(written: &Written, allows: Allows) -> bool {
        match written {
            Written::Other(_) => true,
            Written::Text(text) => {
                let magnitude = match allows {
                    Allows::Negative => text.trim().strip_prefix('-').unwrap_or(text.trim()),
                    _ => text,
                };
                humantime::parse_duration(magnitude).is_err()
            }
        }
    }

    /// The window of the single-source pipeline.
    #[derive(Debug, Clone)]
    enum WindowDurations {
        Tumbling(Written),
        Hopping(Written, Written),
        Session(Written),
    }

    #[derive(Debug, Clone)]
    struct Single {
        max_ahead: Option<Written>,
        out_of_orderness: Written,
        idle_timeout: Option<Written>,
        within: Written,
        window: WindowDurations,
        lateness: Option<Written>,
    }

    impl Single {
        fn yaml(&self) -> String {
            let optional = |key: &str, written: &Option<Written>| written.as_ref().map(|written| format!(", {key}: {}", written.yaml())).unwrap_or_default();
            let window = match &self.window {
                WindowDurations::Tumbling(size) => format!("tumbling: {}", size.yaml()),
                WindowDurations::Hopping(size, slide) => format!("hopping: {{ size: {}, slide: {} }}", size.yaml(), slide.yaml()),
                WindowDurations::Session(gap) => format!("session: {{ gap: {} }}", gap.yaml()),
            };
            format!(
                "name: bad-durations
sources:
  events:
    topics: [events]
    format: json
    schema: {{ id: string, k: string, ts: long }}
    event_time: {{ field: ts, unit: millis{} }}
    watermark: {{ max_out_of_orderness: {}{} }}
steps:
  - dedup: {{ key: [id], within: {} }}
  - window: {{ group_by: [k], {window}{}, aggregates: {{ n: count() }} }}
sink:
  topic: out
",
                optional("max_ahead", &self.max_ahead),
                self.out_of_orderness.yaml(),
                optional("idle_timeout", &self.idle_timeout),
                self.within.yaml(),
                optional("allowed_lateness", &self.lateness),
            )
        }

        /// Each written duration: its key path and verdict.
        fn verdicts(&self) -> BTreeMap<&'static str, Option<i64>> {
            let mut verdicts = BTreeMap::new();
            if let Some(written) = &self.max_ahead {
                verdicts.insert("sources.events.event_time.max_ahead", verdict(written, Allows::PositiveOnly));
            }
            verdicts.insert("sources.events.watermark.max_out_of_orderness", verdict(&self.out_of_orderness, Allows::Zero));
            if let Some(written) = &self.idle_timeout {
                verdicts.insert("sources.events.watermark.idle_timeout", verdict(written, Allows::PositiveOnly));
            }
            verdicts.insert("steps[0].dedup.within", verdict(&self.within, Allows::PositiveOnly));
            match &self.window {
                WindowDurations::Tumbling(size) => drop(verdicts.insert("steps[1].window.tumbling", verdict(size, Allows::PositiveOnly))),
                WindowDurations::Hopping(size, slide) => {
                    verdicts.insert("steps[1].window.hopping.size", verdict(size, Allows::PositiveOnly));
                    verdicts.insert("steps[1].window.hopping.slide", verdict(slide, Allows::PositiveOnly));
                }
                WindowDurations::Session(gap) => drop(verdicts.insert("steps[1].window.session.gap", verdict(gap, Allows::PositiveOnly))),
            }
            if let Some(written) = &self.lateness {
                verdicts.insert("steps[1].window.allowed_lateness", verdict(written, Allows::Zero));
            }
            verdicts
        }

        fn unreadable(&self) -> Vec<&'static str> {
            let mut written: Vec<(&'static str, &Written, Allows)> = vec![
                ("sources.events.watermark.max_out_of_orderness", &self.out_of_orderness, Allows::Zero),
                ("steps[0].dedup.within", &self.within, Allows::PositiveOnly),
            ];
            written.extend(self.max_ahead.as_ref().map(|max_ahead| ("sources.events.event_time.max_ahead", max_ahead, Allows::PositiveOnly)));
            written.extend(self.idle_timeout.as_ref().map(|idle| ("sources.events.watermark.idle_timeout", idle, Allows::PositiveOnly)));
            written.extend(self.lateness.as_ref().map(|lateness| ("steps[1].window.allowed_lateness", lateness, Allows::Zero)));
            match &self.window {
                WindowDurations::Tumbling(size) => written.push(("steps[1].window.tumbling", size, Allows::PositiveOnly)),
                WindowDurations::Hopping(size, slide) => {
                    written.push(("steps[1].window.hopping.size", size, Allows::PositiveOnly));
                    written.push(("steps[1].window.hopping.slide", slide, Allows::PositiveOnly));
                }
                WindowDurations::Session(gap) => written.push(("steps[1].window.session.gap", gap, Allows::PositiveOnly)),
            }
            written.into_iter().filter(|(_, written, allows)| unreadable(written, *allows)).map(|(key, _, _)| key).collect()
        }

        /// A problem the durations make together, with where it is reported; None if none.
        fn combined_problem(&self, verdicts: &BTreeMap<&'static str, Option<i64>>) -> Option<&'static str> {
            let size = verdicts.get("steps[1].window.hopping.size").copied().flatten()?;
            let slide = verdicts.get("steps[1].window.hopping.slide").copied().flatten()?;
            if slide > size {
                Some("steps[1].window.hopping.slide")
            } else if (size + slide - 1) / slide > 1_000 {
                Some("steps[1].window.hopping")
            } else {
                None
            }
        }
    }

    fn single() -> impl Strategy<Value = Single> {
        let window = prop_oneof![
            written().prop_map(WindowDurations::Tumbling),
            (written(), written()).prop_map(|(size, slide)| WindowDurations::Hopping(size, slide)),
            written().prop_map(WindowDurations::Session),
        ];
        (prop::option::of(written()), written(), prop::option::of(written()), written(), window, prop::option::of(written())).prop_map(
            |(max_ahead, out_of_orderness, idle_timeout, within, window, lateness)| Single { max_ahead, out_of_orderness, idle_timeout, within, window, lateness },
        )
    }

    #[derive(Debug, Clone)]
    struct Joined {
        left_out_of_orderness: Written,
        right_out_of_orderness: Written,
        lower: Written,
        upper: Written,
        tumbling: Written,
    }

    impl Joined {
        fn yaml(&self) -> String {
            format!(
                "name: bad-join-durations
sources:
  views:
    topics: [views]
    format: json
    schema: {{ ad: string, ts: long }}
    event_time: {{ field: ts }}
    watermark: {{ max_out_of_orderness: {} }}
  clicks:
    topics: [clicks]
    format: json
    schema: {{ ad: string, ts: long }}
    event_time: {{ field: ts }}
    watermark: {{ max_out_of_orderness: {} }}
join:
  left: views
  right: clicks
  type: full
  on: [ad]
  within: {{ lower: {}, upper: {} }}
steps:
  - window: {{ group_by: [views.ad], tumbling: {}, aggregates: {{ n: count() }} }}
sink:
  topic: out
",
                self.left_out_of_orderness.yaml(),
                self.right_out_of_orderness.yaml(),
                self.lower.yaml(),
                self.upper.yaml(),
                self.tumbling.yaml()
            )
        }

        fn verdicts(&self) -> BTreeMap<&'static str, Option<i64>> {
            BTreeMap::from([
                ("sources.views.watermark.max_out_of_orderness", verdict(&self.left_out_of_orderness, Allows::Zero)),
                ("sources.clicks.watermark.max_out_of_orderness", verdict(&self.right_out_of_orderness, Allows::Zero)),
                ("join.within.lower", verdict(&self.lower, Allows::Negative)),
                ("join.within.upper", verdict(&self.upper, Allows::Negative)),
                ("steps[0].window.tumbling", verdict(&self.tumbling, Allows::PositiveOnly)),
            ])
        }

        fn unreadable(&self) -> Vec<&'static str> {
            [
                ("sources.views.watermark.max_out_of_orderness", &self.left_out_of_orderness, Allows::Zero),
                ("sources.clicks.watermark.max_out_of_orderness", &self.right_out_of_orderness, Allows::Zero),
                ("join.within.lower", &self.lower, Allows::Negative),
                ("join.within.upper", &self.upper, Allows::Negative),
                ("steps[0].window.tumbling", &self.tumbling, Allows::PositiveOnly),
            ]
            .into_iter()
            .filter(|(_, written, allows)| unreadable(written, *allows))
            .map(|(key, _, _)| key)
            .collect()
        }

        fn combined_problem(&self, verdicts: &BTreeMap<&'static str, Option<i64>>) -> Option<&'static str> {
            let lower = verdicts["join.within.lower"]?;
            let upper = verdicts["join.within.upper"]?;
            (lower > upper).then_some("join.within")
        }
    }

    fn joined() -> impl Strategy<Value = Joined> {
        (written(), written(), written(), written(), written()).prop_map(|(left_out_of_orderness, right_out_of_orderness, lower, upper, tumbling)| Joined {
            left_out_of_orderness,
            right_out_of_orderness,
            lower,
            upper,
            tumbling,
        })
    }

    /// Event times at the limits and around now, for pipelines that validate.
    fn times() -> Vec<i64> {
        vec![NOW, MIN_EVENT_TIME, NOW + 1, MAX_EVENT_TIME, NOW - 86_400_000, i64::MAX, MAX_EVENT_TIME - 1, NOW + 2]
    }

    /// `validate`'s answer for durations: Ok exactly when each is within the limits (and they
    /// fit together); else a problem at the key of each one that is not, and no problem
    /// anywhere else. A pipeline that validates runs records at the limits of time.
    fn check(
        text: &str,
        verdicts: &BTreeMap<&'static str, Option<i64>>,
        unreadable: &[&'static str],
        combined: Option<&'static str>,
        records: &[(&str, Input)],
    ) -> Result<(), TestCaseError> {
        let refused: Vec<&str> = verdicts.iter().filter(|(_, verdict)| verdict.is_none()).map(|(key, _)| *key).collect();
        let unreadable: Vec<&str> = verdicts.keys().copied().filter(|key| unreadable.contains(key)).collect();
        match weir::plan::parse_pipeline(text) {
            Err(errors) => {
                prop_assert!(!errors.problems.is_empty(), "an error with no problem in it");
                prop_assert!(!refused.is_empty() || combined.is_some(), "refused durations within the limits: {}\n{}", errors, text);
                for problem in &errors.problems {
                    let known = verdicts.contains_key(problem.location.as_str()) || Some(problem.location.as_str()) == combined;
                    prop_assert!(known, "a problem at '{}', not at a duration's key: {}\n{}", problem.location, errors, text);
                    prop_assert!(!problem.message.is_empty());
                }
                let named = |key: &str| errors.problems.iter().any(|problem| problem.location == key);
                let must_be_named: Vec<&str> = if !unreadable.is_empty() {
                    unreadable
                } else if !refused.is_empty() {
                    refused
                } else {
                    combined.into_iter().collect()
                };
                for key in must_be_named {
                    prop_assert!(named(key), "nothing says what is wrong with {}: {}\n{}", key, errors, text);
                }
            }
            Ok(pipeline) => {
                prop_assert!(refused.is_empty() && combined.is_none(), "accepted {:?} (and {:?})\n{}", refused, combined, text);
                let outcome = run_topics(&pipeline, records, NOW, 3).map_err(|failure| TestCaseError::fail(format!("a batch failed with on_error dlq: {failure}")))?;
                for (_, output) in &outcome.outputs {
                    match output.destination {
                        Destination::Dlq => {
                            let stage = header(output, "weir-error-stage");
                            prop_assert!([ErrorStage::Decode, ErrorStage::Late, ErrorStage::Process].iter().any(|known| Some(known.as_str()) == stage), "{:?}", output);
                        }
                        _ => {
                            let value: Value = serde_json::from_slice(output.value.own().unwrap()).unwrap();
                            let (start, end) = (value["window_start"].as_i64().unwrap(), value["window_end"].as_i64().unwrap());
                            prop_assert!(start < end && start <= MAX_EVENT_TIME && end > MIN_EVENT_TIME, "{}", value);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn any_duration_validates_or_is_named(durations in single()) {
            let verdicts = durations.verdicts();
            let records: Vec<(&str, Input)> = times()
                .into_iter()
                .enumerate()
                .map(|(index, time)| ("events", (format!(r#"{{"id":"e{}","k":"k{}","ts":{time}}}"#, index % 5, index % 2).into_bytes(), None)))
                .collect();
            check(&durations.yaml(), &verdicts, &durations.unreadable(), durations.combined_problem(&verdicts), &records)?;
        }

        #[test]
        fn any_join_duration_validates_or_is_named(durations in joined()) {
            let verdicts = durations.verdicts();
            let records: Vec<(&str, Input)> = times()
                .into_iter()
                .enumerate()
                .map(|(index, time)| (if index % 2 == 0 { "views" } else { "clicks" }, (format!(r#"{{"ad":"a{}","ts":{time}}}"#, index % 3).into_bytes(), None)))
                .collect();
            check(&durations.yaml(), &verdicts, &durations.unreadable(), durations.combined_problem(&verdicts), &records)?;
        }
    }

    /// KNOWN GAP (found here): PIPELINE.md and STYLE.md promise every problem at once, but a
    /// duration that does not read hides the limit problems of the durations beside it.
    #[test]
    fn limits_are_checked_beside_an_unreadable_duration() {
        let durations = Single {
            max_ahead: None,
            out_of_orderness: Written::Text(String::new()),
            idle_timeout: Some(Written::Text("0ns".into())),
            within: Written::Text("1h".into()),
            window: WindowDurations::Tumbling(Written::Text("1m".into())),
            lateness: None,
        };
        let errors = weir::plan::parse_pipeline(&durations.yaml()).unwrap_err();
        let locations: Vec<&str> = errors.problems.iter().map(|problem| problem.location.as_str()).collect();
        assert_eq!(locations, ["sources.events.watermark.max_out_of_orderness", "sources.events.watermark.idle_timeout"], "{errors}");
    }
}

/// Filter expressions from CEL's tokens, put together at random (bounded: CEL parsing is not
/// this file's subject, only that nothing in a config or a record panics).
mod filters {
    use proptest::prelude::*;

    use super::config;
    use super::drive::run;

    const TOKENS: &[&str] = &[
        "v", "k", "ts", "_topic", "_offset", "_headers", "0", "1", "-1", "9223372036854775807", "18446744073709551615u", "1.5", "1e400", "'a'",
        "b'x'", "true", "null", "==", "!=", "<", ">=", "+", "-", "*", "/", "%", "&&", "||", "!", "?", ":", "(", ")", "[", "]", "{", "}", ",", ".",
        "in", "size(", "int(", "string(", "has(", "matches(", "timestamp(", "duration(", ".size()", "'\\u'", "\"",
    ];

    proptest! {
        #![proptest_config(config(128))]

        #[test]
        fn any_filter_compiles_or_is_named_and_evaluates_or_dead_letters(tokens in prop::collection::vec(prop::sample::select(TOKENS), 0..12)) {
            let expression = tokens.join(" ");
            let text = format!(
                "name: bad-filters\nsources:\n  events:\n    topics: [events]\n    format: json\n    schema: {{ v: long?, k: string?, ts: long? }}\nsteps:\n  - filter: {}\nsink:\n  topic: out\n",
                serde_json::Value::from(expression.as_str())
            );
            match weir::plan::parse_pipeline(&text) {
                Err(errors) => prop_assert!(errors.problems.iter().all(|problem| problem.location == "steps[0].filter"), "{}", errors),
                Ok(pipeline) => {
                    let records: Vec<_> = [r#"{"v":1,"k":"a","ts":0}"#, r#"{"v":9223372036854775807,"k":null,"ts":-1}"#, r#"{"v":null}"#]
                        .iter()
                        .map(|value| (value.as_bytes().to_vec(), None))
                        .collect();
                    let outcome = run(&pipeline, &records, 0, 2).map_err(|failure| TestCaseError::fail(failure.to_string()))?;
                    for (_, output) in &outcome.outputs {
                        let stage = super::header(output, "weir-error-stage");
                        prop_assert!(stage.is_none() || stage == Some("process"), "{:?}", output);
                    }
                }
            }
        }
    }
}

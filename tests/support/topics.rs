//! Topics: creating them, producing records, and reading what a read_committed (or
//! read_uncommitted) consumer sees, with offsets.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::*;

pub fn create_topic(name: &str, partitions: i32) {
    create_topic_with(name, partitions, &[]);
}

/// Creates a topic with topic configs, e.g. `("max.message.bytes", "4000")`.
pub fn create_topic_with(name: &str, partitions: i32, config: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = client_config().create().unwrap();
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in config {
        topic = topic.set(key, value);
    }
    let results = block_on(admin.create_topics([&topic], &AdminOptions::new())).unwrap();
    for result in results {
        result.unwrap();
    }
}

/// One record to produce (partition None: by key).
#[derive(Debug, Clone)]
pub struct Input {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub partition: Option<i32>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Input {
    pub fn value(value: impl Into<Vec<u8>>) -> Input {
        Input { key: None, value: Some(value.into()), partition: None, headers: Vec::new() }
    }

    pub fn keyed(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Input {
        Input { key: Some(key.into()), value: Some(value.into()), partition: None, headers: Vec::new() }
    }

    pub fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Input {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

/// An idempotent producer for test input.
pub struct TestProducer {
    producer: BaseProducer,
}

impl TestProducer {
    pub fn new() -> TestProducer {
        let producer = client_config()
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        TestProducer { producer }
    }

    pub fn send(&self, topic: &str, input: &Input) {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(key) = &input.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &input.value {
            record = record.payload(value.as_slice());
        }
        if let Some(partition) = input.partition {
            record = record.partition(partition);
        }
        if !input.headers.is_empty() {
            let headers = input
                .headers
                .iter()
                .fold(OwnedHeaders::new(), |headers, (key, value)| headers.insert(Header { key, value: Some(value.as_slice()) }));
            record = record.headers(headers);
        }
        self.send_record(record);
    }

    /// Sends a key and a value without building an [`Input`] (for generators at high rates).
    pub fn send_bytes(&self, topic: &str, key: &[u8], value: &[u8]) {
        self.send_record(BaseRecord::to(topic).key(key).payload(value));
    }

    /// Sends, waiting while the local queue is full.
    fn send_record(&self, mut record: BaseRecord<'_, [u8], [u8]>) {
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((_, returned)) => {
                    record = returned;
                    self.producer.poll(Duration::from_millis(50));
                }
            }
        }
        self.producer.poll(Duration::ZERO);
    }

    /// Waits until everything sent is acknowledged (or failed: librdkafka gives a record up
    /// after `message.timeout.ms`, 5 minutes). Under broker restarts librdkafka can hold
    /// records back for more than a minute while it finds their partitions' leader again.
    pub fn flush(&self) {
        let deadline = Instant::now() + Duration::from_secs(330);
        while let Err(error) = self.producer.flush(Duration::from_secs(30)) {
            assert!(Instant::now() < deadline, "the test producer could not deliver its records: {error}");
        }
    }
}

/// Produces records and waits until all are acknowledged.
pub fn produce(topic: &str, inputs: impl IntoIterator<Item = Input>) {
    let producer = TestProducer::new();
    for input in inputs {
        producer.send(topic, &input);
    }
    producer.flush();
}

/// A record as a read_committed consumer of an output topic sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seen {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
}

impl Seen {
    pub fn value_text(&self) -> String {
        String::from_utf8_lossy(self.value.as_deref().unwrap_or_default()).into_owned()
    }

    pub fn value_json(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().unwrap_or_default()).expect("output value is JSON")
    }
}

pub fn partition_count(topic: &str) -> i32 {
    let consumer: BaseConsumer = client_config().create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    metadata.topics()[0].partitions().len() as i32
}

/// Whether `topic` exists on the broker.
pub fn topic_exists(topic: &str) -> bool {
    let consumer: BaseConsumer = client_config().create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    metadata.topics().iter().any(|found| found.name() == topic && found.error().is_none() && !found.partitions().is_empty())
}

/// Reads every committed record of `topic` (read_committed), from the beginning to the
/// current end of each partition. Call it when the writers are done or fenced.
pub fn read_committed(topic: &str) -> Vec<Seen> {
    read_topic(topic, "read_committed")
}

pub fn read_uncommitted(topic: &str) -> Vec<Seen> {
    read_topic(topic, "read_uncommitted")
}

/// Reads until the consumer's position reaches each partition's end offset as it was when
/// reading began. The position moves past transaction markers, and under read_committed it
/// waits for a just-committed transaction's markers, which the coordinator writes after
/// `commit_transaction` returns (EOF events would fire too early there).
pub fn read_topic(topic: &str, isolation: &str) -> Vec<Seen> {
    let consumer: BaseConsumer = client_config()
        .set("group.id", unique("reader"))
        .set("isolation.level", isolation)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    let mut ends = Vec::new();
    // The bounds come from a read_uncommitted client: a read_committed one gets the last
    // stable offset, which stays at the start of a just-committed transaction until its
    // markers are written (after commit returns), and would skip the partition entirely.
    let bounds: BaseConsumer = client_config().set("isolation.level", "read_uncommitted").create().unwrap();
    for partition in 0..partition_count(topic) {
        let (low, high) = bounds.fetch_watermarks(topic, partition, Duration::from_secs(10)).unwrap();
        if high > low {
            ends.push((partition, high));
            assignment.add_partition_offset(topic, partition, Offset::Beginning).unwrap();
        }
    }
    let mut seen = Vec::new();
    if ends.is_empty() {
        return seen;
    }
    consumer.assign(&assignment).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|header| {
                                (
                                    header.key.to_string(),
                                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                seen.push(Seen {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                    headers,
                });
                continue;
            }
            Some(Err(error)) => panic!("reading {topic}: {error}"),
            None => {}
        }
        let positions = consumer.position().unwrap();
        let done = ends.iter().all(|(partition, end)| {
            matches!(
                positions.find_partition(topic, *partition).map(|element| element.offset()),
                Some(Offset::Offset(position)) if position >= *end
            )
        });
        if done {
            return seen;
        }
        assert!(Instant::now() < deadline, "reading {topic} did not reach the end offsets {ends:?} in time");
    }
}

/// The group's committed offset for each partition of `topic` (-1: none).
pub fn committed_offsets(group: &str, topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = client_config().set("group.id", group).create().unwrap();
    let mut list = TopicPartitionList::new();
    for partition in 0..partition_count(topic) {
        list.add_partition(topic, partition);
    }
    // A coordinator that is still loading (a fresh broker, a new group) answers with a
    // retriable error; ask again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let committed = loop {
        match consumer.committed_offsets(list.clone(), Duration::from_secs(10)) {
            Ok(committed) => break committed,
            Err(error) if Instant::now() < deadline => {
                eprintln!("committed offsets of {group}: {error}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(error) => panic!("committed offsets of {group}: {error}"),
        }
    };
    committed
        .elements()
        .iter()
        .map(|element| match element.offset() {
            Offset::Offset(offset) => offset,
            _ => -1,
        })
        .collect()
}

/// The first offset still held in each partition of `topic`.
pub fn start_offsets(topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = client_config().create().unwrap();
    (0..partition_count(topic))
        .map(|partition| consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)).unwrap().0)
        .collect()
}

/// The end offset of each partition of `topic`.
pub fn end_offsets(topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = client_config().create().unwrap();
    (0..partition_count(topic))
        .map(|partition| consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)).unwrap().1)
        .collect()
}

/// Deletes the records of `topic`[`partition`] before `offset`, as an operator's
/// `kafka-delete-records` would, after giving the topic the delete policy the broker requires
/// for that (and no time limit, so nothing else goes).
pub fn delete_records_before(topic: &str, partition: i32, offset: i64) {
    use rdkafka::admin::{AlterConfig, ResourceSpecifier};
    let admin: AdminClient<DefaultClientContext> = client_config().create().unwrap();
    let policy = AlterConfig::new(ResourceSpecifier::Topic(topic)).set("cleanup.policy", "compact,delete").set("retention.ms", "-1");
    for result in block_on(admin.alter_configs([&policy], &AdminOptions::new())).unwrap() {
        result.unwrap_or_else(|error| panic!("altering {topic}: {error:?}"));
    }
    let mut offsets = TopicPartitionList::new();
    offsets.add_partition_offset(topic, partition, Offset::Offset(offset)).unwrap();
    let deleted = block_on(admin.delete_records(&offsets, &AdminOptions::new())).unwrap();
    for element in deleted.elements() {
        assert!(element.error().is_ok(), "deleting records of {topic}[{partition}]: {:?}", element.error());
    }
}

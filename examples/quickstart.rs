//! The Kafka side of `scripts/quickstart`: creates the example topics and produces sample
//! click events (`prepare`), then prints what weir wrote (`show`).
//!
//! Usage: quickstart prepare|show BOOTSTRAP_SERVERS

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const INPUT: &str = "clicks";
const OUTPUT: &str = "clicks-filtered";
/// The second output: the big clicks.
const BIG: &str = "clicks-big";
const EVENTS: u64 = 10_000;

fn main() -> anyhow::Result<()> {
    let arguments: Vec<String> = std::env::args().collect();
    let (Some(command), Some(bootstrap)) = (arguments.get(1), arguments.get(2)) else {
        anyhow::bail!("usage: quickstart prepare|show BOOTSTRAP_SERVERS");
    };
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    match command.as_str() {
        "prepare" => prepare(&config),
        "show" => show(&config),
        other => anyhow::bail!("unknown command {other}; use prepare or show"),
    }
}

fn prepare(config: &ClientConfig) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let topics = [
        NewTopic::new(INPUT, 3, TopicReplication::Fixed(1)),
        NewTopic::new(OUTPUT, 3, TopicReplication::Fixed(1)),
        NewTopic::new(BIG, 3, TopicReplication::Fixed(1)),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for result in runtime.block_on(admin.create_topics(&topics, &AdminOptions::new()))? {
        match result {
            Ok(topic) => println!("created topic {topic}"),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => println!("topic {topic} exists"),
            Err((topic, code)) => anyhow::bail!("creating {topic}: {code}"),
        }
    }
    let producer: BaseProducer = config.clone().set("enable.idempotence", "true").create()?;
    let start_ms = 1_763_800_000_000u64;
    for id in 0..EVENTS {
        // Mostly good clicks; some free ones, some bots, and a few broken records for the DLQ.
        let user = if id % 10 == 3 { "bot".to_string() } else { format!("user-{}", id % 50) };
        let value = if id % 1000 == 999 {
            "{broken json".to_string()
        } else {
            format!(
                r#"{{"event_id":"e{id}","user_id":"{user}","amount":{}.{:02},"ts":{}}}"#,
                id % 7,
                id % 100,
                start_ms + id * 100
            )
        };
        let key = user.clone();
        let mut record = BaseRecord::to(INPUT).key(&key).payload(&value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, returned)) => {
                    record = returned;
                    producer.poll(Duration::from_millis(20));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
    println!("produced {EVENTS} click events to {INPUT}");
    Ok(())
}

fn show(config: &ClientConfig) -> anyhow::Result<()> {
    for (topic, sample) in [(OUTPUT, 3), (BIG, 3), ("clicks-filter.dlq", 2)] {
        let records = read_committed(config, topic)?;
        println!("\n{topic}: {} records (read_committed); a sample:", records.len());
        for (key, value, headers) in records.iter().take(sample) {
            println!("  key={key} value={value}{headers}");
        }
    }
    Ok(())
}

fn read_committed(config: &ClientConfig, topic: &str) -> anyhow::Result<Vec<(String, String, String)>> {
    let consumer: BaseConsumer = config
        .clone()
        .set("group.id", "weir-quickstart-reader")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata.topics().first().map_or(0, |topic| topic.partitions().len() as i32);
    let mut assignment = TopicPartitionList::new();
    let mut ends = Vec::new();
    for partition in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
        if high > low {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
            ends.push((partition, high));
        }
    }
    let mut records = Vec::new();
    if ends.is_empty() {
        return Ok(records);
    }
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            let text = |bytes: Option<&[u8]>| String::from_utf8_lossy(bytes.unwrap_or_default()).into_owned();
            // DLQ records say why they are there.
            let headers: String = message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .filter(|header| header.key.starts_with("weir-error"))
                        .map(|header| format!(" {}={}", header.key, text(header.value)))
                        .collect()
                })
                .unwrap_or_default();
            records.push((text(message.key()), text(message.payload()), headers));
            continue;
        }
        let positions = consumer.position()?;
        let done = ends.iter().all(|(partition, end)| {
            matches!(positions.find_partition(topic, *partition).map(|e| e.offset()), Some(Offset::Offset(p)) if p >= *end)
        });
        if done {
            break;
        }
    }
    Ok(records)
}

//! The end-to-end benchmark (issue 7): one command, one broker, one run, every number checked.
//!
//! Run `scripts/bench` (builds the Kafka Streams baseline with Maven, then runs this) or
//! `cargo bench --bench e2e -- [--bids N] [--seed S] [--latency-seconds S] [--out FILE]`.
//!
//! 1. Generates Nexmark-shaped events from a seed into three topics: persons, auctions and
//!    bids, in Nexmark's proportions (1 : 3 : 46) and average sizes (200 B, 500 B, 100 B),
//!    one event per millisecond of event time, about 10% of persons and bids up to 2 s out of
//!    order, and every 20th bid sent twice (so a dedup has something to drop). Bids and
//!    auctions are keyed by auction id, so both are partitioned by it.
//! 2. Runs each workload over what the topics hold, from the beginning, timed from the
//!    moment the reader owns its partitions to the moment everything is committed: the raw
//!    rdkafka consume→produce loop (no state, no transactions; the physical baseline), then
//!    weir and Kafka Streams (`exactly_once_v2`, 100 ms commit interval as weir's, RocksDB
//!    stores) on pass-through, dedup, tumbling and hopping windows, and the auction ⋈ bid
//!    interval join; weir's pass-through also without transactions (`idempotent_upsert`).
//! 3. Checks every run's output against the answer computed here from the generated events:
//!    counts and order-independent checksums, every window's count, every join pair. A fast
//!    wrong answer fails the run.
//! 4. Measures end-to-end latency (p50/p99, produce to read_committed consume) of each
//!    pass-through at 50% and 70% of its own maximum rate from step 2, and the time from a
//!    SIGKILL to the first committed output of a dedup holding one key per bid.
//!
//! CPU time is each process's user + system time from /proc (the raw loop runs inside this
//! process); memory is the peak resident set, sampled every 20 ms.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

use support::*;

const PARTITIONS: i32 = 4;
/// How far behind its place in the stream a late-sent event's time may be, at most.
const MAX_DISORDER_MS: i64 = 2_000;
/// The watermark's out-of-orderness (weir) and the grace (Kafka Streams): more than the
/// largest disorder (2 s, and a duplicate is sent up to 2.5 s after its original's time), so
/// no record is late in either; `generate` checks it.
const OUT_OF_ORDERNESS_MS: i64 = 3_000;
/// An auction takes bids for this long after it opens; bids pick auctions opened within
/// the last 9 s of their own time.
const AUCTION_LIFETIME_MS: i64 = 10_000;
const WINDOW_MS: i64 = 10_000;
const HOP_MS: i64 = 2_000;

struct Options {
    bids: u64,
    seed: u64,
    latency_seconds: u64,
    out: Option<PathBuf>,
    kstreams_jar: PathBuf,
    /// Which parts run: throughput, latency (needs throughput's rates), recovery.
    sections: Vec<String>,
    /// Which throughput workloads run (all when empty): passthrough, dedup, tumbling,
    /// hopping, join.
    workloads: Vec<String>,
    /// Which systems run (all when empty), by [`System::name`]: raw, raw-tx, weir,
    /// weir-upsert, weir-separate, kafka-streams.
    systems: Vec<String>,
}

fn options() -> Options {
    let mut options = Options {
        bids: 1_000_000,
        seed: 42,
        latency_seconds: 15,
        out: None,
        kstreams_jar: std::env::var_os("KSTREAMS_JAR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("benches/kstreams/target/kstreams-bench.jar")),
        sections: ["throughput", "latency", "recovery"].map(String::from).to_vec(),
        workloads: Vec::new(),
        systems: Vec::new(),
    };
    let arguments: Vec<String> = std::env::args().skip(1).filter(|argument| argument != "--bench").collect();
    let mut iter = arguments.iter();
    while let Some(name) = iter.next() {
        let mut value = || iter.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match name.as_str() {
            "--bids" => options.bids = value().parse().expect("--bids N"),
            "--seed" => options.seed = value().parse().expect("--seed S"),
            "--latency-seconds" => options.latency_seconds = value().parse().expect("--latency-seconds S"),
            "--out" => options.out = Some(PathBuf::from(value())),
            "--sections" => options.sections = value().split(',').map(String::from).collect(),
            "--workloads" => options.workloads = value().split(',').map(String::from).collect(),
            "--systems" => options.systems = value().split(',').map(String::from).collect(),
            other => panic!("unknown argument {other}; see benches/e2e.rs"),
        }
    }
    let known = System::ALL.map(System::name);
    if let Some(unknown) = options.systems.iter().find(|name| !known.contains(&name.as_str())) {
        panic!("unknown system {unknown} in --systems; one of {}", known.join(", "));
    }
    assert!(
        options.kstreams_jar.is_file(),
        "no Kafka Streams baseline at {}: run scripts/bench, which builds it (mvn package in benches/kstreams)",
        options.kstreams_jar.display()
    );
    options
}

// ---------------------------------------------------------------------------------------
// The Nexmark-shaped events.

/// splitmix64: a small seeded generator, the same stream on every machine.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    fn text(&mut self, length: usize) -> String {
        (0..length).map(|_| (b'a' + self.below(26) as u8) as char).collect()
    }
}

#[derive(Clone)]
struct Bid {
    id: u64,
    auction: u64,
    price: u64,
    ts: i64,
    value: String,
}

struct Generated {
    /// The first event's time, on a 10 s boundary, so that the last is a minute before the run
    /// (recent: Kafka Streams' changelogs, whose retention counts from record times, keep it).
    start: i64,
    persons: Vec<(u64, String)>,
    auctions: Vec<(u64, i64, String)>,
    /// In the order they are sent, duplicates included.
    bids: Vec<Bid>,
}

impl Generated {
    fn events(&self) -> u64 {
        (self.persons.len() + self.auctions.len() + self.bids.len()) as u64
    }

    fn max_bid_time(&self) -> i64 {
        self.bids.iter().map(|bid| bid.ts).max().unwrap_or(self.start)
    }
}

fn generate(distinct_bids: u64, seed: u64) -> Generated {
    // Event time spans one millisecond per event, 50 events per 46 bids; it ends a minute ago.
    let span = (distinct_bids * 50 / 46) as i64;
    let start = (now_ms() - span - 60_000) / WINDOW_MS * WINDOW_MS;
    let mut random = Random(seed);
    let mut generated = Generated { start, persons: Vec::new(), auctions: Vec::new(), bids: Vec::new() };
    // Auction open times, ascending (auctions are never sent late), for picking one by time.
    let mut opened: Vec<i64> = Vec::new();
    let mut resend: Vec<(u64, Bid)> = Vec::new();
    let mut event: u64 = 0;
    let mut next_bid = 0;
    // Sent late: about 10% of persons and bids carry a time up to 2 s before their place.
    let time_of = |random: &mut Random, event: u64| {
        let nominal = start + event as i64;
        match random.below(10) {
            0 => nominal - 1 - random.below(MAX_DISORDER_MS as u64) as i64,
            _ => nominal,
        }
    };
    while next_bid < distinct_bids {
        match event % 50 {
            0 => {
                let id = generated.persons.len() as u64;
                let ts = time_of(&mut random, event);
                let value = format!(
                    r#"{{"id":{id},"name":"{} {}","email":"{}@{}.com","credit_card":"{:016}","city":"{}","state":"{}","ts":{ts},"extra":"{}"}}"#,
                    random.text(6),
                    random.text(8),
                    random.text(7),
                    random.text(5),
                    random.below(10_000_000_000_000_000),
                    random.text(9),
                    random.text(2),
                    random.text(60)
                );
                generated.persons.push((id, value));
            }
            1..=3 => {
                let id = generated.auctions.len() as u64;
                let ts = start + event as i64;
                let value = format!(
                    r#"{{"auction":{id},"item_name":"{}","description":"{}","initial_bid":{},"reserve":{},"ts":{ts},"expires":{},"seller":{},"category":{},"extra":"{}"}}"#,
                    random.text(12),
                    random.text(80),
                    1 + random.below(1000),
                    1000 + random.below(10_000),
                    ts + AUCTION_LIFETIME_MS,
                    random.below(generated.persons.len() as u64 + 1),
                    10 + random.below(5),
                    random.text(230)
                );
                opened.push(ts);
                generated.auctions.push((id, ts, value));
            }
            _ => {
                let id = next_bid;
                next_bid += 1;
                let ts = time_of(&mut random, event).max(opened[0]);
                // Auctions open at or before the bid and within the last 9 s: half the bids go
                // to the newest (the hot one), the rest anywhere in that range.
                let newest = opened.partition_point(|open| *open <= ts) - 1;
                let oldest = opened.partition_point(|open| *open < ts - (AUCTION_LIFETIME_MS - 1_000));
                let auction = match random.below(2) {
                    0 => newest,
                    _ => oldest.min(newest) + random.below((newest - oldest.min(newest) + 1) as u64) as usize,
                } as u64;
                let price = 1 + random.below(100_000);
                let value = format!(
                    r#"{{"id":{id},"auction":{auction},"bidder":{},"price":{price},"channel":"{}","url":"https://{}.com/{}","ts":{ts},"extra":"{}"}}"#,
                    random.below(generated.persons.len() as u64 + 1),
                    ["web", "app", "partner", "api"][random.below(4) as usize],
                    random.text(6),
                    random.text(10),
                    random.text(8)
                );
                let bid = Bid { id, auction, price, ts, value };
                if id % 20 == 7 {
                    resend.push((event + 500, bid.clone()));
                }
                generated.bids.push(bid);
            }
        }
        event += 1;
        // A duplicate goes out 500 events after its original.
        while resend.first().is_some_and(|(due, _)| *due <= event) {
            generated.bids.push(resend.remove(0).1);
        }
    }
    generated.bids.extend(resend.into_iter().map(|(_, bid)| bid));
    // The answers below assume no record is late: check how far behind the newest time
    // already sent each bid is.
    let mut newest = start;
    for bid in &generated.bids {
        assert!(newest - bid.ts < OUT_OF_ORDERNESS_MS, "bid {} is {} ms behind, more than the out-of-orderness", bid.id, newest - bid.ts);
        newest = newest.max(bid.ts);
    }
    generated
}

struct Topics {
    persons: String,
    auctions: String,
    bids: String,
    /// The enrichment's table (filled only when that workload runs).
    accounts: String,
}

/// Rows of the enrichment's table; a bid looks up account `id % ACCOUNTS`.
const ACCOUNTS: u64 = 1_000_000;

/// Account `n`'s row, about 110 bytes, keyed by `n`.
fn account(n: u64) -> String {
    format!(r#"{{"account":{n},"name":"account {n:07}","country":"c{:02}","tier":{},"since":"2024-01-01","extra":"{:020}"}}"#, n % 50, n % 5, n * 7)
}

/// Writes the enrichment's table: one row per account, keyed by its number as text.
fn produce_accounts(topics: &mut Topics) {
    topics.accounts = unique("accounts");
    create_topic_with(&topics.accounts, PARTITIONS, &[("retention.ms", "-1"), ("cleanup.policy", "compact")]);
    let producer = TestProducer::new();
    for n in 0..ACCOUNTS {
        producer.send(&topics.accounts, &Input::keyed(n.to_string(), account(n)));
    }
    producer.flush();
}

/// What each enriched bid carries of its account: its number and tier, in one value.
fn account_mark(account: u64, tier: u64) -> u64 {
    account * 8 + tier
}

fn produce_all(generated: &Generated) -> Topics {
    let topics = Topics {
        persons: unique("nexmark-persons"),
        auctions: unique("nexmark-auctions"),
        bids: unique("nexmark-bids"),
        accounts: String::new(),
    };
    for topic in [&topics.persons, &topics.auctions, &topics.bids] {
        create_topic_with(topic, PARTITIONS, &[("retention.ms", "-1")]);
    }
    let producer = TestProducer::new();
    for (id, value) in &generated.persons {
        producer.send(&topics.persons, &Input::keyed(id.to_string(), value.as_str()));
    }
    for (id, _, value) in &generated.auctions {
        producer.send(&topics.auctions, &Input::keyed(id.to_string(), value.as_str()));
    }
    for bid in &generated.bids {
        producer.send(&topics.bids, &Input::keyed(bid.auction.to_string(), bid.value.as_str()));
    }
    producer.flush();
    topics
}

// ---------------------------------------------------------------------------------------
// Expected answers and checks.

/// An order-independent checksum of a set of records: the wrapping sum of a mix of fields.
fn mix(a: u64, b: u64) -> u64 {
    support_hash(&[a.to_le_bytes(), b.to_le_bytes()].concat())
}

fn support_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

#[derive(Debug, PartialEq)]
struct Sum {
    count: u64,
    checksum: u64,
}

impl Sum {
    fn of(items: impl IntoIterator<Item = (u64, u64)>) -> Sum {
        items.into_iter().fold(Sum { count: 0, checksum: 0 }, |sum, (a, b)| Sum { count: sum.count + 1, checksum: sum.checksum.wrapping_add(mix(a, b)) })
    }
}

enum Expected {
    /// Every bid once per time it was sent: (id, price).
    Bids(Sum),
    /// Every distinct bid once.
    Distinct(Sum),
    /// Counts per (auction, window start); windows ending at or before `must_close` must all be there.
    Windows { counts: HashMap<(u64, i64), u64>, must_close: i64, count_field: &'static str },
    /// One (auction, bid id) pair per bid sent.
    Pairs(Sum),
    /// Two outputs: this output as the first says, and `<output>-2` as the second does.
    TwoOutputs(Box<Expected>, Box<Expected>),
    /// The last (bids, total) per auction an upsert reader keeps.
    Totals(BTreeMap<u64, (u64, u64)>),
    /// Every bid once per time it was sent, with its account: (id, account mark).
    Enriched(Sum),
}

fn field(value: &Value, path: &[&str]) -> u64 {
    let mut current = value;
    for name in path {
        current = &current[*name];
    }
    current.as_u64().or_else(|| current.as_str().and_then(|text| text.parse().ok())).unwrap_or_else(|| panic!("output without {path:?}: {value}"))
}

fn window_counts(generated: &Generated, size: i64, slide: i64) -> HashMap<(u64, i64), u64> {
    let mut counts = HashMap::new();
    for bid in &generated.bids {
        let last_start = bid.ts - bid.ts.rem_euclid(slide);
        let mut start = last_start;
        while start > bid.ts - size {
            *counts.entry((bid.auction, start)).or_insert(0) += 1;
            start -= slide;
        }
    }
    counts
}

/// Checks an output topic against the expected answer; Err says what is wrong.
fn check(output: &str, expected: &Expected) -> Result<String, String> {
    if let Expected::TwoOutputs(first, second) = expected {
        let (first, second) = (check(output, first)?, check(&format!("{output}-2"), second)?);
        return Ok(format!("{first}; {second}"));
    }
    let records = read_committed(output);
    let values: Vec<Value> = records.iter().map(Seen::value_json).collect();
    let compare = |what: &str, got: Sum, want: &Sum| match &got == want {
        true => Ok(format!("{} {what}, checksum {:016x}", got.count, got.checksum)),
        false => Err(format!("{what}: got {} (checksum {:016x}), expected {} ({:016x})", got.count, got.checksum, want.count, want.checksum)),
    };
    match expected {
        Expected::Bids(want) => compare("bids", Sum::of(values.iter().map(|v| (field(v, &["id"]), field(v, &["price"])))), want),
        Expected::TwoOutputs(..) => Err("checked above".into()),
        Expected::Distinct(want) => compare("distinct bids", Sum::of(values.iter().map(|v| (field(v, &["id"]), field(v, &["price"])))), want),
        Expected::Enriched(want) => {
            let mark = |v: &Value| account_mark(field(v, &["accounts", "account"]), field(v, &["accounts", "tier"]));
            compare("enriched bids", Sum::of(values.iter().map(|v| (field(v, &["id"]), mark(v)))), want)
        }
        Expected::Pairs(want) => {
            compare("join pairs", Sum::of(values.iter().map(|v| (field(v, &["auctions", "auction"]), field(v, &["bids", "id"])))), want)
        }
        Expected::Totals(want) => {
            let mut last = BTreeMap::new();
            for value in &values {
                last.insert(field(value, &["auction"]), (field(value, &["bids"]), field(value, &["total"])));
            }
            match &last == want {
                true => Ok(format!("{} auctions, each last count and sum right ({} updates)", last.len(), values.len())),
                false => {
                    let wrong = want.iter().filter(|(auction, totals)| last.get(*auction) != Some(*totals)).count();
                    Err(format!("{wrong} of {} auctions end with a wrong count or sum ({} auctions seen)", want.len(), last.len()))
                }
            }
        }
        Expected::Windows { counts, must_close, count_field } => {
            let mut seen = HashSet::new();
            for value in &values {
                let key = (field(value, &["auction"]), field(value, &["window_start"]) as i64);
                let count = field(value, &[count_field]);
                if counts.get(&key) != Some(&count) {
                    return Err(format!("window {key:?} has count {count}, expected {:?}", counts.get(&key)));
                }
                if !seen.insert(key) {
                    return Err(format!("window {key:?} emitted twice"));
                }
            }
            let required: Vec<_> = counts.keys().filter(|(_, start)| start + WINDOW_MS <= *must_close).collect();
            if required.is_empty() {
                return Err("no window had to close: the input is too short to check windows (use more bids)".into());
            }
            let missing = required.iter().filter(|key| !seen.contains(**key)).count();
            match missing {
                0 => Ok(format!("{} windows, each count right ({} had to close)", seen.len(), required.len())),
                _ => Err(format!("{missing} of {} windows that had to close are missing", required.len())),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running one workload.

#[derive(Clone, Copy, PartialEq)]
enum System {
    Raw,
    /// The raw loop inside transactions, committing every 100 ms.
    RawTransactional,
    Weir,
    WeirUpsert,
    /// One weir process per output of a two-output pipeline, reading the same topic.
    WeirSeparate,
    /// Two weir processes of one pass-through pipeline (instances 0 and 1, two partitions
    /// each): what a second loop adds on these cores. Latency section only.
    WeirTwo,
    /// One weir process with two workers (`runtime.workers = 2`): the same two loops as
    /// `weir-two`, in one process.
    WeirWorkers,
    KafkaStreams,
}

impl System {
    const ALL: [System; 8] = [
        System::Raw,
        System::RawTransactional,
        System::Weir,
        System::WeirUpsert,
        System::WeirSeparate,
        System::WeirTwo,
        System::WeirWorkers,
        System::KafkaStreams,
    ];

    fn label(self) -> &'static str {
        match self {
            System::Raw => "raw rdkafka",
            System::RawTransactional => "raw rdkafka, transactions every 100 ms",
            System::Weir => "weir",
            System::WeirUpsert => "weir, no transactions (idempotent_upsert)",
            System::WeirSeparate => "weir, one pipeline per output (two processes)",
            System::WeirTwo => "weir, two processes of the pipeline",
            System::WeirWorkers => "weir, two workers in one process",
            System::KafkaStreams => "Kafka Streams 4.2",
        }
    }

    /// Its name for `--systems`.
    fn name(self) -> &'static str {
        match self {
            System::Raw => "raw",
            System::RawTransactional => "raw-tx",
            System::Weir => "weir",
            System::WeirUpsert => "weir-upsert",
            System::WeirSeparate => "weir-separate",
            System::WeirTwo => "weir-two",
            System::WeirWorkers => "weir-workers",
            System::KafkaStreams => "kafka-streams",
        }
    }
}

struct Measured {
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_mib: f64,
    state_bytes: u64,
    /// From the start to processing: weir's table read (its log), Kafka Streams' start to
    /// RUNNING (global tables are read before it).
    startup_seconds: Option<f64>,
}

#[derive(Clone, Copy, Debug)]
enum Workload {
    PassThrough,
    Dedup,
    Tumbling,
    Hopping,
    Join,
    /// A filter on the auction alone: decode and one expression per bid, records as read.
    Filter,
    /// Nexmark q1/q2-like: a filter on the auction, a computed price, a select.
    Projection,
    /// Pass-through and the projection as two outputs of one pipeline.
    TwoOutputs,
    /// A running count and sum of prices per auction, without windows.
    Aggregate,
    /// Each bid enriched from a table of a million accounts (a lookup; Kafka Streams'
    /// KStream-GlobalKTable join).
    Enrich,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::PassThrough => "pass-through (bids)",
            Workload::Dedup => "dedup by bid id",
            Workload::Tumbling => "tumbling 10 s count per auction",
            Workload::Hopping => "hopping 10 s / 2 s count per auction",
            Workload::Join => "auction ⋈ bid within 10 s",
            Workload::Filter => "filter: auction % 10 < 7",
            Workload::Projection => "projection: filter + set + select",
            Workload::TwoOutputs => "two outputs: pass-through + projection",
            Workload::Aggregate => "running count + sum per auction",
            Workload::Enrich => "enrich from a 1M-row table",
        }
    }
}

/// A bids (or auctions) source of a weir pipeline.
fn weir_source(name: &str, topic: &str) -> String {
    let schema = match name {
        "bids" => "{ id: long, auction: long, bidder: long, price: long, channel: string, url: string, ts: long, extra: string }",
        _ => "{ auction: long, item_name: string, description: string, initial_bid: long, reserve: long, ts: long, expires: long, seller: long, category: long, extra: string }",
    };
    format!(
        "  {name}:\n    topics: [{topic}]\n    format: json\n    schema: {schema}\n    event_time: {{ field: ts, unit: millis }}\n    \
         watermark: {{ max_out_of_orderness: {OUT_OF_ORDERNESS_MS}ms }}\n    partitioned_by: [auction]\n"
    )
}

/// The projection's steps: Nexmark q2's kind of filter (some auctions), q1's currency
/// conversion (in integers, so the check is exact), and a select of five fields.
const PROJECTION: &str = "  - filter: \"auction % 10 < 7\"\n  - set: { price_eur: \"price * 908 / 1000\" }\n  \
                          - select: { id: id, auction: auction, bidder: bidder, price: price_eur, ts: ts }\n";

/// Per auction, how many bids were sent (duplicates included) and the sum of their prices.
fn totals(bids: &[Bid]) -> BTreeMap<u64, (u64, u64)> {
    let mut totals: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for bid in bids {
        let entry = totals.entry(bid.auction).or_default();
        entry.0 += 1;
        entry.1 += bid.price;
    }
    totals
}

/// What the projection makes of the bids: (id, converted price) of those it keeps.
/// The bids the filter workload keeps, as they were sent: (id, price).
fn filtered(bids: &[Bid]) -> Sum {
    Sum::of(bids.iter().filter(|bid| bid.auction % 10 < 7).map(|bid| (bid.id, bid.price)))
}

fn projected(bids: &[Bid]) -> Sum {
    Sum::of(bids.iter().filter(|bid| bid.auction % 10 < 7).map(|bid| (bid.id, bid.price * 908 / 1000)))
}

fn weir_pipeline(name: &str, workload: Workload, topics: &Topics, output: &str, upsert: bool) -> String {
    let mode = if upsert { "  mode: idempotent_upsert\n" } else { "" };
    if let Workload::TwoOutputs = workload {
        let steps = PROJECTION.replace("  - ", "      - ");
        return format!(
            "name: {name}\nsources:\n{}outputs:\n  all:\n    sink: {{ topic: {output} }}\n  projected:\n    steps:\n{steps}    sink: {{ topic: {output}-2 }}\n",
            weir_source("bids", &topics.bids)
        );
    }
    let (sources, middle) = match workload {
        Workload::PassThrough => (weir_source("bids", &topics.bids), String::new()),
        Workload::Projection => (weir_source("bids", &topics.bids), format!("steps:\n{PROJECTION}")),
        Workload::Filter => (weir_source("bids", &topics.bids), "steps:\n  - filter: \"auction % 10 < 7\"\n".to_string()),
        Workload::TwoOutputs => unreachable!("written above"),
        Workload::Dedup => (weir_source("bids", &topics.bids), "steps:\n  - dedup: { key: [auction, id], within: 24h }\n".to_string()),
        Workload::Tumbling => (
            weir_source("bids", &topics.bids),
            format!("steps:\n  - window: {{ group_by: [auction], tumbling: {WINDOW_MS}ms, aggregates: {{ bids: count() }} }}\n"),
        ),
        Workload::Hopping => (
            weir_source("bids", &topics.bids),
            format!("steps:\n  - window: {{ group_by: [auction], hopping: {{ size: {WINDOW_MS}ms, slide: {HOP_MS}ms }}, aggregates: {{ bids: count() }} }}\n"),
        ),
        Workload::Aggregate => (
            weir_source("bids", &topics.bids),
            "steps:\n  - aggregate: { group_by: [auction], aggregates: { bids: count(), total: sum(price) } }\n".to_string(),
        ),
        Workload::Enrich => (
            format!(
                "{}  accounts:\n    topics: [{}]\n    format: json\n    \
                 schema: {{ account: long, name: string, country: string, tier: long, since: string, extra: string }}\n    table: {{ key: [account] }}\n",
                weir_source("bids", &topics.bids),
                topics.accounts
            ),
            format!("steps:\n  - set: {{ account: \"id % {ACCOUNTS}\" }}\n  - lookup: {{ table: accounts, on: {{ account: account }} }}\n"),
        ),
        Workload::Join => (
            format!("{}{}", weir_source("auctions", &topics.auctions), weir_source("bids", &topics.bids)),
            format!("join:\n  left: auctions\n  right: bids\n  type: inner\n  on: [auction]\n  within: {{ lower: 0s, upper: {AUCTION_LIFETIME_MS}ms }}\n"),
        ),
    };
    format!("name: {name}\nsources:\n{sources}{middle}sink:\n  topic: {output}\n{mode}")
}

fn kstreams_arguments(workload: Workload, topics: &Topics, output: &str, app: &str, state: &Path, expect: u64) -> Vec<String> {
    let (name, inputs, extra): (&str, String, Vec<String>) = match workload {
        Workload::Filter | Workload::Projection | Workload::TwoOutputs => unreachable!("weir's workloads alone"),
        Workload::PassThrough => ("passthrough", topics.bids.clone(), vec![]),
        Workload::Dedup => ("dedup", topics.bids.clone(), vec!["--dedup-fields".into(), "auction,id".into()]),
        Workload::Aggregate => ("aggregate", topics.bids.clone(), ["--group-field", "auction", "--sum-field", "price"].map(String::from).to_vec()),
        Workload::Enrich => ("enrich", format!("{},{}", topics.bids, topics.accounts), vec!["--table-size".into(), ACCOUNTS.to_string()]),
        Workload::Tumbling | Workload::Hopping => {
            let slide = if matches!(workload, Workload::Hopping) { HOP_MS } else { WINDOW_MS };
            (
                "window",
                topics.bids.clone(),
                ["--group-field", "auction", "--count-field", "bids", "--window-ms", &WINDOW_MS.to_string(), "--advance-ms", &slide.to_string(), "--grace-ms", &OUT_OF_ORDERNESS_MS.to_string()]
                    .map(String::from)
                    .to_vec(),
            )
        }
        Workload::Join => (
            "join",
            format!("{},{}", topics.auctions, topics.bids),
            [
                "--join-window-ms",
                &AUCTION_LIFETIME_MS.to_string(),
                "--join-before-ms",
                "0",
                "--join-grace-ms",
                &OUT_OF_ORDERNESS_MS.to_string(),
                "--left-name",
                "auctions",
                "--right-name",
                "bids",
            ]
            .map(String::from)
            .to_vec(),
        ),
    };
    let mut arguments = vec!["run".to_string(), broker().bootstrap.clone(), name.into(), inputs, output.into(), app.into()];
    arguments.extend(extra);
    arguments.extend(["--state-dir".into(), state.display().to_string()]);
    match expect {
        // Until killed.
        0 => arguments.extend(["--idle-sec", "0", "--timeout-sec", "3600"].map(String::from)),
        _ => arguments.extend(["--expect".into(), expect.to_string(), "--idle-sec".into(), "60".into()]),
    }
    arguments
}

/// Starts the Kafka Streams baseline; its stdout (one RESULT line) is piped when `result`.
/// `settings`: Streams or client settings, as the jar takes them (`-Dks.NAME=VALUE`).
fn java(jar: &Path, arguments: &[String], log: &Path, result: bool, settings: &[(&str, &str)]) -> Child {
    let java_options = std::env::var("JAVA_OPTS").unwrap_or_else(|_| "-Xms512m -Xmx2g".into());
    let log_file = std::fs::File::create(log).unwrap();
    Command::new("java")
        .args(java_options.split_whitespace())
        .args(settings.iter().map(|(name, value)| format!("-Dks.{name}={value}")))
        .arg("-jar")
        .arg(jar)
        .args(arguments)
        .stdin(Stdio::null())
        .stdout(if result { Stdio::piped() } else { Stdio::null() })
        .stderr(log_file)
        .spawn()
        .expect("start java (Kafka Streams baseline)")
}

/// Samples a process until it exits: (peak RSS in KiB, last CPU seconds seen). Kills it
/// and fails after 30 minutes.
fn sample_until_exit(child: &mut Child) -> (u64, f64, std::process::ExitStatus) {
    let pid = child.id();
    let (mut peak, mut cpu) = (0, 0.0f64);
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (peak, cpu, status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {pid} still running after 30 minutes");
        }
        peak = peak.max(rss_kib(pid));
        cpu = cpu.max(process_cpu_seconds(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_kstreams(jar: &Path, workload: Workload, topics: &Topics, output: &str, expect: u64) -> Measured {
    let app = unique("ks-bench");
    let state = tempfile::tempdir().unwrap();
    let log = std::env::temp_dir().join(format!("{app}.log"));
    let arguments = kstreams_arguments(workload, topics, output, &app, state.path(), expect);
    let mut child = java(jar, &arguments, &log, true, &[]);
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).find(|line| line.starts_with("RESULT ")));
    let (peak_kib, _, status) = sample_until_exit(&mut child);
    let result = reader.join().unwrap().unwrap_or_default();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success() && !result.is_empty(), "Kafka Streams failed ({status}):\n{log_text}");
    let value = |name: &str| -> f64 {
        result
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {result}"))
    };
    Measured {
        seconds: value("running_to_closed_s"),
        cpu_seconds: value("cpu_since_running_s"),
        peak_rss_mib: peak_kib as f64 / 1024.0,
        state_bytes: directory_bytes(state.path()),
        startup_seconds: Some(value("startup_to_running_s")),
    }
}

fn run_weir(pipeline: &str) -> Measured {
    run_weirs(&[pipeline.to_string()])
}

/// Runs each pipeline in a weir process of its own, all at once, to the end of their input:
/// the time from all owning their partitions to all done, their CPU and peak memory summed.
fn run_weirs(pipelines: &[String]) -> Measured {
    let files: Vec<PipelineFile> = pipelines.iter().map(|pipeline| pipeline_file(pipeline)).collect();
    let mut processes: Vec<WeirProcess> =
        files.iter().map(|file| WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() })).collect();
    // Ready: they own their partitions. Polled often, so the clock starts on time; a run that
    // ends before it is seen ready is a failure, not a hang.
    // (A table read before the first record, as in the enrichment, counts in the memory.)
    let pids: Vec<u32> = processes.iter().map(|weir| weir.child.id()).collect();
    let mut peak_kib = vec![0u64; pids.len()];
    let deadline = Instant::now() + Duration::from_secs(600);
    for (index, weir) in processes.iter_mut().enumerate() {
        while !is_ready(weir) {
            if let Some(status) = weir.child.try_wait().unwrap() {
                panic!("weir exited ({status}) before it was ready:\n{}", weir.log_text());
            }
            assert!(Instant::now() < deadline, "weir not ready within 600 s:\n{}", weir.log_text());
            peak_kib[index] = peak_kib[index].max(rss_kib(pids[index]));
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let cpu_at_ready: Vec<f64> = pids.iter().map(|pid| process_cpu_seconds(*pid)).collect();
    let started = Instant::now();
    let mut cpu = cpu_at_ready.clone();
    let mut running: Vec<bool> = vec![true; pids.len()];
    while running.iter().any(|running| *running) {
        for (index, weir) in processes.iter_mut().enumerate() {
            if !running[index] {
                continue;
            }
            if let Some(status) = weir.child.try_wait().unwrap() {
                assert!(status.success(), "weir failed: {status}\n{}", weir.log_text());
                running[index] = false;
                continue;
            }
            peak_kib[index] = peak_kib[index].max(rss_kib(pids[index]));
            cpu[index] = cpu[index].max(process_cpu_seconds(pids[index]));
        }
        assert!(started.elapsed() < Duration::from_secs(1800), "weir still running after 30 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    Measured {
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: cpu.iter().zip(&cpu_at_ready).map(|(last, first)| last - first).sum(),
        peak_rss_mib: peak_kib.iter().sum::<u64>() as f64 / 1024.0,
        state_bytes: files.iter().map(|file| directory_bytes(&file.path.parent().unwrap().join("state"))).sum(),
        startup_seconds: processes.iter().find_map(|weir| table_read_seconds(&weir.log_text())),
    }
}

/// The seconds weir's log says reading the tables took, if it read any.
fn table_read_seconds(log: &str) -> Option<f64> {
    let line = log.lines().find(|line| line.contains("tables read"))?;
    line.split("seconds=").nth(1)?.split_whitespace().next()?.parse().ok()
}

/// The physical baseline ([`support::raw_loop`]): at-least-once, or `transactional`.
fn raw_passthrough(input: &str, output: &str, records: u64, stop: Option<Arc<AtomicBool>>, transactional: bool) -> Measured {
    let (seconds, cpu_seconds) = raw_loop(input, output, PARTITIONS, records, stop, transactional);
    Measured { seconds, cpu_seconds, peak_rss_mib: 0.0, state_bytes: 0, startup_seconds: None }
}

// ---------------------------------------------------------------------------------------
// Latency at a fixed rate.

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A running system under a latency test; dropped to stop it.
enum Running {
    Raw(Arc<AtomicBool>, Option<std::thread::JoinHandle<Measured>>),
    /// The pipeline file (and the state beside it) lives as long as the processes.
    Weir { processes: Vec<WeirProcess>, _file: Option<PipelineFile> },
    KafkaStreams { child: Child, _state: Option<tempfile::TempDir> },
}

impl Drop for Running {
    fn drop(&mut self) {
        match self {
            Running::Raw(stop, thread) => {
                stop.store(true, Ordering::Relaxed);
                if let Some(thread) = thread.take() {
                    let _ = thread.join();
                }
            }
            Running::Weir { processes, .. } => processes.iter_mut().for_each(WeirProcess::kill),
            Running::KafkaStreams { child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn start_live(system: System, jar: &Path, input: &Topics, output: &str) -> Running {
    match system {
        System::Raw | System::RawTransactional => {
            let stop = Arc::new(AtomicBool::new(false));
            let (input, output, flag) = (input.bids.clone(), output.to_string(), stop.clone());
            let transactional = system == System::RawTransactional;
            Running::Raw(stop, Some(std::thread::spawn(move || raw_passthrough(&input, &output, u64::MAX, Some(flag), transactional))))
        }
        System::Weir | System::WeirUpsert | System::WeirSeparate | System::WeirTwo | System::WeirWorkers => {
            let file = pipeline_file(&weir_pipeline(&unique("lat"), Workload::PassThrough, input, output, system == System::WeirUpsert));
            let instances: &[&str] = if system == System::WeirTwo { &["0", "1"] } else { &["0"] };
            let env = if system == System::WeirWorkers { two_workers() } else { Vec::new() };
            let processes: Vec<WeirProcess> = instances
                .iter()
                .map(|instance| {
                    let process = WeirProcess::start(&file.path, WeirOptions { instance, env: env.clone(), ..Default::default() });
                    wait_ready(&process, Duration::from_secs(120));
                    process
                })
                .collect();
            // Measured once the group has settled: with more than one member (two processes,
            // two workers, or any system run with WEIR__RUNTIME__WORKERS set), a rebalance in
            // the middle of a point would stall it for seconds.
            wait_partitions_shared(&processes);
            Running::Weir { processes, _file: Some(file) }
        }
        System::KafkaStreams => {
            let state = tempfile::tempdir().unwrap();
            let app = unique("ks-lat");
            let log = std::env::temp_dir().join(format!("{app}.log"));
            let child = java(jar, &kstreams_arguments(Workload::PassThrough, input, output, &app, state.path(), 0), &log, false, &[]);
            Running::KafkaStreams { child, _state: Some(state) }
        }
    }
}

/// The `"ts":` number of a bid as written by [`latency`]'s generator (a pass-through writes
/// it back unchanged): a byte scan, so that the reader keeps up with the rates measured.
fn produced_at(value: &[u8]) -> Option<i64> {
    let at = value.windows(5).position(|window| window == b"\"ts\":")? + 5;
    let digits = value[at..].iter().take_while(|byte| byte.is_ascii_digit()).count();
    std::str::from_utf8(&value[at..at + digits]).ok()?.parse().ok()
}

/// `runtime.workers = 2`, for [`System::WeirWorkers`].
fn two_workers() -> Vec<(String, String)> {
    vec![("WEIR__RUNTIME__WORKERS".to_string(), "2".to_string())]
}

/// Waits until every partition of the input is owned by one of the group members that
/// `processes` run (each process, or each worker of one) and each owns some (the group has
/// settled after the later ones joined), so that a point measures them all at work.
fn wait_partitions_shared(processes: &[WeirProcess]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let owned_by = |report: &Value| report["partitions"].as_object().map_or(0, serde_json::Map::len);
    loop {
        let owned: Vec<usize> = processes
            .iter()
            .flat_map(|process| process.member_reports().iter().map(owned_by).collect::<Vec<_>>())
            .collect();
        if owned.iter().all(|count| *count > 0) && owned.iter().sum::<usize>() == PARTITIONS as usize {
            return;
        }
        assert!(Instant::now() < deadline, "the weir processes did not share the partitions within 120 s: {owned:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// weir's commits so far and the seconds they took (its commit-duration histogram's count
/// and sum, over all its processes), to say how much of a latency is the commit.
fn commits_so_far(running: &Running) -> Option<(f64, f64)> {
    let Running::Weir { processes, .. } = running else { return None };
    let mut total = (0.0, 0.0);
    for process in processes {
        let (_, text) = process.http_get("/metrics")?;
        let value = |name: &str| text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok());
        total.0 += value("weir_commit_duration_seconds_count")?;
        total.1 += value("weir_commit_duration_seconds_sum")?;
    }
    Some(total)
}

/// A latency point: p50 and p99 in ms, and for weir the mean commit and commits per second;
/// with the generator flat out, how many records per second came through.
struct LatencyPoint {
    p50: i64,
    p99: i64,
    commits: Option<(f64, f64)>,
    through_per_second: f64,
}

/// p50 and p99 of produce→consume latency in ms, at `rate` records/s for `seconds`; an
/// error if the system (or the generator) could not keep up with the rate. Without a rate
/// the generator sends as fast as it can, and the point says how many records per second
/// came through meanwhile: the most the system does with its load generated and read on the
/// same machine.
fn latency(system: System, jar: &Path, rate: Option<f64>, seconds: u64) -> Result<LatencyPoint, String> {
    let topics = Topics { persons: String::new(), auctions: String::new(), bids: unique("lat-in"), accounts: String::new() };
    let output = unique("lat-out");
    create_topic(&topics.bids, PARTITIONS);
    create_topic(&output, PARTITIONS);
    let running = start_live(system, jar, &topics, &output);

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker().bootstrap)
        .set("group.id", unique("lat-reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "5")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset(&output, partition, Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();

    let producer = TestProducer::new();
    let mut value = String::new();
    let mut send = |id: u64| {
        use std::fmt::Write as _;
        value.clear();
        let _ = write!(
            value,
            r#"{{"id":{id},"auction":{},"bidder":1,"price":{},"channel":"web","url":"https://a.com/b","ts":{},"extra":"latency"}}"#,
            id % 1000,
            id % 97,
            now_ms()
        );
        producer.send_bytes(&topics.bids, (id % 1000).to_string().as_bytes(), value.as_bytes());
    };
    // Warm up until the first record comes through (Kafka Streams reaches RUNNING in seconds).
    let warm = Instant::now();
    let mut id = 0;
    loop {
        send(id);
        id += 1;
        if consumer.poll(Duration::from_millis(200)).is_some_and(|message| message.is_ok()) {
            break;
        }
        if warm.elapsed() > Duration::from_secs(120) {
            return Err("no output within 120 s".into());
        }
    }
    // Drain the warm-up; records produced from here on are measured (their time is later).
    let drain_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < drain_until {
        let _ = consumer.poll(Duration::from_millis(20));
    }
    let measured_from = now_ms();
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let read = Arc::new(AtomicU64::new(0));
    let reader = {
        let (latencies, done, read) = (latencies.clone(), done.clone(), read.clone());
        std::thread::spawn(move || {
            let mut local = Vec::with_capacity(1 << 16);
            while !done.load(Ordering::Relaxed) {
                if let Some(Ok(message)) = consumer.poll(Duration::from_millis(10)) {
                    let now = now_ms();
                    if let Some(at) = message.payload().and_then(produced_at).filter(|at| *at >= measured_from) {
                        local.push(now - at);
                        read.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if local.len() >= 1 << 16 || done.load(Ordering::Relaxed) {
                    latencies.lock().unwrap().append(&mut local);
                }
            }
            latencies.lock().unwrap().append(&mut local);
        })
    };
    let commits_before = commits_so_far(&running);
    let started = Instant::now();
    let Some(rate) = rate else {
        let mut sent = 0;
        while started.elapsed() < Duration::from_secs(seconds) {
            send(id + sent);
            sent += 1;
        }
        let through_per_second = read.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        done.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        return Ok(LatencyPoint { p50: 0, p99: 0, commits: None, through_per_second });
    };
    let total = (rate * seconds as f64) as u64;
    let mut sent = 0;
    while sent < total {
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent < due.min(total) {
            send(id + sent);
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    producer.flush();
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    let commits = commits_before.zip(commits_so_far(&running)).map(|((count, sum), (count_after, sum_after))| {
        let commits = count_after - count;
        ((sum_after - sum) / commits.max(1.0) * 1000.0, commits / started.elapsed().as_secs_f64())
    });
    let generator_kept_up = achieved >= rate * 0.95;
    // Wait for the tail (at most 10 s), then stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && read.load(Ordering::Relaxed) < total {
        std::thread::sleep(Duration::from_millis(50));
    }
    done.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let mut latencies = latencies.lock().unwrap().clone();
    if !generator_kept_up {
        return Err(format!("the generator reached only {achieved:.0} of {rate:.0} records/s"));
    }
    if latencies.len() as u64 != total {
        return Err(format!("fell behind: {} of {total} records through 10 s after the last was produced", latencies.len()));
    }
    latencies.sort_unstable();
    let percentile = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    Ok(LatencyPoint { p50: percentile(0.50), p99: percentile(0.99), commits, through_per_second: 0.0 })
}

// ---------------------------------------------------------------------------------------
// Recovery: SIGKILL to the first committed output, with one dedup key per bid in state.

/// Each call adds 1,000 new bids to the input, with ids from `first_new_id`; a later call's
/// first process outputs the earlier calls' too, which `expected_outputs` counts.
fn recovery(system: System, jar: &Path, topics: &Topics, generated: &Generated, expected_outputs: u64, first_new_id: u64) -> f64 {
    let output = unique("recover-out");
    create_topic_with(&output, PARTITIONS, &[("retention.ms", "-1")]);
    let file = pipeline_file(&weir_pipeline(&unique("recover"), Workload::Dedup, topics, &output, false));
    let state = tempfile::tempdir().unwrap();
    let app = unique("ks-recover");
    // Both incarnations of a system share its state: weir's store beside the pipeline file,
    // Kafka Streams' state directory and application id.
    let start = || -> Running {
        match system {
            System::KafkaStreams => {
                let log = std::env::temp_dir().join(format!("{}.log", unique("ks-recover")));
                // Static membership and weir's session timeout, as weir runs: the restarted
                // process takes its partitions back without waiting for the old one's session.
                let settings = [("group.instance.id", app.as_str()), ("session.timeout.ms", "30000")];
                let child = java(jar, &kstreams_arguments(Workload::Dedup, topics, &output, &app, state.path(), 0), &log, false, &settings);
                Running::KafkaStreams { child, _state: None }
            }
            _ => Running::Weir { processes: vec![WeirProcess::start(&file.path, WeirOptions::default())], _file: None },
        }
    };
    let first = start();
    // End offsets count transaction markers too, so they run ahead of the outputs; then the
    // committed count, which is slow to read, confirms.
    wait_until(Duration::from_secs(900), "the dedup to write its whole input", || end_offsets(&output).iter().sum::<i64>() as u64 >= expected_outputs);
    wait_until(Duration::from_secs(300), "the dedup to commit its whole input", || read_committed(&output).len() as u64 >= expected_outputs);
    let ends = end_offsets(&output);
    // Dropping a running system SIGKILLs it.
    drop(first);
    let killed_at = Instant::now();
    // New bids for the restarted process to output.
    let producer = TestProducer::new();
    let ts = generated.max_bid_time();
    for id in first_new_id..first_new_id + 1000 {
        let value = format!(r#"{{"id":{id},"auction":1,"bidder":1,"price":1,"channel":"web","url":"https://a.com/b","ts":{ts},"extra":"after the kill"}}"#);
        producer.send(&topics.bids, &Input::keyed("1", value));
    }
    producer.flush();
    let _second = start();
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker().bootstrap)
        .set("group.id", unique("recover-reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for (partition, end) in ends.into_iter().enumerate() {
        assignment.add_partition_offset(&output, partition as i32, Offset::Offset(end)).unwrap();
    }
    reader.assign(&assignment).unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match reader.poll(Duration::from_millis(10)) {
            Some(Ok(_)) => return killed_at.elapsed().as_secs_f64(),
            Some(Err(error)) => eprintln!("e2e: reading {output} after the restart: {error}"),
            None => {}
        }
        assert!(
            Instant::now() < deadline,
            "{}: no output within 600 s of the restart; reading from {:?}, now at {:?}, end offsets {:?}, {} committed",
            system.label(),
            assignment,
            reader.position(),
            end_offsets(&output),
            read_committed(&output).len()
        );
    }
}

struct Row {
    workload: Workload,
    system: System,
    events: u64,
    measured: Measured,
    check: String,
}

fn main() {
    let options = options();
    let mut report = String::new();
    let mut say = |line: String| {
        println!("{line}");
        report.push_str(&line);
        report.push('\n');
    };
    let generating = Instant::now();
    let generated = generate(options.bids, options.seed);
    let distinct = Sum::of(generated.bids.iter().map(|bid| (bid.id, bid.price)).collect::<BTreeMap<_, _>>());
    let all_bids = Sum::of(generated.bids.iter().map(|bid| (bid.id, bid.price)));
    let pairs = Sum::of(generated.bids.iter().map(|bid| (bid.auction, bid.id)));
    let must_close = generated.max_bid_time() - OUT_OF_ORDERNESS_MS - 5_000;
    let tumbling = Expected::Windows { counts: window_counts(&generated, WINDOW_MS, WINDOW_MS), must_close, count_field: "bids" };
    let hopping = Expected::Windows { counts: window_counts(&generated, WINDOW_MS, HOP_MS), must_close, count_field: "bids" };
    let mut topics = produce_all(&generated);
    eprintln!("e2e: generated and produced {} events in {:.1} s", generated.events(), generating.elapsed().as_secs_f64());
    let bids = generated.bids.len() as u64;
    let auctions = generated.auctions.len() as u64;

    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    say(format!("# weir end-to-end benchmark, {}", String::from_utf8_lossy(&Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC").output().unwrap().stdout).trim()));
    say(String::new());
    say(format!(
        "Machine: {cores} cores, {}; broker: Apache Kafka (KRaft, single node) at {}, {PARTITIONS} partitions per topic.",
        std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|info| info.lines().find(|line| line.starts_with("model name")).map(|line| line.split(':').nth(1).unwrap_or("").trim().to_string())).unwrap_or_default(),
        broker().bootstrap
    ));
    say(format!(
        "Input (seed {}): {} persons, {auctions} auctions, {bids} bids ({} distinct, every 20th sent twice), about 10% of persons and bids up to {} s out of order.",
        options.seed,
        generated.persons.len(),
        distinct.count,
        MAX_DISORDER_MS / 1000
    ));
    say(format!(
        "weir: release build, JSON with an explicit schema, 100 ms commit interval, sources declared `partitioned_by: [auction]`. \
         Kafka Streams: exactly_once_v2, 100 ms commit interval, 1 stream thread, RocksDB stores, JAVA_OPTS {}.",
        std::env::var("JAVA_OPTS").unwrap_or_else(|_| "-Xms512m -Xmx2g".into())
    ));
    say(String::new());

    let mut rows: Vec<Row> = Vec::new();
    let expectations: Vec<(Workload, Expected, u64)> = vec![
        (Workload::PassThrough, Expected::Bids(Sum { count: all_bids.count, checksum: all_bids.checksum }), bids),
        (Workload::Dedup, Expected::Distinct(Sum { count: distinct.count, checksum: distinct.checksum }), bids),
        (Workload::Tumbling, tumbling, bids),
        (Workload::Hopping, hopping, bids),
        (Workload::Join, Expected::Pairs(Sum { count: pairs.count, checksum: pairs.checksum }), auctions + bids),
        (Workload::Aggregate, Expected::Totals(totals(&generated.bids)), bids),
        (
            Workload::Enrich,
            Expected::Enriched(Sum::of(generated.bids.iter().map(|bid| (bid.id, account_mark(bid.id % ACCOUNTS, (bid.id % ACCOUNTS) % 5))))),
            bids,
        ),
        (Workload::Filter, Expected::Bids(filtered(&generated.bids)), bids),
        (Workload::Projection, Expected::Bids(projected(&generated.bids)), bids),
        (
            Workload::TwoOutputs,
            Expected::TwoOutputs(Box::new(Expected::Bids(all_bids)), Box::new(Expected::Bids(projected(&generated.bids)))),
            bids,
        ),
    ];
    let mut failures = Vec::new();
    let mut record = |workload: Workload, system: System, events: u64, measured: Measured, output: &str, expected: &Expected| {
        let check = match check(output, expected) {
            Ok(summary) => format!("ok: {summary}"),
            Err(problem) => {
                failures.push(format!("{} / {}: {problem}", workload.label(), system.label()));
                format!("WRONG: {problem}")
            }
        };
        eprintln!("e2e: {} / {}: {:.0} events/s, {check}", workload.label(), system.label(), events as f64 / measured.seconds);
        rows.push(Row { workload, system, events, measured, check });
    };

    let runs = |section: &str| options.sections.iter().any(|name| name == section);
    let chosen = |workload: &Workload| {
        let name = format!("{workload:?}").to_lowercase();
        options.workloads.is_empty() || options.workloads.contains(&name)
    };
    let included = |system: &System| options.systems.is_empty() || options.systems.iter().any(|name| name == system.name());
    if runs("throughput") && chosen(&Workload::Enrich) {
        let producing = Instant::now();
        produce_accounts(&mut topics);
        eprintln!("e2e: produced {ACCOUNTS} accounts in {:.1} s", producing.elapsed().as_secs_f64());
    }
    for (workload, expected, events) in expectations.iter().filter(|(workload, _, _)| runs("throughput") && chosen(workload)) {
        let systems: &[System] = match workload {
            Workload::PassThrough => &[System::Raw, System::RawTransactional, System::Weir, System::WeirUpsert, System::KafkaStreams],
            Workload::Filter | Workload::Projection => &[System::Weir],
            Workload::TwoOutputs => &[System::Weir, System::WeirSeparate],
            _ => &[System::Weir, System::KafkaStreams],
        };
        for system in systems.iter().filter(|system| included(system)) {
            let output = unique("e2e-out");
            create_topic_with(&output, PARTITIONS, &[("retention.ms", "-1")]);
            if let Workload::TwoOutputs = workload {
                create_topic_with(&format!("{output}-2"), PARTITIONS, &[("retention.ms", "-1")]);
            }
            let measured = match system {
                System::Raw => raw_passthrough(&topics.bids, &output, bids, None, false),
                System::RawTransactional => raw_passthrough(&topics.bids, &output, bids, None, true),
                System::WeirSeparate => run_weirs(&[
                    weir_pipeline(&unique("e2e"), Workload::PassThrough, &topics, &output, false),
                    weir_pipeline(&unique("e2e"), Workload::Projection, &topics, &format!("{output}-2"), false),
                ]),
                // (WeirTwo and WeirWorkers are never among a workload's systems: two group
                // members that start on a full topic do not share it from the start on a broker
                // without an initial rebalance delay, as the benchmark's is (measured: two
                // workers 363,662 events/s, one 358,999, in 3 s runs); they are measured live,
                // in the latency section.)
                System::Weir | System::WeirUpsert | System::WeirTwo | System::WeirWorkers => {
                    run_weir(&weir_pipeline(&unique("e2e"), *workload, &topics, &output, *system == System::WeirUpsert))
                }
                System::KafkaStreams => run_kstreams(&options.kstreams_jar, *workload, &topics, &output, *events),
            };
            record(*workload, *system, *events, measured, &output, expected);
        }
    }

    let rate = |row: &Row| row.events as f64 / row.measured.seconds;
    let find = |workload: &str, system: System| rows.iter().find(|row| row.workload.label() == workload && row.system == system);
    // The issue's ratios: against each raw loop's pass-through, where it ran.
    let raw_rate = find(Workload::PassThrough.label(), System::Raw).map(rate);
    let raw_tx_rate = find(Workload::PassThrough.label(), System::RawTransactional).map(rate);
    let times = |value: f64, base: Option<f64>| base.map_or_else(|| "-".to_string(), |base| format!("{:.2}", value / base));
    say("## Throughput (each run reads its input from the beginning; time from owning the partitions to all committed)".into());
    say(String::new());
    say("| workload | system | events/s | × raw | × raw tx | × Kafka Streams | events per CPU-second | × Kafka Streams per core | peak RSS (MiB) | output check |".into());
    say("|---|---|---|---|---|---|---|---|---|---|".into());
    for row in &rows {
        let kstreams = find(row.workload.label(), System::KafkaStreams);
        let versus = |value: f64, other: Option<f64>| match (other, row.system) {
            (_, System::KafkaStreams | System::Raw | System::RawTransactional) | (None, _) => "".to_string(),
            (Some(other), _) => format!("{:.2}", value / other),
        };
        let per_cpu = row.events as f64 / row.measured.cpu_seconds.max(0.01);
        say(format!(
            "| {} | {} | {:.0} | {} | {} | {} | {:.0} | {} | {} | {} |",
            row.workload.label(),
            row.system.label(),
            rate(row),
            times(rate(row), raw_rate),
            times(rate(row), raw_tx_rate),
            versus(rate(row), kstreams.map(rate)),
            per_cpu,
            versus(per_cpu, kstreams.map(|ks| ks.events as f64 / ks.measured.cpu_seconds.max(0.01))),
            if matches!(row.system, System::Raw | System::RawTransactional) { "-".to_string() } else { format!("{:.0}", row.measured.peak_rss_mib) },
            row.check
        ));
    }
    say(String::new());
    say("## State on disk per million keys (dedup, one key per distinct bid, after the run)".into());
    say(String::new());
    for system in [System::Weir, System::KafkaStreams] {
        if let Some(row) = find(Workload::Dedup.label(), system) {
            say(format!(
                "- {}: {:.0} MiB per million keys ({:.1} MiB for {} keys)",
                system.label(),
                row.measured.state_bytes as f64 / 1_048_576.0 * 1_000_000.0 / distinct.count as f64,
                row.measured.state_bytes as f64 / 1_048_576.0,
                distinct.count
            ));
        }
    }

    if rows.iter().any(|row| matches!(row.workload, Workload::Enrich)) {
        say(String::new());
        say(format!("## The enrichment's table ({ACCOUNTS} rows of about 110 bytes): read before the first record"));
        say(String::new());
        for system in [System::Weir, System::KafkaStreams] {
            if let Some(row) = find(Workload::Enrich.label(), system) {
                let what = match system {
                    System::KafkaStreams => "start to RUNNING (the global table is read first)",
                    _ => "reading the table (log: tables read)",
                };
                say(format!(
                    "- {}: {} {:.1} s; peak RSS {:.0} MiB; state on disk {:.0} MiB",
                    system.label(),
                    what,
                    row.measured.startup_seconds.unwrap_or(f64::NAN),
                    row.measured.peak_rss_mib,
                    row.measured.state_bytes as f64 / 1_048_576.0
                ));
            }
        }
    }

    say(String::new());
    say(format!(
        "## Latency, produce to read_committed consume, pass-through at 50% and 70% of each system's own live maximum ({} s per point)",
        options.latency_seconds
    ));
    say(String::new());
    say(
        "Live maximum: what came through while the generator (this process) sent as fast as it could, with the reader running: \
         on two cores the generator, the reader and the broker take CPU that the throughput runs above leave to the system."
            .into(),
    );
    say(String::new());
    say("| system | live max events/s | at 50%: p50 / p99 (ms) | at 70%: p50 / p99 (ms) |".into());
    say("|---|---|---|---|".into());
    for system in [System::Raw, System::RawTransactional, System::Weir, System::WeirTwo, System::WeirWorkers, System::WeirUpsert, System::KafkaStreams]
        .into_iter()
        .filter(|system| runs("latency") && included(system))
    {
        let max = match latency(system, &options.kstreams_jar, None, options.latency_seconds) {
            Ok(point) => point.through_per_second,
            Err(error) => {
                say(format!("| {} | {error} | | |", system.label()));
                continue;
            }
        };
        eprintln!("e2e: latency {}: live max {max:.0} records/s", system.label());
        let mut cells = Vec::new();
        for load in [0.5, 0.7] {
            let cell = match latency(system, &options.kstreams_jar, Some(max * load), options.latency_seconds) {
                Ok(LatencyPoint { p50, p99, commits: None, .. }) => format!("{p50} / {p99}"),
                Ok(LatencyPoint { p50, p99, commits: Some((mean_ms, per_second)), .. }) => {
                    format!("{p50} / {p99} (commits: {per_second:.1}/s, {mean_ms:.0} ms each)")
                }
                Err(error) => error,
            };
            eprintln!("e2e: latency {} at {:.0}%: {cell}", system.label(), load * 100.0);
            cells.push(cell);
        }
        say(format!("| {} | {max:.0} | {} | {} |", system.label(), cells[0], cells[1]));
    }

    say(String::new());
    say(format!("## Recovery: SIGKILL to the first committed output of a dedup holding {} keys", distinct.count));
    say(String::new());
    let first_new_id = generated.bids.iter().map(|bid| bid.id).max().unwrap_or(0) + 1;
    for (round, system) in [System::Weir, System::KafkaStreams].into_iter().filter(|system| runs("recovery") && included(system)).enumerate() {
        let added = 1000 * round as u64;
        let seconds = recovery(system, &options.kstreams_jar, &topics, &generated, distinct.count + added, first_new_id + added);
        eprintln!("e2e: recovery {}: {seconds:.1} s", system.label());
        say(format!("- {}: {seconds:.1} s", system.label()));
    }

    if let Some(path) = &options.out {
        let mut file = std::fs::File::create(path).unwrap();
        file.write_all(report.as_bytes()).unwrap();
    }
    assert!(failures.is_empty(), "wrong answers:\n{}", failures.join("\n"));
}

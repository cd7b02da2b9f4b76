//! A Nexmark-style auction ⋈ bid interval join (each bid within its auction's first 10 s),
//! as a ratio of weir's JSON pass-through over the bids in the same run.
//! Run: `cargo bench --bench join` (`-- N` sets the number of bids, default 920,000: 20,000
//! auctions with 46 bids each, Nexmark's auction-to-bid proportion).
//! Every run's output count is checked: each bid matches exactly one auction.

#[path = "../tests/support/mod.rs"]
mod support;

use support::*;

const PARTITIONS: i32 = 4;
const BIDS_PER_AUCTION: u64 = 46;
const START: u64 = 1_700_000_000_000;

/// Auction `id`, opened every 460 ms of event time (one per 46 bids at 10 ms each).
fn auction(id: u64) -> Input {
    let value = format!(
        r#"{{"auction":{id},"seller":{},"category":{},"initial_bid":{},"ts":{}}}"#,
        id % 1000,
        id % 20,
        100 + id % 900,
        START + id * 10 * BIDS_PER_AUCTION
    );
    Input::keyed(id.to_string(), value)
}

/// Bid `id`, 10 ms apart with up to 400 ms of disorder, on one of the last 20 auctions
/// opened, so always within 10 s of its auction's opening.
fn bid(id: u64) -> Input {
    let auction = (id / BIDS_PER_AUCTION).saturating_sub((id * 7) % 20);
    let value = format!(
        r#"{{"auction":{auction},"bidder":{},"price":{},"ts":{}}}"#,
        id % 10_000,
        1 + (id * 31) % 10_000,
        START + id * 10 + (id * 7919) % 400
    );
    Input::keyed(auction.to_string(), value)
}

fn main() {
    let bids: u64 = std::env::args().filter_map(|argument| argument.parse().ok()).next().unwrap_or(920_000);
    let auctions = bids.div_ceil(BIDS_PER_AUCTION);
    let (auction_topic, bid_topic) = (unique("bench-auctions"), unique("bench-bids"));
    create_topic(&auction_topic, PARTITIONS);
    create_topic(&bid_topic, PARTITIONS);
    let producer = TestProducer::new();
    for id in 0..auctions {
        producer.send(&auction_topic, &auction(id));
    }
    for id in 0..bids {
        producer.send(&bid_topic, &bid(id));
    }
    producer.flush();
    println!("broker: {}, {auctions} auctions and {bids} bids", broker().bootstrap);

    // Both topics are keyed by auction: declared, the join runs in place.
    let bid_source = |topic: &str, keyed: &str| {
        format!(
            "  bids:\n    topics: [{topic}]\n    format: json\n    schema: {{ auction: long, bidder: long, price: long, ts: long }}\n    \
             event_time: {{ field: ts, unit: millis }}\n    watermark: {{ max_out_of_orderness: 1s }}\n{keyed}"
        )
    };
    let pass_name = unique("bench-bids-pass");
    let pass = run(&format!("name: {pass_name}\nsources:\n{}sink:\n  topic: {pass_name}-out\n", bid_source(&bid_topic, "")), &pass_name, bids);
    let join_pipeline = |name: &str, keyed: &str| {
        format!(
            "name: {name}\nsources:\n  auctions:\n    topics: [{auction_topic}]\n    format: json\n    \
             schema: {{ auction: long, seller: long, category: long, initial_bid: long, ts: long }}\n    \
             event_time: {{ field: ts, unit: millis }}\n    watermark: {{ max_out_of_orderness: 1s }}\n{keyed}{}\
             join:\n  left: auctions\n  right: bids\n  type: inner\n  on: [auction]\n  within: {{ lower: 0s, upper: 10s }}\n\
             sink:\n  topic: {name}-out\n",
            bid_source(&bid_topic, keyed)
        )
    };
    let join_name = unique("bench-join");
    let join = run(&join_pipeline(&join_name, ""), &join_name, bids);
    let in_place_name = unique("bench-join-in-place");
    let in_place = run(&join_pipeline(&in_place_name, "    partitioned_by: [auction]\n"), &in_place_name, bids);

    let pass_rate = bids as f64 / pass.0;
    println!();
    println!("| pipeline | events read | events/s | ratio to pass-through | peak RSS (MiB) |");
    println!("|---|---|---|---|---|");
    println!("| pass-through over the bids | {bids} | {pass_rate:.0} | 1.00 | {:.0} |", pass.1);
    for (label, (seconds, rss)) in [("repartitioned", join), ("in place (partitioned_by: [auction])", in_place)] {
        let rate = (auctions + bids) as f64 / seconds;
        println!("| auction ⋈ bid, inner, within 10 s, {label} | {} | {rate:.0} | {:.2} | {rss:.0} |", auctions + bids, rate / pass_rate);
    }
}

/// Runs a pipeline with `--until-end` over what is in its topics; checks that it wrote
/// `expected` records; returns the seconds from ready to exit and the peak RSS in MiB.
fn run(pipeline: &str, name: &str, expected: u64) -> (f64, f64) {
    let output = format!("{name}-out");
    create_topic(&output, PARTITIONS);
    let measured = run_until_end_measured(&pipeline_file(pipeline));
    let produced = read_committed(&output).len() as u64;
    assert_eq!(produced, expected, "{name}: output count");
    measured
}

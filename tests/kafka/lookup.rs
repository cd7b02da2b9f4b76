//! Table sources and lookups under `weir run`: the table is read whole before the first
//! stream record, kept in the local table store (a restart reads only what came since),
//! follows its topic while running, and every order comes out once, enriched, whatever
//! SIGKILLs and group changes happen.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::support::*;

/// Customers in the table before any order is read.
const CUSTOMERS: u64 = 500;

/// An order of customer `c<id % CUSTOMERS>`.
fn order(id: u64) -> Input {
    Input::keyed(format!("k{id}"), format!(r#"{{"id":{id},"customer_id":"c{}","amount":{}}}"#, id % CUSTOMERS, id % 100))
}

/// Version `n / CUSTOMERS` of customer `c<n % CUSTOMERS>`: its tier is the version.
fn customer(n: u64) -> Input {
    let id = n % CUSTOMERS;
    Input::keyed(format!("c{id}"), format!(r#"{{"customer_id":"c{id}","tier":{},"country":"k{}"}}"#, n / CUSTOMERS, id % 7))
}

fn lookup_pipeline(name: &str, orders: &str, customers: &str, output: &str) -> PipelineFile {
    pipeline_file(&format!(
        "name: {name}\nsources:\n  orders:\n    topics: [{orders}]\n    format: json\n    schema: {{ id: long, customer_id: string, amount: long }}\n  \
         customers:\n    topics: [{customers}]\n    format: json\n    schema: {{ customer_id: string, tier: long, country: string }}\n    table: {{ key: [customer_id] }}\n\
         steps:\n  - lookup: {{ table: customers, on: {{ customer_id: customer_id }} }}\nsink:\n  topic: {output}\n"
    ))
}

/// Each output record's id and the tier its order met; asserts that every record carries
/// its own customer's row.
fn tiers(output: &str) -> BTreeMap<u64, u64> {
    let mut tiers = BTreeMap::new();
    for record in read_committed(output) {
        let value = record.value_json();
        let id = value["id"].as_u64().expect("an id");
        let customer = &value["customers"];
        assert_eq!(customer["customer_id"], value["customer_id"], "enriched with another customer's row: {value}");
        assert_eq!(customer["country"], format!("k{}", (id % CUSTOMERS) % 7), "{value}");
        tiers.insert(id, customer["tier"].as_u64().expect("a tier"));
    }
    tiers
}

fn topics(partitions: i32) -> (String, String, String) {
    let (orders, customers, output) = (unique("orders"), unique("customers"), unique("enriched"));
    create_topic(&orders, 4);
    create_topic_with(&customers, partitions, &[("cleanup.policy", "compact")]);
    create_topic(&output, 2);
    (orders, customers, output)
}

/// The first run reads the whole table before its first order, so every order is enriched
/// with the first versions; a second run reads only the table records written since (its
/// store kept the rest), deletes included; a running instance applies an update before the
/// orders after it, and reports a table record it cannot apply instead of stopping.
#[test]
fn a_lookup_reads_the_table_first_keeps_it_across_restarts_and_follows_updates() {
    let (orders, customers, output) = topics(2);
    let name = unique("lookup");
    let pipeline = lookup_pipeline(&name, &orders, &customers, &output);
    produce(&customers, (0..CUSTOMERS).map(customer));
    produce(&orders, (0..5_000).map(order));
    let mut first = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(first.wait(Duration::from_secs(120)).success(), "{}", first.log_text());
    assert!(first.log_text().contains(&format!("records={CUSTOMERS} from=the beginning")), "{}", first.log_text());
    let found = tiers(&output);
    assert_eq!(found.len(), 5_000);
    assert!(found.values().all(|tier| *tier == 0));

    // Customers 0..100 move to tier 1 and customer 100 is deleted; then orders for 0..200.
    produce(&customers, (CUSTOMERS..CUSTOMERS + 100).map(customer));
    produce(&customers, [Input { key: Some(b"c100".to_vec()), value: None, partition: None, headers: Vec::new() }]);
    produce(&orders, (10_000..10_200).map(order));
    let mut second = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(second.wait(Duration::from_secs(120)).success(), "{}", second.log_text());
    assert!(second.log_text().contains("records=101 from=the stored positions"), "{}", second.log_text());
    let found = tiers(&output);
    assert_eq!(found.len(), 5_000 + 199, "the order of the deleted customer is dropped (an inner lookup)");
    for id in 10_000..10_200 {
        let expected = match id % CUSTOMERS {
            0..100 => Some(1),
            100 => None,
            _ => Some(0),
        };
        assert_eq!(found.get(&id).copied(), expected, "order {id}");
    }

    let running = WeirProcess::start(&pipeline.path, WeirOptions::default());
    wait_ready(&running, Duration::from_secs(60));
    // Version 5 of customer 7, then a record the table cannot use (no customer_id).
    produce(&customers, [customer(5 * CUSTOMERS + 7), Input::keyed("c8", r#"{"tier":9,"country":"x"}"#)]);
    wait_until(Duration::from_secs(30), "the running process to read the table records", || {
        metric(&running, "weir_table_records_total", &[("table", "customers")]) == Some(2.0)
    });
    produce(&orders, [order(20_007)]);
    wait_until(Duration::from_secs(30), "the order after the update", || tiers(&output).contains_key(&20_007));
    assert_eq!(tiers(&output)[&20_007], 5);
    assert_eq!(metric(&running, "weir_table_records_skipped_total", &[("table", "customers")]), Some(1.0));
    assert_eq!(metric(&running, "weir_table_lag_records", &[("table", "customers")]), Some(0.0));
    let (_, status) = running.http_get("/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let table = &status["tables"]["customers"];
    assert_eq!(table["state"], "live", "{status}");
    assert_eq!(table["skipped_records"], 1, "{status}");
    assert!(table["last_skipped"].as_str().unwrap().contains("'customer_id' is missing"), "{status}");
    assert!(running.log_text().contains("skipped a table record"));
    let mut running = running;
    running.terminate();
    assert!(running.wait(Duration::from_secs(30)).success(), "{}", running.log_text());
}

/// While a large table is read, the process is not ready and /status shows the table
/// bootstrapping; then it is ready, the table live, with every row.
#[test]
fn not_ready_while_the_table_is_read() {
    const ROWS: u64 = 150_000;
    let (orders, customers, output) = topics(1);
    let pipeline = lookup_pipeline(&unique("bootstrap"), &orders, &customers, &output);
    let wide = |n: u64| Input::keyed(format!("w{n}"), format!(r#"{{"customer_id":"w{n}","tier":0,"country":"k"}}"#));
    produce(&customers, (0..ROWS).map(wide));
    let mut process = WeirProcess::start(&pipeline.path, WeirOptions::default());
    let mut seen_bootstrapping = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "not ready in time:\n{}", process.log_text());
        let status = process.http_get("/status").map(|(_, text)| serde_json::from_str::<serde_json::Value>(&text).unwrap());
        let state = status.as_ref().and_then(|status| status["tables"]["customers"]["state"].as_str().map(str::to_string));
        if state.as_deref() == Some("bootstrapping") {
            assert!(!is_ready(&process), "ready while the table is read");
            seen_bootstrapping = true;
        }
        if state.as_deref() == Some("live") && is_ready(&process) {
            let table = &status.unwrap()["tables"]["customers"];
            assert_eq!(table["records_read"], ROWS, "{table}");
            assert_eq!(table["bootstrap_records"], ROWS, "{table}");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(seen_bootstrapping, "the bootstrap was never seen in /status");
    process.terminate();
    assert!(process.wait(Duration::from_secs(30)).success(), "{}", process.log_text());
}

/// Orders flow while the table changes and weir is SIGKILLed at random at least 6 times:
/// every order comes out exactly once, enriched with its own customer's row (some version
/// of it).
#[test]
fn lookups_survive_sigkills_exactly_once_and_enriched() {
    const ORDERS: u64 = 40_000;
    let _heavy = heavy_test();
    let (orders, customers, output) = topics(2);
    let name = unique("lookup-kill");
    let pipeline = lookup_pipeline(&name, &orders, &customers, &output);
    produce(&customers, (0..CUSTOMERS).map(customer));
    let updates = feed_with(&customers, CUSTOMERS..CUSTOMERS * 9, 200, customer);
    let feeder = feed_with(&orders, 0..ORDERS, 3_000, order);
    let running = |process: &WeirProcess| {
        metric(process, "weir_records_in_total", &[("source", "orders")]).is_some_and(|records| records > 0.0)
            || (feeder.is_finished() && is_ready(process))
    };
    let (kills, _) = kill_repeatedly(&[pipeline.path.as_path()], 6, running, || feeder.is_finished());
    feeder.join().unwrap();
    updates.join().unwrap();
    let mut last = WeirProcess::start(&pipeline.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(last.wait(Duration::from_secs(300)).success(), "final run failed:\n{}", last.log_text());
    assert_exactly_once(&output, &(0..ORDERS).collect::<Vec<_>>());
    let found = tiers(&output);
    assert!(found.values().all(|tier| *tier <= 8), "over {kills} kills");
    assert!(found.values().any(|tier| *tier > 0), "no order met an update");
}

/// One instance, then two (the second reads the whole table into its own store before its
/// first order), then one again, while orders flow: every order once, enriched.
#[test]
fn scaling_one_two_one_with_a_table() {
    const ORDERS: u64 = 30_000;
    let _heavy = heavy_test();
    let (orders, customers, output) = topics(2);
    let name = unique("lookup-scale");
    let pipeline = lookup_pipeline(&name, &orders, &customers, &output);
    produce(&customers, (0..CUSTOMERS).map(customer));
    let updates = feed_with(&customers, CUSTOMERS..CUSTOMERS * 5, 100, customer);
    let feeder = feed_with(&orders, 0..ORDERS, 2_000, order);
    let (mut first, mut second) = start_then_join(&pipeline.path, Duration::from_secs(2));
    wait_until(Duration::from_secs(30), "the joining process to commit orders", || {
        metric(&second, "weir_records_in_total", &[("source", "orders")]).unwrap_or(0.0) > 0.0
    });
    assert!(second.log_text().contains("tables read"), "{}", second.log_text());
    std::thread::sleep(Duration::from_secs(2));
    second.terminate();
    assert!(second.wait(Duration::from_secs(30)).success(), "{}", second.log_text());
    feeder.join().unwrap();
    updates.join().unwrap();
    wait_until(Duration::from_secs(120), "the first process to reach the end", || {
        committed_offsets(&name, &orders) == end_offsets(&orders)
    });
    first.terminate();
    assert!(first.wait(Duration::from_secs(30)).success(), "{}", first.log_text());
    assert_exactly_once(&output, &(0..ORDERS).collect::<Vec<_>>());
    assert_eq!(tiers(&output).len() as u64, ORDERS);
}

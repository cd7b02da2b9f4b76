//! Restores from the changelog that are cut short: the local store must never claim state
//! it does not hold.

use std::time::Duration;

use crate::support::*;

/// A new owner's restore of a whole changelog writes its entries past the store's
/// write-ahead log and makes them last before it records how far it read. Here an instance
/// restores a dedup's 60,000 keys into an empty store and is SIGKILLed right after (nothing
/// else flushed its memtables). The restart trusts the store it left, which must know every
/// old id: repeats of them stay dropped, new ids pass once. (tests/faults.rs kills one in
/// the middle of such a restore.)
#[test]
fn a_store_restored_then_killed_knows_every_key() {
    const RECORDS: u64 = 60_000;
    let (input, output) = (unique("in"), unique("out"));
    create_topic(&input, 1);
    create_topic(&output, 1);
    let steps = "  - dedup: { key: [id], within: 1d }";
    let file = pipeline_file(&clicks_pipeline_text(&unique("cut-restore"), &input, &output, steps, "partitioned_by: [id]"));
    let state = file.path.parent().unwrap().join("state");
    produce(&input, (0..RECORDS).map(timed_event));
    let mut first = WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(first.wait(Duration::from_secs(300)).success(), "the first run failed:\n{}", first.log_text());

    // Killed as soon as the restore into an empty store has ended.
    std::fs::remove_dir_all(&state).expect("the local state deleted");
    let mut restoring = WeirProcess::start(&file.path, WeirOptions::default());
    wait_until(Duration::from_secs(120), "the whole changelog restored", || {
        restores(&restoring.log_text()).iter().any(|(_, from_changelog)| *from_changelog >= RECORDS)
    });
    restoring.kill();
    produce(&input, (0..50).flat_map(|n| [timed_event(RECORDS + n), timed_event(n * 1_000)]));
    let mut after = WeirProcess::start(&file.path, WeirOptions { until_end: true, ..Default::default() });
    assert!(after.wait(Duration::from_secs(300)).success(), "the run after the restore failed:\n{}", after.log_text());
    let log = after.log_text();
    assert!(
        restores(&log).iter().all(|(_, from_changelog)| *from_changelog < RECORDS),
        "the store was not trusted, so this run does not show what it held:\n{log}"
    );
    assert_exactly_once(&output, &(0..RECORDS + 50).collect::<Vec<_>>());
}

use std::time::Duration;

use crate::support::*;

/// A committed batch is visible to read_committed readers; an aborted one is not (though its
/// records are in the log, as read_uncommitted shows).
#[test]
fn committed_batches_are_visible_and_aborted_ones_are_not() {
    let (input, output) = (unique("in"), unique("out"));
    let name = unique("vis");
    create_topic(&input, 1);
    create_topic(&output, 1);
    let text = json_pipeline(&name, &input, &output, "  - filter: \"amount >= 0.0\"")
        + "on_error:\n  decode: fail\n";
    let pipeline = pipeline_file(&text);
    // One batch per run: a long commit interval, so the failing record aborts everything
    // produced before it in the same transaction.
    let one_batch = vec![
        ("WEIR__RUNTIME__COMMIT_INTERVAL".to_string(), "5s".to_string()),
        ("WEIR__KAFKA__TRANSACTION_TIMEOUT".to_string(), "30s".to_string()),
    ];

    produce(&input, (0..10).map(|id| Input::value(event(id))));
    let mut weir = WeirProcess::start(
        &pipeline.path,
        WeirOptions { until_end: true, env: one_batch.clone(), ..Default::default() },
    );
    assert!(weir.wait(Duration::from_secs(90)).success(), "{}", weir.log_text());
    assert_eq!(read_committed(&output).len(), 10);

    // Many good records, then one that cannot be decoded: the batch aborts and weir stops.
    // The batch is large enough that much of it reaches the log before the abort.
    produce(&input, (10..2010).map(|id| Input::value(event(id))).chain([Input::value("not json")]));
    let mut weir = WeirProcess::start(
        &pipeline.path,
        WeirOptions { until_end: true, env: one_batch, ..Default::default() },
    );
    let status = weir.wait(Duration::from_secs(90));
    assert_eq!(status.code(), Some(1), "{}", weir.log_text());
    assert!(weir.log_text().contains("on_error.decode: fail"), "{}", weir.log_text());

    let committed: Vec<u64> = read_committed(&output).iter().map(|r| r.value_json()["id"].as_u64().unwrap()).collect();
    assert_eq!(committed, (0..10).collect::<Vec<_>>(), "aborted records must not be visible");
    let uncommitted = read_uncommitted(&output);
    assert!(uncommitted.len() > 10, "some of the aborted batch's records reached the log");
    // Nothing of the failed batch was committed: the group still points at the bad batch.
    assert_eq!(committed_offsets(&name, &input), vec![10]);
}

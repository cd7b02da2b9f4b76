//! librdkafka client configuration. Every option weir sets itself has a reason next to it;
//! the user's `kafka.options` come first so that these win where exactly-once depends on them.

use rdkafka::ClientConfig;

use crate::config::{DataLossPolicy, Pipeline, Settings};

fn base(settings: &Settings) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in &settings.kafka.options {
        config.set(key, value);
    }
    config.set("bootstrap.servers", &settings.kafka.bootstrap_servers);
    config
}

/// The transactional producer: one per process, its id stable across restarts so that a
/// restarted process aborts its own dangling transaction at once.
pub fn producer_config(settings: &Settings, transactional_id: &str) -> ClientConfig {
    let mut config = base(settings);
    config
        .set("transactional.id", transactional_id)
        // Bounds how long a crashed process's open transaction blocks read_committed readers.
        .set("transaction.timeout.ms", millis(settings.kafka.transaction_timeout))
        // Implied by transactional.id; stated so nobody wonders.
        .set("enable.idempotence", "true");
    config
}

/// The consumer: manual offsets that are only ever committed inside our transactions.
pub fn consumer_config(settings: &Settings, pipeline: &Pipeline, instance: &str) -> ClientConfig {
    let mut config = base(settings);
    config
        .set("group.id", &pipeline.name)
        // Offsets are committed by the producer, in the batch's transaction, never by the consumer.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Never read records of aborted or still-open transactions.
        .set("isolation.level", "read_committed")
        // Partitions that stay with this process keep flowing during a rebalance.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", millis(settings.kafka.session_timeout))
        // Start positions are set explicitly on assignment; this only applies when a committed
        // offset has fallen out of retention.
        .set(
            "auto.offset.reset",
            match pipeline.source.on_data_loss {
                DataLossPolicy::Fail => "error",
                DataLossPolicy::Earliest => "earliest",
            },
        )
        .set("enable.partition.eof", "false")
        // Feeds the consumer lag gauges.
        .set("statistics.interval.ms", "1000");
    if settings.kafka.static_membership {
        config.set("group.instance.id", format!("{}-{}", pipeline.name, instance));
    }
    config
}

/// A plain client for metadata and topic administration.
pub fn admin_config(settings: &Settings) -> ClientConfig {
    base(settings)
}

fn millis(duration: std::time::Duration) -> String {
    duration.as_millis().to_string()
}

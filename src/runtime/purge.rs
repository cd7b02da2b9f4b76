//! Repartition topics are internal: once the records in them are committed as read, no one
//! needs them again. Like Kafka Streams, weir deletes them up to the committed offsets now
//! and then, so the topics stay small whatever their retention.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use super::clients;
use super::error::RuntimeError;
use crate::config::Settings;

/// How often committed records are deleted from the repartition topics.
const PURGE_EVERY: Duration = Duration::from_secs(30);

pub struct Purger {
    admin: AdminClient<DefaultClientContext>,
    runtime: tokio::runtime::Handle,
    /// The committed next offset of each repartition partition not yet purged to.
    pending: BTreeMap<(String, i32), i64>,
    last: Instant,
}

impl Purger {
    pub fn new(settings: &Settings) -> Result<Purger, RuntimeError> {
        let admin = clients::admin_config(settings)
            .create()
            .map_err(|error| RuntimeError::Setup(format!("creating an admin client: {error}")))?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| RuntimeError::Setup("purging repartition topics needs the tokio runtime".into()))?;
        Ok(Purger { admin, runtime, pending: BTreeMap::new(), last: Instant::now() })
    }

    /// Notes a committed offset of a repartition partition.
    pub fn committed(&mut self, topic: &str, partition: i32, next: i64) {
        self.pending.insert((topic.to_string(), partition), next);
    }

    /// Deletes what was committed, if it is time (or `now_anyway`). A failure is only
    /// logged: the records stay until the next try, and nothing depends on them being gone.
    pub fn maybe_purge(&mut self, now_anyway: bool) {
        if self.pending.is_empty() || (!now_anyway && self.last.elapsed() < PURGE_EVERY) {
            return;
        }
        self.last = Instant::now();
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), next) in std::mem::take(&mut self.pending) {
            if offsets.add_partition_offset(&topic, partition, Offset::Offset(next)).is_err() {
                continue;
            }
        }
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        match self.runtime.block_on(self.admin.delete_records(&offsets, &options)) {
            Ok(results) => {
                for element in results.elements() {
                    if let Err(error) = element.error() {
                        warn!(topic = element.topic(), partition = element.partition(), %error, "could not purge a repartition partition");
                    }
                }
                debug!(partitions = offsets.count(), "purged committed records from the repartition topics");
            }
            Err(error) => warn!(%error, "could not purge the repartition topics"),
        }
    }
}

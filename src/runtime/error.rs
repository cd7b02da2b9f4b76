//! Why the exactly-once loop stops, by what happened: a call to the cluster that failed, the
//! local store, state that does not read back, a record the broker would not take, fencing,
//! a configuration the cluster or the stored state contradicts.

use rdkafka::error::KafkaError;

use crate::engine::StageFailure;

/// Why the exactly-once loop stopped. Every variant ends the process with a non-zero status;
/// a supervisor (Kubernetes) restarts it and the loop resumes from committed offsets.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("setup failed: {0}")]
    Setup(String),
    #[error(
        "fenced: another process took over transactional id '{transactional_id}' or this member's place in the group ({detail}); \
         give each running process its own --instance"
    )]
    Fenced { transactional_id: String, detail: String },
    /// A call to the Kafka cluster failed (reading offsets or metadata, seeking, consuming,
    /// producing, restoring). Many of these pass when the cluster is back; the error keeps
    /// librdkafka's code for whoever decides.
    #[error("{action}: {source}")]
    Kafka {
        action: String,
        #[source]
        source: KafkaError,
    },
    /// The local state store (RocksDB) could not be read or written.
    #[error("{action}: {detail}")]
    Store { action: String, detail: String },
    /// State read back from a changelog or the local store does not fit the step reading it.
    #[error("restoring state: {0}")]
    CorruptState(String),
    /// A changelog's end stayed behind an open transaction for longer than weir waits.
    #[error(
        "restoring partition {partition} did not reach the end of {changelog} in {waited:?}; an open transaction may hold it \
         (its producer crashed, or a transaction timeout is long)"
    )]
    ChangelogStuck { changelog: String, partition: i32, waited: std::time::Duration },
    /// Upsert mode: records the broker did not acknowledge, or refused.
    #[error("{0}; the restart replays the batch from the stored offsets")]
    Undelivered(String),
    /// A record read past an aborted batch would skip records: the run stops instead.
    #[error("{0}")]
    Replay(String),
    /// The assignment breaks what this pipeline needs (a join in place given one side of a
    /// pair, a step with no changelog).
    #[error("{0}")]
    Assignment(String),
    #[error("{0}")]
    ErrorStage(#[from] StageFailure),
    #[error(
        "data loss: the committed offset of {topic}[{partition}] is no longer in the log (retention deleted it); \
         set on_data_loss: earliest on the source to go on from the earliest offset kept"
    )]
    DataLoss { topic: String, partition: i32 },
    /// The pipeline cannot run against what its earlier versions left (state, topics).
    #[error("{0}")]
    Incompatible(String),
    /// A bug: the open batch was aborted, never committed, and is processed again on restart.
    #[error("the processing loop panicked (the open batch was aborted and will be processed again): {0}")]
    Panicked(String),
    #[error("shutdown deadline passed before the last batch committed; it will be processed again on restart")]
    DrainDeadline,
}

impl RuntimeError {
    /// A failed call to the cluster, saying what weir was doing.
    pub fn kafka(action: impl Into<String>, source: KafkaError) -> RuntimeError {
        RuntimeError::Kafka { action: action.into(), source }
    }

    /// A failure of the local state store, saying what weir was doing.
    pub fn store(action: impl Into<String>, detail: impl std::fmt::Display) -> RuntimeError {
        RuntimeError::Store { action: action.into(), detail: detail.to_string() }
    }
}

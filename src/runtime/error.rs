//! Why the exactly-once loop stops, by what happened: a call to the cluster that failed, the
//! local store, state that does not read back, a record the broker would not take, fencing,
//! a configuration the cluster or the stored state contradicts.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::engine::RecordFailure;

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
    /// A record failed at a stage whose `on_error` is `fail`.
    #[error("{0}")]
    RecordFailed(#[from] RecordFailure),
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

/// What a failure means for the run (DESIGN.md "Errors map to librdkafka's transaction
/// classes"): today every one ends the process; the retry policy of the faults issue waits
/// out the retriable ones and aborts and rewinds for the abortable ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The cluster may answer later (broker away, coordinator moving, a timeout).
    Retriable,
    /// The batch cannot commit: abort it, rewind to the committed offsets and replay.
    Abort,
    /// Nothing this process can do: another process took over, state is broken, a bug.
    Fatal,
    /// The operator must change something: the configuration, the cluster, the stored state.
    Config,
}

impl RuntimeError {
    pub fn class(&self) -> FailureClass {
        match self {
            RuntimeError::Kafka { source, .. } => match source.rdkafka_error_code() {
                Some(
                    RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::OperationTimedOut
                    | RDKafkaErrorCode::RequestTimedOut
                    | RDKafkaErrorCode::NetworkException
                    | RDKafkaErrorCode::CoordinatorNotAvailable
                    | RDKafkaErrorCode::NotCoordinator
                    | RDKafkaErrorCode::CoordinatorLoadInProgress
                    | RDKafkaErrorCode::LeaderNotAvailable
                    | RDKafkaErrorCode::NotLeaderForPartition,
                ) => FailureClass::Retriable,
                Some(RDKafkaErrorCode::State) => FailureClass::Abort,
                _ => FailureClass::Fatal,
            },
            RuntimeError::ChangelogStuck { .. } | RuntimeError::Undelivered(_) => FailureClass::Retriable,
            RuntimeError::Replay(_) | RuntimeError::DrainDeadline => FailureClass::Abort,
            RuntimeError::Fenced { .. } | RuntimeError::Store { .. } | RuntimeError::CorruptState(_) | RuntimeError::Panicked(_) => {
                FailureClass::Fatal
            }
            RuntimeError::RecordFailed(_) => FailureClass::Fatal,
            RuntimeError::Setup(_) | RuntimeError::Assignment(_) | RuntimeError::DataLoss { .. } | RuntimeError::Incompatible(_) => {
                FailureClass::Config
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_that_is_away_is_retriable_and_a_refused_record_is_not() {
        let away = RuntimeError::kafka("reading committed offsets", KafkaError::MetadataFetch(RDKafkaErrorCode::AllBrokersDown));
        assert_eq!(away.class(), FailureClass::Retriable);
        let state = RuntimeError::kafka("producing to out", KafkaError::MessageProduction(RDKafkaErrorCode::State));
        assert_eq!(state.class(), FailureClass::Abort);
        let refused = RuntimeError::kafka("producing to out", KafkaError::MessageProduction(RDKafkaErrorCode::InvalidRecord));
        assert_eq!(refused.class(), FailureClass::Fatal);
        assert_eq!(RuntimeError::Fenced { transactional_id: "p-0".into(), detail: String::new() }.class(), FailureClass::Fatal);
        assert_eq!(RuntimeError::Incompatible("changed".into()).class(), FailureClass::Config);
    }
}

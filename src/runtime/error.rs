//! Why the exactly-once loop stops, by what happened: a call to the cluster that failed, the
//! local store, state that does not read back, a record the broker would not take, fencing,
//! a configuration the cluster or the stored state contradicts.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::engine::RecordFailure;

/// Why a run of the exactly-once loop stopped. What happens next depends on its
/// [`class`](RuntimeError::class): a retriable or abortable failure is waited out by starting
/// again in place from the committed state (see `recovery`); the others end the process with
/// a non-zero status.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("setup failed: {0}")]
    Setup(String),
    /// The cluster did not answer at start (no broker reachable).
    #[error("cannot reach the Kafka cluster at {servers} within {waited:?}: {reason}")]
    Unreachable { servers: String, waited: std::time::Duration, reason: String },
    /// A call to the cluster got no answer in time (metadata that did not appear, a topic
    /// that was not read to its end).
    #[error("{action}: no answer within {waited:?}")]
    TimedOut { action: String, waited: std::time::Duration },
    /// The open transaction ran longer than the transaction timeout (a broker that was away or
    /// paused, a stall): the coordinator ends it, and librdkafka reports that as fencing, or
    /// its calls kept failing until then. Nobody else took over: a new producer resolves it
    /// and the batch is replayed.
    #[error(
        "the transaction of '{transactional_id}' was open for {open_for:?}, longer than the transaction timeout \
         ({detail}); a new producer takes over and the batch is replayed"
    )]
    TransactionTimedOut { transactional_id: String, open_for: std::time::Duration, detail: String },
    #[error(
        "fenced: another process took over transactional id '{transactional_id}' or this member's place in the group ({detail}); \
         give each running process its own --instance"
    )]
    Fenced {
        transactional_id: String,
        detail: String,
        /// The group fenced this member (another process joined with the same static
        /// instance id), rather than the transaction coordinator this producer.
        by_group: bool,
    },
    /// The group fenced this member soon after the cluster was away: its session ran out
    /// meanwhile and librdkafka rejoined under its stale member id. No second process is
    /// involved; a new consumer joins in its place (one such fencing per fault, see
    /// `Health::take_recent_cluster_fault`; a real twin is fenced again and stops).
    #[error("the group dropped this member while the cluster was away ({detail}); joining again from the committed state")]
    GroupSessionLost { detail: String },
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
    /// A restore made no progress for longer than weir waits: the changelog's end stays
    /// behind an open transaction.
    #[error(
        "restoring partition {partition} made no progress in {changelog} for {waited:?}; an open transaction may hold its end \
         (its producer crashed, or a transaction timeout is long: `kafka-transactions.sh --find-hanging` names it)"
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

    /// The transaction coordinator fenced this producer (not the group this member). Either a
    /// newer process with the same transactional id took over, or the coordinator ended a
    /// transaction that ran past the transaction timeout (librdkafka reports both alike).
    pub fn is_producer_fencing(&self) -> bool {
        match self {
            RuntimeError::Fenced { by_group, .. } => !by_group,
            RuntimeError::Kafka { source, .. } => matches!(
                source.rdkafka_error_code(),
                Some(RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
            ),
            _ => false,
        }
    }

    /// A failure of the local state store, saying what weir was doing.
    pub fn store(action: impl Into<String>, detail: impl std::fmt::Display) -> RuntimeError {
        RuntimeError::Store { action: action.into(), detail: detail.to_string() }
    }
}

/// What a failure means for the run (DESIGN.md "Errors map to librdkafka's transaction
/// classes"): the retriable and abortable ones are waited out (`recovery` starts the run
/// again from the committed state), the fatal and configuration ones end the process.
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
            RuntimeError::Kafka { source, .. } => kafka_class(source),
            RuntimeError::Unreachable { .. }
            | RuntimeError::TimedOut { .. }
            | RuntimeError::ChangelogStuck { .. }
            | RuntimeError::GroupSessionLost { .. }
            | RuntimeError::Undelivered(_) => FailureClass::Retriable,
            RuntimeError::TransactionTimedOut { .. } | RuntimeError::Replay(_) | RuntimeError::DrainDeadline => FailureClass::Abort,
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

/// A failed call to the cluster is worth waiting out unless it says something waiting cannot
/// change: another process took over, the credentials or permissions are wrong, or the
/// request itself is invalid. A broker that is away shows as many different codes (transport
/// failures, timeouts, leaders and coordinators moving, "unknown" partitions while metadata
/// is rebuilt), so the list is of what is permanent, not of what is transient.
fn kafka_class(source: &KafkaError) -> FailureClass {
    if matches!(source, KafkaError::MessageConsumptionFatal(_)) {
        return FailureClass::Fatal;
    }
    match source.rdkafka_error_code() {
        Some(RDKafkaErrorCode::State) => FailureClass::Abort,
        Some(
            RDKafkaErrorCode::Fatal
            | RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::FencedInstanceId
            | RDKafkaErrorCode::InvalidProducerEpoch,
        ) => FailureClass::Fatal,
        Some(
            RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::SSL
            | RDKafkaErrorCode::UnsupportedSASLMechanism
            | RDKafkaErrorCode::IllegalSASLState
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::InvalidArgument
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidReplicationFactor
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::UnsupportedVersion
            | RDKafkaErrorCode::UnsupportedFeature,
        ) => FailureClass::Config,
        _ => FailureClass::Retriable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_that_is_away_is_retriable_and_wrong_permissions_or_fencing_are_not() {
        let away = RuntimeError::kafka("reading committed offsets", KafkaError::MetadataFetch(RDKafkaErrorCode::AllBrokersDown));
        assert_eq!(away.class(), FailureClass::Retriable);
        let state = RuntimeError::kafka("producing to out", KafkaError::MessageProduction(RDKafkaErrorCode::State));
        assert_eq!(state.class(), FailureClass::Abort);
        let transport = RuntimeError::kafka("reading a changelog", KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure));
        assert_eq!(transport.class(), FailureClass::Retriable);
        let denied = RuntimeError::kafka("reading committed offsets", KafkaError::OffsetFetch(RDKafkaErrorCode::GroupAuthorizationFailed));
        assert_eq!(denied.class(), FailureClass::Config);
        let fatal = RuntimeError::kafka("consuming", KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::Fatal));
        assert_eq!(fatal.class(), FailureClass::Fatal);
        let timed_out = RuntimeError::TransactionTimedOut {
            transactional_id: "p-0".into(),
            open_for: std::time::Duration::from_secs(25),
            detail: "Local: This instance has been fenced by a newer instance".into(),
        };
        assert_eq!(timed_out.class(), FailureClass::Abort);
        assert_eq!(RuntimeError::Fenced { transactional_id: "p-0".into(), detail: String::new(), by_group: false }.class(), FailureClass::Fatal);
        assert_eq!(RuntimeError::Fenced { transactional_id: "p-0".into(), detail: String::new(), by_group: true }.class(), FailureClass::Fatal);
        assert_eq!(RuntimeError::GroupSessionLost { detail: String::new() }.class(), FailureClass::Retriable);
        assert_eq!(RuntimeError::Incompatible("changed".into()).class(), FailureClass::Config);
    }
}

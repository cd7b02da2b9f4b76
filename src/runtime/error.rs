//! Why the exactly-once loop stops.

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
    #[error("kafka error that cannot be retried: {0}")]
    Fatal(String),
    #[error("{0}")]
    Stage(#[from] StageFailure),
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

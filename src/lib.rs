//! weir: a Kafka-to-Kafka exactly-once stream processor.
//!
//! A process reads its share of the source topics' partitions as a consumer-group member,
//! runs each record through the pipeline's steps synchronously, and writes results, DLQ
//! records and the consumed offsets in one Kafka transaction per batch, so a read_committed
//! reader of the sink sees every result exactly once whatever crashes or rebalances happen.
//!
//! Data goes one way: config → plan → runtime → engine → operators, codecs and state.
//!
//! Module map:
//! - [`cli`]: the command line (clap); `main.rs` parses it and calls into the modules below.
//! - [`config`]: what is written, a leaf: service settings (defaults, file, env) and the
//!   pipeline file's parts, each read strictly, every problem reported at once.
//! - [`plan`]: the pipeline file's parts checked against each other and built into the
//!   validated [`plan::Pipeline`]: each step's config (read by the step itself), the schema
//!   each step hands on, the stages and repartitions; what `weir validate` and `weir plan`
//!   print.
//! - [`operators`]: the closed set of steps (filter, dedup, window, join), each a folder with
//!   its config (`config.rs`) and its operator; synchronous and deterministic, one instance
//!   per task; event time.
//! - [`engine`]: decode → steps → encode for one record, with `on_error` routing; tasks,
//!   watermarks and the hand-off between stages (`engine::topology`); no Kafka.
//! - [`codec`]: record bytes to fields and back (JSON with an explicit schema, Avro with a
//!   schema registry, text).
//! - [`runtime`]: the exactly-once loop: start-up, the poll loop, the commit path and its
//!   failure classes, rebalances, state restore, shutdown.
//! - [`http`]: health probes, `/status` and Prometheus metrics over axum.
//! - [`telemetry`]: metric definitions and logging setup.
//! - [`panics`]: containing panics of libraries that read untrusted input.
//! - [`testing`]: `weir test`, the broker-less harness over the same engine.
//! - [`reset`]: `weir reset`.

pub mod cli;
pub mod codec;
pub mod config;
pub mod engine;
pub mod http;
pub mod operators;
pub mod panics;
pub mod plan;
pub mod reset;
pub mod runtime;
pub mod telemetry;
pub mod testing;

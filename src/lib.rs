//! weir: a Kafka-to-Kafka exactly-once stream processor.
//!
//! A process reads its share of the source topics' partitions as a consumer-group member,
//! runs each record through the pipeline's steps synchronously, and writes results, DLQ
//! records and the consumed offsets in one Kafka transaction per batch, so a read_committed
//! reader of the sink sees every result exactly once whatever crashes or rebalances happen.
//!
//! Module map:
//! - [`cli`]: the command line (clap).
//! - [`config`]: service settings (defaults, file, env) and the pipeline file; strict
//!   validation that reports every problem at once.
//! - [`codec`]: record bytes to fields and back (JSON with an explicit schema, text).
//! - [`operators`]: the steps (filter, dedup, window) and event time; synchronous and
//!   deterministic, one instance per task (input partition).
//! - [`engine`]: decode → steps → encode for one record, with `on_error` routing; no Kafka.
//! - [`runtime`]: the exactly-once loop: clients, transactions, rebalances, shutdown.
//! - [`http`]: health probes and Prometheus metrics over axum.
//! - [`telemetry`]: metric definitions and logging setup.
//! - [`plan`]: the plan `weir validate` prints.
//! - [`panics`]: containing panics of libraries that read untrusted input.
//! - [`testing`]: `weir test`, the broker-less harness over the same engine.
//! - [`reset`]: `weir reset --state`.

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

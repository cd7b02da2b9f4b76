//! Test harness: a real Apache Kafka broker (one per test process, started by
//! `scripts/kafka` unless `KAFKA_BOOTSTRAP_SERVERS` names one), topic and record helpers, and
//! weir processes started from the built binary. The benches include it too.
//!
//! - `broker`: the broker, unique names, waiting for a condition;
//! - `topics`: creating topics, producing, reading what a consumer sees, offsets;
//! - `process`: weir processes, pipeline files, HTTP endpoints, metrics, logs;
//! - `load`: continuous input, the exactly-once check, CPU/memory/disk measurements;
//! - `registry`: the schema registry and Avro records.
// Each test binary and bench uses a part of the harness.
#![allow(dead_code, unused_imports)]

mod broker;
mod load;
mod process;
mod registry;
mod topics;

pub use broker::*;
pub use load::*;
pub use process::*;
pub use registry::*;
pub use topics::*;

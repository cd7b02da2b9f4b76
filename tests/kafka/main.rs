//! End-to-end tests against a real Apache Kafka broker (see tests/support).

#[path = "../support/mod.rs"]
mod support;

mod aggregate;
mod avro;
mod guarantees;
mod join;
mod lookup;
mod membership;
mod operations;
mod outputs;
mod passthrough;
mod poison;
mod restore;
mod security;
mod sources;
mod stateful;
mod transform;
mod visibility;
mod workers;

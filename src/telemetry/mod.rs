//! Observability: every metric name lives in [`metrics`]; [`logging`] sets up tracing.

pub mod logging;
pub mod metrics;

//! Waiting out faults: one retry policy for the whole run (audit R2, R4, R5, R11, R16).
//!
//! A run of the loop (start-up, restore, poll, commit) ends with an error of a class
//! ([`RuntimeError::class`]). A retriable failure (the broker away, a call that got no answer,
//! a changelog held by an open transaction) or an abortable one (the coordinator ended a
//! transaction that ran past its timeout, the producer is in a state only an abort leaves, a
//! batch that could not be aborted cleanly) is not a reason to exit. The failed run aborts
//! what it can and drops everything it held: the producer, the consumer (without committing),
//! every task's in-memory state and the store handle. After a pause the run starts again
//! exactly as a restarted process would: `init_transactions` with the same transactional id
//! fences the old producer and resolves its last transaction (aborted, or completed if its
//! commit had begun), state comes back from the store and the changelogs' tails, and reading
//! resumes at the committed offsets. That restart from the committed state is what the kill -9
//! tests prove exact, so waiting out a fault adds no second, less tested path to exactly-once.
//!
//! While it waits: `/health/ready` is false, `/status` has a `recovering` report with the
//! reason, `weir_recovering` is 1 and `weir_recoveries_total{class}` counts the restarts. The
//! pause grows from [`FIRST_PAUSE`] to [`LONGEST_PAUSE`] with jitter, and starts over after a
//! batch commits. The process exits only on a fatal failure (fenced by a real twin, a panic,
//! a broken store), a configuration problem, a shutdown, after `runtime.give_up_after` of one
//! fault (default: never), or when one batch aborts [`MAX_ABORTS_IN_A_ROW`] times in a row
//! with nothing committed between (that repeats forever otherwise, and needs a person).

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::backoff::Backoff;
use super::error::{FailureClass, RuntimeError};
use super::health::{self, Health};
use super::status::Status;
use crate::telemetry::metrics::Metrics;

/// The first pause after a failed run.
pub const FIRST_PAUSE: Duration = Duration::from_millis(500);
/// The longest pause between runs while a fault lasts.
pub const LONGEST_PAUSE: Duration = Duration::from_secs(30);
/// Aborts of a batch, with nothing committed between, after which weir stops.
pub const MAX_ABORTS_IN_A_ROW: u32 = 10;

/// How faults are waited out.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Exit once one fault has lasted this long (`runtime.give_up_after`; None: keep waiting).
    pub give_up_after: Option<Duration>,
    pub first_pause: Duration,
    pub longest_pause: Duration,
}

impl Policy {
    /// The pauses above, and the operator's `runtime.give_up_after`.
    pub fn new(give_up_after: Option<Duration>) -> Policy {
        Policy { give_up_after, first_pause: FIRST_PAUSE, longest_pause: LONGEST_PAUSE }
    }
}

/// Runs `attempt` until it ends cleanly or with a failure waiting cannot fix; see the module
/// documentation.
pub fn supervise(
    mut attempt: impl FnMut() -> Result<(), RuntimeError>,
    policy: Policy,
    metrics: &Metrics,
    health: &Health,
    status: &Status,
    shutdown: &CancellationToken,
) -> Result<(), RuntimeError> {
    let mut pauses = Backoff::new(policy.first_pause, policy.longest_pause);
    let mut fault_since: Option<Instant> = None;
    let mut aborts_in_a_row = 0u32;
    loop {
        health::beat();
        health.set_recovering(false);
        let committed_before = status.batches_committed();
        let result = attempt();
        if status.batches_committed() > committed_before {
            // The run made progress: whatever ends it next is a new fault.
            pauses.start_over();
            fault_since = None;
            aborts_in_a_row = 0;
        }
        let error = match result {
            Ok(()) => {
                metrics.recovering.set(0);
                return Ok(());
            }
            Err(error) => error,
        };
        let class = match error.class() {
            FailureClass::Retriable => "retriable",
            FailureClass::Abort => "abort",
            FailureClass::Fatal | FailureClass::Config => return Err(error),
        };
        if shutdown.is_cancelled() {
            return Err(error);
        }
        let since = *fault_since.get_or_insert_with(Instant::now);
        if let Some(limit) = policy.give_up_after
            && since.elapsed() >= limit
        {
            error!(%error, lasted = ?since.elapsed(), "giving up: the fault lasted longer than runtime.give_up_after");
            return Err(error);
        }
        if error.class() == FailureClass::Abort {
            aborts_in_a_row += 1;
            if aborts_in_a_row >= MAX_ABORTS_IN_A_ROW {
                error!(%error, aborts = aborts_in_a_row, "the same batch aborted again and again with nothing committed between; stopping");
                return Err(error);
            }
        }
        let pause = pauses.pause();
        warn!(%error, class, pause_ms = pause.as_millis() as u64, fault_for_ms = since.elapsed().as_millis() as u64,
            "the run stopped on a fault; starting again from the committed state");
        metrics.recoveries.with_label_values(&[class]).inc();
        metrics.recovering.set(1);
        health.set_recovering(true);
        status.recovering(class, &error.to_string(), pause);
        if !sleep_unless_shut_down(pause, shutdown) {
            info!("shutting down while waiting out a fault; nothing is open");
            return Ok(());
        }
    }
}

/// Sleeps for `pause`, beating the heartbeat; false if a shutdown came first.
fn sleep_unless_shut_down(pause: Duration, shutdown: &CancellationToken) -> bool {
    let until = Instant::now() + pause;
    while Instant::now() < until {
        if shutdown.is_cancelled() {
            return false;
        }
        health::beat();
        std::thread::sleep(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(100)));
    }
    !shutdown.is_cancelled()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (Metrics, Health, Status, CancellationToken) {
        (Metrics::new(), Health::default(), Status::new("p", "0", Vec::new()), CancellationToken::new())
    }

    /// Short pauses, so that the tests do not wait out real ones.
    fn quick(give_up_after: Option<Duration>) -> Policy {
        Policy { give_up_after, first_pause: Duration::from_millis(10), longest_pause: Duration::from_millis(40) }
    }

    #[test]
    fn a_retriable_failure_is_waited_out_and_the_run_starts_again() {
        let (metrics, health, status, shutdown) = fixture();
        let mut runs = 0;
        let result = supervise(
            || {
                runs += 1;
                match runs {
                    1 => Err(RuntimeError::TimedOut { action: "reading metadata".into(), waited: Duration::from_secs(1) }),
                    _ => Ok(()),
                }
            },
            quick(None),
            &metrics,
            &health,
            &status,
            &shutdown,
        );
        assert!(result.is_ok());
        assert_eq!(runs, 2);
        assert_eq!(metrics.recoveries.with_label_values(&["retriable"]).get(), 1);
        let report = status.snapshot();
        assert!(report.recovering.is_some_and(|recovering| recovering.reason.contains("reading metadata")));
    }

    #[test]
    fn fatal_and_config_failures_end_the_run_at_once() {
        let (metrics, health, status, shutdown) = fixture();
        let mut runs = 0;
        let result = supervise(
            || {
                runs += 1;
                Err(RuntimeError::Fenced { transactional_id: "p-0".into(), detail: "fenced".into(), by_group: false })
            },
            quick(None),
            &metrics,
            &health,
            &status,
            &shutdown,
        );
        assert!(matches!(result, Err(RuntimeError::Fenced { .. })));
        assert_eq!(runs, 1);
    }

    #[test]
    fn a_fault_longer_than_give_up_after_ends_the_run() {
        let (metrics, health, status, shutdown) = fixture();
        let mut runs = 0;
        let result = supervise(
            || {
                runs += 1;
                Err(RuntimeError::TimedOut { action: "reading metadata".into(), waited: Duration::from_millis(300) })
            },
            quick(Some(Duration::from_millis(600))),
            &metrics,
            &health,
            &status,
            &shutdown,
        );
        assert!(matches!(result, Err(RuntimeError::TimedOut { .. })));
        assert!(runs >= 2, "retried before giving up: {runs}");
    }

    #[test]
    fn a_batch_that_aborts_again_and_again_is_capped() {
        let (metrics, health, status, shutdown) = fixture();
        let mut runs = 0;
        let result = supervise(
            || {
                runs += 1;
                Err(RuntimeError::Replay("the transaction could not be aborted".into()))
            },
            quick(None),
            &metrics,
            &health,
            &status,
            &shutdown,
        );
        assert!(matches!(result, Err(RuntimeError::Replay(_))));
        assert_eq!(runs, MAX_ABORTS_IN_A_ROW);
    }

    #[test]
    fn a_failure_during_a_shutdown_is_reported_without_waiting() {
        let (metrics, health, status, shutdown) = fixture();
        let stop = shutdown.clone();
        let result = supervise(
            || {
                stop.cancel();
                Err(RuntimeError::TimedOut { action: "x".into(), waited: Duration::ZERO })
            },
            quick(None),
            &metrics,
            &health,
            &status,
            &shutdown,
        );
        // The shutdown came while the run failed: the error is reported, nothing waits.
        assert!(result.is_err());
    }
}

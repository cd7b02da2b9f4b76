//! What the HTTP probes report, updated by the loop.
//!
//! Liveness is a heartbeat: the loop beats on every turn, and so do the waits that are part
//! of its work (a restore, a retried transactional call, the pause between recoveries). A
//! loop that has not beaten for [`Health::live_within`] is stuck, and `/health/live` says so
//! for Kubernetes to restart the process (audit R16). Each worker (`runtime.workers`) has
//! its own `Health`; how the process's probes combine them: `runtime::workers`.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

thread_local! {
    /// The health of the worker whose loop runs on this thread: a loop beats from deep in
    /// its waits, and this spares threading its `Health` through every call that waits.
    static WORKER: RefCell<Option<Arc<Health>>> = const { RefCell::new(None) };
}

/// The loop of this thread's worker (see [`Health::attach`]) is alive and making progress
/// (or deliberately waiting). On a thread no worker is attached to, nothing.
pub fn beat() {
    WORKER.with(|worker| {
        if let Some(health) = &*worker.borrow() {
            health.beat_now();
        }
    });
}

#[derive(Debug, Default)]
pub struct Health {
    transactions_ready: AtomicBool,
    assigned_partitions: AtomicUsize,
    restoring: AtomicBool,
    /// Table sources are being read before the first stream record.
    tables_loading: AtomicBool,
    /// `http.ready_max_lag`; 0: lag does not count.
    lag_limit: AtomicU64,
    /// The largest lag of an owned partition at the last statistics report.
    max_lag: AtomicI64,
    /// The loop waits for an unreachable schema registry.
    waiting_for_registry: AtomicBool,
    /// A fault is being waited out: the run stopped and starts again from the committed
    /// state, or a transactional call is being retried.
    recovering: AtomicBool,
    /// The consumer lost every broker connection (and has not had one back since).
    cluster_unreachable: AtomicBool,
    /// How long the loop may go without a heartbeat and still count as alive (0: not set).
    live_within_ms: AtomicU64,
    /// The loop's last heartbeat, in milliseconds since [`epoch`].
    last_beat: AtomicU64,
    /// When a client last reported trouble reaching the cluster, and no group fencing has
    /// been excused by it since (see [`Health::take_recent_cluster_fault`]).
    last_cluster_fault: std::sync::Mutex<Option<Instant>>,
}

impl Health {
    /// Makes this the health that [`beat`] on the current thread updates: call on the
    /// worker's thread before its loop starts.
    pub fn attach(self: &Arc<Self>) {
        WORKER.with(|worker| *worker.borrow_mut() = Some(self.clone()));
    }

    fn beat_now(&self) {
        self.last_beat.store(epoch().elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the last heartbeat.
    fn since_last_beat(&self) -> Duration {
        epoch().elapsed().saturating_sub(Duration::from_millis(self.last_beat.load(Ordering::Relaxed)))
    }

    pub fn set_transactions_ready(&self, ready: bool) {
        self.transactions_ready.store(ready, Ordering::Relaxed);
    }

    pub fn set_assigned(&self, partitions: usize) {
        self.assigned_partitions.store(partitions, Ordering::Relaxed);
    }

    pub fn assigned_partitions(&self) -> usize {
        self.assigned_partitions.load(Ordering::Relaxed)
    }

    pub fn set_restoring(&self, restoring: bool) {
        self.restoring.store(restoring, Ordering::Relaxed);
    }

    pub fn set_tables_loading(&self, loading: bool) {
        self.tables_loading.store(loading, Ordering::Relaxed);
    }

    pub fn set_waiting_for_registry(&self, waiting: bool) {
        self.waiting_for_registry.store(waiting, Ordering::Relaxed);
    }

    pub fn is_waiting_for_registry(&self) -> bool {
        self.waiting_for_registry.load(Ordering::Relaxed)
    }

    pub fn set_recovering(&self, recovering: bool) {
        self.recovering.store(recovering, Ordering::Relaxed);
    }

    pub fn set_cluster_unreachable(&self, unreachable: bool) {
        self.cluster_unreachable.store(unreachable, Ordering::Relaxed);
    }

    /// A client's error callback (the consumer's or the producer's): a cluster fault, and
    /// when no broker answers, not ready until the consumer's statistics see one up again,
    /// whether or not the loop has a call to the cluster that fails meanwhile.
    pub fn note_client_error(&self, error: &rdkafka::error::KafkaError) {
        if error.rdkafka_error_code() == Some(rdkafka::error::RDKafkaErrorCode::AllBrokersDown) {
            self.set_cluster_unreachable(true);
        }
        self.note_cluster_fault();
    }

    /// A client could not reach the cluster (a broker connection failed, every broker is
    /// down, a call timed out).
    pub fn note_cluster_fault(&self) {
        *self.last_cluster_fault.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now());
    }

    /// Whether the cluster was in trouble within `window`; a yes uses the fault up, so that a
    /// second question needs a new fault. The group fences a static member whose session ran
    /// out while the brokers were away (librdkafka rejoins with the stale member id): one
    /// fencing per fault is that, not a second process with the same instance id.
    pub fn take_recent_cluster_fault(&self, window: Duration) -> bool {
        let mut last = self.last_cluster_fault.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let recent = last.is_some_and(|at| at.elapsed() <= window);
        if recent {
            *last = None;
        }
        recent
    }

    pub fn is_recovering(&self) -> bool {
        self.recovering.load(Ordering::Relaxed)
    }

    /// The longest the loop may go without a heartbeat: longer than any single call it makes
    /// to the cluster, so only a loop that is really stuck fails liveness.
    pub fn set_live_within(&self, bound: Duration) {
        self.live_within_ms.store(bound.as_millis() as u64, Ordering::Relaxed);
        self.beat_now();
    }

    /// Whether the loop has beaten recently (always, before a bound is set).
    pub fn is_live(&self) -> bool {
        self.is_live_after(self.since_last_beat())
    }

    /// Whether a loop whose last heartbeat was `quiet` ago counts as alive.
    fn is_live_after(&self, quiet: Duration) -> bool {
        match self.live_within_ms.load(Ordering::Relaxed) {
            0 => true,
            bound => quiet <= Duration::from_millis(bound),
        }
    }

    pub fn set_lag_limit(&self, records: u64) {
        self.lag_limit.store(records, Ordering::Relaxed);
    }

    pub fn set_max_lag(&self, records: i64) {
        self.max_lag.store(records, Ordering::Relaxed);
    }

    /// Ready to do work: the transactional producer is initialized, partitions are assigned,
    /// their state is restored, the tables are read, the schema registry (if used) answers,
    /// and (with `http.ready_max_lag`) no partition lags further.
    pub fn is_ready(&self) -> bool {
        self.assigned_partitions() > 0 && self.is_ready_for_partitions()
    }

    /// Everything [`Self::is_ready`] asks but owning partitions: a worker left without any
    /// (more workers than partitions) does not hold its process back.
    pub fn is_ready_for_partitions(&self) -> bool {
        let limit = self.lag_limit.load(Ordering::Relaxed);
        self.transactions_ready.load(Ordering::Relaxed)
            && !self.restoring.load(Ordering::Relaxed)
            && !self.tables_loading.load(Ordering::Relaxed)
            && !self.waiting_for_registry.load(Ordering::Relaxed)
            && !self.recovering.load(Ordering::Relaxed)
            && !self.cluster_unreachable.load(Ordering::Relaxed)
            && (limit == 0 || self.max_lag.load(Ordering::Relaxed) <= limit as i64)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Health;

    #[test]
    fn lag_counts_only_with_a_limit() {
        let health = Health::default();
        health.set_transactions_ready(true);
        health.set_assigned(2);
        health.set_max_lag(5_000);
        assert!(health.is_ready(), "no limit: lag does not count");
        health.set_lag_limit(1_000);
        assert!(!health.is_ready(), "5000 records behind, 1000 allowed");
        health.set_max_lag(1_000);
        assert!(health.is_ready());
        health.set_restoring(true);
        assert!(!health.is_ready());
        health.set_restoring(false);
        health.set_recovering(true);
        assert!(!health.is_ready(), "waiting out a fault");
    }

    #[test]
    fn a_loop_that_stops_beating_is_not_live() {
        let health = std::sync::Arc::new(Health::default());
        assert!(health.is_live_after(Duration::from_secs(3600)), "no bound yet: the process is starting");
        health.set_live_within(Duration::from_secs(120));
        assert!(health.is_live_after(Duration::from_secs(119)));
        assert!(!health.is_live_after(Duration::from_secs(121)), "no heartbeat for longer than the bound");
        health.attach();
        std::thread::sleep(Duration::from_millis(5));
        let before = health.since_last_beat();
        super::beat();
        assert!(health.since_last_beat() < before, "beat() on its thread reaches the attached health");
        assert!(health.is_live(), "just beaten");
        let other = std::sync::Arc::new(Health::default());
        other.set_live_within(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        super::beat();
        assert!(!other.is_live(), "a beat on another worker's thread does not count");
    }

    #[test]
    fn a_cluster_fault_excuses_one_group_fencing_within_its_window() {
        let health = Health::default();
        assert!(!health.take_recent_cluster_fault(Duration::from_secs(300)), "no fault seen");
        health.note_cluster_fault();
        std::thread::sleep(Duration::from_millis(5));
        assert!(!health.take_recent_cluster_fault(Duration::from_millis(1)), "the fault is older than the window");
        assert!(health.take_recent_cluster_fault(Duration::from_secs(300)));
        assert!(!health.take_recent_cluster_fault(Duration::from_secs(300)), "one fencing per fault");
    }
}

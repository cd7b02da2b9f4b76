//! What the HTTP probes report, updated by the loop.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct Health {
    transactions_ready: AtomicBool,
    assigned_partitions: AtomicUsize,
    restoring: AtomicBool,
    /// `http.ready_max_lag`; 0: lag does not count.
    lag_limit: AtomicU64,
    /// The largest lag of an owned partition at the last statistics report.
    max_lag: AtomicI64,
    /// The loop waits for an unreachable schema registry.
    waiting_for_registry: AtomicBool,
}

impl Health {
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

    pub fn set_waiting_for_registry(&self, waiting: bool) {
        self.waiting_for_registry.store(waiting, Ordering::Relaxed);
    }

    pub fn is_waiting_for_registry(&self) -> bool {
        self.waiting_for_registry.load(Ordering::Relaxed)
    }

    pub fn set_lag_limit(&self, records: u64) {
        self.lag_limit.store(records, Ordering::Relaxed);
    }

    pub fn set_max_lag(&self, records: i64) {
        self.max_lag.store(records, Ordering::Relaxed);
    }

    /// Ready to do work: the transactional producer is initialized, partitions are assigned,
    /// their state is restored, the schema registry (if used) answers, and (with `http.ready_max_lag`) no partition lags further.
    pub fn is_ready(&self) -> bool {
        let limit = self.lag_limit.load(Ordering::Relaxed);
        self.transactions_ready.load(Ordering::Relaxed)
            && self.assigned_partitions() > 0
            && !self.restoring.load(Ordering::Relaxed)
            && !self.waiting_for_registry.load(Ordering::Relaxed)
            && (limit == 0 || self.max_lag.load(Ordering::Relaxed) <= limit as i64)
    }
}

#[cfg(test)]
mod tests {
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
    }
}

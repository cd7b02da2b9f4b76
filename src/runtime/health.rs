//! What the HTTP probes report, updated by the loop.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct Health {
    transactions_ready: AtomicBool,
    assigned_partitions: AtomicUsize,
    restoring: AtomicBool,
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

    /// Ready to do work: the transactional producer is initialized, partitions are assigned
    /// and their state is restored.
    pub fn is_ready(&self) -> bool {
        self.transactions_ready.load(Ordering::Relaxed)
            && self.assigned_partitions() > 0
            && !self.restoring.load(Ordering::Relaxed)
    }
}

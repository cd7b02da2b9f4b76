//! Several loops in one process (`runtime.workers`), as Kafka Streams runs
//! `num.stream.threads`: each worker is the whole of [`super::run`] on a thread of its own,
//! with its own consumer-group member, transactional producer, state store, health and
//! status. Nothing of the hot path is shared, so the workers scale as separate processes do,
//! and every guarantee of one process holds for each worker.
//!
//! Worker 0 keeps the process's names (`<name>-<instance>`: its transactional id, group
//! instance id and state directory), so a process upgraded from one worker to several
//! fences its old producer; worker k of the others is `<name>-<instance>-w<k>`.
//!
//! The process is live when every worker is, and ready when every worker that owns
//! partitions is (see [`Workers::is_ready`]). A worker that fails for good (fenced,
//! a panic, a broken store) stops the others, which commit their open batches and leave;
//! the process then exits with that failure.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{error, info_span};

use super::health::Health;
use super::status::Status;
use super::{RunOptions, RuntimeError};
use crate::plan::Loaded;
use crate::telemetry::metrics::{self, Metrics};

/// One worker's instance name: the process's for worker 0, `<instance>-w<k>` for the others.
pub fn instance_of(instance: &str, worker: usize) -> String {
    match worker {
        0 => instance.to_string(),
        k => format!("{instance}-w{k}"),
    }
}

/// How many of the process's workers have stopped: with `--until-end`, a worker that owns no
/// partition (more workers than partitions) stops once every other worker has, since the
/// others then own, and have read to the end, every partition it could be given.
#[derive(Debug, Clone)]
pub struct Peers {
    shared: Arc<(usize, AtomicUsize)>,
}

impl Peers {
    pub fn of(workers: usize) -> Peers {
        Peers { shared: Arc::new((workers, AtomicUsize::new(0))) }
    }

    fn finish(&self) {
        self.shared.1.fetch_add(1, Ordering::SeqCst);
    }

    /// There are other workers, and all of them have stopped.
    pub fn others_finished(&self) -> bool {
        let (workers, finished) = (&self.shared.0, &self.shared.1);
        *workers > 1 && finished.load(Ordering::SeqCst) + 1 >= *workers
    }
}

/// What one worker runs with, and what the HTTP endpoints read of it.
pub struct Worker {
    pub options: RunOptions,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub status: Arc<Status>,
}

/// The process's workers.
pub struct Workers {
    workers: Vec<Worker>,
}

impl Workers {
    /// `loaded.settings.runtime.workers` workers of the process `instance`.
    pub fn new(loaded: &Loaded, instance: &str, until_end: bool, secrets: &[String]) -> Workers {
        let count = loaded.settings.runtime.workers.get();
        let peers = Peers::of(count);
        let workers = (0..count)
            .map(|worker| {
                let instance = instance_of(instance, worker);
                let health = Arc::new(Health::default());
                health.set_lag_limit(loaded.settings.http.ready_max_lag);
                Worker {
                    status: Arc::new(Status::new(&loaded.pipeline.name, &instance, secrets.to_vec())),
                    options: RunOptions { instance, until_end, peers: peers.clone() },
                    metrics: Arc::new(Metrics::new()),
                    health,
                }
            })
            .collect();
        Workers { workers }
    }

    /// Alive while every worker's loop beats.
    pub fn is_live(&self) -> bool {
        self.workers.iter().all(|worker| worker.health.is_live())
    }

    /// Ready when every worker is, except that a worker owning no partition (more workers
    /// than partitions) counts as ready if all else is, as long as some worker owns some.
    pub fn is_ready(&self) -> bool {
        self.workers.iter().all(|worker| worker.health.is_ready_for_partitions())
            && self.workers.iter().any(|worker| worker.health.assigned_partitions() > 0)
    }

    /// The `/status` report: one worker's as it is; several, each under `workers`.
    pub fn status(&self) -> Value {
        let report = |worker: &Worker| {
            let mut report = serde_json::to_value(worker.status.snapshot()).unwrap_or_default();
            report["ready"] = Value::Bool(worker.health.is_ready());
            report
        };
        let mut reports: Vec<Value> = self.workers.iter().map(report).collect();
        if reports.len() == 1 {
            return reports.remove(0);
        }
        serde_json::json!({
            "pipeline": reports[0]["pipeline"].clone(),
            "instance": reports[0]["instance"].clone(),
            "ready": self.is_ready(),
            "workers": reports,
        })
    }

    /// The Prometheus text of every worker's metrics together (see [`metrics::render_all`]).
    pub fn metrics_text(&self) -> String {
        let ready = i64::from(self.is_ready());
        let all: Vec<Arc<Metrics>> = self.workers.iter().map(|worker| worker.metrics.clone()).collect();
        for metrics in &all {
            metrics.ready.set(ready);
        }
        metrics::render_all(&all)
    }

    /// Runs every worker until each stops (see [`super::run`]); blocking, from a thread of
    /// the tokio runtime's blocking pool (`spawn_blocking`). The first worker to fail stops
    /// the others through `shutdown`, and its error is the result.
    pub fn run(&self, loaded: &Loaded, shutdown: &CancellationToken) -> Result<(), RuntimeError> {
        let failures = FirstFailure { shutdown, first: Mutex::new(None) };
        let several = self.workers.len() > 1;
        // The admin and schema registry clients run on the caller's tokio runtime.
        let runtime = tokio::runtime::Handle::try_current().ok();
        std::thread::scope(|scope| {
            let mut threads = Vec::new();
            for (index, worker) in self.workers.iter().enumerate() {
                let (failures, runtime) = (&failures, runtime.clone());
                let work = move || {
                    let _runtime = runtime.as_ref().map(tokio::runtime::Handle::enter);
                    let _span = several.then(|| info_span!("worker", worker = index).entered());
                    let result = super::run(loaded, &worker.options, worker.metrics.clone(), worker.health.clone(), worker.status.clone(), shutdown.clone());
                    worker.options.peers.finish();
                    if let Err(failure) = result {
                        if several {
                            error!(error = %failure, "this worker stopped; stopping the others");
                        }
                        failures.stop_all(failure);
                    }
                };
                // A datum nesting as deep as the Avro decoder allows (codec::avro's depth
                // limit) takes more than the default 2 MiB of stack in an unoptimized build.
                // Stacks are reserved, not used, so a large one costs only what is touched.
                let spawned = std::thread::Builder::new().name(format!("weir-worker-{index}")).stack_size(64 << 20).spawn_scoped(scope, work);
                match spawned {
                    Ok(thread) => threads.push(thread),
                    Err(spawn_error) => failures.stop_all(RuntimeError::Setup(format!("starting worker {index}: {spawn_error}"))),
                }
            }
            for thread in threads {
                if let Err(panic) = thread.join() {
                    failures.stop_all(RuntimeError::Panicked(crate::panics::message(panic.as_ref())));
                }
            }
        });
        match failures.first.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()) {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }
}

/// The first failure of any worker, which stops them all.
struct FirstFailure<'a> {
    shutdown: &'a CancellationToken,
    first: Mutex<Option<RuntimeError>>,
}

impl FirstFailure<'_> {
    /// Cancels every worker's run and keeps `failure` unless an earlier one is kept.
    fn stop_all(&self, failure: RuntimeError) {
        self.shutdown.cancel();
        self.first.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get_or_insert(failure);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_zero_keeps_the_process_instance() {
        assert_eq!(instance_of("a-1", 0), "a-1");
        assert_eq!(instance_of("a-1", 2), "a-1-w2");
    }

    #[test]
    fn a_worker_without_partitions_waits_for_every_other_to_stop() {
        let alone = Peers::of(1);
        assert!(!alone.others_finished(), "one worker: nobody else to wait for");
        let three = Peers::of(3);
        assert!(!three.others_finished());
        three.finish();
        assert!(!three.others_finished(), "one other still running");
        three.finish();
        assert!(three.others_finished());
    }
}

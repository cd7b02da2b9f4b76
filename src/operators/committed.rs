//! Committed state read in place: a stateful step whose state lives in the local store (issue
//! "state beyond memory") reads what earlier batches committed through a [`CommittedState`]
//! view, and keeps in memory only what the current batch changed. Its timers (when a key's
//! state ends) live in the store too, ordered by time, so that expiring is a scan from the
//! last watermark, not a walk over every key.
//!
//! The runtime hands each task's step a view of its own (step, changelog partition, owner
//! topic); without one (`weir test`, unit tests) the step keeps all its state in memory as
//! before. A batch's changes reach the store only after its transaction committed; a failed
//! batch drops the task, and the view still shows the committed state.

/// One task's view of one step's committed state, as the local store holds it.
///
/// Reads do not fail: a store that cannot be read is a broken store, which the view records
/// for the runtime to find before the batch commits (the batch is then never committed, and
/// the process ends as it does for any broken store); the read answers "absent".
pub trait CommittedState: Send {
    /// The committed value of a state key (the changelog value's JSON text), if any.
    fn get(&self, key: &str) -> Option<Vec<u8>>;

    /// Calls `each` with the committed timers at times in (`after`, `until`], in time order
    /// (a timer is a time and the state key it is for); returns the time of the first timer
    /// after `until`, if there is one, so that the caller need not look again before then.
    fn due_timers(&self, after: i64, until: i64, each: &mut dyn FnMut(i64, &str)) -> Option<i64>;
}

/// Makes the views: the runtime's local store.
pub trait StateBacking: Send + Sync {
    /// The view of `step`'s state for the task of changelog partition `partition` whose
    /// entries carry the input topic `owner` (None after a repartition).
    fn view(&self, step: usize, partition: i32, owner: Option<&str>) -> Box<dyn CommittedState>;
}

/// A timer a batch set or cleared, for the store (never for the changelog: timers follow from
/// the state, and a restore from the changelog makes them again, see
/// [`crate::operators::Step::timer_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerChange {
    pub time: i64,
    pub key: String,
    /// Set (true) or cleared.
    pub set: bool,
}

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
    /// (a timer is a time, the state key it is for, and its value: empty, or a
    /// [group](StoreTimers::set_group)'s members); returns the time of the first timer after
    /// `until`, if there is one, so that the caller need not look again before then.
    fn due_timers(&self, after: i64, until: i64, each: &mut dyn FnMut(i64, &str, &[u8])) -> Option<i64>;

    /// Calls `each` with every committed state key that starts with `prefix` and its value,
    /// in key order: the session windows of a group, the buffered records of a join key.
    fn scan(&self, prefix: &str, each: &mut dyn FnMut(&str, &[u8]));
}

/// The prefix every state key `[first, ...]` of a JSON array beginning with the string
/// `first` starts with (and no other key does: the string's closing quote is unescaped).
pub fn array_prefix(first: &str) -> String {
    let mut prefix = String::with_capacity(first.len() + 4);
    prefix.push('[');
    // Writing a string to a String cannot fail.
    prefix.push_str(&serde_json::to_string(first).unwrap_or_default());
    prefix.push(',');
    prefix
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
    /// What a set timer holds: nothing, or a group's members.
    pub value: Vec<u8>,
}

/// What the key of a group timer starts with: no state key does (they are JSON texts).
const GROUP: char = '\u{1}';

/// The most members one group timer holds.
pub const GROUP_MEMBERS: usize = 4096;

/// A group's members as its timer's value: each its time (8 bytes, big-endian), its key's
/// length (4 bytes, little-endian) and its key.
fn encode_members(members: &[(i64, String)]) -> Vec<u8> {
    let mut value = Vec::with_capacity(members.iter().map(|(_, key)| 12 + key.len()).sum());
    for (time, key) in members {
        value.extend_from_slice(&time.to_be_bytes());
        value.extend_from_slice(&(key.len() as u32).to_le_bytes());
        value.extend_from_slice(key.as_bytes());
    }
    value
}

/// The members of a group timer's value; a malformed tail (a store written by hand) ends
/// the list.
fn decode_members(mut value: &[u8], each: &mut impl FnMut(i64, &str)) {
    while let (Some(time), Some(length)) = (value.get(..8), value.get(8..12)) {
        let (Ok(time), Ok(length)) = (<[u8; 8]>::try_from(time), <[u8; 4]>::try_from(length)) else { return };
        let end = 12 + u32::from_le_bytes(length) as usize;
        let Some(Ok(key)) = value.get(12..end).map(std::str::from_utf8) else { return };
        each(i64::from_be_bytes(time), key);
        value = &value[end..];
    }
}

/// What a step reading through the store keeps beside its view: how far it has handled the
/// committed timers, the timer changes its batch makes, and the change in its key count.
/// One piece for dedup, aggregate and window, which differ only in what a timer ends.
pub struct StoreTimers {
    view: Box<dyn CommittedState>,
    /// The committed timers up to this time have been handled (this batch clears them).
    scanned_to: i64,
    /// The earliest committed timer after `scanned_to`, as far as known (None: not known,
    /// look; `i64::MAX`: there is none): the store is only asked once the watermark reaches
    /// it, not at every advance.
    next_due: Option<i64>,
    /// Committed timers fired in this batch, as (time, state key).
    fired: Vec<(i64, String)>,
    /// Timer changes for the store since the last `take_timers`.
    changes: Vec<TimerChange>,
    /// Keys made less keys ended since the last `take_key_delta`.
    key_delta: i64,
}

impl StoreTimers {
    pub fn new(view: Box<dyn CommittedState>) -> StoreTimers {
        StoreTimers { view, scanned_to: i64::MIN, next_due: None, fired: Vec::new(), changes: Vec::new(), key_delta: 0 }
    }

    pub fn view(&self) -> &dyn CommittedState {
        self.view.as_ref()
    }

    /// The committed value of a state key (see [`CommittedState::get`]).
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.view.get(key)
    }

    /// The committed state keys under a prefix (see [`CommittedState::scan`]).
    pub fn scan(&self, prefix: &str, each: &mut dyn FnMut(&str, &[u8])) {
        self.view.scan(prefix, each)
    }

    /// The committed timers that fall due as the watermark reaches `watermark` and were not
    /// handled yet, in time order, as (time, state key); each is cleared from the store by
    /// [`Self::clear_fired`].
    pub fn due(&mut self, watermark: i64) -> Vec<(i64, String)> {
        let mut due = Vec::new();
        if watermark <= self.scanned_to {
            return due;
        }
        if self.next_due.is_none_or(|next| watermark >= next) {
            let fired = &mut self.fired;
            let next = self.view.due_timers(self.scanned_to, watermark, &mut |time, key, value| {
                if key.starts_with(GROUP) {
                    decode_members(value, &mut |time, key| due.push((time, key.to_string())));
                } else {
                    due.push((time, key.to_string()));
                }
                fired.push((time, key.to_string()));
            });
            self.next_due = Some(next.unwrap_or(i64::MAX));
        }
        self.scanned_to = watermark;
        due
    }

    /// A timer this batch sets (committed with it): it may come before the one the store
    /// was last asked for.
    pub fn set(&mut self, time: i64, key: String) {
        self.next_due = self.next_due.map(|next| next.min(time));
        self.changes.push(TimerChange { time, key, set: true, value: Vec::new() });
    }

    /// One timer at `time` for several keys, each with a time of its own at or before it
    /// (at most [`GROUP_MEMBERS`]): [`Self::due`] hands out each member, with its own time,
    /// once the watermark reaches `time`. One store entry instead of one per key, for keys
    /// whose end may come a little late (dedup's keys, whose expiry is also checked as they
    /// are read).
    pub fn set_group(&mut self, time: i64, members: &[(i64, String)]) {
        let Some((first_time, first_key)) = members.first() else { return };
        // Unique among the step's timers: a key has one expiry per life, each later than the
        // one before.
        let key = format!("{GROUP}{first_time}/{first_key}");
        self.next_due = self.next_due.map(|next| next.min(time));
        self.changes.push(TimerChange { time, key, set: true, value: encode_members(members) });
    }

    /// A committed timer this batch clears.
    pub fn clear(&mut self, time: i64, key: String) {
        self.changes.push(TimerChange { time, key, set: false, value: Vec::new() });
    }

    /// Clears the timers fired in this batch (call when its changes are taken).
    pub fn clear_fired(&mut self) {
        let fired = std::mem::take(&mut self.fired);
        self.changes.extend(fired.into_iter().map(|(time, key)| TimerChange { time, key, set: false, value: Vec::new() }));
    }

    /// The timers set and cleared since the last call.
    pub fn take_timers(&mut self) -> Vec<TimerChange> {
        std::mem::take(&mut self.changes)
    }

    /// Keys made (positive) or ended (negative) by this batch.
    pub fn count(&mut self, delta: i64) {
        self.key_delta += delta;
    }

    /// Keys made less keys ended since the last call.
    pub fn take_key_delta(&mut self) -> i64 {
        std::mem::take(&mut self.key_delta)
    }
}

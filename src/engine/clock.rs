//! The wall clock that `event_time.max_ahead` measures against, or a fixed one.

/// The wall clock that `event_time.max_ahead` compares event times with: the real one, or
/// (in `weir test`) a fixed instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Clock {
    #[default]
    Wall,
    /// Epoch milliseconds.
    Fixed(i64),
}

impl Clock {
    /// Epoch milliseconds, read only when `needed` (the wall clock is a system call).
    pub(super) fn now_if(self, needed: bool) -> i64 {
        match (self, needed) {
            (_, false) => 0,
            (Clock::Fixed(now), true) => now,
            (Clock::Wall, true) => chrono::Utc::now().timestamp_millis(),
        }
    }
}

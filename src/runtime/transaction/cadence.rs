//! When a batch's time comes: once per commit interval, start to start.
//!
//! Measuring the interval from each batch's opening would add a commit's duration to it:
//! records that arrive while a commit runs wait for it, then for a whole interval of the next
//! batch, so the worst wait would be the interval plus two commits. Measured from the start
//! of the previous commit (as Kafka Streams' `commit.interval.ms` is), it is the interval
//! plus one. A batch still runs for half an interval at least, so that commits slower than
//! the interval do not shrink batches to a few records.

use std::time::{Duration, Instant};

/// Whether a batch opened at `opened` should commit at `now`, the previous commit having
/// begun at `last_commit_began`. Never more than one timed commit per `interval` (a full
/// batch, or a pinned start, commits when it must).
pub fn batch_due(now: Instant, opened: Instant, last_commit_began: Option<Instant>, interval: Duration) -> bool {
    let open_for = now.saturating_duration_since(opened);
    let since_last = last_commit_began.map_or(open_for, |began| now.saturating_duration_since(began));
    open_for >= interval / 2 && since_last >= interval
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(100);

    fn ms(milliseconds: u64) -> Duration {
        Duration::from_millis(milliseconds)
    }

    #[test]
    fn the_first_batch_runs_a_whole_interval() {
        let opened = Instant::now();
        assert!(!batch_due(opened + ms(99), opened, None, INTERVAL));
        assert!(batch_due(opened + ms(100), opened, None, INTERVAL));
    }

    #[test]
    fn a_batch_opened_during_a_commit_ends_one_interval_after_that_commit_began() {
        let began = Instant::now();
        // The commit took 30 ms; records waiting meanwhile opened the next batch at once.
        let opened = began + ms(30);
        assert!(!batch_due(began + ms(99), opened, Some(began), INTERVAL));
        assert!(batch_due(began + ms(100), opened, Some(began), INTERVAL));
    }

    #[test]
    fn a_batch_runs_half_an_interval_at_least_when_commits_are_slow() {
        let began = Instant::now();
        let opened = began + ms(150);
        assert!(!batch_due(began + ms(199), opened, Some(began), INTERVAL));
        assert!(batch_due(began + ms(200), opened, Some(began), INTERVAL));
    }

    #[test]
    fn a_record_after_a_quiet_spell_waits_half_an_interval() {
        let began = Instant::now();
        let opened = began + ms(5_000);
        assert!(!batch_due(opened + ms(49), opened, Some(began), INTERVAL));
        assert!(batch_due(opened + ms(50), opened, Some(began), INTERVAL));
    }
}

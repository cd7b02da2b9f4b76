//! One way of waiting between attempts, for every loop that waits on something outside weir
//! (a fault, the schema registry, a transactional call, a store lock, topic metadata, a group
//! emptying): capped exponential pauses with jitter, each drawn from [half, all] of its step,
//! so that replicas that failed together do not come back in lockstep. backon makes the
//! delays; the loops keep their own deadlines, logging and shutdown checks.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    longest: Duration,
}

impl Backoff {
    /// Pauses from about `first` (doubling) up to `longest`, never ending.
    pub fn new(first: Duration, longest: Duration) -> Backoff {
        // backon's jitter adds up to one more delay: halving the steps makes each pause fall
        // in [half, all] of the step asked for.
        let builder = ExponentialBuilder::new()
            .with_min_delay(first / 2)
            .with_max_delay(longest / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff { builder, delays: builder.build(), longest }
    }

    /// The next pause.
    pub fn pause(&mut self) -> Duration {
        // The delays never end (no maximum of attempts); the cap is the safe answer anyway.
        self.delays.next().unwrap_or(self.longest)
    }

    /// Back to the first pause (the thing waited on recovered).
    pub fn start_over(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_a_cap_with_jitter_and_start_over() {
        let (first, longest) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut backoff = Backoff::new(first, longest);
        let opening = backoff.pause();
        assert!(opening >= first / 2 && opening <= first, "{opening:?}");
        let later: Vec<Duration> = (0..30).map(|_| backoff.pause()).collect();
        assert!(later.iter().all(|pause| *pause <= longest), "{later:?}");
        assert!(later[20..].iter().all(|pause| *pause >= longest / 2), "{later:?}");
        // Jitter: the capped pauses are not all the same.
        assert!(later[20..].windows(2).any(|pair| pair[0] != pair[1]), "{later:?}");
        backoff.start_over();
        assert!(backoff.pause() <= first);
    }
}

//! Durations in a pipeline file: whole milliseconds, at most 100 years, at least 1ms where
//! zero means nothing (PIPELINE.md "Limits").

use std::time::Duration;

use super::ConfigErrors;

/// A duration that may be negative, such as `-5m`, in milliseconds; None with a problem at
/// `location` when it is not one or is past the limits.
pub fn signed_millis(text: &str, location: &str, problems: &mut ConfigErrors) -> Option<i64> {
    let (sign, magnitude) = match text.trim().strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text.trim()),
    };
    let duration = match humantime::parse_duration(magnitude) {
        Ok(duration) => duration,
        Err(error) => {
            problems.push(location, format!("'{text}' is not a duration such as 0s, 10m or -5m ({error})"));
            return None;
        }
    };
    check_duration(duration, Zero::Allowed, location, problems).then(|| sign * millis(duration))
}

/// The longest duration a pipeline may name: 100 years of 365.25 days (PIPELINE.md
/// "Limits"). With event times inside years 0001-9999, every sum of an event time and such
/// durations stays far inside i64 milliseconds.
pub const MAX_DURATION: Duration = Duration::from_secs(3_155_760_000);

/// Whether a duration may be zero where it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zero {
    Allowed,
    /// Zero means nothing there (a window size, `within`, a gap): at least 1ms.
    Refused,
}

/// Records a problem unless `duration` is whole milliseconds, at most 100 years, and (where
/// zero means nothing) at least 1ms. True when it is fine.
pub fn check_duration(duration: Duration, zero: Zero, location: &str, problems: &mut ConfigErrors) -> bool {
    let shown = humantime::format_duration(duration);
    let message = if !duration.subsec_nanos().is_multiple_of(1_000_000) {
        format!("'{shown}' is not a whole number of milliseconds; durations are whole milliseconds (e.g. 500ms, 2s)")
    } else if zero == Zero::Refused && duration.is_zero() {
        "must be at least 1ms".to_string()
    } else if duration > MAX_DURATION {
        format!("'{shown}' is longer than the limit of 100 years")
    } else {
        return true;
    };
    problems.push(location, message);
    false
}

/// Milliseconds of a duration that [`check_duration`] accepted (so it fits).
pub fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

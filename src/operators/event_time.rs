//! Reading a record's event time, in epoch milliseconds, inside the range PIPELINE.md allows
//! (years 0001-9999): a time outside it is a decode error for that record and never reaches a
//! watermark, so every later sum of an event time and a checked duration fits in an i64.

use serde_json::{Map, Value};

use crate::config::{EventTime, EventTimeUnit, TimeOrigin};

/// Why a record has no usable event time: a decode error for that record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EventTimeError(pub String);

/// 0001-01-01T00:00:00Z in epoch milliseconds: the earliest event time.
pub const MIN_EVENT_TIME: i64 = -62_135_596_800_000;
/// 9999-12-31T23:59:59.999Z in epoch milliseconds: the latest event time.
pub const MAX_EVENT_TIME: i64 = 253_402_300_799_999;

/// The value at a dotted path such as `user.id`; None when a part is missing.
pub fn field_at<'v>(fields: &'v Map<String, Value>, path: &str) -> Option<&'v Value> {
    // Most paths are one name (an event time, a key field): looked up without the splitting.
    let Some((first, rest)) = path.split_once('.') else {
        return crate::codec::field(fields, path);
    };
    let mut value = crate::codec::field(fields, first)?;
    for part in rest.split('.') {
        value = crate::codec::field(value.as_object()?, part)?;
    }
    Some(value)
}

/// The event time of a record, or why it has none (a decode error for that record). `now`
/// is the wall clock in epoch milliseconds, for `max_ahead`.
pub fn extract(spec: &EventTime, fields: &Map<String, Value>, kafka_timestamp: Option<i64>, now: i64) -> Result<i64, EventTimeError> {
    let time = read(&spec.origin, fields, kafka_timestamp)?;
    if !(MIN_EVENT_TIME..=MAX_EVENT_TIME).contains(&time) {
        return Err(EventTimeError(format!("event time {time} ms is outside years 0001-9999")));
    }
    if let Some(max_ahead) = spec.max_ahead {
        let limit = now.saturating_add(crate::config::millis(max_ahead));
        if time > limit {
            return Err(EventTimeError(format!(
                "event time {time} ms is {} ms ahead of the clock ({now} ms), more than event_time.max_ahead ({})",
                time.saturating_sub(now),
                humantime::format_duration(max_ahead)
            )));
        }
    }
    Ok(time)
}

fn read(origin: &TimeOrigin, fields: &Map<String, Value>, kafka_timestamp: Option<i64>) -> Result<i64, EventTimeError> {
    let (path, unit) = match origin {
        TimeOrigin::KafkaTimestamp => {
            return kafka_timestamp.ok_or_else(|| EventTimeError("the record has no Kafka timestamp for its event time".to_string()));
        }
        TimeOrigin::Field { path, unit } => (path, unit),
    };
    let value = field_at(fields, path).filter(|value| !value.is_null());
    let Some(value) = value else {
        return Err(EventTimeError(format!("event time field '{path}' is missing or null")));
    };
    // Doubles outside the range become infinities or saturate, and are refused by the range
    // check; NaN is refused here.
    let from_double = |number: f64, scale: f64| (number * scale).is_finite().then_some((number * scale) as i64);
    let millis = match (unit, value) {
        (EventTimeUnit::Millis, Value::Number(number)) => number.as_i64().or_else(|| number.as_f64().and_then(|ms| from_double(ms, 1.0))),
        (EventTimeUnit::Seconds, Value::Number(number)) => number
            .as_i64()
            .map(|seconds| seconds.saturating_mul(1000))
            .or_else(|| number.as_f64().and_then(|seconds| from_double(seconds, 1000.0))),
        (EventTimeUnit::Rfc3339, Value::String(text)) => {
            chrono::DateTime::parse_from_rfc3339(text).ok().map(|instant| instant.timestamp_millis())
        }
        _ => None,
    };
    millis.ok_or_else(|| EventTimeError(format!("event time field '{path}' holds {value}, not a time in {unit:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_time(ts: Value, unit: EventTimeUnit, max_ahead: Option<std::time::Duration>, now: i64) -> Result<i64, EventTimeError> {
        let spec = EventTime { origin: TimeOrigin::Field { path: "ts".into(), unit }, max_ahead };
        let mut fields = Map::new();
        fields.insert("ts".into(), ts);
        extract(&spec, &fields, None, now)
    }

    #[test]
    fn times_outside_years_0001_to_9999_are_refused() {
        let now = 1_700_000_000_000;
        assert_eq!(field_time(Value::from(MAX_EVENT_TIME), EventTimeUnit::Millis, None, now), Ok(MAX_EVENT_TIME));
        assert_eq!(field_time(Value::from(MIN_EVENT_TIME), EventTimeUnit::Millis, None, now), Ok(MIN_EVENT_TIME));
        for millis in [i64::MAX, i64::MIN, MAX_EVENT_TIME + 1, MIN_EVENT_TIME - 1] {
            let error = field_time(Value::from(millis), EventTimeUnit::Millis, None, now).unwrap_err();
            assert!(error.0.contains("outside years 0001-9999"), "{error}");
        }
        assert!(field_time(Value::from(i64::MAX), EventTimeUnit::Seconds, None, now).is_err());
        assert!(field_time(Value::from(1e300), EventTimeUnit::Seconds, None, now).is_err());
        assert!(field_time(Value::from("10000-01-01T00:00:00Z"), EventTimeUnit::Rfc3339, None, now).is_err());
        // The first and last instants RFC 3339 can write are in range.
        assert_eq!(field_time(Value::from("0001-01-01T00:00:00Z"), EventTimeUnit::Rfc3339, None, now), Ok(MIN_EVENT_TIME));
        assert_eq!(field_time(Value::from("9999-12-31T23:59:59.999Z"), EventTimeUnit::Rfc3339, None, now), Ok(MAX_EVENT_TIME));
    }

    #[test]
    fn max_ahead_refuses_times_too_far_ahead_of_the_clock() {
        let now = 1_700_000_000_000;
        let hour = Some(std::time::Duration::from_secs(3600));
        assert_eq!(field_time(Value::from(now + 3_600_000), EventTimeUnit::Millis, hour, now), Ok(now + 3_600_000));
        let error = field_time(Value::from(now + 3_600_001), EventTimeUnit::Millis, hour, now).unwrap_err();
        assert!(error.0.contains("max_ahead"), "{error}");
        // Without max_ahead, far ahead is fine as long as it is in range.
        assert!(field_time(Value::from(now + 3_600_001), EventTimeUnit::Millis, None, now).is_ok());
    }
}

//! Reading a record's event time, in epoch milliseconds.

use serde_json::{Map, Value};

use crate::config::{EventTime, EventTimeUnit};

/// The value at a dotted path such as `user.id`; None when a part is missing.
pub fn field_at<'v>(fields: &'v Map<String, Value>, path: &str) -> Option<&'v Value> {
    let mut parts = path.split('.');
    let mut value = fields.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

/// The event time of a record, or why it has none (a decode error for that record).
pub fn extract(spec: &EventTime, fields: &Map<String, Value>, kafka_timestamp: Option<i64>) -> Result<i64, String> {
    let (path, unit) = match spec {
        EventTime::KafkaTimestamp => {
            return kafka_timestamp.ok_or_else(|| "the record has no Kafka timestamp for its event time".to_string());
        }
        EventTime::Field { path, unit } => (path, unit),
    };
    let value = field_at(fields, path).filter(|value| !value.is_null());
    let Some(value) = value else {
        return Err(format!("event time field '{path}' is missing or null"));
    };
    let millis = match (unit, value) {
        (EventTimeUnit::Millis, Value::Number(number)) => number.as_i64().or_else(|| number.as_f64().map(|ms| ms as i64)),
        (EventTimeUnit::Seconds, Value::Number(number)) => {
            number.as_i64().map(|seconds| seconds.saturating_mul(1000)).or_else(|| number.as_f64().map(|seconds| (seconds * 1000.0) as i64))
        }
        (EventTimeUnit::Rfc3339, Value::String(text)) => {
            chrono::DateTime::parse_from_rfc3339(text).ok().map(|instant| instant.timestamp_millis())
        }
        _ => None,
    };
    millis.ok_or_else(|| format!("event time field '{path}' holds {value}, not a time in {unit:?}"))
}

//! The headers that carry a record (or a watermark alone) to a later stage through a
//! repartition topic, and the ids of outputs in `idempotent_upsert` mode.

use crate::codec::json;
use super::records::{Destination, Output};
use crate::operators::{Forward, Record};

/// A record on a repartition topic whose weir headers do not read (written by something
/// other than weir, or damaged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BrokenForward(pub String);

/// The headers of an output's id and version in `mode: idempotent_upsert`.
pub const ID_HEADER: &str = "weir-id";
pub const VERSION_HEADER: &str = "weir-version";

/// A sink record's deterministic id in upsert mode, from its inputs, and its version:
/// - a window's result: the group and `window_start`; version: its event time (window end - 1);
/// - a dedup's output: the dedup key; version: the input offset;
/// - a join's result: where each side was read (`{<left>: {topic, partition, offset} | null,
///   <right>: ...}`); version: its event time;
/// - anything else (pass-through, filter): the input's topic, partition and offset; version:
///   the offset.
///
/// A replay from the same offsets rebuilds the same state, so it writes the same ids with
/// the same values. The id is given as its JSON text.
pub(super) fn upsert_id(record: &Record<'_>) -> (Vec<u8>, i64) {
    match (&record.id, &record.key, record.provenance) {
        // The commonest id, written straight (as `json::encode` writes it), not made as a map.
        (None, None, Some(provenance)) => (coordinates_text(provenance.topic, provenance.partition, provenance.offset), provenance.offset),
        _ => {
            let (id, version) = upsert_id_fields(record);
            (json::encode(&id), version)
        }
    }
}

/// `{"topic":..,"partition":..,"offset":..}`: `json::encode` of `join::coordinates`.
fn coordinates_text(topic: &str, partition: i32, offset: i64) -> Vec<u8> {
    let mut text = Vec::with_capacity(topic.len() + 56);
    text.extend_from_slice(br#"{"topic":"#);
    json::write_string(&mut text, topic);
    text.extend_from_slice(br#","partition":"#);
    text.extend_from_slice(itoa::Buffer::new().format(partition).as_bytes());
    text.extend_from_slice(br#","offset":"#);
    text.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
    text.push(b'}');
    text
}

fn upsert_id_fields(record: &Record<'_>) -> (serde_json::Map<String, serde_json::Value>, i64) {
    if let Some(id) = &record.id {
        return ((**id).clone(), record.event_time);
    }
    match (&record.key, record.provenance) {
        (Some(key), None) => {
            let mut id = key.fields().into_owned();
            if let Some(start) = record.fields.get("window_start") {
                id.insert("window_start".into(), start.clone());
            }
            (id, record.event_time)
        }
        (Some(key), Some(provenance)) => (key.fields().into_owned(), provenance.offset),
        (None, Some(provenance)) => {
            (crate::operators::join::coordinates(provenance.topic, provenance.partition, provenance.offset), provenance.offset)
        }
        (None, None) => (serde_json::Map::new(), record.event_time),
    }
}

/// What a record read from a repartition topic carries besides its value, in headers.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardHeaders {
    pub sender: String,
    pub watermark: i64,
    pub idle: bool,
    pub event_time: i64,
    pub key: Option<serde_json::Map<String, serde_json::Value>>,
    pub upsert: bool,
    /// Where the record entered the pipeline: (topic, partition, offset, timestamp).
    pub source: Option<(String, i32, i64, Option<i64>)>,
    /// Upsert mode: the forward's position in its sender's sequence.
    pub position: Option<(i64, u32)>,
    /// How many of the record's headers, from the first, are the input record's.
    pub input_headers: usize,
}

const SENDER: &str = "weir-sender";
const WATERMARK: &str = "weir-watermark";
const EVENT_TIME: &str = "weir-event-time";
const RECORD_KEY: &str = "weir-record-key";
const UPSERT: &str = "weir-upsert";
const IDLE: &str = "weir-idle";
const SOURCE: &str = "weir-source";
const POSITION: &str = "weir-position";

/// The names of the headers weir adds to a repartition-topic record.
const FORWARD_HEADERS: &[&str] = &[SENDER, WATERMARK, EVENT_TIME, RECORD_KEY, UPSERT, IDLE, SOURCE, POSITION];

/// The repartition-topic record of a forward: the input's Kafka key, the fields as JSON (no
/// value: a watermark alone), the input record's headers, then weir's own after them.
pub(super) fn forwarded(forward: Forward<'_>) -> Output {
    let mut headers = forward.record.as_ref().and_then(|record| record.provenance).map(|provenance| provenance.owned_headers()).unwrap_or_default();
    headers.push((SENDER.to_string(), forward.sender.into_bytes()));
    headers.push((WATERMARK.to_string(), forward.watermark.to_string().into_bytes()));
    if forward.idle {
        headers.push((IDLE.to_string(), b"1".to_vec()));
    }
    if let Some((offset, made)) = forward.position {
        headers.push((POSITION.to_string(), format!("{offset}/{made}").into_bytes()));
    }
    let (mut key, mut value) = (None, None);
    if let Some(record) = forward.record {
        headers.push((EVENT_TIME.to_string(), record.event_time.to_string().into_bytes()));
        if let Some(record_key) = &record.key {
            headers.push((RECORD_KEY.to_string(), record_key.text().into_owned().into_bytes()));
        }
        if record.upsert {
            headers.push((UPSERT.to_string(), b"1".to_vec()));
        }
        if let Some(provenance) = record.provenance {
            let source = serde_json::json!([provenance.topic, provenance.partition, provenance.offset, provenance.timestamp]);
            headers.push((SOURCE.to_string(), source.to_string().into_bytes()));
            key = provenance.key.map(<[u8]>::to_vec);
        }
        value = Some(json::encode(&record.fields));
    }
    Output { destination: Destination::Repartition(forward.stage), partition: Some(forward.partition as i32), key, value: value.into(), headers }
}

impl ForwardHeaders {
    /// Reads the headers `forwarded` wrote: weir's own at the end, after the input record's
    /// (the first `input_headers` of them).
    pub fn parse(headers: &[(&str, Option<&[u8]>)]) -> Result<ForwardHeaders, BrokenForward> {
        let input_headers = headers.len() - headers.iter().rev().take_while(|(name, _)| FORWARD_HEADERS.contains(name)).count();
        let headers = &headers[input_headers..];
        // The last of a name is weir's own: an input header of the same name (which then
        // does not pass on) came before it.
        let find = |name: &str| headers.iter().rev().find(|(key, _)| *key == name).and_then(|(_, value)| *value);
        let text = |name: &str| find(name).and_then(|bytes| std::str::from_utf8(bytes).ok());
        let number = |name: &str| text(name).and_then(|text| text.parse::<i64>().ok());
        let sender = text(SENDER).ok_or_else(|| BrokenForward("a repartitioned record without its weir-sender header".to_string()))?.to_string();
        let watermark = number(WATERMARK).ok_or_else(|| BrokenForward("a repartitioned record without a numeric weir-watermark header".to_string()))?;
        let key = match find(RECORD_KEY) {
            None => None,
            Some(bytes) => Some(serde_json::from_slice(bytes).map_err(|error| BrokenForward(format!("weir-record-key is not a JSON object: {error}")))?),
        };
        let source = match find(SOURCE) {
            None => None,
            Some(bytes) => Some(serde_json::from_slice(bytes).map_err(|error| BrokenForward(format!("weir-source is not [topic, partition, offset, timestamp]: {error}")))?),
        };
        let position = match text(POSITION) {
            None => None,
            Some(text) => Some(
                text.split_once('/')
                    .and_then(|(offset, made)| Some((offset.parse::<i64>().ok()?, made.parse::<u32>().ok()?)))
                    .ok_or_else(|| BrokenForward(format!("weir-position is not <offset>/<count>: {text}")))?,
            ),
        };
        Ok(ForwardHeaders {
            input_headers,
            position,
            sender,
            watermark,
            idle: find(IDLE).is_some(),
            event_time: number(EVENT_TIME).unwrap_or(i64::MIN),
            key,
            upsert: find(UPSERT).is_some(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operators::{InputHeaders, Provenance};

    /// The id written straight is the id the map gives, byte for byte (ids already written
    /// must not change).
    #[test]
    fn an_input_records_upsert_id_is_its_coordinates_as_json() {
        for (topic, partition, offset) in [("bids", 0, 0), ("a\"b\\c", 7, i64::MAX), ("t\u{e9}\u{1}", i32::MAX, -1), ("", i32::MIN, i64::MIN)] {
            let id = crate::operators::join::coordinates(topic, partition, offset);
            assert_eq!(coordinates_text(topic, partition, offset), json::encode(&id), "{topic}");
        }
    }

    /// The input's headers travel ahead of weir's own and come back as the input's; one that
    /// takes the name of one of weir's cannot change what weir reads.
    #[test]
    fn input_headers_travel_with_a_forward() {
        let input: [(&str, Option<&[u8]>); 3] = [("trace", Some(b"t1")), ("empty", None), ("weir-watermark", Some(b"999"))];
        let provenance = Provenance { topic: "in", partition: 1, offset: 7, timestamp: Some(5), headers: InputHeaders::Read(&input), key: Some(b"k") };
        let record = Record { fields: serde_json::Map::new(), event_time: 42, provenance: Some(provenance), key: None, upsert: false, id: None };
        let forward = Forward { stage: 1, partition: 0, sender: "in[1]".into(), watermark: 40, idle: false, record: Some(record), position: None };
        let output = forwarded(forward);
        let written: Vec<(&str, Option<&[u8]>)> = output.headers.iter().map(|(name, value)| (name.as_str(), Some(value.as_slice()))).collect();
        let parsed = ForwardHeaders::parse(&written).unwrap();
        assert_eq!((parsed.watermark, parsed.event_time, parsed.sender.as_str()), (40, 42, "in[1]"));
        // A null header has no bytes to carry; the one named like weir's is not passed on.
        assert_eq!(&written[..parsed.input_headers], &[("trace", Some(&b"t1"[..]))]);
        assert_eq!(parsed.source, Some(("in".to_string(), 1, 7, Some(5))));
    }
}

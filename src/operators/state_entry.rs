//! How big one piece of a stateful step's state may grow: the changelog record that carries
//! it must fit the producer's `message.max.bytes`, so steps measure an entry before they keep
//! it.

use super::ProcessError;

/// The largest changelog entry a stateful step may keep for one piece of its state, in bytes
/// of the state key (as the changelog key quotes it) plus the value's JSON. An entry the
/// producer cannot send would fail every commit, and the replay would fail it again: so a
/// step refuses, as a [`ProcessError`], the record that would make one, and keeps its state
/// as it was (audit R8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateEntryLimit {
    bytes: usize,
}

impl StateEntryLimit {
    /// What a changelog record carries besides the step's own key and value: the record's
    /// framing (~100 bytes in a v2 record batch) and the `["<input topic>", ...]` around the
    /// state key (a topic name has at most 249 characters, none of them escaped).
    const CHANGELOG_MARGIN: usize = 1024;

    /// librdkafka's default `message.max.bytes`, which weir leaves as it is.
    pub const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

    /// The limit under which every changelog record fits a producer whose
    /// `message.max.bytes` is `message_max_bytes`.
    pub fn under_message_max_bytes(message_max_bytes: usize) -> StateEntryLimit {
        StateEntryLimit { bytes: message_max_bytes.saturating_sub(Self::CHANGELOG_MARGIN) }
    }

    pub fn bytes(self) -> usize {
        self.bytes
    }

    /// Refuses an entry of `bytes` over the limit, naming the step's kind.
    pub(super) fn check(self, kind: &str, bytes: usize) -> Result<(), ProcessError> {
        if bytes <= self.bytes {
            return Ok(());
        }
        Err(ProcessError(format!(
            "the {kind} state this record needs is about {bytes} bytes, over the {} bytes a changelog record may hold \
             (the producer's message.max.bytes less framing); the record is not kept in state",
            self.bytes
        )))
    }
}

impl Default for StateEntryLimit {
    fn default() -> StateEntryLimit {
        StateEntryLimit::under_message_max_bytes(StateEntryLimit::LIBRDKAFKA_MESSAGE_MAX_BYTES)
    }
}

/// The length of `text` written as a JSON string, as the changelog writes a state key (which
/// is JSON text itself, so only quotes and backslashes are escaped again; control characters
/// are counted too, for text that is not JSON).
pub(crate) fn quoted_len(text: &str) -> usize {
    let escaped: usize = text
        .bytes()
        .map(|byte| match byte {
            b'"' | b'\\' => 1,
            0..=0x1f => 5,
            _ => 0,
        })
        .sum();
    text.len() + 2 + escaped
}

/// The length of `value` as compact JSON, counted without keeping the text.
pub(crate) fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing to a counter cannot fail, and serializing a JSON value or our derived state
    // cannot either; should it ever, the count so far is still a lower bound.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

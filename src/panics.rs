//! Containing panics of libraries that read untrusted input (Avro decoding, CEL evaluation):
//! a panic there is that record's failure (a DLQ record), not the process's. Panics in
//! weir's own steps are not contained: the loop aborts the batch and stops, so that a
//! half-applied state change is never committed (see `runtime::run`).

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `work`; a panic becomes `Err` with its message. Only for calls whose side effects
/// are confined to what they return (decoding, evaluating an expression).
pub fn contain<T>(work: impl FnOnce() -> T) -> Result<T, Panic> {
    catch_unwind(AssertUnwindSafe(work)).map_err(|panic| Panic(message(panic.as_ref())))
}

/// A contained panic, with the text it carried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Panic(pub String);

/// The text a panic carried.
pub fn message(panic: &(dyn Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(text), _) => (*text).to_string(),
        (None, Some(text)) => text.clone(),
        (None, None) => "a panic without a message".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(contain(|| 7), Ok(7));
        assert_eq!(contain(|| -> i32 { panic!("bad {}", "input") }), Err(Panic("bad input".to_string())));
        assert_eq!(contain(|| -> i32 { std::panic::panic_any(3u8) }), Err(Panic("a panic without a message".to_string())));
    }
}

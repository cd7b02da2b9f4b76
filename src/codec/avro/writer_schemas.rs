//! The writer schemas met so far, by registry id, with a bounded memory of ids the registry
//! does not know and a budget for looking up new ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use apache_avro::Schema as AvroSchema;

use super::depth::{recursive_names, Names};

/// The writer schemas met so far, by registry id: filled by the runtime (which may block on
/// the registry), read by decoders (which never do). An id the registry does not know is kept
/// as an error, so each of its records is a bad record without asking again, for
/// [`UNKNOWN_ID_RETRY`]: then it is asked again, in case the id was registered since (a
/// registry replica that had not caught up yet).
///
/// Garbage input (a zero byte, then random ids) must not grow memory or flood the registry:
/// at most [`MAX_UNKNOWN_IDS`] unknown ids are kept (the oldest goes first; known schemas are
/// bounded by the registry itself and never evicted), and lookups are rate-limited
/// ([`WriterSchemas::take_lookup`]).
#[derive(Debug)]
pub struct WriterSchemas {
    cache: RwLock<Cache>,
    unknown_id_retry: Duration,
    max_unknown_ids: usize,
    lookups: Mutex<LookupBudget>,
}

#[derive(Debug, Default)]
struct Cache {
    schemas: HashMap<u32, Cached>,
    /// How many of `schemas` are errors (ids the registry did not know).
    unknown: usize,
    /// Counts insertions, so that the oldest entry is known even within one clock tick.
    inserted: u64,
}

#[derive(Debug)]
struct Cached {
    schema: WriterSchema,
    /// The schema's named types when it is recursive (its datums are walked for their depth
    /// before decoding, see `super::depth`); worked out once, here, not per record.
    recursive: Option<Arc<Names>>,
    since: Instant,
    sequence: u64,
}

impl Default for WriterSchemas {
    fn default() -> WriterSchemas {
        WriterSchemas::with_unknown_id_retry(UNKNOWN_ID_RETRY)
    }
}

/// A writer schema, or why the registry has none for its id.
pub type WriterSchema = Result<Arc<AvroSchema>, NoWriterSchema>;

/// Why an id names no usable writer schema (unknown to the registry, not Avro, not valid):
/// the records that name it are bad records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoWriterSchema(pub String);

impl From<&str> for NoWriterSchema {
    fn from(text: &str) -> NoWriterSchema {
        NoWriterSchema(text.to_string())
    }
}

/// How long an id the registry did not know stays unknown before it is asked again.
pub const UNKNOWN_ID_RETRY: Duration = Duration::from_secs(60);

/// The most unknown ids remembered. At the lookup rate below, ids expire (after
/// [`UNKNOWN_ID_RETRY`]) before this many pile up; the cap holds whatever the rate.
pub const MAX_UNKNOWN_IDS: usize = 10_000;

/// Registry lookups allowed at once, after a quiet spell: a pipeline meets its writers'
/// handful of schema ids at start without waiting.
pub const LOOKUP_BURST: u32 = 100;

/// Registry lookups allowed per second, once the burst is spent.
pub const LOOKUPS_PER_SECOND: u32 = 50;

impl WriterSchemas {
    pub fn with_unknown_id_retry(unknown_id_retry: Duration) -> WriterSchemas {
        WriterSchemas::with_limits(unknown_id_retry, MAX_UNKNOWN_IDS, LOOKUP_BURST, LOOKUPS_PER_SECOND)
    }

    pub(super) fn with_limits(unknown_id_retry: Duration, max_unknown_ids: usize, burst: u32, per_second: u32) -> WriterSchemas {
        WriterSchemas {
            cache: RwLock::default(),
            unknown_id_retry,
            max_unknown_ids,
            lookups: Mutex::new(LookupBudget::new(burst, per_second, Instant::now())),
        }
    }

    /// Whether the registry must be asked for `id` before a record naming it is decoded.
    pub fn needs_fetch(&self, id: u32) -> bool {
        match self.cache.read().expect("writer schemas lock").schemas.get(&id) {
            None => true,
            Some(Cached { schema: Ok(_), .. }) => false,
            Some(Cached { schema: Err(_), since, .. }) => since.elapsed() >= self.unknown_id_retry,
        }
    }

    /// Takes one registry lookup from the budget; `Err(wait)` when it is spent, with the time
    /// until the next one. The caller waits rather than dead-lettering the record: an id never
    /// seen may be a writer's new schema, and its records must not go to the DLQ because
    /// garbage came first. Waiting costs at most 1/[`LOOKUPS_PER_SECOND`] per lookup, so the
    /// open transaction still commits on time; garbage then flows at the lookup rate instead
    /// of at the registry's, and the registry is spared.
    pub fn take_lookup(&self) -> Result<(), Duration> {
        self.lookups.lock().expect("lookup budget lock").take(Instant::now())
    }

    pub fn insert(&self, id: u32, schema: WriterSchema) {
        let mut cache = self.cache.write().expect("writer schemas lock");
        cache.inserted += 1;
        let sequence = cache.inserted;
        let unknown = schema.is_err();
        let recursive = schema.as_ref().ok().and_then(|schema| recursive_names(schema)).map(Arc::new);
        let replaced = cache.schemas.insert(id, Cached { schema, recursive, since: Instant::now(), sequence });
        if replaced.is_some_and(|replaced| replaced.schema.is_err()) {
            cache.unknown -= 1;
        }
        if unknown {
            cache.unknown += 1;
            if cache.unknown > self.max_unknown_ids {
                cache.forget_oldest_unknown();
            }
        }
    }

    /// The writer schema of `id`, with its named types when it is recursive.
    pub(super) fn get(&self, id: u32) -> Option<(WriterSchema, Option<Arc<Names>>)> {
        let cache = self.cache.read().expect("writer schemas lock");
        cache.schemas.get(&id).map(|cached| (cached.schema.clone(), cached.recursive.clone()))
    }

    pub fn len(&self) -> usize {
        self.cache.read().expect("writer schemas lock").schemas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Cache {
    /// A scan, but it runs at most once per registry lookup, which the budget bounds.
    fn forget_oldest_unknown(&mut self) {
        let oldest = self
            .schemas
            .iter()
            .filter(|(_, cached)| cached.schema.is_err())
            .min_by_key(|(_, cached)| cached.sequence)
            .map(|(id, _)| *id);
        if let Some(id) = oldest {
            self.schemas.remove(&id);
            self.unknown -= 1;
        }
    }
}

/// A token bucket: `burst` lookups at once, refilled at `per_second`.
#[derive(Debug)]
pub(super) struct LookupBudget {
    tokens: f64,
    burst: f64,
    per_second: f64,
    refilled_at: Instant,
}

impl LookupBudget {
    pub(super) fn new(burst: u32, per_second: u32, now: Instant) -> LookupBudget {
        LookupBudget { tokens: f64::from(burst), burst: f64::from(burst), per_second: f64::from(per_second.max(1)), refilled_at: now }
    }

    pub(super) fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_second))
        }
    }
}

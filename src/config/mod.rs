//! Configuration: the service settings (`config/default.toml`, an optional file, then
//! `WEIR__SECTION__KEY` environment variables) and the pipeline file (YAML).
//!
//! Both are parsed strictly (unknown keys are errors) and validated as a whole: every problem
//! found is collected into one [`ConfigErrors`] so the user fixes them in one round, and
//! nothing here touches the network.

mod error;
mod pipeline;
mod settings;

pub use error::{ConfigErrors, Problem};
pub use pipeline::{
    Aggregate, DataLossPolicy, Dedup, EmitMode, Encoding, ErrorAction, ErrorPolicy, EventTime,
    EventTimeUnit, FieldType, TimeOrigin, MAX_DURATION, MAX_WINDOWS_PER_RECORD, millis, Filter, Join, JoinKind, Pipeline, Schema, Sink, SinkMode, Source, SourceTopics,
    StartingOffsets, Step, Watermark, Window, WindowKind,
};
pub use settings::{
    is_secret_option, redact, HttpSettings, KafkaSettings, LogFormat, LoggingSettings, RegistrySettings, RuntimeSettings, Settings, StateSettings,
};

use std::path::Path;

/// Everything `weir run` needs, validated.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    pub pipeline: Pipeline,
}

/// Parses and validates a pipeline document on its own (tests, tools).
pub fn parse_pipeline(text: &str) -> Result<Pipeline, ConfigErrors> {
    let mut problems = ConfigErrors::default();
    match pipeline::parse(text, &mut problems) {
        Some(pipeline) if problems.is_empty() => Ok(pipeline),
        _ => Err(problems),
    }
}

/// Loads and validates the pipeline file alone (`weir test`: no service settings apply).
pub fn load_pipeline(pipeline_file: &Path) -> Result<Pipeline, ConfigErrors> {
    let mut problems = ConfigErrors::default();
    match pipeline::load(pipeline_file, &mut problems) {
        Some(pipeline) if problems.is_empty() => Ok(pipeline),
        _ => Err(problems),
    }
}

/// Loads and validates the settings and the pipeline together, so that one run reports the
/// problems of both.
pub fn load(config_file: Option<&Path>, pipeline_file: &Path) -> Result<Loaded, ConfigErrors> {
    let mut problems = ConfigErrors::default();
    let settings = settings::load(config_file, &mut problems);
    let pipeline = pipeline::load(pipeline_file, &mut problems);
    if let (Some(settings), Some(pipeline)) = (&settings, &pipeline)
        && settings.schema_registry.urls.is_empty()
        && let Some(user) = pipeline.avro_user()
    {
        problems.push(
            "schema_registry.url (env WEIR__SCHEMA_REGISTRY__URL)",
            format!("is required: {user} uses format avro"),
        );
    }
    match (settings, pipeline) {
        (Some(settings), Some(pipeline)) if problems.is_empty() => Ok(Loaded { settings, pipeline }),
        _ => Err(problems),
    }
}

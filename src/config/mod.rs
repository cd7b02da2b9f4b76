//! Configuration as written: the service settings (`config/default.toml`, an optional file,
//! then `WEIR__SECTION__KEY` environment variables) and the pipeline file (YAML).
//!
//! Both are parsed strictly (unknown keys are errors) and every problem found is collected
//! into one [`ConfigErrors`], so the user fixes them in one round. This module is a leaf: it
//! knows nothing of the plan, the engine, the codecs or the operators; a step's body is read
//! by the step's own config, and the parts are checked against each other by the plan.
//! Nothing here touches the network.

mod duration;
mod error;
mod fields;
mod pipeline;
mod positions;
mod schema;
mod secrets;
mod settings;
mod shape;
mod source;

pub use duration::{check_duration, millis, signed_millis, Zero, MAX_DURATION};
pub use error::{unknown, ConfigErrors, Position, Problem};
pub use positions::place;
pub use fields::Fields;
pub use pipeline::PIPELINE;
pub use shape::{document, Context, Key, Section, Shape};
pub use pipeline::{section, DeliveryMode, ErrorAction, ErrorPolicy, OutputEntry, PipelineFile, Sink, SinkHeaders, StepEntry, StepRef};
pub use schema::{check_fields, null_refused, nullable_hint, FieldType, Schema, ShapeError};
pub use secrets::{is_secret_option, redact};
pub use settings::{
    SETTINGS,
    HttpSettings, KafkaSettings, LogFormat, LoggingSettings, RegistrySettings, RuntimeSettings, Settings, StateSettings,
};
pub use source::{
    DataLossPolicy, Encoding, EventTime, EventTimeUnit, Source, SourceTopics, StartingOffsets, TimeOrigin, Watermark,
};

use std::path::Path;

/// Reads the service settings; None when they have problems (recorded).
pub fn load_settings(config_file: Option<&Path>, problems: &mut ConfigErrors) -> Option<Settings> {
    settings::load(config_file, problems)
}

/// The pipeline file's text; None (with a problem) when it cannot be read.
pub fn read_pipeline_text(path: &Path, problems: &mut ConfigErrors) -> Option<String> {
    pipeline::read(path, problems)
}

/// Reads a pipeline document given as text.
pub fn parse_pipeline_file(text: &str, problems: &mut ConfigErrors) -> Option<PipelineFile> {
    pipeline::parse(text, problems)
}

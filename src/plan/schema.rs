//! `weir schema pipeline|settings`: the JSON Schemas of the pipeline file and the settings
//! file, made from the sections the readers check keys against (config's [`Section`]s and
//! each step kind's body), so that an editor completes and checks what weir reads.

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

use crate::config::{self, Context, Shape};
use crate::operators::{join, Step};

/// The step kinds and the join section, which the operators describe.
fn context() -> Context<'static> {
    Context { steps: Step::BODIES, join: Shape::Section(&join::config::SECTION) }
}

/// The JSON Schema of a pipeline file.
pub fn pipeline() -> Json {
    config::document("weir pipeline", &config::PIPELINE, &context())
}

/// The JSON Schema of a settings file (`--config`, TOML).
pub fn settings() -> Json {
    config::document("weir settings", &config::SETTINGS, &context())
}

/// Whether the pipeline schema takes `document` (debug builds check it for every file the
/// plan takes).
pub fn pipeline_accepts(document: &Yaml) -> bool {
    Shape::Section(&config::PIPELINE).accepts(document, &context())
}

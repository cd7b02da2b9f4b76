//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "weir", version, about = "Kafka-to-Kafka exactly-once stream processor")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline as a service: read, process and write exactly once until stopped.
    Run(RunArgs),
    /// Check the settings and the pipeline without connecting to Kafka, and print the plan.
    Validate(ConfigArgs),
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The pipeline file (YAML).
    #[arg(long, env = "WEIR_PIPELINE")]
    pub pipeline: PathBuf,
    /// A settings file (TOML) layered over the built-in defaults; WEIR__SECTION__KEY
    /// environment variables override both.
    #[arg(long, env = "WEIR_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// This process's stable identity (the StatefulSet ordinal under Helm). The transactional
    /// id is <pipeline name>-<instance>: every process of a pipeline needs its own.
    #[arg(long, env = "WEIR_INSTANCE", default_value = "0")]
    pub instance: String,
    /// Stop after reading up to the end offsets seen at start, commit and exit 0.
    #[arg(long)]
    pub until_end: bool,
}

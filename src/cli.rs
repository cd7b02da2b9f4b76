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
    /// Print the step graph (stages, tasks, repartitions), every topic the pipeline reads,
    /// writes or owns, and each stateful step's state fingerprint. `--check` also compares
    /// the fingerprints with the state in Kafka.
    Plan(PlanArgs),
    /// Run a pipeline over a file of records without a broker and print (or check) what it
    /// would write.
    Test(TestArgs),
    /// Reset a stopped pipeline: `--state` deletes its state (changelog, repartition and
    /// definitions topics), so changed stateful steps start empty from the committed
    /// offsets; `--to-earliest`, `--to-latest`, `--to-datetime` or `--by-duration` moves the
    /// committed offsets (and resets any state). Without `--execute` it only shows what it
    /// would do.
    Reset(ResetArgs),
    /// Print the JSON Schema of the pipeline file or of the settings file, for editors
    /// (e.g. yaml-language-server's `# yaml-language-server: $schema=<file>` header).
    Schema(SchemaArgs),
}

#[derive(Debug, Args)]
pub struct SchemaArgs {
    #[arg(value_enum)]
    pub of: SchemaOf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SchemaOf {
    /// The pipeline file (YAML).
    Pipeline,
    /// The settings file given with --config (TOML).
    Settings,
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Delete the state of every stateful step (and what is in flight between stages).
    #[arg(long)]
    pub state: bool,
    /// Move the pipeline's committed source offsets to the beginning of each partition.
    /// A pipeline with state also has its state deleted: replayed input over old state
    /// would be judged as duplicates and late.
    #[arg(long, group = "target")]
    pub to_earliest: bool,
    /// Move the committed source offsets to the end of each partition: what is there now
    /// is skipped. State as with --to-earliest.
    #[arg(long, group = "target")]
    pub to_latest: bool,
    /// Move the committed source offsets to the first record at or after this time
    /// (RFC 3339, e.g. 2026-11-22T10:00:00Z; the end where there is none). State as with
    /// --to-earliest.
    #[arg(long, value_name = "TIME", group = "target")]
    pub to_datetime: Option<String>,
    /// Move the committed source offsets to the first record at or after this long ago
    /// (e.g. 30m, 2h, 1d). State as with --to-earliest.
    #[arg(long, value_name = "DURATION", group = "target")]
    pub by_duration: Option<String>,
    /// Show what the reset would delete and where the offsets would go, and change
    /// nothing (what happens without --execute too).
    #[arg(long, conflicts_with = "execute")]
    pub dry_run: bool,
    /// Do the reset.
    #[arg(long)]
    pub execute: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Read the step definitions that wrote the pipeline's state from Kafka (nothing is
    /// changed) and say, step by step, whether a run would accept it; exit 2 if not.
    #[arg(long)]
    pub check: bool,
    /// Print something other than the plan: `acls`, the Kafka ACLs the pipeline needs, as a
    /// Strimzi KafkaUser.
    #[arg(long, value_enum, conflicts_with = "check")]
    pub emit: Option<Emit>,
}

/// What `weir plan --emit` prints.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Emit {
    /// The Kafka ACLs the pipeline needs, as a Strimzi KafkaUser.
    Acls,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The pipeline file (YAML).
    #[arg(long, env = "WEIR_PIPELINE")]
    pub pipeline: PathBuf,
    /// Input records, one JSON object per line:
    /// {"source": ..., "partition": 0, "timestamp": ..., "key": ..., "value": ...}
    #[arg(long)]
    pub input: PathBuf,
    /// Expected output lines; exit 0 when the output equals them, 1 with a diff otherwise.
    #[arg(long)]
    pub expect: Option<PathBuf>,
    /// Input lines per batch (one transaction in production).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// Sort the output lines, so that runs compare as sets.
    #[arg(long)]
    pub sorted: bool,
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

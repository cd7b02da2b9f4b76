//! The `weir` binary: parses the command line, loads and plans the configuration (exit 2
//! on any problem, before touching Kafka), then runs the command.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use weir::cli::{Cli, Command, ConfigArgs, PlanArgs, ResetArgs, RunArgs, SchemaArgs, SchemaOf, TestArgs};
use weir::testing;
use weir::config::redact;
use weir::plan::{self, Loaded};
use weir::engine::Engine;
use weir::runtime::{self, workers::Workers};
use weir::telemetry::logging;

/// mimalloc rather than glibc's allocator: in a profile of a dedup over 1M keys, glibc's
/// malloc and free took about 30% of weir's CPU time (BENCHMARKS.md). With the crate's
/// `override` feature (Cargo.toml) it serves librdkafka's and RocksDB's allocations too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for bad settings or a bad pipeline, reported before touching Kafka.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Test builds only: fail points named in the FAILPOINTS environment variable.
    #[cfg(feature = "failpoints")]
    let _fail_points = fail::FailScenario::setup();
    match cli.command {
        Command::Validate(args) => validate(&args),
        Command::Plan(args) => plan(&args),
        Command::Run(args) => run(args),
        Command::Test(args) => test(&args),
        Command::Reset(args) => reset(&args),
        Command::Schema(args) => schema(&args),
    }
}

fn reset(args: &ResetArgs) -> ExitCode {
    let target = match reset_target(args) {
        Ok(target) => target,
        Err(problem) => {
            eprintln!("weir: 1 configuration problem:\n  - {problem}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if !args.state && target.is_none() {
        eprintln!("weir: say what to reset: --state, --to-earliest, --to-latest, --to-datetime TIME or --by-duration DURATION");
        return ExitCode::from(EXIT_CONFIG);
    }
    let loaded = match load(&args.config) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let name = &loaded.pipeline.name;
    let result = runtime::check_connection(&loaded.settings)
        .map_err(weir::reset::ResetError::from)
        .and_then(|()| {
            if !args.execute {
                print_reset_plan(&loaded, &weir::reset::plan(&loaded, args.state, target)?);
                return Ok(());
            }
            let plan = weir::reset::execute(&loaded, args.state, target)?;
            match plan.state_topics.is_empty() {
                true => println!("pipeline {name} has no state to reset"),
                false => println!("deleted the state of pipeline {name}: {}", plan.state_topics.join(", ")),
            }
            for weir::reset::OffsetMove { topic, partition, committed, next } in &plan.offsets {
                println!("{topic}[{partition}]: next offset {next} (was {})", committed.map_or("none".to_string(), |offset| offset.to_string()));
            }
            Ok(())
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weir: {}", redact(&error.to_string(), loaded.settings.secrets()));
            ExitCode::FAILURE
        }
    }
}

/// Where `--to-*` / `--by-duration` move the offsets (None: they stay).
fn reset_target(args: &ResetArgs) -> Result<Option<weir::reset::OffsetTarget>, String> {
    use weir::reset::OffsetTarget;
    if let Some(text) = &args.to_datetime {
        return match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(time) => Ok(Some(OffsetTarget::Time(time.timestamp_millis()))),
            Err(error) => Err(format!("--to-datetime: '{text}' is not an RFC 3339 time ({error}), e.g. 2026-11-22T10:00:00Z")),
        };
    }
    if let Some(text) = &args.by_duration {
        return match humantime::parse_duration(text) {
            Ok(duration) => Ok(Some(OffsetTarget::Time(chrono::Utc::now().timestamp_millis() - duration.as_millis() as i64))),
            Err(error) => Err(format!("--by-duration: '{text}' is not a duration ({error}), e.g. 30m, 2h or 1d")),
        };
    }
    Ok(match (args.to_earliest, args.to_latest) {
        (true, _) => Some(OffsetTarget::Earliest),
        (_, true) => Some(OffsetTarget::Latest),
        _ => None,
    })
}

/// The dry run: what `--execute` would do, and what stands in its way.
fn print_reset_plan(loaded: &weir::plan::Loaded, plan: &weir::reset::ResetPlan) {
    let name = &loaded.pipeline.name;
    println!("dry run: nothing was changed; add --execute to reset");
    if plan.live_members > 0 {
        println!(
            "consumer group {name} has {} live member(s) now: --execute waits up to the session timeout ({}) for them to leave, then refuses",
            plan.live_members,
            humantime::format_duration(loaded.settings.kafka.session_timeout)
        );
    }
    match plan.state_topics.is_empty() {
        true => println!("pipeline {name} has no state to delete"),
        false => println!("would delete the state of pipeline {name}: {}", plan.state_topics.join(", ")),
    }
    for weir::reset::OffsetMove { topic, partition, committed, next } in &plan.offsets {
        let committed = committed.map_or("none committed".to_string(), |offset| format!("committed {offset}"));
        println!("would move {topic}[{partition}]: {committed} -> next offset {next}");
    }
}

fn test(args: &TestArgs) -> ExitCode {
    // Only the pipeline: no broker, no registry, so no service settings.
    let pipeline = match plan::load_pipeline(&args.pipeline) {
        Ok(pipeline) => pipeline,
        Err(problems) => {
            eprint!("weir: {problems}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let input = match std::fs::read_to_string(&args.input) {
        Ok(input) => input,
        Err(error) => {
            eprintln!("weir: cannot read {}: {error}", args.input.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut lines = match testing::run(&pipeline, &input, args.batch_size as usize) {
        Ok(lines) => lines,
        Err(error) => {
            eprintln!("weir: {error}");
            return ExitCode::FAILURE;
        }
    };
    if args.sorted {
        lines.sort();
    }
    let Some(expect) = &args.expect else {
        for line in &lines {
            println!("{line}");
        }
        return ExitCode::SUCCESS;
    };
    let expected = match std::fs::read_to_string(expect) {
        Ok(text) if args.sorted => {
            let mut expected: Vec<String> = text
                .lines()
                .filter(|line| !line.trim().is_empty())
                .map(|line| serde_json::from_str::<serde_json::Value>(line).map(|value| value.to_string()).unwrap_or_else(|_| line.to_string()))
                .collect();
            expected.sort();
            expected.join("\n")
        }
        Ok(text) => text,
        Err(error) => {
            eprintln!("weir: cannot read {}: {error}", expect.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match testing::compare(&lines, &expected) {
        Ok(None) => {
            println!("ok: {} output records as expected", lines.len());
            ExitCode::SUCCESS
        }
        Ok(Some(report)) => {
            print!("{report}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("weir: {error}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn load(args: &ConfigArgs) -> Result<Loaded, ExitCode> {
    plan::load(args.config.as_deref(), &args.pipeline).map_err(|problems| {
        eprint!("weir: {problems}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn validate(args: &ConfigArgs) -> ExitCode {
    let loaded = match load(args) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    print!("{}", plan::describe(&loaded));
    ExitCode::SUCCESS
}

fn plan(args: &PlanArgs) -> ExitCode {
    use plan::StoredState;
    let loaded = match load(&args.config) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let pipeline = &loaded.pipeline;
    if let Some(weir::cli::Emit::Acls) = args.emit {
        print!("{}", plan::acls::kafka_user(pipeline));
        return ExitCode::SUCCESS;
    }
    if !args.check {
        print!("{}", plan::graph(&loaded, &|_| StoredState::Unknown));
        return ExitCode::SUCCESS;
    }
    let stored = match runtime::check_connection(&loaded.settings)
        .and_then(|()| runtime::definitions::stored(&loaded.settings, &loaded.pipeline))
    {
        Ok(stored) => stored,
        Err(error) => {
            let secrets = loaded.settings.secrets();
            eprintln!("weir: reading the stored step definitions: {}", redact(&error.to_string(), secrets));
            return ExitCode::FAILURE;
        }
    };
    let verdict = |step: usize| match stored.get(&step) {
        None => StoredState::New,
        Some(definition) if *definition == pipeline.step_definition(step) => StoredState::Unchanged,
        Some(definition) => StoredState::Changed(definition.clone()),
    };
    print!("{}", plan::graph(&loaded, &verdict));
    let stateful = pipeline.stateful_steps();
    let gone: Vec<&usize> = stored.keys().filter(|step| !stateful.contains(step)).collect();
    for step in &gone {
        println!("state of step {step} was written by `{}`, which is no longer a stateful step", stored[step]);
    }
    let changed = !gone.is_empty() || stateful.iter().any(|step| matches!(verdict(*step), StoredState::Changed(_)));
    if changed {
        println!("a run would refuse this pipeline: `weir reset --state --execute` drops the old state first");
        return ExitCode::from(EXIT_CONFIG);
    }
    println!("a run would accept this pipeline's state");
    ExitCode::SUCCESS
}

fn run(args: RunArgs) -> ExitCode {
    let loaded = match load(&args.config) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    match Engine::new(&loaded.pipeline) {
        Ok(_) => {}
        Err(message) => {
            eprintln!("weir: {message}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    // The instance makes the transactional id: an empty one (an unset env var in a template)
    // would give every replica the same id and they would fence each other forever.
    let valid_instance = !args.instance.is_empty()
        && args.instance.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid_instance {
        eprintln!(
            "weir: 1 configuration problem:\n  - --instance (env WEIR_INSTANCE): '{}' must be non-empty letters, digits, '-', '_' or '.'",
            args.instance
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    logging::init(&loaded.settings.logging);
    // This runtime serves HTTP and waits for signals; the loops run on threads of their own,
    // with the large stacks decoding needs (`runtime::workers`).
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let tokio = match runtime {
        Ok(tokio) => tokio,
        Err(error) => {
            error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    // With JSON logs every line weir writes is JSON: the reason goes in the log record alone.
    let json_logs = matches!(loaded.settings.logging.format, weir::config::LogFormat::Json);
    match tokio.block_on(serve_and_run(loaded, &args.instance, args.until_end)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((message, code)) => {
            error!(error = %message, "weir stopped");
            if !json_logs {
                eprintln!("weir: {message}");
            }
            ExitCode::from(code)
        }
    }
}

/// Runs the service; an error comes with the exit status it means.
async fn serve_and_run(loaded: Loaded, instance: &str, until_end: bool) -> Result<(), (String, u8)> {
    let secrets: Vec<String> = loaded.settings.secrets().into_iter().map(str::to_string).collect();
    let workers = Arc::new(Workers::new(&loaded, instance, until_end, &secrets));
    let shutdown = CancellationToken::new();
    let http_stop = CancellationToken::new();
    let (address, http) = weir::http::serve(loaded.settings.http.listen, workers.clone(), http_stop.clone())
        .await
        .map_err(|error| (format!("cannot listen on {}: {error}", loaded.settings.http.listen), 1))?;
    info!(%address, pipeline = %loaded.pipeline.name, %instance, workers = loaded.settings.runtime.workers, "weir starting");

    let signals = tokio::spawn(stop_on_signal(shutdown.clone()));
    let loop_shutdown = shutdown.clone();
    let running = workers.clone();
    let result = tokio::task::spawn_blocking(move || running.run(&loaded, &loop_shutdown))
        .await
        .map_err(|error| (format!("the processing thread panicked: {error}"), 1))?;
    signals.abort();
    http_stop.cancel();
    let _ = http.await;
    match result {
        Ok(()) => {
            info!("weir stopped cleanly");
            Ok(())
        }
        // State written by other step definitions is a configuration problem too.
        Err(error @ runtime::RuntimeError::Incompatible(_)) => Err((error.to_string(), EXIT_CONFIG)),
        Err(error) => Err((redact(&error.to_string(), secrets.iter().map(String::as_str)), 1)),
    }
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        _ = terminate => info!("SIGTERM received"),
    }
    shutdown.cancel();
}

fn schema(args: &SchemaArgs) -> ExitCode {
    let schema = match args.of {
        SchemaOf::Pipeline => weir::plan::schema::pipeline(),
        SchemaOf::Settings => weir::plan::schema::settings(),
    };
    match serde_json::to_string_pretty(&schema) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("weir: {error}");
            ExitCode::FAILURE
        }
    }
}

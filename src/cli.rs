//! The command line: `tidewatch run | validate | graph`.
//!
//! [`main`] takes the registry, so an embedder that registered its own components gets the
//! same command line for them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tidewatch_engine::{GraphFormat, Metrics, Registry, RunContext, Severity};

/// tidewatch: stream processing for anomaly detection on IoT and edge telemetry.
#[derive(Debug, Parser)]
#[command(name = "tidewatch", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter (tracing's env-filter syntax); `RUST_LOG` overrides it.
    #[arg(long, default_value = "info", global = true)]
    pub log_level: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `tidewatch graph` output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphOutput {
    /// Mermaid flowchart.
    Mermaid,
    /// Graphviz dot.
    Dot,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline until its sources finish or SIGINT/SIGTERM (then drain and exit 0).
    Run {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Worker threads (default: the pipeline's `workers`).
        #[arg(long)]
        workers: Option<usize>,
        /// HTTP endpoint address (default: the pipeline's `http_address`); "" disables it.
        #[arg(long)]
        http_address: Option<String>,
    },
    /// Check pipeline files; print every error as path:line:col and exit non-zero on any.
    Validate {
        /// Pipeline files.
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
    },
    /// Print a pipeline's dataflow graph.
    Graph {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = GraphOutput::Mermaid)]
        format: GraphOutput,
    },
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Parses the process arguments and runs the command with `registry`.
pub fn main(registry: Registry) -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log_level);
    match execute(cli.command, &registry) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command.
pub fn execute(command: Command, registry: &Registry) -> anyhow::Result<ExitCode> {
    match command {
        Command::Validate { pipelines } => Ok(validate(&pipelines, registry)),
        Command::Graph { pipeline, format } => {
            let pipeline = match tidewatch_engine::load_file(&pipeline, registry) {
                Ok(pipeline) => pipeline,
                Err(errors) => {
                    eprintln!("{errors}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let format = match format {
                GraphOutput::Mermaid => GraphFormat::Mermaid,
                GraphOutput::Dot => GraphFormat::Dot,
            };
            print!("{}", tidewatch_engine::render_graph(&pipeline, format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { pipeline, workers, http_address } => {
            let pipeline = match tidewatch_engine::load_file(&pipeline, registry) {
                Ok(pipeline) => pipeline,
                Err(errors) => {
                    eprintln!("{errors}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            for warning in &pipeline.warnings {
                tracing::warn!("{warning}");
            }
            let workers = workers.unwrap_or(pipeline.settings.workers).max(1);
            let run = RunContext::new(Arc::new(Metrics::new()));
            let address = http_address.unwrap_or_else(|| pipeline.settings.http_address.clone());
            let _server = if address.is_empty() {
                None
            } else {
                let server = tidewatch_engine::serve(
                    &address,
                    Arc::clone(&run.metrics),
                    Arc::clone(&run.health),
                )
                .context("starting the HTTP endpoint")?;
                tracing::info!(address = %server.local_addr(), "serving /metrics, /healthz, /readyz");
                Some(server)
            };
            let stopper = run.clone();
            tidewatch_engine::signals::install(move || stopper.request_shutdown())
                .context("installing signal handlers")?;
            tracing::info!(pipeline = %pipeline.info.name, workers, components = pipeline.components.len(), "starting");
            let started = std::time::Instant::now();
            tidewatch_engine::run(&pipeline, workers, &run).context("running the pipeline")?;
            tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "pipeline finished");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn validate(paths: &[PathBuf], registry: &Registry) -> ExitCode {
    let mut failed = false;
    for path in paths {
        match tidewatch_engine::load_file(path, registry) {
            Ok(pipeline) => {
                for warning in &pipeline.warnings {
                    eprintln!("{warning}");
                }
                println!("{}: ok ({} components)", path.display(), pipeline.components.len());
            }
            Err(errors) => {
                failed |= errors
                    .diagnostics
                    .iter()
                    .any(|diagnostic| diagnostic.severity == Severity::Error);
                eprintln!("{errors}");
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

//! The command line: `tidewatch run | validate | graph | backtest | simulate`.
//!
//! [`main`] takes the registry, so an embedder that registered its own components gets the
//! same command line for them.

use std::path::{Path, PathBuf};
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

/// Backtest protocols.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// SKAB's leaderboard protocol.
    Skab,
    /// Train on one file and score another (--train / --test), or, with --data, every
    /// `<entity>_train` / `<entity>_test` pair of a folder, pooled.
    Split,
    /// The Numenta Anomaly Benchmark (--data holding data/ and labels/), scored by NAB's rules.
    Nab,
}

/// Backtest report formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// A table.
    Text,
    /// One JSON object.
    Json,
}

/// Loads a pipeline file of process `process` of its cluster (`${TIDEWATCH_PROCESS}`).
fn load_pipeline(
    path: &Path,
    registry: &tidewatch_engine::Registry,
    process: usize,
) -> Result<tidewatch_engine::Pipeline, tidewatch_engine::ValidationErrors> {
    tidewatch_engine::load_file_with(path, registry, tidewatch_engine::spec::process_env(process))
}

/// The options of `tidewatch run` that make a process one of a cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Processes in the cluster (each runs the same pipeline with the same --workers).
    #[arg(long, requires = "process")]
    pub processes: Option<usize>,
    /// This process's index, 0 .. --processes.
    #[arg(long, requires = "processes")]
    pub process: Option<usize>,
    /// host:port of every process, in index order, comma-separated (the same in every process).
    #[arg(long, value_delimiter = ',', conflicts_with = "hostfile")]
    pub peers: Vec<String>,
    /// A file with one host:port per line, in index order (instead of --peers).
    #[arg(long)]
    pub hostfile: Option<PathBuf>,
    /// How long start-up waits for the other processes, s.
    #[arg(long, default_value_t = 60)]
    pub connect_timeout_secs: u64,
}

impl ClusterArgs {
    /// The cluster these options describe; `None` for a single process.
    /// Without `--processes`, inside a Kubernetes StatefulSet: derived from the environment
    /// (see [`statefulset_cluster`]).
    pub fn cluster(&self) -> anyhow::Result<Option<tidewatch_engine::Cluster>> {
        let (Some(processes), Some(process)) = (self.processes, self.process) else {
            if !self.peers.is_empty() || self.hostfile.is_some() {
                anyhow::bail!("--peers and --hostfile need --processes and --process");
            }
            let vars = |name: &str| std::env::var(name).ok();
            return statefulset_cluster(vars, self.connect_timeout_secs);
        };
        let addresses: Vec<String> = match &self.hostfile {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading the hostfile {}", path.display()))?
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(str::to_owned)
                .collect(),
            None => self.peers.clone(),
        };
        if addresses.len() != processes {
            anyhow::bail!(
                "--processes {processes} but {} peer addresses: give one host:port per process",
                addresses.len()
            );
        }
        let cluster = tidewatch_engine::Cluster::new(
            process,
            addresses,
            std::time::Duration::from_secs(self.connect_timeout_secs),
        )?;
        Ok(Some(cluster))
    }
}

/// The cluster of a StatefulSet pod: `TIDEWATCH_PROCESSES` (the replicas; unset or 1: no
/// cluster), `TIDEWATCH_CLUSTER_SERVICE` (the headless Service, `name` or `name.namespace`),
/// `TIDEWATCH_CLUSTER_PORT` (default 7400) and `HOSTNAME` (`<statefulset>-<ordinal>`): this
/// process is the ordinal, and process `i` is `<statefulset>-<i>.<service>:<port>`.
pub fn statefulset_cluster(
    vars: impl Fn(&str) -> Option<String>,
    connect_timeout_secs: u64,
) -> anyhow::Result<Option<tidewatch_engine::Cluster>> {
    let Some(processes) = vars("TIDEWATCH_PROCESSES") else { return Ok(None) };
    let processes: usize = processes
        .trim()
        .parse()
        .with_context(|| format!("TIDEWATCH_PROCESSES={processes:?} is not a count"))?;
    if processes <= 1 {
        return Ok(None);
    }
    let service = vars("TIDEWATCH_CLUSTER_SERVICE")
        .context("TIDEWATCH_PROCESSES needs TIDEWATCH_CLUSTER_SERVICE (the headless Service)")?;
    let port = vars("TIDEWATCH_CLUSTER_PORT").unwrap_or_else(|| "7400".to_owned());
    let hostname =
        vars("HOSTNAME").context("TIDEWATCH_PROCESSES needs HOSTNAME (the pod's name)")?;
    let (statefulset, ordinal) = hostname
        .rsplit_once('-')
        .and_then(|(name, ordinal)| Some((name, ordinal.parse::<usize>().ok()?)))
        .with_context(|| format!("HOSTNAME={hostname:?} is not <statefulset>-<ordinal>"))?;
    let addresses = (0..processes).map(|i| format!("{statefulset}-{i}.{service}:{port}")).collect();
    Ok(Some(tidewatch_engine::Cluster::new(
        ordinal,
        addresses,
        std::time::Duration::from_secs(connect_timeout_secs),
    )?))
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
        /// Cluster options (several processes as one dataflow).
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Check pipeline files; print every error as path:line:col and exit non-zero on any.
    Validate {
        /// Pipeline files.
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
    },
    /// Run the `[[tests]]` of pipeline files (no sources, sinks or brokers); print each failed
    /// expectation as path:line:col and exit non-zero on any, or on a file without tests.
    Test {
        /// Pipeline files, or tests files beside them (`pipeline = "<file>"` and `[[tests]]`).
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
    },
    /// Replay labelled data through a model pipeline and report detection quality.
    Backtest {
        /// `skab` (SKAB's leaderboard protocol over --data), `split` (--train / --test, or a
        /// folder of `<entity>_train` / `<entity>_test` pairs as --data) or `nab` (NAB's corpus
        /// and scoring over --data).
        #[arg(long, value_enum)]
        protocol: Protocol,
        /// `skab`: the folder of labelled files (e.g. ../shared/data/skab/data). `split`: a
        /// folder of `<entity>_train.csv[.gz]` / `<entity>_test.csv[.gz]` pairs (e.g.
        /// ../shared/data/smd), one model per entity, test rows pooled. `nab`: NAB's folder
        /// (e.g. ../shared/data/nab, holding data/ and labels/combined_windows.json).
        #[arg(long, conflicts_with_all = ["train", "test"])]
        data: Option<PathBuf>,
        /// `skab`: rows of each file that train (the rest are scored).
        #[arg(long, default_value_t = 400)]
        train_rows: usize,
        /// `split`: the file to train on (rows labelled anomalous are left out).
        #[arg(long)]
        train: Option<PathBuf>,
        /// `split`: the file to score.
        #[arg(long)]
        test: Option<PathBuf>,
        /// The label column (1 = anomaly).
        #[arg(long, default_value = "anomaly")]
        label_column: String,
        /// The timestamp column.
        #[arg(long, default_value = "datetime")]
        timestamp_column: String,
        /// The field delimiter (`split`; SKAB files use `;`).
        #[arg(long, default_value = ";")]
        delimiter: char,
        /// Inference backend: auto, onnxruntime or tract.
        #[arg(long, default_value = "auto")]
        backend: String,
        /// Python interpreter for training/train.py (default: .venv/bin/python, else python3).
        #[arg(long)]
        python: Option<PathBuf>,
        /// Extra arguments for training/train.py (e.g. --trainer-arg=--family --trainer-arg=pca).
        #[arg(long = "trainer-arg", allow_hyphen_values = true)]
        trainer_args: Vec<String>,
        /// Keep models and outputs here (default: a temporary folder, removed afterwards).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Report format.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
        /// Skip the reference baseline (PCA over single readings, 5 components, 0.99 training
        /// quantile, no debounce) that otherwise runs on the same rows.
        #[arg(long)]
        no_baseline: bool,
    },
    /// Publish the simulated pump fleet (or replay a CSV file) to an MQTT broker or a Kafka
    /// topic.
    #[cfg(any(feature = "mqtt", feature = "kafka"))]
    Simulate(crate::simulate::SimulateArgs),
    /// The model registry in the lake's store: push, list, promote, sync.
    #[cfg(feature = "s3")]
    #[command(subcommand)]
    Model(ModelCommand),
    /// Print a pipeline's dataflow graph.
    Graph {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = GraphOutput::Mermaid)]
        format: GraphOutput,
    },
}

/// `tidewatch model ...`: the registry is a URL, `s3://bucket/prefix` (credentials and
/// endpoint from the `AWS_*` environment) or a folder.
#[cfg(feature = "s3")]
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Upload a model folder (`model.onnx`, `model.json`) as a new version (not promoted).
    Push {
        /// The registry, e.g. s3://tidewatch/models.
        registry: String,
        /// The model's name in the registry.
        name: String,
        /// The folder with model.onnx and model.json (the version is model.json's).
        dir: PathBuf,
        /// Promote the version right after pushing it.
        #[arg(long)]
        promote: bool,
    },
    /// List the models, or the versions of one (the active one marked `*`).
    List {
        /// The registry.
        registry: String,
        /// A model's name.
        name: Option<String>,
    },
    /// Make a version the active one: edge pipelines following the registry swap to it.
    Promote {
        /// The registry.
        registry: String,
        /// The model's name.
        name: String,
        /// The version.
        version: String,
    },
    /// Keep a local model folder at the active version (an `autoencoder` with `watch = true`
    /// on that folder swaps when it changes); with --once, copy once and exit.
    Sync {
        /// The registry.
        registry: String,
        /// The model's name.
        name: String,
        /// The local folder the autoencoder's `model` option names.
        dir: PathBuf,
        /// How often the active version is checked, ms.
        #[arg(long, default_value_t = 5000)]
        interval_ms: u64,
        /// Copy the active version once and exit.
        #[arg(long)]
        once: bool,
    },
}

#[cfg(feature = "s3")]
fn model_command(command: ModelCommand) -> anyhow::Result<ExitCode> {
    use tidewatch_connectors::lake::S3Config;
    use tidewatch_connectors::lake::registry::ModelRegistry;
    let open = |url: &str| {
        ModelRegistry::open(url, &S3Config::default())
            .with_context(|| format!("opening the model registry {url}"))
    };
    match command {
        ModelCommand::Push { registry, name, dir, promote } => {
            let registry = open(&registry)?;
            let version = registry.push(&name, &dir)?;
            println!("pushed {name} version {version}");
            if promote {
                registry.promote(&name, &version)?;
                println!("promoted {name} version {version}");
            }
        }
        ModelCommand::List { registry, name: None } => {
            for name in open(&registry)?.models()? {
                println!("{name}");
            }
        }
        ModelCommand::List { registry, name: Some(name) } => {
            for version in open(&registry)?.versions(&name)? {
                println!("{} {}", if version.active { "*" } else { " " }, version.version);
            }
        }
        ModelCommand::Promote { registry, name, version } => {
            open(&registry)?.promote(&name, &version)?;
            println!("promoted {name} version {version}");
        }
        ModelCommand::Sync { registry, name, dir, interval_ms, once } => {
            let registry = open(&registry)?;
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = Arc::clone(&stop);
            tidewatch_engine::signals::install(move || {
                flag.store(true, std::sync::atomic::Ordering::Relaxed)
            })
            .context("installing signal handlers")?;
            loop {
                match registry.sync_active(&name, &dir) {
                    Ok(Some(version)) => {
                        tracing::info!(model = %name, %version, dir = %dir.display(), "model synced")
                    }
                    Ok(None) => {}
                    Err(error) if once => return Err(error.into()),
                    Err(error) => {
                        tracing::warn!(model = %name, %error, "cannot sync the model; retrying")
                    }
                }
                if once {
                    break;
                }
                let deadline =
                    std::time::Instant::now() + std::time::Duration::from_millis(interval_ms);
                while std::time::Instant::now() < deadline {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return Ok(ExitCode::SUCCESS);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
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
    // A backtest runs hundreds of short pipelines, a test many short subgraphs: only warnings
    // unless asked for more.
    let level = match (&cli.command, cli.log_level.as_str()) {
        (Command::Backtest { .. } | Command::Test { .. }, "info") => "warn",
        (_, level) => level,
    };
    init_logging(cli.log_format, level);
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
        Command::Test { pipelines } => Ok(test(&pipelines, registry)),
        #[cfg(any(feature = "mqtt", feature = "kafka"))]
        Command::Simulate(args) => {
            crate::simulate::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backtest {
            protocol,
            data,
            train_rows,
            train,
            test,
            label_column,
            timestamp_column,
            delimiter,
            backend,
            python,
            trainer_args,
            work_dir,
            format,
            no_baseline,
        } => {
            let temporary;
            let work_dir = match work_dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    dir
                }
                None => {
                    temporary = tempdir()?;
                    temporary.0.clone()
                }
            };
            let root = std::env::current_dir().context("current directory")?;
            let mut settings = crate::backtest::Settings::for_checkout(&root, work_dir);
            if let Some(python) = python {
                settings.python = python;
            }
            settings.trainer_args = trainer_args;
            settings.backend = backend;
            settings.baseline = !no_baseline;
            let columns = crate::backtest::SplitColumns {
                label: &label_column,
                timestamp: &timestamp_column,
                delimiter,
            };
            let report = match (protocol, data) {
                (Protocol::Skab, data) => {
                    let data = data.context("--protocol skab needs --data DIR")?;
                    crate::backtest::skab(&data, train_rows, &settings)?
                }
                (Protocol::Nab, data) => {
                    let data = data.context("--protocol nab needs --data DIR")?;
                    crate::backtest::nab(&data, &settings)?
                }
                (Protocol::Split, Some(data)) => {
                    crate::backtest::split_folder(&data, columns, &settings)?
                }
                (Protocol::Split, None) => {
                    let train =
                        train.context("--protocol split needs --data DIR or --train FILE")?;
                    let test = test.context("--protocol split needs --test FILE")?;
                    crate::backtest::split(&train, &test, columns, &settings)?
                }
            };
            match format {
                ReportFormat::Json => println!("{}", serde_json::to_string(&report)?),
                ReportFormat::Text => print_report(&report),
            }
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "s3")]
        Command::Model(command) => model_command(command),
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
        Command::Run { pipeline, workers, http_address, cluster } => {
            let cluster = cluster.cluster()?;
            // `${TIDEWATCH_PROCESS}`: this process's index in its cluster (0 alone), for what
            // must differ per process, such as the paths of files on a shared volume.
            let process = cluster.as_ref().map_or(0, |cluster| cluster.process);
            let pipeline = match load_pipeline(&pipeline, registry, process) {
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
            let run = match cluster {
                Some(cluster) => {
                    tracing::info!(
                        process = cluster.process,
                        processes = cluster.processes(),
                        workers_per_process = workers,
                        "joining a cluster"
                    );
                    run.with_cluster(cluster)
                }
                None => run,
            };
            #[cfg(feature = "s3")]
            let run = match crate::checkpoint_store::for_pipeline(&pipeline)
                .context("opening the checkpoint store")?
            {
                Some(store) => run.with_checkpoint_store(store),
                None => run,
            };
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

/// `tidewatch test`: every test of every file (a pipeline file, or a tests file that names its
/// pipeline); a file that does not validate or has no tests fails.
fn test(paths: &[PathBuf], registry: &Registry) -> ExitCode {
    let mut failed = false;
    for path in paths {
        let (pipeline, tests) = match tidewatch_engine::testing::load_for_test(path, registry) {
            Ok(loaded) => loaded,
            Err(errors) => {
                eprintln!("{errors}");
                failed = true;
                continue;
            }
        };
        if tests.is_empty() {
            eprintln!("{}: error: no [[tests]] in this file", path.display());
            failed = true;
            continue;
        }
        let mut passed = 0;
        for test in &tests {
            let failures = tidewatch_engine::testing::run_test(&pipeline, test);
            if failures.is_empty() {
                passed += 1;
                continue;
            }
            failed = true;
            for failure in failures {
                eprintln!(
                    "{}:{}:{}: test `{}` failed: {}",
                    path.display(),
                    failure.line,
                    failure.column,
                    test.name,
                    failure.message
                );
            }
        }
        println!("{}: {passed} of {} tests passed", path.display(), tests.len());
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// A folder removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> anyhow::Result<TempDir> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir =
        std::env::temp_dir().join(format!("tidewatch-backtest-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(TempDir(dir))
}

fn print_report(outcome: &crate::backtest::Outcome) {
    let report = &outcome.report;
    println!("rows          {}", report.rows);
    println!("TP/FP/FN/TN   {}/{}/{}/{}", report.tp, report.fp, report.r#fn, report.tn);
    println!("precision     {:.4}", report.precision);
    println!("recall        {:.4}", report.recall);
    println!("F1            {:.4}", report.f1);
    println!("FAR %         {:.2}", report.far);
    println!("MAR %         {:.2}", report.mar);
    println!("NAB standard  {:.2}", report.nab_standard);
    println!("NAB low FP    {:.2}", report.nab_lowfp);
    println!("NAB low FN    {:.2}", report.nab_lowfn);
    println!(
        "changepoints  {} ({} detected, {} false)",
        report.changepoints, report.changepoints_detected, report.changepoints_false
    );
    if let Some(baseline) = &outcome.baseline {
        println!(
            "baseline      F1 {:.4}  precision {:.4}  recall {:.4}  (PCA, 5 components, W=1, \
             0.99 quantile, no debounce)",
            baseline.f1, baseline.precision, baseline.recall
        );
    }
    for model in &outcome.models {
        println!(
            "model {:<24} {} W={} threshold {} detection {}{}",
            model.entity,
            model.family.as_deref().unwrap_or("?"),
            model.window.map(|window| window.to_string()).unwrap_or_else(|| "?".into()),
            model.threshold,
            model.detection,
            if model.error_weights.is_null() {
                String::new()
            } else {
                format!(" error_weights {}", model.error_weights)
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(vars: &[(&str, &str)]) -> anyhow::Result<Option<tidewatch_engine::Cluster>> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())).collect();
        statefulset_cluster(|name| vars.get(name).cloned(), 60)
    }

    #[test]
    fn a_statefulset_pod_finds_its_peers() {
        let cluster = from(&[
            ("TIDEWATCH_PROCESSES", "3"),
            ("TIDEWATCH_CLUSTER_SERVICE", "tidewatch.cloud"),
            ("HOSTNAME", "tidewatch-cloud-2"),
        ])
        .expect("valid")
        .expect("a cluster");
        assert_eq!(cluster.process, 2);
        assert_eq!(
            cluster.addresses,
            vec![
                "tidewatch-cloud-0.tidewatch.cloud:7400",
                "tidewatch-cloud-1.tidewatch.cloud:7400",
                "tidewatch-cloud-2.tidewatch.cloud:7400",
            ]
        );
        assert!(from(&[]).expect("valid").is_none(), "no StatefulSet: one process");
        assert!(from(&[("TIDEWATCH_PROCESSES", "1")]).expect("valid").is_none());
        assert!(from(&[("TIDEWATCH_PROCESSES", "2"), ("HOSTNAME", "x-0")]).is_err());
        let bad = from(&[
            ("TIDEWATCH_PROCESSES", "2"),
            ("TIDEWATCH_CLUSTER_SERVICE", "s"),
            ("HOSTNAME", "no-ordinal"),
        ]);
        assert!(bad.is_err());
        let outside = from(&[
            ("TIDEWATCH_PROCESSES", "2"),
            ("TIDEWATCH_CLUSTER_SERVICE", "s"),
            ("HOSTNAME", "tw-5"),
        ]);
        assert!(outside.is_err(), "an ordinal beyond the replicas");
    }

    #[test]
    fn pipelines_see_their_process_index_as_tidewatch_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.toml");
        let text = "[pipeline]\nname = \"p${TIDEWATCH_PROCESS}\"\n\n[sources.in]\n\
                    type = \"simulator\"\n\n[sinks.out]\ntype = \"blackhole\"\ninputs = [\"in\"]\n";
        std::fs::write(&path, text).expect("pipeline file");
        let registry = crate::builtins();
        let names: Vec<String> = [0, 2]
            .into_iter()
            .map(|process| {
                load_pipeline(&path, &registry, process).expect("valid").info.name.clone()
            })
            .collect();
        assert_eq!(names, ["p0", "p2"]);
    }
}

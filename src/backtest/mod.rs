//! `tidewatch backtest`: replays labelled data through a tidewatch pipeline as fast as
//! possible and reports detection quality ([`metrics`]).
//!
//! Each labelled file is split into a training part and a test part. The model is trained on
//! the training part by `training/train.py` (the same trainer users run), then the **whole**
//! file streams through `file -> normalize -> window (count: the model's window length) ->
//! autoencoder -> threshold` (the training rows prime the first windows and the detection rule;
//! only test rows are pooled). A row's prediction is the debounced anomaly state of the window
//! of the last `length` readings that ends with it; the first `length - 1` rows are predicted
//! normal. Test rows of all files are pooled.
//!
//! - `skab`: every labelled CSV under the data folder; the first `train_rows` (400) rows train.
//! - `split`: one file trains (its rows labelled normal), another is scored whole; or a folder
//!   of `<entity>_train` / `<entity>_test` pairs (CSV or gzip-compressed CSV), one model per
//!   entity, all test rows pooled ([`split_folder`]).
//!
//! Every protocol also runs the reference baseline ([`BASELINE_TRAINER_ARGS`]: PCA over single
//! readings, 5 components, the 0.99 quantile of the training scores, no debounce) through the
//! same trainer and pipeline on the same rows, and reports it beside the model ([`Outcome`]).

pub mod metrics;
pub mod nab;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tidewatch_api::codec::{Delimiter, csv};
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ComponentFactory, Kind, Sink, SinkFactory,
};
use tidewatch_engine::RunContext;

pub use metrics::{Report, Series, evaluate};
pub use nab::nab;

/// Why a backtest could not run.
#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A data file is not in the expected shape.
    #[error("{path}: {message}")]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The trainer failed.
    #[error("training on {path} failed: {message}")]
    Training {
        /// The data file.
        path: PathBuf,
        /// The trainer's output.
        message: String,
    },
    /// The pipeline failed.
    #[error("pipeline on {path}: {message}")]
    Pipeline {
        /// The data file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BacktestError {
    let context = context.into();
    move |source| BacktestError::Io { context, source }
}

/// Whether `path` names a gzip-compressed file (`*.gz`).
fn is_gzip(path: &Path) -> bool {
    path.extension().and_then(|ext| ext.to_str()) == Some("gz")
}

/// Reads a text file whole; a `*.gz` file is decompressed.
pub fn read_text(path: &Path) -> Result<String, BacktestError> {
    let context = || format!("reading {}", path.display());
    if !is_gzip(path) {
        return std::fs::read_to_string(path).map_err(io(context()));
    }
    let file = std::fs::File::open(path).map_err(io(context()))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::MultiGzDecoder::new(file), &mut text)
        .map_err(io(context()))?;
    Ok(text)
}

/// `path` as a plain file the pipeline's `file` source can stream: a `*.gz` file is
/// decompressed into `dir` (under its name without `.gz`), any other file is used as it is.
pub fn plain_file(path: &Path, dir: &Path) -> Result<PathBuf, BacktestError> {
    if !is_gzip(path) {
        return Ok(path.to_path_buf());
    }
    let name = path.file_stem().ok_or_else(|| BacktestError::Data {
        path: path.to_path_buf(),
        message: "no file name".into(),
    })?;
    let out = dir.join(name);
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    std::fs::write(&out, read_text(path)?).map_err(io(format!("writing {}", out.display())))?;
    Ok(out)
}

/// A labelled CSV file, read whole.
#[derive(Clone, Debug)]
pub struct LabelledFile {
    /// The file.
    pub path: PathBuf,
    /// Its delimiter.
    pub delimiter: char,
    /// The timestamp column.
    pub timestamp_column: String,
    /// The feature columns (every other numeric column but the label and changepoint).
    pub features: Vec<String>,
    /// Row times, ms.
    pub times: Vec<i64>,
    /// Row labels.
    pub labels: Vec<bool>,
    /// Row changepoints (the `changepoint` column, or the label's edges).
    pub changepoints: Vec<bool>,
}

impl LabelledFile {
    /// Reads `path`; `label` names the label column, `timestamp` the time column.
    pub fn read(
        path: &Path,
        delimiter: char,
        label: &str,
        timestamp: &str,
    ) -> Result<LabelledFile, BacktestError> {
        LabelledFile::read_columns(path, delimiter, Some(label), timestamp)
    }

    /// Reads `path`, whose labels (all normal here) come from elsewhere (NAB's windows).
    pub fn read_unlabelled(
        path: &Path,
        delimiter: char,
        timestamp: &str,
    ) -> Result<LabelledFile, BacktestError> {
        LabelledFile::read_columns(path, delimiter, None, timestamp)
    }

    fn read_columns(
        path: &Path,
        delimiter: char,
        label: Option<&str>,
        timestamp: &str,
    ) -> Result<LabelledFile, BacktestError> {
        let text = read_text(path)?;
        let data_error =
            |message: String| BacktestError::Data { path: path.to_path_buf(), message };
        let codec_delimiter = Delimiter::new(delimiter).map_err(data_error)?;
        let mut lines = text.lines().filter(|line| !line.trim().is_empty());
        let header_line = lines.next().ok_or_else(|| data_error("empty file".into()))?;
        let header: Vec<String> = csv::header_names(header_line.as_bytes(), codec_delimiter)
            .map_err(|problem| data_error(format!("the header line: {problem}")))?
            .iter()
            .map(|name| name.to_string())
            .collect();
        let column = |name: &str| header.iter().position(|candidate| candidate == name);
        let time_index =
            column(timestamp).ok_or_else(|| data_error(format!("no `{timestamp}` column")))?;
        let label_index = match label {
            Some(label) => Some(
                column(label).ok_or_else(|| data_error(format!("no `{label}` label column")))?,
            ),
            None => None,
        };
        let changepoint_index = column("changepoint");
        let features: Vec<String> = header
            .iter()
            .enumerate()
            .filter(|(index, _)| {
                *index != time_index
                    && Some(*index) != label_index
                    && Some(*index) != changepoint_index
            })
            .map(|(_, name)| name.clone())
            .collect();
        let mut file = LabelledFile {
            path: path.to_path_buf(),
            delimiter,
            timestamp_column: timestamp.to_owned(),
            features,
            times: Vec::new(),
            labels: Vec::new(),
            changepoints: Vec::new(),
        };
        let mut fields: Vec<String> = Vec::new();
        for (number, line) in lines.enumerate() {
            fields.clear();
            csv::split_record(line.as_bytes(), codec_delimiter, |_, text| {
                fields.push(String::from_utf8_lossy(&text).into_owned());
                true
            })
            .map_err(|problem| data_error(format!("row {}: {problem}", number + 2)))?;
            let field = |index: usize| fields.get(index).map(|value| value.trim()).unwrap_or("");
            let time = tidewatch_api::parse_timestamp(
                field(time_index),
                tidewatch_api::TimestampFormat::Auto,
            )
            .map_err(|error| data_error(format!("row {}: {error}", number + 2)))?;
            let flag = |index: usize| {
                field(index).parse::<f64>().map(|value| value != 0.0).unwrap_or(false)
            };
            file.times.push(time);
            file.labels.push(label_index.is_some_and(flag));
            file.changepoints.push(changepoint_index.is_some_and(flag));
        }
        if changepoint_index.is_none() {
            let labels = &file.labels;
            file.changepoints = (0..labels.len())
                .map(|index| index > 0 && labels[index] != labels[index - 1])
                .collect();
        }
        Ok(file)
    }
}

/// How to train and detect.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The Python interpreter that runs `training/train.py`.
    pub python: PathBuf,
    /// `training/train.py`.
    pub trainer: PathBuf,
    /// Extra arguments for the trainer (family, window ...); its defaults otherwise.
    pub trainer_args: Vec<String>,
    /// Inference backend.
    pub backend: String,
    /// Changepoint window, ms (SKAB: 60 s).
    pub changepoint_window_ms: i64,
    /// Where models and outputs go.
    pub work_dir: PathBuf,
    /// Progress on stderr.
    pub progress: bool,
    /// Also run the reference baseline ([`BASELINE_TRAINER_ARGS`]) on the same rows.
    pub baseline: bool,
}

impl Settings {
    /// Defaults for a checkout at `root`: `.venv/bin/python` if present, else `python3`.
    pub fn for_checkout(root: &Path, work_dir: PathBuf) -> Settings {
        let venv = root.join(".venv/bin/python");
        Settings {
            python: if venv.is_file() { venv } else { PathBuf::from("python3") },
            trainer: root.join("training/train.py"),
            trainer_args: Vec::new(),
            backend: "auto".into(),
            changepoint_window_ms: 60_000,
            work_dir,
            progress: true,
            baseline: true,
        }
    }
}

/// The part of `model.json` the backtest reads.
#[derive(Debug, Deserialize)]
struct ModelInfo {
    features: Vec<String>,
    window: WindowInfo,
    #[serde(default)]
    detection: Option<DetectionInfo>,
}

#[derive(Debug, Deserialize)]
struct WindowInfo {
    length: usize,
}

#[derive(Debug, Deserialize)]
struct DetectionInfo {
    n: usize,
    m: usize,
    hysteresis: usize,
}

/// The trainer options of the reference baseline: PCA over single readings (window 1) with 5
/// components, the threshold at the 0.99 quantile of the training scores, no debounce, no
/// per-feature error weights.
pub const BASELINE_TRAINER_ARGS: &[&str] = &[
    "--family",
    "pca",
    "--window",
    "1",
    "--components",
    "5",
    "--threshold-method",
    "quantile",
    "--quantile",
    "0.99",
    "--factor",
    "1",
    "--error-weights",
    "none",
    "--n",
    "1",
    "--m",
    "1",
    "--hysteresis",
    "1",
];

/// Which model a run trains: the one `training/train.py` makes with its defaults and the
/// `--trainer-arg`s, or the reference baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The trainer's defaults and the user's trainer arguments.
    Model,
    /// [`BASELINE_TRAINER_ARGS`].
    Baseline,
}

impl Variant {
    fn trainer_args(self, settings: &Settings) -> Vec<String> {
        match self {
            Variant::Model => settings.trainer_args.clone(),
            Variant::Baseline => BASELINE_TRAINER_ARGS.iter().map(|arg| arg.to_string()).collect(),
        }
    }

    fn folder(self) -> &'static str {
        match self {
            Variant::Model => "model",
            Variant::Baseline => "baseline",
        }
    }
}

/// Trains a model on `train_rows` rows of `data` (all rows when `None`; rows labelled
/// anomalous are excluded by the trainer) into `out`.
pub fn train(
    settings: &Settings,
    variant: Variant,
    data: &Path,
    delimiter: char,
    train_rows: Option<usize>,
    label: &str,
    out: &Path,
) -> Result<(), BacktestError> {
    let mut command = Command::new(&settings.python);
    command
        .arg(&settings.trainer)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .arg("--delimiter")
        .arg(delimiter.to_string())
        .arg("--label-column")
        .arg(label)
        .args(variant.trainer_args(settings));
    if let Some(rows) = train_rows {
        command.arg("--train-rows").arg(rows.to_string());
    }
    let output = command.output().map_err(io(format!(
        "running {} {}",
        settings.python.display(),
        settings.trainer.display()
    )))?;
    if !output.status.success() {
        let mut message = String::from_utf8_lossy(&output.stderr).into_owned();
        if message.len() > 4000 {
            message = message[message.len() - 4000..].to_owned();
        }
        return Err(BacktestError::Training { path: data.to_path_buf(), message });
    }
    Ok(())
}

/// What a collecting sink keeps: `(device-less) window end -> debounced anomaly flag`.
type Collected = Arc<Mutex<HashMap<i64, bool>>>;

struct CollectFactory(Collected);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CollectConfig {}

struct CollectSink(Collected);

impl Sink for CollectSink {
    fn write_batch(&mut self, batch: Batch) -> Result<(), ComponentError> {
        if let Batch::Scores(scores) = batch {
            let mut collected =
                self.0.lock().map_err(|_| ComponentError::Internal("poisoned".into()))?;
            for score in scores {
                collected.insert(score.end_ms, score.anomaly);
            }
        }
        Ok(())
    }
}

impl SinkFactory for CollectFactory {
    type Config = CollectConfig;
    fn accepts(&self, _config: &CollectConfig) -> Vec<Kind> {
        vec![Kind::Scores]
    }
    fn build(
        &self,
        _config: &CollectConfig,
        _ctx: &ComponentContext,
    ) -> Result<Box<dyn Sink>, ComponentError> {
        Ok(Box::new(CollectSink(Arc::clone(&self.0))))
    }
}

/// `value` as a TOML string (a JSON string is a valid TOML basic string).
pub fn toml_string(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "\"\"".into())
}

/// What [`csv_windows_toml`] reads: a delimited file with a header line, as one device.
#[derive(Clone, Debug)]
pub struct CsvWindows<'a> {
    /// The pipeline's name.
    pub name: &'a str,
    /// The file.
    pub path: &'a Path,
    /// Its field delimiter.
    pub delimiter: char,
    /// The device id every reading gets.
    pub device: &'a str,
    /// The column of the event time, and how it is written (`auto`, `datetime` ...).
    pub timestamp: (&'a str, &'a str),
    /// The feature columns, in the model's order.
    pub features: &'a [String],
    /// `normalize`'s `on_missing` (`error`, `nan` ...).
    pub on_missing: &'a str,
    /// The count window: this many readings, sliding by one.
    pub length: usize,
}

/// The head of a pipeline that scores a labelled CSV file window by window: `[pipeline]`,
/// a `file` source `data`, `normalize` as `readings` and count windows as `windows` (the
/// model's length, sliding by one). Callers append the model, the detector and the sinks.
pub fn csv_windows_toml(spec: &CsvWindows<'_>) -> String {
    let features: Vec<String> = spec.features.iter().map(|name| toml_string(name)).collect();
    format!(
        r#"[pipeline]
name = {name}
out_of_orderness_ms = 0
http_address = ""

[sources.data]
type = "file"
path = {path}
header = true

[transforms.readings]
type = "normalize"
inputs = ["data"]
format = "csv"
delimiter = {delimiter}
device = {device}
timestamp_field = {timestamp}
timestamp_format = {timestamp_format}
features = [{features}]
on_missing = {on_missing}

[transforms.windows]
type = "window"
inputs = ["readings"]
size_readings = {length}
slide_readings = 1
"#,
        name = toml_string(spec.name),
        path = toml_string(&spec.path.display().to_string()),
        delimiter = toml_string(&spec.delimiter.to_string()),
        device = toml_string(spec.device),
        timestamp = toml_string(spec.timestamp.0),
        timestamp_format = toml_string(spec.timestamp.1),
        features = features.join(", "),
        on_missing = toml_string(spec.on_missing),
        length = spec.length,
    )
}

/// Streams `file` through a pipeline with the model at `model_dir`; returns the predicted
/// flag of every row.
pub fn predict(
    file: &LabelledFile,
    model_dir: &Path,
    settings: &Settings,
) -> Result<Vec<bool>, BacktestError> {
    let pipeline_error =
        |message: String| BacktestError::Pipeline { path: file.path.clone(), message };
    let json = std::fs::read_to_string(model_dir.join("model.json"))
        .map_err(io(format!("reading the model in {}", model_dir.display())))?;
    let model: ModelInfo = serde_json::from_str(&json)
        .map_err(|error| pipeline_error(format!("model.json: {error}")))?;
    let detection = model.detection.unwrap_or(DetectionInfo { n: 1, m: 1, hysteresis: 1 });
    let head = csv_windows_toml(&CsvWindows {
        name: "backtest",
        path: &file.path,
        delimiter: file.delimiter,
        device: "backtest",
        timestamp: (&file.timestamp_column, "auto"),
        features: &model.features,
        on_missing: "nan",
        length: model.window.length,
    });
    let text = format!(
        r#"{head}
[transforms.model]
type = "autoencoder"
inputs = ["windows"]
model = {model}
backend = {backend}
watch = false
max_batch_rows = 4096

[transforms.detect]
type = "threshold"
inputs = ["model"]
n = {n}
m = {m}
hysteresis = {hysteresis}
emit = "scores"

[sinks.collect]
type = "collect"
inputs = ["detect"]
"#,
        model = toml_string(&model_dir.display().to_string()),
        backend = toml_string(&settings.backend),
        n = detection.n,
        m = detection.m,
        hysteresis = detection.hysteresis,
    );
    // Kept beside the model, for a look at what ran (`--work-dir`).
    let _ = std::fs::write(model_dir.join("pipeline.toml"), &text);
    let collected: Collected = Arc::default();
    let registry = crate::builtins()
        .register("collect", ComponentFactory::sink(CollectFactory(Arc::clone(&collected))));
    let pipeline =
        tidewatch_engine::load_str(&text, "backtest.toml", &settings.work_dir, &registry, |_| None)
            .map_err(|errors| pipeline_error(errors.to_string()))?;
    tidewatch_engine::run(&pipeline, 1, &RunContext::default())
        .map_err(|error| pipeline_error(error.to_string()))?;
    let collected = collected.lock().map_err(|_| pipeline_error("results lost".into()))?;
    // A row's prediction: the window of the last `length` readings that ends with it (count
    // windows end 1 ms after their last reading).
    Ok(file.times.iter().map(|time| collected.get(&(time + 1)).copied().unwrap_or(false)).collect())
}

/// Labelled CSV files under `dir` (those with the label column), sorted.
pub fn labelled_files(
    dir: &Path,
    label: &str,
    delimiter: char,
) -> Result<Vec<PathBuf>, BacktestError> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        let entries =
            std::fs::read_dir(&folder).map_err(io(format!("listing {}", folder.display())))?;
        for entry in entries {
            let path = entry.map_err(io(format!("listing {}", folder.display())))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().and_then(|ext| ext.to_str()) == Some("csv") {
                let head = std::fs::read_to_string(&path)
                    .map_err(io(format!("reading {}", path.display())))?;
                let header = head.lines().next().unwrap_or("");
                let Ok(delimiter) = Delimiter::new(delimiter) else { continue };
                let names = csv::header_names(header.as_bytes(), delimiter).unwrap_or_default();
                if names.iter().any(|column| &**column == label) {
                    found.push(path);
                }
            }
        }
    }
    found.sort_by_key(|path| natural_key(path));
    Ok(found)
}

/// Sorts `valve1/10.csv` after `valve1/9.csv`.
fn natural_key(path: &Path) -> (String, u64, String) {
    let folder = path.parent().map(|parent| parent.display().to_string()).unwrap_or_default();
    let stem = path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default();
    (folder, stem.parse().unwrap_or(u64::MAX), stem)
}

fn progress(settings: &Settings, done: usize, total: usize, what: &str) {
    if !settings.progress {
        return;
    }
    let width = 30;
    let filled = (done * width).checked_div(total).unwrap_or(width);
    let mut stderr = std::io::stderr().lock();
    let _ = write!(
        stderr,
        "\r[{}{}] {done}/{total} {what:<40}",
        "#".repeat(filled),
        ".".repeat(width - filled)
    );
    if done == total {
        let _ = writeln!(stderr);
    }
    let _ = stderr.flush();
}

/// What a backtest reports: the model's metrics, the baseline's on the same rows, and what
/// the trainer chose for every model (from its `model.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Outcome {
    /// The model's metrics (the trainer's defaults and `--trainer-arg`s).
    #[serde(flatten)]
    pub report: Report,
    /// The baseline's F1 on the same rows (`null` when the baseline did not run).
    pub baseline_f1: Option<f64>,
    /// The baseline's precision.
    pub baseline_precision: Option<f64>,
    /// The baseline's recall.
    pub baseline_recall: Option<f64>,
    /// The baseline's full report.
    pub baseline: Option<Report>,
    /// What the trainer chose, per trained model.
    pub models: Vec<ModelSummary>,
}

/// The calibration of one trained model, as its `model.json` records it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ModelSummary {
    /// The entity (SKAB: the file, `split`: the `<entity>` of the pair).
    pub entity: String,
    /// `family`.
    pub family: Option<String>,
    /// `window.length`.
    pub window: Option<u64>,
    /// `threshold` (value and how it was chosen).
    pub threshold: serde_json::Value,
    /// `detection` (n, m, hysteresis, and how they were derived).
    pub detection: serde_json::Value,
    /// `error_weights` (per-feature error normalisation), when the model has them.
    pub error_weights: serde_json::Value,
}

impl ModelSummary {
    fn read(entity: &str, model_dir: &Path) -> Result<ModelSummary, BacktestError> {
        let path = model_dir.join("model.json");
        let text =
            std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|error| {
            BacktestError::Data { path: path.clone(), message: error.to_string() }
        })?;
        let weights = match &json["error_weights"] {
            // The per-feature weights themselves are long (they are in model.json): the method.
            serde_json::Value::Object(map) => serde_json::Value::Object(
                map.iter()
                    .filter(|(key, _)| key.as_str() != "weights")
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect(),
            ),
            other => other.clone(),
        };
        Ok(ModelSummary {
            entity: entity.to_owned(),
            family: json["family"].as_str().map(str::to_owned),
            window: json["window"]["length"].as_u64(),
            threshold: json["threshold"].clone(),
            detection: json["detection"].clone(),
            error_weights: weights,
        })
    }
}

/// The pooled series of the model and of the baseline, and the models' calibration.
#[derive(Debug, Default)]
struct Runs {
    model: Vec<Series>,
    baseline: Vec<Series>,
    models: Vec<ModelSummary>,
}

impl Runs {
    fn outcome(self, settings: &Settings) -> Outcome {
        let report = evaluate(&self.model, settings.changepoint_window_ms);
        let baseline =
            settings.baseline.then(|| evaluate(&self.baseline, settings.changepoint_window_ms));
        Outcome {
            report,
            baseline_f1: baseline.as_ref().map(|report| report.f1),
            baseline_precision: baseline.as_ref().map(|report| report.precision),
            baseline_recall: baseline.as_ref().map(|report| report.recall),
            baseline,
            models: self.models,
        }
    }
}

/// The predicted flags of every row of one file: the model's, and the baseline's when it ran.
#[derive(Debug, Default)]
struct Predictions {
    model: Vec<bool>,
    baseline: Option<Vec<bool>>,
}

/// One entity: trains the model (and the baseline) on `train` and scores the rows of `file`
/// from `first_test_row` on.
#[allow(clippy::too_many_arguments)]
fn run_entity(
    runs: &mut Runs,
    entity: &str,
    dir: &Path,
    train: (&Path, Option<usize>),
    file: &LabelledFile,
    first_test_row: usize,
    label: &str,
    settings: &Settings,
) -> Result<Predictions, BacktestError> {
    let mut predictions = Predictions::default();
    let variants: &[Variant] =
        if settings.baseline { &[Variant::Model, Variant::Baseline] } else { &[Variant::Model] };
    for variant in variants {
        let model_dir = dir.join(variant.folder());
        self::train(settings, *variant, train.0, file.delimiter, train.1, label, &model_dir)?;
        let predicted = predict(file, &model_dir, settings)?;
        let series = test_part(file, predicted.clone(), first_test_row);
        match variant {
            Variant::Model => {
                runs.models.push(ModelSummary::read(entity, &model_dir)?);
                runs.model.push(series);
                predictions.model = predicted;
            }
            Variant::Baseline => {
                runs.baseline.push(series);
                predictions.baseline = Some(predicted);
            }
        }
    }
    Ok(predictions)
}

/// The SKAB leaderboard protocol over every labelled file under `dir`.
pub fn skab(dir: &Path, train_rows: usize, settings: &Settings) -> Result<Outcome, BacktestError> {
    let dir = &absolute(dir)?;
    let files = labelled_files(dir, "anomaly", ';')?;
    if files.is_empty() {
        return Err(BacktestError::Data {
            path: dir.to_path_buf(),
            message: "no labelled CSV files (with an `anomaly` column)".into(),
        });
    }
    let mut runs = Runs::default();
    for (index, path) in files.iter().enumerate() {
        let name = path.strip_prefix(dir).unwrap_or(path).display().to_string();
        progress(settings, index, files.len(), &name);
        let file = LabelledFile::read(path, ';', "anomaly", "datetime")?;
        let entity_dir = settings.work_dir.join(format!("file-{index}"));
        let _ = run_entity(
            &mut runs,
            &name,
            &entity_dir,
            (path, Some(train_rows)),
            &file,
            train_rows,
            "anomaly",
            settings,
        )?;
    }
    progress(settings, files.len(), files.len(), "done");
    Ok(runs.outcome(settings))
}

fn absolute(path: &Path) -> Result<PathBuf, BacktestError> {
    std::fs::canonicalize(path).map_err(io(format!("finding {}", path.display())))
}

/// The rows from `first` on, with their predictions.
fn test_part(file: &LabelledFile, predicted: Vec<bool>, first: usize) -> Series {
    let first = first.min(file.times.len());
    Series {
        times: file.times[first..].to_vec(),
        labels: file.labels[first..].to_vec(),
        changepoints: file.changepoints[first..].to_vec(),
        predicted: predicted[first.min(predicted.len())..].to_vec(),
    }
}

/// How a `split` run reads its files.
#[derive(Clone, Copy, Debug)]
pub struct SplitColumns<'a> {
    /// The label column (1 = anomaly).
    pub label: &'a str,
    /// The timestamp column.
    pub timestamp: &'a str,
    /// The field delimiter.
    pub delimiter: char,
}

/// Trains on `train` (its rows labelled normal) and scores all of `test`.
pub fn split(
    train_path: &Path,
    test_path: &Path,
    columns: SplitColumns<'_>,
    settings: &Settings,
) -> Result<Outcome, BacktestError> {
    let pair = EntityPair {
        entity: test_path.display().to_string(),
        train: absolute(train_path)?,
        test: absolute(test_path)?,
    };
    let mut runs = Runs::default();
    progress(settings, 0, 1, &pair.entity);
    split_pair(&mut runs, &pair, &settings.work_dir, columns, settings)?;
    progress(settings, 1, 1, "done");
    Ok(runs.outcome(settings))
}

fn split_pair(
    runs: &mut Runs,
    pair: &EntityPair,
    dir: &Path,
    columns: SplitColumns<'_>,
    settings: &Settings,
) -> Result<(), BacktestError> {
    let test = plain_file(&pair.test, dir)?;
    let file = LabelledFile::read(&test, columns.delimiter, columns.label, columns.timestamp)?;
    run_entity(runs, &pair.entity, dir, (&pair.train, None), &file, 0, columns.label, settings)?;
    Ok(())
}

/// One entity of a `split` folder: `<entity>_train.csv[.gz]` and `<entity>_test.csv[.gz]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntityPair {
    /// The name before `_train` / `_test`.
    pub entity: String,
    /// Its training file.
    pub train: PathBuf,
    /// Its test file.
    pub test: PathBuf,
}

/// The `<entity>_train` / `<entity>_test` pairs in `dir` (CSV, `.csv.gz`), sorted by entity.
/// Other files (a licence, a README) are ignored; an entity with only one of the two is an
/// error.
pub fn entity_pairs(dir: &Path) -> Result<Vec<EntityPair>, BacktestError> {
    let mut train: HashMap<String, PathBuf> = HashMap::new();
    let mut test: HashMap<String, PathBuf> = HashMap::new();
    let entries = std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))?;
    for entry in entries {
        let path = entry.map_err(io(format!("listing {}", dir.display())))?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else { continue };
        let Some(stem) = name.strip_suffix(".csv.gz").or_else(|| name.strip_suffix(".csv")) else {
            continue;
        };
        if let Some(entity) = stem.strip_suffix("_train") {
            train.insert(entity.to_owned(), path.clone());
        } else if let Some(entity) = stem.strip_suffix("_test") {
            test.insert(entity.to_owned(), path.clone());
        }
    }
    let mut unpaired: Vec<String> = train
        .keys()
        .filter(|entity| !test.contains_key(*entity))
        .map(|entity| format!("{entity}_train without {entity}_test"))
        .chain(
            test.keys()
                .filter(|entity| !train.contains_key(*entity))
                .map(|entity| format!("{entity}_test without {entity}_train")),
        )
        .collect();
    if !unpaired.is_empty() {
        unpaired.sort();
        return Err(BacktestError::Data { path: dir.to_path_buf(), message: unpaired.join(", ") });
    }
    let mut pairs: Vec<EntityPair> = train
        .into_iter()
        .filter_map(|(entity, train)| {
            test.remove(&entity).map(|test| EntityPair { entity, train, test })
        })
        .collect();
    if pairs.is_empty() {
        return Err(BacktestError::Data {
            path: dir.to_path_buf(),
            message: "no <entity>_train.csv[.gz] / <entity>_test.csv[.gz] pairs".into(),
        });
    }
    pairs.sort_by(|a, b| a.entity.cmp(&b.entity));
    Ok(pairs)
}

/// The `split` protocol over a folder of entity pairs ([`entity_pairs`]): per entity, a model
/// (and the baseline) trained on all of its training file's normal rows scores all of its test
/// file; the test rows of every entity are pooled.
pub fn split_folder(
    dir: &Path,
    columns: SplitColumns<'_>,
    settings: &Settings,
) -> Result<Outcome, BacktestError> {
    let dir = &absolute(dir)?;
    let pairs = entity_pairs(dir)?;
    let mut runs = Runs::default();
    for (index, pair) in pairs.iter().enumerate() {
        progress(settings, index, pairs.len(), &pair.entity);
        let entity_dir = settings.work_dir.join(&pair.entity);
        split_pair(&mut runs, pair, &entity_dir, columns, settings)?;
    }
    progress(settings, pairs.len(), pairs.len(), "done");
    Ok(runs.outcome(settings))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn entity_pairs_are_found_sorted_and_other_files_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["b_train.csv.gz", "b_test.csv.gz", "a_train.csv", "a_test.csv", "LICENSE"] {
            std::fs::write(dir.path().join(name), "x").expect("write");
        }
        let pairs = entity_pairs(dir.path()).expect("pairs");
        let names: Vec<(&str, String, String)> = pairs
            .iter()
            .map(|pair| {
                let file = |path: &Path| {
                    path.file_name()
                        .map(|name| name.to_string_lossy().into_owned())
                        .unwrap_or_default()
                };
                (pair.entity.as_str(), file(&pair.train), file(&pair.test))
            })
            .collect();
        assert_eq!(
            names,
            [
                ("a", "a_train.csv".to_owned(), "a_test.csv".to_owned()),
                ("b", "b_train.csv.gz".to_owned(), "b_test.csv.gz".to_owned()),
            ]
        );
        std::fs::remove_file(dir.path().join("a_test.csv")).expect("remove");
        let error = entity_pairs(dir.path()).expect_err("a is unpaired");
        assert!(error.to_string().contains("a_train without a_test"), "{error}");
    }

    #[test]
    fn a_gzip_file_reads_as_its_text_and_streams_from_a_plain_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x_test.csv.gz");
        let text = "timestamp,v,label\n2024-01-01T00:00:00Z,1.5,0\n2024-01-01T00:01:00Z,2.5,1\n";
        let mut encoder = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).expect("create"),
            flate2::Compression::fast(),
        );
        encoder.write_all(text.as_bytes()).expect("write");
        encoder.finish().expect("finish");
        assert_eq!(read_text(&path).expect("read"), text);
        let plain = plain_file(&path, &dir.path().join("work")).expect("plain");
        assert_eq!(plain, dir.path().join("work/x_test.csv"));
        assert_eq!(std::fs::read_to_string(&plain).expect("read"), text);
        let file = LabelledFile::read(&path, ',', "label", "timestamp").expect("labelled");
        assert_eq!(file.labels, [false, true]);
        assert_eq!(file.features, ["v"]);
        assert_eq!(file.changepoints, [false, true]);
    }
}

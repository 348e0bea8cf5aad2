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
//! - `split`: one file trains (its rows labelled normal), another is scored whole.

pub mod metrics;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tidewatch_api::codec::{Delimiter, csv};
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ComponentFactory, Kind, Sink, SinkFactory,
};
use tidewatch_engine::RunContext;

pub use metrics::{Report, Series, evaluate};

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
        let text =
            std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
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
        let label_index =
            column(label).ok_or_else(|| data_error(format!("no `{label}` label column")))?;
        let changepoint_index = column("changepoint");
        let features: Vec<String> = header
            .iter()
            .enumerate()
            .filter(|(index, _)| {
                *index != time_index && *index != label_index && Some(*index) != changepoint_index
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
            file.labels.push(flag(label_index));
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

/// Trains a model on `train_rows` rows of `data` (all rows when `None`; rows labelled
/// anomalous are excluded by the trainer) into `out`.
pub fn train(
    settings: &Settings,
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
        .args(&settings.trainer_args);
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

/// The SKAB leaderboard protocol over every labelled file under `dir`.
pub fn skab(dir: &Path, train_rows: usize, settings: &Settings) -> Result<Report, BacktestError> {
    let dir = &absolute(dir)?;
    let files = labelled_files(dir, "anomaly", ';')?;
    if files.is_empty() {
        return Err(BacktestError::Data {
            path: dir.to_path_buf(),
            message: "no labelled CSV files (with an `anomaly` column)".into(),
        });
    }
    let mut series = Vec::with_capacity(files.len());
    for (index, path) in files.iter().enumerate() {
        let name = path.strip_prefix(dir).unwrap_or(path).display().to_string();
        progress(settings, index, files.len(), &name);
        let file = LabelledFile::read(path, ';', "anomaly", "datetime")?;
        let model_dir = settings.work_dir.join(format!("model-{index}"));
        train(settings, path, ';', Some(train_rows), "anomaly", &model_dir)?;
        let predicted = predict(&file, &model_dir, settings)?;
        series.push(test_part(&file, predicted, train_rows));
    }
    progress(settings, files.len(), files.len(), "done");
    Ok(evaluate(&series, settings.changepoint_window_ms))
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

/// Trains on `train` (its rows labelled normal) and scores all of `test`.
pub fn split(
    train_path: &Path,
    test_path: &Path,
    label: &str,
    timestamp: &str,
    delimiter: char,
    settings: &Settings,
) -> Result<Report, BacktestError> {
    let (train_path, test_path) = (&absolute(train_path)?, &absolute(test_path)?);
    progress(settings, 0, 2, "training");
    let model_dir = settings.work_dir.join("model");
    train(settings, train_path, delimiter, None, label, &model_dir)?;
    progress(settings, 1, 2, "scoring");
    let file = LabelledFile::read(test_path, delimiter, label, timestamp)?;
    let predicted = predict(&file, &model_dir, settings)?;
    progress(settings, 2, 2, "done");
    Ok(evaluate(&[test_part(&file, predicted, 0)], settings.changepoint_window_ms))
}

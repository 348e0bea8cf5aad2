//! Shared setup of the tidewatch benchmarks (`benches/benches/*.rs`).
//!
//! The benchmarks themselves live in `benches/`; this library holds what they share: the
//! criterion settings, the "real run or test run" switch, and the generation of their input
//! data (raw messages from the simulator, normalized readings, the end-to-end pipeline file;
//! for the inference benchmarks, synthetic SKAB-like readings, their windows, a CSV file of
//! them and the pipeline that scores it with a shipped model). Every input is generated before
//! timing starts, so a benchmark times only the operator it names.
//!
//! `cargo bench -p tidewatch-benches` runs the benchmarks; `cargo test --all-targets` runs
//! each once, on a debug build, with small inputs (see [`full_run`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, SamplingMode};
use tidewatch::backtest::{CsvWindows, csv_windows_toml, toml_string};
use tidewatch_api::codec::PayloadCodec;
use tidewatch_api::{
    Batch, ComponentContext, DeviceId, Outputs, RawBatch, ReadingBatch, Schema, Source, SourcePoll,
    TimestampFormat, Window,
};
use tidewatch_connectors::{SimulatorConfig, SimulatorFormat, SimulatorSource};
use tidewatch_engine::{Pipeline, RunContext, load_str};
use tidewatch_inference::{ModelSpec, find_onnxruntime, model_files};
use tidewatch_operators::{Normalize, NormalizeConfig, OnMissing};

/// Event time of the first simulated tick (2023-11-14T22:13:20Z): fixed, so runs are repeatable.
pub const START_MS: i64 = 1_700_000_000_000;

/// The simulated fleet size of every benchmark.
pub const DEVICES: usize = 1_000;

/// Messages per raw batch (the simulator's default `batch_size`).
pub const BATCH_SIZE: usize = 1_024;

/// The features of the simulator, in payload order.
pub const FEATURES: [&str; 5] = ["vibration", "current", "pressure", "temperature", "flow"];

/// The end-to-end pipeline, as run by `tidewatch run pipelines/bench.toml`.
pub const BENCH_TOML: &str = include_str!("../../pipelines/bench.toml");

/// True under `cargo bench` (criterion is passed `--bench`), false under `cargo test`, which
/// runs every benchmark once on a debug build (and under `cargo bench -- --test`, criterion's
/// own test mode): the benchmarks then use small inputs.
pub fn full_run() -> bool {
    let mut bench = false;
    let mut test = false;
    for arg in std::env::args() {
        bench |= arg == "--bench";
        test |= arg == "--test";
    }
    bench && !test
}

/// `full` under `cargo bench`, `quick` under `cargo test`.
pub fn sized(full: usize, quick: usize) -> usize {
    if full_run() { full } else { quick }
}

/// Criterion settings for the fast benchmarks (an iteration of 5 to 40 ms): 1 s warm-up, 3 s
/// measurement, 10 samples.
pub fn criterion_config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        .without_plots()
}

/// Criterion settings for benchmarks whose one iteration takes 0.2 to 0.5 s: 1 s warm-up,
/// 10 samples in 5 s (the least that fits 10 iterations of 0.4 s), to be used with
/// [`SLOW_SAMPLING`] (every sample runs the same number of iterations).
pub fn slow_criterion_config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(10)
        .without_plots()
}

/// The sampling mode of [`slow_criterion_config`]'s groups.
pub const SLOW_SAMPLING: SamplingMode = SamplingMode::Flat;

/// A simulator of [`DEVICES`] pumps emitting `count` readings in `format`, from [`START_MS`].
pub fn simulator_config(format: SimulatorFormat, count: usize) -> SimulatorConfig {
    SimulatorConfig {
        devices: DEVICES,
        seed: 1,
        interval_ms: 1_000,
        start_ms: Some(START_MS),
        count: Some(count as u64),
        batch_size: BATCH_SIZE,
        format,
        ..SimulatorConfig::default()
    }
}

/// Polls a simulator of `config` until it finishes; returns its raw batches.
///
/// # Panics
///
/// If the config is invalid or the simulator fails (a bug of the benchmark).
pub fn simulate(config: &SimulatorConfig) -> Vec<RawBatch> {
    let ctx = ComponentContext::for_test("fleet", "simulator");
    let mut source = SimulatorSource::new(config, &ctx).expect("valid simulator config");
    let mut out = Outputs::new("fleet");
    let mut batches = Vec::new();
    loop {
        let poll = source.poll(&mut out).expect("the simulator does not fail");
        batches.extend(out.take_main().into_iter().filter_map(|batch| match batch {
            Batch::Raw(raw) => Some(raw),
            _ => None,
        }));
        if poll == SourcePoll::Finished {
            return batches;
        }
    }
}

/// `count` simulated raw messages of [`DEVICES`] pumps in `format`, in batches of [`BATCH_SIZE`].
pub fn raw_batches(format: SimulatorFormat, count: usize) -> Vec<RawBatch> {
    simulate(&simulator_config(format, count))
}

/// The `normalize` options of `pipelines/bench.toml`: the simulator's fields, `unix_ms` times,
/// the payload format as the source tells it.
pub fn normalize_config() -> NormalizeConfig {
    NormalizeConfig {
        format: PayloadCodec::Auto,
        delimiter: None,
        columns: None,
        features: FEATURES.iter().map(|name| (*name).to_owned()).collect(),
        rename: Default::default(),
        device_field: Some("device".to_owned()),
        device: None,
        timestamp_field: "ts".to_owned(),
        timestamp_format: TimestampFormat::UnixMs,
        label_field: None,
        on_missing: OnMissing::Error,
    }
}

/// A `normalize` operator with [`normalize_config`].
///
/// # Panics
///
/// Never with [`normalize_config`].
pub fn normalizer() -> Normalize {
    Normalize::new(&normalize_config(), &ComponentContext::for_test("readings", "normalize"))
        .expect("valid normalize config")
}

/// `count` simulated readings of [`DEVICES`] pumps, normalized, in batches of [`BATCH_SIZE`].
///
/// # Panics
///
/// If normalizing rejects a simulated message (a bug).
pub fn reading_batches(count: usize) -> Vec<ReadingBatch> {
    let mut normalize = normalizer();
    let mut out = Outputs::new("readings");
    let mut readings = Vec::new();
    for raw in raw_batches(SimulatorFormat::Csv, count) {
        normalize.normalize_batch(&raw, &mut out);
        assert!(out.take_errors().is_empty(), "simulated messages normalize cleanly");
        readings.extend(out.take_main().into_iter().filter_map(|batch| match batch {
            Batch::Readings(readings) => Some(readings),
            _ => None,
        }));
    }
    readings
}

/// Number of readings (or messages) in `batches`.
pub fn total_len<T>(batches: &[T], len: impl Fn(&T) -> usize) -> u64 {
    batches.iter().map(len).sum::<usize>() as u64
}

/// `pipelines/bench.toml` with the simulator's `count` set to `count`.
///
/// # Panics
///
/// If the file no longer has exactly one `count = ...` line before its `[[tests]]` (whose
/// expectations have counts of their own).
pub fn bench_toml(count: usize) -> String {
    let mut replaced = 0;
    let mut in_tests = false;
    let lines: Vec<String> = BENCH_TOML
        .lines()
        .map(|line| {
            in_tests |= line.trim_start().starts_with("[[tests");
            let key = line.split('=').next().unwrap_or_default().trim();
            if !in_tests && key == "count" && line.contains('=') {
                replaced += 1;
                format!("count = {count}")
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert_eq!(replaced, 1, "pipelines/bench.toml must have one `count = ...` line");
    lines.join("\n") + "\n"
}

/// The end-to-end pipeline (`pipelines/bench.toml` with `count` readings), loaded and
/// validated with the built-in components.
///
/// # Panics
///
/// If the pipeline does not validate.
pub fn bench_pipeline(count: usize) -> Pipeline {
    bench_pipeline_with(count, "")
}

/// [`bench_pipeline`] with more `[pipeline]` options (TOML lines, e.g. checkpoints).
pub fn bench_pipeline_with(count: usize, settings: &str) -> Pipeline {
    let registry = tidewatch::builtins();
    let text = bench_toml(count).replacen("[pipeline]\n", &format!("[pipeline]\n{settings}\n"), 1);
    match load_str(&text, "bench.toml", Path::new("."), &registry, |_| None) {
        Ok(pipeline) => pipeline,
        Err(errors) => panic!("pipelines/bench.toml does not validate: {errors}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Inference: the shipped models, synthetic SKAB-like data, and the pipeline that scores it.

/// The shipped models the inference benchmarks run (folders of `models/`): `pump-ae` (pca,
/// 80 -> 17 -> 80 linear) and `pump-dense` (MLP 80 -> 16 tanh -> 80).
pub const MODELS: [&str; 2] = ["pump-ae", "pump-dense"];

/// The batch sizes (windows per inference call) of the inference benchmarks.
pub const INFERENCE_BATCHES: [usize; 3] = [1, 64, 1024];

/// The device name of the synthetic data.
pub const SKAB_DEVICE: &str = "pump-1";

/// The repository root (the workspace of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

/// `models/<name>` of the repository.
pub fn model_dir(name: &str) -> PathBuf {
    workspace_root().join("models").join(name)
}

/// `model.json` of `models/<name>`.
///
/// # Panics
///
/// If the shipped model's description is missing or invalid.
pub fn model_spec(name: &str) -> ModelSpec {
    let (json, _) = model_files(&model_dir(name));
    ModelSpec::read(&json).unwrap_or_else(|error| panic!("models/{name}: {error}"))
}

/// The ONNX Runtime library: where the engine looks ([`find_onnxruntime`]: `ORT_DYLIB_PATH`,
/// a `.venv` of the current folder or of an ancestor of the executable, `/usr/lib`), then the
/// `onnxruntime` wheel in the repository's `.venv` (which `scripts/python-env.sh` creates), for
/// a target folder outside the checkout. A non-empty `ORT_DYLIB_PATH` is final, as in the
/// engine: `ORT_DYLIB_PATH=/nonexistent` runs the benchmarks without ONNX Runtime.
pub fn onnxruntime_library() -> Option<PathBuf> {
    let explicit = std::env::var_os("ORT_DYLIB_PATH").is_some_and(|path| !path.is_empty());
    find_onnxruntime(None)
        .or_else(|| if explicit { None } else { venv_onnxruntime(&workspace_root().join(".venv")) })
}

fn venv_onnxruntime(venv: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|python| {
            std::fs::read_dir(python.path().join("site-packages/onnxruntime/capi")).ok()
        })
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libonnxruntime.so"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// A small deterministic generator (SplitMix64) for the synthetic readings.
#[derive(Debug)]
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal sample (Box-Muller).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// `rows` synthetic readings of one pump with the model's features, row after row
/// (`rows * features` values): each feature an AR(1) process (coefficient 0.9) around the
/// model's training mean with its training standard deviation, so the scaled inputs look like
/// the training data (values of order 1, a few windows above the threshold). Deterministic.
pub fn synthetic_readings(spec: &ModelSpec, rows: usize) -> Vec<f32> {
    let features = spec.features.len();
    let mut random = SplitMix(7);
    let mut state = vec![0f64; features];
    let innovation = (1.0f64 - 0.9 * 0.9).sqrt();
    let mut values = Vec::with_capacity(rows * features);
    for _ in 0..rows {
        for (column, level) in state.iter_mut().enumerate() {
            *level = 0.9 * *level + innovation * random.normal();
            values.push((spec.scaler.mean[column] + spec.scaler.std[column] * *level) as f32);
        }
    }
    values
}

/// Event time of synthetic row `row`: one reading a second from [`START_MS`].
pub fn row_time(row: usize) -> i64 {
    START_MS + row as i64 * 1_000
}

/// The count windows of `readings` (from [`synthetic_readings`]) as the `window` transform
/// makes them with `size_readings` = the model's W and `slide_readings = 1`: window `k` holds
/// rows `k .. k + W` and spans `[time of row k, time of row k + W - 1 + 1 ms)`. At most `count`.
pub fn count_windows(spec: &ModelSpec, readings: &[f32], count: usize) -> Vec<Window> {
    let features = spec.features.len();
    let length = spec.window.length;
    let rows = readings.len() / features;
    let schema = Arc::new(Schema::new(&spec.features));
    let device = DeviceId::intern(SKAB_DEVICE);
    (0..rows.saturating_sub(length - 1).min(count))
        .map(|first| Window {
            device,
            start_ms: row_time(first),
            end_ms: row_time(first + length - 1) + 1,
            schema: Arc::clone(&schema),
            times: (first..first + length).map(row_time).collect(),
            values: readings[first * features..(first + length) * features].to_vec(),
            label: 0,
        })
        .collect()
}

/// The model's input for `windows`: each window standardised with the model's scaler
/// (`(x - mean) * inv_std` in `f32`, as the `autoencoder` transform does) and flattened step
/// after step, one row of W·F values per window.
pub fn scaled_rows(spec: &ModelSpec, windows: &[Window]) -> Vec<f32> {
    let factors = spec.scaler.factors();
    let mut rows = Vec::with_capacity(windows.len() * spec.width());
    for window in windows {
        for step in window.values.chunks_exact(factors.len()) {
            rows.extend(step.iter().zip(&factors).map(|(value, (mean, inv))| (value - mean) * inv));
        }
    }
    rows
}

/// `"2023-11-14 22:13:20"` for a time in ms since the epoch (UTC; the `datetime` format).
pub fn datetime(ms: i64) -> String {
    let seconds = ms.div_euclid(1_000);
    let (days, day_seconds) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        day_seconds / 3_600,
        day_seconds / 60 % 60,
        day_seconds % 60
    )
}

/// Writes `readings` (from [`synthetic_readings`]) as a SKAB-style CSV file: `;`-separated, a
/// `datetime` column (one row a second from [`START_MS`]) and the model's features, with six
/// significant digits as in SKAB.
///
/// # Errors
///
/// If the file cannot be written.
pub fn write_skab_csv(path: &Path, spec: &ModelSpec, readings: &[f32]) -> std::io::Result<()> {
    let features = spec.features.len();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(file, "datetime;{}", spec.features.join(";"))?;
    for (row, values) in readings.chunks_exact(features).enumerate() {
        write!(file, "{}", datetime(row_time(row)))?;
        for value in values {
            let magnitude = f64::from(value.abs()).log10().floor();
            let decimals =
                if magnitude.is_finite() { (5.0 - magnitude).clamp(0.0, 7.0) } else { 6.0 };
            write!(file, ";{value:.0$}", decimals as usize)?;
        }
        writeln!(file)?;
    }
    file.flush()
}

/// The model stage of [`model_pipeline_toml`].
#[derive(Clone, Debug)]
pub struct ModelStage {
    /// The model folder.
    pub model: PathBuf,
    /// `tract` or `onnxruntime`.
    pub backend: &'static str,
    /// The ONNX Runtime library (`onnxruntime_library`), for `onnxruntime`.
    pub library: Option<PathBuf>,
}

/// The pipeline that scores a SKAB-style CSV file (from [`write_skab_csv`]) with a model:
/// `file` (as fast as possible) -> `normalize` (one device, `datetime` times) -> `window`
/// (count windows: `size_readings` = the model's W, `slide_readings = 1`) -> `autoencoder`
/// (`max_batch_rows = 1024`, no model watch) -> `blackhole`. Without `stage`, the windows go
/// to the `blackhole` unscored (what the engine costs without the model).
pub fn model_pipeline_toml(csv: &Path, spec: &ModelSpec, stage: Option<&ModelStage>) -> String {
    let mut text = csv_windows_toml(&CsvWindows {
        name: "inference-bench",
        path: csv,
        delimiter: ';',
        device: SKAB_DEVICE,
        timestamp: ("datetime", "datetime"),
        features: &spec.features,
        on_missing: "error",
        length: spec.window.length,
    });
    let scored = match stage {
        Some(stage) => {
            text += &format!(
                r#"
[transforms.model]
type = "autoencoder"
inputs = ["windows"]
model = {model}
backend = {backend}
max_batch_rows = 1024
watch = false
"#,
                model = toml_string(&stage.model.display().to_string()),
                backend = toml_string(stage.backend),
            );
            if let Some(library) = &stage.library {
                text += &format!(
                    "onnxruntime_library = {}\n",
                    toml_string(&library.display().to_string())
                );
            }
            "model"
        }
        None => "windows",
    };
    text += &format!("\n[sinks.sink]\ntype = \"blackhole\"\ninputs = [\"{scored}\"]\n");
    text
}

/// [`model_pipeline_toml`], loaded and validated with the built-in components.
///
/// # Panics
///
/// If the pipeline does not validate (a bug of the benchmark, or a missing model).
pub fn model_pipeline(csv: &Path, spec: &ModelSpec, stage: Option<&ModelStage>) -> Pipeline {
    let text = model_pipeline_toml(csv, spec, stage);
    let base = csv.parent().unwrap_or(Path::new("."));
    match load_str(&text, "inference-bench.toml", base, &tidewatch::builtins(), |_| None) {
        Ok(pipeline) => pipeline,
        Err(errors) => panic!("the inference pipeline does not validate: {errors}\n{text}"),
    }
}

/// What reached the `blackhole` of a [`model_pipeline`] run (scores, or windows without a
/// model), after checking that no stage reported an error.
///
/// # Panics
///
/// If `normalize`, `window` or `autoencoder` reported errors.
pub fn delivered(context: &RunContext) -> u64 {
    for stage in ["readings", "windows", "model"] {
        assert_eq!(context.metrics.errors(stage), 0, "`{stage}` reported errors");
    }
    context.metrics.received("sink", "blackhole")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_toml_gets_the_count() {
        let text = bench_toml(1_234);
        assert!(text.lines().any(|line| line == "count = 1234"));
        let pipeline = bench_pipeline(1_234);
        assert_eq!(pipeline.components.len(), 5);
    }

    #[test]
    fn inputs_have_the_requested_size() {
        let raw = raw_batches(SimulatorFormat::Json, 3_000);
        assert_eq!(total_len(&raw, RawBatch::len), 3_000);
        assert!(raw.iter().all(|batch| batch.len() <= BATCH_SIZE));
        let readings = reading_batches(3_000);
        assert_eq!(total_len(&readings, ReadingBatch::len), 3_000);
        assert_eq!(readings.first().and_then(|batch| batch.times.first()), Some(&START_MS));
    }

    #[test]
    fn datetimes_are_utc() {
        assert_eq!(datetime(START_MS), "2023-11-14 22:13:20");
        assert_eq!(datetime(0), "1970-01-01 00:00:00");
        assert_eq!(datetime(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(datetime(1_583_748_873_000), "2020-03-09 10:14:33");
    }

    #[test]
    fn synthetic_data_fits_the_model() {
        let spec = model_spec("pump-ae");
        let readings = synthetic_readings(&spec, 40);
        assert_eq!(readings.len(), 40 * 8);
        let windows = count_windows(&spec, &readings, usize::MAX);
        assert_eq!(windows.len(), 31);
        assert_eq!(windows[1].times.first(), Some(&row_time(1)));
        assert_eq!(windows[1].end_ms, row_time(10) + 1);
        let rows = scaled_rows(&spec, &windows);
        assert_eq!(rows.len(), 31 * 80);
        assert!(rows.iter().all(|z| z.abs() < 10.0));
        let dir = tempfile::tempdir().expect("a temp dir");
        let csv = dir.path().join("skab.csv");
        write_skab_csv(&csv, &spec, &readings).expect("written");
        let text = std::fs::read_to_string(&csv).expect("read back");
        assert_eq!(text.lines().count(), 41);
        assert!(text.starts_with("datetime;Accelerometer1RMS;"));
        let pipeline = model_pipeline(&csv, &spec, None);
        assert_eq!(pipeline.components.len(), 4);
    }
}

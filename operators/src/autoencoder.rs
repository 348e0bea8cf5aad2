//! `autoencoder`: scores windows by the reconstruction error of an ONNX model.
//!
//! Each window of `length` steps (the model's `window.length`; longer windows use their last
//! `length` steps, shorter ones are discarded as `short_window`) is standardised with the
//! model's scaler, flattened step after step, reconstructed by the model, and scored:
//!
//! - `score` = mean over steps and features of `(x - x̂)²` (the reconstruction MSE);
//! - `values[j]` = mean over steps of `(x_j - x̂_j)²`: which sensor explains the score;
//! - `anomaly` = `score > threshold` (the model's calibrated threshold, or the `threshold`
//!   option).
//!
//! Windows are scored in batches across devices (up to `max_batch_rows`, flushed on every
//! watermark and after `max_wait_ms`), so inference runs on large batches. With `watch`, the
//! operator checks `model.json` between batches and swaps to a new version without losing or
//! double-scoring a window; `shadow_model` scores every window with a candidate model too and
//! reports it beside the active score (`shadow_score`, `shadow_threshold`) without flagging on
//! it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, EventTime, Kind, Outputs, PortType,
    Schema, Score, Transform, TransformFactory, TransformProperties, ValidateContext, Window,
    resolve_path,
};
use tidewatch_inference::{BackendKind, Model, ModelSpec, find_onnxruntime, model_files};

/// Options of the `autoencoder` transform.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AutoencoderConfig {
    /// The model: a directory with `model.onnx` and `model.json`, or either file. Relative
    /// paths resolve against the pipeline file's folder. Required.
    pub model: String,
    /// `auto` (ONNX Runtime when its library is found, else tract), `onnxruntime` or `tract`.
    /// Default `auto`.
    #[serde(default)]
    pub backend: BackendKind,
    /// Path of `libonnxruntime.so`; default: `ORT_DYLIB_PATH`, then the `onnxruntime` wheel in
    /// `.venv`, then `/usr/lib`, `/usr/local/lib`.
    #[serde(default)]
    pub onnxruntime_library: Option<String>,
    /// Most windows per inference call. Default 1024.
    #[serde(default = "default_max_batch_rows")]
    pub max_batch_rows: usize,
    /// Longest time a window waits for its batch to fill, ms (batches are also flushed on
    /// every watermark). Default 100.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// Overrides the model's calibrated threshold.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Swap to a new model version when `model.json` changes. Default true.
    #[serde(default = "default_true")]
    pub watch: bool,
    /// How often `model.json` is checked, ms. Default 1000.
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
    /// A candidate model scored beside the active one (reported, never flagged).
    #[serde(default)]
    pub shadow_model: Option<String>,
    /// Follow a model registry: `model` (a folder) is kept at the registry's active version of
    /// a model, and `watch` swaps it in when the pointer moves. Needs the registry support of
    /// `tidewatch::builtins()` (feature `s3`).
    #[serde(default)]
    pub registry: Option<RegistryFollow>,
}

/// The `registry` table of the `autoencoder`: which registry and model to follow.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryFollow {
    /// The registry: `s3://bucket/prefix` or a folder (relative to the pipeline file).
    pub url: String,
    /// The model's name in the registry.
    pub name: String,
    /// How often the active-version pointer is read, ms. Default 5000.
    #[serde(default = "default_registry_interval_ms")]
    pub interval_ms: u64,
    /// S3 options (endpoint, region, credentials file ...), as for the `parquet` sink;
    /// default: the `AWS_*` environment.
    #[serde(default)]
    pub s3: Option<serde_json::Value>,
}

fn default_registry_interval_ms() -> u64 {
    5000
}

fn default_max_batch_rows() -> usize {
    1024
}
fn default_max_wait_ms() -> u64 {
    100
}
fn default_true() -> bool {
    true
}
fn default_reload_interval_ms() -> u64 {
    1000
}

fn read_spec(location: &Path, field: &str) -> Result<ModelSpec, ConfigError> {
    let (json, onnx) = model_files(location);
    let spec = ModelSpec::read(&json).map_err(|error| {
        ConfigError::at_field(field, error.to_string())
            .with_hint("train one with training/train.py, which writes model.onnx and model.json")
    })?;
    if !onnx.is_file() {
        return Err(ConfigError::at_field(field, format!("no model file {}", onnx.display())));
    }
    Ok(spec)
}

/// Makes `autoencoder` transforms.
#[derive(Clone, Copy, Debug, Default)]
pub struct AutoencoderFactory;

impl TransformFactory for AutoencoderFactory {
    type Config = AutoencoderConfig;

    fn accepts(&self, _config: &AutoencoderConfig) -> Vec<Kind> {
        vec![Kind::Windows]
    }

    fn validate(
        &self,
        config: &AutoencoderConfig,
        ctx: &ValidateContext,
    ) -> Result<(), ConfigError> {
        if config.registry.is_some() {
            return Err(ConfigError::at_field(
                "registry",
                "this build's `autoencoder` cannot follow a model registry: `registry` needs \
                 `tidewatch::builtins()` built with the `s3` feature",
            ));
        }
        if config.max_batch_rows == 0 {
            return Err(ConfigError::at_field(
                "max_batch_rows",
                "`max_batch_rows` must be at least 1",
            ));
        }
        if !config.backend.compiled_in() {
            return Err(ConfigError::at_field("backend", config.backend.missing_message())
                .with_hint(
                    "rebuild with the backend's cargo feature, or choose one this build has",
                ));
        }
        let base = &ctx.pipeline.base_dir;
        let spec = read_spec(&resolve_path(base, &config.model), "model")?;
        if let Some(shadow) = &config.shadow_model {
            let candidate = read_spec(&resolve_path(base, shadow), "shadow_model")?;
            if candidate.features != spec.features || candidate.window.length != spec.window.length
            {
                return Err(ConfigError::at_field(
                    "shadow_model",
                    "the shadow model's features or window length differ from the active model's",
                ));
            }
        }
        if config.backend == BackendKind::Onnxruntime
            && find_onnxruntime(
                config
                    .onnxruntime_library
                    .as_deref()
                    .map(|path| resolve_path(base, path))
                    .as_deref(),
            )
            .is_none()
        {
            return Err(ConfigError::at_field("backend", "backend = \"onnxruntime\" but no ONNX Runtime library was found")
                .with_hint("set ORT_DYLIB_PATH or `onnxruntime_library`, `pip install onnxruntime` into .venv, or use backend = \"auto\" or \"tract\""));
        }
        Ok(())
    }

    fn output_type(
        &self,
        config: &AutoencoderConfig,
        input: &PortType,
        ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        self.validate(config, ctx)?;
        let spec = read_spec(&resolve_path(&ctx.pipeline.base_dir, &config.model), "model")?;
        if let Some(schema) = &input.schema {
            let pipeline: Vec<&str> = schema.names().iter().map(|name| &**name).collect();
            if pipeline != spec.features.iter().map(String::as_str).collect::<Vec<_>>() {
                return Err(ConfigError::at_field(
                    "model",
                    format!(
                        "the model's features {:?} do not match the pipeline's {:?}",
                        spec.features, pipeline
                    ),
                )
                .with_hint(
                    "make `normalize`'s `features` list the model's features, in the same order",
                ));
            }
        }
        Ok(PortType::with_schema(
            Kind::Scores,
            Arc::new(score_columns(&spec, config.shadow_model.is_some())),
        ))
    }

    fn properties(&self, _config: &AutoencoderConfig) -> TransformProperties {
        TransformProperties::default()
    }

    fn build(
        &self,
        config: &AutoencoderConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Transform>, ComponentError> {
        Ok(Box::new(Autoencoder::new(config, ctx)?))
    }
}

/// Columns of the scores: per-feature error, then the shadow model's score and threshold.
pub fn score_columns(spec: &ModelSpec, shadow: bool) -> Schema {
    let mut names: Vec<String> = spec.features.clone();
    if shadow {
        names.push("shadow_score".into());
        names.push("shadow_threshold".into());
    }
    Schema::new(names)
}

/// A loaded model with what scoring needs precomputed.
#[derive(Debug)]
pub struct Scorer {
    model: Model,
    scaler: Vec<(f32, f32)>,
    threshold: f64,
    name: Arc<str>,
    version: Arc<str>,
    input: Vec<f32>,
    output: Vec<f32>,
}

/// One window's result.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowScore {
    /// Reconstruction MSE.
    pub score: f64,
    /// Per-feature mean squared error.
    pub per_feature: Vec<f32>,
}

impl Scorer {
    /// Loads the model at `location` with `backend`.
    pub fn load(
        location: &Path,
        backend: BackendKind,
        library: Option<&Path>,
        threshold: Option<f64>,
    ) -> Result<Scorer, ComponentError> {
        let model = Model::load(location, backend, library)
            .map_err(|error| ComponentError::Config(error.to_string()))?;
        Ok(Scorer::from_model(model, threshold))
    }

    /// Wraps a loaded model.
    pub fn from_model(model: Model, threshold: Option<f64>) -> Scorer {
        let scaler = model.spec.scaler.factors();
        Scorer {
            threshold: threshold.unwrap_or(model.spec.threshold.value),
            name: Arc::from(model.spec.name.as_str()),
            version: Arc::from(model.spec.version.as_str()),
            scaler,
            model,
            input: Vec::new(),
            output: Vec::new(),
        }
    }

    /// The model description.
    pub fn spec(&self) -> &ModelSpec {
        &self.model.spec
    }

    /// The threshold in use.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.model.backend()
    }

    /// Steps per window.
    pub fn length(&self) -> usize {
        self.model.spec.window.length
    }

    /// Scores windows (each must have at least `length()` steps; the last `length()` are
    /// used). Standardises with the scaler (a missing value becomes the feature's mean).
    pub fn score(&mut self, windows: &[&Window]) -> Result<Vec<WindowScore>, ComponentError> {
        let length = self.length();
        let features = self.scaler.len();
        let width = length * features;
        // Standardise into one reused buffer, a step (row of `features`) at a time.
        self.input.clear();
        self.input.resize(windows.len() * width, 0.0);
        for (window, row) in windows.iter().zip(self.input.chunks_exact_mut(width.max(1))) {
            let skip = window.steps().saturating_sub(length);
            let source =
                window.values.get(skip * features..(skip + length) * features).unwrap_or(&[]);
            if source.len() == width {
                for (values, target) in
                    source.chunks_exact(features).zip(row.chunks_exact_mut(features))
                {
                    for ((value, (mean, inverse_std)), slot) in
                        values.iter().zip(&self.scaler).zip(target)
                    {
                        let scaled = (value - mean) * inverse_std;
                        *slot = if scaled.is_finite() { scaled } else { 0.0 };
                    }
                }
            }
        }
        self.model
            .reconstruct(&self.input, &mut self.output)
            .map_err(|error| ComponentError::External(error.to_string()))?;
        if self.output.len() != self.input.len() {
            return Err(ComponentError::External(format!(
                "the model returned {} values for {} inputs",
                self.output.len(),
                self.input.len()
            )));
        }
        // Squared errors summed in f64, per feature (no division per value).
        let mut scores = Vec::with_capacity(windows.len());
        let mut sums = vec![0f64; features];
        for (row, reconstructed) in
            self.input.chunks_exact(width.max(1)).zip(self.output.chunks_exact(width.max(1)))
        {
            sums.iter_mut().for_each(|sum| *sum = 0.0);
            for (step, step_out) in
                row.chunks_exact(features).zip(reconstructed.chunks_exact(features))
            {
                for ((sum, x), y) in sums.iter_mut().zip(step).zip(step_out) {
                    let error = f64::from(*x) - f64::from(*y);
                    *sum += error * error;
                }
            }
            let total: f64 = sums.iter().sum();
            scores.push(WindowScore {
                score: total / width as f64,
                per_feature: sums.iter().map(|sum| (sum / length as f64) as f32).collect(),
            });
        }
        Ok(scores)
    }
}

struct Watch {
    json: PathBuf,
    modified: Option<SystemTime>,
    last_check: Instant,
    interval: Duration,
}

impl Watch {
    fn modified(path: &Path) -> Option<SystemTime> {
        std::fs::metadata(path).and_then(|meta| meta.modified()).ok()
    }

    /// True when `model.json` changed since the last look (checked at most every interval).
    fn changed(&mut self) -> bool {
        if self.last_check.elapsed() < self.interval {
            return false;
        }
        self.last_check = Instant::now();
        let modified = Watch::modified(&self.json);
        if modified.is_some() && modified != self.modified {
            self.modified = modified;
            return true;
        }
        false
    }
}

/// The `autoencoder` operator.
pub struct Autoencoder {
    scorer: Scorer,
    shadow: Option<Scorer>,
    location: PathBuf,
    backend: BackendKind,
    library: Option<PathBuf>,
    threshold: Option<f64>,
    watch: Option<Watch>,
    columns: Arc<Schema>,
    max_batch_rows: usize,
    max_wait: Duration,
    pending: Vec<Window>,
    oldest: Option<Instant>,
    detector: Arc<str>,
}

impl std::fmt::Debug for Autoencoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Autoencoder")
            .field("scorer", &self.scorer)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Autoencoder {
    /// Loads the model(s) for one worker.
    pub fn new(
        config: &AutoencoderConfig,
        ctx: &ComponentContext,
    ) -> Result<Autoencoder, ComponentError> {
        let location = ctx.resolve_path(&config.model);
        let library = config.onnxruntime_library.as_deref().map(|path| ctx.resolve_path(path));
        let scorer = Scorer::load(&location, config.backend, library.as_deref(), config.threshold)?;
        let shadow = match &config.shadow_model {
            Some(path) => Some(Scorer::load(
                &ctx.resolve_path(path),
                config.backend,
                library.as_deref(),
                None,
            )?),
            None => None,
        };
        let watch = config.watch.then(|| {
            let (json, _) = model_files(&location);
            Watch {
                modified: Watch::modified(&json),
                json,
                last_check: Instant::now(),
                interval: Duration::from_millis(config.reload_interval_ms),
            }
        });
        tracing::info!(
            component = %ctx.component_id,
            model = %scorer.spec().name,
            version = %scorer.spec().version,
            backend = scorer.backend(),
            "model loaded"
        );
        Ok(Autoencoder {
            columns: Arc::new(score_columns(scorer.spec(), shadow.is_some())),
            scorer,
            shadow,
            location,
            backend: config.backend,
            library,
            threshold: config.threshold,
            watch,
            max_batch_rows: config.max_batch_rows.max(1),
            max_wait: Duration::from_millis(config.max_wait_ms),
            pending: Vec::new(),
            oldest: None,
            detector: Arc::clone(&ctx.component_id),
        })
    }

    /// The version of the active model.
    pub fn version(&self) -> &str {
        &self.scorer.spec().version
    }

    fn maybe_reload(&mut self, out: &mut Outputs) {
        let Some(watch) = self.watch.as_mut() else { return };
        if !watch.changed() {
            return;
        }
        match Scorer::load(&self.location, self.backend, self.library.as_deref(), self.threshold) {
            Ok(next) if next.spec().version != self.scorer.spec().version => {
                if next.spec().features != self.scorer.spec().features {
                    out.error(
                        "model_reload",
                        format!(
                            "model version {} has different features; keeping {}",
                            next.spec().version,
                            self.scorer.spec().version
                        ),
                        None,
                        None,
                    );
                    return;
                }
                tracing::info!(component = %self.detector, from = %self.scorer.spec().version, to = %next.spec().version, "model swapped");
                self.scorer = next;
            }
            Ok(_) => {}
            Err(error) => {
                // A model being written is often half there: try again at the next check.
                if let Some(watch) = self.watch.as_mut() {
                    watch.modified = None;
                }
                out.error(
                    "model_reload",
                    format!("cannot load the new model: {error}"),
                    None,
                    None,
                );
            }
        }
    }

    fn flush(&mut self, out: &mut Outputs) {
        if self.pending.is_empty() {
            return;
        }
        self.maybe_reload(out);
        let length = self.scorer.length();
        let windows = std::mem::take(&mut self.pending);
        self.oldest = None;
        let (long_enough, short): (Vec<&Window>, Vec<&Window>) =
            windows.iter().partition(|window| window.steps() >= length);
        out.discard("short_window", short.len() as u64);
        if long_enough.is_empty() {
            return;
        }
        let scores = match self.scorer.score(&long_enough) {
            Ok(scores) => scores,
            Err(error) => {
                for window in &long_enough {
                    out.error(
                        "inference",
                        format!("window of {} at {}: {error}", window.device, window.start_ms),
                        None,
                        None,
                    );
                }
                return;
            }
        };
        let shadow_scores = match self.shadow.as_mut().map(|shadow| shadow.score(&long_enough)) {
            Some(Ok(scores)) => Some(scores),
            Some(Err(error)) => {
                out.error("shadow_inference", error.to_string(), None, None);
                None
            }
            None => None,
        };
        let threshold = self.scorer.threshold();
        let shadow_threshold = self.shadow.as_ref().map(Scorer::threshold);
        let name = Arc::clone(&self.scorer.name);
        let version = Arc::clone(&self.scorer.version);
        let mut results = Vec::with_capacity(long_enough.len());
        for (index, (window, scored)) in long_enough.iter().zip(scores).enumerate() {
            let mut values = scored.per_feature;
            if self.shadow.is_some() {
                let shadow = shadow_scores
                    .as_ref()
                    .and_then(|scores| scores.get(index))
                    .map_or(f32::NAN, |s| s.score as f32);
                values.push(shadow);
                values.push(shadow_threshold.map_or(f32::NAN, |t| t as f32));
            }
            results.push(Score {
                device: window.device,
                start_ms: window.start_ms,
                end_ms: window.end_ms,
                detector: Arc::clone(&name),
                version: Arc::clone(&version),
                score: scored.score as f32,
                threshold: Some(threshold as f32),
                anomaly: scored.score > threshold,
                label: window.label,
                columns: Arc::clone(&self.columns),
                values,
                labels: Default::default(),
            });
        }
        out.emit(Batch::Scores(results));
    }
}

impl Transform for Autoencoder {
    fn process_batch(&mut self, batch: Batch, out: &mut Outputs) {
        let Batch::Windows(windows) = batch else {
            out.error(
                "unsupported_kind",
                format!("autoencoder reads windows, not {}", batch.kind()),
                None,
                None,
            );
            return;
        };
        if self.oldest.is_none() && !windows.is_empty() {
            self.oldest = Some(Instant::now());
        }
        for window in windows {
            self.pending.push(window);
            if self.pending.len() >= self.max_batch_rows {
                self.flush(out);
            }
        }
        if self.oldest.is_some_and(|oldest| oldest.elapsed() >= self.max_wait) {
            self.flush(out);
        }
    }

    fn on_watermark(&mut self, _watermark_ms: EventTime, out: &mut Outputs) {
        self.flush(out);
    }

    fn close(&mut self, out: &mut Outputs) {
        self.flush(out);
    }
}

//! `model.json`: what the engine needs to know about a model besides its graph.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::InferenceError;

/// The window the model reads: `length` consecutive readings, a new window every `step`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowSpec {
    /// Readings per window.
    pub length: usize,
    /// Readings between the starts of two windows.
    #[serde(default = "one")]
    pub step: usize,
}

fn one() -> usize {
    1
}

/// Per-feature standardisation: `(x - mean) / std`, with `std` below 1e-12 treated as 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scaler {
    /// Mean of each feature.
    pub mean: Vec<f64>,
    /// Standard deviation of each feature.
    pub std: Vec<f64>,
}

impl Scaler {
    /// `(mean, 1/std)` as f32, std below 1e-12 treated as 1.
    pub fn factors(&self) -> Vec<(f32, f32)> {
        self.mean
            .iter()
            .zip(&self.std)
            .map(|(mean, std)| {
                let std = if std.abs() < 1e-12 { 1.0 } else { *std };
                (*mean as f32, (1.0 / std) as f32)
            })
            .collect()
    }
}

/// The calibrated threshold on the reconstruction error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    /// The threshold: a window whose error exceeds it is anomalous.
    pub value: f64,
    /// How it was calibrated (`quantile`).
    #[serde(default)]
    pub method: Option<String>,
    /// The quantile of the training errors.
    #[serde(default)]
    pub quantile: Option<f64>,
    /// The factor applied to that quantile.
    #[serde(default)]
    pub factor: Option<f64>,
}

/// The n-of-m rule the model was evaluated with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Exceedances needed...
    pub n: usize,
    /// ...among this many consecutive windows to open an anomaly.
    pub m: usize,
    /// Consecutive non-exceeding windows that close it.
    pub hysteresis: usize,
}

impl Default for Detection {
    fn default() -> Self {
        Detection { n: 1, m: 1, hysteresis: 1 }
    }
}

/// Where the model was trained.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingInfo {
    /// The training data, as given to the trainer.
    #[serde(default)]
    pub data: Option<String>,
    /// Rows used.
    #[serde(default)]
    pub rows: Option<u64>,
    /// Windows used.
    #[serde(default)]
    pub windows: Option<u64>,
}

/// The graph's tensor names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Io {
    /// Input tensor name.
    pub input: String,
    /// Output tensor name.
    pub output: String,
}

impl Default for Io {
    fn default() -> Self {
        Io { input: "input".into(), output: "output".into() }
    }
}

/// `model.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Model name.
    pub name: String,
    /// Version (any text; compared for equality).
    pub version: String,
    /// When it was trained (RFC 3339).
    #[serde(default)]
    pub created_at: Option<String>,
    /// Model family (`pca`, `dense` ...).
    #[serde(default)]
    pub family: Option<String>,
    /// Feature names, in the order of the input columns.
    pub features: Vec<String>,
    /// The window.
    pub window: WindowSpec,
    /// The scaler.
    pub scaler: Scaler,
    /// The threshold.
    pub threshold: Threshold,
    /// The detection rule.
    #[serde(default)]
    pub detection: Detection,
    /// Training data.
    #[serde(default)]
    pub training: TrainingInfo,
    /// Tensor names.
    #[serde(default)]
    pub io: Io,
}

impl ModelSpec {
    /// Reads and checks `model.json`.
    pub fn read(path: &Path) -> Result<ModelSpec, InferenceError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| InferenceError::Io { path: path.to_path_buf(), source })?;
        let spec: ModelSpec = serde_json::from_str(&text).map_err(|error| {
            InferenceError::Spec { path: path.to_path_buf(), message: error.to_string() }
        })?;
        spec.check()
            .map_err(|message| InferenceError::Spec { path: path.to_path_buf(), message })?;
        Ok(spec)
    }

    /// Consistency checks.
    pub fn check(&self) -> Result<(), String> {
        let features = self.features.len();
        if features == 0 {
            return Err("`features` is empty".into());
        }
        if self.window.length == 0 || self.window.step == 0 {
            return Err("`window.length` and `window.step` must be at least 1".into());
        }
        if self.scaler.mean.len() != features || self.scaler.std.len() != features {
            return Err(format!(
                "the scaler has {} means and {} deviations for {features} features",
                self.scaler.mean.len(),
                self.scaler.std.len()
            ));
        }
        if !self.threshold.value.is_finite() {
            return Err("`threshold.value` is not a finite number".into());
        }
        let Detection { n, m, hysteresis } = self.detection;
        if n == 0 || m < n || hysteresis == 0 {
            return Err(format!(
                "detection n={n} m={m} hysteresis={hysteresis}: need 1 <= n <= m and hysteresis >= 1"
            ));
        }
        Ok(())
    }

    /// Values per input row: window length x features.
    pub fn width(&self) -> usize {
        self.window.length * self.features.len()
    }
}

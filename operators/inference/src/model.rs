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

/// The calibrated threshold on the reconstruction error. Only `value` is used; the rest
/// records how the trainer chose it (older model.json files have only some of it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    /// The threshold: a window whose error exceeds it is anomalous.
    pub value: f64,
    /// How it was calibrated: `quantile` (quantile x factor) or `pot` (peaks over threshold).
    #[serde(default)]
    pub method: Option<String>,
    /// `quantile`: the quantile of the training errors.
    #[serde(default)]
    pub quantile: Option<f64>,
    /// `quantile`: the factor applied to that quantile.
    #[serde(default)]
    pub factor: Option<f64>,
    /// `pot`: the probability that a normal window exceeds the threshold.
    #[serde(default)]
    pub risk: Option<f64>,
    /// `pot`: the quantile of the training errors above which the tail was fitted.
    #[serde(default)]
    pub initial_quantile: Option<f64>,
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
    /// The expected anomaly duration (rows) the rule was derived from, when it was.
    #[serde(default)]
    pub anomaly_duration: Option<usize>,
}

impl Default for Detection {
    fn default() -> Self {
        Detection { n: 1, m: 1, hysteresis: 1, anomaly_duration: None }
    }
}

/// Per-feature error weights. The trainer folds them into the scaler and the graph (the
/// window's mean squared error is then the weighted one), so the engine only records them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorWeights {
    /// `none` or `residual` (features noisier than the median one weighed down to it).
    pub method: String,
    /// One weight per feature (absent for `none`).
    #[serde(default)]
    pub weights: Vec<f64>,
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

/// The most values one input row (window length x features) may have: 16 Mi (64 MiB of
/// `f32`), far beyond any real model, and a `window.length` that overflows the product is an
/// error rather than a panic (found by the `model_json` fuzz target's check).
pub const MAX_WIDTH: usize = 1 << 24;

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
    /// Per-feature error weights (older model.json files have none).
    #[serde(default)]
    pub error_weights: Option<ErrorWeights>,
    /// Tensor names.
    #[serde(default)]
    pub io: Io,
}

impl ModelSpec {
    /// Reads and checks `model.json`.
    pub fn read(path: &Path) -> Result<ModelSpec, InferenceError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| InferenceError::Io { path: path.to_path_buf(), source })?;
        ModelSpec::parse(&text)
            .map_err(|message| InferenceError::Spec { path: path.to_path_buf(), message })
    }

    /// Parses and checks the text of a `model.json` (what [`ModelSpec::read`] does with it).
    pub fn parse(text: &str) -> Result<ModelSpec, String> {
        let spec: ModelSpec = serde_json::from_str(text).map_err(|error| error.to_string())?;
        spec.check()?;
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
        match self.window.length.checked_mul(features) {
            Some(width) if width <= MAX_WIDTH => {}
            _ => {
                return Err(format!(
                    "`window.length` {} x {features} features is more than the {MAX_WIDTH} \
                     values an input row may have",
                    self.window.length
                ));
            }
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
        if let Some(weights) = &self.error_weights
            && !weights.weights.is_empty()
            && weights.weights.len() != features
        {
            return Err(format!(
                "`error_weights` has {} weights for {features} features",
                weights.weights.len()
            ));
        }
        let Detection { n, m, hysteresis, .. } = self.detection;
        if n == 0 || m < n || hysteresis == 0 {
            return Err(format!(
                "detection n={n} m={m} hysteresis={hysteresis}: need 1 <= n <= m and hysteresis >= 1"
            ));
        }
        Ok(())
    }

    /// Values per input row: window length x features (at most [`MAX_WIDTH`] in a checked
    /// spec; saturating in one that is not).
    pub fn width(&self) -> usize {
        self.window.length.saturating_mul(self.features.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = r#"{"name": "m", "version": "1", "features": ["a", "b"],
        "window": {"length": 2, "step": 1}, "scaler": {"mean": [0, 0], "std": [1, 1]},
        "threshold": {"value": 0.5, "method": "quantile", "quantile": 0.995, "factor": 1.5},
        "detection": {"n": 10, "m": 20, "hysteresis": 20}}"#;

    #[test]
    fn a_model_json_without_the_calibration_fields_still_loads() {
        let spec: ModelSpec = serde_json::from_str(OLD).expect("old model.json");
        assert_eq!(spec.check(), Ok(()));
        assert_eq!(spec.threshold.risk, None);
        assert_eq!(spec.detection.anomaly_duration, None);
        assert_eq!(spec.error_weights, None);
        assert_eq!((spec.detection.n, spec.detection.m), (10, 20));
    }

    #[test]
    fn a_window_too_long_for_its_features_is_an_error_not_an_overflow() {
        // Once `width()` multiplied with overflow (a panic with debug assertions, a wrapped
        // width in release); fuzz/corpus/model_json/window-length-overflow.json.
        let text = OLD.replace(r#""length": 2"#, r#""length": 18446744073709551615"#);
        let error = ModelSpec::parse(&text).expect_err("overflowing width");
        assert!(error.contains("more than the 16777216 values"), "{error}");
        let text = OLD.replace(r#""length": 2"#, r#""length": 8388609"#);
        assert!(ModelSpec::parse(&text).is_err());
        let text = OLD.replace(r#""length": 2"#, r#""length": 8388608"#);
        assert_eq!(ModelSpec::parse(&text).map(|spec| spec.width()), Ok(MAX_WIDTH));
        let mut spec: ModelSpec = serde_json::from_str(OLD).expect("old model.json");
        spec.window.length = usize::MAX;
        assert_eq!(spec.width(), usize::MAX);
    }

    #[test]
    fn the_calibration_fields_are_read_and_checked() {
        let new = r#"{"name": "m", "version": "1", "features": ["a", "b"],
            "window": {"length": 2, "step": 1}, "scaler": {"mean": [0, 0], "std": [1, 1]},
            "threshold": {"value": 0.5, "method": "pot", "risk": 0.0001,
                          "initial_quantile": 0.95, "initial_value": 0.3, "shape": 0.1,
                          "scale": 0.05, "excesses": 20, "windows": 391},
            "detection": {"n": 3, "m": 5, "hysteresis": 5, "anomaly_duration": 10,
                          "rule": "derived"},
            "error_weights": {"method": "residual", "weights": [0.5, 1.5]}}"#;
        let mut spec: ModelSpec = serde_json::from_str(new).expect("new model.json");
        assert_eq!(spec.check(), Ok(()));
        assert_eq!(spec.threshold.method.as_deref(), Some("pot"));
        assert_eq!(spec.threshold.risk, Some(0.0001));
        assert_eq!(spec.threshold.initial_quantile, Some(0.95));
        assert_eq!(spec.detection.anomaly_duration, Some(10));
        assert_eq!(spec.error_weights.as_ref().map(|weights| weights.weights.len()), Some(2));
        spec.error_weights = Some(ErrorWeights { method: "residual".into(), weights: vec![1.0] });
        assert!(spec.check().is_err_and(|message| message.contains("1 weights for 2 features")));
    }
}

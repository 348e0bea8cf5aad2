//! `stats`: the model-free baseline detector, windows to [`Score`]s.
//!
//! For every window it computes, per feature, the mean, population standard deviation, minimum
//! and maximum (NaN values skipped), and scores how far the window's means are from the
//! device's recent past:
//!
//! ```text
//! score = max over features f of |mean_f - baseline_mean_f| / sqrt(baseline_var_f + 1e-9)
//! ```
//!
//! where `baseline_mean_f` and `baseline_var_f` are exponentially weighted moving averages
//! (weight `baseline_alpha` for the newest window) of the feature's window mean and window
//! variance (`std²`) over the device's earlier windows. A feature takes part once its baseline
//! has absorbed `warmup_windows` windows; before that (and for a feature with no value in the
//! window) it does not, and a score with no taking part feature is 0. The baseline is updated
//! with the window after it is scored.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, DeviceId, Kind, Outputs, PortType,
    Schema, Score, Transform, TransformFactory, TransformProperties, ValidateContext, Window,
};

use crate::util::{IdHash, config_error};

/// The detector version written on every score.
pub const STATS_VERSION: &str = "stats-1";

/// Added to the baseline variance before the square root, so a constant baseline scores a
/// finite (if large) value.
pub const VARIANCE_EPSILON: f64 = 1e-9;

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// Options of the `stats` transform.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsConfig {
    /// Weight of the newest window in the moving baseline, in (0, 1]; larger forgets faster.
    #[serde(default = "default_alpha")]
    pub baseline_alpha: f64,
    /// Windows a device's feature must have seen before its score counts (the score is 0
    /// until then).
    #[serde(default = "default_warmup")]
    pub warmup_windows: u32,
    /// A window whose score is greater than this is flagged anomalous; without it, nothing is
    /// flagged.
    #[serde(default)]
    pub threshold: Option<f32>,
}

fn default_alpha() -> f64 {
    0.1
}

fn default_warmup() -> u32 {
    5
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            baseline_alpha: default_alpha(),
            warmup_windows: default_warmup(),
            threshold: None,
        }
    }
}

fn check(config: &StatsConfig) -> Result<(), ConfigError> {
    if !(config.baseline_alpha > 0.0 && config.baseline_alpha <= 1.0) {
        return Err(ConfigError::at_field(
            "baseline_alpha",
            format!("`baseline_alpha` must be in (0, 1], not {}", config.baseline_alpha),
        )
        .with_hint("0.1 weighs about the last 10 windows"));
    }
    if let Some(threshold) = config.threshold
        && !threshold.is_finite()
    {
        return Err(ConfigError::at_field("threshold", "`threshold` must be a finite number"));
    }
    Ok(())
}

/// The names of the score values for windows of `features`: `{feature}_mean`, `_std`, `_min`,
/// `_max`, feature after feature.
pub fn stats_columns(features: &Schema) -> Schema {
    Schema::new(features.names().iter().flat_map(|name| {
        ["mean", "std", "min", "max"].map(|statistic| format!("{name}_{statistic}"))
    }))
}

// ---------------------------------------------------------------------------------------------
// Factory
// ---------------------------------------------------------------------------------------------

/// Factory of the `stats` transform.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatsFactory;

impl TransformFactory for StatsFactory {
    type Config = StatsConfig;

    fn accepts(&self, _config: &StatsConfig) -> Vec<Kind> {
        vec![Kind::Windows]
    }

    fn validate(&self, config: &StatsConfig, _ctx: &ValidateContext) -> Result<(), ConfigError> {
        check(config)
    }

    fn output_type(
        &self,
        config: &StatsConfig,
        input: &PortType,
        _ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        if input.kind != Kind::Windows {
            return Err(ConfigError::new(format!(
                "`stats` reads windows, but its input carries {}",
                input.kind
            ))
            .with_hint("put a `window` transform before `stats`"));
        }
        check(config)?;
        Ok(match &input.schema {
            Some(schema) => PortType::with_schema(Kind::Scores, Arc::new(stats_columns(schema))),
            None => PortType::of(Kind::Scores),
        })
    }

    fn properties(&self, _config: &StatsConfig) -> TransformProperties {
        TransformProperties { keyed: true, ..TransformProperties::default() }
    }

    fn build(
        &self,
        config: &StatsConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Transform>, ComponentError> {
        let operator = StatsDetector::new(config, ctx).map_err(config_error)?;
        Ok(Box::new(operator))
    }
}

// ---------------------------------------------------------------------------------------------
// The detector
// ---------------------------------------------------------------------------------------------

/// One feature's moving baseline.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct FeatureBaseline {
    mean: f64,
    var: f64,
    /// Windows absorbed.
    windows: u64,
}

/// A device's moving baseline, per feature: one allocation per device (24 bytes a feature).
type Baseline = Box<[FeatureBaseline]>;

fn new_baseline(width: usize) -> Baseline {
    vec![FeatureBaseline::default(); width].into_boxed_slice()
}

/// Per-feature accumulators for one window; reused from window to window.
#[derive(Debug, Default)]
struct Accumulators {
    count: Vec<u64>,
    sum: Vec<f64>,
    squares: Vec<f64>,
    min: Vec<f32>,
    max: Vec<f32>,
    mean: Vec<f64>,
    var: Vec<f64>,
}

impl Accumulators {
    /// Computes the statistics of every feature of `window`.
    fn compute(&mut self, window: &Window, width: usize) {
        self.count.clear();
        self.count.resize(width, 0);
        self.sum.clear();
        self.sum.resize(width, 0.0);
        self.squares.clear();
        self.squares.resize(width, 0.0);
        self.min.clear();
        self.min.resize(width, f32::INFINITY);
        self.max.clear();
        self.max.resize(width, f32::NEG_INFINITY);
        self.mean.clear();
        self.var.clear();
        if width == 0 {
            return;
        }
        let rows = window.values.chunks_exact(width);
        for row in rows.clone() {
            for (column, value) in row.iter().enumerate() {
                if value.is_nan() {
                    continue;
                }
                if let (Some(count), Some(sum), Some(min), Some(max)) = (
                    self.count.get_mut(column),
                    self.sum.get_mut(column),
                    self.min.get_mut(column),
                    self.max.get_mut(column),
                ) {
                    *count += 1;
                    *sum += f64::from(*value);
                    *min = min.min(*value);
                    *max = max.max(*value);
                }
            }
        }
        self.mean.extend(
            self.count
                .iter()
                .zip(&self.sum)
                .map(|(count, sum)| if *count == 0 { f64::NAN } else { sum / *count as f64 }),
        );
        // Second pass for the variance: exact even when the mean is large.
        for row in rows {
            for ((value, mean), squares) in row.iter().zip(&self.mean).zip(&mut self.squares) {
                if !value.is_nan() {
                    let deviation = f64::from(*value) - mean;
                    *squares += deviation * deviation;
                }
            }
        }
        self.var.extend(
            self.count.iter().zip(&self.squares).map(|(count, squares)| {
                if *count == 0 { f64::NAN } else { squares / *count as f64 }
            }),
        );
    }
}

/// The `stats` transform: per-window statistics and a moving-baseline anomaly score.
#[derive(Debug)]
pub struct StatsDetector {
    detector: Arc<str>,
    version: Arc<str>,
    alpha: f64,
    warmup: u64,
    threshold: Option<f32>,
    /// The last input schema seen and its score columns.
    columns: Option<(Arc<Schema>, Arc<Schema>)>,
    baselines: HashMap<DeviceId, Baseline, IdHash>,
    accumulators: Accumulators,
    /// This instance's worker and the number of workers: a restore keeps the devices it owns.
    worker: usize,
    workers: usize,
}

impl StatsDetector {
    /// Builds the detector from its options; its scores carry `ctx.component_id` as detector.
    pub fn new(config: &StatsConfig, ctx: &ComponentContext) -> Result<StatsDetector, ConfigError> {
        check(config)?;
        Ok(StatsDetector {
            detector: Arc::clone(&ctx.component_id),
            version: Arc::from(STATS_VERSION),
            alpha: config.baseline_alpha,
            warmup: u64::from(config.warmup_windows).max(1),
            threshold: config.threshold,
            columns: None,
            baselines: HashMap::default(),
            accumulators: Accumulators::default(),
            worker: ctx.worker_index,
            workers: ctx.workers,
        })
    }

    fn columns_for(&mut self, schema: &Arc<Schema>) -> Arc<Schema> {
        if let Some((input, columns)) = &self.columns
            && (Arc::ptr_eq(input, schema) || input == schema)
        {
            return Arc::clone(columns);
        }
        let columns = Arc::new(stats_columns(schema));
        self.columns = Some((Arc::clone(schema), Arc::clone(&columns)));
        columns
    }

    /// Scores one window and updates the device's baseline.
    pub fn score_window(&mut self, window: &Window) -> Score {
        let width = window.schema.len();
        let columns = self.columns_for(&window.schema);
        let stats = &mut self.accumulators;
        stats.compute(window, width);

        let baseline = self.baselines.entry(window.device).or_insert_with(|| new_baseline(width));
        if baseline.len() != width {
            *baseline = new_baseline(width);
        }
        let mut score = 0.0f64;
        for column in 0..width {
            let (Some(mean), Some(var), Some(feature)) = (
                stats.mean.get(column).copied(),
                stats.var.get(column).copied(),
                baseline.get_mut(column),
            ) else {
                continue;
            };
            let FeatureBaseline { mean: base_mean, var: base_var, windows: seen } = feature;
            if mean.is_nan() {
                continue;
            }
            if *seen >= self.warmup {
                let deviation = (mean - *base_mean).abs() / (*base_var + VARIANCE_EPSILON).sqrt();
                if deviation > score {
                    score = deviation;
                }
            }
            if mean.is_finite() && var.is_finite() {
                if *seen == 0 {
                    *base_mean = mean;
                    *base_var = var;
                } else {
                    *base_mean += self.alpha * (mean - *base_mean);
                    *base_var += self.alpha * (var - *base_var);
                }
                *seen += 1;
            }
        }
        let score = score as f32;

        let mut values = Vec::with_capacity(width * 4);
        for column in 0..width {
            let count = stats.count.get(column).copied().unwrap_or(0);
            if count == 0 {
                values.extend_from_slice(&[f32::NAN; 4]);
                continue;
            }
            let mean = stats.mean.get(column).copied().unwrap_or(f64::NAN);
            let var = stats.var.get(column).copied().unwrap_or(f64::NAN);
            values.push(mean as f32);
            values.push(var.sqrt() as f32);
            values.push(stats.min.get(column).copied().unwrap_or(f32::NAN));
            values.push(stats.max.get(column).copied().unwrap_or(f32::NAN));
        }

        Score {
            device: window.device,
            start_ms: window.start_ms,
            end_ms: window.end_ms,
            detector: Arc::clone(&self.detector),
            version: Arc::clone(&self.version),
            score,
            threshold: self.threshold,
            anomaly: self.threshold.is_some_and(|threshold| score > threshold),
            label: window.label,
            columns,
            values,
            labels: Default::default(),
        }
    }
}

impl Transform for StatsDetector {
    fn process_batch(&mut self, batch: Batch, out: &mut Outputs) {
        match batch {
            Batch::Windows(windows) => {
                let scores: Vec<Score> =
                    windows.iter().map(|window| self.score_window(window)).collect();
                out.emit(Batch::Scores(scores));
            }
            other => out.error(
                "unsupported_format",
                format!("stats reads windows, got a batch of {}", other.kind()),
                None,
                None,
            ),
        }
    }

    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        let mut devices: Vec<SnapshotBaseline> = self
            .baselines
            .iter()
            .map(|(device, baseline)| SnapshotBaseline {
                device: *device,
                mean: baseline.iter().map(|feature| feature.mean.to_bits()).collect(),
                var: baseline.iter().map(|feature| feature.var.to_bits()).collect(),
                windows: baseline.iter().map(|feature| feature.windows).collect(),
            })
            .collect();
        devices.sort_unstable_by_key(|baseline| baseline.device);
        serde_json::to_vec(&Snapshot { devices })
            .map(Some)
            .map_err(|error| ComponentError::Internal(format!("stats snapshot: {error}")))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ComponentError> {
        let snapshot: Snapshot = serde_json::from_slice(state)
            .map_err(|error| ComponentError::Internal(format!("stats snapshot: {error}")))?;
        // Several snapshots (one per instance that took the checkpoint) merge; each instance
        // keeps the devices it owns now. Checked in full first: a bad snapshot changes nothing.
        let mut restored = Vec::new();
        for device in snapshot.devices {
            if device.device.worker(self.workers) != self.worker {
                continue;
            }
            if device.mean.len() != device.var.len() || device.mean.len() != device.windows.len() {
                return Err(ComponentError::Internal(
                    "stats snapshot: baseline columns differ in length".to_owned(),
                ));
            }
            let baseline: Baseline = device
                .mean
                .iter()
                .zip(&device.var)
                .zip(&device.windows)
                .map(|((mean, var), windows)| FeatureBaseline {
                    mean: f64::from_bits(*mean),
                    var: f64::from_bits(*var),
                    windows: *windows,
                })
                .collect();
            restored.push((device.device, baseline));
        }
        self.baselines.extend(restored);
        Ok(())
    }
}

/// The state of a [`StatsDetector`] as checkpointed (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    devices: Vec<SnapshotBaseline>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotBaseline {
    device: DeviceId,
    /// `f64::to_bits` of each value (JSON has no NaN).
    mean: Vec<u64>,
    var: Vec<u64>,
    windows: Vec<u64>,
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use tidewatch_api::{ConfigValue, LABEL_ANOMALY, LABEL_NORMAL};

    use super::*;

    fn detector(config: &StatsConfig) -> StatsDetector {
        StatsDetector::new(config, &ComponentContext::for_test("baseline", "stats"))
            .expect("valid config")
    }

    /// A window of `device` whose feature `a` takes `a` and `b` takes `b`, step by step.
    fn window(device: &str, start_ms: i64, a: &[f32], b: &[f32]) -> Window {
        let schema = Arc::new(Schema::new(["a", "b"]));
        let values = a.iter().zip(b).flat_map(|(a, b)| [*a, *b]).collect();
        Window {
            device: DeviceId::intern(device),
            start_ms,
            end_ms: start_ms + 10,
            schema,
            times: (start_ms..).take(a.len()).collect(),
            values,
            label: LABEL_NORMAL,
        }
    }

    fn scores(op: &mut StatsDetector, windows: Vec<Window>) -> Vec<Score> {
        let mut out = Outputs::new("baseline");
        op.process_batch(Batch::Windows(windows), &mut out);
        out.take_main()
            .into_iter()
            .flat_map(|batch| match batch {
                Batch::Scores(scores) => scores,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn statistics_of_a_known_window() {
        let mut op = detector(&StatsConfig::default());
        let mut input = window("known", 0, &[1.0, 2.0, 3.0, 4.0], &[-1.0, -1.0, -1.0, 5.0]);
        input.label = LABEL_ANOMALY;
        let score = scores(&mut op, vec![input]).pop().expect("one score");
        let names: Vec<&str> = score.columns.names().iter().map(|name| &**name).collect();
        assert_eq!(
            names,
            ["a_mean", "a_std", "a_min", "a_max", "b_mean", "b_std", "b_min", "b_max"]
        );
        let expected = [2.5, 1.25f32.sqrt(), 1.0, 4.0, 0.5, 6.75f32.sqrt(), -1.0, 5.0];
        for (value, expected) in score.values.iter().zip(expected) {
            assert!((value - expected).abs() < 1e-6, "{:?} vs {expected:?}", score.values);
        }
        assert_eq!(&*score.detector, "baseline");
        assert_eq!(&*score.version, "stats-1");
        assert_eq!(score.label, LABEL_ANOMALY);
        assert_eq!((score.start_ms, score.end_ms), (0, 10));
        assert_eq!(score.device, DeviceId::intern("known"));
        assert_eq!(score.score, 0.0);
        assert_eq!(score.threshold, None);
        assert!(!score.anomaly);
    }

    #[test]
    fn warmup_then_a_shifted_window_scores_high() {
        let config = StatsConfig { threshold: Some(3.0), ..StatsConfig::default() };
        let mut op = detector(&config);
        let normal = |start| window("shift", start, &[-1.0, 1.0, -1.0, 1.0], &[5.0; 4]);
        let warmup: Vec<Score> = scores(&mut op, (0..5).map(|index| normal(index * 10)).collect());
        assert_eq!(warmup.len(), 5);
        assert!(warmup.iter().all(|score| score.score == 0.0 && !score.anomaly));
        assert!(warmup.iter().all(|score| score.threshold == Some(3.0)));

        let calm = scores(&mut op, vec![normal(50)]).pop().expect("score");
        assert!(calm.score < 1e-3, "{}", calm.score);
        assert!(!calm.anomaly);

        // Mean of `a` shifts by 10 with an in-window std of 1: score 10. `b` is constant with a
        // zero baseline variance and does not move, so it scores 0.
        let shifted = window("shift", 60, &[9.0, 11.0, 9.0, 11.0], &[5.0; 4]);
        let high = scores(&mut op, vec![shifted]).pop().expect("score");
        assert!((high.score - 10.0).abs() < 1e-3, "{}", high.score);
        assert!(high.anomaly);

        // Another device has its own baseline and is still warming up.
        let other = scores(&mut op, vec![window("shift-other", 0, &[100.0], &[0.0])]);
        assert_eq!(other[0].score, 0.0);
    }

    #[test]
    fn baseline_is_an_ewma_updated_after_scoring() {
        let config = StatsConfig { baseline_alpha: 0.5, warmup_windows: 1, threshold: None };
        let mut op = detector(&config);
        let first = scores(&mut op, vec![window("ewma", 0, &[0.0, 2.0], &[1.0, 1.0])]);
        assert_eq!(first[0].score, 0.0);
        // Baseline of a: mean 1, var 1. This window: mean 5, var 1 -> |5 - 1| / 1 = 4.
        let second = scores(&mut op, vec![window("ewma", 10, &[4.0, 6.0], &[1.0, 1.0])]);
        assert!((second[0].score - 4.0).abs() < 1e-4, "{}", second[0].score);
        // Baseline of a: mean 3, var 1. This window: mean 3 -> 0.
        let third = scores(&mut op, vec![window("ewma", 20, &[2.0, 4.0], &[1.0, 1.0])]);
        assert!(third[0].score.abs() < 1e-4, "{}", third[0].score);
    }

    #[test]
    fn nan_values_are_skipped() {
        let config = StatsConfig { warmup_windows: 1, ..StatsConfig::default() };
        let mut op = detector(&config);
        let nan = f32::NAN;
        let first = scores(&mut op, vec![window("nan", 0, &[1.0, nan, 3.0], &[nan, nan, nan])]);
        let values = &first[0].values;
        assert_eq!(values[..4], [2.0, 1.0, 1.0, 3.0]);
        assert!(values[4..].iter().all(|value| value.is_nan()));
        assert_eq!(first[0].score, 0.0);

        // `b` has no baseline yet and no values: only `a` scores, and the score is finite.
        let second = scores(&mut op, vec![window("nan", 10, &[3.0, 5.0], &[nan, 7.0])]);
        assert!((second[0].score - 2.0).abs() < 1e-4, "{}", second[0].score);
        // An all-NaN window scores 0 and leaves the baseline alone.
        let third = scores(&mut op, vec![window("nan", 20, &[nan], &[nan])]);
        assert_eq!(third[0].score, 0.0);
        assert!(third[0].values.iter().all(|value| value.is_nan()));
    }

    #[test]
    fn snapshot_and_restore_keep_baselines() {
        let config = StatsConfig { warmup_windows: 1, ..StatsConfig::default() };
        let mut op = detector(&config);
        scores(&mut op, vec![window("snap-stats", 0, &[-1.0, 1.0], &[0.0, 0.0])]);
        let state = op.snapshot().expect("snapshot").expect("state");
        let mut restored = detector(&config);
        restored.restore(&state).expect("restore");
        // A damaged snapshot is refused and changes nothing.
        let mut damaged: serde_json::Value = serde_json::from_slice(&state).expect("json");
        if let Some(mean) = damaged["devices"][0]["mean"].as_array_mut() {
            mean.push(serde_json::json!(0));
        }
        let damaged = serde_json::to_vec(&damaged).expect("json");
        assert!(restored.restore(&damaged).is_err());
        let shifted = window("snap-stats", 10, &[9.0, 11.0], &[0.0, 0.0]);
        let expected = scores(&mut op, vec![shifted.clone()]);
        let actual = scores(&mut restored, vec![shifted]);
        assert_eq!(expected[0].score, actual[0].score);
        assert!(actual[0].score > 9.0);
    }

    #[test]
    fn config_and_output_type() {
        let factory = StatsFactory;
        let ctx = ValidateContext::default();
        let parse = |toml: &str| -> StatsConfig {
            ConfigValue::parse(toml).expect("toml").deserialize().expect("config")
        };
        assert_eq!(parse(""), StatsConfig::default());
        let input = PortType::with_schema(Kind::Windows, Arc::new(Schema::new(["x"])));
        let output = factory.output_type(&parse("threshold = 4.5"), &input, &ctx).expect("valid");
        assert_eq!(
            output,
            PortType::with_schema(
                Kind::Scores,
                Arc::new(Schema::new(["x_mean", "x_std", "x_min", "x_max"]))
            )
        );
        let unknown =
            factory.output_type(&parse(""), &PortType::of(Kind::Windows), &ctx).expect("valid");
        assert_eq!(unknown, PortType::of(Kind::Scores));
        for toml in ["baseline_alpha = 0.0", "baseline_alpha = 1.5", "baseline_alpha = nan"] {
            let error = factory.output_type(&parse(toml), &input, &ctx).expect_err(toml);
            assert_eq!(error.field.as_deref(), Some("baseline_alpha"));
        }
        let error = factory.output_type(&parse("threshold = inf"), &input, &ctx).expect_err("inf");
        assert_eq!(error.field.as_deref(), Some("threshold"));
        assert!(
            ConfigValue::parse("alpha = 0.5").expect("toml").deserialize::<StatsConfig>().is_err()
        );
        assert!(factory.output_type(&parse(""), &PortType::of(Kind::Readings), &ctx).is_err());
        assert!(factory.properties(&parse("")).keyed);
    }
}

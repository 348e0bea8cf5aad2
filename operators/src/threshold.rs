//! `threshold`: turns per-window exceedances into anomalies that open and close.
//!
//! Per device, in window order: an anomaly **opens** when at least `n` of the last `m` scores
//! exceeded their threshold (their `anomaly` flag), and **closes** after `hysteresis`
//! consecutive scores that did not; at most one change per score (this is the rule
//! `training/train.py`'s `n_of_m` evaluates models with). With `emit = "events"` (default) it emits an
//! [`AnomalyEvent`] at each open and close; with `emit = "scores"` it passes every score on
//! with `anomaly` replaced by the debounced state (one flag per window, as backtests pool them).

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use tidewatch_api::{
    AnomalyEvent, AnomalyState, Batch, ComponentContext, ComponentError, ConfigError, DeviceId,
    Kind, Outputs, PortType, Score, Transform, TransformFactory, TransformProperties,
    ValidateContext,
};

/// What `threshold` emits.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Emit {
    /// An event at every open and close.
    #[default]
    Events,
    /// Every score, with `anomaly` set to the debounced state.
    Scores,
}

/// Options of the `threshold` transform.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ThresholdConfig {
    /// Exceedances that open an anomaly... Default 1.
    #[serde(default = "one")]
    pub n: usize,
    /// ...among this many consecutive windows (1 <= n <= m <= 64). Default `n`.
    #[serde(default)]
    pub m: Option<usize>,
    /// Consecutive windows below the threshold that close an open anomaly. Default 1.
    #[serde(default = "one")]
    pub hysteresis: usize,
    /// `events` (default) or `scores`.
    #[serde(default)]
    pub emit: Emit,
}

fn one() -> usize {
    1
}

impl ThresholdConfig {
    fn window(&self) -> usize {
        self.m.unwrap_or(self.n)
    }
}

/// Makes `threshold` transforms.
#[derive(Clone, Copy, Debug, Default)]
pub struct ThresholdFactory;

impl TransformFactory for ThresholdFactory {
    type Config = ThresholdConfig;

    fn accepts(&self, _config: &ThresholdConfig) -> Vec<Kind> {
        vec![Kind::Scores]
    }

    fn validate(
        &self,
        config: &ThresholdConfig,
        _ctx: &ValidateContext,
    ) -> Result<(), ConfigError> {
        if config.n == 0 {
            return Err(ConfigError::at_field("n", "`n` must be at least 1"));
        }
        let m = config.window();
        if m < config.n || m > 64 {
            return Err(ConfigError::at_field(
                "m",
                format!("`m` = {m} must be between n = {} and 64", config.n),
            ));
        }
        if config.hysteresis == 0 {
            return Err(ConfigError::at_field("hysteresis", "`hysteresis` must be at least 1"));
        }
        Ok(())
    }

    fn output_type(
        &self,
        config: &ThresholdConfig,
        input: &PortType,
        ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        self.validate(config, ctx)?;
        Ok(match config.emit {
            Emit::Scores => input.clone(),
            Emit::Events => PortType { kind: Kind::Events, schema: input.schema.clone() },
        })
    }

    fn properties(&self, _config: &ThresholdConfig) -> TransformProperties {
        TransformProperties { keyed: true, ..TransformProperties::default() }
    }

    fn build(
        &self,
        config: &ThresholdConfig,
        _ctx: &ComponentContext,
    ) -> Result<Box<dyn Transform>, ComponentError> {
        Ok(Box::new(Threshold::new(config)))
    }
}

#[derive(Clone, Debug, Default)]
struct DeviceState {
    /// The last `m` exceedances, newest in bit 0.
    history: u64,
    open: bool,
    calm: usize,
    started_ms: i64,
    peak: f32,
}

/// The `threshold` operator.
#[derive(Debug)]
pub struct Threshold {
    n: u32,
    mask: u64,
    hysteresis: usize,
    emit: Emit,
    devices: HashMap<DeviceId, DeviceState>,
}

impl Threshold {
    /// A threshold operator with `config` (assumed validated).
    pub fn new(config: &ThresholdConfig) -> Threshold {
        let m = config.window().clamp(1, 64);
        Threshold {
            n: config.n.max(1) as u32,
            mask: if m == 64 { u64::MAX } else { (1u64 << m) - 1 },
            hysteresis: config.hysteresis.max(1),
            emit: config.emit,
            devices: HashMap::new(),
        }
    }

    /// Feeds one score; returns the event it causes, if any.
    pub fn observe(&mut self, score: &Score) -> Option<AnomalyEvent> {
        let state = self.devices.entry(score.device).or_default();
        state.history = ((state.history << 1) | u64::from(score.anomaly)) & self.mask;
        let transition = if !state.open {
            if state.history.count_ones() >= self.n {
                state.open = true;
                state.calm = 0;
                state.started_ms = score.end_ms;
                state.peak = score.score;
                Some(AnomalyState::Open)
            } else {
                None
            }
        } else {
            state.peak = state.peak.max(score.score);
            if score.anomaly {
                state.calm = 0;
                None
            } else {
                state.calm += 1;
                if state.calm >= self.hysteresis {
                    state.open = false;
                    Some(AnomalyState::Close)
                } else {
                    None
                }
            }
        };
        transition.map(|state_change| AnomalyEvent {
            device: score.device,
            state: state_change,
            time_ms: score.end_ms,
            started_ms: state.started_ms,
            score: score.score,
            peak_score: state.peak,
            threshold: score.threshold,
            detector: Arc::clone(&score.detector),
            version: Arc::clone(&score.version),
            label: score.label,
            columns: Arc::clone(&score.columns),
            values: score.values.clone(),
        })
    }

    /// Whether `device` has an open anomaly.
    pub fn is_open(&self, device: DeviceId) -> bool {
        self.devices.get(&device).is_some_and(|state| state.open)
    }
}

impl Transform for Threshold {
    fn process_batch(&mut self, batch: Batch, out: &mut Outputs) {
        let Batch::Scores(scores) = batch else {
            out.error(
                "unsupported_kind",
                format!("threshold reads scores, not {}", batch.kind()),
                None,
                None,
            );
            return;
        };
        match self.emit {
            Emit::Events => {
                let events: Vec<AnomalyEvent> =
                    scores.iter().filter_map(|score| self.observe(score)).collect();
                out.emit(Batch::Events(events));
            }
            Emit::Scores => {
                let mut scores = scores;
                for score in &mut scores {
                    self.observe(score);
                    score.anomaly = self.is_open(score.device);
                }
                out.emit(Batch::Scores(scores));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tidewatch_api::Schema;

    use super::*;

    fn score(device: &str, end_ms: i64, anomaly: bool) -> Score {
        Score {
            device: DeviceId::intern(device),
            start_ms: end_ms - 10,
            end_ms,
            detector: Arc::from("d"),
            version: Arc::from("1"),
            score: if anomaly { 9.0 } else { 0.1 },
            threshold: Some(1.0),
            anomaly,
            label: 0,
            columns: Arc::new(Schema::new(["a"])),
            values: vec![0.5],
        }
    }

    fn states(config: &ThresholdConfig, flags: &[bool]) -> Vec<bool> {
        let mut threshold = Threshold::new(config);
        flags
            .iter()
            .enumerate()
            .map(|(index, flag)| {
                threshold.observe(&score("t", index as i64, *flag));
                threshold.is_open(DeviceId::intern("t"))
            })
            .collect()
    }

    #[test]
    fn n_of_m_opens_and_hysteresis_closes() {
        let config = ThresholdConfig { n: 2, m: Some(3), hysteresis: 2, emit: Emit::Events };
        let flags = [true, false, false, true, false, true, true, false, true, false, false, false];
        let open = states(&config, &flags);
        assert_eq!(
            open,
            [false, false, false, false, false, true, true, true, true, true, false, false]
        );
    }

    #[test]
    fn plain_threshold_follows_the_flags() {
        let config = ThresholdConfig { n: 1, m: None, hysteresis: 1, emit: Emit::Scores };
        let flags = [false, true, true, false, true];
        assert_eq!(states(&config, &flags), flags);
    }

    #[test]
    fn events_carry_open_time_and_peak() {
        let config = ThresholdConfig { n: 1, m: None, hysteresis: 1, emit: Emit::Events };
        let mut threshold = Threshold::new(&config);
        let mut out = Outputs::new("th");
        let mut scores = vec![
            score("e", 10, false),
            score("e", 20, true),
            score("e", 30, true),
            score("e", 40, false),
        ];
        scores[2].score = 20.0;
        threshold.process_batch(Batch::Scores(scores), &mut out);
        let Some(Batch::Events(events)) = out.take_main().pop() else { panic!("events") };
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].state, AnomalyState::Open);
        assert_eq!(events[0].time_ms, 20);
        assert_eq!(events[1].state, AnomalyState::Close);
        assert_eq!(events[1].started_ms, 20);
        assert_eq!(events[1].peak_score, 20.0);
    }

    #[test]
    fn devices_are_independent() {
        let config = ThresholdConfig { n: 2, m: Some(2), hysteresis: 1, emit: Emit::Events };
        let mut threshold = Threshold::new(&config);
        threshold.observe(&score("x", 1, true));
        threshold.observe(&score("y", 1, true));
        assert!(!threshold.is_open(DeviceId::intern("x")));
        threshold.observe(&score("x", 2, true));
        assert!(threshold.is_open(DeviceId::intern("x")));
        assert!(!threshold.is_open(DeviceId::intern("y")));
    }
}

//! `threshold`: turns per-window exceedances into anomalies that open and close.
//!
//! Per device, in window order: an anomaly **opens** when at least `n` of the last `m` scores
//! exceeded their threshold (their `anomaly` flag), and **closes** after `hysteresis`
//! consecutive scores that did not; at most one change per score (this is the rule
//! `training/train.py`'s `n_of_m` evaluates models with). With `emit = "events"` (default) it emits an
//! [`AnomalyEvent`] at each open and close; with `emit = "scores"` it passes every score on
//! with `anomaly` replaced by the debounced state (one flag per window, as backtests pool them).
//!
//! The per-device state is checkpointed ([`Transform::snapshot`]); `threshold` is keyed, so a
//! restore keeps the devices this worker owns.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
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
    /// This instance's worker and the number of workers (set by `open`): a restore keeps the
    /// devices it owns.
    worker: usize,
    workers: usize,
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
            worker: 0,
            workers: 1,
        }
    }

    /// `m`, the length of the n-of-m history.
    fn m(&self) -> u32 {
        self.mask.count_ones()
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
            labels: score.labels.clone(),
        })
    }

    /// Whether `device` has an open anomaly.
    pub fn is_open(&self, device: DeviceId) -> bool {
        self.devices.get(&device).is_some_and(|state| state.open)
    }
}

impl Transform for Threshold {
    fn open(&mut self, ctx: &ComponentContext) -> Result<(), ComponentError> {
        self.worker = ctx.worker_index;
        self.workers = ctx.workers;
        Ok(())
    }

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

    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        // A closed device without exceedances in its history acts as one never seen (`calm`,
        // `started_ms` and `peak` are reset when an anomaly opens): it is left out.
        let mut devices: Vec<SnapshotDevice> = self
            .devices
            .iter()
            .filter(|(_, state)| state.open || state.history != 0)
            .map(|(device, state)| SnapshotDevice {
                device: *device,
                history: state.history,
                open: state.open,
                calm: state.calm,
                started_ms: state.started_ms,
                peak: state.peak.to_bits(),
            })
            .collect();
        devices.sort_unstable_by_key(|device| device.device);
        let snapshot = Snapshot { n: self.n, m: self.m(), hysteresis: self.hysteresis, devices };
        serde_json::to_vec(&snapshot)
            .map(Some)
            .map_err(|error| ComponentError::Internal(format!("threshold snapshot: {error}")))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ComponentError> {
        let snapshot: Snapshot = serde_json::from_slice(state)
            .map_err(|error| ComponentError::Internal(format!("threshold snapshot: {error}")))?;
        if (snapshot.n, snapshot.m, snapshot.hysteresis) != (self.n, self.m(), self.hysteresis) {
            return Err(ComponentError::Config(format!(
                "the threshold snapshot was taken with n = {}, m = {} and hysteresis = {}, not \
                 {}, {} and {}",
                snapshot.n,
                snapshot.m,
                snapshot.hysteresis,
                self.n,
                self.m(),
                self.hysteresis
            )));
        }
        // Several snapshots (one per instance that took the checkpoint) merge; each instance
        // keeps the devices it owns now.
        let restored = snapshot
            .devices
            .into_iter()
            .filter(|device| device.device.worker(self.workers) == self.worker)
            .map(|device| {
                let state = DeviceState {
                    history: device.history & self.mask,
                    open: device.open,
                    calm: device.calm,
                    started_ms: device.started_ms,
                    peak: f32::from_bits(device.peak),
                };
                (device.device, state)
            });
        self.devices.extend(restored);
        Ok(())
    }
}

/// The state of a [`Threshold`] as checkpointed (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    n: u32,
    m: u32,
    hysteresis: usize,
    devices: Vec<SnapshotDevice>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotDevice {
    device: DeviceId,
    history: u64,
    open: bool,
    calm: usize,
    started_ms: i64,
    /// `f32::to_bits` of the peak score (JSON has no NaN).
    peak: u32,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use tidewatch_api::{PipelineInfo, Schema};

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
            labels: Default::default(),
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

    /// A score of `device` at `end_ms` with score value `value`.
    fn valued(device: &str, end_ms: i64, anomaly: bool, value: f32) -> Score {
        Score { score: value, ..score(device, end_ms, anomaly) }
    }

    /// Feeds `scores` as one batch; returns what was emitted.
    fn feed(threshold: &mut Threshold, scores: &[Score]) -> Vec<Batch> {
        let mut out = Outputs::new("th");
        threshold.process_batch(Batch::Scores(scores.to_vec()), &mut out);
        out.take_main()
    }

    /// An opened threshold running as worker `worker` of `workers`.
    fn opened(config: &ThresholdConfig, worker: usize, workers: usize) -> Threshold {
        let ctx = ComponentContext::new(
            "th",
            "threshold",
            worker,
            workers,
            Arc::new(PipelineInfo::default()),
            Arc::new(AtomicBool::new(false)),
        );
        let mut threshold = Threshold::new(config);
        threshold.open(&ctx).expect("open");
        threshold
    }

    #[test]
    fn a_restored_threshold_goes_on_as_if_never_interrupted() {
        for emit in [Emit::Events, Emit::Scores] {
            let config = ThresholdConfig { n: 2, m: Some(3), hysteresis: 2, emit };
            let before = [
                // snap-a: opens (2 of 3), then one calm score of the 2 that close it.
                valued("snap-a", 10, true, 5.0),
                valued("snap-a", 20, false, 0.5),
                valued("snap-a", 30, true, 7.0),
                valued("snap-a", 40, false, 0.2),
                // snap-b: one exceedance of the 2 that open it.
                valued("snap-b", 10, true, 3.0),
                // snap-c: open, with a peak of 50 before the cut.
                valued("snap-c", 10, true, 4.0),
                valued("snap-c", 20, true, 50.0),
                valued("snap-c", 30, true, 6.0),
            ];
            let after = [
                valued("snap-a", 50, false, 0.1),
                valued("snap-b", 20, true, 8.0),
                valued("snap-c", 40, false, 0.3),
                valued("snap-c", 50, false, 0.4),
                valued("snap-a", 60, true, 9.0),
                valued("snap-a", 70, true, 11.0),
                valued("snap-b", 30, false, 0.1),
            ];
            let mut original = Threshold::new(&config);
            feed(&mut original, &before);
            let state = original.snapshot().expect("snapshot").expect("state");
            let mut restored = Threshold::new(&config);
            restored.restore(&state).expect("restore");

            let expected = feed(&mut original, &after);
            assert_eq!(feed(&mut restored, &after), expected, "{emit:?}");
            // The state mattered: without it the same scores give something else.
            assert_ne!(feed(&mut Threshold::new(&config), &after), expected, "{emit:?}");
            if emit == Emit::Events {
                let Some(Batch::Events(events)) = expected.first() else { panic!("events") };
                let summary: Vec<(&str, AnomalyState, i64, i64, f32)> = events
                    .iter()
                    .map(|event| {
                        let name = if event.device == DeviceId::intern("snap-a") {
                            "snap-a"
                        } else if event.device == DeviceId::intern("snap-b") {
                            "snap-b"
                        } else {
                            "snap-c"
                        };
                        (name, event.state, event.time_ms, event.started_ms, event.peak_score)
                    })
                    .collect();
                assert_eq!(
                    summary,
                    [
                        ("snap-a", AnomalyState::Close, 50, 30, 7.0),
                        ("snap-b", AnomalyState::Open, 20, 20, 8.0),
                        ("snap-c", AnomalyState::Close, 50, 20, 50.0),
                        ("snap-a", AnomalyState::Open, 70, 70, 11.0),
                    ]
                );
            }
        }
    }

    #[test]
    fn the_peak_survives_a_snapshot_even_when_it_is_nan() {
        let config = ThresholdConfig { n: 1, m: None, hysteresis: 2, emit: Emit::Events };
        let device = DeviceId::intern("snap-nan");
        let mut original = Threshold::new(&config);
        feed(&mut original, &[valued("snap-nan", 10, true, f32::NAN)]);
        let mut restored = Threshold::new(&config);
        restored.restore(&original.snapshot().expect("snapshot").expect("state")).expect("restore");
        let peak = |threshold: &Threshold| threshold.devices.get(&device).map(|state| state.peak);
        assert!(peak(&restored).is_some_and(f32::is_nan));
        assert_eq!(peak(&restored).map(f32::to_bits), peak(&original).map(f32::to_bits));
        assert!(restored.is_open(device));
    }

    #[test]
    fn restores_merge_the_devices_of_every_snapshot() {
        let config = ThresholdConfig { n: 2, m: Some(2), hysteresis: 3, emit: Emit::Events };
        let mut first = Threshold::new(&config);
        feed(&mut first, &[score("merge-a", 1, true), score("merge-a", 2, true)]);
        let mut second = Threshold::new(&config);
        feed(&mut second, &[score("merge-b", 1, true), score("merge-b", 2, true)]);
        feed(&mut second, &[score("merge-c", 1, true)]);

        let mut merged = Threshold::new(&config);
        merged.restore(&first.snapshot().expect("snapshot").expect("state")).expect("first");
        merged.restore(&second.snapshot().expect("snapshot").expect("state")).expect("second");
        assert!(merged.is_open(DeviceId::intern("merge-a")));
        assert!(merged.is_open(DeviceId::intern("merge-b")));
        assert!(!merged.is_open(DeviceId::intern("merge-c")));
        // merge-c kept its one exceedance: one more opens it.
        feed(&mut merged, &[score("merge-c", 2, true)]);
        assert!(merged.is_open(DeviceId::intern("merge-c")));
        let state = merged.snapshot().expect("snapshot").expect("state");
        let snapshot: Snapshot = serde_json::from_slice(&state).expect("json");
        let names: Vec<String> =
            snapshot.devices.iter().map(|device| device.device.name().to_string()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, ["merge-a", "merge-b", "merge-c"]);
    }

    #[test]
    fn a_restore_keeps_the_devices_this_worker_owns() {
        let owned_by = |worker: usize| {
            (0..)
                .map(|index| format!("own-{index}"))
                .find(|name| DeviceId::intern(name).worker(2) == worker)
                .expect("a name")
        };
        let (zero, one) = (owned_by(0), owned_by(1));
        let config = ThresholdConfig { n: 1, m: None, hysteresis: 1, emit: Emit::Events };
        let mut single = Threshold::new(&config);
        feed(&mut single, &[score(&zero, 1, true), score(&one, 1, true)]);
        let state = single.snapshot().expect("snapshot").expect("state");
        for (worker, owned, other) in [(0, &zero, &one), (1, &one, &zero)] {
            let mut restored = opened(&config, worker, 2);
            restored.restore(&state).expect("restore");
            assert!(restored.is_open(DeviceId::intern(owned)), "worker {worker}");
            assert!(!restored.is_open(DeviceId::intern(other)), "worker {worker}");
        }
    }

    #[test]
    fn a_snapshot_of_other_options_is_refused() {
        let config = ThresholdConfig { n: 2, m: Some(3), hysteresis: 2, emit: Emit::Events };
        let mut original = Threshold::new(&config);
        feed(&mut original, &[score("opts", 1, true)]);
        let state = original.snapshot().expect("snapshot").expect("state");
        // The way it is emitted does not matter to the state.
        let scores = ThresholdConfig { emit: Emit::Scores, ..config.clone() };
        assert!(Threshold::new(&scores).restore(&state).is_ok());
        for other in [
            ThresholdConfig { n: 1, ..config.clone() },
            ThresholdConfig { m: Some(4), ..config.clone() },
            ThresholdConfig { hysteresis: 3, ..config.clone() },
        ] {
            let error = Threshold::new(&other).restore(&state).expect_err("other options");
            let ComponentError::Config(message) = error else { panic!("{error:?}") };
            assert!(message.contains("n = 2, m = 3 and hysteresis = 2"), "{message}");
        }
        assert!(matches!(
            Threshold::new(&config).restore(b"not json"),
            Err(ComponentError::Internal(_))
        ));
    }
}

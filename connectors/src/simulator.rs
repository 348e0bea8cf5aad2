//! The `simulator` source: a fleet of pumps with correlated sensors and labelled anomalies.
//!
//! Every pump reports five features, always in this order ([`FEATURES`]):
//!
//! | feature | unit |
//! |---|---|
//! | `vibration` | mm/s RMS |
//! | `current` | A |
//! | `pressure` | bar |
//! | `temperature` | °C |
//! | `flow` | m³/h |
//!
//! # Physics
//!
//! Each pump draws its nominal parameters from the seed. Its load follows a daily cycle (a
//! sine over 24 h of event time, lowest at midnight UTC, with a small per-pump phase) plus a
//! slow random disturbance. Flow follows load; pressure grows with the square of the flow
//! (a static head plus `k·flow²`); current is an idle current plus `k·load·flow`; temperature
//! follows the current through a first-order lag (time constant 15 minutes of event time) on
//! top of a daily ambient cycle (warmest at 15:00 UTC); vibration is a baseline that grows a
//! little with load plus a slow, mean-reverting random-walk drift. Gaussian sensor noise is
//! added to every feature.
//!
//! # Anomalies
//!
//! While no anomaly is active on a pump, one starts with probability `anomaly_probability`
//! at each of its ticks, of a kind drawn uniformly from `anomaly_kinds`:
//!
//! * `spike`: one reading has a single large upward spike on one sensor (0.8 to 2 times the
//!   sensor's nominal level). A spike is one reading long.
//! * `level_shift`: one sensor is offset by ±20 to 40 % of its nominal level for
//!   `anomaly_duration_ticks` readings.
//! * `stuck`: one sensor repeats its last value for `anomaly_duration_ticks` readings.
//! * `correlated`: a bearing failure over `anomaly_duration_ticks` readings: vibration (up to
//!   5x its baseline), temperature (up to +15 °C) and current (up to about +35 %) ramp up while
//!   flow (and with it pressure) drops by up to 35 %.
//!
//! Readings are labelled `anomaly = 1` while an anomaly is active, with its kind.
//!
//! # Determinism and workers
//!
//! Each pump has its own random generator seeded from `(seed, device index)`, so the readings
//! do not depend on the number of workers. Reading `k` of the fleet is tick `k / devices` of
//! device `k % devices`; worker `w` simulates the devices whose index `% workers == w`.

use std::sync::Arc;
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::Deserialize;
use tidewatch_api::records::now_ms;
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, EventTime, Kind, Outputs, PortType,
    RawBatch, Source, SourceFactory, SourcePoll, ValidateContext,
};

/// The simulator's features, in payload order.
pub const FEATURES: [&str; 5] = ["vibration", "current", "pressure", "temperature", "flow"];

/// The columns of a CSV payload of the simulator.
pub const CSV_COLUMNS: [&str; 8] =
    ["device", "ts", "vibration", "current", "pressure", "temperature", "flow", "anomaly"];

/// The most devices a simulator may have.
pub const MAX_DEVICES: usize = 1_000_000;

const DAY_MS: u64 = 86_400_000;
/// Time constant of the temperature lag, ms of event time.
const TEMPERATURE_TAU_MS: f64 = 15.0 * 60_000.0;
/// Time constant of the mean reversion of the vibration drift, ms.
const DRIFT_TAU_MS: f64 = 6.0 * 3_600_000.0;
/// Time constant of the load disturbance, ms.
const DISTURBANCE_TAU_MS: f64 = 10.0 * 60_000.0;
/// Sensor noise standard deviation of each feature, in its unit.
const NOISE: [f64; 5] = [0.05, 0.08, 0.02, 0.1, 0.25];
/// Decimals written for each feature.
const DECIMALS: [u32; 5] = [3, 3, 3, 2, 2];
const VIBRATION: usize = 0;
const CURRENT: usize = 1;
const PRESSURE: usize = 2;
const TEMPERATURE: usize = 3;
const FLOW: usize = 4;

/// How the simulator encodes its payloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimulatorFormat {
    /// One JSON object per reading.
    #[default]
    Json,
    /// One comma-separated line per reading (columns [`CSV_COLUMNS`]).
    Csv,
}

/// The kinds of anomaly the simulator injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// A single large spike on one sensor (one reading).
    Spike,
    /// One sensor offset for the anomaly's duration.
    LevelShift,
    /// One sensor frozen at its last value for the anomaly's duration.
    Stuck,
    /// Bearing failure: vibration, temperature and current ramp up while flow drops.
    Correlated,
}

impl AnomalyKind {
    /// Every kind.
    pub const ALL: [AnomalyKind; 4] =
        [AnomalyKind::Spike, AnomalyKind::LevelShift, AnomalyKind::Stuck, AnomalyKind::Correlated];

    /// The kind's name, as written in options and payloads.
    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::Spike => "spike",
            AnomalyKind::LevelShift => "level_shift",
            AnomalyKind::Stuck => "stuck",
            AnomalyKind::Correlated => "correlated",
        }
    }
}

fn default_devices() -> usize {
    10
}
fn default_seed() -> u64 {
    1
}
fn default_interval_ms() -> u64 {
    1_000
}
fn default_batch_size() -> usize {
    1_024
}
fn default_device_prefix() -> String {
    "pump-".to_owned()
}
fn default_topic() -> String {
    "factory/site-1/pump/{device}/telemetry".to_owned()
}
fn default_anomaly_probability() -> f64 {
    0.001
}
fn default_anomaly_duration_ticks() -> u64 {
    30
}
fn default_anomaly_kinds() -> Vec<AnomalyKind> {
    AnomalyKind::ALL.to_vec()
}

/// Options of the `simulator` source.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorConfig {
    /// Number of pumps in the fleet (1 to 1,000,000).
    #[serde(default = "default_devices")]
    pub devices: usize,
    /// Seed of every random draw: the same seed gives the same readings.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Simulated (event) time between two readings of one pump, ms.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Event time of the first tick, ms since the epoch; default: the wall clock at start,
    /// floored to `interval_ms`.
    #[serde(default)]
    pub start_ms: Option<EventTime>,
    /// Total readings of the whole fleet, after which the source finishes; default: unbounded.
    #[serde(default)]
    pub count: Option<u64>,
    /// Readings per second of wall-clock time for the whole fleet; 0 = as fast as possible.
    #[serde(default)]
    pub rate_per_sec: f64,
    /// Most readings emitted per poll (the batch size).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Each reading's event time moves back by a deterministic random amount in
    /// `[0, jitter_ms]` ms, which makes the stream out of order; 0 = in order.
    #[serde(default)]
    pub jitter_ms: u64,
    /// Payload encoding: `json` or `csv`.
    #[serde(default)]
    pub format: SimulatorFormat,
    /// Device names are this prefix followed by the index on four or more digits.
    #[serde(default = "default_device_prefix")]
    pub device_prefix: String,
    /// Topic of each message; `{device}` is replaced with the device name.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Probability that an anomaly starts, per pump and tick, while none is active (0 to 1).
    #[serde(default = "default_anomaly_probability")]
    pub anomaly_probability: f64,
    /// How long an anomaly lasts, in ticks (readings of the pump); a spike lasts one tick.
    #[serde(default = "default_anomaly_duration_ticks")]
    pub anomaly_duration_ticks: u64,
    /// The kinds of anomaly drawn from (uniformly): `spike`, `level_shift`, `stuck`,
    /// `correlated`.
    #[serde(default = "default_anomaly_kinds")]
    pub anomaly_kinds: Vec<AnomalyKind>,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            devices: default_devices(),
            seed: default_seed(),
            interval_ms: default_interval_ms(),
            start_ms: None,
            count: None,
            rate_per_sec: 0.0,
            batch_size: default_batch_size(),
            jitter_ms: 0,
            format: SimulatorFormat::Json,
            device_prefix: default_device_prefix(),
            topic: default_topic(),
            anomaly_probability: default_anomaly_probability(),
            anomaly_duration_ticks: default_anomaly_duration_ticks(),
            anomaly_kinds: default_anomaly_kinds(),
        }
    }
}

impl SimulatorConfig {
    /// Checks the options beyond their types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.devices == 0 || self.devices > MAX_DEVICES {
            return Err(ConfigError::at_field(
                "devices",
                format!("devices must be between 1 and {MAX_DEVICES}, not {}", self.devices),
            ));
        }
        if self.interval_ms == 0 {
            return Err(ConfigError::at_field("interval_ms", "interval_ms must be at least 1"));
        }
        if !self.rate_per_sec.is_finite() || self.rate_per_sec < 0.0 {
            return Err(ConfigError::at_field(
                "rate_per_sec",
                format!(
                    "rate_per_sec must be a finite number >= 0 (0 = as fast as possible), not {}",
                    self.rate_per_sec
                ),
            ));
        }
        if self.batch_size == 0 {
            return Err(ConfigError::at_field("batch_size", "batch_size must be at least 1"));
        }
        if self.jitter_ms > i64::MAX as u64 / 4 {
            return Err(ConfigError::at_field("jitter_ms", "jitter_ms is too large"));
        }
        if !(0.0..=1.0).contains(&self.anomaly_probability) {
            return Err(ConfigError::at_field(
                "anomaly_probability",
                format!(
                    "anomaly_probability must be between 0 and 1, not {}",
                    self.anomaly_probability
                ),
            ));
        }
        if self.anomaly_duration_ticks == 0 {
            return Err(ConfigError::at_field(
                "anomaly_duration_ticks",
                "anomaly_duration_ticks must be at least 1",
            ));
        }
        if self.anomaly_kinds.is_empty() {
            return Err(ConfigError::at_field(
                "anomaly_kinds",
                "anomaly_kinds must name at least one kind",
            )
            .with_hint("use anomaly_probability = 0 to disable anomalies"));
        }
        if self.device_prefix.chars().any(|c| c.is_control() || matches!(c, ',' | '"' | '\\')) {
            return Err(ConfigError::at_field(
                "device_prefix",
                "device_prefix must not contain commas, quotes, backslashes or control characters",
            ));
        }
        Ok(())
    }
}

/// Makes `simulator` sources.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimulatorFactory;

impl SourceFactory for SimulatorFactory {
    type Config = SimulatorConfig;

    fn output_type(
        &self,
        config: &SimulatorConfig,
        _ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        config.validate()?;
        Ok(PortType::of(Kind::Raw))
    }

    fn build(
        &self,
        config: &SimulatorConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Source>, ComponentError> {
        Ok(Box::new(SimulatorSource::new(config, ctx)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Default start time, shared by the workers of one pipeline run
// ---------------------------------------------------------------------------------------------

/// The default start time of one simulator component in one run.
struct DefaultStart(EventTime);

/// The wall clock floored to `interval_ms`, the same for every worker of this process that
/// builds the same component in the same engine run (kept in the run's process-shared state).
fn default_start_ms(ctx: &ComponentContext, interval_ms: u64) -> EventTime {
    let start = ctx.process_shared().get_or_init(&ctx.component_id, || {
        let now = now_ms();
        let interval = i64::try_from(interval_ms).unwrap_or(i64::MAX).max(1);
        DefaultStart(now - now.rem_euclid(interval))
    });
    start.0
}

// ---------------------------------------------------------------------------------------------
// Pumps
// ---------------------------------------------------------------------------------------------

/// SplitMix64: a well-mixed 64-bit hash of `z` (the simulation's deterministic draws).
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of device `index`'s generator.
fn device_seed(seed: u64, index: u64) -> u64 {
    splitmix64(splitmix64(seed) ^ splitmix64(index.wrapping_mul(0x2545_f491_4f6c_dd1d)))
}

/// Per-tick constants shared by every pump of a source.
#[derive(Clone, Debug)]
struct StepParams {
    /// Temperature lag factor per tick.
    temperature_alpha: f64,
    /// Vibration drift: decay per tick and step standard deviation.
    drift_decay: f64,
    drift_sigma: f64,
    /// Load disturbance: decay per tick and step standard deviation.
    disturbance_decay: f64,
    disturbance_sigma: f64,
    anomaly_probability: f64,
    anomaly_duration_ticks: u64,
    anomaly_kinds: Vec<AnomalyKind>,
    jitter_ms: u64,
}

impl StepParams {
    fn new(config: &SimulatorConfig) -> StepParams {
        let interval = config.interval_ms as f64;
        let drift_decay = (-interval / DRIFT_TAU_MS).exp();
        let disturbance_decay = (-interval / DISTURBANCE_TAU_MS).exp();
        StepParams {
            temperature_alpha: 1.0 - (-interval / TEMPERATURE_TAU_MS).exp(),
            drift_decay,
            // Stationary standard deviation of 0.3 mm/s for the drift, 0.04 for the load.
            drift_sigma: 0.3 * (1.0 - drift_decay * drift_decay).sqrt(),
            disturbance_decay,
            disturbance_sigma: 0.04 * (1.0 - disturbance_decay * disturbance_decay).sqrt(),
            anomaly_probability: config.anomaly_probability,
            anomaly_duration_ticks: config.anomaly_duration_ticks,
            anomaly_kinds: config.anomaly_kinds.clone(),
            jitter_ms: config.jitter_ms,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct ActiveAnomaly {
    kind: AnomalyKind,
    sensor: usize,
    elapsed: u64,
    duration: u64,
    magnitude: f64,
    frozen: f64,
}

/// One simulated pump: its nominal parameters, its state and its generator.
#[derive(Clone, Debug)]
struct Pump {
    index: u64,
    rng: SmallRng,
    json_name: Box<[u8]>,
    csv_name: Box<[u8]>,
    topic: Box<str>,
    // Nominal parameters.
    flow_nominal: f64,
    load_mean: f64,
    load_amplitude: f64,
    phase_cos: f64,
    phase_sin: f64,
    pressure_static: f64,
    pressure_k: f64,
    current_idle: f64,
    current_k: f64,
    current_full: f64,
    ambient_mean: f64,
    ambient_amplitude: f64,
    temperature_k: f64,
    vibration_base: f64,
    /// The nominal level of each feature (anomaly magnitudes scale with it).
    levels: [f64; 5],
    // State.
    disturbance: f64,
    drift: f64,
    temperature: f64,
    last: [f64; 5],
    anomaly: Option<ActiveAnomaly>,
}

/// One reading of a pump.
#[derive(Clone, Copy, Debug)]
struct Sample {
    values: [f64; 5],
    anomaly: Option<AnomalyKind>,
    jitter_ms: u64,
}

impl Pump {
    fn new(seed: u64, index: u64, prefix: &str, topic_template: &str) -> Pump {
        let mut rng = SmallRng::seed_from_u64(device_seed(seed, index));
        let name = format!("{prefix}{index:04}");
        let json_name = serde_json::to_vec(&name).unwrap_or_else(|_| b"\"\"".to_vec());
        let topic = topic_template.replace("{device}", &name);
        let flow_nominal = rng.random_range(25.0..40.0);
        let load_mean = rng.random_range(0.6..0.75);
        let load_amplitude = rng.random_range(0.15..0.25);
        let phase: f64 = rng.random_range(-0.5..0.5);
        let pressure_static = rng.random_range(0.8..1.5);
        let pressure_nominal = rng.random_range(3.5..5.5);
        let current_idle = rng.random_range(2.0..4.0);
        let current_full = rng.random_range(12.0..18.0);
        let ambient_mean = rng.random_range(18.0..26.0);
        let ambient_amplitude = rng.random_range(3.0..6.0);
        let temperature_k = rng.random_range(1.2..2.0);
        let vibration_base = rng.random_range(1.5..3.0);
        let pressure_k = (pressure_nominal - pressure_static) / (flow_nominal * flow_nominal);
        let current_k = (current_full - current_idle) / flow_nominal;
        let temperature_nominal = ambient_mean + temperature_k * current_full * 0.6;
        Pump {
            index,
            rng,
            json_name: json_name.into_boxed_slice(),
            csv_name: name.into_bytes().into_boxed_slice(),
            topic: topic.into_boxed_str(),
            flow_nominal,
            load_mean,
            load_amplitude,
            phase_cos: phase.cos(),
            phase_sin: phase.sin(),
            pressure_static,
            pressure_k,
            current_idle,
            current_k,
            current_full,
            ambient_mean,
            ambient_amplitude,
            temperature_k,
            vibration_base,
            levels: [
                vibration_base,
                current_full,
                pressure_nominal,
                temperature_nominal,
                flow_nominal,
            ],
            disturbance: 0.0,
            drift: 0.0,
            temperature: f64::NAN,
            last: [f64::NAN; 5],
            anomaly: None,
        }
    }

    #[inline]
    fn normal(&mut self) -> f64 {
        self.rng.sample(StandardNormal)
    }

    fn start_anomaly(&mut self, params: &StepParams) {
        let kinds = &params.anomaly_kinds;
        let kind = match kinds.len() {
            0 => return,
            1 => kinds[0],
            len => kinds[self.rng.random_range(0..len)],
        };
        let sensor = self.rng.random_range(0..FEATURES.len());
        let level = self.levels[sensor];
        let (duration, magnitude) = match kind {
            AnomalyKind::Spike => (1, level * self.rng.random_range(0.8..2.0)),
            AnomalyKind::LevelShift => {
                let sign = if self.rng.random::<bool>() { 1.0 } else { -1.0 };
                (params.anomaly_duration_ticks, sign * level * self.rng.random_range(0.2..0.4))
            }
            AnomalyKind::Stuck | AnomalyKind::Correlated => (params.anomaly_duration_ticks, 0.0),
        };
        self.anomaly = Some(ActiveAnomaly {
            kind,
            sensor,
            elapsed: 0,
            duration,
            magnitude,
            frozen: self.last[sensor],
        });
    }

    /// Advances the pump by one tick; `day_sin`/`day_cos` are of the angle of the time of day.
    #[inline]
    fn step(&mut self, day_sin: f64, day_cos: f64, params: &StepParams) -> Sample {
        if self.anomaly.is_none()
            && params.anomaly_probability > 0.0
            && self.rng.random::<f64>() < params.anomaly_probability
        {
            self.start_anomaly(params);
        }
        // Bearing-failure progress in (0, 1], or 0.
        let failure = match self.anomaly {
            Some(ActiveAnomaly { kind: AnomalyKind::Correlated, elapsed, duration, .. }) => {
                (elapsed + 1) as f64 / duration as f64
            }
            _ => 0.0,
        };

        // Daily cycles: load lowest at midnight (shifted by the pump's phase), ambient
        // temperature warmest at 15:00.
        let wave = -(day_cos * self.phase_cos - day_sin * self.phase_sin);
        let ambient_wave = -(day_cos + day_sin) * std::f64::consts::FRAC_1_SQRT_2;
        self.disturbance =
            params.disturbance_decay * self.disturbance + params.disturbance_sigma * self.normal();
        let load =
            (self.load_mean + self.load_amplitude * wave + self.disturbance).clamp(0.05, 1.2);

        let flow = self.flow_nominal * load * (1.0 - 0.35 * failure);
        let pressure = self.pressure_static + self.pressure_k * flow * flow;
        let current =
            self.current_idle + self.current_k * load * flow + 0.6 * self.current_full * failure;
        let ambient = self.ambient_mean + self.ambient_amplitude * ambient_wave;
        let target = ambient + self.temperature_k * current;
        if self.temperature.is_nan() {
            self.temperature = target;
        } else {
            self.temperature += params.temperature_alpha * (target - self.temperature);
        }
        self.drift = params.drift_decay * self.drift + params.drift_sigma * self.normal();
        let vibration = self.vibration_base * (0.85 + 0.3 * load)
            + self.drift
            + 4.0 * self.vibration_base * failure;
        let temperature = self.temperature + 15.0 * failure;

        let mut values = [
            (vibration + NOISE[VIBRATION] * self.normal()).max(0.01),
            (current + NOISE[CURRENT] * self.normal()).max(0.0),
            (pressure + NOISE[PRESSURE] * self.normal()).max(0.0),
            temperature + NOISE[TEMPERATURE] * self.normal(),
            (flow + NOISE[FLOW] * self.normal()).max(0.0),
        ];

        let mut label = None;
        if let Some(anomaly) = self.anomaly.as_mut() {
            match anomaly.kind {
                AnomalyKind::Spike | AnomalyKind::LevelShift => {
                    values[anomaly.sensor] += anomaly.magnitude;
                }
                AnomalyKind::Stuck => {
                    if anomaly.frozen.is_nan() {
                        anomaly.frozen = values[anomaly.sensor];
                    }
                    values[anomaly.sensor] = anomaly.frozen;
                }
                AnomalyKind::Correlated => {}
            }
            label = Some(anomaly.kind);
            anomaly.elapsed += 1;
            if anomaly.elapsed >= anomaly.duration {
                self.anomaly = None;
            }
        }
        self.last = values;
        let jitter_ms =
            if params.jitter_ms > 0 { self.rng.random_range(0..=params.jitter_ms) } else { 0 };
        Sample { values, anomaly: label, jitter_ms }
    }
}

// ---------------------------------------------------------------------------------------------
// Payload encoding (no allocation)
// ---------------------------------------------------------------------------------------------

#[inline]
fn write_u64(buf: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
}

#[inline]
fn write_i64(buf: &mut Vec<u8>, value: i64) {
    if value < 0 {
        buf.push(b'-');
    }
    write_u64(buf, value.unsigned_abs());
}

const POW10: [u64; 4] = [1, 10, 100, 1_000];

/// Writes `value` with `decimals` (at most 3) digits after the point.
#[inline]
fn write_fixed(buf: &mut Vec<u8>, value: f64, decimals: u32) {
    let decimals = decimals.min(3) as usize;
    let scale = POW10[decimals];
    let scaled = (value * scale as f64).round();
    if !scaled.is_finite() || scaled.abs() >= 1e18 {
        buf.push(b'0');
        return;
    }
    let scaled = scaled as i64;
    if scaled < 0 {
        buf.push(b'-');
    }
    let magnitude = scaled.unsigned_abs();
    write_u64(buf, magnitude / scale);
    if decimals > 0 {
        buf.push(b'.');
        let mut fraction = magnitude % scale;
        let mut digits = [b'0'; 3];
        for at in (0..decimals).rev() {
            digits[at] = b'0' + (fraction % 10) as u8;
            fraction /= 10;
        }
        buf.extend_from_slice(&digits[..decimals]);
    }
}

const JSON_KEYS: [&[u8]; 5] =
    [b",\"vibration\":", b",\"current\":", b",\"pressure\":", b",\"temperature\":", b",\"flow\":"];

fn write_json(buf: &mut Vec<u8>, name: &[u8], ts: EventTime, sample: &Sample) {
    buf.extend_from_slice(b"{\"device\":");
    buf.extend_from_slice(name);
    buf.extend_from_slice(b",\"ts\":");
    write_i64(buf, ts);
    for ((key, value), decimals) in JSON_KEYS.iter().zip(sample.values).zip(DECIMALS) {
        buf.extend_from_slice(key);
        write_fixed(buf, value, decimals);
    }
    match sample.anomaly {
        None => buf.extend_from_slice(b",\"anomaly\":0}"),
        Some(kind) => {
            buf.extend_from_slice(b",\"anomaly\":1,\"anomaly_kind\":\"");
            buf.extend_from_slice(kind.name().as_bytes());
            buf.extend_from_slice(b"\"}");
        }
    }
}

fn write_csv(buf: &mut Vec<u8>, name: &[u8], ts: EventTime, sample: &Sample) {
    buf.extend_from_slice(name);
    buf.push(b',');
    write_i64(buf, ts);
    for (value, decimals) in sample.values.into_iter().zip(DECIMALS) {
        buf.push(b',');
        write_fixed(buf, value, decimals);
    }
    buf.extend_from_slice(if sample.anomaly.is_some() { b",1" } else { b",0" });
}

// ---------------------------------------------------------------------------------------------
// The source
// ---------------------------------------------------------------------------------------------

/// A running `simulator` source: the pumps of one worker.
#[derive(Debug)]
pub struct SimulatorSource {
    pumps: Vec<Pump>,
    devices: u64,
    start_ms: EventTime,
    interval_ms: u64,
    count: Option<u64>,
    batch_size: usize,
    format: SimulatorFormat,
    /// The header line of CSV output.
    header: Option<Arc<[u8]>>,
    params: StepParams,
    /// The current tick, and the next pump to step in it.
    tick: u64,
    next: usize,
    /// Cached `(tick, sin, cos)` of the time of day.
    day: (u64, f64, f64),
    /// Readings per second of this worker (0 = unpaced).
    rate: f64,
    started: Option<Instant>,
    emitted: u64,
    finished: bool,
    bytes_per_reading: usize,
    ctx: ComponentContext,
}

impl SimulatorSource {
    /// Builds the simulator of worker `ctx.worker_index` (out of `ctx.workers`).
    pub fn new(
        config: &SimulatorConfig,
        ctx: &ComponentContext,
    ) -> Result<SimulatorSource, ComponentError> {
        config.validate().map_err(|error| ComponentError::Config(error.to_string()))?;
        let workers = ctx.workers.max(1);
        let pumps: Vec<Pump> = (ctx.worker_index..config.devices)
            .step_by(workers)
            .map(|index| Pump::new(config.seed, index as u64, &config.device_prefix, &config.topic))
            .collect();
        let start_ms = match config.start_ms {
            Some(start_ms) => start_ms,
            None => default_start_ms(ctx, config.interval_ms),
        };
        // A CSV stream starts with its header line, passed along to the codec unparsed.
        let header: Option<Arc<[u8]>> = match config.format {
            SimulatorFormat::Json => None,
            SimulatorFormat::Csv => Some(Arc::from(CSV_COLUMNS.join(",").as_bytes())),
        };
        let topic_len = pumps.first().map_or(0, |pump| pump.topic.len());
        let rate = config.rate_per_sec * pumps.len() as f64 / config.devices as f64;
        Ok(SimulatorSource {
            devices: config.devices as u64,
            start_ms,
            interval_ms: config.interval_ms,
            count: config.count,
            batch_size: config.batch_size,
            format: config.format,
            header,
            params: StepParams::new(config),
            tick: 0,
            next: 0,
            day: (u64::MAX, 0.0, 1.0),
            rate,
            started: None,
            emitted: 0,
            finished: pumps.is_empty(),
            bytes_per_reading: topic_len
                + match config.format {
                    SimulatorFormat::Json => 176,
                    SimulatorFormat::Csv => 96,
                },
            pumps,
            ctx: ctx.clone(),
        })
    }

    /// The position (fleet-wide reading number) of the next reading of this worker.
    fn next_position(&self) -> u64 {
        let index = self.pumps.get(self.next).map_or(0, |pump| pump.index);
        self.tick.saturating_mul(self.devices).saturating_add(index)
    }

    /// How many readings the pacing allows now, or how long to wait.
    fn allowance(&mut self) -> Result<u64, u64> {
        if self.rate <= 0.0 {
            return Ok(u64::MAX);
        }
        let started = *self.started.get_or_insert_with(Instant::now);
        let elapsed = started.elapsed().as_secs_f64();
        let due = (elapsed * self.rate).floor();
        let due = if due >= u64::MAX as f64 { u64::MAX } else { due as u64 };
        let allowed = due.saturating_sub(self.emitted);
        if allowed > 0 {
            return Ok(allowed);
        }
        let wait_secs = (self.emitted + 1) as f64 / self.rate - elapsed;
        Err(((wait_secs * 1_000.0).ceil() as u64).clamp(1, 1_000))
    }
}

impl Source for SimulatorSource {
    fn poll(&mut self, out: &mut Outputs) -> Result<SourcePoll, ComponentError> {
        if self.finished || self.ctx.shutdown_requested() {
            self.finished = true;
            return Ok(SourcePoll::Finished);
        }
        if self.count.is_some_and(|count| self.next_position() >= count) {
            self.finished = true;
            return Ok(SourcePoll::Finished);
        }
        let budget = match self.allowance() {
            Ok(allowed) => allowed.min(self.batch_size as u64) as usize,
            Err(wake_after_ms) => return Ok(SourcePoll::Idle { wake_after_ms }),
        };
        let arrival_ms = now_ms();
        let mut batch = RawBatch::with_capacity(budget, budget * self.bytes_per_reading);
        if let Some(header) = &self.header {
            batch.set_header(Arc::clone(header));
        }
        let interval = i64::try_from(self.interval_ms).unwrap_or(i64::MAX);
        while batch.len() < budget {
            let Some(pump) = self.pumps.get_mut(self.next) else {
                break;
            };
            let position = self.tick.saturating_mul(self.devices).saturating_add(pump.index);
            if self.count.is_some_and(|count| position >= count) {
                self.finished = true;
                break;
            }
            let tick_ms = i64::try_from(self.tick)
                .unwrap_or(i64::MAX)
                .saturating_mul(interval)
                .saturating_add(self.start_ms);
            if self.day.0 != self.tick {
                let angle = tick_ms.rem_euclid(DAY_MS as i64) as f64 / DAY_MS as f64
                    * std::f64::consts::TAU;
                let (sin, cos) = angle.sin_cos();
                self.day = (self.tick, sin, cos);
            }
            let sample = pump.step(self.day.1, self.day.2, &self.params);
            let ts = tick_ms.saturating_sub(sample.jitter_ms as i64);
            match self.format {
                SimulatorFormat::Json => {
                    batch.push_with(&pump.topic, arrival_ms, position, |buf| {
                        write_json(buf, &pump.json_name, ts, &sample);
                    });
                }
                SimulatorFormat::Csv => {
                    batch.push_with(&pump.topic, arrival_ms, position, |buf| {
                        write_csv(buf, &pump.csv_name, ts, &sample);
                    });
                }
            }
            self.next += 1;
            if self.next == self.pumps.len() {
                self.next = 0;
                self.tick += 1;
            }
        }
        self.emitted += batch.len() as u64;
        if batch.is_empty() {
            return Ok(if self.finished { SourcePoll::Finished } else { SourcePoll::Ready });
        }
        out.emit(Batch::Raw(batch));
        Ok(SourcePoll::Ready)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;

    use tidewatch_api::{ConfigValue, PipelineInfo};

    use super::*;

    fn config(text: &str) -> SimulatorConfig {
        ConfigValue::parse(text).expect("toml").deserialize().expect("config")
    }

    fn context(worker: usize, workers: usize) -> ComponentContext {
        ComponentContext::new(
            "sim",
            "simulator",
            worker,
            workers,
            Arc::new(PipelineInfo::default()),
            Arc::new(AtomicBool::new(false)),
        )
    }

    /// Polls until the source finishes; returns every message as (position, topic, payload).
    fn drain(source: &mut SimulatorSource) -> Vec<(u64, String, Vec<u8>)> {
        let mut out = Outputs::new("sim");
        let mut messages = Vec::new();
        for _ in 0..1_000_000 {
            let poll = source.poll(&mut out).expect("poll");
            for batch in out.take_main() {
                let Batch::Raw(raw) = batch else { panic!("raw batches only") };
                for message in raw.iter() {
                    messages.push((
                        message.position,
                        message.topic.to_owned(),
                        message.payload.to_vec(),
                    ));
                }
            }
            if poll == SourcePoll::Finished {
                return messages;
            }
        }
        panic!("the simulator did not finish");
    }

    fn run(text: &str, workers: usize) -> Vec<(u64, String, Vec<u8>)> {
        let config = config(text);
        let mut all = Vec::new();
        for worker in 0..workers {
            let mut source = SimulatorSource::new(&config, &context(worker, workers)).expect("new");
            all.extend(drain(&mut source));
        }
        all
    }

    fn json(payload: &[u8]) -> serde_json::Value {
        serde_json::from_slice(payload).expect("valid JSON payload")
    }

    #[test]
    fn same_seed_gives_identical_bytes() {
        let text = "devices = 5\ncount = 2000\nstart_ms = 1700000000000\nanomaly_probability = 0.02\njitter_ms = 300";
        let a = run(text, 1);
        let b = run(text, 1);
        assert_eq!(a.len(), 2000);
        assert_eq!(a, b);
        let other = run(&text.replace("devices = 5", "devices = 5\nseed = 2"), 1);
        assert_ne!(a, other);
    }

    #[test]
    fn output_does_not_depend_on_the_number_of_workers() {
        let text = "devices = 7\ncount = 1001\nstart_ms = 1700000000000\nanomaly_probability = 0.05\njitter_ms = 500\nbatch_size = 64";
        let mut one = run(text, 1);
        let mut three = run(text, 3);
        one.sort();
        three.sort();
        assert_eq!(one.len(), 1001);
        assert_eq!(one, three);
    }

    #[test]
    fn count_is_honoured_exactly_across_workers() {
        for workers in [1, 2, 3, 4] {
            let messages = run("devices = 3\ncount = 1000\nbatch_size = 7", workers);
            let mut positions: Vec<u64> = messages.iter().map(|(position, ..)| *position).collect();
            positions.sort_unstable();
            assert_eq!(positions, (0..1000).collect::<Vec<_>>(), "workers = {workers}");
        }
        assert!(run("count = 0", 1).is_empty());
        // More workers than devices: idle workers finish at once.
        assert_eq!(run("devices = 2\ncount = 10", 4).len(), 10);
    }

    #[test]
    fn reading_k_is_tick_k_over_devices_of_device_k_mod_devices() {
        let messages = run("devices = 4\ncount = 40\nstart_ms = 1000\ninterval_ms = 500", 1);
        for (position, topic, payload) in messages {
            let value = json(&payload);
            let device = position % 4;
            let tick = position / 4;
            assert_eq!(value["device"], format!("pump-{device:04}"));
            assert_eq!(value["ts"], 1000 + tick as i64 * 500);
            assert_eq!(topic, format!("factory/site-1/pump/pump-{device:04}/telemetry"));
        }
    }

    #[test]
    fn json_payloads_have_every_field() {
        let messages = run("count = 500\nanomaly_probability = 0.05\nseed = 7", 1);
        let mut anomalous = 0;
        for (_, _, payload) in &messages {
            let value = json(payload);
            assert!(value["device"].is_string());
            assert!(value["ts"].is_i64());
            for feature in FEATURES {
                let number = value[feature].as_f64().expect(feature);
                assert!(number.is_finite());
            }
            match value["anomaly"].as_u64().expect("anomaly") {
                0 => assert!(value.get("anomaly_kind").is_none()),
                1 => {
                    anomalous += 1;
                    let kind = value["anomaly_kind"].as_str().expect("kind");
                    assert!(AnomalyKind::ALL.iter().any(|known| known.name() == kind));
                }
                other => panic!("label {other}"),
            }
        }
        assert!(anomalous > 0);
    }

    #[test]
    fn labels_are_present_when_anomalies_always_start() {
        let messages = run("count = 300\nanomaly_probability = 1.0", 1);
        assert!(messages.iter().all(|(_, _, payload)| json(payload)["anomaly"] == 1));
        let none = run("count = 300\nanomaly_probability = 0.0", 1);
        assert!(none.iter().all(|(_, _, payload)| json(payload)["anomaly"] == 0));
    }

    #[test]
    fn every_anomaly_kind_shows_in_the_data() {
        let messages = run("devices = 4\ncount = 4000\nanomaly_probability = 0.05\nseed = 11", 1);
        let mut kinds = HashMap::new();
        for (_, _, payload) in &messages {
            if let Some(kind) = json(payload)["anomaly_kind"].as_str() {
                *kinds.entry(kind.to_owned()).or_insert(0) += 1;
            }
        }
        for kind in AnomalyKind::ALL {
            assert!(kinds.contains_key(kind.name()), "{kind:?} missing from {kinds:?}");
        }
    }

    fn series(messages: &[(u64, String, Vec<u8>)], device: &str, feature: &str) -> Vec<f64> {
        messages
            .iter()
            .map(|(_, _, payload)| json(payload))
            .filter(|value| value["device"] == device)
            .map(|value| value[feature].as_f64().expect("number"))
            .collect()
    }

    fn correlation(a: &[f64], b: &[f64]) -> f64 {
        let n = a.len() as f64;
        let mean_a = a.iter().sum::<f64>() / n;
        let mean_b = b.iter().sum::<f64>() / n;
        let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - mean_a) * (y - mean_b)).sum();
        let var_a: f64 = a.iter().map(|x| (x - mean_a).powi(2)).sum();
        let var_b: f64 = b.iter().map(|y| (y - mean_b).powi(2)).sum();
        cov / (var_a * var_b).sqrt()
    }

    #[test]
    fn sensors_are_correlated_through_the_physics() {
        // Two days at one reading per minute, no anomalies.
        let messages = run(
            "devices = 2\ncount = 5760\ninterval_ms = 60000\nstart_ms = 0\nanomaly_probability = 0",
            1,
        );
        let flow = series(&messages, "pump-0001", "flow");
        let pressure = series(&messages, "pump-0001", "pressure");
        let current = series(&messages, "pump-0001", "current");
        let temperature = series(&messages, "pump-0001", "temperature");
        assert_eq!(flow.len(), 2880);
        assert!(correlation(&flow, &pressure) > 0.9, "flow/pressure");
        assert!(correlation(&flow, &current) > 0.9, "flow/current");
        assert!(correlation(&current, &temperature) > 0.3, "current/temperature");
        // Daily cycle: flow at noon is well above flow at midnight.
        let midnight = flow[0];
        let noon = flow[720];
        assert!(noon > midnight * 1.2, "noon {noon} midnight {midnight}");
        // Pressure increases with flow: the mean pressure of the high-flow half is higher.
        let mut pairs: Vec<(f64, f64)> = flow.iter().copied().zip(pressure).collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (low, high) = pairs.split_at(pairs.len() / 2);
        let mean = |half: &[(f64, f64)]| half.iter().map(|p| p.1).sum::<f64>() / half.len() as f64;
        assert!(mean(high) > mean(low));
    }

    #[test]
    fn bearing_failure_ramps_vibration_and_drops_flow() {
        let messages = run(
            "devices = 1\ncount = 40\nstart_ms = 0\nanomaly_probability = 1.0\nanomaly_kinds = [\"correlated\"]\nanomaly_duration_ticks = 40",
            1,
        );
        let vibration = series(&messages, "pump-0000", "vibration");
        let flow = series(&messages, "pump-0000", "flow");
        assert!(vibration[39] > vibration[0] * 3.0);
        assert!(flow[39] < flow[0] * 0.8);
    }

    #[test]
    fn stuck_sensor_repeats_its_value() {
        let messages = run(
            "devices = 1\ncount = 30\nanomaly_probability = 1.0\nanomaly_kinds = [\"stuck\"]\nanomaly_duration_ticks = 10",
            1,
        );
        // Ticks 1..10 belong to the first stuck anomaly (it starts at tick 0): one feature
        // keeps the same value throughout.
        let stuck = FEATURES.iter().any(|feature| {
            let values = series(&messages, "pump-0000", feature);
            values[1..10].iter().all(|value| *value == values[1])
        });
        assert!(stuck);
    }

    #[test]
    fn csv_payloads_match_the_header() {
        let config = config("count = 20\nformat = \"csv\"\ndevice_prefix = \"p\"");
        let mut source = SimulatorSource::new(&config, &context(0, 1)).expect("new");
        let mut out = Outputs::new("sim");
        source.poll(&mut out).expect("poll");
        let batches = out.take_main();
        let Some(Batch::Raw(raw)) = batches.first() else { panic!("a raw batch") };
        let header = raw.header().expect("a header line");
        let header: Vec<&str> = std::str::from_utf8(header).expect("utf8").split(',').collect();
        assert_eq!(header, CSV_COLUMNS);
        for message in raw.iter() {
            let line = std::str::from_utf8(message.payload).expect("utf8");
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), header.len(), "{line}");
            assert!(fields[0].starts_with('p'));
            for field in &fields[1..] {
                field.parse::<f64>().expect("number");
            }
        }
    }

    #[test]
    fn jitter_moves_event_time_back_within_bounds() {
        let messages = run("devices = 1\ncount = 200\nstart_ms = 0\njitter_ms = 2500", 1);
        let mut out_of_order = false;
        let mut previous = i64::MIN;
        for (position, _, payload) in &messages {
            let ts = json(payload)["ts"].as_i64().expect("ts");
            let base = *position as i64 * 1000;
            assert!((base - 2500..=base).contains(&ts));
            out_of_order |= ts < previous;
            previous = ts;
        }
        assert!(out_of_order);
    }

    #[test]
    fn rate_pacing_returns_idle_when_ahead() {
        let config = config("devices = 2\nrate_per_sec = 10.0\nbatch_size = 100");
        let mut source = SimulatorSource::new(&config, &context(0, 1)).expect("new");
        let mut out = Outputs::new("sim");
        // At t = 0 nothing is due yet.
        match source.poll(&mut out).expect("poll") {
            SourcePoll::Idle { wake_after_ms } => assert!((1..=1_000).contains(&wake_after_ms)),
            other => panic!("expected idle, got {other:?}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert_eq!(source.poll(&mut out).expect("poll"), SourcePoll::Ready);
        let emitted: usize = out.take_main().iter().map(Batch::len).sum();
        assert!((1..=4).contains(&emitted), "emitted {emitted}");
        assert!(matches!(source.poll(&mut out).expect("poll"), SourcePoll::Idle { .. }));
    }

    #[test]
    fn batches_are_capped_by_batch_size() {
        let config = config("devices = 3\nbatch_size = 10");
        let mut source = SimulatorSource::new(&config, &context(0, 1)).expect("new");
        let mut out = Outputs::new("sim");
        assert_eq!(source.poll(&mut out).expect("poll"), SourcePoll::Ready);
        assert_eq!(out.take_main().iter().map(Batch::len).sum::<usize>(), 10);
    }

    #[test]
    fn default_start_is_shared_by_the_workers_of_a_run() {
        let pipeline = Arc::new(PipelineInfo::default());
        let shutdown = Arc::new(AtomicBool::new(false));
        let a = ComponentContext::new(
            "s",
            "simulator",
            0,
            2,
            Arc::clone(&pipeline),
            Arc::clone(&shutdown),
        );
        let b = ComponentContext::new("s", "simulator", 1, 2, pipeline, shutdown);
        let shared = tidewatch_api::ProcessShared::new();
        let (a, b) = (a.with_process_shared(shared.clone()), b.with_process_shared(shared));
        let start = default_start_ms(&a, 1000);
        assert_eq!(start % 1000, 0);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(default_start_ms(&b, 1000), start);
    }

    #[test]
    fn shutdown_finishes_an_unbounded_simulator() {
        let shutdown = Arc::new(AtomicBool::new(false));
        let ctx = ComponentContext::new(
            "sim",
            "simulator",
            0,
            1,
            Arc::new(PipelineInfo::default()),
            Arc::clone(&shutdown),
        );
        let mut source = SimulatorSource::new(&SimulatorConfig::default(), &ctx).expect("new");
        let mut out = Outputs::new("sim");
        assert_eq!(source.poll(&mut out).expect("poll"), SourcePoll::Ready);
        shutdown.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(source.poll(&mut out).expect("poll"), SourcePoll::Finished);
    }

    #[test]
    fn fixed_point_writer_rounds() {
        let mut buf = Vec::new();
        for (value, decimals, expected) in [
            (2.3149, 3, "2.315"),
            (-0.004, 2, "0.00"),
            (-1.25, 1, "-1.3"),
            (0.0, 3, "0.000"),
            (41.7, 2, "41.70"),
            (1234567.891, 0, "1234568"),
            (f64::NAN, 2, "0"),
        ] {
            buf.clear();
            write_fixed(&mut buf, value, decimals);
            assert_eq!(std::str::from_utf8(&buf).expect("utf8"), expected);
        }
        buf.clear();
        write_i64(&mut buf, i64::MIN);
        assert_eq!(std::str::from_utf8(&buf).expect("utf8"), i64::MIN.to_string());
    }

    #[test]
    fn invalid_options_are_rejected() {
        let factory = SimulatorFactory;
        let ctx = ValidateContext::default();
        for (text, field) in [
            ("devices = 0", "devices"),
            ("interval_ms = 0", "interval_ms"),
            ("rate_per_sec = -1.0", "rate_per_sec"),
            ("rate_per_sec = nan", "rate_per_sec"),
            ("batch_size = 0", "batch_size"),
            ("anomaly_probability = 1.5", "anomaly_probability"),
            ("anomaly_duration_ticks = 0", "anomaly_duration_ticks"),
            ("anomaly_kinds = []", "anomaly_kinds"),
            ("device_prefix = \"a,b\"", "device_prefix"),
        ] {
            let error = factory.output_type(&config(text), &ctx).expect_err(text);
            assert_eq!(error.field.as_deref(), Some(field), "{text}");
        }
        assert!(factory.output_type(&config(""), &ctx).is_ok());
        let unknown = ConfigValue::parse("devices = 3\ndevice = 4")
            .expect("toml")
            .deserialize::<SimulatorConfig>();
        assert!(unknown.is_err());
        let bad_kind = ConfigValue::parse("anomaly_kinds = [\"nope\"]")
            .expect("toml")
            .deserialize::<SimulatorConfig>();
        assert!(bad_kind.is_err());
    }
}

//! Embedding tidewatch: register an operator of your own and use it by name in TOML.
//!
//! `ewma` smooths every feature of every device's readings with an exponentially weighted
//! moving average (state per device, so it declares itself keyed and the engine routes each
//! device to one worker).
//!
//! ```text
//! cargo run --release --example custom_operator
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use tidewatch::api::{
    Batch, ComponentContext, ComponentError, ConfigError, DeviceId, Kind, Outputs, PortType,
};
use tidewatch::api::{
    ReadingBatch, Transform, TransformFactory, TransformProperties, ValidateContext,
};
use tidewatch::{ComponentFactory, Registry, RunContext};

/// Options of the `ewma` transform.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EwmaConfig {
    /// Weight of the newest reading, in (0, 1]. Default 0.2.
    #[serde(default = "default_alpha")]
    pub alpha: f32,
}

fn default_alpha() -> f32 {
    0.2
}

/// The factory the registry stores under "ewma".
#[derive(Debug)]
pub struct EwmaFactory;

impl TransformFactory for EwmaFactory {
    type Config = EwmaConfig;

    fn accepts(&self, _config: &EwmaConfig) -> Vec<Kind> {
        vec![Kind::Readings]
    }

    fn validate(&self, config: &EwmaConfig, _ctx: &ValidateContext) -> Result<(), ConfigError> {
        if !(config.alpha > 0.0 && config.alpha <= 1.0) {
            return Err(ConfigError::at_field("alpha", "`alpha` must be in (0, 1]"));
        }
        Ok(())
    }

    fn output_type(
        &self,
        _config: &EwmaConfig,
        input: &PortType,
        _ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        Ok(input.clone())
    }

    fn properties(&self, _config: &EwmaConfig) -> TransformProperties {
        TransformProperties { keyed: true, ..TransformProperties::default() }
    }

    fn build(
        &self,
        config: &EwmaConfig,
        _ctx: &ComponentContext,
    ) -> Result<Box<dyn Transform>, ComponentError> {
        Ok(Box::new(Ewma { alpha: config.alpha, state: HashMap::new() }))
    }
}

struct Ewma {
    alpha: f32,
    state: HashMap<DeviceId, Vec<f32>>,
}

impl Transform for Ewma {
    fn process_batch(&mut self, batch: Batch, out: &mut Outputs) {
        let Batch::Readings(readings) = batch else { return };
        let mut smoothed =
            ReadingBatch::with_capacity(Arc::clone(&readings.schema), readings.len());
        for reading in readings.iter() {
            let state = self.state.entry(reading.device).or_insert_with(|| reading.values.to_vec());
            for (average, value) in state.iter_mut().zip(reading.values) {
                if value.is_finite() {
                    *average += self.alpha * (value - *average);
                }
            }
            smoothed.push(reading.device, reading.time_ms, state, reading.label);
        }
        out.emit(Batch::Readings(smoothed));
    }
}

/// The builtins plus `ewma`.
pub fn registry() -> Registry {
    tidewatch::builtins().register("ewma", ComponentFactory::transform(EwmaFactory))
}

/// A pipeline that uses `ewma` by name.
pub const PIPELINE: &str = r#"
[pipeline]
name = "embedded"
out_of_orderness_ms = 0
http_address = ""

[sources.fleet]
type = "simulator"
devices = 4
count = 400
start_ms = 1700000000000
seed = 3

[transforms.readings]
type = "normalize"
inputs = ["fleet"]
device_field = "device"
timestamp_field = "ts"
features = ["vibration", "current", "pressure", "temperature", "flow"]

[transforms.smooth]
type = "ewma"
inputs = ["readings"]
alpha = 0.3

[transforms.windows]
type = "window"
inputs = ["smooth"]
size_ms = 10000

[transforms.baseline]
type = "stats"
inputs = ["windows"]

[sinks.out]
type = "file"
inputs = ["baseline"]
path = "${EMBEDDED_OUT}"
"#;

/// Runs [`PIPELINE`] writing scores to `out`; returns the number of score lines.
pub fn run_embedded(out: &std::path::Path, workers: usize) -> anyhow::Result<usize> {
    let registry = registry();
    let out_text = out.display().to_string();
    let pipeline = tidewatch::engine::load_str(
        PIPELINE,
        "embedded.toml",
        std::path::Path::new("."),
        &registry,
        |name| (name == "EMBEDDED_OUT").then(|| out_text.clone()),
    )?;
    tidewatch::run(&pipeline, workers, &RunContext::default())?;
    let text = std::fs::read_to_string(out)?;
    Ok(text.lines().count())
}

#[allow(dead_code)]
fn main() -> anyhow::Result<()> {
    let out = std::env::temp_dir().join("tidewatch-embedded-scores.jsonl");
    let lines = run_embedded(&out, 2)?;
    println!("ewma pipeline wrote {lines} scores to {}", out.display());
    Ok(())
}

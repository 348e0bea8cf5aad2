//! A quick throughput check of `normalize` on simulator-like JSON and CSV batches (1000 pumps,
//! 1024 messages a batch), for before/after comparisons without criterion:
//!
//! `cargo test --release -p tidewatch-operators --test throughput -- --ignored --nocapture`

use std::sync::Arc;
use std::time::Instant;

use tidewatch_api::{ComponentContext, ConfigValue, Outputs, RawBatch};
use tidewatch_operators::{Normalize, NormalizeConfig, NormalizeOptions};

const DEVICES: usize = 1_000;
const BATCH: usize = 1_024;
const FEATURES: [&str; 5] = ["vibration", "current", "pressure", "temperature", "flow"];

fn batches(json: bool, count: usize) -> Vec<RawBatch> {
    shaped(json, false, count)
}

/// Messages with the sensor values flat, or (`nested`) in an object `sensors` of an array.
fn shaped(json: bool, nested: bool, count: usize) -> Vec<RawBatch> {
    let names: Vec<&str> =
        ["device", "ts"].into_iter().chain(FEATURES).chain(["anomaly"]).collect();
    let header: Option<Arc<[u8]>> = (!json).then(|| Arc::from(names.join(",").as_bytes()));
    let fresh = || {
        let mut batch = RawBatch::new();
        if let Some(header) = &header {
            batch.set_header(Arc::clone(header));
        }
        batch
    };
    let mut out = Vec::new();
    let mut batch = fresh();
    for index in 0..count {
        let device = index % DEVICES;
        let ts = 1_700_000_000_000_i64 + (index / DEVICES) as i64 * 1000;
        let values = [0.51 + (index % 7) as f64 * 0.01, 12.2, 3.41, 61.5, 24.75];
        let topic = format!("factory/site-{}/pump/pump-{device}/telemetry", device % 4);
        let payload = if json && nested {
            format!(
                "{{\"meta\":{{\"device\":\"pump-{device}\",\"ts\":{ts}}},\"sensors\":[{{\"vibration\":{:.3},\
                 \"current\":{:.2}}},{{\"pressure\":{:.3},\"temperature\":{:.2},\"flow\":{:.2}}}],\"anomaly\":0}}",
                values[0], values[1], values[2], values[3], values[4]
            )
        } else if json {
            format!(
                "{{\"device\":\"pump-{device}\",\"ts\":{ts},\"vibration\":{:.3},\"current\":{:.2},\
                 \"pressure\":{:.3},\"temperature\":{:.2},\"flow\":{:.2},\"anomaly\":0}}",
                values[0], values[1], values[2], values[3], values[4]
            )
        } else {
            format!(
                "pump-{device},{ts},{:.3},{:.2},{:.3},{:.2},{:.2},0",
                values[0], values[1], values[2], values[3], values[4]
            )
        };
        batch.push(&topic, payload.as_bytes(), 0, index as u64);
        if batch.len() == BATCH {
            out.push(std::mem::replace(&mut batch, fresh()));
        }
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

const BASE: &str = r#"
features = ["vibration", "current", "pressure", "temperature", "flow"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
"#;

fn measure(name: &str, mut op: Normalize, batches: &[RawBatch]) {
    let total: usize = batches.iter().map(RawBatch::len).sum();
    let mut out = Outputs::new("n");
    let mut best = f64::MAX;
    for _ in 0..7 {
        let start = Instant::now();
        let mut readings = 0;
        for raw in batches {
            op.normalize_batch(raw, &mut out);
            readings += out.take_main().iter().map(|batch| batch.len()).sum::<usize>();
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert_eq!(readings, total, "{name}: {:?}", out.take_errors().first());
        best = best.min(elapsed);
    }
    println!("{name:<28} {:>8.2} M messages/s", total as f64 / best / 1e6);
}

fn base(toml: &str) -> Normalize {
    let config: NormalizeConfig =
        ConfigValue::parse(toml).expect("toml").deserialize().expect("config");
    Normalize::new(&config, &ComponentContext::for_test("n", "normalize")).expect("valid")
}

#[test]
#[ignore = "timing; run in release with --ignored --nocapture"]
fn normalize_throughput() {
    let json = batches(true, 200 * BATCH);
    let csv = batches(false, 200 * BATCH);
    measure("json", base(BASE), &json);
    measure("csv", base(BASE), &csv);
}

fn mediated(toml: &str) -> Normalize {
    let options: NormalizeOptions =
        ConfigValue::parse(toml).expect("toml").deserialize().expect("options");
    Normalize::with_options(&options, &ComponentContext::for_test("n", "normalize")).expect("valid")
}

#[test]
#[ignore = "timing; run in release with --ignored --nocapture"]
fn mediated_throughput() {
    let json = batches(true, 200 * BATCH);
    let csv = batches(false, 200 * BATCH);
    let nested = shaped(true, true, 200 * BATCH);
    measure("json (options path)", mediated(BASE), &json);
    let pointers = r#"
        features = ["vibration", "current", "pressure", "temperature", "flow"]
        device_field = "/meta/device"
        timestamp_field = "/meta/ts"
        timestamp_format = "unix_ms"
        rename = { vibration = "/sensors/0/vibration", current = "/sensors/0/current", pressure = "/sensors/1/pressure", temperature = "/sensors/1/temperature", flow = "/sensors/1/flow" }
    "#;
    measure("json nested, pointers", mediated(pointers), &nested);
    let full = r#"
        features = ["vibration", "current", "pressure", "temperature", "flow"]
        timestamp_field = "ts"
        timestamp_format = "unix_ms"
        topic_template = "factory/{site}/pump/{device}/telemetry"
        device_from_topic = "device"
        on_missing = "hold_last"
        convert.temperature = { type = "unit", from = "degF", to = "degC" }
        convert.pressure = { type = "unit", from = "psi", to = "bar" }
        convert.flow = { type = "linear", scale = 0.5, offset = 1.0 }
    "#;
    measure("json topic+convert+hold", mediated(full), &json);
    measure("csv topic+convert+hold", mediated(full), &csv);
}

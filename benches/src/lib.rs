//! Shared setup of the tidewatch benchmarks (`benches/benches/*.rs`).
//!
//! The benchmarks themselves live in `benches/`; this library holds what they share: the
//! criterion settings, the "real run or test run" switch, and the generation of their input
//! data (raw messages from the simulator, normalized readings, the end-to-end pipeline file).
//! Every input is generated before timing starts, so a benchmark times only the operator
//! it names.
//!
//! `cargo bench -p tidewatch-benches` runs the benchmarks; `cargo test --all-targets` runs
//! each once, on a debug build, with small inputs (see [`full_run`]).

use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, SamplingMode};
use tidewatch_api::{
    Batch, ComponentContext, Outputs, RawBatch, ReadingBatch, Source, SourcePoll, TimestampFormat,
};
use tidewatch_connectors::{SimulatorConfig, SimulatorFormat, SimulatorSource};
use tidewatch_engine::{Pipeline, Registry, load_str};
use tidewatch_operators::{Normalize, NormalizeConfig, NormalizeFormat, OnMissing};

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
        format: NormalizeFormat::Auto,
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
/// If the file no longer has exactly one `count = ...` line.
pub fn bench_toml(count: usize) -> String {
    let mut replaced = 0;
    let lines: Vec<String> = BENCH_TOML
        .lines()
        .map(|line| {
            let key = line.split('=').next().unwrap_or_default().trim();
            if key == "count" && line.contains('=') {
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
    let registry = Registry::with_builtins();
    match load_str(&bench_toml(count), "bench.toml", Path::new("."), &registry, |_| None) {
        Ok(pipeline) => pipeline,
        Err(errors) => panic!("pipelines/bench.toml does not validate: {errors}"),
    }
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
}

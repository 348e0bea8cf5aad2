//! Named outputs and `route`: a route's outputs feed sinks end to end, with any number of
//! workers and with checkpoints (every named output carries the barriers and end markers).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::process::Process;

/// The golden input through `normalize`, a `route` by pressure, and three file sinks: the hot
/// route, the rest (`otherwise`), and every reading.
const PIPELINE: &str = r#"
[pipeline]
out_of_orderness_ms = 1000
http_address = ""

[sources.input]
type = "file"
path = "tests/fixtures/golden/input.csv"
batch_size = 4

[transforms.readings]
type = "normalize"
inputs = ["input"]
delimiter = ";"
device_field = "pump"
timestamp_field = "datetime"
timestamp_format = "datetime"
features = ["vibration", "pressure"]
rename = { vibration = "Accelerometer1RMS", pressure = "Pressure" }

[transforms.by_pressure]
type = "route"
inputs = ["readings"]
otherwise = "normal"
routes = [{ name = "hot", when = { field = "pressure", op = "gt", value = 1.5 } }]

[sinks.hot]
type = "file"
inputs = ["by_pressure.hot"]
path = "${DIR}/hot.jsonl"

[sinks.normal]
type = "file"
inputs = ["by_pressure.normal"]
path = "${DIR}/normal.jsonl"

[sinks.all]
type = "file"
inputs = ["readings"]
path = "${DIR}/all.jsonl"
"#;

/// (device, time, pressure) of each reading in a JSON-lines file.
fn readings(path: &Path) -> Vec<(String, i64, f64)> {
    let mut readings: Vec<(String, i64, f64)> = common::json_lines(path)
        .iter()
        .map(|reading| {
            (
                reading["device"].as_str().expect("device").to_owned(),
                reading["time_ms"].as_i64().expect("time_ms"),
                reading["values"]["pressure"].as_f64().expect("pressure"),
            )
        })
        .collect();
    readings.sort_by(|a, b| a.partial_cmp(b).expect("no NaN pressure"));
    readings
}

#[test]
fn a_routes_hot_output_reaches_its_sink_and_every_reading_takes_one_route() {
    for workers in [1, 2] {
        let dir = tempfile::tempdir().expect("tempdir");
        common::run(PIPELINE, &[("DIR", dir.path().display().to_string())], workers);
        let hot = readings(&dir.path().join("hot.jsonl"));
        let normal = readings(&dir.path().join("normal.jsonl"));
        let all = readings(&dir.path().join("all.jsonl"));
        assert!(!hot.is_empty() && !normal.is_empty(), "{workers} workers: {hot:?} {normal:?}");
        assert!(hot.iter().all(|(_, _, pressure)| *pressure > 1.5), "{hot:?}");
        assert!(normal.iter().all(|(_, _, pressure)| *pressure <= 1.5), "{normal:?}");
        let mut routed: Vec<_> = hot.into_iter().chain(normal).collect();
        routed.sort_by(|a, b| a.partial_cmp(b).expect("no NaN pressure"));
        assert_eq!(routed, all, "{workers} workers: each reading on exactly one route");
    }
}

#[test]
fn graph_draws_named_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("route.toml");
    let text = PIPELINE
        .replace("${DIR}", &dir.path().display().to_string())
        .replace("tests/fixtures", &common::root().join("tests/fixtures").display().to_string());
    std::fs::write(&path, text).expect("pipeline");
    let output = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .args(["graph", &path.display().to_string()])
        .output()
        .expect("runs");
    let mermaid = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{mermaid}");
    assert!(mermaid.contains("by_pressure -->|hot: readings| hot"), "{mermaid}");
    assert!(mermaid.contains("by_pressure -->|normal: readings| normal"), "{mermaid}");
}

#[test]
fn validate_names_the_line_and_column_of_an_unknown_port() {
    let output = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .current_dir(common::root())
        .args(["validate", "tests/fixtures/invalid/unknown_port.toml"])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "tests/fixtures/invalid/unknown_port.toml:19:26: error: unknown output `by_heat.nosuch`: `by_heat` has no output `nosuch`"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("`by_heat.hot`, `by_heat.normal` and `by_heat.errors`"), "{stderr}");
}

#[test]
fn named_outputs_carry_checkpoint_barriers_and_end_markers() {
    // Two workers and a checkpoint every second while a file is read (on worker 0): each
    // sink behind a named output must receive every epoch's barriers and the end markers, or
    // no checkpoint completes and the run never ends. The high route goes through session
    // windows, which snapshot at every checkpoint.
    let dir = tempfile::tempdir().expect("tempdir");
    let lines = 3_000u64;
    common::write_pump_readings(&dir.path().join("in.jsonl"), lines, |i| i % 7);
    let pipeline = dir.path().join("route.toml");
    let text = common::checkpointed_readings_toml(&dir.path().join("ck"))
        + r#"
[transforms.split]
type = "route"
inputs = ["readings"]
otherwise = "low"
routes = [{ name = "high", when = { field = "value", op = "ge", value = 4.0 } }]

[transforms.windows]
type = "window"
inputs = ["split.high"]
gap_ms = 25000
max_size_ms = 120000

[sinks.high]
type = "file"
inputs = ["windows"]
path = "high.jsonl"

[sinks.low]
type = "file"
inputs = ["split.low"]
path = "low.jsonl"
"#;
    std::fs::write(&pipeline, text).expect("pipeline");
    let debug = [("RUST_LOG", "info,tidewatch_engine::checkpoint=debug".to_owned())];
    let log = Process::run(&pipeline, &debug, dir.path().join("route.log"))
        .wait_exit(Duration::from_secs(120));
    let completed = log.matches("checkpoint complete").count();
    assert!(completed >= 2, "checkpoints were taken while the file was read:\n{log}");
    let windows = common::json_lines(&dir.path().join("high.jsonl"));
    let high: usize =
        windows.iter().map(|window| window["times"].as_array().map_or(0, Vec::len)).sum();
    let low = common::json_lines(&dir.path().join("low.jsonl"));
    let expected_high = (0..lines).filter(|i| i % 7 >= 4).count();
    assert_eq!(high, expected_high, "every high reading in a session, once");
    assert!(
        windows.iter().all(|window| {
            let span =
                window["end_ms"].as_i64().unwrap_or(0) - window["start_ms"].as_i64().unwrap_or(0);
            (1..=120_000).contains(&span)
        }),
        "sessions last at most max_size_ms"
    );
    assert_eq!(low.len(), lines as usize - expected_high, "every low reading, once");
    let values: BTreeSet<i64> = low
        .iter()
        .filter_map(|reading| reading["values"]["value"].as_f64())
        .map(|v| v as i64)
        .collect();
    assert_eq!(values, BTreeSet::from([0, 1, 2, 3]));
}

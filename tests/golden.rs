//! The golden test: a small pipeline from TOML over a fixed input; the whole output is
//! compared with the expected file (`TIDEWATCH_BLESS=1` rewrites it after a deliberate change).

mod common;

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
label_field = "anomaly"

[transforms.readings.rename]
vibration = "Accelerometer1RMS"
pressure = "Pressure"

[transforms.windows]
type = "window"
inputs = ["readings"]
size_ms = 4000
slide_ms = 2000

[transforms.stats]
type = "stats"
inputs = ["windows"]
warmup_windows = 2
threshold = 3.0

[sinks.out]
type = "file"
inputs = ["stats", "readings.errors", "windows.late"]
path = "${OUT}"
"#;

#[test]
fn small_pipeline_matches_the_golden_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.jsonl");
    common::run(PIPELINE, &[("OUT", out.display().to_string())], 1);
    let mut actual: Vec<String> =
        std::fs::read_to_string(&out).expect("output").lines().map(str::to_owned).collect();
    // Error records carry the processing time; blank it so the output is reproducible.
    for line in &mut actual {
        if let Ok(mut value) = serde_json::from_str::<serde_json::Value>(line)
            && value.get("time_ms").is_some()
            && value.get("error_type").is_some()
        {
            value["time_ms"] = serde_json::Value::from(0);
            *line = value.to_string();
        }
    }
    let actual = actual.join("\n") + "\n";
    let expected_path = common::root().join("tests/fixtures/golden/expected.jsonl");
    if std::env::var_os("TIDEWATCH_BLESS").is_some() {
        std::fs::write(&expected_path, &actual).expect("bless");
    }
    let expected = std::fs::read_to_string(&expected_path).expect("expected output");
    assert_eq!(actual, expected, "output differs from tests/fixtures/golden/expected.jsonl");
}

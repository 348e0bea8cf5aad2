//! Detection: training with `training/train.py`, both inference backends, the autoencoder
//! and threshold operators in pipelines, hot model swap, and the backtest's exact metrics.
//!
//! Needs the Python environment that `scripts/test.sh` creates in `.venv`.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use tidewatch::api::{Batch, DeviceId, Schema, Window};
use tidewatch::inference::{Backend, BackendKind, ModelSpec, OnnxRuntime, Tract, find_onnxruntime};
use tidewatch::operators::Scorer;

use common::train;

/// A deterministic noise in [-1, 1).
fn noise(seed: &mut u64) -> f64 {
    *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

/// `rows` rows at 1 Hz of three smooth sensors; rows in `anomaly` are shifted far away.
fn synthetic_csv(path: &Path, rows: usize, anomaly: std::ops::Range<usize>, columns: &[&str]) {
    let mut seed = 7;
    let mut text = format!("datetime;{};anomaly\n", columns.join(";"));
    for row in 0..rows {
        let second = row as i64;
        let time =
            format!("2024-01-01 {:02}:{:02}:{:02}", second / 3600, (second / 60) % 60, second % 60);
        let shift = if anomaly.contains(&row) { 50.0 } else { 0.0 };
        let phase = row as f64 / 10.0;
        let values: Vec<String> = (0..columns.len())
            .map(|column| {
                let base =
                    (phase + column as f64).sin() * (1.0 + column as f64) + 10.0 * column as f64;
                format!("{:.5}", base + 0.01 * noise(&mut seed) + shift)
            })
            .collect();
        let _ = writeln!(text, "{time};{};{}", values.join(";"), u8::from(anomaly.contains(&row)));
    }
    std::fs::write(path, text).expect("write csv");
}

fn window(device: &str, start_ms: i64, steps: usize, features: usize, offset: f32) -> Window {
    let values =
        (0..steps * features).map(|index| ((index as f32) * 0.37).sin() + offset).collect();
    Window {
        device: DeviceId::intern(device),
        start_ms,
        end_ms: start_ms + steps as i64 * 1000,
        schema: std::sync::Arc::new(Schema::new((0..features).map(|index| format!("f{index}")))),
        times: (0..steps as i64).map(|step| start_ms + step * 1000).collect(),
        values,
        label: 0,
    }
}

fn shipped_models() -> Vec<PathBuf> {
    let mut models: Vec<PathBuf> = std::fs::read_dir(common::root().join("models"))
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.path())
                .filter(|path| path.join("model.onnx").is_file())
                .collect()
        })
        .unwrap_or_default();
    models.sort();
    models
}

#[test]
fn both_backends_load_the_shipped_models_and_agree() {
    let models = shipped_models();
    assert!(!models.is_empty(), "no model under models/");
    let library =
        find_onnxruntime(None).expect("ONNX Runtime from .venv (scripts/test.sh installs it)");
    for model in models {
        let spec = ModelSpec::read(&model.join("model.json")).expect("model.json");
        let onnx = model.join("model.onnx");
        let mut tract = Tract::load(&onnx, &spec).expect("tract loads");
        let mut ort = OnnxRuntime::load(&onnx, &spec, &library).expect("onnxruntime loads");
        let width = spec.width();
        let mut seed = 3;
        let input: Vec<f32> = (0..64 * width).map(|_| noise(&mut seed) as f32 * 2.0).collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        tract.run(&input, width, &mut a).expect("tract runs");
        ort.run(&input, width, &mut b).expect("onnxruntime runs");
        assert_eq!(a.len(), input.len());
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{}: backends differ by {worst}", model.display());
    }
}

#[test]
fn trained_model_scores_in_batches_exactly_as_one_at_a_time_on_both_backends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("train.csv");
    synthetic_csv(&csv, 300, 0..0, &["f0", "f1", "f2"]);
    let model = dir.path().join("model");
    train(&csv, &model, &["--family", "pca", "--window", "6", "--features", "f0", "f1", "f2"]);
    for backend in [BackendKind::Tract, BackendKind::Onnxruntime] {
        let mut scorer = Scorer::load(&model, backend, None, None).expect("loads");
        assert_eq!(scorer.length(), 6);
        let windows: Vec<Window> = (0..50)
            .map(|index| {
                window("d", index * 1000, 6 + (index as usize % 3), 3, index as f32 * 0.01)
            })
            .collect();
        let refs: Vec<&Window> = windows.iter().collect();
        let batched = scorer.score(&refs).expect("batch");
        for (one, expected) in refs.iter().zip(&batched) {
            let single = scorer.score(&[*one]).expect("single");
            assert!(
                (single[0].score - expected.score).abs() <= 1e-6 * expected.score.max(1.0),
                "{backend:?}"
            );
            assert_eq!(single[0].per_feature.len(), 3);
        }
        // The per-feature errors explain the score: their mean is the score.
        let first = &batched[0];
        let mean: f64 = first.per_feature.iter().map(|value| f64::from(*value)).sum::<f64>() / 3.0;
        assert!((mean - first.score).abs() < 1e-4 * first.score.max(1.0));
    }
}

/// The conv family (banded MatMuls and Tanh) and per-feature error weights (two `Mul` nodes,
/// the weights folded into the scaler) load and score the same on both backends (#16).
#[test]
fn the_conv_family_and_error_weights_score_the_same_on_both_backends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("train.csv");
    synthetic_csv(&csv, 300, 0..0, &["f0", "f1", "f2"]);
    let features = ["--window", "6", "--features", "f0", "f1", "f2"];
    let variants: [&[&str]; 2] = [
        &["--family", "conv", "--channels", "2", "--epochs", "3"],
        &["--family", "pca", "--error-weights", "residual"],
    ];
    for (index, variant) in variants.iter().enumerate() {
        let model = dir.path().join(format!("model-{index}"));
        train(&csv, &model, &[*variant, &features[..]].concat());
        let spec: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(model.join("model.json")).expect("model.json"),
        )
        .expect("json");
        assert_eq!(spec["threshold"]["method"], "pot", "{variant:?}");
        let windows: Vec<Window> =
            (0..40).map(|index| window("d", index * 1000, 6, 3, index as f32 * 0.05)).collect();
        let refs: Vec<&Window> = windows.iter().collect();
        let mut scores = Vec::new();
        for backend in [BackendKind::Tract, BackendKind::Onnxruntime] {
            let mut scorer = Scorer::load(&model, backend, None, None).expect("loads");
            let scored = scorer.score(&refs).expect("scores");
            for one in &scored {
                assert!(one.score.is_finite() && one.score > 0.0, "{variant:?} {backend:?}");
                let mean: f64 =
                    one.per_feature.iter().map(|value| f64::from(*value)).sum::<f64>() / 3.0;
                assert!((mean - one.score).abs() < 1e-4 * one.score.max(1.0), "{variant:?}");
            }
            scores.push(scored.iter().map(|one| one.score).collect::<Vec<f64>>());
        }
        for (tract, ort) in scores[0].iter().zip(&scores[1]) {
            assert!((tract - ort).abs() <= 1e-5 * ort.max(1.0), "{variant:?}: {tract} vs {ort}");
        }
    }
}

const SCORING_PIPELINE: &str = r#"
[pipeline]
out_of_orderness_ms = 0
http_address = ""

[sources.data]
type = "file"
path = "${DATA}"

[transforms.readings]
type = "normalize"
inputs = ["data"]
delimiter = ";"
device = "pump"
timestamp_field = "datetime"
features = ["f0", "f1", "f2"]
label_field = "anomaly"

[transforms.windows]
type = "window"
inputs = ["readings"]
size_ms = 6000
slide_ms = 1000

[transforms.model]
type = "autoencoder"
inputs = ["windows"]
model = "${MODEL}"
backend = "${BACKEND:-auto}"

[transforms.alerts]
type = "threshold"
inputs = ["model"]

[sinks.scores]
type = "file"
inputs = ["model"]
path = "${OUT}/scores.jsonl"

[sinks.events]
type = "file"
inputs = ["alerts"]
path = "${OUT}/events.jsonl"
"#;

#[test]
fn a_pipeline_scores_windows_and_opens_and_closes_anomalies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let train_csv = dir.path().join("train.csv");
    synthetic_csv(&train_csv, 300, 0..0, &["f0", "f1", "f2"]);
    let model = dir.path().join("model");
    train(
        &train_csv,
        &model,
        &[
            "--family",
            "pca",
            "--window",
            "6",
            "--features",
            "f0",
            "f1",
            "f2",
            "--quantile",
            "1.0",
            "--factor",
            "3",
        ],
    );
    let data = dir.path().join("data.csv");
    synthetic_csv(&data, 200, 100..120, &["f0", "f1", "f2"]);
    let vars = [
        ("DATA", data.display().to_string()),
        ("MODEL", model.display().to_string()),
        ("OUT", dir.path().display().to_string()),
    ];
    common::run(SCORING_PIPELINE, &vars, 1);
    let scores = common::json_lines(&dir.path().join("scores.jsonl"));
    // 200 rows, windows of 6 sliding by 1 s: 195 full windows (the shorter ones at the start
    // are discarded), each scored once.
    assert_eq!(scores.len(), 195);
    let flagged: Vec<i64> = scores
        .iter()
        .filter(|s| s["anomaly"] == true)
        .filter_map(|s| s["end_ms"].as_i64())
        .collect();
    let first_anomalous_end = scores
        .iter()
        .filter(|s| s["label"] == 1)
        .filter_map(|s| s["end_ms"].as_i64())
        .min()
        .expect("labelled windows");
    assert_eq!(
        flagged.first().copied(),
        Some(first_anomalous_end),
        "the first window touching the anomaly is flagged"
    );
    assert_eq!(flagged.len(), 20 + 5, "windows touching the 20 anomalous rows");
    assert!(scores.iter().all(|s| s["values"].as_object().is_some_and(|values| values.len() == 3)));
    let events = common::json_lines(&dir.path().join("events.jsonl"));
    let states: Vec<&str> = events.iter().filter_map(|event| event["state"].as_str()).collect();
    assert_eq!(states, ["open", "close"]);
    assert!(events[1]["peak_score"].as_f64() >= events[0]["score"].as_f64());
}

#[test]
fn model_problems_are_clear_errors_before_anything_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data.csv");
    synthetic_csv(&data, 20, 0..0, &["f0", "f1", "f2"]);
    let vars = |model: &Path, backend: &str| {
        vec![
            ("DATA", data.display().to_string()),
            ("MODEL", model.display().to_string()),
            ("OUT", dir.path().display().to_string()),
            ("BACKEND", backend.to_owned()),
        ]
    };
    // Missing model: a validation error at the `model` option.
    let missing = dir.path().join("nowhere");
    let errors =
        common::load(SCORING_PIPELINE, &vars(&missing, "auto")).expect_err("missing model");
    let text = errors.to_string();
    assert!(text.contains("test.toml:28:1: error: cannot read"), "{text}");

    // Features that differ from the pipeline's: a validation error naming both.
    let other = dir.path().join("other.csv");
    synthetic_csv(&other, 100, 0..0, &["a", "b", "c"]);
    let mismatched = dir.path().join("mismatched");
    train(&other, &mismatched, &["--family", "pca", "--window", "6", "--features", "a", "b", "c"]);
    let text = common::load(SCORING_PIPELINE, &vars(&mismatched, "auto"))
        .expect_err("mismatch")
        .to_string();
    assert!(text.contains("the model's features [\"a\", \"b\", \"c\"] do not match the pipeline's [\"f0\", \"f1\", \"f2\"]"), "{text}");

    // A corrupt model file: the run fails at start with the file and the reason.
    let corrupt = dir.path().join("corrupt");
    train(&data, &corrupt, &["--family", "pca", "--window", "6", "--features", "f0", "f1", "f2"]);
    std::fs::write(corrupt.join("model.onnx"), b"not an onnx file").expect("corrupt");
    for backend in ["tract", "onnxruntime"] {
        let pipeline = common::load(SCORING_PIPELINE, &vars(&corrupt, backend)).expect("validates");
        let error = tidewatch::run(&pipeline, 1, &tidewatch::RunContext::default())
            .expect_err("corrupt model");
        let text = error.to_string();
        assert!(
            text.contains("component `model`") && text.contains("model.onnx"),
            "{backend}: {text}"
        );
    }

    // ONNX Runtime asked for where there is none: a validation error, not a panic.
    let model = dir.path().join("good");
    train(&data, &model, &["--family", "pca", "--window", "6", "--features", "f0", "f1", "f2"]);
    let text = SCORING_PIPELINE.replace(
        "backend = \"${BACKEND:-auto}\"",
        "backend = \"onnxruntime\"\nonnxruntime_library = \"/nonexistent/libonnxruntime.so\"",
    );
    let errors = common::load(&text, &vars(&model, "auto")).expect_err("no runtime").to_string();
    assert!(errors.contains("no ONNX Runtime library was found"), "{errors}");
}

#[test]
fn hot_swap_under_load_loses_and_repeats_no_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let columns = ["vibration", "current", "pressure", "temperature", "flow"];
    let csv = dir.path().join("fleet.csv");
    synthetic_csv(&csv, 400, 0..0, &columns);
    let first = dir.path().join("v1");
    let second = dir.path().join("v2");
    let mut args = vec!["--family", "pca", "--window", "5", "--features"];
    args.extend(columns);
    train(&csv, &first, &[args.as_slice(), &["--version", "v1"]].concat());
    train(&csv, &second, &[args.as_slice(), &["--version", "v2", "--quantile", "0.5"]].concat());
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).expect("live dir");
    for file in ["model.onnx", "model.json"] {
        std::fs::copy(first.join(file), live.join(file)).expect("install v1");
    }
    let text =
        common::hot_swap_pipeline(&columns, &live, &dir.path().join("scores.jsonl"), 200_000);
    let pipeline = common::load(&text, &[]).expect("valid");
    let context = tidewatch::RunContext::default();
    let runner = {
        let context = context.clone();
        std::thread::spawn(move || tidewatch::run(&pipeline, 2, &context))
    };
    // Swap once some windows were scored with v1: the model file first, then model.json
    // (which the operator watches), each by an atomic rename.
    while context.metrics.sent("model", "autoencoder") < 2000 && !runner.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    for file in ["model.onnx", "model.json"] {
        let staged = live.join(format!("{file}.new"));
        std::fs::copy(second.join(file), &staged).expect("stage v2");
        std::fs::rename(&staged, live.join(file)).expect("install v2");
    }
    runner.join().expect("no panic").expect("runs");
    let scores = common::json_lines(&dir.path().join("scores.jsonl"));
    // 400 000 readings of 40 devices at 1 s: 10 000 s each, 2 000 windows of 5 s per device.
    assert_eq!(scores.len(), 40 * 2000, "every window scored");
    let mut keys: Vec<(String, i64)> = scores
        .iter()
        .map(|s| {
            (s["device"].as_str().unwrap_or("").to_owned(), s["start_ms"].as_i64().unwrap_or(0))
        })
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 40 * 2000, "no window scored twice");
    let v1 = scores.iter().filter(|s| s["version"] == "v1").count();
    let v2 = scores.iter().filter(|s| s["version"] == "v2").count();
    assert!(v1 >= 2000 && v2 > 0, "v1 {v1}, v2 {v2}");
    assert_eq!(v1 + v2, scores.len());
}

#[test]
fn backtest_on_a_synthetic_labelled_set_gives_the_known_confusion_matrix_and_score() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    // 500 rows; the first 200 train; rows 300..340 are anomalous.
    synthetic_csv(&data.join("1.csv"), 500, 300..340, &["f0", "f1", "f2"]);
    let output = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .current_dir(common::root())
        .args([
            "backtest",
            "--protocol",
            "skab",
            "--train-rows",
            "200",
            "--format",
            "json",
            "--data",
        ])
        .arg(&data)
        .args([
            "--trainer-arg=--family",
            "--trainer-arg=pca",
            "--trainer-arg=--window",
            "--trainer-arg=5",
        ])
        .args([
            "--trainer-arg=--features",
            "--trainer-arg=f0",
            "--trainer-arg=f1",
            "--trainer-arg=f2",
        ])
        .args([
            "--trainer-arg=--quantile",
            "--trainer-arg=1.0",
            "--trainer-arg=--factor",
            "--trainer-arg=3",
        ])
        .args([
            "--trainer-arg=--n",
            "--trainer-arg=1",
            "--trainer-arg=--m",
            "--trainer-arg=1",
            "--trainer-arg=--hysteresis",
            "--trainer-arg=1",
        ])
        .output()
        .expect("backtest runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object");
    // Test rows 200..500. A row is flagged when the 5-row window ending with it touches the
    // anomaly: rows 300..344, so 40 true positives and the 4 rows after the anomaly are false.
    assert_eq!(report["rows"], 300);
    assert_eq!(
        (
            report["tp"].as_u64(),
            report["fp"].as_u64(),
            report["fn"].as_u64(),
            report["tn"].as_u64()
        ),
        (Some(40), Some(4), Some(0), Some(256))
    );
    let f1 = report["f1"].as_f64().expect("f1");
    assert!((f1 - 40.0 / 42.0).abs() < 1e-12, "{f1}");
    // Changepoints at 300 s (detected at once: A_tp = 1) and 340 s (its window is cut to
    // [360 s, 400 s] by the first one's and holds no prediction: A_fn = -1): 100·(0+2)/(2+2).
    let nab = report["nab_standard"].as_f64().expect("nab");
    assert!((nab - 50.0).abs() < 1e-9, "{nab}");
    for key in ["precision", "recall", "far", "mar", "nab_lowfp", "nab_lowfn"] {
        assert!(report[key].is_number(), "{key}");
    }
}

#[test]
fn batches_flow_through_the_facade_types() {
    // The facade re-exports what embedders need to handle scores.
    let batch = Batch::Windows(vec![window("facade", 0, 3, 2, 0.0)]);
    assert_eq!(batch.len(), 1);
}

#[test]
fn a_shadow_model_is_reported_beside_the_active_one_and_never_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let train_csv = dir.path().join("train.csv");
    synthetic_csv(&train_csv, 300, 0..0, &["f0", "f1", "f2"]);
    let active = dir.path().join("active");
    let candidate = dir.path().join("candidate");
    let common_args = ["--window", "6", "--features", "f0", "f1", "f2"];
    train(
        &train_csv,
        &active,
        &[&["--family", "pca", "--quantile", "1.0", "--factor", "1000"][..], &common_args].concat(),
    );
    train(
        &train_csv,
        &candidate,
        &[&["--family", "pca", "--quantile", "0.5", "--factor", "0.01"][..], &common_args].concat(),
    );
    let data = dir.path().join("data.csv");
    synthetic_csv(&data, 100, 0..0, &["f0", "f1", "f2"]);
    let text = SCORING_PIPELINE.replace(
        "backend = \"${BACKEND:-auto}\"",
        &format!("backend = \"tract\"\nshadow_model = \"{}\"", candidate.display()),
    );
    let vars = [
        ("DATA", data.display().to_string()),
        ("MODEL", active.display().to_string()),
        ("OUT", dir.path().display().to_string()),
    ];
    common::run(&text, &vars, 1);
    let scores = common::json_lines(&dir.path().join("scores.jsonl"));
    assert_eq!(scores.len(), 95);
    // The active model's threshold is huge: nothing flags, although the candidate's tiny
    // threshold is exceeded by most windows.
    assert!(scores.iter().all(|s| s["anomaly"] == false));
    let exceeding = scores
        .iter()
        .filter(|s| s["values"]["shadow_score"].as_f64() > s["values"]["shadow_threshold"].as_f64())
        .count();
    assert!(exceeding > 50, "{exceeding}");
    assert!(
        scores.iter().all(|s| s["values"]["shadow_score"].as_f64().is_some_and(f64::is_finite))
    );
}

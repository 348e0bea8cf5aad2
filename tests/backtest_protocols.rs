//! `tidewatch backtest` protocols on synthetic data made in a temporary folder:
//!
//! - `--protocol split --data DIR`: a folder of `<entity>_train` / `<entity>_test` pairs (plain
//!   and gzip-compressed CSV) is trained and scored entity by entity and pooled, and the
//!   reference baseline runs on the same rows. Two correlated sine channels and a noisy one;
//!   every test file holds one long segment where the correlation breaks.
//! - `--protocol nab --data DIR`: NAB's layout (`data/<category>/<file>.csv`,
//!   `labels/combined_windows.json`), trained on the probationary rows, scored by NAB's rules.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

const HEADER: &str = "timestamp,a,b,c,label";

/// Rows of one entity: `a` and `b = 2a` follow a sine; rows in `anomaly` get `b` shifted by
/// far more than its noise.
fn rows(count: usize, seed: u64, anomaly: std::ops::Range<usize>) -> String {
    let mut text = String::from(HEADER);
    text.push('\n');
    // A small deterministic generator (the data must not depend on a crate's version).
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut noise = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
    };
    for row in 0..count {
        let a = (row as f64 / 9.0).sin() + 0.02 * noise();
        let mut b = 2.0 * a + 0.02 * noise();
        let label = anomaly.contains(&row);
        if label {
            b += 3.0;
        }
        let c = 5.0 + 0.1 * noise();
        let minute = row % 60;
        let hour = row / 60;
        text.push_str(&format!(
            "2024-01-0{}T{:02}:{minute:02}:00Z,{a:.6},{b:.6},{c:.6},{}\n",
            1 + hour / 24,
            hour % 24,
            u8::from(label)
        ));
    }
    text
}

fn write_gzip(path: &Path, text: &str) {
    let file = std::fs::File::create(path).expect("create");
    let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    encoder.write_all(text.as_bytes()).expect("write");
    encoder.finish().expect("finish");
}

#[test]
fn a_folder_of_entity_pairs_is_pooled_with_the_baseline_beside_it() {
    let python = common::root().join(".venv/bin/python");
    if !python.is_file() {
        println!(".venv/bin/python not found (scripts/python-env.sh makes it): skipped");
        return;
    }
    let data = tempfile::tempdir().expect("tempdir");
    let work = tempfile::tempdir().expect("tempdir");
    // Entity `alpha` in plain CSV, `beta` gzip-compressed; a README is ignored.
    std::fs::write(data.path().join("alpha_train.csv"), rows(600, 1, 0..0)).expect("write");
    std::fs::write(data.path().join("alpha_test.csv"), rows(500, 2, 200..300)).expect("write");
    write_gzip(&data.path().join("beta_train.csv.gz"), &rows(600, 3, 0..0));
    write_gzip(&data.path().join("beta_test.csv.gz"), &rows(500, 4, 100..180));
    std::fs::write(data.path().join("README.md"), "not data").expect("write");

    let output = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .current_dir(common::root())
        .args(["backtest", "--protocol", "split", "--label-column", "label"])
        .args(["--timestamp-column", "timestamp", "--delimiter", ",", "--format", "json"])
        .arg("--data")
        .arg(data.path())
        .arg("--work-dir")
        .arg(work.path())
        // A short window and debounce for the short synthetic anomalies.
        .args(["--trainer-arg=--window", "--trainer-arg=4"])
        .output()
        .expect("backtest runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object");

    // Both test files, whole, pooled.
    assert_eq!(report["rows"].as_u64(), Some(1000));
    let count = |key: &str| report[key].as_u64().unwrap_or_else(|| panic!("{key}: {report}"));
    assert_eq!(count("tp") + count("fp") + count("fn") + count("tn"), 1000);
    assert_eq!(count("tp") + count("fn"), 180, "labelled rows of both test files");
    for key in ["f1", "precision", "recall", "baseline_f1"] {
        let value = report[key].as_f64().unwrap_or_else(|| panic!("{key}: {report}"));
        assert!((0.0..=1.0).contains(&value), "{key} = {value}");
    }
    // The break in the correlation is obvious: the model finds most of it.
    let f1 = report["f1"].as_f64().expect("f1");
    assert!(f1 > 0.6, "F1 {f1}: {report}");
    // The baseline is its own run on the same rows.
    assert_eq!(report["baseline"]["rows"].as_u64(), Some(1000));
    assert_eq!(
        report["baseline_f1"].as_f64(),
        report["baseline"]["f1"].as_f64(),
        "baseline_f1 is the baseline report's F1"
    );
    // One model per entity, in entity order, each with its calibration.
    let models = report["models"].as_array().expect("models");
    let entities: Vec<&str> = models.iter().filter_map(|model| model["entity"].as_str()).collect();
    assert_eq!(entities, ["alpha", "beta"]);
    for model in models {
        assert_eq!(model["window"].as_u64(), Some(4));
        assert!(model["threshold"]["value"].as_f64().is_some(), "{model}");
        assert!(model["detection"]["n"].as_u64().is_some(), "{model}");
    }
    assert!(work.path().join("beta/model/model.json").is_file());
    assert!(work.path().join("beta/baseline/model.json").is_file());
}

#[test]
fn an_entity_without_its_test_file_is_an_error() {
    let data = tempfile::tempdir().expect("tempdir");
    std::fs::write(data.path().join("alpha_train.csv"), rows(50, 1, 0..0)).expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .current_dir(common::root())
        .args(["backtest", "--protocol", "split", "--label-column", "label", "--format", "json"])
        .arg("--data")
        .arg(data.path())
        .output()
        .expect("backtest runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("alpha_train without alpha_test"), "{stderr}");
}

#[test]
fn the_nab_protocol_trains_on_the_probationary_rows_and_scores_nab_windows() {
    let python = common::root().join(".venv/bin/python");
    if !python.is_file() {
        println!(".venv/bin/python not found (scripts/python-env.sh makes it): skipped");
        return;
    }
    let nab = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(nab.path().join("data/synthetic")).expect("mkdir");
    std::fs::create_dir_all(nab.path().join("labels")).expect("mkdir");
    // 1,000 five-minute rows of a daily-like sine; rows 600..640 jump far off it. The
    // probationary period is the first 150 rows.
    let stamp = |row: usize| {
        let minutes = row * 5;
        format!("2015-03-{:02} {:02}:{:02}:00", 1 + minutes / 1440, minutes / 60 % 24, minutes % 60)
    };
    let mut text = String::from("timestamp,value\n");
    for row in 0..1000 {
        let mut value = 10.0 + (row as f64 / 12.0).sin() + 0.01 * ((row * 7919) % 13) as f64;
        if (600..640).contains(&row) {
            value += 8.0;
        }
        text.push_str(&format!("{},{value:.5}\n", stamp(row)));
    }
    std::fs::write(nab.path().join("data/synthetic/jump.csv"), text).expect("write");
    let labels = format!(
        r#"{{"synthetic/jump.csv": [["{}.000000", "{}.000000"]]}}"#,
        stamp(590),
        stamp(660)
    );
    std::fs::write(nab.path().join("labels/combined_windows.json"), labels).expect("write");

    let output = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .current_dir(common::root())
        .args(["backtest", "--protocol", "nab", "--format", "json", "--data"])
        .arg(nab.path())
        .output()
        .expect("backtest runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object");
    // Rows after the probationary period, labelled by the window.
    assert_eq!(report["rows"].as_u64(), Some(850), "{report}");
    let count = |key: &str| report[key].as_u64().unwrap_or_else(|| panic!("{key}: {report}"));
    assert_eq!(count("tp") + count("fn"), 71, "rows 590..=660");
    // The window is found; NAB's standard score is high (early detection, few false ones).
    assert_eq!(count("changepoints"), 1);
    assert_eq!(count("changepoints_detected"), 1, "{report}");
    let standard = report["nab_standard"].as_f64().expect("nab_standard");
    assert!(standard > 50.0 && standard <= 100.0, "NAB standard {standard}: {report}");
    assert!(report["baseline_f1"].as_f64().is_some());
    let models = report["models"].as_array().expect("models");
    assert_eq!(models.len(), 1);
    assert_eq!(models[0]["entity"].as_str(), Some("synthetic/jump.csv"));
}

//! The quality bar, through tidewatch: SKAB's leaderboard protocol with the shipped training
//! configuration (`training/train.py`'s defaults) must reach F1 >= 0.78 and NAB-standard >= 24,
//! and match the Python reference evaluation (`training/skab_eval.py`) exactly.
//!
//! Reads SKAB from `$TIDEWATCH_DATA/skab/data` (default `../shared/data/skab/data`); the data
//! is GPL-3.0 and never part of the repository.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn skab_dir() -> Option<PathBuf> {
    let base = std::env::var_os("TIDEWATCH_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::root().join("../shared/data"));
    let dir = base.join("skab/data");
    dir.join("valve1/0.csv").is_file().then_some(dir)
}

#[test]
fn skab_leaderboard_protocol_clears_the_bar_and_matches_the_reference() {
    let Some(dir) = skab_dir() else {
        println!(
            "SKAB not found under $TIDEWATCH_DATA/skab/data (default ../shared/data): skipped"
        );
        return;
    };
    let output = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .current_dir(common::root())
        .args(["backtest", "--protocol", "skab", "--format", "json", "--data"])
        .arg(&dir)
        .output()
        .expect("backtest runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let ours: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    let f1 = ours["f1"].as_f64().expect("f1");
    let nab = ours["nab_standard"].as_f64().expect("nab");
    assert!(f1 >= 0.78, "F1 {f1}");
    assert!(nab >= 24.0, "NAB standard {nab}");
    assert!(ours["rows"].as_u64() > Some(20_000));

    // The Python reference on the same data and configuration (labelled training rows left
    // out, as the backtest's trainer call does).
    let python = common::root().join(".venv/bin/python");
    let reference = Command::new(&python)
        .arg(common::root().join("training/skab_eval.py"))
        .arg("--data")
        .arg(&dir)
        .args(["--use-labels", "--json"])
        .output()
        .expect("skab_eval.py runs");
    assert!(reference.status.success(), "{}", String::from_utf8_lossy(&reference.stderr));
    let theirs: serde_json::Value =
        serde_json::from_slice(&reference.stdout).expect("reference JSON");
    for key in ["tp", "fp", "fn", "tn", "rows"] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    for (mine, reference) in [
        ("f1", "f1"),
        ("far", "far"),
        ("mar", "mar"),
        ("nab_standard", "nab_standard"),
        ("nab_lowfp", "nab_low_fp"),
        ("nab_lowfn", "nab_low_fn"),
    ] {
        let (a, b) =
            (ours[mine].as_f64().expect("ours"), theirs[reference].as_f64().expect("theirs"));
        assert!((a - b).abs() < 1e-9, "{mine}: tidewatch {a} vs reference {b}");
    }
}

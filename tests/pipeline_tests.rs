//! `tidewatch test`: the `[[tests]]` of pipeline files, through the real binary.

mod common;

use std::process::{Command, Output};

fn tidewatch_test(files: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .current_dir(common::root())
        .arg("test")
        .args(files)
        .output()
        .expect("tidewatch runs")
}

#[test]
fn every_shipped_pipeline_has_tests_and_they_pass() {
    let mut files: Vec<String> = std::fs::read_dir(common::root().join("pipelines"))
        .expect("pipelines/")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().and_then(|ext| ext.to_str()) == Some("toml"))
        .map(|path| format!("pipelines/{}", path.file_name().unwrap_or_default().to_string_lossy()))
        .collect();
    files.sort();
    assert!(files.len() >= 9, "{files:?}");
    let output = tidewatch_test(&files);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for file in &files {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(&format!("{file}: ")))
            .unwrap_or_else(|| panic!("no result for {file}: {stdout}"));
        let (passed, total) = line
            .split_once(": ")
            .and_then(|(_, rest)| rest.split_once(" of "))
            .map(|(passed, rest)| (passed.to_owned(), rest.split(' ').next().unwrap_or_default()))
            .unwrap_or_default();
        assert_eq!(passed, total, "{line}");
        assert_ne!(passed, "0", "{line}");
    }
}

#[test]
fn a_failing_expectation_is_reported_at_its_line_with_the_difference() {
    let output = tidewatch_test(&["tests/fixtures/pipeline_tests/route.toml".into()]);
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stdout.contains("route.toml: 1 of 2 tests passed"), "{stdout}");
    assert!(
        stderr.contains(
            "route.toml:59:16: test `a failing one` failed: `by_heat.hot`: record 0: `device` is \"p2\", expected \"p3\""
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "route.toml:63:16: test `a failing one` failed: `by_heat.normal`: 0 records, expected 2"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "route.toml:67:16: test `a failing one` failed: `readings`: record 0: `values.temperature` is 81, expected lt 50.0"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.matches("failed:").count(), 3, "{stderr}");
}

#[test]
fn a_pipeline_without_tests_fails() {
    let output = tidewatch_test(&["tests/fixtures/pipeline_tests/no_tests.toml".into()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no_tests.toml: error: no [[tests]] in this file"), "{stderr}");
}

#[test]
fn validate_checks_the_outputs_a_test_names() {
    let diagnostics = common::diagnostics("invalid/test_unknown_output.toml");
    assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
    let error = &diagnostics[0];
    assert_eq!((error.line, error.column), (35, 16), "{error}");
    assert!(error.message.contains("`by_heat.nosuch` is not an output of `by_heat`"), "{error}");
    assert_eq!(
        error.hint.as_deref(),
        Some("its outputs: by_heat.hot, by_heat.normal, by_heat.errors")
    );
}

#[test]
fn tests_may_stand_in_a_file_beside_the_pipeline() {
    let output = tidewatch_test(&["tests/fixtures/pipeline_tests/route.tests.toml".into()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    // Its own test only: route.toml's failing one does not run.
    assert!(stdout.contains("route.tests.toml: 1 of 1 tests passed"), "{stdout}");

    let output = tidewatch_test(&["tests/fixtures/pipeline_tests/bad.tests.toml".into()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "bad.tests.toml:11:16: error: test `reads a port that does not exist`: `by_heat.cold` is not an output of `by_heat`"
        ),
        "{stderr}"
    );
}

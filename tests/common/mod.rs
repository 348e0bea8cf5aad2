//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};

use tidewatch::Registry;
use tidewatch::engine::{Diagnostic, Pipeline, RunContext, ValidationErrors};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Loads pipeline text with `${VAR}` taken from `vars` only.
pub fn load(text: &str, vars: &[(&str, String)]) -> Result<Pipeline, ValidationErrors> {
    let vars: Vec<(String, String)> =
        vars.iter().map(|(name, value)| (name.to_string(), value.clone())).collect();
    tidewatch::engine::load_str(
        text,
        "test.toml",
        &root(),
        &Registry::with_builtins(),
        move |name| {
            vars.iter().find(|(candidate, _)| candidate == name).map(|(_, value)| value.clone())
        },
    )
}

/// Loads and runs pipeline text on `workers` workers; returns the run context (metrics).
pub fn run(text: &str, vars: &[(&str, String)], workers: usize) -> RunContext {
    let pipeline =
        load(text, vars).unwrap_or_else(|errors| panic!("invalid test pipeline:\n{errors}"));
    let context = RunContext::default();
    tidewatch::run(&pipeline, workers, &context).expect("pipeline runs");
    context
}

/// The JSON lines of a file.
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| serde_json::from_str(line).expect("every output line is JSON"))
        .collect()
}

/// The diagnostics of a fixture file.
pub fn diagnostics(fixture: &str) -> Vec<Diagnostic> {
    let path = root().join("tests/fixtures").join(fixture);
    match tidewatch::engine::load_file(&path, &Registry::with_builtins()) {
        Ok(pipeline) => pipeline.warnings,
        Err(errors) => errors.diagnostics,
    }
}

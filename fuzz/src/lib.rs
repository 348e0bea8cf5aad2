//! What the fuzz targets share: the built-in registry and the checks on a loader's diagnostics.

use std::path::Path;
use std::sync::LazyLock;

use tidewatch_engine::{GraphFormat, Registry, Severity, ValidationErrors, load_str, render_graph};

/// `tidewatch::builtins()`, built once.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(tidewatch::builtins);

/// A folder that does not exist: relative paths (models, files) resolve into nothing, so a
/// fuzz input never reads or writes the machine's files.
pub const BASE_DIR: &str = "/nonexistent/tidewatch-fuzz";

/// Loads `text` as a pipeline with the built-ins and `env`, and checks the outcome: a loaded
/// pipeline renders as a graph; a rejected one has at least one error, and every diagnostic
/// points at a line of the text (interpolation never adds lines) with a 1-based column, and
/// at most one past the line's end when `columns_bounded` (no variable makes a line longer).
pub fn load_and_check(text: &str, env: impl Fn(&str) -> Option<String>, columns_bounded: bool) {
    match load_str(text, "fuzz.toml", Path::new(BASE_DIR), &REGISTRY, env) {
        Ok(pipeline) => {
            let _ = render_graph(&pipeline, GraphFormat::Mermaid);
            let _ = render_graph(&pipeline, GraphFormat::Dot);
        }
        Err(ValidationErrors { diagnostics }) => {
            assert!(
                diagnostics.iter().any(|diagnostic| diagnostic.severity == Severity::Error),
                "rejected without an error: {diagnostics:?}"
            );
            let lines: Vec<&str> = text.split('\n').collect();
            for diagnostic in &diagnostics {
                assert!(
                    diagnostic.line >= 1 && diagnostic.line <= lines.len(),
                    "line {} outside the text's {} lines: {diagnostic}",
                    diagnostic.line,
                    lines.len()
                );
                assert!(diagnostic.column >= 1, "column 0: {diagnostic}");
                if columns_bounded {
                    let width = lines[diagnostic.line - 1].chars().count();
                    assert!(
                        diagnostic.column <= width + 1,
                        "column {} past the end of line {} ({width} characters): {diagnostic}",
                        diagnostic.column,
                        diagnostic.line
                    );
                }
                let _ = diagnostic.to_string();
            }
        }
    }
}

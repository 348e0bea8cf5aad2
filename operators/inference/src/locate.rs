//! Where the ONNX Runtime library is. Compiled with or without the `onnxruntime` backend, so
//! that validation can tell whether a pipeline asking for it can run.

use std::path::{Path, PathBuf};

/// Where ONNX Runtime is, in order: `explicit`, `ORT_DYLIB_PATH`, the `onnxruntime` Python
/// wheel in a `.venv` of the current directory or of an ancestor of the executable (a
/// checkout's `target/release/tidewatch` finds the checkout's `.venv`), then
/// `/usr/lib` and `/usr/local/lib`. Only existing files are returned.
pub fn find_onnxruntime(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return path.is_file().then(|| path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|path| !path.is_empty()) {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(current) = std::env::current_dir() {
        roots.push(current);
    }
    if let Ok(executable) = std::env::current_exe() {
        roots.extend(executable.ancestors().skip(1).map(Path::to_path_buf));
    }
    for root in roots {
        if let Some(found) = in_venv(&root.join(".venv")) {
            return Some(found);
        }
    }
    ["/usr/lib/libonnxruntime.so", "/usr/local/lib/libonnxruntime.so"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
}

fn in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .collect();
    pythons.sort();
    for python in pythons.iter().rev() {
        let capi = python.join("site-packages/onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else { continue };
        let mut candidates: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.path())
            .filter(|path| {
                path.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.starts_with("libonnxruntime.so"))
            })
            .collect();
        candidates.sort();
        if let Some(found) = candidates.pop() {
            return Some(found);
        }
    }
    None
}

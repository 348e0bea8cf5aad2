//! The ONNX Runtime backend, loaded at run time from a shared library.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::TensorRef;

use crate::{Backend, InferenceError, ModelSpec};

static LOADED: OnceLock<Result<(PathBuf, Environment), String>> = OnceLock::new();

/// Loads the library and creates the environment, once per process (ONNX Runtime allows one).
/// The first calls into the library resolve its API table; a library too old for the API
/// version makes `ort` panic there, which becomes an error here.
fn initialise(library: &Path) -> Result<&'static Environment, InferenceError> {
    let result = LOADED.get_or_init(|| {
        let loaded = catch_unwind(|| -> Result<Environment, String> {
            let builder = ort::init_from(library).map_err(|error| error.to_string())?;
            builder.with_name("tidewatch").build().map_err(|error| error.to_string())
        });
        match loaded {
            Ok(Ok(environment)) => Ok((library.to_path_buf(), environment)),
            Ok(Err(error)) => Err(format!("cannot load {}: {error}", library.display())),
            Err(_) => {
                Err(format!("{} is not a usable ONNX Runtime >= 1.31 library", library.display()))
            }
        }
    });
    match result {
        Ok((loaded, environment)) => {
            if loaded != library {
                tracing::warn!(loaded = %loaded.display(), asked = %library.display(), "ONNX Runtime already loaded from another path; using it");
            }
            Ok(environment)
        }
        Err(error) => Err(InferenceError::RuntimeMissing(error.clone())),
    }
}

/// A model in an ONNX Runtime session (one intra-op thread: tidewatch parallelises across
/// workers, not inside one inference).
pub struct OnnxRuntime {
    session: Session,
    input: String,
    output: String,
}

impl std::fmt::Debug for OnnxRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxRuntime")
            .field("input", &self.input)
            .field("output", &self.output)
            .finish()
    }
}

impl OnnxRuntime {
    /// Loads `onnx` with the ONNX Runtime library at `library`.
    pub fn load(
        onnx: &Path,
        spec: &ModelSpec,
        library: &Path,
    ) -> Result<OnnxRuntime, InferenceError> {
        let environment = initialise(library)?;
        let load_error = |message: String| InferenceError::Load {
            backend: "onnxruntime",
            path: onnx.to_path_buf(),
            message,
        };
        let session = catch_unwind(AssertUnwindSafe(|| -> Result<Session, String> {
            let mut builder = Session::builder(environment).map_err(|error| error.to_string())?;
            builder = builder.with_intra_threads(1).map_err(|error| error.to_string())?;
            builder.commit_from_file(onnx).map_err(|error| error.to_string())
        }))
        .map_err(|_| {
            InferenceError::RuntimeMissing(format!(
                "{} is not a usable ONNX Runtime >= 1.31",
                library.display()
            ))
        })?
        .map_err(load_error)?;
        Ok(OnnxRuntime { session, input: spec.io.input.clone(), output: spec.io.output.clone() })
    }
}

impl Backend for OnnxRuntime {
    fn name(&self) -> &'static str {
        "onnxruntime"
    }

    fn run(
        &mut self,
        input: &[f32],
        width: usize,
        output: &mut Vec<f32>,
    ) -> Result<(), InferenceError> {
        let run_error = |error: ort::Error| InferenceError::Run {
            backend: "onnxruntime",
            message: error.to_string(),
        };
        output.clear();
        if input.is_empty() {
            return Ok(());
        }
        let rows = input.len() / width;
        let tensor = TensorRef::from_array_view(([rows, width], input)).map_err(run_error)?;
        let outputs =
            self.session.run(ort::inputs![self.input.as_str() => tensor]).map_err(run_error)?;
        let Some(value) = outputs.get(self.output.as_str()) else {
            return Err(InferenceError::Run {
                backend: "onnxruntime",
                message: format!("no output named `{}`", self.output),
            });
        };
        let (_, data) = value.try_extract_tensor::<f32>().map_err(run_error)?;
        output.extend_from_slice(data);
        Ok(())
    }
}

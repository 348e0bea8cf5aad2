//! Model inference for tidewatch.
//!
//! A model is a directory (or a `model.onnx` path) with `model.json` beside the ONNX file:
//! feature names and order, window length and step, the scaler, the calibrated threshold and
//! the detection rule ([`ModelSpec`]). Two backends run the ONNX graph behind one trait,
//! [`Backend`]:
//!
//! - [`OnnxRuntime`]: Microsoft's ONNX Runtime, loaded at run time from a shared library
//!   (`ORT_DYLIB_PATH`, an explicit path, or the `onnxruntime` Python wheel's
//!   `onnxruntime/capi/libonnxruntime.so.*` found by [`find_onnxruntime`]);
//! - [`Tract`]: pure Rust (tract), for constrained edge devices and zero-setup runs.
//!
//! [`load_backend`] picks one: `auto` uses ONNX Runtime when its library is found, else tract.
//!
//! Each backend is a cargo feature, both on by default: `onnxruntime` (the `ort` crate) and
//! `tract` (pure Rust, for edge builds that leave ONNX Runtime out). A backend that was left
//! out is an error at validation ([`BackendKind::compiled_in`]) and at load.

mod locate;
mod model;
#[cfg(feature = "onnxruntime")]
mod onnxruntime;
#[cfg(feature = "tract")]
mod tract;

use std::path::{Path, PathBuf};

pub use locate::find_onnxruntime;
pub use model::{Detection, Io, MAX_WIDTH, ModelSpec, Scaler, Threshold, TrainingInfo, WindowSpec};
#[cfg(feature = "onnxruntime")]
pub use onnxruntime::OnnxRuntime;
#[cfg(feature = "tract")]
pub use tract::Tract;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `model.json` is not valid.
    #[error("invalid model description {path}: {message}")]
    Spec {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The ONNX file could not be loaded by the backend.
    #[error("cannot load model {path} with {backend}: {message}")]
    Load {
        /// The backend.
        backend: &'static str,
        /// The file.
        path: PathBuf,
        /// The backend's message.
        message: String,
    },
    /// ONNX Runtime was asked for and its library is not there or not usable.
    #[error("ONNX Runtime is not available: {0}")]
    RuntimeMissing(String),
    /// The backend asked for was left out of this build (its cargo feature is off).
    #[error("{0}")]
    BackendMissing(String),
    /// Running the model failed.
    #[error("inference with {backend} failed: {message}")]
    Run {
        /// The backend.
        backend: &'static str,
        /// The backend's message.
        message: String,
    },
    /// The input does not have the model's shape.
    #[error("input of {got} values is not a multiple of the model's {width} inputs per row")]
    Shape {
        /// Values given.
        got: usize,
        /// Values per row the model takes.
        width: usize,
    },
}

/// Which backend runs a model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// ONNX Runtime when its library is found, tract otherwise.
    #[default]
    Auto,
    /// ONNX Runtime (an error at start if its library is missing).
    Onnxruntime,
    /// tract, pure Rust.
    Tract,
}

impl BackendKind {
    /// The backends compiled into this build, by name.
    pub const COMPILED_IN: &'static [&'static str] = &[
        #[cfg(feature = "onnxruntime")]
        "onnxruntime",
        #[cfg(feature = "tract")]
        "tract",
    ];

    /// Whether this build can run models with this choice: its backend's cargo feature is on
    /// (for `auto`, at least one of them).
    pub fn compiled_in(self) -> bool {
        match self {
            BackendKind::Auto => !Self::COMPILED_IN.is_empty(),
            BackendKind::Onnxruntime => cfg!(feature = "onnxruntime"),
            BackendKind::Tract => cfg!(feature = "tract"),
        }
    }

    /// Why [`BackendKind::compiled_in`] is false, for error messages.
    pub fn missing_message(self) -> String {
        let built = if Self::COMPILED_IN.is_empty() {
            "no inference backend".to_owned()
        } else {
            format!("only {}", Self::COMPILED_IN.join(", "))
        };
        let wanted = match self {
            BackendKind::Auto => "an inference backend (cargo feature `onnxruntime` or `tract`)",
            BackendKind::Onnxruntime => "the ONNX Runtime backend (cargo feature `onnxruntime`)",
            BackendKind::Tract => "the tract backend (cargo feature `tract`)",
        };
        format!("this build of tidewatch has {built}; the model needs {wanted}")
    }
}

/// Runs a model on a batch of rows: `input` holds `rows * width` floats row after row, and
/// the output (the reconstruction) has the same layout.
pub trait Backend: Send {
    /// The backend's name (`onnxruntime`, `tract`).
    fn name(&self) -> &'static str;
    /// Runs the model; `output` is cleared and filled.
    fn run(
        &mut self,
        input: &[f32],
        width: usize,
        output: &mut Vec<f32>,
    ) -> Result<(), InferenceError>;
}

/// A model: its description and a backend ready to run it.
pub struct Model {
    /// `model.json`.
    pub spec: ModelSpec,
    /// Where `model.onnx` is.
    pub path: PathBuf,
    backend: Box<dyn Backend>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.spec.name)
            .field("version", &self.spec.version)
            .field("backend", &self.backend.name())
            .finish()
    }
}

impl Model {
    /// Loads `model.json` and `model.onnx` from `location` (the directory or either file) with
    /// the backend `kind`; `onnxruntime_library` overrides where ONNX Runtime is looked for.
    pub fn load(
        location: &Path,
        kind: BackendKind,
        onnxruntime_library: Option<&Path>,
    ) -> Result<Model, InferenceError> {
        let (json, onnx) = model_files(location);
        let spec = ModelSpec::read(&json)?;
        let backend = load_backend(&onnx, &spec, kind, onnxruntime_library)?;
        Ok(Model { spec, path: onnx, backend })
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.backend.name()
    }

    /// Values per input row (window length x features).
    pub fn width(&self) -> usize {
        self.spec.width()
    }

    /// Runs the model on already-scaled rows.
    pub fn reconstruct(
        &mut self,
        input: &[f32],
        output: &mut Vec<f32>,
    ) -> Result<(), InferenceError> {
        let width = self.width();
        if width == 0 || !input.len().is_multiple_of(width) {
            return Err(InferenceError::Shape { got: input.len(), width });
        }
        self.backend.run(input, width, output)
    }
}

/// `model.json` and `model.onnx` for a directory or either file.
pub fn model_files(location: &Path) -> (PathBuf, PathBuf) {
    if location.is_dir() {
        (location.join("model.json"), location.join("model.onnx"))
    } else if location.extension().and_then(|ext| ext.to_str()) == Some("json") {
        (location.to_path_buf(), location.with_extension("onnx"))
    } else {
        (location.with_extension("json"), location.to_path_buf())
    }
}

/// Loads the ONNX file with the backend `kind`.
pub fn load_backend(
    onnx: &Path,
    spec: &ModelSpec,
    kind: BackendKind,
    onnxruntime_library: Option<&Path>,
) -> Result<Box<dyn Backend>, InferenceError> {
    if !onnx.is_file() {
        return Err(InferenceError::Io {
            path: onnx.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file"),
        });
    }
    if !kind.compiled_in() {
        return Err(InferenceError::BackendMissing(kind.missing_message()));
    }
    match kind {
        BackendKind::Tract => load_tract(onnx, spec),
        BackendKind::Onnxruntime => {
            let library = find_onnxruntime(onnxruntime_library).ok_or_else(|| {
                InferenceError::RuntimeMissing(
                    "no libonnxruntime found: set ORT_DYLIB_PATH or the `onnxruntime_library` option, or `pip install onnxruntime` into .venv".into(),
                )
            })?;
            load_onnxruntime(onnx, spec, &library)
        }
        BackendKind::Auto => {
            let library = if cfg!(feature = "onnxruntime") {
                find_onnxruntime(onnxruntime_library)
            } else {
                None
            };
            match library {
                Some(library) => match load_onnxruntime(onnx, spec, &library) {
                    Ok(backend) => Ok(backend),
                    Err(error) if cfg!(feature = "tract") => {
                        tracing::warn!(%error, "ONNX Runtime unusable; falling back to tract");
                        load_tract(onnx, spec)
                    }
                    Err(error) => Err(error),
                },
                None => load_tract(onnx, spec),
            }
        }
    }
}

#[cfg(feature = "tract")]
fn load_tract(onnx: &Path, spec: &ModelSpec) -> Result<Box<dyn Backend>, InferenceError> {
    Ok(Box::new(Tract::load(onnx, spec)?))
}

#[cfg(not(feature = "tract"))]
fn load_tract(_onnx: &Path, _spec: &ModelSpec) -> Result<Box<dyn Backend>, InferenceError> {
    Err(InferenceError::BackendMissing(BackendKind::Tract.missing_message()))
}

#[cfg(feature = "onnxruntime")]
fn load_onnxruntime(
    onnx: &Path,
    spec: &ModelSpec,
    library: &Path,
) -> Result<Box<dyn Backend>, InferenceError> {
    Ok(Box::new(OnnxRuntime::load(onnx, spec, library)?))
}

#[cfg(not(feature = "onnxruntime"))]
fn load_onnxruntime(
    _onnx: &Path,
    _spec: &ModelSpec,
    _library: &Path,
) -> Result<Box<dyn Backend>, InferenceError> {
    Err(InferenceError::BackendMissing(BackendKind::Onnxruntime.missing_message()))
}

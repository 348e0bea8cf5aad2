//! The pure-Rust backend (tract).

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::dims;

use crate::{Backend, InferenceError, ModelSpec};

type Plan = Arc<TypedRunnableModel>;

/// A model optimised by tract for a symbolic batch size.
pub struct Tract {
    plan: Plan,
}

impl std::fmt::Debug for Tract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tract").finish_non_exhaustive()
    }
}

impl Tract {
    /// Loads and optimises `onnx` for inputs of `[N, window x features]`.
    pub fn load(onnx: &Path, spec: &ModelSpec) -> Result<Tract, InferenceError> {
        let error = |error: TractError| InferenceError::Load {
            backend: "tract",
            path: onnx.to_path_buf(),
            message: format!("{error:#}"),
        };
        let model = tract_onnx::onnx().model_for_path(onnx).map_err(error)?;
        let batch = model.sym("N");
        let width = spec.width() as i64;
        let plan = model
            .with_input_fact(0, f32::fact(dims!(batch, width)).into())
            .map_err(error)?
            .into_optimized()
            .map_err(error)?
            .into_runnable()
            .map_err(error)?;
        Ok(Tract { plan })
    }
}

impl Backend for Tract {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn run(
        &mut self,
        input: &[f32],
        width: usize,
        output: &mut Vec<f32>,
    ) -> Result<(), InferenceError> {
        let run_error = |error: TractError| InferenceError::Run {
            backend: "tract",
            message: format!("{error:#}"),
        };
        output.clear();
        if input.is_empty() {
            return Ok(());
        }
        let rows = input.len() / width;
        let tensor = Tensor::from_shape(&[rows, width], input).map_err(run_error)?;
        let result = self.plan.run(tvec!(tensor.into())).map_err(run_error)?;
        let Some(first) = result.first() else {
            return Err(InferenceError::Run {
                backend: "tract",
                message: "the model has no output".into(),
            });
        };
        let view = first.to_plain_array_view::<f32>().map_err(run_error)?;
        output.extend(view.iter().copied());
        Ok(())
    }
}

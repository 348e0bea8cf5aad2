//! Inference with the shipped models (`models/pump-ae`: pca, `models/pump-dense`: MLP with
//! tanh), on both backends (tract, ONNX Runtime), at batches of 1, 64 and 1024 windows:
//!
//! - `backend/<backend>/<model>/<batch>`: `Backend::run` alone on already-scaled rows (the
//!   model's W·F = 80 floats per window): the raw backend;
//! - `scorer/<backend>/<model>/<batch>`: `Scorer::score` on windows, what the `autoencoder`
//!   transform calls per batch: scaling and flattening, inference, the MSE and per-feature
//!   errors;
//! - `model_pipeline/<backend>/<model>`: the engine end to end on one worker, loaded with
//!   `tidewatch_engine::load_str` and run with `tidewatch_engine::run`: a synthetic SKAB-style
//!   CSV file (`datetime` and the 8 SKAB features, one pump, 1 Hz) -> `normalize` -> `window`
//!   (count windows of the model's W = 10 readings sliding by 1) -> `autoencoder`
//!   (`max_batch_rows = 1024`) -> `blackhole`; and `model_pipeline/no_model`, the same without
//!   the `autoencoder` (the windows go to the `blackhole`): what the engine costs around the
//!   model.
//!
//! Throughput is in windows (= model rows; in the pipeline, windows scored = rows - 9). Under
//! `cargo bench` a pipeline run has 200,000 rows; under `cargo test` (a debug build, one
//! iteration each) 2,000. ONNX Runtime is loaded from `ORT_DYLIB_PATH` or the `onnxruntime`
//! wheel in `.venv` (`scripts/python-env.sh`); without it its benchmarks are skipped with a
//! message.
//!
//! `cargo bench -p tidewatch-benches --bench inference`

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::OnceLock;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tidewatch_api::Window;
use tidewatch_benches::{
    INFERENCE_BATCHES, MODELS, ModelStage, SLOW_SAMPLING, count_windows, criterion_config,
    delivered, model_dir, model_pipeline, model_spec, onnxruntime_library, scaled_rows, sized,
    slow_criterion_config, synthetic_readings, write_skab_csv,
};
use tidewatch_engine::{RunContext, run};
use tidewatch_inference::{Backend, BackendKind, OnnxRuntime, Tract, model_files};
use tidewatch_operators::Scorer;

/// The backends, by their names in `backend = "..."`.
const BACKENDS: [(&str, BackendKind); 2] =
    [("tract", BackendKind::Tract), ("onnxruntime", BackendKind::Onnxruntime)];

/// The ONNX Runtime library, looked for once; `None` (with a message) when it is missing.
fn onnxruntime() -> Option<&'static PathBuf> {
    static LIBRARY: OnceLock<Option<PathBuf>> = OnceLock::new();
    LIBRARY
        .get_or_init(|| {
            let library = onnxruntime_library();
            match &library {
                Some(path) => eprintln!("ONNX Runtime: {}", path.display()),
                None => eprintln!(
                    "ONNX Runtime not found (set ORT_DYLIB_PATH or run scripts/python-env.sh): \
                     skipping its benchmarks"
                ),
            }
            library
        })
        .as_ref()
}

/// The library to pass for `kind`, or `None` when the backend cannot run here (skipped).
fn available(kind: BackendKind) -> Option<Option<PathBuf>> {
    match kind {
        BackendKind::Onnxruntime => onnxruntime().map(|library| Some(library.clone())),
        _ => Some(None),
    }
}

/// The largest batch's windows and their scaled rows, per model.
fn inputs(model: &str) -> (Vec<Window>, Vec<f32>) {
    let spec = model_spec(model);
    let largest = INFERENCE_BATCHES.iter().copied().max().unwrap_or(1);
    let readings = synthetic_readings(&spec, largest + spec.window.length - 1);
    let windows = count_windows(&spec, &readings, largest);
    assert_eq!(windows.len(), largest);
    let rows = scaled_rows(&spec, &windows);
    (windows, rows)
}

/// `backend/<backend>/<model>/<batch>`: `Backend::run` on scaled rows.
fn backend(c: &mut Criterion) {
    let mut group = c.benchmark_group("backend");
    for model in MODELS {
        let spec = model_spec(model);
        let width = spec.width();
        let (_, rows) = inputs(model);
        let (_, onnx) = model_files(&model_dir(model));
        for (name, kind) in BACKENDS {
            let Some(library) = available(kind) else { continue };
            let mut backend: Box<dyn Backend> = match &library {
                Some(library) => match OnnxRuntime::load(&onnx, &spec, library) {
                    Ok(backend) => Box::new(backend),
                    Err(error) => {
                        eprintln!("skipping backend/{name}/{model}: {error}");
                        continue;
                    }
                },
                None => Box::new(Tract::load(&onnx, &spec).expect("tract loads the model")),
            };
            let mut output = Vec::new();
            for batch in INFERENCE_BATCHES {
                let input = &rows[..batch * width];
                backend.run(input, width, &mut output).expect("inference runs");
                assert_eq!(output.len(), input.len());
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_function(BenchmarkId::new(format!("{name}/{model}"), batch), |b| {
                    b.iter(|| {
                        backend.run(black_box(input), width, &mut output).expect("inference runs");
                        black_box(output.len())
                    });
                });
            }
        }
    }
    group.finish();
}

/// `scorer/<backend>/<model>/<batch>`: `Scorer::score` on windows (scaling, inference, MSE).
fn scorer(c: &mut Criterion) {
    let mut group = c.benchmark_group("scorer");
    for model in MODELS {
        let (windows, _) = inputs(model);
        let refs: Vec<&Window> = windows.iter().collect();
        for (name, kind) in BACKENDS {
            let Some(library) = available(kind) else { continue };
            let mut scorer = match Scorer::load(&model_dir(model), kind, library.as_deref(), None) {
                Ok(scorer) => scorer,
                Err(error) => {
                    eprintln!("skipping scorer/{name}/{model}: {error}");
                    continue;
                }
            };
            assert_eq!(scorer.backend(), name);
            for batch in INFERENCE_BATCHES {
                let scores = scorer.score(&refs[..batch]).expect("scoring runs");
                assert_eq!(scores.len(), batch);
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_function(BenchmarkId::new(format!("{name}/{model}"), batch), |b| {
                    b.iter(|| scorer.score(black_box(&refs[..batch])).expect("scoring runs"));
                });
            }
        }
    }
    group.finish();
}

/// `model_pipeline/<backend>/<model>` and `model_pipeline/no_model`: the engine end to end
/// on one worker over a synthetic SKAB-style CSV file.
fn pipeline(c: &mut Criterion) {
    let rows = sized(200_000, 2_000);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let csv = dir.path().join("skab-synthetic.csv");
    // Both models have the same features and window, so one file serves both.
    let spec = model_spec(MODELS[0]);
    write_skab_csv(&csv, &spec, &synthetic_readings(&spec, rows)).expect("the CSV is written");
    let windows = (rows - (spec.window.length - 1)) as u64;

    let mut runs = vec![("no_model".to_owned(), None)];
    for (name, kind) in BACKENDS {
        let Some(library) = available(kind) else { continue };
        for model in MODELS {
            let stage =
                ModelStage { model: model_dir(model), backend: name, library: library.clone() };
            runs.push((format!("{name}/{model}"), Some(stage)));
        }
    }

    let mut group = c.benchmark_group("model_pipeline");
    group.sampling_mode(SLOW_SAMPLING);
    group.throughput(Throughput::Elements(windows));
    for (id, stage) in runs {
        let pipeline = model_pipeline(&csv, &model_spec(MODELS[0]), stage.as_ref());
        let mut checked = false;
        group.bench_function(&id, |b| {
            // One run outside the timing (and only when the filter selects this benchmark):
            // every window gets through and no stage reports an error.
            if !checked {
                let context = RunContext::default();
                run(&pipeline, 1, &context).expect("the inference pipeline runs");
                assert_eq!(delivered(&context), windows, "{id}: windows delivered");
                checked = true;
            }
            b.iter(|| {
                let context = RunContext::default();
                run(&pipeline, 1, &context).expect("the inference pipeline runs");
                context
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = per_batch;
    config = criterion_config();
    targets = backend, scorer
}
criterion_group! {
    name = end_to_end;
    config = slow_criterion_config();
    targets = pipeline
}
criterion_main!(per_batch, end_to_end);

//! The tidewatch runtime.
//!
//! - [`spec`]: pipeline files (TOML) to a validated [`Pipeline`], with every error located;
//! - [`Registry`]: component types by name, built-ins plus an embedder's own;
//! - [`runtime`]: the timely dataflow, event time and watermarks, workers;
//! - [`metrics`] and [`http`]: `/metrics`, `/healthz`, `/readyz`;
//! - [`graph`]: the pipeline as Mermaid or dot.
//!
//! ```no_run
//! use tidewatch_engine::{Registry, RunContext, load_file, run};
//!
//! let registry = Registry::with_builtins();
//! let pipeline = load_file("pipelines/demo.toml".as_ref(), &registry).expect("valid pipeline");
//! run(&pipeline, 1, &RunContext::default()).expect("pipeline ran");
//! ```

pub mod diagnostics;
pub mod graph;
pub mod http;
mod interpolate;
pub mod metrics;
pub mod registry;
pub mod runtime;
pub mod signals;
pub mod spec;

pub use diagnostics::{Diagnostic, Severity};
pub use graph::{GraphFormat, render as render_graph};
pub use http::{Health, HttpServer, serve};
pub use metrics::Metrics;
pub use registry::{Class, Registry};
pub use runtime::{EngineError, RunContext, run};
pub use spec::{
    Component, Pipeline, PipelineSettings, Port, ValidationErrors, load_file, load_str,
};

//! The tidewatch runtime.
//!
//! - [`spec`]: pipeline files (TOML) to a validated [`Pipeline`], with every error located;
//! - [`Registry`]: component types by name (the built-ins are registered above the engine, by
//!   the `tidewatch` crate, so this crate depends only on the extension API);
//! - [`runtime`]: the timely dataflow, event time and watermarks, workers;
//! - [`checkpoint`]: consistent checkpoints and recovery;
//! - [`metrics`] and [`http`]: `/metrics`, `/healthz`, `/readyz`;
//! - [`graph`]: the pipeline as Mermaid or dot;
//! - [`testing`]: the `[[tests]]` of a pipeline file, run without sources or sinks.
//!
//! ```no_run
//! use tidewatch_api::ComponentFactory;
//! use tidewatch_connectors::{SimulatorFactory, StdoutSinkFactory};
//! use tidewatch_engine::{Registry, RunContext, load_file, run};
//!
//! // `tidewatch::builtins()` has every built-in type; an engine alone knows none.
//! let registry = Registry::new()
//!     .register("simulator", ComponentFactory::source(SimulatorFactory))
//!     .register("stdout", ComponentFactory::sink(StdoutSinkFactory));
//! let pipeline = load_file("pipelines/demo.toml".as_ref(), &registry).expect("valid pipeline");
//! run(&pipeline, 1, &RunContext::default()).expect("pipeline ran");
//! ```

pub mod checkpoint;
pub mod cluster;
pub mod diagnostics;
mod flow_control;
mod gossip;
pub mod graph;
pub mod http;
mod interpolate;
pub mod metrics;
pub mod registry;
pub mod runtime;
pub mod signals;
pub mod spec;
pub mod testing;

pub use cluster::Cluster;
pub use diagnostics::{Diagnostic, Severity};
pub use graph::{GraphFormat, render as render_graph};
pub use http::{Health, HttpServer, serve};
pub use metrics::Metrics;
pub use registry::{Class, Registry};
pub use runtime::{EngineError, RunContext, run};
pub use spec::{
    Component, Pipeline, PipelineSettings, Port, ValidationErrors, load_file, load_file_with,
    load_str,
};

//! tidewatch: a stream-processing dataflow engine for anomaly detection on IoT and edge
//! telemetry.
//!
//! This crate is what an embedder depends on: the extension API ([`api`]), the engine
//! ([`engine`]), the built-in components ([`operators`], [`connectors`]) and the command line
//! ([`cli`]), so a program can add its own operators and keep tidewatch's CLI:
//!
//! ```no_run
//! use tidewatch::Registry;
//!
//! fn main() -> std::process::ExitCode {
//!     let registry = Registry::with_builtins(); // .register("my_op", my_factory)
//!     tidewatch::cli::main(registry)
//! }
//! ```

pub mod backtest;
pub mod cli;
pub mod simulate;

pub use tidewatch_api as api;
pub use tidewatch_connectors as connectors;
pub use tidewatch_engine as engine;
pub use tidewatch_inference as inference;
pub use tidewatch_operators as operators;

pub use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ComponentFactory, ConfigError, Kind, Outputs,
    PortType, Sink, SinkFactory, Source, SourceFactory, Transform, TransformFactory,
    TransformProperties, ValidateContext,
};
pub use tidewatch_engine::{Pipeline, Registry, RunContext, load_file, run};

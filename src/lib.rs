//! tidewatch: a stream-processing dataflow engine for anomaly detection on IoT and edge
//! telemetry.
//!
//! This crate is what an embedder depends on: the extension API ([`api`]), the engine
//! ([`engine`]), the built-in components ([`operators`], [`connectors`]) and the command line
//! ([`cli`]), so a program can add its own operators and keep tidewatch's CLI:
//!
//! ```no_run
//! use tidewatch::{BuiltinsExt, Registry};
//!
//! fn main() -> std::process::ExitCode {
//!     let registry = Registry::with_builtins(); // .register("my_op", my_factory)
//!     tidewatch::cli::main(registry)
//! }
//! ```
//!
//! The built-in component types are registered here, above the engine ([`builtins`]): the
//! engine itself depends only on the extension API. Cargo features choose what is built in,
//! all on by default: `mqtt`, `kafka`, `s3` (connector families: MQTT, Kafka, the Parquet
//! lake with the model registry) and `onnxruntime`, `tract` (inference backends). An edge build takes
//! what it uses: `cargo build --release --no-default-features --features mqtt,tract`.

pub mod backtest;
#[cfg(feature = "s3")]
pub mod checkpoint_store;
pub mod cli;
#[cfg(feature = "s3")]
pub mod model_registry;
#[cfg(any(feature = "mqtt", feature = "kafka"))]
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

/// A registry with every built-in source, transform and sink of this build (the connector
/// families its features include).
///
/// ```
/// use tidewatch::engine::Class;
///
/// let registry = tidewatch::builtins();
/// assert!(registry.names(Class::Source).contains(&"simulator"));
/// assert!(registry.names(Class::Transform).contains(&"window"));
/// ```
pub fn builtins() -> Registry {
    let registry = tidewatch_connectors::builtins()
        .into_iter()
        .chain(tidewatch_operators::builtins())
        .fold(Registry::new(), |registry, (name, factory)| registry.register(name, factory));
    // The autoencoder that can follow a model registry in the lake's store.
    #[cfg(feature = "s3")]
    let registry = registry.register(
        "autoencoder",
        ComponentFactory::transform(model_registry::AutoencoderWithRegistry),
    );
    registry
}

/// `Registry::with_builtins()`, the spelling embedders know: the engine's [`Registry`] starts
/// empty, and this extension (in scope) fills it with [`builtins`].
///
/// ```
/// use tidewatch::{BuiltinsExt, ComponentFactory, Registry};
/// use tidewatch::operators::ThresholdFactory;
///
/// let registry = Registry::with_builtins()
///     .register("debounce", ComponentFactory::transform(ThresholdFactory));
/// assert!(registry.get(tidewatch::engine::Class::Transform, "debounce").is_some());
/// ```
pub trait BuiltinsExt {
    /// A registry with every built-in component type of this build.
    fn with_builtins() -> Self;
}

impl BuiltinsExt for Registry {
    fn with_builtins() -> Registry {
        builtins()
    }
}

//! The extension API of tidewatch.
//!
//! Everything a source, transform or sink needs, and nothing of the engine: the record types
//! ([`records`]), the component traits ([`Source`], [`Transform`], [`Sink`]), their factories
//! with typed configs and an erased form over TOML values ([`factory`]), and typed errors.
//! Connectors, operators and embedders depend on this crate only; timely types stay out of it.

pub mod catalog;
pub mod codec;
pub mod component;
pub mod error;
pub mod factory;
pub mod json;
pub mod records;
pub mod secret;
pub mod shared;
pub mod template;
pub mod time;

/// The `prometheus` crate, re-exported so components register collectors of the same version
/// as the engine's registry.
pub use prometheus;

pub use component::{
    Backlog, ComponentContext, MetricsRegistry, Outputs, PipelineInfo, Publisher, Sink, Source,
    SourcePoll, Staged, Transform, Waker, resolve_path,
};
pub use error::ComponentError;
pub use factory::{
    ComponentFactory, ConfigError, ConfigValue, ConfiguredSink, ConfiguredSource,
    ConfiguredTransform, MovedOption, PortType, SinkFactory, SourceFactory, TransformFactory,
    TransformProperties, ValidateContext,
};
pub use records::{
    AckToken, AnomalyEvent, AnomalyState, Batch, DeviceId, ErrorRecord, EventTime, Kind,
    LABEL_ANOMALY, LABEL_NORMAL, Labels, MessageExtras, RawBatch, RawMessage, Reading,
    ReadingBatch, Schema, Score, Window,
};
pub use secret::Secret;
pub use shared::ProcessShared;
pub use time::{TimestampFormat, parse_timestamp, timestamp_from_number};
